//! Reading the configuration from the `NATS_*` environment variables (through envy, as text, so
//! every error names its variable) and validating it against the documented ranges.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::codec::ContentMode;
use crate::error::{ConfigError, ConfigErrorKind, Error};

use super::*;

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
    js_start_position: Option<String>,
    js_handler_timeout: Option<String>,
    js_replicas: Option<String>,
    js_duplicate_window: Option<String>,
    js_dlq_stream: Option<String>,
    js_priority_levels: Option<String>,
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
        if let Some(v) = non_empty(raw.js_start_position) {
            config.js_start_position = Some(
                v.parse()
                    .map_err(|why| invalid("NATS_JS_START_POSITION", why))?,
            );
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
        if let Some(v) = non_empty(raw.js_priority_levels) {
            config.js_priority_levels = parse_int("NATS_JS_PRIORITY_LEVELS", &v)?;
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
    /// [`MAX_CLIENT_DURATION`], `js_replicas` 1..=5, `js_priority_levels` 1..=10, `js_max_deliver` and `max_reconnects` -1 or
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
        if let Some(position) = &self.js_start_position {
            position
                .check()
                .map_err(|why| invalid("NATS_JS_START_POSITION", why))?;
        }
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
        let max_levels = crate::events::MAX_PRIORITY_LEVELS;
        if !(1..=max_levels).contains(&self.js_priority_levels) {
            return Err(invalid(
                "NATS_JS_PRIORITY_LEVELS",
                format!(
                    "{} is out of range 1..={max_levels} (1: priorities off)",
                    self.js_priority_levels
                ),
            ));
        }
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
}
