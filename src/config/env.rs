//! Configuration from environment variables (the `NATS_*` variables of the wire contract) and
//! the NATS connection options built from it: client name, ping interval, reconnect policy,
//! request timeout, authentication and TLS.
//!
//! Durations are given in seconds, as an integer (`"2"`) or a fraction (`"0.5"`). Every
//! duration and count has a range (`docs/configuration.md`; [`Config::validate`]). A value that
//! does not parse or is out of range is a [`ConfigError`] whose detail starts with the
//! variable's name; nothing falls back, wraps or is clamped silently. An empty variable counts as unset. Secrets (password, token) are held in
//! [`Secret`], and neither `Debug` of [`Config`] nor any error shows them, the NKey seed, the
//! credentials file's JWT or the user-info part of `NATS_URL`.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use ce_messaging::config::Config;
//!
//! let config = Config::from_vars([
//!     ("NATS_CLIENT_ID".to_string(), "orders".to_string()),
//!     ("NATS_REQUEST_TIMEOUT".to_string(), "2.5".to_string()),
//! ])?;
//! assert_eq!(config.client_id, "orders");
//! assert_eq!(config.queue_group(), "orders");
//! assert_eq!(config.request_timeout, Duration::from_millis(2500));
//! assert_eq!(config.events_subject("order.created"), "events.order.created");
//! # Ok::<(), ce_messaging::error::ConfigError>(())
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::codec::ContentMode;
use crate::error::{ConfigError, ConfigErrorKind, ConnectError, ConnectErrorKind, Error};

/// The largest request timeout: `NATS_REQUEST_TIMEOUT` above it is an error; a timeout passed
/// to a request in code is clamped to it.
///
/// # Examples
///
/// ```
/// use ce_messaging::config::{Config, MAX_REQUEST_TIMEOUT};
/// let config = Config::from_vars([("NATS_REQUEST_TIMEOUT".to_string(), "300".to_string())])?;
/// assert_eq!(config.request_timeout, MAX_REQUEST_TIMEOUT);
/// let err = Config::from_vars([("NATS_REQUEST_TIMEOUT".to_string(), "301".to_string())]);
/// assert!(err.unwrap_err().to_string().contains("NATS_REQUEST_TIMEOUT"));
/// # Ok::<(), ce_messaging::error::ConfigError>(())
/// ```
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The largest `NATS_JS_ACK_WAIT` and `NATS_JS_DUPLICATE_WINDOW`: one day. The server keeps
/// both in nanoseconds (a signed 64-bit count, so a value beyond ~292 years wraps); a day is
/// far beyond any sensible use (a long handler keeps its event with in-progress acks; the
/// server holds every message id of the duplicate window in memory).
///
/// # Examples
///
/// ```
/// use ce_messaging::config::{Config, MAX_JS_DURATION};
/// let config = Config { js_ack_wait: MAX_JS_DURATION * 2, ..Default::default() };
/// assert!(config.validate().unwrap_err().to_string().contains("NATS_JS_ACK_WAIT"));
/// ```
pub const MAX_JS_DURATION: Duration = Duration::from_secs(86_400);

/// The smallest `NATS_JS_DUPLICATE_WINDOW`: one second. The window also bounds how long a
/// publish retries (a retry after the window could store the event twice), so a shorter one
/// would leave a publish no time to get its ack.
///
/// # Examples
///
/// ```
/// use ce_messaging::config::{Config, MIN_DUPLICATE_WINDOW};
/// let config = Config { js_duplicate_window: MIN_DUPLICATE_WINDOW / 2, ..Default::default() };
/// assert!(config.validate().is_err());
/// ```
pub const MIN_DUPLICATE_WINDOW: Duration = Duration::from_secs(1);

/// The largest `NATS_RECONNECT_WAIT` and `NATS_EVENTS_TIMEOUT`: one hour.
///
/// # Examples
///
/// ```
/// use ce_messaging::config::{Config, MAX_CLIENT_DURATION};
/// let config = Config { events_timeout: MAX_CLIENT_DURATION, ..Default::default() };
/// assert!(config.validate().is_ok());
/// ```
pub const MAX_CLIENT_DURATION: Duration = Duration::from_secs(3600);

/// The largest count of `NATS_JS_MAX_DELIVER` and `NATS_MAX_RECONNECTS` (`-1`, unlimited, is
/// allowed besides): far beyond any retry policy, and it keeps the consumer's limit (one
/// delivery more than `NATS_JS_MAX_DELIVER`, to dead-letter) far from overflowing.
///
/// # Examples
///
/// ```
/// use ce_messaging::config::{Config, MAX_COUNT};
/// let config = Config { js_max_deliver: MAX_COUNT + 1, ..Default::default() };
/// assert!(config.validate().unwrap_err().to_string().contains("NATS_JS_MAX_DELIVER"));
/// ```
pub const MAX_COUNT: i64 = 1_000_000;

/// The server URL used when `NATS_URL` is not set.
///
/// # Examples
///
/// ```
/// use ce_messaging::config::{Config, DEFAULT_NATS_URL};
/// assert_eq!(Config::default().nats_url, DEFAULT_NATS_URL);
/// ```
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// The ping interval used when none is configured (the async-nats default).
///
/// # Examples
///
/// ```
/// use ce_messaging::config::{Config, DEFAULT_PING_INTERVAL};
/// assert_eq!(Config::default().ping_interval, DEFAULT_PING_INTERVAL);
/// ```
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(60);

/// What replaces a secret (or a URL's user info) wherever it would be shown.
const REDACTED: &str = "<redacted>";

/// A secret string (password, token): `Debug` and `Display` print `<redacted>`; the value is
/// only reachable through [`Secret::expose`].
///
/// # Examples
///
/// ```
/// use ce_messaging::config::Secret;
///
/// let secret = Secret::new("s3cr3t");
/// assert_eq!(format!("{secret:?}"), "<redacted>");
/// assert_eq!(secret.to_string(), "<redacted>");
/// assert_eq!(secret.expose(), "s3cr3t");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::config::Secret;
    /// assert_eq!(Secret::new("t0ken").expose(), "t0ken");
    /// ```
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value itself. Never log it.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::config::Secret;
    /// assert_eq!(Secret::from("pw".to_string()).expose(), "pw");
    /// ```
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_string())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Replaces the user-info part (`user:password@`, `token@`) of every URL in a comma-separated
/// server list with `<redacted>`, so the result can be logged. Text without user info is
/// returned unchanged.
///
/// # Examples
///
/// ```
/// use ce_messaging::config::redact_url;
///
/// assert_eq!(redact_url("nats://alice:s3cr3t@host:4222"), "nats://<redacted>@host:4222");
/// assert_eq!(
///     redact_url("nats://a:1@h1:4222,tls://h2:4222"),
///     "nats://<redacted>@h1:4222,tls://h2:4222"
/// );
/// assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
/// ```
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(redact_one_url)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    // Everything up to the last '@' is user info: a password with an unencoded '/', '?' or '@'
    // must not slip through, so the authority is not cut at the first '/'.
    match rest.rfind('@') {
        Some(at) => format!("{scheme}{REDACTED}{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// Everything a connection needs, read from the `NATS_*` environment variables (see
/// [`Config::from_env`]) or built in code with `..Default::default()`.
///
/// `Default` gives the wire contract's defaults with a freshly generated client id
/// (`ce-messaging-<xid>`). `Debug` never shows secrets nor URL user info.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use ce_messaging::config::Config;
///
/// let config = Config {
///     nats_url: "nats://10.0.0.1:4222".to_string(),
///     client_id: "billing".to_string(),
///     request_timeout: Duration::from_secs(5),
///     ..Default::default()
/// };
/// config.validate()?;
/// assert_eq!(config.durable_name(), "billing");
/// assert_eq!(config.dead_letter_subject(), "deadletter.CLOUDEVENTS.billing");
/// # Ok::<(), ce_messaging::error::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct Config {
    /// `NATS_URL`: server URL, or a comma-separated list for a cluster.
    /// Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// `NATS_CLIENT_ID`: the connection name, the `source` of events sent, and the default
    /// queue group and durable name. Default `ce-messaging-<xid>`.
    pub client_id: String,
    /// `NATS_QUEUE_GROUP`: queue group of query listeners; `None` means the client id.
    pub queue_group: Option<String>,
    /// `NATS_WILDCARD_SUBJECT`: when set, query listeners subscribe to this one subject and
    /// dispatch by event type.
    pub wildcard_subject: Option<String>,
    /// `NATS_MAX_RECONNECTS`: reconnect attempts before giving up; `-1` (default) is unlimited.
    pub max_reconnects: i64,
    /// `NATS_RECONNECT_WAIT`: delay between reconnect attempts (seconds). Default 2 s.
    pub reconnect_wait: Duration,
    /// `NATS_REQUEST_TIMEOUT`: query request timeout (seconds). Default 10 s, clamped to
    /// [`MAX_REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
    /// `NATS_DURABLE_NAME`: durable consumer name of event listeners; `None` means the client id.
    pub durable_name: Option<String>,
    /// `NATS_JS_STREAM`: the event stream. Default `CLOUDEVENTS`.
    pub js_stream: String,
    /// `NATS_JS_SUBJECT_PREFIX`: events are published on `<prefix>.<type>`. Default `events`.
    pub js_subject_prefix: String,
    /// `NATS_JS_ACK_WAIT`: consumer ack wait (seconds). Default 30 s.
    pub js_ack_wait: Duration,
    /// `NATS_JS_MAX_DELIVER`: deliveries before an event is dead-lettered; `-1` is unlimited.
    /// Default 5.
    pub js_max_deliver: i64,
    /// `NATS_JS_HANDLER_TIMEOUT`: the longest one event handler run may take (seconds); after
    /// it the run is cancelled and the event is settled as a failure. Default 300 s.
    pub js_handler_timeout: Duration,
    /// `NATS_JS_REPLICAS`: stream replicas, 1 to 5. Default 1.
    pub js_replicas: usize,
    /// `NATS_JS_DUPLICATE_WINDOW`: stream duplicate window (seconds). Default 120 s.
    pub js_duplicate_window: Duration,
    /// `NATS_JS_DLQ_STREAM`: the dead-letter stream. Default `DEADLETTER`.
    pub js_dlq_stream: String,
    /// `NATS_EVENTS_TIMEOUT`: default wait for response events (seconds). Default 30 s.
    pub events_timeout: Duration,
    /// `NATS_CE_MODE`: `structured` (default) or `binary`, the content mode of sent events.
    pub ce_mode: ContentMode,
    /// `NATS_CREDS_FILE`: a JWT `.creds` file (user JWT + NKey seed).
    pub creds_file: Option<PathBuf>,
    /// `NATS_NKEY_SEED_FILE`: a file holding an NKey user seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// `NATS_TLS_CA`: PEM file of the CA that signed the server certificate.
    pub tls_ca: Option<PathBuf>,
    /// `NATS_TLS_CERT`: PEM client certificate for mutual TLS (needs `NATS_TLS_KEY`).
    pub tls_cert: Option<PathBuf>,
    /// `NATS_TLS_KEY`: PEM private key of the client certificate (needs `NATS_TLS_CERT`).
    pub tls_key: Option<PathBuf>,
    /// `NATS_TLS_FIRST`: `true` to start TLS before the server's INFO (the server must have
    /// `handshake_first` on). Default `false`.
    pub tls_first: bool,
    /// `NATS_USER`: user name (needs `NATS_PASSWORD`).
    pub user: Option<String>,
    /// `NATS_PASSWORD`: password of `NATS_USER`.
    pub password: Option<Secret>,
    /// `NATS_TOKEN`: authentication token.
    pub token: Option<Secret>,
    /// How often the client pings the server to detect a dead connection. Not read from the
    /// environment. Default [`DEFAULT_PING_INTERVAL`].
    pub ping_interval: Duration,
}

/// A freshly generated client id: `ce-messaging-<xid>`.
fn generated_client_id() -> String {
    format!("ce-messaging-{}", xid::new())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats_url: DEFAULT_NATS_URL.to_string(),
            client_id: generated_client_id(),
            queue_group: None,
            wildcard_subject: None,
            max_reconnects: -1,
            reconnect_wait: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            durable_name: None,
            js_stream: "CLOUDEVENTS".to_string(),
            js_subject_prefix: "events".to_string(),
            js_ack_wait: Duration::from_secs(30),
            js_max_deliver: 5,
            js_handler_timeout: Duration::from_secs(300),
            js_replicas: 1,
            js_duplicate_window: Duration::from_secs(120),
            js_dlq_stream: "DEADLETTER".to_string(),
            events_timeout: Duration::from_secs(30),
            ce_mode: ContentMode::Structured,
            creds_file: None,
            nkey_seed_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_first: false,
            user: None,
            password: None,
            token: None,
            ping_interval: DEFAULT_PING_INTERVAL,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("nats_url", &redact_url(&self.nats_url))
            .field("client_id", &self.client_id)
            .field("queue_group", &self.queue_group)
            .field("wildcard_subject", &self.wildcard_subject)
            .field("max_reconnects", &self.max_reconnects)
            .field("reconnect_wait", &self.reconnect_wait)
            .field("request_timeout", &self.request_timeout)
            .field("durable_name", &self.durable_name)
            .field("js_stream", &self.js_stream)
            .field("js_subject_prefix", &self.js_subject_prefix)
            .field("js_ack_wait", &self.js_ack_wait)
            .field("js_max_deliver", &self.js_max_deliver)
            .field("js_handler_timeout", &self.js_handler_timeout)
            .field("js_replicas", &self.js_replicas)
            .field("js_duplicate_window", &self.js_duplicate_window)
            .field("js_dlq_stream", &self.js_dlq_stream)
            .field("events_timeout", &self.events_timeout)
            .field("ce_mode", &self.ce_mode)
            .field("creds_file", &self.creds_file)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_first", &self.tls_first)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .field("ping_interval", &self.ping_interval)
            .finish()
    }
}

/// The raw `NATS_*` variables as envy reads them (prefix stripped, lower case); every value is
/// kept as text and parsed by [`Config::from_raw`], so that errors can name the variable.
#[derive(Deserialize, Default)]
struct RawVars {
    url: Option<String>,
    client_id: Option<String>,
    queue_group: Option<String>,
    wildcard_subject: Option<String>,
    max_reconnects: Option<String>,
    reconnect_wait: Option<String>,
    request_timeout: Option<String>,
    durable_name: Option<String>,
    js_stream: Option<String>,
    js_subject_prefix: Option<String>,
    js_ack_wait: Option<String>,
    js_max_deliver: Option<String>,
    js_handler_timeout: Option<String>,
    js_replicas: Option<String>,
    js_duplicate_window: Option<String>,
    js_dlq_stream: Option<String>,
    events_timeout: Option<String>,
    ce_mode: Option<String>,
    creds_file: Option<String>,
    nkey_seed_file: Option<String>,
    tls_ca: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    tls_first: Option<String>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
}

/// An invalid-value error naming the variable.
fn invalid(var: &str, why: impl fmt::Display) -> ConfigError {
    Error::with_detail(ConfigErrorKind::InvalidValue, format!("{var}: {why}"))
}

/// `None` for an unset or empty variable.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

fn parse_seconds(var: &str, value: &str) -> Result<Duration, ConfigError> {
    let text = value.trim();
    let secs: f64 = text.parse().map_err(|_| {
        invalid(
            var,
            format!("{text:?} is not a number of seconds (e.g. \"2\" or \"0.5\")"),
        )
    })?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(invalid(
            var,
            format!("{text:?} must be a finite, non-negative number of seconds"),
        ));
    }
    Duration::try_from_secs_f64(secs)
        .map_err(|_| invalid(var, format!("{text:?} is too large a duration")))
}

fn parse_int<T: FromStr>(var: &str, value: &str) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    let text = value.trim();
    text.parse()
        .map_err(|e| invalid(var, format!("{text:?} is not a valid integer ({e})")))
}

fn parse_bool(var: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        other => Err(invalid(
            var,
            format!("{other:?} is not a boolean (true/false, 1/0, yes/no, on/off)"),
        )),
    }
}

fn parse_ce_mode(var: &str, value: &str) -> Result<ContentMode, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "structured" => Ok(ContentMode::Structured),
        "binary" => Ok(ContentMode::Binary),
        other => Err(invalid(
            var,
            format!("{other:?} is not a content mode (structured or binary)"),
        )),
    }
}

/// A NATS name (stream, consumer): non-empty, no whitespace, no `.`, `*`, `>`, `/`, `\`.
fn check_name(var: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(invalid(var, "must not be empty"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(invalid(
            var,
            format!("{value:?} must not contain {c:?} (no whitespace, '.', '*', '>', '/', '\\')"),
        ));
    }
    Ok(())
}

/// A NATS subject: dot-separated non-empty tokens, no whitespace; wildcards only if allowed.
fn check_subject(var: &str, value: &str, wildcards: bool) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(invalid(var, "must not be empty"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            var,
            format!("{value:?} is not a valid subject (whitespace)"),
        ));
    }
    let tokens: Vec<&str> = value.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(invalid(
                var,
                format!("{value:?} is not a valid subject (empty token)"),
            ));
        }
        let is_wildcard = *token == "*" || (*token == ">" && i + 1 == tokens.len());
        if is_wildcard && !wildcards {
            return Err(invalid(
                var,
                format!("{value:?} must not contain wildcards"),
            ));
        }
        if !is_wildcard && token.contains(['*', '>']) {
            return Err(invalid(
                var,
                format!("{value:?} is not a valid subject (misplaced wildcard)"),
            ));
        }
    }
    Ok(())
}

fn must_be_positive(var: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(var, "must be greater than 0 seconds"));
    }
    Ok(())
}

/// A duration within `min..=max`; the error names the variable and the range.
fn check_duration(
    var: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            var,
            format!(
                "{} seconds is out of range {}..={} seconds",
                value.as_secs_f64(),
                min.as_secs_f64(),
                max.as_secs_f64()
            ),
        ));
    }
    Ok(())
}

/// A count that is `-1` (unlimited) or within `1..=MAX_COUNT`.
fn check_count(var: &str, value: i64) -> Result<(), ConfigError> {
    if value != -1 && !(1..=MAX_COUNT).contains(&value) {
        return Err(invalid(
            var,
            format!("{value} is out of range: use -1 for unlimited or a count 1..={MAX_COUNT}"),
        ));
    }
    Ok(())
}

impl Config {
    /// Reads the configuration from the process environment (`NATS_*` variables; others are
    /// ignored), then [validates](Config::validate) it.
    ///
    /// # Errors
    ///
    /// [`ConfigErrorKind::InvalidValue`] when a variable does not parse or is out of range
    /// (the detail names the variable), [`ConfigErrorKind::Invalid`] when settings contradict
    /// each other (e.g. `NATS_USER` without `NATS_PASSWORD`).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use ce_messaging::config::Config;
    /// let config = Config::from_env()?;
    /// println!("{config:?}"); // secrets print as <redacted>
    /// # Ok::<(), ce_messaging::error::ConfigError>(())
    /// ```
    pub fn from_env() -> Result<Config, ConfigError> {
        let mut vars = Vec::new();
        for (key, value) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            if !key.starts_with("NATS_") {
                continue;
            }
            match value.into_string() {
                Ok(value) => vars.push((key.to_string(), value)),
                Err(_) => return Err(invalid(key, "value is not valid UTF-8")),
            }
        }
        Config::from_vars(vars)
    }

    /// Reads the configuration from the given `(name, value)` pairs as if they were the
    /// environment (names other than `NATS_*` are ignored), then validates it. Tests use this
    /// to avoid touching the process environment.
    ///
    /// # Errors
    ///
    /// As [`Config::from_env`].
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::config::Config;
    /// use ce_messaging::error::ConfigErrorKind;
    ///
    /// let err = Config::from_vars([("NATS_JS_REPLICAS".to_string(), "three".to_string())])
    ///     .unwrap_err();
    /// assert_eq!(err.kind(), ConfigErrorKind::InvalidValue);
    /// assert!(err.to_string().contains("NATS_JS_REPLICAS"));
    /// ```
    pub fn from_vars<I>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let vars = vars.into_iter().filter(|(k, _)| k.starts_with("NATS_"));
        let raw: RawVars = envy::prefixed("NATS_").from_iter(vars).map_err(|e| {
            // Only text fields are read, so this is not expected; the message of envy may
            // quote a value, so it is not passed on (it could be a secret).
            let what = match e {
                envy::Error::MissingValue(field) => format!("missing NATS_{field}"),
                envy::Error::Custom(_) => "environment could not be read".to_string(),
            };
            Error::with_detail(ConfigErrorKind::InvalidValue, what)
        })?;
        let config = Config::from_raw(raw)?;
        config.validate()?;
        Ok(config)
    }

    fn from_raw(raw: RawVars) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        if let Some(v) = non_empty(raw.url) {
            config.nats_url = v.trim().to_string();
        }
        if let Some(v) = non_empty(raw.client_id) {
            config.client_id = v.trim().to_string();
        }
        config.queue_group = non_empty(raw.queue_group).map(|v| v.trim().to_string());
        config.wildcard_subject = non_empty(raw.wildcard_subject).map(|v| v.trim().to_string());
        if let Some(v) = non_empty(raw.max_reconnects) {
            config.max_reconnects = parse_int("NATS_MAX_RECONNECTS", &v)?;
        }
        if let Some(v) = non_empty(raw.reconnect_wait) {
            config.reconnect_wait = parse_seconds("NATS_RECONNECT_WAIT", &v)?;
        }
        if let Some(v) = non_empty(raw.request_timeout) {
            config.request_timeout = parse_seconds("NATS_REQUEST_TIMEOUT", &v)?;
        }
        config.durable_name = non_empty(raw.durable_name).map(|v| v.trim().to_string());
        if let Some(v) = non_empty(raw.js_stream) {
            config.js_stream = v.trim().to_string();
        }
        if let Some(v) = non_empty(raw.js_subject_prefix) {
            config.js_subject_prefix = v.trim().to_string();
        }
        if let Some(v) = non_empty(raw.js_ack_wait) {
            config.js_ack_wait = parse_seconds("NATS_JS_ACK_WAIT", &v)?;
        }
        if let Some(v) = non_empty(raw.js_max_deliver) {
            config.js_max_deliver = parse_int("NATS_JS_MAX_DELIVER", &v)?;
        }
        if let Some(v) = non_empty(raw.js_handler_timeout) {
            config.js_handler_timeout = parse_seconds("NATS_JS_HANDLER_TIMEOUT", &v)?;
        }
        if let Some(v) = non_empty(raw.js_replicas) {
            config.js_replicas = parse_int("NATS_JS_REPLICAS", &v)?;
        }
        if let Some(v) = non_empty(raw.js_duplicate_window) {
            config.js_duplicate_window = parse_seconds("NATS_JS_DUPLICATE_WINDOW", &v)?;
        }
        if let Some(v) = non_empty(raw.js_dlq_stream) {
            config.js_dlq_stream = v.trim().to_string();
        }
        if let Some(v) = non_empty(raw.events_timeout) {
            config.events_timeout = parse_seconds("NATS_EVENTS_TIMEOUT", &v)?;
        }
        if let Some(v) = non_empty(raw.ce_mode) {
            config.ce_mode = parse_ce_mode("NATS_CE_MODE", &v)?;
        }
        config.creds_file = non_empty(raw.creds_file).map(|v| PathBuf::from(v.trim()));
        config.nkey_seed_file = non_empty(raw.nkey_seed_file).map(|v| PathBuf::from(v.trim()));
        config.tls_ca = non_empty(raw.tls_ca).map(|v| PathBuf::from(v.trim()));
        config.tls_cert = non_empty(raw.tls_cert).map(|v| PathBuf::from(v.trim()));
        config.tls_key = non_empty(raw.tls_key).map(|v| PathBuf::from(v.trim()));
        if let Some(v) = non_empty(raw.tls_first) {
            config.tls_first = parse_bool("NATS_TLS_FIRST", &v)?;
        }
        config.user = non_empty(raw.user).map(|v| v.trim().to_string());
        // Secrets are taken as they are (no trimming): spaces may be part of them.
        config.password = raw.password.filter(|v| !v.is_empty()).map(Secret::from);
        config.token = raw.token.filter(|v| !v.is_empty()).map(Secret::from);
        Ok(config)
    }

    /// Checks ranges and consistency: server URLs parse, names and subjects are valid NATS
    /// names, every duration and count is within its documented range (`docs/configuration.md`:
    /// timeouts above zero, `js_ack_wait` and `js_duplicate_window` at most
    /// [`MAX_JS_DURATION`], the window at least [`MIN_DUPLICATE_WINDOW`], `request_timeout` at
    /// most [`MAX_REQUEST_TIMEOUT`], `reconnect_wait` and `events_timeout` at most
    /// [`MAX_CLIENT_DURATION`], `js_replicas` 1..=5, `js_max_deliver` and `max_reconnects` -1 or
    /// 1..=[`MAX_COUNT`]), at most one authentication method is set, a user has a password,
    /// and a client certificate has a key.
    ///
    /// # Errors
    ///
    /// [`ConfigErrorKind::InvalidValue`] naming the variable of a bad value;
    /// [`ConfigErrorKind::Invalid`] naming the variables that contradict each other.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::config::Config;
    /// use ce_messaging::error::ConfigErrorKind;
    ///
    /// let config = Config { js_replicas: 7, ..Default::default() };
    /// let err = config.validate().unwrap_err();
    /// assert_eq!(err.kind(), ConfigErrorKind::InvalidValue);
    /// assert!(err.to_string().contains("NATS_JS_REPLICAS"));
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        let servers = self.servers().map_err(|why| invalid("NATS_URL", why))?;
        if self.client_id.trim().is_empty() {
            return Err(invalid("NATS_CLIENT_ID", "must not be empty"));
        }
        if self
            .client_id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "NATS_CLIENT_ID",
                format!("{:?} must not contain whitespace", self.client_id),
            ));
        }
        let queue_var = if self.queue_group.is_some() {
            "NATS_QUEUE_GROUP"
        } else {
            "NATS_QUEUE_GROUP (defaulted from NATS_CLIENT_ID)"
        };
        check_subject(queue_var, self.queue_group(), false)?;
        if let Some(wildcard) = &self.wildcard_subject {
            check_subject("NATS_WILDCARD_SUBJECT", wildcard, true)?;
        }
        check_count("NATS_MAX_RECONNECTS", self.max_reconnects)?;
        check_duration(
            "NATS_RECONNECT_WAIT",
            self.reconnect_wait,
            Duration::ZERO,
            MAX_CLIENT_DURATION,
        )?;
        must_be_positive("NATS_REQUEST_TIMEOUT", self.request_timeout)?;
        if self.request_timeout > MAX_REQUEST_TIMEOUT {
            return Err(invalid(
                "NATS_REQUEST_TIMEOUT",
                format!("must be at most {} seconds", MAX_REQUEST_TIMEOUT.as_secs()),
            ));
        }
        let durable_var = if self.durable_name.is_some() {
            "NATS_DURABLE_NAME"
        } else {
            "NATS_DURABLE_NAME (defaulted from NATS_CLIENT_ID)"
        };
        check_name(durable_var, self.durable_name())?;
        check_name("NATS_JS_STREAM", &self.js_stream)?;
        check_subject("NATS_JS_SUBJECT_PREFIX", &self.js_subject_prefix, false)?;
        if self.js_subject_prefix.len() > crate::event::MAX_TYPE_LEN {
            return Err(invalid(
                "NATS_JS_SUBJECT_PREFIX",
                format!(
                    "is {} bytes long, at most {} are allowed",
                    self.js_subject_prefix.len(),
                    crate::event::MAX_TYPE_LEN
                ),
            ));
        }
        must_be_positive("NATS_JS_ACK_WAIT", self.js_ack_wait)?;
        check_duration(
            "NATS_JS_ACK_WAIT",
            self.js_ack_wait,
            Duration::ZERO,
            MAX_JS_DURATION,
        )?;
        must_be_positive("NATS_JS_HANDLER_TIMEOUT", self.js_handler_timeout)?;
        check_duration(
            "NATS_JS_HANDLER_TIMEOUT",
            self.js_handler_timeout,
            Duration::ZERO,
            MAX_JS_DURATION,
        )?;
        check_count("NATS_JS_MAX_DELIVER", self.js_max_deliver)?;
        if !(1..=5).contains(&self.js_replicas) {
            return Err(invalid(
                "NATS_JS_REPLICAS",
                format!("{} is out of range 1..=5", self.js_replicas),
            ));
        }
        check_duration(
            "NATS_JS_DUPLICATE_WINDOW",
            self.js_duplicate_window,
            MIN_DUPLICATE_WINDOW,
            MAX_JS_DURATION,
        )?;
        check_name("NATS_JS_DLQ_STREAM", &self.js_dlq_stream)?;
        if self.js_dlq_stream == self.js_stream {
            return Err(Error::with_detail(
                ConfigErrorKind::Invalid,
                "NATS_JS_DLQ_STREAM and NATS_JS_STREAM must name different streams",
            ));
        }
        must_be_positive("NATS_EVENTS_TIMEOUT", self.events_timeout)?;
        check_duration(
            "NATS_EVENTS_TIMEOUT",
            self.events_timeout,
            Duration::ZERO,
            MAX_CLIENT_DURATION,
        )?;
        must_be_positive("ping interval", self.ping_interval)?;

        match (&self.user, &self.password) {
            (Some(_), None) => {
                return Err(Error::with_detail(
                    ConfigErrorKind::Invalid,
                    "NATS_USER is set but NATS_PASSWORD is not",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::with_detail(
                    ConfigErrorKind::Invalid,
                    "NATS_PASSWORD is set but NATS_USER is not",
                ))
            }
            _ => {}
        }
        let methods: Vec<&str> = [
            (servers.auth.is_some(), "user info in NATS_URL"),
            (self.user.is_some(), "NATS_USER/NATS_PASSWORD"),
            (self.token.is_some(), "NATS_TOKEN"),
            (self.nkey_seed_file.is_some(), "NATS_NKEY_SEED_FILE"),
            (self.creds_file.is_some(), "NATS_CREDS_FILE"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        if methods.len() > 1 {
            return Err(Error::with_detail(
                ConfigErrorKind::Invalid,
                format!(
                    "more than one authentication method is set ({}); choose one",
                    methods.join(", ")
                ),
            ));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(Error::with_detail(
                    ConfigErrorKind::Invalid,
                    "NATS_TLS_CERT is set but NATS_TLS_KEY is not",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::with_detail(
                    ConfigErrorKind::Invalid,
                    "NATS_TLS_KEY is set but NATS_TLS_CERT is not",
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// The queue group of query listeners: `queue_group`, else the client id.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::config::Config;
    /// let config = Config { client_id: "svc".into(), ..Default::default() };
    /// assert_eq!(config.queue_group(), "svc");
    /// let config = Config { queue_group: Some("workers".into()), ..config };
    /// assert_eq!(config.queue_group(), "workers");
    /// ```
    pub fn queue_group(&self) -> &str {
        self.queue_group.as_deref().unwrap_or(&self.client_id)
    }

    /// The durable consumer name of event listeners: `durable_name`, else the client id.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::config::Config;
    /// let config = Config { client_id: "svc".into(), ..Default::default() };
    /// assert_eq!(config.durable_name(), "svc");
    /// let config = Config { durable_name: Some("billing".into()), ..config };
    /// assert_eq!(config.durable_name(), "billing");
    /// ```
    pub fn durable_name(&self) -> &str {
        self.durable_name.as_deref().unwrap_or(&self.client_id)
    }

    /// The subject an event of `event_type` is published on: `<js_subject_prefix>.<type>`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::config::Config;
    /// assert_eq!(
    ///     Config::default().events_subject("org.example.order.created"),
    ///     "events.org.example.order.created"
    /// );
    /// ```
    pub fn events_subject(&self, event_type: &str) -> String {
        format!("{}.{}", self.js_subject_prefix, event_type)
    }

    /// The subject dead letters of this service go to: `deadletter.<stream>.<durable>`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::config::Config;
    /// let config = Config { durable_name: Some("billing".into()), ..Default::default() };
    /// assert_eq!(config.dead_letter_subject(), "deadletter.CLOUDEVENTS.billing");
    /// ```
    pub fn dead_letter_subject(&self) -> String {
        format!("deadletter.{}.{}", self.js_stream, self.durable_name())
    }

    /// The server addresses of `nats_url` without their user info (which
    /// [`Config::connect_options`] turns into credentials), for a backend that connects with
    /// options of its own (e.g. its own event callback).
    pub(crate) fn server_addrs(&self) -> Result<Vec<async_nats::ServerAddr>, ConnectError> {
        self.servers().map(|servers| servers.addrs).map_err(|why| {
            Error::with_detail(ConnectErrorKind::InvalidConfig, format!("NATS_URL: {why}"))
        })
    }

    /// The server addresses of `nats_url` (comma-separated), with their user info taken out
    /// (async-nats would ignore it, and would print it in its debug logs) and returned as
    /// [`UrlAuth`]. The error text never contains user info.
    fn servers(&self) -> Result<Servers, String> {
        let mut addrs = Vec::new();
        let mut auth: Option<UrlAuth> = None;
        for part in self.nats_url.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!(
                    "{:?} has an empty server address",
                    redact_url(&self.nats_url)
                ));
            }
            let not_valid = || format!("{:?} is not a valid server URL", redact_url(part));
            let text = if part.contains("://") {
                part.to_string()
            } else {
                format!("nats://{part}")
            };
            let mut url = url::Url::parse(&text).map_err(|_| not_valid())?;
            if url.host_str().is_none_or(str::is_empty) {
                return Err(not_valid());
            }
            let this = match (url.username(), url.password()) {
                ("", None) => None,
                (user, Some(password)) => Some(UrlAuth::UserPassword(
                    percent_decode(user).ok_or_else(not_valid)?,
                    Secret(percent_decode(password).ok_or_else(not_valid)?),
                )),
                (token, None) => Some(UrlAuth::Token(Secret(
                    percent_decode(token).ok_or_else(not_valid)?,
                ))),
            };
            if let Some(this) = this {
                match &auth {
                    Some(seen) if *seen != this => {
                        return Err(format!(
                            "{:?}: the servers carry different credentials",
                            redact_url(&self.nats_url)
                        ))
                    }
                    _ => auth = Some(this),
                }
                url.set_username("").map_err(|_| not_valid())?;
                url.set_password(None).map_err(|_| not_valid())?;
            }
            let addr = async_nats::ServerAddr::from_url(url).map_err(|_| not_valid())?;
            addrs.push(addr);
        }
        Ok(Servers { addrs, auth })
    }

    /// The async-nats connection options for this configuration: client name, ping interval,
    /// reconnect policy (`max_reconnects`, `reconnect_wait`), request timeout, authentication
    /// (user/password, token, NKey seed file, `.creds` file) and TLS (CA, client certificate,
    /// TLS first). Files are read here, so a missing file is reported before connecting.
    ///
    /// Retry on the initial connect stays off: a wrong credential or unreachable server fails
    /// [`Config::connect`] at once instead of retrying silently.
    ///
    /// # Errors
    ///
    /// [`ConnectErrorKind::InvalidConfig`] when the configuration does not validate,
    /// [`ConnectErrorKind::Credentials`] when a credentials or seed file cannot be read or is
    /// malformed, [`ConnectErrorKind::Tls`] when a TLS file cannot be read.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::config::Config;
    /// let options = Config::default().connect_options()?;
    /// # drop(options);
    /// # Ok::<(), ce_messaging::error::ConnectError>(())
    /// ```
    pub fn connect_options(&self) -> Result<async_nats::ConnectOptions, ConnectError> {
        self.validate()
            .map_err(|e| Error::with_source(ConnectErrorKind::InvalidConfig, e))?;
        let reconnect_wait = self.reconnect_wait;
        let mut options = async_nats::ConnectOptions::new()
            .name(&self.client_id)
            .ping_interval(self.ping_interval)
            .request_timeout(Some(self.request_timeout.min(MAX_REQUEST_TIMEOUT)))
            .max_reconnects(usize::try_from(self.max_reconnects).ok())
            .reconnect_delay_callback(move |attempts| {
                // The first attempt after losing the connection goes at once; later ones wait.
                if attempts <= 1 {
                    Duration::ZERO
                } else {
                    reconnect_wait
                }
            });

        let servers = self.servers().map_err(|why| {
            Error::with_detail(ConnectErrorKind::InvalidConfig, format!("NATS_URL: {why}"))
        })?;
        match servers.auth {
            Some(UrlAuth::UserPassword(user, password)) => {
                options = options.user_and_password(user, password.0);
            }
            Some(UrlAuth::Token(token)) => options = options.token(token.0),
            None => {}
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.expose().to_string());
        }
        if let Some(token) = &self.token {
            options = options.token(token.expose().to_string());
        }
        if let Some(path) = &self.nkey_seed_file {
            let seed = read_secret_file("NATS_NKEY_SEED_FILE", path)?;
            let seed = seed.trim().to_string();
            // Checked here so that a malformed file is a configuration error, not a refused
            // connection; the nkeys error is dropped as it may quote the seed.
            if nkeys::KeyPair::from_seed(&seed).is_err() {
                return Err(Error::with_detail(
                    ConnectErrorKind::Credentials,
                    format!(
                        "NATS_NKEY_SEED_FILE: {} does not hold a valid NKey seed",
                        path.display()
                    ),
                ));
            }
            options = options.nkey(seed);
        }
        if let Some(path) = &self.creds_file {
            let creds = read_secret_file("NATS_CREDS_FILE", path)?;
            options = options.credentials(&creds).map_err(|_| {
                // The io error of async-nats may quote the file; keep only the variable name.
                Error::with_detail(
                    ConnectErrorKind::Credentials,
                    format!(
                        "NATS_CREDS_FILE: {} is not a valid credentials file",
                        path.display()
                    ),
                )
            })?;
        }

        if let Some(ca) = &self.tls_ca {
            check_readable("NATS_TLS_CA", ca)?;
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            check_readable("NATS_TLS_CERT", cert)?;
            check_readable("NATS_TLS_KEY", key)?;
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        if self.tls_first {
            options = options.tls_first();
        }
        let client = self.client_id.clone();
        let servers = redact_url(&self.nats_url);
        options = options.event_callback(move |event| {
            let (client, servers) = (client.clone(), servers.clone());
            async move { log_connection_event(&client, &servers, event) }
        });
        Ok(options)
    }

    /// Connects to the servers of `nats_url` with [`Config::connect_options`]. Fails at once
    /// (no silent retry loop) when no server can be reached or the credentials are refused.
    ///
    /// # Errors
    ///
    /// [`ConnectErrorKind::Authorization`] when the server refuses the credentials,
    /// [`ConnectErrorKind::Io`] when no server can be reached, [`ConnectErrorKind::Tls`] when
    /// the TLS handshake fails, [`ConnectErrorKind::TimedOut`], and the errors of
    /// [`Config::connect_options`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use ce_messaging::config::Config;
    /// let client = Config::from_env()?.connect().await?;
    /// client.publish("greetings", "hello".into()).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(&self) -> Result<async_nats::Client, ConnectError> {
        let options = self.connect_options()?;
        let servers = self.servers().map_err(|why| {
            Error::with_detail(ConnectErrorKind::InvalidConfig, format!("NATS_URL: {why}"))
        })?;
        let redacted = redact_url(&self.nats_url);
        options
            .connect(servers.addrs)
            .await
            .map_err(|e| connect_error(e, &redacted))
    }
}

/// The servers of `NATS_URL` without user info, and the credentials the user info held.
struct Servers {
    addrs: Vec<async_nats::ServerAddr>,
    auth: Option<UrlAuth>,
}

/// Credentials given as URL user info: `user:password@host` or `token@host`.
#[derive(PartialEq, Eq)]
enum UrlAuth {
    UserPassword(String, Secret),
    Token(Secret),
}

/// Decodes `%XX` escapes of URL user info; `None` if the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                // Both digits are < 16, so the byte fits.
                out.push(((hex(h)? << 4) | hex(l)?) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Maps an async-nats connect error to this crate's kinds. The detail carries the redacted
/// server list; the source is the async-nats error, whose text carries no credentials.
fn connect_error(err: async_nats::ConnectError, servers: &str) -> ConnectError {
    use async_nats::ConnectErrorKind as Nats;
    let kind = match err.kind() {
        Nats::AuthorizationViolation | Nats::Authentication => ConnectErrorKind::Authorization,
        Nats::Tls => ConnectErrorKind::Tls,
        Nats::TimedOut => ConnectErrorKind::TimedOut,
        Nats::ServerParse => ConnectErrorKind::InvalidConfig,
        // async-nats reports a failed TLS handshake (unknown issuer, a client certificate
        // the server wants) as an IO error wrapping the rustls error.
        _ if caused_by_tls(&err) => ConnectErrorKind::Tls,
        _ => ConnectErrorKind::Io,
    };
    Error::with_detail(kind, format!("servers {servers}")).source(err)
}

/// Logs a connection event of async-nats with the client id and the redacted server list.
/// A refused credential while reconnecting is an error: the client keeps trying every
/// `reconnect_wait` until `max_reconnects`, and this says why it does not come back.
fn log_connection_event(client: &str, servers: &str, event: async_nats::Event) {
    use async_nats::{Event, ServerError};
    match event {
        Event::Connected => tracing::info!(client, servers, "connected to NATS"),
        Event::Disconnected => tracing::warn!(client, servers, "disconnected from NATS"),
        Event::ServerError(ServerError::AuthorizationViolation) => tracing::error!(
            client,
            servers,
            "NATS refused the credentials (authorization violation)"
        ),
        Event::ServerError(error) => tracing::error!(client, servers, %error, "NATS server error"),
        Event::ClientError(error) => tracing::warn!(client, servers, %error, "NATS client error"),
        Event::LameDuckMode => {
            tracing::warn!(client, servers, "NATS server entered lame duck mode")
        }
        Event::SlowConsumer(sid) => tracing::warn!(client, sid, "slow consumer"),
        other => tracing::debug!(client, servers, event = %other, "NATS connection event"),
    }
}

/// True if a rustls error is somewhere in the source chain (possibly inside an io error).
fn caused_by_tls(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(current) = next {
        if current.is::<async_nats::rustls::Error>() {
            return true;
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
            {
                return true;
            }
        }
        next = current.source();
    }
    false
}

/// Reads a file holding secrets; the error names the variable and path, never the content.
fn read_secret_file(var: &str, path: &Path) -> Result<String, ConnectError> {
    std::fs::read_to_string(path).map_err(|e| {
        Error::with_detail(
            ConnectErrorKind::Credentials,
            format!("{var}: cannot read {}", path.display()),
        )
        .source(e)
    })
}

/// Checks that a TLS file can be opened, naming the variable when it cannot.
fn check_readable(var: &str, path: &Path) -> Result<(), ConnectError> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        Error::with_detail(
            ConnectErrorKind::Tls,
            format!("{var}: cannot read {}", path.display()),
        )
        .source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars(pairs))
    }

    /// Asserts an invalid-value error that names `var`.
    fn assert_names(err: ConfigError, kind: ConfigErrorKind, var: &str) {
        assert_eq!(err.kind(), kind, "{err}");
        assert!(
            err.to_string().contains(var),
            "error should name {var}: {err}"
        );
    }

    #[test]
    fn defaults_match_the_contract() {
        let config = from(&[]).unwrap();
        assert_eq!(config.nats_url, "nats://127.0.0.1:4222");
        assert!(config.client_id.starts_with("ce-messaging-"));
        assert_eq!(config.client_id.len(), "ce-messaging-".len() + 20);
        assert_eq!(config.queue_group, None);
        assert_eq!(config.queue_group(), config.client_id);
        assert_eq!(config.durable_name(), config.client_id);
        assert_eq!(config.wildcard_subject, None);
        assert_eq!(config.max_reconnects, -1);
        assert_eq!(config.reconnect_wait, Duration::from_secs(2));
        assert_eq!(config.request_timeout, Duration::from_secs(10));
        assert_eq!(config.js_stream, "CLOUDEVENTS");
        assert_eq!(config.js_subject_prefix, "events");
        assert_eq!(config.js_ack_wait, Duration::from_secs(30));
        assert_eq!(config.js_max_deliver, 5);
        assert_eq!(config.js_handler_timeout, Duration::from_secs(300));
        assert_eq!(config.js_replicas, 1);
        assert_eq!(config.js_duplicate_window, Duration::from_secs(120));
        assert_eq!(config.js_dlq_stream, "DEADLETTER");
        assert_eq!(config.events_timeout, Duration::from_secs(30));
        assert_eq!(config.ce_mode, ContentMode::Structured);
        assert!(!config.tls_first);
        assert!(config.creds_file.is_none() && config.nkey_seed_file.is_none());
        assert!(config.tls_ca.is_none() && config.tls_cert.is_none() && config.tls_key.is_none());
        assert!(config.user.is_none() && config.password.is_none() && config.token.is_none());
        assert_ne!(
            Config::default().client_id,
            Config::default().client_id,
            "each default gets its own client id"
        );
    }

    #[test]
    fn every_variable_is_read() {
        let config = from(&[
            ("NATS_URL", "nats://n1:4222,nats://n2:4222"),
            ("NATS_CLIENT_ID", "orders-1"),
            ("NATS_QUEUE_GROUP", "orders"),
            ("NATS_WILDCARD_SUBJECT", "orders.>"),
            ("NATS_MAX_RECONNECTS", "10"),
            ("NATS_RECONNECT_WAIT", "0.5"),
            ("NATS_REQUEST_TIMEOUT", "3"),
            ("NATS_DURABLE_NAME", "orders-durable"),
            ("NATS_JS_STREAM", "EVTS"),
            ("NATS_JS_SUBJECT_PREFIX", "ev.x"),
            ("NATS_JS_ACK_WAIT", "12.25"),
            ("NATS_JS_MAX_DELIVER", "-1"),
            ("NATS_JS_REPLICAS", "3"),
            ("NATS_JS_DUPLICATE_WINDOW", "60"),
            ("NATS_JS_DLQ_STREAM", "DLQ"),
            ("NATS_EVENTS_TIMEOUT", "7"),
            ("NATS_CE_MODE", "Binary"),
            ("NATS_TLS_CA", "/etc/ca.pem"),
            ("NATS_TLS_CERT", "/etc/cert.pem"),
            ("NATS_TLS_KEY", "/etc/key.pem"),
            ("NATS_TLS_FIRST", "true"),
            ("NATS_USER", "alice"),
            ("NATS_PASSWORD", "pa ss"),
            ("HOME", "/ignored"),
        ])
        .unwrap();
        assert_eq!(config.nats_url, "nats://n1:4222,nats://n2:4222");
        assert_eq!(config.client_id, "orders-1");
        assert_eq!(config.queue_group(), "orders");
        assert_eq!(config.wildcard_subject.as_deref(), Some("orders.>"));
        assert_eq!(config.max_reconnects, 10);
        assert_eq!(config.reconnect_wait, Duration::from_millis(500));
        assert_eq!(config.request_timeout, Duration::from_secs(3));
        assert_eq!(config.durable_name(), "orders-durable");
        assert_eq!(config.js_stream, "EVTS");
        assert_eq!(config.js_subject_prefix, "ev.x");
        assert_eq!(config.js_ack_wait, Duration::from_millis(12_250));
        assert_eq!(config.js_max_deliver, -1);
        assert_eq!(config.js_replicas, 3);
        assert_eq!(config.js_duplicate_window, Duration::from_secs(60));
        assert_eq!(config.js_dlq_stream, "DLQ");
        assert_eq!(config.events_timeout, Duration::from_secs(7));
        assert_eq!(config.ce_mode, ContentMode::Binary);
        assert_eq!(config.tls_ca.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(config.tls_cert.as_deref(), Some(Path::new("/etc/cert.pem")));
        assert_eq!(config.tls_key.as_deref(), Some(Path::new("/etc/key.pem")));
        assert!(config.tls_first);
        assert_eq!(config.user.as_deref(), Some("alice"));
        assert_eq!(config.password.as_ref().map(Secret::expose), Some("pa ss"));
        assert_eq!(config.events_subject("order.created"), "ev.x.order.created");
        assert_eq!(
            config.dead_letter_subject(),
            "deadletter.EVTS.orders-durable"
        );

        let config = from(&[
            ("NATS_TOKEN", "t0k"),
            ("NATS_CREDS_FILE", ""),
            ("NATS_NKEY_SEED_FILE", ""),
        ])
        .unwrap();
        assert_eq!(config.token.as_ref().map(Secret::expose), Some("t0k"));
        let config = from(&[("NATS_CREDS_FILE", "/x/user.creds")]).unwrap();
        assert_eq!(
            config.creds_file.as_deref(),
            Some(Path::new("/x/user.creds"))
        );
        let config = from(&[("NATS_NKEY_SEED_FILE", "/x/seed.nk")]).unwrap();
        assert_eq!(
            config.nkey_seed_file.as_deref(),
            Some(Path::new("/x/seed.nk"))
        );
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let config = from(&[
            ("NATS_URL", ""),
            ("NATS_JS_REPLICAS", "  "),
            ("NATS_REQUEST_TIMEOUT", ""),
            ("NATS_QUEUE_GROUP", ""),
        ])
        .unwrap();
        assert_eq!(config.nats_url, DEFAULT_NATS_URL);
        assert_eq!(config.js_replicas, 1);
        assert_eq!(config.request_timeout, Duration::from_secs(10));
        assert_eq!(config.queue_group, None);
    }

    #[test]
    fn values_that_do_not_parse_name_their_variable() {
        let cases = [
            ("NATS_MAX_RECONNECTS", "many"),
            ("NATS_RECONNECT_WAIT", "2s"),
            ("NATS_REQUEST_TIMEOUT", "ten"),
            ("NATS_JS_ACK_WAIT", "-1"),
            ("NATS_JS_MAX_DELIVER", "5.5"),
            ("NATS_JS_REPLICAS", "-3"),
            ("NATS_JS_DUPLICATE_WINDOW", "NaN"),
            ("NATS_EVENTS_TIMEOUT", "inf"),
            ("NATS_CE_MODE", "json"),
            ("NATS_TLS_FIRST", "maybe"),
            ("NATS_RECONNECT_WAIT", "1e300"),
        ];
        for (var, value) in cases {
            let err = from(&[(var, value)]).expect_err(var);
            assert_names(err, ConfigErrorKind::InvalidValue, var);
        }
    }

    #[test]
    fn out_of_range_values_name_their_variable() {
        let cases = [
            ("NATS_JS_REPLICAS", "0"),
            ("NATS_JS_REPLICAS", "6"),
            ("NATS_JS_MAX_DELIVER", "0"),
            ("NATS_JS_HANDLER_TIMEOUT", "0"),
            ("NATS_JS_MAX_DELIVER", "-2"),
            ("NATS_MAX_RECONNECTS", "0"),
            ("NATS_MAX_RECONNECTS", "-5"),
            ("NATS_REQUEST_TIMEOUT", "0"),
            ("NATS_JS_ACK_WAIT", "0"),
            ("NATS_JS_DUPLICATE_WINDOW", "0.0"),
            ("NATS_EVENTS_TIMEOUT", "0"),
            ("NATS_JS_STREAM", "a.b"),
            ("NATS_JS_DLQ_STREAM", "dl q"),
            ("NATS_DURABLE_NAME", "x>y"),
            ("NATS_JS_SUBJECT_PREFIX", "events.*"),
            ("NATS_JS_SUBJECT_PREFIX", "events..x"),
            ("NATS_QUEUE_GROUP", "a b"),
            ("NATS_WILDCARD_SUBJECT", "a.>.b"),
            ("NATS_WILDCARD_SUBJECT", "a.b*"),
            ("NATS_URL", "nats://h:notaport"),
            ("NATS_URL", "nats://h1:4222,,nats://h2:4222"),
            ("NATS_CLIENT_ID", "has space"),
        ];
        for (var, value) in cases {
            let err = from(&[(var, value)]).expect_err(&format!("{var}={value}"));
            assert_names(err, ConfigErrorKind::InvalidValue, var);
        }
    }

    #[test]
    fn a_client_id_unfit_as_durable_name_is_refused_unless_one_is_given() {
        let err = from(&[("NATS_CLIENT_ID", "svc.orders")]).unwrap_err();
        assert_names(err, ConfigErrorKind::InvalidValue, "NATS_DURABLE_NAME");
        let config = from(&[
            ("NATS_CLIENT_ID", "svc.orders"),
            ("NATS_DURABLE_NAME", "svc-orders"),
        ])
        .unwrap();
        assert_eq!(config.queue_group(), "svc.orders");
        assert_eq!(config.durable_name(), "svc-orders");
    }

    #[test]
    fn contradicting_settings_name_the_variables() {
        let cases: [(&[(&str, &str)], &str); 6] = [
            (&[("NATS_USER", "alice")], "NATS_PASSWORD"),
            (&[("NATS_PASSWORD", "pw")], "NATS_USER"),
            (&[("NATS_TLS_CERT", "/c.pem")], "NATS_TLS_KEY"),
            (&[("NATS_TLS_KEY", "/k.pem")], "NATS_TLS_CERT"),
            (
                &[("NATS_TOKEN", "t"), ("NATS_CREDS_FILE", "/u.creds")],
                "NATS_CREDS_FILE",
            ),
            (
                &[("NATS_JS_DLQ_STREAM", "CLOUDEVENTS")],
                "NATS_JS_DLQ_STREAM",
            ),
        ];
        for (pairs, var) in cases {
            let err = from(pairs).expect_err(var);
            assert_names(err, ConfigErrorKind::Invalid, var);
        }
    }

    #[test]
    fn durations_and_counts_beyond_their_documented_range_name_their_variable() {
        let cases = [
            // Seconds that wrapped as nanoseconds on the server (1e12 s -> 3,875,820,019 s).
            ("NATS_JS_ACK_WAIT", "1e12"),
            ("NATS_JS_ACK_WAIT", "1e10"),
            ("NATS_JS_ACK_WAIT", "86400.5"),
            ("NATS_JS_DUPLICATE_WINDOW", "1e12"),
            ("NATS_JS_DUPLICATE_WINDOW", "1e10"),
            ("NATS_JS_DUPLICATE_WINDOW", "86401"),
            ("NATS_JS_DUPLICATE_WINDOW", "0.5"),
            ("NATS_JS_MAX_DELIVER", "9223372036854775807"),
            ("NATS_JS_MAX_DELIVER", "1000001"),
            ("NATS_JS_MAX_DELIVER", "9223372036854775808"),
            ("NATS_MAX_RECONNECTS", "1000001"),
            ("NATS_RECONNECT_WAIT", "3601"),
            ("NATS_RECONNECT_WAIT", "-0.5"),
            ("NATS_REQUEST_TIMEOUT", "301"),
            ("NATS_REQUEST_TIMEOUT", "1e12"),
            ("NATS_EVENTS_TIMEOUT", "3601"),
            ("NATS_EVENTS_TIMEOUT", "1e-12"),
            ("NATS_JS_REPLICAS", "18446744073709551616"),
            ("NATS_JS_SUBJECT_PREFIX", &"p".repeat(256)),
        ];
        for (var, value) in cases {
            let err = from(&[(var, value)]).expect_err(&format!("{var}={value}"));
            assert_names(err, ConfigErrorKind::InvalidValue, var);
        }
    }

    #[test]
    fn the_bounds_themselves_are_accepted() {
        let config = from(&[
            ("NATS_JS_ACK_WAIT", "86400"),
            ("NATS_JS_DUPLICATE_WINDOW", "86400"),
            ("NATS_JS_MAX_DELIVER", "1000000"),
            ("NATS_MAX_RECONNECTS", "1000000"),
            ("NATS_RECONNECT_WAIT", "3600"),
            ("NATS_REQUEST_TIMEOUT", "300"),
            ("NATS_EVENTS_TIMEOUT", "3600"),
            ("NATS_JS_REPLICAS", "5"),
            ("NATS_JS_SUBJECT_PREFIX", &"p".repeat(255)),
        ])
        .unwrap();
        assert_eq!(config.js_ack_wait, Duration::from_secs(86_400));
        assert_eq!(config.js_duplicate_window, Duration::from_secs(86_400));
        assert_eq!(config.js_max_deliver, 1_000_000);
        assert_eq!(config.max_reconnects, 1_000_000);
        assert_eq!(config.reconnect_wait, Duration::from_secs(3600));
        assert_eq!(config.request_timeout, MAX_REQUEST_TIMEOUT);
        assert_eq!(config.events_timeout, Duration::from_secs(3600));
        let config = from(&[
            ("NATS_JS_ACK_WAIT", "0.001"),
            ("NATS_JS_DUPLICATE_WINDOW", "1"),
            ("NATS_RECONNECT_WAIT", "0"),
            ("NATS_REQUEST_TIMEOUT", "0.001"),
            ("NATS_EVENTS_TIMEOUT", "0.001"),
        ])
        .unwrap();
        assert_eq!(config.js_ack_wait, Duration::from_millis(1));
        assert_eq!(config.reconnect_wait, Duration::ZERO);
    }

    #[test]
    fn a_config_built_in_code_is_held_to_the_same_bounds() {
        let cases: [(&str, Config); 5] = [
            (
                "NATS_JS_ACK_WAIT",
                Config {
                    js_ack_wait: Duration::from_secs(1_000_000_000_000),
                    ..Default::default()
                },
            ),
            (
                "NATS_JS_DUPLICATE_WINDOW",
                Config {
                    js_duplicate_window: Duration::MAX,
                    ..Default::default()
                },
            ),
            (
                "NATS_JS_MAX_DELIVER",
                Config {
                    js_max_deliver: i64::MAX,
                    ..Default::default()
                },
            ),
            (
                "NATS_EVENTS_TIMEOUT",
                Config {
                    events_timeout: Duration::from_secs(86_400),
                    ..Default::default()
                },
            ),
            (
                "NATS_RECONNECT_WAIT",
                Config {
                    reconnect_wait: Duration::from_secs(86_400),
                    ..Default::default()
                },
            ),
        ];
        for (var, config) in cases {
            assert_names(
                config.validate().expect_err(var),
                ConfigErrorKind::InvalidValue,
                var,
            );
        }
    }

    #[test]
    fn request_timeout_above_the_maximum_is_an_error() {
        assert_names(
            from(&[("NATS_REQUEST_TIMEOUT", "301")]).unwrap_err(),
            ConfigErrorKind::InvalidValue,
            "NATS_REQUEST_TIMEOUT",
        );
        let config = from(&[("NATS_REQUEST_TIMEOUT", "299.5")]).unwrap();
        assert_eq!(config.request_timeout, Duration::from_millis(299_500));
        let config = Config {
            request_timeout: Duration::from_secs(301),
            ..Default::default()
        };
        assert_names(
            config.validate().unwrap_err(),
            ConfigErrorKind::InvalidValue,
            "NATS_REQUEST_TIMEOUT",
        );
    }

    #[test]
    fn debug_and_errors_never_show_secrets() {
        let config = from(&[("NATS_USER", "alice"), ("NATS_PASSWORD", "hunter2")]).unwrap();
        let debug = format!("{config:?} {config:#?}");
        assert!(!debug.contains("hunter2"), "password leaked: {debug}");
        assert!(debug.contains("alice"), "the user name is not a secret");

        // Debug of a config is built by hand, so it is checked even for combinations that
        // do not validate.
        let config = Config {
            nats_url: "nats://bob:urlpass@h1:4222,nats://tok3n@h2:4222".to_string(),
            ..Default::default()
        };
        let debug = format!("{config:?} {config:#?}");
        for secret in ["urlpass", "tok3n", "bob:"] {
            assert!(!debug.contains(secret), "{secret} leaked: {debug}");
        }
        assert!(debug.contains("nats://<redacted>@h1:4222,nats://<redacted>@h2:4222"));
        let err = config.validate().unwrap_err();
        assert!(!format!("{err} {err:?}").contains("urlpass"), "{err:?}");

        let config = Config {
            token: Some(Secret::new("sekrit-token")),
            ..Default::default()
        };
        assert!(!format!("{config:?}").contains("sekrit-token"));
        let options = config.connect_options().unwrap();
        assert!(!format!("{options:?}").contains("sekrit-token"));

        // A bad URL with user info: the error shows the URL without it.
        let err = from(&[("NATS_URL", "nats://bob:urlpass@h1:notaport")]).unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(
            text.contains("NATS_URL") && !text.contains("urlpass"),
            "{text}"
        );
    }

    #[test]
    fn redact_url_hides_every_form_of_user_info() {
        assert_eq!(redact_url("nats://u:p@h:1"), "nats://<redacted>@h:1");
        assert_eq!(redact_url("tls://token@h"), "tls://<redacted>@h");
        assert_eq!(redact_url("u:p@h:4222"), "<redacted>@h:4222");
        // Unencoded special characters in the password do not leak the rest.
        assert_eq!(redact_url("nats://u:p/a@ss@h:1"), "nats://<redacted>@h:1");
        assert_eq!(redact_url("nats://h:1"), "nats://h:1");
        assert_eq!(redact_url(""), "");
    }

    #[test]
    fn url_user_info_becomes_credentials_and_leaves_the_addresses() {
        let config = Config {
            nats_url: "nats://al%40ice:p%3Ass@h1:4222, h2:4223".to_string(),
            ..Default::default()
        };
        let servers = config.servers().unwrap();
        assert!(
            servers.auth
                == Some(UrlAuth::UserPassword(
                    "al@ice".to_string(),
                    Secret::new("p:ss")
                ))
        );
        let addrs: Vec<String> = servers
            .addrs
            .iter()
            .map(|a| format!("{a:?} {}", a.as_url_str()))
            .collect();
        assert!(addrs[0].contains("nats://h1:4222"), "{addrs:?}");
        assert!(addrs[1].contains("nats://h2:4223"), "{addrs:?}");
        assert!(!addrs.concat().contains("p%3Ass"), "{addrs:?}");

        let config = Config {
            nats_url: "tls://s3cr3t@h1".to_string(),
            ..Default::default()
        };
        let servers = config.servers().unwrap();
        assert!(servers.auth == Some(UrlAuth::Token(Secret::new("s3cr3t"))));
        assert!(servers.addrs[0].tls_required());
        assert!(!format!("{:?}", servers.addrs).contains("s3cr3t"));
        config.connect_options().unwrap();
    }

    #[test]
    fn url_user_info_must_not_compete_with_other_credentials() {
        let err = from(&[("NATS_URL", "nats://a:b@h1:4222"), ("NATS_TOKEN", "tok")]).unwrap_err();
        assert_names(err, ConfigErrorKind::Invalid, "NATS_URL");
        let err = from(&[("NATS_URL", "nats://a:b@h1:4222,nats://c:d@h2:4222")]).unwrap_err();
        assert!(!err.to_string().contains(":b@") && !err.to_string().contains(":d@"));
        assert_names(err, ConfigErrorKind::InvalidValue, "NATS_URL");
        // The same credentials on every server are fine.
        from(&[("NATS_URL", "nats://a:b@h1:4222,nats://a:b@h2:4222")]).unwrap();
    }

    #[test]
    fn connect_options_refuse_an_invalid_config_and_name_missing_files() {
        let config = Config {
            js_replicas: 0,
            ..Default::default()
        };
        let err = config.connect_options().unwrap_err();
        assert_eq!(err.kind(), ConnectErrorKind::InvalidConfig);
        assert!(format!("{err}").contains("NATS_JS_REPLICAS"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let cases = [
            (
                Config {
                    creds_file: Some(missing.clone()),
                    ..Default::default()
                },
                ConnectErrorKind::Credentials,
                "NATS_CREDS_FILE",
            ),
            (
                Config {
                    nkey_seed_file: Some(missing.clone()),
                    ..Default::default()
                },
                ConnectErrorKind::Credentials,
                "NATS_NKEY_SEED_FILE",
            ),
            (
                Config {
                    tls_ca: Some(missing.clone()),
                    ..Default::default()
                },
                ConnectErrorKind::Tls,
                "NATS_TLS_CA",
            ),
            (
                Config {
                    tls_cert: Some(missing.clone()),
                    tls_key: Some(missing.clone()),
                    ..Default::default()
                },
                ConnectErrorKind::Tls,
                "NATS_TLS_CERT",
            ),
        ];
        for (config, kind, var) in cases {
            let err = config.connect_options().expect_err(var);
            assert_eq!(err.kind(), kind, "{err}");
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn a_malformed_creds_file_is_a_credentials_error_that_does_not_quote_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user.creds");
        std::fs::write(&path, "not a creds file, secret-ish content").unwrap();
        let config = Config {
            creds_file: Some(path),
            ..Default::default()
        };
        let err = config.connect_options().unwrap_err();
        assert_eq!(err.kind(), ConnectErrorKind::Credentials);
        assert!(!format!("{err} {err:?}").contains("secret-ish"), "{err:?}");
    }

    #[test]
    fn an_nkey_seed_file_is_checked_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.nk");
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        std::fs::write(&good, format!("{seed}\n")).unwrap();
        let config = Config {
            nkey_seed_file: Some(good),
            ..Default::default()
        };
        config.connect_options().unwrap();

        let bad = dir.path().join("bad.nk");
        std::fs::write(&bad, "SUAMALFORMEDSEEDTEXT").unwrap();
        let config = Config {
            nkey_seed_file: Some(bad),
            ..Default::default()
        };
        let err = config.connect_options().unwrap_err();
        assert_eq!(err.kind(), ConnectErrorKind::Credentials);
        assert!(err.to_string().contains("NATS_NKEY_SEED_FILE"), "{err}");
        assert!(!format!("{err} {err:?}").contains("MALFORMED"), "{err:?}");
    }

    #[test]
    fn tls_errors_are_recognised_inside_io_errors() {
        let tls = async_nats::rustls::Error::General("handshake".into());
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        assert!(caused_by_tls(&io));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(!caused_by_tls(&plain));
    }

    #[tokio::test]
    async fn connecting_to_a_closed_port_fails_at_once_with_io() {
        // Bind then drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = Config {
            nats_url: format!("nats://user:topsecret@127.0.0.1:{port}"),
            ..Default::default()
        };
        let err = tokio::time::timeout(Duration::from_secs(10), config.connect())
            .await
            .expect("connect must fail, not retry forever")
            .unwrap_err();
        assert_eq!(err.kind(), ConnectErrorKind::Io, "{err}");
        assert!(!format!("{err} {err:?}").contains("topsecret"), "{err:?}");
    }
}
