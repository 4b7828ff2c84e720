//! `cargo bench --bench backends`: per database (PostgreSQL, MariaDB for
//! MySQL, SQLite),
//!
//! 1. what the outbox costs a business transaction, beside a hand-written
//!    outbox INSERT in the same run: an order row alone, with a hand-written
//!    INSERT of the event, and with `Outbox::enqueue_event`; `BENCH_CLIENTS`
//!    clients (default 8; SQLite, one writer at a time, 4), three
//!    interleaved rounds of `BENCH_SECONDS` (default 4) each;
//! 2. the relay draining a backlog of `BENCH_BACKLOG` (default 200,000)
//!    256-byte events over 1000 keys into librdkafka's mock cluster (the
//!    database side is what differs; the broker is the same for all), three
//!    rounds, each on a backlog written before the relay starts;
//! 3. on MySQL and SQLite, whose archive is one table, what the archive's
//!    retention costs: a backlog drained with `relay.archive = true`, then
//!    `cleanup_archive` deleting every archived row in batches of 10,000
//!    (PostgreSQL drops whole day partitions instead).
//!
//! Medians are printed with every round. Needs the MariaDB of
//! `scripts/services.sh mariadb` (or `MYSQL_URL`); SQLite needs nothing.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use consign::{Message, Relay};
use consign_test_support::{
    MockKafka,
    backends::{self, AnyPool, Backend, TestDb},
};

#[macro_use]
#[path = "support/orders.rs"]
mod orders;

use orders::{env_number, summary};

backend_bench!(
    postgres,
    sqlx::PgPool,
    "INSERT INTO bench_orders (id, customer, total_cents) VALUES ($1, $2, $3)",
    "INSERT INTO consign_outbox (id, partition, topic, key, event_type, payload) \
     VALUES ($1, $2, $3, $4, $5, $6)",
    "DELETE FROM consign_outbox"
);
backend_bench!(
    mysql,
    sqlx::MySqlPool,
    "INSERT INTO bench_orders (id, customer, total_cents) VALUES (?, ?, ?)",
    "INSERT INTO consign_outbox (id, `partition`, topic, `key`, event_type, payload, headers) \
     VALUES (?, ?, ?, ?, ?, ?, '{}')",
    "DELETE FROM consign_outbox"
);
backend_bench!(
    sqlite,
    sqlx::SqlitePool,
    "INSERT INTO bench_orders (id, customer, total_cents) VALUES (?, ?, ?)",
    "INSERT INTO consign_outbox (id, \"partition\", topic, \"key\", event_type, payload) \
     VALUES (?, ?, ?, ?, ?, ?)",
    "DELETE FROM consign_outbox"
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
        "consign / hand-written: PostgreSQL {:.3}, MariaDB {:.3}, SQLite {:.3}\n",
        pg?, my?, lite?
    );

    let backlog = env_number("BENCH_BACKLOG", 200_000);
    println!(
        "relay drain: {backlog} events of 256 bytes (1000 keys) into the mock cluster, 3 rounds"
    );
    let mut drains = Vec::new();
    for (backend, name) in [
        (Backend::Postgres, "PostgreSQL"),
        (Backend::MySql, "MariaDB (MySQL backend)"),
        (Backend::Sqlite, "SQLite"),
    ] {
        let db = TestDb::new(backend).await?;
        drains.push((name, drain(&db, name, backlog).await?));
        if backend != Backend::Postgres {
            archive_retention(&db, name, backlog).await?;
        }
        db.drop().await?;
    }
    let line: Vec<String> = drains
        .iter()
        .map(|(name, rate)| format!("{name} {rate:.0}"))
        .collect();
    println!("relay drain, events/s (median): {}", line.join(", "));
    Ok(())
}

/// Drains `backlog` events with the archive on, then times deleting the
/// archived rows with the retention of `consign-relay cleanup`.
async fn archive_retention(db: &TestDb, name: &str, backlog: u64) -> Result<()> {
    const TOPIC: &str = "bench.archive";
    let kafka = MockKafka::start(1)?;
    kafka.create_topic(TOPIC, 6)?;
    fill(db, TOPIC, backlog).await?;
    let relay = Relay::builder(db.relay_pool())
        .kafka("bootstrap.servers", kafka.bootstrap())
        .archive(true)
        .build()?
        .spawn();
    db.wait_drained(Duration::from_secs(300)).await?;
    relay.shutdown().await?;
    let archived = db.count("consign_outbox_archive").await?;
    let started = Instant::now();
    let cleaned =
        consign::relay::retention::cleanup_archive(db.relay_pool(), Duration::ZERO).await?;
    let took = started.elapsed().as_secs_f64();
    println!(
        "    {name:<26} archive retention: {} of {archived} archived rows deleted in {took:.2} s \
         ({:.0} rows/s, batches of 10,000)",
        cleaned.default_rows,
        cleaned.default_rows as f64 / took
    );
    Ok(())
}

/// Writes `backlog` 256-byte events over 1000 keys, 5000 per transaction.
/// Returns events written per second.
async fn fill(db: &TestDb, topic: &str, backlog: u64) -> Result<f64> {
    let payload = vec![b'x'; 256];
    let filled = Instant::now();
    let mut written = 0;
    while written < backlog {
        let msgs: Vec<Message> = (written..(written + 5000).min(backlog))
            .map(|i| {
                Message::new(topic, "Filler", payload.clone()).with_key(format!("key-{}", i % 1000))
            })
            .collect();
        db.enqueue(&msgs).await?;
        written += msgs.len() as u64;
    }
    let rate = backlog as f64 / filled.elapsed().as_secs_f64();
    if let AnyPool::Postgres(pool) = &db.pool {
        // What autovacuum does within a minute of such a fill, so that the
        // rounds compare like with like (the relay's batch read no longer
        // depends on statistics: 13 ms per batch without them, 2 ms with).
        sqlx::query("ANALYZE consign_outbox").execute(pool).await?;
    }
    Ok(rate)
}

/// Three rounds of: write `backlog` events (5000 per transaction), then a
/// relay (production settings, batch 1000) publishes them. Returns the
/// median rate (events acknowledged per second, start-up included).
async fn drain(db: &TestDb, name: &str, backlog: u64) -> Result<f64> {
    const TOPIC: &str = "bench.drain";
    let kafka = MockKafka::start(1)?;
    kafka.create_topic(TOPIC, 6)?;
    let (mut rates, mut fills) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        fills.push(fill(db, TOPIC, backlog).await?);
        let published = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&published);
        let started = Instant::now();
        let relay = Relay::builder(db.relay_pool())
            .kafka("bootstrap.servers", kafka.bootstrap())
            .on_published(move |ids| {
                counter.fetch_add(ids.len() as u64, Ordering::Relaxed);
            })
            .build()?
            .spawn();
        while published.load(Ordering::Relaxed) < backlog {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rates.push(backlog as f64 / started.elapsed().as_secs_f64());
        db.wait_drained(Duration::from_secs(120)).await?;
        relay.shutdown().await?;
    }
    let (rate, rounds) = summary(&rates);
    let (fill, fill_rounds) = summary(&fills);
    println!("    {name:<26} relay {rate:>8.0} events/s (rounds: {rounds})");
    println!(
        "    {:<26} fill  {fill:>8.0} events/s (rounds: {fill_rounds}; enqueue_batch of 5000)",
        ""
    );
    Ok(rate)
}
