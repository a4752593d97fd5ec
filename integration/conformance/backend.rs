//! What a backend must provide for the conformance cases to run against it: a fresh,
//! isolated environment per test, connections made from it, and a look at the stored messages
//! and consumer state (the cases assert on what the broker holds, not only on what handlers saw).
//!
//! Queries and events are two factory traits, because a backend may offer only one of them
//! (core NATS has no persistence: it is only a [`QueryBackend`]).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ce_messaging::codec::HeaderMap;
use ce_messaging::config::Config;
use ce_messaging::events::{DurableInfo, EventConnection};
use ce_messaging::query::QueryConnection;

/// A fresh random name part (xid: 20 base32 characters), for ids, subjects and durables.
pub fn unique() -> String {
    xid::new().to_string()
}

/// A configuration with the test-friendly parts every backend shares: a random client id, short
/// timeouts, small redelivery delays.
pub fn base_config(role: &str) -> Config {
    Config {
        client_id: format!("conf-{role}-{}", unique()),
        request_timeout: Duration::from_secs(5),
        events_timeout: Duration::from_secs(5),
        js_ack_wait: Duration::from_secs(5),
        js_max_deliver: 5,
        ..Config::default()
    }
}

/// Builds query connections that share one broker / server.
#[async_trait]
pub trait QueryBackend: Send + Sync + Sized + 'static {
    /// The connection type under test.
    type Queries: QueryConnection + Clone + 'static;

    /// A fresh environment for one test (its own broker, or its own server).
    async fn start() -> Self;

    /// A configuration for a connection of this environment (random client id; the server
    /// address).
    fn config(&self, role: &str) -> Config;

    /// A connection made from `config` (client id, content mode, queue group...).
    async fn queries(&self, config: &Config) -> Self::Queries;

    /// Closes a connection (drain then close).
    async fn close_queries(connection: &Self::Queries);

    /// Sends raw `headers` and `payload` as a request on `subject` (a request the library
    /// would not send, e.g. a type that differs from its subject) and returns the reply's
    /// headers and payload as they came. Panics when no reply arrives within `timeout`.
    async fn request_raw(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        timeout: Duration,
    ) -> (HeaderMap, Bytes);
}

/// Why a backend honestly cannot do something a case needs; `None` means it can.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventCaps {
    /// Putting arbitrary bytes (not a CloudEvent) on an event subject, to see the listener
    /// dead-letter it with reason `decode`.
    pub raw_publish: Option<&'static str>,
    /// Reading cron in a time zone that is not UTC all year (`Europe/Berlin`).
    pub cron_time_zones: Option<&'static str>,
}

/// A message as the broker stores it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl Stored {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.as_str().to_owned())
    }
}

/// A durable consumer's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerState {
    /// Messages not yet delivered to the consumer.
    pub pending: u64,
    /// Messages delivered and neither acked nor terminated.
    pub ack_pending: u64,
}

/// Builds event connections that share one broker / server, and lets cases look at what the
/// broker stored.
#[async_trait]
pub trait EventBackend: Send + Sync + Sized + 'static {
    /// The module name of this backend in the suite (`memory`, `jetstream`, ...).
    const NAME: &'static str;

    /// The connection type under test.
    type Events: EventConnection + Clone + 'static;

    /// What this backend cannot do, and why.
    fn caps() -> EventCaps;

    /// A fresh environment for one test; the events and dead-letter streams of
    /// [`config`](Self::config) exist.
    async fn start() -> Self;

    /// A configuration for a connection of this environment (random client id; the stream
    /// names this environment created).
    fn config(&self, role: &str) -> Config;

    /// A connection made from `config`.
    async fn events(&self, config: &Config) -> Self::Events;

    /// Closes a connection (drain then close).
    async fn close_events(connection: &Self::Events);

    /// Every message stored in `stream`, oldest first.
    async fn stored(&self, stream: &str) -> Vec<Stored>;

    /// The counts of durable consumer `durable` on `stream`; `None` if it does not exist.
    async fn consumer_state(&self, stream: &str, durable: &str) -> Option<ConsumerState>;

    /// Stores raw bytes on `subject` (only called when [`EventCaps::raw_publish`] is `None`).
    async fn publish_raw(&self, subject: &str, headers: HeaderMap, payload: Bytes);

    /// The library's view of durable `durable` (`consumer_info` of the connection type).
    async fn durable_info(connection: &Self::Events, durable: &str) -> DurableInfo;

    /// How many deliveries durable `durable` on `stream` has made, redeliveries included
    /// (JetStream: the consumer's delivered consumer sequence); `None` if it does not exist.
    async fn deliveries(&self, stream: &str, durable: &str) -> Option<u64>;
}
