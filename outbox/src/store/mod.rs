//! Database backends. Each backend is one module holding its SQL; the
//! [`OutboxConnection`] trait is all the outbox needs from it.

#[cfg(feature = "mysql")]
mod mysql;
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::future::Future;

use crate::Message;

/// A connection the outbox can insert messages on: `&mut *tx` for a sqlx
/// transaction, or `&mut *conn` for a pooled connection.
///
/// Implemented for [`sqlx::PgConnection`], and with the features `mysql`
/// and `sqlite` for `sqlx::MySqlConnection` (MySQL 8, MariaDB 10.6+) and
/// `sqlx::SqliteConnection`. Sealed: other databases come as modules of this
/// crate.
pub trait OutboxConnection: sealed::Sealed + Send {
    /// Inserts already validated messages, in order, with one statement.
    #[doc(hidden)]
    fn insert_messages<'a>(
        &'a mut self,
        msgs: &'a [Message],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'a;
}

/// The `headers` column's JSON text for `msg`: its user headers plus
/// `consign-requeued-for` when set (every backend stores this).
fn headers_json(msg: &Message) -> Result<String, sqlx::Error> {
    serde_json::to_string(&msg.stored_headers()).map_err(|e| sqlx::Error::Encode(e.into()))
}

/// Inserts `msgs` with multi-row `INSERT`s of at most `max_binds` bound
/// values each (9 per message), the column names quoted as the backend
/// wants (`partition` and `key` are reserved words); one message (the
/// usual business transaction) with the fixed statement `one`, prepared
/// once per connection. Within a statement the rows get increasing `seq`s
/// in their order, on every backend.
#[cfg(any(feature = "mysql", feature = "sqlite"))]
async fn insert_rows<DB>(
    conn: &mut DB::Connection,
    columns: &'static str,
    one: &'static str,
    max_binds: usize,
    msgs: &[Message],
) -> Result<(), sqlx::Error>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'q> uuid::Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i16: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Vec<u8>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    if let [msg] = msgs {
        sqlx::query(one)
            .bind(msg.id())
            .bind(msg.partition())
            .bind(msg.topic().to_owned())
            .bind(msg.key().map(str::to_owned))
            .bind(msg.event_type().to_owned())
            .bind(msg.payload().to_vec())
            .bind(headers_json(msg)?)
            .bind(msg.traceparent().map(str::to_owned))
            .bind(msg.tracestate().map(str::to_owned))
            .execute(&mut *conn)
            .await?;
        return Ok(());
    }
    for chunk in msgs.chunks(max_binds / 9) {
        let mut rows = Vec::with_capacity(chunk.len());
        for msg in chunk {
            rows.push((msg, headers_json(msg)?));
        }
        let mut query = sqlx::QueryBuilder::<DB>::new(columns);
        query.push_values(rows, |mut row, (msg, headers)| {
            row.push_bind(msg.id())
                .push_bind(msg.partition())
                .push_bind(msg.topic().to_owned())
                .push_bind(msg.key().map(str::to_owned))
                .push_bind(msg.event_type().to_owned())
                .push_bind(msg.payload().to_vec())
                .push_bind(headers)
                .push_bind(msg.traceparent().map(str::to_owned))
                .push_bind(msg.tracestate().map(str::to_owned));
        });
        query.build().execute(&mut *conn).await?;
    }
    Ok(())
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::PgConnection {}
    #[cfg(feature = "mysql")]
    impl Sealed for sqlx::MySqlConnection {}
    #[cfg(feature = "sqlite")]
    impl Sealed for sqlx::SqliteConnection {}
}
