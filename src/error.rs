//! Error types for the whole crate: one generic [`Error<K>`] carrying a per-area kind enum,
//! an optional human-readable detail and an optional boxed source, in the async-nats style.
//!
//! Tests and callers match on [`Error::kind`], never on message text.
//!
//! # Where error kinds live
//!
//! Every error a trait method or the shared machinery returns (what a caller of any backend
//! can get) is defined here: its kind enum, its `Error<K>` alias, and the two error values that
//! carry more than a kind ([`RemoteError`], the source of a `Remote` request error, and
//! [`PublishError`], which hands back the unpublished event). A caller finds every kind it
//! may match on in this one module. An error that only a backend-specific API returns lives
//! with that API, as async-nats keeps JetStream's errors in its `jetstream` module:
//! [`DeadLetterErrorKind`](crate::jetstream::dead_letters::DeadLetterErrorKind) belongs to
//! [`JetStreamEvents`](crate::JetStreamEvents)' dead-letter operations and nothing else.
//! Errors internal to the crate (never returned to a caller) stay private to their module, and
//! [`HandlerError`](crate::handler::HandlerError) goes the other way (a handler returns it to
//! the library), so it lives with the handler API.
//!
//! # Examples
//!
//! ```
//! use ce_messaging::error::{Error, RequestErrorKind};
//!
//! let err = Error::new(RequestErrorKind::NoResponders);
//! assert_eq!(err.kind(), RequestErrorKind::NoResponders);
//! assert_eq!(err.to_string(), "no responders");
//! ```

use std::fmt;

use cloudevents::{AttributesReader, Event};

/// A boxed error that can cross threads: the `source` of every [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error of one operation area: a kind `K`, an optional detail text and an optional source.
///
/// `Display` shows the kind, then the detail, then the source, separated by `": "`.
///
/// # Examples
///
/// ```
/// use ce_messaging::error::{DecodeErrorKind, Error};
///
/// let err = Error::with_detail(DecodeErrorKind::MissingAttribute, "no `id` attribute");
/// assert_eq!(err.kind(), DecodeErrorKind::MissingAttribute);
/// assert!(err.to_string().contains("`id`"));
/// ```
pub struct Error<K> {
    kind: K,
    detail: Option<String>,
    source: Option<BoxError>,
}

impl<K: Copy> Error<K> {
    /// An error of the given kind with no detail and no source.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::error::{Error, PublishErrorKind};
    /// let err = Error::new(PublishErrorKind::TimedOut);
    /// assert_eq!(err.kind(), PublishErrorKind::TimedOut);
    /// ```
    pub fn new(kind: K) -> Self {
        Error {
            kind,
            detail: None,
            source: None,
        }
    }

    /// An error of the given kind with a detail text that says what was wrong.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::error::{ConfigErrorKind, Error};
    /// let err = Error::with_detail(ConfigErrorKind::InvalidValue, "NATS_JS_REPLICAS: not a number");
    /// assert!(err.to_string().contains("NATS_JS_REPLICAS"));
    /// ```
    pub fn with_detail(kind: K, detail: impl Into<String>) -> Self {
        Error {
            kind,
            detail: Some(detail.into()),
            source: None,
        }
    }

    /// An error of the given kind caused by `source`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::error::{Error, EventErrorKind};
    /// let io = std::io::Error::other("boom");
    /// let err = Error::with_source(EventErrorKind::DataSerialize, io);
    /// assert!(std::error::Error::source(&err).is_some());
    /// ```
    pub fn with_source(kind: K, source: impl Into<BoxError>) -> Self {
        Error {
            kind,
            detail: None,
            source: Some(source.into()),
        }
    }

    /// Adds (or replaces) the detail text.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::error::{Error, RequestErrorKind};
    /// let err = Error::new(RequestErrorKind::TimedOut).detail("after 2s");
    /// assert_eq!(err.to_string(), "timed out: after 2s");
    /// ```
    #[must_use]
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds (or replaces) the source.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::error::{Error, RequestErrorKind};
    /// let err = Error::new(RequestErrorKind::Other).source(std::io::Error::other("x"));
    /// assert!(std::error::Error::source(&err).is_some());
    /// ```
    #[must_use]
    pub fn source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The kind of this error: what callers and tests match on.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::error::{Error, ListenErrorKind};
    /// assert_eq!(Error::new(ListenErrorKind::Subscribe).kind(), ListenErrorKind::Subscribe);
    /// ```
    pub fn kind(&self) -> K {
        self.kind
    }

    /// The detail text, if any.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::error::{Error, ListenErrorKind};
    /// let err = Error::with_detail(ListenErrorKind::InvalidOptions, "workers must be > 0");
    /// assert_eq!(err.detail_text(), Some("workers must be > 0"));
    /// ```
    pub fn detail_text(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// Converts into an error of another area, keeping detail and source.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::error::{DecodeErrorKind, Error, RequestErrorKind};
    /// let decode = Error::with_detail(DecodeErrorKind::NotJson, "expected value");
    /// let req = decode.map_kind(|_| RequestErrorKind::Decode);
    /// assert_eq!(req.kind(), RequestErrorKind::Decode);
    /// assert!(req.to_string().contains("expected value"));
    /// ```
    pub fn map_kind<K2: Copy>(self, f: impl FnOnce(K) -> K2) -> Error<K2> {
        Error {
            kind: f(self.kind),
            detail: self.detail,
            source: self.source,
        }
    }
}

impl<K: fmt::Display> fmt::Display for Error<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl<K: fmt::Debug> fmt::Debug for Error<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind);
        if let Some(detail) = &self.detail {
            d.field("detail", detail);
        }
        if let Some(source) = &self.source {
            d.field("source", &format_args!("{source}"));
        }
        d.finish()
    }
}

impl<K: fmt::Debug + fmt::Display> std::error::Error for Error<K> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl<K: Copy> From<K> for Error<K> {
    fn from(kind: K) -> Self {
        Error::new(kind)
    }
}

macro_rules! error_kind {
    (
        $(#[$meta:meta])*
        $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self {
                    $( $name::$variant => $text, )*
                })
            }
        }
    };
}

error_kind! {
    /// What went wrong creating an event or reading its data.
    EventErrorKind {
        /// The event could not be built (an attribute was rejected by cloudevents-sdk).
        Build => "invalid event",
        /// The data could not be serialized to JSON.
        DataSerialize => "event data could not be serialized",
        /// The data could not be deserialized into the requested type.
        DataDeserialize => "event data could not be deserialized",
        /// The event has no data.
        NoData => "event has no data",
        /// The event type (or query op) breaks the subject-token rule of the wire contract
        /// (see [`check_type`](crate::event::check_type)); the detail says how.
        InvalidType => "invalid event type",
    }
}

error_kind! {
    /// What was wrong with an incoming message that could not be decoded into a CloudEvent.
    DecodeErrorKind {
        /// Structured mode: the payload is not valid JSON (or not a JSON object).
        NotJson => "payload is not a JSON event",
        /// A required attribute (`id`, `source`, `type`, `specversion`) is missing.
        MissingAttribute => "missing required attribute",
        /// The `specversion` is not one this library understands.
        UnknownSpecVersion => "unknown spec version",
        /// An attribute has a value of the wrong shape (e.g. `time` not RFC 3339).
        InvalidAttribute => "invalid attribute value",
        /// A binary-mode header value has a malformed `%XX` escape.
        InvalidPercentEncoding => "invalid percent-encoding",
        /// A header value or text payload is not valid UTF-8 after decoding.
        InvalidUtf8 => "invalid UTF-8",
        /// The message has no CloudEvents markers at all and is not a JSON event.
        NotCloudEvent => "not a CloudEvent",
    }
}

error_kind! {
    /// What went wrong turning a CloudEvent into a NATS message.
    EncodeErrorKind {
        /// The event breaks a CloudEvents rule its receivers hold events to (an empty `id`,
        /// `type`, `source` or `subject`, a `datacontenttype` that is not a media type, an
        /// extension name that is not lower-case letters and digits): not sent.
        InvalidAttribute => "invalid attribute",
        /// An attribute or extension could not be expressed as a NATS header.
        InvalidHeader => "invalid header",
        /// The event could not be serialized.
        Serialize => "event could not be serialized",
        /// The encoded message is larger than the server accepts.
        TooLarge => "message too large",
    }
}

error_kind! {
    /// What was wrong with the configuration.
    ConfigErrorKind {
        /// An environment variable has a value that does not parse; the detail names it.
        InvalidValue => "invalid configuration value",
        /// A setting is missing or settings contradict each other.
        Invalid => "invalid configuration",
        /// A file named by the configuration (credentials, certificates) could not be read.
        File => "configuration file could not be read",
    }
}

error_kind! {
    /// What went wrong connecting to NATS.
    ConnectErrorKind {
        /// The server could not be reached.
        Io => "could not connect",
        /// The server refused the credentials.
        Authorization => "authorization failed",
        /// The TLS handshake or TLS setup failed.
        Tls => "TLS failed",
        /// Connecting took longer than allowed.
        TimedOut => "connect timed out",
        /// The connection options are invalid.
        InvalidConfig => "invalid connection options",
        /// A credentials file (`.creds`, NKey seed) could not be read or is malformed.
        Credentials => "credentials could not be loaded",
    }
}

error_kind! {
    /// What went wrong with a query request (core NATS request/reply).
    RequestErrorKind {
        /// No reply arrived before the deadline.
        TimedOut => "timed out",
        /// Nobody listens for this op (NATS 503); reported at once.
        NoResponders => "no responders",
        /// The responder answered with an error (`Nats-Service-Error-Code`); see
        /// [`RemoteError`] for the code and text.
        Remote => "remote error",
        /// The reply could not be decoded into a CloudEvent.
        Decode => "undecodable reply",
        /// The request could not be encoded.
        Encode => "request could not be encoded",
        /// The connection is closed.
        ConnectionClosed => "connection closed",
        /// The request options are invalid.
        InvalidOptions => "invalid request options",
        /// Any other failure; see the source.
        Other => "request failed",
        /// The client is not connected to a server (it is reconnecting); reported at once,
        /// with how long the connection has been down when known.
        Disconnected => "disconnected",
        /// The replier answered with a reply stream of zero replies (an answer: there is
        /// nothing); [`request`](crate::query::QueryConnection::request) has no event to
        /// return. Read such ops with `request_stream`, which then ends without an item.
        EmptyStream => "empty reply stream",
    }
}

error_kind! {
    /// What went wrong publishing an event.
    PublishErrorKind {
        /// No PubAck arrived within the bounded retry time.
        TimedOut => "publish timed out",
        /// No stream holds the event's subject.
        StreamNotFound => "no stream for subject",
        /// The event is larger than the server's max payload; refused before sending.
        TooLarge => "event too large",
        /// The event could not be encoded.
        Encode => "event could not be encoded",
        /// The connection is closed.
        ConnectionClosed => "connection closed",
        /// Any other failure; see the source.
        Other => "publish failed",
        /// The event type breaks the subject-token rule of the wire contract (wildcards,
        /// whitespace, control characters, empty tokens, too long); refused before sending,
        /// never retried.
        InvalidType => "invalid event type",
        /// The client is not connected to a server (it is reconnecting) and did not get back
        /// in time; the detail says for how long it has been down.
        Disconnected => "not connected to NATS",
        /// With priorities on (`NATS_JS_PRIORITY_LEVELS` > 1), the event's `priority`
        /// extension is not an integer below the number of levels; refused before sending,
        /// never retried.
        InvalidPriority => "invalid event priority",
        /// The publish options are invalid (an interval or time-to-live under 1 s, a cron
        /// expression that does not parse, an event id that cannot name a schedule); refused
        /// before sending.
        InvalidSchedule => "invalid schedule or time-to-live",
        /// The server or the stream cannot do what the publish options ask: the server is
        /// older than the feature (the detail names the version needed: 2.11 for a
        /// time-to-live, 2.12 for `@at`, 2.14 for `@every` and cron), or the stream has the
        /// feature off (run `init_stream`).
        Unsupported => "not supported by the server or stream",
    }
}

error_kind! {
    /// What went wrong starting or running a listener.
    ListenErrorKind {
        /// The subscription could not be made.
        Subscribe => "subscribe failed",
        /// The durable consumer could not be created or bound.
        Consumer => "consumer setup failed",
        /// The stream the listener needs does not exist.
        StreamNotFound => "stream not found",
        /// The listen options are invalid (no handlers, zero workers, ...).
        InvalidOptions => "invalid listen options",
        /// Another instance of the durable is listening with a different set of event types;
        /// instances of one durable must handle the same types (the detail names the durable
        /// and both type sets).
        DurableInUse => "durable in use with other event types",
        /// The connection is closed.
        ConnectionClosed => "connection closed",
        /// Any other failure; see the source.
        Other => "listen failed",
    }
}

error_kind! {
    /// What went wrong creating or updating streams.
    StreamErrorKind {
        /// The stream could not be created or updated.
        Create => "stream create/update failed",
        /// The stream does not exist.
        NotFound => "stream not found",
        /// Any other failure; see the source.
        Other => "stream operation failed",
    }
}

error_kind! {
    /// What went wrong waiting for a response event (promises).
    ResponseErrorKind {
        /// No matching response arrived before the deadline.
        TimedOut => "no response before the deadline",
        /// The promise was closed, or the connection went away.
        Closed => "promise closed",
        /// Publishing the request failed.
        Publish => "request could not be published",
        /// Listening for responses failed.
        Listen => "could not listen for responses",
    }
}

error_kind! {
    /// What went wrong answering a query through a `ReplyWriter`.
    ReplyErrorKind {
        /// A reply (or error reply) was already sent for this request.
        AlreadyReplied => "already replied",
        /// The reply could not be encoded.
        Encode => "reply could not be encoded",
        /// The reply could not be sent.
        Send => "reply could not be sent",
        /// A reply stream grew past its bound.
        TooMany => "too many replies",
        /// The encoded reply is larger than the server's `max_payload`; the requester got a
        /// 500 error reply instead.
        TooLarge => "reply too large",
    }
}

/// Error creating an event or reading its data.
pub type EventError = Error<EventErrorKind>;
/// Error decoding a NATS message into a CloudEvent.
pub type DecodeError = Error<DecodeErrorKind>;
/// Error encoding a CloudEvent into a NATS message.
pub type EncodeError = Error<EncodeErrorKind>;
/// Error reading or validating configuration.
pub type ConfigError = Error<ConfigErrorKind>;
/// Error connecting to NATS.
pub type ConnectError = Error<ConnectErrorKind>;
/// Error of a query request.
pub type RequestError = Error<RequestErrorKind>;
/// Error starting a listener.
pub type ListenError = Error<ListenErrorKind>;
/// Error creating or updating streams.
pub type StreamError = Error<StreamErrorKind>;
/// Error answering a query.
pub type ReplyError = Error<ReplyErrorKind>;
/// Error waiting for response events.
pub type ResponseError = Error<ResponseErrorKind>;

/// A failed publish: an [`Error<PublishErrorKind>`] plus the event, handed back so the caller
/// can retry without rebuilding it (tokio's `SendError<T>` pattern). It reads like every
/// `Error<K>` ([`kind`](Self::kind), `Display`, the same `source` chain), and converts into
/// the plain error with `?` or [`into_error`](Self::into_error) when the event is not needed.
///
/// # Examples
///
/// ```
/// use ce_messaging::error::PublishErrorKind;
/// use ce_messaging::error::PublishError;
///
/// let event = ce_messaging::cloudevent::new_event("t", "s", &1).unwrap();
/// let err = PublishError::new(PublishErrorKind::TimedOut, Some(event));
/// assert_eq!(err.kind(), PublishErrorKind::TimedOut);
/// assert!(err.into_event().is_some());
/// ```
pub struct PublishError {
    error: Error<PublishErrorKind>,
    event: Option<Box<Event>>,
}

impl PublishError {
    /// A publish error of `kind`, holding the event that was not published.
    pub fn new(kind: PublishErrorKind, event: Option<Event>) -> Self {
        PublishError {
            error: Error::new(kind),
            event: event.map(Box::new),
        }
    }

    /// Wraps an error, holding the event that was not published.
    pub fn from_error(error: Error<PublishErrorKind>, event: Option<Event>) -> Self {
        PublishError {
            error,
            event: event.map(Box::new),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> PublishErrorKind {
        self.error.kind()
    }

    /// The error itself.
    pub fn error(&self) -> &Error<PublishErrorKind> {
        &self.error
    }

    /// The event that was not published, for a retry.
    pub fn into_event(self) -> Option<Event> {
        self.event.map(|e| *e)
    }

    /// The error without the event.
    pub fn into_error(self) -> Error<PublishErrorKind> {
        self.error
    }
}

impl From<PublishError> for Error<PublishErrorKind> {
    fn from(err: PublishError) -> Self {
        err.error
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl fmt::Debug for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishError")
            .field("error", &self.error)
            .field("event_id", &self.event.as_ref().map(|e| e.id().to_owned()))
            .finish()
    }
}

impl std::error::Error for PublishError {
    // The inner error's source, not the inner error itself: its text is already this error's
    // `Display`, and a report walking the chain would print it twice.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

/// The code and text of an error reply (`Nats-Service-Error-Code` / `Nats-Service-Error`),
/// attached as the source of a [`RequestErrorKind::Remote`] error.
///
/// # Examples
///
/// ```
/// use ce_messaging::error::{Error, RemoteError, RequestErrorKind};
///
/// let err = RemoteError::new(404, "unknown op").into_request_error();
/// assert_eq!(err.kind(), RequestErrorKind::Remote);
/// let remote = RemoteError::of(&err).unwrap();
/// assert_eq!(remote.code(), 404);
/// assert_eq!(remote.text(), "unknown op");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    code: u16,
    text: String,
}

impl RemoteError {
    /// A remote error with a code (400, 404, 500, ...) and a text.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::error::RemoteError;
    /// assert_eq!(RemoteError::new(500, "boom").code(), 500);
    /// ```
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        RemoteError {
            code,
            text: text.into(),
        }
    }

    /// The `Nats-Service-Error-Code`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::error::RemoteError;
    /// assert_eq!(RemoteError::new(400, "bad").code(), 400);
    /// ```
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The `Nats-Service-Error` text.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::error::RemoteError;
    /// assert_eq!(RemoteError::new(400, "bad").text(), "bad");
    /// ```
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Wraps this as a [`RequestErrorKind::Remote`] error.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::error::{RemoteError, RequestErrorKind};
    /// let err = RemoteError::new(500, "boom").into_request_error();
    /// assert_eq!(err.kind(), RequestErrorKind::Remote);
    /// ```
    pub fn into_request_error(self) -> RequestError {
        Error::with_source(RequestErrorKind::Remote, self)
    }

    /// The remote error behind a [`RequestErrorKind::Remote`] error, if that is what it is.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::error::{Error, RemoteError, RequestErrorKind};
    /// let err: ce_messaging::error::RequestError = Error::new(RequestErrorKind::TimedOut);
    /// assert!(RemoteError::of(&err).is_none());
    /// ```
    pub fn of(err: &RequestError) -> Option<&RemoteError> {
        err.source
            .as_ref()
            .and_then(|s| s.downcast_ref::<RemoteError>())
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.text, self.code)
    }
}

impl std::error::Error for RemoteError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_error_reads_like_its_error_and_hands_back_the_event() {
        let event = crate::cloudevent::new_event("org.example.t", "svc", &1).unwrap();
        let err = PublishError::from_error(
            Error::with_source(PublishErrorKind::TimedOut, std::io::Error::other("no ack")),
            Some(event.clone()),
        );
        assert_eq!(err.kind(), PublishErrorKind::TimedOut);
        assert_eq!(err.to_string(), err.error().to_string());
        // The chain goes on with the cause, without repeating this error's own text.
        let source = std::error::Error::source(&err).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("no ack"));
        let plain: Error<PublishErrorKind> =
            PublishError::new(PublishErrorKind::Encode, None).into();
        assert_eq!(plain.kind(), PublishErrorKind::Encode);
        assert_eq!(err.into_event(), Some(event));
    }

    #[test]
    fn display_chains_kind_detail_and_source() {
        let err = Error::with_detail(PublishErrorKind::TooLarge, "2000000 bytes > 1048576")
            .source(std::io::Error::other("inner"));
        assert_eq!(
            err.to_string(),
            "event too large: 2000000 bytes > 1048576: inner"
        );
        assert_eq!(err.kind(), PublishErrorKind::TooLarge);
    }

    #[test]
    fn remote_error_round_trips_through_request_error() {
        let err = RemoteError::new(404, "no handler for op").into_request_error();
        let remote = RemoteError::of(&err).expect("remote source");
        assert_eq!((remote.code(), remote.text()), (404, "no handler for op"));
        assert_eq!(
            err.to_string(),
            "remote error: no handler for op (code 404)"
        );
    }

    #[test]
    fn map_kind_keeps_detail() {
        let err = Error::with_detail(DecodeErrorKind::MissingAttribute, "no `type`")
            .map_kind(|_| RequestErrorKind::Decode);
        assert_eq!(err.kind(), RequestErrorKind::Decode);
        assert_eq!(err.detail_text(), Some("no `type`"));
    }
}
