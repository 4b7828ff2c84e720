//! [`Relay`]: the loop that moves committed outbox rows to Kafka.

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    Error, RelayBuilder, RelaySettings, Result,
    builder::PublishedHook,
    handle::{RelayHandle, Stats, Waker},
    publish::{Outcome, Publisher},
    store::{self, Failure, OutboxRow},
};

/// Moves committed outbox rows to Kafka.
///
/// Each batch: read up to `batch-size` rows of the owned partitions in
/// `seq` order, produce them all with the idempotent producer, wait for the
/// broker's acknowledgements, then delete the acknowledged rows with one
/// statement and record errors on the refused ones. A crash at any point
/// leaves unacknowledged rows in the table; they are sent again (duplicates,
/// never loss) and the inbox drops the duplicates.
///
/// Build one with [`Relay::builder`], then [`Relay::spawn`] it or drive
/// [`Relay::run`] yourself.
pub struct Relay {
    pool: PgPool,
    publisher: Publisher,
    settings: RelaySettings,
    partitions: Vec<i16>,
    waker: Waker,
    stats: Arc<Stats>,
    on_published: Option<PublishedHook>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Starts building a relay on `pool` (the database holding the outbox).
    pub fn builder(pool: PgPool) -> RelayBuilder {
        RelayBuilder::new(pool)
    }

    pub(crate) fn new(
        pool: PgPool,
        publisher: Publisher,
        settings: RelaySettings,
        on_published: Option<PublishedHook>,
    ) -> Self {
        Self {
            pool,
            publisher,
            partitions: settings.owned_partitions(),
            settings,
            waker: Waker::default(),
            stats: Arc::default(),
            on_published,
        }
    }

    /// A handle that makes the relay poll now (call it after a commit that
    /// enqueued events, for the lowest latency).
    #[must_use]
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Runs the relay on a new task.
    #[must_use]
    pub fn spawn(self) -> RelayHandle {
        let shutdown = CancellationToken::new();
        let waker = self.waker.clone();
        let stats = Arc::clone(&self.stats);
        let task = tokio::spawn(self.run(shutdown.clone()));
        RelayHandle::new(task, shutdown, waker, stats)
    }

    /// Publishes until `shutdown` is cancelled, then finishes the batch in
    /// flight (waiting at most `shutdown-timeout` for acknowledgements) and
    /// returns. Outages of the database or the brokers are logged and
    /// retried with backoff; they do not end the loop.
    ///
    /// # Errors
    /// Only if the Kafka producer cannot be recreated after a fatal error.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        info!(
            partitions = self.partitions.len(),
            batch_size = self.settings.batch_size,
            "relay started"
        );
        let mut pause = self.settings.poll_interval;
        let mut error_delays = outage_backoff();
        while !shutdown.is_cancelled() {
            let span = info_span!(
                "relay.batch",
                fetched = tracing::field::Empty,
                delivered = tracing::field::Empty,
                failed = tracing::field::Empty
            );
            match self.batch(&shutdown).instrument(span).await {
                Ok(fetched) => {
                    error_delays = outage_backoff();
                    if fetched == self.batch_limit() {
                        pause = self.settings.poll_interval;
                        continue;
                    }
                    pause = if fetched > 0 {
                        self.settings.poll_interval
                    } else {
                        (pause * 2).min(self.settings.max_poll_interval)
                    };
                    self.idle(pause, &shutdown).await;
                }
                Err(Error::Kafka(error)) => return Err(Error::Kafka(error)),
                Err(error) => {
                    self.stats.record_error();
                    let delay = error_delays.next().unwrap_or(Duration::from_secs(5));
                    log_batch_error(&error, delay);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
            }
        }
        self.publisher.flush(self.settings.shutdown_timeout);
        info!("relay stopped");
        Ok(())
    }

    fn batch_limit(&self) -> usize {
        usize::try_from(self.settings.batch_size).unwrap_or(usize::MAX)
    }

    /// Waits for `pause`, a wake-up, or shutdown.
    async fn idle(&self, pause: Duration, shutdown: &CancellationToken) {
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = self.waker.notified() => {}
            () = shutdown.cancelled() => {}
        }
    }

    /// One read → produce → acknowledge → delete round. Returns the number
    /// of rows read.
    async fn batch(&mut self, shutdown: &CancellationToken) -> Result<usize> {
        let rows = {
            let mut conn = self.pool.acquire().await?;
            let limit = i64::from(self.settings.batch_size);
            store::fetch(&mut conn, &self.partitions, limit).await?
        };
        tracing::Span::current().record("fetched", rows.len());
        if rows.is_empty() {
            return Ok(0);
        }
        let outcomes = self
            .publisher
            .publish(&rows, shutdown, self.settings.shutdown_timeout)
            .await;
        self.settle(&rows, &outcomes).await?;
        if let Some(reason) = self.publisher.renew_if_fatal()? {
            error!(%reason, "Kafka producer hit a fatal error; created a new one");
        }
        Ok(rows.len())
    }

    /// Deletes delivered rows and records failures, retrying briefly if the
    /// database connection dropped while the batch was in flight.
    async fn settle(&self, rows: &[OutboxRow], outcomes: &[Outcome]) -> Result<()> {
        let mut delivered = Vec::new();
        let mut delivered_ids = Vec::new();
        let mut failures = Vec::new();
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Outcome::Delivered => {
                    delivered.push(row.seq);
                    delivered_ids.push(row.id);
                }
                Outcome::Failed(error) => failures.push(self.failure(row, error)),
                Outcome::Held | Outcome::Unknown => {}
            }
        }
        if let Some(hook) = &self.on_published {
            hook(&delivered_ids);
        }
        let retry = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_times(5);
        (|| async {
            let mut conn = self.pool.acquire().await?;
            if !delivered.is_empty() {
                store::delete_published(&mut conn, &delivered).await?;
            }
            if !failures.is_empty() {
                store::record_failures(&mut conn, &failures).await?;
            }
            Ok::<(), sqlx::Error>(())
        })
        .retry(retry)
        .notify(|error: &sqlx::Error, delay| {
            warn!(%error, ?delay, "could not record the batch outcome; retrying");
        })
        .await?;
        self.stats.record_batch(delivered.len(), failures.len());
        log_failures(&failures, rows);
        let span = tracing::Span::current();
        span.record("delivered", delivered.len());
        span.record("failed", failures.len());
        debug!("batch settled");
        Ok(())
    }

    /// The failure to record for `row`, with its next retry time.
    fn failure(&self, row: &OutboxRow, error: &str) -> Failure {
        let attempt = usize::try_from(row.attempts).unwrap_or(0);
        let delay = ExponentialBuilder::default()
            .with_min_delay(self.settings.retry_min_delay)
            .with_max_delay(self.settings.retry_max_delay)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempt)
            .unwrap_or(self.settings.retry_max_delay)
            .min(self.settings.retry_max_delay);
        let mut error = error.to_owned();
        error.truncate(2000);
        Failure {
            seq: row.seq,
            error,
            retry_in_ms: i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
        }
    }
}

fn log_failures(failures: &[Failure], rows: &[OutboxRow]) {
    for failure in failures.iter().take(10) {
        if let Some(row) = rows.iter().find(|r| r.seq == failure.seq) {
            warn!(
                message_id = %row.id,
                topic = %row.topic,
                attempts = row.attempts + 1,
                retry_in_ms = failure.retry_in_ms,
                error = %failure.error,
                "broker refused a message; it stays in the outbox and will be retried"
            );
        }
    }
    if failures.len() > 10 {
        warn!(
            more = failures.len() - 10,
            "further messages refused in this batch"
        );
    }
}

fn log_batch_error(error: &Error, delay: Duration) {
    let missing_table = matches!(error, Error::Database(sqlx::Error::Database(db))
        if db.code().as_deref() == Some("42P01"));
    if missing_table {
        error!(%error, retry_in = ?delay, "the outbox table does not exist: run `consign-relay migrate` (or consign::migrate) first");
    } else {
        warn!(%error, retry_in = ?delay, "relay batch failed; retrying");
    }
}

/// Delays between attempts while the database is unreachable: 100 ms
/// doubling to 5 s, with jitter, for as long as the outage lasts.
fn outage_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}
