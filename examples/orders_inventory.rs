//! The whole flow: an order service writes each order and its
//! `OrderCreated` event in one transaction; the relay ships the events to
//! Kafka; the inventory service, wrapped in the inbox, reserves stock exactly
//! once per order, even when an event arrives twice.
//!
//! ```sh
//! cargo run --example orders_inventory
//! ```
//!
//! Without `DATABASE_URL` the database is a SQLite file
//! (`consign-orders-inventory.db` in the temporary directory);
//! `DATABASE_URL=postgres://…` or `mysql://…` runs the same code on that
//! server. Kafka is an in-process cluster unless `KAFKA_BROKERS` names a
//! broker.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use consign::inbox::{BoxError, Delivery, InboxBackend, InboxConsumer, InboxLayer};
use consign::{Event, Message, Outbox, Relay, relay::DatabasePool};
use rdkafka::mocking::MockCluster;
use serde::{Deserialize, Serialize};
use sqlx::{
    MySql, MySqlPool, PgPool, Pool, Postgres, Sqlite, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode},
};
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

/// Both services' SQL on one database. The code is the same on all three
/// (see `shop_on!` below); only placeholders and types differ.
trait Shop<DB: InboxBackend> {
    /// consign's schema and the example's tables (fresh); with
    /// `forget_offsets`, the inbox's stored offsets of an earlier run too.
    async fn setup(&self, forget_offsets: bool) -> Result<()>;
    /// Order service: the order row and its event commit together.
    async fn place_order(&self, outbox: &Outbox, order: &OrderCreated) -> Result<Message>;
    /// Inventory service handler: runs inside the inbox's transaction.
    fn reserve_stock(
        delivery: Delivery<DB>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send + 'static;
    /// Stock per product.
    async fn stock(&self) -> Result<Vec<(String, i32)>>;
}

macro_rules! shop_on {
    ($db:ty, $int:literal, [$p1:literal, $p2:literal, $p3:literal]) => {
        impl Shop<$db> for Pool<$db> {
            async fn setup(&self, forget_offsets: bool) -> Result<()> {
                consign::migrate(self).await?;
                if forget_offsets {
                    sqlx::query(concat!(
                        "DELETE FROM consign_inbox_offsets WHERE consumer_group = ", $p1
                    ))
                    .bind(CONSUMER)
                    .execute(self)
                    .await?;
                }
                for statement in [
                    "DROP TABLE IF EXISTS example_orders".to_owned(),
                    "DROP TABLE IF EXISTS example_stock".to_owned(),
                    format!("CREATE TABLE example_orders (id BIGINT PRIMARY KEY, sku VARCHAR(64) NOT NULL, quantity {} NOT NULL)", $int),
                    format!("CREATE TABLE example_stock (sku VARCHAR(64) PRIMARY KEY, available {} NOT NULL)", $int),
                    "INSERT INTO example_stock VALUES ('apple', 100), ('pear', 100)".to_owned(),
                ] {
                    sqlx::query(sqlx::AssertSqlSafe(statement)).execute(self).await?;
                }
                Ok(())
            }

            async fn place_order(&self, outbox: &Outbox, order: &OrderCreated) -> Result<Message> {
                let mut tx = self.begin().await?;
                sqlx::query(concat!(
                    "INSERT INTO example_orders (id, sku, quantity) VALUES (", $p1, ", ", $p2, ", ", $p3, ")"
                ))
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

            async fn reserve_stock(mut delivery: Delivery<$db>) -> Result<(), BoxError> {
                let order: OrderCreated = delivery.json()?;
                let updated = sqlx::query(concat!(
                    "UPDATE example_stock SET available = available - ", $p1, " WHERE sku = ", $p2
                ))
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

            async fn stock(&self) -> Result<Vec<(String, i32)>> {
                Ok(
                    sqlx::query_as("SELECT sku, available FROM example_stock ORDER BY sku")
                        .fetch_all(self)
                        .await?,
                )
            }
        }
    };
}

shop_on!(Postgres, "INT", ["$1", "$2", "$3"]);
shop_on!(MySql, "INT", ["?", "?", "?"]);
shop_on!(Sqlite, "INTEGER", ["?", "?", "?"]);

#[tokio::main]
async fn main() -> Result<()> {
    let connect = |url: &str| format!("connecting to {url} (set DATABASE_URL)");
    match std::env::var("DATABASE_URL") {
        Ok(url) if url.starts_with("mysql:") || url.starts_with("mariadb:") => {
            let url = url.replacen("mariadb:", "mysql:", 1);
            let pool = MySqlPool::connect(&url)
                .await
                .with_context(|| connect(&url))?;
            run(pool, &url).await
        }
        Ok(url) if url.starts_with("sqlite:") => {
            let options: SqliteConnectOptions = url.parse()?;
            run(sqlite(options).await?, &url).await
        }
        Ok(url) => {
            let pool = PgPool::connect(&url).await.with_context(|| connect(&url))?;
            run(pool, &url).await
        }
        Err(_) => {
            let file = std::env::temp_dir().join("consign-orders-inventory.db");
            let options = SqliteConnectOptions::new()
                .filename(&file)
                .create_if_missing(true);
            let described = format!("SQLite file {} (no DATABASE_URL)", file.display());
            run(sqlite(options).await?, &described).await
        }
    }
}

/// SQLite shared by the services and the relay: WAL and a busy timeout.
async fn sqlite(options: SqliteConnectOptions) -> Result<SqlitePool> {
    let options = options
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    Ok(SqlitePool::connect_with(options).await?)
}

async fn run<DB>(pool: Pool<DB>, database: &str) -> Result<()>
where
    DB: InboxBackend,
    Pool<DB>: Shop<DB> + Into<DatabasePool>,
{
    let mock;
    let brokers = if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
        pool.setup(false).await?;
        brokers
    } else {
        mock = MockCluster::new(1)?;
        mock.create_topic(TOPIC, 3, 1)?;
        // A new cluster starts every topic at offset 0: forget the offsets
        // an earlier run stored for the old one.
        pool.setup(true).await?;
        mock.bootstrap_servers()
    };
    println!("orders -> inventory\n  database: {database}\n  kafka:    {brokers}");

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
        .service_fn(<Pool<DB> as Shop<DB>>::reserve_stock);
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
        let message = pool.place_order(&outbox, &order).await?;
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
    let stock = pool.stock().await?;
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
