//! Waiting between batches, and the idle probe that cuts the wait short.
//!
//! After a batch that was not full the relay pauses (`poll-interval`,
//! doubling up to `max-poll-interval` while the outbox stays empty). A
//! wake-up from the embedding service ends the pause; the `consign-relay`
//! process has no such wake-up, so with only the pause a row written to an
//! idle outbox waited up to `max-poll-interval` (500 ms in production).
//!
//! The probe asks, every `idle-probe-interval` of the pause, for the newest
//! `seq` above the relay's mark: the highest `seq` it has read, or that a
//! probe found before a batch. It reads no row, only the primary key's last
//! entries, so it costs far less than the batch read (which looks up
//! waiting retries and scans the owned partitions). When it finds a row the
//! pause ends and the batch is read at once.
//!
//! Why the mark is safe to raise to what a probe found: the batch that
//! follows reads after the probe, so it sees every row the probe saw; the
//! ones it does not return are not this relay's to send now (another
//! relay's partition, a key waiting for a retry), and must not set the
//! probe off again. The probe is only a hint: a row committed after a newer
//! one (a transaction that took its `seq` earlier and committed later) lies
//! below the mark, and is read by the next batch of the ordinary pause, at
//! most `max-poll-interval` later, as without the probe.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Relay;
use crate::store::RelayStore as _;

impl Relay {
    /// Waits for `pause`, a wake-up, shutdown, or the probe finding a row
    /// newer than the mark.
    pub(super) async fn idle(&mut self, pause: Duration, shutdown: &CancellationToken) {
        let until = Instant::now() + pause;
        let every = self.settings.idle_probe_interval;
        loop {
            let probe_at = if every.is_zero() {
                until
            } else {
                (Instant::now() + every).min(until)
            };
            tokio::select! {
                () = tokio::time::sleep_until(probe_at) => {}
                () = self.waker.notified() => return,
                () = shutdown.cancelled() => return,
            }
            if probe_at >= until || self.probe_found_rows().await {
                return;
            }
        }
    }

    /// Runs the probe; `true` if it found a row above the mark (then the
    /// mark moves to it) or failed (the batch read then reports the error).
    async fn probe_found_rows(&mut self) -> bool {
        let after = self.newest_read;
        match self.db.run(async |conn| conn.newest_seq(after).await).await {
            Ok(Some(seq)) => {
                self.newest_read = self.newest_read.max(seq);
                true
            }
            Ok(None) => false,
            Err(error) => {
                debug!(%error, "idle probe failed; reading a batch instead");
                true
            }
        }
    }

    /// Raises the mark to the newest `seq` a batch read.
    pub(super) fn read_up_to(&mut self, seq: i64) {
        self.newest_read = self.newest_read.max(seq);
    }
}
