//! `cemsg bench`: what the library costs against the code a user would write without it
//! (async-nats + cloudevents-sdk's serde), and against raw async-nats bytes (the limit), in one
//! run, on one server.
//!
//! Every scenario runs three sides with the same payload and concurrency:
//! - **library**: ce-messaging;
//! - **hand-written**: async-nats plus cloudevents-sdk, the way the sdk's documentation shows
//!   (`EventBuilderV10`, `serde_json::to_vec` / `serde_json::from_slice::<Event>`, structured
//!   JSON in the payload), doing the same CloudEvents work as the library side;
//! - **raw**: async-nats moving bytes encoded before the clock starts, no CloudEvents work at all:
//!   the physical limit of this client.
//!
//! The sides run in alternating rounds (each round starts with the next side, so a burst of
//! other load on the machine hits every side alike), and each figure is the median over the
//! rounds. The bench runs on a tokio runtime of its own sized to the machine (`--threads`):
//! `cemsg`'s own runtime has 2 worker threads whatever the machine, which would measure the
//! harness on a big one. Scenario 7 runs the listener in a child process (`cemsg bench-listen`,
//! hidden, same thread count) and reads its peak RSS (`VmHWM` in `/proc/<pid>/status`).
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
use ce_messaging::cloudevents::{AttributesReader, EventBuilder, EventBuilderV10};
use ce_messaging::codec::{self, ContentMode};
use ce_messaging::config::Config;
use ce_messaging::event::new_event;
use ce_messaging::events::{event_handler_fn, EventConnection, EventHandlers, EventListenOptions};
use ce_messaging::jetstream::JetStreamEvents;
use ce_messaging::nats::NatsQueries;
use ce_messaging::query::{handler_fn, QueryConnection, QueryHandlers, QueryListenOptions};
use ce_messaging::{Event, ReceivedEvent};
use clap::{Args, ValueEnum};
use futures::StreamExt;
use serde_json::json;

use crate::fail::{Failure, EXIT_CONNECTION, EXIT_OTHER, EXIT_USAGE};
use crate::output;

const OP: &str = "cemsgbench.workspace.get";
const REPLY_TYPE: &str = "cemsgbench.workspace.got";
const RAW_SUBJECT: &str = "cemsgbench.raw.echo";
const HAND_SUBJECT: &str = "cemsgbench.hand.echo";
const HAND_SOURCE: &str = "bench-hand-written";
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
    /// Run only these sides (default: all three). A ratio whose side did not run is empty.
    #[arg(long, value_delimiter = ',', value_name = "SIDE,..")]
    sides: Vec<Side>,
    /// Tokio worker threads of the bench's runtime, shared by every side (default: the
    /// machine's cores). Scenario 7's listening process gets as many.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// The hand-written side's codec: the sdk's serde (what a user writes), or this library's
    /// codec inline, so that library / hand-written shows what the library's machinery costs
    /// apart from CloudEvents work (for profiling; the table still says hand-written).
    #[arg(long, default_value = "sdk", hide = true)]
    hand_codec: HandCodec,
    /// Alternating rounds per side; each figure is the median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Scenario 1: sequential requests per round.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..))]
    requests: u64,
    /// Scenario 1 and 2: requests per side before the first round (connections hot, caches
    /// warm).
    #[arg(long, default_value_t = 200)]
    warm_up: u64,
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
    /// Which side listens: the library, a hand-written async-nats + cloudevents-sdk consumer,
    /// or a raw async-nats pull consumer.
    #[arg(long, default_value = "library")]
    side: Side,
    /// The hand-written consumer's codec.
    #[arg(long, default_value = "sdk")]
    hand_codec: HandCodec,
    /// Tokio worker threads (default: the machine's cores).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
}

/// One side of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Side {
    /// ce-messaging.
    Library,
    /// async-nats + cloudevents-sdk (serde), as a user writes it without this library.
    HandWritten,
    /// async-nats with bytes encoded before the clock starts: no CloudEvents work.
    Raw,
}

impl Side {
    const ALL: [Side; 3] = [Side::Library, Side::HandWritten, Side::Raw];

    fn index(self) -> usize {
        self as usize
    }

    fn key(self) -> &'static str {
        match self {
            Side::Library => "library",
            Side::HandWritten => "hand_written",
            Side::Raw => "raw",
        }
    }
}

/// The codec of the hand-written side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HandCodec {
    /// cloudevents-sdk's serde, structured JSON in the payload: what a user writes.
    Sdk,
    /// This library's codec (`ce_messaging::codec`, structured mode) called inline.
    Library,
}

impl HandCodec {
    /// `event` as this side builds it. Sdk: with its data a `serde_json::Value` (the sdk's
    /// `set_data`, as `EventBuilderV10::data` would), not the JSON text `new_event` holds and
    /// the sdk's serde would write as `data_base64`. Called before the clock starts.
    fn event(self, event: &Event) -> Result<Event, Failure> {
        let mut built = event.clone();
        if self == HandCodec::Sdk {
            let data: serde_json::Value =
                ce_messaging::event::EventExt::data_as(event).map_err(err("hand-written event"))?;
            built.set_data("application/json", data);
        }
        Ok(built)
    }

    /// The headers and payload of `event`.
    fn encode(self, event: &Event) -> Result<(Option<async_nats::HeaderMap>, Bytes), Failure> {
        match self {
            HandCodec::Sdk => serde_json::to_vec(event)
                .map(|payload| (None, Bytes::from(payload)))
                .map_err(err("hand-written encode")),
            HandCodec::Library => codec::encode(event, ContentMode::Structured)
                .map(|encoded| (Some(encoded.headers.into()), encoded.payload))
                .map_err(err("hand-written encode")),
        }
    }

    fn decode(
        self,
        headers: Option<&async_nats::HeaderMap>,
        payload: &Bytes,
    ) -> Result<HandDecoded, Failure> {
        match self {
            HandCodec::Sdk => serde_json::from_slice::<Event>(payload)
                .map(HandDecoded::Sdk)
                .map_err(err("hand-written decode")),
            HandCodec::Library => codec::decode(headers, payload)
                .map(HandDecoded::Library)
                .map_err(err("hand-written decode")),
        }
    }

    /// The reply to `request`: a new event of [`REPLY_TYPE`] carrying the request's data.
    fn reply_to(self, request: HandDecoded) -> Result<Event, Failure> {
        match request {
            HandDecoded::Sdk(mut request) => {
                // As the sdk's documentation builds events.
                let (_, _, data) = request.take_data();
                let mut reply = EventBuilderV10::new()
                    .id(xid::new().to_string())
                    .source(HAND_SOURCE)
                    .ty(REPLY_TYPE)
                    .time(chrono::Utc::now());
                if let Some(data) = data {
                    reply = reply.data("application/json", data);
                }
                reply.build().map_err(err("hand-written reply"))
            }
            HandDecoded::Library(request) => {
                // As the library's handler in this bench: read the data, answer with it.
                let data: serde_json::Value = ce_messaging::event::EventExt::data_as(&request)
                    .map_err(err("hand-written data"))?;
                new_event(REPLY_TYPE, HAND_SOURCE, &data).map_err(err("hand-written reply"))
            }
        }
    }
}

/// An event as the hand-written side's codec decodes it.
enum HandDecoded {
    /// cloudevents-sdk's serde: the sdk's event.
    Sdk(Event),
    /// This library's codec: what its handlers get.
    Library(ReceivedEvent),
}

#[cfg(test)]
impl HandDecoded {
    fn into_event(self) -> Event {
        match self {
            HandDecoded::Sdk(event) => event,
            HandDecoded::Library(event) => event.into_event(),
        }
    }
}

/// `--hand-codec`'s value for `hand`.
fn hand_codec_name(hand: HandCodec) -> &'static str {
    match hand {
        HandCodec::Sdk => "sdk",
        HandCodec::Library => "library",
    }
}

/// The sides a run measures, and the order of each round.
#[derive(Debug, Clone)]
struct Sides(Vec<Side>);

impl Sides {
    fn new(wanted: &[Side]) -> Sides {
        Sides(
            Side::ALL
                .into_iter()
                .filter(|s| wanted.is_empty() || wanted.contains(s))
                .collect(),
        )
    }

    fn has(&self, side: Side) -> bool {
        self.0.contains(&side)
    }

    /// The sides in the order of round `round`: each side goes first in turn.
    fn order(&self, round: u32) -> Vec<Side> {
        let mut order = self.0.clone();
        if !order.is_empty() {
            let first = round as usize % order.len();
            order.rotate_left(first);
        }
        order
    }
}

/// What each side measured over the rounds, by [`Side::index`].
#[derive(Default)]
struct Samples([Vec<f64>; 3]);

impl Samples {
    fn push(&mut self, side: Side, value: f64) {
        self.0[side.index()].push(value);
    }

    /// The median of each side; `None` for a side that did not run.
    fn medians(self) -> [Option<f64>; 3] {
        self.0
            .map(|values| (!values.is_empty()).then(|| median_f64(values)))
    }
}

/// One measured figure, the three sides side by side.
struct Row {
    scenario: u8,
    name: String,
    /// By [`Side::index`]; `None` where a side did not run or has no counterpart (raw codec).
    figures: [Option<f64>; 3],
    unit: &'static str,
    /// Latency and memory: lower is better.
    lower_is_better: bool,
    /// Tokio worker threads each side ran on (every side shares the bench's runtime).
    threads: usize,
    targets: Vec<Target>,
}

#[derive(Clone, Copy)]
enum Target {
    /// library / `Side` at least this.
    RatioAtLeast(Side, f64),
    /// library / `Side` at most this.
    RatioAtMost(Side, f64),
    /// The library figure below this.
    LibraryBelow(f64),
}

impl Target {
    fn describe(self) -> String {
        let versus = |side: Side| match side {
            Side::HandWritten => "vs hand",
            Side::Raw => "vs raw",
            Side::Library => "library",
        };
        match self {
            Target::RatioAtLeast(side, r) => format!("{} >= {r}", versus(side)),
            Target::RatioAtMost(side, r) => format!("{} <= {r}", versus(side)),
            Target::LibraryBelow(v) => format!("library < {v}"),
        }
    }

    /// `None` when a figure it needs was not measured.
    fn met(self, row: &Row) -> Option<bool> {
        match self {
            Target::RatioAtLeast(side, r) => row.ratio(side).map(|ratio| ratio >= r),
            Target::RatioAtMost(side, r) => row.ratio(side).map(|ratio| ratio <= r),
            Target::LibraryBelow(v) => row.figure(Side::Library).map(|l| l < v),
        }
    }
}

impl Row {
    fn figure(&self, side: Side) -> Option<f64> {
        self.figures[side.index()]
    }

    /// library / `side`; `None` when either is missing or the divisor is 0.
    fn ratio(&self, side: Side) -> Option<f64> {
        let (library, other) = (self.figure(Side::Library)?, self.figure(side)?);
        let ratio = library / other;
        ratio.is_finite().then_some(ratio)
    }

    fn to_json(&self) -> serde_json::Value {
        let figure = |side| self.figure(side).map(round3);
        let ratio = |side| self.ratio(side).map(round3);
        let mut threads = serde_json::Map::new();
        for side in Side::ALL {
            threads.insert(side.key().into(), json!(self.threads));
        }
        json!({
            "scenario": self.scenario,
            "name": self.name,
            "library": figure(Side::Library),
            "hand_written": figure(Side::HandWritten),
            "raw": figure(Side::Raw),
            "unit": self.unit,
            "ratio_hand_written": ratio(Side::HandWritten),
            "ratio_raw": ratio(Side::Raw),
            "better": if self.lower_is_better { "lower" } else { "higher" },
            "threads": threads,
            "targets": self.targets.iter().map(|t| json!({
                "target": t.describe(),
                "met": t.met(self),
            })).collect::<Vec<_>>(),
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

/// The machine's cores (1 when unknown).
fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Runs `work` on a multi-thread tokio runtime with `threads` worker threads: the caller's
/// when it has that many already, else one of its own, run from a blocking thread of the
/// caller's runtime (a runtime cannot block inside another's worker). A second runtime beside
/// an idle one costs the process memory (scenario 7 reads its peak RSS), so it is made only
/// when needed.
async fn on_runtime<F, Fut, T>(threads: usize, work: F) -> Result<T, Failure>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, Failure>>,
    T: Send + 'static,
{
    let current = tokio::runtime::Handle::current();
    if current.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        && current.metrics().num_workers() == threads
    {
        return work().await;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(err("start the bench's runtime"))?;
    tokio::task::spawn_blocking(move || runtime.block_on(work()))
        .await
        .map_err(err("the bench's runtime"))?
}

pub async fn run(config: Config, args: BenchArgs) -> Result<(), Failure> {
    let threads = args.threads.map_or_else(cores, usize::from);
    on_runtime(threads, move || run_sized(config, args, threads)).await
}

async fn run_sized(mut config: Config, args: BenchArgs, threads: usize) -> Result<(), Failure> {
    let server = if args.spawn_server {
        let server = SpawnedServer::start()?;
        config.nats_url = server.url.clone();
        Some(server)
    } else {
        None
    };
    let config = bench_config(config);
    let sides = Sides::new(&args.sides);
    let wanted = |n: u8| args.scenarios.is_empty() || args.scenarios.contains(&n);
    let started = Instant::now();
    let mut rows = Vec::new();
    if wanted(1) || wanted(2) {
        rows.extend(query_scenarios(&config, &args, &sides, wanted(1), wanted(2)).await?);
    }
    if wanted(3) || wanted(4) || wanted(5) || wanted(7) {
        let events = JetStreamEvents::connect(&config).await?;
        events.init_stream().await?;
        let js = jetstream::new(config.connect().await?);
        let result = event_scenarios(&config, &args, &sides, &events, &js, &wanted).await;
        for stream in [STREAM, DLQ_STREAM] {
            // Best effort: the streams are the bench's own.
            let _ = js.delete_stream(stream).await;
        }
        events.close().await;
        rows.extend(result?);
    }
    if wanted(6) {
        rows.extend(codec_scenario(&args, &sides)?);
    }
    for row in rows.iter_mut() {
        if row.scenario != 6 {
            row.threads = threads;
        }
    }
    rows.sort_by_key(|row| row.scenario);
    let elapsed = started.elapsed();
    drop(server);
    if args.json {
        output::json(&json!({
            "machine": machine(),
            "cores": cores(),
            "threads": threads,
            "server": if args.spawn_server { "spawned" } else { "NATS_URL" },
            "rounds": args.rounds,
            "sides": sides.0.iter().map(|s| s.key()).collect::<Vec<_>>(),
            "elapsed_secs": round3(elapsed.as_secs_f64()),
            "scenarios": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        }))
    } else {
        print_table(&rows, &args, threads, elapsed)
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

fn print_table(
    rows: &[Row],
    args: &BenchArgs,
    threads: usize,
    elapsed: Duration,
) -> Result<(), Failure> {
    output::line(&format!(
        "{:<3} {:<40} {:>12} {:>12} {:>12} {:<9} {:>7} {:>7} {:>4}  targets",
        "#", "scenario", "library", "hand-written", "raw", "unit", "vs hand", "vs raw", "thr"
    ))?;
    let figure = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    let ratio = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    for row in rows {
        let targets: Vec<String> = row
            .targets
            .iter()
            .map(|t| {
                let verdict = match t.met(row) {
                    Some(true) => "ok",
                    Some(false) => "MISSED",
                    None => "n/a",
                };
                format!("{} {verdict}", t.describe())
            })
            .collect();
        output::line(&format!(
            "{:<3} {:<40} {:>12} {:>12} {:>12} {:<9} {:>7} {:>7} {:>4}  {}",
            row.scenario,
            row.name,
            figure(row.figure(Side::Library)),
            figure(row.figure(Side::HandWritten)),
            figure(row.figure(Side::Raw)),
            row.unit,
            ratio(row.ratio(Side::HandWritten)),
            ratio(row.ratio(Side::Raw)),
            row.threads,
            targets.join(", ")
        ))?;
    }
    output::line(&format!(
        "median of {} alternating rounds per side; vs = library / that side; hand-written = \
         async-nats + cloudevents-sdk serde (1-5, 7) or the sdk's serde_json alone (6); raw = \
         async-nats with bytes encoded before the clock starts (no raw side for 6); thr = tokio \
         worker threads every side had ({threads} for 1-5 and 7's listening process, one thread \
         for 6); {:.1} s in all; {}",
        args.rounds,
        elapsed.as_secs_f64(),
        machine()
    ))
}

/// `N cores, CPU model` from /proc, best effort.
fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{} cores, {model}", cores())
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

/// The hand-written responder: decodes each request, answers with a new event carrying the
/// request's data, encoded with the same codec, inline in its subscription loop as the raw echo
/// responder.
async fn hand_written_responder(
    client: async_nats::Client,
    mut requests: async_nats::Subscriber,
    hand: HandCodec,
) {
    while let Some(message) = requests.next().await {
        let Some(reply_to) = message.reply else {
            continue;
        };
        let reply = hand
            .decode(message.headers.as_ref(), &message.payload)
            .and_then(|request| hand.reply_to(request))
            .and_then(|reply| hand.encode(&reply));
        let sent = match reply {
            Ok((None, payload)) => client.publish(reply_to, payload).await,
            Ok((Some(headers), payload)) => {
                client
                    .publish_with_headers(reply_to, headers, payload)
                    .await
            }
            // The bench's own requests always decode: a failure shows as the requester's
            // timeout, and is said here.
            Err(e) => {
                eprintln!("hand-written responder: {e}");
                continue;
            }
        };
        // A publish fails only on a closed connection: the bench is over.
        if sent.is_err() {
            break;
        }
    }
}

async fn query_scenarios(
    config: &Config,
    args: &BenchArgs,
    sides: &Sides,
    latency: bool,
    throughput: bool,
) -> Result<Vec<Row>, Failure> {
    let concurrency = args.concurrency as usize;
    let serving = NatsQueries::connect(config).await?;
    let handlers = QueryHandlers::new().on(
        OP,
        handler_fn(|request: ReceivedEvent, reply| async move {
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
    // Hand-written: async-nats + cloudevents-sdk on both ends.
    let hand_server = config.connect().await?;
    let hand_sub = hand_server
        .subscribe(HAND_SUBJECT)
        .await
        .map_err(err("subscribe"))?;
    let hand_task = tokio::spawn(hand_written_responder(
        hand_server.clone(),
        hand_sub,
        args.hand_codec,
    ));
    let raw_client = config.connect().await?;
    let hand_client = config.connect().await?;
    // Round trips on both: the subscriptions are known to the server before the first request.
    for client in [&raw_server, &hand_server] {
        client.flush().await.map_err(err("flush"))?;
    }
    let (headers, payload) = (encoded.headers.to_header_map(), encoded.payload.clone());
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
    let hand = args.hand_codec;
    let hand_request = hand.event(&request)?;
    let hand_one = || {
        let (client, request) = (&hand_client, hand_request.clone());
        async move {
            let reply = match hand.encode(&request)? {
                (None, payload) => client.request(HAND_SUBJECT, payload).await,
                (Some(headers), payload) => {
                    client
                        .request_with_headers(HAND_SUBJECT, headers, payload)
                        .await
                }
            }
            .map_err(|e| Failure::new(EXIT_OTHER, format!("hand-written request: {e}")))?;
            black_box(hand.decode(reply.headers.as_ref(), &reply.payload)?);
            Ok(())
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
    // Warm-up: every responder is up and connections are hot.
    for _ in 0..args.warm_up {
        for side in &sides.0 {
            match side {
                Side::Library => ours_one().await?,
                Side::HandWritten => hand_one().await?,
                Side::Raw => raw_one().await?,
            }
        }
    }
    let (mut p50, mut p99, mut rate) = (Samples::default(), Samples::default(), Samples::default());
    for round in 0..args.rounds {
        for side in sides.order(round) {
            if latency {
                let n = args.requests;
                let l = match side {
                    Side::Library => sequential(n, &ours_one).await?,
                    Side::HandWritten => sequential(n, &hand_one).await?,
                    Side::Raw => sequential(n, &raw_one).await?,
                };
                p50.push(side, micros(percentile(&l, 0.50)));
                p99.push(side, micros(percentile(&l, 0.99)));
            }
            if throughput {
                let (n, c) = (args.concurrent_requests, args.concurrency);
                let r = match side {
                    Side::Library => concurrent(n, c, &ours_one).await?,
                    Side::HandWritten => concurrent(n, c, &hand_one).await?,
                    Side::Raw => concurrent(n, c, &raw_one).await?,
                };
                rate.push(side, r);
            }
        }
    }
    listener.stop(Duration::from_secs(5)).await;
    raw_task.abort();
    hand_task.abort();
    requester.close().await;
    serving.close().await;

    let mut rows = Vec::new();
    let row = |name: String, figures, unit, lower_is_better, targets| Row {
        scenario: if unit == "req/s" { 2 } else { 1 },
        name,
        figures,
        unit,
        lower_is_better,
        threads: 0,
        targets,
    };
    if latency {
        rows.push(row(
            "query sequential latency p50".into(),
            p50.medians(),
            "us",
            true,
            vec![
                Target::RatioAtMost(Side::HandWritten, 0.9),
                Target::RatioAtMost(Side::Raw, 1.15),
            ],
        ));
        rows.push(row(
            "query sequential latency p99".into(),
            p99.medians(),
            "us",
            true,
            vec![Target::RatioAtMost(Side::HandWritten, 0.9)],
        ));
    }
    if throughput {
        rows.push(row(
            format!("query {}-concurrent throughput", args.concurrency),
            rate.medians(),
            "req/s",
            false,
            vec![
                Target::RatioAtLeast(Side::HandWritten, 1.2),
                Target::RatioAtLeast(Side::Raw, 0.75),
            ],
        ));
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

/// [`bench_events`] as the hand-written side builds them ([`HandCodec::event`]).
fn hand_events(hand: HandCodec, n: u64, tag: &str) -> Result<Vec<Event>, Failure> {
    bench_events(n, tag)?
        .iter()
        .map(|e| hand.event(e))
        .collect()
}

type RawMessage = (String, async_nats::HeaderMap, Bytes);

/// What the library sends for `event`, for the raw side: our encoding, same `Nats-Msg-Id`.
fn raw_message(event: &Event) -> Result<RawMessage, Failure> {
    let encoded = codec::encode(event, ContentMode::Structured).map_err(err("encode"))?;
    let mut headers = async_nats::HeaderMap::from(encoded.headers);
    headers.insert("Nats-Msg-Id", event.id());
    Ok((format!("{PREFIX}.{EVENT_TYPE}"), headers, encoded.payload))
}

fn raw_messages(n: u64, tag: &str) -> Result<Vec<RawMessage>, Failure> {
    bench_events(n, tag)?.iter().map(raw_message).collect()
}

/// What a hand-written producer sends for `event`: the sdk's structured JSON on the event
/// type's subject, with the event id as `Nats-Msg-Id` (JetStream's de-duplication, as the
/// library sets it).
fn hand_message(hand: HandCodec, event: &Event) -> Result<RawMessage, Failure> {
    let (headers, payload) = hand.encode(event)?;
    let mut headers = headers.unwrap_or_default();
    headers.insert("Nats-Msg-Id", event.id());
    Ok((format!("{PREFIX}.{}", event.ty()), headers, payload))
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

/// Publishes `n` messages made by `message(i)` (inside the clock) with at most [`PIPELINE`]
/// PubAcks in flight.
async fn pipelined<F>(js: &jetstream::Context, n: usize, mut message: F) -> Result<(), Failure>
where
    F: FnMut(usize) -> Result<RawMessage, Failure>,
{
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let (subject, headers, payload) = message(i)?;
        let ack = js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(err("publish"))?;
        acks.push(ack.into_future());
        while acks.len() >= PIPELINE {
            if let Some(ack) = acks.next().await {
                ack.map_err(err("PubAck"))?;
            }
        }
    }
    while let Some(ack) = acks.next().await {
        ack.map_err(err("PubAck"))?;
    }
    Ok(())
}

/// Raw: messages encoded before the clock starts, moved out one by one.
async fn raw_pipelined(js: &jetstream::Context, batch: Vec<RawMessage>) -> Result<(), Failure> {
    let n = batch.len();
    let mut batch = batch.into_iter();
    pipelined(js, n, |_| {
        batch
            .next()
            .ok_or_else(|| Failure::new(EXIT_OTHER, "raw batch ran out"))
    })
    .await
}

/// Publishes `n` messages one by one, each waiting for its PubAck; returns the sorted
/// latencies.
async fn one_by_one<F>(
    js: &jetstream::Context,
    n: usize,
    mut message: F,
) -> Result<Vec<Duration>, Failure>
where
    F: FnMut(usize) -> Result<RawMessage, Failure>,
{
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let (subject, headers, payload) = message(i)?;
        let ack = js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(err("publish"))?;
        bounded("PubAck", ack.into_future())
            .await?
            .map_err(err("PubAck"))?;
        latencies.push(t.elapsed());
    }
    latencies.sort();
    Ok(latencies)
}

async fn event_scenarios(
    config: &Config,
    args: &BenchArgs,
    sides: &Sides,
    ours: &JetStreamEvents,
    js: &jetstream::Context,
    wanted: &dyn Fn(u8) -> bool,
) -> Result<Vec<Row>, Failure> {
    let mut rows = Vec::new();
    let rounds = args.rounds;
    let row = |scenario, name: String, figures, unit, lower_is_better, targets| Row {
        scenario,
        name,
        figures,
        unit,
        lower_is_better,
        threads: 0,
        targets,
    };
    if wanted(3) {
        let n = args.one_by_one;
        let (mut rate, mut p50) = (Samples::default(), Samples::default());
        for round in 0..rounds {
            for side in sides.order(round) {
                let tag = format!("{}-1-{round}", side.key());
                let (started, latencies) = match side {
                    Side::Library => {
                        let batch = bench_events(n, &tag)?;
                        let mut latencies = Vec::with_capacity(n as usize);
                        let started = Instant::now();
                        for event in batch {
                            let t = Instant::now();
                            bounded("publish", ours.publish(event)).await??;
                            latencies.push(t.elapsed());
                        }
                        latencies.sort();
                        (started, latencies)
                    }
                    Side::HandWritten => {
                        let batch = hand_events(args.hand_codec, n, &tag)?;
                        let started = Instant::now();
                        let latencies = one_by_one(js, batch.len(), |i| {
                            hand_message(args.hand_codec, &batch[i])
                        })
                        .await?;
                        (started, latencies)
                    }
                    Side::Raw => {
                        let mut batch = raw_messages(n, &tag)?.into_iter();
                        let started = Instant::now();
                        let latencies = one_by_one(js, n as usize, |_| {
                            batch
                                .next()
                                .ok_or_else(|| Failure::new(EXIT_OTHER, "raw batch ran out"))
                        })
                        .await?;
                        (started, latencies)
                    }
                };
                rate.push(side, n as f64 / started.elapsed().as_secs_f64());
                p50.push(side, micros(percentile(&latencies, 0.5)));
                purge(js).await?;
            }
        }
        rows.push(row(
            3,
            "event publish one-by-one".into(),
            rate.medians(),
            "events/s",
            false,
            vec![
                Target::RatioAtLeast(Side::HandWritten, 1.2),
                Target::RatioAtLeast(Side::Raw, 0.95),
            ],
        ));
        rows.push(row(
            3,
            "event publish one-by-one latency p50".into(),
            p50.medians(),
            "us",
            true,
            vec![Target::RatioAtMost(Side::HandWritten, 0.9)],
        ));
    }
    if wanted(4) {
        let n = args.events;
        let mut rate = Samples::default();
        for round in 0..rounds {
            for side in sides.order(round) {
                let tag = format!("{}-p-{round}", side.key());
                let elapsed = match side {
                    Side::Library => {
                        let batch = bench_events(n, &tag)?;
                        let started = Instant::now();
                        for result in bounded("publish_all", ours.publish_all(batch)).await? {
                            result?;
                        }
                        started.elapsed()
                    }
                    Side::HandWritten => {
                        let batch = hand_events(args.hand_codec, n, &tag)?;
                        let started = Instant::now();
                        bounded(
                            "hand-written pipelined",
                            pipelined(js, batch.len(), |i| {
                                hand_message(args.hand_codec, &batch[i])
                            }),
                        )
                        .await??;
                        started.elapsed()
                    }
                    Side::Raw => {
                        let batch = raw_messages(n, &tag)?;
                        let started = Instant::now();
                        bounded("raw pipelined", raw_pipelined(js, batch)).await??;
                        started.elapsed()
                    }
                };
                rate.push(side, n as f64 / elapsed.as_secs_f64());
                purge(js).await?;
            }
        }
        rows.push(row(
            4,
            format!("event publish pipelined ({PIPELINE} in flight)"),
            rate.medians(),
            "events/s",
            false,
            vec![
                Target::RatioAtLeast(Side::HandWritten, 1.2),
                Target::RatioAtLeast(Side::Raw, 0.95),
            ],
        ));
    }
    if wanted(5) {
        let n = args.events;
        let mut rate = Samples::default();
        for round in 0..rounds {
            purge(js).await?;
            raw_pipelined(js, raw_messages(n, &format!("consume-{round}"))?).await?;
            for side in sides.order(round) {
                let durable = format!("bench-{}-{round}", side.key().replace('_', "-"));
                let elapsed = match side {
                    Side::Library => consume_ours(ours, n, &durable).await?,
                    Side::HandWritten => {
                        consume_pulled(js, n, &durable, Some(args.hand_codec)).await?
                    }
                    Side::Raw => consume_pulled(js, n, &durable, None).await?,
                };
                rate.push(side, n as f64 / elapsed.as_secs_f64());
            }
        }
        purge(js).await?;
        rows.push(row(
            5,
            "event listen + ack".into(),
            rate.medians(),
            "events/s",
            false,
            vec![
                Target::RatioAtLeast(Side::HandWritten, 1.2),
                Target::RatioAtLeast(Side::Raw, 0.95),
            ],
        ));
    }
    if wanted(7) {
        let mut peak = Samples::default();
        for side in sides.order(0) {
            purge(js).await?;
            peak.push(side, slow_consumer(config, args, js, side).await?);
        }
        purge(js).await?;
        rows.push(row(
            7,
            format!("slow consumer peak RSS ({} backlog)", args.backlog),
            peak.medians(),
            "MB",
            true,
            vec![Target::LibraryBelow(args.rss_limit_mb as f64)],
        ));
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

/// Time for an async-nats pull consumer (`messages()`, same max ack pending) to receive and
/// ack `n`; the hand-written one (`decode`) reads each event with its codec first.
async fn consume_pulled(
    js: &jetstream::Context,
    n: u64,
    durable: &str,
    decode: Option<HandCodec>,
) -> Result<Duration, Failure> {
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
    bounded("pull consume", async {
        for _ in 0..n {
            let message = messages
                .next()
                .await
                .ok_or_else(|| Failure::new(EXIT_OTHER, "pull consumer ended"))?
                .map_err(err("pulled message"))?;
            if let Some(hand) = decode {
                black_box(hand.decode(message.headers.as_ref(), &message.payload)?);
            }
            message.ack().await.map_err(err("ack"))?;
        }
        Ok::<(), Failure>(())
    })
    .await??;
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Scenario 7: slow consumer, peak RSS of a child process.

/// Runs a listening child (of `side`), publishes the backlog while it handles events
/// slowly, and returns the child's peak RSS in MB once it handled them all.
async fn slow_consumer(
    config: &Config,
    args: &BenchArgs,
    js: &jetstream::Context,
    side: Side,
) -> Result<f64, Failure> {
    let exe = std::env::current_exe().map_err(err("locate cemsg"))?;
    let side_name = side.key().replace('_', "-");
    let durable = format!("bench-slow-{side_name}");
    let threads = args.threads.map_or_else(cores, usize::from);
    let mut command = Command::new(exe);
    command
        .args(["--server", &config.nats_url, "bench-listen"])
        .args(["--count", &args.backlog.to_string(), "--durable", &durable])
        .args(["--handler-us", &args.handler_us.to_string()])
        .args(["--side", &side_name, "--threads", &threads.to_string()])
        .args(["--hand-codec", hand_codec_name(args.hand_codec)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
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
            raw_pipelined(
                js,
                raw_messages(chunk, &format!("slow-{side_name}-{sent}"))?,
            )
            .await?;
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
/// events, then exits when stdin closes. Runs on a runtime of `--threads` worker threads, as
/// the bench.
pub async fn listen_child(config: Config, args: ListenChildArgs) -> Result<(), Failure> {
    let threads = args.threads.map_or_else(cores, usize::from);
    on_runtime(threads, move || listen_child_sized(config, args)).await
}

async fn listen_child_sized(config: Config, args: ListenChildArgs) -> Result<(), Failure> {
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
    if args.side != Side::Library {
        let decode = (args.side == Side::HandWritten).then_some(args.hand_codec);
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
                        // The hand-written consumer decodes with the sdk as a handler would;
                        // the raw one does no CloudEvents work. Then take our time.
                        if let Some(hand) = decode {
                            black_box(hand.decode(message.headers.as_ref(), &message.payload).ok());
                        }
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

/// The library's codec against the sdk's serde (the hand-written side); bytes need no codec,
/// so there is no raw side.
fn codec_scenario(args: &BenchArgs, sides: &Sides) -> Result<Vec<Row>, Failure> {
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
    let sdk_event = HandCodec::Sdk.event(&event)?;
    let sdk_json = Bytes::from(serde_json::to_vec(&sdk_event).map_err(err("sdk serialize"))?);
    for (name, encoded) in [("structured", &structured), ("binary", &binary)] {
        let mut back = codec::decode(Some(&encoded.headers.to_header_map()), &encoded.payload)
            .map_err(err("decode"))?;
        // JSON data decodes as its JSON text (read with data_as): compare it as JSON, with the
        // event whose data is a `Value`.
        if let Ok(value) = ce_messaging::event::EventExt::data_as::<serde_json::Value>(&back) {
            back.set_data_unchecked(value);
        }
        if back != sdk_event {
            return Err(Failure::new(
                EXIT_OTHER,
                format!("codec: the {name} round trip changed the event"),
            ));
        }
    }
    // The decode cases read headers as async-nats hands them over.
    let (structured_headers, binary_headers) = (
        structured.headers.to_header_map(),
        binary.headers.to_header_map(),
    );
    let mut cases = [
        Case::new(|| {
            black_box(serde_json::to_vec(black_box(&sdk_event)).ok());
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
                codec::decode(Some(&structured_headers), black_box(&structured.payload)).ok(),
            );
        }),
        Case::new(|| {
            black_box(codec::decode(Some(&binary_headers), black_box(&binary.payload)).ok());
        }),
        Case::new(|| {
            black_box(
                codec::decode(Some(&structured_headers), black_box(&structured.payload))
                    .map(ReceivedEvent::into_event)
                    .ok(),
            );
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
    let (library, hand) = (sides.has(Side::Library), sides.has(Side::HandWritten));
    let row = |name: &str, ours: f64, sdk: f64, at_least: f64| Row {
        scenario: 6,
        name: name.into(),
        figures: [library.then_some(ours), hand.then_some(sdk), None],
        unit: "events/s",
        lower_is_better: false,
        threads: 1,
        targets: vec![Target::RatioAtLeast(Side::HandWritten, at_least)],
    };
    Ok(vec![
        row("codec encode structured (vs sdk)", f[2], f[0], 1.2),
        row("codec encode binary (vs sdk)", f[3], f[0], 1.0),
        row("codec decode structured (vs sdk)", f[4], f[1], 5.0),
        row("codec decode binary (vs sdk)", f[5], f[1], 1.2),
        // What a handler that asks for the sdk's `Event` pays: the decode above, then the build.
        row(
            "codec decode structured, Event built (vs sdk)",
            f[6],
            f[1],
            5.0,
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

    fn row(figures: [Option<f64>; 3], lower_is_better: bool, targets: Vec<Target>) -> Row {
        Row {
            scenario: 1,
            name: "query sequential latency p50".into(),
            figures,
            unit: "us",
            lower_is_better,
            threads: 8,
            targets,
        }
    }

    #[test]
    fn json_rows_carry_three_figures_both_ratios_threads_and_targets() {
        let targets = vec![
            Target::RatioAtMost(Side::HandWritten, 0.9),
            Target::RatioAtMost(Side::Raw, 1.15),
        ];
        let json = row([Some(110.0), Some(200.0), Some(100.0)], true, targets).to_json();
        assert_eq!(json["library"], 110.0);
        assert_eq!(json["hand_written"], 200.0);
        assert_eq!(json["raw"], 100.0);
        assert_eq!(json["unit"], "us");
        assert_eq!(json["ratio_hand_written"], 0.55);
        assert_eq!(json["ratio_raw"], 1.1);
        assert_eq!(json["better"], "lower");
        for side in ["library", "hand_written", "raw"] {
            assert_eq!(json["threads"][side], 8);
        }
        assert_eq!(json["targets"][0]["target"], "vs hand <= 0.9");
        assert_eq!(json["targets"][0]["met"], true);
        assert_eq!(json["targets"][1]["target"], "vs raw <= 1.15");
        assert_eq!(json["targets"][1]["met"], true);
        let missed = row(
            [Some(120.0), Some(130.0), Some(100.0)],
            true,
            vec![
                Target::RatioAtMost(Side::HandWritten, 0.9),
                Target::RatioAtMost(Side::Raw, 1.15),
            ],
        )
        .to_json();
        assert_eq!(missed["targets"][0]["met"], false);
        assert_eq!(missed["targets"][1]["met"], false);
    }

    #[test]
    fn a_missing_or_zero_figure_gives_null_ratios_not_infinity() {
        let json = row(
            [Some(1.0), None, Some(0.0)],
            false,
            vec![
                Target::RatioAtLeast(Side::HandWritten, 1.2),
                Target::RatioAtLeast(Side::Raw, 0.9),
            ],
        )
        .to_json();
        assert!(json["hand_written"].is_null());
        assert!(json["ratio_hand_written"].is_null());
        assert!(json["ratio_raw"].is_null());
        assert!(json["targets"][0]["met"].is_null());
        assert!(json["targets"][1]["met"].is_null());
    }

    #[test]
    fn targets_compare_the_right_figure() {
        let throughput = row([Some(95.0), Some(75.0), Some(100.0)], false, vec![]);
        assert_eq!(
            Target::RatioAtLeast(Side::Raw, 0.9).met(&throughput),
            Some(true)
        );
        assert_eq!(
            Target::RatioAtLeast(Side::Raw, 0.96).met(&throughput),
            Some(false)
        );
        assert_eq!(
            Target::RatioAtLeast(Side::HandWritten, 1.2).met(&throughput),
            Some(true)
        );
        assert_eq!(
            Target::RatioAtLeast(Side::HandWritten, 1.3).met(&throughput),
            Some(false)
        );
        assert_eq!(Target::LibraryBelow(96.0).met(&throughput), Some(true));
        assert_eq!(Target::LibraryBelow(95.0).met(&throughput), Some(false));
    }

    #[test]
    fn every_side_goes_first_in_turn_and_unwanted_sides_are_left_out() {
        let all = Sides::new(&[]);
        assert_eq!(all.0, Side::ALL);
        let firsts: Vec<Side> = (0..3).map(|round| all.order(round)[0]).collect();
        assert_eq!(firsts, Side::ALL);
        assert_eq!(all.order(1), [Side::HandWritten, Side::Raw, Side::Library]);
        let two = Sides::new(&[Side::Raw, Side::Library]);
        assert_eq!(two.0, [Side::Library, Side::Raw], "in the usual order");
        assert!(!two.has(Side::HandWritten));
        assert_eq!(two.order(1), [Side::Raw, Side::Library]);
    }

    #[test]
    fn samples_give_a_median_per_side_and_none_for_a_side_not_run() {
        let mut samples = Samples::default();
        for v in [3.0, 1.0, 2.0] {
            samples.push(Side::Raw, v);
        }
        samples.push(Side::Library, 7.0);
        assert_eq!(samples.medians(), [Some(7.0), None, Some(2.0)]);
    }

    #[test]
    fn the_hand_written_codecs_round_trip_the_event_and_answer_with_its_data() {
        let event = sample_request().unwrap();
        for hand in [HandCodec::Sdk, HandCodec::Library] {
            let (headers, payload) = hand.encode(&hand.event(&event).unwrap()).unwrap();
            assert_eq!(headers.is_some(), hand == HandCodec::Library);
            let back = hand.decode(headers.as_ref(), &payload).unwrap();
            let reply = hand.reply_to(back).unwrap();
            assert_eq!(reply.ty(), REPLY_TYPE);
            assert_ne!(reply.id(), event.id());
            let data: serde_json::Value = ce_messaging::event::EventExt::data_as(&reply).unwrap();
            let sent: serde_json::Value = ce_messaging::event::EventExt::data_as(&event).unwrap();
            assert_eq!(data, sent, "{hand:?}");
        }
        // The sdk side sends its data as a `data` member, not `data_base64`.
        let sdk_event = HandCodec::Sdk.event(&event).unwrap();
        let sdk_json = serde_json::to_vec(&sdk_event).unwrap();
        assert!(std::str::from_utf8(&sdk_json)
            .unwrap()
            .contains(r#""data":{"#));
        assert_eq!(
            HandCodec::Sdk
                .decode(None, &Bytes::from(sdk_json))
                .unwrap()
                .into_event(),
            sdk_event
        );
        // The library's structured encoding is what the hand-written consumer reads in
        // scenario 5: the sdk must read it to the same event (data as a `Value` there).
        let ours = codec::encode(&event, ContentMode::Structured).unwrap();
        assert_eq!(
            HandCodec::Sdk
                .decode(None, &ours.payload)
                .unwrap()
                .into_event(),
            sdk_event
        );
    }

    #[test]
    fn the_listening_child_is_given_the_hand_codec_it_parses() {
        for hand in [HandCodec::Sdk, HandCodec::Library] {
            let parsed = HandCodec::from_str(hand_codec_name(hand), false).unwrap();
            assert_eq!(parsed, hand);
        }
    }

    #[test]
    fn the_bench_runs_on_a_runtime_of_the_asked_size() {
        let outer = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        for threads in [5, 2, 1] {
            let workers = outer
                .block_on(on_runtime(threads, || async {
                    Ok(tokio::runtime::Handle::current().metrics().num_workers())
                }))
                .unwrap();
            assert_eq!(workers, threads);
        }
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
