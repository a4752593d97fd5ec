//! Connecting: the NATS connect options built from a [`Config`] (servers and the credentials in
//! `NATS_URL`'s user info, authentication files, TLS, reconnect policy) and connection errors
//! that never quote a secret.

use std::path::Path;
use std::time::Duration;

use crate::error::{ConnectError, ConnectErrorKind, Error};

use super::*;

impl Config {
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
    pub(super) fn servers(&self) -> Result<Servers, String> {
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
pub(super) struct Servers {
    pub(super) addrs: Vec<async_nats::ServerAddr>,
    pub(super) auth: Option<UrlAuth>,
}

/// Credentials given as URL user info: `user:password@host` or `token@host`.
#[derive(PartialEq, Eq)]
pub(super) enum UrlAuth {
    UserPassword(String, Secret),
    Token(Secret),
}

/// Decodes `%XX` escapes of URL user info; `None` if the result is not UTF-8.
pub(super) fn percent_decode(text: &str) -> Option<String> {
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
pub(super) fn connect_error(err: async_nats::ConnectError, servers: &str) -> ConnectError {
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
pub(super) fn log_connection_event(client: &str, servers: &str, event: async_nats::Event) {
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
pub(super) fn caused_by_tls(err: &(dyn std::error::Error + 'static)) -> bool {
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
pub(super) fn read_secret_file(var: &str, path: &Path) -> Result<String, ConnectError> {
    std::fs::read_to_string(path).map_err(|e| {
        Error::with_detail(
            ConnectErrorKind::Credentials,
            format!("{var}: cannot read {}", path.display()),
        )
        .source(e)
    })
}

/// Checks that a TLS file can be opened, naming the variable when it cannot.
pub(super) fn check_readable(var: &str, path: &Path) -> Result<(), ConnectError> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        Error::with_detail(
            ConnectErrorKind::Tls,
            format!("{var}: cannot read {}", path.display()),
        )
        .source(e)
    })
}
