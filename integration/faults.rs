//! Fault injection against real `nats-server` processes (issue 6): the tests kill (-9), pause
//! (SIGSTOP) and restart servers and cluster nodes while the library publishes, consumes and
//! answers requests, and a [`Checker`] asserts the invariants:
//!
//! - **Lost = ∅**: every event the server acknowledged is delivered to a handler;
//! - **Unexpected = ∅**: nothing is delivered that was never published;
//! - every duplicate delivery is a redelivery (delivery count > 1); a retried publish is
//!   de-duplicated by the stream, not stored twice.
//!
//! Timings are short (ack waits of 1-2 s, 250 ms client pings) so that the whole suite takes a
//! few minutes. Every wait has a timeout; the only fixed pauses are the faults' own durations.
//! Run alone: `cargo test --features natsjs_integration --test faults`.

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use ce_messaging::cloudevents::AttributesReader;
use ce_messaging::config::Config;
use ce_messaging::error::RequestErrorKind;
use ce_messaging::event::new_event;
use ce_messaging::events::{event_handler_fn, EventConnection, EventHandlers, EventListenOptions};
use ce_messaging::jetstream::{JetStreamEvents, PublishRetry};
use ce_messaging::listener::Listener;
use ce_messaging::nats::NatsQueries;
use ce_messaging::query::{handler_fn, QueryConnection, QueryHandlers, QueryListenOptions};
use ce_messaging::shutdown::Shutdown;
use futures::StreamExt;
use support::checker::Checker;
use support::cluster::NatsCluster;
use support::server::NatsServer;
use tokio::time::Instant;

/// The event type every scenario publishes.
const TYPE: &str = "org.example.fault.tested";
/// Client ping interval: a frozen server is noticed after about three of these.
const PING: Duration = Duration::from_millis(250);
/// Generous bound for steps that should be quick (connect, listen, stream setup).
const STEP: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

/// A client for faults: short pings (a frozen server is noticed within a second), quick
/// reconnects, unlimited reconnect attempts.
async fn fault_client(url: &str) -> async_nats::Client {
    let urls: Vec<String> = url.split(',').map(str::to_owned).collect();
    let options = async_nats::ConnectOptions::new()
        .name("ce-messaging-faults")
        .connection_timeout(Duration::from_secs(1))
        .ping_interval(PING)
        .max_reconnects(None)
        .reconnect_delay_callback(|attempt| {
            Duration::from_millis((50 * (attempt as u64 + 1)).min(250))
        });
    match tokio::time::timeout(STEP, options.connect(urls.as_slice())).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => panic!("connect to {url}: {e}"),
        Err(_) => panic!("connect to {url}: timed out"),
    }
}

fn config(url: &str, client_id: &str, replicas: usize) -> Config {
    Config {
        nats_url: url.to_owned(),
        client_id: client_id.to_owned(),
        js_ack_wait: Duration::from_secs(2),
        // Faults cause redeliveries; none of these events should be dead-lettered.
        js_max_deliver: 50,
        js_replicas: replicas,
        events_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

async fn events_on(url: &str, config: &Config, retry: PublishRetry) -> JetStreamEvents {
    JetStreamEvents::from_client(fault_client(url).await, config).with_publish_retry(retry)
}

async fn init(events: &JetStreamEvents) {
    tokio::time::timeout(STEP, events.init_stream())
        .await
        .expect("init_stream timed out")
        .expect("init_stream");
}

/// Runs a blocking harness call (kill, restart, pause, resume) off the async workers.
async fn blocking<F: FnOnce() + Send + 'static>(f: F) {
    tokio::time::timeout(Duration::from_secs(60), tokio::task::spawn_blocking(f))
        .await
        .expect("harness call timed out")
        .expect("harness call panicked");
}

/// Polls `condition` every 10 ms; panics with `what` after `timeout`.
async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(true) = tokio::time::timeout(left, condition()).await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn numbered_event(n: u64) -> ce_messaging::Event {
    new_event(TYPE, "faults", &serde_json::json!({ "n": n })).expect("build event")
}

/// Publishes `event`, recording the attempt and its outcome; panics if neither an ack nor an
/// error arrives within `bound` (a publish must never hang). Returns whether it was acked.
async fn publish_tracked(
    events: &JetStreamEvents,
    checker: &Checker,
    event: ce_messaging::Event,
    bound: Duration,
) -> bool {
    let id = event.id().to_owned();
    checker.attempted(&id);
    let started = Instant::now();
    match tokio::time::timeout(bound, events.publish(event)).await {
        Err(_) => panic!("publish of {id} hung: no ack and no error within {bound:?}"),
        Ok(Ok(ack)) => {
            checker.acked(&id, ack.sequence, ack.duplicate);
            true
        }
        Ok(Err(err)) => {
            assert!(
                started.elapsed() <= bound,
                "publish error after {:?}",
                started.elapsed()
            );
            checker.failed(&id, &err);
            false
        }
    }
}

/// Publishes `count` new events, `concurrency` at a time; returns how many were acked.
async fn publish_many(
    events: &JetStreamEvents,
    checker: &Checker,
    count: u64,
    concurrency: usize,
    bound: Duration,
) -> usize {
    futures::stream::iter(0..count)
        .map(|n| publish_tracked(events, checker, numbered_event(n), bound))
        .buffer_unordered(concurrency)
        .filter(|acked| futures::future::ready(*acked))
        .count()
        .await
}

/// The upper bound of one publish under `retry`: all attempts, plus scheduling slack.
fn publish_bound(retry: &PublishRetry) -> Duration {
    retry.total.unwrap_or(Duration::from_secs(10)) + retry.attempt_timeout + Duration::from_secs(3)
}

/// Handlers that record every delivery (id, delivery count) in `checker` and succeed.
fn recording_handlers(checker: &Checker) -> EventHandlers {
    let checker = checker.clone();
    EventHandlers::new().on(
        TYPE,
        event_handler_fn(move |event, responses| {
            let checker = checker.clone();
            async move {
                checker.delivered(event.id(), responses.delivery_count());
                Ok(())
            }
        }),
    )
}

fn listen_options(durable: &str, workers: usize, buffer: usize) -> EventListenOptions {
    EventListenOptions {
        workers,
        buffer,
        durable_name: Some(durable.to_owned()),
        grace: Duration::from_secs(2),
        ..Default::default()
    }
}

async fn listen(
    events: &JetStreamEvents,
    handlers: EventHandlers,
    options: EventListenOptions,
) -> Listener {
    tokio::time::timeout(STEP, events.listen(handlers, options))
        .await
        .expect("listen timed out")
        .expect("listen")
}

async fn stop(listener: &Listener) {
    tokio::time::timeout(STEP, listener.stop(Duration::from_secs(2)))
        .await
        .expect("listener stop timed out");
}

/// Reads the whole stream with an ordered consumer: Nats-Msg-Id -> how many times stored.
async fn stored_ids(client: &async_nats::Client, stream: &str) -> HashMap<String, usize> {
    let js = jetstream::new(client.clone());
    let read = async {
        let mut s = js.get_stream(stream).await.expect("get stream");
        let total = s.info().await.expect("stream info").state.messages;
        let consumer = s
            .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
            .await
            .expect("ordered consumer");
        let mut messages = consumer.messages().await.expect("ordered messages");
        let mut ids: HashMap<String, usize> = HashMap::new();
        let mut read = 0u64;
        while read < total {
            let message = messages
                .next()
                .await
                .expect("stream ended early")
                .expect("ordered message");
            read += 1;
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            *ids.entry(id).or_default() += 1;
        }
        ids
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("reading the stream timed out")
}

/// Asserts the stream holds every acked event exactly once and nothing that was not attempted
/// more than once.
async fn assert_stored_once(client: &async_nats::Client, stream: &str, checker: &Checker) {
    let stored = stored_ids(client, stream).await;
    let mut missing = Vec::new();
    for id in checker.acked_ids() {
        match stored.get(&id) {
            Some(1) => {}
            Some(n) => panic!("acked event {id} stored {n} times"),
            None => missing.push(id),
        }
    }
    assert!(
        missing.is_empty(),
        "acked events missing from the stream: {missing:?}"
    );
    let twice: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "events stored more than once: {twice:?}");
}

/// The last sequence of `stream` on each running node, from its own monitoring endpoint.
fn replica_last_seqs(cluster: &NatsCluster, stream: &str) -> Vec<Option<u64>> {
    cluster
        .nodes()
        .iter()
        .map(|node| {
            let jsz = node
                .try_monitor_json("/jsz?accounts=true&streams=true")
                .ok()?;
            jsz["account_details"]
                .as_array()?
                .iter()
                .filter_map(|a| a["stream_detail"].as_array())
                .flatten()
                .find(|s| s["name"] == stream)
                .and_then(|s| s["state"]["last_seq"].as_u64())
        })
        .collect()
}

/// Waits until every node reports the same last sequence for `stream`, equal to `at_least` or
/// more; returns it.
async fn wait_replicas_agree(cluster: &NatsCluster, stream: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seqs = replica_last_seqs(cluster, stream);
        if let Some(Some(first)) = seqs.first() {
            if *first >= at_least && seqs.iter().all(|s| *s == Some(*first)) {
                return *first;
            }
        }
        if Instant::now() >= deadline {
            panic!("replicas of {stream} do not agree on the last sequence: {seqs:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the stream has a leader and every replica is current.
async fn wait_stream_healthy(client: &async_nats::Client, stream: &str, replicas: usize) {
    let js = jetstream::new(client.clone());
    wait_for(Duration::from_secs(40), "stream replicas current", || {
        let js = js.clone();
        async move {
            let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(2), js.get_stream(stream)).await
            else {
                return false;
            };
            let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(2), s.info()).await else {
                return false;
            };
            let Some(cluster) = info.cluster.clone() else {
                return false;
            };
            cluster.leader.is_some()
                && cluster.replicas.len() + 1 == replicas
                && cluster.replicas.iter().all(|r| r.current && !r.offline)
        }
    })
    .await;
}

/// Index of a running node that is not `leader`.
fn follower_of(cluster: &NatsCluster, leader: usize) -> usize {
    (0..cluster.len())
        .find(|i| *i != leader)
        .expect("a cluster of more than one node")
}

// ------------------------------------------------------------------------------------------
// 1. kill -9 and restart the server twice while publishing 10,000 events
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_server_killed_twice_while_publishing_loses_nothing_acked() {
    const COUNT: u64 = 10_000;
    let server = Arc::new(NatsServer::start());
    let config = config(&server.url(), "s1", 1);
    let retry = PublishRetry {
        attempt_timeout: Duration::from_secs(1),
        total: Some(Duration::from_secs(2)),
        pause: Duration::from_millis(50),
    };
    let bound = publish_bound(&retry);
    let events = events_on(&server.url(), &config, retry).await;
    init(&events).await;
    let checker = Checker::new();
    let listener = listen(
        &events,
        recording_handlers(&checker),
        listen_options("s1", 16, 256),
    )
    .await;

    let publisher = tokio::spawn({
        let (events, checker) = (events.clone(), checker.clone());
        async move { publish_many(&events, &checker, COUNT, 256, bound).await }
    });

    // First outage: long enough that publishes give up (and must say so within the bound).
    wait_for(Duration::from_secs(60), "2,000 acks", || async {
        checker.acked_count() >= 2_000
    })
    .await;
    let s = server.clone();
    blocking(move || s.kill()).await;
    wait_for(
        Duration::from_secs(20),
        "a publish error during the outage",
        || async { checker.failed_count() >= 1 },
    )
    .await;
    let s = server.clone();
    blocking(move || s.restart()).await;
    checker.server_restarted();

    // Second outage: short, so in-flight publishes ride through it on their retries.
    let acked_before = checker.acked_count();
    wait_for(
        Duration::from_secs(60),
        "more acks after the restart",
        || async { checker.acked_count() >= acked_before + 2_000 },
    )
    .await;
    let s = server.clone();
    blocking(move || s.restart()).await;
    checker.server_restarted();

    let acked = tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("publisher hung")
        .expect("publisher panicked");
    assert!(acked > 0);
    checker
        .wait_all_acked_delivered(Duration::from_secs(60), "s1")
        .await;
    stop(&listener).await;

    let reader = fault_client(&server.url()).await;
    assert_stored_once(&reader, &config.js_stream, &checker).await;
    let report = checker.report();
    eprintln!("s1: {report:?}");
    report.assert_valid("s1");
    assert_eq!(report.attempted as u64, COUNT);
    assert!(report.failed >= 1, "the first outage made no publish fail");
}
