//! W3C trace context of the enqueuing code, captured into the row.

use std::collections::HashMap;

use opentelemetry::{propagation::TextMapPropagator, trace::TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `traceparent` and `tracestate` of the current span (through
/// `tracing-opentelemetry`), or of the current OpenTelemetry context; `None`
/// when neither is part of a trace.
pub(crate) fn current() -> Option<(String, Option<String>)> {
    let mut cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        cx = opentelemetry::Context::current();
    }
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    let traceparent = carrier.remove(crate::headers::TRACEPARENT)?;
    let tracestate = carrier
        .remove(crate::headers::TRACESTATE)
        .filter(|s| !s.is_empty());
    Some((traceparent, tracestate))
}
