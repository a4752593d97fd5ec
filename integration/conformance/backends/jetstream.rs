//! JetStream: `JetStreamEvents`, each connection its own client, against one JetStream
//! nats-server started for the test, with the events and dead-letter streams created by
//! `init_stream` as a service would. Stored messages and consumer counts are read through the
//! JetStream API with a plain client.

use async_trait::async_trait;
use bytes::Bytes;
use ce_messaging::codec::HeaderMap;
use ce_messaging::config::Config;
use ce_messaging::events::{DurableInfo, EventConnection};
use ce_messaging::JetStreamEvents;

use crate::backend::{base_config, ConsumerState, EventBackend, EventCaps, Stored};
use crate::support::server::NatsServer;

/// A JetStream nats-server of its own for one test; killed and deleted when the test ends.
pub struct JetStream {
    server: NatsServer,
    js: async_nats::jetstream::Context,
}

#[async_trait]
impl EventBackend for JetStream {
    const NAME: &'static str = "jetstream";
    type Events = JetStreamEvents;

    fn caps() -> EventCaps {
        EventCaps::default()
    }

    async fn start() -> Self {
        let server = crate::backends::start_server(NatsServer::start).await;
        let client = crate::support::connect(&server.url()).await;
        let mut config = base_config("init");
        config.nats_url = server.url();
        JetStreamEvents::from_client(client.clone(), &config)
            .init_stream()
            .await
            .expect("init_stream");
        JetStream {
            server,
            js: async_nats::jetstream::new(client),
        }
    }

    fn config(&self, role: &str) -> Config {
        let mut config = base_config(role);
        config.nats_url = self.server.url();
        config
    }

    async fn events(&self, config: &Config) -> JetStreamEvents {
        JetStreamEvents::connect(config).await.expect("connect")
    }

    async fn close_events(connection: &JetStreamEvents) {
        connection.close().await;
    }

    async fn stored(&self, stream: &str) -> Vec<Stored> {
        let mut handle = self.js.get_stream(stream).await.expect("stream exists");
        let state = handle.info().await.expect("stream info").state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        for sequence in state.first_sequence..=state.last_sequence {
            // Gaps (deleted messages) are skipped.
            if let Ok(message) = handle.get_raw_message(sequence).await {
                out.push(Stored {
                    subject: message.subject.to_string(),
                    headers: message.headers,
                    payload: message.payload,
                });
            }
        }
        out
    }

    async fn consumer_state(&self, stream: &str, durable: &str) -> Option<ConsumerState> {
        let handle = self.js.get_stream(stream).await.ok()?;
        let info = handle.consumer_info(durable).await.ok()?;
        Some(ConsumerState {
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
        })
    }

    async fn durable_info(connection: &JetStreamEvents, durable: &str) -> DurableInfo {
        connection
            .consumer_info(durable)
            .await
            .expect("consumer info")
    }

    async fn deliveries(&self, stream: &str, durable: &str) -> Option<u64> {
        let handle = self.js.get_stream(stream).await.ok()?;
        let info = handle.consumer_info(durable).await.ok()?;
        Some(info.delivered.consumer_sequence)
    }

    async fn publish_raw(&self, subject: &str, headers: HeaderMap, payload: Bytes) {
        self.js
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
            .expect("raw publish sent")
            .await
            .expect("raw publish stored");
    }
}
