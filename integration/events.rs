//! `JetStreamEvents` against real nats-server processes: persisted publish (de-duplication,
//! retry across a paused and a restarted server, size limit, missing stream), durable
//! listeners (exactly-once handling in both content modes, services and instances, retries,
//! dead letters, undecodable messages, crash and graceful stop, connection closed),
//! request/response promises and the EventSource.
//!
//! Every wait has a timeout; no sleep is used to synchronise.

use ce_messaging_test_support as support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use ce_messaging::cloudevents::AttributesReader;
use ce_messaging::codec::ContentMode;
use ce_messaging::config::Config;
use ce_messaging::error::{ListenErrorKind, PublishErrorKind, ResponseErrorKind};
use ce_messaging::event::{new_event, new_event_auto_source, EventExt, EventType, TransactionId};
use ce_messaging::event_source::EventFilter;
use ce_messaging::events::{
    event_handler_fn, Backoff, EventConnection, EventHandlers, EventListenOptions,
};
use ce_messaging::handler::HandlerError;
use ce_messaging::jetstream::{original_msg_id, JetStreamEvents, PublishRetry};
use ce_messaging::listener::Listener;
use ce_messaging::{Event, ReceivedEvent};
use support::server::{NatsServer, ServerOptions};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const TYPE_A: &str = "org.example.order.created";
const TYPE_B: &str = "org.example.order.shipped";

fn config_for(server: &NatsServer, client_id: &str) -> Config {
    Config {
        nats_url: server.url(),
        client_id: client_id.to_owned(),
        ..Default::default()
    }
}

async fn connection(server: &NatsServer, config: &Config) -> JetStreamEvents {
    let client = support::connect(&server.url()).await;
    JetStreamEvents::from_client(client, config)
}

/// A server with both streams created, and a connection to it.
async fn ready(client_id: &str) -> (NatsServer, Config, JetStreamEvents) {
    let server = NatsServer::start();
    let config = config_for(&server, client_id);
    let events = connection(&server, &config).await;
    tokio::time::timeout(WAIT, events.init_stream())
        .await
        .expect("init_stream timed out")
        .expect("init_stream");
    (server, config, events)
}

async fn raw_js(server: &NatsServer) -> jetstream::Context {
    jetstream::new(support::connect(&server.url()).await)
}

async fn stream_messages(js: &jetstream::Context, stream: &str) -> u64 {
    let mut stream = js.get_stream(stream).await.expect("get stream");
    stream.info().await.expect("stream info").state.messages
}

/// Every message of a stream, in order (headers and payload as stored).
async fn stream_contents(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<jetstream::message::StreamMessage> {
    let s = js.get_stream(stream).await.expect("get stream");
    let last = s.get_info().await.expect("info").state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}

async fn publish_ok(events: &JetStreamEvents, event: Event) -> ce_messaging::events::PublishAck {
    tokio::time::timeout(WAIT, events.publish(event))
        .await
        .expect("publish timed out")
        .expect("publish")
}

async fn listen(
    events: &JetStreamEvents,
    handlers: EventHandlers,
    options: EventListenOptions,
) -> Listener {
    tokio::time::timeout(WAIT, events.listen(handlers, options))
        .await
        .expect("listen timed out")
        .expect("listen")
}

async fn stop(listener: &Listener, grace: Duration) -> ce_messaging::listener::StopReport {
    tokio::time::timeout(WAIT, listener.stop(grace))
        .await
        .expect("stop timed out")
}

fn fast_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
    }
}

/// Collects handled events by id (counting duplicates).
#[derive(Clone, Default)]
struct Seen {
    by_id: Arc<Mutex<HashMap<String, (usize, Event)>>>,
    calls: Arc<AtomicUsize>,
}

impl Seen {
    fn record(&self, event: &Event) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut map = self.by_id.lock().unwrap();
        map.entry(event.id().to_owned())
            .and_modify(|(n, _)| *n += 1)
            .or_insert((1, event.clone()));
    }
    fn distinct(&self) -> usize {
        self.by_id.lock().unwrap().len()
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn ids(&self) -> HashSet<String> {
        self.by_id.lock().unwrap().keys().cloned().collect()
    }
    fn handlers(&self, types: &[&str]) -> EventHandlers {
        let mut handlers = EventHandlers::new();
        for t in types {
            let seen = self.clone();
            handlers = handlers.on(
                *t,
                event_handler_fn(move |event, _responses| {
                    let seen = seen.clone();
                    async move {
                        seen.record(&event);
                        Ok(())
                    }
                }),
            );
        }
        handlers
    }
}

// ---------------------------------------------------------------------------------------------
// Publish
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ten_thousand_events_in_both_modes_are_each_handled_exactly_once_intact() {
    let (server, config, structured) = ready("bulk").await;
    let binary_config = Config {
        ce_mode: ContentMode::Binary,
        client_id: "bulk-binary".into(),
        ..config.clone()
    };
    let binary = connection(&server, &binary_config).await;
    let seen = Seen::default();
    let listener = listen(
        &structured,
        seen.handlers(&[TYPE_A]),
        EventListenOptions {
            durable_name: Some("bulk".into()),
            ..Default::default()
        },
    )
    .await;

    let mut sent = HashMap::new();
    for (conn, mode) in [(&structured, "structured"), (&binary, "binary")] {
        let batch: Vec<Event> = (0..5_000)
            .map(|i| {
                new_event_auto_source(
                    TYPE_A,
                    &serde_json::json!({"n": i, "mode": mode, "text": "é \"quoted\" 100%"}),
                )
                .unwrap()
            })
            .collect();
        let results =
            tokio::time::timeout(Duration::from_secs(60), conn.publish_all(batch.clone()))
                .await
                .expect("publish_all timed out");
        for (event, result) in batch.into_iter().zip(results) {
            let ack = result.expect("publish");
            assert!(!ack.duplicate);
            sent.insert(event.id().to_owned(), (event, mode));
        }
    }
    assert_eq!(sent.len(), 10_000);
    support::eventually(Duration::from_secs(90), || async {
        seen.distinct() >= 10_000
    })
    .await;
    let report = stop(&listener, Duration::from_secs(5)).await;
    assert_eq!(seen.calls(), 10_000, "every event handled exactly once");
    assert_eq!(report.handled_total, 10_000);

    let map = seen.by_id.lock().unwrap();
    for (id, (sent_event, mode)) in &sent {
        let (count, got) = map.get(id).unwrap_or_else(|| panic!("{id} not handled"));
        assert_eq!(*count, 1);
        let source = if *mode == "binary" {
            "bulk-binary"
        } else {
            "bulk"
        };
        assert_eq!(got.source(), source, "auto source populated");
        assert_eq!(got.ty(), sent_event.ty());
        assert_eq!(got.time(), sent_event.time());
        assert_eq!(got.datacontenttype(), sent_event.datacontenttype());
        assert_eq!(got.transaction_id(), sent_event.transaction_id());
        assert!(got.transaction_id().is_some());
        assert_eq!(
            got.data_as::<serde_json::Value>().unwrap(),
            sent_event.data_as::<serde_json::Value>().unwrap()
        );
    }
}

#[tokio::test]
async fn the_same_event_twice_within_the_window_is_stored_once() {
    let (server, config, events) = ready("dup").await;
    let event = new_event_auto_source(TYPE_A, &1).unwrap();
    let first = publish_ok(&events, event.clone()).await;
    let second = publish_ok(&events, event).await;
    assert!(!first.duplicate);
    assert!(second.duplicate, "second publish reported as duplicate");
    assert_eq!(first.sequence, second.sequence);
    assert_eq!(first.stream, config.js_stream);
    assert_eq!(
        stream_messages(&raw_js(&server).await, &config.js_stream).await,
        1
    );
}

/// The server stops answering mid-publish (SIGSTOP): the first attempt's ack never comes, the
/// retry re-sends the same id; when the server resumes it stores the first copy and reports
/// the retry as a duplicate. Stored once.
#[tokio::test]
async fn a_publish_whose_ack_is_lost_is_retried_with_the_same_id_and_stored_once() {
    let (server, config, events) = ready("retry").await;
    let client = support::connect(&server.url()).await;
    let events_retrying =
        JetStreamEvents::from_client(client.clone(), &config).with_publish_retry(PublishRetry {
            attempt_timeout: Duration::from_millis(300),
            total: Some(Duration::from_secs(20)),
            pause: Duration::from_millis(50),
        });
    let stats = client.statistics();
    let before = stats.out_messages.load(Ordering::Relaxed);
    server.pause();
    let event = new_event_auto_source(TYPE_A, &"paused").unwrap();
    let publishing = tokio::spawn({
        let events = events_retrying.clone();
        async move { events.publish(event).await }
    });
    // At least two copies of the publish left the client: the first attempt and a retry.
    support::eventually(WAIT, || async {
        stats.out_messages.load(Ordering::Relaxed) >= before + 2
    })
    .await;
    server.resume();
    let ack = tokio::time::timeout(WAIT, publishing)
        .await
        .expect("publish timed out")
        .unwrap()
        .expect("publish after resume");
    assert!(
        ack.duplicate,
        "the retry was answered as a duplicate: {ack:?}"
    );
    assert_eq!(
        stream_messages(&raw_js(&server).await, &config.js_stream).await,
        1
    );
    drop(events);
}

/// The connection drops mid-publish (server killed, then restarted on the same store): every
/// publish completes, and each event is stored exactly once.
#[tokio::test]
async fn publishes_survive_a_dropped_connection_without_double_storing() {
    let (server, config, _) = ready("drop").await;
    let client = support::connect(&server.url()).await;
    let events = JetStreamEvents::from_client(client, &config).with_publish_retry(PublishRetry {
        attempt_timeout: Duration::from_millis(500),
        total: Some(Duration::from_secs(30)),
        pause: Duration::from_millis(50),
    });
    let acked = Arc::new(AtomicUsize::new(0));
    const N: usize = 300;
    let publishing = tokio::spawn({
        let (events, acked) = (events.clone(), acked.clone());
        async move {
            let mut ids = Vec::new();
            for i in 0..N {
                let event = new_event_auto_source(TYPE_A, &i).unwrap();
                ids.push(event.id().to_owned());
                events
                    .publish(event)
                    .await
                    .expect("publish across the restart");
                acked.fetch_add(1, Ordering::SeqCst);
            }
            ids
        }
    });
    support::eventually(WAIT, || async { acked.load(Ordering::SeqCst) >= 20 }).await;
    server.kill();
    server.restart();
    let ids = tokio::time::timeout(Duration::from_secs(60), publishing)
        .await
        .expect("publishing timed out")
        .unwrap();
    let js = raw_js(&server).await;
    let stored = stream_contents(&js, &config.js_stream).await;
    let stored_ids: Vec<String> = stored
        .iter()
        .map(|m| m.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned())
        .collect();
    let distinct: HashSet<&String> = stored_ids.iter().collect();
    assert_eq!(stored_ids.len(), N, "stored exactly once each");
    assert_eq!(distinct.len(), N);
    assert!(ids.iter().all(|id| distinct.contains(id)));
}

/// Issue 15: a publish while the client is disconnected (server stopped) says so: kind
/// `Disconnected` with how long the connection has been down, within the publish's bounded
/// time, and the event handed back. After the server is back the client reconnects by itself,
/// publishing works, and publishing the handed-back event again is safe. Accounting: a listener
/// handles every stored event exactly once, the consumer settles, nothing is dead-lettered.
#[tokio::test]
async fn a_publish_during_an_outage_reports_the_disconnection_and_works_after_it() {
    let (server, config, _) = ready("outage").await;
    let config = Config {
        events_timeout: Duration::from_secs(3),
        ..config
    };
    let client = support::connect(&server.url()).await;
    let events = JetStreamEvents::from_client(client.clone(), &config);
    let before = new_event_auto_source(TYPE_A, &"before").unwrap();
    publish_ok(&events, before.clone()).await;

    server.kill();
    support::eventually(WAIT, || async {
        client.connection_state() != async_nats::connection::State::Connected
    })
    .await;
    let during = new_event_auto_source(TYPE_A, &"during").unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(WAIT, events.publish(during.clone()))
        .await
        .expect("a publish during the outage must end within its bounded time")
        .expect_err("no server to store the event");
    let took = started.elapsed();
    eprintln!("a publish during the outage ended after {took:?}: {err}");
    assert_eq!(err.kind(), PublishErrorKind::Disconnected, "{err}");
    let detail = err.error().detail_text().unwrap_or_default().to_owned();
    assert!(
        detail.contains("not connected") && detail.contains(during.id()),
        "the detail says the connection is down and names the event: {detail}"
    );
    assert!(
        took <= config.events_timeout + Duration::from_secs(1),
        "took {took:?}, the budget is {:?}",
        config.events_timeout
    );
    let back = err.into_event().expect("the event is handed back");
    assert_eq!(back.id(), during.id());

    server.restart();
    let after = new_event_auto_source(TYPE_A, &"after").unwrap();
    publish_ok(&events, after.clone()).await;
    publish_ok(&events, back).await;

    let seen = Seen::default();
    let listener = listen(
        &events,
        seen.handlers(&[TYPE_A]),
        EventListenOptions {
            durable_name: Some("outage".into()),
            ..Default::default()
        },
    )
    .await;
    let expected: HashSet<String> = [&before, &during, &after]
        .iter()
        .map(|e| e.id().to_owned())
        .collect();
    support::eventually(WAIT, || async { seen.ids() == expected }).await;
    let js = raw_js(&server).await;
    support::eventually(WAIT, || async {
        let mut c: jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream("outage", &config.js_stream)
            .await
            .unwrap();
        let info = c.info().await.unwrap();
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
    stop(&listener, Duration::from_secs(5)).await;
    assert_eq!(
        stream_messages(&js, &config.js_stream).await,
        3,
        "each stored once"
    );
    assert_eq!(seen.calls(), 3, "each handled once");
    assert_eq!(
        stream_messages(&js, &config.js_dlq_stream).await,
        0,
        "no dead letter"
    );
}

/// The configuration's largest durations and counts (issue 15) are ones the server accepts:
/// a stream with a one-day duplicate window, and a consumer with a one-day ack wait (the
/// largest max deliver is the library's to enforce: the consumer has none).
#[tokio::test]
async fn the_largest_configured_values_are_accepted_by_the_server() {
    let server = NatsServer::start();
    let config = Config::from_vars([
        ("NATS_URL".to_string(), server.url()),
        ("NATS_CLIENT_ID".to_string(), "bounds".to_string()),
        ("NATS_JS_ACK_WAIT".to_string(), "86400".to_string()),
        ("NATS_JS_DUPLICATE_WINDOW".to_string(), "86400".to_string()),
        ("NATS_JS_MAX_DELIVER".to_string(), "1000000".to_string()),
    ])
    .expect("the bounds are valid configuration");
    let events = connection(&server, &config).await;
    tokio::time::timeout(WAIT, events.init_stream())
        .await
        .expect("init_stream timed out")
        .expect("the server accepts a one-day duplicate window");
    let seen = Seen::default();
    let listener = listen(
        &events,
        seen.handlers(&[TYPE_A]),
        EventListenOptions::default(),
    )
    .await;
    let js = raw_js(&server).await;
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("bounds", &config.js_stream)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_secs(86_400));
    assert_eq!(
        info.config.max_deliver, -1,
        "the library enforces NATS_JS_MAX_DELIVER; the consumer has no server limit"
    );
    let mut stream = js.get_stream(&config.js_stream).await.unwrap();
    let stream_info = stream.info().await.unwrap();
    assert_eq!(
        stream_info.config.duplicate_window,
        Duration::from_secs(86_400)
    );
    let e = new_event_auto_source(TYPE_A, &1).unwrap();
    publish_ok(&events, e.clone()).await;
    support::eventually(WAIT, || async { seen.ids().contains(e.id()) }).await;
    stop(&listener, Duration::from_secs(5)).await;
    assert_eq!(stream_messages(&js, &config.js_dlq_stream).await, 0);
}

#[tokio::test]
async fn an_event_larger_than_max_payload_is_refused_before_sending() {
    let server = NatsServer::start_with(ServerOptions {
        extra_config: "max_payload: 4096".into(),
        ..Default::default()
    });
    let config = config_for(&server, "big");
    let events = connection(&server, &config).await;
    events.init_stream().await.expect("init_stream");
    let event = new_event_auto_source(TYPE_A, &"x".repeat(8_000)).unwrap();
    let id = event.id().to_owned();
    let err = tokio::time::timeout(WAIT, events.publish(event))
        .await
        .expect("publish timed out")
        .unwrap_err();
    assert_eq!(err.kind(), PublishErrorKind::TooLarge);
    let text = err.to_string();
    assert!(text.contains("4096"), "names the limit: {text}");
    assert!(text.contains(&id), "names the event: {text}");
    assert_eq!(
        err.into_event().map(|e| e.id().to_owned()),
        Some(id),
        "event handed back"
    );
    assert_eq!(
        stream_messages(&raw_js(&server).await, &config.js_stream).await,
        0
    );
    // A small one still goes through on the same connection.
    publish_ok(&events, new_event_auto_source(TYPE_A, &1).unwrap()).await;
}

#[tokio::test]
async fn a_missing_stream_is_a_clear_error_for_publish_and_listen() {
    let server = NatsServer::start();
    let config = config_for(&server, "nostream");
    let events = connection(&server, &config).await;
    let err = tokio::time::timeout(
        WAIT,
        events.publish(new_event_auto_source(TYPE_A, &1).unwrap()),
    )
    .await
    .expect("publish timed out")
    .unwrap_err();
    assert_eq!(err.kind(), PublishErrorKind::StreamNotFound);
    assert!(
        err.to_string().contains("events.org.example.order.created"),
        "{err}"
    );
    let err = tokio::time::timeout(
        WAIT,
        events.listen(
            Seen::default().handlers(&[TYPE_A]),
            EventListenOptions::default(),
        ),
    )
    .await
    .expect("listen timed out")
    .unwrap_err();
    assert_eq!(err.kind(), ListenErrorKind::StreamNotFound);
    assert!(err.to_string().contains("CLOUDEVENTS"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Listeners
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn services_each_get_every_event_and_instances_share_them() {
    let (server, config, events) = ready("fanout").await;
    let billing = Seen::default();
    let audit = Seen::default();
    let per_instance: Vec<Seen> = vec![Seen::default(), Seen::default()];
    let slow_options = |durable: &str| EventListenOptions {
        durable_name: Some(durable.into()),
        pool: ce_messaging::WorkerOptions::new(2, 4),
        ..Default::default()
    };
    // Two instances of "billing" (own connections), one of "audit".
    let mut listeners = Vec::new();
    for instance in &per_instance {
        let conn = connection(&server, &config).await;
        let (all, mine) = (billing.clone(), instance.clone());
        let handlers = EventHandlers::new().on(
            TYPE_A,
            event_handler_fn(move |event, _| {
                let (all, mine) = (all.clone(), mine.clone());
                async move {
                    all.record(&event);
                    mine.record(&event);
                    tokio::time::sleep(Duration::from_millis(2)).await; // simulated work
                    Ok(())
                }
            }),
        );
        listeners.push(listen(&conn, handlers, slow_options("billing")).await);
    }
    listeners.push(listen(&events, audit.handlers(&[TYPE_A]), slow_options("audit")).await);

    const N: usize = 300;
    let batch: Vec<Event> = (0..N)
        .map(|i| new_event_auto_source(TYPE_A, &i).unwrap())
        .collect();
    let ids: HashSet<String> = batch.iter().map(|e| e.id().to_owned()).collect();
    for r in events.publish_all(batch).await {
        r.expect("publish");
    }
    support::eventually(Duration::from_secs(30), || async {
        billing.distinct() == N && audit.distinct() == N
    })
    .await;
    for l in &listeners {
        stop(l, Duration::from_secs(5)).await;
    }
    assert_eq!(billing.ids(), ids);
    assert_eq!(audit.ids(), ids);
    assert_eq!(
        billing.calls(),
        N,
        "each event to one billing instance only"
    );
    assert_eq!(audit.calls(), N);
    let (a, b) = (per_instance[0].ids(), per_instance[1].ids());
    assert!(a.is_disjoint(&b));
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both instances got work: {} / {}",
        a.len(),
        b.len()
    );
}

#[tokio::test]
async fn a_handler_failing_twice_then_succeeding_is_acked_without_dead_letter() {
    let (server, config, events) = ready("flaky").await;
    let deliveries = Arc::new(AtomicUsize::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let handlers = EventHandlers::new().on(TYPE_A, {
        let (deliveries, handled) = (deliveries.clone(), handled.clone());
        event_handler_fn(move |_, _| {
            let (deliveries, handled) = (deliveries.clone(), handled.clone());
            async move {
                if deliveries.fetch_add(1, Ordering::SeqCst) < 2 {
                    return Err(HandlerError::new("not yet"));
                }
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
    });
    let listener = listen(
        &events,
        handlers,
        EventListenOptions {
            durable_name: Some("flaky".into()),
            max_deliver: Some(3),
            backoff: fast_backoff(),
            ..Default::default()
        },
    )
    .await;
    publish_ok(&events, new_event_auto_source(TYPE_A, &1).unwrap()).await;
    support::eventually(WAIT, || async { handled.load(Ordering::SeqCst) == 1 }).await;
    let js = raw_js(&server).await;
    // Acked: nothing pending or waiting for an ack on the consumer.
    support::eventually(WAIT, || async {
        let mut c: jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream("flaky", &config.js_stream)
            .await
            .unwrap();
        let info = c.info().await.unwrap();
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
    stop(&listener, Duration::from_secs(5)).await;
    assert_eq!(deliveries.load(Ordering::SeqCst), 3);
    assert_eq!(
        stream_messages(&js, &config.js_dlq_stream).await,
        0,
        "no dead letter"
    );
}

#[tokio::test]
async fn an_always_failing_event_is_dead_lettered_after_max_deliveries_and_others_go_on() {
    let (server, config, events) = ready("poison").await;
    let good = Seen::default();
    let attempts = Arc::new(AtomicUsize::new(0));
    let handlers = EventHandlers::new()
        .on(TYPE_A, {
            let attempts = attempts.clone();
            event_handler_fn(move |_, _| {
                let attempts = attempts.clone();
                async move {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    Err(HandlerError::new("database down"))
                }
            })
        })
        .on(TYPE_B, {
            let good = good.clone();
            event_handler_fn(move |event, _| {
                let good = good.clone();
                async move {
                    good.record(&event);
                    Ok(())
                }
            })
        });
    let listener = listen(
        &events,
        handlers,
        EventListenOptions {
            durable_name: Some("poison".into()),
            max_deliver: Some(3),
            backoff: fast_backoff(),
            ..Default::default()
        },
    )
    .await;
    let poison = new_event_auto_source(TYPE_A, &serde_json::json!({"poison": true})).unwrap();
    publish_ok(&events, poison.clone()).await;
    let js = raw_js(&server).await;
    support::eventually(WAIT, || async {
        stream_messages(&js, &config.js_dlq_stream).await == 1
    })
    .await;
    // The listener keeps handling other events.
    let other = new_event_auto_source(TYPE_B, &2).unwrap();
    publish_ok(&events, other.clone()).await;
    support::eventually(WAIT, || async { good.ids().contains(other.id()) }).await;
    stop(&listener, Duration::from_secs(5)).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "three deliveries, then dead letter"
    );

    let original = &stream_contents(&js, &config.js_stream).await[0];
    let dead = &stream_contents(&js, &config.js_dlq_stream).await[0];
    assert_eq!(dead.subject.as_str(), "deadletter.CLOUDEVENTS.poison");
    assert_eq!(dead.payload, original.payload, "payload byte for byte");
    let h = &dead.headers;
    assert_eq!(
        h.get("Dead-Letter-Reason").unwrap().as_str(),
        "max-deliveries"
    );
    assert_eq!(h.get("Dead-Letter-Deliveries").unwrap().as_str(), "3");
    assert_eq!(
        h.get("Dead-Letter-Subject").unwrap().as_str(),
        format!("events.{TYPE_A}")
    );
    assert_eq!(
        h.get("Dead-Letter-Stream-Seq").unwrap().as_str(),
        original.sequence.to_string()
    );
    assert!(h
        .get("Dead-Letter-Error")
        .unwrap()
        .as_str()
        .contains("database down"));
    assert_eq!(
        original_msg_id(h.get("Nats-Msg-Id").unwrap().as_str()),
        poison.id()
    );
    for (name, values) in original.headers.iter() {
        let name: &str = name.as_ref();
        if name != "Nats-Msg-Id" {
            assert_eq!(
                h.get_all(name).collect::<Vec<_>>(),
                values.iter().collect::<Vec<_>>(),
                "header {name} kept"
            );
        }
    }
}

#[tokio::test]
async fn a_panicking_handler_is_retried_and_a_long_one_keeps_its_event_with_in_progress() {
    let (_server, _config, events) = ready("panic").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let long_calls = Arc::new(AtomicUsize::new(0));
    let long_done = Arc::new(AtomicUsize::new(0));
    let handlers = EventHandlers::new()
        .on(TYPE_A, {
            let calls = calls.clone();
            event_handler_fn(move |_, _| {
                let calls = calls.clone();
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("first delivery blows up");
                    }
                    Ok(())
                }
            })
        })
        .on(TYPE_B, {
            let (long_calls, long_done) = (long_calls.clone(), long_done.clone());
            event_handler_fn(move |_, _| {
                let (long_calls, long_done) = (long_calls.clone(), long_done.clone());
                async move {
                    long_calls.fetch_add(1, Ordering::SeqCst);
                    // Work that takes two ack waits.
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    long_done.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
        });
    let listener = listen(
        &events,
        handlers,
        EventListenOptions {
            durable_name: Some("panic".into()),
            pool: ce_messaging::WorkerOptions::new(2, 4),
            ack_wait: Some(Duration::from_secs(2)),
            backoff: fast_backoff(),
            ..Default::default()
        },
    )
    .await;
    publish_ok(&events, new_event_auto_source(TYPE_B, &"long").unwrap()).await;
    publish_ok(&events, new_event_auto_source(TYPE_A, &"boom").unwrap()).await;
    support::eventually(WAIT, || async {
        calls.load(Ordering::SeqCst) >= 2 && long_done.load(Ordering::SeqCst) >= 1
    })
    .await;
    let report = stop(&listener, Duration::from_secs(5)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "panicked once, then handled"
    );
    assert_eq!(
        long_calls.load(Ordering::SeqCst),
        1,
        "in-progress kept the long event from redelivery"
    );
    assert_eq!(report.handled_total, 3);
}

/// Two services reject the same event: each gets its own dead letter (the dead-letter
/// `Nats-Msg-Id` is per durable, so the second one is not swallowed as a duplicate).
#[tokio::test]
async fn two_services_dead_lettering_the_same_event_both_store_their_dead_letter() {
    let (server, config, events) = ready("twodlq").await;
    let reject = || {
        EventHandlers::new().on(
            TYPE_A,
            event_handler_fn(|_, _| async { Err(HandlerError::permanent("no thanks")) }),
        )
    };
    let a = listen(
        &events,
        reject(),
        EventListenOptions {
            durable_name: Some("svc-a".into()),
            ..Default::default()
        },
    )
    .await;
    let b = listen(
        &events,
        reject(),
        EventListenOptions {
            durable_name: Some("svc-b".into()),
            ..Default::default()
        },
    )
    .await;
    let event = new_event_auto_source(TYPE_A, &1).unwrap();
    publish_ok(&events, event.clone()).await;
    let js = raw_js(&server).await;
    support::eventually(WAIT, || async {
        stream_messages(&js, &config.js_dlq_stream).await == 2
    })
    .await;
    stop(&a, Duration::from_secs(5)).await;
    stop(&b, Duration::from_secs(5)).await;
    let dead = stream_contents(&js, &config.js_dlq_stream).await;
    let subjects: HashSet<String> = dead.iter().map(|m| m.subject.to_string()).collect();
    assert_eq!(
        subjects,
        HashSet::from([
            "deadletter.CLOUDEVENTS.svc-a".to_string(),
            "deadletter.CLOUDEVENTS.svc-b".to_string()
        ])
    );
    for m in &dead {
        assert_eq!(
            m.headers.get("Dead-Letter-Reason").unwrap().as_str(),
            "rejected"
        );
        assert_eq!(
            original_msg_id(m.headers.get("Nats-Msg-Id").unwrap().as_str()),
            event.id()
        );
    }
}

#[tokio::test]
async fn undecodable_messages_are_dead_lettered_with_reason_decode_and_valid_ones_handled() {
    let (server, config, events) = ready("garbage").await;
    let seen = Seen::default();
    let listener = listen(
        &events,
        seen.handlers(&[TYPE_A]),
        EventListenOptions {
            durable_name: Some("garbage".into()),
            ..Default::default()
        },
    )
    .await;
    let js = raw_js(&server).await;
    let subject = format!("events.{TYPE_A}");
    let mut valid = HashSet::new();
    let mut bad = 0u64;
    let mut acks = Vec::new();
    for i in 0..1_000 {
        let event = new_event_auto_source(TYPE_A, &i).unwrap();
        valid.insert(event.id().to_owned());
        acks.push(events.publish(event));
        if i % 20 == 0 {
            // Every 20th valid event is followed by a bad message of one of four kinds.
            let mut headers = async_nats::HeaderMap::new();
            let payload: Bytes = match (i / 20) % 4 {
                0 => Bytes::from_static(b"\x00\xff garbage, not JSON"),
                1 => Bytes::from_static(
                    br#"{"specversion":"1.0","type":"org.example.order.created","source":"x"}"#,
                ), // no id
                2 => {
                    headers.insert("Content-Type", "application/cloudevents+json");
                    Bytes::from_static(b"<xml>not json</xml>")
                }
                _ => {
                    // Binary mode with a missing required attribute (no ce-source).
                    headers.insert("ce-specversion", "1.0");
                    headers.insert("ce-id", "bin-1");
                    headers.insert("ce-type", TYPE_A);
                    Bytes::from_static(b"{}")
                }
            };
            headers.insert("Nats-Msg-Id", format!("bad-{i}").as_str());
            js.publish_with_headers(subject.clone(), headers, payload)
                .await
                .unwrap()
                .await
                .unwrap();
            bad += 1;
        }
    }
    for r in futures::future::join_all(acks).await {
        r.expect("publish");
    }
    support::eventually(Duration::from_secs(60), || async {
        seen.distinct() == valid.len()
    })
    .await;
    support::eventually(WAIT, || async {
        stream_messages(&js, &config.js_dlq_stream).await == bad
    })
    .await;
    assert_eq!(seen.ids(), valid);
    let dead = stream_contents(&js, &config.js_dlq_stream).await;
    assert!(dead
        .iter()
        .all(|m| m.headers.get("Dead-Letter-Reason").unwrap().as_str() == "decode"));
    // Still alive.
    let after = new_event_auto_source(TYPE_A, &"after").unwrap();
    publish_ok(&events, after.clone()).await;
    support::eventually(WAIT, || async { seen.ids().contains(after.id()) }).await;
    assert!(!listener.is_stopped());
    stop(&listener, Duration::from_secs(5)).await;
}

/// Handlers that block until released, counting how many run.
#[derive(Clone, Default)]
struct Blocking {
    running: Arc<AtomicUsize>,
    started: Seen,
    release: CancellationToken,
}

impl Blocking {
    fn handlers(&self) -> EventHandlers {
        let me = self.clone();
        EventHandlers::new().on(
            TYPE_A,
            event_handler_fn(move |event, _| {
                let me = me.clone();
                async move {
                    me.running.fetch_add(1, Ordering::SeqCst);
                    me.started.record(&event);
                    let guard = DecOnDrop(me.running.clone());
                    me.release.cancelled().await;
                    drop(guard);
                    Ok(())
                }
            }),
        )
    }
}

struct DecOnDrop(Arc<AtomicUsize>);
impl Drop for DecOnDrop {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn events_of_a_killed_listener_are_redelivered_to_a_new_one() {
    let (_server, _config, events) = ready("crash").await;
    let options = EventListenOptions {
        durable_name: Some("crash".into()),
        pool: ce_messaging::WorkerOptions::new(10, 4),
        ack_wait: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let first = Blocking::default();
    let dying = listen(&events, first.handlers(), options.clone()).await;
    let batch: Vec<Event> = (0..10)
        .map(|i| new_event_auto_source(TYPE_A, &i).unwrap())
        .collect();
    let ids: HashSet<String> = batch.iter().map(|e| e.id().to_owned()).collect();
    for r in events.publish_all(batch).await {
        r.unwrap();
    }
    support::eventually(WAIT, || async { first.started.distinct() == 10 }).await;
    // As if the process died: nothing is acked or nak'ed.
    tokio::time::timeout(WAIT, dying.abort())
        .await
        .expect("abort timed out");
    assert_eq!(
        first.running.load(Ordering::SeqCst),
        0,
        "no handler runs after abort"
    );

    let second = Seen::default();
    let redelivered_at = Instant::now();
    let next = listen(&events, second.handlers(&[TYPE_A]), options).await;
    support::eventually(WAIT, || async { second.distinct() == 10 }).await;
    assert_eq!(second.ids(), ids);
    assert!(redelivered_at.elapsed() < Duration::from_secs(15));
    stop(&next, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_graceful_stop_finishes_what_it_can_and_naks_the_rest_for_prompt_redelivery() {
    let (_server, _config, events) = ready("graceful").await;
    let ack_wait = Duration::from_secs(30);
    let options = EventListenOptions {
        durable_name: Some("graceful".into()),
        pool: ce_messaging::WorkerOptions::new(20, 20),
        ack_wait: Some(ack_wait),
        ..Default::default()
    };
    // Ten handlers finish soon after the stop begins; ten never finish on their own.
    let quick = Blocking::default();
    let stuck = Blocking::default();
    let (q, s) = (quick.clone(), stuck.clone());
    let started_after_stop = Arc::new(AtomicU64::new(0));
    let stop_returned = CancellationToken::new();
    let handlers = EventHandlers::new().on(TYPE_A, {
        let (started_after_stop, stop_returned) =
            (started_after_stop.clone(), stop_returned.clone());
        event_handler_fn(move |event, _| {
            let (q, s) = (q.clone(), s.clone());
            let (started_after_stop, stop_returned) =
                (started_after_stop.clone(), stop_returned.clone());
            async move {
                if stop_returned.is_cancelled() {
                    started_after_stop.fetch_add(1, Ordering::SeqCst);
                }
                let n: u64 = event.data_as().unwrap();
                let me = if n.is_multiple_of(2) { q } else { s };
                me.running.fetch_add(1, Ordering::SeqCst);
                me.started.record(&event);
                let _guard = DecOnDrop(me.running.clone());
                me.release.cancelled().await;
                Ok(())
            }
        })
    });
    let listener = listen(&events, handlers, options.clone()).await;
    let batch: Vec<Event> = (0..20u64)
        .map(|i| new_event_auto_source(TYPE_A, &i).unwrap())
        .collect();
    for r in events.publish_all(batch).await {
        r.unwrap();
    }
    support::eventually(WAIT, || async {
        quick.started.distinct() + stuck.started.distinct() == 20
    })
    .await;
    let stopping = tokio::spawn({
        let listener = listener.clone();
        async move { listener.stop(Duration::from_millis(500)).await }
    });
    quick.release.cancel();
    let began = Instant::now();
    let report = tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
    stop_returned.cancel();
    // The quick ten finished (whether just before or during the stop), the stuck ten were cut
    // off when the grace period ran out.
    assert_eq!(report.handled_total, 10, "{report:?}");
    assert_eq!(report.abandoned, 10, "{report:?}");
    assert!(report.elapsed < Duration::from_secs(5), "{report:?}");
    assert_eq!(
        quick.running.load(Ordering::SeqCst) + stuck.running.load(Ordering::SeqCst),
        0
    );

    // The ten abandoned ones were nak'ed: a new listener gets exactly them, long before the
    // 30 s ack wait.
    let next_seen = Seen::default();
    let next = listen(&events, next_seen.handlers(&[TYPE_A]), options).await;
    support::eventually(Duration::from_secs(10), || async {
        next_seen.distinct() == 10
    })
    .await;
    assert!(
        began.elapsed() < ack_wait / 2,
        "redelivered after {:?}",
        began.elapsed()
    );
    assert_eq!(next_seen.ids(), stuck.started.ids());
    assert!(
        next_seen.ids().is_disjoint(&quick.started.ids()),
        "finished ones were acked"
    );
    stop(&next, Duration::from_secs(5)).await;
    assert_eq!(
        started_after_stop.load(Ordering::SeqCst),
        0,
        "no handler started after stop returned"
    );
}

/// A stop that races with events arriving: the pull request still open at the server may be
/// filled after the stop began. Whatever it brings must be nak'ed, not lost on a closed
/// subscription, so the next listener gets every event at once, long before the ack wait.
/// Many short cycles, so that the race is hit.
#[tokio::test]
async fn events_arriving_during_a_stop_are_redelivered_at_once_to_the_next_listener() {
    let (_server, _config, events) = ready("stoprace").await;
    // Longer than the whole test: an event lost at a stop would come back only after it.
    let ack_wait = Duration::from_secs(120);
    let options = EventListenOptions {
        durable_name: Some("stoprace".into()),
        pool: ce_messaging::WorkerOptions::new(2, 4),
        ack_wait: Some(ack_wait),
        // Every stop naks what it holds, which counts as a delivery: not the point here.
        max_deliver: Some(1000),
        ..Default::default()
    };
    let seen = Seen::default();
    let mut published = HashSet::new();
    let began = Instant::now();
    for cycle in 0..8u64 {
        let listener = listen(&events, seen.handlers(&[TYPE_A]), options.clone()).await;
        // Everything so far comes at once, including what the last stop handed back.
        let all_seen = tokio::time::timeout(Duration::from_secs(10), async {
            while seen.ids() != published {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            all_seen.is_ok(),
            "cycle {cycle}: {} of {} events handled",
            seen.ids().intersection(&published).count(),
            published.len()
        );
        // One more while it runs (its next pull request is then open at the server), then
        // a few racing with the stop and right after it, while that request may still be
        // open.
        let event = new_event_auto_source(TYPE_A, &(cycle * 10)).unwrap();
        published.insert(event.id().to_owned());
        publish_ok(&events, event.clone()).await;
        support::eventually(WAIT, || async { seen.ids().contains(event.id()) }).await;
        let batch: Vec<Event> = (1..3)
            .map(|i| new_event_auto_source(TYPE_A, &(cycle * 10 + i)).unwrap())
            .collect();
        published.extend(batch.iter().map(|e| e.id().to_owned()));
        let (acks, _) = tokio::join!(
            events.publish_all(batch),
            stop(&listener, Duration::from_secs(5))
        );
        for ack in acks {
            ack.unwrap();
        }
        let after = new_event_auto_source(TYPE_A, &(cycle * 10 + 5)).unwrap();
        published.insert(after.id().to_owned());
        publish_ok(&events, after).await;
    }
    let last = listen(&events, seen.handlers(&[TYPE_A]), options).await;
    let all_seen = tokio::time::timeout(Duration::from_secs(15), async {
        while seen.ids() != published {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        all_seen.is_ok(),
        "{} of {} events handled after {:?}",
        seen.ids().intersection(&published).count(),
        published.len(),
        began.elapsed()
    );
    assert!(
        began.elapsed() < ack_wait,
        "all events handled only after {:?} (some waited for the ack wait)",
        began.elapsed()
    );
    stop(&last, Duration::from_secs(5)).await;
}

/// `cemsg listen --count`'s way of stopping: one worker, events beyond a count held in the
/// handler, so the stop abandons one (nak at the end of the grace period) and hands back the
/// one queued. Those naks must not be filled into a pull request whose subscription is gone
/// (they would come back only after the ack wait): the next listener gets them at once.
#[tokio::test]
async fn events_handed_back_by_a_stop_with_busy_handlers_come_back_at_once() {
    let (_server, _config, events) = ready("countstop").await;
    // Longer than the whole test: an event lost at a stop would come back only after it.
    let ack_wait = Duration::from_secs(120);
    let options = EventListenOptions {
        durable_name: Some("countstop".into()),
        pool: ce_messaging::WorkerOptions::new(1, 1).with_grace(Duration::from_millis(300)),
        ack_wait: Some(ack_wait),
        // Every stop naks what it holds, which counts as a delivery: not the point here.
        max_deliver: Some(1000),
        ..Default::default()
    };
    let seen = Seen::default();
    let mut published = HashSet::new();
    let began = Instant::now();
    for cycle in 0..8u64 {
        let batch: Vec<Event> = (0..3)
            .map(|i| new_event_auto_source(TYPE_A, &(cycle * 10 + i)).unwrap())
            .collect();
        published.extend(batch.iter().map(|e| e.id().to_owned()));
        for ack in events.publish_all(batch).await {
            ack.unwrap();
        }
        // Handles two events, then holds the next ones until the stop abandons them.
        let handled = Arc::new(AtomicUsize::new(0));
        let handlers = EventHandlers::new().on(TYPE_A, {
            let (seen, handled) = (seen.clone(), handled.clone());
            event_handler_fn(move |event, _| {
                let (seen, handled) = (seen.clone(), handled.clone());
                async move {
                    if handled.load(Ordering::SeqCst) >= 2 {
                        std::future::pending::<()>().await;
                    }
                    seen.record(&event);
                    handled.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
        });
        let listener = listen(&events, handlers, options.clone()).await;
        support::eventually(WAIT, || async { handled.load(Ordering::SeqCst) >= 2 }).await;
        stop(&listener, options.pool.grace).await;
    }
    let last = listen(&events, seen.handlers(&[TYPE_A]), options).await;
    let all_seen = tokio::time::timeout(Duration::from_secs(15), async {
        while seen.ids() != published {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        all_seen.is_ok(),
        "{} of {} events handled after {:?}",
        seen.ids().intersection(&published).count(),
        published.len(),
        began.elapsed()
    );
    assert!(began.elapsed() < ack_wait, "took {:?}", began.elapsed());
    stop(&last, Duration::from_secs(5)).await;
}

/// The durable consumer is deleted under a running listener: the listener recreates it with
/// the same configuration and goes on handling events.
#[tokio::test]
async fn a_deleted_consumer_is_recreated_and_the_listener_goes_on() {
    let (_server, config, events) = ready("recreate").await;
    let seen = Seen::default();
    let options = EventListenOptions {
        durable_name: Some("recreate".into()),
        pool: ce_messaging::WorkerOptions::new(3, 5),
        ack_wait: Some(Duration::from_secs(7)),
        ..Default::default()
    };
    let listener = listen(&events, seen.handlers(&[TYPE_A]), options).await;
    let before = new_event_auto_source(TYPE_A, &"before").unwrap();
    publish_ok(&events, before.clone()).await;
    support::eventually(WAIT, || async { seen.ids().contains(before.id()) }).await;

    let js = raw_js(&_server).await;
    let stream = js.get_stream(&config.js_stream).await.expect("get stream");
    let original = stream
        .get_consumer::<jetstream::consumer::pull::Config>("recreate")
        .await
        .expect("consumer")
        .cached_info()
        .config
        .clone();
    stream
        .delete_consumer("recreate")
        .await
        .expect("delete consumer");

    let after = new_event_auto_source(TYPE_A, &"after").unwrap();
    publish_ok(&events, after.clone()).await;
    support::eventually(WAIT, || async { seen.ids().contains(after.id()) }).await;
    assert!(!listener.is_stopped());
    let recreated = stream
        .get_consumer::<jetstream::consumer::pull::Config>("recreate")
        .await
        .expect("consumer recreated")
        .cached_info()
        .config
        .clone();
    assert_eq!(recreated.ack_wait, original.ack_wait);
    assert_eq!(recreated.max_ack_pending, original.max_ack_pending);
    assert_eq!(recreated.max_deliver, original.max_deliver);
    assert_eq!(recreated.filter_subject, original.filter_subject);
    stop(&listener, Duration::from_secs(5)).await;
    // The new consumer starts from the beginning of the stream: "before" comes again, once.
    assert_eq!(seen.distinct(), 2);
    assert!(seen.calls() <= 3, "{} calls", seen.calls());
}

/// The server restarts under a running listener: its pull request is gone with the old
/// process, the listener asks again and goes on handling new events.
#[tokio::test]
async fn a_listener_keeps_going_after_a_server_restart() {
    let (server, _config, events) = ready("restart").await;
    let seen = Seen::default();
    let listener = listen(
        &events,
        seen.handlers(&[TYPE_A]),
        EventListenOptions {
            durable_name: Some("restart".into()),
            ..Default::default()
        },
    )
    .await;
    let before = new_event_auto_source(TYPE_A, &"before").unwrap();
    publish_ok(&events, before.clone()).await;
    support::eventually(WAIT, || async { seen.ids().contains(before.id()) }).await;
    server.kill();
    server.restart();
    let after = new_event_auto_source(TYPE_A, &"after").unwrap();
    publish_ok(&events, after.clone()).await;
    support::eventually(WAIT, || async { seen.ids().contains(after.id()) }).await;
    assert!(!listener.is_stopped());
    stop(&listener, Duration::from_secs(5)).await;
    // A SIGKILLed server may lose the consumer's latest acks (they are not synced one by
    // one), so "before" may come again: at least once, and nothing else.
    assert_eq!(seen.distinct(), 2);
    assert!(seen.calls() <= 3, "{} calls", seen.calls());
}

#[tokio::test]
async fn a_listener_whose_connection_closes_ends_and_reports() {
    let (server, config, _) = ready("closing").await;
    let events = connection(&server, &config).await;
    let seen = Seen::default();
    let listener = listen(
        &events,
        seen.handlers(&[TYPE_A]),
        EventListenOptions {
            durable_name: Some("closing".into()),
            ..Default::default()
        },
    )
    .await;
    publish_ok(&events, new_event_auto_source(TYPE_A, &1).unwrap()).await;
    support::eventually(WAIT, || async { seen.distinct() == 1 }).await;
    events.close().await;
    let report = tokio::time::timeout(WAIT, listener.stopped())
        .await
        .expect("listener did not end after its connection closed");
    assert_eq!(report.handled_total, 1);
    assert!(listener.is_stopped());
    let err = tokio::time::timeout(
        WAIT,
        events.publish(new_event_auto_source(TYPE_A, &2).unwrap()),
    )
    .await
    .expect("publish on a closed connection timed out")
    .unwrap_err();
    assert_eq!(err.kind(), PublishErrorKind::ConnectionClosed);
}

// ---------------------------------------------------------------------------------------------
// Request / response and EventSource
// ---------------------------------------------------------------------------------------------

const QUOTE_REQUESTED: &str = "org.example.quote.requested";
const QUOTE_GIVEN: &str = "org.example.quote.given";

async fn responder(events: &JetStreamEvents) -> Listener {
    let handlers = EventHandlers::new().on(
        QUOTE_REQUESTED,
        event_handler_fn(|event, responses| async move {
            let n: u64 = event.data_as()?;
            responses.respond_data(QUOTE_GIVEN, &(n * 10)).await?;
            Ok(())
        }),
    );
    listen(
        events,
        handlers,
        EventListenOptions {
            durable_name: Some("quotes".into()),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test]
async fn a_request_resolves_with_the_response_of_its_transaction_and_concurrent_ones_do_not_mix() {
    let (server, config, events) = ready("requester").await;
    let responder_conn = connection(
        &server,
        &Config {
            client_id: "quoter".into(),
            ..config.clone()
        },
    )
    .await;
    let service = responder(&responder_conn).await;

    let request = new_event_auto_source(QUOTE_REQUESTED, &7u64).unwrap();
    let tid = request.transaction_id().unwrap();
    let mut promise = tokio::time::timeout(
        WAIT,
        events.request(request, &[EventType::from(QUOTE_GIVEN)]),
    )
    .await
    .unwrap()
    .expect("request");
    let response = promise.response(WAIT).await.expect("response");
    assert_eq!(response.transaction_id(), Some(tid));
    assert_eq!(response.data_as::<u64>().unwrap(), 70);
    assert_eq!(response.source(), "quoter");
    promise.close().await;

    // Many at once, each gets its own answer.
    let mut tasks = Vec::new();
    for n in 0..30u64 {
        let events = events.clone();
        tasks.push(tokio::spawn(async move {
            let request = new_event_auto_source(QUOTE_REQUESTED, &n).unwrap();
            let tid = request.transaction_id().unwrap();
            let mut promise = events
                .request(request, &[EventType::from(QUOTE_GIVEN)])
                .await
                .unwrap();
            let response = promise.response(WAIT).await.unwrap();
            // Nothing else arrives for this transaction.
            let extra = promise.response(Duration::from_millis(200)).await;
            (n, tid, response, extra.is_err())
        }));
    }
    for task in tasks {
        let (n, tid, response, no_extra) = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        assert_eq!(response.transaction_id(), Some(tid));
        assert_eq!(response.data_as::<u64>().unwrap(), n * 10);
        assert!(no_extra);
    }
    stop(&service, Duration::from_secs(5)).await;
    let source = events.event_source();
    support::eventually(WAIT, || async {
        source.listener_count() == 0 && source.subscription_count() == 0
    })
    .await;
}

#[tokio::test]
async fn a_timed_out_promise_releases_its_listener() {
    let (_server, _config, events) = ready("timeout").await;
    let tid = TransactionId::generate();
    let mut promise = events
        .wait_for_response(&tid, &[EventType::from(QUOTE_GIVEN)])
        .await
        .expect("wait_for_response");
    let source = events.event_source();
    assert_eq!(source.listener_count(), 1);
    let err = promise
        .response(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ResponseErrorKind::TimedOut);
    assert_eq!(source.listener_count(), 0);
    assert_eq!(source.subscription_count(), 0);
}

/// The subscriptions on event subjects that clients hold on the server, sorted.
fn server_event_subscriptions(server: &NatsServer) -> Vec<String> {
    let connz = server.monitor_json("/connz?subs=1");
    let mut subs: Vec<String> = connz["connections"]
        .as_array()
        .map(|conns| {
            conns
                .iter()
                .flat_map(|c| {
                    c["subscriptions_list"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|s| s.as_str().map(str::to_owned))
                .filter(|s| s.starts_with("events."))
                .collect()
        })
        .unwrap_or_default();
    subs.sort();
    subs
}

#[tokio::test]
async fn event_source_listeners_by_type_tid_and_once_come_and_go_without_leaks() {
    let (server, _config, events) = ready("source").await;
    let source = events.event_source();
    assert!(server_event_subscriptions(&server).is_empty());
    let by_type = Seen::default();
    let by_tid = Seen::default();
    let once = Seen::default();
    let tid = TransactionId::generate();

    let cb = |seen: &Seen| {
        let seen = seen.clone();
        move |event: ReceivedEvent| seen.record(&event)
    };
    let type_id = source
        .add_listener(EventFilter::by_type(TYPE_A), cb(&by_type))
        .await
        .unwrap();
    let tid_id = source
        .add_listener(EventFilter::by_transaction(tid.clone()), cb(&by_tid))
        .await
        .unwrap();
    let _once_id = source
        .add_listener(EventFilter::by_type(TYPE_B).once(), cb(&once))
        .await
        .unwrap();
    assert_eq!(source.subscription_count(), 3);
    assert_eq!(
        server_event_subscriptions(&server),
        vec![
            "events.>".to_string(),
            format!("events.{TYPE_A}"),
            format!("events.{TYPE_B}")
        ]
    );
    // Type and tid together share the type's subscription.
    let both_id = source
        .add_listener(
            EventFilter::by_type(TYPE_A)
                .and_transaction(tid.clone())
                .once(),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(source.subscription_count(), 3);
    assert!(source.remove_listener(both_id).await);
    assert_eq!(source.subscription_count(), 3);

    // Events flow while listeners are added and removed.
    let flowing = tokio::spawn({
        let events = events.clone();
        let tid = tid.clone();
        async move {
            for i in 0..50u64 {
                let mut a = new_event_auto_source(TYPE_A, &i).unwrap();
                if i % 10 == 0 {
                    a.set_transaction_id(&tid);
                }
                events.publish(a).await.unwrap();
                events
                    .publish(new_event_auto_source(TYPE_B, &i).unwrap())
                    .await
                    .unwrap();
            }
        }
    });
    let late = Seen::default();
    let late_id = source
        .add_listener(EventFilter::by_type(TYPE_B), cb(&late))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, flowing).await.unwrap().unwrap();
    support::eventually(WAIT, || async {
        by_type.distinct() == 50 && by_tid.distinct() == 5
    })
    .await;
    assert_eq!(once.calls(), 1, "a once listener is called once");
    assert!(by_tid
        .by_id
        .lock()
        .unwrap()
        .values()
        .all(|(_, e)| e.transaction_id() == Some(tid.clone())));
    assert!(late.distinct() >= 1);

    assert!(source.remove_listener(type_id).await);
    assert!(source.remove_listener(tid_id).await);
    assert!(source.remove_listener(late_id).await);
    assert!(!source.remove_listener(late_id).await, "already removed");
    assert_eq!(source.listener_count(), 0);
    assert_eq!(source.subscription_count(), 0);
    // And on the server: the subscriptions are gone too.
    support::eventually(WAIT, || async {
        server_event_subscriptions(&server).is_empty()
    })
    .await;
    // Listening again works (a fresh subscription).
    let again = Seen::default();
    let again_id = source
        .add_listener(EventFilter::by_type(TYPE_A), cb(&again))
        .await
        .unwrap();
    let event = new_event(TYPE_A, "s", &1).unwrap();
    publish_ok(&events, event.clone()).await;
    support::eventually(WAIT, || async { again.ids().contains(event.id()) }).await;
    source.remove_listener(again_id).await;
}

/// `consumer_info` counts events the server stopped delivering at its `max_deliver` without an
/// ack (parked): here a consumer made outside the library with `max_deliver: 2` whose event is
/// nak'ed on both deliveries.
#[tokio::test]
async fn consumer_info_counts_events_parked_at_the_servers_delivery_limit() {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    use async_nats::jetstream::AckKind;
    use futures::StreamExt;
    let (server, _config, events) = ready("parker").await;
    publish_ok(&events, new_event(TYPE_A, "test", &1).unwrap()).await;
    publish_ok(&events, new_event(TYPE_A, "test", &2).unwrap()).await;
    let js = raw_js(&server).await;
    let stream = js.get_stream("CLOUDEVENTS").await.expect("stream");
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("parker".into()),
            ack_policy: AckPolicy::Explicit,
            max_deliver: 2,
            filter_subject: format!("events.{TYPE_A}"),
            ..Default::default()
        })
        .await
        .expect("consumer");
    // Event 1 is nak'ed on both deliveries (parked); event 2 is acked.
    let mut settled = 0;
    while settled < 3 {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .expect("fetch");
        let Some(message) = tokio::time::timeout(WAIT, batch.next())
            .await
            .expect("a delivery in time")
        else {
            continue;
        };
        let message = message.expect("message");
        let seq = message.info().expect("metadata").stream_sequence;
        let kind = if seq == 1 {
            AckKind::Nak(None)
        } else {
            AckKind::Ack
        };
        message.double_ack_with(kind).await.expect("settled");
        settled += 1;
    }
    let info = tokio::time::timeout(WAIT, async {
        loop {
            let info = events.consumer_info("parker").await.expect("consumer info");
            if info.ack_pending == 0 {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("nothing ack pending");
    assert_eq!(
        (
            info.pending,
            info.ack_pending,
            info.parked,
            info.max_deliver
        ),
        (0, 0, 1, 2),
        "{info:?}"
    );
    assert_eq!(info.last_delivered, 2);
    assert_eq!(info.deliveries, 3);
    let err = events.consumer_info("nobody").await.unwrap_err();
    assert_eq!(err.kind(), ce_messaging::error::StreamErrorKind::NotFound);
    assert!(err.to_string().contains("nobody"), "{err}");
}

/// A stream created before issue 17 (no `allow_msg_ttl`, no `allow_msg_schedules`): a publish
/// with a time-to-live or a schedule is refused with the typed `Unsupported`, naming
/// `init_stream`, and the event handed back; `init_stream` then turns both on in place and the
/// same publishes are stored.
#[tokio::test]
async fn init_stream_turns_on_ttl_and_schedules_on_an_existing_stream() {
    let server = NatsServer::start();
    let config = config_for(&server, "old-stream");
    let js = raw_js(&server).await;
    tokio::time::timeout(
        WAIT,
        js.create_stream(jetstream::stream::Config {
            name: config.js_stream.clone(),
            subjects: vec![
                format!("{}.>", config.js_subject_prefix),
                format!("_CE_SCHEDULE.{}.>", config.js_stream),
            ],
            ..Default::default()
        }),
    )
    .await
    .expect("create timed out")
    .expect("a stream without TTL or schedules");
    let events = connection(&server, &config).await;
    let attempts = [
        ce_messaging::events::PublishOptions::default().with_ttl(Duration::from_secs(30)),
        ce_messaging::events::PublishOptions::after(Duration::from_secs(3600)),
    ];
    for options in &attempts {
        let err = tokio::time::timeout(
            WAIT,
            events.publish_with(
                new_event_auto_source(TYPE_A, &serde_json::json!({})).expect("event"),
                options.clone(),
            ),
        )
        .await
        .expect("publish timed out")
        .expect_err("the stream has the feature off");
        assert_eq!(
            err.kind(),
            PublishErrorKind::Unsupported,
            "{options:?}: {err}"
        );
        assert!(err.to_string().contains("init_stream"), "{err}");
        assert!(err.into_event().is_some(), "the event is handed back");
    }
    assert_eq!(stream_messages(&js, &config.js_stream).await, 0);
    tokio::time::timeout(WAIT, events.init_stream())
        .await
        .expect("init_stream timed out")
        .expect("init_stream");
    let info = js
        .get_stream(&config.js_stream)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .config
        .clone();
    assert!(
        info.allow_message_ttl && info.allow_message_schedules,
        "turned on in place: {info:?}"
    );
    for options in attempts {
        tokio::time::timeout(
            WAIT,
            events.publish_with(
                new_event_auto_source(TYPE_A, &serde_json::json!({})).expect("event"),
                options,
            ),
        )
        .await
        .expect("publish timed out")
        .expect("stored after init_stream");
    }
    assert_eq!(stream_messages(&js, &config.js_stream).await, 2);
}
