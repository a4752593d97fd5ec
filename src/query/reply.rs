//! Queries over request/reply: the [`QueryConnection`] trait, query handlers and the
//! [`ReplyWriter`] they answer through, and the [`ReplyStream`] of a request that gets many
//! replies (one replier streaming, or scatter-gather from many).
//!
//! The rules of the wire contract (error replies with `Nats-Service-Error[-Code]`, reply
//! streams with `Reply-Stream-Index/Total`, the transaction id carried to the reply, the reply in
//! the request's content mode) live here once; backends only move bytes.
//!
//! # Examples
//!
//! ```
//! use ce_messaging::query::{handler_fn, typed_handler, QueryHandlers, TypedRequest};
//! use ce_messaging::handler::HandlerError;
//!
//! #[derive(serde::Deserialize)]
//! struct Get { name: String }
//! #[derive(serde::Serialize)]
//! struct Workspace { name: String, size: u64 }
//!
//! let handlers = QueryHandlers::new()
//!     .on("cyverse.workspace.get", typed_handler(|req: TypedRequest<Get>| async move {
//!         Ok::<_, HandlerError>(Workspace { name: req.data.name, size: 42 })
//!     }))
//!     .on("cyverse.workspace.ping", handler_fn(|request, reply| async move {
//!         reply.reply_data("cyverse.workspace.pong", &"pong").await?;
//!         Ok(())
//!     }));
//! assert_eq!(handlers.len(), 2);
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use serde::{de::DeserializeOwned, Serialize};

use async_nats::HeaderName;

use crate::codec::{self, ContentMode, HeaderMap};
use crate::error::{
    BoxError, Error, ListenError, RemoteError, ReplyError, ReplyErrorKind, RequestError,
    RequestErrorKind,
};
use crate::event::{new_event_with_tid, populate_source, EventExt, QueryOp, TransactionId};
use crate::handler::{call_handler, HandlerError};
use crate::headers::{
    text_value, REPLY_STREAM_INDEX, REPLY_STREAM_TOTAL, REQUEST_TIMEOUT_MS, SERVICE_ERROR,
    SERVICE_ERROR_CODE,
};
use crate::listener::Listener;
use crate::telemetry::{self, LazyMetrics, QueryOpMetrics};
use crate::worker::{Outcome, WorkContext};

/// The most replies a buffered [`ReplyStreamWriter`] holds before it refuses more.
pub const MAX_BUFFERED_REPLIES: usize = 100_000;

/// Sends queries and serves them.
///
/// Implemented by [`NatsQueries`](crate::nats::NatsQueries) (core NATS) and by the in-memory
/// backend. Write services against this trait.
///
/// # Examples
///
/// ```no_run
/// use ce_messaging::query::QueryConnection;
/// use ce_messaging::event::new_event;
///
/// async fn get_workspace(queries: &dyn QueryConnection) -> Result<(), Box<dyn std::error::Error>> {
///     let request = new_event("cyverse.workspace.get", "client", &serde_json::json!({"name": "w1"}))?;
///     let reply = queries.request(request).await?;
///     println!("{reply}");
///     Ok(())
/// }
/// ```
#[async_trait]
pub trait QueryConnection: Send + Sync {
    /// The timeout [`request`](Self::request) uses (from `NATS_REQUEST_TIMEOUT`).
    fn default_timeout(&self) -> Duration;

    /// Sends a query and waits for its one reply, up to [`default_timeout`](Self::default_timeout).
    ///
    /// The request's `source` is filled in when empty or `AUTO_POPULATE`, and it gets a
    /// transaction id when it has none; the reply carries that transaction id.
    ///
    /// Errors, by [`RequestErrorKind`]: `TimedOut`, `NoResponders` (at once), `Remote` (see
    /// [`RemoteError::of`]), `Decode`, `Encode`, `ConnectionClosed`.
    async fn request(&self, request: Event) -> Result<Event, RequestError> {
        self.request_with_timeout(request, self.default_timeout())
            .await
    }

    /// Like [`request`](Self::request) with a timeout of its own (clamped to
    /// [`MAX_REQUEST_TIMEOUT`](crate::config::MAX_REQUEST_TIMEOUT)).
    async fn request_with_timeout(
        &self,
        request: Event,
        timeout: Duration,
    ) -> Result<Event, RequestError>;

    /// Sends a query and returns the stream of its replies: the replies of one replier that
    /// streams (ends after `Reply-Stream-Total`), or of many repliers (ends on the first of the
    /// [`ReplyStreamOptions`] strategies).
    async fn request_stream(
        &self,
        request: Event,
        options: ReplyStreamOptions,
    ) -> Result<ReplyStream, RequestError>;

    /// Serves the given query ops until the returned [`Listener`] is stopped.
    async fn listen(
        &self,
        handlers: QueryHandlers,
        options: QueryListenOptions,
    ) -> Result<Listener, ListenError>;
}

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

/// How a query listener runs.
///
/// # Examples
///
/// ```
/// use ce_messaging::query::QueryListenOptions;
/// use std::time::Duration;
/// let options = QueryListenOptions { workers: 4, buffer: 64, ..Default::default() };
/// assert_eq!(options.grace, Duration::from_secs(30));
/// ```
#[derive(Debug, Clone)]
pub struct QueryListenOptions {
    /// At most this many handlers run at once.
    pub workers: usize,
    /// At most this many requests wait for a worker; a request that finds the queue full is
    /// answered at once with a 503 error reply (`listener busy`) instead of waiting (load
    /// shedding; the requester may retry, possibly reaching another instance of the group).
    pub buffer: usize,
    /// How long in-flight handlers get to finish when the listener is stopped by its token.
    pub grace: Duration,
    /// Subscribe to this subject (e.g. `cyverse.>`) and dispatch by type, instead of one
    /// subscription per op. `None`: `NATS_WILDCARD_SUBJECT` from the configuration, if set.
    pub wildcard_subject: Option<String>,
    /// The queue group; `None`: `NATS_QUEUE_GROUP` from the configuration.
    pub queue_group: Option<String>,
}

impl Default for QueryListenOptions {
    fn default() -> Self {
        QueryListenOptions {
            workers: 16,
            buffer: 256,
            grace: Duration::from_secs(30),
            wildcard_subject: None,
            queue_group: None,
        }
    }
}

impl QueryListenOptions {
    pub(crate) fn validate(&self, handlers: &QueryHandlers) -> Result<(), ListenError> {
        use crate::error::ListenErrorKind::InvalidOptions;
        if handlers.is_empty() {
            return Err(Error::with_detail(InvalidOptions, "no query handlers"));
        }
        for op in handlers.ops() {
            crate::event::check_type(op).map_err(|e| e.map_kind(|_| InvalidOptions))?;
        }
        if self.workers == 0 || self.buffer == 0 {
            return Err(Error::with_detail(
                InvalidOptions,
                "workers and buffer must be at least 1",
            ));
        }
        Ok(())
    }
}

/// When a [`ReplyStream`] ends, besides a replier's `Reply-Stream-Total` (the NATS "request
/// many" strategies; the first one reached wins).
///
/// # Examples
///
/// ```
/// use ce_messaging::query::ReplyStreamOptions;
/// use std::time::Duration;
///
/// // scatter-gather: up to 5 answers, at most 2 s, give up after 200 ms of silence
/// let options = ReplyStreamOptions::default()
///     .max_replies(5)
///     .deadline(Duration::from_secs(2))
///     .stall(Duration::from_millis(200));
/// assert_eq!(options.max_replies, Some(5));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ReplyStreamOptions {
    /// End after this many replies.
    pub max_replies: Option<usize>,
    /// End this long after the request was sent; `None`: the connection's request timeout.
    pub deadline: Option<Duration>,
    /// End when no reply arrived for this long (after the first one).
    pub stall: Option<Duration>,
    /// End on an empty-payload message (a replier's "no more" sentinel).
    pub sentinel: bool,
}

impl ReplyStreamOptions {
    /// Sets [`max_replies`](Self::max_replies).
    ///
    /// # Examples
    ///
    /// ```
    /// let o = ce_messaging::query::ReplyStreamOptions::default().max_replies(3);
    /// assert_eq!(o.max_replies, Some(3));
    /// ```
    #[must_use]
    pub fn max_replies(mut self, n: usize) -> Self {
        self.max_replies = Some(n);
        self
    }

    /// Sets [`deadline`](Self::deadline).
    ///
    /// # Examples
    ///
    /// ```
    /// let o = ce_messaging::query::ReplyStreamOptions::default().deadline(std::time::Duration::from_secs(1));
    /// assert!(o.deadline.is_some());
    /// ```
    #[must_use]
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// Sets [`stall`](Self::stall).
    ///
    /// # Examples
    ///
    /// ```
    /// let o = ce_messaging::query::ReplyStreamOptions::default().stall(std::time::Duration::from_millis(100));
    /// assert!(o.stall.is_some());
    /// ```
    #[must_use]
    pub fn stall(mut self, d: Duration) -> Self {
        self.stall = Some(d);
        self
    }

    /// Sets [`sentinel`](Self::sentinel).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::query::ReplyStreamOptions::default().sentinel(true).sentinel);
    /// ```
    #[must_use]
    pub fn sentinel(mut self, on: bool) -> Self {
        self.sentinel = on;
        self
    }
}

/// The replies of a [`QueryConnection::request_stream`], as they arrive.
///
/// A `futures::Stream` of `Result<Event, RequestError>`; an error reply from one replier is
/// yielded as an `Err` item (`Remote`) and the stream goes on. A stream that gets no reply at
/// all before its deadline yields one `TimedOut` error; a replier's stream that stops short of
/// its `Reply-Stream-Total` yields `TimedOut` too.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(queries: &dyn ce_messaging::query::QueryConnection, request: ce_messaging::Event)
/// # -> Result<(), ce_messaging::error::RequestError> {
/// use ce_messaging::query::ReplyStreamOptions;
/// let mut replies = queries.request_stream(request, ReplyStreamOptions::default()).await?;
/// let first = replies.expect_next().await?;
/// while let Some(reply) = replies.next().await {
///     println!("{}", reply?);
/// }
/// # Ok(()) }
/// ```
pub struct ReplyStream {
    inner: BoxStream<'static, Result<Event, RequestError>>,
}

impl std::fmt::Debug for ReplyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyStream").finish_non_exhaustive()
    }
}

impl ReplyStream {
    /// The next reply, or `None` when the stream ended.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a reply not returned stays in the stream.
    pub async fn next(&mut self) -> Option<Result<Event, RequestError>> {
        self.inner.next().await
    }

    /// The next reply; the end of the stream is a `TimedOut` error.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`next`](Self::next).
    pub async fn expect_next(&mut self) -> Result<Event, RequestError> {
        match self.inner.next().await {
            Some(result) => result,
            None => Err(Error::with_detail(
                RequestErrorKind::TimedOut,
                "reply stream ended",
            )),
        }
    }

    /// All remaining replies; the first error ends collection.
    pub async fn collect_all(mut self) -> Result<Vec<Event>, RequestError> {
        let mut out = Vec::new();
        while let Some(item) = self.inner.next().await {
            out.push(item?);
        }
        Ok(out)
    }

    /// Builds a reply stream from raw replies (the backend's part) and the termination rules.
    pub(crate) fn from_raw(
        raw: BoxStream<'static, RawReply>,
        options: &ReplyStreamOptions,
        default_deadline: Duration,
    ) -> Self {
        let deadline = tokio::time::Instant::now() + options.deadline.unwrap_or(default_deadline);
        let state = StreamState {
            raw,
            deadline,
            stall: options.stall,
            last: None,
            max: options.max_replies,
            sentinel: options.sentinel,
            received: 0,
            total: None,
            done: false,
        };
        let inner = futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            let wake = match (st.stall, st.last) {
                (Some(stall), Some(last)) => st.deadline.min(last + stall),
                _ => st.deadline,
            };
            tokio::select! {
                item = st.raw.next() => match item {
                    None => {
                        st.done = true;
                        st.incomplete_error().map(|e| (Err(e), st))
                    }
                    Some(RawReply::NoResponders) => {
                        st.done = true;
                        Some((Err(Error::new(RequestErrorKind::NoResponders)), st))
                    }
                    Some(RawReply::Message { headers, payload }) => {
                        if st.sentinel && payload.is_empty() && !is_error_reply(headers.as_ref()) {
                            st.done = true;
                            return st.incomplete_error().map(|e| (Err(e), st));
                        }
                        st.received += 1;
                        st.last = Some(tokio::time::Instant::now());
                        let result = interpret_reply(headers.as_ref(), &payload).map(|(event, position)| {
                            if let Some((_, total)) = position {
                                st.total = Some(total);
                            }
                            event
                        });
                        if st.total.is_some_and(|t| st.received >= t)
                            || st.max.is_some_and(|m| st.received >= m)
                        {
                            st.done = true;
                        }
                        Some((result, st))
                    }
                },
                _ = tokio::time::sleep_until(wake) => {
                    st.done = true;
                    if st.received == 0 {
                        Some((Err(Error::with_detail(RequestErrorKind::TimedOut, "no reply before the deadline")), st))
                    } else {
                        st.incomplete_error().map(|e| (Err(e), st))
                    }
                }
            }
        });
        ReplyStream {
            inner: inner.boxed(),
        }
    }
}

struct StreamState {
    raw: BoxStream<'static, RawReply>,
    deadline: tokio::time::Instant,
    stall: Option<Duration>,
    last: Option<tokio::time::Instant>,
    max: Option<usize>,
    sentinel: bool,
    received: usize,
    total: Option<usize>,
    done: bool,
}

impl StreamState {
    fn incomplete_error(&self) -> Option<RequestError> {
        match self.total {
            Some(total) if self.received < total => Some(Error::with_detail(
                RequestErrorKind::TimedOut,
                format!(
                    "reply stream incomplete: {} of {total} replies",
                    self.received
                ),
            )),
            _ => None,
        }
    }
}

impl Stream for ReplyStream {
    type Item = Result<Event, RequestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// A raw reply as a backend receives it.
#[derive(Debug)]
pub(crate) enum RawReply {
    /// A message on the reply subject.
    Message {
        headers: Option<HeaderMap>,
        payload: Bytes,
    },
    /// The server said nobody listens (NATS status 503).
    NoResponders,
}

// The reply headers as names built at compile time: a lookup by `&str` builds (allocates) a
// header name per call, four of them per reply read.
const SERVICE_ERROR_NAME: HeaderName = HeaderName::from_static(SERVICE_ERROR);
const SERVICE_ERROR_CODE_NAME: HeaderName = HeaderName::from_static(SERVICE_ERROR_CODE);
const REPLY_STREAM_INDEX_NAME: HeaderName = HeaderName::from_static(REPLY_STREAM_INDEX);
const REPLY_STREAM_TOTAL_NAME: HeaderName = HeaderName::from_static(REPLY_STREAM_TOTAL);

fn header(headers: Option<&HeaderMap>, name: HeaderName) -> Option<&str> {
    headers.and_then(|h| h.get(name)).map(|v| v.as_str())
}

fn is_error_reply(headers: Option<&HeaderMap>) -> bool {
    header(headers, SERVICE_ERROR_CODE_NAME).is_some()
        || header(headers, SERVICE_ERROR_NAME).is_some()
}

/// Reads a reply: an error reply becomes `Remote`, otherwise the event is decoded. Returns the
/// stream position (`index`, `total`) when the reply is part of a reply stream.
pub(crate) fn interpret_reply(
    headers: Option<&HeaderMap>,
    payload: &Bytes,
) -> Result<(Event, Option<(usize, usize)>), RequestError> {
    if is_error_reply(headers) {
        let text = header(headers, SERVICE_ERROR_NAME).unwrap_or("remote error");
        let code = header(headers, SERVICE_ERROR_CODE_NAME)
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(500);
        return Err(RemoteError::new(code, text).into_request_error());
    }
    let event =
        codec::decode(headers, payload).map_err(|e| e.map_kind(|_| RequestErrorKind::Decode))?;
    let position = match (
        header(headers, REPLY_STREAM_INDEX_NAME).and_then(|v| v.trim().parse().ok()),
        header(headers, REPLY_STREAM_TOTAL_NAME).and_then(|v| v.trim().parse().ok()),
    ) {
        (Some(index), Some(total)) => Some((index, total)),
        _ => None,
    };
    Ok((event, position))
}

/// Fills in what a request needs before it is sent: the source and a transaction id; refuses
/// an op that breaks the subject-token rule ([`check_type`](crate::event::check_type)) first.
/// Every backend's request and reply stream goes through here.
pub(crate) fn prepare_request(request: &mut Event, source: &str) -> Result<(), RequestError> {
    crate::event::check_type(request.ty())
        .map_err(|e| e.map_kind(|_| RequestErrorKind::InvalidOptions))?;
    populate_source(request, source);
    if !crate::event::has_transaction_id(request) {
        request.set_transaction_id(&TransactionId::generate());
    }
    // Continues the current handler's trace; a new trace starts in [`traced_request`].
    telemetry::outgoing(request, false);
    Ok(())
}

/// One request inside a `request` span: the request gets its transaction id and trace
/// context here, and the time to its reply (or error) is recorded by op and outcome. Every
/// backend's [`QueryConnection::request_with_timeout`] goes through here.
pub(crate) async fn traced_request<F, Fut>(
    mut request: Event,
    send: F,
) -> Result<Event, RequestError>
where
    F: FnOnce(Event) -> Fut,
    Fut: Future<Output = Result<Event, RequestError>>,
{
    use tracing::field::Empty;
    let span = tracing::info_span!(
        "request",
        "event.id" = Empty,
        "event.type" = Empty,
        transaction_id = Empty,
        trace_id = Empty,
        span_id = Empty,
        parent_span_id = Empty,
        outcome = Empty,
    );
    if !crate::event::has_transaction_id(&request) {
        request.set_transaction_id(&TransactionId::generate());
    }
    let trace = telemetry::outgoing(&mut request, !span.is_disabled());
    telemetry::record_event(&span, &request);
    telemetry::record_trace(&span, trace.as_ref());
    let op = request.ty().to_owned();
    let started = std::time::Instant::now();
    let result = tracing::Instrument::instrument(send(request), span.clone()).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(err) => request_outcome(err.kind()),
    };
    metrics::histogram!(telemetry::metric_names::REQUEST_DURATION, "type" => op, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    span.record("outcome", outcome);
    result
}

fn request_outcome(kind: RequestErrorKind) -> &'static str {
    match kind {
        RequestErrorKind::TimedOut => "timed-out",
        RequestErrorKind::NoResponders => "no-responders",
        RequestErrorKind::Remote => "remote-error",
        RequestErrorKind::Decode => "decode",
        RequestErrorKind::Encode => "encode",
        RequestErrorKind::ConnectionClosed => "connection-closed",
        RequestErrorKind::InvalidOptions => "invalid-options",
        RequestErrorKind::Disconnected => "disconnected",
        _ => "other",
    }
}

/// The content mode a message was sent in (binary when `ce-specversion` is present).
pub(crate) fn content_mode_of(headers: Option<&HeaderMap>) -> ContentMode {
    let binary = headers.is_some_and(|h| {
        h.iter()
            .any(|(name, _)| AsRef::<str>::as_ref(name).eq_ignore_ascii_case("ce-specversion"))
    });
    if binary {
        ContentMode::Binary
    } else {
        ContentMode::Structured
    }
}

/// Where a backend sends replies to one request.
#[async_trait]
pub(crate) trait ReplyTarget: Send + Sync {
    async fn send(&self, headers: HeaderMap, payload: Bytes) -> Result<(), BoxError>;

    /// The largest message (headers and payload) this target accepts; 0 when unknown.
    fn max_payload(&self) -> usize {
        0
    }
}

/// The size of a message's headers on the wire (`NATS/1.0\r\n`, `name: value\r\n` each,
/// `\r\n`), as the server counts it against `max_payload`.
pub(crate) fn header_size(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            let name = AsRef::<str>::as_ref(name).len();
            values
                .iter()
                .map(|v| name + 2 + v.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    if lines == 0 {
        0
    } else {
        "NATS/1.0\r\n".len() + lines + 2
    }
}

/// Puts the requester's remaining timeout on a request ([`REQUEST_TIMEOUT_MS`]).
pub(crate) fn set_request_timeout(headers: &mut HeaderMap, timeout: Duration) {
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    headers.insert(REQUEST_TIMEOUT_MS, ms.to_string().as_str());
}

const REQUEST_TIMEOUT_MS_NAME: HeaderName = HeaderName::from_static(REQUEST_TIMEOUT_MS);

/// When the requester of a message received now gives up: now + its `Request-Timeout-Ms`.
/// `None` when the header is absent or not a number (a requester of another library): such a
/// request is never dropped as expired.
pub(crate) fn request_deadline(headers: Option<&HeaderMap>) -> Option<tokio::time::Instant> {
    let ms: u64 = header(headers, REQUEST_TIMEOUT_MS_NAME)?
        .trim()
        .parse()
        .ok()?;
    // Clamped: a huge value must not overflow the clock.
    let left = Duration::from_millis(ms).min(crate::config::MAX_REQUEST_TIMEOUT);
    Some(tokio::time::Instant::now() + left)
}

struct ReplyState {
    sent: bool,
    /// The status of what was sent (200, or an error reply's code); meaningful once `sent`.
    code: u16,
    buffered: Vec<Event>,
}

/// One reply, encoded, with its `reply` span.
struct EncodedReply {
    headers: HeaderMap,
    payload: Bytes,
    span: tracing::Span,
}

struct ReplyInner {
    target: Arc<dyn ReplyTarget>,
    op: String,
    request_tid: Option<TransactionId>,
    mode: ContentMode,
    source: String,
    state: Mutex<ReplyState>,
}

/// Answers one query: one reply ([`reply`](Self::reply)), a stream of replies
/// ([`stream`](Self::stream)), or an error ([`error`](Self::error)).
///
/// A reply without a transaction id gets the request's; a reply whose source is empty or
/// `AUTO_POPULATE` gets the listener's client id. Replies go in the request's content mode.
///
/// # Examples
///
/// ```
/// # async fn demo(reply: ce_messaging::query::ReplyWriter) -> Result<(), ce_messaging::error::ReplyError> {
/// let stream = reply.stream();
/// for n in 0..3 {
///     stream.push_data("org.example.count", &n)?;
/// }
/// stream.finish().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ReplyWriter {
    inner: Arc<ReplyInner>,
}

impl std::fmt::Debug for ReplyWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyWriter")
            .field("op", &self.inner.op)
            .field("transaction_id", &self.inner.request_tid)
            .finish()
    }
}

impl ReplyWriter {
    pub(crate) fn new(
        target: Arc<dyn ReplyTarget>,
        op: String,
        request_tid: Option<TransactionId>,
        mode: ContentMode,
        source: String,
    ) -> Self {
        ReplyWriter {
            inner: Arc::new(ReplyInner {
                target,
                op,
                request_tid,
                mode,
                source,
                state: Mutex::new(ReplyState {
                    sent: false,
                    code: 200,
                    buffered: Vec::new(),
                }),
            }),
        }
    }

    /// The op (request type) being answered.
    pub fn op(&self) -> &str {
        &self.inner.op
    }

    /// The request's transaction id.
    pub fn transaction_id(&self) -> Option<&TransactionId> {
        self.inner.request_tid.as_ref()
    }

    fn mark_sent(&self, code: u16) -> Result<(), ReplyError> {
        let mut state = self
            .inner
            .state
            .lock()
            .map_err(|_| Error::new(ReplyErrorKind::AlreadyReplied))?;
        if state.sent {
            return Err(Error::new(ReplyErrorKind::AlreadyReplied));
        }
        state.sent = true;
        state.code = code;
        Ok(())
    }

    /// The status of what was sent: 200, or the error reply's code.
    fn sent_code(&self) -> u16 {
        self.inner.state.lock().map(|s| s.code).unwrap_or(200)
    }

    /// Whether a reply (or error reply) has been sent.
    pub fn is_sent(&self) -> bool {
        self.inner.state.lock().map(|s| s.sent).unwrap_or(true)
    }

    fn prepare(&self, mut event: Event) -> (Event, Option<telemetry::TraceContext>) {
        populate_source(&mut event, &self.inner.source);
        if !crate::event::has_transaction_id(&event) {
            if let Some(tid) = &self.inner.request_tid {
                event.set_transaction_id(tid);
            }
        }
        // The reply continues the trace of the request it answers.
        let trace = telemetry::outgoing(&mut event, false);
        (event, trace)
    }

    /// Encodes one reply (in its `reply` span), with its stream position when it is part of
    /// a reply stream.
    fn encode_reply(
        &self,
        event: Event,
        position: Option<(usize, usize)>,
    ) -> Result<EncodedReply, ReplyError> {
        let (event, trace) = self.prepare(event);
        let span = tracing::info_span!(
            "reply",
            "event.id" = event.id(),
            "event.type" = event.ty(),
            code = 200u16,
            index = position.map(|(index, _)| index),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
        );
        telemetry::record_trace(&span, trace.as_ref());
        let _entered = span.enter();
        let mut encoded = codec::encode(&event, self.inner.mode)
            .map_err(|e| e.map_kind(|_| ReplyErrorKind::Encode))?;
        if let Some((index, total)) = position {
            encoded
                .headers
                .insert(REPLY_STREAM_INDEX, index.to_string().as_str());
            encoded
                .headers
                .insert(REPLY_STREAM_TOTAL, total.to_string().as_str());
        }
        drop(_entered);
        Ok(EncodedReply {
            headers: encoded.headers,
            payload: encoded.payload,
            span,
        })
    }

    /// `Some((size, max))` when `reply` is larger than the target accepts.
    fn oversized(&self, reply: &EncodedReply) -> Option<(usize, usize)> {
        let max = self.inner.target.max_payload();
        let size = header_size(&reply.headers) + reply.payload.len();
        (max > 0 && size > max).then_some((size, max))
    }

    async fn send_encoded(&self, reply: EncodedReply) -> Result<(), ReplyError> {
        tracing::Instrument::instrument(
            self.inner.target.send(reply.headers, reply.payload),
            reply.span,
        )
        .await
        .map_err(|e| Error::with_source(ReplyErrorKind::Send, e))
    }

    /// Answers a reply that is too large with a 500 instead (already marked sent), and gives
    /// the handler its `TooLarge` error.
    async fn refuse_oversized(&self, size: usize, max: usize) -> ReplyError {
        let text = format!("reply too large: {size} bytes, max_payload {max}");
        tracing::warn!(op = %self.inner.op, size, max, "reply too large; answered with a 500");
        if let Err(e) = self.send_error_reply(500, &text).await {
            tracing::warn!(error = %e, "error reply not sent");
        }
        Error::with_detail(ReplyErrorKind::TooLarge, text)
    }

    /// Sends the one reply.
    ///
    /// The reply is encoded and its size checked before it counts as sent: a reply larger
    /// than the server's `max_payload` is answered with a 500 error reply (`reply too large:
    /// N bytes, max_payload M`) at once, and this returns `TooLarge`.
    ///
    /// # Errors
    ///
    /// `AlreadyReplied` if a reply was sent before; `Encode` (nothing was sent, the handler
    /// may still answer); `TooLarge`; `Send`.
    pub async fn reply(&self, event: Event) -> Result<(), ReplyError> {
        if self.is_sent() {
            return Err(Error::new(ReplyErrorKind::AlreadyReplied));
        }
        let encoded = self.encode_reply(event, None)?;
        let oversized = self.oversized(&encoded);
        self.mark_sent(if oversized.is_some() { 500 } else { 200 })?;
        if let Some((size, max)) = oversized {
            return Err(self.refuse_oversized(size, max).await);
        }
        self.send_encoded(encoded).await
    }

    /// Sends the one reply, an event of `event_type` with JSON `data`.
    ///
    /// # Errors
    ///
    /// As [`reply`](Self::reply), and `Encode` when the data does not serialize.
    pub async fn reply_data<T: Serialize + ?Sized>(
        &self,
        event_type: &str,
        data: &T,
    ) -> Result<(), ReplyError> {
        let event = self.new_reply_event(event_type, data)?;
        self.reply(event).await
    }

    fn new_reply_event<T: Serialize + ?Sized>(
        &self,
        event_type: &str,
        data: &T,
    ) -> Result<Event, ReplyError> {
        let tid = self
            .inner
            .request_tid
            .clone()
            .unwrap_or_else(TransactionId::generate);
        new_event_with_tid(event_type, self.inner.source.as_str(), data, tid)
            .map_err(|e| e.map_kind(|_| ReplyErrorKind::Encode))
    }

    /// Answers with an error: `Nats-Service-Error: <text>`, `Nats-Service-Error-Code: <code>`,
    /// and an event of type `<op>.error` with data `{"error": text, "code": code}`.
    ///
    /// # Errors
    ///
    /// `AlreadyReplied`; `Send`.
    pub async fn error(&self, code: u16, text: &str) -> Result<(), ReplyError> {
        self.mark_sent(code)?;
        self.send_error_reply(code, text).await
    }

    async fn send_error_reply(&self, code: u16, text: &str) -> Result<(), ReplyError> {
        send_error_reply(
            self.inner.target.as_ref(),
            &self.inner.op,
            self.inner.request_tid.clone(),
            self.inner.mode,
            &self.inner.source,
            code,
            text,
        )
        .await
    }

    /// A writer for a stream of replies: they are buffered and sent by
    /// [`finish`](ReplyStreamWriter::finish) with `Reply-Stream-Index/Total` (or when the
    /// handler returns, if it did not call `finish`).
    pub fn stream(&self) -> ReplyStreamWriter {
        ReplyStreamWriter {
            writer: self.clone(),
        }
    }

    pub(crate) async fn flush_buffered(&self) -> Result<bool, ReplyError> {
        let buffered = {
            let mut state = self
                .inner
                .state
                .lock()
                .map_err(|_| Error::new(ReplyErrorKind::AlreadyReplied))?;
            if state.sent || state.buffered.is_empty() {
                return Ok(false);
            }
            state.sent = true;
            std::mem::take(&mut state.buffered)
        };
        // Every reply is encoded and measured before the first is sent: a stream is answered
        // whole, or with one error reply.
        let total = buffered.len();
        let mut encoded = Vec::with_capacity(total);
        for (index, event) in buffered.into_iter().enumerate() {
            let reply = match self.encode_reply(event, Some((index, total))) {
                Ok(reply) => reply,
                Err(err) => {
                    self.set_code(500);
                    let text = format!("reply {index} of {total} could not be encoded: {err}");
                    if let Err(e) = self.send_error_reply(500, &text).await {
                        tracing::warn!(error = %e, "error reply not sent");
                    }
                    return Err(err);
                }
            };
            if let Some((size, max)) = self.oversized(&reply) {
                self.set_code(500);
                return Err(self.refuse_oversized(size, max).await);
            }
            encoded.push(reply);
        }
        for reply in encoded {
            self.send_encoded(reply).await?;
        }
        Ok(true)
    }

    fn set_code(&self, code: u16) {
        if let Ok(mut state) = self.inner.state.lock() {
            state.code = code;
        }
    }
}

/// Buffers the replies of one streamed answer; see [`ReplyWriter::stream`].
///
/// # Examples
///
/// ```
/// # async fn demo(reply: ce_messaging::query::ReplyWriter) -> Result<(), ce_messaging::error::ReplyError> {
/// let stream = reply.stream();
/// stream.push_data("org.example.row", &"a")?;
/// stream.push_data("org.example.row", &"b")?;
/// stream.finish().await?; // two replies: index 0 and 1, total 2
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ReplyStreamWriter {
    writer: ReplyWriter,
}

impl ReplyStreamWriter {
    /// Adds a reply to the stream.
    ///
    /// # Errors
    ///
    /// `AlreadyReplied` once the stream was sent; `TooMany` past [`MAX_BUFFERED_REPLIES`].
    pub fn push(&self, event: Event) -> Result<(), ReplyError> {
        let mut state = self
            .writer
            .inner
            .state
            .lock()
            .map_err(|_| Error::new(ReplyErrorKind::AlreadyReplied))?;
        if state.sent {
            return Err(Error::new(ReplyErrorKind::AlreadyReplied));
        }
        if state.buffered.len() >= MAX_BUFFERED_REPLIES {
            return Err(Error::with_detail(
                ReplyErrorKind::TooMany,
                format!("at most {MAX_BUFFERED_REPLIES} replies per stream"),
            ));
        }
        state.buffered.push(event);
        Ok(())
    }

    /// Adds a reply of `event_type` with JSON `data`.
    ///
    /// # Errors
    ///
    /// As [`push`](Self::push), and `Encode` when the data does not serialize.
    pub fn push_data<T: Serialize + ?Sized>(
        &self,
        event_type: &str,
        data: &T,
    ) -> Result<(), ReplyError> {
        let event = self.writer.new_reply_event(event_type, data)?;
        self.push(event)
    }

    /// Sends the buffered replies, each with `Reply-Stream-Index` and `Reply-Stream-Total`.
    ///
    /// # Errors
    ///
    /// `AlreadyReplied` if something was sent before; `Send`; `Encode`.
    pub async fn finish(self) -> Result<(), ReplyError> {
        if self.writer.flush_buffered().await? {
            Ok(())
        } else {
            Err(Error::with_detail(
                ReplyErrorKind::AlreadyReplied,
                "nothing to send, or already sent",
            ))
        }
    }
}

async fn send_error_reply(
    target: &dyn ReplyTarget,
    op: &str,
    tid: Option<TransactionId>,
    mode: ContentMode,
    source: &str,
    code: u16,
    text: &str,
) -> Result<(), ReplyError> {
    let data = serde_json::json!({ "error": text, "code": code });
    let error_type = format!("{op}.error");
    let source = if source.is_empty() {
        "ce-messaging"
    } else {
        source
    };
    let event = new_event_with_tid(
        &error_type,
        source,
        &data,
        tid.unwrap_or_else(TransactionId::generate),
    );
    // An error reply continues the request's trace like any other reply.
    let (mut headers, payload) = match event.map(|mut e| {
        telemetry::outgoing(&mut e, false);
        codec::encode(&e, mode)
    }) {
        Ok(Ok(encoded)) => (encoded.headers, encoded.payload),
        _ => (HeaderMap::new(), Bytes::new()),
    };
    headers.insert(SERVICE_ERROR, text_value(text));
    headers.insert(SERVICE_ERROR_CODE, code.to_string().as_str());
    let span = tracing::info_span!("reply", "event.type" = op, code);
    tracing::Instrument::instrument(target.send(headers, payload), span)
        .await
        .map_err(|e| Error::with_source(ReplyErrorKind::Send, e))
}

/// A request as a backend receives it.
pub(crate) struct RawRequest {
    pub subject: String,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
    pub reply: Option<Arc<dyn ReplyTarget>>,
    /// When the requester gives up, computed on receipt from `Request-Timeout-Ms`.
    pub deadline: Option<tokio::time::Instant>,
}

impl RawRequest {
    /// A request received now; its deadline is read from its headers.
    pub(crate) fn received(
        subject: String,
        headers: Option<HeaderMap>,
        payload: Bytes,
        reply: Option<Arc<dyn ReplyTarget>>,
    ) -> Self {
        let deadline = request_deadline(headers.as_ref());
        RawRequest {
            subject,
            headers,
            payload,
            reply,
            deadline,
        }
    }
}

/// What serving needs besides the request.
pub(crate) struct ServeContext {
    pub handlers: QueryHandlers,
    pub source: String,
    /// One subscription per op: the handler is the subject's, and a request whose `type`
    /// differs is refused (400). `false` on a wildcard listener, which dispatches by `type`.
    pub by_subject: bool,
}

/// Why a listener did not run a request's handler (label `reason` of
/// [`QUERIES_SHED`](telemetry::metric_names::QUERIES_SHED)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shed {
    /// The worker queue was full: answered 503 at once.
    Busy,
    /// The requester's timeout ran out before a worker took it: dropped without a reply.
    Expired,
}

impl Shed {
    pub(crate) fn count(self, subject: &str) {
        let reason = match self {
            Shed::Busy => "busy",
            Shed::Expired => "expired",
        };
        metrics::counter!(telemetry::metric_names::QUERIES_SHED, "type" => subject.to_owned(), "reason" => reason)
            .increment(1);
    }
}

/// Text of the error reply to a request refused because the worker queue is full.
pub(crate) const BUSY_TEXT: &str = "listener busy: every worker and queue slot is taken";

/// Answers a request the listener will not serve (stopping, or busy) with an error reply, so
/// the requester fails at once instead of waiting for its timeout.
pub(crate) async fn refuse_request(request: RawRequest, source: &str, code: u16, text: &str) {
    let Some(target) = request.reply else { return };
    tracing::debug!(subject = %request.subject, code, text, "query refused");
    let tid = codec::decode(request.headers.as_ref(), &request.payload)
        .ok()
        .and_then(|event| event.transaction_id());
    let writer = ReplyWriter::new(
        target,
        request.subject,
        tid,
        content_mode_of(request.headers.as_ref()),
        source.to_owned(),
    );
    if let Err(err) = writer.error(code, text).await {
        tracing::warn!(error = %err, "error reply not sent");
    }
}

/// Serves one request per the contract: decode (400), dispatch by type (404), run the handler
/// (500 on error or panic), flush a buffered stream, answer a handler that sent nothing, and
/// answer 503 when the listener's grace period runs out mid-request.
pub(crate) async fn serve_request(
    request: RawRequest,
    ctx: &ServeContext,
    work: &WorkContext,
) -> Outcome {
    use tracing::field::Empty;
    let span = tracing::info_span!(
        "handle_query",
        "event.id" = Empty,
        "event.type" = Empty,
        transaction_id = Empty,
        trace_id = Empty,
        span_id = Empty,
        parent_span_id = Empty,
        code = Empty,
    );
    let (outcome, code) =
        tracing::Instrument::instrument(serve(request, ctx, work, span.clone()), span.clone())
            .await;
    if let Some(code) = code {
        span.record("code", code);
    }
    outcome
}

/// [`serve_request`] inside its span; also gives the status the reply carried (200, or the
/// error code), `None` when nothing was sent.
async fn serve(
    request: RawRequest,
    ctx: &ServeContext,
    work: &WorkContext,
    span: tracing::Span,
) -> (Outcome, Option<u16>) {
    let Some(target) = request.reply else {
        tracing::debug!(subject = %request.subject, "query without reply subject ignored");
        return (Outcome::Finished, None);
    };
    if request
        .deadline
        .is_some_and(|deadline| deadline <= tokio::time::Instant::now())
    {
        // Its requester gave up while it waited for a worker: nobody reads a reply.
        tracing::debug!(subject = %request.subject, "query dropped: its requester's timeout ran out");
        Shed::Expired.count(&request.subject);
        return (Outcome::Finished, None);
    }
    let mode = content_mode_of(request.headers.as_ref());
    let event = match codec::decode(request.headers.as_ref(), &request.payload) {
        Ok(event) => event,
        Err(err) => {
            tracing::warn!(subject = %request.subject, error = %err, "undecodable query");
            let text = format!("undecodable request: {err}");
            if let Err(e) = send_error_reply(
                target.as_ref(),
                &request.subject,
                None,
                mode,
                &ctx.source,
                400,
                &text,
            )
            .await
            {
                tracing::warn!(error = %e, "error reply not sent");
            }
            return (Outcome::Finished, Some(400));
        }
    };
    telemetry::record_event(&span, &event);
    let trace = telemetry::incoming(&event, !span.is_disabled());
    telemetry::record_trace(&span, trace.as_ref());
    if ctx.by_subject && event.ty() != request.subject {
        // The subject chose this listener (and is what permissions look at); a request whose
        // type names another op must not reach that op's handler.
        let text = format!(
            "request type {:?} does not match its subject {:?}",
            event.ty(),
            request.subject
        );
        tracing::warn!(subject = %request.subject, "event.type" = event.ty(), "query type does not match its subject");
        let writer = ReplyWriter::new(
            target,
            request.subject,
            event.transaction_id(),
            mode,
            ctx.source.clone(),
        );
        let _ = telemetry::in_context(trace, writer.error(400, &text)).await;
        QueryOpMetrics::register(writer.op()).handled(400);
        return (Outcome::Finished, Some(400));
    }
    let writer = ReplyWriter::new(
        target,
        event.ty().to_owned(),
        event.transaction_id(),
        mode,
        ctx.source.clone(),
    );
    let op = writer.op();
    let Some(entry) = ctx.handlers.get(op) else {
        tracing::warn!(op = %op, "query for an op with no handler");
        let _ = telemetry::in_context(trace, writer.error(404, &format!("no handler for op {op}")))
            .await;
        QueryOpMetrics::register(op).handled(404);
        return (Outcome::Finished, Some(404));
    };
    let metrics = entry.metrics.get_or_init(|| QueryOpMetrics::register(op));
    let (outcome, code) = telemetry::in_context(trace, async {
        let started = std::time::Instant::now();
        // The abort is looked at before the handler starts and while it waits; a handler that
        // is done at its first poll (most) never registers with the shared abort token.
        let result = if work.abort.is_cancelled() {
            None
        } else {
            tokio::select! {
                biased;
                result = call_handler(entry.handler.handle(event, writer.clone())).fuse() => Some(result),
                _ = work.abort.cancelled() => None,
            }
        };
        let Some(result) = result else {
            if !work.crashed() && !writer.is_sent() {
                let _ = writer
                    .error(503, "listener stopped before the handler finished")
                    .await;
                return (Outcome::Abandoned, Some(503));
            }
            return (Outcome::Abandoned, None);
        };
        metrics
            .handler_duration
            .record(started.elapsed().as_secs_f64());
        let (sent, code) = match result {
            Ok(()) => match writer.flush_buffered().await {
                Ok(true) => (Ok(()), writer.sent_code()),
                Ok(false) if writer.is_sent() => (Ok(()), writer.sent_code()),
                Ok(false) => (
                    writer.error(500, "handler returned without replying").await,
                    500,
                ),
                Err(e) => (Err(e), writer.sent_code()),
            },
            Err(err) => {
                tracing::warn!(op = %op, error = %err, code = err.code(), "query handler failed");
                if writer.is_sent() {
                    (Ok(()), writer.sent_code())
                } else {
                    (writer.error(err.code(), err.message()).await, err.code())
                }
            }
        };
        if let Err(e) = sent {
            tracing::warn!(op = %op, error = %e, "reply not sent");
        }
        (Outcome::Finished, Some(code))
    })
    .await;
    if let Some(code) = code {
        metrics.handled(code);
    }
    (outcome, code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reply_headers_become_remote_errors() {
        let mut headers = HeaderMap::new();
        headers.insert(SERVICE_ERROR, "no handler for op x");
        headers.insert(SERVICE_ERROR_CODE, "404");
        let err = interpret_reply(Some(&headers), &Bytes::new()).unwrap_err();
        assert_eq!(err.kind(), RequestErrorKind::Remote);
        let remote = RemoteError::of(&err).unwrap();
        assert_eq!(remote.code(), 404);
        assert_eq!(remote.text(), "no handler for op x");
    }

    #[test]
    fn garbage_reply_is_a_decode_error() {
        let err = interpret_reply(None, &Bytes::from_static(b"\xff\x00garbage")).unwrap_err();
        assert_eq!(err.kind(), RequestErrorKind::Decode);
    }

    fn raw_stream(items: Vec<RawReply>) -> BoxStream<'static, RawReply> {
        futures::stream::iter(items)
            .chain(futures::stream::pending())
            .boxed()
    }

    /// Counts `ce_messaging_queries_shed_total` increments by `reason`, on this thread.
    #[derive(Default)]
    struct ShedRecorder {
        counts: Arc<Mutex<HashMap<String, u64>>>,
    }

    struct ShedCounter {
        reason: Option<String>,
        counts: Arc<Mutex<HashMap<String, u64>>>,
    }

    impl metrics::CounterFn for ShedCounter {
        fn increment(&self, value: u64) {
            if let Some(reason) = &self.reason {
                *self
                    .counts
                    .lock()
                    .unwrap()
                    .entry(reason.clone())
                    .or_default() += value;
            }
        }
        fn absolute(&self, _value: u64) {}
    }

    impl metrics::Recorder for ShedRecorder {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(
            &self,
            key: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            let reason = (key.name() == telemetry::metric_names::QUERIES_SHED)
                .then(|| {
                    key.labels()
                        .find(|l| l.key() == "reason")
                        .map(|l| l.value().to_owned())
                })
                .flatten();
            metrics::Counter::from_arc(Arc::new(ShedCounter {
                reason,
                counts: self.counts.clone(),
            }))
        }
        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::noop()
        }
        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    struct Recorded(Mutex<Vec<(HeaderMap, Bytes)>>);

    #[async_trait]
    impl ReplyTarget for Recorded {
        async fn send(&self, headers: HeaderMap, payload: Bytes) -> Result<(), BoxError> {
            self.0.lock().unwrap().push((headers, payload));
            Ok(())
        }
    }

    #[test]
    fn a_request_whose_deadline_passed_is_dropped_unanswered_and_counted() {
        let recorder = ShedRecorder::default();
        let counts = recorder.counts.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let r = ran.clone();
                let ctx = ServeContext {
                    handlers: QueryHandlers::new().on(
                        "t.op",
                        handler_fn(move |_, reply| {
                            let r = r.clone();
                            async move {
                                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                reply.reply_data("t.op.reply", &1).await?;
                                Ok(())
                            }
                        }),
                    ),
                    source: "svc".into(),
                    by_subject: true,
                };
                let pool = crate::worker::WorkerPool::start(1, 1, |_: (), _| {
                    async { Outcome::Finished }.boxed()
                });
                let work = pool.context();
                let encoded = codec::encode(
                    &crate::event::new_event("t.op", "c", &1).unwrap(),
                    ContentMode::Structured,
                )
                .unwrap();
                let request = |ms: &str| {
                    let target = Arc::new(Recorded(Mutex::new(Vec::new())));
                    let mut headers = encoded.headers.clone();
                    headers.insert(REQUEST_TIMEOUT_MS, ms);
                    let request = RawRequest::received(
                        "t.op".into(),
                        Some(headers),
                        encoded.payload.clone(),
                        Some(target.clone() as Arc<dyn ReplyTarget>),
                    );
                    (request, target)
                };
                // No time left: dropped without a reply, the handler never runs.
                let (expired, target) = request("0");
                serve_request(expired, &ctx, &work).await;
                assert!(target.0.lock().unwrap().is_empty());
                assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0);
                // Time left: served.
                let (fresh, target) = request("5000");
                serve_request(fresh, &ctx, &work).await;
                assert_eq!(target.0.lock().unwrap().len(), 1);
                assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
                pool.stop(Duration::from_secs(1), false).await;
            })
        });
        assert_eq!(
            counts.lock().unwrap().get("expired").copied(),
            Some(1),
            "{counts:?}"
        );
    }

    #[test]
    fn request_deadline_reads_the_header_and_ignores_garbage() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let now = tokio::time::Instant::now();
            let mut headers = HeaderMap::new();
            set_request_timeout(&mut headers, Duration::from_millis(1500));
            assert_eq!(
                headers.get(REQUEST_TIMEOUT_MS).map(|v| v.as_str()),
                Some("1500")
            );
            assert_eq!(
                request_deadline(Some(&headers)),
                Some(now + Duration::from_millis(1500))
            );
            headers.insert(REQUEST_TIMEOUT_MS, "soon");
            assert_eq!(request_deadline(Some(&headers)), None);
            assert_eq!(request_deadline(None), None);
            // Clamped to the longest request timeout.
            headers.insert(REQUEST_TIMEOUT_MS, u64::MAX.to_string().as_str());
            assert_eq!(
                request_deadline(Some(&headers)),
                Some(now + crate::config::MAX_REQUEST_TIMEOUT)
            );
        });
    }

    #[tokio::test(start_paused = true)]
    async fn stream_without_replies_times_out_once() {
        let mut stream = ReplyStream::from_raw(
            raw_stream(vec![]),
            &ReplyStreamOptions::default(),
            Duration::from_secs(1),
        );
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), RequestErrorKind::TimedOut);
        assert!(stream.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn no_responders_ends_the_stream() {
        let mut stream = ReplyStream::from_raw(
            raw_stream(vec![RawReply::NoResponders]),
            &ReplyStreamOptions::default(),
            Duration::from_secs(1),
        );
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), RequestErrorKind::NoResponders);
        assert!(stream.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn sentinel_ends_the_stream() {
        let mut stream = ReplyStream::from_raw(
            raw_stream(vec![RawReply::Message {
                headers: None,
                payload: Bytes::new(),
            }]),
            &ReplyStreamOptions::default().sentinel(true),
            Duration::from_secs(1),
        );
        // The sentinel came first: the stream ends without replies and without an error.
        assert!(stream.next().await.is_none());
    }
}
