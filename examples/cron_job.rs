//! A recurring event: a cron schedule kept by the events stream, not by a timer in a process.
//!
//! `PublishOptions::cron` stores one schedule (on JetStream: an ADR-51 schedule, so it survives
//! restarts of this service and of the server); each firing is an ordinary event with its own
//! id, `<event id>@<next firing>`, so handlers and de-duplication tell firings apart.
//!
//! ```text
//! cargo run --example cron_job                                  # in-memory backend
//! NATS_URL=nats://127.0.0.1:4222 cargo run --example cron_job   # nats-server 2.14+
//! ```

use std::time::Duration;

use ce_messaging::prelude::*;
use tokio::sync::mpsc;

mod common;

const CLEANUP: &str = "org.example.cleanup.run";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config {
        durable_name: Some("cron-example".into()),
        ..Config::from_env()?
    };
    let backends = common::backends(&config).await?;
    let events = backends.events;
    events.init_stream().await?;

    let (tx, mut rx) = mpsc::channel(8);
    let handlers = EventHandlers::new().on(
        CLEANUP,
        event_handler_fn(move |event, _| {
            let tx = tx.clone();
            async move {
                println!(
                    "cleanup run {} at {}",
                    event.id(),
                    chrono::Utc::now().format("%H:%M:%S")
                );
                let _ = tx.send(()).await;
                Ok(())
            }
        }),
    );
    let listener = events
        .listen(handlers, EventListenOptions::default())
        .await?;

    // Every second second (6 fields: sec min hour day month weekday, UTC). A real job would
    // say e.g. "0 0 2 * * *" (02:00 UTC daily).
    let job = new_event_auto_source(CLEANUP, &serde_json::json!({ "older_than_days": 30 }))?;
    let schedule_id = job.id().to_owned();
    events
        .publish_with(job, PublishOptions::cron("*/2 * * * * *"))
        .await?;

    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await?;
    }
    events.cancel_schedule(&schedule_id).await?;
    println!(
        "three runs on the {} backend; schedule {schedule_id} cancelled",
        backends.name
    );
    listener.stop(Duration::from_secs(5)).await;
    Ok(())
}
