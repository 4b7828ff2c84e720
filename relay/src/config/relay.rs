//! The `[relay]` settings, shared by the library and the binary, and the profiles.

use super::*;

/// How the relay reads, retries and stops. Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
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
    /// While the outbox is empty, how often to run the idle probe between
    /// polls: one indexed query for a row newer than any the relay has read
    /// (the backwards primary-key scan of `SELECT seq … ORDER BY seq DESC
    /// LIMIT 1`), far cheaper than reading a batch. When it finds one, the
    /// relay reads a batch at once instead of waiting out its backed-off
    /// pause, so a relay that nothing wakes (the `consign-relay` process)
    /// still ships within about this long. Only a hint: batches are still
    /// read at least every `max-poll-interval` (a row committed after a
    /// newer one, under an older `seq`, waits for that). `0s` turns the
    /// probe off. Default 20 ms; 0, or 1 ms to `max-poll-interval`.
    #[serde(with = "humantime_serde")]
    pub idle_probe_interval: Duration,
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
/// | `relay.idle-probe-interval` | 20ms | 10ms | 20ms |
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
#[non_exhaustive]
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
            idle_probe_interval: ms(20),
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
                idle_probe_interval: ms(10),
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
        if !self.idle_probe_interval.is_zero() {
            in_range(
                "relay.idle-probe-interval",
                self.idle_probe_interval,
                ms(1),
                self.max_poll_interval,
            )
            .map_err(|_| {
                Error::config(
                    "relay.idle-probe-interval",
                    "must be 0s (off) or between 1ms and relay.max-poll-interval",
                )
            })?;
        }
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

pub(super) fn in_range(field: &str, value: Duration, min: Duration, max: Duration) -> Result<()> {
    if value < min || value > max {
        return Err(Error::config(
            field,
            format!("must be {}", between(value, min, max)),
        ));
    }
    Ok(())
}

/// `between 100ms and 1h, got 10ms`: the allowed range and the value.
pub(super) fn between(value: Duration, min: Duration, max: Duration) -> String {
    format!(
        "between {} and {}, got {}",
        humantime::format_duration(min),
        humantime::format_duration(max),
        humantime::format_duration(value)
    )
}
