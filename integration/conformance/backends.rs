//! One small factory per backend. The NATS ones start their own nats-server per test (through
//! the `support` harness), so cases never share a server and need no clean-up between them.

pub mod memory;

#[cfg(feature = "nats_integration")]
pub mod nats;

#[cfg(feature = "natsjs_integration")]
pub mod jetstream;

/// Starts a nats-server off the runtime threads. The harness picks a free port by binding port
/// 0 and releasing it, so with tests starting servers in parallel another server can take the
/// port first ("address already in use" at start-up); such a start is retried with a new port.
#[cfg(feature = "nats_integration")]
pub async fn start_server(
    start: fn() -> crate::support::server::NatsServer,
) -> crate::support::server::NatsServer {
    const ATTEMPTS: usize = 3;
    for attempt in 1..=ATTEMPTS {
        match tokio::task::spawn_blocking(start).await {
            Ok(server) => return server,
            Err(err) if attempt < ATTEMPTS => {
                eprintln!("nats-server start failed (attempt {attempt}), retrying: {err}");
            }
            Err(err) => panic!("nats-server did not start in {ATTEMPTS} attempts: {err}"),
        }
    }
    unreachable!("the last attempt returns or panics")
}
