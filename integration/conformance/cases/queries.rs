//! Query cases: request/reply, errors, reply streams, scatter-gather, queue groups, the worker
//! bound, stopping.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use ce_messaging::codec::ContentMode;
use ce_messaging::config::Config;
use ce_messaging::error::{RemoteError, RequestErrorKind};
use ce_messaging::event::{
    new_event_auto_source, new_event_with_tid, EventExt, AUTO_POPULATE_SOURCE,
};
use ce_messaging::handler::HandlerError;
use ce_messaging::listener::Listener;
use ce_messaging::query::{
    handler_fn, typed_handler, QueryConnection, QueryHandlers, QueryListenOptions,
    ReplyStreamOptions, TypedRequest,
};
use ce_messaging::{Event, ReceivedEvent};
use cloudevents::{AttributesReader, AttributesWriter};
use futures::future::join_all;
use serde_json::{json, Value};

use super::{within, within_for, Gate, Peak, Seen, WAIT};
use crate::backend::{unique, QueryBackend};

/// A fresh op name, unique to this case run.
fn new_op(name: &str) -> String {
    format!("conf.{}.{name}", unique())
}

fn options() -> QueryListenOptions {
    QueryListenOptions {
        pool: ce_messaging::WorkerOptions::new(4, 16).with_grace(Duration::from_secs(5)),
        ..Default::default()
    }
}

fn in_group(group: &str) -> QueryListenOptions {
    QueryListenOptions {
        queue_group: Some(group.to_owned()),
        ..options()
    }
}

fn request_event(op: &str, data: &Value) -> Event {
    new_event_auto_source(op, data).expect("event")
}

/// Answers every request with `name` as data.
fn named(op: &str, name: &'static str) -> QueryHandlers {
    QueryHandlers::new().on(
        op,
        handler_fn(move |request: ReceivedEvent, reply| async move {
            reply
                .reply_data(&format!("{}.reply", request.ty()), &name)
                .await?;
            Ok(())
        }),
    )
}

/// Answers once the gate opens; records that it started.
fn gated(op: &str, gate: &Gate, started: &Seen<String>) -> QueryHandlers {
    let (gate, started) = (gate.clone(), started.clone());
    QueryHandlers::new().on(
        op,
        handler_fn(move |request: ReceivedEvent, reply| {
            let (gate, started) = (gate.clone(), started.clone());
            async move {
                started.push(request.id().to_owned());
                gate.wait().await;
                reply.reply_data("conf.late", &"late").await?;
                Ok(())
            }
        }),
    )
}

async fn listen<Q: QueryConnection>(
    connection: &Q,
    handlers: QueryHandlers,
    options: QueryListenOptions,
) -> Listener {
    within("listen", connection.listen(handlers, options))
        .await
        .expect("listen")
}

fn remote_code(err: &ce_messaging::error::RequestError) -> (u16, String) {
    assert_eq!(err.kind(), RequestErrorKind::Remote, "{err}");
    let remote = RemoteError::of(err).expect("a remote error carries its code");
    (remote.code(), remote.text().to_owned())
}

async fn assert_no_responders<Q: QueryConnection>(client: &Q, op: &str) {
    let result = within_for(
        Duration::from_secs(5),
        "a request nobody serves to fail at once",
        client.request_with_timeout(request_event(op, &json!(null)), Duration::from_secs(30)),
    )
    .await;
    let err = result.expect_err("nobody serves this op");
    assert_eq!(err.kind(), RequestErrorKind::NoResponders, "{err}");
}

/// A backend with a server and a client connection, both in content mode `mode`.
async fn in_mode<B: QueryBackend>(
    mode: ContentMode,
) -> (B, Config, B::Queries, Config, B::Queries) {
    let env = B::start().await;
    let mut server_config = env.config("svc");
    server_config.ce_mode = mode;
    let mut client_config = env.config("cli");
    client_config.ce_mode = mode;
    let server = env.queries(&server_config).await;
    let client = env.queries(&client_config).await;
    (env, server_config, server, client_config, client)
}

async fn roundtrip<B: QueryBackend>(mode: ContentMode) {
    let (_env, server_config, server, client_config, client) = in_mode::<B>(mode).await;
    let op = new_op("echo");
    let seen: Seen<ReceivedEvent> = Seen::new();
    let recorder = seen.clone();
    let handlers = QueryHandlers::new().on(
        &op,
        handler_fn(move |request: ReceivedEvent, reply| {
            let recorder = recorder.clone();
            async move {
                recorder.push(request.clone());
                let data: Value = request.data_as()?;
                let tid = request
                    .transaction_id()
                    .expect("requests carry a transaction id");
                let mut answer = new_event_with_tid(
                    format!("{}.reply", request.ty()),
                    AUTO_POPULATE_SOURCE,
                    &json!({ "echo": data }),
                    tid,
                )?;
                answer.set_extension("conftag", "back \"100%\" é");
                reply.reply(answer).await?;
                Ok(())
            }
        }),
    );
    let listener = listen(&server, handlers, options()).await;

    let data = json!({"name": "é ü \"quoted\" 100% ∑", "n": 42, "list": [1, 2, 3]});
    let mut request = request_event(&op, &data);
    request.set_extension("conftag", "a b%c\"d é\u{1F600}");
    request.set_subject(Some("workspace/w1 é"));
    let tid = request
        .transaction_id()
        .expect("new events have a transaction id");
    let reply = within("the reply", client.request(request.clone()))
        .await
        .expect("reply");

    let got = seen.snapshot().pop().expect("the handler saw the request");
    assert_eq!(got.id(), request.id());
    assert_eq!(got.ty(), op);
    assert_eq!(
        got.source(),
        client_config.client_id,
        "AUTO_POPULATE source is filled in"
    );
    assert_eq!(got.subject(), Some("workspace/w1 é"));
    assert_eq!(got.time(), request.time());
    assert_eq!(got.datacontenttype(), Some("application/json"));
    assert_eq!(got.transaction_id(), Some(tid.clone()));
    assert_eq!(
        got.extension("conftag").map(|v| v.to_string()),
        Some("a b%c\"d é\u{1F600}".to_owned())
    );
    assert_eq!(got.data_as::<Value>().expect("data"), data);
    // JSON data has one form on every backend and in both modes: the JSON text that
    // `new_event` built (`Data::Binary`), handed to the handler byte for byte.
    assert!(
        matches!(request.data(), Some(cloudevents::Data::Binary(_))),
        "{:?}",
        request.data()
    );
    assert_eq!(got.data(), request.data());
    // The reply (built by `new_event_with_tid`) reaches the requester as its JSON text too.
    assert_eq!(
        reply.data(),
        Some(&cloudevents::Data::Binary(
            serde_json::to_vec(&json!({ "echo": data })).expect("JSON")
        ))
    );

    assert_eq!(reply.ty(), format!("{op}.reply"));
    assert_eq!(reply.source(), server_config.client_id);
    assert_eq!(reply.transaction_id(), Some(tid));
    assert_eq!(
        reply.extension("conftag").map(|v| v.to_string()),
        Some("back \"100%\" é".to_owned())
    );
    assert_eq!(
        reply.data_as::<Value>().expect("data"),
        json!({ "echo": data })
    );
    listener.stop(Duration::from_secs(5)).await;
}

/// Data, attributes and extensions survive a request and its reply (structured mode).
pub async fn request_reply_keeps_data_and_attributes<B: QueryBackend>() {
    roundtrip::<B>(ContentMode::Structured).await;
}

/// The same in binary content mode (attributes as percent-encoded `ce-*` headers).
pub async fn request_reply_in_binary_mode<B: QueryBackend>() {
    roundtrip::<B>(ContentMode::Binary).await;
}

/// A reply the handler built without a transaction id carries the request's; a request without
/// one gets one.
pub async fn reply_carries_the_request_transaction_id<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("tid");
    let seen: Seen<Option<String>> = Seen::new();
    let recorder = seen.clone();
    let handlers = QueryHandlers::new().on(
        &op,
        handler_fn(move |request: ReceivedEvent, reply| {
            let recorder = recorder.clone();
            async move {
                recorder.push(request.transaction_id().map(|t| t.to_string()));
                let mut answer = request_event("conf.answer", &json!(1));
                answer.remove_extension(ce_messaging::event::TRANSACTION_ID_EXTENSION);
                reply.reply(answer).await?;
                Ok(())
            }
        }),
    );
    let listener = listen(&server, handlers, options()).await;

    let mut request = request_event(&op, &json!(1));
    let tid = request.transaction_id().expect("tid");
    let reply = within("reply", client.request(request.clone()))
        .await
        .expect("reply");
    assert_eq!(reply.transaction_id(), Some(tid));

    request.remove_extension(ce_messaging::event::TRANSACTION_ID_EXTENSION);
    let reply = within("reply", client.request(request))
        .await
        .expect("reply");
    let given = seen.snapshot()[1]
        .clone()
        .expect("the request got a transaction id");
    assert_eq!(reply.transaction_id().map(|t| t.to_string()), Some(given));
    listener.stop(Duration::from_secs(5)).await;
}

/// Many requests in flight at once each get their own reply.
pub async fn concurrent_requests_get_their_own_replies<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("double");
    let handlers = QueryHandlers::new().on(
        &op,
        typed_handler(|req: TypedRequest<u64>| async move { Ok::<_, HandlerError>(req.data * 2) }),
    );
    // Room in the queue for all 50 (a full queue is answered 503 at once).
    let options = QueryListenOptions {
        pool: ce_messaging::WorkerOptions::new(16, 50),
        ..options()
    };
    let listener = listen(&server, handlers, options).await;
    let requests = (0..50u64).map(|n| {
        let client = client.clone();
        let op = op.clone();
        async move {
            let reply = client.request(request_event(&op, &json!(n))).await?;
            Ok::<_, ce_messaging::error::RequestError>((n, reply.data_as::<u64>().expect("u64")))
        }
    });
    let results = within("50 replies", join_all(requests)).await;
    for result in results {
        let (n, doubled) = result.expect("reply");
        assert_eq!(doubled, n * 2);
    }
    listener.stop(Duration::from_secs(5)).await;
}

/// A request or reply its receiver would refuse (here an extension name with capitals) is
/// refused when sent, at once, with `Encode`: the request never reaches a handler; a handler's
/// bad reply is refused to the handler, which can still answer.
pub async fn events_receivers_refuse_are_refused_when_sent<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("refused");
    let refusals = Seen::new();
    let called = Seen::new();
    let (r, c) = (refusals.clone(), called.clone());
    let handlers = QueryHandlers::new().on(
        op.as_str(),
        handler_fn(move |request: ReceivedEvent, reply| {
            let (r, c) = (r.clone(), c.clone());
            async move {
                c.push(request.id().to_owned());
                let mut bad = new_event_auto_source(format!("{}.reply", request.ty()), &1)
                    .map_err(|e| HandlerError::new(e.to_string()))?;
                bad.set_extension("MyExt", "v");
                match reply.reply(bad).await {
                    Ok(()) => r.push("sent".to_owned()),
                    Err(e) => r.push(format!("{:?}: {e}", e.kind())),
                }
                reply
                    .reply_data(&format!("{}.reply", request.ty()), &"good")
                    .await?;
                Ok(())
            }
        }),
    );
    let listener = listen(&server, handlers, options()).await;

    let mut bad = request_event(&op, &json!(1));
    bad.set_extension("MyExt", "v");
    let err = within_for(Duration::from_secs(2), "the refusal", client.request(bad))
        .await
        .expect_err("a request receivers refuse");
    assert_eq!(err.kind(), RequestErrorKind::Encode, "{err}");
    assert!(err.to_string().contains("receivers refuse"), "{err}");

    let good = request_event(&op, &json!(2));
    let reply = within("the good reply", client.request(good.clone()))
        .await
        .expect("a reply");
    assert_eq!(reply.data_as::<String>().expect("data"), "good");
    let refusals = refusals.snapshot();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(
        refusals[0].starts_with("Encode") && refusals[0].contains("receivers refuse"),
        "{refusals:?}"
    );
    assert_eq!(
        called.snapshot(),
        [good.id().to_owned()],
        "only the good request was handled"
    );
    listener.stop(Duration::from_secs(5)).await;
}

/// A request nobody answers in time fails with `TimedOut`, not earlier than its timeout; the
/// connection's default timeout comes from the configuration.
pub async fn request_times_out<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let mut client_config = env.config("cli");
    client_config.request_timeout = Duration::from_millis(400);
    let client = env.queries(&client_config).await;
    assert_eq!(client.default_timeout(), Duration::from_millis(400));
    let op = new_op("slow");
    let gate = Gate::new();
    let started = Seen::new();
    let listener = listen(&server, gated(&op, &gate, &started), options()).await;

    let begin = Instant::now();
    let err = within(
        "the request to time out",
        client.request(request_event(&op, &json!(1))),
    )
    .await
    .expect_err("no reply within the timeout");
    assert_eq!(err.kind(), RequestErrorKind::TimedOut, "{err}");
    assert!(
        begin.elapsed() >= Duration::from_millis(350),
        "gave up after {:?}",
        begin.elapsed()
    );

    let begin = Instant::now();
    let err = within(
        "the request to time out",
        client.request_with_timeout(request_event(&op, &json!(2)), Duration::from_millis(200)),
    )
    .await
    .expect_err("no reply within the timeout");
    assert_eq!(err.kind(), RequestErrorKind::TimedOut, "{err}");
    assert!(begin.elapsed() >= Duration::from_millis(150));
    gate.open();
    listener.stop(Duration::from_secs(5)).await;
}

/// No listener at all: the request fails at once with `NoResponders`, not after its timeout.
pub async fn request_without_listener_is_no_responders<B: QueryBackend>() {
    let env = B::start().await;
    let client = env.queries(&env.config("cli")).await;
    assert_no_responders(&client, &new_op("nobody")).await;
}

/// A failing handler's error reaches the requester as `Remote` with its code and text.
pub async fn handler_error_is_remote_error_with_code<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let (conflict, failing) = (new_op("conflict"), new_op("failing"));
    let handlers = QueryHandlers::new()
        .on(
            &conflict,
            handler_fn(|_, _| async {
                Err(HandlerError::permanent("quota exceeded: 3 > 2").with_code(409))
            }),
        )
        .on(
            &failing,
            handler_fn(|_, _| async { Err(HandlerError::new("database unavailable")) }),
        );
    let listener = listen(&server, handlers, options()).await;
    let err = within(
        "error reply",
        client.request(request_event(&conflict, &json!(1))),
    )
    .await
    .expect_err("the handler failed");
    assert_eq!(remote_code(&err), (409, "quota exceeded: 3 > 2".to_owned()));
    let err = within(
        "error reply",
        client.request(request_event(&failing, &json!(1))),
    )
    .await
    .expect_err("the handler failed");
    assert_eq!(remote_code(&err), (500, "database unavailable".to_owned()));
    listener.stop(Duration::from_secs(5)).await;
}

/// A wildcard listener answers an op it has no handler for with a 404, and serves the others.
pub async fn unknown_op_on_wildcard_listener_is_404<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let prefix = format!("conf.{}", unique());
    let known = format!("{prefix}.known");
    let options = QueryListenOptions {
        wildcard_subject: Some(format!("{prefix}.>")),
        ..options()
    };
    let listener = listen(&server, named(&known, "known"), options).await;
    let reply = within("reply", client.request(request_event(&known, &json!(1))))
        .await
        .expect("reply");
    assert_eq!(reply.data_as::<String>().expect("data"), "known");
    let err = within(
        "error reply",
        client.request(request_event(&format!("{prefix}.unknown"), &json!(1))),
    )
    .await
    .expect_err("no handler for this op");
    assert_eq!(remote_code(&err).0, 404);
    listener.stop(Duration::from_secs(5)).await;
}

/// Request data a typed handler cannot read is answered with a 400.
pub async fn undeserializable_request_data_is_400<B: QueryBackend>() {
    #[derive(serde::Deserialize)]
    struct Get {
        #[allow(dead_code)]
        name: String,
    }
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("get");
    let handlers = QueryHandlers::new().on(
        &op,
        typed_handler(|_: TypedRequest<Get>| async { Ok::<_, HandlerError>("ok") }),
    );
    let listener = listen(&server, handlers, options()).await;
    let err = within(
        "error reply",
        client.request(request_event(&op, &json!("not a Get"))),
    )
    .await
    .expect_err("bad data");
    assert_eq!(remote_code(&err).0, 400);
    let reply = within(
        "reply",
        client.request(request_event(&op, &json!({"name": "w"}))),
    )
    .await
    .expect("good data is served");
    assert_eq!(reply.data_as::<String>().expect("data"), "ok");
    listener.stop(Duration::from_secs(5)).await;
}

/// A listener keeps serving after handlers fail and panic (one worker, so the same worker
/// survives each failure).
pub async fn listener_continues_after_handler_errors<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("flaky");
    let handlers = QueryHandlers::new().on(
        &op,
        typed_handler(|req: TypedRequest<u64>| async move {
            match req.data % 3 {
                0 => Err(HandlerError::new(format!("failure {}", req.data))),
                1 => panic!("handler panic {}", req.data),
                _ => Ok(req.data),
            }
        }),
    );
    let options = QueryListenOptions {
        pool: ce_messaging::WorkerOptions::new(1, 256),
        ..options()
    };
    let listener = listen(&server, handlers, options).await;
    for n in 0..9u64 {
        let result = within("reply", client.request(request_event(&op, &json!(n)))).await;
        match n % 3 {
            0 => assert_eq!(remote_code(&result.expect_err("fails")).0, 500),
            1 => assert_eq!(remote_code(&result.expect_err("panics")).0, 500),
            _ => assert_eq!(result.expect("served").data_as::<u64>().expect("u64"), n),
        }
    }
    listener.stop(Duration::from_secs(5)).await;
}

/// A handler that panics while building its future (before any `async` body runs) is
/// answered 500 like one whose future panics, and its worker survives: with one worker, the
/// next request is served.
pub async fn handler_panicking_before_its_future_is_500_and_the_worker_survives<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("eager");
    let handlers = QueryHandlers::new().on(
        &op,
        handler_fn(|request: ReceivedEvent, reply| {
            // Not an `async` block: this runs when the handler is called.
            let n: u64 = request.data_as().expect("the case sends numbers");
            if n % 2 == 1 {
                panic!("handler panics before returning its future ({n})");
            }
            async move {
                reply.reply_data("conf.even", &n).await?;
                Ok(())
            }
        }),
    );
    let options = QueryListenOptions {
        pool: ce_messaging::WorkerOptions::new(1, 4),
        ..options()
    };
    let listener = listen(&server, handlers, options).await;
    for n in 0..6u64 {
        let result = within("reply", client.request(request_event(&op, &json!(n)))).await;
        if n % 2 == 1 {
            let (code, text) = remote_code(&result.expect_err("panics"));
            assert_eq!(code, 500, "{text}");
            assert!(text.starts_with("handler panicked"), "{text}");
        } else {
            assert_eq!(result.expect("served").data_as::<u64>().expect("u64"), n);
        }
    }
    let report = within("the stop", listener.stop(Duration::from_secs(5))).await;
    assert_eq!(report.handled_total, 6, "{report:?}");
}

/// One replier streams five replies; the requester's stream yields them in order and ends after
/// the last (long before its deadline).
pub async fn reply_stream_ends_after_its_total<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("rows");
    let handlers = QueryHandlers::new().on(
        &op,
        handler_fn(|_, reply| async move {
            let stream = reply.stream();
            for n in 0..5u32 {
                stream.push_data("conf.row", &n)?;
            }
            stream.finish().await?;
            Ok(())
        }),
    );
    let listener = listen(&server, handlers, options()).await;
    let request = request_event(&op, &json!(null));
    let tid = request.transaction_id();
    let stream = within(
        "the reply stream",
        client.request_stream(
            request,
            ReplyStreamOptions::default().deadline(Duration::from_secs(60)),
        ),
    )
    .await
    .expect("stream");
    let replies = within("the stream to end after its total", stream.collect_all())
        .await
        .expect("replies");
    let rows: Vec<u32> = replies.iter().map(|e| e.data_as().expect("u32")).collect();
    assert_eq!(rows, vec![0, 1, 2, 3, 4]);
    assert!(replies.iter().all(|e| e.transaction_id() == tid));
    listener.stop(Duration::from_secs(5)).await;
}

/// Starts `names.len()` repliers, each in a queue group of its own, answering with its name.
async fn repliers<B: QueryBackend>(env: &B, op: &str, names: &[&'static str]) -> Vec<Listener> {
    let mut listeners = Vec::new();
    for name in names {
        let server = env.queries(&env.config(name)).await;
        listeners.push(listen(&server, named(op, name), in_group(&unique())).await);
    }
    listeners
}

async fn stop_all(listeners: &[Listener]) {
    within(
        "listeners to stop",
        join_all(listeners.iter().map(|l| l.stop(Duration::from_secs(5)))),
    )
    .await;
}

fn names_of(replies: &[ReceivedEvent]) -> BTreeSet<String> {
    replies
        .iter()
        .map(|e| e.data_as::<String>().expect("name"))
        .collect()
}

/// Scatter-gather: the stream ends at `max_replies`, long before its deadline.
pub async fn scatter_gather_ends_at_max_replies<B: QueryBackend>() {
    let env = B::start().await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("census");
    let listeners = repliers(&env, &op, &["a", "b", "c"]).await;
    let stream = within(
        "stream",
        client.request_stream(
            request_event(&op, &json!(null)),
            ReplyStreamOptions::default()
                .max_replies(2)
                .deadline(Duration::from_secs(60)),
        ),
    )
    .await
    .expect("stream");
    let replies = within("the stream to end at 2 replies", stream.collect_all())
        .await
        .expect("replies");
    assert_eq!(replies.len(), 2);
    assert_eq!(names_of(&replies).len(), 2, "two different repliers");
    stop_all(&listeners).await;
}

/// Scatter-gather: the stream ends after a stall with no new reply, with every reply that came.
pub async fn scatter_gather_ends_after_stall<B: QueryBackend>() {
    let env = B::start().await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("census");
    let mut listeners = repliers(&env, &op, &["a", "b"]).await;
    let gate = Gate::new();
    let silent = env.queries(&env.config("silent")).await;
    listeners.push(
        listen(
            &silent,
            gated(&op, &gate, &Seen::new()),
            in_group(&unique()),
        )
        .await,
    );
    let stream = within(
        "stream",
        client.request_stream(
            request_event(&op, &json!(null)),
            ReplyStreamOptions::default()
                .stall(Duration::from_millis(1500))
                .deadline(Duration::from_secs(60)),
        ),
    )
    .await
    .expect("stream");
    let replies = within("the stream to end after the stall", stream.collect_all())
        .await
        .expect("replies");
    assert_eq!(
        names_of(&replies),
        BTreeSet::from(["a".to_owned(), "b".to_owned()])
    );
    gate.open();
    stop_all(&listeners).await;
}

/// Scatter-gather: the stream ends at its deadline with the replies that came before it.
pub async fn scatter_gather_ends_at_deadline<B: QueryBackend>() {
    let env = B::start().await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("census");
    let mut listeners = repliers(&env, &op, &["a", "b"]).await;
    let gate = Gate::new();
    let silent = env.queries(&env.config("silent")).await;
    listeners.push(
        listen(
            &silent,
            gated(&op, &gate, &Seen::new()),
            in_group(&unique()),
        )
        .await,
    );
    let begin = Instant::now();
    let stream = within(
        "stream",
        client.request_stream(
            request_event(&op, &json!(null)),
            ReplyStreamOptions::default().deadline(Duration::from_millis(1500)),
        ),
    )
    .await
    .expect("stream");
    let replies = within("the stream to end at its deadline", stream.collect_all())
        .await
        .expect("replies");
    assert_eq!(
        names_of(&replies),
        BTreeSet::from(["a".to_owned(), "b".to_owned()])
    );
    assert!(
        begin.elapsed() >= Duration::from_millis(1400),
        "ended after {:?}",
        begin.elapsed()
    );
    gate.open();
    stop_all(&listeners).await;
}

/// A reply stream that gets nothing before its deadline yields one `TimedOut` and ends.
pub async fn reply_stream_without_replies_times_out_once<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("silent");
    let gate = Gate::new();
    let listener = listen(&server, gated(&op, &gate, &Seen::new()), options()).await;
    let mut stream = within(
        "stream",
        client.request_stream(
            request_event(&op, &json!(null)),
            ReplyStreamOptions::default().deadline(Duration::from_millis(300)),
        ),
    )
    .await
    .expect("stream");
    let first = within("the deadline", stream.next())
        .await
        .expect("one item");
    assert_eq!(
        first.expect_err("timed out").kind(),
        RequestErrorKind::TimedOut
    );
    assert!(within("the end", stream.next()).await.is_none());
    gate.open();
    listener.stop(Duration::from_secs(5)).await;
}

/// Listeners in one queue group share the requests: each request is served by exactly one of
/// them, and both serve.
pub async fn queue_group_shares_requests<B: QueryBackend>() {
    let env = B::start().await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("shared");
    let group = unique();
    let mut listeners = Vec::new();
    for name in ["a", "b"] {
        let server = env.queries(&env.config(name)).await;
        // Room for all 40 requests below in either member's queue (a full queue is answered
        // 503 at once, and the group may send most of a burst to one member).
        let options = QueryListenOptions {
            pool: ce_messaging::WorkerOptions::new(16, 40),
            ..in_group(&group)
        };
        listeners.push(listen(&server, named(&op, name), options).await);
    }
    // Gathering from the group: exactly one member answers a request.
    let stream = within(
        "stream",
        client.request_stream(
            request_event(&op, &json!(null)),
            ReplyStreamOptions::default()
                .stall(Duration::from_millis(500))
                .deadline(Duration::from_secs(5)),
        ),
    )
    .await
    .expect("stream");
    let replies = within("gathering", stream.collect_all())
        .await
        .expect("replies");
    assert_eq!(replies.len(), 1, "one member of a queue group answers");

    let requests = (0..40).map(|_| client.request(request_event(&op, &json!(null))));
    let mut served: HashMap<String, usize> = HashMap::new();
    for reply in within("40 replies", join_all(requests)).await {
        let name: String = reply.expect("reply").data_as().expect("name");
        *served.entry(name).or_default() += 1;
    }
    assert_eq!(served.values().sum::<usize>(), 40);
    assert_eq!(served.len(), 2, "both members served: {served:?}");
    stop_all(&listeners).await;
}

/// A listener serves only its ops; an op nobody handles gets `NoResponders`.
pub async fn ops_are_isolated<B: QueryBackend>() {
    let env = B::start().await;
    let client = env.queries(&env.config("cli")).await;
    let (op_a, op_b) = (new_op("a"), new_op("b"));
    let server_a = env.queries(&env.config("a")).await;
    let server_b = env.queries(&env.config("b")).await;
    let listeners = vec![
        listen(&server_a, named(&op_a, "a"), options()).await,
        listen(&server_b, named(&op_b, "b"), options()).await,
    ];
    for _ in 0..5 {
        for (op, name) in [(&op_a, "a"), (&op_b, "b")] {
            let reply = within("reply", client.request(request_event(op, &json!(null))))
                .await
                .expect("reply");
            assert_eq!(reply.data_as::<String>().expect("name"), name);
        }
    }
    assert_no_responders(&client, &new_op("c")).await;
    stop_all(&listeners).await;
}

/// At most `workers` handlers run at once, and that many do.
pub async fn query_worker_bound_is_never_exceeded<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("bounded");
    let peak = Peak::new();
    let gate = Gate::new();
    let (p, g) = (peak.clone(), gate.clone());
    let handlers = QueryHandlers::new().on(
        &op,
        handler_fn(move |_, reply| {
            let (peak, gate) = (p.clone(), g.clone());
            async move {
                let _running = peak.enter();
                gate.wait().await;
                reply.reply_data("conf.done", &true).await?;
                Ok(())
            }
        }),
    );
    // Room in the queue for all 12, even before a worker took one (a full queue is answered
    // 503 at once).
    let options = QueryListenOptions {
        pool: ce_messaging::WorkerOptions::new(2, 12),
        ..options()
    };
    let listener = listen(&server, handlers, options).await;
    let requests = tokio::spawn({
        let (client, op) = (client.clone(), op.clone());
        async move { join_all((0..12).map(|_| client.request(request_event(&op, &json!(null))))).await }
    });
    peak.wait_running(2).await;
    gate.open();
    let results = within("12 replies", requests).await.expect("join");
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(peak.max(), 2, "never more than 2 handlers at once");
    listener.stop(Duration::from_secs(5)).await;
}

/// Stopping lets the request in flight finish and reply; afterwards requests are refused.
pub async fn query_graceful_stop_finishes_in_flight_and_refuses_new<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("inflight");
    let started: Seen<()> = Seen::new();
    let recorder = started.clone();
    let handlers = QueryHandlers::new().on(
        &op,
        handler_fn(move |_, reply| {
            let started = recorder.clone();
            async move {
                started.push(());
                // Work that is still going on when the stop begins.
                tokio::time::sleep(Duration::from_millis(500)).await;
                reply.reply_data("conf.late", &"late").await?;
                Ok(())
            }
        }),
    );
    let listener = listen(&server, handlers, options()).await;
    let in_flight = tokio::spawn({
        let (client, op) = (client.clone(), op.clone());
        async move { client.request(request_event(&op, &json!(null))).await }
    });
    started.wait_len("the handler to start", 1).await;
    let report = within("the stop", listener.stop(Duration::from_secs(10))).await;
    assert_eq!(report.finished, 1, "{report:?}");
    assert_eq!(report.abandoned, 0, "{report:?}");
    assert!(listener.is_stopped());
    let reply = within("the in-flight reply", in_flight)
        .await
        .expect("join");
    assert_eq!(
        reply
            .expect("in-flight request finished")
            .data_as::<String>()
            .expect("data"),
        "late"
    );
    assert_no_responders(&client, &op).await;
}

/// A handler still running when the grace period ends is abandoned and its requester gets a
/// 503 error reply instead of hanging.
pub async fn query_stop_after_grace_answers_503<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("stuck");
    let gate = Gate::new();
    let started = Seen::new();
    let listener = listen(&server, gated(&op, &gate, &started), options()).await;
    let in_flight = tokio::spawn({
        let (client, op) = (client.clone(), op.clone());
        async move {
            client
                .request_with_timeout(request_event(&op, &json!(null)), Duration::from_secs(30))
                .await
        }
    });
    started.wait_len("the handler to start", 1).await;
    let report = within("the stop", listener.stop(Duration::from_millis(200))).await;
    assert_eq!(report.abandoned, 1, "{report:?}");
    let result = within("the requester to hear", in_flight)
        .await
        .expect("join");
    assert_eq!(remote_code(&result.expect_err("abandoned")).0, 503);
    gate.open();
}

/// A stopped listener serves nothing; a new listener on the same connection serves again.
pub async fn query_listener_restart_serves_again<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("restart");
    for round in 0..3 {
        let listener = listen(&server, named(&op, "up"), options()).await;
        let reply = within("reply", client.request(request_event(&op, &json!(round))))
            .await
            .expect("served while listening");
        assert_eq!(reply.data_as::<String>().expect("data"), "up");
        within("stop", listener.stop(Duration::from_secs(5))).await;
        assert_no_responders(&client, &op).await;
    }
}

/// Cancelling the listener's token stops it like `stop`.
pub async fn query_cancelled_token_stops_listener<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("token");
    let listener = listen(&server, named(&op, "up"), options()).await;
    within("reply", client.request(request_event(&op, &json!(null))))
        .await
        .expect("served");
    listener.cancellation_token().cancel();
    within("the listener to stop", listener.stopped()).await;
    assert!(listener.is_stopped());
    assert_no_responders(&client, &op).await;
}

/// Many listeners stop at the same time without hanging; a new one serves afterwards.
pub async fn query_listeners_close_concurrently<B: QueryBackend>() {
    let env = B::start().await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("many");
    let group = unique();
    let mut listeners = Vec::new();
    for i in 0..5 {
        let server = env.queries(&env.config(&format!("s{i}"))).await;
        listeners.push(listen(&server, named(&op, "old"), in_group(&group)).await);
    }
    for _ in 0..10 {
        within("reply", client.request(request_event(&op, &json!(null))))
            .await
            .expect("served");
    }
    stop_all(&listeners).await;
    assert!(listeners.iter().all(Listener::is_stopped));
    assert_no_responders(&client, &op).await;
    let server = env.queries(&env.config("new")).await;
    let listener = listen(&server, named(&op, "new"), in_group(&group)).await;
    let reply = within("reply", client.request(request_event(&op, &json!(null))))
        .await
        .expect("served by the new listener");
    assert_eq!(reply.data_as::<String>().expect("data"), "new");
    listener.stop(Duration::from_secs(5)).await;
}

/// Closing a connection ends its listeners (they report), and its ops are no longer served.
pub async fn closing_the_connection_stops_its_listeners<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("closing");
    let listener = listen(&server, named(&op, "up"), options()).await;
    within("reply", client.request(request_event(&op, &json!(null))))
        .await
        .expect("served");
    within("close", B::close_queries(&server)).await;
    within(
        "the listener to end with its connection",
        listener.stopped(),
    )
    .await;
    // Nothing is served any more. Unlike `Listener::stop`, closing gives no "at once": async-nats
    // drops a draining subscription without waiting for the server to confirm the UNSUB, so for
    // a moment the server may still route a request to the closed connection (it then times
    // out). Each attempt is short; the interest must be gone within the wait.
    super::eventually("the closed connection's interest to go", || async {
        let attempt = client
            .request_with_timeout(request_event(&op, &json!(null)), Duration::from_millis(300))
            .await;
        match attempt {
            Ok(reply) => panic!("a closed connection served a request: {reply}"),
            Err(err) => err.kind() == RequestErrorKind::NoResponders,
        }
    })
    .await;
}

/// A request is served by the handler of the op it was sent on: one whose `type` names another
/// op is answered 400 naming both, and that op's handler does not run.
pub async fn request_type_must_match_its_subject<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let public = new_op("public");
    let admin = new_op("admin");
    let admin_calls = Seen::<String>::new();
    let calls = admin_calls.clone();
    let handlers = named(&public, "public").on(
        &admin,
        handler_fn(move |request: ReceivedEvent, reply| {
            let calls = calls.clone();
            async move {
                calls.push(request.id().to_owned());
                reply.reply_data("conf.admin.reply", &"secret").await?;
                Ok(())
            }
        }),
    );
    let listener = listen(&server, handlers, options()).await;
    for mode in [ContentMode::Structured, ContentMode::Binary] {
        let sneaky = request_event(&admin, &json!(1));
        let encoded = ce_messaging::codec::encode(&sneaky, mode).expect("encode");
        let (headers, _) = within(
            "error reply",
            env.request_raw(&public, encoded.headers.into(), encoded.payload, WAIT),
        )
        .await;
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(
            header("Nats-Service-Error-Code").as_deref(),
            Some("400"),
            "{mode:?}"
        );
        let text = header("Nats-Service-Error").unwrap_or_default();
        assert!(text.contains(&admin) && text.contains(&public), "{text}");
    }
    assert_eq!(admin_calls.len(), 0, "the other op's handler ran");
    listener.stop(Duration::from_secs(5)).await;
}

/// A wildcard listener dispatches by `type`, whatever subject under it the request came on.
pub async fn wildcard_listener_dispatches_by_type<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let prefix = format!("conf.{}", unique());
    let admin = format!("{prefix}.admin");
    let options = QueryListenOptions {
        wildcard_subject: Some(format!("{prefix}.>")),
        ..options()
    };
    let listener = listen(&server, named(&admin, "admin"), options).await;
    let request = request_event(&admin, &json!(1));
    let encoded = ce_messaging::codec::encode(&request, ContentMode::Structured).expect("encode");
    let (headers, payload) = within(
        "reply",
        env.request_raw(
            &format!("{prefix}.public"),
            encoded.headers.into(),
            encoded.payload,
            WAIT,
        ),
    )
    .await;
    assert!(headers.get("Nats-Service-Error-Code").is_none());
    let reply = ce_messaging::codec::decode(Some(&headers), &payload).expect("reply event");
    assert_eq!(reply.data_as::<String>().expect("data"), "admin");
    listener.stop(Duration::from_secs(5)).await;
}

/// A reply larger than the max payload is answered at once with a 500 ("reply too large"),
/// and the handler's `reply` returns `TooLarge`.
pub async fn oversized_reply_is_answered_500<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("big");
    let outcomes = Seen::<String>::new();
    let seen = outcomes.clone();
    let handlers = QueryHandlers::new().on(
        &op,
        handler_fn(move |_request: ReceivedEvent, reply| {
            let seen = seen.clone();
            async move {
                // Both backends default to a 1 MiB max payload.
                let big = "x".repeat(1_500_000);
                let result = reply.reply_data("conf.big.reply", &big).await;
                seen.push(match &result {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => format!("{:?}", e.kind()),
                });
                result?;
                Ok(())
            }
        }),
    );
    let listener = listen(&server, handlers, options()).await;
    let err = within(
        "error reply",
        client.request_with_timeout(request_event(&op, &json!(1)), Duration::from_secs(8)),
    )
    .await
    .expect_err("too large");
    let (code, text) = remote_code(&err);
    assert_eq!(code, 500, "{err}");
    assert!(text.starts_with("reply too large: "), "{text}");
    assert_eq!(outcomes.wait_len("handler outcome", 1).await, ["TooLarge"]);
    listener.stop(Duration::from_secs(5)).await;
}

/// With every worker busy and the queue full, a request is answered 503 at once instead of
/// waiting; the queued one is served once a worker is free.
pub async fn full_queue_is_answered_busy<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("busy");
    let gate = Gate::new();
    let started = Seen::new();
    let options = QueryListenOptions {
        pool: ce_messaging::WorkerOptions::new(1, 1),
        ..options()
    };
    let listener = listen(&server, gated(&op, &gate, &started), options).await;
    let first = tokio::spawn({
        let (client, op) = (client.clone(), op.clone());
        async move { client.request(request_event(&op, &json!(0))).await }
    });
    started.wait_len("the first handler", 1).await;
    // The worker is busy and the queue empty: of two more, one queues and one is refused at
    // once, while the gate is still closed.
    let request = |i: u32| {
        let (client, op) = (client.clone(), op.clone());
        tokio::spawn(async move { client.request(request_event(&op, &json!(i))).await })
    };
    let other = one_refused_busy_one_queued(request(1), request(2)).await;
    assert_eq!(started.len(), 1, "only the first handler runs");
    gate.open();
    within("the queued one", other)
        .await
        .expect("join")
        .expect("the queued one is served");
    within("first", first)
        .await
        .expect("join")
        .expect("first served");
    assert_eq!(started.len(), 2);
    listener.stop(Duration::from_secs(5)).await;
}

/// Of two requests sent to a listener whose workers are all busy and whose queue has one free
/// slot, one is answered 503 busy at once; returns the other (queued) one.
async fn one_refused_busy_one_queued<T: std::fmt::Debug>(
    a: tokio::task::JoinHandle<Result<T, ce_messaging::error::RequestError>>,
    b: tokio::task::JoinHandle<Result<T, ce_messaging::error::RequestError>>,
) -> tokio::task::JoinHandle<Result<T, ce_messaging::error::RequestError>> {
    let (refused, queued) = match within("a busy answer", futures::future::select(a, b)).await {
        futures::future::Either::Left((done, other)) => (done, other),
        futures::future::Either::Right((done, other)) => (done, other),
    };
    let err = refused.expect("join").expect_err("answered busy");
    let (code, text) = remote_code(&err);
    assert_eq!(code, 503, "{err}");
    assert!(text.starts_with("listener busy"), "{text}");
    queued
}

/// With two workers and one queue slot, a request that comes while the first is being served
/// runs beside it (on the listener's other worker), a third waits, a fourth is answered 503
/// at once; never more than two handlers run. A stop begun then lets all three finish within
/// the grace period and reply.
pub async fn busy_listener_bounds_serves_queued_and_stop_drains_all<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("drain");
    let gate = Gate::new();
    let started = Seen::new();
    let peak = Peak::new();
    let (g, s, p) = (gate.clone(), started.clone(), peak.clone());
    let handlers = QueryHandlers::new().on(
        &op,
        handler_fn(move |request: ReceivedEvent, reply| {
            let (gate, started, peak) = (g.clone(), s.clone(), p.clone());
            async move {
                let _running = peak.enter();
                started.push(request.id().to_owned());
                gate.wait().await;
                reply
                    .reply_data("conf.done", &request.data_as::<u32>()?)
                    .await?;
                Ok(())
            }
        }),
    );
    let options = QueryListenOptions {
        pool: ce_messaging::WorkerOptions::new(2, 1),
        ..options()
    };
    let listener = listen(&server, handlers, options).await;
    let request = |i: u32| {
        let (client, op) = (client.clone(), op.clone());
        tokio::spawn(async move { client.request(request_event(&op, &json!(i))).await })
    };
    let first = request(0);
    started.wait_len("the first handler", 1).await;
    let second = request(1);
    started
        .wait_len("the second handler, beside the first", 2)
        .await;
    peak.wait_running(2).await;
    // Both workers busy, the queue empty: of two more, one queues and one is refused at once.
    let queued = one_refused_busy_one_queued(request(2), request(3)).await;
    assert_eq!(started.len(), 2, "the queued one waits for a worker");
    // The stop begins with two in flight and one queued; all three finish once the gate opens.
    let stop = tokio::spawn({
        let listener = listener.clone();
        async move { listener.stop(Duration::from_secs(10)).await }
    });
    // Begun once a probe is no longer answered "busy": it then finds no responder, or a
    // stopping listener. A probe that reaches a NATS listener while it unsubscribes may go
    // unanswered (seen under load: async-nats 0.51 forgets a drained subscription before the
    // server's PONG, docs/wire-contract.md "Stopping"); it times out and the next probe looks
    // again. The handlers are held all along.
    within("the stop to begin", async {
        loop {
            let probe = client
                .request_with_timeout(request_event(&op, &json!(99)), Duration::from_secs(1))
                .await
                .expect_err("nothing is served while the gate is closed");
            match probe.kind() {
                RequestErrorKind::NoResponders => break,
                RequestErrorKind::TimedOut => continue,
                _ => {
                    let (code, text) = remote_code(&probe);
                    if text.starts_with("listener stopping") {
                        break;
                    }
                    assert_eq!(code, 503, "{text}");
                    assert!(text.starts_with("listener busy"), "{text}");
                }
            }
        }
    })
    .await;
    assert_eq!(started.len(), 2);
    gate.open();
    let report = within("the stop", stop).await.expect("join");
    assert_eq!((report.finished, report.abandoned), (3, 0), "{report:?}");
    let mut answered = Vec::new();
    for reply in [first, second, queued] {
        let reply = within("a reply", reply).await.expect("join");
        answered.push(reply.expect("served").data_as::<u32>().expect("data"));
    }
    answered.sort();
    assert_eq!(answered[..2], [0, 1], "{answered:?}");
    assert!(matches!(answered[2], 2 | 3), "{answered:?}");
    assert_eq!(started.len(), 3);
    assert_eq!(peak.max(), 2, "never more than two handlers at once");
    assert_no_responders(&client, &op).await;
}

/// A request whose requester gave up (its `Request-Timeout-Ms` ran out) while it waited for
/// a worker is dropped, never handled.
pub async fn request_whose_caller_gave_up_is_not_handled<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("expired");
    let gate = Gate::new();
    let started = Seen::new();
    // One worker and one queue slot: the impatient request fills the slot, so a later request
    // answered busy proves the listener received the impatient one before it.
    let options = QueryListenOptions {
        pool: ce_messaging::WorkerOptions::new(1, 1),
        ..options()
    };
    let listener = listen(&server, gated(&op, &gate, &started), options).await;
    let first = tokio::spawn({
        let (client, op) = (client.clone(), op.clone());
        async move { client.request(request_event(&op, &json!(0))).await }
    });
    started.wait_len("the first handler", 1).await;
    let impatient = request_event(&op, &json!("impatient"));
    let impatient_id = impatient.id().to_owned();
    let timeout = Duration::from_millis(200);
    let err = within(
        "impatient request",
        client.request_with_timeout(impatient, timeout),
    )
    .await
    .expect_err("the worker is busy");
    assert_eq!(err.kind(), RequestErrorKind::TimedOut, "{err}");
    let marker = within(
        "busy marker",
        client.request(request_event(&op, &json!("marker"))),
    )
    .await
    .expect_err("the queue is full");
    assert_eq!(remote_code(&marker).0, 503, "{marker}");
    // The listener takes a request's deadline on receipt (its own clock: receipt + the
    // requester's remaining time, so transit counts in the requester's favour). The impatient
    // request was received before the marker was answered; one timeout after that answer its
    // deadline has passed on the listener's clock too. This wait is the duration under test,
    // not synchronisation.
    tokio::time::sleep(timeout).await;
    gate.open();
    within("first", first)
        .await
        .expect("join")
        .expect("first served");
    // Queued after the impatient one: once it is answered, the impatient one was taken out.
    within("probe", client.request(request_event(&op, &json!("probe"))))
        .await
        .expect("probe served");
    let ids = started.snapshot();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(
        !ids.contains(&impatient_id),
        "handled after its caller gave up"
    );
    listener.stop(Duration::from_secs(5)).await;
}

/// A request of `op` (which need not be valid: the type is set after building).
fn request_of_op(op: &str) -> Event {
    let mut e = request_event("conf.placeholder", &json!("bad"));
    e.set_type(op);
    e
}

/// An op that is not a valid subject-token sequence is refused at once with a typed error
/// wherever it enters: request and request_stream (`InvalidOptions`, not a timeout, not "no
/// responders") and listen (`InvalidOptions`, so no listener sits on a wildcard and answers
/// other services' requests). A healthy listener beside it keeps serving; a 255-byte op (the
/// bound) works.
pub async fn invalid_ops_are_refused_at_once<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let real = new_op("real");
    let longest = super::longest_valid_type();
    let listener = listen(
        &server,
        named(&real, "real").on(
            &longest,
            handler_fn(|_, reply| async move {
                reply.reply_data("conf.longest.reply", &"longest").await?;
                Ok(())
            }),
        ),
        options(),
    )
    .await;
    let at_once = Duration::from_secs(2);
    for bad in super::invalid_types() {
        let err = within_for(
            at_once,
            &format!("request {bad:?}"),
            client.request_with_timeout(request_of_op(&bad), Duration::from_secs(10)),
        )
        .await
        .expect_err(&format!("a request of op {bad:?} must fail"));
        assert_eq!(
            err.kind(),
            RequestErrorKind::InvalidOptions,
            "{bad:?}: {err}"
        );

        let err = within_for(
            at_once,
            &format!("request_stream {bad:?}"),
            client.request_stream(request_of_op(&bad), ReplyStreamOptions::default()),
        )
        .await
        .expect_err(&format!("a reply stream of op {bad:?} must fail"));
        assert_eq!(
            err.kind(),
            RequestErrorKind::InvalidOptions,
            "{bad:?}: {err}"
        );

        let err = within_for(
            at_once,
            &format!("listen {bad:?}"),
            server.listen(named(&bad, "wildcard"), options()),
        )
        .await
        .expect_err(&format!("listening to op {bad:?} must fail"));
        assert_eq!(
            err.kind(),
            ce_messaging::error::ListenErrorKind::InvalidOptions,
            "{bad:?}: {err}"
        );
    }
    for _ in 0..5 {
        let reply = within("reply", client.request(request_event(&real, &json!(null))))
            .await
            .expect("the real op is served by its own listener only");
        assert_eq!(reply.data_as::<String>().expect("data"), "real");
    }
    let reply = within(
        "reply",
        client.request(request_event(&longest, &json!(null))),
    )
    .await
    .expect("an op at the bound is served");
    assert_eq!(reply.data_as::<String>().expect("data"), "longest");
    listener.stop(Duration::from_secs(5)).await;
}

/// Zero replies is an answer: a handler's reply stream with no reply (finished, or left
/// unfinished when the handler returns) ends the requester's stream at once without an item
/// (not a 500, not a timeout), and `request` on such an op fails with `EmptyStream` at once.
pub async fn empty_reply_stream_ends_without_an_item<B: QueryBackend>() {
    let env = B::start().await;
    let server = env.queries(&env.config("svc")).await;
    let client = env.queries(&env.config("cli")).await;
    let (finished, returned) = (new_op("none-finished"), new_op("none-returned"));
    let handlers = QueryHandlers::new()
        .on(
            &finished,
            handler_fn(|_, reply| async move {
                reply.stream().finish().await?;
                Ok(())
            }),
        )
        .on(
            &returned,
            handler_fn(|_, reply| async move {
                let _rows = reply.stream();
                Ok(())
            }),
        );
    let listener = listen(&server, handlers, options()).await;
    for op in [&finished, &returned] {
        // A deadline far beyond the wait below: only the end marker can end the stream in time.
        let mut stream = within(
            "the reply stream",
            client.request_stream(
                request_event(op, &json!(null)),
                ReplyStreamOptions::default().deadline(Duration::from_secs(120)),
            ),
        )
        .await
        .expect("stream");
        let first = within_for(
            Duration::from_secs(5),
            "the empty stream to end",
            stream.next(),
        )
        .await;
        assert!(first.is_none(), "{op}: no item, got {first:?}");
        let err = within_for(
            Duration::from_secs(5),
            "request on an op that answers zero replies",
            client.request_with_timeout(request_event(op, &json!(null)), Duration::from_secs(60)),
        )
        .await
        .expect_err("no event to return");
        assert_eq!(err.kind(), RequestErrorKind::EmptyStream, "{op}: {err}");
    }
    listener.stop(Duration::from_secs(5)).await;
}

/// `NoResponders` has one place in a reply stream on every backend: the call succeeds (the
/// request was sent) and the stream's first and only item is `Err(NoResponders)`, at once; so
/// `expect_next` gives the same error `request` returns.
pub async fn reply_stream_without_listener_yields_no_responders_first<B: QueryBackend>() {
    let env = B::start().await;
    let client = env.queries(&env.config("cli")).await;
    let op = new_op("nobody");
    let mut stream = within(
        "the reply stream",
        client.request_stream(
            request_event(&op, &json!(null)),
            ReplyStreamOptions::default().deadline(Duration::from_secs(60)),
        ),
    )
    .await
    .expect("the request was sent; no responders comes on the stream");
    let first = within_for(Duration::from_secs(5), "no responders", stream.next())
        .await
        .expect("one item");
    assert_eq!(
        first.expect_err("nobody serves this op").kind(),
        RequestErrorKind::NoResponders
    );
    assert!(within("the end", stream.next()).await.is_none());
    let mut stream = within(
        "the reply stream",
        client.request_stream(
            request_event(&op, &json!(null)),
            ReplyStreamOptions::default().deadline(Duration::from_secs(60)),
        ),
    )
    .await
    .expect("sent");
    let err = within_for(
        Duration::from_secs(5),
        "no responders",
        stream.expect_next(),
    )
    .await
    .expect_err("nobody serves this op");
    assert_eq!(err.kind(), RequestErrorKind::NoResponders);
    assert_no_responders(&client, &op).await;
}

/// A handler's request and the requester's reply are read in place in structured mode
/// (nothing built until something asks for the sdk's `Event`) and built in binary mode, on
/// every backend alike, and they read the same either way.
pub async fn requests_and_replies_are_read_in_place<B: QueryBackend>() {
    for mode in [ContentMode::Structured, ContentMode::Binary] {
        let (_env, server_config, server, client_config, client) = in_mode::<B>(mode).await;
        let op = new_op("viewed");
        // Whether the request was unbuilt when its handler started, and the request.
        let seen: Seen<(bool, ReceivedEvent)> = Seen::new();
        let recorder = seen.clone();
        let handlers = QueryHandlers::new().on(
            &op,
            handler_fn(move |request: ReceivedEvent, reply| {
                let recorder = recorder.clone();
                async move {
                    recorder.push((request.is_unbuilt(), request.clone()));
                    let data: Value = request.data_as()?;
                    reply
                        .reply_data("conf.viewed.reply", &json!({"echo": data}))
                        .await?;
                    Ok(())
                }
            }),
        );
        let listener = listen(&server, handlers, options()).await;
        let mut request = request_event(&op, &json!({"n": 1}));
        request.set_subject(Some("w-1"));
        let reply = within("the reply", client.request(request.clone()))
            .await
            .expect("reply");

        let structured = mode == ContentMode::Structured;
        let got = seen.snapshot().pop().expect("the handler saw the request");
        let (unbuilt, got) = &got;
        assert_eq!(
            *unbuilt, structured,
            "{mode:?}: request unbuilt when handled"
        );
        assert_eq!(got.id(), request.id());
        assert_eq!(got.ty(), op);
        assert_eq!(got.source(), client_config.client_id);
        assert_eq!(got.subject(), Some("w-1"));
        assert_eq!(got.time(), request.time());
        assert_eq!(got.transaction_id(), request.transaction_id());
        assert_eq!(
            got.is_unbuilt(),
            structured,
            "{mode:?}: reading built nothing"
        );

        assert_eq!(reply.is_unbuilt(), structured, "{mode:?}: reply unbuilt");
        assert_eq!(reply.ty(), "conf.viewed.reply");
        assert_eq!(reply.source(), server_config.client_id);
        assert_eq!(reply.transaction_id(), request.transaction_id());
        assert_eq!(
            reply.data_as::<Value>().expect("data"),
            json!({"echo": {"n": 1}})
        );
        assert_eq!(
            reply.is_unbuilt(),
            structured,
            "{mode:?}: reading built nothing"
        );
        let built = reply.into_event();
        assert_eq!(built.ty(), "conf.viewed.reply");
        listener.stop(Duration::from_secs(5)).await;
    }
}
