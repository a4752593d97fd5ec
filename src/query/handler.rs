//! Query handlers: the [`QueryHandler`] trait, the adapters that make handlers of async
//! functions ([`typed_handler`], [`handler_fn`]) and the [`QueryHandlers`] table a listener
//! serves, by op, with its shared [`State`](crate::handler::State).
//!
//! Why the trait returns `impl Future` instead of using async-trait: see [`crate::handler`].

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::codec::ReceivedEvent;
use cloudevents::Event;
use serde::{de::DeserializeOwned, Serialize};

use crate::event::QueryOp;
use crate::handler::{decode_data, BoxFuture, Entry, HandlerError, Registry, State};
use crate::telemetry::QueryOpMetrics;

use super::ReplyWriter;

/// Handles one query op.
///
/// Most handlers are async functions wrapped by [`typed_handler`] or [`handler_fn`]; implement
/// the trait for a type of your own with a plain `async fn` (no attribute macro needed). `S` is
/// the state of the [`QueryHandlers`] table the handler is registered in (`()` without state).
///
/// # Examples
///
/// ```
/// use ce_messaging::query::{QueryHandler, QueryHandlers, ReplyWriter};
/// use ce_messaging::handler::HandlerError;
/// use ce_messaging::ReceivedEvent;
///
/// struct Echo;
///
/// impl QueryHandler for Echo {
///     async fn handle(&self, request: ReceivedEvent, reply: ReplyWriter, _state: &()) -> Result<(), HandlerError> {
///         let data: serde_json::Value = ce_messaging::cloudevent::EventExt::data_as(&request)?;
///         reply.reply_data("org.example.echoed", &data).await?;
///         Ok(())
///     }
/// }
/// let handlers = QueryHandlers::new().on("org.example.echo", Echo);
/// assert_eq!(handlers.len(), 1);
/// ```
pub trait QueryHandler<S = ()>: Send + Sync + 'static {
    /// Handles `request` and answers through `reply`; `state` is the table's state. An `Err`
    /// becomes an error reply with the error's code (default 500); returning `Ok` without
    /// replying is answered with a 500.
    fn handle(
        &self,
        request: ReceivedEvent,
        reply: ReplyWriter,
        state: &S,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// The object-safe twin of [`QueryHandler`] the table stores (the future boxed).
pub(crate) trait ErasedQueryHandler<S>: Send + Sync + 'static {
    fn call<'a>(
        &'a self,
        request: ReceivedEvent,
        reply: ReplyWriter,
        state: &'a S,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

impl<S, H: QueryHandler<S>> ErasedQueryHandler<S> for H {
    fn call<'a>(
        &'a self,
        request: ReceivedEvent,
        reply: ReplyWriter,
        state: &'a S,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.handle(request, reply, state))
    }
}

impl dyn ErasedQueryHandler<()> {
    /// Calls a handler of a table whose state is bound (what a listener serves).
    pub(crate) fn handle(
        &self,
        request: ReceivedEvent,
        reply: ReplyWriter,
    ) -> BoxFuture<'_, Result<(), HandlerError>> {
        self.call(request, reply, &())
    }
}

/// A handler of a table with state `S`, bound to that state by [`QueryHandlers::with_state`].
struct WithState<S> {
    inner: Arc<dyn ErasedQueryHandler<S>>,
    state: Arc<S>,
}

impl<S: Send + Sync + 'static, S2> QueryHandler<S2> for WithState<S> {
    fn handle(
        &self,
        request: ReceivedEvent,
        reply: ReplyWriter,
        _state: &S2,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self.inner.call(request, reply, &self.state)
    }
}

/// A [`QueryHandler`] made of an async function taking the request and a [`ReplyWriter`]; see
/// [`handler_fn`].
#[derive(Clone, Copy)]
pub struct HandlerFn<F> {
    f: F,
}

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

impl<S, F, Fut> QueryHandler<S> for HandlerFn<F>
where
    F: Fn(ReceivedEvent, ReplyWriter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
    S: Sync,
{
    fn handle(
        &self,
        request: ReceivedEvent,
        reply: ReplyWriter,
        _state: &S,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.f)(request, reply)
    }
}

/// Makes a [`QueryHandler`] of an async closure taking the request and a [`ReplyWriter`]
/// (the handler answers itself: one reply, a reply stream, an error). For typed data or shared
/// state, use [`typed_handler`].
///
/// # Examples
///
/// ```
/// use ce_messaging::query::handler_fn;
/// let handler = handler_fn(|request, reply| async move {
///     reply.reply_data("org.example.pong", &"pong").await?;
///     Ok(())
/// });
/// println!("{handler:?}");
/// ```
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(ReceivedEvent, ReplyWriter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    HandlerFn { f }
}

/// A request whose data was deserialized for a [`typed_handler`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TypedRequest<T> {
    /// The request data.
    pub data: T,
    /// The whole request event (attributes, extensions).
    pub event: ReceivedEvent,
}

/// The reply of a [`typed_handler`] with an event type the handler chose (without it, the reply
/// is of type `<op>.reply`).
///
/// # Examples
///
/// ```
/// use ce_messaging::query::{typed_handler, QueryHandlers, Reply, TypedRequest};
/// use ce_messaging::handler::HandlerError;
///
/// let handlers = QueryHandlers::new().on("org.example.ping", typed_handler(|_: TypedRequest<()>| async move {
///     Ok::<_, HandlerError>(Reply::new("org.example.pong", "pong"))
/// }));
/// assert_eq!(handlers.len(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<T> {
    event_type: Option<String>,
    data: T,
}

impl<T> Reply<T> {
    /// A reply event of `event_type` with `data`.
    ///
    /// # Examples
    ///
    /// ```
    /// let reply = ce_messaging::query::Reply::new("org.example.pong", 7);
    /// assert_eq!(reply.event_type(), Some("org.example.pong"));
    /// ```
    pub fn new(event_type: impl Into<String>, data: T) -> Self {
        Reply {
            event_type: Some(event_type.into()),
            data,
        }
    }

    /// The event type chosen, or `None` for the default `<op>.reply`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::query::IntoReply;
    /// assert_eq!(7.into_reply().event_type(), None);
    /// ```
    pub fn event_type(&self) -> Option<&str> {
        self.event_type.as_deref()
    }

    /// The reply data.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(*ce_messaging::query::Reply::new("t", 7).data(), 7);
    /// ```
    pub fn data(&self) -> &T {
        &self.data
    }
}

/// What a [`typed_handler`] may return: any `Serialize` value (sent as an event of type
/// `<op>.reply`) or a [`Reply`] with the event type the handler chose.
pub trait IntoReply {
    /// The data serialized into the reply event.
    type Data: Serialize;

    /// The reply, with `None` as event type for `<op>.reply`.
    fn into_reply(self) -> Reply<Self::Data>;
}

impl<T: Serialize> IntoReply for T {
    type Data = T;

    fn into_reply(self) -> Reply<T> {
        Reply {
            event_type: None,
            data: self,
        }
    }
}

impl<T: Serialize> IntoReply for Reply<T> {
    type Data = T;

    fn into_reply(self) -> Reply<T> {
        self
    }
}

/// A [`QueryHandler`] made of an async function taking typed request data (and, when it asks,
/// the [`State`] or a [`ReplyWriter`]); see [`typed_handler`]. `M` records which arguments the
/// function takes.
pub struct TypedHandler<F, M> {
    f: F,
    _arguments: PhantomData<fn() -> M>,
}

impl<F: Clone, M> Clone for TypedHandler<F, M> {
    fn clone(&self) -> Self {
        TypedHandler {
            f: self.f.clone(),
            _arguments: PhantomData,
        }
    }
}

impl<F, M> fmt::Debug for TypedHandler<F, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedHandler")
            .field("f", &std::any::type_name::<F>())
            .field("arguments", &std::any::type_name::<M>())
            .finish()
    }
}

/// Makes a [`QueryHandler`] of an async function whose arguments say what it needs, as in axum:
///
/// | arguments | the handler |
/// |---|---|
/// | `TypedRequest<T>` | returns the reply data |
/// | `State<S>, TypedRequest<T>` | returns the reply data, uses the table's state |
/// | `TypedRequest<T>, ReplyWriter` | answers itself (reply streams, several replies) |
/// | `State<S>, TypedRequest<T>, ReplyWriter` | both |
///
/// Returned data is sent as an event of type `<op>.reply`, or of the type chosen with
/// [`Reply::new`]. Request data that does not deserialize into `T` is answered with a 400 whose
/// text says what is wrong with the data (it names no Rust type).
///
/// # Examples
///
/// ```
/// use ce_messaging::handler::{HandlerError, State};
/// use ce_messaging::query::{typed_handler, QueryHandlers, ReplyWriter, TypedRequest};
///
/// async fn double(req: TypedRequest<u64>) -> Result<u64, HandlerError> {
///     Ok(req.data * 2)
/// }
/// async fn scaled(State(factor): State<u64>, req: TypedRequest<u64>) -> Result<u64, HandlerError> {
///     Ok(req.data * factor)
/// }
/// async fn count_to(req: TypedRequest<u64>, reply: ReplyWriter) -> Result<(), HandlerError> {
///     let stream = reply.stream();
///     for n in 1..=req.data {
///         stream.push_data("org.example.number", &n)?;
///     }
///     stream.finish().await?;
///     Ok(())
/// }
/// let handlers: QueryHandlers = QueryHandlers::default()
///     .on("org.example.double", typed_handler(double))
///     .on("org.example.scaled", typed_handler(scaled))
///     .on("org.example.count", typed_handler(count_to))
///     .with_state(3_u64);
/// assert_eq!(handlers.len(), 3);
/// ```
pub fn typed_handler<F, M>(f: F) -> TypedHandler<F, M> {
    TypedHandler {
        f,
        _arguments: PhantomData,
    }
}

/// Deserializes the request data; data that does not fit is a permanent 400.
fn typed_request<T: DeserializeOwned>(
    request: ReceivedEvent,
) -> Result<TypedRequest<T>, HandlerError> {
    let data =
        decode_data(&request).map_err(|text| HandlerError::permanent(text).with_code(400))?;
    Ok(TypedRequest {
        data,
        event: request,
    })
}

/// The reply event of what a typed handler returned. Serialized before any await, so the
/// data need be neither `Send` nor `Sync`.
fn reply_event<R: IntoReply>(
    op: &str,
    reply: &ReplyWriter,
    answer: R,
) -> Result<Event, HandlerError> {
    let answer = answer.into_reply();
    let event = match answer.event_type {
        Some(event_type) => reply.new_reply_event(&event_type, &answer.data)?,
        None => reply.new_reply_event(&format!("{op}.reply"), &answer.data)?,
    };
    Ok(event)
}

impl<S, F, Fut, T, R> QueryHandler<S> for TypedHandler<F, (TypedRequest<T>,)>
where
    F: Fn(TypedRequest<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, HandlerError>> + Send,
    T: DeserializeOwned + Send + 'static,
    R: IntoReply,
    S: Sync,
{
    async fn handle(
        &self,
        request: ReceivedEvent,
        reply: ReplyWriter,
        _state: &S,
    ) -> Result<(), HandlerError> {
        let op = request.ty().to_owned();
        let answer = (self.f)(typed_request(request)?).await?;
        let event = reply_event(&op, &reply, answer)?;
        reply.reply(event).await?;
        Ok(())
    }
}

impl<S, F, Fut, T, R> QueryHandler<S> for TypedHandler<F, (State<S>, TypedRequest<T>)>
where
    F: Fn(State<S>, TypedRequest<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, HandlerError>> + Send,
    T: DeserializeOwned + Send + 'static,
    R: IntoReply,
    S: Clone + Send + Sync + 'static,
{
    async fn handle(
        &self,
        request: ReceivedEvent,
        reply: ReplyWriter,
        state: &S,
    ) -> Result<(), HandlerError> {
        let op = request.ty().to_owned();
        let answer = (self.f)(State(state.clone()), typed_request(request)?).await?;
        let event = reply_event(&op, &reply, answer)?;
        reply.reply(event).await?;
        Ok(())
    }
}

impl<S, F, Fut, T> QueryHandler<S> for TypedHandler<F, (TypedRequest<T>, ReplyWriter)>
where
    F: Fn(TypedRequest<T>, ReplyWriter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
    T: DeserializeOwned + Send + 'static,
    S: Sync,
{
    async fn handle(
        &self,
        request: ReceivedEvent,
        reply: ReplyWriter,
        _state: &S,
    ) -> Result<(), HandlerError> {
        (self.f)(typed_request(request)?, reply).await
    }
}

impl<S, F, Fut, T> QueryHandler<S> for TypedHandler<F, (State<S>, TypedRequest<T>, ReplyWriter)>
where
    F: Fn(State<S>, TypedRequest<T>, ReplyWriter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
    T: DeserializeOwned + Send + 'static,
    S: Clone + Send + Sync + 'static,
{
    async fn handle(
        &self,
        request: ReceivedEvent,
        reply: ReplyWriter,
        state: &S,
    ) -> Result<(), HandlerError> {
        (self.f)(State(state.clone()), typed_request(request)?, reply).await
    }
}

/// The handlers of a query listener, by op, and the state they share.
///
/// `S` is the state the handlers still need: [`new`](Self::new) makes a table without state;
/// a table made with [`default`](Default::default) takes handlers that ask for a
/// [`State<S>`](crate::handler::State) and gets the state with [`with_state`](Self::with_state)
/// (axum's `Router::with_state`), which makes it a `QueryHandlers` a listener can serve.
///
/// # Examples
///
/// ```
/// use ce_messaging::query::{handler_fn, QueryHandlers};
/// let handlers = QueryHandlers::new().on("org.example.ping", handler_fn(|_, reply| async move {
///     reply.reply_data("org.example.pong", &()).await?;
///     Ok(())
/// }));
/// assert!(handlers.ops().any(|op| op == "org.example.ping"));
/// ```
pub struct QueryHandlers<S = ()> {
    registry: Registry<dyn ErasedQueryHandler<S>, QueryOpMetrics>,
}

/// A handler and the metric handles of its op, registered at its first request and shared by
/// the clones of the table.
pub(crate) type HandlerEntry = Entry<dyn ErasedQueryHandler<()>, QueryOpMetrics>;

impl<S> Clone for QueryHandlers<S> {
    fn clone(&self) -> Self {
        QueryHandlers {
            registry: self.registry.clone(),
        }
    }
}

impl<S> Default for QueryHandlers<S> {
    fn default() -> Self {
        QueryHandlers {
            registry: Registry::default(),
        }
    }
}

impl<S> fmt::Debug for QueryHandlers<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.registry, f)
    }
}

impl QueryHandlers {
    /// No handlers yet, and no state.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::query::QueryHandlers::new().is_empty());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn get(&self, op: &str) -> Option<&HandlerEntry> {
        self.registry.get(op)
    }
}

impl<S: Send + Sync + 'static> QueryHandlers<S> {
    /// Adds (or replaces) the handler of `op`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::query::{handler_fn, QueryHandlers};
    /// let h = QueryHandlers::new().on("a.b", handler_fn(|_, _| async { Ok(()) }));
    /// assert_eq!(h.len(), 1);
    /// ```
    #[must_use]
    pub fn on(mut self, op: impl Into<QueryOp>, handler: impl QueryHandler<S>) -> Self {
        let handler: Arc<dyn ErasedQueryHandler<S>> = Arc::new(handler);
        self.registry.insert(op.into().into_string(), handler);
        self
    }

    /// Gives the handlers their state: every handler taking a `State<S>` gets a clone of
    /// `state` at each call. The result serves a listener (`QueryHandlers<()>`), or takes
    /// handlers of another state `S2`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::handler::{HandlerError, State};
    /// use ce_messaging::query::{typed_handler, QueryHandlers, TypedRequest};
    ///
    /// let handlers: QueryHandlers = QueryHandlers::default()
    ///     .on("org.example.greet", typed_handler(
    ///         |State(greeting): State<&'static str>, req: TypedRequest<String>| async move {
    ///             Ok::<_, HandlerError>(format!("{greeting}, {}", req.data))
    ///         },
    ///     ))
    ///     .with_state("Hello");
    /// assert_eq!(handlers.len(), 1);
    /// ```
    pub fn with_state<S2>(self, state: S) -> QueryHandlers<S2> {
        let state = Arc::new(state);
        QueryHandlers {
            registry: self.registry.map_handlers(|inner| {
                let bound: Arc<dyn ErasedQueryHandler<S2>> = Arc::new(WithState {
                    inner,
                    state: Arc::clone(&state),
                });
                bound
            }),
        }
    }
}

impl<S> QueryHandlers<S> {
    /// The ops handled.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::query::QueryHandlers::new().ops().count(), 0);
    /// ```
    pub fn ops(&self) -> impl Iterator<Item = &str> {
        self.registry.keys()
    }

    /// Number of ops handled.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::query::QueryHandlers::new().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.registry.len()
    }

    /// Whether there are no handlers.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::query::QueryHandlers::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.registry.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::config::Config;
    use crate::error::{RemoteError, RequestErrorKind};
    use crate::event::{new_event, EventExt};
    use crate::memory::{MemoryBroker, MemoryQueries};
    use crate::query::{QueryConnection, QueryListenOptions};

    const WAIT: Duration = Duration::from_secs(10);

    fn connection(broker: &MemoryBroker) -> MemoryQueries {
        broker.query_connection(&Config {
            client_id: format!("test-{}", xid::new()),
            ..Config::default()
        })
    }

    async fn ask(client: &MemoryQueries, op: &str, data: &impl Serialize) -> ReceivedEvent {
        let request = new_event(op, "test", data).unwrap();
        client.request_with_timeout(request, WAIT).await.unwrap()
    }

    #[derive(Clone, Default)]
    struct Counter(Arc<AtomicU64>);

    #[tokio::test]
    async fn every_handler_of_a_table_gets_the_same_state() {
        let broker = MemoryBroker::new();
        let (server, client) = (connection(&broker), connection(&broker));
        let counter = Counter::default();
        let handlers: QueryHandlers = QueryHandlers::default()
            .on(
                "test.count.add",
                typed_handler(
                    |State(c): State<Counter>, req: TypedRequest<u64>| async move {
                        Ok::<_, HandlerError>(c.0.fetch_add(req.data, Ordering::SeqCst) + req.data)
                    },
                ),
            )
            .on(
                "test.count.read",
                typed_handler(
                    |State(c): State<Counter>, _: TypedRequest<()>, reply: ReplyWriter| async move {
                        let now = c.0.load(Ordering::SeqCst);
                        reply.reply_data("test.count.value", &now).await?;
                        Ok(())
                    },
                ),
            )
            // A handler without state in the same table.
            .on(
                "test.count.ping",
                typed_handler(|_: TypedRequest<()>| async { Ok::<_, HandlerError>("pong") }),
            )
            .with_state(counter.clone());
        let listener = server
            .listen(handlers.clone(), QueryListenOptions::default())
            .await
            .unwrap();

        let first = ask(&client, "test.count.add", &2u64).await;
        let second = ask(&client, "test.count.add", &3u64).await;
        assert_eq!(first.data_as::<u64>().unwrap(), 2);
        assert_eq!(
            second.data_as::<u64>().unwrap(),
            5,
            "the second call saw the first's"
        );
        let read = ask(&client, "test.count.read", &()).await;
        assert_eq!(read.ty(), "test.count.value");
        assert_eq!(
            read.data_as::<u64>().unwrap(),
            5,
            "another handler, same state"
        );
        let pong = ask(&client, "test.count.ping", &()).await;
        assert_eq!(pong.data_as::<String>().unwrap(), "pong");
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            5,
            "the caller's handle is the same state"
        );
        listener.stop(WAIT).await;
    }

    #[tokio::test]
    async fn a_typed_handler_chooses_its_reply_type_or_gets_op_dot_reply() {
        let broker = MemoryBroker::new();
        let (server, client) = (connection(&broker), connection(&broker));
        let handlers = QueryHandlers::new()
            .on(
                "test.ping",
                typed_handler(|req: TypedRequest<String>| async move {
                    Ok::<_, HandlerError>(Reply::new("test.pong", req.data))
                }),
            )
            .on(
                "test.echo",
                typed_handler(|req: TypedRequest<String>| async move {
                    Ok::<_, HandlerError>(req.data)
                }),
            );
        let listener = server
            .listen(handlers, QueryListenOptions::default())
            .await
            .unwrap();
        let pong = ask(&client, "test.ping", &"a").await;
        assert_eq!(pong.ty(), "test.pong");
        assert_eq!(pong.data_as::<String>().unwrap(), "a");
        let echo = ask(&client, "test.echo", &"b").await;
        assert_eq!(echo.ty(), "test.echo.reply");
        assert_eq!(echo.data_as::<String>().unwrap(), "b");
        listener.stop(WAIT).await;
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)] // only deserialized
    struct GetItem {
        name: String,
    }

    #[tokio::test]
    async fn bad_request_data_is_a_400_saying_what_is_wrong_without_rust_type_names() {
        let broker = MemoryBroker::new();
        let (server, client) = (connection(&broker), connection(&broker));
        let handlers = QueryHandlers::new().on(
            "test.item.get",
            typed_handler(|req: TypedRequest<GetItem>| async move {
                Ok::<_, HandlerError>(req.data.name)
            }),
        );
        let listener = server
            .listen(handlers, QueryListenOptions::default())
            .await
            .unwrap();
        for (data, expected) in [
            (
                serde_json::json!(42),
                "invalid type: integer `42`, expected an object",
            ),
            (serde_json::json!({}), "missing field `name`"),
            (
                serde_json::json!({"name": 7}),
                "invalid type: integer `7`, expected a string",
            ),
        ] {
            let request = new_event("test.item.get", "test", &data).unwrap();
            let err = client
                .request_with_timeout(request, WAIT)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), RequestErrorKind::Remote, "{data}");
            let remote = RemoteError::of(&err).expect("a remote error");
            assert_eq!(remote.code(), 400, "{data}");
            let text = remote.text();
            assert!(text.starts_with("invalid data: "), "{text}");
            assert!(text.contains(expected), "{data}: {text}");
            assert!(!text.contains("GetItem"), "{text}");
            assert!(!text.contains("::"), "{text}");
        }
        listener.stop(WAIT).await;
    }

    #[tokio::test]
    async fn a_handler_implemented_with_a_plain_async_fn_is_served() {
        struct Greeter {
            greeting: String,
        }
        impl QueryHandler for Greeter {
            async fn handle(
                &self,
                request: ReceivedEvent,
                reply: ReplyWriter,
                _state: &(),
            ) -> Result<(), HandlerError> {
                let name: String = request.data_as()?;
                reply
                    .reply_data("test.greeting", &format!("{}, {name}", self.greeting))
                    .await?;
                Ok(())
            }
        }
        let broker = MemoryBroker::new();
        let (server, client) = (connection(&broker), connection(&broker));
        let handlers = QueryHandlers::new().on(
            "test.greet",
            Greeter {
                greeting: "Hello".into(),
            },
        );
        let listener = server
            .listen(handlers, QueryListenOptions::default())
            .await
            .unwrap();
        let reply = ask(&client, "test.greet", &"you").await;
        assert_eq!(reply.data_as::<String>().unwrap(), "Hello, you");
        listener.stop(WAIT).await;
    }

    #[test]
    fn adapters_and_tables_can_be_named_cloned_and_debugged() {
        async fn double(req: TypedRequest<u64>) -> Result<u64, HandlerError> {
            Ok(req.data * 2)
        }
        let named: TypedHandler<_, (TypedRequest<u64>,)> = typed_handler(double);
        let copy = named.clone();
        assert!(format!("{copy:?}").contains("double"), "{copy:?}");
        let raw: HandlerFn<_> = handler_fn(|_, _| async { Ok(()) });
        assert!(format!("{raw:?}").starts_with("HandlerFn"), "{raw:?}");
        let table = QueryHandlers::new().on("b.op", copy).on("a.op", raw);
        assert_eq!(format!("{table:?}"), r#"{"a.op", "b.op"}"#);
    }
}
