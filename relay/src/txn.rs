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
    producer::Producer,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    lease::{self, Owned},
    publish::{Outcome, Publisher},
    store::OutboxRow,
};

/// How long init, commit and abort may take before they count as failed.
const TRANSACTION_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The transactional producers of one relay, by partition.
pub(crate) struct Transactional {
    base: ClientConfig,
    prefix: Option<String>,
    producers: BTreeMap<i16, (i64, Publisher)>,
}

/// A partition whose producer was fenced or failed for good; it is dropped
/// and the partition is not published until the lease is confirmed again.
pub(crate) type Fatal = Vec<i16>;

impl Transactional {
    pub(crate) fn new(base: ClientConfig, prefix: Option<String>) -> Self {
        Self {
            base,
            prefix,
            producers: BTreeMap::new(),
        }
    }

    /// Drops the producers of partitions no longer held (or held under a new
    /// epoch) and initializes producers for newly held ones. Returns the
    /// partitions ready to publish.
    pub(crate) async fn sync(&mut self, pool: &PgPool, owned: &Owned) -> Owned {
        self.producers
            .retain(|p, (epoch, _)| owned.get(p) == Some(epoch));
        let new: Vec<(i16, i64)> = owned
            .iter()
            .filter(|(p, _)| !self.producers.contains_key(p))
            .map(|(p, e)| (*p, *e))
            .collect();
        if !new.is_empty() {
            match self.prefix(pool).await {
                Ok(prefix) => self.start(&prefix, &new).await,
                Err(error) => {
                    warn!(%error, "cannot read the outbox id for the transactional ids; retrying");
                }
            }
        }
        owned
            .iter()
            .filter(|(p, _)| self.producers.contains_key(p))
            .map(|(p, e)| (*p, *e))
            .collect()
    }

    async fn prefix(&mut self, pool: &PgPool) -> sqlx::Result<String> {
        if let Some(prefix) = &self.prefix {
            return Ok(prefix.clone());
        }
        let prefix = format!("consign-{}", lease::outbox_id(pool).await?.simple());
        self.prefix = Some(prefix.clone());
        Ok(prefix)
    }

    /// Creates and initializes the producers of `partitions`, concurrently.
    async fn start(&mut self, prefix: &str, partitions: &[(i16, i64)]) {
        let started = partitions.iter().map(|&(partition, epoch)| {
            let id = format!("{prefix}-p{partition}");
            let mut config = self.base.clone();
            config.set("transactional.id", &id);
            async move {
                let publisher = Publisher::new(config)?;
                let producer = publisher.producer().clone();
                blocking(move || producer.init_transactions(TRANSACTION_CALL_TIMEOUT)).await?;
                Ok::<_, KafkaError>((partition, epoch, publisher, id))
            }
        });
        for result in join_all(started).await {
            match result {
                Ok((partition, epoch, publisher, id)) => {
                    debug!(partition, transactional_id = %id, "transactional producer ready");
                    self.producers.insert(partition, (epoch, publisher));
                }
                Err(error) => {
                    warn!(%error, "cannot initialize a transactional producer; retrying next batch");
                }
            }
        }
    }

    /// Publishes `rows` (all of held partitions) with one transaction per
    /// partition, the partitions concurrently. Returns each row's outcome and
    /// the partitions whose producers were fenced.
    pub(crate) async fn publish(
        &mut self,
        rows: &[OutboxRow],
        shutdown: &CancellationToken,
        grace: Duration,
    ) -> (Vec<Outcome>, Fatal) {
        let mut groups: BTreeMap<i16, Vec<usize>> = BTreeMap::new();
        for (index, row) in rows.iter().enumerate() {
            groups.entry(row.partition).or_default().push(index);
        }
        let producers = &self.producers;
        let transactions = groups.into_iter().map(|(partition, indexes)| async move {
            let batch: Vec<&OutboxRow> = indexes.iter().map(|&i| &rows[i]).collect();
            let result = match producers.get(&partition) {
                Some((_, publisher)) => transaction(publisher, &batch, shutdown, grace).await,
                None => Err(Ended::Unknown),
            };
            (partition, indexes, result)
        });
        let mut outcomes = vec![Outcome::Unknown; rows.len()];
        let mut fatal = Vec::new();
        for (partition, indexes, result) in join_all(transactions).await {
            match result {
                Ok(done) => {
                    for (index, outcome) in indexes.into_iter().zip(done) {
                        outcomes[index] = outcome;
                    }
                }
                Err(Ended::Fatal) => fatal.push(partition),
                Err(Ended::Unknown) => {}
            }
        }
        for partition in &fatal {
            self.producers.remove(partition);
        }
        (outcomes, fatal)
    }

    /// Drops every producer (no transaction is open between batches).
    pub(crate) fn close(&mut self) {
        self.producers.clear();
    }
}

/// Why a transaction produced no outcomes.
enum Ended {
    /// Nothing is known; the rows stay and are sent again.
    Unknown,
    /// The producer was fenced or broke; drop it.
    Fatal,
}

/// One batch of one partition in one transaction.
async fn transaction(
    publisher: &Publisher,
    rows: &[&OutboxRow],
    shutdown: &CancellationToken,
    grace: Duration,
) -> Result<Vec<Outcome>, Ended> {
    let producer = publisher.producer().clone();
    blocking(move || producer.begin_transaction())
        .await
        .map_err(|e| ended("begin", &e))?;
    let mut outcomes = publisher.publish(rows, shutdown, grace).await;
    if outcomes.iter().all(|o| *o == Outcome::Delivered) {
        let mut attempts = 0;
        loop {
            let producer = publisher.producer().clone();
            match blocking(move || producer.commit_transaction(TRANSACTION_CALL_TIMEOUT)).await {
                Ok(()) => return Ok(outcomes),
                Err(error) if retriable(&error) && attempts < 3 => attempts += 1,
                Err(error) if requires_abort(&error) => break,
                Err(error) => return Err(ended("commit", &error)),
            }
        }
        warn!(
            rows = rows.len(),
            "Kafka transaction could not be committed; aborted, the rows will be sent again"
        );
        outcomes.fill(Outcome::Unknown);
    } else {
        // Acknowledged messages of an aborted transaction are invisible to
        // read_committed consumers: send them again with the rest.
        for outcome in &mut outcomes {
            if *outcome == Outcome::Delivered {
                *outcome = Outcome::Unknown;
            }
        }
    }
    let producer = publisher.producer().clone();
    blocking(move || producer.abort_transaction(TRANSACTION_CALL_TIMEOUT))
        .await
        .map_err(|e| ended("abort", &e))?;
    info!(rows = rows.len(), "Kafka transaction aborted");
    Ok(outcomes)
}

fn ended(step: &str, error: &KafkaError) -> Ended {
    let fatal = transaction_error(error).is_none_or(RDKafkaError::is_fatal);
    if fatal {
        error!(%error, step, "transactional producer fenced or broken; dropping it (another relay may own the partition now)");
        Ended::Fatal
    } else {
        warn!(%error, step, "Kafka transaction failed; the rows will be sent again");
        Ended::Unknown
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
