//! The broker under test: the mock cluster, or an external broker.

use std::{
    sync::{
        Arc,
        mpsc::{self, Sender},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    mocking::MockCluster,
    types::RDKafkaRespErr,
};

use crate::cluster::KafkaCluster;

/// Environment variable naming an external broker (`host:port`) to run the
/// end-to-end tests against instead of the mock cluster.
pub const EXTERNAL_BROKERS_ENV: &str = "TEST_KAFKA_BROKERS";

type Reply = Sender<Result<()>>;

enum Command {
    CreateTopic(String, i32, Reply),
    BrokerDown(i32, Reply),
    BrokerUp(i32, Reply),
    TopicError(String, RDKafkaRespErr, Reply),
    RoundTrip(i32, Duration, Reply),
    ProduceErrors(Vec<RDKafkaRespErr>, Reply),
    Stop,
}

/// librdkafka's mock cluster, hosted on its own thread so the handle is
/// `Send + Sync`. Its brokers listen on loopback TCP ports, so a relay in
/// another process can connect. Dropped, it shuts down.
pub struct MockKafka {
    bootstrap: String,
    brokers: i32,
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("bootstrap", &self.bootstrap)
            .finish()
    }
}

impl MockKafka {
    /// Starts a cluster of `brokers` brokers (ids 1..=brokers).
    ///
    /// # Errors
    /// If librdkafka cannot create the cluster.
    pub fn start(brokers: i32) -> Result<Self> {
        let (commands, inbox) = mpsc::channel::<Command>();
        let (ready, started) = mpsc::channel::<Result<String>>();
        let thread = std::thread::Builder::new()
            .name("mock-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(cluster) => cluster,
                    Err(e) => {
                        let _ = ready.send(Err(anyhow!("mock cluster: {e}")));
                        return;
                    }
                };
                let _ = ready.send(Ok(cluster.bootstrap_servers()));
                serve(&cluster, &inbox);
            })?;
        let bootstrap = started.recv().context("mock cluster thread died")??;
        Ok(Self {
            bootstrap,
            brokers,
            commands,
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` value.
    #[must_use]
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    fn call(&self, command: impl FnOnce(Reply) -> Command) -> Result<()> {
        let (reply, answer) = mpsc::channel();
        self.commands
            .send(command(reply))
            .map_err(|_| anyhow!("mock cluster stopped"))?;
        answer.recv().context("mock cluster stopped")?
    }

    /// Creates a topic with `partitions` partitions.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        self.call(|r| Command::CreateTopic(topic.to_owned(), partitions, r))
    }

    /// Takes broker `id` down: its connections are closed and refused.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn broker_down(&self, id: i32) -> Result<()> {
        self.call(|r| Command::BrokerDown(id, r))
    }

    /// Brings broker `id` back.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn broker_up(&self, id: i32) -> Result<()> {
        self.call(|r| Command::BrokerUp(id, r))
    }

    /// Takes every broker down.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn all_down(&self) -> Result<()> {
        (1..=self.brokers).try_for_each(|id| self.broker_down(id))
    }

    /// Brings every broker back.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn all_up(&self) -> Result<()> {
        (1..=self.brokers).try_for_each(|id| self.broker_up(id))
    }

    /// Delays every broker's responses by `delay`, like a distant cluster.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn set_round_trip(&self, delay: Duration) -> Result<()> {
        (1..=self.brokers).try_for_each(|id| self.call(|r| Command::RoundTrip(id, delay, r)))
    }

    /// Makes the brokers answer the next Produce requests with `errors`, one
    /// request each, in order (then normally again).
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn produce_errors(&self, errors: &[RDKafkaRespErr]) -> Result<()> {
        self.call(|r| Command::ProduceErrors(errors.to_vec(), r))
    }

    /// Makes the brokers answer every request about `topic` with `error`
    /// (e.g. `TopicAuthorizationFailed`), as a broker that refuses the topic.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn set_topic_error(&self, topic: &str, error: RDKafkaRespErr) -> Result<()> {
        self.call(|r| Command::TopicError(topic.to_owned(), error, r))
    }
}

fn serve(
    cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    inbox: &mpsc::Receiver<Command>,
) {
    let done = |reply: &Reply, result: rdkafka::error::KafkaResult<()>| {
        let _ = reply.send(result.map_err(|e| anyhow!("mock cluster: {e}")));
    };
    while let Ok(command) = inbox.recv() {
        match command {
            Command::CreateTopic(topic, partitions, reply) => {
                done(&reply, cluster.create_topic(&topic, partitions, 1));
            }
            Command::BrokerDown(id, reply) => done(&reply, cluster.broker_down(id)),
            Command::BrokerUp(id, reply) => done(&reply, cluster.broker_up(id)),
            Command::TopicError(topic, error, reply) => {
                done(&reply, cluster.topic_error(&topic, error));
            }
            Command::RoundTrip(id, delay, reply) => {
                done(&reply, cluster.broker_round_trip_time(id, delay));
            }
            Command::ProduceErrors(errors, reply) => {
                cluster.request_errors(rdkafka::types::RDKafkaApiKey::Produce, &errors);
                done(&reply, Ok(()));
            }
            Command::Stop => return,
        }
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

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
