//! Configuration: the `[relay]` settings shared by the library builder and the
//! binary, plus the binary's file format (`[database]`, `[relay]`, `[kafka]`).
//!
//! The binary reads, in increasing priority: the defaults of the selected
//! [`Profile`], the TOML file given with `--config` (or `CONSIGN_CONFIG`),
//! `DATABASE_URL`, and `CONSIGN_<SECTION>__<FIELD>` environment variables
//! (`CONSIGN_RELAY__BATCH_SIZE=500`, `CONSIGN_KAFKA__BOOTSTRAP_SERVERS=host:9092`;
//! in the `kafka` section `_` stands for `.`). See `reference.toml`.
//!
//! Secrets (the database password, `sasl.password` and the other
//! [sensitive Kafka properties](is_secret_kafka_property)) never appear in
//! `Debug` output or in [`Config::redacted`], which is what
//! `consign-relay config show` prints.

#[cfg(feature = "cli")]
use std::path::Path;
use std::{collections::BTreeMap, fmt, net::SocketAddr, str::FromStr, time::Duration};

#[cfg(feature = "cli")]
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{Error, Result};

/// How the relay reads, retries and stops. Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RelaySettings {
    /// Rows read and produced per batch. Default 1000; 1 to 100 000.
    pub batch_size: u32,
    /// Most bytes (payload, key and headers) a batch holds in memory: a
    /// batch ends before the row that would pass it, but always has at
    /// least one row. With the outbox's default 900 KiB limit per message,
    /// 1000 rows could otherwise take almost 1 GiB. Default 16 MiB; 64 KiB
    /// to 1 GiB.
    pub batch_max_bytes: u64,
    /// Delay before polling again after a batch that was not full. Doubles
    /// while the outbox stays empty, up to `max-poll-interval`; a wake-up
    /// from the embedding service skips it. Default 10 ms.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Longest delay between polls of an empty outbox. Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// Delay before the first retry of a row the broker refused; doubles per
    /// attempt (with jitter). Default 1 s.
    #[serde(with = "humantime_serde")]
    pub retry_min_delay: Duration,
    /// Longest delay between retries of a refused row. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// On shutdown, how long to wait for acknowledgements of the batch in
    /// flight. Rows not acknowledged by then stay and are sent again later.
    /// The batch then has 5 s more to record its outcome in the database
    /// before it is abandoned (its rows, too, are sent again). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How long a relay's partition leases last without renewal; it renews
    /// every third of this. A crashed relay's partitions move to the others
    /// after at most this long. Default 10 s; 1 s to 10 min.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Produce each batch of an outbox partition in one Kafka transaction
    /// (`transactional.id` = `<transactional-id-prefix>-p<partition>`), so
    /// `read_committed` consumers see a batch whole or not at all, and a
    /// relay that lost a partition is fenced by the broker too. Default
    /// false. Needs brokers with transactions.
    pub transactions: bool,
    /// Prefix of the transactional ids. It must be the same for all relays
    /// of one outbox and differ between outboxes sharing a Kafka cluster.
    /// Default: `consign-<outbox id>`, an id generated once per database by
    /// the migrations.
    pub transactional_id_prefix: Option<String>,
    /// Move published rows to `consign_outbox_archive` (partitioned by day
    /// of publication, dropped by `consign-relay cleanup` after
    /// `retention.archive`) instead of deleting them. Default false.
    pub archive: bool,
}

/// A set of defaults. The file and the environment override single fields.
///
/// | field | development | testing | production |
/// |---|---|---|---|
/// | `relay.batch-size` | 100 | 100 | 1000 |
/// | `relay.poll-interval` | 10ms | 5ms | 10ms |
/// | `relay.max-poll-interval` | 200ms | 50ms | 500ms |
/// | `relay.retry-min-delay` | 200ms | 100ms | 1s |
/// | `relay.retry-max-delay` | 5s | 1s | 60s |
/// | `relay.shutdown-timeout` | 2s | 2s | 10s |
/// | `relay.lease-ttl` | 3s | 2s | 10s |
/// | `database.max-connections` | 2 | 2 | 4 |
/// | `database.acquire-timeout` | 3s | 2s | 10s |
/// | `database.statement-timeout` | 30s | 10s | 30s |
/// | `admin.enabled` | true | false | true |
/// | `admin.listen` | 127.0.0.1:9464 | 127.0.0.1:0 | 0.0.0.0:9464 |
/// | `admin.sample-interval` | 1s | 500ms | 5s |
///
/// Development: quick feedback on one laptop. Testing: fast retries and
/// failover, no fixed port (several relays per host). Production: larger
/// batches, patient retries, longer leases, metrics on every interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Defaults for a developer's machine.
    Development,
    /// Defaults for test suites: fast retries and lease expiry, no metrics port.
    Testing,
    /// Defaults for production (the default profile).
    #[default]
    Production,
}

impl FromStr for Profile {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "development" => Ok(Self::Development),
            "testing" => Ok(Self::Testing),
            "production" => Ok(Self::Production),
            other => Err(Error::config(
                "profile",
                format!("unknown profile {other:?}; allowed: development, testing, production"),
            )),
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Development => "development",
            Self::Testing => "testing",
            Self::Production => "production",
        })
    }
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self::for_profile(Profile::default())
    }
}

impl RelaySettings {
    /// The defaults of `profile` (see [`Profile`]).
    #[must_use]
    pub fn for_profile(profile: Profile) -> Self {
        let ms = Duration::from_millis;
        let production = Self {
            batch_size: 1000,
            batch_max_bytes: 16 << 20,
            poll_interval: ms(10),
            max_poll_interval: ms(500),
            retry_min_delay: ms(1000),
            retry_max_delay: ms(60_000),
            shutdown_timeout: ms(10_000),
            lease_ttl: ms(10_000),
            transactions: false,
            transactional_id_prefix: None,
            archive: false,
        };
        match profile {
            Profile::Production => production,
            Profile::Development => Self {
                batch_size: 100,
                max_poll_interval: ms(200),
                retry_min_delay: ms(200),
                retry_max_delay: ms(5000),
                shutdown_timeout: ms(2000),
                lease_ttl: ms(3000),
                ..production
            },
            Profile::Testing => Self {
                batch_size: 100,
                poll_interval: ms(5),
                max_poll_interval: ms(50),
                retry_min_delay: ms(100),
                retry_max_delay: ms(1000),
                shutdown_timeout: ms(2000),
                lease_ttl: ms(2000),
                ..production
            },
        }
    }

    /// Checks ranges and relations between fields. Errors name the field as
    /// written in the file (`relay.batch-size`).
    ///
    /// # Errors
    /// [`Error::Config`] for the first field out of range.
    pub fn validate(&self) -> Result<()> {
        if !(1..=100_000).contains(&self.batch_size) {
            return Err(Error::config(
                "relay.batch-size",
                format!("must be between 1 and 100000, got {}", self.batch_size),
            ));
        }
        if !(64 << 10..=1 << 30).contains(&self.batch_max_bytes) {
            return Err(Error::config(
                "relay.batch-max-bytes",
                format!(
                    "must be between 65536 (64 KiB) and 1073741824 (1 GiB), got {}",
                    self.batch_max_bytes
                ),
            ));
        }
        let ms = Duration::from_millis;
        in_range("relay.poll-interval", self.poll_interval, ms(1), ms(60_000))?;
        in_range(
            "relay.max-poll-interval",
            self.max_poll_interval,
            self.poll_interval,
            ms(600_000),
        )
        .map_err(|_| {
            Error::config(
                "relay.max-poll-interval",
                "must be at least relay.poll-interval and at most 10m",
            )
        })?;
        in_range(
            "relay.retry-min-delay",
            self.retry_min_delay,
            ms(1),
            ms(3_600_000),
        )?;
        in_range(
            "relay.retry-max-delay",
            self.retry_max_delay,
            self.retry_min_delay,
            ms(86_400_000),
        )
        .map_err(|_| {
            Error::config(
                "relay.retry-max-delay",
                "must be at least relay.retry-min-delay and at most 24h",
            )
        })?;
        in_range(
            "relay.shutdown-timeout",
            self.shutdown_timeout,
            ms(0),
            ms(600_000),
        )?;
        in_range("relay.lease-ttl", self.lease_ttl, ms(1000), ms(600_000))?;
        if let Some(prefix) = &self.transactional_id_prefix {
            let valid = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
            if prefix.is_empty() || prefix.len() > 200 || !prefix.chars().all(valid) {
                return Err(Error::config(
                    "relay.transactional-id-prefix",
                    "must be 1 to 200 characters of a-z, A-Z, 0-9, '.', '_' and '-'",
                ));
            }
        }
        Ok(())
    }
}

fn in_range(field: &str, value: Duration, min: Duration, max: Duration) -> Result<()> {
    if value < min || value > max {
        return Err(Error::config(
            field,
            format!("must be {}", between(value, min, max)),
        ));
    }
    Ok(())
}

/// `between 100ms and 1h, got 10ms`: the allowed range and the value.
fn between(value: Duration, min: Duration, max: Duration) -> String {
    format!(
        "between {} and {}, got {}",
        humantime::format_duration(min),
        humantime::format_duration(max),
        humantime::format_duration(value)
    )
}

/// The `[database]` section. TLS and other connection parameters go in the
/// URL as libpq spells them (`?sslmode=verify-full&sslrootcert=/ca.pem`,
/// `sslcert`, `sslkey`); `Debug` hides the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct DatabaseSettings {
    /// PostgreSQL URL. Required; `DATABASE_URL` is used if set.
    pub url: String,
    /// Connections in the relay's pool. Default 4; 1 to 100.
    pub max_connections: u32,
    /// How long to wait for a connection before the attempt counts as
    /// failed (and is retried with backoff). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// PostgreSQL's `statement_timeout` for the relay's sessions (not for
    /// `migrate`, `cleanup` and the other commands): a statement running
    /// longer is cancelled, counts as a failed attempt and is retried with
    /// backoff, so a lock held by a migration or a forgotten transaction
    /// cannot stall the relay unseen. It also sets the sessions'
    /// `idle_in_transaction_session_timeout` (twice as long) and the relay's
    /// client-side deadline per database round (5 s longer), which catches a
    /// database gone silent at the network level. `0s` leaves the server's
    /// or role's setting (and the deadline at 35 s). Default 30s (10s in the
    /// testing profile); otherwise 100ms to 1h.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// `application_name` of the relay's sessions, as seen in
    /// `pg_stat_activity`. Default `consign-relay`.
    pub application_name: String,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self::for_profile(Profile::default())
    }
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("application_name", &self.application_name)
            .finish()
    }
}

impl DatabaseSettings {
    /// The defaults of `profile` (see [`Profile`]); the URL is empty.
    #[must_use]
    pub fn for_profile(profile: Profile) -> Self {
        let (max_connections, acquire_timeout, statement_timeout) = match profile {
            Profile::Development => (2, Duration::from_secs(3), Duration::from_secs(30)),
            Profile::Testing => (2, Duration::from_secs(2), Duration::from_secs(10)),
            Profile::Production => (4, Duration::from_secs(10), Duration::from_secs(30)),
        };
        Self {
            url: String::new(),
            max_connections,
            acquire_timeout,
            statement_timeout,
            application_name: "consign-relay".into(),
        }
    }

    /// Checks the URL and the pool size.
    ///
    /// # Errors
    /// [`Error::Config`] naming the invalid field.
    pub fn validate(&self) -> Result<()> {
        self.connect_options().map(|_| ())?;
        if !(1..=100).contains(&self.max_connections) {
            return Err(Error::config(
                "database.max-connections",
                format!("must be between 1 and 100, got {}", self.max_connections),
            ));
        }
        in_range(
            "database.acquire-timeout",
            self.acquire_timeout,
            Duration::from_millis(10),
            Duration::from_secs(600),
        )?;
        let (statement, min, max) = (
            self.statement_timeout,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        );
        if !statement.is_zero() && (statement < min || statement > max) {
            return Err(Error::config(
                "database.statement-timeout",
                format!(
                    "must be 0s (leave the server's setting) or {}",
                    between(statement, min, max)
                ),
            ));
        }
        Ok(())
    }

    fn connect_options(&self) -> Result<PgConnectOptions> {
        if self.url.trim().is_empty() {
            return Err(Error::config(
                "database.url",
                "required: set it in the file, in DATABASE_URL or in CONSIGN_DATABASE__URL",
            ));
        }
        if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) {
            return Err(Error::config(
                "database.url",
                "must start with postgres:// or postgresql:// (consign's relay supports PostgreSQL)",
            ));
        }
        let options = PgConnectOptions::from_str(&self.url).map_err(|e| {
            Error::config("database.url", format!("not a valid PostgreSQL URL: {e}"))
        })?;
        Ok(options.application_name(&self.application_name))
    }

    /// The relay's pool: connects on first use, so the relay can start
    /// while the database is down and catch up when it returns; its
    /// sessions have [`statement_timeout`](Self::statement_timeout).
    ///
    /// # Errors
    /// [`Error::Config`] if the URL is invalid.
    pub fn connect_lazy(&self) -> Result<PgPool> {
        let mut options = self.connect_options()?;
        if !self.statement_timeout.is_zero() {
            let millis = self.statement_timeout.as_millis();
            // A session whose client went silent mid-transaction (see
            // `deadline`) would keep its locks until TCP gives up; the server
            // ends it after this long idle in its transaction.
            options = options.options([
                ("statement_timeout", format!("{millis}ms")),
                (
                    "idle_in_transaction_session_timeout",
                    format!("{}ms", millis * 2),
                ),
            ]);
        }
        Ok(self.pool_options().connect_lazy_with(options))
    }

    /// How long one database round of the relay may take before it gives up
    /// on the connection (see [`RelayBuilder::database_deadline`]):
    /// `statement-timeout` + 5 s, or the default without a statement timeout.
    ///
    /// [`RelayBuilder::database_deadline`]: crate::RelayBuilder::database_deadline
    #[must_use]
    pub fn deadline(&self) -> Duration {
        if self.statement_timeout.is_zero() {
            crate::DEFAULT_DATABASE_DEADLINE
        } else {
            (self.statement_timeout + Duration::from_secs(5)).min(Duration::from_secs(3600))
        }
    }

    /// A pool for maintenance commands (`migrate`, `cleanup`, dead letters,
    /// `status`): like [`connect_lazy`](Self::connect_lazy), without the
    /// statement timeout, since a migration or a cleanup may rightly run
    /// long.
    ///
    /// # Errors
    /// [`Error::Config`] if the URL is invalid.
    pub fn connect_lazy_unbounded(&self) -> Result<PgPool> {
        Ok(self
            .pool_options()
            .connect_lazy_with(self.connect_options()?))
    }

    fn pool_options(&self) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
    }
}

/// A librdkafka property value; numbers and booleans are accepted unquoted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KafkaValue {
    /// A string value.
    String(String),
    /// An integer value.
    Integer(i64),
    /// A boolean value.
    Bool(bool),
}

impl std::fmt::Display for KafkaValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::String(s) => f.write_str(s),
            Self::Integer(i) => write!(f, "{i}"),
            Self::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// The `[admin]` section: the HTTP endpoint serving `/metrics` (Prometheus
/// text) and `/health` (`/health/live`, `/health/ready`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct AdminSettings {
    /// Serve the endpoint. Default true, except in the testing profile.
    pub enabled: bool,
    /// Address to listen on. Default `0.0.0.0:9464` (production),
    /// `127.0.0.1:9464` (development); port 0 picks a free port, which the
    /// relay logs.
    pub listen: SocketAddr,
    /// How often the backlog gauges (pending rows, oldest age, rows with
    /// errors) and readiness are refreshed from PostgreSQL and Kafka.
    /// Default 5 s; 100 ms to 10 min.
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self::for_profile(Profile::default())
    }
}

impl AdminSettings {
    /// The defaults of `profile` (see [`Profile`]).
    #[must_use]
    pub fn for_profile(profile: Profile) -> Self {
        let (enabled, listen, sample_ms) = match profile {
            Profile::Development => (true, ([127, 0, 0, 1], 9464), 1000),
            Profile::Testing => (false, ([127, 0, 0, 1], 0), 500),
            Profile::Production => (true, ([0, 0, 0, 0], 9464), 5000),
        };
        Self {
            enabled,
            listen: SocketAddr::from(listen),
            sample_interval: Duration::from_millis(sample_ms),
        }
    }

    /// Checks the sampling interval.
    ///
    /// # Errors
    /// [`Error::Config`] naming `admin.sample-interval`.
    pub fn validate(&self) -> Result<()> {
        in_range(
            "admin.sample-interval",
            self.sample_interval,
            Duration::from_millis(100),
            Duration::from_secs(600),
        )
    }
}

/// The `[retention]` section, applied by `consign-relay cleanup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RetentionSettings {
    /// Inbox dedup records older than this are deleted. Safe because
    /// consumers resume from stored offsets; keep it longer than any
    /// duplicate could arrive late. Default 7 days; 1 minute to 10 years.
    #[serde(with = "humantime_serde")]
    pub inbox: Duration,
    /// Dead letters older than this are deleted. Default: kept until purged
    /// (nothing is dropped silently).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<Duration>,
    /// Archive partitions (see `relay.archive`) whose whole day is older
    /// than this are dropped. Default 30 days.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub archive: Option<Duration>,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            inbox: Duration::from_secs(7 * 86_400),
            dead_letters: None,
            archive: Some(Duration::from_secs(30 * 86_400)),
        }
    }
}

impl RetentionSettings {
    /// Checks the ages.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let (min, max) = (
            Duration::from_secs(60),
            Duration::from_secs(10 * 365 * 86_400),
        );
        in_range("retention.inbox", self.inbox, min, max)?;
        if let Some(age) = self.dead_letters {
            in_range("retention.dead-letters", age, min, max)?;
        }
        if let Some(age) = self.archive {
            in_range("retention.archive", age, Duration::from_secs(86_400), max)?;
        }
        Ok(())
    }
}

/// The relay binary's whole configuration. `Debug` hides secrets.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// Which defaults apply: `development`, `testing` or `production`
    /// (default). Set with `profile = "..."`, `CONSIGN_PROFILE` or
    /// `--profile`.
    pub profile: Profile,
    /// `[database]`: where the outbox lives.
    pub database: DatabaseSettings,
    /// `[relay]`: batching, polling, retries, shutdown.
    pub relay: RelaySettings,
    /// `[kafka]`: librdkafka producer properties, passed through as they
    /// are (`"bootstrap.servers" = "host:9092"`). They override consign's
    /// producer defaults. TLS and SASL settings (`security.protocol`,
    /// `ssl.ca.location`, `sasl.mechanisms`, `sasl.username`,
    /// `sasl.password`, ...) pass through here.
    pub kafka: BTreeMap<String, KafkaValue>,
    /// `[admin]`: the `/metrics` and `/health` endpoint.
    pub admin: AdminSettings,
    /// `[retention]`: what `consign-relay cleanup` deletes.
    pub retention: RetentionSettings,
}

impl Default for Config {
    fn default() -> Self {
        Self::for_profile(Profile::default())
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = self.redacted();
        f.debug_struct("Config")
            .field("profile", &redacted.profile)
            .field("database", &redacted.database)
            .field("relay", &redacted.relay)
            .field("kafka", &redacted.kafka)
            .field("admin", &redacted.admin)
            .field("retention", &redacted.retention)
            .finish()
    }
}

pub use consign_outbox::secrets::{REDACTED, is_secret_kafka_property};

impl Config {
    /// The defaults of `profile`, with no database URL or brokers.
    #[must_use]
    pub fn for_profile(profile: Profile) -> Self {
        Self {
            profile,
            database: DatabaseSettings::for_profile(profile),
            relay: RelaySettings::for_profile(profile),
            kafka: BTreeMap::new(),
            admin: AdminSettings::for_profile(profile),
            retention: RetentionSettings::default(),
        }
    }

    /// Reads the profile's defaults, then `file`, then the environment. The
    /// profile is `profile` if given, else the one named in the file or
    /// `CONSIGN_PROFILE`, else production. Does not validate: each command
    /// checks what it needs ([`Config::validate`],
    /// [`DatabaseSettings::validate`]).
    ///
    /// # Errors
    /// [`Error::ConfigSource`] if the file is missing or unreadable,
    /// [`Error::Config`] naming a field of the wrong type, an unknown field
    /// or an unknown profile.
    #[cfg(feature = "cli")]
    pub fn load(file: Option<&Path>, profile: Option<Profile>) -> Result<Self> {
        Self::load_from(Self::sources(file, true)?, profile)
    }

    #[cfg(feature = "cli")]
    fn load_from(sources: Figment, profile: Option<Profile>) -> Result<Self> {
        let profile = match profile {
            Some(profile) => profile,
            None => match sources.find_value("profile") {
                Ok(value) => match value.as_str() {
                    Some(name) => name.parse()?,
                    None => {
                        return Err(Error::config(
                            "profile",
                            "must be a string: development, testing or production",
                        ));
                    }
                },
                Err(_) => Profile::default(),
            },
        };
        Figment::from(Serialized::defaults(Self::for_profile(profile)))
            .merge(sources)
            .merge(Serialized::default("profile", profile))
            .extract()
            .map_err(|e| figment_error(&e))
    }

    /// The file and (if `env`) the environment, without defaults.
    #[cfg(feature = "cli")]
    fn sources(file: Option<&Path>, env: bool) -> Result<Figment> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            if !file.is_file() {
                return Err(Error::ConfigSource(format!(
                    "configuration file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        if !env {
            return Ok(figment);
        }
        let figment = figment
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database.url".into()),
            )
            .merge(
                // Keys arrive in their original case: compare uncased.
                // CONSIGN_CONFIG names the file (read by the CLI), and
                // `[kafka]` keys contain dots, which figment would nest.
                Env::prefixed("CONSIGN_")
                    .filter(|key| !key.eq("config") && !is_kafka_env(key.as_str()))
                    .split("__")
                    .map(|key| env_key(key.as_str()).into()),
            );
        let kafka = kafka_from_env(std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        }));
        Ok(if kafka.is_empty() {
            figment
        } else {
            figment.merge(Serialized::default("kafka", kafka))
        })
    }

    /// Checks every section.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first invalid field.
    pub fn validate(&self) -> Result<()> {
        self.database.validate()?;
        self.relay.validate()?;
        self.admin.validate()?;
        self.retention.validate()?;
        match self.kafka.get("bootstrap.servers") {
            Some(servers) if !servers.to_string().trim().is_empty() => Ok(()),
            _ => Err(Error::config(
                "kafka.bootstrap.servers",
                "required: the brokers to connect to, e.g. \"localhost:9092\"",
            )),
        }
    }

    /// A copy with every secret replaced by [`REDACTED`]: the password of
    /// `database.url` (and `password`/`sslpassword` URL parameters) and the
    /// sensitive Kafka properties. Safe to print or log.
    #[must_use]
    pub fn redacted(&self) -> Self {
        let mut copy = self.clone();
        copy.database.url = redact_url(&self.database.url);
        for (key, value) in &mut copy.kafka {
            if is_secret_kafka_property(key) {
                *value = KafkaValue::String(REDACTED.into());
            }
        }
        copy
    }

    /// The effective configuration as TOML, secrets redacted.
    #[cfg(feature = "cli")]
    #[must_use]
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(&self.redacted()).expect("the configuration serializes to TOML")
    }

    /// The `[kafka]` table as plain strings.
    #[must_use]
    pub fn kafka_properties(&self) -> BTreeMap<String, String> {
        self.kafka
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect()
    }
}

/// `url` with its password and `password`/`sslpassword` parameters replaced
/// by [`REDACTED`]. Text that is not a URL is redacted whole if it has an
/// `@` (it might hold credentials).
#[must_use]
pub fn redact_url(url: &str) -> String {
    let parsed = url::Url::parse(url).ok().filter(|u| !u.cannot_be_a_base());
    let Some(mut parsed) = parsed else {
        return if url.contains('@') {
            REDACTED.into()
        } else {
            url.into()
        };
    };
    if parsed.password().is_some() {
        // Only fails for URLs that cannot have credentials.
        let _ = parsed.set_password(Some(REDACTED));
    }
    let secret = |name: &str| {
        name.eq_ignore_ascii_case("password") || name.eq_ignore_ascii_case("sslpassword")
    };
    if parsed.query_pairs().any(|(name, _)| secret(&name)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(name, value)| {
                let value = if secret(&name) {
                    REDACTED.into()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// `RELAY.BATCH_SIZE` -> `relay.batch-size`.
#[cfg(feature = "cli")]
fn env_key(key: &str) -> String {
    key.to_ascii_lowercase().replace('_', "-")
}

#[cfg(feature = "cli")]
const KAFKA_ENV: &str = "KAFKA__";

#[cfg(feature = "cli")]
fn is_kafka_env(key: &str) -> bool {
    key.get(..KAFKA_ENV.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(KAFKA_ENV))
}

/// The `[kafka]` entries of `CONSIGN_KAFKA__<PROPERTY>` variables, `_` in the
/// property standing for `.`: `CONSIGN_KAFKA__BOOTSTRAP_SERVERS` ->
/// `bootstrap.servers`. Values stay strings, as librdkafka takes them.
#[cfg(feature = "cli")]
fn kafka_from_env(vars: impl Iterator<Item = (String, String)>) -> BTreeMap<String, String> {
    vars.filter_map(|(name, value)| {
        let key = name
            .get(..8)
            .filter(|head| head.eq_ignore_ascii_case("CONSIGN_"))
            .and_then(|_| name.get(8..))?;
        is_kafka_env(key).then(|| {
            let property = &key[KAFKA_ENV.len()..];
            (property.to_ascii_lowercase().replace('_', "."), value)
        })
    })
    .collect()
}

#[cfg(feature = "cli")]
fn figment_error(error: &figment::Error) -> Error {
    let field = error.path.join(".");
    let source = error
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            Some(source) => format!(" (from {source})"),
            None => format!(" (from {})", m.name),
        })
        .unwrap_or_default();
    if field.is_empty() {
        Error::ConfigSource(format!("{}{source}", error.kind))
    } else {
        Error::config(field, format!("{}{source}", error.kind))
    }
}

#[cfg(all(test, feature = "cli"))]
mod tests {
    use super::*;

    #[test]
    fn reference_file_parses_and_matches_defaults() {
        let reference = include_str!("../reference.toml");
        let config: Config = toml_from_str(reference);
        assert_eq!(config.relay, RelaySettings::default());
        assert_eq!(
            config.database.max_connections,
            DatabaseSettings::default().max_connections
        );
        config.validate().unwrap();
    }

    fn toml_from_str(text: &str) -> Config {
        Figment::from(Toml::string(text)).extract().unwrap()
    }

    const VALID: &str = r#"
[database]
url = "postgres://postgres@127.0.0.1:5432/test"
[kafka]
"bootstrap.servers" = "127.0.0.1:9092"
"#;

    /// Loads `VALID` with `change` applied (a line replacing or adding a
    /// key in a section) and validates it.
    fn load_with(section: &str, line: &str) -> Result<Config> {
        let mut text = VALID.to_owned();
        if section.is_empty() {
            text = format!("{line}\n{text}");
        } else if let Some(at) = text.find(&format!("[{section}]\n")) {
            let at = at + section.len() + 3;
            let key = line.split('=').next().unwrap_or_default().trim();
            // Drop the valid line for the same key, if any.
            let rest: String = text[at..]
                .lines()
                .filter(|l| l.split('=').next().unwrap_or_default().trim() != key)
                .map(|l| format!("{l}\n"))
                .collect();
            text = format!("{}{line}\n{rest}", &text[..at]);
        } else {
            text = format!("{text}[{section}]\n{line}\n");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("consign.toml");
        std::fs::write(&file, &text).unwrap();
        // Without the environment: the test command exports DATABASE_URL.
        let config = Config::load_from(Config::sources(Some(&file), false)?, None)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn every_bad_field_gives_an_error_naming_it() {
        let cases = [
            (
                "",
                r#"profile = "staging""#,
                "profile",
                "development, testing, production",
            ),
            ("", "profile = 3", "profile", "must be a string"),
            ("", "unknown = 1", "unknown", "unknown field"),
            ("database", r#"url = """#, "database.url", "required"),
            (
                "database",
                r#"url = "mysql://x/y""#,
                "database.url",
                "postgres://",
            ),
            (
                "database",
                r#"url = "postgres://h:notaport/db""#,
                "database.url",
                "not a valid",
            ),
            (
                "database",
                "max-connections = 0",
                "database.max-connections",
                "between 1 and 100",
            ),
            (
                "database",
                "max-connections = -1",
                "database.max-connections",
                "invalid value",
            ),
            (
                "database",
                r#"acquire-timeout = "1ms""#,
                "database.acquire-timeout",
                "between 10ms",
            ),
            (
                "database",
                r#"acquire-timeout = "soon""#,
                "database.acquire-timeout",
                "",
            ),
            (
                "database",
                r#"statement-timeout = "10ms""#,
                "database.statement-timeout",
                "must be 0s (leave the server's setting) or between 100ms and 1h, got 10ms",
            ),
            (
                "database",
                r#"statement-timeout = "2h""#,
                "database.statement-timeout",
                "got 2h",
            ),
            (
                "database",
                "application-name = 5",
                "database.application-name",
                "invalid type",
            ),
            ("database", "port = 5432", "database.port", "unknown field"),
            (
                "relay",
                "batch-size = 0",
                "relay.batch-size",
                "between 1 and 100000",
            ),
            (
                "relay",
                r#"batch-size = "many""#,
                "relay.batch-size",
                "invalid type",
            ),
            (
                "relay",
                "batch-max-bytes = 1000",
                "relay.batch-max-bytes",
                "between 65536",
            ),
            (
                "relay",
                r#"poll-interval = "0s""#,
                "relay.poll-interval",
                "between 1ms and 1m",
            ),
            (
                "relay",
                r#"max-poll-interval = "1ms""#,
                "relay.max-poll-interval",
                "at least relay.poll-interval",
            ),
            (
                "relay",
                r#"retry-min-delay = "2h""#,
                "relay.retry-min-delay",
                "between 1ms and 1h",
            ),
            (
                "relay",
                r#"retry-max-delay = "10ms""#,
                "relay.retry-max-delay",
                "at least relay.retry-min-delay",
            ),
            (
                "relay",
                r#"shutdown-timeout = "11m""#,
                "relay.shutdown-timeout",
                "between 0s and 10m",
            ),
            (
                "relay",
                r#"lease-ttl = "100ms""#,
                "relay.lease-ttl",
                "between 1s and 10m",
            ),
            (
                "relay",
                r#"transactions = "yes""#,
                "relay.transactions",
                "invalid type",
            ),
            (
                "relay",
                r#"transactional-id-prefix = "a b""#,
                "relay.transactional-id-prefix",
                "a-z, A-Z, 0-9",
            ),
            (
                "relay",
                "partitions = [0]",
                "relay.partitions",
                "unknown field",
            ),
            (
                "kafka",
                r#""bootstrap.servers" = """#,
                "kafka.bootstrap.servers",
                "required",
            ),
            ("kafka", r#""linger.ms" = [1]"#, "kafka.linger.ms", ""),
            (
                "admin",
                r#"listen = "localhost""#,
                "admin.listen",
                "invalid",
            ),
            (
                "admin",
                r#"sample-interval = "1ms""#,
                "admin.sample-interval",
                "between 100ms and 10m",
            ),
            (
                "admin",
                r#"enabled = "on""#,
                "admin.enabled",
                "invalid type",
            ),
            (
                "retention",
                r#"inbox = "1s""#,
                "retention.inbox",
                "between 1m and",
            ),
            (
                "retention",
                r#"dead-letters = "forever""#,
                "retention.dead-letters",
                "",
            ),
            (
                "retention",
                r#"dead-letters = "20years""#,
                "retention.dead-letters",
                "between 1m and",
            ),
            (
                "retention",
                r#"archive = "1h""#,
                "retention.archive",
                "between 1day and",
            ),
            ("relay", "archive = 1", "relay.archive", "invalid type"),
        ];
        let named: std::collections::HashSet<&str> = cases.iter().map(|c| c.2).collect();
        let reference: toml::Table = toml::from_str(include_str!("../reference.toml")).unwrap();
        for (key, value) in &reference {
            let keys: Vec<String> = match value.as_table() {
                Some(table) => table.keys().map(|k| format!("{key}.{k}")).collect(),
                None => vec![key.clone()],
            };
            for key in keys {
                assert!(named.contains(key.as_str()), "no bad-value case for {key}");
            }
        }
        for (section, line, field, allowed) in cases {
            match load_with(section, line) {
                Err(Error::Config {
                    field: named,
                    message,
                }) => {
                    assert_eq!(named, field, "{line}: {message}");
                    assert!(
                        message.contains(allowed),
                        "{line}: {message:?} lacks {allowed:?}"
                    );
                }
                other => panic!("{line}: expected an error naming {field}, got {other:?}"),
            }
        }
        load_with("", "").unwrap();
        // 0s is allowed: it leaves the server's statement_timeout.
        let unset = load_with("database", r#"statement-timeout = "0s""#).unwrap();
        assert!(unset.database.statement_timeout.is_zero());
    }

    #[test]
    fn profiles_change_defaults_and_the_file_still_wins() {
        let testing = load_with("", r#"profile = "testing""#).unwrap();
        assert_eq!(testing.relay, RelaySettings::for_profile(Profile::Testing));
        assert!(!testing.admin.enabled);
        let production = load_with("relay", "batch-size = 7").unwrap();
        assert_eq!(production.profile, Profile::Production);
        assert_eq!(production.relay.batch_size, 7);
        assert_eq!(production.relay.lease_ttl, Duration::from_secs(10));
        let dev = load_with("", r#"profile = "development""#).unwrap();
        assert_eq!(dev.database.max_connections, 2);
        assert_eq!(dev.admin.listen.to_string(), "127.0.0.1:9464");
    }

    #[test]
    fn secrets_are_redacted_in_debug_and_printed_config() {
        let mut config = Config::for_profile(Profile::Production);
        config.database.url =
            "postgres://app:pg-secret-1@db:5432/app?sslmode=verify-full&sslpassword=pg-secret-2"
                .into();
        for (key, value) in [
            ("sasl.password", "kafka-secret-1"),
            ("ssl.key.password", "kafka-secret-2"),
            ("sasl.oauthbearer.client.secret", "kafka-secret-3"),
            ("ssl.key.pem", "kafka-secret-4"),
            ("sasl.username", "app"),
        ] {
            config
                .kafka
                .insert(key.into(), KafkaValue::String(value.into()));
        }
        let printed = [
            format!("{config:?}"),
            config.to_redacted_toml(),
            serde_json::to_string(&config.redacted()).unwrap(),
        ];
        for text in printed {
            assert!(!text.contains("secret-"), "{text}");
            assert!(text.contains("sslmode=verify-full"), "{text}");
            assert!(text.contains("\"sasl.username\""), "{text}");
        }
        assert_eq!(
            redact_url("postgres:///db?host=/run/pg"),
            "postgres:///db?host=/run/pg"
        );
        assert_eq!(redact_url("user:pw@host"), REDACTED);
    }

    #[test]
    fn env_keys_map_to_file_keys() {
        assert_eq!(env_key("RELAY.BATCH_SIZE"), "relay.batch-size");
        assert_eq!(env_key("database.url"), "database.url");
        let kafka = kafka_from_env(
            [
                ("CONSIGN_KAFKA__BOOTSTRAP_SERVERS", "h:9092"),
                ("CONSIGN_KAFKA__LINGER_MS", "5"),
                ("CONSIGN_RELAY__BATCH_SIZE", "10"),
                ("OTHER_KAFKA__X", "1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        assert_eq!(
            kafka.into_iter().collect::<Vec<_>>(),
            [
                ("bootstrap.servers".to_owned(), "h:9092".to_owned()),
                ("linger.ms".to_owned(), "5".to_owned())
            ]
        );
    }
}
