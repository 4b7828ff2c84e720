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

/// The backends the guarantee suite runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL (`DATABASE_URL`).
    Postgres,
    /// MariaDB or MySQL ([`MYSQL_URL_ENV`]).
    MySql,
    /// A SQLite file in a temporary directory.
    Sqlite,
}

/// A pool of one of the backends.
#[derive(Debug, Clone)]
pub enum AnyPool {
    /// PostgreSQL.
    Postgres(PgPool),
    /// MariaDB/MySQL.
    MySql(MySqlPool),
    /// SQLite.
    Sqlite(SqlitePool),
}

/// `$body` with `$pool` bound to the backend's pool.
macro_rules! on_pool {
    ($any:expr, $pool:ident => $body:expr) => {
        match $any {
            AnyPool::Postgres($pool) => $body,
            AnyPool::MySql($pool) => $body,
            AnyPool::Sqlite($pool) => $body,
        }
    };
}

/// A throwaway database of one backend with consign's schema, its URL for
/// relay processes, and what the guarantee tests ask of it. Dropped (server
/// databases) by [`TestDb::drop`]; a SQLite file goes with its directory.
#[derive(Debug)]
pub struct TestDb {
    /// The pool.
    pub pool: AnyPool,
    url: String,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A fresh database of `backend` with consign's schema.
    ///
    /// # Errors
    /// If the server does not answer or the migrations fail.
    pub async fn new(backend: Backend) -> Result<Self> {
        Ok(match backend {
            Backend::Postgres => {
                let (pool, name) = postgres().await?;
                let url = crate::db::url(&pool);
                Self {
                    pool: AnyPool::Postgres(pool),
                    url,
                    name,
                    _dir: None,
                }
            }
            Backend::MySql => {
                let (url, name) = mysql_database().await?;
                let pool = MySqlPoolOptions::new()
                    .max_connections(8)
                    .connect(&url)
                    .await?;
                consign_outbox::migrate(&pool).await?;
                Self {
                    pool: AnyPool::MySql(pool),
                    url,
                    name,
                    _dir: None,
                }
            }
            Backend::Sqlite => {
                let (pool, dir) = sqlite().await?;
                let url = format!("sqlite://{}", dir.path().join("consign.db").display());
                Self {
                    pool: AnyPool::Sqlite(pool),
                    url,
                    name: String::new(),
                    _dir: Some(dir),
                }
            }
        })
    }

    /// The database's URL, for a `consign-relay` process.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The pool as the relay library takes it.
    #[must_use]
    pub fn relay_pool(&self) -> consign_relay::DatabasePool {
        on_pool!(&self.pool, pool => pool.into())
    }

    /// The backend.
    #[must_use]
    pub fn backend(&self) -> Backend {
        match self.pool {
            AnyPool::Postgres(_) => Backend::Postgres,
            AnyPool::MySql(_) => Backend::MySql,
            AnyPool::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Rows in `table` (one of consign's).
    ///
    /// # Errors
    /// On a database error.
    pub async fn count(&self, table: &str) -> Result<i64> {
        let count = format!("SELECT count(*) FROM {table}");
        let count = sqlx::AssertSqlSafe(count);
        Ok(on_pool!(&self.pool, pool => sqlx::query_scalar(count).fetch_one(pool).await?))
    }

    /// Rows still in the outbox.
    ///
    /// # Errors
    /// On a database error.
    pub async fn outbox_len(&self) -> Result<i64> {
        self.count("consign_outbox").await
    }

    /// Waits until the outbox is empty, for at most `timeout`.
    ///
    /// # Errors
    /// On a database error, or if rows are still there after `timeout`.
    pub async fn wait_drained(&self, timeout: std::time::Duration) -> Result<()> {
        crate::eventually("the outbox to drain", timeout, || async {
            Ok((self.outbox_len().await? == 0).then_some(()))
        })
        .await
    }

    /// Enqueues `msgs` in one transaction.
    ///
    /// # Errors
    /// If the database or the outbox refuses them.
    pub async fn enqueue(&self, msgs: &[consign_outbox::Message]) -> Result<()> {
        let outbox = consign_outbox::Outbox::new();
        on_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await?;
            outbox.enqueue_batch(&mut *tx, msgs).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Writes `stream` to `topic` (see [`crate::stream::write_stream`]).
    ///
    /// # Panics
    /// If the database refuses a write.
    pub async fn write_stream(
        &self,
        topic: String,
        stream: crate::stream::Stream,
    ) -> Vec<uuid::Uuid> {
        let mut ids = Vec::new();
        for msgs in stream.batches(&topic) {
            self.enqueue(&msgs).await.unwrap();
            ids.extend(msgs.iter().map(consign_outbox::Message::id));
            tokio::time::sleep(stream.pause()).await;
        }
        ids
    }

    /// Closes every connection the server has open for this database other
    /// than the test's own, as an operator's `KILL` or a failover would
    /// (PostgreSQL: `pg_terminate_backend`; MariaDB: `KILL`). Returns how
    /// many. SQLite has no server: 0.
    ///
    /// # Errors
    /// On a database error.
    pub async fn kill_other_connections(&self) -> Result<u64> {
        match &self.pool {
            AnyPool::Postgres(pool) => Ok(sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM (
                     SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()
                       AND backend_type = 'client backend'
                 ) t",
            )
            .fetch_one(pool)
            .await?
            .try_into()?),
            AnyPool::MySql(pool) => {
                let mut conn = pool.acquire().await?;
                let ids: Vec<i64> = sqlx::query_scalar(
                    "SELECT id FROM information_schema.processlist
                     WHERE db = DATABASE() AND id <> CONNECTION_ID()",
                )
                .fetch_all(&mut *conn)
                .await?;
                let mut killed = 0;
                for id in ids {
                    // Gone already is fine: it was closing anyway.
                    if sqlx::query(sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}")))
                        .execute(&mut *conn)
                        .await
                        .is_ok()
                    {
                        killed += 1;
                    }
                }
                Ok(killed)
            }
            AnyPool::Sqlite(_) => Ok(0),
        }
    }

    /// Marks the outbox row of message `id` as waiting for a retry for
    /// `seconds` (negative: due since), as the relay does after a refusal.
    ///
    /// # Errors
    /// On a database error.
    pub async fn postpone(&self, id: uuid::Uuid, seconds: i64) -> Result<()> {
        let done = match &self.pool {
            AnyPool::Postgres(pool) => sqlx::query(
                "UPDATE consign_outbox SET attempts = attempts + 1, last_error = 'postponed',
                     next_attempt_at = now() + $2 * interval '1 second' WHERE id = $1",
            )
            .bind(id)
            .bind(seconds)
            .execute(pool)
            .await?
            .rows_affected(),
            AnyPool::MySql(pool) => sqlx::query(
                "UPDATE consign_outbox SET attempts = attempts + 1, last_error = 'postponed',
                     next_attempt_at = UTC_TIMESTAMP(6) + INTERVAL ? SECOND WHERE id = ?",
            )
            .bind(seconds)
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected(),
            AnyPool::Sqlite(pool) => sqlx::query(
                "UPDATE consign_outbox SET attempts = attempts + 1, last_error = 'postponed',
                     next_attempt_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) WHERE id = ?",
            )
            .bind(format!("{seconds:+} seconds"))
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected(),
        };
        anyhow::ensure!(done == 1, "no outbox row for {id}");
        Ok(())
    }

    /// Creates `test_effects` (see [`crate::effects`]).
    ///
    /// # Errors
    /// On a database error.
    pub async fn create_effects_table(&self) -> Result<()> {
        match &self.pool {
            AnyPool::Postgres(pool) => crate::effects::create_table(pool).await?,
            AnyPool::MySql(pool) => {
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS test_effects (
                         seq BIGINT AUTO_INCREMENT PRIMARY KEY, message_id BINARY(16) NOT NULL,
                         `key` INT NOT NULL, n INT NOT NULL)",
                )
                .execute(pool)
                .await?;
            }
            AnyPool::Sqlite(pool) => {
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS test_effects (
                         seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id BLOB NOT NULL,
                         \"key\" INTEGER NOT NULL, n INTEGER NOT NULL)",
                )
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// An inbox consumer in this process (group `group`) recording
    /// [`crate::effects::Step`]s in `test_effects` with the backend's
    /// handler; no retries beyond a second attempt.
    ///
    /// # Panics
    /// If the inbox cannot be built.
    #[must_use]
    pub fn start_inbox(
        &self,
        group: &str,
        bootstrap: &str,
        topic: &str,
    ) -> crate::effects::Running {
        use crate::effects::{Running, record, record_mysql, record_sqlite};
        use consign_inbox::{InboxLayer, RetryPolicy};
        let retry = RetryPolicy::attempts(2).with_delays(
            std::time::Duration::from_millis(10),
            std::time::Duration::from_millis(50),
        );
        macro_rules! start {
            ($pool:expr, $handler:expr) => {{
                let inbox = InboxLayer::builder($pool.clone(), group)
                    .retry(retry)
                    .build()
                    .unwrap();
                let service = tower::ServiceBuilder::new()
                    .layer(inbox.clone())
                    .service_fn($handler);
                Running::start(&inbox, service, bootstrap, topic)
            }};
        }
        match &self.pool {
            AnyPool::Postgres(pool) => start!(pool, record),
            AnyPool::MySql(pool) => start!(pool, record_mysql),
            AnyPool::Sqlite(pool) => start!(pool, record_sqlite),
        }
    }

    /// What `test_effects` says (see [`crate::effects::tally`]).
    ///
    /// # Errors
    /// On a database error.
    pub async fn tally(&self) -> Result<crate::effects::Tally> {
        use crate::effects::{OUT_OF_ORDER, TALLY, Tally};
        let quoted = match self.pool {
            AnyPool::MySql(_) => OUT_OF_ORDER.to_owned(),
            _ => OUT_OF_ORDER.replace('`', "\""),
        };
        let (effects, distinct, out_of_order_keys) = on_pool!(&self.pool, pool => {
            let (effects, distinct): (i64, i64) = sqlx::query_as(TALLY).fetch_one(pool).await?;
            let out: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(quoted))
                .fetch_one(pool)
                .await?;
            (effects, distinct, out)
        });
        Ok(Tally {
            effects,
            distinct,
            out_of_order_keys,
        })
    }

    /// Closes the pool and drops the database.
    ///
    /// # Errors
    /// If the server does not answer.
    pub async fn drop(self) -> Result<()> {
        match self.pool {
            AnyPool::Postgres(pool) => drop_postgres(pool, &self.name).await,
            AnyPool::MySql(pool) => drop_mysql(Some(pool), &self.name).await,
            AnyPool::Sqlite(pool) => {
                pool.close().await;
                Ok(())
            }
        }
    }
}
