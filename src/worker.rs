//! The bounded worker pool behind every listener: at most `workers` items are processed at once,
//! at most `buffer` wait, and stopping is drain-then-close (stop intake, let in-flight work finish
//! within a grace period, then abort what is left and wait for it to be cleaned up).
//!
//! Workers are long-lived tasks pulling from one bounded channel: no task is spawned per message.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, Mutex};
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

/// A bounded pool of workers processing items of type `M`.
pub(crate) struct WorkerPool<M> {
    tx: mpsc::Sender<M>,
    ctx: WorkContext,
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
        let rx = Arc::new(Mutex::new(rx));
        let ctx = WorkContext {
            stopping: CancellationToken::new(),
            abort: CancellationToken::new(),
            crashed: Arc::new(AtomicBool::new(false)),
        };
        let tracker = TaskTracker::new();
        let counters = Arc::new(Counters::default());
        let process = Arc::new(process);
        for _ in 0..workers {
            let rx = rx.clone();
            let ctx = ctx.clone();
            let counters = counters.clone();
            let process = process.clone();
            tracker.spawn(async move {
                loop {
                    // The lock is held only while waiting for the next item, so idle workers
                    // queue up on it and one of them takes each item.
                    let item = {
                        let mut rx = rx.lock().await;
                        tokio::select! {
                            biased;
                            _ = ctx.abort.cancelled() => None,
                            item = rx.recv() => item,
                        }
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
        if self.ctx.stopping.is_cancelled() {
            return Err(item);
        }
        tokio::select! {
            biased;
            _ = self.ctx.stopping.cancelled() => Err(item),
            permit = self.tx.reserve() => match permit {
                Ok(permit) => {
                    permit.send(item);
                    Ok(())
                }
                Err(_) => Err(item),
            },
        }
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
        let started = Instant::now();
        let finished_before = self.counters.finished.load(Ordering::Relaxed);
        if crash {
            self.ctx.crashed.store(true, Ordering::SeqCst);
            self.ctx.abort.cancel();
        }
        self.ctx.stopping.cancel();
        // Dropping our sender lets the workers see the end of the queue once intake is gone.
        drop(self.tx);
        self.tracker.close();
        let drained = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok();
        if !drained {
            self.ctx.abort.cancel();
            self.tracker.wait().await;
        }
        StopReport {
            finished: self.counters.finished.load(Ordering::Relaxed) - finished_before,
            abandoned: self.counters.abandoned.load(Ordering::Relaxed),
            requeued: self.counters.requeued.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
            handled_total: self.counters.finished.load(Ordering::Relaxed),
        }
    }
}

/// Queues items into a [`WorkerPool`]; see [`WorkerPool::submitter`].
pub(crate) struct Submitter<M> {
    tx: mpsc::Sender<M>,
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
        if self.stopping.is_cancelled() {
            return Err(item);
        }
        tokio::select! {
            biased;
            _ = self.stopping.cancelled() => Err(item),
            permit = self.tx.reserve() => match permit {
                Ok(permit) => {
                    permit.send(item);
                    Ok(())
                }
                Err(_) => Err(item),
            },
        }
    }
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

    #[tokio::test]
    async fn submit_after_stop_gives_the_item_back() {
        let pool = WorkerPool::start(1, 1, |_: u32, _| async { Outcome::Finished }.boxed());
        let ctx = pool.context();
        ctx.stopping.cancel();
        assert_eq!(pool.submit(9).await, Err(9));
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
