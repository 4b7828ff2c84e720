//! The outbox's error type.

use uuid::Uuid;

/// Result type of the outbox API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong while building or enqueueing a message.
///
/// Validation errors are returned **before** anything is sent to the
/// database, so the caller's transaction stays usable and nothing is written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The topic name is not a valid Kafka topic name.
    #[error(
        "invalid topic {topic:?}: {reason} (allowed: 1 to 249 characters of a-z, A-Z, 0-9, '.', '_', '-'; not \".\" or \"..\")"
    )]
    InvalidTopic {
        /// The rejected topic name.
        topic: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// The event type is empty, too long, or holds control characters.
    #[error("invalid event type {event_type:?}: {reason}")]
    InvalidEventType {
        /// The rejected event type.
        event_type: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// The message key holds a character PostgreSQL cannot store (NUL).
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The rejected key.
        key: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// The key is longer than the configured limit.
    #[error(
        "key of message {id} is {size} bytes, over the limit of {limit} bytes (OutboxBuilder::max_key_bytes)"
    )]
    KeyTooLarge {
        /// The message's id.
        id: Uuid,
        /// Key size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// The payload is larger than the configured limit.
    #[error(
        "payload of message {id} is {size} bytes, over the limit of {limit} bytes (OutboxBuilder::max_payload_bytes)"
    )]
    PayloadTooLarge {
        /// The message's id.
        id: Uuid,
        /// Payload size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// A header name or value breaks a rule.
    #[error("invalid header {name:?}: {reason}")]
    InvalidHeader {
        /// The header's name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// Header names and values together are larger than the configured limit.
    #[error(
        "headers of message {id} are {size} bytes, over the limit of {limit} bytes (OutboxBuilder::max_header_bytes)"
    )]
    HeadersTooLarge {
        /// The message's id.
        id: Uuid,
        /// Total size of names and values in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// The W3C trace context is malformed.
    #[error("invalid trace context: {reason}")]
    InvalidTraceContext {
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// A message of a batch is invalid; nothing of the batch was written.
    #[error("message {index} of the batch: {source}")]
    InBatch {
        /// Position of the message in the batch, from 0.
        index: usize,
        /// What is wrong with it.
        source: Box<Error>,
    },

    /// The event could not be serialized to JSON.
    #[error("could not serialize event {event_type} to JSON: {source}")]
    Serialize {
        /// The event type being serialized.
        event_type: String,
        /// The serializer's error.
        source: serde_json::Error,
    },

    /// The database refused the insert or could not be reached. The caller's
    /// transaction is aborted and must be rolled back.
    #[error("database error while enqueueing: {0}")]
    Database(#[from] sqlx::Error),
}
