//! The outbox on every backend: PostgreSQL, MariaDB (for MySQL) and SQLite,
//! one test body each (`on_every_backend!`). Needs the MariaDB of
//! `scripts/services.sh mariadb` (or `MYSQL_URL`); SQLite needs nothing.

use std::time::Duration;

use consign::{Message, Outbox};
use consign_test_support::backends;

/// Runs one async test body on each backend, with `$pool` bound to a fresh
/// database of it that has consign's schema. The body is written once and
/// type-checked once per backend.
macro_rules! on_every_backend {
    ($(#[$meta:meta])* async fn $name:ident($pool:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let ($pool, db) = backends::postgres().await.unwrap();
                $body
                backends::drop_postgres($pool, &db).await.unwrap();
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                let ($pool, db) = backends::mysql().await.unwrap();
                $body
                backends::drop_mysql(Some($pool), &db).await.unwrap();
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let ($pool, _dir) = backends::sqlite().await.unwrap();
                $body
            }
        }
    };
}

/// Rows in the outbox.
macro_rules! count {
    ($pool:expr) => {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM consign_outbox")
            .fetch_one(&$pool)
            .await
            .unwrap()
    };
}

on_every_backend! {
    /// A rolled-back transaction leaves no event; a committed one leaves
    /// exactly its events.
    async fn rollback_leaves_no_event(pool) {
        let outbox = Outbox::new();
        let mut tx = pool.begin().await.unwrap();
        outbox
            .enqueue(&mut *tx, Message::new("orders", "Placed", b"{}".to_vec()).with_key("o-1"))
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(count!(pool), 0);

        let mut tx = pool.begin().await.unwrap();
        let msg = Message::new("orders", "Placed", b"{}".to_vec())
            .with_key("o-1")
            .with_header("tenant", "acme");
        let id = outbox.enqueue(&mut *tx, msg).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(count!(pool), 1);
        let (stored, headers): (uuid::Uuid, sqlx::types::Json<serde_json::Value>) =
            sqlx::query_as("SELECT id, headers FROM consign_outbox")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(stored, id);
        assert_eq!(headers.0, serde_json::json!({"tenant": "acme"}));
    }
}

on_every_backend! {
    /// An invalid message in a batch writes nothing and leaves the
    /// transaction usable.
    async fn an_invalid_message_writes_nothing(pool) {
        let outbox = Outbox::new();
        let mut tx = pool.begin().await.unwrap();
        let batch = [
            Message::new("orders", "Placed", b"{}".to_vec()),
            Message::new("no spaces allowed", "Placed", b"{}".to_vec()),
        ];
        let error = outbox.enqueue_batch(&mut *tx, &batch).await.unwrap_err();
        assert!(error.to_string().contains("message 1"), "{error}");
        outbox.enqueue(&mut *tx, batch[0].clone()).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(count!(pool), 1);
    }
}

on_every_backend! {
    /// Concurrent writers, batches of 10: every key's events are stored in
    /// the order its writer enqueued them (the relay publishes in `seq`
    /// order).
    async fn concurrent_writers_keep_each_keys_order(pool) {
        const WRITERS: usize = 4;
        const PER_WRITER: usize = 500;
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                let outbox = Outbox::new();
                for start in (0..PER_WRITER).step_by(10) {
                    let batch: Vec<Message> = (start..start + 10)
                        .map(|n| {
                            let key = format!("w{writer}-k{}", n % 25);
                            Message::new("orders", "Step", format!("{key}:{n}").into_bytes())
                                .with_key(key)
                        })
                        .collect();
                    let mut tx = pool.begin().await.unwrap();
                    outbox.enqueue_batch(&mut *tx, &batch).await.unwrap();
                    tx.commit().await.unwrap();
                }
            }));
        }
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(120), task)
                .await
                .expect("writers finish")
                .unwrap();
        }
        let payloads: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT payload FROM consign_outbox ORDER BY seq")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(payloads.len(), WRITERS * PER_WRITER);
        let mut last = std::collections::HashMap::<String, usize>::new();
        for payload in payloads {
            let text = String::from_utf8(payload).unwrap();
            let (key, n) = text.split_once(':').unwrap();
            let n: usize = n.parse().unwrap();
            if let Some(previous) = last.insert(key.to_owned(), n) {
                assert!(previous < n, "{key}: {n} stored after {previous}");
            }
        }
        assert_eq!(last.len(), WRITERS * 25);
    }
}

on_every_backend! {
    /// `migrate` is idempotent and creates every table: outbox, leases with
    /// epochs (32 partitions), identity, inbox, offsets, dead letters, archive.
    async fn migrate_twice_creates_every_table(pool) {
        consign::migrate(&pool).await.unwrap();
        for table in [
            "consign_outbox",
            "consign_relays",
            "consign_inbox",
            "consign_inbox_offsets",
            "consign_dead_letters",
            "consign_outbox_archive",
        ] {
            let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(rows, 0, "{table}");
        }
        let leases: i64 = sqlx::query_scalar("SELECT count(*) FROM consign_relay_leases")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(leases, 32);
        let identity: uuid::Uuid = sqlx::query_scalar("SELECT outbox_id FROM consign_outbox_identity")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(!identity.is_nil());
    }
}
