//! Queries over request/reply.

mod reply;

pub use reply::*;
