//! Configuration: the `[relay]` settings shared by the library builder and the
//! binary, plus the binary's file format (`[database]`, `[relay]`, `[kafka]`).
//!
//! The binary reads, in increasing priority: the defaults of the selected
//! [`Profile`], the TOML file given with `--config` (or `CONSIGN_CONFIG`),
//! `DATABASE_URL`, and `CONSIGN_<SECTION>__<FIELD>` environment variables
//! (`CONSIGN_RELAY__BATCH_SIZE=500`, `CONSIGN_KAFKA__BOOTSTRAP_SERVERS=host:9092`;
//! in the `kafka` section `_` stands for `.`). See `cli/reference.toml`. The
//! loading itself (figment) is the binary's, in the `consign-cli` crate.
//!
//! Secrets (the database password, `sasl.password` and the other
//! [sensitive Kafka properties](is_secret_kafka_property)) never appear in
//! `Debug` output or in [`Config::redacted`], which is what
//! `consign-relay config show` prints.

use std::{collections::BTreeMap, fmt, net::SocketAddr, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};
use sqlx::{pool::PoolOptions, postgres::PgConnectOptions};

use crate::{DatabasePool, Error, Result};

mod admin;
mod database;
mod kafka;
mod relay;
mod retention;

pub use admin::AdminSettings;
pub use database::{DatabaseSettings, redact_url};
pub use kafka::KafkaValue;
pub use relay::{Profile, RelaySettings};
use relay::{between, in_range};
pub use retention::RetentionSettings;

/// The relay binary's whole configuration. `Debug` hides secrets.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
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

    /// The `[kafka]` table as plain strings.
    #[must_use]
    pub fn kafka_properties(&self) -> BTreeMap<String, String> {
        self.kafka
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect()
    }
}
