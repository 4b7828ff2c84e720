//! The `consign-relay` command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use chrono::{DateTime, Utc};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::{
    Config, Error, Relay, Result,
    config::Profile,
    dead_letters::{self, Selection},
    retention::{self, Retention},
};

/// consign-relay: publishes committed outbox rows to Kafka.
#[derive(Debug, Parser)]
#[command(name = "consign-relay", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML; see reference.toml). Environment variables
    /// CONSIGN_SECTION__FIELD (e.g. CONSIGN_RELAY__BATCH_SIZE) and DATABASE_URL override it.
    #[arg(long, short, env = "CONSIGN_CONFIG", global = true)]
    config: Option<PathBuf>,

    /// Defaults to start from: development, testing or production. Overrides
    /// `profile` in the file and CONSIGN_PROFILE. Default: production.
    #[arg(long, global = true, value_parser = clap::value_parser!(Profile))]
    profile: Option<Profile>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish outbox rows until SIGTERM or SIGINT.
    Run,
    /// Create or upgrade consign's tables (safe to run again).
    Migrate,
    /// Show the running relays, who leases which partition, and the
    /// backlog per partition.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Check or print the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// List, requeue or purge the dead letters of inbox consumers.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Delete inbox dedup records, dead letters (if configured) and archive
    /// partitions older than the [retention] settings.
    Cleanup {
        /// Override retention.inbox (e.g. 7days, 12h).
        #[arg(long, value_parser = humantime::parse_duration)]
        inbox_older_than: Option<Duration>,
        /// Override retention.dead-letters (e.g. 90days).
        #[arg(long, value_parser = humantime::parse_duration)]
        dead_letters_older_than: Option<Duration>,
        /// Override retention.archive (e.g. 30days).
        #[arg(long, value_parser = humantime::parse_duration)]
        archive_older_than: Option<Duration>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which dead letters: conditions combine with AND.
#[derive(Debug, clap::Args)]
struct SelectArgs {
    /// Dead-letter id (repeatable).
    #[arg(long = "id")]
    ids: Vec<i64>,
    /// Only this consumer's letters.
    #[arg(long)]
    consumer: Option<String>,
    /// Only letters with this Kafka key.
    #[arg(long)]
    key: Option<String>,
    /// Only letters that failed at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<DateTime<Utc>>,
    /// Only letters that failed before this time (RFC 3339).
    #[arg(long)]
    until: Option<DateTime<Utc>>,
    /// Every letter (with the other conditions, if any).
    #[arg(long)]
    all: bool,
}

impl SelectArgs {
    fn selection(self, default_all: bool) -> Result<Selection> {
        let mut selection = Selection {
            ids: self.ids,
            consumer: self.consumer,
            key: self.key,
            since: self.since,
            until: self.until,
            all: self.all,
        };
        if selection == Selection::default() {
            if !default_all {
                return Err(Error::ConfigSource(
                    "name the dead letters: --id, --consumer, --key, --since/--until, or --all"
                        .into(),
                ));
            }
            selection.all = true;
        }
        Ok(selection)
    }
}

#[derive(Debug, Subcommand)]
enum DeadLetterCommand {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        select: SelectArgs,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back on their topic through the outbox, to be
    /// handled again by the consumer that gave up (once).
    Requeue {
        #[command(flatten)]
        select: SelectArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters.
    Purge {
        #[command(flatten)]
        select: SelectArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration (file, environment, profile) without
    /// connecting; exit 1 with the field and the allowed values if invalid.
    Check,
    /// Print the effective configuration, secrets redacted.
    Show {
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
}

/// Parses the arguments, runs the command, prints any error, returns the
/// exit status (1 on error).
#[must_use]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            if let Error::Database(sqlx::Error::Database(db)) = &error
                && db.code().as_deref() == Some("42P01")
            {
                eprintln!("hint: consign's tables are missing; run `consign-relay migrate` first");
            }
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> Result<()> {
    let config = Config::load(cli.config.as_deref(), cli.profile)?;
    match cli.command {
        Command::Run => run(config).await,
        Command::Migrate => migrate(&config).await,
        Command::Status { json } => status(&config, json).await,
        Command::DeadLetters(command) => dead_letter_command(&config, command).await,
        Command::Cleanup {
            inbox_older_than,
            dead_letters_older_than,
            archive_older_than,
            json,
        } => {
            config.retention.validate()?;
            let pool = database(&config)?;
            let mut retention =
                Retention::inbox(inbox_older_than.unwrap_or(config.retention.inbox));
            retention.dead_letters = dead_letters_older_than.or(config.retention.dead_letters);
            retention.archive = archive_older_than.or(config.retention.archive);
            let cleaned = retention::cleanup(&pool, retention).await?;
            if json {
                print_json(&cleaned);
            } else {
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
            }
            Ok(())
        }
        Command::Config(ConfigCommand::Check) => {
            config.validate()?;
            crate::builder::check_kafka_config(&config.kafka_properties())?;
            println!("configuration is valid (profile {})", config.profile);
            Ok(())
        }
        Command::Config(ConfigCommand::Show { json }) => {
            if json {
                print_json(&config.redacted());
            } else {
                print!("{}", config.to_redacted_toml());
            }
            Ok(())
        }
    }
}

async fn run(config: Config) -> Result<()> {
    config.validate()?;
    let relay = Relay::builder(config.database.connect_lazy()?)
        .kafka_properties(config.kafka_properties())
        .settings(config.relay)
        .sample_interval(config.admin.sample_interval)
        .database_deadline(config.database.deadline())
        .build()?;
    let shutdown = CancellationToken::new();
    if config.admin.enabled {
        let metrics = crate::metrics::install_prometheus().map_err(Error::ConfigSource)?;
        let listen = config.admin.listen;
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            Error::config("admin.listen", format!("cannot listen on {listen}: {e}"))
        })?;
        let address = listener.local_addr().unwrap_or(listen);
        tracing::info!(%address, "serving /metrics and /health");
        let (health, stop) = (relay.health(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(error) = crate::admin::serve(listener, health, Some(metrics), stop).await {
                tracing::error!(%error, "the admin endpoint failed");
            }
        });
    }
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    relay.run(shutdown).await
}

/// The pool of `[database]`, after checking that section.
fn database(config: &Config) -> Result<sqlx::PgPool> {
    config.database.validate()?;
    config.database.connect_lazy_unbounded()
}

async fn migrate(config: &Config) -> Result<()> {
    let pool = database(config)?;
    consign_outbox::migrate(&pool).await?;
    let latest = consign_outbox::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    println!("consign schema is at version {latest}");
    Ok(())
}

fn print_json(value: &impl serde::Serialize) {
    let text = serde_json::to_string_pretty(value);
    println!("{}", text.expect("plain, serializable fields"));
}

async fn dead_letter_command(config: &Config, command: DeadLetterCommand) -> Result<()> {
    let pool = database(config)?;
    match command {
        DeadLetterCommand::List {
            select,
            limit,
            json,
        } => {
            let letters = dead_letters::list(&pool, &select.selection(true)?, limit).await?;
            if json {
                print_json(&letters);
                return Ok(());
            }
            println!(
                "{:>8} {:<20} {:<24} {:>12} {:<16} {:>3} {:<20} ERROR",
                "ID", "CONSUMER", "TOPIC", "PART/OFFSET", "KEY", "TRY", "FAILED AT"
            );
            for l in &letters {
                println!(
                    "{:>8} {:<20} {:<24} {:>12} {:<16} {:>3} {:<20} {}",
                    l.id,
                    l.consumer,
                    l.topic,
                    format!("{}/{}", l.partition, l.offset),
                    l.key.as_deref().unwrap_or("-"),
                    l.attempts,
                    l.failed_at.format("%Y-%m-%d %H:%M:%S"),
                    l.error
                );
            }
            println!("{} dead letters", letters.len());
        }
        DeadLetterCommand::Requeue { select, json } => {
            let done = dead_letters::requeue(&pool, &select.selection(false)?).await?;
            if json {
                print_json(&done);
                return Ok(());
            }
            for (id, message) in &done.requeued {
                println!("requeued dead letter {id} as message {message}");
            }
            for (id, reason) in &done.skipped {
                println!("kept dead letter {id}: {reason}");
            }
            println!(
                "{} requeued, {} kept",
                done.requeued.len(),
                done.skipped.len()
            );
        }
        DeadLetterCommand::Purge { select, json } => {
            let purged = dead_letters::purge(&pool, &select.selection(false)?).await?;
            if json {
                print_json(&serde_json::json!({ "purged": purged }));
            } else {
                println!("purged {purged} dead letters");
            }
        }
    }
    Ok(())
}

async fn status(config: &Config, json: bool) -> Result<()> {
    let status = crate::status::status(&database(config)?).await?;
    if json {
        print_json(&status);
    } else {
        print!("{}", status.to_table());
    }
    Ok(())
}

/// Cancels `token` on SIGTERM or SIGINT.
async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the relay with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing the batch in flight"),
        _ = int.recv() => tracing::info!("SIGINT: finishing the batch in flight"),
    }
    token.cancel();
}

fn init_logging() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,rdkafka=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
