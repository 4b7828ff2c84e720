//! Retention: what `consign-relay cleanup` deletes, and the optional
//! archive of published outbox rows (`relay.archive`).
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

/// What `cleanup` would delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// Age of inbox dedup records to delete.
    pub inbox: Duration,
    /// Age of dead letters to delete; `None` keeps them.
    pub dead_letters: Option<Duration>,
    /// Age of archive partitions to drop; `None` keeps them.
    pub archive: Option<Duration>,
}

impl Retention {
    /// Inbox records older than `inbox`; dead letters and archive kept.
    #[must_use]
    pub fn inbox(inbox: Duration) -> Self {
        Self {
            inbox,
            dead_letters: None,
            archive: None,
        }
    }
}

/// What [`cleanup`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Cleaned {
    /// Inbox dedup records older than the inbox retention.
    pub inbox_records: u64,
    /// Dead letters older than the dead-letter retention.
    pub dead_letters: u64,
    /// Archive partitions dropped (every row in them was older than the
    /// archive retention).
    pub archive_partitions: Vec<String>,
    /// Archived rows deleted from the default partition (days whose
    /// partition was missing).
    pub archive_default_rows: u64,
}

/// Deletes inbox dedup records handled more than `retention.inbox` ago;
/// if set, dead letters older than `retention.dead_letters`; and, if set,
/// drops archive partitions whose whole day is older than
/// `retention.archive`. Ages are measured on the database clock.
///
/// Dropping old dedup records is safe because consumers resume from the
/// offsets stored with them: a message is only redelivered from after the
/// stored offset, so only a producer-side duplicate arriving later than the
/// retention could be handled twice. Keep the retention well above the
/// longest outage a duplicate could span (default 7 days).
///
/// # Errors
/// On a database error.
pub async fn cleanup(pool: &PgPool, retention: Retention) -> sqlx::Result<Cleaned> {
    let Retention {
        inbox,
        dead_letters,
        archive,
    } = retention;
    let inbox_records = sqlx::query(
        "DELETE FROM consign_inbox WHERE handled_at < now() - $1 * interval '1 millisecond'",
    )
    .bind(millis(inbox))
    .execute(pool)
    .await?
    .rows_affected();
    let dead_letters = match dead_letters {
        Some(age) => sqlx::query(
            "DELETE FROM consign_dead_letters WHERE failed_at < now() - $1 * interval '1 millisecond'",
        )
        .bind(millis(age))
        .execute(pool)
        .await?
        .rows_affected(),
        None => 0,
    };
    let (archive_partitions, archive_default_rows) = match archive {
        Some(age) => drop_archive(pool, age).await?,
        None => (Vec::new(), 0),
    };
    Ok(Cleaned {
        inbox_records,
        dead_letters,
        archive_partitions,
        archive_default_rows,
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
