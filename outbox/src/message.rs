//! The message model: what one outbox row holds.

use std::{borrow::Cow, collections::BTreeMap};

use serde::Serialize;
use uuid::Uuid;

use crate::{Error, Result, partition::partition_for};

/// An event to publish: topic, optional key, event type, payload and headers.
///
/// Its id is a UUID v7 assigned at construction; the relay sends it as the
/// Kafka header `consign-id` and consumers deduplicate on it.
///
/// ```
/// use consign_outbox::Message;
///
/// let msg = Message::new("orders", "OrderCreated", br#"{"id":42}"#.to_vec())
///     .with_key("order-42")
///     .with_header("tenant", "acme");
/// assert_eq!(msg.topic(), "orders");
/// assert_eq!(msg.key(), Some("order-42"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    id: Uuid,
    topic: String,
    key: Option<String>,
    event_type: String,
    payload: Vec<u8>,
    headers: BTreeMap<String, String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    requeued_for: Option<String>,
}

impl Message {
    /// A message with a new UUID v7 id, no key, no headers.
    ///
    /// Nothing is checked here; [`Outbox::enqueue`](crate::Outbox::enqueue)
    /// validates before writing.
    pub fn new(
        topic: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            topic: topic.into(),
            key: None,
            event_type: event_type.into(),
            payload: payload.into(),
            headers: BTreeMap::new(),
            traceparent: None,
            tracestate: None,
            requeued_for: None,
        }
    }

    /// A message whose payload is `value` serialized as JSON.
    ///
    /// # Errors
    /// [`Error::Serialize`] if serde cannot serialize the value.
    pub fn json<T: Serialize + ?Sized>(
        topic: impl Into<String>,
        event_type: impl Into<String>,
        value: &T,
    ) -> Result<Self> {
        let event_type = event_type.into();
        let payload = serde_json::to_vec(value).map_err(|source| Error::Serialize {
            event_type: event_type.clone(),
            source,
        })?;
        Ok(Self::new(topic, event_type, payload).with_header("content-type", "application/json"))
    }

    /// The message for a typed [`Event`](crate::Event): its topic, event
    /// type, key and JSON payload.
    ///
    /// # Errors
    /// [`Error::Serialize`] if serde cannot serialize the event.
    pub fn from_event<E: crate::Event>(event: &E) -> Result<Self> {
        let msg = Self::json(E::TOPIC, E::EVENT_TYPE, event)?;
        Ok(match event.key() {
            Some(key) => msg.with_key(key),
            None => msg,
        })
    }

    /// Sets the key: the Kafka message key, usually the aggregate's id.
    /// Messages with the same key are published in the order they were
    /// enqueued, to the same Kafka partition.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header, replacing one of the same name. Names starting with
    /// `consign-`, and `traceparent`/`tracestate`, are reserved.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the W3C trace context (`traceparent`, optional `tracestate`) to
    /// send with the message.
    #[must_use]
    pub fn with_trace_context(
        mut self,
        traceparent: impl Into<String>,
        tracestate: Option<String>,
    ) -> Self {
        self.traceparent = Some(traceparent.into());
        self.tracestate = tracestate;
        self
    }

    /// Replaces the generated id, e.g. to make a retried enqueue of the same
    /// logical event carry the same id. Prefer the generated UUID v7.
    #[must_use]
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Addresses the message to one consumer only: it is sent with the
    /// [`consign-requeued-for`](crate::headers::REQUEUED_FOR) header, and
    /// every other inbox consumer of the topic passes over it. This is how a
    /// dead letter goes back to the consumer that gave up on it
    /// (`consign_inbox::dead_letters::requeue`) without reaching the
    /// consumers that handled it already.
    #[must_use]
    pub fn requeued_for(mut self, consumer: impl Into<String>) -> Self {
        self.requeued_for = Some(consumer.into());
        self
    }

    /// The one consumer the message is for, if it was
    /// [`requeued_for`](Self::requeued_for) one.
    #[must_use]
    pub fn requeued_for_consumer(&self) -> Option<&str> {
        self.requeued_for.as_deref()
    }

    /// The message id (UUID v7 unless replaced).
    #[must_use]
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The destination topic.
    #[must_use]
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The key, if any.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The event type, sent as the header `consign-event-type`.
    #[must_use]
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The payload bytes.
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The user headers, by name.
    #[must_use]
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// The headers as stored in the outbox row: the user headers plus
    /// [`REQUEUED_FOR`](crate::headers::REQUEUED_FOR) when set.
    pub(crate) fn stored_headers(&self) -> Cow<'_, BTreeMap<String, String>> {
        match &self.requeued_for {
            None => Cow::Borrowed(&self.headers),
            Some(consumer) => {
                let mut headers = self.headers.clone();
                headers.insert(crate::headers::REQUEUED_FOR.to_owned(), consumer.clone());
                Cow::Owned(headers)
            }
        }
    }

    /// The W3C `traceparent`, if set.
    #[must_use]
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// The W3C `tracestate`, if set.
    #[must_use]
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The outbox partition this message will be stored in.
    #[must_use]
    pub fn partition(&self) -> i16 {
        partition_for(self.key(), &self.id)
    }
}
