//! The binary's errors: what a command prints after `error:` before
//! exiting 1.

/// Result of a command.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// From the relay library: an invalid setting, the producer, migrations.
    #[error(transparent)]
    Relay(#[from] consign_relay::Error),
    /// A database error of a command.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Requeueing dead letters through the outbox failed.
    #[error(transparent)]
    Outbox(#[from] consign_outbox::Error),
    /// The configuration file or environment could not be read or parsed
    /// (errors that name a field are [`consign_relay::Error::Config`]).
    #[error("invalid configuration: {0}")]
    Source(String),
    /// The command line asks for something that needs more.
    #[error("{0}")]
    Usage(&'static str),
    /// The SQLite file of `database.url` cannot be used.
    #[error("cannot use the SQLite file {}: {reason}", path.display())]
    SqliteFile {
        path: std::path::PathBuf,
        reason: String,
    },
    /// A database this build of the binary has no support for.
    #[error("database.url names {backend}, which this build of consign-relay does not support")]
    Unsupported { backend: &'static str },
    /// The Prometheus recorder could not be installed.
    #[error("cannot install the Prometheus recorder: {0}")]
    Metrics(String),
}

impl Error {
    /// Whether the error is a missing table (PostgreSQL's 42P01, MySQL's
    /// 42S02, SQLite's "no such table"): the migrations have not run.
    pub(crate) fn is_missing_table(&self) -> bool {
        let database = match self {
            Self::Relay(consign_relay::Error::Database(e))
            | Self::Database(e)
            | Self::Outbox(consign_outbox::Error::Database(e)) => e,
            _ => return false,
        };
        matches!(database, sqlx::Error::Database(db)
            if matches!(db.code().as_deref(), Some("42P01" | "42S02"))
                || db.message().starts_with("no such table"))
    }
}
