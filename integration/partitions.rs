//! Network partitions (issue 19): a 3-node JetStream cluster whose nodes and client live in
//! separate network namespaces joined by point-to-point links (`support/netns.rs`). The tests
//! cut and heal links while the library publishes, consumes and answers requests, and check,
//! as `integration/faults.rs` does, with the [`Checker`]:
//!
//! - **Lost = ∅**: every event the server acknowledged is delivered to a handler;
//! - **Unexpected = ∅**: nothing is delivered that was never published;
//! - every duplicate delivery is a redelivery (no restarts happen here, so a repeated first
//!   delivery is never explained);
//!
//! and, once the listeners stopped, by reading the consumer and the streams: every acked
//! event is stored once, all replicas hold the same last sequence, nothing is pending or
//! waiting for an ack, the ack floor reached the end of the stream, and the dead-letter
//! stream is empty (no handler ever fails).
//!
//! The tests need root and iproute2 (network namespaces); elsewhere each prints why it is
//! skipped and passes. Run alone:
//! `cargo test -p ce-messaging-test-support --features natsjs_integration --test partitions -- --nocapture`
//! (see docs/faults.md).

use ce_messaging_test_support as support;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use ce_messaging::cloudevents::AttributesReader;
use ce_messaging::config::Config;
use ce_messaging::error::{PublishErrorKind, RequestErrorKind};
use ce_messaging::event::{new_event, EventExt};
use ce_messaging::events::{event_handler_fn, EventConnection, EventHandlers, EventListenOptions};
use ce_messaging::jetstream::{JetStreamEvents, PublishRetry};
use ce_messaging::listener::Listener;
use ce_messaging::nats::NatsQueries;
use ce_messaging::query::{handler_fn, QueryConnection, QueryHandlers, QueryListenOptions};
use ce_messaging::shutdown::Shutdown;
use futures::StreamExt;
use support::checker::Checker;
use support::netns::{End, NetCluster};
use tokio::time::Instant;

/// The event type every scenario publishes.
const TYPE: &str = "org.example.partition.tested";
/// The query type of scenario 3.
const ECHO: &str = "org.example.partition.echo";
/// Client ping interval: a silent server is noticed after about three of these.
const PING: Duration = Duration::from_millis(250);
/// Generous bound for steps that should be quick (connect, listen, stream setup).
const STEP: Duration = Duration::from_secs(20);
/// How long a stream may take to have a leader and every replica current again.
const SETTLE: Duration = Duration::from_secs(60);
/// How long scenario 4 flaps links by default (the issue asks for 60 s; 30 s keeps CI time
/// down); `PARTITION_FLAP_SECS` sets another duration.
const FLAP_FOR: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------------------
// Harness
// ------------------------------------------------------------------------------------------

/// Starts a 3-node partitionable cluster and runs `scenario` on a runtime inside the client
/// namespace; where namespaces cannot be created, prints why and returns (the test passes).
fn with_cluster<F, Fut>(name: &str, scenario: F)
where
    F: FnOnce(Arc<NetCluster>) -> Fut,
    Fut: Future<Output = ()> + Send,
{
    let cluster = match NetCluster::start(3) {
        Ok(cluster) => Arc::new(cluster),
        Err(why) => {
            eprintln!("{name}: SKIPPED: {why}");
            return;
        }
    };
    cluster.block_on(scenario(cluster.clone()));
}

fn config(cluster: &NetCluster, client_id: &str) -> Config {
    Config {
        nats_url: cluster.url(),
        client_id: client_id.to_owned(),
        js_ack_wait: Duration::from_secs(2),
        // Partitions cause redeliveries; none of these events may be dead-lettered.
        js_max_deliver: 50,
        js_replicas: 3,
        events_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(1),
        reconnect_wait: Duration::from_millis(250),
        ping_interval: PING,
        ..Default::default()
    }
}

/// A connection made with the library's own options ([`Config::connect_options`]); with
/// `first`, that node is tried first (the others stay in the list for reconnects).
async fn connect(
    cluster: &NetCluster,
    config: &Config,
    first: Option<usize>,
) -> async_nats::Client {
    let mut urls = cluster.urls();
    let mut options = config.connect_options().expect("connect options");
    if let Some(first) = first {
        urls.swap(0, first);
        options = options.retain_servers_order();
    }
    match tokio::time::timeout(STEP, options.connect(urls.as_slice())).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => panic!("connect to {urls:?}: {e}"),
        Err(_) => panic!("connect to {urls:?}: timed out"),
    }
}

/// Index of the node `client` is connected to.
fn connected_node(cluster: &NetCluster, client: &async_nats::Client) -> Option<usize> {
    cluster.index_of(&client.server_info().server_name)
}

/// Creates both streams, retrying (idempotent) while a fresh cluster is slow to answer.
async fn init(events: &JetStreamEvents) {
    let admin = events.with_publish_retry(PublishRetry::default());
    let deadline = Instant::now() + STEP;
    loop {
        let error = match tokio::time::timeout(STEP, admin.init_stream()).await {
            Ok(Ok(())) => return,
            Ok(Err(err)) => err.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        if Instant::now() >= deadline {
            panic!("init_stream: {error}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs a blocking harness call (cut, heal, monitoring) off the async workers.
async fn blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(f: F) -> T {
    tokio::time::timeout(Duration::from_secs(60), tokio::task::spawn_blocking(f))
        .await
        .expect("harness call timed out")
        .expect("harness call panicked")
}

/// Polls `condition` every 20 ms; panics with `what` after `timeout`.
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn numbered_event(n: u64) -> ce_messaging::Event {
    new_event(TYPE, "partitions", &serde_json::json!({ "n": n })).expect("build event")
}

/// When each publish started and ended, and whether it was acked.
#[derive(Clone, Default)]
struct PubLog(Arc<Mutex<Vec<(Instant, Instant, bool)>>>);

impl PubLog {
    fn record(&self, started: Instant, acked: bool) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((started, Instant::now(), acked));
    }

    /// Publishes that started at or after `from` and ended before `to`: (acked, failed).
    fn between(&self, from: Instant, to: Instant) -> (usize, usize) {
        let log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let inside = log.iter().filter(|(s, e, _)| *s >= from && *e < to);
        let acked = inside.clone().filter(|(_, _, a)| *a).count();
        (acked, inside.count() - acked)
    }
}

/// Publishes `event`, recording the attempt and its outcome; panics if neither an ack nor an
/// error arrives within `bound` (a publish must never hang). Returns the error kind on failure.
async fn publish_tracked(
    events: &JetStreamEvents,
    checker: &Checker,
    log: &PubLog,
    event: ce_messaging::Event,
    bound: Duration,
) -> Result<(), PublishErrorKind> {
    let id = event.id().to_owned();
    checker.attempted(&id);
    let started = Instant::now();
    match tokio::time::timeout(bound, events.publish(event)).await {
        Err(_) => panic!("publish of {id} hung: no ack and no error within {bound:?}"),
        Ok(Ok(ack)) => {
            checker.acked(&id, ack.sequence, ack.duplicate);
            log.record(started, true);
            Ok(())
        }
        Ok(Err(err)) => {
            let text = match err.kind() {
                PublishErrorKind::Other => err.to_string(),
                kind => format!("{kind:?}"),
            };
            checker.failed(&id, text);
            log.record(started, false);
            Err(err.kind())
        }
    }
}

/// Publishes `count` new events, `concurrency` at a time; returns how many were acked.
async fn publish_many(
    events: &JetStreamEvents,
    checker: &Checker,
    log: &PubLog,
    count: u64,
    concurrency: usize,
    bound: Duration,
) -> usize {
    futures::stream::iter(0..count)
        .map(|n| publish_tracked(events, checker, log, numbered_event(n), bound))
        .buffer_unordered(concurrency)
        .filter(|outcome| futures::future::ready(outcome.is_ok()))
        .count()
        .await
}

/// Publishes continuously (`concurrency` at a time) until `running` turns false.
fn publish_continuously(
    events: &JetStreamEvents,
    checker: &Checker,
    log: &PubLog,
    running: &Arc<AtomicBool>,
    concurrency: usize,
    bound: Duration,
) -> tokio::task::JoinHandle<()> {
    let (events, checker, log, running) = (
        events.clone(),
        checker.clone(),
        log.clone(),
        running.clone(),
    );
    tokio::spawn(async move {
        futures::stream::iter(0u64..)
            .take_while(|_| futures::future::ready(running.load(Ordering::SeqCst)))
            .map(|n| publish_tracked(&events, &checker, &log, numbered_event(n), bound))
            .buffer_unordered(concurrency)
            .for_each(|_| futures::future::ready(()))
            .await;
    })
}

/// Stops a continuous publisher and waits for its last publishes.
async fn stop_publishing(
    running: &AtomicBool,
    publisher: tokio::task::JoinHandle<()>,
    bound: Duration,
) {
    running.store(false, Ordering::SeqCst);
    tokio::time::timeout(bound * 2, publisher)
        .await
        .expect("publisher hung")
        .expect("publisher panicked");
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
        pool: ce_messaging::WorkerOptions::new(workers, buffer).with_grace(Duration::from_secs(2)),
        durable_name: Some(durable.to_owned()),
        ..Default::default()
    }
}

/// Starts a listener, retrying while the 3-replica consumer cannot be created yet (a cluster
/// that just formed or healed may time out JetStream API requests for a while).
async fn listen(
    events: &JetStreamEvents,
    handlers: impl Fn() -> EventHandlers,
    options: EventListenOptions,
) -> Listener {
    let admin = events.with_publish_retry(PublishRetry::default());
    let deadline = Instant::now() + STEP;
    loop {
        let error =
            match tokio::time::timeout(STEP, admin.listen(handlers(), options.clone())).await {
                Ok(Ok(listener)) => return listener,
                Ok(Err(err)) => err.to_string(),
                Err(_) => "timed out".to_owned(),
            };
        if Instant::now() >= deadline {
            panic!("listen: {error}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn stop(listener: &Listener) {
    tokio::time::timeout(STEP, listener.stop(Duration::from_secs(2)))
        .await
        .expect("listener stop timed out");
}

/// Waits until the stream has a leader and every replica is current (from stream info).
async fn wait_stream_healthy(client: &async_nats::Client, stream: &str) {
    let js = jetstream::new(client.clone());
    wait_for(SETTLE, "stream leader and all replicas current", || {
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
                && cluster.replicas.len() == 2
                && cluster.replicas.iter().all(|r| r.current && !r.offline)
        }
    })
    .await;
}

/// The stream leader all nodes agree on, from their own monitoring views.
async fn stream_leader(cluster: &Arc<NetCluster>, stream: &'static str) -> usize {
    let deadline = Instant::now() + SETTLE;
    loop {
        let c = cluster.clone();
        let views = blocking(move || {
            (0..c.len())
                .map(|i| c.stream_view(i, stream))
                .collect::<Vec<_>>()
        })
        .await;
        let leaders: Vec<Option<&str>> = views
            .iter()
            .map(|v| v.as_ref().map(|(_, l)| l.as_str()))
            .collect();
        if let Some(Some(first)) = leaders.first() {
            if !first.is_empty() && leaders.iter().all(|l| *l == Some(*first)) {
                if let Some(i) = cluster.index_of(first) {
                    return i;
                }
            }
        }
        if Instant::now() >= deadline {
            panic!("nodes do not agree on a leader for {stream}: {views:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `viewer` (from its own monitoring view of `stream`) reports the replica on node
/// `name` as current; `None` if it does not list it (e.g. not the leader).
fn replica_current(cluster: &NetCluster, viewer: usize, stream: &str, name: &str) -> Option<bool> {
    let jsz = cluster
        .try_monitor_json(viewer, "/jsz?accounts=true&streams=true")
        .ok()?;
    let detail = jsz["account_details"]
        .as_array()?
        .iter()
        .filter_map(|a| a["stream_detail"].as_array())
        .flatten()
        .find(|s| s["name"] == stream)?;
    let replica = detail["cluster"]["replicas"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)?;
    Some(
        replica["current"].as_bool().unwrap_or(false)
            && !replica["offline"].as_bool().unwrap_or(false),
    )
}

/// Waits until every node reports the same last sequence for `stream`, at least `at_least`
/// (each from its own namespace); returns it.
async fn wait_replicas_agree(
    cluster: &Arc<NetCluster>,
    stream: &'static str,
    at_least: u64,
) -> u64 {
    let deadline = Instant::now() + SETTLE;
    loop {
        let c = cluster.clone();
        let seqs: Vec<Option<u64>> = blocking(move || {
            (0..c.len())
                .map(|i| c.stream_view(i, stream).map(|(last, _)| last))
                .collect()
        })
        .await;
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

/// Reads the whole stream with an ordered consumer: Nats-Msg-Id -> how many times stored.
async fn stored_ids(client: &async_nats::Client, stream: &str) -> HashMap<String, usize> {
    let js = jetstream::new(client.clone());
    let deadline = Instant::now() + SETTLE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let error = match tokio::time::timeout(left, read_stream(&js, stream)).await {
            Ok(Ok(ids)) => return ids,
            Ok(Err(error)) => error,
            Err(_) => "timed out".to_owned(),
        };
        if Instant::now() >= deadline {
            panic!("reading stream {stream}: {error}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
) -> Result<HashMap<String, usize>, String> {
    let mut s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    let total = s.info().await.map_err(|e| e.to_string())?.state.messages;
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .map_err(|e| format!("ordered consumer: {e}"))?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let mut ids: HashMap<String, usize> = HashMap::new();
    for _ in 0..total {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .map_err(|_| "stream read stalled".to_owned())?
            .ok_or("stream ended early")?
            .map_err(|e| e.to_string())?;
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        *ids.entry(id).or_default() += 1;
    }
    Ok(ids)
}

/// Asserts the stream holds every acked event exactly once and nothing twice.
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

/// Reads the consumer `durable` until nothing is pending or waiting for an ack and its ack
/// floor is the stream's last sequence (every stored event settled), and checks the
/// dead-letter stream is empty. Panics with the last state read otherwise.
async fn assert_settled(client: &async_nats::Client, config: &Config, durable: &str) {
    let js = jetstream::new(client.clone());
    let last_state = Arc::new(Mutex::new(String::new()));
    let seen = last_state.clone();
    let settled = tokio::time::timeout(SETTLE, async {
        loop {
            let state = async {
                let mut stream = js.get_stream(&config.js_stream).await.ok()?;
                let last = stream.info().await.ok()?.state.last_sequence;
                let mut consumer: jetstream::consumer::PullConsumer =
                    stream.get_consumer(durable).await.ok()?;
                let info = consumer.info().await.ok()?.clone();
                Some((last, info))
            };
            if let Ok(Some((last, info))) = tokio::time::timeout(Duration::from_secs(3), state).await
            {
                let unsettled = info.num_pending + info.num_ack_pending as u64;
                *seen.lock().unwrap_or_else(|e| e.into_inner()) = format!(
                    "last seq {last}, pending {}, ack pending {}, ack floor {}, delivered {}, redelivered {}",
                    info.num_pending,
                    info.num_ack_pending,
                    info.ack_floor.stream_sequence,
                    info.delivered.stream_sequence,
                    info.num_redelivered
                );
                if unsettled == 0 && info.ack_floor.stream_sequence == last {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let state = last_state.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        settled.is_ok(),
        "consumer {durable} not settled within {SETTLE:?}: {state}"
    );
    // Read again until it answers: the dead-letter stream (3 replicas too) may be electing a
    // leader after a cut.
    let deadline = Instant::now() + SETTLE;
    let dead = loop {
        let read = tokio::time::timeout(Duration::from_secs(3), async {
            let mut dlq = js
                .get_stream(&config.js_dlq_stream)
                .await
                .map_err(|e| e.to_string())?;
            let info = dlq.info().await.map_err(|e| e.to_string())?;
            Ok::<u64, String>(info.state.messages)
        })
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()));
        match read {
            Ok(messages) => break messages,
            Err(e) if Instant::now() >= deadline => {
                panic!("dead-letter stream {}: {e}", config.js_dlq_stream)
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(dead, 0, "dead letters although no handler failed");
}

/// Everything checked at the end of a scenario once the listeners stopped: every acked event
/// stored once and on every replica, the consumer settled, no dead letter, the checker's sets.
async fn final_checks(
    scenario: &str,
    cluster: &Arc<NetCluster>,
    inspector: &async_nats::Client,
    config: &Config,
    durable: &str,
    checker: &Checker,
) -> u64 {
    let stream: &'static str = "CLOUDEVENTS";
    assert_eq!(config.js_stream, stream);
    assert_stored_once(inspector, stream, checker).await;
    let last = wait_replicas_agree(cluster, stream, 1).await;
    assert_settled(inspector, config, durable).await;
    let report = checker.report();
    eprintln!(
        "{scenario}: last seq {last}; {report:?}; failures {:?}",
        checker.failure_texts()
    );
    if let Some(id) = report.unexplained_duplicates.keys().next() {
        eprintln!("{scenario} timeline: {}", checker.timeline(id));
    }
    report.assert_valid(scenario);
    last
}

/// A connection to all nodes for setup and inspection, with both streams created and healthy.
async fn setup(cluster: &Arc<NetCluster>, config: &Config) -> async_nats::Client {
    let inspector = connect(cluster, config, None).await;
    init(&JetStreamEvents::from_client(inspector.clone(), config)).await;
    wait_stream_healthy(&inspector, &config.js_stream).await;
    inspector
}

// ------------------------------------------------------------------------------------------
// 1. the stream leader isolated from both followers, the client still connected to it
// ------------------------------------------------------------------------------------------

#[test]
fn p1_isolated_stream_leader_acknowledges_nothing_and_loses_nothing() {
    with_cluster("p1", |cluster| async move {
        let config = config(&cluster, "p1");
        let inspector = setup(&cluster, &config).await;
        let leader = stream_leader(&cluster, "CLOUDEVENTS").await;
        let retry = PublishRetry {
            attempt_timeout: Duration::from_secs(1),
            total: Some(Duration::from_secs(4)),
            pause: Duration::from_millis(100),
        };
        let bound = publish_bound(&retry);
        let client = connect(&cluster, &config, Some(leader)).await;
        assert_eq!(connected_node(&cluster, &client), Some(leader));
        let events =
            JetStreamEvents::from_client(client.clone(), &config).with_publish_retry(retry);
        let checker = Checker::new();
        let log = PubLog::default();
        let listener = listen(
            &events,
            || recording_handlers(&checker),
            listen_options("p1", 16, 128),
        )
        .await;
        let running = Arc::new(AtomicBool::new(true));
        let publisher = publish_continuously(&events, &checker, &log, &running, 8, bound);
        wait_for(STEP, "publishing before the partition", || async {
            checker.acked_count() >= 50
        })
        .await;

        let c = cluster.clone();
        blocking(move || c.isolate(leader, false)).await;
        let cut_at = Instant::now();
        // The two followers are a majority: they elect a leader among themselves.
        let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        let old = cluster.node_name(leader).to_owned();
        wait_for(SETTLE, "the majority elects a new stream leader", || {
            let (c, followers, old) = (cluster.clone(), followers.clone(), old.clone());
            async move {
                blocking(move || {
                    let seen: Vec<String> = followers
                        .iter()
                        .filter_map(|i| c.stream_view(*i, "CLOUDEVENTS").map(|(_, l)| l))
                        .collect();
                    seen.len() == 2 && !seen[0].is_empty() && seen[0] != old && seen[0] == seen[1]
                })
                .await
            }
        })
        .await;
        let elected_after = cut_at.elapsed();
        // Everything the client sends meanwhile goes to the old leader, which has no majority.
        wait_for(
            SETTLE,
            "publishes through the isolated leader fail",
            || async { log.between(cut_at, Instant::now()).1 >= 8 },
        )
        .await;
        let c = cluster.clone();
        let heal_at = Instant::now();
        blocking(move || c.heal_all()).await;
        let (acked_isolated, failed_isolated) = log.between(cut_at, heal_at);
        assert_eq!(
            acked_isolated, 0,
            "publishes begun and acknowledged while the leader was cut from both followers"
        );

        wait_stream_healthy(&inspector, &config.js_stream).await;
        let acked = checker.acked_count();
        wait_for(
            SETTLE,
            "publishing through the old leader after the heal",
            || async { checker.acked_count() >= acked + 50 },
        )
        .await;
        stop_publishing(&running, publisher, bound).await;
        checker.wait_all_acked_delivered(SETTLE, "p1").await;
        stop(&listener).await;
        let after_heal = heal_at.elapsed();
        final_checks("p1", &cluster, &inspector, &config, "p1", &checker).await;
        eprintln!(
            "p1: leader {old} isolated; new leader after {elected_after:?}; {failed_isolated} publishes failed while isolated, none acked; settled {after_heal:?} after the heal"
        );
    });
}

// ------------------------------------------------------------------------------------------
// 2. a follower isolated and healed five times
// ------------------------------------------------------------------------------------------

#[test]
fn p2_follower_isolated_five_times_writes_continue_and_it_catches_up() {
    with_cluster("p2", |cluster| async move {
        let config = config(&cluster, "p2");
        let inspector = setup(&cluster, &config).await;
        let retry = PublishRetry {
            attempt_timeout: Duration::from_secs(1),
            total: Some(Duration::from_secs(20)),
            pause: Duration::from_millis(100),
        };
        let bound = publish_bound(&retry);
        let events = JetStreamEvents::from_client(connect(&cluster, &config, None).await, &config)
            .with_publish_retry(retry);
        let checker = Checker::new();
        let log = PubLog::default();
        let listener = listen(
            &events,
            || recording_handlers(&checker),
            listen_options("p2", 16, 128),
        )
        .await;
        let running = Arc::new(AtomicBool::new(true));
        let publisher = publish_continuously(&events, &checker, &log, &running, 8, bound);
        let mut rounds = Vec::new();
        for round in 0..5 {
            let acked = checker.acked_count();
            wait_for(SETTLE, "publishing before the cut", || async {
                checker.acked_count() >= acked + 30
            })
            .await;
            let leader = stream_leader(&cluster, "CLOUDEVENTS").await;
            let follower = (leader + 1 + round % 2) % 3;
            let c = cluster.clone();
            blocking(move || c.isolate(follower, true)).await;
            let cut_at = Instant::now();
            let acked = checker.acked_count();
            // Held until writes went on without it, the leader reports it behind, and long
            // enough (4 s) for the routes to it to time out (1 s pings, 3 unanswered).
            let name = cluster.node_name(follower).to_owned();
            wait_for(SETTLE, "writes continue without the follower", || {
                let (c, name, checker) = (cluster.clone(), name.clone(), checker.clone());
                async move {
                    let behind = blocking(move || {
                        replica_current(&c, leader, "CLOUDEVENTS", &name) == Some(false)
                    })
                    .await;
                    checker.acked_count() >= acked + 30
                        && behind
                        && cut_at.elapsed() >= Duration::from_secs(4)
                }
            })
            .await;
            let c = cluster.clone();
            let majority_seq = blocking(move || {
                // Its /jsz listed the stream a moment ago (replica_current); ask until it does
                // again, within a bound.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    if let Some((last, _)) = c.stream_view(leader, "CLOUDEVENTS") {
                        break last;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the leader's view of the stream"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
            .await;
            let isolated_for = cut_at.elapsed();
            let c = cluster.clone();
            blocking(move || c.heal_all()).await;
            let healed_at = Instant::now();
            // The follower catches up: its own store reaches what the majority had.
            wait_for(SETTLE, "the healed follower catches up", || {
                let c = cluster.clone();
                async move {
                    blocking(move || c.stream_view(follower, "CLOUDEVENTS"))
                        .await
                        .is_some_and(|(last, _)| last >= majority_seq)
                }
            })
            .await;
            let caught_up = healed_at.elapsed();
            wait_stream_healthy(&inspector, &config.js_stream).await;
            rounds.push((round, follower, isolated_for, majority_seq, caught_up));
        }
        let acked = checker.acked_count();
        wait_for(SETTLE, "publishing after the last heal", || async {
            checker.acked_count() >= acked + 30
        })
        .await;
        stop_publishing(&running, publisher, bound).await;
        checker.wait_all_acked_delivered(SETTLE, "p2").await;
        stop(&listener).await;
        final_checks("p2", &cluster, &inspector, &config, "p2", &checker).await;
        eprintln!(
            "p2: rounds (round, follower, isolated for, majority seq, caught up after) {rounds:?}"
        );
    });
}

// ------------------------------------------------------------------------------------------
// 3. the client's own node isolated
// ------------------------------------------------------------------------------------------

#[test]
fn p3_clients_node_isolated_fails_within_bounds_then_reconnects_to_the_majority() {
    with_cluster("p3", |cluster| async move {
        let config = config(&cluster, "p3");
        let inspector = setup(&cluster, &config).await;
        // The library's own connection: all cluster URLs from the config, in its order.
        let client = tokio::time::timeout(STEP, config.connect())
            .await
            .expect("connect timed out")
            .expect("connect");
        let home = connected_node(&cluster, &client).expect("connected to a node");
        let short = PublishRetry {
            attempt_timeout: Duration::from_secs(1),
            total: Some(Duration::from_secs(3)),
            pause: Duration::from_millis(100),
        };
        let patient = PublishRetry {
            attempt_timeout: Duration::from_secs(1),
            total: Some(Duration::from_secs(20)),
            pause: Duration::from_millis(100),
        };
        let events =
            JetStreamEvents::from_client(client.clone(), &config).with_publish_retry(patient);
        let requester = NatsQueries::from_client(client.clone(), &config);
        // The responder: another service, on another node.
        let responder_node = (home + 1) % 3;
        let responder = NatsQueries::from_client(
            connect(&cluster, &config, Some(responder_node)).await,
            &config,
        );
        let echo = QueryHandlers::new().on(
            ECHO,
            handler_fn(|request, reply| async move {
                let data: serde_json::Value = request.data_as().unwrap_or_default();
                reply
                    .reply_data("org.example.partition.echoed", &data)
                    .await?;
                Ok(())
            }),
        );
        let query_listener =
            tokio::time::timeout(STEP, responder.listen(echo, QueryListenOptions::default()))
                .await
                .expect("query listen timed out")
                .expect("query listen");
        let checker = Checker::new();
        let log = PubLog::default();
        let listener = listen(
            &events,
            || recording_handlers(&checker),
            listen_options("p3", 8, 64),
        )
        .await;
        let echo_request = |n: u64| {
            new_event(ECHO, "partitions", &serde_json::json!({ "n": n })).expect("build request")
        };
        let timeout = Duration::from_secs(1);
        wait_for(STEP, "a request answered before the partition", || {
            let requester = requester.clone();
            async move {
                requester
                    .request_with_timeout(echo_request(0), timeout)
                    .await
                    .is_ok()
            }
        })
        .await;
        assert_eq!(
            publish_many(&events, &checker, &log, 20, 8, publish_bound(&patient)).await,
            20
        );

        // Phase A: the client's node cut from both peers; the client is on the minority side.
        let c = cluster.clone();
        blocking(move || c.isolate(home, false)).await;
        let mut request_failures = Vec::new();
        for n in 1..=3 {
            let started = Instant::now();
            let outcome = tokio::time::timeout(
                timeout + Duration::from_secs(2),
                requester.request_with_timeout(echo_request(n), timeout),
            )
            .await
            .expect("a request hung past its timeout");
            let elapsed = started.elapsed();
            let err = outcome.expect_err("a request across the partition cannot be answered");
            assert!(
                matches!(
                    err.kind(),
                    RequestErrorKind::TimedOut | RequestErrorKind::NoResponders
                ),
                "undocumented request error during a partition: {err}"
            );
            assert!(
                elapsed <= timeout + Duration::from_millis(500),
                "{:?} after {elapsed:?}, beyond the {timeout:?} timeout",
                err.kind()
            );
            request_failures.push((err.kind(), elapsed));
        }
        let minority = events.with_publish_retry(short);
        let started = Instant::now();
        let kinds: Vec<Result<(), PublishErrorKind>> = futures::stream::iter(0..5u64)
            .map(|n| {
                publish_tracked(
                    &minority,
                    &checker,
                    &log,
                    numbered_event(1000 + n),
                    publish_bound(&short),
                )
            })
            .buffer_unordered(5)
            .collect()
            .await;
        let minority_took = started.elapsed();
        assert!(
            kinds.iter().all(Result::is_err),
            "a publish on the minority side was acknowledged: {kinds:?}"
        );

        // Phase B: the client's link to its node cut too: it reconnects to a majority node on
        // its own, and everything resumes without application code.
        let c = cluster.clone();
        blocking(move || c.cut(End::Node(home), End::Client)).await;
        let cut_at = Instant::now();
        wait_for(STEP, "the client reconnects to another node", || {
            let (client, cluster) = (client.clone(), cluster.clone());
            async move {
                client.connection_state() == State::Connected
                    && connected_node(&cluster, &client).is_some_and(|n| n != home)
            }
        })
        .await;
        let reconnected_after = cut_at.elapsed();
        assert_eq!(
            publish_many(&events, &checker, &log, 20, 8, publish_bound(&patient)).await,
            20,
            "publishes after the reconnect: {:?}",
            checker.failure_texts()
        );
        wait_for(STEP, "requests answered after the reconnect", || {
            let requester = requester.clone();
            async move {
                requester
                    .request_with_timeout(echo_request(99), timeout)
                    .await
                    .is_ok()
            }
        })
        .await;
        checker
            .wait_all_acked_delivered(SETTLE, "p3 after the reconnect")
            .await;
        assert!(
            !listener.is_stopped() && !query_listener.is_stopped(),
            "a listener ended on its own"
        );

        let c = cluster.clone();
        blocking(move || c.heal_all()).await;
        wait_stream_healthy(&inspector, &config.js_stream).await;
        stop(&listener).await;
        stop(&query_listener).await;
        final_checks("p3", &cluster, &inspector, &config, "p3", &checker).await;
        eprintln!(
            "p3: client on n{home}; requests on the minority side {request_failures:?}; publishes there {kinds:?} within {minority_took:?}; reconnected {reconnected_after:?} after its link was cut"
        );
    });
}

// ------------------------------------------------------------------------------------------
// 4. flapping links under load
// ------------------------------------------------------------------------------------------

/// xorshift64*: enough randomness to pick links, and reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn p4_flapping_links_under_load_lose_nothing() {
    with_cluster("p4", |cluster| async move {
        let config = config(&cluster, "p4");
        let inspector = setup(&cluster, &config).await;
        let retry = PublishRetry {
            attempt_timeout: Duration::from_secs(1),
            total: Some(Duration::from_secs(20)),
            pause: Duration::from_millis(100),
        };
        let bound = publish_bound(&retry);
        let events = JetStreamEvents::from_client(connect(&cluster, &config, None).await, &config)
            .with_publish_retry(retry);
        let checker = Checker::new();
        let log = PubLog::default();
        let listener = listen(
            &events,
            || recording_handlers(&checker),
            listen_options("p4", 16, 128),
        )
        .await;
        let running = Arc::new(AtomicBool::new(true));
        let publisher = publish_continuously(&events, &checker, &log, &running, 8, bound);
        wait_for(STEP, "publishing before the flapping", || async {
            checker.acked_count() >= 50
        })
        .await;
        let seed = std::env::var("PARTITION_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1
            });
        eprintln!("p4: seed {seed} (PARTITION_SEED={seed} repeats the link choices)");
        let mut rng = Rng(seed);
        let links = cluster.links();
        let flap_for = std::env::var("PARTITION_FLAP_SECS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map_or(FLAP_FOR, Duration::from_secs);
        let until = Instant::now() + flap_for;
        let mut cuts = Vec::new();
        while Instant::now() < until {
            let (a, b) = links[(rng.next() % links.len() as u64) as usize];
            let down_for = Duration::from_millis(1000 + rng.next() % 2000);
            let c = cluster.clone();
            blocking(move || c.cut(a, b)).await;
            // The fault's own duration.
            tokio::time::sleep(down_for).await;
            let c = cluster.clone();
            blocking(move || c.heal(a, b)).await;
            cuts.push((a, b, down_for.as_millis()));
        }
        let acked_during = checker.acked_count();
        wait_stream_healthy(&inspector, &config.js_stream).await;
        let acked = checker.acked_count();
        wait_for(SETTLE, "publishing after the flapping", || async {
            checker.acked_count() >= acked + 50
        })
        .await;
        stop_publishing(&running, publisher, bound).await;
        checker.wait_all_acked_delivered(SETTLE, "p4").await;
        stop(&listener).await;
        final_checks("p4", &cluster, &inspector, &config, "p4", &checker).await;
        eprintln!(
            "p4: {} cuts in {flap_for:?} {cuts:?}; {acked_during} acked by the end of the flapping",
            cuts.len()
        );
    });
}

// ------------------------------------------------------------------------------------------
// 5. a partition during a listener's graceful shutdown
// ------------------------------------------------------------------------------------------

/// Counts a running section (decrements on drop, so also when a handler is cut off).
struct Gauge(Arc<AtomicUsize>);

impl Gauge {
    fn enter(counter: &Arc<AtomicUsize>) -> Gauge {
        counter.fetch_add(1, Ordering::SeqCst);
        Gauge(counter.clone())
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[test]
fn p5_partition_during_graceful_shutdown_loses_nothing() {
    with_cluster("p5", |cluster| async move {
        const COUNT: u64 = 200;
        let config = config(&cluster, "p5");
        let inspector = setup(&cluster, &config).await;
        let retry = PublishRetry::default();
        let publisher = JetStreamEvents::from_client(inspector.clone(), &config);
        let checker = Checker::new();
        let log = PubLog::default();
        assert_eq!(
            publish_many(&publisher, &checker, &log, COUNT, 32, publish_bound(&retry)).await,
            COUNT as usize
        );

        // The service runs on node 0; that node is cut from everything during its shutdown.
        let home = 0;
        let service_client = connect(&cluster, &config, Some(home)).await;
        assert_eq!(connected_node(&cluster, &service_client), Some(home));
        let service = JetStreamEvents::from_client(service_client, &config);
        let grace = Duration::from_secs(1);
        let drain = Duration::from_secs(3);
        let shutdown = Shutdown::new(grace).with_drain_timeout(drain);
        let returned = Arc::new(AtomicBool::new(false));
        let after_return = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let long_running = Arc::new(AtomicUsize::new(0));
        let handlers = || {
            let (checker, returned, after_return) =
                (checker.clone(), returned.clone(), after_return.clone());
            let (in_flight, long_running) = (in_flight.clone(), long_running.clone());
            EventHandlers::new().on(
                TYPE,
                event_handler_fn(move |event, responses| {
                    let (checker, returned, after_return) =
                        (checker.clone(), returned.clone(), after_return.clone());
                    let (in_flight, long_running) = (in_flight.clone(), long_running.clone());
                    async move {
                        if returned.load(Ordering::SeqCst) {
                            after_return.fetch_add(1, Ordering::SeqCst);
                        }
                        checker.delivered(event.id(), responses.delivery_count());
                        let _guard = Gauge::enter(&in_flight);
                        let n = event
                            .data_as::<serde_json::Value>()
                            .ok()
                            .and_then(|v| v["n"].as_u64())
                            .unwrap_or(0);
                        // Simulated work: most events are quick, every tenth outlasts the grace.
                        if n % 10 == 0 {
                            let _long = Gauge::enter(&long_running);
                            tokio::time::sleep(Duration::from_secs(10)).await;
                        } else {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if returned.load(Ordering::SeqCst) {
                            after_return.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(())
                    }
                }),
            )
        };
        let listener = listen(&service, handlers, listen_options("p5", 4, 32)).await;
        shutdown.add_listener(listener);
        shutdown.add_connection(service.clone());
        wait_for(STEP, "load with a long handler in flight", || async {
            checker.delivered_ids().len() >= 20 && long_running.load(Ordering::SeqCst) >= 1
        })
        .await;

        let stopping = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.shutdown().await }
        });
        // The partition lands inside the grace period: acks, naks and the drain meet a cut.
        let c = cluster.clone();
        blocking(move || c.isolate(home, true)).await;
        assert!(
            !stopping.is_finished(),
            "the shutdown ended before the partition: nothing tested"
        );
        let cut_at = Instant::now();
        let bound = grace + drain + Duration::from_secs(15);
        let report = tokio::time::timeout(bound, stopping)
            .await
            .expect("shutdown hung across the partition")
            .expect("shutdown panicked");
        returned.store(true, Ordering::SeqCst);
        assert_eq!(
            in_flight.load(Ordering::SeqCst),
            0,
            "handlers still running after shutdown"
        );
        assert_eq!(report.listeners, 1);
        let shutdown_took = cut_at.elapsed();

        // A successor (same durable) on the majority side, while the partition lasts, gets
        // whatever the stopped instance did not settle: its acks and naks went into the cut
        // (they reach the server, if ever, only after the heal), so those events come back
        // after the ack wait.
        let majority_node = (home + 1) % 3;
        let successor_client = connect(&cluster, &config, Some(majority_node)).await;
        let successor_events = JetStreamEvents::from_client(successor_client.clone(), &config);
        let successor = listen(
            &successor_events,
            || recording_handlers(&checker),
            listen_options("p5", 16, 256),
        )
        .await;
        let successor_started = Instant::now();
        checker
            .wait_all_acked_delivered(SETTLE, "p5 successor")
            .await;
        // Everything stored is settled (acked by someone) before the heal.
        assert_settled(&successor_client, &config, "p5").await;
        let settled_after = successor_started.elapsed();
        let c = cluster.clone();
        blocking(move || c.heal_all()).await;
        wait_stream_healthy(&inspector, &config.js_stream).await;
        stop(&successor).await;
        assert_eq!(
            after_return.load(Ordering::SeqCst),
            0,
            "a handler ran after shutdown returned"
        );
        final_checks("p5", &cluster, &inspector, &config, "p5", &checker).await;
        eprintln!(
            "p5: {report:?}; shutdown returned {shutdown_took:?} after the cut; the successor on the majority side settled everything {settled_after:?} after it started, before the heal"
        );
    });
}
