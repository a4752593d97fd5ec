//! [`ReceivedEvent`]: an event as this library hands it out once received (to a handler, a
//! requester, a promise or a listener of an event source), read from the wire but not built
//! into the sdk's [`Event`] until something asks for one.

use std::borrow::Cow;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use cloudevents::event::{ExtensionValue, SpecVersion};
use cloudevents::{AttributesReader, Event};
use serde::de::DeserializeOwned;

use super::scan::PlainEvent;
use super::{
    is_attribute_name_bytes, is_content_type, is_json_content_type, parse_time, EventParts,
    PartsData, PartsValue,
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
/// `extension()`, `iter()`, `&*event`, `Debug`, `==`) builds it once, the same `Event`
/// `decode` would have built, and keeps it. Other events are built as they are decoded: binary
/// mode, spec 0.3, `data_base64`, an escape in an attribute's or extension's string (escapes
/// inside `data` are fine), more than four extensions, a `dataschema`, and data that is not
/// JSON (a non-JSON content type, or none).
///
/// A view holds a copy of the payload's text (one allocation, not the client's read buffer)
/// and where each value is in it.
///
/// It implements the sdk's [`AttributesReader`] too. The inherent accessors come first in
/// method calls (`source()` gives a `&str` here, where the trait gives a `&String` and has to
/// build the event for it; `received.source().as_str()` becomes `received.source()`). Code that needs an `&Event` gets one by deref coercion
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
    /// A view of a structured-mode payload, and the `Event` once something asked for it
    /// (boxed: a received event is moved through channels and futures, and most are never
    /// built).
    Wire {
        wire: Wire,
        event: OnceLock<Box<Event>>,
    },
}

/// Where a string value is in the payload (its text between the quotes, without escapes).
#[derive(Clone, Copy)]
pub(super) struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// The place `start..end`. Invariant: callers pass offsets into a payload they checked
    /// fits `u32` (`scan::read_plain` does first), so the casts do not truncate.
    pub(super) fn new(start: usize, end: usize) -> Span {
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    /// Where this place starts.
    pub(super) fn start(self) -> usize {
        self.start as usize
    }

    /// Whether the place holds no text.
    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// This place's bytes in `text` (no look at character boundaries).
    pub(super) fn bytes(self, text: &str) -> Option<&[u8]> {
        text.as_bytes().get(self.start as usize..self.end as usize)
    }

    /// This place's text in `text`; `None` if it is not a place in it at character
    /// boundaries.
    pub(super) fn of(self, text: &str) -> Option<&str> {
        text.get(self.start as usize..self.end as usize)
    }
}

/// How many extensions a view holds; an event with more is built when decoded.
pub(super) const WIRE_EXTENSIONS: usize = 4;

/// An extension value in the payload.
#[derive(Clone, Copy)]
pub(super) enum WireValue {
    Str(Span),
    Bool(bool),
    Int(i64),
}

/// A checked spec 1.0 structured-mode event, as places in its payload.
#[derive(Clone)]
pub(super) struct Wire {
    /// The payload, copied (one allocation): a `&str` of it is sliced at the places without
    /// checking UTF-8 again on each read (the crate forbids `unsafe`, and `Bytes` are not
    /// known to be text), and the client's read buffer, which the payload's `Bytes` share, is
    /// not held for as long as the event is kept.
    text: Box<str>,
    id: Span,
    source: Span,
    ty: Span,
    subject: Option<Span>,
    datacontenttype: Option<Span>,
    /// `time`, parsed when decoded (which checked it).
    time: Option<DateTime<Utc>>,
    /// The extensions, in the order read (four hold what this library sends: a transaction
    /// id, a trace parent and state, a priority).
    extensions: [Option<(Span, WireValue)>; WIRE_EXTENSIONS],
    /// The JSON text of `data` (with a JSON content type; other data is built when decoded).
    data: Option<Span>,
}

/// Where `text`, a part of `payload`, is in it; `None` when it is not a part of it (an
/// escaped value, decoded into a string of its own).
// The `Cow`'s variant is the point: an owned (unescaped) value is not a part of the payload.
#[allow(clippy::ptr_arg)]
fn span_of(payload: &str, text: &Cow<'_, str>) -> Option<Span> {
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
    /// The view of a structured-mode event read into `parts` by the general pass, when it is
    /// one a view can hold and it passes every check building it would make; `None`
    /// otherwise, and the event is built (which then also says what is wrong with it, in
    /// `decode`'s own words). The parts are turned into places and checked by
    /// [`Wire::from_plain`], as the fast path's are.
    #[inline]
    pub(super) fn read(payload: &str, parts: &EventParts<'_>) -> Option<Wire> {
        // No place for a `dataschema` (index 5) or another spec version.
        if parts.specversion.as_deref() != Some("1.0") || parts.attributes[5].is_some() {
            return None;
        }
        let place = |text: &Cow<'_, str>| span_of(payload, text);
        let mut plain = PlainEvent::default();
        for (slot, value) in plain.attributes.iter_mut().zip(&parts.attributes) {
            if let Some(text) = value {
                *slot = Some(place(text)?);
            }
        }
        if let Some(ct) = &parts.datacontenttype {
            plain.datacontenttype = Some(place(ct)?);
        }
        plain.data = match &parts.data {
            None => None,
            Some(PartsData::Json(text)) => Some(place(&Cow::Borrowed(text))?),
            Some(_) => return None,
        };
        let mut extensions = parts.extensions.iter();
        for (slot, (name, value)) in plain.extensions.iter_mut().zip(&mut extensions) {
            let value = match value {
                PartsValue::Str(text) => WireValue::Str(place(text)?),
                PartsValue::Bool(b) => WireValue::Bool(*b),
                PartsValue::Int(i) => WireValue::Int(*i),
            };
            *slot = Some((place(name)?, value));
        }
        if extensions.next().is_some() {
            // More than a view holds.
            return None;
        }
        Wire::from_plain(payload, &plain)
    }

    /// The view of an event read as places in `payload` (by
    /// [`scan::read_plain`](super::scan::read_plain), or by [`Wire::read`] from the general
    /// pass's parts), when it passes every check building it would make; `None` otherwise,
    /// and the event is built (which also says what is wrong with it).
    #[inline]
    pub(super) fn from_plain(payload: &str, plain: &PlainEvent) -> Option<Wire> {
        let [Some(id), Some(source), Some(ty), subject, time] = plain.attributes else {
            return None;
        };
        // The checks of `attribute_values_fault` (which builds its error text), on the places
        // where they can be (only the content type is looked at as text).
        if [id, ty, source]
            .iter()
            .chain(subject.as_ref())
            .any(Span::is_empty)
        {
            return None;
        }
        let ct = match plain.datacontenttype {
            Some(span) => {
                let ct = span.of(payload)?;
                if !is_content_type(ct) {
                    return None;
                }
                Some(ct)
            }
            None => None,
        };
        // `null` data is no data.
        let data = match plain.data {
            Some(span) if span.bytes(payload)? != b"null" => {
                if !ct.is_some_and(is_json_content_type) {
                    return None;
                }
                Some(span)
            }
            _ => None,
        };
        let time = match time {
            Some(span) => Some(parse_time(span.of(payload)?).ok()?),
            None => None,
        };
        for (name, _) in plain.extensions.iter().flatten() {
            if !is_attribute_name_bytes(name.bytes(payload)?) {
                return None;
            }
        }
        Some(Wire {
            id,
            source,
            ty,
            subject,
            datacontenttype: plain.datacontenttype,
            time,
            extensions: plain.extensions,
            data,
            text: Box::from(payload),
        })
    }

    /// The text at `span`. Invariant: every span was made by [`Wire::read`] from a `&str`
    /// that was a part of this same text, sliced at ASCII quotes, so the slice is there and at
    /// character boundaries; the empty string would only come back if that were broken.
    fn text(&self, span: Span) -> &str {
        span.of(&self.text).unwrap_or_default()
    }

    /// The extension named `name`.
    fn extension(&self, name: &str) -> Option<WireValue> {
        self.extensions
            .iter()
            .flatten()
            .find(|(n, _)| self.text(*n) == name)
            .map(|(_, value)| *value)
    }

    /// The sdk's event for this view: what `decode` builds from the same parts (the build of
    /// `EventParts::into_event`, without its checks and parsing, done when this was read; a
    /// property test holds the two to the same event).
    fn build(&self) -> Event {
        use cloudevents::{AttributesWriter, EventBuilder, EventBuilderV10};
        let built = EventBuilderV10::new()
            .id(self.text(self.id))
            .source(self.text(self.source))
            .ty(self.text(self.ty))
            .build();
        let mut event = match built {
            Ok(event) => event,
            // Invariant: the builder refuses a missing `id`, `source` or `type` (all three are
            // set), an empty `source` (refused by `attribute_values_fault` before a view is
            // made) and a `dataschema` it cannot parse (a view has none).
            Err(e) => unreachable!("a checked event failed to build: {e}"),
        };
        if let Some(subject) = self.subject {
            event.set_subject(Some(self.text(subject)));
        }
        if let Some(time) = self.time {
            event.set_time(Some(time));
        }
        for (name, value) in self.extensions.iter().flatten() {
            let value = match *value {
                WireValue::Str(span) => ExtensionValue::String(self.text(span).to_owned()),
                WireValue::Bool(b) => ExtensionValue::Boolean(b),
                WireValue::Int(i) => ExtensionValue::Integer(i),
            };
            event.set_extension(self.text(*name), value);
        }
        if let Some(ct) = self.datacontenttype {
            event.set_datacontenttype(Some(self.text(ct)));
        }
        if let Some(data) = self.data {
            // JSON data stays its JSON text, as `decode` hands it out.
            event.set_data_unchecked(self.text(data).as_bytes().to_vec());
        }
        event
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
            Repr::Wire { wire, event } => event.get_or_init(|| Box::new(wire.build())),
        }
    }

    /// The sdk's [`Event`], by value (built now if it was not yet).
    pub fn into_event(self) -> Event {
        match self.repr {
            Repr::Built(event) => event,
            Repr::Wire { wire, event } => match event.into_inner() {
                Some(event) => *event,
                None => wire.build(),
            },
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
            Some(wire) => wire.time.as_ref(),
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
/// functions). The methods read the payload in place as the inherent ones do, except `source`
/// (the trait returns a `&String`, which only the built event holds), which builds the event.
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
            let built = match event.take() {
                Some(event) => *event,
                None => wire.build(),
            };
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
    #[inline]
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

impl Eq for ReceivedEvent {}

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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use cloudevents::{AttributesReader, AttributesWriter, Event};
    use proptest::prelude::*;

    use super::ReceivedEvent;
    use crate::cloudevent::{new_event_with_tid, EventExt, TransactionId};
    use crate::codec::{
        decode, decode_as, encode, ContentMode, HeaderMap, View, STRUCTURED_CONTENT_TYPE,
    };

    /// Every accessor of `received`, read before anything builds it, agrees with `built`
    /// (the event `decode` builds without views); then the event it builds is `built`.
    fn assert_reads_as(received: &ReceivedEvent, built: &Event) -> Result<(), TestCaseError> {
        prop_assert_eq!(received.id(), built.id());
        prop_assert_eq!(received.ty(), built.ty());
        prop_assert_eq!(received.source(), built.source().as_str());
        prop_assert_eq!(received.specversion(), built.specversion());
        prop_assert_eq!(received.subject(), built.subject());
        prop_assert_eq!(received.datacontenttype(), built.datacontenttype());
        prop_assert_eq!(received.time(), built.time());
        prop_assert_eq!(AttributesReader::dataschema(received), built.dataschema());
        prop_assert_eq!(received.transaction_id(), built.transaction_id());
        prop_assert_eq!(received.event_type(), built.event_type());
        for (name, value) in built.iter_extensions() {
            let text = match value {
                cloudevents::event::ExtensionValue::String(text) => Some(text.as_str()),
                _ => None,
            };
            prop_assert_eq!(received.string_extension(name), text, "{}", name);
        }
        prop_assert_eq!(received.string_extension("nosuchextension"), None);
        let data =
            |r: Result<serde_json::Value, _>| r.map_err(|e: crate::error::EventError| e.kind());
        prop_assert_eq!(
            data(received.data_as::<serde_json::Value>()),
            data(built.data_as::<serde_json::Value>())
        );
        let as_handler_reads =
            |e: &ReceivedEvent| crate::handler::decode_data::<serde_json::Value>(e);
        prop_assert_eq!(
            as_handler_reads(received),
            as_handler_reads(&ReceivedEvent::from(built.clone()))
        );
        // Built once, on first use, and then the same event.
        prop_assert_eq!(received.event(), built);
        prop_assert!(!received.is_unbuilt());
        prop_assert_eq!(received.clone().into_event(), built.clone());
        Ok(())
    }

    /// A member of a generated JSON event: names and values as senders write them (escaped
    /// or not, of every JSON type, `null`, twice), as `(name, value)` JSON texts.
    fn member() -> impl Strategy<Value = (String, String)> {
        let name = prop_oneof![
            Just(r#""id""#),
            Just(r#""i\u0064""#),
            Just(r#""source""#),
            Just(r#""type""#),
            Just(r#""subject""#),
            Just(r#""time""#),
            Just(r#""datacontenttype""#),
            Just(r#""dataschema""#),
            Just(r#""data""#),
            Just(r#""transactionid""#),
            Just(r#""traceparent""#),
            Just(r#""ext1""#),
            Just(r#""ext\u0031""#),
            Just(r#""ext2""#),
            Just(r#""ext3""#),
            Just(r#""ext4""#),
            Just(r#""Bad""#),
            Just(r#""specversion""#),
        ];
        let value = prop_oneof![
            Just(r#""x""#.to_owned()),
            Just(r#""""#.to_owned()),
            Just(r#""a\"b""#.to_owned()),
            Just(r#""caf\u00e9""#.to_owned()),
            Just(r#""é""#.to_owned()),
            Just(r#""2026-12-05T13:00:00.123456789Z""#.to_owned()),
            Just(r#""2026-12-05T13:00:00+01:00""#.to_owned()),
            Just(r#""2026-02-30T13:00:00Z""#.to_owned()),
            Just(r#""application/json""#.to_owned()),
            Just(r#""text/plain""#.to_owned()),
            Just(r#""json""#.to_owned()),
            Just(r#""https://example.com/schema""#.to_owned()),
            Just(r#""1.0""#.to_owned()),
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("42".to_owned()),
            Just("1.5".to_owned()),
            Just(r#"{"a":[1,"b\n",null]}"#.to_owned()),
            Just(r#"[1,2]"#.to_owned()),
            "[a-z]{0,6}".prop_map(|t| format!("{t:?}")),
        ];
        (name, value).prop_map(|(name, value)| (name.to_owned(), value))
    }

    /// A `datacontenttype` value: JSON ones (which a view holds data of) and others.
    fn content_type() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just(r#""application/json""#),
            Just(r#""application/vnd.x+json""#),
            Just(r#""text/json""#),
            Just(r#""application/json; charset=utf-8""#),
            Just(r#""text/plain""#),
            Just(r#""application/octet-stream""#),
        ]
    }

    /// A `data` value of every JSON type (escapes inside `data` keep a view).
    fn data() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just(r#"{"name":"my workspace","tags":["a","b"],"n":1}"#),
            Just(r#"{"q":"a\"b\u00e9"}"#),
            Just(r#""text""#),
            Just("[1, 2.5, null]"),
            Just("42"),
            Just("null"),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// `decode` hands out a view only where it reads exactly what building reads: on
        /// generated JSON events (spec 1.0, every attribute, data of each JSON type under JSON
        /// and other content types, extensions of each type up to five, escaped names and
        /// values, `null` and repeated members, bad values, whitespace), with and without the
        /// structured Content-Type, the same outcome as `decode` without views: the same
        /// error, or an event whose every accessor and whose built `Event` are the same; and
        /// the same event sent in binary mode comes back built, and equal.
        #[test]
        fn a_view_reads_what_building_reads(
            required in proptest::collection::vec(proptest::bool::weighted(0.9), 3),
            content_type in proptest::option::weighted(0.8, content_type()),
            time in proptest::option::weighted(0.6, prop_oneof![
                Just(r#""2026-12-05T13:00:00Z""#),
                Just(r#""2026-12-05T13:00:00.5+00:00""#),
                Just(r#""2026-12-05T14:00:00-00:30""#),
                Just(r#""2026-12-05T13:00:00\u005a""#),
            ]),
            data in proptest::option::weighted(0.7, data()),
            extensions in proptest::collection::vec(
                (0..5usize, prop_oneof![
                    Just(r#""v""#), Just("7"), Just("false"), Just("null"), Just(r#""""#),
                ]),
                0..6,
            ),
            members in proptest::collection::vec(member(), 0..4),
            with_content_type in any::<bool>(),
            spaces in any::<bool>(),
            // Around the object: whitespace, or something that makes the payload not JSON.
            (before, after) in prop_oneof![
                4 => Just(("", "")),
                1 => Just((" \n", "\t ")),
                1 => Just(("", " x")),
                1 => Just(("", "}")),
                1 => Just(("[", "]")),
                1 => Just(("1", "")),
            ],
        ) {
            let mut all: Vec<(String, String)> = vec![("\"specversion\"".into(), "\"1.0\"".into())];
            for (present, (name, value)) in required
                .iter()
                .zip([("id", "\"i-1\""), ("source", "\"s\""), ("type", "\"t\"")])
            {
                if *present {
                    all.push((format!("{name:?}"), value.to_owned()));
                }
            }
            if let Some(ct) = content_type {
                all.push(("\"datacontenttype\"".into(), ct.to_owned()));
            }
            if let Some(time) = time {
                all.push(("\"time\"".into(), time.to_owned()));
            }
            if let Some(data) = data {
                all.push(("\"data\"".into(), data.to_owned()));
            }
            let names = ["transactionid", "traceparent", "ext1", "ext2", "ext3"];
            for (i, value) in extensions {
                all.push((format!("{:?}", names[i]), value.to_owned()));
            }
            all.extend(members);
            let (sep, colon) = if spaces { (" , ", " :\n ") } else { (",", ":") };
            let body: Vec<String> = all.iter().map(|(n, v)| format!("{n}{colon}{v}")).collect();
            let payload = Bytes::from(format!("{before}{{{}}}{after}", body.join(sep)));
            let mut headers = HeaderMap::new();
            headers.insert("Content-Type", STRUCTURED_CONTENT_TYPE);
            let headers = with_content_type.then_some(headers);
            let viewed = decode(headers.as_ref(), &payload);
            let built = decode_as(headers.as_ref(), &payload, View::Never);
            match (viewed, built) {
                (Ok(viewed), Ok(built)) => {
                    prop_assert!(!built.is_unbuilt());
                    let built = built.into_event();
                    assert_reads_as(&viewed, &built)?;
                    // Binary mode: built when decoded, and the same event.
                    if let Ok(msg) = encode(&built, ContentMode::Binary) {
                        let back = decode(Some(&msg.headers.to_header_map()), &msg.payload)
                            .expect("what encode writes decodes");
                        prop_assert!(!back.is_unbuilt());
                        prop_assert_eq!(back.id(), built.id());
                        prop_assert_eq!(back.transaction_id(), built.transaction_id());
                    }
                }
                (Err(a), Err(b)) => {
                    prop_assert_eq!(a.kind(), b.kind());
                    prop_assert_eq!(a.to_string(), b.to_string());
                }
                (a, b) => prop_assert!(false, "{:?} / {:?} for {:?}", a, b, payload),
            }
        }
    }

    /// What this library sends in structured mode is received as a view: nothing is built
    /// until asked for.
    #[test]
    fn what_this_library_sends_is_received_unbuilt() {
        let tid = TransactionId::generate();
        let mut event = new_event_with_tid(
            "org.example.done",
            "svc",
            &serde_json::json!({"name": "my workspace", "tags": ["a", "b"]}),
            tid.clone(),
        )
        .unwrap();
        event.set_subject(Some("w-1"));
        crate::telemetry::TraceContext::new_root().inject(&mut event);
        let msg = encode(&event, ContentMode::Structured).unwrap();
        let received = decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
        assert!(received.is_unbuilt());
        assert_eq!(received.transaction_id(), Some(tid));
        assert_eq!(received.subject(), Some("w-1"));
        assert!(received.string_extension("traceparent").is_some());
        assert_eq!(
            received.data_as::<serde_json::Value>().unwrap(),
            serde_json::json!({"name": "my workspace", "tags": ["a", "b"]})
        );
        assert!(received.is_unbuilt(), "reading it built nothing");
        // Binary mode is built when decoded.
        let msg = encode(&event, ContentMode::Binary).unwrap();
        let received = decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
        assert!(!received.is_unbuilt());
    }

    /// Changing a received event builds it, and from then on it reads as changed.
    #[test]
    fn a_changed_view_reads_as_changed() {
        let event = new_event_with_tid("t", "s", &1, TransactionId::new("tid-1")).unwrap();
        let msg = encode(&event, ContentMode::Structured).unwrap();
        let mut received = decode(None, &msg.payload).unwrap();
        assert!(received.is_unbuilt());
        received.set_id("changed");
        received.set_transaction_id(&TransactionId::new("tid-2"));
        assert!(!received.is_unbuilt());
        assert_eq!(received.id(), "changed");
        assert_eq!(received.transaction_id(), Some(TransactionId::new("tid-2")));
        assert_eq!(received.into_event().id(), "changed");
    }
}
