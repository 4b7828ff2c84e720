//! The outbox half of [consign]: write events in the **same database
//! transaction** as the business rows they describe.
//!
//! A service that updates its database and then publishes to Kafka can lose
//! the event (crash between the two) or publish one for a change that was
//! rolled back. With an outbox, the event is a row written by the business
//! transaction itself: it exists if and only if that transaction commits.
//! The relay (`consign-relay`) then ships committed rows to Kafka, in order
//! per key, and deletes them once the broker has acknowledged.
//!
//! ```no_run
//! use consign_outbox::{Event, Outbox};
//! use serde::Serialize;
//!
//! #[derive(Serialize)]
//! struct OrderPlaced { order_id: i64, total_cents: i64 }
//!
//! impl Event for OrderPlaced {
//!     const TOPIC: &'static str = "orders";
//!     const EVENT_TYPE: &'static str = "OrderPlaced";
//!     fn key(&self) -> Option<String> { Some(self.order_id.to_string()) }
//! }
//!
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! consign_outbox::migrate(&pool).await?; // once, at start-up
//! let outbox = Outbox::new();
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id, total_cents) VALUES ($1, $2)")
//!     .bind(42_i64).bind(1250_i64)
//!     .execute(&mut *tx).await?;
//! outbox.enqueue_event(&mut *tx, &OrderPlaced { order_id: 42, total_cents: 1250 }).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! # What is checked, and when
//! Every message is validated before anything is sent to the database:
//! topic names follow Kafka's rules, payload, key and headers stay under
//! [`Limits`], header names are not reserved, text holds no NUL. A bad message
//! gives an [`Error`] naming the problem, nothing is written, and your
//! transaction is still usable.
//!
//! # Order
//! Rows of one key are published in `seq` (insert) order. When transactions
//! that write the same key serialize, as they do when they update the
//! aggregate's row, that is also their commit order.
//!
//! [consign]: https://github.com/consign-rs/consign

pub mod backoff;
mod error;
mod event;
pub mod headers;
mod message;
mod outbox;
mod partition;
pub mod secrets;
mod store;
mod trace;
mod validate;

pub use error::{Error, Result};
pub use event::Event;
pub use message::Message;
pub use outbox::{Outbox, OutboxBuilder};
pub use partition::{PARTITIONS, partition_for};
pub use store::OutboxConnection;
pub use validate::Limits;

/// Name of the table in which consign records its applied migrations, kept
/// apart from your own `_sqlx_migrations`.
pub const MIGRATIONS_TABLE: &str = "_consign_migrations";

/// A migrator recording itself in [`MIGRATIONS_TABLE`].
macro_rules! consign_migrator {
    ($dir:literal) => {{
        let mut migrator = sqlx::migrate!($dir);
        // Plain assignment would drop the old `Cow` at compile time, which a
        // static cannot do; the old value is a borrowed literal, so forget it.
        std::mem::forget(std::mem::replace(
            &mut migrator.table_name,
            std::borrow::Cow::Borrowed(MIGRATIONS_TABLE),
        ));
        migrator
    }};
}

/// consign's schema migrations for PostgreSQL (`migrations/postgres`), for
/// `#[sqlx::test(migrator = "consign_outbox::MIGRATOR")]` and
/// [`migrate`]. They record themselves in [`MIGRATIONS_TABLE`].
pub static MIGRATOR: sqlx::migrate::Migrator = consign_migrator!("../migrations/postgres");

/// consign's schema for MySQL 8 and MariaDB 10.6+ (`migrations/mysql`;
/// feature `mysql`): the same tables and meaning as on PostgreSQL.
#[cfg(feature = "mysql")]
pub static MYSQL_MIGRATOR: sqlx::migrate::Migrator = consign_migrator!("../migrations/mysql");

/// consign's schema for SQLite (`migrations/sqlite`; feature `sqlite`): the
/// same tables and meaning as on PostgreSQL.
#[cfg(feature = "sqlite")]
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = consign_migrator!("../migrations/sqlite");

/// Applies consign's migrations that are not applied yet, for the pool's
/// database (`PgPool`; `MySqlPool` and `SqlitePool` with the features
/// `mysql` and `sqlite`). Running it again is a no-op; concurrent runs are
/// serialized by a lock (advisory lock on PostgreSQL, `GET_LOCK` on MySQL).
///
/// # Errors
/// The migration error from sqlx (connection, permission, or a changed
/// migration file); on MySQL also a server older than MySQL 8.0 or MariaDB
/// 10.6, named in the error.
pub async fn migrate<P: Migrate + ?Sized>(pool: &P) -> Result<(), sqlx::migrate::MigrateError> {
    pool.run_migrations().await
}

mod migrate;
pub use migrate::Migrate;
