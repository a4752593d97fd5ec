//! Tests of the integration-test harness itself: real nats-server processes are started,
//! killed, restarted, paused and clustered, and keep their JetStream data where they should.

use ce_messaging_test_support as support;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use support::cluster::NatsCluster;
use support::server::{locate_nats_server, NatsServer, ServerOptions};

const WAIT: Duration = Duration::from_secs(10);

async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> jetstream::stream::Stream {
    tokio::time::timeout(
        WAIT,
        js.create_stream(stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{}.>", name.to_lowercase())],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        }),
    )
    .await
    .expect("create_stream timed out")
    .expect("create_stream")
}

async fn publish(js: &jetstream::Context, subject: &str, payload: &'static str) -> u64 {
    let ack = tokio::time::timeout(WAIT, async {
        js.publish(subject.to_string(), payload.into())
            .await
            .expect("publish")
            .await
            .expect("puback")
    })
    .await
    .expect("publish timed out");
    ack.sequence
}

#[tokio::test]
async fn server_starts_and_serves_core_nats() {
    let server = NatsServer::start();
    assert!(server.url().starts_with("nats://127.0.0.1:"));
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    let client = support::connect(&server.url()).await;
    let mut sub = client.subscribe("harness.ping").await.expect("subscribe");
    client.flush().await.expect("flush");
    client
        .publish("harness.ping", "hi".into())
        .await
        .expect("publish");
    let msg = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut sub))
        .await
        .expect("no message within timeout")
        .expect("subscription ended");
    assert_eq!(&msg.payload[..], b"hi");

    let varz = server.monitor_json("/varz");
    assert_eq!(varz["port"].as_u64(), Some(u64::from(server.port())));
    assert_eq!(varz["server_name"].as_str(), Some(server.name()));
}

#[tokio::test]
async fn jetstream_data_survives_kill_and_restart() {
    let server = NatsServer::start();
    let port = server.port();
    let store = server.store_dir();
    {
        let client = support::connect(&server.url()).await;
        let js = jetstream::new(client);
        create_stream(&js, "HARNESS", 1).await;
        assert_eq!(publish(&js, "harness.a", "one").await, 1);
        assert_eq!(publish(&js, "harness.b", "two").await, 2);
    }

    server.kill();
    assert!(!server.is_running());
    server.kill(); // idempotent
    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port, "restart keeps the port");
    assert_eq!(server.store_dir(), store, "restart keeps the store");

    let client = support::connect(&server.url()).await;
    let js = jetstream::new(client);
    let mut stream = tokio::time::timeout(WAIT, js.get_stream("HARNESS"))
        .await
        .expect("get_stream timed out")
        .expect("stream survived the restart");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.state.messages, 2);
    let first = stream.get_raw_message(1).await.expect("message 1");
    assert_eq!(&first.payload[..], b"one");
    let second = stream.get_raw_message(2).await.expect("message 2");
    assert_eq!(&second.payload[..], b"two");
}

#[tokio::test]
async fn drop_kills_the_process_and_deletes_the_store() {
    let server = NatsServer::start();
    let pid = server.pid().expect("running");
    let dir = server.store_dir();
    let config = server.config_path().to_path_buf();
    assert!(config.exists());
    drop(server);
    assert!(!config.exists(), "temp dir deleted on drop");
    assert!(!dir.exists());
    // The child was reaped: the pid no longer names a process (not even a zombie of ours).
    assert!(
        !process_exists(pid),
        "nats-server {pid} still exists after drop"
    );
}

/// True while `pid` names a process (a zombie counts: it was not reaped).
fn process_exists(pid: u32) -> bool {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits in i32"));
    nix::sys::signal::kill(pid, None).is_ok()
}

#[test]
fn a_panicking_test_still_kills_and_cleans_up() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let server = NatsServer::start();
        tx.send((server.pid().expect("running"), server.store_dir()))
            .expect("send pid");
        panic!("deliberate panic while the server runs");
    })
    .join();
    assert!(outcome.is_err(), "the thread panicked");
    let (pid, store) = rx.recv().expect("pid from the panicking thread");
    assert!(!process_exists(pid), "nats-server {pid} survived the panic");
    assert!(
        !store.exists(),
        "store {} survived the panic",
        store.display()
    );
}

#[test]
fn missing_binary_says_to_run_the_install_script() {
    let empty = tempfile::tempdir().expect("temp dir");
    let err = locate_nats_server(None, empty.path(), Some(empty.path().into()))
        .expect_err("no nats-server anywhere");
    assert!(err.contains("scripts/install-nats-server"), "{err}");

    let err = locate_nats_server(Some(empty.path().join("nope").into()), empty.path(), None)
        .expect_err("NATS_SERVER_BIN names no file");
    assert!(err.contains("NATS_SERVER_BIN"), "{err}");
    assert!(err.contains("scripts/install-nats-server"), "{err}");

    // Found on PATH when nothing else is set.
    let bin_dir = empty.path().join("bin");
    std::fs::create_dir(&bin_dir).expect("mkdir");
    std::fs::write(bin_dir.join("nats-server"), "").expect("write");
    let found = locate_nats_server(None, empty.path(), Some(bin_dir.clone().into()))
        .expect("found on PATH");
    assert_eq!(found, bin_dir.join("nats-server"));
}

#[tokio::test]
async fn extra_config_is_applied() {
    let server = NatsServer::start_with(ServerOptions {
        jetstream: false,
        extra_config: "max_payload: 65536".into(),
        ..Default::default()
    });
    let varz = server.monitor_json("/varz");
    assert_eq!(varz["max_payload"].as_u64(), Some(65536));
    let client = support::connect(&server.url()).await;
    assert_eq!(client.server_info().max_payload, 65536);
}

#[tokio::test]
async fn paused_server_does_not_answer_until_resumed() {
    let server = NatsServer::start_with(ServerOptions {
        jetstream: false,
        ..Default::default()
    });
    let client = support::connect(&server.url()).await;
    let sub = client.subscribe("harness.echo").await.expect("subscribe");
    let responder = tokio::spawn(async move {
        let mut sub = sub;
        while let Some(msg) = futures::StreamExt::next(&mut sub).await {
            if let Some(reply) = msg.reply {
                // Replying through a paused server only queues; ignore send errors at the end.
                let _ = client.publish(reply, msg.payload).await;
                let _ = client.flush().await;
            }
        }
    });
    let requester = support::connect(&server.url()).await;
    let ok = tokio::time::timeout(WAIT, requester.request("harness.echo", "1".into()))
        .await
        .expect("request timed out")
        .expect("request before pause");
    assert_eq!(&ok.payload[..], b"1");

    server.pause();
    assert!(server.is_paused());
    let frozen = tokio::time::timeout(
        Duration::from_millis(300),
        requester.request("harness.echo", "2".into()),
    )
    .await;
    assert!(
        frozen.is_err(),
        "a SIGSTOPped server must not answer: {frozen:?}"
    );

    server.resume();
    assert!(!server.is_paused());
    let back = tokio::time::timeout(WAIT, requester.request("harness.echo", "3".into()))
        .await
        .expect("request after resume timed out")
        .expect("request after resume");
    assert_eq!(&back.payload[..], b"3");
    responder.abort();
}

#[tokio::test]
async fn lame_duck_stops_accepting_and_exits() {
    let server = NatsServer::start_with(ServerOptions {
        jetstream: false,
        // 30s is the shortest lame-duck duration the server accepts; Drop ends it sooner.
        extra_config: "lame_duck_duration: \"30s\"\nlame_duck_grace_period: \"0s\"".into(),
        ..Default::default()
    });
    let (tx, mut events) = tokio::sync::mpsc::channel(16);
    let _client = async_nats::ConnectOptions::new()
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event).await;
            }
        })
        .connect(server.url())
        .await
        .expect("connect");
    server.lame_duck();
    let saw_lame_duck = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.recv().await {
            if matches!(event, async_nats::Event::LameDuckMode) {
                return true;
            }
        }
        false
    })
    .await
    .expect("no lame-duck event within timeout");
    assert!(saw_lame_duck, "client was told about lame-duck mode");
    // In lame-duck mode the client listener is closed: new connections are refused.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], server.port()));
    support::eventually(WAIT, || async move {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
    })
    .await;
    assert!(server.is_running(), "still draining, not exited");
}

#[tokio::test]
async fn cluster_forms_and_replicated_stream_accepts_writes() {
    let cluster = NatsCluster::start(3);
    assert_eq!(cluster.len(), 3);
    assert_eq!(cluster.urls().len(), 3);
    assert_eq!(cluster.url().split(',').count(), 3);
    let leader = cluster.meta_leader().await;
    assert!(leader < 3);
    for i in 0..3 {
        let jsz = cluster.node(i).monitor_json("/jsz");
        assert_eq!(
            jsz["meta_cluster"]["cluster_size"].as_u64(),
            Some(3),
            "node {i}"
        );
    }

    let client = support::connect(&cluster.url()).await;
    let js = jetstream::new(client.clone());
    create_stream(&js, "REPL", 3).await;
    // A replicated stream takes writes once its raft group has elected a leader, which can
    // come after `create_stream` returns (a publish before it got `StreamNotFound`).
    let stream_leader = cluster.stream_leader(&client, "REPL").await;
    assert_eq!(publish(&js, "repl.a", "one").await, 1);
    let mut stream = js.get_stream("REPL").await.expect("get_stream");
    let info = stream.info().await.expect("stream info");
    let cluster_info = info
        .cluster
        .clone()
        .expect("clustered stream has cluster info");
    assert_eq!(cluster_info.replicas.len(), 2, "leader plus two replicas");

    // Losing a follower keeps a quorum: writes continue, and the follower catches up after
    // a restart on its own port and store. (Killing the leader works too but waits out a
    // multi-second raft election, too slow for this test.)
    // Publish through the leader's node, so the client's own connection is not the one cut.
    let follower = (stream_leader + 1) % 3;
    let js_leader = jetstream::new(support::connect(&cluster.node(stream_leader).url()).await);
    cluster.kill(follower);
    assert_eq!(publish(&js_leader, "repl.b", "two").await, 2);
    cluster.restart(follower);
    let node = cluster.node(follower);
    support::eventually(WAIT, || async {
        stream_messages_on(node, "REPL") == Some(2)
    })
    .await;
}

/// The message count of `stream` in the local store of `node` (monitoring `/jsz`).
fn stream_messages_on(node: &NatsServer, stream: &str) -> Option<u64> {
    let jsz = node.try_monitor_json("/jsz?streams=true").ok()?;
    jsz["account_details"]
        .as_array()?
        .iter()
        .filter_map(|a| a["stream_detail"].as_array())
        .flatten()
        .find(|s| s["name"] == stream)
        .and_then(|s| s["state"]["messages"].as_u64())
}

#[tokio::test]
#[should_panic(expected = "condition not met within")]
async fn eventually_panics_when_the_condition_never_holds() {
    support::eventually(Duration::from_millis(100), || async { false }).await;
}

#[tokio::test]
async fn eventually_returns_once_the_condition_holds() {
    let calls = std::sync::atomic::AtomicUsize::new(0);
    support::eventually(WAIT, || async {
        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
}
