//! The `InboxService` as a plain tower service: `Received` messages built by
//! hand and fed with `oneshot`, no Kafka, real PostgreSQL.

use std::time::Duration;

use consign::inbox::{
    BatchOutcome, BoxError, Delivery, InboxLayer, Outcome, Received, RetryPolicy, headers,
};
use consign_test_support::effects::{self, TestMessage, tally};
use consign_test_support::unique_topic;
use sqlx::PgPool;
use tower::{Layer as _, ServiceExt, service_fn};

/// The `n` of a step whose handler writes a row that breaks a deferred
/// foreign key: the statement succeeds, the commit fails.
const BREAKS_DEFERRED_CONSTRAINT: u32 = 666;
/// The `n` of a step whose handler swallows an SQL error and returns `Ok`.
const SWALLOWS_SQL_ERROR: u32 = 667;

fn inbox(pool: &PgPool) -> InboxLayer {
    InboxLayer::builder(pool.clone(), unique_topic("service-test"))
        .retry(RetryPolicy {
            max_attempts: 2,
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(10),
        })
        .build()
}

fn received(topic: &str, offset: i64, message: &TestMessage) -> Received {
    let mut received = Received::new(topic, 0, offset)
        .with_key(message.key.as_bytes())
        .with_payload(message.payload.clone());
    if let Some(id) = message.id {
        received = received.with_header("consign-id", id.to_string());
    }
    received
}

/// Records the effect; the two special steps misbehave in ways the
/// handler's own statements do not show.
async fn handler(mut delivery: Delivery) -> Result<(), BoxError> {
    let step: effects::Step = delivery.json()?;
    match step.n {
        BREAKS_DEFERRED_CONSTRAINT => {
            sqlx::query("INSERT INTO test_children (parent) VALUES (-1)")
                .execute(delivery.conn())
                .await?;
        }
        SWALLOWS_SQL_ERROR => {
            let swallowed = sqlx::query("SELECT 1 / 0").execute(delivery.conn()).await;
            assert!(swallowed.is_err());
            return Ok(());
        }
        _ => {}
    }
    effects::record(delivery).await
}

async fn setup(pool: &PgPool) {
    effects::create_table(pool).await.unwrap();
    sqlx::query("CREATE TABLE test_parents (id integer PRIMARY KEY)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE test_children (parent integer NOT NULL
             REFERENCES test_parents (id) DEFERRABLE INITIALLY DEFERRED)",
    )
    .execute(pool)
    .await
    .unwrap();
}

async fn dead_letter_reasons(pool: &PgPool) -> Vec<(i64, String)> {
    sqlx::query_as(r#"SELECT "offset", error FROM consign_dead_letters ORDER BY "offset""#)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Issue 13 item 4: a message whose transaction cannot commit although its
/// handler returned `Ok` (a deferred constraint it broke, an SQL error it
/// swallowed) is retried per the policy and dead-lettered with the
/// database's error; the other messages of its batch are handled. Before
/// the fix the batch failed with a database error on every try, for ever.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn a_message_whose_commit_fails_is_dead_lettered_with_the_database_error(pool: PgPool) {
    setup(&pool).await;
    let topic = unique_topic("commit-fails");
    let steps = [
        TestMessage::step(1, 1),
        TestMessage::step(2, BREAKS_DEFERRED_CONSTRAINT),
        TestMessage::step(1, 2),
        TestMessage::step(3, SWALLOWS_SQL_ERROR),
        TestMessage::step(1, 3),
    ];
    let batch: Vec<Received> = (0..)
        .zip(&steps)
        .map(|(offset, step)| received(&topic, offset, step))
        .collect();
    let layer = inbox(&pool);
    let service = layer.layer(service_fn(handler));

    let outcome: BatchOutcome = tokio::time::timeout(
        Duration::from_secs(60),
        ServiceExt::<Vec<Received>>::oneshot(service.clone(), batch),
    )
    .await
    .expect("the batch did not settle")
    .expect("the batch failed instead of dead-lettering the message at fault");
    println!("{outcome:?}");
    assert_eq!(
        (outcome.handled, outcome.dead_lettered),
        (3, 2),
        "{outcome:?}"
    );
    let t = tally(&pool).await.unwrap();
    assert_eq!((t.effects, t.distinct), (3, 3), "{t:?}");
    let dead = dead_letter_reasons(&pool).await;
    println!("{dead:#?}");
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].0, 1);
    assert!(dead[0].1.contains("foreign key"), "{}", dead[0].1);
    assert_eq!(dead[1].0, 3);
    assert!(
        dead[1].1.contains("transaction is aborted"),
        "{}",
        dead[1].1
    );
    let stored: i64 = sqlx::query_scalar("SELECT next_offset FROM consign_inbox_offsets")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 5);

    // One message at a time, the same.
    let alone = received(&topic, 5, &TestMessage::step(4, BREAKS_DEFERRED_CONSTRAINT));
    let outcome = ServiceExt::<Received>::oneshot(service, alone)
        .await
        .expect("the message failed instead of being dead-lettered");
    assert!(
        matches!(&outcome, Outcome::DeadLettered { reason } if reason.contains("foreign key")),
        "{outcome:?}"
    );
    assert_eq!(layer.stats().dead_lettered, 3);
}

/// A requeued dead letter is for the consumer named in its
/// `consign-requeued-for` header only (issue 13 item 6): another inbox
/// passes over it without calling its handler, whatever its dedup records
/// say, and records its offset; the named one handles it.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn a_requeued_dead_letter_is_handled_only_by_the_consumer_it_names(pool: PgPool) {
    setup(&pool).await;
    let topic = unique_topic("requeued-for");
    let named = inbox(&pool);
    let other = inbox(&pool);
    let step = TestMessage::step(1, 1);
    let letter = |offset| {
        received(&topic, offset, &step).with_header(headers::REQUEUED_FOR, named.consumer())
    };

    let passed = ServiceExt::<Received>::oneshot(other.layer(service_fn(handler)), letter(0))
        .await
        .unwrap();
    assert_eq!(passed, Outcome::ForAnotherConsumer);
    let batch = ServiceExt::<Vec<Received>>::oneshot(
        other.layer(service_fn(handler)),
        vec![letter(1), received(&topic, 2, &TestMessage::step(2, 1))],
    )
    .await
    .unwrap();
    assert_eq!(
        (batch.for_another_consumer, batch.handled),
        (1, 1),
        "{batch:?}"
    );
    assert_eq!(tally(&pool).await.unwrap().effects, 1);
    let stored: i64 = sqlx::query_scalar(
        "SELECT next_offset FROM consign_inbox_offsets WHERE consumer_group = $1",
    )
    .bind(other.consumer())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stored, 3);
    assert_eq!(other.stats().for_another_consumer, 2);

    let handled = ServiceExt::<Received>::oneshot(named.layer(service_fn(handler)), letter(3))
        .await
        .unwrap();
    assert_eq!(handled, Outcome::Handled);
    assert_eq!(tally(&pool).await.unwrap().effects, 2);
}
