//! Query request/reply over core NATS: `NatsQueries::request` against raw async-nats
//! `Client::request` with the same payload, in one run against one nats-server.
//!
//! Measures sequential latency (p50, p99) and the throughput of 64 concurrent requesters, and
//! prints each figure for both and their ratio (ours / raw).
//!
//! ```text
//! NATS_SERVER_BIN=/path/to/nats-server cargo bench --bench query
//! ```
//!
//! Knobs (environment): `BENCH_SEQUENTIAL` (default 5000 requests), `BENCH_CONCURRENT`
//! (default 50000 requests), `BENCH_CONCURRENCY` (default 64).

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ce_messaging::codec::{self, ContentMode};
use ce_messaging::config::Config;
use ce_messaging::event::new_event;
use ce_messaging::nats::NatsQueries;
use ce_messaging::query::{handler_fn, QueryConnection, QueryHandlers, QueryListenOptions};
use ce_messaging::Event;
use futures::StreamExt;

const OP: &str = "bench.workspace.get";
const RAW_SUBJECT: &str = "bench.raw.echo";
const WARMUP: usize = 500;

/// A nats-server child process on a free loopback port, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Server {
        let binary = server_binary();
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").expect("free port");
            probe.local_addr().expect("local addr").port()
        };
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server not ready in 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, port }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(bin);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/nats-server");
    if local.is_file() {
        return local;
    }
    let main = PathBuf::from("/work/main/.tools/bin/nats-server");
    if main.is_file() {
        return main;
    }
    PathBuf::from("nats-server")
}

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// A typical small query: a JSON object of a few fields.
fn sample_request() -> Event {
    new_event(
        OP,
        "bench-client",
        &serde_json::json!({"workspace": "w-123", "user": "alice", "fields": ["name", "size", "owner"]}),
    )
    .expect("event")
}

struct Figures {
    p50: Duration,
    p99: Duration,
    throughput: f64,
}

async fn measure<F, Fut>(sequential: usize, concurrent: usize, concurrency: usize, one: F) -> Figures
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    for _ in 0..WARMUP {
        one().await;
    }
    let mut latencies = Vec::with_capacity(sequential);
    for _ in 0..sequential {
        let started = Instant::now();
        one().await;
        latencies.push(started.elapsed());
    }
    latencies.sort();

    let started = Instant::now();
    futures::stream::iter(0..concurrent)
        .map(|_| {
            let one = one.clone();
            async move { one().await }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    let elapsed = started.elapsed();
    Figures {
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        throughput: concurrent as f64 / elapsed.as_secs_f64(),
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main]
async fn main() {
    let sequential = knob("BENCH_SEQUENTIAL", 5000);
    let concurrent = knob("BENCH_CONCURRENT", 50_000);
    let concurrency = knob("BENCH_CONCURRENCY", 64);
    let server = Server::start();
    let config = Config {
        nats_url: server.url(),
        request_timeout: Duration::from_secs(10),
        ..Default::default()
    };

    // Ours: a NatsQueries listener answering with a small reply event.
    let serving = NatsQueries::connect(&config).await.expect("connect");
    let handlers = QueryHandlers::new().on(
        OP,
        handler_fn(|request: Event, reply| async move {
            let data: serde_json::Value = ce_messaging::event::EventExt::data_as(&request)?;
            reply.reply_data("bench.workspace.got", &data).await?;
            Ok(())
        }),
    );
    let listener = serving
        .listen(
            handlers,
            QueryListenOptions {
                workers: concurrency,
                buffer: concurrency * 4,
                ..Default::default()
            },
        )
        .await
        .expect("listen");
    let requester = NatsQueries::connect(&config).await.expect("connect");

    // Raw: an async-nats responder echoing the same encoded payload back.
    let request = sample_request();
    let encoded = codec::encode(&request, ContentMode::Structured).expect("encode");
    let raw_server = async_nats::connect(server.url()).await.expect("connect");
    let mut raw_sub = raw_server.subscribe(RAW_SUBJECT).await.expect("subscribe");
    let responder = raw_server.clone();
    let raw_task = tokio::spawn(async move {
        while let Some(message) = raw_sub.next().await {
            if let Some(reply) = message.reply {
                let _ = responder
                    .publish_with_headers(
                        reply,
                        message.headers.unwrap_or_default(),
                        message.payload,
                    )
                    .await;
            }
        }
    });
    let raw_client = async_nats::connect(server.url()).await.expect("connect");
    // Make sure the raw subscription is in place before measuring.
    let probe_payload: Bytes = encoded.payload.clone();
    raw_client
        .request(RAW_SUBJECT, probe_payload)
        .await
        .expect("raw responder up");

    println!(
        "query request/reply, payload {} bytes (+ headers), sequential {sequential}, \
         concurrent {concurrent} with {concurrency} in flight",
        encoded.payload.len()
    );

    let raw = {
        let client = raw_client.clone();
        let headers = encoded.headers.clone();
        let payload = encoded.payload.clone();
        measure(sequential, concurrent, concurrency, move || {
            let client = client.clone();
            let headers = headers.clone();
            let payload = payload.clone();
            async move {
                client
                    .request_with_headers(RAW_SUBJECT, headers, payload)
                    .await
                    .expect("raw request");
            }
        })
        .await
    };

    let ours = {
        let requester = requester.clone();
        let request = Arc::new(request);
        measure(sequential, concurrent, concurrency, move || {
            let requester = requester.clone();
            let request = (*request).clone();
            async move {
                requester.request(request).await.expect("request");
            }
        })
        .await
    };

    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "", "ours", "raw", "ratio"
    );
    println!(
        "{:<28} {:>10.1}us {:>10.1}us {:>8.2}",
        "sequential p50 latency",
        micros(ours.p50),
        micros(raw.p50),
        ours.p50.as_secs_f64() / raw.p50.as_secs_f64()
    );
    println!(
        "{:<28} {:>10.1}us {:>10.1}us {:>8.2}",
        "sequential p99 latency",
        micros(ours.p99),
        micros(raw.p99),
        ours.p99.as_secs_f64() / raw.p99.as_secs_f64()
    );
    println!(
        "{:<28} {:>10.0}/s {:>10.0}/s {:>8.2}",
        format!("{concurrency}-concurrent throughput"),
        ours.throughput,
        raw.throughput,
        ours.throughput / raw.throughput
    );

    listener.stop(Duration::from_secs(5)).await;
    raw_task.abort();
    requester.close().await;
    serving.close().await;
}
