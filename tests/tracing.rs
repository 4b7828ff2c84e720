//! One trace from enqueue, through the relay, to the inbox handler. Own test
//! binary: it installs the global tracing subscriber (with
//! `tracing-opentelemetry` and an in-memory exporter).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use consign::{
    Message, Outbox, Relay,
    inbox::{Delivery, InboxLayer},
};
use consign_test_support::{
    TestBroker, TopicReader,
    effects::{self, Running, TestMessage},
    eventually, fast_relay_settings, unique_topic,
};
use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use sqlx::PgPool;
use tower::ServiceBuilder;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::prelude::*;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

#[sqlx::test(migrator = "consign::MIGRATOR")]
async fn one_trace_spans_enqueue_relay_and_handler(pool: PgPool) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("consign-test"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).unwrap();

    effects::create_table(&pool).await.unwrap();
    let broker = TestBroker::start().unwrap();
    let topic = unique_topic("trace");
    broker.create_topic(&topic, 1).await.unwrap();

    // One event enqueued inside the service's request span, one outside.
    let request = tracing::info_span!("place_order");
    let trace_id = request.context().span().span_context().trace_id();
    let request_span_id = request.context().span().span_context().span_id();
    assert_ne!(trace_id, TraceId::INVALID);
    let traced = Message::new(&topic, "Step", TestMessage::step(0, 0).payload).with_key("key-0");
    let untraced = Message::new(&topic, "Step", TestMessage::step(1, 0).payload).with_key("key-1");
    let (traced_id, untraced_id) = (traced.id(), untraced.id());
    async {
        let mut tx = pool.begin().await.unwrap();
        Outbox::new().enqueue(&mut *tx, traced).await.unwrap();
        tx.commit().await.unwrap();
    }
    .instrument(request)
    .await;
    let mut tx = pool.begin().await.unwrap();
    Outbox::new().enqueue(&mut *tx, untraced).await.unwrap();
    tx.commit().await.unwrap();
    let stored: Vec<(Uuid, Option<String>)> =
        sqlx::query_as("SELECT id, traceparent FROM consign_outbox ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    let traceparent = stored[0].1.clone().expect("the enqueue captured the trace");
    assert_eq!(traceparent, format!("00-{trace_id}-{request_span_id}-01"));
    assert_eq!(stored[1], (untraced_id, None));

    // The relay sends it as the traceparent header.
    let relay = Relay::builder(pool.clone())
        .kafka("bootstrap.servers", broker.bootstrap())
        .settings(fast_relay_settings())
        .build()
        .unwrap()
        .spawn();
    let mut reader = TopicReader::new(broker.bootstrap(), &topic).unwrap();
    let received = reader.read_distinct(2, WAIT).await.unwrap();
    let on_kafka = received.iter().find(|m| m.id() == Some(traced_id)).unwrap();
    assert_eq!(on_kafka.header("traceparent"), Some(traceparent.as_str()));

    // The handler runs in the same trace.
    let seen: Arc<Mutex<Vec<(Uuid, TraceId)>>> = Arc::default();
    let inbox = InboxLayer::new(pool.clone(), "trace-test").unwrap();
    let record = Arc::clone(&seen);
    let service =
        ServiceBuilder::new()
            .layer(inbox.clone())
            .service_fn(move |delivery: Delivery| {
                let seen = Arc::clone(&record);
                async move {
                    let cx = tracing::Span::current().context();
                    seen.lock()
                        .unwrap()
                        .push((delivery.id(), cx.span().span_context().trace_id()));
                    effects::record(delivery).await
                }
            });
    let running = Running::start(&inbox, service, broker.bootstrap(), &topic);
    eventually("both messages handled", WAIT, || async {
        Ok((inbox.stats().handled == 2).then_some(()))
    })
    .await
    .unwrap();
    running.stop().await;
    relay.shutdown().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let trace_of = |id| seen.iter().find(|(m, _)| *m == id).unwrap().1;
    assert_eq!(
        trace_of(traced_id),
        trace_id,
        "handler continues the writer's trace"
    );
    assert_ne!(
        trace_of(untraced_id),
        trace_id,
        "an untraced event starts its own trace"
    );

    // The exported handler span is a child of the request span.
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let handle = spans
        .iter()
        .find(|s| s.name == "consign.handle" && s.span_context.trace_id() == trace_id)
        .expect("a consign.handle span in the writer's trace");
    assert_eq!(handle.parent_span_id, request_span_id);
    // One naming scheme, ids as fields (issue 14 item 7): the enqueue is a
    // child of the request, and the relay's batch and produce spans exist.
    let enqueue = spans
        .iter()
        .find(|s| s.name == "consign.enqueue" && s.span_context.trace_id() == trace_id)
        .expect("a consign.enqueue span in the writer's trace");
    assert_eq!(enqueue.parent_span_id, request_span_id);
    assert!(
        enqueue
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "message_id"),
        "{:?}",
        enqueue.attributes
    );
    for name in ["consign.relay.batch", "consign.relay.produce"] {
        assert!(
            spans.iter().any(|s| s.name == name),
            "no {name} span among {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
    }
    println!(
        "trace {trace_id}: place_order → Kafka header → consign.handle ({} spans exported)",
        spans.len()
    );
}
