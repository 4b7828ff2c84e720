//! The `consign-relay` command line.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::{Config, Error, Relay, Result, config::Profile};

/// consign-relay: publishes committed outbox rows to Kafka.
#[derive(Debug, Parser)]
#[command(name = "consign-relay", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML; see reference.toml). Environment variables
    /// CONSIGN_<SECTION>__<FIELD> and DATABASE_URL override it.
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
        Command::Config(ConfigCommand::Check) => {
            config.validate()?;
            println!("configuration is valid (profile {})", config.profile);
            Ok(())
        }
        Command::Config(ConfigCommand::Show { json }) => {
            if json {
                let text = serde_json::to_string_pretty(&config.redacted());
                println!("{}", text.expect("the configuration serializes to JSON"));
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

async fn migrate(config: &Config) -> Result<()> {
    config.database.validate()?;
    let pool = config.database.connect_lazy()?;
    consign_outbox::migrate(&pool).await?;
    let latest = consign_outbox::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    println!("consign schema is at version {latest}");
    Ok(())
}

async fn status(config: &Config, json: bool) -> Result<()> {
    config.database.validate()?;
    let pool = config.database.connect_lazy()?;
    let status = crate::status::status(&pool).await?;
    if json {
        let text = serde_json::to_string_pretty(&status);
        println!(
            "{}",
            text.expect("Status holds only plain, serializable fields")
        );
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
