//! The client side of queries: the [`QueryConnection`] trait and what every backend's
//! `request` shares (the request's source and transaction id, its `request` span and metrics,
//! the requester's timeout carried in a header).

use crate::codec::ReceivedEvent;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cloudevents::{AttributesReader, Event};
use futures::future::{self, Either, FutureExt};

use crate::codec::HeaderMap;
use crate::error::{ListenError, RequestError, RequestErrorKind};
use crate::event::{populate_source, EventExt, TransactionId};
use crate::headers::REQUEST_TIMEOUT_MS;
use crate::listener::Listener;
use crate::telemetry::{self};

use super::{QueryHandlers, QueryListenOptions, ReplyStream, ReplyStreamOptions};

/// The most replies a buffered [`ReplyStreamWriter`](super::ReplyStreamWriter) holds before it refuses more.
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
/// use ce_messaging::cloudevent::new_event;
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
    /// [`RemoteError::of`](crate::error::RemoteError::of)), `Decode`, `Encode`, `ConnectionClosed`,
    /// `Disconnected`, and `EmptyStream` when the replier answered with a reply stream of zero
    /// replies (read such ops with [`request_stream`](Self::request_stream)).
    async fn request(&self, request: Event) -> Result<ReceivedEvent, RequestError> {
        self.request_with_timeout(request, self.default_timeout())
            .await
    }

    /// Like [`request`](Self::request) with a timeout of its own (clamped to
    /// [`MAX_REQUEST_TIMEOUT`](crate::config::MAX_REQUEST_TIMEOUT)).
    async fn request_with_timeout(
        &self,
        request: Event,
        timeout: Duration,
    ) -> Result<ReceivedEvent, RequestError>;

    /// Sends a query and returns the stream of its replies: the replies of one replier that
    /// streams (ends after `Reply-Stream-Total`), or of many repliers (ends on the first of the
    /// [`ReplyStreamOptions`] strategies; a replier's empty stream ends it without an item).
    ///
    /// Returns as soon as the request is sent. It fails only for what stops the request from
    /// being sent (`InvalidOptions`, `Encode`, `Disconnected`, `ConnectionClosed`); what comes
    /// back arrives on the stream, **`NoResponders` included: as its first and only item**
    /// (see [`ReplyStream`] for why and for the other items).
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

/// Fills in what a request needs before it is sent: the source and a transaction id; refuses
/// an op that breaks the subject-token rule ([`check_type`](crate::event::check_type)) first.
/// A backend's reply stream goes through here; its one-reply request went through
/// [`traced_request`] and needs only [`populate_source`].
pub(crate) fn prepare_request(request: &mut Event, source: &str) -> Result<(), RequestError> {
    check_op(request.ty())?;
    populate_source(request, source);
    if !crate::event::has_transaction_id(request) {
        request.set_transaction_id(&TransactionId::generate());
    }
    // Continues the current handler's trace; a new trace starts in [`traced_request`].
    telemetry::outgoing(request, false);
    Ok(())
}

fn check_op(op: &str) -> Result<(), RequestError> {
    crate::event::check_type(op).map_err(|e| e.map_kind(|_| RequestErrorKind::InvalidOptions))
}

/// The most ops a connection remembers in its [`KnownOps`]; requests of further ops are
/// checked and labelled per request.
const MAX_KNOWN_OPS: usize = 64;

/// The ops a connection has sent requests for: each one's type passed
/// [`check_type`](crate::event::check_type), and its `request_duration` histogram with
/// outcome `ok` is registered (once, at the op's first request: install a metrics recorder
/// before the first request). A request of a known op neither checks its type again nor
/// builds metric labels. Few ops per connection, so a short list compared by string.
#[derive(Default)]
pub(crate) struct KnownOps {
    ops: std::sync::Mutex<Vec<KnownOp>>,
}

/// A known op (shared: a failed request labels its metric with it) and its `ok` histogram.
type KnownOp = (Arc<str>, metrics::Histogram);

impl KnownOps {
    /// `op` and its `ok` histogram when `op` is known.
    pub(super) fn get(&self, op: &str) -> Option<KnownOp> {
        let ops = self.ops.lock().ok()?;
        ops.iter().find(|(known, _)| known.as_ref() == op).cloned()
    }

    /// Checks `op`; `op` and the histogram of its `ok` outcome, remembered when there is room.
    pub(super) fn learn(&self, op: &str) -> Result<KnownOp, RequestError> {
        check_op(op)?;
        let histogram = metrics::histogram!(telemetry::metric_names::REQUEST_DURATION, "type" => op.to_owned(), "outcome" => "ok");
        let known: KnownOp = (op.into(), histogram);
        if let Ok(mut ops) = self.ops.lock() {
            if ops.len() < MAX_KNOWN_OPS && !ops.iter().any(|(k, _)| k.as_ref() == op) {
                ops.push(known.clone());
            }
        }
        Ok(known)
    }
}

/// One request inside a `request` span: the request's op is checked, it gets its transaction
/// id and trace context here, and the time to its reply (or error) is recorded by op and
/// outcome. Every backend's [`QueryConnection::request_with_timeout`] goes through here, and
/// its `send` needs only to [`populate_source`] before it encodes.
///
/// Not an `async fn`: the request is prepared and `send` called (inside the span) when this is
/// called, and the outcome recorded by a `map`, so the future is the backend's future and a
/// few words (an `async fn` would also hold the event; an `async` block awaiting the backend's
/// future would hold that future twice).
pub(crate) fn traced_request<F, Fut>(
    mut request: Event,
    known: &KnownOps,
    send: F,
) -> impl Future<Output = Result<ReceivedEvent, RequestError>>
where
    F: FnOnce(Event) -> Fut,
    Fut: Future<Output = Result<ReceivedEvent, RequestError>>,
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
    let started = std::time::Instant::now();
    let known_op = match known.get(request.ty()) {
        Some(known) => Ok(known),
        None => known.learn(request.ty()),
    };
    let (op, ok_histogram) = match known_op {
        Ok(known) => known,
        Err(err) => {
            let outcome = request_outcome(err.kind());
            record_failure(request.ty().to_owned(), outcome, started);
            span.record("outcome", outcome);
            return Either::Left(future::ready(Err(err)));
        }
    };
    if !crate::event::has_transaction_id(&request) {
        request.set_transaction_id(&TransactionId::generate());
    }
    let trace = telemetry::outgoing(&mut request, !span.is_disabled());
    telemetry::record_event(&span, &request);
    telemetry::record_trace(&span, trace.as_ref());
    let sending = {
        let _entered = span.enter();
        tracing::Instrument::instrument(send(request), span.clone())
    };
    Either::Right(sending.map(move |result| {
        let outcome = match &result {
            Ok(_) => {
                ok_histogram.record(started.elapsed().as_secs_f64());
                "ok"
            }
            Err(err) => {
                let outcome = request_outcome(err.kind());
                record_failure(op.as_ref().to_owned(), outcome, started);
                outcome
            }
        };
        span.record("outcome", outcome);
        result
    }))
}

fn record_failure(op: String, outcome: &'static str, started: std::time::Instant) {
    metrics::histogram!(telemetry::metric_names::REQUEST_DURATION, "type" => op, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
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
        RequestErrorKind::EmptyStream => "empty-stream",
        _ => "other",
    }
}

/// Puts the requester's remaining timeout on a request ([`REQUEST_TIMEOUT_MS`]): the digits
/// written on the stack (the formatting machinery cost about 500 instructions per request),
/// the name built at compile time (a `&str` name is validated and matched per call).
pub(crate) fn set_request_timeout(headers: &mut HeaderMap, timeout: Duration) {
    const NAME: async_nats::HeaderName = async_nats::HeaderName::from_static(REQUEST_TIMEOUT_MS);
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let mut digits = [0u8; 20];
    headers.insert(NAME, crate::headers::decimal(ms, &mut digits));
}
