//! Guarantees that only a real Kafka broker can prove: transactions that
//! `read_committed` consumers see whole or not at all, producers fenced by the
//! broker, a 3-node cluster losing a partition leader or going down whole, and
//! an inbox consumer group losing members, a broker and its coordinator.
//!
//! These run on Apache Kafka started by the harness ([`KafkaCluster`]); where
//! Java or Kafka's jars are missing they print how to enable them and pass
//! (under `CI=true` they fail instead). The tests take turns: each starts JVMs
//! and relays of its own on a 2-core machine.

use std::{collections::HashSet, time::Duration};

use consign::{Message, relay::Relay};
use consign_test_support::{
    ChildProcess, KafkaCluster, Received, RelayProcess, TestBroker, TopicReader, db,
    effects::{self, TestMessage, produce, tally},
    eventually, fast_relay_settings, real_kafka_tier, relay_config,
    stream::{Stream, assert_complete_and_ordered, keys_of_outbox_partition, write_stream},
    unique_topic,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(180);

/// One test at a time in this binary: each runs brokers and relays of its own.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The shared 1-node cluster, or `None` where the tier is skipped.
fn shared_kafka() -> Option<TestBroker> {
    TestBroker::real().unwrap()
}

/// A cluster of `nodes` of this test's own, or `None` where the tier is
/// skipped (see [`TestBroker::real`]).
fn own_cluster(nodes: usize) -> Option<KafkaCluster> {
    real_kafka_tier()
        .unwrap()
        .then(|| KafkaCluster::start(nodes).unwrap())
}

/// Writes `batches * batch` rows of one outbox partition in one transaction,
/// each with an `index` header (its position), before any relay starts: then
/// relay batch `k` is exactly rows `k * batch ..`, whichever relay sends it.
async fn backlog_of_one_partition(pool: &PgPool, topic: &str, rows: usize) -> Vec<Uuid> {
    let keys = keys_of_outbox_partition(0, 20);
    let mut per_key = vec![0_u32; keys.len()];
    let msgs: Vec<Message> = (0..rows)
        .map(|i| {
            per_key[i % keys.len()] += 1;
            Message::new(topic, "Posted", per_key[i % keys.len()].to_string())
                .with_key(keys[i % keys.len()].clone())
                .with_header("index", i.to_string())
        })
        .collect();
    db::enqueue_all(pool, &msgs).await.unwrap();
    msgs.iter().map(Message::id).collect()
}

/// Records of a one-partition topic grouped into runs of consecutive offsets.
/// Every transaction ends with a control record that takes an offset, and one
/// relay at a time writes the partition, so each run is what one transaction
/// wrote: `(first offset, row indexes)`.
fn runs(records: &[Received]) -> Vec<(i64, Vec<usize>)> {
    let mut runs: Vec<(i64, Vec<usize>)> = Vec::new();
    let mut next = -1;
    for r in records {
        let index = r.header("index").unwrap().parse().unwrap();
        match runs.last_mut() {
            Some((_, run)) if r.offset == next => run.push(index),
            _ => runs.push((r.offset, vec![index])),
        }
        next = r.offset + 1;
    }
    runs
}

/// Runs that are not exactly one relay batch (`batch` consecutive rows from a
/// multiple of `batch`).
fn torn(runs: &[(i64, Vec<usize>)], batch: usize) -> Vec<String> {
    runs.iter()
        .filter(|(_, run)| {
            let first = run[0];
            !(first.is_multiple_of(batch) && *run == (first..first + batch).collect::<Vec<_>>())
        })
        .map(|(offset, run)| format!("offset {offset}: rows {}.. ({} rows)", run[0], run.len()))
        .collect()
}

/// Relay process SIGKILLed inside transactions at least 5 times while it
/// drains a backlog in transactions mode: a `read_committed` consumer sees
/// every batch whole or not at all, every batch at least once, first copies
/// in order; a `read_uncommitted` consumer of the same topic does see the
/// torn, aborted transactions (so the check can fail).
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn transactions_read_committed_sees_each_batch_whole_while_the_relay_is_sigkilled(
    pool: PgPool,
) {
    const BATCH: usize = 50;
    const ROWS: usize = 30_000;
    let _turn = TURN.lock().await;
    let Some(broker) = shared_kafka() else { return };
    let topic = unique_topic("txn-kill");
    broker.create_topic(&topic, 1).await.unwrap();
    let ids = backlog_of_one_partition(&pool, &topic, ROWS).await;
    // Small produce requests (5 records each), so a kill can land between
    // two requests of one transaction and leave part of it in the log.
    let config = relay_config(
        &db::url(&pool),
        broker.bootstrap(),
        &[("batch-size", &BATCH.to_string()), ("transactions", "true")],
        &[("batch.num.messages", "5"), ("linger.ms", "2")],
    );
    let mut committed = TopicReader::new(broker.bootstrap(), &topic).unwrap();
    let mut uncommitted = TopicReader::uncommitted(broker.bootstrap(), &topic).unwrap();
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut relay = RelayProcess::start(&config).unwrap();
    let (mut kills, mut aborted, mut torn_aborted) = (0, 0, 0);
    while (aborted < 5 || torn_aborted == 0) && kills < 40 {
        // A restarted relay waits up to the lease TTL (2 s) for the killed
        // one's lease, then publishes for a while.
        tokio::time::sleep(Duration::from_millis(rng.random_range(2300..3300))).await;
        if db::outbox_len(&pool).await.unwrap() == 0 {
            break;
        }
        relay.kill().unwrap();
        kills += 1;
        relay = RelayProcess::start(&config).unwrap();
        // The successor's init_transactions aborts what the killed relay left
        // open; then both readers can read to the end.
        uncommitted.read_to_end(WAIT).await.unwrap();
        committed.read_to_end(WAIT).await.unwrap();
        let seen: HashSet<i64> = committed.received().iter().map(|r| r.offset).collect();
        let invisible: Vec<(i64, Vec<usize>)> = runs(uncommitted.received())
            .into_iter()
            .filter(|(offset, _)| !seen.contains(offset))
            .collect();
        aborted = invisible.len();
        torn_aborted = torn(&invisible, BATCH).len();
        println!(
            "kill {kills}: {aborted} transactions aborted so far ({torn_aborted} cut between produce requests)"
        );
    }
    committed.read_distinct(ids.len(), WAIT).await.unwrap();
    db::wait_drained(&pool, WAIT).await.unwrap();
    committed.read_to_end(WAIT).await.unwrap();
    uncommitted.read_to_end(WAIT).await.unwrap();
    relay.terminate(Duration::from_secs(30)).await.unwrap();

    assert!(
        aborted >= 5 && torn_aborted >= 1,
        "after {kills} kills only {aborted} landed inside a transaction ({torn_aborted} mid-produce)"
    );
    let committed_runs = runs(committed.received());
    assert_eq!(
        torn(&committed_runs, BATCH),
        Vec::<String>::new(),
        "read_committed saw part of a batch"
    );
    let mut first_copies = Vec::new();
    for (_, run) in &committed_runs {
        if !first_copies.contains(&(run[0] / BATCH)) {
            first_copies.push(run[0] / BATCH);
        }
    }
    assert_eq!(
        first_copies,
        (0..ROWS / BATCH).collect::<Vec<_>>(),
        "batches missing or first committed out of order"
    );
    assert_complete_and_ordered(&ids, &committed);
    let torn_uncommitted = torn(&runs(uncommitted.received()), BATCH);
    assert!(
        !torn_uncommitted.is_empty(),
        "read_uncommitted saw no torn batch: the check above could not have failed"
    );
    println!(
        "{kills} kills, {aborted} transactions aborted; read_committed: {} records in {} whole batches ({} duplicates); read_uncommitted: {} records, torn runs e.g. {:?}",
        committed.received().len(),
        committed_runs.len(),
        committed.duplicates(),
        uncommitted.received().len(),
        &torn_uncommitted[..torn_uncommitted.len().min(3)]
    );
}

/// A relay frozen (SIGSTOP) inside its first Kafka transaction past its lease:
/// a successor takes the partition, and its `init_transactions` makes the
/// broker abort the frozen relay's transaction and fence its producer. Resumed,
/// the zombie's produce or commit is refused *by the broker* with a fencing
/// error, and it commits nothing: every event is on the topic exactly once.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn transactions_zombie_relay_is_fenced_by_the_broker_and_commits_nothing(pool: PgPool) {
    let _turn = TURN.lock().await;
    let Some(broker) = shared_kafka() else { return };
    let topic = unique_topic("txn-zombie");
    broker.create_topic(&topic, 1).await.unwrap();
    let ids = backlog_of_one_partition(&pool, &topic, 2000).await;
    let url = db::url(&pool);
    let relay = [("batch-size", "100"), ("transactions", "true")];
    // The zombie holds its first batch in librdkafka for 10 s (linger) after
    // opening the transaction: it is frozen right then, before any commit.
    let zombie_config = relay_config(
        &url,
        broker.bootstrap(),
        &relay,
        &[("linger.ms", "10000"), ("queue.buffering.max.ms", "10000")],
    );
    let debug = [("RUST_LOG", "info,consign_relay::publish=debug")];
    let zombie = RelayProcess::start_with(&zombie_config, &["run"], &debug).unwrap();
    eventually("the zombie's first batch to be produced", WAIT, || async {
        Ok(zombie.output().contains("batch produced").then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}:\n{}", zombie.output()));
    zombie.pause().unwrap();

    let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
    let successor =
        RelayProcess::start(&relay_config(&url, broker.bootstrap(), &relay, &[])).unwrap();
    reader.read_distinct(ids.len(), WAIT).await.unwrap();
    db::wait_drained(&pool, WAIT).await.unwrap();
    zombie.resume().unwrap();
    let output = eventually(
        "the broker to fence the zombie",
        Duration::from_secs(60),
        || async {
            let output = zombie.output();
            Ok(output.contains("fenced or broken").then_some(output))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}:\n{}", zombie.output()));
    let fencing = output
        .lines()
        .find(|l| l.contains("fenced or broken"))
        .unwrap_or_default()
        .to_owned();
    println!("zombie: {fencing}");
    assert!(
        fencing.to_lowercase().contains("fenc") || fencing.contains("epoch"),
        "the zombie failed, but not with a fencing error: {fencing}"
    );
    // Give a zombie that was not fenced time to commit its batch.
    tokio::time::sleep(Duration::from_secs(3)).await;
    reader.read_to_end(WAIT).await.unwrap();
    assert_complete_and_ordered(&ids, &reader);
    assert_eq!(
        reader.duplicates(),
        0,
        "the zombie's transaction reached read_committed consumers"
    );
    drop((zombie, successor));
}

/// Writes `stream` while `fault` runs against the cluster, with a relay
/// process publishing (transactions on or off); then checks every event
/// arrived, in key order after dedup, and the outbox drained by itself.
/// Returns the relay's output.
async fn survives(
    pool: &PgPool,
    cluster: &KafkaCluster,
    transactions: bool,
    kafka: &[(&str, &str)],
    fault: impl AsyncFnOnce(&KafkaCluster, &str),
) -> String {
    let topic = unique_topic("faults");
    cluster.create_topic(&topic, 3).await.unwrap();
    let writer = tokio::spawn(write_stream(
        pool.clone(),
        topic.clone(),
        Stream::new(12_000, 60)
            .per_tx(20)
            .pace(Duration::from_millis(20)),
    ));
    let config = relay_config(
        &db::url(pool),
        cluster.bootstrap(),
        &[
            ("batch-size", "200"),
            ("transactions", if transactions { "true" } else { "false" }),
        ],
        kafka,
    );
    let relay = RelayProcess::start(&config).unwrap();
    let mut reader = TopicReader::new(cluster.bootstrap(), &topic).unwrap();
    reader.read_distinct(1000, WAIT).await.unwrap();
    fault(cluster, &topic).await;
    let ids = writer.await.unwrap();
    reader
        .read_distinct(ids.len(), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\nrelay:\n{}", relay.output()));
    db::wait_drained(pool, WAIT).await.unwrap();
    reader.read_to_end(WAIT).await.unwrap();
    assert_complete_and_ordered(&ids, &reader);
    println!(
        "{} events arrived in key order, {} duplicates",
        reader.distinct(),
        reader.duplicates()
    );
    relay.output()
}

/// 3 nodes, replication factor 3, `min.insync.replicas=2`, `acks=all`: the
/// leader of a partition is SIGKILLed mid-stream (and restarted later). Every
/// event arrives, in key order after dedup, and the relay goes on by itself.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn partition_leader_sigkilled_mid_stream_loses_nothing(pool: PgPool) {
    let _turn = TURN.lock().await;
    let Some(cluster) = own_cluster(3) else {
        return;
    };
    let _ = survives(&pool, &cluster, false, &[], async |cluster, topic| {
        let leader = cluster.leader(topic, 0, WAIT).await.unwrap();
        cluster.kill(leader).unwrap();
        let new_leader = eventually("a new leader", WAIT, || async {
            let now = cluster.leader(topic, 0, WAIT).await?;
            Ok((now != leader).then_some(now))
        })
        .await
        .unwrap();
        println!("SIGKILLed node {leader}, leader of {topic}[0]; node {new_leader} took over");
        tokio::time::sleep(Duration::from_secs(5)).await;
        cluster.restart(leader).unwrap();
    })
    .await;
}

async fn whole_cluster_down_for_20s(cluster: &KafkaCluster, _topic: &str) {
    cluster.kill_all().unwrap();
    println!("all 3 nodes SIGKILLed; down for 20 s");
    tokio::time::sleep(Duration::from_secs(20)).await;
    cluster.restart_all().unwrap();
}

/// Every node of the cluster SIGKILLed for 20 s mid-stream, then restarted:
/// nothing lost, key order kept, flow resumes without help.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn whole_cluster_down_20s_loses_nothing_and_flow_resumes(pool: PgPool) {
    let _turn = TURN.lock().await;
    let Some(cluster) = own_cluster(3) else {
        return;
    };
    let _ = survives(&pool, &cluster, false, &[], whole_cluster_down_for_20s).await;
}

/// The same outage in transactions mode, with transaction calls (5 s, from
/// `transaction.timeout.ms`) and message expiry (4 s) much shorter than the
/// outage: sends expire, and the abort that follows times out while the
/// cluster is down. The relay calls it again, then replaces the producer; a
/// new one is initialized once the cluster is back, and the outbox drains.
///
/// Issue 13 item 3: before, the producer that timed out in its abort was
/// kept, every later `begin_transaction` failed with `_STATE`, and its
/// partition never published again (the outbox did not drain).
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn whole_cluster_down_20s_in_transactions_mode_loses_nothing(pool: PgPool) {
    let _turn = TURN.lock().await;
    let Some(cluster) = own_cluster(3) else {
        return;
    };
    let kafka = [
        ("transaction.timeout.ms", "\"5000\""),
        ("message.timeout.ms", "\"4000\""),
    ];
    let output = survives(&pool, &cluster, true, &kafka, whole_cluster_down_for_20s).await;
    // Whether the outage outlasted the calls depends on how fast the nodes
    // restart: say which path this run took.
    let count = |what: &str| output.lines().filter(|l| l.contains(what)).count();
    println!(
        "transaction calls called again: {}; producers replaced: {}; inits failed: {}",
        count("calling it again"),
        count("replacing it"),
        count("cannot initialize a transactional producer"),
    );
}

/// A partition whose transactional producer cannot start while Kafka answers
/// (here `transaction.timeout.ms` above the broker's
/// `transaction.max.timeout.ms`) shows in the relay's liveness as stalled,
/// with the broker's reason; its rows stay in the outbox. (It turns the relay
/// not live after `LIVENESS_LIMIT`, 2 min, which the health unit tests show.)
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn a_partition_that_cannot_start_its_transactions_is_reported_stalled(pool: PgPool) {
    let _turn = TURN.lock().await;
    let Some(broker) = shared_kafka() else {
        return;
    };
    let topic = unique_topic("stalled");
    broker.create_topic(&topic, 1).await.unwrap();
    let ids = backlog_of_one_partition(&pool, &topic, 10).await;
    let relay = Relay::builder(pool.clone())
        .kafka("bootstrap.servers", broker.bootstrap())
        .kafka("transaction.timeout.ms", "1000000")
        .settings({
            let mut settings = fast_relay_settings();
            settings.transactions = true;
            settings
        })
        .build()
        .unwrap()
        .spawn();
    let health = relay.health();
    let stall = eventually("partition 0 to be reported stalled", WAIT, || async {
        let liveness = health.liveness();
        Ok(liveness
            .stalled
            .into_iter()
            .find(|stall| stall.partition == 0))
    })
    .await
    .unwrap();
    println!("stalled: {stall:?}");
    assert!(
        stall.error.to_lowercase().contains("timeout"),
        "the stall names the broker's reason: {stall:?}"
    );
    assert!(health.liveness().live, "not dead before the limit");
    assert_eq!(
        db::outbox_len(&pool).await.unwrap(),
        i64::try_from(ids.len()).unwrap()
    );
    relay.shutdown().await.unwrap();
}

/// An inbox consumer group of 3 processes on a 3-node cluster works through
/// 20,000 messages while members are SIGKILLed and restarted 6 times, one
/// broker is SIGKILLed and restarted, and then the node coordinating the group
/// is SIGKILLed: consumption resumes each time, and every message takes effect
/// exactly once, in key order.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn inbox_group_survives_member_kills_a_broker_restart_and_losing_its_coordinator(
    pool: PgPool,
) {
    let _turn = TURN.lock().await;
    let Some(cluster) = own_cluster(3) else {
        return;
    };
    effects::create_table(&pool).await.unwrap();
    let topic = unique_topic("inbox-group");
    cluster.create_topic(&topic, 6).await.unwrap();
    let messages = TestMessage::stream(200, 100); // 20,000 messages, 200 keys
    produce(cluster.bootstrap(), &topic, &messages)
        .await
        .unwrap();
    let total = i64::try_from(messages.len()).unwrap();
    let group = unique_topic("group");

    let url = db::url(&pool);
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("TEST_BOOTSTRAP", cluster.bootstrap()),
        ("TEST_TOPIC", topic.as_str()),
        ("TEST_GROUP", group.as_str()),
        ("TEST_MAX_BATCH", "8"),
    ];
    let mut members: Vec<ChildProcess> = (0..3)
        .map(|_| ChildProcess::start_consumer(&env).unwrap())
        .collect();
    let mut rng = rand::rng();
    let mut events = Vec::new();
    eventually("the group's first effects", WAIT, || async {
        Ok((tally(&pool).await?.distinct > 0).then_some(()))
    })
    .await
    .unwrap();
    // __consumer_offsets exists now. A broker to restart that does not
    // coordinate the group: one node down at a time keeps min.insync.replicas=2.
    let coordinator = cluster.group_coordinator(&group).await.unwrap();
    let other = cluster
        .node_ids()
        .into_iter()
        .find(|&id| id != coordinator)
        .unwrap();
    for kill in 1..=6 {
        // Wait for progress (consumption resumed), then kill a member.
        let start = tally(&pool).await.unwrap().distinct;
        let step = rng.random_range(300..1500);
        let now = eventually("consumption to progress", WAIT, || async {
            let now = tally(&pool).await?.distinct;
            Ok((now >= (start + step).min(total)).then_some(now))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", members[0].output()));
        assert!(
            now < total,
            "the stream ended after {kill} kills; make it longer"
        );
        let victim = rng.random_range(0..members.len());
        members[victim].kill().unwrap();
        members[victim] = ChildProcess::start_consumer(&env).unwrap();
        events.push(format!("member {victim} SIGKILLed at {now} effects"));
        match kill {
            1 => {
                cluster.kill(other).unwrap();
                events.push(format!("broker {other} SIGKILLed"));
            }
            3 => {
                cluster.restart(other).unwrap();
                events.push(format!("broker {other} restarted"));
            }
            4 => {
                cluster.kill(coordinator).unwrap();
                events.push(format!("group coordinator {coordinator} SIGKILLed"));
            }
            _ => {}
        }
        println!("{}", events.join("; "));
        events.clear();
    }
    eventually("every effect", WAIT, || async {
        Ok((tally(&pool).await?.distinct >= total).then_some(()))
    })
    .await
    .unwrap();
    for member in &mut members {
        let status = member.terminate(Duration::from_secs(30)).await.unwrap();
        assert!(status.success(), "{}", member.output());
    }
    let t = tally(&pool).await.unwrap();
    println!("{total} messages through a group of 3 with 6 member kills and 2 broker kills: {t:?}");
    assert_eq!(t.effects, total, "an effect was applied twice");
    assert_eq!(t.distinct, total);
    assert_eq!(t.out_of_order_keys, 0, "per-key order of effects");
}
