//! One message in transactions of its own: retries, then the dead letters.

use super::*;

/// One message in transactions of its own: retried with backoff, then
/// dead-lettered. Returns the outcome and the failed attempts it took.
pub(super) async fn process_one<S, DB>(
    shared: &Shared<DB>,
    inner: &mut S,
    message: &Arc<Received>,
    id: &Result<Uuid, String>,
    prior: Option<Failure>,
) -> Result<(Outcome, u64), InboxError>
where
    DB: InboxBackend,
    S: Service<Delivery<DB>>,
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
        if tx.record_ids(&shared.consumer, &[id]).await?.is_empty() {
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
                Err(error) => match refused_by_the_database::<DB>(&error) {
                    Some(reason) => (reason, false),
                    None => return Err(error),
                },
            },
            Attempt::Failed {
                tx, reason, poison, ..
            } => {
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
pub(super) async fn finish<DB: InboxBackend>(
    shared: &Shared<DB>,
    mut tx: Transaction<'static, DB>,
    message: &Received,
) -> Result<(), InboxError> {
    tx.record_offset(
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
pub(super) async fn give_up<DB: InboxBackend>(
    shared: &Shared<DB>,
    message: &Received,
    id: &Result<Uuid, String>,
    failure: &Failure,
) -> Result<Outcome, InboxError> {
    let mut tx = shared.pool.begin().await?;
    let id = id.as_ref().ok().copied();
    if let Some(id) = id
        && tx.record_ids(&shared.consumer, &[id]).await?.is_empty()
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
