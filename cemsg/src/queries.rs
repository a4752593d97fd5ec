//! The core NATS commands: `request` and `reply`, and the shutdown signal of long-running
//! commands.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ce_messaging::config::{Config, MAX_REQUEST_TIMEOUT};
use ce_messaging::error::RequestErrorKind;
use ce_messaging::event::{new_event_with_tid, EventExt, TransactionId, AUTO_POPULATE_SOURCE};
use ce_messaging::handler::HandlerError;
use ce_messaging::nats::NatsQueries;
use ce_messaging::query::{
    handler_fn, QueryConnection, QueryHandlers, QueryListenOptions, ReplyStreamOptions, ReplyWriter,
};
use ce_messaging::{Event, ReceivedEvent};
use clap::Args;
use tokio::sync::watch;

use crate::fail::{Failure, EXIT_CONNECTION, EXIT_USAGE};
use crate::output;
use crate::{parse_data, with_mode, ModeArgs};

/// How long in-flight replies get to be sent when `reply` stops.
const REPLY_GRACE: Duration = Duration::from_secs(5);
/// The error code of a request that arrives after `reply --count N` answered N.
const STOPPING_CODE: u16 = 503;

#[derive(Debug, Args)]
pub struct RequestArgs {
    /// The query op (the request's type and subject), e.g. cyverse.workspace.get.
    #[arg(value_name = "OP")]
    op: String,
    /// The request data, as JSON; default: null.
    #[arg(long, value_name = "JSON")]
    data: Option<String>,
    #[arg(
        long,
        value_name = "TID",
        help = "The transaction id; default: a new tid-<xid>"
    )]
    tid: Option<String>,
    /// Seconds to wait for the reply; default: NATS_REQUEST_TIMEOUT (at most 300). With
    /// --stream or --gather: the deadline of the whole stream.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Read the replier's reply stream: print every reply until its Reply-Stream-Total (an
    /// empty stream prints nothing), or until the deadline.
    #[arg(long, conflicts_with = "gather")]
    stream: bool,
    /// Scatter-gather: print every reply of every replier until --max replies, --stall
    /// seconds without a new reply, or the deadline (--timeout), whichever comes first.
    #[arg(long)]
    gather: bool,
    /// With --gather: stop after N replies.
    #[arg(long, value_name = "N", requires = "gather", value_parser = clap::value_parser!(u64).range(1..))]
    max: Option<u64>,
    /// With --gather: stop when no reply arrived for SECS seconds (after the first one).
    #[arg(long, value_name = "SECS", requires = "gather")]
    stall: Option<f64>,
    #[command(flatten)]
    mode: ModeArgs,
}

/// A positive number of seconds from an option, or a usage failure naming it.
fn seconds(option: &str, secs: f64) -> Result<Duration, Failure> {
    if !(secs.is_finite() && secs > 0.0) {
        return Err(Failure::new(
            EXIT_USAGE,
            format!("{option} must be a positive number of seconds"),
        ));
    }
    Ok(Duration::from_secs_f64(
        secs.min(MAX_REQUEST_TIMEOUT.as_secs_f64()),
    ))
}

pub async fn request(config: Config, args: RequestArgs) -> Result<(), Failure> {
    let data = parse_data(args.data.as_deref())?.unwrap_or(serde_json::Value::Null);
    let timeout = match args.timeout {
        Some(secs) => seconds("--timeout", secs)?,
        None => config.request_timeout,
    };
    let stall = args
        .stall
        .map(|secs| seconds("--stall", secs))
        .transpose()?;
    let tid = args
        .tid
        .map(TransactionId::from)
        .unwrap_or_else(TransactionId::generate);
    let event = new_event_with_tid(&args.op, AUTO_POPULATE_SOURCE, &data, tid)
        .map_err(|e| Failure::new(EXIT_USAGE, e.to_string()))?;
    let config = with_mode(config, &args.mode);
    let queries = NatsQueries::connect(&config).await?;
    if args.stream || args.gather {
        let mut options = ReplyStreamOptions::default().deadline(timeout);
        options.max_replies = args.max.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        options.stall = stall;
        let result = print_replies(&queries, event, options).await;
        queries.close().await;
        return result;
    }
    let result = queries.request_with_timeout(event, timeout).await;
    queries.close().await;
    if let Err(err) = &result {
        if err.kind() == RequestErrorKind::EmptyStream {
            // Zero replies is an answer: nothing to print.
            output::note(&format!(
                "{} answered with zero replies (an empty reply stream)",
                args.op
            ));
            return Ok(());
        }
    }
    let reply = result.map_err(|err| {
        let failure = Failure::from(err);
        if failure.code == crate::fail::EXIT_TIMEOUT {
            Failure::new(
                failure.code,
                format!("no reply to {} within {timeout:?}", args.op),
            )
        } else {
            failure
        }
    })?;
    output::line(&output::event_line(&reply)?)
}

/// `request --stream` / `--gather`: prints every reply as one JSON line as it arrives; the
/// first error item (an error reply of one replier: the others go on) is the command's failure,
/// reported at the end, later ones are notes on stderr. Exits 0 when every item
/// was a reply (none at all included: an empty reply stream, or a gather whose deadline passed
/// after some replies); otherwise with the code of the first error (no responders, a timeout
/// before any reply or short of the stream's total, an error reply).
async fn print_replies(
    queries: &NatsQueries,
    event: Event,
    options: ReplyStreamOptions,
) -> Result<(), Failure> {
    let mut replies = queries.request_stream(event, options).await?;
    let mut printed = 0u64;
    let mut first_error: Option<Failure> = None;
    while let Some(item) = replies.next().await {
        match item {
            Ok(reply) => {
                output::line(&output::event_line(&reply)?)?;
                printed += 1;
            }
            Err(err) => {
                // The first error is the command's failure (its one line on stderr, at the
                // end); later ones are notes.
                let failure = Failure::from(err);
                if first_error.is_some() {
                    output::note(&failure.message);
                } else {
                    first_error = Some(failure);
                }
            }
        }
    }
    match first_error {
        Some(failure) => Err(failure),
        None => {
            output::note(&format!("{printed} replies"));
            Ok(())
        }
    }
}

#[derive(Debug, Args)]
pub struct ReplyArgs {
    /// The query op to serve.
    #[arg(value_name = "OP")]
    op: String,
    /// The data of each reply, as JSON; default: the request's data (echo).
    #[arg(long, value_name = "JSON")]
    data: Option<String>,
    /// Exit after answering N requests.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
}

struct Served {
    claimed: AtomicU64,
    limit: Option<u64>,
    reply_type: String,
    data: Option<serde_json::Value>,
    answered: watch::Sender<u64>,
    failed: watch::Sender<Option<Failure>>,
}

pub async fn reply(config: Config, args: ReplyArgs) -> Result<(), Failure> {
    let data = parse_data(args.data.as_deref())?;
    let (answered_tx, mut answered_rx) = watch::channel(0u64);
    let (failed_tx, mut failed_rx) = watch::channel(None);
    let served = Arc::new(Served {
        claimed: AtomicU64::new(0),
        limit: args.count,
        reply_type: format!("{}.reply", args.op),
        data,
        answered: answered_tx,
        failed: failed_tx,
    });
    let handler_state = served.clone();
    let handlers = QueryHandlers::new().on(
        args.op.as_str(),
        handler_fn(move |request, reply| {
            let served = handler_state.clone();
            async move { answer(&served, request, reply).await }
        }),
    );
    let queries = NatsQueries::connect(&config).await?;
    let options = QueryListenOptions {
        // One worker: requests are printed in the order they arrive.
        pool: ce_messaging::WorkerOptions::new(1, 64).with_grace(REPLY_GRACE),
        ..Default::default()
    };
    let listener = match queries.listen(handlers, options).await {
        Ok(listener) => listener,
        Err(err) => {
            queries.close().await;
            return Err(err.into());
        }
    };
    output::note(&format!(
        "serving {} (queue group {})",
        args.op,
        config.queue_group()
    ));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let outcome = loop {
        tokio::select! {
            changed = answered_rx.changed() => {
                if changed.is_err() { break Ok(()); }
                let answered = *answered_rx.borrow_and_update();
                if args.count.is_some_and(|count| answered >= count) { break Ok(()); }
            }
            _ = failed_rx.changed() => {
                let failure = failed_rx.borrow().clone();
                if let Some(failure) = failure { break Err(failure); }
            }
            _ = &mut shutdown => break Ok(()),
            _ = listener.stopped() => {
                break Err(Failure::new(EXIT_CONNECTION, "the listener stopped: connection closed"));
            }
        }
    };
    listener.stop(REPLY_GRACE).await;
    queries.close().await;
    outcome
}

/// The handler of `reply`: prints the request, then answers it. A request beyond `--count` is
/// answered with an error (503) instead, so its requester is not left waiting.
async fn answer(
    served: &Served,
    request: ReceivedEvent,
    reply: ReplyWriter,
) -> Result<(), HandlerError> {
    let n = served.claimed.fetch_add(1, Ordering::SeqCst) + 1;
    if served.limit.is_some_and(|limit| n > limit) {
        reply
            .error(
                STOPPING_CODE,
                "cemsg reply is stopping: it answered its --count",
            )
            .await?;
        return Ok(());
    }
    let printed = output::event_line(&request).and_then(|line| output::line(&line));
    if let Err(failure) = printed {
        let text = failure.message.clone();
        served.failed.send_replace(Some(failure));
        return Err(HandlerError::new(text).with_code(STOPPING_CODE));
    }
    let data = match &served.data {
        Some(data) => data.clone(),
        None => request
            .data_as::<serde_json::Value>()
            .unwrap_or(serde_json::Value::Null),
    };
    let result = reply.reply_data(&served.reply_type, &data).await;
    served.answered.send_modify(|answered| *answered += 1);
    result?;
    // The reply carries the request's transaction id (ReplyWriter's rule); say so if not.
    if request.transaction_id().is_none() {
        output::note("request had no transaction id; the reply got a new one");
    }
    Ok(())
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
