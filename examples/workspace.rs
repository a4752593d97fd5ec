//! A workspace service and a client that uses it: query handlers for reads, event handlers for
//! changes, responses matched by transaction id.
//!
//! The service keeps workspaces in memory and answers:
//! - the query `cyverse.workspace.get` (one reply, or a 404 error reply),
//! - the query `cyverse.workspace.list` (a reply stream, one reply per workspace),
//! - the events `cyverse.workspace.create.requested` and `cyverse.workspace.delete.requested`,
//!   each answered with a response event (`...created`, `...deleted`, or `...failed`).
//!
//! The client creates two workspaces through request/response promises, reads them back with
//! queries, asks for one that does not exist, and deletes one. Run it in memory or on NATS:
//!
//! ```text
//! cargo run --example workspace
//! NATS_URL=nats://127.0.0.1:4222 cargo run --example workspace
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ce_messaging::error::RequestErrorKind;
use ce_messaging::prelude::*;
use ce_messaging::RemoteError;
use serde::{Deserialize, Serialize};

mod common;

const GET: &str = "cyverse.workspace.get";
const LIST: &str = "cyverse.workspace.list";
const CREATE_REQUESTED: &str = "cyverse.workspace.create.requested";
const CREATED: &str = "cyverse.workspace.created";
const DELETE_REQUESTED: &str = "cyverse.workspace.delete.requested";
const DELETED: &str = "cyverse.workspace.deleted";
const FAILED: &str = "cyverse.workspace.failed";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Workspace {
    name: String,
    owner: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct ByName {
    name: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Failure {
    name: String,
    reason: String,
}

/// The service's state, shared by all its handlers (given once with `with_state`).
type Store = Arc<Mutex<BTreeMap<String, Workspace>>>;

/// Reads the store; a poisoned lock (a panicking handler) is a handler failure, not a crash.
fn with_store<R>(
    store: &Store,
    f: impl FnOnce(&mut BTreeMap<String, Workspace>) -> R,
) -> Result<R, HandlerError> {
    let mut guard = store
        .lock()
        .map_err(|_| HandlerError::new("workspace store is poisoned"))?;
    Ok(f(&mut guard))
}

/// `cyverse.workspace.get`: one reply, or a 404 error reply.
async fn get(
    State(store): State<Store>,
    req: TypedRequest<ByName>,
) -> Result<Workspace, HandlerError> {
    with_store(&store, |s| s.get(&req.data.name).cloned())?.ok_or_else(|| {
        HandlerError::permanent(format!("no workspace named {:?}", req.data.name)).with_code(404)
    })
}

/// `cyverse.workspace.list`: a reply stream, one reply per workspace.
async fn list(
    State(store): State<Store>,
    _: TypedRequest<()>,
    reply: ReplyWriter,
) -> Result<(), HandlerError> {
    let all: Vec<Workspace> = with_store(&store, |s| s.values().cloned().collect())?;
    let stream = reply.stream();
    for workspace in &all {
        stream.push_data("cyverse.workspace.list.item", workspace)?;
    }
    stream.finish().await?;
    Ok(())
}

/// `cyverse.workspace.create.requested`: answered by `created` or `failed`.
async fn create(
    State(store): State<Store>,
    req: TypedEvent<Workspace>,
) -> Result<(), HandlerError> {
    let created = with_store(&store, |s| {
        if s.contains_key(&req.data.name) {
            false
        } else {
            s.insert(req.data.name.clone(), req.data.clone());
            true
        }
    })?;
    if created {
        req.responses.respond_data(CREATED, &req.data).await?;
    } else {
        let failure = Failure {
            name: req.data.name,
            reason: "exists".into(),
        };
        req.responses.respond_data(FAILED, &failure).await?;
    }
    Ok(())
}

/// `cyverse.workspace.delete.requested`: answered by `deleted` or `failed`.
async fn delete(State(store): State<Store>, req: TypedEvent<ByName>) -> Result<(), HandlerError> {
    match with_store(&store, |s| s.remove(&req.data.name))? {
        Some(workspace) => req.responses.respond_data(DELETED, &workspace).await?,
        None => {
            let failure = Failure {
                name: req.data.name,
                reason: "not found".into(),
            };
            req.responses.respond_data(FAILED, &failure).await?
        }
    };
    Ok(())
}

/// The service: query handlers for reads, event handlers for changes, one store.
async fn start_service(
    queries: &dyn QueryConnection,
    events: &dyn EventConnection,
) -> Result<(Listener, Listener), Box<dyn std::error::Error>> {
    let store = Store::default();
    let query_handlers = QueryHandlers::default()
        .on(GET, typed_handler(get))
        .on(LIST, typed_handler(list))
        .with_state(store.clone());
    let query_listener = queries
        .listen(query_handlers, QueryListenOptions::default())
        .await?;
    let event_handlers = EventHandlers::default()
        .on(CREATE_REQUESTED, typed_event_handler(create))
        .on(DELETE_REQUESTED, typed_event_handler(delete))
        .with_state(store);
    let event_listener = events
        .listen(event_handlers, EventListenOptions::default())
        .await?;
    Ok((query_listener, event_listener))
}

/// Publishes a change request and waits for its outcome event.
async fn change(
    events: &dyn EventConnection,
    event_type: &str,
    data: &impl Serialize,
    outcomes: &[&str],
) -> Result<ReceivedEvent, Box<dyn std::error::Error>> {
    let request = new_event_auto_source(event_type, data)?;
    let outcomes: Vec<EventType> = outcomes.iter().map(|t| EventType::from(*t)).collect();
    let mut promise = events.request(request, &outcomes).await?;
    let response = promise.response(Duration::from_secs(10)).await?;
    promise.close().await;
    Ok(response)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = Config::from_env()?;
    config
        .durable_name
        .get_or_insert_with(|| "workspace-service".to_string());
    let common::Backends {
        queries,
        events,
        name,
    } = common::backends(&config).await?;
    println!("backend: {name}");
    events.init_stream().await?;

    let (query_listener, event_listener) = start_service(queries.as_ref(), events.as_ref()).await?;

    // Creating: a request event, answered by `created` or `failed` with the same transaction id.
    for (name, owner) in [("alpha", "ana"), ("beta", "bo"), ("alpha", "someone-else")] {
        let ws = Workspace {
            name: name.into(),
            owner: owner.into(),
        };
        let outcome = change(events.as_ref(), CREATE_REQUESTED, &ws, &[CREATED, FAILED]).await?;
        println!(
            "create {name:>5}: {} {}",
            outcome.event_type(),
            data_text(&outcome)
        );
    }

    // Reading: one reply ...
    let reply = queries
        .request(new_event_auto_source(
            GET,
            &ByName {
                name: "alpha".into(),
            },
        )?)
        .await?;
    let alpha: Workspace = reply.data_as()?;
    println!("get alpha: owned by {}", alpha.owner);

    // ... a reply stream ...
    let mut list = queries
        .request_stream(
            new_event_auto_source(LIST, &())?,
            ReplyStreamOptions::default(),
        )
        .await?;
    while let Some(item) = list.next().await {
        let workspace: Workspace = item?.data_as()?;
        println!("list: {} ({})", workspace.name, workspace.owner);
    }

    // ... and an error reply, a typed error with the service's code.
    let missing = new_event_auto_source(
        GET,
        &ByName {
            name: "gamma".into(),
        },
    )?;
    match queries.request(missing).await {
        Err(err) if err.kind() == RequestErrorKind::Remote => match RemoteError::of(&err) {
            Some(remote) => println!(
                "get gamma: error {} from the service: {}",
                remote.code(),
                remote.text()
            ),
            None => println!("get gamma: remote error without a code: {err}"),
        },
        other => println!("get gamma: unexpected {other:?}"),
    }

    let outcome = change(
        events.as_ref(),
        DELETE_REQUESTED,
        &ByName {
            name: "beta".into(),
        },
        &[DELETED, FAILED],
    )
    .await?;
    println!(
        "delete beta: {} {}",
        outcome.event_type(),
        data_text(&outcome)
    );

    let grace = Duration::from_secs(5);
    let q = query_listener.stop(grace).await;
    let e = event_listener.stop(grace).await;
    println!(
        "stopped: {} queries and {} events handled",
        q.handled_total, e.handled_total
    );
    Ok(())
}

fn data_text(event: &Event) -> String {
    event
        .data_as::<serde_json::Value>()
        .map(|v| v.to_string())
        .unwrap_or_default()
}
