//! Event priorities: a small fixed number of levels (`NATS_JS_PRIORITY_LEVELS`, default 1:
//! off), 0 the highest. How a priority travels (wire contract, "Priorities"):
//!
//! - **Subject.** An event of priority `p` below the lowest level is stored on
//!   `<prefix>._priority.<p>.<type>`; the lowest level (`levels - 1`) is the ordinary subject
//!   `<prefix>.<type>`, so events published without a priority (by peers that know nothing
//!   of priorities, or with priorities off) are served at the lowest level. The first token
//!   `_priority` is reserved: no event type may start with it
//!   ([`check_type`](crate::cloudevent::check_type)), so these subjects never collide with an
//!   ordinary type's subject, and the stream's `<prefix>.>` already holds them.
//! - **Attribute.** The CloudEvents extension `priority` (an integer, [`set_priority`]) is
//!   what this library's publish reads to pick the subject; it stays on the event, so
//!   handlers see it. The subject decides the level a listener serves an event at.
//! - **Consumers.** A listener with priorities on has one durable consumer per level:
//!   `<durable>-p<p>` for the levels above the lowest, `<durable>` itself for the lowest
//!   (the consumer it had before priorities were turned on). It starts a lower-level event
//!   only when the higher levels had nothing waiting when it last pulled (strict priority).

use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesReader, Event};

/// The CloudEvents extension attribute that carries an event's priority (an integer, 0 the
/// highest).
pub const PRIORITY_EXTENSION: &str = "priority";

/// The first subject token after the prefix that marks a priority subject
/// (`<prefix>._priority.<p>.<type>`); reserved: no event type may start with it.
pub const PRIORITY_TOKEN: &str = "_priority";

/// The most priority levels a configuration may have (`NATS_JS_PRIORITY_LEVELS` is
/// `1..=10`; 1 means priorities are off).
pub const MAX_PRIORITY_LEVELS: u8 = 10;

/// Sets the event's `priority` extension (0 is the highest). A connection with priorities on
/// (`NATS_JS_PRIORITY_LEVELS` > 1) publishes it on the subject of that level; with
/// priorities off the extension is carried but not read.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::{event_priority, set_priority};
/// let mut event = ce_messaging::cloudevent::new_event("org.example.order.paid", "svc", &1)?;
/// assert_eq!(event_priority(&event), Ok(None));
/// set_priority(&mut event, 0);
/// assert_eq!(event_priority(&event), Ok(Some(0)));
/// # Ok::<(), ce_messaging::error::EventError>(())
/// ```
pub fn set_priority(event: &mut Event, priority: u8) {
    event.set_extension(PRIORITY_EXTENSION, i64::from(priority));
}

/// The event's `priority` extension: `Ok(None)` when absent, `Ok(Some(p))` for an integer
/// (or a string of decimal digits, as binary mode and other SDKs carry it) within 0..=255,
/// else `Err` with what is wrong.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::event_priority;
/// use cloudevents::AttributesWriter;
/// let mut event = ce_messaging::cloudevent::new_event("t", "s", &1)?;
/// event.set_extension("priority", "2");
/// assert_eq!(event_priority(&event), Ok(Some(2)));
/// event.set_extension("priority", "high");
/// assert!(event_priority(&event).is_err());
/// # Ok::<(), ce_messaging::error::EventError>(())
/// ```
pub fn event_priority(event: &Event) -> Result<Option<u8>, String> {
    let value = match event.extension(PRIORITY_EXTENSION) {
        None => return Ok(None),
        Some(ExtensionValue::Integer(i)) => u8::try_from(*i).ok(),
        Some(ExtensionValue::String(s)) => {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                s.parse::<u8>().ok()
            }
        }
        Some(ExtensionValue::Boolean(_)) => None,
    };
    match value {
        Some(p) => Ok(Some(p)),
        None => Err(format!(
            "the priority extension of event {} is {}, not an integer 0..=255",
            event.id(),
            event
                .extension(PRIORITY_EXTENSION)
                .map(|v| format!("{v:?}"))
                .unwrap_or_default()
        )),
    }
}

/// The subject an event of `event_type` with priority `priority` is stored on, with `levels`
/// levels: `<prefix>._priority.<p>.<type>` above the lowest level, `<prefix>.<type>` at the
/// lowest level (`levels - 1`) and with priorities off (`levels` <= 1). The caller has
/// checked that `priority < levels`; a higher one is served at the lowest level.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::priority_subject;
/// assert_eq!(priority_subject("events", "order.paid", 0, 3), "events._priority.0.order.paid");
/// assert_eq!(priority_subject("events", "order.paid", 2, 3), "events.order.paid");
/// assert_eq!(priority_subject("events", "order.paid", 0, 1), "events.order.paid");
/// ```
pub fn priority_subject(prefix: &str, event_type: &str, priority: u8, levels: u8) -> String {
    if priority.saturating_add(1) >= levels {
        format!("{prefix}.{event_type}")
    } else {
        format!("{prefix}.{PRIORITY_TOKEN}.{priority}.{event_type}")
    }
}

/// The durable consumer that serves level `level` of durable `durable` with `levels` levels:
/// `<durable>-p<level>` above the lowest level, `<durable>` at the lowest (and with
/// priorities off). Dead letters of every level go to the durable's one dead-letter subject
/// (`deadletter.<stream>.<durable>`).
///
/// # Examples
///
/// ```
/// use ce_messaging::events::priority_durable;
/// assert_eq!(priority_durable("billing", 0, 3), "billing-p0");
/// assert_eq!(priority_durable("billing", 2, 3), "billing");
/// ```
pub fn priority_durable(durable: &str, level: u8, levels: u8) -> String {
    if level.saturating_add(1) >= levels {
        durable.to_owned()
    } else {
        format!("{durable}-p{level}")
    }
}

/// The priority an event is published at with `levels` levels: its `priority` extension when
/// priorities are on (absent: the lowest level), checked to be below `levels`; always the
/// only level when they are off (the extension is then not read, so events that carried
/// some other `priority` before are published as they were).
pub(crate) fn publish_level(event: &Event, levels: u8) -> Result<u8, String> {
    if levels <= 1 {
        return Ok(0);
    }
    match event_priority(event)? {
        None => Ok(levels - 1),
        Some(p) if p < levels => Ok(p),
        Some(p) => Err(format!(
            "event {} has priority {p}, but there are {levels} priority levels (0..={}; NATS_JS_PRIORITY_LEVELS)",
            event.id(),
            levels - 1
        )),
    }
}

/// The filter subjects of every level of a listener of `types`, highest level first, each
/// sorted: `levels` lists (one with priorities off).
pub(crate) fn level_subjects(prefix: &str, types: &[&str], levels: u8) -> Vec<Vec<String>> {
    (0..levels.max(1))
        .map(|level| {
            let mut subjects: Vec<String> = types
                .iter()
                .map(|t| priority_subject(prefix, t, level, levels))
                .collect();
            subjects.sort();
            subjects
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_level_reads_the_extension_only_with_priorities_on() {
        let mut event = crate::event::new_event("t", "s", &1).unwrap();
        assert_eq!(publish_level(&event, 1), Ok(0));
        assert_eq!(
            publish_level(&event, 3),
            Ok(2),
            "no priority: the lowest level"
        );
        set_priority(&mut event, 1);
        assert_eq!(publish_level(&event, 3), Ok(1));
        set_priority(&mut event, 3);
        let err = publish_level(&event, 3).unwrap_err();
        assert!(
            err.contains("priority 3") && err.contains("NATS_JS_PRIORITY_LEVELS"),
            "{err}"
        );
        event.set_extension(PRIORITY_EXTENSION, "urgent");
        assert_eq!(publish_level(&event, 1), Ok(0), "off: not read");
        assert!(publish_level(&event, 2).is_err());
        event.set_extension(PRIORITY_EXTENSION, -1i64);
        assert!(publish_level(&event, 2).is_err());
        event.set_extension(PRIORITY_EXTENSION, true);
        assert!(publish_level(&event, 2).is_err());
    }

    #[test]
    fn level_subjects_put_the_lowest_level_on_the_ordinary_subject() {
        let types = ["b.x", "a.y"];
        let levels = level_subjects("ev", &types, 3);
        assert_eq!(
            levels,
            vec![
                vec![
                    "ev._priority.0.a.y".to_string(),
                    "ev._priority.0.b.x".into()
                ],
                vec![
                    "ev._priority.1.a.y".to_string(),
                    "ev._priority.1.b.x".into()
                ],
                vec!["ev.a.y".to_string(), "ev.b.x".into()],
            ]
        );
        assert_eq!(
            level_subjects("ev", &types, 1),
            vec![vec!["ev.a.y".to_string(), "ev.b.x".into()]]
        );
    }
}
