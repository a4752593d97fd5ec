//! Answering a query: the [`ReplyWriter`] a handler replies through (one reply, a
//! [`ReplyStreamWriter`], or an error reply) and the backend's [`ReplyTarget`] it sends to.

use std::future::Future;

use futures::future::{self, Either, TryFutureExt};
use std::sync::{Arc, Mutex};

use async_nats::Subject;
use async_trait::async_trait;
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use serde::Serialize;

use crate::codec::{self, ContentMode, HeaderMap};
use crate::error::{BoxError, Error, ReplyError, ReplyErrorKind};
use crate::event::{new_event_with_tid, populate_source, EventExt, TransactionId};
use crate::headers::{
    text_value, REPLY_STREAM_INDEX, REPLY_STREAM_TOTAL, SERVICE_ERROR, SERVICE_ERROR_CODE,
};
use crate::telemetry::{self};

use super::MAX_BUFFERED_REPLIES;

/// Where a backend sends replies to one request.
#[async_trait]
pub(crate) trait ReplyTarget: Send + Sync {
    async fn send(&self, headers: HeaderMap, payload: Bytes) -> Result<(), BoxError>;

    /// The largest message (headers and payload) this target accepts; 0 when unknown.
    fn max_payload(&self) -> usize {
        0
    }
}

/// The size of a message's headers on the wire (`NATS/1.0\r\n`, `name: value\r\n` each,
/// `\r\n`), as the server counts it against `max_payload`.
pub(crate) fn header_size(headers: &HeaderMap) -> usize {
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

struct ReplyState {
    sent: bool,
    /// The handler asked for a reply stream ([`ReplyWriter::stream`]): an empty one is sent
    /// as the end marker (zero replies is an answer).
    streaming: bool,
    /// The status of what was sent (200, or an error reply's code); meaningful once `sent`.
    code: u16,
    buffered: Vec<Event>,
}

/// One reply, encoded, with its `reply` span.
struct EncodedReply {
    headers: HeaderMap,
    payload: Bytes,
    span: tracing::Span,
}

/// Why [`ReplyWriter::reply`] sends no reply of its own.
enum Unsent {
    Error(ReplyError),
    /// Answered with a 500 instead: (size, max).
    Oversized(usize, usize),
}

struct ReplyInner {
    target: Arc<dyn ReplyTarget>,
    op: Subject,
    request_tid: Option<TransactionId>,
    mode: ContentMode,
    /// Shared with the listener: a copy per request would cost an allocation.
    source: Arc<str>,
    state: Mutex<ReplyState>,
}

/// Answers one query: one reply ([`reply`](Self::reply)), a stream of replies
/// ([`stream`](Self::stream)), or an error ([`error`](Self::error)).
///
/// A reply without a transaction id gets the request's; a reply whose source is empty or
/// `AUTO_POPULATE` gets the listener's client id. Replies go in the request's content mode.
///
/// # Examples
///
/// ```
/// # async fn demo(reply: ce_messaging::query::ReplyWriter) -> Result<(), ce_messaging::error::ReplyError> {
/// let stream = reply.stream();
/// for n in 0..3 {
///     stream.push_data("org.example.count", &n)?;
/// }
/// stream.finish().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ReplyWriter {
    inner: Arc<ReplyInner>,
}

impl std::fmt::Debug for ReplyWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyWriter")
            .field("op", &self.inner.op.as_str())
            .field("transaction_id", &self.inner.request_tid)
            .finish()
    }
}

impl ReplyWriter {
    pub(crate) fn new(
        target: Arc<dyn ReplyTarget>,
        op: Subject,
        request_tid: Option<TransactionId>,
        mode: ContentMode,
        source: Arc<str>,
    ) -> Self {
        ReplyWriter {
            inner: Arc::new(ReplyInner {
                target,
                op,
                request_tid,
                mode,
                source,
                state: Mutex::new(ReplyState {
                    sent: false,
                    streaming: false,
                    code: 200,
                    buffered: Vec::new(),
                }),
            }),
        }
    }

    /// The op (request type) being answered.
    pub fn op(&self) -> &str {
        &self.inner.op
    }

    /// The request's transaction id.
    pub fn transaction_id(&self) -> Option<&TransactionId> {
        self.inner.request_tid.as_ref()
    }

    fn mark_sent(&self, code: u16) -> Result<(), ReplyError> {
        let mut state = self
            .inner
            .state
            .lock()
            .map_err(|_| Error::new(ReplyErrorKind::AlreadyReplied))?;
        if state.sent {
            return Err(Error::new(ReplyErrorKind::AlreadyReplied));
        }
        state.sent = true;
        state.code = code;
        Ok(())
    }

    /// The status of what was sent: 200, or the error reply's code.
    pub(super) fn sent_code(&self) -> u16 {
        self.inner.state.lock().map(|s| s.code).unwrap_or(200)
    }

    /// Whether a reply (or error reply) has been sent.
    pub fn is_sent(&self) -> bool {
        self.inner.state.lock().map(|s| s.sent).unwrap_or(true)
    }

    fn prepare(&self, event: &mut Event) -> Option<telemetry::TraceContext> {
        populate_source(event, &self.inner.source);
        if !crate::event::has_transaction_id(event) {
            if let Some(tid) = &self.inner.request_tid {
                event.set_transaction_id(tid);
            }
        }
        // The reply continues the trace of the request it answers.
        telemetry::outgoing(event, false)
    }

    /// Encodes one reply (in its `reply` span), with its stream position when it is part of
    /// a reply stream. The event is borrowed: passed by value down the reply's calls, its 300
    /// bytes were copied at each.
    fn encode_reply(
        &self,
        event: &mut Event,
        position: Option<(usize, usize)>,
    ) -> Result<EncodedReply, ReplyError> {
        let trace = self.prepare(event);
        let span = tracing::info_span!(
            "reply",
            "event.id" = event.id(),
            "event.type" = event.ty(),
            code = 200u16,
            index = position.map(|(index, _)| index),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
        );
        telemetry::record_trace(&span, trace.as_ref());
        let _entered = span.enter();
        let encoded = codec::encode(event, self.inner.mode)
            .map_err(|e| e.map_kind(|_| ReplyErrorKind::Encode))?;
        let mut headers = HeaderMap::from(encoded.headers);
        if let Some((index, total)) = position {
            headers.insert(REPLY_STREAM_INDEX, index.to_string().as_str());
            headers.insert(REPLY_STREAM_TOTAL, total.to_string().as_str());
        }
        drop(_entered);
        Ok(EncodedReply {
            headers,
            payload: encoded.payload,
            span,
        })
    }

    /// `Some((size, max))` when `reply` is larger than the target accepts.
    fn oversized(&self, reply: &EncodedReply) -> Option<(usize, usize)> {
        let max = self.inner.target.max_payload();
        let size = header_size(&reply.headers) + reply.payload.len();
        (max > 0 && size > max).then_some((size, max))
    }

    /// The send of an encoded reply in its span (the target's future is made at once).
    fn send_encoded(
        &self,
        reply: EncodedReply,
    ) -> impl Future<Output = Result<(), ReplyError>> + Send + '_ {
        tracing::Instrument::instrument(
            self.inner.target.send(reply.headers, reply.payload),
            reply.span,
        )
        .map_err(|e| Error::with_source(ReplyErrorKind::Send, e))
    }

    /// Answers a reply that is too large with a 500 instead (already marked sent), and gives
    /// the handler its `TooLarge` error.
    async fn refuse_oversized(&self, size: usize, max: usize) -> ReplyError {
        let text = format!("reply too large: {size} bytes, max_payload {max}");
        tracing::warn!(op = %self.inner.op, size, max, "reply too large; answered with a 500");
        if let Err(e) = self.send_error_reply(500, &text).await {
            tracing::warn!(error = %e, "error reply not sent");
        }
        Error::with_detail(ReplyErrorKind::TooLarge, text)
    }

    /// Sends the one reply.
    ///
    /// The reply is encoded and its size checked before it counts as sent: a reply larger
    /// than the server's `max_payload` is answered with a 500 error reply (`reply too large:
    /// N bytes, max_payload M`) at once, and this returns `TooLarge`.
    ///
    /// The event is encoded when this is called, and the future returned only sends it: the
    /// future stays small (it is part of every handler's future, which is boxed).
    ///
    /// # Errors
    ///
    /// `AlreadyReplied` if a reply was sent before; `Encode` (nothing was sent, the handler
    /// may still answer); `TooLarge`; `Send`.
    pub fn reply(
        &self,
        mut event: Event,
    ) -> impl Future<Output = Result<(), ReplyError>> + Send + '_ {
        self.reply_mut(&mut event)
    }

    /// [`reply`](Self::reply) of a borrowed event (dropped by the caller).
    fn reply_mut(
        &self,
        event: &mut Event,
    ) -> impl Future<Output = Result<(), ReplyError>> + Send + '_ {
        match self.ready_to_send(event) {
            Ok(encoded) => Either::Left(self.send_encoded(encoded)),
            Err(Unsent::Error(err)) => Either::Right(Either::Left(future::ready(Err(err)))),
            // Rare: boxed, so that its state does not make every reply's future larger.
            Err(Unsent::Oversized(size, max)) => {
                Either::Right(Either::Right(Box::pin(async move {
                    Err(self.refuse_oversized(size, max).await)
                })))
            }
        }
    }

    /// Encodes the one reply and marks it sent, unless it cannot go.
    fn ready_to_send(&self, event: &mut Event) -> Result<EncodedReply, Unsent> {
        if self.is_sent() {
            return Err(Unsent::Error(Error::new(ReplyErrorKind::AlreadyReplied)));
        }
        let encoded = self.encode_reply(event, None).map_err(Unsent::Error)?;
        let oversized = self.oversized(&encoded);
        self.mark_sent(if oversized.is_some() { 500 } else { 200 })
            .map_err(Unsent::Error)?;
        match oversized {
            Some((size, max)) => Err(Unsent::Oversized(size, max)),
            None => Ok(encoded),
        }
    }

    /// Sends the one reply, an event of `event_type` with JSON `data`. The data is
    /// serialized when this is called (so it need be neither `Send` nor `Sync`).
    ///
    /// # Errors
    ///
    /// As [`reply`](Self::reply), and `Encode` when the data does not serialize.
    pub fn reply_data<T: Serialize + ?Sized>(
        &self,
        event_type: &str,
        data: &T,
    ) -> impl Future<Output = Result<(), ReplyError>> + Send + '_ {
        match self.new_reply_event(event_type, data) {
            Ok(mut event) => Either::Left(self.reply_mut(&mut event)),
            Err(err) => Either::Right(future::ready(Err(err))),
        }
    }

    pub(super) fn new_reply_event<T: Serialize + ?Sized>(
        &self,
        event_type: &str,
        data: &T,
    ) -> Result<Event, ReplyError> {
        let tid = self
            .inner
            .request_tid
            .clone()
            .unwrap_or_else(TransactionId::generate);
        new_event_with_tid(event_type, &*self.inner.source, data, tid)
            .map_err(|e| e.map_kind(|_| ReplyErrorKind::Encode))
    }

    /// Answers with an error: `Nats-Service-Error: <text>`, `Nats-Service-Error-Code: <code>`,
    /// and an event of type `<op>.error` with data `{"error": text, "code": code}`.
    ///
    /// The error reply is encoded (and counts as sent) when this is called; the future
    /// returned only sends it.
    ///
    /// # Errors
    ///
    /// `AlreadyReplied`; `Send`.
    pub fn error(
        &self,
        code: u16,
        text: &str,
    ) -> impl Future<Output = Result<(), ReplyError>> + Send + '_ {
        match self.mark_sent(code) {
            Ok(()) => Either::Left(self.send_error_reply(code, text)),
            Err(err) => Either::Right(future::ready(Err(err))),
        }
    }

    fn send_error_reply(
        &self,
        code: u16,
        text: &str,
    ) -> impl Future<Output = Result<(), ReplyError>> + Send + '_ {
        send_error_reply(
            self.inner.target.as_ref(),
            self.inner.op.as_str(),
            self.inner.request_tid.clone(),
            self.inner.mode,
            &self.inner.source,
            code,
            text,
        )
    }

    /// A writer for a stream of replies: they are buffered and sent by
    /// [`finish`](ReplyStreamWriter::finish) with `Reply-Stream-Index/Total` (or when the
    /// handler returns, if it did not call `finish`). A stream with no reply is an answer
    /// too: it is sent as the end marker alone (an empty message with `Reply-Stream-Total:
    /// 0`), and the requester's stream ends without an item.
    pub fn stream(&self) -> ReplyStreamWriter {
        if let Ok(mut state) = self.inner.state.lock() {
            state.streaming = true;
        }
        ReplyStreamWriter {
            writer: self.clone(),
        }
    }

    /// Sends what a streaming handler buffered, and gives the status of what was sent (by
    /// this or before: 200 or an error reply's code), `None` when nothing was: one look at
    /// the state for a handler that replied once. The stream's sending is boxed: most
    /// handlers send one reply, and its state would otherwise make every request's serving
    /// future (moved as a whole) several times larger.
    pub(crate) async fn flush(&self) -> Result<Option<u16>, ReplyError> {
        let (pending, sent) = self
            .inner
            .state
            .lock()
            .map(|state| {
                let pending = !state.sent && (state.streaming || !state.buffered.is_empty());
                (pending, state.sent.then_some(state.code))
            })
            // As `is_sent` and `sent_code` read a poisoned state: sent, 200.
            .unwrap_or((false, Some(200)));
        if !pending {
            return Ok(sent);
        }
        Box::pin(self.flush_buffered()).await?;
        Ok(self.is_sent().then(|| self.sent_code()))
    }

    async fn flush_buffered(&self) -> Result<bool, ReplyError> {
        let buffered = {
            let mut state = self
                .inner
                .state
                .lock()
                .map_err(|_| Error::new(ReplyErrorKind::AlreadyReplied))?;
            if state.sent || (state.buffered.is_empty() && !state.streaming) {
                return Ok(false);
            }
            state.sent = true;
            std::mem::take(&mut state.buffered)
        };
        if buffered.is_empty() {
            // Zero replies: the end marker alone.
            let mut headers = HeaderMap::new();
            headers.insert(REPLY_STREAM_TOTAL, "0");
            let span = tracing::info_span!("reply", "event.type" = %self.inner.op, code = 200u16);
            tracing::Instrument::instrument(self.inner.target.send(headers, Bytes::new()), span)
                .await
                .map_err(|e| Error::with_source(ReplyErrorKind::Send, e))?;
            return Ok(true);
        }
        // Every reply is encoded and measured before the first is sent: a stream is answered
        // whole, or with one error reply.
        let total = buffered.len();
        let mut encoded = Vec::with_capacity(total);
        for (index, mut event) in buffered.into_iter().enumerate() {
            // The event is dropped here, not held across the awaits below.
            let reply = self.encode_reply(&mut event, Some((index, total)));
            drop(event);
            let reply = match reply {
                Ok(reply) => reply,
                Err(err) => {
                    self.set_code(500);
                    let text = format!("reply {index} of {total} could not be encoded: {err}");
                    if let Err(e) = self.send_error_reply(500, &text).await {
                        tracing::warn!(error = %e, "error reply not sent");
                    }
                    return Err(err);
                }
            };
            if let Some((size, max)) = self.oversized(&reply) {
                self.set_code(500);
                return Err(self.refuse_oversized(size, max).await);
            }
            encoded.push(reply);
        }
        for reply in encoded {
            self.send_encoded(reply).await?;
        }
        Ok(true)
    }

    fn set_code(&self, code: u16) {
        if let Ok(mut state) = self.inner.state.lock() {
            state.code = code;
        }
    }
}

/// Buffers the replies of one streamed answer; see [`ReplyWriter::stream`].
///
/// # Examples
///
/// ```
/// # async fn demo(reply: ce_messaging::query::ReplyWriter) -> Result<(), ce_messaging::error::ReplyError> {
/// let stream = reply.stream();
/// stream.push_data("org.example.row", &"a")?;
/// stream.push_data("org.example.row", &"b")?;
/// stream.finish().await?; // two replies: index 0 and 1, total 2
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ReplyStreamWriter {
    writer: ReplyWriter,
}

impl ReplyStreamWriter {
    /// Adds a reply to the stream.
    ///
    /// # Errors
    ///
    /// `AlreadyReplied` once the stream was sent; `TooMany` past [`MAX_BUFFERED_REPLIES`].
    pub fn push(&self, event: Event) -> Result<(), ReplyError> {
        let mut state = self
            .writer
            .inner
            .state
            .lock()
            .map_err(|_| Error::new(ReplyErrorKind::AlreadyReplied))?;
        if state.sent {
            return Err(Error::new(ReplyErrorKind::AlreadyReplied));
        }
        if state.buffered.len() >= MAX_BUFFERED_REPLIES {
            return Err(Error::with_detail(
                ReplyErrorKind::TooMany,
                format!("at most {MAX_BUFFERED_REPLIES} replies per stream"),
            ));
        }
        state.buffered.push(event);
        Ok(())
    }

    /// Adds a reply of `event_type` with JSON `data`.
    ///
    /// # Errors
    ///
    /// As [`push`](Self::push), and `Encode` when the data does not serialize.
    pub fn push_data<T: Serialize + ?Sized>(
        &self,
        event_type: &str,
        data: &T,
    ) -> Result<(), ReplyError> {
        let event = self.writer.new_reply_event(event_type, data)?;
        self.push(event)
    }

    /// Sends the buffered replies, each with `Reply-Stream-Index` and `Reply-Stream-Total`;
    /// with none, the end marker alone (`Reply-Stream-Total: 0`, empty payload): the
    /// requester's stream ends without an item.
    ///
    /// # Errors
    ///
    /// `AlreadyReplied` if something was sent before; `Send`; `Encode`.
    pub async fn finish(self) -> Result<(), ReplyError> {
        if self.writer.flush_buffered().await? {
            Ok(())
        } else {
            Err(Error::with_detail(
                ReplyErrorKind::AlreadyReplied,
                "the reply was already sent",
            ))
        }
    }
}

pub(super) fn send_error_reply<'a>(
    target: &'a dyn ReplyTarget,
    op: &str,
    tid: Option<TransactionId>,
    mode: ContentMode,
    source: &str,
    code: u16,
    text: &str,
) -> impl Future<Output = Result<(), ReplyError>> + Send + 'a {
    let data = serde_json::json!({ "error": text, "code": code });
    let error_type = format!("{op}.error");
    let source = if source.is_empty() {
        "ce-messaging"
    } else {
        source
    };
    let event = new_event_with_tid(
        &error_type,
        source,
        &data,
        tid.unwrap_or_else(TransactionId::generate),
    );
    // An error reply continues the request's trace like any other reply.
    let (mut headers, payload) = match event.map(|mut e| {
        telemetry::outgoing(&mut e, false);
        codec::encode(&e, mode)
    }) {
        Ok(Ok(encoded)) => (HeaderMap::from(encoded.headers), encoded.payload),
        _ => (HeaderMap::new(), Bytes::new()),
    };
    headers.insert(SERVICE_ERROR, text_value(text));
    headers.insert(SERVICE_ERROR_CODE, code.to_string().as_str());
    let span = tracing::info_span!("reply", "event.type" = op, code);
    tracing::Instrument::instrument(target.send(headers, payload), span)
        .map_err(|e| Error::with_source(ReplyErrorKind::Send, e))
}
