//! The relay half of [consign]: moves committed outbox rows to Kafka.
//!
//! Rows written with `consign-outbox` wait in `consign_outbox` until a relay
//! publishes them. The relay reads rows in `seq` order, produces them with an
//! idempotent producer (`acks=all`), and deletes them only after the broker
//! has acknowledged. Every failure mode leaves rows in the table:
//!
//! | what happens | what the relay does |
//! |---|---|
//! | crash or SIGKILL mid-batch | unacknowledged rows are sent again on restart (duplicates, never loss) |
//! | brokers down | librdkafka retries; rows stay; the relay resumes by itself |
//! | database connection lost | the batch is retried with backoff on a new connection |
//! | the broker refuses a row | the row keeps `attempts` and `last_error`, is retried with backoff, and holds back later rows of its key only |
//! | SIGTERM | the batch in flight is finished (or left for later), leases released, exit 0 |
//! | another relay starts or stops | the 32 outbox partitions are re-divided within ±1 of even ([`lease`]) |
//! | a relay stalls past its lease | its partitions move; its late deletes are refused by the lease epoch |
//!
//! Each message carries the headers `consign-id` (its UUID v7, for
//! deduplication), `consign-event-type`, `traceparent`/`tracestate` when the
//! writer had a trace, then the user's headers. Its Kafka key is the row's
//! key and its timestamp the row's `created_at`.
//!
//! # Embedding
//! A service can run the relay in-process and wake it right after commit:
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use consign_outbox::{Message, Outbox};
//! use consign_relay::Relay;
//!
//! let relay = Relay::builder(pool.clone())
//!     .kafka("bootstrap.servers", "localhost:9092")
//!     .build()?
//!     .spawn();
//!
//! let mut tx = pool.begin().await?;
//! Outbox::new()
//!     .enqueue(&mut *tx, Message::new("orders", "OrderPlaced", b"{}".to_vec()))
//!     .await?;
//! tx.commit().await?;
//! relay.wake(); // published within milliseconds
//!
//! relay.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # As a process
//! The `consign-relay` binary comes from the `consign-cli` crate (the
//! sqlx-cli pattern, so that this library pulls no command-line, config-file
//! or HTTP dependencies): `consign-relay migrate` creates the tables,
//! `consign-relay run` publishes until SIGTERM, `consign-relay status` shows
//! relays, leases and backlog. Its configuration file is [`Config`]; see
//! `cli/reference.toml`. Nothing wakes it after a commit: while the outbox
//! is empty it probes for new rows every `relay.idle-probe-interval` (one
//! indexed query, 20 ms in production) between its backed-off polls, so an
//! event still ships within tens of milliseconds
//! ([`RelaySettings::idle_probe_interval`]).
//!
//! [consign]: https://github.com/consign-rs/consign

mod builder;
pub mod config;
mod deadline;
mod error;
mod handle;
pub mod health;
pub mod lease;
pub mod metrics;
mod producer_config;
mod publish;
mod relay;
pub mod retention;
pub mod status;
mod store;
mod txn;

pub use builder::RelayBuilder;
pub use config::{Config, Profile, RelaySettings};
pub use consign_outbox::headers;
pub use deadline::DEFAULT_DATABASE_DEADLINE;
pub use error::{Error, Result};
pub use handle::{RelayHandle, RelayStats, Waker};
pub use health::{Check, Health, Liveness, Readiness, Stall};
pub use producer_config::{PRODUCER_DEFAULTS, check_kafka_config};
pub use relay::Relay;
pub use status::{Status, status};
pub use store::DatabasePool;

pub use rdkafka::ClientConfig;
