//! [`ReceivedEvent`]: an event as this library hands it out once received (to a handler, a
//! requester, a promise or a listener of an event source), read from the wire but not built
//! into the sdk's [`Event`] until something asks for one.

use std::borrow::Cow;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use cloudevents::event::{ExtensionValue, SpecVersion};
use cloudevents::{AttributesReader, Event};
use serde::de::DeserializeOwned;

use super::{
    attribute_values_fault, is_attribute_name, is_json_content_type, parse_time, EventParts,
    Extensions, PartsData, PartsValue,
};
use crate::cloudevent::{data_error, EventExt, EventType, TransactionId, TRANSACTION_ID_EXTENSION};
use crate::error::{Error, EventError, EventErrorKind};

/// A received CloudEvent: what [`decode`](super::decode) returns, and what handlers,
/// requesters, promises and event-source listeners get.
///
/// It is the sdk's [`Event`] through [`Deref`] (and [`DerefMut`]): every method of `Event`
/// works on it, and [`into_event`](Self::into_event) gives the `Event` itself. That `Event`
/// is built only when something asks for it. A spec 1.0 event in structured mode, the form
/// this library sends, is decoded into a view of the message's payload: its attributes are
/// checked as `decode` checks every event, but not copied out. Its id, type, source, subject,
/// content type, time and transaction id are read from the payload in place by the methods of
/// the same names here, and its JSON data is parsed straight from the payload by
/// [`EventExt::data_as`]. A handler that reads only those never builds an `Event` (about half
/// of what decoding one costs, see `docs/performance.md`); anything else (`data()`,
/// `extension()`, `dataschema()`, `iter()`, `&*event`) builds it once, the same `Event`
/// `decode` would have built, and keeps it. Other events (binary mode, spec 0.3, escaped
/// strings, more than two extensions, a `dataschema`) are built as they are decoded.
///
/// It implements the sdk's [`AttributesReader`] too. The inherent accessors come first in
/// method calls (`source()` gives a `&str` here, where the trait gives a `&String` and has to
/// build the event for it). Code that needs an `&Event` gets one by deref coercion
/// (`fn f(e: &Event)` takes `&received`).
///
/// # Examples
///
/// ```
/// use ce_messaging::cloudevent::{new_event, EventExt};
/// use ce_messaging::cloudevents::{AttributesReader, Event};
/// use ce_messaging::codec::{decode, encode, ContentMode};
///
/// let sent = new_event("org.example.thing.created", "svc", &serde_json::json!({"n": 1}))?;
/// let msg = encode(&sent, ContentMode::Structured)?;
/// let received = decode(Some(&msg.headers.to_header_map()), &msg.payload)?;
/// // Read in place, nothing built:
/// assert_eq!(received.ty(), "org.example.thing.created");
/// assert_eq!(received.data_as::<serde_json::Value>()?, serde_json::json!({"n": 1}));
/// // The sdk's event, built on first use:
/// fn takes_an_event(event: &Event) -> &str {
///     event.id()
/// }
/// assert_eq!(takes_an_event(&received), sent.id());
/// let event: Event = received.into_event();
/// assert_eq!(event.source(), "svc");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct ReceivedEvent {
    repr: Repr,
}

#[derive(Clone)]
enum Repr {
    /// Built when decoded (or made from an `Event`).
    Built(Event),
    /// A view of a structured-mode payload, and the `Event` once something asked for it.
    Wire { wire: Wire, event: OnceLock<Event> },
}

/// Where a string value is in the payload (its text between the quotes, without escapes).
#[derive(Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

/// An extension value in the payload.
#[derive(Clone, Copy)]
enum WireValue {
    Str(Span),
    Bool(bool),
    Int(i64),
}

/// A checked spec 1.0 structured-mode event, as places in its payload.
#[derive(Clone)]
pub(super) struct Wire {
    payload: Bytes,
    id: Span,
    source: Span,
    ty: Span,
    subject: Option<Span>,
    datacontenttype: Option<Span>,
    /// The text of `time`, and its value (parsed when decoded, which checked it).
    time: Option<(Span, DateTime<Utc>)>,
    extensions: [Option<(Span, WireValue)>; 2],
    /// The JSON text of `data` (with a JSON content type; other data is built when decoded).
    data: Option<Span>,
}

/// Where `text`, a part of `payload`, is in it; `None` when it is not a part of it (an
/// escaped value, decoded into a string of its own).
fn span_of(payload: &[u8], text: &Cow<'_, str>) -> Option<Span> {
    let Cow::Borrowed(text) = text else {
        return None;
    };
    let start = (text.as_ptr() as usize).checked_sub(payload.as_ptr() as usize)?;
    let end = start.checked_add(text.len())?;
    if end > payload.len() {
        return None;
    }
    Some(Span {
        start: u32::try_from(start).ok()?,
        end: u32::try_from(end).ok()?,
    })
}

impl Wire {
    /// The view of a structured-mode event read into `parts`, when it is one a view can hold
    /// and it passes every check building it would make; `None` otherwise, and the event is
    /// built (which then also says what is wrong with it, in `decode`'s own words).
    #[inline]
    pub(super) fn read(payload: &Bytes, parts: &EventParts<'_>) -> Option<Wire> {
        if parts.specversion.as_deref() != Some("1.0") || !parts.extensions.more.is_empty() {
            return None;
        }
        let [Some(id), Some(source), Some(ty), subject, time, None] = &parts.attributes else {
            return None;
        };
        let ct = parts.datacontenttype.as_deref();
        let data = match &parts.data {
            None => None,
            Some(PartsData::Json(text)) if ct.is_some_and(is_json_content_type) => {
                Some(span_of(payload, &Cow::Borrowed(text))?)
            }
            Some(_) => return None,
        };
        if attribute_values_fault(id, ty, source, subject.as_deref(), ct).is_some() {
            return None;
        }
        let time = match time {
            Some(text) => Some((span_of(payload, text)?, parse_time(text).ok()?)),
            None => None,
        };
        let mut extensions = [None, None];
        for (slot, extension) in extensions.iter_mut().zip(&parts.extensions.inline) {
            let Some((name, value)) = extension else {
                continue;
            };
            if !is_attribute_name(name) {
                return None;
            }
            let value = match value {
                PartsValue::Str(text) => WireValue::Str(span_of(payload, text)?),
                PartsValue::Bool(b) => WireValue::Bool(*b),
                PartsValue::Int(i) => WireValue::Int(*i),
            };
            *slot = Some((span_of(payload, name)?, value));
        }
        Some(Wire {
            payload: payload.clone(),
            id: span_of(payload, id)?,
            source: span_of(payload, source)?,
            ty: span_of(payload, ty)?,
            subject: match subject {
                Some(text) => Some(span_of(payload, text)?),
                None => None,
            },
            datacontenttype: match &parts.datacontenttype {
                Some(text) => Some(span_of(payload, text)?),
                None => None,
            },
            time,
            extensions,
            data,
        })
    }

    /// The text at `span`. Invariant: every span was made by [`Wire::read`] from a `&str`
    /// that was a part of this same payload (the decoder checked the whole payload as UTF-8
    /// and sliced it at ASCII quotes), and `Bytes` never change, so the slice is there and is
    /// UTF-8; the empty string would only come back if that were broken.
    fn text(&self, span: Span) -> &str {
        self.payload
            .get(span.start as usize..span.end as usize)
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
            .unwrap_or_default()
    }

    /// The extension named `name`.
    fn extension(&self, name: &str) -> Option<WireValue> {
        self.extensions
            .iter()
            .flatten()
            .find(|(n, _)| self.text(*n) == name)
            .map(|(_, value)| *value)
    }

    /// The sdk's event for this view: the one `decode` builds from the same parts.
    fn build(&self) -> Event {
        let text = |span| Some(Cow::Borrowed(self.text(span)));
        let mut extensions = Extensions::default();
        for (name, value) in self.extensions.iter().flatten() {
            let value = match *value {
                WireValue::Str(span) => PartsValue::Str(Cow::Borrowed(self.text(span))),
                WireValue::Bool(b) => PartsValue::Bool(b),
                WireValue::Int(i) => PartsValue::Int(i),
            };
            extensions.push((Cow::Borrowed(self.text(*name)), value));
        }
        let parts = EventParts {
            specversion: Some(Cow::Borrowed("1.0")),
            attributes: [
                text(self.id),
                text(self.source),
                text(self.ty),
                self.subject.and_then(text),
                self.time.and_then(|(span, _)| text(span)),
                None,
            ],
            datacontenttype: self.datacontenttype.and_then(text),
            extensions,
            data: self.data.map(|span| PartsData::Json(self.text(span))),
        };
        match parts.into_event() {
            Ok(event) => event,
            // Invariant: `Wire::read` made this view only after the same parts passed every
            // check `into_event` makes (spec 1.0, `id`, `source` and `type` present and the
            // attribute rules, `time` parsed, extension names, JSON data with a JSON content
            // type, no `dataschema`), so building them cannot fail.
            Err(e) => unreachable!("a checked event failed to build: {e}"),
        }
    }
}

impl ReceivedEvent {
    pub(super) fn from_wire(wire: Wire) -> ReceivedEvent {
        ReceivedEvent {
            repr: Repr::Wire {
                wire,
                event: OnceLock::new(),
            },
        }
    }

    /// The sdk's [`Event`], built now if it was not yet (what deref gives too).
    pub fn event(&self) -> &Event {
        match &self.repr {
            Repr::Built(event) => event,
            Repr::Wire { wire, event } => event.get_or_init(|| wire.build()),
        }
    }

    /// The sdk's [`Event`], by value (built now if it was not yet).
    pub fn into_event(self) -> Event {
        match self.repr {
            Repr::Built(event) => event,
            Repr::Wire { wire, event } => event.into_inner().unwrap_or_else(|| wire.build()),
        }
    }

    /// The view, while nothing has changed the event.
    fn wire(&self) -> Option<&Wire> {
        match &self.repr {
            Repr::Wire { wire, .. } => Some(wire),
            Repr::Built(_) => None,
        }
    }

    /// Whether the event is still a view of its payload (no `Event` built yet): for tests and
    /// benchmarks that check a path does not build one.
    #[doc(hidden)]
    pub fn is_unbuilt(&self) -> bool {
        matches!(&self.repr, Repr::Wire { event, .. } if event.get().is_none())
    }

    /// The `id` attribute.
    pub fn id(&self) -> &str {
        match self.wire() {
            Some(wire) => wire.text(wire.id),
            None => self.event().id(),
        }
    }

    /// The `type` attribute.
    pub fn ty(&self) -> &str {
        match self.wire() {
            Some(wire) => wire.text(wire.ty),
            None => self.event().ty(),
        }
    }

    /// The `source` attribute.
    pub fn source(&self) -> &str {
        match self.wire() {
            Some(wire) => wire.text(wire.source),
            None => self.event().source(),
        }
    }

    /// The `specversion` attribute.
    pub fn specversion(&self) -> SpecVersion {
        match self.wire() {
            Some(_) => SpecVersion::V10,
            None => self.event().specversion(),
        }
    }

    /// The `subject` attribute.
    pub fn subject(&self) -> Option<&str> {
        match self.wire() {
            Some(wire) => wire.subject.map(|span| wire.text(span)),
            None => self.event().subject(),
        }
    }

    /// The `datacontenttype` attribute.
    pub fn datacontenttype(&self) -> Option<&str> {
        match self.wire() {
            Some(wire) => wire.datacontenttype.map(|span| wire.text(span)),
            None => self.event().datacontenttype(),
        }
    }

    /// The `time` attribute.
    pub fn time(&self) -> Option<&DateTime<Utc>> {
        match self.wire() {
            Some(wire) => wire.time.as_ref().map(|(_, time)| time),
            None => self.event().time(),
        }
    }

    /// The value of the extension `name` when it is a string.
    pub fn string_extension(&self, name: &str) -> Option<&str> {
        match self.wire() {
            Some(wire) => match wire.extension(name)? {
                WireValue::Str(span) => Some(wire.text(span)),
                _ => None,
            },
            None => match self.event().extension(name)? {
                ExtensionValue::String(text) => Some(text),
                _ => None,
            },
        }
    }

    /// The JSON text of the data when the event is still a view (`Some(None)`: no data);
    /// `None` when it is built (read its `data()`).
    pub(crate) fn wire_json_data(&self) -> Option<Option<&str>> {
        let wire = self.wire()?;
        Some(wire.data.map(|span| wire.text(span)))
    }
}

/// The sdk's reader, for code written against it (`AttributesReader::id(&event)`, generic
/// functions). The methods read the payload in place as the inherent ones do, except
/// `source` (the trait returns a `&String`, which only the built event holds) and
/// `dataschema`, which build the event.
impl AttributesReader for ReceivedEvent {
    fn id(&self) -> &str {
        ReceivedEvent::id(self)
    }

    fn source(&self) -> &cloudevents::event::UriReference {
        self.event().source()
    }

    fn specversion(&self) -> SpecVersion {
        ReceivedEvent::specversion(self)
    }

    fn ty(&self) -> &str {
        ReceivedEvent::ty(self)
    }

    fn datacontenttype(&self) -> Option<&str> {
        ReceivedEvent::datacontenttype(self)
    }

    fn dataschema(&self) -> Option<&url::Url> {
        match self.wire() {
            // A view holds no `dataschema` (events with one are built when decoded).
            Some(_) => None,
            None => self.event().dataschema(),
        }
    }

    fn subject(&self) -> Option<&str> {
        ReceivedEvent::subject(self)
    }

    fn time(&self) -> Option<&DateTime<Utc>> {
        ReceivedEvent::time(self)
    }
}

impl EventExt for ReceivedEvent {
    fn transaction_id(&self) -> Option<TransactionId> {
        let Some(wire) = self.wire() else {
            return self.event().transaction_id();
        };
        // As `Event::transaction_id` reads the same extension.
        match wire.extension(TRANSACTION_ID_EXTENSION)? {
            WireValue::Str(span) => {
                let text = wire.text(span);
                (!text.is_empty()).then(|| TransactionId::new(text))
            }
            WireValue::Int(i) => Some(TransactionId::new(i.to_string())),
            WireValue::Bool(b) => Some(TransactionId::new(b.to_string())),
        }
    }

    fn set_transaction_id(&mut self, tid: &TransactionId) {
        self.event_mut().set_transaction_id(tid);
    }

    fn data_as<T: DeserializeOwned>(&self) -> Result<T, EventError> {
        match self.wire_json_data() {
            None => self.event().data_as(),
            Some(None) => Err(Error::new(EventErrorKind::NoData)),
            Some(Some(text)) => {
                serde_json::from_str(text).map_err(|e| data_error::<T>(e, self.id(), self.ty()))
            }
        }
    }

    fn event_type(&self) -> EventType {
        EventType::new(self.ty())
    }
}

impl Deref for ReceivedEvent {
    type Target = Event;

    fn deref(&self) -> &Event {
        self.event()
    }
}

impl DerefMut for ReceivedEvent {
    fn deref_mut(&mut self) -> &mut Event {
        self.event_mut()
    }
}

impl ReceivedEvent {
    /// The sdk's [`Event`], to change (what `deref_mut` gives too): built now if it was not
    /// yet, and from then on everything is read from it.
    pub fn event_mut(&mut self) -> &mut Event {
        if let Repr::Wire { wire, event } = &mut self.repr {
            let built = event.take().unwrap_or_else(|| wire.build());
            self.repr = Repr::Built(built);
        }
        match &mut self.repr {
            Repr::Built(event) => event,
            // Invariant: the view was replaced by the built event just above.
            Repr::Wire { .. } => unreachable!("a received event's view was just replaced"),
        }
    }
}

impl From<Event> for ReceivedEvent {
    fn from(event: Event) -> ReceivedEvent {
        ReceivedEvent {
            repr: Repr::Built(event),
        }
    }
}

impl From<ReceivedEvent> for Event {
    fn from(event: ReceivedEvent) -> Event {
        event.into_event()
    }
}

impl AsRef<Event> for ReceivedEvent {
    fn as_ref(&self) -> &Event {
        self.event()
    }
}

impl fmt::Debug for ReceivedEvent {
    /// As the [`Event`]'s.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.event(), f)
    }
}

impl fmt::Display for ReceivedEvent {
    /// As the [`Event`]'s.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.event(), f)
    }
}

impl PartialEq for ReceivedEvent {
    fn eq(&self, other: &ReceivedEvent) -> bool {
        self.event() == other.event()
    }
}

impl PartialEq<Event> for ReceivedEvent {
    fn eq(&self, other: &Event) -> bool {
        self.event() == other
    }
}

impl PartialEq<ReceivedEvent> for Event {
    fn eq(&self, other: &ReceivedEvent) -> bool {
        self == other.event()
    }
}

impl serde::Serialize for ReceivedEvent {
    /// As the [`Event`]'s (the JSON event format).
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.event().serialize(serializer)
    }
}
