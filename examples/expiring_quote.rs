//! An expiring event: a price quote is worthless after a while, so it carries a time-to-live.
//!
//! The stream removes the event when its time-to-live passes (on JetStream: per-message TTL,
//! `Nats-TTL`), and a listener never gives a handler an event whose time-to-live passed while it
//! waited; it counts it in `ce_messaging_events_expired_total` instead.
//!
//! ```text
//! cargo run --example expiring_quote                                  # in-memory backend
//! NATS_URL=nats://127.0.0.1:4222 cargo run --example expiring_quote   # nats-server 2.11+
//! ```

use std::time::Duration;

use ce_messaging::prelude::*;
use tokio::sync::mpsc;

mod common;

const QUOTE: &str = "org.example.quote.given";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config {
        durable_name: Some("quote-example".into()),
        ..Config::from_env()?
    };
    let backends = common::backends(&config).await?;
    let events = backends.events;
    events.init_stream().await?;

    // The pricing service is down while the first quote is published...
    let stale = new_event_auto_source(QUOTE, &101.5f64)?;
    events
        .publish_with(
            stale,
            PublishOptions::default().with_ttl(Duration::from_secs(1)),
        )
        .await?;
    // (standing for the outage: the quote's second passes before anyone listens)
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // ... and when it is back, only a fresh quote reaches the handler.
    let (tx, mut rx) = mpsc::channel(4);
    let handlers = EventHandlers::new().on(
        QUOTE,
        typed_event_handler(move |event: TypedEvent<f64>| {
            let tx = tx.clone();
            async move {
                println!("quote {:.2} handled", event.data);
                let _ = tx.send(event.data).await;
                Ok(())
            }
        }),
    );
    let listener = events
        .listen(handlers, EventListenOptions::default())
        .await?;
    let fresh = new_event_auto_source(QUOTE, &99.25f64)?;
    events
        .publish_with(
            fresh,
            PublishOptions::default().with_ttl(Duration::from_secs(30)),
        )
        .await?;
    let price = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await?;
    assert_eq!(
        price,
        Some(99.25),
        "the expired quote never reaches the handler"
    );
    println!(
        "the 1 s quote expired unhandled; the fresh one was handled ({} backend)",
        backends.name
    );
    listener.stop(Duration::from_secs(5)).await;
    Ok(())
}
