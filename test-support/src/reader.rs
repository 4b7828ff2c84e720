//! Reads back what really reached a topic, from the first offset.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    message::Headers,
    metadata::Metadata,
};
use uuid::Uuid;

/// One message as consumed from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Kafka partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Message key as UTF-8.
    pub key: Option<String>,
    /// Payload bytes (empty if none).
    pub payload: Vec<u8>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Message timestamp in milliseconds.
    pub timestamp: Option<i64>,
}

impl Received {
    /// The first header called `name`, as UTF-8.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The `consign-id` header.
    #[must_use]
    pub fn id(&self) -> Option<Uuid> {
        self.header(consign_outbox::headers::ID)
            .and_then(|s| s.parse().ok())
    }
}

/// Consumes every partition of one topic from the beginning and keeps what
/// it read. No consumer group offsets are committed.
pub struct TopicReader {
    consumer: StreamConsumer,
    topic: String,
    partitions: Vec<i32>,
    received: Vec<Received>,
    ids: HashSet<Uuid>,
    next_offset: HashMap<i32, i64>,
}

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicReader")
            .field("topic", &self.topic)
            .field("received", &self.received.len())
            .finish_non_exhaustive()
    }
}

impl TopicReader {
    /// Assigns every partition of `topic` (which must exist) from offset 0,
    /// reading with `read_committed`.
    ///
    /// # Errors
    /// If the topic's metadata cannot be read within 30 s.
    pub fn new(bootstrap: &str, topic: &str) -> Result<Self> {
        Self::open(bootstrap, topic, "read_committed")
    }

    /// Like [`TopicReader::new`], but with `read_uncommitted`: it also sees
    /// the records of aborted and still open transactions, as a consumer
    /// without isolation would.
    ///
    /// # Errors
    /// If the topic's metadata cannot be read within 30 s.
    pub fn uncommitted(bootstrap: &str, topic: &str) -> Result<Self> {
        Self::open(bootstrap, topic, "read_uncommitted")
    }

    fn open(bootstrap: &str, topic: &str, isolation: &str) -> Result<Self> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set(
                "group.id",
                format!("consign-test-reader-{}", Uuid::now_v7()),
            )
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", isolation)
            .set("fetch.wait.max.ms", "10")
            .create()
            .context("reader consumer")?;
        // A slow broker (tests add latency to the mock cluster) can miss one
        // attempt's timeout: retry until the deadline, not just on "no
        // partitions yet".
        let deadline = Instant::now() + Duration::from_secs(30);
        let partitions = loop {
            let found = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .map(|metadata| partitions_of(&metadata, topic));
            let last = match found {
                Ok(found) if !found.is_empty() => break found,
                Ok(_) => "no partitions".to_owned(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!("topic {topic}: no partitions after 30 s (last attempt: {last})");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut assignment = TopicPartitionList::new();
        for &p in &partitions {
            assignment.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
            partitions,
            received: Vec::new(),
            ids: HashSet::new(),
            next_offset: HashMap::new(),
        })
    }

    /// Everything read so far, in arrival order.
    #[must_use]
    pub fn received(&self) -> &[Received] {
        &self.received
    }

    /// The `consign-id`s of `key`'s messages in the order they first
    /// arrived (a duplicate does not count again).
    ///
    /// # Panics
    /// If one of them has no `consign-id` header.
    #[must_use]
    pub fn first_arrivals(&self, key: &str) -> Vec<Uuid> {
        let mut ids = Vec::new();
        for id in self
            .received
            .iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .map(|r| r.id().expect("a message without a consign-id header"))
        {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// Distinct `consign-id`s read so far.
    #[must_use]
    pub fn distinct(&self) -> usize {
        self.ids.len()
    }

    /// Messages read more than once (by `consign-id`).
    #[must_use]
    pub fn duplicates(&self) -> usize {
        self.received.len() - self.ids.len()
    }

    /// Reads until `n` distinct ids have arrived, then on to the current end
    /// of every partition (so duplicates written so far are counted).
    ///
    /// # Errors
    /// If fewer than `n` arrived within `timeout`.
    pub async fn read_distinct(&mut self, n: usize, timeout: Duration) -> Result<&[Received]> {
        let deadline = Instant::now() + timeout;
        while self.ids.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.read_one(left).await? {
                bail!(
                    "only {} of {n} distinct messages reached {} within {timeout:?}",
                    self.ids.len(),
                    self.topic
                );
            }
        }
        self.read_to_end(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(10)),
        )
        .await?;
        Ok(&self.received)
    }

    /// Reads up to the current high watermark of every partition.
    ///
    /// # Errors
    /// If the end is not reached within `timeout`.
    pub async fn read_to_end(&mut self, timeout: Duration) -> Result<&[Received]> {
        let deadline = Instant::now() + timeout;
        let mut ends = HashMap::new();
        for &p in &self.partitions {
            let (_, high) =
                self.consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(10))?;
            ends.insert(p, high);
        }
        while ends.iter().any(|(p, high)| self.progress(*p) < *high) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("did not reach the end of {} within {timeout:?}", self.topic);
            }
            // Short reads: when the log ends with a transaction marker, no
            // message comes, but polling moves the position past it.
            self.read_one(left.min(Duration::from_millis(200))).await?;
        }
        Ok(&self.received)
    }

    /// Next offset to read in partition `p`: after the last message read,
    /// or further if the consumer skipped control records.
    fn progress(&self, p: i32) -> i64 {
        let read = self.next_offset.get(&p).copied().unwrap_or(0);
        let position = self
            .consumer
            .position()
            .ok()
            .and_then(|tpl| {
                tpl.find_partition(&self.topic, p)
                    .and_then(|e| e.offset().to_raw())
            })
            .unwrap_or(0);
        read.max(position)
    }

    /// Reads one message; false on timeout. Consumer errors (brokers down in
    /// a fault test) are printed and reading goes on.
    async fn read_one(&mut self, timeout: Duration) -> Result<bool> {
        let Ok(message) = tokio::time::timeout(timeout, self.consumer.recv()).await else {
            return Ok(false);
        };
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                eprintln!("reader of {}: {error} (continuing)", self.topic);
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok(true);
            }
        };
        let headers = message
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        let received = Received {
            partition: message.partition(),
            offset: message.offset(),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: message.payload().unwrap_or_default().to_vec(),
            headers,
            timestamp: message.timestamp().to_millis(),
        };
        self.next_offset
            .insert(received.partition, received.offset + 1);
        if let Some(id) = received.id() {
            self.ids.insert(id);
        }
        self.received.push(received);
        Ok(true)
    }
}

/// The partitions of `topic` in `metadata`, none if it reports an error.
fn partitions_of(metadata: &Metadata, topic: &str) -> Vec<i32> {
    metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect()
}
