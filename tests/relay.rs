//! End to end through the embedded relay: outbox -> relay -> broker.
//!
//! Runs on the mock cluster, or on the broker named by
//! `TEST_KAFKA_BROKERS` (tests that inject faults then skip).

use std::{collections::HashMap, time::Duration};

use consign::{Message, Outbox, Relay, relay::RelayHandle};
use consign_test_support::{
    TestBroker, TopicReader, broker_test, db, eventually, fast_relay_settings, unique_topic,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rdkafka::types::RDKafkaRespErr;
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn relay(pool: &PgPool, broker: &TestBroker) -> consign::relay::RelayBuilder {
    Relay::builder(pool.clone())
        .kafka("bootstrap.servers", broker.bootstrap())
        .settings(fast_relay_settings())
}

async fn drained(pool: &PgPool) {
    db::wait_drained(pool, WAIT).await.unwrap();
}

broker_test! {
    async fn committed_events_arrive_with_key_payload_and_headers_intact(pool: PgPool, broker: TestBroker) {
        let topic = unique_topic("intact");
        broker.create_topic(&topic, 4).await.unwrap();

        let all_bytes: Vec<u8> = (0..=255).collect();
        let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let sent = vec![
            Message::new(&topic, "Keyed", b"{\"a\":1}".to_vec())
                .with_key("order-1")
                .with_header("tenant", "acme")
                .with_header("z-last", "ünïcødé ✓"),
            Message::new(&topic, "Binary", all_bytes).with_key("order-2"),
            Message::new(&topic, "Empty", Vec::new()),
            Message::new(&topic, "Traced", b"t".to_vec())
                .with_key("order-1")
                .with_trace_context(trace, Some("vendor=opaque".into())),
            Message::json(&topic, "Json", &serde_json::json!({"n": [1, 2, 3]})).unwrap(),
        ];
        let outbox = Outbox::new();
        let mut tx = pool.begin().await.unwrap();
        outbox.enqueue(&mut *tx, sent[0].clone()).await.unwrap();
        outbox.enqueue_batch(&mut *tx, &sent[1..]).await.unwrap();
        tx.commit().await.unwrap();

        let relay = relay(&pool, &broker).build().unwrap().spawn();
        relay.wake();
        let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
        let received = reader
            .read_distinct(sent.len(), WAIT)
            .await
            .unwrap()
            .to_vec();
        drained(&pool).await;
        relay.shutdown().await.unwrap();

        assert_eq!(received.len(), sent.len(), "no duplicates without faults");
        let by_id: HashMap<Uuid, _> = received.iter().map(|r| (r.id().unwrap(), r)).collect();
        for msg in &sent {
            let got = by_id[&msg.id()];
            assert_eq!(got.key.as_deref(), msg.key(), "{}", msg.event_type());
            assert_eq!(got.payload, msg.payload(), "{}", msg.event_type());
            let mut expected: Vec<(String, Vec<u8>)> = vec![
                ("consign-id".into(), msg.id().to_string().into_bytes()),
                (
                    "consign-event-type".into(),
                    msg.event_type().as_bytes().to_vec(),
                ),
            ];
            if let Some(tp) = msg.traceparent() {
                expected.push(("traceparent".into(), tp.as_bytes().to_vec()));
            }
            if let Some(ts) = msg.tracestate() {
                expected.push(("tracestate".into(), ts.as_bytes().to_vec()));
            }
            for (name, value) in msg.headers() {
                expected.push((name.clone(), value.as_bytes().to_vec()));
            }
            assert_eq!(got.headers, expected, "{}", msg.event_type());
            assert!(got.timestamp.is_some_and(|t| t > 1_700_000_000_000));
        }
        // Same key, same Kafka partition, in enqueue order.
        let order_1: Vec<_> = received
            .iter()
            .filter(|r| r.key.as_deref() == Some("order-1"))
            .collect();
        assert_eq!(order_1.len(), 2);
        assert_eq!(order_1[0].partition, order_1[1].partition);
        assert_eq!(order_1[0].header("consign-event-type"), Some("Keyed"));
        assert_eq!(order_1[1].header("consign-event-type"), Some("Traced"));
    }
}

broker_test! {
    async fn rolled_back_transactions_publish_nothing(pool: PgPool, broker: TestBroker) {
        let topic = unique_topic("rollback");
        broker.create_topic(&topic, 1).await.unwrap();
        sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        let outbox = Outbox::new();

        // Explicit rollback.
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO orders VALUES (1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        outbox
            .enqueue(&mut *tx, Message::new(&topic, "RolledBack", b"1".to_vec()))
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        // A business statement fails after the enqueue: the caller drops the
        // transaction, which rolls it back.
        let mut tx = pool.begin().await.unwrap();
        outbox
            .enqueue(&mut *tx, Message::new(&topic, "Failed", b"2".to_vec()))
            .await
            .unwrap();
        sqlx::query("INSERT INTO orders VALUES (NULL)")
            .execute(&mut *tx)
            .await
            .unwrap_err();
        drop(tx);
        // Committed.
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO orders VALUES (3)")
            .execute(&mut *tx)
            .await
            .unwrap();
        let committed = outbox
            .enqueue(&mut *tx, Message::new(&topic, "Committed", b"3".to_vec()))
            .await
            .unwrap();
        tx.commit().await.unwrap();

        let relay = relay(&pool, &broker).build().unwrap().spawn();
        let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
        reader.read_distinct(1, WAIT).await.unwrap();
        drained(&pool).await;
        relay.shutdown().await.unwrap();
        let received = reader.read_to_end(WAIT).await.unwrap();

        let ids: Vec<_> = received.iter().map(|r| r.id().unwrap()).collect();
        assert_eq!(
            ids,
            vec![committed],
            "only the committed event reached the topic"
        );
    }
}

broker_test! {
    /// Writers take a row lock on their key's counter, so per key the counter
    /// value is the commit order; the topic must show 1, 2, 3, ... per key.
    async fn per_key_order_holds_over_10k_events_and_100_keys(pool: PgPool, broker: TestBroker) {
        const EVENTS: usize = 10_000;
        const KEYS: usize = 100;
        const WRITERS: u64 = 4;
        let topic = unique_topic("order");
        broker.create_topic(&topic, 8).await.unwrap();
        sqlx::query("CREATE TABLE counters (key text PRIMARY KEY, n int NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO counters SELECT 'key-' || g, 0 FROM generate_series(0, $1 - 1) g")
            .bind(i32::try_from(KEYS).unwrap())
            .execute(&pool)
            .await
            .unwrap();

        let relay = relay(&pool, &broker)
            .batch_size(500)
            .build()
            .unwrap()
            .spawn();
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (pool, topic, waker) = (pool.clone(), topic.clone(), relay.waker());
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed + w);
                    let mut written = 0;
                    while written < EVENTS / 4 {
                        let mut keys: Vec<usize> = (0..rng.random_range(1..=3))
                            .map(|_| rng.random_range(0..KEYS))
                            .collect();
                        keys.sort_unstable();
                        keys.dedup();
                        keys.truncate(EVENTS / 4 - written);
                        let mut tx = pool.begin().await.unwrap();
                        let mut batch = Vec::new();
                        for key in keys {
                            let key = format!("key-{key}");
                            let n: i32 = sqlx::query_scalar(
                                "UPDATE counters SET n = n + 1 WHERE key = $1 RETURNING n",
                            )
                            .bind(&key)
                            .fetch_one(&mut *tx)
                            .await
                            .unwrap();
                            batch.push(Message::new(&topic, "Counted", n.to_string()).with_key(key));
                        }
                        written += batch.len();
                        Outbox::new().enqueue_batch(&mut *tx, &batch).await.unwrap();
                        tx.commit().await.unwrap();
                        waker.wake();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }

        let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
        let received = reader.read_distinct(EVENTS, WAIT).await.unwrap().to_vec();
        relay.shutdown().await.unwrap();

        let mut seen = std::collections::HashSet::new();
        let mut per_key: HashMap<String, (i32, Vec<i32>)> = HashMap::new();
        for r in received.iter().filter(|r| seen.insert(r.id().unwrap())) {
            let n: i32 = std::str::from_utf8(&r.payload).unwrap().parse().unwrap();
            let entry = per_key
                .entry(r.key.clone().unwrap())
                .or_insert((r.partition, Vec::new()));
            assert_eq!(entry.0, r.partition, "one key, one Kafka partition");
            entry.1.push(n);
        }
        let finals: HashMap<String, i32> = sqlx::query_as("SELECT key, n FROM counters")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(per_key.len(), KEYS);
        for (key, (_, ns)) in &per_key {
            let expected: Vec<i32> = (1..=finals[key]).collect();
            assert_eq!(ns, &expected, "events of {key} out of order or missing");
        }
        println!(
            "{} events over {} keys in order; {} duplicates",
            seen.len(),
            per_key.len(),
            reader.duplicates()
        );
    }
}

async fn row_state(pool: &PgPool, id: Uuid) -> Option<(i32, Option<String>)> {
    sqlx::query_as("SELECT attempts, last_error FROM consign_outbox WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// A row the broker refuses (the topic's `max.message.bytes` is below the
/// producer's, so librdkafka sends it and the broker answers
/// MESSAGE_TOO_LARGE in its delivery report) is not overtaken by a later row
/// of its key sent in a later request: that row is held until the refused one
/// goes out, and the topic reads a1, a2. Each message is its own
/// ProduceRequest (`linger.ms=0`, `batch.num.messages=1`). Real Kafka: the
/// mock cluster does not check idempotent sequence numbers, so it would
/// accept a2 after refusing a1 whatever the producer does.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn row_refused_in_its_delivery_report_is_not_overtaken_by_its_key(pool: PgPool) {
    refused_row_is_not_overtaken_by_its_key(&pool, false).await;
}

/// The same in transactions mode (a `read_committed` reader). Once a1 is
/// fixed it is sent alone while a2 is held back: that transaction commits
/// (before the fix it aborted because a2 was not sent, every batch, for
/// ever, and the outbox never drained).
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn row_refused_in_its_delivery_report_is_not_overtaken_by_its_key_in_transactions(
    pool: PgPool,
) {
    refused_row_is_not_overtaken_by_its_key(&pool, true).await;
}

async fn refused_row_is_not_overtaken_by_its_key(pool: &PgPool, transactions: bool) {
    let pool = pool.clone();
    let Some(broker) = TestBroker::real().unwrap() else {
        return;
    };
    let cluster = broker.cluster().unwrap();
    let topic = unique_topic("refused-order");
    cluster
        .create_topic_with(&topic, 1, &[("max.message.bytes", "2000")])
        .await
        .unwrap();
    let a1 = Message::new(&topic, "First", vec![1; 5000]).with_key("a");
    let a2 = Message::new(&topic, "Second", b"2".to_vec()).with_key("a");
    let b = Message::new(&topic, "Other", b"b".to_vec()).with_key("b");
    // The producer writes the partition once first: Kafka accepts any first
    // sequence number from a producer id it has no state for, so only a
    // producer with history there gets a2 refused as out of sequence.
    let warm_up = Message::new(&topic, "WarmUp", b"w".to_vec()).with_key("w");
    db::enqueue_all(&pool, std::slice::from_ref(&warm_up))
        .await
        .unwrap();
    let relay = relay(&pool, &broker)
        .kafka("linger.ms", "0")
        .kafka("batch.num.messages", "1")
        .settings({
            let mut settings = fast_relay_settings();
            settings.transactions = transactions;
            settings
        })
        .build()
        .unwrap()
        .spawn();
    drained(&pool).await;
    db::enqueue_all(&pool, &[a1.clone(), a2.clone(), b.clone()])
        .await
        .unwrap();
    relay.wake();
    let (attempts, error) = eventually("the refused row to be retried", WAIT, || async {
        Ok(row_state(&pool, a1.id()).await.filter(|(a, _)| *a >= 3))
    })
    .await
    .unwrap();
    println!("refused row: attempts={attempts} last_error={error:?}");
    let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
    reader.read_distinct(2, WAIT).await.unwrap();
    let ids: Vec<Uuid> = reader.received().iter().map(|r| r.id().unwrap()).collect();
    assert!(
        !ids.contains(&a2.id()),
        "a2 reached the topic ahead of the refused a1: {:?}; a1 {:?}, a2 {:?}, b {:?}",
        reader
            .received()
            .iter()
            .map(|r| (r.offset, r.id().unwrap()))
            .collect::<Vec<_>>(),
        a1.id(),
        a2.id(),
        b.id()
    );
    assert!(ids.contains(&b.id()), "key b was held back");

    // An operator shrinks the payload; a1 then a2 follow, in order.
    sqlx::query("UPDATE consign_outbox SET payload = 'fixed' WHERE id = $1")
        .bind(a1.id())
        .execute(&pool)
        .await
        .unwrap();
    reader.read_distinct(4, WAIT).await.unwrap();
    drained(&pool).await;
    relay.shutdown().await.unwrap();
    assert_eq!(
        reader.first_arrivals("a"),
        vec![a1.id(), a2.id()],
        "key a out of order"
    );
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn row_refused_by_the_broker_keeps_its_error_while_other_rows_flow(pool: PgPool) {
    let broker = TestBroker::start().unwrap();
    let Some(mock) = broker.mock() else {
        println!("skipped: needs the mock cluster to make the broker refuse a topic");
        return;
    };
    let (good, refused) = (unique_topic("good"), unique_topic("refused"));
    broker.create_topic(&good, 4).await.unwrap();
    broker.create_topic(&refused, 1).await.unwrap();
    mock.set_topic_error(
        &refused,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();

    let bad = Message::new(&refused, "Refused", b"no".to_vec()).with_key("k-1");
    let mut msgs = vec![bad.clone()];
    // The same key on another topic is not held back by the refused row.
    msgs.extend(
        (0..50).map(|i| Message::new(&good, "Ok", vec![i]).with_key(format!("k-{}", i % 5))),
    );
    db::enqueue_all(&pool, &msgs).await.unwrap();

    let relay = relay(&pool, &broker).build().unwrap().spawn();
    let mut reader = TopicReader::new(broker.bootstrap(), &good).unwrap();
    reader.read_distinct(50, WAIT).await.unwrap();
    let (attempts, error) = eventually("the refused row to be retried", WAIT, || async {
        Ok(row_state(&pool, bad.id()).await.filter(|(a, _)| *a >= 2))
    })
    .await
    .unwrap();
    let error = error.unwrap();
    println!("refused row: attempts={attempts} last_error={error}");
    assert!(error.to_lowercase().contains("authoriz"), "{error}");
    assert_eq!(
        db::outbox_len(&pool).await.unwrap(),
        1,
        "only the refused row is left"
    );
    assert!(relay.stats().failed >= 2);

    // Once the broker accepts the topic, the row goes out by itself.
    mock.set_topic_error(&refused, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    drained(&pool).await;
    let mut reader = TopicReader::new(broker.bootstrap(), &refused).unwrap();
    let received = reader.read_distinct(1, WAIT).await.unwrap();
    assert_eq!(received[0].id(), Some(bad.id()));
    relay.shutdown().await.unwrap();
}

broker_test! {
    async fn oversize_row_holds_back_only_later_rows_of_its_own_key(pool: PgPool, broker: TestBroker) {
        let topic = unique_topic("oversize");
        broker.create_topic(&topic, 2).await.unwrap();

        // The producer takes at most 10 000 bytes per message; the outbox
        // accepted 20 000 (its default limit is 900 KiB).
        let big = Message::new(&topic, "Big", vec![7; 20_000]).with_key("a");
        let after_big = Message::new(&topic, "AfterBig", b"small".to_vec()).with_key("a");
        let other = Message::new(&topic, "Other", b"small".to_vec()).with_key("b");
        db::enqueue_all(&pool, &[big.clone(), after_big.clone(), other.clone()]).await.unwrap();

        let relay = relay(&pool, &broker)
            .kafka("message.max.bytes", "10000")
            .build()
            .unwrap()
            .spawn();
        let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
        reader.read_distinct(1, WAIT).await.unwrap();
        let (attempts, error) = eventually("the oversize row to be retried", WAIT, || async {
            Ok(row_state(&pool, big.id()).await.filter(|(a, _)| *a >= 3))
        })
        .await
        .unwrap();
        println!("oversize row: attempts={attempts} last_error={error:?}");
        assert!(error.unwrap().to_lowercase().contains("too large"));
        assert_eq!(
            row_state(&pool, after_big.id()).await,
            Some((0, None)),
            "the later row of key a waits, untried, behind the refused one"
        );
        assert_eq!(reader.received().len(), 1);
        assert_eq!(
            reader.received()[0].id(),
            Some(other.id()),
            "key b was not held back"
        );

        // An operator shrinks the payload; both rows of key a follow, in order.
        sqlx::query("UPDATE consign_outbox SET payload = 'fixed' WHERE id = $1")
            .bind(big.id())
            .execute(&pool)
            .await
            .unwrap();
        let received = reader.read_distinct(3, WAIT).await.unwrap();
        let a: Vec<_> = received
            .iter()
            .filter(|r| r.key.as_deref() == Some("a"))
            .map(|r| r.id().unwrap())
            .collect();
        assert_eq!(a, vec![big.id(), after_big.id()]);
        relay.shutdown().await.unwrap();
    }
}

/// Writes `count` keyed events in transactions of 10, waking `relay`.
async fn write_events(
    pool: &PgPool,
    topic: &str,
    count: usize,
    relay: &RelayHandle,
    pace: Duration,
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for chunk in 0..count.div_ceil(10) {
        let msgs: Vec<Message> = (0..10.min(count - chunk * 10))
            .map(|i| {
                Message::new(topic, "E", vec![0; 64])
                    .with_key(format!("k{}", (chunk * 10 + i) % 37))
            })
            .collect();
        ids.extend(msgs.iter().map(Message::id));
        db::enqueue_all(pool, &msgs).await.unwrap();
        relay.wake();
        tokio::time::sleep(pace).await;
    }
    ids
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn all_brokers_down_for_12s_loses_nothing_and_flow_resumes(pool: PgPool) {
    let broker = TestBroker::start().unwrap();
    let Some(mock) = broker.mock() else {
        println!("skipped: needs the mock cluster to take brokers down");
        return;
    };
    let topic = unique_topic("outage");
    broker.create_topic(&topic, 3).await.unwrap();
    // A short delivery timeout makes the outage outlast it, so rows fail,
    // keep their error, and are retried: the slow path, not just librdkafka's
    // internal retries.
    let relay = relay(&pool, &broker)
        .kafka("message.timeout.ms", "4000")
        .build()
        .unwrap()
        .spawn();
    let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();

    let mut ids = write_events(&pool, &topic, 500, &relay, Duration::ZERO).await;
    reader.read_distinct(500, WAIT).await.unwrap();

    mock.all_down().unwrap();
    let outage = std::time::Instant::now();
    ids.extend(write_events(&pool, &topic, 1200, &relay, Duration::from_millis(100)).await);
    let waiting = db::outbox_len(&pool).await.unwrap();
    let errored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM consign_outbox WHERE last_error IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    println!(
        "after {:?} down: {waiting} rows waiting, {errored} with an error",
        outage.elapsed()
    );
    assert!(outage.elapsed() >= Duration::from_secs(10));
    assert!(
        waiting > 0,
        "rows stay in the outbox while the brokers are down"
    );
    assert!(errored > 0, "timed-out rows record their error");
    mock.all_up().unwrap();

    ids.extend(write_events(&pool, &topic, 300, &relay, Duration::ZERO).await);
    let received = reader.read_distinct(ids.len(), WAIT).await.unwrap();
    let got: std::collections::HashSet<_> = received.iter().map(|r| r.id().unwrap()).collect();
    assert!(ids.iter().all(|id| got.contains(id)));
    drained(&pool).await;
    println!(
        "{} events, {} duplicates, stats {:?}",
        ids.len(),
        reader.duplicates(),
        relay.stats()
    );
    relay.shutdown().await.unwrap();
}

broker_test! {
    async fn relay_reconnects_after_its_database_sessions_are_terminated(pool: PgPool, broker: TestBroker) {
        let topic = unique_topic("terminate");
        broker.create_topic(&topic, 3).await.unwrap();
        let relay_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(
                (*pool.connect_options())
                    .clone()
                    .application_name("relay-under-test"),
            )
            .await
            .unwrap();
        let relay = Relay::builder(relay_pool)
            .kafka("bootstrap.servers", broker.bootstrap())
            .settings(fast_relay_settings())
            .batch_size(100)
            .build()
            .unwrap()
            .spawn();

        let mut ids = Vec::new();
        let mut terminated = 0;
        for _ in 0..8 {
            ids.extend(write_events(&pool, &topic, 300, &relay, Duration::from_millis(5)).await);
            terminated += db::terminate_sessions(&pool, "relay-under-test")
                .await
                .unwrap();
        }
        println!("terminated {terminated} relay sessions");
        assert!(
            terminated >= 4,
            "the relay's sessions were terminated mid-stream"
        );

        let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
        let received = reader.read_distinct(ids.len(), WAIT).await.unwrap();
        let got: std::collections::HashSet<_> = received.iter().map(|r| r.id().unwrap()).collect();
        assert!(ids.iter().all(|id| got.contains(id)));
        drained(&pool).await;
        println!(
            "{} events, {} duplicates, stats {:?}",
            ids.len(),
            reader.duplicates(),
            relay.stats()
        );
        relay.shutdown().await.unwrap();
    }
}

/// Recording a batch's outcome is one transaction (issue 13 item 9): when
/// recording a refused row's error fails after the delivered rows'
/// DELETE, the retry deletes them again instead of finding them gone and
/// counting them as taken over by another relay ("fenced"), which also made
/// the relay stop publishing partitions it still held.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn a_failure_while_recording_a_batch_does_not_count_its_rows_as_fenced(pool: PgPool) {
    let broker = TestBroker::start().unwrap();
    let topic = unique_topic("settle-once");
    broker.create_topic(&topic, 2).await.unwrap();
    // The first UPDATE of the outbox (recording the refused row's error)
    // fails once; a sequence, since the failure rolls back anything else.
    for statement in [
        "CREATE SEQUENCE fail_once",
        "CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF nextval('fail_once') = 1 THEN
                 RAISE EXCEPTION 'injected failure while recording the batch';
             END IF;
             RETURN NEW;
         END $$",
        "CREATE TRIGGER fail_once BEFORE UPDATE ON consign_outbox
         FOR EACH ROW EXECUTE FUNCTION fail_once()",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let big = Message::new(&topic, "Big", vec![7; 20_000]).with_key("a");
    let small: Vec<Message> = (0..20)
        .map(|i| Message::new(&topic, "Small", vec![i]).with_key(format!("b-{i}")))
        .collect();
    let mut all = vec![big.clone()];
    all.extend(small.iter().cloned());
    db::enqueue_all(&pool, &all).await.unwrap();

    let relay = relay(&pool, &broker)
        .kafka("message.max.bytes", "10000")
        .build()
        .unwrap()
        .spawn();
    let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
    reader.read_distinct(20, WAIT).await.unwrap();
    eventually("the refused row's error to be recorded", WAIT, || async {
        Ok(row_state(&pool, big.id()).await.filter(|(a, _)| *a >= 1))
    })
    .await
    .unwrap();
    eventually("only the refused row left", WAIT, || async {
        Ok((db::outbox_len(&pool).await? == 1).then_some(()))
    })
    .await
    .unwrap();
    let stats = relay.stats();
    println!("{stats:?}");
    assert_eq!(
        stats.fenced, 0,
        "delivered rows counted as fenced: {stats:?}"
    );
    relay.shutdown().await.unwrap();
}

/// A batch's rows are capped by bytes as well as by count (issue 13 item
/// 9): six 200 KiB rows with `batch-max-bytes` = 256 KiB go out one per
/// batch (a batch ends before the row that would pass the cap, and always
/// has one row), in order, where one batch would otherwise hold them all.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn batches_are_capped_by_bytes(pool: PgPool) {
    let broker = TestBroker::start().unwrap();
    let topic = unique_topic("bytes");
    broker.create_topic(&topic, 1).await.unwrap();
    let big: Vec<Message> = (0..6u8)
        .map(|i| Message::new(&topic, "Big", vec![i; 200 << 10]).with_key("k"))
        .collect();
    db::enqueue_all(&pool, &big).await.unwrap();
    let relay = relay(&pool, &broker)
        .settings({
            let mut settings = fast_relay_settings();
            settings.batch_max_bytes = 256 << 10;
            settings
        })
        .build()
        .unwrap()
        .spawn();
    let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
    let received = reader.read_distinct(6, WAIT).await.unwrap();
    let order: Vec<_> = received.iter().map(|r| r.id().unwrap()).collect();
    let sent: Vec<_> = big.iter().map(Message::id).collect();
    assert_eq!(order, sent);
    drained(&pool).await;
    let stats = eventually("the last batch to be counted", WAIT, || async {
        let stats = relay.stats();
        Ok((stats.published == 6).then_some(stats))
    })
    .await
    .unwrap();
    println!("{stats:?}");
    assert!(
        stats.batches >= 6,
        "more than one big row per batch: {stats:?}"
    );
    relay.shutdown().await.unwrap();
}

broker_test! {
    /// The idle probe is only a hint: a row committed after a newer one
    /// (its transaction took its `seq` first and committed last) lies below
    /// what the probe already saw, so the probe never reports it; the
    /// ordinary poll (`max-poll-interval`) still ships it.
    async fn idle_probe_row_committed_under_an_older_seq_still_ships(pool: PgPool, broker: TestBroker) {
        let topic = unique_topic("late-seq");
        broker.create_topic(&topic, 1).await.unwrap();
        let mut settings = fast_relay_settings();
        settings.max_poll_interval = Duration::from_millis(300);
        settings.idle_probe_interval = Duration::from_millis(10);
        let relay = relay(&pool, &broker).settings(settings).build().unwrap().spawn();
        let outbox = Outbox::new();
        let mut late = pool.begin().await.unwrap();
        let late_id = outbox
            .enqueue(&mut *late, Message::new(&topic, "Late", b"l".to_vec()).with_key("l"))
            .await
            .unwrap();
        let mut early = pool.begin().await.unwrap();
        outbox
            .enqueue(&mut *early, Message::new(&topic, "Early", b"e".to_vec()).with_key("e"))
            .await
            .unwrap();
        early.commit().await.unwrap();
        let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
        reader.read_distinct(1, WAIT).await.unwrap();
        late.commit().await.unwrap();
        let received = reader.read_distinct(2, WAIT).await.unwrap();
        assert!(received.iter().any(|r| r.id() == Some(late_id)));
        drained(&pool).await;
        relay.shutdown().await.unwrap();
    }
}
