//! One small factory per backend. The NATS ones start their own nats-server per test (through
//! the `support` harness), so cases never share a server and need no clean-up between them.

pub mod memory;

#[cfg(feature = "nats_integration")]
pub mod nats;

#[cfg(feature = "natsjs_integration")]
pub mod jetstream;
