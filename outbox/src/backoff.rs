//! The delays consign waits between attempts, shared by the relay and the
//! inbox so every retry loop backs off the same way.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};

/// Endless delays from `min` doubling to `max`, with jitter (so relays and
/// consumers that failed together do not retry in lockstep).
///
/// ```
/// use std::time::Duration;
///
/// let mut delays = consign_outbox::backoff::delays(Duration::from_millis(100), Duration::from_secs(5));
/// assert!(delays.next().unwrap() >= Duration::from_millis(100));
/// assert!(delays.nth(50).unwrap() <= Duration::from_secs(10)); // max plus jitter
/// ```
pub fn delays(min: Duration, max: Duration) -> impl Iterator<Item = Duration> + Send + use<> {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The delays while a dependency (database, broker) is unreachable: 100 ms
/// doubling to 5 s, with jitter, for as long as the outage lasts.
pub fn outage() -> impl Iterator<Item = Duration> + Send + use<> {
    delays(Duration::from_millis(100), Duration::from_secs(5))
}
