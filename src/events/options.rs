//! How an event listener runs: [`EventListenOptions`] and the redelivery [`Backoff`].

use std::time::Duration;

use crate::error::{Error, ListenError};
use crate::listener::WorkerOptions;

use super::EventHandlers;

/// Where a new durable starts; also at [`crate::config::StartPosition`].
pub use crate::config::StartPosition;

/// Redelivery delays after a retryable failure: `initial * 2^(n-1)`, at most `max`.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::Backoff;
/// use std::time::Duration;
/// let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1) };
/// assert_eq!(b.delay(1), Duration::from_millis(100));
/// assert_eq!(b.delay(3), Duration::from_millis(400));
/// assert_eq!(b.delay(10), Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failed delivery.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay after the `delivery`-th failed delivery (1-based).
    pub fn delay(&self, delivery: u64) -> Duration {
        let exp = delivery.saturating_sub(1).min(20) as u32;
        self.initial
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// How an event listener runs. `None` fields come from the configuration.
///
/// # Workers and buffer
///
/// `pool` sets them (default: 16 workers, buffer 4, 30 s grace; `buffer` may be 0).
/// A listener holds at most `workers + buffer` events at once (pulled from the broker and not
/// yet settled): it asks the broker only for as many events as it has free places, so the
/// pulls never outrun the workers. `workers` events are handled at once; up to `buffer` more
/// wait for a worker (a read-ahead that keeps the workers busy while the next pull is on its
/// way). Waiting events are kept alive with in-progress signals, so a slow handler never
/// makes the broker redeliver an event that is merely queued. A stop has at most
/// `workers + buffer` events in hand and runs them all within the grace period: a stop hands
/// an event back (one delivery spent) only when the grace period runs out before its handler
/// finished or started.
///
/// # Examples
///
/// ```
/// use ce_messaging::{EventListenOptions, WorkerOptions};
///
/// // Eight handlers at once, eight events read ahead, on the durable `billing`.
/// let options = EventListenOptions {
///     pool: WorkerOptions::new(8, 8),
///     durable_name: Some("billing".into()),
///     ..Default::default()
/// };
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct EventListenOptions {
    /// Workers, read-ahead and grace period. `buffer` is the read-ahead: at most this many
    /// events beyond `workers` are pulled and wait for a worker (0: pull only for free
    /// workers). `workers + buffer` is the consumer's max ack pending.
    pub pool: WorkerOptions,
    /// The durable consumer name; `None`: `NATS_DURABLE_NAME`.
    pub durable_name: Option<String>,
    /// Deliveries before an event is dead-lettered; `None`: `NATS_JS_MAX_DELIVER`.
    pub max_deliver: Option<i64>,
    /// Time the server waits for an ack before redelivering; `None`: `NATS_JS_ACK_WAIT`.
    pub ack_wait: Option<Duration>,
    /// The longest one handler run may take; after it the run is cancelled and the event is
    /// settled as a failure (redelivered with back-off, dead-lettered at the delivery limit).
    /// `None`: `NATS_JS_HANDLER_TIMEOUT` (default 5 minutes).
    pub handler_timeout: Option<Duration>,
    /// Redelivery delays after retryable failures.
    pub backoff: Backoff,
    /// Where the durable starts reading the stream **when this listen creates it**; an
    /// existing durable keeps its position. `None`: `NATS_JS_START_POSITION`, else
    /// [`StartPosition::All`].
    pub start_position: Option<StartPosition>,
}

impl Default for EventListenOptions {
    fn default() -> Self {
        EventListenOptions {
            pool: WorkerOptions::new(16, 4),
            durable_name: None,
            max_deliver: None,
            ack_wait: None,
            handler_timeout: None,
            backoff: Backoff::default(),
            start_position: None,
        }
    }
}

impl EventListenOptions {
    pub(crate) fn validate(&self, handlers: &EventHandlers) -> Result<(), ListenError> {
        use crate::error::ListenErrorKind::InvalidOptions;
        if handlers.is_empty() {
            return Err(Error::with_detail(InvalidOptions, "no event handlers"));
        }
        for event_type in handlers.types() {
            crate::event::check_type(event_type).map_err(|e| e.map_kind(|_| InvalidOptions))?;
        }
        // The bounds of NATS_JS_MAX_DELIVER / NATS_JS_ACK_WAIT hold for the overrides too.
        let max_deliver_ok = self
            .max_deliver
            .is_none_or(|n| n <= crate::config::MAX_COUNT);
        let ack_wait_ok = self
            .ack_wait
            .is_none_or(|w| w <= crate::config::MAX_JS_DURATION);
        if !max_deliver_ok || !ack_wait_ok {
            return Err(Error::with_detail(
                InvalidOptions,
                format!(
                    "max_deliver {:?} must be at most {}, ack_wait {:?} at most {:?}",
                    self.max_deliver,
                    crate::config::MAX_COUNT,
                    self.ack_wait,
                    crate::config::MAX_JS_DURATION
                ),
            ));
        }
        if let Some(Err(why)) = self.start_position.as_ref().map(StartPosition::check) {
            return Err(Error::with_detail(InvalidOptions, why));
        }
        self.pool.validate(0)?;
        if self
            .handler_timeout
            .is_some_and(|t| t.is_zero() || t > crate::config::MAX_JS_DURATION)
        {
            return Err(Error::with_detail(
                InvalidOptions,
                format!(
                    "the handler time limit must be more than zero and at most {:?}",
                    crate::config::MAX_JS_DURATION
                ),
            ));
        }
        Ok(())
    }

    /// The places of the listener's [`DeliveryWindow`](crate::worker::DeliveryWindow):
    /// `workers + buffer`.
    pub(crate) fn window(&self) -> usize {
        self.pool.workers.saturating_add(self.pool.buffer).max(1)
    }

    /// How many free places a pull waits for before asking (so that a fast listener does not
    /// pull one event at a time): half the read-ahead, at least 1.
    pub(crate) fn pull_threshold(&self) -> usize {
        (self.pool.buffer / 2).max(1)
    }
}
