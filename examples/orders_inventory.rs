//! The whole flow: an order service writes each order and its
//! `OrderCreated` event in one transaction; the relay ships the events to
//! Kafka; the inventory service, wrapped in the inbox, reserves stock exactly
//! once per order, even when an event arrives twice.
//!
//! ```sh
//! cargo run --example orders_inventory
//! ```
//!
//! PostgreSQL from `DATABASE_URL` (default: the local server); Kafka is an
//! in-process cluster unless `KAFKA_BROKERS` names a broker.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use consign::inbox::{BoxError, Delivery, InboxConsumer, InboxLayer};
use consign::{Event, Message, Outbox, Relay};
use rdkafka::mocking::MockCluster;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

const TOPIC: &str = "example.orders";
const CONSUMER: &str = "example-inventory";

/// Published by the order service.
#[derive(Debug, Serialize, Deserialize)]
struct OrderCreated {
    order_id: i64,
    sku: String,
    quantity: i32,
}

impl Event for OrderCreated {
    const TOPIC: &'static str = TOPIC;
    const EVENT_TYPE: &'static str = "OrderCreated";
    fn key(&self) -> Option<String> {
        // Events of one product stay in order.
        Some(self.sku.clone())
    }
}

/// Order service: the order row and its event commit together.
async fn place_order(pool: &PgPool, outbox: &Outbox, order: &OrderCreated) -> Result<Message> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO example_orders (id, sku, quantity) VALUES ($1, $2, $3)")
        .bind(order.order_id)
        .bind(&order.sku)
        .bind(order.quantity)
        .execute(&mut *tx)
        .await?;
    let message = Message::from_event(order)?;
    outbox.enqueue(&mut *tx, message.clone()).await?;
    tx.commit().await?;
    Ok(message)
}

/// Inventory service handler: runs inside the inbox's transaction.
async fn reserve_stock(mut delivery: Delivery) -> Result<(), BoxError> {
    let order: OrderCreated = delivery.json()?;
    let updated = sqlx::query("UPDATE example_stock SET available = available - $1 WHERE sku = $2")
        .bind(order.quantity)
        .bind(&order.sku)
        .execute(delivery.conn())
        .await?;
    if updated.rows_affected() == 0 {
        let reason = format!("unknown sku {}", order.sku);
        return Err(delivery.reject(reason).into());
    }
    println!(
        "  inventory: order {} reserves {} x {}",
        order.order_id, order.quantity, order.sku
    );
    Ok(())
}

async fn stock(pool: &PgPool) -> Result<Vec<(String, i32)>> {
    Ok(
        sqlx::query_as("SELECT sku, available FROM example_stock ORDER BY sku")
            .fetch_all(pool)
            .await?,
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&database_url)
        .await
        .with_context(|| format!("connecting to {database_url} (set DATABASE_URL)"))?;
    consign::migrate(&pool).await?;

    let mock;
    let brokers = if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
        brokers
    } else {
        mock = MockCluster::new(1)?;
        mock.create_topic(TOPIC, 3, 1)?;
        // A new cluster starts every topic at offset 0: forget the offsets
        // an earlier run stored for the old one.
        sqlx::query("DELETE FROM consign_inbox_offsets WHERE consumer_group = $1")
            .bind(CONSUMER)
            .execute(&pool)
            .await?;
        mock.bootstrap_servers()
    };
    for statement in [
        "DROP TABLE IF EXISTS example_orders, example_stock",
        "CREATE TABLE example_orders (id bigint PRIMARY KEY, sku text NOT NULL, quantity int NOT NULL)",
        "CREATE TABLE example_stock (sku text PRIMARY KEY, available int NOT NULL)",
        "INSERT INTO example_stock VALUES ('apple', 100), ('pear', 100)",
    ] {
        sqlx::query(statement).execute(&pool).await?;
    }
    println!("orders -> inventory\n  database: {database_url}\n  kafka:    {brokers}");

    // The relay, embedded in the order service.
    let relay = Relay::builder(pool.clone())
        .kafka("bootstrap.servers", &brokers)
        .build()?
        .spawn();

    // The inventory service: handler wrapped in the inbox, fed by Kafka.
    let inbox = InboxLayer::new(pool.clone(), CONSUMER)?;
    let service = ServiceBuilder::new()
        .layer(inbox.clone())
        .timeout(Duration::from_secs(10))
        .service_fn(reserve_stock);
    let shutdown = CancellationToken::new();
    let consumer = InboxConsumer::builder(&inbox)
        .topic(TOPIC)
        .kafka("bootstrap.servers", &brokers)
        .build()?;
    let consuming = tokio::spawn(consumer.run(service, shutdown.clone()));

    let outbox = Outbox::new();
    let orders = [("apple", 3), ("pear", 5), ("apple", 2), ("pear", 1)];
    let mut first = None;
    for (id, (sku, quantity)) in (1..).zip(orders) {
        let order = OrderCreated {
            order_id: id,
            sku: sku.into(),
            quantity,
        };
        let message = place_order(&pool, &outbox, &order).await?;
        first.get_or_insert(message);
        relay.wake();
        println!("  orders: placed order {id} ({quantity} x {sku})");
    }
    // As if a relay had crashed after publishing order 1 but before deleting
    // its row: the same event (same id) is published again.
    let again = first.context("no order placed")?;
    let mut conn = pool.acquire().await?;
    outbox.enqueue(&mut *conn, again).await?;
    relay.wake();
    println!("  (order 1's event is published a second time)");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while inbox.stats().handled + inbox.stats().duplicates < 5 {
        if tokio::time::Instant::now() > deadline {
            bail!("events did not arrive: {:?}", inbox.stats());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    consuming.await??;
    relay.shutdown().await?;

    let stats = inbox.stats();
    let stock = stock(&pool).await?;
    println!(
        "inbox: {} handled, {} duplicate skipped",
        stats.handled, stats.duplicates
    );
    println!("stock: {stock:?}");
    ensure!(
        stats.handled == 4 && stats.duplicates == 1,
        "unexpected {stats:?}"
    );
    ensure!(
        stock == [("apple".to_owned(), 95), ("pear".to_owned(), 94)],
        "stock reserved more than once"
    );
    println!("each order reserved its stock exactly once");
    Ok(())
}
