//! Tests of trace propagation and metrics across the backends.
//! (Test code only, declared `#[cfg(test)] mod tests;`: its unwrap()/expect() calls are
//! assertions, never a library path.)
#![cfg(test)]

use super::*;

#[test]
fn traceparent_round_trips_and_rejects_invalid_values() {
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let ctx = TraceContext::parse(tp, Some("congo=t61rcWkgMzE")).unwrap();
    assert_eq!(ctx.traceparent(), tp);
    assert!(ctx.sampled());
    assert_eq!(ctx.tracestate(), Some("congo=t61rcWkgMzE"));
    for bad in [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
    ] {
        assert!(TraceContext::parse(bad, None).is_none(), "{bad:?} accepted");
    }
    // A later version may append fields.
    let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what";
    let ctx = TraceContext::parse(future, None).unwrap();
    assert!(!ctx.sampled());
}

#[test]
fn ids_are_distinct_and_never_zero() {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10_000 {
        let ctx = TraceContext::new_root();
        assert_ne!(ctx.trace_id().as_u128(), 0);
        assert!(seen.insert(ctx.span_id()), "span id repeated");
    }
}

#[tokio::test]
async fn outgoing_keeps_an_own_traceparent_continues_the_current_trace_or_stays_silent() {
    let mut event = crate::event::new_event("t", "s", &1).unwrap();
    assert!(outgoing(&mut event, false).is_none());
    assert!(event.extension(TRACEPARENT_EXTENSION).is_none());

    let parent = TraceContext::new_root();
    let ctx = parent
        .clone()
        .scope(async { outgoing(&mut event, false) })
        .await
        .unwrap();
    assert_eq!(ctx.trace_id(), parent.trace_id());
    assert_eq!(ctx.parent_span_id(), Some(parent.span_id()));
    assert_eq!(
        TraceContext::from_event(&event),
        Some(ctx.clone()).map(|c| {
            TraceContext {
                parent_span_id: None,
                ..c
            }
        })
    );

    // The event already has one: kept, even inside another trace.
    let again = TraceContext::new_root()
        .scope(async { outgoing(&mut event, true) })
        .await
        .unwrap();
    assert_eq!(again.trace_id(), parent.trace_id());

    let mut fresh = crate::event::new_event("t", "s", &1).unwrap();
    let root = outgoing(&mut fresh, true).unwrap();
    assert!(root.parent_span_id().is_none());
}

#[test]
fn incoming_makes_the_handler_a_child_of_the_remote_span() {
    let mut event = crate::event::new_event("t", "s", &1).unwrap();
    assert!(incoming(&event.clone().into(), false).is_none());
    let remote = TraceContext::new_root();
    remote.inject(&mut event);
    let local = incoming(&event.clone().into(), false).unwrap();
    assert_eq!(local.trace_id(), remote.trace_id());
    assert_eq!(local.parent_span_id(), Some(remote.span_id()));
    assert_ne!(local.span_id(), remote.span_id());
}

/// A global subscriber that records nothing but keeps every callsite's cached interest at
/// "sometimes", so a thread's own capture (`set_default`) always gets asked.
///
/// Without it, run beside the memory backend's tests (other threads, no subscriber), the
/// span-capture test below saw the `publish` callsite cached as "never" every time, and in
/// about 1 of 10 full `--lib` runs. Suspected cause: tracing-core computes a callsite's
/// interest from the registering thread's own default alone while only one dispatcher is
/// registered, so another thread with none could cache "never" for everybody. With this
/// one registered for good there are always at least two, and every answer counts.
struct KeepInterested;

impl tracing::Subscriber for KeepInterested {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Installs [`KeepInterested`] as the global default once per test process.
fn keep_callsites_interested() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Nothing else in the unit tests sets a global default; if something did, its
        // dispatcher would stay registered for good too, which is all this needs.
        let _ = tracing::subscriber::set_global_default(KeepInterested);
    });
}

/// Polls `cond` (yielding to the runtime in between) until it holds, for at most 5 s.
async fn until(mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("condition not met within 5 s");
}

fn span_of(spans: &capture::SpanCapture, name: &str, event_id: &str) -> capture::CapturedSpan {
    spans
        .spans_named(name)
        .into_iter()
        .find(|s| s.field("event.id") == Some(event_id))
        .unwrap_or_else(|| panic!("no {name} span for event {event_id}"))
}

#[test]
fn a_handlers_span_has_the_publishers_trace_id_on_the_memory_backend() {
    use crate::events::{event_handler_fn, EventConnection, EventHandlers, EventListenOptions};
    use cloudevents::AttributesReader;

    let spans = capture::SpanCapture::new();
    let recorder = capture::MetricsCapture::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    keep_callsites_interested();
    let _tracing = tracing::subscriber::set_default(spans.clone());
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let (event_id, handler_ctx, reply_id) = rt.block_on(async {
        let broker = crate::MemoryBroker::new();
        let events = broker.event_connection(&crate::config::Config::default());
        events.init_stream().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let handlers = EventHandlers::new().on(
            "org.example.traced",
            event_handler_fn(move |_event, responses| {
                let tx = tx.clone();
                async move {
                    let ctx = TraceContext::current();
                    let ack = responses
                        .respond_data("org.example.traced.done", &2)
                        .await?;
                    let _ = ack;
                    tx.send(ctx).await.ok();
                    Ok(())
                }
            }),
        );
        let listener = events
            .listen(handlers, EventListenOptions::default())
            .await
            .unwrap();
        let event = crate::event::new_event("org.example.traced", "test", &1).unwrap();
        let event_id = event.id().to_owned();
        events.publish(event).await.unwrap();
        let handler_ctx = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("handler not called within 5 s")
            .expect("channel closed");
        until(|| {
            spans
                .spans_named("handle_event")
                .iter()
                .any(|s| s.field("outcome") == Some("ack"))
        })
        .await;
        listener.stop(std::time::Duration::from_secs(5)).await;
        let reply_id = spans
            .spans_named("publish")
            .into_iter()
            .find(|s| s.field("event.type") == Some("org.example.traced.done"))
            .and_then(|s| s.field("event.id").map(str::to_owned))
            .expect("no publish span for the response");
        (event_id, handler_ctx, reply_id)
    });

    let publish = span_of(&spans, "publish", &event_id);
    let handle = span_of(&spans, "handle_event", &event_id);
    let trace_id = publish
        .field("trace_id")
        .expect("publish span has a trace id");
    assert_eq!(trace_id.len(), 32);
    assert_eq!(
        handle.field("trace_id"),
        Some(trace_id),
        "handler continues the publisher's trace"
    );
    assert_eq!(handle.field("parent_span_id"), publish.field("span_id"));
    assert_ne!(handle.field("span_id"), publish.field("span_id"));
    assert_eq!(handle.field("event.type"), Some("org.example.traced"));
    assert_eq!(handle.field("outcome"), Some("ack"));
    assert_eq!(publish.field("outcome"), Some("stored"));
    let handler_ctx = handler_ctx.expect("the handler runs in a trace context");
    assert_eq!(handler_ctx.trace_id().to_string(), trace_id);
    assert_eq!(
        Some(handler_ctx.span_id().to_string().as_str()),
        handle.field("span_id")
    );

    // The handler's response continues the trace as a child of the handler's span.
    let response = span_of(&spans, "publish", &reply_id);
    assert_eq!(response.field("trace_id"), Some(trace_id));
    assert_eq!(response.field("parent_span_id"), handle.field("span_id"));

    let by_type = [("type", "org.example.traced")];
    assert_eq!(
        recorder.counter(metric_names::PUBLISHED, &by_type),
        1,
        "{:?}",
        recorder.names()
    );
    assert_eq!(recorder.counter(metric_names::DELIVERED, &by_type), 1);
    assert_eq!(recorder.counter(metric_names::ACKED, &by_type), 1);
    assert_eq!(recorder.counter(metric_names::NACKED, &by_type), 0);
    assert_eq!(
        recorder.histogram_count(
            metric_names::HANDLER_DURATION,
            &[("type", "org.example.traced"), ("kind", "event")]
        ),
        1
    );
    assert_eq!(
        recorder.counter(
            metric_names::PUBLISHED,
            &[("type", "org.example.traced.done")]
        ),
        1
    );
}

#[test]
fn without_a_subscriber_nothing_is_injected() {
    use crate::events::EventConnection;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::new());
    let stored = rt.block_on(async {
        let broker = crate::MemoryBroker::new();
        let events = broker.event_connection(&crate::config::Config::default());
        events.init_stream().await.unwrap();
        let event = crate::event::new_event("org.example.quiet", "test", &1).unwrap();
        events.publish(event).await.unwrap();
        // Inside a trace (a handler's), the context is carried even without a subscriber.
        let parent = TraceContext::new_root();
        let event = crate::event::new_event("org.example.quiet", "test", &2).unwrap();
        parent.clone().scope(events.publish(event)).await.unwrap();
        (broker.stream_messages("CLOUDEVENTS").unwrap(), parent)
    });
    let (messages, parent) = stored;
    assert_eq!(messages.len(), 2);
    let first = crate::codec::decode(Some(&messages[0].headers), &messages[0].payload).unwrap();
    assert!(
        first.extension(TRACEPARENT_EXTENSION).is_none(),
        "nothing injected without a subscriber"
    );
    let second = crate::codec::decode(Some(&messages[1].headers), &messages[1].payload).unwrap();
    let carried = TraceContext::from_event(&second).expect("traceparent carried");
    assert_eq!(carried.trace_id(), parent.trace_id());
    assert_ne!(carried.span_id(), parent.span_id());
}

#[test]
fn publish_all_counts_each_type_and_outcome_and_carries_the_trace_like_publish() {
    use crate::events::EventConnection;

    let recorder = capture::MetricsCapture::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::new());
    let event = |ty: &str, n: u32| crate::event::new_event(ty, "test", &n).unwrap();
    let (messages, parent, own) = rt.block_on(async {
        let broker = crate::MemoryBroker::new();
        let events = broker.event_connection(&crate::config::Config::default());
        events.init_stream().await.unwrap();
        let a1 = event("org.example.a", 1);
        let batch = vec![
            a1.clone(),
            event("org.example.a", 2),
            event("org.example.b", 3),
            a1,
            event("org.example.a", 4),
        ];
        let results = events.publish_all(batch).await;
        let duplicates: Vec<bool> = results
            .iter()
            .map(|r| r.as_ref().unwrap().duplicate)
            .collect();
        assert_eq!(duplicates, vec![false, false, false, true, false]);
        // Inside a trace: every event of the batch continues it, except one that carries
        // its own traceparent.
        let parent = TraceContext::new_root();
        let own = TraceContext::new_root();
        let mut with_own = event("org.example.c", 6);
        own.inject(&mut with_own);
        let batch = vec![event("org.example.c", 5), with_own];
        for result in parent.clone().scope(events.publish_all(batch)).await {
            result.unwrap();
        }
        (broker.stream_messages("CLOUDEVENTS").unwrap(), parent, own)
    });
    let ty = |t: &'static str| [("type", t)];
    assert_eq!(
        recorder.counter(metric_names::PUBLISHED, &ty("org.example.a")),
        3
    );
    assert_eq!(
        recorder.counter(metric_names::DUPLICATES, &ty("org.example.a")),
        1
    );
    assert_eq!(
        recorder.counter(metric_names::PUBLISHED, &ty("org.example.b")),
        1
    );
    assert_eq!(
        recorder.counter(metric_names::DUPLICATES, &ty("org.example.b")),
        0
    );
    assert_eq!(
        recorder.counter(metric_names::PUBLISHED, &ty("org.example.c")),
        2
    );

    let decoded: Vec<crate::ReceivedEvent> = messages
        .iter()
        .map(|m| crate::codec::decode(Some(&m.headers), &m.payload).unwrap())
        .collect();
    assert_eq!(decoded.len(), 6, "the duplicate is stored once");
    for untraced in &decoded[..4] {
        assert!(
            untraced.extension(TRACEPARENT_EXTENSION).is_none(),
            "nothing injected outside a trace without a subscriber ({})",
            untraced.ty()
        );
    }
    let continued = TraceContext::from_event(&decoded[4]).expect("traceparent carried");
    assert_eq!(continued.trace_id(), parent.trace_id());
    assert_ne!(
        continued.span_id(),
        parent.span_id(),
        "a child of the current span"
    );
    assert_eq!(
        TraceContext::from_event(&decoded[5]),
        Some(own),
        "its own is kept"
    );
}

#[test]
fn a_query_handler_and_its_reply_continue_the_requests_trace_on_the_memory_backend() {
    use crate::query::{handler_fn, QueryConnection, QueryHandlers, QueryListenOptions};
    use cloudevents::AttributesReader;

    let spans = capture::SpanCapture::new();
    let recorder = capture::MetricsCapture::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    keep_callsites_interested();
    let _tracing = tracing::subscriber::set_default(spans.clone());
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let (request_id, reply, failed) = rt.block_on(async {
        let broker = crate::MemoryBroker::new();
        let queries = broker.query_connection(&crate::config::Config::default());
        let handlers = QueryHandlers::new()
            .on(
                "org.example.traced.get",
                handler_fn(|_request, reply| async move {
                    reply.reply_data("org.example.traced.got", &7).await?;
                    Ok(())
                }),
            )
            .on(
                "org.example.traced.fail",
                handler_fn(|_request, _reply| async move {
                    Err(crate::handler::HandlerError::new("nope").with_code(409))
                }),
            );
        let listener = queries
            .listen(handlers, QueryListenOptions::default())
            .await
            .unwrap();
        let request = crate::event::new_event("org.example.traced.get", "test", &1).unwrap();
        let request_id = request.id().to_owned();
        let reply = queries.request(request).await.unwrap();
        let failing = crate::event::new_event("org.example.traced.fail", "test", &1).unwrap();
        let failed = queries.request(failing).await.unwrap_err();
        listener.stop(std::time::Duration::from_secs(5)).await;
        (request_id, reply, failed)
    });
    assert_eq!(failed.kind(), crate::error::RequestErrorKind::Remote);

    let request = span_of(&spans, "request", &request_id);
    let handle = span_of(&spans, "handle_query", &request_id);
    let trace_id = request
        .field("trace_id")
        .expect("request span has a trace id");
    assert_eq!(handle.field("trace_id"), Some(trace_id));
    assert_eq!(handle.field("parent_span_id"), request.field("span_id"));
    assert_eq!(handle.field("code"), Some("200"));
    assert_eq!(request.field("outcome"), Some("ok"));
    let reply_ctx = TraceContext::from_event(&reply).expect("the reply carries the trace");
    assert_eq!(reply_ctx.trace_id().to_string(), trace_id);
    let reply_span = span_of(&spans, "reply", reply.id());
    assert_eq!(reply_span.field("code"), Some("200"));

    let get = [("type", "org.example.traced.get")];
    assert_eq!(
        recorder.histogram_count(metric_names::REQUEST_DURATION, &[get[0], ("outcome", "ok")]),
        1,
        "{:?}",
        recorder.names()
    );
    assert_eq!(
        recorder.counter(metric_names::QUERIES_HANDLED, &[get[0], ("code", "200")]),
        1
    );
    assert_eq!(
        recorder.histogram_count(metric_names::HANDLER_DURATION, &[get[0], ("kind", "query")]),
        1
    );
    let fail = ("type", "org.example.traced.fail");
    assert_eq!(
        recorder.counter(metric_names::QUERIES_HANDLED, &[fail, ("code", "409")]),
        1
    );
    assert_eq!(
        recorder.histogram_count(
            metric_names::REQUEST_DURATION,
            &[fail, ("outcome", "remote-error")]
        ),
        1
    );
}
