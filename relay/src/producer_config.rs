//! The Kafka producer's configuration: consign's defaults, the properties
//! that guard its guarantees, and librdkafka's own checks.

use std::collections::BTreeMap;

use rdkafka::{ClientConfig, error::KafkaError};

use crate::{Error, Result};

/// Producer properties consign sets unless the user overrides them.
///
/// Idempotence (which implies `acks=all` and bounded in-flight requests)
/// keeps per-partition order across retries; the gapless guarantee stops the
/// producer when the broker refuses a message, instead of letting a later
/// message of its partition (a later event of its key) through (it is left
/// out when the user turns idempotence off, which it requires); murmur2
/// places keys where the Java client would; short linger and reconnect
/// backoff keep latency low; a bounded message timeout turns long outages
/// into visible row errors.
pub const PRODUCER_DEFAULTS: [(&str, &str); 8] = [
    ("enable.idempotence", "true"),
    ("enable.gapless.guarantee", "true"),
    ("acks", "all"),
    ("partitioner", "murmur2_random"),
    ("linger.ms", "1"),
    ("message.timeout.ms", "30000"),
    ("reconnect.backoff.max.ms", "1000"),
    ("client.id", "consign-relay"),
];

/// Properties that weaken the relay's guarantees when changed.
const GUARANTEES: [(&str, &[&str]); 3] = [
    ("enable.idempotence", &["true"]),
    ("enable.gapless.guarantee", &["true"]),
    ("acks", &["all", "-1"]),
];

pub(crate) fn producer_config(user: &BTreeMap<String, String>) -> Result<ClientConfig> {
    if user
        .get("bootstrap.servers")
        .is_none_or(|s| s.trim().is_empty())
    {
        return Err(Error::config(
            "kafka.bootstrap.servers",
            "required: the brokers to connect to, e.g. \"localhost:9092\"",
        ));
    }
    match user.get("partitioner").map(String::as_str) {
        Some("random") => {
            return Err(Error::config(
                "kafka.partitioner",
                "\"random\" spreads a key's events over partitions, which breaks per-key order; \
                 keep the default murmur2_random (Java's partitioner) or another key-hashing one",
            ));
        }
        Some(other) if other != "murmur2_random" => tracing::warn!(
            property = "partitioner",
            value = other,
            "a partitioner other than murmur2_random (Java clients' default) sends keys to other \
             partitions than other producers of the topic do, and changing it on a live topic \
             lets a key's events written before and after the change be read out of order"
        ),
        _ => {}
    }
    for (key, safe) in GUARANTEES {
        if let Some(value) = user.get(key).filter(|v| !safe.contains(&v.as_str())) {
            tracing::warn!(
                property = key,
                value = %value,
                "this producer setting weakens consign's ordering and no-loss guarantees"
            );
        }
    }
    let mut config = ClientConfig::new();
    let idempotence_off = user.get("enable.idempotence").is_some_and(|v| v != "true");
    for (key, value) in PRODUCER_DEFAULTS {
        // librdkafka refuses to create a producer with the gapless
        // guarantee but without idempotence.
        if !(idempotence_off && key == "enable.gapless.guarantee") {
            config.set(key, value);
        }
    }
    for (key, value) in user {
        config.set(key, value);
    }
    Ok(config)
}

/// Checks the `[kafka]` producer properties as the relay would use them:
/// `bootstrap.servers` given, and every property accepted by librdkafka
/// (known name, valid value, supported by this build), without creating a
/// client or connecting.
///
/// # Errors
/// [`Error::Config`] naming the refused property (secret values redacted).
pub fn check_kafka_config(kafka: &BTreeMap<String, String>) -> Result<()> {
    producer_config(kafka)?
        .create_native_config()
        .map(drop)
        .map_err(kafka_config_error)
}

/// librdkafka's refusal of a property, naming it; the value is shown unless
/// the property holds a secret (its description then omits it too).
pub(crate) fn kafka_config_error(error: KafkaError) -> Error {
    match error {
        KafkaError::ClientConfig(_, description, key, value) => Error::config(
            format!("kafka.{key}"),
            consign_outbox::secrets::refused_property(&key, &value, &description),
        ),
        other => Error::Kafka(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::REDACTED;

    fn refused(key: &str, value: &str) -> String {
        kafka_config_error(KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            format!("Invalid value \"{value}\" for configuration property \"{key}\""),
            key.to_owned(),
            value.to_owned(),
        ))
        .to_string()
    }

    #[test]
    fn refused_secret_properties_are_redacted_in_the_error() {
        for key in [
            "ssl.key.password",
            "sasl.password",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
            "sasl.oauthbearer.config",
        ] {
            let message = refused(key, "hunter2");
            assert!(!message.contains("hunter2"), "{message}");
            assert!(
                message.contains(key) && message.contains(REDACTED),
                "{message}"
            );
        }
        let message = refused("compression.type", "brotli");
        assert!(message.contains("\"brotli\""), "{message}");
    }

    #[test]
    fn config_check_refuses_what_librdkafka_refuses_without_connecting() {
        let kafka = |extra: (&str, &str)| {
            BTreeMap::from([
                (
                    "bootstrap.servers".to_owned(),
                    "10.255.255.1:9092".to_owned(),
                ),
                (extra.0.to_owned(), extra.1.to_owned()),
            ])
        };
        assert!(check_kafka_config(&kafka(("linger.ms", "5"))).is_ok());
        let error = check_kafka_config(&kafka(("compression.type", "brotli"))).unwrap_err();
        assert!(
            error.to_string().contains("kafka.compression.type"),
            "{error}"
        );
        let error = check_kafka_config(&kafka(("partitioner", "random"))).unwrap_err();
        assert!(
            error.to_string().contains("kafka.partitioner") && error.to_string().contains("order"),
            "{error}"
        );
        assert!(check_kafka_config(&kafka(("partitioner", "consistent_random"))).is_ok());
        let error = check_kafka_config(&kafka(("no.such.property", "1"))).unwrap_err();
        assert!(
            error.to_string().contains("kafka.no.such.property"),
            "{error}"
        );
    }

    /// librdkafka is built with OpenSSL, SCRAM and OAUTHBEARER's OIDC
    /// method (libcurl): each of these is refused by a build without it
    /// ("not supported in this build").
    #[test]
    fn the_build_has_tls_scram_and_oidc() {
        for (key, value) in [
            ("security.protocol", "sasl_ssl"),
            ("ssl.endpoint.identification.algorithm", "https"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.mechanisms", "OAUTHBEARER"),
            ("sasl.oauthbearer.method", "oidc"),
        ] {
            let kafka = BTreeMap::from([
                ("bootstrap.servers".to_owned(), "localhost:9093".to_owned()),
                (key.to_owned(), value.to_owned()),
            ]);
            if let Err(error) = check_kafka_config(&kafka) {
                panic!("{key} = {value}: {error}");
            }
        }
    }
}
