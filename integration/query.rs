//! `NatsQueries` against real nats-server processes (feature `nats_integration`): request/reply
//! in both content modes, the error kinds, reply streams and scatter-gather, the bounded worker
//! pool, queue groups, a listener surviving panics, garbage and a server kill, graceful stop,
//! and slow-consumer counting (issue 3, "Done when").

use ce_messaging_test_support as support;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ce_messaging::codec::{self, ContentMode};
use ce_messaging::config::Config;
use ce_messaging::error::{RemoteError, RequestError, RequestErrorKind};
use ce_messaging::event::{new_event, EventExt};
use ce_messaging::handler::HandlerError;
use ce_messaging::listener::Listener;
use ce_messaging::nats::NatsQueries;
use ce_messaging::query::{
    handler_fn, typed_handler, QueryConnection, QueryHandlers, QueryListenOptions,
    ReplyStreamOptions, TypedRequest,
};
use ce_messaging::{Event, ReceivedEvent};
use cloudevents::{AttributesReader, AttributesWriter, EventBuilder, EventBuilderV10};
use futures::StreamExt;
use support::server::{NatsServer, ServerOptions};
use tokio::sync::Semaphore;

/// The longest any single network wait in these tests may take.
const WAIT: Duration = Duration::from_secs(10);

fn core_server() -> NatsServer {
    NatsServer::start_with(ServerOptions {
        jetstream: false,
        ..Default::default()
    })
}

fn config(server: &NatsServer) -> Config {
    Config {
        nats_url: server.url(),
        request_timeout: Duration::from_secs(5),
        reconnect_wait: Duration::from_millis(100),
        ..Default::default()
    }
}

async fn connect(config: &Config) -> NatsQueries {
    within("connect", NatsQueries::connect(config))
        .await
        .expect("connect")
}

/// Awaits `fut`, panicking if it has no outcome within [`WAIT`].
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: no outcome within {WAIT:?}"),
    }
}

async fn listen(queries: &NatsQueries, handlers: QueryHandlers) -> Listener {
    listen_with(queries, handlers, QueryListenOptions::default()).await
}

async fn listen_with(
    queries: &NatsQueries,
    handlers: QueryHandlers,
    options: QueryListenOptions,
) -> Listener {
    within("listen", queries.listen(handlers, options))
        .await
        .expect("listen")
}

/// Waits until the server has processed `client`'s subscriptions (`flush` only writes the
/// socket): a message to the client's own fresh inbox comes back only after that.
async fn synced(client: &async_nats::Client) {
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await.expect("subscribe");
    client.publish(inbox, Bytes::new()).await.expect("publish");
    within("round trip", echo.next()).await.expect("echo");
}

fn request_event(op: &str, data: serde_json::Value) -> Event {
    new_event(op, "test-client", &data).expect("event")
}

fn remote(err: &RequestError) -> &RemoteError {
    RemoteError::of(err).unwrap_or_else(|| panic!("not a remote error: {err}"))
}

/// A handler answering `ping` with `pong` and its request's data.
fn ping_handlers(op: &str) -> QueryHandlers {
    QueryHandlers::new().on(
        op,
        handler_fn(|request: ReceivedEvent, reply| async move {
            let data: serde_json::Value = request.data_as()?;
            reply.reply_data("test.pong", &data).await?;
            Ok(())
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

/// A request with every kind of attribute, and text that needs escaping in binary mode.
fn rich_request(op: &str) -> Event {
    EventBuilderV10::new()
        .id("cloudevent-roundtrip-1")
        .ty(op)
        .source("urn:test:client with space")
        .subject("the subject %ü")
        .time(chrono::Utc::now())
        .data_with_schema(
            "application/json",
            "https://example.com/schema.json",
            serde_json::json!({"text": "héllo \"wörld\" 100%", "n": 7, "list": [1, 2, 3]}),
        )
        .extension("transactionid", "tid-roundtrip-1")
        .extension("custom", "a value: with spaces, ünïcode and %")
        .build()
        .expect("event")
}

fn echo_handlers() -> QueryHandlers {
    QueryHandlers::new()
        .on(
            "test.echo",
            handler_fn(|request: ReceivedEvent, reply| async move {
                // The reply is the request itself under another type: every attribute the
                // handler saw must come back to the requester.
                let mut answer = request.clone();
                answer.set_type("test.echo.reply");
                reply.reply(answer.into_event()).await?;
                Ok(())
            }),
        )
        .on(
            "test.fresh",
            handler_fn(|_request, reply| async move {
                // Built without a transaction id: the reply must carry the request's.
                let answer = EventBuilderV10::new()
                    .id("reply-1")
                    .ty("test.fresh.reply")
                    .source("replier")
                    .data("application/json", serde_json::json!({"ok": true}))
                    .build()?;
                reply.reply(answer).await?;
                Ok(())
            }),
        )
}

fn assert_same_attributes(sent: &Event, got: &Event) {
    assert_eq!(got.ty(), "test.echo.reply");
    assert_eq!(got.id(), sent.id());
    assert_eq!(got.source(), sent.source());
    assert_eq!(got.specversion(), sent.specversion());
    assert_eq!(got.subject(), sent.subject());
    assert_eq!(got.time(), sent.time());
    assert_eq!(got.datacontenttype(), sent.datacontenttype());
    assert_eq!(got.dataschema(), sent.dataschema());
    assert_eq!(got.extension("custom"), sent.extension("custom"));
    assert_eq!(got.transaction_id(), sent.transaction_id());
    assert_eq!(
        got.data_as::<serde_json::Value>().expect("reply data"),
        sent.data_as::<serde_json::Value>().expect("request data")
    );
}

async fn round_trip(mode: ContentMode) {
    let server = core_server();
    let cfg = Config {
        ce_mode: mode,
        ..config(&server)
    };
    let queries = connect(&cfg).await;
    let listener = listen(&queries, echo_handlers()).await;

    // A plain subscriber sees the request as it goes over the wire.
    let raw = support::connect(&server.url()).await;
    let mut spy = raw.subscribe("test.echo").await.expect("spy");
    synced(&raw).await;

    let request = rich_request("test.echo");
    let reply = within("request", queries.request(request.clone()))
        .await
        .expect("reply");
    assert_same_attributes(&request, &reply);

    let wire = within("spy", spy.next()).await.expect("spied request");
    let headers = wire.headers.expect("request headers");
    match mode {
        ContentMode::Binary => {
            assert!(headers.get("ce-specversion").is_some(), "binary request");
            assert_eq!(
                headers.get("ce-type").map(|v| v.as_str()),
                Some("test.echo")
            );
        }
        _ => {
            assert_eq!(
                headers.get("Content-Type").map(|v| v.as_str()),
                Some("application/cloudevents+json")
            );
            assert!(
                headers.get("ce-specversion").is_none(),
                "structured request"
            );
        }
    }

    // The reply travels in the request's content mode.
    let encoded = codec::encode(&request, mode).expect("encode");
    let raw_reply = within(
        "raw request",
        raw.request_with_headers("test.echo", encoded.headers.into(), encoded.payload),
    )
    .await
    .expect("raw reply");
    let reply_headers = raw_reply.headers.clone().expect("reply headers");
    assert_eq!(
        reply_headers.get("ce-specversion").is_some(),
        mode == ContentMode::Binary,
        "reply in the request's content mode"
    );
    let decoded = codec::decode(raw_reply.headers.as_ref(), &raw_reply.payload).expect("decode");
    assert_same_attributes(&request, &decoded);

    // A reply built without a transaction id carries the request's.
    let fresh = request_event("test.fresh", serde_json::json!({}));
    let tid = fresh.transaction_id().expect("tid");
    let reply = within("request", queries.request(fresh))
        .await
        .expect("reply");
    assert_eq!(reply.ty(), "test.fresh.reply");
    assert_eq!(reply.transaction_id(), Some(tid));

    within("stop", listener.stop(WAIT)).await;
}

#[tokio::test]
async fn round_trip_keeps_every_attribute_in_structured_mode() {
    round_trip(ContentMode::Structured).await;
}

#[tokio::test]
async fn round_trip_keeps_every_attribute_in_binary_mode() {
    round_trip(ContentMode::Binary).await;
}

#[tokio::test]
async fn request_gets_a_transaction_id_and_source_when_it_has_none() {
    let server = core_server();
    let cfg = Config {
        client_id: "the-requester".into(),
        ..config(&server)
    };
    let queries = connect(&cfg).await;
    let listener = listen(&queries, echo_handlers()).await;
    let request = EventBuilderV10::new()
        .id("no-tid")
        .ty("test.echo")
        .source("AUTO_POPULATE")
        .data("application/json", serde_json::json!({"x": 1}))
        .build()
        .expect("event");
    let reply = within("request", queries.request(request))
        .await
        .expect("reply");
    // The echo carries the request as it was sent: source filled in, transaction id added.
    assert_eq!(reply.source(), "the-requester");
    let tid = reply.transaction_id().expect("transaction id");
    assert!(tid.as_str().starts_with("tid-"), "{tid}");
    within("stop", listener.stop(WAIT)).await;
}

#[tokio::test]
async fn go_sdk_style_structured_request_without_content_type_is_answered() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let listener = listen(&queries, echo_handlers()).await;
    let request = rich_request("test.echo");
    // sdk-go sends the JSON event format with no headers at all.
    let payload = Bytes::from(serde_json::to_vec(&request).expect("json"));
    let raw = support::connect(&server.url()).await;
    let reply = within("raw request", raw.request("test.echo", payload))
        .await
        .expect("reply");
    let headers = reply.headers.as_ref();
    assert!(
        headers.is_none_or(|h| h.get("Nats-Service-Error-Code").is_none()),
        "no error reply"
    );
    let event = codec::decode(headers, &reply.payload).expect("decodable reply");
    assert_same_attributes(&request, &event);
    within("stop", listener.stop(WAIT)).await;
}

// ---------------------------------------------------------------------------------------------
// Error kinds
// ---------------------------------------------------------------------------------------------

fn failing_handlers() -> QueryHandlers {
    QueryHandlers::new()
        .on(
            "test.slow",
            handler_fn(|_request, reply| async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                reply.reply_data("test.slow.reply", &"late").await?;
                Ok(())
            }),
        )
        .on(
            "test.fail",
            handler_fn(|_request, _reply| async move { Err(HandlerError::new("boom")) }),
        )
        .on(
            "test.conflict",
            handler_fn(|_request, _reply| async move {
                Err(HandlerError::new("name taken").with_code(409))
            }),
        )
        .on(
            "test.typed",
            typed_handler(
                |req: TypedRequest<u64>| async move { Ok::<_, HandlerError>(req.data * 2) },
            ),
        )
        .on(
            "test.panic",
            handler_fn(|_request, _reply| async move {
                if std::hint::black_box(true) {
                    panic!("kaboom");
                }
                Ok(())
            }),
        )
}

#[tokio::test]
async fn timeout_is_timed_out_within_its_deadline() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let listener = listen(&queries, failing_handlers()).await;
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = within(
        "request",
        queries.request_with_timeout(request_event("test.slow", serde_json::json!(1)), timeout),
    )
    .await
    .expect_err("must time out");
    let elapsed = started.elapsed();
    assert_eq!(err.kind(), RequestErrorKind::TimedOut, "{err}");
    assert!(elapsed >= timeout, "{elapsed:?}");
    assert!(elapsed < timeout + Duration::from_secs(2), "{elapsed:?}");
    listener.abort().await;
}

#[tokio::test]
async fn no_responders_fails_at_once() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let started = Instant::now();
    let err = within(
        "request",
        queries.request(request_event("test.nobody", serde_json::json!(1))),
    )
    .await
    .expect_err("nobody listens");
    assert_eq!(err.kind(), RequestErrorKind::NoResponders, "{err}");
    // The default timeout is 5 s; "at once" is well below it.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    let stream_err = within(
        "stream",
        queries.request_stream(
            request_event("test.nobody", serde_json::json!(1)),
            ReplyStreamOptions::default(),
        ),
    )
    .await
    .expect("stream");
    let items: Vec<_> = within("stream end", stream_err.collect::<Vec<_>>()).await;
    assert_eq!(items.len(), 1);
    let err = items
        .into_iter()
        .next()
        .unwrap()
        .expect_err("no responders");
    assert_eq!(err.kind(), RequestErrorKind::NoResponders);
}

#[tokio::test]
async fn remote_errors_carry_each_code_and_text() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let listener = listen(&queries, failing_handlers()).await;
    let wildcard = listen_with(
        &queries,
        ping_handlers("wild.known"),
        QueryListenOptions {
            wildcard_subject: Some("wild.>".into()),
            ..Default::default()
        },
    )
    .await;

    let cases: [(&str, serde_json::Value, u16, &str); 5] = [
        ("test.fail", serde_json::json!(1), 500, "boom"),
        ("test.conflict", serde_json::json!(1), 409, "name taken"),
        ("test.panic", serde_json::json!(1), 500, "kaboom"),
        ("test.typed", serde_json::json!("not a number"), 400, ""),
        ("wild.unknown", serde_json::json!(1), 404, "wild.unknown"),
    ];
    for (op, data, code, text) in cases {
        let started = Instant::now();
        let err = within(op, queries.request(request_event(op, data)))
            .await
            .expect_err(op);
        assert_eq!(err.kind(), RequestErrorKind::Remote, "{op}: {err}");
        let remote = remote(&err);
        assert_eq!(remote.code(), code, "{op}: {remote}");
        assert!(remote.text().contains(text), "{op}: {remote}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{op} answered at once"
        );
    }

    // The wildcard listener serves the ops it knows.
    let reply = within(
        "wild.known",
        queries.request(request_event("wild.known", serde_json::json!("hi"))),
    )
    .await
    .expect("known op on the wildcard listener");
    assert_eq!(reply.data_as::<String>().unwrap(), "hi");

    // An undecodable request is answered with 400 in the NATS service error headers.
    let raw = support::connect(&server.url()).await;
    let reply = within(
        "garbage",
        raw.request("test.fail", Bytes::from_static(b"\xff\x00 not an event")),
    )
    .await
    .expect("garbage answered");
    let headers = reply.headers.expect("error headers");
    assert_eq!(
        headers.get("Nats-Service-Error-Code").map(|v| v.as_str()),
        Some("400")
    );
    assert!(headers.get("Nats-Service-Error").is_some());

    within("stop", listener.stop(WAIT)).await;
    within("stop", wildcard.stop(WAIT)).await;
}

#[tokio::test]
async fn undecodable_reply_is_a_decode_error() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let raw = support::connect(&server.url()).await;
    let mut responder = raw.subscribe("test.raw").await.expect("subscribe");
    synced(&raw).await;
    let raw_responder = raw.clone();
    let answering = tokio::spawn(async move {
        let request = responder.next().await.expect("request");
        let reply = request.reply.expect("reply subject");
        raw_responder
            .publish(reply, Bytes::from_static(b"{not json"))
            .await
            .expect("publish");
        raw_responder.flush().await.expect("flush");
    });
    let started = Instant::now();
    let err = within(
        "request",
        queries.request(request_event("test.raw", serde_json::json!(1))),
    )
    .await
    .expect_err("garbage reply");
    assert_eq!(err.kind(), RequestErrorKind::Decode, "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    within("responder", answering)
        .await
        .expect("responder task");
}

#[tokio::test]
async fn requests_after_close_say_connection_closed() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let listener = listen(&queries, ping_handlers("test.ping")).await;
    within("close", queries.close()).await;
    // The listener's subscriptions ended with the connection: it stopped by itself.
    within("listener stopped", listener.stopped()).await;
    let err = within(
        "request",
        queries.request(request_event("test.ping", serde_json::json!(1))),
    )
    .await
    .expect_err("closed");
    assert_eq!(err.kind(), RequestErrorKind::ConnectionClosed, "{err}");
}

#[tokio::test]
async fn oversized_request_is_refused_before_sending() {
    let server = NatsServer::start_with(ServerOptions {
        jetstream: false,
        extra_config: "max_payload: 4096".into(),
        ..Default::default()
    });
    let queries = connect(&config(&server)).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let listener = listen(
        &queries,
        QueryHandlers::new().on(
            "test.big",
            handler_fn(move |_request, reply| {
                seen.fetch_add(1, Ordering::SeqCst);
                async move {
                    reply.reply_data("test.big.reply", &()).await?;
                    Ok(())
                }
            }),
        ),
    )
    .await;
    let big = "x".repeat(8 * 1024);
    let err = within(
        "request",
        queries.request(request_event("test.big", serde_json::json!(big))),
    )
    .await
    .expect_err("too large");
    assert_eq!(err.kind(), RequestErrorKind::Encode, "{err}");
    assert!(err.to_string().contains("max_payload"), "{err}");
    within("stop", listener.stop(WAIT)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "nothing reached the handler"
    );
}

#[tokio::test]
async fn bad_options_get_typed_errors_and_nothing_is_subscribed() {
    use ce_messaging::error::ListenErrorKind;
    let server = core_server();
    let queries = connect(&config(&server)).await;

    let err = within(
        "listen",
        queries.listen(QueryHandlers::new(), QueryListenOptions::default()),
    )
    .await
    .expect_err("no handlers");
    assert_eq!(err.kind(), ListenErrorKind::InvalidOptions);

    let err = within(
        "listen",
        queries.listen(
            ping_handlers("test.ping"),
            QueryListenOptions {
                pool: ce_messaging::WorkerOptions::new(0, 256),
                ..Default::default()
            },
        ),
    )
    .await
    .expect_err("zero workers");
    assert_eq!(err.kind(), ListenErrorKind::InvalidOptions);

    let err = within(
        "listen",
        queries.listen(
            ping_handlers("test.ping"),
            QueryListenOptions {
                queue_group: Some("has space".into()),
                ..Default::default()
            },
        ),
    )
    .await
    .expect_err("invalid queue group");
    assert_eq!(err.kind(), ListenErrorKind::Subscribe, "{err}");

    // None of the refused listeners left a subscription behind.
    let err = within(
        "request",
        queries.request(request_event("test.ping", serde_json::json!(1))),
    )
    .await
    .expect_err("nobody listens");
    assert_eq!(err.kind(), RequestErrorKind::NoResponders);

    let err = within(
        "request_stream",
        queries.request_stream(
            request_event("test.ping", serde_json::json!(1)),
            ReplyStreamOptions::default().max_replies(0),
        ),
    )
    .await
    .expect_err("max_replies 0");
    assert_eq!(err.kind(), RequestErrorKind::InvalidOptions);

    let err = within(
        "request",
        queries.request(request_event("not a subject", serde_json::json!(1))),
    )
    .await
    .expect_err("op with a space");
    assert_eq!(err.kind(), RequestErrorKind::InvalidOptions, "{err}");
}

// ---------------------------------------------------------------------------------------------
// Reply streams and scatter-gather
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn reply_stream_of_1000_arrives_complete_and_in_order() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let listener = listen(
        &queries,
        QueryHandlers::new().on(
            "test.rows",
            handler_fn(|_request, reply| async move {
                let stream = reply.stream();
                for i in 0..1000u32 {
                    stream.push_data("test.rows.row", &i)?;
                }
                stream.finish().await?;
                Ok(())
            }),
        ),
    )
    .await;
    let request = request_event("test.rows", serde_json::json!({}));
    let tid = request.transaction_id().unwrap();
    let stream = within(
        "request_stream",
        queries.request_stream(
            request,
            ReplyStreamOptions::default().deadline(Duration::from_secs(30)),
        ),
    )
    .await
    .expect("stream");
    let started = Instant::now();
    let replies = within("1000 replies", stream.collect_all())
        .await
        .expect("complete stream");
    assert_eq!(replies.len(), 1000);
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.data_as::<usize>().unwrap(), i, "in order");
        assert_eq!(reply.transaction_id().as_ref(), Some(&tid));
    }
    // The stream ended on the total, not on the 30 s deadline.
    assert!(started.elapsed() < Duration::from_secs(10));
    within("stop", listener.stop(WAIT)).await;
}

/// Five repliers, each in its own queue group so that every one gets the request.
async fn five_repliers(queries: &NatsQueries, op: &str) -> Vec<Listener> {
    let mut listeners = Vec::new();
    for i in 0..5u32 {
        let handlers = QueryHandlers::new().on(
            op,
            handler_fn(move |_request, reply| async move {
                reply.reply_data("test.gather.reply", &i).await?;
                Ok(())
            }),
        );
        let options = QueryListenOptions {
            queue_group: Some(format!("replier-{i}")),
            ..Default::default()
        };
        listeners.push(listen_with(queries, handlers, options).await);
    }
    listeners
}

fn replier_ids(replies: &[ReceivedEvent]) -> BTreeSet<u32> {
    replies
        .iter()
        .map(|r| r.data_as::<u32>().unwrap())
        .collect()
}

async fn stop_all(listeners: Vec<Listener>) {
    for listener in listeners {
        within("stop", listener.stop(WAIT)).await;
    }
}

#[tokio::test]
async fn scatter_gather_ends_on_max_count() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let listeners = five_repliers(&queries, "test.gather").await;
    let started = Instant::now();
    let stream = within(
        "request_stream",
        queries.request_stream(
            request_event("test.gather", serde_json::json!({})),
            ReplyStreamOptions::default()
                .max_replies(3)
                .deadline(Duration::from_secs(30)),
        ),
    )
    .await
    .expect("stream");
    let replies = within("3 replies", stream.collect_all()).await.expect("ok");
    assert_eq!(replies.len(), 3);
    assert_eq!(replier_ids(&replies).len(), 3, "three different repliers");
    assert!(started.elapsed() < Duration::from_secs(5));
    stop_all(listeners).await;
}

#[tokio::test]
async fn scatter_gather_ends_on_total_deadline() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let listeners = five_repliers(&queries, "test.gather").await;
    let deadline = Duration::from_millis(700);
    let started = Instant::now();
    let stream = within(
        "request_stream",
        queries.request_stream(
            request_event("test.gather", serde_json::json!({})),
            ReplyStreamOptions::default().deadline(deadline),
        ),
    )
    .await
    .expect("stream");
    let replies = within("replies", stream.collect_all()).await.expect("ok");
    let elapsed = started.elapsed();
    assert_eq!(replier_ids(&replies), (0..5).collect(), "every replier");
    assert!(elapsed >= deadline, "ended on the deadline: {elapsed:?}");
    assert!(elapsed < deadline + Duration::from_secs(2), "{elapsed:?}");
    stop_all(listeners).await;
}

#[tokio::test]
async fn scatter_gather_ends_on_stall() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let listeners = five_repliers(&queries, "test.gather").await;
    let stall = Duration::from_millis(300);
    let started = Instant::now();
    let stream = within(
        "request_stream",
        queries.request_stream(
            request_event("test.gather", serde_json::json!({})),
            ReplyStreamOptions::default()
                .stall(stall)
                .deadline(Duration::from_secs(30)),
        ),
    )
    .await
    .expect("stream");
    let replies = within("replies", stream.collect_all()).await.expect("ok");
    let elapsed = started.elapsed();
    assert_eq!(replier_ids(&replies), (0..5).collect(), "every replier");
    assert!(elapsed >= stall, "{elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(5),
        "ended on the stall: {elapsed:?}"
    );
    stop_all(listeners).await;
}

#[tokio::test]
async fn scatter_gather_ends_on_empty_sentinel() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let listeners = five_repliers(&queries, "test.gather").await;
    // A sixth party sees the request and, when told, sends the empty "no more" message.
    let raw = support::connect(&server.url()).await;
    let mut watcher = raw.subscribe("test.gather").await.expect("subscribe");
    synced(&raw).await;

    let started = Instant::now();
    let mut stream = within(
        "request_stream",
        queries.request_stream(
            request_event("test.gather", serde_json::json!({})),
            ReplyStreamOptions::default()
                .sentinel(true)
                .deadline(Duration::from_secs(30)),
        ),
    )
    .await
    .expect("stream");
    let mut replies = Vec::new();
    for _ in 0..5 {
        replies.push(within("reply", stream.expect_next()).await.expect("reply"));
    }
    assert_eq!(replier_ids(&replies), (0..5).collect());
    let request = within("watcher", watcher.next()).await.expect("request");
    raw.publish(request.reply.expect("reply subject"), Bytes::new())
        .await
        .expect("sentinel");
    within("flush", raw.flush()).await.expect("flush");
    assert!(
        within("end", stream.next()).await.is_none(),
        "the sentinel ends the stream"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "not the deadline"
    );
    stop_all(listeners).await;
}

// ---------------------------------------------------------------------------------------------
// Worker pool and queue groups
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_never_run_more_than_four_handlers_and_answer_all_200() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let handlers = QueryHandlers::new().on(
        "test.work",
        handler_fn(move |request: ReceivedEvent, reply| {
            let (running, peak) = (r.clone(), p.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                // Simulated work, so that requests overlap.
                tokio::time::sleep(Duration::from_millis(20)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                let n: u32 = request.data_as()?;
                reply.reply_data("test.work.done", &n).await?;
                Ok(())
            }
        }),
    );
    // Room in the queue for every request: a full queue is answered 503 at once (shedding,
    // tested below); here every request must wait for one of the 4 workers.
    let options = QueryListenOptions {
        pool: ce_messaging::WorkerOptions::new(4, 200),
        ..Default::default()
    };
    let listener = listen_with(&queries, handlers, options).await;
    let requester = connect(&config(&server)).await;
    let requests = (0..200u32).map(|n| {
        let requester = requester.clone();
        async move {
            requester
                .request_with_timeout(
                    request_event("test.work", serde_json::json!(n)),
                    Duration::from_secs(30),
                )
                .await
                .map(|reply| (n, reply.data_as::<u32>().unwrap()))
        }
    });
    let results =
        tokio::time::timeout(Duration::from_secs(40), futures::future::join_all(requests))
            .await
            .expect("200 replies within 40 s");
    for result in results {
        let (sent, got) = result.expect("every request answered");
        assert_eq!(sent, got);
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        4,
        "never more than 4 at once, and 4 used"
    );
    let report = within("stop", listener.stop(WAIT)).await;
    assert_eq!(report.handled_total, 200);
}

#[tokio::test]
async fn two_instances_in_one_queue_group_share_the_load_each_request_once() {
    let server = core_server();
    let counts: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut listeners = Vec::new();
    for (i, count) in counts.iter().enumerate() {
        let cfg = Config {
            queue_group: Some("workspace-service".into()),
            client_id: format!("instance-{i}"),
            ..config(&server)
        };
        let instance = connect(&cfg).await;
        let count = count.clone();
        let handlers = QueryHandlers::new().on(
            "test.shared",
            handler_fn(move |_request, reply| {
                count.fetch_add(1, Ordering::SeqCst);
                async move {
                    reply.reply_data("test.shared.reply", &i).await?;
                    Ok(())
                }
            }),
        );
        listeners.push(listen(&instance, handlers).await);
    }
    let requester = connect(&config(&server)).await;
    let mut answered_by = [0usize; 2];
    for _ in 0..100 {
        let reply = within(
            "request",
            requester.request(request_event("test.shared", serde_json::json!({}))),
        )
        .await
        .expect("reply");
        answered_by[reply.data_as::<usize>().unwrap()] += 1;
    }
    stop_all(listeners).await;
    // Stopped: no handler runs any more, so the counts are final.
    let handled: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert_eq!(
        handled[0] + handled[1],
        100,
        "each request reached exactly one instance"
    );
    assert_eq!(handled, answered_by.to_vec());
    assert!(
        handled[0] > 0 && handled[1] > 0,
        "both instances served: {handled:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Survival
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn one_worker_survives_panics_and_garbage() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let handlers = QueryHandlers::new().on(
        "test.fragile",
        handler_fn(|request: ReceivedEvent, reply| async move {
            let word: String = request.data_as()?;
            if word == "panic" {
                panic!("asked to panic");
            }
            reply.reply_data("test.fragile.reply", &word).await?;
            Ok(())
        }),
    );
    let options = QueryListenOptions {
        pool: ce_messaging::WorkerOptions::new(1, 1),
        ..Default::default()
    };
    let listener = listen_with(&queries, handlers, options).await;
    let raw = support::connect(&server.url()).await;
    for round in 0..3 {
        let err = within(
            "panic",
            queries.request(request_event("test.fragile", serde_json::json!("panic"))),
        )
        .await
        .expect_err("panic answered as an error");
        assert_eq!(remote(&err).code(), 500);

        let garbage = within(
            "garbage",
            raw.request("test.fragile", Bytes::from_static(b"\x00\x01garbage")),
        )
        .await
        .expect("garbage answered");
        assert_eq!(
            garbage
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Service-Error-Code"))
                .map(|v| v.as_str()),
            Some("400")
        );

        let word = format!("still here {round}");
        let reply = within(
            "request",
            queries.request(request_event("test.fragile", serde_json::json!(word))),
        )
        .await
        .expect("the one worker still serves");
        assert_eq!(reply.data_as::<String>().unwrap(), word);
    }
    assert!(!listener.is_stopped());
    within("stop", listener.stop(WAIT)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_serves_again_after_kill_9_and_restart() {
    let server = Arc::new(core_server());
    let cfg = config(&server);
    let serving = connect(&cfg).await;
    let listener = listen(&serving, ping_handlers("test.ping")).await;
    let requester = connect(&cfg).await;
    let ping = || request_event("test.ping", serde_json::json!("ping"));
    within("request", requester.request(ping()))
        .await
        .expect("before the kill");

    let killed = server.clone();
    tokio::task::spawn_blocking(move || killed.kill())
        .await
        .expect("kill");

    // During the outage a request fails within its timeout: `Disconnected` once the client
    // noticed the outage (at once, or when the timeout ran out), `TimedOut` if it had not.
    let timeout = Duration::from_millis(500);
    let started = Instant::now();
    let err = within("request", requester.request_with_timeout(ping(), timeout))
        .await
        .expect_err("server is down");
    assert!(
        matches!(
            err.kind(),
            RequestErrorKind::Disconnected | RequestErrorKind::TimedOut
        ),
        "{err}"
    );
    assert!(started.elapsed() < timeout + Duration::from_secs(1));

    let restarted = server.clone();
    tokio::task::spawn_blocking(move || restarted.restart())
        .await
        .expect("restart");

    // The listener was not touched: its subscriptions come back with the connection.
    support::eventually(Duration::from_secs(30), || async {
        requester
            .request_with_timeout(ping(), Duration::from_secs(1))
            .await
            .is_ok()
    })
    .await;
    for _ in 0..10 {
        within("request", requester.request(ping()))
            .await
            .expect("after the restart");
    }
    assert!(!listener.is_stopped());
    within("stop", listener.stop(WAIT)).await;
}

// ---------------------------------------------------------------------------------------------
// Stopping
// ---------------------------------------------------------------------------------------------

/// Handlers for `test.hold`: requests with data `"probe"` are answered at once; others count
/// as held, wait for a permit of `gate`, then answer.
struct Held {
    started: AtomicUsize,
    running: AtomicUsize,
    finished: AtomicUsize,
    calls: AtomicUsize,
    gate: Semaphore,
}

fn held_handlers(held: Arc<Held>) -> QueryHandlers {
    QueryHandlers::new().on(
        "test.hold",
        handler_fn(move |request: ReceivedEvent, reply| {
            let held = held.clone();
            async move {
                held.calls.fetch_add(1, Ordering::SeqCst);
                let data: String = request.data_as()?;
                if data != "probe" {
                    held.started.fetch_add(1, Ordering::SeqCst);
                    held.running.fetch_add(1, Ordering::SeqCst);
                    let permit = held.gate.acquire().await;
                    drop(permit);
                    held.running.fetch_sub(1, Ordering::SeqCst);
                    held.finished.fetch_add(1, Ordering::SeqCst);
                }
                reply.reply_data("test.hold.reply", &data).await?;
                Ok(())
            }
        }),
    )
}

fn new_held() -> Arc<Held> {
    Arc::new(Held {
        started: AtomicUsize::new(0),
        running: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        calls: AtomicUsize::new(0),
        gate: Semaphore::new(0),
    })
}

async fn probe_is_no_responders(requester: &NatsQueries) -> bool {
    let probe = request_event("test.hold", serde_json::json!("probe"));
    matches!(
        requester.request_with_timeout(probe, Duration::from_secs(1)).await,
        Err(e) if e.kind() == RequestErrorKind::NoResponders
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_10_in_flight_answers_all_and_then_nobody_responds() {
    let server = core_server();
    let serving = connect(&config(&server)).await;
    let requester = connect(&config(&server)).await;
    let held = new_held();
    let listener = listen_with(
        &serving,
        held_handlers(held.clone()),
        QueryListenOptions {
            pool: ce_messaging::WorkerOptions::new(16, 16),
            ..Default::default()
        },
    )
    .await;

    let in_flight: Vec<_> = (0..10)
        .map(|i| {
            let requester = requester.clone();
            tokio::spawn(async move {
                requester
                    .request_with_timeout(
                        request_event("test.hold", serde_json::json!(format!("r{i}"))),
                        Duration::from_secs(20),
                    )
                    .await
            })
        })
        .collect();
    support::eventually(WAIT, || async { held.started.load(Ordering::SeqCst) == 10 }).await;

    let stopping = {
        let listener = listener.clone();
        tokio::spawn(async move { listener.stop(Duration::from_secs(20)).await })
    };
    // Intake stops first: new requests find nobody while the 10 are still held.
    support::eventually(WAIT, || probe_is_no_responders(&requester)).await;
    assert!(
        !stopping.is_finished(),
        "stop waits for the in-flight handlers"
    );
    assert_eq!(held.running.load(Ordering::SeqCst), 10);

    held.gate.add_permits(10);
    let report = within("stop", stopping).await.expect("stop task");
    // When stop returns, no handler of the listener runs any more.
    assert_eq!(held.running.load(Ordering::SeqCst), 0);
    assert_eq!(held.finished.load(Ordering::SeqCst), 10);
    assert_eq!(report.finished, 10, "{report:?}");
    assert_eq!(report.abandoned, 0, "{report:?}");
    assert!(listener.is_stopped());

    for (i, request) in in_flight.into_iter().enumerate() {
        let reply = within("in-flight reply", request)
            .await
            .expect("task")
            .expect("in-flight request answered");
        assert_eq!(reply.data_as::<String>().unwrap(), format!("r{i}"));
    }
    let calls = held.calls.load(Ordering::SeqCst);
    assert!(probe_is_no_responders(&requester).await);
    assert_eq!(
        held.calls.load(Ordering::SeqCst),
        calls,
        "no handler ran after stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_caught_by_a_stopping_listener_fail_fast() {
    let server = core_server();
    let serving = connect(&config(&server)).await;
    let requester = connect(&config(&server)).await;
    let held = new_held();
    // One worker and one queue slot: of five requests one runs, one waits in the queue, the
    // others wait in the intake and the subscription's buffer when the stop begins.
    let listener = listen_with(
        &serving,
        held_handlers(held.clone()),
        QueryListenOptions {
            pool: ce_messaging::WorkerOptions::new(1, 1),
            ..Default::default()
        },
    )
    .await;
    let timeout = Duration::from_secs(20);
    let started = Instant::now();
    let requests: Vec<_> = (0..5)
        .map(|i| {
            let requester = requester.clone();
            tokio::spawn(async move {
                requester
                    .request_with_timeout(
                        request_event("test.hold", serde_json::json!(format!("r{i}"))),
                        timeout,
                    )
                    .await
            })
        })
        .collect();
    support::eventually(WAIT, || async { held.started.load(Ordering::SeqCst) == 1 }).await;
    let stopping = {
        let listener = listener.clone();
        tokio::spawn(async move { listener.stop(Duration::from_secs(20)).await })
    };
    support::eventually(WAIT, || probe_is_no_responders(&requester)).await;
    held.gate.add_permits(5);
    within("stop", stopping).await.expect("stop task");

    let mut answered = 0;
    for request in requests {
        match within("request", request).await.expect("task") {
            Ok(_) => answered += 1,
            Err(err) => {
                // Refused by the stopping listener (503), or sent after it unsubscribed.
                let refused = RemoteError::of(&err).is_some_and(|r| r.code() == 503);
                assert!(
                    refused || err.kind() == RequestErrorKind::NoResponders,
                    "{err}"
                );
            }
        }
    }
    assert!(answered >= 1, "the running request was answered");
    assert!(
        started.elapsed() < timeout / 2,
        "nobody waited for the timeout: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn cancelling_the_token_stops_the_listener() {
    let server = core_server();
    let queries = connect(&config(&server)).await;
    let held = new_held();
    let listener = listen(&queries, held_handlers(held.clone())).await;
    let reply = within(
        "request",
        queries.request(request_event("test.hold", serde_json::json!("probe"))),
    )
    .await
    .expect("served before the stop");
    assert_eq!(reply.data_as::<String>().unwrap(), "probe");

    listener.cancellation_token().cancel();
    let report = within("stopped", listener.stopped()).await;
    assert_eq!(report.handled_total, 1);
    assert!(listener.is_stopped());
    assert!(probe_is_no_responders(&queries).await);
}

/// A listener of one op polls its one subscription directly; a listener of several ops merges
/// their subscriptions. Both serve every op and both end, having answered what they took,
/// when their connection closes under them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_op_and_two_op_listeners_serve_and_end_when_their_connection_closes() {
    let server = core_server();
    let requester = connect(&config(&server)).await;
    for ops in [vec!["test.one"], vec!["test.one", "test.two"]] {
        let serving = connect(&config(&server)).await;
        let mut handlers = QueryHandlers::new();
        for op in &ops {
            handlers = handlers.on(
                *op,
                handler_fn(|request: ReceivedEvent, reply| async move {
                    let data: String = request.data_as()?;
                    reply.reply_data("test.reply", &data).await?;
                    Ok(())
                }),
            );
        }
        let listener = listen(&serving, handlers).await;
        for op in &ops {
            let reply = within(
                "request",
                requester.request(request_event(op, serde_json::json!(op))),
            )
            .await
            .expect("answered");
            assert_eq!(reply.data_as::<String>().unwrap(), *op);
        }
        serving.close().await;
        let report = within("the listener ends with its connection", listener.stopped()).await;
        assert_eq!(report.handled_total, ops.len() as u64, "{ops:?}");
        assert!(listener.is_stopped());
        for op in &ops {
            let late = requester.request_with_timeout(
                request_event(op, serde_json::json!("late")),
                Duration::from_secs(2),
            );
            let err = within("request after close", late).await.unwrap_err();
            assert_eq!(err.kind(), RequestErrorKind::NoResponders, "{ops:?}: {err}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Slow consumers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_events_are_counted() {
    let server = core_server();
    let cfg = config(&server);
    let options = cfg
        .connect_options()
        .expect("options")
        .subscription_capacity(4);
    let queries = within("connect", NatsQueries::connect_with_options(&cfg, options))
        .await
        .expect("connect");
    assert_eq!(queries.slow_consumer_events(), 0);
    // A listener's intake reads as fast as requests come (a full worker queue is answered 503),
    // so a slow consumer is now a subscription of the connection that nobody reads: four
    // buffered messages, the rest of 100 overflow and the client reports it.
    let unread = queries
        .client()
        .subscribe("test.unread")
        .await
        .expect("subscribe");
    synced(queries.client()).await;
    let raw = support::connect(&server.url()).await;
    for i in 0..100 {
        raw.publish("test.unread", format!("m{i}").into())
            .await
            .expect("publish");
    }
    within("flush", raw.flush()).await.expect("flush");
    support::eventually(WAIT, || async { queries.slow_consumer_events() > 0 }).await;
    drop(unread);

    // Nothing else broke: a listener on the same connection still serves.
    let listener = listen(&queries, ping_handlers("test.ping")).await;
    let requester = connect(&cfg).await;
    within(
        "request",
        requester.request(request_event("test.ping", serde_json::json!(1))),
    )
    .await
    .expect("served");
    within("stop", listener.stop(WAIT)).await;
}

// ---------------------------------------------------------------------------------------------
// Hardening (issue 15): dispatch by subject, reply size, overload and deadlines, outages
// ---------------------------------------------------------------------------------------------

/// Sends raw `headers`/`payload` as a request on `subject` from a plain client and returns the
/// reply message.
async fn raw_request(
    client: &async_nats::Client,
    subject: &str,
    event: &Event,
    mode: ContentMode,
) -> async_nats::Message {
    let encoded = codec::encode(event, mode).expect("encode");
    let request = async_nats::Request::new()
        .headers(encoded.headers.into())
        .payload(encoded.payload)
        .timeout(Some(WAIT));
    within(
        "raw request",
        client.send_request(subject.to_owned(), request),
    )
    .await
    .expect("a reply")
}

fn reply_header<'a>(message: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
}

/// Issue 15, item 2: a request published on `test.public` that carries type `test.admin` is
/// answered with a 400 naming both; the `test.admin` handler never runs (the subject is what
/// subject-based permissions look at).
#[tokio::test]
async fn request_whose_type_disagrees_with_its_subject_is_400_naming_both() {
    let server = core_server();
    let cfg = config(&server);
    let serving = connect(&cfg).await;
    let admin_calls = Arc::new(AtomicUsize::new(0));
    let calls = admin_calls.clone();
    let handlers = ping_handlers("test.public").on(
        "test.admin",
        handler_fn(move |_request: ReceivedEvent, reply| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                reply.reply_data("test.admin.reply", &"secret").await?;
                Ok(())
            }
        }),
    );
    let listener = listen(&serving, handlers).await;
    let raw = support::connect(&server.url()).await;
    for mode in [ContentMode::Structured, ContentMode::Binary] {
        let sneaky = request_event("test.admin", serde_json::json!("x"));
        let reply = raw_request(&raw, "test.public", &sneaky, mode).await;
        assert_eq!(
            reply_header(&reply, "Nats-Service-Error-Code"),
            Some("400"),
            "{mode:?}: {:?}",
            reply.headers
        );
        let text = reply_header(&reply, "Nats-Service-Error").unwrap_or_default();
        assert!(
            text.contains("test.admin") && text.contains("test.public"),
            "{text}"
        );
    }
    assert_eq!(admin_calls.load(Ordering::SeqCst), 0);
    // The matching requests are served as before.
    let requester = connect(&cfg).await;
    within(
        "request",
        requester.request(request_event("test.admin", serde_json::json!(1))),
    )
    .await
    .expect("admin on its own subject");
    within(
        "request",
        requester.request(request_event("test.public", serde_json::json!(1))),
    )
    .await
    .expect("public on its own subject");
    assert_eq!(admin_calls.load(Ordering::SeqCst), 1);
    within("stop", listener.stop(WAIT)).await;
}

/// Issue 15, item 2 (wildcard mode): dispatch stays by type, so the `test.admin` handler of a
/// `test.>` listener answers a request published on `test.public` (documented: subject
/// permissions do not choose the handler there).
#[tokio::test]
async fn wildcard_listener_still_dispatches_by_type() {
    let server = core_server();
    let cfg = config(&server);
    let serving = connect(&cfg).await;
    let listener = listen_with(
        &serving,
        ping_handlers("test.admin"),
        QueryListenOptions {
            wildcard_subject: Some("test.>".into()),
            ..Default::default()
        },
    )
    .await;
    let raw = support::connect(&server.url()).await;
    let request = request_event("test.admin", serde_json::json!("w"));
    let reply = raw_request(&raw, "test.public", &request, ContentMode::Structured).await;
    assert_eq!(reply_header(&reply, "Nats-Service-Error-Code"), None);
    let event = codec::decode(reply.headers.as_ref(), &reply.payload).expect("reply");
    assert_eq!(event.ty(), "test.pong");
    within("stop", listener.stop(WAIT)).await;
}

/// Issue 15, item 3: a reply larger than the server's `max_payload` becomes a prompt 500
/// ("reply too large") instead of a requester waiting out its timeout, and the handler's
/// `reply` gets a typed error.
#[tokio::test]
async fn oversized_reply_is_a_prompt_500_and_a_typed_error_for_the_handler() {
    let server = NatsServer::start_with(ServerOptions {
        jetstream: false,
        extra_config: "max_payload: 65536".into(),
        ..Default::default()
    });
    let cfg = config(&server);
    let serving = connect(&cfg).await;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<String>(4);
    let handlers = QueryHandlers::new().on(
        "test.big",
        handler_fn(move |_request: ReceivedEvent, reply| {
            let seen_tx = seen_tx.clone();
            async move {
                let big = "x".repeat(100_000);
                let result = reply.reply_data("test.big.reply", &big).await;
                let _ = seen_tx
                    .send(match &result {
                        Ok(()) => "ok".to_owned(),
                        Err(e) => format!("{:?}: {e}", e.kind()),
                    })
                    .await;
                result?;
                Ok(())
            }
        }),
    );
    let listener = listen(&serving, handlers).await;
    let requester = connect(&cfg).await;
    let timeout = Duration::from_secs(8);
    let err = within(
        "request",
        requester.request_with_timeout(request_event("test.big", serde_json::json!(1)), timeout),
    )
    .await
    .expect_err("the reply is too large");
    assert_eq!(err.kind(), RequestErrorKind::Remote, "{err}");
    let remote = remote(&err);
    assert_eq!(remote.code(), 500);
    assert!(
        remote.text().contains("reply too large") && remote.text().contains("65536"),
        "{}",
        remote.text()
    );
    let seen = within("handler's result", seen_rx.recv())
        .await
        .expect("handler ran");
    assert!(seen.starts_with("TooLarge"), "{seen}");
    within("stop", listener.stop(WAIT)).await;
}

/// Issue 15, item 4: the requester says how long it waits (`Request-Timeout-Ms`).
#[tokio::test]
async fn requests_carry_their_remaining_timeout() {
    let server = core_server();
    let cfg = config(&server);
    let raw = support::connect(&server.url()).await;
    let mut requests = raw.subscribe("test.deadline").await.expect("subscribe");
    synced(&raw).await;
    let requester = connect(&cfg).await;
    let sent = tokio::spawn(async move {
        requester
            .request_with_timeout(
                request_event("test.deadline", serde_json::json!(1)),
                Duration::from_millis(1500),
            )
            .await
    });
    let message = within("request", requests.next()).await.expect("a request");
    let value: u64 = message
        .headers
        .as_ref()
        .and_then(|h| h.get("Request-Timeout-Ms"))
        .map(|v| v.as_str().parse().expect("a number of milliseconds"))
        .expect("Request-Timeout-Ms header");
    assert!(value > 0 && value <= 1500, "{value}");
    let err = within("timeout", sent)
        .await
        .expect("join")
        .expect_err("no reply");
    assert_eq!(err.kind(), RequestErrorKind::TimedOut);
}

/// Issue 15, item 4: requests whose caller gave up while they waited for a worker are dropped,
/// not handled: one worker busy for 1 s, four more requests with a 200 ms timeout queued
/// behind it; only the first handler ever starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_whose_caller_gave_up_are_dropped() {
    let server = core_server();
    let cfg = config(&server);
    let serving = connect(&cfg).await;
    let started = Arc::new(AtomicUsize::new(0));
    let count = started.clone();
    let handlers = QueryHandlers::new().on(
        "test.slow",
        handler_fn(move |request: ReceivedEvent, reply| {
            let count = count.clone();
            async move {
                let data: String = request.data_as()?;
                if data != "probe" {
                    count.fetch_add(1, Ordering::SeqCst);
                    // Long enough that the four queued behind it expire on the listener's
                    // clock (deadline = receipt + 200 ms) even if they arrive late.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                reply.reply_data("test.slow.reply", &data).await?;
                Ok(())
            }
        }),
    );
    let listener = listen_with(
        &serving,
        handlers,
        QueryListenOptions {
            pool: ce_messaging::WorkerOptions::new(1, 8),
            ..Default::default()
        },
    )
    .await;
    let requester = connect(&cfg).await;
    let burst = futures::future::join_all((0..5).map(|i| {
        requester.request_with_timeout(
            request_event("test.slow", serde_json::json!(format!("r{i}"))),
            Duration::from_millis(200),
        )
    }))
    .await;
    for result in &burst {
        let err = result.as_ref().expect_err("the caller gave up");
        assert_eq!(err.kind(), RequestErrorKind::TimedOut, "{err}");
    }
    // The probe queues behind whatever is left: once it is answered, the four were taken out.
    within(
        "probe",
        requester.request(request_event("test.slow", serde_json::json!("probe"))),
    )
    .await
    .expect("probe served");
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "handlers ran for callers that had given up"
    );
    within("stop", listener.stop(WAIT)).await;
}

/// Issue 15, item 4, the measurement: a 500 ms handler, 2 workers, buffer 4, 400 concurrent
/// requests with a 2 s timeout. The listener answers what it cannot queue with 503 at once,
/// and a fresh request sent after the burst's deadline is served within about one handler
/// time (before: it timed out behind stale work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_400_is_shed_and_a_fresh_request_is_served_after_it() {
    const HANDLER: Duration = Duration::from_millis(500);
    let server = core_server();
    let cfg = config(&server);
    let serving = connect(&cfg).await;
    let started = Arc::new(AtomicUsize::new(0));
    let count = started.clone();
    let handlers = QueryHandlers::new().on(
        "test.work",
        handler_fn(move |request: ReceivedEvent, reply| {
            let count = count.clone();
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(HANDLER).await;
                let data: serde_json::Value = request.data_as()?;
                reply.reply_data("test.work.reply", &data).await?;
                Ok(())
            }
        }),
    );
    let listener = listen_with(
        &serving,
        handlers,
        QueryListenOptions {
            pool: ce_messaging::WorkerOptions::new(2, 4),
            ..Default::default()
        },
    )
    .await;
    let requester = connect(&cfg).await;
    let burst_started = Instant::now();
    let results = within(
        "the burst",
        futures::future::join_all((0..400).map(|i| {
            requester.request_with_timeout(
                request_event("test.work", serde_json::json!(i)),
                Duration::from_secs(2),
            )
        })),
    )
    .await;
    let burst_took = burst_started.elapsed();
    let (mut ok, mut busy, mut timed_out, mut other) = (0, 0, 0, Vec::new());
    for result in &results {
        match result {
            Ok(_) => ok += 1,
            Err(e) if e.kind() == RequestErrorKind::TimedOut => timed_out += 1,
            Err(e) if RemoteError::of(e).is_some_and(|r| r.code() == 503) => busy += 1,
            Err(e) => other.push(e.to_string()),
        }
    }
    let handled_in_burst = started.load(Ordering::SeqCst);
    // Fresh request after the burst's deadline, with a timeout of one handler time + margin.
    let fresh_started = Instant::now();
    let fresh = within(
        "fresh request",
        requester.request_with_timeout(
            request_event("test.work", serde_json::json!("fresh")),
            HANDLER + Duration::from_millis(1500),
        ),
    )
    .await;
    let fresh_took = fresh_started.elapsed();
    eprintln!(
        "burst: {ok} ok, {busy} busy (503), {timed_out} timed out, {} other, {handled_in_burst} handlers started, burst ended after {burst_took:?}; fresh request: {:?} after {fresh_took:?}",
        other.len(),
        fresh.as_ref().map(|_| "ok").map_err(|e| e.to_string()),
    );
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(ok + busy + timed_out, 400);
    assert!(busy > 0, "nothing was shed");
    assert!(ok >= 2, "the listener served nothing");
    fresh.expect("a fresh request after the burst is served");
    // Accounting: every request served had its handler started; no handler started for a
    // request answered busy.
    assert!(
        handled_in_burst >= ok,
        "{handled_in_burst} started, {ok} ok"
    );
    assert!(
        handled_in_burst + busy <= 400,
        "{handled_in_burst} started, {busy} busy"
    );
    within("stop", listener.stop(WAIT)).await;
}

/// Issue 15: a request while the connection is down says so at once, instead of only timing
/// out after the full timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_during_an_outage_says_disconnected() {
    let server = Arc::new(core_server());
    let cfg = config(&server);
    let requester = connect(&cfg).await;
    let killed = server.clone();
    tokio::task::spawn_blocking(move || killed.kill())
        .await
        .expect("kill");
    support::eventually(WAIT, || async {
        requester.client().connection_state() == async_nats::connection::State::Disconnected
    })
    .await;
    let timeout = Duration::from_secs(5);
    let started = Instant::now();
    let err = within(
        "request",
        requester.request_with_timeout(request_event("test.ping", serde_json::json!(1)), timeout),
    )
    .await
    .expect_err("server is down");
    let took = started.elapsed();
    eprintln!("request during the outage: {err} after {took:?}");
    assert_eq!(err.kind(), RequestErrorKind::Disconnected, "{err}");
    assert!(err.to_string().contains("not connected"), "{err}");
    assert!(took < timeout, "reported only after the full timeout");
    // A reply stream says so too.
    let err = within(
        "request stream",
        requester.request_stream(
            request_event("test.ping", serde_json::json!(1)),
            ReplyStreamOptions::default(),
        ),
    )
    .await
    .expect_err("server is down");
    assert_eq!(err.kind(), RequestErrorKind::Disconnected, "{err}");
}
