//! PostgreSQL: every statement the inbox runs.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use super::{InboxBackend, InboxStore, StoredLetter};
use crate::{
    Received,
    dead_letters::{DeadLetter, DeadLetterCount, Selection, stored},
};

/// Appends `WHERE ...` for `selection` (nothing matches an empty one).
fn push_where(selection: &Selection, query: &mut QueryBuilder<Postgres>) {
    query.push(" WHERE true");
    if selection.is_empty() {
        query.push(" AND false");
    }
    if !selection.ids.is_empty() {
        query
            .push(" AND id = ANY(")
            .push_bind(selection.ids.clone())
            .push(")");
    }
    if let Some(consumer) = &selection.consumer {
        query.push(" AND consumer = ").push_bind(consumer.clone());
    }
    if let Some(key) = &selection.key {
        query
            .push(" AND key = convert_to(")
            .push_bind(key.clone())
            .push(", 'UTF8')");
    }
    if let Some(since) = selection.since {
        query.push(" AND failed_at >= ").push_bind(since);
    }
    if let Some(until) = selection.until {
        query.push(" AND failed_at < ").push_bind(until);
    }
}

impl InboxBackend for Postgres {
    fn is_infrastructure(error: &dyn sqlx::error::DatabaseError) -> bool {
        // Connection exceptions, insufficient resources, system errors,
        // shutdown, statement timeout, a read-only server after a failover.
        // No SQLSTATE: not the server's answer to the transaction.
        error.code().is_none_or(|code| {
            matches!(&code[..2], "08" | "53" | "58")
                || matches!(&*code, "57P01" | "57P02" | "57P03" | "57014" | "25006")
        })
    }

    fn is_after_earlier_error(error: &dyn sqlx::error::DatabaseError) -> bool {
        error.code().as_deref() == Some("25P02")
    }
}

impl InboxStore for PgConnection {
    async fn record_ids(&mut self, consumer: &str, ids: &[Uuid]) -> sqlx::Result<HashSet<Uuid>> {
        let new: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO consign_inbox (consumer, message_id)
             SELECT $1, id FROM unnest($2::uuid[]) AS t(id)
             ON CONFLICT DO NOTHING
             RETURNING message_id",
        )
        .bind(consumer)
        .bind(ids)
        .fetch_all(self)
        .await?;
        Ok(new.into_iter().collect())
    }

    async fn record_offset(
        &mut self,
        group: &str,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO consign_inbox_offsets (consumer_group, topic, partition, next_offset)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (consumer_group, topic, partition) DO UPDATE
             SET next_offset = greatest(consign_inbox_offsets.next_offset, excluded.next_offset),
                 updated_at = now()",
        )
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
        sqlx::query_as(
            "SELECT topic, partition, next_offset FROM consign_inbox_offsets
             WHERE consumer_group = $1 AND topic = ANY($2)",
        )
        .bind(group)
        .bind(topics)
        .fetch_all(self)
        .await
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
                 (consumer, message_id, topic, partition, \"offset\", key, headers, payload, error, attempts)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
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
            "SELECT id, consumer, message_id, topic, partition, \"offset\", key, error, attempts, failed_at
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
        let mut query = QueryBuilder::new(
            "SELECT id, failed_at, consumer, message_id, topic, key, headers, payload
             FROM consign_dead_letters",
        );
        push_where(selection, &mut query);
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
        sqlx::query("DELETE FROM consign_inbox WHERE consumer = $1 AND message_id = $2")
            .bind(consumer)
            .bind(message_id)
            .execute(&mut *self)
            .await?;
        sqlx::query("DELETE FROM consign_dead_letters WHERE id = $1")
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
        let records = sqlx::query(
            "DELETE FROM consign_inbox WHERE handled_at < now() - make_interval(secs => $1)",
        )
        .bind(inbox)
        .execute(&mut *self)
        .await?
        .rows_affected();
        let letters = match dead_letters {
            Some(age) => sqlx::query(
                "DELETE FROM consign_dead_letters WHERE failed_at < now() - make_interval(secs => $1)",
            )
            .bind(age)
            .execute(&mut *self)
            .await?
            .rows_affected(),
            None => 0,
        };
        Ok((records, letters))
    }
}
