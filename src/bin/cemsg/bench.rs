//! `cemsg bench`: what the library costs over raw async-nats (and cloudevents-sdk's serde), in
//! one run, on one server.
//!
//! Every scenario runs the library path and the raw path with the same payload and concurrency,
//! in alternating rounds (so a burst of other load on the machine hits both sides alike), and
//! keeps the median of each side. Scenario 7 runs the listener in a child process (`cemsg
//! bench-listen`, hidden) and reads its peak RSS (`VmHWM` in `/proc/<pid>/status`).
//!
//! The JetStream scenarios use their own streams (`CEMSG_BENCH`, `CEMSG_BENCH_DLQ`, subjects
//! `cemsgbench.>`) and delete them at the end, so a bench against a shared server leaves the
//! application's streams alone.

use std::future::{Future, IntoFuture};
use std::hint::black_box;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use bytes::Bytes;
use ce_messaging::cloudevents::AttributesReader;
use ce_messaging::codec::{self, ContentMode};
use ce_messaging::config::Config;
use ce_messaging::event::new_event;
use ce_messaging::events::{event_handler_fn, EventConnection, EventHandlers, EventListenOptions};
use ce_messaging::jetstream::JetStreamEvents;
use ce_messaging::nats::NatsQueries;
use ce_messaging::query::{handler_fn, QueryConnection, QueryHandlers, QueryListenOptions};
use ce_messaging::Event;
use clap::Args;
use futures::StreamExt;
use serde_json::json;

use crate::fail::{Failure, EXIT_CONNECTION, EXIT_OTHER, EXIT_USAGE};
use crate::output;

const OP: &str = "cemsgbench.workspace.get";
const REPLY_TYPE: &str = "cemsgbench.workspace.got";
const RAW_SUBJECT: &str = "cemsgbench.raw.echo";
const EVENT_TYPE: &str = "org.example.bench.happened";
const STREAM: &str = "CEMSG_BENCH";
const DLQ_STREAM: &str = "CEMSG_BENCH_DLQ";
const PREFIX: &str = "cemsgbench";
/// PubAcks in flight in the pipelined scenarios (the library's window).
const PIPELINE: usize = 1024;
/// Workers of the event listeners (scenarios 5 and 7), library default.
const EVENT_WORKERS: usize = 16;
/// Buffer of the event listeners; with the workers this is the consumer's max ack pending.
const EVENT_BUFFER: usize = 256;
/// Longest wait for any single phase of a scenario.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Start a nats-server (JetStream on, temporary store) for the run: NATS_SERVER_BIN, else
    /// .tools/bin/nats-server under the current directory, else nats-server on PATH.
    #[arg(long)]
    spawn_server: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Run only these scenarios (comma-separated numbers 1-7).
    #[arg(long, value_delimiter = ',', value_name = "N,..", value_parser = clap::value_parser!(u8).range(1..=7))]
    scenarios: Vec<u8>,
    /// Alternating rounds per side; each figure is the median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Scenario 1: sequential requests per round.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..))]
    requests: u64,
    /// Scenario 2: requests per round, and how many are in flight.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(10..))]
    concurrent_requests: u64,
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    concurrency: u64,
    /// Scenario 3: events per round, published one by one.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    one_by_one: u64,
    /// Scenarios 4 and 5: events per round, pipelined / consumed.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(10..))]
    events: u64,
    /// Scenario 6: milliseconds per codec round.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    codec_ms: u64,
    /// Scenario 7: events of the backlog.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..))]
    backlog: u64,
    /// Scenario 7: time the slow handler takes per event, in microseconds.
    #[arg(long, default_value_t = 1000)]
    handler_us: u64,
    /// Scenario 7: the bound on the listening process's peak RSS, in MB.
    #[arg(long, default_value_t = 64)]
    rss_limit_mb: u64,
}

/// The hidden listening process of scenario 7.
#[derive(Debug, Args)]
pub struct ListenChildArgs {
    /// Handle this many events, then print `done` and wait for stdin to close.
    #[arg(long)]
    count: u64,
    #[arg(long)]
    durable: String,
    #[arg(long)]
    handler_us: u64,
    /// Use a raw async-nats pull consumer instead of the library.
    #[arg(long)]
    raw: bool,
}

/// One measured figure, library and raw side by side.
struct Row {
    scenario: u8,
    name: String,
    library: f64,
    raw: f64,
    unit: &'static str,
    /// Latency and memory: lower is better.
    lower_is_better: bool,
    target: Option<Target>,
}

#[derive(Clone, Copy)]
enum Target {
    /// library / raw at least this.
    RatioAtLeast(f64),
    /// library / raw at most this.
    RatioAtMost(f64),
    /// The library figure at least this.
    LibraryAtLeast(f64),
    /// The library figure below this.
    LibraryBelow(f64),
}

impl Target {
    fn describe(self) -> String {
        match self {
            Target::RatioAtLeast(r) => format!("ratio >= {r}"),
            Target::RatioAtMost(r) => format!("ratio <= {r}"),
            Target::LibraryAtLeast(v) => format!("library >= {v}"),
            Target::LibraryBelow(v) => format!("library < {v}"),
        }
    }

    fn met(self, row: &Row) -> bool {
        match self {
            Target::RatioAtLeast(r) => row.ratio() >= r,
            Target::RatioAtMost(r) => row.ratio() <= r,
            Target::LibraryAtLeast(v) => row.library >= v,
            Target::LibraryBelow(v) => row.library < v,
        }
    }
}

impl Row {
    fn ratio(&self) -> f64 {
        if self.raw > 0.0 {
            self.library / self.raw
        } else {
            f64::NAN
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let ratio = self.ratio();
        json!({
            "scenario": self.scenario,
            "name": self.name,
            "library": round3(self.library),
            "raw": round3(self.raw),
            "unit": self.unit,
            "ratio": if ratio.is_finite() { json!(round3(ratio)) } else { serde_json::Value::Null },
            "better": if self.lower_is_better { "lower" } else { "higher" },
            "target": self.target.map(Target::describe),
            "met": self.target.map(|t| t.met(self)),
        })
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> Failure {
    move |e| Failure::new(EXIT_OTHER, format!("{what}: {e}"))
}

/// Awaits `future` for at most [`PHASE_TIMEOUT`].
async fn bounded<T>(what: &'static str, future: impl Future<Output = T>) -> Result<T, Failure> {
    tokio::time::timeout(PHASE_TIMEOUT, future)
        .await
        .map_err(|_| {
            Failure::new(
                EXIT_OTHER,
                format!("{what}: no result in {PHASE_TIMEOUT:?}"),
            )
        })
}

pub async fn run(mut config: Config, args: BenchArgs) -> Result<(), Failure> {
    let server = if args.spawn_server {
        let server = SpawnedServer::start()?;
        config.nats_url = server.url.clone();
        Some(server)
    } else {
        None
    };
    let config = bench_config(config);
    let wanted = |n: u8| args.scenarios.is_empty() || args.scenarios.contains(&n);
    let started = Instant::now();
    let mut rows = Vec::new();
    if wanted(1) || wanted(2) {
        rows.extend(query_scenarios(&config, &args, wanted(1), wanted(2)).await?);
    }
    if wanted(3) || wanted(4) || wanted(5) || wanted(7) {
        let events = JetStreamEvents::connect(&config).await?;
        events.init_stream().await?;
        let js = jetstream::new(config.connect().await?);
        let result = event_scenarios(&config, &args, &events, &js, &wanted).await;
        for stream in [STREAM, DLQ_STREAM] {
            // Best effort: the streams are the bench's own.
            let _ = js.delete_stream(stream).await;
        }
        events.close().await;
        rows.extend(result?);
    }
    if wanted(6) {
        rows.extend(codec_scenario(&args)?);
    }
    rows.sort_by_key(|row| row.scenario);
    let elapsed = started.elapsed();
    drop(server);
    if args.json {
        output::json(&json!({
            "machine": machine(),
            "server": if args.spawn_server { "spawned" } else { "NATS_URL" },
            "rounds": args.rounds,
            "elapsed_secs": round3(elapsed.as_secs_f64()),
            "scenarios": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        }))
    } else {
        print_table(&rows, &args, elapsed)
    }
}

/// The configuration with the bench's own streams and subjects.
fn bench_config(mut config: Config) -> Config {
    config.js_stream = STREAM.into();
    config.js_dlq_stream = DLQ_STREAM.into();
    config.js_subject_prefix = PREFIX.into();
    config.js_duplicate_window = Duration::from_secs(120);
    config.ce_mode = ContentMode::Structured;
    config
}

fn print_table(rows: &[Row], args: &BenchArgs, elapsed: Duration) -> Result<(), Failure> {
    output::line(&format!(
        "{:<3} {:<40} {:>14} {:>14} {:<9} {:>7}  target",
        "#", "scenario", "library", "raw", "unit", "ratio"
    ))?;
    for row in rows {
        let target = match row.target {
            Some(t) => format!(
                "{} {}",
                t.describe(),
                if t.met(row) { "ok" } else { "MISSED" }
            ),
            None => String::new(),
        };
        output::line(&format!(
            "{:<3} {:<40} {:>14.1} {:>14.1} {:<9} {:>7.2}  {target}",
            row.scenario,
            row.name,
            row.library,
            row.raw,
            row.unit,
            row.ratio()
        ))?;
    }
    output::line(&format!(
        "median of {} alternating rounds per side; raw = async-nats (1-5, 7) or cloudevents-sdk \
         serde_json (6); {:.1} s in all; {}",
        args.rounds,
        elapsed.as_secs_f64(),
        machine()
    ))
}

/// `N cores, CPU model` from /proc, best effort.
fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores, {model}")
}

fn median_f64(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

// ---------------------------------------------------------------------------------------------
// Scenarios 1 and 2: queries.

fn sample_request() -> Result<Event, Failure> {
    new_event(
        OP,
        "bench-client",
        &json!({"workspace": "w-123", "user": "alice", "fields": ["name", "size", "owner"]}),
    )
    .map_err(err("sample request"))
}

/// Sequential latencies (sorted) of `n` calls of `one`.
async fn sequential<F, Fut>(n: u64, one: &F) -> Result<Vec<Duration>, Failure>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let mut latencies = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let started = Instant::now();
        one().await?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    Ok(latencies)
}

/// Calls per second of `n` calls of `one`, `concurrency` in flight.
async fn concurrent<F, Fut>(n: u64, concurrency: u64, one: &F) -> Result<f64, Failure>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let started = Instant::now();
    let mut calls = futures::stream::iter(0..n)
        .map(|_| one())
        .buffer_unordered(concurrency as usize);
    while let Some(result) = calls.next().await {
        result?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn query_scenarios(
    config: &Config,
    args: &BenchArgs,
    latency: bool,
    throughput: bool,
) -> Result<Vec<Row>, Failure> {
    let concurrency = args.concurrency as usize;
    let serving = NatsQueries::connect(config).await?;
    let handlers = QueryHandlers::new().on(
        OP,
        handler_fn(|request: Event, reply| async move {
            let data: serde_json::Value = ce_messaging::event::EventExt::data_as(&request)?;
            reply.reply_data(REPLY_TYPE, &data).await?;
            Ok(())
        }),
    );
    let listener = serving
        .listen(
            handlers,
            QueryListenOptions {
                pool: ce_messaging::WorkerOptions::new(concurrency, concurrency * 4),
                ..Default::default()
            },
        )
        .await?;
    let requester = NatsQueries::connect(config).await?;

    // Raw: an async-nats responder echoing the same encoded request back.
    let request = sample_request()?;
    let encoded = codec::encode(&request, ContentMode::Structured).map_err(err("encode"))?;
    let raw_server = config.connect().await?;
    let mut raw_sub = raw_server
        .subscribe(RAW_SUBJECT)
        .await
        .map_err(err("subscribe"))?;
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
    let raw_client = config.connect().await?;
    let (headers, payload) = (encoded.headers.clone(), encoded.payload.clone());
    let raw_one = || {
        let (client, headers, payload) = (&raw_client, headers.clone(), payload.clone());
        async move {
            client
                .request_with_headers(RAW_SUBJECT, headers, payload)
                .await
                .map(|_| ())
                .map_err(|e| Failure::new(EXIT_OTHER, format!("raw request: {e}")))
        }
    };
    let ours_one = || {
        let (requester, request) = (&requester, request.clone());
        async move {
            requester
                .request(request)
                .await
                .map(|_| ())
                .map_err(Failure::from)
        }
    };
    // Warm-up: both responders are up and connections are hot.
    for _ in 0..200 {
        raw_one().await?;
        ours_one().await?;
    }
    let (mut p50, mut p99, mut rate) = ([vec![], vec![]], [vec![], vec![]], [vec![], vec![]]);
    for _ in 0..args.rounds {
        if latency {
            let ours = sequential(args.requests, &ours_one).await?;
            let raw = sequential(args.requests, &raw_one).await?;
            for (side, l) in [ours, raw].into_iter().enumerate() {
                p50[side].push(micros(percentile(&l, 0.50)));
                p99[side].push(micros(percentile(&l, 0.99)));
            }
        }
        if throughput {
            let n = args.concurrent_requests;
            rate[0].push(concurrent(n, args.concurrency, &ours_one).await?);
            rate[1].push(concurrent(n, args.concurrency, &raw_one).await?);
        }
    }
    listener.stop(Duration::from_secs(5)).await;
    raw_task.abort();
    requester.close().await;
    serving.close().await;

    let mut rows = Vec::new();
    let [ours, raw] = p50;
    if latency {
        rows.push(Row {
            scenario: 1,
            name: "query sequential latency p50".into(),
            library: median_f64(ours),
            raw: median_f64(raw),
            unit: "us",
            lower_is_better: true,
            target: Some(Target::RatioAtMost(1.1)),
        });
        let [ours, raw] = p99;
        rows.push(Row {
            scenario: 1,
            name: "query sequential latency p99".into(),
            library: median_f64(ours),
            raw: median_f64(raw),
            unit: "us",
            lower_is_better: true,
            target: None,
        });
    }
    if throughput {
        let [ours, raw] = rate;
        rows.push(Row {
            scenario: 2,
            name: format!("query {}-concurrent throughput", args.concurrency),
            library: median_f64(ours),
            raw: median_f64(raw),
            unit: "req/s",
            lower_is_better: false,
            target: Some(Target::RatioAtLeast(0.9)),
        });
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Scenarios 3, 4, 5 and 7: events on JetStream.

fn bench_events(n: u64, tag: &str) -> Result<Vec<Event>, Failure> {
    (0..n)
        .map(|i| new_event(EVENT_TYPE, "bench", &json!({"n": i, "tag": tag})))
        .collect::<Result<_, _>>()
        .map_err(err("bench event"))
}

type RawMessage = (String, async_nats::HeaderMap, Bytes);

/// What the library sends for `event`, for the raw side: our encoding, same `Nats-Msg-Id`.
fn raw_message(event: &Event) -> Result<RawMessage, Failure> {
    let encoded = codec::encode(event, ContentMode::Structured).map_err(err("encode"))?;
    let mut headers = encoded.headers;
    headers.insert("Nats-Msg-Id", event.id());
    Ok((format!("{PREFIX}.{EVENT_TYPE}"), headers, encoded.payload))
}

fn raw_messages(n: u64, tag: &str) -> Result<Vec<RawMessage>, Failure> {
    bench_events(n, tag)?.iter().map(raw_message).collect()
}

async fn purge(js: &jetstream::Context) -> Result<(), Failure> {
    js.get_stream(STREAM)
        .await
        .map_err(err("get stream"))?
        .purge()
        .await
        .map_err(err("purge"))?;
    Ok(())
}

async fn raw_pipelined(js: &jetstream::Context, batch: Vec<RawMessage>) -> Result<(), Failure> {
    let mut acks = futures::stream::FuturesUnordered::new();
    for (subject, headers, payload) in batch {
        let ack = js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(err("raw publish"))?;
        acks.push(ack.into_future());
        while acks.len() >= PIPELINE {
            if let Some(ack) = acks.next().await {
                ack.map_err(err("raw PubAck"))?;
            }
        }
    }
    while let Some(ack) = acks.next().await {
        ack.map_err(err("raw PubAck"))?;
    }
    Ok(())
}

async fn event_scenarios(
    config: &Config,
    args: &BenchArgs,
    ours: &JetStreamEvents,
    js: &jetstream::Context,
    wanted: &dyn Fn(u8) -> bool,
) -> Result<Vec<Row>, Failure> {
    let mut rows = Vec::new();
    let rounds = args.rounds;
    if wanted(3) {
        let n = args.one_by_one;
        let (mut rate, mut p50) = ([vec![], vec![]], [vec![], vec![]]);
        for round in 0..rounds {
            let batch = bench_events(n, &format!("ours-1-{round}"))?;
            let mut latencies = Vec::with_capacity(n as usize);
            let started = Instant::now();
            for event in batch {
                let t = Instant::now();
                bounded("publish", ours.publish(event)).await??;
                latencies.push(t.elapsed());
            }
            rate[0].push(n as f64 / started.elapsed().as_secs_f64());
            latencies.sort();
            p50[0].push(micros(percentile(&latencies, 0.5)));

            let batch = raw_messages(n, &format!("raw-1-{round}"))?;
            let mut latencies = Vec::with_capacity(n as usize);
            let started = Instant::now();
            for (subject, headers, payload) in batch {
                let t = Instant::now();
                let ack = js
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(err("raw publish"))?;
                bounded("raw PubAck", ack.into_future())
                    .await?
                    .map_err(err("raw PubAck"))?;
                latencies.push(t.elapsed());
            }
            rate[1].push(n as f64 / started.elapsed().as_secs_f64());
            latencies.sort();
            p50[1].push(micros(percentile(&latencies, 0.5)));
            purge(js).await?;
        }
        let [o, r] = rate;
        rows.push(Row {
            scenario: 3,
            name: "event publish one-by-one".into(),
            library: median_f64(o),
            raw: median_f64(r),
            unit: "events/s",
            lower_is_better: false,
            target: Some(Target::RatioAtLeast(0.95)),
        });
        let [o, r] = p50;
        rows.push(Row {
            scenario: 3,
            name: "event publish one-by-one latency p50".into(),
            library: median_f64(o),
            raw: median_f64(r),
            unit: "us",
            lower_is_better: true,
            target: None,
        });
    }
    if wanted(4) {
        let n = args.events;
        let mut rate = [vec![], vec![]];
        for round in 0..rounds {
            let batch = bench_events(n, &format!("ours-p-{round}"))?;
            let started = Instant::now();
            for result in bounded("publish_all", ours.publish_all(batch)).await? {
                result?;
            }
            rate[0].push(n as f64 / started.elapsed().as_secs_f64());
            let batch = raw_messages(n, &format!("raw-p-{round}"))?;
            let started = Instant::now();
            bounded("raw pipelined", raw_pipelined(js, batch)).await??;
            rate[1].push(n as f64 / started.elapsed().as_secs_f64());
            purge(js).await?;
        }
        let [o, r] = rate;
        rows.push(Row {
            scenario: 4,
            name: format!("event publish pipelined ({PIPELINE} in flight)"),
            library: median_f64(o),
            raw: median_f64(r),
            unit: "events/s",
            lower_is_better: false,
            target: Some(Target::RatioAtLeast(0.9)),
        });
    }
    if wanted(5) {
        let n = args.events;
        let mut rate = [vec![], vec![]];
        for round in 0..rounds {
            purge(js).await?;
            raw_pipelined(js, raw_messages(n, &format!("consume-{round}"))?).await?;
            let ours_time = consume_ours(ours, n, &format!("bench-ours-{round}")).await?;
            let raw_time = consume_raw(js, n, &format!("bench-raw-{round}")).await?;
            rate[0].push(n as f64 / ours_time.as_secs_f64());
            rate[1].push(n as f64 / raw_time.as_secs_f64());
        }
        purge(js).await?;
        let [o, r] = rate;
        rows.push(Row {
            scenario: 5,
            name: "event listen + ack".into(),
            library: median_f64(o),
            raw: median_f64(r),
            unit: "events/s",
            lower_is_better: false,
            target: Some(Target::RatioAtLeast(0.9)),
        });
    }
    if wanted(7) {
        let mut peak = [0.0, 0.0];
        for (side, raw) in [false, true].into_iter().enumerate() {
            purge(js).await?;
            peak[side] = slow_consumer(config, args, js, raw).await?;
        }
        purge(js).await?;
        rows.push(Row {
            scenario: 7,
            name: format!("slow consumer peak RSS ({} backlog)", args.backlog),
            library: peak[0],
            raw: peak[1],
            unit: "MB",
            lower_is_better: true,
            target: Some(Target::LibraryBelow(args.rss_limit_mb as f64)),
        });
    }
    Ok(rows)
}

/// Time for a library listener (defaults: 16 workers, 256 buffered) to handle and ack `n`
/// stored events with a no-op handler.
async fn consume_ours(ours: &JetStreamEvents, n: u64, durable: &str) -> Result<Duration, Failure> {
    let handled = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(tokio::sync::Notify::new());
    let (counter, done) = (handled.clone(), all.clone());
    let target = n as usize;
    let handlers = EventHandlers::new().on(
        EVENT_TYPE,
        event_handler_fn(move |_, _| {
            let (counter, done) = (counter.clone(), done.clone());
            async move {
                if counter.fetch_add(1, Ordering::Relaxed) + 1 == target {
                    done.notify_one();
                }
                Ok(())
            }
        }),
    );
    let started = Instant::now();
    let listener = ours
        .listen(
            handlers,
            EventListenOptions {
                durable_name: Some(durable.into()),
                pool: ce_messaging::WorkerOptions::new(EVENT_WORKERS, EVENT_BUFFER),
                ..Default::default()
            },
        )
        .await?;
    let finished = bounded("library consume", all.notified()).await;
    let elapsed = started.elapsed();
    listener.stop(Duration::from_secs(5)).await;
    finished?;
    Ok(elapsed)
}

/// Time for a raw pull consumer (`messages()`, same max ack pending) to receive and ack `n`.
async fn consume_raw(js: &jetstream::Context, n: u64, durable: &str) -> Result<Duration, Failure> {
    let started = Instant::now();
    let stream = js.get_stream(STREAM).await.map_err(err("get stream"))?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(durable.into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: (EVENT_WORKERS + EVENT_BUFFER) as i64,
            ..Default::default()
        })
        .await
        .map_err(err("create consumer"))?;
    let mut messages = consumer.messages().await.map_err(err("messages"))?;
    bounded("raw consume", async {
        for _ in 0..n {
            let message = messages
                .next()
                .await
                .ok_or_else(|| Failure::new(EXIT_OTHER, "raw consumer ended"))?
                .map_err(err("raw message"))?;
            message.ack().await.map_err(err("raw ack"))?;
        }
        Ok::<(), Failure>(())
    })
    .await??;
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Scenario 7: slow consumer, peak RSS of a child process.

/// Runs a listening child (library or raw), publishes the backlog while it handles events
/// slowly, and returns the child's peak RSS in MB once it handled them all.
async fn slow_consumer(
    config: &Config,
    args: &BenchArgs,
    js: &jetstream::Context,
    raw: bool,
) -> Result<f64, Failure> {
    let exe = std::env::current_exe().map_err(err("locate cemsg"))?;
    let durable = format!("bench-slow-{}", if raw { "raw" } else { "ours" });
    let mut command = Command::new(exe);
    command
        .args(["--server", &config.nats_url, "bench-listen"])
        .args(["--count", &args.backlog.to_string(), "--durable", &durable])
        .args(["--handler-us", &args.handler_us.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if raw {
        command.arg("--raw");
    }
    let mut child = ChildGuard(
        command
            .spawn()
            .map_err(err("start the listening process"))?,
    );
    let pid = child.0.id();
    let stdin = child.0.stdin.take();
    let stdout = child
        .0
        .stdout
        .take()
        .ok_or_else(|| Failure::new(EXIT_OTHER, "no stdout of the listening process"))?;
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(4);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let expect = |line: Option<String>, word: &str| match line {
        Some(line) if line.starts_with(word) => Ok(()),
        other => Err(Failure::new(
            EXIT_OTHER,
            format!("listening process: expected {word:?}, got {other:?}"),
        )),
    };
    expect(bounded("listener ready", lines.recv()).await?, "ready")?;
    let publish = async {
        let mut sent = 0;
        while sent < args.backlog {
            let chunk = (args.backlog - sent).min(10_000);
            raw_pipelined(js, raw_messages(chunk, &format!("slow-{raw}-{sent}"))?).await?;
            sent += chunk;
        }
        Ok::<(), Failure>(())
    };
    bounded("publish the backlog", publish).await??;
    let limit = PHASE_TIMEOUT.max(Duration::from_micros(args.handler_us * args.backlog));
    let done = tokio::time::timeout(limit, lines.recv())
        .await
        .map_err(|_| Failure::new(EXIT_OTHER, "the listening process did not finish"))?;
    expect(done, "done")?;
    let peak = peak_rss_mb(pid)?;
    drop(stdin); // the child exits when its stdin closes
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .map_err(err("wait"))?;
    if !status {
        return Err(Failure::new(
            EXIT_OTHER,
            "the listening process failed (see stderr)",
        ));
    }
    Ok(peak)
}

/// Kills the child if the scenario fails before it exits.
struct ChildGuard(Child);

impl ChildGuard {
    fn wait(&mut self) -> bool {
        self.0.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `VmHWM` of process `pid`, in MB.
fn peak_rss_mb(pid: u32) -> Result<f64, Failure> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(err("read /proc/<pid>/status (Linux only)"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Failure::new(EXIT_OTHER, "no VmHWM in /proc/<pid>/status"))?;
    Ok(kb / 1024.0)
}

/// The listening process of scenario 7: prints `ready` once consuming, `done` after `count`
/// events, then exits when stdin closes.
pub async fn listen_child(config: Config, args: ListenChildArgs) -> Result<(), Failure> {
    let config = bench_config(config);
    let delay = Duration::from_micros(args.handler_us);
    let handled = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(tokio::sync::Notify::new());
    let target = args.count as usize;
    let wait_stdin = || {
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut sink);
        })
    };
    if args.raw {
        let client = config.connect().await?;
        let js = jetstream::new(client.clone());
        let stream = js.get_stream(STREAM).await.map_err(err("get stream"))?;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(args.durable.clone()),
                ack_policy: AckPolicy::Explicit,
                max_ack_pending: (EVENT_WORKERS + EVENT_BUFFER) as i64,
                ..Default::default()
            })
            .await
            .map_err(err("create consumer"))?;
        let messages = consumer.messages().await.map_err(err("messages"))?;
        output::line("ready")?;
        let handled = handled.clone();
        messages
            .take(target)
            .for_each_concurrent(EVENT_WORKERS, |message| {
                let handled = handled.clone();
                async move {
                    if let Ok(message) = message {
                        // Decode like a handler would, then take our time.
                        black_box(codec::decode(message.headers.as_ref(), &message.payload).ok());
                        tokio::time::sleep(delay).await;
                        if message.ack().await.is_ok() {
                            handled.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
            .await;
        output::line(&format!("done {}", handled.load(Ordering::Relaxed)))?;
        let _ = wait_stdin().await;
        client.drain().await.map_err(err("drain"))?;
        return Ok(());
    }
    let events = JetStreamEvents::connect(&config).await?;
    let (counter, done) = (handled.clone(), all.clone());
    let handlers = EventHandlers::new().on(
        EVENT_TYPE,
        event_handler_fn(move |_, _| {
            let (counter, done) = (counter.clone(), done.clone());
            async move {
                tokio::time::sleep(delay).await;
                if counter.fetch_add(1, Ordering::Relaxed) + 1 == target {
                    done.notify_one();
                }
                Ok(())
            }
        }),
    );
    let listener = events
        .listen(
            handlers,
            EventListenOptions {
                durable_name: Some(args.durable.clone()),
                pool: ce_messaging::WorkerOptions::new(EVENT_WORKERS, EVENT_BUFFER),
                ..Default::default()
            },
        )
        .await?;
    output::line("ready")?;
    all.notified().await;
    output::line(&format!("done {}", handled.load(Ordering::Relaxed)))?;
    let _ = wait_stdin().await;
    listener.stop(Duration::from_secs(5)).await;
    events.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenario 6: codec on one core.

/// One measured codec operation; its figure is the median events/s over the rounds.
struct Case<'a> {
    run: Box<dyn FnMut() + 'a>,
    batch: u64,
    rates: Vec<f64>,
}

impl<'a> Case<'a> {
    fn new(run: impl FnMut() + 'a) -> Self {
        Case {
            run: Box::new(run),
            batch: 1,
            rates: Vec::new(),
        }
    }

    /// Warms up and sizes a batch to about 2 ms.
    fn warm_up(&mut self) {
        loop {
            let start = Instant::now();
            for _ in 0..self.batch {
                (self.run)();
            }
            if start.elapsed() >= Duration::from_millis(2) || self.batch >= 1 << 24 {
                break;
            }
            self.batch *= 2;
        }
    }

    fn round(&mut self, time: Duration) {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < time {
            for _ in 0..self.batch {
                (self.run)();
            }
            n += self.batch;
        }
        self.rates.push(n as f64 / start.elapsed().as_secs_f64());
    }

    fn figure(&self) -> f64 {
        median_f64(self.rates.clone())
    }
}

fn codec_scenario(args: &BenchArgs) -> Result<Vec<Row>, Failure> {
    #[derive(serde::Serialize)]
    struct Workspace<'a> {
        name: &'a str,
        owner: &'a str,
        size: u64,
        tags: [&'a str; 2],
    }
    let event = new_event(
        "org.cyverse.workspace.created",
        "workspace-service",
        &Workspace {
            name: "my workspace",
            owner: "alice",
            size: 1024,
            tags: ["a", "b"],
        },
    )
    .map_err(err("codec event"))?;
    let structured = codec::encode(&event, ContentMode::Structured).map_err(err("encode"))?;
    let binary = codec::encode(&event, ContentMode::Binary).map_err(err("encode"))?;
    let sdk_json = Bytes::from(serde_json::to_vec(&event).map_err(err("sdk serialize"))?);
    for (name, encoded) in [("structured", &structured), ("binary", &binary)] {
        let mut back =
            codec::decode(Some(&encoded.headers), &encoded.payload).map_err(err("decode"))?;
        // JSON data decodes as its JSON text (read with data_as): compare it as JSON.
        if let Ok(value) = ce_messaging::event::EventExt::data_as::<serde_json::Value>(&back) {
            back.set_data_unchecked(value);
        }
        if back != event {
            return Err(Failure::new(
                EXIT_OTHER,
                format!("codec: the {name} round trip changed the event"),
            ));
        }
    }
    let mut cases = [
        Case::new(|| {
            black_box(serde_json::to_vec(black_box(&event)).ok());
        }),
        Case::new(|| {
            black_box(serde_json::from_slice::<Event>(black_box(&sdk_json)).ok());
        }),
        Case::new(|| {
            black_box(codec::encode(black_box(&event), ContentMode::Structured).ok());
        }),
        Case::new(|| {
            black_box(codec::encode(black_box(&event), ContentMode::Binary).ok());
        }),
        Case::new(|| {
            black_box(
                codec::decode(Some(&structured.headers), black_box(&structured.payload)).ok(),
            );
        }),
        Case::new(|| {
            black_box(codec::decode(Some(&binary.headers), black_box(&binary.payload)).ok());
        }),
    ];
    for case in cases.iter_mut() {
        case.warm_up();
    }
    let time = Duration::from_millis(args.codec_ms);
    for _ in 0..args.rounds.max(3) {
        for case in cases.iter_mut() {
            case.round(time);
        }
    }
    let f: Vec<f64> = cases.iter().map(Case::figure).collect();
    let row = |name: &str, library: f64, raw: f64, target| Row {
        scenario: 6,
        name: name.into(),
        library,
        raw,
        unit: "events/s",
        lower_is_better: false,
        target,
    };
    Ok(vec![
        row("codec encode structured (vs sdk)", f[2], f[0], None),
        row("codec encode binary (vs sdk)", f[3], f[0], None),
        row(
            "codec decode structured (vs sdk)",
            f[4],
            f[1],
            Some(Target::RatioAtLeast(3.0)),
        ),
        row(
            "codec decode binary (vs sdk)",
            f[5],
            f[1],
            Some(Target::LibraryAtLeast(1_000_000.0)),
        ),
    ])
}

// ---------------------------------------------------------------------------------------------
// --spawn-server

/// A nats-server child (JetStream on, temporary store) on a free loopback port; killed and its
/// store deleted on drop.
struct SpawnedServer {
    child: Child,
    store: PathBuf,
    url: String,
}

impl SpawnedServer {
    fn start() -> Result<SpawnedServer, Failure> {
        let binary = server_binary();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(err("find a free port"))?
            .port();
        let store = std::env::temp_dir().join(format!("cemsg-bench-{}-{port}", std::process::id()));
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                Failure::new(
                    EXIT_USAGE,
                    format!(
                        "--spawn-server: cannot start {}: {e} (set NATS_SERVER_BIN or run \
                         scripts/install-nats-server)",
                        binary.display()
                    ),
                )
            })?;
        let mut server = SpawnedServer {
            child,
            store,
            url: format!("nats://127.0.0.1:{port}"),
        };
        // Readiness: poll the port with a deadline (the server gives no other signal).
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(Failure::new(
                    EXIT_CONNECTION,
                    format!("--spawn-server: nats-server exited at start ({status})"),
                ));
            }
            if Instant::now() > deadline {
                return Err(Failure::new(
                    EXIT_CONNECTION,
                    "--spawn-server: nats-server not ready in 10 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// NATS_SERVER_BIN, else .tools/bin/nats-server under the current directory, else PATH.
fn server_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(bin);
    }
    let local = PathBuf::from(".tools/bin/nats-server");
    if local.is_file() {
        return local;
    }
    PathBuf::from("nats-server")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(library: f64, raw: f64, lower_is_better: bool, target: Option<Target>) -> Row {
        Row {
            scenario: 1,
            name: "query sequential latency p50".into(),
            library,
            raw,
            unit: "us",
            lower_is_better,
            target,
        }
    }

    #[test]
    fn json_rows_carry_both_figures_units_and_the_ratio() {
        let json = row(110.0, 100.0, true, Some(Target::RatioAtMost(1.1))).to_json();
        assert_eq!(json["library"], 110.0);
        assert_eq!(json["raw"], 100.0);
        assert_eq!(json["unit"], "us");
        assert_eq!(json["ratio"], 1.1);
        assert_eq!(json["better"], "lower");
        assert_eq!(json["met"], true);
        let missed = row(120.0, 100.0, true, Some(Target::RatioAtMost(1.1))).to_json();
        assert_eq!(missed["met"], false);
    }

    #[test]
    fn a_raw_figure_of_zero_gives_a_null_ratio_not_infinity() {
        let json = row(1.0, 0.0, false, None).to_json();
        assert!(json["ratio"].is_null());
        assert!(json["met"].is_null());
    }

    #[test]
    fn targets_compare_the_right_figure() {
        let throughput = row(95.0, 100.0, false, None);
        assert!(Target::RatioAtLeast(0.9).met(&throughput));
        assert!(!Target::RatioAtLeast(0.96).met(&throughput));
        assert!(Target::LibraryBelow(96.0).met(&throughput));
        assert!(!Target::LibraryAtLeast(96.0).met(&throughput));
    }

    #[test]
    fn percentiles_and_medians_of_small_samples() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&sorted, 0.5), Duration::from_micros(51));
        assert_eq!(percentile(&sorted, 0.99), Duration::from_micros(99));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
        assert_eq!(median_f64(vec![3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn peak_rss_of_this_process_is_read_from_proc() {
        let mb = peak_rss_mb(std::process::id()).expect("VmHWM on Linux");
        assert!(mb > 0.5 && mb < 4096.0, "{mb}");
    }
}
