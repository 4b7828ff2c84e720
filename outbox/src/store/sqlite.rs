//! SQLite: the outbox insert (feature `sqlite`).

use sqlx::{Sqlite, SqliteConnection};

use super::{OutboxConnection, insert_rows};
use crate::Message;

macro_rules! columns {
    () => {
        "INSERT INTO consign_outbox
    (id, \"partition\", topic, \"key\", event_type, payload, headers, traceparent, tracestate) "
    };
}

impl OutboxConnection for SqliteConnection {
    async fn insert_messages(&mut self, msgs: &[Message]) -> Result<(), sqlx::Error> {
        let one = concat!(columns!(), "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)");
        insert_rows::<Sqlite>(self, columns!(), one, 32_766, msgs).await
    }
}
