//! Observability: W3C trace context carried in the CloudEvents `traceparent`/`tracestate`
//! extensions ([`TraceContext`]), the names of the `tracing` spans the library opens, and the
//! names of the metrics it records through the [`metrics`] facade.
//!
//! The library does not depend on OpenTelemetry. Each span it opens (publish, request, reply,
//! handle) carries `trace_id`, `span_id` and `parent_span_id` fields of its own W3C trace
//! context: a publish or request made inside a handler continues the handler's trace, and a
//! handler continues the trace of the event it handles (its `parent_span_id` is the
//! publisher's `span_id`). An exporter can rebuild the cross-service tree from those fields;
//! a service that already runs an OpenTelemetry propagator can set `traceparent` on the event
//! itself and the library keeps it. See `docs/observability.md`.
//!
//! Metrics go through the [`metrics`] facade: without an installed recorder every call is a
//! no-op. Install the recorder before listeners handle their first message: per-type handles
//! are registered once, at the first message of each type.
//!
//! # Examples
//!
//! ```
//! use ce_messaging::telemetry::TraceContext;
//!
//! let ctx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None).unwrap();
//! assert_eq!(ctx.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! let child = ctx.child();
//! assert_eq!(child.trace_id(), ctx.trace_id());
//! assert_ne!(child.span_id(), ctx.span_id());
//! ```

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, OnceLock};

use cloudevents::event::ExtensionValue;
use cloudevents::Event;

/// The CloudEvents distributed-tracing extension that carries the W3C `traceparent`.
pub const TRACEPARENT_EXTENSION: &str = "traceparent";
/// The CloudEvents distributed-tracing extension that carries the W3C `tracestate`.
pub const TRACESTATE_EXTENSION: &str = "tracestate";

/// Span names the library opens (all at `INFO` level, target `ce_messaging::...`).
pub mod spans {
    /// One [`publish`](crate::events::EventConnection::publish) (fields `event.id`,
    /// `event.type`, `transaction_id`, trace ids, `outcome` = `stored` | `duplicate` |
    /// `error`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::telemetry::spans::PUBLISH, "publish");
    /// ```
    pub const PUBLISH: &str = "publish";
    /// One pipelined [`publish_all`](crate::events::EventConnection::publish_all) (field
    /// `count`); each event gets a trace context of its own.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::telemetry::spans::PUBLISH_ALL, "publish_all");
    /// ```
    pub const PUBLISH_ALL: &str = "publish_all";
    /// Handling one delivered event (fields `event.id`, `event.type`, `transaction_id`,
    /// `delivered`, trace ids, `outcome` = `ack` | `nak` | `dead-letter` | `abandoned` |
    /// `requeued`, `reason` for a dead letter).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::telemetry::spans::HANDLE_EVENT, "handle_event");
    /// ```
    pub const HANDLE_EVENT: &str = "handle_event";
    /// Serving one query (fields `event.id`, `event.type` (the op), `transaction_id`, trace
    /// ids, `code` = the reply's status: 200 or the error code).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::telemetry::spans::HANDLE_QUERY, "handle_query");
    /// ```
    pub const HANDLE_QUERY: &str = "handle_query";
    /// One query sent and its reply awaited (fields `event.id`, `event.type`,
    /// `transaction_id`, trace ids, `outcome` = `ok` or the error kind).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::telemetry::spans::REQUEST, "request");
    /// ```
    pub const REQUEST: &str = "request";
    /// One reply sent by a query handler (fields `event.id`, `event.type`, `code`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::telemetry::spans::REPLY, "reply");
    /// ```
    pub const REPLY: &str = "reply";
}

/// Metric names the library records through the [`metrics`] facade.
pub mod metric_names {
    /// Counter: events stored by the server (label `type`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::metric_names::PUBLISHED.ends_with("_total"));
    /// ```
    pub const PUBLISHED: &str = "ce_messaging_events_published_total";
    /// Counter: publishes the server reported as duplicates (label `type`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::metric_names::DUPLICATES.ends_with("_total"));
    /// ```
    pub const DUPLICATES: &str = "ce_messaging_events_duplicates_total";
    /// Counter: publishes that failed (labels `type`, `kind`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::metric_names::PUBLISH_ERRORS.ends_with("_total"));
    /// ```
    pub const PUBLISH_ERRORS: &str = "ce_messaging_events_publish_errors_total";
    /// Counter: events delivered to a listener and decoded (label `type`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::metric_names::DELIVERED.ends_with("_total"));
    /// ```
    pub const DELIVERED: &str = "ce_messaging_events_delivered_total";
    /// Counter: events acked after their handler succeeded (label `type`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::metric_names::ACKED.ends_with("_total"));
    /// ```
    pub const ACKED: &str = "ce_messaging_events_acked_total";
    /// Counter: events nak'ed for redelivery (label `type`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::metric_names::NACKED.ends_with("_total"));
    /// ```
    pub const NACKED: &str = "ce_messaging_events_nacked_total";
    /// Counter: events sent to the dead-letter stream (labels `type` (`undecodable` when the
    /// event could not be decoded), `reason`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::metric_names::DEAD_LETTERED.ends_with("_total"));
    /// ```
    pub const DEAD_LETTERED: &str = "ce_messaging_events_dead_lettered_total";
    /// Counter: dead-letter publishes that failed for a reason other than size (no dead-letter
    /// stream, a timeout, a lost connection); the event was nak'ed with a growing delay and is
    /// offered again (label `reason`, the dead-letter reason).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::metric_names::DEAD_LETTER_FAILURES.ends_with("_total"));
    /// ```
    pub const DEAD_LETTER_FAILURES: &str = "ce_messaging_events_dead_letter_failures_total";
    /// Histogram, seconds: how long handlers ran (labels `type`, `kind` = `event` | `query`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::metric_names::HANDLER_DURATION.ends_with("_seconds"));
    /// ```
    pub const HANDLER_DURATION: &str = "ce_messaging_handler_duration_seconds";
    /// Counter: queries served (labels `type` (the op), `code`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::metric_names::QUERIES_HANDLED.ends_with("_total"));
    /// ```
    pub const QUERIES_HANDLED: &str = "ce_messaging_queries_handled_total";
    /// Histogram, seconds: from sending a query to its reply or error (labels `type` (the
    /// op), `outcome`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::metric_names::REQUEST_DURATION.ends_with("_seconds"));
    /// ```
    pub const REQUEST_DURATION: &str = "ce_messaging_request_duration_seconds";
    /// Counter: queries a listener did not run a handler for (labels `type` (the subject),
    /// `reason` = `busy`: answered 503 because every worker and queue slot was taken, or
    /// `expired`: dropped because its requester's `Request-Timeout-Ms` ran out before a worker
    /// took it).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::metric_names::QUERIES_SHED.ends_with("_total"));
    /// ```
    pub const QUERIES_SHED: &str = "ce_messaging_queries_shed_total";
}

/// A W3C trace id (16 bytes, printed as 32 lowercase hex digits). Never all zeros.
///
/// # Examples
///
/// ```
/// use ce_messaging::telemetry::TraceContext;
/// let ctx = TraceContext::new_root();
/// assert_eq!(ctx.trace_id().to_string().len(), 32);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(u128);

impl TraceId {
    /// The id as a number.
    ///
    /// # Examples
    ///
    /// ```
    /// let ctx = ce_messaging::telemetry::TraceContext::new_root();
    /// assert_ne!(ctx.trace_id().as_u128(), 0);
    /// ```
    pub fn as_u128(self) -> u128 {
        self.0
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

/// A W3C span (parent) id (8 bytes, printed as 16 lowercase hex digits). Never all zeros.
///
/// # Examples
///
/// ```
/// use ce_messaging::telemetry::TraceContext;
/// let ctx = TraceContext::new_root();
/// assert_eq!(ctx.span_id().to_string().len(), 16);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(u64);

impl SpanId {
    /// The id as a number.
    ///
    /// # Examples
    ///
    /// ```
    /// let ctx = ce_messaging::telemetry::TraceContext::new_root();
    /// assert_ne!(ctx.span_id().as_u64(), 0);
    /// ```
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpanId({self})")
    }
}

/// The W3C trace context of one hop: trace id, the id of this hop's span, the id of the
/// span it continues (if any), trace flags and the vendor `tracestate`.
///
/// # Examples
///
/// ```
/// use ce_messaging::telemetry::TraceContext;
///
/// let root = TraceContext::new_root();
/// let hop = root.child();
/// assert_eq!(hop.trace_id(), root.trace_id());
/// assert_eq!(hop.parent_span_id(), Some(root.span_id()));
/// let parsed = TraceContext::parse(&hop.traceparent(), None).unwrap();
/// assert_eq!(parsed.span_id(), hop.span_id());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: TraceId,
    span_id: SpanId,
    parent_span_id: Option<SpanId>,
    flags: u8,
    tracestate: Option<Arc<str>>,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("trace_id", &self.trace_id)
            .field("span_id", &self.span_id)
            .field("parent_span_id", &self.parent_span_id)
            .field("flags", &self.flags)
            .finish()
    }
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// The `sampled` trace flag.
const SAMPLED: u8 = 0x01;

impl TraceContext {
    /// A new trace: fresh random trace and span ids, sampled, no parent.
    ///
    /// # Examples
    ///
    /// ```
    /// let a = ce_messaging::telemetry::TraceContext::new_root();
    /// let b = ce_messaging::telemetry::TraceContext::new_root();
    /// assert_ne!(a.trace_id(), b.trace_id());
    /// assert!(a.parent_span_id().is_none());
    /// ```
    pub fn new_root() -> Self {
        let trace_id = loop {
            let id = (u128::from(random_u64()) << 64) | u128::from(random_u64());
            if id != 0 {
                break id;
            }
        };
        TraceContext {
            trace_id: TraceId(trace_id),
            span_id: new_span_id(),
            parent_span_id: None,
            flags: SAMPLED,
            tracestate: None,
        }
    }

    /// The next hop of this trace: same trace id, flags and tracestate, a fresh span id, and
    /// this context's span id as parent.
    ///
    /// # Examples
    ///
    /// ```
    /// let root = ce_messaging::telemetry::TraceContext::new_root();
    /// assert_eq!(root.child().parent_span_id(), Some(root.span_id()));
    /// ```
    pub fn child(&self) -> Self {
        TraceContext {
            trace_id: self.trace_id,
            span_id: new_span_id(),
            parent_span_id: Some(self.span_id),
            flags: self.flags,
            tracestate: self.tracestate.clone(),
        }
    }

    /// Parses a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`; later versions may add
    /// fields after a `-`), with an optional `tracestate` kept as is. `None` when it is not
    /// valid (all-zero ids, version `ff`, wrong lengths, upper-case or non-hex digits).
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::telemetry::TraceContext;
    /// assert!(TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Some("k=v")).is_some());
    /// assert!(TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None).is_none());
    /// ```
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let tp = traceparent.trim();
        if tp.len() < 55 || !tp.is_ascii() {
            return None;
        }
        let version = hex_value(&tp[0..2])?;
        if version == 0xff || (version == 0 && tp.len() != 55) {
            return None;
        }
        if version != 0 && tp.len() > 55 && tp.as_bytes()[55] != b'-' {
            return None;
        }
        let bytes = tp.as_bytes();
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let trace_id = hex_value(&tp[3..35])?;
        let span_id = u64::try_from(hex_value(&tp[36..52])?).ok()?;
        let flags = u8::try_from(hex_value(&tp[53..55])?).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(TraceContext {
            trace_id: TraceId(trace_id),
            span_id: SpanId(span_id),
            parent_span_id: None,
            flags,
            tracestate: tracestate
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Arc::from),
        })
    }

    /// The trace context an event carries in its `traceparent`/`tracestate` extensions.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::telemetry::TraceContext;
    /// let mut event = ce_messaging::event::new_event("t", "s", &1).unwrap();
    /// assert!(TraceContext::from_event(&event).is_none());
    /// let ctx = TraceContext::new_root();
    /// ctx.inject(&mut event);
    /// assert_eq!(TraceContext::from_event(&event).unwrap().trace_id(), ctx.trace_id());
    /// ```
    pub fn from_event(event: &Event) -> Option<Self> {
        let traceparent = extension_str(event, TRACEPARENT_EXTENSION)?;
        Self::parse(traceparent, extension_str(event, TRACESTATE_EXTENSION))
    }

    /// Writes this context into the event's `traceparent` (and `tracestate`, when there is
    /// one) extensions.
    ///
    /// # Examples
    ///
    /// ```
    /// use cloudevents::AttributesReader;
    /// let mut event = ce_messaging::event::new_event("t", "s", &1).unwrap();
    /// ce_messaging::telemetry::TraceContext::new_root().inject(&mut event);
    /// assert!(event.extension("traceparent").is_some());
    /// ```
    pub fn inject(&self, event: &mut Event) {
        event.set_extension(TRACEPARENT_EXTENSION, self.traceparent());
        if let Some(state) = &self.tracestate {
            event.set_extension(TRACESTATE_EXTENSION, state.as_ref());
        }
    }

    /// The W3C `traceparent` of this context (version `00`).
    ///
    /// # Examples
    ///
    /// ```
    /// let tp = ce_messaging::telemetry::TraceContext::new_root().traceparent();
    /// assert!(tp.starts_with("00-") && tp.ends_with("-01") && tp.len() == 55);
    /// ```
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
    }

    /// The trace id.
    ///
    /// # Examples
    ///
    /// ```
    /// let ctx = ce_messaging::telemetry::TraceContext::new_root();
    /// assert_eq!(ctx.child().trace_id(), ctx.trace_id());
    /// ```
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The id of this hop's span (what goes into `traceparent` for the next hop).
    ///
    /// # Examples
    ///
    /// ```
    /// let ctx = ce_messaging::telemetry::TraceContext::new_root();
    /// assert_ne!(ctx.child().span_id(), ctx.span_id());
    /// ```
    pub fn span_id(&self) -> SpanId {
        self.span_id
    }

    /// The span this hop continues, if it is not a root.
    ///
    /// # Examples
    ///
    /// ```
    /// let ctx = ce_messaging::telemetry::TraceContext::new_root();
    /// assert!(ctx.parent_span_id().is_none());
    /// ```
    pub fn parent_span_id(&self) -> Option<SpanId> {
        self.parent_span_id
    }

    /// Whether the `sampled` flag is set.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::TraceContext::new_root().sampled());
    /// ```
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The vendor `tracestate`, carried unchanged.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::telemetry::TraceContext;
    /// let ctx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Some("k=v")).unwrap();
    /// assert_eq!(ctx.child().tracestate(), Some("k=v"));
    /// ```
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace context of the handler (or [`scope`](Self::scope)) this task runs in, if any.
    /// Publishes and requests made there continue this trace.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use ce_messaging::telemetry::TraceContext;
    /// assert!(TraceContext::current().is_none());
    /// let ctx = TraceContext::new_root();
    /// let seen = ctx.clone().scope(async { TraceContext::current() }).await;
    /// assert_eq!(seen, Some(ctx));
    /// # }
    /// ```
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `fut` with this context as [`current`](Self::current), e.g. to continue a trace
    /// that arrived over another protocol, or inside a task a handler spawned.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use ce_messaging::telemetry::TraceContext;
    /// let ctx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None).unwrap();
    /// ctx.scope(async {
    ///     assert_eq!(TraceContext::current().unwrap().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    /// }).await;
    /// # }
    /// ```
    pub fn scope<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, fut)
    }
}

fn extension_str<'a>(event: &'a Event, name: &str) -> Option<&'a str> {
    match event.extension(name)? {
        ExtensionValue::String(s) => Some(s.as_str()),
        _ => None,
    }
}

/// Lower-case hex only (as W3C requires), at most 32 digits.
fn hex_value(s: &str) -> Option<u128> {
    if s.is_empty()
        || s.len() > 32
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

fn new_span_id() -> SpanId {
    loop {
        let id = random_u64();
        if id != 0 {
            return SpanId(id);
        }
    }
}

/// Random ids without a dependency: a per-thread splitmix64 sequence seeded from the
/// standard library's randomly keyed SipHash (seeded by the OS once per thread).
fn random_u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default(),
            );
            hasher.finish()
        });
    }
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// The trace context of an outgoing event (publish, request, reply), written into it: the
/// event's own `traceparent` when it has a valid one (a caller's propagator set it), else the
/// next hop of the current handler's trace, else a new trace when `start_new` (a subscriber
/// records the operation's span). `None`, and the event untouched, otherwise.
pub(crate) fn outgoing(event: &mut Event, start_new: bool) -> Option<TraceContext> {
    if let Some(own) = TraceContext::from_event(event) {
        return Some(own);
    }
    let ctx = match TraceContext::current() {
        Some(parent) => parent.child(),
        None if start_new => TraceContext::new_root(),
        None => return None,
    };
    ctx.inject(event);
    Some(ctx)
}

/// [`outgoing`] for a batch published from one task: the current trace context is looked up
/// once, and when there is none and no new trace is to be started, no event is touched (nor
/// looked at).
pub(crate) fn outgoing_all(events: &mut [Event], start_new: bool) {
    let current = TraceContext::current();
    if current.is_none() && !start_new {
        return;
    }
    for event in events {
        if TraceContext::from_event(event).is_some() {
            continue;
        }
        let ctx = match &current {
            Some(parent) => parent.child(),
            None => TraceContext::new_root(),
        };
        ctx.inject(event);
    }
}

/// The trace context a handler of `event` runs in: the next hop of the event's trace, or a
/// new trace when `start_new` (a subscriber records the handler's span).
pub(crate) fn incoming(event: &Event, start_new: bool) -> Option<TraceContext> {
    match TraceContext::from_event(event) {
        Some(remote) => Some(remote.child()),
        None if start_new => Some(TraceContext::new_root()),
        None => None,
    }
}

/// Records an event's id, type and transaction id on `span` (fields `event.id`, `event.type`,
/// `transaction_id`), when the span is recorded at all.
pub(crate) fn record_event(span: &tracing::Span, event: &Event) {
    use crate::event::EventExt;
    use cloudevents::AttributesReader;
    if span.is_disabled() {
        return;
    }
    span.record("event.id", event.id());
    span.record("event.type", event.ty());
    if let Some(tid) = event.transaction_id() {
        span.record("transaction_id", tid.as_str());
    }
}

/// Records the trace ids of `ctx` on `span` (fields `trace_id`, `span_id`, `parent_span_id`).
pub(crate) fn record_trace(span: &tracing::Span, ctx: Option<&TraceContext>) {
    if let Some(ctx) = ctx {
        if span.is_disabled() {
            return;
        }
        span.record("trace_id", tracing::field::display(ctx.trace_id));
        span.record("span_id", tracing::field::display(ctx.span_id));
        if let Some(parent) = ctx.parent_span_id {
            span.record("parent_span_id", tracing::field::display(parent));
        }
    }
}

/// Runs `fut` in `ctx` when there is one.
pub(crate) async fn in_context<F: Future>(ctx: Option<TraceContext>, fut: F) -> F::Output {
    match ctx {
        Some(ctx) => ctx.scope(fut).await,
        None => fut.await,
    }
}

/// Metric handles of one event type on a listener, registered at its first delivery.
pub(crate) struct EventTypeMetrics {
    pub delivered: metrics::Counter,
    pub acked: metrics::Counter,
    pub nacked: metrics::Counter,
    pub handler_duration: metrics::Histogram,
    event_type: String,
}

impl EventTypeMetrics {
    pub(crate) fn register(event_type: &str) -> Self {
        let label = event_type.to_owned();
        EventTypeMetrics {
            delivered: metrics::counter!(metric_names::DELIVERED, "type" => label.clone()),
            acked: metrics::counter!(metric_names::ACKED, "type" => label.clone()),
            nacked: metrics::counter!(metric_names::NACKED, "type" => label.clone()),
            handler_duration: metrics::histogram!(metric_names::HANDLER_DURATION, "type" => label.clone(), "kind" => "event"),
            event_type: label,
        }
    }

    /// Dead letters are rare: registered when they happen.
    pub(crate) fn dead_lettered(&self, reason: &'static str) {
        metrics::counter!(metric_names::DEAD_LETTERED, "type" => self.event_type.clone(), "reason" => reason)
            .increment(1);
    }
}

/// Metric handles of one query op on a listener, registered at its first request.
pub(crate) struct QueryOpMetrics {
    pub handler_duration: metrics::Histogram,
    handled: std::sync::Mutex<HashMap<u16, metrics::Counter>>,
    op: String,
}

impl QueryOpMetrics {
    pub(crate) fn register(op: &str) -> Self {
        QueryOpMetrics {
            handler_duration: metrics::histogram!(metric_names::HANDLER_DURATION, "type" => op.to_owned(), "kind" => "query"),
            handled: std::sync::Mutex::new(HashMap::new()),
            op: op.to_owned(),
        }
    }

    /// Counts a served query by reply code (a handful of codes per op, so the map stays small).
    pub(crate) fn handled(&self, code: u16) {
        let counter = match self.handled.lock() {
            Ok(mut map) => {
                if map.len() >= 64 && !map.contains_key(&code) {
                    // Bounded: an op answering with more distinct codes is counted unlabelled.
                    None
                } else {
                    Some(
                        map.entry(code)
                            .or_insert_with(|| {
                                metrics::counter!(metric_names::QUERIES_HANDLED, "type" => self.op.clone(), "code" => code.to_string())
                            })
                            .clone(),
                    )
                }
            }
            Err(_) => None,
        };
        match counter {
            Some(counter) => counter.increment(1),
            None => metrics::counter!(metric_names::QUERIES_HANDLED, "type" => self.op.clone(), "code" => "other").increment(1),
        }
    }
}

/// A lazily registered set of metric handles, shared by the clones of a handler table.
pub(crate) type LazyMetrics<T> = Arc<OnceLock<T>>;

/// Counts a publish outcome for `event_type` (labels are registered per call: publishes of
/// any type are allowed, so there is no fixed set to register up front).
pub(crate) fn count_publish(
    event_type: String,
    result: &Result<crate::events::PublishAck, crate::events::PublishError>,
) -> &'static str {
    match result {
        Ok(ack) if ack.duplicate => {
            metrics::counter!(metric_names::DUPLICATES, "type" => event_type).increment(1);
            "duplicate"
        }
        Ok(_) => {
            metrics::counter!(metric_names::PUBLISHED, "type" => event_type).increment(1);
            "stored"
        }
        Err(err) => {
            metrics::counter!(metric_names::PUBLISH_ERRORS, "type" => event_type, "kind" => publish_kind(err.kind()))
                .increment(1);
            "error"
        }
    }
}

/// Counts the outcomes of a run of publishes of one `event_type` (a [`count_publish`] per
/// result, with one counter update per outcome instead of one per event).
pub(crate) fn count_publishes(
    event_type: &str,
    results: &[Result<crate::events::PublishAck, crate::events::PublishError>],
) {
    let (mut stored, mut duplicates) = (0u64, 0u64);
    let mut errors: Vec<(&'static str, u64)> = Vec::new();
    for result in results {
        match result {
            Ok(ack) if ack.duplicate => duplicates += 1,
            Ok(_) => stored += 1,
            Err(err) => {
                let kind = publish_kind(err.kind());
                match errors.iter_mut().find(|(k, _)| *k == kind) {
                    Some((_, n)) => *n += 1,
                    None => errors.push((kind, 1)),
                }
            }
        }
    }
    if stored > 0 {
        metrics::counter!(metric_names::PUBLISHED, "type" => event_type.to_owned())
            .increment(stored);
    }
    if duplicates > 0 {
        metrics::counter!(metric_names::DUPLICATES, "type" => event_type.to_owned())
            .increment(duplicates);
    }
    for (kind, n) in errors {
        metrics::counter!(metric_names::PUBLISH_ERRORS, "type" => event_type.to_owned(), "kind" => kind)
            .increment(n);
    }
}

fn publish_kind(kind: crate::error::PublishErrorKind) -> &'static str {
    use crate::error::PublishErrorKind as K;
    match kind {
        K::TimedOut => "timed-out",
        K::StreamNotFound => "stream-not-found",
        K::TooLarge => "too-large",
        K::Encode => "encode",
        K::ConnectionClosed => "connection-closed",
        _ => "other",
    }
}

#[cfg(test)]
#[path = "../../integration/capture.rs"]
pub(crate) mod capture;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_invalid_values() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(tp, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(ctx.traceparent(), tp);
        assert!(ctx.sampled());
        assert_eq!(ctx.tracestate(), Some("congo=t61rcWkgMzE"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad:?} accepted");
        }
        // A later version may append fields.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what";
        let ctx = TraceContext::parse(future, None).unwrap();
        assert!(!ctx.sampled());
    }

    #[test]
    fn ids_are_distinct_and_never_zero() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let ctx = TraceContext::new_root();
            assert_ne!(ctx.trace_id().as_u128(), 0);
            assert!(seen.insert(ctx.span_id()), "span id repeated");
        }
    }

    #[tokio::test]
    async fn outgoing_keeps_an_own_traceparent_continues_the_current_trace_or_stays_silent() {
        let mut event = crate::event::new_event("t", "s", &1).unwrap();
        assert!(outgoing(&mut event, false).is_none());
        assert!(event.extension(TRACEPARENT_EXTENSION).is_none());

        let parent = TraceContext::new_root();
        let ctx = parent
            .clone()
            .scope(async { outgoing(&mut event, false) })
            .await
            .unwrap();
        assert_eq!(ctx.trace_id(), parent.trace_id());
        assert_eq!(ctx.parent_span_id(), Some(parent.span_id()));
        assert_eq!(
            TraceContext::from_event(&event),
            Some(ctx.clone()).map(|c| {
                TraceContext {
                    parent_span_id: None,
                    ..c
                }
            })
        );

        // The event already has one: kept, even inside another trace.
        let again = TraceContext::new_root()
            .scope(async { outgoing(&mut event, true) })
            .await
            .unwrap();
        assert_eq!(again.trace_id(), parent.trace_id());

        let mut fresh = crate::event::new_event("t", "s", &1).unwrap();
        let root = outgoing(&mut fresh, true).unwrap();
        assert!(root.parent_span_id().is_none());
    }

    #[test]
    fn incoming_makes_the_handler_a_child_of_the_remote_span() {
        let mut event = crate::event::new_event("t", "s", &1).unwrap();
        assert!(incoming(&event, false).is_none());
        let remote = TraceContext::new_root();
        remote.inject(&mut event);
        let local = incoming(&event, false).unwrap();
        assert_eq!(local.trace_id(), remote.trace_id());
        assert_eq!(local.parent_span_id(), Some(remote.span_id()));
        assert_ne!(local.span_id(), remote.span_id());
    }

    /// A global subscriber that records nothing but keeps every callsite's cached interest at
    /// "sometimes", so a thread's own capture (`set_default`) always gets asked.
    ///
    /// Without it, run beside the memory backend's tests (other threads, no subscriber), the
    /// span-capture test below saw the `publish` callsite cached as "never" every time, and in
    /// about 1 of 10 full `--lib` runs. Suspected cause: tracing-core computes a callsite's
    /// interest from the registering thread's own default alone while only one dispatcher is
    /// registered, so another thread with none could cache "never" for everybody. With this
    /// one registered for good there are always at least two, and every answer counts.
    struct KeepInterested;

    impl tracing::Subscriber for KeepInterested {
        fn register_callsite(
            &self,
            _: &'static tracing::Metadata<'static>,
        ) -> tracing::subscriber::Interest {
            tracing::subscriber::Interest::sometimes()
        }
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            false
        }
        fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
            Some(tracing::level_filters::LevelFilter::TRACE)
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {}
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// Installs [`KeepInterested`] as the global default once per test process.
    fn keep_callsites_interested() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // Nothing else in the unit tests sets a global default; if something did, its
            // dispatcher would stay registered for good too, which is all this needs.
            let _ = tracing::subscriber::set_global_default(KeepInterested);
        });
    }

    /// Polls `cond` (yielding to the runtime in between) until it holds, for at most 5 s.
    async fn until(mut cond: impl FnMut() -> bool) {
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !cond() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("condition not met within 5 s");
    }

    fn span_of(spans: &capture::SpanCapture, name: &str, event_id: &str) -> capture::CapturedSpan {
        spans
            .spans_named(name)
            .into_iter()
            .find(|s| s.field("event.id") == Some(event_id))
            .unwrap_or_else(|| panic!("no {name} span for event {event_id}"))
    }

    #[test]
    fn a_handlers_span_has_the_publishers_trace_id_on_the_memory_backend() {
        use crate::events::{event_handler_fn, EventConnection, EventHandlers, EventListenOptions};
        use cloudevents::AttributesReader;

        let spans = capture::SpanCapture::new();
        let recorder = capture::MetricsCapture::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        keep_callsites_interested();
        let _tracing = tracing::subscriber::set_default(spans.clone());
        let _metrics = metrics::set_default_local_recorder(&recorder);
        let (event_id, handler_ctx, reply_id) = rt.block_on(async {
            let broker = crate::MemoryBroker::new();
            let events = broker.event_connection(&crate::config::Config::default());
            events.init_stream().await.unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::channel(4);
            let handlers = EventHandlers::new().on(
                "org.example.traced",
                event_handler_fn(move |_event, responses| {
                    let tx = tx.clone();
                    async move {
                        let ctx = TraceContext::current();
                        let ack = responses
                            .respond_data("org.example.traced.done", &2)
                            .await?;
                        let _ = ack;
                        tx.send(ctx).await.ok();
                        Ok(())
                    }
                }),
            );
            let listener = events
                .listen(handlers, EventListenOptions::default())
                .await
                .unwrap();
            let event = crate::event::new_event("org.example.traced", "test", &1).unwrap();
            let event_id = event.id().to_owned();
            events.publish(event).await.unwrap();
            let handler_ctx = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .expect("handler not called within 5 s")
                .expect("channel closed");
            until(|| {
                spans
                    .spans_named("handle_event")
                    .iter()
                    .any(|s| s.field("outcome") == Some("ack"))
            })
            .await;
            listener.stop(std::time::Duration::from_secs(5)).await;
            let reply_id = spans
                .spans_named("publish")
                .into_iter()
                .find(|s| s.field("event.type") == Some("org.example.traced.done"))
                .and_then(|s| s.field("event.id").map(str::to_owned))
                .expect("no publish span for the response");
            (event_id, handler_ctx, reply_id)
        });

        let publish = span_of(&spans, "publish", &event_id);
        let handle = span_of(&spans, "handle_event", &event_id);
        let trace_id = publish
            .field("trace_id")
            .expect("publish span has a trace id");
        assert_eq!(trace_id.len(), 32);
        assert_eq!(
            handle.field("trace_id"),
            Some(trace_id),
            "handler continues the publisher's trace"
        );
        assert_eq!(handle.field("parent_span_id"), publish.field("span_id"));
        assert_ne!(handle.field("span_id"), publish.field("span_id"));
        assert_eq!(handle.field("event.type"), Some("org.example.traced"));
        assert_eq!(handle.field("outcome"), Some("ack"));
        assert_eq!(publish.field("outcome"), Some("stored"));
        let handler_ctx = handler_ctx.expect("the handler runs in a trace context");
        assert_eq!(handler_ctx.trace_id().to_string(), trace_id);
        assert_eq!(
            Some(handler_ctx.span_id().to_string().as_str()),
            handle.field("span_id")
        );

        // The handler's response continues the trace as a child of the handler's span.
        let response = span_of(&spans, "publish", &reply_id);
        assert_eq!(response.field("trace_id"), Some(trace_id));
        assert_eq!(response.field("parent_span_id"), handle.field("span_id"));

        let by_type = [("type", "org.example.traced")];
        assert_eq!(
            recorder.counter(metric_names::PUBLISHED, &by_type),
            1,
            "{:?}",
            recorder.names()
        );
        assert_eq!(recorder.counter(metric_names::DELIVERED, &by_type), 1);
        assert_eq!(recorder.counter(metric_names::ACKED, &by_type), 1);
        assert_eq!(recorder.counter(metric_names::NACKED, &by_type), 0);
        assert_eq!(
            recorder.histogram_count(
                metric_names::HANDLER_DURATION,
                &[("type", "org.example.traced"), ("kind", "event")]
            ),
            1
        );
        assert_eq!(
            recorder.counter(
                metric_names::PUBLISHED,
                &[("type", "org.example.traced.done")]
            ),
            1
        );
    }

    #[test]
    fn without_a_subscriber_nothing_is_injected() {
        use crate::events::EventConnection;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::new());
        let stored = rt.block_on(async {
            let broker = crate::MemoryBroker::new();
            let events = broker.event_connection(&crate::config::Config::default());
            events.init_stream().await.unwrap();
            let event = crate::event::new_event("org.example.quiet", "test", &1).unwrap();
            events.publish(event).await.unwrap();
            // Inside a trace (a handler's), the context is carried even without a subscriber.
            let parent = TraceContext::new_root();
            let event = crate::event::new_event("org.example.quiet", "test", &2).unwrap();
            parent.clone().scope(events.publish(event)).await.unwrap();
            (broker.stream_messages("CLOUDEVENTS").unwrap(), parent)
        });
        let (messages, parent) = stored;
        assert_eq!(messages.len(), 2);
        let first = crate::codec::decode(Some(&messages[0].headers), &messages[0].payload).unwrap();
        assert!(
            first.extension(TRACEPARENT_EXTENSION).is_none(),
            "nothing injected without a subscriber"
        );
        let second =
            crate::codec::decode(Some(&messages[1].headers), &messages[1].payload).unwrap();
        let carried = TraceContext::from_event(&second).expect("traceparent carried");
        assert_eq!(carried.trace_id(), parent.trace_id());
        assert_ne!(carried.span_id(), parent.span_id());
    }

    #[test]
    fn publish_all_counts_each_type_and_outcome_and_carries_the_trace_like_publish() {
        use crate::events::EventConnection;
        use cloudevents::AttributesReader;

        let recorder = capture::MetricsCapture::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _metrics = metrics::set_default_local_recorder(&recorder);
        let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::new());
        let event = |ty: &str, n: u32| crate::event::new_event(ty, "test", &n).unwrap();
        let (messages, parent, own) = rt.block_on(async {
            let broker = crate::MemoryBroker::new();
            let events = broker.event_connection(&crate::config::Config::default());
            events.init_stream().await.unwrap();
            let a1 = event("org.example.a", 1);
            let batch = vec![
                a1.clone(),
                event("org.example.a", 2),
                event("org.example.b", 3),
                a1,
                event("org.example.a", 4),
            ];
            let results = events.publish_all(batch).await;
            let duplicates: Vec<bool> = results
                .iter()
                .map(|r| r.as_ref().unwrap().duplicate)
                .collect();
            assert_eq!(duplicates, vec![false, false, false, true, false]);
            // Inside a trace: every event of the batch continues it, except one that carries
            // its own traceparent.
            let parent = TraceContext::new_root();
            let own = TraceContext::new_root();
            let mut with_own = event("org.example.c", 6);
            own.inject(&mut with_own);
            let batch = vec![event("org.example.c", 5), with_own];
            for result in parent.clone().scope(events.publish_all(batch)).await {
                result.unwrap();
            }
            (broker.stream_messages("CLOUDEVENTS").unwrap(), parent, own)
        });
        let ty = |t: &'static str| [("type", t)];
        assert_eq!(
            recorder.counter(metric_names::PUBLISHED, &ty("org.example.a")),
            3
        );
        assert_eq!(
            recorder.counter(metric_names::DUPLICATES, &ty("org.example.a")),
            1
        );
        assert_eq!(
            recorder.counter(metric_names::PUBLISHED, &ty("org.example.b")),
            1
        );
        assert_eq!(
            recorder.counter(metric_names::DUPLICATES, &ty("org.example.b")),
            0
        );
        assert_eq!(
            recorder.counter(metric_names::PUBLISHED, &ty("org.example.c")),
            2
        );

        let decoded: Vec<Event> = messages
            .iter()
            .map(|m| crate::codec::decode(Some(&m.headers), &m.payload).unwrap())
            .collect();
        assert_eq!(decoded.len(), 6, "the duplicate is stored once");
        for untraced in &decoded[..4] {
            assert!(
                untraced.extension(TRACEPARENT_EXTENSION).is_none(),
                "nothing injected outside a trace without a subscriber ({})",
                untraced.ty()
            );
        }
        let continued = TraceContext::from_event(&decoded[4]).expect("traceparent carried");
        assert_eq!(continued.trace_id(), parent.trace_id());
        assert_ne!(
            continued.span_id(),
            parent.span_id(),
            "a child of the current span"
        );
        assert_eq!(
            TraceContext::from_event(&decoded[5]),
            Some(own),
            "its own is kept"
        );
    }

    #[test]
    fn a_query_handler_and_its_reply_continue_the_requests_trace_on_the_memory_backend() {
        use crate::query::{handler_fn, QueryConnection, QueryHandlers, QueryListenOptions};
        use cloudevents::AttributesReader;

        let spans = capture::SpanCapture::new();
        let recorder = capture::MetricsCapture::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        keep_callsites_interested();
        let _tracing = tracing::subscriber::set_default(spans.clone());
        let _metrics = metrics::set_default_local_recorder(&recorder);
        let (request_id, reply, failed) = rt.block_on(async {
            let broker = crate::MemoryBroker::new();
            let queries = broker.query_connection(&crate::config::Config::default());
            let handlers = QueryHandlers::new()
                .on(
                    "org.example.traced.get",
                    handler_fn(|_request, reply| async move {
                        reply.reply_data("org.example.traced.got", &7).await?;
                        Ok(())
                    }),
                )
                .on(
                    "org.example.traced.fail",
                    handler_fn(|_request, _reply| async move {
                        Err(crate::handler::HandlerError::new("nope").with_code(409))
                    }),
                );
            let listener = queries
                .listen(handlers, QueryListenOptions::default())
                .await
                .unwrap();
            let request = crate::event::new_event("org.example.traced.get", "test", &1).unwrap();
            let request_id = request.id().to_owned();
            let reply = queries.request(request).await.unwrap();
            let failing = crate::event::new_event("org.example.traced.fail", "test", &1).unwrap();
            let failed = queries.request(failing).await.unwrap_err();
            listener.stop(std::time::Duration::from_secs(5)).await;
            (request_id, reply, failed)
        });
        assert_eq!(failed.kind(), crate::error::RequestErrorKind::Remote);

        let request = span_of(&spans, "request", &request_id);
        let handle = span_of(&spans, "handle_query", &request_id);
        let trace_id = request
            .field("trace_id")
            .expect("request span has a trace id");
        assert_eq!(handle.field("trace_id"), Some(trace_id));
        assert_eq!(handle.field("parent_span_id"), request.field("span_id"));
        assert_eq!(handle.field("code"), Some("200"));
        assert_eq!(request.field("outcome"), Some("ok"));
        let reply_ctx = TraceContext::from_event(&reply).expect("the reply carries the trace");
        assert_eq!(reply_ctx.trace_id().to_string(), trace_id);
        let reply_span = span_of(&spans, "reply", reply.id());
        assert_eq!(reply_span.field("code"), Some("200"));

        let get = [("type", "org.example.traced.get")];
        assert_eq!(
            recorder.histogram_count(metric_names::REQUEST_DURATION, &[get[0], ("outcome", "ok")]),
            1,
            "{:?}",
            recorder.names()
        );
        assert_eq!(
            recorder.counter(metric_names::QUERIES_HANDLED, &[get[0], ("code", "200")]),
            1
        );
        assert_eq!(
            recorder.histogram_count(metric_names::HANDLER_DURATION, &[get[0], ("kind", "query")]),
            1
        );
        let fail = ("type", "org.example.traced.fail");
        assert_eq!(
            recorder.counter(metric_names::QUERIES_HANDLED, &[fail, ("code", "409")]),
            1
        );
        assert_eq!(
            recorder.histogram_count(
                metric_names::REQUEST_DURATION,
                &[fail, ("outcome", "remote-error")]
            ),
            1
        );
    }
}
