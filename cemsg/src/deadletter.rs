//! `deadletter list` and `deadletter replay`, on the library's dead-letter API
//! ([`ce_messaging::jetstream::dead_letters`]).

use ce_messaging::config::Config;
use ce_messaging::jetstream::dead_letters::{
    DeadLetter, DeadLetterErrorKind, DeadLetterQuery, ReplayOptions, ReplayOutcome,
};
use ce_messaging::jetstream::JetStreamEvents;
use clap::{ArgGroup, Args};
use serde_json::json;

use crate::fail::{dead_letter_code, Failure};
use crate::output;

/// Dead letters read per request batch by `replay --all`.
const REPLAY_PAGE: usize = 100;

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Show at most N dead letters (the oldest).
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: usize,
    /// Only the dead letters of this durable consumer (service).
    #[arg(long, value_name = "NAME")]
    durable: Option<String>,
}

pub async fn list(config: &Config, args: ListArgs) -> Result<(), Failure> {
    let events = JetStreamEvents::connect(config).await?;
    let query = DeadLetterQuery {
        durable: args.durable.clone(),
        limit: args.limit,
        ..Default::default()
    };
    let result = events.list_dead_letters(&query).await;
    events.close().await;
    let dead_letters = result?;
    for dead in &dead_letters {
        output::json(&describe(dead))?;
    }
    if dead_letters.is_empty() {
        output::note(&format!(
            "no dead letters in stream {}",
            config.js_dlq_stream
        ));
    }
    Ok(())
}

/// The JSON line of one dead letter. A reference dead letter (`"payload":"omitted"`: the
/// original was too large to be copied) names where the original is (`stream`, `stream_seq`)
/// and its size; its id and type are not known without reading the original.
fn describe(dead: &DeadLetter) -> serde_json::Value {
    let event = (!dead.is_reference()).then(|| dead.event().ok()).flatten();
    json!({
        "payload": if dead.is_reference() { "omitted" } else { "kept" },
        "size": dead.original_size,
        "stream": dead.original_stream,
        "seq": dead.sequence,
        "durable": dead.durable,
        "reason": dead.reason,
        "error": dead.error,
        "subject": dead.original_subject,
        "deliveries": dead.deliveries,
        "stream_seq": dead.original_sequence,
        "id": event.as_ref().map(|e| e.id().to_owned()),
        "type": event.as_ref().map(|e| e.ty().to_owned()),
        "time": dead.stored_at.to_rfc3339(),
    })
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["seq", "all"])))]
pub struct ReplayArgs {
    /// Replay the dead letter with this sequence (from `deadletter list`).
    #[arg(long, value_name = "N")]
    seq: Option<u64>,
    /// Replay every dead letter there is now.
    #[arg(long)]
    all: bool,
    /// With --all: only the dead letters of this durable consumer (service).
    #[arg(long, value_name = "NAME", requires = "all")]
    durable: Option<String>,
    /// Replay into this stream. Without it, a replay lands only in the dead letter's original
    /// events stream: one that another stream would store is refused (exit 7, kept).
    #[arg(long, value_name = "NAME")]
    to_stream: Option<String>,
}

pub async fn replay(config: &Config, args: ReplayArgs) -> Result<(), Failure> {
    let events = JetStreamEvents::connect(config).await?;
    let options = ReplayOptions {
        to_stream: args.to_stream,
    };
    let result = match args.seq {
        Some(seq) => replay_one(&events, seq, &options).await,
        None => replay_all(&events, args.durable, &options).await,
    };
    events.close().await;
    result
}

fn replayed(outcome: &ReplayOutcome) -> serde_json::Value {
    json!({
        "dead_letter_seq": outcome.dead_letter_sequence,
        "subject": outcome.subject,
        "msg_id": outcome.msg_id,
        "stream": outcome.ack.stream,
        "seq": outcome.ack.sequence,
        "duplicate": outcome.ack.duplicate,
        "deleted": outcome.deleted,
    })
}

async fn replay_one(
    events: &JetStreamEvents,
    seq: u64,
    options: &ReplayOptions,
) -> Result<(), Failure> {
    let outcome = events.replay_dead_letter_with(seq, options).await?;
    output::json(&replayed(&outcome))?;
    if outcome.ack.duplicate {
        output::note(&format!(
            "dead letter #{seq} had already been republished (duplicate); it is now deleted"
        ));
    }
    Ok(())
}

/// Replays every dead letter up to the newest one there is when it starts, so that events
/// dead-lettered again meanwhile are not replayed in a loop. Goes on after a failure and
/// exits with the code of the first one.
async fn replay_all(
    events: &JetStreamEvents,
    durable: Option<String>,
    options: &ReplayOptions,
) -> Result<(), Failure> {
    let last = events.last_dead_letter_sequence().await?;
    let mut query = DeadLetterQuery {
        durable,
        from_sequence: 1,
        up_to_sequence: Some(last),
        limit: REPLAY_PAGE,
    };
    let (mut replayed_count, mut gone, mut first_failure) = (0u64, 0u64, None);
    loop {
        let page = events.list_dead_letters(&query).await?;
        let Some(newest) = page.last() else { break };
        query.from_sequence = newest.sequence + 1;
        for dead in &page {
            match events.replay_dead_letter_with(dead.sequence, options).await {
                Ok(outcome) => {
                    replayed_count += 1;
                    output::json(&replayed(&outcome))?;
                }
                // Replayed by someone else since it was listed: nothing lost.
                Err(err) if err.kind() == DeadLetterErrorKind::NotFound => gone += 1,
                Err(err) => {
                    let failure = Failure::new(dead_letter_code(err.kind()), err.to_string());
                    output::note(&format!("dead letter #{}: {failure}", dead.sequence));
                    first_failure.get_or_insert(failure);
                }
            }
        }
    }
    let mut summary = format!("replayed {replayed_count} dead letters");
    if gone > 0 {
        summary.push_str(&format!(", {gone} were already gone"));
    }
    if replayed_count == 0 && gone == 0 && first_failure.is_none() {
        summary = "nothing to replay".to_owned();
    }
    output::note(&summary);
    match first_failure {
        Some(failure) => Err(failure),
        None => Ok(()),
    }
}
