//! Partition leases: how several relays share one outbox.
//!
//! The outbox has [`PARTITIONS`] partitions (a key's rows are all in one). A
//! relay publishes a partition only while it holds its lease in
//! `consign_relay_leases`. Each relay runs a coordinator task that, every
//! third of the lease TTL:
//!
//! 1. refreshes its heartbeat in `consign_relays` and counts the live relays;
//! 2. renews its leases (a lease missing from the answer was taken over: the
//!    relay stops publishing that partition);
//! 3. computes its fair share (relays sorted by name; the first
//!    `32 mod n` get one more than `32 / n`), then acquires free or expired
//!    partitions up to that share, or marks its surplus for release.
//!
//! A surplus partition is released by the publishing loop between batches,
//! so no batch of the old owner is in flight when a new owner picks it up.
//! A crashed relay's partitions are taken over when its leases expire.
//!
//! Every acquisition increments the partition's `epoch`. Deletes and error
//! updates join the lease row with the epoch the relay read its rows under
//! (and lock it `FOR SHARE`), so a relay that lost a lease while paused, cut
//! off or slow cannot delete or mark rows of a partition it no longer owns.
//! Its late messages are duplicates on the topic, which the inbox drops; per
//! key, each relay's stream is in `seq` order, so after dropping duplicates
//! a key's events stay in order across the handover.
//!
//! All times are the database's clock (`now()`), so relays on hosts with
//! skewed clocks agree on expiry. Locally a relay stops starting batches on
//! its leases one TTL after it *began* its last successful renewal, which is
//! never later than the expiry the database recorded.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use consign_outbox::PARTITIONS;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    deadline::Db,
    store::{DatabasePool, RelayStore as _},
};

/// The owned partitions and the epoch each was acquired with.
pub(crate) type Owned = BTreeMap<i16, i64>;

/// One outbox partition's lease, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct Lease {
    /// Outbox partition, 0 to 31.
    pub partition: i16,
    /// Relay instance holding it, if any.
    pub owner: Option<String>,
    /// Fencing token: incremented on every acquisition.
    pub epoch: i64,
    /// When the lease lapses unless renewed (database clock).
    pub expires_at: Option<DateTime<Utc>>,
    /// When the current owner acquired it.
    pub acquired_at: Option<DateTime<Utc>>,
    /// Whether the lease is held and not expired, by the database's clock at
    /// the time of reading.
    pub live: bool,
}

/// A running relay, as registered in `consign_relays`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct Member {
    /// Instance name (`host-pid-random`).
    pub instance: String,
    /// Host name the relay runs on.
    pub host: String,
    /// Process id on that host.
    pub pid: i32,
    /// consign version of the relay.
    pub version: String,
    /// When it registered.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub heartbeat_at: DateTime<Utc>,
}

/// Reads every partition's lease, in partition order.
///
/// # Errors
/// If the query fails (e.g. the migrations have not been applied).
pub async fn leases(pool: impl Into<DatabasePool>) -> sqlx::Result<Vec<Lease>> {
    pool.into().acquire().await?.leases().await
}

/// Reads the relays whose heartbeat has not expired, by name.
///
/// # Errors
/// If the query fails (e.g. the migrations have not been applied).
pub async fn members(pool: impl Into<DatabasePool>) -> sqlx::Result<Vec<Member>> {
    pool.into().acquire().await?.members().await
}

/// The name this relay registers under: `host-pid-xxxx`.
pub(crate) fn instance_name() -> (String, String) {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into());
    // The last hex digits of a UUID v7 are random.
    let random = uuid::Uuid::now_v7().simple().to_string();
    let instance = format!("{host}-{}-{}", std::process::id(), &random[26..]);
    (instance, host)
}

/// The fair share of partitions of the member at `index` among `members`:
/// the first `32 mod n` members take one more than `32 / n`.
pub(crate) fn fair_share(index: usize, members: usize) -> usize {
    let total = usize::from(PARTITIONS);
    let members = members.max(1);
    total / members + usize::from(index < total % members)
}

/// What the coordinator and the publishing loop share.
#[derive(Debug, Default)]
pub(crate) struct Ownership {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct State {
    owned: Owned,
    valid_until: Option<Instant>,
    release: BTreeSet<i16>,
    /// Leases this relay gave up, kept until a renewal no longer returns
    /// them: a renewal that ran just before the release must not bring
    /// them back.
    released: BTreeSet<(i16, i64)>,
}

impl Ownership {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The partitions to publish now: none once the leases may have lapsed
    /// (renewals failing).
    pub(crate) fn current(&self) -> Owned {
        let state = self.lock();
        match state.valid_until {
            Some(until) if Instant::now() < until => state.owned.clone(),
            _ => Owned::new(),
        }
    }

    /// Partitions the coordinator wants released, with their epochs.
    pub(crate) fn to_release(&self) -> Vec<(i16, i64)> {
        let state = self.lock();
        state
            .release
            .iter()
            .filter_map(|p| state.owned.get(p).map(|e| (*p, *e)))
            .collect()
    }

    /// Forgets `partitions` (released or lost).
    pub(crate) fn forget(&self, partitions: &[i16]) {
        let mut state = self.lock();
        for p in partitions {
            state.owned.remove(p);
            state.release.remove(p);
        }
    }

    /// Forgets leases this relay has just released in the database.
    pub(crate) fn released(&self, leases: &[(i16, i64)]) {
        let mut state = self.lock();
        for &(p, epoch) in leases {
            state.owned.remove(&p);
            state.release.remove(&p);
            state.released.insert((p, epoch));
        }
    }

    /// Waits until the coordinator changes the ownership.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// Keeps this relay's membership and leases up to date.
pub(crate) struct Coordinator {
    db: Db,
    instance: String,
    host: String,
    ttl: Duration,
    ownership: Arc<Ownership>,
}

impl Coordinator {
    pub(crate) fn new(
        db: Db,
        instance: String,
        host: String,
        ttl: Duration,
        ownership: Arc<Ownership>,
    ) -> Self {
        Self {
            db,
            instance,
            host,
            ttl,
            ownership,
        }
    }

    /// Runs rounds every third of the TTL until `stop` is cancelled.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let period = self.ttl / 3;
        // A round stuck on a database that does not answer must not hold
        // up shutdown: dropping it rolls its transaction back.
        let turn = || async {
            if let Err(error) = self.round().await {
                warn!(%error, "could not renew partition leases; retrying");
            }
            tokio::time::sleep(period).await;
        };
        while stop.run_until_cancelled(turn()).await.is_some() {}
    }

    /// One heartbeat + renew + rebalance round.
    async fn round(&self) -> crate::Result<()> {
        let started = Instant::now();
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let crate::store::Renewal { members, renewed } = self
            .db
            .run(async |conn| conn.renew(&self.instance, &self.host, ttl_ms).await)
            .await?;

        let index = members
            .iter()
            .position(|m| *m == self.instance)
            .unwrap_or(members.len());
        let target = fair_share(index, members.len().max(index + 1));
        let held = self.apply_renewal(&renewed, started);
        if held < target {
            let acquired = self.acquire(target - held, ttl_ms).await?;
            if !acquired.is_empty() {
                info!(
                    partitions = ?acquired,
                    relays = members.len(),
                    target,
                    "acquired partition leases"
                );
                self.ownership.changed.notify_one();
            }
        } else if held > target {
            let mut state = self.ownership.lock();
            let surplus = held - target;
            let newly: Vec<i16> = state
                .owned
                .keys()
                .rev()
                .filter(|p| !state.release.contains(p))
                .take(surplus)
                .copied()
                .collect();
            if !newly.is_empty() {
                info!(partitions = ?newly, relays = members.len(), target, "releasing surplus partitions");
                state.release.extend(newly);
                drop(state);
                self.ownership.changed.notify_one();
            }
        }
        Ok(())
    }

    /// Takes the database's answer as the truth about what this relay
    /// holds, except for leases released since the renewal ran; logs
    /// partitions that were taken over. Returns how many are held, not
    /// counting those being released.
    fn apply_renewal(&self, renewed: &[(i16, i64)], started: Instant) -> usize {
        let mut state = self.ownership.lock();
        let stale = std::mem::take(&mut state.released);
        // A released lease the renewal still returned: it ran before the
        // release. Keep remembering it until a renewal no longer returns it.
        state.released = renewed
            .iter()
            .filter(|lease| stale.contains(lease))
            .copied()
            .collect();
        let renewed: Owned = renewed
            .iter()
            .filter(|lease| !stale.contains(lease))
            .copied()
            .collect();
        let lost: Vec<i16> = state
            .owned
            .iter()
            .filter(|(p, e)| renewed.get(p) != Some(e))
            .map(|(p, _)| *p)
            .collect();
        if !lost.is_empty() {
            warn!(
                partitions = ?lost,
                "lost partition leases to another relay (this relay was paused or cut off past the lease TTL); stopped publishing them"
            );
        }
        state.owned = renewed;
        let State { owned, release, .. } = &mut *state;
        release.retain(|p| owned.contains_key(p));
        state.valid_until = Some(started + self.ttl);
        debug!(held = state.owned.len(), "leases renewed");
        state.owned.len() - state.release.len()
    }

    /// Acquires up to `wanted` free or expired partitions.
    async fn acquire(&self, wanted: usize, ttl_ms: i64) -> crate::Result<Vec<i16>> {
        let wanted = i64::try_from(wanted).unwrap_or(i64::MAX);
        let acquired = self
            .db
            .run(async |conn| conn.acquire(&self.instance, ttl_ms, wanted).await)
            .await?;
        // Valid at least as long as the renewal of this round, which began
        // earlier (`apply_renewal` set `valid_until` from it).
        self.ownership.lock().owned.extend(acquired.iter().copied());
        Ok(acquired.into_iter().map(|(p, _)| p).collect())
    }
}

/// Releases every lease of `instance` and removes its membership.
pub(crate) async fn leave(pool: &DatabasePool, instance: &str) -> sqlx::Result<()> {
    pool.acquire().await?.leave(instance).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_shares_sum_to_all_partitions_within_one() {
        for n in 1..=40 {
            let shares: Vec<usize> = (0..n).map(|i| fair_share(i, n)).collect();
            assert_eq!(shares.iter().sum::<usize>(), usize::from(PARTITIONS), "{n}");
            let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
            assert!(max - min <= 1, "{n}: {shares:?}");
        }
    }

    #[tokio::test]
    async fn a_renewal_that_ran_before_a_release_does_not_bring_the_lease_back() {
        let pool = sqlx::PgPool::connect_lazy("postgres://unused@127.0.0.1:1/none")
            .unwrap()
            .into();
        let ownership = Arc::new(Ownership::default());
        let db = Db {
            pool,
            deadline: Duration::from_secs(1),
        };
        let coordinator = Coordinator::new(
            db,
            "me".into(),
            "host".into(),
            Duration::from_secs(10),
            Arc::clone(&ownership),
        );
        let now = Instant::now();
        assert_eq!(coordinator.apply_renewal(&[(5, 3), (6, 1)], now), 2);
        // The publishing loop releases 5 while a renewal that still saw
        // it as ours is on its way back.
        ownership.released(&[(5, 3)]);
        assert_eq!(coordinator.apply_renewal(&[(5, 3), (6, 1)], now), 1);
        assert_eq!(ownership.current(), Owned::from([(6, 1)]));
        // Re-acquired later under a new epoch: that one counts.
        assert_eq!(coordinator.apply_renewal(&[(5, 4), (6, 1)], now), 2);
        assert!(ownership.lock().released.is_empty());
    }
}
