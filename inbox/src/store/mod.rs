//! The inbox's storage seam. Each backend is one module holding all of its
//! SQL (today [`postgres`]); [`InboxStore`] is everything the service, the
//! consumer, dead letters and retention ask of a connection. A second
//! database is a second module implementing it, plus that backend's
//! connection in [`Delivery`](crate::Delivery) (see the MySQL/SQLite notes
//! in DEVELOPERS.md).
//!
//! What every backend must give: the dedup record, the stored offset and
//! the handler's writes commit in one transaction (the caller's); offsets
//! only move forward; dead-letter rows keep the message whole.

use std::{collections::HashSet, future::Future};

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::{
    Received,
    dead_letters::{DeadLetter, DeadLetterCount, Selection},
};

mod postgres;

/// A dead letter as requeue reads it.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StoredLetter {
    pub(crate) id: i64,
    pub(crate) failed_at: DateTime<Utc>,
    pub(crate) consumer: String,
    pub(crate) message_id: Option<Uuid>,
    pub(crate) topic: String,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) headers: Value,
    pub(crate) payload: Option<Vec<u8>>,
}

/// What the inbox needs from a database connection. Implemented for
/// [`sqlx::PgConnection`]; each method is one statement (or one
/// transaction's worth of them on the caller's transaction) and returns the
/// database's error untouched.
pub(crate) trait InboxStore: Send {
    /// Records `ids` as handled by `consumer`; returns those that were new.
    fn record_ids(
        &mut self,
        consumer: &str,
        ids: &[Uuid],
    ) -> impl Future<Output = sqlx::Result<HashSet<Uuid>>> + Send;

    /// Moves a partition's stored position forward (never back: a late
    /// commit of a consumer that lost the partition cannot rewind the new
    /// owner).
    fn record_offset(
        &mut self,
        group: &str,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// The stored next offsets of `group` for `topics`.
    fn stored_offsets(
        &mut self,
        group: &str,
        topics: &[String],
    ) -> impl Future<Output = sqlx::Result<Vec<(String, i32, i64)>>> + Send;

    /// Writes a dead letter: the message whole, why and after how many
    /// attempts.
    fn insert_dead_letter(
        &mut self,
        consumer: &str,
        id: Option<Uuid>,
        message: &Received,
        error: &str,
        attempts: u32,
    ) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// The selected dead letters, oldest first, at most `limit`.
    fn list_dead_letters(
        &mut self,
        selection: &Selection,
        limit: i64,
    ) -> impl Future<Output = sqlx::Result<Vec<DeadLetter>>> + Send;

    /// Dead letters per consumer.
    fn count_dead_letters(
        &mut self,
    ) -> impl Future<Output = sqlx::Result<Vec<DeadLetterCount>>> + Send;

    /// Deletes the selected dead letters; returns how many.
    fn purge_dead_letters(
        &mut self,
        selection: &Selection,
    ) -> impl Future<Output = sqlx::Result<u64>> + Send;

    /// Up to `limit` selected letters after `(failed_at, id)` in that
    /// order, locked for the caller's transaction.
    fn lock_dead_letters(
        &mut self,
        selection: &Selection,
        after: Option<(DateTime<Utc>, i64)>,
        limit: i64,
    ) -> impl Future<Output = sqlx::Result<Vec<StoredLetter>>> + Send;

    /// Deletes a requeued letter and its consumer's dedup record of
    /// `message_id`, so that consumer handles the requeued copy.
    fn forget_dead_letter(
        &mut self,
        letter: i64,
        consumer: &str,
        message_id: Uuid,
    ) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// Deletes dedup records handled more than `inbox` seconds ago and, if
    /// set, dead letters older than `dead_letters` seconds (database clock).
    /// Returns how many of each.
    fn delete_older_than(
        &mut self,
        inbox: f64,
        dead_letters: Option<f64>,
    ) -> impl Future<Output = sqlx::Result<(u64, u64)>> + Send;
}
