//! consign benchmarks. `cargo bench --bench throughput` prints, in one run:
//!
//! (a) business transactions per second: an order row alone, with a
//!     hand-written outbox INSERT, and with `Outbox::enqueue_event`;
//! (b) relay throughput draining a backlog of 256-byte events, beside the raw
//!     producer (same messages straight from memory) as the ceiling;
//! (c) commit -> broker-ack latency at a steady 2 000 events/s with the
//!     embedded relay, woken after commit and polling only;
//! (d) draining a backlog with 1, 2 and 3 relays sharing the outbox through
//!     leases, with Kafka transactions off and on.
//!
//! Kafka is librdkafka's in-process mock cluster. Scale with
//! `BENCH_BACKLOG` (default 200000), `BENCH_SCALE_BACKLOG` (default 100000
//! per run of (d)) and `BENCH_SECONDS`
//! (seconds per measured run, default 4 for (a) and 10 for (c)).

use std::{
    collections::HashMap,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use consign::{Event, Message, Outbox, Relay};
use futures_util::future::join_all;
use hdrhistogram::Histogram;
use rdkafka::{
    ClientConfig,
    message::{Header, OwnedHeaders},
    mocking::MockCluster,
    producer::{FutureProducer, FutureRecord},
};
use serde::Serialize;
use sqlx::{
    Connection, Executor, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

const TOPIC: &str = "bench.orders";

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

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let database = format!("consign_bench_{}", std::process::id());
    let mut admin = PgConnection::connect(&url)
        .await
        .context("connecting to DATABASE_URL")?;
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .await?;
    let options = PgConnectOptions::from_str(&url)?.database(&database);
    let result = run(options).await;
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {database} WITH (FORCE)"
        )))
        .await?;
    result
}

async fn run(options: PgConnectOptions) -> Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(12)
        .connect_with(options)
        .await?;
    consign::migrate(&pool).await?;
    pool.execute(
        "CREATE TABLE bench_orders (id bigint PRIMARY KEY, customer text NOT NULL, total_cents bigint NOT NULL)",
    )
    .await?;
    // As in `consign-relay run`, every figure includes recording metrics,
    // unless BENCH_METRICS=0 (to measure what recording costs).
    let metrics = env_number("BENCH_METRICS", 1) != 0;
    if metrics {
        consign::relay::metrics::install_prometheus().map_err(anyhow::Error::msg)?;
    }
    println!(
        "consign benchmarks ({} CPUs, Prometheus recorder {})\n",
        std::thread::available_parallelism()?,
        if metrics {
            "installed"
        } else {
            "not installed"
        }
    );
    transactions(&pool).await?;
    drain(&pool).await?;
    latency(&pool).await?;
    scale_out(&pool).await?;
    Ok(())
}

// ---------------------------------------------------------------- (a) TPS

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Variant {
    NoEvent,
    HandWritten,
    Consign,
}

const HAND_WRITTEN: &str = "INSERT INTO consign_outbox (id, partition, topic, key, event_type, payload) \
                            VALUES ($1, $2, $3, $4, $5, $6)";

async fn one_transaction(pool: &PgPool, variant: Variant, id: i64, outbox: &Outbox) -> Result<()> {
    let order = OrderPlaced {
        order_id: id,
        customer: "ada",
        total_cents: 1250,
    };
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO bench_orders (id, customer, total_cents) VALUES ($1, $2, $3)")
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
            sqlx::query(HAND_WRITTEN)
                .bind(event_id)
                .bind(consign::outbox::partition_for(Some(&key), &event_id))
                .bind(TOPIC)
                .bind(&key)
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

async fn measure_tps(
    pool: &PgPool,
    variant: Variant,
    clients: usize,
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
                one_transaction(&pool, variant, id, &outbox)
                    .await
                    .expect("transaction");
                done += 1;
            }
            done
        }
    }))
    .await;
    counts.iter().sum::<u64>() as f64 / started.elapsed().as_secs_f64()
}

async fn transactions(pool: &PgPool) -> Result<()> {
    let seconds = env_number("BENCH_SECONDS", 4);
    let clients = 8;
    let rounds = 3;
    println!(
        "(a) business transactions/s: order INSERT + event, {clients} clients, {rounds} interleaved rounds of {seconds} s"
    );
    let ids = Arc::new(AtomicI64::new(1));
    let variants = [Variant::NoEvent, Variant::HandWritten, Variant::Consign];
    // Warm up connections and plans.
    for v in variants {
        measure_tps(pool, v, clients, 1, &ids).await;
    }
    let mut results: HashMap<Variant, Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        for i in 0..variants.len() {
            let variant = variants[(i + round) % variants.len()];
            pool.execute("TRUNCATE consign_outbox").await?;
            let tps = measure_tps(pool, variant, clients, seconds, &ids).await;
            results.entry(variant).or_default().push(tps);
        }
    }
    let median = |v: Variant| {
        let mut xs = results[&v].clone();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let (none, hand, consign) = (
        median(Variant::NoEvent),
        median(Variant::HandWritten),
        median(Variant::Consign),
    );
    let fmt = |v: Variant| {
        results[&v]
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "    {:<40} {:>9.0} tx/s   (rounds: {})",
        "order only, no event",
        none,
        fmt(Variant::NoEvent)
    );
    println!(
        "    {:<40} {:>9.0} tx/s   (rounds: {})",
        "order + hand-written outbox INSERT",
        hand,
        fmt(Variant::HandWritten)
    );
    println!(
        "    {:<40} {:>9.0} tx/s   (rounds: {})",
        "order + consign enqueue_event",
        consign,
        fmt(Variant::Consign)
    );
    println!(
        "    consign / hand-written = {:.3}   (target >= 0.95)\n",
        consign / hand
    );
    pool.execute("TRUNCATE consign_outbox").await?;
    Ok(())
}

// --------------------------------------------------------------- (b) drain

fn mock_cluster() -> Result<MockCluster<'static, rdkafka::producer::DefaultProducerContext>> {
    let cluster = MockCluster::new(1)?;
    cluster.create_topic(TOPIC, 6, 1)?;
    Ok(cluster)
}

async fn drain(pool: &PgPool) -> Result<()> {
    let backlog = env_number("BENCH_BACKLOG", 200_000);
    let payload = vec![b'x'; 256];
    println!(
        "(b) relay throughput: draining {backlog} events of {} bytes (1000 keys), mock cluster",
        payload.len()
    );
    let fill_rate = fill_backlog(pool, backlog, &payload).await?;
    let cluster = mock_cluster()?;
    let (relay_rate, batches, left) = relay_drain(pool, &cluster, backlog, false).await?;
    fill_backlog(pool, backlog, &payload).await?;
    let (archive_rate, _, archive_left) = relay_drain(pool, &cluster, backlog, true).await?;

    let raw_rate = raw_producer(&cluster.bootstrap_servers(), backlog, &payload).await?;
    println!(
        "    {:<40} {:>9.0} events/s   ({batches} batches, {left} rows left)",
        "consign relay (batch 1000)", relay_rate
    );
    println!(
        "    {:<40} {:>9.0} events/s   (rows moved to the day-partitioned archive, {archive_left} left)",
        "consign relay, relay.archive = true", archive_rate
    );
    println!(
        "    {:<40} {:>9.0} events/s   (same messages from memory, no database)",
        "raw idempotent producer", raw_rate
    );
    println!(
        "    {:<40} {:>9.0} events/s   (enqueue_batch, 5000 per transaction)",
        "backlog fill", fill_rate
    );
    println!(
        "    relay / raw producer = {:.2}   (target: relay >= 20000 events/s)\n",
        relay_rate / raw_rate
    );
    Ok(())
}

/// Runs a relay until `backlog` events are acknowledged. Returns events per
/// second, batches, and rows left in the outbox.
async fn relay_drain(
    pool: &PgPool,
    cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    backlog: u64,
    archive: bool,
) -> Result<(f64, u64, i64)> {
    let published = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&published);
    let started = Instant::now();
    let relay = Relay::builder(pool.clone())
        .kafka("bootstrap.servers", cluster.bootstrap_servers())
        .archive(archive)
        .on_published(move |ids| {
            counter.fetch_add(ids.len() as u64, Ordering::Relaxed);
        })
        .build()?
        .spawn();
    while published.load(Ordering::Relaxed) < backlog {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = started.elapsed();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM consign_outbox")
        .fetch_one(pool)
        .await?;
    let stats = relay.stats();
    relay.shutdown().await?;
    Ok((backlog as f64 / drained.as_secs_f64(), stats.batches, left))
}

/// Writes `backlog` events of `payload` over 1000 keys, 5000 per
/// transaction. Returns events written per second.
async fn fill_backlog(pool: &PgPool, backlog: u64, payload: &[u8]) -> Result<f64> {
    let outbox = Outbox::new();
    let filled = Instant::now();
    let mut written = 0;
    while written < backlog {
        let msgs: Vec<Message> = (written..(written + 5000).min(backlog))
            .map(|i| {
                Message::new(TOPIC, "Filler", payload.to_vec())
                    .with_key(format!("key-{}", i % 1000))
            })
            .collect();
        let mut tx = pool.begin().await?;
        outbox.enqueue_batch(&mut *tx, &msgs).await?;
        tx.commit().await?;
        written += msgs.len() as u64;
    }
    pool.execute("ANALYZE consign_outbox").await?;
    Ok(backlog as f64 / filled.elapsed().as_secs_f64())
}

// ------------------------------------------------------------ (d) scale-out

async fn scale_out(pool: &PgPool) -> Result<()> {
    let backlog = env_number("BENCH_SCALE_BACKLOG", 100_000);
    let payload = vec![b'x'; 256];
    println!(
        "(d) several relays on one outbox: draining {backlog} events of {} bytes (1000 keys) with 1, 2, 3 relays (in this process, each with its own producer and leases), transactions off and on",
        payload.len()
    );
    println!(
        "    {:<14} {:>8} {:>14} {:>10} {:>11}",
        "transactions", "relays", "events/s", "batches", "duplicates"
    );
    for transactions in [false, true] {
        for relays in 1..=3 {
            fill_backlog(pool, backlog, &payload).await?;
            let cluster = mock_cluster()?;
            let published = Arc::new(AtomicU64::new(0));
            let started = Instant::now();
            let handles = (0..relays)
                .map(|_| {
                    let counter = Arc::clone(&published);
                    Relay::builder(pool.clone())
                        .kafka("bootstrap.servers", cluster.bootstrap_servers())
                        .lease_ttl(Duration::from_secs(2))
                        .transactions(transactions)
                        .on_published(move |ids| {
                            counter.fetch_add(ids.len() as u64, Ordering::Relaxed);
                        })
                        .build()
                        .map(Relay::spawn)
                })
                .collect::<Result<Vec<_>, _>>()?;
            loop {
                let left: i64 = sqlx::query_scalar("SELECT count(*) FROM consign_outbox")
                    .fetch_one(pool)
                    .await?;
                if left == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let elapsed = started.elapsed();
            let batches: u64 = handles.iter().map(|h| h.stats().batches).sum();
            for handle in handles {
                handle.shutdown().await?;
            }
            let sent = published.load(Ordering::Relaxed);
            println!(
                "    {:<14} {:>8} {:>14.0} {:>10} {:>11}",
                if transactions { "on" } else { "off" },
                relays,
                backlog as f64 / elapsed.as_secs_f64(),
                batches,
                sent.saturating_sub(backlog)
            );
        }
    }
    println!(
        "    (one machine: the relays share its CPUs, the database and one mock broker; more relays add\n     failover and spread load across hosts, not throughput on a 2-core box)\n"
    );
    Ok(())
}

/// The ceiling: the relay's producer settings, the same records and headers,
/// produced from memory and awaited in batches of 1000.
async fn raw_producer(bootstrap: &str, count: u64, payload: &[u8]) -> Result<f64> {
    let mut config = ClientConfig::new();
    for (key, value) in consign::relay::PRODUCER_DEFAULTS {
        config.set(key, value);
    }
    let producer: FutureProducer = config.set("bootstrap.servers", bootstrap).create()?;
    let started = Instant::now();
    let mut sent = 0;
    while sent < count {
        let mut batch = Vec::with_capacity(1000);
        for i in sent..(sent + 1000).min(count) {
            let id = Uuid::now_v7().to_string();
            let key = format!("key-{}", i % 1000);
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "consign-id",
                    value: Some(&id),
                })
                .insert(Header {
                    key: "consign-event-type",
                    value: Some("Filler"),
                });
            let record = FutureRecord::to(TOPIC)
                .key(&key)
                .payload(payload)
                .headers(headers);
            batch.push(producer.send_result(record).map_err(|(e, _)| e)?);
        }
        sent += batch.len() as u64;
        for delivery in join_all(batch).await {
            delivery?.map_err(|(e, _)| e)?;
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

// ------------------------------------------------------------- (c) latency

async fn latency(pool: &PgPool) -> Result<()> {
    let seconds = env_number("BENCH_SECONDS", 10).max(5);
    println!(
        "(c) commit -> broker ack latency at 2000 events/s (2 writers x 1000 tx/s, one event per transaction), {seconds} s"
    );
    let cluster = mock_cluster()?;
    for wake in [true, false] {
        let (histogram, rate) =
            latency_run(pool, &cluster.bootstrap_servers(), wake, seconds).await?;
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "    {:<40} p50 {:>6.2} ms  p90 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms  ({} events, {rate:.0}/s)",
            if wake {
                "embedded relay, woken after commit"
            } else {
                "polling only (no wake-up)"
            },
            ms(0.5),
            ms(0.9),
            ms(0.99),
            histogram.max() as f64 / 1000.0,
            histogram.len(),
        );
    }
    println!("    target with wake-up: p50 <= 5 ms, p99 <= 20 ms");
    Ok(())
}

async fn latency_run(
    pool: &PgPool,
    bootstrap: &str,
    wake: bool,
    seconds: u64,
) -> Result<(Histogram<u64>, f64)> {
    let acked: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let sink = Arc::clone(&acked);
    let relay = Relay::builder(pool.clone())
        .kafka("bootstrap.servers", bootstrap)
        .on_published(move |ids| {
            let now = Instant::now();
            let mut acked = sink.lock().expect("lock");
            acked.extend(ids.iter().map(|id| (*id, now)));
        })
        .build()?
        .spawn();
    let started = Instant::now();
    let warmup = started + Duration::from_secs(1);
    let deadline = warmup + Duration::from_secs(seconds);
    let ids = Arc::new(AtomicI64::new(
        1_000_000_000 * i64::from(wake) + 500_000_000,
    ));
    let writers = (0..2).map(|_| {
        let (pool, waker, ids) = (pool.clone(), relay.waker(), Arc::clone(&ids));
        tokio::spawn(async move {
            let outbox = Outbox::new();
            let mut committed = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while Instant::now() < deadline {
                tick.tick().await;
                let order = OrderPlaced {
                    order_id: ids.fetch_add(1, Ordering::Relaxed),
                    customer: "ada",
                    total_cents: 1,
                };
                let mut tx = pool.begin().await.expect("begin");
                let id = outbox
                    .enqueue_event(&mut *tx, &order)
                    .await
                    .expect("enqueue");
                tx.commit().await.expect("commit");
                let at = Instant::now();
                if wake {
                    waker.wake();
                }
                if at > warmup {
                    committed.push((id, at));
                }
            }
            committed
        })
    });
    let mut committed = Vec::new();
    for writer in join_all(writers).await {
        committed.extend(writer?);
    }
    let measured = deadline.duration_since(warmup).as_secs_f64();
    // Let the last events arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.shutdown().await?;
    let acked = acked.lock().expect("lock");
    let mut histogram = Histogram::<u64>::new(3)?;
    for (id, at) in &committed {
        let ack = acked.get(id).context("an event was never acknowledged")?;
        histogram.record(u64::try_from(ack.duration_since(*at).as_micros())?)?;
    }
    Ok((histogram, committed.len() as f64 / measured))
}
