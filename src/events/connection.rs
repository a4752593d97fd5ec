//! The client side of persisted events: the [`EventConnection`] trait a backend implements and
//! the [`DurableInfo`] of its durable consumer.

use std::time::Duration;

use async_trait::async_trait;
use cloudevents::Event;

use crate::error::{Error, ListenError, ResponseError, ResponseErrorKind, StreamError};
use crate::event::{EventExt, EventType, TransactionId};
use crate::event_source::{EventResponsePromise, EventSource};
use crate::listener::Listener;

use super::{
    EventHandlers, EventListenOptions, PublishAck, PublishError, PublishOptions, ScheduleInfo,
};

/// The state of a durable consumer, for operators (`cemsg consumer info`), the same on every
/// backend ([`JetStreamEvents::consumer_info`](crate::jetstream::JetStreamEvents::consumer_info),
/// [`MemoryEvents::consumer_info`](crate::memory::MemoryEvents::consumer_info)).
///
/// Sequences are stream sequences of the events stream.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
/// let info = events.consumer_info("billing").await?;
/// println!("{} waiting, {} in handlers or awaiting redelivery, {} parked", info.pending, info.ack_pending, info.parked);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DurableInfo {
    /// The events stream.
    pub stream: String,
    /// The durable name.
    pub durable: String,
    /// The subjects it is filtered to (`<prefix>.<type>`, sorted).
    pub filter_subjects: Vec<String>,
    /// Stored events of its types never delivered yet.
    pub pending: u64,
    /// Delivered events neither acked nor terminated yet: in a handler, queued in a listener,
    /// or waiting for their redelivery.
    pub ack_pending: u64,
    /// Events delivered more than once and not settled (ack pending, or parked).
    pub redelivered: u64,
    /// Every event up to this stream sequence is settled (acked or terminated).
    pub ack_floor: u64,
    /// The highest stream sequence delivered so far.
    pub last_delivered: u64,
    /// Deliveries made in total (first deliveries and redeliveries).
    pub deliveries: u64,
    /// The broker's delivery limit of the consumer (the library's `NATS_JS_MAX_DELIVER` plus
    /// one, see the wire contract); 0 or less: unlimited.
    pub max_deliver: i64,
    /// Events that reached the broker's delivery limit without being settled: the broker will
    /// not deliver them again, and they are in no dead-letter stream. Should be 0. JetStream
    /// has no per-event view of this: it is `num_redelivered - num_ack_pending` of the
    /// consumer info (the server keeps the delivery count of an event it stopped delivering),
    /// a lower bound that is exact when nothing is ack pending. The memory backend counts them.
    pub parked: u64,
}

impl DurableInfo {
    /// How far the durable is behind: events of its types stored and not yet settled, i.e.
    /// never delivered ([`pending`](Self::pending)) plus delivered and not yet acked or
    /// terminated ([`ack_pending`](Self::ack_pending)).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: ce_messaging::jetstream::JetStreamEvents) -> Result<(), Box<dyn std::error::Error>> {
    /// let info = events.consumer_info("billing").await?;
    /// assert_eq!(info.lag(), info.pending + info.ack_pending);
    /// # Ok(()) }
    /// ```
    pub fn lag(&self) -> u64 {
        self.pending.saturating_add(self.ack_pending)
    }
}

/// Publishes persisted events and serves them.
///
/// Implemented by [`JetStreamEvents`](crate::jetstream::JetStreamEvents) and by the in-memory
/// backend. Write services against this trait.
///
/// # Examples
///
/// ```no_run
/// use ce_messaging::events::EventConnection;
/// use ce_messaging::cloudevent::new_event_auto_source;
///
/// async fn order_created(events: &dyn EventConnection) -> Result<(), Box<dyn std::error::Error>> {
///     let event = new_event_auto_source("org.example.order.created", &serde_json::json!({"id": 1}))?;
///     let ack = events.publish(event).await?;
///     println!("stored as #{} in {}", ack.sequence, ack.stream);
///     Ok(())
/// }
/// ```
#[async_trait]
pub trait EventConnection: Send + Sync {
    /// Publishes one event and returns after the server stored it.
    ///
    /// An empty or `AUTO_POPULATE` source is filled in with the client id. The event id is the
    /// de-duplication id: a retry of the same event within the duplicate window is reported
    /// as a duplicate, not stored twice. An event larger than the server accepts is refused
    /// before sending (`TooLarge`), and so is a type that breaks the subject-token rule
    /// (`InvalidType`, see [`check_type`](crate::event::check_type)). While the client is
    /// disconnected, a JetStream publish waits for the connection within its bounded time and
    /// then fails with `Disconnected`.
    async fn publish(&self, event: Event) -> Result<PublishAck, PublishError>;

    /// Publishes one event with [`PublishOptions`]: deferred (`At`, `After`), recurring
    /// (`Every`, `Cron`) and/or with a time-to-live. Returns after the server stored the
    /// schedule (or the event).
    ///
    /// A scheduled event is delivered as an ordinary event on its ordinary subject at each
    /// firing; its schedule id is the event id (list with [`schedules`](Self::schedules),
    /// cancel with [`cancel_schedule`](Self::cancel_schedule)). Each firing of a recurring
    /// schedule is handled with its own id, `<event id>@<time of the next firing>`
    /// ([`firing_id`](super::firing_id)). An event whose time-to-live passed is never given to
    /// a handler. Publishing the same scheduled event again replaces its schedule.
    ///
    /// # Errors
    ///
    /// Those of [`publish`](Self::publish), and `InvalidSchedule` (interval or time-to-live
    /// under 1 s, a cron expression that does not parse, an event id that is not one subject
    /// token) or `Unsupported` (the server is too old: the detail names the version needed;
    /// or the stream has the feature off: run `init_stream`). The default implementation
    /// (for backends without schedules) does plain publishes only.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: &dyn ce_messaging::events::EventConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// use ce_messaging::cloudevent::new_event_auto_source;
    /// use ce_messaging::events::PublishOptions;
    /// use std::time::Duration;
    ///
    /// let reminder = new_event_auto_source("org.example.invoice.reminder", &42)?;
    /// events.publish_with(reminder, PublishOptions::after(Duration::from_secs(3600))).await?;
    /// let quote = new_event_auto_source("org.example.quote.given", &101.5)?;
    /// events.publish_with(quote, PublishOptions::default().with_ttl(Duration::from_secs(30))).await?;
    /// # Ok(()) }
    /// ```
    async fn publish_with(
        &self,
        event: Event,
        options: PublishOptions,
    ) -> Result<PublishAck, PublishError> {
        if options.is_plain() {
            return self.publish(event).await;
        }
        Err(PublishError::from_error(
            Error::with_detail(
                crate::error::PublishErrorKind::Unsupported,
                "this backend publishes without schedules or time-to-live only",
            ),
            Some(event),
        ))
    }

    /// The schedules the events stream keeps (one-shot schedules until they fire, recurring
    /// ones until cancelled), ordered by id.
    ///
    /// # Errors
    ///
    /// `NotFound` when the events stream does not exist; `Other` when the server does not
    /// answer or the backend keeps no schedules.
    async fn schedules(&self) -> Result<Vec<ScheduleInfo>, StreamError> {
        Err(Error::with_detail(
            crate::error::StreamErrorKind::Other,
            "this backend keeps no schedules",
        ))
    }

    /// Cancels the schedule `id` (the id of the event it was published with): it fires no
    /// more. `Ok(false)` when there is no such schedule (never made, already fired, or
    /// cancelled).
    ///
    /// # Errors
    ///
    /// `NotFound` when the events stream does not exist; `Other` when the server does not
    /// answer or the backend keeps no schedules.
    async fn cancel_schedule(&self, id: &str) -> Result<bool, StreamError> {
        let _ = id;
        Err(Error::with_detail(
            crate::error::StreamErrorKind::Other,
            "this backend keeps no schedules",
        ))
    }

    /// Publishes many events pipelined (many in flight at once) and waits for every ack.
    /// The results are in the order of `events`.
    async fn publish_all(&self, events: Vec<Event>) -> Vec<Result<PublishAck, PublishError>>;

    /// Handles events of the given types on a durable consumer until the returned
    /// [`Listener`] is stopped.
    async fn listen(
        &self,
        handlers: EventHandlers,
        options: EventListenOptions,
    ) -> Result<Listener, ListenError>;

    /// Creates or updates the events stream and the dead-letter stream from the configuration.
    async fn init_stream(&self) -> Result<(), StreamError>;

    /// The state of durable consumer `durable` on this connection's events stream, for
    /// operators and health checks: its lag ([`DurableInfo::pending`], never delivered yet,
    /// and [`DurableInfo::lag`], not yet settled), what is in flight and what is parked.
    /// The same numbers on every backend.
    ///
    /// # Errors
    ///
    /// `StreamErrorKind::NotFound` when the stream or the durable does not exist; `Other`
    /// when the server does not answer.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: &dyn ce_messaging::events::EventConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// let info = events.consumer_info("billing").await?;
    /// println!("billing is {} events behind ({} never delivered)", info.lag(), info.pending);
    /// # Ok(()) }
    /// ```
    async fn consumer_info(&self, durable: &str) -> Result<DurableInfo, StreamError>;

    /// The dynamic listeners of this connection; promises are built on it.
    fn event_source(&self) -> EventSource;

    /// The default timeout of promises and publish acks (`NATS_EVENTS_TIMEOUT`).
    fn events_timeout(&self) -> Duration;

    /// Publishes `event` (giving it a transaction id if it has none) and returns a promise of
    /// the response events of `response_types` with the same transaction id. Listening starts
    /// before publishing, so a fast response is never missed.
    ///
    /// The promise carries the outcome of the publish
    /// ([`publish_ack`](EventResponsePromise::publish_ack)): a retried request whose event id
    /// was stored before reports `duplicate: true` there, instead of only timing out while
    /// waiting for a response that was sent for the first publish.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(events: &dyn ce_messaging::events::EventConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// use ce_messaging::cloudevent::{new_event_auto_source, EventType};
    /// let request = new_event_auto_source("org.example.quote.requested", &42)?;
    /// let mut promise = events.request(request, &[EventType::from("org.example.quote.given")]).await?;
    /// let response = promise.response(std::time::Duration::from_secs(5)).await?;
    /// println!("{response}");
    /// # Ok(()) }
    /// ```
    async fn request(
        &self,
        mut event: Event,
        response_types: &[EventType],
    ) -> Result<EventResponsePromise, ResponseError> {
        let tid = match event.transaction_id() {
            Some(tid) => tid,
            None => {
                let tid = TransactionId::generate();
                event.set_transaction_id(&tid);
                tid
            }
        };
        let promise = self
            .event_source()
            .promise(tid, response_types, self.events_timeout())
            .await?;
        let mut promise = promise;
        match self.publish(event).await {
            Ok(ack) => {
                promise.set_publish_ack(ack);
                Ok(promise)
            }
            Err(err) => {
                promise.close().await;
                Err(Error::with_source(ResponseErrorKind::Publish, err))
            }
        }
    }

    /// A promise of the response events of `response_types` with transaction id `tid`,
    /// without publishing anything.
    async fn wait_for_response(
        &self,
        tid: &TransactionId,
        response_types: &[EventType],
    ) -> Result<EventResponsePromise, ResponseError> {
        self.event_source()
            .promise(tid.clone(), response_types, self.events_timeout())
            .await
    }
}
