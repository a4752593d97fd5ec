//! [`MemoryEvents`]: the [`EventConnection`] of the in-memory backend. Events are encoded with
//! the real codec and stored in the broker's streams; listeners pull from a durable consumer
//! into the shared bounded worker pool, where the shared delivery processing acks, naks,
//! reports progress and dead-letters.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::bus::is_valid_publish_subject;
use super::stream::{ConsumerSettings, Next, StreamSettings};
use super::MemoryBroker;
use crate::codec::{self, ContentMode, HeaderMap};
use crate::config::Config;
use crate::error::{
    BoxError, Error, ListenError, ListenErrorKind, PublishErrorKind, StreamError, StreamErrorKind,
};
use crate::event::populate_source;
use crate::event_source::{EventSource, RawEvent, SourceBackend};
use crate::events::{
    process_delivery, Acker, DeadLetterSink, Delivery, DeliveryContext, EventConnection,
    EventHandlers, EventListenOptions, PublishAck, PublishError,
};
use crate::headers::{DEAD_LETTER_STREAM_SEQ, NATS_MSG_ID};
use crate::listener::Listener;
use crate::worker::WorkerPool;

struct Inner {
    broker: MemoryBroker,
    client_id: String,
    stream: String,
    subject_prefix: String,
    durable_name: String,
    ack_wait: Duration,
    max_deliver: i64,
    duplicate_window: Duration,
    dlq_stream: String,
    events_timeout: Duration,
    mode: ContentMode,
    /// Cancelled by `close`; every listener's token is a child of it.
    closed: CancellationToken,
    listeners: Mutex<Vec<Listener>>,
    source: EventSource,
}

/// The in-memory [`EventConnection`]; made by
/// [`MemoryBroker::event_connection`](super::MemoryBroker::event_connection).
///
/// Cheap to clone; clones share the connection.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use ce_messaging::error::PublishErrorKind;
/// use ce_messaging::events::EventConnection;
/// use ce_messaging::event::new_event_auto_source;
///
/// let broker = ce_messaging::memory::MemoryBroker::new();
/// let events = broker.event_connection(&ce_messaging::config::Config::default());
/// let event = new_event_auto_source("org.example.order.created", &1)?;
/// // Like JetStream: no stream holds the subject until init_stream.
/// let err = events.publish(event.clone()).await.unwrap_err();
/// assert_eq!(err.kind(), PublishErrorKind::StreamNotFound);
/// events.init_stream().await?;
/// let ack = events.publish(event.clone()).await?;
/// assert!(!ack.duplicate);
/// assert!(events.publish(event).await?.duplicate, "same event id within the window");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemoryEvents {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryEvents")
            .field("client_id", &self.inner.client_id)
            .field("stream", &self.inner.stream)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The `Nats-Msg-Id` of a dead letter: the original id (or stream and sequence) plus
/// `.dlq.<durable>`, so that one event dead-lettered by two durables gives two dead letters
/// (the same ids as the JetStream backend).
fn dead_letter_msg_id(
    original: Option<&str>,
    stream: &str,
    stream_seq: &str,
    durable: &str,
) -> String {
    match original {
        Some(id) if !id.is_empty() => format!("{id}.dlq.{durable}"),
        _ => format!("{stream}.{stream_seq}.dlq.{durable}"),
    }
}

fn valid_durable(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
}

impl MemoryEvents {
    pub(super) fn new(broker: MemoryBroker, config: &Config) -> Self {
        let source = EventSource::new(Arc::new(MemorySource {
            broker: broker.clone(),
            prefix: config.js_subject_prefix.clone(),
        }));
        MemoryEvents {
            inner: Arc::new(Inner {
                broker,
                client_id: config.client_id.clone(),
                stream: config.js_stream.clone(),
                subject_prefix: config.js_subject_prefix.clone(),
                durable_name: config.durable_name().to_owned(),
                ack_wait: config.js_ack_wait,
                max_deliver: config.js_max_deliver,
                duplicate_window: config.js_duplicate_window,
                dlq_stream: config.js_dlq_stream.clone(),
                events_timeout: config.events_timeout,
                mode: config.ce_mode,
                closed: CancellationToken::new(),
                listeners: Mutex::new(Vec::new()),
                source,
            }),
        }
    }

    /// Whether [`close`](Self::close) was called.
    ///
    /// # Examples
    ///
    /// ```
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// let events = broker.event_connection(&ce_messaging::config::Config::default());
    /// assert!(!events.is_closed());
    /// ```
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Drain then close: refuses new publishes and listeners, stops this connection's listeners
    /// (each lets its in-flight handlers finish and settle within its grace period; queued
    /// events are handed back for redelivery) and returns when they have stopped.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// let events = broker.event_connection(&ce_messaging::config::Config::default());
    /// events.close().await;
    /// assert!(events.is_closed());
    /// # }
    /// ```
    pub async fn close(&self) {
        self.inner.closed.cancel();
        let listeners: Vec<Listener> = self
            .inner
            .listeners
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        for listener in listeners {
            listener.stopped().await;
        }
    }

    /// Creates or updates the events stream (`<prefix>.>`) and the dead-letter stream
    /// (`deadletter.<stream>.>`).
    pub(super) fn create_streams(&self) -> Result<(), StreamError> {
        let inner = &self.inner;
        let max_messages = inner.broker.options().max_stream_messages;
        inner.broker.streams().create_or_update(
            &inner.stream,
            StreamSettings {
                subjects: vec![format!("{}.>", inner.subject_prefix)],
                duplicate_window: inner.duplicate_window,
                max_messages,
            },
        )?;
        inner.broker.streams().create_or_update(
            &inner.dlq_stream,
            StreamSettings {
                subjects: vec![format!("deadletter.{}.>", inner.stream)],
                duplicate_window: inner.duplicate_window,
                max_messages,
            },
        )
    }

    fn publish_one(&self, mut event: Event) -> Result<PublishAck, PublishError> {
        let inner = &self.inner;
        if self.is_closed() {
            return Err(PublishError::new(
                PublishErrorKind::ConnectionClosed,
                Some(event),
            ));
        }
        populate_source(&mut event, &inner.client_id);
        let subject = format!("{}.{}", inner.subject_prefix, event.ty());
        if !is_valid_publish_subject(&subject) {
            let err = Error::with_detail(
                PublishErrorKind::Other,
                format!("the event type gives the invalid subject {subject:?}"),
            );
            return Err(PublishError::from_error(err, Some(event)));
        }
        let encoded = match codec::encode(&event, inner.mode) {
            Ok(encoded) => encoded,
            Err(err) => {
                let err = err.map_kind(|_| PublishErrorKind::Encode);
                return Err(PublishError::from_error(err, Some(event)));
            }
        };
        let mut headers = encoded.headers;
        let msg_id: async_nats::HeaderValue = match event.id().parse() {
            Ok(value) => value,
            Err(_) => {
                let err = Error::with_detail(
                    PublishErrorKind::Encode,
                    "the event id is not a valid header value",
                );
                return Err(PublishError::from_error(err, Some(event)));
            }
        };
        headers.insert(NATS_MSG_ID, msg_id);
        if let Err(detail) = inner.broker.check_size(&headers, &encoded.payload) {
            let err = Error::with_detail(PublishErrorKind::TooLarge, detail);
            return Err(PublishError::from_error(err, Some(event)));
        }
        inner
            .broker
            .js_publish(&subject, headers, encoded.payload)
            .map_err(|err| PublishError::from_error(err, Some(event)))
    }
}

#[async_trait]
impl EventConnection for MemoryEvents {
    async fn publish(&self, event: Event) -> Result<PublishAck, PublishError> {
        self.publish_one(event)
    }

    async fn publish_all(&self, events: Vec<Event>) -> Vec<Result<PublishAck, PublishError>> {
        events.into_iter().map(|e| self.publish_one(e)).collect()
    }

    async fn listen(
        &self,
        handlers: EventHandlers,
        options: EventListenOptions,
    ) -> Result<Listener, ListenError> {
        options.validate(&handlers)?;
        let inner = &self.inner;
        if self.is_closed() {
            return Err(Error::new(ListenErrorKind::ConnectionClosed));
        }
        let durable = options
            .durable_name
            .clone()
            .unwrap_or_else(|| inner.durable_name.clone());
        if !valid_durable(&durable) {
            return Err(Error::with_detail(
                ListenErrorKind::InvalidOptions,
                format!("invalid durable name {durable:?}"),
            ));
        }
        let streams = inner.broker.streams();
        if !streams.exists(&inner.stream) {
            return Err(Error::with_detail(
                ListenErrorKind::StreamNotFound,
                format!(
                    "stream {} does not exist (init_stream creates it)",
                    inner.stream
                ),
            ));
        }
        let max_deliver = options.max_deliver.unwrap_or(inner.max_deliver);
        let ack_wait = options.ack_wait.unwrap_or(inner.ack_wait);
        let filter_subjects: Vec<String> = handlers
            .types()
            .map(|t| format!("{}.{t}", inner.subject_prefix))
            .collect();
        streams
            .create_or_update_consumer(
                &inner.stream,
                &durable,
                ConsumerSettings {
                    filter_subjects,
                    ack_wait,
                    // One delivery more than allowed, so that the shared processing sees a
                    // message that ran out of deliveries once more and dead-letters it.
                    max_deliver: if max_deliver > 0 { max_deliver + 1 } else { 0 },
                    max_ack_pending: options.workers + options.buffer,
                },
            )
            .map_err(|e| Error::with_source(ListenErrorKind::Consumer, e))?;

        let ctx = Arc::new(DeliveryContext {
            handlers,
            max_deliver,
            ack_wait,
            backoff: options.backoff,
            dead_letters: Arc::new(MemoryDeadLetters {
                broker: inner.broker.clone(),
                subject: format!("deadletter.{}.{durable}", inner.stream),
                events_stream: inner.stream.clone(),
                durable: durable.clone(),
            }),
            connection: Arc::new(self.clone()),
            source: inner.client_id.clone(),
        });
        let pool = WorkerPool::start(options.workers, options.buffer, move |delivery, work| {
            let ctx = ctx.clone();
            async move { process_delivery(delivery, &ctx, &work).await }.boxed()
        });
        let submitter = pool.submitter();
        let stopping = pool.context().stopping;
        let broker = inner.broker.clone();
        let stream: Arc<str> = Arc::from(inner.stream.as_str());
        let durable: Arc<str> = Arc::from(durable.as_str());
        pool.spawn_intake(async move {
            loop {
                let next = tokio::select! {
                    biased;
                    _ = stopping.cancelled() => break,
                    next = broker.streams().next(&stream, &durable) => next,
                };
                let delivered = match next {
                    Next::Message(delivered) => delivered,
                    Next::Gone => {
                        tracing::warn!(stream = %stream, durable = %durable, "stream or consumer deleted; listener gets no more events");
                        break;
                    }
                };
                let message = delivered.message;
                let delivery = Delivery {
                    subject: message.subject.clone(),
                    headers: (!message.headers.is_empty()).then(|| message.headers.clone()),
                    payload: message.payload.clone(),
                    stream_sequence: message.sequence,
                    delivered: delivered.deliveries,
                    acker: Box::new(MemoryAcker {
                        broker: broker.clone(),
                        stream: stream.clone(),
                        durable: durable.clone(),
                        seq: message.sequence,
                    }),
                };
                if let Err(delivery) = submitter.submit(delivery).await {
                    // Stopping: hand it back for immediate redelivery to another instance.
                    let _ = delivery.acker.nak(None).await;
                    break;
                }
            }
        });
        let token = inner.closed.child_token();
        let listener = Listener::supervise(pool, options.grace, token);
        if let Ok(mut listeners) = inner.listeners.lock() {
            listeners.retain(|l| !l.is_stopped());
            listeners.push(listener.clone());
        }
        Ok(listener)
    }

    async fn init_stream(&self) -> Result<(), StreamError> {
        if self.is_closed() {
            return Err(Error::with_detail(
                StreamErrorKind::Other,
                "connection closed",
            ));
        }
        self.create_streams()
    }

    fn event_source(&self) -> EventSource {
        self.inner.source.clone()
    }

    fn events_timeout(&self) -> Duration {
        self.inner.events_timeout
    }
}

/// Settles deliveries with the broker's consumer.
struct MemoryAcker {
    broker: MemoryBroker,
    stream: Arc<str>,
    durable: Arc<str>,
    seq: u64,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), BoxError> {
        self.broker
            .streams()
            .ack(&self.stream, &self.durable, self.seq);
        Ok(())
    }

    async fn nak(&self, delay: Option<Duration>) -> Result<(), BoxError> {
        self.broker
            .streams()
            .nak(&self.stream, &self.durable, self.seq, delay);
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), BoxError> {
        self.broker
            .streams()
            .in_progress(&self.stream, &self.durable, self.seq);
        Ok(())
    }

    async fn term(&self) -> Result<(), BoxError> {
        self.broker
            .streams()
            .term(&self.stream, &self.durable, self.seq);
        Ok(())
    }
}

/// Stores dead letters in the dead-letter stream (through the broker, like a publish).
struct MemoryDeadLetters {
    broker: MemoryBroker,
    subject: String,
    events_stream: String,
    durable: String,
}

#[async_trait]
impl DeadLetterSink for MemoryDeadLetters {
    async fn publish_dead_letter(
        &self,
        mut headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), BoxError> {
        let original = headers.get(NATS_MSG_ID).map(|v| v.as_str().to_owned());
        let seq = headers
            .get(DEAD_LETTER_STREAM_SEQ)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let id = dead_letter_msg_id(
            original.as_deref(),
            &self.events_stream,
            &seq,
            &self.durable,
        );
        let id: async_nats::HeaderValue = id
            .parse()
            .map_err(|_| format!("dead-letter id {id:?} is not a valid header value"))?;
        headers.insert(NATS_MSG_ID, id);
        self.broker.check_size(&headers, &payload)?;
        let ack = self.broker.js_publish(&self.subject, headers, payload)?;
        tracing::debug!(subject = %self.subject, stream = %ack.stream, seq = ack.sequence, duplicate = ack.duplicate, "dead letter stored");
        Ok(())
    }
}

/// Live subscriptions for the [`EventSource`]: plain (non-queue) subscriptions to the events'
/// subjects, active as soon as `subscribe` returns.
struct MemorySource {
    broker: MemoryBroker,
    prefix: String,
}

#[async_trait]
impl SourceBackend for MemorySource {
    async fn subscribe(
        &self,
        event_type: Option<&str>,
    ) -> Result<BoxStream<'static, RawEvent>, ListenError> {
        let subject = match event_type {
            Some(t) => format!("{}.{t}", self.prefix),
            None => format!("{}.>", self.prefix),
        };
        if !super::bus::is_valid_pattern(&subject) {
            return Err(Error::with_detail(
                ListenErrorKind::Subscribe,
                format!("{subject:?} is not a valid subject"),
            ));
        }
        let subscription = self.broker.bus().subscribe(&subject, None);
        Ok(subscription
            .map(|message| RawEvent {
                headers: message.headers,
                payload: message.payload,
            })
            .boxed())
    }
}
