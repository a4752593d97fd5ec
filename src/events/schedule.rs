//! Time in events: deferred and recurring publishes ([`Schedule`]) and per-event expiry, both
//! asked for with [`PublishOptions`] on
//! [`EventConnection::publish_with`](super::EventConnection::publish_with); the schedule
//! subjects, the firing-id rule and the expiry check every backend shares.
//!
//! JetStream keeps schedules itself (ADR-51 message schedules, `Nats-Schedule`): a schedule is
//! one message on `_CE_SCHEDULE.<stream>.<schedule id>` in the events stream, and the server
//! stores a copy of it on the event's ordinary subject at each firing. Expiry is the server's
//! per-message TTL (`Nats-TTL`). The memory backend does the same on tokio's clock. See
//! `docs/wire-contract.md` ("Scheduled and expiring events").

use std::time::Duration;

use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::error::{Error, PublishErrorKind};

/// The first token of every schedule subject: `_CE_SCHEDULE.<stream>.<schedule id>`. Outside
/// the events' `<prefix>.>`, so a schedule never collides with an event type.
pub const SCHEDULE_SUBJECT_PREFIX: &str = "_CE_SCHEDULE";

/// `Nats-Schedule`: the schedule of a schedule message (`@at <RFC 3339>`, `@every <duration>`,
/// a 6-field cron expression or `@hourly`-style name).
pub const NATS_SCHEDULE: &str = "Nats-Schedule";
/// `Nats-Schedule-Target`: the subject a schedule's firings are stored on.
pub const NATS_SCHEDULE_TARGET: &str = "Nats-Schedule-Target";
/// `Nats-Schedule-TTL`: the time-to-live each firing gets (becomes its `Nats-TTL`).
pub const NATS_SCHEDULE_TTL: &str = "Nats-Schedule-TTL";
/// `Nats-Schedule-Time-Zone`: the IANA time zone a cron expression is read in.
pub const NATS_SCHEDULE_TIME_ZONE: &str = "Nats-Schedule-Time-Zone";
/// `Nats-Scheduler`: on a firing, the subject of the schedule that produced it.
pub const NATS_SCHEDULER: &str = "Nats-Scheduler";
/// `Nats-Schedule-Next`: on a firing, the time of the schedule's next firing (RFC 3339, UTC),
/// or `purge` when it was the only one (`@at`).
pub const NATS_SCHEDULE_NEXT: &str = "Nats-Schedule-Next";
/// `Nats-TTL`: a stored message's time-to-live; the stream removes it when it passes.
pub const NATS_TTL: &str = "Nats-TTL";

/// The shortest interval of a recurring schedule and the shortest time-to-live the server
/// accepts.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// When an event is delivered.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::Schedule;
/// use std::time::Duration;
/// let reminder = Schedule::After(Duration::from_secs(3600));
/// let nightly = Schedule::cron("0 0 2 * * *");
/// assert!(matches!(nightly, Schedule::Cron { .. }));
/// # let _ = reminder;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Schedule {
    /// Once, at this instant (an instant in the past: at once). JetStream: nats-server 2.12+.
    At(DateTime<Utc>),
    /// Once, this long after the publish (sent as `@at now + delay`). nats-server 2.12+.
    After(Duration),
    /// Again and again, every interval (at least 1 s), the first time one interval after the
    /// publish. nats-server 2.14+.
    Every(Duration),
    /// On a 6-field cron expression (`sec min hour day-of-month month day-of-week`, e.g.
    /// `0 30 9 * * mon-fri`) or `@yearly`, `@monthly`, `@weekly`, `@daily`, `@hourly`, read in
    /// `time_zone` (an IANA name; `None`: UTC). nats-server 2.14+. The memory backend reads
    /// cron in UTC only: it accepts the zones that are UTC all year (`UTC`, `Etc/UTC`, `GMT`,
    /// ...) and refuses any other with `PublishErrorKind::Unsupported`.
    Cron {
        /// The expression.
        expression: String,
        /// The IANA time zone (`Europe/Berlin`); `None`: UTC.
        time_zone: Option<String>,
    },
}

impl Schedule {
    /// A cron schedule in UTC.
    ///
    /// # Examples
    ///
    /// ```
    /// let hourly = ce_messaging::events::Schedule::cron("@hourly");
    /// # let _ = hourly;
    /// ```
    pub fn cron(expression: impl Into<String>) -> Schedule {
        Schedule::Cron {
            expression: expression.into(),
            time_zone: None,
        }
    }

    /// Whether it fires more than once.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::events::Schedule;
    /// assert!(Schedule::Every(std::time::Duration::from_secs(60)).is_recurring());
    /// assert!(!Schedule::After(std::time::Duration::from_secs(60)).is_recurring());
    /// ```
    pub fn is_recurring(&self) -> bool {
        matches!(self, Schedule::Every(_) | Schedule::Cron { .. })
    }
}

/// How an event is published: now or on a [`Schedule`], with or without a time-to-live.
/// `PublishOptions::default()` is a plain publish.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::PublishOptions;
/// use std::time::Duration;
///
/// // A reminder in an hour; a quote that is worthless after 30 s.
/// let reminder = PublishOptions::after(Duration::from_secs(3600));
/// let quote = PublishOptions::default().with_ttl(Duration::from_secs(30));
/// assert!(reminder.schedule.is_some() && quote.ttl.is_some());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishOptions {
    /// When to deliver it; `None`: now.
    pub schedule: Option<Schedule>,
    /// How long it may wait to be handled (at least 1 s, whole milliseconds); counted from
    /// the publish, or, for a scheduled event, from each firing. After that the stream removes
    /// it and no handler is given it. JetStream: nats-server 2.11+.
    pub ttl: Option<Duration>,
}

impl PublishOptions {
    /// Deliver once at `instant`.
    ///
    /// # Examples
    ///
    /// ```
    /// let tonight = chrono::Utc::now() + chrono::Duration::hours(6);
    /// let options = ce_messaging::events::PublishOptions::at(tonight);
    /// # let _ = options;
    /// ```
    pub fn at(instant: DateTime<Utc>) -> PublishOptions {
        Self::on(Schedule::At(instant))
    }

    /// Deliver once, `delay` after the publish.
    ///
    /// # Examples
    ///
    /// ```
    /// let options = ce_messaging::events::PublishOptions::after(std::time::Duration::from_secs(90));
    /// # let _ = options;
    /// ```
    pub fn after(delay: Duration) -> PublishOptions {
        Self::on(Schedule::After(delay))
    }

    /// Deliver every `interval` (at least 1 s) until the schedule is cancelled.
    ///
    /// # Examples
    ///
    /// ```
    /// let options = ce_messaging::events::PublishOptions::every(std::time::Duration::from_secs(300));
    /// # let _ = options;
    /// ```
    pub fn every(interval: Duration) -> PublishOptions {
        Self::on(Schedule::Every(interval))
    }

    /// Deliver on a cron expression (see [`Schedule::Cron`]) in UTC until cancelled.
    ///
    /// # Examples
    ///
    /// ```
    /// let options = ce_messaging::events::PublishOptions::cron("0 0 2 * * *");
    /// # let _ = options;
    /// ```
    pub fn cron(expression: impl Into<String>) -> PublishOptions {
        Self::on(Schedule::cron(expression))
    }

    /// Deliver on `schedule`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::events::{PublishOptions, Schedule};
    /// let options = PublishOptions::on(Schedule::Every(std::time::Duration::from_secs(10)));
    /// # let _ = options;
    /// ```
    pub fn on(schedule: Schedule) -> PublishOptions {
        PublishOptions {
            schedule: Some(schedule),
            ttl: None,
        }
    }

    /// The same options with a time-to-live.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::events::PublishOptions;
    /// let options = PublishOptions::default().with_ttl(std::time::Duration::from_secs(30));
    /// assert_eq!(options.ttl, Some(std::time::Duration::from_secs(30)));
    /// ```
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> PublishOptions {
        self.ttl = Some(ttl);
        self
    }

    /// Whether these are the options of a plain publish (no schedule, no time-to-live).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ce_messaging::events::PublishOptions::default().is_plain());
    /// ```
    pub fn is_plain(&self) -> bool {
        self.schedule.is_none() && self.ttl.is_none()
    }

    /// The oldest nats-server (major, minor) these options need: 2.11 for a time-to-live,
    /// 2.12 for `At`/`After`, 2.14 for `Every`/`Cron`; `None` for a plain publish.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::events::PublishOptions;
    /// use std::time::Duration;
    /// assert_eq!(PublishOptions::every(Duration::from_secs(5)).server_needed(), Some((2, 14)));
    /// assert_eq!(PublishOptions::default().with_ttl(Duration::from_secs(5)).server_needed(), Some((2, 11)));
    /// ```
    pub fn server_needed(&self) -> Option<(u64, u64)> {
        match (&self.schedule, self.ttl) {
            (Some(s), _) if s.is_recurring() => Some((2, 14)),
            (Some(_), _) => Some((2, 12)),
            (None, Some(_)) => Some((2, 11)),
            (None, None) => None,
        }
    }

    /// Checks the options (intervals and time-to-live at least 1 s, a cron expression that
    /// parses) and gives the `Nats-Schedule` value, with `After` turned into `@at now + delay`.
    pub(crate) fn schedule_header(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Option<String>, Error<PublishErrorKind>> {
        if let Some(ttl) = self.ttl {
            if ttl < MIN_INTERVAL {
                return Err(invalid(format!(
                    "time-to-live {ttl:?} is shorter than the 1 s the server accepts"
                )));
            }
        }
        let Some(schedule) = &self.schedule else {
            return Ok(None);
        };
        Ok(Some(match schedule {
            Schedule::At(at) => format!("@at {}", rfc3339(ceil_second(*at))),
            Schedule::After(delay) => {
                let delay = chrono::Duration::from_std(*delay)
                    .map_err(|_| invalid(format!("delay {delay:?} is too long")))?;
                format!("@at {}", rfc3339(ceil_second(now + delay)))
            }
            Schedule::Every(interval) => {
                if *interval < MIN_INTERVAL {
                    return Err(invalid(format!(
                        "interval {interval:?} is shorter than the 1 s the server accepts"
                    )));
                }
                format!("@every {}", go_duration(*interval))
            }
            Schedule::Cron { expression, .. } => {
                Cron::parse(expression)
                    .map_err(|why| invalid(format!("cron expression {expression:?}: {why}")))?;
                expression.trim().to_owned()
            }
        }))
    }
}

fn invalid(detail: String) -> Error<PublishErrorKind> {
    Error::with_detail(PublishErrorKind::InvalidSchedule, detail)
}

/// A schedule kept by the events stream, as
/// [`EventConnection::schedules`](super::EventConnection::schedules) lists it.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(events: &dyn ce_messaging::events::EventConnection) -> Result<(), Box<dyn std::error::Error>> {
/// for schedule in events.schedules().await? {
///     println!("{} {} -> {}", schedule.id, schedule.schedule, schedule.target);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScheduleInfo {
    /// The schedule id: the id of the event it was published with (cancel with it).
    pub id: String,
    /// Its subject, `_CE_SCHEDULE.<stream>.<id>`.
    pub subject: String,
    /// The `Nats-Schedule` value (`@at ...`, `@every ...`, a cron expression).
    pub schedule: String,
    /// The subject its firings are stored on (`<prefix>.<type>`).
    pub target: String,
    /// The time-to-live of each firing, as sent (`30s`), if any.
    pub ttl: Option<String>,
    /// The cron time zone, if any.
    pub time_zone: Option<String>,
    /// The scheduled event's type, when its message decodes.
    pub event_type: Option<String>,
    /// The scheduled event's `time` (when it was created), when its message decodes.
    pub created: Option<DateTime<Utc>>,
}

impl ScheduleInfo {
    /// The info of the schedule message `headers`/`payload` stored on `subject`, whose ids
    /// follow `prefix` (`_CE_SCHEDULE.<stream>.`); `None` for a subject outside it.
    pub(crate) fn from_message(
        prefix: &str,
        subject: &str,
        headers: Option<&crate::codec::HeaderMap>,
        payload: &bytes::Bytes,
    ) -> Option<ScheduleInfo> {
        let id = subject.strip_prefix(prefix)?;
        let header = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let event = crate::codec::decode(headers, payload).ok();
        Some(ScheduleInfo {
            id: id.to_owned(),
            subject: subject.to_owned(),
            schedule: header(NATS_SCHEDULE).unwrap_or_default(),
            target: header(NATS_SCHEDULE_TARGET).unwrap_or_default(),
            ttl: header(NATS_SCHEDULE_TTL),
            time_zone: header(NATS_SCHEDULE_TIME_ZONE),
            event_type: event.as_ref().map(|e| e.ty().to_owned()),
            created: event.as_ref().and_then(|e| e.time().copied()),
        })
    }
}

/// The subject of the schedule `id` in `stream`: `_CE_SCHEDULE.<stream>.<id>`.
///
/// # Examples
///
/// ```
/// assert_eq!(ce_messaging::events::schedule_subject("CLOUDEVENTS", "cloudevent-x"), "_CE_SCHEDULE.CLOUDEVENTS.cloudevent-x");
/// ```
pub fn schedule_subject(stream: &str, id: &str) -> String {
    format!("{SCHEDULE_SUBJECT_PREFIX}.{stream}.{id}")
}

/// The subjects of every schedule of `stream`: `_CE_SCHEDULE.<stream>.>`.
pub(crate) fn schedule_subjects(stream: &str) -> String {
    format!("{SCHEDULE_SUBJECT_PREFIX}.{stream}.>")
}

/// Checks that an event id can name a schedule (it becomes a subject token): 1 to 128 ASCII
/// letters, digits, `-` or `_`. Generated ids (`cloudevent-<xid>`) always can.
pub(crate) fn check_schedule_id(id: &str) -> Result<(), Error<PublishErrorKind>> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "event id {:?} cannot name a schedule: a scheduled event's id must be 1 to 128 ASCII letters, digits, '-' or '_'",
            id.chars().take(80).collect::<String>()
        )))
    }
}

/// The id a delivered event is handled with: a firing of a recurring schedule (headers
/// `Nats-Scheduler` and a `Nats-Schedule-Next` that is a time) gets
/// `<event id>@<Nats-Schedule-Next>`, so each firing has its own id, the same on every
/// redelivery and for every peer; anything else keeps its id (`None`).
///
/// # Examples
///
/// ```
/// use ce_messaging::events::firing_id;
/// assert_eq!(
///     firing_id("cloudevent-1", Some("_CE_SCHEDULE.S.cloudevent-1"), Some("2026-12-04T20:00:05Z")).as_deref(),
///     Some("cloudevent-1@2026-12-04T20:00:05Z")
/// );
/// assert_eq!(firing_id("cloudevent-1", Some("_CE_SCHEDULE.S.cloudevent-1"), Some("purge")), None);
/// assert_eq!(firing_id("cloudevent-1", None, None), None);
/// ```
pub fn firing_id(event_id: &str, scheduler: Option<&str>, next: Option<&str>) -> Option<String> {
    match (scheduler, next) {
        (Some(_), Some(next)) if !next.is_empty() && next != "purge" => {
            Some(format!("{event_id}@{next}"))
        }
        _ => None,
    }
}

/// Gives a decoded event the id of its firing (see [`firing_id`]).
pub(crate) fn apply_firing_id(
    event: &mut crate::codec::ReceivedEvent,
    headers: Option<&crate::codec::HeaderMap>,
) {
    use cloudevents::AttributesWriter;
    let Some(headers) = headers else { return };
    let scheduler = headers.get(NATS_SCHEDULER).map(|v| v.as_str());
    let next = headers.get(NATS_SCHEDULE_NEXT).map(|v| v.as_str());
    if let Some(id) = firing_id(event.id(), scheduler, next) {
        // A firing is rare: the event is built to take its new id.
        event.event_mut().set_id(id);
    }
}

/// When a stored message expires: stored at `stored` (wall clock) with the `Nats-TTL` value
/// `ttl` (`never`, a number of seconds, or a duration with units). `None`: never, or the
/// value does not parse (the server refuses such a message, so it is never stored).
pub(crate) fn expiry(stored: DateTime<Utc>, ttl: Option<&str>) -> Option<DateTime<Utc>> {
    let ttl = parse_ttl(ttl?)?;
    Some(stored + chrono::Duration::from_std(ttl).ok()?)
}

/// A `Nats-TTL` value: `never` (`None`), whole seconds, or a Go duration.
fn parse_ttl(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("never") {
        return None;
    }
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    parse_duration(value).ok()
}

/// How far from now (`now`, wall clock) `expires` is, on tokio's clock: the deadline a
/// delivery is checked against.
pub(crate) fn expiry_instant(expires: DateTime<Utc>, now: DateTime<Utc>) -> tokio::time::Instant {
    let left = (expires - now).to_std().unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + left
}

/// `at` rounded up to a whole second: the server fires schedules on whole seconds, so a
/// fraction could make it fire up to a second early.
pub(crate) fn ceil_second(at: DateTime<Utc>) -> DateTime<Utc> {
    match at.with_nanosecond(0) {
        Some(whole) if whole < at => whole + chrono::Duration::seconds(1),
        Some(whole) => whole,
        None => at,
    }
}

/// An instant as RFC 3339 in UTC with seconds (`2026-12-04T20:00:05Z`), as the server writes
/// `Nats-Schedule-Next`.
pub(crate) fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// A duration as a Go duration string (`90s`, `1500ms`), as the server reads `@every` and
/// `Nats-TTL`.
pub(crate) fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Parses a duration with units: `30s`, `5m`, `2h`, `1h30m`, `250ms`, `1d` (days); a bare
/// number is seconds.
///
/// # Errors
///
/// A text that says what does not parse.
///
/// # Examples
///
/// ```
/// use ce_messaging::events::parse_duration;
/// use std::time::Duration;
/// assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
/// assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
/// assert!(parse_duration("5 parsecs").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {text:?}: a number needs a unit (ms, s, m, h, d)"))?;
        if digits == 0 {
            return Err(format!("duration {text:?}: expected a number at {rest:?}"));
        }
        let number: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("duration {text:?}: bad number {:?}", &rest[..digits]))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            other => {
                return Err(format!(
                    "duration {text:?}: unknown unit {other:?} (ms, s, m, h, d)"
                ))
            }
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(number * unit)
            .map_err(|_| format!("duration {text:?} is out of range"))?;
    }
    Ok(total)
}

/// A parsed 6-field cron expression (seconds, minutes, hours, day of month, month, day of
/// week), as ADR-51 defines it: `*`, ranges `a-b`, lists `a,b`, steps `*/n` and `a-b/n`,
/// month and weekday names (`jan`, `mon`), and `@yearly`/`@annually`, `@monthly`, `@weekly`,
/// `@daily`/`@midnight`, `@hourly`. Day of month and day of week both restricted: either
/// matching is enough (as crontab).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cron {
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_restricted: bool,
    weekdays_restricted: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Cron {
    /// Parses an expression; the error says what is wrong.
    pub(crate) fn parse(expression: &str) -> Result<Cron, String> {
        let expression = expression.trim();
        let expanded = match expression.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 0 1 1 *".to_owned(),
            "@monthly" => "0 0 0 1 * *".to_owned(),
            "@weekly" => "0 0 0 * * 0".to_owned(),
            "@daily" | "@midnight" => "0 0 0 * * *".to_owned(),
            "@hourly" => "0 0 * * * *".to_owned(),
            other if other.starts_with('@') => {
                return Err(format!("unknown name {other} (use @every for intervals)"))
            }
            _ => expression.to_owned(),
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 6 {
            return Err(format!(
                "{} fields, 6 are needed (seconds minutes hours day-of-month month day-of-week)",
                fields.len()
            ));
        }
        let (days, days_restricted) = field(fields[3], 1, 31, &[], 0)?;
        let (weekdays, weekdays_restricted) = field(fields[5], 0, 7, &WEEKDAYS, 0)?;
        // 7 is Sunday too.
        let weekdays = (weekdays | (weekdays >> 7)) & 0x7f;
        Ok(Cron {
            seconds: field(fields[0], 0, 59, &[], 0)?.0,
            minutes: field(fields[1], 0, 59, &[], 0)?.0,
            hours: field(fields[2], 0, 23, &[], 0)?.0,
            days,
            months: field(fields[4], 1, 12, &MONTHS, 1)?.0,
            weekdays,
            days_restricted,
            weekdays_restricted,
        })
    }

    fn day_matches(&self, date: chrono::NaiveDate) -> bool {
        if self.months & (1 << date.month()) == 0 {
            return false;
        }
        let dom = self.days & (1 << date.day()) != 0;
        let dow = self.weekdays & (1 << date.weekday().num_days_from_sunday()) != 0;
        if self.days_restricted && self.weekdays_restricted {
            dom || dow
        } else {
            dom && dow
        }
    }

    /// The first matching second strictly after `after` (within five years).
    pub(crate) fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let start = after.with_nanosecond(0)? + chrono::Duration::seconds(1);
        let mut date = start.date_naive();
        for _ in 0..(366 * 5) {
            if self.day_matches(date) {
                let first_day = date == start.date_naive();
                for h in 0..24u32 {
                    if self.hours & (1 << h) == 0 || (first_day && h < start.hour()) {
                        continue;
                    }
                    let first_hour = first_day && h == start.hour();
                    for m in 0..60u32 {
                        if self.minutes & (1 << m) == 0 || (first_hour && m < start.minute()) {
                            continue;
                        }
                        let first_minute = first_hour && m == start.minute();
                        for s in 0..60u32 {
                            if self.seconds & (1 << s) == 0 || (first_minute && s < start.second())
                            {
                                continue;
                            }
                            return date.and_hms_opt(h, m, s).map(|t| t.and_utc());
                        }
                    }
                }
            }
            date = date.succ_opt()?;
        }
        None
    }
}

/// One cron field as a bit set of the allowed values, and whether it restricts (not `*`).
fn field(
    text: &str,
    min: u32,
    max: u32,
    names: &[&str],
    name_base: u32,
) -> Result<(u64, bool), String> {
    let value = |s: &str| -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            return Ok(i as u32 + name_base);
        }
        let n: u32 = s.parse().map_err(|_| {
            format!(
                "{s:?} is not a number{}",
                if names.is_empty() { "" } else { " or name" }
            )
        })?;
        if n < min || n > max {
            return Err(format!("{n} is outside {min}-{max}"));
        }
        Ok(n)
    };
    let mut bits = 0u64;
    let mut restricted = false;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("bad step in {part:?}"))?;
                (range, step)
            }
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" || range == "?" {
            if step != 1 {
                restricted = true;
            }
            (min, max)
        } else {
            restricted = true;
            match range.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (value(a)?, value(b)?);
                    if a > b {
                        return Err(format!("range {range:?} runs backwards"));
                    }
                    (a, b)
                }
                None => {
                    let a = value(range)?;
                    (a, if step > 1 { max } else { a })
                }
            }
        };
        let mut n = lo;
        while n <= hi {
            bits |= 1 << n;
            n += step;
        }
    }
    Ok((bits, restricted))
}

/// What a publish with options sends besides the event: the subject (the schedule subject
/// for a scheduled event, else `None`: the event's own) and the headers.
#[derive(Debug, Default)]
pub(crate) struct Directives {
    pub subject: Option<String>,
    pub headers: Vec<(&'static str, String)>,
}

/// The directives of `options` for the event `event_id` whose subject is `target`, in the
/// events stream `stream`; checks them first.
pub(crate) fn directives(
    options: &PublishOptions,
    event_id: &str,
    stream: &str,
    target: &str,
    now: DateTime<Utc>,
) -> Result<Directives, Error<PublishErrorKind>> {
    let schedule = options.schedule_header(now)?;
    let mut directives = Directives::default();
    match schedule {
        Some(schedule) => {
            check_schedule_id(event_id)?;
            directives.subject = Some(schedule_subject(stream, event_id));
            directives.headers.push((NATS_SCHEDULE, schedule));
            directives
                .headers
                .push((NATS_SCHEDULE_TARGET, target.to_owned()));
            if let Some(ttl) = options.ttl {
                directives
                    .headers
                    .push((NATS_SCHEDULE_TTL, go_duration(ttl)));
            }
            if let Some(Schedule::Cron {
                time_zone: Some(zone),
                ..
            }) = &options.schedule
            {
                directives
                    .headers
                    .push((NATS_SCHEDULE_TIME_ZONE, zone.clone()));
            }
        }
        None => {
            if let Some(ttl) = options.ttl {
                directives.headers.push((NATS_TTL, go_duration(ttl)));
            }
        }
    }
    Ok(directives)
}

/// Whether a delivery's expiry passed (`expires` on tokio's clock).
pub(crate) fn expired(expires: Option<tokio::time::Instant>) -> bool {
    expires.is_some_and(|at| tokio::time::Instant::now() >= at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test time")
            .with_timezone(&Utc)
    }

    #[test]
    fn cron_next_follows_the_fields() {
        let every_10s = Cron::parse("*/10 * * * * *").expect("parses");
        assert_eq!(
            every_10s.next_after(utc("2026-01-01T00:00:05Z")),
            Some(utc("2026-01-01T00:00:10Z"))
        );
        assert_eq!(
            every_10s.next_after(utc("2026-01-01T00:00:10Z")),
            Some(utc("2026-01-01T00:00:20Z"))
        );
        let weekdays = Cron::parse("0 30 9 * * mon-fri").expect("parses");
        // 2026-01-03 is a Saturday: the next is Monday the 5th.
        assert_eq!(
            weekdays.next_after(utc("2026-01-02T10:00:00Z")),
            Some(utc("2026-01-05T09:30:00Z"))
        );
        let hourly = Cron::parse("@hourly").expect("parses");
        assert_eq!(
            hourly.next_after(utc("2026-01-01T23:59:59Z")),
            Some(utc("2026-01-02T00:00:00Z"))
        );
        let feb29 = Cron::parse("0 0 0 29 feb *").expect("parses");
        assert_eq!(
            feb29.next_after(utc("2026-03-01T00:00:00Z")),
            Some(utc("2028-02-29T00:00:00Z"))
        );
        // Day of month or day of week when both are restricted.
        let either = Cron::parse("0 0 0 1 * fri").expect("parses");
        assert_eq!(
            either.next_after(utc("2026-01-01T00:00:00Z")),
            Some(utc("2026-01-02T00:00:00Z"))
        );
    }

    #[test]
    fn bad_cron_expressions_say_why() {
        for bad in [
            "* * * *",
            "61 * * * * *",
            "* * * * * mon-",
            "@fortnightly",
            "5-1 * * * * *",
            "*/0 * * * * *",
        ] {
            assert!(Cron::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn durations_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["", "s", "5x", "5 m", "-5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(go_duration(Duration::from_secs(90)), "90s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn schedule_headers_and_their_checks() {
        let now = utc("2026-01-01T00:00:00Z");
        let after = PublishOptions::after(Duration::from_secs(5));
        assert_eq!(
            after.schedule_header(now).expect("valid").as_deref(),
            Some("@at 2026-01-01T00:00:05Z")
        );
        let every = PublishOptions::every(Duration::from_secs(60));
        assert_eq!(
            every.schedule_header(now).expect("valid").as_deref(),
            Some("@every 60s")
        );
        for bad in [
            PublishOptions::every(Duration::from_millis(500)),
            PublishOptions::cron("* * *"),
            PublishOptions::default().with_ttl(Duration::from_millis(10)),
        ] {
            let err = bad.schedule_header(now).expect_err("refused");
            assert_eq!(err.kind(), PublishErrorKind::InvalidSchedule);
        }
        assert!(PublishOptions::default()
            .schedule_header(now)
            .expect("plain")
            .is_none());
    }

    #[test]
    fn schedule_ids_must_be_one_subject_token() {
        assert!(check_schedule_id("cloudevent-cn2abc_1").is_ok());
        for bad in ["", "a.b", "a b", "a*", "ä"] {
            assert!(check_schedule_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expiry_from_the_stored_time_and_nats_ttl() {
        let stored = utc("2026-01-01T00:00:00Z");
        assert_eq!(
            expiry(stored, Some("30s")),
            Some(utc("2026-01-01T00:00:30Z"))
        );
        assert_eq!(
            expiry(stored, Some("30")),
            Some(utc("2026-01-01T00:00:30Z"))
        );
        assert_eq!(expiry(stored, Some("never")), None);
        assert_eq!(expiry(stored, None), None);
    }
}
