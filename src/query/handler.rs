//! Query handlers: the [`QueryHandler`] trait, the closure adapters ([`handler_fn`],
//! [`typed_handler`]) and the [`QueryHandlers`] registry a listener serves, by op.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use cloudevents::{AttributesReader, Event};
use serde::{de::DeserializeOwned, Serialize};

use crate::event::{EventExt, QueryOp};
use crate::handler::HandlerError;
use crate::telemetry::{LazyMetrics, QueryOpMetrics};

use super::ReplyWriter;

/// Handles one query op.
///
/// Most handlers are closures wrapped by [`handler_fn`] or [`typed_handler`]; implement the
/// trait for a struct that holds state.
///
/// # Examples
///
/// ```
/// use ce_messaging::query::{QueryHandler, ReplyWriter};
/// use ce_messaging::handler::HandlerError;
/// use ce_messaging::Event;
///
/// struct Echo;
///
/// #[async_trait::async_trait]
/// impl QueryHandler for Echo {
///     async fn handle(&self, request: Event, reply: ReplyWriter) -> Result<(), HandlerError> {
///         let mut answer = request.clone();
///         cloudevents::AttributesWriter::set_id(&mut answer, ce_messaging::event::new_event_id());
///         reply.reply(answer).await?;
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait QueryHandler: Send + Sync + 'static {
    /// Handles `request` and answers through `reply`. An `Err` becomes an error reply with the
    /// error's code (default 500); returning `Ok` without replying is answered with a 500.
    async fn handle(&self, request: Event, reply: ReplyWriter) -> Result<(), HandlerError>;
}

struct FnHandler<F>(F);

#[async_trait]
impl<F, Fut> QueryHandler for FnHandler<F>
where
    F: Fn(Event, ReplyWriter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, request: Event, reply: ReplyWriter) -> Result<(), HandlerError> {
        (self.0)(request, reply).await
    }
}

/// Makes a [`QueryHandler`] of an async closure taking the request and a [`ReplyWriter`].
///
/// # Examples
///
/// ```
/// use ce_messaging::query::handler_fn;
/// let handler = handler_fn(|request, reply| async move {
///     reply.reply_data("org.example.pong", &"pong").await?;
///     Ok(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<F, Fut>(f: F) -> impl QueryHandler
where
    F: Fn(Event, ReplyWriter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    FnHandler(f)
}

/// A request whose data was deserialized for a [`typed_handler`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TypedRequest<T> {
    /// The request data.
    pub data: T,
    /// The whole request event (attributes, extensions).
    pub event: Event,
}

struct TypedHandler<F, T, R>(F, std::marker::PhantomData<fn(T) -> R>);

#[async_trait]
impl<F, Fut, T, R> QueryHandler for TypedHandler<F, T, R>
where
    F: Fn(TypedRequest<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    T: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
{
    async fn handle(&self, request: Event, reply: ReplyWriter) -> Result<(), HandlerError> {
        let data: T = request
            .data_as()
            .map_err(|e| HandlerError::permanent(e.to_string()).with_code(400))?;
        let reply_type = format!("{}.reply", request.ty());
        let answer = (self.0)(TypedRequest {
            data,
            event: request,
        })
        .await?;
        // Serialize before awaiting so that `R` need not be `Sync`.
        let event = reply.new_reply_event(&reply_type, &answer)?;
        reply.reply(event).await?;
        Ok(())
    }
}

/// Makes a [`QueryHandler`] of an async closure that takes the deserialized request data and
/// returns the reply data. The reply is an event of type `<op>.reply`; request data that does
/// not deserialize is answered with a 400.
///
/// # Examples
///
/// ```
/// use ce_messaging::query::{typed_handler, TypedRequest};
/// use ce_messaging::handler::HandlerError;
///
/// let double = typed_handler(|req: TypedRequest<u64>| async move {
///     Ok::<_, HandlerError>(req.data * 2)
/// });
/// # let _ = double;
/// ```
pub fn typed_handler<F, Fut, T, R>(f: F) -> impl QueryHandler
where
    F: Fn(TypedRequest<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    T: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
{
    TypedHandler(f, std::marker::PhantomData)
}

/// The handlers of a query listener, by op.
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
#[derive(Clone, Default)]
pub struct QueryHandlers {
    map: HashMap<String, HandlerEntry>,
}

/// A handler and the metric handles of its op, registered at its first request and shared by
/// the clones of the table.
#[derive(Clone)]
pub(crate) struct HandlerEntry {
    pub(crate) handler: Arc<dyn QueryHandler>,
    pub(crate) metrics: LazyMetrics<QueryOpMetrics>,
}

impl std::fmt::Debug for QueryHandlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.map.keys()).finish()
    }
}

impl QueryHandlers {
    /// No handlers yet.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::query::QueryHandlers::new().is_empty());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

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
    pub fn on(mut self, op: impl Into<QueryOp>, handler: impl QueryHandler) -> Self {
        self.map.insert(
            op.into().into_string(),
            HandlerEntry {
                handler: Arc::new(handler),
                metrics: LazyMetrics::default(),
            },
        );
        self
    }

    /// The ops handled.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::query::QueryHandlers::new().ops().count(), 0);
    /// ```
    pub fn ops(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// Number of ops handled.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::query::QueryHandlers::new().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no handlers.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::query::QueryHandlers::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(crate) fn get(&self, op: &str) -> Option<&HandlerEntry> {
        self.map.get(op)
    }
}
