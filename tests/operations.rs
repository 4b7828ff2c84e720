//! Operating the relay: configuration, secrets, metrics and health, the
//! admin commands.

use std::time::Duration;

use consign_test_support::{
    RelayProcess, TestBroker, db, eventually,
    net::{TcpProxy, http_get, prometheus_value},
    relay_config,
    stream::{Stream, write_stream},
    unique_topic,
};
use rdkafka::types::RDKafkaRespErr;
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(60);

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

/// The relay's admin address, from its log line.
async fn admin_address(relay: &RelayProcess) -> std::net::SocketAddr {
    eventually("the admin endpoint to listen", WAIT, || async {
        Ok(relay
            .output()
            .lines()
            .find(|l| l.contains("serving /metrics and /health"))
            .and_then(|l| l.split("address=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok()))
    })
    .await
    .unwrap()
}

async fn metrics(address: std::net::SocketAddr) -> String {
    let (status, body) = http_get(address, "/metrics").await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until `/metrics` shows `series` satisfying `check`; returns it.
async fn metric_until(
    address: std::net::SocketAddr,
    series: &str,
    check: impl Fn(f64) -> bool,
) -> f64 {
    eventually(series, WAIT, || async {
        Ok(prometheus_value(&metrics(address).await, series).filter(|v| check(*v)))
    })
    .await
    .unwrap()
}

/// Waits until `/health/ready` answers `status`; returns the body.
async fn readiness_until(address: std::net::SocketAddr, status: u16) -> serde_json::Value {
    eventually(
        &format!("/health/ready to answer {status}"),
        WAIT,
        || async {
            let (got, body) = http_get(address, "/health/ready").await?;
            Ok((got == status).then(|| serde_json::from_str(&body).unwrap()))
        },
    )
    .await
    .unwrap()
}

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn metrics_move_with_events_and_readiness_follows_postgres_and_kafka(pool: PgPool) {
    let broker = TestBroker::start().unwrap();
    let Some(mock) = broker.mock() else {
        println!("skipped: needs the mock cluster to refuse a topic and stop brokers");
        return;
    };
    let topic = unique_topic("metrics");
    broker.create_topic(&topic, 2).await.unwrap();
    // The relay reaches PostgreSQL through a proxy the test can cut.
    let options = pool.connect_options();
    let target = format!("{}:{}", options.get_host(), options.get_port());
    let proxy = TcpProxy::start(target.parse().unwrap()).await.unwrap();
    let mut url = url::Url::parse(&db::url(&pool)).unwrap();
    url.set_port(Some(proxy.address().port())).unwrap();
    let config = relay_config(url.as_str(), broker.bootstrap(), &[], &[])
        + "\n[admin]\nenabled = true\nlisten = \"127.0.0.1:0\"\nsample-interval = \"200ms\"\n";
    let mut relay = RelayProcess::start(&config).unwrap();
    let admin = admin_address(&relay).await;
    let ready = readiness_until(admin, 200).await;
    assert_eq!(ready["database"]["up"], true, "{ready}");
    assert_eq!(http_get(admin, "/health/live").await.unwrap().0, 200);
    metric_until(admin, "consign_relay_partitions_owned", |v| v == 32.0).await;
    metric_until(
        admin,
        "consign_relay_partition_owned{partition=\"31\"}",
        |v| v == 1.0,
    )
    .await;

    // Refused rows: errors by kind, rows with errors, a backlog with an age.
    mock.set_topic_error(
        &topic,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();
    let ids = write_stream(pool.clone(), topic.clone(), Stream::new(300, 30)).await;
    let refused = "consign_relay_publish_errors_total{kind=\"topic_authorization_failed\"}";
    metric_until(admin, refused, |v| v >= 1.0).await;
    let with_errors = metric_until(admin, "consign_outbox_rows_with_errors", |v| v >= 1.0).await;
    let pending = metric_until(admin, "consign_outbox_pending_rows", |v| v >= 300.0).await;
    let age = metric_until(admin, "consign_outbox_oldest_pending_age_seconds", |v| {
        v > 0.0
    })
    .await;
    println!("refused: {with_errors} rows with errors, {pending} pending, oldest {age:.2} s");

    // Accepted again: everything goes out and the counters move.
    mock.set_topic_error(&topic, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    db::wait_drained(&pool, WAIT).await.unwrap();
    let published = metric_until(admin, "consign_relay_published_total", |v| v >= 300.0).await;
    assert_eq!(published, ids.len() as f64);
    metric_until(admin, "consign_outbox_pending_rows", |v| v == 0.0).await;
    metric_until(admin, "consign_outbox_rows_with_errors", |v| v == 0.0).await;
    let text = metrics(admin).await;
    let acked = prometheus_value(&text, "consign_relay_commit_to_ack_seconds_count").unwrap();
    assert_eq!(acked, 300.0, "{text}");
    let batches = prometheus_value(&text, "consign_relay_batch_rows_count").unwrap();
    let rows = prometheus_value(&text, "consign_relay_batch_rows_sum").unwrap();
    assert!(batches >= 1.0 && rows >= 300.0, "{text}");
    assert!(
        text.contains("consign_relay_commit_to_ack_seconds_bucket{le=\"0.005\"}"),
        "{text}"
    );
    println!("published {published} in {batches} batches ({rows} rows read)");

    // PostgreSQL unreachable: not ready (but live), then ready again.
    proxy.cut();
    let unready = readiness_until(admin, 503).await;
    assert_eq!(unready["database"]["up"], false, "{unready}");
    assert_eq!(unready["kafka"]["up"], true, "{unready}");
    println!("database down: {}", unready["database"]["error"]);
    metric_until(admin, "consign_relay_database_up", |v| v == 0.0).await;
    assert_eq!(http_get(admin, "/health/live").await.unwrap().0, 200);
    proxy.restore();
    readiness_until(admin, 200).await;

    // Every broker down: not ready, then ready again.
    mock.all_down().unwrap();
    let unready = readiness_until(admin, 503).await;
    assert_eq!(unready["kafka"]["up"], false, "{unready}");
    assert_eq!(unready["database"]["up"], true, "{unready}");
    println!("brokers down: {}", unready["kafka"]["error"]);
    assert_eq!(http_get(admin, "/health").await.unwrap().0, 503);
    mock.all_up().unwrap();
    readiness_until(admin, 200).await;
    assert_eq!(http_get(admin, "/health").await.unwrap().0, 200);
    assert!(relay.terminate(Duration::from_secs(20)).unwrap().success());
}
