//! The broker under test: the mock cluster, or an external broker.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
};

use crate::cluster::KafkaCluster;

mod mock;

pub use mock::MockKafka;

/// Environment variable naming an external broker (`host:port`) to run the
/// end-to-end tests against instead of the mock cluster.
pub const EXTERNAL_BROKERS_ENV: &str = "TEST_KAFKA_BROKERS";

/// The broker a test runs against: a fresh mock cluster, real Apache Kafka,
/// or the external broker named by `TEST_KAFKA_BROKERS`.
#[derive(Debug)]
pub enum TestBroker {
    /// An in-process mock cluster owned by this test.
    Mock(MockKafka),
    /// Real Apache Kafka: the test binary's shared 1-node cluster, or a
    /// cluster of the test's own.
    Kafka(Arc<KafkaCluster>),
    /// An external broker (e.g. Tansu) at this address.
    External(String),
}

impl TestBroker {
    /// The external broker if `TEST_KAFKA_BROKERS` is set, else a new
    /// 3-broker mock cluster.
    ///
    /// # Errors
    /// If the mock cluster cannot start.
    pub fn start() -> Result<Self> {
        match std::env::var(EXTERNAL_BROKERS_ENV) {
            Ok(address) if !address.trim().is_empty() => Ok(Self::External(address)),
            _ => Ok(Self::Mock(MockKafka::start(3)?)),
        }
    }

    /// Real Apache Kafka: the test binary's shared 1-node [`KafkaCluster`].
    ///
    /// `None` (after printing one line saying how to enable the tier) when
    /// Java or Kafka's jars are missing, so a developer without Java can run
    /// the rest of the suite.
    ///
    /// # Errors
    /// Under CI (`CI=true`), where the real-Kafka tier is mandatory, if
    /// Kafka is unavailable; anywhere, if it is installed but cannot start.
    pub fn real() -> Result<Option<Self>> {
        if !real_kafka_tier()? {
            return Ok(None);
        }
        Ok(Some(Self::Kafka(KafkaCluster::shared()?)))
    }

    /// The `bootstrap.servers` value.
    #[must_use]
    pub fn bootstrap(&self) -> &str {
        match self {
            Self::Mock(mock) => mock.bootstrap(),
            Self::Kafka(cluster) => cluster.bootstrap(),
            Self::External(address) => address,
        }
    }

    /// The mock cluster, for fault injection; `None` on any other broker.
    #[must_use]
    pub fn mock(&self) -> Option<&MockKafka> {
        match self {
            Self::Mock(mock) => Some(mock),
            Self::Kafka(_) | Self::External(_) => None,
        }
    }

    /// The real Kafka cluster; `None` on any other broker.
    #[must_use]
    pub fn cluster(&self) -> Option<&KafkaCluster> {
        match self {
            Self::Kafka(cluster) => Some(cluster),
            Self::Mock(_) | Self::External(_) => None,
        }
    }

    /// Creates `topic` with `partitions` partitions (brokers like Tansu do
    /// not create topics on first use).
    ///
    /// # Errors
    /// If the broker refuses.
    pub async fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        match self {
            Self::Mock(mock) => mock.create_topic(topic, partitions),
            Self::Kafka(cluster) => cluster.create_topic(topic, partitions).await,
            Self::External(address) => {
                create_topic_with_admin(address, topic, partitions, 1, &[]).await
            }
        }
    }
}

/// Whether the real-Kafka tier runs here: true when Java and Kafka's jars are
/// there; false, after printing one line saying how to enable the tier, when
/// they are not.
///
/// # Errors
/// Under CI (`CI=true`) or `TEST_KAFKA_REQUIRED=1`, where the tier is
/// mandatory, when they are missing.
pub fn real_kafka_tier() -> Result<bool> {
    match crate::cluster::kafka_libs() {
        Ok(_) => Ok(true),
        Err(missing) if real_kafka_required() => Err(missing
            .context("the real-Kafka tier is mandatory here (CI=true or TEST_KAFKA_REQUIRED=1)")),
        Err(missing) => {
            println!(
                "skipped on real Kafka: {missing:#}. Run scripts/services.sh kafka to enable the tier."
            );
            Ok(false)
        }
    }
}

/// Under CI (`CI=true`) or the test command (`TEST_KAFKA_REQUIRED=1`), a
/// missing real-Kafka tier (or other set-up the test command makes, such as
/// PostgreSQL's TLS) is an error, not a skip.
#[must_use]
pub fn real_kafka_required() -> bool {
    ["CI", "TEST_KAFKA_REQUIRED"]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|v| v == "true" || v == "1"))
}

/// What a broker does with transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transactions {
    /// Refuses them (e.g. Tansu with memory storage).
    Refused,
    /// Accepts them, but `read_committed` consumers also see aborted
    /// messages (librdkafka's mock cluster).
    NotIsolated,
    /// Accepts them and hides aborted and open transactions from
    /// `read_committed` consumers, as Kafka does.
    Isolated,
}

impl TestBroker {
    /// Whether the broker supports transactions and gives `read_committed`
    /// consumers Kafka's isolation: it writes a message in a transaction it aborts, then one
    /// in a transaction it commits, and reads the topic back. librdkafka's
    /// mock cluster accepts transactions but does not isolate them (its
    /// fetch reports no aborted transactions and a stable offset at the end
    /// of the log); brokers without transactions refuse them.
    ///
    /// # Errors
    /// If the probe topic cannot be created or read.
    pub async fn transactions(&self) -> Result<Transactions> {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let topic = crate::unique_topic("isolation-probe");
        self.create_topic(&topic, 1).await?;
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("transactional.id", &topic)
            .create()?;
        let probe_topic = topic.clone();
        let probe = move || -> rdkafka::error::KafkaResult<()> {
            let topic = probe_topic;
            let timeout = Duration::from_secs(10);
            producer.init_transactions(timeout)?;
            for (payload, commit) in [("aborted", false), ("committed", true)] {
                producer.begin_transaction()?;
                producer
                    .send(BaseRecord::<(), _>::to(&topic).payload(payload))
                    .map_err(|(e, _)| e)?;
                producer.flush(timeout)?;
                if commit {
                    producer.commit_transaction(timeout)?;
                } else {
                    producer.abort_transaction(timeout)?;
                }
            }
            Ok(())
        };
        if let Err(error) = tokio::task::spawn_blocking(probe).await? {
            println!("broker refused a transaction: {error}");
            return Ok(Transactions::Refused);
        }
        let mut reader = crate::TopicReader::new(self.bootstrap(), &topic)?;
        reader.read_to_end(Duration::from_secs(30)).await?;
        if reader.received().iter().any(|r| r.payload == b"aborted") {
            Ok(Transactions::NotIsolated)
        } else {
            Ok(Transactions::Isolated)
        }
    }
}

/// Creates `topic` through the admin API (an existing one is fine).
pub(crate) async fn create_topic_with_admin(
    address: &str,
    topic: &str,
    partitions: i32,
    replicas: i32,
    config: &[(&str, &str)],
) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", address)
        .create()
        .context("admin client")?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(
            &[config.iter().fold(
                NewTopic::new(topic, partitions, TopicReplication::Fixed(replicas)),
                |new, (key, value)| new.set(key, value),
            )],
            &options,
        )
        .await
        .context("create topic")?;
    for result in results {
        if let Err((name, code)) = result
            && code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
        {
            bail!("creating topic {name}: {code}");
        }
    }
    Ok(())
}

/// A kind of broker for benchmarks, which print figures for each side by
/// side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// librdkafka's mock cluster, in the benchmark's process.
    Mock,
    /// Apache Kafka: one KRaft node on loopback.
    Real,
}

impl BrokerKind {
    /// `BENCH_KAFKA=mock` or `real`; otherwise both, the real one only where
    /// Java and Kafka's jars are there (a line says why it is skipped).
    #[must_use]
    pub fn from_env() -> Vec<Self> {
        match std::env::var("BENCH_KAFKA").as_deref() {
            Ok("mock") => vec![Self::Mock],
            Ok("real") => vec![Self::Real],
            _ => match crate::cluster::kafka_libs() {
                Ok(_) => vec![Self::Mock, Self::Real],
                Err(e) => {
                    println!("real Kafka skipped: {e:#}\n");
                    vec![Self::Mock]
                }
            },
        }
    }

    /// What it is, for a heading.
    #[must_use]
    pub fn describe(self) -> String {
        match self {
            Self::Mock => "librdkafka mock cluster (in process)".into(),
            Self::Real => format!(
                "Apache Kafka {} (1 KRaft node, loopback)",
                crate::cluster::kafka_version()
            ),
        }
    }

    /// A fresh broker of this kind with `topic` created.
    ///
    /// # Errors
    /// If it cannot start or create the topic.
    pub async fn start(self, topic: &str, partitions: i32) -> Result<TestBroker> {
        let broker = match self {
            Self::Mock => TestBroker::Mock(MockKafka::start(1)?),
            Self::Real => TestBroker::Kafka(Arc::new(KafkaCluster::start(1)?)),
        };
        broker.create_topic(topic, partitions).await?;
        Ok(broker)
    }
}
