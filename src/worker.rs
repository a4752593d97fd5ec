//! The bounded worker pool behind every listener: at most `workers` items are processed at once,
//! at most `buffer` wait, and stopping is drain-then-close (stop intake, let in-flight work finish
//! within a grace period, then abort what is left and wait for it to be cleaned up).
//!
//! Workers are long-lived tasks pulling from one bounded channel: no task is spawned per message.
//! The hand-off costs one wake-up per item: a sender wakes one idle worker (`Notify`), which
//! takes the next item with `try_recv` under a short synchronous lock (an async mutex around
//! the receiver would wake the next waiting worker for every item as well). A worker that
//! finds an item waiting takes it without registering anywhere; only a worker about to park
//! registers with `Notify`, and the abort wakes parked workers through that same `Notify`
//! instead of each one also waiting on the abort token (whose waiter list and lock every
//! worker would otherwise touch per item).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::listener::StopReport;

/// How one item's processing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The handler ran to completion (whatever its result) and the item was settled.
    Finished,
    /// Processing was cut off by the grace period running out (the item was nak'ed or dropped).
    Abandoned,
    /// The item was not started because the listener was stopping; it was handed back (nak).
    Requeued,
}

/// Signals given to the code that processes one item.
#[derive(Clone)]
pub(crate) struct WorkContext {
    /// Set when the listener begins to stop: items not yet started should be handed back.
    pub stopping: CancellationToken,
    /// Set when the grace period ran out: in-flight work must give up now.
    pub abort: CancellationToken,
    crashed: Arc<AtomicBool>,
}

impl WorkContext {
    /// True when the listener was aborted as if its process died: nothing must be settled.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }
}

#[derive(Default)]
struct Counters {
    finished: AtomicU64,
    abandoned: AtomicU64,
    requeued: AtomicU64,
}

/// The sending side of the pool's queue: sends wake one idle worker; dropping the last one lets
/// the workers see the end of the queue.
struct Tx<M> {
    /// Always `Some` until dropped (taken in `Drop` so the channel sees the sender gone before
    /// the workers are woken to look).
    tx: Option<mpsc::Sender<M>>,
    available: Arc<Notify>,
}

impl<M> Clone for Tx<M> {
    fn clone(&self) -> Self {
        Tx {
            tx: self.tx.clone(),
            available: self.available.clone(),
        }
    }
}

impl<M> Drop for Tx<M> {
    fn drop(&mut self) {
        drop(self.tx.take());
        // Idle workers re-check the queue; once every sender is gone they see it closed.
        self.available.notify_waiters();
    }
}

impl<M> Tx<M> {
    /// Queues an item, waiting for room; gives it back when the pool is stopping or closed.
    async fn send(&self, item: M, stopping: &CancellationToken) -> Result<(), M> {
        if stopping.is_cancelled() {
            return Err(item);
        }
        let Some(tx) = self.tx.as_ref() else {
            return Err(item);
        };
        // Room now (the usual case): no need to wait on `stopping` as well.
        match tx.try_reserve() {
            Ok(permit) => {
                permit.send(item);
                self.available.notify_one();
                return Ok(());
            }
            Err(mpsc::error::TrySendError::Closed(())) => return Err(item),
            Err(mpsc::error::TrySendError::Full(())) => {}
        }
        tokio::select! {
            biased;
            _ = stopping.cancelled() => Err(item),
            permit = tx.reserve() => match permit {
                Ok(permit) => {
                    permit.send(item);
                    self.available.notify_one();
                    Ok(())
                }
                Err(_) => Err(item),
            },
        }
    }
}

/// A bounded pool of workers processing items of type `M`.
pub(crate) struct WorkerPool<M> {
    tx: Tx<M>,
    ctx: WorkContext,
    /// Set with `ctx.abort`; what workers check (a load, where the token would take its lock).
    aborted: Arc<AtomicBool>,
    /// The workers' wake-up, also used to wake parked workers on abort.
    available: Arc<Notify>,
    tracker: TaskTracker,
    counters: Arc<Counters>,
    // Kept so that a pool with zero senders left (intake ended) still closes the channel.
    _marker: std::marker::PhantomData<M>,
}

impl<M: Send + 'static> WorkerPool<M> {
    /// Starts `workers` worker tasks reading from a channel of capacity `buffer`.
    pub fn start<F>(workers: usize, buffer: usize, process: F) -> Self
    where
        F: Fn(M, WorkContext) -> BoxFuture<'static, Outcome> + Send + Sync + 'static,
    {
        let workers = workers.max(1);
        let (tx, rx) = mpsc::channel::<M>(buffer.max(1));
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let available = Arc::new(Notify::new());
        let tx = Tx {
            tx: Some(tx),
            available: available.clone(),
        };
        let ctx = WorkContext {
            stopping: CancellationToken::new(),
            abort: CancellationToken::new(),
            crashed: Arc::new(AtomicBool::new(false)),
        };
        let tracker = TaskTracker::new();
        let counters = Arc::new(Counters::default());
        let process = Arc::new(process);
        let aborted = Arc::new(AtomicBool::new(false));
        for _ in 0..workers {
            let rx = rx.clone();
            let ctx = ctx.clone();
            let aborted = aborted.clone();
            let counters = counters.clone();
            let process = process.clone();
            let available = available.clone();
            tracker.spawn(async move {
                loop {
                    // Dropped before the item is processed: a busy worker must not stay
                    // registered, or a send would wake it instead of an idle one (a
                    // notification it did receive is passed on to another waiter on drop).
                    // The lock is held only for `try_recv`; it cannot be poisoned (nothing
                    // under it panics), and if it were the worker stops as on a closed queue.
                    let try_next = || match rx.lock() {
                        Ok(mut rx) => rx.try_recv(),
                        Err(_) => Err(TryRecvError::Disconnected),
                    };
                    let item = loop {
                        if aborted.load(Ordering::SeqCst) {
                            break None;
                        }
                        // An item waiting: taken at once, no registration.
                        match try_next() {
                            Ok(item) => break Some(item),
                            Err(TryRecvError::Disconnected) => break None,
                            Err(TryRecvError::Empty) => {}
                        }
                        // Registered before looking again, so an item sent (or an abort begun)
                        // after that look still wakes this worker, or leaves a permit that
                        // completes it.
                        let notified = available.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        if aborted.load(Ordering::SeqCst) {
                            break None;
                        }
                        match try_next() {
                            Ok(item) => break Some(item),
                            Err(TryRecvError::Disconnected) => break None,
                            Err(TryRecvError::Empty) => {}
                        }
                        notified.await;
                    };
                    let Some(item) = item else { break };
                    let outcome = process(item, ctx.clone()).await;
                    let counter = match outcome {
                        Outcome::Finished => &counters.finished,
                        Outcome::Abandoned => &counters.abandoned,
                        Outcome::Requeued => &counters.requeued,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        WorkerPool {
            tx,
            ctx,
            aborted,
            available,
            tracker,
            counters,
            _marker: std::marker::PhantomData,
        }
    }

    /// The signals shared with the workers.
    pub fn context(&self) -> WorkContext {
        self.ctx.clone()
    }

    /// Queues an item, waiting for room (backpressure). Gives the item back when the pool is
    /// stopping, so the caller can hand it back to the broker. Backends queue through a
    /// [`submitter`](Self::submitter) (the pool moves into the listener's supervisor), so this
    /// is for the pool's own tests.
    #[cfg(test)]
    pub async fn submit(&self, item: M) -> Result<(), M> {
        self.tx.send(item, &self.ctx.stopping).await
    }

    /// A cloneable handle that queues items, for an intake loop that runs apart from the pool
    /// (the pool itself moves into the listener's supervisor). Workers see the end of the queue
    /// only once every submitter is gone, so an intake loop must drop its submitter when
    /// `stopping` is set.
    pub fn submitter(&self) -> Submitter<M> {
        Submitter {
            tx: self.tx.clone(),
            stopping: self.ctx.stopping.clone(),
        }
    }

    /// Spawns the intake loop on the pool's tracker so that stopping waits for it.
    pub fn spawn_intake<Fut>(&self, intake: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(intake);
    }

    /// Drain-then-close: stop intake, let queued and in-flight items finish within `grace`,
    /// then abort the rest and wait until every worker has exited.
    pub async fn stop(self, grace: Duration, crash: bool) -> StopReport {
        let WorkerPool {
            tx,
            ctx,
            aborted,
            available,
            tracker,
            counters,
            _marker,
        } = self;
        // Tells in-flight work to give up and parked workers to exit (they registered with
        // `available` before they last looked at `aborted`).
        let abort = || {
            aborted.store(true, Ordering::SeqCst);
            ctx.abort.cancel();
            available.notify_waiters();
        };
        let started = Instant::now();
        let finished_before = counters.finished.load(Ordering::Relaxed);
        if crash {
            ctx.crashed.store(true, Ordering::SeqCst);
            abort();
        }
        ctx.stopping.cancel();
        // Dropping our sender lets the workers see the end of the queue once intake is gone.
        drop(tx);
        tracker.close();
        let drained = tokio::time::timeout(grace, tracker.wait()).await.is_ok();
        if !drained {
            abort();
            tracker.wait().await;
        }
        StopReport {
            finished: counters.finished.load(Ordering::Relaxed) - finished_before,
            abandoned: counters.abandoned.load(Ordering::Relaxed),
            requeued: counters.requeued.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
            handled_total: counters.finished.load(Ordering::Relaxed),
        }
    }
}

/// Queues items into a [`WorkerPool`]; see [`WorkerPool::submitter`].
pub(crate) struct Submitter<M> {
    tx: Tx<M>,
    stopping: CancellationToken,
}

impl<M> Clone for Submitter<M> {
    fn clone(&self) -> Self {
        Submitter {
            tx: self.tx.clone(),
            stopping: self.stopping.clone(),
        }
    }
}

impl<M: Send + 'static> Submitter<M> {
    /// Queues an item, waiting for room (backpressure). Gives the item back when the pool is
    /// stopping, so the caller can hand it back to the broker.
    pub async fn submit(&self, item: M) -> Result<(), M> {
        self.tx.send(item, &self.stopping).await
    }

    /// Queues an item only if there is room now (load shedding); gives it back, saying why,
    /// when the queue is full or the pool is stopping.
    pub fn try_submit(&self, item: M) -> Result<(), (M, Refused)> {
        if self.stopping.is_cancelled() {
            return Err((item, Refused::Stopping));
        }
        let Some(tx) = self.tx.tx.as_ref() else {
            return Err((item, Refused::Stopping));
        };
        match tx.try_reserve() {
            Ok(permit) => {
                permit.send(item);
                self.tx.available.notify_one();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(())) => Err((item, Refused::Full)),
            Err(mpsc::error::TrySendError::Closed(())) => Err((item, Refused::Stopping)),
        }
    }
}

/// Why [`Submitter::try_submit`] gave an item back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `buffer` items already wait for a worker.
    Full,
    /// The pool is stopping.
    Stopping,
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn never_runs_more_than_workers_at_once() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (r, p) = (running.clone(), peak.clone());
        let pool = WorkerPool::start(3, 2, move |_: u32, _ctx| {
            let (r, p) = (r.clone(), p.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(2)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                Outcome::Finished
            }
            .boxed()
        });
        for i in 0..50 {
            pool.submit(i).await.unwrap();
        }
        let report = pool.stop(Duration::from_secs(10), false).await;
        assert_eq!(report.handled_total, 50);
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert_eq!(running.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_item_is_processed_once_by_many_workers_on_many_threads() {
        let seen = Arc::new(std::sync::Mutex::new(vec![0u8; 5000]));
        let s = seen.clone();
        let pool = WorkerPool::start(8, 4, move |i: usize, _ctx| {
            let s = s.clone();
            async move {
                if i.is_multiple_of(7) {
                    tokio::task::yield_now().await;
                }
                s.lock().unwrap()[i] += 1;
                Outcome::Finished
            }
            .boxed()
        });
        let submitters: Vec<_> = (0..2).map(|_| pool.submitter()).collect();
        let mut feeds = Vec::new();
        for (k, submitter) in submitters.into_iter().enumerate() {
            feeds.push(tokio::spawn(async move {
                for i in (k..5000).step_by(2) {
                    submitter.submit(i).await.unwrap();
                }
            }));
        }
        for feed in feeds {
            tokio::time::timeout(Duration::from_secs(10), feed)
                .await
                .expect("feeding finished")
                .unwrap();
        }
        let report = tokio::time::timeout(
            Duration::from_secs(10),
            pool.stop(Duration::from_secs(10), false),
        )
        .await
        .expect("stop returned");
        assert_eq!(report.handled_total, 5000);
        assert!(seen.lock().unwrap().iter().all(|&n| n == 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_worker_takes_an_item_while_another_is_busy() {
        let release = Arc::new(Notify::new());
        let (done_tx, mut done_rx) = mpsc::channel::<u32>(4);
        let r = release.clone();
        let pool = WorkerPool::start(2, 4, move |i: u32, _ctx| {
            let (r, done_tx) = (r.clone(), done_tx.clone());
            async move {
                if i == 0 {
                    r.notified().await;
                }
                let _ = done_tx.send(i).await;
                Outcome::Finished
            }
            .boxed()
        });
        // Item 0 keeps one worker busy; the items after it must not wait for it.
        for i in 0..3 {
            pool.submit(i).await.unwrap();
            if i > 0 {
                let done = tokio::time::timeout(Duration::from_secs(5), done_rx.recv()).await;
                assert_eq!(done.expect("handled while item 0 is busy"), Some(i));
            }
        }
        release.notify_one();
        let done = tokio::time::timeout(Duration::from_secs(5), done_rx.recv()).await;
        assert_eq!(done.expect("item 0 finished"), Some(0));
        let report = pool.stop(Duration::from_secs(5), false).await;
        assert_eq!(report.handled_total, 3);
    }

    #[tokio::test]
    async fn stop_aborts_after_grace_and_waits_for_cleanup() {
        let cleaned = Arc::new(AtomicUsize::new(0));
        let c = cleaned.clone();
        let pool = WorkerPool::start(2, 4, move |_: u32, ctx: WorkContext| {
            let c = c.clone();
            async move {
                tokio::select! {
                    _ = ctx.abort.cancelled() => { c.fetch_add(1, Ordering::SeqCst); Outcome::Abandoned }
                    _ = std::future::pending::<()>() => Outcome::Finished,
                }
            }
            .boxed()
        });
        pool.submit(1).await.unwrap();
        pool.submit(2).await.unwrap();
        let report = pool.stop(Duration::from_millis(50), false).await;
        assert_eq!(report.abandoned, 2);
        assert_eq!(cleaned.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abort_ends_parked_workers_while_the_queue_is_still_open() {
        for crash in [false, true] {
            let pool = WorkerPool::start(4, 4, |_: u32, _| async { Outcome::Finished }.boxed());
            // A submitter nobody drops keeps the queue open: only the abort (after the grace
            // period, or at once for a crash) can end the parked workers.
            let submitter = pool.submitter();
            submitter.submit(1).await.unwrap();
            let report = tokio::time::timeout(
                Duration::from_secs(5),
                pool.stop(Duration::from_millis(50), crash),
            )
            .await
            .expect("stop returned although a submitter is still held");
            assert_eq!(report.requeued + report.abandoned, 0);
            assert_eq!(submitter.submit(2).await, Err(2));
        }
    }

    #[tokio::test]
    async fn submit_after_stop_gives_the_item_back() {
        let pool = WorkerPool::start(1, 1, |_: u32, _| async { Outcome::Finished }.boxed());
        let ctx = pool.context();
        ctx.stopping.cancel();
        assert_eq!(pool.submit(9).await, Err(9));
    }

    #[tokio::test]
    async fn try_submit_refuses_when_full_and_when_stopping() {
        let gate = Arc::new(Notify::new());
        let g = gate.clone();
        let pool = WorkerPool::start(1, 1, move |_: u32, _| {
            let g = g.clone();
            async move {
                g.notified().await;
                Outcome::Finished
            }
            .boxed()
        });
        let submitter = pool.submitter();
        // One item taken by the worker, one waiting: the queue (1) is then full.
        submitter.try_submit(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match submitter.try_submit(2) {
                Ok(()) => break,
                Err((_, Refused::Full)) if Instant::now() < deadline => {
                    tokio::task::yield_now().await
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        assert_eq!(submitter.try_submit(3), Err((3, Refused::Full)));
        pool.context().stopping.cancel();
        assert_eq!(submitter.try_submit(4), Err((4, Refused::Stopping)));
        drop(submitter);
        gate.notify_waiters();
        gate.notify_one();
        gate.notify_one();
        let report = pool.stop(Duration::from_secs(5), false).await;
        assert_eq!(report.handled_total + report.abandoned, 2);
    }

    #[tokio::test]
    async fn submitter_queues_until_stopping() {
        let pool = WorkerPool::start(1, 1, |_: u32, _| async { Outcome::Finished }.boxed());
        let submitter = pool.submitter();
        submitter.submit(1).await.unwrap();
        pool.context().stopping.cancel();
        assert_eq!(submitter.submit(2).await, Err(2));
        drop(submitter);
        let report = pool.stop(Duration::from_secs(5), false).await;
        assert_eq!(report.handled_total, 1);
    }
}
