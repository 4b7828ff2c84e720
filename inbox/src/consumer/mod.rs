//! The Kafka consumer runner: feeds an inbox service partition by partition.
//!
//! One thread polls the rdkafka consumer (and so runs the rebalance
//! callbacks); each assigned partition has a tokio task that takes the
//! partition's messages in order, in batches, through the service. On
//! assignment, each partition is positioned at the offset stored in the
//! database by the inbox, so restarts and rebalances resume exactly where
//! the committed effects stand. Offsets are committed to Kafka too, after
//! the database commit, for lag tools.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use consign_outbox::secrets::{redacted_properties, refused_property};

use crate::{
    BoxError, ConsumerError, InboxLayer, Received,
    store::{InboxBackend, InboxStore as _},
};

mod dispatch;
mod rebalance;
mod worker;

use dispatch::{commit_offsets, dispatch, feed_pending};
use rebalance::{Ctx, State};
use worker::{Worker, partition_worker};

type Tp = (String, i32);

/// Reads the stored next offsets of a group for topics, on the inbox's
/// database (the consumer itself does not depend on which).
pub(crate) type OffsetReader = std::sync::Arc<
    dyn Fn(
            String,
            Vec<String>,
        )
            -> futures_util::future::BoxFuture<'static, sqlx::Result<Vec<(String, i32, i64)>>>
        + Send
        + Sync,
>;

/// Consumer properties consign sets unless overridden.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("auto.offset.reset", "earliest"),
    ("client.id", "consign-inbox"),
];

/// Runs an inbox service over a Kafka consumer group.
///
/// ```no_run
/// use consign_inbox::{Delivery, InboxConsumer, InboxLayer};
/// use tokio_util::sync::CancellationToken;
/// use tower::ServiceBuilder;
///
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let inbox = InboxLayer::new(pool, "inventory")?;
/// let service = ServiceBuilder::new()
///     .layer(inbox.clone())
///     .service_fn(|_d: Delivery| async { Ok::<_, std::io::Error>(()) });
/// let consumer = InboxConsumer::builder(&inbox)
///     .topic("orders")
///     .kafka("bootstrap.servers", "localhost:9092")
///     .build()?;
/// let shutdown = CancellationToken::new();
/// consumer.run(service, shutdown.clone()).await?; // until shutdown.cancel()
/// # Ok(()) }
/// ```
pub struct InboxConsumer {
    offsets: OffsetReader,
    group: String,
    topics: Vec<String>,
    kafka: BTreeMap<String, String>,
    max_batch: usize,
    queue_per_partition: usize,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for InboxConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxConsumer")
            .field("group", &self.group)
            .field("topics", &self.topics)
            .field("kafka", &redacted_properties(&self.kafka))
            .field("max_batch", &self.max_batch)
            .field("queue_per_partition", &self.queue_per_partition)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}

/// Configures an [`InboxConsumer`].
#[derive(Debug)]
#[must_use]
pub struct InboxConsumerBuilder {
    consumer: InboxConsumer,
}

impl InboxConsumer {
    /// A consumer for `inbox`: its consumer name is the Kafka group id and
    /// the group under which offsets are stored.
    pub fn builder<DB: InboxBackend>(inbox: &InboxLayer<DB>) -> InboxConsumerBuilder {
        let pool = inbox.pool().clone();
        let offsets: OffsetReader = std::sync::Arc::new(move |group, topics| {
            let pool = pool.clone();
            Box::pin(async move { pool.acquire().await?.stored_offsets(&group, &topics).await })
        });
        InboxConsumerBuilder {
            consumer: Self {
                offsets,
                group: inbox.consumer().to_owned(),
                topics: Vec::new(),
                kafka: BTreeMap::new(),
                max_batch: 500,
                queue_per_partition: 2000,
                shutdown_timeout: Duration::from_secs(10),
            },
        }
    }
}

impl InboxConsumerBuilder {
    /// Subscribes to `topic` (may be called several times).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.consumer.topics.push(topic.into());
        self
    }

    /// Sets a librdkafka consumer property (`bootstrap.servers`,
    /// `session.timeout.ms`, security settings, ...). They override
    /// consign's defaults: `enable.auto.commit=false`,
    /// `enable.auto.offset.store=false`, `auto.offset.reset=earliest`,
    /// `client.id=consign-inbox`. `group.id` is the inbox's consumer name.
    pub fn kafka(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.consumer.kafka.insert(key.into(), value.into());
        self
    }

    /// Most messages of one partition handled in one transaction
    /// (default 500).
    pub fn max_batch(mut self, messages: usize) -> Self {
        self.consumer.max_batch = messages;
        self
    }

    /// How long a partition's batch in flight may take to finish when the
    /// partition is revoked or the consumer shuts down (default 10 s); after
    /// that it is abandoned (rolled back, redelivered later).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.consumer.shutdown_timeout = timeout;
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// [`ConsumerError::Config`] naming the setting.
    pub fn build(self) -> Result<InboxConsumer, ConsumerError> {
        let c = self.consumer;
        if c.topics.is_empty() {
            return Err(ConsumerError::Config(
                "topics: subscribe to at least one topic".into(),
            ));
        }
        if let Some(bad) = c.topics.iter().find(|t| t.trim().is_empty()) {
            return Err(ConsumerError::Config(format!(
                "topics: invalid topic name {bad:?}"
            )));
        }
        if c.max_batch == 0 {
            return Err(ConsumerError::Config(
                "max_batch: must be at least 1".into(),
            ));
        }
        if c.kafka.contains_key("group.id") {
            return Err(ConsumerError::Config(
                "kafka.group.id: set by the inbox's consumer name; do not set it".into(),
            ));
        }
        if c.kafka
            .get("enable.auto.commit")
            .is_some_and(|v| v == "true")
        {
            return Err(ConsumerError::Config(
                "kafka.enable.auto.commit: must stay false; offsets are committed after the database commit".into(),
            ));
        }
        let mut c = c;
        c.queue_per_partition = c.queue_per_partition.max(2 * c.max_batch);
        Ok(c)
    }
}

impl InboxConsumer {
    /// Consumes until `shutdown` is cancelled (or the returned future is
    /// dropped), then finishes the batches in flight, commits and leaves
    /// the group.
    ///
    /// The service gets each partition's messages in offset order, in
    /// batches (`Vec<Received>`), as an [`InboxService`](crate::InboxService)
    /// takes them. An error from it (database down) pauses that partition,
    /// which retries the same batch with backoff.
    ///
    /// # Errors
    /// The Kafka client could not be created or subscribed, or a partition
    /// worker died.
    pub async fn run<S>(self, service: S, shutdown: CancellationToken) -> Result<(), ConsumerError>
    where
        S: Service<Vec<Received>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
    {
        let handle = Handle::current();
        let _stop_on_drop = shutdown.clone().drop_guard();
        let (done, result) = tokio::sync::oneshot::channel();
        let name = format!("consign-inbox-{}", self.group);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let _ = done.send(poll_loop(&self, &service, &shutdown, &handle));
            })
            .map_err(|e| ConsumerError::Config(format!("cannot start the poll thread: {e}")))?;
        result
            .await
            .unwrap_or_else(|_| Err(ConsumerError::Config("the poll thread panicked".into())))
    }
}

fn client_config(consumer: &InboxConsumer) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in CONSUMER_DEFAULTS {
        config.set(*key, *value);
    }
    for (key, value) in &consumer.kafka {
        config.set(key, value);
    }
    config.set("group.id", &consumer.group);
    config
}

fn poll_loop<S>(
    settings: &InboxConsumer,
    service: &S,
    shutdown: &CancellationToken,
    handle: &Handle,
) -> Result<(), ConsumerError>
where
    S: Service<Vec<Received>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    let ctx = Ctx {
        offsets: settings.offsets.clone(),
        group: settings.group.clone(),
        topics: settings.topics.clone(),
        handle: handle.clone(),
        shutdown_timeout: settings.shutdown_timeout,
        shutdown: shutdown.clone(),
        state: Mutex::new(State::default()),
    };
    let consumer: BaseConsumer<Ctx> = client_config(settings)
        .create_with_context(ctx)
        .map_err(kafka_error)?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(group = %settings.group, ?topics, "inbox consumer started");
    let (commits, committed) = std::sync::mpsc::channel::<(String, i32, i64)>();
    let spawn = |tp: &Tp| -> Worker {
        let (sender, receiver) = mpsc::channel(settings.queue_per_partition);
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let task = handle.spawn(partition_worker(
            tp.clone(),
            receiver,
            service.clone(),
            settings.max_batch,
            stop.clone(),
            abort.clone(),
            commits.clone(),
        ));
        Worker {
            sender,
            stop,
            abort,
            task,
        }
    };

    let result = loop {
        if shutdown.is_cancelled() {
            break Ok(());
        }
        commit_offsets(&consumer, &committed, CommitMode::Async);
        if let Err(e) = feed_pending(&consumer) {
            break Err(e);
        }
        let polled = consumer.poll(Duration::from_millis(100));
        if let Some(fatal) = consumer.context().state().fatal.take() {
            break Err(fatal);
        }
        match polled {
            None => {}
            Some(Err(error)) => {
                if let Some(stop) = lasting(&consumer, &error) {
                    break Err(stop);
                }
                tracing::warn!(%error, "kafka consumer error");
            }
            Some(Ok(message)) => {
                let received = Received::from_kafka(&message);
                drop(message);
                if let Err(e) = dispatch(&consumer, received, &spawn) {
                    break Err(e);
                }
            }
        }
    };
    // Let the batches in flight finish, commit their offsets, leave.
    let all: Vec<Tp> = consumer.context().state().workers.keys().cloned().collect();
    consumer.context().stop_workers(&all);
    commit_offsets(&consumer, &committed, CommitMode::Sync);
    consumer.unsubscribe();
    drop(consumer);
    tracing::info!(group = %settings.group, "inbox consumer stopped");
    result
}

/// A Kafka client error; a refused property is named with its value
/// redacted when it holds a secret.
fn kafka_error(error: KafkaError) -> ConsumerError {
    match error {
        KafkaError::ClientConfig(_, description, key, value) => ConsumerError::Config(format!(
            "kafka.{key}: {}",
            refused_property(&key, &value, &description)
        )),
        other => ConsumerError::Kafka(other),
    }
}

/// The consumer errors that retrying cannot heal, which end `run`: fatal
/// ones, a session timeout the broker refuses and credentials it refuses
/// (librdkafka would retry for ever, consuming nothing).
fn lasting(consumer: &BaseConsumer<Ctx>, error: &KafkaError) -> Option<ConsumerError> {
    match error {
        KafkaError::MessageConsumptionFatal(code) => {
            let reason = consumer
                .client()
                .fatal_error()
                .map_or_else(|| code.to_string(), |(_, reason)| reason);
            tracing::error!(%reason, "kafka consumer failed for good; stopping");
            Some(ConsumerError::Fatal(reason))
        }
        KafkaError::MessageConsumption(RDKafkaErrorCode::InvalidSessionTimeout) => {
            Some(ConsumerError::Config(
                "session.timeout.ms: the broker refused it (it must lie within the broker's \
                 group.min.session.timeout.ms and group.max.session.timeout.ms, 6 s to 30 min \
                 by default)"
                    .into(),
            ))
        }
        KafkaError::MessageConsumption(RDKafkaErrorCode::Authentication) => {
            tracing::error!("Kafka refused the consumer's credentials; stopping");
            Some(ConsumerError::Config(
                "kafka authentication failed: the broker refused the SASL credentials \
                 (sasl.mechanisms, sasl.username, sasl.password); librdkafka's log has the \
                 broker's reason"
                    .into(),
            ))
        }
        _ => None,
    }
}
