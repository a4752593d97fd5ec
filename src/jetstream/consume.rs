//! Durable listeners: the pull consumer, the intake loop that pulls no more than the worker
//! pool can hold, acking through the shared delivery processing
//! ([`process_delivery`](crate::events)), and dead letters published to the dead-letter stream.
//!
//! Consumer: durable (`NATS_DURABLE_NAME` or the listen options), filtered to the subjects of
//! the handled types, explicit ack, ack wait, and the delivery limits of [`delivery_limits`]:
//! **no server-side max deliver** (the library enforces it, so nothing is parked by the
//! server) and max ack pending = the listener's window (workers + buffer).
//!
//! Intake: one subscription on a private inbox for the listener's life; pull requests for as
//! many messages as the listener's [`DeliveryWindow`] has free places (waiting for at least
//! half the read-ahead), that expire after [`PULL_EXPIRES`], with idle heartbeats so a request
//! lost with its server (restart, failover) is noticed within [`PULL_HEARTBEAT`] × 3 and made
//! again. On stop no new request is made, but the subscription stays open until the request
//! still open at the server has ended (its 408, a full batch, or its expiry plus a margin):
//! the server may fill it after the stop, and what it sends then has a place in the window and
//! is run within the grace period like everything else received (a hand-back would spend a
//! delivery). One still queued for a worker when the grace period ran out is dropped
//! unsettled: its acker naks it, and the stop waits until every acker is gone and its nak
//! handed to the client, then flushes, before it returns (a connection closed right after the
//! stop, as by [`Shutdown`](crate::shutdown::Shutdown), loses no hand-back). Pull requests are kept short ([`PULL_EXPIRES`]) so that this
//! wait is short too. When the connection closes for good, the listener ends and reports.
//!
//! A consumer deleted under a running listener (409 on the pull request, or requests that go
//! unanswered) is recreated with the same configuration, as users of a durable listener
//! expect.
//!
//! Dead letters are built by the shared processing (`dead_letter_record` in `events.rs`): the
//! original payload and headers without the server's `Nats-*` directives, the `Dead-Letter-*`
//! headers, and, when that would exceed the server's max payload (from its INFO), a reference
//! record instead. `Nats-Msg-Id` is a directive to the server that stores the message, and the
//! dead-letter stream de-duplicates on it. Kept as is, two services dead-lettering the same
//! event would collide (the second dead letter would be reported as a duplicate and not
//! stored). So a dead letter carries `Nats-Msg-Id: <original id>.dlq.<durable>` (see
//! [`dead_letter_msg_id`](crate::events::dead_letter_msg_id)): re-dead-lettering by the same
//! durable (a term that got lost) is still de-duplicated, other durables' dead letters are
//! not, and the original id is the part before the last `.dlq.` ([`original_msg_id`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{BatchConfig, Config as PullConfig};
use async_nats::jetstream::consumer::{AckPolicy, Consumer, DeliverPolicy};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::context::PublishErrorKind as JsPublishErrorKind;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use async_nats::jetstream::ErrorCode;
use async_nats::{HeaderMap, StatusCode, Subject};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

use crate::config::StartPosition;
use crate::error::{BoxError, Error, ListenError, ListenErrorKind};
use crate::events::{
    level_subjects, priority_durable, start_delivery_pool, Acker, DeadLetterPublishError,
    DeadLetterSink, Delivery, DeliveryContext, EventConnection, EventHandlers, EventListenOptions,
};
use crate::listener::Listener;
use crate::worker::{DeliveryWindow, Reserved, Submitter, WorkContext};

use super::streams::STREAM_NOT_FOUND_CODE;
use super::{client_closed, JetStreamEvents};

/// How long one pull request waits on the server for messages. Short, because a stopping
/// listener waits for its open request to end.
pub(crate) const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// Extra time given to a pull request's end (408) to arrive before a new request is made.
const PULL_MARGIN: Duration = Duration::from_secs(1);
/// The server sends an idle heartbeat this often while a pull request waits; three missed
/// ones mean the request is gone.
pub(crate) const PULL_HEARTBEAT: Duration = Duration::from_millis(500);
/// Pause after a failed pull request before the next one.
const PULL_RETRY_PAUSE: Duration = Duration::from_millis(250);
/// How long the check whether the consumer still exists (after a pull request was lost or
/// ended badly) may hold back the next request; it runs within the [`PULL_RETRY_PAUSE`]
/// before that request. During a failover a clustered consumer has no leader, and an info
/// request sent then is never answered (not even once a leader is elected): waiting the
/// JetStream API timeout (5 s by default) delayed the first pull to the new leader by up to
/// that much (p99 lateness 1.1-5.1 s after a failover, fault scenario 14). A check not answered in time counts as
/// "still there"; a pull to a consumer without a leader ends at once (503 no responders), so
/// a listener asks about four times a second until a leader is elected.
const CONSUMER_CHECK_TIMEOUT: Duration = PULL_RETRY_PAUSE;
/// How long a stop waits for the drained subscription and for acks to be flushed.
const STOP_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The original message id behind a dead letter's `Nats-Msg-Id` (the part before the last
/// `.dlq.`), e.g. to build the replay id `<original>.replay.<dead-letter seq>`.
///
/// # Examples
///
/// ```
/// use ce_messaging::jetstream::original_msg_id;
/// assert_eq!(original_msg_id("cloudevent-abc.dlq.billing"), "cloudevent-abc");
/// assert_eq!(original_msg_id("not-a-dead-letter-id"), "not-a-dead-letter-id");
/// ```
pub fn original_msg_id(dead_letter_msg_id: &str) -> &str {
    dead_letter_msg_id
        .rsplit_once(".dlq.")
        .map_or(dead_letter_msg_id, |(original, _)| original)
}

fn valid_durable(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
}

pub(crate) async fn listen(
    events: &JetStreamEvents,
    handlers: EventHandlers,
    options: EventListenOptions,
) -> Result<Listener, ListenError> {
    options.validate(&handlers)?;
    let inner = events.inner();
    let config = &inner.config;
    let durable = options
        .durable_name
        .clone()
        .unwrap_or_else(|| config.durable_name().to_owned());
    if !valid_durable(&durable) {
        return Err(Error::with_detail(
            ListenErrorKind::InvalidOptions,
            format!("durable name {durable:?} must be non-empty without whitespace, '.', '*', '>', '/' or '\\'"),
        ));
    }
    let max_deliver = options.max_deliver.unwrap_or(config.js_max_deliver);
    let ack_wait = options.ack_wait.unwrap_or(config.js_ack_wait);
    if ack_wait.is_zero() {
        return Err(Error::with_detail(
            ListenErrorKind::InvalidOptions,
            "ack wait must be more than zero",
        ));
    }
    let levels = config.js_priority_levels.max(1);
    let types: Vec<&str> = handlers.types().collect();
    // The filter subjects of each level's consumer, highest level first (one level with
    // priorities off: `<prefix>.<type>`), and all of them (what presence reports).
    let level_subjects = level_subjects(&config.js_subject_prefix, &types, levels);
    let mut subjects: Vec<String> = level_subjects.concat();
    subjects.sort();
    let window = DeliveryWindow::new(options.window());

    let stream = inner
        .js
        .get_stream(&config.js_stream)
        .await
        .map_err(|err| {
            let not_found = matches!(err.kind(),
                async_nats::jetstream::context::GetStreamErrorKind::JetStream(e)
                    if e.error_code().0 == STREAM_NOT_FOUND_CODE);
            let kind = if not_found {
                ListenErrorKind::StreamNotFound
            } else {
                ListenErrorKind::Consumer
            };
            Error::with_source(kind, err).detail(format!(
                "stream {} (create it with init_stream / `cemsg stream init`)",
                config.js_stream
            ))
        })?;
    let presence = presence_subject(&config.js_stream, &durable);
    check_durable_types(
        &inner.client,
        &presence,
        &stream,
        &durable,
        (
            &subjects,
            level_subjects.last().map_or(&[][..], Vec::as_slice),
        ),
        &config.js_subject_prefix,
    )
    .await?;
    let start = options
        .start_position
        .or(config.js_start_position)
        .unwrap_or_default();
    let mut consumers = Vec::with_capacity(level_subjects.len());
    for (level, filter) in (0u8..).zip(&level_subjects) {
        let name = priority_durable(&durable, level, levels);
        let deliver_policy = start_policy(&stream, &name, start).await?;
        let consumer_config = PullConfig {
            durable_name: Some(name.clone()),
            description: Some(if name == durable {
                format!("ce-messaging listener {durable}")
            } else {
                format!("ce-messaging listener {durable}, priority {level}")
            }),
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            // Delivery limits (see `delivery_limits`): set below.
            max_deliver: -1,
            filter_subject: if filter.len() == 1 {
                filter[0].clone()
            } else {
                String::new()
            },
            filter_subjects: if filter.len() > 1 {
                filter.clone()
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let consumer_config = delivery_limits(consumer_config, &window);
        let consumer: Consumer<PullConfig> = stream
            .create_consumer(consumer_config.clone())
            .await
            .map_err(|err| {
                Error::with_source(ListenErrorKind::Consumer, err)
                    .detail(format!("durable consumer {name} on {}", config.js_stream))
            })?;
        consumers.push(Level {
            consumer,
            config: consumer_config,
            name,
        });
    }

    let inbox = inner.client.new_inbox();
    let subscriber = inner
        .client
        .subscribe(format!("{inbox}.*"))
        .await
        .map_err(|err| Error::with_source(ListenErrorKind::Subscribe, err))?;

    let dead_letters = Arc::new(JetStreamDeadLetters {
        js: inner.js.clone(),
        client: inner.client.clone(),
        subject: format!("deadletter.{}.{durable}", config.js_stream),
        events_stream: config.js_stream.clone(),
        durable: durable.clone(),
    });
    let connection: Arc<dyn EventConnection> = Arc::new(events.clone());
    let ctx = Arc::new(DeliveryContext {
        handlers,
        max_deliver,
        ack_wait,
        handler_timeout: options.handler_timeout.unwrap_or(config.js_handler_timeout),
        backoff: options.backoff,
        dead_letters,
        connection,
        source: config.client_id.as_str().into(),
    });
    let token = CancellationToken::new();
    let pool = start_delivery_pool(options.pool.workers, &window, token.child_token(), ctx);
    let ackers = Arc::new(AckerShared {
        client: inner.client.clone(),
        work: pool.context(),
        live: TaskTracker::new(),
    });
    serve_presence(
        &inner.client,
        presence,
        &subjects,
        pool.context().stopping.clone(),
        token.clone(),
    )
    .await;
    let intake = Intake {
        levels: consumers,
        stream,
        open: Vec::new(),
        requests: 0,
        received: 0,
        filled: None,
        subscriber,
        inbox,
        window,
        threshold: options.pull_threshold(),
        submitter: pool.submitter(),
        work: pool.context(),
        ackers: ackers.clone(),
        listener_token: token.clone(),
        client: inner.client.clone(),
        durable: durable.clone(),
    };
    pool.spawn_intake(intake.run());
    tracing::info!(durable = %durable, subjects = ?subjects, workers = options.pool.workers, priority_levels = levels, "event listener started");
    let client = inner.client.clone();
    Ok(Listener::supervise_then(
        pool,
        options.pool.grace,
        token,
        move || {
            async move {
            // Every worker and the intake have ended, but deliveries dropped unsettled (those
            // still queued when the grace period ran out) nak from their acker's drop, in a
            // task of its own; and the window's keep-alive may still hold an acker for a
            // moment. Wait until every acker is gone and every such nak was handed to the
            // client, or the flush below would miss them and a connection closed right
            // after the stop (`Shutdown`) would lose them: the events would come back only
            // after the ack wait.
            ackers.live.close();
            if tokio::time::timeout(STOP_FLUSH_TIMEOUT, ackers.live.wait())
                .await
                .is_err()
            {
                tracing::warn!(unsettled = ackers.live.len(), "deliveries still held {STOP_FLUSH_TIMEOUT:?} after the stop; the server redelivers them after the ack wait");
            }
            // Acks and naks are fire-and-forget publishes: make sure they left the client.
            if tokio::time::timeout(STOP_FLUSH_TIMEOUT, client.flush())
                .await
                .is_err()
            {
                tracing::warn!("acks not flushed within {STOP_FLUSH_TIMEOUT:?}; the server redelivers what it did not get after the ack wait");
            }
        }
        .boxed()
        },
    ))
}

/// The deliver policy to create or update durable `durable` with: an existing durable's own
/// (its position is kept; JetStream refuses to change the policy of a consumer anyway), else
/// the one of `start`.
async fn start_policy(
    stream: &async_nats::jetstream::stream::Stream,
    durable: &str,
    start: StartPosition,
) -> Result<DeliverPolicy, ListenError> {
    match stream.consumer_info(durable).await {
        Ok(info) => return Ok(info.config.deliver_policy),
        Err(err) if err.kind() == ConsumerInfoErrorKind::NotFound => {}
        Err(err) => {
            return Err(Error::with_source(ListenErrorKind::Consumer, err)
                .detail(format!("looking up durable consumer {durable}")))
        }
    }
    Ok(match start {
        StartPosition::New => DeliverPolicy::New,
        StartPosition::Sequence(start_sequence) => {
            DeliverPolicy::ByStartSequence { start_sequence }
        }
        StartPosition::Time(at) => {
            let nanos = at.timestamp_nanos_opt().map(i128::from);
            let start_time = nanos
                .and_then(|n| time::OffsetDateTime::from_unix_timestamp_nanos(n).ok())
                .ok_or_else(|| {
                    Error::with_detail(
                        ListenErrorKind::InvalidOptions,
                        format!("start time {at} is out of range"),
                    )
                })?;
            DeliverPolicy::ByStartTime { start_time }
        }
        StartPosition::All => DeliverPolicy::All,
    })
}

/// How long a starting listener waits for the running instances of its durable to say which
/// types they handle (they answer at once; nobody running is a "no responders" at once).
const PRESENCE_TIMEOUT: Duration = Duration::from_secs(1);

/// The core NATS subject on which the running listeners of a durable say which filter subjects
/// (types) they listen with: `_CE_DURABLE.<events stream>.<durable>`.
pub(crate) fn presence_subject(stream: &str, durable: &str) -> String {
    format!("_CE_DURABLE.{stream}.{durable}")
}

/// The filter subjects the running instances of a durable listen with, if one answers on its
/// presence subject; `None` when none answers (none runs, or presence is not permitted).
async fn live_filter(client: &async_nats::Client, presence: &str) -> Option<Vec<String>> {
    let asked = tokio::time::timeout(
        PRESENCE_TIMEOUT,
        client.request(presence.to_owned(), Bytes::new()),
    )
    .await;
    match asked {
        Ok(Ok(reply)) => serde_json::from_slice(&reply.payload).ok(),
        _ => None,
    }
}

/// Answers on the durable's presence subject with this listener's filter subjects until the
/// listener stops pulling (or ends). Subscribed (and flushed) before `listen` returns, so a
/// listener of another type set started afterwards sees this one.
async fn serve_presence(
    client: &async_nats::Client,
    presence: String,
    subjects: &[String],
    stopping: CancellationToken,
    ended: CancellationToken,
) {
    let mut subscription = match client.subscribe(presence.clone()).await {
        Ok(subscription) => subscription,
        Err(err) => {
            tracing::warn!(subject = %presence, error = %err, "presence subscription failed; other type sets on this durable are only told apart by the consumer's pull requests");
            return;
        }
    };
    if tokio::time::timeout(PRESENCE_TIMEOUT, client.flush())
        .await
        .is_err()
    {
        tracing::debug!(subject = %presence, "presence subscription not flushed in time");
    }
    let answer = Bytes::from(serde_json::to_vec(subjects).unwrap_or_default());
    let client = client.clone();
    tokio::spawn(async move {
        loop {
            let asked = tokio::select! {
                _ = stopping.cancelled() => break,
                _ = ended.cancelled() => break,
                asked = subscription.next() => asked,
            };
            let Some(asked) = asked else { break };
            if let Some(reply) = asked.reply {
                if let Err(err) = client.publish(reply, answer.clone()).await {
                    tracing::debug!(error = %err, "presence answer failed");
                }
            }
        }
        if let Err(err) = subscription.unsubscribe().await {
            tracing::debug!(error = %err, "presence unsubscribe failed");
        }
    });
}

/// The rule "one durable, one type set": instances of a durable share its consumer, whose
/// filter is the subjects of their types, so two instances with different types would
/// overwrite each other's filter and one would stop getting its events. A listener whose
/// types differ from those of a running instance of its durable is therefore refused
/// ([`ListenErrorKind::DurableInUse`]). Running instances are found by asking on the durable's
/// presence subject (each running listener answers with its filter), and, should nobody
/// answer (presence not permitted), by the consumer having pull requests waiting. When no
/// instance runs (every one stopped: a restart or deploy with a changed type set), the new
/// types take the durable over and its filter is updated.
async fn check_durable_types(
    client: &async_nats::Client,
    presence: &str,
    stream: &async_nats::jetstream::stream::Stream,
    durable: &str,
    (subjects, lowest): (&[String], &[String]),
    prefix: &str,
) -> Result<(), ListenError> {
    let types = |subjects: &[String]| type_list(subjects, prefix);
    if let Some(mut theirs) = live_filter(client, presence).await {
        theirs.sort();
        if theirs == subjects {
            return Ok(());
        }
        return Err(Error::with_detail(
            ListenErrorKind::DurableInUse,
            durable_in_use(durable, &types(&theirs), &types(subjects)),
        ));
    }
    let info = match stream.consumer_info(durable).await {
        Ok(info) => info,
        Err(err) if err.kind() == ConsumerInfoErrorKind::NotFound => return Ok(()),
        Err(err) => {
            return Err(Error::with_source(ListenErrorKind::Consumer, err)
                .detail(format!("looking up durable consumer {durable}")))
        }
    };
    let mut existing = if info.config.filter_subjects.is_empty() {
        vec![info.config.filter_subject.clone()]
    } else {
        info.config.filter_subjects.clone()
    };
    existing.retain(|s| !s.is_empty());
    existing.sort();
    // The durable's own consumer serves the lowest priority level (the only one with
    // priorities off).
    if existing == lowest {
        return Ok(());
    }
    if info.num_waiting > 0 {
        return Err(Error::with_detail(
            ListenErrorKind::DurableInUse,
            durable_in_use(durable, &types(&existing), &types(lowest)),
        ));
    }
    tracing::info!(durable, from = %types(&existing), to = %types(lowest), "no instance runs on the durable: its event types change");
    Ok(())
}

/// The event types of a consumer's filter subjects, for messages: `[a, b]` (`[every type]` for
/// an unfiltered consumer).
pub(crate) fn type_list(subjects: &[String], prefix: &str) -> String {
    if subjects.is_empty() {
        return "[every type]".to_owned();
    }
    let prefix = format!("{prefix}.");
    let types: Vec<&str> = subjects
        .iter()
        .map(|s| s.strip_prefix(&prefix).unwrap_or(s))
        .collect();
    format!("[{}]", types.join(", "))
}

/// The detail of a [`ListenErrorKind::DurableInUse`] error.
pub(crate) fn durable_in_use(durable: &str, theirs: &str, mine: &str) -> String {
    format!(
        "durable {durable} is in use by a listener of event types {theirs}; this listener handles {mine}. Instances of one durable must handle the same types: stop the other instances first (the durable then takes the new types), or give this listener its own durable name"
    )
}

/// One priority level's durable consumer (the only one with priorities off).
struct Level {
    consumer: Consumer<PullConfig>,
    /// The configuration it was made from, to recreate it when deleted.
    config: PullConfig,
    /// Its durable name, as the ack subjects of its messages carry it.
    name: String,
}

struct Intake {
    /// The consumers, highest priority first (one with priorities off).
    levels: Vec<Level>,
    /// The stream the consumers were made on, to recreate one when deleted.
    stream: async_nats::jetstream::stream::Stream,
    /// The pull requests the server may still be filling, oldest first (with priorities off
    /// at most one; with priorities on at most one per level, plus the request being read).
    open: Vec<OpenPull>,
    /// Pull requests made so far (numbers their reply subjects).
    requests: u64,
    /// Data messages received so far.
    received: u64,
    /// The reply subject of the last request closed because its batch was full.
    filled: Option<String>,
    subscriber: async_nats::Subscriber,
    inbox: String,
    /// Places for deliveries; a pull asks for as many events as it reserved.
    window: DeliveryWindow,
    /// Free places a pull waits for before asking.
    threshold: usize,
    submitter: Submitter<Delivery>,
    work: WorkContext,
    /// Shared by the deliveries' ackers.
    ackers: Arc<AckerShared>,
    listener_token: CancellationToken,
    client: async_nats::Client,
    durable: String,
}

/// A pull request sent and not yet ended.
struct OpenPull {
    /// The level (index into `Intake::levels`) of the consumer it was sent to.
    level: usize,
    reply: String,
    /// Places reserved for the messages the server may still send for it (as many as it
    /// asked for); what is unused goes back to the window when the request ends.
    reserved: Reserved,
    /// When the server ends it at the latest (plus a margin for the 408 to arrive).
    deadline: Instant,
    /// When the server last showed that it holds the request (sent, heartbeat, message).
    heard: Instant,
}

impl OpenPull {
    /// When the request counts as lost: its deadline, or three missed heartbeats.
    fn lost_at(&self) -> Instant {
        self.deadline.min(self.heard + PULL_HEARTBEAT * 3)
    }
}

/// How reading pull requests ended.
enum PullEnd {
    /// Ask again.
    Next,
    /// A request (to the consumer of this level) went unanswered (no message, heartbeat or
    /// end in time): ask again, after checking that the consumer still exists.
    Lost(usize),
    /// The server ended a request (to the consumer of this level) with an unexpected status
    /// (e.g. 409 consumer deleted).
    Ended(usize),
    /// The listener is stopping.
    Stopping,
    /// The connection is closed for good.
    Closed,
}

/// What [`Intake::read`] reads until.
enum Until<'a> {
    /// The request with this reply subject has ended.
    Ended(&'a str),
    /// A data message arrived, or no request is open any more.
    AnyData,
}

impl Intake {
    async fn run(mut self) {
        let end = loop {
            if self.work.stopping.is_cancelled() {
                break PullEnd::Stopping;
            }
            // Ask only for events there is room for.
            let reserved = tokio::select! {
                biased;
                _ = self.work.stopping.cancelled() => break PullEnd::Stopping,
                reserved = self.window.reserve(self.threshold) => reserved,
            };
            let end = if self.levels.len() == 1 {
                match self.send_pull(0, reserved, true).await {
                    Ok(reply) => self.read(Until::Ended(&reply)).await,
                    Err(end) => end,
                }
            } else {
                self.pull_by_priority(reserved).await
            };
            match end {
                PullEnd::Next => {}
                PullEnd::Lost(level) | PullEnd::Ended(level) => {
                    if self.recreate_if_deleted(level).await {
                        break PullEnd::Stopping;
                    }
                }
                end => break end,
            }
        };
        match end {
            PullEnd::Closed => {
                tracing::warn!(durable = %self.durable, "connection closed; event listener ends");
                self.listener_token.cancel();
            }
            _ => self.hand_back_rest().await,
        }
    }

    /// Sends a pull request to the consumer of `level` for as many messages as `reserved`
    /// holds places: waiting up to [`PULL_EXPIRES`] for them (`wait`), or only for what is
    /// stored now (no-wait: the server ends it at once when nothing more is waiting). Its
    /// reply subject, or how the intake must go on when it could not be sent.
    async fn send_pull(
        &mut self,
        level: usize,
        reserved: Reserved,
        wait: bool,
    ) -> Result<String, PullEnd> {
        self.requests += 1;
        let reply = format!("{}.{}", self.inbox, self.requests);
        let batch = reserved.count();
        let pull = if wait {
            BatchConfig {
                batch,
                expires: Some(PULL_EXPIRES),
                idle_heartbeat: PULL_HEARTBEAT,
                ..Default::default()
            }
        } else {
            BatchConfig {
                batch,
                no_wait: true,
                ..Default::default()
            }
        };
        let sent = Instant::now();
        if let Err(err) = self.levels[level]
            .consumer
            .request_batch(pull, Subject::from(reply.as_str()))
            .await
        {
            if client_closed(&self.client).await {
                return Err(PullEnd::Closed);
            }
            tracing::warn!(durable = %self.durable, error = %err, "pull request failed; retrying");
            if self.pause(PULL_RETRY_PAUSE).await {
                return Err(PullEnd::Stopping);
            }
            return Err(PullEnd::Next);
        }
        self.open.push(OpenPull {
            level,
            reply: reply.clone(),
            reserved,
            deadline: sent + PULL_EXPIRES + PULL_MARGIN,
            heard: sent,
        });
        Ok(reply)
    }

    /// One round with priorities on (strict priority): no-wait pulls level by level, highest
    /// first, each for the places still free, so a level is asked only after every higher
    /// one said it has nothing more waiting. A level that filled every place it asked for
    /// ends the round (the next starts again at the highest level). When no level had
    /// anything, waits on every level at once (one place each) until something arrives.
    async fn pull_by_priority(&mut self, reserved: Reserved) -> PullEnd {
        let before = self.received;
        let mut reserved = Some(reserved);
        for level in 0..self.levels.len() {
            let places = match reserved.take() {
                Some(places) => places,
                None => self.window.try_reserve(),
            };
            if places.count() == 0 {
                // The window is full: the next round waits for places.
                return PullEnd::Next;
            }
            let reply = match self.send_pull(level, places, false).await {
                Ok(reply) => reply,
                Err(end) => return end,
            };
            match self.read(Until::Ended(&reply)).await {
                PullEnd::Next => {}
                end => return end,
            }
            if self.filled.as_deref() == Some(reply.as_str()) {
                // More may be waiting at this level, and meanwhile at higher ones.
                return PullEnd::Next;
            }
        }
        if self.received > before {
            return PullEnd::Next;
        }
        // Nothing is waiting at any level: wait on each (that has no request open) at once,
        // one place each. A listener with fewer places (workers + buffer) than levels waits
        // on the highest levels it has places for; the others are asked again when those
        // waits end (within PULL_EXPIRES).
        let idle: Vec<usize> = (0..self.levels.len())
            .filter(|level| !self.open.iter().any(|open| open.level == *level))
            .collect();
        if !idle.is_empty() {
            let mut places = tokio::select! {
                biased;
                _ = self.work.stopping.cancelled() => return PullEnd::Stopping,
                places = self.window.reserve(idle.len()) => places,
            };
            for level in idle {
                let one = places.split(1);
                if one.count() == 0 {
                    break;
                }
                if let Err(end) = self.send_pull(level, one, true).await {
                    return end;
                }
            }
        }
        self.read(Until::AnyData).await
    }

    /// Waits `pause`; true when the listener began to stop meanwhile.
    async fn pause(&self, pause: Duration) -> bool {
        tokio::select! {
            _ = self.work.stopping.cancelled() => true,
            _ = tokio::time::sleep(pause) => false,
        }
    }

    /// After a request to the consumer of `level` ended badly: recreates the consumer (same
    /// configuration) when it no longer exists, else pauses before the next request (the
    /// check, at most [`CONSUMER_CHECK_TIMEOUT`], is part of the pause). True when the
    /// listener began to stop meanwhile.
    async fn recreate_if_deleted(&mut self, level: usize) -> bool {
        let next_request = Instant::now() + PULL_RETRY_PAUSE;
        let check = self.levels[level].consumer.get_info();
        let lookup = tokio::select! {
            _ = self.work.stopping.cancelled() => return true,
            lookup = tokio::time::timeout(CONSUMER_CHECK_TIMEOUT, check) => lookup,
        };
        let Ok(lookup) = lookup else {
            tracing::debug!(durable = %self.levels[level].name, "consumer info not answered in time (no leader?); pulling again");
            return self.work.stopping.is_cancelled();
        };
        match lookup {
            Ok(_) => {}
            Err(err) if err.kind() == ConsumerInfoErrorKind::NotFound => {
                let config = self.levels[level].config.clone();
                let created = tokio::select! {
                    _ = self.work.stopping.cancelled() => return true,
                    created = self.stream.create_consumer(config) => created,
                };
                match created {
                    Ok(consumer) => {
                        tracing::warn!(durable = %self.levels[level].name, "durable consumer was deleted; recreated it with the same configuration");
                        self.levels[level].consumer = consumer;
                        return false;
                    }
                    Err(err) => {
                        tracing::warn!(durable = %self.levels[level].name, error = %err, "durable consumer was deleted and could not be recreated; retrying");
                    }
                }
            }
            Err(err) => {
                tracing::debug!(durable = %self.levels[level].name, error = %err, "consumer info failed");
            }
        }
        self.pause(next_request.saturating_duration_since(Instant::now()))
            .await
    }

    /// Reads the messages of the open pull requests until `until` holds or a request ends
    /// badly.
    async fn read(&mut self, until: Until<'_>) -> PullEnd {
        loop {
            let done = match until {
                Until::Ended(reply) => !self.open.iter().any(|open| open.reply == reply),
                Until::AnyData => self.open.is_empty(),
            };
            let Some(limit) = self.open.iter().map(OpenPull::lost_at).min() else {
                return PullEnd::Next;
            };
            if done {
                return PullEnd::Next;
            }
            if self.work.stopping.is_cancelled() {
                return PullEnd::Stopping;
            }
            // A message already received is taken without a timer or a cancellation future
            // (what the wait below builds and drops per message).
            let next = match self.subscriber.next().now_or_never() {
                Some(next) => Ok(next),
                None => tokio::select! {
                    biased;
                    _ = self.work.stopping.cancelled() => return PullEnd::Stopping,
                    next = tokio::time::timeout_at(limit, self.subscriber.next()) => next,
                },
            };
            let message = match next {
                // No message, heartbeat or end of a request in time: it got lost (e.g. the
                // server restarted, or the consumer is gone). Ask again.
                Err(_) => {
                    let now = Instant::now();
                    let mut lost = None;
                    self.open.retain(|open| {
                        let alive = open.lost_at() > now;
                        if !alive {
                            lost = Some(open.level);
                        }
                        alive
                    });
                    match lost {
                        Some(level) => return PullEnd::Lost(level),
                        None => continue,
                    }
                }
                Ok(None) => return PullEnd::Closed,
                Ok(Some(message)) => message,
            };
            match self.note(&message) {
                Some(Note::Data) => {
                    if let Some(delivery) = self.delivery(message).await {
                        // The window made room for it: queueing does not wait. Refused only
                        // when the workers are gone (dropped: its acker hands it back).
                        if self.submitter.submit_draining(delivery).await.is_err() {
                            return PullEnd::Stopping;
                        }
                    }
                    if matches!(until, Until::AnyData) {
                        return PullEnd::Next;
                    }
                }
                // 408 expired and 404 nothing (more) end a request normally; 409 terminated
                // (consumer deleted, leader change, ...) and others do not.
                Some(Note::End(level, status))
                    if status != StatusCode::TIMEOUT && status != StatusCode::NOT_FOUND =>
                {
                    // 503 no responders: the consumer has no leader right now (a failover;
                    // asked again four times a second until one is elected) or is gone.
                    if status == StatusCode::NO_RESPONDERS {
                        tracing::debug!(durable = %self.durable, "pull request not answered (no consumer leader?)");
                    } else {
                        tracing::warn!(durable = %self.durable, %status, description = ?message.description, "pull request ended");
                    }
                    return PullEnd::Ended(level);
                }
                Some(Note::End(..)) | None => {}
            }
        }
    }

    /// Classifies a message read from the subscription and keeps the open requests' account:
    /// its end status closes a request (a full batch is closed by
    /// [`delivery`](Self::delivery), which takes the request's last place), a heartbeat
    /// shows it is still held. Heartbeats and the statuses of older requests are `None`.
    fn note(&mut self, message: &async_nats::Message) -> Option<Note> {
        match message.status {
            None | Some(StatusCode::OK) => Some(Note::Data),
            Some(StatusCode::IDLE_HEARTBEAT) => {
                if let Some(open) = self
                    .open
                    .iter_mut()
                    .find(|open| message.subject.as_str() == open.reply)
                {
                    open.heard = Instant::now();
                }
                None
            }
            Some(status) => {
                let at = self
                    .open
                    .iter()
                    .position(|open| message.subject.as_str() == open.reply)?;
                let open = self.open.remove(at);
                Some(Note::End(open.level, status))
            }
        }
    }

    /// Makes a delivery of a data message, in a place of the window: one reserved by the
    /// oldest open request to its consumer (its last place closes it: the batch is full; the
    /// server serves a consumer's requests in order), or, for a message of a request given
    /// up as lost, a free one (waiting for it).
    async fn delivery(&mut self, message: async_nats::Message) -> Option<Delivery> {
        let Some((stream_sequence, delivered)) = message.reply.as_deref().and_then(ack_numbers)
        else {
            tracing::warn!(durable = %self.durable, subject = %message.subject, reply = ?message.reply, "message without JetStream metadata ignored");
            return None;
        };
        let level = if self.levels.len() == 1 {
            Some(0)
        } else {
            message
                .reply
                .as_deref()
                .and_then(ack_consumer)
                .and_then(|name| self.levels.iter().position(|level| level.name == name))
        };
        let expires = message_expiry(message.reply.as_deref(), message.headers.as_ref());
        let acker: Arc<dyn Acker> = Arc::new(JetStreamAcker {
            reply: message.reply,
            settled: AtomicBool::new(false),
            shared: self.ackers.clone(),
            _live: self.ackers.live.token(),
        });
        self.received += 1;
        let at = self
            .open
            .iter()
            .position(|open| open.reserved.count() > 0 && Some(open.level) == level);
        let hold = match at {
            Some(at) => {
                let window = &self.window;
                let open = &mut self.open[at];
                open.heard = Instant::now();
                let hold = window.hold(&mut open.reserved, &acker).await;
                if open.reserved.count() == 0 {
                    let open = self.open.remove(at);
                    self.filled = Some(open.reply);
                }
                hold
            }
            None => {
                let mut none = self.window.reserve(0).await;
                self.window.hold(&mut none, &acker).await
            }
        };
        Some(Delivery {
            subject: message.subject.as_str().to_owned(),
            headers: message.headers,
            payload: message.payload,
            stream_sequence,
            delivered,
            acker,
            hold,
            expires,
        })
    }

    /// Stops pulling: keeps reading until the open pull requests have ended and queues
    /// whatever the server sent for them (it has places in the window, so the workers run it
    /// within the grace period instead of handing it back: a hand-back would cost the event
    /// a delivery), then unsubscribes. A message of a request given up as lost that arrives
    /// now is handed back (nak). A "crashed" listener (as a dead process) settles and runs
    /// nothing.
    async fn hand_back_rest(mut self) {
        let mut queued = 0usize;
        // Deliveries that can no longer run (the grace period is over): handed back once the
        // open requests have ended, since a nak before would bring the event straight back
        // into one of them.
        let mut held: Vec<Delivery> = Vec::new();
        // The stop of a crash is seen here as soon as the listener's token is cancelled, which
        // can be a moment before the pool marks the crash (and aborts): so the crash is watched
        // while reading, not only checked once.
        if !self.work.crashed() {
            while let Some(deadline) = self.open.iter().map(|open| open.deadline).max() {
                let aborted = self.work.abort.is_cancelled();
                let next = tokio::select! {
                    biased;
                    _ = self.work.abort.cancelled(), if !aborted => {
                        if self.work.crashed() {
                            break;
                        }
                        continue;
                    }
                    next = tokio::time::timeout_at(deadline, self.subscriber.next()) => next,
                };
                let message = match next {
                    Ok(Some(message)) => message,
                    Ok(None) | Err(_) => break,
                };
                if let Some(Note::Data) = self.note(&message) {
                    if let Some(delivery) = self.delivery(message).await {
                        if self.work.abort.is_cancelled() {
                            held.push(delivery);
                        } else if let Err(delivery) = self.submitter.submit_draining(delivery).await
                        {
                            held.push(delivery);
                        } else {
                            queued += 1;
                        }
                    }
                }
            }
        }
        self.open.clear();
        let crashed = self.work.crashed();
        if let Err(err) = self.subscriber.unsubscribe().await {
            tracing::debug!(error = %err, "unsubscribe of the pull subscription failed");
        }
        let deadline = Instant::now() + STOP_FLUSH_TIMEOUT;
        let mut handed_back = 0usize;
        while let Ok(Some(message)) =
            tokio::time::timeout_at(deadline, self.subscriber.next()).await
        {
            if crashed || !matches!(self.note(&message), Some(Note::Data)) {
                continue;
            }
            if let Some(reply) = message.reply {
                handed_back += 1;
                if let Err(err) = self.ackers.send(reply, AckKind::Nak(None)).await {
                    tracing::warn!(error = %err, "nak on stop failed; redelivered after the ack wait");
                }
            }
        }
        if !crashed {
            for delivery in held.drain(..) {
                handed_back += 1;
                if let Err(err) = delivery.acker.nak(None).await {
                    tracing::warn!(error = %err, "nak on stop failed; redelivered after the ack wait");
                }
            }
        }
        drop(self.submitter);
        tracing::info!(durable = %self.durable, queued, handed_back, "event listener stopped pulling");
    }
}

/// The consumer's delivery limits, kept apart from the rest of its configuration: **no
/// server-side delivery limit** (`max_deliver` -1), because the library enforces
/// `NATS_JS_MAX_DELIVER` itself (a delivery beyond it is dead-lettered before any handler
/// runs; see [`process_delivery`]). A server limit would let the server stop delivering an
/// event whose last allowed delivery was lost (a listener killed, a hand-back), parking it
/// for good. Max ack pending is the listener's window (`workers + buffer`), which the
/// listener already never exceeds. `create_consumer` creates or updates, so consumers made
/// by older versions (`max_deliver` = limit + 1, `max_ack_pending` = workers + 256) get these
/// values when a listener starts.
fn delivery_limits(mut config: PullConfig, window: &DeliveryWindow) -> PullConfig {
    config.max_deliver = -1;
    config.max_ack_pending = window.capacity() as i64;
    config
}

/// The stream sequence and the (1-based) delivery count of a JetStream message, from its ack
/// subject (ADR-15): `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.
/// <timestamp>.<pending>`, or with `<domain>.<account hash>.` before the stream and
/// optionally more tokens after `<pending>`. `None` when it is not such a subject (the same
/// shapes [`async_nats::jetstream::Message::info`] accepts; this reads the two numbers
/// without building the rest).
fn ack_numbers(reply: &str) -> Option<(u64, u64)> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    let mut tokens = [""; 10];
    let count = ack_tokens(rest, &mut tokens);
    // delivered, stream seq, consumer seq, timestamp, pending
    let numbers = match count {
        7 => &tokens[2..7],
        9.. => &tokens[4..9],
        _ => return None,
    };
    // Each number is read as the server writes it (plain digits) by `plain_decimal`; anything
    // else (a sign, more digits) by `str::parse`, so the subjects accepted are the same.
    let signed = |token: &str| {
        plain_decimal(token)
            .and_then(|v| i64::try_from(v).ok())
            .or_else(|| token.parse::<i64>().ok())
    };
    let unsigned = |token: &str| plain_decimal(token).or_else(|| token.parse::<u64>().ok());
    let delivered = signed(numbers[0])?;
    let stream_sequence = unsigned(numbers[1])?;
    unsigned(numbers[2])?;
    // A timestamp fits an i64 (nanoseconds up to 2262); i128 is the wider check kept for
    // anything else, and costs several times as much per digit.
    if signed(numbers[3]).is_none() {
        numbers[3].parse::<i128>().ok()?;
    }
    unsigned(numbers[4])?;
    Some((stream_sequence, delivered.max(1) as u64))
}

/// The value of 1 to 19 ASCII digits (any such value fits a `u64`), without the generic
/// parser's sign and overflow handling (five numbers per delivered message: about 700 of
/// `ack_numbers`' 980 instructions went to `str::parse`); `None` for anything else.
#[inline(always)]
fn plain_decimal(token: &str) -> Option<u64> {
    let bytes = token.as_bytes();
    if bytes.is_empty() || bytes.len() > 19 {
        return None;
    }
    let mut value = 0u64;
    for &byte in bytes {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        // At most 19 digits: below 10^19 < u64::MAX, no overflow.
        value = value * 10 + u64::from(digit);
    }
    Some(value)
}

/// Puts the first (at most 10) dot-separated tokens of `rest` into `tokens` and says how many
/// there are, in one pass over the bytes, eight at a step (once per delivered message: a
/// subject is about 80 bytes; `split('.')` cost about three times a byte-at-a-time pass, which
/// cost about twice this).
#[inline]
fn ack_tokens<'a>(rest: &'a str, tokens: &mut [&'a str; 10]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let bytes = rest.as_bytes();
    let mut count = 0;
    let mut start = 0;
    let mut base = 0;
    while base < bytes.len() {
        // Eight bytes (the last ones padded with 0xff, never a dot), little-endian.
        let word = match bytes.get(base..).and_then(<[u8]>::first_chunk::<8>) {
            Some(word) => u64::from_le_bytes(*word),
            None => {
                let mut padded = [0xff; 8];
                // `base < bytes.len()` and fewer than eight bytes are left.
                let tail = &bytes[base..];
                padded[..tail.len()].copy_from_slice(tail);
                u64::from_le_bytes(padded)
            }
        };
        // The high bit of each byte that is a dot (exact: no borrow between bytes).
        let x = word ^ (ONES * u64::from(b'.'));
        let mut dots = !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7);
        while dots != 0 {
            let at = base + (dots.trailing_zeros() / 8) as usize;
            // Both ends are at a dot or the start: ASCII, so `get` cannot fail.
            tokens[count] = rest.get(start..at).unwrap_or_default();
            count += 1;
            start = at + 1;
            if count == tokens.len() {
                return count;
            }
            dots &= dots - 1;
        }
        base += 8;
    }
    tokens[count] = rest.get(start..).unwrap_or_default();
    count + 1
}

/// The consumer name in a JetStream ack subject (see [`ack_numbers`] for its two shapes).
fn ack_consumer(reply: &str) -> Option<&str> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    let tokens: Vec<&str> = rest.split('.').take(10).collect();
    match tokens.len() {
        7 => Some(tokens[1]),
        9.. => Some(tokens[3]),
        _ => None,
    }
}

/// When a delivered message's time-to-live passes, on tokio's clock: its stored time (the
/// timestamp in the ack subject, nanoseconds since the epoch) plus its `Nats-TTL`. `None`
/// without a `Nats-TTL` (or with `never`).
fn message_expiry(
    reply: Option<&str>,
    headers: Option<&async_nats::HeaderMap>,
) -> Option<tokio::time::Instant> {
    use crate::events::schedule;
    let ttl = crate::events::header_value(headers?, schedule::NATS_TTL)?;
    let rest = reply?.strip_prefix("$JS.ACK.")?;
    let tokens: Vec<&str> = rest.split('.').collect();
    // ..., delivered, stream seq, consumer seq, timestamp, pending (and a token in v2 form)
    let stamp = match tokens.len() {
        7 => tokens[5],
        9.. => tokens[7],
        _ => return None,
    };
    let nanos: i64 = stamp.parse().ok()?;
    let stored = chrono::DateTime::from_timestamp_nanos(nanos);
    let expires = schedule::expiry(stored, Some(ttl))?;
    Some(schedule::expiry_instant(expires, chrono::Utc::now()))
}

/// What a message read from the pull subscription is.
enum Note {
    /// An event.
    Data,
    /// The end of an open pull request (to the consumer of this level), with its status.
    End(usize, StatusCode),
}

/// Settles one message. One dropped unsettled (e.g. still queued for a worker when a stop's
/// grace period ran out) is nak'ed, so it is redelivered at once instead of after the ack
/// wait; unless the listener "crashed", where nothing is settled, as in a dead process. The
/// nak is sent by a task tracked in [`AckerShared::live`], which the listener's stop waits
/// for before its final flush.
///
/// An ack is what async-nats' `Acker::ack_with` sends (a publish of the [`AckKind`] to the
/// message's reply subject), through a connection shared by the listener's deliveries
/// instead of a JetStream context cloned per message.
struct JetStreamAcker {
    /// The message's `$JS.ACK...` subject; `Some` until dropped.
    reply: Option<Subject>,
    settled: AtomicBool,
    shared: Arc<AckerShared>,
    /// Counts this acker as live in `shared.live` until it is dropped.
    _live: TaskTrackerToken,
}

/// What every [`JetStreamAcker`] of a listener shares.
struct AckerShared {
    client: async_nats::Client,
    work: WorkContext,
    /// Every acker not yet dropped, and every nak a dropped one still has to send.
    live: TaskTracker,
}

impl AckerShared {
    async fn send(&self, reply: Subject, kind: AckKind) -> Result<(), BoxError> {
        self.client
            .publish(reply, Bytes::from(kind))
            .await
            .map_err(|err| Box::new(err) as BoxError)
    }
}

impl JetStreamAcker {
    async fn send(&self, kind: AckKind, settles: bool) -> Result<(), BoxError> {
        if settles {
            self.settled.store(true, Ordering::SeqCst);
        }
        match &self.reply {
            Some(reply) => self.shared.send(reply.clone(), kind).await,
            None => Ok(()),
        }
    }
}

impl Drop for JetStreamAcker {
    fn drop(&mut self) {
        if self.settled.load(Ordering::SeqCst) || self.shared.work.crashed() {
            return;
        }
        let (Some(reply), Ok(runtime)) = (self.reply.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let shared = self.shared.clone();
        self.shared.live.spawn_on(async move {
            if let Err(err) = shared.send(reply, AckKind::Nak(None)).await {
                tracing::warn!(error = %err, "nak of an unprocessed event failed; redelivered after the ack wait");
            }
        }, &runtime);
    }
}

#[async_trait]
impl Acker for JetStreamAcker {
    async fn ack(&self) -> Result<(), BoxError> {
        self.send(AckKind::Ack, true).await
    }

    async fn nak(&self, delay: Option<Duration>) -> Result<(), BoxError> {
        self.send(AckKind::Nak(delay), true).await
    }

    async fn in_progress(&self) -> Result<(), BoxError> {
        self.send(AckKind::Progress, false).await
    }

    async fn term(&self) -> Result<(), BoxError> {
        self.send(AckKind::Term, true).await
    }
}

/// Publishes dead letters to `deadletter.<events stream>.<durable>` and waits for the PubAck.
struct JetStreamDeadLetters {
    js: Context,
    client: async_nats::Client,
    subject: String,
    events_stream: String,
    durable: String,
}

#[async_trait]
impl DeadLetterSink for JetStreamDeadLetters {
    fn events_stream(&self) -> &str {
        &self.events_stream
    }

    fn durable(&self) -> &str {
        &self.durable
    }

    /// The max payload of the server this client is connected to (from its INFO).
    fn max_payload(&self) -> usize {
        self.client.max_payload()
    }

    async fn publish_dead_letter(
        &self,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), DeadLetterPublishError> {
        // Never send what the server refuses by size: it would close the connection.
        let size = crate::headers::wire_size(&headers, payload.len());
        let max = self.client.max_payload();
        if size > max {
            return Err(DeadLetterPublishError::TooLarge(format!(
                "{size} bytes, the server's max payload is {max}"
            )));
        }
        let sent = async {
            self.js
                .send_publish(
                    self.subject.clone(),
                    PublishMessage::build().headers(headers).payload(payload),
                )
                .await?
                .await
        };
        match sent.await {
            Ok(ack) => {
                tracing::debug!(subject = %self.subject, stream = %ack.stream, seq = ack.sequence, duplicate = ack.duplicate, "dead letter stored");
                Ok(())
            }
            Err(err) => {
                let too_large = matches!(err.kind(), JsPublishErrorKind::MaxPayloadExceeded)
                    || std::error::Error::source(&err)
                        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
                        .is_some_and(|e| {
                            e.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                        });
                if too_large {
                    Err(DeadLetterPublishError::TooLarge(err.to_string()))
                } else {
                    Err(DeadLetterPublishError::Other(Box::new(err)))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::dead_letter_msg_id;

    #[test]
    fn dead_letter_ids_are_per_durable_and_recoverable() {
        let a = dead_letter_msg_id(Some("cloudevent-x"), "CE", "7", "billing");
        let b = dead_letter_msg_id(Some("cloudevent-x"), "CE", "7", "audit");
        assert_ne!(a, b);
        assert_eq!(a, "cloudevent-x.dlq.billing");
        assert_eq!(original_msg_id(&a), "cloudevent-x");
        assert_eq!(
            dead_letter_msg_id(None, "CE", "7", "billing"),
            "CE.7.dlq.billing"
        );
        assert_eq!(dead_letter_msg_id(Some(""), "CE", "7", "b"), "CE.7.dlq.b");
    }

    #[test]
    fn ack_subjects_of_both_formats_give_the_stream_sequence_and_delivery_count() {
        // The original 9-token form.
        assert_eq!(
            ack_numbers("$JS.ACK.CE.billing.3.1042.17.1732700000000000000.5"),
            Some((1042, 3))
        );
        // Domain and account hash, with and without the trailing token, and a longer one.
        assert_eq!(
            ack_numbers("$JS.ACK._.ACCHASH.CE.billing.1.7.7.1732700000000000000.0"),
            Some((7, 1))
        );
        assert_eq!(
            ack_numbers("$JS.ACK.hub.ACCHASH.CE.billing.2.99.98.1732700000000000000.4.tok"),
            Some((99, 2))
        );
        assert_eq!(
            ack_numbers("$JS.ACK.hub.ACCHASH.CE.billing.2.99.98.1732700000000000000.4.tok.x.y"),
            Some((99, 2))
        );
        // A delivery count of 0 (never sent by a server) counts as the first delivery.
        assert_eq!(
            ack_numbers("$JS.ACK.CE.billing.0.5.5.1732700000000000000.0"),
            Some((5, 1))
        );
        for bad in [
            "",
            "_INBOX.abc.1",
            "$JS.ACK.CE.billing.3.1042.17.1732700000000000000",
            "$JS.ACK.a.b.CE.billing.3.1042.17.1732700000000000000",
            "$JS.ACK.CE.billing.x.1042.17.1732700000000000000.5",
            "$JS.ACK.CE.billing.3.1042.17.notatime.5",
            "$JS.ACK.CE.billing.3.-1.17.1732700000000000000.5",
            // A delivery count beyond i64, a sequence beyond u64.
            "$JS.ACK.CE.billing.9223372036854775808.5.5.1732700000000000000.0",
            "$JS.ACK.CE.billing.3.18446744073709551616.17.1732700000000000000.5",
        ] {
            assert_eq!(ack_numbers(bad), None, "{bad:?}");
        }
        // What `str::parse` takes beyond plain digits is still taken: signs, 20 digits, a
        // timestamp beyond i64.
        assert_eq!(
            ack_numbers("$JS.ACK.CE.billing.+2.18446744073709551615.+17.-5.+0"),
            Some((u64::MAX, 2))
        );
        assert_eq!(
            ack_numbers("$JS.ACK.CE.billing.-3.7.7.99999999999999999999.0"),
            Some((7, 1))
        );
    }

    proptest::proptest! {
        /// Digits read by `plain_decimal` are what `str::parse` reads, and it reads nothing
        /// `str::parse` refuses.
        #[test]
        fn plain_decimal_agrees_with_parse(token in "[-+0-9a]{0,22}") {
            if let Some(value) = plain_decimal(&token) {
                proptest::prop_assert_eq!(token.parse::<u64>().ok(), Some(value));
            }
            proptest::prop_assert_eq!(
                plain_decimal(&token).is_some(),
                !token.is_empty() && token.len() <= 19 && token.bytes().all(|b| b.is_ascii_digit())
            );
        }

        /// The word-at-a-time tokenizer gives what `split('.')` gives (its first ten tokens),
        /// whatever the bytes around the dots (`-` and `/` sit next to `.` in ASCII, where a
        /// borrowing zero-byte test would see dots that are not there), at every length.
        #[test]
        fn ack_tokens_are_the_first_ten_of_split(rest in "[./\\-a0é]{0,100}") {
            let mut tokens = [""; 10];
            let count = ack_tokens(&rest, &mut tokens);
            let split: Vec<&str> = rest.split('.').take(10).collect();
            proptest::prop_assert_eq!(&tokens[..count], &split[..]);
        }
    }

    #[test]
    fn durable_names_are_checked() {
        assert!(valid_durable("billing-service_1"));
        for bad in ["", "a.b", "a b", "a*", "a>", "a/b"] {
            assert!(!valid_durable(bad), "{bad:?}");
        }
    }
}
