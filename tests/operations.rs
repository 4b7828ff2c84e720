//! Operating the relay: configuration, secrets, metrics and health, the
//! admin commands.

use std::time::Duration;

use consign_test_support::{
    RelayProcess, TestBroker, db, relay_config,
    stream::{Stream, write_stream},
    unique_topic,
};
use sqlx::PgPool;

const PG_SECRET: &str = "pg-secret-6d1f";
const KAFKA_SECRET: &str = "kafka-secret-93ab";

/// The test database's URL with a password in it (trust authentication
/// ignores it, so the relay still connects).
fn url_with_password(pool: &PgPool) -> String {
    let mut url = url::Url::parse(&db::url(pool)).unwrap();
    url.set_password(Some(PG_SECRET)).unwrap();
    url.to_string()
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn secrets_never_appear_in_logs_or_printed_config(pool: PgPool) {
    let broker = TestBroker::start().unwrap();
    let topic = unique_topic("secrets");
    broker.create_topic(&topic, 2).await.unwrap();
    let config = relay_config(
        &url_with_password(&pool),
        broker.bootstrap(),
        &[],
        &[
            ("sasl.username", "\"relay\""),
            ("sasl.password", &format!("{KAFKA_SECRET:?}")),
        ],
    );
    // The most talkative logging there is, while events flow.
    let debug = [("RUST_LOG", "trace")];
    let mut relay = RelayProcess::start_with(&config, &["run"], &debug).unwrap();
    let ids = write_stream(pool.clone(), topic.clone(), Stream::new(200, 10)).await;
    db::wait_drained(&pool, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(relay.terminate(Duration::from_secs(20)).unwrap().success());
    let mut outputs = vec![("run", relay.output())];
    assert!(outputs[0].1.contains("relay stopped"), "{}", outputs[0].1);
    println!("{} events relayed with trace logging", ids.len());

    let bad = config.replace("batch-size = 1000", "batch-size = 0");
    for (name, config, args) in [
        ("config show", &config, &["config", "show"][..]),
        ("config show --json", &config, &["config", "show", "--json"]),
        ("config check", &config, &["config", "check"]),
        ("config check (invalid)", &bad, &["config", "check"]),
        ("run (invalid)", &bad, &["run"]),
        ("status", &config, &["status"]),
    ] {
        let mut command = RelayProcess::start_with(config, args, &debug).unwrap();
        command.wait(Duration::from_secs(30)).unwrap();
        outputs.push((name, command.output()));
    }
    assert!(outputs[1].1.contains("REDACTED"), "{}", outputs[1].1);
    assert!(outputs[1].1.contains("sasl.username"), "{}", outputs[1].1);
    assert!(
        outputs[4].1.contains("relay.batch-size"),
        "{}",
        outputs[4].1
    );
    for (name, output) in outputs {
        for secret in [PG_SECRET, KAFKA_SECRET] {
            assert!(
                !output.contains(secret),
                "{name} printed {secret}:\n{output}"
            );
        }
    }
}
