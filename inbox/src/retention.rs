//! Retention of the inbox's tables: dedup records (`consign_inbox`) and
//! dead letters (`consign_dead_letters`), part of `consign-relay cleanup`.

use std::time::Duration;

use serde::Serialize;
use sqlx::Pool;

use crate::store::{InboxBackend, InboxStore as _};

/// What [`cleanup`] deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// Age of dedup records to delete.
    pub inbox: Duration,
    /// Age of dead letters to delete; `None` keeps them.
    pub dead_letters: Option<Duration>,
}

impl Retention {
    /// Dedup records older than `inbox`; dead letters kept.
    #[must_use]
    pub fn inbox(inbox: Duration) -> Self {
        Self {
            inbox,
            dead_letters: None,
        }
    }

    /// Also deletes dead letters older than `age` (`None` keeps them).
    #[must_use]
    pub fn dead_letters(mut self, age: Option<Duration>) -> Self {
        self.dead_letters = age;
        self
    }
}

/// What [`cleanup`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Cleaned {
    /// Dedup records older than the inbox retention.
    pub inbox_records: u64,
    /// Dead letters older than the dead-letter retention.
    pub dead_letters: u64,
}

/// Deletes dedup records handled more than `retention.inbox` ago and, if
/// set, dead letters older than `retention.dead_letters`. Ages are
/// measured on the database clock.
///
/// Dropping old dedup records is safe because consumers resume from the
/// offsets stored with them: a message is only redelivered from after the
/// stored offset, so only a producer-side duplicate arriving later than the
/// retention could be handled twice. Keep the retention well above the
/// longest outage a duplicate could span (default 7 days).
///
/// # Errors
/// On a database error.
pub async fn cleanup<DB: InboxBackend>(
    pool: &Pool<DB>,
    retention: Retention,
) -> sqlx::Result<Cleaned> {
    let (inbox_records, dead_letters) = pool
        .acquire()
        .await?
        .delete_older_than(
            retention.inbox.as_secs_f64(),
            retention.dead_letters.map(|age| age.as_secs_f64()),
        )
        .await?;
    Ok(Cleaned {
        inbox_records,
        dead_letters,
    })
}
