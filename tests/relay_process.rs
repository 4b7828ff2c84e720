//! The `consign-relay` binary as a separate process: killed, stopped,
//! misconfigured.

use std::time::Duration;

use consign_test_support::{
    RelayProcess, TopicReader, broker_test, db, eventually,
    net::TcpProxy,
    relay_config,
    stream::{Stream, assert_complete_and_ordered, write_stream},
    unique_topic,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);

broker_test! {
    async fn relay_killed_with_sigkill_at_random_points_loses_nothing(pool: PgPool, broker: TestBroker) {
        const EVENTS: usize = 20_000;
        let topic = unique_topic("sigkill");
        broker.create_topic(&topic, 6).await.unwrap();
        let config = relay_config(
            &db::url(&pool),
            broker.bootstrap(),
            &[("batch-size", "200")],
            &[],
        );

        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        // With 50 ms broker round trips, each batch spends most of its time
        // produced but not yet acknowledged or deleted: kills land mid-batch.
        if let Some(mock) = broker.mock() {
            mock.set_round_trip(Duration::from_millis(50)).unwrap();
        }
        // A stream of at least 8 s (20 events per 8 ms); the relay is killed at
        // random points for as long as it lasts.
        let writer = tokio::spawn(write_stream(
            pool.clone(),
            topic.clone(),
            Stream::new(EVENTS, 50)
                .per_tx(20)
                .pace(Duration::from_millis(8)),
        ));
        let mut relay = RelayProcess::start(&config).unwrap();
        let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
        let (mut kills, mut busy_kills) = (0, 0);
        while !writer.is_finished() && kills < 15 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..1000))).await;
            let waiting = db::outbox_len(&pool).await.unwrap();
            relay.kill().unwrap();
            kills += 1;
            busy_kills += usize::from(waiting > 0);
            println!("kill {kills}: SIGKILL with {waiting} rows in the outbox");
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
            relay = RelayProcess::start(&config).unwrap();
        }
        assert!(
            busy_kills >= 5,
            "only {busy_kills} of {kills} kills hit a relay with work to do"
        );
        let ids = writer.await.unwrap();
        reader.read_distinct(EVENTS, WAIT).await.unwrap();
        db::wait_drained(&pool, WAIT).await.unwrap();
        reader.read_to_end(WAIT).await.unwrap();
        println!(
            "{} events delivered after {kills} SIGKILLs; {} duplicates on the topic",
            reader.distinct(),
            reader.duplicates()
        );
        assert_complete_and_ordered(&ids, &reader);
        relay.terminate(Duration::from_secs(20)).await.unwrap();
    }
}

broker_test! {
    async fn sigterm_exits_zero_and_loses_nothing(pool: PgPool, broker: TestBroker) {
        let topic = unique_topic("sigterm");
        broker.create_topic(&topic, 3).await.unwrap();
        let config = relay_config(
            &db::url(&pool),
            broker.bootstrap(),
            &[("batch-size", "200")],
            &[],
        );

        let (writer, mut relay, mut reader) =
            relay_mid_stream(&pool, broker.bootstrap(), &topic, &config, 5000, 50).await;
        relay.stop(Duration::from_secs(30)).await.unwrap();
        let output = relay.output();
        assert!(output.contains("relay stopped"), "{output}");

        let ids = writer.await.unwrap();
        let left = db::outbox_len(&pool).await.unwrap();
        println!("stopped with {left} rows left in the outbox");
        let mut relay = RelayProcess::start(&config).unwrap();
        reader.read_distinct(ids.len(), WAIT).await.unwrap();
        assert_complete_and_ordered(&ids, &reader);
        relay.terminate(Duration::from_secs(20)).await.unwrap();
    }
}

broker_test! {
    /// A database that stops answering (a query waiting on a lock, then
    /// connections gone silent as in a hung server or a partition that drops
    /// packets) cannot hold a stopping relay: the batch stuck in its query is
    /// abandoned after `shutdown-timeout` plus 5 s, lease upkeep and sampling
    /// are dropped, the relay exits 0, and a successor delivers everything.
    async fn sigterm_while_postgres_hangs_exits_and_loses_nothing(pool: PgPool, broker: TestBroker) {
        let topic = unique_topic("pghang");
        broker.create_topic(&topic, 3).await.unwrap();
        let (proxy, url) = TcpProxy::for_database(&pool).await.unwrap();
        // Connections to spare, so the publishing loop gets stuck in its query
        // rather than waiting for a connection (which times out by itself).
        let proxied = relay_config(&url, broker.bootstrap(), &[("batch-size", "200")], &[])
            .replace("[database]\n", "[database]\nmax-connections = 8\n");

        let (writer, mut relay, mut reader) =
            relay_mid_stream(&pool, broker.bootstrap(), &topic, &proxied, 3000, 30).await;
        // Mid-stream a migration-like lock holds the outbox: the relay's next
        // read (within one poll interval) waits on it. Then its connections go
        // silent as well (lease upkeep, health checks, the final release).
        let lock = lock_outbox_under_the_relay(&pool).await;
        proxy.freeze();
        let stopping = std::time::Instant::now();
        relay.stop(Duration::from_secs(40)).await.unwrap();
        let output = relay.output();
        println!("stopped in {:?} with PostgreSQL silent", stopping.elapsed());
        assert!(output.contains("abandoning it"), "{output}");
        assert!(output.contains("relay stopped"), "{output}");
        lock.rollback().await.unwrap();

        let ids = writer.await.unwrap();
        let direct = relay_config(&db::url(&pool), broker.bootstrap(), &[], &[]);
        let mut successor = RelayProcess::start(&direct).unwrap();
        reader.read_distinct(ids.len(), WAIT).await.unwrap();
        assert_complete_and_ordered(&ids, &reader);
        println!(
            "{} events delivered, {} duplicates",
            reader.distinct(),
            reader.duplicates()
        );
        successor.terminate(Duration::from_secs(20)).await.unwrap();
    }
}

broker_test! {
    /// A database that goes silent at the network level while the relay runs
    /// (its connections open but nothing answers: a route that dropped its
    /// flows, a stalled VM) holds the relay no longer than about
    /// `statement-timeout` + 5 s: it drops those connections, opens new ones
    /// and goes on (issue 13 item 13). Before the deadline the relay waited
    /// for TCP to give up, here for ever.
    async fn database_gone_silent_mid_stream_is_left_after_the_deadline_and_flow_resumes(pool: PgPool, broker: TestBroker) {
        let topic = unique_topic("pgsilent");
        broker.create_topic(&topic, 3).await.unwrap();
        let (proxy, url) = TcpProxy::for_database(&pool).await.unwrap();
        let config = relay_config(&url, broker.bootstrap(), &[], &[])
            .replace("[database]\n", "[database]\nstatement-timeout = \"2s\"\n");
        let later = unique_topic("pgsilent-later");
        broker.create_topic(&later, 3).await.unwrap();
        let mut later_reader = TopicReader::new(broker.bootstrap(), &later).unwrap();
        let (writer, mut relay, mut reader) =
            relay_mid_stream(&pool, broker.bootstrap(), &topic, &config, 2000, 30).await;
        // Catch the relay with a query in flight (waiting on a lock), then
        // silence its connections: the answer never reaches it.
        let lock = lock_outbox_under_the_relay(&pool).await;
        proxy.black_hole();
        let silenced = std::time::Instant::now();
        lock.rollback().await.unwrap();
        let ids = writer.await.unwrap();
        // Written after the relay's connections went silent: only a relay
        // that left them delivers these.
        let later_ids = write_stream(pool.clone(), later.clone(), Stream::new(500, 30)).await;
        let delivered = later_reader
            .read_distinct(later_ids.len(), Duration::from_secs(90))
            .await;
        let output = relay.output();
        delivered.unwrap_or_else(|e| panic!("{e:#}\n{output}"));
        println!(
            "{} events written after the database went silent delivered {:?} after it",
            later_ids.len(),
            silenced.elapsed(),
        );
        reader.read_distinct(ids.len(), WAIT).await.unwrap();
        assert_complete_and_ordered(&ids, &reader);
        assert_complete_and_ordered(&later_ids, &later_reader);
        assert!(output.contains("did not answer within"), "{output}");
        relay.terminate(Duration::from_secs(20)).await.unwrap();
    }
}

broker_test! {
    /// A lock held on the outbox (a migration, a forgotten transaction) does not
    /// stall a running relay unseen: its statement is cancelled after
    /// `database.statement-timeout`, it says so, retries with backoff, and
    /// carries on once the lock is gone.
    async fn statement_waiting_on_a_lock_is_cancelled_and_retried(pool: PgPool, broker: TestBroker) {
        let topic = unique_topic("stmt-timeout");
        broker.create_topic(&topic, 3).await.unwrap();
        let config = relay_config(&db::url(&pool), broker.bootstrap(), &[], &[])
            .replace("[database]\n", "[database]\nstatement-timeout = \"1s\"\n");
        let (writer, mut relay, mut reader) =
            relay_mid_stream(&pool, broker.bootstrap(), &topic, &config, 2000, 30).await;
        let lock = db::lock_outbox(&pool).await.unwrap();
        // Without a statement timeout the relay's read would wait as long as
        // the lock is held, and say nothing. Twice: cancelled, retried, and
        // cancelled again while the lock stays.
        eventually(
            "the relay to report cancelled statements",
            Duration::from_secs(30),
            || async {
                let reports = relay.output().matches("statement_timeout").count();
                Ok((reports >= 2).then_some(()))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.output()));
        lock.rollback().await.unwrap();

        let ids = writer.await.unwrap();
        reader.read_distinct(ids.len(), WAIT).await.unwrap();
        assert_complete_and_ordered(&ids, &reader);
        db::wait_drained(&pool, WAIT).await.unwrap();
        relay.stop(Duration::from_secs(30)).await.unwrap();
        let output = relay.output();
        assert!(
            output.contains("canceling statement due to statement timeout"),
            "{output}"
        );
    }
}

broker_test! {
    /// `consign-relay run` is woken by nothing: with batch polls 10 s apart
    /// (file) and the idle probe at 20 ms (`CONSIGN_RELAY__IDLE_PROBE_INTERVAL`),
    /// events written to its idle outbox still arrive within seconds. The
    /// bound is generous (a shared machine); without the probe each takes
    /// up to 10 s.
    async fn relay_process_idle_probe_ships_before_the_next_poll(pool: PgPool, broker: TestBroker) {
        let topic = unique_topic("probe-process");
        broker.create_topic(&topic, 3).await.unwrap();
        let config = relay_config(
            &db::url(&pool),
            broker.bootstrap(),
            &[("poll-interval", "\"10s\""), ("max-poll-interval", "\"10s\"")],
            &[],
        );
        let mut relay =
            RelayProcess::start_with(&config, &["run"], &[("CONSIGN_RELAY__IDLE_PROBE_INTERVAL", "20ms")])
                .unwrap();
        let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
        let outbox = consign::Outbox::new();
        for n in 0..4 {
            let mut tx = pool.begin().await.unwrap();
            outbox
                .enqueue(&mut *tx, consign::Message::new(&topic, "E", b"{}".to_vec()).with_key("k"))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            // The first waits for the relay to start and take its leases.
            let within = if n == 0 { WAIT } else { Duration::from_secs(3) };
            reader
                .read_distinct(n + 1, within)
                .await
                .unwrap_or_else(|e| panic!("event {n}: {e}; relay output:\n{}", relay.output()));
        }
        relay.terminate(Duration::from_secs(20)).await.unwrap();
    }
}

/// Starts a writer of `events` events over `keys` keys (10 per
/// transaction, paced) and a relay with `config`; returns once 100 events
/// arrived.
/// Locks the outbox (as a migration would) and waits until the relay's next
/// read waits on the lock. Roll the returned transaction back to release it.
async fn lock_outbox_under_the_relay(pool: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let lock = db::lock_outbox(pool).await.unwrap();
    eventually("the relay's read waits on the lock", WAIT, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = 'consign-relay' AND wait_event_type = 'Lock'
               AND datname = current_database()",
        )
        .fetch_one(pool)
        .await?;
        Ok((waiting > 0).then_some(()))
    })
    .await
    .unwrap();
    lock
}

async fn relay_mid_stream(
    pool: &PgPool,
    bootstrap: &str,
    topic: &str,
    config: &str,
    events: usize,
    keys: usize,
) -> (JoinHandle<Vec<Uuid>>, RelayProcess, TopicReader) {
    let writer = tokio::spawn(write_stream(
        pool.clone(),
        topic.to_owned(),
        Stream::new(events, keys)
            .per_tx(10)
            .pace(Duration::from_millis(2)),
    ));
    let relay = RelayProcess::start(config).unwrap();
    let mut reader = TopicReader::new(bootstrap, topic).unwrap();
    reader.read_distinct(100, WAIT).await.unwrap();
    (writer, relay, reader)
}

#[sqlx::test(migrations = false)]
async fn invalid_configuration_exits_nonzero_naming_the_field(pool: PgPool) {
    let url = db::url(&pool);
    type Env<'a> = &'a [(&'a str, &'a str)];
    let cases: [(&str, String, Env<'_>); 9] = [
        (
            "relay.batch-size",
            relay_config(&url, "h:1", &[("batch-size", "0")], &[]),
            &[],
        ),
        (
            "relay.batch-size",
            relay_config(&url, "h:1", &[("batch-size", "\"many\"")], &[]),
            &[],
        ),
        (
            "relay.poll-interval",
            relay_config(&url, "h:1", &[("poll-interval", "\"soon\"")], &[]),
            &[],
        ),
        (
            "relay.batch-sise",
            relay_config(&url, "h:1", &[("batch-sise", "10")], &[]),
            &[],
        ),
        (
            "kafka.no.such.property",
            relay_config(&url, "h:1", &[], &[("no.such.property", "1")]),
            &[],
        ),
        (
            "kafka.linger.ms",
            relay_config(&url, "h:1", &[], &[("linger.ms", "\"soon\"")]),
            &[],
        ),
        (
            "kafka.bootstrap.servers",
            relay_config(&url, "", &[], &[]),
            &[],
        ),
        (
            "database.url",
            relay_config("oracle://nope", "h:1", &[], &[]),
            &[],
        ),
        (
            "relay.batch-size",
            relay_config(&url, "h:1", &[], &[]),
            &[("CONSIGN_RELAY__BATCH_SIZE", "0")],
        ),
    ];
    for (field, config, env) in cases {
        let mut relay = RelayProcess::start_with(&config, &["run"], env).unwrap();
        let status = relay.wait(Duration::from_secs(20)).await.unwrap();
        let output = relay.output();
        println!("{field}: {}", output.trim());
        assert!(!status.success(), "{field}: exited {status:?}");
        assert!(output.contains(field), "{field} not named in: {output}");
    }
    let mut relay = RelayProcess::start_with("[relay]\nbatch-size = 10\n", &["run"], &[]).unwrap();
    assert!(!relay.wait(Duration::from_secs(20)).await.unwrap().success());
    assert!(
        relay.output().contains("database.url"),
        "{}",
        relay.output()
    );
}

#[sqlx::test(migrations = false)]
async fn migrate_command_creates_the_schema_and_is_idempotent(pool: PgPool) {
    let config = relay_config(&db::url(&pool), "unused:9092", &[], &[]);
    let latest = consign::MIGRATOR.iter().map(|m| m.version).max().unwrap();
    for _ in 0..2 {
        let mut migrate = RelayProcess::start_with(&config, &["migrate"], &[]).unwrap();
        let status = migrate.wait(Duration::from_secs(30)).await.unwrap();
        assert!(status.success(), "{}", migrate.output());
        assert!(
            migrate
                .output()
                .contains(&format!("consign schema is at version {latest}")),
            "{}",
            migrate.output()
        );
    }
    for expected in [
        "consign_outbox",
        "consign_inbox",
        "consign_inbox_offsets",
        "consign_dead_letters",
        "consign_outbox_archive",
    ] {
        let table: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(expected)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(table.as_deref(), Some(expected));
    }
}

/// `consign-relay migrate` picks the backend by the URL's scheme: consign's
/// schema on MariaDB (mysql://) and SQLite (sqlite://, the file created),
/// twice without error; `config check` and `status` work on them.
#[tokio::test]
async fn migrate_command_picks_the_backend_by_url_scheme() {
    let (mysql_url, mysql_db) = consign_test_support::backends::mysql_database()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite://{}", dir.path().join("consign.db").display());
    let latest = |dir: &str| {
        std::fs::read_dir(format!("{}/migrations/{dir}", env!("CARGO_MANIFEST_DIR")))
            .unwrap()
            .count()
    };
    for (url, backend) in [(&mysql_url, "mysql"), (&sqlite_url, "sqlite")] {
        for _ in 0..2 {
            let (ok, output) = relay_with_env(&["migrate"], &[("DATABASE_URL", url)]).await;
            assert!(ok, "{backend}: {output}");
            assert!(
                output.contains(&format!("consign schema is at version {}", latest(backend))),
                "{backend}: {output}"
            );
        }
        let env = [
            ("DATABASE_URL", url.as_str()),
            ("CONSIGN_KAFKA__BOOTSTRAP_SERVERS", "h:1"),
        ];
        let (ok, output) = relay_with_env(&["config", "check"], &env).await;
        assert!(ok, "{backend}: {output}");
        let (ok, output) = relay_with_env(&["status", "--json"], &env).await;
        assert!(ok, "{backend}: {output}");
        assert!(output.contains("\"leases\""), "{backend}: {output}");
    }
    let leases: i64 = {
        let pool = sqlx::MySqlPool::connect(&mysql_url).await.unwrap();
        let n = sqlx::query_scalar("SELECT count(*) FROM consign_relay_leases")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        n
    };
    assert_eq!(leases, 32);
    let sqlite = sqlx::SqlitePool::connect(&sqlite_url).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name LIKE 'consign_%'",
    )
    .fetch_one(&sqlite)
    .await
    .unwrap();
    assert_eq!(
        tables, 8,
        "outbox, inbox, offsets, dead letters, leases, relays, identity, archive"
    );
    consign_test_support::backends::drop_mysql(None, &mysql_db)
        .await
        .unwrap();
}

/// A SQLite file the relay cannot use stops `run` at once, naming the file
/// and the problem: missing (create it with `migrate`), not writable (here
/// opened read-only, since tests run as root, whom file modes do not stop),
/// or a path that cannot be a file.
#[tokio::test]
async fn sqlite_file_problems_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("consign.db");
    let url = format!("sqlite://{}", file.display());
    let run = async |url: &str| {
        relay_with_env(
            &["run"],
            &[
                ("DATABASE_URL", url),
                ("CONSIGN_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1"),
            ],
        )
        .await
    };
    let (ok, output) = run(&url).await;
    assert!(!ok, "{output}");
    assert!(
        output.contains(&format!(
            "cannot use the SQLite file {}: no such file; create it with `consign-relay migrate`",
            file.display()
        )),
        "{output}"
    );

    let (ok, output) = relay_with_env(&["migrate"], &[("DATABASE_URL", &url)]).await;
    assert!(ok, "{output}");
    let (ok, output) = run(&format!("{url}?mode=ro")).await;
    assert!(!ok, "{output}");
    assert!(
        output.contains("attempt to write a readonly database")
            && output.contains("needs to read and write the file"),
        "{output}"
    );

    let not_a_dir = format!("sqlite://{}/inside.db", file.display());
    let (ok, output) = relay_with_env(&["migrate"], &[("DATABASE_URL", &not_a_dir)]).await;
    assert!(!ok, "{output}");
    assert!(
        output.contains("cannot use the SQLite file") && output.contains("unable to open"),
        "{output}"
    );
}

/// Runs `consign-relay` with `args` and only the environment `env`; returns
/// whether it succeeded and what it printed.
async fn relay_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut relay = RelayProcess::start_relay(args, env).unwrap();
    let status = relay.wait(Duration::from_secs(20)).await.unwrap();
    (status.success(), relay.output())
}

/// Every environment form the README documents works through the binary, as
/// containers use it: `DATABASE_URL`, `CONSIGN_<SECTION>__<FIELD>` (in
/// `[kafka]`, `_` stands for `.`), `CONSIGN_CONFIG` for the file and
/// `CONSIGN_PROFILE`.
#[tokio::test]
async fn documented_environment_variables_configure_the_relay() {
    let url = "postgres://app@db.internal:5432/orders";
    let env = [
        ("DATABASE_URL", url),
        ("CONSIGN_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        ("CONSIGN_KAFKA__LINGER_MS", "5"),
        ("CONSIGN_RELAY__BATCH_SIZE", "500"),
        ("CONSIGN_PROFILE", "development"),
    ];
    let (ok, output) = relay_with_env(&["config", "check"], &env).await;
    assert!(
        ok,
        "config check refused the documented variables: {output}"
    );
    let (ok, output) = relay_with_env(&["config", "show", "--json"], &env).await;
    assert!(ok, "{output}");
    let json_start = output
        .find('{')
        .unwrap_or_else(|| panic!("no JSON: {output}"));
    let shown: serde_json::Value = serde_json::from_str(&output[json_start..]).unwrap();
    assert_eq!(
        shown["kafka"]["bootstrap.servers"], "127.0.0.1:9092",
        "{shown}"
    );
    assert_eq!(shown["kafka"]["linger.ms"], "5", "{shown}");
    assert_eq!(shown["relay"]["batch-size"], 500, "{shown}");
    assert_eq!(shown["profile"], "development", "{shown}");
    assert_eq!(shown["database"]["url"], url, "{shown}");

    // The file through CONSIGN_CONFIG, a variable on top of it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        format!("[database]\nurl = {url:?}\n\n[kafka]\n\"bootstrap.servers\" = \"k1:9092\"\n"),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let (ok, output) = relay_with_env(&["config", "check"], &[("CONSIGN_CONFIG", file)]).await;
    assert!(ok, "CONSIGN_CONFIG refused: {output}");
    let (ok, output) = relay_with_env(
        &["config", "show", "--json"],
        &[("CONSIGN_CONFIG", file), ("CONSIGN_RELAY__BATCH_SIZE", "7")],
    )
    .await;
    assert!(ok, "{output}");
    assert!(
        output.contains("k1:9092") && output.contains("\"batch-size\": 7"),
        "{output}"
    );

    // config check refuses what run would: a property librdkafka refuses.
    let (ok, output) = relay_with_env(
        &["config", "check"],
        &[
            ("CONSIGN_CONFIG", file),
            ("CONSIGN_KAFKA__COMPRESSION_TYPE", "brotli"),
        ],
    )
    .await;
    assert!(!ok, "config check accepted a property librdkafka refuses");
    assert!(output.contains("kafka.compression.type"), "{output}");

    // The README's example of a refused value.
    let (ok, output) = relay_with_env(
        &["config", "check"],
        &[
            ("CONSIGN_CONFIG", file),
            ("CONSIGN_RELAY__LEASE_TTL", "100ms"),
        ],
    )
    .await;
    assert!(!ok);
    assert!(
        output.contains("relay.lease-ttl: must be between 1s and 10m, got 100ms"),
        "{output}"
    );
}
