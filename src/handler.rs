//! What handlers share and return: the [`State`] handed to them, the [`HandlerError`] they fail
//! with (which says how the failure is to be answered — query error code — or treated — event:
//! retry with a delay, or dead-letter), and the one handler registry behind
//! [`QueryHandlers`](crate::query::QueryHandlers) and [`EventHandlers`](crate::events::EventHandlers).
//!
//! # How handlers are written
//!
//! As in axum: a handler is a plain async function (or closure) whose arguments say what it
//! needs — the typed request data, the shared [`State`], a reply writer — and whose result is
//! the typed reply. The adapters ([`typed_handler`](crate::query::typed_handler),
//! [`handler_fn`](crate::query::handler_fn), [`typed_event_handler`](crate::events::typed_event_handler),
//! [`event_handler_fn`](crate::events::event_handler_fn)) return named types that can be stored,
//! cloned and debugged. Shared state is given once to the table with `with_state`, not cloned
//! into every closure by hand.
//!
//! # Why the handler traits use `impl Future` and not async-trait
//!
//! The traits users implement ([`QueryHandler`](crate::query::QueryHandler),
//! [`EventHandler`](crate::events::EventHandler), [`Drain`](crate::shutdown::Drain)) declare
//! `fn handle(..) -> impl Future<Output = ..> + Send`, so an implementation is a plain
//! `async fn` with no extra dependency or attribute in the user's crate, and rustdoc shows the
//! signature users write (no `Pin<Box<dyn Future>>`, no `'life0`). Such traits cannot be used as
//! `dyn`, so the tables store each handler behind a private object-safe twin that boxes the
//! future (axum's `ErasedIntoRoute` does the same): one allocation per call, as async-trait
//! cost before. A re-export of `async_trait` was the other choice; it would keep the macro in
//! every user's impl and the boxed signatures in the docs, which is what the issue was about.
//!
//! Any `std::error::Error` converts into a `HandlerError` with `?`, like `anyhow`.
//!
//! # Examples
//!
//! ```
//! use ce_messaging::handler::HandlerError;
//! use std::time::Duration;
//!
//! fn parse(input: &str) -> Result<u32, HandlerError> {
//!     let n: u32 = input.parse()?; // any std error converts: retryable / code 500
//!     if n == 0 {
//!         return Err(HandlerError::permanent("zero is never valid").with_code(400));
//!     }
//!     Ok(n)
//! }
//! assert_eq!(parse("7").unwrap(), 7);
//! assert!(parse("0").unwrap_err().is_permanent());
//! assert_eq!(parse("x").unwrap_err().code(), 500);
//! let later = HandlerError::new("db busy").retry_after(Duration::from_secs(2));
//! assert_eq!(later.retry_delay(), Some(Duration::from_secs(2)));
//! ```

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cloudevents::event::Data;
use cloudevents::Event;
use futures::FutureExt;
use serde::de::DeserializeOwned;

use crate::codec::ReceivedEvent;
use crate::error::BoxError;
use crate::telemetry::LazyMetrics;

/// The shared state of a handler table, handed to every handler that asks for it (axum's
/// `State`): give it once with `with_state` and take it as the first argument.
///
/// Each call gets its own clone, so the state is usually an `Arc` or a type made of `Arc`s
/// (a connection pool, a store behind a lock).
///
/// # Examples
///
/// ```
/// use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
/// use ce_messaging::handler::{HandlerError, State};
/// use ce_messaging::query::{typed_handler, QueryHandlers, TypedRequest};
///
/// #[derive(Clone, Default)]
/// struct Counter(Arc<AtomicU64>);
///
/// let handlers: QueryHandlers = QueryHandlers::default()
///     .on("org.example.count", typed_handler(
///         |State(counter): State<Counter>, req: TypedRequest<u64>| async move {
///             Ok::<_, HandlerError>(counter.0.fetch_add(req.data, Ordering::SeqCst) + req.data)
///         },
///     ))
///     .with_state(Counter::default());
/// assert_eq!(handlers.len(), 1);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State<S>(pub S);

/// The boxed future of an erased handler call.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The one handler table behind `QueryHandlers` (by op) and `EventHandlers` (by event type):
/// each key maps to an erased handler `H` and the lazily registered metric handles `M` of the
/// key, shared by the clones of the table.
pub(crate) struct Registry<H: ?Sized, M> {
    map: HashMap<String, Entry<H, M>>,
}

/// A handler and the metric handles of its key.
pub(crate) struct Entry<H: ?Sized, M> {
    pub(crate) handler: Arc<H>,
    pub(crate) metrics: LazyMetrics<M>,
}

impl<H: ?Sized, M> Clone for Entry<H, M> {
    fn clone(&self) -> Self {
        Entry {
            handler: Arc::clone(&self.handler),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

impl<H: ?Sized, M> Clone for Registry<H, M> {
    fn clone(&self) -> Self {
        Registry {
            map: self.map.clone(),
        }
    }
}

impl<H: ?Sized, M> Default for Registry<H, M> {
    fn default() -> Self {
        Registry {
            map: HashMap::new(),
        }
    }
}

impl<H: ?Sized, M> fmt::Debug for Registry<H, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<&str> = self.keys().collect();
        keys.sort_unstable();
        f.debug_set().entries(keys).finish()
    }
}

impl<H: ?Sized, M> Registry<H, M> {
    /// Adds (or replaces) the handler of `key`, with fresh metric handles.
    pub(crate) fn insert(&mut self, key: String, handler: Arc<H>) {
        self.map.insert(
            key,
            Entry {
                handler,
                metrics: LazyMetrics::default(),
            },
        );
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Entry<H, M>> {
        // A few keys (a listener of one or two types, the usual case): compared as strings,
        // which is cheaper than hashing the key with SipHash.
        if self.map.len() <= 4 {
            return self
                .map
                .iter()
                .find(|(k, _)| k.as_str() == key)
                .map(|(_, entry)| entry);
        }
        self.map.get(key)
    }

    /// The same table with every handler wrapped by `wrap` (binding the state); the metric
    /// handles are kept.
    pub(crate) fn map_handlers<H2: ?Sized>(
        self,
        mut wrap: impl FnMut(Arc<H>) -> Arc<H2>,
    ) -> Registry<H2, M> {
        Registry {
            map: self
                .map
                .into_iter()
                .map(|(key, entry)| {
                    let entry = Entry {
                        handler: wrap(entry.handler),
                        metrics: entry.metrics,
                    };
                    (key, entry)
                })
                .collect(),
        }
    }
}

/// Deserializes the JSON data of a request or event for a typed handler. The error text is
/// sent to remote callers (400 replies) and written to dead letters, so it says what is wrong
/// with the data in JSON terms and never names a Rust type (serde's messages name the target
/// type: `expected struct GetItem`; `data_as` adds its full path). An event without data reads
/// as JSON `null`, so `()` and `Option<T>` accept it (a request for a list often has none).
pub(crate) fn decode_data<T: DeserializeOwned>(event: &ReceivedEvent) -> Result<T, String> {
    let result = match event.wire_json_data() {
        // Still a view of its payload: parsed from there, no `Event` built.
        Some(Some(text)) => serde_json::from_str(text),
        Some(None) => return no_data(),
        None => return decode_event_data(event.event()),
    };
    result.map_err(|e| format!("invalid data: {}", without_type_names(&e.to_string())))
}

/// What [`decode_data`] gives for an event without data: `T` when it can be nothing (`()`,
/// an `Option`), else an error.
fn no_data<T: DeserializeOwned>() -> Result<T, String> {
    T::deserialize(serde_json::Value::Null).map_err(|_| "the event has no data".to_owned())
}

/// [`decode_data`] of a built event.
fn decode_event_data<T: DeserializeOwned>(event: &Event) -> Result<T, String> {
    let result = match event.data() {
        None => return no_data(),
        Some(Data::Json(value)) => T::deserialize(value),
        Some(Data::Binary(bytes)) => match std::str::from_utf8(bytes) {
            Ok(text) => serde_json::from_str(text),
            Err(_) => serde_json::from_slice(bytes),
        },
        Some(Data::String(text)) => serde_json::from_str(text),
    };
    result.map_err(|e| format!("invalid data: {}", without_type_names(&e.to_string())))
}

/// Rewrites serde's `expected struct Name` (and `tuple struct`, `unit struct`, `newtype
/// struct`, `enum`) into the JSON shape expected, dropping the Rust type name.
fn without_type_names(message: &str) -> String {
    const SHAPES: [(&str, &str); 5] = [
        ("expected tuple struct ", "expected an array"),
        ("expected unit struct ", "expected null"),
        ("expected newtype struct ", "expected a value"),
        ("expected struct ", "expected an object"),
        ("expected enum ", "expected one of the allowed values"),
    ];
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    'outer: while !rest.is_empty() {
        for (pattern, shape) in SHAPES {
            if let Some(after) = rest.strip_prefix(pattern) {
                let name_len = after
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                out.push_str(shape);
                rest = &after[name_len..];
                continue 'outer;
            }
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

/// A handler's failure.
///
/// - For a **query** handler it becomes an error reply with [`code`](Self::code) (default 500)
///   and the message as `Nats-Service-Error`.
/// - For an **event** handler it is retryable by default (nak, redelivered after
///   [`retry_delay`](Self::retry_delay) or the listener's back-off); a
///   [`permanent`](Self::permanent) error sends the event to the dead-letter stream at once.
pub struct HandlerError {
    message: String,
    code: u16,
    permanent: bool,
    retry_delay: Option<Duration>,
    source: Option<BoxError>,
}

impl HandlerError {
    /// A retryable failure (code 500 for queries) with a message.
    ///
    /// # Examples
    ///
    /// ```
    /// let err = ce_messaging::handler::HandlerError::new("database unavailable");
    /// assert!(!err.is_permanent());
    /// assert_eq!(err.code(), 500);
    /// ```
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            code: 500,
            permanent: false,
            retry_delay: None,
            source: None,
        }
    }

    /// A permanent failure: an event goes to the dead-letter stream with reason `rejected`.
    ///
    /// # Examples
    ///
    /// ```
    /// let err = ce_messaging::handler::HandlerError::permanent("order id unknown");
    /// assert!(err.is_permanent());
    /// ```
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError {
            permanent: true,
            ..HandlerError::new(message)
        }
    }

    /// A query failure answered with `code` (e.g. 400 bad request, 404 not found).
    ///
    /// # Examples
    ///
    /// ```
    /// let err = ce_messaging::handler::HandlerError::new("no such workspace").with_code(404);
    /// assert_eq!(err.code(), 404);
    /// ```
    #[must_use]
    pub fn with_code(mut self, code: u16) -> Self {
        self.code = code;
        self
    }

    /// Asks for redelivery of the event after `delay` (events only).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let err = ce_messaging::handler::HandlerError::new("busy").retry_after(Duration::from_millis(50));
    /// assert_eq!(err.retry_delay(), Some(Duration::from_millis(50)));
    /// ```
    #[must_use]
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_delay = Some(delay);
        self
    }

    /// The message, used as `Nats-Service-Error` text or dead-letter error.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::handler::HandlerError::new("x").message(), "x");
    /// ```
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The query error code (default 500).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::handler::HandlerError::new("x").code(), 500);
    /// ```
    pub fn code(&self) -> u16 {
        self.code
    }

    /// Whether the failure is permanent (dead-letter instead of retry).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(!ce_messaging::handler::HandlerError::new("x").is_permanent());
    /// ```
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The requested redelivery delay, if any.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ce_messaging::handler::HandlerError::new("x").retry_delay(), None);
    /// ```
    pub fn retry_delay(&self) -> Option<std::time::Duration> {
        self.retry_delay
    }

    /// The underlying error, if the failure came from one.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::handler::HandlerError;
    /// let err: HandlerError = std::io::Error::other("disk").into();
    /// assert!(err.source().is_some());
    /// ```
    pub fn source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(err: E) -> Self {
        HandlerError {
            message: err.to_string(),
            source: Some(Box::new(err)),
            ..HandlerError::new(String::new())
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("message", &self.message)
            .field("code", &self.code)
            .field("permanent", &self.permanent)
            .field("retry_delay", &self.retry_delay)
            .finish()
    }
}

/// Runs a handler future, turning a panic into a [`HandlerError`] (code 500, retryable), so one
/// bad message never kills a worker.
pub(crate) async fn call_handler<F>(fut: F) -> Result<(), HandlerError>
where
    F: Future<Output = Result<(), HandlerError>>,
{
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let text = panic_text(panic.as_ref());
            tracing::error!(panic = %text, "handler panicked");
            Err(HandlerError::new(format!("handler panicked: {text}")))
        }
    }
}

/// Calls a handler's `handle` (which builds its future), turning a panic there — a handler
/// written as a closure that panics before its `async` block — into the same error as a
/// panic inside the future, so that it never unwinds through a worker.
pub(crate) fn start_handler<F>(handle: impl FnOnce() -> F) -> Result<F, HandlerError> {
    std::panic::catch_unwind(AssertUnwindSafe(handle)).map_err(|panic| {
        let text = panic_text(panic.as_ref());
        tracing::error!(panic = %text, "handler panicked");
        HandlerError::new(format!("handler panicked: {text}"))
    })
}

fn panic_text(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn panics_become_retryable_500s() {
        let err = call_handler(async { panic!("kaboom") }).await.unwrap_err();
        assert_eq!(err.code(), 500);
        assert!(!err.is_permanent());
        assert!(err.message().contains("kaboom"));
    }

    #[tokio::test]
    async fn results_pass_through() {
        assert!(call_handler(async { Ok(()) }).await.is_ok());
        let err = call_handler(async { Err(HandlerError::permanent("no")) })
            .await
            .unwrap_err();
        assert!(err.is_permanent());
    }
}

#[cfg(test)]
mod registry_tests {
    use super::*;

    #[test]
    fn type_names_are_replaced_by_the_json_shape_expected() {
        for (serde_text, ours) in [
            (
                "invalid type: integer `1`, expected struct GetItem at line 1 column 1",
                "invalid type: integer `1`, expected an object at line 1 column 1",
            ),
            (
                "invalid type: map, expected tuple struct Pair",
                "invalid type: map, expected an array",
            ),
            (
                "invalid type: string \"x\", expected unit struct Marker",
                "invalid type: string \"x\", expected null",
            ),
            (
                "invalid type: map, expected enum Colour",
                "invalid type: map, expected one of the allowed values",
            ),
            (
                "unknown variant `Red`, expected `Green` or `Blue`",
                "unknown variant `Red`, expected `Green` or `Blue`",
            ),
            ("missing field `name`", "missing field `name`"),
        ] {
            assert_eq!(without_type_names(serde_text), ours);
        }
    }

    #[test]
    fn decode_reports_missing_data_and_wrong_shapes_without_type_paths() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Order {
            id: u64,
        }
        // JSON text data (as `new_event` builds it and a decoded event carries it): serde_json
        // adds where in the text it stopped.
        let event = crate::event::new_event("t", "s", &"text").unwrap();
        let err = decode_data::<Order>(&ReceivedEvent::from(event.clone())).unwrap_err();
        assert_eq!(
            err,
            "invalid data: invalid type: string \"text\", expected an object at line 1 column 6"
        );
        let ok = crate::event::new_event("t", "s", &serde_json::json!({"id": 4})).unwrap();
        assert_eq!(
            decode_data::<Order>(&ReceivedEvent::from(ok.clone()))
                .unwrap()
                .id,
            4
        );
        let mut empty = ok.clone();
        empty.take_data();
        assert_eq!(
            decode_data::<Order>(&ReceivedEvent::from(empty.clone())).unwrap_err(),
            "the event has no data"
        );
        decode_data::<()>(&ReceivedEvent::from(empty.clone())).expect("no data reads as null");
        assert_eq!(
            decode_data::<Option<Order>>(&ReceivedEvent::from(empty.clone()))
                .unwrap()
                .map(|o| o.id),
            None
        );
    }
}
