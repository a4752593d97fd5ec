//! What observability costs: events published and handled (and queries answered) on the
//! in-memory backend, with nobody listening (no tracing subscriber, no metrics recorder), with
//! a subscriber that records every span but does nothing with it (the library's own work:
//! trace ids, `traceparent` injection and parsing, span fields), and with that subscriber plus
//! a metrics recorder whose handles do an atomic add.
//!
//! Run: `cargo bench --bench telemetry`. Sizes: `TELEMETRY_BENCH_N` (default 20000). Prints
//! events/s and requests/s per mode and the ratio to the quiet mode (1.0 = no cost). Modes are
//! interleaved and repeated; the best of the rounds is kept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ce_messaging::config::Config;
use ce_messaging::event::new_event;
use ce_messaging::events::{event_handler_fn, EventConnection, EventHandlers, EventListenOptions};
use ce_messaging::query::{handler_fn, QueryConnection, QueryHandlers, QueryListenOptions};
use ce_messaging::MemoryBroker;

const TYPE: &str = "org.example.bench.traced";
const OP: &str = "org.example.bench.get";
const ROUNDS: usize = 3;

/// Enabled for everything, keeps nothing: measures what the library does for a subscriber.
struct Enabled(AtomicU64);

impl tracing::Subscriber for Enabled {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(self.0.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

struct Adder(AtomicU64);

impl metrics::CounterFn for Adder {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

impl metrics::HistogramFn for Adder {
    fn record(&self, value: f64) {
        self.0.fetch_add(value.to_bits() & 1, Ordering::Relaxed);
    }
}

impl metrics::GaugeFn for Adder {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, _: f64) {}
}

/// Every metric is one shared atomic: the recorder's own cost is kept minimal.
struct Recorder(Arc<Adder>);

impl metrics::Recorder for Recorder {
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
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(self.0.clone())
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::from_arc(self.0.clone())
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::from_arc(self.0.clone())
    }
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Quiet,
    Spans,
    SpansAndMetrics,
}

/// Publishes `n` events one by one and waits until the handler saw all of them; events/s.
async fn events_round(n: usize) -> f64 {
    let broker = MemoryBroker::new();
    let events = broker.event_connection(&Config::default());
    events.init_stream().await.expect("init_stream");
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let handlers = EventHandlers::new().on(
        TYPE,
        event_handler_fn(move |_, _| {
            let tx = tx.clone();
            async move {
                tx.send(()).await.ok();
                Ok(())
            }
        }),
    );
    let listener = events
        .listen(handlers, EventListenOptions::default())
        .await
        .expect("listen");
    let prepared: Vec<_> = (0..n)
        .map(|i| new_event(TYPE, "bench", &i).expect("event"))
        .collect();
    let started = Instant::now();
    for event in prepared {
        events.publish(event).await.expect("publish");
    }
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("handler did not see every event in time")
            .expect("channel closed");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    listener.stop(Duration::from_secs(5)).await;
    rate
}

/// `n` requests one after the other; requests/s.
async fn queries_round(n: usize) -> f64 {
    let broker = MemoryBroker::new();
    let queries = broker.query_connection(&Config::default());
    let handlers = QueryHandlers::new().on(
        OP,
        handler_fn(|_request, reply| async move {
            reply.reply_data("org.example.bench.got", &1).await?;
            Ok(())
        }),
    );
    let listener = queries
        .listen(handlers, QueryListenOptions::default())
        .await
        .expect("listen");
    let started = Instant::now();
    for i in 0..n {
        let request = new_event(OP, "bench", &i).expect("event");
        queries.request(request).await.expect("request");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    listener.stop(Duration::from_secs(5)).await;
    rate
}

fn run(mode: Mode, n: usize) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let recorder = Recorder(Arc::new(Adder(AtomicU64::new(0))));
    let _tracing = match mode {
        Mode::Quiet => tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::new()),
        _ => tracing::subscriber::set_default(Enabled(AtomicU64::new(0))),
    };
    let _metrics = matches!(mode, Mode::SpansAndMetrics)
        .then(|| metrics::set_default_local_recorder(&recorder));
    rt.block_on(async { (events_round(n).await, queries_round(n).await) })
}

fn main() {
    let n: usize = std::env::var("TELEMETRY_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let modes = [Mode::Quiet, Mode::Spans, Mode::SpansAndMetrics];
    let mut best = [(0.0f64, 0.0f64); 3];
    run(Mode::Quiet, n / 10); // warm-up
    for _ in 0..ROUNDS {
        for (i, mode) in modes.iter().enumerate() {
            let (events, queries) = run(*mode, n);
            best[i].0 = best[i].0.max(events);
            best[i].1 = best[i].1.max(queries);
        }
    }
    println!("telemetry cost on the memory backend, n = {n}, best of {ROUNDS} rounds");
    for (i, mode) in modes.iter().enumerate() {
        println!(
            "{:<16} events {:>10.0}/s (x{:.2})   requests {:>10.0}/s (x{:.2})",
            format!("{mode:?}"),
            best[i].0,
            best[i].0 / best[0].0,
            best[i].1,
            best[i].1 / best[0].1,
        );
    }
}
