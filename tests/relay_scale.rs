//! Several relays on one outbox: partition leases, failover, fencing of a
//! relay that lost its leases, and Kafka transactions mode.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use consign::{
    Message,
    relay::{Relay, Status, status},
};
use consign_test_support::{
    RelayProcess, TestBroker, TopicReader, Transactions, broker_test, db, eventually,
    fast_relay_settings, relay_config,
    stream::{Stream, assert_complete_and_ordered, keys_of_outbox_partition, write_stream},
    tap::{KafkaTap, Outcome},
    unique_topic,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(180);

/// Partitions per live relay when every lease is held by a live relay and
/// the counts are within one of each other; `None` otherwise.
fn balanced(status: &Status, relays: usize) -> Option<Vec<usize>> {
    let counts: Vec<usize> = status
        .partitions_per_relay()
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    let (min, max) = (counts.iter().min()?, counts.iter().max()?);
    (counts.len() == relays && counts.iter().sum::<usize>() == 32 && max - min <= 1)
        .then_some(counts)
}

async fn wait_balanced(pool: &PgPool, relays: usize) -> Vec<usize> {
    let what = format!("32 partitions spread within ±1 over {relays} relays");
    eventually(&what, Duration::from_secs(30), || async {
        Ok(balanced(&status(pool).await?, relays))
    })
    .await
    .unwrap()
}

broker_test! {
    async fn rebalance_keeps_partitions_within_one_of_even_as_relays_join_and_leave(pool: PgPool, broker: TestBroker) {
        let start = || {
            Relay::builder(pool.clone())
                .kafka("bootstrap.servers", broker.bootstrap())
                .settings(fast_relay_settings())
                .build()
                .unwrap()
                .spawn()
        };
        let mut relays = Vec::new();
        for n in 1..=4 {
            relays.push(start());
            let counts = wait_balanced(&pool, n).await;
            println!("{n} relays: {counts:?}");
        }
        // Graceful leaves release at once; the rest take the partitions over.
        for n in (2..=3).rev() {
            relays.pop().unwrap().shutdown().await.unwrap();
            let counts = wait_balanced(&pool, n).await;
            println!("{n} relays after a leave: {counts:?}");
        }
        let leases = consign::relay::lease::leases(&pool).await.unwrap();
        let moved = leases.iter().filter(|l| l.epoch > 1).count();
        assert!(moved > 0, "no partition changed hands: {leases:?}");
        for relay in relays {
            relay.shutdown().await.unwrap();
        }
        let leases = consign::relay::lease::leases(&pool).await.unwrap();
        assert!(
            leases.iter().all(|l| l.owner.is_none()),
            "leases left after shutdown: {leases:?}"
        );
    }
}

broker_test! {
    async fn three_relays_with_a_kill_and_a_join_deliver_50k_events_in_key_order(pool: PgPool, broker: TestBroker) {
        const EVENTS: usize = 50_000;
        let topic = unique_topic("scale");
        broker.create_topic(&topic, 12).await.unwrap();
        let config = relay_config(
            &db::url(&pool),
            broker.bootstrap(),
            &[("batch-size", "200")],
            &[],
        );
        // Round trips long enough that the killed relay has batches in flight.
        if let Some(mock) = broker.mock() {
            mock.set_round_trip(Duration::from_millis(100)).unwrap();
        }
        let writer = tokio::spawn(write_stream(
            pool.clone(),
            topic.clone(),
            Stream::new(EVENTS, 500)
                .per_tx(50)
                .pace(Duration::from_millis(8)),
        ));
        let mut relays: Vec<RelayProcess> = (0..3)
            .map(|_| RelayProcess::start(&config).unwrap())
            .collect();
        let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
        println!("3 relays: {:?}", wait_balanced(&pool, 3).await);
        reader.read_distinct(5000, WAIT).await.unwrap();

        let victim = relays.remove(0);
        let victim_pid = i32::try_from(victim.id()).unwrap();
        let before = status(&pool).await.unwrap();
        let instance = &before
            .relays
            .iter()
            .find(|m| m.pid == victim_pid)
            .unwrap()
            .instance;
        let orphaned: Vec<i16> = before
            .leases
            .iter()
            .filter(|l| l.owner.as_ref() == Some(instance))
            .map(|l| l.partition)
            .collect();
        let waiting = db::outbox_len(&pool).await.unwrap();
        let mut victim = victim;
        victim.kill().unwrap();
        println!("SIGKILL one relay holding partitions {orphaned:?} with {waiting} rows in the outbox");
        tokio::time::sleep(Duration::from_secs(1)).await;
        relays.push(RelayProcess::start(&config).unwrap());
        println!("one relay joined");
        assert!(
            !writer.is_finished(),
            "the stream ended before the kill and the join; slow it down"
        );
        println!("after kill + join: {:?}", wait_balanced(&pool, 3).await);

        let ids = writer.await.unwrap();
        reader.read_distinct(EVENTS, WAIT).await.unwrap();
        db::wait_drained(&pool, WAIT).await.unwrap();
        reader.read_to_end(WAIT).await.unwrap();
        let after = status(&pool).await.unwrap();
        let still_orphaned: Vec<_> = after
            .leases
            .iter()
            .filter(|l| orphaned.contains(&l.partition) && l.owner.as_ref() == Some(instance))
            .collect();
        assert!(
            still_orphaned.is_empty(),
            "the killed relay's partitions never moved: {still_orphaned:?}"
        );
        println!(
            "{} events over 500 keys delivered; {} duplicates on the topic; {} partitions taken over from the killed relay",
            reader.distinct(),
            reader.duplicates(),
            orphaned.len()
        );
        assert_complete_and_ordered(&ids, &reader);
        for mut relay in relays {
            relay.stop(Duration::from_secs(30)).await.unwrap();
        }
    }
}

/// What another relay does when it takes over an expired lease (the
/// coordinator's acquisition): new owner, epoch + 1.
async fn steal_expired_leases(pool: &PgPool) -> u64 {
    sqlx::query(
        "UPDATE consign_relay_leases
         SET owner = 'thief', epoch = epoch + 1, acquired_at = now(),
             expires_at = now() + interval '1 hour'
         WHERE owner IS NULL OR expires_at <= now()",
    )
    .execute(pool)
    .await
    .unwrap()
    .rows_affected()
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn relay_paused_past_its_lease_cannot_delete_rows_it_no_longer_owns(pool: PgPool) {
    let broker = TestBroker::start().unwrap();
    let Some(mock) = broker.mock() else {
        println!("skipped: needs the mock cluster's added latency");
        return;
    };
    let topic = unique_topic("stolen");
    broker.create_topic(&topic, 3).await.unwrap();
    let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
    // Acknowledgements take ~1 s: the relay spends nearly all its time with
    // a batch in flight, waiting to delete it.
    mock.set_round_trip(Duration::from_millis(1000)).unwrap();
    let ids = write_stream(pool.clone(), topic.clone(), Stream::new(3000, 50)).await;
    // The tap shows when a batch is on the wire, unacknowledged.
    let tap = KafkaTap::start(broker.bootstrap()).await.unwrap();
    let config = relay_config(
        &db::url(&pool),
        tap.bootstrap(),
        &[("batch-size", "100")],
        &[],
    );
    let relay = RelayProcess::start(&config).unwrap();
    reader.read_distinct(1, WAIT).await.unwrap();

    // Paused with a batch in flight: on resume it is acknowledged and the
    // relay tries to delete its rows, after their leases were taken.
    eventually("a batch in flight", WAIT, || async {
        Ok((tap.produce_in_flight() > 0).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.output()));
    relay.pause().unwrap();
    eventually("the paused relay's leases to expire", WAIT, || async {
        let leases = consign::relay::lease::leases(&pool).await?;
        Ok(leases.iter().all(|l| !l.live).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(steal_expired_leases(&pool).await, 32);
    let before = db::outbox_len(&pool).await.unwrap();
    relay.resume().unwrap();

    let output = eventually("the relay to notice", WAIT, || async {
        let output = relay.output();
        Ok(output
            .contains("acknowledged rows not deleted")
            .then_some(output))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.output()));
    // Give it time to do anything else it would do.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = db::outbox_len(&pool).await.unwrap();
    println!("{before} rows before the resume, {after} after; relay said:\n{output}");
    assert_eq!(
        after, before,
        "the relay deleted rows of partitions leased to another relay"
    );
    assert!(relay.output().contains("stopped publishing"), "{output}");

    // The rightful owner (here: the leases handed back) publishes the rest.
    sqlx::query("UPDATE consign_relay_leases SET owner = NULL, expires_at = NULL")
        .execute(&pool)
        .await
        .unwrap();
    mock.set_round_trip(Duration::ZERO).unwrap();
    reader.read_distinct(ids.len(), WAIT).await.unwrap();
    assert_complete_and_ordered(&ids, &reader);
}

/// Keys whose rows all land in outbox partition 0.
/// Relay killed inside transactions: a `read_committed` consumer sees each
/// batch whole or not at all.
///
/// The relay talks to the broker through a protocol tap, which shows what
/// each Kafka transaction produced and whether its commit was acknowledged.
/// Under KIP-98 a `read_committed` consumer sees exactly the records of
/// committed transactions, so: every committed transaction must hold exactly
/// one whole batch, every batch must be committed, in order, and the
/// transactions the kills cut short must be uncommitted. On a broker that
/// isolates transactions (`TEST_KAFKA_BROKERS`), a `read_committed` consumer
/// checks the same thing from the other side. (librdkafka's mock cluster
/// does not isolate them: its consumers also see aborted records.)
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn transactions_mode_read_committed_sees_each_batch_whole_or_not_at_all(pool: PgPool) {
    const BATCH: usize = 100;
    const BATCHES: usize = 40;
    let broker = TestBroker::start().unwrap();
    let support = broker.transactions().await.unwrap();
    if support == Transactions::Refused {
        println!("skipped: the broker has no transactions");
        return;
    }
    let topic = unique_topic("txn");
    broker.create_topic(&topic, 6).await.unwrap();
    if let Some(mock) = broker.mock() {
        mock.set_round_trip(Duration::from_millis(40)).unwrap();
    }
    let tap = KafkaTap::start(broker.bootstrap()).await.unwrap();

    // All rows in one outbox partition, written before the relay starts:
    // batch k is exactly rows k*100 .. k*100+99, whichever relay sends it.
    let keys = keys_of_outbox_partition(0, 20);
    let mut per_key: HashMap<&str, u32> = HashMap::new();
    let msgs: Vec<Message> = (0..BATCH * BATCHES)
        .map(|i| {
            let key = &keys[i % keys.len()];
            let n = per_key.entry(key).or_default();
            *n += 1;
            Message::new(&topic, "Posted", n.to_string())
                .with_key(key.clone())
                .with_header("index", i.to_string())
        })
        .collect();
    db::enqueue_all(&pool, &msgs).await.unwrap();
    let ids: Vec<_> = msgs.iter().map(Message::id).collect();

    let config = relay_config(
        &db::url(&pool),
        tap.bootstrap(),
        &[("batch-size", &BATCH.to_string()), ("transactions", "true")],
        &[],
    );
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let cut_short = || {
        tap.transactions()
            .iter()
            .filter(|t| t.outcome == Outcome::Unfinished)
            .count()
    };
    let mut relay = RelayProcess::start(&config).unwrap();
    let mut kills = 0;
    // At least 4 kills, and on until one has landed inside a transaction.
    while (kills < 4 || cut_short() == 0) && kills < 12 && db::outbox_len(&pool).await.unwrap() > 0
    {
        // The restarted relay waits up to the lease TTL (2 s) for the killed
        // one's leases, then fences its transactional ids and publishes.
        tokio::time::sleep(Duration::from_millis(rng.random_range(2500..4500))).await;
        if kills >= 3 && cut_short() == 0 {
            // Random kills missed (a slow machine stretches the gaps between
            // transactions): aim at the next transaction the tap sees open.
            let aim_until = std::time::Instant::now() + Duration::from_secs(20);
            while cut_short() == 0 && std::time::Instant::now() < aim_until {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        relay.kill().unwrap();
        kills += 1;
        // Let the tap see the connections close.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let left = db::outbox_len(&pool).await.unwrap();
        println!(
            "kill {kills}: SIGKILL with {left} rows in the outbox; {} transactions cut short so far",
            cut_short()
        );
        relay = RelayProcess::start(&config).unwrap();
    }
    let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
    reader.read_distinct(ids.len(), WAIT).await.unwrap();
    db::wait_drained(&pool, WAIT).await.unwrap();
    reader.read_to_end(WAIT).await.unwrap();
    relay.terminate(Duration::from_secs(30)).await.unwrap();
    assert_complete_and_ordered(&ids, &reader);

    // The wire: which batch each transaction carried, and how it ended.
    assert_eq!(
        tap.errors(),
        Vec::<String>::new(),
        "frames the tap could not decode"
    );
    let transactions = tap.transactions();
    let mut committed_batches = Vec::new();
    let (mut aborted, mut unanswered) = (0, 0);
    for txn in &transactions {
        let mut indexes: Vec<usize> = txn
            .records
            .iter()
            .map(|(_, r)| r.header("index").unwrap().parse().unwrap())
            .collect();
        indexes.sort_unstable();
        let first = indexes[0];
        let whole =
            first.is_multiple_of(BATCH) && indexes == (first..first + BATCH).collect::<Vec<_>>();
        match txn.outcome {
            Outcome::Committed => {
                assert!(
                    whole,
                    "committed transaction {} {:?} holds rows {first}.. that are not one whole batch ({} rows)",
                    txn.transactional_id,
                    txn.producer,
                    indexes.len()
                );
                committed_batches.push(first / BATCH);
            }
            Outcome::Unfinished | Outcome::Aborted => aborted += 1,
            Outcome::CommitUnanswered => {
                // The broker may have committed it: then it too must be whole.
                assert!(
                    whole,
                    "transaction with an unanswered commit holds a partial batch"
                );
                unanswered += 1;
            }
        }
    }
    // Every relay lifetime used the same transactional id for outbox
    // partition 0, so on Kafka each successor's init_transactions aborts the
    // killed one's open transaction and fences its producer.
    let ids_used: HashSet<&str> = transactions
        .iter()
        .map(|t| t.transactional_id.as_str())
        .collect();
    assert_eq!(ids_used.len(), 1, "transactional ids: {ids_used:?}");
    assert!(
        ids_used.iter().all(|id| id.ends_with("-p0")),
        "{ids_used:?}"
    );
    // Every batch committed, first commits in batch order (per-key order for
    // a read_committed consumer); later commits of a batch are duplicates
    // of a handover whose first commit was not yet recorded in the database.
    let mut first_commits: Vec<usize> = Vec::new();
    for batch in &committed_batches {
        if !first_commits.contains(batch) {
            first_commits.push(*batch);
        }
    }
    assert_eq!(
        first_commits,
        (0..BATCHES).collect::<Vec<_>>(),
        "batches first committed out of order or missing"
    );
    println!(
        "{kills} kills; {} transactions: {} committed ({} batches committed twice), {aborted} cut short by a kill or aborted; consumer saw {} messages ({} duplicates)",
        transactions.len(),
        committed_batches.len(),
        committed_batches.len() - BATCHES,
        reader.received().len(),
        reader.duplicates()
    );
    assert!(
        cut_short() > 0,
        "no kill landed inside a transaction; nothing was tested"
    );

    if support == Transactions::Isolated {
        // The broker isolates transactions: what a read_committed consumer
        // saw is exactly the committed transactions' records.
        let mut copies = vec![0_usize; ids.len()];
        for message in reader.received() {
            let index: usize = message.header("index").unwrap().parse().unwrap();
            copies[index] += 1;
        }
        for (k, batch) in copies.chunks(BATCH).enumerate() {
            assert!(
                batch.iter().all(|c| *c == batch[0]),
                "batch {k} was seen in part: copies per row {batch:?}"
            );
        }
        let seen = reader.received().len() / BATCH;
        assert!(
            (committed_batches.len()..=committed_batches.len() + unanswered).contains(&seen),
            "read_committed saw {seen} batches; {} were committed, {unanswered} more may have been",
            committed_batches.len()
        );
    }
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn transactions_mode_zombie_relay_is_fenced_and_order_holds(pool: PgPool) {
    let broker = TestBroker::start().unwrap();
    let Some(mock) = broker.mock() else {
        println!("skipped: needs the mock cluster's added latency");
        return;
    };
    let topic = unique_topic("zombie");
    broker.create_topic(&topic, 3).await.unwrap();
    let ids = write_stream(pool.clone(), topic.clone(), Stream::new(2000, 50)).await;
    let config = relay_config(
        &db::url(&pool),
        broker.bootstrap(),
        &[("batch-size", "100"), ("transactions", "true")],
        &[],
    );
    // Acknowledgements take 3 s: once the relay says it produced a batch,
    // it waits that long before it can commit. Freeze it right then, inside
    // its transactions.
    let debug = [("RUST_LOG", "info,consign_relay::publish=debug")];
    let zombie = RelayProcess::start_with(&config, &["run"], &debug).unwrap();
    mock.set_round_trip(Duration::from_secs(3)).unwrap();
    eventually("the first batch to be produced", WAIT, || async {
        Ok(zombie.output().contains("batch produced").then_some(()))
    })
    .await
    .unwrap();
    zombie.pause().unwrap();
    mock.set_round_trip(Duration::from_millis(20)).unwrap();
    let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
    let successor = RelayProcess::start(&config).unwrap();
    reader.read_distinct(ids.len(), WAIT).await.unwrap();
    db::wait_drained(&pool, WAIT).await.unwrap();
    zombie.resume().unwrap();
    // Two defenses: a broker with Kafka's fencing refuses the zombie's
    // commit (its transactional ids were initialized by the successor); the
    // database refuses its deletes in any case. librdkafka's mock cluster
    // gives a re-initialized transactional id a new producer id instead of
    // bumping the epoch, so there only the second one acts.
    let output = eventually(
        "the zombie to be stopped",
        Duration::from_secs(30),
        || async {
            let output = zombie.output();
            let stopped = output.contains("fenced or broken")
                || output.contains("acknowledged rows not deleted");
            Ok(stopped.then_some(output))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}:\n{}", zombie.output()));
    let by_broker = output.contains("fenced or broken");
    println!(
        "zombie stopped by the {}",
        if by_broker { "broker" } else { "database" }
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(db::outbox_len(&pool).await.unwrap(), 0);
    reader.read_to_end(WAIT).await.unwrap();
    assert_complete_and_ordered(&ids, &reader);
    drop(successor);
}
