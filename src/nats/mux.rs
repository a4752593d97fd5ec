//! The request multiplexer: one wildcard subscription `<inbox>.*` per connection receives the
//! replies of every request and reply stream, routed by the last subject token to the caller
//! waiting for them.
//!
//! async-nats has a multiplexer of its own, but (0.51 and 0.52) it removes an entry only when
//! a reply arrives: every request that timed out left its entry (~310 bytes) in the client
//! for the connection's life. Here each caller holds a [`Waiter`] whose drop removes its
//! entry, whether a reply came, the caller timed out, or the caller's future was dropped; the
//! table only ever holds the requests being waited for, and at most [`MAX_PENDING`] of them.
//!
//! A reply is routed where it arrives, as async-nats routes its own: the subscription's waker
//! is a [`Router`], so the task that queues a reply on the subscription (async-nats'
//! connection task) reads it and hands it to its caller at once. A task of our own reading the
//! subscription cost every request one more wake-up and task poll between the connection and
//! the caller: about the same instructions, more CPU time per round trip (figures in
//! docs/performance.md, "Machinery per request").

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use async_nats::{Client, Message, Subject};
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot, OnceCell};

/// The most requests and reply streams one connection waits on at once; beyond that a request
/// is refused (each entry belongs to a caller that is still waiting, so this bounds callers).
pub(crate) const MAX_PENDING: usize = 1_000_000;

/// Why a waiter could not be registered.
#[derive(Debug)]
pub(crate) enum RegisterError {
    /// The connection was closed (the routing subscription ended).
    Closed,
    /// [`MAX_PENDING`] callers already wait.
    TooMany,
    /// The inbox subscription could not be made.
    Subscribe(async_nats::SubscribeError),
}

/// Where a reply goes.
enum Slot {
    /// The one reply of a request; the entry is removed when it arrives.
    Once(oneshot::Sender<Message>),
    /// The replies of a reply stream, until its waiter is dropped. Bounded: a stream nobody
    /// reads loses replies (as a slow consumer) instead of holding up the others.
    Many(mpsc::Sender<Message>),
}

/// Hashes the table's keys with one multiplication instead of SipHash (which costs a few
/// hundred instructions per lookup, and there are two per request). The keys are tokens this
/// connection hands out in sequence, not chosen by a peer: a reply to a made-up token is
/// only looked up, and the table's layout is ours. The multiplier is odd, so sequential tokens
/// fill distinct buckets and the high bits (hashbrown's tag) are spread.
#[derive(Default, Clone, Copy)]
struct TokenHasher(u64);

const TOKEN_MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for TokenHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; any other input still hashes deterministically.
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(TOKEN_MULTIPLIER);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(TOKEN_MULTIPLIER);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Default)]
struct Table {
    next: u64,
    slots: HashMap<u64, Slot, BuildHasherDefault<TokenHasher>>,
    closed: bool,
}

/// `prefix` followed by `token` in decimal: a reply subject, without the formatting machinery.
fn reply_subject(prefix: &str, token: u64) -> Subject {
    let mut digits = [0u8; 20];
    let token = crate::headers::decimal(token, &mut digits);
    let mut subject = String::with_capacity(prefix.len() + token.len());
    subject.push_str(prefix);
    subject.push_str(token);
    Subject::from(subject)
}

/// Reads a subscription of replies and routes each reply to its waiter. It is the
/// subscription's waker: whoever wakes the subscription (async-nats' connection task, having
/// queued a reply) reads and routes what is queued, then leaves this waker registered again.
///
/// One thread reads at a time (`reading`); a wake-up while another thread reads sets `woken`,
/// and the reader reads again before it is done. A wake-up can also come on the reading thread
/// itself (the channel wakes the waker being registered when a wake-up races the
/// registration): it only sets `woken` then.
struct Router<S> {
    /// The reply subjects' prefix: `<inbox>.`.
    prefix: String,
    table: Arc<Mutex<Table>>,
    /// The subscription; `None` once the route is dropped.
    replies: Mutex<Option<S>>,
    /// Set by every wake-up; cleared by the reader before it reads.
    woken: AtomicBool,
    /// Held by the thread that reads `replies` now.
    reading: AtomicBool,
}

impl<S> Router<S>
where
    S: Stream<Item = Message> + Unpin + Send + 'static,
{
    /// A router over `replies`, its waker registered (nothing can have arrived yet: no
    /// request has been sent with its prefix).
    fn start(prefix: String, replies: S) -> Arc<Self> {
        let router = Arc::new(Router {
            prefix,
            table: Arc::new(Mutex::new(Table::default())),
            replies: Mutex::new(Some(replies)),
            woken: AtomicBool::new(false),
            reading: AtomicBool::new(false),
        });
        router.woken_up();
        router
    }

    /// Reads what is queued, unless another thread reads now (it will read again: `woken`
    /// is set before `reading` is tried, and it checks `woken` after it lets `reading` go;
    /// every access is `SeqCst`, so one of the two sees the other).
    fn woken_up(self: &Arc<Self>) {
        self.woken.store(true, SeqCst);
        while self.woken.load(SeqCst)
            && self
                .reading
                .compare_exchange(false, true, SeqCst, SeqCst)
                .is_ok()
        {
            // A swap, not a store: it reads the waking thread's write, so what that thread
            // queued before it woke this router is seen by the read below.
            self.woken.swap(false, SeqCst);
            self.read_queued();
            self.reading.store(false, SeqCst);
        }
    }

    /// Routes every reply queued now; returns with this router registered as the
    /// subscription's waker (or the subscription ended or dropped).
    fn read_queued(self: &Arc<Self>) {
        let mut replies = self.replies.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(replies) = replies.as_mut() else {
            return;
        };
        let waker = Waker::from(Arc::clone(self));
        let mut cx = Context::from_waker(&waker);
        loop {
            // Unconstrained: this runs inside the task that woke the subscription, and with
            // that task's cooperative budget spent the read would put this router off until
            // that task yields, its replies waiting meanwhile.
            let next = pin!(tokio::task::unconstrained(replies.next()));
            match next.poll(&mut cx) {
                Poll::Pending => return,
                Poll::Ready(Some(message)) => self.deliver(message),
                Poll::Ready(None) => {
                    self.close();
                    return;
                }
            }
        }
    }

    /// Hands `message` to the waiter of its token, if there is one.
    fn deliver(&self, message: Message) {
        let Some(token) = message
            .subject
            .as_str()
            .strip_prefix(self.prefix.as_str())
            .and_then(|t| t.parse::<u64>().ok())
        else {
            return;
        };
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        match table.slots.get(&token) {
            Some(Slot::Once(_)) => {
                if let Some(Slot::Once(tx)) = table.slots.remove(&token) {
                    drop(table);
                    // The caller may have given up just now: nothing to do then.
                    let _ = tx.send(message);
                }
            }
            Some(Slot::Many(tx)) => {
                let discarded = tx.try_send(message).is_err();
                if discarded {
                    tracing::warn!(
                        token,
                        "reply stream not read fast enough (or dropped); reply discarded"
                    );
                }
            }
            // A late reply to a request that timed out: dropped, as NATS drops replies to an
            // inbox nobody listens on.
            None => {}
        }
    }

    /// The subscription ended (the connection closed): every waiter sees its channel closed
    /// and no new one registers.
    fn close(&self) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.closed = true;
        let slots = std::mem::take(&mut table.slots);
        drop(table);
        drop(slots);
    }
}

impl<S> Router<S> {
    /// Enters `slot` in the table under a new token; the waiter's drop removes it.
    fn register<R>(&self, slot: Slot, replies: R) -> Result<Waiter<R>, RegisterError> {
        let mut table = self.table.lock().map_err(|_| RegisterError::Closed)?;
        if table.closed {
            return Err(RegisterError::Closed);
        }
        if table.slots.len() >= MAX_PENDING {
            return Err(RegisterError::TooMany);
        }
        let token = table.next;
        table.next = table.next.wrapping_add(1);
        table.slots.insert(token, slot);
        drop(table);
        Ok(Waiter {
            token,
            subject: reply_subject(&self.prefix, token),
            table: self.table.clone(),
            replies,
        })
    }
}

impl<S> Wake for Router<S>
where
    S: Stream<Item = Message> + Unpin + Send + 'static,
{
    fn wake(self: Arc<Self>) {
        self.woken_up();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken_up();
    }
}

/// The routing subscription of one connection, made at the first request.
struct Route<S = async_nats::Subscriber> {
    router: Arc<Router<S>>,
}

impl<S> Drop for Route<S> {
    fn drop(&mut self) {
        // The subscription's channel holds the router (its waker) and the router holds the
        // subscription: dropping the subscription (which unsubscribes) ends the cycle, and
        // lets the client's connection go. Dropped after the lock is let go.
        let replies = self
            .router
            .replies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(replies);
    }
}

/// The multiplexer of one connection.
pub(crate) struct Multiplexer {
    client: Client,
    route: OnceCell<Route>,
}

/// One caller's registration: its reply subject and where its replies arrive. Dropping it
/// removes the entry.
pub(crate) struct Waiter<R> {
    token: u64,
    subject: Subject,
    table: Arc<Mutex<Table>>,
    pub(crate) replies: R,
}

impl<R> Waiter<R> {
    /// The reply subject to send the request with.
    pub(crate) fn reply_subject(&self) -> Subject {
        self.subject.clone()
    }
}

impl<R> Drop for Waiter<R> {
    fn drop(&mut self) {
        // A poisoned lock: a panic while the table was held; the entry cannot be trusted to be
        // removed, and nothing else can be done from a destructor.
        if let Ok(mut table) = self.table.lock() {
            table.slots.remove(&self.token);
            if table.slots.is_empty() && table.slots.capacity() > 4096 {
                // A burst grew the table; give the memory back once it is over.
                table.slots.shrink_to(64);
            }
        }
    }
}

impl Multiplexer {
    pub(crate) fn new(client: Client) -> Self {
        Multiplexer {
            client,
            route: OnceCell::new(),
        }
    }

    /// How many requests and reply streams wait for replies now.
    pub(crate) fn pending(&self) -> usize {
        self.route
            .get()
            .and_then(|route| route.router.table.lock().ok().map(|t| t.slots.len()))
            .unwrap_or(0)
    }

    async fn route(&self) -> Result<&Route, RegisterError> {
        self.route
            .get_or_try_init(|| async {
                let inbox = self.client.new_inbox();
                let subscriber = self
                    .client
                    .subscribe(format!("{inbox}.*"))
                    .await
                    .map_err(RegisterError::Subscribe)?;
                Ok(Route {
                    router: Router::start(format!("{inbox}."), subscriber),
                })
            })
            .await
    }

    async fn register<R>(&self, slot: Slot, replies: R) -> Result<Waiter<R>, RegisterError> {
        let route = self.route().await?;
        route.router.register(slot, replies)
    }

    /// [`one`](Self::one) without waiting, once the reply route is set up (every request
    /// after the connection's first); `None` before.
    pub(crate) fn one_now(
        &self,
    ) -> Option<Result<Waiter<oneshot::Receiver<Message>>, RegisterError>> {
        let route = self.route.get()?;
        let (tx, rx) = oneshot::channel();
        Some(route.router.register(Slot::Once(tx), rx))
    }

    /// Registers a request that waits for one reply.
    pub(crate) async fn one(&self) -> Result<Waiter<oneshot::Receiver<Message>>, RegisterError> {
        let (tx, rx) = oneshot::channel();
        self.register(Slot::Once(tx), rx).await
    }

    /// Registers a reply stream; at most `capacity` replies wait to be read.
    pub(crate) async fn many(
        &self,
        capacity: usize,
    ) -> Result<Waiter<mpsc::Receiver<Message>>, RegisterError> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.register(Slot::Many(tx), rx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(table: &Arc<Mutex<Table>>, token: u64) -> Waiter<()> {
        let (tx, _rx) = oneshot::channel();
        table.lock().unwrap().slots.insert(token, Slot::Once(tx));
        Waiter {
            token,
            subject: Subject::from(format!("_INBOX.x.{token}")),
            table: table.clone(),
            replies: (),
        }
    }

    #[test]
    fn reply_subjects_end_with_the_token_in_decimal() {
        for token in [0, 7, 10, 4096, 1_000_000, u64::MAX] {
            assert_eq!(
                reply_subject("_INBOX.abc.", token).as_str(),
                format!("_INBOX.abc.{token}")
            );
        }
    }

    #[test]
    fn dropping_a_waiter_removes_its_entry_and_shrinks_after_a_burst() {
        let table = Arc::new(Mutex::new(Table::default()));
        let waiters: Vec<_> = (0..10_000).map(|t| waiter(&table, t)).collect();
        assert_eq!(table.lock().unwrap().slots.len(), 10_000);
        drop(waiters);
        let table = table.lock().unwrap();
        assert!(table.slots.is_empty());
        assert!(table.slots.capacity() <= 4096, "{}", table.slots.capacity());
    }

    /// A subscription as async-nats makes one: a bounded tokio channel read with `poll_recv`
    /// (the same waker registration and cooperative budget).
    struct Inbox(mpsc::Receiver<Message>);

    impl Stream for Inbox {
        type Item = Message;

        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Message>> {
            self.0.poll_recv(cx)
        }
    }

    const PREFIX: &str = "_INBOX.test.";

    /// A route over a channel: the sender plays async-nats' connection task.
    fn route(capacity: usize) -> (Route<Inbox>, mpsc::Sender<Message>) {
        let (tx, rx) = mpsc::channel(capacity);
        let route = Route {
            router: Router::start(PREFIX.to_owned(), Inbox(rx)),
        };
        (route, tx)
    }

    /// A reply to `subject` whose payload is `body`.
    fn reply(subject: &Subject, body: &str) -> Message {
        Message {
            subject: subject.clone(),
            reply: None,
            payload: bytes::Bytes::from(body.to_owned()),
            headers: None,
            status: None,
            description: None,
            length: 0,
        }
    }

    fn once(route: &Route<Inbox>) -> Waiter<oneshot::Receiver<Message>> {
        let (tx, rx) = oneshot::channel();
        route.router.register(Slot::Once(tx), rx).unwrap()
    }

    fn pending(route: &Route<Inbox>) -> usize {
        route.router.table.lock().unwrap().slots.len()
    }

    const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_callers_each_get_their_own_reply_sent_from_several_threads() {
        const CALLERS: usize = 2_000;
        let (route, tx) = route(64);
        let waiters: Vec<_> = (0..CALLERS).map(|_| once(&route)).collect();
        let subjects: Vec<Subject> = waiters.iter().map(|w| w.reply_subject()).collect();
        let callers: Vec<_> = waiters
            .into_iter()
            .map(|mut waiter| {
                tokio::spawn(async move {
                    let expected = waiter.reply_subject().to_string();
                    let message = tokio::time::timeout(WAIT, &mut waiter.replies)
                        .await
                        .expect("no reply in time")
                        .expect("route closed");
                    assert_eq!(message.payload, expected.as_bytes());
                })
            })
            .collect();
        // Four threads queue replies at once, in reverse order: wake-ups race each other and
        // the registration of the router's waker.
        let senders: Vec<_> = subjects
            .chunks(CALLERS / 4)
            .map(|chunk| {
                let (tx, chunk) = (tx.clone(), chunk.to_vec());
                std::thread::spawn(move || {
                    for subject in chunk.iter().rev() {
                        tx.blocking_send(reply(subject, subject.as_str())).unwrap();
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.await.unwrap();
        }
        for sender in senders {
            sender.join().unwrap();
        }
        assert_eq!(pending(&route), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replies_are_routed_as_they_are_queued_past_the_queueing_tasks_budget() {
        // The router reads inside the task that queues (async-nats' connection task). With
        // that task's cooperative budget spent (128 reads) a budgeted read would put the
        // router off until the task yields: replies would wait for nobody meanwhile.
        const REPLIES: usize = 1_000;
        let (route, tx) = route(REPLIES);
        let waiters: Vec<_> = (0..REPLIES).map(|_| once(&route)).collect();
        let queued = tokio::spawn(async move {
            let subjects: Vec<Subject> = waiters.iter().map(|w| w.reply_subject()).collect();
            for subject in &subjects {
                tx.try_send(reply(subject, "r")).unwrap();
            }
            // No await since the first reply was queued: each is with its caller already.
            waiters
                .into_iter()
                .filter_map(|mut waiter| waiter.replies.try_recv().ok())
                .count()
        });
        let routed = tokio::time::timeout(WAIT, queued).await.unwrap().unwrap();
        assert_eq!(routed, REPLIES);
        assert_eq!(pending(&route), 0);
    }

    #[tokio::test]
    async fn a_caller_that_gave_up_leaves_no_entry_and_its_late_reply_goes_nowhere() {
        let (route, tx) = route(8);
        let gone = once(&route);
        let mut waiting = once(&route);
        let gone_subject = gone.reply_subject();
        drop(gone);
        assert_eq!(pending(&route), 1);
        tx.send(reply(&gone_subject, "late")).await.unwrap();
        tx.send(reply(&waiting.reply_subject(), "mine"))
            .await
            .unwrap();
        let message = tokio::time::timeout(WAIT, &mut waiting.replies)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(message.payload, "mine");
        drop(waiting);
        assert_eq!(pending(&route), 0);
    }

    #[tokio::test]
    async fn a_reply_stream_read_slowly_loses_its_excess_without_holding_up_requests() {
        let (route, tx) = route(64);
        let (stream_tx, stream_rx) = mpsc::channel(2);
        let mut stream = route
            .router
            .register(Slot::Many(stream_tx), stream_rx)
            .unwrap();
        let mut request = once(&route);
        for i in 0..5 {
            tx.send(reply(&stream.reply_subject(), &i.to_string()))
                .await
                .unwrap();
        }
        tx.send(reply(&request.reply_subject(), "answer"))
            .await
            .unwrap();
        let answer = tokio::time::timeout(WAIT, &mut request.replies)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer.payload, "answer");
        // The two the stream holds, in order; the other three were discarded.
        for expected in ["0", "1"] {
            let message = stream.replies.try_recv().unwrap();
            assert_eq!(message.payload, expected);
        }
        assert!(stream.replies.try_recv().is_err());
        // Still registered: later replies arrive.
        tx.send(reply(&stream.reply_subject(), "5")).await.unwrap();
        let later = tokio::time::timeout(WAIT, stream.replies.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(later.payload, "5");
    }

    #[tokio::test]
    async fn the_subscription_ending_ends_every_waiter_and_refuses_new_ones() {
        let (route, tx) = route(8);
        let mut request = once(&route);
        let (stream_tx, stream_rx) = mpsc::channel(2);
        let mut stream = route
            .router
            .register(Slot::Many(stream_tx), stream_rx)
            .unwrap();
        drop(tx);
        let request = tokio::time::timeout(WAIT, &mut request.replies)
            .await
            .unwrap();
        assert!(request.is_err(), "the request still waits");
        let stream = tokio::time::timeout(WAIT, stream.replies.recv())
            .await
            .unwrap();
        assert!(stream.is_none(), "the stream still waits");
        let (tx, rx) = oneshot::channel();
        assert!(matches!(
            route.router.register(Slot::Once(tx), rx),
            Err(RegisterError::Closed)
        ));
    }

    #[tokio::test]
    async fn dropping_the_route_drops_the_subscription_and_the_router() {
        let (route, tx) = route(8);
        let router = Arc::downgrade(&route.router);
        drop(route);
        // The channel's sender (async-nats' connection task) sees the subscription gone;
        // once the sender goes too nothing holds the router (its waker) any more.
        assert!(tx.is_closed());
        drop(tx);
        assert!(router.upgrade().is_none(), "the router outlived its route");
    }
}
