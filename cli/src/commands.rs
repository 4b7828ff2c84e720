//! The commands other than `run` and `dead-letters`.

use std::time::Duration;

use consign_relay::{Config, DatabasePool, config::RetentionSettings};
use serde::Serialize;

use crate::{
    args::{Cli, Command, ConfigCommand},
    dead_letters,
    error::{Error, Result},
    load, run,
};

/// Runs one command.
pub(crate) async fn execute(cli: Cli) -> Result<()> {
    let config = load::load(cli.config.as_deref(), cli.profile)?;
    match cli.command {
        Command::Run => run::run(config).await,
        Command::Migrate => migrate(&config).await,
        Command::Status { json } => status(&config, json).await,
        Command::DeadLetters(command) => dead_letters::command(&config, command).await,
        Command::Cleanup {
            inbox_older_than,
            dead_letters_older_than,
            archive_older_than,
            json,
        } => {
            config.retention.validate()?;
            let mut retention = config.retention.clone();
            retention.inbox = inbox_older_than.unwrap_or(retention.inbox);
            retention.dead_letters = dead_letters_older_than.or(retention.dead_letters);
            retention.archive = archive_older_than.or(retention.archive);
            cleanup(&config, &retention, json).await
        }
        Command::Config(ConfigCommand::Check) => {
            config.validate()?;
            consign_relay::check_kafka_config(&config.kafka_properties())?;
            println!("configuration is valid (profile {})", config.profile);
            Ok(())
        }
        Command::Config(ConfigCommand::Show { json }) => {
            if json {
                print_json(&config.redacted());
            } else {
                print!("{}", load::to_redacted_toml(&config));
            }
            Ok(())
        }
    }
}

/// The pool of `[database]`, after checking that section.
pub(crate) fn database(config: &Config) -> Result<DatabasePool> {
    config.database.validate()?;
    Ok(config.database.connect_lazy_unbounded()?)
}

/// `$body` with `$pool` bound to the sqlx pool inside a [`DatabasePool`]
/// (for the libraries' functions generic over the database).
macro_rules! with_pool {
    ($database:expr, $pool:ident => $body:expr) => {
        match $database {
            DatabasePool::Postgres($pool) => $body,
            #[cfg(feature = "mysql")]
            DatabasePool::MySql($pool) => $body,
            #[cfg(feature = "sqlite")]
            DatabasePool::Sqlite($pool) => $body,
            #[allow(unreachable_patterns)] // the pool enum is non-exhaustive
            other => {
                return Err(crate::error::Error::Unsupported {
                    backend: other.backend(),
                })
            }
        }
    };
}
pub(crate) use with_pool;

/// `migrate`: consign's schema on the database of `database.url`, chosen by
/// its scheme (postgres://, mysql:// or sqlite://).
async fn migrate(config: &Config) -> Result<()> {
    let migrator = match database(config)? {
        DatabasePool::Postgres(pool) => {
            consign_outbox::migrate(&pool).await?;
            &consign_outbox::MIGRATOR
        }
        #[cfg(feature = "mysql")]
        DatabasePool::MySql(pool) => {
            consign_outbox::migrate(&pool).await?;
            &consign_outbox::MYSQL_MIGRATOR
        }
        #[cfg(feature = "sqlite")]
        DatabasePool::Sqlite(_) => {
            // Created if missing: `migrate` is how a SQLite outbox begins.
            let options = config
                .database
                .url
                .trim()
                .parse::<sqlx::sqlite::SqliteConnectOptions>()?
                .create_if_missing(true);
            let path = options.get_filename().to_owned();
            let pool = sqlx::SqlitePool::connect_with(options)
                .await
                .map_err(|e| sqlite_file_error(&path, &e))?;
            consign_outbox::migrate(&pool).await?;
            &consign_outbox::SQLITE_MIGRATOR
        }
        #[allow(unreachable_patterns)] // the pool enum is non-exhaustive
        other => {
            return Err(Error::Unsupported {
                backend: other.backend(),
            });
        }
    };
    let latest = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    println!("consign schema is at version {latest}");
    Ok(())
}

/// Before `run` on SQLite: the file exists and this process may write it
/// (the relay deletes what it publishes), so that a wrong path or missing
/// permission stops the relay at once with the file's name, instead of
/// failing every round. Other backends: nothing to check (their server may
/// be down now and come back; the relay waits for it).
#[cfg(feature = "sqlite")]
pub(crate) async fn check_sqlite(config: &Config) -> Result<()> {
    use sqlx::Connection as _;
    let url = config.database.url.trim();
    if !url.starts_with("sqlite:") {
        return Ok(());
    }
    let options = url.parse::<sqlx::sqlite::SqliteConnectOptions>()?;
    let path = options.get_filename().to_owned();
    if !path.exists() {
        return Err(Error::SqliteFile {
            path,
            reason: "no such file; create it with `consign-relay migrate`".into(),
        });
    }
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| sqlite_file_error(&path, &e))?;
    // A write proves write access (SQLite opens a file it may not write
    // read-only, and only refuses the first write); rolled back.
    let write =
        sqlx::raw_sql("BEGIN IMMEDIATE; UPDATE consign_outbox_identity SET outbox_id = outbox_id")
            .execute(&mut conn)
            .await;
    sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.ok();
    write.map_err(|e| sqlite_file_error(&path, &e))?;
    conn.close().await.ok();
    Ok(())
}

#[cfg(not(feature = "sqlite"))]
pub(crate) async fn check_sqlite(_config: &Config) -> Result<()> {
    Ok(())
}

#[cfg(feature = "sqlite")]
fn sqlite_file_error(path: &std::path::Path, error: &sqlx::Error) -> Error {
    let reason = match error {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_PERM, SQLITE_AUTH
            Some("8" | "14" | "3" | "23") => format!(
                "{} (the relay's user needs to read and write the file and its directory)",
                db.message()
            ),
            _ => db.message().to_owned(),
        },
        other => other.to_string(),
    };
    Error::SqliteFile {
        path: path.to_owned(),
        reason,
    }
}

pub(crate) fn print_json(value: &impl serde::Serialize) {
    let text = serde_json::to_string_pretty(value);
    println!("{}", text.expect("plain, serializable fields"));
}

/// What `cleanup` deleted, in the inbox's tables and the relay's archive.
#[derive(Serialize)]
struct Cleaned {
    inbox_records: u64,
    dead_letters: u64,
    archive_partitions: Vec<String>,
    archive_default_rows: u64,
}

async fn cleanup(config: &Config, retention: &RetentionSettings, json: bool) -> Result<()> {
    let pool = database(config)?;
    let inbox = consign_inbox::retention::Retention::inbox(retention.inbox)
        .dead_letters(retention.dead_letters);
    let inbox = with_pool!(&pool, p => consign_inbox::retention::cleanup(p, inbox).await?);
    let archive = match retention.archive {
        Some(age) => consign_relay::retention::cleanup_archive(&pool, age).await?,
        None => consign_relay::retention::ArchiveCleaned::default(),
    };
    let cleaned = Cleaned {
        inbox_records: inbox.inbox_records,
        dead_letters: inbox.dead_letters,
        archive_partitions: archive.partitions,
        archive_default_rows: archive.default_rows,
    };
    if json {
        print_json(&cleaned);
        return Ok(());
    }
    let age = |age: Option<Duration>, what: &str| {
        age.map_or_else(
            || format!(" (no {what} retention set)"),
            |age| format!(" older than {}", humantime::format_duration(age)),
        )
    };
    println!(
        "deleted {} inbox records older than {}",
        cleaned.inbox_records,
        humantime::format_duration(retention.inbox)
    );
    println!(
        "deleted {} dead letters{}",
        cleaned.dead_letters,
        age(retention.dead_letters, "dead-letter")
    );
    println!(
        "dropped {} archive partitions{}{}",
        cleaned.archive_partitions.len(),
        age(retention.archive, "archive"),
        if cleaned.archive_partitions.is_empty() {
            String::new()
        } else {
            format!(": {}", cleaned.archive_partitions.join(", "))
        }
    );
    Ok(())
}

/// What `status` prints: the relays' view of the outbox, and the inbox
/// consumers' dead letters.
#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    relay: consign_relay::Status,
    dead_letters: Vec<consign_inbox::dead_letters::DeadLetterCount>,
}

impl Report {
    fn to_table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = self.relay.to_table();
        let letters: i64 = self.dead_letters.iter().map(|d| d.count).sum();
        let _ = writeln!(out, "\ndead letters: {letters}");
        for count in &self.dead_letters {
            let _ = writeln!(
                out,
                "  {:<40} {:>8}  latest {}",
                count.consumer,
                count.count,
                consign_relay::status::ago(self.relay.now, count.latest)
            );
        }
        out
    }
}

async fn status(config: &Config, json: bool) -> Result<()> {
    let pool = database(config)?;
    let dead_letters = with_pool!(&pool, p => consign_inbox::dead_letters::counts(p).await?);
    let status = Report {
        relay: consign_relay::status(&pool).await?,
        dead_letters,
    };
    if json {
        print_json(&status);
    } else {
        print!("{}", status.to_table());
    }
    Ok(())
}
