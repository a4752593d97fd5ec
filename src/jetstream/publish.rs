//! Persisted publish: encode, refuse what is too large before sending, publish with
//! `Nats-Msg-Id` = event id, wait for the PubAck, and retry with the same id on a lost ack
//! (timeout, dropped connection) within a bounded time that stays inside the stream's
//! duplicate window, so a retried event is never stored twice.
//!
//! The pipelined form runs the same per-event publish for many events at once (at most
//! [`PIPELINE_WINDOW`] in flight) and waits for every ack.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind as JsPublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use futures::StreamExt;
use tokio::time::Instant;

use crate::codec;
use crate::error::{Error, PublishErrorKind};
use crate::event::populate_source;
use crate::events::{PublishAck, PublishError};
use crate::headers::NATS_MSG_ID;

use super::{client_closed, Inner};

/// JetStream's error code for "duplicate message id is in process": a message with the same
/// `Nats-Msg-Id` was received and is still being stored (replicated), so its outcome is not
/// known yet.
const DUPLICATE_IN_PROCESS_CODE: u64 = 10158;

/// At most this many pipelined publishes wait for their ack at once.
pub(crate) const PIPELINE_WINDOW: usize = 1024;

/// How a publish whose ack did not arrive is retried.
///
/// Every attempt re-sends the same event with the same `Nats-Msg-Id`, so the server stores it
/// once and reports later copies as duplicates. Retrying stops at `total` (default: the
/// connection's `NATS_EVENTS_TIMEOUT`), never later than the stream's duplicate window.
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
struct Prepared {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    event_id: String,
}

/// Fills in the source, encodes in the connection's content mode, sets `Nats-Msg-Id` and
/// checks the size against the server's max payload.
fn prepare(inner: &Inner, event: &mut Event) -> Result<Prepared, Error<PublishErrorKind>> {
    populate_source(event, &inner.config.client_id);
    let encoded = codec::encode(event, inner.config.ce_mode)
        .map_err(|e| e.map_kind(|_| PublishErrorKind::Encode))?;
    let mut headers = encoded.headers;
    let event_id = event.id().to_owned();
    let msg_id: async_nats::HeaderValue = event_id.parse().map_err(|_| {
        Error::with_detail(
            PublishErrorKind::Encode,
            format!("event id {event_id:?} cannot be a Nats-Msg-Id header"),
        )
    })?;
    headers.insert(NATS_MSG_ID, msg_id);
    let size = wire_size(&headers, encoded.payload.len());
    let limit = inner.client.max_payload();
    if size > limit {
        return Err(Error::with_detail(
            PublishErrorKind::TooLarge,
            format!(
                "event {event_id} is {size} bytes (headers + payload), the server's max payload is {limit} bytes"
            ),
        ));
    }
    Ok(Prepared {
        subject: inner.config.events_subject(event.ty()),
        headers,
        payload: encoded.payload,
        event_id,
    })
}

/// Size of headers + payload as the server counts it against `max_payload` (as `HPUB`).
pub(crate) fn wire_size(headers: &HeaderMap, payload_len: usize) -> usize {
    if headers.is_empty() {
        return payload_len;
    }
    let mut len = b"NATS/1.0\r\n".len() + b"\r\n".len();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        for value in values {
            let value: &str = value.as_ref();
            len += name.len() + 2 + value.len() + 2;
        }
    }
    len + payload_len
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

pub(crate) async fn publish(
    inner: &Arc<Inner>,
    mut event: Event,
) -> Result<PublishAck, PublishError> {
    let prepared = match prepare(inner, &mut event) {
        Ok(prepared) => prepared,
        Err(err) => return Err(PublishError::from_error(err, Some(event))),
    };
    send_with_retry(inner, &prepared, Instant::now())
        .await
        .map_err(|err| PublishError::from_error(err, Some(event)))
}

/// Pipelined: every event is sent in order without waiting, at most [`PIPELINE_WINDOW`] acks
/// are awaited at once, and an event whose first ack is lost goes through the same retry as
/// [`publish`].
pub(crate) async fn publish_all(
    inner: &Arc<Inner>,
    events: Vec<Event>,
) -> Vec<Result<PublishAck, PublishError>> {
    let count = events.len();
    let mut results: Vec<Option<Result<PublishAck, PublishError>>> =
        (0..count).map(|_| None).collect();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    for (index, mut event) in events.into_iter().enumerate() {
        let prepared = match prepare(inner, &mut event) {
            Ok(prepared) => prepared,
            Err(err) => {
                results[index] = Some(Err(PublishError::from_error(err, Some(event))));
                continue;
            }
        };
        let started = Instant::now();
        let sent = send(inner, &prepared, inner.retry.attempt_timeout).await;
        in_flight.push(async move {
            let first = match sent {
                Ok(ack_future) => {
                    await_ack(ack_future, &prepared, inner.retry.attempt_timeout).await
                }
                Err(err) => Err(err),
            };
            let result = match first {
                Ok(ack) => Ok(ack),
                Err(AttemptError::Fail(err)) => Err(err),
                // No responders: the retry loop tells a missing stream from an election.
                Err(AttemptError::Retry(_) | AttemptError::NoResponders(_)) => {
                    send_with_retry(inner, &prepared, started).await
                }
            };
            (
                index,
                result.map_err(|err| PublishError::from_error(err, Some(event))),
            )
        });
        while in_flight.len() >= PIPELINE_WINDOW {
            if let Some((index, result)) = in_flight.next().await {
                results[index] = Some(result);
            }
        }
    }
    while let Some((index, result)) = in_flight.next().await {
        results[index] = Some(result);
    }
    results
        .into_iter()
        .map(|result| {
            // Every index is settled above exactly once; the fallback only keeps this total.
            result.unwrap_or_else(|| Err(PublishError::new(PublishErrorKind::Other, None)))
        })
        .collect()
}

/// Sends until the server acknowledged the message or the retry budget is spent.
async fn send_with_retry(
    inner: &Inner,
    prepared: &Prepared,
    started: Instant,
) -> Result<PublishAck, Error<PublishErrorKind>> {
    let retry = inner.retry;
    let budget = retry
        .total
        .unwrap_or(inner.config.events_timeout)
        .min(inner.config.js_duplicate_window);
    let deadline = started + budget;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let attempt_timeout = retry.attempt_timeout.min(remaining);
        let why = match attempt(inner, prepared, attempt_timeout).await {
            Ok(ack) => {
                if attempts > 1 {
                    tracing::info!(event_id = %prepared.event_id, attempts, duplicate = ack.duplicate, "publish succeeded after retry");
                }
                return Ok(ack);
            }
            Err(AttemptError::Fail(err)) => return Err(err),
            Err(AttemptError::Retry(why)) => why,
            Err(AttemptError::NoResponders(why)) => {
                if !stream_may_exist(inner, &prepared.subject, attempt_timeout).await {
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
        if client_closed(&inner.client).await {
            return Err(Error::with_detail(
                PublishErrorKind::ConnectionClosed,
                format!("event {} not published: {why}", prepared.event_id),
            ));
        }
        if Instant::now() + retry.pause >= deadline {
            return Err(Error::with_detail(
                PublishErrorKind::TimedOut,
                format!(
                    "event {} not acknowledged after {attempts} attempts in {:?}: {why}",
                    prepared.event_id,
                    started.elapsed()
                ),
            ));
        }
        tracing::debug!(event_id = %prepared.event_id, attempts, reason = %why, "publish not acknowledged; retrying with the same id");
        tokio::time::sleep(retry.pause).await;
    }
}

async fn attempt(
    inner: &Inner,
    prepared: &Prepared,
    timeout: Duration,
) -> Result<PublishAck, AttemptError> {
    let ack_future = send(inner, prepared, timeout).await?;
    await_ack(ack_future, prepared, timeout).await
}

/// Hands the message to the connection; returns the future of its ack.
async fn send(
    inner: &Inner,
    prepared: &Prepared,
    timeout: Duration,
) -> Result<PublishAckFuture, AttemptError> {
    let message = PublishMessage::build()
        .payload(prepared.payload.clone())
        .headers(prepared.headers.clone());
    let sending = inner.js.send_publish(prepared.subject.clone(), message);
    match tokio::time::timeout(timeout, sending).await {
        Err(_) => Err(AttemptError::Retry("send timed out".into())),
        Ok(Err(err)) => Err(classify(err, prepared)),
        Ok(Ok(ack_future)) => Ok(ack_future),
    }
}

async fn await_ack(
    ack_future: PublishAckFuture,
    prepared: &Prepared,
    timeout: Duration,
) -> Result<PublishAck, AttemptError> {
    match tokio::time::timeout(timeout, ack_future.into_future()).await {
        Err(_) => Err(AttemptError::Retry("no ack in time".into())),
        Ok(Err(err)) => Err(classify(err, prepared)),
        Ok(Ok(ack)) => Ok(PublishAck {
            stream: ack.stream,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        }),
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
            let server_error = std::error::Error::source(&err)
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
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

    #[test]
    fn wire_size_counts_the_header_block_like_hpub() {
        let mut headers = HeaderMap::new();
        assert_eq!(wire_size(&headers, 10), 10);
        headers.insert("Nats-Msg-Id", "abc");
        // "NATS/1.0\r\n" + "Nats-Msg-Id: abc\r\n" + "\r\n"
        assert_eq!(wire_size(&headers, 5), 10 + 18 + 2 + 5);
    }

    #[test]
    fn default_retry_is_bounded() {
        let retry = PublishRetry::default();
        assert!(retry.attempt_timeout > Duration::ZERO);
        assert!(retry.pause < retry.attempt_timeout);
    }
}
