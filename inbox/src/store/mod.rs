//! The inbox's storage seam. Each backend is one module holding all of its
//! SQL ([`postgres`], `mysql`, `sqlite`); [`InboxStore`] is everything the
//! service, the consumer, dead letters and retention ask of a connection,
//! and [`InboxBackend`] names the databases the inbox runs on: the type
//! parameter of [`Delivery`](crate::Delivery), [`InboxLayer`](crate::InboxLayer)
//! and [`InboxService`](crate::InboxService), PostgreSQL by default.
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

#[cfg(feature = "mysql")]
mod mysql;
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

/// A database the inbox runs on: [`sqlx::Postgres`], and with the crate
/// features `mysql` and `sqlite`, `sqlx::MySql` (MySQL 8, MariaDB 10.6+)
/// and `sqlx::Sqlite`. It is the type parameter of
/// [`Delivery`](crate::Delivery), [`InboxLayer`](crate::InboxLayer) and
/// [`InboxService`](crate::InboxService), which default to PostgreSQL and
/// take it from the pool given to [`InboxLayer::new`](crate::InboxLayer::new).
/// Sealed: other databases come as modules of this crate.
pub trait InboxBackend:
    sqlx::Database<Connection: InboxStore + consign_outbox::OutboxConnection> + sealed::Sealed
{
    /// Whether a database error is about the server or the connection
    /// (lost connection, shutdown, out of resources, timeouts), not about
    /// what a transaction did: then nothing of the message is at fault.
    #[doc(hidden)]
    fn is_infrastructure(error: &dyn sqlx::error::DatabaseError) -> bool;

    /// Whether the database refused a statement only because an earlier
    /// statement of the transaction had failed (PostgreSQL's 25P02; the
    /// other databases go on after a failed statement).
    #[doc(hidden)]
    fn is_after_earlier_error(error: &dyn sqlx::error::DatabaseError) -> bool;

    /// Begins a transaction that will write after reading (requeue):
    /// SQLite takes its write lock at once, so that the first write cannot
    /// fail on a snapshot another writer made stale.
    #[doc(hidden)]
    fn begin_write(
        pool: &sqlx::Pool<Self>,
    ) -> impl Future<Output = sqlx::Result<sqlx::Transaction<'static, Self>>> + Send {
        pool.begin()
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    #[cfg(feature = "mysql")]
    impl Sealed for sqlx::MySql {}
    #[cfg(feature = "sqlite")]
    impl Sealed for sqlx::Sqlite {}
}

/// A listed letter's columns.
pub(crate) type Listed = (
    i64,
    String,
    Option<Uuid>,
    String,
    i32,
    i64,
    Option<Vec<u8>>,
    String,
    i32,
    DateTime<Utc>,
);

pub(crate) fn listed(
    (id, consumer, message_id, topic, partition, offset, key, error, attempts, failed_at): Listed,
) -> DeadLetter {
    DeadLetter {
        id,
        consumer,
        message_id,
        topic,
        partition,
        offset,
        key: key.map(|k| String::from_utf8_lossy(&k).into_owned()),
        error,
        attempts,
        failed_at,
    }
}

/// A dead letter as requeue reads it.
#[derive(Debug, sqlx::FromRow)]
pub struct StoredLetter {
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
/// [`sqlx::PgConnection`], `MySqlConnection` and `SqliteConnection`; each
/// method is one statement (or one transaction's worth of them on the
/// caller's transaction) and returns the database's error untouched.
/// Public only to bound [`InboxBackend`]; not reachable from outside.
pub trait InboxStore: Send {
    /// Records `ids` as handled by `consumer`; returns those that were new.
    fn record_ids(
        &mut self,
        consumer: &str,
        ids: &[Uuid],
    ) -> impl Future<Output = sqlx::Result<HashSet<Uuid>>> + Send;

    /// Whether the transaction that [`record_ids`](Self::record_ids) began
    /// is still open. MySQL ends a transaction by itself on a deadlock
    /// (later statements then run in autocommit), so after each handler the
    /// inbox asks before going on; the other databases keep a failed
    /// transaction open (PostgreSQL refuses its later statements).
    fn still_open(&mut self) -> impl Future<Output = sqlx::Result<bool>> + Send {
        async { Ok(true) }
    }

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
