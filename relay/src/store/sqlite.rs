//! SQLite: every statement the relay runs.
//!
//! SQLite has one writer at a time, so the fence needs no row lock: a
//! relay's settling transaction starts with `BEGIN IMMEDIATE` (the write
//! lock, taken before the lease rows are read), and no other relay can
//! take a lease over until it commits. Relays on one host share the file
//! (WAL mode; the pool's busy timeout waits for the lock). Times are UTC
//! text, `YYYY-MM-DDTHH:MM:SS.sssZ`, which sorts like the time it names.
//! No arrays: lists are bound one value at a time.

use chrono::{DateTime, Utc};
use sqlx::{Connection as _, QueryBuilder, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::{BacklogSample, Failure, Fence, Horizon, OutboxRow, RelayStore, Renewal, push_list};
use crate::{
    lease::{Lease, Member},
    status::{Backlog, FailedRow},
};

/// The idle probe: the newest row above the relay's mark, read backwards
/// along the primary key (see [`RelayStore::newest_seq`]).
const NEWEST_SEQ: &str = "SELECT seq FROM consign_outbox WHERE seq > ? ORDER BY seq DESC LIMIT 1";

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// The time `ms` milliseconds from now (`?` bound to [`offset`]).
const NOW_PLUS: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)";

/// Values per bound list: SQLite allows 32,766 bound values per statement,
/// and a batch may hold up to 100,000 rows.
const LIST_CHUNK: usize = 5_000;

/// Rows deleted per statement by the archive's retention.
const DELETE_CHUNK: u64 = 10_000;

/// SQLite's date modifier for `ms` milliseconds (negative: earlier).
#[allow(clippy::cast_precision_loss)] // milliseconds far below 2^52
fn offset(ms: i64) -> String {
    format!("{:+.3} seconds", ms as f64 / 1000.0)
}

/// Begins a transaction holding the database's write lock.
async fn begin(conn: &mut SqliteConnection) -> sqlx::Result<sqlx::Transaction<'_, Sqlite>> {
    conn.begin_with("BEGIN IMMEDIATE").await
}

/// The partitions of `fence` still leased under the same epochs (call
/// inside [`begin`]: the write lock keeps them so until commit).
async fn fence_lock(conn: &mut SqliteConnection, fence: Fence<'_>) -> sqlx::Result<Vec<i16>> {
    if fence.owned.is_empty() {
        return Ok(Vec::new());
    }
    let mut query = QueryBuilder::<Sqlite>::new("SELECT \"partition\" FROM consign_relay_leases");
    push_held_by(
        &mut query,
        fence.instance,
        fence.owned.iter().map(|(p, e)| (*p, *e)),
    );
    query.push(" ORDER BY \"partition\"");
    query.build_query_scalar().fetch_all(conn).await
}

/// Appends ` WHERE owner = instance AND ((partition = … AND epoch = …) OR …)`:
/// the lease rows `instance` holds under the given epochs.
fn push_held_by(
    query: &mut QueryBuilder<Sqlite>,
    instance: &str,
    leases: impl IntoIterator<Item = (i16, i64)>,
) {
    query.push(" WHERE owner = ").push_bind(instance.to_owned());
    query.push(" AND (");
    let mut pairs = query.separated(" OR ");
    for (partition, epoch) in leases {
        pairs.push("(\"partition\" = ");
        pairs.push_bind_unseparated(partition);
        pairs.push_unseparated(" AND epoch = ");
        pairs.push_bind_unseparated(epoch);
        pairs.push_unseparated(")");
    }
    query.push(")");
}

impl RelayStore for SqliteConnection {
    async fn fetch_batch(
        &mut self,
        partitions: &[i16],
        limit: i64,
        max_bytes: i64,
        after: i64,
    ) -> sqlx::Result<Vec<OutboxRow>> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        // The same statement as PostgreSQL's FETCH (see store/postgres.rs),
        // with the plan spelled out: SQLite has no statistics unless someone
        // runs ANALYZE, and without them it read every row of the owned
        // partitions through the partition index and sorted them, per batch
        // (a 200k backlog drained at 5k events/s). Rows waiting for a retry
        // come from the small partial index, the batch from a scan in `seq`
        // (rowid) order that stops at the limit.
        let mut query = QueryBuilder::<Sqlite>::new(format!(
            "WITH blocked AS (
    SELECT topic, \"key\", min(seq) AS seq
    FROM consign_outbox INDEXED BY consign_outbox_failed
    WHERE next_attempt_at IS NOT NULL AND next_attempt_at > {NOW}
      AND \"key\" IS NOT NULL AND \"partition\" IN "
        ));
        push_list(&mut query, partitions.iter().copied());
        query.push(format!(
            "
    GROUP BY topic, \"key\"
), candidates AS (
    SELECT o.seq, o.id, o.\"partition\", o.topic, o.\"key\", o.event_type, o.payload, o.headers,
           o.traceparent, o.tracestate, o.created_at, o.attempts,
           length(CAST(o.payload AS BLOB)) + coalesce(length(CAST(o.\"key\" AS BLOB)), 0)
               + length(CAST(o.headers AS BLOB)) AS size
    FROM consign_outbox o NOT INDEXED
    WHERE (o.next_attempt_at IS NULL OR o.next_attempt_at <= {NOW})
      AND NOT EXISTS (
          SELECT 1 FROM blocked b WHERE b.\"key\" = o.\"key\" AND b.topic = o.topic AND b.seq < o.seq
      )
      AND o.\"partition\" IN "
        ));
        push_list(&mut query, partitions.iter().copied());
        query.push("\n      AND o.seq > ").push_bind(after);
        query.push("\n    ORDER BY o.seq LIMIT ");
        query.push_bind(limit);
        query.push(
            "
), running AS (
    SELECT c.*, sum(c.size) OVER (ORDER BY c.seq) AS upto FROM candidates c
)
SELECT seq, id, \"partition\", topic, \"key\", event_type, payload, headers,
       traceparent, tracestate, created_at, attempts
FROM running
WHERE upto <= ",
        );
        query.push_bind(max_bytes);
        query.push(" OR upto = size ORDER BY seq");
        query.build_query_as().fetch_all(self).await
    }

    async fn horizon(&mut self, _partitions: &[i16]) -> sqlx::Result<Option<Horizon>> {
        Ok(None)
    }

    async fn newest_seq(&mut self, after: i64) -> sqlx::Result<Option<i64>> {
        sqlx::query_scalar(NEWEST_SEQ)
            .bind(after)
            .fetch_optional(self)
            .await
    }

    async fn settle(
        &mut self,
        fence: Fence<'_>,
        delivered: &[i64],
        failures: &[Failure],
        archive: bool,
    ) -> sqlx::Result<u64> {
        let mut tx = begin(self).await?;
        let held = fence_lock(&mut tx, fence).await?;
        let mut deleted = 0;
        for seqs in delivered.chunks(LIST_CHUNK).filter(|_| !held.is_empty()) {
            let rows = |statement: &str| {
                let mut query = QueryBuilder::<Sqlite>::new(statement);
                push_list(&mut query, seqs.iter().copied());
                query.push(" AND \"partition\" IN ");
                push_list(&mut query, held.iter().copied());
                query
            };
            if archive {
                rows(
                    "INSERT INTO consign_outbox_archive
    (seq, id, \"partition\", topic, \"key\", event_type, payload, headers,
     traceparent, tracestate, created_at, attempts)
SELECT seq, id, \"partition\", topic, \"key\", event_type, payload, headers,
       traceparent, tracestate, created_at, attempts
FROM consign_outbox WHERE seq IN ",
                )
                .build()
                .execute(&mut *tx)
                .await?;
            }
            deleted += rows("DELETE FROM consign_outbox WHERE seq IN ")
                .build()
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        if !held.is_empty() {
            for failure in failures {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "UPDATE consign_outbox SET attempts = attempts + 1, last_error = ",
                );
                query.push_bind(failure.error.clone());
                query.push(", next_attempt_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ");
                query.push_bind(offset(failure.retry_in_ms));
                query.push(") WHERE seq = ");
                query.push_bind(failure.seq);
                query.push(" AND \"partition\" IN ");
                push_list(&mut query, held.iter().copied());
                query.build().execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn held(&mut self, fence: Fence<'_>) -> sqlx::Result<Vec<i16>> {
        fence_lock(self, fence).await
    }

    async fn renew(&mut self, instance: &str, host: &str, ttl_ms: i64) -> sqlx::Result<Renewal> {
        let mut tx = begin(self).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO consign_relays (instance, host, pid, version, expires_at)
             VALUES (?, ?, ?, ?, {NOW_PLUS})
             ON CONFLICT (instance) DO UPDATE
             SET heartbeat_at = {NOW}, expires_at = excluded.expires_at"
        )))
        .bind(instance)
        .bind(host)
        .bind(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(offset(ttl_ms))
        .execute(&mut *tx)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM consign_relays WHERE expires_at < {NOW}"
        )))
        .execute(&mut *tx)
        .await?;
        let members: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT instance FROM consign_relays WHERE expires_at > {NOW} ORDER BY instance"
        )))
        .fetch_all(&mut *tx)
        .await?;
        let renewed: Vec<(i16, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE consign_relay_leases SET expires_at = {NOW_PLUS}
             WHERE owner = ? RETURNING \"partition\", epoch"
        )))
        .bind(offset(ttl_ms))
        .bind(instance)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Renewal { members, renewed })
    }

    async fn acquire(
        &mut self,
        instance: &str,
        ttl_ms: i64,
        wanted: i64,
    ) -> sqlx::Result<Vec<(i16, i64)>> {
        // One writer: relays acquiring at the same moment take turns.
        let mut tx = begin(self).await?;
        let mut acquired: Vec<(i16, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE consign_relay_leases
             SET owner = ?, epoch = epoch + 1, acquired_at = {NOW}, expires_at = {NOW_PLUS}
             WHERE \"partition\" IN (
                 SELECT \"partition\" FROM consign_relay_leases
                 WHERE owner IS NULL OR expires_at <= {NOW}
                 ORDER BY \"partition\" LIMIT ?)
             RETURNING \"partition\", epoch"
        )))
        .bind(instance)
        .bind(offset(ttl_ms))
        .bind(wanted)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        acquired.sort_unstable();
        Ok(acquired)
    }

    async fn release(&mut self, instance: &str, partitions: &[(i16, i64)]) -> sqlx::Result<()> {
        if partitions.is_empty() {
            return Ok(());
        }
        let mut query = QueryBuilder::<Sqlite>::new(
            "UPDATE consign_relay_leases SET owner = NULL, expires_at = NULL",
        );
        push_held_by(&mut query, instance, partitions.iter().copied());
        query.build().execute(self).await?;
        Ok(())
    }

    async fn leave(&mut self, instance: &str) -> sqlx::Result<()> {
        let mut tx = begin(self).await?;
        sqlx::query(
            "UPDATE consign_relay_leases SET owner = NULL, expires_at = NULL WHERE owner = ?",
        )
        .bind(instance)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM consign_relays WHERE instance = ?")
            .bind(instance)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    async fn outbox_id(&mut self) -> sqlx::Result<Uuid> {
        sqlx::query_scalar("SELECT outbox_id FROM consign_outbox_identity")
            .fetch_one(self)
            .await
    }

    async fn leases(&mut self) -> sqlx::Result<Vec<Lease>> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT \"partition\", owner, epoch, expires_at, acquired_at,
                    coalesce(owner IS NOT NULL AND expires_at > {NOW}, FALSE) AS live
             FROM consign_relay_leases ORDER BY \"partition\""
        )))
        .fetch_all(self)
        .await
    }

    async fn members(&mut self) -> sqlx::Result<Vec<Member>> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT instance, host, pid, version, started_at, heartbeat_at
             FROM consign_relays WHERE expires_at > {NOW} ORDER BY instance"
        )))
        .fetch_all(self)
        .await
    }

    async fn sample_backlog(&mut self) -> sqlx::Result<BacklogSample> {
        let (pending, oldest_age, with_errors): (i64, Option<f64>, i64) = sqlx::query_as(
            "SELECT count(*), (julianday('now') - julianday(min(created_at))) * 86400.0,
                    count(last_error)
             FROM consign_outbox",
        )
        .fetch_one(self)
        .await?;
        Ok(BacklogSample {
            pending,
            oldest_age_seconds: oldest_age.unwrap_or(0.0).max(0.0),
            with_errors,
        })
    }

    async fn backlog(
        &mut self,
        limit: i64,
    ) -> sqlx::Result<(DateTime<Utc>, Vec<Backlog>, Vec<FailedRow>)> {
        let now = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT {NOW}")))
            .fetch_one(&mut *self)
            .await?;
        let backlog = sqlx::query_as(
            "SELECT \"partition\", count(*) AS pending, min(created_at) AS oldest,
                    count(last_error) AS failed
             FROM consign_outbox GROUP BY \"partition\" ORDER BY \"partition\"",
        )
        .fetch_all(&mut *self)
        .await?;
        let failed = sqlx::query_as(
            "SELECT seq, id, topic, \"key\", attempts, last_error, next_attempt_at
             FROM consign_outbox WHERE last_error IS NOT NULL ORDER BY seq LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&mut *self)
        .await?;
        Ok((now, backlog, failed))
    }

    async fn ensure_archive_partitions(&mut self, _days_ahead: i32) -> sqlx::Result<()> {
        // A plain table here: nothing to prepare.
        Ok(())
    }

    async fn drop_archive(&mut self, older_than_ms: i64) -> sqlx::Result<(Vec<String>, u64)> {
        // Batched deletes by `published_at` (indexed), each a short write lock.
        let mut deleted = 0;
        loop {
            let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM consign_outbox_archive WHERE rowid IN (
                     SELECT rowid FROM consign_outbox_archive
                     WHERE published_at < {NOW_PLUS} LIMIT {DELETE_CHUNK})"
            )))
            .bind(offset(older_than_ms.saturating_neg()))
            .execute(&mut *self)
            .await?
            .rows_affected();
            deleted += done;
            if done < DELETE_CHUNK {
                return Ok((Vec::new(), deleted));
            }
        }
    }
}
