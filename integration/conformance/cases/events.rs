//! Event cases: publish/subscribe with payload and metadata intact (both content modes), dedupe,
//! durable consumers (fan-out across durables, shared within one), redelivery, max deliveries and
//! dead letters, the worker bound, stopping, promises and the EventSource.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ce_messaging::codec::{self, ContentMode, HeaderMap};
use ce_messaging::config::Config;
use ce_messaging::error::{ListenErrorKind, PublishErrorKind, ResponseErrorKind, StreamErrorKind};
use ce_messaging::event::{
    new_event_auto_source, new_event_with_id, new_event_with_tid, EventExt, EventType,
    TransactionId,
};
use ce_messaging::event_source::EventFilter;
use ce_messaging::events::{
    event_handler_fn, priority_durable, set_priority, typed_event_handler, Backoff,
    EventConnection, EventHandlers, EventListenOptions, StartPosition, TypedEvent,
};
use ce_messaging::handler::HandlerError;
use ce_messaging::headers;
use ce_messaging::listener::Listener;
use ce_messaging::{Event, ReceivedEvent};
use cloudevents::{AttributesReader, AttributesWriter};
use futures::future::join_all;
use serde_json::{json, Value};

use super::{eventually, skip, within, Gate, Peak, Seen};
use crate::backend::{unique, ConsumerState, EventBackend, Stored};

/// A fresh event type, unique to this case run.
pub(super) fn new_type(name: &str) -> String {
    format!("conf.{}.{name}", unique())
}

fn new_durable() -> String {
    format!("conf-{}", unique())
}

fn options(durable: &str) -> EventListenOptions {
    EventListenOptions {
        pool: ce_messaging::WorkerOptions::new(4, 16).with_grace(Duration::from_secs(5)),
        durable_name: Some(durable.to_owned()),
        max_deliver: Some(5),
        ack_wait: Some(Duration::from_secs(5)),
        handler_timeout: None,
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
        // Many cases publish before they listen and expect the earlier events.
        start_position: Some(StartPosition::All),
    }
}

fn one_worker(durable: &str) -> EventListenOptions {
    EventListenOptions {
        pool: ce_messaging::WorkerOptions::new(1, 1),
        ..options(durable)
    }
}

fn event(event_type: &str, data: &Value) -> Event {
    new_event_auto_source(event_type, data).expect("event")
}

/// Records every delivered event and acks it.
fn recording(event_type: &str, seen: &Seen<ReceivedEvent>) -> EventHandlers {
    let seen = seen.clone();
    EventHandlers::new().on(
        event_type,
        event_handler_fn(move |event, _| {
            let seen = seen.clone();
            async move {
                seen.push(event);
                Ok(())
            }
        }),
    )
}

pub(super) async fn listen<E: EventConnection>(
    connection: &E,
    handlers: EventHandlers,
    options: EventListenOptions,
) -> Listener {
    within("listen", connection.listen(handlers, options))
        .await
        .expect("listen")
}

async fn publish<E: EventConnection>(
    connection: &E,
    event: Event,
) -> ce_messaging::events::PublishAck {
    within("publish ack", connection.publish(event))
        .await
        .expect("published")
}

/// Whether the backend cannot store raw bytes, which the case needs: then it says why and
/// the case skips.
fn cannot_publish_raw<B: EventBackend>(case: &str) -> bool {
    match B::caps().raw_publish {
        Some(why) => {
            skip(B::NAME, case, why);
            true
        }
        None => false,
    }
}

/// An event sent (`Event`) or received (`ReceivedEvent`), for [`ids`].
trait HasId {
    fn event_id(&self) -> &str;
}

impl HasId for Event {
    fn event_id(&self) -> &str {
        self.id()
    }
}

impl HasId for ReceivedEvent {
    fn event_id(&self) -> &str {
        self.id()
    }
}

fn ids<E: HasId>(events: &[E]) -> BTreeSet<String> {
    events.iter().map(|e| e.event_id().to_owned()).collect()
}

async fn stop_all(listeners: &[Listener]) {
    within(
        "listeners to stop",
        join_all(listeners.iter().map(|l| l.stop(Duration::from_secs(5)))),
    )
    .await;
}

/// Waits until the durable has nothing pending and nothing unacknowledged.
pub(super) async fn wait_settled<B: EventBackend>(env: &B, config: &Config, durable: &str) {
    eventually(
        &format!("durable {durable} to have everything acked"),
        || async {
            env.consumer_state(&config.js_stream, durable).await
                == Some(ConsumerState {
                    pending: 0,
                    ack_pending: 0,
                })
        },
    )
    .await;
}

/// Waits until the dead-letter stream holds `n` messages; returns them.
async fn wait_dead_letters<B: EventBackend>(env: &B, config: &Config, n: usize) -> Vec<Stored> {
    eventually(&format!("{n} dead letter(s)"), || async {
        env.stored(&config.js_dlq_stream).await.len() >= n
    })
    .await;
    env.stored(&config.js_dlq_stream).await
}

async fn pubsub<B: EventBackend>(mode: ContentMode) {
    let env = B::start().await;
    let mut pub_config = env.config("pub");
    pub_config.ce_mode = mode;
    let publisher = env.events(&pub_config).await;
    let sub_config = env.config("sub");
    let subscriber = env.events(&sub_config).await;
    let event_type = new_type("order.created");
    let durable = new_durable();
    let seen = Seen::new();
    let listener = listen(
        &subscriber,
        recording(&event_type, &seen),
        options(&durable),
    )
    .await;

    let mut sent = Vec::new();
    for n in 0..10 {
        let data = json!({"n": n, "text": "é ü \"quoted\" 100% ∑", "nested": {"list": [n, n + 1]}});
        let mut e = event(&event_type, &data);
        e.set_extension("conftag", format!("tag {n} a%b\"c é"));
        e.set_subject(Some(format!("orders/{n} é")));
        publish(&publisher, e.clone()).await;
        sent.push(e);
    }
    let got = seen.wait_len("10 events", 10).await;
    let by_id: HashMap<&str, &ReceivedEvent> = got.iter().map(|e| (e.id(), e)).collect();
    assert_eq!(by_id.len(), 10, "each event once");
    for e in &sent {
        let g = by_id
            .get(e.id())
            .expect("every published event is delivered");
        assert_eq!(g.ty(), e.ty());
        assert_eq!(
            g.source(),
            pub_config.client_id,
            "AUTO_POPULATE source is filled in"
        );
        assert_eq!(g.subject(), e.subject());
        assert_eq!(g.time(), e.time());
        assert_eq!(g.datacontenttype(), Some("application/json"));
        assert_eq!(g.transaction_id(), e.transaction_id());
        assert_eq!(
            g.extension("conftag").map(|v| v.to_string()),
            e.extension("conftag").map(|v| v.to_string())
        );
        assert_eq!(
            g.data_as::<Value>().expect("data"),
            e.data_as::<Value>().expect("data")
        );
        // JSON data has one form on every backend and in both modes: the JSON text that
        // `new_event` built (`Data::Binary`), handed to the handler byte for byte.
        assert!(
            matches!(e.data(), Some(cloudevents::Data::Binary(_))),
            "{:?}",
            e.data()
        );
        assert_eq!(g.data(), e.data());
    }

    // On the wire: the contract's subject, content mode and de-duplication id.
    let stored = env.stored(&pub_config.js_stream).await;
    assert_eq!(stored.len(), 10);
    for (message, e) in stored.iter().zip(&sent) {
        assert_eq!(message.subject, pub_config.events_subject(&event_type));
        assert_eq!(
            message.header(headers::NATS_MSG_ID).as_deref(),
            Some(e.id())
        );
        match mode {
            ContentMode::Binary => {
                assert_eq!(message.header("ce-specversion").as_deref(), Some("1.0"));
                assert_eq!(message.header("ce-id").as_deref(), Some(e.id()));
            }
            _ => {
                let content_type = message.header("Content-Type").unwrap_or_default();
                assert!(
                    content_type.starts_with("application/cloudevents+json"),
                    "{content_type}"
                );
                assert!(message.header("ce-specversion").is_none());
            }
        }
    }
    wait_settled(&env, &sub_config, &durable).await;
    listener.stop(Duration::from_secs(5)).await;
}

/// Published events reach a listener with data, attributes and extensions intact (structured).
pub async fn publish_subscribe_keeps_data_and_attributes<B: EventBackend>() {
    pubsub::<B>(ContentMode::Structured).await;
}

/// The same in binary content mode.
pub async fn publish_subscribe_in_binary_mode<B: EventBackend>() {
    pubsub::<B>(ContentMode::Binary).await;
}

/// Acks name the stream and increasing sequences; `publish_all` answers in order.
pub async fn publish_acks_are_ordered<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("pub");
    let publisher = env.events(&config).await;
    let event_type = new_type("seq");
    let mut last = 0;
    for n in 0..3 {
        let ack = publish(&publisher, event(&event_type, &json!(n))).await;
        assert_eq!(ack.stream, config.js_stream);
        assert!(!ack.duplicate);
        assert!(ack.sequence > last, "{} after {last}", ack.sequence);
        last = ack.sequence;
    }
    let batch: Vec<Event> = (0..20).map(|n| event(&event_type, &json!(n))).collect();
    let results = within("publish_all", publisher.publish_all(batch.clone())).await;
    assert_eq!(results.len(), 20);
    for result in results {
        let ack = result.expect("published");
        assert!(ack.sequence > last);
        last = ack.sequence;
    }
    let stored_ids: Vec<String> = env
        .stored(&config.js_stream)
        .await
        .iter()
        .skip(3)
        .map(|m| {
            codec::decode(Some(&m.headers), &m.payload)
                .expect("event")
                .id()
                .to_owned()
        })
        .collect();
    let batch_ids: Vec<String> = batch.iter().map(|e| e.id().to_owned()).collect();
    assert_eq!(stored_ids, batch_ids, "stored in the order given");
}

/// Publishing the same event again within the duplicate window is reported as a duplicate and
/// stored once.
pub async fn duplicate_publish_within_window_is_stored_once<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("pub");
    let publisher = env.events(&config).await;
    let e = event(&new_type("dup"), &json!(1));
    let first = publish(&publisher, e.clone()).await;
    assert!(!first.duplicate);
    let again = publish(&publisher, e.clone()).await;
    assert!(again.duplicate, "{again:?}");
    assert_eq!(
        again.sequence, first.sequence,
        "the duplicate names the stored event"
    );
    let other = publish(&publisher, event(e.ty(), &json!(1))).await;
    assert!(!other.duplicate, "a different id is a different event");
    assert_eq!(env.stored(&config.js_stream).await.len(), 2);
}

/// An event larger than the broker accepts is refused before sending and handed back.
pub async fn too_large_event_is_refused_and_handed_back<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("pub");
    let publisher = env.events(&config).await;
    let big = event(&new_type("big"), &json!("x".repeat(2 * 1024 * 1024)));
    let err = within("publish", publisher.publish(big.clone()))
        .await
        .expect_err("too large");
    assert_eq!(err.kind(), PublishErrorKind::TooLarge, "{err}");
    let back = err.into_event().expect("the event is handed back");
    assert_eq!(back.id(), big.id());
    assert!(env.stored(&config.js_stream).await.is_empty());
}

/// Publishing to a subject no stream holds fails with `StreamNotFound` (no silent drop).
pub async fn publish_without_stream_is_stream_not_found<B: EventBackend>() {
    let env = B::start().await;
    let mut config = env.config("pub");
    config.js_subject_prefix = format!("nostream{}", unique());
    let publisher = env.events(&config).await;
    let e = event(&new_type("lost"), &json!(1));
    let err = within("publish", publisher.publish(e.clone()))
        .await
        .expect_err("no stream");
    assert_eq!(err.kind(), PublishErrorKind::StreamNotFound, "{err}");
    assert_eq!(
        err.into_event().map(|b| b.id().to_owned()),
        Some(e.id().to_owned())
    );
    // The batch form says the same for every event, in order, and hands each one back.
    let batch = vec![
        event(&new_type("lost"), &json!(2)),
        event(&new_type("lost"), &json!(3)),
    ];
    let results = within("publish_all", publisher.publish_all(batch.clone())).await;
    assert_eq!(results.len(), batch.len());
    for (sent, result) in batch.iter().zip(results) {
        let err = result.expect_err("no stream");
        assert_eq!(err.kind(), PublishErrorKind::StreamNotFound, "{err}");
        assert_eq!(
            err.into_event().map(|b| b.id().to_owned()),
            Some(sent.id().to_owned())
        );
    }
}

/// A new durable receives events published before it existed.
pub async fn new_durable_receives_earlier_events<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("old");
    let mut sent = Vec::new();
    for n in 0..5 {
        let e = event(&event_type, &json!(n));
        publish(&connection, e.clone()).await;
        sent.push(e);
    }
    let seen = Seen::new();
    let durable = new_durable();
    let listener = listen(
        &connection,
        recording(&event_type, &seen),
        options(&durable),
    )
    .await;
    let got = seen.wait_len("the 5 earlier events", 5).await;
    assert_eq!(ids(&got), ids(&sent));
    wait_settled(&env, &config, &durable).await;
    listener.stop(Duration::from_secs(5)).await;
}

/// A listener gets only the types it handles (nothing else is delivered, so nothing else is
/// dead-lettered as unhandled).
pub async fn event_types_are_isolated<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let (type_x, type_y) = (new_type("x"), new_type("y"));
    let (seen_x, seen_y) = (Seen::new(), Seen::new());
    let (durable_x, durable_y) = (new_durable(), new_durable());
    let listeners = vec![
        listen(
            &connection,
            recording(&type_x, &seen_x),
            one_worker(&durable_x),
        )
        .await,
        listen(
            &connection,
            recording(&type_y, &seen_y),
            one_worker(&durable_y),
        )
        .await,
    ];
    for t in [&type_x, &type_y, &type_x, &type_y, &type_y, &type_x] {
        publish(&connection, event(t, &json!(null))).await;
    }
    // One worker, in order: by the time each listener saw its last event, anything misrouted
    // before it was processed (and dead-lettered) too.
    let x = seen_x.wait_len("3 x events", 3).await;
    let y = seen_y.wait_len("3 y events", 3).await;
    assert!(x.iter().all(|e| e.ty() == type_x));
    assert!(y.iter().all(|e| e.ty() == type_y));
    wait_settled(&env, &config, &durable_x).await;
    wait_settled(&env, &config, &durable_y).await;
    assert!(
        env.stored(&config.js_dlq_stream).await.is_empty(),
        "nothing misrouted"
    );
    assert_eq!((seen_x.len(), seen_y.len()), (3, 3));
    stop_all(&listeners).await;
}

/// Consumer groups: each durable gets every event; instances of one durable share them, each
/// event going to one instance.
pub async fn durables_fan_out_and_instances_share<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("pub");
    let publisher = env.events(&config).await;
    let event_type = new_type("fanout");
    let (group_1, group_2) = (new_durable(), new_durable());
    let (seen_1a, seen_1b, seen_2) = (Seen::new(), Seen::new(), Seen::new());
    let mut listeners = Vec::new();
    for (durable, seen) in [
        (&group_1, &seen_1a),
        (&group_1, &seen_1b),
        (&group_2, &seen_2),
    ] {
        let connection = env.events(&env.config("svc")).await;
        listeners.push(listen(&connection, recording(&event_type, seen), options(durable)).await);
    }
    let sent: Vec<Event> = (0..20).map(|n| event(&event_type, &json!(n))).collect();
    for e in &sent {
        publish(&publisher, e.clone()).await;
    }
    let all = ids(&sent);
    seen_2
        .wait_until("group 2 to get every event", |got| ids(got) == all)
        .await;
    eventually("group 1 to get every event", || async {
        let mut got = seen_1a.snapshot();
        got.extend(seen_1b.snapshot());
        ids(&got) == all
    })
    .await;
    wait_settled(&env, &config, &group_1).await;
    wait_settled(&env, &config, &group_2).await;
    let (a, b) = (ids(&seen_1a.snapshot()), ids(&seen_1b.snapshot()));
    assert!(
        a.is_disjoint(&b),
        "an event went to both instances of one durable"
    );
    assert_eq!(
        seen_1a.len() + seen_1b.len(),
        20,
        "each event handled once in group 1"
    );
    assert_eq!(seen_2.len(), 20, "each event handled once in group 2");
    stop_all(&listeners).await;
}

/// Listeners started at the same time on one durable get every event between them, once.
pub async fn concurrent_listeners_share_one_durable<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("concurrent");
    let durable = new_durable();
    let seen = Seen::new();
    let listeners: Vec<Listener> = within(
        "5 listeners",
        join_all(
            (0..5).map(|_| connection.listen(recording(&event_type, &seen), options(&durable))),
        ),
    )
    .await
    .into_iter()
    .map(|l| l.expect("listen"))
    .collect();
    let sent: Vec<Event> = (0..30).map(|n| event(&event_type, &json!(n))).collect();
    let results = within("publish_all", connection.publish_all(sent.clone())).await;
    assert!(results.iter().all(|r| r.is_ok()));
    let all = ids(&sent);
    seen.wait_until("every event", |got| ids(got) == all).await;
    wait_settled(&env, &config, &durable).await;
    assert_eq!(seen.len(), 30, "each event handled once");
    stop_all(&listeners).await;
}

/// A handler that fails gets the event again, after the delay it asked for; then it is acked.
pub async fn failed_event_is_redelivered_after_its_delay<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("retry");
    let durable = new_durable();
    let deliveries: Seen<Instant> = Seen::new();
    let recorder = deliveries.clone();
    let handlers = EventHandlers::new().on(
        &event_type,
        event_handler_fn(move |_, _| {
            let recorder = recorder.clone();
            async move {
                recorder.push(Instant::now());
                if recorder.len() == 1 {
                    return Err(
                        HandlerError::new("transient").retry_after(Duration::from_millis(400))
                    );
                }
                Ok(())
            }
        }),
    );
    let listener = listen(&connection, handlers, options(&durable)).await;
    publish(&connection, event(&event_type, &json!(1))).await;
    let times = deliveries.wait_len("the redelivery", 2).await;
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_millis(350),
        "redelivered after {gap:?}, asked for 400 ms"
    );
    wait_settled(&env, &config, &durable).await;
    assert_eq!(deliveries.len(), 2, "acked after the second delivery");
    listener.stop(Duration::from_secs(5)).await;
}

/// Counts one more attempt at event `n`; returns which attempt it is (1 for the first).
fn next_attempt(attempts: &std::sync::Mutex<HashMap<u64, usize>>, n: u64) -> usize {
    let mut map = attempts.lock().expect("lock");
    let count = map.entry(n).or_default();
    *count += 1;
    *count
}

/// Publishes events `0..count` of `event_type`, waits until `done` holds each of them and the
/// durable has everything acked, and checks that nothing was dead-lettered; returns `done`'s
/// contents.
async fn publish_until_each_handled<B: EventBackend>(
    env: &B,
    config: &Config,
    connection: &impl EventConnection,
    (event_type, durable): (&str, &str),
    done: &Seen<u64>,
    count: u64,
) -> Vec<u64> {
    for n in 0..count {
        publish(connection, event(event_type, &json!(n))).await;
    }
    let handled = done
        .wait_until(&format!("all {count} handled"), |d| {
            d.iter().collect::<BTreeSet<_>>().len() as u64 == count
        })
        .await;
    wait_settled(env, config, durable).await;
    assert!(env.stored(&config.js_dlq_stream).await.is_empty());
    handled
}

/// A listener keeps handling after handlers fail and panic; every event is handled in the end.
pub async fn listener_continues_after_errors<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("flaky");
    let durable = new_durable();
    let attempts: Arc<std::sync::Mutex<HashMap<u64, usize>>> = Arc::default();
    let done: Seen<u64> = Seen::new();
    let (a, d) = (attempts.clone(), done.clone());
    let handlers = EventHandlers::new().on(
        &event_type,
        typed_event_handler(move |e: TypedEvent<u64>| {
            let (attempts, done) = (a.clone(), d.clone());
            async move {
                let attempt = next_attempt(&attempts, e.data);
                if attempt == 1 && e.data.is_multiple_of(3) {
                    return Err(HandlerError::new("first attempt fails"));
                }
                if attempt == 1 && e.data % 3 == 1 {
                    panic!("first attempt panics");
                }
                done.push(e.data);
                Ok(())
            }
        }),
    );
    let listener = listen(&connection, handlers, one_worker(&durable)).await;
    let kind = (event_type.as_str(), durable.as_str());
    let handled = publish_until_each_handled(&env, &config, &connection, kind, &done, 9).await;
    assert_eq!(handled.len(), 9);
    listener.stop(Duration::from_secs(5)).await;
}

/// A handler that panics while building its future (a closure that panics before its `async`
/// block) fails like one whose future panics: the event is retried and handled, the one
/// worker survives and serves the other events, nothing is dead-lettered or left pending.
pub async fn listener_survives_a_handler_panicking_before_its_future<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("eager");
    let durable = new_durable();
    let attempts: Arc<std::sync::Mutex<HashMap<u64, usize>>> = Arc::default();
    let done: Seen<u64> = Seen::new();
    let (a, d) = (attempts.clone(), done.clone());
    let handlers = EventHandlers::new().on(
        &event_type,
        event_handler_fn(move |event: ReceivedEvent, _| {
            // Not inside the `async` block: this runs when the handler is called.
            let n: u64 = event.data_as().expect("the case sends numbers");
            let attempt = next_attempt(&a, n);
            if attempt == 1 && n % 2 == 1 {
                panic!("handler panics before returning its future ({n})");
            }
            let done = d.clone();
            async move {
                done.push(n);
                Ok(())
            }
        }),
    );
    let listener = listen(&connection, handlers, one_worker(&durable)).await;
    let kind = (event_type.as_str(), durable.as_str());
    let handled = publish_until_each_handled(&env, &config, &connection, kind, &done, 6).await;
    assert_eq!(handled.len(), 6, "each handled once: {handled:?}");
    let attempts = attempts.lock().expect("lock").clone();
    for n in 0..6u64 {
        let expected = if n % 2 == 1 { 2 } else { 1 };
        assert_eq!(
            attempts.get(&n),
            Some(&expected),
            "attempts of {n}: {attempts:?}"
        );
    }
    let report = within("the stop", listener.stop(Duration::from_secs(5))).await;
    assert_eq!(
        report.handled_total, 9,
        "six events, three of them twice: {report:?}"
    );
}

/// A listener stopped mid-stream and a new one on the same durable together handle every
/// event.
pub async fn listener_stop_and_restart_continues<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("restart");
    let durable = new_durable();
    let sent: Vec<Event> = (0..20).map(|n| event(&event_type, &json!(n))).collect();
    for e in &sent {
        publish(&connection, e.clone()).await;
    }
    // The first listener holds its fifth event past the grace period, so the stop always comes
    // mid-stream (however fast the backend is) and that event is handed back.
    let first: Seen<ReceivedEvent> = Seen::new();
    let gate = Gate::new();
    let (f, g) = (first.clone(), gate.clone());
    let holding = EventHandlers::new().on(
        &event_type,
        event_handler_fn(move |e, _| {
            let (first, gate) = (f.clone(), g.clone());
            async move {
                first.push(e);
                if first.len() >= 5 {
                    gate.wait().await;
                }
                Ok(())
            }
        }),
    );
    let listener = listen(&connection, holding, one_worker(&durable)).await;
    first.wait_len("5 events before the stop", 5).await;
    let report = within("the stop", listener.stop(Duration::from_millis(300))).await;
    assert_eq!(report.abandoned, 1, "{report:?}");
    let handled_first = first.snapshot();
    assert_eq!(
        handled_first.len(),
        5,
        "nothing new is started once the stop began"
    );
    let acked = ids(&handled_first[..4]);
    let handed_back = handled_first[4].id().to_owned();

    let second = Seen::new();
    let listener = listen(
        &connection,
        recording(&event_type, &second),
        options(&durable),
    )
    .await;
    let all = ids(&sent);
    let got = second
        .wait_until("the rest", |got| {
            let mut union = ids(got);
            union.extend(acked.iter().cloned());
            union == all
        })
        .await;
    assert!(ids(&got).is_disjoint(&acked), "acked events came again");
    assert!(
        ids(&got).contains(&handed_back),
        "the abandoned event came back"
    );
    assert_eq!(first.len(), 5, "a stopped listener handles nothing more");
    gate.open();
    wait_settled(&env, &config, &durable).await;
    listener.stop(Duration::from_secs(5)).await;
}

/// An event whose listener died mid-handler (no ack, no nak) is redelivered after the ack wait.
pub async fn unacked_event_is_redelivered_after_ack_wait<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("crash");
    let durable = new_durable();
    let options = EventListenOptions {
        ack_wait: Some(Duration::from_secs(1)),
        ..one_worker(&durable)
    };
    let gate = Gate::new();
    let started: Seen<ReceivedEvent> = Seen::new();
    let (g, s) = (gate.clone(), started.clone());
    let handlers = EventHandlers::new().on(
        &event_type,
        event_handler_fn(move |e, _| {
            let (gate, started) = (g.clone(), s.clone());
            async move {
                started.push(e);
                gate.wait().await;
                Ok(())
            }
        }),
    );
    let crashed = listen(&connection, handlers, options.clone()).await;
    let e = event(&event_type, &json!(1));
    publish(&connection, e.clone()).await;
    started.wait_len("the first delivery", 1).await;
    within("abort", crashed.abort()).await;
    let begin = Instant::now();
    let again = Seen::new();
    let listener = listen(&connection, recording(&event_type, &again), options).await;
    let got = again.wait_len("the redelivery after the ack wait", 1).await;
    assert_eq!(got[0].id(), e.id());
    assert!(begin.elapsed() < Duration::from_secs(8));
    wait_settled(&env, &config, &durable).await;
    gate.open();
    listener.stop(Duration::from_secs(5)).await;
}

/// A handler that runs longer than the ack wait keeps its event (in-progress): no redelivery
/// while it runs.
pub async fn long_handler_is_not_redelivered<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("long");
    let durable = new_durable();
    let starts: Seen<Instant> = Seen::new();
    let recorder = starts.clone();
    let handlers = EventHandlers::new().on(
        &event_type,
        event_handler_fn(move |_, _| {
            let recorder = recorder.clone();
            async move {
                recorder.push(Instant::now());
                // Work that outlasts the ack wait (1 s) more than twice.
                tokio::time::sleep(Duration::from_millis(2500)).await;
                Ok(())
            }
        }),
    );
    let options = EventListenOptions {
        pool: ce_messaging::WorkerOptions::new(2, 4),
        ack_wait: Some(Duration::from_secs(1)),
        ..options(&durable)
    };
    let listener = listen(&connection, handlers, options).await;
    publish(&connection, event(&event_type, &json!(1))).await;
    starts.wait_len("the delivery", 1).await;
    wait_settled(&env, &config, &durable).await;
    assert_eq!(
        starts.len(),
        1,
        "redelivered while the handler was still working"
    );
    listener.stop(Duration::from_secs(5)).await;
}

fn assert_dead_letter(
    letter: &Stored,
    config: &Config,
    durable: &str,
    original: &Event,
    sequence: u64,
    reason: &str,
    deliveries: u64,
) {
    assert_eq!(
        letter.subject,
        format!("deadletter.{}.{}", config.js_stream, durable)
    );
    assert_eq!(
        letter.header(headers::DEAD_LETTER_REASON).as_deref(),
        Some(reason)
    );
    assert_eq!(
        letter.header(headers::DEAD_LETTER_SUBJECT),
        Some(config.events_subject(original.ty()))
    );
    assert_eq!(
        letter.header(headers::DEAD_LETTER_STREAM_SEQ),
        Some(sequence.to_string())
    );
    assert_eq!(
        letter.header(headers::DEAD_LETTER_DELIVERIES),
        Some(deliveries.to_string())
    );
    assert!(letter
        .header(headers::DEAD_LETTER_ERROR)
        .is_some_and(|e| !e.is_empty()));
    let kept = codec::decode(Some(&letter.headers), &letter.payload).expect("original kept");
    assert_eq!(kept.id(), original.id());
    assert_eq!(
        kept.data_as::<Value>().ok(),
        original.data_as::<Value>().ok()
    );
}

/// An event that fails on every delivery is dead-lettered (reason `max-deliveries`) after
/// `max_deliver` attempts, original headers and payload unchanged, and leaves the consumer.
pub async fn max_deliveries_go_to_dead_letter<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("poison");
    let durable = new_durable();
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let handlers = EventHandlers::new().on(
        &event_type,
        event_handler_fn(move |_, _| {
            let a = a.clone();
            async move {
                a.fetch_add(1, Ordering::SeqCst);
                Err(HandlerError::new("always fails").retry_after(Duration::from_millis(20)))
            }
        }),
    );
    let options = EventListenOptions {
        max_deliver: Some(3),
        ..options(&durable)
    };
    let listener = listen(&connection, handlers, options).await;
    let e = event(&event_type, &json!({"order": 7}));
    let ack = publish(&connection, e.clone()).await;
    let letters = wait_dead_letters(&env, &config, 1).await;
    wait_settled(&env, &config, &durable).await;
    assert_eq!(letters.len(), 1);
    assert_dead_letter(
        &letters[0],
        &config,
        &durable,
        &e,
        ack.sequence,
        "max-deliveries",
        3,
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    listener.stop(Duration::from_secs(5)).await;
}

/// An event a handler rejects as permanent (or whose data does not fit the handler's type) is
/// dead-lettered at once with reason `rejected`.
pub async fn rejected_event_goes_to_dead_letter<B: EventBackend>() {
    #[derive(serde::Deserialize)]
    struct Order {
        #[allow(dead_code)]
        id: u64,
    }
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let (rejecting, typed) = (new_type("reject"), new_type("typed"));
    let durable = new_durable();
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let handlers = EventHandlers::new()
        .on(
            &rejecting,
            event_handler_fn(move |_, _| {
                let a = a.clone();
                async move {
                    a.fetch_add(1, Ordering::SeqCst);
                    Err(HandlerError::permanent("order is malformed"))
                }
            }),
        )
        .on(
            &typed,
            typed_event_handler(|_: TypedEvent<Order>| async { Ok(()) }),
        );
    let listener = listen(&connection, handlers, one_worker(&durable)).await;
    let first = event(&rejecting, &json!(1));
    let first_ack = publish(&connection, first.clone()).await;
    let letters = wait_dead_letters(&env, &config, 1).await;
    assert_dead_letter(
        &letters[0],
        &config,
        &durable,
        &first,
        first_ack.sequence,
        "rejected",
        1,
    );
    assert_eq!(
        letters[0].header(headers::DEAD_LETTER_ERROR).as_deref(),
        Some("order is malformed")
    );
    let second = event(&typed, &json!("not an order"));
    let second_ack = publish(&connection, second.clone()).await;
    let letters = wait_dead_letters(&env, &config, 2).await;
    assert_dead_letter(
        &letters[1],
        &config,
        &durable,
        &second,
        second_ack.sequence,
        "rejected",
        1,
    );
    wait_settled(&env, &config, &durable).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        1,
        "no retry of a permanent failure"
    );
    listener.stop(Duration::from_secs(5)).await;
}

/// Bytes that are not a CloudEvent are dead-lettered with reason `decode`, unchanged, and the
/// listener goes on.
pub async fn undecodable_message_goes_to_dead_letter<B: EventBackend>() {
    if cannot_publish_raw::<B>("undecodable_message_goes_to_dead_letter") {
        return;
    }
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("garbage");
    let durable = new_durable();
    let seen = Seen::new();
    let listener = listen(
        &connection,
        recording(&event_type, &seen),
        one_worker(&durable),
    )
    .await;
    let subject = config.events_subject(&event_type);
    let mut raw_headers = HeaderMap::new();
    raw_headers.insert("X-Conf", "kept");
    env.publish_raw(
        &subject,
        raw_headers,
        Bytes::from_static(b"\xff not an event {"),
    )
    .await;
    let good = event(&event_type, &json!(1));
    publish(&connection, good.clone()).await;
    seen.wait_len("the good event after the bad one", 1).await;
    let letters = wait_dead_letters(&env, &config, 1).await;
    let letter = &letters[0];
    assert_eq!(
        letter.header(headers::DEAD_LETTER_REASON).as_deref(),
        Some("decode")
    );
    assert_eq!(letter.header(headers::DEAD_LETTER_SUBJECT), Some(subject));
    assert_eq!(letter.header("X-Conf").as_deref(), Some("kept"));
    assert_eq!(&letter.payload[..], b"\xff not an event {");
    wait_settled(&env, &config, &durable).await;
    listener.stop(Duration::from_secs(5)).await;
}

/// At most `workers` event handlers run at once, and that many do.
pub async fn event_worker_bound_is_never_exceeded<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("bounded");
    let durable = new_durable();
    let peak = Peak::new();
    let gate = Gate::new();
    let done = Seen::new();
    let (p, g, d) = (peak.clone(), gate.clone(), done.clone());
    let handlers = EventHandlers::new().on(
        &event_type,
        event_handler_fn(move |e, _| {
            let (peak, gate, done) = (p.clone(), g.clone(), d.clone());
            async move {
                let _running = peak.enter();
                gate.wait().await;
                done.push(e);
                Ok(())
            }
        }),
    );
    let options = EventListenOptions {
        pool: ce_messaging::WorkerOptions::new(3, 8),
        ..options(&durable)
    };
    let listener = listen(&connection, handlers, options).await;
    let sent: Vec<Event> = (0..20).map(|n| event(&event_type, &json!(n))).collect();
    let results = within("publish_all", connection.publish_all(sent.clone())).await;
    assert!(results.iter().all(|r| r.is_ok()));
    peak.wait_running(3).await;
    gate.open();
    let all = ids(&sent);
    done.wait_until("all 20 handled", |got| ids(got) == all)
        .await;
    assert_eq!(peak.max(), 3, "never more than 3 handlers at once");
    wait_settled(&env, &config, &durable).await;
    listener.stop(Duration::from_secs(5)).await;
}

fn gated_recording(
    event_type: &str,
    gate: &Gate,
    started: &Seen<ReceivedEvent>,
    finished: &Seen<ReceivedEvent>,
) -> EventHandlers {
    let (g, s, f) = (gate.clone(), started.clone(), finished.clone());
    EventHandlers::new().on(
        event_type,
        event_handler_fn(move |e, _| {
            let (gate, started, finished) = (g.clone(), s.clone(), f.clone());
            async move {
                started.push(e.clone());
                gate.wait().await;
                finished.push(e);
                Ok(())
            }
        }),
    )
}

/// Stopping lets the handler in flight finish and ack; events published afterwards wait for the
/// next listener.
pub async fn event_graceful_stop_finishes_in_flight_and_refuses_new<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("graceful");
    let durable = new_durable();
    let (started, finished): (Seen<ReceivedEvent>, Seen<ReceivedEvent>) =
        (Seen::new(), Seen::new());
    let (s, f) = (started.clone(), finished.clone());
    let handlers = EventHandlers::new().on(
        &event_type,
        event_handler_fn(move |e, _| {
            let (started, finished) = (s.clone(), f.clone());
            async move {
                started.push(e.clone());
                // Work that is still going on when the stop begins.
                tokio::time::sleep(Duration::from_millis(500)).await;
                finished.push(e);
                Ok(())
            }
        }),
    );
    let listener = listen(&connection, handlers, one_worker(&durable)).await;
    let first = event(&event_type, &json!(1));
    publish(&connection, first.clone()).await;
    started.wait_len("the handler to start", 1).await;
    let report = within("the stop", listener.stop(Duration::from_secs(10))).await;
    assert_eq!(report.finished, 1, "{report:?}");
    assert_eq!(report.abandoned, 0, "{report:?}");
    assert_eq!(ids(&finished.snapshot()), ids(std::slice::from_ref(&first)));
    wait_settled(&env, &config, &durable).await;

    let second = event(&event_type, &json!(2));
    publish(&connection, second.clone()).await;
    eventually("the new event to wait, undelivered", || async {
        env.consumer_state(&config.js_stream, &durable).await
            == Some(ConsumerState {
                pending: 1,
                ack_pending: 0,
            })
    })
    .await;
    assert_eq!(started.len(), 1, "a stopped listener takes nothing new");
    let next = Seen::new();
    let listener = listen(
        &connection,
        recording(&event_type, &next),
        options(&durable),
    )
    .await;
    let got = next.wait_len("the next listener to get it", 1).await;
    assert_eq!(
        got[0].id(),
        second.id(),
        "the finished event was acked, not redelivered"
    );
    wait_settled(&env, &config, &durable).await;
    listener.stop(Duration::from_secs(5)).await;
}

/// A handler still running when the grace period ends is abandoned and its event handed back at
/// once (not after the ack wait): the next listener gets it.
pub async fn event_stop_after_grace_hands_the_event_back<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("abandoned");
    let durable = new_durable();
    let gate = Gate::new();
    let (started, finished) = (Seen::new(), Seen::new());
    let long_ack_wait = EventListenOptions {
        ack_wait: Some(Duration::from_secs(30)),
        ..one_worker(&durable)
    };
    let listener = listen(
        &connection,
        gated_recording(&event_type, &gate, &started, &finished),
        long_ack_wait.clone(),
    )
    .await;
    let e = event(&event_type, &json!(1));
    publish(&connection, e.clone()).await;
    started.wait_len("the handler to start", 1).await;
    let report = within("the stop", listener.stop(Duration::from_millis(200))).await;
    assert_eq!(report.abandoned, 1, "{report:?}");
    assert!(finished.len() == 0);
    let next = Seen::new();
    let listener = listen(&connection, recording(&event_type, &next), long_ack_wait).await;
    let got = next
        .wait_len("the handed-back event (well before the 30 s ack wait)", 1)
        .await;
    assert_eq!(got[0].id(), e.id());
    wait_settled(&env, &config, &durable).await;
    gate.open();
    listener.stop(Duration::from_secs(5)).await;
}

/// A stop whose grace period runs out hands back every event it holds (the one cut off and
/// those still queued for a worker) before it returns, so closing the connection right after
/// the stop (as `Shutdown` does) loses none of the hand-backs: a successor gets them all well
/// before the 30 s ack wait. (JetStream: queued deliveries nak from their ackers' drop; before
/// the stop waited for those naks, some were sent after the connection had closed.)
pub async fn stop_then_close_hands_back_every_queued_event<B: EventBackend>() {
    const WORKERS: usize = 4;
    const QUEUED: usize = 32;
    let env = B::start().await;
    let config = env.config("svc");
    let publisher = env.events(&config).await;
    let connection = env.events(&config).await;
    let event_type = new_type("handback");
    let durable = new_durable();
    let gate = Gate::new();
    let (started, finished) = (Seen::new(), Seen::new());
    let long_ack_wait = EventListenOptions {
        pool: ce_messaging::WorkerOptions::new(WORKERS, QUEUED),
        ack_wait: Some(Duration::from_secs(30)),
        ..options(&durable)
    };
    let sent: Vec<Event> = (0..WORKERS + QUEUED)
        .map(|n| event(&event_type, &json!(n)))
        .collect();
    for e in &sent {
        publish(&publisher, e.clone()).await;
    }
    let listener = listen(
        &connection,
        gated_recording(&event_type, &gate, &started, &finished),
        long_ack_wait.clone(),
    )
    .await;
    started.wait_len("every worker busy", WORKERS).await;
    // Every event is in the listener's hands: one per worker running, the rest queued.
    eventually("every event delivered and unacknowledged", || async {
        env.consumer_state(&config.js_stream, &durable).await
            == Some(ConsumerState {
                pending: 0,
                ack_pending: sent.len() as u64,
            })
    })
    .await;
    let report = within("the stop", listener.stop(Duration::from_millis(200))).await;
    B::close_events(&connection).await;
    assert_eq!(report.abandoned, WORKERS as u64, "{report:?}");
    assert_eq!(started.len(), WORKERS, "queued events did not start");
    assert_eq!(finished.len(), 0);
    let next = Seen::new();
    let successor = listen(&publisher, recording(&event_type, &next), long_ack_wait).await;
    let got = next
        .wait_len(
            "every handed-back event (well before the 30 s ack wait)",
            sent.len(),
        )
        .await;
    assert_eq!(ids(&got), ids(&sent));
    wait_settled(&env, &config, &durable).await;
    gate.open();
    successor.stop(Duration::from_secs(5)).await;
    assert!(
        env.stored(&config.js_dlq_stream).await.is_empty(),
        "nothing dead-lettered"
    );
}

/// Cancelling the listener's token stops it; what is published afterwards waits for the next.
pub async fn cancelled_token_stops_event_listener<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("token");
    let durable = new_durable();
    let seen = Seen::new();
    let listener = listen(
        &connection,
        recording(&event_type, &seen),
        options(&durable),
    )
    .await;
    publish(&connection, event(&event_type, &json!(1))).await;
    seen.wait_len("the first event", 1).await;
    listener.cancellation_token().cancel();
    within("the listener to stop", listener.stopped()).await;
    let later = event(&event_type, &json!(2));
    publish(&connection, later.clone()).await;
    let next = Seen::new();
    let listener2 = listen(
        &connection,
        recording(&event_type, &next),
        options(&durable),
    )
    .await;
    let got = next.wait_len("the event published after the stop", 1).await;
    assert_eq!(got[0].id(), later.id());
    assert_eq!(seen.len(), 1, "the cancelled listener handled nothing more");
    listener2.stop(Duration::from_secs(5)).await;
}

/// Many listeners of one durable stop at the same time without hanging; a new one gets the
/// events published afterwards.
pub async fn event_listeners_close_concurrently<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let event_type = new_type("many");
    let durable = new_durable();
    let seen = Seen::new();
    let mut listeners = Vec::new();
    for _ in 0..5 {
        let connection = env.events(&env.config("svc")).await;
        listeners.push(
            listen(
                &connection,
                recording(&event_type, &seen),
                options(&durable),
            )
            .await,
        );
    }
    let publisher = env.events(&config).await;
    let sent: Vec<Event> = (0..10).map(|n| event(&event_type, &json!(n))).collect();
    within("publish_all", publisher.publish_all(sent.clone())).await;
    let all = ids(&sent);
    seen.wait_until("the first 10", |got| ids(got) == all).await;
    stop_all(&listeners).await;
    assert!(listeners.iter().all(Listener::is_stopped));
    let later: Vec<Event> = (0..5).map(|n| event(&event_type, &json!(n))).collect();
    within("publish_all", publisher.publish_all(later.clone())).await;
    let next = Seen::new();
    let listener = listen(&publisher, recording(&event_type, &next), options(&durable)).await;
    let want = ids(&later);
    next.wait_until("the later 5", |got| ids(got) == want).await;
    wait_settled(&env, &config, &durable).await;
    listener.stop(Duration::from_secs(5)).await;
}

/// Closing a publisher with publishes in flight loses none that were acknowledged, and a
/// publish after the close fails and hands the event back.
pub async fn publisher_close_keeps_acknowledged_publishes<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("pub");
    let publisher = env.events(&config).await;
    let event_type = new_type("closing");
    let sent: Vec<Event> = (0..50).map(|n| event(&event_type, &json!(n))).collect();
    let in_flight = tokio::spawn({
        let (publisher, sent) = (publisher.clone(), sent.clone());
        async move {
            join_all(sent.into_iter().map(|e| {
                let publisher = publisher.clone();
                async move { publisher.publish(e).await }
            }))
            .await
        }
    });
    tokio::task::yield_now().await;
    within("close", B::close_events(&publisher)).await;
    let results = within("the in-flight publishes to end", in_flight)
        .await
        .expect("join");
    let mut acked = BTreeSet::new();
    for (result, e) in results.into_iter().zip(&sent) {
        match result {
            Ok(_) => {
                acked.insert(e.id().to_owned());
            }
            Err(err) => assert_eq!(
                err.into_event().map(|b| b.id().to_owned()),
                Some(e.id().to_owned())
            ),
        }
    }
    let stored: BTreeSet<String> = env
        .stored(&config.js_stream)
        .await
        .iter()
        .map(|m| {
            codec::decode(Some(&m.headers), &m.payload)
                .expect("event")
                .id()
                .to_owned()
        })
        .collect();
    assert!(acked.is_subset(&stored), "an acknowledged publish was lost");
    let after = event(&event_type, &json!("after"));
    let err = within("publish after close", publisher.publish(after.clone()))
        .await
        .expect_err("the connection is closed");
    assert_eq!(
        err.into_event().map(|b| b.id().to_owned()),
        Some(after.id().to_owned())
    );
}

/// Responds to `request_type` with `response_type`, echoing the request data.
fn responder(request_type: &str, response_type: &str) -> EventHandlers {
    let response_type = response_type.to_owned();
    EventHandlers::new().on(
        request_type,
        event_handler_fn(move |e: ReceivedEvent, responses| {
            let response_type = response_type.clone();
            async move {
                let data: Value = e.data_as()?;
                responses
                    .respond_data(&response_type, &json!({ "echo": data }))
                    .await?;
                Ok(())
            }
        }),
    )
}

/// A request event's promise gets the response with the same transaction id.
pub async fn promise_gets_response_by_transaction_id<B: EventBackend>() {
    let env = B::start().await;
    let service_config = env.config("svc");
    let service = env.events(&service_config).await;
    let client = env.events(&env.config("cli")).await;
    let (request_type, response_type) = (new_type("quote.requested"), new_type("quote.given"));
    let listener = listen(
        &service,
        responder(&request_type, &response_type),
        options(&new_durable()),
    )
    .await;
    let request = event(&request_type, &json!({"item": "a"}));
    let tid = request.transaction_id().expect("tid");
    let mut promise = within(
        "request",
        client.request(request, &[EventType::from(response_type.as_str())]),
    )
    .await
    .expect("promise");
    assert_eq!(promise.transaction_id(), &tid);
    let response = within("response", promise.response(Duration::from_secs(5)))
        .await
        .expect("response");
    assert_eq!(response.ty(), response_type);
    assert_eq!(response.transaction_id(), Some(tid));
    // `respond_data` fills in the responding listener's source (its client id), shared by
    // every delivery of the listener.
    assert_eq!(response.source(), service_config.client_id);
    assert_eq!(
        response.data_as::<Value>().expect("data"),
        json!({"echo": {"item": "a"}})
    );
    listener.stop(Duration::from_secs(5)).await;
}

/// A response published the instant the promise exists is not missed (listening starts before
/// publishing).
pub async fn promise_catches_an_immediate_response<B: EventBackend>() {
    let env = B::start().await;
    let client = env.events(&env.config("cli")).await;
    let responder_connection = env.events(&env.config("svc")).await;
    let response_type = new_type("answer");
    for _ in 0..10 {
        let tid = TransactionId::generate();
        let mut promise = within(
            "promise",
            client.wait_for_response(&tid, &[EventType::from(response_type.as_str())]),
        )
        .await
        .expect("promise");
        let response =
            new_event_with_tid(&response_type, "responder", &json!(1), tid.clone()).expect("event");
        publish(&responder_connection, response).await;
        let got = within("response", promise.response(Duration::from_secs(5)))
            .await
            .expect("the immediate response");
        assert_eq!(got.transaction_id(), Some(tid));
    }
}

/// Many requests in flight at once each get their own response, never another's.
pub async fn concurrent_promises_do_not_cross<B: EventBackend>() {
    let env = B::start().await;
    let service = env.events(&env.config("svc")).await;
    let client = env.events(&env.config("cli")).await;
    let (request_type, response_type) = (new_type("req"), new_type("resp"));
    let listener = listen(
        &service,
        responder(&request_type, &response_type),
        options(&new_durable()),
    )
    .await;
    let requests = (0..20).map(|n| {
        let client = client.clone();
        let (request_type, response_type) = (request_type.clone(), response_type.clone());
        async move {
            let mut promise = client
                .request(
                    event(&request_type, &json!(n)),
                    &[EventType::from(response_type.as_str())],
                )
                .await
                .expect("promise");
            let response = promise
                .response(Duration::from_secs(8))
                .await
                .expect("response");
            (n, response.data_as::<Value>().expect("data"))
        }
    });
    for (n, data) in within("20 responses", join_all(requests)).await {
        assert_eq!(data, json!({"echo": n}));
    }
    listener.stop(Duration::from_secs(5)).await;
}

/// A promise with no response times out; a response with another transaction id does not count.
pub async fn promise_times_out_without_response<B: EventBackend>() {
    let env = B::start().await;
    let client = env.events(&env.config("cli")).await;
    let response_type = new_type("never");
    let tid = TransactionId::generate();
    let mut promise = within(
        "promise",
        client.wait_for_response(&tid, &[EventType::from(response_type.as_str())]),
    )
    .await
    .expect("promise");
    let other = new_event_with_tid(&response_type, "x", &json!(1), TransactionId::generate())
        .expect("event");
    publish(&client, other).await;
    let begin = Instant::now();
    let err = within(
        "the promise to time out",
        promise.response(Duration::from_millis(500)),
    )
    .await
    .expect_err("no response");
    assert_eq!(err.kind(), ResponseErrorKind::TimedOut, "{err}");
    assert!(begin.elapsed() >= Duration::from_millis(450));
}

/// EventSource listeners: by type, once, removed; the subscription goes with the last listener.
pub async fn event_source_add_remove_once<B: EventBackend>() {
    let env = B::start().await;
    let client = env.events(&env.config("cli")).await;
    let publisher = env.events(&env.config("pub")).await;
    let source = client.event_source();
    let event_type = new_type("watched");
    let (all, once) = (Seen::new(), Seen::new());
    let (a, o) = (all.clone(), once.clone());
    let id_all = within(
        "add",
        source.add_listener(EventFilter::by_type(event_type.as_str()), move |e| {
            a.push(e)
        }),
    )
    .await
    .expect("added");
    within(
        "add",
        source.add_listener(EventFilter::by_type(event_type.as_str()).once(), move |e| {
            o.push(e)
        }),
    )
    .await
    .expect("added");
    assert_eq!(source.listener_count(), 2);
    assert_eq!(source.subscription_count(), 1, "one subscription per type");
    let sent: Vec<Event> = (0..3).map(|n| event(&event_type, &json!(n))).collect();
    for e in &sent {
        publish(&publisher, e.clone()).await;
    }
    let got = all.wait_len("3 events", 3).await;
    assert_eq!(ids(&got), ids(&sent));
    let first = once.snapshot();
    assert_eq!(first.len(), 1, "a once listener fires once");
    assert_eq!(first[0].id(), sent[0].id());
    assert_eq!(source.listener_count(), 1, "a once listener removes itself");
    assert!(within("remove", source.remove_listener(id_all)).await);
    assert!(
        !within("remove", source.remove_listener(id_all)).await,
        "already removed"
    );
    assert_eq!(source.listener_count(), 0);
    assert_eq!(
        source.subscription_count(),
        0,
        "the subscription goes with the last listener"
    );

    let later = Seen::new();
    let l = later.clone();
    within(
        "add",
        source.add_listener(EventFilter::by_type(event_type.as_str()), move |e| {
            l.push(e)
        }),
    )
    .await
    .expect("added");
    let last = event(&event_type, &json!("last"));
    publish(&publisher, last.clone()).await;
    let got = later.wait_len("the event after re-adding", 1).await;
    assert_eq!(got[0].id(), last.id());
    assert_eq!(all.len(), 3, "a removed listener hears nothing");
}

/// EventSource listeners by transaction id (any type), and by type and transaction id.
pub async fn event_source_filters_by_transaction<B: EventBackend>() {
    let env = B::start().await;
    let client = env.events(&env.config("cli")).await;
    let publisher = env.events(&env.config("pub")).await;
    let source = client.event_source();
    let (type_t, type_u) = (new_type("t"), new_type("u"));
    let (tid_1, tid_2, tid_3) = (
        TransactionId::generate(),
        TransactionId::generate(),
        TransactionId::generate(),
    );
    let (by_tid, by_both, marker) = (Seen::new(), Seen::new(), Seen::new());
    let (a, b, m) = (by_tid.clone(), by_both.clone(), marker.clone());
    within(
        "add",
        source.add_listener(EventFilter::by_transaction(tid_1.clone()), move |e| {
            a.push(e)
        }),
    )
    .await
    .expect("added");
    within(
        "add",
        source.add_listener(
            EventFilter::by_type(type_t.as_str()).and_transaction(tid_2.clone()),
            move |e| b.push(e),
        ),
    )
    .await
    .expect("added");
    within(
        "add",
        source.add_listener(EventFilter::by_type(type_t.as_str()), move |e| m.push(e)),
    )
    .await
    .expect("added");
    let mk = |t: &str, tid: &TransactionId| {
        new_event_with_tid(t, "pub", &json!(null), tid.clone()).expect("event")
    };
    let sequence = [
        mk(&type_t, &tid_1),
        mk(&type_t, &tid_2),
        mk(&type_u, &tid_2),
        mk(&type_u, &tid_1),
        mk(&type_t, &tid_3),
        mk(&type_t, &tid_1),
    ];
    for e in &sequence {
        publish(&publisher, e.clone()).await;
    }
    // The last event matches every listener: once each has it, each has seen everything before.
    let last = sequence[5].id().to_owned();
    let got = by_tid
        .wait_until("the last tid-1 event", |s| s.iter().any(|e| e.id() == last))
        .await;
    assert_eq!(
        ids(&got),
        ids(&[
            sequence[0].clone(),
            sequence[3].clone(),
            sequence[5].clone()
        ])
    );
    marker
        .wait_until("the last type-t event", |s| {
            s.iter().any(|e| e.id() == last)
        })
        .await;
    assert_eq!(ids(&by_both.snapshot()), ids(&[sequence[1].clone()]));
}

/// A listener waiting for a transaction id gets every event that decodes with that id, however
/// the sender wrote it, and no other: the id escaped in a JSON string, a `transactionid` member
/// written twice (the last counts), its name escaped, a percent-encoded `ce-transactionid`
/// header. (The event source skips others' events by reading their transaction id before
/// decoding them; this holds that reading to what `decode` makes of the message.)
pub async fn event_source_reads_transaction_ids_as_decode_does<B: EventBackend>() {
    if cannot_publish_raw::<B>("event_source_reads_transaction_ids_as_decode_does") {
        return;
    }
    let env = B::start().await;
    let config = env.config("cli");
    let client = env.events(&config).await;
    let source = client.event_source();
    let event_type = new_type("tidread");
    let subject = config.events_subject(&event_type);
    let wanted = TransactionId::generate();
    let seen = Seen::new();
    let s = seen.clone();
    within(
        "add",
        source.add_listener(EventFilter::by_transaction(wanted.clone()), move |e| {
            s.push(e)
        }),
    )
    .await
    .expect("added");
    let tid = wanted.as_str();
    // `tid-...`: its first letter escaped as JSON and as a percent-encoded header value.
    let escaped = format!("\\u0074{}", &tid[1..]);
    let percent = format!("%74{}", &tid[1..]);
    let structured = |id: &str, members: &str| {
        Bytes::from(format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"raw","type":"{event_type}"{members}}}"#
        ))
    };
    let ce_json = || {
        let mut h = HeaderMap::new();
        h.insert("Content-Type", "application/cloudevents+json");
        h
    };
    let raw: Vec<(&str, HeaderMap, Bytes)> = vec![
        (
            "escaped",
            ce_json(),
            structured("escaped", &format!(r#","transactionid":"{escaped}""#)),
        ),
        (
            "other",
            ce_json(),
            structured("other", r#","transactionid":"tid-someone-else""#),
        ),
        (
            "twice",
            HeaderMap::new(),
            structured(
                "twice",
                &format!(r#","transactionid":"tid-someone-else","data":1,"transactionid":"{tid}""#),
            ),
        ),
        (
            "other-last",
            ce_json(),
            structured(
                "other-last",
                &format!(r#","transactionid":"{tid}","transactionid":"tid-someone-else""#),
            ),
        ),
        (
            "name-escaped",
            ce_json(),
            structured(
                "name-escaped",
                &format!(r#","transactionid":"tid-someone-else","transacti\u006fnid":"{tid}""#),
            ),
        ),
        (
            "binary",
            {
                let mut h = HeaderMap::new();
                h.insert("ce-specversion", "1.0");
                h.insert("ce-id", "binary");
                h.insert("ce-source", "raw");
                h.insert("ce-type", event_type.as_str());
                h.insert("ce-transactionid", percent.as_str());
                h
            },
            Bytes::new(),
        ),
        (
            "plain",
            ce_json(),
            structured("plain", &format!(r#","transactionid":"{tid}""#)),
        ),
    ];
    for (_, headers, payload) in raw {
        env.publish_raw(&subject, headers, payload).await;
    }
    // The last one is plain: once it is seen, everything before it was read.
    let got = seen
        .wait_until("the plain event", |s| s.iter().any(|e| e.id() == "plain"))
        .await;
    let got: Vec<&str> = got.iter().map(|e| e.id()).collect();
    assert_eq!(got, ["escaped", "twice", "name-escaped", "binary", "plain"]);
    for e in seen.snapshot() {
        assert_eq!(e.transaction_id().as_ref(), Some(&wanted), "{}", e.id());
    }
}

/// An event of `event_type` (which need not be valid: the type is set after building).
fn event_of_type(event_type: &str) -> Event {
    let mut e = event("conf.placeholder", &json!("bad"));
    e.set_type(event_type);
    e
}

/// A type that is not a valid subject-token sequence is refused at once with a typed error
/// wherever it enters: publish (`InvalidType`, the event handed back), each bad event of a
/// `publish_all` batch (the good ones are stored), listen and EventSource (`InvalidOptions`),
/// and the response types of a request (`Listen`). Nothing of it is stored; a 255-byte type
/// (the bound) works.
pub async fn invalid_event_types_are_refused_at_once<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let at_once = Duration::from_secs(2);
    for bad in super::invalid_types() {
        let e = event_of_type(&bad);
        let err = super::within_for(
            at_once,
            &format!("publish {bad:?}"),
            connection.publish(e.clone()),
        )
        .await
        .expect_err(&format!("publishing type {bad:?} must fail"));
        assert_eq!(err.kind(), PublishErrorKind::InvalidType, "{bad:?}: {err}");
        assert_eq!(
            err.into_event().map(|b| b.id().to_owned()),
            Some(e.id().to_owned())
        );

        let handlers = recording(&bad, &Seen::new());
        let err = super::within_for(
            at_once,
            &format!("listen {bad:?}"),
            connection.listen(handlers, options(&new_durable())),
        )
        .await
        .expect_err(&format!("listening to type {bad:?} must fail"));
        assert_eq!(
            err.kind(),
            ce_messaging::error::ListenErrorKind::InvalidOptions,
            "{bad:?}: {err}"
        );

        let err = super::within_for(
            at_once,
            &format!("add_listener {bad:?}"),
            connection
                .event_source()
                .add_listener(EventFilter::by_type(bad.as_str()), |_| {}),
        )
        .await
        .expect_err(&format!(
            "an EventSource listener of type {bad:?} must fail"
        ));
        assert_eq!(
            err.kind(),
            ce_messaging::error::ListenErrorKind::InvalidOptions,
            "{bad:?}: {err}"
        );

        let request = event(&new_type("ask"), &json!(1));
        let err = super::within_for(
            at_once,
            &format!("request awaiting {bad:?}"),
            connection.request(request, &[EventType::from(bad.as_str())]),
        )
        .await
        .expect_err(&format!("a promise of type {bad:?} must fail"));
        assert_eq!(err.kind(), ResponseErrorKind::Listen, "{bad:?}: {err}");
    }
    assert_eq!(connection.event_source().listener_count(), 0);

    let good_type = new_type("good");
    let batch = vec![
        event(&good_type, &json!(1)),
        event_of_type("conf.bad..type"),
        event(&good_type, &json!(2)),
        event_of_type("conf.bad.*"),
    ];
    let results = super::within_for(
        at_once,
        "publish_all",
        connection.publish_all(batch.clone()),
    )
    .await;
    assert_eq!(results.len(), 4);
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    for i in [1, 3] {
        let err = results[i].as_ref().expect_err("a bad type in a batch");
        assert_eq!(err.kind(), PublishErrorKind::InvalidType, "{err}");
    }
    let longest = super::longest_valid_type();
    publish(&connection, event(&longest, &json!("at the bound"))).await;

    let stored = env.stored(&config.js_stream).await;
    let stored_types: Vec<String> = stored.iter().map(|m| m.subject.clone()).collect();
    assert_eq!(
        stored_types,
        vec![
            config.events_subject(&good_type),
            config.events_subject(&good_type),
            config.events_subject(&longest),
        ],
        "only the valid events are stored"
    );
    assert!(env.stored(&config.js_dlq_stream).await.is_empty());
}

/// An event its receivers would refuse or read as another event (an extension name with
/// capitals, an extension named `type`, an empty `subject`, a `datacontenttype` that is no
/// media type) is refused when published, at once, with the event
/// handed back: by `publish`, per event by `publish_all`, and by `request`. Nothing of it is
/// stored or dead-lettered; the listener gets the good events only and settles them.
pub async fn events_receivers_refuse_are_refused_when_published<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("refused");
    let durable = new_durable();
    let seen = Seen::new();
    let listener = listen(
        &connection,
        recording(&event_type, &seen),
        options(&durable),
    )
    .await;
    let at_once = Duration::from_secs(2);
    type Spoil = fn(&mut Event);
    let spoils: [(&str, Spoil); 4] = [
        ("extension `MyExt`", |e| {
            e.set_extension("MyExt", "v");
        }),
        (
            "extension `type`: the name of a CloudEvents attribute",
            |e| {
                e.set_extension("type", "org.example.other");
            },
        ),
        ("`subject` is empty", |e| {
            e.set_subject(Some(""));
        }),
        ("not an RFC 2046 media type", |e| {
            e.set_datacontenttype(Some("json"));
        }),
    ];
    let spoiled = |spoil: Spoil| {
        let mut e = event(&event_type, &json!("bad"));
        spoil(&mut e);
        e
    };
    for (words, spoil) in spoils {
        let bad = spoiled(spoil);
        let err = super::within_for(at_once, words, connection.publish(bad.clone()))
            .await
            .expect_err(words);
        assert_eq!(err.kind(), PublishErrorKind::Encode, "{words}: {err}");
        let text = err.to_string();
        assert!(
            text.contains(words) && text.contains("receivers refuse"),
            "{words}: {text}"
        );
        assert_eq!(
            err.into_event().map(|b| b.id().to_owned()),
            Some(bad.id().to_owned())
        );
        let err = super::within_for(
            at_once,
            words,
            connection.request(spoiled(spoil), &[EventType::from(new_type("re").as_str())]),
        )
        .await
        .expect_err(words);
        assert_eq!(err.kind(), ResponseErrorKind::Publish, "{words}: {err}");
    }
    assert_eq!(connection.event_source().listener_count(), 0);
    let good = [event(&event_type, &json!(1)), event(&event_type, &json!(2))];
    let batch = vec![
        good[0].clone(),
        spoiled(spoils[0].1),
        good[1].clone(),
        spoiled(spoils[1].1),
    ];
    let results = super::within_for(at_once, "publish_all", connection.publish_all(batch)).await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    for i in [1, 3] {
        let err = results[i].as_ref().expect_err("a refused event in a batch");
        assert_eq!(err.kind(), PublishErrorKind::Encode, "{err}");
    }
    let got = seen.wait_len("the two good events", 2).await;
    assert_eq!(ids(&got), ids(&good));
    wait_settled(&env, &config, &durable).await;
    let stored = env.stored(&config.js_stream).await;
    assert_eq!(stored.len(), 2, "only the good events are stored");
    assert!(env.stored(&config.js_dlq_stream).await.is_empty());
    listener.stop(Duration::from_secs(5)).await;
}

/// Publisher directives on a poison message (`Nats-Expected-Stream`,
/// `Nats-Expected-Last-Sequence`) are for the stream that stored the original: the dead letter
/// goes without them (JetStream would refuse it: errors 10060 / 10071), keeping the payload and
/// the other headers, and nothing is left parked.
pub async fn poison_with_directives_is_dead_lettered_without_them<B: EventBackend>() {
    if cannot_publish_raw::<B>("poison_with_directives_is_dead_lettered_without_them") {
        return;
    }
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("directives");
    let durable = new_durable();
    let seen = Seen::new();
    let listener = listen(
        &connection,
        recording(&event_type, &seen),
        one_worker(&durable),
    )
    .await;
    let subject = config.events_subject(&event_type);
    let mut raw_headers = HeaderMap::new();
    raw_headers.insert("X-Conf", "kept");
    raw_headers.insert("Nats-Expected-Stream", config.js_stream.as_str());
    // The stream is fresh: this is its first message.
    raw_headers.insert("Nats-Expected-Last-Sequence", "0");
    env.publish_raw(&subject, raw_headers, Bytes::from_static(b"not an event"))
        .await;
    let good = event(&event_type, &json!(1));
    publish(&connection, good.clone()).await;
    seen.wait_len("the good event after the poison", 1).await;
    let letters = wait_dead_letters(&env, &config, 1).await;
    wait_settled(&env, &config, &durable).await;
    let letter = &letters[0];
    assert_eq!(
        letter.header(headers::DEAD_LETTER_REASON).as_deref(),
        Some("decode")
    );
    assert_eq!(letter.header(headers::DEAD_LETTER_SUBJECT), Some(subject));
    assert_eq!(
        letter.header(headers::DEAD_LETTER_STREAM_SEQ).as_deref(),
        Some("1")
    );
    assert_eq!(letter.header("X-Conf").as_deref(), Some("kept"));
    let names: Vec<String> = letter
        .headers
        .iter()
        .map(|(name, _)| name.to_string())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.to_ascii_lowercase().starts_with("nats-expected-")),
        "directives dropped: {names:?}"
    );
    assert_eq!(&letter.payload[..], b"not an event", "payload kept");
    assert_eq!(letters.len(), 1);
    listener.stop(Duration::from_secs(5)).await;
}

/// A poison message that fits the broker's max payload but whose dead letter (original plus
/// `Dead-Letter-*` headers) would not is dead-lettered as a reference record: no payload,
/// `Dead-Letter-Payload: omitted`, and where the original is (subject, stream, sequence).
pub async fn oversized_poison_is_dead_lettered_as_a_reference<B: EventBackend>() {
    if cannot_publish_raw::<B>("oversized_poison_is_dead_lettered_as_a_reference") {
        return;
    }
    // Both backends default to NATS' max payload of 1 MiB.
    const MAX_PAYLOAD: usize = 1024 * 1024;
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("oversized");
    let durable = new_durable();
    let seen = Seen::new();
    let listener = listen(
        &connection,
        recording(&event_type, &seen),
        one_worker(&durable),
    )
    .await;
    let subject = config.events_subject(&event_type);
    let mut raw_headers = HeaderMap::new();
    raw_headers.insert("X-Conf", "kept");
    // "NATS/1.0\r\n" + "X-Conf: kept\r\n" + "\r\n": 26 bytes; 64 bytes left below the limit.
    let mut payload = vec![b'x'; MAX_PAYLOAD - 26 - 64];
    payload[0] = 0xff;
    env.publish_raw(&subject, raw_headers, Bytes::from(payload))
        .await;
    let good = event(&event_type, &json!(1));
    publish(&connection, good.clone()).await;
    seen.wait_len("the good event after the poison", 1).await;
    let letters = wait_dead_letters(&env, &config, 1).await;
    wait_settled(&env, &config, &durable).await;
    let letter = &letters[0];
    assert_eq!(
        letter.subject,
        format!("deadletter.{}.{}", config.js_stream, durable)
    );
    assert_eq!(
        letter.header("Dead-Letter-Payload").as_deref(),
        Some("omitted")
    );
    assert!(letter.payload.is_empty(), "no payload in a reference");
    assert_eq!(
        letter.header(headers::DEAD_LETTER_REASON).as_deref(),
        Some("decode")
    );
    assert_eq!(letter.header(headers::DEAD_LETTER_SUBJECT), Some(subject));
    assert_eq!(
        letter.header(headers::DEAD_LETTER_STREAM_SEQ).as_deref(),
        Some("1")
    );
    assert_eq!(
        letter.header("Dead-Letter-Stream"),
        Some(config.js_stream.clone())
    );
    assert!(letter
        .header(headers::DEAD_LETTER_ERROR)
        .is_some_and(|e| !e.is_empty() && e.len() <= 1024));
    assert_eq!(letters.len(), 1);
    listener.stop(Duration::from_secs(5)).await;
}

/// Two instances of one durable with different type sets would overwrite each other's filter
/// (one of them would stop getting its types): the second is refused while the first runs,
/// with an error naming the durable and both type sets. Once the first has stopped, a listener
/// with another type set may take the durable over (a restart with changed types).
pub async fn one_durable_refuses_a_second_type_set<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let first_conn = env.events(&config).await;
    let second_conn = env.events(&env.config("svc")).await;
    let (type_a, type_b) = (new_type("a"), new_type("b"));
    let durable = new_durable();
    let seen_a = Seen::new();
    let first = listen(&first_conn, recording(&type_a, &seen_a), options(&durable)).await;
    let seen_b = Seen::new();
    for handlers in [
        recording(&type_b, &seen_b),
        recording(&type_b, &seen_b).on(&type_a, event_handler_fn(|_, _| async { Ok(()) })),
    ] {
        let refused = within("listen", second_conn.listen(handlers, options(&durable))).await;
        let err = match refused {
            Ok(listener) => {
                listener.stop(Duration::from_secs(5)).await;
                panic!("a second type set on durable {durable} was accepted");
            }
            Err(err) => err,
        };
        assert_eq!(err.kind(), ListenErrorKind::DurableInUse, "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&durable) && text.contains(&type_a) && text.contains(&type_b),
            "the error names the durable and both type sets: {text}"
        );
    }
    // The first instance still gets its type.
    let a = event(&type_a, &json!(1));
    publish(&first_conn, a.clone()).await;
    seen_a.wait_len("type a still delivered", 1).await;
    wait_settled(&env, &config, &durable).await;
    // The same type set on a second instance is fine (instances share the work).
    let same = listen(&second_conn, recording(&type_a, &seen_a), options(&durable)).await;
    stop_all(&[first, same]).await;
    // Nobody listens any more: a restart with another type set takes the durable over.
    let second = listen(&second_conn, recording(&type_b, &seen_b), options(&durable)).await;
    let b = event(&type_b, &json!(2));
    publish(&first_conn, b.clone()).await;
    seen_b
        .wait_len("type b delivered after the takeover", 1)
        .await;
    wait_settled(&env, &config, &durable).await;
    assert_eq!(ids(&seen_b.snapshot()), ids(&[b]));
    assert_eq!(ids(&seen_a.snapshot()), ids(&[a]));
    second.stop(Duration::from_secs(5)).await;
}

/// `consumer_info` reports the same numbers on every backend: pending, ack pending, redelivered,
/// ack floor, last delivered, deliveries, nothing parked; while an event is in its handler on
/// its second delivery, once everything is settled, and with a backlog nobody listens to.
pub async fn consumer_info_reports_the_same_numbers<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("info");
    let durable = new_durable();
    let gate = Gate::new();
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = Seen::new();
    let (g, a, s) = (gate.clone(), attempts.clone(), seen.clone());
    let handlers = EventHandlers::new().on(
        &event_type,
        typed_event_handler(move |event: TypedEvent<u64>| {
            let (gate, attempts, seen) = (g.clone(), a.clone(), s.clone());
            async move {
                if event.data == 2 {
                    if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(HandlerError::new("first try fails")
                            .retry_after(Duration::from_millis(20)));
                    }
                    gate.wait().await;
                }
                seen.push(event.data);
                Ok(())
            }
        }),
    );
    let listener = listen(&connection, handlers, one_worker(&durable)).await;
    for n in 0..3u64 {
        publish(&connection, event(&event_type, &json!(n))).await;
    }
    seen.wait_len("events 0 and 1", 2).await;
    eventually("event 2 in its handler on its second delivery", || async {
        attempts.load(Ordering::SeqCst) == 2
    })
    .await;
    let busy = B::durable_info(&connection, &durable).await;
    assert_eq!(busy.durable, durable);
    assert_eq!(busy.stream, config.js_stream);
    assert_eq!(
        busy.filter_subjects,
        vec![config.events_subject(&event_type)]
    );
    assert_eq!(
        (
            busy.pending,
            busy.ack_pending,
            busy.redelivered,
            busy.parked
        ),
        (0, 1, 1, 0),
        "{busy:?}"
    );
    assert_eq!(
        (busy.ack_floor, busy.last_delivered, busy.deliveries),
        (2, 3, 4),
        "{busy:?}"
    );
    gate.open();
    seen.wait_len("event 2", 3).await;
    wait_settled(&env, &config, &durable).await;
    listener.stop(Duration::from_secs(5)).await;
    for n in 3..5u64 {
        publish(&connection, event(&event_type, &json!(n))).await;
    }
    // JetStream counts a consumer's pending events a moment after the publish acks.
    eventually("the two new events counted as pending", || async {
        B::durable_info(&connection, &durable).await.pending == 2
    })
    .await;
    let idle = B::durable_info(&connection, &durable).await;
    assert_eq!(
        (
            idle.pending,
            idle.ack_pending,
            idle.redelivered,
            idle.parked
        ),
        (2, 0, 0, 0),
        "{idle:?}"
    );
    assert_eq!(
        (idle.ack_floor, idle.last_delivered, idle.deliveries),
        (3, 3, 4),
        "{idle:?}"
    );
    assert_eq!(idle.max_deliver, busy.max_deliver);
}

/// Records `(event id, delivery count)` of every handler run, works for `work`, and acks.
fn counting(event_type: &str, runs: &Seen<(String, u64)>, work: Duration) -> EventHandlers {
    let runs = runs.clone();
    EventHandlers::new().on(
        event_type,
        event_handler_fn(move |e, responses| {
            let runs = runs.clone();
            async move {
                runs.push((e.id().to_owned(), responses.delivery_count()));
                tokio::time::sleep(work).await;
                Ok(())
            }
        }),
    )
}

/// Every run was a first delivery, and each event ran once: no delivery was spent on an
/// event whose handler never started.
fn assert_each_once_first_delivery(runs: &[(String, u64)], sent: &[Event]) {
    let mut per_id: HashMap<&str, Vec<u64>> = HashMap::new();
    for (id, count) in runs {
        per_id.entry(id.as_str()).or_default().push(*count);
    }
    let repeated: Vec<_> = per_id
        .iter()
        .filter(|(_, counts)| counts.as_slice() != [1])
        .collect();
    assert!(
        repeated.is_empty(),
        "events run more than once or on a later delivery (id: delivery counts): {repeated:?}"
    );
    assert_eq!(
        per_id
            .keys()
            .map(|id| id.to_string())
            .collect::<BTreeSet<_>>(),
        ids(sent),
        "every event handled"
    );
}

/// Repeated graceful stops over a backlog (a rolling deploy, `cemsg listen --count 1` in a
/// loop) cost no deliveries: each listener is stopped right after its first handled event,
/// and still every event is handled exactly once, on its first delivery, nothing is
/// dead-lettered and the consumer ends with nothing pending (nothing parked).
pub async fn repeated_stops_over_a_backlog_cost_no_deliveries<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("restarts");
    let durable = new_durable();
    let sent: Vec<Event> = (0..20).map(|n| event(&event_type, &json!(n))).collect();
    for e in &sent {
        publish(&connection, e.clone()).await;
    }
    let runs: Seen<(String, u64)> = Seen::new();
    let options = EventListenOptions {
        pool: ce_messaging::WorkerOptions::new(1, 4),
        max_deliver: Some(3),
        ..options(&durable)
    };
    let mut stops = 0;
    let handled_all = |runs: &Seen<(String, u64)>| {
        let handled: BTreeSet<String> = runs.snapshot().into_iter().map(|(id, _)| id).collect();
        handled == ids(&sent)
    };
    while !handled_all(&runs) {
        assert!(
            stops < sent.len(),
            "{stops} stops and still not all handled"
        );
        let before = runs.len();
        // Each event takes a moment, so events wait in the listener's queue when it stops.
        let handlers = counting(&event_type, &runs, Duration::from_millis(30));
        let listener = listen(&connection, handlers, options.clone()).await;
        runs.wait_len(
            "one more event handled (none parked or dead-lettered)",
            before + 1,
        )
        .await;
        let report = within("the stop", listener.stop(Duration::from_secs(5))).await;
        assert_eq!(report.abandoned, 0, "{report:?}");
        stops += 1;
    }
    assert_each_once_first_delivery(&runs.snapshot(), &sent);
    wait_settled(&env, &config, &durable).await;
    assert!(
        env.stored(&config.js_dlq_stream).await.is_empty(),
        "nothing dead-lettered"
    );
    assert_eq!(
        env.deliveries(&config.js_stream, &durable).await,
        Some(sent.len() as u64),
        "one delivery per event: stops handed nothing back"
    );
}

/// A slow handler (queued events wait longer than the ack wait for a worker) causes no
/// redelivery of events that never started: queued events are kept alive.
pub async fn slow_handler_never_redelivers_queued_events<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("slow");
    let durable = new_durable();
    let sent: Vec<Event> = (0..12).map(|n| event(&event_type, &json!(n))).collect();
    for e in &sent {
        publish(&connection, e.clone()).await;
    }
    let runs: Seen<(String, u64)> = Seen::new();
    let recorder = runs.clone();
    let handlers = EventHandlers::new().on(
        &event_type,
        event_handler_fn(move |e, responses| {
            let runs = recorder.clone();
            async move {
                runs.push((e.id().to_owned(), responses.delivery_count()));
                // Work that takes most of the ack wait: the third event in line waits
                // longer than the ack wait for a worker.
                tokio::time::sleep(Duration::from_millis(700)).await;
                Ok(())
            }
        }),
    );
    let options = EventListenOptions {
        pool: ce_messaging::WorkerOptions::new(2, 4),
        ack_wait: Some(Duration::from_secs(1)),
        ..options(&durable)
    };
    let listener = listen(&connection, handlers, options).await;
    wait_settled(&env, &config, &durable).await;
    within("the stop", listener.stop(Duration::from_secs(5))).await;
    assert_each_once_first_delivery(&runs.snapshot(), &sent);
    assert_eq!(
        env.deliveries(&config.js_stream, &durable).await,
        Some(sent.len() as u64),
        "no redeliveries"
    );
}

/// A listener that dies (crash abort) while handling an event's last allowed delivery: the
/// event is not parked by the broker; the next listener dead-letters it (`max-deliveries`)
/// before running any handler, also when that listener is stopping as it arrives.
pub async fn crash_on_the_last_allowed_delivery_ends_dead_lettered<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("lastdelivery");
    let durable = new_durable();
    let options = EventListenOptions {
        pool: ce_messaging::WorkerOptions::new(1, 1),
        max_deliver: Some(2),
        ack_wait: Some(Duration::from_secs(1)),
        ..options(&durable)
    };
    // Delivery 1 fails, delivery 2 (the last allowed) hangs until the listener is killed.
    let started: Seen<u64> = Seen::new();
    let s = started.clone();
    let failing = EventHandlers::new().on(
        &event_type,
        event_handler_fn(move |_, responses| {
            let started = s.clone();
            async move {
                started.push(responses.delivery_count());
                if responses.delivery_count() == 1 {
                    return Err(
                        HandlerError::new("first try fails").retry_after(Duration::from_millis(20))
                    );
                }
                std::future::pending().await
            }
        }),
    );
    // The listener that dies has its own connection, which goes away with it (as with a
    // killed process): a pull request it left open at the server must not take deliveries.
    let doomed = env.events(&config).await;
    let crashed = listen(&doomed, failing, options.clone()).await;
    let e = event(&event_type, &json!("last"));
    let ack = publish(&connection, e.clone()).await;
    started
        .wait_until("the last allowed delivery", |s| s == [1, 2])
        .await;
    within("abort", crashed.abort()).await;
    B::close_events(&doomed).await;

    // The next listener is busy with another event and stops while the redelivery (after
    // the ack wait) waits in its queue.
    let other = event(&event_type, &json!("other"));
    publish(&connection, other.clone()).await;
    let gate = Gate::new();
    let (busy_started, busy_finished) = (Seen::new(), Seen::new());
    let listener = listen(
        &connection,
        gated_recording(&event_type, &gate, &busy_started, &busy_finished),
        options,
    )
    .await;
    let got = busy_started.wait_len("the other event", 1).await;
    assert_eq!(got[0].id(), other.id());
    eventually("the redelivery to reach the listener", || async {
        env.deliveries(&config.js_stream, &durable).await == Some(4)
    })
    .await;
    let stopping = tokio::spawn({
        let listener = listener.clone();
        async move { listener.stop(Duration::from_secs(5)).await }
    });
    gate.open();
    within("the stop", stopping).await.expect("stop task");
    let letters = wait_dead_letters(&env, &config, 1).await;
    assert_eq!(
        letters.len(),
        1,
        "only the exhausted event is dead-lettered"
    );
    assert_dead_letter(
        &letters[0],
        &config,
        &durable,
        &e,
        ack.sequence,
        "max-deliveries",
        3,
    );
    assert_eq!(
        ids(&busy_started.snapshot()),
        ids(std::slice::from_ref(&other)),
        "no handler ran on the exhausted event"
    );
    wait_settled(&env, &config, &durable).await;
}

/// A handler that never returns is cut off by the handler time limit: the event is settled
/// as a failure (redelivered, dead-lettered at the delivery limit) and the worker is freed
/// for the next event.
pub async fn handler_time_limit_frees_the_worker_and_dead_letters_at_the_limit<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("hangs");
    let durable = new_durable();
    let runs: Seen<(String, u64)> = Seen::new();
    let recorder = runs.clone();
    let handlers = EventHandlers::new().on(
        &event_type,
        event_handler_fn(move |e, responses| {
            let runs = recorder.clone();
            async move {
                runs.push((e.id().to_owned(), responses.delivery_count()));
                if e.data_as::<String>().ok().as_deref() == Some("hang") {
                    std::future::pending::<()>().await;
                }
                Ok(())
            }
        }),
    );
    let options = EventListenOptions {
        pool: ce_messaging::WorkerOptions::new(1, 0),
        max_deliver: Some(2),
        handler_timeout: Some(Duration::from_millis(300)),
        ..options(&durable)
    };
    let listener = listen(&connection, handlers, options).await;
    let hang = event(&event_type, &json!("hang"));
    let ack = publish(&connection, hang.clone()).await;
    let fine = event(&event_type, &json!("fine"));
    publish(&connection, fine.clone()).await;
    let letters = wait_dead_letters(&env, &config, 1).await;
    assert_dead_letter(
        &letters[0],
        &config,
        &durable,
        &hang,
        ack.sequence,
        "max-deliveries",
        2,
    );
    assert!(letters[0]
        .header(headers::DEAD_LETTER_ERROR)
        .is_some_and(|e| e.contains("time limit")));
    runs.wait_until("the other event handled by the freed worker", |runs| {
        runs.iter().any(|(id, _)| id == fine.id())
    })
    .await;
    wait_settled(&env, &config, &durable).await;
    let hang_runs: Vec<u64> = runs
        .snapshot()
        .into_iter()
        .filter(|(id, _)| id == hang.id())
        .map(|(_, n)| n)
        .collect();
    assert_eq!(hang_runs, vec![1, 2], "cut off twice, then dead-lettered");
    within("the stop", listener.stop(Duration::from_secs(5))).await;
}

/// Where a new durable starts: `All` every stored event of its types, `Sequence(n)` from
/// stream sequence n, `Time(t)` what was stored at or after t, `New` only what is published
/// after it was created. An existing durable keeps its position whatever a later listen says.
pub async fn new_durables_start_where_told_and_existing_ones_keep_their_position<
    B: EventBackend,
>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("start");
    let earlier: Vec<Event> = (0..3).map(|n| event(&event_type, &json!(n))).collect();
    let first_ack = publish(&connection, earlier[0].clone()).await;
    // After the first was stored and before the second: the start time of `Time`.
    let between = chrono::Utc::now();
    let second_ack = publish(&connection, earlier[1].clone()).await;
    publish(&connection, earlier[2].clone()).await;
    assert!(second_ack.sequence > first_ack.sequence);
    let from_second = ids(&earlier[1..]);
    for (start, expected) in [
        (StartPosition::All, ids(&earlier)),
        (
            StartPosition::Sequence(second_ack.sequence),
            from_second.clone(),
        ),
        (StartPosition::Time(between), from_second),
    ] {
        let durable = new_durable();
        let seen = Seen::new();
        let listener = listen(
            &connection,
            recording(&event_type, &seen),
            EventListenOptions {
                start_position: Some(start),
                ..one_worker(&durable)
            },
        )
        .await;
        seen.wait_len(&format!("the events from {start}"), expected.len())
            .await;
        wait_settled(&env, &config, &durable).await;
        assert_eq!(ids(&seen.snapshot()), expected, "start {start}");
        listener.stop(Duration::from_secs(5)).await;
    }

    // New: nothing of the history; what is published after the listen.
    let durable = new_durable();
    let seen = Seen::new();
    let listener = listen(
        &connection,
        recording(&event_type, &seen),
        EventListenOptions {
            start_position: Some(StartPosition::New),
            ..one_worker(&durable)
        },
    )
    .await;
    let info = within("consumer info", connection.consumer_info(&durable))
        .await
        .expect("the durable exists");
    assert_eq!((info.pending, info.ack_pending), (0, 0), "{info:?}");
    let later = event(&event_type, &json!("later"));
    publish(&connection, later.clone()).await;
    // One worker, in stream order: an earlier event would have come first.
    let got = seen
        .wait_len("the event published after the listen", 1)
        .await;
    wait_settled(&env, &config, &durable).await;
    assert_eq!(ids(&got), ids(std::slice::from_ref(&later)));
    assert_eq!(seen.len(), 1);
    listener.stop(Duration::from_secs(5)).await;

    // The durable exists now: `All` on a later listen does not move it back.
    let last = event(&event_type, &json!("last"));
    let again = Seen::new();
    let listener = listen(
        &connection,
        recording(&event_type, &again),
        EventListenOptions {
            start_position: Some(StartPosition::All),
            ..one_worker(&durable)
        },
    )
    .await;
    publish(&connection, last.clone()).await;
    let got = again.wait_len("the event after the restart", 1).await;
    wait_settled(&env, &config, &durable).await;
    assert_eq!(ids(&got), ids(std::slice::from_ref(&last)));
    assert_eq!(again.len(), 1, "the history was not delivered again");
    listener.stop(Duration::from_secs(5)).await;
}

/// `request` hands back the publish outcome with the promise: a retried request (the same
/// event, so the same id) within the duplicate window reports `duplicate` with the sequence of
/// the first, and the stream holds it once.
pub async fn retried_request_reports_its_duplicate_publish<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let (request_type, response_type) = (new_type("quote.requested"), new_type("quote.given"));
    let request = new_event_with_id(
        format!("quote-{}", unique()),
        &request_type,
        "conf",
        &json!(7),
    )
    .expect("event");
    let responses = [EventType::from(response_type.as_str())];
    let first = within("request", connection.request(request.clone(), &responses))
        .await
        .expect("request");
    let first_ack = first.publish_ack().expect("request publishes").clone();
    assert!(!first_ack.duplicate);
    assert_eq!(first_ack.stream, config.js_stream);
    let retried = within(
        "retried request",
        connection.request(request.clone(), &responses),
    )
    .await
    .expect("retried request");
    let retried_ack = retried.publish_ack().expect("request publishes");
    assert!(retried_ack.duplicate, "{retried_ack:?}");
    assert_eq!(retried_ack.sequence, first_ack.sequence);
    let subject = config.events_subject(&request_type);
    let stored = env.stored(&config.js_stream).await;
    assert_eq!(stored.iter().filter(|m| m.subject == subject).count(), 1);
    // A promise that only waits publishes nothing.
    let waiting = within(
        "wait_for_response",
        connection.wait_for_response(&TransactionId::generate(), &responses),
    )
    .await
    .expect("promise");
    assert!(waiting.publish_ack().is_none());
}

/// `consumer_info` is on the trait, so code written against `EventConnection` can read a
/// durable's lag: events never delivered (`pending`) plus delivered and unsettled
/// (`ack_pending`); an unknown durable is `NotFound`.
pub async fn consumer_info_through_the_trait_reports_the_lag<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("svc");
    let connection = env.events(&config).await;
    let event_type = new_type("lag");
    for n in 0..5 {
        publish(&connection, event(&event_type, &json!(n))).await;
    }
    let durable = new_durable();
    let gate = Gate::new();
    let started = Seen::new();
    let (g, s) = (gate.clone(), started.clone());
    let handlers = EventHandlers::new().on(
        &event_type,
        event_handler_fn(move |event, _| {
            let (gate, started) = (g.clone(), s.clone());
            async move {
                started.push(event.id().to_owned());
                gate.wait().await;
                Ok(())
            }
        }),
    );
    let mut options = one_worker(&durable);
    options.pool.buffer = 0;
    let listener = listen(&connection, handlers, options).await;
    started.wait_len("the first event in its handler", 1).await;
    let dyn_connection: &dyn EventConnection = &connection;
    eventually("one event in flight and four never delivered", || async {
        let info = dyn_connection.consumer_info(&durable).await.expect("info");
        (info.pending, info.ack_pending) == (4, 1)
    })
    .await;
    let info = dyn_connection.consumer_info(&durable).await.expect("info");
    assert_eq!(info.lag(), 5);
    assert_eq!(info, B::durable_info(&connection, &durable).await);
    gate.open();
    wait_settled(&env, &config, &durable).await;
    let info = dyn_connection.consumer_info(&durable).await.expect("info");
    assert_eq!(info.lag(), 0);
    let missing = dyn_connection
        .consumer_info(&new_durable())
        .await
        .expect_err("no such durable");
    assert_eq!(missing.kind(), StreamErrorKind::NotFound);
    listener.stop(Duration::from_secs(5)).await;
}

/// Priorities (`js_priority_levels` 3): a backlog of 30 events without a priority (the
/// lowest level), then 5 of priority 1, then 10 of priority 0, all published before the
/// listener starts, is handled strictly highest level first by one worker: every priority-0
/// event before any priority-1 one, every priority-1 event before any of the lowest level.
/// Each is stored on its level's subject (`<prefix>._priority.<p>.<type>`, the lowest level on
/// `<prefix>.<type>`), handled once on its first delivery, and at the end every level's
/// consumer has nothing pending or unacknowledged, nothing parked, and no dead letter exists.
pub async fn priorities_serve_a_mixed_backlog_highest_first<B: EventBackend>() {
    let env = B::start().await;
    let mut config = env.config("svc");
    config.js_priority_levels = 3;
    let connection = env.events(&config).await;
    let event_type = new_type("prio");
    let durable = new_durable();
    let mut sent: Vec<(Event, u8)> = Vec::new();
    for (count, priority) in [(30, None), (5, Some(1u8)), (10, Some(0u8))] {
        for n in 0..count {
            let mut e = event(&event_type, &json!(n));
            if let Some(p) = priority {
                set_priority(&mut e, p);
            }
            publish(&connection, e.clone()).await;
            sent.push((e, priority.unwrap_or(2)));
        }
    }
    let stored = env.stored(&config.js_stream).await;
    assert_eq!(stored.len(), 45);
    for (message, (_, priority)) in stored.iter().zip(&sent) {
        let expected = if *priority == 2 {
            config.events_subject(&event_type)
        } else {
            format!(
                "{}._priority.{priority}.{event_type}",
                config.js_subject_prefix
            )
        };
        assert_eq!(message.subject, expected);
    }
    let runs: Seen<(String, u64)> = Seen::new();
    let r = runs.clone();
    let handlers = EventHandlers::new().on(
        &event_type,
        event_handler_fn(move |event, responses| {
            let r = r.clone();
            async move {
                r.push((event.id().to_owned(), responses.delivery_count()));
                Ok(())
            }
        }),
    );
    let options = EventListenOptions {
        pool: ce_messaging::WorkerOptions::new(1, 2),
        ..options(&durable)
    };
    let listener = listen(&connection, handlers, options).await;
    let handled = runs.wait_len("all 45 events handled", 45).await;
    let priority_of: HashMap<&str, u8> = sent.iter().map(|(e, p)| (e.id(), *p)).collect();
    let order: Vec<u8> = handled
        .iter()
        .map(|(id, _)| *priority_of.get(id.as_str()).expect("a sent event"))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "handled strictly highest priority first");
    assert_eq!(
        handled
            .iter()
            .map(|(id, _)| id.clone())
            .collect::<BTreeSet<_>>(),
        sent.iter()
            .map(|(e, _)| e.id().to_owned())
            .collect::<BTreeSet<_>>(),
    );
    assert!(
        handled.iter().all(|(_, delivered)| *delivered == 1),
        "each handled on its first delivery: {handled:?}"
    );
    for (level, count) in [(0u8, 10u64), (1, 5), (2, 30)] {
        let name = priority_durable(&durable, level, 3);
        wait_settled(&env, &config, &name).await;
        assert_eq!(
            env.deliveries(&config.js_stream, &name).await,
            Some(count),
            "deliveries of {name}"
        );
        let info = B::durable_info(&connection, &name).await;
        assert_eq!(
            (info.pending, info.ack_pending, info.parked),
            (0, 0, 0),
            "{info:?}"
        );
    }
    listener.stop(Duration::from_secs(5)).await;
    assert!(
        env.stored(&config.js_dlq_stream).await.is_empty(),
        "no dead letters"
    );
}

/// With priorities off (the default) the `priority` extension is not read: the event is
/// stored on `<prefix>.<type>` as before. With priorities on, a priority outside the levels
/// (or not an integer) is refused at once with `InvalidPriority`, the event handed back and
/// nothing stored; a priority within them goes to its level's subject.
pub async fn priority_publish_is_checked_and_off_changes_nothing<B: EventBackend>() {
    let env = B::start().await;
    let off = env.config("off");
    assert_eq!(off.js_priority_levels, 1, "priorities are off by default");
    let connection = env.events(&off).await;
    let event_type = new_type("prio.pub");
    let mut e = event(&event_type, &json!(1));
    e.set_extension("priority", "urgent");
    publish(&connection, e).await;
    let mut e = event(&event_type, &json!(2));
    set_priority(&mut e, 0);
    publish(&connection, e).await;
    let mut on = env.config("on");
    on.js_priority_levels = 2;
    let prioritised = env.events(&on).await;
    for bad in [json!(2), json!("high"), json!(-1)] {
        let mut e = event(&event_type, &json!(3));
        match &bad {
            Value::String(s) => e.set_extension("priority", s.as_str()),
            other => e.set_extension("priority", other.as_i64().expect("integer")),
        }
        let err = within("publish refused", prioritised.publish(e.clone()))
            .await
            .expect_err("refused");
        assert_eq!(
            err.kind(),
            PublishErrorKind::InvalidPriority,
            "{bad}: {err}"
        );
        assert_eq!(
            err.into_event().map(|h| h.id().to_owned()),
            Some(e.id().to_owned())
        );
    }
    let mut high = event(&event_type, &json!(4));
    set_priority(&mut high, 0);
    publish(&prioritised, high).await;
    let mut lowest = event(&event_type, &json!(5));
    set_priority(&mut lowest, 1);
    publish(&prioritised, lowest).await;
    let subjects: Vec<String> = env
        .stored(&off.js_stream)
        .await
        .into_iter()
        .map(|m| m.subject)
        .collect();
    let plain = off.events_subject(&event_type);
    assert_eq!(
        subjects,
        vec![
            plain.clone(),
            plain.clone(),
            format!("{}._priority.0.{event_type}", off.js_subject_prefix),
            plain,
        ]
    );
}

/// Priorities (`js_priority_levels` 3) on a running, idle listener: an event published at
/// each level in turn (lowest, highest, middle) is handled, each on its first delivery (an
/// idle listener waits on every level at once, not only the highest or the lowest); after a
/// stop and a restart a new backlog is handled highest first again; at the end every level's
/// consumer is settled and no dead letter exists.
pub async fn priority_listener_waits_on_every_level<B: EventBackend>() {
    let env = B::start().await;
    let mut config = env.config("svc");
    config.js_priority_levels = 3;
    let connection = env.events(&config).await;
    let event_type = new_type("prio.live");
    let durable = new_durable();
    let runs: Seen<(String, u64)> = Seen::new();
    let options = EventListenOptions {
        pool: ce_messaging::WorkerOptions::new(1, 2),
        ..options(&durable)
    };
    let listener = listen(
        &connection,
        counting(&event_type, &runs, Duration::ZERO),
        options.clone(),
    )
    .await;
    let mut sent = Vec::new();
    for (n, priority) in [None, Some(0u8), Some(1u8)].into_iter().enumerate() {
        let mut e = event(&event_type, &json!(n));
        if let Some(p) = priority {
            set_priority(&mut e, p);
        }
        publish(&connection, e.clone()).await;
        let id = e.id().to_owned();
        sent.push(e);
        runs.wait_until(&format!("event at priority {priority:?} handled"), |all| {
            all.iter().any(|(seen, _)| *seen == id)
        })
        .await;
    }
    listener.stop(Duration::from_secs(5)).await;
    let mut backlog = Vec::new();
    for (n, priority) in [(2u8, None), (2, None), (1, Some(1u8)), (0, Some(0u8))] {
        let mut e = event(&event_type, &json!(10 + backlog.len()));
        if let Some(p) = priority {
            set_priority(&mut e, p);
        }
        publish(&connection, e.clone()).await;
        backlog.push((e.id().to_owned(), n));
        sent.push(e);
    }
    let listener = listen(
        &connection,
        counting(&event_type, &runs, Duration::ZERO),
        options,
    )
    .await;
    let all = runs.wait_len("the backlog handled", 7).await;
    let order: Vec<u8> = all[3..]
        .iter()
        .map(|(id, _)| {
            backlog
                .iter()
                .find(|(sent, _)| sent == id)
                .map(|(_, p)| *p)
                .expect("a backlog event")
        })
        .collect();
    assert_eq!(order, vec![0, 1, 2, 2], "the backlog highest first");
    assert_each_once_first_delivery(&all, &sent);
    for level in 0..3u8 {
        let name = priority_durable(&durable, level, 3);
        wait_settled(&env, &config, &name).await;
        let info = B::durable_info(&connection, &name).await;
        assert_eq!(info.parked, 0, "{info:?}");
    }
    listener.stop(Duration::from_secs(5)).await;
    assert!(env.stored(&config.js_dlq_stream).await.is_empty());
}

/// One durable, one type set, one level count: while an instance without priorities runs,
/// an instance of the same durable and types with `js_priority_levels` 2 is refused
/// (`DurableInUse`); once it stopped, the prioritised instance takes the durable over, its
/// lowest level is the durable's own consumer (the events published before, on
/// `<prefix>.<type>`, are handled by it) and priority 0 gets `<durable>-p0`.
pub async fn priority_levels_are_part_of_a_durables_type_set<B: EventBackend>() {
    let env = B::start().await;
    let plain_config = env.config("svc");
    let plain = env.events(&plain_config).await;
    let mut prio_config = env.config("svc");
    prio_config.js_priority_levels = 2;
    let prioritised = env.events(&prio_config).await;
    let event_type = new_type("prio.durable");
    let durable = new_durable();
    let seen = Seen::new();
    let first = listen(&plain, recording(&event_type, &seen), options(&durable)).await;
    let refused = within(
        "listen",
        prioritised.listen(recording(&event_type, &seen), options(&durable)),
    )
    .await;
    match refused {
        Ok(listener) => {
            listener.stop(Duration::from_secs(5)).await;
            panic!("an instance with another level count was accepted on {durable}");
        }
        Err(err) => assert_eq!(err.kind(), ListenErrorKind::DurableInUse, "{err}"),
    }
    first.stop(Duration::from_secs(5)).await;
    let before = event(&event_type, &json!(1));
    publish(&plain, before.clone()).await;
    let mut high = event(&event_type, &json!(2));
    set_priority(&mut high, 0);
    publish(&prioritised, high.clone()).await;
    let second = listen(
        &prioritised,
        recording(&event_type, &seen),
        options(&durable),
    )
    .await;
    seen.wait_len("both events handled", 2).await;
    assert_eq!(ids(&seen.snapshot()), ids(&[before, high]));
    for name in [durable.clone(), priority_durable(&durable, 0, 2)] {
        wait_settled(&env, &prio_config, &name).await;
    }
    second.stop(Duration::from_secs(5)).await;
    assert!(env.stored(&prio_config.js_dlq_stream).await.is_empty());
}

/// With priorities on (`js_priority_levels` 2), a promise gets a response published at
/// priority 0 (on `<prefix>._priority.0.<type>`) as well as one without a priority: the
/// EventSource of a connection with priorities on subscribes to a type's priority subjects
/// too.
pub async fn promise_gets_a_prioritised_response<B: EventBackend>() {
    let env = B::start().await;
    let mut client_config = env.config("cli");
    client_config.js_priority_levels = 2;
    let client = env.events(&client_config).await;
    let mut responder_config = env.config("svc");
    responder_config.js_priority_levels = 2;
    let responder = env.events(&responder_config).await;
    let response_type = new_type("prio.answer");
    for priority in [Some(0u8), None] {
        let tid = TransactionId::generate();
        let mut promise = within(
            "promise",
            client.wait_for_response(&tid, &[EventType::from(response_type.as_str())]),
        )
        .await
        .expect("promise");
        let mut response =
            new_event_with_tid(&response_type, "svc", &json!(1), tid.clone()).expect("event");
        if let Some(p) = priority {
            set_priority(&mut response, p);
        }
        publish(&responder, response.clone()).await;
        let got = within("response", promise.response(Duration::from_secs(5)))
            .await
            .unwrap_or_else(|err| panic!("response at priority {priority:?}: {err}"));
        assert_eq!(got.id(), response.id());
    }
}

/// A listener's handler gets the published event read in place in structured mode (nothing
/// built until something asks for the sdk's `Event`) and built in binary mode, on every
/// backend alike, and it reads the same either way.
pub async fn received_events_are_read_in_place<B: EventBackend>() {
    for mode in [ContentMode::Structured, ContentMode::Binary] {
        let env = B::start().await;
        let mut pub_config = env.config("pub");
        pub_config.ce_mode = mode;
        let publisher = env.events(&pub_config).await;
        let subscriber = env.events(&env.config("sub")).await;
        let event_type = new_type("viewed");
        let durable = new_durable();
        // Whether the event was unbuilt when its handler started, and the event.
        let seen: Seen<(bool, ReceivedEvent)> = Seen::new();
        let recorder = seen.clone();
        let handlers = EventHandlers::new().on(
            &event_type,
            event_handler_fn(move |event: ReceivedEvent, _| {
                let recorder = recorder.clone();
                async move {
                    recorder.push((event.is_unbuilt(), event));
                    Ok(())
                }
            }),
        );
        let listener = listen(&subscriber, handlers, options(&durable)).await;
        let mut sent = event(&event_type, &json!({"n": 1, "name": "w"}));
        sent.set_subject(Some("orders/1"));
        publish(&publisher, sent.clone()).await;

        let got = seen.wait_len("the event", 1).await;
        let (unbuilt, got) = &got[0];
        let structured = mode == ContentMode::Structured;
        assert_eq!(*unbuilt, structured, "{mode:?}: unbuilt when handled");
        assert_eq!(got.id(), sent.id());
        assert_eq!(got.ty(), event_type);
        assert_eq!(got.source(), pub_config.client_id);
        assert_eq!(got.subject(), Some("orders/1"));
        assert_eq!(got.time(), sent.time());
        assert_eq!(got.datacontenttype(), Some("application/json"));
        assert_eq!(got.transaction_id(), sent.transaction_id());
        assert_eq!(
            got.data_as::<Value>().expect("data"),
            json!({"n": 1, "name": "w"})
        );
        assert_eq!(
            got.is_unbuilt(),
            structured,
            "{mode:?}: reading built nothing"
        );
        // The sdk's event, built on request, is the published one (its JSON data as text).
        let built = got.clone().into_event();
        assert_eq!(built.id(), sent.id());
        assert_eq!(built.subject(), Some("orders/1"));
        assert_eq!(built.data(), sent.data());
        listener.stop(Duration::from_secs(5)).await;
        // The stored event was handled and acked, nothing parked or dead-lettered.
        wait_settled(&env, &pub_config, &durable).await;
        assert!(env.stored(&pub_config.js_dlq_stream).await.is_empty());
    }
}
