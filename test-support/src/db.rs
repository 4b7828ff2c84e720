//! Database helpers for tests that get a pool from `#[sqlx::test]`.

use anyhow::Result;
use sqlx::{ConnectOptions, PgPool};

/// A URL for the pool's database, to hand to a relay child process.
#[must_use]
pub fn url(pool: &PgPool) -> String {
    pool.connect_options().to_url_lossy().to_string()
}

/// Rows still in the outbox.
///
/// # Errors
/// On a database error.
pub async fn outbox_len(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM consign_outbox")
        .fetch_one(pool)
        .await?)
}

/// Commits `msgs` to the outbox in one transaction.
///
/// # Errors
/// On a database error or a message the outbox refuses.
pub async fn enqueue_all(pool: &PgPool, msgs: &[consign_outbox::Message]) -> Result<()> {
    let mut tx = pool.begin().await?;
    consign_outbox::Outbox::new()
        .enqueue_batch(&mut *tx, msgs)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Waits until the outbox is empty, for at most `timeout`.
///
/// # Errors
/// On a database error, or if rows are still there after `timeout`.
pub async fn wait_drained(pool: &PgPool, timeout: std::time::Duration) -> Result<()> {
    crate::eventually("the outbox to drain", timeout, || async {
        Ok((outbox_len(pool).await? == 0).then_some(()))
    })
    .await
}

/// Terminates every session of this database whose `application_name` is
/// `application`, as an operator or a failover would. Returns how many.
///
/// # Errors
/// On a database error.
pub async fn terminate_sessions(pool: &PgPool, application: &str) -> Result<i64> {
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1
         ) t",
    )
    .bind(application)
    .fetch_one(pool)
    .await?;
    Ok(killed)
}

/// Takes `ACCESS EXCLUSIVE` on `consign_outbox` in a transaction of its
/// own, as a migration would: every read and write of the outbox waits
/// until the returned transaction ends (rolled back or dropped).
///
/// # Errors
/// On a database error.
pub async fn lock_outbox(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let mut lock = pool.begin().await?;
    sqlx::query("LOCK TABLE consign_outbox IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await?;
    Ok(lock)
}

/// Runs `body` on a PostgreSQL database of its own, `{prefix}_{pid}`,
/// created on the server of `DATABASE_URL` (default: the local test server)
/// and dropped afterwards, whatever `body` returned. For the benchmarks,
/// which own their tables.
///
/// # Errors
/// If the server cannot be reached, the database cannot be created or
/// dropped, or `body` fails (its error comes first).
pub async fn with_scratch_database<T, F, Fut>(prefix: &str, body: F) -> Result<T>
where
    F: FnOnce(sqlx::postgres::PgConnectOptions) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    use anyhow::Context as _;
    use sqlx::{Connection as _, Executor as _};

    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let database = format!("{prefix}_{}", std::process::id());
    let mut admin = sqlx::PgConnection::connect(&url)
        .await
        .context("connecting to DATABASE_URL")?;
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .await?;
    let options = url
        .parse::<sqlx::postgres::PgConnectOptions>()?
        .database(&database);
    let result = body(options).await;
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {database} WITH (FORCE)"
        )))
        .await?;
    result
}
