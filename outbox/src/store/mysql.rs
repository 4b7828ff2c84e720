//! MySQL 8 / MariaDB 10.6+: the outbox insert (feature `mysql`).

use sqlx::{MySql, MySqlConnection};

use super::{OutboxConnection, insert_rows};
use crate::Message;

macro_rules! columns {
    () => {
        "INSERT INTO consign_outbox
    (id, `partition`, topic, `key`, event_type, payload, headers, traceparent, tracestate) "
    };
}

impl OutboxConnection for MySqlConnection {
    async fn insert_messages(&mut self, msgs: &[Message]) -> Result<(), sqlx::Error> {
        // AUTO_INCREMENT hands out `seq` in the order of one statement's rows.
        let one = concat!(columns!(), "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)");
        insert_rows::<MySql>(self, columns!(), one, 65_535, msgs).await
    }
}
