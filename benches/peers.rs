//! consign side by side with Debezium, in one run on this machine, the same
//! PostgreSQL and the same real Apache Kafka broker. Run it with
//! `scripts/bench-peers.sh` (it prepares PostgreSQL with `wal_level =
//! logical`, Kafka's jars and Debezium's, then runs `cargo bench --bench
//! peers`).
//!
//! The systems, each as users run it:
//! - consign: the `consign-relay` binary (release build, production
//!   profile), reading `consign_outbox`, written with `Outbox::enqueue`.
//! - Debezium: its embedded engine with the PostgreSQL connector (`pgoutput`,
//!   a slot of its own, offsets in a file) and the outbox event router, and a
//!   Kafka producer that sends each batch and awaits it before marking its
//!   offsets (benches/peers/debezium/DebeziumPeer.java), on the JVM with
//!   its default settings. It reads a Debezium-shaped table, `peers_outbox
//!   (id, aggregatetype, aggregateid, type, payload jsonb)`, written with a
//!   plain INSERT.
//!
//! Every event is a 256-byte JSON payload with its key and a per-key
//! sequence number; a consumer in this process (`read_committed`) records
//! each arrival, and every figure is marked invalid unless every event
//! arrived (count and id set equal to what was written) and each key's
//! events arrived in the order they were committed.
//!
//! (a) drain: a backlog written before the system starts, from process start
//!     to the last event's arrival;
//! (b) latency: commit (the writer's COMMIT returned) to arrival at steady
//!     rates from 8 writers, at most 1000 transactions a second (so 5 events
//!     per transaction at 5000/s);
//! (c) the process's CPU seconds and peak RSS (`VmHWM`) in each phase, and
//!     PostgreSQL's CPU seconds in the same phase;
//! (d) writer cost: business transactions per second (an order row and its
//!     event) with each system's outbox insert, no relay running;
//! (e) recovery: the process SIGKILLed mid-stream and started again: time
//!     from restart to the first new arrival, and the events sent twice.
//!
//! Scale with `BENCH_PEERS_BACKLOGS` (default `200000,1000000`),
//! `BENCH_PEERS_RATES` (default `1000,5000,10000`), `BENCH_PEERS_SECONDS`
//! (per steady rate, default 10), `BENCH_PEERS_PHASES` (default
//! `drain,steady,writer,recovery`); `BENCH_PEERS_SYSTEMS=consign` (or
//! `debezium`) drains one system alone. `BENCH_RELAY_LOG` sets the relay's
//! `RUST_LOG` (default `warn`); `BENCH_PEERS_SHOW_LOGS=1` prints each
//! process's output when it stops. `BENCH_DEBEZIUM_PROPERTIES` adds engine or
//! connector properties to Debezium's defaults, comma-separated
//! (`poll.interval.ms=10,max.batch.size=512`).

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use consign::{Message, Outbox};
use consign_test_support::{KafkaCluster, procfs};
use hdrhistogram::Histogram;
use rdkafka::{
    ClientConfig, Message as _, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    message::{Header, Headers, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use sqlx::{
    ConnectOptions, Connection, Executor, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

#[path = "support/orders.rs"]
#[allow(dead_code, unused_macros)]
mod orders;

use orders::{env_number, summary};

/// Kafka partitions of every topic the benchmark creates.
const PARTITIONS: i32 = 8;
/// Distinct keys in a backlog.
const KEYS: i64 = 1000;
/// Writers of the steady streams; each owns its keys, so a key's events
/// commit in sequence order.
const WRITERS: usize = 8;
/// Payload size of every event.
const PAYLOAD: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Consign,
    Debezium,
}

impl System {
    const BOTH: [Self; 2] = [Self::Consign, Self::Debezium];

    fn name(self) -> &'static str {
        match self {
            Self::Consign => "consign",
            Self::Debezium => "debezium",
        }
    }

    /// Whether `BENCH_PEERS_SYSTEMS` (default both) names this system: one
    /// system alone is for profiling, its rows show the other as missing.
    fn selected(self) -> bool {
        std::env::var("BENCH_PEERS_SYSTEMS").map_or(true, |list| {
            list.split(',').any(|s| s.trim() == self.name())
        })
    }

    /// The Kafka header that carries the event id.
    fn id_header(self) -> &'static str {
        match self {
            Self::Consign => "consign-id",
            Self::Debezium => "id",
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    consign_test_support::db::with_scratch_database("consign_peers", async |options| {
        let mut admin = PgConnection::connect_with(&options).await?;
        let wal_level: String = sqlx::query_scalar("SHOW wal_level")
            .fetch_one(&mut admin)
            .await?;
        ensure!(
            wal_level == "logical",
            "PostgreSQL runs with wal_level = {wal_level}; Debezium needs logical (scripts/services.sh postgres sets it)"
        );
        drop_stale_slots(&mut admin).await?;
        let database = options.get_database().unwrap_or_default().to_owned();
        let result = run(options, &database).await;
        // A slot blocks dropping its database, and keeps WAL forever.
        drop_stale_slots(&mut admin).await?;
        result
    })
    .await
}

/// Drops the replication slots earlier runs of this benchmark left (a
/// slot keeps WAL forever).
async fn drop_stale_slots(admin: &mut PgConnection) -> Result<()> {
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE slot_name LIKE 'consign_peers_%' AND NOT active",
    )
    .execute(admin)
    .await?;
    Ok(())
}

/// What every phase needs.
struct Bench {
    pool: PgPool,
    options: PgConnectOptions,
    database: String,
    kafka: KafkaCluster,
    relay_bin: PathBuf,
    debezium: JavaPeer,
    outbox: Outbox,
    /// Distinguishes the slots and topics of one run's phases.
    next_id: AtomicU64,
}

async fn run(options: PgConnectOptions, database: &str) -> Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect_with(options.clone())
        .await?;
    consign::migrate(&pool).await?;
    pool.execute(
        "CREATE TABLE peers_outbox (
             id uuid PRIMARY KEY,
             aggregatetype varchar(255) NOT NULL,
             aggregateid varchar(255) NOT NULL,
             type varchar(255) NOT NULL,
             payload jsonb);
         CREATE PUBLICATION consign_peers FOR TABLE peers_outbox WITH (publish = 'insert');
         CREATE TABLE peers_orders (id bigint PRIMARY KEY, customer text NOT NULL, total_cents bigint NOT NULL);",
    )
    .await?;
    let debezium = JavaPeer::compile()?;
    let relay_bin = consign_test_support::relay_binary()?;
    let kafka = KafkaCluster::start(1)?;
    let bench = Bench {
        pool,
        options,
        database: database.to_owned(),
        kafka,
        relay_bin,
        debezium,
        outbox: Outbox::new(),
        next_id: AtomicU64::new(0),
    };
    println!(
        "consign vs Debezium {} (embedded engine, PostgreSQL connector, outbox event router), Apache Kafka {} (1 KRaft node on loopback), {}, {} cores",
        JavaPeer::VERSION,
        consign_test_support::kafka_version(),
        server_version(&bench.pool).await?,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
    );
    warm_broker(&bench.kafka).await?;
    let mut table = Table::default();
    let phases = std::env::var("BENCH_PEERS_PHASES")
        .unwrap_or_else(|_| "drain,steady,writer,recovery".into());
    let phases: Vec<&str> = phases.split(',').map(str::trim).collect();
    if phases.contains(&"drain") {
        for backlog in env_list("BENCH_PEERS_BACKLOGS", &[200_000, 1_000_000]) {
            drain(&bench, backlog, &mut table).await?;
        }
    }
    if phases.contains(&"steady") {
        let rates = env_list("BENCH_PEERS_RATES", &[1000, 5000, 10_000]);
        steady(&bench, &rates, &mut table).await?;
    }
    if phases.contains(&"writer") {
        writer_cost(&bench, &mut table).await?;
    }
    if phases.contains(&"recovery") {
        recovery(&bench, &mut table).await?;
    }
    println!("\n{}", table.render());
    Ok(())
}

/// Idempotent produces with headers, read back by a `read_committed`
/// consumer, before anything is measured, so that neither system pays for
/// the new broker's first producer id (its coordinator loads on first use)
/// or its cold JIT. A new broker's JVM compiles its produce and fetch paths
/// per request, not per record: 700,000 records in large batches left it
/// compiling (C2 at a quarter of this machine in `perf`) through the first
/// drain measured after, whichever system that was. Passes of 100 chunks of
/// 1000 records, each chunk awaited as a relay awaits its batch, run until
/// the broker's JIT threads used under 5% of a core during a pass (at least
/// 2 passes, at most 30); each pass's rate and JIT share are printed.
async fn warm_broker(kafka: &KafkaCluster) -> Result<()> {
    const CHUNK: usize = 1000;
    const CHUNKS: usize = 100;
    let bootstrap = kafka.bootstrap();
    kafka.create_topic("peers_warmup", PARTITIONS).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()?;
    let consumer = reading_from_start(bootstrap, "peers_warmup")?;
    let keys: Vec<String> = (0..1000).map(|i| format!("key-{i}")).collect();
    let bodies: Vec<String> = keys.iter().map(|key| payload(key, 0)).collect();
    let id = Uuid::now_v7().to_string();
    let jit = || -> Result<f64> {
        kafka
            .pids()
            .into_iter()
            .map(|pid| procfs::threads_cpu_seconds(pid, "C2 CompilerThre"))
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut passes = Vec::new();
    let mut read = 0;
    for pass in 1..=30 {
        let (started, jit_before) = (Instant::now(), jit()?);
        for _ in 0..CHUNKS {
            let mut sends = Vec::with_capacity(CHUNK);
            for i in 0..CHUNK {
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "consign-id",
                        value: Some(&id),
                    })
                    .insert(Header {
                        key: "consign-type",
                        value: Some("warmup"),
                    });
                let record = FutureRecord::to("peers_warmup")
                    .key(&keys[i])
                    .payload(&bodies[i])
                    .headers(headers);
                sends.push(producer.send_result(record).map_err(|(error, _)| error)?);
            }
            for send in sends {
                send.await?
                    .map_err(|(error, _)| error)
                    .context("warming the broker up")?;
            }
            while let Some(message) = consumer.poll(Duration::ZERO) {
                message.context("reading the warm-up records back")?;
                read += 1;
            }
        }
        while read < pass * CHUNK * CHUNKS {
            ensure!(
                Instant::now() < deadline,
                "warming the broker up: {read} records read back in 3 minutes"
            );
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                message.context("reading the warm-up records back")?;
                read += 1;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let share = (jit()? - jit_before) / seconds;
        passes.push(format!(
            "{:.0}/s (JIT {:.0}%)",
            (CHUNK * CHUNKS) as f64 / seconds,
            share * 100.0
        ));
        if (pass >= 2 && share < 0.05) || Instant::now() > deadline {
            break;
        }
    }
    println!(
        "broker warm-up, passes of {} records produced and read back: {}",
        CHUNK * CHUNKS,
        passes.join(", ")
    );
    Ok(())
}

fn env_list(name: &str, default: &[u64]) -> Vec<u64> {
    std::env::var(name).map_or_else(
        |_| default.to_vec(),
        |v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
    )
}

async fn server_version(pool: &PgPool) -> Result<String> {
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(pool)
        .await?;
    Ok(format!(
        "PostgreSQL {}",
        version.split_whitespace().next().unwrap_or("?")
    ))
}

// ---------------------------------------------------------------- the table

/// The printed comparison: one row per figure, consign beside Debezium.
#[derive(Default)]
struct Table {
    rows: Vec<(String, String, String, String)>,
}

impl Table {
    /// A row of two figures and their ratio, always consign / Debezium
    /// (whether higher is better depends on the row).
    fn add(&mut self, what: &str, unit: &str, consign: Figure, debezium: Figure) {
        let ratio = match (consign, debezium) {
            (Figure::Valid(c), Figure::Valid(d)) if d != 0.0 => format!("{:.2}", c / d),
            _ => "-".into(),
        };
        self.rows.push((
            what.to_owned(),
            consign.show(unit),
            debezium.show(unit),
            ratio,
        ));
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| {:<52} | {:>20} | {:>20} | {:>17} |",
            "figure", "consign", "Debezium", "consign/Debezium"
        );
        let _ = writeln!(out, "|{:-<54}|{:->22}|{:->22}|{:->19}|", "", "", "", "");
        for (what, c, d, r) in &self.rows {
            let _ = writeln!(out, "| {what:<52} | {c:>20} | {d:>20} | {r:>17} |");
        }
        out
    }
}

/// A measured number, or why it does not count.
#[derive(Debug, Clone, Copy)]
enum Figure {
    Valid(f64),
    /// Measured, but the run lost or reordered events.
    Invalid(f64),
    /// Not measured: `BENCH_PEERS_SYSTEMS` left the system out.
    NotRun,
}

impl Figure {
    fn new(value: f64, check: &Check) -> Self {
        if check.ok() {
            Self::Valid(value)
        } else {
            Self::Invalid(value)
        }
    }

    fn show(self, unit: &str) -> String {
        let number = |x: f64| {
            if x >= 100.0 {
                format!("{x:.0}")
            } else if x >= 10.0 {
                format!("{x:.1}")
            } else {
                format!("{x:.2}")
            }
        };
        match self {
            Self::Valid(x) => format!("{} {unit}", number(x)),
            Self::Invalid(x) => format!("INVALID {} {unit}", number(x)),
            Self::NotRun => "not run".into(),
        }
    }
}

// ------------------------------------------------------------ the processes

/// Debezium's side: the jars `benches/peers/debezium.sh fetch` resolved and
/// the peer program compiled from them.
struct JavaPeer {
    libs: PathBuf,
    classes: tempfile::TempDir,
}

impl JavaPeer {
    const VERSION: &str = "3.6.1.Final";

    fn source_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/debezium")
    }

    /// Fetches the jars when missing and compiles DebeziumPeer.java.
    fn compile() -> Result<Self> {
        let script = Self::source_dir().join("../debezium.sh");
        let fetched = Command::new("bash")
            .arg(&script)
            .arg("fetch")
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        ensure!(fetched.success(), "{} fetch failed", script.display());
        let out = Command::new("bash").arg(&script).arg("libs").output()?;
        ensure!(out.status.success(), "{} libs failed", script.display());
        let libs = PathBuf::from(String::from_utf8(out.stdout)?.trim());
        let classes = tempfile::tempdir()?;
        let status = Command::new("javac")
            .arg("-d")
            .arg(classes.path())
            .arg("-cp")
            .arg(libs.join("*"))
            .arg(Self::source_dir().join("DebeziumPeer.java"))
            .status()
            .context("running javac")?;
        ensure!(status.success(), "javac DebeziumPeer.java failed");
        Ok(Self { libs, classes })
    }
}

/// A running relay or Debezium process; SIGKILLed when dropped.
struct Peer {
    system: System,
    child: Child,
    started: Instant,
    dir: tempfile::TempDir,
}

/// Where a Debezium process keeps its position: a slot and an offsets file,
/// kept across a kill and restart.
struct DebeziumState {
    slot: String,
    offsets: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn fresh(&self, what: &str) -> String {
        format!(
            "{what}_{}_{}",
            std::process::id(),
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Where `system` keeps its position across a restart: nothing for
    /// consign (the outbox is its position), a new slot and offsets file
    /// for Debezium.
    async fn position(&self, system: System) -> Result<Option<DebeziumState>> {
        Ok(match system {
            System::Consign => None,
            System::Debezium => Some(self.debezium_state().await?),
        })
    }

    /// Starts `system` with a fresh position and returns once it
    /// delivered a first event ([`warm_up`]).
    async fn start_warm(&self, system: System) -> Result<(Peer, Option<DebeziumState>)> {
        let state = self.position(system).await?;
        let mut peer = self.start(system, state.as_ref())?;
        warm_up(self, system, &mut peer).await?;
        Ok((peer, state))
    }

    /// A new slot for Debezium, created now: the connector reads what
    /// commits after this point.
    async fn debezium_state(&self) -> Result<DebeziumState> {
        let slot = self.fresh("consign_peers");
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(&slot)
            .execute(&self.pool)
            .await?;
        let dir = tempfile::tempdir()?;
        Ok(DebeziumState {
            slot,
            offsets: dir.path().join("offsets.dat"),
            _dir: dir,
        })
    }

    fn start(&self, system: System, state: Option<&DebeziumState>) -> Result<Peer> {
        let dir = tempfile::tempdir()?;
        let log = std::fs::File::create(dir.path().join("output.log"))?;
        let mut command = match system {
            System::Consign => {
                let url = self.options.to_url_lossy();
                let config = format!(
                    "[database]\nurl = {:?}\n\n[admin]\nenabled = false\n\n{}\n[kafka]\n\"bootstrap.servers\" = {:?}\n",
                    url.as_str(),
                    std::env::var("BENCH_RELAY_CONFIG").unwrap_or_default(),
                    self.kafka.bootstrap()
                );
                let path = dir.path().join("relay.toml");
                std::fs::write(&path, config)?;
                let mut command = Command::new(&self.relay_bin);
                command.arg("--config").arg(path).arg("run").env(
                    "RUST_LOG",
                    std::env::var("BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
                );
                command
            }
            System::Debezium => {
                let state = state.context("Debezium needs its slot and offsets")?;
                let properties = self.debezium_properties(state);
                let path = dir.path().join("peer.properties");
                std::fs::write(&path, properties)?;
                let mut classpath = self.debezium.classes.path().as_os_str().to_owned();
                classpath.push(":");
                classpath.push(self.debezium.libs.join("*"));
                let mut command = Command::new("java");
                command
                    .arg(format!(
                        "-Dlog4j2.configurationFile={}",
                        JavaPeer::source_dir().join("log4j2.xml").display()
                    ))
                    .arg("-cp")
                    .arg(classpath)
                    .arg("DebeziumPeer")
                    .arg(path);
                command
            }
        };
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CONSIGN_") {
                command.env_remove(name);
            }
        }
        let child = command
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", system.name()))?;
        Ok(Peer {
            system,
            child,
            started: Instant::now(),
            dir,
        })
    }

    fn debezium_properties(&self, state: &DebeziumState) -> String {
        let options = &self.options;
        format!(
            "name=consign-peers\n\
             connector.class=io.debezium.connector.postgresql.PostgresConnector\n\
             offset.storage=org.apache.kafka.connect.storage.FileOffsetBackingStore\n\
             offset.storage.file.filename={offsets}\n\
             database.hostname={host}\n\
             database.port={port}\n\
             database.user={user}\n\
             database.password=\n\
             database.dbname={database}\n\
             topic.prefix=peers\n\
             plugin.name=pgoutput\n\
             slot.name={slot}\n\
             publication.name=consign_peers\n\
             publication.autocreate.mode=disabled\n\
             table.include.list=public.peers_outbox\n\
             snapshot.mode=no_data\n\
             transforms=outbox\n\
             transforms.outbox.type=io.debezium.transforms.outbox.EventRouter\n\
             transforms.outbox.route.topic.replacement=${{routedByValue}}\n\
             producer.bootstrap.servers={bootstrap}\n\
             producer.acks=all\n\
             producer.enable.idempotence=true\n\
             producer.linger.ms=1\n\
             producer.client.id=debezium-peer\n\
             {extra}",
            extra = std::env::var("BENCH_DEBEZIUM_PROPERTIES")
                .map(|extra| extra.replace(',', "\n") + "\n")
                .unwrap_or_default(),
            offsets = state.offsets.display(),
            host = options.get_host(),
            port = options.get_port(),
            user = options.get_username(),
            database = self.database,
            slot = state.slot,
            bootstrap = self.kafka.bootstrap(),
        )
    }
}

impl Peer {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("output.log")).unwrap_or_default()
    }

    /// CPU seconds (user + system) and peak RSS in MiB so far.
    fn usage(&self) -> Result<Usage> {
        Ok(Usage {
            cpu_seconds: procfs::cpu_seconds(self.pid())?,
            peak_rss_mib: procfs::peak_rss_kib(self.pid())? as f64 / 1024.0,
        })
    }

    /// SIGKILL, no chance to flush anything.
    fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM and wait up to 30 s (then SIGKILL).
    fn stop(mut self) -> Result<()> {
        if std::env::var_os("BENCH_PEERS_SHOW_LOGS").is_some() {
            println!("--- {} output ---\n{}", self.system.name(), self.output());
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.pid())?),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "{} did not stop in 30 s after SIGTERM; killed",
            self.system.name()
        );
        self.kill()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited with {status}:\n{}",
                self.system.name(),
                self.output()
            );
        }
        Ok(())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu_seconds: f64,
    peak_rss_mib: f64,
}

/// CPU seconds of each PostgreSQL process on this machine so far.
fn postgres_cpu() -> HashMap<u32, f64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "postgres")
        })
        .filter_map(|pid| Some((pid, procfs::cpu_seconds(pid).ok()?)))
        .collect()
}

/// PostgreSQL's CPU seconds since `before` ([`postgres_cpu`]): what its
/// processes alive now used since then (a backend that exited meanwhile is
/// not counted).
fn postgres_cpu_since(before: &HashMap<u32, f64>) -> f64 {
    postgres_cpu()
        .iter()
        .map(|(pid, cpu)| cpu - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

// -------------------------------------------------------- the reading side

/// One event as it arrived.
struct Arrival {
    id: Uuid,
    key: String,
    n: u64,
    at: Instant,
}

/// A consumer of one topic in a thread of its own, recording arrivals
/// until told how many distinct events to expect and they are all there.
struct Reader {
    expected: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    distinct: Arc<AtomicUsize>,
    handle: std::thread::JoinHandle<Result<Vec<Arrival>>>,
}

/// The header of the records [`Reader::start`] writes to find out that
/// the reader fetches from every partition; not events, not counted.
const PRIMER: &str = "peers-primer";

/// A `read_committed` consumer of a group of its own, assigned every
/// partition of `topic` from its start.
fn reading_from_start(bootstrap: &str, topic: &str) -> Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("consign-peers-{}", Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

impl Reader {
    /// Starts reading `topic` and returns once the reader fetches from every
    /// partition (it has read a primer record written to each), so that a
    /// latency measured from it holds no consumer start-up.
    async fn start(bootstrap: &str, topic: &str, system: System) -> Result<Self> {
        let consumer = reading_from_start(bootstrap, topic)?;
        let expected = Arc::new(AtomicUsize::new(usize::MAX));
        let stop = Arc::new(AtomicBool::new(false));
        let distinct = Arc::new(AtomicUsize::new(0));
        let primed = Arc::new(AtomicUsize::new(0));
        let header = system.id_header();
        let handle = {
            let (expected, stop, distinct, primed) = (
                Arc::clone(&expected),
                Arc::clone(&stop),
                Arc::clone(&distinct),
                Arc::clone(&primed),
            );
            std::thread::spawn(move || {
                let mut arrivals = Vec::new();
                let mut seen = HashSet::new();
                while !stop.load(Ordering::Relaxed) && seen.len() < expected.load(Ordering::Relaxed)
                {
                    let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    let at = Instant::now();
                    let message = message?;
                    if message
                        .headers()
                        .is_some_and(|h| h.iter().any(|h| h.key == PRIMER))
                    {
                        primed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let id = message
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == header))
                        .and_then(|h| h.value)
                        .and_then(|v| Uuid::try_parse_ascii(v).ok())
                        .with_context(|| format!("a message without a {header} header"))?;
                    let key =
                        String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
                    let n = sequence(message.payload().unwrap_or_default())
                        .context("a payload without its sequence number")?;
                    if seen.insert(id) {
                        distinct.store(seen.len(), Ordering::Relaxed);
                    }
                    arrivals.push(Arrival { id, key, n, at });
                }
                Ok(arrivals)
            })
        };
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()?;
        for partition in 0..PARTITIONS {
            producer
                .send(
                    FutureRecord::<str, str>::to(topic)
                        .partition(partition)
                        .payload("primer")
                        .headers(OwnedHeaders::new().insert(Header {
                            key: PRIMER,
                            value: Some("1"),
                        })),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(error, _)| error)
                .context("writing a primer record")?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while primed.load(Ordering::Relaxed) < usize::try_from(PARTITIONS)? {
            ensure!(
                !handle.is_finished() && Instant::now() < deadline,
                "the reader of {topic} did not start fetching every partition in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self {
            expected,
            stop,
            distinct,
            handle,
        })
    }

    /// Waits until `expected` distinct events arrived, or `timeout`; the
    /// arrivals either way.
    async fn finish(self, expected: usize, timeout: Duration) -> Result<Vec<Arrival>> {
        self.expected.store(expected, Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        while !self.handle.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("reader thread panicked"))?
    }

    fn distinct(&self) -> usize {
        self.distinct.load(Ordering::Relaxed)
    }
}

/// The `n` field of a payload (`"n":42` or jsonb's `"n": 42`).
fn sequence(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let after = &text[text.find("\"n\":")? + 4..];
    let digits: String = after
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// What a run delivered, against what was written.
#[derive(Debug, Default)]
struct Check {
    written: usize,
    distinct: usize,
    missing: usize,
    unexpected: usize,
    duplicates: usize,
    out_of_order: usize,
}

impl Check {
    fn of(written: &HashSet<Uuid>, arrivals: &[Arrival]) -> Self {
        let mut seen = HashSet::with_capacity(arrivals.len());
        let mut last: HashMap<&str, u64> = HashMap::new();
        let mut check = Self {
            written: written.len(),
            ..Self::default()
        };
        for arrival in arrivals {
            if !seen.insert(arrival.id) {
                check.duplicates += 1;
                continue;
            }
            if !written.contains(&arrival.id) {
                check.unexpected += 1;
            }
            // First arrivals of a key carry increasing sequence numbers.
            if let Some(previous) = last.insert(&arrival.key, arrival.n)
                && previous >= arrival.n
            {
                check.out_of_order += 1;
            }
        }
        check.distinct = seen.len();
        check.missing = written.iter().filter(|id| !seen.contains(id)).count();
        check
    }

    fn ok(&self) -> bool {
        self.missing == 0 && self.unexpected == 0 && self.out_of_order == 0
    }

    fn describe(&self) -> String {
        if self.ok() {
            format!(
                "all {} arrived, key order held, {} duplicates",
                self.written, self.duplicates
            )
        } else {
            format!(
                "INVALID: {} written, {} missing, {} unexpected, {} out of key order, {} duplicates",
                self.written, self.missing, self.unexpected, self.out_of_order, self.duplicates
            )
        }
    }
}

// ------------------------------------------------------------ the writing side

/// A 256-byte JSON payload carrying the key and its sequence number.
fn payload(key: &str, n: u64) -> String {
    let head = format!("{{\"key\":\"{key}\",\"n\":{n},\"pad\":\"");
    let pad = PAYLOAD.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

/// SQL computing the same payload, for backlogs filled in the database.
const SQL_PAYLOAD: &str = "rpad(format('{\"key\":\"key-%s\",\"n\":%s,\"pad\":\"', i % 1000, i / 1000), 254, 'x') || '\"}'";

/// Writes `count` events to `system`'s table in transactions of 10,000 rows:
/// keys `key-0` to `key-999`, each key's events in sequence order. Returns
/// their ids.
async fn fill(bench: &Bench, system: System, topic: &str, count: u64) -> Result<HashSet<Uuid>> {
    let mut ids = HashSet::with_capacity(usize::try_from(count)?);
    let partitions: Vec<i16> = (0..KEYS)
        .map(|k| consign::outbox::partition_for(Some(&format!("key-{k}")), &Uuid::nil()))
        .collect();
    let mut from = 0_i64;
    let count = i64::try_from(count)?;
    while from < count {
        let to = (from + 10_000).min(count) - 1;
        let sql = match system {
            System::Consign => format!(
                "INSERT INTO consign_outbox (id, partition, topic, key, event_type, payload) \
                 SELECT gen_random_uuid(), ($4::int2[])[i % 1000 + 1], $1, 'key-' || (i % 1000), 'OrderPlaced', \
                        convert_to({SQL_PAYLOAD}, 'UTF8') \
                 FROM generate_series($2::int8, $3::int8) AS i ORDER BY i RETURNING id"
            ),
            System::Debezium => format!(
                "INSERT INTO peers_outbox (id, aggregatetype, aggregateid, type, payload) \
                 SELECT gen_random_uuid(), $1, 'key-' || (i % 1000), 'OrderPlaced', ({SQL_PAYLOAD})::jsonb \
                 FROM generate_series($2::int8, $3::int8) AS i ORDER BY i RETURNING id"
            ),
        };
        let mut query = sqlx::query_scalar::<_, Uuid>(sqlx::AssertSqlSafe(sql))
            .bind(topic)
            .bind(from)
            .bind(to);
        if system == System::Consign {
            query = query.bind(&partitions);
        }
        ids.extend(query.fetch_all(&bench.pool).await?);
        from = to + 1;
    }
    if system == System::Consign {
        bench.pool.execute("ANALYZE consign_outbox").await?;
    }
    Ok(ids)
}

// ----------------------------------------------------------------- (a) drain

/// One system draining one backlog.
struct DrainRun {
    rate: f64,
    usage: Usage,
    postgres_cpu: f64,
    check: Check,
}

async fn drain(bench: &Bench, backlog: u64, table: &mut Table) -> Result<()> {
    // Three rounds where they fit in the benchmark's ten minutes.
    let rounds = if backlog <= 200_000 { 3 } else { 1 };
    println!(
        "(a) drain a backlog of {backlog} events of {PAYLOAD} bytes (1000 keys), written before start; {rounds} round(s), the median counts"
    );
    let mut runs: [Vec<DrainRun>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, system) in System::BOTH.into_iter().enumerate() {
            if system.selected() {
                runs[i].push(drain_once(bench, system, backlog).await?);
            }
        }
    }
    // The median round by rate; a figure counts only if every round was
    // correct.
    let median = |runs: &[DrainRun]| {
        if runs.is_empty() {
            return (
                Figure::NotRun,
                Figure::NotRun,
                Figure::NotRun,
                Figure::NotRun,
            );
        }
        let mut sorted: Vec<&DrainRun> = runs.iter().collect();
        sorted.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let all_ok = runs.iter().all(|r| r.check.ok());
        let figure = |x: f64| {
            if all_ok {
                Figure::Valid(x)
            } else {
                Figure::Invalid(x)
            }
        };
        let run = sorted[sorted.len() / 2];
        (
            figure(run.rate),
            figure(run.usage.peak_rss_mib),
            figure(run.usage.cpu_seconds),
            figure(run.postgres_cpu),
        )
    };
    let (c, d) = (median(&runs[0]), median(&runs[1]));
    table.add(&format!("(a) drain {backlog} events"), "ev/s", c.0, d.0);
    table.add(&format!("(c) peak RSS, drain {backlog}"), "MiB", c.1, d.1);
    table.add(&format!("(c) process CPU, drain {backlog}"), "s", c.2, d.2);
    table.add(
        &format!("(c) PostgreSQL CPU, drain {backlog}"),
        "s",
        c.3,
        d.3,
    );
    Ok(())
}

async fn drain_once(bench: &Bench, system: System, backlog: u64) -> Result<DrainRun> {
    let topic = bench.fresh(&format!("peers_drain_{}", system.name()));
    bench.kafka.create_topic(&topic, PARTITIONS).await?;
    let state = bench.position(system).await?;
    let ids = fill(bench, system, &topic, backlog).await?;
    let reader = Reader::start(bench.kafka.bootstrap(), &topic, system).await?;
    let profile = std::env::var_os("BENCH_PEERS_PG_PROFILE").is_some();
    if profile {
        bench.pool.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()").await?;
    }
    let pg_before = postgres_cpu();
    let mut peer = bench.start(system, state.as_ref())?;
    let started = peer.started;
    let watch = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            peer.check_alive()?;
            if reader.distinct() >= ids.len() {
                return anyhow::Ok(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(600), watch)
        .await
        .context("drain did not finish in 10 minutes")??;
    let arrivals = reader.finish(ids.len(), Duration::from_secs(10)).await?;
    let usage = peer.usage()?;
    let postgres_cpu = postgres_cpu_since(&pg_before);
    peer.stop()?;
    let last = arrivals.iter().map(|a| a.at).max().unwrap_or(started);
    let first = arrivals.iter().map(|a| a.at).min().unwrap_or(started);
    let seconds = last.duration_since(started).as_secs_f64();
    let check = Check::of(&ids, &arrivals);
    let rate = backlog as f64 / seconds;
    println!(
        "    {:<9} {:>9.0} events/s ({seconds:.1} s from process start to last arrival, the first after {:.1} s); process {:.1} CPU s, peak RSS {:.0} MiB; PostgreSQL {postgres_cpu:.1} CPU s; {}",
        system.name(),
        rate,
        first.duration_since(started).as_secs_f64(),
        usage.cpu_seconds,
        usage.peak_rss_mib,
        check.describe()
    );
    if profile {
        // Diagnostics: where PostgreSQL's time went (needs the extension
        // preloaded, as scripts/services.sh does).
        let top: Vec<(String, i64, f64)> = sqlx::query_as(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 110), calls, total_exec_time \
             FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             ORDER BY total_exec_time DESC LIMIT 6",
        )
        .fetch_all(&bench.pool)
        .await?;
        for (query, calls, ms) in top {
            println!("              {ms:>9.0} ms {calls:>7} calls  {query}");
        }
    }
    // What autovacuum does within a minute in production: a drained
    // backlog leaves dead tuples the next phase's reads would wade through
    // (consign) and a table of sent events (Debezium).
    match system {
        System::Consign => bench.pool.execute("VACUUM ANALYZE consign_outbox").await?,
        System::Debezium => bench.pool.execute("TRUNCATE peers_outbox").await?,
    };
    drop(state);
    Ok(DrainRun {
        rate,
        usage,
        postgres_cpu,
        check,
    })
}

// ----------------------------------------------------------- (b) latency

/// Single-event transactions at `rate` per second for `seconds` from
/// [`WRITERS`] writers, each with its own keys. Returns the ids and when
/// each one's COMMIT returned, and the rate reached.
async fn stream(
    bench: &Bench,
    system: System,
    topic: &str,
    rate: u64,
    seconds: u64,
    kill_at: Option<(Duration, tokio::sync::oneshot::Sender<()>)>,
) -> Result<(HashMap<Uuid, Instant>, f64)> {
    // At most 1000 transactions a second: above that, several events per
    // transaction (this machine's PostgreSQL commits about 3k single-event
    // transactions a second beside the rest of the benchmark).
    let per_tx = rate.div_ceil(1000);
    let transactions = rate * seconds / per_tx;
    let next = Arc::new(AtomicU64::new(0));
    let committed = Arc::new(Mutex::new(HashMap::with_capacity(usize::try_from(
        transactions * per_tx,
    )?)));
    let started = Instant::now();
    let interval = Duration::from_secs_f64(per_tx as f64 / rate as f64);
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let (pool, outbox, topic, next, committed) = (
            bench.pool.clone(),
            bench.outbox.clone(),
            topic.to_owned(),
            Arc::clone(&next),
            Arc::clone(&committed),
        );
        tasks.push(tokio::spawn(async move {
            let mut per_key: HashMap<u64, u64> = HashMap::new();
            let mut local = 0_u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= transactions {
                    break;
                }
                tokio::time::sleep_until((started + interval.mul_f64(i as f64)).into()).await;
                let mut tx = pool.begin().await?;
                let mut ids = Vec::with_capacity(usize::try_from(per_tx)?);
                for _ in 0..per_tx {
                    // Writer w owns keys w, w + 8, w + 16, ... (100 keys each).
                    let key_index = writer as u64 + WRITERS as u64 * (local % 100);
                    local += 1;
                    let key = format!("key-{key_index}");
                    let n = per_key.entry(key_index).or_insert(0);
                    *n += 1;
                    let body = payload(&key, *n);
                    ids.push(match system {
                        System::Consign => {
                            outbox
                                .enqueue(
                                    &mut *tx,
                                    Message::new(&topic, "OrderPlaced", body.into_bytes())
                                        .with_key(key),
                                )
                                .await?
                        }
                        System::Debezium => {
                            let id = Uuid::now_v7();
                            sqlx::query(
                                "INSERT INTO peers_outbox (id, aggregatetype, aggregateid, type, payload) \
                                 VALUES ($1, $2, $3, 'OrderPlaced', $4::jsonb)",
                            )
                            .bind(id)
                            .bind(&topic)
                            .bind(&key)
                            .bind(body)
                            .execute(&mut *tx)
                            .await?;
                            id
                        }
                    });
                }
                tx.commit().await?;
                let at = Instant::now();
                let mut committed = committed.lock().expect("not poisoned");
                committed.extend(ids.into_iter().map(|id| (id, at)));
            }
            anyhow::Ok(())
        }));
    }
    if let Some((after, kill)) = kill_at {
        tokio::time::sleep(after).await;
        let _ = kill.send(());
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let committed = std::mem::take(&mut *committed.lock().expect("not poisoned"));
    let reached = committed.len() as f64 / elapsed;
    Ok((committed, reached))
}

/// One event through `system`, to know it is streaming.
async fn warm_up(bench: &Bench, system: System, peer: &mut Peer) -> Result<()> {
    let topic = bench.fresh(&format!("peers_warmup_{}", system.name()));
    bench.kafka.create_topic(&topic, PARTITIONS).await?;
    let reader = Reader::start(bench.kafka.bootstrap(), &topic, system).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Repeat until one arrives: a connector still starting may not see the
    // first one (Debezium reads what commits after its slot position).
    while reader.distinct() == 0 {
        peer.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "{} did not deliver a warm-up event in 120 s",
            system.name()
        );
        stream(bench, system, &topic, 1, 1, None).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    reader.finish(0, Duration::ZERO).await?;
    if system == System::Consign {
        // A relay takes its partitions' leases over its first seconds; the
        // measurement starts once it holds all of them.
        loop {
            let held: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM consign_relay_leases WHERE owner IS NOT NULL AND expires_at > now()",
            )
            .fetch_one(&bench.pool)
            .await?;
            if held == i64::from(consign::outbox::PARTITIONS) {
                break;
            }
            peer.check_alive()?;
            ensure!(
                Instant::now() < deadline,
                "the relay did not hold every lease in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// A row of the table from [`Steady`]: its label, unit and figure.
type SteadyRow = (&'static str, &'static str, fn(&Steady) -> f64);

/// One system at one steady rate.
struct Steady {
    p50: f64,
    p90: f64,
    p99: f64,
    reached: f64,
    check: Check,
}

fn percentile(histogram: &Histogram<u64>, q: f64) -> f64 {
    histogram.value_at_quantile(q) as f64 / 1000.0
}

async fn steady(bench: &Bench, rates: &[u64], table: &mut Table) -> Result<()> {
    let seconds = env_number("BENCH_PEERS_SECONDS", 10);
    println!(
        "(b) commit -> arrival latency from {WRITERS} writers (at most 1000 transactions/s: rate/1000 events per transaction), {seconds} s per rate; one process per system for all rates"
    );
    let mut results: Vec<Vec<Steady>> = Vec::new();
    let mut usages = Vec::new();
    for system in System::BOTH {
        // The position (Debezium's offsets directory) lives as long as the process.
        let (mut peer, _position) = bench.start_warm(system).await?;
        let pg_before = postgres_cpu();
        let cpu_before = peer.usage()?.cpu_seconds;
        let mut row = Vec::new();
        for &rate in rates {
            let topic = bench.fresh(&format!("peers_steady_{}_{}", rate, system.name()));
            bench.kafka.create_topic(&topic, PARTITIONS).await?;
            let reader = Reader::start(bench.kafka.bootstrap(), &topic, system).await?;
            let (committed, reached) = stream(bench, system, &topic, rate, seconds, None).await?;
            let arrivals = reader
                .finish(committed.len(), Duration::from_secs(120))
                .await?;
            peer.check_alive()?;
            let ids: HashSet<Uuid> = committed.keys().copied().collect();
            let check = Check::of(&ids, &arrivals);
            let mut histogram = Histogram::<u64>::new(3)?;
            let mut seen = HashSet::new();
            for arrival in &arrivals {
                if let Some(commit) = committed.get(&arrival.id)
                    && seen.insert(arrival.id)
                {
                    histogram.record(u64::try_from(
                        arrival.at.saturating_duration_since(*commit).as_micros(),
                    )?)?;
                }
            }
            if let Some(slow) = std::env::var("BENCH_PEERS_SLOW_MS")
                .ok()
                .and_then(|v| v.parse::<u128>().ok())
            {
                // Diagnostics: when the slow events were committed.
                let first_commit = committed
                    .values()
                    .min()
                    .copied()
                    .unwrap_or_else(Instant::now);
                let mut at: Vec<String> = arrivals
                    .iter()
                    .filter_map(|a| {
                        let commit = committed.get(&a.id)?;
                        (a.at.saturating_duration_since(*commit).as_millis() > slow).then(|| {
                            format!("{:.2}", commit.duration_since(first_commit).as_secs_f64())
                        })
                    })
                    .collect();
                at.dedup();
                println!(
                    "    slower than {slow} ms, committed at (s): {}",
                    at.join(" ")
                );
            }
            let (p50, p90, p99) = (
                percentile(&histogram, 0.50),
                percentile(&histogram, 0.90),
                percentile(&histogram, 0.99),
            );
            println!(
                "    {:<9} at {rate:>6}/s (reached {reached:>7.0}/s): p50 {p50:>8.1} ms, p90 {p90:>8.1} ms, p99 {p99:>8.1} ms; {}",
                system.name(),
                check.describe()
            );
            row.push(Steady {
                p50,
                p90,
                p99,
                reached,
                check,
            });
        }
        let usage = peer.usage()?;
        let pg = postgres_cpu_since(&pg_before);
        println!(
            "    {:<9} over the steady phase: process {:.1} CPU s, peak RSS {:.0} MiB; PostgreSQL {pg:.1} CPU s",
            system.name(),
            usage.cpu_seconds - cpu_before,
            usage.peak_rss_mib
        );
        peer.stop()?;
        if system == System::Debezium {
            bench.pool.execute("TRUNCATE peers_outbox").await?;
        }
        usages.push((usage.peak_rss_mib, usage.cpu_seconds - cpu_before, pg));
        results.push(row);
    }
    for (i, rate) in rates.iter().enumerate() {
        let (c, d) = (&results[0][i], &results[1][i]);
        let rows: [SteadyRow; 4] = [
            ("reached rate, aimed at", "ev/s", |s| s.reached),
            ("p50 latency at", "ms", |s| s.p50),
            ("p90 latency at", "ms", |s| s.p90),
            ("p99 latency at", "ms", |s| s.p99),
        ];
        for (what, unit, figure) in rows {
            table.add(
                &format!("(b) {what} {rate}/s"),
                unit,
                Figure::new(figure(c), &c.check),
                Figure::new(figure(d), &d.check),
            );
        }
    }
    let valid = Check::default();
    table.add(
        "(c) peak RSS, steady phase",
        "MiB",
        Figure::new(usages[0].0, &valid),
        Figure::new(usages[1].0, &valid),
    );
    table.add(
        "(c) process CPU, steady phase",
        "s",
        Figure::new(usages[0].1, &valid),
        Figure::new(usages[1].1, &valid),
    );
    table.add(
        "(c) PostgreSQL CPU, steady phase",
        "s",
        Figure::new(usages[0].2, &valid),
        Figure::new(usages[1].2, &valid),
    );
    Ok(())
}

// ------------------------------------------------------------ (d) writer cost

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Write {
    OrderOnly,
    Consign,
    Debezium,
}

async fn writer_cost(bench: &Bench, table: &mut Table) -> Result<()> {
    let seconds = 4.0;
    let variants = [
        (Write::OrderOnly, "order row only"),
        (Write::Consign, "order + consign enqueue"),
        (Write::Debezium, "order + Debezium outbox INSERT"),
    ];
    println!(
        "(d) business transactions per second, {WRITERS} writers, {seconds} s rounds, 3 interleaved rounds (no relay running)"
    );
    let next_order = Arc::new(AtomicU64::new(0));
    let mut figures: HashMap<Write, Vec<f64>> = HashMap::new();
    for _ in 0..3 {
        for (variant, _) in variants {
            let tps = write_round(bench, variant, seconds, &next_order).await?;
            figures.entry(variant).or_default().push(tps);
        }
        bench
            .pool
            .execute("TRUNCATE consign_outbox, peers_outbox")
            .await?;
    }
    let mut medians = HashMap::new();
    for (variant, label) in variants {
        let (median, rounds) = summary(&figures[&variant]);
        println!("    {label:<34} {median:>8.0} tx/s (rounds: {rounds})");
        medians.insert(variant, median);
    }
    let valid = Check::default();
    table.add(
        "(d) writer: order + outbox row",
        "tx/s",
        Figure::new(medians[&Write::Consign], &valid),
        Figure::new(medians[&Write::Debezium], &valid),
    );
    Ok(())
}

async fn write_round(
    bench: &Bench,
    variant: Write,
    seconds: f64,
    next_order: &Arc<AtomicU64>,
) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let (pool, outbox, next_order, done) = (
            bench.pool.clone(),
            bench.outbox.clone(),
            Arc::clone(next_order),
            Arc::clone(&done),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let order = i64::try_from(next_order.fetch_add(1, Ordering::Relaxed))?;
                let key = format!("order-{order}");
                let body = payload(&key, 1);
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO peers_orders (id, customer, total_cents) VALUES ($1, 'alice', 1999)")
                    .bind(order)
                    .execute(&mut *tx)
                    .await?;
                match variant {
                    Write::OrderOnly => {}
                    Write::Consign => {
                        outbox
                            .enqueue(&mut *tx, Message::new("peers.orders", "OrderPlaced", body.into_bytes()).with_key(key))
                            .await?;
                    }
                    Write::Debezium => {
                        sqlx::query(
                            "INSERT INTO peers_outbox (id, aggregatetype, aggregateid, type, payload) \
                             VALUES ($1, 'peers.orders', $2, 'OrderPlaced', $3::jsonb)",
                        )
                        .bind(Uuid::now_v7())
                        .bind(&key)
                        .bind(body)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                tx.commit().await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let started = Instant::now();
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64().max(seconds))
}

// ------------------------------------------------------------- (e) recovery

async fn recovery(bench: &Bench, table: &mut Table) -> Result<()> {
    let rate = 1000;
    let seconds = 12;
    println!(
        "(e) recovery: {rate} events/s for {seconds} s; the process SIGKILLed after 5 s and started again at once"
    );
    let mut resumes = Vec::new();
    let mut duplicates = Vec::new();
    for system in System::BOTH {
        let (mut peer, state) = bench.start_warm(system).await?;
        let topic = bench.fresh(&format!("peers_recovery_{}", system.name()));
        bench.kafka.create_topic(&topic, PARTITIONS).await?;
        let reader = Reader::start(bench.kafka.bootstrap(), &topic, system).await?;
        let (kill, killed) = tokio::sync::oneshot::channel();
        let writing = stream(
            bench,
            system,
            &topic,
            rate,
            seconds,
            Some((Duration::from_secs(5), kill)),
        );
        let restart = async {
            killed.await?;
            peer.kill()?;
            let killed_at = Instant::now();
            let before = reader.distinct();
            let restarted = bench.start(system, state.as_ref())?;
            anyhow::Ok((restarted, before, killed_at))
        };
        let ((committed, _), (restarted, arrived_before, killed_at)) =
            tokio::try_join!(writing, restart)?;
        let arrivals = reader
            .finish(committed.len(), Duration::from_secs(180))
            .await?;
        let restart_at = restarted.started;
        restarted.stop()?;
        let ids: HashSet<Uuid> = committed.keys().copied().collect();
        let check = Check::of(&ids, &arrivals);
        // Only the restarted process can deliver an event committed after
        // the kill: the first such arrival is when it resumed.
        let first_new = arrivals
            .iter()
            .filter(|a| {
                committed
                    .get(&a.id)
                    .is_some_and(|commit| *commit > killed_at)
            })
            .map(|a| a.at)
            .min();
        let resume = first_new.map_or(f64::NAN, |t| t.duration_since(restart_at).as_secs_f64());
        println!(
            "    {:<9} {arrived_before} arrived before the kill; first new event {resume:.2} s after the restart; {}",
            system.name(),
            check.describe()
        );
        if system == System::Debezium {
            bench.pool.execute("TRUNCATE peers_outbox").await?;
        }
        resumes.push(Figure::new(resume, &check));
        duplicates.push(Figure::new(check.duplicates as f64, &check));
    }
    table.add(
        "(e) restart to first new event",
        "s",
        resumes[0],
        resumes[1],
    );
    table.add(
        "(e) events sent twice after kill -9",
        "events",
        duplicates[0],
        duplicates[1],
    );
    Ok(())
}
