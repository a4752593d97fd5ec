//! Metrics: the names the library records through the [`metrics`] facade, and the per-type
//! handles a handler table registers once.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// Metric names the library records through the [`metrics`] facade.
pub mod metric_names {
    /// Counter: events stored by the server (label `type`).
    pub const PUBLISHED: &str = "ce_messaging_events_published_total";
    /// Counter: publishes the server reported as duplicates (label `type`).
    pub const DUPLICATES: &str = "ce_messaging_events_duplicates_total";
    /// Counter: publishes that failed (labels `type`, `kind`).
    pub const PUBLISH_ERRORS: &str = "ce_messaging_events_publish_errors_total";
    /// Counter: events delivered to a listener and decoded (label `type`).
    pub const DELIVERED: &str = "ce_messaging_events_delivered_total";
    /// Counter: events acked after their handler succeeded (label `type`).
    pub const ACKED: &str = "ce_messaging_events_acked_total";
    /// Counter: events nak'ed for redelivery (label `type`).
    pub const NACKED: &str = "ce_messaging_events_nacked_total";
    /// Counter: events sent to the dead-letter stream (labels `type` (`undecodable` when the
    /// event could not be decoded), `reason`).
    pub const DEAD_LETTERED: &str = "ce_messaging_events_dead_lettered_total";
    /// Counter: dead-letter publishes that failed for a reason other than size (no dead-letter
    /// stream, a timeout, a lost connection); the event was nak'ed with a growing delay and is
    /// offered again (label `reason`, the dead-letter reason).
    pub const DEAD_LETTER_FAILURES: &str = "ce_messaging_events_dead_letter_failures_total";
    /// Counter: events whose time-to-live (`Nats-TTL`) passed before a handler started
    /// them (e.g. while they waited for a worker or a redelivery); acked without a handler
    /// run and not dead-lettered (label `type`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::telemetry::metric_names::EXPIRED.ends_with("_total"));
    /// ```
    pub const EXPIRED: &str = "ce_messaging_events_expired_total";
    /// Histogram, seconds: how long handlers ran (labels `type`, `kind` = `event` | `query`).
    pub const HANDLER_DURATION: &str = "ce_messaging_handler_duration_seconds";
    /// Counter: queries served (labels `type` (the op), `code`).
    pub const QUERIES_HANDLED: &str = "ce_messaging_queries_handled_total";
    /// Histogram, seconds: from sending a query to its reply or error (labels `type` (the
    /// op), `outcome`).
    pub const REQUEST_DURATION: &str = "ce_messaging_request_duration_seconds";
    /// Counter: queries a listener did not run a handler for (labels `type` (the subject),
    /// `reason` = `busy`: answered 503 because every worker and queue slot was taken, or
    /// `expired`: dropped because its requester's `Request-Timeout-Ms` ran out before a worker
    /// took it).
    pub const QUERIES_SHED: &str = "ce_messaging_queries_shed_total";
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
    /// The event type these handles count (their `type` label).
    pub(crate) fn event_type(&self) -> &str {
        &self.event_type
    }

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
    /// Code 200, the usual one, registered with the rest: counted without a lock or lookup.
    handled_ok: metrics::Counter,
    handled: std::sync::Mutex<HashMap<u16, metrics::Counter>>,
    op: String,
}

impl QueryOpMetrics {
    pub(crate) fn register(op: &str) -> Self {
        QueryOpMetrics {
            handler_duration: metrics::histogram!(metric_names::HANDLER_DURATION, "type" => op.to_owned(), "kind" => "query"),
            handled_ok: metrics::counter!(metric_names::QUERIES_HANDLED, "type" => op.to_owned(), "code" => "200"),
            handled: std::sync::Mutex::new(HashMap::new()),
            op: op.to_owned(),
        }
    }

    /// Counts a served query by reply code (a handful of codes per op, so the map stays small).
    pub(crate) fn handled(&self, code: u16) {
        if code == 200 {
            self.handled_ok.increment(1);
            return;
        }
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
