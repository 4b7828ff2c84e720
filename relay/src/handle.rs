//! Handles to a running relay: wake it, read its counters, stop it.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tokio::{sync::Notify, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// Makes the relay poll at once instead of waiting for its next poll.
///
/// Cheap to clone. Call [`Waker::wake`] after committing a transaction that
/// enqueued events: the relay reads them right away, without LISTEN/NOTIFY
/// (whose commit-time lock serializes all writers). A wake while the relay
/// is busy is remembered and served after the batch in flight.
#[derive(Debug, Clone, Default)]
pub struct Waker {
    notify: Arc<Notify>,
}

impl Waker {
    /// Wakes the relay.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// Counters of a relay since it started.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    published: AtomicU64,
    failed: AtomicU64,
    batches: AtomicU64,
    errors: AtomicU64,
    fenced: AtomicU64,
    partitions: AtomicU64,
    above_floor: AtomicU64,
    read_ahead: AtomicU64,
}

impl Stats {
    pub(crate) fn record_batch(&self, published: usize, failed: usize) {
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        self.published
            .fetch_add(count(published), Ordering::Relaxed);
        self.failed.fetch_add(count(failed), Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::PUBLISHED).increment(count(published));
    }

    pub(crate) fn record_fenced(&self, rows: usize) {
        let rows = u64::try_from(rows).unwrap_or(u64::MAX);
        self.fenced.fetch_add(rows, Ordering::Relaxed);
        metrics::counter!(crate::metrics::FENCED_ROWS).increment(rows);
    }

    pub(crate) fn set_partitions(&self, partitions: usize) {
        let partitions = u64::try_from(partitions).unwrap_or(u64::MAX);
        self.partitions.store(partitions, Ordering::Relaxed);
    }

    /// A batch read that started above the floor; `ahead`: while the
    /// previous batch was being acknowledged.
    pub(crate) fn record_floor_read(&self, ahead: bool) {
        self.above_floor.fetch_add(1, Ordering::Relaxed);
        if ahead {
            self.read_ahead.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::BATCH_ERRORS).increment(1);
    }

    fn snapshot(&self) -> RelayStats {
        RelayStats {
            published: self.published.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            fenced: self.fenced.load(Ordering::Relaxed),
            partitions: self.partitions.load(Ordering::Relaxed),
            reads_above_floor: self.above_floor.load(Ordering::Relaxed),
            reads_ahead: self.read_ahead.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of a relay's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Messages the broker acknowledged.
    pub published: u64,
    /// Publish attempts the broker or producer refused (recorded on rows).
    pub failed: u64,
    /// Batches completed.
    pub batches: u64,
    /// Batches that failed as a whole (database or broker unreachable).
    pub errors: u64,
    /// Acknowledged rows this relay could not delete because their
    /// partition's lease had passed to another relay (which sends them
    /// again).
    pub fenced: u64,
    /// Outbox partitions the relay published in its latest batch.
    pub partitions: u64,
    /// Batch reads that started above the rows already read instead of at
    /// the start of the outbox (PostgreSQL, when every lower `seq` belongs
    /// to an ended transaction; see the relay's module `floor`).
    pub reads_above_floor: u64,
    /// Of those, batches read and sent while the broker still acknowledged
    /// the previous one.
    pub reads_ahead: u64,
}

/// A relay running on its own task, from [`Relay::spawn`](crate::Relay::spawn).
///
/// Dropping the handle does not stop the relay; call
/// [`RelayHandle::shutdown`].
#[derive(Debug)]
pub struct RelayHandle {
    task: JoinHandle<Result<()>>,
    shutdown: CancellationToken,
    waker: Waker,
    stats: Arc<Stats>,
    instance: String,
    health: crate::Health,
}

impl RelayHandle {
    pub(crate) fn new(
        task: JoinHandle<Result<()>>,
        shutdown: CancellationToken,
        waker: Waker,
        stats: Arc<Stats>,
        instance: String,
        health: crate::Health,
    ) -> Self {
        Self {
            task,
            shutdown,
            waker,
            stats,
            instance,
            health,
        }
    }

    /// Liveness and readiness of the relay. See [`Health`](crate::Health).
    #[must_use]
    pub fn health(&self) -> crate::Health {
        self.health.clone()
    }

    /// The relay's instance name, the owner named in its leases.
    #[must_use]
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Makes the relay poll now. See [`Waker`].
    pub fn wake(&self) {
        self.waker.wake();
    }

    /// A clonable waker to hand to request handlers.
    #[must_use]
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// The relay's counters so far.
    #[must_use]
    pub fn stats(&self) -> RelayStats {
        self.stats.snapshot()
    }

    /// Whether the relay's task has ended (after shutdown, or a fatal error).
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the relay: it finishes the batch in flight (waiting at most
    /// `shutdown-timeout` for acknowledgements and 5 s more to record them,
    /// then abandoning it: its rows are sent again later), releases its
    /// leases and returns. A database that stopped answering cannot hold it
    /// longer than that.
    ///
    /// # Errors
    /// The error that ended the relay, or [`Error::Task`] if it panicked.
    pub async fn shutdown(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await.map_err(|e| Error::Task(e.to_string()))?
    }
}
