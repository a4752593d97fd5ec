//! Configuration from environment variables (the `NATS_*` variables of the wire contract) and
//! the NATS connection options built from it: client name, ping interval, reconnect policy,
//! request timeout, authentication and TLS.
//!
//! Durations are given in seconds, as an integer (`"2"`) or a fraction (`"0.5"`). Every
//! duration and count has a range (`docs/configuration.md`; [`Config::validate`]). A value that
//! does not parse or is out of range is a [`ConfigError`](crate::error::ConfigError) whose detail starts with the
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
use std::path::PathBuf;
use std::time::Duration;

use crate::codec::ContentMode;

mod connect;
mod env;
mod start;

pub use start::StartPosition;

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
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// The ping interval used when none is configured (the async-nats default).
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
    /// `NATS_JS_START_POSITION`: where a **new** durable starts reading the events stream
    /// (`all`, `new`, `sequence:<n>`, `time:<RFC 3339>`); an existing durable keeps its
    /// position. `None`: [`StartPosition::All`] (see [`StartPosition`] for why), unless a tool
    /// picks its own default (the quickstart and `cemsg listen` use `new`).
    pub js_start_position: Option<StartPosition>,
    /// `NATS_JS_HANDLER_TIMEOUT`: the longest one event handler run may take (seconds); after
    /// it the run is cancelled and the event is settled as a failure. Default 300 s.
    pub js_handler_timeout: Duration,
    /// `NATS_JS_REPLICAS`: stream replicas, 1 to 5. Default 1.
    pub js_replicas: usize,
    /// `NATS_JS_DUPLICATE_WINDOW`: stream duplicate window (seconds). Default 120 s.
    pub js_duplicate_window: Duration,
    /// `NATS_JS_DLQ_STREAM`: the dead-letter stream. Default `DEADLETTER`.
    pub js_dlq_stream: String,
    /// `NATS_JS_PRIORITY_LEVELS`: event priority levels, `1..=10`; 1 (the default) means
    /// priorities are off. With more, publish reads the event's `priority` extension (0 the
    /// highest) and listeners serve the higher levels first (see
    /// [`priority_subject`](crate::events::priority_subject) and the wire contract).
    pub js_priority_levels: u8,
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
    crate::cloudevent::prefixed_xid("ce-messaging-")
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
            js_start_position: None,
            js_handler_timeout: Duration::from_secs(300),
            js_replicas: 1,
            js_duplicate_window: Duration::from_secs(120),
            js_dlq_stream: "DEADLETTER".to_string(),
            js_priority_levels: 1,
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
            .field("js_start_position", &self.js_start_position)
            .field("js_handler_timeout", &self.js_handler_timeout)
            .field("js_replicas", &self.js_replicas)
            .field("js_duplicate_window", &self.js_duplicate_window)
            .field("js_dlq_stream", &self.js_dlq_stream)
            .field("js_priority_levels", &self.js_priority_levels)
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

/// Names derived from the configuration (the wire contract's subjects and consumer names).
impl Config {
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
}

#[cfg(test)]
mod tests;
