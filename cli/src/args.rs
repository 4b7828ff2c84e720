//! The command line: commands, options and their help texts.

use std::{path::PathBuf, time::Duration};

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use consign_inbox::dead_letters::Selection;
use consign_relay::Profile;

use crate::error::{Error, Result};

/// consign-relay: publishes committed outbox rows to Kafka.
#[derive(Debug, Parser)]
#[command(name = "consign-relay", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Configuration file (TOML; see reference.toml). Environment variables
    /// CONSIGN_SECTION__FIELD (e.g. CONSIGN_RELAY__BATCH_SIZE) and DATABASE_URL override it.
    #[arg(long, short, env = "CONSIGN_CONFIG", global = true)]
    pub(crate) config: Option<PathBuf>,

    /// Defaults to start from: development, testing or production. Overrides
    /// `profile` in the file and CONSIGN_PROFILE. Default: production.
    #[arg(long, global = true, value_parser = clap::value_parser!(Profile))]
    pub(crate) profile: Option<Profile>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
pub(crate) struct SelectArgs {
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
    pub(crate) fn selection(self, default_all: bool) -> Result<Selection> {
        let mut selection = Selection::default();
        selection.ids = self.ids;
        selection.consumer = self.consumer;
        selection.key = self.key;
        selection.since = self.since;
        selection.until = self.until;
        selection.all = self.all;
        if selection == Selection::default() {
            if !default_all {
                return Err(Error::Usage(
                    "name the dead letters: --id, --consumer, --key, --since/--until, or --all",
                ));
            }
            selection.all = true;
        }
        Ok(selection)
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum DeadLetterCommand {
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
pub(crate) enum ConfigCommand {
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
