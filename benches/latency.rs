//! The standalone relay's latency at low rates, and what its idle polling
//! costs the database. `cargo bench --bench latency` prints, per broker:
//!
//! - commit -> arrival latency (p50, p99) at 2, 10 and 100 events/s: the
//!   `consign-relay` process (release build, production profile, so nothing
//!   wakes it after a commit) ships one event per transaction, and a
//!   consumer in this process notes when each arrives;
//! - the database's CPU time for the relay's idle polling: with the outbox
//!   empty for `BENCH_IDLE_SECONDS` (default 30), the CPU time (utime +
//!   stime, `/proc/<pid>/stat`) of the PostgreSQL backends serving the
//!   relay's connections, per second of wall time, and the transactions
//!   they committed per second (`pg_stat_database`).
//!
//! Each variant of the relay's configuration runs in `BENCH_ROUNDS` rounds
//! (default 3, variants interleaved), each with a fresh relay process; the
//! medians are printed beside the rounds. `BENCH_PROBE` lists the variants as
//! values of `relay.idle-probe-interval` (default `default,0s`: the
//! production profile's, and the probe off); `default` writes no such key,
//! so the list `default` also runs a relay built before the setting existed
//! (`TEST_RELAY_BIN`). `BENCH_SECONDS` is the length of each rate's run
//! (default 15; at least 60 events), `BENCH_KAFKA=mock` or `real` picks the broker (default:
//! both, the real one where Kafka's jars are).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use consign::Outbox;
use consign_test_support::{BrokerKind as Kind, RelayProcess, TestBroker, procfs::cpu_seconds};
use hdrhistogram::Histogram;
use rdkafka::{
    ClientConfig, Message as _, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    message::Headers as _,
};
use sqlx::{
    ConnectOptions, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

// The order event and helpers; its business-transaction benchmark is not used here.
#[allow(dead_code, unused_macros)]
#[path = "support/orders.rs"]
mod orders;

use orders::{OrderPlaced, TOPIC, env_number, summary};

/// The rates measured, events per second.
const RATES: [u32; 3] = [2, 10, 100];

/// Events measured per rate at least (at 2/s, 30 s).
const MIN_EVENTS: u64 = 60;

/// When each event reached the consumer, by its consign id.
type Arrivals = Arc<Mutex<HashMap<Uuid, Instant>>>;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    consign_test_support::db::with_scratch_database("consign_latency", run).await
}

async fn run(options: PgConnectOptions) -> Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    consign::migrate(&pool).await?;
    let variants: Vec<String> = std::env::var("BENCH_PROBE")
        .unwrap_or_else(|_| "default,0s".into())
        .split(',')
        .map(|v| v.trim().to_owned())
        .collect();
    let rounds = env_number("BENCH_ROUNDS", 3).max(1);
    let seconds = env_number("BENCH_SECONDS", 15).max(3);
    let idle = env_number("BENCH_IDLE_SECONDS", 30).max(5);
    println!(
        "consign-relay process (release, production profile, no wake-up): commit -> arrival latency, one event per transaction, {seconds} s per rate; then {idle} s idle; {rounds} rounds, variants interleaved, medians [rounds]\n"
    );
    for kind in Kind::from_env() {
        println!("==== broker: {} ====\n", kind.describe());
        let broker = kind.start(TOPIC, 6).await?;
        let arrivals = Arrivals::default();
        let stop = CancellationToken::new();
        let consumer = tokio::spawn(consume(
            broker.bootstrap().to_owned(),
            Arc::clone(&arrivals),
            stop.clone(),
        ));
        let mut results: Vec<Vec<Round>> = vec![Vec::new(); variants.len()];
        for round in 0..rounds {
            for (variant, results) in variants.iter().zip(&mut results) {
                let measured = measure(&pool, &broker, &arrivals, variant, seconds, idle).await?;
                println!(
                    "    round {} idle-probe-interval {variant}: {measured}",
                    round + 1
                );
                results.push(measured);
            }
        }
        stop.cancel();
        consumer.await??;
        println!();
        for (variant, results) in variants.iter().zip(&results) {
            report(variant, results);
        }
    }
    Ok(())
}

/// One round of one variant.
#[derive(Debug, Clone)]
struct Round {
    /// Per rate: p50 and p99 in ms, the rate reached.
    rates: Vec<(f64, f64, f64)>,
    /// Idle: CPU ms per second of the relay's backends, of the relay
    /// process, and the transactions per second the relay committed.
    backend_cpu: f64,
    relay_cpu: f64,
    xacts: f64,
}

impl std::fmt::Display for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (rate, (p50, p99, reached)) in RATES.iter().zip(&self.rates) {
            write!(
                f,
                "{rate}/s p50 {p50:.1} p99 {p99:.1} ms (reached {reached:.1}/s); "
            )?;
        }
        write!(
            f,
            "idle: backends {:.2} ms CPU/s, relay {:.2} ms CPU/s, {:.1} xact/s",
            self.backend_cpu, self.relay_cpu, self.xacts
        )
    }
}

fn report(variant: &str, rounds: &[Round]) {
    println!("idle-probe-interval = {variant}:");
    for (i, rate) in RATES.iter().enumerate() {
        let pick = |f: fn(&(f64, f64, f64)) -> f64| {
            rounds.iter().map(|r| f(&r.rates[i])).collect::<Vec<_>>()
        };
        let (p50, p50s) = median(&pick(|r| r.0));
        let (p99, p99s) = median(&pick(|r| r.1));
        let (reached, _) = median(&pick(|r| r.2));
        println!(
            "    {rate:>4}/s: p50 {p50:>7.1} ms [{p50s}]   p99 {p99:>7.1} ms [{p99s}]   reached {reached:.1}/s"
        );
    }
    let (cpu, cpus) = median(&rounds.iter().map(|r| r.backend_cpu).collect::<Vec<_>>());
    let (relay, _) = median(&rounds.iter().map(|r| r.relay_cpu).collect::<Vec<_>>());
    let (xacts, _) = median(&rounds.iter().map(|r| r.xacts).collect::<Vec<_>>());
    println!(
        "    idle: PostgreSQL backends {cpu:.2} ms CPU per s [{cpus}] ({:.2}% of a core), {xacts:.1} transactions/s; relay process {relay:.2} ms CPU per s\n",
        cpu / 10.0
    );
}

/// The median and the rounds, with one decimal.
fn median(xs: &[f64]) -> (f64, String) {
    let (median, _) = summary(xs);
    let rounds = xs.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>();
    (median, rounds.join(", "))
}

/// Starts a relay process with `probe` as its `idle-probe-interval`
/// (`default`: the profile's), measures each rate and then its idle cost.
async fn measure(
    pool: &PgPool,
    broker: &TestBroker,
    arrivals: &Arrivals,
    probe: &str,
    seconds: u64,
    idle: u64,
) -> Result<Round> {
    let url = pool.connect_options().to_url_lossy();
    let relay = if probe == "default" {
        String::new()
    } else {
        format!("\n[relay]\nidle-probe-interval = {probe:?}\n")
    };
    let config = format!(
        "profile = \"production\"\n\n[database]\nurl = {:?}\n\n[admin]\nenabled = false\n{relay}\n[kafka]\n\"bootstrap.servers\" = {:?}\n",
        url.as_str(),
        broker.bootstrap()
    );
    let mut process = RelayProcess::start(&config)?;
    // Ready once a first event arrives.
    rate_run(pool, arrivals, 1, 1)
        .await
        .with_context(|| format!("the relay did not ship a first event: {}", process.output()))?;
    let mut rates = Vec::new();
    for rate in RATES {
        let count = (u64::from(rate) * seconds).max(MIN_EVENTS);
        let (histogram, reached) = rate_run(pool, arrivals, rate, count).await?;
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        rates.push((ms(0.5), ms(0.99), reached));
    }
    // Past the relay's backoff to max-poll-interval.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (backend_cpu, relay_cpu, xacts) = idle_cost(pool, process.id(), idle).await?;
    process.stop(Duration::from_secs(30)).await?;
    Ok(Round {
        rates,
        backend_cpu,
        relay_cpu,
        xacts,
    })
}

/// Commits `count` events, one per transaction, at `rate` (one writer,
/// paced), then waits for all to arrive (up to 30 s). Returns the commit ->
/// arrival latencies (µs) and the rate reached.
async fn rate_run(
    pool: &PgPool,
    arrivals: &Arrivals,
    rate: u32,
    count: u64,
) -> Result<(Histogram<u64>, f64)> {
    let outbox = Outbox::new();
    let period = Duration::from_micros(1_000_000 / u64::from(rate));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut committed = Vec::new();
    for _ in 0..count {
        tick.tick().await;
        let order = OrderPlaced {
            order_id: rand::random_range(0..i64::MAX),
            customer: "ada",
            total_cents: 1,
        };
        let mut tx = pool.begin().await?;
        let id = outbox.enqueue_event(&mut *tx, &order).await?;
        tx.commit().await?;
        committed.push((id, Instant::now()));
    }
    let reached = count as f64 / started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut histogram = Histogram::<u64>::new(3)?;
    for (id, at) in committed {
        let arrived = loop {
            if let Some(arrived) = arrivals.lock().expect("lock").remove(&id) {
                break arrived;
            }
            if Instant::now() > deadline {
                bail!("event {id} did not arrive within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        histogram.record(u64::try_from(
            arrived.saturating_duration_since(at).as_micros(),
        )?)?;
    }
    Ok((histogram, reached))
}

/// Reads every partition of the topic from the beginning and notes when
/// each event arrives.
async fn consume(bootstrap: String, arrivals: Arrivals, stop: CancellationToken) -> Result<()> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("consign-latency-{}", Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(TOPIC), Duration::from_secs(30))?;
    let mut assignment = TopicPartitionList::new();
    for topic in metadata.topics() {
        for partition in topic.partitions() {
            assignment.add_partition_offset(TOPIC, partition.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&assignment)?;
    loop {
        let message = tokio::select! {
            message = consumer.recv() => message?,
            () = stop.cancelled() => return Ok(()),
        };
        let now = Instant::now();
        let id = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == consign::outbox::headers::ID)
                .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<Uuid>().ok())
        });
        if let Some(id) = id {
            arrivals.lock().expect("lock").insert(id, now);
        }
    }
}

/// Over `seconds` of an empty outbox: CPU ms per second of the PostgreSQL
/// backends of the relay's connections and of the relay process, and the
/// transactions per second committed in the database (the relay's: nothing
/// else runs).
async fn idle_cost(pool: &PgPool, relay: u32, seconds: u64) -> Result<(f64, f64, f64)> {
    let backends = relay_backends(pool).await?;
    let xacts = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(pool)
        .await?;
        anyhow::Ok(n)
    };
    let before: Vec<f64> = backends
        .iter()
        .map(|&pid| cpu_seconds(pid))
        .collect::<Result<_>>()?;
    let relay_before = cpu_seconds(relay)?;
    let xacts_before = xacts().await?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    // A backend that ended counts what it had used: nothing, pessimistically 0.
    let after: Vec<f64> = backends
        .iter()
        .map(|&pid| cpu_seconds(pid).unwrap_or(0.0))
        .collect();
    let relay_after = cpu_seconds(relay)?;
    // Statistics reach pg_stat_database within a second of a transaction.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let xacts_after = xacts().await?;
    let elapsed = started.elapsed().as_secs_f64();
    let used: f64 = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b).max(0.0))
        .sum();
    let per_second = |seconds: f64| seconds * 1000.0 / elapsed;
    // Less ours: the first read of xact_commit.
    let xacts = (xacts_after - xacts_before - 1).max(0) as f64 / elapsed;
    Ok((
        per_second(used),
        per_second((relay_after - relay_before).max(0.0)),
        xacts,
    ))
}

/// The server processes of the relay's connections (`application_name`
/// `consign-relay`, the relay's default).
async fn relay_backends(pool: &PgPool) -> Result<Vec<u32>> {
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'consign-relay'",
    )
    .fetch_all(pool)
    .await?;
    if pids.is_empty() {
        bail!("no PostgreSQL backend serves the relay");
    }
    Ok(pids.into_iter().map(i32::cast_unsigned).collect())
}
