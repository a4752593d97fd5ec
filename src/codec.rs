//! CloudEvents <-> NATS message (headers + payload), in structured and binary content modes,
//! as the wire contract says. (Being written; signatures are fixed.)
use bytes::Bytes;
use cloudevents::Event;

use crate::error::{DecodeError, DecodeErrorKind, EncodeError, EncodeErrorKind, Error};

/// NATS message headers, as used by the codec.
pub use async_nats::HeaderMap;

/// How an event is laid out in a NATS message.
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
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    /// The NATS headers.
    pub headers: HeaderMap,
    /// The NATS payload.
    pub payload: Bytes,
}

/// Encodes an event.
pub fn encode(_event: &Event, _mode: ContentMode) -> Result<EncodedEvent, EncodeError> {
    Err(Error::new(EncodeErrorKind::Serialize))
}

/// Decodes a NATS message into an event.
pub fn decode(_headers: Option<&HeaderMap>, _payload: &Bytes) -> Result<Event, DecodeError> {
    Err(Error::new(DecodeErrorKind::NotCloudEvent))
}
