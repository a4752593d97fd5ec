//! The bounded worker pool behind every listener: at most `workers` items are processed at once,
//! at most `buffer` wait, and stopping is drain-then-close (stop intake, let in-flight work finish
//! within a grace period, then abort what is left and wait for it to be cleaned up).
//!
//! Workers are long-lived tasks pulling from one bounded queue: no task is spawned per message.
//! The queue and the wakers of the workers parked on it are kept under one short synchronous
//! lock ([`Queue`]), so that the hand-off costs one lock on each side and one wake-up: a sender
//! queues an item and takes an idle worker's waker under the lock, then wakes it; a worker takes
//! an item, or parks (leaves its waker) when there is none, under the lock. A worker that finds
//! an item waiting takes it without parking, and a parked worker is woken at most once per item
//! (a busy worker is never registered, so a send never wakes it instead of an idle one). The
//! abort and the last sender's drop wake every parked worker. Senders waiting for room are all
//! woken when a worker takes an item, and are not served in the order they began to wait
//! (a channel's were); each listener has one intake per pool, so no sender waits behind others.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use crate::error::BoxError;

/// How one item's processing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The handler ran to completion (whatever its result) and the item was settled.
    Finished,
    /// Processing was cut off by the grace period running out (the item was nak'ed or dropped).
    Abandoned,
    /// The item was not started because the listener was stopping; it was handed back (nak).
    /// Event listeners no longer do this (what they received is run within the grace period,
    /// see [`DeliveryWindow`]); kept for the report's field.
    #[allow(dead_code)]
    Requeued,
}

/// Signals given to the code that processes one item. Shared: each item gets a clone, which
/// is one reference count (a clone of each token would lock each token's tree node twice).
#[derive(Clone)]
pub(crate) struct WorkContext(Arc<WorkSignals>);

/// The signals of a [`WorkContext`].
pub(crate) struct WorkSignals {
    /// Set when the listener begins to stop: items not yet started should be handed back.
    pub stopping: CancellationToken,
    /// Set when the grace period ran out: in-flight work must give up now.
    pub abort: CancellationToken,
    /// Set when the stop is over (every worker and the intake have ended).
    pub finished: CancellationToken,
    crashed: AtomicBool,
}

impl std::ops::Deref for WorkContext {
    type Target = WorkSignals;

    fn deref(&self) -> &WorkSignals {
        &self.0
    }
}

impl WorkSignals {
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

/// The pool's bounded queue and its parked workers.
struct Queue<M> {
    state: Mutex<QueueState<M>>,
    capacity: usize,
    /// Set (before the parked workers are woken) when the grace period ran out: workers take
    /// no more items and end.
    aborted: AtomicBool,
    /// Wakes senders that wait for room ([`Tx::send`]); notified only while one waits.
    room: Notify,
}

struct QueueState<M> {
    items: VecDeque<M>,
    /// The wakers of parked workers (worker index, waker), the last parked last.
    idle: Vec<(usize, Waker)>,
    /// `parked[i]`: worker `i` has an entry in `idle` (so it has at most one).
    parked: Vec<bool>,
    /// Live senders: once there is none and `items` is empty, the workers end.
    senders: usize,
    /// Workers still running: once there is none, sends fail and queued items are dropped.
    workers: usize,
    /// Senders waiting in [`Tx::send`] for room.
    waiting_for_room: usize,
}

/// Why [`Queue::push`] gave an item back.
enum Unqueued {
    Full,
    /// Every worker has ended.
    Closed,
}

impl<M> QueueState<M> {
    /// The waker of the worker parked last, which is no longer parked.
    fn unpark_one(&mut self) -> Option<Waker> {
        let (index, waker) = self.idle.pop()?;
        self.parked[index] = false;
        Some(waker)
    }

    /// Every parked worker's waker; none is parked after.
    fn unpark_all(&mut self) -> Vec<Waker> {
        self.parked.iter_mut().for_each(|parked| *parked = false);
        self.idle.drain(..).map(|(_, waker)| waker).collect()
    }

    /// Forgets worker `index`'s entry, if it has one (it was woken by something else than a
    /// send, or is ending).
    fn unpark(&mut self, index: usize) {
        if self.parked[index] {
            self.parked[index] = false;
            self.idle.retain(|(i, _)| *i != index);
        }
    }

    /// Parks worker `index` with `waker` (the entry it has, if any, is updated).
    fn park(&mut self, index: usize, waker: &Waker) {
        if self.parked[index] {
            if let Some((_, parked)) = self.idle.iter_mut().find(|(i, _)| *i == index) {
                parked.clone_from(waker);
            }
        } else {
            self.parked[index] = true;
            self.idle.push((index, waker.clone()));
        }
    }
}

impl<M> Queue<M> {
    fn new(capacity: usize, workers: usize) -> Self {
        Queue {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                idle: Vec::with_capacity(workers),
                parked: vec![false; workers],
                senders: 0,
                workers,
                waiting_for_room: 0,
            }),
            capacity,
            aborted: AtomicBool::new(false),
            room: Notify::new(),
        }
    }

    /// The state. Nothing panics while it is locked (no user code runs under it: items are
    /// dropped and wakers woken after it is unlocked), so a poisoned lock still holds a
    /// consistent state and is used as it is.
    fn lock(&self) -> MutexGuard<'_, QueueState<M>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item` if there is room, and wakes a parked worker; `wait`: when there is no
    /// room, the caller is counted as waiting for room (see [`Tx::send`]).
    fn push(&self, item: M, wait: bool) -> Result<(), (M, Unqueued)> {
        let mut state = self.lock();
        if state.workers == 0 {
            return Err((item, Unqueued::Closed));
        }
        if state.items.len() >= self.capacity {
            if wait {
                state.waiting_for_room += 1;
            }
            return Err((item, Unqueued::Full));
        }
        state.items.push_back(item);
        let idle = state.unpark_one();
        drop(state);
        if let Some(worker) = idle {
            worker.wake();
        }
        Ok(())
    }

    /// Worker `index` takes the next item (`Some`), or learns that it is to end (`None`: the
    /// pool was aborted, or every sender is gone and nothing is queued), or parks.
    fn poll_take(&self, index: usize, cx: &mut Context<'_>) -> Poll<Option<M>> {
        let mut state = self.lock();
        // Looked at under the lock: an abort that stored it before it locked to wake the parked
        // workers is seen here, or finds this worker parked.
        if self.aborted.load(Ordering::SeqCst) {
            state.unpark(index);
            return Poll::Ready(None);
        }
        if let Some(item) = state.items.pop_front() {
            state.unpark(index);
            let waiting = state.waiting_for_room > 0;
            drop(state);
            if waiting {
                self.room.notify_waiters();
            }
            return Poll::Ready(Some(item));
        }
        if state.senders == 0 {
            state.unpark(index);
            return Poll::Ready(None);
        }
        state.park(index, cx.waker());
        Poll::Pending
    }

    /// Tells the workers to take no more items, and wakes the parked ones.
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        let idle = self.lock().unpark_all();
        idle.into_iter().for_each(Waker::wake);
    }

    fn add_sender(&self) {
        self.lock().senders += 1;
    }

    /// A sender is gone; the last one wakes the parked workers, which end once the queue is
    /// empty.
    fn remove_sender(&self) {
        let mut state = self.lock();
        state.senders -= 1;
        let idle = if state.senders == 0 {
            state.unpark_all()
        } else {
            Vec::new()
        };
        drop(state);
        idle.into_iter().for_each(Waker::wake);
    }

    /// Worker `index` has ended. Once every worker has, the queue is closed and what is still
    /// queued is dropped (after the lock is released), as a channel's receiver drops it.
    fn worker_ended(&self, index: usize) {
        let mut state = self.lock();
        state.unpark(index);
        state.workers -= 1;
        let left = if state.workers == 0 {
            std::mem::take(&mut state.items)
        } else {
            VecDeque::new()
        };
        let waiting = state.waiting_for_room > 0;
        drop(state);
        drop(left);
        if waiting {
            self.room.notify_waiters();
        }
    }
}

/// Ends a worker in its queue when its task ends, however it ends.
struct WorkerEnd<M> {
    queue: Arc<Queue<M>>,
    index: usize,
}

impl<M> Drop for WorkerEnd<M> {
    fn drop(&mut self) {
        self.queue.worker_ended(self.index);
    }
}

/// A sender waiting for room; uncounted when dropped.
struct WaitingForRoom<'a, M>(&'a Queue<M>);

impl<M> Drop for WaitingForRoom<'_, M> {
    fn drop(&mut self) {
        self.0.lock().waiting_for_room -= 1;
    }
}

/// The sending side of the pool's queue: sends wake one idle worker; dropping the last one lets
/// the workers see the end of the queue.
struct Tx<M> {
    queue: Arc<Queue<M>>,
}

impl<M> Tx<M> {
    fn new(queue: Arc<Queue<M>>) -> Self {
        queue.add_sender();
        Tx { queue }
    }
}

impl<M> Clone for Tx<M> {
    fn clone(&self) -> Self {
        Tx::new(self.queue.clone())
    }
}

impl<M> Drop for Tx<M> {
    fn drop(&mut self) {
        self.queue.remove_sender();
    }
}

impl<M> Tx<M> {
    /// Queues an item, waiting for room; gives it back when the pool is closed or, given a
    /// `stopping` token, stopping.
    async fn send(&self, item: M, stopping: Option<&CancellationToken>) -> Result<(), M> {
        if stopping.is_some_and(CancellationToken::is_cancelled) {
            return Err(item);
        }
        // Room now (the usual case): no need to wait on `stopping` as well.
        let mut item = match self.queue.push(item, false) {
            Ok(()) => return Ok(()),
            Err((item, Unqueued::Closed)) => return Err(item),
            Err((item, Unqueued::Full)) => item,
        };
        let stopped = async {
            match stopping {
                Some(stopping) => stopping.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stopped);
        loop {
            // Registered before looking again, so that an item taken after that look wakes
            // this sender (a worker that takes one notifies while a sender is counted).
            let room = self.queue.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            item = match self.queue.push(item, true) {
                Ok(()) => return Ok(()),
                Err((item, Unqueued::Closed)) => return Err(item),
                Err((item, Unqueued::Full)) => item,
            };
            let _waiting = WaitingForRoom(&self.queue);
            tokio::select! {
                biased;
                () = &mut stopped => return Err(item),
                () = room => {}
            }
        }
    }
}

/// A bounded pool of workers processing items of type `M`.
pub(crate) struct WorkerPool<M> {
    tx: Tx<M>,
    ctx: WorkContext,
    queue: Arc<Queue<M>>,
    tracker: TaskTracker,
    counters: Arc<Counters>,
}

impl<M: Send + 'static> WorkerPool<M> {
    /// Starts `workers` worker tasks reading from a queue of capacity `buffer`.
    ///
    /// `process` returns a future of its own type, run in place inside the worker's task: a
    /// listener that names no boxed future pays no heap allocation per item.
    pub fn start<F, Fut>(workers: usize, buffer: usize, process: F) -> Self
    where
        F: Fn(M, WorkContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        Self::start_stopping_with(workers, buffer, CancellationToken::new(), process)
    }

    /// Like [`start`](Self::start), with `stopping` as the pool's stopping signal: a child of
    /// the listener's token, so that a stop is seen by the intake at once (in the same
    /// step that cancels the token), not only once the supervisor task has run. A handler
    /// that stops its own listener (e.g. `cemsg listen --count`) thus stops the pulls before
    /// its event's place in the window is free again.
    pub fn start_stopping_with<F, Fut>(
        workers: usize,
        buffer: usize,
        stopping: CancellationToken,
        process: F,
    ) -> Self
    where
        F: Fn(M, WorkContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let workers = workers.max(1);
        let queue = Arc::new(Queue::new(buffer.max(1), workers));
        let tx = Tx::new(queue.clone());
        let ctx = WorkContext(Arc::new(WorkSignals {
            stopping,
            abort: CancellationToken::new(),
            finished: CancellationToken::new(),
            crashed: AtomicBool::new(false),
        }));
        let tracker = TaskTracker::new();
        let counters = Arc::new(Counters::default());
        let process = Arc::new(process);
        for index in 0..workers {
            let end = WorkerEnd {
                queue: queue.clone(),
                index,
            };
            let ctx = ctx.clone();
            let counters = counters.clone();
            let process = process.clone();
            tracker.spawn(async move {
                loop {
                    let queue = &end.queue;
                    let item = std::future::poll_fn(|cx| queue.poll_take(index, cx)).await;
                    let Some(item) = item else { break };
                    let outcome = process(item, ctx.clone()).await;
                    let counter = match outcome {
                        Outcome::Finished => &counters.finished,
                        Outcome::Abandoned => &counters.abandoned,
                        Outcome::Requeued => &counters.requeued,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                drop(end);
            });
        }
        WorkerPool {
            tx,
            ctx,
            queue,
            tracker,
            counters,
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
        self.tx.send(item, Some(&self.ctx.stopping)).await
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
            queue,
            tracker,
            counters,
        } = self;
        // Tells in-flight work to give up and the workers to take no more items.
        let abort = || {
            queue.abort();
            ctx.abort.cancel();
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
        ctx.finished.cancel();
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
    // Listeners use `submit_draining` (events) or `try_submit` (queries); the tests use this.
    #[cfg(test)]
    pub async fn submit(&self, item: M) -> Result<(), M> {
        self.tx.send(item, Some(&self.stopping)).await
    }

    /// Queues an item even while the pool is stopping (it is run within the grace period),
    /// waiting for room; gives it back only when the workers are gone (aborted) or the queue
    /// is closed. For an intake whose items already hold a place in a [`DeliveryWindow`], so
    /// that room is there.
    pub async fn submit_draining(&self, item: M) -> Result<(), M> {
        self.tx.send(item, None).await
    }

    /// Resolves once the pool is stopping; see [`Stopped`].
    pub fn stopped(&self) -> Stopped {
        Stopped::new(self.stopping.clone())
    }

    /// Queues an item only if there is room now (load shedding); gives it back, saying why,
    /// when the queue is full or the pool is stopping.
    pub fn try_submit(&self, item: M) -> Result<(), (M, Refused)> {
        if self.stopping.is_cancelled() {
            return Err((item, Refused::Stopping));
        }
        self.tx
            .queue
            .push(item, false)
            .map_err(|(item, why)| match why {
                Unqueued::Full => (item, Refused::Full),
                Unqueued::Closed => (item, Refused::Stopping),
            })
    }
}

/// Resolves once a pool's `stopping` token is cancelled, and costs little to poll again and
/// again: an intake loop polls it each time its source has nothing ready, i.e. once per
/// message. The token's own wait takes two locks at each poll (the token's node, then its
/// `Notify`); this polls it only at the first poll and when it woke the task, and otherwise
/// only updates the task's waker.
pub(crate) struct Stopped {
    wait: Pin<Box<WaitForCancellationFutureOwned>>,
    wake: Arc<StopWake>,
    /// The wait resolved: every later poll is ready at once (the wait is not polled again).
    done: bool,
}

/// The waker [`Stopped`] gives the token's wait: notes that the wait woke, and wakes the
/// task that polls the `Stopped`.
struct StopWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for StopWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.task.wake();
    }
}

impl Stopped {
    pub(crate) fn new(stopping: CancellationToken) -> Self {
        Stopped {
            wait: Box::pin(stopping.cancelled_owned()),
            // Woken: the first poll polls the wait, which registers this waker.
            wake: Arc::new(StopWake {
                woken: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
            done: false,
        }
    }
}

impl Future for Stopped {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(());
        }
        // Registered before the flag is read: a wake after the read wakes this task.
        this.wake.task.register(cx.waker());
        if !this.wake.woken.swap(false, Ordering::SeqCst) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.wake.clone());
        let polled = this.wait.as_mut().poll(&mut Context::from_waker(&waker));
        this.done = polled.is_ready();
        polled
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

/// A listener's window of deliveries: at most `capacity` deliveries are held at once (pulled
/// from the broker and not yet settled: queued for a worker or being handled), so that pulls
/// never outrun the workers, and a stop has at most that many events in hand, all of which
/// it can run within the grace period instead of handing them back. Deliveries in the
/// window that no worker has started yet are kept alive with in-progress signals
/// ([`keep_alive`](Self::keep_alive)), so waiting for a worker never makes the broker
/// redeliver them.
///
/// Places are taken with [`reserve`](Self::reserve) before asking the broker for messages
/// and turned into a [`Hold`] per delivery received; a `Hold` gives its place back when
/// dropped (the delivery was settled, or dropped unsettled).
#[derive(Clone)]
pub(crate) struct DeliveryWindow {
    inner: Arc<WindowInner>,
}

struct WindowInner {
    slots: Arc<tokio::sync::Semaphore>,
    capacity: usize,
    /// Deliveries received and not yet started, with weak references (a dropped delivery
    /// settles as usual through its acker's drop).
    waiting: std::sync::Mutex<Vec<Waiting>>,
}

struct Waiting {
    acker: std::sync::Weak<dyn Acker>,
    started: Arc<AtomicBool>,
}

impl Waiting {
    /// Not started by a worker and not dropped: still waiting for one.
    fn live(&self) -> bool {
        !self.started.load(Ordering::SeqCst) && self.acker.strong_count() > 0
    }
}

/// Places taken in a [`DeliveryWindow`] and not yet used; unused ones go back on drop.
pub(crate) struct Reserved {
    slots: Arc<tokio::sync::Semaphore>,
    count: usize,
}

impl Reserved {
    /// Places still unused.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Moves `n` of the unused places (at most all) into a reservation of their own.
    pub fn split(&mut self, n: usize) -> Reserved {
        let n = n.min(self.count);
        self.count -= n;
        Reserved {
            slots: self.slots.clone(),
            count: n,
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.count > 0 {
            self.slots.add_permits(self.count);
        }
    }
}

/// One delivery's place in a [`DeliveryWindow`]; given back when dropped.
pub(crate) struct Hold {
    slots: Option<Arc<tokio::sync::Semaphore>>,
    started: Arc<AtomicBool>,
}

impl Hold {
    /// A place in no window (tests that build a delivery by hand).
    #[cfg(test)]
    pub fn detached() -> Hold {
        Hold {
            slots: None,
            started: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Marks the delivery as started by a worker: no more keep-alive signals from the window
    /// (the handler's own in-progress ticks take over).
    pub fn start(&self) {
        self.started.store(true, Ordering::SeqCst);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.started.store(true, Ordering::SeqCst);
        if let Some(slots) = self.slots.take() {
            slots.add_permits(1);
        }
    }
}

impl DeliveryWindow {
    /// A window of `capacity` places (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        DeliveryWindow {
            inner: Arc::new(WindowInner {
                slots: Arc::new(tokio::sync::Semaphore::new(capacity)),
                capacity,
                waiting: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    /// Places in the window.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Waits until at least `min` places are free (clamped to the capacity), then takes every
    /// free place. Cancel-safe: nothing is taken until it returns.
    pub async fn reserve(&self, min: usize) -> Reserved {
        let min = min.clamp(1, self.inner.capacity) as u32;
        let mut count = 0usize;
        // The semaphore is never closed, so acquiring cannot fail; if it ever did, nothing
        // is taken and the caller asks again.
        if let Ok(permit) = self.inner.slots.acquire_many(min).await {
            permit.forget();
            count = min as usize;
        }
        while let Ok(permit) = self.inner.slots.try_acquire() {
            permit.forget();
            count += 1;
        }
        Reserved {
            slots: self.inner.slots.clone(),
            count,
        }
    }

    /// Takes every place free right now, without waiting (possibly none).
    pub fn try_reserve(&self) -> Reserved {
        let mut count = 0usize;
        while let Ok(permit) = self.inner.slots.try_acquire() {
            permit.forget();
            count += 1;
        }
        Reserved {
            slots: self.inner.slots.clone(),
            count,
        }
    }

    /// Takes one place of `reserved` (or, when none is left, e.g. for a message of an
    /// abandoned pull request, waits for a free one) for a delivery settled through `acker`.
    pub async fn hold(&self, reserved: &mut Reserved, acker: &Arc<dyn Acker>) -> Hold {
        if reserved.count > 0 {
            reserved.count -= 1;
        } else if let Ok(permit) = self.inner.slots.acquire().await {
            permit.forget();
        }
        let started = Arc::new(AtomicBool::new(false));
        if let Ok(mut waiting) = self.inner.waiting.lock() {
            // Entries of deliveries already started or dropped are of no use (and each keeps
            // its acker's allocation alive through the weak reference); the keep-alive tick
            // drops them, but a fast stream of events adds thousands between two ticks (a
            // 50,000-event backlog drained within one tick held them all: 6 MB). Drop them
            // here once the list holds twice the window: a live entry holds a place, so at
            // most `capacity` survive, the list stays under `2 * capacity`, and this runs at
            // most once per `capacity` holds.
            if waiting.len() >= 2 * self.inner.capacity {
                waiting.retain(Waiting::live);
            }
            waiting.push(Waiting {
                acker: Arc::downgrade(acker),
                started: started.clone(),
            });
        }
        Hold {
            slots: Some(self.inner.slots.clone()),
            started,
        }
    }

    /// Sends an in-progress signal for every delivery in the window that no worker has
    /// started yet; returns how many.
    pub async fn keep_alive(&self) -> usize {
        let ackers: Vec<Arc<dyn Acker>> = match self.inner.waiting.lock() {
            Ok(mut waiting) => {
                waiting.retain(Waiting::live);
                waiting.iter().filter_map(|w| w.acker.upgrade()).collect()
            }
            Err(_) => Vec::new(),
        };
        for acker in &ackers {
            if let Err(err) = acker.in_progress().await {
                tracing::debug!(error = %err, "in-progress for a queued event failed");
            }
        }
        ackers.len()
    }

    /// Keeps the window's queued deliveries alive every `tick` until `done` is cancelled.
    pub fn spawn_keep_alive(&self, tick: Duration, done: CancellationToken) {
        let window = self.clone();
        let tick = tick.max(Duration::from_millis(20));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
            loop {
                tokio::select! {
                    _ = done.cancelled() => break,
                    _ = ticker.tick() => { window.keep_alive().await; }
                }
            }
        });
    }
}

/// Settles one delivered message with the broker (what a [`Hold`] keeps alive with
/// `in_progress` while the handler runs).
#[async_trait::async_trait]
pub(crate) trait Acker: Send + Sync {
    async fn ack(&self) -> Result<(), BoxError>;
    async fn nak(&self, delay: Option<Duration>) -> Result<(), BoxError>;
    async fn in_progress(&self) -> Result<(), BoxError>;
    async fn term(&self) -> Result<(), BoxError>;
}

/// What a stop did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StopReport {
    /// Items that were in flight or queued when the stop began and finished within the grace
    /// period (handler ran, reply sent / event settled).
    pub finished: u64,
    /// Items cut off when the grace period ran out (events: nak'ed for immediate redelivery).
    pub abandoned: u64,
    /// Queued items that were not started and were handed back at once. Event listeners run
    /// what they received instead (see [`Listener::stop`](crate::listener::Listener::stop)), so for them this stays 0; events
    /// still queued when the grace period ends are nak'ed as they are dropped (not counted).
    pub requeued: u64,
    /// How long the stop took.
    pub elapsed: Duration,
    /// Items finished over the listener's whole life.
    pub handled_total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::mpsc;

    #[tokio::test]
    async fn never_runs_more_than_workers_at_once() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (r, p) = (running.clone(), peak.clone());
        // The future runs in place in the worker's task (not boxed).
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
        });
        // Bounded: a pool that loses a wake-up fails here instead of hanging the suite.
        tokio::time::timeout(Duration::from_secs(30), async {
            for i in 0..50 {
                pool.submit(i).await.unwrap();
            }
            let report = pool.stop(Duration::from_secs(10), false).await;
            assert_eq!(report.handled_total, 50);
        })
        .await
        .expect("the pool ran every item and stopped");
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert_eq!(running.load(Ordering::SeqCst), 0);
    }

    /// Once intake is gone (every submitter dropped, then the pool's own sender in `stop`),
    /// idle workers are woken to see the queue closed and end: a stop with a long grace period
    /// finishes as soon as the queued items are done, not when the grace period runs out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_sender_gone_ends_idle_workers_without_waiting_for_the_grace_period() {
        let pool = WorkerPool::start(4, 8, |_: u32, _| async { Outcome::Finished }.boxed());
        let submitter = pool.submitter();
        for i in 0..6 {
            submitter.submit(i).await.unwrap();
        }
        drop(submitter);
        // Every worker done and parked on the empty queue before the stop.
        tokio::time::timeout(Duration::from_secs(10), async {
            while pool.queue.lock().idle.len() < 4 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("every worker parked on the empty queue");
        let report = tokio::time::timeout(
            Duration::from_secs(10),
            pool.stop(Duration::from_secs(3600), false),
        )
        .await
        .expect("idle workers ended when the last sender was dropped");
        assert_eq!(report.handled_total, 6);
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

    /// Counts its drops: an item the pool dropped unprocessed.
    struct DropCount(Arc<AtomicUsize>);

    impl Drop for DropCount {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn items_still_queued_when_the_workers_end_are_dropped_and_sends_then_fail() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(Notify::new());
        let s = started.clone();
        let pool = WorkerPool::start(1, 4, move |item: DropCount, ctx: WorkContext| {
            let s = s.clone();
            async move {
                let _item = item;
                s.notify_one();
                ctx.abort.cancelled().await;
                Outcome::Abandoned
            }
            .boxed()
        });
        let submitter = pool.submitter();
        submitter
            .submit_draining(DropCount(dropped.clone()))
            .await
            .unwrap_or_else(|_| panic!("queued"));
        tokio::time::timeout(Duration::from_secs(5), started.notified())
            .await
            .expect("the worker took the first item");
        for _ in 0..3 {
            assert!(submitter
                .submit_draining(DropCount(dropped.clone()))
                .await
                .is_ok());
        }
        let report = tokio::time::timeout(
            Duration::from_secs(5),
            pool.stop(Duration::from_millis(50), false),
        )
        .await
        .expect("stop returned");
        assert_eq!(report.abandoned, 1);
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            4,
            "the one abandoned and the three never started"
        );
        // The workers are gone: a draining send gives its item back instead of queueing it.
        let back = submitter.submit_draining(DropCount(dropped.clone())).await;
        assert!(back.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopped_resolves_when_the_pool_stops_however_often_it_was_polled_before() {
        let pool = WorkerPool::start(1, 1, |_: u32, _| async { Outcome::Finished }.boxed());
        let submitter = pool.submitter();
        let mut stopped = submitter.stopped();
        for _ in 0..3 {
            assert!(futures::poll!(&mut stopped).is_pending());
        }
        // Cancelled from another task while this one waits.
        let stopping = pool.context().stopping.clone();
        let cancel = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            stopping.cancel();
        });
        tokio::time::timeout(Duration::from_secs(5), &mut stopped)
            .await
            .expect("stopped resolved once the pool was stopping");
        cancel.await.unwrap();
        // Resolved, it stays resolved: polled again, it is ready at once.
        assert!(futures::poll!(&mut stopped).is_ready());
        // One made once the pool is stopping resolves at its first poll.
        assert!(futures::poll!(submitter.stopped()).is_ready());
        drop(submitter);
        pool.stop(Duration::from_secs(5), false).await;
    }

    #[tokio::test]
    async fn submit_after_stop_gives_the_item_back() {
        let pool = WorkerPool::start(1, 1, |_: u32, _| async { Outcome::Finished }.boxed());
        let ctx = pool.context();
        ctx.stopping.cancel();
        assert_eq!(pool.submit(9).await, Err(9));
    }

    /// An acker that counts in-progress signals.
    #[derive(Default)]
    struct CountingAcker(AtomicUsize);

    #[async_trait::async_trait]
    impl Acker for CountingAcker {
        async fn ack(&self) -> Result<(), crate::error::BoxError> {
            Ok(())
        }
        async fn nak(&self, _: Option<Duration>) -> Result<(), crate::error::BoxError> {
            Ok(())
        }
        async fn in_progress(&self) -> Result<(), crate::error::BoxError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn term(&self) -> Result<(), crate::error::BoxError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_window_never_gives_out_more_places_than_it_has_and_takes_them_back() {
        let window = DeliveryWindow::new(3);
        let acker: Arc<dyn Acker> = Arc::new(CountingAcker::default());
        let mut reserved = window.reserve(1).await;
        assert_eq!(reserved.count(), 3, "every free place");
        let a = window.hold(&mut reserved, &acker).await;
        let b = window.hold(&mut reserved, &acker).await;
        drop(reserved);
        // One place is free again (the unused one), two are held.
        let more = window.reserve(1).await;
        assert_eq!(more.count(), 1);
        // Waiting for two places blocks until a hold is dropped.
        drop(more);
        let waiting = tokio::spawn({
            let window = window.clone();
            async move { window.reserve(2).await.count() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(a);
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a place came back")
            .unwrap();
        assert_eq!(got, 2);
        drop(b);
        assert_eq!(window.reserve(3).await.count(), 3);
    }

    #[tokio::test]
    async fn keep_alive_signals_only_deliveries_not_started_and_not_dropped() {
        let window = DeliveryWindow::new(4);
        let waiting = Arc::new(CountingAcker::default());
        let started = Arc::new(CountingAcker::default());
        let dropped = Arc::new(CountingAcker::default());
        let (w, s, d): (Arc<dyn Acker>, Arc<dyn Acker>, Arc<dyn Acker>) =
            (waiting.clone(), started.clone(), dropped.clone());
        let mut reserved = window.reserve(3).await;
        let _waiting_hold = window.hold(&mut reserved, &w).await;
        let started_hold = window.hold(&mut reserved, &s).await;
        let dropped_hold = window.hold(&mut reserved, &d).await;
        started_hold.start();
        drop(dropped_hold);
        drop(d);
        assert_eq!(window.keep_alive().await, 1);
        assert_eq!(waiting.0.load(Ordering::SeqCst), 1);
        assert_eq!(started.0.load(Ordering::SeqCst), 0);
        assert_eq!(dropped.0.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_window_forgets_finished_deliveries_between_keep_alive_ticks() {
        let window = DeliveryWindow::new(4);
        let waiting = Arc::new(CountingAcker::default());
        let w: Arc<dyn Acker> = waiting.clone();
        let mut reserved = window.reserve(1).await;
        let _waiting_hold = window.hold(&mut reserved, &w).await;
        drop(reserved);
        // A thousand deliveries come and go (started or dropped) and no tick comes.
        for i in 0..1_000 {
            let acker: Arc<dyn Acker> = Arc::new(CountingAcker::default());
            let mut reserved = window.reserve(1).await;
            let hold = window.hold(&mut reserved, &acker).await;
            if i % 2 == 0 {
                hold.start();
            }
            drop(hold);
            let entries = window.inner.waiting.lock().unwrap().len();
            assert!(
                entries <= 2 * window.capacity(),
                "{entries} entries after {i}"
            );
        }
        // The one still waiting is still kept alive, and only it.
        assert_eq!(window.keep_alive().await, 1);
        assert_eq!(waiting.0.load(Ordering::SeqCst), 1);
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
