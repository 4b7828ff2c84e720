//! Consumer throughput with the inbox vs a bare consumer doing the same
//! handler write without deduplication.
//!
//! ```sh
//! cargo bench --bench inbox
//! ```
//!
//! Both run the same `InboxConsumer` runner over the same topic (6
//! partitions), one transaction per batch of a partition, and the same handler
//! write (one INSERT per message). The bare consumer has no dedup record, no
//! stored offset and no `Delivery` machinery: the difference is the inbox's
//! cost. It runs on librdkafka's mock cluster and on real Apache Kafka (1
//! node, loopback; `BENCH_KAFKA=mock` or `real` picks one). `BENCH_MESSAGES`
//! sets the count (default 100000), `BENCH_ROUNDS` the rounds (default 3);
//! the variants alternate and each round and the medians are printed.
//! `BENCH_ONLY=bare` or `inbox` runs one variant (to profile it).
//!
//! Progress is counted in the benchmark's process (messages of the batches
//! the service settled), not by polling `count(*)` on the effects table: that
//! poll cost PostgreSQL 2.8 ms every 10 ms on this 2-core machine, CPU taken
//! from the system being measured. The effects table is checked once, after
//! each run.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use consign::inbox::{InboxConsumer, InboxLayer, Received};
use consign_test_support::effects::TestMessage;
use consign_test_support::{BrokerKind, effects, procfs};
use futures_util::FutureExt as _;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceBuilder};

const PARTITIONS: i32 = 6;

/// The bare consumer's service: the same INSERT per message, one
/// transaction per batch, nothing else.
#[derive(Clone)]
struct Bare {
    pool: PgPool,
}

impl Service<Vec<Received>> for Bare {
    type Response = ();
    type Error = sqlx::Error;
    type Future = Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), sqlx::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: Vec<Received>) -> Self::Future {
        let pool = self.pool.clone();
        Box::pin(async move {
            let mut tx = pool.begin().await?;
            for message in &batch {
                let step: effects::Step =
                    serde_json::from_slice(message.payload.as_deref().unwrap_or_default())
                        .map_err(|e| sqlx::Error::Decode(e.into()))?;
                let id = message
                    .consign_id()
                    .unwrap_or_else(|_| message.position_id());
                sqlx::query("INSERT INTO test_effects (message_id, key, n) VALUES ($1, $2, $3)")
                    .bind(id)
                    .bind(i32::try_from(step.key).unwrap_or(i32::MAX))
                    .bind(i32::try_from(step.n).unwrap_or(i32::MAX))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        })
    }
}

/// Counts the messages of the batches its inner service settled.
#[derive(Clone)]
struct Settled<S> {
    inner: S,
    count: Arc<AtomicU64>,
}

impl<S> Service<Vec<Received>> for Settled<S>
where
    S: Service<Vec<Received>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, batch: Vec<Received>) -> Self::Future {
        let (count, messages) = (Arc::clone(&self.count), batch.len() as u64);
        Box::pin(self.inner.call(batch).inspect(move |result| {
            if result.is_ok() {
                count.fetch_add(messages, Ordering::Relaxed);
            }
        }))
    }
}

/// CPU seconds used so far by this process (the consumer, the benchmark and
/// on the mock cluster the broker) and by the PostgreSQL backends of the
/// benchmark's database, by pid.
async fn cpu_now(pool: &PgPool) -> Result<(f64, HashMap<i32, f64>)> {
    let pids: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            .fetch_all(pool)
            .await?;
    let backends = pids
        .into_iter()
        .filter_map(|pid| Some((pid, procfs::cpu_seconds(u32::try_from(pid).ok()?).ok()?)))
        .collect();
    Ok((procfs::cpu_seconds(std::process::id())?, backends))
}

/// A run's figures: its rate and CPU microseconds per message.
#[derive(Clone, Copy)]
struct Figures {
    rate: f64,
    process_us: f64,
    database_us: f64,
}

async fn effects_count(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM test_effects")
        .fetch_one(pool)
        .await?)
}

/// Consumes the whole topic with `service` under a new group; returns
/// messages per second from the first settled batch to the last, and the CPU
/// time per message of this process and of PostgreSQL in that interval.
async fn run<S>(
    pool: &PgPool,
    inbox: &InboxLayer,
    service: S,
    bootstrap: &str,
    topic: &str,
    total: u64,
) -> Result<Figures>
where
    S: Service<Vec<Received>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<consign::inbox::BoxError>,
{
    sqlx::query("TRUNCATE test_effects").execute(pool).await?;
    let consumer = InboxConsumer::builder(inbox)
        .topic(topic)
        .kafka("bootstrap.servers", bootstrap)
        .build()?;
    let settled = Arc::new(AtomicU64::new(0));
    let service = Settled {
        inner: service,
        count: Arc::clone(&settled),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(service, shutdown.clone()));
    // Time from the first settled batch, so that group join is not counted.
    while settled.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let first = settled.load(Ordering::Relaxed);
    let (process, backends) = cpu_now(pool).await?;
    while settled.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (process_end, backends_end) = cpu_now(pool).await?;
    shutdown.cancel();
    task.await??;
    let effects = effects_count(pool).await?;
    ensure!(
        u64::try_from(effects)? == total,
        "{effects} effects for {total} messages"
    );
    let measured = (total - first) as f64;
    let database: f64 = backends_end
        .iter()
        .map(|(pid, end)| end - backends.get(pid).copied().unwrap_or(0.0))
        .sum();
    Ok(Figures {
        rate: measured / elapsed,
        process_us: (process_end - process) * 1e6 / measured,
        database_us: database * 1e6 / measured,
    })
}

/// Which variants run (`BENCH_ONLY`).
#[derive(Clone, Copy)]
struct Variants {
    bare: bool,
    inbox: bool,
}

impl Variants {
    fn from_env() -> Result<Self> {
        match std::env::var("BENCH_ONLY").as_deref() {
            Err(_) | Ok("") => Ok(Self {
                bare: true,
                inbox: true,
            }),
            Ok("bare") => Ok(Self {
                bare: true,
                inbox: false,
            }),
            Ok("inbox") => Ok(Self {
                bare: false,
                inbox: true,
            }),
            Ok(other) => anyhow::bail!("BENCH_ONLY={other}: expected bare or inbox"),
        }
    }
}

/// Runs the bare consumer and the inbox `rounds` times each, alternating,
/// over `messages` on a fresh broker of `kind`; prints each round and the
/// medians.
async fn compare(
    pool: &PgPool,
    kind: BrokerKind,
    messages: &[TestMessage],
    rounds: usize,
    variants: Variants,
) -> Result<()> {
    let topic = "bench.inbox";
    let kafka = kind.start(topic, PARTITIONS).await?;
    let total = u64::try_from(messages.len())?;
    for chunk in messages.chunks(20_000) {
        effects::produce(kafka.bootstrap(), topic, chunk).await?;
    }
    let (mut bares, mut inboxes) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Each run is a new consumer group reading the topic from the start.
        let tag = format!("{kind:?}-{round}").to_lowercase();
        if variants.bare {
            let group = InboxLayer::new(pool.clone(), format!("bench-bare-{tag}"))?;
            let service = Bare { pool: pool.clone() };
            bares.push(run(pool, &group, service, kafka.bootstrap(), topic, total).await?);
        }
        if variants.inbox {
            let inbox = InboxLayer::new(pool.clone(), format!("bench-inbox-{tag}"))?;
            let service = ServiceBuilder::new()
                .layer(inbox.clone())
                .service_fn(effects::record);
            inboxes.push(run(pool, &inbox, service, kafka.bootstrap(), topic, total).await?);
        }
        let figure = |xs: &[Figures]| {
            xs.last().map_or("-".into(), |f| {
                format!(
                    "{:>6.0} msg/s (CPU/msg: here {:.1} us, PostgreSQL {:.1} us)",
                    f.rate, f.process_us, f.database_us
                )
            })
        };
        let ratio = match (bares.last(), inboxes.last()) {
            (Some(bare), Some(inbox)) => format!("   inbox/bare {:.3}", inbox.rate / bare.rate),
            _ => String::new(),
        };
        println!(
            "    round {round}: bare {}   inbox {}{ratio}",
            figure(&bares),
            figure(&inboxes)
        );
    }
    print_medians(&bares, &inboxes);
    Ok(())
}

fn print_medians(bares: &[Figures], inboxes: &[Figures]) {
    let rates = |xs: &[Figures]| xs.iter().map(|f| f.rate).collect::<Vec<_>>();
    let (bare_rates, inbox_rates) = (rates(bares), rates(inboxes));
    for (label, runs, xs) in [
        ("bare consumer (same write, no dedup)", bares, &bare_rates),
        ("inbox (dedup + offsets + handler)", inboxes, &inbox_rates),
    ] {
        let cpu = |f: fn(&Figures) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        if let (Some(m), Some(here), Some(db)) =
            (median(xs), cpu(|f| f.process_us), cpu(|f| f.database_us))
        {
            println!(
                "    {label:<38} {m:>7.0} msg/s (median; rounds {}); CPU/msg here {here:.1} us, PostgreSQL {db:.1} us",
                spread(xs)
            );
        }
    }
    let (Some(bare), Some(inbox)) = (median(&bare_rates), median(&inbox_rates)) else {
        return;
    };
    let ratios: Vec<String> = inbox_rates
        .iter()
        .zip(&bare_rates)
        .map(|(i, b)| format!("{:.3}", i / b))
        .collect();
    println!(
        "    inbox / bare = {:.3} (medians; per round {})   (target >= 0.95; inbox target >= 20000 msg/s)",
        inbox / bare,
        ratios.join(" ")
    );
    println!(
        "    per-message overhead of the inbox: {:.1} us\n",
        1e6 / inbox - 1e6 / bare
    );
}

/// The rounds' lowest and highest figures.
fn spread(xs: &[f64]) -> String {
    let low = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let high = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{low:.0} .. {high:.0}")
}

/// The median; of an even count, the mean of the middle two.
fn median(xs: &[f64]) -> Option<f64> {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(xs[n / 2]),
        _ => Some(f64::midpoint(xs[n / 2 - 1], xs[n / 2])),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let total: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let admin = PgPoolOptions::new().connect(&url).await?;
    sqlx::query("DROP DATABASE IF EXISTS consign_bench_inbox WITH (FORCE)")
        .execute(&admin)
        .await?;
    sqlx::query("CREATE DATABASE consign_bench_inbox")
        .execute(&admin)
        .await?;
    let bench_url = format!(
        "{}/consign_bench_inbox",
        url.rsplit_once('/')
            .context("DATABASE_URL has no database")?
            .0
    );
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&bench_url)
        .await?;
    consign::migrate(&pool).await?;
    effects::create_table(&pool).await?;

    let keys = 1000;
    let per_key = u32::try_from(total.div_ceil(1000))?;
    let messages = TestMessage::stream(keys, per_key);
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_usize)
        .max(1);
    let variants = Variants::from_env()?;
    println!(
        "consumer throughput: {} messages, {PARTITIONS} partitions, {keys} keys, batches of up to 500, one INSERT per message, {rounds} rounds\n",
        messages.len()
    );
    for kind in BrokerKind::from_env() {
        println!("==== broker: {} ====", kind.describe());
        compare(&pool, kind, &messages, rounds, variants).await?;
    }
    drop(pool);
    sqlx::query("DROP DATABASE IF EXISTS consign_bench_inbox WITH (FORCE)")
        .execute(&admin)
        .await?;
    Ok(())
}
