//! Dead-lettering a message: the `consign_dead_letters` row and the
//! optional `<topic>.dlq` copy, in the handler's transaction.

use std::time::Duration;

use consign_outbox::headers::{self, dlq};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

use crate::{
    InboxError, Received,
    layer::Shared,
    store::{InboxBackend, InboxStore as _},
};

/// Writes the dead-letter row (and publishes to `<topic>.dlq` if
/// configured) in the caller's transaction.
pub(crate) async fn dead_letter<DB: InboxBackend>(
    shared: &Shared<DB>,
    conn: &mut DB::Connection,
    id: Option<Uuid>,
    message: &Received,
    reason: &str,
    attempts: u32,
) -> Result<(), InboxError> {
    if let Some(producer) = &shared.dead_letter_producer {
        publish_dead_letter(producer, &shared.consumer, message, reason, attempts).await?;
    }
    conn.insert_dead_letter(&shared.consumer, id, message, reason, attempts)
        .await?;
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
    // A requeue's addressee is not the `.dlq` topic's readers'.
    for (name, value) in message
        .headers
        .iter()
        .filter(|(name, _)| name != headers::REQUEUED_FOR)
    {
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
