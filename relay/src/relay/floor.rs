//! The floor: where the next batch read may start, so that it does not walk
//! the rows the relay already deleted.
//!
//! The batch read scans the primary key in `seq` order from the start. On
//! PostgreSQL the start of that index holds the entries of every row the
//! relay deleted since the last vacuum: late in a drain of a million rows a
//! read walked ~600k of them (~5 ms of a 7 ms read). Starting at `seq >
//! floor` skips them, and lets the relay read its next batch while the
//! broker still acknowledges the current one (`relay.rs`), because the
//! floor then excludes the rows in flight.
//!
//! The floor must never skip a row still to send. Rows below it are the
//! ones the relay read (and sent, or holds in flight), rows waiting for a
//! retry (the floor stays below the first of them), and rows of partitions
//! it did not own (it resets whenever its leases change). What is left is
//! a row *committed late*: a transaction that took its `seq` before a row
//! the relay read and committed after that read. Reading from the start
//! finds such a row at the next batch; a floor above it would skip it, and
//! its key's later rows would overtake it.
//!
//! So the floor only rises to `seq`s that are *decided*: allocated by
//! transactions that have all ended. [`Horizon`] tells, in one snapshot,
//! that no transaction of the database cluster is in progress, that the
//! outbox's sequence hands out numbers one at a time (no per-session cache
//! that could hand out an old number later) and that no user trigger runs
//! on the outbox, and it reads the sequence's last value. A transaction
//! takes its `seq` (the column default) a moment before it writes the row
//! and gets its transaction id; in that moment it is not listed as in
//! progress. Hence a value counts as decided only when a quiet snapshot
//! comes at least [`SETTLED_AFTER`] after it was read: every `seq` up to it
//! was allocated that long before, by a transaction that is not in progress,
//! so ended. Under a steady stream of writers a quiet snapshot is rare and
//! the relay reads from the start as before; the floor pays off draining a
//! backlog, where it matters.
//!
//! A full read from the start still runs every `max-poll-interval`, and
//! after any batch that was not wholly delivered, any error, and any change
//! of leases.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::{lease::Owned, store::Horizon};

/// How long before a quiet snapshot a sequence value must have been read to
/// count as decided (see the module documentation): far longer than a
/// transaction spends between taking a `seq` and writing its row.
pub(super) const SETTLED_AFTER: Duration = Duration::from_secs(2);

/// The floor's state, kept by the relay across batches.
#[derive(Debug)]
pub(super) struct Floor {
    /// False once the database refused the horizon query (e.g. no right to
    /// read the sequence): the relay then always reads from the start.
    enabled: bool,
    /// Every `seq` up to this belongs to an ended transaction.
    decided: i64,
    /// Sequence values read, with the time their answer arrived.
    samples: VecDeque<(Instant, i64)>,
    /// The first row waiting for a retry in the owned partitions, as of the
    /// last horizon.
    first_failed: Option<i64>,
    /// The next read starts above this (0: from the start).
    after: i64,
    /// The leases `after` holds for.
    owned: Owned,
    /// When the next read from the start is due.
    full_read_due: Instant,
}

impl Floor {
    pub(super) fn new() -> Self {
        Self {
            enabled: true,
            decided: 0,
            samples: VecDeque::new(),
            first_failed: None,
            after: 0,
            owned: Owned::new(),
            full_read_due: Instant::now(),
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Stops using the floor for good (the horizon query failed).
    pub(super) fn disable(&mut self) {
        self.enabled = false;
        self.reset();
    }

    /// The next read starts from the beginning.
    pub(super) fn reset(&mut self) {
        self.after = 0;
    }

    /// Takes in a horizon whose query was sent at `asked` and answered at
    /// `answered`.
    pub(super) fn observe(&mut self, horizon: Horizon, asked: Instant, answered: Instant) {
        self.first_failed = horizon.first_failed;
        if horizon.quiet {
            // The newest sample read SETTLED_AFTER before this snapshot
            // (which the database took after `asked`).
            while let Some(&(at, allocated)) = self.samples.front() {
                if at + SETTLED_AFTER > asked {
                    break;
                }
                self.decided = self.decided.max(allocated);
                self.samples.pop_front();
            }
        }
        if self.samples.len() < 10_000 {
            self.samples.push_back((answered, horizon.allocated));
        }
    }

    /// Where the read of a batch of `owned`'s partitions starts, while no
    /// batch is in flight: 0 when the leases changed or a full read is due.
    pub(super) fn start(&mut self, owned: &Owned, max_poll_interval: Duration) -> i64 {
        let now = Instant::now();
        if !self.enabled || *owned != self.owned || now >= self.full_read_due {
            self.owned = owned.clone();
            self.full_read_due = now + max_poll_interval;
            self.after = 0;
        }
        self.after
    }

    /// How high the floor may rise past rows read above `after` up to
    /// `newest` (`None`: the read found nothing), if they all turn out
    /// delivered.
    fn raised(&self, after: i64, newest: Option<i64>) -> i64 {
        let waiting = self.first_failed.map_or(i64::MAX, |seq| seq - 1);
        let limit = self.decided.min(waiting).min(newest.unwrap_or(i64::MAX));
        after.max(limit)
    }

    /// The floor for reading the next batch while one read above `after`,
    /// up to `newest`, is in flight: `Some(newest)` when every row up to it
    /// is decided and none waits for a retry, so the next read can skip
    /// exactly the rows in flight. `None` also when a full read is due, and
    /// for a batch read from the start (the first after a reset, e.g. after
    /// a refusal: the row refused is then sent again alone, its answer
    /// awaited).
    pub(super) fn ahead(&self, after: i64, newest: i64) -> Option<i64> {
        (self.enabled
            && after > 0
            && after == self.after
            && Instant::now() < self.full_read_due
            && self.raised(after, Some(newest)) == newest)
            .then_some(newest)
    }

    /// After settling a batch read above `after` up to `newest`: raises the
    /// floor if every row was delivered, resets it if not. A batch read on
    /// a floor that has since been reset changes nothing.
    pub(super) fn settled(&mut self, after: i64, newest: Option<i64>, all_delivered: bool) {
        if !all_delivered {
            self.reset();
        } else if after == self.after && self.enabled {
            self.after = self.raised(after, newest);
        }
    }

    /// Moves the floor to a batch read ahead (see [`ahead`](Self::ahead)),
    /// so that it settles on this floor.
    pub(super) fn read_ahead(&mut self, after: i64) {
        self.after = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn horizon(quiet: bool, allocated: i64, first_failed: Option<i64>) -> Horizon {
        Horizon {
            quiet,
            allocated,
            first_failed,
        }
    }

    /// A floor on which every `seq` up to `decided` is decided, and
    /// `first_failed` waits for a retry.
    fn decided_up_to(decided: i64, first_failed: Option<i64>) -> Floor {
        let t0 = Instant::now();
        let t1 = t0 + SETTLED_AFTER;
        let mut floor = Floor::new();
        floor.observe(horizon(true, decided, None), t0, t0);
        floor.observe(horizon(true, decided, first_failed), t1, t1);
        floor
    }

    #[test]
    fn a_value_is_decided_only_by_a_quiet_snapshot_settled_after_it() {
        let t0 = Instant::now();
        let mut floor = Floor::new();
        floor.observe(horizon(true, 100, None), t0, t0);
        // Quiet, but too soon after the value was read.
        let t1 = t0 + SETTLED_AFTER / 2;
        floor.observe(horizon(true, 150, None), t1, t1);
        assert_eq!(floor.decided, 0);
        // Late enough, but a transaction is in progress.
        let t2 = t0 + SETTLED_AFTER * 2;
        floor.observe(horizon(false, 200, None), t2, t2);
        assert_eq!(floor.decided, 0);
        floor.observe(horizon(true, 250, None), t2, t2);
        assert_eq!(floor.decided, 150, "the values read long enough before");
    }

    #[test]
    fn the_floor_stays_below_undecided_and_waiting_rows() {
        let mut floor = decided_up_to(1000, Some(700));
        let owned = Owned::from([(0, 1)]);
        assert_eq!(floor.start(&owned, Duration::from_secs(60)), 0);
        assert_eq!(floor.ahead(0, 500), None, "a read from the start");
        floor.settled(0, Some(500), true);
        assert_eq!(floor.start(&owned, Duration::from_secs(60)), 500);
        assert_eq!(floor.ahead(500, 600), Some(600));
        assert_eq!(floor.ahead(500, 900), None, "row 700 waits for a retry");
        floor.settled(500, Some(900), true);
        assert_eq!(floor.after, 699);
        // The retry went through; values read now are not decided yet.
        let now = Instant::now() + SETTLED_AFTER;
        floor.observe(horizon(true, 5000, None), now, now);
        floor.settled(699, Some(1200), true);
        assert_eq!(floor.after, 1000, "only decided values");
        assert_eq!(floor.start(&owned, Duration::from_secs(60)), 1000);
        floor.settled(1000, None, true);
        assert_eq!(floor.after, 1000);
    }

    #[test]
    fn failures_lease_changes_and_full_reads_reset_it() {
        let mut floor = decided_up_to(1000, None);
        let owned = Owned::from([(0, 1)]);
        floor.start(&owned, Duration::from_secs(60));
        floor.settled(0, Some(300), true);
        assert_eq!(floor.start(&owned, Duration::from_secs(60)), 300);
        floor.settled(300, Some(600), false);
        assert_eq!(floor.start(&owned, Duration::from_secs(60)), 0);
        floor.settled(0, Some(600), true);
        // A batch read ahead on the old floor settles without effect.
        floor.settled(300, Some(900), true);
        assert_eq!(floor.after, 600);
        let other = Owned::from([(0, 2)]);
        assert_eq!(floor.start(&other, Duration::from_millis(1)), 0);
        floor.settled(0, Some(100), true);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(floor.ahead(100, 200), None, "a full read is due");
        assert_eq!(floor.start(&other, Duration::from_secs(60)), 0);
    }
}
