//! `InboxService`: dedup, transaction, retries and dead letters around a
//! handler.

use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use consign_outbox::headers::{self, dlq};
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{PgConnection, Postgres, Transaction};
use tower::{Service, ServiceExt};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::delivery::{DecodeError, Rejected};
use crate::layer::{Counted, MissingId, Shared};
use crate::{BoxError, Delivery, InboxError, Received, store};

/// How long the inbox waits, after the handler returned, for its
/// [`Delivery`] (and so the transaction) to come back.
const DELIVERY_RETURN_TIMEOUT: Duration = Duration::from_secs(5);

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler succeeded; its writes and the dedup record committed.
    Handled,
    /// The id was already recorded: the handler was not called.
    Duplicate,
    /// The message went to the dead letters.
    DeadLettered {
        /// Why.
        reason: String,
    },
    /// A requeued dead letter of another consumer: passed over (its
    /// offset recorded, the handler not called). See
    /// [`headers::REQUEUED_FOR`](crate::headers::REQUEUED_FOR).
    ForAnotherConsumer,
}

/// What became of a batch of messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    /// Messages handled.
    pub handled: u64,
    /// Messages skipped as duplicates.
    pub duplicates: u64,
    /// Messages sent to the dead letters.
    pub dead_lettered: u64,
    /// Requeued dead letters of another consumer, passed over.
    pub for_another_consumer: u64,
    /// Handler attempts that failed on the way.
    pub failed_attempts: u64,
}

impl BatchOutcome {
    fn add(&mut self, outcome: &Outcome, failed_attempts: u64) {
        match outcome {
            Outcome::Handled => self.handled += 1,
            Outcome::Duplicate => self.duplicates += 1,
            Outcome::DeadLettered { .. } => self.dead_lettered += 1,
            Outcome::ForAnotherConsumer => self.for_another_consumer += 1,
        }
        self.failed_attempts += failed_attempts;
    }
}

/// The service an [`InboxLayer`](crate::InboxLayer) wraps around a handler.
///
/// It takes one [`Received`] message (one transaction per message) or a
/// `Vec<Received>` (one transaction for the whole batch while handlers
/// succeed; after a failure, the batch is redone one message per
/// transaction so that only the failing message is retried). A batch is
/// handled in its order: give it the messages of one partition in offset
/// order.
///
/// The inner service gets a [`Delivery`] and may return any response; its
/// error must convert into a [`BoxError`]. Errors it returns, panics, and
/// tower errors such as a timeout's are handler failures: retried per the
/// [`RetryPolicy`](crate::RetryPolicy), then dead-lettered. So is a
/// transaction the database refuses to commit after the handler returned
/// `Ok` because of what the handler did in it (a deferred constraint it
/// broke, an SQL error it swallowed, a serialization failure); the
/// dead letter carries the database's error. Failures of the database
/// itself (connection lost) are [`InboxError`]s: nothing was committed and
/// the message can be offered again.
#[derive(Debug)]
pub struct InboxService<S> {
    shared: Arc<Shared>,
    inner: S,
}

impl<S: Clone> Clone for InboxService<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            inner: self.inner.clone(),
        }
    }
}

impl<S> InboxService<S> {
    pub(crate) fn new(shared: Arc<Shared>, inner: S) -> Self {
        Self { shared, inner }
    }

    /// The consumer name of the inbox.
    #[must_use]
    pub fn consumer(&self) -> &str {
        &self.shared.consumer
    }

    /// The wrapped handler service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped handler service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped handler service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Takes the instance `poll_ready` made ready, leaving a clone in its
    /// place (tower's pattern for services that clone into their futures).
    fn take_ready(&mut self) -> S
    where
        S: Clone,
    {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }
}

/// Readiness of the handler service, as an [`InboxError`].
fn poll_inner<S>(inner: &mut S, cx: &mut Context<'_>) -> Poll<Result<(), InboxError>>
where
    S: Service<Delivery>,
    S::Error: Into<BoxError>,
{
    inner
        .poll_ready(cx)
        .map_err(|error| InboxError::Service(error.into()))
}

impl<S> Service<Received> for InboxService<S>
where
    S: Service<Delivery> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = Outcome;
    type Error = InboxError;
    type Future = BoxFuture<'static, Result<Outcome, InboxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is also awaited before each further call of the handler
        // (retries, the messages of a batch).
        poll_inner(&mut self.inner, cx)
    }

    fn call(&mut self, message: Received) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        let mut inner = self.take_ready();
        Box::pin(async move {
            let id = resolve_id(&shared, &message);
            let (outcome, _) =
                process_one(&shared, &mut inner, &Arc::new(message), &id, None).await?;
            Ok(outcome)
        })
    }
}

impl<S> Service<Vec<Received>> for InboxService<S>
where
    S: Service<Delivery> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = BatchOutcome;
    type Error = InboxError;
    type Future = BoxFuture<'static, Result<BatchOutcome, InboxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        poll_inner(&mut self.inner, cx)
    }

    fn call(&mut self, batch: Vec<Received>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        let mut inner = self.take_ready();
        Box::pin(async move { process_batch(&shared, &mut inner, batch).await })
    }
}

/// Whether `message` is a dead letter requeued for another consumer.
fn for_another_consumer(shared: &Shared, message: &Received) -> bool {
    message
        .header_str(headers::REQUEUED_FOR)
        .is_some_and(|consumer| consumer != shared.consumer)
}

fn resolve_id(shared: &Shared, message: &Received) -> Result<Uuid, String> {
    match (message.consign_id(), shared.missing_id) {
        (Ok(id), _) => Ok(id),
        (Err(_), MissingId::FromPosition) => Ok(message.position_id()),
        (Err(reason), MissingId::DeadLetter) => Err(reason),
    }
}

/// A failed handler attempt.
struct Failure {
    attempts: u32,
    reason: String,
    /// Retrying cannot help (undecodable, rejected).
    poison: bool,
}

enum Attempt {
    Succeeded(Transaction<'static, Postgres>),
    Failed {
        tx: Option<Transaction<'static, Postgres>>,
        reason: String,
        poison: bool,
    },
}

/// Calls the handler once with `tx`, catching panics, and takes the
/// transaction back.
async fn attempt<S>(
    shared: &Shared,
    inner: &mut S,
    message: &Arc<Received>,
    id: Uuid,
    number: u32,
    tx: Transaction<'static, Postgres>,
) -> Result<Attempt, InboxError>
where
    S: Service<Delivery>,
    S::Error: Into<BoxError>,
{
    let ready = ServiceExt::<Delivery>::ready(inner)
        .await
        .map_err(|e| InboxError::Service(e.into()))?;
    let (delivery, back) = Delivery::new(Arc::clone(message), id, number, tx);
    let started = std::time::Instant::now();
    let span = crate::trace::handler_span(&shared.consumer, message, id, number);
    let call = span.in_scope(|| ready.call(delivery)).instrument(span);
    let result: Result<Option<BoxError>, String> = match AssertUnwindSafe(call).catch_unwind().await
    {
        Ok(Ok(_)) => Ok(None),
        Ok(Err(error)) => Ok(Some(error.into())),
        Err(panic) => Err(panic_message(&*panic)),
    };
    let consumer = shared.consumer.clone();
    metrics::histogram!(crate::metrics::HANDLER_SECONDS, "consumer" => consumer)
        .record(started.elapsed().as_secs_f64());
    let returned = tokio::time::timeout(DELIVERY_RETURN_TIMEOUT, back)
        .await
        .ok()
        .and_then(Result::ok);
    let Some(returned) = returned else {
        return Ok(Attempt::Failed {
            tx: None,
            reason: "the handler kept its Delivery after returning, so its transaction \
                     could not be committed; do not move the Delivery into spawned tasks"
                .into(),
            poison: false,
        });
    };
    Ok(match result {
        Ok(None) => Attempt::Succeeded(returned.tx),
        Ok(Some(error)) => {
            let poison =
                returned.poison.is_some() || error.is::<DecodeError>() || error.is::<Rejected>();
            Attempt::Failed {
                tx: Some(returned.tx),
                reason: returned.poison.unwrap_or_else(|| error_chain(&*error)),
                poison,
            }
        }
        Err(panic) => Attempt::Failed {
            tx: Some(returned.tx),
            reason: format!("handler panicked: {panic}"),
            poison: false,
        },
    })
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

async fn rollback(tx: Transaction<'static, Postgres>) {
    if let Err(error) = tx.rollback().await {
        // The connection is discarded; nothing was committed.
        tracing::debug!(%error, "rollback failed");
    }
}

/// The reason to give when the transaction of handlers that all returned
/// `Ok` could not be settled because of what they did in it: a deferred
/// constraint they broke, an SQL error they swallowed (PostgreSQL then
/// refuses every statement until rollback), a serialization failure or
/// deadlock. `None` when the database itself failed (connection lost,
/// shutdown, out of resources): that is the inbox's error, and nothing of
/// the message is at fault.
fn refused_by_the_database(error: &InboxError) -> Option<String> {
    let InboxError::Database(sqlx::Error::Database(database)) = error else {
        return None;
    };
    let code = database.code()?;
    let caused_by_the_writes = matches!(&code[..2], "22" | "23" | "P0")
        || matches!(&*code, "25P02" | "40001" | "40002" | "40P01");
    caused_by_the_writes.then(|| {
        format!(
            "the handler returned Ok but its transaction could not be committed: \
             {} (SQLSTATE {code})",
            database.message()
        )
    })
}

/// A batch: one transaction while every handler succeeds; after a failure,
/// the batch is redone one message per transaction.
async fn process_batch<S>(
    shared: &Shared,
    inner: &mut S,
    batch: Vec<Received>,
) -> Result<BatchOutcome, InboxError>
where
    S: Service<Delivery>,
    S::Error: Into<BoxError>,
{
    let messages: Vec<Arc<Received>> = batch.into_iter().map(Arc::new).collect();
    let ids: Vec<Result<Uuid, String>> = messages.iter().map(|m| resolve_id(shared, m)).collect();
    let mut first_failure = match whole_batch(shared, inner, &messages, &ids).await? {
        Ok(outcome) => return Ok(outcome),
        Err(failed) => failed,
    };
    let mut outcome = BatchOutcome {
        failed_attempts: 1,
        ..BatchOutcome::default()
    };
    for (i, (message, id)) in messages.iter().zip(&ids).enumerate() {
        let prior = first_failure
            .take_if(|(index, _)| *index == i)
            .map(|(_, failure)| failure);
        let (one, failed) = process_one(shared, inner, message, id, prior).await?;
        outcome.add(&one, failed);
    }
    Ok(outcome)
}

/// Handles `messages` in one transaction. Returns the outcome when it
/// committed, or (everything rolled back) the index and failure of the
/// first handler that failed, or `None` when every handler succeeded but
/// the database refused their transaction (no message is known to be at
/// fault).
async fn whole_batch<S>(
    shared: &Shared,
    inner: &mut S,
    messages: &[Arc<Received>],
    ids: &[Result<Uuid, String>],
) -> Result<Result<BatchOutcome, Option<(usize, Failure)>>, InboxError>
where
    S: Service<Delivery>,
    S::Error: Into<BoxError>,
{
    if messages.is_empty() {
        return Ok(Ok(BatchOutcome::default()));
    }
    let mut tx = shared.pool.begin().await?;
    let valid: Vec<Uuid> = messages
        .iter()
        .zip(ids)
        .filter(|(message, _)| !for_another_consumer(shared, message))
        .filter_map(|(_, id)| id.as_ref().ok().copied())
        .collect();
    let mut new = if valid.is_empty() {
        HashSet::new()
    } else {
        store::record_ids(&mut tx, &shared.consumer, &valid).await?
    };
    let mut outcome = BatchOutcome::default();
    // Dead-lettered once every handler has succeeded, so that a rollback
    // cannot leave a copy on the dead-letter topic.
    let mut without_id = Vec::new();
    for (index, (message, id)) in messages.iter().zip(ids).enumerate() {
        match id {
            _ if for_another_consumer(shared, message) => {
                outcome.add(&Outcome::ForAnotherConsumer, 0);
            }
            Err(reason) => without_id.push((message, reason)),
            // Recorded before (or earlier in this batch): a duplicate.
            Ok(id) if !new.remove(id) => outcome.add(&Outcome::Duplicate, 0),
            Ok(id) => match attempt(shared, inner, message, *id, 1, tx).await? {
                Attempt::Succeeded(back) => {
                    tx = back;
                    outcome.add(&Outcome::Handled, 0);
                }
                Attempt::Failed {
                    tx: back,
                    reason,
                    poison,
                } => {
                    if let Some(back) = back {
                        rollback(back).await;
                    }
                    shared.count(Counted::FailedAttempt, 1);
                    tracing::warn!(
                        consumer = %shared.consumer, topic = %message.topic,
                        partition = message.partition, offset = message.offset,
                        %reason, "handler failed (attempt 1); redoing the batch one message at a time"
                    );
                    let failure = Failure {
                        attempts: 1,
                        reason,
                        poison,
                    };
                    return Ok(Err(Some((index, failure))));
                }
            },
        }
    }
    for (_, reason) in &without_id {
        outcome.add(
            &Outcome::DeadLettered {
                reason: (*reason).clone(),
            },
            0,
        );
    }
    match settle_batch(shared, tx, messages, without_id).await {
        Ok(()) => {
            count(shared, &outcome);
            Ok(Ok(outcome))
        }
        Err(error) => {
            let Some(reason) = refused_by_the_database(&error) else {
                return Err(error);
            };
            shared.count(Counted::FailedAttempt, 1);
            tracing::warn!(
                consumer = %shared.consumer, messages = messages.len(), %reason,
                "batch refused at commit; redoing it one message at a time"
            );
            Ok(Err(None))
        }
    }
}

/// Dead-letters the batch's messages without id, records the next offset
/// of each partition and commits.
async fn settle_batch(
    shared: &Shared,
    mut tx: Transaction<'static, Postgres>,
    messages: &[Arc<Received>],
    without_id: Vec<(&Arc<Received>, &String)>,
) -> Result<(), InboxError> {
    for (message, reason) in without_id {
        dead_letter(shared, &mut tx, None, message, reason, 0).await?;
    }
    let mut next_offsets: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for message in messages {
        let next = next_offsets
            .entry((&message.topic, message.partition))
            .or_insert(0);
        *next = (*next).max(message.offset + 1);
    }
    for ((topic, partition), next) in next_offsets {
        store::record_offset(&mut tx, &shared.consumer, topic, partition, next).await?;
    }
    tx.commit().await?;
    Ok(())
}

fn count(shared: &Shared, outcome: &BatchOutcome) {
    shared.count(Counted::Handled, outcome.handled);
    shared.count(Counted::Duplicate, outcome.duplicates);
    shared.count(Counted::DeadLettered, outcome.dead_lettered);
    shared.count(Counted::ForAnotherConsumer, outcome.for_another_consumer);
}

/// One message in transactions of its own: retried with backoff, then
/// dead-lettered. Returns the outcome and the failed attempts it took.
async fn process_one<S>(
    shared: &Shared,
    inner: &mut S,
    message: &Arc<Received>,
    id: &Result<Uuid, String>,
    prior: Option<Failure>,
) -> Result<(Outcome, u64), InboxError>
where
    S: Service<Delivery>,
    S::Error: Into<BoxError>,
{
    let mut delays = shared.retry.delays();
    let mut failure = prior;
    let mut failed = 0;
    loop {
        let attempts = failure.as_ref().map_or(0, |f| f.attempts);
        if let Some(f) = &failure {
            if f.poison || f.attempts >= shared.retry.max_attempts {
                let outcome = give_up(shared, message, id, f).await?;
                return Ok((outcome, failed));
            }
            tokio::time::sleep(delays.next().unwrap_or(shared.retry.max_delay)).await;
        }
        let mut tx = shared.pool.begin().await?;
        if for_another_consumer(shared, message) {
            finish(shared, tx, message).await?;
            shared.count(Counted::ForAnotherConsumer, 1);
            return Ok((Outcome::ForAnotherConsumer, failed));
        }
        let id = match id {
            Ok(id) => *id,
            Err(reason) => {
                dead_letter(shared, &mut tx, None, message, reason, 0).await?;
                finish(shared, tx, message).await?;
                shared.count(Counted::DeadLettered, 1);
                let reason = reason.clone();
                return Ok((Outcome::DeadLettered { reason }, failed));
            }
        };
        if store::record_ids(&mut tx, &shared.consumer, &[id])
            .await?
            .is_empty()
        {
            finish(shared, tx, message).await?;
            shared.count(Counted::Duplicate, 1);
            return Ok((Outcome::Duplicate, failed));
        }
        let (reason, poison) = match attempt(shared, inner, message, id, attempts + 1, tx).await? {
            Attempt::Succeeded(tx) => match finish(shared, tx, message).await {
                Ok(()) => {
                    shared.count(Counted::Handled, 1);
                    return Ok((Outcome::Handled, failed));
                }
                Err(error) => match refused_by_the_database(&error) {
                    Some(reason) => (reason, false),
                    None => return Err(error),
                },
            },
            Attempt::Failed { tx, reason, poison } => {
                if let Some(tx) = tx {
                    rollback(tx).await;
                }
                (reason, poison)
            }
        };
        failed += 1;
        shared.count(Counted::FailedAttempt, 1);
        tracing::warn!(
            consumer = %shared.consumer, topic = %message.topic,
            partition = message.partition, offset = message.offset,
            attempt = attempts + 1, %reason, poison, "handler failed"
        );
        failure = Some(Failure {
            attempts: attempts + 1,
            reason,
            poison,
        });
    }
}

/// Records the message's offset and commits.
async fn finish(
    shared: &Shared,
    mut tx: Transaction<'static, Postgres>,
    message: &Received,
) -> Result<(), InboxError> {
    store::record_offset(
        &mut tx,
        &shared.consumer,
        &message.topic,
        message.partition,
        message.offset + 1,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Dead-letters a message whose attempts are used up (or that can never
/// succeed): its id is recorded as handled so redeliveries skip it.
async fn give_up(
    shared: &Shared,
    message: &Received,
    id: &Result<Uuid, String>,
    failure: &Failure,
) -> Result<Outcome, InboxError> {
    let mut tx = shared.pool.begin().await?;
    let id = id.as_ref().ok().copied();
    if let Some(id) = id
        && store::record_ids(&mut tx, &shared.consumer, &[id])
            .await?
            .is_empty()
    {
        // Handled meanwhile by another consumer of the group.
        finish(shared, tx, message).await?;
        shared.count(Counted::Duplicate, 1);
        return Ok(Outcome::Duplicate);
    }
    let reason = if failure.poison {
        failure.reason.clone()
    } else {
        format!(
            "gave up after {} attempts: {}",
            failure.attempts, failure.reason
        )
    };
    dead_letter(shared, &mut tx, id, message, &reason, failure.attempts).await?;
    finish(shared, tx, message).await?;
    shared.count(Counted::DeadLettered, 1);
    tracing::error!(
        consumer = %shared.consumer, topic = %message.topic,
        partition = message.partition, offset = message.offset,
        %reason, "message dead-lettered"
    );
    Ok(Outcome::DeadLettered { reason })
}

/// Writes the dead-letter row (and publishes to `<topic>.dlq` if
/// configured) in the caller's transaction.
async fn dead_letter(
    shared: &Shared,
    conn: &mut PgConnection,
    id: Option<Uuid>,
    message: &Received,
    reason: &str,
    attempts: u32,
) -> Result<(), InboxError> {
    if let Some(producer) = &shared.dead_letter_producer {
        publish_dead_letter(producer, &shared.consumer, message, reason, attempts).await?;
    }
    store::dead_letter(conn, &shared.consumer, id, message, reason, attempts).await?;
    Ok(())
}

async fn publish_dead_letter(
    producer: &FutureProducer,
    consumer: &str,
    message: &Received,
    reason: &str,
    attempts: u32,
) -> Result<(), InboxError> {
    let topic = format!("{}.dlq", message.topic);
    let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 6);
    for (name, value) in &message.headers {
        headers = headers.insert(Header {
            key: name,
            value: value.as_deref(),
        });
    }
    let partition = message.partition.to_string();
    let offset = message.offset.to_string();
    let attempts = attempts.to_string();
    for (key, value) in [
        (dlq::ERROR, reason),
        (dlq::TOPIC, message.topic.as_str()),
        (dlq::PARTITION, partition.as_str()),
        (dlq::OFFSET, offset.as_str()),
        (dlq::ATTEMPTS, attempts.as_str()),
        (dlq::CONSUMER, consumer),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let mut record = FutureRecord::<[u8], [u8]>::to(&topic).headers(headers);
    if let Some(key) = &message.key {
        record = record.key(key.as_slice());
    }
    if let Some(payload) = &message.payload {
        record = record.payload(payload.as_slice());
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(error, _)| InboxError::DeadLetterTopic { topic, error })
}
