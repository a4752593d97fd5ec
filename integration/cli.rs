//! The `cemsg` binary against real nats-server processes: publish -> listen round trip,
//! request <-> reply, dead-letter list and replay of a dead-lettered event that then gets
//! handled, and the exit code of each kind of failure.
//!
//! Every child process is waited for with a timeout and killed when its handle is dropped
//! (also when a test panics). No sleep is used to synchronise.

use ce_messaging_test_support as support;

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use ce_messaging::config::Config;
use ce_messaging::events::{event_handler_fn, EventConnection, EventHandlers, EventListenOptions};
use ce_messaging::handler::HandlerError;
use ce_messaging::jetstream::JetStreamEvents;
use ce_messaging::nats::NatsQueries;
use ce_messaging::query::{handler_fn, QueryConnection, QueryHandlers, QueryListenOptions};
use serde_json::{json, Value};
use support::server::{NatsServer, ServerOptions};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::sync::mpsc;

/// The longest any one command may take.
const WAIT: Duration = Duration::from_secs(30);
const ORDER_CREATED: &str = "org.example.order.created";
const WORKSPACE_GET: &str = "cyverse.workspace.get";

/// What a finished `cemsg` run left.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The stdout lines parsed as JSON.
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"))
            })
            .collect()
    }

    fn success(self) -> Run {
        assert_eq!(self.code, 0, "cemsg failed: {self:?}");
        self
    }

    /// Asserts the exit code and that stderr is one line without a panic or backtrace.
    fn fails_with(self, code: i32) -> Run {
        assert_eq!(self.code, code, "unexpected exit code: {self:?}");
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "stderr must be one line: {self:?}"
        );
        assert!(self.stderr.starts_with("cemsg: "), "{self:?}");
        assert!(!self.stderr.contains("panicked") && !self.stderr.contains("backtrace"));
        assert!(self.stdout.is_empty(), "{self:?}");
        self
    }
}

/// A `cemsg` command with a clean NATS_* environment pointing at `url`.
fn cemsg(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cemsg"));
    for (key, _) in std::env::vars() {
        if key.starts_with("NATS_") {
            command.env_remove(key);
        }
    }
    command
        .env("NATS_URL", url)
        .env("NATS_CLIENT_ID", "cemsg-test")
        // The tests publish, then listen on new durables and expect those events: explicitly
        // from the stream's start (`cemsg listen` alone starts new durables at `new`;
        // `listen_starts_new_durables_at_new_events` covers that default).
        .env("NATS_JS_START_POSITION", "all")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs a command to its end (killed after [`WAIT`]).
async fn run(mut command: Command) -> Run {
    let child = command.spawn().expect("spawn cemsg");
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("cemsg did not finish within {WAIT:?}: {command:?}"))
        .expect("wait for cemsg");
    Run {
        code: output.status.code().expect("cemsg ended by a signal"),
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

async fn cemsg_ok(url: &str, args: &[&str]) -> Vec<Value> {
    run(cemsg(url, args)).await.success().json_lines()
}

/// A long-running `cemsg` (listen, reply) whose lines are read as they come.
struct Running {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Lines<BufReader<ChildStderr>>,
}

impl Running {
    fn start(mut command: Command) -> Running {
        let mut child = command.spawn().expect("spawn cemsg");
        let stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        let stderr = BufReader::new(child.stderr.take().expect("piped")).lines();
        Running {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for the next stderr line, which must contain `text` (the readiness note).
    async fn expect_note(&mut self, text: &str) {
        let line = tokio::time::timeout(WAIT, self.stderr.next_line())
            .await
            .expect("no stderr line in time")
            .expect("read stderr")
            .expect("stderr ended");
        assert!(line.contains(text), "expected {text:?} in {line:?}");
    }

    async fn next_json(&mut self) -> Value {
        let line = tokio::time::timeout(WAIT, self.stdout.next_line())
            .await
            .expect("no stdout line in time")
            .expect("read stdout")
            .expect("stdout ended");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"))
    }

    /// Waits for the exit; returns the code and whatever stdout still had.
    async fn finish(mut self) -> (i32, Vec<String>) {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("cemsg did not exit in time")
            .expect("wait");
        let mut rest = Vec::new();
        while let Some(line) = tokio::time::timeout(WAIT, self.stdout.next_line())
            .await
            .expect("stdout not closed in time")
            .expect("read stdout")
        {
            rest.push(line);
        }
        (status.code().expect("ended by a signal"), rest)
    }
}

/// A server with both streams created by `cemsg stream init`.
async fn server_with_streams() -> NatsServer {
    let server = NatsServer::start();
    let lines = cemsg_ok(&server.url(), &["stream", "init"]).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    server
}

fn config_for(server: &NatsServer, client_id: &str) -> Config {
    Config {
        nats_url: server.url(),
        client_id: client_id.to_owned(),
        ..Default::default()
    }
}

async fn events_stream_messages(server: &NatsServer) -> u64 {
    let js = async_nats::jetstream::new(support::connect(server.url()).await);
    let mut stream = js.get_stream("CLOUDEVENTS").await.expect("events stream");
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test]
async fn every_command_has_help_with_an_example() {
    let commands: [&[&str]; 15] = [
        &[],
        &["schedule"],
        &["schedule", "list"],
        &["schedule", "cancel"],
        &["stream"],
        &["stream", "init"],
        &["publish"],
        &["listen"],
        &["request"],
        &["reply"],
        &["deadletter"],
        &["deadletter", "list"],
        &["deadletter", "replay"],
        &["consumer"],
        &["consumer", "info"],
    ];
    for command in commands {
        let mut args = command.to_vec();
        args.push("--help");
        let help = run(cemsg("nats://127.0.0.1:1", &args)).await.success();
        assert!(help.stdout.contains("Example"), "{args:?}: {}", help.stdout);
        assert!(help.stdout.contains("Usage: cemsg"), "{args:?}");
    }
    let top = run(cemsg("nats://127.0.0.1:1", &["--help"]))
        .await
        .success();
    for code in 0..=7 {
        assert!(
            top.stdout.contains(&format!("\n  {code}  ")),
            "exit code {code} documented"
        );
    }
}

#[tokio::test]
async fn stream_init_says_what_it_did() {
    let server = NatsServer::start();
    let url = server.url();
    let first = cemsg_ok(&url, &["stream", "init"]).await;
    let summary: Vec<(String, String)> = first
        .iter()
        .map(|l| {
            (
                l["stream"].as_str().unwrap().into(),
                l["action"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("CLOUDEVENTS".to_string(), "created".to_string()),
            ("DEADLETTER".to_string(), "created".to_string())
        ]
    );
    assert_eq!(
        first[0]["subjects"],
        json!(["events.>", "_CE_SCHEDULE.CLOUDEVENTS.>"])
    );
    assert_eq!(first[1]["subjects"], json!(["deadletter.CLOUDEVENTS.>"]));
    let again = cemsg_ok(&url, &["stream", "init"]).await;
    assert!(
        again.iter().all(|l| l["action"] == "unchanged"),
        "{again:?}"
    );
    // A changed setting updates the existing stream in place.
    let mut command = cemsg(&url, &["stream", "init"]);
    command.env("NATS_JS_DUPLICATE_WINDOW", "30");
    let updated = run(command).await.success().json_lines();
    assert!(
        updated.iter().all(|l| l["action"] == "updated"),
        "{updated:?}"
    );
    assert_eq!(updated[0]["duplicate_window_secs"], 30);
}

#[tokio::test]
async fn publish_then_listen_round_trip() {
    let server = server_with_streams().await;
    let url = server.url();
    let mut published = Vec::new();
    for (n, binary) in [(1, false), (2, true), (3, false)] {
        let data = json!({ "n": n }).to_string();
        let mut args = vec!["publish", ORDER_CREATED, "--data", data.as_str()];
        if binary {
            args.push("--binary");
        }
        let line = cemsg_ok(&url, &args).await;
        assert_eq!(line.len(), 1);
        assert_eq!(line[0]["stream"], "CLOUDEVENTS");
        assert_eq!(line[0]["duplicate"], false);
        published.push(line[0]["id"].as_str().unwrap().to_owned());
    }
    // The same id again within the duplicate window is a duplicate, not a new event.
    let first = cemsg_ok(
        &url,
        &[
            "publish",
            ORDER_CREATED,
            "--id",
            &published[0],
            "--data",
            "{\"n\":1}",
        ],
    )
    .await;
    assert_eq!(first[0]["duplicate"], true);
    assert_eq!(events_stream_messages(&server).await, 3);

    let run_listen = run(cemsg(
        &url,
        &[
            "listen",
            ORDER_CREATED,
            "--durable",
            "audit",
            "--count",
            "3",
        ],
    ))
    .await
    .success();
    let events = run_listen.json_lines();
    let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        published.iter().map(String::as_str).collect::<Vec<_>>()
    );
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["type"], ORDER_CREATED);
        assert_eq!(
            event["source"], "cemsg-test",
            "source filled from NATS_CLIENT_ID"
        );
        assert_eq!(event["data"], json!({ "n": i + 1 }));
        assert!(event["transactionid"].as_str().unwrap().starts_with("tid-"));
    }
    // They were acked after printing: the durable has nothing left.
    let rest = run(cemsg(
        &url,
        &["listen", ORDER_CREATED, "--durable", "audit", "--idle", "1"],
    ))
    .await
    .success();
    assert_eq!(rest.stdout, "", "acked events must not come again");
    // Another durable gets every event.
    let other = cemsg_ok(
        &url,
        &[
            "listen",
            ORDER_CREATED,
            "--durable",
            "billing",
            "--count",
            "3",
        ],
    )
    .await;
    assert_eq!(other.len(), 3);
}

#[tokio::test]
async fn listen_count_hands_back_what_it_did_not_print() {
    let server = server_with_streams().await;
    let url = server.url();
    let mut ids = Vec::new();
    for n in 0..4 {
        let line = cemsg_ok(&url, &["publish", ORDER_CREATED, "--data", &n.to_string()]).await;
        ids.push(line[0]["id"].as_str().unwrap().to_owned());
    }
    let mut seen = Vec::new();
    for _ in 0..2 {
        // Default ack wait (30 s): what the listener pulled but did not print must come back
        // at once (nak on stop), well within this test's waits.
        let command = cemsg(
            &url,
            &[
                "listen",
                ORDER_CREATED,
                "--durable",
                "pager",
                "--count",
                "2",
            ],
        );
        let lines = run(command).await.success().json_lines();
        assert_eq!(lines.len(), 2);
        seen.extend(lines.iter().map(|l| l["id"].as_str().unwrap().to_owned()));
    }
    let seen: HashSet<_> = seen.into_iter().collect();
    assert_eq!(
        seen,
        ids.into_iter().collect::<HashSet<_>>(),
        "each event printed once"
    );
}

#[tokio::test]
async fn publish_count_pipelines_distinct_events() {
    let server = server_with_streams().await;
    let run = run(cemsg(
        &server.url(),
        &["publish", ORDER_CREATED, "--count", "500", "--data", "{}"],
    ))
    .await
    .success();
    let lines = run.json_lines();
    assert_eq!(lines.len(), 500);
    let ids: HashSet<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 500, "ids are distinct");
    assert!(lines.iter().all(|l| l["duplicate"] == false));
    // stderr is not a terminal here: a summary, no progress counter.
    assert!(!run.stderr.contains('\r'), "{:?}", run.stderr);
    assert!(
        run.stderr.contains("published 500 events"),
        "{:?}",
        run.stderr
    );
    assert_eq!(events_stream_messages(&server).await, 500);
}

#[tokio::test]
async fn request_and_reply() {
    let server = NatsServer::start();
    let url = server.url();
    let mut replier = Running::start(cemsg(
        &url,
        &[
            "reply",
            WORKSPACE_GET,
            "--count",
            "2",
            "--data",
            "{\"size\":42}",
        ],
    ));
    replier.expect_note("serving cyverse.workspace.get").await;

    let reply = cemsg_ok(
        &url,
        &[
            "request",
            WORKSPACE_GET,
            "--data",
            "{\"name\":\"w1\"}",
            "--tid",
            "tid-cli-test",
        ],
    )
    .await;
    assert_eq!(reply.len(), 1);
    assert_eq!(reply[0]["type"], "cyverse.workspace.get.reply");
    assert_eq!(reply[0]["data"], json!({ "size": 42 }));
    assert_eq!(reply[0]["transactionid"], "tid-cli-test");
    let request = replier.next_json().await;
    assert_eq!(request["type"], WORKSPACE_GET);
    assert_eq!(request["data"], json!({ "name": "w1" }));
    assert_eq!(request["transactionid"], "tid-cli-test");

    // Binary mode both ways.
    let reply = cemsg_ok(
        &url,
        &["request", WORKSPACE_GET, "--binary", "--data", "[1,2]"],
    )
    .await;
    assert_eq!(reply[0]["data"], json!({ "size": 42 }));
    let request = replier.next_json().await;
    assert_eq!(request["data"], json!([1, 2]));
    let (code, rest) = replier.finish().await;
    assert_eq!((code, rest.len()), (0, 0), "reply exits after --count");

    // Without --data the replier echoes the request's data.
    let mut echo = Running::start(cemsg(&url, &["reply", WORKSPACE_GET, "--count", "1"]));
    echo.expect_note("serving").await;
    let reply = cemsg_ok(
        &url,
        &["request", WORKSPACE_GET, "--data", "{\"echo\":true}"],
    )
    .await;
    assert_eq!(reply[0]["data"], json!({ "echo": true }));
    assert_eq!(echo.finish().await.0, 0);
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_into_a_handler() {
    let server = server_with_streams().await;
    let url = server.url();
    // A service that rejects orders until it is fixed.
    let config = config_for(&server, "picky");
    let events = JetStreamEvents::from_client(support::connect(server.url()).await, &config);
    let fixed = Arc::new(AtomicBool::new(false));
    let (handled_tx, mut handled_rx) = mpsc::channel::<String>(16);
    let handler_fixed = fixed.clone();
    let handlers = EventHandlers::new().on(
        ORDER_CREATED,
        event_handler_fn(move |event, _| {
            let fixed = handler_fixed.clone();
            let handled = handled_tx.clone();
            async move {
                if !fixed.load(Ordering::SeqCst) {
                    return Err(HandlerError::permanent("not today"));
                }
                handled.send(event.id().to_owned()).await.ok();
                Ok(())
            }
        }),
    );
    let options = EventListenOptions {
        durable_name: Some("picky".into()),
        pool: ce_messaging::WorkerOptions::new(1, 4),
        ..Default::default()
    };
    let listener = events.listen(handlers, options).await.expect("listen");

    let mut seqs = Vec::new();
    for id in ["order-7", "order-8", "order-9"] {
        let line = cemsg_ok(
            &url,
            &["publish", ORDER_CREATED, "--id", id, "--data", "{}"],
        )
        .await;
        seqs.push(line[0]["seq"].as_u64().unwrap());
    }
    // An undecodable message, dead-lettered by `cemsg listen` itself.
    let raw = support::connect(server.url()).await;
    let js = async_nats::jetstream::new(raw.clone());
    js.publish("events.org.example.garbage", "not an event".into())
        .await
        .expect("publish garbage")
        .await
        .expect("garbage stored");
    let garbage = run(cemsg(
        &url,
        &[
            "listen",
            "org.example.garbage",
            "--durable",
            "sink",
            "--idle",
            "1",
        ],
    ))
    .await
    .success();
    assert_eq!(garbage.stdout, "");

    let last_list = Arc::new(std::sync::Mutex::new(Vec::new()));
    support::eventually(WAIT, || {
        let url = url.clone();
        let last_list = last_list.clone();
        async move {
            let lines = cemsg_ok(&url, &["deadletter", "list"]).await;
            let complete = lines.len() == 4;
            *last_list.lock().unwrap() = lines;
            complete
        }
    })
    .await;
    let listed = last_list.lock().unwrap().clone();
    let rejected: Vec<&Value> = listed.iter().filter(|l| l["durable"] == "picky").collect();
    assert_eq!(rejected.len(), 3, "{listed:?}");
    for (line, (id, seq)) in rejected
        .iter()
        .zip(["order-7", "order-8", "order-9"].iter().zip(&seqs))
    {
        assert_eq!(line["reason"], "rejected");
        assert_eq!(line["error"], "not today");
        assert_eq!(line["subject"], format!("events.{ORDER_CREATED}"));
        assert_eq!(line["deliveries"], 1);
        assert_eq!(line["stream_seq"], *seq);
        assert_eq!(line["id"], *id);
        assert_eq!(line["type"], ORDER_CREATED);
    }
    let decode = listed
        .iter()
        .find(|l| l["durable"] == "sink")
        .expect("decode dead letter");
    assert_eq!(decode["reason"], "decode");
    assert_eq!(decode["id"], Value::Null);
    let only_picky = cemsg_ok(
        &url,
        &["deadletter", "list", "--durable", "picky", "--limit", "2"],
    )
    .await;
    assert_eq!(only_picky.len(), 2);
    assert_eq!(only_picky[0]["id"], "order-7");

    fixed.store(true, Ordering::SeqCst);
    // Replay one: republished with its own Nats-Msg-Id, handled, and gone from the stream.
    let seq7 = rejected[0]["seq"].as_u64().unwrap();
    let replayed = cemsg_ok(&url, &["deadletter", "replay", "--seq", &seq7.to_string()]).await;
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0]["msg_id"], format!("order-7.replay.{seq7}"));
    assert_eq!(replayed[0]["subject"], format!("events.{ORDER_CREATED}"));
    assert_eq!(
        (
            replayed[0]["duplicate"].clone(),
            replayed[0]["deleted"].clone()
        ),
        (json!(false), json!(true))
    );
    let handled = tokio::time::timeout(WAIT, handled_rx.recv())
        .await
        .expect("replayed event handled");
    assert_eq!(
        handled.as_deref(),
        Some("order-7"),
        "the CloudEvent id is unchanged"
    );
    // Replaying it again finds nothing and says so.
    let again = run(cemsg(
        &url,
        &["deadletter", "replay", "--seq", &seq7.to_string()],
    ))
    .await
    .fails_with(6);
    assert!(
        again.stderr.contains("already replayed"),
        "{}",
        again.stderr
    );

    // A replay interrupted after its republish (stored, dead letter not deleted yet) is
    // finished by replaying again: reported as a duplicate, not stored twice.
    let seq8 = rejected[1]["seq"].as_u64().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("order-8.replay.{seq8}").as_str());
    headers.insert("Content-Type", "application/cloudevents+json");
    let event8 = json!({"specversion":"1.0","id":"order-8","type":ORDER_CREATED,"source":"cemsg-test","data":{}});
    js.publish_with_headers(
        format!("events.{ORDER_CREATED}"),
        headers,
        event8.to_string().into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    let handled = tokio::time::timeout(WAIT, handled_rx.recv())
        .await
        .expect("order-8 handled");
    assert_eq!(handled.as_deref(), Some("order-8"));
    let stored_before = events_stream_messages(&server).await;

    let all = run(cemsg(
        &url,
        &["deadletter", "replay", "--all", "--durable", "picky"],
    ))
    .await
    .success();
    let lines = all.json_lines();
    assert_eq!(lines.len(), 2, "{all:?}");
    assert_eq!(
        (lines[0]["msg_id"].clone(), lines[0]["duplicate"].clone()),
        (json!(format!("order-8.replay.{seq8}")), json!(true))
    );
    assert_eq!(lines[1]["duplicate"], false);
    assert!(lines.iter().all(|l| l["deleted"] == true));
    let handled = tokio::time::timeout(WAIT, handled_rx.recv())
        .await
        .expect("order-9 handled");
    assert_eq!(handled.as_deref(), Some("order-9"));
    assert_eq!(
        events_stream_messages(&server).await,
        stored_before + 1,
        "order-8 not stored twice"
    );

    // Only the decode dead letter of the other durable is left; --all for picky has nothing.
    let nothing = run(cemsg(
        &url,
        &["deadletter", "replay", "--all", "--durable", "picky"],
    ))
    .await
    .success();
    assert_eq!(nothing.stdout, "");
    assert!(
        nothing.stderr.contains("nothing to replay"),
        "{}",
        nothing.stderr
    );
    let left = cemsg_ok(&url, &["deadletter", "list"]).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["durable"], "sink");
    listener.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn every_failure_has_its_exit_code_and_one_line() {
    let server = server_with_streams().await;
    let url = server.url();

    // 1: usage and configuration.
    run(cemsg(&url, &["publish"])).await.fails_with(1);
    run(cemsg(&url, &["publish", ORDER_CREATED, "--data", "{oops"]))
        .await
        .fails_with(1);
    run(cemsg(&url, &["deadletter", "replay"]))
        .await
        .fails_with(1);
    run(cemsg(
        &url,
        &["deadletter", "replay", "--seq", "1", "--all"],
    ))
    .await
    .fails_with(1);
    run(cemsg(&url, &["request", WORKSPACE_GET, "--timeout", "-1"]))
        .await
        .fails_with(1);
    let mut bad_env = cemsg(&url, &["stream", "init"]);
    bad_env.env("NATS_JS_REPLICAS", "three");
    let bad_env = run(bad_env).await.fails_with(1);
    assert!(
        bad_env.stderr.contains("NATS_JS_REPLICAS"),
        "{}",
        bad_env.stderr
    );

    // 2: connection.
    let closed = format!("nats://127.0.0.1:{}", support::server::free_port());
    run(cemsg(&closed, &["publish", ORDER_CREATED]))
        .await
        .fails_with(2);
    run(cemsg(&url, &["-s", &closed, "request", WORKSPACE_GET]))
        .await
        .fails_with(2);

    // 3: timeout (a responder that never answers).
    let raw = support::connect(server.url()).await;
    let silent = raw
        .subscribe("org.example.silent")
        .await
        .expect("subscribe");
    // A flush only writes the socket; a request answered by the server after it proves the
    // server has processed the SUB (one connection's messages are handled in order).
    tokio::time::timeout(WAIT, raw.request("$JS.API.INFO", "".into()))
        .await
        .expect("round trip in time")
        .expect("JetStream API answers");
    let timeout = run(cemsg(
        &url,
        &["request", "org.example.silent", "--timeout", "0.5"],
    ))
    .await
    .fails_with(3);
    assert!(timeout.stderr.contains("no reply"), "{}", timeout.stderr);
    drop(silent);

    // 4: no responders.
    run(cemsg(&url, &["request", "org.example.nobody"]))
        .await
        .fails_with(4);

    // 5: the responder answered with an error.
    let queries = NatsQueries::from_client(
        support::connect(server.url()).await,
        &config_for(&server, "failing"),
    );
    let handlers = QueryHandlers::new().on(
        WORKSPACE_GET,
        handler_fn(|_, _| async { Err(HandlerError::new("no such workspace").with_code(404)) }),
    );
    let failing = queries
        .listen(handlers, QueryListenOptions::default())
        .await
        .expect("listen");
    let remote = run(cemsg(&url, &["request", WORKSPACE_GET]))
        .await
        .fails_with(5);
    assert!(
        remote.stderr.contains("404") && remote.stderr.contains("no such workspace"),
        "{}",
        remote.stderr
    );
    failing.stop(Duration::from_secs(5)).await;

    // 6: not found.
    run(cemsg(&url, &["deadletter", "replay", "--seq", "999"]))
        .await
        .fails_with(6);
    let mut no_stream = cemsg(&url, &["listen", ORDER_CREATED, "--idle", "1"]);
    no_stream.env("NATS_JS_STREAM", "MISSING");
    run(no_stream).await.fails_with(6);
    let mut no_subject = cemsg(&url, &["publish", ORDER_CREATED]);
    no_subject.env("NATS_JS_SUBJECT_PREFIX", "unstored");
    run(no_subject).await.fails_with(6);
    let mut no_dlq = cemsg(&url, &["deadletter", "list"]);
    no_dlq.env("NATS_JS_DLQ_STREAM", "MISSING");
    run(no_dlq).await.fails_with(6);
}

#[tokio::test]
async fn an_event_larger_than_the_server_accepts_is_refused_with_7() {
    let server = NatsServer::start_with(ServerOptions {
        extra_config: "max_payload: 2048".into(),
        ..Default::default()
    });
    let url = server.url();
    cemsg_ok(&url, &["stream", "init"]).await;
    let big = json!({ "blob": "x".repeat(4096) }).to_string();
    let refused = run(cemsg(&url, &["publish", ORDER_CREATED, "--data", &big]))
        .await
        .fails_with(7);
    assert!(refused.stderr.contains("too large"), "{}", refused.stderr);
    assert_eq!(events_stream_messages(&server).await, 0);
}

/// Issue 15: a type or op that is not a literal subject-token sequence is refused at once by
/// every command (exit 1, one line, nothing stored, nothing served), as the library refuses
/// it; and an out-of-range `NATS_*` duration names its variable.
#[tokio::test]
async fn invalid_types_and_ops_are_refused_at_once_with_1() {
    let server = server_with_streams().await;
    let url = server.url();
    for bad in ["probe.*", ">", "*", "a b", "a..b", ".a", "a\tb"] {
        let started = std::time::Instant::now();
        let publish = run(cemsg(&url, &["publish", bad])).await.fails_with(1);
        assert!(publish.stderr.contains("invalid event type"), "{publish:?}");
        run(cemsg(&url, &["listen", bad, "--idle", "1"]))
            .await
            .fails_with(1);
        run(cemsg(&url, &["reply", bad])).await.fails_with(1);
        run(cemsg(&url, &["request", bad, "--timeout", "10"]))
            .await
            .fails_with(1);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{bad:?}: refusing took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(events_stream_messages(&server).await, 0, "nothing stored");
    for (var, value) in [
        ("NATS_JS_ACK_WAIT", "1e12"),
        ("NATS_JS_DUPLICATE_WINDOW", "1e10"),
        ("NATS_JS_MAX_DELIVER", "9223372036854775807"),
    ] {
        let mut command = cemsg(&url, &["stream", "init"]);
        command.env(var, value);
        let refused = run(command).await.fails_with(1);
        assert!(refused.stderr.contains(var), "{refused:?}");
    }
}

/// Issue 15 item 7: when another stream now captures a dead letter's original subject, replay
/// refuses (exit 7, the dead letter kept, nothing stored in the other stream) unless
/// `--to-stream` names that stream.
#[tokio::test]
async fn replay_refuses_to_land_in_another_stream_unless_told() {
    let server = server_with_streams().await;
    let url = server.url();
    let raw = support::connect(server.url()).await;
    let js = async_nats::jetstream::new(raw.clone());
    js.publish("events.org.example.moved", "not an event".into())
        .await
        .expect("publish garbage")
        .await
        .expect("garbage stored");
    run(cemsg(
        &url,
        &[
            "listen",
            "org.example.moved",
            "--durable",
            "sink",
            "--idle",
            "1",
        ],
    ))
    .await
    .success();
    let listed = cemsg_ok(&url, &["deadletter", "list"]).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let seq = listed[0]["seq"]
        .as_u64()
        .expect("dead-letter seq")
        .to_string();
    // The events stream gives the subject up; another stream takes it.
    let mut events = js.get_stream("CLOUDEVENTS").await.expect("events stream");
    let mut config = events.info().await.expect("info").config.clone();
    config.subjects = vec!["events.kept.>".into()];
    js.update_stream(config).await.expect("narrow CLOUDEVENTS");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "MOVED".into(),
        subjects: vec!["events.org.example.moved".into()],
        ..Default::default()
    })
    .await
    .expect("create MOVED");
    let moved_messages = || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream("MOVED").await.expect("MOVED");
            stream.info().await.expect("info").state.messages
        }
    };

    let refused = run(cemsg(&url, &["deadletter", "replay", "--seq", &seq]))
        .await
        .fails_with(7);
    assert!(
        refused.stderr.contains("MOVED") && refused.stderr.contains("CLOUDEVENTS"),
        "names both streams: {}",
        refused.stderr
    );
    assert_eq!(moved_messages().await, 0, "nothing stored in MOVED");
    assert_eq!(
        cemsg_ok(&url, &["deadletter", "list"]).await.len(),
        1,
        "the dead letter is kept"
    );
    let refused_all = run(cemsg(&url, &["deadletter", "replay", "--all"])).await;
    assert_eq!(refused_all.code, 7, "{refused_all:?}");
    assert_eq!(moved_messages().await, 0);

    let replayed = cemsg_ok(
        &url,
        &[
            "deadletter",
            "replay",
            "--seq",
            &seq,
            "--to-stream",
            "MOVED",
        ],
    )
    .await;
    assert_eq!(replayed[0]["stream"], "MOVED");
    assert_eq!(replayed[0]["deleted"], true);
    assert_eq!(moved_messages().await, 1);
    assert!(cemsg_ok(&url, &["deadletter", "list"]).await.is_empty());
}

/// A poison message too large to be copied into its dead letter is dead-lettered as a
/// reference: `deadletter list` says so and where the original is, replay reads the original
/// from the events stream by sequence, and once the stream no longer holds it replay fails
/// with exit 6 and keeps the dead letter.
#[tokio::test]
async fn a_reference_dead_letter_is_listed_and_replayed_from_the_events_stream() {
    let server = NatsServer::start_with(ServerOptions {
        extra_config: "max_payload: 4096".into(),
        ..Default::default()
    });
    let url = server.url();
    cemsg_ok(&url, &["stream", "init"]).await;
    let js = async_nats::jetstream::new(support::connect(server.url()).await);
    let mut headers = HeaderMap::new();
    headers.insert("X-Conf", "kept");
    headers.insert("Nats-Expected-Stream", "CLOUDEVENTS");
    let original: Vec<u8> = std::iter::once(b'{').chain([b'x'; 3899]).collect();
    for _ in 0..2 {
        js.publish_with_headers(
            "events.org.example.big",
            headers.clone(),
            original.clone().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    }
    run(cemsg(
        &url,
        &[
            "listen",
            "org.example.big",
            "--durable",
            "sink",
            "--idle",
            "1",
        ],
    ))
    .await
    .success();
    let listed = cemsg_ok(&url, &["deadletter", "list"]).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (line, stream_seq) in listed.iter().zip([1, 2]) {
        assert_eq!(line["payload"], "omitted", "{line}");
        assert_eq!(line["reason"], "decode");
        assert_eq!(line["stream"], "CLOUDEVENTS");
        assert_eq!(line["stream_seq"], stream_seq);
        assert_eq!(line["subject"], "events.org.example.big");
        assert!(line["size"].as_u64().is_some_and(|s| s > 3900), "{line}");
    }
    let first = listed[0]["seq"].as_u64().unwrap().to_string();
    let replayed = cemsg_ok(&url, &["deadletter", "replay", "--seq", &first]).await;
    assert_eq!(replayed[0]["stream"], "CLOUDEVENTS");
    let republished = js
        .get_stream("CLOUDEVENTS")
        .await
        .expect("stream")
        .get_raw_message(replayed[0]["seq"].as_u64().unwrap())
        .await
        .expect("republished message");
    assert_eq!(
        &republished.payload[..],
        &original[..],
        "the original payload"
    );
    assert_eq!(
        republished.headers.get("X-Conf").map(|v| v.as_str()),
        Some("kept")
    );

    // The second one's original is removed from the events stream: nothing left to replay.
    let events = js.get_stream("CLOUDEVENTS").await.expect("stream");
    assert!(events.delete_message(2).await.expect("delete original"));
    let second = listed[1]["seq"].as_u64().unwrap().to_string();
    let gone = run(cemsg(&url, &["deadletter", "replay", "--seq", &second]))
        .await
        .fails_with(6);
    assert!(gone.stderr.contains("no longer holds"), "{}", gone.stderr);
    let left = cemsg_ok(&url, &["deadletter", "list"]).await;
    assert_eq!(left.len(), 1, "the dead letter is kept: {left:?}");
    assert_eq!(left[0]["seq"].as_u64().unwrap().to_string(), second);
}

/// `cemsg consumer info <durable>`: one JSON line with the consumer's state; exit 6 for a
/// durable that does not exist.
#[tokio::test]
async fn consumer_info_prints_the_state_of_a_durable() {
    let server = server_with_streams().await;
    let url = server.url();
    for id in ["c-1", "c-2", "c-3"] {
        cemsg_ok(&url, &["publish", ORDER_CREATED, "--id", id]).await;
    }
    let printed = cemsg_ok(
        &url,
        &[
            "listen",
            ORDER_CREATED,
            "--durable",
            "audit",
            "--count",
            "2",
        ],
    )
    .await;
    assert_eq!(printed.len(), 2);
    let info = cemsg_ok(&url, &["consumer", "info", "audit"]).await;
    assert_eq!(info.len(), 1, "{info:?}");
    let info = &info[0];
    assert_eq!(info["stream"], "CLOUDEVENTS");
    assert_eq!(info["durable"], "audit");
    assert_eq!(
        info["filter_subjects"],
        json!([format!("events.{ORDER_CREATED}")])
    );
    assert_eq!(info["ack_floor"], 2, "{info}");
    assert_eq!(info["parked"], 0, "{info}");
    assert!(info["last_delivered"].as_u64().unwrap() >= 2, "{info}");
    // The third event is not settled: pending, or (pulled and handed back by the stop) ack
    // pending until it is delivered again.
    let unsettled = info["pending"].as_u64().unwrap() + info["ack_pending"].as_u64().unwrap();
    assert_eq!(unsettled, 1, "{info}");
    let missing = run(cemsg(&url, &["consumer", "info", "nobody"]))
        .await
        .fails_with(6);
    assert!(missing.stderr.contains("nobody"), "{}", missing.stderr);
}

/// `cemsg listen --count 1` run 50 times in a row over a 30-event backlog, with
/// `NATS_JS_MAX_DELIVER=3`: every event is printed exactly once, nothing is dead-lettered,
/// and the durable ends with nothing pending or unacknowledged (nothing parked). Before the
/// delivery window, each run pulled events it did not print and handed them back on exit,
/// spending their deliveries until the server parked them.
#[tokio::test]
async fn listen_count_one_in_a_loop_prints_every_event_once_and_parks_nothing() {
    let server = server_with_streams().await;
    let url = server.url();
    let js = async_nats::jetstream::new(support::connect(server.url()).await);
    let mut published = Vec::new();
    for n in 0..30 {
        let line = cemsg_ok(&url, &["publish", ORDER_CREATED, "--data", &n.to_string()]).await;
        published.push(line[0]["id"].as_str().expect("id").to_owned());
    }
    let mut printed: Vec<String> = Vec::new();
    for _ in 0..50 {
        let mut command = cemsg(
            &url,
            &[
                "listen",
                ORDER_CREATED,
                "--durable",
                "looper",
                "--count",
                "1",
                "--idle",
                "0.5",
            ],
        );
        command.env("NATS_JS_MAX_DELIVER", "3");
        let lines = run(command).await.success().json_lines();
        assert!(lines.len() <= 1, "--count 1 printed {}", lines.len());
        printed.extend(lines.iter().map(|l| l["id"].as_str().unwrap().to_owned()));
    }
    let unique: HashSet<&String> = printed.iter().collect();
    assert_eq!(unique.len(), printed.len(), "an event was printed twice");
    assert_eq!(
        unique,
        published.iter().collect::<HashSet<_>>(),
        "every event printed"
    );
    let mut consumer = js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            "looper",
            "CLOUDEVENTS",
        )
        .await
        .expect("durable looper");
    let info = consumer.info().await.expect("consumer info");
    assert_eq!(
        (info.num_pending, info.num_ack_pending),
        (0, 0),
        "nothing pending or parked: {info:?}"
    );
    assert_eq!(info.ack_floor.stream_sequence, 30, "ack floor at the end");
    let mut dlq = js
        .get_stream("DEADLETTER")
        .await
        .expect("dead-letter stream");
    assert_eq!(
        dlq.info().await.expect("dlq info").state.messages,
        0,
        "nothing dead-lettered"
    );
}

/// Issue 18: `request --stream` prints every reply of a replier's reply stream (not only the
/// first), an empty reply stream prints nothing and exits 0 (also without --stream), and
/// `--gather` prints the replies of every replier, ended by --max or --stall long before its
/// deadline; no responders is exit 4 in both modes.
#[tokio::test]
async fn request_stream_and_gather_print_every_reply() {
    let server = NatsServer::start();
    let url = server.url();
    let (rows_op, none_op, ping_op) = (
        "cyverse.workspace.list",
        "cyverse.workspace.none",
        "cyverse.health.ping",
    );
    let streaming = NatsQueries::from_client(
        support::connect(server.url()).await,
        &config_for(&server, "lister"),
    );
    let handlers = QueryHandlers::new()
        .on(
            rows_op,
            handler_fn(|_, reply| async move {
                let rows = reply.stream();
                for n in 0..4u32 {
                    rows.push_data("cyverse.workspace.row", &n)?;
                }
                rows.finish().await?;
                Ok(())
            }),
        )
        .on(
            none_op,
            handler_fn(|_, reply| async move {
                reply.stream().finish().await?;
                Ok(())
            }),
        );
    let lister = streaming
        .listen(handlers, QueryListenOptions::default())
        .await
        .expect("listen");
    let streamed = run(cemsg(
        &url,
        &["request", rows_op, "--stream", "--timeout", "20"],
    ))
    .await
    .success();
    let rows: Vec<Value> = streamed
        .json_lines()
        .iter()
        .map(|l| l["data"].clone())
        .collect();
    assert_eq!(rows, vec![json!(0), json!(1), json!(2), json!(3)]);
    // Only the first, without --stream (the one reply `request` waits for).
    let single = cemsg_ok(&url, &["request", rows_op]).await;
    assert_eq!(single.len(), 1);
    // Zero replies is an answer: nothing printed, exit 0, well before the deadline.
    let started = std::time::Instant::now();
    for args in [
        &["request", none_op, "--stream", "--timeout", "60"][..],
        &["request", none_op, "--timeout", "60"][..],
    ] {
        let empty = run(cemsg(&url, args)).await.success();
        assert_eq!(empty.stdout, "", "{args:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    lister.stop(Duration::from_secs(5)).await;

    // Three repliers, each in its own queue group: --gather gets all three.
    let mut repliers = Vec::new();
    for name in ["a", "b", "c"] {
        let queries = NatsQueries::from_client(
            support::connect(server.url()).await,
            &config_for(&server, &format!("pong-{name}")),
        );
        let handlers = QueryHandlers::new().on(
            ping_op,
            handler_fn(move |_, reply| async move {
                reply.reply_data("cyverse.health.pong", &name).await?;
                Ok(())
            }),
        );
        repliers.push(
            queries
                .listen(handlers, QueryListenOptions::default())
                .await
                .expect("listen"),
        );
    }
    let names = |run: &Run| -> HashSet<String> {
        run.json_lines()
            .iter()
            .map(|l| l["data"].as_str().expect("name").to_owned())
            .collect()
    };
    let started = std::time::Instant::now();
    let stalled = run(cemsg(
        &url,
        &[
            "request",
            ping_op,
            "--gather",
            "--stall",
            "1",
            "--timeout",
            "60",
        ],
    ))
    .await
    .success();
    assert_eq!(
        names(&stalled),
        HashSet::from(["a".into(), "b".into(), "c".into()])
    );
    let at_most = run(cemsg(
        &url,
        &[
            "request",
            ping_op,
            "--gather",
            "--max",
            "2",
            "--timeout",
            "60",
        ],
    ))
    .await
    .success();
    assert_eq!(at_most.json_lines().len(), 2);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "--stall and --max end the gather long before its deadline"
    );
    let deadline = run(cemsg(
        &url,
        &["request", ping_op, "--gather", "--timeout", "1"],
    ))
    .await
    .success();
    assert_eq!(deadline.json_lines().len(), 3);
    for replier in &repliers {
        replier.stop(Duration::from_secs(5)).await;
    }
    for mode in ["--stream", "--gather"] {
        run(cemsg(&url, &["request", "org.example.nobody", mode]))
            .await
            .fails_with(4);
    }
    // --max and --stall belong to --gather.
    run(cemsg(&url, &["request", ping_op, "--max", "2"]))
        .await
        .fails_with(1);
}

/// Issue 18: a durable that `cemsg listen` creates starts at new events (a first listen on a
/// shared server does not work through other applications' history); `--start all` reads the
/// history; an existing durable keeps its position.
#[tokio::test]
async fn listen_starts_new_durables_at_new_events() {
    let server = server_with_streams().await;
    let url = server.url();
    for id in ["old-1", "old-2"] {
        cemsg_ok(&url, &["publish", ORDER_CREATED, "--id", id]).await;
    }
    let fresh = |durable: &str, extra: &[&str]| {
        let mut args = vec!["listen", ORDER_CREATED, "--durable", durable, "--idle", "1"];
        args.extend_from_slice(extra);
        let mut command = cemsg(&url, &args);
        // The CLI's own default, not the tests' `all`.
        command.env_remove("NATS_JS_START_POSITION");
        command
    };
    let new_only = run(fresh("watcher", &[])).await.success();
    assert_eq!(new_only.stdout, "", "no history for a new durable");
    let history = run(fresh("auditor", &["--start", "all"])).await.success();
    let ids: Vec<String> = history
        .json_lines()
        .iter()
        .map(|l| l["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids, vec!["old-1".to_owned(), "old-2".to_owned()]);
    // The watcher exists now: it gets what was published since, and `--start all` does not
    // move it back.
    cemsg_ok(&url, &["publish", ORDER_CREATED, "--id", "new-1"]).await;
    let since = run(fresh("watcher", &["--start", "all"])).await.success();
    let ids: Vec<String> = since
        .json_lines()
        .iter()
        .map(|l| l["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids, vec!["new-1".to_owned()]);
    // A bad position is a usage error naming the option; a bad NATS_JS_START_POSITION names
    // the variable.
    let bad = run(fresh("x", &["--start", "first"])).await.fails_with(1);
    assert!(bad.stderr.contains("--start"), "{}", bad.stderr);
    let mut command = cemsg(&url, &["listen", ORDER_CREATED, "--idle", "1"]);
    command.env("NATS_JS_START_POSITION", "sequence:0");
    let bad = run(command).await.fails_with(1);
    assert!(
        bad.stderr.contains("NATS_JS_START_POSITION"),
        "{}",
        bad.stderr
    );
}

/// `cemsg publish --priority N` with `NATS_JS_PRIORITY_LEVELS=3`: stored on the level's
/// subject (`events._priority.<N>.<type>`, the lowest level on `events.<type>`) with the
/// `priority` extension; a listener with the same levels prints the backlog highest first
/// and leaves every level's consumer settled. Without priorities (or N beyond the levels)
/// `--priority` is refused with exit 1 and nothing is stored.
#[tokio::test]
async fn publish_priority_goes_to_its_level_and_is_served_first() {
    let server = server_with_streams().await;
    let url = server.url();
    let with_levels = |args: &[&str]| {
        let mut command = cemsg(&url, args);
        command.env("NATS_JS_PRIORITY_LEVELS", "3");
        command
    };
    let refused = run(cemsg(&url, &["publish", ORDER_CREATED, "--priority", "0"]))
        .await
        .fails_with(1);
    assert!(
        refused.stderr.contains("NATS_JS_PRIORITY_LEVELS"),
        "{}",
        refused.stderr
    );
    run(with_levels(&["publish", ORDER_CREATED, "--priority", "3"]))
        .await
        .fails_with(1);
    assert_eq!(events_stream_messages(&server).await, 0, "nothing stored");
    let mut ids = Vec::new();
    for priority in [None, Some("1"), Some("0")] {
        let mut args = vec!["publish", ORDER_CREATED];
        if let Some(p) = priority {
            args.extend(["--priority", p]);
        }
        let line = run(with_levels(&args)).await.success().json_lines();
        ids.push(line[0]["id"].as_str().expect("id").to_owned());
    }
    let js = async_nats::jetstream::new(support::connect(server.url()).await);
    let stream = js.get_stream("CLOUDEVENTS").await.expect("events stream");
    let mut subjects = Vec::new();
    for seq in 1..=3 {
        let message = stream.get_raw_message(seq).await.expect("stored");
        subjects.push(message.subject.to_string());
        let event = ce_messaging::codec::decode(Some(&message.headers), &message.payload)
            .expect("a CloudEvent");
        let expected = [None, Some(1u8), Some(0u8)][seq as usize - 1];
        assert_eq!(ce_messaging::events::event_priority(&event), Ok(expected));
    }
    assert_eq!(
        subjects,
        vec![
            format!("events.{ORDER_CREATED}"),
            format!("events._priority.1.{ORDER_CREATED}"),
            format!("events._priority.0.{ORDER_CREATED}"),
        ]
    );
    let printed = run(with_levels(&[
        "listen",
        ORDER_CREATED,
        "--durable",
        "prio",
        "--count",
        "3",
    ]))
    .await
    .success()
    .json_lines();
    let order: Vec<&str> = printed
        .iter()
        .map(|l| l["id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        order,
        vec![ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]
    );
    for durable in ["prio-p0", "prio-p1", "prio"] {
        let mut consumer = js
            .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                durable,
                "CLOUDEVENTS",
            )
            .await
            .expect("a consumer per level");
        let info = consumer.info().await.expect("consumer info");
        assert_eq!(
            (info.num_pending, info.num_ack_pending),
            (0, 0),
            "{durable}: {info:?}"
        );
    }
}

/// Waits (bounded) until the events stream holds a message on `subject`; returns its headers.
async fn last_on_subject(server: &NatsServer, subject: &str) -> HeaderMap {
    let js = async_nats::jetstream::new(support::connect(server.url()).await);
    let stream = js.get_stream("CLOUDEVENTS").await.expect("events stream");
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(message) = stream.get_last_raw_message_by_subject(subject).await {
                return message.headers;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("nothing stored on {subject} within {WAIT:?}"))
}

#[tokio::test]
async fn scheduled_and_expiring_publishes_are_listed_cancelled_and_fire() {
    let server = server_with_streams().await;
    let url = server.url();
    // Deferred: listed until cancelled; a second cancel finds nothing (exit 6).
    let published = cemsg_ok(
        &url,
        &["publish", ORDER_CREATED, "--data", "{}", "--in", "1h"],
    )
    .await;
    let id = published[0]["id"].as_str().expect("id").to_owned();
    let listed = cemsg_ok(&url, &["schedule", "list"]).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(listed[0]["schedule"]
        .as_str()
        .expect("schedule")
        .starts_with("@at "));
    assert_eq!(
        listed[0]["target"],
        format!("events.{ORDER_CREATED}").as_str()
    );
    assert_eq!(listed[0]["type"], ORDER_CREATED);
    let cancelled = cemsg_ok(&url, &["schedule", "cancel", &id]).await;
    assert_eq!(cancelled[0]["cancelled"], true);
    run(cemsg(&url, &["schedule", "cancel", &id]))
        .await
        .fails_with(6);
    assert!(cemsg_ok(&url, &["schedule", "list"]).await.is_empty());

    // Recurring: fires on the event's own subject with the scheduler headers.
    let tick = "org.example.cli.tick";
    let published = cemsg_ok(
        &url,
        &[
            "publish", tick, "--data", "{}", "--every", "1s", "--ttl", "1m",
        ],
    )
    .await;
    let tick_id = published[0]["id"].as_str().expect("id").to_owned();
    let fired = last_on_subject(&server, &format!("events.{tick}")).await;
    assert_eq!(
        fired.get("Nats-Scheduler").map(|v| v.as_str().to_owned()),
        Some(format!("_CE_SCHEDULE.CLOUDEVENTS.{tick_id}"))
    );
    assert_eq!(fired.get("Nats-TTL").map(|v| v.as_str()), Some("60s"));
    cemsg_ok(&url, &["schedule", "cancel", &tick_id]).await;

    // Expiring: the stored event carries its time-to-live.
    let quote = "org.example.cli.quote";
    cemsg_ok(&url, &["publish", quote, "--data", "{}", "--ttl", "30s"]).await;
    let stored = last_on_subject(&server, &format!("events.{quote}")).await;
    assert_eq!(stored.get("Nats-TTL").map(|v| v.as_str()), Some("30s"));

    // Bad values are usage errors, refused before anything is sent.
    for bad in [
        &["--every", "5 parsecs"][..],
        &["--in", "soon"],
        &["--at", "tomorrow"],
        &["--cron", "* * *"],
        &["--every", "200ms"],
        &["--ttl", "10ms"],
    ] {
        let mut args = vec!["publish", ORDER_CREATED];
        args.extend_from_slice(bad);
        run(cemsg(&url, &args)).await.fails_with(1);
    }
}

/// Polls (bounded) `cemsg schedule list` until `pred` holds for its lines; returns them.
async fn schedules_until(url: &str, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let listed = cemsg_ok(url, &["schedule", "list"]).await;
        if pred(&listed) {
            return listed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {WAIT:?}: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn valid_at_and_cron_publishes_are_listed_and_fire() {
    let server = server_with_streams().await;
    let url = server.url();
    let js = async_nats::jetstream::new(support::connect(server.url()).await);
    let stream = js.get_stream("CLOUDEVENTS").await.expect("events stream");

    // --at a few seconds ahead: listed with the instant, stored on the event's subject not
    // before it, then gone from the list (a one-shot schedule is purged after its firing).
    let reminder = "org.example.cli.reminder";
    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
    let at_text = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let published = cemsg_ok(
        &url,
        &["publish", reminder, "--data", "{}", "--at", &at_text],
    )
    .await;
    let id = published[0]["id"].as_str().expect("id").to_owned();
    let listed = cemsg_ok(&url, &["schedule", "list"]).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], id.as_str());
    let schedule = listed[0]["schedule"].as_str().expect("schedule");
    let listed_at = chrono::DateTime::parse_from_rfc3339(
        schedule.strip_prefix("@at ").expect("an @at schedule"),
    )
    .expect("RFC 3339");
    assert_eq!(listed_at.timestamp(), at.timestamp(), "{schedule}");
    assert_eq!(listed[0]["target"], format!("events.{reminder}").as_str());
    let fired = last_on_subject(&server, &format!("events.{reminder}")).await;
    assert_eq!(
        fired.get("Nats-Scheduler").map(|v| v.as_str().to_owned()),
        Some(format!("_CE_SCHEDULE.CLOUDEVENTS.{id}"))
    );
    let message = stream
        .get_last_raw_message_by_subject(&format!("events.{reminder}"))
        .await
        .expect("the firing");
    assert!(
        message.time.unix_timestamp() >= at.timestamp(),
        "stored at {}, before its time {at}",
        message.time
    );
    schedules_until(&url, "the fired one-shot schedule gone", |l| {
        !l.iter().any(|s| s["id"] == id.as_str())
    })
    .await;

    // --cron every second in --time-zone UTC: listed with its zone, fires, cancel ends it.
    let tick = "org.example.cli.crontick";
    let published = cemsg_ok(
        &url,
        &[
            "publish",
            tick,
            "--data",
            "{}",
            "--cron",
            "* * * * * *",
            "--time-zone",
            "UTC",
        ],
    )
    .await;
    let tick_id = published[0]["id"].as_str().expect("id").to_owned();
    let listed = cemsg_ok(&url, &["schedule", "list"]).await;
    let entry = listed
        .iter()
        .find(|s| s["id"] == tick_id.as_str())
        .unwrap_or_else(|| panic!("the cron schedule is listed: {listed:?}"));
    assert_eq!(entry["schedule"], "* * * * * *");
    assert_eq!(entry["time_zone"], "UTC");
    assert_eq!(entry["target"], format!("events.{tick}").as_str());
    let fired = last_on_subject(&server, &format!("events.{tick}")).await;
    assert_eq!(
        fired.get("Nats-Scheduler").map(|v| v.as_str().to_owned()),
        Some(format!("_CE_SCHEDULE.CLOUDEVENTS.{tick_id}"))
    );
    let cancelled = cemsg_ok(&url, &["schedule", "cancel", &tick_id]).await;
    assert_eq!(cancelled[0]["cancelled"], true);
    assert!(cemsg_ok(&url, &["schedule", "list"]).await.is_empty());
    run(cemsg(&url, &["schedule", "cancel", &tick_id]))
        .await
        .fails_with(6);
}
