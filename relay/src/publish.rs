//! Producing a batch of rows to Kafka and collecting what the broker said.

use std::{collections::HashSet, time::Duration};

use futures_util::{StreamExt, stream::FuturesUnordered};
use rdkafka::{
    ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{
        DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig,
        future_producer::OwnedDeliveryResult,
    },
};
use tokio_util::sync::CancellationToken;

use consign_outbox::headers;

use crate::store::OutboxRow;

/// What happened to one row of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The broker acknowledged it: delete the row.
    Delivered,
    /// The broker or the producer refused it: record the error, retry later.
    Failed {
        /// librdkafka's error code in snake case, for the errors metric.
        kind: String,
        /// The error as text, stored on the row.
        error: String,
    },
    /// Not sent because an earlier row of its topic and key failed in this
    /// batch; it stays and follows that row.
    Held,
    /// No answer before shutdown: the row stays and is sent again.
    Unknown,
}

impl Outcome {
    fn is_failed(&self) -> bool {
        matches!(self, Self::Failed { .. })
    }

    fn failed(error: &KafkaError) -> Self {
        Self::Failed {
            kind: crate::metrics::error_kind(error),
            error: error.to_string(),
        }
    }
}

/// The idempotent producer, recreated if librdkafka reports a fatal error.
pub(crate) struct Publisher {
    config: ClientConfig,
    producer: FutureProducer,
    /// It has a `transactional.id`: one failure dooms the whole batch.
    transactional: bool,
}

impl Publisher {
    pub(crate) fn new(config: ClientConfig) -> Result<Self, KafkaError> {
        let producer = config.create()?;
        let transactional = config.get("transactional.id").is_some();
        Ok(Self {
            config,
            producer,
            transactional,
        })
    }

    /// The producer, for transaction calls.
    pub(crate) fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Produces every row (in order), then waits for every acknowledgement.
    /// If `shutdown` fires, waits at most `grace` more; rows without an
    /// answer by then are [`Outcome::Unknown`].
    ///
    /// A row refused in its delivery report does not let a later row of its
    /// key through: with `enable.gapless.guarantee` the broker's refusal stops
    /// the producer before a later message of the partition is written (the
    /// later ones fail as purged or fatal, which counts as unknown: they are
    /// sent again behind the refused row, which waits for its retry), and a
    /// row sent again after a failure goes without its key's later rows.
    ///
    /// A transactional publisher stops at the first failure: the transaction
    /// must be aborted, and librdkafka holds its other messages until they
    /// expire (`message.timeout.ms`), so waiting for them would only delay
    /// the abort, which purges them. Rows not yet sent or answered are
    /// [`Outcome::Unknown`].
    pub(crate) async fn publish(
        &self,
        rows: &[&OutboxRow],
        shutdown: &CancellationToken,
        grace: Duration,
    ) -> Vec<Outcome> {
        self.send_batch(rows).await.wait(shutdown, grace).await
    }

    /// The first half of [`publish`](Self::publish): enqueues every row
    /// (in order) and returns without waiting for the broker, so the relay
    /// can read its next batch meanwhile.
    pub(crate) async fn send_batch(&self, rows: &[&OutboxRow]) -> Sent {
        let mut outcomes = vec![Outcome::Unknown; rows.len()];
        let mut held: HashSet<(&str, &str)> = HashSet::new();
        let mut pending = Vec::new();
        for (index, row) in rows.iter().enumerate() {
            if self.transactional && outcomes.iter().any(Outcome::is_failed) {
                break;
            }
            let topic_key = row.key.as_deref().map(|key| (row.topic.as_str(), key));
            if topic_key.is_some_and(|tk| held.contains(&tk)) {
                outcomes[index] = Outcome::Held;
                continue;
            }
            match self.send(row).await {
                Ok(delivery) => {
                    pending.push((index, delivery));
                    // A row being retried goes alone: its key's later rows
                    // wait for its acknowledgement (next batch), so a second
                    // refusal cannot let them ahead of it.
                    if row.attempts > 0 {
                        held.extend(topic_key);
                    }
                }
                Err(error) => {
                    // A producer already stopped by another row's refusal
                    // refuses every later send: not this row's fault.
                    outcomes[index] = if stopped_producer(&error) {
                        Outcome::Unknown
                    } else {
                        Outcome::failed(&error)
                    };
                    held.extend(topic_key);
                }
            }
        }
        tracing::debug!(produced = pending.len(), "batch produced");
        Sent {
            outcomes,
            pending,
            transactional: self.transactional,
        }
    }

    /// Enqueues one row in the producer, waiting while its queue is full.
    async fn send(&self, row: &OutboxRow) -> Result<DeliveryFuture, KafkaError> {
        let mut record = FutureRecord::to(&row.topic)
            .payload(&row.payload)
            .headers(headers(row))
            .timestamp(row.created_at.timestamp_millis());
        if let Some(key) = row.key.as_deref() {
            record = record.key(key);
        }
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    /// Fails the messages still queued in the producer (not yet sent) as
    /// purged: their rows count as unknown and are sent again.
    pub(crate) fn purge_queued(&self) {
        self.producer.purge(PurgeConfig::default().queue());
    }

    /// Whether librdkafka declared the producer unusable.
    pub(crate) fn is_fatal(&self) -> bool {
        self.producer.client().fatal_error().is_some()
    }

    /// Replaces the producer if librdkafka declared it unusable (e.g. the
    /// broker refused a message and `enable.gapless.guarantee` stopped it).
    /// Returns the reason.
    pub(crate) fn renew_if_fatal(&mut self) -> Result<Option<String>, KafkaError> {
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return Ok(None);
        };
        let old = std::mem::replace(&mut self.producer, self.config.create()?);
        // Its messages fail now (as purged: unknown, sent again), so that
        // no delivery report is left waiting on a producer that is gone.
        old.purge(PurgeConfig::default().queue().inflight());
        // Dropping it purges, flushes and joins librdkafka's threads: not
        // on an async worker.
        tokio::task::spawn_blocking(move || drop(old));
        Ok(Some(format!("{code:?}: {reason}")))
    }

    /// Waits up to `timeout` for messages still queued in the producer, on
    /// a blocking thread.
    pub(crate) async fn flush(&self, timeout: Duration) {
        let producer = self.producer.clone();
        match tokio::task::spawn_blocking(move || producer.flush(timeout)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "producer flush at shutdown did not complete");
            }
            Err(error) => tracing::warn!(%error, "producer flush task failed"),
        }
    }
}

/// A batch enqueued in the producer, its acknowledgements still to come
/// (see [`Publisher::send_batch`]).
pub(crate) struct Sent {
    /// Known so far: rows refused or held back while sending.
    outcomes: Vec<Outcome>,
    /// Each sent row's index and delivery report.
    pending: Vec<(usize, DeliveryFuture)>,
    transactional: bool,
}

impl Sent {
    /// Whether every row went to the producer (none refused at once or
    /// held back behind a refused or retried row of its key).
    pub(crate) fn all_sent(&self) -> bool {
        self.pending.len() == self.outcomes.len()
    }

    /// Waits for every acknowledgement; if `shutdown` fires, at most
    /// `grace` more. Rows without an answer by then are
    /// [`Outcome::Unknown`].
    pub(crate) async fn wait(self, shutdown: &CancellationToken, grace: Duration) -> Vec<Outcome> {
        let Self {
            mut outcomes,
            pending,
            transactional,
        } = self;
        let mut pending: FuturesUnordered<_> = pending
            .into_iter()
            .map(|(index, delivery)| async move { (index, delivery.await) })
            .collect();
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = pending.next() => match next {
                    Some((index, result)) => {
                        outcomes[index] = delivery_outcome(result);
                        if transactional && outcomes[index].is_failed() {
                            break;
                        }
                    }
                    None => break,
                },
                () = &mut deadline => break,
            }
        }
        outcomes
    }
}

/// The producer's answer; `Err(Canceled)` means the producer went away. A
/// message purged or failed because the producer stopped (a fatal error,
/// e.g. the gapless guarantee after an earlier message was refused, or out
/// of sequence behind that message) was not refused itself: unknown, sent
/// again.
fn delivery_outcome<Canceled>(result: Result<OwnedDeliveryResult, Canceled>) -> Outcome {
    match result {
        Ok(Ok(_)) => Outcome::Delivered,
        Ok(Err((error, _))) if stopped_producer(&error) => Outcome::Unknown,
        Ok(Err((error, _))) => Outcome::failed(&error),
        Err(_) => Outcome::Unknown,
    }
}

fn stopped_producer(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::PurgeQueue
                | RDKafkaErrorCode::PurgeInflight
                | RDKafkaErrorCode::GaplessGuarantee
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
        )
    )
}

/// `consign-id`, `consign-event-type`, trace context, then the user's headers.
fn headers(row: &OutboxRow) -> OwnedHeaders {
    let user = row.user_headers();
    let id = row.id.hyphenated().to_string();
    let mut headers = OwnedHeaders::new_with_capacity(4 + user.len())
        .insert(Header {
            key: headers::ID,
            value: Some(&id),
        })
        .insert(Header {
            key: headers::EVENT_TYPE,
            value: Some(&row.event_type),
        });
    if let Some(traceparent) = &row.traceparent {
        headers = headers.insert(Header {
            key: headers::TRACEPARENT,
            value: Some(traceparent),
        });
    }
    if let Some(tracestate) = &row.tracestate {
        headers = headers.insert(Header {
            key: headers::TRACESTATE,
            value: Some(tracestate),
        });
    }
    for (name, value) in &user {
        headers = headers.insert(Header {
            key: name,
            value: Some(value),
        });
    }
    headers
}
