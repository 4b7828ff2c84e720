//! TLS for real (issue 13 item 10): PostgreSQL with `sslmode=verify-full`
//! against the test CA `scripts/services.sh` made, and Kafka's SASL_SSL
//! listener (SCRAM-SHA-512) on the real broker, through the relay binary
//! and the inbox consumer. A wrong CA and a wrong password fail, naming the
//! problem.

use std::path::PathBuf;
use std::time::Duration;

use consign::inbox::{InboxConsumer, InboxLayer};
use consign::{Message, Outbox};
use consign_test_support::effects::{self, Step, tally};
use consign_test_support::tls::TestCa;
use consign_test_support::{
    KafkaCluster, RelayProcess, db, eventually, real_kafka_required, real_kafka_tier, relay_config,
    unique_topic,
};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

const WAIT: Duration = Duration::from_secs(60);

/// The test CA of the server `pool` is on: `ca.crt` beside its
/// `ssl_cert_file` (where `scripts/services.sh` puts it).
async fn server_ca(pool: &PgPool) -> Option<PathBuf> {
    let (ssl, cert): (String, String) =
        sqlx::query_as("SELECT current_setting('ssl'), current_setting('ssl_cert_file')")
            .fetch_one(pool)
            .await
            .unwrap();
    let ca = PathBuf::from(cert).with_file_name("ca.crt");
    if ssl == "on" && ca.exists() {
        return Some(ca);
    }
    let why = format!(
        "PostgreSQL has ssl={ssl} and no {} (run scripts/services.sh postgres)",
        ca.display()
    );
    assert!(!real_kafka_required(), "{why}");
    println!("skipped: {why}");
    None
}

/// `pool`'s database on `host` with `sslmode=verify-full` and `ca`.
async fn verify_full_url(pool: &PgPool, host: &str, ca: &std::path::Path) -> String {
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    format!(
        "postgres://postgres@{host}:5432/{database}?sslmode=verify-full&sslrootcert={}",
        ca.display()
    )
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn postgres_with_verify_full_connects_and_a_wrong_ca_is_refused_by_name(pool: PgPool) {
    let Some(ca) = server_ca(&pool).await else {
        return;
    };
    for host in ["localhost", "127.0.0.1"] {
        let url = verify_full_url(&pool, host, &ca).await;
        let tls = PgPoolOptions::new().max_connections(1).connect(&url).await;
        let tls = tls.unwrap_or_else(|e| panic!("{url}: {e}"));
        let (on, version): (bool, String) =
            sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&tls)
                .await
                .unwrap();
        println!("{host}: ssl={on} {version}");
        assert!(on, "the session is not encrypted");
        tls.close().await;
    }
    // The relay binary, configured as a user would.
    let url = verify_full_url(&pool, "localhost", &ca).await;
    let config = relay_config(&url, "unused:9092", &[], &[]);
    let (ok, status) = RelayProcess::command(&config, &["status"]).await;
    assert!(ok, "consign-relay status over TLS failed:\n{status}");

    // A CA that did not sign the server's certificate.
    let dir = tempfile::tempdir().unwrap();
    let wrong = TestCa::generate(dir.path()).unwrap();
    let url = verify_full_url(&pool, "localhost", &wrong.certificate()).await;
    let error = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .expect_err("a server certificate from another CA was accepted");
    println!("wrong CA: {error}");
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );
    let config = relay_config(&url, "unused:9092", &[], &[]);
    let (ok, output) = RelayProcess::command(&config, &["status"]).await;
    println!("consign-relay status with the wrong CA:\n{output}");
    assert!(!ok, "{output}");
    assert!(output.to_lowercase().contains("certificate"), "{output}");
}

/// Writes `count` steps of one key to `topic` through the outbox.
async fn enqueue_steps(pool: &PgPool, topic: &str, count: u32) {
    let outbox = Outbox::new();
    let mut tx = pool.begin().await.unwrap();
    for n in 0..count {
        let payload = serde_json::to_vec(&Step { key: 1, n }).unwrap();
        outbox
            .enqueue(
                &mut *tx,
                Message::new(topic, "Step", payload).with_key("key-1"),
            )
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

fn kafka_table(properties: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    properties
        .iter()
        .filter(|(k, _)| *k != "bootstrap.servers")
        .map(|(k, v)| (*k, format!("{v:?}")))
        .collect()
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn kafka_over_sasl_ssl_carries_relay_and_inbox_and_a_wrong_password_is_named(pool: PgPool) {
    if !real_kafka_tier().unwrap() {
        return;
    }
    let cluster = KafkaCluster::shared().unwrap();
    let secure = cluster.secure().clone();
    effects::create_table(&pool).await.unwrap();
    let topic = unique_topic("tls");
    cluster.create_topic(&topic, 1).await.unwrap();

    // The relay binary publishes over SASL_SSL.
    enqueue_steps(&pool, &topic, 20).await;
    let good = secure.client_properties(&secure.password);
    let table = kafka_table(&good);
    let pairs: Vec<(&str, &str)> = table.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let config = relay_config(&db::url(&pool), &secure.bootstrap, &[], &pairs);
    let mut relay = RelayProcess::start(&config).unwrap();
    let drained = db::wait_drained(&pool, WAIT).await;
    relay.stop(Duration::from_secs(15)).await.unwrap();
    drained.unwrap_or_else(|e| panic!("{e:#}\n{}", relay.output()));

    // The inbox consumes over SASL_SSL.
    let inbox = InboxLayer::new(pool.clone(), unique_topic("tls-inbox")).unwrap();
    let service = ServiceBuilder::new()
        .layer(inbox.clone())
        .service_fn(effects::record);
    let consumer = |properties: &[(&'static str, String)]| {
        let mut builder = InboxConsumer::builder(&inbox).topic(&topic);
        for (key, value) in properties {
            builder = builder.kafka(*key, value);
        }
        builder.build().unwrap()
    };
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(consumer(&good).run(service.clone(), shutdown.clone()));
    eventually("20 effects over SASL_SSL", WAIT, || async {
        Ok((tally(&pool).await?.distinct == 20).then_some(()))
    })
    .await
    .unwrap();
    shutdown.cancel();
    running.await.unwrap().unwrap();

    // A wrong password: the relay says so and keeps the rows.
    enqueue_steps(&pool, &topic, 1).await;
    let bad = secure.client_properties("not-the-password");
    let table = kafka_table(&bad);
    let pairs: Vec<(&str, &str)> = table.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let config = relay_config(&db::url(&pool), &secure.bootstrap, &[], &pairs);
    let mut relay = RelayProcess::start(&config).unwrap();
    let named = eventually(
        "the relay to report the refused credentials",
        WAIT,
        || async {
            Ok(relay
                .output()
                .to_lowercase()
                .contains("authentication failed")
                .then_some(()))
        },
    )
    .await;
    relay.stop(Duration::from_secs(15)).await.unwrap();
    let output = relay.output();
    println!("relay with a wrong password:\n{output}");
    named.unwrap_or_else(|e| panic!("{e:#}\n{output}"));
    assert!(
        !output.contains("not-the-password"),
        "the password was logged"
    );
    assert_eq!(db::outbox_len(&pool).await.unwrap(), 1, "the row must stay");

    // And the inbox's run ends with the error.
    let ended = tokio::time::timeout(WAIT, consumer(&bad).run(service, CancellationToken::new()))
        .await
        .expect("the consumer with a wrong password kept running");
    let error = ended.expect_err("run ended without an error");
    println!("inbox with a wrong password: {error}");
    assert!(
        error.to_string().to_lowercase().contains("authentication"),
        "{error}"
    );
    assert!(!error.to_string().contains("not-the-password"));
}
