//! The subscriptions behind the JetStream connection's [`EventSource`](crate::event_source::EventSource):
//! plain core-NATS subscriptions on the event subjects (`<prefix>.<type>`, or `<prefix>.>` for
//! all types). Every event stored by the stream was published on such a subject, so they see
//! each published event as it is published, with no consumer to create or clean up.
//!
//! A publish that was retried after a lost ack reaches these subscriptions once per attempt
//! (the stream stores it once); listeners that must not see an event twice compare event ids.

use async_nats::RequestErrorKind;
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::config::Config;
use crate::error::{Error, ListenError, ListenErrorKind};
use crate::event_source::{RawEvent, SourceBackend};

pub(crate) struct CoreSubscriptions {
    client: async_nats::Client,
    prefix: String,
    confirm_timeout: std::time::Duration,
}

impl CoreSubscriptions {
    pub(crate) fn new(client: async_nats::Client, config: &Config) -> Self {
        CoreSubscriptions {
            client,
            prefix: config.js_subject_prefix.clone(),
            confirm_timeout: config.request_timeout,
        }
    }
}

#[async_trait]
impl SourceBackend for CoreSubscriptions {
    async fn subscribe(
        &self,
        event_type: Option<&str>,
    ) -> Result<BoxStream<'static, RawEvent>, ListenError> {
        let subject = match event_type {
            Some(t) => format!("{}.{t}", self.prefix),
            None => format!("{}.>", self.prefix),
        };
        let subscriber = self.client.subscribe(subject.clone()).await.map_err(|e| {
            Error::with_source(ListenErrorKind::Subscribe, e).detail(format!("subject {subject}"))
        })?;
        // The contract of `subscribe`: active on the server when it returns. A flush only
        // writes the socket, so make a round trip instead: a request nobody answers comes back
        // as "no responders" once the server has processed everything sent before it,
        // including the SUB.
        let probe = format!("{}.subscribed", self.client.new_inbox());
        match tokio::time::timeout(
            self.confirm_timeout,
            self.client.request(probe, Bytes::new()),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {}
            Ok(Err(e)) => {
                return Err(Error::with_source(ListenErrorKind::Subscribe, e)
                    .detail(format!("subscription to {subject} not confirmed")))
            }
            Err(_) => {
                return Err(Error::with_detail(
                    ListenErrorKind::Subscribe,
                    format!(
                        "subscription to {subject} not confirmed within {:?}",
                        self.confirm_timeout
                    ),
                ))
            }
        }
        Ok(subscriber
            .map(|message| RawEvent {
                headers: message.headers,
                payload: message.payload,
            })
            .boxed())
    }
}
