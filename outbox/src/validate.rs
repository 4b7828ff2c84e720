//! Checks a message against Kafka's rules and the configured limits before
//! anything is written, so a bad message never aborts the caller's
//! transaction.

use crate::headers::{self, RESERVED_PREFIX};
use crate::{Error, Message, Result};

/// Size limits applied at enqueue. The defaults keep key, headers and payload
/// together under Kafka's default `message.max.bytes` of 1 000 000 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest payload in bytes. Default 921 600 (900 KiB).
    pub max_payload_bytes: usize,
    /// Largest key in bytes. Default 4096.
    pub max_key_bytes: usize,
    /// Largest sum of header name and value lengths. Default 65 536.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 900 * 1024,
            max_key_bytes: 4096,
            max_header_bytes: 64 * 1024,
        }
    }
}

/// Header names the relay sets itself.
const RESERVED_HEADERS: [&str; 2] = [headers::TRACEPARENT, headers::TRACESTATE];

impl Limits {
    /// Checks every rule; the first one broken is returned.
    pub(crate) fn check(&self, msg: &Message) -> Result<()> {
        check_topic(msg.topic())?;
        check_event_type(msg.event_type())?;
        if let Some(key) = msg.key() {
            check_key(key)?;
            if key.len() > self.max_key_bytes {
                return Err(Error::KeyTooLarge {
                    id: msg.id(),
                    size: key.len(),
                    limit: self.max_key_bytes,
                });
            }
        }
        if msg.payload().len() > self.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                id: msg.id(),
                size: msg.payload().len(),
                limit: self.max_payload_bytes,
            });
        }
        self.check_headers(msg)?;
        check_trace_context(msg.traceparent(), msg.tracestate())
    }

    fn check_headers(&self, msg: &Message) -> Result<()> {
        let mut size = 0;
        for (name, value) in msg.headers() {
            check_header(name, value)?;
            size += name.len() + value.len();
        }
        if size > self.max_header_bytes {
            return Err(Error::HeadersTooLarge {
                id: msg.id(),
                size,
                limit: self.max_header_bytes,
            });
        }
        Ok(())
    }
}

fn check_topic(topic: &str) -> Result<()> {
    let invalid = |reason| {
        Err(Error::InvalidTopic {
            topic: topic.to_owned(),
            reason,
        })
    };
    if topic.is_empty() {
        return invalid("it is empty");
    }
    if topic.len() > 249 {
        return invalid("it is longer than 249 characters");
    }
    if topic == "." || topic == ".." {
        return invalid("\".\" and \"..\" are reserved");
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return invalid("it contains a character outside a-z, A-Z, 0-9, '.', '_', '-'");
    }
    Ok(())
}

fn check_event_type(event_type: &str) -> Result<()> {
    let invalid = |reason| {
        Err(Error::InvalidEventType {
            event_type: event_type.to_owned(),
            reason,
        })
    };
    if event_type.is_empty() {
        return invalid("it is empty");
    }
    if event_type.len() > 255 {
        return invalid("it is longer than 255 bytes");
    }
    if event_type.chars().any(char::is_control) {
        return invalid("it contains a control character");
    }
    Ok(())
}

fn check_key(key: &str) -> Result<()> {
    if key.contains('\0') {
        return Err(Error::InvalidKey {
            key: key.to_owned(),
            reason: "it contains a NUL character, which PostgreSQL text cannot store",
        });
    }
    Ok(())
}

fn check_header(name: &str, value: &str) -> Result<()> {
    let invalid = |reason| {
        Err(Error::InvalidHeader {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("the name is empty");
    }
    if name.len() > 255 {
        return invalid("the name is longer than 255 bytes");
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return invalid("the name contains whitespace or a control character");
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with(RESERVED_PREFIX) || RESERVED_HEADERS.contains(&lower.as_str()) {
        return invalid(
            "the name is reserved (consign-*, traceparent, tracestate are set by consign; use Message::with_trace_context for trace headers)",
        );
    }
    if value.contains('\0') {
        return invalid("the value contains a NUL character, which PostgreSQL cannot store");
    }
    Ok(())
}

fn check_trace_context(traceparent: Option<&str>, tracestate: Option<&str>) -> Result<()> {
    let invalid = |reason| Err(Error::InvalidTraceContext { reason });
    if let Some(tp) = traceparent {
        // version "-" trace-id "-" parent-id "-" flags, lower-case hex.
        let parts: Vec<&str> = tp.split('-').collect();
        let hex = |s: &str, len| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if parts.len() != 4
            || !hex(parts[0], 2)
            || !hex(parts[1], 32)
            || !hex(parts[2], 16)
            || !hex(parts[3], 2)
        {
            return invalid("traceparent is not \"vv-<32 hex>-<16 hex>-ff\" in lower-case hex");
        }
    }
    if let Some(ts) = tracestate {
        if traceparent.is_none() {
            return invalid("tracestate given without traceparent");
        }
        if ts.len() > 512 || !ts.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return invalid("tracestate must be at most 512 printable ASCII characters");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(msg: &Message) -> Result<()> {
        Limits::default().check(msg)
    }

    #[test]
    fn accepts_a_plain_message() {
        let msg = Message::new("orders.v1_x-y", "OrderCreated", vec![1, 2, 3])
            .with_key("k")
            .with_header("tenant", "acme")
            .with_trace_context(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                Some("congo=t61rcWkgMzE".into()),
            );
        check(&msg).unwrap();
    }

    #[test]
    fn rejects_bad_topics() {
        for topic in ["", ".", "..", "has space", "ümlaut", &"x".repeat(250)] {
            let err = check(&Message::new(topic, "E", vec![])).unwrap_err();
            assert!(
                matches!(err, Error::InvalidTopic { .. }),
                "{topic:?}: {err}"
            );
        }
    }

    #[test]
    fn rejects_oversize_payload_naming_sizes() {
        let limits = Limits {
            max_payload_bytes: 10,
            ..Limits::default()
        };
        let err = limits
            .check(&Message::new("t", "E", vec![0; 11]))
            .unwrap_err();
        assert!(matches!(
            err,
            Error::PayloadTooLarge {
                size: 11,
                limit: 10,
                ..
            }
        ));
        assert!(
            err.to_string().contains("11 bytes, over the limit of 10"),
            "{err}"
        );
    }

    #[test]
    fn rejects_bad_headers() {
        for (name, value) in [
            ("", "v"),
            ("consign-id", "x"),
            ("TraceParent", "x"),
            ("has space", "v"),
            ("ok", "nul\0"),
        ] {
            let err = check(&Message::new("t", "E", vec![]).with_header(name, value)).unwrap_err();
            assert!(
                matches!(err, Error::InvalidHeader { .. }),
                "{name:?}: {err}"
            );
        }
        let limits = Limits {
            max_header_bytes: 5,
            ..Limits::default()
        };
        let err = limits
            .check(&Message::new("t", "E", vec![]).with_header("abc", "def"))
            .unwrap_err();
        assert!(matches!(
            err,
            Error::HeadersTooLarge {
                size: 6,
                limit: 5,
                ..
            }
        ));
    }

    #[test]
    fn rejects_bad_keys_event_types_and_trace_context() {
        let nul_key = Message::new("t", "E", vec![]).with_key("a\0b");
        assert!(matches!(check(&nul_key), Err(Error::InvalidKey { .. })));
        let long_key = Message::new("t", "E", vec![]).with_key("k".repeat(4097));
        assert!(matches!(check(&long_key), Err(Error::KeyTooLarge { .. })));
        for event_type in ["", "a\nb"] {
            let msg = Message::new("t", event_type, vec![]);
            assert!(matches!(check(&msg), Err(Error::InvalidEventType { .. })));
        }
        let bad_trace = Message::new("t", "E", vec![]).with_trace_context("00-xyz", None);
        assert!(matches!(
            check(&bad_trace),
            Err(Error::InvalidTraceContext { .. })
        ));
    }
}
