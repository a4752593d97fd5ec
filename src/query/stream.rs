//! Reading replies: [`ReplyStreamOptions`] and the [`ReplyStream`] of a request that gets many
//! replies, and how a raw reply becomes an event or a remote error.

use crate::codec::ReceivedEvent;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};

use crate::codec::{self, HeaderMap};
use crate::error::{Error, RemoteError, RequestError, RequestErrorKind};
use crate::headers::{REPLY_STREAM_INDEX, REPLY_STREAM_TOTAL, SERVICE_ERROR, SERVICE_ERROR_CODE};

/// When a [`ReplyStream`] ends, besides a replier's `Reply-Stream-Total` (the NATS "request
/// many" strategies; the first one reached wins).
///
/// # Examples
///
/// ```
/// use ce_messaging::query::ReplyStreamOptions;
/// use std::time::Duration;
///
/// // scatter-gather: up to 5 answers, at most 2 s, give up after 200 ms of silence
/// let options = ReplyStreamOptions::default()
///     .max_replies(5)
///     .deadline(Duration::from_secs(2))
///     .stall(Duration::from_millis(200));
/// assert_eq!(options.max_replies, Some(5));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ReplyStreamOptions {
    /// End after this many replies.
    pub max_replies: Option<usize>,
    /// End this long after the request was sent; `None`: the connection's request timeout.
    pub deadline: Option<Duration>,
    /// End when no reply arrived for this long (after the first one).
    pub stall: Option<Duration>,
    /// End on an empty-payload message (a replier's "no more" sentinel).
    pub sentinel: bool,
}

impl ReplyStreamOptions {
    /// Sets [`max_replies`](Self::max_replies).
    #[must_use]
    pub fn max_replies(mut self, n: usize) -> Self {
        self.max_replies = Some(n);
        self
    }

    /// Sets [`deadline`](Self::deadline).
    #[must_use]
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// Sets [`stall`](Self::stall).
    #[must_use]
    pub fn stall(mut self, d: Duration) -> Self {
        self.stall = Some(d);
        self
    }

    /// Sets [`sentinel`](Self::sentinel).
    #[must_use]
    pub fn sentinel(mut self, on: bool) -> Self {
        self.sentinel = on;
        self
    }
}

/// The replies of a [`QueryConnection::request_stream`](super::QueryConnection::request_stream), as they arrive.
///
/// A `futures::Stream` of `Result<ReceivedEvent, RequestError>`. The call that returns it fails only
/// for what stops the request from being sent (`InvalidOptions`, `Encode`, `Disconnected`,
/// `ConnectionClosed`); everything that comes back after the send arrives here, in order:
///
/// - **No responders** (nobody listens for the op): the stream's first and only item is
///   `Err(NoResponders)`, then it ends. [`expect_next`](Self::expect_next) thus returns the
///   same `Err(NoResponders)` that [`request`](super::QueryConnection::request) does.
/// - An error reply from one replier is an `Err` item (`Remote`), and the stream goes on.
/// - A stream that gets no reply at all before its deadline yields one `TimedOut` error; a
///   replier's stream that stops short of its `Reply-Stream-Total` yields `TimedOut` too.
/// - A replier's empty reply stream (zero replies, the end marker `Reply-Stream-Total: 0`)
///   ends the stream without an item: zero replies is an answer, not an error.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(queries: &dyn ce_messaging::query::QueryConnection, request: ce_messaging::Event)
/// # -> Result<(), ce_messaging::error::RequestError> {
/// use ce_messaging::query::ReplyStreamOptions;
/// let mut replies = queries.request_stream(request, ReplyStreamOptions::default()).await?;
/// let first = replies.expect_next().await?;
/// while let Some(reply) = replies.next().await {
///     println!("{}", reply?);
/// }
/// # Ok(()) }
/// ```
pub struct ReplyStream {
    inner: BoxStream<'static, Result<ReceivedEvent, RequestError>>,
}

impl std::fmt::Debug for ReplyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyStream").finish_non_exhaustive()
    }
}

impl ReplyStream {
    /// The next reply, or `None` when the stream ended.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a reply not returned stays in the stream.
    pub async fn next(&mut self) -> Option<Result<ReceivedEvent, RequestError>> {
        self.inner.next().await
    }

    /// The next reply; the end of the stream is a `TimedOut` error.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`next`](Self::next).
    pub async fn expect_next(&mut self) -> Result<ReceivedEvent, RequestError> {
        match self.inner.next().await {
            Some(result) => result,
            None => Err(Error::with_detail(
                RequestErrorKind::TimedOut,
                "reply stream ended",
            )),
        }
    }

    /// All remaining replies; the first error ends collection.
    pub async fn collect_all(mut self) -> Result<Vec<ReceivedEvent>, RequestError> {
        let mut out = Vec::new();
        while let Some(item) = self.inner.next().await {
            out.push(item?);
        }
        Ok(out)
    }

    /// Builds a reply stream from raw replies (the backend's part) and the termination rules.
    pub(crate) fn from_raw(
        raw: BoxStream<'static, RawReply>,
        options: &ReplyStreamOptions,
        default_deadline: Duration,
    ) -> Self {
        let deadline = tokio::time::Instant::now() + options.deadline.unwrap_or(default_deadline);
        let state = StreamState {
            raw,
            deadline,
            stall: options.stall,
            last: None,
            max: options.max_replies,
            sentinel: options.sentinel,
            received: 0,
            total: None,
            done: false,
        };
        let inner = futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            let wake = match (st.stall, st.last) {
                (Some(stall), Some(last)) => st.deadline.min(last + stall),
                _ => st.deadline,
            };
            tokio::select! {
                item = st.raw.next() => match item {
                    None => {
                        st.done = true;
                        st.incomplete_error().map(|e| (Err(e), st))
                    }
                    Some(RawReply::NoResponders) => {
                        st.done = true;
                        Some((Err(Error::new(RequestErrorKind::NoResponders)), st))
                    }
                    Some(RawReply::Message { headers, payload }) => {
                        let found = ReplyHeaders::of(headers.as_ref());
                        if found.is_empty_stream_marker() {
                            // Zero replies: the stream ends cleanly (the state is dropped).
                            return None;
                        }
                        if st.sentinel && payload.is_empty() && !found.is_error_reply() {
                            st.done = true;
                            return st.incomplete_error().map(|e| (Err(e), st));
                        }
                        st.received += 1;
                        st.last = Some(tokio::time::Instant::now());
                        let result = interpret_reply(headers.as_ref(), &payload).map(|(event, position)| {
                            if let Some((_, total)) = position {
                                st.total = Some(total);
                            }
                            event
                        });
                        if st.total.is_some_and(|t| st.received >= t)
                            || st.max.is_some_and(|m| st.received >= m)
                        {
                            st.done = true;
                        }
                        Some((result, st))
                    }
                },
                _ = tokio::time::sleep_until(wake) => {
                    st.done = true;
                    if st.received == 0 {
                        Some((Err(Error::with_detail(RequestErrorKind::TimedOut, "no reply before the deadline")), st))
                    } else {
                        st.incomplete_error().map(|e| (Err(e), st))
                    }
                }
            }
        });
        ReplyStream {
            inner: inner.boxed(),
        }
    }
}

struct StreamState {
    raw: BoxStream<'static, RawReply>,
    deadline: tokio::time::Instant,
    stall: Option<Duration>,
    last: Option<tokio::time::Instant>,
    max: Option<usize>,
    sentinel: bool,
    received: usize,
    total: Option<usize>,
    done: bool,
}

impl StreamState {
    fn incomplete_error(&self) -> Option<RequestError> {
        match self.total {
            Some(total) if self.received < total => Some(Error::with_detail(
                RequestErrorKind::TimedOut,
                format!(
                    "reply stream incomplete: {} of {total} replies",
                    self.received
                ),
            )),
            _ => None,
        }
    }
}

impl Stream for ReplyStream {
    type Item = Result<ReceivedEvent, RequestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// A raw reply as a backend receives it.
#[derive(Debug)]
pub(crate) enum RawReply {
    /// A message on the reply subject.
    Message {
        headers: Option<HeaderMap>,
        payload: Bytes,
    },
    /// The server said nobody listens (NATS status 503).
    NoResponders,
}

/// The headers a requester reads on a reply, found in one pass over the map: a lookup each
/// would hash every name with SipHash (async-nats' `HeaderMap` is a std `HashMap`), and a reply
/// was looked at up to seven times. Names match exactly, as `HeaderMap::get` matches them.
#[derive(Default, Clone, Copy)]
pub(super) struct ReplyHeaders<'a> {
    error: Option<&'a str>,
    error_code: Option<&'a str>,
    index: Option<&'a str>,
    total: Option<&'a str>,
}

impl<'a> ReplyHeaders<'a> {
    pub(super) fn of(headers: Option<&'a HeaderMap>) -> Self {
        let mut found = ReplyHeaders::default();
        let Some(headers) = headers else {
            return found;
        };
        for (name, values) in headers.iter() {
            let slot = match AsRef::<str>::as_ref(name) {
                SERVICE_ERROR => &mut found.error,
                SERVICE_ERROR_CODE => &mut found.error_code,
                REPLY_STREAM_INDEX => &mut found.index,
                REPLY_STREAM_TOTAL => &mut found.total,
                _ => continue,
            };
            *slot = values.first().map(|v| v.as_str());
        }
        found
    }

    pub(super) fn is_error_reply(&self) -> bool {
        self.error_code.is_some() || self.error.is_some()
    }

    /// The end marker of a reply stream with zero replies: `Reply-Stream-Total: 0` (on an
    /// empty message that is no error reply).
    pub(super) fn is_empty_stream_marker(&self) -> bool {
        !self.is_error_reply() && self.total.is_some_and(|t| t.trim() == "0")
    }
}

/// Reads a reply: an error reply becomes `Remote`, the end marker of an empty reply stream
/// `EmptyStream`, otherwise the event is decoded. Returns the stream position (`index`,
/// `total`) when the reply is part of a reply stream.
pub(crate) fn interpret_reply(
    headers: Option<&HeaderMap>,
    payload: &Bytes,
) -> Result<(ReceivedEvent, Option<(usize, usize)>), RequestError> {
    let found = ReplyHeaders::of(headers);
    if found.is_empty_stream_marker() {
        return Err(Error::with_detail(
            RequestErrorKind::EmptyStream,
            "the replier answered with zero replies; read this op with request_stream",
        ));
    }
    if found.is_error_reply() {
        let text = found.error.unwrap_or("remote error");
        let code = found
            .error_code
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(500);
        return Err(RemoteError::new(code, text).into_request_error());
    }
    let event =
        codec::decode(headers, payload).map_err(|e| e.map_kind(|_| RequestErrorKind::Decode))?;
    let position = match (
        found.index.and_then(|v| v.trim().parse().ok()),
        found.total.and_then(|v| v.trim().parse().ok()),
    ) {
        (Some(index), Some(total)) => Some((index, total)),
        _ => None,
    };
    Ok((event, position))
}
