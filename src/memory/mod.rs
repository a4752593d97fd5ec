//! The in-memory backend: a [`MemoryBroker`] that behaves like a NATS server with JetStream,
//! living in the process, and the [`MemoryQueries`] / [`MemoryEvents`] connections made from it.
//!
//! Services run against it unchanged (they only see [`QueryConnection`](crate::query::QueryConnection)
//! and [`EventConnection`](crate::events::EventConnection)), so they can be unit-tested without a
//! server and examples run out of the box. It is not a mock: messages go through the real
//! [codec](crate::codec) on the way in and out, so content modes and undecodable messages
//! behave as on the wire, and the semantics are those of NATS and JetStream:
//!
//! - **Queries:** request/reply with a timeout and an immediate "no responders", reply streams
//!   and scatter-gather, queue groups (one member of a group gets each request), wildcard
//!   subjects. A subscription's queue is bounded; when it is full, messages are dropped as for
//!   a NATS slow consumer (see [`MemoryBroker::dropped_messages`]).
//! - **Events:** streams ([`init_stream`](crate::events::EventConnection::init_stream) creates
//!   them; publishing to a subject no stream holds fails with `StreamNotFound`, as with
//!   JetStream), de-duplication by event id within the duplicate window, durable consumers
//!   (shared within a durable, every durable gets every event), ack / nak with delay /
//!   in-progress / term, ack-wait redelivery, max deliveries, dead letters with the same
//!   reasons and headers, promises and [`EventSource`](crate::event_source::EventSource).
//! - **Limits:** a message larger than [`MemoryOptions::max_payload`] (default 1 MiB, as NATS)
//!   is refused before it is sent; streams keep at most [`MemoryOptions::max_stream_messages`]
//!   and [`MemoryOptions::max_stream_bytes`] (the oldest are discarded beyond that, as a
//!   JetStream stream with limits does, with a warning when a consumer had not settled them).
//!
//! Timers are tokio timers (no polling), so tests can run with paused time.
//!
//! **Streams:** [`MemoryBroker::new`] starts with no streams, like a fresh server: call
//! `init_stream` (what the examples do, so the same code runs against NATS). For tests that do
//! not care, [`MemoryBroker::with_auto_streams`] creates the configured events and dead-letter
//! streams when an event connection is made.
//!
//! # Examples
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use ce_messaging::config::Config;
//! use ce_messaging::memory::MemoryBroker;
//! use ce_messaging::query::{typed_handler, QueryConnection, QueryHandlers, QueryListenOptions, TypedRequest};
//! use ce_messaging::handler::HandlerError;
//! use ce_messaging::cloudevent::{new_event, EventExt};
//!
//! let broker = MemoryBroker::new();
//! let config = Config::default();
//! let server = broker.query_connection(&config);
//! let listener = server
//!     .listen(
//!         QueryHandlers::new().on("org.example.double", typed_handler(|req: TypedRequest<u64>| async move {
//!             Ok::<_, HandlerError>(req.data * 2)
//!         })),
//!         QueryListenOptions::default(),
//!     )
//!     .await?;
//!
//! let client = broker.query_connection(&config);
//! let reply = client.request(new_event("org.example.double", "client", &21)?).await?;
//! assert_eq!(reply.data_as::<u64>()?, 42);
//!
//! listener.stop(std::time::Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```

mod bus;
mod events;
mod queries;
mod stream;

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::codec::HeaderMap;
use crate::config::Config;
use crate::error::{Error, PublishErrorKind, RequestError, RequestErrorKind, StreamError};
use crate::events::PublishAck;
use crate::query::RawReply;

pub use events::MemoryEvents;
pub use queries::MemoryQueries;
pub use stream::{ConsumerInfo, StoredMessage};

use bus::{Bus, BusMessage};
use stream::Streams;

/// The default [`MemoryOptions::max_payload`]: 1 MiB, the NATS server default.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Limits of a [`MemoryBroker`].
///
/// # Examples
///
/// ```
/// use ce_messaging::memory::{MemoryBroker, MemoryOptions};
/// let broker = MemoryBroker::with_options(MemoryOptions { max_payload: 64 * 1024, ..Default::default() });
/// assert_eq!(broker.options().max_payload, 65536);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryOptions {
    /// The largest message (headers and payload, counted as on the wire) accepted; larger ones
    /// are refused before sending (`PublishErrorKind::TooLarge`, or `RequestErrorKind::Encode`
    /// for queries). Default [`DEFAULT_MAX_PAYLOAD`].
    pub max_payload: usize,
    /// How many messages a subscription (a listener, an inbox, an event-source subscription)
    /// holds before further ones are dropped as for a slow consumer. Default 65 536, as
    /// async-nats.
    pub subscription_capacity: usize,
    /// How many messages a stream keeps; beyond that the oldest are discarded. Default 1 000 000.
    pub max_stream_messages: usize,
    /// How many bytes (subjects, headers and payloads) a stream keeps; beyond that the oldest
    /// messages are discarded. 0: no limit. Default 256 MiB.
    pub max_stream_bytes: usize,
    /// Create the configured events and dead-letter streams whenever an event connection is
    /// made (see [`MemoryBroker::with_auto_streams`]). Default `false`, like a NATS server.
    pub auto_create_streams: bool,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            max_payload: DEFAULT_MAX_PAYLOAD,
            subscription_capacity: 65_536,
            max_stream_messages: 1_000_000,
            max_stream_bytes: 256 * 1024 * 1024,
            auto_create_streams: false,
        }
    }
}

pub(crate) struct BrokerInner {
    options: MemoryOptions,
    bus: Arc<Bus>,
    streams: Streams,
}

/// An in-process message broker with the semantics of a NATS server with JetStream.
///
/// Cheap to clone: clones are handles to the same broker. Make one per process (or use
/// [`MemoryBroker::global`]) and make every connection from it; connections of different
/// brokers do not see each other.
///
/// # Examples
///
/// ```
/// use ce_messaging::config::Config;
/// use ce_messaging::memory::MemoryBroker;
///
/// let broker = MemoryBroker::new();
/// let config = Config::default();
/// let queries = broker.query_connection(&config);
/// let events = broker.event_connection(&config);
/// # let _ = (queries, events);
/// ```
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<BrokerInner>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("options", &self.inner.options)
            .field("subscriptions", &self.inner.bus.subscription_count())
            .finish()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A broker with default limits and no streams (like a fresh NATS server).
    ///
    /// # Examples
    ///
    /// ```
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// assert!(broker.stream_len("CLOUDEVENTS").is_err(), "no streams until init_stream");
    /// ```
    pub fn new() -> Self {
        Self::with_options(MemoryOptions::default())
    }

    /// A broker with the given limits.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::memory::{MemoryBroker, MemoryOptions};
    /// let broker = MemoryBroker::with_options(MemoryOptions { max_stream_messages: 10, ..Default::default() });
    /// assert_eq!(broker.options().max_stream_messages, 10);
    /// ```
    pub fn with_options(options: MemoryOptions) -> Self {
        MemoryBroker {
            inner: Arc::new(BrokerInner {
                bus: Bus::new(options.subscription_capacity),
                streams: Streams::default(),
                options,
            }),
        }
    }

    /// A broker that creates the configured events and dead-letter streams whenever an event
    /// connection is made from it, so that publishing works without `init_stream`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::config::Config;
    /// use ce_messaging::memory::MemoryBroker;
    ///
    /// let broker = MemoryBroker::with_auto_streams();
    /// let _events = broker.event_connection(&Config::default());
    /// assert_eq!(broker.stream_len("CLOUDEVENTS").unwrap(), 0);
    /// assert_eq!(broker.stream_len("DEADLETTER").unwrap(), 0);
    /// ```
    pub fn with_auto_streams() -> Self {
        Self::with_options(MemoryOptions {
            auto_create_streams: true,
            ..MemoryOptions::default()
        })
    }

    /// The process-wide broker (created with default options on first use), for services that
    /// make their connections in different places and need them to meet.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::memory::MemoryBroker;
    /// let a = MemoryBroker::global();
    /// let b = MemoryBroker::global();
    /// assert!(a.same_broker(&b));
    /// ```
    pub fn global() -> MemoryBroker {
        static GLOBAL: OnceLock<MemoryBroker> = OnceLock::new();
        GLOBAL.get_or_init(MemoryBroker::new).clone()
    }

    /// Whether two handles are the same broker.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::memory::MemoryBroker;
    /// let broker = MemoryBroker::new();
    /// assert!(broker.same_broker(&broker.clone()));
    /// assert!(!broker.same_broker(&MemoryBroker::new()));
    /// ```
    pub fn same_broker(&self, other: &MemoryBroker) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The broker's limits.
    ///
    /// # Examples
    ///
    /// ```
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// assert_eq!(broker.options().max_payload, ce_messaging::memory::DEFAULT_MAX_PAYLOAD);
    /// ```
    pub fn options(&self) -> &MemoryOptions {
        &self.inner.options
    }

    /// A query connection (the in-memory counterpart of `NatsQueries`) using
    /// the client id, queue group, wildcard subject, request timeout and content mode of
    /// `config`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::query::QueryConnection;
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// let queries = broker.query_connection(&ce_messaging::config::Config::default());
    /// assert_eq!(queries.default_timeout(), std::time::Duration::from_secs(10));
    /// ```
    pub fn query_connection(&self, config: &Config) -> MemoryQueries {
        MemoryQueries::new(self.clone(), config)
    }

    /// An event connection using the stream, subject prefix, durable name, ack wait, max
    /// deliveries, duplicate window, dead-letter stream, events timeout and content mode of
    /// `config`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::events::EventConnection;
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// let events = broker.event_connection(&ce_messaging::config::Config::default());
    /// assert_eq!(events.events_timeout(), std::time::Duration::from_secs(30));
    /// ```
    pub fn event_connection(&self, config: &Config) -> MemoryEvents {
        let events = MemoryEvents::new(self.clone(), config);
        if self.inner.options.auto_create_streams {
            if let Err(err) = events.create_streams() {
                tracing::warn!(error = %err, "automatic stream creation failed");
            }
        }
        events
    }

    /// The messages a stream holds, oldest first, headers and payload as published.
    ///
    /// # Errors
    ///
    /// `StreamErrorKind::NotFound` when there is no such stream.
    ///
    /// # Examples
    ///
    /// ```
    /// let broker = ce_messaging::memory::MemoryBroker::with_auto_streams();
    /// let _events = broker.event_connection(&ce_messaging::config::Config::default());
    /// assert!(broker.stream_messages("DEADLETTER").unwrap().is_empty());
    /// ```
    pub fn stream_messages(&self, stream: &str) -> Result<Vec<StoredMessage>, StreamError> {
        self.inner.streams.messages(stream)
    }

    /// How many messages a stream holds.
    ///
    /// # Errors
    ///
    /// `StreamErrorKind::NotFound` when there is no such stream.
    ///
    /// # Examples
    ///
    /// ```
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// assert!(broker.stream_len("nope").is_err());
    /// ```
    pub fn stream_len(&self, stream: &str) -> Result<usize, StreamError> {
        self.inner.streams.len(stream)
    }

    /// The state of a durable consumer (pending, ack pending, redelivered, ...), if it exists.
    ///
    /// # Examples
    ///
    /// ```
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// assert!(broker.consumer_info("CLOUDEVENTS", "billing").is_none());
    /// ```
    pub fn consumer_info(&self, stream: &str, durable: &str) -> Option<ConsumerInfo> {
        self.inner.streams.consumer_info(stream, durable)
    }

    /// Deletes a stream with its messages and consumers; listeners on it stop receiving.
    /// Returns whether it existed.
    ///
    /// # Examples
    ///
    /// ```
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// assert!(!broker.delete_stream("CLOUDEVENTS"));
    /// ```
    pub fn delete_stream(&self, stream: &str) -> bool {
        self.inner.streams.delete(stream)
    }

    /// Deletes one message from a stream; returns whether it was there.
    ///
    /// # Errors
    ///
    /// `StreamErrorKind::NotFound` when there is no such stream.
    ///
    /// # Examples
    ///
    /// ```
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// assert!(broker.delete_message("CLOUDEVENTS", 1).is_err());
    /// ```
    pub fn delete_message(&self, stream: &str, sequence: u64) -> Result<bool, StreamError> {
        self.inner.streams.delete_message(stream, sequence)
    }

    /// Publishes raw headers and payload on `subject` as a JetStream publish would: stored in
    /// the stream holding the subject (de-duplicated by `Nats-Msg-Id`), and seen by plain
    /// subscribers. Meant for tests that need a message the codec would not produce (an
    /// undecodable event, a foreign client's event).
    ///
    /// # Errors
    ///
    /// `StreamNotFound`, `TooLarge`, `Other` for an invalid subject.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::codec::HeaderMap;
    /// let broker = ce_messaging::memory::MemoryBroker::with_auto_streams();
    /// let _events = broker.event_connection(&ce_messaging::config::Config::default());
    /// let ack = broker.publish_raw("events.org.example.a", HeaderMap::new(), "not json".into())?;
    /// assert_eq!(ack.sequence, 1);
    /// # Ok::<(), ce_messaging::error::Error<ce_messaging::error::PublishErrorKind>>(())
    /// ```
    pub fn publish_raw(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PublishAck, Error<PublishErrorKind>> {
        if !bus::is_valid_publish_subject(subject) {
            return Err(Error::with_detail(
                PublishErrorKind::Other,
                format!("invalid subject {subject:?}"),
            ));
        }
        self.check_size(&headers, &payload)
            .map_err(|detail| Error::with_detail(PublishErrorKind::TooLarge, detail))?;
        self.js_publish(subject, headers, payload)
    }

    /// Sends raw headers and payload as a request on `subject` and returns the first reply's
    /// headers (empty when it had none) and payload, as they came. Meant for tests that need a
    /// request the codec would not produce (an undecodable one) or want to see the reply as it
    /// is on the wire.
    ///
    /// # Errors
    ///
    /// `NoResponders` at once when nobody listens on `subject`; `TimedOut`; `InvalidOptions`
    /// for an invalid subject; `Encode` when the message exceeds the max payload.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use ce_messaging::codec::HeaderMap;
    /// use ce_messaging::error::RequestErrorKind;
    /// let broker = ce_messaging::memory::MemoryBroker::new();
    /// let err = broker
    ///     .request_raw("org.example.op", HeaderMap::new(), "garbage".into(), std::time::Duration::from_secs(1))
    ///     .await
    ///     .unwrap_err();
    /// assert_eq!(err.kind(), RequestErrorKind::NoResponders);
    /// # }
    /// ```
    pub async fn request_raw(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        timeout: std::time::Duration,
    ) -> Result<(HeaderMap, Bytes), RequestError> {
        if !bus::is_valid_publish_subject(subject) {
            return Err(Error::with_detail(
                RequestErrorKind::InvalidOptions,
                format!("invalid subject {subject:?}"),
            ));
        }
        self.check_size(&headers, &payload)
            .map_err(|detail| Error::with_detail(RequestErrorKind::Encode, detail))?;
        let (inbox, mut replies) = bus::Inbox::single();
        let delivered = self.inner.bus.publish(BusMessage {
            subject: subject.to_owned(),
            headers: (!headers.is_empty()).then_some(headers),
            payload,
            reply: Some(inbox.clone()),
        });
        if delivered == 0 {
            return Err(Error::new(RequestErrorKind::NoResponders));
        }
        match tokio::time::timeout(timeout, replies.recv()).await {
            Ok(Some(RawReply::Message { headers, payload })) => {
                Ok((headers.unwrap_or_default(), payload))
            }
            Ok(Some(RawReply::NoResponders)) => Err(Error::new(RequestErrorKind::NoResponders)),
            Ok(None) => Err(Error::new(RequestErrorKind::ConnectionClosed)),
            Err(_) => Err(Error::with_detail(
                RequestErrorKind::TimedOut,
                format!("no reply within {timeout:?}"),
            )),
        }
    }

    /// Messages dropped because a subscription's queue was full (slow consumers).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::memory::MemoryBroker::new().dropped_messages(), 0);
    /// ```
    pub fn dropped_messages(&self) -> u64 {
        self.inner.bus.dropped()
    }

    /// Live subscriptions (listeners' ops, event-source subscriptions, open inboxes are not
    /// counted); 0 once every listener stopped.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::memory::MemoryBroker::new().subscription_count(), 0);
    /// ```
    pub fn subscription_count(&self) -> usize {
        self.inner.bus.subscription_count()
    }

    pub(crate) fn bus(&self) -> &Arc<Bus> {
        &self.inner.bus
    }

    pub(crate) fn streams(&self) -> &Streams {
        &self.inner.streams
    }

    /// Refuses a message larger than `max_payload`, counted as NATS counts it (headers and
    /// payload).
    pub(crate) fn check_size(&self, headers: &HeaderMap, payload: &Bytes) -> Result<(), String> {
        let size = headers_len(headers) + payload.len();
        let max = self.inner.options.max_payload;
        if size > max {
            Err(format!("message of {size} bytes exceeds max payload {max}"))
        } else {
            Ok(())
        }
    }

    /// Stores in the stream and, like a NATS server, also delivers to plain subscribers
    /// (event sources) whatever the stream said.
    pub(crate) fn js_publish(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PublishAck, Error<PublishErrorKind>> {
        let stored = self
            .inner
            .streams
            .publish(subject, headers.clone(), payload.clone());
        self.inner.bus.publish(BusMessage {
            subject: subject.to_owned(),
            headers: (!headers.is_empty()).then_some(headers),
            payload,
            reply: None,
        });
        stored
    }
}

/// The size of the headers as they go over the wire (`NATS/1.0\r\n`, `name: value\r\n` lines,
/// a blank line), 0 without headers.
pub(crate) fn headers_len(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            let name = name.to_string().len();
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

#[cfg(test)]
pub(crate) mod tests_support {
    use std::time::Duration;

    /// Waits until `condition` holds, checking after every scheduler turn and every
    /// millisecond; panics after 10 s.
    pub async fn eventually(mut condition: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not reached within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
