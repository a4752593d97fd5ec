//! Persisted events: the [`EventConnection`] trait, event handlers and the
//! [`EventResponseWriter`] they answer through, and request/response promises.
//!
//! What happens to a delivered event (ack, nak with back-off, in-progress while a handler runs
//! long, dead letter before term) is written here once and shared by every backend.
//!
//! # Examples
//!
//! ```
//! use ce_messaging::events::{typed_event_handler, EventHandlers, TypedEvent};
//! use ce_messaging::handler::HandlerError;
//!
//! #[derive(serde::Deserialize)]
//! struct OrderCreated { id: u64 }
//!
//! let handlers = EventHandlers::new().on(
//!     "org.example.order.created",
//!     typed_event_handler(|event: TypedEvent<OrderCreated>| async move {
//!         if event.data.id == 0 {
//!             return Err(HandlerError::permanent("order id 0"));
//!         }
//!         event.responses.respond_data("org.example.order.accepted", &event.data.id).await?;
//!         Ok(())
//!     }),
//! );
//! assert_eq!(handlers.len(), 1);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use futures::FutureExt;
use serde::{de::DeserializeOwned, Serialize};

use crate::codec::{self, HeaderMap};
use crate::error::{
    BoxError, Error, ListenError, PublishErrorKind, ResponseError, ResponseErrorKind, StreamError,
};
use crate::event::{new_event_with_tid, EventExt, EventType, TransactionId};
use crate::event_source::{EventResponsePromise, EventSource};
use crate::handler::{call_handler, HandlerError};
use crate::headers::{
    text_value, DEAD_LETTER_DELIVERIES, DEAD_LETTER_ERROR, DEAD_LETTER_PAYLOAD, DEAD_LETTER_REASON,
    DEAD_LETTER_SIZE, DEAD_LETTER_STREAM, DEAD_LETTER_STREAM_SEQ, DEAD_LETTER_SUBJECT, NATS_MSG_ID,
};
use crate::listener::Listener;
use crate::telemetry::{self, EventTypeMetrics, LazyMetrics};
use crate::worker::{Hold, Outcome, WorkContext};

/// What the server said when it stored an event.
///
/// # Examples
///
/// ```
/// let ack = ce_messaging::events::PublishAck { stream: "CLOUDEVENTS".into(), sequence: 7, duplicate: false };
/// assert_eq!(ack.sequence, 7);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishAck {
    /// The stream that stored the event.
    pub stream: String,
    /// Its sequence in that stream.
    pub sequence: u64,
    /// True when the server had already stored an event with this id within the duplicate
    /// window (a retried publish): it was not stored twice.
    pub duplicate: bool,
}

/// The state of a durable consumer, for operators (`cemsg consumer info`), the same on every
/// backend ([`JetStreamEvents::consumer_info`](crate::jetstream::JetStreamEvents::consumer_info),
/// [`MemoryEvents::consumer_info`](crate::memory::MemoryEvents::consumer_info)).
///
/// Sequences are stream sequences of the events stream.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
/// let info = events.consumer_info("billing").await?;
/// println!("{} waiting, {} in handlers or awaiting redelivery, {} parked", info.pending, info.ack_pending, info.parked);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DurableInfo {
    /// The events stream.
    pub stream: String,
    /// The durable name.
    pub durable: String,
    /// The subjects it is filtered to (`<prefix>.<type>`, sorted).
    pub filter_subjects: Vec<String>,
    /// Stored events of its types never delivered yet.
    pub pending: u64,
    /// Delivered events neither acked nor terminated yet: in a handler, queued in a listener,
    /// or waiting for their redelivery.
    pub ack_pending: u64,
    /// Events delivered more than once and not settled (ack pending, or parked).
    pub redelivered: u64,
    /// Every event up to this stream sequence is settled (acked or terminated).
    pub ack_floor: u64,
    /// The highest stream sequence delivered so far.
    pub last_delivered: u64,
    /// Deliveries made in total (first deliveries and redeliveries).
    pub deliveries: u64,
    /// The broker's delivery limit of the consumer (the library's `NATS_JS_MAX_DELIVER` plus
    /// one, see the wire contract); 0 or less: unlimited.
    pub max_deliver: i64,
    /// Events that reached the broker's delivery limit without being settled: the broker will
    /// not deliver them again, and they are in no dead-letter stream. Should be 0. JetStream
    /// has no per-event view of this: it is `num_redelivered - num_ack_pending` of the
    /// consumer info (the server keeps the delivery count of an event it stopped delivering),
    /// a lower bound that is exact when nothing is ack pending. The memory backend counts them.
    pub parked: u64,
}

/// A failed publish; gives the event back so the caller can retry without rebuilding it.
///
/// # Examples
///
/// ```
/// use ce_messaging::error::PublishErrorKind;
/// use ce_messaging::events::PublishError;
///
/// let event = ce_messaging::event::new_event("t", "s", &1).unwrap();
/// let err = PublishError::new(PublishErrorKind::TimedOut, Some(event));
/// assert_eq!(err.kind(), PublishErrorKind::TimedOut);
/// assert!(err.into_event().is_some());
/// ```
pub struct PublishError {
    error: Error<PublishErrorKind>,
    event: Option<Box<Event>>,
}

impl PublishError {
    /// A publish error of `kind`, holding the event that was not published.
    pub fn new(kind: PublishErrorKind, event: Option<Event>) -> Self {
        PublishError {
            error: Error::new(kind),
            event: event.map(Box::new),
        }
    }

    /// Wraps an error, holding the event that was not published.
    pub fn from_error(error: Error<PublishErrorKind>, event: Option<Event>) -> Self {
        PublishError {
            error,
            event: event.map(Box::new),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> PublishErrorKind {
        self.error.kind()
    }

    /// The error itself.
    pub fn error(&self) -> &Error<PublishErrorKind> {
        &self.error
    }

    /// The event that was not published, for a retry.
    pub fn into_event(self) -> Option<Event> {
        self.event.map(|e| *e)
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl fmt::Debug for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishError")
            .field("error", &self.error)
            .field("event_id", &self.event.as_ref().map(|e| e.id().to_owned()))
            .finish()
    }
}

impl std::error::Error for PublishError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Publishes persisted events and serves them.
///
/// Implemented by [`JetStreamEvents`](crate::jetstream::JetStreamEvents) and by the in-memory
/// backend. Write services against this trait.
///
/// # Examples
///
/// ```no_run
/// use ce_messaging::events::EventConnection;
/// use ce_messaging::event::new_event_auto_source;
///
/// async fn order_created(events: &dyn EventConnection) -> Result<(), Box<dyn std::error::Error>> {
///     let event = new_event_auto_source("org.example.order.created", &serde_json::json!({"id": 1}))?;
///     let ack = events.publish(event).await?;
///     println!("stored as #{} in {}", ack.sequence, ack.stream);
///     Ok(())
/// }
/// ```
#[async_trait]
pub trait EventConnection: Send + Sync {
    /// Publishes one event and returns after the server stored it.
    ///
    /// An empty or `AUTO_POPULATE` source is filled in with the client id. The event id is the
    /// de-duplication id: a retry of the same event within the duplicate window is reported
    /// as a duplicate, not stored twice. An event larger than the server accepts is refused
    /// before sending (`TooLarge`), and so is a type that breaks the subject-token rule
    /// (`InvalidType`, see [`check_type`](crate::event::check_type)). While the client is
    /// disconnected, a JetStream publish waits for the connection within its bounded time and
    /// then fails with `Disconnected`.
    async fn publish(&self, event: Event) -> Result<PublishAck, PublishError>;

    /// Publishes many events pipelined (many in flight at once) and waits for every ack.
    /// The results are in the order of `events`.
    async fn publish_all(&self, events: Vec<Event>) -> Vec<Result<PublishAck, PublishError>>;

    /// Handles events of the given types on a durable consumer until the returned
    /// [`Listener`] is stopped.
    async fn listen(
        &self,
        handlers: EventHandlers,
        options: EventListenOptions,
    ) -> Result<Listener, ListenError>;

    /// Creates or updates the events stream and the dead-letter stream from the configuration.
    async fn init_stream(&self) -> Result<(), StreamError>;

    /// The dynamic listeners of this connection; promises are built on it.
    fn event_source(&self) -> EventSource;

    /// The default timeout of promises and publish acks (`NATS_EVENTS_TIMEOUT`).
    fn events_timeout(&self) -> Duration;

    /// Publishes `event` (giving it a transaction id if it has none) and returns a promise of
    /// the response events of `response_types` with the same transaction id. Listening starts
    /// before publishing, so a fast response is never missed.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: &dyn ce_messaging::events::EventConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// use ce_messaging::event::{new_event_auto_source, EventType};
    /// let request = new_event_auto_source("org.example.quote.requested", &42)?;
    /// let mut promise = events.request(request, &[EventType::from("org.example.quote.given")]).await?;
    /// let response = promise.response(std::time::Duration::from_secs(5)).await?;
    /// println!("{response}");
    /// # Ok(()) }
    /// ```
    async fn request(
        &self,
        mut event: Event,
        response_types: &[EventType],
    ) -> Result<EventResponsePromise, ResponseError> {
        let tid = match event.transaction_id() {
            Some(tid) => tid,
            None => {
                let tid = TransactionId::generate();
                event.set_transaction_id(&tid);
                tid
            }
        };
        let promise = self
            .event_source()
            .promise(tid, response_types, self.events_timeout())
            .await?;
        match self.publish(event).await {
            Ok(_) => Ok(promise),
            Err(err) => {
                promise.close().await;
                Err(Error::with_source(ResponseErrorKind::Publish, err))
            }
        }
    }

    /// A promise of the response events of `response_types` with transaction id `tid`,
    /// without publishing anything.
    async fn wait_for_response(
        &self,
        tid: &TransactionId,
        response_types: &[EventType],
    ) -> Result<EventResponsePromise, ResponseError> {
        self.event_source()
            .promise(tid.clone(), response_types, self.events_timeout())
            .await
    }
}

/// Handles events of one type.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::{EventHandler, EventResponseWriter};
/// use ce_messaging::handler::HandlerError;
/// use ce_messaging::Event;
///
/// struct Audit;
///
/// #[async_trait::async_trait]
/// impl EventHandler for Audit {
///     async fn handle(&self, event: Event, _responses: EventResponseWriter) -> Result<(), HandlerError> {
///         println!("audit: {event}");
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait EventHandler: Send + Sync + 'static {
    /// Handles `event`. `Ok` acks it; an `Err` naks it for redelivery (or dead-letters it when
    /// [permanent](HandlerError::permanent) or out of deliveries); a panic counts as a
    /// retryable error.
    async fn handle(
        &self,
        event: Event,
        responses: EventResponseWriter,
    ) -> Result<(), HandlerError>;
}

struct FnEventHandler<F>(F);

#[async_trait]
impl<F, Fut> EventHandler for FnEventHandler<F>
where
    F: Fn(Event, EventResponseWriter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(
        &self,
        event: Event,
        responses: EventResponseWriter,
    ) -> Result<(), HandlerError> {
        (self.0)(event, responses).await
    }
}

/// Makes an [`EventHandler`] of an async closure.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::event_handler_fn;
/// let handler = event_handler_fn(|event, _responses| async move {
///     println!("{event}");
///     Ok(())
/// });
/// # let _ = handler;
/// ```
pub fn event_handler_fn<F, Fut>(f: F) -> impl EventHandler
where
    F: Fn(Event, EventResponseWriter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    FnEventHandler(f)
}

/// An event whose data was deserialized for a [`typed_event_handler`].
#[derive(Debug)]
#[non_exhaustive]
pub struct TypedEvent<T> {
    /// The event data.
    pub data: T,
    /// The whole event.
    pub event: Event,
    /// Publishes response events.
    pub responses: EventResponseWriter,
}

struct TypedEventHandler<F, T>(F, std::marker::PhantomData<fn(T)>);

#[async_trait]
impl<F, Fut, T> EventHandler for TypedEventHandler<F, T>
where
    F: Fn(TypedEvent<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    async fn handle(
        &self,
        event: Event,
        responses: EventResponseWriter,
    ) -> Result<(), HandlerError> {
        // Data that does not fit the type will not fit on redelivery either.
        let data: T = event
            .data_as()
            .map_err(|e| HandlerError::permanent(e.to_string()))?;
        (self.0)(TypedEvent {
            data,
            event,
            responses,
        })
        .await
    }
}

/// Makes an [`EventHandler`] of an async closure taking the deserialized data; data that does
/// not deserialize is a permanent failure (dead letter, reason `rejected`).
///
/// # Examples
///
/// ```
/// use ce_messaging::events::{typed_event_handler, TypedEvent};
/// let handler = typed_event_handler(|event: TypedEvent<u64>| async move {
///     println!("got {}", event.data);
///     Ok(())
/// });
/// # let _ = handler;
/// ```
pub fn typed_event_handler<F, Fut, T>(f: F) -> impl EventHandler
where
    F: Fn(TypedEvent<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    TypedEventHandler(f, std::marker::PhantomData)
}

/// The handlers of an event listener, by event type.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::{event_handler_fn, EventHandlers};
/// let handlers = EventHandlers::new().on("org.example.a", event_handler_fn(|_, _| async { Ok(()) }));
/// assert!(handlers.types().any(|t| t == "org.example.a"));
/// ```
#[derive(Clone, Default)]
pub struct EventHandlers {
    map: HashMap<String, HandlerEntry>,
}

/// A handler and the metric handles of its type, registered at its first delivery and shared
/// by the clones of the table.
#[derive(Clone)]
pub(crate) struct HandlerEntry {
    pub(crate) handler: Arc<dyn EventHandler>,
    pub(crate) metrics: LazyMetrics<EventTypeMetrics>,
}

impl fmt::Debug for EventHandlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.map.keys()).finish()
    }
}

impl EventHandlers {
    /// No handlers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the handler of `event_type`.
    #[must_use]
    pub fn on(mut self, event_type: impl Into<EventType>, handler: impl EventHandler) -> Self {
        self.map.insert(
            event_type.into().into_string(),
            HandlerEntry {
                handler: Arc::new(handler),
                metrics: LazyMetrics::default(),
            },
        );
        self
    }

    /// The event types handled.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// Number of types handled.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no handlers.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(crate) fn get(&self, event_type: &str) -> Option<&HandlerEntry> {
        self.map.get(event_type)
    }
}

/// Redelivery delays after a retryable failure: `initial * 2^(n-1)`, at most `max`.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::Backoff;
/// use std::time::Duration;
/// let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1) };
/// assert_eq!(b.delay(1), Duration::from_millis(100));
/// assert_eq!(b.delay(3), Duration::from_millis(400));
/// assert_eq!(b.delay(10), Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failed delivery.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay after the `delivery`-th failed delivery (1-based).
    pub fn delay(&self, delivery: u64) -> Duration {
        let exp = delivery.saturating_sub(1).min(20) as u32;
        self.initial
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// How an event listener runs. `None` fields come from the configuration.
///
/// # Workers and buffer
///
/// A listener holds at most `workers + buffer` events at once (pulled from the broker and not
/// yet settled): it asks the broker only for as many events as it has free places, so the
/// pulls never outrun the workers. `workers` events are handled at once; up to `buffer` more
/// wait for a worker (a read-ahead that keeps the workers busy while the next pull is on its
/// way). Waiting events are kept alive with in-progress signals, so a slow handler never
/// makes the broker redeliver an event that is merely queued. A stop has at most
/// `workers + buffer` events in hand and runs them all within the grace period: a stop hands
/// an event back (one delivery spent) only when the grace period runs out before its handler
/// finished or started.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::EventListenOptions;
/// let options = EventListenOptions { workers: 8, durable_name: Some("billing".into()), ..Default::default() };
/// assert_eq!(options.buffer, 4);
/// ```
#[derive(Debug, Clone)]
pub struct EventListenOptions {
    /// At most this many handlers run at once.
    pub workers: usize,
    /// Read-ahead: at most this many events beyond `workers` are pulled and wait for a worker
    /// (0: pull only for free workers). With `workers` this is the consumer's max ack pending.
    pub buffer: usize,
    /// How long in-flight handlers get to finish when the listener is stopped by its token.
    pub grace: Duration,
    /// The durable consumer name; `None`: `NATS_DURABLE_NAME`.
    pub durable_name: Option<String>,
    /// Deliveries before an event is dead-lettered; `None`: `NATS_JS_MAX_DELIVER`.
    pub max_deliver: Option<i64>,
    /// Time the server waits for an ack before redelivering; `None`: `NATS_JS_ACK_WAIT`.
    pub ack_wait: Option<Duration>,
    /// The longest one handler run may take; after it the run is cancelled and the event is
    /// settled as a failure (redelivered with back-off, dead-lettered at the delivery limit).
    /// `None`: `NATS_JS_HANDLER_TIMEOUT` (default 5 minutes).
    pub handler_timeout: Option<Duration>,
    /// Redelivery delays after retryable failures.
    pub backoff: Backoff,
}

impl Default for EventListenOptions {
    fn default() -> Self {
        EventListenOptions {
            workers: 16,
            buffer: 4,
            grace: Duration::from_secs(30),
            durable_name: None,
            max_deliver: None,
            ack_wait: None,
            handler_timeout: None,
            backoff: Backoff::default(),
        }
    }
}

impl EventListenOptions {
    pub(crate) fn validate(&self, handlers: &EventHandlers) -> Result<(), ListenError> {
        use crate::error::ListenErrorKind::InvalidOptions;
        if handlers.is_empty() {
            return Err(Error::with_detail(InvalidOptions, "no event handlers"));
        }
        for event_type in handlers.types() {
            crate::event::check_type(event_type).map_err(|e| e.map_kind(|_| InvalidOptions))?;
        }
        // The bounds of NATS_JS_MAX_DELIVER / NATS_JS_ACK_WAIT hold for the overrides too.
        let max_deliver_ok = self
            .max_deliver
            .is_none_or(|n| n <= crate::config::MAX_COUNT);
        let ack_wait_ok = self
            .ack_wait
            .is_none_or(|w| w <= crate::config::MAX_JS_DURATION);
        if !max_deliver_ok || !ack_wait_ok {
            return Err(Error::with_detail(
                InvalidOptions,
                format!(
                    "max_deliver {:?} must be at most {}, ack_wait {:?} at most {:?}",
                    self.max_deliver,
                    crate::config::MAX_COUNT,
                    self.ack_wait,
                    crate::config::MAX_JS_DURATION
                ),
            ));
        }
        if self.workers == 0 {
            return Err(Error::with_detail(
                InvalidOptions,
                "workers must be at least 1",
            ));
        }
        if self
            .handler_timeout
            .is_some_and(|t| t.is_zero() || t > crate::config::MAX_JS_DURATION)
        {
            return Err(Error::with_detail(
                InvalidOptions,
                format!(
                    "the handler time limit must be more than zero and at most {:?}",
                    crate::config::MAX_JS_DURATION
                ),
            ));
        }
        Ok(())
    }

    /// The places of the listener's [`DeliveryWindow`](crate::worker::DeliveryWindow):
    /// `workers + buffer`.
    pub(crate) fn window(&self) -> usize {
        self.workers.saturating_add(self.buffer).max(1)
    }

    /// How many free places a pull waits for before asking (so that a fast listener does not
    /// pull one event at a time): half the read-ahead, at least 1.
    pub(crate) fn pull_threshold(&self) -> usize {
        (self.buffer / 2).max(1)
    }
}

/// Publishes response events from inside an event handler.
///
/// A response without a transaction id gets the incoming event's.
///
/// # Examples
///
/// ```
/// # async fn demo(responses: ce_messaging::events::EventResponseWriter) -> Result<(), ce_messaging::events::PublishError> {
/// responses.respond_data("org.example.order.accepted", &serde_json::json!({"ok": true})).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EventResponseWriter {
    connection: Arc<dyn EventConnection>,
    tid: Option<TransactionId>,
    source: String,
    delivery_count: u64,
}

impl fmt::Debug for EventResponseWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventResponseWriter")
            .field("transaction_id", &self.tid)
            .field("delivery_count", &self.delivery_count)
            .finish()
    }
}

impl EventResponseWriter {
    pub(crate) fn new(
        connection: Arc<dyn EventConnection>,
        tid: Option<TransactionId>,
        source: String,
    ) -> Self {
        EventResponseWriter {
            connection,
            tid,
            source,
            delivery_count: 1,
        }
    }

    /// Records how many times the event being handled has been delivered (1-based).
    pub(crate) fn with_delivery_count(mut self, delivery_count: u64) -> Self {
        self.delivery_count = delivery_count.max(1);
        self
    }

    /// How many times the event being handled has been delivered to this durable listener,
    /// this delivery included (1 the first time; more after a nak, an expired ack wait or a
    /// listener that died holding it). A handler with side effects can use it to check for
    /// work a previous delivery may already have done, but not to rule it out: a JetStream
    /// server killed without a clean shutdown can come back with its consumer's state a
    /// moment behind and deliver an event it had delivered (even acked) again with a count of
    /// 1. De-duplicate by event id where it matters.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::events::event_handler_fn;
    /// let handler = event_handler_fn(|event, responses| async move {
    ///     if responses.delivery_count() > 1 {
    ///         tracing::info!(id = %ce_messaging::cloudevents::AttributesReader::id(&event), "redelivered");
    ///     }
    ///     Ok(())
    /// });
    /// # let _ = handler;
    /// ```
    pub fn delivery_count(&self) -> u64 {
        self.delivery_count
    }

    /// The incoming event's transaction id.
    pub fn transaction_id(&self) -> Option<&TransactionId> {
        self.tid.as_ref()
    }

    /// Publishes a response event (with the incoming transaction id unless it has one).
    ///
    /// # Errors
    ///
    /// As [`EventConnection::publish`].
    pub async fn respond(&self, mut event: Event) -> Result<PublishAck, PublishError> {
        if !crate::event::has_transaction_id(&event) {
            if let Some(tid) = &self.tid {
                event.set_transaction_id(tid);
            }
        }
        self.connection.publish(event).await
    }

    /// Publishes a response event of `event_type` with JSON `data`.
    ///
    /// # Errors
    ///
    /// As [`respond`](Self::respond); `Encode` when the data does not serialize.
    pub async fn respond_data<T: Serialize + ?Sized>(
        &self,
        event_type: &str,
        data: &T,
    ) -> Result<PublishAck, PublishError> {
        let tid = self.tid.clone().unwrap_or_else(TransactionId::generate);
        let event =
            new_event_with_tid(event_type, self.source.as_str(), data, tid).map_err(|e| {
                PublishError::from_error(e.map_kind(|_| PublishErrorKind::Encode), None)
            })?;
        self.respond(event).await
    }

    /// Says, for readers of the handler, that this event gets no response. Does nothing.
    pub fn no_response(&self) {}
}

/// Why an event went to the dead-letter stream (`Dead-Letter-Reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The message could not be decoded into a CloudEvent.
    Decode,
    /// A handler rejected it as permanent (or no handler exists for its type).
    Rejected,
    /// It reached the maximum number of deliveries.
    MaxDeliveries,
}

impl DeadLetterReason {
    /// The header value: `decode`, `rejected` or `max-deliveries`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "decode",
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::MaxDeliveries => "max-deliveries",
        }
    }
}

/// Settles one delivered message with the broker.
#[async_trait]
pub(crate) trait Acker: Send + Sync {
    async fn ack(&self) -> Result<(), BoxError>;
    async fn nak(&self, delay: Option<Duration>) -> Result<(), BoxError>;
    async fn in_progress(&self) -> Result<(), BoxError>;
    async fn term(&self) -> Result<(), BoxError>;
}

/// Why a [`DeadLetterSink`] did not store a dead letter.
#[derive(Debug)]
pub(crate) enum DeadLetterPublishError {
    /// The record is larger than the broker accepts (refused before sending, or by the
    /// dead-letter stream's message size limit): store a reference record instead.
    TooLarge(String),
    /// Anything else (no dead-letter stream, timeout, connection lost): retry later.
    Other(BoxError),
}

impl fmt::Display for DeadLetterPublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadLetterPublishError::TooLarge(detail) => write!(f, "too large: {detail}"),
            DeadLetterPublishError::Other(err) => fmt::Display::fmt(err, f),
        }
    }
}

/// Stores a dead letter and returns after the broker acknowledged it.
#[async_trait]
pub(crate) trait DeadLetterSink: Send + Sync {
    /// The events stream the dead-lettered messages were delivered from.
    fn events_stream(&self) -> &str;
    /// The durable consumer that dead-letters them.
    fn durable(&self) -> &str;
    /// The largest message (headers and payload, as on the wire) the broker accepts.
    fn max_payload(&self) -> usize;
    /// Stores one dead letter (headers complete, `Nats-Msg-Id` included).
    async fn publish_dead_letter(
        &self,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), DeadLetterPublishError>;
}

/// The longest original `Nats-Msg-Id` a dead letter's id is built from; a longer one (never
/// made by this library) gives the `<stream>.<stream seq>` form instead, so the id stays small.
const MAX_ORIGINAL_MSG_ID: usize = 256;

/// The `Nats-Msg-Id` of the dead letter of a message with `original` id (or, without one, of
/// stream sequence `stream_seq` in `stream`) dead-lettered by `durable`: `<original>.dlq.<durable>`,
/// so one event dead-lettered by two durables gives two dead letters, while the same durable
/// dead-lettering it twice (a lost term) is de-duplicated. An original id longer than 256 bytes
/// is replaced by `<stream>.<stream seq>`.
pub(crate) fn dead_letter_msg_id(
    original: Option<&str>,
    stream: &str,
    stream_seq: &str,
    durable: &str,
) -> String {
    match original {
        Some(id) if !id.is_empty() && id.len() <= MAX_ORIGINAL_MSG_ID => {
            format!("{id}.dlq.{durable}")
        }
        _ => format!("{stream}.{stream_seq}.dlq.{durable}"),
    }
}

/// The longest `Dead-Letter-Error` value, in bytes: a longer error text (e.g. a decode error
/// quoting a huge attribute) is cut on a character boundary and says how much was left out.
pub const MAX_DEAD_LETTER_ERROR: usize = 1024;

/// `Dead-Letter-Payload` value of a reference record: the original was too large to be copied.
pub const DEAD_LETTER_PAYLOAD_OMITTED: &str = "omitted";

/// Whether a header of a dead-lettered message is dropped from its dead letter: every `Nats-*`
/// header is a directive to (or an annotation by) the server that stored the original
/// (`Nats-Expected-*`, `Nats-TTL`, `Nats-Rollup`, `Nats-Schedule*`, `Nats-Batch-*`,
/// `Nats-Incr`, ...). Sent on to the dead-letter stream, a directive would be applied there and
/// could make the server refuse the dead letter. `Nats-Msg-Id` is dropped too and replaced by
/// the dead letter's own id; `Dead-Letter-*` headers are set anew.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::is_dropped_from_dead_letters;
/// assert!(is_dropped_from_dead_letters("Nats-Expected-Last-Sequence"));
/// assert!(is_dropped_from_dead_letters("nats-ttl"));
/// assert!(!is_dropped_from_dead_letters("ce-type"));
/// assert!(!is_dropped_from_dead_letters("traceparent"));
/// ```
pub fn is_dropped_from_dead_letters(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("nats-") || lower.starts_with("dead-letter-")
}

/// `text` cut to at most [`MAX_DEAD_LETTER_ERROR`] bytes on a character boundary, saying how
/// many bytes were left out.
pub(crate) fn cap_dead_letter_error(text: &str) -> String {
    if text.len() <= MAX_DEAD_LETTER_ERROR {
        return text.to_owned();
    }
    // The note is at most 40 bytes ("... [18446744073709551615 bytes cut]").
    let mut end = MAX_DEAD_LETTER_ERROR - 40;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [{} bytes cut]", &text[..end], text.len() - end)
}

/// Size of headers + payload as the server counts it against `max_payload` (as `HPUB`).
fn wire_size(headers: &HeaderMap, payload_len: usize) -> usize {
    let mut block = 0;
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        for value in values {
            let value: &str = value.as_ref();
            block += name.len() + 2 + value.len() + 2;
        }
    }
    if block == 0 {
        payload_len
    } else {
        b"NATS/1.0\r\n".len() + block + b"\r\n".len() + payload_len
    }
}

/// One delivered message, as a backend hands it to the shared processing.
pub(crate) struct Delivery {
    pub subject: String,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
    pub stream_sequence: u64,
    /// 1-based delivery count.
    pub delivered: u64,
    /// Shared with the listener's window, which keeps the delivery alive while it waits for
    /// a worker (it holds only a weak reference, so dropping the delivery still drops this).
    pub acker: Arc<dyn Acker>,
    /// The delivery's place in the listener's window, given back when it is dropped.
    pub hold: Hold,
}

/// What processing deliveries needs besides the delivery.
pub(crate) struct DeliveryContext {
    pub handlers: EventHandlers,
    /// Deliveries allowed before dead-lettering; <= 0 means unlimited.
    pub max_deliver: i64,
    pub ack_wait: Duration,
    /// The longest one handler run may take.
    pub handler_timeout: Duration,
    pub backoff: Backoff,
    pub dead_letters: Arc<dyn DeadLetterSink>,
    pub connection: Arc<dyn EventConnection>,
    pub source: String,
}

/// One publish inside a `publish` span: the event gets its trace context (see
/// [`telemetry`]), the outcome is counted by type. Every backend's
/// [`EventConnection::publish`] goes through here.
pub(crate) async fn traced_publish<F, Fut>(
    mut event: Event,
    publish: F,
) -> Result<PublishAck, PublishError>
where
    F: FnOnce(Event) -> Fut,
    Fut: Future<Output = Result<PublishAck, PublishError>>,
{
    use tracing::field::Empty;
    let span = tracing::info_span!(
        "publish",
        "event.id" = Empty,
        "event.type" = Empty,
        transaction_id = Empty,
        trace_id = Empty,
        span_id = Empty,
        parent_span_id = Empty,
        outcome = Empty,
    );
    let trace = telemetry::outgoing(&mut event, !span.is_disabled());
    telemetry::record_event(&span, &event);
    telemetry::record_trace(&span, trace.as_ref());
    // The metrics label; taken before the event moves into the backend.
    let event_type = event.ty().to_owned();
    let result = tracing::Instrument::instrument(publish(event), span.clone()).await;
    span.record("outcome", telemetry::count_publish(event_type, &result));
    result
}

/// [`traced_publish`] for a batch: one `publish_all` span, a trace context per event, each
/// outcome counted by type.
pub(crate) async fn traced_publish_all<F, Fut>(
    mut events: Vec<Event>,
    publish_all: F,
) -> Vec<Result<PublishAck, PublishError>>
where
    F: FnOnce(Vec<Event>) -> Fut,
    Fut: Future<Output = Vec<Result<PublishAck, PublishError>>>,
{
    let span = tracing::info_span!("publish_all", count = events.len());
    telemetry::outgoing_all(&mut events, !span.is_disabled());
    // The metrics labels, one per run of consecutive events of the same type; taken before
    // the events move into the backend.
    let mut runs: Vec<(String, usize)> = Vec::new();
    for event in &events {
        match runs.last_mut() {
            Some((ty, n)) if ty.as_str() == event.ty() => *n += 1,
            _ => runs.push((event.ty().to_owned(), 1)),
        }
    }
    let results = tracing::Instrument::instrument(publish_all(events), span).await;
    let mut rest = results.as_slice();
    for (event_type, n) in runs {
        // A backend returns one result per event; `min` keeps a short answer from panicking.
        let (run, after) = rest.split_at(n.min(rest.len()));
        telemetry::count_publishes(&event_type, run);
        rest = after;
    }
    results
}

/// Redelivery delays of a message whose dead-letter publish failed (no dead-letter stream, a
/// timeout, a lost connection): 5 s after the first failed delivery, doubling per delivery, at
/// most 5 min.
const DEAD_LETTER_RETRY: Backoff = Backoff {
    initial: Duration::from_secs(5),
    max: Duration::from_secs(300),
};

/// Starts a listener's workers over its delivery `window` (the queue has room for the whole
/// window, so queueing a delivery never waits) and the window's keep-alive, which sends
/// in-progress for queued deliveries every third of the ack wait. Both backends' listeners
/// start here.
pub(crate) fn start_delivery_pool(
    workers: usize,
    window: &crate::worker::DeliveryWindow,
    stopping: tokio_util::sync::CancellationToken,
    ctx: Arc<DeliveryContext>,
) -> crate::worker::WorkerPool<Delivery> {
    let keep_alive_every = ctx.ack_wait / 3;
    let pool = crate::worker::WorkerPool::start_stopping_with(
        workers,
        window.capacity(),
        stopping,
        move |delivery, work| {
            let ctx = ctx.clone();
            async move { process_delivery(delivery, &ctx, &work).await }.boxed()
        },
    );
    window.spawn_keep_alive(keep_alive_every, pool.context().finished);
    pool
}

/// Processes one delivery per the contract. The library, not the broker, enforces
/// `max_deliver`: backends configure their consumer without a delivery limit, so a message
/// that ran out of deliveries (by failures, ack wait expiry or a listener that died holding
/// it) is always seen once more and dead-lettered (`max-deliveries`) before any handler runs,
/// never parked by the broker.
///
/// A delivery that reached a worker is always processed, also while the listener stops (the
/// window bounds how many there are); only the end of the grace period cuts it off.
pub(crate) async fn process_delivery(
    delivery: Delivery,
    ctx: &DeliveryContext,
    work: &WorkContext,
) -> Outcome {
    use tracing::field::Empty;
    let span = tracing::info_span!(
        "handle_event",
        "event.id" = Empty,
        "event.type" = Empty,
        transaction_id = Empty,
        delivered = delivery.delivered,
        trace_id = Empty,
        span_id = Empty,
        parent_span_id = Empty,
        outcome = Empty,
        reason = Empty,
    );
    let (outcome, settled) =
        tracing::Instrument::instrument(deliver(delivery, ctx, work, span.clone()), span.clone())
            .await;
    span.record("outcome", settled);
    outcome
}

/// [`process_delivery`] inside its span; also says how the delivery was settled.
async fn deliver(
    delivery: Delivery,
    ctx: &DeliveryContext,
    work: &WorkContext,
    span: tracing::Span,
) -> (Outcome, &'static str) {
    delivery.hold.start();
    if work.abort.is_cancelled() {
        // Taken by a worker as the grace period ran out: hand it back untouched (a crash
        // settles nothing).
        if !work.crashed() {
            settle(delivery.acker.nak(None).await, "nak");
        }
        return (Outcome::Abandoned, "abandoned");
    }
    let event = match codec::decode(delivery.headers.as_ref(), &delivery.payload) {
        Ok(event) => event,
        Err(err) => {
            tracing::warn!(subject = %delivery.subject, seq = delivery.stream_sequence, error = %err, "undecodable event");
            let settled =
                dead_letter(&delivery, ctx, DeadLetterReason::Decode, &err.to_string()).await;
            metrics::counter!(
                telemetry::metric_names::DEAD_LETTERED,
                "type" => "undecodable",
                "reason" => DeadLetterReason::Decode.as_str()
            )
            .increment(1);
            return (Outcome::Finished, settled);
        }
    };
    let event_type = event.ty();
    telemetry::record_event(&span, &event);
    let trace = telemetry::incoming(&event, !span.is_disabled());
    telemetry::record_trace(&span, trace.as_ref());
    let entry = ctx.handlers.get(event_type).cloned();
    if ctx.max_deliver > 0 && delivery.delivered > ctx.max_deliver as u64 {
        let text = format!(
            "delivered {} times, max deliver is {}",
            delivery.delivered, ctx.max_deliver
        );
        let settled = dead_letter(&delivery, ctx, DeadLetterReason::MaxDeliveries, &text).await;
        match &entry {
            Some(entry) => entry
                .metrics
                .get_or_init(|| EventTypeMetrics::register(event_type))
                .dead_lettered(DeadLetterReason::MaxDeliveries.as_str()),
            None => EventTypeMetrics::register(event_type)
                .dead_lettered(DeadLetterReason::MaxDeliveries.as_str()),
        }
        return (Outcome::Finished, settled);
    }
    let Some(entry) = entry else {
        let text = format!("no handler for event type {event_type}");
        let settled = dead_letter(&delivery, ctx, DeadLetterReason::Rejected, &text).await;
        EventTypeMetrics::register(event_type).dead_lettered(DeadLetterReason::Rejected.as_str());
        return (Outcome::Finished, settled);
    };
    let metrics = entry
        .metrics
        .get_or_init(|| EventTypeMetrics::register(event_type));
    metrics.delivered.increment(1);
    let tid = event.transaction_id();
    // For the time-limit warning (the event moves into the handler).
    let (event_type, event_id) = (event_type.to_owned(), event.id().to_owned());
    let responses = EventResponseWriter::new(ctx.connection.clone(), tid, ctx.source.clone())
        .with_delivery_count(delivery.delivered);
    let started = std::time::Instant::now();
    let handling =
        telemetry::in_context(trace, call_handler(entry.handler.handle(event, responses))).fuse();
    futures::pin_mut!(handling);
    // Tell the server we are still working well before the ack wait runs out (a third of it,
    // so a late tick on a loaded machine still comes in time).
    let tick = (ctx.ack_wait / 3).max(Duration::from_millis(20));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    let time_limit = tokio::time::sleep(ctx.handler_timeout);
    futures::pin_mut!(time_limit);
    let result = loop {
        tokio::select! {
            biased;
            _ = work.abort.cancelled() => {
                if !work.crashed() {
                    settle(delivery.acker.nak(None).await, "nak");
                }
                return (Outcome::Abandoned, "abandoned");
            }
            result = &mut handling => break result,
            _ = &mut time_limit => {
                tracing::warn!(
                    event_type = %event_type,
                    event_id = %event_id,
                    delivered = delivery.delivered,
                    limit = ?ctx.handler_timeout,
                    "handler exceeded its time limit; cancelled and settled as a failure"
                );
                break Err(HandlerError::new(format!(
                    "handler time limit {:?} exceeded",
                    ctx.handler_timeout
                )));
            }
            _ = ticker.tick() => settle(delivery.acker.in_progress().await, "in-progress"),
        }
    };
    metrics
        .handler_duration
        .record(started.elapsed().as_secs_f64());
    let settled = match result {
        Ok(()) => {
            settle(delivery.acker.ack().await, "ack");
            metrics.acked.increment(1);
            "ack"
        }
        Err(err) if err.is_permanent() => {
            let settled =
                dead_letter(&delivery, ctx, DeadLetterReason::Rejected, err.message()).await;
            metrics.dead_lettered(DeadLetterReason::Rejected.as_str());
            settled
        }
        Err(err) => {
            if ctx.max_deliver > 0 && delivery.delivered >= ctx.max_deliver as u64 {
                let settled = dead_letter(
                    &delivery,
                    ctx,
                    DeadLetterReason::MaxDeliveries,
                    err.message(),
                )
                .await;
                metrics.dead_lettered(DeadLetterReason::MaxDeliveries.as_str());
                settled
            } else {
                let delay = err
                    .retry_delay()
                    .unwrap_or_else(|| ctx.backoff.delay(delivery.delivered));
                tracing::debug!(delivered = delivery.delivered, ?delay, error = %err, "handler failed; nak");
                settle(delivery.acker.nak(Some(delay)).await, "nak");
                metrics.nacked.increment(1);
                "nak"
            }
        }
    };
    (Outcome::Finished, settled)
}

fn settle(result: Result<(), BoxError>, what: &str) {
    if let Err(err) = result {
        // The server redelivers after the ack wait; nothing is lost, but say so.
        tracing::warn!(error = %err, "{what} failed");
    }
}

/// A dead letter ready to be stored.
#[derive(Debug)]
pub(crate) struct DeadLetterRecord {
    pub headers: HeaderMap,
    pub payload: Bytes,
    /// A reference record: the original did not fit, only where it is was kept.
    pub reference: bool,
}

/// Builds the dead letter of `delivery`: the original payload and headers without the
/// server's directives ([`is_dropped_from_dead_letters`]), the `Dead-Letter-*` headers with the
/// error capped at [`MAX_DEAD_LETTER_ERROR`], and the dead letter's own `Nats-Msg-Id`. When
/// that would exceed `max_payload`, or `force_reference`, a reference record instead: the same
/// `Dead-Letter-*` headers plus `Dead-Letter-Payload: omitted` and `Dead-Letter-Size`, no
/// original headers, no payload.
pub(crate) fn dead_letter_record(
    delivery: &Delivery,
    reason: DeadLetterReason,
    error: &str,
    events_stream: &str,
    durable: &str,
    max_payload: usize,
    force_reference: bool,
) -> DeadLetterRecord {
    let original_id = delivery
        .headers
        .as_ref()
        .and_then(|h| h.get(NATS_MSG_ID))
        .map(|v| v.as_str().to_owned());
    let seq = delivery.stream_sequence.to_string();
    let mut own = HeaderMap::new();
    own.insert(DEAD_LETTER_REASON, reason.as_str());
    own.insert(DEAD_LETTER_ERROR, text_value(&cap_dead_letter_error(error)));
    own.insert(DEAD_LETTER_SUBJECT, text_value(&delivery.subject));
    own.insert(DEAD_LETTER_STREAM, text_value(events_stream));
    own.insert(DEAD_LETTER_STREAM_SEQ, seq.as_str());
    own.insert(
        DEAD_LETTER_DELIVERIES,
        delivery.delivered.to_string().as_str(),
    );
    let id = dead_letter_msg_id(original_id.as_deref(), events_stream, &seq, durable);
    own.insert(NATS_MSG_ID, text_value(&id));
    if !force_reference {
        let mut headers = HeaderMap::new();
        if let Some(original) = &delivery.headers {
            for (name, values) in original.iter() {
                if is_dropped_from_dead_letters(name.as_ref()) {
                    continue;
                }
                for value in values {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
        for (name, values) in own.iter() {
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
        if wire_size(&headers, delivery.payload.len()) <= max_payload {
            return DeadLetterRecord {
                headers,
                payload: delivery.payload.clone(),
                reference: false,
            };
        }
    }
    let original_size = wire_size(
        delivery.headers.as_ref().unwrap_or(&HeaderMap::new()),
        delivery.payload.len(),
    );
    own.insert(DEAD_LETTER_PAYLOAD, DEAD_LETTER_PAYLOAD_OMITTED);
    own.insert(DEAD_LETTER_SIZE, original_size.to_string().as_str());
    DeadLetterRecord {
        headers: own,
        payload: Bytes::new(),
        reference: true,
    }
}

/// Stores the dead letter of `delivery` (see [`dead_letter_record`]; a record the broker
/// refuses as too large is stored as a reference record), then terms the original. If the
/// dead-letter publish fails for another reason, the original is neither acked nor terminated:
/// it is nak'ed with a growing delay ([`DEAD_LETTER_RETRY`]), counted in
/// `ce_messaging_events_dead_letter_failures_total`, and the log says why.
async fn dead_letter(
    delivery: &Delivery,
    ctx: &DeliveryContext,
    reason: DeadLetterReason,
    error: &str,
) -> &'static str {
    tracing::Span::current().record("reason", reason.as_str());
    let sink = &ctx.dead_letters;
    let build = |force_reference| {
        dead_letter_record(
            delivery,
            reason,
            error,
            sink.events_stream(),
            sink.durable(),
            sink.max_payload(),
            force_reference,
        )
    };
    let record = build(false);
    let mut reference = record.reference;
    let mut stored = sink
        .publish_dead_letter(record.headers, record.payload)
        .await;
    if let (Err(DeadLetterPublishError::TooLarge(detail)), false) = (&stored, reference) {
        tracing::warn!(subject = %delivery.subject, seq = delivery.stream_sequence, detail = %detail, "dead letter refused as too large; storing a reference record");
        let record = build(true);
        reference = true;
        stored = sink
            .publish_dead_letter(record.headers, record.payload)
            .await;
    }
    match stored {
        Ok(()) => {
            if reference {
                tracing::warn!(subject = %delivery.subject, seq = delivery.stream_sequence, reason = reason.as_str(), error = %cap_dead_letter_error(error), "event dead-lettered as a reference record (too large to copy; the original stays in the events stream until its limits remove it)");
            } else {
                tracing::warn!(subject = %delivery.subject, seq = delivery.stream_sequence, reason = reason.as_str(), error = %cap_dead_letter_error(error), "event dead-lettered");
            }
            settle(delivery.acker.term().await, "term");
            "dead-letter"
        }
        Err(err) => {
            let delay = DEAD_LETTER_RETRY.delay(delivery.delivered);
            metrics::counter!(
                telemetry::metric_names::DEAD_LETTER_FAILURES,
                "reason" => reason.as_str()
            )
            .increment(1);
            tracing::error!(subject = %delivery.subject, seq = delivery.stream_sequence, reason = reason.as_str(), error = %err, ?delay, "dead-letter publish failed; the event is kept and offered again after the delay");
            settle(delivery.acker.nak(Some(delay)).await, "nak");
            "nak"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
        };
        let delays: Vec<_> = (1..=5).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, vec![10, 20, 40, 50, 50]);
        assert_eq!(b.delay(u64::MAX), Duration::from_millis(50));
    }

    #[test]
    fn dead_letter_reasons_match_the_contract() {
        let reasons: Vec<_> = [
            DeadLetterReason::Decode,
            DeadLetterReason::Rejected,
            DeadLetterReason::MaxDeliveries,
        ]
        .iter()
        .map(|r| r.as_str())
        .collect();
        assert_eq!(reasons, vec!["decode", "rejected", "max-deliveries"]);
    }

    #[test]
    fn listen_overrides_beyond_the_config_bounds_are_invalid_options() {
        let handlers = EventHandlers::new().on("a.b", event_handler_fn(|_, _| async { Ok(()) }));
        let too_many = EventListenOptions {
            max_deliver: Some(i64::MAX),
            ..Default::default()
        };
        let too_long = EventListenOptions {
            ack_wait: Some(Duration::from_secs(1_000_000_000_000)),
            ..Default::default()
        };
        for options in [too_many, too_long] {
            let err = options.validate(&handlers).unwrap_err();
            assert_eq!(err.kind(), crate::error::ListenErrorKind::InvalidOptions);
        }
        assert!(EventListenOptions::default().validate(&handlers).is_ok());
    }

    /// What a fake acker was told.
    #[derive(Default)]
    struct Settled {
        calls: std::sync::Mutex<Vec<String>>,
    }

    struct FakeAcker(Arc<Settled>);

    #[async_trait]
    impl Acker for FakeAcker {
        async fn ack(&self) -> Result<(), BoxError> {
            self.0.calls.lock().unwrap().push("ack".into());
            Ok(())
        }
        async fn nak(&self, delay: Option<Duration>) -> Result<(), BoxError> {
            self.0.calls.lock().unwrap().push(format!("nak {delay:?}"));
            Ok(())
        }
        async fn in_progress(&self) -> Result<(), BoxError> {
            Ok(())
        }
        async fn term(&self) -> Result<(), BoxError> {
            self.0.calls.lock().unwrap().push("term".into());
            Ok(())
        }
    }

    /// A dead-letter sink that stores what it is given, or fails as told.
    struct FakeSink {
        max_payload: usize,
        /// Refuse records larger than this as `TooLarge` (a stream's max message size).
        refuse_above: usize,
        fail: bool,
        stored: std::sync::Mutex<Vec<(HeaderMap, Bytes)>>,
    }

    #[async_trait]
    impl DeadLetterSink for FakeSink {
        fn events_stream(&self) -> &str {
            "CE"
        }
        fn durable(&self) -> &str {
            "svc"
        }
        fn max_payload(&self) -> usize {
            self.max_payload
        }
        async fn publish_dead_letter(
            &self,
            headers: HeaderMap,
            payload: Bytes,
        ) -> Result<(), DeadLetterPublishError> {
            if self.fail {
                return Err(DeadLetterPublishError::Other(
                    "no dead-letter stream".into(),
                ));
            }
            if wire_size(&headers, payload.len()) > self.refuse_above {
                return Err(DeadLetterPublishError::TooLarge("stream limit".into()));
            }
            self.stored.lock().unwrap().push((headers, payload));
            Ok(())
        }
    }

    fn sink(max_payload: usize, refuse_above: usize, fail: bool) -> Arc<FakeSink> {
        Arc::new(FakeSink {
            max_payload,
            refuse_above,
            fail,
            stored: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn poison(payload: &[u8], delivered: u64) -> (Delivery, Arc<Settled>) {
        let mut headers = HeaderMap::new();
        headers.insert("X-Kept", "yes");
        headers.insert("ce-type", "org.example.kept");
        headers.insert(NATS_MSG_ID, "evt-1");
        headers.insert("Nats-Expected-Stream", "CE");
        headers.insert("Nats-Expected-Last-Sequence", "41");
        headers.insert("Nats-TTL", "1h");
        headers.insert("Nats-Rollup", "sub");
        headers.insert("Nats-Schedule", "@every 1m");
        headers.insert("Nats-Schedule-Target", "events.x");
        headers.insert("Dead-Letter-Reason", "forged");
        let settled = Arc::new(Settled::default());
        let delivery = Delivery {
            subject: "events.org.example.kept".into(),
            headers: Some(headers),
            payload: Bytes::copy_from_slice(payload),
            stream_sequence: 42,
            delivered,
            acker: Arc::new(FakeAcker(settled.clone())),
            hold: crate::worker::Hold::detached(),
        };
        (delivery, settled)
    }

    fn context(dead_letters: Arc<FakeSink>) -> DeliveryContext {
        let broker = crate::memory::MemoryBroker::new();
        DeliveryContext {
            handlers: EventHandlers::new(),
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(300),
            backoff: Backoff::default(),
            dead_letters,
            connection: Arc::new(broker.event_connection(&crate::config::Config::default())),
            source: "test".into(),
        }
    }

    fn names(headers: &HeaderMap) -> Vec<String> {
        let mut names: Vec<String> = headers.iter().map(|(n, _)| n.to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_long_error_is_cut_on_a_character_boundary() {
        assert_eq!(cap_dead_letter_error("short"), "short");
        let exact = "e".repeat(MAX_DEAD_LETTER_ERROR);
        assert_eq!(cap_dead_letter_error(&exact), exact);
        // Three-byte characters: a cut at a fixed byte offset would split one.
        let long = format!("invalid attribute: {}", "€".repeat(100_000));
        let capped = cap_dead_letter_error(&long);
        assert!(capped.len() <= MAX_DEAD_LETTER_ERROR, "{}", capped.len());
        assert!(capped.starts_with("invalid attribute: €€"));
        assert!(capped.ends_with(" bytes cut]"), "{capped}");
        let cut: usize = capped
            .rsplit("... [")
            .next()
            .and_then(|n| n.strip_suffix(" bytes cut]"))
            .and_then(|n| n.parse().ok())
            .expect("says how much was cut");
        assert_eq!(capped.find("... [").unwrap() + cut, long.len());
    }

    #[test]
    fn a_dead_letter_keeps_payload_and_user_headers_and_drops_directives() {
        let (delivery, _) = poison(b"not an event", 3);
        let error = "x".repeat(5000);
        let record = dead_letter_record(
            &delivery,
            DeadLetterReason::Decode,
            &error,
            "CE",
            "svc",
            1024 * 1024,
            false,
        );
        assert!(!record.reference);
        assert_eq!(&record.payload[..], b"not an event");
        assert_eq!(
            names(&record.headers),
            vec![
                "Dead-Letter-Deliveries",
                "Dead-Letter-Error",
                "Dead-Letter-Reason",
                "Dead-Letter-Stream",
                "Dead-Letter-Stream-Seq",
                "Dead-Letter-Subject",
                "Nats-Msg-Id",
                "X-Kept",
                "ce-type",
            ]
        );
        let get = |name| record.headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(get(DEAD_LETTER_REASON).as_deref(), Some("decode"));
        assert_eq!(get(NATS_MSG_ID).as_deref(), Some("evt-1.dlq.svc"));
        assert_eq!(get(DEAD_LETTER_STREAM).as_deref(), Some("CE"));
        assert_eq!(get(DEAD_LETTER_STREAM_SEQ).as_deref(), Some("42"));
        assert_eq!(get(DEAD_LETTER_DELIVERIES).as_deref(), Some("3"));
        assert!(get(DEAD_LETTER_ERROR).unwrap().len() <= MAX_DEAD_LETTER_ERROR);
    }

    #[test]
    fn a_dead_letter_over_max_payload_becomes_a_reference_record() {
        let payload = vec![b'x'; 4000];
        let (delivery, _) = poison(&payload, 1);
        let full = dead_letter_record(
            &delivery,
            DeadLetterReason::Rejected,
            "no",
            "CE",
            "svc",
            8192,
            false,
        );
        assert!(!full.reference, "fits in 8 KiB");
        let record = dead_letter_record(
            &delivery,
            DeadLetterReason::Rejected,
            "no",
            "CE",
            "svc",
            4096,
            false,
        );
        assert!(record.reference);
        assert!(record.payload.is_empty());
        assert!(wire_size(&record.headers, 0) <= 4096);
        let get = |name| record.headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(get(DEAD_LETTER_PAYLOAD).as_deref(), Some("omitted"));
        assert_eq!(
            get(DEAD_LETTER_SIZE),
            Some(wire_size(delivery.headers.as_ref().unwrap(), payload.len()).to_string())
        );
        assert_eq!(
            get(DEAD_LETTER_SUBJECT).as_deref(),
            Some("events.org.example.kept")
        );
        assert_eq!(get(NATS_MSG_ID).as_deref(), Some("evt-1.dlq.svc"));
        assert!(
            get("X-Kept").is_none(),
            "no original headers in a reference"
        );
    }

    #[test]
    fn a_huge_original_id_gives_the_stream_sequence_form() {
        let id = "i".repeat(MAX_ORIGINAL_MSG_ID + 1);
        assert_eq!(
            dead_letter_msg_id(Some(&id), "CE", "42", "svc"),
            "CE.42.dlq.svc"
        );
    }

    #[tokio::test]
    async fn a_record_refused_as_too_large_is_stored_as_a_reference() {
        // The broker's max payload lets the copy through, the stream's size limit does not.
        let sink = sink(1024 * 1024, 2048, false);
        let ctx = context(sink.clone());
        let (delivery, settled) = poison(&[b'x'; 4000], 1);
        let settled_as = dead_letter(&delivery, &ctx, DeadLetterReason::Rejected, "no").await;
        assert_eq!(settled_as, "dead-letter");
        let stored = sink.stored.lock().unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(
            stored[0].0.get(DEAD_LETTER_PAYLOAD).map(|v| v.as_str()),
            Some("omitted")
        );
        assert_eq!(*settled.calls.lock().unwrap(), vec!["term".to_string()]);
    }

    #[tokio::test]
    async fn a_failed_dead_letter_publish_naks_with_a_growing_delay_and_is_counted() {
        let sink = sink(1024 * 1024, usize::MAX, true);
        let ctx = context(sink.clone());
        let recorder = counting::Recorder::default();
        let mut calls = Vec::new();
        for delivered in [1, 2, 3, 10] {
            let (delivery, settled) = poison(b"bad", delivered);
            let settled_as = metrics::with_local_recorder(&recorder, || {
                futures::executor::block_on(dead_letter(
                    &delivery,
                    &ctx,
                    DeadLetterReason::Decode,
                    "bad",
                ))
            });
            assert_eq!(settled_as, "nak");
            calls.extend(settled.calls.lock().unwrap().clone());
        }
        assert_eq!(
            calls,
            vec![
                "nak Some(5s)",
                "nak Some(10s)",
                "nak Some(20s)",
                "nak Some(300s)"
            ],
            "never acked or terminated; the delay grows to its bound"
        );
        assert!(sink.stored.lock().unwrap().is_empty());
        assert_eq!(
            recorder.count(telemetry::metric_names::DEAD_LETTER_FAILURES),
            4
        );
    }

    /// A metrics recorder that counts counter increments by name.
    mod counting {
        use std::collections::HashMap;
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};

        use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};

        #[derive(Default)]
        pub struct Recorder {
            counters: Mutex<HashMap<String, Arc<Cell>>>,
        }

        #[derive(Default)]
        pub struct Cell(AtomicU64);

        impl metrics::CounterFn for Cell {
            fn increment(&self, value: u64) {
                self.0.fetch_add(value, Ordering::SeqCst);
            }
            fn absolute(&self, value: u64) {
                self.0.store(value, Ordering::SeqCst);
            }
        }

        impl Recorder {
            pub fn count(&self, name: &str) -> u64 {
                self.counters
                    .lock()
                    .unwrap()
                    .get(name)
                    .map_or(0, |c| c.0.load(Ordering::SeqCst))
            }
        }

        impl metrics::Recorder for Recorder {
            fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
                let cell = self
                    .counters
                    .lock()
                    .unwrap()
                    .entry(key.name().to_owned())
                    .or_default()
                    .clone();
                Counter::from_arc(cell)
            }
            fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
                Gauge::noop()
            }
            fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
                Histogram::noop()
            }
        }
    }
}
