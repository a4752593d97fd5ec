//! Quickstart: a tiny "orders" service and a client talking to it in CloudEvents.
//!
//! It shows the three things services do with ce-messaging:
//!
//! 1. a **query** (request/reply over core NATS): the client asks for a greeting;
//! 2. an **event** (persisted on JetStream): the client publishes `order.created`, the service
//!    handles it on a durable consumer;
//! 3. a **request/response promise**: the client publishes an order and waits for the service's
//!    `order.accepted` response, matched by transaction id;
//!
//! then stops the listeners gracefully and prints what they did.
//!
//! Run it with no server at all (in-memory backend):
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! or against a real NATS server with JetStream (it creates the stream it needs):
//!
//! ```text
//! NATS_URL=nats://127.0.0.1:4222 cargo run --example quickstart
//! ```

use std::time::Duration;

use ce_messaging::prelude::*;
use ce_messaging::StartPosition;
use serde::{Deserialize, Serialize};

mod common;

const GREETING_GET: &str = "org.example.greeting.get";
const ORDER_CREATED: &str = "org.example.order.created";
const ORDER_ACCEPTED: &str = "org.example.order.accepted";

#[derive(Debug, Serialize, Deserialize)]
struct GreetingRequest {
    name: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    item: String,
    quantity: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Accepted {
    item: String,
    ready_in_minutes: u32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Every setting comes from NATS_* environment variables (see the README); the defaults
    // are fine here. The durable consumer gets a fixed name so reruns against a real server
    // reuse it instead of leaving a new one behind each time.
    let mut config = Config::from_env()?;
    config
        .durable_name
        .get_or_insert_with(|| "quickstart".to_string());
    // A new durable starts with the events published from now on (unless
    // NATS_JS_START_POSITION says otherwise): pointed at a shared server, the quickstart must
    // not work through another application's history of the same event types. The listener
    // below starts before anything is published, so it still gets its own events. A rerun
    // reuses the durable, which keeps its position (what was published in between comes).
    config.js_start_position.get_or_insert(StartPosition::New);

    let common::Backends {
        queries,
        events,
        name: backend,
    } = common::backends(&config).await?;
    match backend {
        "NATS" => println!(
            "backend: NATS at {}",
            ce_messaging::config::redact_url(&config.nats_url)
        ),
        _ => println!("backend: {backend} (set NATS_URL to use a NATS server)"),
    }

    // Events are persisted in a stream; services do not create it implicitly.
    events.init_stream().await?;
    println!("stream `{}` ready", config.js_stream);

    // --- The service side -------------------------------------------------------------------
    let query_listener = queries
        .listen(
            QueryHandlers::new().on(
                GREETING_GET,
                typed_handler(|req: TypedRequest<GreetingRequest>| async move {
                    println!("  [service] query {GREETING_GET} for {:?}", req.data.name);
                    Ok::<_, HandlerError>(format!("Hello, {}!", req.data.name))
                }),
            ),
            QueryListenOptions::default(),
        )
        .await?;

    let event_listener = events
        .listen(
            EventHandlers::new().on(
                ORDER_CREATED,
                typed_event_handler(|order: TypedEvent<Order>| async move {
                    println!(
                        "  [service] event {ORDER_CREATED}: {} x {} (transaction {})",
                        order.data.quantity,
                        order.data.item,
                        order
                            .event
                            .transaction_id()
                            .map(|t| t.to_string())
                            .unwrap_or_default()
                    );
                    let accepted = Accepted {
                        item: order.data.item,
                        ready_in_minutes: 5 * order.data.quantity,
                    };
                    order
                        .responses
                        .respond_data(ORDER_ACCEPTED, &accepted)
                        .await?;
                    Ok(())
                }),
            ),
            EventListenOptions::default(),
        )
        .await?;

    // --- The client side --------------------------------------------------------------------
    // 1. A query: one request, one reply.
    let request = new_event_auto_source(
        GREETING_GET,
        &GreetingRequest {
            name: "newcomer".into(),
        },
    )?;
    let reply = queries.request(request).await?;
    let greeting: String = reply.data_as()?;
    println!("[client] query reply ({}): {greeting}", reply.event_type());

    // 2. An event, stored by the server before publish returns.
    let order = new_event_auto_source(
        ORDER_CREATED,
        &Order {
            item: "coffee".into(),
            quantity: 1,
        },
    )?;
    let ack = events.publish(order).await?;
    println!(
        "[client] published {ORDER_CREATED}: stored as #{} in {}",
        ack.sequence, ack.stream
    );

    // 3. Request/response: publish an order and wait for the response with its transaction id.
    let order = new_event_auto_source(
        ORDER_CREATED,
        &Order {
            item: "tea".into(),
            quantity: 2,
        },
    )?;
    let mut promise = events
        .request(order, &[EventType::from(ORDER_ACCEPTED)])
        .await?;
    println!(
        "[client] requested an order, transaction {}",
        promise.transaction_id()
    );
    // The first order's response may come too; the promise only sees this transaction's.
    let response = promise.response(Duration::from_secs(10)).await?;
    let accepted: Accepted = response.data_as()?;
    println!(
        "[client] response {}: {} ready in {} minutes",
        response.event_type(),
        accepted.item,
        accepted.ready_in_minutes
    );
    promise.close().await;

    // --- Graceful shutdown ------------------------------------------------------------------
    let grace = Duration::from_secs(5);
    let q = query_listener.stop(grace).await;
    let e = event_listener.stop(grace).await;
    println!(
        "stopped: query listener handled {} request(s), event listener handled {} event(s); \
         {} cut off",
        q.handled_total,
        e.handled_total,
        q.abandoned + e.abandoned
    );
    Ok(())
}
