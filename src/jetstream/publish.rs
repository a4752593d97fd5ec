//! Persisted publish: encode, refuse what is too large before sending, publish with
//! `Nats-Msg-Id` = event id, wait for the PubAck, and retry with the same id on a lost ack
//! (timeout, dropped connection) within a bounded time that stays inside the stream's
//! duplicate window, so a retried event is never stored twice.
//!
//! The pipelined form runs the same per-event publish for many events at once (at most
//! [`PIPELINE_WINDOW`] in flight) and waits for every ack.
//!
//! While the client is disconnected (reconnecting) nothing is sent: a publish waits for the
//! connection within its bounded time, and when that runs out it fails with
//! `PublishErrorKind::Disconnected` saying for how long the connection has been down, instead
//! of "no ack in time".

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind as JsPublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use futures::StreamExt;
use tokio::time::Instant;

use crate::codec::{self, ContentMode};
use crate::config::Config;
use crate::error::{Error, PublishErrorKind};
use crate::event::{check_type, populate_source};
use crate::events::schedule;
use crate::events::{priority_subject, publish_level};
use crate::events::{PublishAck, PublishError, PublishOptions, Schedule};

use crate::headers::wire_size;

use super::{client_closed, Inner};

/// JetStream's error code for "duplicate message id is in process": a message with the same
/// `Nats-Msg-Id` was received and is still being stored (replicated), so its outcome is not
/// known yet.
const DUPLICATE_IN_PROCESS_CODE: u64 = 10158;

/// JetStream's error code for "per-message TTL is disabled" (the stream lacks `allow_msg_ttl`).
const TTL_DISABLED_CODE: u64 = 10166;
/// JetStream's error code for "message schedules is disabled" (no `allow_msg_schedules`).
const SCHEDULES_DISABLED_CODE: u64 = 10188;
/// JetStream's error codes for an invalid per-message TTL, schedule pattern, target.
const TTL_INVALID_CODE: u64 = 10165;
const SCHEDULE_PATTERN_CODE: u64 = 10189;
const SCHEDULE_TARGET_CODE: u64 = 10190;

/// The publish error kind of a JetStream error about schedules or time-to-live.
fn schedule_error_kind(code: u64) -> Option<PublishErrorKind> {
    match code {
        TTL_DISABLED_CODE | SCHEDULES_DISABLED_CODE => Some(PublishErrorKind::Unsupported),
        TTL_INVALID_CODE | SCHEDULE_PATTERN_CODE | SCHEDULE_TARGET_CODE => {
            Some(PublishErrorKind::InvalidSchedule)
        }
        _ => None,
    }
}

/// At most this many pipelined publishes wait for their ack at once.
pub(crate) const PIPELINE_WINDOW: usize = 1024;

/// How a publish whose ack did not arrive is retried.
///
/// Every attempt re-sends the same event with the same `Nats-Msg-Id`, so the server stores it
/// once and reports later copies as duplicates. Retrying stops at `total` (default: the
/// connection's `NATS_EVENTS_TIMEOUT`), never later than the stream's duplicate window. While
/// the client is disconnected nothing is sent: the publish looks at the connection every
/// `pause` (at least 10 ms) and goes on when it is back, or fails with `Disconnected` at the
/// end of `total`.
///
/// # Examples
///
/// ```
/// use ce_messaging::jetstream::PublishRetry;
/// use std::time::Duration;
///
/// let retry = PublishRetry { attempt_timeout: Duration::from_millis(500), ..Default::default() };
/// assert_eq!(retry.total, None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRetry {
    /// How long one attempt waits for the PubAck.
    pub attempt_timeout: Duration,
    /// How long all attempts together may take; `None`: `NATS_EVENTS_TIMEOUT`. Clamped to the
    /// duplicate window (`NATS_JS_DUPLICATE_WINDOW`).
    pub total: Option<Duration>,
    /// Pause before a retry (also while the connection is being re-established).
    pub pause: Duration,
}

impl Default for PublishRetry {
    fn default() -> Self {
        PublishRetry {
            attempt_timeout: Duration::from_secs(5),
            total: None,
            pause: Duration::from_millis(100),
        }
    }
}

/// An event ready to send.
///
/// The headers go into the first attempt as they are (no copy); a retry rebuilds them from
/// the event, which the caller still holds ([`Prepared::headers_for_retry`]).
struct Prepared {
    /// `<prefix>.<type>`; cheap to clone (shared bytes).
    subject: Subject,
    /// `Some` until the first attempt takes them.
    headers: Option<HeaderMap>,
    payload: Bytes,
    /// The publish options' headers (schedule, time-to-live), fixed when prepared so that a
    /// retry sends the very same (an `After` delay is not moved by a retry).
    directives: Vec<(&'static str, String)>,
}

impl Prepared {
    /// The headers for an attempt: the encoded ones for the first, rebuilt from `event` (the
    /// same encoding and `Nats-Msg-Id`, so the server de-duplicates) for a retry.
    fn take_headers(
        &mut self,
        mode: ContentMode,
        event: &Event,
    ) -> Result<HeaderMap, Error<PublishErrorKind>> {
        match self.headers.take() {
            Some(headers) => Ok(headers),
            None => {
                let mut headers = encode(mode, event)?.0;
                add_directives(&mut headers, &self.directives);
                Ok(headers)
            }
        }
    }
}

/// The most recent type's subject (at its priority level), so that a batch of one type
/// formats it once; the connection keeps one for its single publishes, so that a service
/// publishing one type formats it once. A type is cached only after it passed
/// [`check_type`], so a publish of the cached type skips that check.
#[derive(Default)]
pub(crate) struct SubjectCache {
    last: std::sync::Mutex<Option<(String, u8, Subject)>>,
}

impl SubjectCache {
    /// Whether `event_type` is the cached one (it passed [`check_type`]).
    fn knows(&self, event_type: &str) -> bool {
        self.last
            .lock()
            .is_ok_and(|last| last.as_ref().is_some_and(|(ty, _, _)| ty == event_type))
    }

    /// The subject of `event_type` (checked by the caller) at `level`.
    fn subject(&self, config: &Config, event_type: &str, level: u8) -> Subject {
        let Ok(mut last) = self.last.lock() else {
            // Poisoned (a panic while it was held): formatted afresh.
            return Subject::from(priority_subject(
                &config.js_subject_prefix,
                event_type,
                level,
                config.js_priority_levels,
            ));
        };
        match &*last {
            Some((ty, at, subject)) if ty == event_type && *at == level => subject.clone(),
            _ => {
                let subject = Subject::from(priority_subject(
                    &config.js_subject_prefix,
                    event_type,
                    level,
                    config.js_priority_levels,
                ));
                *last = Some((event_type.to_owned(), level, subject.clone()));
                subject
            }
        }
    }
}

/// Encodes in the connection's content mode and sets `Nats-Msg-Id` to the event id.
fn encode(mode: ContentMode, event: &Event) -> Result<(HeaderMap, Bytes), Error<PublishErrorKind>> {
    let encoded =
        codec::encode(event, mode).map_err(|e| e.map_kind(|_| PublishErrorKind::Encode))?;
    let mut headers = HeaderMap::from(encoded.headers);
    let msg_id: async_nats::HeaderValue = event.id().parse().map_err(|_| {
        Error::with_detail(
            PublishErrorKind::Encode,
            format!("event id {:?} cannot be a Nats-Msg-Id header", event.id()),
        )
    })?;
    // async-nats' constant: a standard name, hashed as an enum tag instead of its text.
    headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
    Ok((headers, encoded.payload))
}

fn add_directives(headers: &mut HeaderMap, directives: &[(&'static str, String)]) {
    for (name, value) in directives {
        headers.insert(*name, crate::headers::text_value(value));
    }
}

/// The server's version as (major, minor, patch), from its INFO; `None` if it does not parse.
fn server_version(inner: &Inner) -> Option<(u64, u64, u64)> {
    let info = inner.client.server_info();
    let mut parts = info
        .version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u64>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// Refuses options the connected server is too old for (a typed error naming the version
/// needed), before sending.
fn check_server(inner: &Inner, options: &PublishOptions) -> Result<(), Error<PublishErrorKind>> {
    let Some((major, minor)) = options.server_needed() else {
        return Ok(());
    };
    match server_version(inner) {
        Some((m, n, _)) if (m, n) < (major, minor) => Err(Error::with_detail(
            PublishErrorKind::Unsupported,
            format!(
                "{} needs nats-server {major}.{minor} or later; the server is {}",
                what_needs(options),
                inner.client.server_info().version
            ),
        )),
        _ => Ok(()),
    }
}

fn what_needs(options: &PublishOptions) -> &'static str {
    match &options.schedule {
        Some(Schedule::Every(_)) => "a recurring schedule (@every)",
        Some(Schedule::Cron { .. }) => "a cron schedule",
        Some(_) => "a deferred publish (@at)",
        None => "a per-event time-to-live (Nats-TTL)",
    }
}

/// Checks the type (see [`check_type`]), fills in the source, encodes (see [`encode`]) and
/// checks the size against the server's max payload.
fn prepare(
    inner: &Inner,
    event: &mut Event,
    subjects: &SubjectCache,
) -> Result<Prepared, Error<PublishErrorKind>> {
    prepare_with(inner, event, subjects, &PublishOptions::default())
}

/// [`prepare`] with publish options: their directives are checked (also against the server's
/// version) and added, and a scheduled event goes to its schedule subject.
fn prepare_with(
    inner: &Inner,
    event: &mut Event,
    subjects: &SubjectCache,
    options: &PublishOptions,
) -> Result<Prepared, Error<PublishErrorKind>> {
    if !subjects.knows(event.ty()) {
        check_type(event.ty()).map_err(|e| e.map_kind(|_| PublishErrorKind::InvalidType))?;
    }
    let level = publish_level(event, inner.config.js_priority_levels)
        .map_err(|detail| Error::with_detail(PublishErrorKind::InvalidPriority, detail))?;
    populate_source(event, &inner.config.client_id);
    let mut subject = subjects.subject(&inner.config, event.ty(), level);
    let mut directives = Vec::new();
    if !options.is_plain() {
        check_server(inner, options)?;
        let d = schedule::directives(
            options,
            event.id(),
            &inner.config.js_stream,
            &subject,
            chrono::Utc::now(),
        )?;
        if let Some(schedule_subject) = d.subject {
            subject = Subject::from(schedule_subject);
        }
        directives = d.headers;
    }
    let (mut headers, payload) = encode(inner.config.ce_mode, event)?;
    add_directives(&mut headers, &directives);
    let size = wire_size(&headers, payload.len());
    let limit = inner.client.max_payload();
    if size > limit {
        return Err(Error::with_detail(
            PublishErrorKind::TooLarge,
            format!(
                "event {} is {size} bytes (headers + payload), the server's max payload is {limit} bytes",
                event.id()
            ),
        ));
    }
    Ok(Prepared {
        subject,
        headers: Some(headers),
        payload,
        directives,
    })
}

/// What one attempt's failure means for the next step.
enum AttemptError {
    /// Try again with the same message id.
    Retry(String),
    /// Nobody answered for the subject: either no stream holds it, or its stream has no
    /// leader right now (a clustered stream electing one). The caller tells them apart.
    NoResponders(String),
    /// Give up with this error.
    Fail(Error<PublishErrorKind>),
}

/// Publishes one event: prepared (checked, encoded) when called, sent and retried (see
/// [`send_with_retry`]) when awaited.
pub(crate) fn publish(
    inner: &Arc<Inner>,
    event: Event,
) -> impl std::future::Future<Output = Result<PublishAck, PublishError>> + '_ {
    publish_with(inner, event, &PublishOptions::default())
}

/// [`publish`] with options (schedule, time-to-live), which are read when this is called.
///
/// Not an `async fn`: one taking the event would keep a copy of it (and of the options) in
/// its future beside the one the sending future holds; the prepare step needs neither
/// across an await.
pub(crate) fn publish_with<'a>(
    inner: &'a Arc<Inner>,
    mut event: Event,
    options: &PublishOptions,
) -> impl std::future::Future<Output = Result<PublishAck, PublishError>> + 'a {
    match prepare_with(inner, &mut event, &inner.subjects, options) {
        Ok(prepared) => futures::future::Either::Left(send_prepared(inner, prepared, event)),
        Err(err) => futures::future::Either::Right(std::future::ready(Err(
            PublishError::from_error(err, Some(event)),
        ))),
    }
}

/// Sends a prepared event (see [`send_with_retry`]); a failure hands the event back.
///
/// The retry loop's future is boxed (about 900 bytes, a small block for malloc) so that the
/// future of a publish, which the `EventConnection` trait boxes, stays one too: above about
/// 1 KB malloc takes its large-block path, which cost more than the rest of the publish's
/// own machinery. Not an `async fn`, whose parameters would be held twice.
#[allow(clippy::manual_async_fn)]
fn send_prepared(
    inner: &Inner,
    mut prepared: Prepared,
    event: Event,
) -> impl std::future::Future<Output = Result<PublishAck, PublishError>> + '_ {
    async move {
        let result = Box::pin(send_with_retry(
            inner,
            &mut prepared,
            &event,
            Instant::now(),
        ))
        .await;
        result.map_err(|err| PublishError::from_error(err, Some(event)))
    }
}

/// Pipelined: every event is sent in order without waiting, at most [`PIPELINE_WINDOW`] acks
/// are awaited at once, and an event whose first ack is lost goes through the same retry as
/// [`publish`].
///
/// A first ack is awaited by async-nats' own ack future beside the number of the event's slot
/// ([`FirstAck`], a small allocation in the `FuturesUnordered`); the event and what a retry
/// needs wait in the slot ([`Window`]), so the in-flight futures are no larger than a
/// hand-written pipeline's. Only a retried event gets a future of its own (boxed).
pub(crate) async fn publish_all(
    inner: &Arc<Inner>,
    events: Vec<Event>,
) -> Vec<Result<PublishAck, PublishError>> {
    let mut window = Window::new(inner, events.len());
    let subjects = SubjectCache::default();
    for (index, mut event) in events.into_iter().enumerate() {
        let mut prepared = match prepare(inner, &mut event, &subjects) {
            Ok(prepared) => prepared,
            Err(err) => {
                window.results[index] = Some(Err(PublishError::from_error(err, Some(event))));
                continue;
            }
        };
        let started = Instant::now();
        let sent = send(inner, &mut prepared, &event, inner.retry.attempt_timeout).await;
        let waiting = Waiting {
            index,
            event,
            prepared,
            started,
        };
        match sent {
            Ok(ack_future) => window.await_first_ack(waiting, ack_future),
            Err(err) => window.attempt_failed(waiting, err),
        }
        while window.len() >= PIPELINE_WINDOW {
            window.settle_next().await;
        }
    }
    while window.len() > 0 {
        window.settle_next().await;
    }
    window
        .results
        .into_iter()
        .map(|result| {
            // Every index is settled above exactly once; the fallback only keeps this total.
            result.unwrap_or_else(|| Err(PublishError::new(PublishErrorKind::Other, None)))
        })
        .collect()
}

/// An event of [`publish_all`] sent once, waiting for its first ack.
struct Waiting {
    /// Its place in the batch.
    index: usize,
    event: Event,
    prepared: Prepared,
    /// When its first attempt started (the retry budget counts from there).
    started: Instant,
}

/// The ack future of a sent message, as async-nats makes it.
type AckFuture = <PublishAckFuture as IntoFuture>::IntoFuture;

/// The first ack of the event in a [`Window`] slot.
struct FirstAck {
    slot: usize,
    ack: AckFuture,
}

impl std::future::Future for FirstAck {
    type Output = (
        usize,
        Result<async_nats::jetstream::publish::PublishAck, JsPublishError>,
    );

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.get_mut();
        this.ack.as_mut().poll(cx).map(|ack| (this.slot, ack))
    }
}

type JsPublishError = async_nats::jetstream::context::PublishError;

/// A retried event of [`publish_all`]: its index and outcome.
type Retry<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = (usize, Result<PublishAck, PublishError>)> + Send + 'a>,
>;

/// The in-flight part of [`publish_all`]: first acks, retries, the events they belong to,
/// and the results so far.
struct Window<'a> {
    inner: &'a Arc<Inner>,
    results: Vec<Option<Result<PublishAck, PublishError>>>,
    /// The events waiting for their first ack; a settled slot is reused (`free`), so there
    /// are never more slots than the window.
    slots: Vec<Option<Waiting>>,
    free: Vec<usize>,
    first_acks: futures::stream::FuturesUnordered<FirstAck>,
    retries: futures::stream::FuturesUnordered<Retry<'a>>,
}

impl<'a> Window<'a> {
    fn new(inner: &'a Arc<Inner>, count: usize) -> Self {
        Window {
            inner,
            results: (0..count).map(|_| None).collect(),
            slots: Vec::new(),
            free: Vec::new(),
            first_acks: futures::stream::FuturesUnordered::new(),
            retries: futures::stream::FuturesUnordered::new(),
        }
    }

    /// Acks and retries in flight.
    fn len(&self) -> usize {
        self.first_acks.len() + self.retries.len()
    }

    fn await_first_ack(&mut self, waiting: Waiting, ack: PublishAckFuture) {
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(waiting);
                slot
            }
            None => {
                self.slots.push(Some(waiting));
                self.slots.len() - 1
            }
        };
        self.first_acks.push(FirstAck {
            slot,
            ack: ack.into_future(),
        });
    }

    /// A failed first attempt: given up, or retried with the same id.
    fn attempt_failed(&mut self, waiting: Waiting, err: AttemptError) {
        match err {
            AttemptError::Fail(err) => {
                self.results[waiting.index] =
                    Some(Err(PublishError::from_error(err, Some(waiting.event))));
            }
            // No responders: the retry loop tells a missing stream from an election.
            AttemptError::Retry(_) | AttemptError::NoResponders(_) => {
                let inner = self.inner;
                self.retries.push(Box::pin(async move {
                    let Waiting {
                        index,
                        event,
                        mut prepared,
                        started,
                    } = waiting;
                    let result = send_with_retry(inner, &mut prepared, &event, started).await;
                    (
                        index,
                        result.map_err(|err| PublishError::from_error(err, Some(event))),
                    )
                }));
            }
        }
    }

    /// Waits for the next first ack or retry to settle and records it. Only called while
    /// something is in flight.
    async fn settle_next(&mut self) {
        enum Settled {
            First(
                usize,
                Result<async_nats::jetstream::publish::PublishAck, JsPublishError>,
            ),
            Retried(usize, Result<PublishAck, PublishError>),
        }
        let settled = std::future::poll_fn(|cx| {
            use std::task::Poll;
            let mut pending = false;
            match self.first_acks.poll_next_unpin(cx) {
                Poll::Ready(Some((slot, ack))) => {
                    return Poll::Ready(Some(Settled::First(slot, ack)))
                }
                Poll::Ready(None) => {}
                Poll::Pending => pending = true,
            }
            match self.retries.poll_next_unpin(cx) {
                Poll::Ready(Some((index, result))) => {
                    return Poll::Ready(Some(Settled::Retried(index, result)))
                }
                Poll::Ready(None) => {}
                Poll::Pending => pending = true,
            }
            if pending {
                Poll::Pending
            } else {
                Poll::Ready(None)
            }
        })
        .await;
        match settled {
            None => {}
            Some(Settled::Retried(index, result)) => self.results[index] = Some(result),
            Some(Settled::First(slot, ack)) => {
                // Every pushed ack has its event in its slot until here.
                let Some(waiting) = self.slots.get_mut(slot).and_then(Option::take) else {
                    return;
                };
                self.free.push(slot);
                match ack {
                    Ok(ack) => self.results[waiting.index] = Some(Ok(publish_ack(ack))),
                    Err(err) => {
                        let err = classify(err, &waiting.prepared);
                        self.attempt_failed(waiting, err);
                    }
                }
            }
        }
    }
}

/// Whether the client has a connection to a server right now (not reconnecting).
fn connected(inner: &Inner) -> bool {
    inner.client.connection_state() == async_nats::connection::State::Connected
}

/// How often a publish looks at the connection state while it waits for the connection or
/// for an ack: the retry pause, but never a busy loop.
fn state_poll(retry: &PublishRetry) -> Duration {
    retry.pause.max(Duration::from_millis(10))
}

/// Waits until the client is connected again or `deadline` passes; whether it is connected.
async fn wait_connected(inner: &Inner, deadline: Instant) -> bool {
    let poll = state_poll(&inner.retry);
    loop {
        if connected(inner) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
    }
}

/// The error of a publish whose time ran out while the client was disconnected: `Disconnected`
/// with how long this publish saw the connection down, or `ConnectionClosed` if the client
/// gave up reconnecting.
async fn disconnected_error(
    inner: &Inner,
    event: &Event,
    down_since: Instant,
    attempts: u32,
) -> Error<PublishErrorKind> {
    if client_closed(&inner.client).await {
        return Error::with_detail(
            PublishErrorKind::ConnectionClosed,
            format!(
                "event {} not published: the connection is closed",
                event.id()
            ),
        );
    }
    let maybe_sent = if attempts > 0 {
        "; an attempt made before the connection dropped may have been stored: publishing the \
         event again is safe (same id, the server stores it once)"
    } else {
        ""
    };
    Error::with_detail(
        PublishErrorKind::Disconnected,
        format!(
            "event {} not published: not connected to the server for at least {:.1} s (the \
             client is reconnecting){maybe_sent}",
            event.id(),
            down_since.elapsed().as_secs_f64()
        ),
    )
}

/// Sends until the server acknowledged the message or the retry budget is spent. While the
/// client is disconnected, waits for the connection instead of sending into its buffer.
async fn send_with_retry(
    inner: &Inner,
    prepared: &mut Prepared,
    event: &Event,
    started: Instant,
) -> Result<PublishAck, Error<PublishErrorKind>> {
    let retry = inner.retry;
    let budget = retry
        .total
        .unwrap_or(inner.config.events_timeout)
        .min(inner.config.js_duplicate_window);
    let deadline = started + budget;
    let mut attempts = 0u32;
    let mut down_since: Option<Instant> = None;
    loop {
        if !connected(inner) {
            let since = *down_since.get_or_insert_with(Instant::now);
            // The rare waits are boxed: inline they would make every publish's future (boxed
            // once per publish, held once per pipelined event) larger.
            if !Box::pin(wait_connected(inner, deadline)).await {
                return Err(Box::pin(disconnected_error(inner, event, since, attempts)).await);
            }
            tracing::debug!(event_id = %event.id(), down_for = ?since.elapsed(), "connection back; publishing");
        }
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let attempt_timeout = retry.attempt_timeout.min(remaining);
        let why = match attempt(inner, prepared, event, attempt_timeout).await {
            Ok(ack) => {
                if attempts > 1 {
                    tracing::info!(event_id = %event.id(), attempts, duplicate = ack.duplicate, "publish succeeded after retry");
                }
                return Ok(ack);
            }
            Err(AttemptError::Fail(err)) => return Err(err),
            Err(AttemptError::Retry(why)) => why,
            Err(AttemptError::NoResponders(why)) => {
                if !Box::pin(stream_may_exist(inner, &prepared.subject, attempt_timeout)).await {
                    return Err(Error::with_detail(
                        PublishErrorKind::StreamNotFound,
                        format!(
                            "no stream holds subject {} (create it with init_stream / `cemsg stream init`)",
                            prepared.subject
                        ),
                    ));
                }
                why
            }
        };
        if !connected(inner) {
            // Waited for at the top of the loop, within the deadline.
            down_since.get_or_insert_with(Instant::now);
            continue;
        }
        if client_closed(&inner.client).await {
            return Err(Error::with_detail(
                PublishErrorKind::ConnectionClosed,
                format!("event {} not published: {why}", event.id()),
            ));
        }
        if Instant::now() + retry.pause >= deadline {
            return Err(Error::with_detail(
                PublishErrorKind::TimedOut,
                format!(
                    "event {} not acknowledged after {attempts} attempts in {:?}: {why}",
                    event.id(),
                    started.elapsed()
                ),
            ));
        }
        tracing::debug!(event_id = %event.id(), attempts, reason = %why, "publish not acknowledged; retrying with the same id");
        tokio::time::sleep(retry.pause).await;
    }
}

/// One send and its ack wait, cut short when the connection drops (an ack sent on a dropped
/// connection never arrives; the retry goes out on the new one).
async fn attempt(
    inner: &Inner,
    prepared: &mut Prepared,
    event: &Event,
    timeout: Duration,
) -> Result<PublishAck, AttemptError> {
    let ack_future = send(inner, prepared, event, timeout).await?;
    let ack = await_ack(inner, ack_future, prepared, timeout);
    tokio::pin!(ack);
    let poll = state_poll(&inner.retry);
    loop {
        tokio::select! {
            biased;
            result = &mut ack => return result,
            () = tokio::time::sleep(poll) => {
                if !connected(inner) {
                    return Err(AttemptError::Retry(
                        "the connection dropped while waiting for the ack".into(),
                    ));
                }
            }
        }
    }
}

/// Bounds the ack wait by `timeout`. The ack future bounds itself by the JetStream context's
/// timeout, which is [`PublishRetry::attempt_timeout`] (the context is built with it), and
/// reports `TimedOut`, retried like an own timeout; so an own timer is armed only when this
/// attempt has less time than that (the last one inside the retry budget).
async fn within_ack_timeout<F, T>(
    inner: &Inner,
    timeout: Duration,
    ack: F,
) -> Result<T, AttemptError>
where
    F: std::future::Future<Output = T>,
{
    if timeout >= inner.retry.attempt_timeout {
        Ok(ack.await)
    } else {
        tokio::time::timeout(timeout, ack)
            .await
            .map_err(|_| AttemptError::Retry("no ack in time".into()))
    }
}

/// Hands the message to the connection; returns the future of its ack. Nothing is handed over
/// while the client is disconnected: the client would buffer it and send it after the
/// reconnect, possibly after this publish already reported its failure.
async fn send(
    inner: &Inner,
    prepared: &mut Prepared,
    event: &Event,
    timeout: Duration,
) -> Result<PublishAckFuture, AttemptError> {
    if !connected(inner) {
        return Err(AttemptError::Retry("not connected".into()));
    }
    let headers = prepared
        .take_headers(inner.config.ce_mode, event)
        .map_err(AttemptError::Fail)?;
    let message = PublishMessage::build()
        .payload(prepared.payload.clone())
        .headers(headers);
    // Boxed: async-nats' sending future is about 850 bytes; inline it would make every
    // publish's future, which is boxed too, larger than malloc's small-block sizes.
    let mut sending = Box::pin(inner.js.send_publish(prepared.subject.clone(), message));
    // Usually handed over at the first poll (a permit free, room in the connection's queue):
    // then no timer is armed. Otherwise the timeout also bounds the wait for an in-flight
    // permit (the context allows 5,000 unacked publishes and waits for a permit when they
    // are all taken).
    let sent = match futures::poll!(sending.as_mut()) {
        std::task::Poll::Ready(sent) => sent,
        std::task::Poll::Pending => match tokio::time::timeout(timeout, sending).await {
            Err(_) => return Err(AttemptError::Retry("send timed out".into())),
            Ok(sent) => sent,
        },
    };
    sent.map_err(|err| classify(err, prepared))
}

async fn await_ack(
    inner: &Inner,
    ack_future: PublishAckFuture,
    prepared: &Prepared,
    timeout: Duration,
) -> Result<PublishAck, AttemptError> {
    match within_ack_timeout(inner, timeout, ack_future.into_future()).await? {
        Err(err) => Err(classify(err, prepared)),
        Ok(ack) => Ok(publish_ack(ack)),
    }
}

fn publish_ack(ack: async_nats::jetstream::publish::PublishAck) -> PublishAck {
    PublishAck {
        stream: ack.stream,
        sequence: ack.sequence,
        duplicate: ack.duplicate,
    }
}

/// Whether a stream may hold `subject`, asking the JetStream API (answered by the meta leader,
/// also while a stream elects its leader). Only a definite "no such stream" (or no JetStream
/// at all) is false; a timeout or another error is "maybe", so the publish is retried within
/// its bounded time.
async fn stream_may_exist(inner: &Inner, subject: &str, timeout: Duration) -> bool {
    use async_nats::jetstream::context::{
        GetStreamByNameErrorKind, RequestError, RequestErrorKind,
    };
    match tokio::time::timeout(timeout, inner.js.stream_by_subject(subject)).await {
        Ok(Ok(_)) | Err(_) => true,
        Ok(Err(err)) => match err.kind() {
            GetStreamByNameErrorKind::NotFound => false,
            GetStreamByNameErrorKind::Request => !std::error::Error::source(&err)
                .and_then(|s| s.downcast_ref::<RequestError>())
                .is_some_and(|e| e.kind() == RequestErrorKind::NoResponders),
            _ => true,
        },
    }
}

fn classify(
    err: async_nats::jetstream::context::PublishError,
    prepared: &Prepared,
) -> AttemptError {
    match err.kind() {
        JsPublishErrorKind::TimedOut
        | JsPublishErrorKind::BrokenPipe
        | JsPublishErrorKind::MaxAckPending => AttemptError::Retry(err.to_string()),
        JsPublishErrorKind::StreamNotFound => AttemptError::NoResponders(format!(
            "no responders for {} (stream leader election?)",
            prepared.subject
        )),
        JsPublishErrorKind::MaxPayloadExceeded => {
            AttemptError::Fail(Error::with_source(PublishErrorKind::TooLarge, err))
        }
        _ => {
            // A server error (a JetStream API error in the ack) will not change on retry; a
            // failure to hand the message to the connection might (the caller checks whether
            // the connection is closed for good before retrying).
            let source = std::error::Error::source(&err);
            if source.is_some_and(|s| s.is::<async_nats::SubjectError>()) {
                // The client refused the subject: the same subject is refused again on every
                // retry. (The type is checked before this; the prefix by the configuration.)
                return AttemptError::Fail(
                    Error::with_detail(
                        PublishErrorKind::InvalidType,
                        format!("{} is not a valid subject", prepared.subject),
                    )
                    .source(err),
                );
            }
            let server_error =
                source.and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
            let code = server_error.map(|e| e.error_code().0);
            if let Some(kind) = code.and_then(schedule_error_kind) {
                let detail = match code {
                    Some(TTL_DISABLED_CODE | SCHEDULES_DISABLED_CODE) => format!(
                        "the stream holding {} has this feature off (run init_stream / `cemsg stream init` on nats-server 2.12+)",
                        prepared.subject
                    ),
                    _ => format!("the server refused the schedule of {}", prepared.subject),
                };
                return AttemptError::Fail(Error::with_detail(kind, detail).source(err));
            }
            if server_error.is_some_and(|e| e.error_code().0 == DUPLICATE_IN_PROCESS_CODE) {
                // An earlier attempt with this id is still being stored (a clustered stream
                // replicating it): ask again, and the answer will be its ack or "duplicate".
                AttemptError::Retry(err.to_string())
            } else if server_error.is_some() {
                AttemptError::Fail(Error::with_source(PublishErrorKind::Other, err))
            } else {
                AttemptError::Retry(err.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::NATS_MSG_ID;

    #[test]
    fn wire_size_counts_the_header_block_like_hpub() {
        let mut headers = HeaderMap::new();
        assert_eq!(wire_size(&headers, 10), 10);
        headers.insert("Nats-Msg-Id", "abc");
        // "NATS/1.0\r\n" + "Nats-Msg-Id: abc\r\n" + "\r\n"
        assert_eq!(wire_size(&headers, 5), 10 + 18 + 2 + 5);
    }

    fn sample_event() -> Event {
        crate::event::new_event(
            "org.example.thing.happened",
            "tests",
            &serde_json::json!({"n": 1}),
        )
        .expect("a valid sample event")
    }

    #[test]
    fn a_retry_sends_the_same_headers_as_the_first_attempt() {
        for mode in [ContentMode::Structured, ContentMode::Binary] {
            let event = sample_event();
            let (headers, payload) = encode(mode, &event).expect("sample event encodes");
            let mut prepared = Prepared {
                subject: Subject::from("events.org.example.thing.happened"),
                headers: Some(headers.clone()),
                payload,
                directives: Vec::new(),
            };
            let first = prepared.take_headers(mode, &event).expect("first attempt");
            let retry = prepared
                .take_headers(mode, &event)
                .expect("rebuilt for a retry");
            assert_eq!(
                first, headers,
                "{mode:?}: the first attempt sends the encoded headers"
            );
            assert_eq!(
                retry, first,
                "{mode:?}: a retry sends the same headers again"
            );
            assert_eq!(
                retry.get(NATS_MSG_ID).map(|v| v.as_str()),
                Some(event.id()),
                "{mode:?}: Nats-Msg-Id is the event id on every attempt"
            );
        }
    }

    #[test]
    fn the_subject_follows_the_type_of_each_event_in_a_batch() {
        let config = Config::default();
        let cache = SubjectCache::default();
        let subjects: Vec<String> = ["a.x", "a.x", "b.y", "a.x"]
            .iter()
            .map(|ty| cache.subject(&config, ty, 0).to_string())
            .collect();
        let expected: Vec<String> = ["a.x", "a.x", "b.y", "a.x"]
            .iter()
            .map(|ty| config.events_subject(ty))
            .collect();
        assert_eq!(subjects, expected);
    }

    #[test]
    fn a_subject_the_client_refuses_fails_at_once_instead_of_being_retried() {
        let prepared = Prepared {
            subject: Subject::from("events.a b"),
            headers: None,
            payload: Bytes::new(),
            directives: Vec::new(),
        };
        let refused = async_nats::jetstream::context::PublishError::with_source(
            JsPublishErrorKind::Other,
            async_nats::SubjectError::InvalidFormat,
        );
        match classify(refused, &prepared) {
            AttemptError::Fail(err) => assert_eq!(err.kind(), PublishErrorKind::InvalidType),
            AttemptError::Retry(why) | AttemptError::NoResponders(why) => {
                panic!("an invalid subject was retried: {why}")
            }
        }
        // A failure to hand the message over (no server answer) is still retried.
        let lost = async_nats::jetstream::context::PublishError::with_source(
            JsPublishErrorKind::Other,
            std::io::Error::other("channel closed"),
        );
        assert!(matches!(classify(lost, &prepared), AttemptError::Retry(_)));
    }

    #[test]
    fn default_retry_is_bounded() {
        let retry = PublishRetry::default();
        assert!(retry.attempt_timeout > Duration::ZERO);
        assert!(retry.pause < retry.attempt_timeout);
    }
}
