//! SQLite: the outbox insert (feature `sqlite`).

use sqlx::{Sqlite, SqliteConnection};

use super::{OutboxConnection, insert_rows};
use crate::Message;

const COLUMNS: &str = "INSERT INTO consign_outbox
    (id, \"partition\", topic, \"key\", event_type, payload, headers, traceparent, tracestate) ";

impl OutboxConnection for SqliteConnection {
    async fn insert_messages(&mut self, msgs: &[Message]) -> Result<(), sqlx::Error> {
        insert_rows::<Sqlite>(self, COLUMNS, 32_766, msgs).await
    }
}
