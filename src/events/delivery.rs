//! The delivery engine every backend shares: what happens to a delivered event (ack, nak
//! with back-off, in-progress while a handler runs long, dead letter before term), the
//! listener's worker pool over its delivery window, and the dead-letter record.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;

use crate::codec::{self, HeaderMap};
use crate::error::BoxError;
use crate::event::EventExt;
use crate::handler::{call_handler, start_handler, HandlerError};
use crate::headers::{
    text_value, wire_size, DEAD_LETTER_DELIVERIES, DEAD_LETTER_ERROR, DEAD_LETTER_PAYLOAD,
    DEAD_LETTER_REASON, DEAD_LETTER_SIZE, DEAD_LETTER_STREAM, DEAD_LETTER_STREAM_SEQ,
    DEAD_LETTER_SUBJECT, NATS_MSG_ID,
};
use crate::telemetry::{self, EventTypeMetrics};
use crate::worker::{Hold, Outcome, WorkContext};

use super::{Acker, Backoff, EventConnection, EventHandlers, EventResponseWriter};

/// Why an event went to the dead-letter stream (`Dead-Letter-Reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The message could not be decoded into a CloudEvent.
    Decode,
    /// A handler rejected it as permanent (or no handler exists for its type).
    Rejected,
    /// It reached the maximum number of deliveries.
    MaxDeliveries,
}

impl DeadLetterReason {
    /// The header value: `decode`, `rejected` or `max-deliveries`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "decode",
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::MaxDeliveries => "max-deliveries",
        }
    }
}

/// Why a [`DeadLetterSink`] did not store a dead letter.
#[derive(Debug)]
pub(crate) enum DeadLetterPublishError {
    /// The record is larger than the broker accepts (refused before sending, or by the
    /// dead-letter stream's message size limit): store a reference record instead.
    TooLarge(String),
    /// Anything else (no dead-letter stream, timeout, connection lost): retry later.
    Other(BoxError),
}

impl fmt::Display for DeadLetterPublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadLetterPublishError::TooLarge(detail) => write!(f, "too large: {detail}"),
            DeadLetterPublishError::Other(err) => fmt::Display::fmt(err, f),
        }
    }
}

/// Stores a dead letter and returns after the broker acknowledged it.
#[async_trait]
pub(crate) trait DeadLetterSink: Send + Sync {
    /// The events stream the dead-lettered messages were delivered from.
    fn events_stream(&self) -> &str;
    /// The durable consumer that dead-letters them.
    fn durable(&self) -> &str;
    /// The largest message (headers and payload, as on the wire) the broker accepts.
    fn max_payload(&self) -> usize;
    /// Stores one dead letter (headers complete, `Nats-Msg-Id` included).
    async fn publish_dead_letter(
        &self,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), DeadLetterPublishError>;
}

/// The longest original `Nats-Msg-Id` a dead letter's id is built from; a longer one (never
/// made by this library) gives the `<stream>.<stream seq>` form instead, so the id stays small.
pub(super) const MAX_ORIGINAL_MSG_ID: usize = 256;

/// The `Nats-Msg-Id` of the dead letter of a message with `original` id (or, without one, of
/// stream sequence `stream_seq` in `stream`) dead-lettered by `durable`: `<original>.dlq.<durable>`,
/// so one event dead-lettered by two durables gives two dead letters, while the same durable
/// dead-lettering it twice (a lost term) is de-duplicated. An original id longer than 256 bytes
/// is replaced by `<stream>.<stream seq>`.
pub(crate) fn dead_letter_msg_id(
    original: Option<&str>,
    stream: &str,
    stream_seq: &str,
    durable: &str,
) -> String {
    match original {
        Some(id) if !id.is_empty() && id.len() <= MAX_ORIGINAL_MSG_ID => {
            format!("{id}.dlq.{durable}")
        }
        _ => format!("{stream}.{stream_seq}.dlq.{durable}"),
    }
}

/// The longest `Dead-Letter-Error` value, in bytes: a longer error text (e.g. a decode error
/// quoting a huge attribute) is cut on a character boundary and says how much was left out.
pub const MAX_DEAD_LETTER_ERROR: usize = 1024;

/// `Dead-Letter-Payload` value of a reference record: the original was too large to be copied.
pub const DEAD_LETTER_PAYLOAD_OMITTED: &str = "omitted";

/// Whether a header of a dead-lettered message is dropped from its dead letter: every `Nats-*`
/// header is a directive to (or an annotation by) the server that stored the original
/// (`Nats-Expected-*`, `Nats-TTL`, `Nats-Rollup`, `Nats-Schedule*`, `Nats-Batch-*`,
/// `Nats-Incr`, ...). Sent on to the dead-letter stream, a directive would be applied there and
/// could make the server refuse the dead letter. `Nats-Msg-Id` is dropped too and replaced by
/// the dead letter's own id; `Dead-Letter-*` headers are set anew.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::is_dropped_from_dead_letters;
/// assert!(is_dropped_from_dead_letters("Nats-Expected-Last-Sequence"));
/// assert!(is_dropped_from_dead_letters("nats-ttl"));
/// assert!(!is_dropped_from_dead_letters("ce-type"));
/// assert!(!is_dropped_from_dead_letters("traceparent"));
/// ```
pub fn is_dropped_from_dead_letters(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("nats-") || lower.starts_with("dead-letter-")
}

/// `text` cut to at most [`MAX_DEAD_LETTER_ERROR`] bytes on a character boundary, saying how
/// many bytes were left out.
pub(crate) fn cap_dead_letter_error(text: &str) -> String {
    if text.len() <= MAX_DEAD_LETTER_ERROR {
        return text.to_owned();
    }
    // The note is at most 40 bytes ("... [18446744073709551615 bytes cut]").
    let mut end = MAX_DEAD_LETTER_ERROR - 40;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [{} bytes cut]", &text[..end], text.len() - end)
}

/// One delivered message, as a backend hands it to the shared processing.
pub(crate) struct Delivery {
    pub subject: String,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
    pub stream_sequence: u64,
    /// 1-based delivery count.
    pub delivered: u64,
    /// Shared with the listener's window, which keeps the delivery alive while it waits for
    /// a worker (it holds only a weak reference, so dropping the delivery still drops this).
    pub acker: Arc<dyn Acker>,
    /// The delivery's place in the listener's window, given back when it is dropped.
    pub hold: Hold,
    /// When its time-to-live passes (tokio's clock); no handler is started after that.
    pub expires: Option<tokio::time::Instant>,
}

/// What processing deliveries needs besides the delivery.
pub(crate) struct DeliveryContext {
    pub handlers: EventHandlers,
    /// Deliveries allowed before dead-lettering; <= 0 means unlimited.
    pub max_deliver: i64,
    pub ack_wait: Duration,
    /// The longest one handler run may take.
    pub handler_timeout: Duration,
    pub backoff: Backoff,
    pub dead_letters: Arc<dyn DeadLetterSink>,
    pub connection: Arc<dyn EventConnection>,
    pub source: Arc<str>,
}

/// Redelivery delays of a message whose dead-letter publish failed (no dead-letter stream, a
/// timeout, a lost connection): 5 s after the first failed delivery, doubling per delivery, at
/// most 5 min.
const DEAD_LETTER_RETRY: Backoff = Backoff {
    initial: Duration::from_secs(5),
    max: Duration::from_secs(300),
};

/// Starts a listener's workers over its delivery `window` (the queue has room for the whole
/// window, so queueing a delivery never waits) and the window's keep-alive, which sends
/// in-progress for queued deliveries every third of the ack wait. Both backends' listeners
/// start here.
pub(crate) fn start_delivery_pool(
    workers: usize,
    window: &crate::worker::DeliveryWindow,
    stopping: tokio_util::sync::CancellationToken,
    ctx: Arc<DeliveryContext>,
) -> crate::worker::WorkerPool<Delivery> {
    let keep_alive_every = ctx.ack_wait / 3;
    let pool = crate::worker::WorkerPool::start_stopping_with(
        workers,
        window.capacity(),
        stopping,
        // Run in place in the worker's task (no heap box per delivery).
        move |delivery, work| {
            let ctx = ctx.clone();
            async move { process_delivery(delivery, &ctx, &work).await }
        },
    );
    window.spawn_keep_alive(keep_alive_every, pool.context().finished.clone());
    pool
}

/// Processes one delivery per the contract. The library, not the broker, enforces
/// `max_deliver`: backends configure their consumer without a delivery limit, so a message
/// that ran out of deliveries (by failures, ack wait expiry or a listener that died holding
/// it) is always seen once more and dead-lettered (`max-deliveries`) before any handler runs,
/// never parked by the broker.
///
/// A delivery that reached a worker is always processed, also while the listener stops (the
/// window bounds how many there are); only the end of the grace period cuts it off.
pub(crate) async fn process_delivery(
    delivery: Delivery,
    ctx: &DeliveryContext,
    work: &WorkContext,
) -> Outcome {
    use tracing::field::Empty;
    let span = tracing::info_span!(
        "handle_event",
        "event.id" = Empty,
        "event.type" = Empty,
        transaction_id = Empty,
        delivered = delivery.delivered,
        trace_id = Empty,
        span_id = Empty,
        parent_span_id = Empty,
        outcome = Empty,
        reason = Empty,
    );
    if span.is_disabled() {
        // No subscriber wants the span: nothing to enter per poll, and the delivery future is
        // not moved into an `Instrumented` wrapper.
        return deliver(delivery, ctx, work, span).await.0;
    }
    let (outcome, settled) =
        tracing::Instrument::instrument(deliver(delivery, ctx, work, span.clone()), span.clone())
            .await;
    span.record("outcome", settled);
    outcome
}

/// [`process_delivery`] inside its span; also says how the delivery was settled.
async fn deliver(
    delivery: Delivery,
    ctx: &DeliveryContext,
    work: &WorkContext,
    span: tracing::Span,
) -> (Outcome, &'static str) {
    delivery.hold.start();
    if work.abort.is_cancelled() {
        // Taken by a worker as the grace period ran out: hand it back untouched (a crash
        // settles nothing).
        if !work.crashed() {
            settle(delivery.acker.nak(None).await, "nak");
        }
        return (Outcome::Abandoned, "abandoned");
    }
    let mut event = match codec::decode(delivery.headers.as_ref(), &delivery.payload) {
        Ok(event) => event,
        Err(err) => {
            tracing::warn!(subject = %delivery.subject, seq = delivery.stream_sequence, error = %err, "undecodable event");
            let settled =
                dead_letter(&delivery, ctx, DeadLetterReason::Decode, &err.to_string()).await;
            metrics::counter!(
                telemetry::metric_names::DEAD_LETTERED,
                "type" => "undecodable",
                "reason" => DeadLetterReason::Decode.as_str()
            )
            .increment(1);
            return (Outcome::Finished, settled);
        }
    };
    // Only a scheduled firing carries `Nats-Scheduler` (one pass over the few headers, where
    // two map lookups would each copy and hash a header name).
    if let Some(headers) = delivery
        .headers
        .as_ref()
        .filter(|headers| header_value(headers, super::schedule::NATS_SCHEDULER).is_some())
    {
        super::schedule::apply_firing_id(&mut event, Some(headers));
    }
    if super::schedule::expired(delivery.expires) {
        // Its time-to-live passed while it waited (for a worker or a redelivery): the
        // publisher said it is worthless now. Settled without a handler, counted, not
        // dead-lettered (the wire contract, "Scheduled and expiring events").
        tracing::debug!(event_id = %event.id(), event_type = %event.ty(), "event expired before a handler started; acked unhandled");
        metrics::counter!(telemetry::metric_names::EXPIRED, "type" => event.ty().to_owned())
            .increment(1);
        settle(delivery.acker.ack().await, "ack");
        return (Outcome::Finished, "expired");
    }
    let event_type = event.ty();
    telemetry::record_received(&span, &event);
    let trace = telemetry::incoming(&event, !span.is_disabled());
    telemetry::record_trace(&span, trace.as_ref());
    let entry = ctx.handlers.get(event_type).cloned();
    if ctx.max_deliver > 0 && delivery.delivered > ctx.max_deliver as u64 {
        let text = format!(
            "delivered {} times, max deliver is {}",
            delivery.delivered, ctx.max_deliver
        );
        let settled = dead_letter(&delivery, ctx, DeadLetterReason::MaxDeliveries, &text).await;
        match &entry {
            Some(entry) => entry
                .metrics
                .get_or_init(|| EventTypeMetrics::register(event_type))
                .dead_lettered(DeadLetterReason::MaxDeliveries.as_str()),
            None => EventTypeMetrics::register(event_type)
                .dead_lettered(DeadLetterReason::MaxDeliveries.as_str()),
        }
        return (Outcome::Finished, settled);
    }
    let Some(entry) = entry else {
        let text = format!("no handler for event type {event_type}");
        let settled = dead_letter(&delivery, ctx, DeadLetterReason::Rejected, &text).await;
        EventTypeMetrics::register(event_type).dead_lettered(DeadLetterReason::Rejected.as_str());
        return (Outcome::Finished, settled);
    };
    let metrics = entry
        .metrics
        .get_or_init(|| EventTypeMetrics::register(event_type));
    metrics.delivered.increment(1);
    let tid = event.transaction_id();
    // For the time-limit warning (the event moves into the handler); its type is the metrics'
    // label (the handler's key, the event's type), not a copy per event.
    let event_id = event.id().to_owned();
    let responses = EventResponseWriter::new(ctx.connection.clone(), tid, ctx.source.clone())
        .with_delivery_count(delivery.delivered);
    let started = std::time::Instant::now();
    let now = tokio::time::Instant::now();
    // A handler that panics while building its future fails like one whose future panics
    // (retried, then dead-lettered) instead of unwinding through the worker.
    let handling = start_handler(|| entry.handler.handle(event, responses))
        .unwrap_or_else(|err| Box::pin(std::future::ready(Err(err))));
    let handling = telemetry::in_context(trace, call_handler(handling)).fuse();
    futures::pin_mut!(handling);
    // A handler that is done at its first poll (most are) needs no timers: the in-progress
    // ticker and the time limit are made only when it has to wait. The first poll comes after
    // the abort check, as in the loop below, and the limit counts from before it.
    if work.abort.is_cancelled() {
        if !work.crashed() {
            settle(delivery.acker.nak(None).await, "nak");
        }
        return (Outcome::Abandoned, "abandoned");
    }
    let first = futures::poll!(&mut handling);
    // Tell the server we are still working well before the ack wait runs out (a third of it,
    // so a late tick on a loaded machine still comes in time).
    let tick = (ctx.ack_wait / 3).max(Duration::from_millis(20));
    let result = if let std::task::Poll::Ready(result) = first {
        result
    } else {
        let mut ticker = tokio::time::interval_at(now + tick, tick);
        let time_limit = tokio::time::sleep_until(now + ctx.handler_timeout);
        futures::pin_mut!(time_limit);
        loop {
            tokio::select! {
                biased;
                _ = work.abort.cancelled() => {
                    if !work.crashed() {
                        settle(delivery.acker.nak(None).await, "nak");
                    }
                    return (Outcome::Abandoned, "abandoned");
                }
                result = &mut handling => break result,
                _ = &mut time_limit => {
                    tracing::warn!(
                        event_type = %metrics.event_type(),
                        event_id = %event_id,
                        delivered = delivery.delivered,
                        limit = ?ctx.handler_timeout,
                        "handler exceeded its time limit; cancelled and settled as a failure"
                    );
                    break Err(HandlerError::new(format!(
                        "handler time limit {:?} exceeded",
                        ctx.handler_timeout
                    )));
                }
                _ = ticker.tick() => settle(delivery.acker.in_progress().await, "in-progress"),
            }
        }
    };
    metrics
        .handler_duration
        .record(started.elapsed().as_secs_f64());
    let settled = match result {
        Ok(()) => {
            settle(delivery.acker.ack().await, "ack");
            metrics.acked.increment(1);
            "ack"
        }
        Err(err) if err.is_permanent() => {
            let settled =
                dead_letter(&delivery, ctx, DeadLetterReason::Rejected, err.message()).await;
            metrics.dead_lettered(DeadLetterReason::Rejected.as_str());
            settled
        }
        Err(err) => {
            if ctx.max_deliver > 0 && delivery.delivered >= ctx.max_deliver as u64 {
                let settled = dead_letter(
                    &delivery,
                    ctx,
                    DeadLetterReason::MaxDeliveries,
                    err.message(),
                )
                .await;
                metrics.dead_lettered(DeadLetterReason::MaxDeliveries.as_str());
                settled
            } else {
                let delay = err
                    .retry_delay()
                    .unwrap_or_else(|| ctx.backoff.delay(delivery.delivered));
                tracing::debug!(delivered = delivery.delivered, ?delay, error = %err, "handler failed; nak");
                settle(delivery.acker.nak(Some(delay)).await, "nak");
                metrics.nacked.increment(1);
                "nak"
            }
        }
    };
    (Outcome::Finished, settled)
}

/// The first value of header `name` (exact name, as [`HeaderMap::get`] matches it), found by
/// walking the headers: a delivered message has a handful, and `get` with a `&str` copies the
/// name into a new `HeaderName` and hashes it, many times the cost of this walk.
pub(crate) fn header_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.iter().find_map(|(key, values)| {
        let key: &str = key.as_ref();
        (key == name)
            .then(|| values.first().map(|value| value.as_str()))
            .flatten()
    })
}

fn settle(result: Result<(), BoxError>, what: &str) {
    if let Err(err) = result {
        // The server redelivers after the ack wait; nothing is lost, but say so.
        tracing::warn!(error = %err, "{what} failed");
    }
}

/// A dead letter ready to be stored.
#[derive(Debug)]
pub(crate) struct DeadLetterRecord {
    pub headers: HeaderMap,
    pub payload: Bytes,
    /// A reference record: the original did not fit, only where it is was kept.
    pub reference: bool,
}

/// Builds the dead letter of `delivery`: the original payload and headers without the
/// server's directives ([`is_dropped_from_dead_letters`]), the `Dead-Letter-*` headers with the
/// error capped at [`MAX_DEAD_LETTER_ERROR`], and the dead letter's own `Nats-Msg-Id`. When
/// that would exceed `max_payload`, or `force_reference`, a reference record instead: the same
/// `Dead-Letter-*` headers plus `Dead-Letter-Payload: omitted` and `Dead-Letter-Size`, no
/// original headers, no payload.
pub(crate) fn dead_letter_record(
    delivery: &Delivery,
    reason: DeadLetterReason,
    error: &str,
    events_stream: &str,
    durable: &str,
    max_payload: usize,
    force_reference: bool,
) -> DeadLetterRecord {
    let original_id = delivery
        .headers
        .as_ref()
        .and_then(|h| h.get(NATS_MSG_ID))
        .map(|v| v.as_str().to_owned());
    let seq = delivery.stream_sequence.to_string();
    let mut own = HeaderMap::new();
    own.insert(DEAD_LETTER_REASON, reason.as_str());
    own.insert(DEAD_LETTER_ERROR, text_value(&cap_dead_letter_error(error)));
    own.insert(DEAD_LETTER_SUBJECT, text_value(&delivery.subject));
    own.insert(DEAD_LETTER_STREAM, text_value(events_stream));
    own.insert(DEAD_LETTER_STREAM_SEQ, seq.as_str());
    own.insert(
        DEAD_LETTER_DELIVERIES,
        delivery.delivered.to_string().as_str(),
    );
    let id = dead_letter_msg_id(original_id.as_deref(), events_stream, &seq, durable);
    own.insert(NATS_MSG_ID, text_value(&id));
    if !force_reference {
        let mut headers = HeaderMap::new();
        if let Some(original) = &delivery.headers {
            for (name, values) in original.iter() {
                if is_dropped_from_dead_letters(name.as_ref()) {
                    continue;
                }
                for value in values {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
        for (name, values) in own.iter() {
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
        if wire_size(&headers, delivery.payload.len()) <= max_payload {
            return DeadLetterRecord {
                headers,
                payload: delivery.payload.clone(),
                reference: false,
            };
        }
    }
    let original_size = wire_size(
        delivery.headers.as_ref().unwrap_or(&HeaderMap::new()),
        delivery.payload.len(),
    );
    own.insert(DEAD_LETTER_PAYLOAD, DEAD_LETTER_PAYLOAD_OMITTED);
    own.insert(DEAD_LETTER_SIZE, original_size.to_string().as_str());
    DeadLetterRecord {
        headers: own,
        payload: Bytes::new(),
        reference: true,
    }
}

/// Stores the dead letter of `delivery` (see [`dead_letter_record`]; a record the broker
/// refuses as too large is stored as a reference record), then terms the original. If the
/// dead-letter publish fails for another reason, the original is neither acked nor terminated:
/// it is nak'ed with a growing delay ([`DEAD_LETTER_RETRY`]), counted in
/// `ce_messaging_events_dead_letter_failures_total`, and the log says why.
pub(super) async fn dead_letter(
    delivery: &Delivery,
    ctx: &DeliveryContext,
    reason: DeadLetterReason,
    error: &str,
) -> &'static str {
    tracing::Span::current().record("reason", reason.as_str());
    let sink = &ctx.dead_letters;
    let build = |force_reference| {
        dead_letter_record(
            delivery,
            reason,
            error,
            sink.events_stream(),
            sink.durable(),
            sink.max_payload(),
            force_reference,
        )
    };
    let record = build(false);
    let mut reference = record.reference;
    let mut stored = sink
        .publish_dead_letter(record.headers, record.payload)
        .await;
    if let (Err(DeadLetterPublishError::TooLarge(detail)), false) = (&stored, reference) {
        tracing::warn!(subject = %delivery.subject, seq = delivery.stream_sequence, detail = %detail, "dead letter refused as too large; storing a reference record");
        let record = build(true);
        reference = true;
        stored = sink
            .publish_dead_letter(record.headers, record.payload)
            .await;
    }
    match stored {
        Ok(()) => {
            if reference {
                tracing::warn!(subject = %delivery.subject, seq = delivery.stream_sequence, reason = reason.as_str(), error = %cap_dead_letter_error(error), "event dead-lettered as a reference record (too large to copy; the original stays in the events stream until its limits remove it)");
            } else {
                tracing::warn!(subject = %delivery.subject, seq = delivery.stream_sequence, reason = reason.as_str(), error = %cap_dead_letter_error(error), "event dead-lettered");
            }
            settle(delivery.acker.term().await, "term");
            "dead-letter"
        }
        Err(err) => {
            let delay = DEAD_LETTER_RETRY.delay(delivery.delivered);
            metrics::counter!(
                telemetry::metric_names::DEAD_LETTER_FAILURES,
                "reason" => reason.as_str()
            )
            .increment(1);
            tracing::error!(subject = %delivery.subject, seq = delivery.stream_sequence, reason = reason.as_str(), error = %err, ?delay, "dead-letter publish failed; the event is kept and offered again after the delay");
            settle(delivery.acker.nak(Some(delay)).await, "nak");
            "nak"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_value_finds_what_header_map_get_finds() {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MSG_ID, "cloudevent-1");
        headers.insert(super::super::schedule::NATS_SCHEDULER, "_CE_SCHEDULE.S.x");
        headers.append(super::super::schedule::NATS_TTL, "5s");
        headers.append(super::super::schedule::NATS_TTL, "9s");
        headers.insert("ce-type", "org.example.a");
        for name in [
            NATS_MSG_ID,
            super::super::schedule::NATS_SCHEDULER,
            super::super::schedule::NATS_SCHEDULE_NEXT,
            super::super::schedule::NATS_TTL,
            "nats-ttl",
            "ce-type",
            "Ce-Type",
            "absent",
        ] {
            assert_eq!(
                header_value(&headers, name),
                headers.get(name).map(|v| v.as_str()),
                "{name}"
            );
        }
        assert_eq!(
            header_value(&headers, super::super::schedule::NATS_TTL),
            Some("5s")
        );
        assert_eq!(header_value(&HeaderMap::new(), NATS_MSG_ID), None);
    }
}
