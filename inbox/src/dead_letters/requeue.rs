//! Requeue: dead letters back on their topic through the outbox (see the
//! module docs of [`dead_letters`](super)).

use chrono::{DateTime, Utc};
use consign_outbox::{Message, Outbox, headers};
use serde::Serialize;

use sqlx::Pool;
use uuid::Uuid;

use super::{Selection, stored};
use crate::store::{InboxBackend, InboxStore as _, StoredLetter};

/// What a requeue did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Requeued {
    /// Dead-letter ids now in the outbox again, with their message ids.
    pub requeued: Vec<(i64, Uuid)>,
    /// Dead-letter ids left in place, with the reason.
    pub skipped: Vec<(i64, String)>,
}

/// The outbox message a letter becomes, or why it cannot.
fn to_message(letter: &StoredLetter) -> Result<Message, String> {
    let key = match &letter.key {
        None => None,
        Some(bytes) => Some(
            String::from_utf8(bytes.clone())
                .map_err(|_| "its key is not UTF-8 (outbox keys are text)".to_owned())?,
        ),
    };
    let (mut event_type, mut traceparent, mut tracestate) = (None, None, None);
    let mut user = Vec::new();
    for header in stored::decode(&letter.headers)? {
        let name = header.name();
        let Some(value) = header.text() else {
            return Err(format!(
                "header {name:?} is binary (outbox headers are text)"
            ));
        };
        match name {
            headers::EVENT_TYPE => event_type = Some(value.to_owned()),
            headers::TRACEPARENT => traceparent = Some(value.to_owned()),
            headers::TRACESTATE => tracestate = Some(value.to_owned()),
            n if n.starts_with(headers::RESERVED_PREFIX) => {}
            n => user.push((n.to_owned(), value.to_owned())),
        }
    }
    let event_type = event_type
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let payload = letter.payload.clone().unwrap_or_default();
    let mut msg = Message::new(&letter.topic, event_type, payload)
        .with_id(letter.message_id.unwrap_or_else(Uuid::now_v7))
        .requeued_for(&letter.consumer);
    if let Some(key) = key {
        msg = msg.with_key(key);
    }
    for (name, value) in user {
        msg = msg.with_header(name, value);
    }
    if let Some(traceparent) = traceparent {
        msg = msg.with_trace_context(traceparent, tracestate);
    }
    Ok(msg)
}

/// Requeues the selected dead letters (see the module docs) through
/// `outbox`, in one transaction. Letters that cannot become outbox
/// messages (a binary key or header, or a message `outbox` refuses, e.g.
/// over its payload limit) stay, with the reason in [`Requeued::skipped`].
///
/// # Errors
/// [`consign_outbox::Error::Database`] on a database error (nothing is
/// changed then).
pub async fn requeue<DB: InboxBackend>(
    pool: &Pool<DB>,
    outbox: &Outbox,
    selection: &Selection,
) -> consign_outbox::Result<Requeued> {
    let mut tx = DB::begin_write(pool).await?;
    let mut done = Requeued::default();
    // A page at a time, so `--all` over many large letters holds at most
    // REQUEUE_PAGE of them in memory.
    let mut after: Option<(DateTime<Utc>, i64)> = None;
    loop {
        let letters = tx.lock_dead_letters(selection, after, REQUEUE_PAGE).await?;
        let Some(last) = letters.last() else {
            break;
        };
        after = Some((last.failed_at, last.id));
        requeue_page::<DB>(&mut tx, outbox, &letters, &mut done).await?;
    }
    tx.commit().await?;
    Ok(done)
}

/// Letters read per page by [`requeue`].
const REQUEUE_PAGE: i64 = 100;

async fn requeue_page<DB: InboxBackend>(
    tx: &mut DB::Connection,
    outbox: &Outbox,
    letters: &[StoredLetter],
    done: &mut Requeued,
) -> consign_outbox::Result<()> {
    let mut messages = Vec::with_capacity(letters.len());
    let mut taken = Vec::with_capacity(letters.len());
    for letter in letters {
        let checked = to_message(letter).and_then(|msg| {
            outbox
                .validate(&msg)
                .map(|()| msg)
                .map_err(|e| e.to_string())
        });
        match checked {
            Ok(msg) => {
                messages.push(msg);
                taken.push(letter);
            }
            Err(reason) => done.skipped.push((letter.id, reason)),
        }
    }
    let ids = outbox.enqueue_batch(&mut *tx, &messages).await?;
    for (letter, id) in taken.into_iter().zip(ids) {
        tx.forget_dead_letter(letter.id, &letter.consumer, id)
            .await?;
        done.requeued.push((letter.id, id));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn letter(key: Option<&[u8]>, headers: Value) -> StoredLetter {
        StoredLetter {
            id: 1,
            failed_at: Utc::now(),
            consumer: "c".into(),
            message_id: Some(Uuid::now_v7()),
            topic: "t".into(),
            key: key.map(<[u8]>::to_vec),
            headers,
            payload: Some(b"{}".to_vec()),
        }
    }

    #[test]
    fn letters_become_outbox_messages_with_their_headers_sorted_out() {
        let headers = json!([
            {"name": "consign-id", "value": "x"},
            {"name": "consign-event-type", "value": "OrderPlaced"},
            {"name": "traceparent", "value": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
            {"name": "tenant", "value": "acme"},
            {"name": "consign-requeued-for", "value": "an earlier requeue's consumer"},
        ]);
        let msg = to_message(&letter(Some(b"order-1"), headers)).unwrap();
        assert_eq!(msg.key(), Some("order-1"));
        assert_eq!(msg.event_type(), "OrderPlaced");
        assert!(msg.traceparent().unwrap().starts_with("00-4bf92f"));
        assert_eq!(msg.requeued_for_consumer(), Some("c"));
        let user: Vec<_> = msg.headers().iter().collect();
        assert_eq!(user, [(&"tenant".to_owned(), &"acme".to_owned())]);
        Outbox::new().validate(&msg).unwrap();
    }

    #[test]
    fn letters_that_cannot_be_outbox_messages_say_why() {
        let binary = json!([{"name": "sig", "base64": "AAE="}]);
        let error = to_message(&letter(None, binary)).err().unwrap();
        assert!(error.contains("\"sig\" is binary"), "{error}");
        let error = to_message(&letter(Some(&[0xff, 0xfe]), json!([])))
            .err()
            .unwrap();
        assert!(error.contains("not UTF-8"), "{error}");
    }
}
