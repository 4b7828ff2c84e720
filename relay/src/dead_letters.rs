//! Dead letters written by the inbox (`consign_dead_letters`): list,
//! requeue, purge.
//!
//! **Requeue** puts a dead letter back on its topic *through the outbox*, in
//! one transaction: the letter is deleted, the consumer's dedup record of
//! its message id is deleted (so that consumer handles it again), and an
//! outbox row with the same id, key, payload, event type, trace context and
//! user headers is inserted, plus [`headers::REQUEUED_FOR`] naming the
//! consumer. The relay then publishes it like any event. Other consumers of
//! the topic pass over it by that header, not by their dedup records (which
//! retention may have removed, and which a letter without id never
//! matches). A requeued message comes after the key's later events.

use chrono::{DateTime, Utc};
use consign_outbox::{headers, partition_for};
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

/// Which dead letters a command applies to. Conditions combine with AND; an
/// empty selection matches nothing unless `all` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Selection {
    /// Only these dead-letter ids (the `id` column, not message ids).
    pub ids: Vec<i64>,
    /// Only letters of this consumer.
    pub consumer: Option<String>,
    /// Only letters whose Kafka key is this (UTF-8) text.
    pub key: Option<String>,
    /// Only letters that failed at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only letters that failed before this time.
    pub until: Option<DateTime<Utc>>,
    /// Match every letter (with the other conditions, if any).
    pub all: bool,
}

impl Selection {
    /// Every dead letter (narrow it with the fields).
    #[must_use]
    pub fn all() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    /// The dead letters with these ids.
    #[must_use]
    pub fn ids(ids: impl IntoIterator<Item = i64>) -> Self {
        Self {
            ids: ids.into_iter().collect(),
            ..Self::default()
        }
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.consumer.is_none()
            && self.key.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && !self.all
    }

    /// Appends `WHERE ...` for this selection.
    fn push_where(&self, query: &mut QueryBuilder<Postgres>) {
        query.push(" WHERE true");
        if self.is_empty() {
            query.push(" AND false");
        }
        if !self.ids.is_empty() {
            query
                .push(" AND id = ANY(")
                .push_bind(self.ids.clone())
                .push(")");
        }
        if let Some(consumer) = &self.consumer {
            query.push(" AND consumer = ").push_bind(consumer.clone());
        }
        if let Some(key) = &self.key {
            query
                .push(" AND key = convert_to(")
                .push_bind(key.clone())
                .push(", 'UTF8')");
        }
        if let Some(since) = self.since {
            query.push(" AND failed_at >= ").push_bind(since);
        }
        if let Some(until) = self.until {
            query.push(" AND failed_at < ").push_bind(until);
        }
    }
}

/// One dead letter, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Dead-letter id (what `requeue --id` takes).
    pub id: i64,
    /// The consumer that gave up.
    pub consumer: String,
    /// The message's `consign-id`, if it had one.
    pub message_id: Option<Uuid>,
    /// Where it was read from.
    pub topic: String,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// The key as text (lossy if it was not UTF-8).
    pub key: Option<String>,
    /// Why the consumer gave up.
    pub error: String,
    /// Handler attempts made.
    pub attempts: i32,
    /// When.
    pub failed_at: DateTime<Utc>,
}

/// Dead letters per consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct DeadLetterCount {
    /// Consumer name.
    pub consumer: String,
    /// Letters.
    pub count: i64,
    /// The newest letter's time.
    pub latest: DateTime<Utc>,
}

/// Lists the selected dead letters, oldest first, at most `limit`.
///
/// # Errors
/// On a database error.
pub async fn list(
    pool: &PgPool,
    selection: &Selection,
    limit: i64,
) -> sqlx::Result<Vec<DeadLetter>> {
    type Listed = (
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
    let mut query = QueryBuilder::new(
        "SELECT id, consumer, message_id, topic, partition, \"offset\", key, error, attempts, failed_at
         FROM consign_dead_letters",
    );
    selection.push_where(&mut query);
    query
        .push(" ORDER BY failed_at, id LIMIT ")
        .push_bind(limit);
    let rows: Vec<Listed> = query.build_query_as().fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .map(
            |(
                id,
                consumer,
                message_id,
                topic,
                partition,
                offset,
                key,
                error,
                attempts,
                failed_at,
            )| {
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
            },
        )
        .collect())
}

/// Dead letters per consumer.
///
/// # Errors
/// On a database error.
pub async fn counts(pool: &PgPool) -> sqlx::Result<Vec<DeadLetterCount>> {
    sqlx::query_as(
        "SELECT consumer, count(*) AS count, max(failed_at) AS latest
         FROM consign_dead_letters GROUP BY consumer ORDER BY consumer",
    )
    .fetch_all(pool)
    .await
}

/// What a requeue did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Requeued {
    /// Dead-letter ids now in the outbox again, with their message ids.
    pub requeued: Vec<(i64, Uuid)>,
    /// Dead-letter ids left in place, with the reason.
    pub skipped: Vec<(i64, String)>,
}

#[derive(sqlx::FromRow)]
struct Letter {
    id: i64,
    failed_at: DateTime<Utc>,
    consumer: String,
    message_id: Option<Uuid>,
    topic: String,
    key: Option<Vec<u8>>,
    headers: Value,
    payload: Option<Vec<u8>>,
}

/// The outbox row a letter becomes, or why it cannot.
struct Row {
    id: Uuid,
    key: Option<String>,
    event_type: String,
    headers: Value,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

fn to_row(letter: &Letter) -> Result<Row, String> {
    let key = match &letter.key {
        None => None,
        Some(bytes) => Some(
            String::from_utf8(bytes.clone())
                .map_err(|_| "its key is not UTF-8 (outbox keys are text)".to_owned())?,
        ),
    };
    let mut row = Row {
        id: letter.message_id.unwrap_or_else(Uuid::now_v7),
        key,
        event_type: String::new(),
        headers: Value::Object(Map::new()),
        traceparent: None,
        tracestate: None,
    };
    let mut user = Map::new();
    for header in letter.headers.as_array().into_iter().flatten() {
        let name = header["name"].as_str().unwrap_or_default();
        let value = match (&header["value"], &header["base64"]) {
            (Value::String(value), _) => value.clone(),
            (_, Value::String(_)) => {
                return Err(format!(
                    "header {name:?} is binary (outbox headers are text)"
                ));
            }
            _ => String::new(),
        };
        match name {
            headers::EVENT_TYPE => row.event_type = value,
            headers::TRACEPARENT => row.traceparent = Some(value),
            headers::TRACESTATE => row.tracestate = Some(value),
            n if n.starts_with(headers::RESERVED_PREFIX) => {}
            n => {
                user.insert(n.to_owned(), Value::String(value));
            }
        }
    }
    if row.event_type.is_empty() {
        row.event_type = "unknown".into();
    }
    user.insert(
        headers::REQUEUED_FOR.to_owned(),
        Value::String(letter.consumer.clone()),
    );
    row.headers = Value::Object(user);
    Ok(row)
}

/// Requeues the selected dead letters (see the module docs), in one
/// transaction. Letters that cannot become outbox rows (binary key or
/// header) stay, with the reason in [`Requeued::skipped`].
///
/// # Errors
/// On a database error (nothing is changed then).
pub async fn requeue(pool: &PgPool, selection: &Selection) -> sqlx::Result<Requeued> {
    let mut tx = pool.begin().await?;
    let mut done = Requeued::default();
    // A page at a time, so `--all` over many large letters holds at most
    // REQUEUE_PAGE of them in memory.
    let mut after: Option<(DateTime<Utc>, i64)> = None;
    loop {
        let mut query = QueryBuilder::new(
            "SELECT id, failed_at, consumer, message_id, topic, key, headers, payload
             FROM consign_dead_letters",
        );
        selection.push_where(&mut query);
        if let Some((failed_at, id)) = after {
            query
                .push(" AND (failed_at, id) > (")
                .push_bind(failed_at)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        query
            .push(" ORDER BY failed_at, id LIMIT ")
            .push_bind(REQUEUE_PAGE)
            .push(" FOR UPDATE");
        let letters: Vec<Letter> = query.build_query_as().fetch_all(&mut *tx).await?;
        let Some(last) = letters.last() else {
            break;
        };
        after = Some((last.failed_at, last.id));
        requeue_page(&mut tx, &letters, &mut done).await?;
    }
    tx.commit().await?;
    Ok(done)
}

/// Letters read per page by [`requeue`].
const REQUEUE_PAGE: i64 = 100;

async fn requeue_page(
    tx: &mut sqlx::PgConnection,
    letters: &[Letter],
    done: &mut Requeued,
) -> sqlx::Result<()> {
    for letter in letters {
        let row = match to_row(letter) {
            Ok(row) => row,
            Err(reason) => {
                done.skipped.push((letter.id, reason));
                continue;
            }
        };
        sqlx::query(
            "INSERT INTO consign_outbox
                 (id, partition, topic, key, event_type, payload, headers, traceparent, tracestate)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(row.id)
        .bind(partition_for(row.key.as_deref(), &row.id))
        .bind(&letter.topic)
        .bind(&row.key)
        .bind(&row.event_type)
        .bind(letter.payload.as_deref().unwrap_or_default())
        .bind(&row.headers)
        .bind(&row.traceparent)
        .bind(&row.tracestate)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM consign_inbox WHERE consumer = $1 AND message_id = $2")
            .bind(&letter.consumer)
            .bind(row.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM consign_dead_letters WHERE id = $1")
            .bind(letter.id)
            .execute(&mut *tx)
            .await?;
        done.requeued.push((letter.id, row.id));
    }
    Ok(())
}

/// Deletes the selected dead letters. Returns how many.
///
/// # Errors
/// On a database error.
pub async fn purge(pool: &PgPool, selection: &Selection) -> sqlx::Result<u64> {
    let mut query = QueryBuilder::new("DELETE FROM consign_dead_letters");
    selection.push_where(&mut query);
    Ok(query.build().execute(pool).await?.rows_affected())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn letter(key: Option<&[u8]>, headers: Value) -> Letter {
        Letter {
            id: 1,
            failed_at: Utc::now(),
            consumer: "c".into(),
            message_id: Some(Uuid::now_v7()),
            topic: "t".into(),
            key: key.map(<[u8]>::to_vec),
            headers,
            payload: Some(b"{}".to_vec()),
        }
    }

    #[test]
    fn letters_become_outbox_rows_with_their_headers_sorted_out() {
        let headers = json!([
            {"name": "consign-id", "value": "x"},
            {"name": "consign-event-type", "value": "OrderPlaced"},
            {"name": "traceparent", "value": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
            {"name": "tenant", "value": "acme"},
            {"name": "consign-requeued-for", "value": "an earlier requeue's consumer"},
        ]);
        let row = to_row(&letter(Some(b"order-1"), headers)).unwrap();
        assert_eq!(row.key.as_deref(), Some("order-1"));
        assert_eq!(row.event_type, "OrderPlaced");
        assert!(row.traceparent.unwrap().starts_with("00-4bf92f"));
        assert_eq!(
            row.headers,
            json!({"tenant": "acme", "consign-requeued-for": "c"})
        );
    }

    #[test]
    fn letters_that_cannot_be_outbox_rows_say_why() {
        let binary = json!([{"name": "sig", "base64": "AAE="}]);
        let error = to_row(&letter(None, binary)).err().unwrap();
        assert!(error.contains("\"sig\" is binary"), "{error}");
        let error = to_row(&letter(Some(&[0xff, 0xfe]), json!([])))
            .err()
            .unwrap();
        assert!(error.contains("not UTF-8"), "{error}");
    }
}
