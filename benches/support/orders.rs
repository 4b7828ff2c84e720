//! What `benches/backends.rs` and section (a) of `benches/throughput.rs`
//! share: the order event, and the business-transaction benchmark for one
//! database (`backend_bench!`): an order row alone, with a hand-written
//! outbox INSERT, and with `Outbox::enqueue_event`, medians of three
//! interleaved rounds.

use consign::Event;
use serde::Serialize;

pub(crate) const TOPIC: &str = "bench.orders";
pub(crate) const ORDERS: &str = "CREATE TABLE IF NOT EXISTS bench_orders \
    (id BIGINT PRIMARY KEY, customer VARCHAR(64) NOT NULL, total_cents BIGINT NOT NULL)";

#[derive(Serialize)]
pub(crate) struct OrderPlaced {
    pub(crate) order_id: i64,
    pub(crate) customer: &'static str,
    pub(crate) total_cents: i64,
}

impl Event for OrderPlaced {
    const TOPIC: &'static str = TOPIC;
    const EVENT_TYPE: &'static str = "OrderPlaced";
    fn key(&self) -> Option<String> {
        Some(self.order_id.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Variant {
    NoEvent,
    HandWritten,
    Consign,
}

pub(crate) const VARIANTS: [(Variant, &str); 3] = [
    (Variant::NoEvent, "order only, no event"),
    (Variant::HandWritten, "order + hand-written outbox INSERT"),
    (Variant::Consign, "order + consign enqueue_event"),
];

pub(crate) fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `xs` and the rounds, as printed.
pub(crate) fn summary(xs: &[f64]) -> (f64, String) {
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
/// differ), `$clear` empties the outbox between rounds; the body is
/// otherwise the same on every backend.
macro_rules! backend_bench {
    ($module:ident, $pool:ty, $order:literal, $hand:literal, $clear:literal) => {
        mod $module {
            use std::{
                collections::HashMap,
                sync::{
                    Arc,
                    atomic::{AtomicI64, Ordering},
                },
                time::{Duration, Instant},
            };

            use anyhow::Result;
            use consign::Outbox;
            use futures_util::future::join_all;
            use uuid::Uuid;

            use crate::orders::{
                ORDERS, OrderPlaced, TOPIC, VARIANTS, Variant, env_number, summary,
            };

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
                        sqlx::query($clear).execute(pool).await?;
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
