//! [`NatsQueries`]: the [`QueryConnection`] over core NATS request/reply.
//!
//! The rules of the wire contract live in the shared [`query`](crate::query) layer; this module
//! only moves bytes: `request.rs` sends requests and gathers replies, `listen.rs` subscribes
//! with the queue group and feeds the bounded worker pool, `connection.rs` connects and
//! watches the connection's events (reconnects, slow consumers).
//!
//! # Examples
//!
//! ```no_run
//! use ce_messaging::config::Config;
//! use ce_messaging::cloudevent::new_event;
//! use ce_messaging::nats::NatsQueries;
//! use ce_messaging::query::{handler_fn, QueryConnection, QueryHandlers, QueryListenOptions};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_env()?;
//! let queries = NatsQueries::connect(&config).await?;
//! let handlers = QueryHandlers::new().on("org.example.ping", handler_fn(|_, reply| async move {
//!     reply.reply_data("org.example.pong", &"pong").await?;
//!     Ok(())
//! }));
//! let listener = queries.listen(handlers, QueryListenOptions::default()).await?;
//! let reply = queries.request(new_event("org.example.ping", "demo", &())?).await?;
//! println!("{reply}");
//! listener.stop(std::time::Duration::from_secs(5)).await;
//! queries.close().await;
//! # Ok(()) }
//! ```

mod connection;
mod listen;
mod mux;
mod request;

use crate::codec::ReceivedEvent;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cloudevents::Event;

use crate::codec::ContentMode;
use crate::config::{Config, MAX_REQUEST_TIMEOUT};
use crate::error::{ConnectError, ListenError, RequestError};
use crate::listener::Listener;
use crate::query::{
    QueryConnection, QueryHandlers, QueryListenOptions, ReplyStream, ReplyStreamOptions,
};
use crate::shutdown::Drain;

use connection::ConnectionEvents;

/// A [`QueryConnection`] over core NATS: requests with one reply, reply streams, scatter-gather,
/// and listeners subscribed with the queue group and served by a bounded worker pool.
///
/// Cheap to clone; all clones share one NATS connection. The connection reconnects on its own
/// (async-nats) and listeners' subscriptions are restored after a reconnect. Requests made
/// while the server is unreachable fail within their timeout.
///
/// # Examples
///
/// ```no_run
/// use ce_messaging::config::Config;
/// use ce_messaging::cloudevent::new_event;
/// use ce_messaging::nats::NatsQueries;
/// use ce_messaging::query::QueryConnection;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let queries = NatsQueries::connect(&Config::default()).await?;
/// let request = new_event("cyverse.workspace.get", "demo", &serde_json::json!({"name": "w1"}))?;
/// let reply = queries.request(request).await?;
/// println!("{reply}");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsQueries {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    /// The client id: the `source` of events sent with an empty or `AUTO_POPULATE` source.
    source: String,
    mode: ContentMode,
    default_timeout: Duration,
    queue_group: String,
    wildcard_subject: Option<String>,
    events: Arc<ConnectionEvents>,
    /// Routes the replies of requests and reply streams (instead of async-nats' own request
    /// multiplexer, which keeps an entry per timed-out request).
    mux: mux::Multiplexer,
    /// The ops requested so far: checked, their metric labels built.
    known_ops: crate::query::KnownOps,
}

impl std::fmt::Debug for NatsQueries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsQueries")
            .field("source", &self.inner.source)
            .field("mode", &self.inner.mode)
            .field("default_timeout", &self.inner.default_timeout)
            .field("queue_group", &self.inner.queue_group)
            .field("wildcard_subject", &self.inner.wildcard_subject)
            .field("state", &self.inner.client.connection_state())
            .finish()
    }
}

impl NatsQueries {
    /// Connects to `config.nats_url` with the configured credentials, TLS and reconnect
    /// settings. Connection events are logged; slow-consumer events are also counted (see
    /// [`slow_consumer_events`](Self::slow_consumer_events)).
    ///
    /// # Errors
    ///
    /// A [`ConnectError`] when the configuration is invalid or the server cannot be reached.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), ce_messaging::error::ConnectError> {
    /// let queries = ce_messaging::nats::NatsQueries::connect(&ce_messaging::config::Config::default()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(config: &Config) -> Result<NatsQueries, ConnectError> {
        let options = config.connect_options()?;
        Self::connect_with_options(config, options).await
    }

    /// Like [`connect`](Self::connect) with connect options of the caller's (start from
    /// [`Config::connect_options`] and adjust, e.g. the subscription capacity). The options'
    /// event callback is replaced by this connection's, which logs and counts events.
    ///
    /// # Errors
    ///
    /// A [`ConnectError`] when `config.nats_url` does not parse or the server cannot be
    /// reached.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), ce_messaging::error::ConnectError> {
    /// use ce_messaging::config::Config;
    /// use ce_messaging::nats::NatsQueries;
    /// let config = Config::default();
    /// let options = config.connect_options()?.subscription_capacity(4096);
    /// let queries = NatsQueries::connect_with_options(&config, options).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_with_options(
        config: &Config,
        options: async_nats::ConnectOptions,
    ) -> Result<NatsQueries, ConnectError> {
        let events = Arc::new(ConnectionEvents::default());
        let client = connection::connect(config, options, events.clone()).await?;
        Ok(Self::build(client, config, events))
    }

    /// Wraps a client connected elsewhere (e.g. shared with the JetStream connection); its
    /// connection settings stay as they were. Slow-consumer events of such a client are seen only by the event callback it
    /// was connected with, so [`slow_consumer_events`](Self::slow_consumer_events) stays 0.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use ce_messaging::config::Config;
    /// let config = Config::default();
    /// let client = async_nats::connect(config.nats_url.as_str()).await?;
    /// let queries = ce_messaging::nats::NatsQueries::from_client(client, &config);
    /// # Ok(()) }
    /// ```
    pub fn from_client(client: async_nats::Client, config: &Config) -> NatsQueries {
        Self::build(client, config, Arc::new(ConnectionEvents::default()))
    }

    fn build(
        client: async_nats::Client,
        config: &Config,
        events: Arc<ConnectionEvents>,
    ) -> NatsQueries {
        NatsQueries {
            inner: Arc::new(Inner {
                mux: mux::Multiplexer::new(client.clone()),
                client,
                source: config.client_id.clone(),
                mode: config.ce_mode,
                default_timeout: config.request_timeout.min(MAX_REQUEST_TIMEOUT),
                queue_group: config.queue_group().to_owned(),
                wildcard_subject: config.wildcard_subject.clone(),
                events,
                known_ops: Default::default(),
            }),
        }
    }

    /// How many slow-consumer events the connection reported: each means the client dropped
    /// messages for a subscription whose buffer was full (a listener far behind, or a reply
    /// stream nobody reads). Every event is also logged at `warn`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn demo(queries: ce_messaging::nats::NatsQueries) {
    /// if queries.slow_consumer_events() > 0 {
    ///     eprintln!("messages were dropped; raise workers or buffer");
    /// }
    /// # }
    /// ```
    pub fn slow_consumer_events(&self) -> u64 {
        self.inner.events.slow_consumers()
    }

    /// How many requests and reply streams of this connection wait for replies now. Each
    /// entry goes away when its request gets its reply, times out or is dropped, so this is 0
    /// whenever no request is in flight.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn demo(queries: ce_messaging::nats::NatsQueries) {
    /// assert_eq!(queries.pending_requests(), 0);
    /// # }
    /// ```
    pub fn pending_requests(&self) -> usize {
        self.inner.mux.pending()
    }

    /// Sends a query and waits for its one reply, up to the default timeout
    /// (`NATS_REQUEST_TIMEOUT`): [`QueryConnection::request`] without the trait's boxed
    /// future. Method calls on a `NatsQueries` find this one first; calls through the trait
    /// (`dyn QueryConnection`, generic code) behave the same.
    ///
    /// # Errors
    ///
    /// As [`QueryConnection::request`]: a [`RequestError`] of kind `TimedOut`, `NoResponders`,
    /// `Remote`, `Decode`, `Encode`, `ConnectionClosed` or `Disconnected`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(queries: ce_messaging::nats::NatsQueries) -> Result<(), Box<dyn std::error::Error>> {
    /// use ce_messaging::cloudevent::new_event;
    /// let reply = queries.request(new_event("org.example.ping", "demo", &())?).await?;
    /// # Ok(()) }
    /// ```
    // Returns the inner future itself (no `async fn` layer): each layer would move the whole
    // request future into its own state once more.
    pub fn request(
        &self,
        request: Event,
    ) -> impl Future<Output = Result<ReceivedEvent, RequestError>> + Send + '_ {
        self.request_with_timeout(request, self.inner.default_timeout)
    }

    /// Like [`request`](Self::request) with a timeout of its own (clamped to
    /// [`MAX_REQUEST_TIMEOUT`]): [`QueryConnection::request_with_timeout`] without the trait's
    /// boxed future.
    ///
    /// # Errors
    ///
    /// As [`request`](Self::request).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(queries: ce_messaging::nats::NatsQueries) -> Result<(), Box<dyn std::error::Error>> {
    /// use ce_messaging::cloudevent::new_event;
    /// let ping = new_event("org.example.ping", "demo", &())?;
    /// let reply = queries
    ///     .request_with_timeout(ping, std::time::Duration::from_millis(500))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn request_with_timeout(
        &self,
        request: Event,
        timeout: Duration,
    ) -> impl Future<Output = Result<ReceivedEvent, RequestError>> + Send + '_ {
        crate::query::traced_request(request, &self.inner.known_ops, move |request| {
            request::request(&self.inner, request, timeout)
        })
    }

    /// The underlying async-nats client (e.g. to share the connection).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn demo(queries: ce_messaging::nats::NatsQueries) {
    /// let state = queries.client().connection_state();
    /// # }
    /// ```
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Drains then closes the connection: subscriptions stop taking messages, what was
    /// received is handed over, pending publishes are flushed. Listeners of this connection
    /// stop (their subscriptions end); stop them first to let their handlers finish. Later
    /// requests fail with `ConnectionClosed`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(queries: ce_messaging::nats::NatsQueries) {
    /// queries.close().await;
    /// # }
    /// ```
    pub async fn close(&self) {
        if let Err(err) = self.drain_connection().await {
            tracing::debug!(error = %err, "drain on an already closed connection");
        }
    }

    async fn drain_connection(&self) -> Result<(), async_nats::client::DrainError> {
        self.inner.events.mark_closed();
        self.inner.client.drain().await
    }
}

/// Registered with a [`Shutdown`](crate::shutdown::Shutdown), the connection is drained and
/// closed as the shutdown's last step, as [`NatsQueries::close`] does.
impl Drain for NatsQueries {
    async fn drain(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.drain_connection().await.map_err(Into::into)
    }
}

#[async_trait]
impl QueryConnection for NatsQueries {
    fn default_timeout(&self) -> Duration {
        self.inner.default_timeout
    }

    async fn request(&self, request: Event) -> Result<ReceivedEvent, RequestError> {
        NatsQueries::request(self, request).await
    }

    async fn request_with_timeout(
        &self,
        request: Event,
        timeout: Duration,
    ) -> Result<ReceivedEvent, RequestError> {
        NatsQueries::request_with_timeout(self, request, timeout).await
    }

    async fn request_stream(
        &self,
        request: Event,
        options: ReplyStreamOptions,
    ) -> Result<ReplyStream, RequestError> {
        request::request_stream(&self.inner, request, options).await
    }

    async fn listen(
        &self,
        handlers: QueryHandlers,
        options: QueryListenOptions,
    ) -> Result<Listener, ListenError> {
        listen::listen(&self.inner, handlers, options).await
    }
}
