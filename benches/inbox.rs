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
//! the variants alternate and the medians are printed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use consign::inbox::{InboxConsumer, InboxLayer, Received};
use consign_test_support::effects::TestMessage;
use consign_test_support::{BrokerKind, effects};
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

async fn effects_count(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM test_effects")
        .fetch_one(pool)
        .await?)
}

/// Consumes the whole topic with `service` under a new group; returns
/// messages per second from the first effect to the last.
async fn run<S>(
    pool: &PgPool,
    inbox: &InboxLayer,
    service: S,
    bootstrap: &str,
    topic: &str,
    total: i64,
) -> Result<f64>
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
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(service, shutdown.clone()));
    // Time from the first effect, so that group join is not counted.
    while effects_count(pool).await? == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let started = Instant::now();
    let first = effects_count(pool).await?;
    loop {
        let done = effects_count(pool).await?;
        if done >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    shutdown.cancel();
    task.await??;
    Ok((total - first) as f64 / elapsed)
}

/// Runs the bare consumer and the inbox `rounds` times each, alternating,
/// over `messages` on a fresh broker of `kind`; prints each round and the
/// medians.
async fn compare(
    pool: &PgPool,
    kind: BrokerKind,
    messages: &[TestMessage],
    rounds: usize,
) -> Result<()> {
    let topic = "bench.inbox";
    let kafka = kind.start(topic, PARTITIONS).await?;
    let total = i64::try_from(messages.len())?;
    for chunk in messages.chunks(20_000) {
        effects::produce(kafka.bootstrap(), topic, chunk).await?;
    }
    let (mut bares, mut inboxes) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Each run is a new consumer group reading the topic from the start.
        let tag = format!("{kind:?}-{round}").to_lowercase();
        let bare_group = InboxLayer::new(pool.clone(), format!("bench-bare-{tag}"))?;
        let bare = run(
            pool,
            &bare_group,
            Bare { pool: pool.clone() },
            kafka.bootstrap(),
            topic,
            total,
        )
        .await?;
        let inbox = InboxLayer::new(pool.clone(), format!("bench-inbox-{tag}"))?;
        let service = ServiceBuilder::new()
            .layer(inbox.clone())
            .service_fn(effects::record);
        let with_inbox = run(pool, &inbox, service, kafka.bootstrap(), topic, total).await?;
        println!("    round {round}: bare {bare:>9.0} msg/s   inbox {with_inbox:>9.0} msg/s");
        bares.push(bare);
        inboxes.push(with_inbox);
    }
    let (bare, inbox) = (median(bares), median(inboxes));
    println!(
        "    {:<44} {:>9.0} msg/s (median)",
        "bare consumer (same write, no dedup)", bare
    );
    println!(
        "    {:<44} {:>9.0} msg/s (median)",
        "inbox (dedup + offsets + handler)", inbox
    );
    println!(
        "    inbox / bare = {:.3}   (target >= 0.95; inbox target >= 20000 msg/s)",
        inbox / bare
    );
    println!(
        "    per-message overhead of the inbox: {:.1} us\n",
        1e6 / inbox - 1e6 / bare
    );
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
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
    println!(
        "consumer throughput: {} messages, {PARTITIONS} partitions, {keys} keys, batches of up to 500, one INSERT per message, {rounds} rounds\n",
        messages.len()
    );
    for kind in BrokerKind::from_env() {
        println!("==== broker: {} ====", kind.describe());
        compare(&pool, kind, &messages, rounds).await?;
    }
    drop(pool);
    sqlx::query("DROP DATABASE IF EXISTS consign_bench_inbox WITH (FORCE)")
        .execute(&admin)
        .await?;
    Ok(())
}
