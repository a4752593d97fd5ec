//! Configuration from environment variables.

mod env;

pub use env::*;
