//! The wire contract: the Kafka headers consign writes and reads.
//!
//! The relay sets [`ID`] and [`EVENT_TYPE`] on every record (and the W3C
//! trace context, [`TRACEPARENT`] and [`TRACESTATE`], when the row has
//! one); the inbox reads them, and writes the `dlq` headers on the copies it
//! publishes to a `<topic>.dlq` topic. Names starting with
//! [`RESERVED_PREFIX`] are consign's: the outbox refuses them in a
//! message's own headers.

/// The message's id (a UUID), the inbox's dedup key.
pub const ID: &str = "consign-id";
/// The message's event type.
pub const EVENT_TYPE: &str = "consign-event-type";
/// On a requeued dead letter: the one consumer (inbox name) it is for.
/// Other consumers of the topic skip it, so requeueing never re-applies
/// an effect in a group that already handled the message.
pub const REQUEUED_FOR: &str = "consign-requeued-for";
/// W3C trace context, set from the row's captured context.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace state, set with [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";
/// Header names starting with this are consign's.
pub const RESERVED_PREFIX: &str = "consign-";

/// Headers the inbox adds to a message it copies to `<topic>.dlq`.
pub mod dlq {
    /// Why the message was dead-lettered.
    pub const ERROR: &str = "consign-dlq-error";
    /// The topic it was read from.
    pub const TOPIC: &str = "consign-dlq-topic";
    /// Its partition there.
    pub const PARTITION: &str = "consign-dlq-partition";
    /// Its offset there.
    pub const OFFSET: &str = "consign-dlq-offset";
    /// Handler attempts made.
    pub const ATTEMPTS: &str = "consign-dlq-attempts";
    /// The consumer (inbox name) that gave up on it.
    pub const CONSUMER: &str = "consign-dlq-consumer";
}
