//! `cargo bench --bench backends`: what the outbox costs a business
//! transaction on each database, beside a hand-written outbox INSERT in the
//! same run. Per backend (PostgreSQL, MariaDB for MySQL, SQLite): an order
//! row alone, with a hand-written INSERT of the event, and with
//! `Outbox::enqueue_event`; `BENCH_CLIENTS` clients (default 8; SQLite,
//! one writer at a time, 4), three interleaved rounds of `BENCH_SECONDS`
//! (default 4) each, medians printed with every round. Needs the MariaDB of
//! `scripts/services.sh mariadb` (or `MYSQL_URL`); SQLite needs nothing.

use anyhow::Result;
use consign_test_support::backends;

#[macro_use]
#[path = "support/orders.rs"]
mod orders;

use orders::env_number;

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
        "consign / hand-written: PostgreSQL {:.3}, MariaDB {:.3}, SQLite {:.3}",
        pg?, my?, lite?
    );
    Ok(())
}
