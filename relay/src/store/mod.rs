//! The relay's storage seam. Each backend is one module holding all of its
//! SQL ([`postgres`], `mysql`, `sqlite`); [`RelayStore`] is everything the
//! relay's logic (publishing loop, lease coordinator, health sampler,
//! status, archive) asks of a connection, and [`DatabasePool`] the pool it
//! runs on, whose connection dispatches to the backend: the loop itself
//! does not know which database it runs on.
//!
//! What every backend must give the methods:
//! - rows of one key in `seq` (insert) order, skipping rows waiting for a
//!   retry and every later row of their key and topic;
//! - fenced writes: [`settle`](RelayStore::settle) and
//!   [`held`](RelayStore::held) check the lease rows against the epochs the
//!   relay read its rows under and lock them shared until the transaction
//!   ends (PostgreSQL `FOR SHARE`; MySQL `LOCK IN SHARE MODE`; SQLite's one
//!   writer, `BEGIN IMMEDIATE`), so a relay that lost a lease cannot delete
//!   its rows;
//! - the database's clock for every lease time.

use std::{collections::BTreeMap, future::Future};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    lease::{Lease, Member, Owned},
    status::{Backlog, FailedRow},
};

#[cfg(feature = "mysql")]
mod mysql;
mod pool;
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

pub(crate) use pool::Conn;
pub use pool::DatabasePool;

/// Appends `(v1, v2, …)` with each value bound (the backends without
/// arrays).
#[cfg(any(feature = "mysql", feature = "sqlite"))]
fn push_list<DB, T>(query: &mut sqlx::QueryBuilder<DB>, values: impl IntoIterator<Item = T>)
where
    DB: sqlx::Database,
    T: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB> + Send + 'static,
{
    query.push("(");
    let mut list = query.separated(", ");
    for value in values {
        list.push_bind(value);
    }
    list.push_unseparated(")");
}

/// The first rows of `rows` whose payload, key and headers add up to at
/// most `max_bytes` (the first row always, however large): the byte cap of
/// a batch, for the backends that read the rows before capping them.
#[cfg(feature = "mysql")]
fn cap_bytes(mut rows: Vec<OutboxRow>, max_bytes: i64) -> Vec<OutboxRow> {
    let max = usize::try_from(max_bytes).unwrap_or(usize::MAX);
    let mut total = 0_usize;
    let keep = rows
        .iter()
        .position(|row| {
            total += row.payload.len()
                + row.key.as_ref().map_or(0, String::len)
                + row.headers.to_string().len();
            total > max
        })
        .map_or(rows.len(), |over| over.max(1));
    rows.truncate(keep);
    rows
}

/// One outbox row as the relay reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct OutboxRow {
    pub(crate) seq: i64,
    pub(crate) id: Uuid,
    pub(crate) partition: i16,
    pub(crate) topic: String,
    pub(crate) key: Option<String>,
    pub(crate) event_type: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: serde_json::Value,
    pub(crate) traceparent: Option<String>,
    pub(crate) tracestate: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) attempts: i32,
}

impl OutboxRow {
    /// User headers as strings. Rows written by consign hold only strings; a
    /// row written by hand with another JSON value gets that value's JSON text.
    pub(crate) fn user_headers(&self) -> BTreeMap<&str, String> {
        let Some(object) = self.headers.as_object() else {
            return BTreeMap::new();
        };
        object
            .iter()
            .map(|(name, value)| {
                let value = match value {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (name.as_str(), value)
            })
            .collect()
    }
}

/// The database's answer to [`RelayStore::horizon`], read in one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Horizon {
    /// No transaction of the cluster was in progress, the outbox's sequence
    /// hands out its numbers one at a time (no per-session cache), and no
    /// user trigger runs on the outbox: every `seq` allocated more than a
    /// moment ago belongs to a finished transaction.
    pub(crate) quiet: bool,
    /// The last `seq` the outbox's sequence handed out.
    pub(crate) allocated: i64,
    /// The lowest `seq` of a row that failed and waits for (or is due for)
    /// its retry, in the partitions asked about.
    pub(crate) first_failed: Option<i64>,
}

/// A failed publish attempt to record on its row.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) seq: i64,
    pub(crate) error: String,
    pub(crate) retry_in_ms: i64,
}

/// The leases a relay holds: its instance name and, per partition, the
/// epoch it read rows under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fence<'a> {
    pub(crate) instance: &'a str,
    pub(crate) owned: &'a Owned,
}

/// The outbox backlog as the health sampler exports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BacklogSample {
    /// Rows waiting.
    pub(crate) pending: i64,
    /// Age of the oldest waiting row in seconds (0 when empty).
    pub(crate) oldest_age_seconds: f64,
    /// Waiting rows whose last attempt failed.
    pub(crate) with_errors: i64,
}

/// What a coordinator round read: the live members by name, and the
/// leases renewed as `(partition, epoch)`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Renewal {
    pub(crate) members: Vec<String>,
    pub(crate) renewed: Vec<(i16, i64)>,
}

/// What the relay needs from a database connection. Implemented for
/// [`sqlx::PgConnection`], `MySqlConnection`, `SqliteConnection` and the
/// pool's [`Conn`] dispatching to them; each method is one round (or one transaction)
/// and returns the database's error untouched, so the callers' deadline and
/// retry rules apply alike to every backend.
pub(crate) trait RelayStore: Send {
    /// The next rows to publish from `partitions`, in `seq` order: at most
    /// `limit` rows and `max_bytes` of payload, key and headers (the first
    /// row always, however large). Skips rows waiting for a retry and every
    /// later row of the same topic and key. Only rows above `after` (0: all;
    /// the relay's floor, see `relay/floor.rs`).
    fn fetch_batch(
        &mut self,
        partitions: &[i16],
        limit: i64,
        max_bytes: i64,
        after: i64,
    ) -> impl Future<Output = sqlx::Result<Vec<OutboxRow>>> + Send;

    /// What the relay's floor needs to know before a batch read (see
    /// `relay/floor.rs`), or `None` where the backend does not tell
    /// (MySQL, SQLite: they read from the start of the outbox every batch).
    fn horizon(
        &mut self,
        partitions: &[i16],
    ) -> impl Future<Output = sqlx::Result<Option<Horizon>>> + Send;

    /// The idle probe: the newest `seq` in the outbox above `after`, or
    /// `None` when there is none (in any partition: it is only a hint to
    /// read a batch now). One backwards scan of the primary key that stops
    /// at the first live row, and at `after`: the rows the relay already
    /// read and deleted lie below it, so a PostgreSQL index full of their
    /// dead entries is not walked (`max(seq)` alone would walk it until
    /// vacuum).
    fn newest_seq(&mut self, after: i64) -> impl Future<Output = sqlx::Result<Option<i64>>> + Send;

    /// Settles a batch in one transaction: deletes (or with `archive`,
    /// moves to the archive) the `delivered` rows and records `failures`
    /// (error, next attempt), both only in partitions `fence` still holds.
    /// Returns how many rows were deleted; rows of lost partitions stay for
    /// their new owner.
    fn settle(
        &mut self,
        fence: Fence<'_>,
        delivered: &[i64],
        failures: &[Failure],
        archive: bool,
    ) -> impl Future<Output = sqlx::Result<u64>> + Send;

    /// The partitions of `fence` still leased under the same epochs.
    fn held(&mut self, fence: Fence<'_>) -> impl Future<Output = sqlx::Result<Vec<i16>>> + Send;

    /// One coordinator round, in one transaction: refreshes `instance`'s
    /// heartbeat (registering it on `host` if new, expiring dead members),
    /// reads the live members by name, and renews `instance`'s leases for
    /// `ttl_ms`.
    fn renew(
        &mut self,
        instance: &str,
        host: &str,
        ttl_ms: i64,
    ) -> impl Future<Output = sqlx::Result<Renewal>> + Send;

    /// Acquires up to `wanted` free or expired partitions for `instance`
    /// (incrementing their epochs), skipping those another relay is
    /// acquiring at the same moment.
    fn acquire(
        &mut self,
        instance: &str,
        ttl_ms: i64,
        wanted: i64,
    ) -> impl Future<Output = sqlx::Result<Vec<(i16, i64)>>> + Send;

    /// Gives up leases held under the given epochs: owner cleared, so
    /// another relay can take them at once.
    fn release(
        &mut self,
        instance: &str,
        partitions: &[(i16, i64)],
    ) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// Releases every lease of `instance` and removes its membership, in
    /// one transaction.
    fn leave(&mut self, instance: &str) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// The id naming this outbox (default prefix of transactional ids).
    fn outbox_id(&mut self) -> impl Future<Output = sqlx::Result<Uuid>> + Send;

    /// Every partition's lease, in partition order.
    fn leases(&mut self) -> impl Future<Output = sqlx::Result<Vec<Lease>>> + Send;

    /// The relays whose heartbeat has not expired, by name.
    fn members(&mut self) -> impl Future<Output = sqlx::Result<Vec<Member>>> + Send;

    /// The backlog gauges.
    fn sample_backlog(&mut self) -> impl Future<Output = sqlx::Result<BacklogSample>> + Send;

    /// The database's clock, the backlog per partition and up to `limit`
    /// failed rows (oldest first), as `consign-relay status` shows them.
    fn backlog(
        &mut self,
        limit: i64,
    ) -> impl Future<Output = sqlx::Result<(DateTime<Utc>, Vec<Backlog>, Vec<FailedRow>)>> + Send;

    /// Creates the archive's partitions of today and the next `days_ahead`
    /// days (UTC) if missing.
    fn ensure_archive_partitions(
        &mut self,
        days_ahead: i32,
    ) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// Drops the archive's day partitions whose whole day is older than
    /// `older_than_ms` (database clock) and deletes rows that old from its
    /// default partition. Returns the partitions dropped and the rows deleted.
    fn drop_archive(
        &mut self,
        older_than_ms: i64,
    ) -> impl Future<Output = sqlx::Result<(Vec<String>, u64)>> + Send;
}
