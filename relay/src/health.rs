//! Liveness and readiness of a relay, and the sampler that keeps them (and
//! the backlog gauges) current.
//!
//! Every `sample-interval` the sampler asks PostgreSQL for the backlog (one
//! aggregate query) and Kafka for cluster metadata (on a metadata-only
//! client with the relay's connection settings). Each answer, or the error
//! in its place, is a [`Check`]. The relay is *ready* when both last checks
//! succeeded, and *live* while its publishing loop keeps turning and no
//! partition it holds has been stalled for [`LIVENESS_LIMIT`] while Kafka
//! answers (an outage makes it unready, not dead: it recovers by itself; a
//! partition that cannot progress on a cluster that answers needs a restart
//! or an operator).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use metrics::gauge;
use serde::Serialize;
use tracing::{info, warn};

/// A publishing loop that has not turned for this long, or a partition
/// stalled this long while Kafka answers, makes the relay not live.
pub const LIVENESS_LIMIT: Duration = Duration::from_secs(120);

/// The outcome of the last check of one dependency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Check {
    /// Whether it answered.
    pub up: bool,
    /// Why not, if it did not.
    pub error: Option<String>,
    /// When it was checked; `None` before the first check.
    pub checked_at: Option<DateTime<Utc>>,
}

impl Check {
    fn pending() -> Self {
        Self {
            up: false,
            error: Some("not checked yet".into()),
            checked_at: None,
        }
    }
}

/// What `/health/ready` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Readiness {
    /// Both dependencies answered at their last check.
    pub ready: bool,
    /// PostgreSQL.
    pub database: Check,
    /// The Kafka brokers.
    pub kafka: Check,
}

/// What `/health/live` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Liveness {
    /// The publishing loop turned within [`LIVENESS_LIMIT`] and no partition
    /// has been stalled that long while Kafka answered.
    pub live: bool,
    /// Held partitions whose publishing failed since their last progress
    /// (transactions mode: a producer that cannot be initialized, or
    /// transactions that keep failing), oldest first.
    pub stalled: Vec<Stall>,
}

/// A held outbox partition that has not progressed since its first failure.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Stall {
    /// The outbox partition.
    pub partition: i16,
    /// Seconds since the first failure without progress after it.
    pub seconds: f64,
    /// The latest failure.
    pub error: String,
}

/// Shared health state of one relay. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    database: Mutex<Check>,
    kafka: Mutex<Check>,
    turned_at: Mutex<Instant>,
    /// By partition: since when it fails without progress, and the latest error.
    stalls: Mutex<BTreeMap<i16, (Instant, String)>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                database: Mutex::new(Check::pending()),
                kafka: Mutex::new(Check::pending()),
                turned_at: Mutex::new(Instant::now()),
                stalls: Mutex::new(BTreeMap::new()),
            }),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Health {
    /// Ready when the last checks of PostgreSQL and Kafka both succeeded.
    #[must_use]
    pub fn readiness(&self) -> Readiness {
        let database = lock(&self.inner.database).clone();
        let kafka = lock(&self.inner.kafka).clone();
        Readiness {
            ready: database.up && kafka.up,
            database,
            kafka,
        }
    }

    /// Live while the publishing loop turned within [`LIVENESS_LIMIT`] and
    /// no held partition has been stalled that long while the last Kafka
    /// check succeeded.
    #[must_use]
    pub fn live(&self) -> bool {
        self.liveness().live
    }

    /// Liveness with the stalled partitions, for `/health/live`.
    #[must_use]
    pub fn liveness(&self) -> Liveness {
        self.liveness_at(Instant::now())
    }

    fn liveness_at(&self, now: Instant) -> Liveness {
        let turning = now.saturating_duration_since(*lock(&self.inner.turned_at)) < LIVENESS_LIMIT;
        let mut stalled: Vec<(Duration, Stall)> = lock(&self.inner.stalls)
            .iter()
            .map(|(&partition, (since, error))| {
                let age = now.saturating_duration_since(*since);
                let stall = Stall {
                    partition,
                    seconds: age.as_secs_f64(),
                    error: error.clone(),
                };
                (age, stall)
            })
            .collect();
        stalled.sort_by_key(|(age, _)| std::cmp::Reverse(*age));
        // During an outage every partition stalls: that is unreadiness, and
        // the relay recovers by itself.
        let kafka_up = lock(&self.inner.kafka).up;
        let stuck = kafka_up
            && stalled
                .first()
                .is_some_and(|(age, _)| *age >= LIVENESS_LIMIT);
        Liveness {
            live: turning && !stuck,
            stalled: stalled.into_iter().map(|(_, stall)| stall).collect(),
        }
    }

    /// Called by the publishing loop on every turn.
    pub(crate) fn turned(&self) {
        *lock(&self.inner.turned_at) = Instant::now();
    }

    /// Records a failure of `partition`; it counts as stalled from its first
    /// failure until it progresses.
    pub(crate) fn stalled(&self, partition: i16, error: &str) {
        let mut stalls = lock(&self.inner.stalls);
        let entry = stalls
            .entry(partition)
            .or_insert_with(|| (Instant::now(), String::new()));
        error.clone_into(&mut entry.1);
    }

    /// `partition` published (or had nothing to publish): not stalled.
    pub(crate) fn progressed(&self, partition: i16) {
        lock(&self.inner.stalls).remove(&partition);
    }

    /// Forgets the stalls of partitions no longer held.
    pub(crate) fn keep_stalls_of(&self, held: impl IntoIterator<Item = i16>) {
        let held: std::collections::BTreeSet<i16> = held.into_iter().collect();
        lock(&self.inner.stalls).retain(|p, _| held.contains(p));
    }

    pub(super) fn record(
        which: &Mutex<Check>,
        name: &str,
        gauge_name: &'static str,
        result: Result<(), String>,
    ) {
        let check = Check {
            up: result.is_ok(),
            error: result.err(),
            checked_at: Some(Utc::now()),
        };
        gauge!(gauge_name).set(if check.up { 1.0 } else { 0.0 });
        let mut current = lock(which);
        match (&current.error, &check.error) {
            (None, Some(error)) => warn!(%error, "{name} check failed: not ready"),
            (Some(_), None) if current.checked_at.is_some() => info!("{name} answers again"),
            _ => {}
        }
        *current = check;
    }
}

mod sampler;

pub(crate) use sampler::Sampler;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics as m;

    fn kafka_up(health: &Health, up: bool) {
        Health::record(
            &health.inner.kafka,
            "Kafka",
            m::KAFKA_UP,
            if up { Ok(()) } else { Err("down".into()) },
        );
    }

    #[test]
    fn a_partition_stalled_past_the_limit_while_kafka_answers_is_not_live() {
        let health = Health::default();
        kafka_up(&health, true);
        health.stalled(3, "begin: Local: Erroneous state");
        health.stalled(
            3,
            "init: Broker: transaction timeout larger than the maximum",
        );
        let now = Instant::now();
        let fresh = health.liveness_at(now);
        assert!(fresh.live, "{fresh:?}");
        assert_eq!(fresh.stalled.len(), 1);
        assert_eq!(fresh.stalled[0].partition, 3);
        assert!(
            fresh.stalled[0].error.starts_with("init:"),
            "latest error kept"
        );

        // The loop keeps turning; only the partition is stuck.
        *lock(&health.inner.turned_at) = now + LIVENESS_LIMIT;
        let later = health.liveness_at(now + LIVENESS_LIMIT);
        assert!(!later.live, "stalled for the limit: {later:?}");

        // The same stall during an outage: unready, not dead.
        kafka_up(&health, false);
        assert!(health.liveness_at(now + LIVENESS_LIMIT).live);
        kafka_up(&health, true);

        // Progress ends the stall; a new failure starts a new one.
        health.progressed(3);
        health.stalled(3, "again");
        assert!(health.liveness_at(now + LIVENESS_LIMIT).live);
    }

    #[test]
    fn stalls_of_partitions_no_longer_held_are_forgotten() {
        let health = Health::default();
        kafka_up(&health, true);
        health.stalled(1, "a");
        health.stalled(2, "b");
        health.keep_stalls_of([2]);
        let liveness = health.liveness();
        assert_eq!(
            liveness
                .stalled
                .iter()
                .map(|s| s.partition)
                .collect::<Vec<_>>(),
            [2]
        );
        health.keep_stalls_of([]);
        assert!(health.liveness().stalled.is_empty());
    }

    #[test]
    fn a_loop_that_stopped_turning_is_not_live() {
        let health = Health::default();
        let now = Instant::now();
        assert!(health.liveness_at(now).live);
        assert!(
            !health
                .liveness_at(now + LIVENESS_LIMIT + Duration::from_secs(1))
                .live
        );
    }
}
