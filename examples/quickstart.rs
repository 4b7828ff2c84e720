//! consign in one file: orders and their events written in one transaction,
//! relayed to Kafka, read back from the topic.
//!
//! ```sh
//! cargo run --example quickstart
//! ```
//!
//! Runs on a machine that has only Rust: without `DATABASE_URL` the
//! database is a SQLite file (`consign-quickstart.db` in the temporary
//! directory), and Kafka is an in-process cluster speaking the real protocol
//! unless `KAFKA_BROKERS` names a broker. `DATABASE_URL=postgres://…` or
//! `mysql://…` runs the same code on that server.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use consign::{Event, Outbox, Relay, relay::DatabasePool};
use rdkafka::{
    ClientConfig, Message as _,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    consumer::{Consumer, StreamConsumer},
    message::Headers,
    mocking::MockCluster,
};
use serde::Serialize;
use sqlx::{
    MySqlPool, PgPool, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode},
};
use uuid::Uuid;

/// The event each order produces.
#[derive(Serialize)]
struct OrderPlaced {
    order_id: i64,
    customer: String,
    total_cents: i64,
}

impl Event for OrderPlaced {
    const TOPIC: &'static str = "quickstart.orders";
    const EVENT_TYPE: &'static str = "OrderPlaced";
    fn key(&self) -> Option<String> {
        Some(format!("order-{}", self.order_id))
    }
}

/// The quickstart's business table and its one write, on each database.
/// The code is the same on all three; only SQL placeholders differ.
trait Orders: Clone + Into<DatabasePool> {
    /// Creates the table; returns the next free order id.
    async fn prepare(&self) -> Result<i64>;
    /// Inserts `order` and enqueues its event in one transaction, committed
    /// or rolled back; returns the event's id.
    async fn place(&self, outbox: &Outbox, order: &OrderPlaced, commit: bool) -> Result<Uuid>;
    /// Rows left in the outbox.
    async fn outbox_len(&self) -> Result<i64>;
}

macro_rules! orders_on {
    ($pool:ty, $insert:literal) => {
        impl Orders for $pool {
            async fn prepare(&self) -> Result<i64> {
                consign::migrate(self).await?;
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS quickstart_orders (
                         id BIGINT PRIMARY KEY, customer TEXT NOT NULL, total_cents BIGINT NOT NULL)",
                )
                .execute(self)
                .await?;
                Ok(sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) + 1 FROM quickstart_orders")
                    .fetch_one(self)
                    .await?)
            }

            async fn place(&self, outbox: &Outbox, order: &OrderPlaced, commit: bool) -> Result<Uuid> {
                let mut tx = self.begin().await?;
                sqlx::query($insert)
                    .bind(order.order_id)
                    .bind(&order.customer)
                    .bind(order.total_cents)
                    .execute(&mut *tx)
                    .await?;
                let id = outbox.enqueue_event(&mut *tx, order).await?;
                if commit {
                    tx.commit().await?;
                } else {
                    tx.rollback().await?;
                }
                Ok(id)
            }

            async fn outbox_len(&self) -> Result<i64> {
                Ok(sqlx::query_scalar("SELECT COUNT(*) FROM consign_outbox")
                    .fetch_one(self)
                    .await?)
            }
        }
    };
}

orders_on!(
    PgPool,
    "INSERT INTO quickstart_orders (id, customer, total_cents) VALUES ($1, $2, $3)"
);
orders_on!(
    MySqlPool,
    "INSERT INTO quickstart_orders (id, customer, total_cents) VALUES (?, ?, ?)"
);
orders_on!(
    SqlitePool,
    "INSERT INTO quickstart_orders (id, customer, total_cents) VALUES (?, ?, ?)"
);

#[tokio::main]
async fn main() -> Result<()> {
    // An in-process Kafka cluster, unless a broker was given.
    let mock;
    let brokers = match std::env::var("KAFKA_BROKERS") {
        Ok(brokers) => {
            create_topic(&brokers).await?;
            brokers
        }
        Err(_) => {
            mock = MockCluster::new(1)?;
            mock.create_topic(OrderPlaced::TOPIC, 3, 1)?;
            mock.bootstrap_servers()
        }
    };
    let connect = |url: &str| format!("connecting to {url} (set DATABASE_URL)");
    match std::env::var("DATABASE_URL") {
        Ok(url) if url.starts_with("mysql:") || url.starts_with("mariadb:") => {
            let url = url.replacen("mariadb:", "mysql:", 1);
            let pool = MySqlPool::connect(&url)
                .await
                .with_context(|| connect(&url))?;
            run(pool, &url, &brokers).await
        }
        Ok(url) if url.starts_with("sqlite:") => {
            let options: SqliteConnectOptions = url.parse()?;
            run(sqlite(options).await?, &url, &brokers).await
        }
        Ok(url) => {
            let pool = PgPool::connect(&url).await.with_context(|| connect(&url))?;
            run(pool, &url, &brokers).await
        }
        Err(_) => {
            let file = std::env::temp_dir().join("consign-quickstart.db");
            let options = SqliteConnectOptions::new()
                .filename(&file)
                .create_if_missing(true);
            let described = format!("SQLite file {} (no DATABASE_URL)", file.display());
            run(sqlite(options).await?, &described, &brokers).await
        }
    }
}

/// SQLite as a relay shares it with the application: WAL (readers beside
/// the one writer) and a busy timeout, so writers wait for each other.
async fn sqlite(options: SqliteConnectOptions) -> Result<SqlitePool> {
    let options = options
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    Ok(SqlitePool::connect_with(options).await?)
}

async fn run(pool: impl Orders, database: &str, brokers: &str) -> Result<()> {
    println!("consign quickstart\n  database: {database}\n  kafka:    {brokers}");
    let first_id = pool.prepare().await?;

    // The relay runs inside this process; `wake` after commit skips its poll delay.
    let relay = Relay::builder(pool.clone())
        .kafka("bootstrap.servers", brokers)
        .build()?
        .spawn();
    let outbox = Outbox::new();

    let customers = ["ada", "grace", "edsger", "barbara", "ken"];
    let mut committed = Vec::new();
    for (i, customer) in (0..).zip(customers) {
        let order = OrderPlaced {
            order_id: first_id + i,
            customer: customer.into(),
            total_cents: 1000 + i * 250,
        };
        committed.push(pool.place(&outbox, &order, true).await?);
        relay.wake();
    }
    // This order is rolled back: neither its row nor its event may appear.
    let mallory = OrderPlaced {
        order_id: first_id + 99,
        customer: "mallory".into(),
        total_cents: 1,
    };
    let rolled_back = pool.place(&outbox, &mallory, false).await?;
    println!(
        "wrote {} orders with their events, each in one transaction; rolled one back",
        committed.len()
    );

    let (received, seen) = read_topic(brokers, &committed).await?;
    println!("received from topic {}:", OrderPlaced::TOPIC);
    for line in &received {
        println!("  {line}");
    }
    relay.shutdown().await?;

    let left = pool.outbox_len().await?;
    if seen.contains(&rolled_back.to_string()) {
        bail!("the rolled-back order's event was published");
    }
    println!(
        "all {} committed events arrived; the rolled-back one did not; {left} rows left in the outbox",
        committed.len()
    );
    Ok(())
}

/// Reads the topic from the start until every id in `wanted` has arrived.
/// Returns a line per wanted message and the ids of all messages read.
async fn read_topic(brokers: &str, wanted: &[Uuid]) -> Result<(Vec<String>, Vec<String>)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("quickstart-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[OrderPlaced::TOPIC])?;
    let (mut lines, mut seen) = (Vec::new(), Vec::new());
    let mut missing: Vec<String> = wanted.iter().map(ToString::to_string).collect();
    while !missing.is_empty() {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .context("events did not arrive within 30 s")??;
        let header = |name: &str| {
            message.headers().and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(String::from_utf8_lossy)
            })
        };
        let id = header(consign::outbox::headers::ID)
            .unwrap_or_default()
            .into_owned();
        seen.push(id.clone());
        if let Some(pos) = missing.iter().position(|m| *m == id) {
            missing.swap_remove(pos);
            lines.push(format!(
                "partition {} offset {} key={} type={} consign-id={id} payload={}",
                message.partition(),
                message.offset(),
                String::from_utf8_lossy(message.key().unwrap_or_default()),
                header("consign-event-type").unwrap_or_default(),
                String::from_utf8_lossy(message.payload().unwrap_or_default()),
            ));
        }
    }
    Ok((lines, seen))
}

async fn create_topic(brokers: &str) -> Result<()> {
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let topic = NewTopic::new(OrderPlaced::TOPIC, 3, TopicReplication::Fixed(1));
    // Already existing is fine.
    let _ = admin.create_topics(&[topic], &AdminOptions::new()).await?;
    Ok(())
}
