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
        .retry(
            RetryPolicy::attempts(2)
                .with_delays(Duration::from_millis(5), Duration::from_millis(10)),
        )
        .build()
        .unwrap()
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

/// A handler that counts its calls and records effects; what it does with
/// a message depends on the step's `n`.
#[derive(Clone, Default)]
struct Scripted {
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Steps with `n == FAILS_ONCE` fail on their first call only.
    failed_once: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

const FAILS_ONCE: u32 = 500;
const REJECTED: u32 = 501;
const PANICS: u32 = 502;
const KEEPS_DELIVERY: u32 = 503;

impl Scripted {
    fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn service(
        &self,
    ) -> impl tower::Service<
        Delivery,
        Response = (),
        Error = BoxError,
        Future = impl Future<Output = Result<(), BoxError>> + Send,
    > + Clone
    + Send
    + 'static {
        let script = self.clone();
        service_fn(move |mut delivery: Delivery| {
            let script = script.clone();
            async move {
                use std::sync::atomic::Ordering::SeqCst;
                script.calls.fetch_add(1, SeqCst);
                let step: effects::Step = delivery.json()?;
                match step.n {
                    FAILS_ONCE if !script.failed_once.swap(true, SeqCst) => {
                        return Err("the inventory service is down".into());
                    }
                    REJECTED => return Err(delivery.reject("no such product").into()),
                    PANICS => panic!("unexpected state"),
                    KEEPS_DELIVERY => {
                        // Kept just past the inbox's 5 s wait for it
                        // (its uncommitted dedup record holds the next try
                        // back until then).
                        tokio::spawn(async move {
                            let _kept = delivery;
                            tokio::time::sleep(Duration::from_secs(6)).await;
                        });
                        return Ok(());
                    }
                    _ => {}
                }
                effects::record(delivery).await
            }
        })
    }
}

fn one(topic: &str, offset: i64, key: u32, n: u32) -> Received {
    received(topic, offset, &TestMessage::step(key, n))
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn a_duplicate_is_skipped_without_calling_the_handler(pool: PgPool) {
    setup(&pool).await;
    let topic = unique_topic("duplicate");
    let script = Scripted::default();
    let service = inbox(&pool).layer(script.service());
    let message = one(&topic, 0, 1, 1);
    let first = ServiceExt::<Received>::oneshot(service.clone(), message.clone())
        .await
        .unwrap();
    let again = ServiceExt::<Received>::oneshot(service.clone(), message.clone())
        .await
        .unwrap();
    let in_batch = ServiceExt::<Vec<Received>>::oneshot(service, vec![message.clone(), message])
        .await
        .unwrap();
    assert_eq!((first, again), (Outcome::Handled, Outcome::Duplicate));
    assert_eq!(in_batch.duplicates, 2, "{in_batch:?}");
    assert_eq!(script.calls(), 1);
    assert_eq!(tally(&pool).await.unwrap().effects, 1);
}

/// A batch runs in one transaction while every handler succeeds; when one
/// fails, the whole batch rolls back and is redone one message at a time,
/// so the messages before it take effect once, not twice.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn a_failing_batch_is_redone_one_message_at_a_time(pool: PgPool) {
    setup(&pool).await;
    let topic = unique_topic("fallback");
    let script = Scripted::default();
    let service = inbox(&pool).layer(script.service());
    let batch = vec![
        one(&topic, 0, 1, 1),
        one(&topic, 1, 2, FAILS_ONCE),
        one(&topic, 2, 3, 1),
    ];
    let outcome = ServiceExt::<Vec<Received>>::oneshot(service, batch)
        .await
        .unwrap();
    assert_eq!(
        (outcome.handled, outcome.failed_attempts),
        (3, 1),
        "{outcome:?}"
    );
    // 2 calls in the batch (the second failed), then 3 one at a time.
    assert_eq!(script.calls(), 5);
    let t = tally(&pool).await.unwrap();
    assert_eq!((t.effects, t.distinct), (3, 3), "{t:?}");
}

/// A rejected message is dead-lettered at once with its reason; a
/// panicking handler is retried per the policy, then dead-lettered with
/// the panic's message; the other messages of the batch take effect.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn poison_and_panics_are_dead_lettered_with_their_reason(pool: PgPool) {
    setup(&pool).await;
    let topic = unique_topic("poison");
    let script = Scripted::default();
    let layer = inbox(&pool);
    let service = layer.layer(script.service());
    let batch = vec![
        one(&topic, 0, 1, 1),
        one(&topic, 1, 2, REJECTED),
        one(&topic, 2, 3, PANICS),
        one(&topic, 3, 4, 1),
    ];
    let outcome = ServiceExt::<Vec<Received>>::oneshot(service, batch)
        .await
        .unwrap();
    assert_eq!(
        (outcome.handled, outcome.dead_lettered),
        (2, 2),
        "{outcome:?}"
    );
    let dead = dead_letter_reasons(&pool).await;
    println!("{dead:#?}");
    assert_eq!(dead[0], (1, "no such product".to_owned()));
    assert_eq!(dead[1].0, 2);
    assert!(
        dead[1].1.contains("gave up after 2 attempts") && dead[1].1.contains("unexpected state"),
        "{}",
        dead[1].1
    );
    assert_eq!(tally(&pool).await.unwrap().effects, 2);
    assert_eq!(layer.stats().dead_lettered, 2);
}

/// A handler that moves its `Delivery` into a task and returns: the inbox
/// cannot commit a transaction it does not have back, so the attempt fails
/// (after 5 s), saying why, and the message ends in the dead letters.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn a_handler_that_keeps_its_delivery_fails_saying_so(pool: PgPool) {
    setup(&pool).await;
    let topic = unique_topic("kept");
    let script = Scripted::default();
    let service = inbox(&pool).layer(script.service());
    let outcome = ServiceExt::<Received>::oneshot(service, one(&topic, 0, 1, KEEPS_DELIVERY))
        .await
        .unwrap();
    let Outcome::DeadLettered { reason } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(reason.contains("kept its Delivery"), "{reason}");
}

/// The inbox is ready when its handler is: it passes the handler's
/// readiness (and its errors) on, as tower's middleware do.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn readiness_is_the_handlers(pool: PgPool) {
    #[derive(Clone)]
    struct Closed;
    impl tower::Service<Delivery> for Closed {
        type Response = ();
        type Error = BoxError;
        type Future = std::future::Ready<Result<(), BoxError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            std::task::Poll::Ready(Err("the handler's connection pool is closed".into()))
        }
        fn call(&mut self, _: Delivery) -> Self::Future {
            std::future::ready(Ok(()))
        }
    }
    let mut service = inbox(&pool).layer(Closed);
    let error = ServiceExt::<Received>::ready(&mut service)
        .await
        .err()
        .expect("ready although the handler is not");
    assert!(error.to_string().contains("pool is closed"), "{error}");
    let _: &Closed = service.get_ref();
    let _: Closed = service.into_inner();
}

/// A handler that swallows an SQL error poisons the batch's transaction:
/// the next handler's statements fail (25P02). That failure is not charged
/// to the next message, which, redone alone, succeeds, even when the
/// policy allows a single attempt.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn a_message_after_a_swallowed_error_is_not_blamed_for_it(pool: PgPool) {
    setup(&pool).await;
    let topic = unique_topic("blame");
    let layer = InboxLayer::builder(pool.clone(), unique_topic("blame"))
        .retry(
            RetryPolicy::attempts(1)
                .with_delays(Duration::from_millis(5), Duration::from_millis(10)),
        )
        .build()
        .unwrap();
    let batch = vec![
        received(&topic, 0, &TestMessage::step(1, SWALLOWS_SQL_ERROR)),
        received(&topic, 1, &TestMessage::step(2, 1)),
    ];
    let outcome = ServiceExt::<Vec<Received>>::oneshot(layer.layer(service_fn(handler)), batch)
        .await
        .unwrap();
    println!("{outcome:?} {:#?}", dead_letter_reasons(&pool).await);
    assert_eq!(
        (outcome.handled, outcome.dead_lettered),
        (1, 1),
        "{outcome:?}"
    );
    let dead = dead_letter_reasons(&pool).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].0, 0,
        "the message that swallowed the error is the one dead-lettered"
    );
}

/// Two transactions record the same message at once (a consumer that lost
/// the partition finishing its batch while the new owner starts): the
/// second waits on the first's uncommitted record and, once it commits,
/// takes the message as a duplicate, without calling the handler, and
/// handles the rest of its batch.
#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn a_message_recorded_by_a_concurrent_batch_is_a_duplicate(pool: PgPool) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tokio::sync::{Notify, Semaphore};

    setup(&pool).await;
    let topic = unique_topic("race");
    let (entered, gate) = (Arc::new(Notify::new()), Arc::new(Semaphore::new(0)));
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = inbox(&pool);
    let handler = {
        let (entered, gate, calls) = (entered.clone(), gate.clone(), calls.clone());
        service_fn(move |delivery: Delivery| {
            let (entered, gate, calls) = (entered.clone(), gate.clone(), calls.clone());
            async move {
                calls.fetch_add(1, SeqCst);
                if delivery.message().offset == 0 {
                    // Holds the first batch's transaction open.
                    entered.notify_one();
                    let _permit = gate.acquire().await?;
                }
                effects::record(delivery).await
            }
        })
    };
    let first = one(&topic, 0, 1, 1);
    let holding = tokio::spawn(ServiceExt::<Vec<Received>>::oneshot(
        layer.layer(handler.clone()),
        vec![first.clone()],
    ));
    entered.notified().await;
    let mut again = first;
    again.offset = 1;
    let racing = tokio::spawn(ServiceExt::<Vec<Received>>::oneshot(
        layer.layer(handler),
        vec![again, one(&topic, 2, 2, 1)],
    ));
    // The second batch's first statement waits on the first's record.
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&pool)
    .await
    .unwrap()
        == 0
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.add_permits(1);
    let held = holding.await.unwrap().unwrap();
    let raced = racing.await.unwrap().unwrap();
    assert_eq!(held.handled, 1, "{held:?}");
    assert_eq!((raced.handled, raced.duplicates), (1, 1), "{raced:?}");
    assert_eq!(
        calls.load(SeqCst),
        2,
        "the duplicate's handler is not called"
    );
    let t = tally(&pool).await.unwrap();
    assert_eq!((t.effects, t.distinct), (2, 2), "{t:?}");
}
