//! [`EventSource`]: listeners added and removed at run time, by event type and/or transaction
//! id, once or many times, and the [`EventResponsePromise`] built on it.
//!
//! These listeners see events as they are published (they are not durable consumers: an
//! event published while nobody listens is not replayed to them). One subscription is made
//! per event type that has listeners (and one for all event subjects while a listener filters
//! by transaction id only); it starts with the first listener and stops after the last.
//! While every listener of a subscription waits for given transaction ids (as promises do), an
//! event whose transaction id, read without decoding it, is none of theirs is skipped unbuilt.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::codec::ReceivedEvent;
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, HeaderMap};
use crate::error::{Error, ListenError, ListenErrorKind, ResponseError, ResponseErrorKind};
use crate::event::{EventExt, EventType, TransactionId};

/// How many responses a promise holds before the oldest unread ones are refused (logged).
pub const PROMISE_BUFFER: usize = 64;

/// Identifies a listener of an [`EventSource`], to remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(u64);

/// Which events a listener gets: by type, by transaction id, or both (not neither), and
/// whether it is removed after its first event.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::EventFilter;
/// use ce_messaging::cloudevent::TransactionId;
///
/// let tid = TransactionId::generate();
/// let filter = EventFilter::by_type("org.example.done").and_transaction(tid).once();
/// assert!(filter.is_once());
/// ```
#[derive(Debug, Clone)]
pub struct EventFilter {
    event_type: Option<EventType>,
    tid: Option<TransactionId>,
    once: bool,
}

impl EventFilter {
    /// Events of one type.
    pub fn by_type(event_type: impl Into<EventType>) -> Self {
        EventFilter {
            event_type: Some(event_type.into()),
            tid: None,
            once: false,
        }
    }

    /// Events of any type with one transaction id.
    pub fn by_transaction(tid: TransactionId) -> Self {
        EventFilter {
            event_type: None,
            tid: Some(tid),
            once: false,
        }
    }

    /// Also require this transaction id.
    #[must_use]
    pub fn and_transaction(mut self, tid: TransactionId) -> Self {
        self.tid = Some(tid);
        self
    }

    /// Remove the listener after its first event.
    #[must_use]
    pub fn once(mut self) -> Self {
        self.once = true;
        self
    }

    /// Whether the listener is removed after its first event.
    pub fn is_once(&self) -> bool {
        self.once
    }

    fn matches(&self, event: &ReceivedEvent, tid: Option<&TransactionId>) -> bool {
        self.event_type
            .as_ref()
            .is_none_or(|t| t.as_str() == event.ty())
            && self.tid.as_ref().is_none_or(|want| Some(want) == tid)
    }

    /// Whether this filter's listener is served by the subscription `key` ([`key`](Self::key)
    /// without making one).
    fn is_on(&self, key: &SubKey) -> bool {
        match (&self.event_type, key) {
            (Some(t), SubKey::Type(k)) => t.as_str() == k,
            (None, SubKey::All) => true,
            _ => false,
        }
    }

    fn key(&self) -> SubKey {
        match &self.event_type {
            Some(t) => SubKey::Type(t.as_str().to_owned()),
            None => SubKey::All,
        }
    }
}

/// A raw published event as a backend's subscription delivers it.
pub(crate) struct RawEvent {
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
}

/// What a backend provides: a live subscription to the events of one type, or of all types.
/// The subscription must be active on the server when `subscribe` returns.
#[async_trait]
pub(crate) trait SourceBackend: Send + Sync {
    async fn subscribe(
        &self,
        event_type: Option<&str>,
    ) -> Result<BoxStream<'static, RawEvent>, ListenError>;
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SubKey {
    Type(String),
    All,
}

type Callback = Arc<dyn Fn(ReceivedEvent) + Send + Sync>;

struct Entry {
    filter: EventFilter,
    callback: Callback,
}

struct Subscription {
    refs: usize,
    stop: CancellationToken,
}

#[derive(Default)]
struct State {
    listeners: HashMap<ListenerId, Entry>,
    subscriptions: HashMap<SubKey, Subscription>,
}

struct Inner {
    backend: Arc<dyn SourceBackend>,
    state: Mutex<State>,
    next_id: AtomicU64,
    // Serialises subscription set-up so two first listeners of a type make one subscription.
    setup: tokio::sync::Mutex<()>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a callback panicked while the map was held; the map
        // itself is always left consistent, so keep using it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Dynamic listeners on published events. Cheap to clone; clones share the listeners.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(events: &dyn ce_messaging::events::EventConnection) -> Result<(), ce_messaging::error::ListenError> {
/// use ce_messaging::events::EventFilter;
///
/// let source = events.event_source();
/// let id = source
///     .add_listener(EventFilter::by_type("org.example.order.created"), |event| println!("{event}"))
///     .await?;
/// // ...
/// source.remove_listener(id).await;
/// assert_eq!(source.subscription_count(), 0);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EventSource {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSource")
            .field("listeners", &self.listener_count())
            .field("subscriptions", &self.subscription_count())
            .finish()
    }
}

impl EventSource {
    pub(crate) fn new(backend: Arc<dyn SourceBackend>) -> Self {
        EventSource {
            inner: Arc::new(Inner {
                backend,
                state: Mutex::new(State::default()),
                next_id: AtomicU64::new(1),
                setup: tokio::sync::Mutex::new(()),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// Adds a listener; returns once its subscription is active, so an event published after
    /// this returns is seen. The callback runs on the source's dispatch task: keep it short
    /// (hand work to a channel or spawn).
    ///
    /// # Errors
    ///
    /// `InvalidOptions` for a filter with neither type nor transaction id; `Subscribe` when the
    /// subscription fails.
    pub async fn add_listener(
        &self,
        filter: EventFilter,
        callback: impl Fn(ReceivedEvent) + Send + Sync + 'static,
    ) -> Result<ListenerId, ListenError> {
        if filter.event_type.is_none() && filter.tid.is_none() {
            return Err(Error::with_detail(
                ListenErrorKind::InvalidOptions,
                "a listener needs an event type, a transaction id, or both",
            ));
        }
        if let Some(event_type) = &filter.event_type {
            event_type
                .check()
                .map_err(|e| e.map_kind(|_| ListenErrorKind::InvalidOptions))?;
        }
        let id = ListenerId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let key = filter.key();
        let _setup = self.inner.setup.lock().await;
        let exists = {
            let mut state = self.lock();
            match state.subscriptions.get_mut(&key) {
                Some(sub) => {
                    sub.refs += 1;
                    true
                }
                None => false,
            }
        };
        if !exists {
            let event_type = match &key {
                SubKey::Type(t) => Some(t.as_str()),
                SubKey::All => None,
            };
            let stream = self.inner.backend.subscribe(event_type).await?;
            let stop = CancellationToken::new();
            self.lock().subscriptions.insert(
                key.clone(),
                Subscription {
                    refs: 1,
                    stop: stop.clone(),
                },
            );
            tokio::spawn(dispatch(Arc::downgrade(&self.inner), key, stream, stop));
        }
        self.lock().listeners.insert(
            id,
            Entry {
                filter,
                callback: Arc::new(callback),
            },
        );
        Ok(id)
    }

    /// Removes a listener; returns whether it was there. Its subscription stops when it was
    /// the last listener using it.
    pub async fn remove_listener(&self, id: ListenerId) -> bool {
        let mut state = self.lock();
        remove_locked(&mut state, id)
    }

    /// Number of listeners.
    pub fn listener_count(&self) -> usize {
        self.lock().listeners.len()
    }

    /// Number of active subscriptions (0 once every listener is gone).
    pub fn subscription_count(&self) -> usize {
        self.lock().subscriptions.len()
    }

    /// A promise of the events of `types` (any type when empty) with transaction id `tid`.
    pub(crate) async fn promise(
        &self,
        tid: TransactionId,
        types: &[EventType],
        default_timeout: Duration,
    ) -> Result<EventResponsePromise, ResponseError> {
        let (tx, rx) = mpsc::channel(PROMISE_BUFFER);
        let filters: Vec<EventFilter> = if types.is_empty() {
            vec![EventFilter::by_transaction(tid.clone())]
        } else {
            types
                .iter()
                .map(|t| EventFilter::by_type(t.clone()).and_transaction(tid.clone()))
                .collect()
        };
        let mut promise = EventResponsePromise {
            rx,
            ids: Vec::with_capacity(filters.len()),
            source: self.clone(),
            tid,
            default_timeout,
            published: None,
        };
        for filter in filters {
            let tx = tx.clone();
            let added = self
                .add_listener(filter, move |event| {
                    if let Err(err) = tx.try_send(event) {
                        tracing::warn!(error = %err, "promise buffer full or closed; response not kept");
                    }
                })
                .await;
            match added {
                Ok(id) => promise.ids.push(id),
                Err(err) => {
                    promise.release();
                    return Err(Error::with_source(ResponseErrorKind::Listen, err));
                }
            }
        }
        Ok(promise)
    }
}

fn remove_locked(state: &mut State, id: ListenerId) -> bool {
    let Some(entry) = state.listeners.remove(&id) else {
        return false;
    };
    let key = entry.filter.key();
    if let Some(sub) = state.subscriptions.get_mut(&key) {
        sub.refs = sub.refs.saturating_sub(1);
        if sub.refs == 0 {
            sub.stop.cancel();
            state.subscriptions.remove(&key);
        }
    }
    true
}

/// Whether `raw` is certainly for none of the listeners of subscription `key`: when each of
/// them waits for a transaction id (promises; the subscription of all types has only such
/// listeners) and the message's transaction id, read without decoding it
/// ([`codec::peek_transaction_id`]), is none of theirs. Such events (other requests'
/// responses, every event of every type for the subscription of all types) are then skipped
/// without building them: a decode is most of what handling one costs here. When the
/// transaction id cannot be read that cheaply, the event is decoded and matched as before.
fn is_for_others(inner: &Inner, key: &SubKey, raw: &RawEvent) -> bool {
    let state = inner.lock();
    let mut on_key = state.listeners.values().filter(|e| e.filter.is_on(key));
    if !on_key.clone().all(|e| e.filter.tid.is_some()) {
        return false;
    }
    // Under the lock (a byte walk, no await), so the listeners asked are the ones looked at.
    let Some(tid) = codec::peek_transaction_id(raw.headers.as_ref(), &raw.payload) else {
        return false;
    };
    !on_key.any(|e| e.filter.tid.as_ref().is_some_and(|t| t.as_str() == tid))
}

async fn dispatch(
    inner: std::sync::Weak<Inner>,
    key: SubKey,
    mut stream: BoxStream<'static, RawEvent>,
    stop: CancellationToken,
) {
    loop {
        let raw = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            raw = stream.next() => match raw {
                Some(raw) => raw,
                None => break,
            },
        };
        let Some(inner) = inner.upgrade() else { break };
        if is_for_others(&inner, &key, &raw) {
            continue;
        }
        let event = match codec::decode(raw.headers.as_ref(), &raw.payload) {
            Ok(event) => event,
            Err(err) => {
                tracing::debug!(error = %err, "event source skipped an undecodable message");
                continue;
            }
        };
        let tid = event.transaction_id();
        let callbacks: Vec<Callback> = {
            let mut state = inner.lock();
            let matching: Vec<(ListenerId, bool, Callback)> = state
                .listeners
                .iter()
                .filter(|(_, e)| e.filter.is_on(&key) && e.filter.matches(&event, tid.as_ref()))
                .map(|(id, e)| (*id, e.filter.once, e.callback.clone()))
                .collect();
            for (id, once, _) in &matching {
                if *once {
                    remove_locked(&mut state, *id);
                }
            }
            matching.into_iter().map(|(_, _, cb)| cb).collect()
        };
        match callbacks.len() {
            0 => {}
            1 => (callbacks[0])(event),
            _ => {
                for cb in &callbacks {
                    cb(event.clone());
                }
            }
        }
    }
}

/// The response(s) to a request event, matched by transaction id.
///
/// Dropping the promise (or [`close`](Self::close)) removes its listeners.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(mut promise: ce_messaging::events::EventResponsePromise) -> Result<(), ce_messaging::error::ResponseError> {
/// let first = promise.response(std::time::Duration::from_secs(5)).await?;
/// println!("{first}");
/// promise.close().await;
/// # Ok(()) }
/// ```
pub struct EventResponsePromise {
    rx: mpsc::Receiver<ReceivedEvent>,
    ids: Vec<ListenerId>,
    source: EventSource,
    tid: TransactionId,
    default_timeout: Duration,
    /// The outcome of the request's publish (`request`); `None` for `wait_for_response`.
    published: Option<crate::events::PublishAck>,
}

impl std::fmt::Debug for EventResponsePromise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventResponsePromise")
            .field("transaction_id", &self.tid)
            .field("published", &self.published)
            .finish()
    }
}

impl EventResponsePromise {
    /// The transaction id responses are matched on.
    pub fn transaction_id(&self) -> &TransactionId {
        &self.tid
    }

    /// How the request event of [`request`](crate::events::EventConnection::request) was
    /// stored (stream, sequence, and whether it was a **duplicate**); `None` for a promise of
    /// [`wait_for_response`](crate::events::EventConnection::wait_for_response), which
    /// publishes nothing.
    ///
    /// A duplicate means an earlier publish of the same event id (a retried request) was
    /// stored within the duplicate window and this one was not: the request was handled (or
    /// will be) once, for the earlier publish. A response that was sent before this promise
    /// started listening is not seen by it (promises see events as they are published), so a
    /// caller that retries requests should look here instead of only waiting for a timeout.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: &dyn ce_messaging::events::EventConnection, request: ce_messaging::Event) -> Result<(), Box<dyn std::error::Error>> {
    /// use ce_messaging::cloudevent::EventType;
    /// let promise = events.request(request, &[EventType::from("org.example.quote.given")]).await?;
    /// if promise.publish_ack().is_some_and(|ack| ack.duplicate) {
    ///     println!("already requested earlier; its response may have been sent already");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn publish_ack(&self) -> Option<&crate::events::PublishAck> {
        self.published.as_ref()
    }

    /// Records the outcome of the request's publish.
    pub(crate) fn set_publish_ack(&mut self, ack: crate::events::PublishAck) {
        self.published = Some(ack);
    }

    /// The next response, waiting up to `timeout`. A promise that times out releases its
    /// listeners (it gets no further responses).
    ///
    /// # Errors
    ///
    /// `TimedOut`; `Closed` when the promise was released.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a response not returned stays in the promise.
    pub async fn response(&mut self, timeout: Duration) -> Result<ReceivedEvent, ResponseError> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(event)) => Ok(event),
            Ok(None) => Err(Error::new(ResponseErrorKind::Closed)),
            Err(_) => {
                self.release();
                Err(Error::with_detail(
                    ResponseErrorKind::TimedOut,
                    format!("no response for {} within {timeout:?}", self.tid),
                ))
            }
        }
    }

    /// The next response within the connection's events timeout (`NATS_EVENTS_TIMEOUT`).
    ///
    /// # Errors
    ///
    /// As [`response`](Self::response).
    pub async fn response_default(&mut self) -> Result<ReceivedEvent, ResponseError> {
        let timeout = self.default_timeout;
        self.response(timeout).await
    }

    /// The responses as a stream (ends when the promise is released).
    pub fn responses(&mut self) -> impl Stream<Item = ReceivedEvent> + '_ {
        futures::stream::poll_fn(move |cx| self.rx.poll_recv(cx))
    }

    /// Releases the listeners. Responses already received can still be read.
    pub async fn close(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let mut state = self.source.lock();
        for id in self.ids.drain(..) {
            remove_locked(&mut state, id);
        }
    }
}

impl Drop for EventResponsePromise {
    fn drop(&mut self) {
        self.release();
    }
}
