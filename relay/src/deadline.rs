//! A client-side deadline on the relay's database rounds.
//!
//! `statement_timeout` is enforced by the server, so it cannot reach a
//! database that went silent at the network level (a route that dropped
//! the connection's packets, a stalled VM): the answer never comes, and the
//! relay would wait until TCP gives up, many minutes later, or never behind
//! some proxies. Each round the relay makes on a connection therefore runs
//! under a deadline. A connection that misses it is closed, not returned to
//! the pool (whose health check would wait on it again), and the round
//! fails with [`Error::DatabaseSilent`], which the relay retries like an
//! outage, on a new connection.

use std::time::Duration;

use crate::{
    Error, Result,
    store::{Conn, DatabasePool},
};

/// The default deadline of one round: PostgreSQL's default
/// `statement_timeout` of the relay binary (30 s) plus 5 s.
pub const DEFAULT_DATABASE_DEADLINE: Duration = Duration::from_secs(35);

/// The relay's pool, with the deadline of its rounds.
#[derive(Debug, Clone)]
pub(crate) struct Db {
    pub(crate) pool: DatabasePool,
    pub(crate) deadline: Duration,
}

impl Db {
    /// Runs `work` on a connection of the pool within the deadline (taking
    /// the connection counts).
    pub(crate) async fn run<T>(
        &self,
        work: impl AsyncFnOnce(&mut Conn) -> sqlx::Result<T>,
    ) -> Result<T> {
        let started = tokio::time::Instant::now();
        let mut conn = tokio::time::timeout(self.deadline, self.pool.acquire())
            .await
            .map_err(|_| Error::DatabaseSilent(self.deadline))??;
        let left = self.deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, work(&mut conn)).await {
            Ok(result) => Ok(result?),
            Err(_) => {
                abandon(conn);
                Err(Error::DatabaseSilent(self.deadline))
            }
        }
    }
}

/// Closes `conn` (sqlx closes it in the background, bounded by its own
/// timeout) instead of returning it to the pool.
fn abandon(mut conn: Conn) {
    tracing::warn!("closing a database connection that did not answer in time");
    conn.close_on_drop();
}
