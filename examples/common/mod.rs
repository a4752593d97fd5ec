//! Backend selection shared by the examples: the in-memory backend by default, NATS and
//! JetStream when `NATS_URL` is set.

use std::sync::Arc;

use ce_messaging::prelude::*;
use ce_messaging::{JetStreamEvents, MemoryBroker, NatsQueries};

/// The two connections a service uses, behind the traits it is written against.
pub struct Backends {
    // Not every example makes queries (the reminder, cron and quote examples use events only).
    #[allow(dead_code)]
    pub queries: Arc<dyn QueryConnection>,
    pub events: Arc<dyn EventConnection>,
    pub name: &'static str,
}

/// Connects to NATS when `NATS_URL` is set, else makes an in-memory broker.
pub async fn backends(config: &Config) -> Result<Backends, Box<dyn std::error::Error>> {
    if std::env::var_os("NATS_URL").is_some() {
        let client = config.connect().await?;
        Ok(Backends {
            queries: Arc::new(NatsQueries::from_client(client.clone(), config)),
            events: Arc::new(JetStreamEvents::from_client(client, config)),
            name: "NATS",
        })
    } else {
        let broker = MemoryBroker::new();
        Ok(Backends {
            queries: Arc::new(broker.query_connection(config)),
            events: Arc::new(broker.event_connection(config)),
            name: "in-memory",
        })
    }
}
