//! The events stream and the dead-letter stream: their configuration from [`Config`], and
//! creating or updating them ([`init_streams`], behind `EventConnection::init_stream`).
//!
//! An existing stream is updated in place: its subjects gain what the configuration needs
//! (subjects of other users are kept), replicas and duplicate window follow the
//! configuration, and everything else (limits, storage, retention) is left as it is.

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::Context;

use crate::config::Config;
use crate::error::{Error, StreamError, StreamErrorKind};

/// JetStream's error code for "stream not found".
pub(crate) const STREAM_NOT_FOUND_CODE: u64 = 10059;

/// The configuration of the events stream: `NATS_JS_STREAM` holding `<prefix>.>`, file
/// storage, `NATS_JS_DUPLICATE_WINDOW`, `NATS_JS_REPLICAS`.
pub(crate) fn events_stream_config(config: &Config) -> StreamConfig {
    StreamConfig {
        name: config.js_stream.clone(),
        subjects: vec![
            format!("{}.>", config.js_subject_prefix),
            crate::events::schedule::schedule_subjects(&config.js_stream),
        ],
        storage: StorageType::File,
        duplicate_window: config.js_duplicate_window,
        num_replicas: config.js_replicas,
        description: Some("CloudEvents (ce-messaging)".to_owned()),
        allow_message_ttl: true,
        allow_message_schedules: true,
        ..Default::default()
    }
}

/// The configuration of the dead-letter stream: `NATS_JS_DLQ_STREAM` holding
/// `deadletter.<events stream>.>` (one subject per durable below it), file storage.
pub(crate) fn dead_letter_stream_config(config: &Config) -> StreamConfig {
    StreamConfig {
        name: config.js_dlq_stream.clone(),
        subjects: vec![format!("deadletter.{}.>", config.js_stream)],
        storage: StorageType::File,
        duplicate_window: config.js_duplicate_window,
        num_replicas: config.js_replicas,
        description: Some("Dead letters of CloudEvents (ce-messaging)".to_owned()),
        ..Default::default()
    }
}

/// Creates or updates the events stream and the dead-letter stream. The events stream gets
/// per-message TTL (`allow_msg_ttl`) on nats-server 2.11+ and message schedules
/// (`allow_msg_schedules`, the schedule subjects) on 2.12+; an older server gets a stream
/// without them (a publish that needs them is refused with `Unsupported`, naming the
/// version).
pub(crate) async fn init_streams(
    js: &Context,
    config: &Config,
    server_version: &str,
) -> Result<(), StreamError> {
    let mut events = events_stream_config(config);
    let version = parse_version(server_version);
    if version.is_some_and(|v| v < (2, 11)) {
        events.allow_message_ttl = false;
    }
    if version.is_some_and(|v| v < (2, 12)) {
        events.allow_message_schedules = false;
        events.subjects.truncate(1);
        tracing::info!(
            server = server_version,
            "nats-server before 2.12: the events stream gets no message schedules"
        );
    }
    ensure_stream(js, events).await?;
    ensure_stream(js, dead_letter_stream_config(config)).await?;
    Ok(())
}

/// Creates `wanted`, or updates the existing stream of that name so it also holds
/// `wanted.subjects` with `wanted`'s replicas and duplicate window.
async fn ensure_stream(js: &Context, wanted: StreamConfig) -> Result<(), StreamError> {
    let name = wanted.name.clone();
    match js.get_stream(&name).await {
        Ok(mut stream) => {
            let info = stream.info().await.map_err(|e| {
                Error::with_source(StreamErrorKind::Other, e).detail(format!("stream {name}"))
            })?;
            let mut updated = info.config.clone();
            for subject in &wanted.subjects {
                if !updated.subjects.contains(subject) {
                    updated.subjects.push(subject.clone());
                }
            }
            updated.duplicate_window = wanted.duplicate_window;
            updated.num_replicas = wanted.num_replicas;
            // Features are only turned on (another user of the stream may rely on them).
            updated.allow_message_ttl |= wanted.allow_message_ttl;
            updated.allow_message_schedules |= wanted.allow_message_schedules;
            if updated != info.config {
                js.update_stream(updated).await.map_err(|e| {
                    Error::with_source(StreamErrorKind::Create, e)
                        .detail(format!("updating stream {name}"))
                })?;
                tracing::info!(stream = %name, "stream updated");
            }
            Ok(())
        }
        Err(err) if is_not_found(&err) => {
            js.create_stream(wanted).await.map_err(|e| {
                Error::with_source(StreamErrorKind::Create, e)
                    .detail(format!("creating stream {name}"))
            })?;
            tracing::info!(stream = %name, "stream created");
            Ok(())
        }
        Err(err) => Err(Error::with_source(StreamErrorKind::Other, err)
            .detail(format!("looking up stream {name}"))),
    }
}

/// (major, minor) of a server version text (`2.15.1`, `v2.12.0-RC.1`).
fn parse_version(version: &str) -> Option<(u64, u64)> {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn is_not_found(err: &async_nats::jetstream::context::GetStreamError) -> bool {
    matches!(err.kind(), GetStreamErrorKind::JetStream(e) if e.error_code().0 == STREAM_NOT_FOUND_CODE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stream_configs_follow_the_contract() {
        let config = Config {
            js_stream: "EV".into(),
            js_subject_prefix: "ev".into(),
            js_dlq_stream: "DLQ".into(),
            js_replicas: 3,
            js_duplicate_window: Duration::from_secs(7),
            ..Default::default()
        };
        let events = events_stream_config(&config);
        assert_eq!(
            (events.name.as_str(), events.subjects.clone()),
            (
                "EV",
                vec!["ev.>".to_string(), "_CE_SCHEDULE.EV.>".to_string()]
            )
        );
        assert!(events.allow_message_ttl && events.allow_message_schedules);
        assert_eq!(parse_version("2.15.1"), Some((2, 15)));
        assert_eq!(parse_version("v2.12.0-RC.1"), Some((2, 12)));
        assert_eq!(events.storage, StorageType::File);
        assert_eq!(events.num_replicas, 3);
        assert_eq!(events.duplicate_window, Duration::from_secs(7));
        let dlq = dead_letter_stream_config(&config);
        assert_eq!(dlq.name, "DLQ");
        assert_eq!(dlq.subjects, vec!["deadletter.EV.>".to_string()]);
        // Every dead-letter subject of this config lands in the dead-letter stream.
        let subject = Config {
            durable_name: Some("svc".into()),
            ..config
        }
        .dead_letter_subject();
        assert!(subject.starts_with("deadletter.EV."), "{subject}");
    }
}
