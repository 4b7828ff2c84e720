//! [`RelayBuilder`]: assembles a [`Relay`] from a pool, producer properties
//! and [`RelaySettings`].

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use consign_outbox::secrets::redacted_properties;
use uuid::Uuid;

use crate::{
    DatabasePool, Error, Relay, RelaySettings, Result,
    config::AdminSettings,
    deadline::{DEFAULT_DATABASE_DEADLINE, Db},
    health::{Health, Sampler},
    producer_config::{kafka_config_error, producer_config},
    publish::Publisher,
    relay::Publishers,
    txn::Transactional,
};

/// A callback told the ids of messages the broker acknowledged.
pub(crate) type PublishedHook = Arc<dyn Fn(&[Uuid]) + Send + Sync>;

/// Builds a [`Relay`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), consign_relay::Error> {
/// use consign_relay::Relay;
///
/// let relay = Relay::builder(pool)
///     .kafka("bootstrap.servers", "localhost:9092")
///     .batch_size(500)
///     .build()?;
/// let handle = relay.spawn();
/// // ... after each commit that enqueued events:
/// handle.wake();
/// // ... at exit:
/// handle.shutdown().await?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct RelayBuilder {
    pool: DatabasePool,
    kafka: BTreeMap<String, String>,
    settings: RelaySettings,
    sample_interval: Duration,
    database_deadline: Duration,
    on_published: Option<PublishedHook>,
}

impl std::fmt::Debug for RelayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBuilder")
            .field("kafka", &redacted_properties(&self.kafka))
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl RelayBuilder {
    pub(crate) fn new(pool: DatabasePool) -> Self {
        Self {
            pool,
            kafka: BTreeMap::new(),
            settings: RelaySettings::default(),
            sample_interval: AdminSettings::default().sample_interval,
            database_deadline: DEFAULT_DATABASE_DEADLINE,
            on_published: None,
        }
    }

    /// How long one database round of the relay (a read, the recording of a
    /// batch's outcome, a lease renewal) may take before the relay gives up
    /// on its connection, closes it and retries on a new one. It catches a
    /// database gone silent at the network level, which the server's
    /// `statement_timeout` cannot. Keep it above the pool's
    /// `statement_timeout`; the `consign-relay` binary sets it to
    /// `database.statement-timeout` + 5 s. Default 35 s; 1 s to 1 hour.
    ///
    /// Closing a silent connection does not end its server session at
    /// once: give the pool's sessions an `idle_in_transaction_session_timeout`
    /// (the binary sets twice the statement timeout), or a transaction the
    /// relay abandoned keeps its lease locks until the server's TCP
    /// keepalive notices, which blocks this relay's renewals meanwhile.
    pub fn database_deadline(mut self, deadline: Duration) -> Self {
        self.database_deadline = deadline;
        self
    }

    /// How often the relay samples the backlog gauges and checks PostgreSQL
    /// and Kafka for [`Health`](crate::Health) (default 5 s; 100 ms to 10
    /// min). See [`metrics`](crate::metrics).
    pub fn sample_interval(mut self, interval: Duration) -> Self {
        self.sample_interval = interval;
        self
    }

    /// Sets a librdkafka producer property (`bootstrap.servers` is required).
    pub fn kafka(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka.insert(key.into(), value.into());
        self
    }

    /// Sets several librdkafka producer properties.
    pub fn kafka_properties<K, V>(mut self, properties: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.kafka
            .extend(properties.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Replaces all settings (batching, polling, retries, shutdown).
    pub fn settings(mut self, settings: RelaySettings) -> Self {
        self.settings = settings;
        self
    }

    /// Rows per batch (default 1000).
    pub fn batch_size(mut self, rows: u32) -> Self {
        self.settings.batch_size = rows;
        self
    }

    /// How long partition leases last without renewal (default 10 s). See
    /// [`RelaySettings::lease_ttl`].
    pub fn lease_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.settings.lease_ttl = ttl;
        self
    }

    /// Produce each partition's batch in one Kafka transaction (default
    /// off). See [`RelaySettings::transactions`].
    pub fn transactions(mut self, on: bool) -> Self {
        self.settings.transactions = on;
        self
    }

    /// Archive published rows instead of deleting them (default off). See
    /// [`RelaySettings::archive`] and [`retention`](crate::retention).
    pub fn archive(mut self, on: bool) -> Self {
        self.settings.archive = on;
        self
    }

    /// Calls `hook` with the ids of every batch of messages the broker has
    /// acknowledged, before their rows are deleted. Keep it fast: it runs on
    /// the relay's task.
    pub fn on_published(mut self, hook: impl Fn(&[Uuid]) + Send + Sync + 'static) -> Self {
        self.on_published = Some(Arc::new(hook));
        self
    }

    /// Validates the settings and creates the Kafka producer. Connecting to
    /// the database and the brokers happens when the relay runs, with retries.
    ///
    /// # Errors
    /// [`Error::Config`] naming the invalid setting or producer property.
    pub fn build(self) -> Result<Relay> {
        self.settings.validate()?;
        AdminSettings {
            sample_interval: self.sample_interval,
            ..AdminSettings::default()
        }
        .validate()?;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.database_deadline) {
            return Err(Error::config(
                "database-deadline",
                format!(
                    "must be between 1s and 1h, got {:?}",
                    self.database_deadline
                ),
            ));
        }
        let config = producer_config(&self.kafka)?;
        let mut health_client = config.clone();
        // It only asks for metadata: no idempotent producer state to keep
        // (an idempotent producer re-acquires a producer id after an outage).
        health_client
            .set("client.id", "consign-relay-health")
            .set("enable.idempotence", "false")
            .set("enable.gapless.guarantee", "false");
        let health = Health::default();
        let publisher = if self.settings.transactions {
            // Check the properties now; the producers (one per leased
            // partition) are created when the partitions are acquired.
            let mut check = config.clone();
            check.set("transactional.id", "consign-config-check");
            drop(Publisher::new(check).map_err(kafka_config_error)?);
            Publishers::PerPartition(Transactional::new(
                config,
                self.settings.transactional_id_prefix.clone(),
                health.clone(),
            ))
        } else {
            Publishers::Shared(Publisher::new(config).map_err(kafka_config_error)?)
        };
        let sampler = Sampler {
            pool: self.pool.clone(),
            kafka: health_client,
            interval: self.sample_interval,
            health,
            archive: self.settings.archive,
            archive_upkept: None,
        };
        let db = Db {
            pool: self.pool,
            deadline: self.database_deadline,
        };
        Ok(Relay::new(
            db,
            publisher,
            self.settings,
            self.on_published,
            sampler,
        ))
    }
}
