//! Core NATS: `NatsQueries`, each connection its own client, against one nats-server started
//! for the test (JetStream off: queries do not need it).

use async_trait::async_trait;
use bytes::Bytes;
use ce_messaging::codec::HeaderMap;
use ce_messaging::config::Config;
use ce_messaging::NatsQueries;

use crate::backend::{base_config, QueryBackend};
use crate::support::server::{NatsServer, ServerOptions};

/// A nats-server of its own for one test; killed and deleted when the test ends.
pub struct CoreNats {
    server: NatsServer,
}

#[async_trait]
impl QueryBackend for CoreNats {
    type Queries = NatsQueries;

    async fn start() -> Self {
        let server = crate::backends::start_server(|| {
            NatsServer::start_with(ServerOptions {
                jetstream: false,
                ..Default::default()
            })
        })
        .await;
        CoreNats { server }
    }

    fn config(&self, role: &str) -> Config {
        let mut config = base_config(role);
        config.nats_url = self.server.url();
        config
    }

    async fn queries(&self, config: &Config) -> NatsQueries {
        NatsQueries::connect(config).await.expect("connect")
    }

    async fn close_queries(connection: &NatsQueries) {
        connection.close().await;
    }

    async fn request_raw(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        timeout: std::time::Duration,
    ) -> (HeaderMap, Bytes) {
        let client = crate::support::connect(self.server.url()).await;
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(payload)
            .timeout(Some(timeout));
        let reply = client
            .send_request(subject.to_owned(), request)
            .await
            .expect("a reply to the raw request");
        (reply.headers.unwrap_or_default(), reply.payload)
    }
}
