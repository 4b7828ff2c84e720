//! Database backends. Each backend is one module holding its SQL; the
//! [`OutboxConnection`] trait is all the outbox needs from it.

mod postgres;

use std::future::Future;

use crate::Message;

/// A connection the outbox can insert messages on: `&mut *tx` for a sqlx
/// transaction, or `&mut *conn` for a pooled connection.
///
/// Implemented for [`sqlx::PgConnection`]. Sealed: other databases come as
/// modules of this crate.
pub trait OutboxConnection: sealed::Sealed + Send {
    /// Inserts already validated messages, in order, with one statement.
    #[doc(hidden)]
    fn insert_messages<'a>(
        &'a mut self,
        msgs: &'a [Message],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'a;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::PgConnection {}
}
