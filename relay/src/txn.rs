//! Transactions mode: one transactional producer per leased outbox partition.
//!
//! The transactional id of partition `p` is `<prefix>-p<p>`, the same on every
//! relay of the outbox. When a relay acquires a partition it initializes a
//! producer with that id; the broker then aborts any transaction the previous
//! owner left open and fences that owner's producer, so a paused or cut-off
//! relay can no longer commit anything for the partition. Each batch of a
//! partition is one transaction: committed only if every message was
//! acknowledged, aborted otherwise, so `read_committed` consumers see all of a
//! batch or none of it.

use std::{collections::BTreeMap, time::Duration};

use futures_util::future::join_all;
use rdkafka::{
    ClientConfig,
    error::{KafkaError, KafkaResult, RDKafkaError},
    producer::{FutureProducer, Producer, PurgeConfig},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    deadline::Db,
    health::Health,
    lease::Owned,
    publish::{Outcome, Publisher},
    store::{OutboxRow, RelayStore as _},
};

/// The longest one init, commit or abort call waits (shorter when the
/// producer's `transaction.timeout.ms` is: a call need not outwait the
/// broker's own abort of the transaction).
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times a commit or abort that timed out (or failed retriably) is
/// called again, as librdkafka requires, before the producer is dropped.
const CALL_RETRIES: u32 = 3;

/// The transactional producers of one relay, by partition.
pub(crate) struct Transactional {
    base: ClientConfig,
    prefix: Option<String>,
    producers: BTreeMap<i16, (i64, Publisher)>,
    call_timeout: Duration,
    health: Health,
}

/// A partition whose producer was fenced or failed for good; it is dropped
/// and the partition is not published until the lease is confirmed again.
pub(crate) type Fatal = Vec<i16>;

impl Transactional {
    pub(crate) fn new(base: ClientConfig, prefix: Option<String>, health: Health) -> Self {
        let call_timeout = base
            .get("transaction.timeout.ms")
            .and_then(|ms| ms.parse::<u64>().ok())
            .map_or(MAX_CALL_TIMEOUT, |ms| {
                Duration::from_millis(ms).clamp(Duration::from_secs(1), MAX_CALL_TIMEOUT)
            });
        Self {
            base,
            prefix,
            producers: BTreeMap::new(),
            call_timeout,
            health,
        }
    }

    /// Drops the producers of partitions no longer held (or held under a new
    /// epoch) and initializes producers for newly held ones. Returns the
    /// partitions ready to publish.
    pub(crate) async fn sync(&mut self, db: &Db, owned: &Owned) -> Owned {
        let gone: Vec<i16> = self
            .producers
            .iter()
            .filter(|(p, (epoch, _))| owned.get(p) != Some(epoch))
            .map(|(p, _)| *p)
            .collect();
        for partition in gone {
            drop_producer(self.producers.remove(&partition));
        }
        self.health.keep_stalls_of(owned.keys().copied());
        let new: Vec<(i16, i64)> = owned
            .iter()
            .filter(|(p, _)| !self.producers.contains_key(p))
            .map(|(p, e)| (*p, *e))
            .collect();
        if !new.is_empty() {
            match self.prefix(db).await {
                Ok(prefix) => self.start(&prefix, &new).await,
                Err(error) => {
                    warn!(%error, "cannot read the outbox id for the transactional ids; retrying");
                    for (partition, _) in &new {
                        self.health.stalled(*partition, &error.to_string());
                    }
                }
            }
        }
        owned
            .iter()
            .filter(|(p, _)| self.producers.contains_key(p))
            .map(|(p, e)| (*p, *e))
            .collect()
    }

    async fn prefix(&mut self, db: &Db) -> crate::Result<String> {
        if let Some(prefix) = &self.prefix {
            return Ok(prefix.clone());
        }
        let id = db.run(async |conn| conn.outbox_id().await).await?;
        let prefix = format!("consign-{}", id.simple());
        self.prefix = Some(prefix.clone());
        Ok(prefix)
    }

    /// Creates and initializes the producers of `partitions`, concurrently.
    /// A producer whose init fails is dropped; the next batch tries again
    /// with a new one.
    async fn start(&mut self, prefix: &str, partitions: &[(i16, i64)]) {
        let timeout = self.call_timeout;
        let started = partitions.iter().map(|&(partition, epoch)| {
            let id = format!("{prefix}-p{partition}");
            let mut config = self.base.clone();
            config.set("transactional.id", &id);
            async move {
                let result = async {
                    let publisher = Publisher::new(config)?;
                    let producer = publisher.producer().clone();
                    match blocking(move || producer.init_transactions(timeout)).await {
                        Ok(()) => Ok(publisher),
                        Err(error) => {
                            drop_producer(Some((epoch, publisher)));
                            Err(error)
                        }
                    }
                }
                .await;
                (partition, epoch, id, result)
            }
        });
        for (partition, epoch, id, result) in join_all(started).await {
            match result {
                Ok(publisher) => {
                    debug!(partition, transactional_id = %id, "transactional producer ready");
                    self.producers.insert(partition, (epoch, publisher));
                }
                Err(error) => {
                    warn!(
                        partition,
                        transactional_id = %id,
                        %error,
                        "cannot initialize a transactional producer; retrying next batch"
                    );
                    self.health.stalled(partition, &error.to_string());
                }
            }
        }
    }

    /// Publishes `rows` (all of held partitions) with one transaction per
    /// partition, the partitions concurrently. Returns each row's outcome and
    /// the partitions whose producers were fenced.
    ///
    /// `drained` says the rows are all the ready partitions had (the fetch
    /// was not cut at the batch size): a ready partition without rows then
    /// has nothing to do, which ends a stall as a transaction does.
    pub(crate) async fn publish(
        &mut self,
        rows: &[OutboxRow],
        ready: &Owned,
        drained: bool,
        shutdown: &CancellationToken,
        grace: Duration,
    ) -> (Vec<Outcome>, Fatal) {
        let mut groups: BTreeMap<i16, Vec<usize>> = BTreeMap::new();
        for (index, row) in rows.iter().enumerate() {
            groups.entry(row.partition).or_default().push(index);
        }
        if drained {
            self.nothing_to_do(ready.keys().filter(|p| !groups.contains_key(p)));
        }
        let producers = &self.producers;
        let timeout = self.call_timeout;
        let transactions = groups.into_iter().map(|(partition, indexes)| async move {
            let batch: Vec<&OutboxRow> = indexes.iter().map(|&i| &rows[i]).collect();
            let result = match producers.get(&partition) {
                Some((_, publisher)) => {
                    transaction(publisher, &batch, timeout, shutdown, grace).await
                }
                None => Err(Ended::Broken("no producer".into())),
            };
            (partition, indexes, result)
        });
        let mut outcomes = vec![Outcome::Unknown; rows.len()];
        let mut fatal = Vec::new();
        let mut broken = Vec::new();
        for (partition, indexes, result) in join_all(transactions).await {
            match result {
                Ok(done) => {
                    self.health.progressed(partition);
                    for (index, outcome) in indexes.into_iter().zip(done) {
                        outcomes[index] = outcome;
                    }
                }
                Err(Ended::Fatal) => {
                    self.health.progressed(partition);
                    fatal.push(partition);
                }
                Err(Ended::Broken(error)) => {
                    self.health.stalled(partition, &error);
                    broken.push(partition);
                }
            }
        }
        for partition in fatal.iter().chain(&broken) {
            drop_producer(self.producers.remove(partition));
        }
        (outcomes, fatal)
    }

    /// `partitions` are ready and have no rows: they are not stalled.
    pub(crate) fn nothing_to_do<'a>(&self, partitions: impl IntoIterator<Item = &'a i16>) {
        for partition in partitions {
            self.health.progressed(*partition);
        }
    }

    /// Drops every producer (no transaction is open between batches).
    pub(crate) async fn close(&mut self) {
        // Dropping producers joins librdkafka's threads: not on an async
        // worker.
        let producers = std::mem::take(&mut self.producers);
        if let Err(error) = tokio::task::spawn_blocking(move || drop(producers)).await {
            tracing::warn!(%error, "closing the transactional producers failed");
        }
        self.health.keep_stalls_of(std::iter::empty());
    }
}

/// Drops a producer on a blocking thread: librdkafka's destroy waits for
/// its threads, which must not hold up an async worker.
fn drop_producer(producer: Option<(i64, Publisher)>) {
    if let Some(producer) = producer {
        tokio::task::spawn_blocking(move || drop(producer));
    }
}

/// Why a transaction produced no outcomes. Either way the rows stay and are
/// sent again, and the producer is dropped.
enum Ended {
    /// The producer was fenced or failed fatally: another relay may own the
    /// partition now; publish it again only once the lease is confirmed.
    Fatal,
    /// The producer is in a state it cannot leave by itself (a begin
    /// refused, a commit or abort that kept failing): a new producer is
    /// initialized for the partition next batch, which aborts whatever
    /// transaction this one left open.
    Broken(String),
}

/// One batch of one partition in one transaction.
///
/// A commit or abort that times out or fails retriably is called again (up
/// to [`CALL_RETRIES`] times), which resumes the same operation; if it still
/// fails, the producer is given up ([`Ended::Broken`]).
async fn transaction(
    publisher: &Publisher,
    rows: &[&OutboxRow],
    timeout: Duration,
    shutdown: &CancellationToken,
    grace: Duration,
) -> Result<Vec<Outcome>, Ended> {
    let producer = publisher.producer().clone();
    blocking(move || producer.begin_transaction())
        .await
        .map_err(|e| ended("begin", &e))?;
    let mut outcomes = publisher.publish(rows, shutdown, grace).await;
    // Held rows were not sent (their key waits for a row being retried):
    // the transaction commits without them. Aborting for them would abort
    // every batch that retries a row, for ever.
    if outcomes
        .iter()
        .all(|o| matches!(o, Outcome::Delivered | Outcome::Held))
    {
        let commit = |p: &FutureProducer, t: Duration| p.commit_transaction(t);
        if call(publisher, "commit", commit, timeout).await? == Call::Done {
            return Ok(outcomes);
        }
        warn!(
            rows = rows.len(),
            "Kafka transaction could not be committed; aborted, the rows will be sent again"
        );
    }
    // Acknowledged messages of an aborted transaction are invisible to
    // read_committed consumers: send them again with the rest. Messages
    // still in flight are purged: after a refusal librdkafka holds them
    // until they expire (`message.timeout.ms`), and the abort would wait
    // for that; they are of the aborted transaction either way.
    publisher
        .producer()
        .purge(PurgeConfig::default().queue().inflight());
    for outcome in &mut outcomes {
        if *outcome == Outcome::Delivered {
            *outcome = Outcome::Unknown;
        }
    }
    let abort = |p: &FutureProducer, t: Duration| p.abort_transaction(t);
    if call(publisher, "abort", abort, timeout).await? == Call::MustAbort {
        return Err(Ended::Broken(
            "abort: the producer asks for an abort".into(),
        ));
    }
    info!(rows = rows.len(), "Kafka transaction aborted");
    Ok(outcomes)
}

/// How a commit or abort call ended, if not with [`Ended`].
#[derive(PartialEq)]
enum Call {
    Done,
    /// The transaction failed and must be aborted.
    MustAbort,
}

/// Calls `op` (commit or abort); a call that times out or fails retriably is
/// called again, which resumes the same operation, up to [`CALL_RETRIES`]
/// times.
async fn call(
    publisher: &Publisher,
    step: &'static str,
    op: fn(&FutureProducer, Duration) -> KafkaResult<()>,
    timeout: Duration,
) -> Result<Call, Ended> {
    let mut attempts = 0;
    loop {
        let producer = publisher.producer().clone();
        match blocking(move || op(&producer, timeout)).await {
            Ok(()) => return Ok(Call::Done),
            Err(error) if requires_abort(&error) => return Ok(Call::MustAbort),
            Err(error) if retriable(&error) && attempts < CALL_RETRIES => {
                attempts += 1;
                warn!(%error, step, attempts, "Kafka transaction call failed; calling it again");
            }
            Err(error) => return Err(ended(step, &error)),
        }
    }
}

fn ended(step: &str, error: &KafkaError) -> Ended {
    let fatal = transaction_error(error).is_none_or(RDKafkaError::is_fatal);
    if fatal {
        error!(%error, step, "transactional producer fenced or broken; dropping it (another relay may own the partition now)");
        Ended::Fatal
    } else {
        warn!(
            %error,
            step,
            "Kafka transaction failed and the producer cannot go on; replacing it (the rows will be sent again)"
        );
        Ended::Broken(format!("{step}: {error}"))
    }
}

fn retriable(error: &KafkaError) -> bool {
    transaction_error(error).is_some_and(RDKafkaError::is_retriable)
}

fn requires_abort(error: &KafkaError) -> bool {
    transaction_error(error).is_some_and(RDKafkaError::txn_requires_abort)
}

fn transaction_error(error: &KafkaError) -> Option<&RDKafkaError> {
    match error {
        KafkaError::Transaction(error) => Some(error),
        _ => None,
    }
}

/// Runs a blocking librdkafka call off the async threads.
async fn blocking(call: impl FnOnce() -> KafkaResult<()> + Send + 'static) -> KafkaResult<()> {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}
