//! The encode side's cheap parts: [`EncodedHeaders`], the headers of an encoded event in a
//! compact form (static names, values in one string) that becomes async-nats' `HeaderMap` only
//! where a message is sent; the binary-mode `ce-*` headers written into it; and a writer for
//! `serde_json::Value` data that writes what `serde_json::to_writer` writes, without serde's
//! serializer machinery.
use std::borrow::Cow;
use std::fmt;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use cloudevents::event::{AttributeValue, Data, ExtensionValue, SpecVersion};
use cloudevents::{AttributesReader, Event};
use serde_json::Value;

use super::{
    check_outgoing_extension, format_time_into, is_unreserved, write_integer, write_json_str,
    EncodedEvent, TimeSuffix, CE_PREFIX, STRUCTURED_CONTENT_TYPE, TIME_CAPACITY,
};
use crate::error::{EncodeError, EncodeErrorKind, Error};

/// The headers of an encoded event: what [`encode`](super::encode) puts beside the payload.
///
/// Held in a compact form (names this library knows are static, values share one string), so
/// encoding allocates twice for all headers (not at all in structured mode) instead of a hash
/// table, and a `Vec` and a `String` per header, as async-nats' [`HeaderMap`] does. Convert it
/// with [`to_header_map`](Self::to_header_map) or `HeaderMap::from` where a NATS message is
/// built (that conversion costs what building the map costs); read it with [`get`](Self::get)
/// and [`iter`](Self::iter). Names and values are as they go on the wire (binary-mode values
/// percent-encoded).
///
/// Equality does not depend on the order of the headers.
///
/// # Examples
///
/// ```
/// use ce_messaging::codec::{encode, ContentMode, HeaderMap};
/// let event = ce_messaging::cloudevent::new_event("t", "s", &1)?;
/// let msg = encode(&event, ContentMode::Binary)?;
/// assert_eq!(msg.headers.get("ce-type"), Some("t"));
/// assert!(msg.headers.iter().any(|(name, value)| name == "ce-source" && value == "s"));
/// let headers: HeaderMap = msg.headers.into();
/// assert_eq!(headers.get("ce-type").map(|v| v.as_str()), Some("t"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct EncodedHeaders {
    /// The values (and the names that are not static), one after another.
    text: String,
    /// Name and value of each header, in the order written.
    entries: Cow<'static, [Entry]>,
}

/// One header: its name and its value.
#[derive(Clone, Copy, Debug)]
struct Entry {
    name: Name,
    value: Text,
}

/// A header name: one this library writes on most events (static, and a constant
/// [`HeaderName`] when converted), or any other, held in [`EncodedHeaders::text`].
#[derive(Clone, Copy, Debug)]
enum Name {
    Known(KnownName),
    Span(Span),
}

/// A header value: static, or held in [`EncodedHeaders::text`].
#[derive(Clone, Copy, Debug)]
enum Text {
    Static(&'static str),
    Span(Span),
}

/// A range of [`EncodedHeaders::text`].
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    end: usize,
}

/// The header names this library writes on most events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KnownName {
    ContentType,
    SpecVersion,
    Id,
    Source,
    Type,
    DataContentType,
    DataSchema,
    Subject,
    Time,
    TransactionId,
    TraceParent,
    TraceState,
}

/// The headers of a structured-mode message: `Content-Type: application/cloudevents+json`.
static STRUCTURED_HEADERS: [Entry; 1] = [Entry {
    name: Name::Known(KnownName::ContentType),
    value: Text::Static(STRUCTURED_CONTENT_TYPE),
}];

// The names as constant `HeaderName`s: a conversion clones a static one instead of matching
// the text against async-nats' standard headers at run time.
const H_CONTENT_TYPE: HeaderName = HeaderName::from_static("Content-Type");
const H_SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");
const H_ID: HeaderName = HeaderName::from_static("ce-id");
const H_SOURCE: HeaderName = HeaderName::from_static("ce-source");
const H_TYPE: HeaderName = HeaderName::from_static("ce-type");
const H_DATACONTENTTYPE: HeaderName = HeaderName::from_static("ce-datacontenttype");
const H_DATASCHEMA: HeaderName = HeaderName::from_static("ce-dataschema");
const H_SUBJECT: HeaderName = HeaderName::from_static("ce-subject");
const H_TIME: HeaderName = HeaderName::from_static("ce-time");
const H_TRANSACTIONID: HeaderName = HeaderName::from_static("ce-transactionid");
const H_TRACEPARENT: HeaderName = HeaderName::from_static("ce-traceparent");
const H_TRACESTATE: HeaderName = HeaderName::from_static("ce-tracestate");

impl KnownName {
    /// The known name of the `ce-` header for the attribute or extension `name`.
    fn of_attribute(name: &str) -> Option<Self> {
        Some(match name {
            "specversion" => Self::SpecVersion,
            "id" => Self::Id,
            "source" => Self::Source,
            "type" => Self::Type,
            "datacontenttype" => Self::DataContentType,
            "dataschema" => Self::DataSchema,
            "subject" => Self::Subject,
            "time" => Self::Time,
            "transactionid" => Self::TransactionId,
            "traceparent" => Self::TraceParent,
            "tracestate" => Self::TraceState,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::ContentType => "Content-Type",
            Self::SpecVersion => "ce-specversion",
            Self::Id => "ce-id",
            Self::Source => "ce-source",
            Self::Type => "ce-type",
            Self::DataContentType => "ce-datacontenttype",
            Self::DataSchema => "ce-dataschema",
            Self::Subject => "ce-subject",
            Self::Time => "ce-time",
            Self::TransactionId => "ce-transactionid",
            Self::TraceParent => "ce-traceparent",
            Self::TraceState => "ce-tracestate",
        }
    }

    fn header_name(self) -> HeaderName {
        match self {
            Self::ContentType => H_CONTENT_TYPE,
            Self::SpecVersion => H_SPECVERSION,
            Self::Id => H_ID,
            Self::Source => H_SOURCE,
            Self::Type => H_TYPE,
            Self::DataContentType => H_DATACONTENTTYPE,
            Self::DataSchema => H_DATASCHEMA,
            Self::Subject => H_SUBJECT,
            Self::Time => H_TIME,
            Self::TransactionId => H_TRANSACTIONID,
            Self::TraceParent => H_TRACEPARENT,
            Self::TraceState => H_TRACESTATE,
        }
    }
}

impl EncodedHeaders {
    /// The headers of a structured-mode message (no allocation).
    pub(super) fn structured() -> Self {
        Self {
            text: String::new(),
            entries: Cow::Borrowed(&STRUCTURED_HEADERS),
        }
    }

    /// The value of the header `name` (compared exactly, as [`HeaderMap::get`] does).
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::codec::{encode, ContentMode};
    /// let event = ce_messaging::cloudevent::new_event("t", "s", &1)?;
    /// let msg = encode(&event, ContentMode::Structured)?;
    /// assert_eq!(msg.headers.get("Content-Type"), Some("application/cloudevents+json"));
    /// assert_eq!(msg.headers.get("ce-type"), None);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The headers as (name, value), in the order they were written.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::codec::{encode, ContentMode};
    /// let event = ce_messaging::cloudevent::new_event("t", "s", &1)?;
    /// let msg = encode(&event, ContentMode::Binary)?;
    /// assert!(msg.headers.iter().all(|(name, _)| name.starts_with("ce-")));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.entries
            .iter()
            .map(|entry| (self.name(entry.name), self.text(entry.value)))
    }

    /// The number of headers.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::codec::{encode, ContentMode};
    /// let event = ce_messaging::cloudevent::new_event("t", "s", &1)?;
    /// assert_eq!(encode(&event, ContentMode::Structured)?.headers.len(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no headers (never the case for an encoded event).
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::codec::{encode, ContentMode};
    /// let event = ce_messaging::cloudevent::new_event("t", "s", &1)?;
    /// assert!(!encode(&event, ContentMode::Binary)?.headers.is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The headers as async-nats' [`HeaderMap`], to send them.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::codec::{encode, ContentMode};
    /// let event = ce_messaging::cloudevent::new_event("t", "s", &1)?;
    /// let msg = encode(&event, ContentMode::Binary)?;
    /// let headers = msg.headers.to_header_map();
    /// assert_eq!(headers.get("ce-source").map(|v| v.as_str()), Some("s"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn to_header_map(&self) -> HeaderMap {
        if let Cow::Borrowed(entries) = &self.entries {
            if std::ptr::eq(*entries, &STRUCTURED_HEADERS[..]) {
                // Cloned from one built once: a clone allocates what a build does but hashes
                // nothing.
                static STRUCTURED_MAP: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
                return STRUCTURED_MAP
                    .get_or_init(|| Self::structured().build_header_map())
                    .clone();
            }
        }
        self.build_header_map()
    }

    fn build_header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for entry in self.entries.iter() {
            let name = match entry.name {
                Name::Known(known) => known.header_name(),
                Name::Span(span) => match HeaderName::try_from(&self.text[span.start..span.end]) {
                    Ok(name) => name,
                    // Unreachable: `push_name` admits only names async-nats accepts.
                    Err(_) => continue,
                },
            };
            let value = match entry.value {
                // Invariant (both arms): values are static constants or percent-encoded text
                // (bytes U+0021..U+007E), without the CR/LF `HeaderValue::from` refuses.
                Text::Static(text) => HeaderValue::from(text),
                Text::Span(span) => HeaderValue::from(&self.text[span.start..span.end]),
            };
            map.insert(name, value);
        }
        map
    }

    fn name(&self, name: Name) -> &str {
        match name {
            Name::Known(known) => known.as_str(),
            Name::Span(span) => &self.text[span.start..span.end],
        }
    }

    fn text(&self, text: Text) -> &str {
        match text {
            Text::Static(text) => text,
            Text::Span(span) => &self.text[span.start..span.end],
        }
    }
}

impl From<EncodedHeaders> for HeaderMap {
    fn from(headers: EncodedHeaders) -> Self {
        headers.to_header_map()
    }
}

impl From<&EncodedHeaders> for HeaderMap {
    fn from(headers: &EncodedHeaders) -> Self {
        headers.to_header_map()
    }
}

impl PartialEq for EncodedHeaders {
    /// The same headers with the same values, in any order.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .iter()
                .all(|(name, value)| other.iter().any(|pair| pair == (name, value)))
    }
}

impl Eq for EncodedHeaders {}

impl fmt::Debug for EncodedHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Builds the headers of a binary-mode message.
struct HeaderWriter {
    text: String,
    entries: Vec<Entry>,
}

impl HeaderWriter {
    fn with_capacity(headers: usize, text: usize) -> Self {
        Self {
            text: String::with_capacity(text),
            entries: Vec::with_capacity(headers),
        }
    }

    /// Adds a known header with a static value.
    fn push_static(&mut self, name: KnownName, value: &'static str) {
        self.entries.push(Entry {
            name: Name::Known(name),
            value: Text::Static(value),
        });
    }

    /// Adds a known header with the percent-encoded `value`.
    fn push_known(&mut self, name: KnownName, value: &str) {
        self.push_value(Name::Known(name), value);
    }

    /// Adds `ce-<name>` with the percent-encoded `value`.
    fn push(&mut self, name: &str, value: &str) -> Result<(), EncodeError> {
        let name = self.push_name(name)?;
        self.push_value(name, value);
        Ok(())
    }

    fn push_value(&mut self, name: Name, value: &str) {
        let start = self.text.len();
        percent_encode_into(&mut self.text, value);
        let value = Text::Span(Span {
            start,
            end: self.text.len(),
        });
        self.entries.push(Entry { name, value });
    }

    /// The header name for the attribute or extension `name`: a known one, or `ce-<name>`
    /// added to the text when async-nats accepts it as a header name.
    fn push_name(&mut self, name: &str) -> Result<Name, EncodeError> {
        if let Some(known) = KnownName::of_attribute(name) {
            return Ok(Name::Known(known));
        }
        // async-nats' rule for a header name: ASCII graphic characters except `:`.
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(Error::with_detail(
                EncodeErrorKind::InvalidHeader,
                format!("`{name}` cannot be a NATS header name"),
            ));
        }
        let start = self.text.len();
        self.text.push_str(CE_PREFIX);
        self.text.push_str(name);
        Ok(Name::Span(Span {
            start,
            end: self.text.len(),
        }))
    }

    fn finish(self) -> EncodedHeaders {
        EncodedHeaders {
            text: self.text,
            entries: Cow::Owned(self.entries),
        }
    }
}

/// Encodes an event in binary mode: every attribute and extension a percent-encoded `ce-`
/// header (`time` as chrono's `to_rfc3339` writes it, as the sdk does), the data the payload.
pub(super) fn encode_binary(event: &Event) -> Result<EncodedEvent, EncodeError> {
    // Attributes, the usual few extensions, and room for their values.
    let mut headers = HeaderWriter::with_capacity(12, 192);
    match event.specversion() {
        // The 1.0 attributes through their getters, in the sdk's order, under their known names.
        SpecVersion::V10 => {
            headers.push_static(KnownName::SpecVersion, "1.0");
            headers.push_known(KnownName::Id, event.id());
            headers.push_known(KnownName::Type, event.ty());
            headers.push_known(KnownName::Source, event.source().as_str());
            if let Some(ct) = event.datacontenttype() {
                headers.push_known(KnownName::DataContentType, ct);
            }
            if let Some(schema) = event.dataschema() {
                headers.push_known(KnownName::DataSchema, schema.as_str());
            }
            if let Some(subject) = event.subject() {
                headers.push_known(KnownName::Subject, subject);
            }
            if let Some(time) = event.time() {
                push_time(&mut headers, "time", time)?;
            }
        }
        SpecVersion::V03 => {
            headers.push_static(KnownName::SpecVersion, "0.3");
            for (name, value) in event.iter_attributes() {
                match value {
                    AttributeValue::SpecVersion(_) => {}
                    AttributeValue::String(text) => headers.push(name, text)?,
                    AttributeValue::URIRef(text) => headers.push(name, text.as_str())?,
                    AttributeValue::URI(url) => headers.push(name, url.as_str())?,
                    AttributeValue::Time(time) => push_time(&mut headers, name, time)?,
                    other => headers.push(name, &other.to_string())?,
                }
            }
        }
    }
    for (name, value) in event.iter_extensions() {
        check_outgoing_extension(name)?;
        match value {
            ExtensionValue::String(text) => headers.push(name, text)?,
            other => headers.push(name, &other.to_string())?,
        }
    }
    let payload = match event.data() {
        None => Bytes::new(),
        Some(Data::Binary(bytes)) => Bytes::copy_from_slice(bytes),
        Some(Data::String(text)) => Bytes::copy_from_slice(text.as_bytes()),
        Some(Data::Json(value)) => {
            let mut out = Vec::with_capacity(128);
            write_json_value(&mut out, value)?;
            Bytes::from(out)
        }
    };
    Ok(EncodedEvent {
        headers: headers.finish(),
        payload,
    })
}

/// Adds the `time` attribute `name` as chrono's `to_rfc3339` writes it (the sdk's form).
fn push_time(
    headers: &mut HeaderWriter,
    name: &str,
    time: &chrono::DateTime<chrono::Utc>,
) -> Result<(), EncodeError> {
    let mut buf = [0u8; TIME_CAPACITY];
    match format_time_into(&mut buf, time, TimeSuffix::Offset)
        .and_then(|len| std::str::from_utf8(&buf[..len]).ok())
    {
        Some(text) => headers.push(name, text),
        None => headers.push(name, &time.to_rfc3339()),
    }
}

/// Appends `value` percent-encoded per the contract (space, `"`, `%` and every byte outside
/// U+0021..U+007E, upper-case hex); a value with nothing to encode is one copy, checked
/// eight bytes at a time.
fn percent_encode_into(out: &mut String, value: &str) {
    let bytes = value.as_bytes();
    if all_unreserved(bytes) {
        out.push_str(value);
        return;
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.reserve(value.len() + 8);
    for &b in bytes {
        if is_unreserved(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0F)]));
        }
    }
}

/// Whether every byte of `bytes` goes into a header value as it is: whole words of eight
/// bytes, then the last eight bytes again (overlapping) or, for a value shorter than that,
/// each byte.
fn all_unreserved(bytes: &[u8]) -> bool {
    let word = |chunk: &[u8]| {
        // Invariant: callers pass eight-byte chunks.
        u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]))
    };
    let mut chunks = bytes.chunks_exact(8);
    if !chunks.all(|chunk| word_is_unreserved(word(chunk))) {
        return false;
    }
    match bytes.len() {
        0..8 => bytes.iter().all(|&b| is_unreserved(b)),
        len if len % 8 == 0 => true,
        len => word_is_unreserved(word(&bytes[len - 8..])),
    }
}

/// Whether all eight bytes of `word` go into a header value as they are ([`is_unreserved`]:
/// U+0021..U+007E except `"` and `%`). Exact: the "has a byte less than n" test (n <= 128)
/// and the "has a zero byte" test.
fn word_is_unreserved(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let high = word & HIGH;
    let below = word.wrapping_sub(ONES * 0x21) & !word & HIGH;
    let delete = has_zero(word ^ (ONES * 0x7F));
    let quote = has_zero(word ^ (ONES * u64::from(b'"')));
    let percent = has_zero(word ^ (ONES * u64::from(b'%')));
    (high | below | delete | quote | percent) == 0
}

/// Appends `value` as compact JSON, byte for byte what `serde_json::to_writer` writes (strings
/// escaped as serde_json escapes them, integers in decimal, other numbers through serde_json),
/// without serde's serializer calls.
pub(super) fn write_json_value(out: &mut Vec<u8>, value: &Value) -> Result<(), EncodeError> {
    match value {
        Value::Array(items) => {
            out.push(b'[');
            let mut first = true;
            for item in items {
                if !first {
                    out.push(b',');
                }
                first = false;
                write_json_member(out, item)?;
            }
            out.push(b']');
        }
        Value::Object(members) => {
            out.push(b'{');
            let mut first = true;
            for (name, member) in members {
                if !first {
                    out.push(b',');
                }
                first = false;
                write_json_str(out, name);
                out.push(b':');
                write_json_member(out, member)?;
            }
            out.push(b'}');
        }
        leaf => write_json_member(out, leaf)?,
    }
    Ok(())
}

/// [`write_json_value`] for a member or element: strings, numbers, booleans and null written
/// here without a call, arrays and objects through [`write_json_value`].
#[inline(always)]
fn write_json_member(out: &mut Vec<u8>, value: &Value) -> Result<(), EncodeError> {
    match value {
        Value::String(text) => write_json_str(out, text),
        Value::Number(number) => {
            if let Some(n) = number.as_u64() {
                write_u64(out, n);
            } else if let Some(n) = number.as_i64() {
                write_integer(out, n);
            } else {
                serde_json::to_writer(&mut *out, number)
                    .map_err(|e| Error::with_source(EncodeErrorKind::Serialize, e))?;
            }
        }
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Null => out.extend_from_slice(b"null"),
        Value::Array(_) | Value::Object(_) => write_json_value(out, value)?,
    }
    Ok(())
}

/// Appends an unsigned integer in decimal.
pub(super) fn write_u64(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    out.extend_from_slice(crate::headers::decimal(n, &mut digits).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudevent::new_event;
    use crate::codec::{decode, encode, ContentMode};
    use cloudevents::AttributesWriter;
    use proptest::prelude::*;
    use serde_json::json;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[ -~\u{0}-\u{1f}\u{7f}é€😀]{0,40}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The data writer writes exactly what serde_json writes.
        #[test]
        fn json_value_is_written_as_serde_json_writes_it(value in json_value()) {
            let mut ours = Vec::new();
            write_json_value(&mut ours, &value).unwrap();
            prop_assert_eq!(ours, serde_json::to_vec(&value).unwrap());
        }

        /// Strings of every length, mostly printable ASCII with the odd byte to escape, are
        /// written as serde_json writes them (the word checks and the overlapping last word).
        #[test]
        fn json_strings_are_written_as_serde_json_writes_them(text in "[ -~\t\n\u{1}\u{7f}é]{0,40}") {
            let mut ours = Vec::new();
            super::super::write_json_str(&mut ours, &text);
            prop_assert_eq!(ours, serde_json::to_vec(&text).unwrap());
        }

        /// The word checks of header values agree with the byte check, at every length.
        #[test]
        fn header_values_are_checked_as_byte_by_byte(text in "[ -~é]{0,40}") {
            prop_assert_eq!(all_unreserved(text.as_bytes()), text.bytes().all(is_unreserved));
            let mut out = String::new();
            percent_encode_into(&mut out, &text);
            prop_assert_eq!(out, super::super::percent_encode(&text).into_owned());
        }

        /// The word test agrees with the byte test on every eight bytes.
        #[test]
        fn word_test_agrees_with_byte_test(bytes in any::<[u8; 8]>()) {
            prop_assert_eq!(
                word_is_unreserved(u64::from_le_bytes(bytes)),
                bytes.iter().all(|&b| is_unreserved(b))
            );
        }

        /// Percent-encoding into a buffer gives what the contract's encoder gives.
        #[test]
        fn percent_encoding_into_a_buffer_matches(text in any::<String>(), prefix in "[a-z]{0,3}") {
            let mut out = prefix.clone();
            percent_encode_into(&mut out, &text);
            prop_assert_eq!(out, format!("{prefix}{}", super::super::percent_encode(&text)));
        }
    }

    #[test]
    fn every_byte_takes_the_word_path_the_same_way() {
        for b in 0..=255u8 {
            assert_eq!(
                word_is_unreserved(u64::from_le_bytes([
                    b'a', b'b', b, b'c', b'd', b'e', b'f', b'g'
                ])),
                is_unreserved(b),
                "byte {b:#04x}"
            );
        }
    }

    #[test]
    fn structured_headers_are_the_content_type_alone_and_convert() {
        let headers = EncodedHeaders::structured();
        assert_eq!(headers.len(), 1);
        assert_eq!(headers.get("Content-Type"), Some(STRUCTURED_CONTENT_TYPE));
        let map = headers.to_header_map();
        assert_eq!(map.len(), 1);
        assert_eq!(
            map.get("Content-Type").map(HeaderValue::as_str),
            Some(STRUCTURED_CONTENT_TYPE)
        );
    }

    #[test]
    fn structured_header_maps_are_cloned_from_one_built_map_and_stay_apart() {
        let headers = EncodedHeaders::structured();
        let built = headers.build_header_map();
        let mut first = headers.to_header_map();
        assert_eq!(first, built);
        first.insert("Nats-Msg-Id", "a");
        first.insert("Content-Type", "text/plain");
        // A change to one converted map does not reach the next one.
        let second = headers.to_header_map();
        assert_eq!(second, built);
        assert_eq!(second.get("Nats-Msg-Id"), None);
    }

    #[test]
    fn binary_headers_convert_to_the_same_header_map() {
        let mut event = new_event("org.example.t", "svc one", &json!({"n": 1})).unwrap();
        event.set_subject(Some("caf\u{e9} %\"x\""));
        event.set_extension("custom1", "v 1");
        event.set_extension("count", 7i64);
        event.set_extension("flag", true);
        let msg = encode(&event, ContentMode::Binary).unwrap();
        let map = msg.headers.to_header_map();
        assert_eq!(map.len(), msg.headers.len());
        for (name, value) in msg.headers.iter() {
            assert_eq!(
                map.get(name).map(HeaderValue::as_str),
                Some(value),
                "{name}"
            );
        }
        assert_eq!(
            msg.headers.get("ce-subject"),
            Some("caf%C3%A9%20%25%22x%22")
        );
        assert_eq!(msg.headers.get("ce-source"), Some("svc%20one"));
        assert_eq!(msg.headers.get("ce-custom1"), Some("v%201"));
        assert_eq!(msg.headers.get("ce-count"), Some("7"));
        assert_eq!(msg.headers.get("ce-flag"), Some("true"));
        assert_eq!(msg.headers.get("ce-specversion"), Some("1.0"));
        let back = decode(Some(&map), &msg.payload).unwrap();
        assert_eq!(back.subject(), event.subject());
        assert_eq!(back.id(), event.id());
    }

    #[test]
    fn equality_ignores_header_order() {
        let event = new_event("org.example.t", "svc", &1).unwrap();
        let a = encode(&event, ContentMode::Binary).unwrap().headers;
        let mut b = a.clone();
        b.entries.to_mut().reverse();
        assert_eq!(a, b);
        let mut c = a.clone();
        c.entries.to_mut().pop();
        assert_ne!(a, c);
        assert_ne!(a, EncodedHeaders::structured());
    }

    #[test]
    fn debug_shows_names_and_values() {
        let text = format!("{:?}", EncodedHeaders::structured());
        assert_eq!(text, r#"{"Content-Type": "application/cloudevents+json"}"#);
    }
}
