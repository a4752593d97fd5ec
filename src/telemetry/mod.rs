//! Observability.

mod trace;

pub use trace::*;
