//! What the relays are doing: members, leases and the backlog per partition,
//! as shown by `consign-relay status`.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::{
    lease::{Lease, Member},
    store::RelayStore as _,
};

/// The outbox backlog of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct Backlog {
    /// Outbox partition.
    pub partition: i16,
    /// Rows waiting to be published.
    pub pending: i64,
    /// `created_at` of the oldest waiting row.
    pub oldest: Option<DateTime<Utc>>,
    /// Rows whose last publish attempt failed (they carry `last_error`).
    pub failed: i64,
}

/// An outbox row whose last publish attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct FailedRow {
    /// Outbox sequence number.
    pub seq: i64,
    /// Message id.
    pub id: uuid::Uuid,
    /// Target topic.
    pub topic: String,
    /// Message key.
    pub key: Option<String>,
    /// Failed attempts so far.
    pub attempts: i32,
    /// The last error.
    pub last_error: Option<String>,
    /// When the relay tries again.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// Failed rows shown by [`status`] (the oldest first).
pub const FAILED_ROWS_SHOWN: i64 = 20;

/// A snapshot of the relays of one outbox.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Status {
    /// When the snapshot was taken (database clock).
    pub now: DateTime<Utc>,
    /// Live relays.
    pub relays: Vec<Member>,
    /// Every partition's lease.
    pub leases: Vec<Lease>,
    /// Partitions with waiting rows.
    pub backlog: Vec<Backlog>,
    /// Up to [`FAILED_ROWS_SHOWN`] rows whose publishing failed, oldest first.
    pub failed: Vec<FailedRow>,
}

/// Reads the relays, the leases and the backlog.
///
/// # Errors
/// If a query fails (e.g. the migrations have not been applied).
pub async fn status(pool: impl Into<crate::DatabasePool>) -> sqlx::Result<Status> {
    let mut conn = pool.into().acquire().await?;
    let (now, backlog, failed) = conn.backlog(FAILED_ROWS_SHOWN).await?;
    Ok(Status {
        now,
        relays: conn.members().await?,
        leases: conn.leases().await?,
        backlog,
        failed,
    })
}

impl Status {
    /// How many live leases each relay holds, in relay order.
    #[must_use]
    pub fn partitions_per_relay(&self) -> Vec<(String, usize)> {
        self.relays
            .iter()
            .map(|m| {
                let held = self
                    .leases
                    .iter()
                    .filter(|l| l.live && l.owner.as_deref() == Some(m.instance.as_str()))
                    .count();
                (m.instance.clone(), held)
            })
            .collect()
    }

    /// A human-readable report.
    #[must_use]
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let per_relay = self.partitions_per_relay();
        let _ = writeln!(out, "relays: {} live", self.relays.len());
        let _ = writeln!(
            out,
            "  {:<40} {:>8} {:>10} {:>11}",
            "INSTANCE", "PID", "LEASES", "HEARTBEAT"
        );
        for (member, (_, held)) in self.relays.iter().zip(&per_relay) {
            let _ = writeln!(
                out,
                "  {:<40} {:>8} {:>10} {:>11}",
                member.instance,
                member.pid,
                held,
                ago(self.now, member.heartbeat_at)
            );
        }
        let unowned = self.leases.iter().filter(|l| !l.live).count();
        let _ = writeln!(
            out,
            "\npartitions: {} leased, {unowned} free or expired",
            self.leases.len() - unowned
        );
        let _ = writeln!(
            out,
            "  {:>4} {:<40} {:>6} {:>10} {:>8} {:>10} {:>7}",
            "PART", "OWNER", "EPOCH", "EXPIRES", "PENDING", "OLDEST", "FAILED"
        );
        for lease in &self.leases {
            let backlog = self.backlog.iter().find(|b| b.partition == lease.partition);
            let owner = match (&lease.owner, lease.live) {
                (Some(owner), true) => owner.clone(),
                (Some(owner), false) => format!("({owner}, expired)"),
                (None, _) => "-".into(),
            };
            let expires = match lease.expires_at {
                Some(at) if lease.live => {
                    format!("in {}s", (at - self.now).num_milliseconds().max(0) / 1000)
                }
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "  {:>4} {:<40} {:>6} {:>10} {:>8} {:>10} {:>7}",
                lease.partition,
                owner,
                lease.epoch,
                expires,
                backlog.map_or(0, |b| b.pending),
                backlog
                    .and_then(|b| b.oldest)
                    .map_or_else(|| "-".into(), |at| ago(self.now, at)),
                backlog.map_or(0, |b| b.failed),
            );
        }
        let failed: i64 = self.backlog.iter().map(|b| b.failed).sum();
        let _ = writeln!(out, "\nrows with publish errors: {failed}");
        for row in &self.failed {
            let _ = writeln!(
                out,
                "  seq {} topic {} key {} attempts {}: {}",
                row.seq,
                row.topic,
                row.key.as_deref().unwrap_or("-"),
                row.attempts,
                row.last_error.as_deref().unwrap_or("")
            );
        }
        if failed > i64::try_from(self.failed.len()).unwrap_or(i64::MAX) {
            let _ = writeln!(out, "  ... (the oldest {} shown)", self.failed.len());
        }
        out
    }
}

/// `12s ago`, `5m ago`, `3h ago`: the time from `then` to `now`.
#[must_use]
pub fn ago(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    let seconds = (now - then).num_seconds().max(0);
    match seconds {
        0..120 => format!("{seconds}s ago"),
        120..7200 => format!("{}m ago", seconds / 60),
        _ => format!("{}h ago", seconds / 3600),
    }
}
