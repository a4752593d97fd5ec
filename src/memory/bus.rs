//! The in-memory equivalent of core NATS: subject-addressed publish/subscribe with wildcards
//! (`*`, `>`), queue groups (one member of a group gets each message) and bounded per-subscription
//! queues that drop on overflow, as a NATS server does with a slow consumer.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use tokio::sync::mpsc;

use crate::codec::HeaderMap;
use crate::error::BoxError;
use crate::query::{RawReply, ReplyTarget};

/// Whether `subject` (no wildcards) matches `pattern` (NATS wildcards `*` and `>`).
pub(crate) fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut pattern_tokens = pattern.split('.');
    let mut subject_tokens = subject.split('.');
    loop {
        match (pattern_tokens.next(), subject_tokens.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(s)) if p == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether `subject` is a valid subject to publish on: non-empty tokens, no wildcards, no
/// whitespace.
pub(crate) fn is_valid_publish_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject
            .split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">")
        && !subject.chars().any(char::is_whitespace)
}

/// Whether `pattern` is a valid subscription subject (wildcards allowed, `>` only last).
pub(crate) fn is_valid_pattern(pattern: &str) -> bool {
    if pattern.is_empty() || pattern.chars().any(char::is_whitespace) {
        return false;
    }
    let tokens: Vec<&str> = pattern.split('.').collect();
    tokens
        .iter()
        .enumerate()
        .all(|(i, t)| !t.is_empty() && (*t != ">" || i == tokens.len() - 1))
}

/// One message as the bus carries it.
#[derive(Clone)]
pub(crate) struct BusMessage {
    pub subject: String,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
    pub reply: Option<Arc<dyn ReplyTarget>>,
}

struct Sub {
    id: u64,
    pattern: String,
    queue: Option<String>,
    tx: mpsc::Sender<BusMessage>,
}

#[derive(Default)]
struct BusState {
    subs: Vec<Sub>,
}

/// The subject space shared by every connection of one broker.
pub(crate) struct Bus {
    state: Mutex<BusState>,
    next_id: AtomicU64,
    round_robin: AtomicUsize,
    capacity: usize,
    dropped: AtomicU64,
}

impl Bus {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Bus {
            state: Mutex::new(BusState::default()),
            next_id: AtomicU64::new(1),
            round_robin: AtomicUsize::new(0),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BusState> {
        // The state is only a list of senders, consistent after every statement: a panic
        // elsewhere while holding the lock cannot leave it half-updated.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Subscribes to `pattern`, optionally in a queue group. The subscription is active when
    /// this returns and ends when the returned [`Subscription`] is dropped.
    pub fn subscribe(self: &Arc<Self>, pattern: &str, queue: Option<&str>) -> Subscription {
        let (tx, rx) = mpsc::channel(self.capacity);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().subs.push(Sub {
            id,
            pattern: pattern.to_owned(),
            queue: queue.map(str::to_owned),
            tx,
        });
        Subscription {
            bus: Arc::downgrade(self),
            id,
            rx,
        }
    }

    fn unsubscribe(&self, id: u64) {
        self.lock().subs.retain(|s| s.id != id);
    }

    /// Delivers `message` to every plain subscription matching its subject and to one member of
    /// each matching queue group. Returns how many subscriptions it was handed to (0: nobody
    /// listens). A full subscription queue drops the message (slow consumer), as NATS does.
    pub fn publish(&self, message: BusMessage) -> usize {
        let targets: Vec<mpsc::Sender<BusMessage>> = {
            let state = self.lock();
            let mut plain = Vec::new();
            let mut groups: HashMap<&str, Vec<&mpsc::Sender<BusMessage>>> = HashMap::new();
            for sub in state
                .subs
                .iter()
                .filter(|s| subject_matches(&s.pattern, &message.subject))
            {
                match &sub.queue {
                    None => plain.push(sub.tx.clone()),
                    Some(group) => groups.entry(group.as_str()).or_default().push(&sub.tx),
                }
            }
            let turn = self.round_robin.fetch_add(1, Ordering::Relaxed);
            for members in groups.values() {
                // Invariant: a group is only in the map with at least one member, so the
                // index is in bounds.
                plain.push(members[turn % members.len()].clone());
            }
            plain
        };
        let count = targets.len();
        for tx in targets {
            match tx.try_send(message.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(subject = %message.subject, "slow consumer: subscription queue full, message dropped");
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        count
    }

    /// Messages dropped because a subscription queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Number of live subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.lock().subs.len()
    }
}

/// A live subscription: a stream of messages that unsubscribes when dropped.
pub(crate) struct Subscription {
    bus: Weak<Bus>,
    id: u64,
    rx: mpsc::Receiver<BusMessage>,
}

impl Subscription {
    /// Stops new messages from arriving; those already queued can still be read, then the
    /// subscription ends.
    pub fn unsubscribe(&mut self) {
        if let Some(bus) = self.bus.upgrade() {
            bus.unsubscribe(self.id);
        }
        self.rx.close();
    }
}

impl Stream for Subscription {
    type Item = BusMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<BusMessage>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(bus) = self.bus.upgrade() {
            bus.unsubscribe(self.id);
        }
    }
}

/// The requester's inbox: where replies to one request go. Bounded; a full inbox drops the
/// reply (slow consumer), as a NATS inbox subscription does.
pub(crate) struct Inbox {
    tx: mpsc::Sender<RawReply>,
    single: bool,
}

impl Inbox {
    /// An inbox for many replies (reply streams, scatter-gather) and the receiving end.
    pub fn new(capacity: usize) -> (Arc<Self>, mpsc::Receiver<RawReply>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Arc::new(Inbox { tx, single: false }), rx)
    }

    /// An inbox for the one reply of a request: later replies are dropped without error, as
    /// NATS drops replies to a request that already got its answer.
    pub fn single() -> (Arc<Self>, mpsc::Receiver<RawReply>) {
        let (tx, rx) = mpsc::channel(1);
        (Arc::new(Inbox { tx, single: true }), rx)
    }
}

#[async_trait]
impl ReplyTarget for Inbox {
    async fn send(&self, headers: HeaderMap, payload: Bytes) -> Result<(), BoxError> {
        let headers = if headers.is_empty() {
            None
        } else {
            Some(headers)
        };
        match self.tx.try_send(RawReply::Message { headers, payload }) {
            Ok(()) => Ok(()),
            // The requester gave up (timed out, stream dropped): like a NATS reply to an inbox
            // nobody listens on any more, this is not the replier's error.
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) if self.single => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err("requester's inbox is full (slow consumer); reply dropped".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(subject: &str) -> BusMessage {
        BusMessage {
            subject: subject.to_owned(),
            headers: None,
            payload: Bytes::from_static(b"x"),
            reply: None,
        }
    }

    #[test]
    fn wildcards_match_like_nats() {
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(!subject_matches("a.b.c", "a.b"));
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches("*.b.>", "x.b.c.d"));
        assert!(!subject_matches("events.>", "eventsx.a"));
    }

    #[test]
    fn subject_validation() {
        assert!(is_valid_publish_subject("a.b-c.d"));
        assert!(!is_valid_publish_subject("a..b"));
        assert!(!is_valid_publish_subject("a.*"));
        assert!(!is_valid_publish_subject("a b"));
        assert!(is_valid_pattern("a.*.>"));
        assert!(!is_valid_pattern("a.>.b"));
        assert!(!is_valid_pattern(""));
    }

    #[tokio::test]
    async fn queue_group_members_share_and_plain_subscribers_all_get_it() {
        let bus = Bus::new(16);
        let mut q1 = bus.subscribe("svc.*", Some("g"));
        let mut q2 = bus.subscribe("svc.*", Some("g"));
        let mut plain = bus.subscribe("svc.>", None);
        for _ in 0..10 {
            assert_eq!(bus.publish(msg("svc.op")), 2);
        }
        let mut counts = [0, 0, 0];
        for (i, sub) in [&mut q1, &mut q2, &mut plain].into_iter().enumerate() {
            while let Ok(m) = sub.rx.try_recv() {
                assert_eq!(m.subject, "svc.op");
                counts[i] += 1;
            }
        }
        assert_eq!(
            counts[0] + counts[1],
            10,
            "each message to one group member"
        );
        assert!(
            counts[0] > 0 && counts[1] > 0,
            "round robin uses both: {counts:?}"
        );
        assert_eq!(counts[2], 10);
    }

    #[tokio::test]
    async fn dropping_a_subscription_unsubscribes() {
        let bus = Bus::new(4);
        let sub = bus.subscribe("a", None);
        assert_eq!(bus.subscription_count(), 1);
        drop(sub);
        assert_eq!(bus.subscription_count(), 0);
        assert_eq!(bus.publish(msg("a")), 0);
    }

    #[tokio::test]
    async fn full_subscription_drops_and_counts() {
        let bus = Bus::new(2);
        let mut sub = bus.subscribe("a", None);
        for _ in 0..5 {
            bus.publish(msg("a"));
        }
        assert_eq!(bus.dropped(), 3);
        let mut got = 0;
        while sub.rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, 2);
    }
}
