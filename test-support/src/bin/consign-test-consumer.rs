//! An inbox consumer for crash tests: handles `Step` messages from
//! `TEST_TOPIC` (group `TEST_GROUP`, broker `TEST_BOOTSTRAP`, database
//! `DATABASE_URL`: PostgreSQL, `mysql://` or `sqlite://`) by recording each
//! effect in `test_effects`, until SIGTERM. `TEST_MAX_BATCH` sets the batch
//! size (default 500).

use std::time::Duration;

use anyhow::{Context, Result};
use consign_inbox::{BoxError, Delivery, InboxBackend, InboxConsumer, InboxLayer, RetryPolicy};
use consign_test_support::effects;
use sqlx::{
    MySqlPool, PgPool, Pool, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode},
};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

fn var(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set"))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let url = var("DATABASE_URL")?;
    if url.starts_with("mysql:") {
        run(MySqlPool::connect(&url).await?, effects::record_mysql).await
    } else if url.starts_with("sqlite:") {
        let options = url
            .parse::<SqliteConnectOptions>()?
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        run(
            SqlitePool::connect_with(options).await?,
            effects::record_sqlite,
        )
        .await
    } else {
        run(PgPool::connect(&url).await?, effects::record).await
    }
}

async fn run<DB, H, F>(pool: Pool<DB>, handler: H) -> Result<()>
where
    DB: InboxBackend,
    H: Fn(Delivery<DB>) -> F + Clone + Send + 'static,
    F: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let inbox = InboxLayer::builder(pool, var("TEST_GROUP")?)
        .retry(
            RetryPolicy::default()
                .with_delays(Duration::from_millis(20), RetryPolicy::default().max_delay),
        )
        .build()?;
    let service = ServiceBuilder::new()
        .layer(inbox.clone())
        .service_fn(handler);
    let consumer = InboxConsumer::builder(&inbox)
        .topic(var("TEST_TOPIC")?)
        .kafka("bootstrap.servers", var("TEST_BOOTSTRAP")?)
        .kafka("session.timeout.ms", "6000")
        .kafka("heartbeat.interval.ms", "500")
        .max_batch(match std::env::var("TEST_MAX_BATCH") {
            Ok(n) => n.parse().context("TEST_MAX_BATCH")?,
            Err(_) => 500,
        })
        .build()?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        term.recv().await;
        stop.cancel();
    });
    consumer.run(service, shutdown).await?;
    let stats = inbox.stats();
    println!("stopped: {stats:?}");
    Ok(())
}
