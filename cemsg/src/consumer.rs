//! `consumer info`: the state of a durable consumer, on the library's
//! [`JetStreamEvents::consumer_info`](ce_messaging::jetstream::JetStreamEvents::consumer_info).

use ce_messaging::config::Config;
use ce_messaging::events::DurableInfo;
use ce_messaging::jetstream::JetStreamEvents;
use clap::Args;
use serde_json::json;

use crate::fail::Failure;
use crate::output;

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The durable consumer (service) on the events stream (NATS_JS_STREAM).
    #[arg(value_name = "DURABLE")]
    durable: String,
}

pub async fn info(config: &Config, args: InfoArgs) -> Result<(), Failure> {
    let events = JetStreamEvents::connect(config).await?;
    let result = events.consumer_info(&args.durable).await;
    events.close().await;
    let info = result?;
    output::json(&describe(&info))?;
    if info.parked > 0 {
        output::note(&format!(
            "{} event(s) of durable {} reached the server's delivery limit without being settled: \
             they are parked (neither handled nor dead-lettered)",
            info.parked, info.durable
        ));
    }
    Ok(())
}

/// The JSON line of a consumer's state.
fn describe(info: &DurableInfo) -> serde_json::Value {
    json!({
        "stream": info.stream,
        "durable": info.durable,
        "filter_subjects": info.filter_subjects,
        "pending": info.pending,
        "lag": info.lag(),
        "ack_pending": info.ack_pending,
        "redelivered": info.redelivered,
        "ack_floor": info.ack_floor,
        "last_delivered": info.last_delivered,
        "deliveries": info.deliveries,
        "max_deliver": info.max_deliver,
        "parked": info.parked,
    })
}
