//! Errors of the inbox.

/// A boxed error, as tower uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The inbox's one error type.
///
/// From the service ([`InboxService`](crate::InboxService)): why the inbox
/// could not settle a message. Handler failures are not errors here (they
/// are retried, then dead-lettered); these are failures of the inbox's own
/// machinery, after which nothing of the message was committed and it can
/// be offered again. From the builders and the consumer runner
/// ([`InboxConsumer`](crate::InboxConsumer)): configuration, Kafka, and the
/// conditions under which the consumer stops rather than skip a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database failed (connection lost, commit failed, ...).
    #[error("inbox database error: {0}")]
    Database(#[from] sqlx::Error),

    /// Publishing to the dead-letter topic failed.
    #[error("could not publish to dead-letter topic {topic}: {error}")]
    DeadLetterTopic {
        /// The `.dlq` topic.
        topic: String,
        /// The producer's error.
        error: rdkafka::error::KafkaError,
    },

    /// The inner service reported it cannot take requests any more.
    #[error("the handler service failed: {0}")]
    Service(BoxError),

    // The consumer runner.
    /// The Kafka client could not be created or subscribed; the message
    /// names the property or topic.
    #[error("kafka consumer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),

    /// A configuration value of the inbox or its consumer is wrong, or the
    /// broker refused it; the message names the setting.
    #[error("invalid inbox configuration: {0}")]
    Config(String),

    /// The Kafka client failed for good (librdkafka's fatal errors, e.g. a
    /// static member fenced by another with the same `group.instance.id`):
    /// it cannot consume any more; restart it (offsets are in the database).
    #[error("kafka consumer failed for good: {0}")]
    Fatal(String),

    /// The offset stored for a partition lies past the partition's end: the
    /// topic was deleted and created again (or its log was truncated).
    /// Consuming from there would skip the new records, so the consumer
    /// stops instead.
    #[error(
        "the offset stored for {topic}/{partition} ({stored}) is past the partition's end \
         ({end}): the topic was deleted and created again, or its log truncated. Check, then \
         delete the stored offsets of the topic (DELETE FROM consign_inbox_offsets WHERE \
         consumer_group = '{group}' AND topic = '{topic}') and start again"
    )]
    StoredOffsetPastEnd {
        /// The consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// The offset stored in the database.
        stored: i64,
        /// The partition's high watermark.
        end: i64,
    },

    /// A partition worker stopped unexpectedly; the consumer stopped so that
    /// no message is skipped (restarting resumes from the stored offsets).
    #[error("partition worker for {topic}/{partition} stopped unexpectedly: {reason}")]
    Worker {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// What happened.
        reason: String,
    },
}

/// The error of [`InboxService`](crate::InboxService): [`Error`].
pub type InboxError = Error;

/// The error of [`InboxConsumer`](crate::InboxConsumer): [`Error`].
pub type ConsumerError = Error;
