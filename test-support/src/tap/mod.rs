//! A Kafka protocol tap: a proxy between a client (a relay process) and a
//! broker that decodes what the client sends and records the transactional
//! traffic, so a test can work out what a `read_committed` consumer of a
//! broker that implements KIP-98 would see.
//!
//! Why: librdkafka's mock cluster accepts transactions but does not isolate
//! them (see `DEVELOPERS.md`), so a consumer cannot show whether a relay
//! committed whole batches. The tap shows it from the wire: which records
//! each transaction (transactional id, producer id, epoch) produced and
//! whether the broker acknowledged its commit. Under KIP-98 a
//! `read_committed` consumer sees exactly the records of committed
//! transactions, so that is the view [`KafkaTap::transactions`] gives.
//!
//! The tap forwards every frame unchanged, except `Metadata` and
//! `FindCoordinator` answers, whose broker addresses it rewrites to tap
//! listeners of their own, so every connection the client opens passes
//! through it.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Result, bail};
use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::Received;

mod protocol;

use protocol::{on_answer, on_request};

/// Largest frame the tap accepts (librdkafka's `message.max.bytes` default
/// is 1 MB; fetch answers are bounded by `fetch.max.bytes`, 50 MB).
const MAX_FRAME: usize = 128 << 20;

/// How long a connection whose client went away keeps waiting for the
/// broker's answers to requests already sent (an `EndTxn` in flight when
/// the relay was killed still takes effect on the broker).
const DRAIN_AFTER_CLIENT_GONE: Duration = Duration::from_secs(5);

/// One transaction as seen on the wire.
#[derive(Debug, Clone)]
pub struct TappedTransaction {
    /// The producer's `transactional.id`.
    pub transactional_id: String,
    /// Producer id and epoch the broker assigned.
    pub producer: (i64, i16),
    /// Records produced in the transaction, each once (retried produce
    /// requests are recognised by partition and base sequence). `offset`
    /// is -1: offsets are assigned by the broker.
    pub records: Vec<(String, Received)>,
    /// How it ended.
    pub outcome: Outcome,
}

/// How a transaction ended, as far as the wire shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `EndTxn(commit)` answered without error: visible to `read_committed`.
    Committed,
    /// `EndTxn(abort)` answered without error.
    Aborted,
    /// A commit was requested but no answer came back (the client died
    /// with it in flight): the broker may have committed it.
    CommitUnanswered,
    /// Never ended by its producer (killed inside the transaction): the
    /// broker aborts it when the transactional id is fenced or times out.
    Unfinished,
}

/// What the tap saw, in order.
#[derive(Debug)]
enum Event {
    Produce {
        transactional_id: String,
        producer: (i64, i16),
        partition: (String, i32),
        base_sequence: i32,
        records: Vec<Received>,
    },
    EndTxn {
        transactional_id: String,
        producer: (i64, i16),
        commit: bool,
        /// The broker's error code, once answered.
        answer: Option<i16>,
    },
}

#[derive(Default)]
struct State {
    /// Upstream broker address → tap listener.
    listeners: HashMap<String, SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    events: Vec<Event>,
    /// Frames the tap could not decode (it forwards them anyway).
    errors: Vec<String>,
    /// Produce requests forwarded and not yet answered, on open connections.
    produce_in_flight: usize,
}

type Shared = Arc<Mutex<State>>;

/// Locks `mutex`, also after a panic elsewhere (the tap's state stays usable).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running tap. Dropping it closes every listener and connection.
pub struct KafkaTap {
    bootstrap: String,
    state: Shared,
}

impl KafkaTap {
    /// Starts a listener for each broker of `bootstrap` (`host:port,...`).
    ///
    /// # Errors
    /// If a port cannot be bound.
    pub async fn start(bootstrap: &str) -> Result<Self> {
        let state = Shared::default();
        let mut local = Vec::new();
        for upstream in bootstrap.split(',').map(str::trim) {
            local.push(listener_for(&state, upstream)?.to_string());
        }
        Ok(Self {
            bootstrap: local.join(","),
            state,
        })
    }

    /// The `bootstrap.servers` value that routes a client through the tap.
    #[must_use]
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Frames the tap failed to decode; a test should expect none.
    #[must_use]
    pub fn errors(&self) -> Vec<String> {
        lock(&self.state).errors.clone()
    }

    /// Produce requests the broker has not answered yet: a batch is in
    /// flight while this is above zero.
    #[must_use]
    pub fn produce_in_flight(&self) -> usize {
        lock(&self.state).produce_in_flight
    }

    /// Every transaction seen so far, in the order they began.
    #[must_use]
    pub fn transactions(&self) -> Vec<TappedTransaction> {
        let state = lock(&self.state);
        let mut done: Vec<TappedTransaction> = Vec::new();
        // Open transactions by (transactional id, producer) → index in `done`.
        let mut open: HashMap<(&str, (i64, i16)), usize> = HashMap::new();
        // (transaction, topic, partition, base sequence) already recorded.
        let mut batches: HashSet<(usize, &str, i32, i32)> = HashSet::new();
        for event in &state.events {
            match event {
                Event::Produce {
                    transactional_id,
                    producer,
                    partition: (topic, partition),
                    base_sequence,
                    records,
                } => {
                    let index = *open
                        .entry((transactional_id, *producer))
                        .or_insert_with(|| {
                            done.push(TappedTransaction {
                                transactional_id: transactional_id.clone(),
                                producer: *producer,
                                records: Vec::new(),
                                outcome: Outcome::Unfinished,
                            });
                            done.len() - 1
                        });
                    if batches.insert((index, topic, *partition, *base_sequence)) {
                        let records = records.iter().map(|r| (topic.clone(), r.clone()));
                        done[index].records.extend(records);
                    }
                }
                Event::EndTxn {
                    transactional_id,
                    producer,
                    commit,
                    answer,
                } => {
                    let key = (transactional_id.as_str(), *producer);
                    // None: it ends a transaction that produced nothing.
                    let Some(&index) = open.get(&key) else {
                        continue;
                    };
                    match (answer, commit) {
                        (Some(0), true) => done[index].outcome = Outcome::Committed,
                        (Some(0), false) => done[index].outcome = Outcome::Aborted,
                        (None, true) => {
                            done[index].outcome = Outcome::CommitUnanswered;
                            continue;
                        }
                        // Refused (retried by the client, or fenced), or an
                        // abort without answer: still open.
                        (Some(_) | None, _) => continue,
                    }
                    open.remove(&key);
                }
            }
        }
        done
    }
}

impl Drop for KafkaTap {
    fn drop(&mut self) {
        for task in lock(&self.state).tasks.drain(..) {
            task.abort();
        }
    }
}

/// The tap listener forwarding to `upstream`, started on first use (on the
/// current tokio runtime; synchronous, as connections start listeners).
fn listener_for(state: &Shared, upstream: &str) -> Result<SocketAddr> {
    let mut guard = lock(state);
    if let Some(address) = guard.listeners.get(upstream) {
        return Ok(*address);
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let address = listener.local_addr()?;
    let task = tokio::spawn({
        let (state, upstream) = (Arc::clone(state), upstream.to_owned());
        async move {
            while let Ok((client, _)) = listener.accept().await {
                let connection =
                    tokio::spawn(connection(Arc::clone(&state), client, upstream.clone()));
                lock(&state).tasks.push(connection);
            }
        }
    });
    guard.listeners.insert(upstream.to_owned(), address);
    guard.tasks.push(task);
    Ok(address)
}

/// Requests sent on one connection and not yet answered:
/// correlation id → (api key, version, index of the `EndTxn` event).
type Pending = Mutex<HashMap<i32, (i16, i16, Option<usize>)>>;

/// Forwards one client connection; when it ends, its unanswered produce
/// requests no longer count as in flight.
async fn connection(state: Shared, client: TcpStream, upstream: String) {
    let pending = Pending::default();
    forward(Arc::clone(&state), &pending, client, upstream).await;
    let unanswered = lock(&pending)
        .values()
        .filter(|(key, ..)| *key == ApiKey::Produce as i16)
        .count();
    let mut state = lock(&state);
    state.produce_in_flight = state.produce_in_flight.saturating_sub(unanswered);
}

async fn forward(state: Shared, pending: &Pending, client: TcpStream, upstream: String) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = {
        let state = Arc::clone(&state);
        async move {
            while let Ok(frame) = read_frame(&mut client_read).await {
                if let Err(error) = on_request(&state, pending, &frame) {
                    lock(&state).errors.push(format!("request: {error:#}"));
                }
                if write_frame(&mut server_write, &frame).await.is_err() {
                    break;
                }
            }
            server_write
        }
    };
    let is_idle = || lock(pending).is_empty();
    let answers = async {
        let mut client_gone = false;
        while let Ok(frame) = read_frame(&mut server_read).await {
            let frame = match on_answer(&state, pending, frame.clone()) {
                Ok(rewritten) => rewritten,
                Err(error) => {
                    lock(&state).errors.push(format!("answer: {error:#}"));
                    frame
                }
            };
            client_gone = client_gone || write_frame(&mut client_write, &frame).await.is_err();
            if client_gone && is_idle() {
                break;
            }
        }
    };
    // When the client goes away, go on reading the broker's answers to what
    // it already sent (an `EndTxn` in flight still takes effect), then close.
    tokio::pin!(answers);
    let server_write = tokio::select! {
        server_write = requests => server_write,
        () = &mut answers => return,
    };
    if !is_idle() {
        let _ = tokio::time::timeout(DRAIN_AFTER_CLIENT_GONE, answers).await;
    }
    drop(server_write);
}

async fn read_frame(reader: &mut (impl AsyncRead + Unpin)) -> Result<Bytes> {
    let length = usize::try_from(reader.read_u32().await?)?;
    if length > MAX_FRAME {
        bail!("frame of {length} bytes");
    }
    let mut frame = vec![0; length];
    reader.read_exact(&mut frame).await?;
    Ok(frame.into())
}

async fn write_frame(writer: &mut (impl AsyncWrite + Unpin), frame: &[u8]) -> Result<()> {
    writer.write_u32(u32::try_from(frame.len())?).await?;
    writer.write_all(frame).await?;
    Ok(())
}
