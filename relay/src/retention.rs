//! The optional archive of published outbox rows (`relay.archive`) and its
//! retention (part of `consign-relay cleanup`).
//!
//! The archive table `consign_outbox_archive` is partitioned by UTC day of
//! publication (`consign_outbox_archive_YYYYMMDD`, created ahead by the
//! relay); [`cleanup`] drops whole partitions older than the retention with
//! `DROP TABLE`, so retention costs the same for a thousand rows as for a
//! billion, and leaves no dead tuples to vacuum.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// Days of archive partitions the relay keeps created ahead (today and the
/// next two).
const DAYS_AHEAD: i32 = 2;

/// Creates the archive partitions of today and the next days (UTC) if
/// missing. The relay calls it at start and every hour when archiving.
///
/// # Errors
/// On a database error (e.g. migrations not applied).
pub async fn ensure_archive_partitions(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query(
        "SELECT consign_archive_partition((now() AT TIME ZONE 'UTC')::date + d)
         FROM generate_series(0, $1) AS d",
    )
    .bind(DAYS_AHEAD)
    .execute(pool)
    .await?;
    Ok(())
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
/// (`consign_inbox::retention`).
///
/// # Errors
/// On a database error.
pub async fn cleanup_archive(pool: &PgPool, older_than: Duration) -> sqlx::Result<ArchiveCleaned> {
    let (partitions, default_rows) = drop_archive(pool, older_than).await?;
    Ok(ArchiveCleaned {
        partitions,
        default_rows,
    })
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Drops the archive's day partitions that end before now − `age`, and
/// deletes rows that old from its default partition.
async fn drop_archive(pool: &PgPool, age: Duration) -> sqlx::Result<(Vec<String>, u64)> {
    let cutoff: DateTime<Utc> = sqlx::query_scalar("SELECT now() - $1 * interval '1 millisecond'")
        .bind(millis(age))
        .fetch_one(pool)
        .await?;
    let days: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'consign_outbox_archive'::regclass
           AND c.relname ~ '^consign_outbox_archive_[0-9]{8}$'
         ORDER BY c.relname",
    )
    .fetch_all(pool)
    .await?;
    let mut dropped = Vec::new();
    for name in days {
        let Some(day) = name
            .strip_prefix("consign_outbox_archive_")
            .and_then(|d| NaiveDate::parse_from_str(d, "%Y%m%d").ok())
        else {
            continue;
        };
        let Some(end) = day.succ_opt().and_then(|d| d.and_hms_opt(0, 0, 0)) else {
            continue;
        };
        if end.and_utc() <= cutoff {
            // The name matched ^consign_outbox_archive_[0-9]{8}$: no quoting needed.
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {name}")))
                .execute(pool)
                .await?;
            dropped.push(name);
        }
    }
    let default_rows =
        sqlx::query("DELETE FROM consign_outbox_archive_default WHERE published_at < $1")
            .bind(cutoff)
            .execute(pool)
            .await?
            .rows_affected();
    Ok((dropped, default_rows))
}
