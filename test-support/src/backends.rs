//! A throwaway database on each backend (PostgreSQL, MariaDB/MySQL,
//! SQLite) with consign's schema, for tests whose one body runs on all three
//! (see `on_every_backend!` in the tests).

use std::str::FromStr as _;

use anyhow::{Context, Result};
use sqlx::{
    Connection as _, MySqlConnection, MySqlPool, PgConnection, PgPool, SqlitePool,
    mysql::{MySqlConnectOptions, MySqlPoolOptions},
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions},
};

/// Environment variable with the MariaDB/MySQL server for the tests
/// (default `mysql://consign:consign@127.0.0.1:3306/test`, what `scripts/services.sh
/// mariadb` sets up).
pub const MYSQL_URL_ENV: &str = "MYSQL_URL";

fn mysql_url() -> String {
    std::env::var(MYSQL_URL_ENV)
        .unwrap_or_else(|_| "mysql://consign:consign@127.0.0.1:3306/test".into())
}

fn postgres_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn name() -> String {
    format!(
        "consign_b_{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

/// A fresh PostgreSQL database with consign's schema; drop it with
/// [`drop_postgres`].
///
/// # Errors
/// If the server does not answer or the migrations fail.
pub async fn postgres() -> Result<(PgPool, String)> {
    let options = PgConnectOptions::from_str(&postgres_url())?;
    let name = name();
    let mut admin = PgConnection::connect_with(&options).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options.database(&name))
        .await?;
    consign_outbox::migrate(&pool).await?;
    Ok((pool, name))
}

/// Drops a database of [`postgres`].
///
/// # Errors
/// If the server does not answer.
pub async fn drop_postgres(pool: PgPool, name: &str) -> Result<()> {
    pool.close().await;
    let mut admin = PgConnection::connect(&postgres_url()).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    Ok(())
}

/// An empty MariaDB/MySQL database ([`MYSQL_URL_ENV`]): its URL and name;
/// drop it with [`drop_mysql`].
///
/// # Errors
/// If the server does not answer (run `scripts/services.sh mariadb`).
pub async fn mysql_database() -> Result<(String, String)> {
    let url = mysql_url();
    let options = MySqlConnectOptions::from_str(&url)?;
    let name = name();
    let mut admin = MySqlConnection::connect_with(&options)
        .await
        .with_context(|| format!("connecting to {url} (run scripts/services.sh mariadb)"))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    let mut database = url::Url::parse(&url)?;
    database.set_path(&name);
    Ok((database.to_string(), name))
}

/// A fresh MariaDB/MySQL database ([`MYSQL_URL_ENV`]) with consign's
/// schema; drop it with [`drop_mysql`].
///
/// # Errors
/// If the server does not answer (run `scripts/services.sh mariadb`) or
/// the migrations fail.
pub async fn mysql() -> Result<(MySqlPool, String)> {
    let (url, name) = mysql_database().await?;
    let pool = MySqlPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await?;
    consign_outbox::migrate(&pool).await?;
    Ok((pool, name))
}

/// Drops a database of [`mysql`].
///
/// # Errors
/// If the server does not answer.
pub async fn drop_mysql(pool: Option<MySqlPool>, name: &str) -> Result<()> {
    if let Some(pool) = pool {
        pool.close().await;
    }
    let mut admin = MySqlConnection::connect(&mysql_url()).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&mut admin)
    .await?;
    Ok(())
}

/// A fresh SQLite file (WAL, 10 s busy timeout) with consign's schema, in
/// a directory removed when the returned guard drops.
///
/// # Errors
/// If the file cannot be created or the migrations fail.
pub async fn sqlite() -> Result<(SqlitePool, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("consign.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(std::time::Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await?;
    consign_outbox::migrate(&pool).await?;
    Ok((pool, dir))
}
