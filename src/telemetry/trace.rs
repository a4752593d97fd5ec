//! W3C trace context carried in the CloudEvents `traceparent`/`tracestate` extensions: the
//! [`TraceContext`] type, and how a publish, request or handler continues or starts a trace and
//! records it on its span.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use crate::codec::ReceivedEvent;
use cloudevents::event::ExtensionValue;
use cloudevents::Event;

/// The CloudEvents distributed-tracing extension that carries the W3C `traceparent`.
pub const TRACEPARENT_EXTENSION: &str = "traceparent";
/// The CloudEvents distributed-tracing extension that carries the W3C `tracestate`.
pub const TRACESTATE_EXTENSION: &str = "tracestate";

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
    pub(super) trace_id: TraceId,
    pub(super) span_id: SpanId,
    pub(super) parent_span_id: Option<SpanId>,
    pub(super) flags: u8,
    pub(super) tracestate: Option<Arc<str>>,
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
    /// let mut event = ce_messaging::cloudevent::new_event("t", "s", &1).unwrap();
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
    /// let mut event = ce_messaging::cloudevent::new_event("t", "s", &1).unwrap();
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

/// A string extension of `event`. Found by walking the extensions, not by a lookup: an event
/// carries a few of them, and a lookup hashes the name with SipHash (the sdk's map), which
/// costs several times a walk past two or three entries; most events asked have no trace
/// context at all.
fn extension_str<'a>(event: &'a Event, name: &str) -> Option<&'a str> {
    match event.iter_extensions().find(|(key, _)| *key == name)?.1 {
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
pub(crate) fn incoming(event: &ReceivedEvent, start_new: bool) -> Option<TraceContext> {
    let remote = event
        .string_extension(TRACEPARENT_EXTENSION)
        .and_then(|parent| {
            TraceContext::parse(parent, event.string_extension(TRACESTATE_EXTENSION))
        });
    match remote {
        Some(remote) => Some(remote.child()),
        None if start_new => Some(TraceContext::new_root()),
        None => None,
    }
}

/// [`record_event`] for a received event (read in place, nothing built).
pub(crate) fn record_received(span: &tracing::Span, event: &ReceivedEvent) {
    use crate::event::EventExt;
    record_ids(span, || (event.id(), event.ty(), event.transaction_id()));
}

/// Records an event's id, type and transaction id on `span` (fields `event.id`, `event.type`,
/// `transaction_id`), when the span is recorded at all.
pub(crate) fn record_event(span: &tracing::Span, event: &Event) {
    use crate::event::EventExt;
    use cloudevents::AttributesReader;
    record_ids(span, || (event.id(), event.ty(), event.transaction_id()));
}

/// The fields of [`record_event`], read only when the span is recorded.
fn record_ids<'e>(
    span: &tracing::Span,
    read: impl FnOnce() -> (&'e str, &'e str, Option<crate::event::TransactionId>),
) {
    if span.is_disabled() {
        return;
    }
    let (id, ty, tid) = read();
    span.record("event.id", id);
    span.record("event.type", ty);
    if let Some(tid) = tid {
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

/// Runs `fut` in `ctx` when there is one. Not an `async fn`: that would hold `fut` twice (as
/// its argument and inside the scope), and `fut` is a whole serving future.
pub(crate) fn in_context<F: Future>(
    ctx: Option<TraceContext>,
    fut: F,
) -> impl Future<Output = F::Output> {
    match ctx {
        Some(ctx) => futures::future::Either::Left(ctx.scope(fut)),
        None => futures::future::Either::Right(fut),
    }
}
