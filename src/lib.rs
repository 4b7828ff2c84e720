//! # consign
//!
//! A transactional outbox for Rust services on PostgreSQL and Kafka.
//!
//! Writing to your database and then publishing to a broker is two writes
//! without a transaction between them: a crash in between loses the event, a
//! rollback after publishing announces something that never happened. With
//! consign, the event is a row written **in the same transaction** as your
//! business rows ([`Outbox`]); a relay ([`relay`]) ships committed rows to
//! Kafka, in order per key, and deletes them only after the broker has
//! acknowledged. Crashes produce duplicates, never loss; every message
//! carries its id in the `consign-id` header so consumers can drop them.
//!
//! ```no_run
//! use consign::{Message, Outbox};
//!
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! consign::migrate(&pool).await?;
//! let relay = consign::Relay::builder(pool.clone())
//!     .kafka("bootstrap.servers", "localhost:9092")
//!     .build()?
//!     .spawn();
//!
//! let outbox = Outbox::new();
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id, total_cents) VALUES (42, 1250)")
//!     .execute(&mut *tx)
//!     .await?;
//! outbox
//!     .enqueue(&mut *tx, Message::json("orders", "OrderPlaced", &serde_json::json!({"id": 42}))?.with_key("42"))
//!     .await?;
//! tx.commit().await?;
//! relay.wake();
//! # Ok(()) }
//! ```
//!
//! ## Crates
//! - [`outbox`] (`consign-outbox`): the message model and `enqueue`.
//! - [`relay`] (`consign-relay`, feature `relay`, on by default): the relay
//!   as a library; the `consign-relay` binary is the `consign-cli` crate.
//! - [`inbox`] (`consign-inbox`, feature `inbox`, on by default): tower
//!   middleware and a Kafka consumer runner that make each message's effect
//!   happen once.
//!
//! Features `mysql` and `sqlite` add those databases to the outbox
//! (`enqueue`, `migrate`), the relay (`Relay::builder` on a `MySqlPool` or
//! `SqlitePool`) and the inbox (`InboxLayer::new` on one; the handler takes
//! a `Delivery<sqlx::MySql>` or `Delivery<sqlx::Sqlite>`).

pub use consign_outbox as outbox;
pub use consign_outbox::{Event, MIGRATOR, Message, Outbox, migrate};

#[cfg(feature = "inbox")]
pub use consign_inbox as inbox;
#[cfg(feature = "inbox")]
pub use consign_inbox::{Delivery, InboxConsumer, InboxLayer};

#[cfg(feature = "relay")]
pub use consign_relay as relay;
#[cfg(feature = "relay")]
pub use consign_relay::Relay;

/// The README's examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;
