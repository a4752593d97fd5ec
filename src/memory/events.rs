//! [`MemoryEvents`]: the [`EventConnection`] of the in-memory backend. Events are encoded with
//! the real codec and stored in the broker's streams; listeners pull from a durable consumer
//! into the shared bounded worker pool, where the shared delivery processing acks, naks,
//! reports progress and dead-letters.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::stream::{ConsumerSettings, Next, StreamSettings};
use super::MemoryBroker;
use crate::codec::{self, ContentMode, HeaderMap};
use crate::config::Config;
use crate::error::{
    BoxError, Error, ListenError, ListenErrorKind, PublishErrorKind, StreamError, StreamErrorKind,
};
use crate::event::{check_type, populate_source};
use crate::event_source::{EventSource, RawEvent, SourceBackend};
use crate::events::{level_subjects, priority_durable, priority_subject, publish_level};
use crate::events::{
    start_delivery_pool, Acker, DeadLetterPublishError, DeadLetterSink, Delivery, DeliveryContext,
    EventConnection, EventHandlers, EventListenOptions, PublishAck, PublishError, PublishOptions,
    ScheduleInfo,
};
use crate::headers::NATS_MSG_ID;
use crate::listener::Listener;
use crate::worker::{DeliveryWindow, WorkContext};

struct Inner {
    broker: MemoryBroker,
    config: Config,
    client_id: String,
    stream: String,
    subject_prefix: String,
    durable_name: String,
    ack_wait: Duration,
    max_deliver: i64,
    handler_timeout: Duration,
    /// `NATS_JS_START_POSITION`: where new durables start.
    start_position: Option<crate::config::StartPosition>,
    duplicate_window: Duration,
    dlq_stream: String,
    events_timeout: Duration,
    mode: ContentMode,
    /// Cancelled when `close` begins; every listener's token is a child of it, and no new
    /// listener starts.
    closing: CancellationToken,
    /// Cancelled when `close` has stopped the listeners: nothing is sent any more.
    closed: CancellationToken,
    /// The types published so far and their metric handles.
    known_types: crate::events::KnownTypes,
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
/// use ce_messaging::cloudevent::new_event_auto_source;
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
            priorities: config.js_priority_levels > 1,
        }));
        MemoryEvents {
            inner: Arc::new(Inner {
                known_types: Default::default(),
                broker,
                config: config.clone(),
                client_id: config.client_id.clone(),
                stream: config.js_stream.clone(),
                subject_prefix: config.js_subject_prefix.clone(),
                durable_name: config.durable_name().to_owned(),
                ack_wait: config.js_ack_wait,
                max_deliver: config.js_max_deliver,
                handler_timeout: config.js_handler_timeout,
                start_position: config.js_start_position,
                duplicate_window: config.js_duplicate_window,
                dlq_stream: config.js_dlq_stream.clone(),
                events_timeout: config.events_timeout,
                mode: config.ce_mode,
                closing: CancellationToken::new(),
                closed: CancellationToken::new(),
                listeners: Mutex::new(Vec::new()),
                source,
            }),
        }
    }

    /// The configuration the connection was made with.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::config::Config;
    /// let config = Config { client_id: "billing".into(), ..Config::default() };
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// assert_eq!(broker.event_connection(&config).config().client_id, "billing");
    /// ```
    pub fn config(&self) -> &Config {
        &self.inner.config
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

    /// Drain then close: refuses new listeners, stops this connection's listeners (each lets its
    /// in-flight handlers finish, publish their responses and settle within its grace period;
    /// queued events are handed back for redelivery), then refuses publishes. Returns when the
    /// listeners have stopped.
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
        self.inner.closing.cancel();
        let listeners: Vec<Listener> = self
            .inner
            .listeners
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        for listener in listeners {
            listener.stopped().await;
        }
        self.inner.closed.cancel();
    }

    /// The state of durable consumer `durable` on this connection's events stream, as
    /// [`JetStreamEvents::consumer_info`](crate::jetstream::JetStreamEvents::consumer_info)
    /// reports it (here `parked` is counted exactly).
    ///
    /// # Errors
    ///
    /// `StreamErrorKind::NotFound` when the stream or the durable does not exist.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use ce_messaging::error::StreamErrorKind;
    /// let broker = ce_messaging::memory::MemoryBroker::with_auto_streams();
    /// let events = broker.event_connection(&ce_messaging::config::Config::default());
    /// let err = events.consumer_info("billing").unwrap_err();
    /// assert_eq!(err.kind(), StreamErrorKind::NotFound);
    /// # }
    /// ```
    pub fn consumer_info(&self, durable: &str) -> Result<crate::events::DurableInfo, StreamError> {
        let inner = &self.inner;
        let Some(info) = inner.broker.consumer_info(&inner.stream, durable) else {
            return Err(Error::with_detail(
                StreamErrorKind::NotFound,
                format!("no durable consumer {durable} on stream {}", inner.stream),
            ));
        };
        let mut filter_subjects = info.filter_subjects.clone();
        filter_subjects.sort();
        Ok(crate::events::DurableInfo {
            stream: info.stream,
            durable: info.name,
            filter_subjects,
            pending: info.num_pending,
            ack_pending: info.num_ack_pending,
            redelivered: info.num_redelivered + info.exhausted,
            ack_floor: info.ack_floor,
            last_delivered: info.last_delivered,
            deliveries: info.delivered,
            max_deliver: info.max_deliver,
            parked: info.exhausted,
        })
    }

    /// Creates or updates the events stream (`<prefix>.>`) and the dead-letter stream
    /// (`deadletter.<stream>.>`).
    pub(super) fn create_streams(&self) -> Result<(), StreamError> {
        let inner = &self.inner;
        let max_messages = inner.broker.options().max_stream_messages;
        let max_bytes = inner.broker.options().max_stream_bytes;
        inner.broker.streams().create_or_update(
            &inner.stream,
            StreamSettings {
                subjects: vec![
                    format!("{}.>", inner.subject_prefix),
                    crate::events::schedule::schedule_subjects(&inner.stream),
                ],
                duplicate_window: inner.duplicate_window,
                max_messages,
                max_bytes,
            },
        )?;
        inner.broker.streams().create_or_update(
            &inner.dlq_stream,
            StreamSettings {
                subjects: vec![format!("deadletter.{}.>", inner.stream)],
                duplicate_window: inner.duplicate_window,
                max_messages,
                max_bytes,
            },
        )
    }

    fn publish_one(&self, event: Event) -> Result<PublishAck, PublishError> {
        self.publish_one_with(event, &PublishOptions::default())
    }

    fn publish_one_with(
        &self,
        mut event: Event,
        options: &PublishOptions,
    ) -> Result<PublishAck, PublishError> {
        let inner = &self.inner;
        if self.is_closed() {
            return Err(PublishError::new(
                PublishErrorKind::ConnectionClosed,
                Some(event),
            ));
        }
        populate_source(&mut event, &inner.client_id);
        if let Err(err) = check_type(event.ty()) {
            let err = err.map_kind(|_| PublishErrorKind::InvalidType);
            return Err(PublishError::from_error(err, Some(event)));
        }
        let level = match publish_level(&event, inner.config.js_priority_levels) {
            Ok(level) => level,
            Err(detail) => {
                let err = Error::with_detail(PublishErrorKind::InvalidPriority, detail);
                return Err(PublishError::from_error(err, Some(event)));
            }
        };
        let subject = priority_subject(
            &inner.subject_prefix,
            event.ty(),
            level,
            inner.config.js_priority_levels,
        );
        let directives = match crate::events::schedule::directives(
            options,
            event.id(),
            &inner.stream,
            &subject,
            inner.broker.streams().wall_now(),
        ) {
            Ok(directives) => directives,
            Err(err) => return Err(PublishError::from_error(err, Some(event))),
        };
        let encoded = match codec::encode(&event, inner.mode) {
            Ok(encoded) => encoded,
            Err(err) => {
                let err = err.map_kind(|_| PublishErrorKind::Encode);
                return Err(PublishError::from_error(err, Some(event)));
            }
        };
        let mut headers = HeaderMap::from(encoded.headers);
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
        for (name, value) in &directives.headers {
            headers.insert(*name, crate::headers::text_value(value));
        }
        let subject = directives.subject.unwrap_or(subject);
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
        crate::events::traced_publish(event, &self.inner.known_types, |event| async move {
            self.publish_one(event)
        })
        .await
    }

    async fn publish_all(&self, events: Vec<Event>) -> Vec<Result<PublishAck, PublishError>> {
        crate::events::traced_publish_all(events, |events| async move {
            events.into_iter().map(|e| self.publish_one(e)).collect()
        })
        .await
    }

    async fn publish_with(
        &self,
        event: Event,
        options: PublishOptions,
    ) -> Result<PublishAck, PublishError> {
        crate::events::traced_publish(event, &self.inner.known_types, |event| async move {
            self.publish_one_with(event, &options)
        })
        .await
    }

    async fn schedules(&self) -> Result<Vec<ScheduleInfo>, StreamError> {
        let prefix = crate::events::schedule_subject(&self.inner.stream, "");
        self.inner
            .broker
            .streams()
            .schedules(&self.inner.stream, &prefix)
    }

    async fn cancel_schedule(&self, id: &str) -> Result<bool, StreamError> {
        let subject = crate::events::schedule_subject(&self.inner.stream, id);
        self.inner
            .broker
            .streams()
            .cancel_schedule(&self.inner.stream, &subject)
    }

    async fn listen(
        &self,
        handlers: EventHandlers,
        options: EventListenOptions,
    ) -> Result<Listener, ListenError> {
        options.validate(&handlers)?;
        let inner = &self.inner;
        if self.inner.closing.is_cancelled() {
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
        // One consumer per priority level, highest first (one with priorities off).
        let levels = inner.config.js_priority_levels.max(1);
        let types: Vec<&str> = handlers.types().collect();
        let level_filters = level_subjects(&inner.subject_prefix, &types, levels);
        let mut filter_subjects: Vec<String> = level_filters.concat();
        filter_subjects.sort();
        let claim = DurableClaim::claim(&inner.broker, &inner.stream, &durable, &filter_subjects)
            .map_err(|theirs| {
            let types =
                |s: &[String]| crate::jetstream::consumer_type_list(s, &inner.subject_prefix);
            Error::with_detail(
                ListenErrorKind::DurableInUse,
                crate::jetstream::durable_in_use_detail(
                    &durable,
                    &types(&theirs),
                    &types(&filter_subjects),
                ),
            )
        })?;
        let start = options
            .start_position
            .or(inner.start_position)
            .unwrap_or_default();
        let mut consumers: Vec<Arc<str>> = Vec::with_capacity(level_filters.len());
        for (level, filter_subjects) in (0u8..).zip(level_filters) {
            let name = priority_durable(&durable, level, levels);
            streams
                .create_or_update_consumer(
                    &inner.stream,
                    &name,
                    ConsumerSettings {
                        filter_subjects,
                        ack_wait,
                        // No broker-side limit: the shared processing enforces `max_deliver`
                        // (dead-letters a delivery beyond it before any handler runs), so the
                        // broker never parks an event, as with JetStream.
                        max_deliver: 0,
                        max_ack_pending: options.window(),
                    },
                    start,
                )
                .map_err(|e| Error::with_source(ListenErrorKind::Consumer, e))?;
            consumers.push(Arc::from(name.as_str()));
        }

        let ctx = Arc::new(DeliveryContext {
            handlers,
            max_deliver,
            ack_wait,
            handler_timeout: options.handler_timeout.unwrap_or(inner.handler_timeout),
            backoff: options.backoff,
            dead_letters: Arc::new(MemoryDeadLetters {
                broker: inner.broker.clone(),
                subject: format!("deadletter.{}.{durable}", inner.stream),
                events_stream: inner.stream.clone(),
                durable: durable.clone(),
            }),
            connection: Arc::new(self.clone()),
            source: inner.client_id.as_str().into(),
        });
        // The listener's window, as the JetStream intake's: take only as many messages as
        // there are free places (workers + buffer); the queue has room for all of them.
        let window = DeliveryWindow::new(options.window());
        let threshold = options.pull_threshold();
        // The listener's token: the intake stops the listener when the stream goes away.
        let token = inner.closing.child_token();
        let pool = start_delivery_pool(options.pool.workers, &window, token.child_token(), ctx);
        let submitter = pool.submitter();
        let work = pool.context();
        let stop_listener = token.clone();
        let broker = inner.broker.clone();
        let stream: Arc<str> = Arc::from(inner.stream.as_str());
        let durable: Arc<str> = Arc::from(durable.as_str());
        pool.spawn_intake(async move {
            // Held while this listener pulls from the durable.
            let _claim = claim;
            'intake: loop {
                let mut reserved = tokio::select! {
                    biased;
                    _ = work.stopping.cancelled() => break,
                    reserved = window.reserve(threshold) => reserved,
                };
                while reserved.count() > 0 {
                    // Strict priority: the highest level with a message ready.
                    let (level, next) = tokio::select! {
                        biased;
                        _ = work.stopping.cancelled() => break 'intake,
                        next = broker.streams().next_of(&stream, &consumers) => next,
                    };
                    let delivered = match next {
                        Next::Message(delivered) => delivered,
                        Next::Gone => {
                            tracing::warn!(stream = %stream, durable = %durable, "stream or consumer deleted; listener stops");
                            stop_listener.cancel();
                            break 'intake;
                        }
                    };
                    let message = delivered.message;
                    let acker: Arc<dyn Acker> = Arc::new(MemoryAcker {
                        broker: broker.clone(),
                        stream: stream.clone(),
                        durable: consumers[level].clone(),
                        seq: message.sequence,
                        settled: AtomicBool::new(false),
                        work: work.clone(),
                    });
                    let hold = window.hold(&mut reserved, &acker).await;
                    let delivery = Delivery {
                        subject: message.subject.clone(),
                        headers: (!message.headers.is_empty()).then(|| message.headers.clone()),
                        payload: message.payload.clone(),
                        stream_sequence: message.sequence,
                        delivered: delivered.deliveries,
                        acker,
                        hold,
                        expires: delivered.expires,
                    };
                    // The window made room: queueing does not wait, and a delivery taken is run
                    // even while stopping. Refused only when the workers are gone: dropped, its
                    // acker hands it back.
                    if submitter.submit_draining(delivery).await.is_err() {
                        break 'intake;
                    }
                }
            }
        });
        let listener = Listener::supervise(pool, options.pool.grace, token);
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

    async fn consumer_info(
        &self,
        durable: &str,
    ) -> Result<crate::events::DurableInfo, StreamError> {
        MemoryEvents::consumer_info(self, durable)
    }

    fn event_source(&self) -> EventSource {
        self.inner.source.clone()
    }

    fn events_timeout(&self) -> Duration {
        self.inner.events_timeout
    }
}

/// A listener's registration with its durable ("one durable, one type set"); released when
/// dropped, i.e. when the listener stops pulling.
struct DurableClaim {
    broker: MemoryBroker,
    stream: String,
    durable: String,
}

impl DurableClaim {
    /// Registers a listener of `durable` with `filter_subjects`, or gives the filter of the
    /// other listeners of the durable when it differs.
    fn claim(
        broker: &MemoryBroker,
        stream: &str,
        durable: &str,
        filter_subjects: &[String],
    ) -> Result<DurableClaim, Vec<String>> {
        broker
            .streams()
            .claim_durable(stream, durable, filter_subjects)?;
        Ok(DurableClaim {
            broker: broker.clone(),
            stream: stream.to_owned(),
            durable: durable.to_owned(),
        })
    }
}

impl Drop for DurableClaim {
    fn drop(&mut self) {
        self.broker
            .streams()
            .release_durable(&self.stream, &self.durable);
    }
}

/// Settles deliveries with the broker's consumer. One dropped unsettled (e.g. still queued
/// when a stop's grace period ran out) is nak'ed, as the JetStream acker does; unless the
/// listener "crashed", where nothing is settled.
struct MemoryAcker {
    broker: MemoryBroker,
    stream: Arc<str>,
    durable: Arc<str>,
    seq: u64,
    settled: AtomicBool,
    work: WorkContext,
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::SeqCst) && !self.work.crashed() {
            self.broker
                .streams()
                .nak(&self.stream, &self.durable, self.seq, None);
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), BoxError> {
        self.settled.store(true, Ordering::SeqCst);
        self.broker
            .streams()
            .ack(&self.stream, &self.durable, self.seq);
        Ok(())
    }

    async fn nak(&self, delay: Option<Duration>) -> Result<(), BoxError> {
        self.settled.store(true, Ordering::SeqCst);
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
        self.settled.store(true, Ordering::SeqCst);
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
    fn events_stream(&self) -> &str {
        &self.events_stream
    }

    fn durable(&self) -> &str {
        &self.durable
    }

    fn max_payload(&self) -> usize {
        self.broker.options().max_payload
    }

    async fn publish_dead_letter(
        &self,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), DeadLetterPublishError> {
        self.broker
            .check_size(&headers, &payload)
            .map_err(DeadLetterPublishError::TooLarge)?;
        let ack = self
            .broker
            .js_publish(&self.subject, headers, payload)
            .map_err(|err| DeadLetterPublishError::Other(Box::new(err)))?;
        tracing::debug!(subject = %self.subject, stream = %ack.stream, seq = ack.sequence, duplicate = ack.duplicate, "dead letter stored");
        Ok(())
    }
}

/// Live subscriptions for the [`EventSource`]: plain (non-queue) subscriptions to the events'
/// subjects, active as soon as `subscribe` returns.
struct MemorySource {
    broker: MemoryBroker,
    prefix: String,
    /// With priorities on, a type's events are also on `<prefix>._priority.*.<type>`.
    priorities: bool,
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
        let raw = |message: super::bus::BusMessage| RawEvent {
            headers: message.headers,
            payload: message.payload,
        };
        // With priorities on, the type's events of the higher levels are on their own
        // subjects (`<prefix>.>` already covers them).
        Ok(match event_type {
            Some(t) if self.priorities => {
                let prioritised = self.broker.bus().subscribe(
                    &format!("{}.{}.*.{t}", self.prefix, crate::events::PRIORITY_TOKEN),
                    None,
                );
                futures::stream::select(subscription.map(raw), prioritised.map(raw)).boxed()
            }
            _ => subscription.map(raw).boxed(),
        })
    }
}

/// Draining closes the connection ([`MemoryEvents::close`]), as the last step of a
/// [`Shutdown`](crate::shutdown::Shutdown).
impl crate::shutdown::Drain for MemoryEvents {
    async fn drain(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.close().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use tokio::sync::mpsc;

    use super::*;
    use crate::error::{PublishErrorKind, ResponseErrorKind};
    use crate::event::{new_event, EventExt, EventType};
    use crate::event_source::EventFilter;
    use crate::events::{event_handler_fn, typed_event_handler, Backoff, TypedEvent};
    use crate::handler::HandlerError;
    use crate::headers::DEAD_LETTER_STREAM_SEQ;
    use crate::headers::{
        DEAD_LETTER_DELIVERIES, DEAD_LETTER_ERROR, DEAD_LETTER_REASON, DEAD_LETTER_SUBJECT,
    };
    use crate::memory::tests_support::eventually;
    use crate::memory::MemoryOptions;

    const WAIT: Duration = Duration::from_secs(10);

    fn config(durable: &str) -> Config {
        Config {
            client_id: format!("test-{}", xid::new()),
            durable_name: Some(durable.to_owned()),
            ..Config::default()
        }
    }

    fn ty() -> String {
        format!("test.ev.{}", xid::new())
    }

    async fn connection(broker: &MemoryBroker, durable: &str) -> MemoryEvents {
        let events = broker.event_connection(&config(durable));
        events.init_stream().await.unwrap();
        events
    }

    fn fast_options() -> EventListenOptions {
        EventListenOptions {
            backoff: Backoff {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(50),
            },
            ..Default::default()
        }
    }

    /// A handler that forwards each event's data to a channel and succeeds.
    fn forward(tx: mpsc::Sender<u64>) -> impl crate::events::EventHandler {
        typed_event_handler(move |event: TypedEvent<u64>| {
            let tx = tx.clone();
            async move {
                tx.send(event.data)
                    .await
                    .map_err(|_| HandlerError::new("test receiver gone"))?;
                Ok(())
            }
        })
    }

    async fn recv(rx: &mut mpsc::Receiver<u64>) -> u64 {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("event within the wait")
            .expect("open")
    }

    async fn dead_letters(
        broker: &MemoryBroker,
        count: usize,
    ) -> Vec<crate::memory::StoredMessage> {
        eventually(|| broker.stream_len("DEADLETTER").unwrap_or(0) >= count).await;
        broker.stream_messages("DEADLETTER").unwrap()
    }

    #[tokio::test]
    async fn published_events_are_handled_and_acked_in_both_content_modes() {
        for mode in [ContentMode::Structured, ContentMode::Binary] {
            let broker = MemoryBroker::new();
            let events = broker.event_connection(&Config {
                ce_mode: mode,
                ..config("svc")
            });
            events.init_stream().await.unwrap();
            let ty = ty();
            let (tx, mut rx) = mpsc::channel(16);
            let listener = events
                .listen(
                    EventHandlers::new().on(ty.as_str(), forward(tx)),
                    fast_options(),
                )
                .await
                .unwrap();
            let ack = events
                .publish(new_event(&ty, "me", &7u64).unwrap())
                .await
                .unwrap();
            assert_eq!(
                (ack.stream.as_str(), ack.sequence, ack.duplicate),
                ("CLOUDEVENTS", 1, false)
            );
            assert_eq!(recv(&mut rx).await, 7, "{mode:?}");
            eventually(|| {
                broker
                    .consumer_info("CLOUDEVENTS", "svc")
                    .is_some_and(|i| i.acked == 1)
            })
            .await;
            let info = broker.consumer_info("CLOUDEVENTS", "svc").unwrap();
            assert_eq!(
                (info.num_pending, info.num_ack_pending, info.delivered),
                (0, 0, 1)
            );
            let stored = broker.stream_messages("CLOUDEVENTS").unwrap();
            assert_eq!(stored[0].subject, format!("events.{ty}"));
            assert_eq!(content_mode_of_stored(&stored[0]), mode);
            listener.stop(WAIT).await;
        }
    }

    fn content_mode_of_stored(message: &crate::memory::StoredMessage) -> ContentMode {
        crate::query::content_mode_of(Some(&message.headers))
    }

    #[tokio::test]
    async fn instances_of_a_durable_share_events_and_every_durable_gets_each() {
        let broker = MemoryBroker::new();
        let ty = ty();
        let (tx_a, mut rx_a) = mpsc::channel(64);
        let (tx_b, mut rx_b) = mpsc::channel(64);
        let mut listeners = Vec::new();
        for _ in 0..2 {
            let billing = connection(&broker, "billing").await;
            listeners.push(
                billing
                    .listen(
                        EventHandlers::new().on(ty.as_str(), forward(tx_a.clone())),
                        fast_options(),
                    )
                    .await
                    .unwrap(),
            );
        }
        let audit = connection(&broker, "audit").await;
        listeners.push(
            audit
                .listen(
                    EventHandlers::new().on(ty.as_str(), forward(tx_b)),
                    fast_options(),
                )
                .await
                .unwrap(),
        );
        let publisher = connection(&broker, "publisher").await;
        for n in 0..20u64 {
            publisher
                .publish(new_event(&ty, "me", &n).unwrap())
                .await
                .unwrap();
        }
        let mut billing_seen = Vec::new();
        let mut audit_seen = Vec::new();
        for _ in 0..20 {
            billing_seen.push(recv(&mut rx_a).await);
            audit_seen.push(recv(&mut rx_b).await);
        }
        billing_seen.sort_unstable();
        assert_eq!(
            billing_seen,
            (0..20).collect::<Vec<_>>(),
            "each event once per durable"
        );
        assert_eq!(
            audit_seen,
            (0..20).collect::<Vec<_>>(),
            "in order for a single instance"
        );
        for l in &listeners {
            l.stop(WAIT).await;
        }
        assert!(
            rx_a.try_recv().is_err(),
            "no event handled twice within the durable"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn under_concurrent_publishers_each_durable_handles_every_event_exactly_once() {
        const EVENTS: u64 = 1000;
        let broker = MemoryBroker::new();
        let ty = ty();
        let (tx_a, mut rx_a) = mpsc::channel(EVENTS as usize);
        let (tx_b, mut rx_b) = mpsc::channel(EVENTS as usize);
        let mut listeners = Vec::new();
        for (durable, tx, instances) in [("a", tx_a, 4), ("b", tx_b, 1)] {
            for _ in 0..instances {
                let events = connection(&broker, durable).await;
                let options = EventListenOptions {
                    pool: crate::listener::WorkerOptions::new(4, 8),
                    ..fast_options()
                };
                listeners.push(
                    events
                        .listen(
                            EventHandlers::new().on(ty.as_str(), forward(tx.clone())),
                            options,
                        )
                        .await
                        .unwrap(),
                );
            }
        }
        let publishers = (0..4u64).map(|p| {
            let events = broker.event_connection(&config("publisher"));
            let ty = ty.clone();
            tokio::spawn(async move {
                for n in (p..EVENTS).step_by(4) {
                    events
                        .publish(new_event(&ty, "me", &n).unwrap())
                        .await
                        .unwrap();
                }
            })
        });
        for p in futures::future::join_all(publishers).await {
            p.unwrap();
        }
        for rx in [&mut rx_a, &mut rx_b] {
            let mut seen = Vec::with_capacity(EVENTS as usize);
            for _ in 0..EVENTS {
                seen.push(recv(rx).await);
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>());
        }
        for l in &listeners {
            l.stop(WAIT).await;
        }
        for durable in ["a", "b"] {
            let info = broker.consumer_info("CLOUDEVENTS", durable).unwrap();
            assert_eq!(
                (info.delivered, info.acked, info.num_ack_pending),
                (EVENTS, EVENTS, 0),
                "{durable}"
            );
        }
        assert!(
            rx_a.try_recv().is_err() && rx_b.try_recv().is_err(),
            "nothing handled twice"
        );
    }

    #[tokio::test]
    async fn a_retryable_failure_is_redelivered_with_the_retry_delay() {
        let broker = MemoryBroker::new();
        let events = connection(&broker, "svc").await;
        let ty = ty();
        let attempts = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = mpsc::channel(4);
        let a = attempts.clone();
        let handler = event_handler_fn(move |_, _| {
            let (a, tx) = (a.clone(), tx.clone());
            async move {
                if a.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(HandlerError::new("db busy").retry_after(Duration::from_millis(20)));
                }
                let _ = tx.send(1).await;
                Ok(())
            }
        });
        let listener = events
            .listen(
                EventHandlers::new().on(ty.as_str(), handler),
                fast_options(),
            )
            .await
            .unwrap();
        events
            .publish(new_event(&ty, "me", &1).unwrap())
            .await
            .unwrap();
        recv(&mut rx).await;
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        eventually(|| {
            broker
                .consumer_info("CLOUDEVENTS", "svc")
                .is_some_and(|i| i.acked == 1)
        })
        .await;
        assert_eq!(
            broker
                .consumer_info("CLOUDEVENTS", "svc")
                .unwrap()
                .delivered,
            2
        );
        listener.stop(WAIT).await;
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_failures_are_redelivered_after_the_exponential_backoff() {
        let broker = MemoryBroker::new();
        let events = connection(&broker, "svc").await;
        let ty = ty();
        let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let a = attempts.clone();
        let handler = event_handler_fn(move |_, _| {
            a.lock().unwrap().push(tokio::time::Instant::now());
            async { Err(HandlerError::new("still failing")) }
        });
        let options = EventListenOptions {
            max_deliver: Some(4),
            backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(3),
            },
            ..Default::default()
        };
        let listener = events
            .listen(EventHandlers::new().on(ty.as_str(), handler), options)
            .await
            .unwrap();
        events
            .publish(new_event(&ty, "me", &1).unwrap())
            .await
            .unwrap();
        dead_letters(&broker, 1).await;
        let times = attempts.lock().unwrap().clone();
        let gaps: Vec<u64> = times.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
        assert_eq!(gaps, vec![1, 2, 3], "1 s, 2 s, then capped at 3 s");
        listener.stop(WAIT).await;
    }

    #[tokio::test(start_paused = true)]
    async fn max_deliveries_dead_letters_with_the_contract_headers() {
        let broker = MemoryBroker::new();
        let events = connection(&broker, "svc").await;
        let ty = ty();
        let attempts = Arc::new(AtomicUsize::new(0));
        let a = attempts.clone();
        let handler = event_handler_fn(move |_, _| {
            a.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::new("always fails")) }
        });
        let options = EventListenOptions {
            max_deliver: Some(3),
            ..fast_options()
        };
        let listener = events
            .listen(EventHandlers::new().on(ty.as_str(), handler), options)
            .await
            .unwrap();
        let event = new_event(&ty, "me", &1).unwrap();
        events.publish(event.clone()).await.unwrap();
        let dead = dead_letters(&broker, 1).await;
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        let dl = &dead[0];
        assert_eq!(dl.subject, "deadletter.CLOUDEVENTS.svc");
        assert_eq!(dl.header(DEAD_LETTER_REASON), Some("max-deliveries"));
        assert_eq!(dl.header(DEAD_LETTER_ERROR), Some("always fails"));
        assert_eq!(
            dl.header(DEAD_LETTER_SUBJECT),
            Some(format!("events.{ty}").as_str())
        );
        assert_eq!(dl.header(DEAD_LETTER_STREAM_SEQ), Some("1"));
        assert_eq!(dl.header(DEAD_LETTER_DELIVERIES), Some("3"));
        // Original event unchanged (its JSON data decodes as the JSON text).
        crate::codec::testing::assert_same_event(&dl.event().unwrap(), &event);
        eventually(|| {
            broker
                .consumer_info("CLOUDEVENTS", "svc")
                .is_some_and(|i| i.terminated == 1)
        })
        .await;
        listener.stop(WAIT).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_whose_handler_crashed_is_redelivered_after_the_ack_wait_and_dead_lettered_after_max(
    ) {
        let broker = MemoryBroker::new();
        let events = connection(&broker, "svc").await;
        let ty = ty();
        let attempts = Arc::new(AtomicUsize::new(0));
        let a = attempts.clone();
        // A handler that never returns: each delivery is lost when the listener is aborted.
        let handler = event_handler_fn(move |_, _| {
            a.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<(), HandlerError>>()
        });
        let options = EventListenOptions {
            max_deliver: Some(2),
            ack_wait: Some(Duration::from_secs(5)),
            ..fast_options()
        };
        events
            .publish(new_event(&ty, "me", &1).unwrap())
            .await
            .unwrap();
        let handlers = EventHandlers::new().on(ty.as_str(), handler);
        for expected in 1..=2 {
            let listener = events
                .listen(handlers.clone(), options.clone())
                .await
                .unwrap();
            eventually(|| attempts.load(Ordering::SeqCst) == expected).await;
            listener.abort().await;
            let info = broker.consumer_info("CLOUDEVENTS", "svc").unwrap();
            assert_eq!(info.num_ack_pending, 1, "a crash settles nothing");
        }
        // The third delivery (one beyond max) goes straight to the dead-letter stream.
        let started = tokio::time::Instant::now();
        let listener = events.listen(handlers, options).await.unwrap();
        let dead = dead_letters(&broker, 1).await;
        assert!(
            started.elapsed() >= Duration::from_secs(4),
            "waited for the ack wait"
        );
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            2,
            "the handler is not called again"
        );
        assert_eq!(dead[0].header(DEAD_LETTER_REASON), Some("max-deliveries"));
        assert_eq!(dead[0].header(DEAD_LETTER_DELIVERIES), Some("3"));
        listener.stop(WAIT).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_handler_keeps_its_event_with_in_progress() {
        let broker = MemoryBroker::new();
        let events = connection(&broker, "svc").await;
        let ty = ty();
        let attempts = Arc::new(AtomicUsize::new(0));
        let a = attempts.clone();
        let handler = event_handler_fn(move |_, _| {
            a.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            }
        });
        let options = EventListenOptions {
            ack_wait: Some(Duration::from_secs(2)),
            ..fast_options()
        };
        let listener = events
            .listen(EventHandlers::new().on(ty.as_str(), handler), options)
            .await
            .unwrap();
        events
            .publish(new_event(&ty, "me", &1).unwrap())
            .await
            .unwrap();
        eventually(|| {
            broker
                .consumer_info("CLOUDEVENTS", "svc")
                .is_some_and(|i| i.acked == 1)
        })
        .await;
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            1,
            "never redelivered while in progress"
        );
        assert_eq!(
            broker
                .consumer_info("CLOUDEVENTS", "svc")
                .unwrap()
                .delivered,
            1
        );
        listener.stop(WAIT).await;
    }

    #[tokio::test]
    async fn permanent_failures_and_undecodable_events_are_dead_lettered_at_once() {
        let broker = MemoryBroker::new();
        let events = connection(&broker, "svc").await;
        let ty = ty();
        let handler =
            event_handler_fn(|_, _| async { Err(HandlerError::permanent("order unknown")) });
        let listener = events
            .listen(
                EventHandlers::new().on(ty.as_str(), handler),
                fast_options(),
            )
            .await
            .unwrap();
        events
            .publish(new_event(&ty, "me", &1).unwrap())
            .await
            .unwrap();
        broker
            .publish_raw(
                &format!("events.{ty}"),
                HeaderMap::new(),
                Bytes::from_static(b"garbage"),
            )
            .unwrap();
        let dead = dead_letters(&broker, 2).await;
        let reasons: Vec<_> = dead
            .iter()
            .map(|d| d.header(DEAD_LETTER_REASON).unwrap())
            .collect();
        assert_eq!(reasons, vec!["rejected", "decode"]);
        assert_eq!(
            dead[1].payload,
            Bytes::from_static(b"garbage"),
            "payload unchanged"
        );
        assert_eq!(dead[0].header(DEAD_LETTER_DELIVERIES), Some("1"));
        eventually(|| {
            broker
                .consumer_info("CLOUDEVENTS", "svc")
                .is_some_and(|i| i.terminated == 2)
        })
        .await;
        listener.stop(WAIT).await;
    }

    #[tokio::test]
    async fn without_a_dead_letter_stream_the_event_is_kept_not_dropped() {
        let broker = MemoryBroker::new();
        let events = broker.event_connection(&config("svc"));
        broker
            .streams()
            .create_or_update(
                "CLOUDEVENTS",
                StreamSettings {
                    subjects: vec!["events.>".into()],
                    duplicate_window: Duration::from_secs(120),
                    max_messages: 100,
                    max_bytes: 0,
                },
            )
            .unwrap();
        let ty = ty();
        let handler = event_handler_fn(|_, _| async { Err(HandlerError::permanent("no")) });
        let listener = events
            .listen(
                EventHandlers::new().on(ty.as_str(), handler),
                fast_options(),
            )
            .await
            .unwrap();
        events
            .publish(new_event(&ty, "me", &1).unwrap())
            .await
            .unwrap();
        eventually(|| {
            broker
                .consumer_info("CLOUDEVENTS", "svc")
                .is_some_and(|i| i.delivered >= 1)
        })
        .await;
        listener.stop(WAIT).await;
        let info = broker.consumer_info("CLOUDEVENTS", "svc").unwrap();
        assert_eq!(
            (info.terminated, info.num_ack_pending),
            (0, 1),
            "nak'ed with a delay, not terminated"
        );
    }

    #[tokio::test]
    async fn publish_refuses_duplicates_oversized_events_and_missing_streams() {
        let broker = MemoryBroker::with_options(MemoryOptions {
            max_payload: 2048,
            ..Default::default()
        });
        let events = broker.event_connection(&config("svc"));
        let event = new_event(ty(), "me", &1).unwrap();
        let err = events.publish(event.clone()).await.unwrap_err();
        assert_eq!(err.kind(), PublishErrorKind::StreamNotFound);
        assert_eq!(
            err.into_event(),
            Some(event.clone()),
            "the event is handed back"
        );
        let err = events
            .listen(
                EventHandlers::new().on("x", event_handler_fn(|_, _| async { Ok(()) })),
                fast_options(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ListenErrorKind::StreamNotFound);
        events.init_stream().await.unwrap();
        let first = events.publish(event.clone()).await.unwrap();
        let again = events.publish(event.clone()).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.sequence, first.sequence);
        assert_eq!(broker.stream_len("CLOUDEVENTS").unwrap(), 1);
        let big = new_event(ty(), "me", &"x".repeat(4000)).unwrap();
        let err = events.publish(big.clone()).await.unwrap_err();
        assert_eq!(err.kind(), PublishErrorKind::TooLarge);
        assert_eq!(err.into_event(), Some(big));
        assert_eq!(
            broker.stream_len("CLOUDEVENTS").unwrap(),
            1,
            "nothing stored"
        );
        events.close().await;
        let err = events.publish(event).await.unwrap_err();
        assert_eq!(err.kind(), PublishErrorKind::ConnectionClosed);
    }

    #[tokio::test]
    async fn a_request_gets_its_response_even_from_a_very_fast_responder() {
        let broker = MemoryBroker::with_auto_streams();
        let responder = broker.event_connection(&config("quotes"));
        let requester = broker.event_connection(&config("client"));
        let listener = responder
            .listen(
                EventHandlers::new().on(
                    "test.quote.requested",
                    typed_event_handler(|event: TypedEvent<u64>| async move {
                        event
                            .responses
                            .respond_data("test.quote.given", &(event.data * 10))
                            .await?;
                        Ok(())
                    }),
                ),
                fast_options(),
            )
            .await
            .unwrap();
        for n in 0..5u64 {
            let request = new_event("test.quote.requested", "client", &n).unwrap();
            let tid = request.transaction_id().unwrap();
            let mut promise = requester
                .request(request, &[EventType::from("test.quote.given")])
                .await
                .unwrap();
            let response = promise.response(WAIT).await.unwrap();
            assert_eq!(response.data_as::<u64>().unwrap(), n * 10);
            assert_eq!(response.transaction_id(), Some(tid));
        }
        let mut lonely = requester
            .wait_for_response(
                &crate::event::TransactionId::generate(),
                &[EventType::from("test.quote.given")],
            )
            .await
            .unwrap();
        let err = lonely
            .response(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ResponseErrorKind::TimedOut);
        listener.stop(WAIT).await;
        assert_eq!(
            requester.event_source().subscription_count(),
            0,
            "promises released"
        );
    }

    #[tokio::test]
    async fn event_source_listeners_can_be_added_removed_and_fire_once() {
        let broker = MemoryBroker::with_auto_streams();
        let events = broker.event_connection(&config("svc"));
        let source = events.event_source();
        let ty = ty();
        let all = Arc::new(AtomicU64::new(0));
        let once = Arc::new(AtomicU64::new(0));
        let (a, o) = (all.clone(), once.clone());
        let id = source
            .add_listener(EventFilter::by_type(ty.as_str()), move |_| {
                a.fetch_add(1, Ordering::SeqCst);
            })
            .await
            .unwrap();
        source
            .add_listener(EventFilter::by_type(ty.as_str()).once(), move |_| {
                o.fetch_add(1, Ordering::SeqCst);
            })
            .await
            .unwrap();
        for n in 0..3 {
            events
                .publish(new_event(&ty, "me", &n).unwrap())
                .await
                .unwrap();
        }
        eventually(|| all.load(Ordering::SeqCst) == 3).await;
        assert_eq!(once.load(Ordering::SeqCst), 1);
        assert!(source.remove_listener(id).await);
        assert_eq!(source.listener_count(), 0);
        eventually(|| broker.subscription_count() == 0).await;
    }

    #[tokio::test]
    async fn deleting_the_stream_stops_its_listeners() {
        let broker = MemoryBroker::new();
        let events = connection(&broker, "svc").await;
        let (tx, _rx) = mpsc::channel(4);
        let listener = events
            .listen(
                EventHandlers::new().on(ty().as_str(), forward(tx)),
                fast_options(),
            )
            .await
            .unwrap();
        assert!(broker.delete_stream("CLOUDEVENTS"));
        tokio::time::timeout(WAIT, listener.stopped())
            .await
            .expect("listener stopped");
        assert!(broker.consumer_info("CLOUDEVENTS", "svc").is_none());
    }

    #[tokio::test]
    async fn close_drains_in_flight_handlers_which_can_still_respond() {
        let broker = MemoryBroker::with_auto_streams();
        let service = broker.event_connection(&config("svc"));
        let client = broker.event_connection(&config("client"));
        let ty = ty();
        let (entered_tx, mut entered_rx) = mpsc::channel::<u64>(1);
        let release = Arc::new(tokio::sync::Notify::new());
        let r = release.clone();
        let handler = typed_event_handler(move |event: TypedEvent<u64>| {
            let (entered, release) = (entered_tx.clone(), r.clone());
            async move {
                let _ = entered.send(event.data).await;
                release.notified().await;
                event
                    .responses
                    .respond_data("test.done", &event.data)
                    .await?;
                Ok(())
            }
        });
        service
            .listen(
                EventHandlers::new().on(ty.as_str(), handler),
                fast_options(),
            )
            .await
            .unwrap();
        let mut promise = client
            .request(
                new_event(&ty, "client", &5u64).unwrap(),
                &[EventType::from("test.done")],
            )
            .await
            .unwrap();
        assert_eq!(recv(&mut entered_rx).await, 5);
        let closing = tokio::spawn({
            let service = service.clone();
            async move { service.close().await }
        });
        eventually(|| service.inner.closing.is_cancelled()).await;
        let err = service
            .listen(
                EventHandlers::new().on("x", event_handler_fn(|_, _| async { Ok(()) })),
                fast_options(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            ListenErrorKind::ConnectionClosed,
            "no new listener while closing"
        );
        release.notify_one();
        let response = promise.response(WAIT).await.unwrap();
        assert_eq!(
            response.data_as::<u64>().unwrap(),
            5,
            "the in-flight handler responded"
        );
        tokio::time::timeout(WAIT, closing).await.unwrap().unwrap();
        assert!(service.is_closed());
        let info = broker.consumer_info("CLOUDEVENTS", "svc").unwrap();
        assert_eq!((info.acked, info.num_ack_pending), (1, 0));
        let err = service
            .publish(new_event(&ty, "me", &1).unwrap())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), PublishErrorKind::ConnectionClosed);
    }

    #[tokio::test]
    async fn a_service_shutdown_stops_listeners_and_closes_memory_connections() {
        let broker = MemoryBroker::with_auto_streams();
        let events = broker.event_connection(&config("svc"));
        let queries = broker.query_connection(&config("svc"));
        let ty = ty();
        let (tx, mut rx) = mpsc::channel(4);
        let shutdown = crate::shutdown::Shutdown::new(WAIT);
        shutdown.add_listener(
            events
                .listen(
                    EventHandlers::new().on(ty.as_str(), forward(tx)),
                    fast_options(),
                )
                .await
                .unwrap(),
        );
        shutdown.add_connection(events.clone());
        shutdown.add_connection(queries.clone());
        events
            .publish(new_event(&ty, "me", &3u64).unwrap())
            .await
            .unwrap();
        assert_eq!(recv(&mut rx).await, 3);
        let report = shutdown.shutdown().await;
        assert!(report.is_clean(), "{report:?}");
        assert_eq!((report.listeners, report.connections_closed), (1, 2));
        assert!(events.is_closed() && queries.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn stop_lets_the_in_flight_event_finish_and_hands_queued_ones_back() {
        let broker = MemoryBroker::new();
        let events = connection(&broker, "svc").await;
        let ty = ty();
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let (r, s) = (release.clone(), started.clone());
        let handler = event_handler_fn(move |_, _| {
            let (r, s) = (r.clone(), s.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                r.acquire()
                    .await
                    .map_err(|_| HandlerError::new("closed"))?
                    .forget();
                Ok(())
            }
        });
        let options = EventListenOptions {
            pool: crate::listener::WorkerOptions::new(1, 4),
            ..fast_options()
        };
        let listener = events
            .listen(EventHandlers::new().on(ty.as_str(), handler), options)
            .await
            .unwrap();
        for n in 0..3 {
            events
                .publish(new_event(&ty, "me", &n).unwrap())
                .await
                .unwrap();
        }
        eventually(|| started.load(Ordering::SeqCst) == 1).await;
        eventually(|| {
            broker
                .consumer_info("CLOUDEVENTS", "svc")
                .is_some_and(|i| i.num_ack_pending == 3)
        })
        .await;
        let stopping = tokio::spawn({
            let listener = listener.clone();
            async move { listener.stop(WAIT).await }
        });
        // With the clock paused, this returns only once every task is idle: the stop has begun
        // and waits for the in-flight handler.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            !listener.is_stopped(),
            "the in-flight handler holds the stop"
        );
        // The queued events are run too (a hand-back would cost each a delivery).
        release.add_permits(3);
        let report = stopping.await.unwrap();
        assert_eq!(
            (report.finished, report.requeued, report.abandoned),
            (3, 0, 0),
            "{report:?}"
        );
        assert_eq!(started.load(Ordering::SeqCst), 3, "queued events were run");
        let info = broker.consumer_info("CLOUDEVENTS", "svc").unwrap();
        assert_eq!(
            (info.acked, info.num_ack_pending, info.num_redelivered),
            (3, 0, 0),
            "all handled, none handed back"
        );
    }

    /// Schedules and expiry run on tokio's clock: with paused time an hour passes at once, and
    /// firings land exactly on their instants.
    #[tokio::test(start_paused = true)]
    async fn schedules_and_expiry_follow_tokios_paused_clock() {
        let broker = MemoryBroker::new();
        let events = connection(&broker, "paused").await;
        let event_type = ty();
        // The first listener is stopped before anything fires: its receiver only keeps the
        // channel open; the second listener's receiver is the one read.
        let (tx, _first_rx) = mpsc::channel(64);
        let mut rx;
        let handlers = EventHandlers::new().on(
            &event_type,
            event_handler_fn(move |event, _| {
                let tx = tx.clone();
                async move {
                    let _ = tx
                        .send((event.id().to_owned(), tokio::time::Instant::now()))
                        .await;
                    Ok(())
                }
            }),
        );
        let listener = events.listen(handlers, fast_options()).await.unwrap();
        let start = tokio::time::Instant::now();
        let once = new_event(&event_type, "t", &1).unwrap();
        let once_id = once.id().to_owned();
        let every = new_event(&event_type, "t", &2).unwrap();
        let every_id = every.id().to_owned();
        let stale = new_event(&event_type, "t", &3).unwrap();
        let stale_id = stale.id().to_owned();
        events
            .publish_with(once, PublishOptions::after(Duration::from_secs(3600)))
            .await
            .unwrap();
        events
            .publish_with(every, PublishOptions::every(Duration::from_secs(600)))
            .await
            .unwrap();
        // Expires in the stream before anyone could take it (the listener is busy with
        // nothing, so it would take it at once: stop pulling first).
        listener.stop(WAIT).await;
        events
            .publish_with(
                stale,
                PublishOptions::default().with_ttl(Duration::from_secs(5)),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(
            !broker
                .stream_messages("CLOUDEVENTS")
                .unwrap()
                .iter()
                .any(|m| m.event().is_ok_and(|e| e.id() == stale_id)),
            "the expired event left the stream"
        );
        let handlers = {
            let (tx2, rx2) = mpsc::channel(64);
            rx = rx2;
            EventHandlers::new().on(
                &event_type,
                event_handler_fn(move |event, _| {
                    let tx = tx2.clone();
                    async move {
                        let _ = tx
                            .send((event.id().to_owned(), tokio::time::Instant::now()))
                            .await;
                        Ok(())
                    }
                }),
            )
        };
        let listener = events.listen(handlers, fast_options()).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 7 {
            seen.push(
                tokio::time::timeout(Duration::from_secs(7200), rx.recv())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        listener.stop(WAIT).await;
        assert!(
            !seen.iter().any(|(id, _)| *id == stale_id),
            "expired event handled"
        );
        let recurring: Vec<_> = seen
            .iter()
            .filter(|(id, _)| id.starts_with(&format!("{every_id}@")))
            .collect();
        for (k, (_, at)) in recurring.iter().enumerate() {
            assert_eq!(
                *at - start,
                Duration::from_secs(600 * (k as u64 + 1)),
                "firing {k}"
            );
        }
        let (_, once_at) = seen
            .iter()
            .find(|(id, _)| *id == once_id)
            .expect("the one-shot fired");
        let elapsed = *once_at - start;
        assert!(
            elapsed >= Duration::from_secs(3600) && elapsed <= Duration::from_secs(3601),
            "one-shot after {elapsed:?}"
        );
        assert_eq!(seen.iter().filter(|(id, _)| *id == once_id).count(), 1);
        assert!(events.cancel_schedule(&every_id).await.unwrap());
        assert!(events.schedules().await.unwrap().is_empty());
    }
}
