//! The outbox on every backend: PostgreSQL, MariaDB (for MySQL) and SQLite,
//! one test body each (`on_every_backend!`). Needs the MariaDB of
//! `scripts/services.sh mariadb` (or `MYSQL_URL`); SQLite needs nothing.

use std::time::Duration;

use consign::{Message, Outbox};
use consign_test_support::backends;

/// Runs one async test body on each backend, with `$pool` bound to a fresh
/// database of it that has consign's schema. The body is written once and
/// type-checked once per backend.
macro_rules! on_every_backend {
    ($(#[$meta:meta])* async fn $name:ident($pool:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let ($pool, db) = backends::postgres().await.unwrap();
                $body
                backends::drop_postgres($pool, &db).await.unwrap();
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                let ($pool, db) = backends::mysql().await.unwrap();
                $body
                backends::drop_mysql(Some($pool), &db).await.unwrap();
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let ($pool, _dir) = backends::sqlite().await.unwrap();
                $body
            }
        }
    };
}

/// Rows in the outbox.
macro_rules! count {
    ($pool:expr) => {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM consign_outbox")
            .fetch_one(&$pool)
            .await
            .unwrap()
    };
}

on_every_backend! {
    /// A rolled-back transaction leaves no event; a committed one leaves
    /// exactly its events.
    async fn rollback_leaves_no_event(pool) {
        let outbox = Outbox::new();
        let mut tx = pool.begin().await.unwrap();
        outbox
            .enqueue(&mut *tx, Message::new("orders", "Placed", b"{}".to_vec()).with_key("o-1"))
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(count!(pool), 0);

        let mut tx = pool.begin().await.unwrap();
        let msg = Message::new("orders", "Placed", b"{}".to_vec())
            .with_key("o-1")
            .with_header("tenant", "acme");
        let id = outbox.enqueue(&mut *tx, msg).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(count!(pool), 1);
        let (stored, headers): (uuid::Uuid, sqlx::types::Json<serde_json::Value>) =
            sqlx::query_as("SELECT id, headers FROM consign_outbox")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(stored, id);
        assert_eq!(headers.0, serde_json::json!({"tenant": "acme"}));
    }
}

on_every_backend! {
    /// An invalid message in a batch writes nothing and leaves the
    /// transaction usable.
    async fn an_invalid_message_writes_nothing(pool) {
        let outbox = Outbox::new();
        let mut tx = pool.begin().await.unwrap();
        let batch = [
            Message::new("orders", "Placed", b"{}".to_vec()),
            Message::new("no spaces allowed", "Placed", b"{}".to_vec()),
        ];
        let error = outbox.enqueue_batch(&mut *tx, &batch).await.unwrap_err();
        assert!(error.to_string().contains("message 1"), "{error}");
        outbox.enqueue(&mut *tx, batch[0].clone()).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(count!(pool), 1);
    }
}

on_every_backend! {
    /// Concurrent writers, batches of 10: every key's events are stored in
    /// the order its writer enqueued them (the relay publishes in `seq`
    /// order).
    async fn concurrent_writers_keep_each_keys_order(pool) {
        const WRITERS: usize = 4;
        const PER_WRITER: usize = 500;
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                let outbox = Outbox::new();
                for start in (0..PER_WRITER).step_by(10) {
                    let batch: Vec<Message> = (start..start + 10)
                        .map(|n| {
                            let key = format!("w{writer}-k{}", n % 25);
                            Message::new("orders", "Step", format!("{key}:{n}").into_bytes())
                                .with_key(key)
                        })
                        .collect();
                    let mut tx = pool.begin().await.unwrap();
                    outbox.enqueue_batch(&mut *tx, &batch).await.unwrap();
                    tx.commit().await.unwrap();
                }
            }));
        }
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(120), task)
                .await
                .expect("writers finish")
                .unwrap();
        }
        let payloads: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT payload FROM consign_outbox ORDER BY seq")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(payloads.len(), WRITERS * PER_WRITER);
        let mut last = std::collections::HashMap::<String, usize>::new();
        for payload in payloads {
            let text = String::from_utf8(payload).unwrap();
            let (key, n) = text.split_once(':').unwrap();
            let n: usize = n.parse().unwrap();
            if let Some(previous) = last.insert(key.to_owned(), n) {
                assert!(previous < n, "{key}: {n} stored after {previous}");
            }
        }
        assert_eq!(last.len(), WRITERS * 25);
    }
}

on_every_backend! {
    /// `migrate` is idempotent and creates every table: outbox, leases with
    /// epochs (32 partitions), identity, inbox, offsets, dead letters, archive.
    async fn migrate_twice_creates_every_table(pool) {
        consign::migrate(&pool).await.unwrap();
        for table in [
            "consign_outbox",
            "consign_relays",
            "consign_inbox",
            "consign_inbox_offsets",
            "consign_dead_letters",
            "consign_outbox_archive",
        ] {
            let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(rows, 0, "{table}");
        }
        let leases: i64 = sqlx::query_scalar("SELECT count(*) FROM consign_relay_leases")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(leases, 32);
        let identity: uuid::Uuid = sqlx::query_scalar("SELECT outbox_id FROM consign_outbox_identity")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(!identity.is_nil());
    }
}

// ---------------------------------------------------------------------------
// The relay's guarantees on every backend: one body per guarantee (a plain
// async fn over `TestDb`, which hides the backend), run once per database.
// Kafka is librdkafka's mock cluster: what these prove is the database side
// (order, fencing, crash recovery); the broker side is proved on real Kafka
// in tests/real_kafka.rs and the `::kafka` tests.
// ---------------------------------------------------------------------------

use consign::Relay;
use consign_test_support::{
    MockKafka, RelayProcess, TopicReader,
    backends::{Backend, TestDb},
    fast_relay_settings, relay_config,
    stream::{Stream, assert_complete_and_ordered},
    unique_topic,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

const WAIT: Duration = Duration::from_secs(120);

/// Runs `body(&TestDb)` on each listed backend (`postgres`, `mysql`,
/// `sqlite`), each test with a fresh database.
macro_rules! guarantee {
    ($(#[$meta:meta])* [$($backend:ident),+] async fn $name:ident($db:ident: &TestDb) $body:block) => {
        $(#[$meta])*
        mod $name {
            use super::*;

            async fn body($db: &TestDb) $body

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $backend() {
                    let db = TestDb::new(guarantee!(@backend $backend)).await.unwrap();
                    body(&db).await;
                    db.drop().await.unwrap();
                }
            )+
        }
    };
    (@backend postgres) => { Backend::Postgres };
    (@backend mysql) => { Backend::MySql };
    (@backend sqlite) => { Backend::Sqlite };
}

/// Reads `topic` until every one of `ids` arrived and the outbox is empty,
/// then asserts none is missing and each key's events are in order once
/// duplicates are dropped.
async fn all_arrived_in_order(db: &TestDb, kafka: &MockKafka, topic: &str, ids: &[uuid::Uuid]) {
    let mut reader = TopicReader::new(kafka.bootstrap(), topic).unwrap();
    reader.read_distinct(ids.len(), WAIT).await.unwrap();
    db.wait_drained(WAIT).await.unwrap();
    reader.read_to_end(WAIT).await.unwrap();
    println!(
        "{} events, {} duplicates",
        reader.distinct(),
        reader.duplicates()
    );
    assert_complete_and_ordered(ids, &reader);
}

/// Waits until `relay` holds partition leases.
async fn publishing(db: &TestDb, relay: &RelayProcess) {
    let pid = i32::try_from(relay.id()).unwrap();
    consign_test_support::eventually("the relay to hold leases", WAIT, || async {
        let status = consign::relay::status(db.relay_pool()).await?;
        let instance = status
            .relays
            .iter()
            .find(|m| m.pid == pid)
            .map(|m| &m.instance);
        let holds = status
            .leases
            .iter()
            .any(|l| l.live && l.owner.as_ref() == instance);
        Ok((instance.is_some() && holds).then_some(()))
    })
    .await
    .unwrap();
}

guarantee! {
    /// 10,000 events over 100 keys from 4 concurrent writers (25 keys
    /// each), relayed by the library: every event arrives, in order per key.
    [postgres, mysql, sqlite]
    async fn relay_keeps_per_key_order_from_concurrent_writers(db: &TestDb) {
        const EVENTS: usize = 10_000;
        let kafka = MockKafka::start(1).unwrap();
        let topic = unique_topic("order");
        kafka.create_topic(&topic, 6).unwrap();
        let relay = spawn_relay(db, &kafka, fast_relay_settings());
        let mut reader = TopicReader::new(kafka.bootstrap(), &topic).unwrap();
        let writers = (0..4).map(|w| {
            db.write_stream(
                topic.clone(),
                Stream::new(EVENTS / 4, 25).first_key(w * 25).per_tx(10),
            )
        });
        let ids: Vec<uuid::Uuid> = futures_util::future::join_all(writers)
            .await
            .into_iter()
            .flatten()
            .collect();
        reader.read_distinct(EVENTS, WAIT).await.unwrap();
        db.wait_drained(WAIT).await.unwrap();
        assert_complete_and_ordered(&ids, &reader);
        let stats = relay.stats();
        relay.shutdown().await.unwrap();
        println!("{} events, {} duplicates, {stats:?}", reader.distinct(), reader.duplicates());
    }
}

guarantee! {
    /// The relay process SIGKILLed at random points (at least 5 times with
    /// rows waiting) while a writer streams: nothing is lost, key order
    /// holds once duplicates are dropped.
    [postgres, mysql, sqlite]
    async fn relay_sigkilled_mid_stream_loses_nothing(db: &TestDb) {
        const EVENTS: usize = 6_000;
        let kafka = MockKafka::start(1).unwrap();
        // Batches spend most of their time produced but not acknowledged:
        // kills land mid-batch.
        kafka.set_round_trip(Duration::from_millis(50)).unwrap();
        let topic = unique_topic("sigkill");
        kafka.create_topic(&topic, 6).unwrap();
        let config = relay_config(db.url(), kafka.bootstrap(), &[("batch-size", "200")], &[]);
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let writer = db.write_stream(
            topic.clone(),
            Stream::new(EVENTS, 50).per_tx(20).pace(Duration::from_millis(10)),
        );
        let killer = async {
            let mut relay = RelayProcess::start(&config).unwrap();
            let (mut kills, mut busy_kills) = (0, 0);
            while busy_kills < 6 && kills < 20 {
                // A new relay first waits for its predecessor's leases to
                // expire: kill it only once it publishes again.
                publishing(db, &relay).await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
                let waiting = db.outbox_len().await.unwrap();
                relay.kill().unwrap();
                kills += 1;
                busy_kills += usize::from(waiting > 0);
                println!("kill {kills}: SIGKILL with {waiting} rows in the outbox");
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
                relay = RelayProcess::start(&config).unwrap();
            }
            (relay, kills, busy_kills)
        };
        let (ids, (mut relay, kills, busy_kills)) = tokio::join!(writer, killer);
        assert!(busy_kills >= 5, "only {busy_kills} of {kills} kills hit a relay with work to do");
        println!("{kills} SIGKILLs, {busy_kills} with rows waiting");
        all_arrived_in_order(db, &kafka, &topic, &ids).await;
        relay.terminate(Duration::from_secs(20)).await.unwrap();
    }
}

guarantee! {
    /// Two relay processes share the outbox; one is SIGKILLed mid-stream and
    /// stays dead. The other takes its partitions over when the leases
    /// expire: nothing lost, key order after dedup (SQLite: two processes on
    /// one file).
    [postgres, mysql, sqlite]
    async fn two_relays_one_sigkilled_keep_order(db: &TestDb) {
        const EVENTS: usize = 6_000;
        let kafka = MockKafka::start(1).unwrap();
        kafka.set_round_trip(Duration::from_millis(20)).unwrap();
        let topic = unique_topic("two");
        kafka.create_topic(&topic, 6).unwrap();
        let config = relay_config(db.url(), kafka.bootstrap(), &[("batch-size", "200")], &[]);
        let mut first = RelayProcess::start(&config).unwrap();
        let mut second = RelayProcess::start(&config).unwrap();
        let writer = db.write_stream(
            topic.clone(),
            Stream::new(EVENTS, 50).per_tx(20).pace(Duration::from_millis(10)),
        );
        let killer = async {
            publishing(db, &first).await;
            publishing(db, &second).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let waiting = db.outbox_len().await.unwrap();
            first.kill().unwrap();
            println!("first relay SIGKILLed with {waiting} rows waiting");
        };
        let (ids, ()) = tokio::join!(writer, killer);
        all_arrived_in_order(db, &kafka, &topic, &ids).await;
        let status = consign::relay::status(db.relay_pool()).await.unwrap();
        assert_eq!(status.relays.len(), 1, "the killed relay's membership expired");
        second.terminate(Duration::from_secs(20)).await.unwrap();
    }
}

guarantee! {
    /// Every connection of the relay closed by the server three times while
    /// it drains a backlog (`KILL` on MariaDB, `pg_terminate_backend` on
    /// PostgreSQL): it reconnects and nothing is lost.
    [postgres, mysql]
    async fn database_connections_killed_relay_reconnects(db: &TestDb) {
        const EVENTS: usize = 5_000;
        let kafka = MockKafka::start(1).unwrap();
        kafka.set_round_trip(Duration::from_millis(20)).unwrap();
        let topic = unique_topic("dbkill");
        kafka.create_topic(&topic, 6).unwrap();
        let ids = db.write_stream(topic.clone(), Stream::new(EVENTS, 50).per_tx(100)).await;
        let config = relay_config(db.url(), kafka.bootstrap(), &[("batch-size", "100")], &[]);
        let mut relay = RelayProcess::start(&config).unwrap();
        let mut killed = 0;
        for _ in 0..3 {
            publishing(db, &relay).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let n = db.kill_other_connections().await.unwrap();
            println!("closed {n} connections with {} rows waiting", db.outbox_len().await.unwrap());
            killed += n;
        }
        assert!(killed >= 3, "only {killed} connections closed");
        all_arrived_in_order(db, &kafka, &topic, &ids).await;
        relay.terminate(Duration::from_secs(20)).await.unwrap();
    }
}

guarantee! {
    /// A topic the broker refuses: its row keeps the error and the attempt
    /// count (`consign-relay status` lists it) while other topics flow;
    /// once the broker accepts, it is delivered. Archive mode keeps the
    /// delivered rows, and the archive's retention deletes them.
    [postgres, mysql, sqlite]
    async fn refused_row_keeps_its_error_and_archive_retention_works(db: &TestDb) {
        let kafka = MockKafka::start(1).unwrap();
        let (bad, good) = (unique_topic("refused"), unique_topic("accepted"));
        kafka.create_topic(&bad, 1).unwrap();
        kafka.create_topic(&good, 1).unwrap();
        kafka
            .set_topic_error(&bad, rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED)
            .unwrap();
        let mut settings = fast_relay_settings();
        settings.archive = true;
        let relay = spawn_relay(db, &kafka, settings);
        db.enqueue(&[
            Message::new(&bad, "Refused", b"1".to_vec()).with_key("k"),
            Message::new(&good, "Accepted", b"2".to_vec()).with_key("k"),
        ])
        .await
        .unwrap();
        let mut reader = TopicReader::new(kafka.bootstrap(), &good).unwrap();
        reader.read_distinct(1, WAIT).await.unwrap();
        let failed = consign_test_support::eventually("the refusal recorded", WAIT, || async {
            let status = consign::relay::status(db.relay_pool()).await?;
            Ok(status.failed.first().filter(|row| row.attempts >= 1).cloned())
        })
        .await
        .unwrap();
        assert_eq!(failed.topic, bad);
        let error = failed.last_error.unwrap();
        assert!(error.contains("authoriz") || error.contains("Authoriz"), "{error}");
        assert_eq!(db.outbox_len().await.unwrap(), 1);

        kafka.set_topic_error(&bad, rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR).unwrap();
        db.wait_drained(WAIT).await.unwrap();
        relay.shutdown().await.unwrap();
        assert_eq!(db.count("consign_outbox_archive").await.unwrap(), 2);
        let cleaned = consign::relay::retention::cleanup_archive(db.relay_pool(), Duration::ZERO)
            .await
            .unwrap();
        println!("{cleaned:?}");
        if db.backend() == Backend::Postgres {
            // Whole days are dropped: today's partition stays.
            assert!(cleaned.partitions.is_empty());
        } else {
            assert_eq!(cleaned.default_rows, 2);
            assert_eq!(db.count("consign_outbox_archive").await.unwrap(), 0);
        }
    }
}

// ---------------------------------------------------------------------------
// The inbox on every backend.
// ---------------------------------------------------------------------------

use consign_test_support::effects::{TestMessage, produce};

/// Runs `consign-relay` with `args` and only `DATABASE_URL` = `url`;
/// returns whether it succeeded and what it printed.
async fn relay_command(url: &str, args: &[&str]) -> (bool, String) {
    let mut relay = RelayProcess::start_relay(args, &[("DATABASE_URL", url)]).unwrap();
    let status = relay.wait(Duration::from_secs(30)).await.unwrap();
    (status.success(), relay.output())
}

guarantee! {
    /// Poison messages go to the dead letters with their reason (an
    /// undecodable payload, a message without id) while the others'
    /// effects apply once (a duplicate is skipped); `consign-relay
    /// dead-letters` lists, requeues (through the outbox) and purges them,
    /// and `cleanup` runs, on this backend.
    [postgres, mysql, sqlite]
    async fn inbox_dead_letters_poison_and_skips_duplicates(db: &TestDb) {
        db.create_effects_table().await.unwrap();
        let kafka = MockKafka::start(1).unwrap();
        let topic = unique_topic("poison");
        kafka.create_topic(&topic, 2).unwrap();
        let mut messages = TestMessage::stream(4, 5); // 20 good ones
        let duplicate = messages[3].clone();
        messages.push(duplicate);
        messages.push(TestMessage { id: Some(uuid::Uuid::now_v7()), key: "key-0".into(), payload: b"not json".to_vec() });
        messages.push(TestMessage { id: None, key: "key-1".into(), payload: b"{}".to_vec() });
        produce(kafka.bootstrap(), &topic, &messages).await.unwrap();

        let inbox = db.start_inbox("poison-test", kafka.bootstrap(), &topic);
        consign_test_support::eventually("every message settled", WAIT, || async {
            let effects = db.tally().await?.distinct;
            let letters = db.count("consign_dead_letters").await?;
            Ok((effects == 20 && letters == 2).then_some(()))
        })
        .await
        .unwrap();
        inbox.stop().await;
        let tally = db.tally().await.unwrap();
        assert_eq!(tally.effects, 20, "the duplicate's effect applied twice");
        assert_eq!(tally.out_of_order_keys, 0);

        let (ok, output) = relay_command(db.url(), &["dead-letters", "list", "--all", "--json"]).await;
        assert!(ok, "{output}");
        let start = output.find('[').unwrap();
        let letters: serde_json::Value = serde_json::from_str(&output[start..]).unwrap();
        let letters = letters.as_array().unwrap();
        let errors: Vec<&str> = letters.iter().map(|l| l["error"].as_str().unwrap()).collect();
        assert!(errors.iter().any(|e| e.contains("payload is not a valid")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("consign-id")), "{errors:?}");
        let undecodable = letters
            .iter()
            .find(|l| l["error"].as_str().unwrap().contains("payload is not a valid"))
            .unwrap()["id"]
            .to_string();

        let (ok, output) = relay_command(db.url(), &["dead-letters", "requeue", "--id", &undecodable]).await;
        assert!(ok, "{output}");
        assert!(output.contains("1 requeued, 0 kept"), "{output}");
        assert_eq!(db.outbox_len().await.unwrap(), 1, "requeued through the outbox");
        let (ok, output) = relay_command(db.url(), &["dead-letters", "purge", "--all"]).await;
        assert!(ok, "{output}");
        assert!(output.contains("purged 1 dead letters"), "{output}");
        let (ok, output) = relay_command(db.url(), &["cleanup", "--inbox-older-than", "1h"]).await;
        assert!(ok, "{output}");
        assert!(output.contains("deleted 0 inbox records"), "{output}");
        let (ok, output) = relay_command(db.url(), &["cleanup", "--inbox-older-than", "0s"]).await;
        assert!(ok, "{output}");
        assert!(output.contains("deleted 20 inbox records"), "{output}");
    }
}

guarantee! {
    /// The inbox consumer process SIGKILLed at random points (at least 5
    /// times mid-stream) and restarted: every message's effect exactly
    /// once, in key order.
    [postgres, mysql, sqlite]
    async fn inbox_consumer_sigkilled_ends_exact(db: &TestDb) {
        db.create_effects_table().await.unwrap();
        let kafka = MockKafka::start(1).unwrap();
        let topic = unique_topic("inbox-kill");
        kafka.create_topic(&topic, 3).unwrap();
        let messages = TestMessage::stream(40, 75); // 3,000 messages, 40 keys
        produce(kafka.bootstrap(), &topic, &messages).await.unwrap();
        let total = i64::try_from(messages.len()).unwrap();
        let env = [
            ("DATABASE_URL", db.url()),
            ("TEST_BOOTSTRAP", kafka.bootstrap()),
            ("TEST_TOPIC", topic.as_str()),
            ("TEST_GROUP", "kill-test"),
            // Small batches: slower, so that the kills land mid-stream.
            ("TEST_MAX_BATCH", "8"),
        ];
        let mut rng = StdRng::seed_from_u64(rand::random());
        let mut kills = 0;
        let mut consumer = consign_test_support::ChildProcess::start_consumer(&env).unwrap();
        while kills < 6 {
            let start = db.tally().await.unwrap().distinct;
            let progress = rng.random_range(50..300);
            let now = consign_test_support::eventually("progress", WAIT, || async {
                let now = db.tally().await?.distinct;
                Ok((now >= (start + progress).min(total)).then_some(now))
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", consumer.output()));
            if now >= total {
                break;
            }
            consumer.kill().unwrap();
            kills += 1;
            println!("kill {kills} at {now} effects");
            consumer = consign_test_support::ChildProcess::start_consumer(&env).unwrap();
        }
        consign_test_support::eventually("every effect", WAIT, || async {
            Ok((db.tally().await?.distinct >= total).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", consumer.output()));
        let status = consumer.terminate(Duration::from_secs(30)).await.unwrap();
        assert!(status.success(), "{}", consumer.output());
        let tally = db.tally().await.unwrap();
        println!("{total} messages, {kills} SIGKILLs: {tally:?}");
        assert!(kills >= 5, "only {kills} kills happened mid-stream");
        assert_eq!(tally.effects, total, "an effect was applied twice");
        assert_eq!(tally.distinct, total);
        assert_eq!(tally.out_of_order_keys, 0, "per-key order of effects");
    }
}

guarantee! {
    /// The server closes every connection of the inbox consumer process
    /// three times mid-stream (MariaDB `KILL`, PostgreSQL
    /// `pg_terminate_backend`): it reconnects, and every effect applies
    /// exactly once, in key order.
    [postgres, mysql]
    async fn database_connections_killed_inbox_ends_exact(db: &TestDb) {
        db.create_effects_table().await.unwrap();
        let kafka = MockKafka::start(1).unwrap();
        let topic = unique_topic("inbox-dbkill");
        kafka.create_topic(&topic, 3).unwrap();
        let messages = TestMessage::stream(40, 50); // 2,000 messages
        produce(kafka.bootstrap(), &topic, &messages).await.unwrap();
        let total = i64::try_from(messages.len()).unwrap();
        let env = [
            ("DATABASE_URL", db.url()),
            ("TEST_BOOTSTRAP", kafka.bootstrap()),
            ("TEST_TOPIC", topic.as_str()),
            ("TEST_GROUP", "dbkill-test"),
            ("TEST_MAX_BATCH", "8"),
        ];
        let mut consumer = consign_test_support::ChildProcess::start_consumer(&env).unwrap();
        let mut closed = 0;
        for round in 1..=3 {
            let target = total * round / 4;
            consign_test_support::eventually("progress", WAIT, || async {
                Ok((db.tally().await?.distinct >= target).then_some(()))
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", consumer.output()));
            let n = db.kill_other_connections().await.unwrap();
            println!("closed {n} connections at {} effects", db.tally().await.unwrap().distinct);
            closed += n;
        }
        assert!(closed >= 3, "only {closed} connections closed");
        consign_test_support::eventually("every effect", WAIT, || async {
            Ok((db.tally().await?.distinct >= total).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", consumer.output()));
        let status = consumer.terminate(Duration::from_secs(30)).await.unwrap();
        assert!(status.success(), "{}", consumer.output());
        let tally = db.tally().await.unwrap();
        assert_eq!(tally.effects, total, "an effect was applied twice");
        assert_eq!(tally.out_of_order_keys, 0, "per-key order of effects");
    }
}

/// MySQL ends a transaction by itself on a deadlock, and later statements
/// run in autocommit. A handler that swallows that error and returns `Ok`
/// (here: the transaction ended with `ROLLBACK` under it, as the server
/// does) must not let the batch's offsets commit past messages whose
/// effects were rolled back: the inbox notices and redoes the batch one
/// message at a time. Every effect once, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_transaction_ended_under_a_handler_loses_nothing() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use consign::inbox::{BoxError, Delivery, InboxLayer};
    use consign_test_support::{
        backends::AnyPool,
        effects::{Running, Step},
    };

    let db = TestDb::new(Backend::MySql).await.unwrap();
    db.create_effects_table().await.unwrap();
    let AnyPool::MySql(pool) = &db.pool else {
        unreachable!()
    };
    let kafka = MockKafka::start(1).unwrap();
    let topic = unique_topic("ended");
    kafka.create_topic(&topic, 1).unwrap();
    let messages = TestMessage::stream(4, 5);
    produce(kafka.bootstrap(), &topic, &messages).await.unwrap();

    let ended = Arc::new(AtomicBool::new(false));
    let handler = move |mut delivery: Delivery<sqlx::MySql>| {
        let ended = Arc::clone(&ended);
        async move {
            let step: Step = delivery.json()?;
            if step.key == 1 && step.n == 2 && !ended.swap(true, Ordering::SeqCst) {
                // What a deadlock does to the transaction; the handler
                // swallows the error.
                sqlx::raw_sql("ROLLBACK").execute(delivery.conn()).await?;
                return Ok::<_, BoxError>(());
            }
            sqlx::query("INSERT INTO test_effects (message_id, `key`, n) VALUES (?, ?, ?)")
                .bind(delivery.id())
                .bind(i32::try_from(step.key)?)
                .bind(i32::try_from(step.n)?)
                .execute(delivery.conn())
                .await?;
            Ok(())
        }
    };
    let inbox = InboxLayer::new(pool.clone(), "ended-test").unwrap();
    let service = tower::ServiceBuilder::new()
        .layer(inbox.clone())
        .service_fn(handler);
    let running = Running::start(&inbox, service, kafka.bootstrap(), &topic);
    let settled =
        consign_test_support::eventually("every effect", Duration::from_secs(30), || async {
            Ok((db.tally().await?.distinct == 20).then_some(()))
        })
        .await;
    running.stop().await;
    let tally = db.tally().await.unwrap();
    println!("{tally:?}, {:?}", inbox.stats());
    settled.unwrap();
    assert_eq!(tally.effects, 20);
    assert_eq!(tally.out_of_order_keys, 0);
    db.drop().await.unwrap();
}

guarantee! {
    /// A batch of 70,000 rows (above MySQL's 65,535 and SQLite's 32,766
    /// bound values per statement) is settled: the relay deletes it in
    /// chunks instead of failing every round and sending it again.
    [postgres, mysql, sqlite]
    async fn a_batch_over_the_bind_limit_settles(db: &TestDb) {
        const ROWS: usize = 70_000;
        let kafka = MockKafka::start(1).unwrap();
        let topic = unique_topic("big-batch");
        kafka.create_topic(&topic, 1).unwrap();
        for start in (0..ROWS).step_by(10_000) {
            let msgs: Vec<Message> = (start..start + 10_000)
                .map(|i| Message::new(&topic, "Tiny", b"x".to_vec()).with_key(format!("k{}", i % 10)))
                .collect();
            db.enqueue(&msgs).await.unwrap();
        }
        let mut settings = fast_relay_settings();
        settings.batch_size = u32::try_from(ROWS).unwrap();
        let relay = spawn_relay(db, &kafka, settings);
        db.wait_drained(WAIT).await.unwrap();
        let stats = relay.stats();
        relay.shutdown().await.unwrap();
        println!("{stats:?}");
        assert!(stats.batches <= 3, "{stats:?}");
    }
}

guarantee! {
    /// A row waiting for a retry holds back the later rows of its key and
    /// topic only: a keyless row and another key of the same topic go on;
    /// once due, the waiting row goes, then the row it held back.
    [postgres, mysql, sqlite]
    async fn a_waiting_row_holds_back_only_its_key(db: &TestDb) {
        let kafka = MockKafka::start(1).unwrap();
        let topic = unique_topic("held");
        kafka.create_topic(&topic, 1).unwrap();
        let first = Message::new(&topic, "E", b"k-1".to_vec()).with_key("k");
        let (first_id, topic_ref) = (first.id(), topic.as_str());
        db.enqueue(&[first]).await.unwrap();
        db.postpone(first_id, 3600).await.unwrap();
        let second = Message::new(topic_ref, "E", b"k-2".to_vec()).with_key("k");
        let keyless = Message::new(topic_ref, "E", b"none".to_vec());
        let other = Message::new(topic_ref, "E", b"j-1".to_vec()).with_key("j");
        let second_id = second.id();
        db.enqueue(&[second, keyless, other]).await.unwrap();

        let relay = spawn_relay(db, &kafka, fast_relay_settings());
        let mut reader = TopicReader::new(kafka.bootstrap(), &topic).unwrap();
        reader.read_distinct(2, WAIT).await.unwrap();
        // A few more rounds: the held rows must still be waiting.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(db.outbox_len().await.unwrap(), 2, "only the key's two rows wait");
        let payloads = |reader: &TopicReader| -> Vec<String> {
            reader
                .received()
                .iter()
                .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
                .collect()
        };
        let mut seen = payloads(&reader);
        seen.sort();
        assert_eq!(seen, ["j-1", "none"]);

        db.postpone(first_id, -1).await.unwrap();
        relay.wake();
        reader.read_distinct(4, WAIT).await.unwrap();
        db.wait_drained(WAIT).await.unwrap();
        let order: Vec<String> = payloads(&reader).into_iter().filter(|p| p.starts_with("k-")).collect();
        assert_eq!(order, ["k-1", "k-2"], "the key's rows in order");
        assert!(reader.received().iter().any(|r| r.id() == Some(second_id)));
        relay.shutdown().await.unwrap();
    }
}

/// A relay on `db` publishing to `kafka` with `settings`, running.
fn spawn_relay(
    db: &TestDb,
    kafka: &MockKafka,
    settings: consign::relay::RelaySettings,
) -> consign::relay::RelayHandle {
    Relay::builder(db.relay_pool())
        .kafka("bootstrap.servers", kafka.bootstrap())
        .settings(settings)
        .build()
        .unwrap()
        .spawn()
}

/// Settings whose ordinary polling would take 10 s to notice a new row:
/// only the idle probe (every 20 ms) can ship one sooner.
fn slow_polls_with_probe(probe: Duration) -> consign::relay::RelaySettings {
    let mut settings = fast_relay_settings();
    settings.poll_interval = Duration::from_secs(10);
    settings.max_poll_interval = Duration::from_secs(10);
    settings.idle_probe_interval = probe;
    settings
}

/// Enqueues one event to `topic` and waits until `reader` has `seen + 1`
/// distinct events, for at most `within`.
async fn ship_one(db: &TestDb, reader: &mut TopicReader, topic: &str, within: Duration) {
    let seen = reader.distinct();
    db.enqueue(&[Message::new(topic, "E", b"{}".to_vec()).with_key("k")])
        .await
        .unwrap();
    reader.read_distinct(seen + 1, within).await.unwrap();
}

guarantee! {
    /// A relay that nothing wakes (as `consign-relay run`) and whose batch
    /// polls are 10 s apart ships an event written to its idle outbox
    /// within a few seconds: the idle probe (20 ms) sees the new row and
    /// the batch is read at once. Without the probe each of these waits
    /// up to 10 s. The bound is generous: the machine is shared.
    [postgres, mysql, sqlite]
    async fn idle_probe_ships_new_rows_before_the_next_poll(db: &TestDb) {
        let kafka = MockKafka::start(1).unwrap();
        let topic = unique_topic("probe");
        kafka.create_topic(&topic, 6).unwrap();
        let relay = spawn_relay(db, &kafka, slow_polls_with_probe(Duration::from_millis(20)));
        let mut reader = TopicReader::new(kafka.bootstrap(), &topic).unwrap();
        // The first batch with leases ships this one; the relay then pauses 10 s.
        ship_one(db, &mut reader, &topic, WAIT).await;
        for _ in 0..3 {
            ship_one(db, &mut reader, &topic, Duration::from_secs(3)).await;
        }
        db.wait_drained(WAIT).await.unwrap();
        relay.shutdown().await.unwrap();
    }
}

guarantee! {
    /// With the probe off (`idle-probe-interval = 0s`) the relay still
    /// ships what is written to its idle outbox, through its ordinary
    /// polls.
    [postgres, mysql, sqlite]
    async fn without_the_idle_probe_polls_still_ship(db: &TestDb) {
        let kafka = MockKafka::start(1).unwrap();
        let topic = unique_topic("no-probe");
        kafka.create_topic(&topic, 6).unwrap();
        let mut settings = fast_relay_settings();
        settings.max_poll_interval = Duration::from_millis(200);
        settings.idle_probe_interval = Duration::ZERO;
        let relay = spawn_relay(db, &kafka, settings);
        let mut reader = TopicReader::new(kafka.bootstrap(), &topic).unwrap();
        for _ in 0..4 {
            ship_one(db, &mut reader, &topic, WAIT).await;
            // Idle long enough for the polls to back off to their longest.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        db.wait_drained(WAIT).await.unwrap();
        relay.shutdown().await.unwrap();
    }
}
