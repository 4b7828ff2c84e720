//! `InboxService`: dedup, transaction, retries and dead letters around a
//! handler.

use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use consign_outbox::headers;
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use sqlx::{Postgres, Transaction};

use crate::store::InboxBackend;
use tower::{Service, ServiceExt};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::delivery::{DecodeError, Rejected};
use crate::layer::{Counted, MissingId, Shared};
use crate::{BoxError, Delivery, InboxError, Received, store::InboxStore as _};

mod attempt;
mod batch;
mod one;

use crate::dead_letters::dead_letter;
use attempt::{Attempt, Failure, attempt, refused_by_the_database, rollback};
use batch::process_batch;
use one::process_one;

/// How long the inbox waits, after the handler returned, for its
/// [`Delivery`] (and so the transaction) to come back.
const DELIVERY_RETURN_TIMEOUT: Duration = Duration::from_secs(5);

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
#[non_exhaustive]
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
pub struct InboxService<S, DB: InboxBackend = Postgres> {
    shared: Arc<Shared<DB>>,
    inner: S,
}

impl<S: Clone, DB: InboxBackend> Clone for InboxService<S, DB> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            inner: self.inner.clone(),
        }
    }
}

impl<S, DB: InboxBackend> InboxService<S, DB> {
    pub(crate) fn new(shared: Arc<Shared<DB>>, inner: S) -> Self {
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
fn poll_inner<S, DB>(inner: &mut S, cx: &mut Context<'_>) -> Poll<Result<(), InboxError>>
where
    DB: InboxBackend,
    S: Service<Delivery<DB>>,
    S::Error: Into<BoxError>,
{
    inner
        .poll_ready(cx)
        .map_err(|error| InboxError::Service(error.into()))
}

impl<S, DB> Service<Received> for InboxService<S, DB>
where
    DB: InboxBackend,
    S: Service<Delivery<DB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = Outcome;
    type Error = InboxError;
    type Future = BoxFuture<'static, Result<Outcome, InboxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is also awaited before each further call of the handler
        // (retries, the messages of a batch).
        poll_inner::<S, DB>(&mut self.inner, cx)
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

impl<S, DB> Service<Vec<Received>> for InboxService<S, DB>
where
    DB: InboxBackend,
    S: Service<Delivery<DB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = BatchOutcome;
    type Error = InboxError;
    type Future = BoxFuture<'static, Result<BatchOutcome, InboxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        poll_inner::<S, DB>(&mut self.inner, cx)
    }

    fn call(&mut self, batch: Vec<Received>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        let mut inner = self.take_ready();
        Box::pin(async move { process_batch(&shared, &mut inner, batch).await })
    }
}

/// Whether `message` is a dead letter requeued for another consumer.
fn for_another_consumer<DB: InboxBackend>(shared: &Shared<DB>, message: &Received) -> bool {
    message
        .header_str(headers::REQUEUED_FOR)
        .is_some_and(|consumer| consumer != shared.consumer)
}

fn resolve_id<DB: InboxBackend>(shared: &Shared<DB>, message: &Received) -> Result<Uuid, String> {
    match (message.consign_id(), shared.missing_id) {
        (Ok(id), _) => Ok(id),
        (Err(_), MissingId::FromPosition) => Ok(message.position_id()),
        (Err(reason), MissingId::DeadLetter) => Err(reason),
    }
}
