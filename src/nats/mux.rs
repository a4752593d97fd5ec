//! The request multiplexer: one wildcard subscription `<inbox>.*` per connection receives the
//! replies of every request and reply stream, routed by the last subject token to the caller
//! waiting for them.
//!
//! async-nats has a multiplexer of its own, but (0.51 and 0.52) it removes an entry only when
//! a reply arrives: every request that timed out left its entry (~310 bytes) in the client
//! for the connection's life. Here each caller holds a [`Waiter`] whose drop removes its
//! entry, whether a reply came, the caller timed out, or the caller's future was dropped; the
//! table only ever holds the requests being waited for, and at most [`MAX_PENDING`] of them.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use async_nats::{Client, Message, Subject};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, OnceCell};
use tokio::task::JoinHandle;

/// The most requests and reply streams one connection waits on at once; beyond that a request
/// is refused (each entry belongs to a caller that is still waiting, so this bounds callers).
pub(crate) const MAX_PENDING: usize = 1_000_000;

/// Why a waiter could not be registered.
#[derive(Debug)]
pub(crate) enum RegisterError {
    /// The connection was closed (the routing subscription ended).
    Closed,
    /// [`MAX_PENDING`] callers already wait.
    TooMany,
    /// The inbox subscription could not be made.
    Subscribe(async_nats::SubscribeError),
}

/// Where a reply goes.
enum Slot {
    /// The one reply of a request; the entry is removed when it arrives.
    Once(oneshot::Sender<Message>),
    /// The replies of a reply stream, until its waiter is dropped. Bounded: a stream nobody
    /// reads loses replies (as a slow consumer) instead of holding up the others.
    Many(mpsc::Sender<Message>),
}

/// Hashes the table's keys with one multiplication instead of SipHash (which costs a few
/// hundred instructions per lookup, and there are two per request). The keys are tokens this
/// connection hands out in sequence, not chosen by a peer: a reply to a made-up token is
/// only looked up, and the table's layout is ours. The multiplier is odd, so sequential tokens
/// fill distinct buckets and the high bits (hashbrown's tag) are spread.
#[derive(Default, Clone, Copy)]
struct TokenHasher(u64);

const TOKEN_MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for TokenHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; any other input still hashes deterministically.
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(TOKEN_MULTIPLIER);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(TOKEN_MULTIPLIER);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Default)]
struct Table {
    next: u64,
    slots: HashMap<u64, Slot, BuildHasherDefault<TokenHasher>>,
    closed: bool,
}

/// `prefix` followed by `token` in decimal: a reply subject, without the formatting machinery.
fn reply_subject(prefix: &str, token: u64) -> Subject {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = token;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut subject = String::with_capacity(prefix.len() + digits.len() - start);
    subject.push_str(prefix);
    subject.extend(digits[start..].iter().map(|&d| char::from(d)));
    Subject::from(subject)
}

/// The routing subscription of one connection, made at the first request.
struct Route {
    prefix: String,
    table: Arc<Mutex<Table>>,
    task: JoinHandle<()>,
}

impl Drop for Route {
    fn drop(&mut self) {
        // The task holds the subscription, which keeps the client's connection alive.
        self.task.abort();
    }
}

/// The multiplexer of one connection.
pub(crate) struct Multiplexer {
    client: Client,
    route: OnceCell<Route>,
}

/// One caller's registration: its reply subject and where its replies arrive. Dropping it
/// removes the entry.
pub(crate) struct Waiter<R> {
    token: u64,
    subject: Subject,
    table: Arc<Mutex<Table>>,
    pub(crate) replies: R,
}

impl<R> Waiter<R> {
    /// The reply subject to send the request with.
    pub(crate) fn reply_subject(&self) -> Subject {
        self.subject.clone()
    }
}

impl<R> Drop for Waiter<R> {
    fn drop(&mut self) {
        // A poisoned lock: a panic while the table was held; the entry cannot be trusted to be
        // removed, and nothing else can be done from a destructor.
        if let Ok(mut table) = self.table.lock() {
            table.slots.remove(&self.token);
            if table.slots.is_empty() && table.slots.capacity() > 4096 {
                // A burst grew the table; give the memory back once it is over.
                table.slots.shrink_to(64);
            }
        }
    }
}

impl Multiplexer {
    pub(crate) fn new(client: Client) -> Self {
        Multiplexer {
            client,
            route: OnceCell::new(),
        }
    }

    /// How many requests and reply streams wait for replies now.
    pub(crate) fn pending(&self) -> usize {
        self.route
            .get()
            .and_then(|route| route.table.lock().ok().map(|t| t.slots.len()))
            .unwrap_or(0)
    }

    async fn route(&self) -> Result<&Route, RegisterError> {
        self.route
            .get_or_try_init(|| async {
                let inbox = self.client.new_inbox();
                let subscriber = self
                    .client
                    .subscribe(format!("{inbox}.*"))
                    .await
                    .map_err(RegisterError::Subscribe)?;
                let prefix = format!("{inbox}.");
                let table = Arc::new(Mutex::new(Table::default()));
                let task = tokio::spawn(deliver(subscriber, prefix.clone(), table.clone()));
                Ok(Route {
                    prefix,
                    table,
                    task,
                })
            })
            .await
    }

    async fn register<R>(&self, slot: Slot, replies: R) -> Result<Waiter<R>, RegisterError> {
        let route = self.route().await?;
        Self::register_on(route, slot, replies)
    }

    fn register_on<R>(route: &Route, slot: Slot, replies: R) -> Result<Waiter<R>, RegisterError> {
        let mut table = route.table.lock().map_err(|_| RegisterError::Closed)?;
        if table.closed {
            return Err(RegisterError::Closed);
        }
        if table.slots.len() >= MAX_PENDING {
            return Err(RegisterError::TooMany);
        }
        let token = table.next;
        table.next = table.next.wrapping_add(1);
        table.slots.insert(token, slot);
        drop(table);
        Ok(Waiter {
            token,
            subject: reply_subject(&route.prefix, token),
            table: route.table.clone(),
            replies,
        })
    }

    /// [`one`](Self::one) without waiting, once the reply route is set up (every request
    /// after the connection's first); `None` before.
    pub(crate) fn one_now(
        &self,
    ) -> Option<Result<Waiter<oneshot::Receiver<Message>>, RegisterError>> {
        let route = self.route.get()?;
        let (tx, rx) = oneshot::channel();
        Some(Self::register_on(route, Slot::Once(tx), rx))
    }

    /// Registers a request that waits for one reply.
    pub(crate) async fn one(&self) -> Result<Waiter<oneshot::Receiver<Message>>, RegisterError> {
        let (tx, rx) = oneshot::channel();
        self.register(Slot::Once(tx), rx).await
    }

    /// Registers a reply stream; at most `capacity` replies wait to be read.
    pub(crate) async fn many(
        &self,
        capacity: usize,
    ) -> Result<Waiter<mpsc::Receiver<Message>>, RegisterError> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.register(Slot::Many(tx), rx).await
    }
}

/// Routes each reply to its waiter until the subscription ends (the connection closed); then
/// every waiter sees its channel closed and no new one registers.
async fn deliver(mut subscriber: async_nats::Subscriber, prefix: String, table: Arc<Mutex<Table>>) {
    while let Some(message) = subscriber.next().await {
        let Some(token) = message
            .subject
            .as_str()
            .strip_prefix(prefix.as_str())
            .and_then(|t| t.parse::<u64>().ok())
        else {
            continue;
        };
        let Ok(mut table) = table.lock() else { break };
        match table.slots.get(&token) {
            Some(Slot::Once(_)) => {
                if let Some(Slot::Once(tx)) = table.slots.remove(&token) {
                    drop(table);
                    // The caller may have given up just now: nothing to do then.
                    let _ = tx.send(message);
                }
            }
            Some(Slot::Many(tx)) => {
                let discarded = tx.try_send(message).is_err();
                if discarded {
                    tracing::warn!(
                        token,
                        "reply stream not read fast enough (or dropped); reply discarded"
                    );
                }
            }
            // A late reply to a request that timed out: dropped, as NATS drops replies to an
            // inbox nobody listens on.
            None => {}
        }
    }
    if let Ok(mut table) = table.lock() {
        table.closed = true;
        table.slots.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(table: &Arc<Mutex<Table>>, token: u64) -> Waiter<()> {
        let (tx, _rx) = oneshot::channel();
        table.lock().unwrap().slots.insert(token, Slot::Once(tx));
        Waiter {
            token,
            subject: Subject::from(format!("_INBOX.x.{token}")),
            table: table.clone(),
            replies: (),
        }
    }

    #[test]
    fn reply_subjects_end_with_the_token_in_decimal() {
        for token in [0, 7, 10, 4096, 1_000_000, u64::MAX] {
            assert_eq!(
                reply_subject("_INBOX.abc.", token).as_str(),
                format!("_INBOX.abc.{token}")
            );
        }
    }

    #[test]
    fn dropping_a_waiter_removes_its_entry_and_shrinks_after_a_burst() {
        let table = Arc::new(Mutex::new(Table::default()));
        let waiters: Vec<_> = (0..10_000).map(|t| waiter(&table, t)).collect();
        assert_eq!(table.lock().unwrap().slots.len(), 10_000);
        drop(waiters);
        let table = table.lock().unwrap();
        assert!(table.slots.is_empty());
        assert!(table.slots.capacity() <= 4096, "{}", table.slots.capacity());
    }
}
