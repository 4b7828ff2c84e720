//! An inbox consumer process killed with SIGKILL at random points and
//! restarted: the final state is exact (each message's effect once, in key
//! order).

use std::time::{Duration, Instant};

use consign_test_support::effects::{self, TestMessage, produce, tally};
use consign_test_support::{ChildProcess, broker_test, db, eventually, unique_topic};
use rand::Rng as _;

broker_test! {
    async fn consumer_killed_with_sigkill_at_random_points_ends_exact(pool: PgPool, broker: TestBroker) {
        effects::create_table(&pool).await.unwrap();
        let topic = unique_topic("inbox-kill");
        broker.create_topic(&topic, 3).await.unwrap();
        let messages = TestMessage::stream(200, 100); // 20,000 messages, 200 keys
        produce(broker.bootstrap(), &topic, &messages)
            .await
            .unwrap();
        let total = i64::try_from(messages.len()).unwrap();

        let url = db::url(&pool);
        let env = [
            ("DATABASE_URL", url.as_str()),
            ("TEST_BOOTSTRAP", broker.bootstrap()),
            ("TEST_TOPIC", topic.as_str()),
            ("TEST_GROUP", "kill-test"),
            // Small batches: slower, so that the kills land mid-stream.
            ("TEST_MAX_BATCH", "8"),
        ];
        let mut kills = 0;
        let mut consumer = ChildProcess::start_consumer(&env).unwrap();
        let started = Instant::now();
        while kills < 6 {
            // Kill it after a random amount of progress, wherever it is then.
            let start = tally(&pool).await.unwrap().distinct;
            let progress = rand::rng().random_range(50..1500);
            let now = eventually("progress", Duration::from_secs(60), || async {
                let now = tally(&pool).await?.distinct;
                Ok((now >= (start + progress).min(total)).then_some(now))
            })
            .await
            .unwrap();
            if now >= total {
                break;
            }
            consumer.kill().unwrap();
            kills += 1;
            println!("kill {kills} at {now} effects");
            consumer = ChildProcess::start_consumer(&env).unwrap();
        }
        eventually("every effect", Duration::from_secs(120), || async {
            Ok((tally(&pool).await?.distinct >= total).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", consumer.output()));
        let status = consumer.terminate(Duration::from_secs(30)).await.unwrap();
        assert!(status.success(), "{}", consumer.output());

        let t = tally(&pool).await.unwrap();
        println!(
            "{total} messages, {kills} SIGKILLs, {:.1} s: {t:?}",
            started.elapsed().as_secs_f64()
        );
        assert!(kills >= 5, "only {kills} kills happened mid-stream");
        assert_eq!(t.effects, total, "an effect was applied twice");
        assert_eq!(t.distinct, total);
        assert_eq!(t.out_of_order_keys, 0, "per-key order of effects");
    }
}
