//! One Kafka node: its configuration, storage formatting and process.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{KAFKA_JVM_OPTS_ENV, SCRAM_USER};

/// Runs the JVM and kills it when stdin (a pipe from the test process)
/// closes; removes the node's directory then, since nobody else will.
pub(super) const WRAPPER: &str = r#"
exec 3<&0
"$@" </dev/null 3<&- &
pid=$!
echo "$pid" > "$NODE_DIR/pid"
( read -r _ <&3; touch "$NODE_DIR/orphaned"; kill -9 "$pid" 2>/dev/null ) &
watch=$!
wait "$pid"
status=$?
kill "$watch" 2>/dev/null
if [ -e "$NODE_DIR/orphaned" ]; then rm -rf "$CLUSTER_DIR"; fi
exit "$status"
"#;

#[derive(Debug)]
pub(super) struct Node {
    pub(super) id: i32,
    pub(super) port: u16,
    pub(super) controller_port: u16,
    /// The SASL_SSL (SCRAM-SHA-512) listener.
    pub(super) secure_port: u16,
    /// The PEM keystore (key and certificate) of that listener.
    pub(super) keystore: PathBuf,
    pub(super) dir: PathBuf,
    pub(super) process: Option<(Child, ChildStdin, i32)>,
}

impl Node {
    pub(super) fn config(&self, voters: &str, nodes: usize) -> String {
        let replicas = nodes.min(3);
        let min_isr = if replicas >= 3 { 2 } else { 1 };
        format!(
            "process.roles=broker,controller
node.id={id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port},SECURE://127.0.0.1:{secure_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port},SECURE://127.0.0.1:{secure_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SECURE:SASL_SSL
listener.name.secure.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.secure.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.secure.ssl.keystore.type=PEM
listener.name.secure.ssl.keystore.location={keystore}
log.dirs={data}
num.partitions=1
default.replication.factor={replicas}
min.insync.replicas={min_isr}
offsets.topic.num.partitions=10
offsets.topic.replication.factor={replicas}
transaction.state.log.num.partitions=10
transaction.state.log.replication.factor={replicas}
transaction.state.log.min.isr={min_isr}
share.coordinator.state.topic.replication.factor={replicas}
share.coordinator.state.topic.min.isr={min_isr}
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.segment.bytes=67108864
",
            id = self.id,
            port = self.port,
            controller_port = self.controller_port,
            secure_port = self.secure_port,
            keystore = self.keystore.display(),
            data = self.dir.join("data").display(),
        )
    }

    pub(super) fn log(&self) -> PathBuf {
        self.dir.join("kafka.log")
    }

    pub(super) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub(super) fn spawn(&mut self, libs: &Path, cluster_dir: &Path) -> Result<()> {
        let _ = std::fs::remove_file(self.dir.join("pid"));
        let log = std::fs::File::create(self.log())?;
        let jvm =
            std::env::var(KAFKA_JVM_OPTS_ENV).unwrap_or_else(|_| "-Xms256m -Xmx512m".to_owned());
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WRAPPER)
            .arg("kafka-node")
            .arg("java")
            .args(jvm.split_whitespace())
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(libs.join("*"))
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .env("NODE_DIR", &self.dir)
            .env("CLUSTER_DIR", cluster_dir)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a Kafka node (sh + java)")?;
        let stdin = child.stdin.take().context("wrapper stdin")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let pid = loop {
            if let Ok(text) = std::fs::read_to_string(self.dir.join("pid"))
                && let Ok(pid) = text.trim().parse::<i32>()
            {
                break pid;
            }
            if Instant::now() > deadline {
                bail!("Kafka node {} did not start its JVM", self.id);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.process = Some((child, stdin, pid));
        Ok(())
    }

    /// The JVM's pid while the node runs.
    pub(super) fn pid(&self) -> Option<u32> {
        self.process
            .as_ref()
            .and_then(|(_, _, pid)| u32::try_from(*pid).ok())
    }

    pub(super) fn signal(&self, signal: Signal) -> Result<()> {
        let (_, _, pid) = self
            .process
            .as_ref()
            .ok_or_else(|| anyhow!("Kafka node {} is not running", self.id))?;
        kill(Pid::from_raw(*pid), signal)?;
        Ok(())
    }

    /// Waits for the JVM (and its wrapper) to exit, up to `timeout`; then
    /// kills it.
    pub(super) fn reap(&mut self, timeout: Duration) -> Result<()> {
        let Some((mut child, stdin, pid)) = self.process.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + timeout;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                child.wait()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(stdin);
        Ok(())
    }
}

pub(super) fn format_node(
    node: &Node,
    libs: &Path,
    voters: &str,
    nodes: usize,
    cluster_id: &str,
) -> Result<()> {
    let properties = node.dir.join("server.properties");
    std::fs::write(&properties, node.config(voters, nodes))?;
    let log4j = node.dir.join("log4j2.properties");
    std::fs::File::create(&log4j)?.write_all(LOG4J.as_bytes())?;
    let out = Command::new("java")
        .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
        .arg("-cp")
        .arg(libs.join("*"))
        .arg("kafka.tools.StorageTool")
        .args(["format", "--ignore-formatted", "-t", cluster_id, "-c"])
        .arg(&properties)
        .arg("--add-scram")
        .arg(format!(
            "SCRAM-SHA-512=[name={},password={}]",
            SCRAM_USER.0, SCRAM_USER.1
        ))
        .output()
        .context("running kafka.tools.StorageTool")?;
    if !out.status.success() {
        bail!(
            "formatting Kafka node {}: {}{}",
            node.id,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Warnings and errors only, plus the line that says the server started.
const LOG4J: &str = "rootLogger.level = WARN
rootLogger.appenderRef.out.ref = out
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
";
