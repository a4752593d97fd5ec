//! What handlers return when they fail: [`HandlerError`], which says how the failure is to be
//! answered (query error code) or treated (event: retry with a delay, or dead-letter).
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
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;

use crate::error::BoxError;

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
