//! The health sampler: backlog gauges and dependency checks every
//! `sample-interval`, archive partitions created ahead.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use metrics::gauge;
use rdkafka::{ClientConfig, producer::BaseProducer};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Health;
use crate::{metrics as m, store::RelayStore as _};

/// Samples the backlog and checks the dependencies every `interval`.
pub(crate) struct Sampler {
    pub(crate) pool: crate::DatabasePool,
    pub(crate) kafka: ClientConfig,
    pub(crate) interval: Duration,
    pub(crate) health: Health,
    /// Keep the archive's day partitions created ahead.
    pub(crate) archive: bool,
    /// When the archive partitions were last created ahead.
    pub(crate) archive_upkept: Option<Instant>,
}

/// How often archive partitions are created ahead.
const ARCHIVE_UPKEEP: Duration = Duration::from_secs(3600);

impl Sampler {
    /// Creates the archive's partitions ahead if archiving and the last
    /// upkeep is older than [`ARCHIVE_UPKEEP`] (or never succeeded).
    pub(crate) async fn upkeep_archive(&mut self) {
        if !self.archive
            || self
                .archive_upkept
                .is_some_and(|at| at.elapsed() < ARCHIVE_UPKEEP)
        {
            return;
        }
        match crate::retention::ensure_archive_partitions(&self.pool).await {
            Ok(()) => self.archive_upkept = Some(Instant::now()),
            Err(error) => {
                warn!(%error, "could not create archive partitions; rows go to the default partition meanwhile");
            }
        }
    }

    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let timeout = self
            .interval
            .clamp(Duration::from_millis(500), Duration::from_secs(5));
        let client: Option<Arc<BaseProducer>> = match self.kafka.create() {
            Ok(client) => Some(Arc::new(client)),
            Err(error) => {
                warn!(%error, "cannot create the Kafka metadata client; readiness stays false");
                None
            }
        };
        // A check stuck on a dependency must not hold up shutdown.
        while stop
            .run_until_cancelled(self.sample(timeout, client.as_ref()))
            .await
            .is_some()
        {}
    }

    /// One round: archive upkeep (when due), the backlog gauges and both
    /// dependency checks, then the pause until the next round.
    async fn sample(&mut self, timeout: Duration, client: Option<&Arc<BaseProducer>>) {
        self.upkeep_archive().await;
        // A connection that does not answer in time is closed, not
        // returned to the pool.
        let db = crate::deadline::Db {
            pool: self.pool.clone(),
            deadline: timeout,
        };
        let database = match db.run(async |conn| sample_backlog(conn).await).await {
            Ok(()) => Ok(()),
            Err(crate::Error::DatabaseSilent(_)) => Err(format!("no answer within {timeout:?}")),
            Err(error) => Err(error.to_string()),
        };
        Health::record(
            &self.health.inner.database,
            self.pool.backend(),
            m::DATABASE_UP,
            database,
        );
        let kafka = match client {
            Some(client) => check_kafka(Arc::clone(client), timeout).await,
            None => Err("no Kafka client".into()),
        };
        Health::record(&self.health.inner.kafka, "Kafka", m::KAFKA_UP, kafka);
        tokio::time::sleep(self.interval).await;
    }
}

async fn sample_backlog(conn: &mut crate::store::Conn) -> sqlx::Result<()> {
    let sample = conn.sample_backlog().await?;
    #[allow(clippy::cast_precision_loss)] // row counts far below 2^52
    {
        gauge!(m::OUTBOX_PENDING_ROWS).set(sample.pending as f64);
        gauge!(m::OUTBOX_ROWS_WITH_ERRORS).set(sample.with_errors as f64);
    }
    gauge!(m::OUTBOX_OLDEST_PENDING_AGE).set(sample.oldest_age_seconds);
    Ok(())
}

async fn check_kafka(client: Arc<BaseProducer>, timeout: Duration) -> Result<(), String> {
    use rdkafka::producer::Producer;
    let answer = tokio::task::spawn_blocking(move || {
        client
            .client()
            .fetch_metadata(None, timeout)
            .map(|metadata| metadata.brokers().len())
    })
    .await;
    match answer {
        Ok(Ok(0)) => Err("the cluster reported no brokers".into()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(error) => Err(format!("check task failed: {error}")),
    }
}
