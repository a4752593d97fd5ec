//! Test helpers that capture what the library reports: a `tracing` subscriber that keeps every
//! span with its fields, and a `metrics` recorder that keeps counter totals and histogram
//! samples. Used by the unit tests (`src/telemetry.rs`) and by `integration/tracing.rs`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// One span as recorded: its name and fields (values as their `Debug`/`Display` text).
#[derive(Debug, Clone)]
pub struct CapturedSpan {
    pub name: &'static str,
    pub fields: HashMap<String, String>,
}

impl CapturedSpan {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// A subscriber that records every span (all levels) and its fields.
#[derive(Clone, Default)]
pub struct SpanCapture {
    spans: Arc<Mutex<Vec<CapturedSpan>>>,
}

struct FieldVisitor<'a>(&'a mut HashMap<String, String>);

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl SpanCapture {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every span recorded so far with this name.
    pub fn spans_named(&self, name: &str) -> Vec<CapturedSpan> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }
}

impl Subscriber for SpanCapture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = HashMap::new();
        span.record(&mut FieldVisitor(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push(CapturedSpan {
            name: span.metadata().name(),
            fields,
        });
        Id::from_u64(spans.len() as u64)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        if let Some(captured) = spans.get_mut(span.into_u64() as usize - 1) {
            values.record(&mut FieldVisitor(&mut captured.fields));
        }
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[derive(Default)]
struct Cell {
    count: AtomicU64,
    samples: Mutex<Vec<f64>>,
}

impl metrics::CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.count.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.count.store(value, Ordering::SeqCst);
    }
}

impl metrics::HistogramFn for Cell {
    fn record(&self, value: f64) {
        self.samples.lock().unwrap().push(value);
    }
}

impl metrics::GaugeFn for Cell {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, _: f64) {}
}

/// A recorder that keeps counter totals and histogram samples by name and labels.
#[derive(Clone, Default)]
pub struct MetricsCapture {
    cells: Arc<Mutex<HashMap<String, Arc<Cell>>>>,
}

fn key_text(key: &metrics::Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl MetricsCapture {
    pub fn new() -> Self {
        Self::default()
    }

    fn cell(&self, key: &metrics::Key) -> Arc<Cell> {
        self.cells
            .lock()
            .unwrap()
            .entry(key_text(key))
            .or_default()
            .clone()
    }

    /// The total of counter `name` with exactly these labels (order does not matter).
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.get(name, labels)
            .map(|c| c.count.load(Ordering::SeqCst))
            .unwrap_or(0)
    }

    /// How many samples histogram `name` with exactly these labels holds.
    pub fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.get(name, labels)
            .map(|c| c.samples.lock().unwrap().len())
            .unwrap_or(0)
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<Arc<Cell>> {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(k.to_string(), v.to_string()))
            .collect();
        let key = metrics::Key::from_parts(name.to_owned(), labels);
        self.cells.lock().unwrap().get(&key_text(&key)).cloned()
    }

    /// Every metric seen, for failure messages.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.cells.lock().unwrap().keys().cloned().collect();
        names.sort();
        names
    }
}

impl metrics::Recorder for MetricsCapture {
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

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(self.cell(key))
    }

    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::from_arc(self.cell(key))
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::from_arc(self.cell(key))
    }
}
