//! Observability: W3C trace context carried in the CloudEvents `traceparent`/`tracestate`
//! extensions ([`TraceContext`]), the names of the `tracing` spans the library opens, and the
//! names of the metrics it records through the [`metrics`] facade.
//!
//! The library does not depend on OpenTelemetry. Each span it opens (publish, request, reply,
//! handle) carries `trace_id`, `span_id` and `parent_span_id` fields of its own W3C trace
//! context: a publish or request made inside a handler continues the handler's trace, and a
//! handler continues the trace of the event it handles (its `parent_span_id` is the
//! publisher's `span_id`). An exporter can rebuild the cross-service tree from those fields;
//! a service that already runs an OpenTelemetry propagator can set `traceparent` on the event
//! itself and the library keeps it. See `docs/observability.md`.
//!
//! Metrics go through the [`metrics`] facade: without an installed recorder every call is a
//! no-op. Install the recorder before listeners handle their first message: per-type handles
//! are registered once, at the first message of each type.
//!
//! # Examples
//!
//! ```
//! use ce_messaging::telemetry::TraceContext;
//!
//! let ctx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None).unwrap();
//! assert_eq!(ctx.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! let child = ctx.child();
//! assert_eq!(child.trace_id(), ctx.trace_id());
//! assert_ne!(child.span_id(), ctx.span_id());
//! ```

mod meters;
mod trace;

pub use meters::*;
pub use trace::*;

/// Span names the library opens (all at `INFO` level, target `ce_messaging::...`).
pub mod spans {
    /// One [`publish`](crate::events::EventConnection::publish) (fields `event.id`,
    /// `event.type`, `transaction_id`, trace ids, `outcome` = `stored` | `duplicate` |
    /// `error`).
    pub const PUBLISH: &str = "publish";
    /// One pipelined [`publish_all`](crate::events::EventConnection::publish_all) (field
    /// `count`); each event gets a trace context of its own.
    pub const PUBLISH_ALL: &str = "publish_all";
    /// Handling one delivered event (fields `event.id`, `event.type`, `transaction_id`,
    /// `delivered`, trace ids, `outcome` = `ack` | `nak` | `dead-letter` | `abandoned` |
    /// `requeued`, `reason` for a dead letter).
    pub const HANDLE_EVENT: &str = "handle_event";
    /// Serving one query (fields `event.id`, `event.type` (the op), `transaction_id`, trace
    /// ids, `code` = the reply's status: 200 or the error code).
    pub const HANDLE_QUERY: &str = "handle_query";
    /// One query sent and its reply awaited (fields `event.id`, `event.type`,
    /// `transaction_id`, trace ids, `outcome` = `ok` or the error kind).
    pub const REQUEST: &str = "request";
    /// One reply sent by a query handler (fields `event.id`, `event.type`, `code`).
    pub const REPLY: &str = "reply";
}

#[cfg(test)]
#[path = "../../integration/capture.rs"]
pub(crate) mod capture;

#[cfg(test)]
mod tests;
