//! Configuration: the `[relay]` settings shared by the library builder and the
//! binary, plus the binary's file format (`[database]`, `[relay]`, `[kafka]`).
//!
//! The binary reads, in increasing priority: built-in defaults, the TOML file
//! given with `--config` (or `CONSIGN_CONFIG`), `DATABASE_URL`, and
//! `CONSIGN_<SECTION>__<FIELD>` environment variables
//! (`CONSIGN_RELAY__BATCH_SIZE=500`, `CONSIGN_KAFKA__BOOTSTRAP_SERVERS=host:9092`;
//! in the `kafka` section `_` stands for `.`). See `reference.toml`.

use std::{collections::BTreeMap, path::Path, str::FromStr, time::Duration};

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
    /// Default 10 s.
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
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            poll_interval: Duration::from_millis(10),
            max_poll_interval: Duration::from_millis(500),
            retry_min_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(10),
            transactions: false,
            transactional_id_prefix: None,
        }
    }
}

impl RelaySettings {
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
            format!(
                "must be between {} and {}, got {}",
                humantime::format_duration(min),
                humantime::format_duration(max),
                humantime::format_duration(value)
            ),
        ));
    }
    Ok(())
}

/// The `[database]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// `application_name` of the relay's sessions, as seen in
    /// `pg_stat_activity`. Default `consign-relay`.
    pub application_name: String,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            max_connections: 4,
            acquire_timeout: Duration::from_secs(10),
            application_name: "consign-relay".into(),
        }
    }
}

impl DatabaseSettings {
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
        )
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

    /// A pool that connects on first use, so the relay can start while the
    /// database is down and catch up when it returns.
    ///
    /// # Errors
    /// [`Error::Config`] if the URL is invalid.
    pub fn connect_lazy(&self) -> Result<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .connect_lazy_with(self.connect_options()?))
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

/// The relay binary's whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// `[database]`: where the outbox lives.
    pub database: DatabaseSettings,
    /// `[relay]`: batching, polling, retries, shutdown.
    pub relay: RelaySettings,
    /// `[kafka]`: librdkafka producer properties, passed through as they
    /// are (`"bootstrap.servers" = "host:9092"`). They override consign's
    /// producer defaults.
    pub kafka: BTreeMap<String, KafkaValue>,
}

impl Config {
    /// Reads defaults, then `file`, then the environment. Does not
    /// validate: each command checks what it needs ([`Config::validate`],
    /// [`DatabaseSettings::validate`]).
    ///
    /// # Errors
    /// [`Error::ConfigSource`] if the file is missing or unreadable,
    /// [`Error::Config`] naming a field of the wrong type or an unknown field.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(Error::ConfigSource(format!(
                    "configuration file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        let config: Self = figment
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database.url".into()),
            )
            .merge(
                Env::prefixed("CONSIGN_")
                    .filter(|key| key.as_str() != "config")
                    .split("__")
                    .map(|key| env_key(key.as_str()).into()),
            )
            .extract()
            .map_err(|e| figment_error(&e))?;
        Ok(config)
    }

    /// Checks every section.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first invalid field.
    pub fn validate(&self) -> Result<()> {
        self.database.validate()?;
        self.relay.validate()?;
        match self.kafka.get("bootstrap.servers") {
            Some(servers) if !servers.to_string().trim().is_empty() => Ok(()),
            _ => Err(Error::config(
                "kafka.bootstrap.servers",
                "required: the brokers to connect to, e.g. \"localhost:9092\"",
            )),
        }
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

/// `relay.batch_size` -> `relay.batch-size`; `kafka.bootstrap_servers` ->
/// `kafka.bootstrap.servers`.
fn env_key(key: &str) -> String {
    match key.split_once('.') {
        Some(("kafka", property)) => format!("kafka.{}", property.replace('_', ".")),
        _ => key.replace('_', "-"),
    }
}

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

#[cfg(test)]
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

    #[test]
    fn out_of_range_fields_are_named() {
        type Breaks = fn(&mut RelaySettings);
        let cases: [(&str, Breaks); 4] = [
            ("relay.batch-size", |s| s.batch_size = 0),
            ("relay.max-poll-interval", |s| {
                s.max_poll_interval = Duration::from_millis(1);
            }),
            ("relay.retry-max-delay", |s| {
                s.retry_max_delay = Duration::from_millis(10);
            }),
            ("relay.lease-ttl", |s| {
                s.lease_ttl = Duration::from_millis(100);
            }),
        ];
        for (field, breaks) in cases {
            let mut settings = RelaySettings::default();
            breaks(&mut settings);
            match settings.validate() {
                Err(Error::Config { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn env_keys_map_to_file_keys() {
        assert_eq!(env_key("relay.batch_size"), "relay.batch-size");
        assert_eq!(
            env_key("kafka.bootstrap_servers"),
            "kafka.bootstrap.servers"
        );
        assert_eq!(env_key("database.url"), "database.url");
    }
}
