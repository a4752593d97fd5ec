//! The bookkeeping of the fault-injection tests (`integration/faults.rs`), in the manner of
//! Jepsen's set checker: which event ids a test tried to publish, which of those the server
//! acknowledged (PubAck), and every delivery a handler saw (a multiset, with the delivery count
//! JetStream reported for it).
//!
//! From these the [`Checker::report`] derives:
//! - **lost**: acknowledged but never delivered (the promise the library must keep);
//! - **unexpected**: delivered but never attempted (something invented or mixed up events);
//! - **duplicates**: deliveries beyond the first of an id, and publish retries the stream
//!   de-duplicated (PubAck `duplicate: true`). A duplicate delivery is explained only if it is
//!   a redelivery (delivery count > 1), or a first delivery (count 1) again across a server
//!   crash and restart (the previous one handled before the restart returned,
//!   [`Checker::server_restarted`], this one after the kill began, [`Checker::server_killed`]
//!   where the test marks it): a killed server can come back with
//!   its consumer's state slightly behind (acks and delivery counts of the last moments
//!   before the kill not on disk) and deliver those events again as if for the first time.
//!   Two first deliveries of one id with no restart between them mean the event was stored
//!   twice or the consumer broke its promise; that is what the de-duplication window and the
//!   consumer must prevent.
//!
//! One checker describes one consumer group (one durable name): instances sharing a durable
//! share its delivery counts.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Shared, cheap to clone; record from any task.
#[derive(Clone, Default)]
pub struct Checker {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    attempted: HashSet<String>,
    /// id -> stream sequence of the PubAck.
    acked: HashMap<String, u64>,
    /// Ids whose (retried) publish the server reported as a duplicate.
    deduplicated: HashSet<String>,
    /// Publishes that failed, with the error text.
    failed: HashMap<String, String>,
    /// id -> (delivery count, when) of every delivery seen, in arrival order.
    delivered: HashMap<String, Vec<(u64, Instant)>>,
    /// When each server restart after a crash completed.
    restarts: Vec<Instant>,
    /// When each server was killed.
    kills: Vec<Instant>,
}

/// What the checker concluded. `Debug` prints a bounded sample of each set.
#[derive(Clone, PartialEq, Eq)]
pub struct Report {
    pub attempted: usize,
    pub acked: usize,
    pub failed: usize,
    /// Publishes the server de-duplicated (a retry of an id it had stored).
    pub deduplicated: usize,
    pub delivered_ids: usize,
    pub deliveries: usize,
    /// Acked but never delivered.
    pub lost: BTreeSet<String>,
    /// Delivered but never attempted.
    pub unexpected: BTreeSet<String>,
    /// Deliveries beyond the first of each id.
    pub duplicate_deliveries: usize,
    /// Of those, first deliveries (count 1) repeated after a server crash and restart.
    pub after_crash: usize,
    /// Ids delivered more than once whose extra deliveries are not all redeliveries (more than
    /// one delivery with count 1): id -> the delivery counts seen.
    pub unexplained_duplicates: BTreeMap<String, Vec<u64>>,
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn sample<T: std::fmt::Debug>(items: impl Iterator<Item = T>) -> Vec<T> {
            items.take(10).collect()
        }
        f.debug_struct("Report")
            .field("attempted", &self.attempted)
            .field("acked", &self.acked)
            .field("failed", &self.failed)
            .field("deduplicated", &self.deduplicated)
            .field("delivered_ids", &self.delivered_ids)
            .field("deliveries", &self.deliveries)
            .field("duplicate_deliveries", &self.duplicate_deliveries)
            .field("after_crash", &self.after_crash)
            .field("lost", &(self.lost.len(), sample(self.lost.iter())))
            .field(
                "unexpected",
                &(self.unexpected.len(), sample(self.unexpected.iter())),
            )
            .field(
                "unexplained_duplicates",
                &(
                    self.unexplained_duplicates.len(),
                    sample(self.unexplained_duplicates.iter()),
                ),
            )
            .finish()
    }
}

impl Report {
    /// Panics (printing the report) unless nothing acked was lost, nothing unexpected was
    /// delivered, and every duplicate delivery was a redelivery.
    pub fn assert_valid(&self, scenario: &str) {
        assert!(self.is_valid(), "{scenario}: invariant violated: {self:?}");
    }

    /// Nothing lost, nothing unexpected, no unexplained duplicate.
    pub fn is_valid(&self) -> bool {
        self.lost.is_empty() && self.unexpected.is_empty() && self.unexplained_duplicates.is_empty()
    }
}

impl Checker {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The test is about to publish `id`.
    pub fn attempted(&self, id: &str) {
        self.lock().attempted.insert(id.to_owned());
    }

    /// The server acknowledged `id` at `sequence`; `duplicate` as the PubAck said.
    pub fn acked(&self, id: &str, sequence: u64, duplicate: bool) {
        let mut state = self.lock();
        state.acked.insert(id.to_owned(), sequence);
        if duplicate {
            state.deduplicated.insert(id.to_owned());
        }
    }

    /// Publishing `id` failed (no PubAck) with `error`.
    pub fn failed(&self, id: &str, error: impl std::fmt::Display) {
        self.lock().failed.insert(id.to_owned(), error.to_string());
    }

    /// A handler received `id` on its `delivery_count`-th delivery.
    pub fn delivered(&self, id: &str, delivery_count: u64) {
        self.lock()
            .delivered
            .entry(id.to_owned())
            .or_default()
            .push((delivery_count, Instant::now()));
    }

    /// A server (or the node holding the consumer) that had been killed is serving again.
    /// Call it when the restart returns, before the server can deliver anything.
    pub fn server_restarted(&self) {
        self.lock().restarts.push(Instant::now());
    }

    /// A server is about to be killed: the start of the outage a restart ends, and the
    /// timeline in reports.
    pub fn server_killed(&self) {
        self.lock().kills.push(Instant::now());
    }

    /// Kills, restarts and the deliveries of `id` as milliseconds since the first delivery
    /// seen by this checker, for diagnosing an unexplained duplicate.
    pub fn timeline(&self, id: &str) -> String {
        let state = self.lock();
        let origin = state
            .delivered
            .values()
            .flatten()
            .map(|(_, at)| *at)
            .chain(state.kills.iter().copied())
            .min();
        let Some(origin) = origin else {
            return String::new();
        };
        let ms = |at: &Instant| at.saturating_duration_since(origin).as_millis();
        format!(
            "kills {:?} restarts {:?} deliveries of {id} {:?}",
            state.kills.iter().map(ms).collect::<Vec<_>>(),
            state.restarts.iter().map(ms).collect::<Vec<_>>(),
            state
                .delivered
                .get(id)
                .map(|d| d.iter().map(|(c, at)| (*c, ms(at))).collect::<Vec<_>>())
        )
    }

    pub fn acked_ids(&self) -> HashSet<String> {
        self.lock().acked.keys().cloned().collect()
    }

    pub fn acked_count(&self) -> usize {
        self.lock().acked.len()
    }

    /// How many publishes failed with each error text.
    pub fn failure_texts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for text in self.lock().failed.values() {
            *counts.entry(text.clone()).or_default() += 1;
        }
        counts
    }

    pub fn failed_count(&self) -> usize {
        self.lock().failed.len()
    }

    pub fn delivered_ids(&self) -> HashSet<String> {
        self.lock().delivered.keys().cloned().collect()
    }

    /// The delivery counts seen for `id` (empty if never delivered).
    pub fn deliveries_of(&self, id: &str) -> Vec<u64> {
        self.lock()
            .delivered
            .get(id)
            .map(|d| d.iter().map(|(count, _)| *count).collect())
            .unwrap_or_default()
    }

    /// True once every acknowledged id has been delivered at least once.
    pub fn all_acked_delivered(&self) -> bool {
        let state = self.lock();
        state
            .acked
            .keys()
            .all(|id| state.delivered.contains_key(id))
    }

    /// Waits until every acknowledged id has been delivered; panics with the report after
    /// `timeout`.
    pub async fn wait_all_acked_delivered(&self, timeout: Duration, scenario: &str) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.all_acked_delivered() {
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{scenario}: acked events not all delivered within {timeout:?}: {:?}",
                    self.report()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn report(&self) -> Report {
        let state = self.lock();
        let lost = state
            .acked
            .keys()
            .filter(|id| !state.delivered.contains_key(*id))
            .cloned()
            .collect();
        let unexpected = state
            .delivered
            .keys()
            .filter(|id| !state.attempted.contains(*id))
            .cloned()
            .collect();
        // Each restart's outage: from the kill before it (marked with `server_killed`), or
        // from the restart itself where no kill was marked, to the restart's return.
        let outages: Vec<(Instant, Instant)> = state
            .restarts
            .iter()
            .map(|up| {
                let down = state.kills.iter().filter(|k| *k <= up).max();
                (*down.unwrap_or(up), *up)
            })
            .collect();
        let mut duplicate_deliveries = 0;
        let mut after_crash = 0;
        let mut unexplained_duplicates = BTreeMap::new();
        for (id, deliveries) in &state.delivered {
            duplicate_deliveries += deliveries.len() - 1;
            // Every first delivery (count 1) after the first one needs a server outage
            // between it and the previous first delivery: the previous one handled before the
            // restart returned, this one after the kill began (a handler runs a little after
            // its delivery: an event delivered before the kill can be handled after it, and
            // the restarted server can deliver before `restart` returns).
            let mut previous_first: Option<Instant> = None;
            let mut unexplained = false;
            for (count, at) in deliveries {
                if *count > 1 {
                    continue;
                }
                if let Some(prev) = previous_first {
                    if outages.iter().any(|(down, up)| prev <= *up && *down <= *at) {
                        after_crash += 1;
                    } else {
                        unexplained = true;
                    }
                }
                previous_first = Some(*at);
            }
            if unexplained {
                let counts = deliveries.iter().map(|(c, _)| *c).collect();
                unexplained_duplicates.insert(id.clone(), counts);
            }
        }
        Report {
            attempted: state.attempted.len(),
            acked: state.acked.len(),
            failed: state.failed.len(),
            deduplicated: state.deduplicated.len(),
            delivered_ids: state.delivered.len(),
            deliveries: state.delivered.values().map(Vec::len).sum(),
            lost,
            unexpected,
            duplicate_deliveries,
            after_crash,
            unexplained_duplicates,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_lost_unexpected_and_unexplained_duplicates() {
        let c = Checker::new();
        for id in ["a", "b", "c", "d"] {
            c.attempted(id);
        }
        c.acked("a", 1, false);
        c.acked("b", 2, false);
        c.acked("c", 3, false);
        c.acked("c", 3, true); // a retry the stream de-duplicated
        c.failed("d", "timed out");
        c.delivered("a", 1);
        c.delivered("a", 2); // redelivery: explained
        c.delivered("c", 1);
        c.delivered("c", 1); // stored twice: unexplained
        c.delivered("d", 1); // attempted, not acked, stored anyway: allowed
        c.delivered("x", 1); // never attempted
        c.server_restarted();
        c.delivered("d", 1); // first delivery again after a crash: explained
        c.delivered("c", 1); // still unexplained (the earlier pair had no restart between)
        let r = c.report();
        assert_eq!(r.lost, BTreeSet::from(["b".to_string()]));
        assert_eq!(r.unexpected, BTreeSet::from(["x".to_string()]));
        assert_eq!(r.duplicate_deliveries, 4);
        assert_eq!(r.after_crash, 2);
        assert_eq!(r.deduplicated, 1);
        assert_eq!(
            r.unexplained_duplicates.keys().collect::<Vec<_>>(),
            vec!["c"]
        );
        assert!(!c.all_acked_delivered());
        assert!(!r.is_valid(), "an invalid report must fail the check");

        let ok = Checker::new();
        ok.attempted("a");
        ok.acked("a", 1, false);
        ok.delivered("a", 1);
        ok.delivered("a", 3);
        assert!(ok.all_acked_delivered());
        ok.report().assert_valid("unit");
    }

    /// A second first delivery is explained when an outage lies between the two: the earlier
    /// one handled before the restart returned, the later one after the kill began. Handlers
    /// run a little after their delivery, so either can fall inside the outage.
    #[test]
    fn a_first_delivery_again_is_explained_only_across_an_outage() {
        let c = Checker::new();
        for id in ["e", "f", "g", "h"] {
            c.attempted(id);
            c.acked(id, 1, false);
        }
        c.delivered("g", 1);
        c.delivered("g", 1); // no outage between: unexplained
        c.delivered("e", 1);
        c.server_killed();
        c.delivered("f", 1); // delivered before the kill, handled after it began
        c.delivered("e", 1); // the restarted server delivered before `restart` returned
        c.server_restarted();
        c.delivered("f", 1); // again after the restart
        c.delivered("h", 1);
        c.delivered("h", 1); // both after the restart: unexplained
        let r = c.report();
        assert_eq!(r.after_crash, 2);
        assert_eq!(
            r.unexplained_duplicates.keys().collect::<Vec<_>>(),
            vec!["g", "h"]
        );
    }
}
