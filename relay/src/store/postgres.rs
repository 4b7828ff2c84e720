//! PostgreSQL: every statement the relay runs.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{Connection as _, PgConnection, Postgres, Row as _, postgres::PgArguments};
use uuid::Uuid;

use super::{BacklogSample, Failure, Fence, Horizon, OutboxRow, RelayStore, Renewal};
use crate::{
    lease::{Lease, Member},
    status::{Backlog, FailedRow},
};

/// The idle probe: the newest row above the relay's mark, read backwards
/// along the primary key (see [`RelayStore::newest_seq`]).
const NEWEST_SEQ: &str = "SELECT seq FROM consign_outbox WHERE seq > $1 ORDER BY seq DESC LIMIT 1";

/// The keys of the owned partitions ($1) with a row waiting for a retry,
/// and the first such row's `seq` (from the partial index
/// `consign_outbox_failed`; usually none).
const WAITING: &str = "\
SELECT topic, key, min(seq) FROM consign_outbox
WHERE next_attempt_at > now() AND key IS NOT NULL AND partition = ANY($1)
GROUP BY topic, key";

/// The relay's floor (see `relay/floor.rs`), in one snapshot: whether no
/// transaction of the cluster is in progress (`pg_current_snapshot()`'s
/// in-progress list is empty), the outbox's sequence is not cached per
/// session and no user trigger runs on the outbox; the sequence's last
/// value; and the first row waiting for a retry in the owned partitions
/// ($1), from the partial index of failed rows.
const HORIZON: &str = "\
SELECT NOT EXISTS (SELECT FROM pg_snapshot_xip(pg_current_snapshot()))
       AND (SELECT s.seqcache = 1 FROM pg_sequence s WHERE s.seqrelid = q.seq)
       AND NOT EXISTS (SELECT FROM pg_trigger t
                       WHERE t.tgrelid = 'consign_outbox'::regclass AND NOT t.tgisinternal),
       coalesce(pg_sequence_last_value(q.seq), 0),
       (SELECT min(seq) FROM consign_outbox
        WHERE next_attempt_at IS NOT NULL AND partition = ANY($1))
FROM (SELECT pg_get_serial_sequence('consign_outbox', 'seq')::regclass AS seq) AS q";

/// Up to this many waiting rows the health sampler counts them; above, it
/// reports the span of their `seq`s.
const EXACT_PENDING_UP_TO: i64 = 100_000;

/// The backlog gauges without reading a large outbox whole (a `count(*)`
/// of a 1M-row backlog took ~280 ms each `sample-interval`): the rows
/// counted up to $1; the span of `seq`s waiting, from both ends of the
/// primary key (an upper bound: gaps count); the age of the first row in
/// `seq` order (the oldest but for rows written with an earlier
/// `created_at`); rows with an error, from the partial index of failed rows.
const SAMPLE_BACKLOG: &str = "\
SELECT (SELECT count(*) FROM (SELECT FROM consign_outbox LIMIT $1) AS capped),
       (SELECT max(seq) FROM consign_outbox) - (SELECT min(seq) FROM consign_outbox) + 1,
       (SELECT extract(epoch FROM now() - created_at)::float8
        FROM consign_outbox ORDER BY seq LIMIT 1),
       (SELECT count(*) FROM consign_outbox
        WHERE next_attempt_at IS NOT NULL AND last_error IS NOT NULL)";

/// Reads the next rows to publish from the owned partitions ($1) above the
/// floor, in `seq` order. Skips rows waiting for a retry, and ([`FETCH`])
/// every later row of a key [`WAITING`] found, so a key's events never
/// overtake each other on a topic. At most $2 rows, and no more bytes than $3 (payload,
/// key and headers) unless the first row alone is larger.
///
/// Two statements rather than one with the waiting keys as a CTE: without
/// statistics (a large backlog written since the last autovacuum analyze)
/// the planner turned that CTE's anti join into a sort of the whole backlog,
/// 367 ms per batch on 200k rows; against the small array it scans the
/// primary key in `seq` order and stops at the limit (2 ms), with or without
/// statistics.
///
/// The byte cap is a running sum over narrow rows (`seq` and size) that
/// finds the last row within it; the rows themselves are then read in
/// that `seq` range, in the same snapshot, so the same filters select the
/// same prefix. A window over the whole rows copied each payload into the
/// window's store: ~0.7 ms more per 1000-row read.
macro_rules! fetch {
    ($after:literal, $waiting:literal) => {
        concat!(
            "WITH cut AS (
    SELECT max(seq) FILTER (WHERE upto <= $3 OR upto = size) AS last
    FROM (
        SELECT seq, size, sum(size) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS upto
        FROM (
            SELECT o.seq,
                   octet_length(o.payload) + coalesce(octet_length(o.key), 0)
                       + octet_length(o.headers::text) AS size
            FROM consign_outbox o
            WHERE o.partition = ANY($1)
              AND o.seq > ",
            $after,
            "
              AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())",
            $waiting,
            "
            ORDER BY o.seq
            LIMIT $2
        ) AS candidates
    ) AS running
)
SELECT o.seq, o.id, o.partition, o.topic, o.key, o.event_type, o.payload, o.headers,
       o.traceparent, o.tracestate, o.created_at, o.attempts
FROM consign_outbox o
WHERE o.partition = ANY($1)
  AND o.seq > ",
            $after,
            " AND o.seq <= (SELECT last FROM cut)
  AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())",
            $waiting,
            "
ORDER BY o.seq"
        )
    };
}
/// The batch read ([`fetch!`]) without the keys [`WAITING`] found ($4, $5,
/// $6) nor their later rows; the floor is $7.
const FETCH: &str = fetch!(
    "$7",
    "
      AND NOT EXISTS (
          SELECT 1 FROM unnest($4::text[], $5::text[], $6::int8[]) AS b(topic, key, seq)
          WHERE b.key = o.key AND b.topic = o.topic AND b.seq < o.seq
      )"
);

/// [`FETCH`] when no key waits (the usual case): without the anti join,
/// evaluated per candidate row even against empty arrays (~1 ms of a
/// 1000-row read). The floor is $4.
const FETCH_NONE_WAITING: &str = fetch!("$4", "");

/// Prefixes a statement with the leases it is fenced by: the partitions
/// this relay ($1) still holds with the epochs it read its rows under ($2,
/// $3), locked so that no other relay can take them over until the
/// statement's transaction ends.
macro_rules! fenced {
    ($statement:literal) => {
        concat!(
            "WITH fence AS (
    SELECT l.partition
    FROM consign_relay_leases l
    JOIN unnest($2::int2[], $3::int8[]) AS h(partition, epoch)
      ON l.partition = h.partition AND l.epoch = h.epoch
    WHERE l.owner = $1
    FOR SHARE OF l
)",
            $statement
        )
    };
}
/// Deletes rows the broker has acknowledged, in partitions still leased.
/// The fence is evaluated once (an array), not joined per row: a join made
/// the planner probe the index once per leased partition.
const DELETE_PUBLISHED: &str = fenced!(
    "
DELETE FROM consign_outbox o
WHERE o.seq = ANY($4) AND o.partition = ANY(ARRAY(SELECT partition FROM fence))"
);

/// Like [`DELETE_PUBLISHED`], moving the rows to the archive.
const ARCHIVE_PUBLISHED: &str = fenced!(
    ",
deleted AS (
    DELETE FROM consign_outbox o
    WHERE o.seq = ANY($4) AND o.partition = ANY(ARRAY(SELECT partition FROM fence))
    RETURNING o.seq, o.id, o.partition, o.topic, o.key, o.event_type, o.payload, o.headers,
              o.traceparent, o.tracestate, o.created_at, o.attempts
)
INSERT INTO consign_outbox_archive
    (seq, id, partition, topic, key, event_type, payload, headers,
     traceparent, tracestate, created_at, attempts)
SELECT * FROM deleted"
);

/// Records failed attempts: error text and the time of the next try.
const RECORD_FAILURES: &str = fenced!(
    "
UPDATE consign_outbox AS o
SET attempts = o.attempts + 1,
    last_error = f.error,
    next_attempt_at = now() + f.delay_ms * interval '1 millisecond'
FROM unnest($4::int8[], $5::text[], $6::int8[]) AS f(seq, error, delay_ms)
WHERE o.seq = f.seq AND o.partition = ANY(ARRAY(SELECT partition FROM fence))"
);

/// The partitions of the fence still held under the same epochs.
const HELD: &str = fenced!(" SELECT partition FROM fence");

const RENEW_LEASES: &str = "\
UPDATE consign_relay_leases
SET expires_at = now() + $2 * interval '1 millisecond'
WHERE owner = $1 RETURNING partition, epoch";

/// `FOR UPDATE SKIP LOCKED`: relays acquiring at the same moment take
/// different partitions instead of waiting for each other.
const ACQUIRE: &str = "\
UPDATE consign_relay_leases AS l
SET owner = $1, epoch = l.epoch + 1, acquired_at = now(),
    expires_at = now() + $2 * interval '1 millisecond'
WHERE l.partition IN (
    SELECT partition FROM consign_relay_leases
    WHERE owner IS NULL OR expires_at <= now()
    ORDER BY partition
    LIMIT $3
    FOR UPDATE SKIP LOCKED)
RETURNING l.partition, l.epoch";

const HEARTBEAT: &str = "\
INSERT INTO consign_relays (instance, host, pid, version, expires_at)
VALUES ($1, $2, $3, $4, now() + $5 * interval '1 millisecond')
ON CONFLICT (instance) DO UPDATE
SET heartbeat_at = now(), expires_at = excluded.expires_at";

const RELEASE: &str = "\
UPDATE consign_relay_leases AS l
SET owner = NULL, expires_at = NULL
FROM unnest($2::int2[], $3::int8[]) AS r(partition, epoch)
WHERE l.partition = r.partition AND l.epoch = r.epoch AND l.owner = $1";

impl Fence<'_> {
    fn bind<'q>(
        &self,
        query: sqlx::query::Query<'q, Postgres, PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, PgArguments> {
        let (partitions, epochs): (Vec<i16>, Vec<i64>) =
            self.owned.iter().map(|(p, e)| (*p, *e)).unzip();
        query
            .bind(self.instance.to_owned())
            .bind(partitions)
            .bind(epochs)
    }
}

impl RelayStore for PgConnection {
    async fn fetch_batch(
        &mut self,
        partitions: &[i16],
        limit: i64,
        max_bytes: i64,
        after: i64,
    ) -> sqlx::Result<Vec<OutboxRow>> {
        let waiting: Vec<(String, String, i64)> = sqlx::query_as(WAITING)
            .bind(partitions)
            .fetch_all(&mut *self)
            .await?;
        if waiting.is_empty() {
            return sqlx::query_as(FETCH_NONE_WAITING)
                .bind(partitions)
                .bind(limit)
                .bind(max_bytes)
                .bind(after)
                .fetch_all(self)
                .await;
        }
        let mut topics = Vec::with_capacity(waiting.len());
        let mut keys = Vec::with_capacity(waiting.len());
        let mut seqs = Vec::with_capacity(waiting.len());
        for (topic, key, seq) in waiting {
            topics.push(topic);
            keys.push(key);
            seqs.push(seq);
        }
        sqlx::query_as(FETCH)
            .bind(partitions)
            .bind(limit)
            .bind(max_bytes)
            .bind(topics)
            .bind(keys)
            .bind(seqs)
            .bind(after)
            .fetch_all(self)
            .await
    }

    async fn horizon(&mut self, partitions: &[i16]) -> sqlx::Result<Option<Horizon>> {
        let (quiet, allocated, first_failed): (Option<bool>, i64, Option<i64>) =
            sqlx::query_as(HORIZON)
                .bind(partitions)
                .fetch_one(self)
                .await?;
        Ok(Some(Horizon {
            quiet: quiet == Some(true),
            allocated,
            first_failed,
        }))
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
        let mut tx = self.begin().await?;
        let mut deleted = 0;
        if !delivered.is_empty() {
            deleted = delete_published(&mut tx, fence, delivered, archive).await?;
        }
        if !failures.is_empty() {
            record_failures(&mut tx, fence, failures).await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn held(&mut self, fence: Fence<'_>) -> sqlx::Result<Vec<i16>> {
        let rows = fence.bind(sqlx::query(HELD)).fetch_all(self).await?;
        rows.iter().map(|row| row.try_get(0)).collect()
    }

    async fn renew(&mut self, instance: &str, host: &str, ttl_ms: i64) -> sqlx::Result<Renewal> {
        let mut tx = self.begin().await?;
        sqlx::query(HEARTBEAT)
            .bind(instance)
            .bind(host)
            .bind(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
            .bind(env!("CARGO_PKG_VERSION"))
            .bind(ttl_ms)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM consign_relays WHERE expires_at < now()")
            .execute(&mut *tx)
            .await?;
        let members: Vec<String> = sqlx::query_scalar(
            "SELECT instance FROM consign_relays WHERE expires_at > now() ORDER BY instance",
        )
        .fetch_all(&mut *tx)
        .await?;
        let renewed: Vec<(i16, i64)> = sqlx::query_as(RENEW_LEASES)
            .bind(instance)
            .bind(ttl_ms)
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
        sqlx::query_as(ACQUIRE)
            .bind(instance)
            .bind(ttl_ms)
            .bind(wanted)
            .fetch_all(self)
            .await
    }

    async fn release(&mut self, instance: &str, partitions: &[(i16, i64)]) -> sqlx::Result<()> {
        let (parts, epochs): (Vec<i16>, Vec<i64>) = partitions.iter().copied().unzip();
        sqlx::query(RELEASE)
            .bind(instance)
            .bind(parts)
            .bind(epochs)
            .execute(self)
            .await?;
        Ok(())
    }

    async fn leave(&mut self, instance: &str) -> sqlx::Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE consign_relay_leases SET owner = NULL, expires_at = NULL WHERE owner = $1",
        )
        .bind(instance)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM consign_relays WHERE instance = $1")
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
        sqlx::query_as(
            "SELECT partition, owner, epoch, expires_at, acquired_at,
                    (owner IS NOT NULL AND expires_at > now()) AS live
             FROM consign_relay_leases ORDER BY partition",
        )
        .fetch_all(self)
        .await
    }

    async fn members(&mut self) -> sqlx::Result<Vec<Member>> {
        sqlx::query_as(
            "SELECT instance, host, pid, version, started_at, heartbeat_at
             FROM consign_relays WHERE expires_at > now() ORDER BY instance",
        )
        .fetch_all(self)
        .await
    }

    async fn sample_backlog(&mut self) -> sqlx::Result<BacklogSample> {
        let (counted, span, oldest_age, with_errors): (i64, Option<i64>, Option<f64>, i64) =
            sqlx::query_as(SAMPLE_BACKLOG)
                .bind(EXACT_PENDING_UP_TO + 1)
                .fetch_one(self)
                .await?;
        let pending = if counted > EXACT_PENDING_UP_TO {
            span.unwrap_or(counted).max(counted)
        } else {
            counted
        };
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
        let now = sqlx::query_scalar("SELECT now()")
            .fetch_one(&mut *self)
            .await?;
        let backlog = sqlx::query_as(
            "SELECT partition, count(*) AS pending, min(created_at) AS oldest,
                    count(*) FILTER (WHERE last_error IS NOT NULL) AS failed
             FROM consign_outbox GROUP BY partition ORDER BY partition",
        )
        .fetch_all(&mut *self)
        .await?;
        let failed = sqlx::query_as(
            "SELECT seq, id, topic, key, attempts, last_error, next_attempt_at
             FROM consign_outbox WHERE last_error IS NOT NULL ORDER BY seq LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&mut *self)
        .await?;
        Ok((now, backlog, failed))
    }

    async fn ensure_archive_partitions(&mut self, days_ahead: i32) -> sqlx::Result<()> {
        sqlx::query(
            "SELECT consign_archive_partition((now() AT TIME ZONE 'UTC')::date + d)
             FROM generate_series(0, $1) AS d",
        )
        .bind(days_ahead)
        .execute(self)
        .await?;
        Ok(())
    }

    async fn drop_archive(&mut self, older_than_ms: i64) -> sqlx::Result<(Vec<String>, u64)> {
        let cutoff: DateTime<Utc> =
            sqlx::query_scalar("SELECT now() - $1 * interval '1 millisecond'")
                .bind(older_than_ms)
                .fetch_one(&mut *self)
                .await?;
        let days: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'consign_outbox_archive'::regclass
               AND c.relname ~ '^consign_outbox_archive_[0-9]{8}$'
             ORDER BY c.relname",
        )
        .fetch_all(&mut *self)
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
                    .execute(&mut *self)
                    .await?;
                dropped.push(name);
            }
        }
        let default_rows =
            sqlx::query("DELETE FROM consign_outbox_archive_default WHERE published_at < $1")
                .bind(cutoff)
                .execute(&mut *self)
                .await?
                .rows_affected();
        Ok((dropped, default_rows))
    }
}

async fn delete_published(
    conn: &mut PgConnection,
    fence: Fence<'_>,
    seqs: &[i64],
    archive: bool,
) -> sqlx::Result<u64> {
    let statement = if archive {
        ARCHIVE_PUBLISHED
    } else {
        DELETE_PUBLISHED
    };
    let done = fence
        .bind(sqlx::query(statement))
        .bind(seqs)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

async fn record_failures(
    conn: &mut PgConnection,
    fence: Fence<'_>,
    failures: &[Failure],
) -> sqlx::Result<u64> {
    let seqs: Vec<i64> = failures.iter().map(|f| f.seq).collect();
    let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
    let delays: Vec<i64> = failures.iter().map(|f| f.retry_in_ms).collect();
    let done = fence
        .bind(sqlx::query(RECORD_FAILURES))
        .bind(seqs)
        .bind(errors)
        .bind(delays)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}
