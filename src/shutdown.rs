//! Drain-then-close shutdown for a whole service: one [`Shutdown`] coordinator stops every
//! listener, waits for the service's own background work, then drains and closes every
//! connection, and reports what happened.
//!
//! The sequence, run once however often it is asked for:
//!
//! 1. the coordinator's [`CancellationToken`] is cancelled, so everything watching it stops
//!    taking new work;
//! 2. every registered [`Listener`] stops at the same time: no new requests or events are
//!    taken, in-flight handlers get what is left of the grace period to finish, what does not
//!    finish is abandoned (events are nak'ed so they are redelivered at once);
//! 3. tasks started with [`Shutdown::spawn`] (for example publishes whose acks are awaited)
//!    get what is left of the grace period;
//! 4. every registered connection is drained and closed ([`Drain`]): outstanding acks are
//!    awaited, buffered messages flushed.
//!
//! When [`Shutdown::shutdown`] returns, no handler of a registered listener runs any more.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::listener::{Listener, StopReport};

/// A connection that can be drained and closed as the last step of a shutdown.
///
/// Implemented by the connections of every backend.
///
/// # Examples
///
/// Implement it with a plain `async fn` (no attribute macro; why: see [`crate::handler`]).
///
/// ```
/// use ce_messaging::shutdown::Drain;
///
/// struct AuditLog;
///
/// impl Drain for AuditLog {
///     async fn drain(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
///         // flush buffered audit records here
///         Ok(())
///     }
/// }
/// ```
pub trait Drain: Send + Sync + 'static {
    /// Waits for outstanding work (publish acks, buffered messages), then closes.
    fn drain(
        &self,
    ) -> impl std::future::Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Send;
}

/// The object-safe twin of [`Drain`] a [`Shutdown`] stores (the future boxed).
trait ErasedDrain: Send + Sync + 'static {
    fn drain_boxed(
        &self,
    ) -> crate::handler::BoxFuture<'_, Result<(), Box<dyn std::error::Error + Send + Sync>>>;
}

impl<D: Drain> ErasedDrain for D {
    fn drain_boxed(
        &self,
    ) -> crate::handler::BoxFuture<'_, Result<(), Box<dyn std::error::Error + Send + Sync>>> {
        Box::pin(self.drain())
    }
}

/// What a [`Shutdown`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Listeners stopped.
    pub listeners: usize,
    /// Requests/events in flight or queued when the shutdown began that finished in time.
    pub finished: u64,
    /// Events handed back unstarted (nak'ed for immediate redelivery).
    pub requeued: u64,
    /// Requests/events cut off when the grace period ran out (events nak'ed).
    pub abandoned: u64,
    /// Tasks started with [`Shutdown::spawn`] still running when the grace period ran out.
    pub tasks_cut_off: usize,
    /// Connections drained and closed.
    pub connections_closed: usize,
    /// Connections whose drain failed or did not finish in time (logged with the reason).
    pub connections_failed: usize,
    /// How long the whole shutdown took.
    pub elapsed: Duration,
}

impl ShutdownReport {
    /// Whether everything finished in time: nothing abandoned, no task cut off, every
    /// connection drained.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut report = ce_messaging::shutdown::ShutdownReport::default();
    /// report.abandoned = 1;
    /// assert!(!report.is_clean());
    /// ```
    pub fn is_clean(&self) -> bool {
        self.abandoned == 0 && self.tasks_cut_off == 0 && self.connections_failed == 0
    }

    fn add_listener(&mut self, report: StopReport) {
        self.listeners += 1;
        self.finished += report.finished;
        self.requeued += report.requeued;
        self.abandoned += report.abandoned;
    }
}

struct Inner {
    token: CancellationToken,
    grace: Duration,
    /// How long a connection drain may take after the grace period (it waits for acks that
    /// the server should answer promptly; a dead server must not hold the process forever).
    /// Shared by every clone, so a setting made through any of them is the one the drain uses.
    drain_timeout: Mutex<Duration>,
    tracker: TaskTracker,
    listeners: Mutex<Vec<Listener>>,
    connections: Mutex<Vec<Arc<dyn ErasedDrain>>>,
    report: OnceCell<ShutdownReport>,
}

/// The shutdown coordinator of a service. Cheap to clone; all clones are the same coordinator.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use ce_messaging::shutdown::Shutdown;
///
/// # async fn demo(listener: ce_messaging::listener::Listener) {
/// let shutdown = Shutdown::new(Duration::from_secs(10));
/// shutdown.add_listener(listener);
/// // Waits for SIGTERM or SIGINT, then stops everything gracefully.
/// let report = shutdown.run_until_signal().await;
/// println!("finished {}, abandoned {}", report.finished, report.abandoned);
/// # }
/// ```
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("grace", &self.inner.grace)
            .field("started", &self.inner.token.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Default for Shutdown {
    /// A coordinator with a 30 s grace period.
    fn default() -> Self {
        Shutdown::new(Duration::from_secs(30))
    }
}

impl Shutdown {
    /// A coordinator whose in-flight work gets `grace` to finish.
    ///
    /// # Examples
    ///
    /// ```
    /// let shutdown = ce_messaging::shutdown::Shutdown::new(std::time::Duration::from_secs(5));
    /// assert!(!shutdown.is_started());
    /// ```
    pub fn new(grace: Duration) -> Self {
        Shutdown {
            inner: Arc::new(Inner {
                token: CancellationToken::new(),
                grace,
                drain_timeout: Mutex::new(Duration::from_secs(10)),
                tracker: TaskTracker::new(),
                listeners: Mutex::new(Vec::new()),
                connections: Mutex::new(Vec::new()),
                report: OnceCell::new(),
            }),
        }
    }

    /// Sets how long draining the connections may take after the grace period (default 10 s).
    ///
    /// The setting is shared: it applies to every clone of this coordinator, whichever clone
    /// it was made through, and to a shutdown that has begun but not yet reached the drain.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use ce_messaging::shutdown::Shutdown;
    ///
    /// let shutdown = Shutdown::new(Duration::from_secs(5));
    /// let handle = shutdown.clone(); // e.g. given to a signal task
    /// let shutdown = shutdown.with_drain_timeout(Duration::from_secs(2));
    /// assert_eq!(handle.drain_timeout(), Duration::from_secs(2));
    /// # let _ = shutdown;
    /// ```
    #[must_use]
    pub fn with_drain_timeout(self, timeout: Duration) -> Self {
        self.set_drain_timeout(timeout);
        self
    }

    /// Sets how long draining the connections may take, through a shared handle (see
    /// [`with_drain_timeout`](Self::with_drain_timeout)).
    pub fn set_drain_timeout(&self, timeout: Duration) {
        *self
            .inner
            .drain_timeout
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = timeout;
    }

    /// How long draining the connections may take after the grace period.
    pub fn drain_timeout(&self) -> Duration {
        *self
            .inner
            .drain_timeout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A token cancelled when the shutdown begins; watch it (or a child of it) in the
    /// service's own loops.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(shutdown: ce_messaging::shutdown::Shutdown) {
    /// let token = shutdown.token();
    /// tokio::select! {
    ///     _ = token.cancelled() => { /* stop this loop */ }
    ///     _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => { /* periodic work */ }
    /// }
    /// # }
    /// ```
    pub fn token(&self) -> CancellationToken {
        self.inner.token.clone()
    }

    /// Whether the shutdown has begun.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let shutdown = ce_messaging::Shutdown::default();
    /// let watcher = shutdown.clone(); // e.g. a health endpoint reporting "stopping"
    /// assert!(!watcher.is_started());
    /// shutdown.shutdown().await;
    /// assert!(watcher.is_started());
    /// # }
    /// ```
    pub fn is_started(&self) -> bool {
        self.inner.token.is_cancelled()
    }

    /// Registers a listener to stop. A listener added after the shutdown began is stopped at
    /// once (with the grace period) in the background.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn demo(shutdown: &ce_messaging::shutdown::Shutdown, listener: ce_messaging::listener::Listener) {
    /// shutdown.add_listener(listener);
    /// # }
    /// ```
    pub fn add_listener(&self, listener: Listener) {
        if self.is_started() {
            let grace = self.inner.grace;
            tokio::spawn(async move {
                listener.stop(grace).await;
            });
            return;
        }
        // A poisoned lock only means a panic elsewhere while holding it; the list is intact.
        let mut listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        listeners.push(listener);
    }

    /// Registers a connection to drain and close as the last step.
    ///
    /// # Examples
    ///
    /// ```
    /// # struct Conn;
    /// # impl ce_messaging::shutdown::Drain for Conn {
    /// #     async fn drain(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> { Ok(()) }
    /// # }
    /// let shutdown = ce_messaging::shutdown::Shutdown::default();
    /// shutdown.add_connection(Conn);
    /// ```
    pub fn add_connection(&self, connection: impl Drain) {
        let mut connections = self
            .inner
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        connections.push(Arc::new(connection));
    }

    /// Runs `task` as part of the service: the shutdown waits for it (within the grace period)
    /// after the listeners stopped and before the connections close. Use it for work whose
    /// result must not be lost, such as a publish whose ack is awaited.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(shutdown: ce_messaging::shutdown::Shutdown) {
    /// shutdown.spawn(async { /* publish and await the ack */ });
    /// let report = shutdown.shutdown().await;
    /// assert_eq!(report.tasks_cut_off, 0);
    /// # }
    /// ```
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.tracker.spawn(task)
    }

    /// Shuts down (see the [module docs](self)) and returns the report. Calling it again, on any
    /// clone, waits for the same shutdown and returns the same report.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes leaves the listeners stopping in the background;
    /// a later call finishes the sequence.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let shutdown = ce_messaging::shutdown::Shutdown::default();
    /// let first = shutdown.shutdown().await;
    /// let second = shutdown.shutdown().await;
    /// assert_eq!(first, second);
    /// # }
    /// ```
    pub async fn shutdown(&self) -> ShutdownReport {
        self.inner
            .report
            .get_or_init(|| run(self.inner.clone()))
            .await
            .clone()
    }

    /// Waits for SIGTERM or SIGINT (Ctrl-C), or for the shutdown to be started elsewhere, then
    /// shuts down and returns the report.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(shutdown: ce_messaging::shutdown::Shutdown) {
    /// let report = shutdown.run_until_signal().await;
    /// eprintln!("shut down in {:?}", report.elapsed);
    /// # }
    /// ```
    pub async fn run_until_signal(&self) -> ShutdownReport {
        tokio::select! {
            signal = termination_signal() => {
                match signal {
                    Ok(name) => tracing::info!(signal = name, "shutting down"),
                    Err(err) => tracing::warn!(error = %err, "cannot watch signals; shutting down"),
                }
            }
            _ = self.inner.token.cancelled() => {}
        }
        self.shutdown().await
    }
}

/// Resolves with the name of the first termination signal received.
async fn termination_signal() -> std::io::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok("ctrl-c")
    }
}

async fn run(inner: Arc<Inner>) -> ShutdownReport {
    let started = Instant::now();
    let deadline = started + inner.grace;
    inner.token.cancel();

    let listeners = std::mem::take(&mut *inner.listeners.lock().unwrap_or_else(|e| e.into_inner()));
    let mut report = ShutdownReport::default();
    let stops = listeners.iter().map(|l| l.stop(inner.grace));
    for stop in futures::future::join_all(stops).await {
        report.add_listener(stop);
    }

    inner.tracker.close();
    let left = deadline.saturating_duration_since(Instant::now());
    if tokio::time::timeout(left, inner.tracker.wait())
        .await
        .is_err()
    {
        report.tasks_cut_off = inner.tracker.len();
        tracing::warn!(
            tasks = report.tasks_cut_off,
            "service tasks still running after the grace period"
        );
    }

    let connections =
        std::mem::take(&mut *inner.connections.lock().unwrap_or_else(|e| e.into_inner()));
    // Read now, not at construction: a setting made through any clone until this point counts.
    let drain_timeout = *inner
        .drain_timeout
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let drains = connections
        .iter()
        .map(|c| tokio::time::timeout(drain_timeout, c.drain_boxed()));
    for result in futures::future::join_all(drains).await {
        match result {
            Ok(Ok(())) => report.connections_closed += 1,
            Ok(Err(err)) => {
                report.connections_failed += 1;
                tracing::warn!(error = %err, "connection drain failed");
            }
            Err(_) => {
                report.connections_failed += 1;
                tracing::warn!(timeout = ?drain_timeout, "connection drain timed out");
            }
        }
    }
    report.elapsed = started.elapsed();
    tracing::info!(
        listeners = report.listeners,
        finished = report.finished,
        requeued = report.requeued,
        abandoned = report.abandoned,
        elapsed = ?report.elapsed,
        "shutdown complete"
    );
    report
}

// ---------------------------------------------------------------------------------------------
// Drain for the backends' connections that do not implement it in their own module yet.
// (NatsQueries implements it in src/nats/mod.rs.)
// ---------------------------------------------------------------------------------------------

/// Drains the connection: acks and naks already sent are flushed, subscriptions end, then the
/// connection closes. A connection that is already closed is not an error.
impl Drain for crate::jetstream::JetStreamEvents {
    async fn drain(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.close().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct CountingDrain(Arc<AtomicUsize>, Duration);

    impl Drain for CountingDrain {
        async fn drain(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            tokio::time::sleep(self.1).await;
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    struct FailingDrain;

    impl Drain for FailingDrain {
        async fn drain(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            Err("broken pipe".into())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_tasks_then_drains_connections_once() {
        let shutdown = Shutdown::new(Duration::from_secs(5));
        let drained = Arc::new(AtomicUsize::new(0));
        shutdown.add_connection(CountingDrain(drained.clone(), Duration::from_millis(10)));
        let task_done = Arc::new(AtomicUsize::new(0));
        let flag = task_done.clone();
        let drained_at_task_end = drained.clone();
        shutdown.spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // The connection must still be open while service tasks run.
            assert_eq!(drained_at_task_end.load(Ordering::SeqCst), 0);
            flag.fetch_add(1, Ordering::SeqCst);
        });
        let other = shutdown.clone();
        let (a, b) = tokio::join!(shutdown.shutdown(), other.shutdown());
        assert_eq!(a, b, "concurrent calls see the same shutdown");
        assert_eq!(task_done.load(Ordering::SeqCst), 1);
        assert_eq!(drained.load(Ordering::SeqCst), 1, "drained exactly once");
        assert_eq!(a.connections_closed, 1);
        assert!(a.is_clean());
        assert!(shutdown.is_started());
        let again = shutdown.shutdown().await;
        assert_eq!(again, a);
        assert_eq!(drained.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn cuts_off_tasks_at_the_grace_period_and_reports_failed_drains() {
        let shutdown =
            Shutdown::new(Duration::from_secs(2)).with_drain_timeout(Duration::from_secs(1));
        shutdown.spawn(std::future::pending::<()>());
        shutdown.add_connection(FailingDrain);
        shutdown.add_connection(CountingDrain(
            Arc::new(AtomicUsize::new(0)),
            Duration::from_secs(60),
        ));
        let report = shutdown.shutdown().await;
        assert_eq!(report.tasks_cut_off, 1);
        assert_eq!(report.connections_failed, 2);
        assert_eq!(report.connections_closed, 0);
        assert!(!report.is_clean());
        // Grace (2 s) + drain timeout (1 s), in paused time.
        assert!(report.elapsed >= Duration::from_secs(3));
        assert!(report.elapsed < Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_timeout_set_through_a_clone_is_the_one_the_drain_uses() {
        // Each drain takes 2 s: it fits the 10 s default, so it fails only if the 1 s setting
        // made after the coordinator was shared took effect (the old builder ignored it).
        let by_builder = {
            let shutdown = Shutdown::new(Duration::from_secs(1));
            let handle = shutdown.clone();
            let _shutdown = shutdown.with_drain_timeout(Duration::from_secs(1));
            handle
        };
        let by_setter = Shutdown::new(Duration::from_secs(1));
        by_setter.clone().set_drain_timeout(Duration::from_secs(1));
        for shutdown in [by_builder, by_setter] {
            assert_eq!(shutdown.drain_timeout(), Duration::from_secs(1));
            let drained = Arc::new(AtomicUsize::new(0));
            shutdown.add_connection(CountingDrain(drained.clone(), Duration::from_secs(2)));
            let report = shutdown.shutdown().await;
            assert_eq!(
                report.connections_failed, 1,
                "the 2 s drain exceeds the 1 s limit"
            );
            assert_eq!(report.connections_closed, 0);
            assert_eq!(drained.load(Ordering::SeqCst), 0);
            // No listeners or tasks: the drain's 1 s limit is the whole shutdown (paused time).
            assert!(report.elapsed >= Duration::from_secs(1));
            assert!(report.elapsed < Duration::from_secs(2));
        }
    }

    #[tokio::test]
    async fn token_is_cancelled_when_shutdown_begins() {
        let shutdown = Shutdown::default();
        let token = shutdown.token();
        assert!(!token.is_cancelled());
        shutdown.shutdown().await;
        assert!(token.is_cancelled());
    }

    #[tokio::test]
    async fn run_until_signal_returns_when_started_elsewhere() {
        let shutdown = Shutdown::default();
        let waiter = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.run_until_signal().await }
        });
        shutdown.shutdown().await;
        let report = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("run_until_signal returns after shutdown")
            .expect("task did not panic");
        assert!(report.is_clean());
    }
}
