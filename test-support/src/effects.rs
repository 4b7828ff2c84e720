//! A countable effect for inbox tests: each handled message inserts a row
//! into `test_effects`. Without deduplication a redelivered message would
//! insert a second row, so "exactly once" is checkable with SQL.

use std::time::Duration;

use anyhow::{Context, Result};
use consign_inbox::{BoxError, ConsumerError, Delivery, InboxConsumer, InboxLayer, Received};
use rdkafka::{
    ClientConfig,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// An `InboxConsumer` running in this process (short session timeout and
/// heartbeats so group changes are quick; batches of up to 200).
pub struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ConsumerError>>,
}

impl Running {
    /// Starts consuming `topic` with `service` behind `inbox`.
    ///
    /// # Panics
    /// If the consumer cannot be built.
    pub fn start<S, DB>(inbox: &InboxLayer<DB>, service: S, bootstrap: &str, topic: &str) -> Self
    where
        DB: consign_inbox::InboxBackend,
        S: tower::Service<Vec<Received>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
    {
        let consumer = InboxConsumer::builder(inbox)
            .topic(topic)
            .kafka("bootstrap.servers", bootstrap)
            .kafka("session.timeout.ms", "6000")
            .kafka("heartbeat.interval.ms", "300")
            .max_batch(200)
            .build()
            .expect("consumer settings are valid");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(consumer.run(service, shutdown.clone()));
        Self { shutdown, task }
    }

    /// Stops the consumer and waits for it.
    ///
    /// # Panics
    /// If the consumer task failed.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("consumer task")
            .expect("consumer ran without error");
    }
}

/// The payload of a test message: its key and its number within the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The key's number.
    pub key: u32,
    /// Position within the key, from 0.
    pub n: u32,
}

/// Creates `test_effects` (if missing).
///
/// # Errors
/// On a database error.
pub async fn create_table(pool: &PgPool) -> Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS test_effects (
             seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             message_id uuid    NOT NULL,
             key        integer NOT NULL,
             n          integer NOT NULL)",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Defines the handler for one backend: decodes a [`Step`] and records the
/// effect in the inbox's transaction (same body, the backend's SQL).
macro_rules! record_on {
    ($(#[$meta:meta])* $name:ident, $db:ty, $insert:literal) => {
        $(#[$meta])*
        ///
        /// # Errors
        /// Undecodable payload (dead letter) or database error (retry).
        pub async fn $name(mut delivery: Delivery<$db>) -> Result<(), BoxError> {
            let step: Step = delivery.json()?;
            let id = delivery.id();
            sqlx::query($insert)
                .bind(id)
                .bind(i32::try_from(step.key)?)
                .bind(i32::try_from(step.n)?)
                .execute(delivery.conn())
                .await?;
            Ok(())
        }
    };
}

record_on!(
    /// The handler on PostgreSQL.
    record,
    sqlx::Postgres,
    "INSERT INTO test_effects (message_id, key, n) VALUES ($1, $2, $3)"
);
record_on!(
    /// The handler on MariaDB/MySQL.
    record_mysql,
    sqlx::MySql,
    "INSERT INTO test_effects (message_id, `key`, n) VALUES (?, ?, ?)"
);
record_on!(
    /// The handler on SQLite.
    record_sqlite,
    sqlx::Sqlite,
    "INSERT INTO test_effects (message_id, \"key\", n) VALUES (?, ?, ?)"
);

/// What the effects table says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Rows.
    pub effects: i64,
    /// Distinct message ids.
    pub distinct: i64,
    /// Keys whose effects are not in increasing `n` order.
    pub out_of_order_keys: i64,
}

/// Counts the effects.
///
/// # Errors
/// On a database error.
pub async fn tally(pool: &PgPool) -> Result<Tally> {
    let (effects, distinct): (i64, i64) = sqlx::query_as(TALLY).fetch_one(pool).await?;
    let out_of_order_keys: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(OUT_OF_ORDER.replace('`', "\"")))
            .fetch_one(pool)
            .await?;
    Ok(Tally {
        effects,
        distinct,
        out_of_order_keys,
    })
}

/// Effects and distinct message ids (every backend).
pub(crate) const TALLY: &str = "SELECT count(*), count(DISTINCT message_id) FROM test_effects";

/// Keys whose effects are out of order, in MySQL's quoting (the others
/// quote with `"`).
pub(crate) const OUT_OF_ORDER: &str = "SELECT count(DISTINCT `key`) FROM (
     SELECT `key`, n, lag(n) OVER (PARTITION BY `key` ORDER BY seq) AS before_n
     FROM test_effects) t
 WHERE before_n IS NOT NULL AND n <= before_n";

/// One test message: id (`consign-id` header; `None` for none), key and
/// payload.
#[derive(Debug, Clone)]
pub struct TestMessage {
    /// The `consign-id` header.
    pub id: Option<Uuid>,
    /// Kafka key.
    pub key: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

impl TestMessage {
    /// A [`Step`] message with a fresh id, keyed `key-{key}`.
    ///
    /// # Panics
    /// Never (a `Step` always serializes).
    #[must_use]
    pub fn step(key: u32, n: u32) -> Self {
        Self {
            id: Some(Uuid::now_v7()),
            key: format!("key-{key}"),
            payload: serde_json::to_vec(&Step { key, n }).expect("serialize"),
        }
    }

    /// `count` keys × `per_key` steps, interleaved key by key.
    #[must_use]
    pub fn stream(keys: u32, per_key: u32) -> Vec<Self> {
        (0..per_key)
            .flat_map(|n| (0..keys).map(move |key| Self::step(key, n)))
            .collect()
    }
}

/// Produces `messages` in order with an idempotent producer and waits for
/// every acknowledgement.
///
/// # Errors
/// If the broker refuses a message.
pub async fn produce(bootstrap: &str, topic: &str, messages: &[TestMessage]) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .context("test producer")?;
    let sends = messages.iter().map(|m| {
        let id = m.id.map(|id| id.to_string());
        let mut headers = OwnedHeaders::new();
        if let Some(id) = &id {
            headers = headers.insert(Header {
                key: consign_inbox::headers::ID,
                value: Some(id),
            });
        }
        let record = FutureRecord::to(topic)
            .key(&m.key)
            .payload(&m.payload)
            .headers(headers);
        producer.send(record, Duration::from_secs(30))
    });
    for result in futures_util::future::join_all(sends).await {
        result
            .map_err(|(e, _)| e)
            .context("producing a test message")?;
    }
    Ok(())
}
