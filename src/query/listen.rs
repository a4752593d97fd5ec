//! The server side of queries: [`QueryListenOptions`] and how a listener serves one request
//! (deadline, load shedding, handler lookup, the `handle` span and metrics).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cloudevents::AttributesReader;
use futures::FutureExt;

use async_nats::HeaderName;

use crate::codec::{self, ContentMode, HeaderMap};
use crate::error::{Error, ListenError};
use crate::event::EventExt;
use crate::handler::call_handler;
use crate::headers::REQUEST_TIMEOUT_MS;
use crate::listener::WorkerOptions;
use crate::telemetry::{self, QueryOpMetrics};
use crate::worker::{Outcome, WorkContext};

use super::reply::send_error_reply;
use super::stream::header;
use super::{QueryHandlers, ReplyTarget, ReplyWriter};

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
