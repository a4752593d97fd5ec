//! Persisted events.

mod delivery;
pub(crate) mod source;

pub use delivery::*;
pub use source::*;
