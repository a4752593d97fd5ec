//! Throughput of `JetStreamEvents` against raw async-nats JetStream, in the same run and on the
//! same server: publish one by one (wait for each PubAck), pipelined publish (many in flight,
//! every ack awaited), and consume + ack with a durable pull consumer.
//!
//! Run: `cargo bench --bench events` (needs `nats-server`: `NATS_SERVER_BIN`, else
//! `/work/main/.tools/bin/nats-server`, else `PATH`). Sizes: `EVENTS_BENCH_N` (default 20000).
//! Prints events/s for both and the ratio ours / raw (1.0 = as fast as raw async-nats).

use std::future::IntoFuture;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use ce_messaging::cloudevents::AttributesReader;
use ce_messaging::codec::{self, ContentMode};
use ce_messaging::config::Config;
use ce_messaging::event::new_event;
use ce_messaging::events::{event_handler_fn, EventConnection, EventHandlers, EventListenOptions};
use ce_messaging::jetstream::JetStreamEvents;
use ce_messaging::Event;
use futures::StreamExt;

const TYPE: &str = "org.example.bench.happened";

struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("NATS_SERVER_BIN") {
        return path.into();
    }
    let tools = PathBuf::from("/work/main/.tools/bin/nats-server");
    if tools.exists() {
        return tools;
    }
    "nats-server".into()
}

fn start_server() -> Server {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("temp dir");
    let child = Command::new(binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server");
    Server {
        child,
        port,
        _dir: dir,
    }
}

async fn connect(port: u16) -> async_nats::Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match async_nats::connect(format!("127.0.0.1:{port}")).await {
            Ok(client) => return client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
}

fn events(n: usize, tag: &str) -> Vec<Event> {
    (0..n)
        .map(|i| new_event(TYPE, "bench", &serde_json::json!({"n": i, "tag": tag})).unwrap())
        .collect()
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Prints the median rate of each side over the rounds, and their ratio.
fn report(what: &str, n: usize, ours: Vec<Duration>, raw: Vec<Duration>) {
    let rounds = ours.len();
    let (o, r) = (rate(n, median(ours)), rate(n, median(raw)));
    println!(
        "{what:<22} n={n:<6} ours {o:>8.0}/s  raw async-nats {r:>8.0}/s  ratio ours/raw {:.2}  (median of {rounds})",
        o / r
    );
}

/// Raw publish of what our codec produces, with the same `Nats-Msg-Id`.
fn raw_message(event: &Event) -> (String, async_nats::HeaderMap, bytes::Bytes) {
    let encoded = codec::encode(event, ContentMode::Structured).unwrap();
    let mut headers = async_nats::HeaderMap::from(encoded.headers);
    headers.insert("Nats-Msg-Id", event.id());
    (format!("events.{TYPE}"), headers, encoded.payload)
}

async fn purge(js: &jetstream::Context) {
    js.get_stream("CLOUDEVENTS")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("EVENTS_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rounds: usize = std::env::var("EVENTS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let one_by_one_n = (n / 10).max(100);
    let server = start_server();
    let client = connect(server.port).await;
    let config = Config {
        nats_url: format!("nats://127.0.0.1:{}", server.port),
        client_id: "bench".into(),
        ..Default::default()
    };
    let ours = JetStreamEvents::from_client(client.clone(), &config);
    ours.init_stream().await.expect("init_stream");
    let js = jetstream::new(connect(server.port).await);

    // Ours and raw alternate, round after round, so drift on a shared machine hits both.
    let (mut ours_t, mut raw_t) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let batch = events(one_by_one_n, "ours-1");
        let start = Instant::now();
        for event in batch {
            ours.publish(event).await.unwrap();
        }
        ours_t.push(start.elapsed());
        let raw_batch: Vec<_> = events(one_by_one_n, "raw-1")
            .iter()
            .map(raw_message)
            .collect();
        let start = Instant::now();
        for (subject, headers, payload) in raw_batch {
            js.publish_with_headers(subject, headers, payload)
                .await
                .unwrap()
                .await
                .unwrap();
        }
        raw_t.push(start.elapsed());
        purge(&js).await;
    }
    report("publish one by one", one_by_one_n, ours_t, raw_t);

    let (mut ours_t, mut raw_t) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let batch = events(n, "ours-p");
        let start = Instant::now();
        for r in ours.publish_all(batch).await {
            r.unwrap();
        }
        ours_t.push(start.elapsed());
        let raw_batch: Vec<_> = events(n, "raw-p").iter().map(raw_message).collect();
        let start = Instant::now();
        raw_pipelined(&js, raw_batch).await;
        raw_t.push(start.elapsed());
        purge(&js).await;
    }
    report("publish pipelined", n, ours_t, raw_t);

    // Where a difference goes: encoding (ours publishes Events; raw sends ready bytes) and
    // decoding (ours hands handlers Events; raw acks bytes).
    let sample = events(n, "codec");
    let start = Instant::now();
    let encoded: Vec<_> = sample
        .iter()
        .map(|e| {
            // As sent: the headers as async-nats' `HeaderMap`.
            let m = codec::encode(e, ContentMode::Structured).unwrap();
            (m.headers.to_header_map(), m.payload)
        })
        .collect();
    let encode_time = start.elapsed();
    let start = Instant::now();
    for (headers, payload) in &encoded {
        codec::decode(Some(headers), payload).unwrap();
    }
    let decode_time = start.elapsed();
    println!(
        "{:<22} n={n:<6} encode {:.1} us/event, decode {:.1} us/event (one thread)",
        "codec alone",
        encode_time.as_secs_f64() * 1e6 / n as f64,
        decode_time.as_secs_f64() * 1e6 / n as f64
    );

    let (mut ours_t, mut raw_t) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        purge(&js).await;
        raw_pipelined(&js, events(n, "consume").iter().map(raw_message).collect()).await;
        ours_t.push(consume_ours(&ours, n, &format!("ours-{round}")).await);
        raw_t.push(consume_raw(&js, n, &format!("raw-{round}")).await);
    }
    report("consume + ack", n, ours_t, raw_t);
    ours.close().await;
}

async fn raw_pipelined(
    js: &jetstream::Context,
    batch: Vec<(String, async_nats::HeaderMap, bytes::Bytes)>,
) {
    let mut acks = futures::stream::FuturesOrdered::new();
    for (subject, headers, payload) in batch {
        acks.push_back(
            js.publish_with_headers(subject, headers, payload)
                .await
                .unwrap()
                .into_future(),
        );
        if acks.len() >= 1024 {
            acks.next().await.unwrap().unwrap();
        }
    }
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }
}

/// Time for a default listener of ours to handle (and ack) `n` stored events.
async fn consume_ours(ours: &JetStreamEvents, n: usize, durable: &str) -> Duration {
    let handled = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(tokio::sync::Notify::new());
    let (counter, done) = (handled.clone(), all.clone());
    let handlers = EventHandlers::new().on(
        TYPE,
        event_handler_fn(move |_, _| {
            let (counter, done) = (counter.clone(), done.clone());
            async move {
                if counter.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    done.notify_one();
                }
                Ok(())
            }
        }),
    );
    let start = Instant::now();
    let listener = ours
        .listen(
            handlers,
            EventListenOptions {
                durable_name: Some(durable.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(300), all.notified())
        .await
        .expect("consume did not finish");
    let elapsed = start.elapsed();
    listener.stop(Duration::from_secs(5)).await;
    elapsed
}

/// Time for a raw async-nats pull consumer (`messages()`, same max ack pending as ours) to
/// receive and ack `n` stored messages.
async fn consume_raw(js: &jetstream::Context, n: usize, durable: &str) -> Duration {
    let start = Instant::now();
    let stream = js.get_stream("CLOUDEVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(durable.into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 272,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    for _ in 0..n {
        let message = messages.next().await.unwrap().unwrap();
        message.ack().await.unwrap();
    }
    start.elapsed()
}
