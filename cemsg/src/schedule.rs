//! Time in events on the command line: the `publish` flags `--at`, `--in`, `--every`, `--cron`
//! and `--ttl` ([`TimingArgs`]), and `cemsg schedule list | cancel`.

use std::time::Duration;

use ce_messaging::config::Config;
use ce_messaging::events::{parse_duration, EventConnection, PublishOptions, Schedule};
use ce_messaging::jetstream::JetStreamEvents;
use clap::Args;
use serde_json::json;

use crate::fail::{Failure, EXIT_NOT_FOUND, EXIT_USAGE};
use crate::output;

/// `publish` flags: when to deliver, and how long the event may wait.
#[derive(Debug, Args, Clone, Default)]
pub struct TimingArgs {
    /// Deliver once at this instant (RFC 3339, e.g. 2026-12-24T18:00:00Z). nats-server 2.12+.
    #[arg(long, value_name = "RFC3339", group = "when", conflicts_with = "count")]
    at: Option<String>,
    /// Deliver once after this delay (30s, 5m, 2h, 1h30m). nats-server 2.12+.
    #[arg(
        long = "in",
        value_name = "DURATION",
        group = "when",
        conflicts_with = "count"
    )]
    after: Option<String>,
    /// Deliver every interval (at least 1s) until cancelled. nats-server 2.14+.
    #[arg(
        long,
        value_name = "DURATION",
        group = "when",
        conflicts_with = "count"
    )]
    every: Option<String>,
    /// Deliver on a 6-field cron expression (sec min hour day month weekday, e.g. "0 30 9 * * mon-fri",
    /// or @hourly, @daily ...) in UTC until cancelled. nats-server 2.14+.
    #[arg(long, value_name = "EXPR", group = "when", conflicts_with = "count")]
    cron: Option<String>,
    /// Read --cron in this IANA time zone (Europe/Berlin) instead of UTC.
    #[arg(long, value_name = "ZONE", requires = "cron")]
    time_zone: Option<String>,
    /// Drop the event when it waited this long (at least 1s; for a schedule: counted from each
    /// firing). nats-server 2.11+.
    #[arg(long, value_name = "DURATION", conflicts_with = "count")]
    ttl: Option<String>,
}

fn duration(flag: &str, text: &str) -> Result<Duration, Failure> {
    parse_duration(text).map_err(|e| Failure::new(EXIT_USAGE, format!("{flag}: {e}")))
}

impl TimingArgs {
    /// The publish options the flags ask for (`None`: a plain publish).
    pub fn options(&self) -> Result<Option<PublishOptions>, Failure> {
        let schedule = if let Some(at) = &self.at {
            let at = chrono::DateTime::parse_from_rfc3339(at)
                .map_err(|e| Failure::new(EXIT_USAGE, format!("--at {at:?}: {e}")))?;
            Some(Schedule::At(at.with_timezone(&chrono::Utc)))
        } else if let Some(delay) = &self.after {
            Some(Schedule::After(duration("--in", delay)?))
        } else if let Some(interval) = &self.every {
            Some(Schedule::Every(duration("--every", interval)?))
        } else {
            self.cron.as_ref().map(|expression| Schedule::Cron {
                expression: expression.clone(),
                time_zone: self.time_zone.clone(),
            })
        };
        let mut options = match schedule {
            Some(schedule) => PublishOptions::on(schedule),
            None => PublishOptions::default(),
        };
        if let Some(ttl) = &self.ttl {
            options = options.with_ttl(duration("--ttl", ttl)?);
        }
        Ok((!options.is_plain()).then_some(options))
    }
}

/// `cemsg schedule cancel` arguments.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The schedule id (the id of the event it was published with, as `publish` printed it).
    #[arg(value_name = "ID")]
    id: String,
}

/// `cemsg schedule list`: one JSON line per schedule.
pub async fn list(config: &Config) -> Result<(), Failure> {
    let events = JetStreamEvents::connect(config).await?;
    let result = async {
        for s in events.schedules().await? {
            output::json(&json!({
                "id": s.id,
                "schedule": s.schedule,
                "target": s.target,
                "type": s.event_type,
                "ttl": s.ttl,
                "time_zone": s.time_zone,
                "created": s.created.map(|t| t.to_rfc3339()),
            }))?;
        }
        Ok(())
    }
    .await;
    events.close().await;
    result
}

/// `cemsg schedule cancel ID`: exit 6 when there is no such schedule.
pub async fn cancel(config: &Config, args: CancelArgs) -> Result<(), Failure> {
    let events = JetStreamEvents::connect(config).await?;
    let cancelled = events.cancel_schedule(&args.id).await;
    events.close().await;
    if !cancelled? {
        return Err(Failure::new(
            EXIT_NOT_FOUND,
            format!(
                "no schedule {} (never made, already fired, or cancelled)",
                args.id
            ),
        ));
    }
    output::json(&json!({ "id": args.id, "cancelled": true }))
}
