//! SQLite: every statement the inbox runs. One writer at a time: the
//! inbox's transaction takes the write lock at its first statement (the
//! dedup record), waiting up to the pool's busy timeout. Times are UTC text,
//! `YYYY-MM-DDTHH:MM:SS.sssZ`, compared as text.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::{InboxBackend, InboxStore, StoredLetter};
use crate::{
    Received,
    dead_letters::{DeadLetter, DeadLetterCount, Selection, stored},
};

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// A time as the tables store it.
fn text(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Appends `WHERE ...` for `selection` (nothing matches an empty one).
fn push_where(selection: &Selection, query: &mut QueryBuilder<Sqlite>) {
    query.push(" WHERE 1");
    if selection.is_empty() {
        query.push(" AND 0");
    }
    if !selection.ids.is_empty() {
        query.push(" AND id IN (");
        let mut ids = query.separated(", ");
        for id in &selection.ids {
            ids.push_bind(*id);
        }
        query.push(")");
    }
    if let Some(consumer) = &selection.consumer {
        query.push(" AND consumer = ").push_bind(consumer.clone());
    }
    if let Some(key) = &selection.key {
        query
            .push(" AND \"key\" = ")
            .push_bind(key.as_bytes().to_vec());
    }
    if let Some(since) = selection.since {
        query.push(" AND failed_at >= ").push_bind(text(since));
    }
    if let Some(until) = selection.until {
        query.push(" AND failed_at < ").push_bind(text(until));
    }
}

impl InboxBackend for Sqlite {
    fn is_infrastructure(error: &dyn sqlx::error::DatabaseError) -> bool {
        // The primary result code (the low byte of an extended one): busy,
        // locked, out of memory, read-only, interrupted, I/O error,
        // corrupt, full, cannot open.
        let primary = error
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .map(|code| code & 0xff);
        primary.is_none_or(|code| matches!(code, 5..=11 | 13 | 14 | 26))
    }

    fn is_after_earlier_error(_error: &dyn sqlx::error::DatabaseError) -> bool {
        // SQLite goes on after a failed statement.
        false
    }

    async fn begin_write(
        pool: &sqlx::Pool<Self>,
    ) -> sqlx::Result<sqlx::Transaction<'static, Self>> {
        pool.begin_with("BEGIN IMMEDIATE").await
    }
}

impl InboxStore for SqliteConnection {
    async fn record_ids(&mut self, consumer: &str, ids: &[Uuid]) -> sqlx::Result<HashSet<Uuid>> {
        // Marks the transaction for `still_open`.
        sqlx::raw_sql("SAVEPOINT consign_open")
            .execute(&mut *self)
            .await?;
        let mut new = HashSet::new();
        // At most 32766 bound values per statement (SQLite 3.32+).
        for chunk in ids.chunks(10_000) {
            let mut insert =
                QueryBuilder::<Sqlite>::new("INSERT INTO consign_inbox (consumer, message_id) ");
            insert.push_values(chunk, |mut row, id| {
                row.push_bind(consumer.to_owned()).push_bind(*id);
            });
            insert.push(" ON CONFLICT DO NOTHING RETURNING message_id");
            let inserted: Vec<Uuid> = insert.build_query_scalar().fetch_all(&mut *self).await?;
            new.extend(inserted);
        }
        Ok(new)
    }

    async fn still_open(&mut self) -> sqlx::Result<bool> {
        // SQLite rolls a transaction back by itself on some errors (disk
        // full, I/O error, out of memory); the savepoint is gone then.
        match sqlx::raw_sql("RELEASE SAVEPOINT consign_open; SAVEPOINT consign_open")
            .execute(&mut *self)
            .await
        {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(error)) if error.message().contains("no such savepoint") => {
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }

    async fn record_offset(
        &mut self,
        group: &str,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> sqlx::Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO consign_inbox_offsets (consumer_group, topic, \"partition\", next_offset)
             VALUES (?, ?, ?, ?)
             ON CONFLICT (consumer_group, topic, \"partition\") DO UPDATE
             SET next_offset = max(next_offset, excluded.next_offset), updated_at = {NOW}"
        )))
        .bind(group)
        .bind(topic)
        .bind(partition)
        .bind(next_offset)
        .execute(self)
        .await?;
        Ok(())
    }

    async fn stored_offsets(
        &mut self,
        group: &str,
        topics: &[String],
    ) -> sqlx::Result<Vec<(String, i32, i64)>> {
        if topics.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT topic, \"partition\", next_offset FROM consign_inbox_offsets WHERE consumer_group = ",
        );
        query.push_bind(group.to_owned()).push(" AND topic IN (");
        let mut list = query.separated(", ");
        for topic in topics {
            list.push_bind(topic.clone());
        }
        query.push(")");
        query.build_query_as().fetch_all(self).await
    }

    async fn insert_dead_letter(
        &mut self,
        consumer: &str,
        id: Option<Uuid>,
        message: &Received,
        error: &str,
        attempts: u32,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO consign_dead_letters
                 (consumer, message_id, topic, \"partition\", \"offset\", \"key\", headers, payload, error, attempts)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(consumer)
        .bind(id)
        .bind(&message.topic)
        .bind(message.partition)
        .bind(message.offset)
        .bind(message.key.as_deref())
        .bind(stored::encode(&message.headers))
        .bind(message.payload.as_deref())
        .bind(error)
        .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
        .execute(self)
        .await?;
        Ok(())
    }

    async fn list_dead_letters(
        &mut self,
        selection: &Selection,
        limit: i64,
    ) -> sqlx::Result<Vec<DeadLetter>> {
        let mut query = QueryBuilder::new(
            "SELECT id, consumer, message_id, topic, \"partition\", \"offset\", \"key\", error, attempts, failed_at
             FROM consign_dead_letters",
        );
        push_where(selection, &mut query);
        query
            .push(" ORDER BY failed_at, id LIMIT ")
            .push_bind(limit);
        let rows: Vec<super::Listed> = query.build_query_as().fetch_all(self).await?;
        Ok(rows.into_iter().map(super::listed).collect())
    }

    async fn count_dead_letters(&mut self) -> sqlx::Result<Vec<DeadLetterCount>> {
        sqlx::query_as(
            "SELECT consumer, count(*) AS count, max(failed_at) AS latest
             FROM consign_dead_letters GROUP BY consumer ORDER BY consumer",
        )
        .fetch_all(self)
        .await
    }

    async fn purge_dead_letters(&mut self, selection: &Selection) -> sqlx::Result<u64> {
        let mut query = QueryBuilder::new("DELETE FROM consign_dead_letters");
        push_where(selection, &mut query);
        Ok(query.build().execute(self).await?.rows_affected())
    }

    async fn lock_dead_letters(
        &mut self,
        selection: &Selection,
        after: Option<(DateTime<Utc>, i64)>,
        limit: i64,
    ) -> sqlx::Result<Vec<StoredLetter>> {
        // No row locks in SQLite: the requeue's transaction began with
        // BEGIN IMMEDIATE, the database's one write lock until it commits.
        let mut query = QueryBuilder::new(
            "SELECT id, failed_at, consumer, message_id, topic, \"key\", headers, payload
             FROM consign_dead_letters",
        );
        push_where(selection, &mut query);
        if let Some((failed_at, id)) = after {
            query
                .push(" AND (failed_at, id) > (")
                .push_bind(text(failed_at))
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        query
            .push(" ORDER BY failed_at, id LIMIT ")
            .push_bind(limit);
        query.build_query_as().fetch_all(self).await
    }

    async fn forget_dead_letter(
        &mut self,
        letter: i64,
        consumer: &str,
        message_id: Uuid,
    ) -> sqlx::Result<()> {
        sqlx::query("DELETE FROM consign_inbox WHERE consumer = ? AND message_id = ?")
            .bind(consumer)
            .bind(message_id)
            .execute(&mut *self)
            .await?;
        sqlx::query("DELETE FROM consign_dead_letters WHERE id = ?")
            .bind(letter)
            .execute(&mut *self)
            .await?;
        Ok(())
    }

    async fn delete_older_than(
        &mut self,
        inbox: f64,
        dead_letters: Option<f64>,
    ) -> sqlx::Result<(u64, u64)> {
        let ago = |seconds: f64| format!("-{seconds:.3} seconds");
        let records = sqlx::query(
            "DELETE FROM consign_inbox WHERE handled_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)",
        )
        .bind(ago(inbox))
        .execute(&mut *self)
        .await?
        .rows_affected();
        let letters = match dead_letters {
            Some(age) => sqlx::query(
                "DELETE FROM consign_dead_letters
                 WHERE failed_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)",
            )
            .bind(ago(age))
            .execute(&mut *self)
            .await?
            .rows_affected(),
            None => 0,
        };
        Ok((records, letters))
    }
}
