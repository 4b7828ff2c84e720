//! Dead letters: messages an inbox consumer gave up on, kept in
//! `consign_dead_letters` with the reason (and, if configured, copied to
//! `<topic>.dlq`). This module lists, counts, requeues and purges them;
//! `consign-relay dead-letters` is its command line.
//!
//! **Requeue** puts a dead letter back on its topic *through the outbox*
//! ([`Outbox::enqueue_batch`](consign_outbox::Outbox::enqueue_batch), so it
//! is validated like any message), in one transaction: the letter is
//! deleted, the consumer's dedup record of its message id is deleted (so
//! that consumer handles it again), and an outbox message with the same id,
//! key, payload, event type, trace context and user headers is enqueued,
//! marked [`requeued_for`](consign_outbox::Message::requeued_for) the
//! consumer. The relay then publishes it like any event. Other consumers of
//! the topic pass over it by that header, not by their dedup records (which
//! retention may have removed, and which a letter without id never
//! matches). A requeued message comes after the key's later events.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Pool;
use uuid::Uuid;

use crate::store::{InboxBackend, InboxStore as _};

mod record;
mod requeue;
pub(crate) mod stored;

pub(crate) use record::dead_letter;
pub use requeue::{Requeued, requeue};

/// Which dead letters a command applies to. Conditions combine with AND; an
/// empty selection matches nothing unless `all` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Selection {
    /// Only these dead-letter ids (the `id` column, not message ids).
    pub ids: Vec<i64>,
    /// Only letters of this consumer.
    pub consumer: Option<String>,
    /// Only letters whose Kafka key is this (UTF-8) text.
    pub key: Option<String>,
    /// Only letters that failed at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only letters that failed before this time.
    pub until: Option<DateTime<Utc>>,
    /// Match every letter (with the other conditions, if any).
    pub all: bool,
}

impl Selection {
    /// Every dead letter (narrow it with the fields).
    #[must_use]
    pub fn all() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    /// The dead letters with these ids.
    #[must_use]
    pub fn ids(ids: impl IntoIterator<Item = i64>) -> Self {
        Self {
            ids: ids.into_iter().collect(),
            ..Self::default()
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.consumer.is_none()
            && self.key.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && !self.all
    }
}

/// One dead letter, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Dead-letter id (what `requeue --id` takes).
    pub id: i64,
    /// The consumer that gave up.
    pub consumer: String,
    /// The message's `consign-id`, if it had one.
    pub message_id: Option<Uuid>,
    /// Where it was read from.
    pub topic: String,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// The key as text (lossy if it was not UTF-8).
    pub key: Option<String>,
    /// Why the consumer gave up.
    pub error: String,
    /// Handler attempts made.
    pub attempts: i32,
    /// When.
    pub failed_at: DateTime<Utc>,
}

/// Dead letters per consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct DeadLetterCount {
    /// Consumer name.
    pub consumer: String,
    /// Letters.
    pub count: i64,
    /// The newest letter's time.
    pub latest: DateTime<Utc>,
}

/// Lists the selected dead letters, oldest first, at most `limit`.
///
/// # Errors
/// On a database error.
pub async fn list<DB: InboxBackend>(
    pool: &Pool<DB>,
    selection: &Selection,
    limit: i64,
) -> sqlx::Result<Vec<DeadLetter>> {
    pool.acquire()
        .await?
        .list_dead_letters(selection, limit)
        .await
}

/// Dead letters per consumer.
///
/// # Errors
/// On a database error.
pub async fn counts<DB: InboxBackend>(pool: &Pool<DB>) -> sqlx::Result<Vec<DeadLetterCount>> {
    pool.acquire().await?.count_dead_letters().await
}

/// Deletes the selected dead letters. Returns how many.
///
/// # Errors
/// On a database error.
pub async fn purge<DB: InboxBackend>(pool: &Pool<DB>, selection: &Selection) -> sqlx::Result<u64> {
    pool.acquire().await?.purge_dead_letters(selection).await
}
