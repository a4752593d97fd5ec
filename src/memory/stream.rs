//! The in-memory equivalent of JetStream: streams that store messages by subject with a
//! de-duplication window, and durable consumers with explicit ack, ack-wait redelivery, nak with
//! delay, in-progress, term and a maximum number of deliveries.
//!
//! All state sits behind one mutex that is never held across an await; consumers wait for work
//! on a [`Notify`] and on a timer for the next ack-wait expiry or nak delay (no polling).

use crate::codec::ReceivedEvent;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::codec::{self, HeaderMap};
use crate::config::StartPosition;
use crate::error::{DecodeError, Error, PublishErrorKind, StreamError, StreamErrorKind};
use crate::events::PublishAck;
use crate::headers::NATS_MSG_ID;

use super::bus::subject_matches;

/// A message stored in a stream, as [`MemoryBroker::stream_messages`](super::MemoryBroker::stream_messages)
/// shows it: the headers and payload exactly as published.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use ce_messaging::config::Config;
/// use ce_messaging::events::EventConnection;
/// use ce_messaging::memory::MemoryBroker;
/// use cloudevents::AttributesReader;
///
/// let broker = MemoryBroker::new();
/// let events = broker.event_connection(&Config::default());
/// events.init_stream().await?;
/// events.publish(ce_messaging::cloudevent::new_event("org.example.a", "me", &1)?).await?;
/// let stored = broker.stream_messages("CLOUDEVENTS")?;
/// assert_eq!(stored[0].subject, "events.org.example.a");
/// assert_eq!(stored[0].event()?.ty(), "org.example.a");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoredMessage {
    /// The stream sequence (1-based).
    pub sequence: u64,
    /// The subject it was published on.
    pub subject: String,
    /// The headers as published (empty when there were none).
    pub headers: HeaderMap,
    /// The payload as published.
    pub payload: Bytes,
    /// When it was stored (wall clock, UTC).
    pub published: chrono::DateTime<chrono::Utc>,
}

impl StoredMessage {
    /// The value of a header, if present.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn demo(message: &ce_messaging::memory::StoredMessage) {
    /// let reason = message.header("Dead-Letter-Reason");
    /// # }
    /// ```
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }

    /// Decodes the message into a CloudEvent with the real codec.
    ///
    /// # Errors
    ///
    /// The codec's [`DecodeError`] when the message is not a CloudEvent.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn demo(message: &ce_messaging::memory::StoredMessage) {
    /// if let Ok(event) = message.event() { println!("{event}"); }
    /// # }
    /// ```
    pub fn event(&self) -> Result<ReceivedEvent, DecodeError> {
        let headers = (!self.headers.is_empty()).then_some(&self.headers);
        codec::decode(headers, &self.payload)
    }
}

/// The state of a durable consumer, as [`MemoryBroker::consumer_info`](super::MemoryBroker::consumer_info)
/// shows it.
///
/// # Examples
///
/// ```
/// # fn demo(broker: &ce_messaging::memory::MemoryBroker) {
/// if let Some(info) = broker.consumer_info("CLOUDEVENTS", "billing") {
///     println!("{} waiting, {} unacknowledged", info.num_pending, info.num_ack_pending);
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerInfo {
    /// The stream.
    pub stream: String,
    /// The durable name.
    pub name: String,
    /// The subjects it is filtered to.
    pub filter_subjects: Vec<String>,
    /// Stored messages matching the filter that were never delivered.
    pub num_pending: u64,
    /// Delivered messages not yet acknowledged (in a handler, or waiting for redelivery).
    pub num_ack_pending: u64,
    /// Of those, the ones delivered more than once.
    pub num_redelivered: u64,
    /// Deliveries made in total (first deliveries and redeliveries).
    pub delivered: u64,
    /// Messages acknowledged.
    pub acked: u64,
    /// Messages terminated (dead-lettered or refused for good).
    pub terminated: u64,
    /// Messages that reached the consumer's delivery limit without an ack and are no longer
    /// redelivered.
    pub exhausted: u64,
    /// Every matching message up to this stream sequence is acked or terminated (as
    /// JetStream's ack floor).
    pub ack_floor: u64,
    /// The highest stream sequence delivered (as JetStream's `delivered.stream_seq`).
    pub last_delivered: u64,
    /// The delivery limit (<= 0: unlimited).
    pub max_deliver: i64,
}

/// Settings of a stream.
#[derive(Debug, Clone)]
pub(crate) struct StreamSettings {
    pub subjects: Vec<String>,
    pub duplicate_window: Duration,
    pub max_messages: usize,
    /// Stored bytes (headers and payload) kept at most; 0: no limit.
    pub max_bytes: usize,
}

/// Settings of a durable consumer.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerSettings {
    pub filter_subjects: Vec<String>,
    pub ack_wait: Duration,
    /// Deliveries allowed; <= 0 means unlimited.
    pub max_deliver: i64,
    /// No new message is delivered while this many are unacknowledged (0: no limit).
    pub max_ack_pending: usize,
}

#[derive(Debug, Clone, Copy)]
enum Track {
    /// Delivered, waiting for an ack until the deadline.
    AckPending { deadline: Instant },
    /// To be redelivered as soon as someone asks.
    Ready,
    /// Nak'ed with a delay: redeliverable from `until`.
    Delayed { until: Instant },
}

#[derive(Debug, Clone, Copy)]
struct Tracked {
    deliveries: u64,
    track: Track,
}

struct ConsumerState {
    settings: ConsumerSettings,
    /// Next stream sequence never looked at.
    cursor: u64,
    tracked: BTreeMap<u64, Tracked>,
    notify: Arc<Notify>,
    delivered: u64,
    acked: u64,
    terminated: u64,
    exhausted: u64,
    /// The highest stream sequence delivered for the first time.
    last_delivered: u64,
}

impl ConsumerState {
    fn matches(&self, subject: &str) -> bool {
        self.settings.filter_subjects.is_empty()
            || self
                .settings
                .filter_subjects
                .iter()
                .any(|f| subject_matches(f, subject))
    }

    /// Moves expired ack waits and elapsed nak delays to `Ready` (or out, when the delivery
    /// limit is reached) and returns the earliest future deadline.
    fn advance_timers(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut exhausted = Vec::new();
        for (seq, t) in self.tracked.iter_mut() {
            let due = match t.track {
                Track::AckPending { deadline } => deadline,
                Track::Delayed { until } => until,
                Track::Ready => continue,
            };
            if due <= now {
                if limit_reached(&self.settings, t.deliveries) {
                    exhausted.push(*seq);
                } else {
                    t.track = Track::Ready;
                }
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        for seq in exhausted {
            self.tracked.remove(&seq);
            self.exhausted += 1;
            tracing::warn!(
                seq,
                "message reached the consumer's delivery limit without an ack"
            );
        }
        next
    }
}

fn limit_reached(settings: &ConsumerSettings, deliveries: u64) -> bool {
    settings.max_deliver > 0 && deliveries >= settings.max_deliver as u64
}

struct StreamState {
    settings: StreamSettings,
    messages: BTreeMap<u64, Arc<StoredMessage>>,
    /// Sum of `stored_size` over `messages`.
    bytes: usize,
    last_seq: u64,
    dedupe: HashMap<String, u64>,
    dedupe_order: VecDeque<(Instant, String)>,
    consumers: HashMap<String, ConsumerState>,
    /// The schedules kept by the stream, by schedule subject (one per subject, as ADR-51).
    schedules: BTreeMap<String, MemorySchedule>,
    /// Messages with a time-to-live, by expiry (tokio's clock), and the expiry of each.
    expiring: std::collections::BTreeSet<(Instant, u64)>,
    expires: HashMap<u64, Instant>,
}

/// How a schedule repeats.
#[derive(Debug, Clone)]
enum Repeat {
    /// `@at`: fires once, then the schedule message is removed.
    Once,
    /// `@every <interval>`.
    Every(Duration),
    /// A cron expression (UTC).
    Cron(crate::events::schedule::Cron),
}

/// A schedule the memory stream keeps, as JetStream keeps an ADR-51 schedule message.
#[derive(Debug, Clone)]
struct MemorySchedule {
    /// The stream sequence of the schedule message (headers and payload of every firing).
    seq: u64,
    target: String,
    repeat: Repeat,
    /// The next firing, on tokio's clock.
    next: Instant,
    ttl: Option<String>,
}

/// The memory backend's wall clock: UTC that moves with tokio's clock (so paused time in
/// tests moves cron and `@at` schedules too), anchored at the first use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    wall: chrono::DateTime<chrono::Utc>,
    instant: Instant,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            wall: chrono::Utc::now(),
            instant: Instant::now(),
        }
    }

    /// The wall time of `at`.
    fn wall_at(&self, at: Instant) -> chrono::DateTime<chrono::Utc> {
        let since = chrono::Duration::from_std(at.saturating_duration_since(self.instant))
            .unwrap_or(chrono::Duration::zero());
        let before = chrono::Duration::from_std(self.instant.saturating_duration_since(at))
            .unwrap_or(chrono::Duration::zero());
        self.wall + since - before
    }

    /// The instant of wall time `wall` (now at the latest... or the past, as it is).
    fn instant_of(&self, wall: chrono::DateTime<chrono::Utc>) -> Instant {
        match (wall - self.wall).to_std() {
            Ok(ahead) => self.instant + ahead,
            Err(_) => {
                let behind = (self.wall - wall).to_std().unwrap_or(Duration::ZERO);
                self.instant.checked_sub(behind).unwrap_or(self.instant)
            }
        }
    }
}

impl StreamState {
    fn holds(&self, subject: &str) -> bool {
        self.settings
            .subjects
            .iter()
            .any(|p| subject_matches(p, subject))
    }

    fn prune_dedupe(&mut self, now: Instant) {
        while let Some((at, _)) = self.dedupe_order.front() {
            if now.duration_since(*at) < self.settings.duplicate_window {
                break;
            }
            if let Some((_, id)) = self.dedupe_order.pop_front() {
                self.dedupe.remove(&id);
            }
        }
    }

    /// Stores a message (expiring at `expires`), returns its sequence.
    fn store(
        &mut self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        expires: Option<Instant>,
    ) -> u64 {
        self.last_seq += 1;
        let seq = self.last_seq;
        let message = Arc::new(StoredMessage {
            sequence: seq,
            subject: subject.to_owned(),
            headers,
            payload,
            published: chrono::Utc::now(),
        });
        self.bytes += stored_size(&message);
        self.messages.insert(seq, message);
        if let Some(at) = expires {
            self.expiring.insert((at, seq));
            self.expires.insert(seq, at);
        }
        seq
    }

    /// Removes one message (and its expiry).
    fn remove_message(&mut self, seq: u64) -> bool {
        if let Some(at) = self.expires.remove(&seq) {
            self.expiring.remove(&(at, seq));
        }
        match self.messages.remove(&seq) {
            Some(message) => {
                self.bytes = self.bytes.saturating_sub(stored_size(&message));
                true
            }
            None => false,
        }
    }

    /// Removes the messages whose time-to-live passed, as JetStream does.
    fn prune_expired(&mut self, now: Instant) {
        while let Some(&(at, seq)) = self.expiring.first() {
            if at > now {
                break;
            }
            self.remove_message(seq);
        }
    }

    /// Fires every schedule that is due (each once, with the headers JetStream gives a
    /// firing) and returns when the next one is due.
    fn fire_due(&mut self, now: Instant, clock: &Clock) -> Option<Instant> {
        use crate::events::schedule::{rfc3339, NATS_SCHEDULER, NATS_SCHEDULE_NEXT};
        loop {
            let due = self
                .schedules
                .iter()
                .filter(|(_, s)| s.next <= now)
                .min_by_key(|(_, s)| s.next)
                .map(|(subject, _)| subject.clone());
            let Some(subject) = due else { break };
            let Some(mut schedule) = self.schedules.remove(&subject) else {
                break;
            };
            let Some(message) = self.messages.get(&schedule.seq).cloned() else {
                // The schedule message is gone (deleted, or discarded by the limits).
                continue;
            };
            let fired_at = schedule.next;
            let next = match &schedule.repeat {
                Repeat::Once => None,
                Repeat::Every(interval) => {
                    let mut next = fired_at + *interval;
                    while next <= now {
                        next += *interval;
                    }
                    Some(next)
                }
                Repeat::Cron(cron) => {
                    let mut after = clock.wall_at(fired_at);
                    let now_wall = clock.wall_at(now);
                    if after < now_wall {
                        after = now_wall;
                    }
                    cron.next_after(after).map(|wall| clock.instant_of(wall))
                }
            };
            let mut headers = HeaderMap::new();
            for (name, values) in message.headers.iter() {
                let name_str: &str = name.as_ref();
                let lower = name_str.to_ascii_lowercase();
                if lower.starts_with("nats-schedule")
                    || lower == "nats-msg-id"
                    || lower == "nats-rollup"
                    || lower == "nats-ttl"
                {
                    continue;
                }
                for value in values {
                    headers.append(name.clone(), value.clone());
                }
            }
            headers.insert(NATS_SCHEDULER, crate::headers::text_value(&subject));
            let next_value = match next {
                Some(at) => rfc3339(clock.wall_at(at)),
                None => "purge".to_owned(),
            };
            headers.insert(NATS_SCHEDULE_NEXT, crate::headers::text_value(&next_value));
            let ttl = schedule
                .ttl
                .as_deref()
                .and_then(|v| parse_message_ttl(v).ok().flatten());
            if let Some(value) = &schedule.ttl {
                headers.insert(crate::events::NATS_TTL, crate::headers::text_value(value));
            }
            let target = schedule.target.clone();
            self.store(
                &target,
                headers,
                message.payload.clone(),
                ttl.map(|t| fired_at + t),
            );
            for consumer in self.consumers.values() {
                if consumer.matches(&target) {
                    consumer.notify.notify_waiters();
                }
            }
            match next {
                Some(at) => {
                    schedule.next = at;
                    self.schedules.insert(subject, schedule);
                }
                None => {
                    self.remove_message(schedule.seq);
                }
            }
        }
        self.schedules.values().map(|s| s.next).min()
    }

    /// Fires what is due and drops what expired: the stream as JetStream would show it now.
    fn catch_up(&mut self, now: Instant, clock: &Clock) -> Option<Instant> {
        let next = self.fire_due(now, clock);
        self.prune_expired(now);
        next
    }

    fn over_limit(&self) -> bool {
        self.messages.len() > self.settings.max_messages.max(1)
            || (self.settings.max_bytes > 0
                && self.bytes > self.settings.max_bytes
                && self.messages.len() > 1)
    }

    fn enforce_limit(&mut self, name: &str) {
        while self.over_limit() {
            let Some((seq, message)) = self.messages.pop_first() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(stored_size(&message));
            if let Some(at) = self.expires.remove(&seq) {
                self.expiring.remove(&(at, seq));
            }
            let unsettled = self
                .consumers
                .iter()
                .any(|(_, c)| c.tracked.contains_key(&seq) || c.cursor <= seq);
            if unsettled {
                tracing::warn!(
                    stream = name,
                    seq,
                    "stream full: oldest message discarded before every consumer settled it"
                );
            }
        }
    }
}

/// A message handed to a consumer.
pub(crate) struct Delivered {
    pub message: Arc<StoredMessage>,
    /// 1-based delivery count.
    pub deliveries: u64,
    /// When its time-to-live passes.
    pub expires: Option<Instant>,
}

/// What a consumer wait found.
pub(crate) enum Next {
    Message(Delivered),
    /// The stream or the consumer is gone.
    Gone,
}

/// Every stream of one broker.
#[derive(Default)]
pub(crate) struct Streams {
    state: Mutex<HashMap<String, StreamState>>,
    /// The wall clock of schedules, anchored at the first schedule or expiry.
    clock: std::sync::OnceLock<Clock>,
    /// The listeners pulling from each durable (by stream and durable) and the filter subjects
    /// they listen with: "one durable, one type set" (see [`Streams::claim_durable`]).
    live: Mutex<HashMap<(String, String), LiveDurable>>,
}

/// The listeners pulling from one durable.
struct LiveDurable {
    filter_subjects: Vec<String>,
    listeners: usize,
}

/// Whether two subject patterns can match a common subject.
fn patterns_overlap(a: &str, b: &str) -> bool {
    let mut at = a.split('.');
    let mut bt = b.split('.');
    loop {
        match (at.next(), bt.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == "*" || y == "*" || x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, StreamState>> {
        // Every mutation below leaves the maps consistent between statements, and no user code
        // runs under the lock, so a poisoned lock still guards consistent data.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The memory backend's wall clock now (see [`Clock`]).
    pub fn wall_now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.get_or_init(Clock::now).wall_at(Instant::now())
    }

    /// Registers a listener of `durable` with `filter_subjects` (sorted), unless other
    /// listeners of the durable are pulling with a different filter: then their (sorted)
    /// filter is the error. Every successful claim is paired with a
    /// [`release_durable`](Self::release_durable) when the listener stops pulling.
    pub fn claim_durable(
        &self,
        stream: &str,
        durable: &str,
        filter_subjects: &[String],
    ) -> Result<(), Vec<String>> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let entry = live
            .entry((stream.to_owned(), durable.to_owned()))
            .or_insert_with(|| LiveDurable {
                filter_subjects: filter_subjects.to_vec(),
                listeners: 0,
            });
        if entry.listeners > 0 && entry.filter_subjects != filter_subjects {
            return Err(entry.filter_subjects.clone());
        }
        entry.filter_subjects = filter_subjects.to_vec();
        entry.listeners += 1;
        Ok(())
    }

    /// A listener of `durable` stopped pulling.
    pub fn release_durable(&self, stream: &str, durable: &str) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let key = (stream.to_owned(), durable.to_owned());
        if let Some(entry) = live.get_mut(&key) {
            entry.listeners = entry.listeners.saturating_sub(1);
            if entry.listeners == 0 {
                live.remove(&key);
            }
        }
    }

    /// Creates a stream, or updates its subjects and limits when it exists.
    pub fn create_or_update(
        &self,
        name: &str,
        settings: StreamSettings,
    ) -> Result<(), StreamError> {
        if name.is_empty() || name.contains(['.', '*', '>', ' ']) {
            return Err(Error::with_detail(
                StreamErrorKind::Create,
                format!("invalid stream name {name:?}"),
            ));
        }
        if let Some(bad) = settings
            .subjects
            .iter()
            .find(|s| !super::bus::is_valid_pattern(s))
        {
            return Err(Error::with_detail(
                StreamErrorKind::Create,
                format!("invalid stream subject {bad:?}"),
            ));
        }
        let mut streams = self.lock();
        for (other, state) in streams.iter() {
            if other == name {
                continue;
            }
            for mine in &settings.subjects {
                if let Some(theirs) = state
                    .settings
                    .subjects
                    .iter()
                    .find(|t| patterns_overlap(mine, t))
                {
                    return Err(Error::with_detail(
                        StreamErrorKind::Create,
                        format!("subjects overlap with stream {other}: {mine} / {theirs}"),
                    ));
                }
            }
        }
        match streams.get_mut(name) {
            Some(stream) => {
                stream.settings = settings;
                stream.enforce_limit(name);
            }
            None => {
                streams.insert(
                    name.to_owned(),
                    StreamState {
                        settings,
                        messages: BTreeMap::new(),
                        bytes: 0,
                        last_seq: 0,
                        dedupe: HashMap::new(),
                        dedupe_order: VecDeque::new(),
                        consumers: HashMap::new(),
                        schedules: BTreeMap::new(),
                        expiring: std::collections::BTreeSet::new(),
                        expires: HashMap::new(),
                    },
                );
            }
        }
        Ok(())
    }

    /// Deletes a stream and its consumers; waiting consumers see [`Next::Gone`].
    pub fn delete(&self, name: &str) -> bool {
        let removed = self.lock().remove(name);
        match removed {
            Some(stream) => {
                for consumer in stream.consumers.values() {
                    consumer.notify.notify_waiters();
                }
                true
            }
            None => false,
        }
    }

    pub fn exists(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Stores a message in the stream that holds `subject`, unless its `Nats-Msg-Id` was seen
    /// within the duplicate window.
    pub fn publish(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PublishAck, Error<PublishErrorKind>> {
        let now = Instant::now();
        let mut streams = self.lock();
        let Some((name, stream)) = streams.iter_mut().find(|(_, s)| s.holds(subject)) else {
            return Err(Error::with_detail(
                PublishErrorKind::StreamNotFound,
                format!("no stream holds subject {subject}"),
            ));
        };
        // Publisher directives JetStream checks before storing (errors 10060, 10071).
        if let Some(expected) = headers.get("Nats-Expected-Stream") {
            if expected.as_str() != name.as_str() {
                return Err(Error::with_detail(
                    PublishErrorKind::Other,
                    format!(
                        "expected stream {} does not match stream {name} (JetStream error 10060)",
                        expected.as_str()
                    ),
                ));
            }
        }
        if let Some(expected) = headers.get("Nats-Expected-Last-Sequence") {
            if expected.as_str().trim().parse::<u64>().ok() != Some(stream.last_seq) {
                return Err(Error::with_detail(
                    PublishErrorKind::Other,
                    format!(
                        "wrong last sequence: expected {}, stream {name} is at {} (JetStream error 10071)",
                        expected.as_str(),
                        stream.last_seq
                    ),
                ));
            }
        }
        let clock = *self.clock.get_or_init(Clock::now);
        let ttl = match headers.get(crate::events::NATS_TTL) {
            Some(value) => Some(parse_message_ttl(value.as_str())?),
            None => None,
        };
        let schedule = match headers.get(crate::events::NATS_SCHEDULE) {
            Some(value) => Some(parse_schedule(
                value.as_str(),
                &headers,
                subject,
                stream,
                &clock,
                now,
            )?),
            None => None,
        };
        stream.prune_dedupe(now);
        let msg_id = headers
            .get(NATS_MSG_ID)
            .map(|v| v.as_str().to_owned())
            .filter(|id| !id.is_empty());
        if let Some(id) = &msg_id {
            if let Some(seq) = stream.dedupe.get(id) {
                return Ok(PublishAck {
                    stream: name.clone(),
                    sequence: *seq,
                    duplicate: true,
                });
            }
        }
        if schedule.is_some() {
            // One schedule per subject: a new one replaces the old (JetStream rolls the
            // subject up).
            if let Some(old) = stream.schedules.remove(subject) {
                stream.remove_message(old.seq);
            }
        }
        let seq = stream.store(
            subject,
            headers,
            payload,
            ttl.flatten().map(|ttl| now + ttl),
        );
        if let Some(mut schedule) = schedule {
            schedule.seq = seq;
            stream.schedules.insert(subject.to_owned(), schedule);
            // Waiting consumers look again, and so wait for this firing too.
            for consumer in stream.consumers.values() {
                consumer.notify.notify_waiters();
            }
        }
        if let Some(id) = msg_id {
            if !stream.settings.duplicate_window.is_zero() {
                stream.dedupe.insert(id.clone(), seq);
                stream.dedupe_order.push_back((now, id));
            }
        }
        let name = name.clone();
        stream.enforce_limit(&name);
        for consumer in stream.consumers.values() {
            if consumer.matches(subject) {
                consumer.notify.notify_waiters();
            }
        }
        Ok(PublishAck {
            stream: name,
            sequence: seq,
            duplicate: false,
        })
    }

    /// Creates a durable consumer, or updates its filter and limits (keeping its position and
    /// unacknowledged messages) when it exists. A new consumer starts at `start`, as JetStream
    /// places it: `All` at the first stored message, `New` after the last one, `Sequence(n)`
    /// at `n` (within the first stored and one past the last), `Time(t)` at the first message
    /// stored at or after `t` (one past the last when none was); its delivered and ack floor
    /// sequences are the one before.
    pub fn create_or_update_consumer(
        &self,
        stream: &str,
        durable: &str,
        settings: ConsumerSettings,
        start: StartPosition,
    ) -> Result<(), StreamError> {
        let mut streams = self.lock();
        let Some(state) = streams.get_mut(stream) else {
            return Err(Error::with_detail(
                StreamErrorKind::NotFound,
                format!("stream {stream} does not exist"),
            ));
        };
        match state.consumers.get_mut(durable) {
            Some(consumer) => {
                consumer.settings = settings;
                consumer.notify.notify_waiters();
            }
            None => {
                let first = state
                    .messages
                    .keys()
                    .next()
                    .copied()
                    .unwrap_or(state.last_seq + 1);
                let after_last = state.last_seq + 1;
                let cursor = match start {
                    StartPosition::All => first,
                    StartPosition::New => after_last,
                    StartPosition::Sequence(n) => n.clamp(first, after_last),
                    StartPosition::Time(t) => state
                        .messages
                        .values()
                        .find(|m| m.published >= t)
                        .map_or(after_last, |m| m.sequence),
                };
                state.consumers.insert(
                    durable.to_owned(),
                    ConsumerState {
                        settings,
                        cursor,
                        tracked: BTreeMap::new(),
                        notify: Arc::new(Notify::new()),
                        delivered: 0,
                        acked: 0,
                        terminated: 0,
                        exhausted: 0,
                        last_delivered: cursor - 1,
                    },
                );
            }
        }
        Ok(())
    }

    /// Takes the next message for the consumer if one is available now; otherwise says when to
    /// look again (`Err(Some(instant))`, or `Err(None)`: when notified).
    fn try_next(
        &self,
        stream: &str,
        durable: &str,
    ) -> Result<Next, (Arc<Notify>, Option<Instant>)> {
        let now = Instant::now();
        let mut streams = self.lock();
        let Some(state) = streams.get_mut(stream) else {
            return Ok(Next::Gone);
        };
        let clock = *self.clock.get_or_init(Clock::now);
        let next_firing = state.catch_up(now, &clock);
        let StreamState {
            messages,
            last_seq,
            consumers,
            expires,
            ..
        } = state;
        let Some(consumer) = consumers.get_mut(durable) else {
            return Ok(Next::Gone);
        };
        let wake = match (consumer.advance_timers(now), next_firing) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Redeliveries first, lowest sequence first, as JetStream does.
        let ready: Vec<u64> = consumer
            .tracked
            .iter()
            .filter(|(_, t)| matches!(t.track, Track::Ready))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in ready {
            match messages.get(&seq) {
                Some(message) if consumer.matches(&message.subject) => {
                    let ack_wait = consumer.settings.ack_wait;
                    let Some(t) = consumer.tracked.get_mut(&seq) else {
                        continue;
                    };
                    t.deliveries += 1;
                    t.track = Track::AckPending {
                        deadline: now + ack_wait,
                    };
                    let deliveries = t.deliveries;
                    consumer.delivered += 1;
                    return Ok(Next::Message(Delivered {
                        message: message.clone(),
                        deliveries,
                        expires: expires.get(&seq).copied(),
                    }));
                }
                // Discarded from the stream, or no longer in the filter: nothing to redeliver.
                _ => {
                    consumer.tracked.remove(&seq);
                }
            }
        }
        let max_ack_pending = consumer.settings.max_ack_pending;
        while consumer.cursor <= *last_seq
            && (max_ack_pending == 0 || consumer.tracked.len() < max_ack_pending)
        {
            let seq = consumer.cursor;
            consumer.cursor += 1;
            let Some(message) = messages.get(&seq) else {
                continue;
            };
            if !consumer.matches(&message.subject) {
                continue;
            }
            consumer.tracked.insert(
                seq,
                Tracked {
                    deliveries: 1,
                    track: Track::AckPending {
                        deadline: now + consumer.settings.ack_wait,
                    },
                },
            );
            consumer.delivered += 1;
            consumer.last_delivered = consumer.last_delivered.max(seq);
            return Ok(Next::Message(Delivered {
                message: message.clone(),
                deliveries: 1,
                expires: expires.get(&seq).copied(),
            }));
        }
        Err((consumer.notify.clone(), wake))
    }

    /// Waits for the next message of a consumer: new messages, redeliveries after a nak or an
    /// expired ack wait.
    ///
    /// Cancel safe: a message is taken only in the synchronous step that returns it.
    pub async fn next(&self, stream: &str, durable: &str) -> Next {
        loop {
            // Register for notification before looking, so a publish in between is not missed.
            let (notify, wake) = match self.try_next(stream, durable) {
                Ok(next) => return next,
                Err(wait) => wait,
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_next(stream, durable) {
                Ok(next) => return next,
                Err((_, wake_again)) => {
                    let wake = match (wake, wake_again) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    match wake {
                        Some(at) => {
                            tokio::select! {
                                _ = &mut notified => {}
                                _ = tokio::time::sleep_until(at) => {}
                            }
                        }
                        None => notified.await,
                    }
                }
            }
        }
    }

    /// Waits for the next message of the first of `durables` (highest priority first) that
    /// has one now: a later durable's message is taken only when every earlier durable has
    /// none ready (strict priority). Which durable it came from (its index), and the message.
    ///
    /// Cancel safe, as [`next`](Self::next).
    pub async fn next_of(&self, stream: &str, durables: &[Arc<str>]) -> (usize, Next) {
        if let [durable] = durables {
            return (0, self.next(stream, durable).await);
        }
        loop {
            let mut notifies = Vec::with_capacity(durables.len());
            let mut wake: Option<Instant> = None;
            for (at, durable) in durables.iter().enumerate() {
                match self.try_next(stream, durable) {
                    Ok(next) => return (at, next),
                    Err((notify, when)) => {
                        notifies.push(notify);
                        wake = earliest(wake, when);
                    }
                }
            }
            // Register for notification before looking again, so a publish in between is
            // not missed.
            let mut notified: Vec<_> = notifies.iter().map(|n| Box::pin(n.notified())).collect();
            for n in &mut notified {
                n.as_mut().enable();
            }
            for (at, durable) in durables.iter().enumerate() {
                match self.try_next(stream, durable) {
                    Ok(next) => return (at, next),
                    Err((_, when)) => wake = earliest(wake, when),
                }
            }
            let any = futures::future::select_all(notified);
            match wake {
                Some(at) => {
                    tokio::select! {
                        _ = any => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => {
                    any.await;
                }
            }
        }
    }

    fn with_consumer<R>(
        &self,
        stream: &str,
        durable: &str,
        f: impl FnOnce(&mut ConsumerState) -> R,
    ) -> Option<R> {
        let mut streams = self.lock();
        let consumer = streams.get_mut(stream)?.consumers.get_mut(durable)?;
        Some(f(consumer))
    }

    /// Acknowledges a message: it is never delivered again.
    pub fn ack(&self, stream: &str, durable: &str, seq: u64) {
        self.with_consumer(stream, durable, |c| {
            if c.tracked.remove(&seq).is_some() {
                c.acked += 1;
                // Room under max ack pending.
                c.notify.notify_waiters();
            }
        });
    }

    /// Hands a message back for redelivery, at once or after `delay`.
    pub fn nak(&self, stream: &str, durable: &str, seq: u64, delay: Option<Duration>) {
        self.with_consumer(stream, durable, |c| {
            if let Some(t) = c.tracked.get_mut(&seq) {
                if matches!(t.track, Track::AckPending { .. }) {
                    t.track = match delay {
                        Some(d) if !d.is_zero() => Track::Delayed {
                            until: Instant::now() + d,
                        },
                        _ => Track::Ready,
                    };
                    c.notify.notify_waiters();
                }
            }
        });
    }

    /// Resets the ack wait of a message being worked on.
    pub fn in_progress(&self, stream: &str, durable: &str, seq: u64) {
        self.with_consumer(stream, durable, |c| {
            let ack_wait = c.settings.ack_wait;
            if let Some(t) = c.tracked.get_mut(&seq) {
                if matches!(t.track, Track::AckPending { .. }) {
                    t.track = Track::AckPending {
                        deadline: Instant::now() + ack_wait,
                    };
                }
            }
        });
    }

    /// Terminates a message: never delivered again, not counted as acknowledged.
    pub fn term(&self, stream: &str, durable: &str, seq: u64) {
        self.with_consumer(stream, durable, |c| {
            if c.tracked.remove(&seq).is_some() {
                c.terminated += 1;
                c.notify.notify_waiters();
            }
        });
    }

    /// The stream `stream` as it is now: due schedules fired, expired messages gone.
    fn caught_up<R>(
        &self,
        stream: &str,
        f: impl FnOnce(&mut StreamState) -> R,
    ) -> Result<R, StreamError> {
        let clock = *self.clock.get_or_init(Clock::now);
        let mut streams = self.lock();
        let state = streams.get_mut(stream).ok_or_else(|| not_found(stream))?;
        state.catch_up(Instant::now(), &clock);
        Ok(f(state))
    }

    pub fn messages(&self, stream: &str) -> Result<Vec<StoredMessage>, StreamError> {
        self.caught_up(stream, |state| {
            state.messages.values().map(|m| (**m).clone()).collect()
        })
    }

    pub fn len(&self, stream: &str) -> Result<usize, StreamError> {
        self.caught_up(stream, |state| state.messages.len())
    }

    pub fn delete_message(&self, stream: &str, seq: u64) -> Result<bool, StreamError> {
        self.caught_up(stream, |state| state.remove_message(seq))
    }

    /// The schedules of `stream` whose subjects start with `prefix`, by subject.
    pub fn schedules(
        &self,
        stream: &str,
        prefix: &str,
    ) -> Result<Vec<crate::events::ScheduleInfo>, StreamError> {
        self.caught_up(stream, |state| {
            state
                .schedules
                .iter()
                .filter_map(|(subject, schedule)| {
                    let message = state.messages.get(&schedule.seq)?;
                    crate::events::ScheduleInfo::from_message(
                        prefix,
                        subject,
                        Some(&message.headers),
                        &message.payload,
                    )
                })
                .collect()
        })
    }

    /// Removes the schedule on `subject` (and its message); whether there was one.
    pub fn cancel_schedule(&self, stream: &str, subject: &str) -> Result<bool, StreamError> {
        self.caught_up(stream, |state| match state.schedules.remove(subject) {
            Some(schedule) => {
                state.remove_message(schedule.seq);
                true
            }
            None => false,
        })
    }

    pub fn consumer_info(&self, stream: &str, durable: &str) -> Option<ConsumerInfo> {
        let clock = *self.clock.get_or_init(Clock::now);
        let mut streams = self.lock();
        let state = streams.get_mut(stream)?;
        state.catch_up(Instant::now(), &clock);
        let c = state.consumers.get(durable)?;
        let num_pending = state
            .messages
            .range(c.cursor..)
            .filter(|(_, m)| c.matches(&m.subject))
            .count() as u64;
        Some(ConsumerInfo {
            stream: stream.to_owned(),
            name: durable.to_owned(),
            filter_subjects: c.settings.filter_subjects.clone(),
            num_pending,
            num_ack_pending: c.tracked.len() as u64,
            num_redelivered: c.tracked.values().filter(|t| t.deliveries > 1).count() as u64,
            delivered: c.delivered,
            acked: c.acked,
            terminated: c.terminated,
            exhausted: c.exhausted,
            ack_floor: c
                .tracked
                .keys()
                .next()
                .map_or(c.last_delivered, |first| first - 1),
            last_delivered: c.last_delivered,
            max_deliver: c.settings.max_deliver,
        })
    }
}

/// A `Nats-TTL` value as JetStream reads it: `never` (`None`), whole seconds or a duration
/// with units, at least 1 s; anything else is refused (JetStream error 10165).
fn parse_message_ttl(value: &str) -> Result<Option<Duration>, Error<PublishErrorKind>> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    let ttl = value
        .parse::<u64>()
        .map(Duration::from_secs)
        .or_else(|_| crate::events::parse_duration(value));
    match ttl {
        Ok(ttl) if ttl >= crate::events::schedule::MIN_INTERVAL => Ok(Some(ttl)),
        _ => Err(Error::with_detail(
            PublishErrorKind::Other,
            format!("invalid per-message TTL {value:?} (JetStream error 10165)"),
        )),
    }
}

/// Reads a schedule message's directives as JetStream does (errors 10189 bad pattern, 10190
/// bad target), on tokio's clock.
fn parse_schedule(
    value: &str,
    headers: &HeaderMap,
    subject: &str,
    stream: &StreamState,
    clock: &Clock,
    now: Instant,
) -> Result<MemorySchedule, Error<PublishErrorKind>> {
    use crate::events::schedule::{
        Cron, MIN_INTERVAL, NATS_SCHEDULE_TARGET, NATS_SCHEDULE_TIME_ZONE, NATS_SCHEDULE_TTL,
    };
    let bad_pattern = |why: String| {
        Error::with_detail(
            PublishErrorKind::InvalidSchedule,
            format!("message schedules pattern is invalid: {why} (JetStream error 10189)"),
        )
    };
    let target = headers
        .get(NATS_SCHEDULE_TARGET)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    if target.is_empty()
        || target == subject
        || target.contains(['*', '>'])
        || !stream.holds(&target)
    {
        return Err(Error::with_detail(
            PublishErrorKind::InvalidSchedule,
            format!("message schedules target {target:?} is invalid (JetStream error 10190)"),
        ));
    }
    if let Some(zone) = headers.get(NATS_SCHEDULE_TIME_ZONE) {
        let zone = zone.as_str();
        if !zone.is_empty() && !is_utc_zone(zone) {
            return Err(Error::with_detail(
                PublishErrorKind::Unsupported,
                format!(
                    "the memory backend reads cron in UTC only (time zones {}), not in time \
                     zone {zone:?}; JetStream reads any IANA zone",
                    UTC_ZONES.join(", ")
                ),
            ));
        }
    }
    let value = value.trim();
    let (repeat, next) = if let Some(at) = value.strip_prefix("@at ") {
        let at = chrono::DateTime::parse_from_rfc3339(at.trim())
            .map_err(|e| bad_pattern(format!("{at:?}: {e}")))?
            .with_timezone(&chrono::Utc);
        (Repeat::Once, clock.instant_of(at).max(now))
    } else if let Some(every) = value.strip_prefix("@every ") {
        let interval = crate::events::parse_duration(every).map_err(bad_pattern)?;
        if interval < MIN_INTERVAL {
            return Err(bad_pattern(format!("interval {interval:?} under 1 s")));
        }
        (Repeat::Every(interval), now + interval)
    } else {
        let cron = Cron::parse(value).map_err(bad_pattern)?;
        let next = cron
            .next_after(clock.wall_at(now))
            .ok_or_else(|| bad_pattern(format!("{value:?} never fires")))?;
        let next = clock.instant_of(next);
        (Repeat::Cron(cron), next)
    };
    let ttl = headers
        .get(NATS_SCHEDULE_TTL)
        .map(|v| v.as_str().to_owned());
    if let Some(ttl) = &ttl {
        parse_message_ttl(ttl)?;
    }
    Ok(MemorySchedule {
        seq: 0,
        target,
        repeat,
        next,
        ttl,
    })
}

/// The IANA zone names the memory backend accepts for cron: those that are UTC all year.
const UTC_ZONES: [&str; 8] = [
    "UTC", "Etc/UTC", "Etc/UCT", "UCT", "Zulu", "Etc/Zulu", "GMT", "Etc/GMT",
];

/// Whether a cron time zone is UTC all year (so the memory backend reads it as UTC).
fn is_utc_zone(zone: &str) -> bool {
    UTC_ZONES.iter().any(|z| z.eq_ignore_ascii_case(zone))
}

/// What a stored message counts against the stream's byte limit.
/// The earlier of two optional instants.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn stored_size(message: &StoredMessage) -> usize {
    super::headers_len(&message.headers) + message.payload.len() + message.subject.len()
}

fn not_found(stream: &str) -> StreamError {
    Error::with_detail(
        StreamErrorKind::NotFound,
        format!("stream {stream} does not exist"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams() -> Streams {
        let s = Streams::default();
        s.create_or_update(
            "S",
            StreamSettings {
                subjects: vec!["ev.>".into()],
                duplicate_window: Duration::from_secs(120),
                max_messages: 1000,
                max_bytes: 0,
            },
        )
        .unwrap();
        s
    }

    fn consumer(s: &Streams, name: &str, ack_wait: Duration, max_deliver: i64) {
        s.create_or_update_consumer(
            "S",
            name,
            ConsumerSettings {
                filter_subjects: vec!["ev.a".into()],
                ack_wait,
                max_deliver,
                max_ack_pending: 0,
            },
            StartPosition::All,
        )
        .unwrap();
    }

    fn headers(id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(NATS_MSG_ID, id);
        h
    }

    async fn next_seq(s: &Streams, name: &str) -> (u64, u64) {
        match tokio::time::timeout(Duration::from_secs(3600), s.next("S", name)).await {
            Ok(Next::Message(d)) => (d.message.sequence, d.deliveries),
            Ok(Next::Gone) => panic!("consumer gone"),
            Err(_) => panic!("no message within an hour of (paused) time"),
        }
    }

    proptest::proptest! {
        /// A stream whose pattern matches a subject overlaps with that subject, so two
        /// streams can never both hold one subject.
        #[test]
        fn matching_implies_overlap(
            pattern in proptest::collection::vec(proptest::sample::select(vec!["a", "b", "*", ">"]), 1..5),
            subject in proptest::collection::vec(proptest::sample::select(vec!["a", "b", "c"]), 1..5),
        ) {
            let pattern = pattern.join(".");
            let subject = subject.join(".");
            if super::super::bus::is_valid_pattern(&pattern) && subject_matches(&pattern, &subject) {
                proptest::prop_assert!(patterns_overlap(&pattern, &subject));
                proptest::prop_assert!(patterns_overlap(&subject, &pattern));
            }
            proptest::prop_assert!(subject_matches(&subject, &subject));
        }
    }

    #[test]
    fn publish_without_stream_is_stream_not_found() {
        let s = streams();
        let err = s
            .publish("other.a", HeaderMap::new(), Bytes::new())
            .unwrap_err();
        assert_eq!(err.kind(), PublishErrorKind::StreamNotFound);
    }

    #[test]
    fn expected_stream_and_last_sequence_directives_are_checked_like_jetstream() {
        let s = streams();
        let mut h = HeaderMap::new();
        h.insert("Nats-Expected-Stream", "OTHER");
        let err = s.publish("ev.a", h, Bytes::new()).unwrap_err();
        assert!(err.to_string().contains("10060"), "{err}");
        let mut h = HeaderMap::new();
        h.insert("Nats-Expected-Stream", "S");
        h.insert("Nats-Expected-Last-Sequence", "0");
        assert_eq!(
            s.publish("ev.a", h.clone(), Bytes::new()).unwrap().sequence,
            1
        );
        let err = s.publish("ev.a", h, Bytes::new()).unwrap_err();
        assert!(err.to_string().contains("10071"), "{err}");
        assert_eq!(s.len("S").unwrap(), 1);
    }

    #[test]
    fn overlapping_streams_are_refused() {
        let s = streams();
        let err = s
            .create_or_update(
                "T",
                StreamSettings {
                    subjects: vec!["ev.a.*".into()],
                    duplicate_window: Duration::ZERO,
                    max_messages: 10,
                    max_bytes: 0,
                },
            )
            .unwrap_err();
        assert_eq!(err.kind(), StreamErrorKind::Create);
        assert!(patterns_overlap("a.*", "a.b"));
        assert!(!patterns_overlap("a.b", "a.c"));
        assert!(!patterns_overlap("a.b", "a.b.c"));
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_within_the_window_are_not_stored_twice() {
        let s = streams();
        let first = s.publish("ev.a", headers("id-1"), Bytes::new()).unwrap();
        let again = s.publish("ev.a", headers("id-1"), Bytes::new()).unwrap();
        assert!(!first.duplicate);
        assert!(again.duplicate);
        assert_eq!(again.sequence, first.sequence);
        assert_eq!(s.len("S").unwrap(), 1);
        tokio::time::advance(Duration::from_secs(121)).await;
        let later = s.publish("ev.a", headers("id-1"), Bytes::new()).unwrap();
        assert!(!later.duplicate, "outside the window it is a new message");
        assert_eq!(s.len("S").unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn ack_wait_expiry_redelivers_and_max_deliver_stops_it() {
        let s = streams();
        consumer(&s, "d", Duration::from_secs(30), 2);
        s.publish("ev.a", headers("x"), Bytes::new()).unwrap();
        let started = Instant::now();
        assert_eq!(next_seq(&s, "d").await, (1, 1));
        assert_eq!(
            next_seq(&s, "d").await,
            (1, 2),
            "redelivered after ack wait"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        // Limit reached: after the next ack wait the message is given up, not redelivered.
        let waited = tokio::time::timeout(Duration::from_secs(120), s.next("S", "d")).await;
        assert!(waited.is_err(), "no third delivery");
        let info = s.consumer_info("S", "d").unwrap();
        assert_eq!(
            (info.exhausted, info.num_ack_pending, info.delivered),
            (1, 0, 2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nak_with_delay_redelivers_after_the_delay_and_in_progress_extends() {
        let s = streams();
        consumer(&s, "d", Duration::from_secs(10), 0);
        s.publish("ev.a", headers("x"), Bytes::new()).unwrap();
        assert_eq!(next_seq(&s, "d").await, (1, 1));
        let t0 = Instant::now();
        s.nak("S", "d", 1, Some(Duration::from_secs(3)));
        assert_eq!(next_seq(&s, "d").await, (1, 2));
        assert_eq!(t0.elapsed(), Duration::from_secs(3));
        // in-progress at 8s pushes the redelivery to 18s.
        tokio::time::advance(Duration::from_secs(8)).await;
        s.in_progress("S", "d", 1);
        let t1 = Instant::now();
        assert_eq!(next_seq(&s, "d").await, (1, 3));
        assert_eq!(t1.elapsed(), Duration::from_secs(10));
        s.term("S", "d", 1);
        let info = s.consumer_info("S", "d").unwrap();
        assert_eq!((info.terminated, info.num_ack_pending), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn durables_fan_out_and_ack_settles() {
        let s = streams();
        consumer(&s, "one", Duration::from_secs(30), 5);
        consumer(&s, "two", Duration::from_secs(30), 5);
        s.publish("ev.b", headers("skip"), Bytes::new()).unwrap();
        s.publish("ev.a", headers("a"), Bytes::new()).unwrap();
        assert_eq!(next_seq(&s, "one").await, (2, 1), "filtered: ev.b skipped");
        assert_eq!(next_seq(&s, "two").await, (2, 1), "each durable gets it");
        s.ack("S", "one", 2);
        let info = s.consumer_info("S", "one").unwrap();
        assert_eq!(
            (info.acked, info.num_ack_pending, info.num_pending),
            (1, 0, 0)
        );
        let waited = tokio::time::timeout(Duration::from_secs(300), s.next("S", "one")).await;
        assert!(waited.is_err(), "an acked message is never redelivered");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_consumer_wakes_on_publish_and_on_delete() {
        let s = Arc::new(streams());
        consumer(&s, "d", Duration::from_secs(30), 5);
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { matches!(s.next("S", "d").await, Next::Message(_)) })
        };
        tokio::task::yield_now().await;
        s.publish("ev.a", headers("a"), Bytes::new()).unwrap();
        assert!(waiter.await.unwrap());
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { matches!(s.next("S", "d").await, Next::Gone) })
        };
        tokio::task::yield_now().await;
        assert!(s.delete("S"));
        assert!(waiter.await.unwrap());
    }

    #[test]
    fn the_oldest_messages_are_discarded_beyond_the_byte_limit() {
        let s = Streams::default();
        s.create_or_update(
            "S",
            StreamSettings {
                subjects: vec!["ev.>".into()],
                duplicate_window: Duration::ZERO,
                max_messages: 1000,
                max_bytes: 250,
            },
        )
        .unwrap();
        for _ in 0..5 {
            s.publish("ev.a", HeaderMap::new(), Bytes::from(vec![b'x'; 96]))
                .unwrap();
        }
        // 100 bytes each (96 payload + 4 subject): two fit under 250.
        let seqs: Vec<u64> = s
            .messages("S")
            .unwrap()
            .iter()
            .map(|m| m.sequence)
            .collect();
        assert_eq!(seqs, vec![4, 5]);
        assert!(s.delete_message("S", 4).unwrap());
        assert_eq!(s.lock().get("S").unwrap().bytes, 100);
    }

    #[test]
    fn the_oldest_message_is_discarded_beyond_the_limit() {
        let s = Streams::default();
        s.create_or_update(
            "S",
            StreamSettings {
                subjects: vec!["ev.>".into()],
                duplicate_window: Duration::ZERO,
                max_messages: 2,
                max_bytes: 0,
            },
        )
        .unwrap();
        for _ in 0..3 {
            s.publish("ev.a", HeaderMap::new(), Bytes::new()).unwrap();
        }
        let seqs: Vec<u64> = s
            .messages("S")
            .unwrap()
            .iter()
            .map(|m| m.sequence)
            .collect();
        assert_eq!(seqs, vec![2, 3]);
    }
}
