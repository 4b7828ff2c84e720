//! A message as it came from Kafka, owned.

use rdkafka::Message as _;
use rdkafka::message::{BorrowedMessage, Headers as _};
use uuid::Uuid;

use consign_outbox::headers::{EVENT_TYPE as EVENT_TYPE_HEADER, ID as ID_HEADER};

/// One Kafka message, detached from the consumer so it can be queued,
/// retried and dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The topic it was read from.
    pub topic: String,
    /// The Kafka partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// The Kafka key, if any.
    pub key: Option<Vec<u8>>,
    /// Headers in their order; a header may have no value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The payload; `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Broker or producer timestamp, milliseconds since the epoch.
    pub timestamp_millis: Option<i64>,
}

impl Received {
    /// Copies a message borrowed from an rdkafka consumer.
    #[must_use]
    pub fn from_kafka(message: &BorrowedMessage<'_>) -> Self {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            headers,
            payload: message.payload().map(<[u8]>::to_vec),
            timestamp_millis: message.timestamp().to_millis(),
        }
    }

    /// A message built by hand, for tests and for feeding an inbox from
    /// another source.
    #[must_use]
    pub fn new(topic: impl Into<String>, partition: i32, offset: i64) -> Self {
        Self {
            topic: topic.into(),
            partition,
            offset,
            key: None,
            headers: Vec::new(),
            payload: None,
            timestamp_millis: None,
        }
    }

    /// Sets the payload.
    #[must_use]
    pub fn with_payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = Some(payload.into());
        self
    }

    /// Sets the key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Appends a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), Some(value.into())));
        self
    }

    /// The value of the last header called `name`, if it has one.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// The value of the last header called `name` as UTF-8 text.
    #[must_use]
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The key as UTF-8 text.
    #[must_use]
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The `consign-event-type` header.
    #[must_use]
    pub fn event_type(&self) -> Option<&str> {
        self.header_str(EVENT_TYPE_HEADER)
    }

    /// The message id from the `consign-id` header.
    ///
    /// # Errors
    /// A reason when the header is missing or is not a UUID.
    pub fn consign_id(&self) -> Result<Uuid, String> {
        match self.header(ID_HEADER) {
            None => Err(format!("no {ID_HEADER} header")),
            Some(raw) => std::str::from_utf8(raw)
                .ok()
                .and_then(|s| Uuid::parse_str(s.trim()).ok())
                .ok_or_else(|| {
                    format!(
                        "{ID_HEADER} header is not a UUID: {:?}",
                        String::from_utf8_lossy(raw)
                    )
                }),
        }
    }

    /// An id derived from where the message sits (topic, partition,
    /// offset) and its timestamp: the same for every redelivery of this
    /// record, different for a record produced twice, and different for a
    /// new record at the same offset of a topic deleted and created again
    /// (its timestamp differs), so it is not taken for the old one.
    #[must_use]
    pub fn position_id(&self) -> Uuid {
        let name = match self.timestamp_millis {
            Some(millis) => format!("{}/{}/{}@{millis}", self.topic, self.partition, self.offset),
            None => format!("{}/{}/{}", self.topic, self.partition, self.offset),
        };
        Uuid::new_v5(&POSITION_NAMESPACE, name.as_bytes())
    }
}

/// Namespace of [`Received::position_id`] ids.
const POSITION_NAMESPACE: Uuid = Uuid::from_u128(0x6c1d_1d1e_5a1b_4f0e_9c3a_c0a5_1a70_0001);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_the_header_or_say_why_not() {
        let id = Uuid::now_v7();
        let m = Received::new("t", 0, 7).with_header(ID_HEADER, id.to_string());
        assert_eq!(m.consign_id(), Ok(id));
        let missing = Received::new("t", 0, 7);
        assert_eq!(missing.consign_id(), Err("no consign-id header".into()));
        let bad = Received::new("t", 0, 7).with_header(ID_HEADER, "nope");
        assert!(bad.consign_id().unwrap_err().contains("not a UUID"));
    }

    #[test]
    fn position_ids_are_stable_per_record() {
        let a = Received::new("t", 1, 7);
        assert_eq!(a.position_id(), Received::new("t", 1, 7).position_id());
        assert_ne!(a.position_id(), Received::new("t", 1, 8).position_id());
        assert_ne!(a.position_id(), Received::new("t", 2, 7).position_id());
        // A record of a topic created again, at the same offset.
        let stamped = |millis| Received {
            timestamp_millis: Some(millis),
            ..Received::new("t", 1, 7)
        };
        assert_eq!(stamped(5).position_id(), stamped(5).position_id());
        assert_ne!(stamped(5).position_id(), stamped(6).position_id());
    }
}
