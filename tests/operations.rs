//! Operating the relay: configuration, secrets, metrics and health, the
//! admin commands.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use consign::{
    Relay,
    inbox::{BoxError, Delivery, InboxLayer, RetryPolicy},
};
use consign_test_support::{
    RelayProcess, TestBroker, broker_test, db,
    effects::{self, Running, TestMessage, produce},
    eventually, fast_relay_settings,
    net::{TcpProxy, http_get, prometheus_value},
    relay_config,
    stream::{Stream, write_stream},
    unique_topic,
};
use rdkafka::types::RDKafkaRespErr;
use sqlx::PgPool;
use tower::ServiceBuilder;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

const PG_SECRET: &str = "pg-secret-6d1f";
const KAFKA_SECRET: &str = "kafka-secret-93ab";

/// The test database's URL with a password in it (trust authentication
/// ignores it, so the relay still connects).
fn url_with_password(pool: &PgPool) -> String {
    let mut url = url::Url::parse(&db::url(pool)).unwrap();
    url.set_password(Some(PG_SECRET)).unwrap();
    url.to_string()
}

broker_test! {
    async fn secrets_never_appear_in_logs_or_printed_config(pool: PgPool, broker: TestBroker) {
        let topic = unique_topic("secrets");
        broker.create_topic(&topic, 2).await.unwrap();
        let config = relay_config(
            &url_with_password(&pool),
            broker.bootstrap(),
            &[],
            &[
                ("sasl.username", "\"relay\""),
                ("sasl.password", &format!("\"{KAFKA_SECRET}-1\"")),
                ("ssl.key.password", &format!("\"{KAFKA_SECRET}-2\"")),
                ("ssl.keystore.password", &format!("\"{KAFKA_SECRET}-3\"")),
                ("sasl.oauthbearer.client.secret", &format!("\"{KAFKA_SECRET}-4\"")),
                (
                    "sasl.oauthbearer.assertion.private.key.passphrase",
                    &format!("\"{KAFKA_SECRET}-5\""),
                ),
            ],
        );
        // The most talkative logging there is, while events flow.
        let debug = [("RUST_LOG", "trace")];
        let mut relay = RelayProcess::start_with(&config, &["run"], &debug).unwrap();
        let ids = write_stream(pool.clone(), topic.clone(), Stream::new(200, 10)).await;
        db::wait_drained(&pool, Duration::from_secs(60))
            .await
            .unwrap();
        relay.stop(Duration::from_secs(20)).await.unwrap();
        let mut outputs = vec![("run", relay.output())];
        assert!(outputs[0].1.contains("relay stopped"), "{}", outputs[0].1);
        println!("{} events relayed with trace logging", ids.len());

        let bad = config.replace("batch-size = 1000", "batch-size = 0");
        // A secret property librdkafka refuses (Java's JAAS line).
        let refused = format!(
            "{config}\"sasl.jaas.config\" = \"ScramLoginModule required password='{KAFKA_SECRET}-6';\"\n"
        );
        for (name, config, args) in [
            ("config show", &config, &["config", "show"][..]),
            ("config show --json", &config, &["config", "show", "--json"]),
            ("config check", &config, &["config", "check"]),
            ("config check (invalid)", &bad, &["config", "check"]),
            ("run (invalid)", &bad, &["run"]),
            ("status", &config, &["status"]),
            ("config check (refused secret)", &refused, &["config", "check"]),
            ("run (refused secret)", &refused, &["run"]),
        ] {
            let mut command = RelayProcess::start_with(config, args, &debug).unwrap();
            command.wait(Duration::from_secs(30)).await.unwrap();
            outputs.push((name, command.output()));
        }
        assert!(outputs[1].1.contains("REDACTED"), "{}", outputs[1].1);
        assert!(outputs[1].1.contains("sasl.username"), "{}", outputs[1].1);
        assert!(
            outputs[4].1.contains("relay.batch-size"),
            "{}",
            outputs[4].1
        );
        for refused in &outputs[7..] {
            assert!(refused.1.contains("sasl.jaas.config"), "{}", refused.1);
        }
        for (name, output) in outputs {
            for secret in [PG_SECRET, KAFKA_SECRET] {
                assert!(
                    !output.contains(secret),
                    "{name} printed {secret}:\n{output}"
                );
            }
        }
    }
}

/// The relay's admin address, from its log line.
async fn admin_address(relay: &RelayProcess) -> std::net::SocketAddr {
    eventually("the admin endpoint to listen", WAIT, || async {
        Ok(relay
            .output()
            .lines()
            .find(|l| l.contains("serving /metrics and /health"))
            .and_then(|l| l.split("address=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok()))
    })
    .await
    .unwrap()
}

async fn metrics(address: std::net::SocketAddr) -> String {
    let (status, body) = http_get(address, "/metrics").await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until `/metrics` shows `series` satisfying `check`; returns it.
async fn metric_until(
    address: std::net::SocketAddr,
    series: &str,
    check: impl Fn(f64) -> bool,
) -> f64 {
    eventually(series, WAIT, || async {
        Ok(prometheus_value(&metrics(address).await, series).filter(|v| check(*v)))
    })
    .await
    .unwrap()
}

/// Waits until `/health/ready` answers `status`; returns the body.
async fn readiness_until(address: std::net::SocketAddr, status: u16) -> serde_json::Value {
    let last = std::sync::Mutex::new(String::new());
    eventually(
        &format!("/health/ready to answer {status}"),
        WAIT,
        || async {
            let (got, body) = http_get(address, "/health/ready").await?;
            last.lock().unwrap().clone_from(&body);
            Ok((got == status).then(|| serde_json::from_str(&body).unwrap()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; last answer: {}", last.lock().unwrap()))
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn metrics_move_with_events_and_readiness_follows_postgres_and_kafka(pool: PgPool) {
    let broker = TestBroker::start().unwrap();
    let Some(mock) = broker.mock() else {
        println!("skipped: needs the mock cluster to refuse a topic and stop brokers");
        return;
    };
    let topic = unique_topic("metrics");
    broker.create_topic(&topic, 2).await.unwrap();
    // The relay reaches PostgreSQL through a proxy the test can cut.
    let (proxy, url) = TcpProxy::for_database(&pool).await.unwrap();
    let config = relay_config(&url, broker.bootstrap(), &[], &[])
        + "\n[admin]\nenabled = true\nlisten = \"127.0.0.1:0\"\nsample-interval = \"1s\"\n";
    let mut relay = RelayProcess::start(&config).unwrap();
    let admin = admin_address(&relay).await;
    let ready = readiness_until(admin, 200).await;
    assert_eq!(ready["database"]["up"], true, "{ready}");
    assert_eq!(http_get(admin, "/health/live").await.unwrap().0, 200);
    metric_until(admin, "consign_relay_partitions_owned", |v| v == 32.0).await;
    metric_until(
        admin,
        "consign_relay_partition_owned{partition=\"31\"}",
        |v| v == 1.0,
    )
    .await;

    // Refused rows: errors by kind, rows with errors, a backlog with an age.
    mock.set_topic_error(
        &topic,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();
    let ids = write_stream(pool.clone(), topic.clone(), Stream::new(300, 30)).await;
    let refused = "consign_relay_publish_errors_total{kind=\"topic_authorization_failed\"}";
    metric_until(admin, refused, |v| v >= 1.0).await;
    let with_errors = metric_until(admin, "consign_outbox_rows_with_errors", |v| v >= 1.0).await;
    let pending = metric_until(admin, "consign_outbox_pending_rows", |v| v >= 300.0).await;
    let age = metric_until(admin, "consign_outbox_oldest_pending_age_seconds", |v| {
        v > 0.0
    })
    .await;
    println!("refused: {with_errors} rows with errors, {pending} pending, oldest {age:.2} s");

    // Accepted again: everything goes out and the counters move.
    mock.set_topic_error(&topic, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    db::wait_drained(&pool, WAIT).await.unwrap();
    let published = metric_until(admin, "consign_relay_published_total", |v| v >= 300.0).await;
    assert_eq!(published, ids.len() as f64);
    metric_until(admin, "consign_outbox_pending_rows", |v| v == 0.0).await;
    metric_until(admin, "consign_outbox_rows_with_errors", |v| v == 0.0).await;
    let text = metrics(admin).await;
    let acked = prometheus_value(&text, "consign_relay_commit_to_ack_seconds_count").unwrap();
    assert_eq!(acked, 300.0, "{text}");
    let batches = prometheus_value(&text, "consign_relay_batch_rows_count").unwrap();
    let rows = prometheus_value(&text, "consign_relay_batch_rows_sum").unwrap();
    assert!(batches >= 1.0 && rows >= 300.0, "{text}");
    assert!(
        text.contains("consign_relay_commit_to_ack_seconds_bucket{le=\"0.005\"}"),
        "{text}"
    );
    println!("published {published} in {batches} batches ({rows} rows read)");

    // PostgreSQL unreachable: not ready (but live), then ready again.
    proxy.cut();
    let unready = readiness_until(admin, 503).await;
    assert_eq!(unready["database"]["up"], false, "{unready}");
    assert_eq!(unready["kafka"]["up"], true, "{unready}");
    println!("database down: {}", unready["database"]["error"]);
    metric_until(admin, "consign_relay_database_up", |v| v == 0.0).await;
    assert_eq!(http_get(admin, "/health/live").await.unwrap().0, 200);
    proxy.restore();
    readiness_until(admin, 200).await;

    // Every broker down: not ready, then ready again.
    mock.all_down().unwrap();
    let unready = readiness_until(admin, 503).await;
    assert_eq!(unready["kafka"]["up"], false, "{unready}");
    assert_eq!(unready["database"]["up"], true, "{unready}");
    println!("brokers down: {}", unready["kafka"]["error"]);
    assert_eq!(http_get(admin, "/health").await.unwrap().0, 503);
    mock.all_up().unwrap();
    readiness_until(admin, 200).await;
    assert_eq!(http_get(admin, "/health").await.unwrap().0, 200);
    relay.stop(Duration::from_secs(20)).await.unwrap();
}

/// The Prometheus recorder of this test process (installed once).
fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = consign::relay::metrics::install_prometheus().unwrap();
        consign::inbox::metrics::describe();
        handle
    })
}

/// Requeue reaches only the consumer that gave up (issue 13 item 6): another
/// group that handled the message long ago, whose dedup record `cleanup`
/// has since removed (8 days old, retention 7), passes over the requeued
/// copy instead of applying it a second time.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn requeued_dead_letter_is_handled_once_and_inbox_metrics_count(pool: PgPool) {
    let prometheus = prometheus();
    effects::create_table(&pool).await.unwrap();
    let broker = TestBroker::start().unwrap();
    let topic = unique_topic("requeue");
    broker.create_topic(&topic, 1).await.unwrap();
    let messages = TestMessage::stream(4, 5);
    let poisoned = messages[6].id.unwrap();
    assert_eq!(messages[6].key, "key-2");
    produce(broker.bootstrap(), &topic, &messages)
        .await
        .unwrap();
    produce(broker.bootstrap(), &topic, &messages[..3])
        .await
        .unwrap();

    // The handler fails for one message until the "outage" is over.
    let consumer = format!("requeue-{}", &Uuid::now_v7().simple().to_string()[24..]);
    let broken = Arc::new(AtomicBool::new(true));
    let inbox = InboxLayer::builder(pool.clone(), &consumer)
        .retry(
            RetryPolicy::attempts(3)
                .with_delays(Duration::from_millis(10), Duration::from_millis(50)),
        )
        .build()
        .unwrap();
    let handler_broken = Arc::clone(&broken);
    let service =
        ServiceBuilder::new()
            .layer(inbox.clone())
            .service_fn(move |delivery: Delivery| {
                let broken = Arc::clone(&handler_broken);
                async move {
                    if broken.load(Ordering::SeqCst) && delivery.id() == poisoned {
                        return Err::<(), BoxError>("inventory service unavailable".into());
                    }
                    effects::record(delivery).await
                }
            });
    let running = Running::start(&inbox, service, broker.bootstrap(), &topic);

    // Another group reads the same topic, with effects of its own.
    sqlx::query("CREATE TABLE other_effects (message_id uuid NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let other = InboxLayer::new(pool.clone(), format!("{consumer}-other")).unwrap();
    let other_service = ServiceBuilder::new().layer(other.clone()).service_fn(
        |mut delivery: Delivery| async move {
            sqlx::query("INSERT INTO other_effects (message_id) VALUES ($1)")
                .bind(delivery.id())
                .execute(delivery.conn())
                .await?;
            Ok::<_, BoxError>(())
        },
    );
    let other_running = Running::start(&other, other_service, broker.bootstrap(), &topic);
    let other_effects = || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM other_effects")
            .fetch_one(&pool)
            .await
            .unwrap();
        n
    };
    eventually("the other group to handle all 20", WAIT, || async {
        Ok((other.stats().handled == 20).then_some(()))
    })
    .await
    .unwrap();

    let stats = eventually(
        "19 handled, 1 dead-lettered, 3 duplicates",
        WAIT,
        || async {
            let s = inbox.stats();
            Ok((s.handled == 19 && s.dead_lettered == 1 && s.duplicates == 3).then_some(s))
        },
    )
    .await
    .unwrap();
    println!("before requeue: {stats:?}");
    let series = |name: &str, outcome: Option<&str>| {
        let text = prometheus.render();
        let labels = match outcome {
            Some(outcome) => format!("{{consumer=\"{consumer}\",outcome=\"{outcome}\"}}"),
            None => format!("{{consumer=\"{consumer}\"}}"),
        };
        prometheus_value(&text, &format!("{name}{labels}"))
    };
    let messages_total = "consign_inbox_messages_total";
    assert_eq!(series(messages_total, Some("handled")), Some(19.0));
    assert_eq!(series(messages_total, Some("duplicate")), Some(3.0));
    assert_eq!(series(messages_total, Some("dead_lettered")), Some(1.0));
    assert_eq!(
        series("consign_inbox_failed_attempts_total", None),
        Some(3.0)
    );
    // Every handler call is timed: 19 successes and 3 failed attempts, plus
    // the calls of the batch that rolled back when the poisoned one failed.
    let calls = series("consign_inbox_handler_seconds_count", None).unwrap();
    assert!(calls >= 22.0, "{calls} handler calls timed");

    // The admin CLI shows the letter; requeue needs a selection.
    broken.store(false, Ordering::SeqCst);
    let config = relay_config(&db::url(&pool), broker.bootstrap(), &[], &[]);

    // Days pass: the other group's dedup records fall out of retention.
    sqlx::query(
        "UPDATE consign_inbox SET handled_at = now() - interval '8 days' WHERE consumer = $1",
    )
    .bind(other.consumer())
    .execute(&pool)
    .await
    .unwrap();
    let (ok, cleaned) = RelayProcess::command(&config, &["cleanup"]).await;
    assert!(ok, "{cleaned}");
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM consign_inbox WHERE consumer = $1")
        .bind(other.consumer())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        kept, 0,
        "cleanup kept the other group's old records: {cleaned}"
    );
    let (ok, listed) = RelayProcess::command(&config, &["dead-letters", "list", "--json"]).await;
    assert!(ok, "{listed}");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["message_id"], poisoned.to_string());
    assert_eq!(listed[0]["consumer"], consumer.as_str());
    assert!(
        listed[0]["error"]
            .as_str()
            .unwrap()
            .contains("inventory service unavailable")
    );
    let (ok, table) = RelayProcess::command(&config, &["dead-letters", "list"]).await;
    assert!(
        ok && table.contains("1 dead letters") && table.contains("key-2"),
        "{table}"
    );
    let (ok, refused) = RelayProcess::command(&config, &["dead-letters", "requeue"]).await;
    assert!(!ok && refused.contains("--all"), "{refused}");
    let (ok, status) = RelayProcess::command(&config, &["status"]).await;
    assert!(ok && status.contains("dead letters: 1"), "{status}");

    let (ok, requeued) = RelayProcess::command(
        &config,
        &[
            "dead-letters",
            "requeue",
            "--consumer",
            &consumer,
            "--key",
            "key-2",
        ],
    )
    .await;
    assert!(ok && requeued.contains("1 requeued, 0 kept"), "{requeued}");
    let (_, listed) = RelayProcess::command(&config, &["dead-letters", "list"]).await;
    assert!(listed.contains("0 dead letters"), "{listed}");

    // The relay ships it; the consumer that gave up handles it, once.
    let relay = Relay::builder(pool.clone())
        .kafka("bootstrap.servers", broker.bootstrap())
        .settings(fast_relay_settings())
        .build()
        .unwrap()
        .spawn();
    db::wait_drained(&pool, WAIT).await.unwrap();
    eventually("the requeued message to be handled", WAIT, || async {
        Ok((inbox.stats().handled == 20).then_some(()))
    })
    .await
    .unwrap();
    let tally = effects::tally(&pool).await.unwrap();
    assert_eq!((tally.effects, tally.distinct), (20, 20), "{tally:?}");
    assert_eq!(series(messages_total, Some("handled")), Some(20.0));
    // The other group passed over the requeued copy.
    let passed = eventually("the other group to pass over the copy", WAIT, || async {
        let s = other.stats();
        Ok((s.for_another_consumer + s.handled > 20).then_some(s))
    })
    .await
    .unwrap();
    println!("other group: {passed:?}");
    assert_eq!(passed.for_another_consumer, 1, "{passed:?}");
    assert_eq!(
        other_effects().await,
        20,
        "the other group applied the requeued copy"
    );
    // Requeueing again finds nothing; the message stays handled once.
    let (ok, again) = RelayProcess::command(&config, &["dead-letters", "requeue", "--all"]).await;
    assert!(ok && again.contains("0 requeued"), "{again}");
    relay.shutdown().await.unwrap();
    running.stop().await;
    other_running.stop().await;
    assert_eq!(effects::tally(&pool).await.unwrap().effects, 20);
    assert_eq!(other_effects().await, 20);
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn cleanup_removes_only_what_is_older_than_the_retention(pool: PgPool) {
    // Inbox records handled 10 min, 50 min, 70 min and 3 days ago.
    let ages = ["10 minutes", "50 minutes", "70 minutes", "3 days"];
    let mut ids = Vec::new();
    for age in ages {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO consign_inbox (consumer, message_id, handled_at)
             VALUES ('c', $1, now() - $2::interval)",
        )
        .bind(id)
        .bind(age)
        .execute(&pool)
        .await
        .unwrap();
        ids.push(id);
    }
    for age in ["1 day", "10 days"] {
        sqlx::query(
            "INSERT INTO consign_dead_letters
                 (consumer, topic, partition, \"offset\", error, attempts, failed_at)
             VALUES ('c', 't', 0, 0, $1, 1, now() - $1::interval)",
        )
        .bind(age)
        .execute(&pool)
        .await
        .unwrap();
    }
    let config = relay_config(&db::url(&pool), "unused:9092", &[], &[]);

    let (ok, out) =
        RelayProcess::command(&config, &["cleanup", "--inbox-older-than", "1h", "--json"]).await;
    assert!(ok, "{out}");
    let cleaned: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cleaned["inbox_records"], 2, "{out}");
    assert_eq!(
        cleaned["dead_letters"], 0,
        "no dead-letter retention set: {out}"
    );
    let left: Vec<Uuid> =
        sqlx::query_scalar("SELECT message_id FROM consign_inbox ORDER BY handled_at DESC")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        left,
        ids[..2].to_vec(),
        "only the records younger than 1 h are left"
    );

    let with_letters = config.clone() + "\n[retention]\ndead-letters = \"7days\"\n";
    let (ok, out) =
        RelayProcess::command(&with_letters, &["cleanup", "--inbox-older-than", "1h"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("deleted 0 inbox records older than 1h"),
        "{out}"
    );
    assert!(
        out.contains("deleted 1 dead letters older than 7days"),
        "{out}"
    );
    let letters: Vec<String> = sqlx::query_scalar("SELECT error FROM consign_dead_letters")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(letters, ["1 day"]);
    // The default inbox retention (7 days) keeps everything that is left.
    let (ok, out) = RelayProcess::command(&config, &["cleanup", "--json"]).await;
    assert!(ok && out.contains("\"inbox_records\": 0"), "{out}");
}

broker_test! {
    async fn archived_rows_are_kept_by_day_and_old_days_are_dropped_whole(pool: PgPool, broker: TestBroker) {
        let topic = unique_topic("archive");
        broker.create_topic(&topic, 2).await.unwrap();
        let relay = Relay::builder(pool.clone())
            .kafka("bootstrap.servers", broker.bootstrap())
            .settings(fast_relay_settings())
            .archive(true)
            .build()
            .unwrap()
            .spawn();
        let ids = write_stream(pool.clone(), topic.clone(), Stream::new(500, 20)).await;
        db::wait_drained(&pool, WAIT).await.unwrap();
        relay.shutdown().await.unwrap();
        let today: String = sqlx::query_scalar(
            "SELECT 'consign_outbox_archive_' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let count = |table: &str| {
            let query = format!("SELECT count(*) FROM {table}");
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(query))
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(
            count(&today).await,
            500,
            "published rows are in today's partition"
        );
        assert_eq!(count("consign_outbox_archive_default").await, 0);
        let archived: Vec<Uuid> =
            sqlx::query_scalar("SELECT id FROM consign_outbox_archive ORDER BY seq")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(archived, ids);

        // A partition of 10 days ago with 3 rows, and 1 row of 40 days ago in
        // the default partition (its day had no partition).
        let old: String = sqlx::query_scalar(
            "SELECT consign_archive_partition((now() AT TIME ZONE 'UTC')::date - 10)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        for (age, n) in [("10 days", 3), ("40 days", 1)] {
            sqlx::query(
                "INSERT INTO consign_outbox_archive
                     (seq, id, partition, topic, event_type, payload, headers, created_at, attempts, published_at)
                 SELECT g, gen_random_uuid(), 0, 't', 'Old', '', '{}', now(), 0, now() - $1::interval
                 FROM generate_series(1, $2) AS g",
            )
            .bind(age)
            .bind(n)
            .execute(&pool)
            .await
            .unwrap();
        }
        assert_eq!(count(&old).await, 3);

        let config = relay_config(&db::url(&pool), "unused:9092", &[], &[]);
        let (ok, out) = RelayProcess::command(
            &config,
            &["cleanup", "--archive-older-than", "7days", "--json"],
        )
        .await;
        assert!(ok, "{out}");
        let cleaned: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            cleaned["archive_partitions"],
            serde_json::json!([old]),
            "{out}"
        );
        assert_eq!(cleaned["archive_default_rows"], 1, "{out}");
        let gone: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&old)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(gone, None, "the old day was dropped as a table");
        assert_eq!(
            count("consign_outbox_archive").await,
            500,
            "today's rows stay"
        );
        // The default retention (30 days) drops nothing more.
        let (ok, out) = RelayProcess::command(&config, &["cleanup"]).await;
        assert!(
            ok && out.contains("dropped 0 archive partitions older than 30days"),
            "{out}"
        );
    }
}

/// `requeue --all` reads the letters a page (100) at a time, so memory
/// stays bounded however many there are (issue 13 item 9); every page is
/// requeued, in `failed_at` order, in one transaction, and the letters it
/// cannot requeue stay without stopping the pages after them.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn requeue_all_goes_through_every_page_in_order(pool: PgPool) {
    use consign::inbox::dead_letters::{Selection, requeue};
    sqlx::query(
        "INSERT INTO consign_dead_letters
             (consumer, message_id, topic, partition, \"offset\", key, payload, error, attempts, failed_at)
         SELECT 'c', gen_random_uuid(), 't', 0, n,
                CASE WHEN n = 150 THEN '\\xfffe'::bytea ELSE convert_to('k-' || n, 'UTF8') END,
                convert_to(n::text, 'UTF8'), 'boom', 1, now() - (300 - n) * interval '1 second'
         FROM generate_series(1, 250) AS n",
    )
    .execute(&pool)
    .await
    .unwrap();
    let done = requeue(&pool, &consign::Outbox::new(), &Selection::all())
        .await
        .unwrap();
    assert_eq!(done.requeued.len(), 249, "{:?}", done.skipped);
    assert_eq!(done.skipped.len(), 1);
    let payloads: Vec<String> =
        sqlx::query_scalar("SELECT convert_from(payload, 'UTF8') FROM consign_outbox ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    let expected: Vec<String> = (1..=250)
        .filter(|n| *n != 150)
        .map(|n| n.to_string())
        .collect();
    assert_eq!(payloads, expected);
}

/// Requeue goes through `Outbox::enqueue_batch` (issue 14 item 2): a letter
/// the outbox refuses (here a payload over its limit) stays, with the
/// outbox's reason, and the others are enqueued with the same checks as any
/// message, addressed to the consumer that gave up.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn requeue_validates_through_the_outbox_and_keeps_what_it_refuses(pool: PgPool) {
    use consign::inbox::dead_letters::{Selection, requeue};
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO consign_dead_letters
             (consumer, message_id, topic, partition, \"offset\", key, headers, payload, error, attempts)
         SELECT 'c', gen_random_uuid(), 't', 0, n, convert_to('k', 'UTF8'),
                '[{\"name\": \"consign-event-type\", \"value\": \"Placed\"}, {\"name\": \"tenant\", \"value\": \"acme\"}]',
                convert_to(repeat('x', size), 'UTF8'), 'boom', 1
         FROM (VALUES (1, 10), (2, 5000)) AS t(n, size)
         RETURNING id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let outbox = consign::Outbox::builder().max_payload_bytes(1024).build();
    let done = requeue(&pool, &outbox, &Selection::all()).await.unwrap();
    assert_eq!(done.requeued.len(), 1, "{done:?}");
    assert_eq!(done.skipped.len(), 1, "{done:?}");
    let (kept, reason) = &done.skipped[0];
    assert_eq!(*kept, ids[1]);
    assert!(reason.contains("payload"), "{reason}");
    let (event_type, headers): (String, serde_json::Value) =
        sqlx::query_as("SELECT event_type, headers FROM consign_outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(event_type, "Placed");
    assert_eq!(
        headers,
        serde_json::json!({"tenant": "acme", "consign-requeued-for": "c"})
    );
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM consign_dead_letters")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, [ids[1]]);
}
