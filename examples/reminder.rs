//! A deferred event: send the invoice reminder later, not now.
//!
//! The reminder is published with `PublishOptions::after`; the events stream keeps it (on
//! JetStream: an ADR-51 schedule, persisted and replicated like any event) and delivers it as an
//! ordinary `org.example.invoice.reminder` event when its time comes. A schedule can be listed
//! and cancelled until then.
//!
//! ```text
//! cargo run --example reminder                                  # in-memory backend
//! NATS_URL=nats://127.0.0.1:4222 cargo run --example reminder   # nats-server 2.12+
//! ```

use std::time::{Duration, Instant};

use ce_messaging::prelude::*;
use tokio::sync::mpsc;

mod common;

const REMINDER: &str = "org.example.invoice.reminder";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config {
        durable_name: Some("reminder-example".into()),
        ..Config::from_env()?
    };
    let backends = common::backends(&config).await?;
    let events = backends.events;
    events.init_stream().await?;

    let (tx, mut rx) = mpsc::channel(4);
    let handlers = EventHandlers::new().on(
        REMINDER,
        typed_event_handler(move |event: TypedEvent<u64>| {
            let tx = tx.clone();
            async move {
                println!("reminder: invoice {} is due", event.data);
                let _ = tx.send(event.data).await;
                Ok(())
            }
        }),
    );
    let listener = events
        .listen(handlers, EventListenOptions::default())
        .await?;

    let started = Instant::now();
    let reminder = new_event_auto_source(REMINDER, &42u64)?;
    let forgotten = new_event_auto_source(REMINDER, &43u64)?;
    let forgotten_id = forgotten.id().to_owned();
    events
        .publish_with(reminder, PublishOptions::after(Duration::from_secs(2)))
        .await?;
    events
        .publish_with(forgotten, PublishOptions::after(Duration::from_secs(2)))
        .await?;
    for schedule in events.schedules().await? {
        println!(
            "scheduled: {} {} -> {}",
            schedule.id, schedule.schedule, schedule.target
        );
    }
    // Invoice 43 was paid meanwhile: its reminder is cancelled and never fires.
    events.cancel_schedule(&forgotten_id).await?;

    let invoice = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await?;
    println!(
        "handled invoice {invoice:?} after {:.1} s on the {} backend",
        started.elapsed().as_secs_f64(),
        backends.name
    );
    listener.stop(Duration::from_secs(5)).await;
    Ok(())
}
