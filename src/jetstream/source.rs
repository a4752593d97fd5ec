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
    /// With priorities on, a type's events are also on `<prefix>._priority.*.<type>`.
    priorities: bool,
}

impl CoreSubscriptions {
    pub(crate) fn new(client: async_nats::Client, config: &Config) -> Self {
        CoreSubscriptions {
            client,
            prefix: config.js_subject_prefix.clone(),
            confirm_timeout: config.request_timeout,
            priorities: config.js_priority_levels > 1,
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
        let subscribe = |subject: String| async move {
            self.client.subscribe(subject.clone()).await.map_err(|e| {
                Error::with_source(ListenErrorKind::Subscribe, e)
                    .detail(format!("subject {subject}"))
            })
        };
        let subscriber = subscribe(subject.clone()).await?;
        // With priorities on, the type's events of the higher levels are on their own
        // subjects (`<prefix>.>` already covers them).
        let prioritised = match event_type {
            Some(t) if self.priorities => Some(
                subscribe(format!(
                    "{}.{}.*.{t}",
                    self.prefix,
                    crate::events::PRIORITY_TOKEN
                ))
                .await?,
            ),
            _ => None,
        };
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
        let raw = |message: async_nats::Message| RawEvent {
            headers: message.headers,
            payload: message.payload,
        };
        Ok(match prioritised {
            Some(prioritised) => {
                futures::stream::select(subscriber.map(raw), prioritised.map(raw)).boxed()
            }
            None => subscriber.map(raw).boxed(),
        })
    }
}
