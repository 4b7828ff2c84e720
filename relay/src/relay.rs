//! [`Relay`]: the loop that moves committed outbox rows to Kafka.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

mod floor;
mod idle;
mod settle;

use crate::{
    Error, RelayBuilder, RelaySettings, Result,
    builder::PublishedHook,
    deadline::Db,
    handle::{RelayHandle, Stats, Waker},
    health::{Health, Sampler},
    lease::{self, Coordinator, Owned, Ownership},
    publish::{Outcome, Publisher, Sent},
    store::{OutboxRow, RelayStore as _},
    txn::Transactional,
};

/// Moves committed outbox rows to Kafka.
///
/// Each batch: read up to `batch-size` rows of the partitions this relay
/// leases, in `seq` order, produce them all (with the idempotent producer,
/// or in transactions mode one Kafka transaction per partition), wait for
/// the broker's acknowledgements, then delete the acknowledged rows with one
/// statement and record errors on the refused ones. A crash at any point
/// leaves unacknowledged rows in the table; they are sent again (duplicates,
/// never loss) and the inbox drops the duplicates.
///
/// On PostgreSQL, while every lower `seq` belongs to an ended transaction,
/// a batch read starts above the rows already read rather than at the start
/// of the outbox (whose index holds the entries of every row deleted since
/// the last vacuum), and the next full batch is read and sent while the
/// broker acknowledges the current one. Both only for rows whose order they
/// cannot change; see the module `floor` (`relay/src/relay/floor.rs`).
///
/// Several relays (processes or tasks) can run on one outbox: they divide its
/// 32 partitions through leases, see [`lease`](crate::lease).
///
/// Build one with [`Relay::builder`], then [`Relay::spawn`] it or drive
/// [`Relay::run`] yourself.
pub struct Relay {
    db: Db,
    publisher: Publishers,
    settings: RelaySettings,
    instance: String,
    host: String,
    ownership: Arc<Ownership>,
    waker: Waker,
    stats: Arc<Stats>,
    on_published: Option<PublishedHook>,
    /// The partitions of the previous batch, to update ownership gauges
    /// only on change.
    last_owned: Vec<i16>,
    /// The idle probe's mark: the highest `seq` read, or found by a probe
    /// before a batch (see `relay/idle.rs`).
    newest_read: i64,
    /// Backlog gauges and dependency checks, run next to the relay.
    sampler: Option<Sampler>,
    health: Health,
    /// Where the next batch read starts (see `relay/floor.rs`).
    floor: floor::Floor,
    /// A batch read and sent ahead while the previous one was acknowledged,
    /// to be settled by the next round.
    ahead: Option<InFlight>,
    /// A delivered batch being deleted in a task of its own while the next
    /// is read and acknowledged.
    settling: Option<Behind>,
}

/// A delivered batch settling in its own task: every read that could see
/// its rows again (below `newest`), every lease change and every other
/// settle waits for it first.
struct Behind {
    task: settle::Settling,
    /// The highest `seq` of its rows.
    newest: i64,
}

/// A batch sent with the shared producer, its acknowledgements pending.
struct InFlight {
    rows: Vec<OutboxRow>,
    /// The leases its rows were read under.
    owned: Owned,
    /// The floor it was read above.
    after: i64,
    sent: Sent,
}

impl InFlight {
    /// Hands `rows`, read under `owned` above `after`, to the producer.
    async fn send(publisher: &Publisher, rows: Vec<OutboxRow>, owned: Owned, after: i64) -> Self {
        let refs: Vec<&OutboxRow> = rows.iter().collect();
        let produce = info_span!("consign.relay.produce", rows = rows.len());
        let sent = publisher.send_batch(&refs).instrument(produce).await;
        Self {
            rows,
            owned,
            after,
            sent,
        }
    }
}

/// The producer(s): one shared idempotent producer, or one transactional
/// producer per leased partition.
pub(crate) enum Publishers {
    Shared(Publisher),
    PerPartition(Transactional),
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("instance", &self.instance)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Starts building a relay on `pool` (the database holding the outbox).
    ///
    /// Give the pool a `statement_timeout` (as `consign-relay` does from
    /// `database.statement-timeout`, via [`DatabaseSettings::connect_lazy`]):
    /// without one, a statement waiting on a lock held elsewhere holds the
    /// relay for as long as the lock lasts.
    ///
    /// [`DatabaseSettings::connect_lazy`]: crate::config::DatabaseSettings::connect_lazy
    pub fn builder(pool: impl Into<crate::DatabasePool>) -> RelayBuilder {
        RelayBuilder::new(pool.into())
    }

    pub(crate) fn new(
        db: Db,
        publisher: Publishers,
        settings: RelaySettings,
        on_published: Option<PublishedHook>,
        sampler: Sampler,
    ) -> Self {
        let (instance, host) = lease::instance_name();
        Self {
            health: sampler.health.clone(),
            sampler: Some(sampler),
            db,
            publisher,
            settings,
            instance,
            host,
            ownership: Arc::default(),
            waker: Waker::default(),
            stats: Arc::default(),
            on_published,
            last_owned: vec![-1],
            newest_read: 0,
            floor: floor::Floor::new(),
            ahead: None,
            settling: None,
        }
    }

    /// The name this relay registers under in `consign_relays` and as the
    /// owner of its leases (`host-pid-random`).
    #[must_use]
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Liveness and readiness (PostgreSQL and Kafka answering), as served
    /// at `/health` by the `consign-relay` binary.
    #[must_use]
    pub fn health(&self) -> Health {
        self.health.clone()
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
        let instance = self.instance.clone();
        let health = self.health.clone();
        let task = tokio::spawn(self.run(shutdown.clone()));
        RelayHandle::new(task, shutdown, waker, stats, instance, health)
    }

    /// Publishes until `shutdown` is cancelled, then finishes the batch in
    /// flight (waiting at most `shutdown-timeout` for acknowledgements and
    /// 5 s more to record them; past that the batch is abandoned and its
    /// rows are sent again later), releases its leases and returns. Outages
    /// of the database or the brokers are logged and retried with backoff;
    /// they do not end the loop.
    ///
    /// # Errors
    /// Only if the Kafka producer cannot be recreated after a fatal error.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        info!(
            instance = %self.instance,
            batch_size = self.settings.batch_size,
            lease_ttl = ?self.settings.lease_ttl,
            transactions = self.settings.transactions,
            "relay started"
        );
        // Before the first batch, so no row lands in the default partition.
        if let Some(sampler) = &mut self.sampler {
            shutdown.run_until_cancelled(sampler.upkeep_archive()).await;
        }
        let stop_coordinator = CancellationToken::new();
        let coordinator = tokio::spawn(
            Coordinator::new(
                self.db.clone(),
                self.instance.clone(),
                self.host.clone(),
                self.settings.lease_ttl,
                Arc::clone(&self.ownership),
            )
            .run(stop_coordinator.clone()),
        );
        let sampler = self
            .sampler
            .take()
            .map(|sampler| tokio::spawn(sampler.run(stop_coordinator.clone())));
        let result = self.publish_until(&shutdown).await;
        self.settle_last(&shutdown).await;
        stop_coordinator.cancel();
        if let Err(error) = coordinator.await {
            warn!(%error, "lease coordinator task failed");
        }
        if let Some(task) = sampler
            && let Err(error) = task.await
        {
            warn!(%error, "health sampler task failed");
        }
        self.leave().await;
        info!("relay stopped");
        result
    }

    /// The publishing loop.
    async fn publish_until(&mut self, shutdown: &CancellationToken) -> Result<()> {
        let mut pause = self.settings.poll_interval;
        let mut error_delays = consign_outbox::backoff::outage();
        while !shutdown.is_cancelled() {
            self.health.turned();
            let span = info_span!(
                "consign.relay.batch",
                fetched = tracing::field::Empty,
                delivered = tracing::field::Empty,
                failed = tracing::field::Empty
            );
            let abandon_at = abandon_after(shutdown, self.settings.shutdown_timeout);
            let outcome = tokio::select! {
                outcome = self.batch(shutdown).instrument(span) => outcome,
                () = abandon_at => {
                    warn!(
                        "the batch in flight did not finish in time after shutdown (the database does not answer?); \
                         abandoning it: its rows stay in the outbox and are sent again (duplicates)"
                    );
                    return Ok(());
                }
            };
            match outcome {
                Ok(None) => {
                    // No leases (yet): wait for the coordinator.
                    tokio::select! {
                        () = self.ownership.changed() => {}
                        () = tokio::time::sleep(self.settings.max_poll_interval) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
                Ok(Some(fetched)) => {
                    error_delays = consign_outbox::backoff::outage();
                    if fetched == self.batch_limit() || self.ahead.is_some() {
                        pause = self.settings.poll_interval;
                        continue;
                    }
                    pause = if fetched > 0 {
                        self.settings.poll_interval
                    } else {
                        (pause * 2).min(self.settings.max_poll_interval)
                    };
                    self.idle(pause, shutdown).await;
                }
                Err(Error::Kafka(error)) => return Err(Error::Kafka(error)),
                Err(error) => {
                    self.floor.reset();
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
        Ok(())
    }

    /// Flushes or drops the producers, then gives up leases and membership
    /// so other relays take the partitions over at once.
    async fn leave(&mut self) {
        match &mut self.publisher {
            Publishers::Shared(publisher) => publisher.flush(self.settings.shutdown_timeout).await,
            Publishers::PerPartition(transactional) => transactional.close().await,
        }
        let leave = lease::leave(&self.db.pool, &self.instance);
        match tokio::time::timeout(Duration::from_secs(5), leave).await {
            Ok(Ok(())) => info!("partition leases released"),
            Ok(Err(error)) => {
                warn!(%error, "could not release partition leases; they expire after the lease TTL");
            }
            Err(_) => {
                warn!("releasing partition leases timed out; they expire after the lease TTL");
            }
        }
    }

    fn batch_limit(&self) -> usize {
        usize::try_from(self.settings.batch_size).unwrap_or(usize::MAX)
    }

    /// Releases surplus leases, then one read → produce → acknowledge →
    /// delete round. Returns the number of rows read, or `None` when the
    /// relay holds no partition. With the shared producer, a full batch
    /// may have its successor read and sent while the broker acknowledges
    /// it (see [`finish`](Self::finish)); the next round settles that one
    /// first.
    async fn batch(&mut self, shutdown: &CancellationToken) -> Result<Option<usize>> {
        if let Some(ahead) = self.ahead.take() {
            return self.finish(ahead, shutdown).await.map(Some);
        }
        if !self.ownership.to_release().is_empty() {
            // Its delete is fenced by the leases about to go.
            self.settled_behind().await?;
        }
        self.release_surplus().await?;
        let mut owned = self.ownership.current();
        if let Publishers::PerPartition(transactional) = &mut self.publisher {
            owned = transactional.sync(&self.db, &owned).await;
        }
        self.stats.set_partitions(owned.len());
        if owned.keys().ne(self.last_owned.iter()) {
            self.last_owned = owned.keys().copied().collect();
            crate::metrics::partitions_owned(&self.last_owned);
        }
        if owned.is_empty() {
            return Ok(None);
        }
        self.observe_horizon(&owned).await?;
        let after = self.floor.start(&owned, self.settings.max_poll_interval);
        if self
            .settling
            .as_ref()
            .is_some_and(|behind| after < behind.newest)
        {
            // This read could find its rows again.
            self.settled_behind().await?;
        }
        let rows = self.read(&owned, after, false).await?;
        tracing::Span::current().record("fetched", rows.len());
        let drained = rows.len() < self.batch_limit();
        if rows.is_empty() {
            if let Publishers::PerPartition(transactional) = &self.publisher {
                transactional.nothing_to_do(owned.keys());
            }
            self.floor.settled(after, None, true);
            return Ok(Some(0));
        }
        match &mut self.publisher {
            Publishers::Shared(publisher) => {
                let batch = InFlight::send(publisher, rows, owned, after).await;
                self.finish(batch, shutdown).await.map(Some)
            }
            Publishers::PerPartition(transactional) => {
                let produce = info_span!("consign.relay.produce", rows = rows.len());
                let grace = self.settings.shutdown_timeout;
                let (outcomes, fenced) = transactional
                    .publish(&rows, &owned, drained, shutdown, grace)
                    .instrument(produce)
                    .await;
                self.ownership.forget(&fenced);
                self.settle_read(&rows, &outcomes, &owned, after).await?;
                Ok(Some(rows.len()))
            }
        }
    }

    /// Reads the batch after `batch` and sends it if it may (see
    /// [`read_ahead`](Self::read_ahead)), then waits for `batch`'s
    /// acknowledgements and settles it. Returns its number of rows.
    async fn finish(&mut self, batch: InFlight, shutdown: &CancellationToken) -> Result<usize> {
        if batch.rows.len() == self.batch_limit()
            && batch.sent.all_sent()
            && !shutdown.is_cancelled()
        {
            self.read_ahead(&batch).await;
        }
        let count = batch.rows.len();
        let mut refused = self.settle_sent(batch, shutdown).await?;
        if let Publishers::Shared(publisher) = &self.publisher
            && publisher.is_fatal()
            && let Some(ahead) = self.ahead.take()
        {
            // The refusal that stopped the producer may be the batch read
            // ahead's: settle it too before the producer goes. Its rows not
            // yet sent fail at once as purged; those in flight get the
            // broker's answer. Rows without a delivery stay and are read
            // again, behind the refused row.
            publisher.purge_queued();
            refused |= self.settle_sent(ahead, shutdown).await?;
        }
        if let Publishers::Shared(publisher) = &mut self.publisher
            && let Some(reason) = publisher.renew_if_fatal()?
        {
            error!(%reason, "Kafka producer hit a fatal error; created a new one");
            if !refused {
                // No row of ours caused it (e.g. the cluster refuses
                // idempotence): back off like an outage, not a tight loop.
                return Err(Error::Kafka(rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::Fatal,
                )));
            }
        }
        Ok(count)
    }

    /// Waits for a sent batch's acknowledgements (while the producer lives,
    /// librdkafka answers every message within `message.timeout.ms`) and
    /// settles it. Returns whether the broker or producer refused a row.
    ///
    /// A batch all delivered is deleted in a task of its own (after the one
    /// before it), so that the delete overlaps the next batch's read and
    /// acknowledgements; the floor moves past it at once. A batch with a
    /// row not delivered settles here: its errors must be recorded before
    /// the next read, which holds back its keys' later rows.
    async fn settle_sent(&mut self, batch: InFlight, shutdown: &CancellationToken) -> Result<bool> {
        let InFlight {
            rows,
            owned,
            after,
            sent,
        } = batch;
        let produce = info_span!("consign.relay.produce", rows = rows.len());
        let outcomes = sent
            .wait(shutdown, self.settings.shutdown_timeout)
            .instrument(produce)
            .await;
        match newest(&rows) {
            Some(newest) if all_delivered(&outcomes) => {
                self.settled_behind().await?;
                self.floor.settled(after, Some(newest), true);
                let task = self.settler().spawn(rows, outcomes, owned);
                self.settling = Some(Behind { task, newest });
                Ok(false)
            }
            _ => self.settle_read(&rows, &outcomes, &owned, after).await,
        }
    }

    /// Settles a batch read above `after` (see [`Settler::settle`](settle::Settler::settle))
    /// and moves the floor past it. Returns whether the broker or producer
    /// refused a row.
    async fn settle_read(
        &mut self,
        rows: &[OutboxRow],
        outcomes: &[Outcome],
        owned: &Owned,
        after: i64,
    ) -> Result<bool> {
        self.settled_behind().await?;
        self.settler().settle(rows, outcomes, owned).await?;
        self.floor
            .settled(after, newest(rows), all_delivered(outcomes));
        Ok(outcomes.iter().any(|o| matches!(o, Outcome::Failed { .. })))
    }

    /// Reads and sends the batch after `batch` while the broker still
    /// acknowledges it, when the floor can start right above `batch`'s
    /// rows (every row below is decided and none waits for a retry, see
    /// `relay/floor.rs`) and the leases are unchanged. The order of a key's
    /// rows across the two batches is the producer's: one partition's
    /// messages go in order, and with `enable.gapless.guarantee` a refused
    /// one stops the producer before a later one is written (those come
    /// back unknown and are sent again after it). A failed read is left to
    /// the next round.
    async fn read_ahead(&mut self, batch: &InFlight) {
        let Some(newest) = newest(&batch.rows) else {
            return;
        };
        if !self.ownership.to_release().is_empty() || self.ownership.current() != batch.owned {
            return;
        }
        if let Err(error) = self.observe_horizon(&batch.owned).await {
            debug!(%error, "could not read ahead; the next round reads instead");
            return;
        }
        let Some(after) = self.floor.ahead(batch.after, newest) else {
            return;
        };
        let rows = match self.read(&batch.owned, after, true).await {
            Ok(rows) if !rows.is_empty() => rows,
            Ok(_) => return,
            Err(error) => {
                debug!(%error, "could not read ahead; the next round reads instead");
                return;
            }
        };
        let Publishers::Shared(publisher) = &self.publisher else {
            return;
        };
        let ahead = InFlight::send(publisher, rows, batch.owned.clone(), after).await;
        self.floor.read_ahead(after);
        self.ahead = Some(ahead);
    }

    /// At shutdown: waits for the batch sent ahead and settles it, and for
    /// the batch settling in its own task (at most `shutdown-timeout` in
    /// all). If that fails their rows stay and are sent again.
    async fn settle_last(&mut self, shutdown: &CancellationToken) {
        let limit = self.settings.shutdown_timeout + SETTLE_AFTER_SHUTDOWN;
        let settle = async {
            if let Some(ahead) = self.ahead.take() {
                self.settle_sent(ahead, shutdown).await?;
            }
            self.settled_behind().await
        };
        match tokio::time::timeout(limit, settle).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                warn!(%error, "could not settle the last batches sent; their rows are sent again");
            }
            Err(_) => {
                warn!("the last batches sent did not settle in time; their rows are sent again");
            }
        }
    }

    /// Reads the floor's horizon (PostgreSQL) before a batch read. A
    /// database that refuses it (no right to read the outbox's sequence, a
    /// version without `pg_current_snapshot`) turns the floor off.
    async fn observe_horizon(&mut self, owned: &Owned) -> Result<()> {
        if !self.floor.enabled() {
            return Ok(());
        }
        let partitions: Vec<i16> = owned.keys().copied().collect();
        let asked = tokio::time::Instant::now();
        match self
            .db
            .run(async |conn| conn.horizon(&partitions).await)
            .await
        {
            Ok(Some(horizon)) => {
                self.floor
                    .observe(horizon, asked, tokio::time::Instant::now());
            }
            Ok(None) => self.floor.disable(),
            Err(Error::Database(sqlx::Error::Database(refused)))
                if refused.code().is_some_and(|code| code.starts_with("42")) =>
            {
                warn!(error = %refused, "cannot read the outbox's horizon; every batch reads the outbox from its start");
                self.floor.disable();
            }
            Err(error) => return Err(error),
        }
        Ok(())
    }

    /// Reads up to a batch of rows of `owned`'s partitions above `after`
    /// (`ahead`: while the previous batch is acknowledged).
    async fn read(&mut self, owned: &Owned, after: i64, ahead: bool) -> Result<Vec<OutboxRow>> {
        let limit = i64::from(self.settings.batch_size);
        let max_bytes = i64::try_from(self.settings.batch_max_bytes).unwrap_or(i64::MAX);
        let partitions: Vec<i16> = owned.keys().copied().collect();
        let rows = self
            .db
            .run(async |conn| conn.fetch_batch(&partitions, limit, max_bytes, after).await)
            .await?;
        if let Some(newest) = newest(&rows) {
            self.read_up_to(newest);
            metrics::histogram!(crate::metrics::BATCH_ROWS)
                .record(f64::from(u32::try_from(rows.len()).unwrap_or(u32::MAX)));
        }
        debug!(after, rows = rows.len(), "batch read");
        if after > 0 {
            self.stats.record_floor_read(ahead);
        }
        Ok(rows)
    }

    /// Gives up the partitions the coordinator marked as surplus. Runs
    /// between batches, so none of their rows is in flight.
    async fn release_surplus(&self) -> Result<()> {
        let surplus = self.ownership.to_release();
        if surplus.is_empty() {
            return Ok(());
        }
        self.db
            .run(async |conn| conn.release(&self.instance, &surplus).await)
            .await?;
        self.ownership.released(&surplus);
        let partitions: Vec<i16> = surplus.iter().map(|(p, _)| *p).collect();
        info!(?partitions, "released surplus partitions");
        Ok(())
    }
}

/// The highest `seq` of `rows`.
fn newest(rows: &[OutboxRow]) -> Option<i64> {
    rows.iter().map(|row| row.seq).max()
}

fn all_delivered(outcomes: &[Outcome]) -> bool {
    outcomes.iter().all(|o| matches!(o, Outcome::Delivered))
}

fn log_batch_error(error: &Error, delay: Duration) {
    let code = match error {
        Error::Database(sqlx::Error::Database(db)) => db.code(),
        _ => None,
    };
    if code.as_deref() == Some("42P01") {
        error!(%error, retry_in = ?delay, "the outbox table does not exist: run `consign-relay migrate` (or consign::migrate) first");
    } else if code.as_deref() == Some("57014") {
        warn!(%error, retry_in = ?delay, "a relay statement was cancelled (statement_timeout: a lock held by a migration or a long transaction?); retrying");
    } else {
        warn!(%error, retry_in = ?delay, "relay batch failed; retrying");
    }
}

/// Past `shutdown-timeout` (for acknowledgements), how long the batch in
/// flight may still take to record its outcome before shutdown abandons it.
const SETTLE_AFTER_SHUTDOWN: Duration = Duration::from_secs(5);

/// Resolves `grace` + [`SETTLE_AFTER_SHUTDOWN`] after `shutdown` is
/// cancelled; the batch in flight is then dropped, so a database that
/// stopped answering (a hung connection, no error) cannot hold the relay
/// past shutdown. Dropping it is safe: rows are deleted only after their
/// acknowledgement, so an abandoned batch's rows are sent again.
async fn abandon_after(shutdown: &CancellationToken, grace: Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(grace + SETTLE_AFTER_SHUTDOWN).await;
}
