//! # ce-messaging
//!
//! CloudEvents over NATS for Rust microservices. Services are written against two traits and
//! never touch NATS directly:
//!
//! - [`QueryConnection`]: request/reply over core NATS (one reply, reply streams,
//!   scatter-gather) and listeners served by a bounded worker pool.
//! - [`EventConnection`]: persisted events over JetStream (publish after the server stored
//!   them, durable listeners with ack/nak/dead letters, request/response promises matched by
//!   transaction id, and a dynamic [`EventSource`]).
//!
//! Each trait has a NATS backend ([`NatsQueries`], [`JetStreamEvents`]) and an in-memory one
//! made by a [`MemoryBroker`] (same semantics, no server), so a service's tests run in the
//! process. A [`Shutdown`] stops the listeners and drains the connections of a whole service;
//! configuration comes from the `NATS_*` environment variables through [`Config`].
//!
//! # Example
//!
//! A service with a query and an event handler, and a client that asks the query and waits for
//! the response to an event, all on the in-memory broker (the same code runs on NATS with
//! `NatsQueries::connect` and `JetStreamEvents::connect`; `examples/workspace.rs` is a larger
//! application that runs on either):
//!
//! ```
//! use std::time::Duration;
//! use ce_messaging::prelude::*;
//! use ce_messaging::MemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = MemoryBroker::new(); // behaves like a NATS server with JetStream
//! let config = Config::default();
//! let queries = broker.query_connection(&config);
//! let events = broker.event_connection(&config);
//! events.init_stream().await?;
//!
//! // The service: doubles numbers, accepts orders.
//! let shutdown = Shutdown::new(Duration::from_secs(5));
//! let doubler = QueryHandlers::new().on(
//!     "org.example.double",
//!     typed_handler(|req: TypedRequest<u64>| async move { Ok::<_, HandlerError>(req.data * 2) }),
//! );
//! shutdown.add_listener(queries.listen(doubler, QueryListenOptions::default()).await?);
//! let orders = EventHandlers::new().on(
//!     "org.example.order.placed",
//!     typed_event_handler(|order: TypedEvent<u64>| async move {
//!         order.responses.respond_data("org.example.order.accepted", &order.data).await?;
//!         Ok(())
//!     }),
//! );
//! shutdown.add_listener(events.listen(orders, EventListenOptions::default()).await?);
//!
//! // The client: one query, one event whose response comes back by transaction id.
//! let reply = queries.request(new_event_auto_source("org.example.double", &21)?).await?;
//! assert_eq!(reply.data_as::<u64>()?, 42);
//!
//! let placed = new_event_auto_source("org.example.order.placed", &7)?;
//! let mut promise = events.request(placed, &["org.example.order.accepted".into()]).await?;
//! let accepted = promise.response(Duration::from_secs(5)).await?;
//! assert_eq!(accepted.data_as::<u64>()?, 7);
//! promise.close().await;
//!
//! // Stop the listeners (in-flight handlers finish), then drain the connections.
//! shutdown.add_connection(queries);
//! shutdown.add_connection(events);
//! let report = shutdown.shutdown().await;
//! assert!(report.is_clean());
//! # Ok(()) }
//! ```
//!
//! # What the crate root holds
//!
//! Modelled on the async-nats and axum roots: a service imports from the root (or
//! `use ce_messaging::prelude::*`), not from the module that defines a type.
//!
//! - **At the root:** the two traits and their backends, [`Config`], the handler types and
//!   their registries and options, [`Listener`], [`Shutdown`], the event helpers
//!   ([`EventType`], [`TransactionId`], [`EventExt`], [`new_event`], ...), and the error types a
//!   call returns. Their kind enums (what a caller matches on) are in [`error`].
//! - **Re-exported crates:** [`cloudevents`] (the [`Event`] type and its attribute traits) and
//!   [`async_nats`] (connect options and headers appear in the API), and tokio-util's
//!   [`CancellationToken`], the type of [`Shutdown::token`] and [`Listener::cancellation_token`],
//!   so a service needs no direct dependency to name them.
//! - **The [`prelude`]:** the traits (so their methods are in scope) and the types almost every
//!   service names.
//! - **Modules** stay public and document each area (its rules and the rest of its types: the
//!   dead-letter API in [`jetstream`], trace context and metric names in [`telemetry`], ...).
//! - **Hidden** (`#[doc(hidden)]`, public only for the `cemsg` CLI and the tests, with no
//!   stability promise): the wire codec (`codec`), the header names (`headers`), the old
//!   module paths `event` and `event_source` kept so existing code compiles, and `async_trait`
//!   (its attribute, for implementing [`QueryConnection`] or [`EventConnection`] outside this
//!   crate without a dependency of one's own).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cloudevent;
pub mod config;
pub mod error;
pub mod events;
pub mod handler;
pub mod jetstream;
pub mod listener;
pub mod memory;
pub mod nats;
pub mod query;
pub mod shutdown;
pub mod telemetry;

// The wire codec (structured and binary content modes); public for the CLI and the tests.
#[doc(hidden)]
pub mod codec;
// Header names of the wire contract; public for the CLI and the tests.
#[doc(hidden)]
pub mod headers;
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

// The crates whose types the API exposes.
pub use async_nats;
pub use cloudevents;
pub use cloudevents::Event;
pub use codec::ReceivedEvent;
pub use tokio_util::sync::CancellationToken;

/// The `#[async_trait]` attribute, for code outside this crate that implements
/// [`QueryConnection`] or [`EventConnection`] (the two traits still use it, for `dyn`):
/// `#[ce_messaging::async_trait::async_trait]` needs no dependency of its own. Handlers and
/// [`shutdown::Drain`] are plain `async fn` and do not need it.
#[doc(hidden)]
pub use async_trait;

// The traits and their backends.
pub use events::EventConnection;
pub use jetstream::JetStreamEvents;
pub use memory::{MemoryBroker, MemoryEvents, MemoryQueries};
pub use nats::NatsQueries;
pub use query::QueryConnection;

pub use config::Config;

// Handlers, their registries and what they answer through.
pub use events::{
    event_handler_fn, typed_event_handler, EventHandler, EventHandlers, EventResponseWriter,
    TypedEvent,
};
pub use handler::{HandlerError, State};
pub use query::{
    handler_fn, typed_handler, QueryHandler, QueryHandlers, Reply, ReplyStreamWriter, ReplyWriter,
    TypedRequest,
};

// Options and what the calls return.
pub use events::{
    Backoff, DurableInfo, EventFilter, EventListenOptions, EventResponsePromise, EventSource,
    PublishAck, PublishOptions, Schedule, ScheduleInfo, StartPosition,
};
pub use query::{QueryListenOptions, ReplyStream, ReplyStreamOptions};

// Events: identities and helpers.
pub use cloudevent::{
    new_event, new_event_auto_source, new_event_with_id, new_event_with_tid, EventExt, EventType,
    QueryOp, TransactionId,
};

// Running and stopping.
pub use listener::{Listener, StopReport, WorkerOptions};
pub use shutdown::{Drain, Shutdown, ShutdownReport};

// Errors (their kinds are in `error`).
pub use error::{
    ConfigError, ConnectError, Error, ListenError, PublishError, RemoteError, ReplyError,
    RequestError, ResponseError, StreamError,
};

/// The traits and the types almost every service names, for a glob import.
///
/// # Examples
///
/// ```
/// use ce_messaging::prelude::*;
///
/// let event = new_event_auto_source("org.example.order.placed", &7)?;
/// assert_eq!(event.ty(), "org.example.order.placed"); // AttributesReader is in scope
/// assert_eq!(event.data_as::<u32>()?, 7); // and so is EventExt
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub mod prelude {
    pub use cloudevents::{AttributesReader, AttributesWriter, Event};

    pub use crate::{
        event_handler_fn, handler_fn, new_event, new_event_auto_source, typed_event_handler,
        typed_handler, Config, Drain, EventConnection, EventExt, EventHandler, EventHandlers,
        EventListenOptions, EventType, HandlerError, Listener, PublishOptions, QueryConnection,
        QueryHandler, QueryHandlers, QueryListenOptions, QueryOp, ReceivedEvent, Reply,
        ReplyStreamOptions, ReplyWriter, Shutdown, State, TransactionId, TypedEvent, TypedRequest,
    };
}
