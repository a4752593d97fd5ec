//! Connecting to NATS and watching the connection's events: every event is logged, slow
//! consumers (messages the client dropped because a subscription's buffer was full) are also
//! counted, and a closed connection is remembered so that later requests say so.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectOptions, ServerAddr};

use crate::config::Config;
use crate::error::{BoxError, ConnectError, ConnectErrorKind, Error};

/// What the connection's event callback saw.
#[derive(Debug, Default)]
pub(crate) struct ConnectionEvents {
    slow_consumers: AtomicU64,
    closed: AtomicBool,
}

impl ConnectionEvents {
    pub(crate) fn slow_consumers(&self) -> u64 {
        self.slow_consumers.load(Ordering::Relaxed)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
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
            Event::Connected => tracing::info!("NATS connection (re)established"),
            Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
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

/// The servers of `NATS_URL` (comma-separated for a cluster).
fn server_addrs(url: &str) -> Result<Vec<ServerAddr>, ConnectError> {
    let addrs = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ServerAddr>().map_err(|e| {
                Error::with_detail(
                    ConnectErrorKind::InvalidConfig,
                    "NATS_URL: not a server URL",
                )
                .source(e)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(Error::with_detail(
            ConnectErrorKind::InvalidConfig,
            "NATS_URL: no server",
        ));
    }
    Ok(addrs)
}

/// Connects with `options`, whose event callback becomes one that logs into and counts in
/// `events`.
pub(crate) async fn connect(
    config: &Config,
    options: ConnectOptions,
    events: Arc<ConnectionEvents>,
) -> Result<async_nats::Client, ConnectError> {
    let addrs = server_addrs(&config.nats_url)?;
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
        Error::with_source(kind, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comma_separated_urls_are_split() {
        let addrs = server_addrs("nats://a:4222, nats://b:4222").unwrap();
        assert_eq!(addrs.len(), 2);
    }

    #[test]
    fn bad_url_names_the_variable() {
        let err = server_addrs("nats://a:4222,nats://:bad:port").unwrap_err();
        assert_eq!(err.kind(), ConnectErrorKind::InvalidConfig);
        assert!(err.to_string().contains("NATS_URL"));
        let err = server_addrs(" , ").unwrap_err();
        assert!(err.to_string().contains("NATS_URL"));
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
