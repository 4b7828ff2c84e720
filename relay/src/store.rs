//! PostgreSQL: the statements the relay runs against the outbox table.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// Reads the next rows to publish from the owned partitions, in `seq` order.
/// Skips rows waiting for a retry, and every later row of the same topic and
/// key as a row waiting for a retry, so a key's events never overtake each
/// other on a topic.
const FETCH: &str = "\
WITH blocked AS (
    SELECT topic, key, min(seq) AS seq
    FROM consign_outbox
    WHERE next_attempt_at > now() AND key IS NOT NULL AND partition = ANY($1)
    GROUP BY topic, key
)
SELECT o.seq, o.id, o.topic, o.key, o.event_type, o.payload, o.headers,
       o.traceparent, o.tracestate, o.created_at, o.attempts
FROM consign_outbox o
WHERE o.partition = ANY($1)
  AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
  AND NOT EXISTS (
      SELECT 1 FROM blocked b WHERE b.key = o.key AND b.topic = o.topic AND b.seq < o.seq
  )
ORDER BY o.seq
LIMIT $2";

/// Deletes rows the broker has acknowledged.
const DELETE_PUBLISHED: &str = "DELETE FROM consign_outbox WHERE seq = ANY($1)";

/// Records failed attempts: error text and the time of the next try.
const RECORD_FAILURES: &str = "\
UPDATE consign_outbox AS o
SET attempts = o.attempts + 1,
    last_error = f.error,
    next_attempt_at = now() + f.delay_ms * interval '1 millisecond'
FROM unnest($1::int8[], $2::text[], $3::int8[]) AS f(seq, error, delay_ms)
WHERE o.seq = f.seq";

/// One outbox row as the relay reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct OutboxRow {
    pub(crate) seq: i64,
    pub(crate) id: Uuid,
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
) -> sqlx::Result<Vec<OutboxRow>> {
    sqlx::query_as(FETCH)
        .bind(partitions)
        .bind(limit)
        .fetch_all(conn)
        .await
}

pub(crate) async fn delete_published(conn: &mut PgConnection, seqs: &[i64]) -> sqlx::Result<u64> {
    let done = sqlx::query(DELETE_PUBLISHED)
        .bind(seqs)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

pub(crate) async fn record_failures(
    conn: &mut PgConnection,
    failures: &[Failure],
) -> sqlx::Result<u64> {
    let seqs: Vec<i64> = failures.iter().map(|f| f.seq).collect();
    let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
    let delays: Vec<i64> = failures.iter().map(|f| f.retry_in_ms).collect();
    let done = sqlx::query(RECORD_FAILURES)
        .bind(seqs)
        .bind(errors)
        .bind(delays)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}
