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

use backon::BackoffBuilder as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use consign_outbox::secrets::{REDACTED, is_secret_kafka_property, refused_property};

use crate::{BoxError, ConsumerError, InboxLayer, Received, store};

type Tp = (String, i32);

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
/// let inbox = InboxLayer::new(pool, "inventory");
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
    pool: PgPool,
    group: String,
    topics: Vec<String>,
    kafka: BTreeMap<String, String>,
    max_batch: usize,
    queue_per_partition: usize,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for InboxConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kafka: BTreeMap<&str, &str> = self
            .kafka
            .iter()
            .map(|(key, value)| {
                let shown = if is_secret_kafka_property(key) {
                    REDACTED
                } else {
                    value.as_str()
                };
                (key.as_str(), shown)
            })
            .collect();
        f.debug_struct("InboxConsumer")
            .field("group", &self.group)
            .field("topics", &self.topics)
            .field("kafka", &kafka)
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
    pub fn builder(inbox: &InboxLayer) -> InboxConsumerBuilder {
        InboxConsumerBuilder {
            consumer: Self {
                pool: inbox.pool().clone(),
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

/// A partition's task.
struct Worker {
    sender: mpsc::Sender<Received>,
    /// Finish the batch in flight, then stop.
    stop: CancellationToken,
    /// Stop now, abandoning the batch in flight.
    abort: CancellationToken,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    assigned: HashSet<Tp>,
    workers: HashMap<Tp, Worker>,
    /// Messages waiting for room in a full worker queue (their partition
    /// is paused meanwhile).
    pending: HashMap<Tp, VecDeque<Received>>,
    /// Found in a rebalance callback; ends `run`.
    fatal: Option<ConsumerError>,
}

struct Ctx {
    pool: PgPool,
    group: String,
    topics: Vec<String>,
    handle: Handle,
    shutdown_timeout: Duration,
    shutdown: CancellationToken,
    state: Mutex<State>,
}

impl Ctx {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets each partition of `tpl` to the offset stored in the database.
    /// Partitions without a stored offset keep Kafka's committed offset
    /// (or `auto.offset.reset`).
    ///
    /// Waits, retrying with backoff, until the database answers: starting
    /// anywhere else could re-apply effects whose dedup records retention
    /// has removed (Kafka's committed offset may be missing or behind).
    /// Polling stops meanwhile; the workers of other partitions go on.
    /// Returns `false` when shutdown came first (nothing positioned).
    fn position_at_stored_offsets(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
    ) -> bool {
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
            .build();
        let mut failures = 0_u32;
        let stored = loop {
            match self
                .handle
                .block_on(store::stored_offsets(&self.pool, &self.group, &self.topics))
            {
                Ok(stored) => break stored,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(
                        %error, failures,
                        "cannot read stored offsets; the assigned partitions wait until the database answers"
                    );
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    let stopped = self.handle.block_on(async {
                        tokio::select! {
                            () = tokio::time::sleep(delay) => false,
                            () = self.shutdown.cancelled() => true,
                        }
                    });
                    if stopped {
                        return false;
                    }
                }
            }
        };
        if failures > 0 {
            tracing::info!(
                failures,
                "stored offsets read; the assigned partitions start"
            );
        }
        let stored: HashMap<(&str, i32), i64> = stored
            .iter()
            .map(|(t, p, o)| ((t.as_str(), *p), *o))
            .collect();
        let assigned: Vec<Tp> = tp_list(tpl);
        for (topic, partition) in assigned {
            if let Some(&offset) = stored.get(&(topic.as_str(), partition)) {
                if let Some(end) = Self::end_before(consumer, &topic, partition, offset) {
                    tracing::error!(
                        topic,
                        partition,
                        stored = offset,
                        end,
                        "the stored offset is past the partition's end; stopping"
                    );
                    self.state().fatal = Some(ConsumerError::StoredOffsetPastEnd {
                        group: self.group.clone(),
                        topic,
                        partition,
                        stored: offset,
                        end,
                    });
                    return false;
                }
                if let Err(error) =
                    tpl.set_partition_offset(&topic, partition, Offset::Offset(offset))
                {
                    tracing::error!(%error, topic, partition, "cannot set the start offset");
                }
                tracing::info!(
                    topic,
                    partition,
                    offset,
                    "assigned; resuming at the stored offset"
                );
            } else {
                tracing::info!(topic, partition, "assigned; no stored offset");
            }
        }
        true
    }

    /// The partition's end (high watermark) when `stored` lies past it:
    /// the topic was created again or its log truncated, since an offset
    /// is stored only after its record was read. `None` when it does not,
    /// or when the broker cannot say (logged; consumption goes on).
    fn end_before(
        consumer: &BaseConsumer<Self>,
        topic: &str,
        partition: i32,
        stored: i64,
    ) -> Option<i64> {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok((_, end)) => (stored > end).then_some(end),
            Err(error) => {
                tracing::warn!(
                    %error, topic, partition,
                    "cannot read the partition's end to check the stored offset against it"
                );
                None
            }
        }
    }

    /// Stops the workers of `partitions`: each finishes its batch in flight
    /// (up to the shutdown timeout), then is aborted.
    fn stop_workers(&self, partitions: &[Tp]) {
        let workers: Vec<(Tp, Worker)> = {
            let mut state = self.state();
            partitions
                .iter()
                .filter_map(|tp| {
                    state.pending.remove(tp);
                    state.assigned.remove(tp);
                    state.workers.remove_entry(tp)
                })
                .collect()
        };
        if workers.is_empty() {
            return;
        }
        for (_, worker) in &workers {
            worker.stop.cancel();
        }
        if Handle::try_current().is_ok() {
            // Called on a runtime thread (the consumer dropped in a task):
            // cannot block here, so abandon the batches in flight.
            for (_, worker) in &workers {
                worker.abort.cancel();
            }
            return;
        }
        let timeout = self.shutdown_timeout;
        self.handle.block_on(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            for ((topic, partition), mut worker) in workers {
                if tokio::time::timeout_at(deadline, &mut worker.task)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        topic,
                        partition,
                        "batch in flight abandoned at revocation/shutdown"
                    );
                    worker.abort.cancel();
                    let _ = worker.task.await;
                }
            }
        });
    }
}

fn tp_list(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let positioned = self.position_at_stored_offsets(consumer, tpl);
                self.state().assigned.extend(tp_list(tpl));
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if positioned {
                    // librdkafka keeps a partition's pause across a
                    // revocation: one paused for backpressure (its queue
                    // full), revoked and assigned back to this member would
                    // stay paused for good. Its waiting messages went with
                    // the revocation; start it afresh.
                    assigned.and_then(|()| consumer.resume(tpl))
                } else {
                    // Shutting down, or stopping on a stored offset past the
                    // end: consume nothing from an unknown position.
                    assigned.and_then(|()| consumer.pause(tpl))
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked = tp_list(tpl);
                tracing::info!(?revoked, "partitions revoked");
                self.stop_workers(&revoked);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                let all: Vec<Tp> = self.state().assigned.iter().cloned().collect();
                self.stop_workers(&all);
                consumer.unassign()
            }
        };
        if let Err(error) = result {
            tracing::error!(%error, "applying the rebalance failed");
        }
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
        pool: settings.pool.clone(),
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

/// Hands a message to its partition's worker, in order behind any waiting
/// ones; pauses the partition while the worker's queue is full.
fn dispatch(
    consumer: &BaseConsumer<Ctx>,
    message: Received,
    spawn: &impl Fn(&Tp) -> Worker,
) -> Result<(), ConsumerError> {
    let tp = (message.topic.clone(), message.partition);
    let mut state = consumer.context().state();
    if !state.assigned.contains(&tp) {
        // Fetched before a revocation: the new owner reads it again.
        return Ok(());
    }
    if let Some(waiting) = state.pending.get_mut(&tp) {
        waiting.push_back(message);
        return Ok(());
    }
    let worker = state
        .workers
        .entry(tp.clone())
        .or_insert_with(|| spawn(&tp));
    match worker.sender.try_send(message) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(message)) => {
            state
                .pending
                .entry(tp.clone())
                .or_default()
                .push_back(message);
            drop(state);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&tp.0, tp.1);
            consumer.pause(&tpl).map_err(ConsumerError::Kafka)
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Err(worker_gone(&tp)),
    }
}

/// A worker's queue closed although it was not stopped: its task ended.
fn worker_gone((topic, partition): &Tp) -> ConsumerError {
    ConsumerError::Worker {
        topic: topic.clone(),
        partition: *partition,
        reason: "its task ended (a panic outside the handler?)".into(),
    }
}

/// Moves waiting messages into worker queues that have room again and
/// resumes their partitions.
fn feed_pending(consumer: &BaseConsumer<Ctx>) -> Result<(), ConsumerError> {
    let mut resumed = TopicPartitionList::new();
    {
        let mut guard = consumer.context().state();
        let state = &mut *guard;
        let mut drained = Vec::new();
        for (tp, waiting) in &mut state.pending {
            let Some(worker) = state.workers.get(tp) else {
                drained.push(tp.clone());
                continue;
            };
            while let Some(message) = waiting.pop_front() {
                match worker.sender.try_send(message) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(message)) => {
                        waiting.push_front(message);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return Err(worker_gone(tp)),
                }
            }
            if waiting.is_empty() {
                drained.push(tp.clone());
                resumed.add_partition(&tp.0, tp.1);
            }
        }
        for tp in drained {
            state.pending.remove(&tp);
        }
    }
    if resumed.count() > 0 {
        consumer.resume(&resumed)?;
    }
    Ok(())
}

fn commit_offsets(
    consumer: &BaseConsumer<Ctx>,
    committed: &std::sync::mpsc::Receiver<(String, i32, i64)>,
    mode: CommitMode,
) {
    let mut latest: BTreeMap<Tp, i64> = BTreeMap::new();
    while let Ok((topic, partition, next)) = committed.try_recv() {
        let entry = latest.entry((topic, partition)).or_insert(next);
        *entry = (*entry).max(next);
    }
    if latest.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in &latest {
        if let Err(error) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
            tracing::debug!(%error, "bad offset");
        }
    }
    // Only informational (the database holds the real position): a
    // failure here is logged, not fatal.
    if let Err(error) = consumer.commit(&tpl, mode)
        && !matches!(&error, KafkaError::ConsumerCommit(code) if *code == rdkafka::types::RDKafkaErrorCode::NoOffset)
    {
        tracing::debug!(%error, "committing offsets to Kafka failed");
    }
}

async fn partition_worker<S>(
    (topic, partition): Tp,
    mut queue: mpsc::Receiver<Received>,
    mut service: S,
    max_batch: usize,
    stop: CancellationToken,
    abort: CancellationToken,
    commits: std::sync::mpsc::Sender<(String, i32, i64)>,
) where
    S: Service<Vec<Received>> + Send,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    loop {
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            message = queue.recv() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let mut batch = Vec::with_capacity(max_batch.min(64));
        batch.push(first);
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(message) => batch.push(message),
                Err(_) => break,
            }
        }
        let next_offset = batch.last().map_or(0, |m| m.offset + 1);
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let attempt = async {
                let ready = ServiceExt::<Vec<Received>>::ready(&mut service)
                    .await
                    .map_err(Into::into)?;
                ready
                    .call(batch.clone())
                    .await
                    .map(|_| ())
                    .map_err(Into::<BoxError>::into)
            };
            let result = tokio::select! {
                biased;
                () = abort.cancelled() => return,
                result = attempt => result,
            };
            match result {
                Ok(_) => {
                    let _ = commits.send((topic.clone(), partition, next_offset));
                    break;
                }
                Err(error) => {
                    tracing::warn!(
                        topic, partition, %error,
                        "the inbox could not settle a batch; retrying it"
                    );
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}
