//! Instruction counts per operation, stable on a loaded machine: each operation runs `n` and
//! `2n` times in a child process under `valgrind --tool=callgrind`, and the difference of the
//! two totals divided by `n` is the cost of one operation (start-up, set-up and warm-up are the
//! same in both runs and cancel out). Counts do not depend on other load, so a change that
//! raises them shows however busy the machine is.
//!
//! ```text
//! cargo bench --bench instructions                      # every operation, a table
//! cargo bench --bench instructions -- --ops decode-structured,encode-binary
//! cargo bench --bench instructions -- --markdown        # the table for docs/performance.md
//! scripts/instructions                                  # the same, via the script
//! scripts/instructions --check benches/instructions.baseline   # held to the baseline
//! scripts/instructions --write-baseline benches/instructions.baseline
//! ```
//!
//! `--check FILE` measures the operations FILE lists and fails (exit 1) when one costs more
//! than its figure there plus the tolerance (3 %, `--tolerance PCT`); `scripts/test` runs it on
//! `benches/instructions.baseline`. The file records the environment it was measured in
//! (`--environment`: rustc, architecture, CPU, glibc); elsewhere its figures are shown, not
//! held.
//!
//! Needs `valgrind` on the `PATH`. The `*-nats` operations need a nats-server (JetStream for
//! the publish ones): `NATS_SERVER_BIN`, `.tools/bin/nats-server` or `nats-server` on the
//! `PATH`; one is started on a free loopback port for the run and stopped after it. Without a
//! server they are left out (and said so).
//!
//! The event is the one `cemsg bench` and `benches/codec.rs` use (about 320 bytes in
//! structured mode). Operations (each `n` of them in one process, on one current-thread tokio
//! runtime where async):
//!
//! - `sdk-encode` / `sdk-decode`: cloudevents-sdk's serde (`serde_json::to_vec` /
//!   `from_slice`), the hand-written peer's codec, for reference, on the event as the sdk's
//!   builder makes it (data a `serde_json::Value`);
//! - `encode-structured`, `encode-binary`, `decode-structured`, `decode-binary`: this crate's
//!   codec (`decode` includes dropping the event: in structured mode a `ReceivedEvent` that
//!   was never built, what a handler costs that reads attributes and `data_as`);
//! - `decode-structured-event`: `decode` and `ReceivedEvent::into_event`, dropped (what a
//!   handler costs that asks for the sdk's `Event`);
//! - `peek-tid-structured`: `peek_transaction_id` of the structured event (what an event source
//!   whose listeners all wait for transaction ids spends on another request's response instead
//!   of a decode);
//! - `encode-structured-sent`, `encode-binary-sent`: `encode` and the headers converted to
//!   async-nats' `HeaderMap`, as the library sends them (async-nats takes no other form);
//! - `new-event`: `new_event` with the bench's data, dropped;
//! - `data-as`: a decoded event's `data_as` into the data's own struct;
//! - `query-memory` / `query-nats`: one sequential query round trip (requester and listener in
//!   this process: a clone of the request event, `request`, and a handler that reads the data
//!   with `data_as::<serde_json::Value>` and answers with `reply_data`, as `cemsg bench` does);
//! - `query-nats-raw`: the same round trip with raw async-nats (echo responder, bytes encoded
//!   once before), the limit of this client;
//! - `publish-memory` / `publish-nats`: `new_event` and `publish` of one event, awaiting its
//!   ack; `publish-memory-promise`: the same while an event source waits for a transaction id
//!   the events do not carry (what skipping another request's response costs); `publish-nats-raw`: raw JetStream publish of bytes encoded once before, awaiting the
//!   PubAck.
//!
//! One side alone (the process under callgrind runs one side; its peer is this
//! executable again, `--peer <role> <n>`, outside valgrind, against the same server):
//!
//! - `query-responder`: `NatsQueries::listen` with the handler of `query-nats` (decode,
//!   `data_as`, `reply_data`: a new reply event, encoded); the peer is a plain async-nats
//!   requester sending the same bytes each time (the request as the library's requester sends
//!   it: structured, with a transaction id and `Request-Timeout-Ms`), retrying until the
//!   responder subscribed;
//! - `query-responder-hand`: the same work written by hand: an async-nats subscription, this
//!   crate's `decode`, the request's type and transaction id read (as the library reads them),
//!   `data_as`, `new_event_with_tid` and `encode`, published inline in the loop;
//! - `query-requester`: `NatsQueries::request` of a clone of the request event and `data_as`
//!   of the reply; the peer is a plain async-nats responder answering every request with the
//!   same reply event, encoded once;
//! - `query-requester-hand`: the same with async-nats' `Client::request_with_headers` and this
//!   crate's codec inline (clone, `encode`, request, `decode`, `data_as`).
//!
//! - `consume-nats`: a durable listener (`JetStreamEvents::listen`, 16 workers, 256 read-ahead,
//!   a handler that only counts, as `cemsg bench` scenario 5's library side); the peer, run to
//!   its end before the measured process starts, empties the stream, deletes the consuming
//!   durables and stores the events (the bench event as the library publishes it, each with
//!   its own `Nats-Msg-Id`);
//! - `consume-nats-hand`: the same by hand: an async-nats pull consumer (same max ack
//!   pending), this crate's `decode` of each event, its type and transaction id read (as the
//!   library reads them), a plain ack.
//!
//! A side's machinery is the library op minus its `-hand` op.
use std::hint::black_box;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ce_messaging::cloudevents::event::{Data, ExtensionValue};
use ce_messaging::cloudevents::{
    AttributesReader, AttributesWriter, Event, EventBuilder, EventBuilderV10,
};
use ce_messaging::codec::{decode, encode, peek_transaction_id, ContentMode};
use ce_messaging::config::Config;
use ce_messaging::event::{new_event, new_event_with_tid, EventExt};
use ce_messaging::events::EventConnection;
use ce_messaging::query::{handler_fn, QueryConnection, QueryHandlers, QueryListenOptions};
use ce_messaging::ReceivedEvent;

/// One operation: its name, how many times the `n` run repeats it, whether it needs a server.
struct Op {
    name: &'static str,
    n: u64,
    server: bool,
}

const OPS: &[Op] = &[
    Op {
        name: "sdk-encode",
        n: 2000,
        server: false,
    },
    Op {
        name: "sdk-decode",
        n: 2000,
        server: false,
    },
    Op {
        name: "encode-structured",
        n: 2000,
        server: false,
    },
    Op {
        name: "encode-binary",
        n: 2000,
        server: false,
    },
    Op {
        name: "encode-structured-sent",
        n: 2000,
        server: false,
    },
    Op {
        name: "encode-binary-sent",
        n: 2000,
        server: false,
    },
    Op {
        name: "decode-structured",
        n: 2000,
        server: false,
    },
    Op {
        name: "decode-structured-event",
        n: 2000,
        server: false,
    },
    Op {
        name: "decode-binary",
        n: 2000,
        server: false,
    },
    Op {
        name: "peek-tid-structured",
        n: 2000,
        server: false,
    },
    Op {
        name: "sdk-event-floor",
        n: 2000,
        server: false,
    },
    Op {
        name: "new-event",
        n: 2000,
        server: false,
    },
    Op {
        name: "data-as",
        n: 2000,
        server: false,
    },
    Op {
        name: "query-memory",
        n: 500,
        server: false,
    },
    Op {
        name: "publish-memory",
        n: 500,
        server: false,
    },
    Op {
        name: "publish-memory-promise",
        n: 500,
        server: false,
    },
    Op {
        name: "query-nats",
        n: 300,
        server: true,
    },
    Op {
        name: "query-nats-raw",
        n: 300,
        server: true,
    },
    Op {
        name: "query-responder",
        n: 300,
        server: true,
    },
    Op {
        name: "query-responder-hand",
        n: 300,
        server: true,
    },
    Op {
        name: "query-requester",
        n: 300,
        server: true,
    },
    Op {
        name: "query-requester-hand",
        n: 300,
        server: true,
    },
    Op {
        name: "consume-nats",
        n: 500,
        server: true,
    },
    Op {
        name: "consume-nats-hand",
        n: 500,
        server: true,
    },
    Op {
        name: "publish-nats",
        n: 300,
        server: true,
    },
    Op {
        name: "publish-nats-raw",
        n: 300,
        server: true,
    },
];

/// Runs of each operation before the measured ones: connections, pools and caches warm up.
const WARM_UP: u64 = 50;

const QUERY_TYPE: &str = "bench.workspace.get";
const REPLY_TYPE: &str = "bench.workspace.got";
const EVENT_TYPE: &str = "org.cyverse.workspace.created";
const RAW_QUERY_SUBJECT: &str = "bench.raw.echo";

/// The data of the bench's event.
#[derive(serde::Serialize, serde::Deserialize)]
struct Workspace<W> {
    name: W,
    owner: W,
    size: u64,
    tags: [W; 2],
}

/// The bench's event: about 320 bytes in structured mode.
fn bench_event() -> Event {
    new_event(
        EVENT_TYPE,
        "workspace-service",
        &Workspace {
            name: "my workspace",
            owner: "alice",
            size: 1024,
            tags: ["a", "b"],
        },
    )
    .expect("the bench event builds")
}

/// The bench's event as `decode` returns it from structured mode.
fn decode_structured_bench_event() -> Event {
    let msg = encode(&bench_event(), ContentMode::Structured).expect("encode");
    decode(Some(&msg.headers.to_header_map()), &msg.payload)
        .expect("decode")
        .into_event()
}

/// The bench's event as a user of cloudevents-sdk alone builds it (the `sdk-*` reference): the
/// sdk's builder with the data as a `serde_json::Value`, the same attributes as
/// [`bench_event`] (whose data is JSON text, which the sdk's serde writes as `data_base64`).
fn sdk_event() -> Event {
    let event = bench_event();
    let data = serde_json::to_value(Workspace {
        name: "my workspace",
        owner: "alice",
        size: 1024,
        tags: ["a", "b"],
    })
    .expect("the bench data serializes");
    let mut builder = EventBuilderV10::new()
        .id(event.id())
        .ty(event.ty())
        .source(event.source().clone())
        .data("application/json", data);
    if let Some(time) = event.time() {
        builder = builder.time(*time);
    }
    for (name, value) in event.iter_extensions() {
        builder = builder.extension(name, value.clone());
    }
    builder.build().expect("the sdk event builds")
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; it means nothing here.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("--run") {
        let (Some(op), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse().ok())) else {
            eprintln!("usage: instructions --run <op> <n>");
            return ExitCode::from(2);
        };
        return run(op, n);
    }
    if args.first().map(String::as_str) == Some("--peer") {
        let (Some(role), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse().ok())) else {
            eprintln!("usage: instructions --peer <requester|responder> <n>");
            return ExitCode::from(2);
        };
        return peer(role, n);
    }
    drive(&args)
}

// ---------------------------------------------------------------------------------------------
// The driver: runs each operation n and 2n times under callgrind and prints the table.

fn drive(args: &[String]) -> ExitCode {
    let mut wanted: Option<Vec<String>> = None;
    let mut markdown = false;
    let mut scale = 1u64;
    let mut threads = 1usize;
    let mut check: Option<PathBuf> = None;
    let mut write_baseline: Option<PathBuf> = None;
    let mut tolerance = DEFAULT_TOLERANCE_PERCENT;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--ops" => {
                wanted = iter
                    .next()
                    .map(|v| v.split(',').map(str::to_owned).collect())
            }
            "--markdown" => markdown = true,
            "--scale" => scale = iter.next().and_then(|v| v.parse().ok()).unwrap_or(1).max(1),
            "--threads" => threads = iter.next().and_then(|v| v.parse().ok()).unwrap_or(1).max(1),
            "--check" => check = iter.next().map(PathBuf::from),
            "--write-baseline" => write_baseline = iter.next().map(PathBuf::from),
            "--tolerance" => match iter.next().and_then(|v| v.parse::<f64>().ok()) {
                Some(t) if t >= 0.0 => tolerance = t,
                _ => {
                    eprintln!("--tolerance needs a percentage (a number >= 0)");
                    return ExitCode::from(2);
                }
            },
            "--environment" => {
                println!("{}", environment());
                return ExitCode::SUCCESS;
            }
            "--list" => {
                for op in OPS {
                    println!("{}", op.name);
                }
                return ExitCode::SUCCESS;
            }
            "-h" | "--help" => {
                println!(
                    "instructions [--ops a,b] [--markdown] [--scale K] [--threads T] [--list]\n\
                     \x20            [--check FILE [--tolerance PCT]] [--write-baseline FILE]\n\
                     Instruction counts per operation (callgrind, n and 2n runs subtracted); \
                     --scale multiplies n; --threads T runs the async operations on a \
                     multi-thread tokio runtime of T workers (default: current-thread).\n\
                     --check FILE: measure the operations FILE lists and fail (exit 1) when one \
                     costs more than its figure there plus PCT percent (default \
                     {DEFAULT_TOLERANCE_PERCENT}).\n\
                     --write-baseline FILE: measure and write FILE (the operations of --ops, or \
                     every one but the sdk's references).\n\
                     --environment: what the counts depend on besides the code (compiler, CPU, \
                     glibc), as a baseline records it."
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument `{other}` (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    let baseline = match &check {
        Some(path) => match read_baseline(path) {
            Ok(baseline) => {
                if wanted.is_none() {
                    wanted = Some(baseline.figures.iter().map(|(op, _)| op.clone()).collect());
                }
                Some(baseline)
            }
            Err(why) => {
                eprintln!("{why}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    if (check.is_some() || write_baseline.is_some()) && threads != 1 {
        eprintln!("a baseline is measured on a current-thread runtime: no --threads with it");
        return ExitCode::from(2);
    }
    if write_baseline.is_some() && wanted.is_none() {
        wanted = Some(
            OPS.iter()
                .filter(|op| !is_reference(op.name))
                .map(|op| op.name.to_owned())
                .collect(),
        );
    }
    if let Some(wanted) = &wanted {
        if let Some(bad) = wanted.iter().find(|w| !OPS.iter().any(|op| op.name == *w)) {
            eprintln!("unknown operation `{bad}` (try --list)");
            return ExitCode::from(2);
        }
    }
    if Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map_or(true, |s| !s.success())
    {
        eprintln!("valgrind is not on the PATH (apt-get install valgrind)");
        return ExitCode::from(2);
    }
    let ops: Vec<&Op> = OPS
        .iter()
        .filter(|op| {
            wanted
                .as_ref()
                .is_none_or(|w| w.iter().any(|n| n == op.name))
        })
        .collect();
    let server = if ops.iter().any(|op| op.server) {
        match Server::start() {
            Ok(server) => Some(server),
            Err(why) if baseline.is_some() || write_baseline.is_some() => {
                // A baseline's operation that cannot be measured is not a pass.
                eprintln!("no nats-server for the *-nats operations: {why}");
                return ExitCode::FAILURE;
            }
            Err(why) => {
                eprintln!("no nats-server, the *-nats operations are left out: {why}");
                None
            }
        }
    } else {
        None
    };
    // The children read it (`runtime`).
    std::env::set_var(THREADS_VAR, threads.to_string());
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("cannot find this executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let mut rows = Vec::new();
    for op in ops {
        if op.server && server.is_none() {
            continue;
        }
        let n = op.n * scale;
        let url = server.as_ref().map(Server::url);
        let count = |n: u64| match (peer_role(op.name), url.as_deref()) {
            (Some(role), Some(url)) => with_peer(&exe, role, n, url, || {
                callgrind(&exe, op.name, n, Some(url))
            }),
            _ => callgrind(&exe, op.name, n, url.as_deref()),
        };
        let measure = || -> Result<f64, String> {
            let one = count(n)?;
            let two = count(2 * n)?;
            Ok((two as f64 - one as f64) / n as f64)
        };
        let mut per_op = match measure() {
            Ok(per_op) => per_op,
            Err(e) => {
                eprintln!("{}: {e}", op.name);
                return ExitCode::FAILURE;
            }
        };
        // The operations that run tasks (the query and publish ones) land in one of a few
        // figures about 1-3 % apart, as their tasks happen to be polled: noise only ever adds
        // work. A baseline is written with the highest of three measurements, and a check
        // that finds an operation over its figure measures it twice more and keeps the lowest,
        // so that a change fails the check only when every measurement says so.
        let extra = if write_baseline.is_some() {
            2
        } else {
            let limit = baseline.as_ref().and_then(|b| {
                b.figures
                    .iter()
                    .find(|(name, _)| name == op.name)
                    .map(|(_, figure)| figure * (1.0 + tolerance / 100.0))
            });
            if limit.is_some_and(|limit| per_op > limit) {
                2
            } else {
                0
            }
        };
        for _ in 0..extra {
            match measure() {
                Ok(again) if write_baseline.is_some() => per_op = per_op.max(again),
                Ok(again) => per_op = per_op.min(again),
                Err(e) => {
                    eprintln!("{}: {e}", op.name);
                    return ExitCode::FAILURE;
                }
            }
        }
        rows.push((op.name, per_op, n));
        if !markdown {
            println!(
                "{:<20} {:>10.0} instructions/op  (n = {n}{})",
                op.name,
                per_op,
                match (extra, write_baseline.is_some()) {
                    (0, _) => "",
                    (_, true) => ", highest of 3",
                    (_, false) => ", lowest of 3",
                }
            );
        }
    }
    if markdown {
        println!("| operation | instructions/op |");
        println!("|---|---:|");
        for (name, per_op, _) in &rows {
            println!("| {name} | {} |", group_thousands(per_op.round() as i64));
        }
    }
    eprintln!(
        "callgrind, {}n minus n runs per operation; {:.0} s in all",
        2,
        started.elapsed().as_secs_f64()
    );
    let measured: Vec<(String, f64)> = rows
        .iter()
        .map(|(name, per_op, _)| ((*name).to_owned(), *per_op))
        .collect();
    if let Some(path) = &write_baseline {
        if let Err(e) = std::fs::write(path, baseline_text(&measured, &environment())) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("wrote {}", path.display());
    }
    match &baseline {
        Some(baseline) => {
            let here = environment();
            let held = baseline.environment.as_deref() == Some(here.as_str());
            if !held {
                println!(
                    "the baseline was measured in another environment ({}); this is {here}: \
                     its figures are shown, not held",
                    baseline.environment.as_deref().unwrap_or("not recorded")
                );
            }
            let report = compare(&baseline.figures, &measured, tolerance, held);
            print!("{}", report.text);
            if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        None => ExitCode::SUCCESS,
    }
}

// ---------------------------------------------------------------------------------------------
// The baseline: the figures a change is held to (`--check`), so that one that raises them fails
// `scripts/test` instead of waiting for someone to compare tables.

/// How much above its baseline figure an operation may cost before `--check` fails: the round
/// trips through a server vary by about 1 % from run to run, and unrelated code moves the
/// codegen of the codec by up to about 2 %.
const DEFAULT_TOLERANCE_PERCENT: f64 = 3.0;

/// The sdk's own operations, what the sdk's `Event` costs, raw async-nats and the hand-written
/// sides of a query (async-nats with this crate's codec inline, what a side's machinery is
/// measured against): measured for reference, never held to a baseline.
fn is_reference(op: &str) -> bool {
    op.starts_with("sdk-") || op.ends_with("-raw") || op.ends_with("-hand")
}

/// The baseline file: one `operation instructions` pair a line; `#` starts a comment.
fn read_baseline(path: &std::path::Path) -> Result<Baseline, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the baseline {}: {e}", path.display()))?;
    parse_baseline(&text).map_err(|why| format!("{}: {why}", path.display()))
}

/// A baseline file read: its figures and the environment they were measured in.
struct Baseline {
    figures: Vec<(String, f64)>,
    environment: Option<String>,
}

/// The comment line that records where the figures were measured.
const ENVIRONMENT_PREFIX: &str = "# environment:";

fn parse_baseline(text: &str) -> Result<Baseline, String> {
    let mut baseline = Vec::new();
    let mut environment = None;
    for (number, line) in text.lines().enumerate() {
        if let Some(env) = line.strip_prefix(ENVIRONMENT_PREFIX) {
            environment = Some(env.trim().to_owned());
            continue;
        }
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(op), Some(count), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(format!(
                "line {}: expected `operation instructions`, found `{line}`",
                number + 1
            ));
        };
        if !OPS.iter().any(|known| known.name == op) {
            return Err(format!(
                "line {}: unknown operation `{op}` (try --list)",
                number + 1
            ));
        }
        let count = count
            .replace(',', "")
            .parse::<f64>()
            .ok()
            .filter(|c| *c > 0.0)
            .ok_or_else(|| {
                format!(
                    "line {}: `{count}` is not a positive instruction count",
                    number + 1
                )
            })?;
        baseline.push((op.to_owned(), count));
    }
    if baseline.is_empty() {
        return Err("no operations".into());
    }
    Ok(Baseline {
        figures: baseline,
        environment,
    })
}

/// What instruction counts depend on besides the code: the compiler (codegen), the machine's
/// architecture and CPU (glibc picks its `memcpy` and string functions by CPU features) and
/// glibc itself. Figures measured in another environment are shown, not held.
fn environment() -> String {
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| format!("{program}: unknown"))
    };
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "cpu: unknown".into());
    format!(
        "{}; {}; {cpu}; {}",
        output(&rustc, &["-V"]),
        std::env::consts::ARCH,
        output("getconf", &["GNU_LIBC_VERSION"])
    )
}

fn baseline_text(measured: &[(String, f64)], environment: &str) -> String {
    let mut text = String::from(
        "# Instructions per operation that `scripts/instructions --check` (run by scripts/test)\n\
         # holds the code to: an operation that costs more than its figure plus the tolerance\n\
         # (3 %) fails the check. Written by `scripts/instructions --write-baseline FILE`; when a\n\
         # change raises a figure on purpose, or lowers one, write it anew in the same commit and\n\
         # say why. Figures measured in another environment (below) are shown, not held.\n\
         # See docs/performance.md \"Instruction counts\".\n",
    );
    text.push_str(&format!("{ENVIRONMENT_PREFIX} {environment}\n"));
    for (op, per_op) in measured {
        text.push_str(&format!("{op} {}\n", per_op.round() as u64));
    }
    text
}

/// What `--check` prints and whether it passed.
struct Report {
    text: String,
    passed: bool,
}

/// Each baseline operation against its measured figure: over the tolerance fails, a figure
/// that went down by more than it is reported so that the baseline is written anew.
/// `held`: the baseline was measured in this environment; otherwise nothing fails.
fn compare(
    baseline: &[(String, f64)],
    measured: &[(String, f64)],
    tolerance: f64,
    held: bool,
) -> Report {
    let mut text = format!(
        "{:<24} {:>10} {:>10} {:>8}  (tolerance +{tolerance}%)\n",
        "operation", "baseline", "now", "change"
    );
    let mut passed = true;
    for (op, expected) in baseline {
        let Some(now) = measured
            .iter()
            .find(|(name, _)| name == op)
            .map(|(_, n)| *n)
        else {
            text.push_str(&format!(
                "{op:<24} {expected:>10.0} {:>10} FAILED: not measured\n",
                "-"
            ));
            passed = false;
            continue;
        };
        let change = (now - expected) / expected * 100.0;
        let verdict = if change > tolerance && !held {
            "raised (not held)"
        } else if change > tolerance {
            passed = false;
            "FAILED: raised"
        } else if change < -tolerance {
            "lower: if it stays so, write the baseline anew"
        } else {
            "ok"
        };
        text.push_str(&format!(
            "{op:<24} {expected:>10.0} {now:>10.0} {change:>+7.1}%  {verdict}\n"
        ));
    }
    text.push_str(if !held {
        "instruction counts: not held (another environment)\n"
    } else if passed {
        "instruction counts: within the baseline\n"
    } else {
        "instruction counts: over the baseline (above); if that is the price of the change, \
         write the baseline anew (scripts/instructions --write-baseline \
         benches/instructions.baseline) and say why in the commit\n"
    });
    Report { text, passed }
}

/// `12345` as `12,345`.
fn group_thousands(value: i64) -> String {
    let digits = value.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0 {
        out.insert(0, '-');
    }
    out
}

/// Total instructions of `exe --run op n` under callgrind (every thread).
fn callgrind(exe: &PathBuf, op: &str, n: u64, url: Option<&str>) -> Result<u64, String> {
    let mut command = Command::new("valgrind");
    // `CALLGRIND_OUT` keeps the profiles (`<dir>/<op>.<n>.out`) for `callgrind_annotate`.
    let out = match std::env::var("CALLGRIND_OUT") {
        Ok(dir) if !dir.is_empty() => format!("--callgrind-out-file={dir}/{op}.{n}.out"),
        _ => "--callgrind-out-file=/dev/null".to_owned(),
    };
    command
        .args(["--tool=callgrind", &out])
        .arg(exe)
        .args(["--run", op, &n.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(url) = url {
        command.env("NATS_URL", url);
    }
    let output = command
        .output()
        .map_err(|e| format!("cannot run valgrind: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("`--run {op} {n}` failed: {stderr}"));
    }
    // Callgrind's summary: `==pid== Collected : 123456`.
    stderr
        .lines()
        .find_map(|line| {
            let (_, rest) = line.split_once("Collected :")?;
            rest.trim().parse::<u64>().ok()
        })
        .ok_or_else(|| format!("no `Collected :` line in callgrind's output: {stderr}"))
}

/// The peer an operation that measures one side of a query needs: `requester` (it sends the
/// requests the measured responder answers) or `responder`.
fn peer_role(op: &str) -> Option<&'static str> {
    match op {
        "query-responder" | "query-responder-hand" => Some("requester"),
        "query-requester" | "query-requester-hand" => Some("responder"),
        "consume-nats" | "consume-nats-hand" => Some("publisher"),
        _ => None,
    }
}

/// Runs `measure` while a peer (`exe --peer role n`, not under valgrind) runs: a responder is
/// waited for until it says it subscribed, and stopped after; a requester sends its `n` (plus
/// warm-up) requests once the measured responder listens, and is waited for after.
fn with_peer(
    exe: &PathBuf,
    role: &str,
    n: u64,
    url: &str,
    measure: impl FnOnce() -> Result<u64, String>,
) -> Result<u64, String> {
    use std::io::BufRead;
    if role == "publisher" {
        // The events are stored before the measured listener starts: it reads a backlog.
        let status = Command::new(exe)
            .args(["--peer", role, &n.to_string()])
            .env("NATS_URL", url)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .map_err(|e| format!("cannot run the {role} peer: {e}"))?;
        if !status.success() {
            return Err(format!("the {role} peer failed ({status})"));
        }
        return measure();
    }
    let mut child = Command::new(exe)
        .args(["--peer", role, &n.to_string()])
        .env("NATS_URL", url)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the {role} peer: {e}"))?;
    if role == "responder" {
        let mut line = String::new();
        let ready = child
            .stdout
            .take()
            .map(|out| std::io::BufReader::new(out).read_line(&mut line));
        if !matches!(ready, Some(Ok(_))) || line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the {role} peer did not start"));
        }
        let measured = measure();
        let _ = child.kill();
        let _ = child.wait();
        return measured;
    }
    let measured = measure();
    // The requester ends once its last request was answered, before the measured responder
    // exits; a failed measurement leaves it waiting: stopped.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return measured,
            Ok(Some(status)) => return Err(format!("the {role} peer failed ({status})")),
            Ok(None) if measured.is_ok() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return measured.and(Err(format!("the {role} peer did not end")));
            }
        }
    }
}

/// A nats-server with JetStream on a free loopback port, its store in a temporary folder;
/// stopped on drop.
struct Server {
    child: Child,
    port: u16,
    _store: tempfile::TempDir,
}

impl Server {
    fn start() -> Result<Server, String> {
        let binary = server_binary();
        let store = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|probe| probe.local_addr())
            .map_err(|e| format!("free port: {e}"))?
            .port();
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut server = Server {
            child,
            port,
            _store: store,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("nats-server not ready in 10 s".into());
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("nats-server exited at start ({status})"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
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
    PathBuf::from("nats-server")
}

// ---------------------------------------------------------------------------------------------
// The child: runs one operation WARM_UP + n times.

fn run(op: &str, n: u64) -> ExitCode {
    let total = WARM_UP + n;
    let result = match op {
        "sdk-encode" => {
            let event = sdk_event();
            repeat(total, || {
                black_box(serde_json::to_vec(black_box(&event)).ok());
            })
        }
        "sdk-decode" => {
            let bytes = Bytes::from(serde_json::to_vec(&sdk_event()).expect("sdk encode"));
            repeat(total, || {
                black_box(serde_json::from_slice::<Event>(black_box(&bytes)).ok());
            })
        }
        "encode-structured" | "encode-binary" => {
            let event = bench_event();
            let mode = if op == "encode-binary" {
                ContentMode::Binary
            } else {
                ContentMode::Structured
            };
            repeat(total, || {
                black_box(encode(black_box(&event), mode).ok());
            })
        }
        "encode-structured-sent" | "encode-binary-sent" => {
            let event = bench_event();
            let mode = if op == "encode-binary-sent" {
                ContentMode::Binary
            } else {
                ContentMode::Structured
            };
            repeat(total, || {
                let sent = encode(black_box(&event), mode)
                    .map(|msg| (async_nats::HeaderMap::from(msg.headers), msg.payload));
                black_box(sent.ok());
            })
        }
        "decode-structured" | "decode-binary" => {
            let mode = if op == "decode-binary" {
                ContentMode::Binary
            } else {
                ContentMode::Structured
            };
            let msg = encode(&bench_event(), mode).expect("encode");
            let headers = msg.headers.to_header_map();
            repeat(total, || {
                black_box(decode(Some(&headers), black_box(&msg.payload)).ok());
            })
        }
        "decode-structured-event" => {
            let msg = encode(&bench_event(), ContentMode::Structured).expect("encode");
            let headers = msg.headers.to_header_map();
            repeat(total, || {
                let event = decode(Some(&headers), black_box(&msg.payload));
                black_box(event.map(ReceivedEvent::into_event).ok());
            })
        }
        "peek-tid-structured" => {
            let msg = encode(&bench_event(), ContentMode::Structured).expect("encode");
            let headers = msg.headers.to_header_map();
            repeat(total, || {
                black_box(peek_transaction_id(Some(&headers), black_box(&msg.payload)));
            })
        }
        "sdk-event-floor" => {
            // What `decode` cannot go below while it returns the sdk's `Event`: the decoded
            // event's attributes, extensions and data as owned values, put into an `Event` by
            // the builder and dropped; no reading, no checks, `time` already parsed.
            let event = decode_structured_bench_event();
            let id = event.id().to_owned();
            let source = event.source().to_string();
            let ty = event.ty().to_owned();
            let ct = event.datacontenttype().map(str::to_owned);
            let time = event.time().copied();
            let extensions: Vec<(String, ExtensionValue)> = event
                .iter_extensions()
                .map(|(n, v)| (n.to_owned(), v.clone()))
                .collect();
            let data = match event.data() {
                Some(Data::Binary(bytes)) => bytes.clone(),
                _ => Vec::new(),
            };
            repeat(total, || {
                let mut event = EventBuilderV10::new()
                    .id(black_box(id.as_str()))
                    .source(black_box(source.as_str()))
                    .ty(black_box(ty.as_str()))
                    .build()
                    .ok();
                if let Some(event) = &mut event {
                    event.set_time(black_box(time));
                    for (name, value) in black_box(&extensions) {
                        event.set_extension(name, value.clone());
                    }
                    event.set_datacontenttype(black_box(ct.clone()));
                    event.set_data_unchecked(Data::Binary(black_box(data.as_slice()).to_vec()));
                }
                black_box(event);
            })
        }
        "new-event" => repeat(total, || {
            black_box(bench_event());
        }),
        "data-as" => {
            let msg = encode(&bench_event(), ContentMode::Binary).expect("encode");
            let event = decode(Some(&msg.headers.to_header_map()), &msg.payload).expect("decode");
            repeat(total, || {
                black_box(black_box(&event).data_as::<Workspace<String>>().ok());
            })
        }
        "query-memory"
        | "query-nats"
        | "query-nats-raw"
        | "publish-memory"
        | "publish-memory-promise"
        | "publish-nats"
        | "publish-nats-raw"
        | "query-responder"
        | "query-responder-hand"
        | "query-requester"
        | "query-requester-hand"
        | "consume-nats"
        | "consume-nats-hand" => runtime().block_on(run_async(op, total)),
        other => Err(format!("unknown operation `{other}`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{op}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Set by the driver (`--threads`) for its children: the tokio runtime's workers; 1 (or
/// unset) means a current-thread runtime.
const THREADS_VAR: &str = "INSTRUCTIONS_THREADS";

fn runtime() -> tokio::runtime::Runtime {
    let threads = std::env::var(THREADS_VAR)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    let mut builder = if threads > 1 {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().expect("a tokio runtime")
}

fn repeat(total: u64, mut f: impl FnMut()) -> Result<(), String> {
    for _ in 0..total {
        f();
    }
    Ok(())
}

fn config() -> Config {
    Config {
        nats_url: std::env::var("NATS_URL").unwrap_or_else(|_| Config::default().nats_url),
        request_timeout: Duration::from_secs(30),
        js_stream: "CEMSG_INSTRUCTIONS".into(),
        js_subject_prefix: "instructions".into(),
        js_dlq_stream: "CEMSG_INSTRUCTIONS_DLQ".into(),
        ..Default::default()
    }
}

fn query_handlers() -> QueryHandlers {
    QueryHandlers::new().on(
        QUERY_TYPE,
        handler_fn(|request: ReceivedEvent, reply| async move {
            let data: serde_json::Value = request.data_as()?;
            reply.reply_data(REPLY_TYPE, &data).await?;
            Ok(())
        }),
    )
}

fn query_request() -> Event {
    new_event(
        QUERY_TYPE,
        "bench-client",
        &serde_json::json!({"workspace": "w-123", "user": "alice", "fields": ["name", "size", "owner"]}),
    )
    .expect("the query event builds")
}

async fn run_async(op: &str, total: u64) -> Result<(), String> {
    let err = |what: &'static str| move |e: &dyn std::fmt::Display| format!("{what}: {e}");
    let config = config();
    match op {
        "query-memory" => {
            let broker = ce_messaging::MemoryBroker::new();
            let serving = broker.query_connection(&config);
            let listener = serving
                .listen(query_handlers(), QueryListenOptions::default())
                .await
                .map_err(|e| err("listen")(&e))?;
            let requester = broker.query_connection(&config);
            let request = query_request();
            for _ in 0..total {
                let reply = requester
                    .request(request.clone())
                    .await
                    .map_err(|e| err("request")(&e))?;
                black_box(reply);
            }
            listener.stop(Duration::from_secs(5)).await;
        }
        "query-nats" => {
            let serving = ce_messaging::NatsQueries::connect(&config)
                .await
                .map_err(|e| err("connect")(&e))?;
            let listener = serving
                .listen(query_handlers(), QueryListenOptions::default())
                .await
                .map_err(|e| err("listen")(&e))?;
            let requester = ce_messaging::NatsQueries::connect(&config)
                .await
                .map_err(|e| err("connect")(&e))?;
            let request = query_request();
            for _ in 0..total {
                let reply = requester
                    .request(request.clone())
                    .await
                    .map_err(|e| err("request")(&e))?;
                black_box(reply);
            }
            listener.stop(Duration::from_secs(5)).await;
            requester.close().await;
            serving.close().await;
        }
        "query-nats-raw" => {
            use futures::StreamExt;
            let encoded =
                encode(&query_request(), ContentMode::Structured).map_err(|e| err("encode")(&e))?;
            let headers = encoded.headers.to_header_map();
            let responder = async_nats::connect(&config.nats_url)
                .await
                .map_err(|e| err("connect")(&e))?;
            let mut sub = responder
                .subscribe(RAW_QUERY_SUBJECT)
                .await
                .map_err(|e| err("subscribe")(&e))?;
            let echo = tokio::spawn(async move {
                while let Some(message) = sub.next().await {
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
            let client = async_nats::connect(&config.nats_url)
                .await
                .map_err(|e| err("connect")(&e))?;
            for _ in 0..total {
                let reply = client
                    .request_with_headers(
                        RAW_QUERY_SUBJECT,
                        headers.clone(),
                        encoded.payload.clone(),
                    )
                    .await
                    .map_err(|e| err("raw request")(&e))?;
                black_box(reply);
            }
            echo.abort();
        }
        "publish-memory" => {
            let broker = ce_messaging::MemoryBroker::new();
            let events = broker.event_connection(&config);
            events.init_stream().await.map_err(|e| err("stream")(&e))?;
            for _ in 0..total {
                let ack = events
                    .publish(bench_event())
                    .await
                    .map_err(|e| err("publish")(&e))?;
                black_box(ack);
            }
        }
        "publish-memory-promise" => {
            // `publish-memory` while an event source listens for a transaction id none of the
            // events carries (a promise of responses of any type): the difference is what the
            // source spends on each event that is not for it. One event with the awaited id
            // ends the run, after every other one (the source reads them in order).
            use ce_messaging::event::TransactionId;
            use ce_messaging::event_source::EventFilter;
            let broker = ce_messaging::MemoryBroker::new();
            let events = broker.event_connection(&config);
            events.init_stream().await.map_err(|e| err("stream")(&e))?;
            let awaited = TransactionId::generate();
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let source = events.event_source();
            source
                .add_listener(EventFilter::by_transaction(awaited.clone()), move |event| {
                    let _ = tx.try_send(event);
                })
                .await
                .map_err(|e| err("listen")(&e))?;
            for _ in 0..total {
                let ack = events
                    .publish(bench_event())
                    .await
                    .map_err(|e| err("publish")(&e))?;
                black_box(ack);
            }
            let mut last = bench_event();
            last.set_transaction_id(&awaited);
            events.publish(last).await.map_err(|e| err("publish")(&e))?;
            tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .map_err(|_| "the awaited event did not arrive".to_owned())?
                .ok_or("the source stopped")?;
        }
        "publish-nats" => {
            let events = ce_messaging::JetStreamEvents::connect(&config)
                .await
                .map_err(|e| err("connect")(&e))?;
            events.init_stream().await.map_err(|e| err("stream")(&e))?;
            for _ in 0..total {
                let ack = events
                    .publish(bench_event())
                    .await
                    .map_err(|e| err("publish")(&e))?;
                black_box(ack);
            }
            events.close().await;
        }
        "publish-nats-raw" => {
            // The stream exists once `publish-nats` or this has run: created here the same way.
            let events = ce_messaging::JetStreamEvents::connect(&config)
                .await
                .map_err(|e| err("connect")(&e))?;
            events.init_stream().await.map_err(|e| err("stream")(&e))?;
            let encoded =
                encode(&bench_event(), ContentMode::Structured).map_err(|e| err("encode")(&e))?;
            let headers = encoded.headers.to_header_map();
            let client = async_nats::connect(&config.nats_url)
                .await
                .map_err(|e| err("connect")(&e))?;
            let js = async_nats::jetstream::new(client);
            let subject = format!("{}.{EVENT_TYPE}", config.js_subject_prefix);
            for _ in 0..total {
                let ack = js
                    .publish_with_headers(subject.clone(), headers.clone(), encoded.payload.clone())
                    .await
                    .map_err(|e| err("raw publish")(&e))?
                    .await
                    .map_err(|e| err("raw PubAck")(&e))?;
                black_box(ack);
            }
            events.close().await;
        }
        "query-responder" => {
            let serving = ce_messaging::NatsQueries::connect(&config)
                .await
                .map_err(|e| err("connect")(&e))?;
            let counted = Counted::new(total);
            let handlers = QueryHandlers::new().on(QUERY_TYPE, {
                let counted = counted.clone();
                handler_fn(move |request: ReceivedEvent, reply| {
                    let counted = counted.clone();
                    async move {
                        let data: serde_json::Value = request.data_as()?;
                        reply.reply_data(REPLY_TYPE, &data).await?;
                        counted.one();
                        Ok(())
                    }
                })
            });
            let listener = serving
                .listen(handlers, QueryListenOptions::default())
                .await
                .map_err(|e| err("listen")(&e))?;
            counted.all().await?;
            listener.stop(Duration::from_secs(5)).await;
            serving.close().await;
        }
        "query-responder-hand" => {
            use futures::StreamExt;
            let client = async_nats::connect(&config.nats_url)
                .await
                .map_err(|e| err("connect")(&e))?;
            let mut requests = client
                .subscribe(QUERY_TYPE)
                .await
                .map_err(|e| err("subscribe")(&e))?;
            client.flush().await.map_err(|e| err("flush")(&e))?;
            for _ in 0..total {
                let message = requests.next().await.ok_or("the subscription ended")?;
                let reply_to = message.reply.ok_or("a request without a reply subject")?;
                let request = decode(message.headers.as_ref(), &message.payload)
                    .map_err(|e| err("decode")(&e))?;
                // What the library reads of a request too: its type (to find the handler) and
                // its transaction id (which the reply carries).
                black_box(request.ty());
                let tid = request
                    .transaction_id()
                    .ok_or("a request without a transaction id")?;
                let data: serde_json::Value = request.data_as().map_err(|e| err("data")(&e))?;
                let reply = new_event_with_tid(REPLY_TYPE, HAND_SOURCE, &data, tid)
                    .map_err(|e| err("reply")(&e))?;
                let encoded =
                    encode(&reply, ContentMode::Structured).map_err(|e| err("encode")(&e))?;
                client
                    .publish_with_headers(reply_to, encoded.headers.into(), encoded.payload)
                    .await
                    .map_err(|e| err("publish")(&e))?;
            }
            client.flush().await.map_err(|e| err("flush")(&e))?;
        }
        "query-requester" => {
            let requester = ce_messaging::NatsQueries::connect(&config)
                .await
                .map_err(|e| err("connect")(&e))?;
            let request = query_request();
            for _ in 0..total {
                let reply = requester
                    .request(request.clone())
                    .await
                    .map_err(|e| err("request")(&e))?;
                black_box(reply.data_as::<serde_json::Value>().ok());
            }
            requester.close().await;
        }
        "query-requester-hand" => {
            let client = async_nats::connect(&config.nats_url)
                .await
                .map_err(|e| err("connect")(&e))?;
            let request = query_request();
            for _ in 0..total {
                let event = request.clone();
                let encoded =
                    encode(&event, ContentMode::Structured).map_err(|e| err("encode")(&e))?;
                let reply = client
                    .request_with_headers(QUERY_TYPE, encoded.headers.into(), encoded.payload)
                    .await
                    .map_err(|e| err("request")(&e))?;
                let reply = decode(reply.headers.as_ref(), &reply.payload)
                    .map_err(|e| err("decode")(&e))?;
                black_box(reply.data_as::<serde_json::Value>().ok());
            }
        }
        "consume-nats" => {
            // As `cemsg bench` scenario 5's library side: a durable listener whose handler
            // only counts; each event is decoded, handed to a worker, settled with an ack.
            use ce_messaging::events::{event_handler_fn, EventHandlers, EventListenOptions};
            let events = ce_messaging::JetStreamEvents::connect(&config)
                .await
                .map_err(|e| err("connect")(&e))?;
            let counted = Counted::new(total);
            let handlers = EventHandlers::new().on(EVENT_TYPE, {
                let counted = counted.clone();
                event_handler_fn(move |_, _| {
                    counted.one();
                    async { Ok(()) }
                })
            });
            let listener = events
                .listen(
                    handlers,
                    EventListenOptions {
                        durable_name: Some(CONSUME_DURABLE.into()),
                        pool: ce_messaging::WorkerOptions::new(CONSUME_WORKERS, CONSUME_BUFFER),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| err("listen")(&e))?;
            counted.all().await?;
            listener.stop(Duration::from_secs(5)).await;
            events.close().await;
        }
        "consume-nats-hand" => {
            // The same by hand: an async-nats pull consumer (same max ack pending), this
            // crate's `decode` of each event, the event dropped, a plain ack.
            use async_nats::jetstream::consumer::{pull, AckPolicy};
            use futures::StreamExt;
            let client = async_nats::connect(&config.nats_url)
                .await
                .map_err(|e| err("connect")(&e))?;
            let js = async_nats::jetstream::new(client);
            let stream = js
                .get_stream(&config.js_stream)
                .await
                .map_err(|e| err("stream")(&e))?;
            let consumer = stream
                .create_consumer(pull::Config {
                    durable_name: Some(CONSUME_HAND_DURABLE.into()),
                    ack_policy: AckPolicy::Explicit,
                    max_ack_pending: (CONSUME_WORKERS + CONSUME_BUFFER) as i64,
                    ..Default::default()
                })
                .await
                .map_err(|e| err("consumer")(&e))?;
            let mut messages = consumer.messages().await.map_err(|e| err("messages")(&e))?;
            for _ in 0..total {
                let message = tokio::time::timeout(Duration::from_secs(60), messages.next())
                    .await
                    .map_err(|_| "no event in 60 s".to_owned())?
                    .ok_or("the pull consumer ended")?
                    .map_err(|e| err("pulled")(&e))?;
                let event = decode(message.headers.as_ref(), &message.payload)
                    .map_err(|e| err("decode")(&e))?;
                // What the library reads of an event too: its type (to find the handler) and
                // its transaction id (for the handler's response writer).
                black_box((event.ty(), event.transaction_id()));
                black_box(event);
                message.ack().await.map_err(|e| err("ack")(&e))?;
            }
        }
        other => return Err(format!("unknown operation `{other}`")),
    }
    Ok(())
}

/// The durables of `consume-nats` and `consume-nats-hand` (deleted by the publisher peer
/// before each run, so that each reads exactly the events it stored).
const CONSUME_DURABLE: &str = "instructions-consume";
const CONSUME_HAND_DURABLE: &str = "instructions-consume-hand";
/// Workers and read-ahead of the consuming operations (as `cemsg bench` scenario 5).
const CONSUME_WORKERS: usize = 16;
const CONSUME_BUFFER: usize = 256;

/// The source of the hand-written responder's replies.
const HAND_SOURCE: &str = "bench-responder";

/// Counts a measured responder's answered requests; [`Counted::all`] returns once all came.
#[derive(Clone)]
struct Counted {
    total: u64,
    done: std::sync::Arc<(std::sync::atomic::AtomicU64, tokio::sync::Notify)>,
}

impl Counted {
    fn new(total: u64) -> Self {
        Counted {
            total,
            done: Default::default(),
        }
    }

    fn one(&self) {
        let (count, notify) = &*self.done;
        if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == self.total {
            notify.notify_one();
        }
    }

    async fn all(&self) -> Result<(), String> {
        tokio::time::timeout(Duration::from_secs(600), self.done.1.notified())
            .await
            .map_err(|_| "the peer's requests did not all come in 600 s".to_owned())
    }
}

// ---------------------------------------------------------------------------------------------
// The peer of a one-side operation, outside valgrind.

fn peer(role: &str, n: u64) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = runtime.block_on(async {
        let url = config().nats_url;
        let client = async_nats::ConnectOptions::new()
            .request_timeout(Some(Duration::from_secs(120)))
            .connect(&url)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        match role {
            "responder" => peer_responder(client).await,
            "requester" => peer_requester(client, WARM_UP + n).await,
            "publisher" => peer_publisher(client, WARM_UP + n).await,
            other => Err(format!("unknown peer role `{other}`")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peer {role}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Answers every request with the same reply event (with a transaction id, as the library's
/// replies carry one), encoded once; says `ready` once subscribed.
async fn peer_responder(client: async_nats::Client) -> Result<(), String> {
    use futures::StreamExt;
    use std::io::Write;
    let mut reply = new_event(REPLY_TYPE, HAND_SOURCE, &serde_json::json!({"workspace": "w-123", "user": "alice", "fields": ["name", "size", "owner"]}))
        .map_err(|e| format!("reply: {e}"))?;
    reply.set_transaction_id(&ce_messaging::event::TransactionId::generate());
    let encoded = encode(&reply, ContentMode::Structured).map_err(|e| format!("encode: {e}"))?;
    let headers = encoded.headers.to_header_map();
    let mut requests = client
        .subscribe(QUERY_TYPE)
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    client.flush().await.map_err(|e| format!("flush: {e}"))?;
    println!("ready");
    let _ = std::io::stdout().flush();
    while let Some(message) = requests.next().await {
        if let Some(reply_to) = message.reply {
            client
                .publish_with_headers(reply_to, headers.clone(), encoded.payload.clone())
                .await
                .map_err(|e| format!("publish: {e}"))?;
        }
    }
    Ok(())
}

/// Empties the stream, deletes the consuming operations' durables and stores `total` events
/// (the bench event as the library publishes it, structured, each with its own
/// `Nats-Msg-Id`), with acks pipelined; returns once all are stored.
async fn peer_publisher(client: async_nats::Client, total: u64) -> Result<(), String> {
    let config = config();
    let events = ce_messaging::JetStreamEvents::connect(&config)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    events
        .init_stream()
        .await
        .map_err(|e| format!("stream: {e}"))?;
    events.close().await;
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(&config.js_stream)
        .await
        .map_err(|e| format!("get stream: {e}"))?;
    for durable in [CONSUME_DURABLE, CONSUME_HAND_DURABLE] {
        // Absent on the first run: nothing to delete.
        let _ = stream.delete_consumer(durable).await;
    }
    stream.purge().await.map_err(|e| format!("purge: {e}"))?;
    let encoded =
        encode(&bench_event(), ContentMode::Structured).map_err(|e| format!("encode: {e}"))?;
    let subject = format!("{}.{EVENT_TYPE}", config.js_subject_prefix);
    let run = xid::new().to_string();
    let mut acks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let mut headers = encoded.headers.to_header_map();
        headers.insert("Nats-Msg-Id", format!("{run}-{i}").as_str());
        let ack = js
            .publish_with_headers(subject.clone(), headers, encoded.payload.clone())
            .await
            .map_err(|e| format!("publish: {e}"))?;
        acks.push(ack);
    }
    for ack in acks {
        tokio::time::timeout(
            Duration::from_secs(60),
            std::future::IntoFuture::into_future(ack),
        )
        .await
        .map_err(|_| "no PubAck in 60 s".to_owned())?
        .map_err(|e| format!("PubAck: {e}"))?;
    }
    Ok(())
}

/// Sends `total` requests one after the other, the same bytes each time: the request as the
/// library's requester sends it (structured, a transaction id, `Request-Timeout-Ms`). Waits
/// (retrying on no-responders) until the measured responder subscribed.
async fn peer_requester(client: async_nats::Client, total: u64) -> Result<(), String> {
    let mut request = query_request();
    request.set_transaction_id(&ce_messaging::event::TransactionId::generate());
    let encoded = encode(&request, ContentMode::Structured).map_err(|e| format!("encode: {e}"))?;
    let mut headers = encoded.headers.to_header_map();
    headers.insert(ce_messaging::headers::REQUEST_TIMEOUT_MS, "120000");
    let started = Instant::now();
    let mut answered = 0;
    while answered < total {
        match client
            .request_with_headers(QUERY_TYPE, headers.clone(), encoded.payload.clone())
            .await
        {
            Ok(_) => answered += 1,
            Err(e)
                if answered == 0
                    && e.kind() == async_nats::client::RequestErrorKind::NoResponders
                    && started.elapsed() < Duration::from_secs(120) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(format!("request {answered}: {e}")),
        }
    }
    Ok(())
}
