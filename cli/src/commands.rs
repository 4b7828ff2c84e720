//! The commands other than `run` and `dead-letters`.

use std::time::Duration;

use consign_relay::{Config, config::RetentionSettings};
use serde::Serialize;

use crate::{
    args::{Cli, Command, ConfigCommand},
    dead_letters,
    error::Result,
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
            cleanup(&database(&config)?, &retention, json).await
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
pub(crate) fn database(config: &Config) -> Result<sqlx::PgPool> {
    config.database.validate()?;
    Ok(config.database.connect_lazy_unbounded()?)
}

/// `migrate`: consign's schema on the database of `database.url`, chosen by
/// its scheme (postgres://, mysql:// or sqlite://).
async fn migrate(config: &Config) -> Result<()> {
    let url = config.database.url.trim();
    let migrator = if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        let pool = sqlx::MySqlPool::connect(url).await?;
        consign_outbox::migrate(&pool).await?;
        &consign_outbox::MYSQL_MIGRATOR
    } else if url.starts_with("sqlite:") {
        let options = url
            .parse::<sqlx::sqlite::SqliteConnectOptions>()?
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await?;
        consign_outbox::migrate(&pool).await?;
        &consign_outbox::SQLITE_MIGRATOR
    } else {
        consign_outbox::migrate(&database(config)?).await?;
        &consign_outbox::MIGRATOR
    };
    let latest = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    println!("consign schema is at version {latest}");
    Ok(())
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

async fn cleanup(pool: &sqlx::PgPool, retention: &RetentionSettings, json: bool) -> Result<()> {
    let inbox = consign_inbox::retention::Retention::inbox(retention.inbox)
        .dead_letters(retention.dead_letters);
    let inbox = consign_inbox::retention::cleanup(pool, inbox).await?;
    let archive = match retention.archive {
        Some(age) => consign_relay::retention::cleanup_archive(pool, age).await?,
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
    let status = Report {
        relay: consign_relay::status(&pool).await?,
        dead_letters: consign_inbox::dead_letters::counts(&pool).await?,
    };
    if json {
        print_json(&status);
    } else {
        print!("{}", status.to_table());
    }
    Ok(())
}
