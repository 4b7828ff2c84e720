//! consign in one file: orders and their events written in one transaction,
//! relayed to Kafka, read back from the topic.
//!
//! ```sh
//! cargo run --example quickstart
//! ```
//!
//! PostgreSQL comes from `DATABASE_URL` (default: the local server,
//! `postgres://postgres@127.0.0.1:5432/test`). Kafka is an in-process
//! cluster speaking the real protocol unless `KAFKA_BROKERS` names a broker.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use consign::{Event, Outbox, Relay};
use rdkafka::{
    ClientConfig, Message as _,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    consumer::{Consumer, StreamConsumer},
    message::Headers,
    mocking::MockCluster,
};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;

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

#[tokio::main]
async fn main() -> Result<()> {
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&database_url)
        .await
        .with_context(|| format!("connecting to {database_url} (set DATABASE_URL)"))?;

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
    println!("consign quickstart\n  database: {database_url}\n  kafka:    {brokers}");

    consign::migrate(&pool).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS quickstart_orders (
             id bigint PRIMARY KEY, customer text NOT NULL, total_cents bigint NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let first_id: i64 =
        sqlx::query_scalar("SELECT coalesce(max(id), 0) + 1 FROM quickstart_orders")
            .fetch_one(&pool)
            .await?;

    // The relay runs inside this process; `wake` after commit skips its poll delay.
    let relay = Relay::builder(pool.clone())
        .kafka("bootstrap.servers", &brokers)
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
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO quickstart_orders (id, customer, total_cents) VALUES ($1, $2, $3)",
        )
        .bind(order.order_id)
        .bind(&order.customer)
        .bind(order.total_cents)
        .execute(&mut *tx)
        .await?;
        committed.push(outbox.enqueue_event(&mut *tx, &order).await?);
        tx.commit().await?;
        relay.wake();
    }
    // This order is rolled back: neither its row nor its event may appear.
    let rolled_back = {
        let order = OrderPlaced {
            order_id: first_id + 99,
            customer: "mallory".into(),
            total_cents: 1,
        };
        let mut tx = pool.begin().await?;
        let id = outbox.enqueue_event(&mut *tx, &order).await?;
        tx.rollback().await?;
        id
    };
    println!(
        "wrote {} orders with their events, each in one transaction; rolled one back",
        committed.len()
    );

    let (received, seen) = read_topic(&brokers, &committed).await?;
    println!("received from topic {}:", OrderPlaced::TOPIC);
    for line in &received {
        println!("  {line}");
    }
    relay.shutdown().await?;

    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM consign_outbox")
        .fetch_one(&pool)
        .await?;
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
async fn read_topic(brokers: &str, wanted: &[uuid::Uuid]) -> Result<(Vec<String>, Vec<String>)> {
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
