//! [`Outbox`]: validates messages and writes them on the caller's connection.

use uuid::Uuid;

use tracing::Instrument as _;

use crate::{Error, Event, Message, Result, store::OutboxConnection, validate::Limits};

/// Writes messages into the outbox table on a connection you own, normally
/// inside the transaction that changes your business rows.
///
/// Cheap to clone; holds only the validation limits. Each call is one
/// `INSERT` (one round trip), a batch included.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use consign_outbox::{Message, Outbox};
///
/// let outbox = Outbox::new();
/// let mut tx = pool.begin().await?;
/// sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
///     .execute(&mut *tx)
///     .await?;
/// outbox
///     .enqueue(&mut *tx, Message::new("accounts", "Debited", b"{}".to_vec()).with_key("1"))
///     .await?;
/// tx.commit().await?; // the event exists if and only if this commit succeeds
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    limits: Limits,
}

impl Outbox {
    /// An outbox with the default [`Limits`].
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder to change the limits.
    pub fn builder() -> OutboxBuilder {
        OutboxBuilder::default()
    }

    /// The limits messages are checked against.
    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks a message without writing it.
    ///
    /// # Errors
    /// The first rule the message breaks (see [`Error`]).
    pub fn validate(&self, msg: &Message) -> Result<()> {
        self.limits.check(msg)
    }

    /// Validates `msg` and inserts it. Returns its id.
    ///
    /// Unless the message carries a trace context already
    /// ([`Message::with_trace_context`]), the current span's W3C trace
    /// context (through `tracing-opentelemetry`, or the current
    /// OpenTelemetry context) is stored with it; the relay sends it as the
    /// `traceparent`/`tracestate` headers and the inbox continues the trace.
    ///
    /// # Errors
    /// A validation error (nothing was sent; the transaction is intact) or
    /// [`Error::Database`] (the transaction is aborted).
    pub async fn enqueue<C>(&self, conn: &mut C, msg: Message) -> Result<Uuid>
    where
        C: OutboxConnection + ?Sized,
    {
        let msg = with_current_trace(msg);
        self.validate(&msg)?;
        let id = msg.id();
        conn.insert_messages(std::slice::from_ref(&msg))
            .instrument(enqueue_span(std::slice::from_ref(&msg)))
            .await?;
        Ok(id)
    }

    /// Validates every message, then inserts them all with one statement, in
    /// the given order. Returns their ids in the same order. The current
    /// trace context is stored as with [`Outbox::enqueue`].
    ///
    /// # Errors
    /// [`Error::InBatch`] naming the first invalid message (nothing was
    /// written), or [`Error::Database`].
    pub async fn enqueue_batch<C>(&self, conn: &mut C, msgs: &[Message]) -> Result<Vec<Uuid>>
    where
        C: OutboxConnection + ?Sized,
    {
        for (index, msg) in msgs.iter().enumerate() {
            self.validate(msg).map_err(|source| Error::InBatch {
                index,
                source: Box::new(source),
            })?;
        }
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let traced: Vec<Message>;
        let msgs = match crate::trace::current() {
            Some(trace) if msgs.iter().any(|m| m.traceparent().is_none()) => {
                traced = msgs.iter().map(|m| with_trace(m.clone(), &trace)).collect();
                &traced[..]
            }
            _ => msgs,
        };
        conn.insert_messages(msgs)
            .instrument(enqueue_span(msgs))
            .await?;
        Ok(msgs.iter().map(Message::id).collect())
    }

    /// Serializes a typed [`Event`] as JSON and enqueues it.
    ///
    /// # Errors
    /// As [`Outbox::enqueue`], plus [`Error::Serialize`].
    pub async fn enqueue_event<C, E>(&self, conn: &mut C, event: &E) -> Result<Uuid>
    where
        C: OutboxConnection + ?Sized,
        E: Event,
    {
        self.enqueue(conn, Message::from_event(event)?).await
    }
}

/// Configures an [`Outbox`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct OutboxBuilder {
    limits: Limits,
}

impl OutboxBuilder {
    /// Largest payload accepted, in bytes (default 900 KiB). Keep it, plus
    /// key and headers, under the topic's `max.message.bytes`.
    pub fn max_payload_bytes(mut self, limit: usize) -> Self {
        self.limits.max_payload_bytes = limit;
        self
    }

    /// Largest key accepted, in bytes (default 4096).
    pub fn max_key_bytes(mut self, limit: usize) -> Self {
        self.limits.max_key_bytes = limit;
        self
    }

    /// Largest total of header names and values, in bytes (default 64 KiB).
    pub fn max_header_bytes(mut self, limit: usize) -> Self {
        self.limits.max_header_bytes = limit;
        self
    }

    /// The configured outbox.
    #[must_use]
    pub fn build(self) -> Outbox {
        Outbox {
            limits: self.limits,
        }
    }
}

/// The `consign.enqueue` span around the insert. Entered after the trace
/// context was captured, so the stored context is the caller's span.
fn enqueue_span(msgs: &[Message]) -> tracing::Span {
    let first = msgs.first();
    tracing::info_span!(
        "consign.enqueue",
        messages = msgs.len(),
        topic = first.map(Message::topic),
        message_id = first.map(|m| tracing::field::display(m.id())),
    )
}

/// `msg` with the current trace context, unless it has one.
fn with_current_trace(msg: Message) -> Message {
    if msg.traceparent().is_some() {
        return msg;
    }
    match crate::trace::current() {
        Some(trace) => with_trace(msg, &trace),
        None => msg,
    }
}

fn with_trace(msg: Message, (traceparent, tracestate): &(String, Option<String>)) -> Message {
    if msg.traceparent().is_some() {
        return msg;
    }
    msg.with_trace_context(traceparent.clone(), tracestate.clone())
}
