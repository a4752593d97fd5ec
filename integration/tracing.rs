//! Observability against real nats-server processes: W3C trace context crossing a JetStream
//! publish -> handler hop between two services (both content modes) and a core NATS
//! request -> handler -> reply hop, and the metrics of acked, nak'ed and dead-lettered events.
//!
//! Spans are captured by a small subscriber and metrics by a small recorder
//! (`integration/capture.rs`), both installed for this test's thread only; the tests run on
//! a current-thread runtime so the client's and the listeners' tasks report to them too.
//! Every wait has a timeout; no sleep is used to synchronise.

mod capture;
use ce_messaging_test_support as support;

use std::time::Duration;

use capture::{CapturedSpan, MetricsCapture, SpanCapture};
use ce_messaging::cloudevents::AttributesReader;
use ce_messaging::codec::ContentMode;
use ce_messaging::config::Config;
use ce_messaging::event::new_event;
use ce_messaging::events::{event_handler_fn, EventConnection, EventHandlers, EventListenOptions};
use ce_messaging::handler::HandlerError;
use ce_messaging::jetstream::JetStreamEvents;
use ce_messaging::nats::NatsQueries;
use ce_messaging::query::{handler_fn, QueryConnection, QueryHandlers, QueryListenOptions};
use ce_messaging::telemetry::{metric_names, TraceContext};
use support::server::NatsServer;

const WAIT: Duration = Duration::from_secs(20);

fn config_for(server: &NatsServer, client_id: &str, mode: ContentMode) -> Config {
    Config {
        nats_url: server.url(),
        client_id: client_id.to_owned(),
        ce_mode: mode,
        ..Default::default()
    }
}

async fn events_of(server: &NatsServer, config: &Config) -> JetStreamEvents {
    JetStreamEvents::from_client(support::connect(&server.url()).await, config)
}

fn span_of(spans: &SpanCapture, name: &str, event_id: &str) -> CapturedSpan {
    spans
        .spans_named(name)
        .into_iter()
        .find(|s| s.field("event.id") == Some(event_id))
        .unwrap_or_else(|| panic!("no {name} span for event {event_id}"))
}

async fn trace_crosses_a_jetstream_hop(mode: ContentMode) {
    let spans = SpanCapture::new();
    let _tracing = tracing::subscriber::set_default(spans.clone());
    let server = NatsServer::start();
    let publisher = events_of(&server, &config_for(&server, "orders", mode)).await;
    let handler_side = events_of(&server, &config_for(&server, "billing", mode)).await;
    tokio::time::timeout(WAIT, publisher.init_stream())
        .await
        .expect("init_stream timed out")
        .expect("init_stream");
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let handlers = EventHandlers::new().on(
        "org.example.order.created",
        event_handler_fn(move |event, _| {
            let tx = tx.clone();
            async move {
                tx.send((event, TraceContext::current())).await.ok();
                Ok(())
            }
        }),
    );
    let listener = tokio::time::timeout(
        WAIT,
        handler_side.listen(handlers, EventListenOptions::default()),
    )
    .await
    .expect("listen timed out")
    .expect("listen");

    let event = new_event("org.example.order.created", "orders", &1).unwrap();
    let event_id = event.id().to_owned();
    tokio::time::timeout(WAIT, publisher.publish(event))
        .await
        .expect("publish timed out")
        .expect("publish");
    let (received, handler_ctx) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("handler not called in time")
        .expect("channel closed");
    support::eventually(WAIT, || async {
        span_of(&spans, "handle_event", &event_id).field("outcome") == Some("ack")
    })
    .await;
    listener.stop(WAIT).await;

    let publish = span_of(&spans, "publish", &event_id);
    let handle = span_of(&spans, "handle_event", &event_id);
    let trace_id = publish
        .field("trace_id")
        .expect("the publish span has a trace id");
    assert_eq!(
        handle.field("trace_id"),
        Some(trace_id),
        "the handler's span has the publisher's trace id ({mode:?})"
    );
    assert_eq!(handle.field("parent_span_id"), publish.field("span_id"));
    assert_eq!(publish.field("outcome"), Some("stored"));
    // What travelled: the event's traceparent names the publisher's span.
    let carried = TraceContext::from_event(&received).expect("traceparent on the wire");
    assert_eq!(carried.trace_id().to_string(), trace_id);
    assert_eq!(
        Some(carried.span_id().to_string().as_str()),
        publish.field("span_id")
    );
    let handler_ctx = handler_ctx.expect("the handler runs in the trace");
    assert_eq!(handler_ctx.trace_id().to_string(), trace_id);
}

#[tokio::test]
async fn trace_context_crosses_a_jetstream_publish_to_handler_hop_structured() {
    trace_crosses_a_jetstream_hop(ContentMode::Structured).await;
}

#[tokio::test]
async fn trace_context_crosses_a_jetstream_publish_to_handler_hop_binary() {
    trace_crosses_a_jetstream_hop(ContentMode::Binary).await;
}

#[tokio::test]
async fn trace_context_crosses_a_core_nats_request_and_its_reply() {
    let spans = SpanCapture::new();
    let _tracing = tracing::subscriber::set_default(spans.clone());
    let server = NatsServer::start();
    let mode = ContentMode::Structured;
    let client = NatsQueries::from_client(
        support::connect(&server.url()).await,
        &config_for(&server, "client", mode),
    );
    let service = NatsQueries::from_client(
        support::connect(&server.url()).await,
        &config_for(&server, "service", mode),
    );
    let handlers = QueryHandlers::new().on(
        "org.example.quote.get",
        handler_fn(|_request, reply| async move {
            reply.reply_data("org.example.quote.given", &42).await?;
            Ok(())
        }),
    );
    let listener = tokio::time::timeout(
        WAIT,
        service.listen(handlers, QueryListenOptions::default()),
    )
    .await
    .expect("listen timed out")
    .expect("listen");
    let request = new_event("org.example.quote.get", "client", &1).unwrap();
    let request_id = request.id().to_owned();
    let reply = client
        .request_with_timeout(request, WAIT)
        .await
        .expect("request");
    support::eventually(WAIT, || async {
        span_of(&spans, "handle_query", &request_id).field("code") == Some("200")
    })
    .await;
    listener.stop(WAIT).await;

    let sent = span_of(&spans, "request", &request_id);
    let handled = span_of(&spans, "handle_query", &request_id);
    let trace_id = sent
        .field("trace_id")
        .expect("the request span has a trace id");
    assert_eq!(handled.field("trace_id"), Some(trace_id));
    assert_eq!(handled.field("parent_span_id"), sent.field("span_id"));
    assert_eq!(sent.field("outcome"), Some("ok"));
    let reply_ctx = TraceContext::from_event(&reply).expect("the reply carries the trace");
    assert_eq!(reply_ctx.trace_id().to_string(), trace_id);
    // The reply is the next hop after the handler: same trace, the handler's span as parent.
    let reply_span = span_of(&spans, "reply", reply.id());
    assert_eq!(reply_span.field("trace_id"), Some(trace_id));
    assert_eq!(
        reply_span.field("span_id"),
        Some(reply_ctx.span_id().to_string().as_str())
    );
    assert_eq!(reply_span.field("parent_span_id"), handled.field("span_id"));
    assert_eq!(reply_span.field("code"), Some("200"));
}

#[tokio::test]
async fn acked_nacked_and_dead_lettered_events_are_counted_by_type() {
    let recorder = MetricsCapture::new();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let server = NatsServer::start();
    let config = Config {
        js_max_deliver: 2,
        ..config_for(&server, "counted", ContentMode::Structured)
    };
    let events = events_of(&server, &config).await;
    tokio::time::timeout(WAIT, events.init_stream())
        .await
        .expect("init_stream timed out")
        .expect("init_stream");
    let handlers = EventHandlers::new()
        .on("org.example.ok", event_handler_fn(|_, _| async { Ok(()) }))
        .on(
            "org.example.flaky",
            event_handler_fn(|_, _| async {
                Err(HandlerError::new("try again").retry_after(Duration::from_millis(10)))
            }),
        )
        .on(
            "org.example.bad",
            event_handler_fn(|_, _| async { Err(HandlerError::permanent("never")) }),
        );
    let listener =
        tokio::time::timeout(WAIT, events.listen(handlers, EventListenOptions::default()))
            .await
            .expect("listen timed out")
            .expect("listen");
    for ty in ["org.example.ok", "org.example.flaky", "org.example.bad"] {
        let event = new_event(ty, "counted", &1).unwrap();
        tokio::time::timeout(WAIT, events.publish(event.clone()))
            .await
            .expect("publish timed out")
            .expect("publish");
        if ty == "org.example.ok" {
            let again = tokio::time::timeout(WAIT, events.publish(event))
                .await
                .expect("publish timed out")
                .expect("publish");
            assert!(again.duplicate);
        }
    }
    let dead = |ty: &str, reason: &str| {
        recorder.counter(
            metric_names::DEAD_LETTERED,
            &[("type", ty), ("reason", reason)],
        )
    };
    support::eventually(WAIT, || async {
        recorder.counter(metric_names::ACKED, &[("type", "org.example.ok")]) == 1
            && dead("org.example.bad", "rejected") == 1
            && dead("org.example.flaky", "max-deliveries") == 1
    })
    .await;
    listener.stop(WAIT).await;

    let ty = |t: &'static str| [("type", t)];
    assert_eq!(
        recorder.counter(metric_names::PUBLISHED, &ty("org.example.ok")),
        1
    );
    assert_eq!(
        recorder.counter(metric_names::DUPLICATES, &ty("org.example.ok")),
        1
    );
    assert_eq!(
        recorder.counter(metric_names::DELIVERED, &ty("org.example.ok")),
        1
    );
    // max deliver 2: the first delivery is nak'ed, the second dead-lettered.
    assert_eq!(
        recorder.counter(metric_names::DELIVERED, &ty("org.example.flaky")),
        2
    );
    assert_eq!(
        recorder.counter(metric_names::NACKED, &ty("org.example.flaky")),
        1
    );
    assert_eq!(
        recorder.counter(metric_names::ACKED, &ty("org.example.flaky")),
        0
    );
    assert_eq!(
        recorder.counter(metric_names::ACKED, &ty("org.example.bad")),
        0
    );
    assert_eq!(
        recorder.histogram_count(
            metric_names::HANDLER_DURATION,
            &[("type", "org.example.flaky"), ("kind", "event")]
        ),
        2
    );
}
