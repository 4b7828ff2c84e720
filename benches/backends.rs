//! `cargo bench --bench backends`: what the outbox costs a business
//! transaction on each database, beside a hand-written outbox INSERT in the
//! same run. Per backend (PostgreSQL, MariaDB for MySQL, SQLite): an order
//! row alone, with a hand-written INSERT of the event, and with
//! `Outbox::enqueue_event`; `BENCH_CLIENTS` clients (default 8; SQLite,
//! one writer at a time, 4), three interleaved rounds of `BENCH_SECONDS`
//! (default 4) each, medians printed with every round. Needs the MariaDB of
//! `scripts/services.sh mariadb` (or `MYSQL_URL`); SQLite needs nothing.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use consign::{Event, Outbox};
use consign_test_support::backends;
use futures_util::future::join_all;
use serde::Serialize;
use uuid::Uuid;

const TOPIC: &str = "bench.orders";
const ORDERS: &str = "CREATE TABLE bench_orders \
    (id BIGINT PRIMARY KEY, customer VARCHAR(64) NOT NULL, total_cents BIGINT NOT NULL)";

#[derive(Serialize)]
struct OrderPlaced {
    order_id: i64,
    customer: &'static str,
    total_cents: i64,
}

impl Event for OrderPlaced {
    const TOPIC: &'static str = TOPIC;
    const EVENT_TYPE: &'static str = "OrderPlaced";
    fn key(&self) -> Option<String> {
        Some(self.order_id.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Variant {
    NoEvent,
    HandWritten,
    Consign,
}

const VARIANTS: [(Variant, &str); 3] = [
    (Variant::NoEvent, "order only, no event"),
    (Variant::HandWritten, "order + hand-written outbox INSERT"),
    (Variant::Consign, "order + consign enqueue_event"),
];

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `xs` and the rounds, as printed.
fn summary(xs: &[f64]) -> (f64, String) {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rounds = xs
        .iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(", ");
    (sorted[sorted.len() / 2], rounds)
}

/// The benchmark for one backend: `$order` and `$hand` are its INSERTs of
/// the order and of a hand-written outbox row (placeholders and quoting
/// differ); the body is otherwise the same on every backend.
macro_rules! backend_bench {
    ($module:ident, $pool:ty, $order:literal, $hand:literal) => {
        mod $module {
            use super::*;

            async fn one(pool: &$pool, variant: Variant, id: i64, outbox: &Outbox) -> Result<()> {
                let order = OrderPlaced {
                    order_id: id,
                    customer: "ada",
                    total_cents: 1250,
                };
                let mut tx = pool.begin().await?;
                sqlx::query($order)
                    .bind(order.order_id)
                    .bind(order.customer)
                    .bind(order.total_cents)
                    .execute(&mut *tx)
                    .await?;
                match variant {
                    Variant::NoEvent => {}
                    Variant::HandWritten => {
                        let key = order.order_id.to_string();
                        let event_id = Uuid::now_v7();
                        sqlx::query($hand)
                            .bind(event_id)
                            .bind(consign::outbox::partition_for(Some(&key), &event_id))
                            .bind(TOPIC)
                            .bind(key)
                            .bind("OrderPlaced")
                            .bind(serde_json::to_vec(&order)?)
                            .execute(&mut *tx)
                            .await?;
                    }
                    Variant::Consign => {
                        outbox.enqueue_event(&mut *tx, &order).await?;
                    }
                }
                tx.commit().await?;
                Ok(())
            }

            async fn tps(
                pool: &$pool,
                variant: Variant,
                clients: u64,
                seconds: u64,
                ids: &Arc<AtomicI64>,
            ) -> f64 {
                let deadline = Instant::now() + Duration::from_secs(seconds);
                let started = Instant::now();
                let counts = join_all((0..clients).map(|_| {
                    let (pool, ids) = (pool.clone(), Arc::clone(ids));
                    async move {
                        let outbox = Outbox::new();
                        let mut done = 0u64;
                        while Instant::now() < deadline {
                            let id = ids.fetch_add(1, Ordering::Relaxed);
                            one(&pool, variant, id, &outbox).await.expect("transaction");
                            done += 1;
                        }
                        done
                    }
                }))
                .await;
                #[allow(clippy::cast_precision_loss)]
                let total = counts.iter().sum::<u64>() as f64;
                total / started.elapsed().as_secs_f64()
            }

            pub(super) async fn run(pool: &$pool, name: &str, clients: u64) -> Result<f64> {
                let seconds = env_number("BENCH_SECONDS", 4);
                sqlx::query(ORDERS).execute(pool).await?;
                println!("{name}: {clients} clients, 3 interleaved rounds of {seconds} s");
                let ids = Arc::new(AtomicI64::new(1));
                for (variant, _) in VARIANTS {
                    tps(pool, variant, clients, 1, &ids).await;
                }
                let mut results: HashMap<Variant, Vec<f64>> = HashMap::new();
                for round in 0..3 {
                    for i in 0..VARIANTS.len() {
                        let variant = VARIANTS[(i + round) % VARIANTS.len()].0;
                        sqlx::query("DELETE FROM consign_outbox")
                            .execute(pool)
                            .await?;
                        let rate = tps(pool, variant, clients, seconds, &ids).await;
                        results.entry(variant).or_default().push(rate);
                    }
                }
                for (variant, label) in VARIANTS {
                    let (median, rounds) = summary(&results[&variant]);
                    println!("    {label:<40} {median:>9.0} tx/s   (rounds: {rounds})");
                }
                let ratio = summary(&results[&Variant::Consign]).0
                    / summary(&results[&Variant::HandWritten]).0;
                println!("    consign / hand-written = {ratio:.3}   (target >= 0.95)\n");
                Ok(ratio)
            }
        }
    };
}

backend_bench!(
    postgres,
    sqlx::PgPool,
    "INSERT INTO bench_orders (id, customer, total_cents) VALUES ($1, $2, $3)",
    "INSERT INTO consign_outbox (id, partition, topic, key, event_type, payload) \
     VALUES ($1, $2, $3, $4, $5, $6)"
);
backend_bench!(
    mysql,
    sqlx::MySqlPool,
    "INSERT INTO bench_orders (id, customer, total_cents) VALUES (?, ?, ?)",
    "INSERT INTO consign_outbox (id, `partition`, topic, `key`, event_type, payload, headers) \
     VALUES (?, ?, ?, ?, ?, ?, '{}')"
);
backend_bench!(
    sqlite,
    sqlx::SqlitePool,
    "INSERT INTO bench_orders (id, customer, total_cents) VALUES (?, ?, ?)",
    "INSERT INTO consign_outbox (id, \"partition\", topic, \"key\", event_type, payload) \
     VALUES (?, ?, ?, ?, ?, ?)"
);

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let clients = env_number("BENCH_CLIENTS", 8);
    println!(
        "consign outbox per backend ({} CPUs): business transactions/s\n",
        std::thread::available_parallelism()?
    );
    let (pool, name) = backends::postgres().await?;
    let pg = postgres::run(&pool, "PostgreSQL", clients).await;
    backends::drop_postgres(pool, &name).await?;
    let (pool, name) = backends::mysql().await?;
    let my = mysql::run(&pool, "MariaDB (MySQL backend)", clients).await;
    backends::drop_mysql(Some(pool), &name).await?;
    let (pool, _dir) = backends::sqlite().await?;
    let lite = sqlite::run(&pool, "SQLite (WAL, one writer)", clients.min(4)).await;
    println!(
        "consign / hand-written: PostgreSQL {:.3}, MariaDB {:.3}, SQLite {:.3}",
        pg?, my?, lite?
    );
    Ok(())
}
