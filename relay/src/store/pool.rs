//! The pool the relay runs on: one variant per backend compiled in, and
//! the connection it lends, which dispatches [`RelayStore`] to that
//! backend's module. Matched once per database round, so [`Relay`] stays
//! one type whatever the database.
//!
//! [`Relay`]: crate::Relay

use std::fmt;

use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use uuid::Uuid;

use super::{BacklogSample, Failure, Fence, Horizon, OutboxRow, RelayStore, Renewal};
use crate::{
    lease::{Lease, Member},
    status::{Backlog, FailedRow},
};

/// A database pool the relay can run on. Built `From` a [`sqlx::PgPool`],
/// and with the crate features `mysql` and `sqlite` from a
/// `sqlx::MySqlPool` (MySQL 8, MariaDB 10.6+) or a `sqlx::SqlitePool`, so
/// [`Relay::builder`](crate::Relay::builder) and the functions taking a pool
/// accept any of them as they are:
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let status = consign_relay::status(&pool).await?;
/// let relay = consign_relay::Relay::builder(pool)
///     .kafka("bootstrap.servers", "localhost:9092")
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub enum DatabasePool {
    /// PostgreSQL (always compiled in).
    Postgres(sqlx::PgPool),
    /// MySQL 8 or MariaDB 10.6+ (feature `mysql`).
    #[cfg(feature = "mysql")]
    MySql(sqlx::MySqlPool),
    /// SQLite (feature `sqlite`): relays on one host, sharing the file.
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
}

impl fmt::Debug for DatabasePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabasePool({})", self.backend())
    }
}

impl DatabasePool {
    /// The backend's name as messages and metrics show it: `PostgreSQL`,
    /// `MySQL` (also for MariaDB) or `SQLite`.
    #[must_use]
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "PostgreSQL",
            #[cfg(feature = "mysql")]
            Self::MySql(_) => "MySQL",
            #[cfg(feature = "sqlite")]
            Self::Sqlite(_) => "SQLite",
        }
    }

    pub(crate) async fn acquire(&self) -> sqlx::Result<Conn> {
        Ok(match self {
            Self::Postgres(pool) => Conn::Postgres(pool.acquire().await?),
            #[cfg(feature = "mysql")]
            Self::MySql(pool) => Conn::MySql(pool.acquire().await?),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(pool) => Conn::Sqlite(pool.acquire().await?),
        })
    }
}

impl From<sqlx::PgPool> for DatabasePool {
    fn from(pool: sqlx::PgPool) -> Self {
        Self::Postgres(pool)
    }
}

impl From<&sqlx::PgPool> for DatabasePool {
    fn from(pool: &sqlx::PgPool) -> Self {
        Self::Postgres(pool.clone())
    }
}

#[cfg(feature = "mysql")]
impl From<sqlx::MySqlPool> for DatabasePool {
    fn from(pool: sqlx::MySqlPool) -> Self {
        Self::MySql(pool)
    }
}

#[cfg(feature = "mysql")]
impl From<&sqlx::MySqlPool> for DatabasePool {
    fn from(pool: &sqlx::MySqlPool) -> Self {
        Self::MySql(pool.clone())
    }
}

#[cfg(feature = "sqlite")]
impl From<sqlx::SqlitePool> for DatabasePool {
    fn from(pool: sqlx::SqlitePool) -> Self {
        Self::Sqlite(pool)
    }
}

#[cfg(feature = "sqlite")]
impl From<&sqlx::SqlitePool> for DatabasePool {
    fn from(pool: &sqlx::SqlitePool) -> Self {
        Self::Sqlite(pool.clone())
    }
}

impl From<&DatabasePool> for DatabasePool {
    fn from(pool: &DatabasePool) -> Self {
        pool.clone()
    }
}

/// A connection of a [`DatabasePool`].
pub(crate) enum Conn {
    Postgres(PoolConnection<sqlx::Postgres>),
    #[cfg(feature = "mysql")]
    MySql(PoolConnection<sqlx::MySql>),
    #[cfg(feature = "sqlite")]
    Sqlite(PoolConnection<sqlx::Sqlite>),
}

/// `$body` with `$conn` bound to the backend's connection.
macro_rules! dispatch {
    ($self:ident, $conn:ident => $body:expr) => {
        match $self {
            Conn::Postgres($conn) => $body,
            #[cfg(feature = "mysql")]
            Conn::MySql($conn) => $body,
            #[cfg(feature = "sqlite")]
            Conn::Sqlite($conn) => $body,
        }
    };
}

impl Conn {
    /// Closes the connection when dropped instead of returning it to the pool.
    pub(crate) fn close_on_drop(&mut self) {
        dispatch!(self, conn => conn.close_on_drop());
    }
}

impl RelayStore for Conn {
    async fn fetch_batch(
        &mut self,
        partitions: &[i16],
        limit: i64,
        max_bytes: i64,
        after: i64,
    ) -> sqlx::Result<Vec<OutboxRow>> {
        dispatch!(self, c => c.fetch_batch(partitions, limit, max_bytes, after).await)
    }

    async fn horizon(&mut self, partitions: &[i16]) -> sqlx::Result<Option<Horizon>> {
        dispatch!(self, c => c.horizon(partitions).await)
    }

    async fn newest_seq(&mut self, after: i64) -> sqlx::Result<Option<i64>> {
        dispatch!(self, c => c.newest_seq(after).await)
    }

    async fn settle(
        &mut self,
        fence: Fence<'_>,
        delivered: &[i64],
        failures: &[Failure],
        archive: bool,
    ) -> sqlx::Result<u64> {
        dispatch!(self, c => c.settle(fence, delivered, failures, archive).await)
    }

    async fn held(&mut self, fence: Fence<'_>) -> sqlx::Result<Vec<i16>> {
        dispatch!(self, c => c.held(fence).await)
    }

    async fn renew(&mut self, instance: &str, host: &str, ttl_ms: i64) -> sqlx::Result<Renewal> {
        dispatch!(self, c => c.renew(instance, host, ttl_ms).await)
    }

    async fn acquire(
        &mut self,
        instance: &str,
        ttl_ms: i64,
        wanted: i64,
    ) -> sqlx::Result<Vec<(i16, i64)>> {
        dispatch!(self, c => c.acquire(instance, ttl_ms, wanted).await)
    }

    async fn release(&mut self, instance: &str, partitions: &[(i16, i64)]) -> sqlx::Result<()> {
        dispatch!(self, c => c.release(instance, partitions).await)
    }

    async fn leave(&mut self, instance: &str) -> sqlx::Result<()> {
        dispatch!(self, c => c.leave(instance).await)
    }

    async fn outbox_id(&mut self) -> sqlx::Result<Uuid> {
        dispatch!(self, c => c.outbox_id().await)
    }

    async fn leases(&mut self) -> sqlx::Result<Vec<Lease>> {
        dispatch!(self, c => c.leases().await)
    }

    async fn members(&mut self) -> sqlx::Result<Vec<Member>> {
        dispatch!(self, c => c.members().await)
    }

    async fn sample_backlog(&mut self) -> sqlx::Result<BacklogSample> {
        dispatch!(self, c => c.sample_backlog().await)
    }

    async fn backlog(
        &mut self,
        limit: i64,
    ) -> sqlx::Result<(DateTime<Utc>, Vec<Backlog>, Vec<FailedRow>)> {
        dispatch!(self, c => c.backlog(limit).await)
    }

    async fn ensure_archive_partitions(&mut self, days_ahead: i32) -> sqlx::Result<()> {
        dispatch!(self, c => c.ensure_archive_partitions(days_ahead).await)
    }

    async fn drop_archive(&mut self, older_than_ms: i64) -> sqlx::Result<(Vec<String>, u64)> {
        dispatch!(self, c => c.drop_archive(older_than_ms).await)
    }
}
