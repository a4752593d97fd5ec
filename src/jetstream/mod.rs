//! [`JetStreamEvents`]: the [`EventConnection`] over NATS JetStream.
//!
//! Thin glue between the shared events layer ([`crate::events`], [`crate::event_source`]) and
//! async-nats JetStream: streams (`streams.rs`), persisted publish with retry (`publish.rs`),
//! durable pull listeners and dead letters (`consume.rs`), and the core-NATS subscriptions
//! behind the [`EventSource`] (`source.rs`).
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use ce_messaging::config::Config;
//! use ce_messaging::cloudevent::new_event_auto_source;
//! use ce_messaging::events::EventConnection;
//! use ce_messaging::jetstream::JetStreamEvents;
//!
//! let events = JetStreamEvents::connect(&Config::from_env()?).await?;
//! events.init_stream().await?;
//! let ack = events.publish(new_event_auto_source("org.example.order.created", &1)?).await?;
//! println!("stored as #{}", ack.sequence);
//! events.close().await;
//! # Ok(()) }
//! ```

mod consume;
pub mod dead_letters;
mod publish;
mod source;
mod streams;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cloudevents::Event;

use crate::config::Config;
use crate::error::{ConnectError, Error, ListenError, StreamError, StreamErrorKind};
use crate::event_source::EventSource;
use crate::events::{
    DurableInfo, EventConnection, EventHandlers, EventListenOptions, PublishAck, PublishError,
    PublishOptions, ScheduleInfo,
};
use crate::listener::Listener;

pub use consume::original_msg_id;
pub(crate) use consume::{
    durable_in_use as durable_in_use_detail, type_list as consumer_type_list,
};
pub use publish::PublishRetry;

/// Persisted events over NATS JetStream: publish after the server stored the event, durable
/// pull listeners with ack / nak / dead letters, promises and a dynamic [`EventSource`].
///
/// Cheap to clone; clones share the connection and the event source.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(client: async_nats::Client) {
/// use ce_messaging::config::Config;
/// use ce_messaging::jetstream::JetStreamEvents;
/// let events = JetStreamEvents::from_client(client, &Config::default());
/// # let _ = events;
/// # }
/// ```
#[derive(Clone)]
pub struct JetStreamEvents {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) client: async_nats::Client,
    pub(crate) js: async_nats::jetstream::Context,
    pub(crate) config: Config,
    pub(crate) retry: PublishRetry,
    pub(crate) source: EventSource,
    /// The last type's subject, for single publishes (see [`publish::SubjectCache`]).
    pub(crate) subjects: publish::SubjectCache,
    /// The types published so far and their metric handles.
    pub(crate) known_types: crate::events::KnownTypes,
}

impl std::fmt::Debug for JetStreamEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamEvents")
            .field("client_id", &self.inner.config.client_id)
            .field("stream", &self.inner.config.js_stream)
            .field("retry", &self.inner.retry)
            .finish()
    }
}

impl JetStreamEvents {
    /// Connects with [`Config::connect`] and wraps the connection.
    ///
    /// # Errors
    ///
    /// The errors of [`Config::connect`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let events = ce_messaging::jetstream::JetStreamEvents::connect(&Default::default()).await?;
    /// # let _ = events; Ok(()) }
    /// ```
    pub async fn connect(config: &Config) -> Result<JetStreamEvents, ConnectError> {
        let client = config.connect().await?;
        Ok(Self::from_client(client, config))
    }

    /// Wraps an existing connection (which must be to a JetStream-enabled server).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: async_nats::Client) {
    /// let events = ce_messaging::jetstream::JetStreamEvents::from_client(client, &Default::default());
    /// # let _ = events; }
    /// ```
    pub fn from_client(client: async_nats::Client, config: &Config) -> JetStreamEvents {
        Self::build(client, config.clone(), PublishRetry::default())
    }

    fn build(client: async_nats::Client, config: Config, retry: PublishRetry) -> JetStreamEvents {
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(retry.attempt_timeout)
            .build(client.clone());
        let backend = source::CoreSubscriptions::new(client.clone(), &config);
        JetStreamEvents {
            inner: Arc::new(Inner {
                client,
                js,
                config,
                retry,
                source: EventSource::new(Arc::new(backend)),
                subjects: Default::default(),
                known_types: Default::default(),
            }),
        }
    }

    /// The same connection with another publish retry policy (a new event source; the old
    /// handle keeps its own).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) {
    /// use ce_messaging::jetstream::PublishRetry;
    /// use std::time::Duration;
    /// let events = events.with_publish_retry(PublishRetry {
    ///     attempt_timeout: Duration::from_secs(1),
    ///     ..Default::default()
    /// });
    /// # let _ = events; }
    /// ```
    #[must_use]
    pub fn with_publish_retry(&self, retry: PublishRetry) -> JetStreamEvents {
        Self::build(self.inner.client.clone(), self.inner.config.clone(), retry)
    }

    /// The configuration this connection was made with.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn demo(events: ce_messaging::jetstream::JetStreamEvents) {
    /// println!("stream {}", events.config().js_stream);
    /// # }
    /// ```
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Drains the connection (subscriptions end, buffered messages are sent) and closes it.
    /// Listeners on this connection then end and report; publishing fails with
    /// `ConnectionClosed`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) {
    /// events.close().await;
    /// # }
    /// ```
    pub async fn close(&self) {
        if let Err(err) = self.inner.client.drain().await {
            tracing::debug!(error = %err, "drain on close failed (already closed?)");
        }
    }

    /// The state of durable consumer `durable` on the events stream: pending, ack pending,
    /// redelivered, ack floor, last delivered, and the events parked at the server's delivery
    /// limit (see [`DurableInfo::parked`] for how that is computed).
    ///
    /// # Errors
    ///
    /// `StreamErrorKind::NotFound` when the stream or the durable does not exist, `Other` when
    /// the server does not answer.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
    /// let info = events.consumer_info("billing").await?;
    /// assert_eq!(info.parked, 0, "nothing parked");
    /// # Ok(()) }
    /// ```
    pub async fn consumer_info(&self, durable: &str) -> Result<DurableInfo, StreamError> {
        use async_nats::jetstream::context::ConsumerInfoErrorKind;
        use async_nats::jetstream::ErrorCode;
        let stream_name = &self.inner.config.js_stream;
        let not_found = |what: String| Error::with_detail(StreamErrorKind::NotFound, what);
        let stream = self
            .inner
            .js
            .get_stream_no_info(stream_name)
            .await
            .map_err(|err| {
                Error::with_source(StreamErrorKind::Other, err)
                    .detail(format!("stream {stream_name}"))
            })?;
        let info = match stream.consumer_info(durable).await {
            Ok(info) => info,
            Err(err) => {
                let stream_missing = std::error::Error::source(&err)
                    .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
                    .is_some_and(|e| e.error_code() == ErrorCode::STREAM_NOT_FOUND);
                return Err(if stream_missing {
                    not_found(format!("stream {stream_name} does not exist"))
                } else if err.kind() == ConsumerInfoErrorKind::NotFound {
                    not_found(format!(
                        "no durable consumer {durable} on stream {stream_name}"
                    ))
                } else {
                    Error::with_source(StreamErrorKind::Other, err)
                        .detail(format!("consumer info of {durable} on {stream_name}"))
                });
            }
        };
        let mut filter_subjects = if info.config.filter_subjects.is_empty() {
            vec![info.config.filter_subject.clone()]
        } else {
            info.config.filter_subjects.clone()
        };
        filter_subjects.retain(|s| !s.is_empty());
        filter_subjects.sort();
        let redelivered = info.num_redelivered as u64;
        let ack_pending = info.num_ack_pending as u64;
        let max_deliver = info.config.max_deliver;
        Ok(DurableInfo {
            stream: info.stream_name,
            durable: info.name,
            filter_subjects,
            pending: info.num_pending,
            ack_pending,
            redelivered,
            ack_floor: info.ack_floor.stream_sequence,
            last_delivered: info.delivered.stream_sequence,
            deliveries: info.delivered.consumer_sequence,
            max_deliver,
            parked: if max_deliver > 0 {
                redelivered.saturating_sub(ack_pending)
            } else {
                0
            },
        })
    }

    /// The events stream, without its info (`NotFound` when it does not exist).
    async fn events_stream(
        &self,
    ) -> Result<async_nats::jetstream::stream::Stream<()>, StreamError> {
        let name = &self.inner.config.js_stream;
        let stream = self.inner.js.get_stream_no_info(name).await.map_err(|e| {
            Error::with_source(StreamErrorKind::Other, e).detail(format!("stream {name}"))
        })?;
        Ok(stream)
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

#[async_trait]
impl EventConnection for JetStreamEvents {
    // Written out as `async_trait` expands it: an `async fn` here would keep a copy of the
    // event in the boxed future beside the one the publish holds (see `traced_publish`).
    fn publish<'life0, 'async_trait>(
        &'life0 self,
        event: Event,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<PublishAck, PublishError>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(crate::events::traced_publish(
            event,
            &self.inner.known_types,
            |event| publish::publish(&self.inner, event),
        ))
    }

    async fn publish_all(&self, events: Vec<Event>) -> Vec<Result<PublishAck, PublishError>> {
        crate::events::traced_publish_all(events, |events| {
            publish::publish_all(&self.inner, events)
        })
        .await
    }

    async fn publish_with(
        &self,
        event: Event,
        options: PublishOptions,
    ) -> Result<PublishAck, PublishError> {
        crate::events::traced_publish(event, &self.inner.known_types, |event| {
            publish::publish_with(&self.inner, event, &options)
        })
        .await
    }

    async fn schedules(&self) -> Result<Vec<ScheduleInfo>, StreamError> {
        use futures::TryStreamExt;
        let stream = self.events_stream().await?;
        let config = &self.inner.config;
        let prefix = crate::events::schedule_subject(&config.js_stream, "");
        let failed = |e: &dyn std::fmt::Display| {
            Error::with_detail(
                StreamErrorKind::Other,
                format!("listing the schedules of stream {}: {e}", config.js_stream),
            )
        };
        let mut subjects: Vec<String> = stream
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|e| failed(&e))?
            .map_ok(|(subject, _)| subject)
            .try_collect()
            .await
            .map_err(|e| failed(&e))?;
        subjects.sort();
        let mut schedules = Vec::with_capacity(subjects.len());
        for subject in subjects {
            // A one-shot schedule that fires between the listing and this read is gone: skip.
            let Ok(message) = stream.get_last_raw_message_by_subject(&subject).await else {
                continue;
            };
            if let Some(info) = ScheduleInfo::from_message(
                &prefix,
                &subject,
                Some(&message.headers),
                &message.payload,
            ) {
                schedules.push(info);
            }
        }
        Ok(schedules)
    }

    async fn cancel_schedule(&self, id: &str) -> Result<bool, StreamError> {
        if crate::events::schedule::check_schedule_id(id).is_err() {
            return Ok(false);
        }
        let stream = self.events_stream().await?;
        let subject = crate::events::schedule_subject(&self.inner.config.js_stream, id);
        let purged = stream.purge().filter(subject.as_str()).await.map_err(|e| {
            Error::with_source(StreamErrorKind::Other, e)
                .detail(format!("cancelling schedule {id}"))
        })?;
        Ok(purged.purged > 0)
    }

    async fn listen(
        &self,
        handlers: EventHandlers,
        options: EventListenOptions,
    ) -> Result<Listener, ListenError> {
        consume::listen(self, handlers, options).await
    }

    async fn init_stream(&self) -> Result<(), StreamError> {
        let version = self.inner.client.server_info().version;
        streams::init_streams(&self.inner.js, &self.inner.config, &version).await
    }

    async fn consumer_info(&self, durable: &str) -> Result<DurableInfo, StreamError> {
        JetStreamEvents::consumer_info(self, durable).await
    }

    fn event_source(&self) -> EventSource {
        self.inner.source.clone()
    }

    fn events_timeout(&self) -> Duration {
        self.inner.config.events_timeout
    }
}

/// Whether the client is closed for good (drained, or out of reconnect attempts), as opposed
/// to disconnected and reconnecting. A closed client refuses commands at once; a reconnecting
/// one queues them, so a short flush that neither fails nor finishes means "reconnecting".
pub(crate) async fn client_closed(client: &async_nats::Client) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(200), client.flush()).await,
        Ok(Err(_))
    )
}
