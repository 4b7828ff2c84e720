//! [`Migrate`]: the pools [`migrate`](crate::migrate) takes, one migrator
//! per backend.

use std::future::Future;

use sqlx::migrate::MigrateError;

/// A pool consign can create its tables in: `sqlx::PgPool`, and with the
/// features `mysql` and `sqlite`, `sqlx::MySqlPool` and `sqlx::SqlitePool`.
/// Sealed.
pub trait Migrate: sealed::Sealed + Sync {
    /// Applies the backend's migrations that are not applied yet.
    #[doc(hidden)]
    fn run_migrations(&self) -> impl Future<Output = Result<(), MigrateError>> + Send;
}

impl Migrate for sqlx::PgPool {
    async fn run_migrations(&self) -> Result<(), MigrateError> {
        crate::MIGRATOR.run(self).await
    }
}

#[cfg(feature = "mysql")]
impl Migrate for sqlx::MySqlPool {
    async fn run_migrations(&self) -> Result<(), MigrateError> {
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(self)
            .await
            .map_err(MigrateError::Execute)?;
        if let Some(refused) = unsupported_mysql(&version) {
            return Err(MigrateError::Execute(sqlx::Error::Configuration(
                refused.into(),
            )));
        }
        crate::MYSQL_MIGRATOR.run(self).await
    }
}

#[cfg(feature = "sqlite")]
impl Migrate for sqlx::SqlitePool {
    async fn run_migrations(&self) -> Result<(), MigrateError> {
        crate::SQLITE_MIGRATOR.run(self).await
    }
}

/// Why consign refuses this MySQL/MariaDB server (`SELECT VERSION()`), if it
/// does: it needs MySQL 8.0 or MariaDB 10.6 (expression defaults, `WITH
/// RECURSIVE`, `SKIP LOCKED`).
#[cfg(any(feature = "mysql", test))]
fn unsupported_mysql(version: &str) -> Option<String> {
    let numbers: Vec<u32> = version
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    let (major, minor) = (numbers.first().copied()?, numbers.get(1).copied()?);
    let mariadb = version.to_ascii_lowercase().contains("mariadb");
    let (name, oldest) = if mariadb {
        ("MariaDB", (10, 6))
    } else {
        ("MySQL", (8, 0))
    };
    ((major, minor) < oldest).then(|| {
        format!(
            "{name} {major}.{minor} ({version}) is older than {name} {}.{}, the oldest consign supports",
            oldest.0, oldest.1
        )
    })
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::PgPool {}
    #[cfg(feature = "mysql")]
    impl Sealed for sqlx::MySqlPool {}
    #[cfg(feature = "sqlite")]
    impl Sealed for sqlx::SqlitePool {}
}

#[cfg(test)]
mod tests {
    use super::unsupported_mysql;

    #[test]
    fn old_mysql_and_mariadb_are_refused_by_name() {
        assert_eq!(unsupported_mysql("8.0.36"), None);
        assert_eq!(unsupported_mysql("10.11.19-MariaDB-0+deb12u1"), None);
        assert_eq!(unsupported_mysql("10.6.0-MariaDB"), None);
        let old = unsupported_mysql("10.5.23-MariaDB").unwrap();
        assert!(
            old.contains("MariaDB 10.5") && old.contains("10.6"),
            "{old}"
        );
        let old = unsupported_mysql("5.7.44-log").unwrap();
        assert!(old.contains("MySQL 5.7") && old.contains("8.0"), "{old}");
    }
}
