//! # consign-inbox
//!
//! Exactly-once *effect* for Kafka consumers. Kafka and the consign relay
//! deliver at least once; the inbox makes a handler's database writes
//! happen once per message id by committing them in one transaction with a
//! record of the id (and of the message's offset).
//!
//! - [`InboxLayer`] / [`InboxService`]: the tower middleware. The handler is
//!   any `tower::Service<Delivery>`; [`Delivery::conn`] is the open
//!   transaction.
//! - [`InboxConsumer`]: runs an inbox service over a Kafka consumer group,
//!   partitions in parallel, each in order, resuming from the offsets stored
//!   in the database.
//! - Failures: errors and panics are retried with backoff
//!   ([`RetryPolicy`]), then the message goes to `consign_dead_letters`
//!   (and optionally `<topic>.dlq`) with the reason; undecodable or
//!   rejected messages go there at once. Later messages keep flowing.
//!
//! - Metrics through the `metrics` facade: see [`metrics`].
//! - Tracing: each handler attempt runs in a `consign.handle` span that
//!   continues the writer's trace from the `traceparent`/`tracestate`
//!   headers (with `tracing-opentelemetry` installed).
//!
//! The tables come with consign's migrations (`consign_outbox::migrate`).
//!
//! Databases: PostgreSQL, and with the features `mysql` and `sqlite`,
//! MySQL 8 / MariaDB 10.6+ and SQLite ([`InboxBackend`]). The inbox runs on
//! the pool it is given; the handler's [`Delivery`] carries that database's
//! transaction (`Delivery` is `Delivery<sqlx::Postgres>`; on MySQL write
//! `Delivery<sqlx::MySql>`, on SQLite `Delivery<sqlx::Sqlite>`).
//!
//! ```no_run
//! use consign_inbox::{Delivery, InboxConsumer, InboxLayer};
//! use tokio_util::sync::CancellationToken;
//! use tower::ServiceBuilder;
//!
//! #[derive(serde::Deserialize)]
//! struct OrderCreated { sku: String, quantity: i32 }
//!
//! async fn reserve(mut d: Delivery) -> Result<(), consign_inbox::BoxError> {
//!     let order: OrderCreated = d.json()?;
//!     sqlx::query("UPDATE stock SET available = available - $1 WHERE sku = $2")
//!         .bind(order.quantity)
//!         .bind(&order.sku)
//!         .execute(d.conn())
//!         .await?;
//!     Ok(())
//! }
//!
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let inbox = InboxLayer::new(pool, "inventory")?;
//! let service = ServiceBuilder::new()
//!     .layer(inbox.clone())
//!     .timeout(std::time::Duration::from_secs(10))
//!     .service_fn(reserve);
//! InboxConsumer::builder(&inbox)
//!     .topic("orders")
//!     .kafka("bootstrap.servers", "localhost:9092")
//!     .build()?
//!     .run(service, CancellationToken::new())
//!     .await?;
//! # Ok(()) }
//! ```

mod consumer;
pub mod dead_letters;
mod delivery;
mod error;
mod layer;
pub mod metrics;
mod received;
pub mod retention;
mod service;
mod store;
mod trace;

pub use consign_outbox::headers;
pub use consumer::{InboxConsumer, InboxConsumerBuilder};
pub use delivery::{DecodeError, Delivery, Rejected};
pub use error::{BoxError, ConsumerError, Error, InboxError};
pub use layer::{InboxLayer, InboxLayerBuilder, InboxStats, MissingId, RetryPolicy};
pub use received::Received;
pub use service::{BatchOutcome, InboxService, Outcome};
pub use store::InboxBackend;
