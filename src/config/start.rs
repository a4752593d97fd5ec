//! [`StartPosition`]: where a new durable consumer starts reading the events stream
//! (`NATS_JS_START_POSITION`, or the listen option).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};

/// Where a **new** durable starts reading the events stream. It applies only when a listen
/// creates the durable: an existing durable keeps its position (what it acked stays acked,
/// what it has not settled comes again), whatever the option says.
///
/// The default is [`All`](Self::All), JetStream's own: a service's durable handles every
/// event of its types still in the stream, also those published before the service first
/// started (a consumer deployed after its publisher loses nothing). A tool or a demo pointed
/// at a shared server should use [`New`](Self::New) instead, or it handles other
/// applications' history of the same types: the quickstart and `cemsg listen` do.
///
/// From text (`NATS_JS_START_POSITION`, `cemsg listen --start`): `all`, `new`,
/// `sequence:<n>` (a stream sequence, at least 1) or `time:<RFC 3339 timestamp>`.
///
/// # Examples
///
/// ```
/// use ce_messaging::config::StartPosition;
///
/// assert_eq!("new".parse::<StartPosition>()?, StartPosition::New);
/// assert_eq!("sequence:42".parse::<StartPosition>()?, StartPosition::Sequence(42));
/// let from = "time:2026-12-04T10:00:00Z".parse::<StartPosition>()?;
/// assert_eq!(from.to_string(), "time:2026-12-04T10:00:00Z");
/// assert!("sequence:0".parse::<StartPosition>().is_err());
/// assert_eq!(StartPosition::default(), StartPosition::All);
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartPosition {
    /// Every event of its types still in the stream (JetStream `DeliverPolicy::All`).
    #[default]
    All,
    /// Only events stored after the durable was created (JetStream `DeliverPolicy::New`).
    New,
    /// Events from this stream sequence on (at least 1; JetStream `ByStartSequence`).
    Sequence(u64),
    /// Events stored at or after this time (JetStream `ByStartTime`).
    Time(DateTime<Utc>),
}

impl StartPosition {
    /// Refuses a position no server accepts (sequence 0).
    pub(crate) fn check(&self) -> Result<(), String> {
        match self {
            StartPosition::Sequence(0) => Err("a start sequence must be at least 1".to_owned()),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for StartPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartPosition::All => f.write_str("all"),
            StartPosition::New => f.write_str("new"),
            StartPosition::Sequence(n) => write!(f, "sequence:{n}"),
            StartPosition::Time(t) => {
                write!(f, "time:{}", t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
            }
        }
    }
}

impl FromStr for StartPosition {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let expected = "expected all, new, sequence:<n> or time:<RFC 3339 timestamp>";
        let position = match text.to_ascii_lowercase().as_str() {
            "all" => StartPosition::All,
            "new" => StartPosition::New,
            _ => match text.split_once(':') {
                Some((kind, value)) if kind.eq_ignore_ascii_case("sequence") => {
                    let n = value.trim().parse::<u64>().map_err(|_| {
                        format!("{text:?}: {value:?} is not a stream sequence ({expected})")
                    })?;
                    StartPosition::Sequence(n)
                }
                Some((kind, value)) if kind.eq_ignore_ascii_case("time") => {
                    let t = DateTime::parse_from_rfc3339(value.trim()).map_err(|e| {
                        format!("{text:?}: {value:?} is not an RFC 3339 timestamp ({e})")
                    })?;
                    StartPosition::Time(t.with_timezone(&Utc))
                }
                _ => return Err(format!("{text:?} is not a start position ({expected})")),
            },
        };
        position.check().map_err(|why| format!("{text:?}: {why}"))?;
        Ok(position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_positions_parse_and_print_back() {
        for text in [
            "all",
            "new",
            "sequence:1",
            "sequence:18446744073709551615",
            "time:2026-12-04T10:00:00Z",
            "time:2026-12-04T10:00:00.500Z",
        ] {
            let position: StartPosition = text.parse().unwrap();
            assert_eq!(position.to_string(), text);
        }
        assert_eq!(" NEW ".parse::<StartPosition>(), Ok(StartPosition::New));
        assert_eq!(
            "time:2026-12-04T11:00:00+01:00"
                .parse::<StartPosition>()
                .unwrap()
                .to_string(),
            "time:2026-12-04T10:00:00Z"
        );
        for bad in [
            "",
            "first",
            "sequence:0",
            "sequence:-1",
            "sequence:x",
            "time:yesterday",
            "time:2026-12-04",
            "42",
        ] {
            assert!(bad.parse::<StartPosition>().is_err(), "{bad:?}");
        }
    }
}
