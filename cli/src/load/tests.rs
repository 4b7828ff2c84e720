use std::time::Duration;

use consign_relay::{
    RelaySettings,
    config::{DatabaseSettings, KafkaValue, REDACTED, redact_url},
};
use figment::providers::{Format as _, Toml};

use super::*;

#[test]
fn reference_file_parses_and_matches_defaults() {
    let reference = include_str!("../../reference.toml");
    let config: Config = toml_from_str(reference);
    assert_eq!(config.relay, RelaySettings::default());
    assert_eq!(
        config.database.max_connections,
        DatabaseSettings::default().max_connections
    );
    config.validate().unwrap();
}

fn toml_from_str(text: &str) -> Config {
    Figment::from(Toml::string(text)).extract().unwrap()
}

const VALID: &str = r#"
[database]
url = "postgres://postgres@127.0.0.1:5432/test"
[kafka]
"bootstrap.servers" = "127.0.0.1:9092"
"#;

/// Loads `VALID` with `change` applied (a line replacing or adding a
/// key in a section) and validates it.
fn load_with(section: &str, line: &str) -> Result<Config> {
    let mut text = VALID.to_owned();
    if section.is_empty() {
        text = format!("{line}\n{text}");
    } else if let Some(at) = text.find(&format!("[{section}]\n")) {
        let at = at + section.len() + 3;
        let key = line.split('=').next().unwrap_or_default().trim();
        // Drop the valid line for the same key, if any.
        let rest: String = text[at..]
            .lines()
            .filter(|l| l.split('=').next().unwrap_or_default().trim() != key)
            .map(|l| format!("{l}\n"))
            .collect();
        text = format!("{}{line}\n{rest}", &text[..at]);
    } else {
        text = format!("{text}[{section}]\n{line}\n");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("consign.toml");
    std::fs::write(&file, &text).unwrap();
    // Without the environment: the test command exports DATABASE_URL.
    let config = load_from(sources(Some(&file), false)?, None)?;
    config.validate()?;
    Ok(config)
}

#[test]
fn every_bad_field_gives_an_error_naming_it() {
    // (section, line in it, field named, what the message says), one case per line.
    #[rustfmt::skip]
    let cases = [
        ("", r#"profile = "staging""#, "profile", "development, testing, production"),
        ("", "profile = 3", "profile", "must be a string"),
        ("", "unknown = 1", "unknown", "unknown field"),
        ("database", r#"url = """#, "database.url", "required"),
        ("database", r#"url = "oracle://x/y""#, "database.url", "postgres://"),
        ("database", r#"url = "postgres://h:notaport/db""#, "database.url", "not a valid"),
        ("database", "max-connections = 0", "database.max-connections", "between 1 and 100"),
        ("database", "max-connections = -1", "database.max-connections", "invalid value"),
        ("database", r#"acquire-timeout = "1ms""#, "database.acquire-timeout", "between 10ms"),
        ("database", r#"acquire-timeout = "soon""#, "database.acquire-timeout", ""),
        ("database", r#"statement-timeout = "10ms""#, "database.statement-timeout", "must be 0s (leave the server's setting) or between 100ms and 1h, got 10ms"),
        ("database", r#"statement-timeout = "2h""#, "database.statement-timeout", "got 2h"),
        ("database", "application-name = 5", "database.application-name", "invalid type"),
        ("database", "port = 5432", "database.port", "unknown field"),
        ("relay", "batch-size = 0", "relay.batch-size", "between 1 and 100000"),
        ("relay", r#"batch-size = "many""#, "relay.batch-size", "invalid type"),
        ("relay", "batch-max-bytes = 1000", "relay.batch-max-bytes", "between 65536"),
        ("relay", r#"poll-interval = "0s""#, "relay.poll-interval", "between 1ms and 1m"),
        ("relay", r#"max-poll-interval = "1ms""#, "relay.max-poll-interval", "at least relay.poll-interval"),
        ("relay", r#"idle-probe-interval = "1s""#, "relay.idle-probe-interval", "0s (off) or between 1ms and relay.max-poll-interval"),
        ("relay", r#"retry-min-delay = "2h""#, "relay.retry-min-delay", "between 1ms and 1h"),
        ("relay", r#"retry-max-delay = "10ms""#, "relay.retry-max-delay", "at least relay.retry-min-delay"),
        ("relay", r#"shutdown-timeout = "11m""#, "relay.shutdown-timeout", "between 0s and 10m"),
        ("relay", r#"lease-ttl = "100ms""#, "relay.lease-ttl", "between 1s and 10m"),
        ("relay", r#"transactions = "yes""#, "relay.transactions", "invalid type"),
        ("relay", r#"transactional-id-prefix = "a b""#, "relay.transactional-id-prefix", "a-z, A-Z, 0-9"),
        ("relay", "partitions = [0]", "relay.partitions", "unknown field"),
        ("kafka", r#""bootstrap.servers" = """#, "kafka.bootstrap.servers", "required"),
        ("kafka", r#""linger.ms" = [1]"#, "kafka.linger.ms", ""),
        ("admin", r#"listen = "localhost""#, "admin.listen", "invalid"),
        ("admin", r#"sample-interval = "1ms""#, "admin.sample-interval", "between 100ms and 10m"),
        ("admin", r#"enabled = "on""#, "admin.enabled", "invalid type"),
        ("retention", r#"inbox = "1s""#, "retention.inbox", "between 1m and"),
        ("retention", r#"dead-letters = "forever""#, "retention.dead-letters", ""),
        ("retention", r#"dead-letters = "20years""#, "retention.dead-letters", "between 1m and"),
        ("retention", r#"archive = "1h""#, "retention.archive", "between 1day and"),
        ("relay", "archive = 1", "relay.archive", "invalid type"),
    ];
    let named: std::collections::HashSet<&str> = cases.iter().map(|c| c.2).collect();
    let reference: toml::Table = toml::from_str(include_str!("../../reference.toml")).unwrap();
    for (key, value) in &reference {
        let keys: Vec<String> = match value.as_table() {
            Some(table) => table.keys().map(|k| format!("{key}.{k}")).collect(),
            None => vec![key.clone()],
        };
        for key in keys {
            assert!(named.contains(key.as_str()), "no bad-value case for {key}");
        }
    }
    for (section, line, field, allowed) in cases {
        match load_with(section, line) {
            Err(Error::Relay(consign_relay::Error::Config {
                field: named,
                message,
            })) => {
                assert_eq!(named, field, "{line}: {message}");
                assert!(
                    message.contains(allowed),
                    "{line}: {message:?} lacks {allowed:?}"
                );
            }
            other => panic!("{line}: expected an error naming {field}, got {other:?}"),
        }
    }
    load_with("", "").unwrap();
    // 0s is allowed: it leaves the server's statement_timeout.
    let unset = load_with("database", r#"statement-timeout = "0s""#).unwrap();
    assert!(unset.database.statement_timeout.is_zero());
}

#[test]
fn profiles_change_defaults_and_the_file_still_wins() {
    let testing = load_with("", r#"profile = "testing""#).unwrap();
    assert_eq!(testing.relay, RelaySettings::for_profile(Profile::Testing));
    assert!(!testing.admin.enabled);
    let production = load_with("relay", "batch-size = 7").unwrap();
    assert_eq!(production.profile, Profile::Production);
    assert_eq!(production.relay.batch_size, 7);
    assert_eq!(production.relay.lease_ttl, Duration::from_secs(10));
    let dev = load_with("", r#"profile = "development""#).unwrap();
    assert_eq!(dev.database.max_connections, 2);
    assert_eq!(dev.admin.listen.to_string(), "127.0.0.1:9464");
}

#[test]
fn secrets_are_redacted_in_debug_and_printed_config() {
    let mut config = Config::for_profile(Profile::Production);
    config.database.url =
        "postgres://app:pg-secret-1@db:5432/app?sslmode=verify-full&sslpassword=pg-secret-2".into();
    for (key, value) in [
        ("sasl.password", "kafka-secret-1"),
        ("ssl.key.password", "kafka-secret-2"),
        ("sasl.oauthbearer.client.secret", "kafka-secret-3"),
        ("ssl.key.pem", "kafka-secret-4"),
        ("sasl.username", "app"),
    ] {
        config
            .kafka
            .insert(key.into(), KafkaValue::String(value.into()));
    }
    let printed = [
        format!("{config:?}"),
        to_redacted_toml(&config),
        serde_json::to_string(&config.redacted()).unwrap(),
    ];
    for text in printed {
        assert!(!text.contains("secret-"), "{text}");
        assert!(text.contains("sslmode=verify-full"), "{text}");
        assert!(text.contains("\"sasl.username\""), "{text}");
    }
    assert_eq!(
        redact_url("postgres:///db?host=/run/pg"),
        "postgres:///db?host=/run/pg"
    );
    assert_eq!(redact_url("user:pw@host"), REDACTED);
}

#[test]
fn env_keys_map_to_file_keys() {
    assert_eq!(env_key("RELAY.BATCH_SIZE"), "relay.batch-size");
    assert_eq!(env_key("database.url"), "database.url");
    let kafka = kafka_from_env(
        [
            ("CONSIGN_KAFKA__BOOTSTRAP_SERVERS", "h:9092"),
            ("CONSIGN_KAFKA__LINGER_MS", "5"),
            ("CONSIGN_RELAY__BATCH_SIZE", "10"),
            ("OTHER_KAFKA__X", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    assert_eq!(
        kafka.into_iter().collect::<Vec<_>>(),
        [
            ("bootstrap.servers".to_owned(), "h:9092".to_owned()),
            ("linger.ms".to_owned(), "5".to_owned())
        ]
    );
}
