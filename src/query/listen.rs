//! The server side of queries: [`QueryListenOptions`] and how a listener serves one request
//! (deadline, load shedding, handler lookup, the `handle` span and metrics).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, ContentMode, HeaderMap};
use crate::error::{Error, ListenError};
use crate::event::EventExt;
use crate::handler::{call_handler, start_handler, BoxFuture, HandlerError};
use crate::headers::REQUEST_TIMEOUT_MS;
use crate::listener::WorkerOptions;
use crate::telemetry::{self, QueryOpMetrics, TraceContext};
use crate::worker::{Outcome, WorkContext};

use super::{HandlerEntry, QueryHandlers, ReplyTarget, ReplyWriter};

/// How a query listener runs.
///
/// # Examples
///
/// ```
/// use ce_messaging::{QueryListenOptions, WorkerOptions};
///
/// // Four handlers at once, 64 requests queued; a request beyond that gets a 503 at once.
/// let options = QueryListenOptions {
///     pool: WorkerOptions::new(4, 64),
///     queue_group: Some("orders-v2".into()),
///     ..Default::default()
/// };
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct QueryListenOptions {
    /// Workers, queue and grace period (default: 16 workers, 256 queued, 30 s). The queue
    /// (`buffer`, at least 1) is where requests wait for a worker; a request that finds it
    /// full is answered at once with a 503 error reply (`listener busy`) instead of waiting
    /// (load shedding; the requester may retry, possibly reaching another instance of the
    /// group).
    pub pool: WorkerOptions,
    /// Subscribe to this subject (e.g. `cyverse.>`) and dispatch by type, instead of one
    /// subscription per op. `None`: `NATS_WILDCARD_SUBJECT` from the configuration, if set.
    pub wildcard_subject: Option<String>,
    /// The queue group; `None`: `NATS_QUEUE_GROUP` from the configuration.
    pub queue_group: Option<String>,
}

impl Default for QueryListenOptions {
    fn default() -> Self {
        QueryListenOptions {
            pool: WorkerOptions::new(16, 256),
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
        self.pool.validate(1)
    }
}

/// The content mode a message was sent in (binary when `ce-specversion` is present).
#[cfg(test)]
pub(crate) fn content_mode_of(headers: Option<&HeaderMap>) -> ContentMode {
    received_headers(headers).0
}

/// What a listener reads from a request's headers on receipt, in one pass over the map (a
/// lookup would hash the name with SipHash): its content mode, and its `Request-Timeout-Ms`.
fn received_headers(headers: Option<&HeaderMap>) -> (ContentMode, Option<&str>) {
    let mut mode = ContentMode::Structured;
    let mut timeout = None;
    for (name, values) in headers.into_iter().flat_map(HeaderMap::iter) {
        let name: &str = name.as_ref();
        if name == REQUEST_TIMEOUT_MS {
            timeout = values.first().map(|v| v.as_str());
        } else if name.eq_ignore_ascii_case("ce-specversion") {
            mode = ContentMode::Binary;
        }
    }
    (mode, timeout)
}

/// When the requester of a message received now gives up: now + its `Request-Timeout-Ms`.
/// `None` when the header is absent or not a number (a requester of another library): such a
/// request is never dropped as expired.
#[cfg(test)]
pub(crate) fn request_deadline(headers: Option<&HeaderMap>) -> Option<tokio::time::Instant> {
    deadline_of(received_headers(headers).1)
}

fn deadline_of(timeout_ms: Option<&str>) -> Option<tokio::time::Instant> {
    let ms: u64 = timeout_ms?.trim().parse().ok()?;
    // Clamped: a huge value must not overflow the clock.
    let left = Duration::from_millis(ms).min(crate::config::MAX_REQUEST_TIMEOUT);
    Some(tokio::time::Instant::now() + left)
}

/// A request as a backend receives it.
pub(crate) struct RawRequest {
    /// Shared bytes: taken from the received message without a copy.
    pub subject: Subject,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
    pub reply: Option<Arc<dyn ReplyTarget>>,
    /// When the requester gives up, computed on receipt from `Request-Timeout-Ms`.
    pub deadline: Option<tokio::time::Instant>,
    /// The content mode it came in (the replies go in the same).
    pub mode: ContentMode,
}

impl RawRequest {
    /// A request received now; its deadline and content mode are read from its headers.
    pub(crate) fn received(
        subject: Subject,
        headers: Option<HeaderMap>,
        payload: Bytes,
        reply: Option<Arc<dyn ReplyTarget>>,
    ) -> Self {
        let (mode, timeout) = received_headers(headers.as_ref());
        let deadline = deadline_of(timeout);
        RawRequest {
            subject,
            headers,
            payload,
            reply,
            deadline,
            mode,
        }
    }
}

/// What serving needs besides the request.
pub(crate) struct ServeContext {
    pub handlers: QueryHandlers,
    /// The listener's client id, shared with each request's [`ReplyWriter`].
    pub source: Arc<str>,
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
    let writer = ReplyWriter::new(target, request.subject, tid, request.mode, source.into());
    if let Err(err) = writer.error(code, text).await {
        tracing::warn!(error = %err, "error reply not sent");
    }
}

/// Serves one request per the contract: decode (400), dispatch by type (404), run the handler
/// (500 on error or panic), flush a buffered stream, answer a handler that sent nothing, and
/// answer 503 when the listener's grace period runs out mid-request.
///
/// Not an `async fn`: the span is made and the serving future built here, so the request is
/// held once (an `async fn` would hold it as its own argument and again inside `serve`).
pub(crate) fn serve_request<'a>(
    request: RawRequest,
    ctx: &'a ServeContext,
    work: &'a WorkContext,
) -> impl Future<Output = Outcome> + Send + 'a {
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
    // No `async move` block: it would hold the serving future twice (as its capture and as
    // the awaited value). `serve` records the code on the span it was given.
    tracing::Instrument::instrument(serve(request, ctx, work, span.clone()), span)
}

/// What a received request comes to once it is decoded and looked up. Worked out before
/// anything is awaited, so that the decoded event (300 bytes) is not part of the serving
/// future: it moves into the handler's future at once.
enum Admission<'a> {
    /// Nothing to answer: no reply subject, or its requester gave up.
    Dropped,
    /// Answered at once with an error reply; `counted`: under the op's metrics.
    Refused {
        writer: ReplyWriter,
        trace: Option<TraceContext>,
        code: u16,
        text: String,
        counted: bool,
    },
    /// Its handler runs (`handling`, not polled yet).
    Handled {
        writer: ReplyWriter,
        trace: Option<TraceContext>,
        entry: &'a HandlerEntry,
        handling: BoxFuture<'a, Result<(), HandlerError>>,
    },
}

/// Decodes `request` (400), checks its type against the subject (400), finds its handler
/// (404), and records the event and its trace context on `span`.
fn admit<'a>(request: RawRequest, ctx: &'a ServeContext, span: &tracing::Span) -> Admission<'a> {
    let Some(target) = request.reply else {
        tracing::debug!(subject = %request.subject, "query without reply subject ignored");
        return Admission::Dropped;
    };
    if request
        .deadline
        .is_some_and(|deadline| deadline <= tokio::time::Instant::now())
    {
        // Its requester gave up while it waited for a worker: nobody reads a reply.
        tracing::debug!(subject = %request.subject, "query dropped: its requester's timeout ran out");
        Shed::Expired.count(request.subject.as_str());
        return Admission::Dropped;
    }
    let mode = request.mode;
    let event = match codec::decode(request.headers.as_ref(), &request.payload) {
        Ok(event) => event,
        Err(err) => {
            tracing::warn!(subject = %request.subject, error = %err, "undecodable query");
            return Admission::Refused {
                writer: ReplyWriter::new(target, request.subject, None, mode, ctx.source.clone()),
                trace: None,
                code: 400,
                text: format!("undecodable request: {err}"),
                counted: false,
            };
        }
    };
    telemetry::record_received(span, &event);
    let trace = telemetry::incoming(&event, !span.is_disabled());
    telemetry::record_trace(span, trace.as_ref());
    if ctx.by_subject && event.ty() != request.subject.as_str() {
        // The subject chose this listener (and is what permissions look at); a request whose
        // type names another op must not reach that op's handler.
        let text = format!(
            "request type {:?} does not match its subject {:?}",
            event.ty(),
            request.subject.as_str()
        );
        tracing::warn!(subject = %request.subject, "event.type" = event.ty(), "query type does not match its subject");
        let writer = ReplyWriter::new(
            target,
            request.subject,
            event.transaction_id(),
            mode,
            ctx.source.clone(),
        );
        return Admission::Refused {
            writer,
            trace,
            code: 400,
            text,
            counted: true,
        };
    }
    // One subscription per op: the subject is the op (checked above), taken as it is.
    let op = if ctx.by_subject {
        request.subject
    } else {
        Subject::from(event.ty())
    };
    let writer = ReplyWriter::new(target, op, event.transaction_id(), mode, ctx.source.clone());
    let Some(entry) = ctx.handlers.get(writer.op()) else {
        tracing::warn!(op = %writer.op(), "query for an op with no handler");
        let text = format!("no handler for op {}", writer.op());
        return Admission::Refused {
            writer,
            trace,
            code: 404,
            text,
            counted: true,
        };
    };
    // A handler whose `handle` panics before returning its future is answered like one whose
    // future panics (500), and does not take its worker down.
    let handling = match start_handler(|| entry.handler.handle(event, writer.clone())) {
        Ok(handling) => handling,
        Err(err) => {
            return Admission::Refused {
                writer,
                trace,
                code: 500,
                text: err.to_string(),
                counted: true,
            };
        }
    };
    Admission::Handled {
        writer,
        trace,
        entry,
        handling,
    }
}

/// The rest of a handler that was pending at its first poll, or `None` once `abort` is
/// cancelled first. The handler is polled first (its result wins when both are ready), and not
/// again at this future's first poll: it was just polled.
async fn until_aborted<F: Future + Unpin>(
    mut handler: F,
    abort: &CancellationToken,
) -> Option<F::Output> {
    let aborted = abort.cancelled();
    tokio::pin!(aborted);
    let mut just_polled = true;
    std::future::poll_fn(|cx| {
        if !std::mem::take(&mut just_polled) {
            if let Poll::Ready(result) = Pin::new(&mut handler).poll(cx) {
                return Poll::Ready(Some(result));
            }
        }
        aborted.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// [`serve_request`] inside its span; records on it the status the reply carried (200, or
/// the error code; none when nothing was sent).
async fn serve(
    request: RawRequest,
    ctx: &ServeContext,
    work: &WorkContext,
    span: tracing::Span,
) -> Outcome {
    let (writer, trace, entry, handling) = match admit(request, ctx, &span) {
        Admission::Dropped => return Outcome::Finished,
        Admission::Refused {
            writer,
            trace,
            code,
            text,
            counted,
        } => {
            if let Err(e) = telemetry::in_context(trace, writer.error(code, &text)).await {
                tracing::warn!(error = %e, "error reply not sent");
            }
            if counted {
                QueryOpMetrics::register(writer.op()).handled(code);
            }
            span.record("code", code);
            return Outcome::Finished;
        }
        Admission::Handled {
            writer,
            trace,
            entry,
            handling,
        } => (writer, trace, entry, handling),
    };
    let op = writer.op();
    let metrics = entry.metrics.get_or_init(|| QueryOpMetrics::register(op));
    let (outcome, code) = telemetry::in_context(trace, async {
        let started = std::time::Instant::now();
        // The abort is looked at before the handler starts and while it waits; a handler that
        // is done at its first poll (most) never makes a wait on the shared abort token.
        let result = if work.abort.is_cancelled() {
            None
        } else {
            let handler = call_handler(handling);
            tokio::pin!(handler);
            match futures::poll!(handler.as_mut()) {
                Poll::Ready(result) => Some(result),
                Poll::Pending => until_aborted(handler, &work.abort).await,
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
            Ok(()) => match writer.flush().await {
                Ok(Some(code)) => (Ok(()), code),
                Ok(None) => (
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
        span.record("code", code);
    }
    outcome
}
