//! The relay's metrics, recorded through the [`metrics`] facade.
//!
//! The `consign-relay` binary (crate `consign-cli`) installs a Prometheus
//! recorder (`install_prometheus`, feature `prometheus`) and serves it at
//! `/metrics`; a service embedding
//! the relay installs whatever recorder it uses (without one, recording is a
//! no-op). Backlog gauges are sampled from PostgreSQL every
//! `admin.sample-interval` ([`RelayBuilder::sample_interval`]), so every
//! relay of one outbox reports the same backlog.
//!
//! [`RelayBuilder::sample_interval`]: crate::RelayBuilder::sample_interval

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
#[cfg(feature = "prometheus")]
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rdkafka::error::KafkaError;

/// Rows waiting in the outbox (gauge, sampled).
pub const OUTBOX_PENDING_ROWS: &str = "consign_outbox_pending_rows";
/// Age of the oldest waiting row, 0 when empty (gauge, sampled).
pub const OUTBOX_OLDEST_PENDING_AGE: &str = "consign_outbox_oldest_pending_age_seconds";
/// Waiting rows whose last publish attempt failed (gauge, sampled).
pub const OUTBOX_ROWS_WITH_ERRORS: &str = "consign_outbox_rows_with_errors";
/// Rows acknowledged by the broker and deleted (counter).
pub const PUBLISHED: &str = "consign_relay_published_total";
/// Time from the row's insert (`created_at`, the writer's transaction) to
/// the broker's acknowledgement (histogram). Measured against the relay's
/// clock, so clock skew between database and relay host shows here.
pub const COMMIT_TO_ACK: &str = "consign_relay_commit_to_ack_seconds";
/// Rows read per non-empty batch (histogram).
pub const BATCH_ROWS: &str = "consign_relay_batch_rows";
/// Rows the broker or producer refused, by `kind` (librdkafka's error
/// code in snake case, e.g. `msg_size_too_large`) (counter).
pub const PUBLISH_ERRORS: &str = "consign_relay_publish_errors_total";
/// Batches that failed as a whole (database or broker outage) (counter).
pub const BATCH_ERRORS: &str = "consign_relay_batch_errors_total";
/// Acknowledged rows this relay could not delete because its lease had
/// moved to another relay (counter).
pub const FENCED_ROWS: &str = "consign_relay_fenced_rows_total";
/// Outbox partitions this relay leases (gauge).
pub const PARTITIONS_OWNED: &str = "consign_relay_partitions_owned";
/// 1 for each `partition` this relay leases, 0 for the others (gauge).
pub const PARTITION_OWNED: &str = "consign_relay_partition_owned";
/// 1 when the last check of PostgreSQL succeeded (gauge).
pub const DATABASE_UP: &str = "consign_relay_database_up";
/// 1 when the last check of the Kafka brokers succeeded (gauge).
pub const KAFKA_UP: &str = "consign_relay_kafka_up";

/// Buckets of the latency histograms, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Buckets of the batch size histogram, in rows.
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10_000.0, 100_000.0,
];

/// Describes the relay's metrics to the installed recorder (units and help
/// texts). The `consign-relay` binary calls it after installing its
/// Prometheus recorder; call it after installing yours.
pub fn describe() {
    describe_gauge!(
        OUTBOX_PENDING_ROWS,
        "Rows waiting in the outbox (PostgreSQL: exact up to 100,000; above, the span of their seq numbers)"
    );
    describe_gauge!(
        OUTBOX_OLDEST_PENDING_AGE,
        Unit::Seconds,
        "Age of the oldest row waiting in the outbox"
    );
    describe_gauge!(
        OUTBOX_ROWS_WITH_ERRORS,
        "Outbox rows whose last publish attempt failed"
    );
    describe_counter!(PUBLISHED, "Rows acknowledged by Kafka and deleted");
    describe_histogram!(
        COMMIT_TO_ACK,
        Unit::Seconds,
        "Time from the row's insert to the broker's acknowledgement"
    );
    describe_histogram!(BATCH_ROWS, "Rows read per non-empty batch");
    describe_counter!(PUBLISH_ERRORS, "Rows refused by Kafka, by error kind");
    describe_counter!(BATCH_ERRORS, "Batches that failed as a whole (outages)");
    describe_counter!(
        FENCED_ROWS,
        "Acknowledged rows not deleted because the partition's lease moved"
    );
    describe_gauge!(PARTITIONS_OWNED, "Outbox partitions leased by this relay");
    describe_gauge!(PARTITION_OWNED, "1 if this relay leases the partition");
    describe_gauge!(DATABASE_UP, "1 if the last PostgreSQL check succeeded");
    describe_gauge!(KAFKA_UP, "1 if the last Kafka check succeeded");
}

/// Installs a Prometheus recorder as the global [`metrics`] recorder (with
/// histogram buckets for consign's histograms, the relay's and the inbox's)
/// and describes the relay's metrics. Render with
/// [`PrometheusHandle::render`]. Feature `prometheus`.
///
/// # Errors
/// If a global recorder is already installed.
#[cfg(feature = "prometheus")]
pub fn install_prometheus() -> Result<PrometheusHandle, String> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_ROWS.into()), BATCH_BUCKETS))
        .map_err(|e| e.to_string())?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
    describe();
    Ok(handle)
}

/// librdkafka's error code in snake case (`MessageSizeTooLarge` →
/// `message_size_too_large`), `other` for errors without a code.
pub(crate) fn error_kind(error: &KafkaError) -> String {
    let Some(code) = error.rdkafka_error_code() else {
        return "other".into();
    };
    let mut kind = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                kind.push('_');
            }
            kind.push(c.to_ascii_lowercase());
        } else {
            kind.push(c);
        }
    }
    kind
}

pub(crate) fn publish_error(kind: &str) {
    counter!(PUBLISH_ERRORS, "kind" => kind.to_owned()).increment(1);
}

/// Ownership gauges after the owned set changed.
pub(crate) fn partitions_owned(owned: &[i16]) {
    let count = owned.len();
    gauge!(PARTITIONS_OWNED).set(f64::from(u32::try_from(count).unwrap_or(u32::MAX)));
    for partition in 0..i16::try_from(consign_outbox::PARTITIONS).unwrap_or(i16::MAX) {
        let held = owned.contains(&partition);
        gauge!(PARTITION_OWNED, "partition" => partition.to_string()).set(if held {
            1.0
        } else {
            0.0
        });
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::RDKafkaErrorCode;

    use super::*;

    #[test]
    fn error_kinds_are_snake_case_codes() {
        let error = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(error_kind(&error), "message_size_too_large");
        assert_eq!(error_kind(&KafkaError::Canceled), "other");
    }
}
