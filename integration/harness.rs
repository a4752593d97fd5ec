//! Tests of the integration-test harness itself: real nats-server processes are started,
//! killed, restarted, paused and clustered, and keep their JetStream data where they should.

mod support;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use support::server::{NatsServer, ServerOptions};

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
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok();
    assert!(!alive, "nats-server {pid} still exists after drop");
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
