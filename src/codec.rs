//! CloudEvents <-> NATS message (headers + payload), in structured and binary content modes,
//! as the wire contract says.
//!
//! Encoding and decoding go through cloudevents-sdk's `message` traits: [`encode`] feeds the
//! event into a NATS [`StructuredSerializer`] / [`BinarySerializer`], and [`decode`] presents
//! the NATS message as a [`StructuredDeserializer`] / [`BinaryDeserializer`] that the sdk turns
//! into an [`Event`].
//!
//! # Examples
//!
//! ```
//! use ce_messaging::codec::{decode, encode, ContentMode};
//! use ce_messaging::event::new_event;
//!
//! let event = new_event("org.example.thing.created", "svc", &serde_json::json!({"n": 1}))?;
//! for mode in [ContentMode::Structured, ContentMode::Binary] {
//!     let msg = encode(&event, mode)?;
//!     assert_eq!(decode(Some(&msg.headers), &msg.payload)?, event);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
use std::borrow::Cow;

use bytes::Bytes;
use cloudevents::event::{Data, SpecVersion};
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, Error as MessageError, MessageAttributeValue,
    StructuredDeserializer, StructuredSerializer,
};
use cloudevents::{AttributesReader, Event};

use crate::error::{DecodeError, DecodeErrorKind, EncodeError, EncodeErrorKind, Error};

/// NATS message headers, as used by the codec.
pub use async_nats::HeaderMap;
use async_nats::{HeaderName, HeaderValue};

/// The `Content-Type` of a structured-mode message.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Prefix of the binary-mode attribute headers.
const CE_PREFIX: &str = "ce-";
/// The header that marks a binary-mode message (compared case-insensitively).
const CE_SPECVERSION: &str = "ce-specversion";
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
/// let event = ce_messaging::event::new_event("t", "s", &1)?;
/// let msg = encode(&event, ContentMode::Binary)?;
/// assert_eq!(msg.headers.get("ce-type").map(|v| v.as_str()), Some("t"));
/// assert_eq!(&msg.payload[..], b"1");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    /// The NATS headers.
    pub headers: HeaderMap,
    /// The NATS payload.
    pub payload: Bytes,
}

/// Encodes an event as NATS headers and payload in the given content mode.
///
/// Structured: the payload is the JSON event format and `Content-Type` is
/// `application/cloudevents+json`. Binary: the payload is the data and every attribute and
/// extension is a percent-encoded `ce-<name>` header.
///
/// # Errors
///
/// [`EncodeErrorKind::InvalidHeader`] when an extension name cannot be a NATS header name;
/// [`EncodeErrorKind::Serialize`] when the event cannot be serialized.
///
/// # Examples
///
/// ```
/// use ce_messaging::codec::{encode, ContentMode};
/// let event = ce_messaging::event::new_event("t", "s", &"hi")?;
/// let msg = encode(&event, ContentMode::Structured)?;
/// assert_eq!(
///     msg.headers.get("Content-Type").map(|v| v.as_str()),
///     Some("application/cloudevents+json")
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn encode(event: &Event, mode: ContentMode) -> Result<EncodedEvent, EncodeError> {
    match mode {
        ContentMode::Structured => {
            let json = serde_json::to_vec(event)
                .map_err(|e| Error::with_source(EncodeErrorKind::Serialize, e))?;
            NatsSerializer::default()
                .set_structured_event(json)
                .map_err(encode_error)
        }
        ContentMode::Binary => event
            .clone()
            .deserialize_binary(NatsSerializer::default())
            .map_err(encode_error),
    }
}

/// Decodes a NATS message into an event, accepting both content modes.
///
/// A `ce-specversion` header means binary mode; else a `Content-Type` starting with
/// `application/cloudevents` means structured mode; else the payload is tried as a structured
/// JSON event (as sdk-go sends it). Header names are matched case-insensitively.
///
/// # Errors
///
/// A [`DecodeError`] whose kind says what was wrong: [`DecodeErrorKind::NotJson`],
/// [`DecodeErrorKind::MissingAttribute`], [`DecodeErrorKind::UnknownSpecVersion`],
/// [`DecodeErrorKind::InvalidAttribute`], [`DecodeErrorKind::InvalidPercentEncoding`],
/// [`DecodeErrorKind::InvalidUtf8`] or [`DecodeErrorKind::NotCloudEvent`].
///
/// # Examples
///
/// ```
/// use bytes::Bytes;
/// use ce_messaging::codec::{decode, HeaderMap};
/// use ce_messaging::cloudevents::AttributesReader;
/// use ce_messaging::error::DecodeErrorKind;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("ce-specversion", "1.0");
/// headers.insert("ce-id", "1");
/// headers.insert("ce-source", "svc");
/// headers.insert("ce-type", "t");
/// headers.insert("ce-subject", "caf%C3%A9%20au%20lait");
/// let event = decode(Some(&headers), &Bytes::from_static(b"payload"))?;
/// assert_eq!(event.subject(), Some("café au lait"));
///
/// let err = decode(None, &Bytes::from_static(b"not json")).unwrap_err();
/// assert_eq!(err.kind(), DecodeErrorKind::NotJson);
/// # Ok::<(), ce_messaging::error::DecodeError>(())
/// ```
pub fn decode(headers: Option<&HeaderMap>, payload: &Bytes) -> Result<Event, DecodeError> {
    let message = NatsMessage { headers, payload };
    if message.is_binary() {
        let event = BinaryDeserializer::into_event(message).map_err(decode_error)?;
        Ok(typed_binary_data(event))
    } else {
        // Structured, with or without a CloudEvents Content-Type (sdk-go sends none).
        StructuredDeserializer::into_event(message).map_err(decode_error)
    }
}

/// Turns the raw bytes the sdk puts in a binary-mode event into the data variant a structured
/// decode of the same event gives: JSON for JSON content types, text for `text/*`.
fn typed_binary_data(mut event: Event) -> Event {
    let is_json = event.datacontenttype().is_some_and(is_json_content_type);
    let is_text = event
        .datacontenttype()
        .is_some_and(|ct| ct.starts_with("text/"));
    if !is_json && !is_text {
        return event;
    }
    if let Some(Data::Binary(bytes)) = event.data() {
        let typed = if is_json {
            serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .map(Data::Json)
        } else {
            std::str::from_utf8(bytes)
                .ok()
                .map(|s| Data::String(s.to_owned()))
        };
        if let Some(data) = typed {
            event.set_data_unchecked(data);
        }
    }
    event
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

impl NatsMessage<'_> {
    fn is_binary(&self) -> bool {
        self.headers.is_some_and(|h| {
            h.iter()
                .any(|(name, _)| AsRef::<str>::as_ref(name).eq_ignore_ascii_case(CE_SPECVERSION))
        })
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

impl BinaryDeserializer for NatsMessage<'_> {
    fn deserialize_binary<R: Sized, V: BinarySerializer<R>>(
        self,
        serializer: V,
    ) -> cloudevents::message::Result<R> {
        let Some(headers) = self.headers else {
            return Err(wrap(Error::with_detail(
                DecodeErrorKind::MissingAttribute,
                "no `ce-specversion` header",
            )));
        };
        let mut spec = None;
        for (name, values) in headers.iter() {
            if AsRef::<str>::as_ref(name).eq_ignore_ascii_case(CE_SPECVERSION) {
                let value = first_value(values, CE_SPECVERSION)?;
                let value = percent_decode(value, CE_SPECVERSION).map_err(wrap)?;
                spec = Some(SpecVersion::try_from(value.as_ref()).map_err(|_| {
                    wrap(Error::with_detail(
                        DecodeErrorKind::UnknownSpecVersion,
                        format!("`{value}`"),
                    ))
                })?);
            }
        }
        let Some(spec) = spec else {
            return Err(wrap(Error::with_detail(
                DecodeErrorKind::MissingAttribute,
                "no `ce-specversion` header",
            )));
        };
        let attribute_names = spec.attribute_names();
        let mut serializer = serializer.set_spec_version(spec)?;
        let mut content_type = None;
        let mut ce_content_type = false;
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            if name.len() > CE_PREFIX.len()
                && name.as_bytes()[..CE_PREFIX.len()].eq_ignore_ascii_case(CE_PREFIX.as_bytes())
            {
                let attr = name[CE_PREFIX.len()..].to_ascii_lowercase();
                if attr == "specversion" {
                    continue;
                }
                let value = first_value(values, name)?;
                let value = percent_decode(value, name).map_err(wrap)?.into_owned();
                if attr == "datacontenttype" {
                    ce_content_type = true;
                }
                if attribute_names.contains(&attr.as_str()) {
                    serializer = serializer
                        .set_attribute(&attr, MessageAttributeValue::String(value))
                        .map_err(|e| attribute_error(&attr, e))?;
                } else {
                    serializer =
                        serializer.set_extension(&attr, MessageAttributeValue::String(value))?;
                }
            } else if name.eq_ignore_ascii_case(CONTENT_TYPE) {
                content_type = Some(first_value(values, name)?.to_owned());
            }
        }
        if let (false, Some(ct)) = (ce_content_type, content_type) {
            serializer = serializer
                .set_attribute("datacontenttype", MessageAttributeValue::String(ct))
                .map_err(|e| attribute_error("datacontenttype", e))?;
        }
        if self.payload.is_empty() {
            serializer.end()
        } else {
            serializer.end_with_data(self.payload.to_vec())
        }
    }
}

/// The first value of a header (NATS headers may repeat; the contract sends each once).
fn first_value<'v>(values: &'v [HeaderValue], name: &str) -> cloudevents::message::Result<&'v str> {
    values.first().map(HeaderValue::as_str).ok_or_else(|| {
        wrap(Error::with_detail(
            DecodeErrorKind::InvalidAttribute,
            format!("header `{name}` has no value"),
        ))
    })
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

/// Maps an sdk error during encoding to a typed encode error.
fn encode_error(e: MessageError) -> EncodeError {
    match e {
        MessageError::Other { source } => match source.downcast::<EncodeError>() {
            Ok(typed) => *typed,
            Err(other) => Error::with_source(EncodeErrorKind::Serialize, other),
        },
        other => Error::with_source(EncodeErrorKind::Serialize, other),
    }
}

/// Builds a NATS message from the sdk's serializer calls.
#[derive(Default)]
struct NatsSerializer {
    headers: HeaderMap,
}

impl NatsSerializer {
    fn header(
        mut self,
        name: &str,
        value: &MessageAttributeValue,
    ) -> cloudevents::message::Result<Self> {
        let header_name = format!("{CE_PREFIX}{name}");
        let header_name = HeaderName::try_from(header_name.as_str()).map_err(|_| {
            wrap_encode(Error::with_detail(
                EncodeErrorKind::InvalidHeader,
                format!("`{name}` cannot be a NATS header name"),
            ))
        })?;
        let text = match value {
            MessageAttributeValue::String(s) => Cow::Borrowed(s.as_str()),
            other => Cow::Owned(other.to_string()),
        };
        let encoded = percent_encode(&text);
        let header_value: HeaderValue = encoded.parse().map_err(|_| {
            wrap_encode(Error::with_detail(
                EncodeErrorKind::InvalidHeader,
                format!("value of `{name}`"),
            ))
        })?;
        self.headers.insert(header_name, header_value);
        Ok(self)
    }
}

/// Carries a typed encode error through the sdk's error type.
fn wrap_encode(e: EncodeError) -> MessageError {
    MessageError::Other {
        source: Box::new(e),
    }
}

impl StructuredSerializer<EncodedEvent> for NatsSerializer {
    fn set_structured_event(
        mut self,
        bytes: Vec<u8>,
    ) -> cloudevents::message::Result<EncodedEvent> {
        self.headers.insert(
            HeaderName::from_static("Content-Type"),
            // Invariant: the constant has no CR/LF, the only thing `From<&str>` rejects.
            HeaderValue::from(STRUCTURED_CONTENT_TYPE),
        );
        Ok(EncodedEvent {
            headers: self.headers,
            payload: Bytes::from(bytes),
        })
    }
}

impl BinarySerializer<EncodedEvent> for NatsSerializer {
    fn set_spec_version(self, spec_version: SpecVersion) -> cloudevents::message::Result<Self> {
        self.header(
            "specversion",
            &MessageAttributeValue::String(spec_version.as_str().to_owned()),
        )
    }

    fn set_attribute(
        self,
        name: &str,
        value: MessageAttributeValue,
    ) -> cloudevents::message::Result<Self> {
        self.header(name, &value)
    }

    fn set_extension(
        self,
        name: &str,
        value: MessageAttributeValue,
    ) -> cloudevents::message::Result<Self> {
        self.header(name, &value)
    }

    fn end_with_data(self, bytes: Vec<u8>) -> cloudevents::message::Result<EncodedEvent> {
        Ok(EncodedEvent {
            headers: self.headers,
            payload: Bytes::from(bytes),
        })
    }

    fn end(self) -> cloudevents::message::Result<EncodedEvent> {
        Ok(EncodedEvent {
            headers: self.headers,
            payload: Bytes::new(),
        })
    }
}

/// Whether a byte goes into a header value as it is (U+0021..U+007E except `"` and `%`).
fn is_unreserved(b: u8) -> bool {
    (0x21..=0x7E).contains(&b) && b != b'"' && b != b'%'
}

/// Percent-encodes a header value per the contract: space, `"`, `%` and every byte outside
/// U+0021..U+007E, with upper-case hex.
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

/// Decodes a percent-encoded header value; a value without `%` is taken as it is.
fn percent_decode<'v>(value: &'v str, name: &str) -> Result<Cow<'v, str>, DecodeError> {
    if !value.contains('%') {
        return Ok(Cow::Borrowed(value));
    }
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
    String::from_utf8(out).map(Cow::Owned).map_err(|e| {
        Error::with_source(DecodeErrorKind::InvalidUtf8, e).detail(format!("header `{name}`"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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
                msg.headers.get("Content-Type").map(HeaderValue::as_str),
                Some(STRUCTURED_CONTENT_TYPE)
            );
            let back = decode(Some(&msg.headers), &msg.payload).unwrap();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn round_trip_binary_keeps_every_attribute_and_data() {
        for event in events() {
            let msg = encode(&event, ContentMode::Binary).unwrap();
            for (name, values) in msg.headers.iter() {
                let name: &str = name.as_ref();
                assert!(name.starts_with("ce-"), "{name}");
                for v in values {
                    assert!(v.as_str().bytes().all(is_unreserved) || v.as_str().contains('%'));
                    assert!(!v.as_str().contains(' '), "{name}: {v}");
                }
            }
            let back = decode(Some(&msg.headers), &msg.payload).unwrap();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn binary_headers_are_percent_encoded_upper_case() {
        let event = full_event(None);
        let msg = encode(&event, ContentMode::Binary).unwrap();
        let get = |n: &str| msg.headers.get(n).map(HeaderValue::as_str).unwrap();
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
            let back = decode(Some(&msg.headers), &msg.payload).unwrap();
            assert_eq!(back.time(), event.time());
            assert_eq!(back.time().unwrap().timestamp_subsec_nanos(), 123_456_789);
        }
    }

    #[test]
    fn binary_json_data_reads_as_json() {
        #[derive(serde::Deserialize, PartialEq, Debug)]
        struct Thing {
            name: String,
        }
        use crate::event::EventExt;
        let event = crate::event::new_event("t", "s", &json!({"name": "ü"})).unwrap();
        let msg = encode(&event, ContentMode::Binary).unwrap();
        let back = decode(Some(&msg.headers), &msg.payload).unwrap();
        assert!(matches!(back.data(), Some(Data::Json(_))));
        assert_eq!(back.data_as::<Thing>().unwrap(), Thing { name: "ü".into() });
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
            assert_eq!(event.source().as_str(), "https://example.com/x");
            assert_eq!(
                event.extension("transactionid"),
                Some(&cloudevents::event::ExtensionValue::String("tid-1".into()))
            );
            assert_eq!(
                event.data(),
                Some(&Data::Json(json!({"message": "Hello World!"})))
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
            ("Ce-Myext", "caf%c3%a9"),
            ("Content-Type", "application/json"),
        ]);
        let event = decode(Some(&h), &Bytes::from_static(br#"{"a":1}"#)).unwrap();
        assert_eq!(event.id(), "abc");
        assert_eq!(event.source().as_str(), "/my source");
        assert_eq!(event.datacontenttype(), Some("application/json"));
        assert_eq!(
            event.time().unwrap().to_rfc3339(),
            "2018-04-05T15:31:00.500+00:00"
        );
        assert_eq!(
            event.extension("myext"),
            Some(&cloudevents::event::ExtensionValue::String("café".into()))
        );
        assert_eq!(event.data(), Some(&Data::Json(json!({"a": 1}))));
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
        assert_eq!(kind_of(None, b""), NotJson);
        assert_eq!(kind_of(None, b"[1,2]"), NotJson);
        assert_eq!(kind_of(None, b"{\"id\":"), NotJson);
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
        let err = encode(&event, ContentMode::Binary).unwrap_err();
        assert_eq!(err.kind(), EncodeErrorKind::InvalidHeader);
        // Structured mode carries any name inside the JSON.
        let msg = encode(&event, ContentMode::Structured).unwrap();
        assert_eq!(decode(Some(&msg.headers), &msg.payload).unwrap(), event);
    }

    #[test]
    fn control_characters_in_values_are_encoded() {
        let mut event = full_event(None);
        event.set_extension("ext", "line1\r\nline2\t\0");
        let msg = encode(&event, ContentMode::Binary).unwrap();
        assert_eq!(
            msg.headers.get("ce-ext").map(HeaderValue::as_str),
            Some("line1%0D%0Aline2%09%00")
        );
        assert_eq!(decode(Some(&msg.headers), &msg.payload).unwrap(), event);
    }

    mod prop {
        use super::*;
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
                        let mut back = decode(Some(&msg.headers), &msg.payload).unwrap();
                        let mut expected = event.clone();
                        let (_, _, back_data) = back.take_data();
                        let (_, _, data) = expected.take_data();
                        prop_assert_eq!(back, expected);
                        prop_assert!(same_data(back_data, data));
                    }
                }
            }

            #[test]
            fn any_text_values_round_trip_in_binary_mode(
                id in "\\PC{1,16}", subject in ".{0,24}", ext in any::<String>(),
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
                let back = decode(Some(&msg.headers), &msg.payload).unwrap();
                if data.is_empty() {
                    prop_assert_eq!(back.data(), None);
                } else {
                    prop_assert_eq!(back, event);
                }
            }
        }
    }
}
