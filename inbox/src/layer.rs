//! `InboxLayer` and its configuration.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::producer::FutureProducer;
use sqlx::{Pool, Postgres};
use tower::Layer;

use crate::{Error, InboxBackend, InboxService};

/// What the inbox does with a message that has no usable `consign-id`
/// header (not produced by a consign relay, or altered on the way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingId {
    /// Send it to the dead letters with the reason (the default: without an
    /// id, duplicates cannot be recognised across producers' retries).
    #[default]
    DeadLetter,
    /// Derive the id from the record's topic, partition and offset
    /// ([`Received::position_id`](crate::Received::position_id)):
    /// redeliveries of the same record are recognised, but the same event
    /// produced twice is handled twice.
    FromPosition,
}

/// How often and how fast a failing handler is retried before its message
/// goes to the dead letters.
///
/// ```
/// use std::time::Duration;
/// use consign_inbox::RetryPolicy;
///
/// let retry = RetryPolicy::attempts(3).with_delays(Duration::from_millis(10), Duration::from_secs(1));
/// assert_eq!(retry.max_attempts, 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1). Default 5.
    pub max_attempts: u32,
    /// Delay before the second attempt; it doubles per attempt (with
    /// jitter). Default 100 ms.
    pub min_delay: Duration,
    /// Longest delay between attempts. Default 10 s.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// `max_attempts` attempts in all (the first included), with the
    /// default delays.
    #[must_use]
    pub fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts,
            ..Self::default()
        }
    }

    /// The delay before the second attempt (`min`, doubling per attempt)
    /// and the longest delay (`max`).
    #[must_use]
    pub fn with_delays(mut self, min: Duration, max: Duration) -> Self {
        self.min_delay = min;
        self.max_delay = max;
        self
    }

    pub(crate) fn delays(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        consign_outbox::backoff::delays(self.min_delay, self.max_delay)
    }
}

/// Counters of an inbox since it was built (shared by all its services).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct InboxStats {
    /// Messages whose handler succeeded and committed.
    pub handled: u64,
    /// Messages skipped because their id was already recorded.
    pub duplicates: u64,
    /// Handler attempts that failed (error, panic, rejection).
    pub failed_attempts: u64,
    /// Messages sent to the dead letters.
    pub dead_lettered: u64,
    /// Requeued dead letters of another consumer, passed over (see
    /// [`headers::REQUEUED_FOR`](crate::headers::REQUEUED_FOR)).
    pub for_another_consumer: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) handled: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) failed_attempts: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) for_another_consumer: AtomicU64,
}

/// What a count is of.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counted {
    Handled,
    Duplicate,
    FailedAttempt,
    DeadLettered,
    ForAnotherConsumer,
}

impl<DB: InboxBackend> Shared<DB> {
    /// Adds `n` to the inbox's counter and to its metric.
    pub(crate) fn count(&self, what: Counted, n: u64) {
        if n == 0 {
            return;
        }
        let c = &self.counters;
        let (counter, outcome) = match what {
            Counted::Handled => (&c.handled, Some("handled")),
            Counted::Duplicate => (&c.duplicates, Some("duplicate")),
            Counted::DeadLettered => (&c.dead_lettered, Some("dead_lettered")),
            Counted::ForAnotherConsumer => (&c.for_another_consumer, Some("for_another_consumer")),
            Counted::FailedAttempt => (&c.failed_attempts, None),
        };
        counter.fetch_add(n, Ordering::Relaxed);
        let consumer = self.consumer.clone();
        match outcome {
            Some(outcome) => metrics::counter!(
                crate::metrics::MESSAGES, "consumer" => consumer, "outcome" => outcome
            ),
            None => metrics::counter!(crate::metrics::FAILED_ATTEMPTS, "consumer" => consumer),
        }
        .increment(n);
    }
}

/// Settings shared by an inbox's services.
pub(crate) struct Shared<DB: InboxBackend> {
    pub(crate) pool: Pool<DB>,
    pub(crate) consumer: String,
    pub(crate) retry: RetryPolicy,
    pub(crate) missing_id: MissingId,
    pub(crate) dead_letter_producer: Option<FutureProducer>,
    pub(crate) counters: Counters,
}

impl<DB: InboxBackend> std::fmt::Debug for Shared<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("consumer", &self.consumer)
            .field("retry", &self.retry)
            .field("missing_id", &self.missing_id)
            .field("dead_letter_topic", &self.dead_letter_producer.is_some())
            .finish_non_exhaustive()
    }
}

/// A tower [`Layer`] that makes the wrapped handler's effect happen once per
/// message id.
///
/// For each message (or batch of messages) the inbox opens a transaction,
/// records `(consumer, message id)` with `INSERT … ON CONFLICT DO NOTHING`
/// and the message's Kafka offset, and calls the inner service with a
/// [`Delivery`](crate::Delivery) carrying that transaction, only for ids not
/// seen before. It commits when the inner service returns `Ok`; on an error
/// or a panic it rolls back and retries with backoff, then dead-letters.
///
/// The consumer name is also the Kafka consumer group of an
/// [`InboxConsumer`](crate::InboxConsumer) built from this layer and the
/// group under which offsets are stored.
///
/// ```no_run
/// use consign_inbox::{Delivery, InboxLayer};
/// use tower::ServiceBuilder;
///
/// # fn demo(pool: sqlx::PgPool) -> Result<(), consign_inbox::Error> {
/// let inbox = InboxLayer::new(pool, "inventory")?;
/// let service = ServiceBuilder::new()
///     .layer(inbox)
///     .timeout(std::time::Duration::from_secs(5)) // per handler call
///     .service_fn(|mut d: Delivery| async move {
///         sqlx::query("INSERT INTO seen (id) VALUES ($1)")
///             .bind(d.id())
///             .execute(d.conn())
///             .await?;
///         Ok::<_, sqlx::Error>(())
///     });
/// # let _ = service;
/// # Ok(()) }
/// ```
/// The inbox runs on the pool's database: PostgreSQL, or with the crate
/// features `mysql` and `sqlite` a `MySqlPool` or `SqlitePool` (then the
/// handler takes a `Delivery<sqlx::MySql>` or `Delivery<sqlx::Sqlite>`).
#[derive(Debug)]
pub struct InboxLayer<DB: InboxBackend = Postgres> {
    pub(crate) shared: Arc<Shared<DB>>,
}

impl<DB: InboxBackend> Clone for InboxLayer<DB> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<DB: InboxBackend> InboxLayer<DB> {
    /// An inbox for `consumer` with the default retry policy and
    /// [`MissingId::DeadLetter`].
    ///
    /// # Errors
    /// [`Error::Config`] if `consumer` is empty.
    pub fn new(pool: Pool<DB>, consumer: impl Into<String>) -> Result<Self, Error> {
        Self::builder(pool, consumer).build()
    }

    /// Starts configuring an inbox for `consumer`.
    pub fn builder(pool: Pool<DB>, consumer: impl Into<String>) -> InboxLayerBuilder<DB> {
        InboxLayerBuilder {
            pool,
            consumer: consumer.into(),
            retry: RetryPolicy::default(),
            missing_id: MissingId::default(),
            dead_letter_producer: None,
        }
    }

    /// The consumer name (dedup scope, offsets group, Kafka group id).
    #[must_use]
    pub fn consumer(&self) -> &str {
        &self.shared.consumer
    }

    /// The database pool.
    #[must_use]
    pub fn pool(&self) -> &Pool<DB> {
        &self.shared.pool
    }

    /// Counters since the inbox was built.
    #[must_use]
    pub fn stats(&self) -> InboxStats {
        let c = &self.shared.counters;
        InboxStats {
            handled: c.handled.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            failed_attempts: c.failed_attempts.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            for_another_consumer: c.for_another_consumer.load(Ordering::Relaxed),
        }
    }
}

impl<S, DB: InboxBackend> Layer<S> for InboxLayer<DB> {
    type Service = InboxService<S, DB>;

    fn layer(&self, inner: S) -> Self::Service {
        InboxService::new(Arc::clone(&self.shared), inner)
    }
}

/// Configures an [`InboxLayer`].
#[must_use]
pub struct InboxLayerBuilder<DB: InboxBackend = Postgres> {
    pool: Pool<DB>,
    consumer: String,
    retry: RetryPolicy,
    missing_id: MissingId,
    dead_letter_producer: Option<FutureProducer>,
}

impl<DB: InboxBackend> std::fmt::Debug for InboxLayerBuilder<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxLayerBuilder")
            .field("consumer", &self.consumer)
            .field("retry", &self.retry)
            .field("missing_id", &self.missing_id)
            .field("dead_letter_topic", &self.dead_letter_producer.is_some())
            .finish_non_exhaustive()
    }
}

impl<DB: InboxBackend> InboxLayerBuilder<DB> {
    /// Retry policy for failing handlers.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// What to do with messages without a `consign-id` header.
    pub fn missing_id(mut self, policy: MissingId) -> Self {
        self.missing_id = policy;
        self
    }

    /// Also publish each dead letter to `<topic>.dlq` with this producer,
    /// with the original headers plus `consign-dlq-error`,
    /// `consign-dlq-topic`, `consign-dlq-partition`, `consign-dlq-offset`,
    /// `consign-dlq-attempts` and `consign-dlq-consumer` (see
    /// [`headers::dlq`](crate::headers::dlq)). The inbox waits for the
    /// broker's acknowledgement before it commits the dead letter, so the
    /// topic never misses a dead letter the table has; the other way round,
    /// a commit that then fails (or a crash just before it) leaves a copy on
    /// the topic that the table does not have, and the message's next try
    /// may publish another: the `.dlq` topic is at least once (deduplicate
    /// by `consign-id` and `consign-dlq-offset`), the
    /// `consign_dead_letters` table exact.
    pub fn dead_letter_topic(mut self, producer: FutureProducer) -> Self {
        self.dead_letter_producer = Some(producer);
        self
    }

    /// Builds the layer.
    ///
    /// # Errors
    /// [`Error::Config`] if the consumer name is empty or the retry policy
    /// allows no attempt.
    pub fn build(self) -> Result<InboxLayer<DB>, Error> {
        if self.consumer.trim().is_empty() {
            return Err(Error::Config(
                "the inbox consumer name must not be empty".into(),
            ));
        }
        // The dedup scope and the Kafka group: stored in a 255-character
        // column, and MySQL's collation ignores trailing spaces, so
        // "orders " and "orders" would share records there.
        if self.consumer.chars().count() > 255 || self.consumer.trim() != self.consumer {
            return Err(Error::Config(format!(
                "the inbox consumer name {:?} must be at most 255 characters, \
                 without leading or trailing whitespace",
                self.consumer
            )));
        }
        if self.retry.max_attempts == 0 {
            return Err(Error::Config(
                "RetryPolicy::max_attempts must be at least 1".into(),
            ));
        }
        if self.retry.min_delay > self.retry.max_delay {
            return Err(Error::Config(format!(
                "RetryPolicy::min_delay ({:?}) must not exceed max_delay ({:?})",
                self.retry.min_delay, self.retry.max_delay
            )));
        }
        Ok(InboxLayer {
            shared: Arc::new(Shared {
                pool: self.pool,
                consumer: self.consumer,
                retry: self.retry,
                missing_id: self.missing_id,
                dead_letter_producer: self.dead_letter_producer,
                counters: Counters::default(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(consumer: &str, retry: RetryPolicy) -> Result<InboxLayer, Error> {
        let pool = sqlx::PgPool::connect_lazy("postgres://unused@127.0.0.1:1/none").unwrap();
        InboxLayer::builder(pool, consumer).retry(retry).build()
    }

    #[tokio::test]
    async fn bad_settings_are_refused_naming_the_problem() {
        let long = "c".repeat(256);
        for (consumer, retry, expected) in [
            ("", RetryPolicy::default(), "must not be empty"),
            (
                long.as_str(),
                RetryPolicy::default(),
                "at most 255 characters",
            ),
            ("orders ", RetryPolicy::default(), "trailing whitespace"),
            (
                "orders",
                RetryPolicy::attempts(0),
                "max_attempts must be at least 1",
            ),
        ] {
            let error = build(consumer, retry).unwrap_err().to_string();
            assert!(error.contains(expected), "{consumer:?}: {error}");
        }
        build(&"c".repeat(255), RetryPolicy::default()).unwrap();
    }
}
