//! Reading and replaying dead letters: the events that a listener could not handle, stored in
//! the dead-letter stream (`NATS_JS_DLQ_STREAM`) with their original headers and payload plus
//! the `Dead-Letter-*` headers of the wire contract.
//!
//! [`JetStreamEvents::dead_letters`] lists them (oldest first);
//! [`JetStreamEvents::replay_dead_letter`] republishes one to its original subject with
//! `Nats-Msg-Id: <original msg id>.replay.<dead-letter seq>` and deletes it from the dead-letter
//! stream once the republish is acknowledged. Replaying is safe to repeat: a replay that was
//! interrupted after the republish is reported as a duplicate by the server (within the
//! duplicate window) and only then deleted, so nothing is lost or stored twice.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
//! for dead in events.dead_letters(10).await? {
//!     println!("#{} {} ({}): {}", dead.sequence, dead.original_subject, dead.reason, dead.error);
//!     let replayed = events.replay_dead_letter(dead.sequence).await?;
//!     println!("replayed as #{} in {}", replayed.ack.sequence, replayed.ack.stream);
//! }
//! # Ok(()) }
//! ```

use crate::codec::ReceivedEvent;
use std::fmt;

use async_nats::jetstream::context::PublishErrorKind as JsPublishErrorKind;
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::stream::{DeleteMessageErrorKind, RawMessageErrorKind};
use async_nats::jetstream::ErrorCode;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::codec::{self, HeaderMap};
use crate::error::{DecodeError, Error};
use crate::events::{
    is_dropped_from_dead_letters, DeadLetterReason, PublishAck, DEAD_LETTER_PAYLOAD_OMITTED,
};
use crate::headers::{
    DEAD_LETTER_DELIVERIES, DEAD_LETTER_ERROR, DEAD_LETTER_PAYLOAD, DEAD_LETTER_REASON,
    DEAD_LETTER_SIZE, DEAD_LETTER_STREAM, DEAD_LETTER_STREAM_SEQ, DEAD_LETTER_SUBJECT, NATS_MSG_ID,
};

use super::consume::original_msg_id;
use super::JetStreamEvents;

/// How many dead letters [`JetStreamEvents::dead_letters`] reads with one request each at most
/// before giving the page back (callers page with [`DeadLetterQuery::from_sequence`]).
pub const MAX_DEAD_LETTER_PAGE: usize = 10_000;

/// What went wrong reading or replaying dead letters.
///
/// # Examples
///
/// ```
/// use ce_messaging::error::Error;
/// use ce_messaging::jetstream::dead_letters::DeadLetterErrorKind;
/// let err = Error::new(DeadLetterErrorKind::NotFound);
/// assert_eq!(err.to_string(), "dead letter not found");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterErrorKind {
    /// The dead-letter stream does not exist (create it with `init_stream`).
    StreamNotFound,
    /// No dead letter with that sequence (never stored, or already replayed).
    NotFound,
    /// The message at that sequence is not a dead letter (no `Dead-Letter-Subject`).
    NotADeadLetter,
    /// The republish was refused (e.g. no stream holds the original subject any more).
    Publish,
    /// The republish would have been stored in a stream other than the dead letter's original
    /// events stream (another stream now holds the subject): refused by the server
    /// (`Nats-Expected-Stream`), nothing stored, the dead letter kept. Replay to that stream
    /// only when told to ([`ReplayOptions::to_stream`], `cemsg deadletter replay --to-stream`).
    WrongStream,
    /// A reference dead letter (its original was too large to be copied) whose original is no
    /// longer in the events stream (removed by the stream's limits, deleted, or the sequence
    /// now holds another message): there is nothing to replay; the dead letter is kept.
    OriginalGone,
    /// The republish or a request to the server got no answer in time.
    TimedOut,
    /// The republish succeeded but the dead letter could not be deleted; replaying it again is
    /// safe (the server reports the republish as a duplicate within the duplicate window).
    Delete,
    /// Any other failure; see the source.
    Other,
}

impl fmt::Display for DeadLetterErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeadLetterErrorKind::StreamNotFound => "dead-letter stream not found",
            DeadLetterErrorKind::NotFound => "dead letter not found",
            DeadLetterErrorKind::NotADeadLetter => "not a dead letter",
            DeadLetterErrorKind::Publish => "replay publish failed",
            DeadLetterErrorKind::WrongStream => "replay refused: another stream holds the subject",
            DeadLetterErrorKind::OriginalGone => {
                "the original of this reference dead letter is gone"
            }
            DeadLetterErrorKind::TimedOut => "timed out",
            DeadLetterErrorKind::Delete => "dead letter replayed but not deleted",
            DeadLetterErrorKind::Other => "dead-letter operation failed",
        })
    }
}

/// Error reading or replaying dead letters.
pub type DeadLetterError = Error<DeadLetterErrorKind>;

/// One dead-lettered event as stored in the dead-letter stream.
///
/// `headers` and `payload` are the original message's, as the listener received it, without
/// the server's `Nats-*` directives: the `Dead-Letter-*` headers and the dead letter's own
/// `Nats-Msg-Id` are taken out (they are in the fields). A **reference** dead letter
/// ([`is_reference`](Self::is_reference), `Dead-Letter-Payload: omitted`) holds neither: its
/// original was too large to be copied and is read from the events stream by sequence
/// ([`JetStreamEvents::dead_letter_original`], which replay uses). `Debug` shows the payload's
/// size, not its content.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
/// use cloudevents::AttributesReader;
/// let dead = events.dead_letter(1).await?;
/// if let Ok(event) = dead.event() {
///     println!("{} {} failed {} times: {}", event.id(), event.ty(), dead.deliveries.unwrap_or(0), dead.error);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its sequence in the dead-letter stream (what replay takes).
    pub sequence: u64,
    /// The subject it is stored under: `deadletter.<events stream>.<durable>`.
    pub dead_letter_subject: String,
    /// The durable consumer (service) that dead-lettered it: the last token of the subject.
    pub durable: String,
    /// `Dead-Letter-Reason`: `decode`, `rejected` or `max-deliveries` (see
    /// [`reason_kind`](Self::reason_kind)).
    pub reason: String,
    /// `Dead-Letter-Error`: the error that dead-lettered it.
    pub error: String,
    /// `Dead-Letter-Subject`: the subject it was published on, where a replay sends it.
    pub original_subject: String,
    /// `Dead-Letter-Stream-Seq`: its sequence in the events stream.
    pub original_sequence: Option<u64>,
    /// `Dead-Letter-Stream`: the events stream it was stored in (for dead letters stored
    /// before that header existed: the events stream named in the dead-letter subject). A
    /// replay must land there.
    pub original_stream: String,
    /// `Dead-Letter-Size` of a reference dead letter: the original's size in bytes.
    pub original_size: Option<u64>,
    /// `Dead-Letter-Deliveries`: how many times it had been delivered.
    pub deliveries: Option<u64>,
    /// The original `Nats-Msg-Id` (the event id for events published by this library).
    pub original_msg_id: String,
    /// When the dead letter was stored.
    pub stored_at: DateTime<Utc>,
    /// The original headers (none in a reference dead letter).
    pub headers: HeaderMap,
    /// The original payload (empty in a reference dead letter).
    pub payload: Bytes,
    reference: bool,
}

impl fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("sequence", &self.sequence)
            .field("durable", &self.durable)
            .field("reason", &self.reason)
            .field("error", &self.error)
            .field("original_subject", &self.original_subject)
            .field("original_sequence", &self.original_sequence)
            .field("original_stream", &self.original_stream)
            .field("reference", &self.reference)
            .field("deliveries", &self.deliveries)
            .field("original_msg_id", &self.original_msg_id)
            .field("stored_at", &self.stored_at)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl DeadLetter {
    /// The reason as the enum of the contract, `None` for a value this library does not know.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn demo(dead: ce_messaging::jetstream::dead_letters::DeadLetter) {
    /// use ce_messaging::events::DeadLetterReason;
    /// if dead.reason_kind() == Some(DeadLetterReason::Decode) {
    ///     println!("not a CloudEvent: {}", dead.error);
    /// }
    /// # }
    /// ```
    pub fn reason_kind(&self) -> Option<DeadLetterReason> {
        match self.reason.as_str() {
            "decode" => Some(DeadLetterReason::Decode),
            "rejected" => Some(DeadLetterReason::Rejected),
            "max-deliveries" => Some(DeadLetterReason::MaxDeliveries),
            _ => None,
        }
    }

    /// Whether this is a reference dead letter (`Dead-Letter-Payload: omitted`): the original
    /// was too large to be copied; [`JetStreamEvents::dead_letter_original`] reads it from the
    /// events stream while the stream still holds it.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn demo(dead: ce_messaging::jetstream::dead_letters::DeadLetter) {
    /// if dead.is_reference() {
    ///     println!("original: {} #{:?}", dead.original_stream, dead.original_sequence);
    /// }
    /// # }
    /// ```
    pub fn is_reference(&self) -> bool {
        self.reference
    }

    /// The original event, decoded from the original headers and payload (fails for dead
    /// letters of reason `decode`, and for reference dead letters, which hold no payload).
    ///
    /// # Errors
    ///
    /// The [`codec::decode`] error when the original message is not a CloudEvent.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn demo(dead: ce_messaging::jetstream::dead_letters::DeadLetter) {
    /// match dead.event() {
    ///     Ok(event) => println!("{event}"),
    ///     Err(err) => println!("undecodable: {err}"),
    /// }
    /// # }
    /// ```
    pub fn event(&self) -> Result<ReceivedEvent, DecodeError> {
        codec::decode(Some(&self.headers), &self.payload)
    }

    /// The `Nats-Msg-Id` a replay of this dead letter is published with:
    /// `<original msg id>.replay.<dead-letter sequence>`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn demo(dead: ce_messaging::jetstream::dead_letters::DeadLetter) {
    /// assert!(dead.replay_msg_id().ends_with(&format!(".replay.{}", dead.sequence)));
    /// # }
    /// ```
    pub fn replay_msg_id(&self) -> String {
        format!("{}.replay.{}", self.original_msg_id, self.sequence)
    }

    fn from_stored(message: StreamMessage) -> Result<DeadLetter, DeadLetterError> {
        let nanos = message.time.unix_timestamp_nanos();
        let stored_at = i64::try_from(nanos)
            .map(DateTime::from_timestamp_nanos)
            .unwrap_or_default();
        DeadLetter::from_parts(
            message.sequence,
            message.subject.to_string(),
            &message.headers,
            message.payload,
            stored_at,
        )
    }

    /// Reads the `Dead-Letter-*` headers and separates them from the original headers.
    fn from_parts(
        sequence: u64,
        dead_letter_subject: String,
        stored: &HeaderMap,
        payload: Bytes,
        stored_at: DateTime<Utc>,
    ) -> Result<DeadLetter, DeadLetterError> {
        let text = |name: &str| stored.get(name).map(|v| v.as_str().to_owned());
        let Some(original_subject) = text(DEAD_LETTER_SUBJECT) else {
            return Err(Error::with_detail(
                DeadLetterErrorKind::NotADeadLetter,
                format!("message #{sequence} has no {DEAD_LETTER_SUBJECT} header"),
            ));
        };
        let number = |name: &str| text(name).and_then(|v| v.trim().parse::<u64>().ok());
        let original_sequence = number(DEAD_LETTER_STREAM_SEQ);
        // deadletter.<events stream>.<durable>
        let mut tokens = dead_letter_subject.rsplitn(3, '.');
        let durable = tokens.next().unwrap_or_default().to_owned();
        let events_stream = tokens.next().unwrap_or_default().to_owned();
        let original_msg_id = match text(NATS_MSG_ID) {
            Some(id) if !id.is_empty() => original_msg_id(&id).to_owned(),
            // Not stored by this library: name it after where it came from.
            _ => match original_sequence {
                Some(seq) => format!("{events_stream}.{seq}"),
                None => format!("dead-letter-{sequence}"),
            },
        };
        let headers = original_headers(stored);
        let reference = text(DEAD_LETTER_PAYLOAD).as_deref() == Some(DEAD_LETTER_PAYLOAD_OMITTED);
        let original_stream = text(DEAD_LETTER_STREAM)
            .filter(|s| !s.is_empty())
            .unwrap_or(events_stream);
        Ok(DeadLetter {
            sequence,
            dead_letter_subject,
            durable,
            reason: text(DEAD_LETTER_REASON).unwrap_or_default(),
            error: text(DEAD_LETTER_ERROR).unwrap_or_default(),
            original_subject,
            original_sequence,
            original_stream,
            original_size: number(DEAD_LETTER_SIZE),
            deliveries: number(DEAD_LETTER_DELIVERIES),
            original_msg_id,
            stored_at,
            headers,
            payload,
            reference,
        })
    }
}

/// The headers of a stored message without what a replay must not send: the server's
/// directives and annotations (`Nats-*`, the message id included: replay sets its own) and the
/// `Dead-Letter-*` headers.
fn original_headers(stored: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in stored.iter() {
        if is_dropped_from_dead_letters(name.as_ref()) {
            continue;
        }
        for value in values {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

/// How [`JetStreamEvents::replay_dead_letter_with`] replays.
///
/// # Examples
///
/// ```
/// use ce_messaging::jetstream::dead_letters::ReplayOptions;
/// let options = ReplayOptions { to_stream: Some("ORDERS_V2".into()) };
/// assert_eq!(options.to_stream.as_deref(), Some("ORDERS_V2"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayOptions {
    /// The stream the republish must land in; `None`: the dead letter's original events
    /// stream ([`DeadLetter::original_stream`]). A republish that another stream would store
    /// is refused by the server ([`DeadLetterErrorKind::WrongStream`]).
    pub to_stream: Option<String>,
}

/// Which dead letters [`JetStreamEvents::list_dead_letters`] returns: those of this
/// connection's events stream (of one durable, if given) with a sequence in
/// `from_sequence..=up_to_sequence`, oldest first, at most `limit` (capped at
/// [`MAX_DEAD_LETTER_PAGE`]).
///
/// # Examples
///
/// ```
/// use ce_messaging::jetstream::dead_letters::DeadLetterQuery;
/// let query = DeadLetterQuery { durable: Some("billing".into()), limit: 20, ..Default::default() };
/// assert_eq!(query.from_sequence, 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterQuery {
    /// Only the dead letters of this durable consumer; `None`: of every durable.
    pub durable: Option<String>,
    /// The first dead-letter sequence to look at (1-based).
    pub from_sequence: u64,
    /// The last dead-letter sequence to look at; `None`: no bound.
    pub up_to_sequence: Option<u64>,
    /// At most this many.
    pub limit: usize,
}

impl Default for DeadLetterQuery {
    fn default() -> Self {
        DeadLetterQuery {
            durable: None,
            from_sequence: 1,
            up_to_sequence: None,
            limit: 100,
        }
    }
}

/// What a replay did.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
/// let outcome = events.replay_dead_letter(3).await?;
/// if outcome.ack.duplicate {
///     println!("already republished earlier; dead letter removed now");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayOutcome {
    /// The dead letter's sequence in the dead-letter stream.
    pub dead_letter_sequence: u64,
    /// The subject it was republished to (its original subject).
    pub subject: String,
    /// The `Nats-Msg-Id` of the republish.
    pub msg_id: String,
    /// The server's ack of the republish; `duplicate` means an earlier replay of the same dead
    /// letter had already stored it (within the duplicate window).
    pub ack: PublishAck,
    /// Whether this call deleted the dead letter (false: it was already gone, e.g. replayed by
    /// someone else at the same time).
    pub deleted: bool,
}

impl JetStreamEvents {
    /// The oldest `limit` dead letters of this connection's events stream (all durables).
    ///
    /// # Errors
    ///
    /// [`DeadLetterErrorKind::StreamNotFound`] when the dead-letter stream does not exist,
    /// `TimedOut` / `Other` when the server does not answer.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
    /// let dead = events.dead_letters(50).await?;
    /// println!("{} dead letters", dead.len());
    /// # Ok(()) }
    /// ```
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, DeadLetterError> {
        self.list_dead_letters(&DeadLetterQuery {
            limit,
            ..Default::default()
        })
        .await
    }

    /// The dead letters that match `query`, oldest first.
    ///
    /// # Errors
    ///
    /// As [`dead_letters`](Self::dead_letters).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
    /// use ce_messaging::jetstream::dead_letters::DeadLetterQuery;
    /// let mut query = DeadLetterQuery { durable: Some("billing".into()), ..Default::default() };
    /// loop {
    ///     let page = events.list_dead_letters(&query).await?;
    ///     let Some(last) = page.last() else { break };
    ///     query.from_sequence = last.sequence + 1;
    ///     for dead in &page {
    ///         println!("#{}: {}", dead.sequence, dead.error);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_dead_letters(
        &self,
        query: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let inner = self.inner();
        let config = &inner.config;
        let filter = match &query.durable {
            Some(durable) => format!("deadletter.{}.{durable}", config.js_stream),
            None => format!("deadletter.{}.>", config.js_stream),
        };
        let stream = self.dead_letter_stream().await?;
        let limit = query.limit.min(MAX_DEAD_LETTER_PAGE);
        let mut found = Vec::new();
        let mut next = query.from_sequence.max(1);
        while found.len() < limit && query.up_to_sequence.is_none_or(|last| next <= last) {
            let message = match stream.get_first_raw_message_by_subject(&filter, next).await {
                Ok(message) => message,
                Err(err) if matches!(err.kind(), RawMessageErrorKind::NoMessageFound) => break,
                Err(err) => return Err(raw_get_error(err, &config.js_dlq_stream)),
            };
            if query
                .up_to_sequence
                .is_some_and(|last| message.sequence > last)
            {
                break;
            }
            next = message.sequence + 1;
            match DeadLetter::from_stored(message) {
                Ok(dead) => found.push(dead),
                // Something else published under the dead-letter subjects: not ours to list.
                Err(err) => {
                    tracing::debug!(error = %err, "skipping a message in the dead-letter stream")
                }
            }
        }
        Ok(found)
    }

    /// The dead letter at `sequence` in the dead-letter stream.
    ///
    /// # Errors
    ///
    /// [`DeadLetterErrorKind::NotFound`] when there is none (never stored, or replayed),
    /// `NotADeadLetter`, `StreamNotFound`, `TimedOut`, `Other`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
    /// let dead = events.dead_letter(42).await?;
    /// println!("{dead:?}");
    /// # Ok(()) }
    /// ```
    pub async fn dead_letter(&self, sequence: u64) -> Result<DeadLetter, DeadLetterError> {
        let stream = self.dead_letter_stream().await?;
        let dlq = &self.inner().config.js_dlq_stream;
        let message = stream
            .get_raw_message(sequence)
            .await
            .map_err(|err| match err.kind() {
                RawMessageErrorKind::NoMessageFound => Error::with_detail(
                    DeadLetterErrorKind::NotFound,
                    format!("no dead letter #{sequence} in stream {dlq} (already replayed?)"),
                ),
                _ => raw_get_error(err, dlq),
            })?;
        DeadLetter::from_stored(message)
    }

    /// The sequence of the newest message in the dead-letter stream (0 when it never held
    /// one): a bound for replaying "everything there is now" while new dead letters arrive.
    ///
    /// # Errors
    ///
    /// `StreamNotFound`, `TimedOut`, `Other`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
    /// let last = events.last_dead_letter_sequence().await?;
    /// println!("dead letters up to #{last}");
    /// # Ok(()) }
    /// ```
    pub async fn last_dead_letter_sequence(&self) -> Result<u64, DeadLetterError> {
        let dlq = &self.inner().config.js_dlq_stream;
        let stream = self.dead_letter_stream().await?;
        let info = stream.get_info().await.map_err(|err| {
            use async_nats::jetstream::context::RequestErrorKind;
            let not_found = std::error::Error::source(&err)
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
                .is_some_and(|js| js.error_code() == ErrorCode::STREAM_NOT_FOUND);
            let kind = match err.kind() {
                _ if not_found => DeadLetterErrorKind::StreamNotFound,
                RequestErrorKind::TimedOut => DeadLetterErrorKind::TimedOut,
                _ => DeadLetterErrorKind::Other,
            };
            Error::with_source(kind, err).detail(format!("stream {dlq}"))
        })?;
        Ok(info.state.last_sequence)
    }

    /// The original headers and payload of `dead`: its own for a dead letter that holds
    /// them, read from the events stream by sequence for a reference dead letter
    /// ([`DeadLetter::is_reference`]). The server's directives (`Nats-*`) are left out.
    ///
    /// # Errors
    ///
    /// [`DeadLetterErrorKind::OriginalGone`] when the events stream no longer holds the
    /// original (removed by its limits or deleted, or the sequence now holds another message:
    /// the subject or message id differ); `TimedOut`, `Other`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
    /// let dead = events.dead_letter(3).await?;
    /// let (headers, payload) = events.dead_letter_original(&dead).await?;
    /// println!("{} header(s), {} bytes", headers.len(), payload.len());
    /// # Ok(()) }
    /// ```
    pub async fn dead_letter_original(
        &self,
        dead: &DeadLetter,
    ) -> Result<(HeaderMap, Bytes), DeadLetterError> {
        if !dead.reference {
            return Ok((dead.headers.clone(), dead.payload.clone()));
        }
        let gone = |why: String| {
            Error::with_detail(
                DeadLetterErrorKind::OriginalGone,
                format!(
                    "dead letter #{} is a reference to #{} in stream {}, {why}; the dead letter was kept",
                    dead.sequence,
                    dead.original_sequence.map_or("?".to_owned(), |s| s.to_string()),
                    dead.original_stream
                ),
            )
        };
        let Some(original_sequence) = dead.original_sequence else {
            return Err(gone("which has no sequence".into()));
        };
        let stream = self
            .inner()
            .js
            .get_stream_no_info(&dead.original_stream)
            .await
            .map_err(|err| {
                Error::with_source(DeadLetterErrorKind::Other, err)
                    .detail(format!("stream {}", dead.original_stream))
            })?;
        let message = match stream.get_raw_message(original_sequence).await {
            Ok(message) => message,
            Err(err) => match err.kind() {
                RawMessageErrorKind::NoMessageFound => {
                    return Err(gone("which the stream no longer holds".into()))
                }
                RawMessageErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    return Err(gone("a stream that no longer exists".into()))
                }
                _ => return Err(raw_get_error(err, &dead.original_stream)),
            },
        };
        if message.subject.as_str() != dead.original_subject {
            return Err(gone(format!(
                "which now holds a message on {} instead of {}",
                message.subject, dead.original_subject
            )));
        }
        let stored_id = message.headers.get(NATS_MSG_ID).map(|v| v.as_str());
        if let Some(stored_id) = stored_id.filter(|id| !id.is_empty()) {
            let expected = dead.original_msg_id.as_str();
            if stored_id.len() <= 256 && stored_id != expected {
                return Err(gone(format!(
                    "which now holds message {stored_id:?}, not {expected:?}"
                )));
            }
        }
        Ok((original_headers(&message.headers), message.payload))
    }

    /// Replays the dead letter at `sequence` into its original events stream (see
    /// [`replay_dead_letter_with`](Self::replay_dead_letter_with)).
    ///
    /// # Errors
    ///
    /// As [`replay_dead_letter_with`](Self::replay_dead_letter_with).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
    /// let outcome = events.replay_dead_letter(7).await?;
    /// println!("republished to {} as #{}", outcome.subject, outcome.ack.sequence);
    /// # Ok(()) }
    /// ```
    pub async fn replay_dead_letter(
        &self,
        sequence: u64,
    ) -> Result<ReplayOutcome, DeadLetterError> {
        self.replay_dead_letter_with(sequence, &ReplayOptions::default())
            .await
    }

    /// Replays the dead letter at `sequence`: republishes its original headers and payload
    /// (for a reference dead letter: read from the events stream, see
    /// [`dead_letter_original`](Self::dead_letter_original)) to its original subject with
    /// `Nats-Msg-Id: <original msg id>.replay.<sequence>` (the CloudEvent id is unchanged, so
    /// handlers can still recognise the event) and `Nats-Expected-Stream: <stream>` (its
    /// original events stream, or [`ReplayOptions::to_stream`]), waits for the server's ack,
    /// then deletes the dead letter.
    ///
    /// Repeating a replay loses nothing: a dead letter that is gone is `NotFound`; one whose
    /// earlier replay was acked but not deleted is republished as a duplicate (not stored
    /// twice, within the duplicate window) and then deleted.
    ///
    /// Every durable consumer filtering the original subject gets the republished event, not
    /// only the one that dead-lettered it.
    ///
    /// # Errors
    ///
    /// `NotFound`, `NotADeadLetter`, `StreamNotFound`, `WrongStream` (another stream holds the
    /// subject now: nothing stored, the dead letter is kept), `OriginalGone` (a reference dead
    /// letter whose original is no longer in the events stream; kept), `Publish` (the dead
    /// letter is kept), `TimedOut` (no ack in `NATS_EVENTS_TIMEOUT`; the dead letter is kept;
    /// replaying again is safe), `Delete` (republished but not deleted; replaying again is
    /// safe).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
    /// use ce_messaging::jetstream::dead_letters::ReplayOptions;
    /// let options = ReplayOptions { to_stream: Some("ORDERS_V2".into()) };
    /// let outcome = events.replay_dead_letter_with(7, &options).await?;
    /// assert_eq!(outcome.ack.stream, "ORDERS_V2");
    /// # Ok(()) }
    /// ```
    pub async fn replay_dead_letter_with(
        &self,
        sequence: u64,
        options: &ReplayOptions,
    ) -> Result<ReplayOutcome, DeadLetterError> {
        let dead = self.dead_letter(sequence).await?;
        let inner = self.inner();
        let msg_id = dead.replay_msg_id();
        let (mut headers, payload) = self.dead_letter_original(&dead).await?;
        let id_value: async_nats::HeaderValue = msg_id.parse().map_err(|_| {
            Error::with_detail(
                DeadLetterErrorKind::Publish,
                format!("replay id {msg_id:?} is not a valid header value"),
            )
        })?;
        headers.insert(NATS_MSG_ID, id_value);
        let expected_stream = options
            .to_stream
            .clone()
            .unwrap_or_else(|| dead.original_stream.clone());
        let stream_value: async_nats::HeaderValue = expected_stream.parse().map_err(|_| {
            Error::with_detail(
                DeadLetterErrorKind::Publish,
                format!("stream name {expected_stream:?} is not a valid header value"),
            )
        })?;
        headers.insert(EXPECTED_STREAM, stream_value);
        let timeout = inner.config.events_timeout;
        let subject = dead.original_subject.clone();
        let publish = async {
            let message = PublishMessage::build().headers(headers).payload(payload);
            inner.js.send_publish(subject.clone(), message).await?.await
        };
        let ack = match tokio::time::timeout(timeout, publish).await {
            Err(_) => {
                return Err(Error::with_detail(
                    DeadLetterErrorKind::TimedOut,
                    format!("no ack for the replay of dead letter #{sequence} within {timeout:?}; it was kept, replaying again is safe"),
                ))
            }
            Ok(Err(err)) => {
                let wrong_stream = std::error::Error::source(&err)
                    .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
                    .is_some_and(|e| e.error_code() == ErrorCode::STREAM_NOT_MATCH);
                if wrong_stream {
                    let holder = self.stream_holding(&subject).await;
                    return Err(wrong_stream_error(sequence, &subject, &expected_stream, &holder));
                }
                return Err(publish_error(err, sequence, &subject));
            }
            Ok(Ok(ack)) => ack,
        };
        if ack.stream != expected_stream {
            // A server that ignored Nats-Expected-Stream stored it elsewhere: keep the dead
            // letter and say where the copy went.
            let mut err = wrong_stream_error(sequence, &subject, &expected_stream, &ack.stream);
            let detail = format!(
                "{}; the server ignored Nats-Expected-Stream and stored a copy as #{} in {}",
                err.detail_text().unwrap_or_default(),
                ack.sequence,
                ack.stream
            );
            err = err.detail(detail);
            return Err(err);
        }
        let ack = PublishAck {
            stream: ack.stream,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        };
        let deleted = self.delete_dead_letter(sequence).await?;
        tracing::info!(dead_letter = sequence, subject = %subject, msg_id = %msg_id, stream = %ack.stream, seq = ack.sequence, duplicate = ack.duplicate, deleted, reference = dead.reference, "dead letter replayed");
        Ok(ReplayOutcome {
            dead_letter_sequence: sequence,
            subject,
            msg_id,
            ack,
            deleted,
        })
    }

    /// The name of the stream that holds `subject` now, or `"another stream"`.
    async fn stream_holding(&self, subject: &str) -> String {
        match tokio::time::timeout(
            self.inner().config.events_timeout,
            self.inner().js.stream_by_subject(subject),
        )
        .await
        {
            Ok(Ok(name)) => name,
            _ => "another stream".to_owned(),
        }
    }

    /// Deletes one message of the dead-letter stream; false if it was already gone.
    async fn delete_dead_letter(&self, sequence: u64) -> Result<bool, DeadLetterError> {
        let stream = self.dead_letter_stream().await?;
        match stream.delete_message(sequence).await {
            Ok(deleted) => Ok(deleted),
            Err(err) => match err.kind() {
                DeleteMessageErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::SEQUENCE_NOT_FOUND
                        || js.error_code() == ErrorCode::NO_MESSAGE_FOUND
                        || js.error_code() == ErrorCode::STREAM_MESSAGE_DELETE_FAILED =>
                {
                    Ok(false)
                }
                _ => Err(
                    Error::with_source(DeadLetterErrorKind::Delete, err).detail(format!(
                        "dead letter #{sequence} was republished; replaying it again is safe"
                    )),
                ),
            },
        }
    }

    async fn dead_letter_stream(
        &self,
    ) -> Result<async_nats::jetstream::stream::Stream<()>, DeadLetterError> {
        let dlq = &self.inner().config.js_dlq_stream;
        self.inner()
            .js
            .get_stream_no_info(dlq)
            .await
            .map_err(|err| {
                Error::with_source(DeadLetterErrorKind::Other, err).detail(format!("stream {dlq}"))
            })
    }
}

fn raw_get_error(
    err: async_nats::jetstream::stream::RawMessageError,
    dlq: &str,
) -> DeadLetterError {
    let kind = match err.kind() {
        RawMessageErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND => {
            DeadLetterErrorKind::StreamNotFound
        }
        // The request behind the get failed: async-nats puts its request error as the source.
        RawMessageErrorKind::Other
            if std::error::Error::source(&err)
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::context::RequestError>())
                .is_some_and(|e| {
                    e.kind() == async_nats::jetstream::context::RequestErrorKind::TimedOut
                }) =>
        {
            DeadLetterErrorKind::TimedOut
        }
        _ => DeadLetterErrorKind::Other,
    };
    Error::with_source(kind, err).detail(format!(
        "stream {dlq} (create it with init_stream / `cemsg stream init`)"
    ))
}

/// The publisher directive that makes the server refuse a replay stored by any other stream.
const EXPECTED_STREAM: &str = "Nats-Expected-Stream";

fn wrong_stream_error(
    sequence: u64,
    subject: &str,
    expected: &str,
    holder: &str,
) -> DeadLetterError {
    Error::with_detail(
        DeadLetterErrorKind::WrongStream,
        format!(
            "dead letter #{sequence}: subject {subject} is now held by stream {holder}, not by {expected}; the dead letter was kept (replay into {holder} only on purpose: --to-stream {holder} / ReplayOptions::to_stream)"
        ),
    )
}

fn publish_error(
    err: async_nats::jetstream::context::PublishError,
    sequence: u64,
    subject: &str,
) -> DeadLetterError {
    let kind = match err.kind() {
        JsPublishErrorKind::TimedOut => DeadLetterErrorKind::TimedOut,
        _ => DeadLetterErrorKind::Publish,
    };
    let why = if matches!(err.kind(), JsPublishErrorKind::StreamNotFound) {
        format!("no stream holds subject {subject}; dead letter #{sequence} was kept")
    } else {
        format!("republishing dead letter #{sequence} to {subject}; it was kept")
    };
    Error::with_source(kind, err).detail(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timed_out_get_is_recognised_by_its_kind_not_its_text() {
        use async_nats::jetstream::context::{RequestError, RequestErrorKind};
        let get = |kind| {
            raw_get_error(
                async_nats::jetstream::stream::RawMessageError::with_source(
                    RawMessageErrorKind::Other,
                    RequestError::new(kind),
                ),
                "DLQ",
            )
        };
        assert_eq!(
            get(RequestErrorKind::TimedOut).kind(),
            DeadLetterErrorKind::TimedOut
        );
        assert_eq!(
            get(RequestErrorKind::NoResponders).kind(),
            DeadLetterErrorKind::Other
        );
        // A source whose text says "timed out" but is not a timed-out request is not one.
        let text_only = raw_get_error(
            async_nats::jetstream::stream::RawMessageError::with_source(
                RawMessageErrorKind::Other,
                std::io::Error::other("timed out"),
            ),
            "DLQ",
        );
        assert_eq!(text_only.kind(), DeadLetterErrorKind::Other);
    }

    fn stored_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", "application/cloudevents+json");
        headers.insert("traceparent-like", "kept");
        headers.insert(NATS_MSG_ID, "cloudevent-abc.dlq.billing");
        headers.insert(DEAD_LETTER_REASON, "rejected");
        headers.insert(DEAD_LETTER_ERROR, "order id 0");
        headers.insert(DEAD_LETTER_SUBJECT, "events.org.example.order.created");
        headers.insert(DEAD_LETTER_STREAM_SEQ, "17");
        headers.insert(DEAD_LETTER_DELIVERIES, "3");
        headers
    }

    #[test]
    fn a_dead_letter_separates_its_headers_from_the_original_ones() {
        let dead = DeadLetter::from_parts(
            5,
            "deadletter.CLOUDEVENTS.billing".into(),
            &stored_headers(),
            Bytes::from_static(b"{}"),
            DateTime::default(),
        )
        .unwrap();
        assert_eq!(dead.durable, "billing");
        assert_eq!(dead.reason_kind(), Some(DeadLetterReason::Rejected));
        assert_eq!(dead.error, "order id 0");
        assert_eq!(dead.original_subject, "events.org.example.order.created");
        assert_eq!(
            (dead.original_sequence, dead.deliveries),
            (Some(17), Some(3))
        );
        assert_eq!(dead.original_msg_id, "cloudevent-abc");
        assert_eq!(dead.replay_msg_id(), "cloudevent-abc.replay.5");
        let mut names: Vec<String> = dead.headers.iter().map(|(n, _)| n.to_string()).collect();
        names.sort();
        assert_eq!(names, vec!["Content-Type", "traceparent-like"]);
        assert!(
            !format!("{dead:?}").contains("{}"),
            "Debug shows no payload"
        );
    }

    #[test]
    fn a_dead_letter_without_a_message_id_is_named_after_its_origin() {
        let mut headers = stored_headers();
        headers.insert(NATS_MSG_ID, "");
        let dead = DeadLetter::from_parts(
            9,
            "deadletter.CE.svc".into(),
            &headers,
            Bytes::new(),
            DateTime::default(),
        )
        .unwrap();
        assert_eq!(dead.replay_msg_id(), "CE.17.replay.9");
    }

    #[test]
    fn a_message_without_dead_letter_subject_is_not_a_dead_letter() {
        let err = DeadLetter::from_parts(
            1,
            "deadletter.CE.svc".into(),
            &HeaderMap::new(),
            Bytes::new(),
            DateTime::default(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), DeadLetterErrorKind::NotADeadLetter);
    }
}
