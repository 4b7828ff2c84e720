//! librdkafka's in-process mock cluster, run on a thread of its own.

use std::{
    sync::mpsc::{self, Sender},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use rdkafka::{mocking::MockCluster, types::RDKafkaRespErr};

type Reply = Sender<Result<()>>;

enum Command {
    CreateTopic(String, i32, Reply),
    BrokerDown(i32, Reply),
    BrokerUp(i32, Reply),
    TopicError(String, RDKafkaRespErr, Reply),
    RoundTrip(i32, Duration, Reply),
    ProduceErrors(Vec<RDKafkaRespErr>, Reply),
    Stop,
}

/// librdkafka's mock cluster, hosted on its own thread so the handle is
/// `Send + Sync`. Its brokers listen on loopback TCP ports, so a relay in
/// another process can connect. Dropped, it shuts down.
pub struct MockKafka {
    bootstrap: String,
    brokers: i32,
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("bootstrap", &self.bootstrap)
            .finish()
    }
}

impl MockKafka {
    /// Starts a cluster of `brokers` brokers (ids 1..=brokers).
    ///
    /// # Errors
    /// If librdkafka cannot create the cluster.
    pub fn start(brokers: i32) -> Result<Self> {
        let (commands, inbox) = mpsc::channel::<Command>();
        let (ready, started) = mpsc::channel::<Result<String>>();
        let thread = std::thread::Builder::new()
            .name("mock-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(cluster) => cluster,
                    Err(e) => {
                        let _ = ready.send(Err(anyhow!("mock cluster: {e}")));
                        return;
                    }
                };
                let _ = ready.send(Ok(cluster.bootstrap_servers()));
                serve(&cluster, &inbox);
            })?;
        let bootstrap = started.recv().context("mock cluster thread died")??;
        Ok(Self {
            bootstrap,
            brokers,
            commands,
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` value.
    #[must_use]
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    fn call(&self, command: impl FnOnce(Reply) -> Command) -> Result<()> {
        let (reply, answer) = mpsc::channel();
        self.commands
            .send(command(reply))
            .map_err(|_| anyhow!("mock cluster stopped"))?;
        answer.recv().context("mock cluster stopped")?
    }

    /// Creates a topic with `partitions` partitions.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        self.call(|r| Command::CreateTopic(topic.to_owned(), partitions, r))
    }

    /// Takes broker `id` down: its connections are closed and refused.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn broker_down(&self, id: i32) -> Result<()> {
        self.call(|r| Command::BrokerDown(id, r))
    }

    /// Brings broker `id` back.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn broker_up(&self, id: i32) -> Result<()> {
        self.call(|r| Command::BrokerUp(id, r))
    }

    /// Takes every broker down.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn all_down(&self) -> Result<()> {
        (1..=self.brokers).try_for_each(|id| self.broker_down(id))
    }

    /// Brings every broker back.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn all_up(&self) -> Result<()> {
        (1..=self.brokers).try_for_each(|id| self.broker_up(id))
    }

    /// Delays every broker's responses by `delay`, like a distant cluster.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn set_round_trip(&self, delay: Duration) -> Result<()> {
        (1..=self.brokers).try_for_each(|id| self.call(|r| Command::RoundTrip(id, delay, r)))
    }

    /// Makes the brokers answer the next Produce requests with `errors`, one
    /// request each, in order (then normally again).
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn produce_errors(&self, errors: &[RDKafkaRespErr]) -> Result<()> {
        self.call(|r| Command::ProduceErrors(errors.to_vec(), r))
    }

    /// Makes the brokers answer every request about `topic` with `error`
    /// (e.g. `TopicAuthorizationFailed`), as a broker that refuses the topic.
    ///
    /// # Errors
    /// If the mock refuses.
    pub fn set_topic_error(&self, topic: &str, error: RDKafkaRespErr) -> Result<()> {
        self.call(|r| Command::TopicError(topic.to_owned(), error, r))
    }
}

fn serve(
    cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    inbox: &mpsc::Receiver<Command>,
) {
    let done = |reply: &Reply, result: rdkafka::error::KafkaResult<()>| {
        let _ = reply.send(result.map_err(|e| anyhow!("mock cluster: {e}")));
    };
    while let Ok(command) = inbox.recv() {
        match command {
            Command::CreateTopic(topic, partitions, reply) => {
                done(&reply, cluster.create_topic(&topic, partitions, 1));
            }
            Command::BrokerDown(id, reply) => done(&reply, cluster.broker_down(id)),
            Command::BrokerUp(id, reply) => done(&reply, cluster.broker_up(id)),
            Command::TopicError(topic, error, reply) => {
                done(&reply, cluster.topic_error(&topic, error));
            }
            Command::RoundTrip(id, delay, reply) => {
                done(&reply, cluster.broker_round_trip_time(id, delay));
            }
            Command::ProduceErrors(errors, reply) => {
                cluster.request_errors(rdkafka::types::RDKafkaApiKey::Produce, &errors);
                done(&reply, Ok(()));
            }
            Command::Stop => return,
        }
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
