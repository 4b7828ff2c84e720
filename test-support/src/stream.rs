//! A stream of keyed events written to the outbox, and the check that it
//! reached a topic whole and in order per key.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use consign_outbox::{Message, Outbox};
use sqlx::PgPool;
use uuid::Uuid;

use crate::TopicReader;

/// How to write a stream: `count` events over `keys` keys (round robin),
/// `per_tx` per transaction, sleeping `pace` after each transaction.
#[derive(Debug, Clone, Copy)]
pub struct Stream {
    count: usize,
    keys: usize,
    per_tx: usize,
    pace: Duration,
    first_key: usize,
}

impl Stream {
    /// `count` events over `keys` keys, 10 per transaction, no pause.
    #[must_use]
    pub fn new(count: usize, keys: usize) -> Self {
        Self {
            count,
            keys,
            per_tx: 10,
            pace: Duration::ZERO,
            first_key: 0,
        }
    }

    /// Numbers the keys from `first` (`key-{first}`, ...), so that
    /// concurrent writers can each own their keys.
    #[must_use]
    pub fn first_key(self, first: usize) -> Self {
        Self {
            first_key: first,
            ..self
        }
    }

    /// Events per transaction.
    #[must_use]
    pub fn per_tx(self, per_tx: usize) -> Self {
        Self { per_tx, ..self }
    }

    /// Pause after each transaction.
    #[must_use]
    pub fn pace(self, pace: Duration) -> Self {
        Self { pace, ..self }
    }
}

impl Stream {
    /// The stream's transactions, in order: each the messages of one.
    #[must_use]
    pub fn batches(self, topic: &str) -> Batches {
        Batches {
            stream: self,
            topic: topic.to_owned(),
            written: 0,
            next: HashMap::new(),
        }
    }

    /// The pause after each transaction.
    #[must_use]
    pub fn pause(&self) -> Duration {
        self.pace
    }
}

/// The transactions of a [`Stream`]; the payload is the event's number
/// within its key (1, 2, 3, ...).
#[derive(Debug)]
pub struct Batches {
    stream: Stream,
    topic: String,
    written: usize,
    next: HashMap<String, u32>,
}

impl Iterator for Batches {
    type Item = Vec<Message>;

    fn next(&mut self) -> Option<Vec<Message>> {
        let Self {
            stream,
            topic,
            written,
            next,
        } = self;
        if *written >= stream.count {
            return None;
        }
        let msgs: Vec<Message> = (0..stream.per_tx.min(stream.count - *written))
            .map(|i| {
                let key = format!("key-{}", stream.first_key + (*written + i) % stream.keys);
                let n = next.entry(key.clone()).or_default();
                *n += 1;
                Message::new(topic.as_str(), "Streamed", n.to_string()).with_key(key)
            })
            .collect();
        *written += msgs.len();
        Some(msgs)
    }
}

/// Writes `stream` to `topic` (see [`Batches`]). Returns the ids in write
/// order.
///
/// # Panics
/// If the database refuses a write.
pub async fn write_stream(pool: PgPool, topic: String, stream: Stream) -> Vec<Uuid> {
    let outbox = Outbox::new();
    let mut ids = Vec::with_capacity(stream.count);
    for msgs in stream.batches(&topic) {
        let mut tx = pool.begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, &msgs).await.unwrap();
        tx.commit().await.unwrap();
        ids.extend(msgs.iter().map(Message::id));
        tokio::time::sleep(stream.pace).await;
    }
    ids
}

/// `count` keys (`acct-0`, `acct-1`, ...) that all hash to outbox partition
/// `partition`, so that one relay batch is one Kafka transaction.
#[must_use]
pub fn keys_of_outbox_partition(partition: i16, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("acct-{i}"))
        .filter(|k| consign_outbox::partition_for(Some(k), &Uuid::nil()) == partition)
        .take(count)
        .collect()
}

/// Asserts every id arrived and, per key, after dropping duplicates by id,
/// the payloads read 1, 2, 3, ...
///
/// # Panics
/// If an event is missing or a key's events are out of order.
pub fn assert_complete_and_ordered(ids: &[Uuid], reader: &TopicReader) {
    let mut seen = HashSet::new();
    let mut per_key: HashMap<String, Vec<u32>> = HashMap::new();
    for r in reader
        .received()
        .iter()
        .filter(|r| seen.insert(r.id().unwrap()))
    {
        let n = std::str::from_utf8(&r.payload).unwrap().parse().unwrap();
        per_key.entry(r.key.clone().unwrap()).or_default().push(n);
    }
    let missing = ids.iter().filter(|id| !seen.contains(id)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} events never reached the topic",
        ids.len()
    );
    for (key, ns) in per_key {
        let expected: Vec<u32> = (1..=u32::try_from(ns.len()).unwrap()).collect();
        assert_eq!(ns, expected, "events of {key} out of order");
    }
}
