//! [`MemoryQueries`]: the [`QueryConnection`] of the in-memory backend. Requests are encoded
//! with the real codec, published on the broker's subject space with an inbox for replies, and
//! served by listeners that subscribe in a queue group and feed the shared bounded worker pool.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cloudevents::{AttributesReader, Event};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::bus::{is_valid_pattern, is_valid_publish_subject, BusMessage, Inbox};
use super::MemoryBroker;
use crate::codec::{self, ContentMode, HeaderMap};
use crate::config::{Config, MAX_REQUEST_TIMEOUT};
use crate::error::{Error, ListenError, ListenErrorKind, RequestError, RequestErrorKind};
use crate::event::EventExt;
use crate::listener::Listener;
use crate::query::{
    content_mode_of, interpret_reply, prepare_request, serve_request, QueryConnection,
    QueryHandlers, QueryListenOptions, RawReply, RawRequest, ReplyStream, ReplyStreamOptions,
    ReplyWriter, ServeContext,
};
use crate::worker::WorkerPool;

struct Inner {
    broker: MemoryBroker,
    client_id: String,
    queue_group: String,
    wildcard_subject: Option<String>,
    request_timeout: Duration,
    mode: ContentMode,
    /// Cancelled by `close`; every listener's token is a child of it.
    closed: CancellationToken,
    listeners: Mutex<Vec<Listener>>,
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
/// let request = ce_messaging::event::new_event("org.example.nobody", "me", &()).unwrap();
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
                client_id: config.client_id.clone(),
                queue_group: config.queue_group().to_owned(),
                wildcard_subject: config.wildcard_subject.clone(),
                request_timeout: config.request_timeout.min(MAX_REQUEST_TIMEOUT),
                mode: config.ce_mode,
                closed: CancellationToken::new(),
                listeners: Mutex::new(Vec::new()),
            }),
        }
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

    /// Drain then close: refuses new requests and listeners, stops this connection's listeners
    /// (each lets its in-flight handlers finish within its grace period) and returns when they
    /// have stopped.
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
        self.inner.closed.cancel();
        let listeners: Vec<Listener> = self
            .inner
            .listeners
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        for listener in listeners {
            listener.stopped().await;
        }
    }

    fn prepare(&self, mut request: Event) -> Result<Prepared, RequestError> {
        if self.is_closed() {
            return Err(Error::new(RequestErrorKind::ConnectionClosed));
        }
        prepare_request(&mut request, &self.inner.client_id);
        let subject = request.ty().to_owned();
        if !is_valid_publish_subject(&subject) {
            return Err(Error::with_detail(
                RequestErrorKind::InvalidOptions,
                format!("the op (event type) {subject:?} is not a valid NATS subject"),
            ));
        }
        let encoded = codec::encode(&request, self.inner.mode)
            .map_err(|e| e.map_kind(|_| RequestErrorKind::Encode))?;
        self.inner
            .broker
            .check_size(&encoded.headers, &encoded.payload)
            .map_err(|detail| Error::with_detail(RequestErrorKind::Encode, detail))?;
        Ok(Prepared {
            subject,
            headers: encoded.headers,
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

#[async_trait]
impl QueryConnection for MemoryQueries {
    fn default_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    async fn request_with_timeout(
        &self,
        request: Event,
        timeout: Duration,
    ) -> Result<Event, RequestError> {
        let timeout = timeout.min(MAX_REQUEST_TIMEOUT);
        let prepared = self.prepare(request)?;
        // One reply is all a request reads; a second one is dropped like a NATS reply to an
        // inbox that was already unsubscribed.
        let (inbox, mut replies) = Inbox::new(1);
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
        let prepared = self.prepare(request)?;
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
        if self.is_closed() {
            return Err(Error::new(ListenErrorKind::ConnectionClosed));
        }
        let group = options
            .queue_group
            .clone()
            .unwrap_or_else(|| self.inner.queue_group.clone());
        let subjects: Vec<String> = match options
            .wildcard_subject
            .clone()
            .or_else(|| self.inner.wildcard_subject.clone())
        {
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
            source: self.inner.client_id.clone(),
        });
        let pool = WorkerPool::start(options.workers, options.buffer, move |request, work| {
            let ctx = ctx.clone();
            async move { serve_request(request, &ctx, &work).await }.boxed()
        });
        let submitter = pool.submitter();
        let stopping = pool.context().stopping;
        let source = self.inner.client_id.clone();
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
                if let Err(request) = submitter.submit(raw_request(message)).await {
                    refuse(request, &source).await;
                    break;
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
                refuse(raw_request(message), &source).await;
            }
        });
        let token = self.inner.closed.child_token();
        let listener = Listener::supervise(pool, options.grace, token);
        if let Ok(mut listeners) = self.inner.listeners.lock() {
            listeners.retain(|l| !l.is_stopped());
            listeners.push(listener.clone());
        }
        Ok(listener)
    }
}

fn raw_request(message: BusMessage) -> RawRequest {
    RawRequest {
        subject: message.subject,
        headers: message.headers,
        payload: message.payload,
        reply: message.reply,
    }
}

/// Answers a request the stopping listener will not serve: 503, so the requester fails at once
/// instead of waiting for its timeout.
async fn refuse(request: RawRequest, source: &str) {
    let Some(target) = request.reply else { return };
    tracing::debug!(subject = %request.subject, "query refused: listener stopping");
    let tid = codec::decode(request.headers.as_ref(), &request.payload)
        .ok()
        .and_then(|event| event.transaction_id());
    let writer = ReplyWriter::new(
        target,
        request.subject.clone(),
        tid,
        content_mode_of(request.headers.as_ref()),
        source.to_owned(),
    );
    if let Err(err) = writer.error(503, "listener stopping").await {
        tracing::warn!(error = %err, "error reply not sent");
    }
}
