//! Real Apache Kafka brokers for the tests, started from the jars that
//! `scripts/kafka.sh fetch` resolved from Maven Central: storage formatted
//! with `kafka.tools.StorageTool`, then `kafka.Kafka` in KRaft combined mode
//! (each node broker and controller) on free loopback ports.
//!
//! Each node runs under a small `sh` wrapper that holds a pipe from the test
//! process: when the test process ends in any way (a panic, SIGKILL, the end
//! of `cargo test`), the pipe closes and the wrapper kills the JVM, so no
//! broker outlives its test.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};

use crate::tls::TestCa;

mod faults;
mod node;

use node::{Node, format_node};

/// Environment variable with the directory of Kafka's jars (default: the
/// cache `scripts/kafka.sh fetch` fills).
pub const KAFKA_LIBS_ENV: &str = "TEST_KAFKA_LIBS";

/// Environment variable with the broker JVM's options (default
/// `-Xms256m -Xmx512m`).
pub const KAFKA_JVM_OPTS_ENV: &str = "TEST_KAFKA_JVM_OPTS";

/// The pinned POM; the version is read from it so it is written down once.
const POM: &str = include_str!("../../kafka/pom.xml");

/// Kafka's version, from `test-support/kafka/pom.xml`.
#[must_use]
pub fn kafka_version() -> &'static str {
    POM.split_once("<kafka.version>")
        .and_then(|(_, rest)| rest.split_once("</kafka.version>"))
        .map_or("unknown", |(version, _)| version.trim())
}

/// The directory of Kafka's jars, if they were fetched.
///
/// # Errors
/// If Java is missing or the jars were not fetched; the message says how
/// to get them.
pub fn kafka_libs() -> Result<PathBuf> {
    let libs = match std::env::var_os(KAFKA_LIBS_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME").map_or_else(
                || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"),
                PathBuf::from,
            );
            cache
                .join("consign")
                .join(format!("kafka-{}", kafka_version()))
                .join("libs")
        }
    };
    if !libs.join(".complete").exists() {
        bail!(
            "Kafka {} jars not found in {} (run scripts/kafka.sh fetch, or scripts/services.sh)",
            kafka_version(),
            libs.display()
        );
    }
    let java = Command::new("java").arg("-version").output();
    if !java.is_ok_and(|out| out.status.success()) {
        bail!(
            "no working `java` on PATH (Kafka {} needs Java 17+)",
            kafka_version()
        );
    }
    Ok(libs)
}

/// The user of the clusters' SASL_SSL listener: (name, password).
const SCRAM_USER: (&str, &str) = ("consign", "consign-test-secret");

/// A cluster's SASL_SSL listener: TLS with a certificate of a CA made for
/// the cluster (for `localhost` and `127.0.0.1`), SCRAM-SHA-512 with one
/// user. Clients set `security.protocol=sasl_ssl`,
/// `sasl.mechanisms=SCRAM-SHA-512`, the user and password, and
/// `ssl.ca.location` to [`ca`](Self::ca).
#[derive(Debug, Clone)]
pub struct SecureListener {
    /// `bootstrap.servers` for it (`localhost:<port>`, ...).
    pub bootstrap: String,
    /// The CA certificate (PEM) that signed the brokers' certificate.
    pub ca: PathBuf,
    /// The SCRAM user.
    pub username: String,
    /// Its password.
    pub password: String,
}

impl SecureListener {
    /// The client properties that connect to it with `password`.
    #[must_use]
    pub fn client_properties(&self, password: &str) -> Vec<(&'static str, String)> {
        vec![
            ("bootstrap.servers", self.bootstrap.clone()),
            ("security.protocol", "sasl_ssl".into()),
            ("sasl.mechanisms", "SCRAM-SHA-512".into()),
            ("sasl.username", self.username.clone()),
            ("sasl.password", password.to_owned()),
            ("ssl.ca.location", self.ca.display().to_string()),
        ]
    }
}

/// A real Kafka cluster of 1 or 3 nodes on loopback, each node broker and
/// controller (KRaft combined mode). Topics get replication factor
/// `min(nodes, 3)` and, on 3 nodes, `min.insync.replicas=2`. Dropped, it
/// kills its nodes and removes their data.
#[derive(Debug)]
pub struct KafkaCluster {
    nodes: Mutex<Vec<Node>>,
    bootstrap: String,
    secure: SecureListener,
    libs: PathBuf,
    dir: tempfile::TempDir,
}

impl KafkaCluster {
    /// Formats storage for `nodes` nodes and starts them; returns once every
    /// broker is in the cluster's metadata.
    ///
    /// # Errors
    /// If Java or the jars are missing ([`kafka_libs`]), or a node does not
    /// join within 90 s (the error holds the end of its log).
    pub fn start(nodes: usize) -> Result<Self> {
        let libs = kafka_libs()?;
        let dir = tempfile::Builder::new()
            .prefix("consign-kafka-")
            .tempdir()?;
        let mut ports = free_ports(3 * nodes)?.into_iter();
        let tls = dir.path().join("tls");
        std::fs::create_dir_all(&tls)?;
        let ca = TestCa::generate(&tls)?;
        let keystore = ca.server("broker")?;
        let mut list = Vec::new();
        for i in 1..=nodes {
            let node_dir = dir.path().join(format!("node-{i}"));
            std::fs::create_dir_all(&node_dir)?;
            list.push(Node {
                id: i32::try_from(i)?,
                port: ports.next().context("port")?,
                controller_port: ports.next().context("port")?,
                secure_port: ports.next().context("port")?,
                keystore: keystore.clone(),
                dir: node_dir,
                process: None,
            });
        }
        let voters = list
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let cluster_id = cluster_id();
        std::thread::scope(|scope| -> Result<()> {
            let formats: Vec<_> = list
                .iter()
                .map(|node| {
                    let (libs, voters, cluster_id) = (&libs, &voters, &cluster_id);
                    scope.spawn(move || format_node(node, libs, voters, nodes, cluster_id))
                })
                .collect();
            for format in formats {
                format
                    .join()
                    .map_err(|_| anyhow!("format thread panicked"))??;
            }
            Ok(())
        })?;
        let bootstrap = list
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",");
        let secure = SecureListener {
            bootstrap: list
                .iter()
                .map(|n| format!("localhost:{}", n.secure_port))
                .collect::<Vec<_>>()
                .join(","),
            ca: ca.certificate(),
            username: SCRAM_USER.0.to_owned(),
            password: SCRAM_USER.1.to_owned(),
        };
        let cluster = Self {
            nodes: Mutex::new(list),
            bootstrap,
            secure,
            libs,
            dir,
        };
        for id in 1..=nodes {
            cluster.with_node(i32::try_from(id)?, |node, libs, dir| node.spawn(libs, dir))?;
        }
        cluster.wait_for_brokers(nodes, Duration::from_secs(90))?;
        Ok(cluster)
    }

    /// The process-wide 1-node cluster that the tests of one test binary
    /// share (each test uses topics of its own), started on first use.
    ///
    /// # Errors
    /// If it could not start; every later call returns the same error.
    pub fn shared() -> Result<Arc<Self>> {
        static SHARED: OnceLock<Result<Arc<KafkaCluster>, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let started = Instant::now();
                let cluster = Self::start(1).map_err(|e| format!("{e:#}"))?;
                println!(
                    "real Kafka {} (1 node) at {} started in {:.1} s",
                    kafka_version(),
                    cluster.bootstrap(),
                    started.elapsed().as_secs_f64()
                );
                Ok(Arc::new(cluster))
            })
            .clone()
            .map_err(anyhow::Error::msg)
    }

    /// The `bootstrap.servers` value (every node).
    #[must_use]
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// The SASL_SSL listener (SCRAM-SHA-512, a certificate of a CA made for
    /// this cluster) and how to reach it.
    #[must_use]
    pub fn secure(&self) -> &SecureListener {
        &self.secure
    }

    /// The node ids (1..=nodes).
    #[must_use]
    pub fn node_ids(&self) -> Vec<i32> {
        self.lock().iter().map(|n| n.id).collect()
    }

    /// The pids of the running nodes' JVMs (for what the benchmarks read of
    /// them in `/proc`).
    #[must_use]
    pub fn pids(&self) -> Vec<u32> {
        self.lock().iter().filter_map(Node::pid).collect()
    }

    /// `host:port` of node `id`'s broker listener.
    ///
    /// # Errors
    /// If there is no such node.
    pub fn address(&self, id: i32) -> Result<String> {
        self.with_node(id, |node, _, _| Ok(format!("127.0.0.1:{}", node.port)))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Node>> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn with_node<T>(
        &self,
        id: i32,
        f: impl FnOnce(&mut Node, &Path, &Path) -> Result<T>,
    ) -> Result<T> {
        let mut nodes = self.lock();
        let node = nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| anyhow!("no Kafka node {id}"))?;
        f(node, &self.libs, self.dir.path())
    }

    fn client(&self) -> Result<BaseConsumer> {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("log_level", "3")
            .create()
            .context("metadata client")
    }

    fn wait_for_brokers(&self, count: usize, timeout: Duration) -> Result<()> {
        let client = self.client()?;
        let deadline = Instant::now() + timeout;
        loop {
            let last = match client.fetch_metadata(None, Duration::from_secs(5)) {
                Ok(metadata) if metadata.brokers().len() >= count => return Ok(()),
                Ok(metadata) => format!("{} of {count} brokers", metadata.brokers().len()),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .lock()
                    .iter()
                    .map(|n| {
                        format!(
                            "--- node {} ({}):\n{}",
                            n.id,
                            n.log().display(),
                            n.log_tail()
                        )
                    })
                    .collect();
                bail!(
                    "Kafka cluster not ready after {timeout:?} ({last})\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Creates `topic` with `partitions` partitions (replication factor
    /// `min(nodes, 3)`) and waits until every partition has a leader.
    ///
    /// # Errors
    /// If the broker refuses or a partition has no leader after 60 s.
    pub async fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        self.create_topic_with(topic, partitions, &[]).await
    }

    /// Like [`KafkaCluster::create_topic`], with topic configuration
    /// (`max.message.bytes`, ...).
    ///
    /// # Errors
    /// If the broker refuses or a partition has no leader after 60 s.
    pub async fn create_topic_with(
        &self,
        topic: &str,
        partitions: i32,
        config: &[(&str, &str)],
    ) -> Result<()> {
        let replicas = i32::try_from(self.node_ids().len().min(3))?;
        crate::kafka::create_topic_with_admin(&self.bootstrap, topic, partitions, replicas, config)
            .await?;
        for partition in 0..partitions {
            self.leader(topic, partition, Duration::from_secs(60))
                .await?;
        }
        Ok(())
    }

    /// The node leading `topic`'s `partition`, waiting up to `timeout` for
    /// one to be elected.
    ///
    /// # Errors
    /// If no leader is known within `timeout`.
    pub async fn leader(&self, topic: &str, partition: i32, timeout: Duration) -> Result<i32> {
        let client = self.client()?;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + timeout;
            loop {
                let found = client
                    .fetch_metadata(Some(&topic), Duration::from_secs(5))
                    .ok()
                    .and_then(|m| {
                        m.topics()
                            .iter()
                            .find(|t| t.name() == topic)
                            .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
                            .map(rdkafka::metadata::MetadataPartition::leader)
                    })
                    .filter(|&leader| leader >= 0);
                if let Some(leader) = found {
                    return Ok(leader);
                }
                if Instant::now() > deadline {
                    bail!("{topic}[{partition}]: no leader after {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .await?
    }

    /// The node coordinating consumer group `group`: the leader of the
    /// `__consumer_offsets` partition the group hashes to (Kafka's
    /// `abs(group.hashCode()) % offsets.topic.num.partitions`).
    ///
    /// # Errors
    /// If that partition has no leader within 60 s.
    pub async fn group_coordinator(&self, group: &str) -> Result<i32> {
        // offsets.topic.num.partitions in the node configuration above.
        const OFFSETS_PARTITIONS: i32 = 10;
        let hash = group.encode_utf16().fold(0_i32, |h, unit| {
            h.wrapping_mul(31).wrapping_add(i32::from(unit))
        });
        // Kafka's Utils.abs: |n|, and 0 for i32::MIN.
        let partition = hash.checked_abs().unwrap_or(0) % OFFSETS_PARTITIONS;
        self.leader("__consumer_offsets", partition, Duration::from_secs(60))
            .await
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for node in self.lock().iter_mut() {
            let _ = node.signal(Signal::SIGKILL);
            let _ = node.reap(Duration::from_secs(10));
        }
    }
}

/// A Kafka cluster id: a UUID's 16 bytes, URL-safe base64 without padding.
fn cluster_id() -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(uuid::Uuid::now_v7().as_bytes())
}

/// `count` distinct free loopback ports (all held open until all are
/// found, so none is handed out twice).
fn free_ports(count: usize) -> Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}
