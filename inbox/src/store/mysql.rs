//! MySQL 8 and MariaDB 10.6+: every statement the inbox runs.
//!
//! What differs from PostgreSQL: no `RETURNING` on MySQL, so the dedup
//! record is one multi-row `INSERT IGNORE` whose count of inserted rows
//! says whether every id was new (the usual case); when not, it is undone
//! to a savepoint and redone one id at a time, each insert saying whether
//! its id was new. Lists are bound one value at a time; times are UTC.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::{MySql, MySqlConnection, QueryBuilder, mysql::MySqlDatabaseError};
use uuid::Uuid;

use super::{InboxBackend, InboxStore, StoredLetter};
use crate::{
    Received,
    dead_letters::{DeadLetter, DeadLetterCount, Selection, stored},
};

const NOW: &str = "UTC_TIMESTAMP(6)";

/// Appends `WHERE ...` for `selection` (nothing matches an empty one).
fn push_where(selection: &Selection, query: &mut QueryBuilder<MySql>) {
    query.push(" WHERE TRUE");
    if selection.is_empty() {
        query.push(" AND FALSE");
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
            .push(" AND `key` = ")
            .push_bind(key.as_bytes().to_vec());
    }
    if let Some(since) = selection.since {
        query
            .push(" AND failed_at >= ")
            .push_bind(since.naive_utc());
    }
    if let Some(until) = selection.until {
        query.push(" AND failed_at < ").push_bind(until.naive_utc());
    }
}

impl InboxBackend for MySql {
    fn is_infrastructure(error: &dyn sqlx::error::DatabaseError) -> bool {
        let Some(error) = error.try_downcast_ref::<MySqlDatabaseError>() else {
            return true;
        };
        // Too many connections, shutdown in progress, lock wait timeout,
        // read-only server, statement time limits (MySQL 3024, MariaDB
        // 1969), connection killed, out of memory or disk.
        matches!(
            error.number(),
            1040 | 1041 | 1053 | 1205 | 1290 | 1836 | 3024 | 1969 | 1927 | 1037 | 1021 | 1114
        )
    }

    fn is_after_earlier_error(error: &dyn sqlx::error::DatabaseError) -> bool {
        // MySQL goes on after a failed statement, except after a deadlock,
        // which rolls the whole transaction back.
        error
            .try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|e| e.number() == 1213)
    }
}

impl InboxStore for MySqlConnection {
    async fn record_ids(&mut self, consumer: &str, ids: &[Uuid]) -> sqlx::Result<HashSet<Uuid>> {
        // The savepoint also marks the transaction for `still_open`. Sent
        // as text: MySQL 8 refuses savepoint statements as prepared ones.
        sqlx::raw_sql("SAVEPOINT consign_open")
            .execute(&mut *self)
            .await?;
        let mut new = HashSet::new();
        // 2 bound values per id; MySQL allows 65,535 per statement.
        for chunk in ids.chunks(5_000) {
            sqlx::raw_sql("SAVEPOINT consign_record_ids")
                .execute(&mut *self)
                .await?;
            let mut insert = QueryBuilder::<MySql>::new(
                "INSERT IGNORE INTO consign_inbox (consumer, message_id) ",
            );
            insert.push_values(chunk, |mut row, id| {
                row.push_bind(consumer.to_owned()).push_bind(*id);
            });
            let inserted = insert.build().execute(&mut *self).await?.rows_affected();
            if inserted == u64::try_from(chunk.len()).unwrap_or(u64::MAX) {
                new.extend(chunk.iter().copied());
                continue;
            }
            // Some were recorded before: which ones, one insert each.
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT consign_record_ids")
                .execute(&mut *self)
                .await?;
            for id in chunk {
                let done = sqlx::query(
                    "INSERT IGNORE INTO consign_inbox (consumer, message_id) VALUES (?, ?)",
                )
                .bind(consumer)
                .bind(id)
                .execute(&mut *self)
                .await?;
                if done.rows_affected() == 1 {
                    new.insert(*id);
                }
            }
        }
        Ok(new)
    }

    async fn still_open(&mut self) -> sqlx::Result<bool> {
        // A deadlock (or a lock wait timeout with
        // innodb_rollback_on_timeout) rolls the whole transaction back and
        // later statements run in autocommit: the savepoint is gone then.
        match sqlx::raw_sql("RELEASE SAVEPOINT consign_open; SAVEPOINT consign_open")
            .execute(&mut *self)
            .await
        {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(error))
                if error
                    .try_downcast_ref::<MySqlDatabaseError>()
                    .is_some_and(|e| e.number() == 1305) =>
            {
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
            "INSERT INTO consign_inbox_offsets (consumer_group, topic, `partition`, next_offset)
             VALUES (?, ?, ?, ?)
             ON DUPLICATE KEY UPDATE
                 next_offset = GREATEST(next_offset, VALUES(next_offset)),
                 updated_at = {NOW}"
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
        let mut query = QueryBuilder::<MySql>::new(
            "SELECT topic, `partition`, next_offset FROM consign_inbox_offsets WHERE consumer_group = ",
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
                 (consumer, message_id, topic, `partition`, `offset`, `key`, headers, payload, error, attempts)
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
            "SELECT id, consumer, message_id, topic, `partition`, `offset`, `key`, error, attempts, failed_at
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
            "SELECT consumer, COUNT(*) AS count, MAX(failed_at) AS latest
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
        let mut query = QueryBuilder::new(
            "SELECT id, failed_at, consumer, message_id, topic, `key`, headers, payload
             FROM consign_dead_letters",
        );
        push_where(selection, &mut query);
        if let Some((failed_at, id)) = after {
            query
                .push(" AND (failed_at, id) > (")
                .push_bind(failed_at.naive_utc())
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        query
            .push(" ORDER BY failed_at, id LIMIT ")
            .push_bind(limit)
            .push(" FOR UPDATE");
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
        #[allow(clippy::cast_possible_truncation)] // ages far below 2^63 µs
        let micros = |seconds: f64| (seconds * 1e6) as i64;
        let records = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM consign_inbox WHERE handled_at < {NOW} - INTERVAL ? MICROSECOND"
        )))
        .bind(micros(inbox))
        .execute(&mut *self)
        .await?
        .rows_affected();
        let letters = match dead_letters {
            Some(age) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM consign_dead_letters WHERE failed_at < {NOW} - INTERVAL ? MICROSECOND"
            )))
            .bind(micros(age))
            .execute(&mut *self)
            .await?
            .rows_affected(),
            None => 0,
        };
        Ok((records, letters))
    }
}
