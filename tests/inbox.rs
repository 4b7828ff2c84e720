//! The inbox end to end: messages on a Kafka topic (mock cluster), an
//! `InboxConsumer` running an `InboxService` around a handler whose effect is
//! a row in `test_effects`, on real PostgreSQL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consign::inbox::{
    BoxError, Delivery, InboxConsumer, InboxLayer, InboxStats, MissingId, RetryPolicy,
};
use consign_test_support::effects::{self, Running, TestMessage, produce, tally};
use consign_test_support::{TestBroker, TopicReader, broker_test, db, eventually, unique_topic};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn fast_retries() -> RetryPolicy {
    RetryPolicy::attempts(4).with_delays(Duration::from_millis(10), Duration::from_millis(50))
}

async fn setup(pool: &PgPool, broker: &TestBroker, partitions: i32) -> String {
    effects::create_table(pool).await.unwrap();
    let topic = unique_topic("inbox");
    broker.create_topic(&topic, partitions).await.unwrap();
    topic
}

async fn wait_for_effects(pool: &PgPool, n: i64) {
    eventually(&format!("{n} distinct effects"), WAIT, || async {
        let t = tally(pool).await?;
        Ok((t.distinct >= n).then_some(()))
    })
    .await
    .unwrap();
}

async fn wait_for_stats(inbox: &InboxLayer, done: impl Fn(&InboxStats) -> bool) -> InboxStats {
    eventually("inbox stats", WAIT, || async {
        let stats = inbox.stats();
        Ok(done(&stats).then_some(stats))
    })
    .await
    .unwrap()
}

broker_test! {
    async fn every_message_delivered_three_times_takes_effect_once(pool: PgPool, broker: TestBroker) {
        let topic = setup(&pool, &broker, 3).await;
        let messages = TestMessage::stream(30, 10);
        // Each message three times: twice in a row, and once more after all.
        let doubled: Vec<TestMessage> = messages
            .iter()
            .flat_map(|m| [m.clone(), m.clone()])
            .collect();
        produce(broker.bootstrap(), &topic, &doubled).await.unwrap();
        produce(broker.bootstrap(), &topic, &messages)
            .await
            .unwrap();

        let inbox = InboxLayer::new(pool.clone(), "dup-test").unwrap();
        let service = ServiceBuilder::new()
            .layer(inbox.clone())
            .service_fn(effects::record);
        let running = Running::start(&inbox, service.clone(), broker.bootstrap(), &topic);
        let stats = wait_for_stats(&inbox, |s| s.handled + s.duplicates >= 900).await;
        running.stop().await;

        let t = tally(&pool).await.unwrap();
        println!("300 messages x 3 deliveries: {stats:?}, {t:?}");
        assert_eq!(t.effects, 300, "each message's effect exactly once");
        assert_eq!(t.distinct, 300);
        assert_eq!(t.out_of_order_keys, 0);
        assert_eq!(stats.handled, 300);
        assert_eq!(stats.duplicates, 600);

        // The offsets are in the database: a restarted consumer has nothing to
        // do, and a later redelivery is still skipped.
        produce(broker.bootstrap(), &topic, &messages[..10])
            .await
            .unwrap();
        let again = InboxLayer::new(pool.clone(), "dup-test").unwrap();
        let service = ServiceBuilder::new()
            .layer(again.clone())
            .service_fn(effects::record);
        let running = Running::start(&again, service, broker.bootstrap(), &topic);
        let stats = wait_for_stats(&again, |s| s.duplicates >= 10).await;
        running.stop().await;
        assert_eq!(stats.handled, 0, "restart resumed at the stored offsets");
        assert_eq!(stats.duplicates, 10);
        assert_eq!(tally(&pool).await.unwrap().effects, 300);
    }
}

broker_test! {
    async fn handler_failing_twice_then_succeeding_takes_effect_once(pool: PgPool, broker: TestBroker) {
        let topic = setup(&pool, &broker, 1).await;
        let messages = TestMessage::stream(5, 20);
        let flaky = messages[37].id.unwrap();
        produce(broker.bootstrap(), &topic, &messages)
            .await
            .unwrap();

        let attempts: Arc<Mutex<HashMap<Uuid, u32>>> = Arc::default();
        let inbox = InboxLayer::builder(pool.clone(), "flaky-test")
            .retry(fast_retries())
            .build()
            .unwrap();
        let seen = Arc::clone(&attempts);
        let service = ServiceBuilder::new()
            .layer(inbox.clone())
            // A tower layer inside the inbox: the second failure is a timeout.
            // Generous, so that only the sleep below hits it on a loaded machine.
            .timeout(Duration::from_secs(3))
            .service_fn(move |delivery: Delivery| {
                let seen = Arc::clone(&seen);
                async move {
                    let attempt = {
                        let mut seen = seen.lock().unwrap();
                        let n = seen.entry(delivery.id()).or_insert(0);
                        *n += 1;
                        *n
                    };
                    if delivery.id() == flaky {
                        assert_eq!(attempt, delivery.attempt(), "Delivery::attempt counts");
                        match attempt {
                            1 => return Err::<(), BoxError>("first attempt fails".into()),
                            2 => tokio::time::sleep(Duration::from_secs(60)).await,
                            _ => {}
                        }
                    }
                    effects::record(delivery).await
                }
            });
        let running = Running::start(&inbox, service, broker.bootstrap(), &topic);
        wait_for_effects(&pool, 100).await;
        running.stop().await;

        let t = tally(&pool).await.unwrap();
        assert_eq!((t.effects, t.distinct, t.out_of_order_keys), (100, 100, 0));
        assert_eq!(attempts.lock().unwrap()[&flaky], 3);
        let stats = inbox.stats();
        assert_eq!(stats.failed_attempts, 2, "{stats:?}");
        assert_eq!(stats.dead_lettered, 0);
        let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM consign_dead_letters")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(dead, 0);
    }
}

broker_test! {
    async fn poison_messages_go_to_dead_letters_with_their_reason_and_later_ones_flow(pool: PgPool, broker: TestBroker) {
        let topic = setup(&pool, &broker, 1).await;
        broker
            .create_topic(&format!("{topic}.dlq"), 1)
            .await
            .unwrap();
        let mut messages = TestMessage::stream(4, 10);
        let undecodable = TestMessage {
            payload: b"{not json".to_vec(),
            ..TestMessage::step(99, 0)
        };
        let no_id = TestMessage {
            id: None,
            ..TestMessage::step(98, 0)
        };
        let rejected = TestMessage::step(97, 0);
        let panicking = TestMessage::step(96, 0);
        let (rejected_id, panicking_id) = (rejected.id.unwrap(), panicking.id.unwrap());
        messages.insert(5, undecodable.clone());
        messages.insert(12, no_id);
        messages.insert(20, rejected);
        messages.insert(30, panicking);
        produce(broker.bootstrap(), &topic, &messages)
            .await
            .unwrap();

        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .create()
            .unwrap();
        let inbox = InboxLayer::builder(pool.clone(), "poison-test")
            .retry(fast_retries())
            .missing_id(MissingId::DeadLetter)
            .dead_letter_topic(producer)
            .build()
            .unwrap();
        let service = ServiceBuilder::new().layer(inbox.clone()).service_fn(
            move |mut delivery: Delivery| async move {
                if delivery.id() == rejected_id {
                    return Err::<(), BoxError>(delivery.reject("sku 97 does not exist").into());
                }
                assert!(delivery.id() != panicking_id, "handler bug on message 96");
                effects::record(delivery).await
            },
        );
        let running = Running::start(&inbox, service, broker.bootstrap(), &topic);
        wait_for_stats(&inbox, |s| s.handled + s.dead_lettered >= 44).await;
        running.stop().await;

        let t = tally(&pool).await.unwrap();
        assert_eq!(
            (t.effects, t.distinct),
            (40, 40),
            "every good message handled"
        );
        type DeadLetter = (Option<Uuid>, String, i32, Option<Vec<u8>>);
        let dead: Vec<DeadLetter> = sqlx::query_as(
            "SELECT message_id, error, attempts, payload FROM consign_dead_letters ORDER BY \"offset\"",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        for (_, error, attempts, _) in &dead {
            println!("dead letter after {attempts} attempts: {error}");
        }
        assert_eq!(dead.len(), 4);
        assert_eq!(dead[0].0, undecodable.id);
        assert!(
            dead[0].1.contains("payload is not a valid"),
            "{}",
            dead[0].1
        );
        assert_eq!(dead[0].2, 1, "undecodable: no retries");
        assert_eq!(
            dead[0].3.as_deref(),
            Some(&b"{not json"[..]),
            "payload kept"
        );
        assert_eq!(dead[1].0, None);
        assert!(dead[1].1.contains("no consign-id header"), "{}", dead[1].1);
        assert_eq!(dead[2].0, Some(rejected_id));
        assert!(dead[2].1.contains("sku 97 does not exist"), "{}", dead[2].1);
        assert_eq!(dead[2].2, 1, "rejected: no retries");
        assert_eq!(dead[3].0, Some(panicking_id));
        assert!(
            dead[3]
                .1
                .contains("handler panicked: handler bug on message 96"),
            "{}",
            dead[3].1
        );
        assert_eq!(dead[3].2, 4, "a panic is retried like an error");

        // The same four on the dead-letter topic, with the reason.
        let mut reader = TopicReader::new(broker.bootstrap(), &format!("{topic}.dlq")).unwrap();
        let dlq = reader.read_to_end(WAIT).await.unwrap();
        assert_eq!(dlq.len(), 4);
        assert!(
            dlq[2]
                .header("consign-dlq-error")
                .is_some_and(|e| e.contains("sku 97"))
        );
        assert_eq!(dlq[2].header("consign-dlq-consumer"), Some("poison-test"));
    }
}

broker_test! {
    /// Backpressure under membership changes: a backlog of 4,000 messages per
    /// partition (each queue holds 2,000) and a handler that takes 0.2 ms a
    /// message keep every partition's queue full, so the runner pauses and
    /// resumes partitions all along, usually at offsets inside record batches.
    /// A second member joins and leaves while partitions are paused: every
    /// message still takes effect exactly once, in key order. (A partition left
    /// paused across a revocation, or a broker that answers a fetch inside a
    /// batch with the next batch, fails it.)
    async fn paused_partitions_resume_exactly_as_members_join_and_leave(pool: PgPool, broker: TestBroker) {
        let topic = setup(&pool, &broker, 6).await;
        let messages = TestMessage::stream(240, 100); // 24,000 messages
        produce(broker.bootstrap(), &topic, &messages).await.unwrap();
        let inbox = InboxLayer::new(pool.clone(), "backpressure-test").unwrap();
        let service = ServiceBuilder::new()
            .layer(inbox.clone())
            .service_fn(|delivery: Delivery| async move {
                tokio::time::sleep(Duration::from_micros(200)).await;
                effects::record(delivery).await
            });
        let first = Running::start(&inbox, service.clone(), broker.bootstrap(), &topic);
        wait_for_effects(&pool, 3000).await;
        let second = Running::start(&inbox, service.clone(), broker.bootstrap(), &topic);
        wait_for_effects(&pool, 9000).await;
        second.stop().await;
        let finished = eventually("every effect", WAIT, || async {
            Ok((tally(&pool).await?.distinct >= 24_000).then_some(()))
        })
        .await;
        let t = tally(&pool).await.unwrap();
        assert!(finished.is_ok(), "stuck at {} of 24000 effects: a paused partition never resumed? {t:?}", t.distinct);
        first.stop().await;

        let t = tally(&pool).await.unwrap();
        println!("24000 messages, queues full, a member joining and leaving: {:?}, {t:?}", inbox.stats());
        assert_eq!(t.effects, 24_000, "no effect applied twice");
        assert_eq!(t.distinct, 24_000, "none skipped");
        assert_eq!(t.out_of_order_keys, 0, "per-key order of effects");
    }
}

broker_test! {
    async fn consumers_joining_and_leaving_mid_stream_apply_each_effect_once_in_key_order(pool: PgPool, broker: TestBroker) {
        let topic = setup(&pool, &broker, 6).await;
        let messages = TestMessage::stream(120, 50); // 6000 messages, 120 keys
        let inbox = InboxLayer::new(pool.clone(), "group-test").unwrap();
        let service = ServiceBuilder::new()
            .layer(inbox.clone())
            .service_fn(effects::record);

        let first = Running::start(&inbox, service.clone(), broker.bootstrap(), &topic);
        let (a, rest) = messages.split_at(2000);
        let (b, c) = rest.split_at(2000);
        produce(broker.bootstrap(), &topic, a).await.unwrap();
        wait_for_effects(&pool, 500).await;
        // A second member joins: partitions are split between the two.
        let second = Running::start(&inbox, service.clone(), broker.bootstrap(), &topic);
        produce(broker.bootstrap(), &topic, b).await.unwrap();
        wait_for_effects(&pool, 3000).await;
        // The first leaves: the second takes everything over.
        first.stop().await;
        produce(broker.bootstrap(), &topic, c).await.unwrap();
        wait_for_effects(&pool, 6000).await;
        second.stop().await;

        let t = tally(&pool).await.unwrap();
        println!(
            "6000 messages through a changing group: {:?}, {t:?}",
            inbox.stats()
        );
        assert_eq!(t.effects, 6000, "no effect applied twice");
        assert_eq!(t.distinct, 6000, "none skipped");
        assert_eq!(t.out_of_order_keys, 0, "per-key order of effects");
    }
}

broker_test! {
    async fn database_sessions_terminated_mid_run_cause_no_double_effect(pool: PgPool, broker: TestBroker) {
        let topic = setup(&pool, &broker, 3).await;
        let messages = TestMessage::stream(50, 100); // 5000
        produce(broker.bootstrap(), &topic, &messages)
            .await
            .unwrap();

        let options: PgConnectOptions = (*pool.connect_options())
            .clone()
            .application_name("inbox-under-test");
        let consumer_pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .unwrap();
        let inbox = InboxLayer::new(consumer_pool, "terminate-test").unwrap();
        let service = ServiceBuilder::new()
            .layer(inbox.clone())
            .service_fn(effects::record);
        let running = Running::start(&inbox, service, broker.bootstrap(), &topic);
        let mut killed = 0;
        for _ in 0..5 {
            let target = (tally(&pool).await.unwrap().distinct + 200).min(5000);
            wait_for_effects(&pool, target).await;
            killed += db::terminate_sessions(&pool, "inbox-under-test")
                .await
                .unwrap();
        }
        wait_for_effects(&pool, 5000).await;
        running.stop().await;

        let t = tally(&pool).await.unwrap();
        println!("terminated {killed} sessions; {:?}; {t:?}", inbox.stats());
        assert!(killed > 0);
        assert_eq!(
            (t.effects, t.distinct, t.out_of_order_keys),
            (5000, 5000, 0)
        );
    }
}

/// A consumer that cannot go on must say so: `run` returns the error instead
/// of logging it for ever. Two members with one `group.instance.id` (static
/// membership): the broker fences the older one, a fatal error for
/// librdkafka, and its `run` ends with it. A session timeout the broker
/// refuses (below `group.min.session.timeout.ms`) ends `run` with an error
/// naming the property. Real Kafka only (the mock cluster has no static
/// membership nor session limits).
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn fatal_consumer_errors_end_run_with_the_error(pool: PgPool) {
    let Some(broker) = TestBroker::real().unwrap() else {
        return;
    };
    let topic = setup(&pool, &broker, 1).await;
    let inbox = InboxLayer::new(pool.clone(), unique_topic("fatal-test")).unwrap();
    let service = ServiceBuilder::new()
        .layer(inbox.clone())
        .service_fn(effects::record);
    let start = |extra: (&'static str, &'static str)| {
        let consumer = InboxConsumer::builder(&inbox)
            .topic(&topic)
            .kafka("bootstrap.servers", broker.bootstrap())
            .kafka("session.timeout.ms", "6000")
            .kafka(extra.0, extra.1)
            .build()
            .unwrap();
        tokio::spawn(consumer.run(service.clone(), CancellationToken::new()))
    };
    let first = start(("group.instance.id", "member-a"));
    produce(broker.bootstrap(), &topic, &TestMessage::stream(1, 10))
        .await
        .unwrap();
    wait_for_effects(&pool, 10).await;
    let second = start(("group.instance.id", "member-a"));
    let ended = tokio::time::timeout(WAIT, first)
        .await
        .expect("the fenced consumer's run did not end")
        .unwrap();
    let error = ended.expect_err("run ended without an error");
    println!("fenced member: {error}");
    assert!(
        error.to_string().to_lowercase().contains("fenced"),
        "{error}"
    );
    second.abort();

    let refused = start(("session.timeout.ms", "3000"));
    let ended = tokio::time::timeout(WAIT, refused)
        .await
        .expect("run with a refused session timeout did not end")
        .unwrap();
    let error = ended.expect_err("run ended without an error");
    println!("refused session timeout: {error}");
    assert!(error.to_string().contains("session.timeout.ms"), "{error}");
}

/// Issue 13 item 7: stored offsets that cannot be read at assignment (the
/// database unreachable) hold the partitions until the database answers,
/// instead of starting from Kafka's committed offset or `earliest`. Here
/// the dedup records are gone (retention) and Kafka has forgotten the
/// group's offsets, so starting anywhere but the stored offsets would
/// re-apply every effect. Real Kafka only (deleting a group's offsets).
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn stored_offsets_unreadable_at_assignment_hold_the_partitions_until_the_database_answers(
    pool: PgPool,
) {
    use consign_test_support::net::TcpProxy;
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;

    let Some(broker) = TestBroker::real().unwrap() else {
        return;
    };
    let topic = setup(&pool, &broker, 2).await;
    let group = unique_topic("fail-closed");
    produce(broker.bootstrap(), &topic, &TestMessage::stream(4, 10))
        .await
        .unwrap();
    let inbox = InboxLayer::new(pool.clone(), group.clone()).unwrap();
    let service = ServiceBuilder::new()
        .layer(inbox.clone())
        .service_fn(effects::record);
    let first = Running::start(&inbox, service, broker.bootstrap(), &topic);
    wait_for_effects(&pool, 40).await;
    first.stop().await;

    // Retention removed the dedup records; Kafka forgot the group.
    sqlx::query("DELETE FROM consign_inbox")
        .execute(&pool)
        .await
        .unwrap();
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .unwrap();
    // The broker may still count the stopped member for a moment.
    eventually("the group to be deleted in Kafka", WAIT, || async {
        let deleted = admin
            .delete_groups(&[group.as_str()], &AdminOptions::new())
            .await?;
        Ok(deleted.iter().all(Result::is_ok).then_some(()))
    })
    .await
    .unwrap();

    // The next member reaches the database through a proxy that is cut
    // while it is assigned the partitions, for longer than the old code's
    // five retries (about 6 s).
    let (proxy, url) = TcpProxy::for_database(&pool).await.unwrap();
    proxy.cut();
    let through = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy(&url)
        .unwrap();
    let inbox = InboxLayer::new(through, group.clone()).unwrap();
    let service = ServiceBuilder::new()
        .layer(inbox.clone())
        .service_fn(effects::record);
    let second = Running::start(&inbox, service, broker.bootstrap(), &topic);
    tokio::time::sleep(Duration::from_secs(15)).await;
    proxy.restore();
    let later: Vec<TestMessage> = (10..20).map(|key| TestMessage::step(key, 0)).collect();
    produce(broker.bootstrap(), &topic, &later).await.unwrap();
    wait_for_effects(&pool, 50).await;
    // Anything re-applied from the start would arrive with or before the
    // later messages; give stragglers a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    second.stop().await;
    let t = tally(&pool).await.unwrap();
    println!("after the database came back: {t:?}, {:?}", inbox.stats());
    assert_eq!(
        t.effects, 50,
        "effects re-applied after starting from the wrong offset: {t:?}"
    );
    assert_eq!(t.distinct, 50);
}

/// Secrets in the consumer's Kafka properties never show (issue 13 item
/// 11): not in its `Debug`, not in the error when librdkafka refuses the
/// property (`sasl.jaas.config` is Java's, unknown to librdkafka, and its
/// value holds a password).
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn consumer_secrets_stay_out_of_debug_and_refusals(pool: PgPool) {
    const SECRET: &str = "inbox-secret-7f3a";
    let inbox = InboxLayer::new(pool, unique_topic("secrets")).unwrap();
    let build = |key: &str| {
        InboxConsumer::builder(&inbox)
            .topic("t")
            .kafka("bootstrap.servers", "127.0.0.1:1")
            .kafka(key, format!("password=\"{SECRET}\";"))
            .build()
            .unwrap()
    };
    for key in [
        "sasl.password",
        "ssl.key.password",
        "ssl.keystore.password",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "sasl.oauthbearer.assertion.private.key.pem",
        "ssl.key.pem",
        "sasl.oauthbearer.config",
        "sasl.jaas.config",
    ] {
        let debug = format!("{:?}", build(key));
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(debug.contains(key), "{debug}");
    }
    let service = ServiceBuilder::new()
        .layer(inbox.clone())
        .service_fn(effects::record);
    let error = tokio::time::timeout(
        WAIT,
        build("sasl.jaas.config").run(service, CancellationToken::new()),
    )
    .await
    .expect("run with a refused property did not end")
    .expect_err("librdkafka accepted sasl.jaas.config");
    println!("{error}");
    assert!(!error.to_string().contains(SECRET), "{error}");
    assert!(error.to_string().contains("sasl.jaas.config"), "{error}");
}

/// A topic deleted and created again (issue 13 item 8): the group's stored
/// offset now lies past the new partition's end, and consuming from
/// Kafka's reset position would take the new records for the old ones
/// (with `MissingId::FromPosition`, the same topic/partition/offset gave
/// the same id, so they were skipped as duplicates, silently). The
/// consumer stops instead, naming the topic and what to do; once the
/// stored offsets are deleted, the new records are handled (their ids
/// include the record timestamp, so the old dedup records do not match).
/// Real Kafka only (deleting a topic).
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn a_topic_created_again_is_not_mistaken_for_the_old_one(pool: PgPool) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;

    let Some(broker) = TestBroker::real().unwrap() else {
        return;
    };
    let topic = setup(&pool, &broker, 1).await;
    let without_id = |keys: std::ops::Range<u32>| -> Vec<TestMessage> {
        keys.map(|key| TestMessage {
            id: None,
            ..TestMessage::step(key, 0)
        })
        .collect()
    };
    produce(broker.bootstrap(), &topic, &without_id(0..30))
        .await
        .unwrap();
    let inbox = InboxLayer::builder(pool.clone(), unique_topic("recreated"))
        .missing_id(MissingId::FromPosition)
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(inbox.clone())
        .service_fn(effects::record);
    let first = Running::start(&inbox, service.clone(), broker.bootstrap(), &topic);
    wait_for_effects(&pool, 30).await;
    first.stop().await;

    // The topic is deleted and created again with 10 new records.
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .unwrap();
    let deleted = admin
        .delete_topics(&[topic.as_str()], &AdminOptions::new())
        .await
        .unwrap();
    assert!(deleted.iter().all(Result::is_ok), "{deleted:?}");
    eventually("the topic to be created again", WAIT, || async {
        Ok(broker.create_topic(&topic, 1).await.is_ok().then_some(()))
    })
    .await
    .unwrap();
    produce(broker.bootstrap(), &topic, &without_id(100..110))
        .await
        .unwrap();

    let consumer = || {
        InboxConsumer::builder(&inbox)
            .topic(&topic)
            .kafka("bootstrap.servers", broker.bootstrap())
            .build()
            .unwrap()
    };
    let ended = tokio::time::timeout(
        WAIT,
        consumer().run(service.clone(), CancellationToken::new()),
    )
    .await
    .expect("the consumer went on from a stored offset past the partition's end");
    let error = ended.expect_err("run ended without an error");
    println!("{error}");
    let text = error.to_string();
    assert!(
        text.contains(&topic) && text.contains("past the partition's end"),
        "{text}"
    );
    assert_eq!(tally(&pool).await.unwrap().effects, 30);

    // The operator follows the advice; the new records take effect.
    sqlx::query("DELETE FROM consign_inbox_offsets WHERE consumer_group = $1 AND topic = $2")
        .bind(inbox.consumer())
        .bind(&topic)
        .execute(&pool)
        .await
        .unwrap();
    let again = Running::start(&inbox, service, broker.bootstrap(), &topic);
    wait_for_effects(&pool, 40).await;
    again.stop().await;
    let t = tally(&pool).await.unwrap();
    println!("{t:?}, {:?}", inbox.stats());
    assert_eq!((t.effects, t.distinct), (40, 40));
}
