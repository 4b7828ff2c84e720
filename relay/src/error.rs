//! The relay's error type.

use rdkafka::error::KafkaError;

/// Result type of the relay API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can stop the relay from starting or running.
///
/// Outages (database or broker unreachable) are not errors of [`Relay::run`]:
/// the relay logs them, waits with backoff and carries on. Failures of single
/// rows are stored on the rows (`attempts`, `last_error`).
///
/// [`Relay::run`]: crate::Relay::run
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is missing or out of range.
    #[error("invalid configuration: {field}: {message}")]
    Config {
        /// The field, as written in the configuration file (`relay.batch-size`).
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },

    /// The Kafka producer could not be created.
    #[error("Kafka producer: {0}")]
    Kafka(#[from] KafkaError),

    /// A database error the relay does not retry (e.g. at migration).
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),

    /// Applying migrations failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// A database round did not finish within the relay's deadline (the
    /// database silent at the network level: no answer and no error). The
    /// connection was closed; the relay retries on a new one.
    #[error(
        "the database did not answer within {0:?} (a network dropping packets, a stalled server?); \
         its connection was closed and the relay retries on a new one"
    )]
    DatabaseSilent(std::time::Duration),

    /// The relay task panicked.
    #[error("relay task failed: {0}")]
    Task(String),
}

impl Error {
    /// A [`Error::Config`] naming `field`.
    #[must_use]
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            message: message.into(),
        }
    }
}
