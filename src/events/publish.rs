//! What a publish returns ([`PublishAck`], [`PublishError`]) and what every backend's publish
//! shares: the `publish` span, the trace context put on the event, the outcome counted by type.

use std::future::Future;
use std::sync::Arc;

use cloudevents::{AttributesReader, Event};

use crate::error::PublishError;
use crate::telemetry::{self};

/// What the server said when it stored an event.
///
/// # Examples
///
/// ```
/// let ack = ce_messaging::events::PublishAck { stream: "CLOUDEVENTS".into(), sequence: 7, duplicate: false };
/// assert_eq!(ack.sequence, 7);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishAck {
    /// The stream that stored the event.
    pub stream: String,
    /// Its sequence in that stream.
    pub sequence: u64,
    /// True when the server had already stored an event with this id within the duplicate
    /// window (a retried publish): it was not stored twice.
    pub duplicate: bool,
}

/// The most types a connection remembers in its [`KnownTypes`]; publishes of further types
/// build their metric labels per publish.
const MAX_KNOWN_TYPES: usize = 64;

/// The event types a connection has published: each one's `published` counter, registered
/// once, at its first stored event (install a metrics recorder before the first publish), so
/// that a publish of a known type builds no metric labels. Few types per connection, so a
/// short list compared by string.
#[derive(Default)]
pub(crate) struct KnownTypes {
    types: std::sync::Mutex<Vec<KnownType>>,
}

/// A known type (shared: other outcomes label their metric with it) and its `published`
/// counter.
type KnownType = (Arc<str>, metrics::Counter);

impl KnownTypes {
    fn get(&self, event_type: &str) -> Option<KnownType> {
        let types = self.types.lock().ok()?;
        types
            .iter()
            .find(|(t, _)| t.as_ref() == event_type)
            .cloned()
    }

    /// The `published` counter of `event_type`, remembered when there is room.
    fn learn(&self, event_type: &Arc<str>) -> metrics::Counter {
        let counter = metrics::counter!(telemetry::metric_names::PUBLISHED, "type" => event_type.as_ref().to_owned());
        if let Ok(mut types) = self.types.lock() {
            if types.len() < MAX_KNOWN_TYPES && !types.iter().any(|(t, _)| t == event_type) {
                types.push((event_type.clone(), counter.clone()));
            }
        }
        counter
    }
}

/// One publish inside a `publish` span: the event gets its trace context (see
/// [`telemetry`]), the outcome is counted by type (`known` keeps the connection's counters).
/// Every backend's [`EventConnection::publish`] goes through here.
///
/// The span, the trace context and the metrics label are made when this is called, and
/// `publish` is called then too; the returned future holds `publish`'s future and the label,
/// not the event (an `async fn` taking the event would keep a copy of it beside the one
/// `publish`'s future holds, and the whole future is boxed once per publish).
pub(crate) fn traced_publish<'a, F, Fut>(
    mut event: Event,
    known: &'a KnownTypes,
    publish: F,
) -> impl Future<Output = Result<PublishAck, PublishError>> + 'a
where
    F: FnOnce(Event) -> Fut,
    Fut: Future<Output = Result<PublishAck, PublishError>> + 'a,
{
    use tracing::field::Empty;
    let span = tracing::info_span!(
        "publish",
        "event.id" = Empty,
        "event.type" = Empty,
        transaction_id = Empty,
        trace_id = Empty,
        span_id = Empty,
        parent_span_id = Empty,
        outcome = Empty,
    );
    let trace = telemetry::outgoing(&mut event, !span.is_disabled());
    telemetry::record_event(&span, &event);
    telemetry::record_trace(&span, trace.as_ref());
    // The metrics label; taken before the event moves into the backend.
    let (event_type, published) = match known.get(event.ty()) {
        Some((event_type, counter)) => (event_type, Some(counter)),
        None => (Arc::from(event.ty()), None),
    };
    let publishing = {
        let _entered = span.enter();
        tracing::Instrument::instrument(publish(event), span.clone())
    };
    // A `map`, not an `async` block: awaiting the captured future would move it into a
    // second slot of the block's state.
    futures::FutureExt::map(publishing, move |result| {
        let outcome = match &result {
            Ok(ack) if !ack.duplicate => {
                published
                    .unwrap_or_else(|| known.learn(&event_type))
                    .increment(1);
                "stored"
            }
            _ => count_publish(event_type.as_ref().to_owned(), &result),
        };
        span.record("outcome", outcome);
        result
    })
}

/// [`traced_publish`] for a batch: one `publish_all` span, a trace context per event, each
/// outcome counted by type.
pub(crate) async fn traced_publish_all<F, Fut>(
    mut events: Vec<Event>,
    publish_all: F,
) -> Vec<Result<PublishAck, PublishError>>
where
    F: FnOnce(Vec<Event>) -> Fut,
    Fut: Future<Output = Vec<Result<PublishAck, PublishError>>>,
{
    let span = tracing::info_span!("publish_all", count = events.len());
    telemetry::outgoing_all(&mut events, !span.is_disabled());
    // The metrics labels, one per run of consecutive events of the same type; taken before
    // the events move into the backend.
    let mut runs: Vec<(String, usize)> = Vec::new();
    for event in &events {
        match runs.last_mut() {
            Some((ty, n)) if ty.as_str() == event.ty() => *n += 1,
            _ => runs.push((event.ty().to_owned(), 1)),
        }
    }
    let results = tracing::Instrument::instrument(publish_all(events), span).await;
    let mut rest = results.as_slice();
    for (event_type, n) in runs {
        // A backend returns one result per event; `min` keeps a short answer from panicking.
        let (run, after) = rest.split_at(n.min(rest.len()));
        count_publishes(&event_type, run);
        rest = after;
    }
    results
}

/// Counts a publish outcome for `event_type` (labels are registered per call: publishes of
/// any type are allowed, so there is no fixed set to register up front).
fn count_publish(event_type: String, result: &Result<PublishAck, PublishError>) -> &'static str {
    match result {
        Ok(ack) if ack.duplicate => {
            metrics::counter!(telemetry::metric_names::DUPLICATES, "type" => event_type)
                .increment(1);
            "duplicate"
        }
        Ok(_) => {
            metrics::counter!(telemetry::metric_names::PUBLISHED, "type" => event_type)
                .increment(1);
            "stored"
        }
        Err(err) => {
            metrics::counter!(telemetry::metric_names::PUBLISH_ERRORS, "type" => event_type, "kind" => publish_kind(err.kind()))
                .increment(1);
            "error"
        }
    }
}

/// Counts the outcomes of a run of publishes of one `event_type` (a [`count_publish`] per
/// result, with one counter update per outcome instead of one per event).
fn count_publishes(event_type: &str, results: &[Result<PublishAck, PublishError>]) {
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
        metrics::counter!(telemetry::metric_names::PUBLISHED, "type" => event_type.to_owned())
            .increment(stored);
    }
    if duplicates > 0 {
        metrics::counter!(telemetry::metric_names::DUPLICATES, "type" => event_type.to_owned())
            .increment(duplicates);
    }
    for (kind, n) in errors {
        metrics::counter!(telemetry::metric_names::PUBLISH_ERRORS, "type" => event_type.to_owned(), "kind" => kind)
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
        K::InvalidSchedule => "invalid-schedule",
        K::Unsupported => "unsupported",
        _ => "other",
    }
}
