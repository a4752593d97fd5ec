//! Test support shared by the integration tests (crate `ce-messaging-test-support`, imported by
//! each test as `use ce_messaging_test_support as support;`): real `nats-server` processes
//! ([`server::NatsServer`], [`cluster::NatsCluster`]), a client helper and a polling helper.
//! [`netns::NetCluster`] is a cluster split across network namespaces, for partitions.
//!
//! A crate of its own so that the library's users never compile what the tests need (nix,
//! tempfile, rcgen, ...).

pub mod checker;
pub mod cluster;
pub mod netns;
pub mod server;

use std::future::Future;
use std::time::{Duration, Instant};

/// How long [`connect`] waits for the first connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `url` (one URL or a comma-separated list) with settings suited to tests: a short
/// reconnect delay and unlimited reconnects. Panics if not connected within [`CONNECT_TIMEOUT`].
pub async fn connect(url: impl AsRef<str>) -> async_nats::Client {
    let url = url.as_ref();
    let urls: Vec<String> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect();
    let options = async_nats::ConnectOptions::new()
        .name("ce-messaging-tests")
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempt| {
            Duration::from_millis((50 * (attempt as u64 + 1)).min(500))
        });
    match tokio::time::timeout(CONNECT_TIMEOUT, options.connect(urls.as_slice())).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => panic!("connect to {url}: {e}"),
        Err(_) => panic!("connect to {url}: no connection after {CONNECT_TIMEOUT:?}"),
    }
}

/// Polls `condition` until it returns true; panics if it is still false after `timeout`.
///
/// ```ignore
/// support::eventually(Duration::from_secs(5), || async { server.is_running() }).await;
/// ```
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        // A condition that hangs must not defeat the deadline.
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(true) = tokio::time::timeout(left, condition()).await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
