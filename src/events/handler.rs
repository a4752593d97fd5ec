//! Event handlers: the [`EventHandler`] trait, the adapters that make handlers of async
//! functions ([`typed_event_handler`], [`event_handler_fn`]), the [`EventHandlers`] table a
//! listener serves, by type, with its shared [`State`](crate::handler::State), and the
//! [`EventResponseWriter`] a handler answers a request event through.
//!
//! Why the trait returns `impl Future` instead of using async-trait: see [`crate::handler`].

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::codec::ReceivedEvent;
use cloudevents::Event;
use serde::{de::DeserializeOwned, Serialize};

use crate::error::PublishErrorKind;
use crate::event::{new_event_with_tid, EventExt, EventType, TransactionId};
use crate::handler::{decode_data, BoxFuture, Entry, HandlerError, Registry, State};
use crate::telemetry::EventTypeMetrics;

use super::{EventConnection, PublishAck, PublishError};

/// Handles events of one type.
///
/// Most handlers are async functions wrapped by [`typed_event_handler`] or
/// [`event_handler_fn`]; implement the trait for a type of your own with a plain `async fn` (no
/// attribute macro needed). `S` is the state of the [`EventHandlers`] table the handler is
/// registered in (`()` without state).
///
/// # Examples
///
/// ```
/// use ce_messaging::events::{EventHandler, EventHandlers, EventResponseWriter};
/// use ce_messaging::handler::HandlerError;
/// use ce_messaging::ReceivedEvent;
///
/// struct Audit;
///
/// impl EventHandler for Audit {
///     async fn handle(&self, event: ReceivedEvent, _responses: EventResponseWriter, _state: &()) -> Result<(), HandlerError> {
///         println!("audit: {event}");
///         Ok(())
///     }
/// }
/// let handlers = EventHandlers::new().on("org.example.order.created", Audit);
/// assert_eq!(handlers.len(), 1);
/// ```
pub trait EventHandler<S = ()>: Send + Sync + 'static {
    /// Handles `event`; `state` is the table's state. `Ok` acks it; an `Err` naks it for
    /// redelivery (or dead-letters it when [permanent](HandlerError::permanent) or out of
    /// deliveries); a panic counts as a retryable error.
    fn handle(
        &self,
        event: ReceivedEvent,
        responses: EventResponseWriter,
        state: &S,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// The object-safe twin of [`EventHandler`] the table stores (the future boxed).
pub(crate) trait ErasedEventHandler<S>: Send + Sync + 'static {
    fn call<'a>(
        &'a self,
        event: ReceivedEvent,
        responses: EventResponseWriter,
        state: &'a S,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

impl<S, H: EventHandler<S>> ErasedEventHandler<S> for H {
    fn call<'a>(
        &'a self,
        event: ReceivedEvent,
        responses: EventResponseWriter,
        state: &'a S,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.handle(event, responses, state))
    }
}

impl dyn ErasedEventHandler<()> {
    /// Calls a handler of a table whose state is bound (what a listener serves).
    pub(crate) fn handle(
        &self,
        event: ReceivedEvent,
        responses: EventResponseWriter,
    ) -> BoxFuture<'_, Result<(), HandlerError>> {
        self.call(event, responses, &())
    }
}

/// A handler of a table with state `S`, bound to that state by [`EventHandlers::with_state`].
struct WithState<S> {
    inner: Arc<dyn ErasedEventHandler<S>>,
    state: Arc<S>,
}

impl<S: Send + Sync + 'static, S2> EventHandler<S2> for WithState<S> {
    fn handle(
        &self,
        event: ReceivedEvent,
        responses: EventResponseWriter,
        _state: &S2,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self.inner.call(event, responses, &self.state)
    }
}

/// An [`EventHandler`] made of an async function taking the event and an
/// [`EventResponseWriter`]; see [`event_handler_fn`].
#[derive(Clone, Copy)]
pub struct EventHandlerFn<F> {
    f: F,
}

impl<F> fmt::Debug for EventHandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventHandlerFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

impl<S, F, Fut> EventHandler<S> for EventHandlerFn<F>
where
    F: Fn(ReceivedEvent, EventResponseWriter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(
        &self,
        event: ReceivedEvent,
        responses: EventResponseWriter,
        _state: &S,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.f)(event, responses)
    }
}

/// Makes an [`EventHandler`] of an async closure taking the event and an
/// [`EventResponseWriter`]. For typed data or shared state, use [`typed_event_handler`].
///
/// # Examples
///
/// ```
/// use ce_messaging::events::event_handler_fn;
/// let handler = event_handler_fn(|event, _responses| async move {
///     println!("{event}");
///     Ok(())
/// });
/// println!("{handler:?}");
/// ```
pub fn event_handler_fn<F, Fut>(f: F) -> EventHandlerFn<F>
where
    F: Fn(ReceivedEvent, EventResponseWriter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    EventHandlerFn { f }
}

/// An event whose data was deserialized for a [`typed_event_handler`].
#[derive(Debug)]
#[non_exhaustive]
pub struct TypedEvent<T> {
    /// The event data.
    pub data: T,
    /// The whole event.
    pub event: ReceivedEvent,
    /// Publishes response events.
    pub responses: EventResponseWriter,
}

/// An [`EventHandler`] made of an async function taking typed event data (and, when it asks,
/// the [`State`]); see [`typed_event_handler`]. `M` records which arguments the function
/// takes.
pub struct TypedEventHandler<F, M> {
    f: F,
    _arguments: PhantomData<fn() -> M>,
}

impl<F: Clone, M> Clone for TypedEventHandler<F, M> {
    fn clone(&self) -> Self {
        TypedEventHandler {
            f: self.f.clone(),
            _arguments: PhantomData,
        }
    }
}

impl<F, M> fmt::Debug for TypedEventHandler<F, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedEventHandler")
            .field("f", &std::any::type_name::<F>())
            .field("arguments", &std::any::type_name::<M>())
            .finish()
    }
}

/// Deserializes the event data; data that does not fit the type will not fit on redelivery
/// either, so it is a permanent failure.
fn typed_event<T: DeserializeOwned>(
    event: ReceivedEvent,
    responses: EventResponseWriter,
) -> Result<TypedEvent<T>, HandlerError> {
    let data = decode_data(&event).map_err(HandlerError::permanent)?;
    Ok(TypedEvent {
        data,
        event,
        responses,
    })
}

impl<S, F, Fut, T> EventHandler<S> for TypedEventHandler<F, (TypedEvent<T>,)>
where
    F: Fn(TypedEvent<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
    T: DeserializeOwned + Send + 'static,
    S: Sync,
{
    async fn handle(
        &self,
        event: ReceivedEvent,
        responses: EventResponseWriter,
        _state: &S,
    ) -> Result<(), HandlerError> {
        (self.f)(typed_event(event, responses)?).await
    }
}

impl<S, F, Fut, T> EventHandler<S> for TypedEventHandler<F, (State<S>, TypedEvent<T>)>
where
    F: Fn(State<S>, TypedEvent<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
    T: DeserializeOwned + Send + 'static,
    S: Clone + Send + Sync + 'static,
{
    async fn handle(
        &self,
        event: ReceivedEvent,
        responses: EventResponseWriter,
        state: &S,
    ) -> Result<(), HandlerError> {
        (self.f)(State(state.clone()), typed_event(event, responses)?).await
    }
}

/// Makes an [`EventHandler`] of an async function taking the deserialized data
/// (`TypedEvent<T>`), and the table's state first when it asks (`State<S>, TypedEvent<T>`).
/// Data that does not deserialize is a permanent failure (dead letter, reason `rejected`).
///
/// # Examples
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use ce_messaging::events::{typed_event_handler, EventHandlers, TypedEvent};
/// use ce_messaging::handler::{HandlerError, State};
///
/// type Seen = Arc<Mutex<Vec<u64>>>;
///
/// async fn record(State(seen): State<Seen>, event: TypedEvent<u64>) -> Result<(), HandlerError> {
///     seen.lock().map_err(|_| HandlerError::new("poisoned"))?.push(event.data);
///     Ok(())
/// }
/// let handlers: EventHandlers = EventHandlers::default()
///     .on("org.example.seen", typed_event_handler(record))
///     .on("org.example.logged", typed_event_handler(|event: TypedEvent<u64>| async move {
///         println!("got {}", event.data);
///         Ok(())
///     }))
///     .with_state(Seen::default());
/// assert_eq!(handlers.len(), 2);
/// ```
pub fn typed_event_handler<F, M>(f: F) -> TypedEventHandler<F, M> {
    TypedEventHandler {
        f,
        _arguments: PhantomData,
    }
}

/// The handlers of an event listener, by event type, and the state they share.
///
/// `S` is the state the handlers still need: [`new`](Self::new) makes a table without state;
/// a table made with [`default`](Default::default) takes handlers that ask for a
/// [`State<S>`](crate::handler::State) and gets the state with [`with_state`](Self::with_state),
/// which makes it an `EventHandlers` a listener can serve.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::{event_handler_fn, EventHandlers};
/// let handlers = EventHandlers::new().on("org.example.a", event_handler_fn(|_, _| async { Ok(()) }));
/// assert!(handlers.types().any(|t| t == "org.example.a"));
/// ```
pub struct EventHandlers<S = ()> {
    registry: Registry<dyn ErasedEventHandler<S>, EventTypeMetrics>,
}

/// A handler and the metric handles of its type, registered at its first delivery and shared
/// by the clones of the table.
pub(crate) type HandlerEntry = Entry<dyn ErasedEventHandler<()>, EventTypeMetrics>;

impl<S> Clone for EventHandlers<S> {
    fn clone(&self) -> Self {
        EventHandlers {
            registry: self.registry.clone(),
        }
    }
}

impl<S> Default for EventHandlers<S> {
    fn default() -> Self {
        EventHandlers {
            registry: Registry::default(),
        }
    }
}

impl<S> fmt::Debug for EventHandlers<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.registry, f)
    }
}

impl EventHandlers {
    /// No handlers yet, and no state.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::events::EventHandlers::new().is_empty());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn get(&self, event_type: &str) -> Option<&HandlerEntry> {
        self.registry.get(event_type)
    }
}

impl<S: Send + Sync + 'static> EventHandlers<S> {
    /// Adds (or replaces) the handler of `event_type`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::events::{event_handler_fn, EventHandlers};
    /// let h = EventHandlers::new().on("a.b", event_handler_fn(|_, _| async { Ok(()) }));
    /// assert_eq!(h.len(), 1);
    /// ```
    #[must_use]
    pub fn on(mut self, event_type: impl Into<EventType>, handler: impl EventHandler<S>) -> Self {
        let handler: Arc<dyn ErasedEventHandler<S>> = Arc::new(handler);
        self.registry
            .insert(event_type.into().into_string(), handler);
        self
    }

    /// Gives the handlers their state: every handler taking a `State<S>` gets a clone of
    /// `state` at each call. The result serves a listener (`EventHandlers<()>`), or takes
    /// handlers of another state `S2`.
    pub fn with_state<S2>(self, state: S) -> EventHandlers<S2> {
        let state = Arc::new(state);
        EventHandlers {
            registry: self.registry.map_handlers(|inner| {
                let bound: Arc<dyn ErasedEventHandler<S2>> = Arc::new(WithState {
                    inner,
                    state: Arc::clone(&state),
                });
                bound
            }),
        }
    }
}

impl<S> EventHandlers<S> {
    /// The event types handled.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::events::EventHandlers::new().types().count(), 0);
    /// ```
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.registry.keys()
    }

    /// Number of types handled.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::events::EventHandlers::new().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.registry.len()
    }

    /// Whether there are no handlers.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::events::EventHandlers::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.registry.len() == 0
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
    /// The listener's source, shared by every delivery (no copy per event).
    source: Arc<str>,
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
        source: Arc<str>,
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
        let event = new_event_with_tid(event_type, &*self.source, data, tid).map_err(|e| {
            PublishError::from_error(e.map_kind(|_| PublishErrorKind::Encode), None)
        })?;
        self.respond(event).await
    }

    /// Says, for readers of the handler, that this event gets no response. Does nothing.
    pub fn no_response(&self) {}
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::*;
    use crate::config::Config;
    use crate::event::new_event;
    use crate::events::EventListenOptions;
    use crate::memory::MemoryBroker;

    const WAIT: Duration = Duration::from_secs(10);

    /// The state of the table: what was seen, and a channel saying something was.
    #[derive(Clone)]
    struct Seen {
        log: Arc<Mutex<Vec<String>>>,
        tx: mpsc::Sender<()>,
    }

    impl Seen {
        async fn record(&self, entry: String) -> Result<(), HandlerError> {
            self.log
                .lock()
                .map_err(|_| HandlerError::new("poisoned"))?
                .push(entry);
            self.tx
                .send(())
                .await
                .map_err(|_| HandlerError::new("test receiver gone"))
        }
    }

    #[tokio::test]
    async fn every_handler_of_a_table_gets_the_same_state() {
        let broker = MemoryBroker::new();
        let events = broker.event_connection(&Config {
            client_id: format!("test-{}", xid::new()),
            durable_name: Some("state-test".into()),
            ..Config::default()
        });
        events.init_stream().await.unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let seen = Seen {
            log: Arc::default(),
            tx,
        };
        async fn typed(
            State(seen): State<Seen>,
            event: TypedEvent<u64>,
        ) -> Result<(), HandlerError> {
            seen.record(format!("typed {}", event.data)).await
        }
        struct Raw;
        impl EventHandler<Seen> for Raw {
            async fn handle(
                &self,
                event: ReceivedEvent,
                _responses: EventResponseWriter,
                state: &Seen,
            ) -> Result<(), HandlerError> {
                let text: String = event.data_as()?;
                state.record(format!("raw {text}")).await
            }
        }
        let handlers: EventHandlers = EventHandlers::default()
            .on("test.state.typed", typed_event_handler(typed))
            .on("test.state.raw", Raw)
            .with_state(seen.clone());
        let listener = events
            .listen(handlers, EventListenOptions::default())
            .await
            .unwrap();
        events
            .publish(new_event("test.state.typed", "test", &7u64).unwrap())
            .await
            .unwrap();
        events
            .publish(new_event("test.state.raw", "test", &"x").unwrap())
            .await
            .unwrap();
        for _ in 0..2 {
            tokio::time::timeout(WAIT, rx.recv())
                .await
                .expect("handled within the wait")
                .expect("open");
        }
        let mut log = seen.log.lock().unwrap().clone();
        log.sort();
        assert_eq!(log, ["raw x", "typed 7"]);
        let report = listener.stop(WAIT).await;
        assert_eq!(report.handled_total, 2);
        assert_eq!(report.abandoned, 0);
    }

    #[tokio::test]
    async fn data_that_does_not_fit_is_dead_lettered_without_rust_type_names() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct OrderCreated {
            id: u64,
        }
        let broker = MemoryBroker::new();
        let events = broker.event_connection(&Config {
            client_id: format!("test-{}", xid::new()),
            durable_name: Some("dlq-test".into()),
            ..Config::default()
        });
        events.init_stream().await.unwrap();
        let listener = events
            .listen(
                EventHandlers::new().on(
                    "test.order.created",
                    typed_event_handler(|_: TypedEvent<OrderCreated>| async { Ok(()) }),
                ),
                EventListenOptions::default(),
            )
            .await
            .unwrap();
        events
            .publish(new_event("test.order.created", "test", &"not an order").unwrap())
            .await
            .unwrap();
        crate::memory::tests_support::eventually(|| {
            broker.stream_len("DEADLETTER").unwrap_or(0) >= 1
        })
        .await;
        let dead = broker.stream_messages("DEADLETTER").unwrap();
        let error = dead[0]
            .headers
            .get(crate::headers::DEAD_LETTER_ERROR)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        assert!(error.contains("expected an object"), "{error}");
        assert!(
            !error.contains("OrderCreated") && !error.contains("::"),
            "{error}"
        );
        let report = listener.stop(WAIT).await;
        assert_eq!(report.abandoned, 0);
    }
}
