//! The NATS header names fixed by the wire contract, and a helper to put free text into a header
//! value without panicking.
//!
//! # Examples
//!
//! ```
//! use ce_messaging::headers::{text_value, SERVICE_ERROR};
//! let mut headers = ce_messaging::codec::HeaderMap::new();
//! headers.insert(SERVICE_ERROR, text_value("line one\r\nline two"));
//! assert_eq!(headers.get(SERVICE_ERROR).unwrap().as_str(), "line one  line two");
//! ```

use async_nats::HeaderValue;

/// Error text of an error reply (NATS service API convention).
pub const SERVICE_ERROR: &str = "Nats-Service-Error";
/// Error code of an error reply: 400 bad request, 404 unknown op, 500 handler failure.
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";
/// 0-based index of a reply in a reply stream.
pub const REPLY_STREAM_INDEX: &str = "Reply-Stream-Index";
/// Number of replies in a reply stream.
pub const REPLY_STREAM_TOTAL: &str = "Reply-Stream-Total";
/// A request's timeout as the requester had it left when it sent the request, in whole
/// milliseconds; a listener drops a request whose time ran out before a worker took it.
pub const REQUEST_TIMEOUT_MS: &str = "Request-Timeout-Ms";
/// JetStream de-duplication id (set to the event id).
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
/// Why an event was dead-lettered: `decode`, `rejected` or `max-deliveries`.
pub const DEAD_LETTER_REASON: &str = "Dead-Letter-Reason";
/// The error that dead-lettered an event.
pub const DEAD_LETTER_ERROR: &str = "Dead-Letter-Error";
/// The subject the dead-lettered event was published on.
pub const DEAD_LETTER_SUBJECT: &str = "Dead-Letter-Subject";
/// The stream sequence of the dead-lettered event in its original stream.
pub const DEAD_LETTER_STREAM_SEQ: &str = "Dead-Letter-Stream-Seq";
/// How many times the event had been delivered when it was dead-lettered.
pub const DEAD_LETTER_DELIVERIES: &str = "Dead-Letter-Deliveries";
/// The stream the dead-lettered event was stored in (the events stream).
pub const DEAD_LETTER_STREAM: &str = "Dead-Letter-Stream";
/// `omitted` on a reference record: the original was too large to be copied into the dead
/// letter, which then holds no payload and none of the original headers.
pub const DEAD_LETTER_PAYLOAD: &str = "Dead-Letter-Payload";
/// On a reference record: the original's size in bytes (headers and payload, as on the wire).
pub const DEAD_LETTER_SIZE: &str = "Dead-Letter-Size";

/// Turns free text (error messages) into a header value: line breaks become spaces, so the
/// value can never make `HeaderMap::insert` panic.
///
/// # Examples
///
/// ```
/// let v = ce_messaging::headers::text_value("a\nb");
/// assert_eq!(v.as_str(), "a b");
/// ```
pub fn text_value(text: &str) -> HeaderValue {
    let clean: String = text
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    // Invariant: `clean` has no CR or LF, the only characters async-nats rejects in a value.
    clean.parse().unwrap_or_default()
}

/// Size of headers + payload as the server counts it against `max_payload` (as `HPUB`): what a
/// publish is checked against before it is sent, and a dead letter before it is written.
pub(crate) fn wire_size(headers: &async_nats::HeaderMap, payload_len: usize) -> usize {
    if headers.is_empty() {
        return payload_len;
    }
    let mut len = b"NATS/1.0\r\n".len() + b"\r\n".len();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        for value in values {
            let value: &str = value.as_ref();
            len += name.len() + 2 + value.len() + 2;
        }
    }
    len + payload_len
}

/// `n` in decimal, written into the end of `buffer` (header values such as
/// [`REQUEST_TIMEOUT_MS`], JSON integers, reply-subject tokens): no formatting machinery.
pub(crate) fn decimal(mut n: u64, buffer: &mut [u8; 20]) -> &str {
    let mut start = buffer.len();
    loop {
        start -= 1;
        // A digit: `n % 10` is below 10.
        buffer[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written; the fallback is never taken.
    std::str::from_utf8(&buffer[start..]).unwrap_or("0")
}
