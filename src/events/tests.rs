//! Tests of the events module as a whole (handlers, options, the delivery engine).
//! (Test code only, declared `#[cfg(test)] mod tests;`: its unwrap()/expect() calls are
//! assertions, never a library path.)
#![cfg(test)]

use super::*;
use crate::headers::wire_size;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::codec::HeaderMap;
use crate::error::BoxError;
use crate::headers::{
    DEAD_LETTER_DELIVERIES, DEAD_LETTER_ERROR, DEAD_LETTER_PAYLOAD, DEAD_LETTER_REASON,
    DEAD_LETTER_SIZE, DEAD_LETTER_STREAM, DEAD_LETTER_STREAM_SEQ, DEAD_LETTER_SUBJECT, NATS_MSG_ID,
};
use crate::telemetry::{self};

#[test]
fn backoff_doubles_and_caps() {
    let b = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(50),
    };
    let delays: Vec<_> = (1..=5).map(|n| b.delay(n).as_millis()).collect();
    assert_eq!(delays, vec![10, 20, 40, 50, 50]);
    assert_eq!(b.delay(u64::MAX), Duration::from_millis(50));
}

#[test]
fn dead_letter_reasons_match_the_contract() {
    let reasons: Vec<_> = [
        DeadLetterReason::Decode,
        DeadLetterReason::Rejected,
        DeadLetterReason::MaxDeliveries,
    ]
    .iter()
    .map(|r| r.as_str())
    .collect();
    assert_eq!(reasons, vec!["decode", "rejected", "max-deliveries"]);
}

#[test]
fn listen_overrides_beyond_the_config_bounds_are_invalid_options() {
    let handlers = EventHandlers::new().on("a.b", event_handler_fn(|_, _| async { Ok(()) }));
    let too_many = EventListenOptions {
        max_deliver: Some(i64::MAX),
        ..Default::default()
    };
    let too_long = EventListenOptions {
        ack_wait: Some(Duration::from_secs(1_000_000_000_000)),
        ..Default::default()
    };
    for options in [too_many, too_long] {
        let err = options.validate(&handlers).unwrap_err();
        assert_eq!(err.kind(), crate::error::ListenErrorKind::InvalidOptions);
    }
    assert!(EventListenOptions::default().validate(&handlers).is_ok());
}

#[test]
fn query_and_event_listeners_share_one_worker_options_validation() {
    use crate::listener::WorkerOptions;
    use crate::query::{handler_fn, QueryHandlers, QueryListenOptions};
    let events = EventHandlers::new().on("a.b", event_handler_fn(|_, _| async { Ok(()) }));
    let queries = QueryHandlers::new().on("a.b", handler_fn(|_, _| async { Ok(()) }));
    let event_options = |pool| EventListenOptions {
        pool,
        ..Default::default()
    };
    let query_options = |pool| QueryListenOptions {
        pool,
        ..Default::default()
    };
    let invalid = |r: Result<(), crate::error::ListenError>| {
        r.is_err_and(|e| e.kind() == crate::error::ListenErrorKind::InvalidOptions)
    };
    // No worker: neither can run a handler.
    assert!(invalid(
        event_options(WorkerOptions::new(0, 4)).validate(&events)
    ));
    assert!(invalid(
        query_options(WorkerOptions::new(0, 4)).validate(&queries)
    ));
    // No buffer: an event listener without read-ahead is fine; a query listener needs a queue.
    assert!(event_options(WorkerOptions::new(1, 0))
        .validate(&events)
        .is_ok());
    assert!(invalid(
        query_options(WorkerOptions::new(1, 0)).validate(&queries)
    ));
    assert!(query_options(WorkerOptions::new(1, 1))
        .validate(&queries)
        .is_ok());
    // The grace period is the pool's, whatever the listener.
    let grace = Duration::from_millis(250);
    assert_eq!(WorkerOptions::new(2, 3).with_grace(grace).grace, grace);
}

/// What a fake acker was told.
#[derive(Default)]
struct Settled {
    calls: std::sync::Mutex<Vec<String>>,
}

struct FakeAcker(Arc<Settled>);

#[async_trait]
impl Acker for FakeAcker {
    async fn ack(&self) -> Result<(), BoxError> {
        self.0.calls.lock().unwrap().push("ack".into());
        Ok(())
    }
    async fn nak(&self, delay: Option<Duration>) -> Result<(), BoxError> {
        self.0.calls.lock().unwrap().push(format!("nak {delay:?}"));
        Ok(())
    }
    async fn in_progress(&self) -> Result<(), BoxError> {
        Ok(())
    }
    async fn term(&self) -> Result<(), BoxError> {
        self.0.calls.lock().unwrap().push("term".into());
        Ok(())
    }
}

/// A dead-letter sink that stores what it is given, or fails as told.
struct FakeSink {
    max_payload: usize,
    /// Refuse records larger than this as `TooLarge` (a stream's max message size).
    refuse_above: usize,
    fail: bool,
    stored: std::sync::Mutex<Vec<(HeaderMap, Bytes)>>,
}

#[async_trait]
impl DeadLetterSink for FakeSink {
    fn events_stream(&self) -> &str {
        "CE"
    }
    fn durable(&self) -> &str {
        "svc"
    }
    fn max_payload(&self) -> usize {
        self.max_payload
    }
    async fn publish_dead_letter(
        &self,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), DeadLetterPublishError> {
        if self.fail {
            return Err(DeadLetterPublishError::Other(
                "no dead-letter stream".into(),
            ));
        }
        if wire_size(&headers, payload.len()) > self.refuse_above {
            return Err(DeadLetterPublishError::TooLarge("stream limit".into()));
        }
        self.stored.lock().unwrap().push((headers, payload));
        Ok(())
    }
}

fn sink(max_payload: usize, refuse_above: usize, fail: bool) -> Arc<FakeSink> {
    Arc::new(FakeSink {
        max_payload,
        refuse_above,
        fail,
        stored: std::sync::Mutex::new(Vec::new()),
    })
}

fn poison(payload: &[u8], delivered: u64) -> (Delivery, Arc<Settled>) {
    let mut headers = HeaderMap::new();
    headers.insert("X-Kept", "yes");
    headers.insert("ce-type", "org.example.kept");
    headers.insert(NATS_MSG_ID, "evt-1");
    headers.insert("Nats-Expected-Stream", "CE");
    headers.insert("Nats-Expected-Last-Sequence", "41");
    headers.insert("Nats-TTL", "1h");
    headers.insert("Nats-Rollup", "sub");
    headers.insert("Nats-Schedule", "@every 1m");
    headers.insert("Nats-Schedule-Target", "events.x");
    headers.insert("Dead-Letter-Reason", "forged");
    let settled = Arc::new(Settled::default());
    let delivery = Delivery {
        subject: "events.org.example.kept".into(),
        headers: Some(headers),
        payload: Bytes::copy_from_slice(payload),
        stream_sequence: 42,
        delivered,
        acker: Arc::new(FakeAcker(settled.clone())),
        hold: crate::worker::Hold::detached(),
        expires: None,
    };
    (delivery, settled)
}

fn context(dead_letters: Arc<FakeSink>) -> DeliveryContext {
    let broker = crate::memory::MemoryBroker::new();
    DeliveryContext {
        handlers: EventHandlers::new(),
        max_deliver: 5,
        ack_wait: Duration::from_secs(30),
        handler_timeout: Duration::from_secs(300),
        backoff: Backoff::default(),
        dead_letters,
        connection: Arc::new(broker.event_connection(&crate::config::Config::default())),
        source: "test".into(),
    }
}

fn names(headers: &HeaderMap) -> Vec<String> {
    let mut names: Vec<String> = headers.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    names
}

#[test]
fn a_long_error_is_cut_on_a_character_boundary() {
    assert_eq!(cap_dead_letter_error("short"), "short");
    let exact = "e".repeat(MAX_DEAD_LETTER_ERROR);
    assert_eq!(cap_dead_letter_error(&exact), exact);
    // Three-byte characters: a cut at a fixed byte offset would split one.
    let long = format!("invalid attribute: {}", "€".repeat(100_000));
    let capped = cap_dead_letter_error(&long);
    assert!(capped.len() <= MAX_DEAD_LETTER_ERROR, "{}", capped.len());
    assert!(capped.starts_with("invalid attribute: €€"));
    assert!(capped.ends_with(" bytes cut]"), "{capped}");
    let cut: usize = capped
        .rsplit("... [")
        .next()
        .and_then(|n| n.strip_suffix(" bytes cut]"))
        .and_then(|n| n.parse().ok())
        .expect("says how much was cut");
    assert_eq!(capped.find("... [").unwrap() + cut, long.len());
}

#[test]
fn a_dead_letter_keeps_payload_and_user_headers_and_drops_directives() {
    let (delivery, _) = poison(b"not an event", 3);
    let error = "x".repeat(5000);
    let record = dead_letter_record(
        &delivery,
        DeadLetterReason::Decode,
        &error,
        "CE",
        "svc",
        1024 * 1024,
        false,
    );
    assert!(!record.reference);
    assert_eq!(&record.payload[..], b"not an event");
    assert_eq!(
        names(&record.headers),
        vec![
            "Dead-Letter-Deliveries",
            "Dead-Letter-Error",
            "Dead-Letter-Reason",
            "Dead-Letter-Stream",
            "Dead-Letter-Stream-Seq",
            "Dead-Letter-Subject",
            "Nats-Msg-Id",
            "X-Kept",
            "ce-type",
        ]
    );
    let get = |name| record.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(get(DEAD_LETTER_REASON).as_deref(), Some("decode"));
    assert_eq!(get(NATS_MSG_ID).as_deref(), Some("evt-1.dlq.svc"));
    assert_eq!(get(DEAD_LETTER_STREAM).as_deref(), Some("CE"));
    assert_eq!(get(DEAD_LETTER_STREAM_SEQ).as_deref(), Some("42"));
    assert_eq!(get(DEAD_LETTER_DELIVERIES).as_deref(), Some("3"));
    assert!(get(DEAD_LETTER_ERROR).unwrap().len() <= MAX_DEAD_LETTER_ERROR);
}

#[test]
fn a_dead_letter_over_max_payload_becomes_a_reference_record() {
    let payload = vec![b'x'; 4000];
    let (delivery, _) = poison(&payload, 1);
    let full = dead_letter_record(
        &delivery,
        DeadLetterReason::Rejected,
        "no",
        "CE",
        "svc",
        8192,
        false,
    );
    assert!(!full.reference, "fits in 8 KiB");
    let record = dead_letter_record(
        &delivery,
        DeadLetterReason::Rejected,
        "no",
        "CE",
        "svc",
        4096,
        false,
    );
    assert!(record.reference);
    assert!(record.payload.is_empty());
    assert!(wire_size(&record.headers, 0) <= 4096);
    let get = |name| record.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(get(DEAD_LETTER_PAYLOAD).as_deref(), Some("omitted"));
    assert_eq!(
        get(DEAD_LETTER_SIZE),
        Some(wire_size(delivery.headers.as_ref().unwrap(), payload.len()).to_string())
    );
    assert_eq!(
        get(DEAD_LETTER_SUBJECT).as_deref(),
        Some("events.org.example.kept")
    );
    assert_eq!(get(NATS_MSG_ID).as_deref(), Some("evt-1.dlq.svc"));
    assert!(
        get("X-Kept").is_none(),
        "no original headers in a reference"
    );
}

#[test]
fn a_huge_original_id_gives_the_stream_sequence_form() {
    let id = "i".repeat(MAX_ORIGINAL_MSG_ID + 1);
    assert_eq!(
        dead_letter_msg_id(Some(&id), "CE", "42", "svc"),
        "CE.42.dlq.svc"
    );
}

#[tokio::test]
async fn a_record_refused_as_too_large_is_stored_as_a_reference() {
    // The broker's max payload lets the copy through, the stream's size limit does not.
    let sink = sink(1024 * 1024, 2048, false);
    let ctx = context(sink.clone());
    let (delivery, settled) = poison(&[b'x'; 4000], 1);
    let settled_as = dead_letter(&delivery, &ctx, DeadLetterReason::Rejected, "no").await;
    assert_eq!(settled_as, "dead-letter");
    let stored = sink.stored.lock().unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].0.get(DEAD_LETTER_PAYLOAD).map(|v| v.as_str()),
        Some("omitted")
    );
    assert_eq!(*settled.calls.lock().unwrap(), vec!["term".to_string()]);
}

#[tokio::test]
async fn a_failed_dead_letter_publish_naks_with_a_growing_delay_and_is_counted() {
    let sink = sink(1024 * 1024, usize::MAX, true);
    let ctx = context(sink.clone());
    let recorder = counting::Recorder::default();
    let mut calls = Vec::new();
    for delivered in [1, 2, 3, 10] {
        let (delivery, settled) = poison(b"bad", delivered);
        let settled_as = metrics::with_local_recorder(&recorder, || {
            futures::executor::block_on(dead_letter(
                &delivery,
                &ctx,
                DeadLetterReason::Decode,
                "bad",
            ))
        });
        assert_eq!(settled_as, "nak");
        calls.extend(settled.calls.lock().unwrap().clone());
    }
    assert_eq!(
        calls,
        vec![
            "nak Some(5s)",
            "nak Some(10s)",
            "nak Some(20s)",
            "nak Some(300s)"
        ],
        "never acked or terminated; the delay grows to its bound"
    );
    assert!(sink.stored.lock().unwrap().is_empty());
    assert_eq!(
        recorder.count(telemetry::metric_names::DEAD_LETTER_FAILURES),
        4
    );
}

/// A metrics recorder that counts counter increments by name.
mod counting {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};

    #[derive(Default)]
    pub struct Recorder {
        counters: Mutex<HashMap<String, Arc<Cell>>>,
    }

    #[derive(Default)]
    pub struct Cell(AtomicU64);

    impl metrics::CounterFn for Cell {
        fn increment(&self, value: u64) {
            self.0.fetch_add(value, Ordering::SeqCst);
        }
        fn absolute(&self, value: u64) {
            self.0.store(value, Ordering::SeqCst);
        }
    }

    impl Recorder {
        pub fn count(&self, name: &str) -> u64 {
            self.counters
                .lock()
                .unwrap()
                .get(name)
                .map_or(0, |c| c.0.load(Ordering::SeqCst))
        }
    }

    impl metrics::Recorder for Recorder {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            let cell = self
                .counters
                .lock()
                .unwrap()
                .entry(key.name().to_owned())
                .or_default()
                .clone();
            Counter::from_arc(cell)
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }
}
