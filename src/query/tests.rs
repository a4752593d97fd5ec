//! Tests of the query module as a whole (reply reading, reply writing, serving).
//! (Test code only, declared `#[cfg(test)] mod tests;`: its unwrap()/expect() calls are
//! assertions, never a library path.)
#![cfg(test)]

use super::*;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};

use crate::codec::{self, ContentMode, HeaderMap};
use crate::error::{BoxError, RemoteError, RequestErrorKind};
use crate::headers::{REQUEST_TIMEOUT_MS, SERVICE_ERROR, SERVICE_ERROR_CODE};
use crate::telemetry::{self};
use crate::worker::Outcome;

#[test]
fn error_reply_headers_become_remote_errors() {
    let mut headers = HeaderMap::new();
    headers.insert(SERVICE_ERROR, "no handler for op x");
    headers.insert(SERVICE_ERROR_CODE, "404");
    let err = interpret_reply(Some(&headers), &Bytes::new()).unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::Remote);
    let remote = RemoteError::of(&err).unwrap();
    assert_eq!(remote.code(), 404);
    assert_eq!(remote.text(), "no handler for op x");
}

#[test]
fn garbage_reply_is_a_decode_error() {
    let err = interpret_reply(None, &Bytes::from_static(b"\xff\x00garbage")).unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::Decode);
}

fn raw_stream(items: Vec<RawReply>) -> BoxStream<'static, RawReply> {
    futures::stream::iter(items)
        .chain(futures::stream::pending())
        .boxed()
}

/// Counts `ce_messaging_queries_shed_total` increments by `reason`, on this thread.
#[derive(Default)]
struct ShedRecorder {
    counts: Arc<Mutex<HashMap<String, u64>>>,
}

struct ShedCounter {
    reason: Option<String>,
    counts: Arc<Mutex<HashMap<String, u64>>>,
}

impl metrics::CounterFn for ShedCounter {
    fn increment(&self, value: u64) {
        if let Some(reason) = &self.reason {
            *self
                .counts
                .lock()
                .unwrap()
                .entry(reason.clone())
                .or_default() += value;
        }
    }
    fn absolute(&self, _value: u64) {}
}

impl metrics::Recorder for ShedRecorder {
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
        let reason = (key.name() == telemetry::metric_names::QUERIES_SHED)
            .then(|| {
                key.labels()
                    .find(|l| l.key() == "reason")
                    .map(|l| l.value().to_owned())
            })
            .flatten();
        metrics::Counter::from_arc(Arc::new(ShedCounter {
            reason,
            counts: self.counts.clone(),
        }))
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

struct Recorded(Mutex<Vec<(HeaderMap, Bytes)>>);

#[async_trait]
impl ReplyTarget for Recorded {
    async fn send(&self, headers: HeaderMap, payload: Bytes) -> Result<(), BoxError> {
        self.0.lock().unwrap().push((headers, payload));
        Ok(())
    }
}

#[test]
fn a_request_whose_deadline_passed_is_dropped_unanswered_and_counted() {
    let recorder = ShedRecorder::default();
    let counts = recorder.counts.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let r = ran.clone();
            let ctx = ServeContext {
                handlers: QueryHandlers::new().on(
                    "t.op",
                    handler_fn(move |_, reply| {
                        let r = r.clone();
                        async move {
                            r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            reply.reply_data("t.op.reply", &1).await?;
                            Ok(())
                        }
                    }),
                ),
                source: "svc".into(),
                by_subject: true,
            };
            let pool = crate::worker::WorkerPool::start(1, 1, |_: (), _| {
                async { Outcome::Finished }.boxed()
            });
            let work = pool.context();
            let encoded = codec::encode(
                &crate::event::new_event("t.op", "c", &1).unwrap(),
                ContentMode::Structured,
            )
            .unwrap();
            let request = |ms: &str| {
                let target = Arc::new(Recorded(Mutex::new(Vec::new())));
                let mut headers = encoded.headers.to_header_map();
                headers.insert(REQUEST_TIMEOUT_MS, ms);
                let request = RawRequest::received(
                    "t.op".into(),
                    Some(headers),
                    encoded.payload.clone(),
                    Some(target.clone() as Arc<dyn ReplyTarget>),
                );
                (request, target)
            };
            // No time left: dropped without a reply, the handler never runs.
            let (expired, target) = request("0");
            serve_request(expired, &ctx, &work).await;
            assert!(target.0.lock().unwrap().is_empty());
            assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0);
            // Time left: served.
            let (fresh, target) = request("5000");
            serve_request(fresh, &ctx, &work).await;
            assert_eq!(target.0.lock().unwrap().len(), 1);
            assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
            pool.stop(Duration::from_secs(1), false).await;
        })
    });
    assert_eq!(
        counts.lock().unwrap().get("expired").copied(),
        Some(1),
        "{counts:?}"
    );
}

#[test]
fn request_deadline_reads_the_header_and_ignores_garbage() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let now = tokio::time::Instant::now();
        let mut headers = HeaderMap::new();
        set_request_timeout(&mut headers, Duration::from_millis(1500));
        assert_eq!(
            headers.get(REQUEST_TIMEOUT_MS).map(|v| v.as_str()),
            Some("1500")
        );
        assert_eq!(
            request_deadline(Some(&headers)),
            Some(now + Duration::from_millis(1500))
        );
        headers.insert(REQUEST_TIMEOUT_MS, "soon");
        assert_eq!(request_deadline(Some(&headers)), None);
        assert_eq!(request_deadline(None), None);
        // Clamped to the longest request timeout.
        headers.insert(REQUEST_TIMEOUT_MS, u64::MAX.to_string().as_str());
        assert_eq!(
            request_deadline(Some(&headers)),
            Some(now + crate::config::MAX_REQUEST_TIMEOUT)
        );
    });
}

#[tokio::test(start_paused = true)]
async fn stream_without_replies_times_out_once() {
    let mut stream = ReplyStream::from_raw(
        raw_stream(vec![]),
        &ReplyStreamOptions::default(),
        Duration::from_secs(1),
    );
    let err = stream.next().await.unwrap().unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::TimedOut);
    assert!(stream.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn no_responders_ends_the_stream() {
    let mut stream = ReplyStream::from_raw(
        raw_stream(vec![RawReply::NoResponders]),
        &ReplyStreamOptions::default(),
        Duration::from_secs(1),
    );
    let err = stream.next().await.unwrap().unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::NoResponders);
    assert!(stream.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn sentinel_ends_the_stream() {
    let mut stream = ReplyStream::from_raw(
        raw_stream(vec![RawReply::Message {
            headers: None,
            payload: Bytes::new(),
        }]),
        &ReplyStreamOptions::default().sentinel(true),
        Duration::from_secs(1),
    );
    // The sentinel came first: the stream ends without replies and without an error.
    assert!(stream.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn the_end_marker_of_an_empty_stream_ends_it_without_an_item() {
    let mut marker = HeaderMap::new();
    marker.insert(crate::headers::REPLY_STREAM_TOTAL, "0");
    let err = interpret_reply(Some(&marker), &Bytes::new()).unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::EmptyStream);
    // Not in sentinel mode: the marker ends the stream, before the deadline, with no item.
    let started = tokio::time::Instant::now();
    let mut stream = ReplyStream::from_raw(
        raw_stream(vec![RawReply::Message {
            headers: Some(marker),
            payload: Bytes::new(),
        }]),
        &ReplyStreamOptions::default(),
        Duration::from_secs(10),
    );
    assert!(stream.next().await.is_none());
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn known_ops_remember_checked_ops_only_and_at_most_their_bound() {
    let known = KnownOps::default();
    let err = known.learn("has space").unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::InvalidOptions);
    assert!(
        known.get("has space").is_none(),
        "a refused op is not remembered"
    );
    let (op, _) = known.learn("t.op").unwrap();
    assert_eq!(op.as_ref(), "t.op");
    assert!(known.get("t.op").is_some());
    // Learning it again keeps one entry.
    assert!(known.learn("t.op").is_ok());
    for n in 0..100 {
        assert!(known.learn(&format!("t.op{n}")).is_ok());
    }
    assert!(known.get("t.op62").is_some(), "the first 64 ops are kept");
    assert!(
        known.get("t.op63").is_none(),
        "beyond 64 ops a request is checked and labelled per call"
    );
    // A known op is still recognised by exact name only.
    assert!(known.get("t.o").is_none());
}
