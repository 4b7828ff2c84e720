//! Continuing the writer's trace in the handler's span.

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::Received;

struct Headers<'a>(&'a Received);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header_str(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .headers
            .iter()
            .map(|(name, _)| name.as_str())
            .collect()
    }
}

/// The span a handler attempt runs in: `consign.handle`, a child of the
/// trace in the message's `traceparent`/`tracestate` headers when it has
/// them (with `tracing-opentelemetry` installed), else of the current span.
pub(crate) fn handler_span(
    consumer: &str,
    message: &Received,
    id: Uuid,
    attempt: u32,
) -> tracing::Span {
    let span = tracing::info_span!(
        "consign.handle",
        consumer,
        topic = %message.topic,
        partition = message.partition,
        offset = message.offset,
        message_id = %id,
        attempt,
    );
    let cx = TraceContextPropagator::new().extract(&Headers(message));
    if cx.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed: nothing to
        // continue then.
        let _ = span.set_parent(cx);
    }
    span
}
