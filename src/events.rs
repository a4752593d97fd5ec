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
    text_value, DEAD_LETTER_DELIVERIES, DEAD_LETTER_ERROR, DEAD_LETTER_REASON,
    DEAD_LETTER_STREAM_SEQ, DEAD_LETTER_SUBJECT, NATS_MSG_ID,
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
    /// before sending (`TooLarge`).
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
        if self.workers == 0 {
            return Err(Error::with_detail(
                InvalidOptions,
                "workers must be at least 1",
            ));
        }
        if self.handler_timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::with_detail(
                InvalidOptions,
                "the handler time limit must be more than zero",
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

/// Stores a dead letter and returns after the broker acknowledged it.
#[async_trait]
pub(crate) trait DeadLetterSink: Send + Sync {
    async fn publish_dead_letter(&self, headers: HeaderMap, payload: Bytes)
        -> Result<(), BoxError>;
}

/// The `Nats-Msg-Id` of the dead letter of a message with `original` id (or, without one, of
/// stream sequence `stream_seq` in `stream`) dead-lettered by `durable`: `<original>.dlq.<durable>`,
/// so one event dead-lettered by two durables gives two dead letters, while the same durable
/// dead-lettering it twice (a lost term) is de-duplicated.
pub(crate) fn dead_letter_msg_id(
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

/// Replaces the `Nats-Msg-Id` of a dead letter's headers (built by the shared processing from
/// the original's) with [`dead_letter_msg_id`]. Every backend's [`DeadLetterSink`] calls it.
pub(crate) fn stamp_dead_letter_msg_id(
    headers: &mut HeaderMap,
    events_stream: &str,
    durable: &str,
) -> Result<(), BoxError> {
    let original = headers.get(NATS_MSG_ID).map(|v| v.as_str().to_owned());
    let seq = headers
        .get(DEAD_LETTER_STREAM_SEQ)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    let id = dead_letter_msg_id(original.as_deref(), events_stream, &seq, durable);
    let id: async_nats::HeaderValue = id
        .parse()
        .map_err(|_| format!("dead-letter id {id:?} is not a valid header value"))?;
    headers.insert(NATS_MSG_ID, id);
    Ok(())
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

/// Delay before a message whose dead-letter publish failed is offered again.
const DEAD_LETTER_RETRY_DELAY: Duration = Duration::from_secs(5);

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

/// Publishes the original headers and payload plus the `Dead-Letter-*` headers, then terms the
/// original; if the dead-letter publish fails, naks the original with a delay instead.
async fn dead_letter(
    delivery: &Delivery,
    ctx: &DeliveryContext,
    reason: DeadLetterReason,
    error: &str,
) -> &'static str {
    tracing::Span::current().record("reason", reason.as_str());
    let mut headers = delivery.headers.clone().unwrap_or_default();
    headers.insert(DEAD_LETTER_REASON, reason.as_str());
    headers.insert(DEAD_LETTER_ERROR, text_value(error));
    headers.insert(DEAD_LETTER_SUBJECT, text_value(&delivery.subject));
    headers.insert(
        DEAD_LETTER_STREAM_SEQ,
        delivery.stream_sequence.to_string().as_str(),
    );
    headers.insert(
        DEAD_LETTER_DELIVERIES,
        delivery.delivered.to_string().as_str(),
    );
    match ctx
        .dead_letters
        .publish_dead_letter(headers, delivery.payload.clone())
        .await
    {
        Ok(()) => {
            tracing::warn!(subject = %delivery.subject, seq = delivery.stream_sequence, reason = reason.as_str(), error = %error, "event dead-lettered");
            settle(delivery.acker.term().await, "term");
            "dead-letter"
        }
        Err(err) => {
            tracing::error!(subject = %delivery.subject, seq = delivery.stream_sequence, error = %err, "dead-letter publish failed; nak with delay");
            settle(
                delivery.acker.nak(Some(DEAD_LETTER_RETRY_DELAY)).await,
                "nak",
            );
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
}
