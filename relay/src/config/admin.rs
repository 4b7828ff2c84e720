//! The `[admin]` section.

use super::*;

/// The `[admin]` section: the HTTP endpoint serving `/metrics` (Prometheus
/// text) and `/health` (`/health/live`, `/health/ready`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub struct AdminSettings {
    /// Serve the endpoint. Default true, except in the testing profile.
    pub enabled: bool,
    /// Address to listen on. Default `0.0.0.0:9464` (production),
    /// `127.0.0.1:9464` (development); port 0 picks a free port, which the
    /// relay logs.
    pub listen: SocketAddr,
    /// How often the backlog gauges (pending rows, oldest age, rows with
    /// errors) and readiness are refreshed from PostgreSQL and Kafka.
    /// Default 5 s; 100 ms to 10 min.
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self::for_profile(Profile::default())
    }
}

impl AdminSettings {
    /// The defaults of `profile` (see [`Profile`]).
    #[must_use]
    pub fn for_profile(profile: Profile) -> Self {
        let (enabled, listen, sample_ms) = match profile {
            Profile::Development => (true, ([127, 0, 0, 1], 9464), 1000),
            Profile::Testing => (false, ([127, 0, 0, 1], 0), 500),
            Profile::Production => (true, ([0, 0, 0, 0], 9464), 5000),
        };
        Self {
            enabled,
            listen: SocketAddr::from(listen),
            sample_interval: Duration::from_millis(sample_ms),
        }
    }

    /// Checks the sampling interval.
    ///
    /// # Errors
    /// [`Error::Config`] naming `admin.sample-interval`.
    pub fn validate(&self) -> Result<()> {
        in_range(
            "admin.sample-interval",
            self.sample_interval,
            Duration::from_millis(100),
            Duration::from_secs(600),
        )
    }
}
