//! Connecting to NATS and watching the connection's events: every event is logged, slow
//! consumers (messages the client dropped because a subscription's buffer was full) are also
//! counted, and a closed connection is remembered so that later requests say so.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::ConnectOptions;

use crate::config::{redact_url, Config};
use crate::error::{BoxError, ConnectError, ConnectErrorKind, Error};

/// What the connection's event callback saw.
#[derive(Debug, Default)]
pub(crate) struct ConnectionEvents {
    slow_consumers: AtomicU64,
    closed: AtomicBool,
    /// When the connection was lost; `None` while connected.
    down_since: Mutex<Option<Instant>>,
}

impl ConnectionEvents {
    pub(crate) fn slow_consumers(&self) -> u64 {
        self.slow_consumers.load(Ordering::Relaxed)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// How long the connection has been down, if it is (as the events told).
    pub(crate) fn down_for(&self) -> Option<Duration> {
        self.down_since
            .lock()
            .ok()
            .and_then(|since| since.map(|t| t.elapsed()))
    }

    fn set_down(&self, down: bool) {
        if let Ok(mut since) = self.down_since.lock() {
            match (down, *since) {
                (true, None) => *since = Some(Instant::now()),
                (false, _) => *since = None,
                (true, Some(_)) => {}
            }
        }
    }

    pub(crate) fn mark_closed(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn record(&self, event: &async_nats::Event) {
        use async_nats::{Event, ServerError};
        match event {
            Event::SlowConsumer(sid) | Event::ServerError(ServerError::SlowConsumer(sid)) => {
                let total = self.slow_consumers.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    subscription = sid,
                    slow_consumer_events = total,
                    "slow consumer: messages for this subscription were dropped"
                );
            }
            Event::Connected => {
                self.set_down(false);
                tracing::info!("NATS connection (re)established");
            }
            Event::Disconnected => {
                self.set_down(true);
                tracing::warn!("NATS connection lost; reconnecting");
            }
            Event::LameDuckMode => tracing::warn!("NATS server entered lame duck mode"),
            Event::Draining => tracing::info!("NATS connection draining"),
            Event::Closed => {
                self.mark_closed();
                tracing::info!("NATS connection closed");
            }
            Event::ServerError(err) => tracing::warn!(error = %err, "NATS server error"),
            Event::ClientError(err) => tracing::warn!(error = %err, "NATS client error"),
        }
    }
}

/// Waits until the server has processed everything this client sent before (subscribes,
/// unsubscribes): a message to a fresh inbox of our own comes back only after that.
/// `Client::flush` is not enough, it only writes the socket.
pub(crate) async fn server_round_trip(
    client: &async_nats::Client,
    timeout: Duration,
) -> Result<(), BoxError> {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await?;
    client.publish(inbox, bytes::Bytes::new()).await?;
    match tokio::time::timeout(timeout, echo.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("connection closed".into()),
        Err(_) => Err(format!("no round trip to the server within {timeout:?}").into()),
    }
}

/// Connects with `options`, whose event callback becomes one that logs into and counts in
/// `events`.
pub(crate) async fn connect(
    config: &Config,
    options: ConnectOptions,
    events: Arc<ConnectionEvents>,
) -> Result<async_nats::Client, ConnectError> {
    // Without user info: `options` carries the credentials, and async-nats logs addresses.
    let addrs = config.server_addrs()?;
    let options = options.event_callback(move |event| {
        let events = events.clone();
        async move { events.record(&event) }
    });
    options.connect(addrs).await.map_err(|e| {
        let kind = match e.kind() {
            async_nats::ConnectErrorKind::ServerParse => ConnectErrorKind::InvalidConfig,
            async_nats::ConnectErrorKind::Authentication
            | async_nats::ConnectErrorKind::AuthorizationViolation => {
                ConnectErrorKind::Authorization
            }
            async_nats::ConnectErrorKind::TimedOut => ConnectErrorKind::TimedOut,
            async_nats::ConnectErrorKind::Tls => ConnectErrorKind::Tls,
            _ => ConnectErrorKind::Io,
        };
        Error::with_detail(kind, format!("servers {}", redact_url(&config.nats_url))).source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_url_is_refused_naming_the_variable_without_credentials() {
        let config = Config {
            nats_url: "nats://user:s3cret@a:4222,nats://:bad:port".into(),
            ..Default::default()
        };
        let events = Arc::new(ConnectionEvents::default());
        let options = ConnectOptions::new();
        let err = connect(&config, options, events).await.unwrap_err();
        assert_eq!(err.kind(), ConnectErrorKind::InvalidConfig);
        assert!(err.to_string().contains("NATS_URL"), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn slow_consumer_events_are_counted() {
        let events = ConnectionEvents::default();
        events.record(&async_nats::Event::SlowConsumer(3));
        events.record(&async_nats::Event::Connected);
        events.record(&async_nats::Event::SlowConsumer(3));
        assert_eq!(events.slow_consumers(), 2);
        assert!(!events.is_closed());
        events.record(&async_nats::Event::Closed);
        assert!(events.is_closed());
    }
}
