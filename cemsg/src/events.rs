//! The JetStream commands: `stream init`, `publish` and `listen`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ce_messaging::cloudevents::{AttributesReader, AttributesWriter};
use ce_messaging::config::Config;
use ce_messaging::event::{new_event_with_tid, TransactionId, AUTO_POPULATE_SOURCE};
use ce_messaging::events::{
    event_handler_fn, set_priority, EventConnection, EventHandlers, EventListenOptions,
    StartPosition,
};
use ce_messaging::handler::HandlerError;
use ce_messaging::jetstream::JetStreamEvents;
use ce_messaging::Event;
use clap::Args;
use serde_json::json;
use tokio::sync::watch;

use crate::fail::{Failure, EXIT_OTHER, EXIT_USAGE};
use crate::output::{self, Progress};
use crate::{parse_data, with_mode, ModeArgs};

/// `publish --count` hands the library this many events at a time.
const PUBLISH_CHUNK: u64 = 1000;
/// The durable name of `listen` when neither `--durable` nor `NATS_DURABLE_NAME` is given.
const DEFAULT_DURABLE: &str = "cemsg";
/// How long handlers get to finish printing when `listen` stops.
const LISTEN_GRACE: Duration = Duration::from_secs(1);

pub async fn stream_init(config: &Config) -> Result<(), Failure> {
    let client = config.connect().await?;
    let js = async_nats::jetstream::new(client.clone());
    let names = [config.js_stream.clone(), config.js_dlq_stream.clone()];
    let mut before = Vec::new();
    for name in &names {
        before.push(stream_config(&js, name).await?);
    }
    let events = JetStreamEvents::from_client(client, config);
    events.init_stream().await?;
    for (name, before) in names.iter().zip(before) {
        let after = stream_config(&js, name).await?.ok_or_else(|| {
            Failure::new(EXIT_OTHER, format!("stream {name} is missing after init"))
        })?;
        let action = match before {
            None => "created",
            Some(before) if before != after => "updated",
            Some(_) => "unchanged",
        };
        output::json(&json!({
            "stream": name,
            "action": action,
            "subjects": after.subjects,
            "replicas": after.num_replicas,
            "duplicate_window_secs": after.duplicate_window.as_secs(),
        }))?;
    }
    events.close().await;
    Ok(())
}

/// The configuration of stream `name`, `None` if it does not exist.
async fn stream_config(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Result<Option<async_nats::jetstream::stream::Config>, Failure> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream.cached_info().config.clone())),
        Err(err) => match err.kind() {
            GetStreamErrorKind::JetStream(e)
                if e.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            GetStreamErrorKind::Request => Err(Failure::new(
                EXIT_OTHER,
                format!("looking up stream {name}: {err} (is JetStream enabled on the server?)"),
            )),
            _ => Err(Failure::new(
                EXIT_OTHER,
                format!("looking up stream {name}: {err}"),
            )),
        },
    }
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[arg(
        value_name = "TYPE",
        help = "The event type, e.g. org.example.order.created (published on <prefix>.<type>)"
    )]
    event_type: String,
    /// The event data, as JSON. Without it the event has no data.
    #[arg(long, value_name = "JSON")]
    data: Option<String>,
    /// The event source; default: NATS_CLIENT_ID.
    #[arg(long, value_name = "SOURCE")]
    source: Option<String>,
    #[arg(
        long,
        value_name = "TID",
        help = "The transaction id; default: a new tid-<xid>"
    )]
    tid: Option<String>,
    #[arg(
        long,
        value_name = "ID",
        conflicts_with = "count",
        help = "The event id (the de-duplication id); default: a new cloudevent-<xid>"
    )]
    id: Option<String>,
    /// Publish N events (distinct ids), pipelined.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    #[arg(
        long,
        value_name = "N",
        help = "The event's priority, 0 the highest (the `priority` extension; published on <prefix>._priority.<N>.<type>, the lowest level on <prefix>.<type>); needs NATS_JS_PRIORITY_LEVELS > N"
    )]
    priority: Option<u8>,
    #[command(flatten)]
    mode: ModeArgs,
    #[command(flatten)]
    timing: crate::schedule::TimingArgs,
}

impl PublishArgs {
    fn event(&self, data: Option<&serde_json::Value>) -> Result<Event, Failure> {
        let tid = self
            .tid
            .clone()
            .map(TransactionId::from)
            .unwrap_or_else(TransactionId::generate);
        let source = self.source.as_deref().unwrap_or(AUTO_POPULATE_SOURCE);
        let mut event = new_event_with_tid(
            &self.event_type,
            source,
            data.unwrap_or(&serde_json::Value::Null),
            tid,
        )
        .map_err(|e| Failure::new(EXIT_USAGE, e.to_string()))?;
        if data.is_none() {
            let _ = event.take_data();
        }
        if let Some(id) = &self.id {
            event.set_id(id.clone());
        }
        if let Some(priority) = self.priority {
            set_priority(&mut event, priority);
        }
        Ok(event)
    }
}

pub async fn publish(config: Config, args: PublishArgs) -> Result<(), Failure> {
    let data = parse_data(args.data.as_deref())?;
    if args.event_type.trim().is_empty() {
        return Err(Failure::new(EXIT_USAGE, "the event type must not be empty"));
    }
    if let Some(priority) = args.priority {
        // With priorities off the extension would be carried but not read: say so instead.
        if config.js_priority_levels <= 1 || priority >= config.js_priority_levels {
            return Err(Failure::new(
                EXIT_USAGE,
                format!(
                    "--priority {priority} needs NATS_JS_PRIORITY_LEVELS of at least {} (it is {}; 1 means priorities are off)",
                    u16::from(priority).max(1) + 1,
                    config.js_priority_levels
                ),
            ));
        }
    }
    let config = with_mode(config, &args.mode);
    let events = JetStreamEvents::connect(&config).await?;
    let options = args.timing.options()?;
    let result = match args.count {
        None => publish_one(&events, args.event(data.as_ref())?, options).await,
        Some(count) => publish_many(&events, &args, data.as_ref(), count).await,
    };
    events.close().await;
    result
}

async fn publish_one(
    events: &JetStreamEvents,
    event: Event,
    options: Option<ce_messaging::events::PublishOptions>,
) -> Result<(), Failure> {
    let id = AttributesReader::id(&event).to_owned();
    let ack = match options {
        Some(options) => events.publish_with(event, options).await?,
        None => events.publish(event).await?,
    };
    output::json(&json!({
        "id": id,
        "stream": ack.stream,
        "seq": ack.sequence,
        "duplicate": ack.duplicate,
    }))
}

async fn publish_many(
    events: &JetStreamEvents,
    args: &PublishArgs,
    data: Option<&serde_json::Value>,
    count: u64,
) -> Result<(), Failure> {
    let started = Instant::now();
    let mut progress = Progress::new("published", count);
    let mut done = 0u64;
    let mut duplicates = 0u64;
    while done < count {
        // The library pipelines each chunk (sends in order, acks awaited in a window); chunks
        // bound memory and let the progress counter move.
        let chunk = (count - done).min(PUBLISH_CHUNK);
        let batch = (0..chunk)
            .map(|_| args.event(data))
            .collect::<Result<Vec<Event>, Failure>>()?;
        let ids: Vec<String> = batch.iter().map(|e| e.id().to_owned()).collect();
        for (id, result) in ids.into_iter().zip(events.publish_all(batch).await) {
            let ack = match result {
                Ok(ack) => ack,
                Err(err) => {
                    progress.finish(done);
                    let failure = Failure::from(err);
                    return Err(Failure::new(
                        failure.code,
                        format!("published {done} of {count} events, then: {failure}"),
                    ));
                }
            };
            done += 1;
            duplicates += u64::from(ack.duplicate);
            output::json(&json!({
                "id": id,
                "stream": ack.stream,
                "seq": ack.sequence,
                "duplicate": ack.duplicate,
            }))?;
        }
        progress.update(done);
    }
    progress.finish(done);
    let elapsed = started.elapsed();
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
    output::note(&format!(
        "published {done} events ({duplicates} duplicates) in {:.2}s ({rate:.0}/s)",
        elapsed.as_secs_f64()
    ));
    Ok(())
}

#[derive(Debug, Args)]
pub struct ListenArgs {
    /// The event types to handle.
    #[arg(value_name = "TYPE", required = true)]
    event_types: Vec<String>,
    /// The durable consumer name; default: NATS_DURABLE_NAME, else "cemsg".
    #[arg(long, value_name = "NAME")]
    durable: Option<String>,
    /// Exit after printing N events.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Exit after SECS seconds without an event.
    #[arg(long, value_name = "SECS")]
    idle: Option<f64>,
    /// Where the durable starts when this listen creates it: all, new, sequence:N or
    /// time:RFC3339; an existing durable keeps its position. Default:
    /// NATS_JS_START_POSITION, else new (only events published from now on, so a first listen
    /// on a shared server does not work through other applications' history).
    #[arg(long, value_name = "POSITION")]
    start: Option<StartPosition>,
}

/// What the handlers of `listen` share with the command.
struct Printed {
    /// Events claimed by a handler (printed or about to be).
    claimed: AtomicU64,
    limit: Option<u64>,
    /// The number printed so far; the command watches it.
    printed: watch::Sender<u64>,
    /// Set when stdout failed: the command stops with this.
    failed: watch::Sender<Option<Failure>>,
    /// The listener's token, cancelled by the handler that printed the last of `--count`
    /// events before that event is acked, so the listener pulls nothing more.
    stop: std::sync::OnceLock<tokio_util::sync::CancellationToken>,
}

pub async fn listen(config: Config, args: ListenArgs) -> Result<(), Failure> {
    let idle = match args.idle {
        Some(secs) if !(secs.is_finite() && secs > 0.0) => {
            return Err(Failure::new(
                EXIT_USAGE,
                "--idle must be a positive number of seconds",
            ))
        }
        Some(secs) => Some(Duration::from_secs_f64(secs)),
        None => None,
    };
    let durable = args
        .durable
        .clone()
        .or_else(|| config.durable_name.clone())
        .unwrap_or_else(|| DEFAULT_DURABLE.to_owned());
    let (printed_tx, mut printed_rx) = watch::channel(0u64);
    let (failed_tx, mut failed_rx) = watch::channel(None);
    let shared = Arc::new(Printed {
        claimed: AtomicU64::new(0),
        limit: args.count,
        printed: printed_tx,
        failed: failed_tx,
        stop: std::sync::OnceLock::new(),
    });
    let mut handlers = EventHandlers::new();
    for event_type in &args.event_types {
        let shared = shared.clone();
        handlers = handlers.on(
            event_type.as_str(),
            event_handler_fn(move |event, _responses| {
                let shared = shared.clone();
                async move { print_event(&shared, &event).await }
            }),
        );
    }
    let events = JetStreamEvents::connect(&config).await?;
    let options = EventListenOptions {
        // One worker: events are printed in the order they are delivered. With --count, no
        // read-ahead: pull only for the one worker, so nothing is pulled beyond N (the handler
        // of the N-th event stops the listener before it is acked).
        pool: ce_messaging::WorkerOptions::new(1, if args.count.is_some() { 0 } else { 16 })
            .with_grace(LISTEN_GRACE),
        durable_name: Some(durable.clone()),
        start_position: Some(
            args.start
                .or(config.js_start_position)
                .unwrap_or(StartPosition::New),
        ),
        ..Default::default()
    };
    let listener = match events.listen(handlers, options).await {
        Ok(listener) => listener,
        Err(err) => {
            events.close().await;
            return Err(err.into());
        }
    };
    let _ = shared.stop.set(listener.cancellation_token());
    output::note(&format!(
        "listening for {} on durable {durable} (stream {})",
        args.event_types.join(", "),
        config.js_stream
    ));
    let shutdown = crate::queries::shutdown_signal();
    tokio::pin!(shutdown);
    let mut last_event = tokio::time::Instant::now();
    let outcome = loop {
        let idle_deadline = idle.map(|idle| last_event + idle);
        tokio::select! {
            // A handler that printed the last of --count stops the listener itself: the count
            // is seen before the stop.
            biased;
            changed = printed_rx.changed() => {
                if changed.is_err() { break Ok(()); }
                last_event = tokio::time::Instant::now();
                let printed = *printed_rx.borrow_and_update();
                if args.count.is_some_and(|count| printed >= count) {
                    break Ok(());
                }
            }
            _ = failed_rx.changed() => {
                let failure = failed_rx.borrow().clone();
                if let Some(failure) = failure { break Err(failure); }
            }
            _ = until(idle_deadline) => break Ok(()),
            _ = &mut shutdown => break Ok(()),
            _ = listener.stopped() => {
                // Stopped by the handler of the last of --count: done.
                if args.count.is_some_and(|count| *printed_rx.borrow() >= count) {
                    break Ok(());
                }
                break Err(Failure::new(crate::fail::EXIT_CONNECTION, "the listener stopped: connection closed"));
            }
        }
    };
    let report = listener.stop(LISTEN_GRACE).await;
    events.close().await;
    if args.count.is_some() || report.requeued > 0 {
        output::note(&format!(
            "printed {} events; {} handed back",
            *printed_rx.borrow(),
            report.requeued + report.abandoned
        ));
    }
    outcome
}

/// Waits until `deadline`, forever without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The handler of `listen`: prints the event, then returns so that it is acked. An event
/// beyond `--count` is not printed: its handler waits until the listener stops, which hands it
/// back to the server (nak) without counting as a failure.
async fn print_event(shared: &Printed, event: &Event) -> Result<(), HandlerError> {
    let n = shared.claimed.fetch_add(1, Ordering::SeqCst) + 1;
    if shared.limit.is_some_and(|limit| n > limit) {
        return std::future::pending().await;
    }
    let printed = output::event_line(event).and_then(|line| output::line(&line));
    if let Err(failure) = printed {
        // Not printed, so not acked: handed back when the command stops.
        shared.failed.send_replace(Some(failure));
        return std::future::pending().await;
    }
    if shared.limit == Some(n) {
        // The last one: stop pulling before this event is acked and its place is free.
        if let Some(stop) = shared.stop.get() {
            stop.cancel();
        }
    }
    shared.printed.send_modify(|printed| *printed += 1);
    Ok(())
}
