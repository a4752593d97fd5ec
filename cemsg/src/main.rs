//! `cemsg`: a CloudEvents-aware command line for NATS, built on ce-messaging's public API.
//!
//! Commands: `stream init`, `publish`, `listen`, `request`, `reply`, `deadletter list`, `bench`,
//! `deadletter replay`, `consumer info`. Configuration comes from the `NATS_*` environment variables of the wire
//! contract; flags override. Results go to stdout as one JSON line each; errors go to stderr as
//! one line and set the exit code documented in `cemsg --help` (see [`fail`]).
#![forbid(unsafe_code)]

mod bench;
mod consumer;
mod deadletter;
mod events;
mod fail;
mod output;
mod queries;
mod schedule;

use std::process::ExitCode;

use ce_messaging::codec::ContentMode;
use ce_messaging::config::Config;
use clap::{Args, Parser, Subcommand};

use crate::fail::{Failure, EXIT_USAGE};

const TOP_HELP: &str = "\
Configuration:
  The NATS_* environment variables of the wire contract (NATS_URL, NATS_CLIENT_ID,
  NATS_DURABLE_NAME, NATS_JS_STREAM, NATS_JS_SUBJECT_PREFIX, NATS_JS_DLQ_STREAM,
  NATS_REQUEST_TIMEOUT, NATS_EVENTS_TIMEOUT, NATS_CE_MODE, credentials, ...). Flags override.

Output:
  Results are printed on stdout, one JSON line each; errors on stderr, one line.

Exit codes:
  0  success
  1  usage or configuration error (bad flag, bad NATS_* value, --data not JSON)
  2  connection error (server unreachable, credentials refused, connection closed)
  3  timeout (no reply, no ack in time)
  4  no responders (nobody serves the query op)
  5  remote error (the responder answered with an error; code and text on stderr)
  6  not found (stream or dead letter missing)
  7  refused or failed otherwise (event too large, server error, undecodable reply)

Example:
  nats-server -js &
  cemsg stream init
  cemsg publish org.example.order.created --data '{\"id\":1}'
  cemsg listen org.example.order.created --count 1";

/// A CloudEvents-aware command line for NATS (ce-messaging).
#[derive(Debug, Parser)]
#[command(name = "cemsg", version, after_help = TOP_HELP)]
struct Cli {
    /// NATS server URL(s), comma-separated; overrides NATS_URL.
    #[arg(short, long, global = true, value_name = "URL")]
    server: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the JetStream streams.
    #[command(subcommand, after_help = "Example:\n  cemsg stream init")]
    Stream(StreamCommand),
    /// Publish events on JetStream and wait for the server's ack.
    #[command(after_help = "\
Prints one JSON line per event: {\"id\":..,\"stream\":..,\"seq\":..,\"duplicate\":..}.
With --count N, N events with distinct ids are published pipelined; a progress counter is shown
on stderr when it is a terminal.

Examples:
  cemsg publish org.example.order.created --data '{\"id\":1}'
  cemsg publish org.example.order.created --data '{\"id\":1}' --id order-1   # twice: duplicate
  cemsg publish org.example.tick --count 10000
  cemsg publish org.example.invoice.reminder --data '{\"id\":7}' --in 1h   # deferred
  cemsg publish org.example.report.due --every 5m                          # recurring
  cemsg publish org.example.backup.run --cron '0 0 2 * * *'                # cron (UTC)
  cemsg publish org.example.quote.given --data '{\"price\":1}' --ttl 30s    # expiring

A scheduled event's id is its schedule id (`cemsg schedule list | cancel`); the stream needs
`cemsg stream init` on nats-server 2.12+ (--at/--in), 2.14+ (--every/--cron), 2.11+ (--ttl).")]
    Publish(events::PublishArgs),
    /// List or cancel the schedules of deferred and recurring events (publish --at/--in/--every/--cron).
    #[command(
        subcommand,
        after_help = "Examples:\n  cemsg schedule list\n  cemsg schedule cancel cloudevent-cn2v7q3p0ck7s1ka8n0g"
    )]
    Schedule(ScheduleCommand),
    /// Handle events on a durable consumer and print each as a structured CloudEvents JSON line.
    #[command(after_help = "\
Each event is printed as one line of structured CloudEvents JSON on stdout, then acked.
Without --count or --idle, runs until Ctrl-C. Events pulled but not printed when it stops are
handed back to the server (redelivered; this counts as a delivery).
The durable name is --durable, else NATS_DURABLE_NAME, else \"cemsg\".
A durable this command creates starts at --start, else NATS_JS_START_POSITION, else `new`:
only events published from now on (use --start all for the stream's history). An existing
durable keeps its position.

Example:
  cemsg listen org.example.order.created org.example.order.shipped --durable audit --count 5")]
    Listen(events::ListenArgs),
    /// Send a query (core NATS request/reply) and print the reply event (or every reply).
    #[command(after_help = "\
Prints the reply as one JSON line. A timeout (exit 3), no responders (exit 4) or an error reply
(exit 5) prints a one-line reason on stderr. A replier that answers with an empty reply stream
prints nothing (exit 0).
With --stream, prints every reply of the replier's reply stream; with --gather, every reply of
every replier until --max, --stall or the deadline (--timeout). An error reply of one replier
does not stop the others; the exit code and the line on stderr are those of the first error, 0
when every item was a reply.

Examples:
  cemsg request cyverse.workspace.get --data '{\"name\":\"w1\"}' --timeout 5
  cemsg request cyverse.workspace.list --stream
  cemsg request cyverse.health.ping --gather --max 10 --stall 0.5 --timeout 3")]
    Request(queries::RequestArgs),
    /// Serve a query op: answer each request with an event of type `<op>.reply`.
    #[command(after_help = "\
Prints each request as one JSON line, then answers it with an event of type <op>.reply that
carries --data (or, without --data, the request's data) and the request's transaction id.
Runs until Ctrl-C, or until --count requests were answered.

Example:
  cemsg reply cyverse.workspace.get --data '{\"name\":\"w1\",\"size\":42}' --count 1")]
    Reply(queries::ReplyArgs),
    /// Inspect and replay dead letters.
    #[command(
        subcommand,
        after_help = "Examples:\n  cemsg deadletter list --limit 20\n  cemsg deadletter replay --seq 42"
    )]
    Deadletter(DeadletterCommand),
    /// Inspect durable consumers.
    #[command(subcommand, after_help = "Example:\n  cemsg consumer info billing")]
    Consumer(ConsumerCommand),
    /// Measure the library against hand-written async-nats + cloudevents-sdk code and raw
    /// async-nats, side by side.
    #[command(after_help = "\
Scenarios: 1 query latency (sequential p50/p99), 2 query throughput (64 concurrent requesters,
listener worker pool), 3 event publish one by one, 4 event publish pipelined, 5 event listen +
ack, 6 codec encode/decode per content mode (one core), 7 slow consumer (peak RSS of a listening
child process). Each runs three sides in alternating rounds: library, hand-written
(async-nats + cloudevents-sdk serde) and raw (async-nats bytes, no CloudEvents work), and
reports the medians and both ratios (library / hand-written, library / raw). The bench runs on
a runtime of --threads worker threads (default: the machine's cores). The JetStream scenarios
use their own streams (CEMSG_BENCH, CEMSG_BENCH_DLQ) and delete them at the end.

Examples:
  cemsg bench --spawn-server
  cemsg bench --spawn-server --json --scenarios 1,2
  NATS_URL=nats://127.0.0.1:4222 cemsg bench --backlog 1000000")]
    Bench(bench::BenchArgs),
    /// The listening process of `bench` scenario 7.
    #[command(hide = true)]
    BenchListen(bench::ListenChildArgs),
}

#[derive(Debug, Subcommand)]
enum StreamCommand {
    /// Create or update the events stream and the dead-letter stream; prints what it did.
    #[command(after_help = "\
Prints one JSON line per stream: {\"stream\":..,\"action\":\"created\"|\"updated\"|\"unchanged\",
\"subjects\":[..]}. An existing stream keeps its other subjects and limits.

Example:
  NATS_JS_STREAM=ORDERS NATS_JS_SUBJECT_PREFIX=orders cemsg stream init")]
    Init,
}

#[derive(Debug, Subcommand)]
enum DeadletterCommand {
    /// List dead letters (oldest first): reason, error, original subject, delivery count.
    #[command(after_help = "\
Prints one JSON line per dead letter: {\"seq\",\"durable\",\"reason\",\"error\",\"subject\",
\"deliveries\",\"stream\",\"stream_seq\",\"id\",\"type\",\"time\",\"payload\",\"size\"} (seq: in the
dead-letter stream, for replay; subject, stream and stream_seq: where it came from; id and type:
null when it is not a CloudEvent; payload: \"kept\", or \"omitted\" for a reference dead letter whose
original was too large to copy, replayed from the events stream while it holds it; size: the
original's bytes, for a reference).

Example:
  cemsg deadletter list --limit 20 --durable billing")]
    List(deadletter::ListArgs),
    /// Republish dead letters to their original subjects and remove them once acked.
    #[command(after_help = "\
Republishes the original headers and payload (the CloudEvent id is unchanged) with
Nats-Msg-Id: <original id>.replay.<dead-letter seq>, then deletes the dead letter.
Prints one JSON line per replay. Replaying twice loses nothing: a replayed dead letter is gone
(--seq: exit 6, --all: nothing to replay); one whose republish was stored but not deleted is
reported as a duplicate and then deleted. Every durable consumer of the original subject gets
the republished event. A replay lands only in the dead letter's original events stream: when
another stream holds the subject now, it is refused (exit 7, the dead letter kept) unless
--to-stream names that stream. A reference dead letter whose original the events stream no
longer holds cannot be replayed (exit 6, kept).

Examples:
  cemsg deadletter replay --seq 42
  cemsg deadletter replay --all --durable billing
  cemsg deadletter replay --seq 42 --to-stream ORDERS_V2")]
    Replay(deadletter::ReplayArgs),
}

#[derive(Debug, Subcommand)]
enum ScheduleCommand {
    /// The schedules the events stream keeps.
    #[command(after_help = "\
Prints one JSON line per schedule: {\"id\",\"schedule\",\"target\",\"type\",\"ttl\",\"time_zone\",
\"created\"} (id: the id of the event it was published with, the one to cancel; schedule: the
Nats-Schedule value, @at ..., @every ... or a cron expression; target: the subject firings are
stored on). One-shot schedules are listed until they fire, recurring ones until cancelled.

Example:
  cemsg schedule list")]
    List,
    /// Cancel a schedule: it fires no more.
    #[command(after_help = "\
Prints {\"id\",\"cancelled\":true}. No such schedule (never made, already fired, cancelled): exit 6.

Example:
  cemsg schedule cancel cloudevent-cn2v7q3p0ck7s1ka8n0g")]
    Cancel(schedule::CancelArgs),
}

#[derive(Debug, Subcommand)]
enum ConsumerCommand {
    /// The state of a durable consumer: pending, ack pending, redelivered, ack floor, last
    /// delivered, and events parked at the server's delivery limit.
    #[command(after_help = "\
Prints one JSON line: {\"stream\",\"durable\",\"filter_subjects\",\"pending\",\"ack_pending\",
\"redelivered\",\"ack_floor\",\"last_delivered\",\"deliveries\",\"max_deliver\",\"parked\"}
(pending: stored events of its types never delivered; ack_pending: delivered, not yet acked or
terminated; redelivered: delivered more than once and not settled; ack_floor and last_delivered:
stream sequences; deliveries: made in total; parked: events the server stopped delivering at
max_deliver without an ack, which are in no dead-letter stream (num_redelivered minus
num_ack_pending of the server's consumer info: exact when nothing is ack pending); a note on
stderr when it is not 0). A missing stream or durable exits 6.

Example:
  cemsg consumer info billing")]
    Info(consumer::InfoArgs),
}

/// Options shared by commands that send events.
#[derive(Debug, Args, Clone, Default)]
struct ModeArgs {
    /// Send in binary content mode (attributes as ce-* headers) instead of structured.
    #[arg(long)]
    binary: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return fail::clap_exit(err),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            return Failure::new(fail::EXIT_OTHER, format!("cannot start the runtime: {err}"))
                .report()
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let mut config = Config::from_env().map_err(|e| Failure::new(EXIT_USAGE, e.to_string()))?;
    if let Some(server) = cli.server {
        config.nats_url = server;
        config
            .validate()
            .map_err(|e| Failure::new(EXIT_USAGE, format!("--server: {e}")))?;
    }
    match cli.command {
        Command::Stream(StreamCommand::Init) => events::stream_init(&config).await,
        Command::Publish(args) => events::publish(config, args).await,
        Command::Schedule(ScheduleCommand::List) => schedule::list(&config).await,
        Command::Schedule(ScheduleCommand::Cancel(args)) => schedule::cancel(&config, args).await,
        Command::Listen(args) => events::listen(config, args).await,
        Command::Request(args) => queries::request(config, args).await,
        Command::Reply(args) => queries::reply(config, args).await,
        Command::Deadletter(DeadletterCommand::List(args)) => deadletter::list(&config, args).await,
        Command::Deadletter(DeadletterCommand::Replay(args)) => {
            deadletter::replay(&config, args).await
        }
        Command::Consumer(ConsumerCommand::Info(args)) => consumer::info(&config, args).await,
        Command::Bench(args) => bench::run(config, args).await,
        Command::BenchListen(args) => bench::listen_child(config, args).await,
    }
}

/// Applies `--binary` to the configuration.
fn with_mode(mut config: Config, mode: &ModeArgs) -> Config {
    if mode.binary {
        config.ce_mode = ContentMode::Binary;
    }
    config
}

/// Parses `--data` as JSON.
fn parse_data(data: Option<&str>) -> Result<Option<serde_json::Value>, Failure> {
    data.map(|text| {
        serde_json::from_str(text)
            .map_err(|e| Failure::new(EXIT_USAGE, format!("--data is not valid JSON: {e}")))
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn replay_needs_exactly_one_of_seq_and_all() {
        for argv in [
            vec!["cemsg", "deadletter", "replay"],
            vec!["cemsg", "deadletter", "replay", "--seq", "1", "--all"],
        ] {
            let err = Cli::try_parse_from(argv.clone()).expect_err("must be refused");
            assert_ne!(err.exit_code(), 0, "{argv:?}");
        }
        assert!(Cli::try_parse_from(["cemsg", "deadletter", "replay", "--all"]).is_ok());
    }

    #[test]
    fn bench_takes_a_list_of_known_scenarios() {
        assert!(Cli::try_parse_from(["cemsg", "bench", "--json", "--scenarios", "1,7"]).is_ok());
        let err = Cli::try_parse_from(["cemsg", "bench", "--scenarios", "8"]).unwrap_err();
        assert_ne!(err.exit_code(), 0);
    }

    #[test]
    fn data_must_be_json() {
        assert!(parse_data(Some("{\"a\":1}")).unwrap().is_some());
        assert!(parse_data(None).unwrap().is_none());
        let err = parse_data(Some("{not json")).unwrap_err();
        assert_eq!(err.code, EXIT_USAGE);
    }
}
