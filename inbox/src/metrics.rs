//! The inbox's metrics, recorded through the [`metrics`] facade (install a
//! recorder, e.g. `metrics-exporter-prometheus`, to export them; without
//! one, recording is a no-op). Every series has a `consumer` label.

/// Messages by `outcome`: `handled`, `duplicate` or `dead_lettered`
/// (counter).
pub const MESSAGES: &str = "consign_inbox_messages_total";
/// Handler attempts that failed: error, panic or rejection (counter).
pub const FAILED_ATTEMPTS: &str = "consign_inbox_failed_attempts_total";
/// Time spent in the handler per attempt, successful or not (histogram).
pub const HANDLER_SECONDS: &str = "consign_inbox_handler_seconds";

/// Describes the inbox's metrics to the installed recorder.
pub fn describe() {
    metrics::describe_counter!(MESSAGES, "Inbox messages by outcome");
    metrics::describe_counter!(FAILED_ATTEMPTS, "Failed handler attempts");
    metrics::describe_histogram!(
        HANDLER_SECONDS,
        metrics::Unit::Seconds,
        "Time spent in the handler per attempt"
    );
}
