//! The conformance cases, written once against the traits and run per backend by the macros in
//! `main.rs`. Each case starts its own environment and uses fresh random ops, event types and
//! durables, so cases run in parallel without crosstalk.
//!
//! Every wait is bounded ([`within`], [`Seen::wait_until`], [`eventually`]); nothing sleeps to
//! synchronise. Where a handler sleeps, it stands for work that takes time.

pub mod events;
pub mod queries;
pub mod schedules;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The longest any single positive wait may take before the case fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the case with `what` if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    within_for(WAIT, what, fut).await
}

/// Awaits `fut`, failing the case with `what` if it takes longer than `limit`.
pub async fn within_for<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Polls `check` until it returns true, failing the case with `what` after [`WAIT`]. For
/// broker state that has no change notification (stored messages, consumer counts).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Says that a case was skipped on a backend, and why (visible with `--nocapture` and in the
/// captured output of the test).
pub fn skip(backend: &str, case: &str, why: &str) {
    eprintln!("conformance::{backend}::{case} SKIPPED: {why}");
}

/// What handlers saw, in order; cases wait on it with a deadline.
pub struct Seen<T> {
    tx: Arc<watch::Sender<Vec<T>>>,
}

impl<T> Clone for Seen<T> {
    fn clone(&self) -> Self {
        Seen {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Seen<T> {
    pub fn new() -> Self {
        Seen {
            tx: Arc::new(watch::channel(Vec::new()).0),
        }
    }

    pub fn push(&self, item: T) {
        self.tx.send_modify(|all| all.push(item));
    }

    pub fn snapshot(&self) -> Vec<T> {
        self.tx.borrow().clone()
    }

    pub fn len(&self) -> usize {
        self.tx.borrow().len()
    }

    /// Waits until `pred` holds for everything seen so far; returns a copy of it.
    pub async fn wait_until(&self, what: &str, mut pred: impl FnMut(&[T]) -> bool) -> Vec<T> {
        let mut rx = self.tx.subscribe();
        let seen = within(what, rx.wait_for(|all| pred(all))).await;
        match seen {
            Ok(all) => all.clone(),
            Err(_) => unreachable!("the sender lives in self"),
        }
    }

    /// Waits until at least `n` items were seen.
    pub async fn wait_len(&self, what: &str, n: usize) -> Vec<T> {
        self.wait_until(what, |all| all.len() >= n).await
    }
}

/// Holds handlers until the case opens it.
#[derive(Clone, Default)]
pub struct Gate(CancellationToken);

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn open(&self) {
        self.0.cancel();
    }

    /// Waits until the gate is open (handlers use this; bounded so nothing hangs forever).
    pub async fn wait(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(60), self.0.cancelled()).await;
    }
}

/// Counts handlers running at once and the highest count reached.
#[derive(Clone, Default)]
pub struct Peak {
    inner: Arc<PeakInner>,
}

#[derive(Default)]
struct PeakInner {
    now: AtomicUsize,
    max: AtomicUsize,
    changed: tokio::sync::Notify,
}

pub struct PeakGuard(Arc<PeakInner>);

impl Drop for PeakGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

impl Peak {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn enter(&self) -> PeakGuard {
        let now = self.inner.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.inner.max.fetch_max(now, Ordering::SeqCst);
        self.inner.changed.notify_waiters();
        PeakGuard(self.inner.clone())
    }

    pub fn max(&self) -> usize {
        self.inner.max.load(Ordering::SeqCst)
    }

    /// Waits until exactly `n` run at once.
    pub async fn wait_running(&self, n: usize) {
        within(&format!("{n} handlers running at once"), async {
            loop {
                let changed = self.inner.changed.notified();
                if self.inner.now.load(Ordering::SeqCst) == n {
                    return;
                }
                changed.await;
            }
        })
        .await
    }
}

/// Event types / query ops that break the subject-token rule of the wire contract: wildcards,
/// whitespace (also Unicode), control characters, empty tokens, and one byte over the 255-byte
/// bound. Every backend refuses each at once with a typed error.
pub fn invalid_types() -> Vec<String> {
    let mut types: Vec<String> = [
        "probe.*",
        "probe.>",
        ">",
        "*",
        "a.b*c",
        "a>b",
        "a b",
        "a\tb",
        "a\nb",
        "a\u{0}b",
        "a\u{7f}b",
        "a\u{a0}b",
        "a..b",
        ".a",
        "a.",
        ".",
        "",
        "_priority.0.x",
    ]
    .iter()
    .map(|t| t.to_string())
    .collect();
    types.push(format!("conf.{}", "x".repeat(256 - 5)));
    types
}

/// A valid type of exactly the 255-byte bound, unique to this run.
pub fn longest_valid_type() -> String {
    let head = format!("conf.{}.", crate::backend::unique());
    format!("{head}{}", "x".repeat(255 - head.len()))
}
