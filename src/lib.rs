//! # ce-messaging
//!
//! CloudEvents over NATS for Rust microservices. Services are written against two traits and
//! never touch NATS directly:
//!
//! - [`QueryConnection`](query::QueryConnection): request/reply over core NATS (one reply, reply
//!   streams, scatter-gather) and listeners served by a bounded worker pool.
//! - [`EventConnection`](events::EventConnection): persisted events over JetStream (publish after
//!   the server stored them, durable listeners with ack/nak/dead letters, request/response
//!   promises matched by transaction id, and a dynamic [`EventSource`](events::EventSource)).
//!
//! The wire format (structured and binary CloudEvents content modes, subjects, headers) is
//! implemented by [`codec`]; configuration comes from environment variables through [`config`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cloudevent;
pub mod codec;
pub mod config;
pub mod error;
pub mod events;
pub mod handler;
pub mod headers;
pub mod jetstream;
pub mod listener;
pub mod memory;
pub mod nats;
pub mod query;
pub mod shutdown;
pub mod telemetry;
mod worker;

/// The old name of [`cloudevent`], kept so code written against it compiles.
#[doc(hidden)]
pub use cloudevent as event;

/// The old path of [`events::EventSource`] and its filter and promise types, kept so code
/// written against it compiles.
#[doc(hidden)]
pub mod event_source {
    pub use crate::events::source::*;
}

/// The CloudEvents SDK types users need (`Event`, `AttributesReader`, ...), re-exported.
pub use cloudevents;
pub use cloudevents::Event;
pub use jetstream::JetStreamEvents;
pub use memory::{MemoryBroker, MemoryEvents, MemoryQueries};
pub use nats::NatsQueries;
