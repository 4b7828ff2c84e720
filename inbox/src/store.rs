//! The inbox's SQL (PostgreSQL).

use std::collections::HashSet;

use sqlx::PgConnection;
use uuid::Uuid;

/// Records ids as handled by `consumer`; returns those that were new.
pub(crate) async fn record_ids(
    conn: &mut PgConnection,
    consumer: &str,
    ids: &[Uuid],
) -> sqlx::Result<HashSet<Uuid>> {
    let new: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO consign_inbox (consumer, message_id)
         SELECT $1, id FROM unnest($2::uuid[]) AS t(id)
         ON CONFLICT DO NOTHING
         RETURNING message_id",
    )
    .bind(consumer)
    .bind(ids)
    .fetch_all(conn)
    .await?;
    Ok(new.into_iter().collect())
}

/// Moves a partition's stored position forward (never back: a late commit
/// of a consumer that lost the partition cannot rewind the new owner).
pub(crate) async fn record_offset(
    conn: &mut PgConnection,
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
    .execute(conn)
    .await?;
    Ok(())
}

/// The stored next offsets of `group` for `topics`.
pub(crate) async fn stored_offsets(
    pool: &sqlx::PgPool,
    group: &str,
    topics: &[String],
) -> sqlx::Result<Vec<(String, i32, i64)>> {
    sqlx::query_as(
        "SELECT topic, partition, next_offset FROM consign_inbox_offsets
         WHERE consumer_group = $1 AND topic = ANY($2)",
    )
    .bind(group)
    .bind(topics)
    .fetch_all(pool)
    .await
}
