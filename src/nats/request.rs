//! Sending queries: one request with one reply ([`request`]), and a request whose replies are
//! gathered from an inbox subscription ([`request_stream`]: a replier's reply stream, or
//! scatter-gather from many repliers). The reply rules are the shared layer's
//! ([`interpret_reply`], [`ReplyStream::from_raw`]).

use std::time::Duration;

use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use futures::StreamExt;

use super::Inner;
use crate::codec;
use crate::config::MAX_REQUEST_TIMEOUT;
use crate::error::{Error, RequestError, RequestErrorKind};
use crate::query::{interpret_reply, prepare_request, RawReply, ReplyStream, ReplyStreamOptions};

/// A request ready to go: its subject (the op) and the encoded event.
struct Outgoing {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

/// Fills in source and transaction id, encodes in the connection's content mode, and refuses
/// a message larger than the server accepts before anything is sent.
fn prepare(inner: &Inner, mut request: Event) -> Result<Outgoing, RequestError> {
    prepare_request(&mut request, &inner.source)?;
    let subject = request.ty().to_owned();
    let encoded = codec::encode(&request, inner.mode)
        .map_err(|e| e.map_kind(|_| RequestErrorKind::Encode))?;
    let max = inner.client.max_payload();
    let size = encoded.payload.len() + header_size(&encoded.headers);
    if max > 0 && size > max {
        return Err(Error::with_detail(
            RequestErrorKind::Encode,
            format!("request of {size} bytes is larger than the server's max_payload {max}"),
        ));
    }
    Ok(Outgoing {
        subject,
        headers: encoded.headers,
        payload: encoded.payload,
    })
}

/// The size of the headers on the wire (`NATS/1.0\r\n`, `name: value\r\n` each, `\r\n`).
fn header_size(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            let name = AsRef::<str>::as_ref(name).len();
            values
                .iter()
                .map(|v| name + 2 + v.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    if lines == 0 {
        0
    } else {
        "NATS/1.0\r\n".len() + lines + 2
    }
}

/// A closed connection is reported as such; anything else keeps the client's error as source.
fn other_error(inner: &Inner, err: impl Into<crate::error::BoxError>) -> RequestError {
    if inner.events.is_closed() {
        Error::with_source(RequestErrorKind::ConnectionClosed, err)
    } else {
        Error::with_source(RequestErrorKind::Other, err)
    }
}

fn map_request_error(
    inner: &Inner,
    err: async_nats::RequestError,
    timeout: Duration,
) -> RequestError {
    use async_nats::RequestErrorKind as Nats;
    match err.kind() {
        Nats::TimedOut => Error::with_detail(
            RequestErrorKind::TimedOut,
            format!("no reply within {timeout:?}"),
        ),
        Nats::NoResponders => Error::new(RequestErrorKind::NoResponders),
        Nats::InvalidSubject => Error::with_detail(
            RequestErrorKind::InvalidOptions,
            "the op (event type) is not a valid NATS subject",
        )
        .source(err),
        Nats::MaxPayloadExceeded => Error::with_source(RequestErrorKind::Encode, err),
        _ => other_error(inner, err),
    }
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
/// [`MAX_REQUEST_TIMEOUT`]) for the one reply.
pub(super) async fn request(
    inner: &Inner,
    request: Event,
    timeout: Duration,
) -> Result<Event, RequestError> {
    if inner.events.is_closed() {
        return Err(Error::new(RequestErrorKind::ConnectionClosed));
    }
    let timeout = timeout.min(MAX_REQUEST_TIMEOUT);
    let out = prepare(inner, request)?;
    // One timer per request: ours bounds both handing the request to the connection (which
    // can block while the client's buffers are full) and the wait for the reply, so async-nats
    // is told not to arm a second one.
    let nats_request = async_nats::Request::new()
        .headers(out.headers)
        .payload(out.payload)
        .timeout(None);
    let sent = tokio::time::timeout(
        timeout,
        inner.client.send_request(out.subject, nats_request),
    )
    .await;
    let message = match sent {
        Err(_) => {
            return Err(Error::with_detail(
                RequestErrorKind::TimedOut,
                format!("no reply within {timeout:?}"),
            ))
        }
        Ok(result) => result.map_err(|e| map_request_error(inner, e, timeout))?,
    };
    interpret_reply(message.headers.as_ref(), &message.payload).map(|(event, _)| event)
}

/// Subscribes to a fresh inbox, sends `request` with that inbox as reply subject, and returns
/// the stream of what arrives there, ended by the shared rules.
pub(super) async fn request_stream(
    inner: &Inner,
    request: Event,
    mut options: ReplyStreamOptions,
) -> Result<ReplyStream, RequestError> {
    if inner.events.is_closed() {
        return Err(Error::new(RequestErrorKind::ConnectionClosed));
    }
    if options.max_replies == Some(0) {
        return Err(Error::with_detail(
            RequestErrorKind::InvalidOptions,
            "max_replies must be at least 1",
        ));
    }
    options.deadline = Some(
        options
            .deadline
            .unwrap_or(inner.default_timeout)
            .min(MAX_REQUEST_TIMEOUT),
    );
    let out = prepare(inner, request)?;
    let inbox = inner.client.new_inbox();
    let subscriber = inner
        .client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| other_error(inner, e))?;
    inner
        .client
        .publish_with_reply_and_headers(out.subject, inbox, out.headers, out.payload)
        .await
        .map_err(|e| map_publish_error(inner, e))?;
    // Dropping the stream drops the subscriber, which unsubscribes from the inbox.
    let raw = subscriber
        .map(|message| {
            if message.status == Some(StatusCode::NO_RESPONDERS) {
                RawReply::NoResponders
            } else {
                RawReply::Message {
                    headers: message.headers,
                    payload: message.payload,
                }
            }
        })
        .boxed();
    Ok(ReplyStream::from_raw(raw, &options, inner.default_timeout))
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
