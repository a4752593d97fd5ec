//! Persisted events: the [`EventConnection`] trait, event handlers and the
//! [`EventResponseWriter`] they answer through, and request/response promises.
//!
//! What happens to a delivered event (ack, nak with back-off, in-progress while a handler runs
//! long, dead letter before term) is written here once and shared by every backend.
//!
//! # Examples
//!
//! ```
//! use ce_messaging::events::{typed_event_handler, EventHandlers, TypedEvent};
//! use ce_messaging::handler::HandlerError;
//!
//! #[derive(serde::Deserialize)]
//! struct OrderCreated { id: u64 }
//!
//! let handlers = EventHandlers::new().on(
//!     "org.example.order.created",
//!     typed_event_handler(|event: TypedEvent<OrderCreated>| async move {
//!         if event.data.id == 0 {
//!             return Err(HandlerError::permanent("order id 0"));
//!         }
//!         event.responses.respond_data("org.example.order.accepted", &event.data.id).await?;
//!         Ok(())
//!     }),
//! );
//! assert_eq!(handlers.len(), 1);
//! ```

mod connection;
mod delivery;
mod handler;
mod options;
mod priority;
mod publish;
pub(crate) mod schedule;
pub(crate) mod source;

pub use connection::*;
pub use delivery::*;
pub use handler::*;
pub use options::*;
pub use priority::*;
pub use publish::*;
pub use schedule::{
    firing_id, parse_duration, schedule_subject, PublishOptions, Schedule, ScheduleInfo,
    NATS_SCHEDULE, NATS_SCHEDULER, NATS_SCHEDULE_NEXT, NATS_SCHEDULE_TARGET,
    NATS_SCHEDULE_TIME_ZONE, NATS_SCHEDULE_TTL, NATS_TTL, SCHEDULE_SUBJECT_PREFIX,
};
pub use source::*;

/// Kept at its old path; it lives in [`crate::error`] with the other error types.
pub use crate::error::PublishError;

/// Settling a delivery is the worker pool's business (it keeps held deliveries alive); the
/// trait is named here too because the backends implement it for their messages.
pub(crate) use crate::worker::Acker;

#[cfg(test)]
mod tests;
