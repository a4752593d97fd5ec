//! Issue 15, item 5: timed-out requests must not leave anything behind in the requester.
//! async-nats 0.51's request multiplexer kept an entry (~330 bytes) per request that never got
//! a reply. This binary counts the bytes the process holds allocated (a counting global
//! allocator; one test per binary so nothing else allocates meanwhile) around 20,000
//! requests that time out against a responder that never answers.

use ce_messaging_test_support as support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ce_messaging::config::Config;
use ce_messaging::error::RequestErrorKind;
use ce_messaging::event::new_event;
use ce_messaging::nats::NatsQueries;
use futures::StreamExt;
use support::server::{NatsServer, ServerOptions};

/// Bytes currently allocated by the whole process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const WAIT: Duration = Duration::from_secs(30);
const BATCH: usize = 1000;

/// `BATCH` concurrent requests that all time out; returns how many did.
async fn timed_out_batch(requester: &NatsQueries, n: usize) -> usize {
    let results = futures::future::join_all((0..n).map(|i| {
        let request = new_event("leak.never", "leak-test", &i).expect("event");
        requester.request_with_timeout(request, Duration::from_millis(100))
    }))
    .await;
    results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.kind() == RequestErrorKind::TimedOut))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_timed_out_requests_leave_nothing_allocated() {
    let server = NatsServer::start_with(ServerOptions {
        jetstream: false,
        ..Default::default()
    });
    // The responder takes every request and never answers.
    let responder = support::connect(&server.url()).await;
    let mut requests = responder.subscribe("leak.never").await.expect("subscribe");
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let drain = tokio::spawn(async move {
        while requests.next().await.is_some() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    responder.flush().await.expect("flush");
    let config = Config {
        nats_url: server.url(),
        ..Default::default()
    };
    let requester = NatsQueries::connect(&config).await.expect("connect");

    // Warm-up: lazily built state, map capacity for a batch, timer wheel levels.
    for _ in 0..2 {
        let n = tokio::time::timeout(WAIT, timed_out_batch(&requester, BATCH))
            .await
            .expect("warm-up batch ended");
        assert_eq!(n, BATCH);
    }
    let settled = |expected: usize| {
        let seen = seen.clone();
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            while seen.load(Ordering::Relaxed) < expected {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "responder got fewer requests"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    settled(2 * BATCH).await;
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..20 {
        let n = tokio::time::timeout(WAIT, timed_out_batch(&requester, BATCH))
            .await
            .expect("batch ended");
        assert_eq!(n, BATCH);
    }
    settled(22 * BATCH).await;
    let after = LIVE.load(Ordering::Relaxed);
    let growth = after - before;
    eprintln!(
        "20,000 timed-out requests: live allocation {before} -> {after} bytes ({growth:+} bytes, {:.1} bytes per request)",
        growth as f64 / 20_000.0
    );
    assert!(
        growth < 1_000_000,
        "20,000 timed-out requests left {growth} bytes allocated"
    );
    // The multiplexer's table holds only requests still waiting: none now.
    assert_eq!(requester.pending_requests(), 0);
    drain.abort();
}
