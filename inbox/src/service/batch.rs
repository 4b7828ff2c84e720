//! A batch in one transaction, redone one message at a time after a failure.

use super::*;

/// A batch: one transaction while every handler succeeds; after a failure,
/// the batch is redone one message per transaction.
pub(super) async fn process_batch<S, DB>(
    shared: &Shared<DB>,
    inner: &mut S,
    batch: Vec<Received>,
) -> Result<BatchOutcome, InboxError>
where
    DB: InboxBackend,
    S: Service<Delivery<DB>>,
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
pub(super) async fn whole_batch<S, DB>(
    shared: &Shared<DB>,
    inner: &mut S,
    messages: &[Arc<Received>],
    ids: &[Result<Uuid, String>],
) -> Result<Result<BatchOutcome, Option<(usize, Failure)>>, InboxError>
where
    DB: InboxBackend,
    S: Service<Delivery<DB>>,
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
        tx.record_ids(&shared.consumer, &valid).await?
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
                    after_earlier_error,
                } => {
                    if let Some(back) = back {
                        rollback(back).await;
                    }
                    shared.count(Counted::FailedAttempt, 1);
                    if after_earlier_error {
                        // An earlier handler of the batch swallowed an SQL
                        // error; redone alone, each message shows its own.
                        tracing::warn!(
                            consumer = %shared.consumer, %reason,
                            "the batch's transaction had failed earlier; redoing it one message at a time"
                        );
                        return Ok(Err(None));
                    }
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
            let Some(reason) = refused_by_the_database::<DB>(&error) else {
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
pub(super) async fn settle_batch<DB: InboxBackend>(
    shared: &Shared<DB>,
    mut tx: Transaction<'static, DB>,
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
        tx.record_offset(&shared.consumer, topic, partition, next)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) fn count<DB: InboxBackend>(shared: &Shared<DB>, outcome: &BatchOutcome) {
    shared.count(Counted::Handled, outcome.handled);
    shared.count(Counted::Duplicate, outcome.duplicates);
    shared.count(Counted::DeadLettered, outcome.dead_lettered);
    shared.count(Counted::ForAnotherConsumer, outcome.for_another_consumer);
}
