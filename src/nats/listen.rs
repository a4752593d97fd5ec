//! Serving queries: queue-group subscriptions (one per op, or one wildcard subject) feed the
//! bounded worker pool through an intake loop; replies are published to each request's reply
//! subject.
//!
//! The intake loop reads the subscriptions as fast as requests come and never waits for room
//! in the pool: a request that finds every worker busy and the queue (`buffer`) full is
//! answered with a 503 (`listener busy`) at once, so the subscription's own buffer (65,536
//! messages in async-nats) never becomes a hidden queue of requests whose callers gave up.
//! Each request's deadline is taken on receipt from `Request-Timeout-Ms`; a worker drops a
//! request whose deadline passed while it was queued.
//!
//! Stopping: the intake loop unsubscribes, waits for the server to confirm (so it no longer
//! routes requests here once the stop returns), answers the requests that were delivered but not yet queued
//! with a 503 error reply, and exits; the worker pool lets queued and in-flight handlers
//! finish within the grace period.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::{Client, Message, Subject, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{SelectAll, Stream};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::connection::server_round_trip;
use super::Inner;
use crate::codec::HeaderMap;
use crate::error::{BoxError, Error, ListenError, ListenErrorKind};
use crate::listener::Listener;
use crate::query::{
    refuse_request, serve_request, QueryHandlers, QueryListenOptions, RawRequest, ReplyTarget,
    ServeContext, Shed, BUSY_TEXT,
};
use crate::worker::{Refused, Submitter, WorkerPool};

/// How long `listen` and stopping wait for the server to confirm (un)subscribing, and
/// stopping for the requests left in the buffers to be answered.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes the replies to one request on its reply subject.
struct NatsReplyTarget {
    /// Shared with the intake: a `Client` clone per request would cost an allocation and about
    /// ten reference counts.
    client: Arc<Client>,
    subject: Subject,
}

#[async_trait]
impl ReplyTarget for NatsReplyTarget {
    async fn send(&self, headers: HeaderMap, payload: Bytes) -> Result<(), BoxError> {
        self.client
            .publish_with_headers(self.subject.clone(), headers, payload)
            .await
            .map_err(BoxError::from)
    }

    fn max_payload(&self) -> usize {
        self.client.max_payload()
    }
}

fn raw_request(client: &Arc<Client>, message: async_nats::Message) -> RawRequest {
    let reply = message.reply.map(|subject| {
        Arc::new(NatsReplyTarget {
            client: client.clone(),
            subject,
        }) as Arc<dyn ReplyTarget>
    });
    RawRequest::received(message.subject, message.headers, message.payload, reply)
}

/// Subscribes and starts serving `handlers`.
pub(super) async fn listen(
    inner: &Inner,
    handlers: QueryHandlers,
    options: QueryListenOptions,
) -> Result<Listener, ListenError> {
    options.validate(&handlers)?;
    if inner.events.is_closed() {
        return Err(Error::new(ListenErrorKind::ConnectionClosed));
    }
    let group = options
        .queue_group
        .clone()
        .unwrap_or_else(|| inner.queue_group.clone());
    let wildcard = options
        .wildcard_subject
        .clone()
        .or_else(|| inner.wildcard_subject.clone());
    let by_subject = wildcard.is_none();
    let subjects: Vec<String> = match wildcard {
        Some(subject) => vec![subject],
        None => {
            let mut ops: Vec<String> = handlers.ops().map(str::to_owned).collect();
            ops.sort();
            ops
        }
    };
    // If one subscription fails, the ones made before are dropped, which unsubscribes them.
    let mut subscriptions = Vec::with_capacity(subjects.len());
    for subject in &subjects {
        let subscriber = inner
            .client
            .queue_subscribe(subject.clone(), group.clone())
            .await
            .map_err(|e| {
                Error::with_detail(
                    ListenErrorKind::Subscribe,
                    format!("subject {subject:?}, queue group {group:?}"),
                )
                .source(e)
            })?;
        subscriptions.push(subscriber);
    }
    // After a round trip the server has the subscriptions: a request sent once `listen`
    // returned reaches this listener.
    if let Err(err) = server_round_trip(&inner.client, ROUND_TRIP_TIMEOUT).await {
        tracing::warn!(error = %err, "subscriptions not confirmed; they are sent again on reconnect");
    }

    let serve = Arc::new(ServeContext {
        handlers,
        source: inner.source.as_str().into(),
        by_subject,
    });
    // The serving future lives in place in its worker's task: no heap box per request.
    let pool = WorkerPool::start(
        options.pool.workers,
        options.pool.buffer,
        move |request, work| {
            let serve = serve.clone();
            async move { serve_request(request, &serve, &work).await }
        },
    );
    let token = CancellationToken::new();
    let intake = Intake {
        client: Arc::new(inner.client.clone()),
        source: inner.source.clone(),
        subscriptions: Subscriptions::new(subscriptions),
        listener_token: token.clone(),
    };
    pool.spawn_intake(intake.run(pool.submitter()));
    tracing::info!(subjects = ?subjects, queue_group = %group, workers = options.pool.workers, buffer = options.pool.buffer, "query listener started");
    Ok(Listener::supervise(pool, options.pool.grace, token))
}

/// A listener's subscriptions as one stream of requests. One subscription (one op, or a
/// wildcard subject: the usual case) is polled directly; `SelectAll` over one stream would add
/// a future, a ready queue and a wake-up of its own to every message. Several (one per op) are
/// merged with `SelectAll`. The stream ends once every subscription ended.
enum Subscriptions {
    One(Subscriber),
    Many(SelectAll<Subscriber>),
}

impl Subscriptions {
    fn new(subscribers: Vec<Subscriber>) -> Self {
        let mut subscribers = subscribers.into_iter();
        match (subscribers.next(), subscribers.next()) {
            (Some(one), None) => Subscriptions::One(one),
            (first, second) => {
                Subscriptions::Many(first.into_iter().chain(second).chain(subscribers).collect())
            }
        }
    }

    /// Drains every subscription (see [`Intake::unsubscribe`]).
    async fn drain(&mut self) {
        let subscribers: Vec<&mut Subscriber> = match self {
            Subscriptions::One(subscriber) => vec![subscriber],
            Subscriptions::Many(all) => all.iter_mut().collect(),
        };
        for subscriber in subscribers {
            if let Err(err) = subscriber.drain().await {
                tracing::debug!(error = %err, "unsubscribe on a closed connection");
            }
        }
    }
}

impl Stream for Subscriptions {
    type Item = Message;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        match self.get_mut() {
            Subscriptions::One(subscriber) => subscriber.poll_next_unpin(cx),
            Subscriptions::Many(all) => all.poll_next_unpin(cx),
        }
    }
}

struct Intake {
    client: Arc<Client>,
    source: String,
    subscriptions: Subscriptions,
    listener_token: CancellationToken,
}

impl Intake {
    /// Feeds the pool until the listener stops. Holds the pool's submitter only while it
    /// runs: the workers see the end of the queue once it is dropped.
    async fn run(mut self, submitter: Submitter<RawRequest>) {
        // One wait on the token for the whole loop, looked at only when no message is ready
        // (and then only the flag its wake-up sets): a fresh `cancelled()` per message would
        // register with the token and leave again each time. Stopping still ends the loop
        // before the next message is taken.
        let mut stopped = submitter.stopped();
        loop {
            // No `stopping.is_cancelled()` first (it locks the token's tree node): a message
            // taken once stopping began is refused by `try_submit` (`Stopping`) and answered
            // 503 below, as the ones left in the buffers are.
            let message = tokio::select! {
                biased;
                message = self.subscriptions.next() => message,
                _ = &mut stopped => break,
            };
            let Some(message) = message else {
                // Every subscription ended: the connection was closed (or drained).
                tracing::info!("query listener's subscriptions ended; stopping the listener");
                self.listener_token.cancel();
                return;
            };
            let request = raw_request(&self.client, message);
            match submitter.try_submit(request) {
                Ok(()) => {}
                Err((request, Refused::Full)) => {
                    Shed::Busy.count(&request.subject);
                    refuse_request(request, &self.source, 503, BUSY_TEXT).await;
                }
                Err((request, Refused::Stopping)) => {
                    self.refuse(request).await;
                    break;
                }
            }
        }
        drop(submitter);
        self.unsubscribe().await;
    }

    /// Unsubscribes, makes sure the server saw it, then answers what was already delivered.
    async fn unsubscribe(mut self) {
        // `drain`, not `unsubscribe`: `unsubscribe` closes the receiving end at once, so a
        // request the server routed here before it saw the UNSUB was dropped by the client,
        // unanswered (its requester waited out its timeout; seen under load in
        // `requests_caught_by_a_stopping_listener_fail_fast`). A drained subscription keeps
        // receiving until the server answered the PING sent after the UNSUB, then ends.
        self.subscriptions.drain().await;
        // Once the server confirmed, requests sent after the stop find no responders here.
        if let Err(err) = server_round_trip(&self.client, ROUND_TRIP_TIMEOUT).await {
            tracing::warn!(error = %err, "unsubscribe not confirmed by the server");
        }
        // The drained subscriptions end after what was delivered before the UNSUB.
        let leftovers = tokio::time::timeout(ROUND_TRIP_TIMEOUT, async {
            while let Some(message) = self.subscriptions.next().await {
                let request = raw_request(&self.client, message);
                self.refuse(request).await;
            }
        });
        if leftovers.await.is_err() {
            tracing::warn!("answering requests left in the subscription buffers timed out");
        }
    }

    /// Answers a request the stopping listener will not serve: 503, so the requester fails at
    /// once instead of waiting for its timeout.
    async fn refuse(&self, request: RawRequest) {
        refuse_request(request, &self.source, 503, "listener stopping").await;
    }
}
