//! The `[retention]` section.

use super::*;

/// The `[retention]` section, applied by `consign-relay cleanup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub struct RetentionSettings {
    /// Inbox dedup records older than this are deleted. Safe because
    /// consumers resume from stored offsets; keep it longer than any
    /// duplicate could arrive late. Default 7 days; 1 minute to 10 years.
    #[serde(with = "humantime_serde")]
    pub inbox: Duration,
    /// Dead letters older than this are deleted. Default: kept until purged
    /// (nothing is dropped silently).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<Duration>,
    /// Archive partitions (see `relay.archive`) whose whole day is older
    /// than this are dropped. Default 30 days.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub archive: Option<Duration>,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            inbox: Duration::from_secs(7 * 86_400),
            dead_letters: None,
            archive: Some(Duration::from_secs(30 * 86_400)),
        }
    }
}

impl RetentionSettings {
    /// Checks the ages.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let (min, max) = (
            Duration::from_secs(60),
            Duration::from_secs(10 * 365 * 86_400),
        );
        in_range("retention.inbox", self.inbox, min, max)?;
        if let Some(age) = self.dead_letters {
            in_range("retention.dead-letters", age, min, max)?;
        }
        if let Some(age) = self.archive {
            in_range("retention.archive", age, Duration::from_secs(86_400), max)?;
        }
        Ok(())
    }
}
