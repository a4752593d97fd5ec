//! Queries over request/reply: the [`QueryConnection`] trait, query handlers and the
//! [`ReplyWriter`] they answer through, and the [`ReplyStream`] of a request that gets many
//! replies (one replier streaming, or scatter-gather from many).
//!
//! The rules of the wire contract (error replies with `Nats-Service-Error[-Code]`, reply
//! streams with `Reply-Stream-Index/Total`, the transaction id carried to the reply, the reply in
//! the request's content mode) live here once; backends only move bytes.
//!
//! # Examples
//!
//! ```
//! use ce_messaging::query::{handler_fn, typed_handler, QueryHandlers, TypedRequest};
//! use ce_messaging::handler::HandlerError;
//!
//! #[derive(serde::Deserialize)]
//! struct Get { name: String }
//! #[derive(serde::Serialize)]
//! struct Workspace { name: String, size: u64 }
//!
//! let handlers = QueryHandlers::new()
//!     .on("cyverse.workspace.get", typed_handler(|req: TypedRequest<Get>| async move {
//!         Ok::<_, HandlerError>(Workspace { name: req.data.name, size: 42 })
//!     }))
//!     .on("cyverse.workspace.ping", handler_fn(|request, reply| async move {
//!         reply.reply_data("cyverse.workspace.pong", &"pong").await?;
//!         Ok(())
//!     }));
//! assert_eq!(handlers.len(), 2);
//! ```

mod connection;
mod handler;
mod listen;
mod reply;
mod stream;

pub use connection::*;
pub use handler::*;
pub use listen::*;
pub use reply::*;
pub use stream::*;

#[cfg(test)]
mod tests;
