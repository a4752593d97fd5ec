//! Event handlers: the [`EventHandler`] trait, the closure adapters ([`event_handler_fn`],
//! [`typed_event_handler`]), the [`EventHandlers`] registry a listener serves, by type, and the
//! [`EventResponseWriter`] a handler answers a request event through.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use cloudevents::Event;
use serde::{de::DeserializeOwned, Serialize};

use crate::error::PublishErrorKind;
use crate::event::{new_event_with_tid, EventExt, EventType, TransactionId};
use crate::handler::HandlerError;
use crate::telemetry::{EventTypeMetrics, LazyMetrics};

use super::{EventConnection, PublishAck, PublishError};

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
