//! [`MemoryQueries`]: the [`QueryConnection`] of the in-memory backend. Requests are encoded
//! with the real codec, published on the broker's subject space with an inbox for replies, and
//! served by listeners that subscribe in a queue group and feed the shared bounded worker pool.

use crate::codec::ReceivedEvent;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cloudevents::{AttributesReader, Event};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::bus::{is_valid_pattern, BusMessage, Inbox};
use super::MemoryBroker;
use crate::codec::{self, ContentMode, HeaderMap};
use crate::config::{Config, MAX_REQUEST_TIMEOUT};
use crate::error::BoxError;
use crate::error::{Error, ListenError, ListenErrorKind, RequestError, RequestErrorKind};
use crate::listener::Listener;
use crate::query::{
    header_size, interpret_reply, prepare_request, refuse_request, serve_request,
    set_request_timeout, QueryConnection, QueryHandlers, QueryListenOptions, RawReply, RawRequest,
    ReplyStream, ReplyStreamOptions, ReplyTarget, ServeContext, Shed, BUSY_TEXT,
};
use crate::worker::{Refused, WorkerPool};

struct Inner {
    broker: MemoryBroker,
    config: Config,
    client_id: String,
    queue_group: String,
    wildcard_subject: Option<String>,
    request_timeout: Duration,
    mode: ContentMode,
    /// Cancelled when `close` begins; every listener's token is a child of it, and no new
    /// listener starts.
    closing: CancellationToken,
    /// Cancelled when `close` has stopped the listeners: nothing is sent any more.
    closed: CancellationToken,
    listeners: Mutex<Vec<Listener>>,
    /// The ops requested so far: checked, their metric labels built.
    known_ops: crate::query::KnownOps,
}

/// The in-memory [`QueryConnection`]; made by
/// [`MemoryBroker::query_connection`](super::MemoryBroker::query_connection).
///
/// Cheap to clone; clones share the connection.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use ce_messaging::error::RequestErrorKind;
/// use ce_messaging::query::QueryConnection;
///
/// let broker = ce_messaging::memory::MemoryBroker::new();
/// let queries = broker.query_connection(&ce_messaging::config::Config::default());
/// let request = ce_messaging::cloudevent::new_event("org.example.nobody", "me", &()).unwrap();
/// let err = queries.request(request).await.unwrap_err();
/// assert_eq!(err.kind(), RequestErrorKind::NoResponders);
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryQueries {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryQueries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryQueries")
            .field("client_id", &self.inner.client_id)
            .field("closed", &self.is_closed())
            .finish()
    }
}

struct Prepared {
    subject: String,
    headers: HeaderMap,
    payload: bytes::Bytes,
}

impl MemoryQueries {
    pub(super) fn new(broker: MemoryBroker, config: &Config) -> Self {
        MemoryQueries {
            inner: Arc::new(Inner {
                broker,
                config: config.clone(),
                client_id: config.client_id.clone(),
                queue_group: config.queue_group().to_owned(),
                wildcard_subject: config.wildcard_subject.clone(),
                request_timeout: config.request_timeout.min(MAX_REQUEST_TIMEOUT),
                mode: config.ce_mode,
                closing: CancellationToken::new(),
                closed: CancellationToken::new(),
                listeners: Mutex::new(Vec::new()),
                known_ops: Default::default(),
            }),
        }
    }

    /// The configuration the connection was made with.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::config::Config;
    /// let config = Config { client_id: "billing".into(), ..Config::default() };
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// assert_eq!(broker.query_connection(&config).config().client_id, "billing");
    /// ```
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Whether [`close`](Self::close) was called.
    ///
    /// # Examples
    ///
    /// ```
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// let queries = broker.query_connection(&ce_messaging::config::Config::default());
    /// assert!(!queries.is_closed());
    /// ```
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Drain then close: refuses new listeners, stops this connection's listeners (each lets its
    /// in-flight handlers finish within its grace period; they may still send requests), then
    /// refuses requests. Returns when the listeners have stopped.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// let queries = broker.query_connection(&ce_messaging::config::Config::default());
    /// queries.close().await;
    /// assert!(queries.is_closed());
    /// # }
    /// ```
    pub async fn close(&self) {
        self.inner.closing.cancel();
        let listeners: Vec<Listener> = self
            .inner
            .listeners
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        for listener in listeners {
            listener.stopped().await;
        }
        self.inner.closed.cancel();
    }

    /// Encodes a request that its requester waits `timeout` for (`Request-Timeout-Ms`).
    /// `traced`: the request came through [`traced_request`](crate::query::traced_request),
    /// which did all but the source.
    fn prepare(
        &self,
        mut request: Event,
        timeout: Duration,
        traced: bool,
    ) -> Result<Prepared, RequestError> {
        if self.is_closed() {
            return Err(Error::new(RequestErrorKind::ConnectionClosed));
        }
        if traced {
            crate::event::populate_source(&mut request, &self.inner.client_id);
        } else {
            prepare_request(&mut request, &self.inner.client_id)?;
        }
        let subject = request.ty().to_owned();
        let encoded = codec::encode(&request, self.inner.mode)
            .map_err(|e| e.map_kind(|_| RequestErrorKind::Encode))?;
        let mut headers = HeaderMap::from(encoded.headers);
        set_request_timeout(&mut headers, timeout);
        self.inner
            .broker
            .check_size(&headers, &encoded.payload)
            .map_err(|detail| Error::with_detail(RequestErrorKind::Encode, detail))?;
        Ok(Prepared {
            subject,
            headers,
            payload: encoded.payload,
        })
    }

    /// Publishes the request with `inbox` for replies; returns how many subscriptions got it.
    fn send(&self, prepared: Prepared, inbox: Arc<Inbox>) -> usize {
        self.inner.broker.bus().publish(BusMessage {
            subject: prepared.subject,
            headers: (!prepared.headers.is_empty()).then_some(prepared.headers),
            payload: prepared.payload,
            reply: Some(inbox),
        })
    }

    fn capacity(&self) -> usize {
        self.inner.broker.options().subscription_capacity
    }
}

impl MemoryQueries {
    /// One request on the bus and its one reply (inside [`traced_request`](crate::query::traced_request)).
    async fn request_once(
        &self,
        request: Event,
        timeout: Duration,
    ) -> Result<ReceivedEvent, RequestError> {
        let timeout = timeout.min(MAX_REQUEST_TIMEOUT);
        let prepared = self.prepare(request, timeout, true)?;
        // One reply is all a request reads; a second one is dropped like a NATS reply to an
        // inbox that was already unsubscribed.
        let (inbox, mut replies) = Inbox::single();
        if self.send(prepared, inbox.clone()) == 0 {
            return Err(Error::new(RequestErrorKind::NoResponders));
        }
        // `inbox` stays alive here, so `recv` ends only with a reply or the timeout, as on NATS.
        match tokio::time::timeout(timeout, replies.recv()).await {
            Ok(Some(RawReply::Message { headers, payload })) => {
                interpret_reply(headers.as_ref(), &payload).map(|(event, _)| event)
            }
            Ok(Some(RawReply::NoResponders)) => Err(Error::new(RequestErrorKind::NoResponders)),
            Ok(None) => Err(Error::new(RequestErrorKind::ConnectionClosed)),
            Err(_) => Err(Error::with_detail(
                RequestErrorKind::TimedOut,
                format!("no reply within {timeout:?}"),
            )),
        }
    }
}

#[async_trait]
impl QueryConnection for MemoryQueries {
    fn default_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    async fn request_with_timeout(
        &self,
        request: Event,
        timeout: Duration,
    ) -> Result<ReceivedEvent, RequestError> {
        crate::query::traced_request(request, &self.inner.known_ops, |request| {
            self.request_once(request, timeout)
        })
        .await
    }

    async fn request_stream(
        &self,
        request: Event,
        mut options: ReplyStreamOptions,
    ) -> Result<ReplyStream, RequestError> {
        if options.max_replies == Some(0) {
            return Err(Error::with_detail(
                RequestErrorKind::InvalidOptions,
                "max_replies must be at least 1",
            ));
        }
        options.deadline = Some(
            options
                .deadline
                .unwrap_or(self.inner.request_timeout)
                .min(MAX_REQUEST_TIMEOUT),
        );
        let deadline = options.deadline.unwrap_or(self.inner.request_timeout);
        let prepared = self.prepare(request, deadline, false)?;
        let (inbox, replies) = Inbox::new(self.capacity());
        let delivered = self.send(prepared, inbox.clone());
        let first: Vec<RawReply> = if delivered == 0 {
            vec![RawReply::NoResponders]
        } else {
            Vec::new()
        };
        // The stream owns the inbox: it ends by the termination rules, not because repliers
        // are done, exactly as a NATS inbox subscription.
        let raw = futures::stream::iter(first)
            .chain(futures::stream::unfold(
                (replies, inbox),
                |(mut replies, inbox)| async move {
                    replies.recv().await.map(|reply| (reply, (replies, inbox)))
                },
            ))
            .boxed();
        Ok(ReplyStream::from_raw(
            raw,
            &options,
            self.inner.request_timeout,
        ))
    }

    async fn listen(
        &self,
        handlers: QueryHandlers,
        options: QueryListenOptions,
    ) -> Result<Listener, ListenError> {
        options.validate(&handlers)?;
        if self.inner.closing.is_cancelled() {
            return Err(Error::new(ListenErrorKind::ConnectionClosed));
        }
        let group = options
            .queue_group
            .clone()
            .unwrap_or_else(|| self.inner.queue_group.clone());
        let wildcard = options
            .wildcard_subject
            .clone()
            .or_else(|| self.inner.wildcard_subject.clone());
        let by_subject = wildcard.is_none();
        let subjects: Vec<String> = match wildcard {
            Some(wildcard) => vec![wildcard],
            None => handlers.ops().map(str::to_owned).collect(),
        };
        if let Some(bad) = subjects.iter().find(|s| !is_valid_pattern(s)) {
            return Err(Error::with_detail(
                ListenErrorKind::Subscribe,
                format!("{bad:?} is not a valid subject"),
            ));
        }
        let bus = self.inner.broker.bus();
        let mut incoming =
            futures::stream::select_all(subjects.iter().map(|s| bus.subscribe(s, Some(&group))));

        let ctx = Arc::new(ServeContext {
            handlers,
            source: self.inner.client_id.as_str().into(),
            by_subject,
        });
        let pool = WorkerPool::start(
            options.pool.workers,
            options.pool.buffer,
            move |request, work| {
                let ctx = ctx.clone();
                async move { serve_request(request, &ctx, &work).await }
            },
        );
        let submitter = pool.submitter();
        let stopping = pool.context().stopping.clone();
        let source = self.inner.client_id.clone();
        let max_payload = self.inner.broker.options().max_payload;
        pool.spawn_intake(async move {
            loop {
                let message = tokio::select! {
                    biased;
                    _ = stopping.cancelled() => break,
                    message = incoming.next() => match message {
                        Some(message) => message,
                        None => break,
                    },
                };
                // As on NATS: never wait for room; a full queue is answered 503 at once.
                match submitter.try_submit(raw_request(message, max_payload)) {
                    Ok(()) => {}
                    Err((request, Refused::Full)) => {
                        Shed::Busy.count(&request.subject);
                        refuse_request(request, &source, 503, BUSY_TEXT).await;
                    }
                    Err((request, Refused::Stopping)) => {
                        refuse(request, &source).await;
                        break;
                    }
                }
            }
            drop(submitter);
            // Unsubscribe before the stop completes: requests that arrive from now on find no
            // responder (or another member of the group). Requests already delivered to this
            // listener but not started are answered with a 503 at once.
            for subscription in incoming.iter_mut() {
                subscription.unsubscribe();
            }
            while let Some(message) = incoming.next().await {
                refuse(raw_request(message, max_payload), &source).await;
            }
        });
        let token = self.inner.closing.child_token();
        let listener = Listener::supervise(pool, options.pool.grace, token);
        if let Ok(mut listeners) = self.inner.listeners.lock() {
            listeners.retain(|l| !l.is_stopped());
            listeners.push(listener.clone());
        }
        Ok(listener)
    }
}

fn raw_request(message: BusMessage, max_payload: usize) -> RawRequest {
    let reply = message
        .reply
        .map(|inbox| Arc::new(SizedReply { inbox, max_payload }) as Arc<dyn ReplyTarget>);
    RawRequest::received(
        message.subject.into(),
        message.headers,
        message.payload,
        reply,
    )
}

/// A requester's inbox as a reply target that knows the broker's `max_payload`, so a reply
/// too large is refused as on NATS (where the client refuses it before sending).
struct SizedReply {
    inbox: Arc<dyn ReplyTarget>,
    max_payload: usize,
}

#[async_trait]
impl ReplyTarget for SizedReply {
    async fn send(&self, headers: HeaderMap, payload: bytes::Bytes) -> Result<(), BoxError> {
        let size = header_size(&headers) + payload.len();
        if size > self.max_payload {
            return Err(format!(
                "message of {size} bytes exceeds max payload {}",
                self.max_payload
            )
            .into());
        }
        self.inbox.send(headers, payload).await
    }

    fn max_payload(&self) -> usize {
        self.max_payload
    }
}

/// Answers a request the stopping listener will not serve: 503, so the requester fails at once
/// instead of waiting for its timeout.
async fn refuse(request: RawRequest, source: &str) {
    refuse_request(request, source, 503, "listener stopping").await;
}

/// Draining closes the connection ([`MemoryQueries::close`]), as the last step of a
/// [`Shutdown`](crate::shutdown::Shutdown).
impl crate::shutdown::Drain for MemoryQueries {
    async fn drain(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.close().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::codec::ContentMode;
    use crate::error::RemoteError;
    use crate::event::EventExt;
    use crate::event::{new_event, TransactionId};
    use crate::handler::HandlerError;
    use crate::query::content_mode_of;
    use crate::query::{handler_fn, typed_handler, TypedRequest};

    const WAIT: Duration = Duration::from_secs(10);

    fn config(mode: ContentMode) -> Config {
        Config {
            client_id: format!("test-{}", xid::new()),
            ce_mode: mode,
            ..Config::default()
        }
    }

    fn op() -> String {
        format!("test.op.{}", xid::new())
    }

    fn doubler() -> QueryHandlers {
        QueryHandlers::new()
    }

    async fn serve_double(queries: &MemoryQueries, op: &str) -> Listener {
        queries
            .listen(
                doubler().on(
                    op,
                    typed_handler(|req: TypedRequest<u64>| async move {
                        Ok::<_, HandlerError>(req.data * 2)
                    }),
                ),
                QueryListenOptions::default(),
            )
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn request_reply_in_both_content_modes_keeps_the_transaction_id() {
        for mode in [ContentMode::Structured, ContentMode::Binary] {
            let broker = MemoryBroker::new();
            let server = broker.query_connection(&config(mode));
            let client = broker.query_connection(&config(mode));
            let op = op();
            let listener = serve_double(&server, &op).await;
            let tid = TransactionId::generate();
            let request = crate::event::new_event_with_tid(&op, "c", &21u64, tid.clone()).unwrap();
            let reply = client.request_with_timeout(request, WAIT).await.unwrap();
            assert_eq!(reply.data_as::<u64>().unwrap(), 42, "{mode:?}");
            assert_eq!(reply.ty(), format!("{op}.reply"));
            assert_eq!(reply.transaction_id(), Some(tid));
            listener.stop(WAIT).await;
        }
    }

    #[tokio::test]
    async fn the_reply_comes_in_the_requests_content_mode() {
        let broker = MemoryBroker::new();
        let server = broker.query_connection(&config(ContentMode::Structured));
        let op = op();
        let listener = serve_double(&server, &op).await;
        // A binary-mode request gets a binary-mode reply, whatever the server's own mode.
        let encoded =
            codec::encode(&new_event(&op, "c", &1u64).unwrap(), ContentMode::Binary).unwrap();
        let (headers, payload) = broker
            .request_raw(&op, encoded.headers.into(), encoded.payload, WAIT)
            .await
            .unwrap();
        assert_eq!(content_mode_of(Some(&headers)), ContentMode::Binary);
        let event = codec::decode(Some(&headers), &payload).unwrap();
        assert_eq!(event.data_as::<u64>().unwrap(), 2);
        listener.stop(WAIT).await;
    }

    #[tokio::test]
    async fn nobody_listening_is_no_responders_at_once() {
        let broker = MemoryBroker::new();
        let client = broker.query_connection(&config(ContentMode::Structured));
        let started = std::time::Instant::now();
        let err = client
            .request_with_timeout(new_event(op(), "c", &1).unwrap(), Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), RequestErrorKind::NoResponders);
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut stream = client
            .request_stream(
                new_event(op(), "c", &1).unwrap(),
                ReplyStreamOptions::default(),
            )
            .await
            .unwrap();
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), RequestErrorKind::NoResponders);
        assert!(stream.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_that_never_answers_times_out_the_request() {
        let broker = MemoryBroker::new();
        let server = broker.query_connection(&config(ContentMode::Structured));
        let op = op();
        let listener = server
            .listen(
                QueryHandlers::new().on(
                    op.as_str(),
                    handler_fn(|_, _| async {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        Ok(())
                    }),
                ),
                QueryListenOptions::default(),
            )
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let err = server
            .request_with_timeout(new_event(&op, "c", &1).unwrap(), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), RequestErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        listener.abort().await;
    }

    #[tokio::test]
    async fn handler_errors_and_unknown_ops_are_remote_errors_with_codes() {
        let broker = MemoryBroker::new();
        let server = broker.query_connection(&Config {
            wildcard_subject: Some("wild.>".into()),
            ..config(ContentMode::Structured)
        });
        let listener = server
            .listen(
                QueryHandlers::new().on(
                    "wild.fails",
                    handler_fn(|_, _| async {
                        Err(HandlerError::new("no such workspace").with_code(404))
                    }),
                ),
                QueryListenOptions::default(),
            )
            .await
            .unwrap();
        let client = broker.query_connection(&config(ContentMode::Binary));
        let err = client
            .request_with_timeout(new_event("wild.fails", "c", &1).unwrap(), WAIT)
            .await
            .unwrap_err();
        let remote = RemoteError::of(&err).expect("remote error");
        assert_eq!((remote.code(), remote.text()), (404, "no such workspace"));
        let err = client
            .request_with_timeout(new_event("wild.unknown", "c", &1).unwrap(), WAIT)
            .await
            .unwrap_err();
        assert_eq!(RemoteError::of(&err).map(|r| r.code()), Some(404));
        listener.stop(WAIT).await;
    }

    #[tokio::test]
    async fn an_undecodable_request_gets_a_400() {
        let broker = MemoryBroker::new();
        let server = broker.query_connection(&config(ContentMode::Structured));
        let op = op();
        let listener = serve_double(&server, &op).await;
        let (headers, payload) = broker
            .request_raw(
                &op,
                HeaderMap::new(),
                bytes::Bytes::from_static(b"\xffnot an event"),
                WAIT,
            )
            .await
            .unwrap();
        assert_eq!(
            headers.get("Nats-Service-Error-Code").map(|v| v.as_str()),
            Some("400")
        );
        let err = interpret_reply(Some(&headers), &payload).unwrap_err();
        assert_eq!(RemoteError::of(&err).map(|r| r.code()), Some(400));
        listener.stop(WAIT).await;
    }

    #[tokio::test]
    async fn a_reply_stream_ends_after_its_total() {
        let broker = MemoryBroker::new();
        let server = broker.query_connection(&config(ContentMode::Structured));
        let op = op();
        let listener = server
            .listen(
                QueryHandlers::new().on(
                    op.as_str(),
                    handler_fn(|_, reply| async move {
                        let stream = reply.stream();
                        for n in 0..5u32 {
                            stream.push_data("test.row", &n)?;
                        }
                        stream.finish().await?;
                        Ok(())
                    }),
                ),
                QueryListenOptions::default(),
            )
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let replies = server
            .request_stream(
                new_event(&op, "c", &()).unwrap(),
                ReplyStreamOptions::default().deadline(Duration::from_secs(30)),
            )
            .await
            .unwrap()
            .collect_all()
            .await
            .unwrap();
        let rows: Vec<u32> = replies.iter().map(|e| e.data_as().unwrap()).collect();
        assert_eq!(rows, vec![0, 1, 2, 3, 4]);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "ended by the total, not the deadline"
        );
        listener.stop(WAIT).await;
    }

    #[tokio::test(start_paused = true)]
    async fn scatter_gather_collects_one_reply_per_group_until_max_or_deadline() {
        let broker = MemoryBroker::new();
        let op = op();
        let mut listeners = Vec::new();
        for group in ["a", "b", "c"] {
            let server = broker.query_connection(&Config {
                queue_group: Some(group.into()),
                ..config(ContentMode::Structured)
            });
            listeners.push(serve_double(&server, &op).await);
        }
        let client = broker.query_connection(&config(ContentMode::Structured));
        let all = client
            .request_stream(
                new_event(&op, "c", &1u64).unwrap(),
                ReplyStreamOptions::default().deadline(Duration::from_secs(1)),
            )
            .await
            .unwrap()
            .collect_all()
            .await
            .unwrap();
        assert_eq!(all.len(), 3, "one reply from each group, then the deadline");
        let two = client
            .request_stream(
                new_event(&op, "c", &1u64).unwrap(),
                ReplyStreamOptions::default().max_replies(2),
            )
            .await
            .unwrap()
            .collect_all()
            .await
            .unwrap();
        assert_eq!(two.len(), 2);
        let started = tokio::time::Instant::now();
        let stalled = client
            .request_stream(
                new_event(&op, "c", &1u64).unwrap(),
                ReplyStreamOptions::default()
                    .deadline(Duration::from_secs(60))
                    .stall(Duration::from_millis(100)),
            )
            .await
            .unwrap()
            .collect_all()
            .await
            .unwrap();
        assert_eq!(stalled.len(), 3);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "ended by the stall"
        );
        for l in listeners {
            l.stop(WAIT).await;
        }
    }

    #[tokio::test]
    async fn members_of_a_queue_group_share_requests_and_the_worker_bound_holds() {
        let broker = MemoryBroker::new();
        let op = op();
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let served = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
        let mut listeners = Vec::new();
        for count in &served {
            let (running, peak, count) = (running.clone(), peak.clone(), count.clone());
            let server = broker.query_connection(&Config {
                queue_group: Some("shared".into()),
                ..config(ContentMode::Structured)
            });
            let handler = handler_fn(move |_, reply| {
                let (running, peak, count) = (running.clone(), peak.clone(), count.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    count.fetch_add(1, Ordering::SeqCst);
                    reply.reply_data("test.ok", &()).await?;
                    Ok(())
                }
            });
            // Room for every request in either member's queue: a full queue is answered 503.
            let options = QueryListenOptions {
                pool: crate::listener::WorkerOptions::new(2, 40),
                ..Default::default()
            };
            listeners.push(
                server
                    .listen(QueryHandlers::new().on(op.as_str(), handler), options)
                    .await
                    .unwrap(),
            );
        }
        let client = broker.query_connection(&config(ContentMode::Structured));
        let requests = (0..40).map(|_| {
            let client = client.clone();
            let op = op.clone();
            async move {
                client
                    .request_with_timeout(new_event(&op, "c", &()).unwrap(), WAIT)
                    .await
            }
        });
        let results = futures::future::join_all(requests).await;
        assert!(results.iter().all(|r| r.is_ok()));
        let counts = [
            served[0].load(Ordering::SeqCst),
            served[1].load(Ordering::SeqCst),
        ];
        assert_eq!(counts[0] + counts[1], 40, "each request served once");
        assert!(
            counts[0] > 0 && counts[1] > 0,
            "both members served: {counts:?}"
        );
        assert!(peak.load(Ordering::SeqCst) <= 4, "2 listeners x 2 workers");
        for l in listeners {
            l.stop(WAIT).await;
        }
    }

    #[tokio::test]
    async fn stop_finishes_in_flight_requests_then_refuses_new_ones() {
        let broker = MemoryBroker::new();
        let server = broker.query_connection(&config(ContentMode::Structured));
        let op = op();
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
        let entered_tx = Arc::new(std::sync::Mutex::new(Some(entered_tx)));
        let release = Arc::new(tokio::sync::Notify::new());
        let release2 = release.clone();
        let listener = server
            .listen(
                QueryHandlers::new().on(
                    op.as_str(),
                    handler_fn(move |_, reply| {
                        let entered = entered_tx.lock().unwrap().take();
                        let release = release2.clone();
                        async move {
                            if let Some(tx) = entered {
                                let _ = tx.send(());
                            }
                            release.notified().await;
                            reply.reply_data("test.done", &()).await?;
                            Ok(())
                        }
                    }),
                ),
                QueryListenOptions::default(),
            )
            .await
            .unwrap();
        let client = broker.query_connection(&config(ContentMode::Structured));
        let in_flight = tokio::spawn({
            let client = client.clone();
            let op = op.clone();
            async move {
                client
                    .request_with_timeout(new_event(&op, "c", &()).unwrap(), WAIT)
                    .await
            }
        });
        tokio::time::timeout(WAIT, entered_rx)
            .await
            .unwrap()
            .unwrap();
        let stopping = tokio::spawn({
            let listener = listener.clone();
            async move { listener.stop(WAIT).await }
        });
        // Once the subscription is gone, new requests find no responder.
        crate::memory::tests_support::eventually(|| broker.subscription_count() == 0).await;
        let err = client
            .request_with_timeout(new_event(&op, "c", &()).unwrap(), WAIT)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), RequestErrorKind::NoResponders);
        release.notify_one();
        let reply = in_flight.await.unwrap().unwrap();
        assert_eq!(reply.ty(), "test.done");
        let report = stopping.await.unwrap();
        assert_eq!((report.finished, report.abandoned), (1, 0));
    }

    #[tokio::test]
    async fn oversized_requests_are_refused_before_sending_and_closed_connections_refuse() {
        let broker = MemoryBroker::with_options(super::super::MemoryOptions {
            max_payload: 1024,
            ..Default::default()
        });
        let server = broker.query_connection(&config(ContentMode::Structured));
        let op = op();
        let listener = serve_double(&server, &op).await;
        let big = "x".repeat(2000);
        let err = server
            .request_with_timeout(new_event(&op, "c", &big).unwrap(), WAIT)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), RequestErrorKind::Encode);
        server.close().await;
        assert!(listener.is_stopped());
        let err = server
            .request_with_timeout(new_event(&op, "c", &1u64).unwrap(), WAIT)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), RequestErrorKind::ConnectionClosed);
        let err = server
            .listen(
                doubler().on("x", handler_fn(|_, _| async { Ok(()) })),
                QueryListenOptions::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ListenErrorKind::ConnectionClosed);
    }
}
