//! The outbox on its own: what enqueue writes, what it refuses, and that
//! the event shares the fate of the caller's transaction.

use consign::{Event, Message, Outbox, outbox::Error};
use serde::Serialize;
use sqlx::PgPool;

async fn rows(
    pool: &PgPool,
) -> Vec<(
    uuid::Uuid,
    String,
    Option<String>,
    String,
    Vec<u8>,
    serde_json::Value,
)> {
    sqlx::query_as(
        "SELECT id, topic, key, event_type, payload, headers FROM consign_outbox ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn create_orders(pool: &PgPool) {
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY)")
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn enqueue_commits_and_rolls_back_with_the_business_rows(pool: PgPool) {
    create_orders(&pool).await;
    let outbox = Outbox::new();

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox
        .enqueue(&mut *tx, Message::new("orders", "Rolled", b"x".to_vec()))
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES (2)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let kept = outbox
        .enqueue(&mut *tx, Message::new("orders", "Committed", b"y".to_vec()))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let rows = rows(&pool).await;
    assert_eq!(rows.len(), 1, "only the committed event exists: {rows:?}");
    assert_eq!(rows[0].0, kept);
    assert_eq!(rows[0].3, "Committed");
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn bad_input_is_refused_before_writing_and_the_transaction_stays_usable(pool: PgPool) {
    let outbox = Outbox::builder().max_payload_bytes(1024).build();
    let mut tx = pool.begin().await.unwrap();

    let bad = [
        Message::new("bad topic!", "E", vec![]),
        Message::new("t", "E", vec![0; 1025]),
        Message::new("t", "E", vec![]).with_header("consign-id", "forged"),
        Message::new("t", "E", vec![]).with_header("x", "nul\0byte"),
        Message::new("t", "E", vec![]).with_key("nul\0key"),
    ];
    let mut errors = Vec::new();
    for msg in bad {
        errors.push(outbox.enqueue(&mut *tx, msg).await.unwrap_err());
    }
    assert!(matches!(errors[0], Error::InvalidTopic { ref topic, .. } if topic == "bad topic!"));
    assert!(matches!(
        errors[1],
        Error::PayloadTooLarge {
            size: 1025,
            limit: 1024,
            ..
        }
    ));
    assert!(matches!(errors[2], Error::InvalidHeader { ref name, .. } if name == "consign-id"));
    assert!(matches!(errors[3], Error::InvalidHeader { .. }));
    assert!(matches!(errors[4], Error::InvalidKey { .. }));
    for error in &errors {
        println!("refused: {error}");
    }

    // A batch with one bad message writes none of them and says which.
    let batch = [
        Message::new("t", "E", vec![]),
        Message::new("t", "E", vec![]),
        Message::new("", "E", vec![]),
    ];
    let err = outbox.enqueue_batch(&mut *tx, &batch).await.unwrap_err();
    assert!(matches!(err, Error::InBatch { index: 2, .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("message 2 of the batch: invalid topic"),
        "{err}"
    );

    // Nothing reached the database, so the transaction is not aborted.
    outbox
        .enqueue(&mut *tx, Message::new("t", "Good", vec![]))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let rows = rows(&pool).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].3, "Good");
}

#[derive(Serialize)]
struct OrderPlaced {
    order_id: i64,
    total_cents: i64,
}

impl Event for OrderPlaced {
    const TOPIC: &'static str = "orders";
    const EVENT_TYPE: &'static str = "OrderPlaced";
    fn key(&self) -> Option<String> {
        Some(format!("order-{}", self.order_id))
    }
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn batch_keeps_order_and_typed_events_carry_topic_key_and_json(pool: PgPool) {
    let outbox = Outbox::new();
    let mut tx = pool.begin().await.unwrap();
    let batch: Vec<Message> = (0..500)
        .map(|i| {
            Message::new(
                "stream",
                format!("E{i}"),
                vec![u8::try_from(i % 256).unwrap()],
            )
            .with_key(format!("k{}", i % 7))
            .with_header("i", i.to_string())
        })
        .collect();
    let ids = outbox.enqueue_batch(&mut *tx, &batch).await.unwrap();
    let typed = outbox
        .enqueue_event(
            &mut *tx,
            &OrderPlaced {
                order_id: 9,
                total_cents: 100,
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let rows = rows(&pool).await;
    assert_eq!(rows.len(), 501);
    for (i, (row, msg)) in rows.iter().zip(&batch).enumerate() {
        assert_eq!(row.0, ids[i], "seq order follows batch order");
        assert_eq!(row.2.as_deref(), msg.key());
        assert_eq!(row.4, msg.payload());
        assert_eq!(row.5, serde_json::json!({ "i": i.to_string() }));
    }
    let last = &rows[500];
    assert_eq!(last.0, typed);
    assert_eq!(
        (last.1.as_str(), last.2.as_deref()),
        ("orders", Some("order-9"))
    );
    assert_eq!(last.4, br#"{"order_id":9,"total_cents":100}"#);
    assert_eq!(
        last.5,
        serde_json::json!({ "content-type": "application/json" })
    );

    let partitions: Vec<(uuid::Uuid, i16)> =
        sqlx::query_as("SELECT id, partition FROM consign_outbox ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    for ((id, partition), msg) in partitions.iter().zip(&batch) {
        assert_eq!(*id, msg.id());
        assert_eq!(
            *partition,
            msg.partition(),
            "stored partition is the key's hash"
        );
    }
}

#[sqlx::test(migrations = false)]
async fn migrate_twice_is_a_no_op_and_leaves_your_own_migrations_table_alone(pool: PgPool) {
    consign::migrate(&pool).await.unwrap();
    consign::migrate(&pool).await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _consign_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        applied,
        i64::try_from(consign::MIGRATOR.iter().count()).unwrap()
    );
    let sqlx_table: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(sqlx_table, None, "consign does not touch _sqlx_migrations");
}
