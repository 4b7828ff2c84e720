//! The relay's floor and read-ahead (`relay/src/relay/floor.rs`): batch
//! reads that start above the rows already read, and the next batch read
//! and sent while the broker acknowledges the current one.
//!
//! The floor needs snapshots in which no transaction of the database
//! cluster is in progress, so the tests of this file take turns (one lock)
//! and each checks that the floor was in use, or the test would prove
//! nothing.

use std::time::Duration;

use consign::{
    Message, Outbox, Relay,
    relay::{RelayHandle, RelaySettings, RelayStats},
};
use consign_test_support::{
    TestBroker, TopicReader, db, eventually, fast_relay_settings, unique_topic,
};
use sqlx::PgPool;
use tokio::sync::Mutex;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

/// One test at a time: each one's open transactions would keep the other's
/// snapshots from being quiet.
static TURNS: Mutex<()> = Mutex::const_new(());

/// A relay on `pool` publishing to `bootstrap` with `settings`, plus the
/// producer properties `kafka`.
fn spawn_relay(
    pool: &PgPool,
    bootstrap: &str,
    kafka: &[(&str, &str)],
    settings: RelaySettings,
) -> RelayHandle {
    Relay::builder(pool.clone())
        .kafka("bootstrap.servers", bootstrap)
        .kafka_properties(kafka.iter().copied())
        .settings(settings)
        .build()
        .unwrap()
        .spawn()
}

/// A transaction takes its row's `seq` and stays open while rows with
/// higher `seq`s are written, read and published (the relay reads above a
/// floor all the while). When it commits, its row lies below rows already
/// read; the key's next row, written right after, must not overtake it.
/// The open transaction keeps every snapshot from being quiet, so the floor
/// does not rise past its row; a floor that did (one ignoring transactions
/// in progress) would read the next row first and find the late one only at
/// the next full read, after it.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn a_row_committed_after_later_rows_were_read_keeps_its_key_order(pool: PgPool) {
    let _turn = TURNS.lock().await;
    let broker = TestBroker::start().unwrap();
    let topic = unique_topic("floor-late");
    broker.create_topic(&topic, 1).await.unwrap();
    let mut settings = fast_relay_settings();
    // No full read comes to the rescue during the test.
    settings.max_poll_interval = Duration::from_secs(30);
    let relay = spawn_relay(&pool, broker.bootstrap(), &[], settings);

    // A steady trickle of other rows keeps the relay reading (and
    // sampling the outbox's horizon) throughout.
    let stop = tokio_util::sync::CancellationToken::new();
    let trickle = tokio::spawn({
        let (pool, topic, stop) = (pool.clone(), topic.clone(), stop.clone());
        async move {
            let mut written = 0_u32;
            while !stop.is_cancelled() {
                let row = Message::new(&topic, "Other", b"o".to_vec()).with_key("other");
                db::enqueue_all(&pool, &[row]).await.unwrap();
                written += 1;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            written
        }
    });
    let floor_in_use = eventually("reads above the floor", WAIT, || async {
        Ok(Some(relay.stats()).filter(|s: &RelayStats| s.reads_above_floor > 0))
    })
    .await;
    assert!(
        floor_in_use.is_ok(),
        "the relay never read above a floor: something kept every snapshot busy, so this test proves nothing"
    );

    let late = Message::new(&topic, "Late", b"1".to_vec()).with_key("k");
    let mut open = pool.begin().await.unwrap();
    Outbox::new()
        .enqueue(&mut *open, late.clone())
        .await
        .unwrap();
    // Longer than the floor's settling time, while the trickle is read and
    // published above the open transaction's row.
    tokio::time::sleep(Duration::from_secs(4)).await;
    open.commit().await.unwrap();
    let next = Message::new(&topic, "Next", b"2".to_vec()).with_key("k");
    db::enqueue_all(&pool, std::slice::from_ref(&next))
        .await
        .unwrap();
    stop.cancel();
    let written = trickle.await.unwrap();
    relay.wake();

    let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
    let all = usize::try_from(written).unwrap() + 2;
    reader.read_distinct(all, WAIT).await.unwrap();
    db::wait_drained(&pool, WAIT).await.unwrap();
    relay.shutdown().await.unwrap();
    assert_eq!(
        reader.first_arrivals("k"),
        vec![late.id(), next.id()],
        "the row committed late was overtaken by its key's next row ({written} other rows written meanwhile)"
    );
}

/// A backlog drained one row per batch, so that once the floor is decided
/// every batch is read and sent while its predecessor is acknowledged. A
/// row the broker refuses (too large for the topic) is followed by a later
/// row of its key in the very next batch, already sent: that row must not
/// reach the topic ahead of it (the gapless producer stops at the refusal,
/// the later row comes back unknown and waits). Once the refused row is
/// fixed, both arrive in order and the whole backlog arrives, each key in
/// order. Real Kafka: the mock cluster does not check sequence numbers.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn a_refused_row_is_not_overtaken_by_its_key_in_the_batch_read_ahead(pool: PgPool) {
    let _turn = TURNS.lock().await;
    let Some(broker) = TestBroker::real().unwrap() else {
        println!("skipped: needs real Kafka (TEST_KAFKA_LIBS)");
        return;
    };
    let cluster = broker.cluster().unwrap();
    let topic = unique_topic("floor-ahead");
    cluster
        .create_topic_with(&topic, 1, &[("max.message.bytes", "2000")])
        .await
        .unwrap();
    // The producer writes the partition once first, so that Kafka checks
    // its sequence numbers (see tests/relay.rs).
    let warm_up = Message::new(&topic, "WarmUp", b"w".to_vec()).with_key("w");
    let mut backlog = vec![warm_up];
    let keys = ["b", "c", "d"];
    for n in 0..1500 {
        backlog.push(
            Message::new(&topic, "Step", n.to_string().into_bytes()).with_key(keys[n % keys.len()]),
        );
    }
    let refused = Message::new(&topic, "TooLarge", vec![1; 5000]).with_key("a");
    let follower = Message::new(&topic, "Follower", b"a2".to_vec()).with_key("a");
    backlog.push(refused.clone());
    backlog.push(follower.clone());
    for n in 0..300 {
        backlog.push(Message::new(&topic, "Tail", n.to_string().into_bytes()).with_key("b"));
    }
    db::enqueue_all(&pool, &backlog).await.unwrap();

    let mut settings = fast_relay_settings();
    settings.batch_size = 1;
    settings.max_poll_interval = Duration::from_secs(30);
    let relay = spawn_relay(
        &pool,
        broker.bootstrap(),
        &[("linger.ms", "0"), ("batch.num.messages", "1")],
        settings,
    );

    let refused_attempts = eventually("the refused row to be retried", WAIT, || async {
        let attempts: Option<i32> =
            sqlx::query_scalar("SELECT attempts FROM consign_outbox WHERE id = $1")
                .bind(refused.id())
                .fetch_optional(&pool)
                .await?;
        Ok(attempts.filter(|a| *a >= 2))
    })
    .await
    .unwrap();
    let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
    reader.read_distinct(backlog.len() - 2, WAIT).await.unwrap();
    assert!(
        !reader.first_arrivals("a").contains(&follower.id()),
        "the row read ahead reached the topic before the refused row of its key"
    );
    let stats = relay.stats();
    assert!(
        stats.reads_ahead > 0,
        "no batch was read ahead ({stats:?}): this test proves nothing"
    );

    sqlx::query("UPDATE consign_outbox SET payload = 'fixed' WHERE id = $1")
        .bind(refused.id())
        .execute(&pool)
        .await
        .unwrap();
    relay.wake();
    reader.read_distinct(backlog.len(), WAIT).await.unwrap();
    db::wait_drained(&pool, WAIT).await.unwrap();
    relay.shutdown().await.unwrap();
    assert_eq!(
        reader.first_arrivals("a"),
        vec![refused.id(), follower.id()],
        "key a out of order (the refused row took {refused_attempts} attempts)"
    );
    for key in ["b", "c", "d"] {
        let expected: Vec<Uuid> = backlog
            .iter()
            .filter(|m| m.key() == Some(key))
            .map(Message::id)
            .collect();
        assert_eq!(
            reader.first_arrivals(key),
            expected,
            "key {key} out of order"
        );
    }
    println!("{stats:?}");
}

/// A backlog drained in batches of 100, each delivered batch deleted in a
/// task of its own while the next is read, with a full read from the start
/// due every 50 ms (the testing profile's `max-poll-interval`). A read from
/// the start must wait for the delete behind it, or it finds that batch's
/// rows again and sends them twice; reads above the floor need not.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn reads_from_the_start_wait_for_the_delete_behind(pool: PgPool) {
    let _turn = TURNS.lock().await;
    let broker = TestBroker::start().unwrap();
    let topic = unique_topic("floor-behind");
    broker.create_topic(&topic, 4).await.unwrap();
    let backlog: Vec<Message> = (0..60_000)
        .map(|n| {
            Message::new(&topic, "Step", n.to_string().into_bytes())
                .with_key(format!("k{}", n % 50))
        })
        .collect();
    db::enqueue_all(&pool, &backlog).await.unwrap();
    let mut settings = fast_relay_settings();
    settings.batch_size = 100;
    let relay = spawn_relay(&pool, broker.bootstrap(), &[], settings);

    let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
    reader.read_distinct(backlog.len(), WAIT).await.unwrap();
    db::wait_drained(&pool, WAIT).await.unwrap();
    let stats = relay.stats();
    relay.shutdown().await.unwrap();
    // Whatever arrives late arrives within the reader's short wait.
    let _ = reader
        .read_distinct(backlog.len() + 1, Duration::from_secs(2))
        .await;
    assert!(
        stats.reads_above_floor > 0,
        "the relay never read above a floor ({stats:?}): this test proves less than it says"
    );
    assert_eq!(
        reader.duplicates(),
        0,
        "rows sent twice without any fault ({stats:?})"
    );
}
