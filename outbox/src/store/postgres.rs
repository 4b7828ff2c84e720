//! PostgreSQL: the outbox insert statements.

use sqlx::{PgConnection, types::Json};

use super::{OutboxConnection, headers_json};
use crate::Message;

const INSERT_ONE: &str = "\
INSERT INTO consign_outbox
    (id, partition, topic, key, event_type, payload, headers, traceparent, tracestate)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// `WITH ORDINALITY ... ORDER BY` keeps `seq` in the order of the batch.
const INSERT_MANY: &str = "\
INSERT INTO consign_outbox
    (id, partition, topic, key, event_type, payload, headers, traceparent, tracestate)
SELECT id, partition, topic, key, event_type, payload, headers::jsonb, traceparent, tracestate
FROM unnest($1::uuid[], $2::int2[], $3::text[], $4::text[], $5::text[], $6::bytea[],
            $7::text[], $8::text[], $9::text[])
     WITH ORDINALITY
     AS m(id, partition, topic, key, event_type, payload, headers, traceparent, tracestate, ord)
ORDER BY ord";

impl OutboxConnection for PgConnection {
    async fn insert_messages(&mut self, msgs: &[Message]) -> Result<(), sqlx::Error> {
        match msgs {
            [msg] => insert_one(self, msg).await,
            _ => insert_many(self, msgs).await,
        }
    }
}

async fn insert_one(conn: &mut PgConnection, msg: &Message) -> Result<(), sqlx::Error> {
    sqlx::query(INSERT_ONE)
        .bind(msg.id())
        .bind(msg.partition())
        .bind(msg.topic())
        .bind(msg.key())
        .bind(msg.event_type())
        .bind(msg.payload())
        .bind(Json(msg.stored_headers()))
        .bind(msg.traceparent())
        .bind(msg.tracestate())
        .execute(conn)
        .await?;
    Ok(())
}

async fn insert_many(conn: &mut PgConnection, msgs: &[Message]) -> Result<(), sqlx::Error> {
    let column = |f: fn(&Message) -> Option<&str>| msgs.iter().map(f).collect::<Vec<_>>();
    let headers = msgs
        .iter()
        .map(headers_json)
        .collect::<Result<Vec<_>, _>>()?;
    sqlx::query(INSERT_MANY)
        .bind(msgs.iter().map(Message::id).collect::<Vec<_>>())
        .bind(msgs.iter().map(Message::partition).collect::<Vec<_>>())
        .bind(msgs.iter().map(Message::topic).collect::<Vec<_>>())
        .bind(column(Message::key))
        .bind(msgs.iter().map(Message::event_type).collect::<Vec<_>>())
        .bind(msgs.iter().map(Message::payload).collect::<Vec<_>>())
        .bind(headers)
        .bind(column(Message::traceparent))
        .bind(column(Message::tracestate))
        .execute(conn)
        .await?;
    Ok(())
}
