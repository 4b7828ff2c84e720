//! One call of the handler in a transaction, and what its failures mean.

use super::*;

/// A failed handler attempt.
pub(super) struct Failure {
    pub(super) attempts: u32,
    pub(super) reason: String,
    /// Retrying cannot help (undecodable, rejected).
    pub(super) poison: bool,
}

pub(super) enum Attempt<DB: InboxBackend> {
    Succeeded(Transaction<'static, DB>),
    Failed {
        tx: Option<Transaction<'static, DB>>,
        reason: String,
        poison: bool,
        /// The handler's statements were refused because an earlier
        /// statement of the transaction had failed (SQLSTATE 25P02): in a
        /// batch, the fault may be an earlier message's.
        after_earlier_error: bool,
    },
}

/// Calls the handler once with `tx`, catching panics, and takes the
/// transaction back.
pub(super) async fn attempt<S, DB>(
    shared: &Shared<DB>,
    inner: &mut S,
    message: &Arc<Received>,
    id: Uuid,
    number: u32,
    tx: Transaction<'static, DB>,
) -> Result<Attempt<DB>, InboxError>
where
    DB: InboxBackend,
    S: Service<Delivery<DB>>,
    S::Error: Into<BoxError>,
{
    let ready = ServiceExt::<Delivery<DB>>::ready(inner)
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
            after_earlier_error: false,
        });
    };
    Ok(match result {
        Ok(None) => {
            let mut tx = returned.tx;
            if tx.still_open().await? {
                Attempt::Succeeded(tx)
            } else {
                Attempt::Failed {
                    tx: Some(tx),
                    reason: "the database rolled the transaction back while the handler ran \
                             (a deadlock the handler did not return): its writes and the \
                             inbox's records are gone"
                        .into(),
                    poison: false,
                    after_earlier_error: true,
                }
            }
        }
        Ok(Some(error)) => {
            let poison =
                returned.poison.is_some() || error.is::<DecodeError>() || error.is::<Rejected>();
            Attempt::Failed {
                tx: Some(returned.tx),
                after_earlier_error: !poison && in_failed_transaction::<DB>(&*error),
                reason: returned.poison.unwrap_or_else(|| error_chain(&*error)),
                poison,
            }
        }
        Err(panic) => Attempt::Failed {
            tx: Some(returned.tx),
            reason: format!("handler panicked: {panic}"),
            poison: false,
            after_earlier_error: false,
        },
    })
}

/// Whether `error` (or a cause of it) is the database refusing a statement
/// because the transaction had already failed (PostgreSQL's SQLSTATE 25P02).
fn in_failed_transaction<DB: InboxBackend>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(sqlx::Error::Database(database)) = error.downcast_ref::<sqlx::Error>()
            && DB::is_after_earlier_error(&**database)
        {
            return true;
        }
        next = error.source();
    }
    false
}

pub(super) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

pub(super) async fn rollback<DB: InboxBackend>(tx: Transaction<'static, DB>) {
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
pub(super) fn refused_by_the_database<DB: InboxBackend>(error: &InboxError) -> Option<String> {
    let InboxError::Database(sqlx::Error::Database(database)) = error else {
        return None;
    };
    // The server answered: the transaction's content is at fault unless the
    // answer is about the server or the connection.
    if DB::is_infrastructure(&**database) {
        return None;
    }
    let code = database
        .code()
        .map(|code| format!(" (code {code})"))
        .unwrap_or_default();
    Some(format!(
        "the handler returned Ok but its transaction could not be committed: {}{code}",
        database.message()
    ))
}
