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

fn report(what: &str, n: usize, ours: Duration, raw: Duration) {
    let (o, r) = (rate(n, ours), rate(n, raw));
    println!(
        "{what:<28} n={n:<6} ours {o:>9.0}/s  raw async-nats {r:>9.0}/s  ratio ours/raw {:.2}",
        o / r
    );
}

/// Raw publish of what our codec produces, with the same `Nats-Msg-Id`.
fn raw_message(event: &Event) -> (String, async_nats::HeaderMap, bytes::Bytes) {
    let encoded = codec::encode(event, ContentMode::Structured).unwrap();
    let mut headers = encoded.headers;
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

    // Publish one by one.
    let batch = events(one_by_one_n, "ours-1");
    let start = Instant::now();
    for event in batch {
        ours.publish(event).await.unwrap();
    }
    let ours_time = start.elapsed();
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
    report(
        "publish one by one",
        one_by_one_n,
        ours_time,
        start.elapsed(),
    );
    purge(&js).await;

    // Pipelined publish.
    let batch = events(n, "ours-p");
    let start = Instant::now();
    for r in ours.publish_all(batch).await {
        r.unwrap();
    }
    let ours_time = start.elapsed();
    let raw_batch: Vec<_> = events(n, "raw-p").iter().map(raw_message).collect();
    let start = Instant::now();
    let mut acks = futures::stream::FuturesOrdered::new();
    for (subject, headers, payload) in raw_batch {
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
    report("publish pipelined", n, ours_time, start.elapsed());

    // Consume + ack: the stream now holds 2n events of which each consumer reads n (filtered
    // by their data would need decoding; instead each reads all 2n).
    let total = 2 * n;
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let handlers = EventHandlers::new().on(
        TYPE,
        event_handler_fn(move |_, _| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }),
    );
    let start = Instant::now();
    let listener = ours
        .listen(
            handlers,
            EventListenOptions {
                durable_name: Some("bench-ours".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while handled.load(Ordering::Relaxed) < total {
        assert!(Instant::now() < deadline, "consume did not finish");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ours_time = start.elapsed();
    listener.stop(Duration::from_secs(5)).await;

    let start = Instant::now();
    let stream = js.get_stream("CLOUDEVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("bench-raw".into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 272,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut count = 0;
    while count < total {
        let message = messages.next().await.unwrap().unwrap();
        message.ack().await.unwrap();
        count += 1;
    }
    report("consume + ack", total, ours_time, start.elapsed());
    ours.close().await;
}
