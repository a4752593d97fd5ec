//! The in-memory backend: one fresh [`MemoryBroker`] per test, its streams created with
//! `init_stream` as a service would.

use async_trait::async_trait;
use bytes::Bytes;
use ce_messaging::codec::HeaderMap;
use ce_messaging::config::Config;
use ce_messaging::events::{DurableInfo, EventConnection};
use ce_messaging::{MemoryBroker, MemoryEvents, MemoryQueries};

use crate::backend::{base_config, ConsumerState, EventBackend, EventCaps, QueryBackend, Stored};

/// A broker of its own for one test.
pub struct Memory {
    broker: MemoryBroker,
}

#[async_trait]
impl QueryBackend for Memory {
    type Queries = MemoryQueries;

    async fn start() -> Self {
        Memory {
            broker: MemoryBroker::new(),
        }
    }

    fn config(&self, role: &str) -> Config {
        base_config(role)
    }

    async fn queries(&self, config: &Config) -> MemoryQueries {
        self.broker.query_connection(config)
    }

    async fn close_queries(connection: &MemoryQueries) {
        connection.close().await;
    }

    async fn request_raw(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        timeout: std::time::Duration,
    ) -> (HeaderMap, Bytes) {
        self.broker
            .request_raw(subject, headers, payload, timeout)
            .await
            .expect("a reply to the raw request")
    }
}

#[async_trait]
impl EventBackend for Memory {
    const NAME: &'static str = "memory";
    type Events = MemoryEvents;

    fn caps() -> EventCaps {
        EventCaps {
            cron_time_zones: Some("the memory backend reads cron in UTC only"),
            ..EventCaps::default()
        }
    }

    async fn start() -> Self {
        let broker = MemoryBroker::new();
        broker
            .event_connection(&base_config("init"))
            .init_stream()
            .await
            .expect("init_stream");
        Memory { broker }
    }

    fn config(&self, role: &str) -> Config {
        base_config(role)
    }

    async fn events(&self, config: &Config) -> MemoryEvents {
        self.broker.event_connection(config)
    }

    async fn close_events(connection: &MemoryEvents) {
        connection.close().await;
    }

    async fn stored(&self, stream: &str) -> Vec<Stored> {
        self.broker
            .stream_messages(stream)
            .expect("stream exists")
            .into_iter()
            .map(|m| Stored {
                subject: m.subject,
                headers: m.headers,
                payload: m.payload,
            })
            .collect()
    }

    async fn consumer_state(&self, stream: &str, durable: &str) -> Option<ConsumerState> {
        self.broker
            .consumer_info(stream, durable)
            .map(|info| ConsumerState {
                pending: info.num_pending,
                ack_pending: info.num_ack_pending,
            })
    }

    async fn durable_info(connection: &MemoryEvents, durable: &str) -> DurableInfo {
        connection.consumer_info(durable).expect("consumer info")
    }

    async fn deliveries(&self, stream: &str, durable: &str) -> Option<u64> {
        self.broker
            .consumer_info(stream, durable)
            .map(|info| info.delivered)
    }

    async fn publish_raw(&self, subject: &str, headers: HeaderMap, payload: Bytes) {
        self.broker
            .publish_raw(subject, headers, payload)
            .expect("raw publish");
    }
}
