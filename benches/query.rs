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
//! (default 20000 requests), `BENCH_ROUNDS` (default 3), `BENCH_CONCURRENCY` (default 64),
//! `BENCH_WORKERS` (the listener's workers; default: the concurrency).

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
use ce_messaging::{Event, ReceivedEvent};
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
    /// CPU time of this process (requester and replier together) per request in the
    /// concurrent phase: less sensitive to other load on the machine than wall-clock figures.
    cpu_per_request: Duration,
}

/// User + system CPU time of this process so far (Linux `/proc/self/stat`, clock ticks of
/// 10 ms; fine over tens of thousands of requests). Zero where unavailable.
fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; after the name, field 3 is index 0.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

async fn measure<F, Fut>(
    sequential: usize,
    concurrent: usize,
    concurrency: usize,
    one: F,
) -> Figures
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

    let cpu_before = process_cpu();
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
    let cpu = process_cpu().saturating_sub(cpu_before);
    Figures {
        cpu_per_request: cpu / concurrent.max(1) as u32,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        throughput: concurrent as f64 / elapsed.as_secs_f64(),
    }
}

/// The time one request/reply spends in the codec: the request and a reply event each encoded
/// and decoded once (structured mode), on one thread, averaged over many rounds.
fn codec_cost(request: &Event) -> Duration {
    let reply = new_event(
        "bench.workspace.got",
        "bench-service",
        &serde_json::json!({"workspace": "w-123", "user": "alice", "fields": ["name", "size", "owner"]}),
    )
    .expect("event");
    let rounds = 20_000u32;
    let started = Instant::now();
    for _ in 0..rounds {
        for event in [request, &reply] {
            let encoded = codec::encode(event, ContentMode::Structured).expect("encode");
            let headers = encoded.headers.to_header_map();
            let decoded = codec::decode(Some(&headers), &encoded.payload).expect("decode");
            std::hint::black_box(decoded);
        }
    }
    started.elapsed() / rounds
}

/// The median of each figure over the rounds.
fn median(rounds: &[Figures]) -> Figures {
    fn mid<T: Copy + PartialOrd>(mut values: Vec<T>) -> T {
        values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        values[values.len() / 2]
    }
    Figures {
        p50: mid(rounds.iter().map(|f| f.p50).collect()),
        p99: mid(rounds.iter().map(|f| f.p99).collect()),
        throughput: mid(rounds.iter().map(|f| f.throughput).collect()),
        cpu_per_request: mid(rounds.iter().map(|f| f.cpu_per_request).collect()),
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main]
async fn main() {
    let sequential = knob("BENCH_SEQUENTIAL", 5000);
    let concurrent = knob("BENCH_CONCURRENT", 20_000);
    let concurrency = knob("BENCH_CONCURRENCY", 64);
    let workers = knob("BENCH_WORKERS", concurrency);
    let rounds = knob("BENCH_ROUNDS", 3).max(1);
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
        handler_fn(|request: ReceivedEvent, reply| async move {
            let data: serde_json::Value = ce_messaging::event::EventExt::data_as(&request)?;
            reply.reply_data("bench.workspace.got", &data).await?;
            Ok(())
        }),
    );
    let listener = serving
        .listen(
            handlers,
            QueryListenOptions {
                pool: ce_messaging::WorkerOptions::new(workers, concurrency * 4),
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
         concurrent {concurrent} with {concurrency} in flight, {workers} workers, \
         median of {rounds} alternating rounds",
        encoded.payload.len()
    );

    let raw_one = {
        let client = raw_client.clone();
        let headers = encoded.headers.to_header_map();
        let payload = encoded.payload.clone();
        move || {
            let client = client.clone();
            let headers = headers.clone();
            let payload = payload.clone();
            async move {
                client
                    .request_with_headers(RAW_SUBJECT, headers, payload)
                    .await
                    .expect("raw request");
            }
        }
    };
    let ours_one = {
        let requester = requester.clone();
        let request = Arc::new(request);
        move || {
            let requester = requester.clone();
            let request = (*request).clone();
            async move {
                requester.request(request).await.expect("request");
            }
        }
    };

    // Alternate the two, round after round, and keep the median of each figure, so that a
    // burst of other load on the machine does not land on one side only.
    let mut raw_rounds = Vec::new();
    let mut our_rounds = Vec::new();
    for _ in 0..rounds {
        raw_rounds.push(measure(sequential, concurrent, concurrency, raw_one.clone()).await);
        our_rounds.push(measure(sequential, concurrent, concurrency, ours_one.clone()).await);
    }
    let raw = median(&raw_rounds);
    let ours = median(&our_rounds);
    let codec = codec_cost(&sample_request());

    println!("{:<28} {:>12} {:>12} {:>8}", "", "ours", "raw", "ratio");
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
    println!(
        "{:<28} {:>10.1}us {:>10.1}us {:>8.2}",
        "CPU per request (process)",
        micros(ours.cpu_per_request),
        micros(raw.cpu_per_request),
        ours.cpu_per_request.as_secs_f64() / raw.cpu_per_request.as_secs_f64().max(1e-9)
    );

    println!(
        "of which CloudEvents codec work (encode + decode of request and reply, one thread): \
         {:.1}us per request",
        micros(codec)
    );

    listener.stop(Duration::from_secs(5)).await;
    raw_task.abort();
    requester.close().await;
    serving.close().await;
}
