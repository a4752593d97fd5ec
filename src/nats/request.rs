//! Sending queries: one request with one reply ([`request`]), and a request whose replies are
//! gathered from an inbox subscription ([`request_stream`]: a replier's reply stream, or
//! scatter-gather from many repliers). The reply rules are the shared layer's
//! ([`interpret_reply`], [`ReplyStream::from_raw`]).

use crate::codec::ReceivedEvent;
use std::future::Future;

use futures::future::{self, Either, FutureExt};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{HeaderMap, Message, StatusCode};
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};

use super::mux::RegisterError;
use super::Inner;
use crate::codec;
use crate::config::MAX_REQUEST_TIMEOUT;
use crate::error::{Error, RequestError, RequestErrorKind};
use crate::event::populate_source;
use crate::query::{
    header_size, interpret_reply, prepare_request, set_request_timeout, RawReply, ReplyStream,
    ReplyStreamOptions,
};

/// Replies a reply stream holds before it is read (as an async-nats subscription's buffer);
/// beyond that further replies are discarded as for a slow consumer.
const STREAM_CAPACITY: usize = 65_536;

/// A request ready to go: its subject (the op) and the encoded event.
struct Outgoing {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

/// Fills in source and transaction id (only the source for a request that came through
/// [`traced_request`](crate::query::traced_request), which did the rest), encodes in the
/// connection's content mode with the requester's `timeout` (`Request-Timeout-Ms`), and
/// refuses a message larger than the server accepts before anything is sent.
fn prepare(
    inner: &Inner,
    mut request: Event,
    timeout: Duration,
    traced: bool,
) -> Result<Outgoing, RequestError> {
    if traced {
        populate_source(&mut request, &inner.source);
    } else {
        prepare_request(&mut request, &inner.source)?;
    }
    let subject = request.ty().to_owned();
    let encoded = codec::encode(&request, inner.mode)
        .map_err(|e| e.map_kind(|_| RequestErrorKind::Encode))?;
    let mut headers = HeaderMap::from(encoded.headers);
    set_request_timeout(&mut headers, timeout);
    let max = inner.client.max_payload();
    let size = encoded.payload.len() + header_size(&headers);
    if max > 0 && size > max {
        return Err(Error::with_detail(
            RequestErrorKind::Encode,
            format!("request of {size} bytes is larger than the server's max_payload {max}"),
        ));
    }
    Ok(Outgoing {
        subject,
        headers,
        payload: encoded.payload,
    })
}

/// A closed connection is reported as such; anything else keeps the client's error as source.
fn other_error(inner: &Inner, err: impl Into<crate::error::BoxError>) -> RequestError {
    if inner.events.is_closed() {
        Error::with_source(RequestErrorKind::ConnectionClosed, err)
    } else {
        Error::with_source(RequestErrorKind::Other, err)
    }
}

fn register_error(inner: &Inner, err: RegisterError) -> RequestError {
    match err {
        RegisterError::Closed => Error::new(RequestErrorKind::ConnectionClosed),
        RegisterError::TooMany => Error::with_detail(
            RequestErrorKind::Other,
            format!(
                "{} requests already wait for replies on this connection",
                super::mux::MAX_PENDING
            ),
        ),
        RegisterError::Subscribe(e) => other_error(inner, e),
    }
}

/// `Disconnected` when the client is not connected now (it is reconnecting), saying for how
/// long when the connection's events were seen; `prefix` says what was going on.
fn disconnected(inner: &Inner, prefix: &str) -> Option<RequestError> {
    if inner.client.connection_state() != State::Disconnected {
        return None;
    }
    let down = match inner.events.down_for() {
        Some(down) => format!("connection lost {:.1}s ago", down.as_secs_f64()),
        None => "connection lost".to_owned(),
    };
    Some(Error::with_detail(
        RequestErrorKind::Disconnected,
        format!("{prefix}not connected to the NATS server ({down}; reconnecting)"),
    ))
}

/// Refuses at once a request that cannot be sent: closed, or disconnected.
///
/// A refusal yields to the runtime first: it is otherwise ready at its first poll, and a
/// caller retrying in a loop would never give the connection's own task (on the same worker
/// thread) a turn to reconnect.
async fn check_connection(inner: &Inner) -> Result<(), RequestError> {
    match refusal(inner) {
        Some(err) => refuse(err).await,
        None => Ok(()),
    }
}

/// Why a request cannot be sent now (closed, or disconnected), if it cannot.
fn refusal(inner: &Inner) -> Option<RequestError> {
    if inner.events.is_closed() {
        Some(Error::new(RequestErrorKind::ConnectionClosed))
    } else {
        disconnected(inner, "")
    }
}

/// Fails with `err` after a turn of the runtime (see [`check_connection`]).
async fn refuse<T>(err: RequestError) -> Result<T, RequestError> {
    tokio::task::yield_now().await;
    Err(err)
}

fn map_publish_error(inner: &Inner, err: async_nats::PublishError) -> RequestError {
    use async_nats::client::PublishErrorKind as Nats;
    match err.kind() {
        Nats::InvalidSubject => Error::with_detail(
            RequestErrorKind::InvalidOptions,
            "the op (event type) is not a valid NATS subject",
        )
        .source(err),
        Nats::MaxPayloadExceeded => Error::with_source(RequestErrorKind::Encode, err),
        _ => other_error(inner, err),
    }
}

/// Sends `request` on its op and waits up to `timeout` (clamped to
/// [`MAX_REQUEST_TIMEOUT`]) for the one reply, through the connection's multiplexer (whose
/// entry for this request is gone when this returns, whatever the outcome).
///
/// The request is encoded when this is called (encoding has no effects), so the future holds
/// the encoded message instead of the event; a closed or lost connection is still reported
/// before an encoding error.
pub(super) fn request(
    inner: &Inner,
    request: Event,
    timeout: Duration,
) -> impl Future<Output = Result<ReceivedEvent, RequestError>> + Send + '_ {
    let timeout = timeout.min(MAX_REQUEST_TIMEOUT);
    let prepared = prepare(inner, request, timeout, true);
    // No `async` block around `exchange`: it would hold the prepared request twice.
    if let Some(refused) = refusal(inner) {
        return Either::Left(Either::Left(refuse(refused)));
    }
    match prepared {
        Ok(out) => Either::Right(exchange(inner, out, timeout)),
        Err(err) => Either::Left(Either::Right(future::ready(Err(err)))),
    }
}

/// Sends a prepared request and waits up to `timeout` for its one reply. One timer bounds
/// registering, handing the request to the connection (which can block while the client's
/// buffers are full) and the wait for the reply. Not an `async fn`: the exchange takes the
/// prepared request itself, and the reply is read by a `map`.
fn exchange(
    inner: &Inner,
    out: Outgoing,
    timeout: Duration,
) -> impl Future<Output = Result<ReceivedEvent, RequestError>> + Send + '_ {
    let exchange = async move {
        let registered = match inner.mux.one_now() {
            Some(registered) => registered,
            // The connection's first request subscribes the reply route: boxed, so that its
            // state does not make every request's future larger.
            None => Box::pin(inner.mux.one()).await,
        };
        let mut waiter = registered.map_err(|e| register_error(inner, e))?;
        inner
            .client
            .publish_with_reply_and_headers(
                out.subject,
                waiter.reply_subject(),
                out.headers,
                out.payload,
            )
            .await
            .map_err(|e| map_publish_error(inner, e))?;
        (&mut waiter.replies)
            .await
            .map_err(|_| Error::new(RequestErrorKind::ConnectionClosed))
    };
    tokio::time::timeout(timeout, exchange).map(move |result| {
        let message: Message = match result {
            Err(_) => {
                let prefix = format!("no reply within {timeout:?}: ");
                return Err(disconnected(inner, &prefix).unwrap_or_else(|| {
                    Error::with_detail(
                        RequestErrorKind::TimedOut,
                        format!("no reply within {timeout:?}"),
                    )
                }));
            }
            Ok(result) => result?,
        };
        if message.status == Some(StatusCode::NO_RESPONDERS) {
            return Err(Error::new(RequestErrorKind::NoResponders));
        }
        interpret_reply(message.headers.as_ref(), &message.payload).map(|(event, _)| event)
    })
}

/// Registers a reply stream with the multiplexer, sends `request` with its reply subject, and
/// returns the stream of what arrives there, ended by the shared rules. Dropping the stream
/// removes its entry.
pub(super) async fn request_stream(
    inner: &Inner,
    request: Event,
    mut options: ReplyStreamOptions,
) -> Result<ReplyStream, RequestError> {
    check_connection(inner).await?;
    if options.max_replies == Some(0) {
        return Err(Error::with_detail(
            RequestErrorKind::InvalidOptions,
            "max_replies must be at least 1",
        ));
    }
    let deadline = options
        .deadline
        .unwrap_or(inner.default_timeout)
        .min(MAX_REQUEST_TIMEOUT);
    options.deadline = Some(deadline);
    let out = prepare(inner, request, deadline, false)?;
    let waiter = inner
        .mux
        .many(STREAM_CAPACITY)
        .await
        .map_err(|e| register_error(inner, e))?;
    inner
        .client
        .publish_with_reply_and_headers(
            out.subject,
            waiter.reply_subject(),
            out.headers,
            out.payload,
        )
        .await
        .map_err(|e| map_publish_error(inner, e))?;
    let raw = futures::stream::unfold(waiter, |mut waiter| async move {
        let message = waiter.replies.recv().await?;
        let raw = if message.status == Some(StatusCode::NO_RESPONDERS) {
            RawReply::NoResponders
        } else {
            RawReply::Message {
                headers: message.headers,
                payload: message.payload,
            }
        };
        Some((raw, waiter))
    });
    Ok(ReplyStream::from_raw(
        Box::pin(raw),
        &options,
        inner.default_timeout,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_size_counts_the_wire_form() {
        let mut headers = HeaderMap::new();
        assert_eq!(header_size(&headers), 0);
        headers.insert("A", "bc");
        // "NATS/1.0\r\n" + "A: bc\r\n" + "\r\n"
        assert_eq!(header_size(&headers), 10 + 7 + 2);
    }
}
