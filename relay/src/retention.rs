//! The optional archive of published outbox rows (`relay.archive`) and its
//! retention (part of `consign-relay cleanup`).
//!
//! The archive table `consign_outbox_archive` is partitioned by UTC day of
//! publication (`consign_outbox_archive_YYYYMMDD`, created ahead by the
//! relay); [`cleanup_archive`] drops whole partitions older than the retention with
//! `DROP TABLE`, so retention costs the same for a thousand rows as for a
//! billion, and leaves no dead tuples to vacuum.

use std::time::Duration;

use serde::Serialize;

use crate::store::{DatabasePool, RelayStore as _};

/// Days of archive partitions the relay keeps created ahead (today and the
/// next two).
const DAYS_AHEAD: i32 = 2;

/// Creates the archive partitions of today and the next days (UTC) if
/// missing. The relay calls it at start and every hour when archiving.
///
/// # Errors
/// On a database error (e.g. migrations not applied).
pub async fn ensure_archive_partitions(pool: impl Into<DatabasePool>) -> sqlx::Result<()> {
    pool.into()
        .acquire()
        .await?
        .ensure_archive_partitions(DAYS_AHEAD)
        .await
}

/// What [`cleanup_archive`] dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ArchiveCleaned {
    /// Archive partitions dropped (every row in them was older than the
    /// retention).
    pub partitions: Vec<String>,
    /// Archived rows deleted from the default partition (days whose
    /// partition was missing).
    pub default_rows: u64,
}

/// Drops the archive's day partitions whose whole day is older than
/// `older_than` (database clock), and deletes rows that old from its default
/// partition. The inbox's tables have their own retention
/// (the inbox crate's `retention` module).
///
/// # Errors
/// On a database error.
pub async fn cleanup_archive(
    pool: impl Into<DatabasePool>,
    older_than: Duration,
) -> sqlx::Result<ArchiveCleaned> {
    let older_than_ms = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
    let (partitions, default_rows) = pool
        .into()
        .acquire()
        .await?
        .drop_archive(older_than_ms)
        .await?;
    Ok(ArchiveCleaned {
        partitions,
        default_rows,
    })
}
