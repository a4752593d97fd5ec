//! [`Listener`]: the handle every `listen` returns, for queries and events alike, and the
//! [`StopReport`] a graceful stop produces.
//!
//! A listener runs until it is stopped ([`Listener::stop`], or cancelling its
//! [`cancellation_token`](Listener::cancellation_token)), or until its connection closes.
//! Dropping the handle does **not** stop it (like dropping a `JoinHandle`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ListenError, ListenErrorKind};
use crate::worker::WorkerPool;

pub use crate::worker::StopReport;

/// How a listener runs its handlers: at most `workers` at once, up to `buffer` more items
/// waiting for a worker, and `grace` for in-flight handlers when the listener is stopped by
/// its token. Shared by [`QueryListenOptions`](crate::QueryListenOptions) and
/// [`EventListenOptions`](crate::EventListenOptions) (field `pool`), which differ in what
/// `buffer` means and in their defaults (see theirs).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use ce_messaging::{EventListenOptions, QueryListenOptions, WorkerOptions};
///
/// let queries = QueryListenOptions { pool: WorkerOptions::new(4, 64), ..Default::default() };
/// let events = EventListenOptions {
///     pool: WorkerOptions::new(1, 0).with_grace(Duration::from_secs(2)), // one at a time, no read-ahead
///     ..Default::default()
/// };
/// # let _ = (queries, events);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerOptions {
    /// At most this many handlers run at once (at least 1).
    pub workers: usize,
    /// At most this many items wait for a worker beyond those running.
    pub buffer: usize,
    /// How long in-flight handlers get to finish when the listener is stopped by its token.
    pub grace: Duration,
}

impl WorkerOptions {
    /// The grace period of [`new`](Self::new).
    pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

    /// `workers` and `buffer`, with a 30 s grace period.
    pub const fn new(workers: usize, buffer: usize) -> Self {
        WorkerOptions {
            workers,
            buffer,
            grace: Self::DEFAULT_GRACE,
        }
    }

    /// The same options with another grace period.
    #[must_use]
    pub const fn with_grace(self, grace: Duration) -> Self {
        WorkerOptions { grace, ..self }
    }

    /// Refuses a pool that could never run a handler, or a buffer below `min_buffer` (what the
    /// listener kind needs: a query listener queues at least one request).
    pub(crate) fn validate(&self, min_buffer: usize) -> Result<(), ListenError> {
        if self.workers == 0 {
            return Err(Error::with_detail(
                ListenErrorKind::InvalidOptions,
                "workers must be at least 1",
            ));
        }
        if self.buffer < min_buffer {
            return Err(Error::with_detail(
                ListenErrorKind::InvalidOptions,
                format!("buffer must be at least {min_buffer}"),
            ));
        }
        Ok(())
    }
}

type StopFn =
    Box<dyn FnOnce(Duration, bool) -> futures::future::BoxFuture<'static, StopReport> + Send>;

struct Shared {
    token: CancellationToken,
    grace: Mutex<Duration>,
    crash: std::sync::atomic::AtomicBool,
    report: watch::Receiver<Option<StopReport>>,
}

/// The handle of a running listener.
///
/// `Listener` is cheap to clone; all clones control the same listener.
///
/// # Examples
///
/// ```
/// # async fn demo(listener: ce_messaging::listener::Listener) {
/// use std::time::Duration;
/// let token = listener.cancellation_token();
/// // ... elsewhere, e.g. on SIGTERM: token.cancel();
/// let report = listener.stop(Duration::from_secs(10)).await;
/// println!("finished {} abandoned {}", report.finished, report.abandoned);
/// # }
/// ```
#[derive(Clone)]
pub struct Listener {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl Listener {
    /// Wraps a worker pool: a supervisor task stops the pool when the token is cancelled and
    /// publishes the report. The backend's intake loop (spawned on the pool) watches the
    /// pool's `stopping` token and unsubscribes / stops pulling itself.
    pub(crate) fn supervise<M: Send + 'static>(
        pool: WorkerPool<M>,
        default_grace: Duration,
        token: CancellationToken,
    ) -> Self {
        let stop: StopFn = Box::new(move |grace, crash| Box::pin(pool.stop(grace, crash)));
        Self::from_stop_fn(stop, default_grace, token)
    }

    /// Like [`supervise`](Self::supervise), then runs `finish` after the pool stopped (unless
    /// the stop was a crash) and before the report is published, e.g. to wait until the acks
    /// and naks the workers sent have reached the server.
    pub(crate) fn supervise_then<M, F>(
        pool: WorkerPool<M>,
        default_grace: Duration,
        token: CancellationToken,
        finish: F,
    ) -> Self
    where
        M: Send + 'static,
        F: FnOnce() -> futures::future::BoxFuture<'static, ()> + Send + 'static,
    {
        let stop: StopFn = Box::new(move |grace, crash| {
            Box::pin(async move {
                let report = pool.stop(grace, crash).await;
                if !crash {
                    finish().await;
                }
                report
            })
        });
        Self::from_stop_fn(stop, default_grace, token)
    }

    fn from_stop_fn(stop: StopFn, default_grace: Duration, token: CancellationToken) -> Self {
        let (tx, rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            token: token.clone(),
            grace: Mutex::new(default_grace),
            crash: std::sync::atomic::AtomicBool::new(false),
            report: rx,
        });
        let grace_source = shared.clone();
        tokio::spawn(async move {
            token.cancelled().await;
            let grace = grace_source
                .grace
                .lock()
                .map(|g| *g)
                .unwrap_or(default_grace);
            let crash = grace_source.crash.load(std::sync::atomic::Ordering::SeqCst);
            drop(grace_source);
            let report = stop(grace, crash).await;
            // The receiver side lives in `Shared`; if every handle is gone nobody waits.
            let _ = tx.send(Some(report));
        });
        Listener { shared }
    }

    /// Stops gracefully: no new messages are taken, in-flight handlers get up to `grace` to
    /// finish (and reply / ack), what is left is abandoned (events: nak'ed so they are
    /// redelivered at once). An event listener also runs, within `grace`, the events it had
    /// already received and queued (at most its `buffer`), instead of handing them back: a
    /// hand-back would spend one of the event's deliveries. Returns when no handler of this
    /// listener runs any more and every event it did not ack was handed back (nak) and
    /// flushed to the broker, so closing the connection right after loses no hand-back.
    ///
    /// Calling it again, or on a clone, waits for the same stop and returns the same report.
    ///
    /// # Cancel safety
    ///
    /// Dropping the returned future does not undo the stop; it continues in the background.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(listener: ce_messaging::listener::Listener) {
    /// let report = listener.stop(std::time::Duration::from_secs(5)).await;
    /// assert!(listener.is_stopped());
    /// # }
    /// ```
    pub async fn stop(&self, grace: Duration) -> StopReport {
        if !self.shared.token.is_cancelled() {
            if let Ok(mut g) = self.shared.grace.lock() {
                *g = grace;
            }
            self.shared.token.cancel();
        }
        self.stopped().await
    }

    /// Stops at once as if the process had died: handlers are dropped, nothing is acked or
    /// nak'ed (events are redelivered after their ack wait). Meant for tests and for
    /// emergencies; prefer [`stop`](Self::stop).
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(listener: ce_messaging::listener::Listener) {
    /// listener.abort().await;
    /// # }
    /// ```
    pub async fn abort(&self) -> StopReport {
        self.shared
            .crash
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop(Duration::ZERO).await
    }

    /// Waits until the listener has stopped (by [`stop`](Self::stop), its token, or its
    /// connection closing) and returns the report.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(listener: ce_messaging::listener::Listener) {
    /// let report = listener.stopped().await;
    /// println!("{report:?}");
    /// # }
    /// ```
    pub async fn stopped(&self) -> StopReport {
        let mut rx = self.shared.report.clone();
        loop {
            if let Some(report) = *rx.borrow_and_update() {
                return report;
            }
            if rx.changed().await.is_err() {
                // The supervisor is gone without a report: only possible if the runtime shut
                // down under it. Nothing runs any more.
                return StopReport::default();
            }
        }
    }

    /// Whether the stop has completed.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn demo(listener: ce_messaging::listener::Listener) {
    /// if !listener.is_stopped() { /* still serving */ }
    /// # }
    /// ```
    pub fn is_stopped(&self) -> bool {
        self.shared.report.borrow().is_some()
    }

    /// A token that stops the listener (with the default grace period) when cancelled; hand it
    /// to whatever decides when the service shuts down.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn demo(listener: ce_messaging::listener::Listener) {
    /// let token = listener.cancellation_token();
    /// token.cancel(); // begins a graceful stop
    /// # }
    /// ```
    pub fn cancellation_token(&self) -> CancellationToken {
        self.shared.token.clone()
    }
}
