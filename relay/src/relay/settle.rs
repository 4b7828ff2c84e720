//! Settling a batch: deleting what the broker acknowledged, recording what
//! it refused, both fenced by the leases the rows were read under.

use std::{sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use tracing::{Instrument as _, debug, warn};

use super::Relay;
use crate::{
    Error, RelaySettings, Result,
    builder::PublishedHook,
    deadline::Db,
    handle::Stats,
    lease::{Owned, Ownership},
    publish::Outcome,
    store::{Failure, Fence, OutboxRow, RelayStore as _},
};

/// What settling a batch needs of its relay, owned, so that a delivered
/// batch can settle in a task of its own while the relay reads the next.
#[derive(Clone)]
pub(super) struct Settler {
    db: Db,
    instance: String,
    settings: RelaySettings,
    on_published: Option<PublishedHook>,
    stats: Arc<Stats>,
    ownership: Arc<Ownership>,
}

/// A batch settling in its own task (see [`Settler::spawn`]).
pub(super) type Settling = tokio::task::JoinHandle<Result<()>>;

impl Relay {
    /// What settling a batch needs of this relay.
    pub(super) fn settler(&self) -> Settler {
        Settler {
            db: self.db.clone(),
            instance: self.instance.clone(),
            settings: self.settings.clone(),
            on_published: self.on_published.clone(),
            stats: Arc::clone(&self.stats),
            ownership: Arc::clone(&self.ownership),
        }
    }

    /// Waits for the batch settling in its own task, if any, and returns
    /// its result.
    pub(super) async fn settled_behind(&mut self) -> Result<()> {
        let Some(behind) = self.settling.take() else {
            return Ok(());
        };
        match behind.task.await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => Err(Error::Task(error.to_string())),
        }
    }
}

impl Settler {
    /// Settles `rows` in a task of its own, in the current span.
    pub(super) fn spawn(
        self,
        rows: Vec<OutboxRow>,
        outcomes: Vec<Outcome>,
        owned: Owned,
    ) -> Settling {
        let span = tracing::Span::current();
        tokio::spawn(async move { self.settle(&rows, &outcomes, &owned).await }.instrument(span))
    }

    /// Deletes delivered rows and records failures, retrying briefly if the
    /// database connection dropped while the batch was in flight. Both are
    /// fenced by the leases the rows were read under.
    pub(super) async fn settle(
        &self,
        rows: &[OutboxRow],
        outcomes: &[Outcome],
        owned: &Owned,
    ) -> Result<()> {
        let mut delivered = Vec::new();
        let mut delivered_ids = Vec::new();
        let mut failures = Vec::new();
        let acked_at = chrono::Utc::now();
        let commit_to_ack = metrics::histogram!(crate::metrics::COMMIT_TO_ACK);
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Outcome::Delivered => {
                    delivered.push(row.seq);
                    delivered_ids.push(row.id);
                    let latency = (acked_at - row.created_at).to_std().unwrap_or_default();
                    commit_to_ack.record(latency.as_secs_f64());
                }
                Outcome::Failed { kind, error } => {
                    crate::metrics::publish_error(kind);
                    failures.push(self.failure(row, error));
                }
                Outcome::Held | Outcome::Unknown => {}
            }
        }
        if let Some(hook) = &self.on_published {
            hook(&delivered_ids);
        }
        let fence = Fence {
            instance: &self.instance,
            owned,
        };
        let retry = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_times(5);
        // One transaction: a retry after a failure part-way must find the
        // delivered rows still there, or it would count them as fenced.
        let deleted = (|| {
            self.db.run(async |conn| {
                conn.settle(fence, &delivered, &failures, self.settings.archive)
                    .await
            })
        })
        .retry(retry)
        .notify(|error: &Error, delay| {
            warn!(%error, ?delay, "could not record the batch outcome; retrying");
        })
        .await?;
        let missing = delivered.len()
            - usize::try_from(deleted)
                .unwrap_or(usize::MAX)
                .min(delivered.len());
        if missing > 0 {
            // Rows of partitions another relay leases now were kept for it;
            // rows of partitions still held were deleted already (a retry
            // after a commit whose answer was lost), not fenced.
            let lost = self.forget_lost(owned).await?;
            let kept = rows
                .iter()
                .zip(outcomes)
                .filter(|(row, outcome)| {
                    matches!(outcome, Outcome::Delivered) && lost.contains(&row.partition)
                })
                .count();
            if kept > 0 {
                self.stats.record_fenced(kept);
                warn!(
                    kept,
                    "acknowledged rows not deleted: their partitions are leased by another relay now, which sends them again (duplicates)"
                );
            }
        }
        self.stats.record_batch(delivered.len(), failures.len());
        log_failures(&failures, rows);
        let span = tracing::Span::current();
        span.record("delivered", delivered.len());
        span.record("failed", failures.len());
        debug!("batch settled");
        Ok(())
    }

    /// After a fenced delete: stops publishing the partitions of `owned`
    /// whose leases are no longer this relay's.
    /// Returns those partitions.
    async fn forget_lost(&self, owned: &Owned) -> Result<Vec<i16>> {
        let fence = Fence {
            instance: &self.instance,
            owned,
        };
        let held = self.db.run(async |conn| conn.held(fence).await).await?;
        let lost: Vec<i16> = owned
            .keys()
            .filter(|p| !held.contains(p))
            .copied()
            .collect();
        if !lost.is_empty() {
            warn!(partitions = ?lost, "partition leases were taken over; stopped publishing them");
            self.ownership.forget(&lost);
        }
        Ok(lost)
    }

    /// The failure to record for `row`, with its next retry time.
    fn failure(&self, row: &OutboxRow, error: &str) -> Failure {
        let attempt = usize::try_from(row.attempts).unwrap_or(0);
        let delay = consign_outbox::backoff::delays(
            self.settings.retry_min_delay,
            self.settings.retry_max_delay,
        )
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
