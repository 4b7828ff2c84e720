//! The `[database]` section and URL redaction.

use super::*;

/// The `[database]` section. TLS and other connection parameters go in the
/// URL as libpq spells them (`?sslmode=verify-full&sslrootcert=/ca.pem`,
/// `sslcert`, `sslkey`); `Debug` hides the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub struct DatabaseSettings {
    /// Database URL: `postgres://…`, `mysql://…` (also MariaDB, feature
    /// `mysql`) or `sqlite:…` (feature `sqlite`). Required; `DATABASE_URL`
    /// is used if set.
    pub url: String,
    /// Connections in the relay's pool. Default 4; 1 to 100.
    pub max_connections: u32,
    /// How long to wait for a connection before the attempt counts as
    /// failed (and is retried with backoff). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// PostgreSQL's `statement_timeout` for the relay's sessions (not for
    /// `migrate`, `cleanup` and the other commands): a statement running
    /// longer is cancelled, counts as a failed attempt and is retried with
    /// backoff, so a lock held by a migration or a forgotten transaction
    /// cannot stall the relay unseen. It also sets the sessions'
    /// `idle_in_transaction_session_timeout` (twice as long) and the relay's
    /// client-side deadline per database round (5 s longer), which catches a
    /// database gone silent at the network level. `0s` leaves the server's
    /// or role's setting (and the deadline at 35 s). Default 30s (10s in the
    /// testing profile); otherwise 100ms to 1h.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// `application_name` of the relay's sessions, as seen in
    /// `pg_stat_activity`. Default `consign-relay`.
    pub application_name: String,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self::for_profile(Profile::default())
    }
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("application_name", &self.application_name)
            .finish()
    }
}

impl DatabaseSettings {
    /// The defaults of `profile` (see [`Profile`]); the URL is empty.
    #[must_use]
    pub fn for_profile(profile: Profile) -> Self {
        let (max_connections, acquire_timeout, statement_timeout) = match profile {
            Profile::Development => (2, Duration::from_secs(3), Duration::from_secs(30)),
            Profile::Testing => (2, Duration::from_secs(2), Duration::from_secs(10)),
            Profile::Production => (4, Duration::from_secs(10), Duration::from_secs(30)),
        };
        Self {
            url: String::new(),
            max_connections,
            acquire_timeout,
            statement_timeout,
            application_name: "consign-relay".into(),
        }
    }

    /// Checks the URL and the pool size.
    ///
    /// # Errors
    /// [`Error::Config`] naming the invalid field.
    pub fn validate(&self) -> Result<()> {
        self.connect_options().map(|_| ())?;
        if !(1..=100).contains(&self.max_connections) {
            return Err(Error::config(
                "database.max-connections",
                format!("must be between 1 and 100, got {}", self.max_connections),
            ));
        }
        in_range(
            "database.acquire-timeout",
            self.acquire_timeout,
            Duration::from_millis(10),
            Duration::from_secs(600),
        )?;
        let (statement, min, max) = (
            self.statement_timeout,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        );
        if !statement.is_zero() && (statement < min || statement > max) {
            return Err(Error::config(
                "database.statement-timeout",
                format!(
                    "must be 0s (leave the server's setting) or {}",
                    between(statement, min, max)
                ),
            ));
        }
        Ok(())
    }

    fn connect_options(&self) -> Result<Backend> {
        let url = self.url.trim();
        if url.is_empty() {
            return Err(Error::config(
                "database.url",
                "required: set it in the file, in DATABASE_URL or in CONSIGN_DATABASE__URL",
            ));
        }
        let invalid = |backend: &str, e: sqlx::Error| {
            Error::config("database.url", format!("not a valid {backend} URL: {e}"))
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url).map_err(|e| invalid("PostgreSQL", e))?;
            return Ok(Backend::Postgres(
                options.application_name(&self.application_name),
            ));
        }
        if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            #[cfg(feature = "mysql")]
            {
                let url = url.replacen("mariadb://", "mysql://", 1);
                let options = sqlx::mysql::MySqlConnectOptions::from_str(&url)
                    .map_err(|e| invalid("MySQL", e))?;
                return Ok(Backend::MySql(options));
            }
            #[cfg(not(feature = "mysql"))]
            return Err(Error::config(
                "database.url",
                "is a MySQL/MariaDB URL, but this build has no MySQL support: \
                 build consign-relay (or consign-cli) with the cargo feature `mysql`",
            ));
        }
        if url.starts_with("sqlite:") {
            #[cfg(feature = "sqlite")]
            {
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                    .map_err(|e| invalid("SQLite", e))?;
                return Ok(Backend::Sqlite(options));
            }
            #[cfg(not(feature = "sqlite"))]
            return Err(Error::config(
                "database.url",
                "is a SQLite URL, but this build has no SQLite support: \
                 build consign-relay (or consign-cli) with the cargo feature `sqlite`",
            ));
        }
        Err(Error::config(
            "database.url",
            "must start with postgres:// (or postgresql://), mysql:// (or mariadb://) or sqlite:",
        ))
    }

    /// The relay's pool: connects on first use, so the relay can start
    /// while the database is down and catch up when it returns; its
    /// sessions have [`statement_timeout`](Self::statement_timeout)
    /// (PostgreSQL; MySQL/MariaDB get it as `innodb_lock_wait_timeout`,
    /// SQLite as its busy timeout).
    ///
    /// # Errors
    /// [`Error::Config`] if the URL is invalid or names a backend this build
    /// lacks.
    pub fn connect_lazy(&self) -> Result<DatabasePool> {
        let timeout = self.statement_timeout;
        Ok(match self.connect_options()? {
            Backend::Postgres(mut options) => {
                if !timeout.is_zero() {
                    let millis = timeout.as_millis();
                    // A session whose client went silent mid-transaction
                    // (see `deadline`) would keep its locks until TCP gives
                    // up; the server ends it after this long idle in its
                    // transaction.
                    options = options.options([
                        ("statement_timeout", format!("{millis}ms")),
                        (
                            "idle_in_transaction_session_timeout",
                            format!("{}ms", millis * 2),
                        ),
                    ]);
                }
                DatabasePool::Postgres(self.pool_options().connect_lazy_with(options))
            }
            #[cfg(feature = "mysql")]
            Backend::MySql(options) => {
                let seconds = timeout.as_secs().max(1);
                let pool = self.pool_options::<sqlx::MySql>();
                let pool = if timeout.is_zero() {
                    pool
                } else {
                    pool.after_connect(move |conn, _| {
                        Box::pin(async move {
                            use sqlx::Executor as _;
                            // Both MySQL 8 and MariaDB know this one (their
                            // statement time limits differ in name and scope).
                            conn.execute(sqlx::AssertSqlSafe(format!(
                                "SET SESSION innodb_lock_wait_timeout = {seconds}"
                            )))
                            .await
                            .map(|_| ())
                        })
                    })
                };
                DatabasePool::MySql(pool.connect_lazy_with(options))
            }
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(options) => {
                let options = sqlite_options(options, timeout);
                DatabasePool::Sqlite(self.pool_options().connect_lazy_with(options))
            }
        })
    }

    /// How long one database round of the relay may take before it gives up
    /// on the connection (see [`RelayBuilder::database_deadline`]):
    /// `statement-timeout` + 5 s, or the default without a statement timeout.
    ///
    /// [`RelayBuilder::database_deadline`]: crate::RelayBuilder::database_deadline
    #[must_use]
    pub fn deadline(&self) -> Duration {
        if self.statement_timeout.is_zero() {
            crate::DEFAULT_DATABASE_DEADLINE
        } else {
            (self.statement_timeout + Duration::from_secs(5)).min(Duration::from_secs(3600))
        }
    }

    /// A pool for maintenance commands (`migrate`, `cleanup`, dead letters,
    /// `status`): like [`connect_lazy`](Self::connect_lazy), without the
    /// statement timeout, since a migration or a cleanup may rightly run
    /// long.
    ///
    /// # Errors
    /// [`Error::Config`] if the URL is invalid or names a backend this build
    /// lacks.
    pub fn connect_lazy_unbounded(&self) -> Result<DatabasePool> {
        Ok(match self.connect_options()? {
            Backend::Postgres(options) => {
                DatabasePool::Postgres(self.pool_options().connect_lazy_with(options))
            }
            #[cfg(feature = "mysql")]
            Backend::MySql(options) => {
                DatabasePool::MySql(self.pool_options().connect_lazy_with(options))
            }
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(options) => {
                let options = sqlite_options(options, Duration::from_secs(30));
                DatabasePool::Sqlite(self.pool_options().connect_lazy_with(options))
            }
        })
    }

    fn pool_options<DB: sqlx::Database>(&self) -> PoolOptions<DB> {
        PoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
    }
}

/// The connect options of the backend a URL names.
enum Backend {
    Postgres(PgConnectOptions),
    #[cfg(feature = "mysql")]
    MySql(sqlx::mysql::MySqlConnectOptions),
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::sqlite::SqliteConnectOptions),
}

/// SQLite as the relay wants it: WAL (readers beside the one writer), a
/// busy timeout of `timeout` (at least 5 s) for the writer's lock, and the
/// file created if missing.
#[cfg(feature = "sqlite")]
fn sqlite_options(
    options: sqlx::sqlite::SqliteConnectOptions,
    timeout: Duration,
) -> sqlx::sqlite::SqliteConnectOptions {
    options
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(timeout.max(Duration::from_secs(5)))
}

/// `url` with its password and `password`/`sslpassword` parameters replaced
/// by [`REDACTED`]. Text that is not a URL is redacted whole if it has an
/// `@` (it might hold credentials).
#[must_use]
pub fn redact_url(url: &str) -> String {
    let parsed = url::Url::parse(url).ok().filter(|u| !u.cannot_be_a_base());
    let Some(mut parsed) = parsed else {
        return if url.contains('@') {
            REDACTED.into()
        } else {
            url.into()
        };
    };
    if parsed.password().is_some() {
        // Only fails for URLs that cannot have credentials.
        let _ = parsed.set_password(Some(REDACTED));
    }
    let secret = |name: &str| {
        name.eq_ignore_ascii_case("password") || name.eq_ignore_ascii_case("sslpassword")
    };
    if parsed.query_pairs().any(|(name, _)| secret(&name)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(name, value)| {
                let value = if secret(&name) {
                    REDACTED.into()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(url: &str) -> String {
        let settings = DatabaseSettings {
            url: url.into(),
            ..DatabaseSettings::default()
        };
        settings.validate().unwrap_err().to_string()
    }

    #[test]
    fn an_unknown_scheme_names_the_ones_that_work() {
        let error = error_of("oracle://db/x");
        assert!(
            error.contains("database.url") && error.contains("mysql://"),
            "{error}"
        );
    }

    /// Run where the feature is off: `cargo test -p consign-relay --lib`
    /// (scripts/test.sh does), not in the workspace build, which turns it on.
    #[cfg(not(feature = "mysql"))]
    #[test]
    fn a_mysql_url_without_the_feature_names_the_feature() {
        let error = error_of("mysql://u@h/db");
        assert!(error.contains("the cargo feature `mysql`"), "{error}");
    }

    #[cfg(not(feature = "sqlite"))]
    #[test]
    fn a_sqlite_url_without_the_feature_names_the_feature() {
        let error = error_of("sqlite:///tmp/x.db");
        assert!(error.contains("the cargo feature `sqlite`"), "{error}");
    }

    #[cfg(all(feature = "mysql", feature = "sqlite"))]
    #[test]
    fn every_backend_url_is_accepted_with_its_feature() {
        for url in [
            "postgres://u@h/db",
            "mysql://u@h/db",
            "mariadb://u@h/db",
            "sqlite:///x.db",
        ] {
            let settings = DatabaseSettings {
                url: url.into(),
                ..DatabaseSettings::default()
            };
            settings.validate().unwrap();
        }
    }
}
