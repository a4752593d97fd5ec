//! CloudEvents <-> NATS message (headers + payload), in structured and binary content modes,
//! as the wire contract says.
//!
//! [`encode`] writes a spec 1.0 event's JSON event format directly (literal member names,
//! strings escaped in runs, `time` formatted once into a stack buffer): the same members and
//! values as the sdk's serde serializer, byte for byte (a property test pins it, and that the
//! sdk's decoder reads it back); binary mode writes the `ce-*` headers from the borrowed event.
//! The headers come out as [`EncodedHeaders`], a compact form (static names, values in one
//! string) that becomes async-nats' [`HeaderMap`] where a message is sent, and `serde_json::Value`
//! data is written directly, byte for byte as serde_json writes it.
//! Spec 0.3 goes through the sdk's serde serializer. [`decode`] is on every message's path, so
//! for spec 1.0 it reads the JSON event in one pass (`scan.rs`, borrowed keys and strings,
//! `data` kept as its raw JSON text) or the `ce-*` headers (one pass). A structured event is
//! handed out as a checked view of its payload ([`ReceivedEvent`], built into the sdk's `Event`
//! only when asked); anything else is built with the sdk's `EventBuilderV10` when decoded;
//! spec 0.3 goes through the sdk's [`BinaryDeserializer`] /
//! [`StructuredDeserializer`] route, and `data_base64` through the sdk's own JSON format
//! decoder. A property test pins that the structured decode agrees with the sdk's decoder.
//!
//! **Data stays bytes; read it with `data_as`.** A message is decoded only once: JSON data
//! (a JSON `datacontenttype`) is not parsed into a `serde_json::Value` at decode time but
//! handed out as its JSON text, `Data::Binary`, in both content modes, and
//! [`EventExt::data_as`](crate::event::EventExt::data_as) parses it straight into the
//! handler's type. So `decode(encode(e))` equals `e` in every attribute and extension, and in
//! its data as JSON (`data_as::<serde_json::Value>()`), not in the `Data` variant. Sending
//! such an event on keeps its wire form: in structured mode its JSON text is written as the
//! `data` member (not `data_base64`), in binary mode as the payload.
//!
//! # Examples
//!
//! ```
//! use ce_messaging::cloudevents::{AttributesReader, Data};
//! use ce_messaging::codec::{decode, encode, ContentMode};
//! use ce_messaging::cloudevent::{new_event, EventExt};
//!
//! let event = new_event("org.example.thing.created", "svc", &serde_json::json!({"n": 1}))?;
//! for mode in [ContentMode::Structured, ContentMode::Binary] {
//!     let msg = encode(&event, mode)?;
//!     // Headers go out (and come back) as async-nats' `HeaderMap`.
//!     let back = decode(Some(&msg.headers.to_header_map()), &msg.payload)?;
//!     assert_eq!(back.id(), event.id());
//!     assert_eq!(back.data(), Some(&Data::Binary(br#"{"n":1}"#.to_vec())));
//!     assert_eq!(
//!         back.data_as::<serde_json::Value>()?,
//!         event.data_as::<serde_json::Value>()?
//!     );
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
use std::borrow::Cow;

use bytes::Bytes;
use cloudevents::event::{Data, ExtensionValue, SpecVersion};
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, Error as MessageError, MessageAttributeValue,
    StructuredDeserializer, StructuredSerializer,
};
use cloudevents::{AttributesReader, Event};

use crate::error::{DecodeError, DecodeErrorKind, EncodeError, EncodeErrorKind, Error};

/// NATS message headers, as used by the codec.
pub use async_nats::HeaderMap;
pub use write::EncodedHeaders;

mod received;
mod write;
use async_nats::HeaderValue;
pub use received::ReceivedEvent;

/// The `Content-Type` of a structured-mode message.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Initial buffer size of a structured encode: the attributes of a typical event take about
/// 250 bytes, so most events fit without growing the buffer.
const STRUCTURED_CAPACITY: usize = 512;

/// Prefix of the binary-mode attribute headers.
const CE_PREFIX: &str = "ce-";

/// A header name that starts with [`CE_PREFIX`] in any letter case.
fn has_ce_prefix(name: &str) -> bool {
    name.as_bytes()
        .get(..CE_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(CE_PREFIX.as_bytes()))
}
/// The plain content type header (compared case-insensitively).
const CONTENT_TYPE: &str = "content-type";

/// How an event is laid out in a NATS message.
///
/// # Examples
///
/// ```
/// use ce_messaging::codec::ContentMode;
/// assert_eq!(ContentMode::default(), ContentMode::Structured);
/// let mode: ContentMode = serde_json::from_str("\"binary\"")?;
/// assert_eq!(mode, ContentMode::Binary);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ContentMode {
    /// The payload is the JSON event format; `Content-Type: application/cloudevents+json`.
    #[default]
    Structured,
    /// The payload is the event data; attributes travel as `ce-*` headers.
    Binary,
}

/// An event encoded as NATS headers and payload.
///
/// # Examples
///
/// ```
/// use ce_messaging::codec::{encode, ContentMode};
/// let event = ce_messaging::cloudevent::new_event("t", "s", &1)?;
/// let msg = encode(&event, ContentMode::Binary)?;
/// assert_eq!(msg.headers.get("ce-type"), Some("t"));
/// assert_eq!(&msg.payload[..], b"1");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    /// The NATS headers, in a compact form: convert them with
    /// [`EncodedHeaders::to_header_map`] (or `HeaderMap::from`) to send them.
    pub headers: EncodedHeaders,
    /// The NATS payload.
    pub payload: Bytes,
}

/// Encodes an event as NATS headers and payload in the given content mode.
///
/// Structured: the payload is the JSON event format and `Content-Type` is
/// `application/cloudevents+json`. Binary: the payload is the data and every attribute and
/// extension is a percent-encoded `ce-<name>` header.
///
/// JSON text data (`Data::Binary` with a JSON content type, as [`decode`] hands it out and
/// [`new_event`](crate::cloudevent::new_event) builds it) is written as it is: the `data`
/// member in structured mode (when the bytes are one JSON value; else `data_base64`), the
/// payload in binary mode (one copy).
///
/// # Errors
///
/// [`EncodeErrorKind::InvalidAttribute`] when the event breaks a rule [`decode`] holds received
/// events to, so that its receivers would refuse it: `id`, `type` or `source` empty, `subject`
/// empty, `datacontenttype` not an RFC 2046 media type, an extension name that is not
/// lower-case ASCII letters and digits, or an extension named like a spec attribute (or
/// `data`) that receivers would read as that attribute (see `docs/wire-contract.md`);
/// [`EncodeErrorKind::InvalidHeader`] when an attribute cannot be a NATS header (binary mode;
/// not expected of an event that passes the checks above);
/// [`EncodeErrorKind::Serialize`] when the event cannot be serialized.
///
/// # Examples
///
/// ```
/// use ce_messaging::codec::{encode, ContentMode};
/// let event = ce_messaging::cloudevent::new_event("t", "s", &"hi")?;
/// let msg = encode(&event, ContentMode::Structured)?;
/// assert_eq!(
///     msg.headers.get("Content-Type"),
///     Some("application/cloudevents+json")
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn encode(event: &Event, mode: ContentMode) -> Result<EncodedEvent, EncodeError> {
    check_outgoing(event)?;
    match mode {
        ContentMode::Structured => {
            let payload = match event.specversion() {
                SpecVersion::V10 => {
                    let mut json = Vec::with_capacity(structured_capacity(event));
                    write_structured_v10(&mut json, event)?;
                    Bytes::from(json)
                }
                // Spec 0.3 (rare): the sdk's JSON event format.
                _ => {
                    for (name, _) in event.iter_extensions() {
                        check_outgoing_extension(name)?;
                    }
                    let mut json = Vec::with_capacity(STRUCTURED_CAPACITY);
                    match with_parsed_json_data(event) {
                        Some(forward) => serde_json::to_writer(&mut json, &forward),
                        None => serde_json::to_writer(&mut json, event),
                    }
                    .map_err(|e| Error::with_source(EncodeErrorKind::Serialize, e))?;
                    Bytes::from(json)
                }
            };
            Ok(EncodedEvent {
                headers: EncodedHeaders::structured(),
                payload,
            })
        }
        ContentMode::Binary => write::encode_binary(event),
    }
}

/// A 1.0 event in the JSON event format, written directly: literal member names, strings
/// escaped in runs (a string without characters to escape is one copy), `time` formatted once
/// into a stack buffer. The members and values are those the sdk's serde serializer writes
/// (`time` as chrono's serde form, with `Z`; extensions as strings, booleans or integers; data
/// as `data`, or `data_base64` for bytes), so peers that decode with the sdk read the same
/// event (a property test pins it). JSON text data (`Data::Binary` with a JSON content type,
/// as [`decode`] hands it out and [`new_event`](crate::cloudevent::new_event) builds it) is
/// written as the `data` member as it is, when a structural check with the grammar of the
/// decoder's `data` check (`scan::is_json_text`, one pass, no parse) finds one JSON value;
/// else as `data_base64`.
fn write_structured_v10(out: &mut Vec<u8>, event: &Event) -> Result<(), EncodeError> {
    let data = event.data();
    out.extend_from_slice(br#"{"specversion":"1.0","id":"#);
    write_json_str(out, event.id());
    out.extend_from_slice(br#","type":"#);
    write_json_str(out, event.ty());
    out.extend_from_slice(br#","source":"#);
    write_json_str(out, event.source());
    let content_type = event.datacontenttype();
    if let Some(ct) = content_type {
        out.extend_from_slice(br#","datacontenttype":"#);
        write_json_str(out, ct);
    }
    if let Some(schema) = event.dataschema() {
        out.extend_from_slice(br#","dataschema":"#);
        write_json_str(out, schema.as_str());
    }
    if let Some(subject) = event.subject() {
        out.extend_from_slice(br#","subject":"#);
        write_json_str(out, subject);
    }
    if let Some(time) = event.time() {
        out.extend_from_slice(br#","time":""#);
        let mut buf = [0u8; TIME_CAPACITY];
        match format_time_into(&mut buf, time, TimeSuffix::Z) {
            Some(len) => out.extend_from_slice(&buf[..len]),
            None => out.extend_from_slice(
                time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                    .as_bytes(),
            ),
        }
        out.push(b'"');
    }
    match data {
        None => {}
        Some(Data::Json(value)) => {
            out.extend_from_slice(br#","data":"#);
            write::write_json_value(out, value)?;
        }
        Some(Data::String(text)) => {
            out.extend_from_slice(br#","data":"#);
            write_json_str(out, text);
        }
        Some(Data::Binary(bytes)) => {
            let json_text =
                content_type.is_some_and(is_json_content_type) && scan::is_json_text(bytes);
            if json_text {
                out.extend_from_slice(br#","data":"#);
                out.extend_from_slice(bytes.trim_ascii());
            } else {
                out.extend_from_slice(br#","data_base64":""#);
                write_base64(out, bytes);
                out.push(b'"');
            }
        }
    }
    for (name, value) in event.iter_extensions() {
        check_outgoing_extension(name)?;
        // Lower-case letters and digits: nothing to escape.
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        match value {
            ExtensionValue::String(text) => write_json_str(out, text),
            ExtensionValue::Boolean(true) => out.extend_from_slice(b"true"),
            ExtensionValue::Boolean(false) => out.extend_from_slice(b"false"),
            ExtensionValue::Integer(i) => write_integer(out, *i),
        }
    }
    out.push(b'}');
    Ok(())
}

/// The room a structured encode of `event` starts with: the attributes of a typical event and
/// the data when its size is known.
fn structured_capacity(event: &Event) -> usize {
    STRUCTURED_CAPACITY
        + match event.data() {
            Some(Data::Binary(bytes)) => bytes.len() * 4 / 3 + 4,
            Some(Data::String(text)) => text.len() + 2,
            _ => 0,
        }
}

/// Whether a byte must be escaped in a JSON string: `"`, `\` and the control characters.
fn needs_json_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Appends `text` as a JSON string, escaped as serde_json escapes it (`\"`, `\\`, the short
/// forms of `\b \t \n \f \r`, `\u00xx` for the other control characters). A string with
/// nothing to escape (checked eight bytes at a time) is one copy; the others are written a
/// byte at a time. Inlined: most strings are short, and a call costs as much as their check.
#[inline]
fn write_json_str(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    if any_needs_json_escape(bytes) {
        write_json_str_escaped(out, bytes);
        return;
    }
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    out.extend_from_slice(bytes);
    out.push(b'"');
}

/// Whether any byte of `bytes` needs an escape in a JSON string: whole words of eight bytes,
/// then the last eight bytes again (overlapping) or, for a string shorter than that, each byte.
fn any_needs_json_escape(bytes: &[u8]) -> bool {
    let word = |chunk: &[u8]| {
        // Invariant: callers pass eight-byte chunks.
        u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]))
    };
    let mut chunks = bytes.chunks_exact(8);
    if chunks.any(|chunk| word_needs_json_escape(word(chunk))) {
        return true;
    }
    match bytes.len() {
        0..8 => bytes.iter().any(|&b| needs_json_escape(b)),
        len if len % 8 == 0 => false,
        len => word_needs_json_escape(word(&bytes[len - 8..])),
    }
}

/// [`write_json_str`] for a string with characters to escape: the runs between escapes are
/// copied whole.
#[cold]
fn write_json_str_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    out.reserve(bytes.len() + 8);
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if needs_json_escape(b) {
            out.extend_from_slice(&bytes[start..i]);
            push_json_escape(out, b);
            start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Whether any of the eight bytes of `word` needs an escape in a JSON string (exact: the
/// classic "has a byte less than n" and "has a zero byte" tests, n <= 128).
fn word_needs_json_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    (below_space | has_zero(quote) | has_zero(backslash)) != 0
}

/// Appends the JSON escape of `b`, one of the bytes [`needs_json_escape`] names.
fn push_json_escape(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0C => out.extend_from_slice(b"\\f"),
        _ => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[usize::from(b >> 4)],
            HEX[usize::from(b & 0x0F)],
        ]),
    }
}

/// Appends an integer in decimal.
fn write_integer(out: &mut Vec<u8>, value: i64) {
    if value < 0 {
        out.push(b'-');
    }
    write::write_u64(out, value.unsigned_abs());
}

/// Appends `bytes` in standard base64 with padding (RFC 4648 section 4), as the sdk writes
/// `data_base64`.
fn write_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let symbol = |n: u32, shift: u32| ALPHABET[((n >> shift) & 0x3F) as usize];
    out.reserve(bytes.len().div_ceil(3) * 4);
    let mut chunks = bytes.chunks_exact(3);
    for chunk in &mut chunks {
        let n = u32::from(chunk[0]) << 16 | u32::from(chunk[1]) << 8 | u32::from(chunk[2]);
        out.extend_from_slice(&[symbol(n, 18), symbol(n, 12), symbol(n, 6), symbol(n, 0)]);
    }
    match *chunks.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[symbol(n, 18), symbol(n, 12), b'=', b'=']);
        }
        [a, b] => {
            let n = u32::from(a) << 16 | u32::from(b) << 8;
            out.extend_from_slice(&[symbol(n, 18), symbol(n, 12), symbol(n, 6), b'=']);
        }
        _ => {}
    }
}

/// A copy of `event` whose JSON text data (`Data::Binary` with a JSON content type, as
/// [`decode`] hands it out) is parsed into `Data::Json`, so that the sdk's JSON event format
/// writes it as a `data` member as it came in, not as `data_base64`; `None` when the event
/// needs no change (other data, or bytes that are not valid JSON). Only a decoded event that
/// is sent on in structured mode takes this path.
fn with_parsed_json_data(event: &Event) -> Option<Event> {
    let Some(Data::Binary(bytes)) = event.data() else {
        return None;
    };
    if !event.datacontenttype().is_some_and(is_json_content_type) {
        return None;
    }
    let value = serde_json::from_slice::<serde_json::Value>(bytes).ok()?;
    let mut forward = event.clone();
    forward.set_data_unchecked(Data::Json(value));
    Some(forward)
}

/// The longest `time` [`format_time_into`] writes: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn+00:00`.
const TIME_CAPACITY: usize = 35;

/// How [`format_time_into`] ends a UTC time.
#[derive(Clone, Copy)]
enum TimeSuffix {
    /// `+00:00`, as chrono's `to_rfc3339` writes it (the sdk's binary-mode header).
    Offset,
    /// `Z`, as chrono's serde form writes it (the sdk's JSON event format).
    Z,
}

/// Writes `time` into `buf` as chrono writes it (`to_rfc3339`, or the serde form with `Z`:
/// 0, 3, 6 or 9 fraction digits) and returns its length; `None` for what chrono's own
/// formatting must write (years outside 0-9999, leap seconds).
fn format_time_into(
    buf: &mut [u8; TIME_CAPACITY],
    time: &chrono::DateTime<chrono::Utc>,
    suffix: TimeSuffix,
) -> Option<usize> {
    use chrono::{Datelike, Timelike};
    let naive = time.naive_utc();
    let (date, clock) = (naive.date(), naive.time());
    let nanos = clock.nanosecond();
    let year = u32::try_from(date.year()).ok().filter(|y| *y <= 9999)?;
    if nanos >= 1_000_000_000 {
        return None;
    }
    let seconds = clock.num_seconds_from_midnight();
    /// Two digits of `value` (0-99) at `at`: ASCII digits.
    fn two(buf: &mut [u8; TIME_CAPACITY], at: usize, value: u32) {
        buf[at] = b'0' + (value / 10) as u8;
        buf[at + 1] = b'0' + (value % 10) as u8;
    }
    two(buf, 0, year / 100);
    two(buf, 2, year % 100);
    two(buf, 5, date.month());
    two(buf, 8, date.day());
    two(buf, 11, seconds / 3600);
    two(buf, 14, seconds / 60 % 60);
    two(buf, 17, seconds % 60);
    buf[4] = b'-';
    buf[7] = b'-';
    buf[10] = b'T';
    buf[13] = b':';
    buf[16] = b':';
    let mut len = 19;
    if nanos != 0 {
        let (mut fraction, digits): (u32, usize) = if nanos % 1_000_000 == 0 {
            (nanos / 1_000_000, 3)
        } else if nanos % 1_000 == 0 {
            (nanos / 1_000, 6)
        } else {
            (nanos, 9)
        };
        buf[19] = b'.';
        len = 20 + digits;
        // Two digits at a step from the end, then the first one when `digits` is odd.
        let mut at = len;
        while at >= 22 {
            at -= 2;
            two(buf, at, fraction % 100);
            fraction /= 100;
        }
        if at == 21 {
            // `fraction` is now one digit, 0-9.
            buf[20] = b'0' + fraction as u8;
        }
    }
    match suffix {
        TimeSuffix::Offset => {
            buf[len..len + 6].copy_from_slice(b"+00:00");
            Some(len + 6)
        }
        TimeSuffix::Z => {
            buf[len] = b'Z';
            Some(len + 1)
        }
    }
}

/// `time` exactly as chrono's `to_rfc3339` writes it (the sdk's form: `+00:00`, and 0, 3, 6
/// or 9 fraction digits), without its formatting machinery for the common years 0-9999. The
/// binary encoder writes the same into its header text; tests compare it with chrono.
#[cfg(test)]
fn format_time(time: &chrono::DateTime<chrono::Utc>) -> String {
    let mut buf = [0u8; TIME_CAPACITY];
    match format_time_into(&mut buf, time, TimeSuffix::Offset) {
        // The buffer holds ASCII digits and separators only.
        Some(len) => String::from_utf8_lossy(&buf[..len]).into_owned(),
        None => time.to_rfc3339(),
    }
}

/// `time` as chrono's `parse_from_rfc3339` reads it, with a fast path for the UTC form that
/// this library and most senders write (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|+00:00)`).
fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, chrono::ParseError> {
    match parse_utc_time(text.as_bytes()) {
        Some(time) => Ok(time),
        None => chrono::DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&chrono::Utc)),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.f]Z` or `...+00:00` with 1-9 fraction digits and a valid date and
/// time (no leap second); `None` for anything else, which chrono then reads (or rejects).
// Digit by digit on the fixed positions (decode-structured 5,157 -> 5,103 instructions against
// a `try_fold` per number and a search for the separators).
fn parse_utc_time(text: &[u8]) -> Option<chrono::DateTime<chrono::Utc>> {
    let (head, rest) = text.split_first_chunk::<19>()?;
    // A digit's value, or 10 and more for any other byte (the subtraction wraps below `0`).
    let digit = |i: usize| u32::from(head[i].wrapping_sub(b'0'));
    let two = |i: usize| {
        let (tens, ones) = (digit(i), digit(i + 1));
        (tens < 10 && ones < 10).then_some(tens * 10 + ones)
    };
    if head[4] != b'-'
        || head[7] != b'-'
        || head[10] != b'T'
        || head[13] != b':'
        || head[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (two(0)? * 100 + two(2)?, two(5)?, two(8)?);
    let (hour, minute, second) = (two(11)?, two(14)?, two(17)?);
    let mut nanos = 0;
    let zone = match rest.split_first() {
        Some((b'.', fraction)) => {
            let mut digits = 0;
            for &b in fraction {
                let d = u32::from(b.wrapping_sub(b'0'));
                if d >= 10 {
                    break;
                }
                if digits == 9 {
                    // A tenth digit: left to chrono.
                    return None;
                }
                // At most nine digits: below 10^9.
                nanos = nanos * 10 + d;
                digits += 1;
            }
            if digits == 0 {
                return None;
            }
            // `digits` is 1-9: the power fits, and the product stays below 10^9.
            nanos *= 10u32.pow(9 - digits);
            &fraction[digits as usize..]
        }
        _ => rest,
    };
    if zone != b"Z" && zone != b"+00:00" {
        return None;
    }
    // `year` is at most 9,999: it fits an i32.
    let date = chrono::NaiveDate::from_ymd_opt(year as i32, month, day)?;
    let time = date.and_hms_nano_opt(hour, minute, second, nanos)?;
    Some(time.and_utc())
}

/// Decodes a NATS message into an event, accepting both content modes.
///
/// A `Content-Type` starting with `application/cloudevents` (any case) means structured mode,
/// whatever other headers say (the NATS binding: the Content-Type decides); else a
/// `ce-specversion` header means binary mode; else the payload is tried as a structured JSON
/// event (as sdk-go sends it). In binary mode the `ce-` prefix and the spec attribute names
/// match in any letter case, extension names only in lower case (`ce-myExt` is refused, not
/// read as `myext`), and a value that is one double-quoted string is unquoted before it is
/// percent-decoded.
///
/// The decoded event is checked against the CloudEvents spec's requirements (see
/// `docs/wire-contract.md`): `id`, `type`, `source` not empty, `subject` not empty when
/// present, `datacontenttype` an RFC 2046 media type, extension names lower-case ASCII letters
/// and digits. A `time` with an offset is kept as its instant, in UTC (the sdk's event type
/// holds no offset).
///
/// Spec 1.0 events are decoded on a lean path (one pass over the JSON event or the headers);
/// spec 0.3 and `data_base64` events go through the sdk's own decoder.
///
/// The data is typed by the content type, the same in both modes: data with a JSON content
/// type comes back as its JSON text, `Data::Binary` (not parsed here: read it with
/// [`EventExt::data_as`](crate::event::EventExt::data_as), which parses it once, into your
/// type); `text/*` data as `Data::String` (when it is UTF-8); other data as `Data::Binary`. A
/// structured event's `data` without a `datacontenttype` is JSON by the event format's
/// default and comes back parsed, as `Data::Json`, as the sdk's decoder reads it (binary mode
/// cannot tell such a payload from bytes and keeps it as `Data::Binary`).
///
/// # Errors
///
/// A [`DecodeError`] whose kind says what was wrong: [`DecodeErrorKind::NotJson`],
/// [`DecodeErrorKind::MissingAttribute`], [`DecodeErrorKind::UnknownSpecVersion`],
/// [`DecodeErrorKind::InvalidAttribute`] (also for an event that breaks the checks above; the
/// text names the attribute), [`DecodeErrorKind::InvalidPercentEncoding`],
/// [`DecodeErrorKind::InvalidUtf8`] or [`DecodeErrorKind::NotCloudEvent`] (no `ce-specversion`,
/// no CloudEvents `Content-Type`, and the payload is not a JSON object; with that content type
/// the same payload is `NotJson`).
///
/// # Examples
///
/// ```
/// use bytes::Bytes;
/// use ce_messaging::codec::{decode, HeaderMap};
/// use ce_messaging::cloudevents::{AttributesReader, Data};
/// use ce_messaging::error::DecodeErrorKind;
/// use ce_messaging::cloudevent::EventExt;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("ce-specversion", "1.0");
/// headers.insert("ce-id", "1");
/// headers.insert("ce-source", "svc");
/// headers.insert("ce-type", "t");
/// headers.insert("ce-subject", "caf%C3%A9%20au%20lait");
/// headers.insert("ce-datacontenttype", "application/json");
/// let event = decode(Some(&headers), &Bytes::from_static(br#"{"n":1}"#))?;
/// assert_eq!(event.subject(), Some("café au lait"));
/// assert_eq!(event.data(), Some(&Data::Binary(br#"{"n":1}"#.to_vec())));
/// assert_eq!(event.data_as::<serde_json::Value>()?, serde_json::json!({"n": 1}));
///
/// let err = decode(None, &Bytes::from_static(b"not json")).unwrap_err();
/// assert_eq!(err.kind(), DecodeErrorKind::NotCloudEvent);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn decode(headers: Option<&HeaderMap>, payload: &Bytes) -> Result<ReceivedEvent, DecodeError> {
    decode_as(headers, payload, View::WhenPossible)
}

/// Whether [`decode`] may hand out a view of the payload ([`ReceivedEvent`]'s lazy form).
#[derive(Clone, Copy, PartialEq, Eq)]
enum View {
    WhenPossible,
    /// Always build the event (tests hold the view to what this builds).
    #[cfg(test)]
    Never,
}

/// [`decode`], with or without views.
#[inline(always)]
fn decode_as(
    headers: Option<&HeaderMap>,
    payload: &Bytes,
    view: View,
) -> Result<ReceivedEvent, DecodeError> {
    // Every route checks what `check_event` checks: `EventParts::into_event` checks the event
    // it built before returning it (checking here would move the large `Event` out of its
    // `Result` and back in, a copy on every message), a view is made only of parts that pass
    // the same rules (`Wire::read`), and the sdk's structured route is checked below.
    let message = NatsMessage { headers, payload };
    if let Some(parts) = message.binary_parts() {
        parts?.into_event().map(ReceivedEvent::from)
    } else {
        // Structured, with or without a CloudEvents Content-Type (sdk-go sends none).
        // Not JSON (the only error of the pass, and of the UTF-8 check): without a CloudEvents
        // Content-Type, not a CloudEvent at all.
        let not_json = |e: DecodeError| {
            if message.has_structured_content_type() {
                e
            } else {
                e.map_kind(|_| DecodeErrorKind::NotCloudEvent)
            }
        };
        let text = scan::payload_text(payload).map_err(not_json)?;
        // The shape encoders write is read straight into a view; anything else (and every
        // error) takes the general path.
        let may_view = match view {
            View::WhenPossible => true,
            #[cfg(test)]
            View::Never => false,
        };
        if may_view {
            let wire =
                scan::read_plain(text).and_then(|plain| received::Wire::from_plain(text, &plain));
            if let Some(wire) = wire {
                return Ok(ReceivedEvent::from_wire(wire));
            }
        }
        let mut json = scan::JsonEvent::default();
        scan::read_event_into(text, &mut json).map_err(not_json)?;
        if json.check_members()? {
            // The common shape becomes a checked view of the payload, built into an `Event`
            // only when asked; anything else (and every error) is built now.
            let wire = match view {
                View::WhenPossible => received::Wire::read(json.text(), json.parts()),
                #[cfg(test)]
                View::Never => None,
            };
            match wire {
                Some(wire) => Ok(ReceivedEvent::from_wire(wire)),
                None => json.take_parts().into_event().map(ReceivedEvent::from),
            }
        } else {
            // Rare shapes (spec 0.3, `data_base64`): the sdk's own JSON format decoder.
            StructuredDeserializer::into_event(message)
                .map_err(decode_error)
                .and_then(|event| check_event(&event).map(|()| ReceivedEvent::from(event)))
        }
    }
}

/// The transaction id (`transactionid` extension) the event in a message carries, read without
/// decoding the event: an [`EventSource`](crate::events::EventSource) whose listeners all wait
/// for given transaction ids skips the responses of other requests with it, unbuilt.
///
/// `Some` only when it is certain: whenever [`decode`] succeeds on the same message, its
/// event's transaction id is this one. `None` when the message has none, and whenever telling
/// would take the whole decode (escapes in structured mode, the header twice in binary mode);
/// the caller then decodes. A message this reads a transaction id from may still fail to
/// decode. Binary mode reads the `ce-*` headers as `decode` does; structured mode looks at the
/// payload's top-level members only, skipping values with the grammar check of
/// [`encode`]'s JSON data.
///
/// # Examples
///
/// ```
/// use ce_messaging::cloudevent::{new_event_with_tid, TransactionId};
/// use ce_messaging::codec::{encode, peek_transaction_id, ContentMode};
/// let tid = TransactionId::generate();
/// let event = new_event_with_tid("org.example.done", "svc", &1, tid.clone())?;
/// let msg = encode(&event, ContentMode::Structured)?;
/// assert_eq!(peek_transaction_id(None, &msg.payload).as_deref(), Some(tid.as_str()));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn peek_transaction_id<'a>(
    headers: Option<&'a HeaderMap>,
    payload: &'a Bytes,
) -> Option<Cow<'a, str>> {
    let message = NatsMessage { headers, payload };
    match message.binary_parts() {
        // Binary mode: every extension is a header value, so a string.
        Some(Ok(parts)) => {
            let mut tids = parts
                .extensions
                .into_iter()
                .filter(|(name, _)| name == crate::cloudevent::TRANSACTION_ID_EXTENSION);
            let (_, value) = tids.next()?;
            if tids.next().is_some() {
                // Two headers (in different letter case): which one `decode` keeps depends on
                // the header map's order.
                return None;
            }
            match value {
                PartsValue::Str(text) if !text.is_empty() => Some(text),
                _ => None,
            }
        }
        Some(Err(_)) => None,
        None => scan::peek_transaction_id(payload).map(Cow::Borrowed),
    }
}

/// The one-pass reader of structured-mode payloads.
mod scan;

/// Checks what the CloudEvents spec requires of a received event beyond its shape, the same
/// for every content mode and spec version: `id`, `type` and `source` are not empty, nor is
/// `subject` when present; `datacontenttype` is an RFC 2046 media type; extension names are
/// lower-case ASCII letters and digits. Byte checks only; nothing is allocated unless the
/// event is refused.
fn check_event(event: &Event) -> Result<(), DecodeError> {
    let refuse = |detail| {
        Err(Error::with_detail(
            DecodeErrorKind::InvalidAttribute,
            detail,
        ))
    };
    if let Some(fault) = attribute_fault(event) {
        return refuse(fault);
    }
    for (name, _) in event.iter_extensions() {
        if !is_attribute_name(name) {
            return refuse(extension_name_fault(name));
        }
    }
    Ok(())
}

/// The same rules on an event about to be sent ([`encode`]): an event its receivers would
/// refuse is refused here, with a typed error, instead of being stored and dead-lettered by
/// every listener (`Dead-Letter-Reason: decode`). The attributes here; the extension names
/// where the encoders write them ([`check_outgoing_extension`]), so the extensions are walked
/// once.
fn check_outgoing(event: &Event) -> Result<(), EncodeError> {
    match attribute_fault(event) {
        None => Ok(()),
        Some(detail) => Err(refused_outgoing(detail)),
    }
}

/// The first rule of [`check_event`] on the attributes that `event` breaks, said in words
/// (the extension names are checked where they are walked: by `check_event`, and by the
/// encoders as they write them).
#[inline(always)]
fn attribute_fault(event: &Event) -> Option<String> {
    attribute_values_fault(
        event.id(),
        event.ty(),
        event.source(),
        event.subject(),
        event.datacontenttype(),
    )
}

/// [`attribute_fault`] on the attribute values themselves (a [`ReceivedEvent`] checks them
/// before any event is built).
#[inline(always)]
fn attribute_values_fault(
    id: &str,
    ty: &str,
    source: &str,
    subject: Option<&str>,
    datacontenttype: Option<&str>,
) -> Option<String> {
    if id.is_empty() {
        return Some("`id` is empty".into());
    }
    if ty.is_empty() {
        return Some("`type` is empty".into());
    }
    if source.is_empty() {
        return Some("`source` is empty".into());
    }
    if subject.is_some_and(str::is_empty) {
        return Some("`subject` is empty (leave it out instead)".into());
    }
    if let Some(ct) = datacontenttype {
        if !is_content_type(ct) {
            return Some(format!(
                "`datacontenttype` is not an RFC 2046 media type \
                 (`type/subtype`, optionally `; name=value` parameters): `{ct}`"
            ));
        }
    }
    None
}

/// A `datacontenttype` that is an RFC 2046 media type.
fn is_content_type(ct: &str) -> bool {
    // The content type of `new_event`'s JSON data: one comparison instead of the grammar.
    ct == "application/json" || is_media_type(ct)
}

/// What is wrong with an extension name that is not an attribute name.
#[cold]
fn extension_name_fault(name: &str) -> String {
    format!("extension `{name}`: attribute names are lower-case ASCII letters and digits")
}

/// The error [`encode`] refuses an event with that breaks a rule of [`check_event`].
#[cold]
fn refused_outgoing(detail: String) -> EncodeError {
    Error::with_detail(
        EncodeErrorKind::InvalidAttribute,
        format!("{detail} (receivers refuse such an event)"),
    )
}

/// An extension name the encoders are about to write, checked as receivers check it, and
/// refused as well when it is a spec attribute's name (in any version) or `data`: receivers
/// read such an extension as that attribute or the data (a second `id` member or `ce-type`
/// header), so the event would be refused or arrive changed.
#[inline(always)]
fn check_outgoing_extension(name: &str) -> Result<(), EncodeError> {
    // `eq_ignore_ascii_case` compares lengths first: most names cost eleven length checks.
    if is_attribute_name(name) && name != "data" && spec_attribute_name(name).is_none() {
        return Ok(());
    }
    Err(refused_outgoing(if is_attribute_name(name) {
        format!(
            "extension `{name}`: the name of a CloudEvents attribute (or `data`), which \
             receivers read as that attribute"
        )
    } else {
        extension_name_fault(name)
    }))
}

/// Whether `name` is a CloudEvents attribute name: one or more of `a`-`z` and `0`-`9`.
fn is_attribute_name(name: &str) -> bool {
    is_attribute_name_bytes(name.as_bytes())
}

/// [`is_attribute_name`] of a name's bytes.
fn is_attribute_name_bytes(name: &[u8]) -> bool {
    !name.is_empty()
        && name
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The spec attribute (1.0 or 0.3) named `name` in any letter case, by its lower-case name.
fn spec_attribute_name(name: &str) -> Option<&'static str> {
    const NAMES: [&str; 10] = [
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "dataschema",
        "datacontenttype",
        "schemaurl",
        "datacontentencoding",
    ];
    NAMES.into_iter().find(|n| n.eq_ignore_ascii_case(name))
}

/// An RFC 2045 `token` byte: printable US-ASCII except space and `()<>@,;:\"/[]?=`.
fn is_token_byte(b: u8) -> bool {
    // A table: checking each byte against the 15 specials cost ~60 instructions a byte.
    const TOKEN_BYTES: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0x21;
        while b <= 0x7E {
            table[b] = true;
            b += 1;
        }
        let specials = b"()<>@,;:\\\"/[]?=";
        let mut i = 0;
        while i < specials.len() {
            table[specials[i] as usize] = false;
            i += 1;
        }
        table
    };
    TOKEN_BYTES[usize::from(b)]
}

/// Whether `text` is a media type as RFC 2046 defines it (grammar of RFC 2045 section 5.1,
/// parameter list as RFC 9110 section 8.3.1 writes it): `type/subtype` (tokens), then any
/// number of `;`-separated `name=value` parameters (the value a token or a quoted-string),
/// with optional spaces or tabs around each `;`; an empty parameter (`text/plain;`) is
/// allowed. Nothing else: no leading or trailing space, no comments.
fn is_media_type(text: &str) -> bool {
    let b = text.as_bytes();
    // Index just past the token starting at `i` (== `i` when there is none).
    let token_end = |i: usize| i + b[i..].iter().take_while(|&&c| is_token_byte(c)).count();
    let ows_end = |i: usize| {
        i + b[i..]
            .iter()
            .take_while(|&&c| c == b' ' || c == b'\t')
            .count()
    };
    let mut i = token_end(0);
    if i == 0 || b.get(i) != Some(&b'/') {
        return false;
    }
    let subtype_end = token_end(i + 1);
    if subtype_end == i + 1 {
        return false;
    }
    i = subtype_end;
    while i < b.len() {
        i = ows_end(i);
        if b.get(i) != Some(&b';') {
            return false;
        }
        i = ows_end(i + 1);
        if i == b.len() || b[i] == b';' {
            continue;
        }
        let name_end = token_end(i);
        if name_end == i || b.get(name_end) != Some(&b'=') {
            return false;
        }
        i = name_end + 1;
        if b.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match b.get(i) {
                    None => return false,
                    Some(b'"') => break,
                    Some(b'\\') if i + 1 < b.len() => i += 2,
                    Some(&c) if c != b'\t' && (c < 0x20 || c == 0x7F) => return false,
                    Some(_) => i += 1,
                }
            }
            i += 1;
        } else {
            let value_end = token_end(i);
            if value_end == i {
                return false;
            }
            i = value_end;
        }
    }
    true
}

/// Whether a `Content-Type` value names the structured content mode: it starts with
/// `application/cloudevents`, in any letter case (the NATS binding's rule).
fn is_structured_content_type(value: &str) -> bool {
    const PREFIX: &str = "application/cloudevents";
    // As this library and most senders write it: one comparison.
    if value.starts_with(PREFIX) {
        return true;
    }
    let v = value.trim_start().as_bytes();
    v.len() >= PREFIX.len() && v[..PREFIX.len()].eq_ignore_ascii_case(PREFIX.as_bytes())
}

/// Whether a content type names JSON data (as cloudevents-sdk decides it).
fn is_json_content_type(ct: &str) -> bool {
    ct.starts_with("application/json") || ct.starts_with("text/json") || ct.ends_with("+json")
}

/// A NATS message seen through the sdk's deserializer traits.
struct NatsMessage<'a> {
    headers: Option<&'a HeaderMap>,
    payload: &'a Bytes,
}

impl<'a> NatsMessage<'a> {
    /// Whether `Content-Type` starts with `application/cloudevents` (case-insensitive).
    fn has_structured_content_type(&self) -> bool {
        self.headers.is_some_and(|h| {
            h.iter().any(|(name, values)| {
                AsRef::<str>::as_ref(name).eq_ignore_ascii_case(CONTENT_TYPE)
                    && values
                        .iter()
                        .any(|v| is_structured_content_type(v.as_str()))
            })
        })
    }

    /// Reads the `ce-*` headers (one pass, values unquoted and percent-decoded) and the
    /// payload as the data; `None` when the message is not in binary mode: a CloudEvents
    /// `Content-Type` (structured mode, whatever other headers say: the NATS binding's rule),
    /// or no `ce-specversion` header. An error in another `ce-*` header then does not count.
    ///
    /// The `ce-` prefix and the spec attribute names (`ce-SpecVersion`, `CE-ID`) match in any
    /// letter case; an extension's header name is its attribute name as it is, so it must be
    /// lower-case letters and digits (`ce-myExt` is refused, not read as `myext`).
    fn binary_parts(&self) -> Option<Result<EventParts<'a>, DecodeError>> {
        let headers = self.headers?;
        // A message without a `ce-` header (structured mode, the common case) is told apart
        // before any parts are made (decode-structured 4,768 -> 4,619 instructions).
        if !headers.iter().any(|(name, _)| has_ce_prefix(name.as_ref())) {
            return None;
        }
        let mut parts = EventParts::default();
        let mut is_binary = false;
        let mut is_structured = false;
        let mut first_error = None;
        let mut content_type = None;
        for (name, values) in headers.iter() {
            let name: &'a str = name.as_ref();
            if has_ce_prefix(name) {
                // Invariant: the first bytes matched the ASCII prefix, so this is a char boundary.
                let attr = &name[CE_PREFIX.len()..];
                // The spec attributes, as this library and most senders write them, first;
                // any other name must be a valid extension name or a spec name in another case.
                let (attr, slot): (&'a str, Slot) = match Slot::of(attr) {
                    Slot::Extension if !is_attribute_name(attr) => {
                        match spec_attribute_name(attr) {
                            Some(spec) => (spec, Slot::of(spec)),
                            None => {
                                first_error.get_or_insert_with(|| {
                                    Error::with_detail(
                                        DecodeErrorKind::InvalidAttribute,
                                        format!(
                                "header `{name}`: attribute name `{attr}` is not lower-case \
                                 ASCII letters and digits (only the `ce-` prefix and the spec \
                                 attribute names match in any case)"
                            ),
                                    )
                                });
                                continue;
                            }
                        }
                    }
                    slot => (attr, slot),
                };
                is_binary |= matches!(slot, Slot::SpecVersion);
                let Some(value) = values.first().map(HeaderValue::as_str) else {
                    continue;
                };
                let value = match header_value(value, name) {
                    Ok(value) => value,
                    Err(e) => {
                        first_error.get_or_insert(e);
                        continue;
                    }
                };
                match slot {
                    Slot::SpecVersion => parts.specversion = Some(value),
                    Slot::DataContentType => parts.datacontenttype = Some(value),
                    Slot::Attribute(i) => parts.attributes[i] = Some(value),
                    Slot::Extension => parts
                        .extensions
                        .push((Cow::Borrowed(attr), PartsValue::Str(value))),
                }
            } else if name == "Content-Type" || name.eq_ignore_ascii_case(CONTENT_TYPE) {
                // (As this library and most senders write it: one comparison first.)
                content_type = values.first().map(|v| Cow::Borrowed(v.as_str()));
                is_structured |= values
                    .iter()
                    .any(|v| is_structured_content_type(v.as_str()));
            }
        }
        if !is_binary || is_structured {
            return None;
        }
        if let Some(e) = first_error {
            return Some(Err(e));
        }
        if parts.datacontenttype.is_none() {
            parts.datacontenttype = content_type;
        }
        if !self.payload.is_empty() {
            parts.data = Some(PartsData::Bytes(self.payload));
        }
        Some(Ok(parts))
    }
}

/// The data of an event being decoded, still in its wire form.
enum PartsData<'a> {
    /// Binary mode: the payload.
    Bytes(&'a Bytes),
    /// Structured mode: the JSON text of the `data` member (checked, not parsed).
    Json(&'a str),
}

/// An event's attributes, extensions and data as read from the wire, borrowed where possible;
/// handed to the sdk as a [`BinaryDeserializer`] to build the [`Event`].
#[derive(Default)]
struct EventParts<'a> {
    specversion: Option<Cow<'a, str>>,
    attributes: [Option<Cow<'a, str>>; V10_ATTRIBUTES.len()],
    datacontenttype: Option<Cow<'a, str>>,
    extensions: Extensions<'a>,
    data: Option<PartsData<'a>>,
}

/// The extensions of an event being decoded, in the order read: the first two inline (an
/// event of this library carries one or two: the transaction id, a trace parent), so that
/// they cost no list allocation; more go to a `Vec`.
#[derive(Default)]
struct Extensions<'a> {
    inline: [Option<(Cow<'a, str>, PartsValue<'a>)>; 2],
    more: Vec<(Cow<'a, str>, PartsValue<'a>)>,
}

/// An extension's value as read from the wire: a string borrowed where it can be (so that a
/// [`ReceivedEvent`] can point at it in the payload), a boolean or an integer.
enum PartsValue<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    Int(i64),
}

impl PartsValue<'_> {
    fn into_extension_value(self) -> ExtensionValue {
        match self {
            PartsValue::Str(text) => ExtensionValue::String(text.into_owned()),
            PartsValue::Bool(b) => ExtensionValue::Boolean(b),
            PartsValue::Int(i) => ExtensionValue::Integer(i),
        }
    }
}

impl<'a> Extensions<'a> {
    fn push(&mut self, extension: (Cow<'a, str>, PartsValue<'a>)) {
        match self.inline.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => *slot = Some(extension),
            None => self.more.push(extension),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &(Cow<'a, str>, PartsValue<'a>)> {
        self.inline.iter().flatten().chain(self.more.iter())
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut (Cow<'a, str>, PartsValue<'a>)> {
        self.inline.iter_mut().flatten().chain(self.more.iter_mut())
    }

    /// Takes out the extension named `name`, if there is one.
    fn remove(&mut self, name: &str) {
        for slot in &mut self.inline {
            if slot.as_ref().is_some_and(|(n, _)| n == name) {
                *slot = None;
            }
        }
        self.more.retain(|(n, _)| n != name);
    }
}

impl<'a> IntoIterator for Extensions<'a> {
    type Item = (Cow<'a, str>, PartsValue<'a>);
    type IntoIter = std::iter::Chain<
        std::iter::Flatten<std::array::IntoIter<Option<Self::Item>, 2>>,
        std::vec::IntoIter<Self::Item>,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.inline.into_iter().flatten().chain(self.more)
    }
}

/// The 1.0 attributes other than `specversion` and `datacontenttype`, in the order set.
const V10_ATTRIBUTES: [&str; 6] = ["id", "source", "type", "subject", "time", "dataschema"];

/// Where a member or header named `name` goes: `specversion`, a spec attribute, or an extension.
#[derive(Clone, Copy)]
enum Slot {
    SpecVersion,
    DataContentType,
    /// An index into [`V10_ATTRIBUTES`].
    Attribute(usize),
    Extension,
}

impl Slot {
    fn of(name: &str) -> Slot {
        match name {
            "specversion" => Slot::SpecVersion,
            "datacontenttype" => Slot::DataContentType,
            _ => match V10_ATTRIBUTES.iter().position(|a| *a == name) {
                Some(i) => Slot::Attribute(i),
                None => Slot::Extension,
            },
        }
    }
}

impl<'a> EventParts<'a> {
    /// Builds the event through the sdk, then types the data by its content type: JSON data
    /// stays its JSON text (`Data::Binary`, read with `EventExt::data_as`), `text/*` data is
    /// `Data::String`, and a structured event's `data` without a content type is `Data::Json`;
    /// then checks it ([`check_event`]).
    fn into_event(mut self) -> Result<Event, DecodeError> {
        let data = self.data.take();
        let content_type = self.datacontenttype.as_deref();
        let is_json = content_type.is_some_and(is_json_content_type);
        let is_text = content_type.is_some_and(|ct| ct.starts_with("text/"));
        let has_content_type = content_type.is_some();
        let mut event = if self.specversion.as_deref() == Some("1.0") {
            self.build_v10()?
        } else {
            BinaryDeserializer::into_event(self).map_err(decode_error)?
        };
        let data = match data {
            None => return check_event(&event).map(|()| event),
            // Decode only once: the handler parses the JSON text straight into its own type.
            Some(PartsData::Json(text)) if is_json => Data::Binary(text.as_bytes().to_vec()),
            // The JSON event format without `datacontenttype`: the data is JSON, but an event
            // whose data is bytes without a JSON content type would be re-sent as
            // `data_base64`, so it is parsed (the sdk's decoder does the same).
            Some(PartsData::Json(text)) if !has_content_type => Data::Json(
                serde_json::from_str(text)
                    .map_err(|e| Error::with_source(DecodeErrorKind::NotJson, e))?,
            ),
            Some(PartsData::Json(text)) => match scan::json_string(text) {
                Some(text) => Data::String(text.into_owned()),
                None => {
                    return Err(Error::with_detail(
                        DecodeErrorKind::InvalidAttribute,
                        "`data` of a non-JSON content type must be a JSON string",
                    ))
                }
            },
            Some(PartsData::Bytes(bytes)) if is_text && !is_json => {
                match std::str::from_utf8(bytes) {
                    Ok(text) => Data::String(text.to_owned()),
                    Err(_) => Data::Binary(bytes.to_vec()),
                }
            }
            Some(PartsData::Bytes(bytes)) => Data::Binary(bytes.to_vec()),
        };
        event.set_data_unchecked(data);
        check_event(&event)?;
        Ok(event)
    }
}

impl EventParts<'_> {
    /// Builds a 1.0 event with the sdk's builder, moving the decoded strings in. (The
    /// [`BinarySerializer`] route re-formats every attribute into a new string; this is the
    /// hot path, so it takes the direct route and leaves 0.3 to the trait.)
    fn build_v10(self) -> Result<Event, DecodeError> {
        use cloudevents::{AttributesWriter, EventBuilder, EventBuilderV10};
        let [id, source, ty, subject, time, dataschema] = self.attributes;
        let time = match time {
            Some(time) => Some(parse_time(&time).map_err(|e| {
                Error::with_source(DecodeErrorKind::InvalidAttribute, e)
                    .detail(format!("`time` is not RFC 3339: `{time}`"))
            })?),
            None => None,
        };
        // The builder is a large value moved through every call: only the required attributes
        // go through it (in one chain, so that it is built in place); the rest are set on the
        // event.
        let built = match (id, source, ty) {
            (Some(id), Some(source), Some(ty)) => EventBuilderV10::new()
                .id(id.into_owned())
                .source(source.into_owned())
                .ty(ty.into_owned())
                .build(),
            (id, source, ty) => {
                // Something is missing: let the builder say what.
                let mut builder = EventBuilderV10::new();
                if let Some(id) = id {
                    builder = builder.id(id.into_owned());
                }
                if let Some(source) = source {
                    builder = builder.source(source.into_owned());
                }
                if let Some(ty) = ty {
                    builder = builder.ty(ty.into_owned());
                }
                builder.build()
            }
        };
        let mut event = built.map_err(|e| {
            let kind = match e {
                cloudevents::event::EventBuilderError::MissingRequiredAttribute { .. } => {
                    DecodeErrorKind::MissingAttribute
                }
                _ => DecodeErrorKind::InvalidAttribute,
            };
            Error::with_source(kind, e)
        })?;
        if let Some(subject) = subject {
            event.set_subject(Some(subject.into_owned()));
        }
        if time.is_some() {
            event.set_time(time);
        }
        for (name, value) in self.extensions {
            event.set_extension(&name, value.into_extension_value());
        }
        if let Some(schema) = dataschema {
            let url = url::Url::parse(&schema).map_err(|e| {
                Error::with_source(DecodeErrorKind::InvalidAttribute, e)
                    .detail(format!("`dataschema` is not a URL: `{schema}`"))
            })?;
            event.set_dataschema(Some(url));
        }
        if let Some(ct) = self.datacontenttype {
            event.set_datacontenttype(Some(ct.into_owned()));
        }
        Ok(event)
    }
}

impl BinaryDeserializer for EventParts<'_> {
    fn deserialize_binary<R: Sized, V: BinarySerializer<R>>(
        self,
        serializer: V,
    ) -> cloudevents::message::Result<R> {
        let Some(version) = self.specversion else {
            return Err(wrap(Error::with_detail(
                DecodeErrorKind::MissingAttribute,
                "`specversion`",
            )));
        };
        let spec = SpecVersion::try_from(version.as_ref()).map_err(|_| {
            wrap(Error::with_detail(
                DecodeErrorKind::UnknownSpecVersion,
                format!("`{version}`"),
            ))
        })?;
        let attribute_names = spec.attribute_names();
        let mut serializer = serializer.set_spec_version(spec)?;
        let set = |serializer: V, name: &str, value: Cow<'_, str>| {
            serializer
                .set_attribute(name, MessageAttributeValue::String(value.into_owned()))
                .map_err(|e| attribute_error(name, e))
        };
        for (name, value) in V10_ATTRIBUTES.iter().zip(self.attributes) {
            let Some(value) = value else { continue };
            if attribute_names.contains(name) {
                serializer = set(serializer, name, value)?;
            } else {
                serializer = serializer
                    .set_extension(name, MessageAttributeValue::String(value.into_owned()))?;
            }
        }
        if let Some(ct) = self.datacontenttype {
            serializer = set(serializer, "datacontenttype", ct)?;
        }
        for (name, value) in self.extensions {
            if attribute_names.contains(&name.as_ref()) {
                // 0.3 attribute names (`schemaurl`, `datacontentencoding`) read as extensions.
                let value = value.into_extension_value();
                serializer = set(serializer, &name, Cow::Owned(value.to_string()))?;
            } else {
                let value = value.into_extension_value();
                serializer = serializer.set_extension(&name, value.into())?;
            }
        }
        serializer.end()
    }
}

impl StructuredDeserializer for NatsMessage<'_> {
    fn deserialize_structured<R: Sized, V: StructuredSerializer<R>>(
        self,
        serializer: V,
    ) -> cloudevents::message::Result<R> {
        serializer.set_structured_event(self.payload.to_vec())
    }
}

/// Maps an sdk error from setting attribute `name` to a typed decode error.
fn attribute_error(name: &str, e: MessageError) -> MessageError {
    wrap(Error::with_source(DecodeErrorKind::InvalidAttribute, e).detail(format!("`{name}`")))
}

/// Carries a typed decode error through the sdk's error type.
fn wrap(e: DecodeError) -> MessageError {
    MessageError::Other {
        source: Box::new(e),
    }
}

/// Maps an sdk message error to a typed decode error.
fn decode_error(e: MessageError) -> DecodeError {
    match e {
        MessageError::Other { source } => match source.downcast::<DecodeError>() {
            Ok(typed) => *typed,
            Err(other) => Error::with_source(DecodeErrorKind::InvalidAttribute, other),
        },
        MessageError::EventBuilderError { source } => {
            let kind = match source {
                cloudevents::event::EventBuilderError::MissingRequiredAttribute { .. } => {
                    DecodeErrorKind::MissingAttribute
                }
                _ => DecodeErrorKind::InvalidAttribute,
            };
            Error::with_source(kind, source)
        }
        MessageError::UnknownSpecVersion { source } => {
            Error::with_source(DecodeErrorKind::UnknownSpecVersion, source)
        }
        MessageError::SerdeJsonError { source } => serde_decode_error(source),
        other => Error::with_source(DecodeErrorKind::InvalidAttribute, other),
    }
}

/// Classifies a serde_json error from the sdk's structured decode.
fn serde_decode_error(e: serde_json::Error) -> DecodeError {
    use serde_json::error::Category;
    let kind = match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => DecodeErrorKind::NotJson,
        Category::Data => {
            let text = e.to_string();
            if text.starts_with("missing field") {
                DecodeErrorKind::MissingAttribute
            } else if text.starts_with("unknown variant") {
                DecodeErrorKind::UnknownSpecVersion
            } else if text.starts_with("invalid type: ") && text.contains("expected a map") {
                DecodeErrorKind::NotJson
            } else {
                DecodeErrorKind::InvalidAttribute
            }
        }
    };
    Error::with_source(kind, e)
}

/// Whether a byte goes into a header value as it is (U+0021..U+007E except `"` and `%`).
fn is_unreserved(b: u8) -> bool {
    (0x21..=0x7E).contains(&b) && b != b'"' && b != b'%'
}

/// Percent-encodes a header value per the contract: space, `"`, `%` and every byte outside
/// U+0021..U+007E, with upper-case hex. The binary encoder writes the same into its header
/// text (`write::percent_encode_into`); tests build headers with this one.
#[cfg(test)]
fn percent_encode(value: &str) -> Cow<'_, str> {
    if value.bytes().all(is_unreserved) {
        return Cow::Borrowed(value);
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len() + 16);
    for b in value.bytes() {
        if is_unreserved(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0F)]));
        }
    }
    Cow::Owned(out)
}

/// The value of one hex digit, either case.
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A `ce-` header's value: unquoted when it is one RFC 7230 quoted-string (the NATS binding,
/// section 3.1.3.2: supported on receive for older senders), then percent-decoded.
fn header_value<'v>(value: &'v str, name: &str) -> Result<Cow<'v, str>, DecodeError> {
    if value.starts_with('"') {
        if let Some(unquoted) = unquote(value) {
            return unquoted_header_value(unquoted, name);
        }
    }
    percent_decode(value, name)
}

/// [`header_value`] of a value that was quoted (rare: kept off the common path).
#[cold]
#[inline(never)]
fn unquoted_header_value<'v>(
    unquoted: Cow<'v, str>,
    name: &str,
) -> Result<Cow<'v, str>, DecodeError> {
    match unquoted {
        Cow::Borrowed(inner) => percent_decode(inner, name),
        Cow::Owned(inner) => {
            percent_decode(&inner, name).map(|decoded| Cow::Owned(decoded.into_owned()))
        }
    }
}

/// The content of `value` when the whole value is one quoted-string (`"..."`, where `\x`
/// stands for `x`); `None` when it is not (no closing quote, a quote inside that is not
/// escaped, a closing quote that is escaped), and such a value is then taken as it is.
fn unquote(value: &str) -> Option<Cow<'_, str>> {
    let inner = value.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains(['\\', '"']) {
        return Some(Cow::Borrowed(inner));
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(Cow::Owned(out))
}

/// Decodes a percent-encoded header value; a value without `%` is taken as it is.
// Always inlined: a call per header cost ~33 instructions, the check itself is one `memchr`.
#[inline(always)]
fn percent_decode<'v>(value: &'v str, name: &str) -> Result<Cow<'v, str>, DecodeError> {
    if !value.contains('%') {
        return Ok(Cow::Borrowed(value));
    }
    percent_decode_escapes(value, name).map(Cow::Owned)
}

/// [`percent_decode`] of a value with `%` escapes.
fn percent_decode_escapes(value: &str, name: &str) -> Result<String, DecodeError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex_value);
            let lo = bytes.get(i + 2).copied().and_then(hex_value);
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => {
                    return Err(Error::with_detail(
                        DecodeErrorKind::InvalidPercentEncoding,
                        format!("header `{name}` at byte {i}"),
                    ))
                }
            }
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|e| {
        Error::with_source(DecodeErrorKind::InvalidUtf8, e).detail(format!("header `{name}`"))
    })
}

/// Test support for the crate's unit tests: comparing events the way [`decode`] hands them out.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// An event's data in a form that compares across an encode and decode: JSON data
    /// (`Data::Json`, or the JSON text that [`decode`] gives as `Data::Binary` for a JSON
    /// content type) as a JSON value; other data as it is.
    #[derive(Debug, PartialEq)]
    pub(crate) enum ComparableData {
        Json(serde_json::Value),
        Other(Data),
    }

    /// The event with its data taken out (every attribute and extension kept), and the data as
    /// [`ComparableData`].
    pub(crate) fn comparable(event: &Event) -> (Event, Option<ComparableData>) {
        let mut attributes = event.clone();
        let (content_type, schema, data) = attributes.take_data();
        let is_json = content_type.as_deref().is_some_and(is_json_content_type);
        cloudevents::AttributesWriter::set_datacontenttype(&mut attributes, content_type);
        cloudevents::AttributesWriter::set_dataschema(&mut attributes, schema);
        let data = data.map(|data| match data {
            Data::Json(value) => ComparableData::Json(value),
            Data::Binary(bytes) if is_json => match serde_json::from_slice(&bytes) {
                Ok(value) => ComparableData::Json(value),
                Err(_) => ComparableData::Other(Data::Binary(bytes)),
            },
            other => ComparableData::Other(other),
        });
        (attributes, data)
    }

    /// Asserts that two events have the same attributes, extensions and data, JSON data
    /// compared as JSON values (see [`comparable`]).
    #[track_caller]
    pub(crate) fn assert_same_event(got: &Event, expected: &Event) {
        assert_eq!(comparable(got), comparable(expected));
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{assert_same_event, comparable, ComparableData};
    use super::*;
    use async_nats::HeaderName;
    use cloudevents::{EventBuilder, EventBuilderV03, EventBuilderV10};
    use serde_json::json;

    fn full_event(data: Option<(&str, Data)>) -> Event {
        let time = chrono::DateTime::parse_from_rfc3339("2024-05-06T07:08:09.123456789Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let mut builder = EventBuilderV10::new()
            .id("cloudevent-ä 1")
            .source("svc/with space")
            .ty("org.example.thing.created")
            .subject("café \"quoted\" 100% \u{1F600}")
            .time(time)
            .extension("transactionid", "tid-abc")
            .extension("comexampleother", "x y");
        if let Some((ct, data)) = data {
            builder = builder.data_with_schema(ct, "https://example.com/schema.json", data);
        }
        builder.build().unwrap()
    }

    fn events() -> Vec<Event> {
        vec![
            full_event(Some((
                "application/json",
                Data::Json(json!({"name": "é x", "n": [1, 2.5, null], "ok": true})),
            ))),
            full_event(Some((
                "application/vnd.example+json",
                Data::Json(json!("just a string")),
            ))),
            full_event(Some(("text/plain", Data::String("héllo wörld\r\n".into())))),
            full_event(Some((
                "application/octet-stream",
                Data::Binary(vec![0, 1, 2, 0xFF, 0xFE, b'%', b'\n']),
            ))),
            full_event(None),
            EventBuilderV10::new()
                .id("1")
                .source("s")
                .ty("t")
                .build()
                .unwrap(),
            EventBuilderV03::new()
                .id("v03")
                .source("s")
                .ty("t")
                .data("application/json", json!({"a": 1}))
                .build()
                .unwrap(),
        ]
    }

    #[test]
    fn round_trip_structured_keeps_every_attribute_and_data() {
        for event in events() {
            let msg = encode(&event, ContentMode::Structured).unwrap();
            assert_eq!(
                msg.headers.get("Content-Type"),
                Some(STRUCTURED_CONTENT_TYPE)
            );
            let back = decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
            assert_same_event(&back, &event);
        }
    }

    #[test]
    fn round_trip_binary_keeps_every_attribute_and_data() {
        for event in events() {
            let msg = encode(&event, ContentMode::Binary).unwrap();
            for (name, v) in msg.headers.iter() {
                assert!(name.starts_with("ce-"), "{name}");
                assert!(v.bytes().all(is_unreserved) || v.contains('%'));
                assert!(!v.contains(' '), "{name}: {v}");
            }
            let back = decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
            assert_same_event(&back, &event);
        }
    }

    #[test]
    fn binary_headers_are_percent_encoded_upper_case() {
        let event = full_event(None);
        let msg = encode(&event, ContentMode::Binary).unwrap();
        let get = |n: &str| msg.headers.get(n).unwrap();
        assert_eq!(get("ce-specversion"), "1.0");
        assert_eq!(get("ce-id"), "cloudevent-%C3%A4%201");
        assert_eq!(
            get("ce-subject"),
            "caf%C3%A9%20%22quoted%22%20100%25%20%F0%9F%98%80"
        );
        assert_eq!(get("ce-transactionid"), "tid-abc");
        assert_eq!(get("ce-comexampleother"), "x%20y");
        assert!(msg.payload.is_empty());
    }

    #[test]
    fn time_keeps_full_precision_in_both_modes() {
        let event = full_event(None);
        for mode in [ContentMode::Structured, ContentMode::Binary] {
            let msg = encode(&event, mode).unwrap();
            let back = decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
            assert_eq!(back.time(), event.time());
            assert_eq!(back.time().unwrap().timestamp_subsec_nanos(), 123_456_789);
        }
    }

    #[test]
    fn json_data_is_decoded_as_its_json_text_in_both_modes() {
        #[derive(serde::Deserialize, PartialEq, Debug)]
        struct Thing {
            name: String,
        }
        use crate::event::EventExt;
        let event = crate::event::new_event("t", "s", &json!({"name": "ü"})).unwrap();
        for mode in [ContentMode::Structured, ContentMode::Binary] {
            let msg = encode(&event, mode).unwrap();
            let back = decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
            // Not parsed at decode time: the handler's `data_as` parses it once, into its type.
            assert_eq!(
                back.data(),
                Some(&Data::Binary(r#"{"name":"ü"}"#.as_bytes().to_vec())),
                "{mode:?}"
            );
            assert_eq!(back.data_as::<Thing>().unwrap(), Thing { name: "ü".into() });
        }
    }

    #[test]
    fn structured_json_data_keeps_its_exact_text_and_a_missing_content_type_is_parsed() {
        let event = |extra: &str| {
            Bytes::from(format!(
                r#"{{"specversion":"1.0","id":"1","source":"s","type":"t"{extra}}}"#
            ))
        };
        let back = decode(
            None,
            &event(
                r#","datacontenttype":"application/json","data": {"a" : "\u00e9", "b":[1 ,2]} "#,
            ),
        )
        .unwrap();
        assert_eq!(
            back.data(),
            Some(&Data::Binary(br#"{"a" : "\u00e9", "b":[1 ,2]}"#.to_vec()))
        );
        let back = decode(
            None,
            &event(r#","datacontenttype":"text/plain","data":"h\u00e9""#),
        )
        .unwrap();
        assert_eq!(back.data(), Some(&Data::String("hé".into())));
        // No `datacontenttype`: JSON by the event format's default, parsed as the sdk does, so
        // that the event re-encodes with a `data` member.
        let back = decode(None, &event(r#","data":{"a":1}"#)).unwrap();
        assert_eq!(back.data(), Some(&Data::Json(json!({"a": 1}))));
    }

    #[test]
    fn a_decoded_event_sent_on_keeps_its_wire_form() {
        let event = full_event(Some((
            "application/json",
            Data::Json(json!({"name": "é x", "n": [1, 2.5, null]})),
        )));
        let structured = encode(&event, ContentMode::Structured).unwrap();
        let binary = encode(&event, ContentMode::Binary).unwrap();
        let sdk: serde_json::Value = serde_json::from_slice(&structured.payload).unwrap();
        for msg in [&structured, &binary] {
            let decoded = decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
            assert!(matches!(decoded.data(), Some(Data::Binary(_))));
            // Structured: a `data` member (not `data_base64`), the same JSON event as before.
            let again = encode(&decoded, ContentMode::Structured).unwrap();
            let json: serde_json::Value = serde_json::from_slice(&again.payload).unwrap();
            assert_eq!(json, sdk);
            assert_eq!(json["data"], json!({"name": "é x", "n": [1, 2.5, null]}));
            assert!(json.get("data_base64").is_none());
            // Binary: the JSON text goes out as it came in.
            let again = encode(&decoded, ContentMode::Binary).unwrap();
            assert_eq!(again.headers, binary.headers);
            assert_eq!(
                Some(&again.payload[..]),
                decoded.data().map(|d| match d {
                    Data::Binary(bytes) => &bytes[..],
                    _ => unreachable!("matched above"),
                })
            );
        }
        // Bytes that are not valid JSON despite a JSON content type still go as `data_base64`.
        let mut not_json = event.clone();
        not_json.set_data_unchecked(b"{not json".to_vec());
        let msg = encode(&not_json, ContentMode::Structured).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(json["data_base64"], json!("e25vdCBqc29u"));
        assert_eq!(
            decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap(),
            not_json
        );
    }

    #[test]
    fn json_text_data_that_is_not_one_json_value_goes_as_data_base64() {
        let event = |bytes: &[u8]| {
            let mut event = full_event(Some(("application/json", Data::Json(json!(null)))));
            event.set_data_unchecked(bytes.to_vec());
            event
        };
        let not_json: [&[u8]; 9] = [
            b"",
            b"  ",
            b"{not json",
            b"[1,]",
            b"1 2",
            br#"{"a":1}}"#,
            b"\"\xff\"",
            b"\"tab\there\"",
            b"01",
        ];
        for bytes in not_json {
            let sent = event(bytes);
            let msg = encode(&sent, ContentMode::Structured).unwrap();
            let json: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
            assert!(json.get("data").is_none(), "{bytes:?}: {json}");
            assert!(json["data_base64"].is_string(), "{bytes:?}: {json}");
            let back = decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
            assert_eq!(back, sent, "{bytes:?}");
        }
        // One JSON value with whitespace around it: the `data` member, trimmed.
        let msg = encode(&event(b" \n[1, {\"a\": null}]\t"), ContentMode::Structured).unwrap();
        let text = std::str::from_utf8(&msg.payload).unwrap();
        assert!(text.contains(r#","data":[1, {"a": null}],"#), "{text}");
    }

    #[test]
    fn a_new_event_is_sent_as_the_equivalent_value_event_was() {
        // Fields in alphabetical order (the bench's data): the same bytes as a `Value` event.
        #[derive(serde::Serialize)]
        struct Sorted {
            name: &'static str,
            size: u64,
            tags: [&'static str; 2],
        }
        // Fields out of order: the same JSON, members in the struct's order.
        #[derive(serde::Serialize)]
        struct Unsorted {
            size: u64,
            name: &'static str,
        }
        fn check<T: serde::Serialize>(data: &T, same_bytes: bool) {
            let built = crate::cloudevent::new_event("t", "s", data).unwrap();
            assert!(matches!(built.data(), Some(Data::Binary(_))));
            let mut value_event = built.clone();
            value_event.set_data_unchecked(Data::Json(serde_json::to_value(data).unwrap()));
            for mode in [ContentMode::Structured, ContentMode::Binary] {
                let ours = encode(&built, mode).unwrap();
                let before = encode(&value_event, mode).unwrap();
                assert_eq!(ours.headers, before.headers);
                if same_bytes {
                    assert_eq!(ours.payload, before.payload);
                } else {
                    assert_ne!(ours.payload, before.payload);
                    let parsed = |p: &[u8]| serde_json::from_slice::<serde_json::Value>(p).unwrap();
                    assert_eq!(parsed(&ours.payload), parsed(&before.payload));
                }
            }
            // The structured form is what the sdk's serializer writes for the `Value` event.
            if same_bytes {
                assert_eq!(
                    encode(&built, ContentMode::Structured).unwrap().payload,
                    serde_json::to_vec(&value_event).unwrap()
                );
            }
        }
        check(
            &Sorted {
                name: "é \"x\"",
                size: 1024,
                tags: ["a", "b"],
            },
            true,
        );
        check(&Unsorted { size: 7, name: "n" }, false);
        check(&json!({"b": [1.5, -0.0, 1e300], "a": null}), true);
        check(&"text \u{1}", true);
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, *v);
        }
        h
    }

    #[test]
    fn decodes_sdk_go_structured_without_content_type() {
        let payload = Bytes::from_static(
            br#"{"specversion":"1.0","id":"A234-1234-1234","source":"https://example.com/x","type":"com.example.sampletype1","subject":"sub","time":"2018-04-05T17:31:00Z","datacontenttype":"application/json","transactionid":"tid-1","data":{"message":"Hello World!"}}"#,
        );
        for h in [None, Some(headers(&[("Nats-Msg-Id", "x")]))] {
            let event = decode(h.as_ref(), &payload).unwrap();
            assert_eq!(event.id(), "A234-1234-1234");
            assert_eq!(event.ty(), "com.example.sampletype1");
            assert_eq!(event.source(), "https://example.com/x");
            assert_eq!(
                event.extension("transactionid"),
                Some(&cloudevents::event::ExtensionValue::String("tid-1".into()))
            );
            assert_eq!(
                event.data(),
                Some(&Data::Binary(br#"{"message":"Hello World!"}"#.to_vec()))
            );
        }
    }

    #[test]
    fn decodes_sdk_go_binary_with_mixed_case_and_plain_content_type() {
        let h = headers(&[
            ("Ce-Specversion", "1.0"),
            ("Ce-Id", "abc"),
            ("CE-SOURCE", "/my source"),
            ("ce-type", "t.x"),
            ("Ce-Time", "2018-04-05T17:31:00.5+02:00"),
            // Spec attribute names match in any case; an extension's does not (see
            // `extension_names_must_be_lower_case_letters_and_digits`).
            ("ce-myext", "caf%c3%a9"),
            ("Content-Type", "application/json"),
        ]);
        let event = decode(Some(&h), &Bytes::from_static(br#"{"a":1}"#)).unwrap();
        assert_eq!(event.id(), "abc");
        assert_eq!(event.source(), "/my source");
        assert_eq!(event.datacontenttype(), Some("application/json"));
        assert_eq!(
            event.time().unwrap().to_rfc3339(),
            "2018-04-05T15:31:00.500+00:00"
        );
        assert_eq!(
            event.extension("myext"),
            Some(&cloudevents::event::ExtensionValue::String("café".into()))
        );
        assert_eq!(event.data(), Some(&Data::Binary(br#"{"a":1}"#.to_vec())));
    }

    #[test]
    fn ce_datacontenttype_wins_over_plain_content_type() {
        let h = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "s"),
            ("ce-type", "t"),
            ("ce-datacontenttype", "text/plain"),
            ("content-type", "application/json"),
        ]);
        let event = decode(Some(&h), &Bytes::from_static(b"hi")).unwrap();
        assert_eq!(event.datacontenttype(), Some("text/plain"));
        assert_eq!(event.data(), Some(&Data::String("hi".into())));
    }

    fn kind_of(h: Option<HeaderMap>, payload: &'static [u8]) -> DecodeErrorKind {
        let err = decode(h.as_ref(), &Bytes::from_static(payload)).unwrap_err();
        assert!(!err.to_string().is_empty());
        err.kind()
    }

    #[test]
    fn malformed_structured_messages_are_typed_errors() {
        use DecodeErrorKind::*;
        let ct = || Some(headers(&[("Content-Type", STRUCTURED_CONTENT_TYPE)]));
        assert_eq!(kind_of(ct(), b"not json"), NotJson);
        assert_eq!(kind_of(ct(), b"[1,2]"), NotJson);
        assert_eq!(kind_of(ct(), b"{\"id\":"), NotJson);
        let ct_params = headers(&[(
            "content-type",
            "Application/CloudEvents+json; charset=utf-8",
        )]);
        assert_eq!(kind_of(Some(ct_params), b"\xff"), NotJson);
        // No CloudEvents marker and not a JSON event: not a CloudEvent at all.
        assert_eq!(kind_of(None, b""), NotCloudEvent);
        assert_eq!(kind_of(None, b"[1,2]"), NotCloudEvent);
        assert_eq!(kind_of(None, b"{\"id\":"), NotCloudEvent);
        let plain = headers(&[("Content-Type", "text/plain")]);
        assert_eq!(kind_of(Some(plain), b"hello"), NotCloudEvent);
        assert_eq!(
            kind_of(ct(), br#"{"specversion":"1.0","source":"s","type":"t"}"#),
            MissingAttribute
        );
        assert_eq!(
            kind_of(ct(), br#"{"specversion":"1.0","id":"1","type":"t"}"#),
            MissingAttribute
        );
        assert_eq!(
            kind_of(ct(), br#"{"specversion":"1.0","id":"1","source":"s"}"#),
            MissingAttribute
        );
        assert_eq!(
            kind_of(ct(), br#"{"id":"1","source":"s","type":"t"}"#),
            MissingAttribute
        );
        assert_eq!(
            kind_of(
                ct(),
                br#"{"specversion":"9.9","id":"1","source":"s","type":"t"}"#
            ),
            UnknownSpecVersion
        );
        assert_eq!(
            kind_of(
                ct(),
                br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"yesterday"}"#
            ),
            InvalidAttribute
        );
        assert_eq!(
            kind_of(
                ct(),
                br#"{"specversion":"1.0","id":1,"source":"s","type":"t"}"#
            ),
            InvalidAttribute
        );
    }

    #[test]
    fn malformed_members_of_a_json_event_are_typed_errors() {
        use DecodeErrorKind::*;
        let event = |extra: &str| {
            Bytes::from(format!(
                r#"{{"specversion":"1.0","id":"1","source":"s","type":"t"{extra}}}"#
            ))
        };
        let kind = |extra: &str| decode(None, &event(extra)).unwrap_err().kind();
        assert_eq!(kind(r#","ext":1.5"#), InvalidAttribute);
        assert_eq!(kind(r#","ext":{"a":1}"#), InvalidAttribute);
        assert_eq!(kind(r#","subject":["x"]"#), InvalidAttribute);
        assert_eq!(kind(r#","source":"""#), InvalidAttribute);
        assert_eq!(kind(r#","dataschema":"not a url""#), InvalidAttribute);
        assert_eq!(
            kind(r#","datacontenttype":"text/plain","data":{"a":1}"#),
            InvalidAttribute
        );
        assert_eq!(kind(r#","data_base64":"!!!""#), InvalidAttribute);
        // null members are absent, as in the sdk.
        let ok = decode(None, &event(r#","subject":null,"data":null"#)).unwrap();
        assert_eq!(ok.subject(), None);
        assert_eq!(ok.data(), None);
    }

    fn binary(extra: &[(&str, &str)]) -> Option<HeaderMap> {
        let mut h = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "s"),
            ("ce-type", "t"),
        ]);
        for (n, v) in extra {
            h.insert(*n, *v);
        }
        Some(h)
    }

    #[test]
    fn malformed_binary_messages_are_typed_errors() {
        use DecodeErrorKind::*;
        assert!(decode(binary(&[]).as_ref(), &Bytes::from_static(b"x")).is_ok());
        let missing = |name: &str| {
            let mut h = binary(&[]).unwrap();
            let mut out = HeaderMap::new();
            for (n, vs) in h.iter() {
                if AsRef::<str>::as_ref(n) != name {
                    for v in vs {
                        out.append(n.clone(), v.clone());
                    }
                }
            }
            h = out;
            kind_of(Some(h), b"x")
        };
        assert_eq!(missing("ce-id"), MissingAttribute);
        assert_eq!(missing("ce-source"), MissingAttribute);
        assert_eq!(missing("ce-type"), MissingAttribute);
        assert_eq!(
            kind_of(binary(&[("ce-specversion", "2.0")]), b"x"),
            UnknownSpecVersion
        );
        assert_eq!(
            kind_of(binary(&[("ce-subject", "a%2")]), b"x"),
            InvalidPercentEncoding
        );
        assert_eq!(
            kind_of(binary(&[("ce-subject", "a%zz")]), b"x"),
            InvalidPercentEncoding
        );
        assert_eq!(
            kind_of(binary(&[("ce-myext", "%")]), b"x"),
            InvalidPercentEncoding
        );
        assert_eq!(
            kind_of(binary(&[("ce-subject", "%C3%28")]), b"x"),
            InvalidUtf8
        );
        assert_eq!(
            kind_of(binary(&[("ce-time", "not a time")]), b"x"),
            InvalidAttribute
        );
        assert_eq!(
            kind_of(binary(&[("ce-dataschema", "not a url")]), b"x"),
            InvalidAttribute
        );
    }

    #[test]
    fn values_not_percent_encoded_are_taken_as_they_are() {
        let event = decode(
            binary(&[("ce-subject", "a b \"c\" é")]).as_ref(),
            &Bytes::new(),
        )
        .unwrap();
        assert_eq!(event.subject(), Some("a b \"c\" é"));
        assert_eq!(event.data(), None);
    }

    #[test]
    fn bad_extension_name_is_an_encode_error_not_a_panic() {
        let mut event = full_event(None);
        event.set_extension("bad name:\r\n", "v");
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let err = encode(&event, mode).unwrap_err();
            assert_eq!(err.kind(), EncodeErrorKind::InvalidAttribute, "{mode:?}");
        }
    }

    /// What a receiver refuses is refused when sent, in both modes, with the receiver's words
    /// (before, it was sent, stored, and dead-lettered by every listener as `decode`).
    #[test]
    fn events_receivers_refuse_are_not_encoded() {
        use cloudevents::AttributesWriter;
        type Spoil = fn(&mut Event);
        let cases: [(&str, Spoil); 10] = [
            ("`id` is empty", |e| {
                e.set_id("");
            }),
            ("`type` is empty", |e| {
                e.set_type("");
            }),
            ("`source` is empty", |e| {
                e.set_source("");
            }),
            ("`subject` is empty", |e| {
                e.set_subject(Some(""));
            }),
            ("not an RFC 2046 media type", |e| {
                e.set_datacontenttype(Some("json"));
            }),
            ("extension `MyExt`", |e| {
                e.set_extension("MyExt", "v");
            }),
            (
                "extension `type`: the name of a CloudEvents attribute",
                |e| {
                    e.set_extension("type", "org.example.other");
                },
            ),
            ("extension `id`: the name of a CloudEvents attribute", |e| {
                e.set_extension("id", "");
            }),
            (
                "extension `data`: the name of a CloudEvents attribute",
                |e| {
                    e.set_extension("data", "x");
                },
            ),
            (
                "extension `schemaurl`: the name of a CloudEvents attribute",
                |e| {
                    e.set_extension("schemaurl", "x");
                },
            ),
        ];
        for (words, spoil) in cases {
            let mut event = full_event(None);
            spoil(&mut event);
            for mode in [ContentMode::Binary, ContentMode::Structured] {
                let err = encode(&event, mode).unwrap_err();
                assert_eq!(
                    err.kind(),
                    EncodeErrorKind::InvalidAttribute,
                    "{words} {mode:?}"
                );
                let text = err.to_string();
                assert!(
                    text.contains(words) && text.contains("receivers refuse"),
                    "{text}"
                );
            }
        }
        // The event each case spoils is sent as it is.
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let msg = encode(&full_event(None), mode).unwrap();
            decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
        }
    }

    #[test]
    fn control_characters_in_values_are_encoded() {
        let mut event = full_event(None);
        event.set_extension("ext", "line1\r\nline2\t\0");
        let msg = encode(&event, ContentMode::Binary).unwrap();
        assert_eq!(msg.headers.get("ce-ext"), Some("line1%0D%0Aline2%09%00"));
        assert_eq!(
            decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap(),
            event
        );
    }

    /// A 1.0 JSON event with the required attributes and `extra` members after them (a
    /// repeated member counts with its last value).
    fn json_event(extra: &str) -> Bytes {
        Bytes::from(format!(
            r#"{{"specversion":"1.0","id":"1","source":"s","type":"t"{extra}}}"#
        ))
    }

    /// The decode error of a structured message, or a panic naming the event that decoded.
    #[track_caller]
    fn refused(headers: Option<&HeaderMap>, payload: &Bytes) -> DecodeError {
        match decode(headers, payload) {
            Ok(event) => panic!("decoded, expected a refusal: {event}"),
            Err(e) => e,
        }
    }

    #[test]
    fn empty_id_type_and_subject_are_refused() {
        for (extra, name) in [
            (r#","id":"""#, "id"),
            (r#","type":"""#, "type"),
            (r#","subject":"""#, "subject"),
        ] {
            let err = refused(None, &json_event(extra));
            assert_eq!(err.kind(), DecodeErrorKind::InvalidAttribute, "{extra}");
            assert!(err.to_string().contains(&format!("`{name}`")), "{err}");
        }
        for (header, value) in [
            ("ce-id", ""),
            ("ce-type", ""),
            ("ce-subject", ""),
            ("ce-subject", "\"\""),
        ] {
            let err = refused(binary(&[(header, value)]).as_ref(), &Bytes::new());
            assert_eq!(err.kind(), DecodeErrorKind::InvalidAttribute, "{header}");
        }
        // Present and not empty: fine.
        let event = decode(None, &json_event(r#","subject":" ""#)).unwrap();
        assert_eq!(event.subject(), Some(" "));
    }

    #[test]
    fn datacontenttype_must_be_an_rfc_2046_media_type() {
        let refused_types = [
            "",
            "xyz",
            "text",
            "text/",
            "/plain",
            "text/plain/x",
            "text /plain",
            "text/ plain",
            " text/plain",
            "text/plain ",
            "text/pl ain",
            "text/plain; charset",
            "text/plain; =utf-8",
            "text/plain; charset=",
            "text/plain; charset=\"utf-8",
            "text/plain; charset=utf 8",
            "text/plain, text/html",
            "tëxt/plain",
            "text/plain\u{0}",
        ];
        let accepted_types = [
            "application/json",
            "Text/Plain",
            "application/vnd.example+json",
            "application/json; charset=utf-8",
            "text/plain;charset=utf-8",
            "text/plain ; charset=utf-8 ;format=flowed",
            "text/plain; charset=\"utf-8\"",
            "multipart/mixed; boundary=\"a b \\\" c\"",
            "application/json;",
            "application/x-www-form-urlencoded",
            "application/*",
        ];
        for ct in refused_types {
            let member = serde_json::to_string(ct).unwrap();
            let err = refused(
                None,
                &json_event(&format!(r#","datacontenttype":{member}"#)),
            );
            assert_eq!(err.kind(), DecodeErrorKind::InvalidAttribute, "{ct:?}");
            assert!(err.to_string().contains("datacontenttype"), "{err}");
            // `ce-` values are percent-encoded; a plain `Content-Type` is taken as it is.
            for (name, value) in [
                ("ce-datacontenttype", percent_encode(ct)),
                ("content-type", Cow::Borrowed(ct)),
            ] {
                let h = binary(&[(name, &value)]);
                let err = refused(h.as_ref(), &Bytes::new());
                assert_eq!(
                    err.kind(),
                    DecodeErrorKind::InvalidAttribute,
                    "{name}: {ct:?}"
                );
            }
        }
        for ct in accepted_types {
            let member = serde_json::to_string(ct).unwrap();
            let event = decode(
                None,
                &json_event(&format!(r#","datacontenttype":{member}"#)),
            )
            .unwrap_or_else(|e| panic!("{ct:?}: {e}"));
            assert_eq!(event.datacontenttype(), Some(ct));
            for (name, value) in [
                ("ce-datacontenttype", percent_encode(ct)),
                ("content-type", Cow::Borrowed(ct)),
            ] {
                let event = decode(binary(&[(name, &value)]).as_ref(), &Bytes::new())
                    .unwrap_or_else(|e| panic!("{name}: {ct:?}: {e}"));
                assert_eq!(event.datacontenttype(), Some(ct));
            }
        }
    }

    #[test]
    fn extension_names_must_be_lower_case_letters_and_digits() {
        for name in [
            "MyExtension",
            "my.extension",
            "my-ext",
            "my_ext",
            "myExt",
            "é",
            "",
        ] {
            let member = serde_json::to_string(name).unwrap();
            let err = refused(None, &json_event(&format!(r#",{member}:"bad""#)));
            assert_eq!(err.kind(), DecodeErrorKind::InvalidAttribute, "{name:?}");
            assert!(err.to_string().contains(&format!("`{name}`")), "{err}");
        }
        // A null member is absent, whatever its name (the JSON format's rule for null).
        assert!(decode(None, &json_event(r#","MyExtension":null"#)).is_ok());
        let event = decode(None, &json_event(r#","ext1":"ok","x":1"#)).unwrap();
        assert_eq!(
            event.extension("ext1"),
            Some(&ExtensionValue::String("ok".into()))
        );
        // Binary mode: the header name after `ce-` is the attribute name, not lower-cased.
        for header in [
            "ce-myExt",
            "Ce-Myext",
            "CE-MYEXT",
            "ce-my.ext",
            "ce-my-ext",
            "ce-my_ext",
        ] {
            let err = refused(binary(&[(header, "v")]).as_ref(), &Bytes::new());
            assert_eq!(err.kind(), DecodeErrorKind::InvalidAttribute, "{header}");
            assert!(err.to_string().contains(&header[3..]), "{err}");
        }
        // The `ce-` prefix is matched case-insensitively.
        for header in ["ce-myext", "CE-myext", "Ce-myext"] {
            let event = decode(binary(&[(header, "v")]).as_ref(), &Bytes::new()).unwrap();
            assert_eq!(
                event.extension("myext"),
                Some(&ExtensionValue::String("v".into())),
                "{header}"
            );
        }
    }

    #[test]
    fn spec_attribute_header_names_match_case_insensitively() {
        let h = headers(&[
            ("CE-SPECVERSION", "1.0"),
            ("Ce-Id", "abc"),
            ("ce-Source", "/s"),
            ("cE-tYPE", "t.x"),
            ("Ce-Subject", "sub"),
            ("Ce-Time", "2018-04-05T17:31:00Z"),
            ("Ce-DataSchema", "https://e.x/s"),
            ("Ce-DataContentType", "text/plain"),
        ]);
        let event = decode(Some(&h), &Bytes::from_static(b"hi")).unwrap();
        assert_eq!(event.id(), "abc");
        assert_eq!(event.source(), "/s");
        assert_eq!(event.ty(), "t.x");
        assert_eq!(event.subject(), Some("sub"));
        assert!(event.time().is_some());
        assert_eq!(
            event.dataschema().map(|u| u.as_str()),
            Some("https://e.x/s")
        );
        assert_eq!(event.datacontenttype(), Some("text/plain"));
        assert_eq!(event.iter_extensions().count(), 0);
    }

    #[test]
    fn a_cloudevents_content_type_decides_structured_mode() {
        let payload = json_event(r#","subject":"from the payload""#);
        for ct in [
            STRUCTURED_CONTENT_TYPE,
            "Application/CloudEvents+JSON; charset=utf-8",
        ] {
            let h = headers(&[
                ("Content-Type", ct),
                ("ce-specversion", "1.0"),
                ("ce-id", "header id"),
                ("ce-source", "h"),
                ("ce-type", "h"),
                ("ce-subject", "from a header"),
                // Not read in structured mode, so not an error either.
                ("ce-myExt", "x"),
            ]);
            let event = decode(Some(&h), &payload).unwrap_or_else(|e| panic!("{ct}: {e}"));
            assert_eq!(event.id(), "1");
            assert_eq!(event.subject(), Some("from the payload"));
            assert_eq!(event.iter_extensions().count(), 0);
            // And a structured payload that is not a JSON event is not taken as binary data.
            let err = refused(Some(&h), &Bytes::from_static(b"binary data"));
            assert_eq!(err.kind(), DecodeErrorKind::NotJson);
        }
    }

    #[test]
    fn double_quoted_header_values_are_unquoted() {
        let event = decode(
            binary(&[
                ("ce-specversion", "\"1.0\""),
                ("ce-id", "\"1\""),
                ("ce-subject", r#""a b \"c\" \\ d""#),
                // Unquoted first, then percent-decoded.
                ("ce-myext", "\"caf%C3%A9 x\""),
                (
                    "ce-datacontenttype",
                    "\"text/plain; charset=\\\"utf-8\\\"\"",
                ),
            ])
            .as_ref(),
            &Bytes::new(),
        )
        .unwrap();
        assert_eq!(event.id(), "1");
        assert_eq!(event.subject(), Some(r#"a b "c" \ d"#));
        assert_eq!(
            event.extension("myext"),
            Some(&ExtensionValue::String("café x".into()))
        );
        assert_eq!(
            event.datacontenttype(),
            Some("text/plain; charset=\"utf-8\"")
        );
        // Values that are not one quoted-string are taken as they are.
        for value in [r#""a" b"#, r#"a "b""#, "\"abc", "\"", r#""a\""#, r#""a"b""#] {
            let event = decode(binary(&[("ce-subject", value)]).as_ref(), &Bytes::new())
                .unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(event.subject(), Some(value));
        }
    }

    #[test]
    fn a_time_offset_keeps_its_instant_but_is_re_emitted_in_utc() {
        // cloudevents-sdk 0.9 holds `time` as `DateTime<Utc>`: the offset cannot be kept in
        // the event, only the instant (which is what the conformance project compares).
        let event = decode(
            None,
            &json_event(r#","time":"2018-04-05T18:31:00.5+01:00""#),
        )
        .unwrap();
        let expected = chrono::DateTime::parse_from_rfc3339("2018-04-05T17:31:00.5Z").unwrap();
        assert_eq!(
            event.time().copied(),
            Some(expected.with_timezone(&chrono::Utc))
        );
        let binary = encode(&event, ContentMode::Binary).unwrap();
        assert_eq!(
            binary.headers.get("ce-time"),
            Some("2018-04-05T17:31:00.500+00:00")
        );
    }

    /// The conformance project's "golden" sample events (its `format/README.md`), by sample id.
    fn conformance_sample(id: &str) -> Event {
        let minimal = || {
            EventBuilderV10::new()
                .id("minimal")
                .ty("io.cloudevents.test")
                .source("https://cloudevents.io")
        };
        let time = |text: &str| {
            chrono::DateTime::parse_from_rfc3339(text)
                .unwrap()
                .with_timezone(&chrono::Utc)
        };
        match id {
            "minimal" => minimal().build().unwrap(),
            "minimalWithTime" => minimal()
                .id("minimalWithTime")
                .time(time("2018-04-05T17:31:00Z"))
                .build()
                .unwrap(),
            "minimalWithRelativeSource" => minimal()
                .id("minimalWithRelativeSource")
                .source("#fragment")
                .build()
                .unwrap(),
            "allCore" => {
                let mut event = minimal()
                    .id("allCore")
                    .subject("tests")
                    .time(time("2018-04-05T17:31:00Z"))
                    .build()
                    .unwrap();
                cloudevents::AttributesWriter::set_datacontenttype(&mut event, Some("text/plain"));
                cloudevents::AttributesWriter::set_dataschema(
                    &mut event,
                    Some(url::Url::parse("https://cloudevents.io/dataschema").unwrap()),
                );
                event
            }
            // The README names this sample's id `simpleData`; the vector (and so this sample)
            // uses `simpleTextData`.
            "simpleTextData" => minimal()
                .id("simpleTextData")
                .data("text/plain", "Simple text")
                .build()
                .unwrap(),
            // Without extension definitions (which this library has no way to give), the
            // binary, timestamp, URI and URI-reference extensions are the strings of the JSON.
            "allExtensionTypes" => minimal()
                .id("allExtensionTypes")
                .extension("extinteger", 10i64)
                .extension("extboolean", true)
                .extension("extstring", "text")
                .extension("exturi", "https://cloudevents.io")
                .extension("exturiref", "//authority/path")
                .extension("exttimestamp", "2023-03-31T15:12:00Z")
                .extension("extbinary", "TWE=")
                .build()
                .unwrap(),
            other => panic!("no sample event `{other}`"),
        }
    }

    /// The conformance vectors of one file: (test id, sample id, event as JSON).
    fn conformance_vectors(file: &str) -> Vec<(String, Option<String>, serde_json::Value)> {
        let doc: serde_json::Value = serde_json::from_str(file).unwrap();
        let tests = doc["tests"].as_array().unwrap();
        assert!(!tests.is_empty());
        tests
            .iter()
            .map(|t| {
                (
                    t["id"].as_str().unwrap().to_owned(),
                    t["sampleId"].as_str().map(str::to_owned),
                    t["event"].clone(),
                )
            })
            .collect()
    }

    /// A JSON event as a binary-mode message (members as percent-encoded `ce-` headers,
    /// `data` as the payload); `None` when a member has no header form (a number that is not
    /// an integer, an object, an array, `data_base64`) or `data` is not a string.
    fn as_binary_message(event: &serde_json::Value) -> Option<(HeaderMap, Bytes)> {
        let mut h = HeaderMap::new();
        let mut payload = Bytes::new();
        for (name, value) in event.as_object()? {
            let text = match value {
                serde_json::Value::Null => continue,
                serde_json::Value::String(s) if name == "data" => {
                    payload = Bytes::from(s.clone());
                    continue;
                }
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Bool(b) => b.to_string(),
                // Headers carry no types: a number in a spec attribute has no binary form.
                serde_json::Value::Number(n)
                    if n.is_i64() && spec_attribute_name(name).is_none() =>
                {
                    n.to_string()
                }
                _ => return None,
            };
            if name == "data" || name == "data_base64" {
                return None;
            }
            let name: HeaderName = format!("ce-{name}").parse().ok()?;
            h.insert(name, percent_encode(&text).as_ref());
        }
        Some((h, payload))
    }

    const VALID_EVENTS: &str = include_str!("codec/testdata/valid-events.json");
    const INVALID_EVENTS: &str = include_str!("codec/testdata/invalid-events.json");

    // The vectors are copies of `format/json/{valid,invalid}-events.json` from
    // github.com/cloudevents/conformance (Apache-2.0); see `src/codec/testdata/README.md`.
    #[test]
    fn conformance_vectors_valid_events_decode_to_their_samples() {
        let vectors = conformance_vectors(VALID_EVENTS);
        assert_eq!(vectors.len(), 10);
        for (test, sample, event) in vectors {
            let expected = conformance_sample(&sample.unwrap());
            let payload = Bytes::from(serde_json::to_vec(&event).unwrap());
            let ct = headers(&[("Content-Type", STRUCTURED_CONTENT_TYPE)]);
            for h in [None, Some(&ct)] {
                let got = decode(h, &payload).unwrap_or_else(|e| panic!("{test}: {e}"));
                assert_eq!(got, expected, "{test}");
            }
            // In binary mode, extension values are strings (headers carry no type).
            let (h, payload) = as_binary_message(&event).unwrap();
            let got = decode(Some(&h), &payload).unwrap_or_else(|e| panic!("{test}: {e}"));
            let mut expected = expected;
            let typed: Vec<_> = expected
                .iter_extensions()
                .map(|(n, v)| (n.to_owned(), v.to_string()))
                .collect();
            for (name, text) in typed {
                expected.set_extension(&name, text);
            }
            assert_eq!(got, expected, "{test} (binary)");
        }
    }

    #[test]
    fn conformance_vectors_invalid_events_are_refused() {
        let vectors = conformance_vectors(INVALID_EVENTS);
        assert_eq!(vectors.len(), 25);
        let mut binary_cases = 0;
        let mut decoded = Vec::new();
        for (test, _, event) in vectors {
            let payload = Bytes::from(serde_json::to_vec(&event).unwrap());
            let ct = headers(&[("Content-Type", STRUCTURED_CONTENT_TYPE)]);
            for (h, mode) in [(None, "no Content-Type"), (Some(&ct), "structured")] {
                match decode(h, &payload) {
                    Ok(_) => decoded.push(format!("{test} ({mode})")),
                    Err(e) => assert!(!e.to_string().is_empty(), "{test}"),
                }
            }
            if let Some((h, payload)) = as_binary_message(&event) {
                binary_cases += 1;
                if decode(Some(&h), &payload).is_ok() {
                    decoded.push(format!("{test} (binary)"));
                }
            }
        }
        assert_eq!(decoded, Vec::<String>::new(), "invalid events decoded");
        // All but the numeric and object `id`, the fraction and `data` + `data_base64`.
        assert_eq!(binary_cases, 21);
    }

    mod prop {
        use super::*;
        use cloudevents::AttributesWriter;
        use proptest::prelude::*;

        fn header_name() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("ce-specversion".to_string()),
                Just("Ce-Id".to_string()),
                Just("ce-source".to_string()),
                Just("ce-type".to_string()),
                Just("ce-time".to_string()),
                Just("ce-dataschema".to_string()),
                Just("Content-Type".to_string()),
                "[a-zA-Z-]{1,12}",
                "ce-[a-z0-9]{1,8}",
            ]
        }

        fn header_value() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("1.0".to_string()),
                Just("0.3".to_string()),
                Just(STRUCTURED_CONTENT_TYPE.to_string()),
                Just("application/json".to_string()),
                "[^\r\n]{0,20}",
                "(%[0-9a-fA-F]{2}|%.?|[a-z ]){0,8}",
            ]
        }

        /// Same bytes, or the same JSON value when both parse as JSON.
        fn same_data(a: Option<Data>, b: Option<Data>) -> bool {
            let bytes = |d: Option<Data>| d.map(|d| Vec::<u8>::try_from(d).unwrap());
            let (a, b) = (bytes(a), bytes(b));
            let json = |v: &Option<Vec<u8>>| {
                v.as_ref()
                    .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
            };
            a == b || (json(&a).is_some() && json(&a) == json(&b))
        }

        /// Any 1.0 event: text attributes with any characters (control characters, quotes,
        /// non-ASCII), optional attributes, extensions of each type, and each kind of data.
        fn any_event() -> impl Strategy<Value = Event> {
            let text = || any::<String>().prop_filter("not empty", |s| !s.is_empty());
            let extension = (
                "[a-z][a-z0-9]{0,7}".prop_filter("not a 1.0 attribute or data member", |n| {
                    spec_attribute_name(n).is_none() && n != "data" && n != "data_base64"
                }),
                prop_oneof![
                    any::<String>().prop_map(ExtensionValue::String),
                    any::<bool>().prop_map(ExtensionValue::Boolean),
                    any::<i64>().prop_map(ExtensionValue::Integer),
                ],
            );
            let data = prop_oneof![
                Just(None),
                Just(Some((
                    "application/json",
                    Data::Json(json!({"a": [1, 2.5, null], "é": "x\u{1}"}))
                ))),
                any::<String>().prop_map(|t| Some(("text/plain", Data::String(t)))),
                proptest::collection::vec(any::<u8>(), 0..40)
                    .prop_map(|b| Some(("application/octet-stream", Data::Binary(b)))),
                // JSON text, as `decode` hands it out.
                Just(Some((
                    "application/json",
                    Data::Binary(br#" {"n": [1, "\u00e9"]} "#.to_vec())
                ))),
            ];
            (
                (text(), text(), text(), proptest::option::of(text())),
                proptest::option::of((-62_167_219_200i64..253_402_300_800, 0..1_000_000_000u32)),
                proptest::option::of(Just("https://example.com/schema?a=1")),
                proptest::collection::vec(extension, 0..4),
                data,
            )
                .prop_map(
                    |((id, source, ty, subject), time, schema, extensions, data)| {
                        let mut event = EventBuilderV10::new()
                            .id(id)
                            .source(source)
                            .ty(ty)
                            .build()
                            .unwrap();
                        event.set_subject(subject);
                        event.set_time(
                            time.and_then(|(s, n)| chrono::DateTime::from_timestamp(s, n)),
                        );
                        for (name, value) in extensions {
                            event.set_extension(&name, value);
                        }
                        if let Some((ct, data)) = data {
                            event.set_data(ct, data);
                            event.set_dataschema(schema.map(|s| url::Url::parse(s).unwrap()));
                        }
                        event
                    },
                )
        }

        /// A binary-mode message read the way a peer using the sdk reads it: each `ce-*`
        /// header percent-decoded (by this test's own decoder) and handed to the sdk's
        /// event builder, which parses `time` and the other typed attributes itself.
        struct SdkBinaryMessage(Vec<(String, String)>, Vec<u8>);

        impl BinaryDeserializer for SdkBinaryMessage {
            fn deserialize_binary<R: Sized, V: BinarySerializer<R>>(
                self,
                serializer: V,
            ) -> cloudevents::message::Result<R> {
                let mut serializer = serializer.set_spec_version(SpecVersion::V10)?;
                for (name, value) in self.0 {
                    match name.as_str() {
                        "specversion" => {}
                        n if SpecVersion::V10.attribute_names().contains(&n) => {
                            serializer = serializer
                                .set_attribute(n, MessageAttributeValue::String(value))?;
                        }
                        n => {
                            serializer =
                                serializer.set_extension(n, MessageAttributeValue::String(value))?
                        }
                    }
                }
                if self.1.is_empty() {
                    serializer.end()
                } else {
                    serializer.end_with_data(self.1)
                }
            }
        }

        fn test_percent_decode(value: &str) -> String {
            let bytes = value.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%' {
                    out.push(u8::from_str_radix(&value[i + 1..i + 3], 16).unwrap());
                    i += 3;
                } else {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
            String::from_utf8(out).unwrap()
        }

        /// The event with every extension as its text (binary mode carries them as text).
        fn extensions_as_text(event: &Event) -> Event {
            let mut event = event.clone();
            let extensions: Vec<(String, String)> = event
                .iter_extensions()
                .map(|(n, v)| (n.to_owned(), v.to_string()))
                .collect();
            for (name, value) in extensions {
                event.set_extension(&name, value);
            }
            event
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn decode_never_panics(
                hs in proptest::option::of(proptest::collection::vec((header_name(), header_value()), 0..8)),
                payload in prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..64),
                    "\\{\"(specversion|id|source|type|time|data|x)\":(\"1.0\"|1|null|\"[a-z%]{0,4}\"|\\{\\})(,\"(id|source|type|data|data_base64)\":\"[a-z0-9+/=]{0,6}\"){0,5}\\}"
                        .prop_map(String::into_bytes),
                ],
            ) {
                let headers = hs.map(|pairs| {
                    let mut h = HeaderMap::new();
                    for (n, v) in pairs {
                        if let (Ok(n), Ok(v)) = (n.parse::<HeaderName>(), v.parse::<HeaderValue>()) {
                            h.append(n, v);
                        }
                    }
                    h
                });
                let payload = Bytes::from(payload);
                let decoded = decode(headers.as_ref(), &payload);
                // (cloudevents-sdk's 0.3 JSON format cannot carry binary data without a JSON
                // content type back, so the round trip is checked for 1.0 events.)
                if let Some(event) = decoded.ok().filter(|e| e.specversion() == SpecVersion::V10) {
                    // Whatever decodes re-encodes and decodes to the same event.
                    // (Data without a content type may come back as JSON: the JSON event
                    // format defaults `datacontenttype` to application/json.)
                    for mode in [ContentMode::Structured, ContentMode::Binary] {
                        let Ok(msg) = encode(&event, mode) else { continue };
                        let mut back = decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
                        let mut expected = event.clone();
                        let (_, _, back_data) = back.take_data();
                        let (_, _, data) = expected.take_data();
                        prop_assert_eq!(back, expected);
                        prop_assert!(same_data(back_data, data));
                    }
                }
            }

            #[test]
            fn structured_decode_agrees_with_the_sdk_decoder(
                // Usually a valid 1.0 event to start with, so that most cases decode; the
                // random members after it override or add to it.
                valid_start in proptest::bool::weighted(0.8),
                members in proptest::collection::vec(
                    (
                        prop_oneof![
                            Just("specversion"), Just("id"), Just("source"), Just("type"),
                            Just("time"), Just("subject"), Just("dataschema"),
                            Just("datacontenttype"), Just("data"), Just("data_base64"),
                            Just("ext"), Just("other"),
                        ],
                        prop_oneof![
                            Just(r#""1.0""#), Just(r#""0.3""#), Just(r#""x y""#), Just("null"),
                            Just("1"), Just("true"), Just("1.5"), Just("{\"a\":[1]}"),
                            Just(r#""2024-01-02T03:04:05.678Z""#), Just(r#""https://e.x/s""#),
                            Just(r#""application/json""#), Just(r#""text/plain""#),
                            Just(r#""aGk=""#), Just(r#""caf\u00e9""#),
                        ],
                    ),
                    0..10,
                ),
            ) {
                let start = [r#""specversion":"1.0""#, r#""id":"i""#, r#""source":"s""#, r#""type":"t""#];
                let body: Vec<String> = start
                    .iter()
                    .filter(|_| valid_start)
                    .map(|m| m.to_string())
                    .chain(members.iter().map(|(k, v)| format!("\"{k}\":{v}")))
                    .collect();
                let payload = Bytes::from(format!("{{{}}}", body.join(",")));
                let sdk = serde_json::from_slice::<Event>(&payload);
                let ours = decode(None, &payload);
                match (sdk, ours) {
                    // The same event; JSON data compared as JSON values (ours keeps the text).
                    // One known difference: the sdk reads `"data":null` as JSON null data, ours
                    // as no data (like every other null member).
                    // (Spec 0.3 goes through the sdk's decoder, so it has the null data too.)
                    (Ok(sdk), Ok(ours)) => {
                        let (sdk, mut sdk_data) = comparable(&sdk);
                        let (ours, mut our_data) = comparable(&ours);
                        let null = Some(ComparableData::Json(serde_json::Value::Null));
                        for data in [&mut sdk_data, &mut our_data] {
                            if *data == null {
                                *data = None;
                            }
                        }
                        prop_assert_eq!((ours, our_data), (sdk, sdk_data))
                    }
                    (Err(_), Err(_)) => {}
                    // What the spec requires beyond the event's shape, which the sdk's
                    // decoder does not check (`check_event`: e.g. a `datacontenttype` that is
                    // not a media type).
                    (Ok(sdk), Err(ours))
                        if ours.kind() == DecodeErrorKind::InvalidAttribute
                            && check_event(&sdk).is_err() => {}
                    // The other: to us a null `data` or `data_base64` is absent, where the sdk
                    // rejects `"data_base64":null`, both members present, and `"data":null`
                    // with a content type that is not JSON.
                    (Err(_), Ok(_))
                        if serde_json::from_slice::<serde_json::Value>(&payload).is_ok_and(|v| {
                                ["data", "data_base64"]
                                    .iter()
                                    .any(|m| v.get(m) == Some(&serde_json::Value::Null))
                            }) => {}
                    (sdk, ours) => prop_assert!(false, "sdk {:?} ours {:?} for {:?}", sdk, ours, payload),
                }
            }

            #[test]
            fn json_strings_are_escaped_as_serde_json_escapes_them(
                text in prop_oneof![any::<String>(), "([\\x00-\\x1f\"\\\\]|[a-z]{0,9}|\\PC){0,40}"],
            ) {
                let mut out = Vec::new();
                write_json_str(&mut out, &text);
                prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&text).unwrap());
            }

            #[test]
            fn time_is_written_as_chrono_writes_it(
                secs in prop_oneof![
                    // Years 0-9999 (the fast path), then any year chrono can hold.
                    -62_167_219_200i64..253_402_300_800,
                    -8_000_000_000_000i64..8_000_000_000_000,
                ],
                nanos in prop_oneof![
                    Just(0u32),
                    (0..1_000u32).prop_map(|ms| ms * 1_000_000),
                    (0..1_000_000u32).prop_map(|us| us * 1_000),
                    0..1_000_000_000u32,
                    // Leap seconds (valid only at :59, else skipped).
                    1_000_000_000..2_000_000_000u32,
                ],
            ) {
                if let Some(time) = chrono::DateTime::from_timestamp(secs, nanos) {
                    prop_assert_eq!(format_time(&time), time.to_rfc3339());
                }
            }

            #[test]
            fn time_is_read_as_chrono_reads_it(
                text in prop_oneof![
                    "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,11})?(Z|z|\\+00:00|-00:00|\\+01:30)?",
                    "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-4]):[0-5][0-9]:([0-5][0-9]|60)(\\.[0-9]{1,10})?(Z|\\+00:00)",
                    (-62_167_219_200i64..253_402_300_800, 0..1_000_000_000u32).prop_map(|(s, n)| {
                        let time = chrono::DateTime::from_timestamp(s, n).unwrap_or_default();
                        if n % 2 == 0 {
                            time.to_rfc3339()
                        } else {
                            time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                        }
                    }),
                    ".{0,30}",
                ],
            ) {
                let chrono = chrono::DateTime::parse_from_rfc3339(&text)
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .ok();
                prop_assert_eq!(parse_time(&text).ok(), chrono, "{}", text);
            }

            #[test]
            fn a_quoted_header_value_reads_as_the_text_it_quotes(
                // Any text but `%` (percent-decoding follows the unquoting) and CR/LF (not
                // allowed in a header value), with quotes and backslashes likely.
                text in "([^%\r\n]|\"|\\\\){1,24}",
                escape_all in any::<bool>(),
            ) {
                let mut quoted = String::from("\"");
                for c in text.chars() {
                    // RFC 7230 lets any character be escaped; `"` and `\` must be.
                    if escape_all || c == '"' || c == '\\' {
                        quoted.push('\\');
                    }
                    quoted.push(c);
                }
                quoted.push('"');
                let h = binary(&[("ce-subject", &quoted)]);
                let event = decode(h.as_ref(), &Bytes::new());
                let subject = event.map(|e| e.subject().map(str::to_owned)).map_err(|e| e.to_string());
                prop_assert_eq!(subject, Ok(Some(text)));
            }

            #[test]
            fn any_text_values_round_trip_in_binary_mode(
                // (An empty `subject` is refused on receive: present means not empty.)
                id in "\\PC{1,16}", subject in ".{1,24}", ext in any::<String>(),
                data in proptest::collection::vec(any::<u8>(), 0..32),
            ) {
                let event = EventBuilderV10::new()
                    .id(id)
                    .source("s")
                    .ty("t")
                    .subject(subject)
                    .extension("ext", ext)
                    .data("application/octet-stream", data.clone())
                    .build()
                    .unwrap();
                let msg = encode(&event, ContentMode::Binary).unwrap();
                let back = decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
                if data.is_empty() {
                    prop_assert_eq!(back.data(), None);
                } else {
                    prop_assert_eq!(back, event);
                }
            }

            #[test]
            fn structured_encode_is_what_the_sdk_serializer_writes_and_the_sdk_reads_it_back(
                event in any_event(),
            ) {
                let msg = encode(&event, ContentMode::Structured).unwrap();
                // A peer decoding with the sdk's serde reads the same event.
                let sdk: Event = serde_json::from_slice(&msg.payload).unwrap();
                prop_assert_eq!(comparable(&sdk), comparable(&event));
                // Byte for byte what the sdk's serializer writes (the extensions come from the
                // same map, so in the same order), but for JSON text data, which the sdk
                // would write as `data_base64`.
                let json_text = matches!(event.data(), Some(Data::Binary(_)))
                    && event.datacontenttype() == Some("application/json");
                if !json_text {
                    prop_assert_eq!(
                        String::from_utf8(msg.payload.to_vec()).unwrap(),
                        serde_json::to_string(&event).unwrap()
                    );
                }
                // And ours reads it back.
                let back = decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
                assert_same_event(&back, &event);
            }

            #[test]
            fn binary_encode_is_read_back_by_the_sdk_event_builder(event in any_event()) {
                let msg = encode(&event, ContentMode::Binary).unwrap();
                let headers: Vec<(String, String)> = msg
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        let attr = name.strip_prefix("ce-").unwrap().to_owned();
                        (attr, test_percent_decode(value))
                    })
                    .collect();
                let sdk = BinaryDeserializer::into_event(SdkBinaryMessage(headers, msg.payload.to_vec()))
                    .unwrap();
                let expected = extensions_as_text(&event);
                let (sdk_attributes, sdk_data) = comparable(&sdk);
                let (attributes, data) = comparable(&expected);
                prop_assert_eq!(sdk_attributes, attributes);
                // The sdk's binary route keeps every payload as bytes.
                let bytes = |d: Option<ComparableData>| match d {
                    None => None,
                    Some(ComparableData::Json(v)) => Some(serde_json::to_vec(&v).unwrap()),
                    Some(ComparableData::Other(d)) => Some(Vec::<u8>::try_from(d).unwrap()),
                };
                let sdk_bytes = bytes(sdk_data);
                let our_bytes = bytes(data);
                let same = sdk_bytes == our_bytes
                    || sdk_bytes.as_deref().and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                        == our_bytes.as_deref().and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                    || (sdk_bytes.is_none() && our_bytes.as_deref() == Some(&[][..]));
                prop_assert!(same, "{:?} vs {:?}", sdk_bytes, our_bytes);
                let back = decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
                let (back_attributes, _) = comparable(&back);
                prop_assert_eq!(back_attributes, comparable(&expected).0);
            }
        }
    }
}
