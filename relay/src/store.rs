//! PostgreSQL: the statements the relay runs against the outbox table.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, Row, postgres::PgArguments};

use crate::lease::Owned;
use uuid::Uuid;

/// Reads the next rows to publish from the owned partitions, in `seq` order.
/// Skips rows waiting for a retry, and every later row of the same topic and
/// key as a row waiting for a retry, so a key's events never overtake each
/// other on a topic. At most $2 rows, and no more bytes than $3 (payload,
/// key and headers) unless the first row alone is larger.
const FETCH: &str = "\
WITH blocked AS (
    SELECT topic, key, min(seq) AS seq
    FROM consign_outbox
    WHERE next_attempt_at > now() AND key IS NOT NULL AND partition = ANY($1)
    GROUP BY topic, key
), candidates AS (
    SELECT o.seq, o.id, o.partition, o.topic, o.key, o.event_type, o.payload, o.headers,
           o.traceparent, o.tracestate, o.created_at, o.attempts,
           octet_length(o.payload) + coalesce(octet_length(o.key), 0)
               + octet_length(o.headers::text) AS size
    FROM consign_outbox o
    WHERE o.partition = ANY($1)
      AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
      AND NOT EXISTS (
          SELECT 1 FROM blocked b WHERE b.key = o.key AND b.topic = o.topic AND b.seq < o.seq
      )
    ORDER BY o.seq
    LIMIT $2
), running AS (
    SELECT *, sum(size) OVER (ORDER BY seq) AS upto FROM candidates
)
SELECT seq, id, partition, topic, key, event_type, payload, headers,
       traceparent, tracestate, created_at, attempts
FROM running
WHERE upto <= $3 OR upto = size
ORDER BY seq";

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

/// A failed publish attempt to record on its row.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) seq: i64,
    pub(crate) error: String,
    pub(crate) retry_in_ms: i64,
}

pub(crate) async fn fetch(
    conn: &mut PgConnection,
    partitions: &[i16],
    limit: i64,
    max_bytes: i64,
) -> sqlx::Result<Vec<OutboxRow>> {
    sqlx::query_as(FETCH)
        .bind(partitions)
        .bind(limit)
        .bind(max_bytes)
        .fetch_all(conn)
        .await
}

/// The leases a relay holds: its instance name and, per partition, the
/// epoch it read rows under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fence<'a> {
    pub(crate) instance: &'a str,
    pub(crate) owned: &'a Owned,
}

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

/// Deletes (or with `archive`, moves to the archive) acknowledged rows of
/// partitions `fence` still holds. Returns how many; rows of lost
/// partitions stay for their new owner.
pub(crate) async fn delete_published(
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

/// Records publish failures on rows of partitions `fence` still holds.
pub(crate) async fn record_failures(
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

/// The partitions of `fence` still leased under the same epoch.
pub(crate) async fn held(conn: &mut PgConnection, fence: Fence<'_>) -> sqlx::Result<Vec<i16>> {
    let rows = fence.bind(sqlx::query(HELD)).fetch_all(conn).await?;
    rows.iter().map(|row| row.try_get(0)).collect()
}
