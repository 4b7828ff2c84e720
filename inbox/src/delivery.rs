//! What a handler receives: the message and the open transaction.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use sqlx::{Postgres, Transaction};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::{InboxBackend, Received};

/// One message handed to the inner service, with the database transaction
/// that also records it as handled. `DB` is the inbox's database
/// ([`InboxBackend`]): PostgreSQL unless the [`InboxLayer`](crate::InboxLayer)
/// was built on a MySQL or SQLite pool, where handlers take a
/// `Delivery<sqlx::MySql>` or `Delivery<sqlx::Sqlite>`.
///
/// Write through [`Delivery::conn`]: those writes commit together with the
/// inbox's dedup record, or not at all. When the handler returns, the
/// transaction goes back to the inbox (it is returned when the `Delivery` is
/// dropped), which commits it after `Ok` and rolls it back after an error.
///
/// ```no_run
/// use consign_inbox::Delivery;
///
/// #[derive(serde::Deserialize)]
/// struct OrderCreated { sku: String, quantity: i32 }
///
/// async fn handle(mut delivery: Delivery) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
///     let order: OrderCreated = delivery.json()?; // undecodable → dead letter at once
///     sqlx::query("UPDATE stock SET available = available - $1 WHERE sku = $2")
///         .bind(order.quantity)
///         .bind(&order.sku)
///         .execute(delivery.conn())
///         .await?;
///     Ok(())
/// }
/// ```
#[derive(Debug)]
pub struct Delivery<DB: InboxBackend = Postgres> {
    message: Arc<Received>,
    id: Uuid,
    attempt: u32,
    tx: Option<Transaction<'static, DB>>,
    back: Option<oneshot::Sender<Returned<DB>>>,
    poison: Option<String>,
}

/// What a dropped [`Delivery`] hands back to the inbox.
#[derive(Debug)]
pub(crate) struct Returned<DB: InboxBackend> {
    pub(crate) tx: Transaction<'static, DB>,
    pub(crate) poison: Option<String>,
}

impl<DB: InboxBackend> Delivery<DB> {
    pub(crate) fn new(
        message: Arc<Received>,
        id: Uuid,
        attempt: u32,
        tx: Transaction<'static, DB>,
    ) -> (Self, oneshot::Receiver<Returned<DB>>) {
        let (back, receiver) = oneshot::channel();
        let delivery = Self {
            message,
            id,
            attempt,
            tx: Some(tx),
            back: Some(back),
            poison: None,
        };
        (delivery, receiver)
    }

    /// The message as read from Kafka.
    #[must_use]
    pub fn message(&self) -> &Received {
        &self.message
    }

    /// The message id the inbox deduplicates on (the `consign-id` header, or
    /// the id derived from the message's position, as configured).
    #[must_use]
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Which attempt this is, starting at 1.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The payload (empty for a tombstone).
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        self.message.payload.as_deref().unwrap_or_default()
    }

    /// The `consign-event-type` header.
    #[must_use]
    pub fn event_type(&self) -> Option<&str> {
        self.message.event_type()
    }

    /// The key as UTF-8 text.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        self.message.key_str()
    }

    /// The connection of the inbox's open transaction. Writes made through
    /// it commit atomically with the record that this message was handled.
    ///
    /// # Panics
    /// Never: the transaction is present until the `Delivery` is dropped.
    pub fn conn(&mut self) -> &mut DB::Connection {
        self.transaction()
    }

    /// The open transaction itself, e.g. to open a nested savepoint with
    /// `delivery.transaction().begin()`.
    ///
    /// # Panics
    /// Never: the transaction is present until the `Delivery` is dropped.
    pub fn transaction(&mut self) -> &mut Transaction<'static, DB> {
        self.tx
            .as_mut()
            .expect("the transaction is taken only when the Delivery is dropped")
    }

    /// Decodes the JSON payload. On failure the message is marked as
    /// undecodable: whatever the handler then returns, the inbox does not
    /// retry it but sends it to the dead letters with this error as the
    /// reason.
    ///
    /// # Errors
    /// [`DecodeError`] naming the type and serde's message.
    pub fn json<T: DeserializeOwned>(&mut self) -> Result<T, DecodeError> {
        serde_json::from_slice(self.payload()).map_err(|e| {
            let error = DecodeError(format!(
                "payload is not a valid {}: {e}",
                std::any::type_name::<T>()
            ));
            self.poison = Some(error.0.clone());
            error
        })
    }

    /// Marks the message as one that can never be handled (retrying cannot
    /// help) and returns the error to return from the handler. The inbox
    /// dead-letters it at once with `reason`.
    pub fn reject(&mut self, reason: impl Into<String>) -> Rejected {
        let reason = reason.into();
        self.poison = Some(reason.clone());
        Rejected(reason)
    }
}

impl<DB: InboxBackend> Drop for Delivery<DB> {
    fn drop(&mut self) {
        if let (Some(tx), Some(back)) = (self.tx.take(), self.back.take()) {
            // If the inbox is gone (its future was dropped), the transaction
            // is dropped here, which rolls it back.
            let _ = back.send(Returned {
                tx,
                poison: self.poison.take(),
            });
        }
    }
}

/// A payload that could not be decoded. The message goes to the dead
/// letters without retries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

/// A message the handler refused for good (see [`Delivery::reject`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rejected: {0}")]
pub struct Rejected(String);
