//! The `headers` column of `consign_dead_letters`, typed both ways: a JSON
//! array keeping the message's headers in their order, a UTF-8 value as
//! `{"name", "value"}`, any other value as `{"name", "base64"}`, a header
//! without value as `{"name", "value": null}`. Written when a message is
//! dead-lettered, read back by requeue.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One stored header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum StoredHeader {
    /// A value that is not UTF-8, base64-encoded.
    Binary { name: String, base64: String },
    /// A UTF-8 value, or none.
    Text { name: String, value: Option<String> },
}

impl StoredHeader {
    fn new(name: &str, value: Option<&[u8]>) -> Self {
        let name = name.to_owned();
        match value.map(std::str::from_utf8) {
            None => Self::Text { name, value: None },
            Some(Ok(text)) => Self::Text {
                name,
                value: Some(text.to_owned()),
            },
            Some(Err(_)) => Self::Binary {
                name,
                base64: base64::engine::general_purpose::STANDARD.encode(value.unwrap_or_default()),
            },
        }
    }

    pub(crate) fn name(&self) -> &str {
        match self {
            Self::Binary { name, .. } | Self::Text { name, .. } => name,
        }
    }

    /// The value as text (empty for none), or `None` if it is binary.
    pub(crate) fn text(&self) -> Option<&str> {
        match self {
            Self::Binary { .. } => None,
            Self::Text { value, .. } => Some(value.as_deref().unwrap_or_default()),
        }
    }
}

/// The column value for a message's headers.
pub(crate) fn encode(headers: &[(String, Option<Vec<u8>>)]) -> Value {
    let stored: Vec<StoredHeader> = headers
        .iter()
        .map(|(name, value)| StoredHeader::new(name, value.as_deref()))
        .collect();
    serde_json::to_value(stored).expect("strings serialize to JSON")
}

/// The headers stored in a column value.
pub(crate) fn decode(column: &Value) -> Result<Vec<StoredHeader>, String> {
    Vec::<StoredHeader>::deserialize(column)
        .map_err(|e| format!("its stored headers are unreadable ({e})"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn headers_round_trip_with_binary_values_as_base64() {
        let headers = vec![
            ("a".to_owned(), Some(b"text".to_vec())),
            ("b".to_owned(), Some(vec![0xff, 0x00])),
            ("c".to_owned(), None),
        ];
        let column = encode(&headers);
        assert_eq!(
            column,
            json!([
                {"name": "a", "value": "text"},
                {"name": "b", "base64": "/wA="},
                {"name": "c", "value": null},
            ])
        );
        let decoded = decode(&column).unwrap();
        let read: Vec<_> = decoded.iter().map(|h| (h.name(), h.text())).collect();
        assert_eq!(read, [("a", Some("text")), ("b", None), ("c", Some(""))]);
    }

    #[test]
    fn unreadable_columns_say_so() {
        let error = decode(&json!({"not": "an array"})).unwrap_err();
        assert!(error.contains("unreadable"), "{error}");
    }
}
