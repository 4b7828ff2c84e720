//! MySQL 8 / MariaDB 10.6+: the outbox insert (feature `mysql`).

use sqlx::{MySql, MySqlConnection};

use super::{OutboxConnection, insert_rows};
use crate::Message;

const COLUMNS: &str = "INSERT INTO consign_outbox
    (id, `partition`, topic, `key`, event_type, payload, headers, traceparent, tracestate) ";

impl OutboxConnection for MySqlConnection {
    async fn insert_messages(&mut self, msgs: &[Message]) -> Result<(), sqlx::Error> {
        // AUTO_INCREMENT hands out `seq` in the order of one statement's rows.
        insert_rows::<MySql>(self, COLUMNS, 65_535, msgs).await
    }
}
