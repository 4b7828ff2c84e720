//! What counts as a secret in Kafka client properties, and how refused
//! properties are reported without their secret values. Shared by the
//! relay and the inbox so that no error path prints a password.

/// What replaces a secret in printed configuration and errors.
pub const REDACTED: &str = "REDACTED";

/// Whether a librdkafka property holds a secret: passwords, passphrases,
/// client secrets, private keys in PEM, JAAS and OAUTHBEARER configuration
/// and extensions.
///
/// ```
/// use consign_outbox::secrets::is_secret_kafka_property;
/// assert!(is_secret_kafka_property("sasl.password"));
/// assert!(is_secret_kafka_property("sasl.oauthbearer.assertion.private.key.pem"));
/// assert!(!is_secret_kafka_property("ssl.key.location"));
/// ```
#[must_use]
pub fn is_secret_kafka_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key.contains("passphrase")
        || key.ends_with("key.pem")
        || matches!(
            key.as_str(),
            "sasl.jaas.config" | "sasl.oauthbearer.config" | "sasl.oauthbearer.extensions"
        )
}

/// `properties` as they may be shown: secret values replaced by
/// [`REDACTED`].
///
/// ```
/// use std::collections::BTreeMap;
/// use consign_outbox::secrets::{REDACTED, redacted_properties};
/// let properties = BTreeMap::from([("sasl.password".to_owned(), "hunter2".to_owned())]);
/// assert_eq!(redacted_properties(&properties)["sasl.password"], REDACTED);
/// ```
#[must_use]
pub fn redacted_properties(
    properties: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<&str, &str> {
    properties
        .iter()
        .map(|(key, value)| {
            let shown = if is_secret_kafka_property(key) {
                REDACTED
            } else {
                value.as_str()
            };
            (key.as_str(), shown)
        })
        .collect()
}

/// The message for librdkafka's refusal of `key` = `value` (its
/// `description` usually quotes the value): the value is shown unless the
/// property holds a secret, and then the description omits it too.
///
/// ```
/// use consign_outbox::secrets::refused_property;
/// let message = refused_property(
///     "sasl.password",
///     "hunter2",
///     r#"Invalid value "hunter2" for configuration property "sasl.password""#,
/// );
/// assert!(!message.contains("hunter2"));
/// assert!(message.contains("sasl.password"));
/// ```
#[must_use]
pub fn refused_property(key: &str, value: &str, description: &str) -> String {
    if is_secret_kafka_property(key) {
        let description = if value.is_empty() {
            description.to_owned()
        } else {
            description.replace(value, REDACTED)
        };
        format!("librdkafka refused {key:?} = {REDACTED}: {description}")
    } else {
        format!("librdkafka refused {key:?} = {value:?}: {description}")
    }
}
