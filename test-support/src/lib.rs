//! Test harness shared by consign's tests, examples and benchmarks.
//!
//! - [`TestBroker`]: librdkafka's in-process mock cluster (real Kafka
//!   protocol on loopback ports, with fault injection), real Apache Kafka
//!   ([`KafkaCluster`]), or an external broker when `TEST_KAFKA_BROKERS`
//!   names one. [`broker_test!`] runs one test body on the mock cluster and
//!   on real Kafka.
//! - [`TopicReader`]: reads back what really reached a topic.
//! - [`RelayProcess`]: runs the `consign-relay` binary as a child process so
//!   tests can SIGKILL it.
//! - [`db`]: database helpers for `#[sqlx::test]` pools.
//! - [`effects`]: a countable handler effect and a producer for inbox tests.
//! - [`stream`]: a keyed event stream and the check that it arrived in order.
//! - [`net`]: a TCP proxy that cuts connections, HTTP GET, Prometheus text.
//! - [`tap`]: a Kafka protocol tap that shows what each transaction produced
//!   and whether it committed.

pub mod backends;
mod cluster;
pub mod db;
pub mod effects;
mod kafka;
pub mod net;
mod process;
pub mod procfs;
mod reader;
pub mod stream;
pub mod tap;
pub mod tls;

pub use cluster::{
    KAFKA_JVM_OPTS_ENV, KAFKA_LIBS_ENV, KafkaCluster, SecureListener, kafka_libs, kafka_version,
};
pub use kafka::{
    BrokerKind, EXTERNAL_BROKERS_ENV, MockKafka, TestBroker, Transactions, real_kafka_required,
    real_kafka_tier,
};
pub use process::{
    CONSUMER_BIN_ENV, ChildProcess, RELAY_BIN_ENV, RelayProcess, consumer_binary, relay_binary,
};
pub use reader::{Received, TopicReader};

/// Relay settings for tests: the testing profile (short polls, retries and
/// leases, so failures heal fast) with production's batch size.
#[must_use]
pub fn fast_relay_settings() -> consign_relay::RelaySettings {
    let mut settings = consign_relay::RelaySettings::for_profile(consign_relay::Profile::Testing);
    settings.batch_size = 1000;
    settings
}

/// A `consign-relay` configuration file for tests, with the settings of
/// [`fast_relay_settings`], plus `relay` and `kafka` entries given as
/// `(key, TOML value)` pairs; an entry replaces a default of the same key.
#[must_use]
pub fn relay_config(
    database_url: &str,
    bootstrap: &str,
    relay: &[(&str, &str)],
    kafka: &[(&str, &str)],
) -> String {
    use std::fmt::Write;
    // The testing profile (no admin port: several relays run on one host),
    // with production's batch size.
    let mut settings = vec![("batch-size", "1000")];
    for &(key, value) in relay {
        settings.retain(|(k, _)| *k != key);
        settings.push((key, value));
    }
    let mut toml =
        format!("profile = \"testing\"\n\n[database]\nurl = {database_url:?}\n\n[relay]\n");
    for (key, value) in settings {
        let _ = writeln!(toml, "{key} = {value}");
    }
    let _ = write!(toml, "\n[kafka]\n\"bootstrap.servers\" = {bootstrap:?}\n");
    for (key, value) in kafka {
        let _ = writeln!(toml, "{key:?} = {value}");
    }
    toml
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`.
///
/// # Errors
/// If `check` fails or `timeout` passes; the message says what was awaited.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A topic name unique to this call, so tests sharing an external broker do
/// not see each other's messages.
#[must_use]
pub fn unique_topic(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Defines one end-to-end test body and runs it on both tiers: as
/// `NAME::mock` on a fresh librdkafka mock cluster (or the broker named by
/// `TEST_KAFKA_BROKERS`), and as `NAME::kafka` on real Apache Kafka (the
/// test binary's shared 1-node cluster; skipped with a printed line where
/// Java or Kafka's jars are missing, an error under `CI=true`). Each runs on
/// a fresh database migrated with `consign::MIGRATOR`.
///
/// ```ignore
/// consign_test_support::broker_test! {
///     async fn rolled_back_transactions_publish_nothing(pool: PgPool, broker: TestBroker) {
///         // ...
///     }
/// }
/// ```
#[macro_export]
macro_rules! broker_test {
    ($(#[$meta:meta])* async fn $name:ident($pool:ident: PgPool, $broker:ident: TestBroker) $body:block) => {
        $(#[$meta])*
        async fn $name($pool: ::sqlx::PgPool, $broker: $crate::TestBroker) $body

        mod $name {
            #[::sqlx::test(migrator = "consign::MIGRATOR")]
            async fn mock(pool: ::sqlx::PgPool) {
                super::$name(pool, $crate::TestBroker::start().unwrap()).await;
            }

            #[::sqlx::test(migrator = "consign::MIGRATOR")]
            async fn kafka(pool: ::sqlx::PgPool) {
                if let Some(broker) = $crate::TestBroker::real().unwrap() {
                    super::$name(pool, broker).await;
                }
            }
        }
    };
}
