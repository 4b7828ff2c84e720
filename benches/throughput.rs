//! consign benchmarks. `cargo bench --bench throughput` prints, in one run:
//!
//! (a) business transactions per second: an order row alone, with a
//!     hand-written outbox INSERT, and with `Outbox::enqueue_event`;
//! (b) relay throughput draining a backlog of 256-byte events, beside the raw
//!     producer (same messages straight from memory) as the ceiling;
//! (c) commit -> broker-ack latency at a steady 2 000 events/s with the
//!     embedded relay, woken after commit and polling only (and 5 000/s on
//!     real Kafka), with the rate the writers really reached, marked SHORT
//!     when it is under 95% of the nominal rate;
//! (d) draining a backlog with 1, 2 and 3 relays sharing the outbox through
//!     leases, with Kafka transactions off and on;
//! (e) the `consign-relay` process (release build, production profile)
//!     draining a backlog: its rate and peak RSS (`VmHWM`).
//!
//! (b) to (e) run on each broker: librdkafka's in-process mock cluster and
//! real Apache Kafka (a 1-node KRaft cluster on loopback started from the jars
//! `scripts/kafka.sh fetch` resolves; skipped with a note when they are
//! missing). `BENCH_KAFKA=mock` or `real` picks one. Scale with
//! `BENCH_ROUNDS` (rounds of (b) and (c), default 3; each round and the
//! medians are printed), `BENCH_BACKLOG` (default 200000 on the mock cluster),
//! `BENCH_REAL_BACKLOG` (default 1000000 on real Kafka), `BENCH_SCALE_BACKLOG`
//! (default 100000 per run of (d)) and `BENCH_SECONDS` (seconds per measured
//! run, default 4 for (a) and 10 for (c)).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use consign::{Message, Outbox, Relay};
use consign_test_support::{BrokerKind as Kind, RelayProcess, TestBroker};
use futures_util::future::join_all;
use hdrhistogram::Histogram;
use rdkafka::{
    ClientConfig,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use sqlx::{
    ConnectOptions, Executor, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

#[macro_use]
#[path = "support/orders.rs"]
mod orders;

use orders::{OrderPlaced, TOPIC, env_number, summary};

backend_bench!(
    postgres,
    sqlx::PgPool,
    "INSERT INTO bench_orders (id, customer, total_cents) VALUES ($1, $2, $3)",
    "INSERT INTO consign_outbox (id, partition, topic, key, event_type, payload) \
     VALUES ($1, $2, $3, $4, $5, $6)",
    "TRUNCATE consign_outbox"
);

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    consign_test_support::db::with_scratch_database("consign_bench", run).await
}

async fn run(options: PgConnectOptions) -> Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(16)
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
    for kind in Kind::from_env() {
        println!("==== broker: {} ====\n", kind.describe());
        // One broker for all sections: a real broker's JVM warms up in (b).
        let broker = kind.start(TOPIC, 6).await?;
        vacuum(&pool).await?;
        drain(&pool, kind, &broker).await?;
        vacuum(&pool).await?;
        latency(&pool, kind, &broker).await?;
        vacuum(&pool).await?;
        scale_out(&pool, &broker).await?;
        vacuum(&pool).await?;
        relay_process(&pool, kind, &broker).await?;
    }
    Ok(())
}

/// Vacuums the outbox: a drained backlog leaves its rows as dead tuples,
/// which the relay's next queries wade through until autovacuum catches up
/// (measured here: polling p50 169 ms right after a 1M drain, 16 ms after
/// this). Each section starts from a vacuumed table, as a steady state.
async fn vacuum(pool: &PgPool) -> Result<()> {
    pool.execute("VACUUM ANALYZE consign_outbox").await?;
    Ok(())
}

/// The backlog (b) and (e) drain on `kind`.
fn backlog(kind: Kind) -> u64 {
    match kind {
        Kind::Mock => env_number("BENCH_BACKLOG", 200_000),
        Kind::Real => env_number("BENCH_REAL_BACKLOG", 1_000_000),
    }
}

// ---------------------------------------------------------------- (a) TPS

/// (a): business transactions per second with and without the outbox (the
/// benchmark `benches/backends.rs` runs on every database), the outbox
/// emptied afterwards for (b).
async fn transactions(pool: &PgPool) -> Result<()> {
    postgres::run(pool, "(a) business transactions/s: order INSERT + event", 8).await?;
    pool.execute("TRUNCATE consign_outbox").await?;
    Ok(())
}

// --------------------------------------------------------------- (b) drain

async fn drain(pool: &PgPool, kind: Kind, broker: &TestBroker) -> Result<()> {
    let backlog = backlog(kind);
    let rounds = rounds();
    let payload = vec![b'x'; 256];
    println!(
        "(b) relay throughput: draining {backlog} events of {} bytes (1000 keys), {rounds} rounds, relay and raw producer alternating",
        payload.len()
    );
    let (mut fills, mut relays, mut raws, mut ratios) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        vacuum(pool).await?;
        let fill = fill_backlog(pool, backlog, &payload).await?;
        let (relay, batches, left) = relay_drain(pool, broker.bootstrap(), backlog, false).await?;
        let raw = raw_producer(broker.bootstrap(), backlog, &payload).await?;
        println!(
            "    round {round}: relay {relay:>7.0} events/s ({batches} batches, {left} rows left)   raw producer {raw:>7.0} events/s   relay/raw {:.2}   fill {fill:.0} events/s",
            relay / raw
        );
        fills.push(fill);
        relays.push(relay);
        raws.push(raw);
        ratios.push(relay / raw);
    }
    let (relay, relay_rounds) = summary(&relays);
    let (raw, raw_rounds) = summary(&raws);
    let (fill, fill_rounds) = summary(&fills);
    println!(
        "    {:<40} {relay:>9.0} events/s   (median; rounds {relay_rounds})",
        "consign relay (batch 1000)"
    );
    println!(
        "    {:<40} {raw:>9.0} events/s   (median; rounds {raw_rounds}; same messages from memory, no database)",
        "raw idempotent producer"
    );
    println!(
        "    {:<40} {fill:>9.0} events/s   (median; rounds {fill_rounds}; enqueue_batch, 5000 per transaction)",
        "backlog fill"
    );
    println!(
        "    relay / raw producer = {:.2} (medians; per round {})   (target: relay >= 20000 events/s)",
        relay / raw,
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if kind == Kind::Mock {
        vacuum(pool).await?;
        fill_backlog(pool, backlog, &payload).await?;
        let (archive_rate, _, archive_left) =
            relay_drain(pool, broker.bootstrap(), backlog, true).await?;
        println!(
            "    {:<40} {archive_rate:>9.0} events/s   (one run; rows moved to the day-partitioned archive, {archive_left} left)",
            "consign relay, relay.archive = true"
        );
    }
    println!();
    Ok(())
}

/// Rounds of (b) and (c) (`BENCH_ROUNDS`, default 3).
fn rounds() -> u64 {
    env_number("BENCH_ROUNDS", 3).max(1)
}

/// Runs a relay until `backlog` events are acknowledged. Returns events per
/// second, batches, and rows left in the outbox.
async fn relay_drain(
    pool: &PgPool,
    bootstrap: &str,
    backlog: u64,
    archive: bool,
) -> Result<(f64, u64, i64)> {
    let published = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&published);
    let started = Instant::now();
    let relay = Relay::builder(pool.clone())
        .kafka("bootstrap.servers", bootstrap)
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

async fn scale_out(pool: &PgPool, broker: &TestBroker) -> Result<()> {
    let backlog = env_number("BENCH_SCALE_BACKLOG", 100_000);
    let payload = vec![b'x'; 256];
    println!(
        "(d) several relays on one outbox: draining {backlog} events of {} bytes (1000 keys) with 1, 2, 3 relays (in this process, each with its own producer and leases), transactions off and on, one run each",
        payload.len()
    );
    println!(
        "    {:<14} {:>8} {:>14} {:>10} {:>11}",
        "transactions", "relays", "events/s", "batches", "duplicates"
    );
    for transactions in [false, true] {
        for relays in 1..=3 {
            fill_backlog(pool, backlog, &payload).await?;
            let published = Arc::new(AtomicU64::new(0));
            let started = Instant::now();
            let handles = (0..relays)
                .map(|_| {
                    let counter = Arc::clone(&published);
                    Relay::builder(pool.clone())
                        .kafka("bootstrap.servers", broker.bootstrap())
                        .lease_ttl(Duration::from_secs(2))
                        .transactions(transactions)
                        .on_published(move |ids| {
                            counter.fetch_add(ids.len() as u64, Ordering::Relaxed);
                        })
                        .build()
                        .map(Relay::spawn)
                })
                .collect::<Result<Vec<_>, _>>()?;
            wait_empty(pool, Duration::from_millis(20)).await?;
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
        "    (one machine: the relays share its CPUs, the database and one broker; more relays add\n     failover and spread load across hosts, not throughput on a 2-core box)\n"
    );
    Ok(())
}

// ------------------------------------------------------- (e) relay process

/// The `consign-relay` binary as operators run it (release build, production
/// profile, batch 1000) draining a backlog: its rate, start-up included, and
/// its peak resident memory.
async fn relay_process(pool: &PgPool, kind: Kind, broker: &TestBroker) -> Result<()> {
    let backlog = backlog(kind);
    let payload = vec![b'x'; 256];
    println!(
        "(e) consign-relay process (release, production profile) draining {backlog} events of {} bytes, one run",
        payload.len()
    );
    fill_backlog(pool, backlog, &payload).await?;
    let url = pool.connect_options().to_url_lossy();
    let config = format!(
        "[database]\nurl = {:?}\n\n[admin]\nenabled = false\n\n[kafka]\n\"bootstrap.servers\" = {:?}\n",
        url.as_str(),
        broker.bootstrap()
    );
    let started = Instant::now();
    let mut relay = RelayProcess::start(&config)?;
    wait_empty(pool, Duration::from_millis(50)).await?;
    let elapsed = started.elapsed();
    let peak = consign_test_support::procfs::peak_rss_kib(relay.id())?;
    relay.stop(Duration::from_secs(30)).await?;
    println!(
        "    {:<40} {:>9.0} events/s   (process start to empty outbox)",
        "consign-relay process",
        backlog as f64 / elapsed.as_secs_f64()
    );
    println!(
        "    {:<40} {:>9.1} MiB      (VmHWM, as /usr/bin/time -v reports it)\n",
        "peak RSS of the relay process",
        peak as f64 / 1024.0
    );
    Ok(())
}

/// Polls the outbox every `every` until it is empty.
async fn wait_empty(pool: &PgPool, every: Duration) -> Result<()> {
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM consign_outbox")
            .fetch_one(pool)
            .await?;
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(every).await;
    }
}

/// The ceiling: the relay's producer settings, the same records and headers,
/// produced from memory and awaited in batches of 1000.
async fn raw_producer(bootstrap: &str, count: u64, payload: &[u8]) -> Result<f64> {
    let mut config = ClientConfig::new();
    for (key, value) in consign::relay::PRODUCER_DEFAULTS {
        config.set(key, value);
    }
    // Timed from the producer's creation, as the relay's drain is timed from
    // its start.
    let started = Instant::now();
    let producer: FutureProducer = config.set("bootstrap.servers", bootstrap).create()?;
    let mut sent = 0;
    while sent < count {
        let mut batch = Vec::with_capacity(1000);
        for i in sent..(sent + 1000).min(count) {
            let id = Uuid::now_v7().to_string();
            let key = format!("key-{}", i % 1000);
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: consign::outbox::headers::ID,
                    value: Some(&id),
                })
                .insert(Header {
                    key: consign::outbox::headers::EVENT_TYPE,
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

async fn latency(pool: &PgPool, kind: Kind, broker: &TestBroker) -> Result<()> {
    let seconds = env_number("BENCH_SECONDS", 10).max(5);
    let rounds = rounds();
    println!(
        "(c) commit -> broker ack latency, one event per transaction, writers paced to the nominal rate, {seconds} s each, {rounds} rounds interleaved"
    );
    let mut runs = vec![(2000, true), (2000, false)];
    if kind == Kind::Real {
        runs.push((5000, true));
    }
    // Per run: p50, p90, p99, max (ms) and the rate reached, each round.
    let mut results: Vec<Vec<[f64; 5]>> = vec![Vec::new(); runs.len()];
    for round in 0..rounds {
        for (i, &(rate, wake)) in runs.iter().enumerate() {
            let (histogram, reached) =
                latency_run(pool, broker.bootstrap(), wake, seconds, rate).await?;
            let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
            let figures = [
                ms(0.5),
                ms(0.9),
                ms(0.99),
                histogram.max() as f64 / 1000.0,
                reached,
            ];
            println!(
                "    round {round}: {:<46} {}  ({} events)",
                latency_label(rate, wake),
                latency_figures(&figures, rate),
                histogram.len(),
            );
            results[i].push(figures);
        }
    }
    for (&(rate, wake), rounds) in runs.iter().zip(&results) {
        let median = |k: usize| summary(&rounds.iter().map(|f| f[k]).collect::<Vec<_>>()).0;
        let medians = [median(0), median(1), median(2), median(3), median(4)];
        println!(
            "    median: {:<46} {}",
            latency_label(rate, wake),
            latency_figures(&medians, rate)
        );
    }
    println!("    target with wake-up: p50 <= 5 ms, p99 <= 20 ms\n");
    Ok(())
}

fn latency_label(rate: u32, wake: bool) -> String {
    format!(
        "{rate}/s, {}",
        if wake {
            "embedded relay woken after commit"
        } else {
            "polling only (no wake-up)"
        }
    )
}

/// p50, p90, p99, max and the rate reached, which is said plainly to fall
/// short of the nominal `rate` when it is under 95% of it.
fn latency_figures([p50, p90, p99, max, reached]: &[f64; 5], rate: u32) -> String {
    let short = if *reached < 0.95 * f64::from(rate) {
        format!(" -- SHORT of the nominal {rate}/s")
    } else {
        String::new()
    };
    format!(
        "p50 {p50:>6.2} ms  p90 {p90:>6.2} ms  p99 {p99:>6.2} ms  max {max:>7.2} ms  reached {reached:.0}/s{short}"
    )
}

/// Writers commit one event per transaction at `rate` in all (each writer at
/// most one transaction per 2 ms). Returns the commit -> ack latencies and
/// the rate the writers really reached.
async fn latency_run(
    pool: &PgPool,
    bootstrap: &str,
    wake: bool,
    seconds: u64,
    rate: u32,
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
        1_000_000_000 * i64::from(wake) + 100_000_000 * i64::from(rate / 1000),
    ));
    let writers = (rate / 500).max(1);
    let period = Duration::from_micros(u64::from(writers) * 1_000_000 / u64::from(rate));
    let writers = (0..writers).map(|_| {
        let (pool, waker, ids) = (pool.clone(), relay.waker(), Arc::clone(&ids));
        tokio::spawn(async move {
            let outbox = Outbox::new();
            let mut committed = Vec::new();
            let mut tick = tokio::time::interval(period);
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
    // Let the last events arrive (up to 30 s).
    let last = Instant::now() + Duration::from_secs(30);
    while Instant::now() < last {
        let done = {
            let acked = acked.lock().expect("lock");
            committed.iter().all(|(id, _)| acked.contains_key(id))
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.shutdown().await?;
    let acked = acked.lock().expect("lock");
    let mut histogram = Histogram::<u64>::new(3)?;
    for (id, at) in &committed {
        let ack = acked.get(id).context("an event was never acknowledged")?;
        histogram.record(u64::try_from(ack.duration_since(*at).as_micros())?)?;
    }
    Ok((histogram, committed.len() as f64 / measured))
}
