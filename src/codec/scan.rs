//! The JSON event format (a structured-mode payload) read in one pass over its bytes, for
//! [`decode`](super::decode): member names matched as they are read, string values borrowed
//! from the payload unless they hold escapes (escapes are decoded only then), and `data` kept
//! as its JSON text after a structural check, not parsed.
//!
//! **What "valid" means.** The payload is JSON as RFC 8259 writes it and as serde_json reads
//! it, no looser: UTF-8 (checked once for the whole payload), one object with only whitespace
//! (space, tab, line feed, carriage return) around it, member names and string values with no
//! unescaped control character (below U+0020) and only the escapes `\" \\ \/ \b \f \n \r \t
//! \uXXXX`, numbers as the grammar writes them (no leading zero, no `+`, no bare `.`), the
//! literals `true`, `false`, `null` and no trailing commas. As in serde_json, the `\u` escapes
//! of a member's own string value or name must pair UTF-16 surrogates (they are decoded), while
//! those inside `data` and inside array or object values need only be four hex digits (they
//! are checked, not decoded; serde_json reads a `RawValue` the same way), and a number value of
//! a member that does not fit an `f64` (`1e400`) is refused. Nesting has no depth limit (it is
//! skipped without recursion). Anything else is [`DecodeErrorKind::NotJson`], whose text says
//! at which byte and what was expected.
//!
//! A member named twice counts once, with its last value (as the sdk's decoder reads it); a
//! `null` member is absent. What the members mean is checked after the pass
//! ([`JsonEvent::check_members`]), so a payload that is not JSON is always `NotJson`, whatever
//! its members. A differential property test (`the_pass_reads_what_serde_json_reads`) holds the
//! pass to the serde_json reading it replaced, on generated, mutated and arbitrary payloads.
//!
//! The encoder's check of JSON text data ([`is_json_text`]) is here too: the same grammar as
//! the `data` check, in a pass of its own (`json_text_check_agrees_with_serde_json`).
use std::borrow::Cow;

use super::received::{Span, WireValue, WIRE_EXTENSIONS};
use super::{EventParts, PartsData, PartsValue, V10_ATTRIBUTES};
use crate::error::{DecodeError, DecodeErrorKind, Error};

/// A member value of a JSON event as the pass reads it: what an attribute or extension can
/// be, or `Other` for what it cannot (a fraction, an integer beyond `i64`, an array, an
/// object), which is checked and skipped over.
pub(super) enum Value<'a> {
    Null,
    Str(Cow<'a, str>),
    Bool(bool),
    Int(i64),
    Other,
}

impl<'a> Value<'a> {
    /// An attribute's value, which the JSON format requires to be a string.
    fn into_string(self, name: &str) -> Result<Cow<'a, str>, DecodeError> {
        match self {
            Value::Str(text) => Ok(text),
            _ => Err(not_a_string(name)),
        }
    }
}

fn not_a_string(name: &str) -> DecodeError {
    Error::with_detail(
        DecodeErrorKind::InvalidAttribute,
        format!("`{name}` is not a string"),
    )
}

/// A JSON event's members as read in the pass, straight into the [`EventParts`] they become
/// (a value that cannot be what its member needs is remembered, and refused by
/// [`JsonEvent::check_members`] once the whole payload is known to be JSON).
#[derive(Default)]
pub(super) struct JsonEvent<'a> {
    /// The whole payload, as the text it was checked to be.
    text: &'a str,
    parts: EventParts<'a>,
    specversion: Option<Value<'a>>,
    /// Bit `i`: the attribute `V10_ATTRIBUTES[i]` is neither a string nor null; bit 6: the
    /// same for `datacontenttype`.
    not_strings: u8,
    /// The JSON text of the `data` member, without the whitespace around it.
    data: Option<&'a str>,
    has_data_base64: bool,
    /// Extensions whose value is not a string, boolean or integer (nor null), in the order
    /// first read.
    bad_extensions: Vec<Cow<'a, str>>,
}

/// Bit of `datacontenttype` in [`JsonEvent::not_strings`].
const CONTENT_TYPE_BIT: u8 = 1 << V10_ATTRIBUTES.len();

impl<'a> JsonEvent<'a> {
    /// Sets a string attribute's slot (and its bit in `not_strings`) from its value.
    #[inline(always)]
    fn set_string(
        slot: &mut Option<Cow<'a, str>>,
        not_strings: &mut u8,
        bit: u8,
        value: Value<'a>,
    ) {
        *slot = None;
        *not_strings &= !bit;
        match value {
            Value::Str(text) => *slot = Some(text),
            Value::Null => {}
            _ => *not_strings |= bit,
        }
    }

    /// Sets (or, when `null`, removes) an extension; a value of another type is remembered
    /// as refused.
    fn set_extension(&mut self, name: Cow<'a, str>, value: Value<'a>) {
        if !self.bad_extensions.is_empty() {
            self.bad_extensions.retain(|n| *n != name);
        }
        let value = match value {
            Value::Str(text) => PartsValue::Str(text),
            Value::Bool(b) => PartsValue::Bool(b),
            Value::Int(i) => PartsValue::Int(i),
            Value::Null => return self.parts.extensions.remove(&name),
            Value::Other => {
                self.parts.extensions.remove(&name);
                return self.bad_extensions.push(name);
            }
        };
        if let Some(slot) = self.parts.extensions.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
            return;
        }
        self.parts.extensions.push((name, value));
    }
}

/// Which member a name is: the match is on the whole name (the compiler switches on the
/// length first), so an extension costs one failed comparison or none.
enum MemberName<'a> {
    SpecVersion,
    DataContentType,
    /// An index into [`V10_ATTRIBUTES`].
    Attribute(usize),
    Data,
    DataBase64,
    /// Any other name (decoded, when it has escapes).
    Extension(Cow<'a, str>),
}

fn member_name(name: Cow<'_, str>) -> MemberName<'_> {
    match &*name {
        "specversion" => MemberName::SpecVersion,
        "id" => MemberName::Attribute(0),
        "source" => MemberName::Attribute(1),
        "type" => MemberName::Attribute(2),
        "subject" => MemberName::Attribute(3),
        "time" => MemberName::Attribute(4),
        "dataschema" => MemberName::Attribute(5),
        "datacontenttype" => MemberName::DataContentType,
        "data" => MemberName::Data,
        "data_base64" => MemberName::DataBase64,
        _ => MemberName::Extension(name),
    }
}

/// The name and `:` of a member (at its opening quote in `text`) as encoders write the spec's
/// and this library's transaction id: the name's bytes, its quotes and the `:` right after, compared whole (`"id":`), with
/// no string scan; the byte after the opening quote picks the few names to compare. `None`
/// for any other name, an escape in one, or whitespace before the `:`, which the general
/// path reads (the names matched here are exactly those it would match to the same member).
// decode-structured 5,103 -> 4,768 instructions against a scan of each name for its end,
// a `Cow`, and a match on its text.
#[inline(always)]
fn plain_member_name(text: &str, at: usize) -> Option<(MemberName<'_>, usize)> {
    let rest = text.as_bytes().get(at..)?;
    let is = |name: &[u8]| rest.starts_with(name);
    let found = match rest.get(1)? {
        b't' if is(b"\"transactionid\":") => {
            // The name's text in the payload (its bytes are ASCII: the slice is at boundaries).
            let name = text.get(at + 1..at + 14)?;
            (MemberName::Extension(Cow::Borrowed(name)), 16)
        }
        b'i' if is(b"\"id\":") => (MemberName::Attribute(0), 5),
        b't' if is(b"\"type\":") => (MemberName::Attribute(2), 7),
        b't' if is(b"\"time\":") => (MemberName::Attribute(4), 7),
        b's' if is(b"\"source\":") => (MemberName::Attribute(1), 9),
        b's' if is(b"\"specversion\":") => (MemberName::SpecVersion, 14),
        b's' if is(b"\"subject\":") => (MemberName::Attribute(3), 10),
        b'd' if is(b"\"data\":") => (MemberName::Data, 7),
        b'd' if is(b"\"datacontenttype\":") => (MemberName::DataContentType, 18),
        b'd' if is(b"\"dataschema\":") => (MemberName::Attribute(5), 13),
        _ => return None,
    };
    Some(found)
}

/// The pass itself: the members of the one JSON object in `text` (the payload, see
/// [`payload_text`]), into `event` (filled in place: the parts are large, and every move of
/// them is a copy).
pub(super) fn read_event_into<'a>(
    text: &'a str,
    event: &mut JsonEvent<'a>,
) -> Result<(), DecodeError> {
    event.text = text;
    let mut scanner = Scanner { text, pos: 0 };
    scanner
        .event_members(event)
        .map_err(SyntaxError::into_decode_error)
}

/// A JSON event in the shape encoders write, as places in its payload: what
/// [`read_plain`] reads, and [`Wire::from_plain`](super::received::Wire::from_plain) checks
/// and keeps.
#[derive(Default)]
pub(super) struct PlainEvent {
    /// `id`, `source`, `type`, `subject` and `time` (the first five of [`V10_ATTRIBUTES`]).
    pub(super) attributes: [Option<Span>; 5],
    pub(super) datacontenttype: Option<Span>,
    /// The JSON text of `data` (`null` too), without the whitespace around it.
    pub(super) data: Option<Span>,
    /// The extensions, in the order read.
    pub(super) extensions: [Option<(Span, WireValue)>; WIRE_EXTENSIONS],
}

/// The fast path of [`decode`](super::decode) in structured mode: the event's members read
/// straight into places in `text` (the payload, checked UTF-8), for a view, when the event is
/// in the shape this library and most encoders write: one object of unescaped member names;
/// a `specversion` of `"1.0"`; the attributes, and `datacontenttype`, as strings without
/// escapes; at most [`WIRE_EXTENSIONS`] extensions, each a string without escapes, a boolean
/// or an integer; `data` any JSON value; no extension twice, no `null` member, no
/// `dataschema` or `data_base64`; whitespace anywhere JSON allows it. `None` for anything else, at the
/// first sign of it, and [`read_event_into`] reads the event (and says what is wrong with
/// it): this path refuses nothing, it only declines. Whatever it reads, the general path reads
/// the same (`a_view_reads_what_building_reads` holds a view made here to the event built
/// from the general path's reading).
// decode-structured 4,619 -> 3,729 instructions: no `Cow` per value, no parts to fill, move,
// check and drop, and no second pass to turn them into places.
pub(super) fn read_plain(text: &str) -> Option<PlainEvent> {
    // Places are `u32`s (a NATS payload is far smaller).
    u32::try_from(text.len()).ok()?;
    let mut scanner = Scanner { text, pos: 0 };
    let mut event = PlainEvent::default();
    let mut has_specversion = false;
    let mut extensions = 0;
    scanner.skip_whitespace();
    if scanner.peek() != Some(b'{') {
        return None;
    }
    scanner.pos += 1;
    loop {
        scanner.skip_whitespace();
        let (member, name_start) = match plain_member_name(text, scanner.pos) {
            Some((member, length)) => {
                let name_start = scanner.pos + 1;
                scanner.pos += length;
                (member, name_start)
            }
            None => {
                let name = scanner.plain_string()?;
                scanner.skip_whitespace();
                if scanner.peek() != Some(b':') {
                    return None;
                }
                scanner.pos += 1;
                (member_name(Cow::Borrowed(name.of(text)?)), name.start())
            }
        };
        scanner.skip_whitespace();
        // A member named twice counts with its last value, as on the general path: a later
        // one takes the place of an earlier one (an extension named twice is declined).
        match member {
            MemberName::Data => {
                let start = scanner.pos;
                scanner.pos = json_value_end(scanner.bytes(), start)?;
                event.data = Some(Span::new(start, scanner.pos));
            }
            MemberName::SpecVersion => {
                if scanner.plain_string()?.bytes(text)? != b"1.0" {
                    return None;
                }
                has_specversion = true;
            }
            // `dataschema` (index 5) has no place: declined.
            MemberName::Attribute(i) => {
                *event.attributes.get_mut(i)? = Some(scanner.plain_string()?)
            }
            MemberName::DataContentType => event.datacontenttype = Some(scanner.plain_string()?),
            MemberName::DataBase64 => return None,
            MemberName::Extension(name) => {
                let value = match scanner.peek()? {
                    b'"' => WireValue::Str(scanner.plain_string()?),
                    b't' => {
                        scanner.literal(b"true").ok()?;
                        WireValue::Bool(true)
                    }
                    b'f' => {
                        scanner.literal(b"false").ok()?;
                        WireValue::Bool(false)
                    }
                    b'-' | b'0'..=b'9' => match scanner.number().ok()? {
                        Number::Int(i) => WireValue::Int(i),
                        Number::Other => return None,
                    },
                    _ => return None,
                };
                let repeated = event.extensions[..extensions]
                    .iter()
                    .flatten()
                    .any(|(other, _)| other.bytes(text) == Some(name.as_bytes()));
                if repeated {
                    return None;
                }
                let name = Span::new(name_start, name_start + name.len());
                *event.extensions.get_mut(extensions)? = Some((name, value));
                extensions += 1;
            }
        }
        scanner.skip_whitespace();
        match scanner.peek()? {
            b',' => scanner.pos += 1,
            b'}' => {
                scanner.pos += 1;
                break;
            }
            _ => return None,
        }
    }
    scanner.skip_whitespace();
    (scanner.pos == text.len() && has_specversion).then_some(event)
}

/// A structured-mode payload as text: JSON text is UTF-8, checked once for the whole payload
/// (a word at a time while it is ASCII), so that the passes can look at bytes and slice at
/// ASCII delimiters.
pub(super) fn payload_text(payload: &[u8]) -> Result<&str, DecodeError> {
    std::str::from_utf8(payload).map_err(|e| {
        Error::with_source(DecodeErrorKind::NotJson, e).detail("the payload is not UTF-8")
    })
}

/// [`read_event_into`] a new [`JsonEvent`].
#[cfg(test)]
fn read_event(payload: &[u8]) -> Result<JsonEvent<'_>, DecodeError> {
    let mut event = JsonEvent::default();
    read_event_into(payload_text(payload)?, &mut event).map(|()| event)
}

impl<'a> JsonEvent<'a> {
    /// Checks the members and completes the parts: `Ok(true)` when they are a 1.0 event to
    /// build ([`JsonEvent::take_parts`]), `Ok(false)` for shapes left to the sdk's decoder
    /// (spec 0.3, `data_base64`). `null` members are absent, as in the sdk. The checks go in
    /// the order of the sdk's attributes: `specversion`, the other attributes,
    /// `datacontenttype`, the extensions.
    pub(super) fn check_members(&mut self) -> Result<bool, DecodeError> {
        if self.has_data_base64 {
            return Ok(false);
        }
        match self.specversion.take() {
            None | Some(Value::Null) => {}
            Some(version) => {
                let version = version.into_string("specversion")?;
                if version != "1.0" {
                    if version == "0.3" {
                        return Ok(false);
                    }
                    return Err(Error::with_detail(
                        DecodeErrorKind::UnknownSpecVersion,
                        format!("`{version}`"),
                    ));
                }
                self.parts.specversion = Some(version);
            }
        }
        if self.not_strings != 0 {
            let name = match V10_ATTRIBUTES.get(self.not_strings.trailing_zeros() as usize) {
                Some(name) => name,
                None => "datacontenttype",
            };
            return Err(not_a_string(name));
        }
        if let Some(name) = self.bad_extensions.first() {
            return Err(Error::with_detail(
                DecodeErrorKind::InvalidAttribute,
                format!("extension `{name}` is not a string, boolean or integer"),
            ));
        }
        self.parts.data = self
            .data
            .filter(|text| *text != "null")
            .map(PartsData::Json);
        Ok(true)
    }

    /// The parts read (after [`JsonEvent::check_members`]).
    pub(super) fn parts(&self) -> &EventParts<'a> {
        &self.parts
    }

    /// The payload the parts were read from, as text (checked UTF-8 by the pass).
    pub(super) fn text(&self) -> &'a str {
        self.text
    }

    /// The parts read (after [`JsonEvent::check_members`]), leaving empty ones.
    pub(super) fn take_parts(&mut self) -> EventParts<'a> {
        std::mem::take(&mut self.parts)
    }
}

/// The text of a JSON string (`"..."`, nothing around it), escapes decoded; `None` when
/// `json` is not exactly one JSON string.
pub(super) fn json_string(json: &str) -> Option<Cow<'_, str>> {
    if !json.starts_with('"') {
        return None;
    }
    let mut scanner = Scanner { text: json, pos: 0 };
    let text = scanner.string().ok()?;
    (scanner.pos == json.len()).then_some(text)
}

/// The text of the payload's top-level `transactionid` member, read without decoding the
/// event, for [`peek_transaction_id`](super::peek_transaction_id): `Some` only when the last
/// member of that name is a non-empty string without escapes, so that whenever `decode`
/// succeeds its event carries exactly this transaction id. `None` when there is no such
/// member, and whenever telling would take the whole decode: an escape in a member name
/// (`"transacti\u006fnid"` is the same name), an escape in the value, a value that is not a
/// string (an integer transaction id is its decimal text), or a payload that is not one object.
/// Values are skipped with the lean grammar pass of [`is_json_text`].
pub(super) fn peek_transaction_id(b: &[u8]) -> Option<&str> {
    const TRANSACTION_ID: &[u8] = crate::cloudevent::TRANSACTION_ID_EXTENSION.as_bytes();
    let mut i = 0;
    skip_json_whitespace(b, &mut i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    // The value of the last `transactionid` member when it is a plain string.
    let mut found = None;
    loop {
        skip_json_whitespace(b, &mut i);
        let name_start = i + 1;
        if b.get(i) != Some(&b'"') || !is_string(b, &mut i) {
            // Also an empty object (`{}`): no members, no transaction id.
            return None;
        }
        // Between the quotes: `is_string` moved `i` past the closing one.
        let name = b.get(name_start..i - 1)?;
        // An escape makes a name shorter than its text: only a longer text can be
        // `transactionid` in disguise, so only such names are searched for one.
        if name.len() > TRANSACTION_ID.len() && name.contains(&b'\\') {
            return None;
        }
        skip_json_whitespace(b, &mut i);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        skip_json_whitespace(b, &mut i);
        let value_start = i;
        if b.get(i) == Some(&b'"') {
            // Most members are strings: no container to track.
            if !is_string(b, &mut i) {
                return None;
            }
        } else {
            i = json_value_end(b, i)?;
        }
        if name == TRANSACTION_ID {
            found = match b.get(value_start..i)? {
                [b'"', text @ .., b'"'] if !text.is_empty() && !text.contains(&b'\\') => Some(text),
                _ => None,
            };
        }
        skip_json_whitespace(b, &mut i);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => break,
            _ => return None,
        }
    }
    std::str::from_utf8(found?).ok()
}

/// Whether `bytes` are one JSON value with only whitespace around it: the grammar the pass
/// applies to a `data` member (UTF-8; strings with valid escapes, `\u` four hex digits, no
/// control characters; numbers as JSON writes them; any depth, without recursion), so what the
/// encoder writes as `data` the decoder reads back as it was. Used by the structured encoder
/// for JSON text data; a pass of its own, without the scanner's error positions and number
/// values, as it is on every encode of such data (a property test holds it to serde_json).
pub(super) fn is_json_text(bytes: &[u8]) -> bool {
    (bytes.is_ascii() || std::str::from_utf8(bytes).is_ok()) && is_one_json_value(bytes)
}

/// The grammar half of [`is_json_text`], on bytes known to be UTF-8.
fn is_one_json_value(b: &[u8]) -> bool {
    let mut i = 0;
    skip_json_whitespace(b, &mut i);
    json_value_end(b, i).is_some_and(|mut end| {
        skip_json_whitespace(b, &mut end);
        end == b.len()
    })
}

/// Where the one JSON value at `i` (its first byte) ends, just past it; `None` when the
/// bytes there are not one value (the grammar of [`is_json_text`], bytes known to be UTF-8).
/// No error positions and no number values: the scanner's `data` check runs this first and
/// only goes over a value again, with [`Scanner::skip_value`], to say where it is wrong.
fn json_value_end(b: &[u8], mut i: usize) -> Option<usize> {
    let mut nesting = Nesting::default();
    loop {
        // At a value.
        skip_json_whitespace(b, &mut i);
        match b.get(i) {
            Some(&open @ (b'{' | b'[')) => {
                i += 1;
                skip_json_whitespace(b, &mut i);
                let object = open == b'{';
                let close = if object { b'}' } else { b']' };
                if b.get(i) == Some(&close) {
                    i += 1;
                } else {
                    nesting.push(object);
                    if object && !is_member_name(b, &mut i) {
                        return None;
                    }
                    continue;
                }
            }
            Some(b'"') => {
                if !is_string(b, &mut i) {
                    return None;
                }
            }
            Some(b't') => {
                if !is_literal(b, &mut i, b"true") {
                    return None;
                }
            }
            Some(b'f') => {
                if !is_literal(b, &mut i, b"false") {
                    return None;
                }
            }
            Some(b'n') => {
                if !is_literal(b, &mut i, b"null") {
                    return None;
                }
            }
            Some(b'-' | b'0'..=b'9') => {
                if !is_number(b, &mut i) {
                    return None;
                }
            }
            _ => return None,
        }
        // After a value: close the containers it ends, or go on to the next value.
        loop {
            let Some(object) = nesting.innermost_is_object() else {
                return Some(i);
            };
            skip_json_whitespace(b, &mut i);
            match (b.get(i), object) {
                (Some(b','), _) => {
                    i += 1;
                    if object {
                        skip_json_whitespace(b, &mut i);
                        if !is_member_name(b, &mut i) {
                            return None;
                        }
                    }
                    break;
                }
                (Some(b'}'), true) | (Some(b']'), false) => {
                    i += 1;
                    nesting.pop();
                }
                _ => return None,
            }
        }
    }
}

#[inline(always)]
fn skip_json_whitespace(b: &[u8], i: &mut usize) {
    while b.get(*i).copied().is_some_and(is_whitespace) {
        *i += 1;
    }
}

/// A literal (`true`, `false`, `null`) at `i`.
fn is_literal(b: &[u8], i: &mut usize, word: &[u8]) -> bool {
    let ok = b.get(*i..).is_some_and(|rest| rest.starts_with(word));
    *i += word.len();
    ok
}

/// A string at its opening quote, `i` moved past its closing one.
#[inline(always)]
fn is_string(b: &[u8], i: &mut usize) -> bool {
    *i += 1;
    loop {
        *i = plain_run_end(b, *i);
        match b.get(*i) {
            Some(b'"') => {
                *i += 1;
                return true;
            }
            Some(b'\\') => match b.get(*i + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => *i += 2,
                Some(b'u') => {
                    let hex = b.get(*i + 2..*i + 6);
                    if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                        return false;
                    }
                    *i += 6;
                }
                _ => return false,
            },
            _ => return false,
        }
    }
}

/// A member name inside an object and the `:` after it.
// Inlined: a call per member of a JSON data object cost more than the check (decode-structured
// 7,962 -> 7,784 instructions, encode-structured 2,897 -> 2,712).
#[inline(always)]
fn is_member_name(b: &[u8], i: &mut usize) -> bool {
    if b.get(*i) != Some(&b'"') || !is_string(b, i) {
        return false;
    }
    skip_json_whitespace(b, i);
    if b.get(*i) == Some(&b':') {
        *i += 1;
        true
    } else {
        false
    }
}

/// A number at its first byte (`-` or a digit), as the JSON grammar writes it.
fn is_number(b: &[u8], i: &mut usize) -> bool {
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    if b.get(*i) == Some(&b'-') {
        *i += 1;
    }
    match b.get(*i) {
        Some(b'0') => *i += 1,
        Some(b'1'..=b'9') => {
            digits(i);
        }
        _ => return false,
    }
    if b.get(*i) == Some(&b'.') {
        *i += 1;
        if !digits(i) {
            return false;
        }
    }
    if matches!(b.get(*i), Some(b'e' | b'E')) {
        *i += 1;
        if matches!(b.get(*i), Some(b'+' | b'-')) {
            *i += 1;
        }
        if !digits(i) {
            return false;
        }
    }
    true
}

/// Where the payload stopped being JSON: the byte offset and what was expected there.
struct SyntaxError {
    at: usize,
    expected: &'static str,
}

impl SyntaxError {
    fn into_decode_error(self) -> DecodeError {
        Error::with_detail(
            DecodeErrorKind::NotJson,
            format!("at byte {}: expected {}", self.at, self.expected),
        )
    }
}

/// A JSON whitespace byte.
#[inline(always)]
fn is_whitespace(b: u8) -> bool {
    // Every JSON whitespace byte is at most a space: one comparison for all the others.
    b <= b' ' && matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

/// A byte that ends a run of plain string bytes: `"`, `\` or a control character.
fn is_string_special(b: u8) -> bool {
    b == b'"' || b == b'\\' || b < 0x20
}

/// The bytes of `word` (eight payload bytes, little-endian) that are [`is_string_special`],
/// as their high bits; exact for the lowest such byte (a byte above it may be flagged too,
/// by a borrow, which does not matter: only the lowest is used).
fn string_special_bits(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    let zero_bytes = |v: u64| v.wrapping_sub(ONES) & !v;
    let quote = zero_bytes(word ^ (ONES * u64::from(b'"')));
    let backslash = zero_bytes(word ^ (ONES * u64::from(b'\\')));
    // A byte below 0x20 borrows into its high bit, which a byte of 0x80 or more already has.
    let control = word.wrapping_sub(ONES * 0x20) & !word;
    (quote | backslash | control) & HIGH_BITS
}

/// Index of the first [`is_string_special`] byte of `bytes` at or after `from` (or the end):
/// sixteen bytes at a step (two words, one test and one bounds check for both: decode 8,266
/// -> 8,035 instructions against one word a step), then eight, then one.
#[inline(always)]
fn plain_run_end(bytes: &[u8], mut from: usize) -> usize {
    while let Some(pair) = bytes.get(from..).and_then(<[u8]>::first_chunk::<16>) {
        let (low, high) = pair.split_at(8);
        let word = |half: &[u8]| u64::from_le_bytes(half.try_into().unwrap_or_default());
        let special_low = string_special_bits(word(low));
        let special_high = string_special_bits(word(high));
        if special_low | special_high != 0 {
            return from
                + if special_low != 0 {
                    (special_low.trailing_zeros() / 8) as usize
                } else {
                    8 + (special_high.trailing_zeros() / 8) as usize
                };
        }
        from += 16;
    }
    while let Some(word) = bytes.get(from..).and_then(<[u8]>::first_chunk::<8>) {
        let special = string_special_bits(u64::from_le_bytes(*word));
        if special != 0 {
            return from + (special.trailing_zeros() / 8) as usize;
        }
        from += 8;
    }
    while bytes.get(from).is_some_and(|&b| !is_string_special(b)) {
        from += 1;
    }
    from
}

/// The value of a hex digit.
fn hex_digit(b: u8) -> Option<u16> {
    match b {
        b'0'..=b'9' => Some(u16::from(b - b'0')),
        b'a'..=b'f' => Some(u16::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u16::from(b - b'A' + 10)),
        _ => None,
    }
}

/// The containers a skipped value is inside, innermost last: a bit per level (set for an
/// object), 64 levels in a word and the outer words in a `Vec` that is only allocated for
/// values nested deeper than that.
#[derive(Default)]
struct Nesting {
    depth: usize,
    bits: u64,
    outer: Vec<u64>,
}

impl Nesting {
    fn push(&mut self, object: bool) {
        if self.depth > 0 && self.depth.is_multiple_of(64) {
            self.outer.push(self.bits);
            self.bits = 0;
        }
        self.bits = (self.bits << 1) | u64::from(object);
        self.depth += 1;
    }

    fn pop(&mut self) {
        self.depth -= 1;
        self.bits >>= 1;
        if self.depth > 0 && self.depth.is_multiple_of(64) {
            // Pushed when this level was entered (depth went past a multiple of 64).
            self.bits = self.outer.pop().unwrap_or_default();
        }
    }

    /// Whether the innermost container is an object; `None` at the top level.
    fn innermost_is_object(&self) -> Option<bool> {
        (self.depth > 0).then_some(self.bits & 1 == 1)
    }
}

/// What a number turned out to be.
enum Number {
    /// An integer that fits an `i64` (not `-0`, which serde_json reads as a float).
    Int(i64),
    /// A fraction, an exponent, `-0` or an integer beyond `i64`.
    Other,
}

/// A cursor over the payload (valid UTF-8, so slices at ASCII bytes are `str` slices).
struct Scanner<'a> {
    text: &'a str,
    pos: usize,
}

type Scan<T> = Result<T, SyntaxError>;

impl<'a> Scanner<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn fail<T>(&self, expected: &'static str) -> Scan<T> {
        Err(SyntaxError {
            at: self.pos,
            expected,
        })
    }

    #[inline(always)]
    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(is_whitespace) {
            self.pos += 1;
        }
    }

    /// Skips whitespace and then `byte`, or fails naming `expected`.
    #[inline(always)]
    fn eat(&mut self, byte: u8, expected: &'static str) -> Scan<()> {
        self.skip_whitespace();
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            self.fail(expected)
        }
    }

    /// The members of the payload's one object, into `event`; then only whitespace.
    fn event_members(&mut self, event: &mut JsonEvent<'a>) -> Scan<()> {
        self.eat(b'{', "`{` (a JSON event is an object)")?;
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
        } else {
            loop {
                self.skip_whitespace();
                let member = match plain_member_name(self.text, self.pos) {
                    Some((member, length)) => {
                        self.pos += length;
                        member
                    }
                    None => {
                        if self.peek() != Some(b'"') {
                            return self.fail("a member name");
                        }
                        let name = self.string()?;
                        self.eat(b':', "`:`")?;
                        member_name(name)
                    }
                };
                self.skip_whitespace();
                match member {
                    MemberName::Data => {
                        let start = self.pos;
                        // The lean check first; the scanner's own, which says where the
                        // value is wrong, only when it fails (same grammar, both held to
                        // serde_json by the property tests).
                        match json_value_end(self.bytes(), start) {
                            Some(end) => self.pos = end,
                            None => self.skip_value()?,
                        }
                        // Both ends are at ASCII bytes (a value's first and past its last).
                        event.data = self.text.get(start..self.pos);
                    }
                    MemberName::SpecVersion => event.specversion = Some(self.value()?),
                    MemberName::Attribute(i) => {
                        let value = self.value()?;
                        JsonEvent::set_string(
                            &mut event.parts.attributes[i],
                            &mut event.not_strings,
                            1 << i,
                            value,
                        );
                    }
                    MemberName::DataContentType => {
                        let value = self.value()?;
                        JsonEvent::set_string(
                            &mut event.parts.datacontenttype,
                            &mut event.not_strings,
                            CONTENT_TYPE_BIT,
                            value,
                        );
                    }
                    MemberName::DataBase64 => {
                        event.has_data_base64 = !matches!(self.value()?, Value::Null)
                    }
                    MemberName::Extension(name) => {
                        let value = self.value()?;
                        event.set_extension(name, value);
                    }
                }
                self.skip_whitespace();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b'}') => {
                        self.pos += 1;
                        break;
                    }
                    _ => return self.fail("`,` or `}`"),
                }
            }
        }
        self.skip_whitespace();
        if self.pos == self.text.len() {
            Ok(())
        } else {
            self.fail("the end of the payload after the event object")
        }
    }

    /// A member's value (at its first byte): strings decoded, containers skipped.
    #[inline(always)]
    fn value(&mut self) -> Scan<Value<'a>> {
        match self.peek() {
            Some(b'"') => self.string().map(Value::Str),
            Some(b'{' | b'[') => self.skip_value().map(|()| Value::Other),
            Some(b't') => self.literal(b"true").map(|()| Value::Bool(true)),
            Some(b'f') => self.literal(b"false").map(|()| Value::Bool(false)),
            Some(b'n') => self.literal(b"null").map(|()| Value::Null),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.pos;
                match self.number()? {
                    Number::Int(i) => Ok(Value::Int(i)),
                    Number::Other => {
                        // As serde_json: a number beyond `f64` is an error, not a value.
                        let finite = self
                            .text
                            .get(start..self.pos)
                            .and_then(|n| n.parse::<f64>().ok())
                            .is_some_and(f64::is_finite);
                        if finite {
                            Ok(Value::Other)
                        } else {
                            Err(SyntaxError {
                                at: start,
                                expected: "a number within the range of an f64",
                            })
                        }
                    }
                }
            }
            _ => self.fail("a JSON value"),
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Scan<()> {
        if self.bytes()[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            self.fail("`true`, `false` or `null`")
        }
    }

    /// A number (at its first byte, `-` or a digit), as the JSON grammar writes it.
    fn number(&mut self) -> Scan<Number> {
        let bytes = self.bytes();
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        let mut magnitude: u64 = 0;
        let mut fits = true;
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                while let Some(&d @ b'0'..=b'9') = bytes.get(self.pos) {
                    match magnitude
                        .checked_mul(10)
                        .and_then(|m| m.checked_add(u64::from(d - b'0')))
                    {
                        Some(m) => magnitude = m,
                        None => fits = false,
                    }
                    self.pos += 1;
                }
            }
            _ => return self.fail("a digit"),
        }
        let mut integer = fits;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.digits()?;
            integer = false;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            self.digits()?;
            integer = false;
        }
        if !integer {
            return Ok(Number::Other);
        }
        Ok(if negative {
            // -1 ..= -2^63; `-0` is a float to serde_json.
            match magnitude {
                1..=0x8000_0000_0000_0000 => Number::Int((magnitude as i64).wrapping_neg()),
                _ => Number::Other,
            }
        } else {
            i64::try_from(magnitude).map_or(Number::Other, Number::Int)
        })
    }

    /// One or more digits.
    fn digits(&mut self) -> Scan<()> {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        if self.pos == start {
            self.fail("a digit")
        } else {
            Ok(())
        }
    }

    /// Index of the first [`is_string_special`] byte at or after `from` (or the end):
    /// eight bytes at a step while there are eight.
    // Inlined into each caller's loop: the constants and the saved registers of a call
    // cost more than the search itself on the short strings of an event (measured).
    #[inline(always)]
    fn plain_run_end(&self, from: usize) -> usize {
        plain_run_end(self.bytes(), from)
    }

    /// A string (at its opening quote), borrowed when it has no escapes.
    // Inlined into each caller's loop: the constants and the saved registers of a call
    // cost more than the search itself on the short strings of an event (measured).
    #[inline(always)]
    fn string(&mut self) -> Scan<Cow<'a, str>> {
        let start = self.pos + 1;
        let end = self.plain_run_end(start);
        match self.bytes().get(end) {
            Some(b'"') => {
                self.pos = end + 1;
                // Both ends are at ASCII bytes (after a quote, at a quote).
                match self.text.get(start..end) {
                    Some(text) => Ok(Cow::Borrowed(text)),
                    None => self.fail("a string"),
                }
            }
            Some(b'\\') => self.escaped_string(start, end).map(Cow::Owned),
            _ => {
                self.pos = end;
                self.fail("a closing `\"` (no control characters in a string)")
            }
        }
    }

    /// A string (at its opening quote) without escapes: the place of its text; `None` for
    /// anything else (no string here, an escape, a control character).
    #[inline(always)]
    fn plain_string(&mut self) -> Option<Span> {
        if self.peek() != Some(b'"') {
            return None;
        }
        let start = self.pos + 1;
        let end = self.plain_run_end(start);
        if self.bytes().get(end) != Some(&b'"') {
            return None;
        }
        self.pos = end + 1;
        Some(Span::new(start, end))
    }

    /// The rest of a string that has an escape at `escape`, decoded.
    fn escaped_string(&mut self, start: usize, mut escape: usize) -> Scan<String> {
        let mut out = String::with_capacity(escape - start + 16);
        let mut run_start = start;
        loop {
            // `run_start` is after a quote or an escape, `escape` at a `\` or `"`: ASCII bytes.
            out.push_str(self.text.get(run_start..escape).unwrap_or_default());
            match self.bytes().get(escape) {
                Some(b'"') => {
                    self.pos = escape + 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.pos = escape + 1;
                    self.unescape_into(&mut out)?;
                }
                _ => {
                    self.pos = escape;
                    return self.fail("a closing `\"` (no control characters in a string)");
                }
            }
            run_start = self.pos;
            escape = self.plain_run_end(run_start);
        }
    }

    /// One escape (after its `\`), decoded into `out`; `\u` escapes must pair surrogates.
    fn unescape_into(&mut self, out: &mut String) -> Scan<()> {
        let Some(b) = self.peek() else {
            return self.fail("an escape");
        };
        self.pos += 1;
        let c = match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let first = self.hex4()?;
                let code = match first {
                    0xDC00..=0xDFFF => {
                        return self.fail("a leading surrogate before a trailing one")
                    }
                    0xD800..=0xDBFF => {
                        if !self.bytes()[self.pos..].starts_with(b"\\u") {
                            return self.fail("a `\\u` trailing surrogate after a leading one");
                        }
                        self.pos += 2;
                        let second = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&second) {
                            return self.fail("a trailing surrogate after a leading one");
                        }
                        0x10000 + ((u32::from(first) - 0xD800) << 10) + (u32::from(second) - 0xDC00)
                    }
                    code => u32::from(code),
                };
                match char::from_u32(code) {
                    Some(c) => c,
                    None => return self.fail("a Unicode scalar value"),
                }
            }
            _ => {
                self.pos -= 1;
                return self.fail("an escape: one of `\"\\/bfnrt` or `u` and four hex digits");
            }
        };
        out.push(c);
        Ok(())
    }

    /// Four hex digits.
    fn hex4(&mut self) -> Scan<u16> {
        let mut value = 0;
        for _ in 0..4 {
            match self.peek().and_then(hex_digit) {
                Some(digit) => value = value << 4 | digit,
                None => return self.fail("four hex digits after `\\u`"),
            }
            self.pos += 1;
        }
        Ok(value)
    }

    /// Checks a string (at its opening quote) without decoding it: escapes must be valid, a
    /// `\u` escape four hex digits.
    // Inlined into each caller's loop: the constants and the saved registers of a call
    // cost more than the search itself on the short strings of an event (measured).
    #[inline(always)]
    fn skip_string(&mut self) -> Scan<()> {
        let mut at = self.plain_run_end(self.pos + 1);
        loop {
            match self.bytes().get(at) {
                Some(b'"') => {
                    self.pos = at + 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.pos = at + 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.pos += 1
                        }
                        Some(b'u') => {
                            self.pos += 1;
                            self.hex4()?;
                        }
                        _ => {
                            return self
                                .fail("an escape: one of `\"\\/bfnrt` or `u` and four hex digits")
                        }
                    }
                    at = self.plain_run_end(self.pos);
                }
                _ => {
                    self.pos = at;
                    return self.fail("a closing `\"` (no control characters in a string)");
                }
            }
        }
    }

    /// Checks and skips one value (at its first byte) of any depth, without recursion.
    fn skip_value(&mut self) -> Scan<()> {
        let mut nesting = Nesting::default();
        loop {
            // At a value.
            self.skip_whitespace();
            match self.peek() {
                Some(open @ (b'{' | b'[')) => {
                    self.pos += 1;
                    self.skip_whitespace();
                    let (object, close) = if open == b'{' {
                        (true, b'}')
                    } else {
                        (false, b']')
                    };
                    if self.peek() == Some(close) {
                        self.pos += 1;
                    } else {
                        nesting.push(object);
                        if object {
                            self.skip_member_name()?;
                        }
                        continue;
                    }
                }
                Some(b'"') => self.skip_string()?,
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => {
                    self.number()?;
                }
                _ => return self.fail("a JSON value"),
            }
            // After a value: close the containers it ends, or go on to the next value.
            loop {
                let Some(object) = nesting.innermost_is_object() else {
                    return Ok(());
                };
                self.skip_whitespace();
                match (self.peek(), object) {
                    (Some(b','), _) => {
                        self.pos += 1;
                        if object {
                            self.skip_whitespace();
                            self.skip_member_name()?;
                        }
                        break;
                    }
                    (Some(b'}'), true) | (Some(b']'), false) => {
                        self.pos += 1;
                        nesting.pop();
                    }
                    (_, true) => return self.fail("`,` or `}`"),
                    (_, false) => return self.fail("`,` or `]`"),
                }
            }
        }
    }

    /// A member name inside a skipped object (at its first byte) and the `:` after it.
    fn skip_member_name(&mut self) -> Scan<()> {
        if self.peek() != Some(b'"') {
            return self.fail("a member name");
        }
        self.skip_string()?;
        self.eat(b':', "`:`")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use cloudevents::event::{Data, ExtensionValue};
    use cloudevents::{AttributesWriter, Event, EventBuilder, EventBuilderV10};
    use proptest::prelude::*;
    use serde_json::value::RawValue;

    use super::*;
    use crate::codec::{decode, encode, ContentMode, HeaderMap, STRUCTURED_CONTENT_TYPE};

    /// A member as read, for comparing the pass with the reference reader.
    #[derive(Debug, PartialEq)]
    enum Read {
        Null,
        Str(String),
        Bool(bool),
        Int(i64),
        Other,
        Data(String),
    }

    impl From<Value<'_>> for Read {
        fn from(value: Value<'_>) -> Self {
            match value {
                Value::Null => Read::Null,
                Value::Str(text) => Read::Str(text.into_owned()),
                Value::Bool(b) => Read::Bool(b),
                Value::Int(i) => Read::Int(i),
                Value::Other => Read::Other,
            }
        }
    }

    /// The members the pass read, by name (each with its last value), in the form
    /// [`normalized`] gives.
    fn members(event: JsonEvent<'_>) -> BTreeMap<String, Read> {
        let mut out = BTreeMap::new();
        if let Some(version) = event.specversion {
            out.insert("specversion".to_owned(), version.into());
        }
        let attributes = V10_ATTRIBUTES
            .into_iter()
            .zip(event.parts.attributes)
            .chain([("datacontenttype", event.parts.datacontenttype)]);
        for (i, (name, value)) in attributes.enumerate() {
            if let Some(text) = value {
                out.insert(name.to_owned(), Read::Str(text.into_owned()));
            } else if event.not_strings & (1 << i) != 0 {
                out.insert(name.to_owned(), Read::Other);
            }
        }
        if event.has_data_base64 {
            out.insert("data_base64".to_owned(), Read::Other);
        }
        if let Some(data) = event.data {
            out.insert("data".to_owned(), Read::Data(data.to_owned()));
        }
        for (name, value) in event.parts.extensions {
            let value = match value {
                PartsValue::Str(text) => Read::Str(text.into_owned()),
                PartsValue::Bool(b) => Read::Bool(b),
                PartsValue::Int(i) => Read::Int(i),
            };
            out.insert(name.into_owned(), value);
        }
        for name in event.bad_extensions {
            out.insert(name.into_owned(), Read::Other);
        }
        out
    }

    /// What the pass keeps of each member: `null` is absent (but for `specversion`, kept as
    /// read, and `data`, kept as its text); a spec attribute or extension that is not what it
    /// must be is `Other`, and so is any `data_base64`.
    fn normalized(members: BTreeMap<String, Read>) -> BTreeMap<String, Read> {
        members
            .into_iter()
            .filter_map(|(name, value)| {
                let value = match (name.as_str(), value) {
                    ("specversion", value) | ("data", value) => value,
                    (_, Read::Null) => return None,
                    ("data_base64", _) => Read::Other,
                    (
                        "id" | "source" | "type" | "subject" | "time" | "dataschema"
                        | "datacontenttype",
                        Read::Str(text),
                    ) => Read::Str(text),
                    (
                        "id" | "source" | "type" | "subject" | "time" | "dataschema"
                        | "datacontenttype",
                        _,
                    ) => Read::Other,
                    (_, value) => value,
                };
                Some((name, value))
            })
            .collect()
    }

    /// The reference: serde_json reading the payload as this module's pass replaced it
    /// (`data` as a `RawValue`, every other member through `deserialize_any`, arrays and
    /// objects in it skipped with `IgnoredAny`), with each member's last value.
    fn reference(payload: &[u8]) -> Option<BTreeMap<String, Read>> {
        struct Member(Read);
        impl<'de> serde::Deserialize<'de> for Member {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl<'de> serde::de::Visitor<'de> for Visitor {
                    type Value = Member;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a JSON value")
                    }
                    fn visit_unit<E>(self) -> Result<Member, E> {
                        Ok(Member(Read::Null))
                    }
                    fn visit_bool<E>(self, v: bool) -> Result<Member, E> {
                        Ok(Member(Read::Bool(v)))
                    }
                    fn visit_i64<E>(self, v: i64) -> Result<Member, E> {
                        Ok(Member(Read::Int(v)))
                    }
                    fn visit_u64<E>(self, v: u64) -> Result<Member, E> {
                        Ok(Member(i64::try_from(v).map_or(Read::Other, Read::Int)))
                    }
                    fn visit_f64<E>(self, _: f64) -> Result<Member, E> {
                        Ok(Member(Read::Other))
                    }
                    fn visit_str<E>(self, v: &str) -> Result<Member, E> {
                        Ok(Member(Read::Str(v.to_owned())))
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(
                        self,
                        mut seq: A,
                    ) -> Result<Member, A::Error> {
                        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                        Ok(Member(Read::Other))
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<Member, A::Error> {
                        while map
                            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                            .is_some()
                        {}
                        Ok(Member(Read::Other))
                    }
                }
                d.deserialize_any(Visitor)
            }
        }
        struct Members(BTreeMap<String, Read>);
        impl<'de> serde::Deserialize<'de> for Members {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl<'de> serde::de::Visitor<'de> for Visitor {
                    type Value = Members;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a JSON object")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<Members, A::Error> {
                        let mut out = BTreeMap::new();
                        while let Some(name) = map.next_key::<String>()? {
                            let value = if name == "data" {
                                Read::Data(map.next_value::<&RawValue>()?.get().to_owned())
                            } else {
                                map.next_value::<Member>()?.0
                            };
                            out.insert(name, value);
                        }
                        Ok(Members(out))
                    }
                }
                d.deserialize_map(Visitor)
            }
        }
        let text = std::str::from_utf8(payload).ok()?;
        serde_json::from_str::<Members>(text)
            .ok()
            .map(|m| normalized(m.0))
    }

    fn ours(payload: &[u8]) -> Option<BTreeMap<String, Read>> {
        read_event(payload).ok().map(members)
    }

    #[test]
    fn strings_are_borrowed_unless_escaped_and_escapes_are_decoded() {
        let event = read_event(
            br#"{"id":"plain text","source":"a\"b\\c\/d\b\f\n\r\t\u00e9\ud83d\ude00 end"}"#,
        )
        .unwrap();
        let [id, source, ..] = event.parts.attributes;
        assert!(matches!(id, Some(Cow::Borrowed("plain text"))));
        match source {
            Some(Cow::Owned(text)) => {
                assert_eq!(text, "a\"b\\c/d\u{8}\u{c}\n\r\té😀 end")
            }
            _ => panic!("an escaped string is decoded"),
        }
    }

    #[test]
    fn data_is_kept_as_its_json_text() {
        let payload = br#"{ "data" :  {"a": [1, -2.5e3, "\ud800", {}], "b" : null}  , "id":"1"}"#;
        let event = read_event(payload).unwrap();
        assert_eq!(
            event.data,
            Some(r#"{"a": [1, -2.5e3, "\ud800", {}], "b" : null}"#)
        );
        assert_eq!(read_event(br#"{"data":"x"}"#).unwrap().data, Some(r#""x""#));
        assert_eq!(read_event(br#"{"data":null}"#).unwrap().data, Some("null"));
    }

    #[test]
    fn numbers_are_integers_only_when_serde_json_reads_them_so() {
        let read = |n: &str| {
            let payload = format!(r#"{{"ext":{n}}}"#);
            read_event(payload.as_bytes()).map(|e| members(e).remove("ext").unwrap())
        };
        assert_eq!(read("0").ok(), Some(Read::Int(0)));
        assert_eq!(read("-7").ok(), Some(Read::Int(-7)));
        assert_eq!(read("9223372036854775807").ok(), Some(Read::Int(i64::MAX)));
        assert_eq!(read("-9223372036854775808").ok(), Some(Read::Int(i64::MIN)));
        assert_eq!(read("9223372036854775808").ok(), Some(Read::Other));
        assert_eq!(read("-9223372036854775809").ok(), Some(Read::Other));
        assert_eq!(
            read("123456789012345678901234567890").ok(),
            Some(Read::Other)
        );
        assert_eq!(read("-0").ok(), Some(Read::Other));
        assert_eq!(read("1.5").ok(), Some(Read::Other));
        assert_eq!(read("1E+2").ok(), Some(Read::Other));
        for bad in [
            "01", "-", "+1", "1.", ".5", "1e", "1e+", "--1", "0x10", "1e400", "-1e400",
        ] {
            let err = read(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} is refused"));
            assert_eq!(err.kind(), DecodeErrorKind::NotJson, "{bad}");
        }
    }

    #[test]
    fn plain_run_end_finds_the_first_special_byte_at_any_offset() {
        // Plain bytes around it include ones a word trick could mistake: 0x20, 0x7F, 0x80,
        // 0xFF, and `"`/`\` neighbours in value (0x21, 0x23, 0x5B, 0x5D).
        let plain = [b'a', 0x20, 0x21, 0x23, 0x5B, 0x5D, 0x7F, 0x80, 0xFF];
        for len in 0..40 {
            for start in 0..3.min(len + 1) {
                let mut bytes: Vec<u8> = (0..len).map(|i| plain[i % plain.len()]).collect();
                assert_eq!(plain_run_end(&bytes, start), len, "none in {len} bytes");
                for at in start..len {
                    for special in [b'"', b'\\', 0x00, 0x01, 0x1F] {
                        let kept = bytes[at];
                        bytes[at] = special;
                        // A second special byte after the first must not matter.
                        let later = (at + 9).min(len - 1);
                        let kept_later = bytes[later];
                        bytes[later] = b'"';
                        assert_eq!(
                            plain_run_end(&bytes, start),
                            at,
                            "{special:#x} at {at} of {len}"
                        );
                        bytes[later] = kept_later;
                        bytes[at] = kept;
                    }
                }
            }
        }
    }

    #[test]
    fn malformed_json_is_not_json_and_says_where() {
        let cases: [&[u8]; 16] = [
            b"",
            b"   ",
            b"[]",
            b"{",
            b"{\"id\"}",
            b"{\"id\":}",
            b"{\"id\":\"1\",}",
            b"{\"id\":\"1\"} x",
            b"{\"id\":\"a\x01b\"}",
            b"{\"id\":\"\\x\"}",
            b"{\"id\":\"\\u12g4\"}",
            b"{\"id\":\"\\ud800\"}",
            b"{\"id\":\"\\udc00\"}",
            b"{\"data\":[1,2}",
            b"{\"data\":{\"a\" 1}}",
            b"{\"id\":\"\xff\"}",
        ];
        for payload in cases {
            let err = match read_event(payload) {
                Ok(_) => panic!("{:?} is refused", String::from_utf8_lossy(payload)),
                Err(e) => e,
            };
            assert_eq!(err.kind(), DecodeErrorKind::NotJson);
            assert!(
                reference(payload).is_none(),
                "{:?}",
                String::from_utf8_lossy(payload)
            );
        }
        let err = read_event(br#"{"id":"1" "source":"s"}"#).err().unwrap();
        assert_eq!(err.detail_text(), Some("at byte 10: expected `,` or `}`"));
        // Inside `data` the lean check fails first; the scanner's then says where.
        let err = read_event(br#"{"data":{"a" 1}}"#).err().unwrap();
        assert_eq!(err.detail_text(), Some("at byte 13: expected `:`"));
    }

    #[test]
    fn nesting_of_any_depth_is_checked_without_recursion() {
        for depth in [1, 63, 64, 65, 128, 129, 100_000] {
            let nested = format!(
                r#"{{"data":{}{}{}}}"#,
                r#"[{"a":"#.repeat(depth),
                "1",
                "}]".repeat(depth)
            );
            let event = read_event(nested.as_bytes()).unwrap_or_else(|e| panic!("{depth}: {e}"));
            assert_eq!(event.data.map(str::len), Some(nested.len() - 9));
            // One closing bracket swapped, at the innermost level and at the outermost.
            let inner = nested.replacen("}]", "]]", 1);
            assert!(read_event(inner.as_bytes()).is_err(), "{depth}");
            let closes = "}]".repeat(depth);
            let outer = format!(
                r#"{{"data":{}1{}}}}}"#,
                r#"[{"a":"#.repeat(depth),
                &closes[..closes.len() - 1]
            );
            assert!(read_event(outer.as_bytes()).is_err(), "{depth}");
        }
    }

    #[test]
    fn a_repeated_member_counts_with_its_last_value() {
        let event = read_event(br#"{"id":"1","x":1,"id":"2","x":null,"y":true,"x":"3"}"#).unwrap();
        let map = members(event);
        assert_eq!(map.get("id"), Some(&Read::Str("2".into())));
        assert_eq!(map.get("x"), Some(&Read::Str("3".into())));
        assert_eq!(map.get("y"), Some(&Read::Bool(true)));
    }

    #[test]
    fn member_names_with_escapes_are_matched_decoded() {
        let event = read_event(br#"{"\u0069d":"1","d\u0061ta":[1]}"#).unwrap();
        assert!(matches!(&event.parts.attributes[0], Some(id) if id == "1"));
        assert_eq!(event.data, Some("[1]"));
    }

    #[test]
    fn json_string_reads_exactly_one_string() {
        assert_eq!(json_string(r#""h\u00e9""#).as_deref(), Some("hé"));
        assert_eq!(json_string(r#""""#).as_deref(), Some(""));
        for bad in [r#""a" "#, "1", r#"{"a":1}"#, r#""a"#, r#""\ud800""#, ""] {
            assert_eq!(json_string(bad), None, "{bad}");
        }
    }

    #[test]
    fn special_bytes_are_found_at_every_position_of_a_word() {
        for position in 0..8 {
            for byte in 0..=255u8 {
                let mut word = *b"abcdefgh";
                word[position] = byte;
                let bits = string_special_bits(u64::from_le_bytes(word));
                let found = (bits != 0).then(|| bits.trailing_zeros() as usize / 8);
                let expected = is_string_special(byte).then_some(position);
                assert_eq!(found, expected, "byte {byte:#x} at {position}");
            }
        }
    }

    /// A JSON value as text, with the shapes the pass treats differently: escapes, surrogates,
    /// numbers at the edges of `i64` and `f64`, nested containers.
    fn json_value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            Just("0".to_owned()),
            Just("-0".to_owned()),
            Just("-12".to_owned()),
            Just("9223372036854775808".to_owned()),
            Just("-9223372036854775808".to_owned()),
            Just("18446744073709551616".to_owned()),
            Just("1.5e3".to_owned()),
            Just("-2.5E-3".to_owned()),
            Just("1e400".to_owned()),
            Just(r#""""#.to_owned()),
            Just(r#""caf\u00e9 \ud83d\ude00""#.to_owned()),
            Just(r#""\ud83d""#.to_owned()),
            Just(r#""\udc00x""#.to_owned()),
            Just(r#""\"\\\/\b\f\n\r\t""#.to_owned()),
            any::<i64>().prop_map(|i| i.to_string()),
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        ];
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|items| format!("[{}]", items.join(", "))),
                proptest::collection::vec((member_name_text(), inner), 0..4).prop_map(|members| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(n, v)| format!("{n}:{v}"))
                        .collect();
                    format!("{{ {} }}", members.join(","))
                }),
            ]
        })
    }

    fn member_name_text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(r#""specversion""#.to_owned()),
            Just(r#""id""#.to_owned()),
            Just(r#""source""#.to_owned()),
            Just(r#""type""#.to_owned()),
            Just(r#""time""#.to_owned()),
            Just(r#""datacontenttype""#.to_owned()),
            Just(r#""data""#.to_owned()),
            Just(r#""data_base64""#.to_owned()),
            Just(r#""d\u0061ta""#.to_owned()),
            Just(r#""subject""#.to_owned()),
            Just(r#""dataschema""#.to_owned()),
            Just(r#""transactionid""#.to_owned()),
            // Names that the plain-name match must not take for the ones above.
            prop::sample::select(vec!["ids", "typ", "timex", "subjects", "transactionids"])
                .prop_map(|name| format!("\"{name}\"")),
            Just(r#""ext""#.to_owned()),
            "\"[a-z]{1,8}\"",
        ]
    }

    /// A JSON event object as text, then changed at up to three places (a byte deleted,
    /// replaced or inserted: one of the bytes JSON's grammar turns on, or a byte that is not
    /// UTF-8).
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        let whitespace = prop_oneof![Just(""), Just(" "), Just("\n\t "), Just("\r")];
        let members =
            proptest::collection::vec((member_name_text(), json_value(), whitespace), 0..8);
        let edits = proptest::collection::vec(
            (
                any::<proptest::sample::Index>(),
                0..3u8,
                proptest::sample::select(b"{}[],:\"\\ 0-eE.u\x01\xc3ntf".to_vec()),
            ),
            0..3,
        );
        (members, edits).prop_map(|(members, edits)| {
            let members: Vec<String> = members
                .into_iter()
                .map(|(n, v, ws)| format!("{ws}{n}{ws}:{ws}{v}{ws}"))
                .collect();
            let mut bytes = format!("{{{}}}", members.join(",")).into_bytes();
            apply_edits(&mut bytes, edits);
            bytes
        })
    }

    /// Removes, replaces or inserts a byte at each `(place, edit, byte)`.
    fn apply_edits(bytes: &mut Vec<u8>, edits: Vec<(proptest::sample::Index, u8, u8)>) {
        for (at, edit, byte) in edits {
            let i = at.index(bytes.len() + 1);
            match edit {
                0 if i < bytes.len() => {
                    bytes.remove(i);
                }
                1 if i < bytes.len() => bytes[i] = byte,
                _ => bytes.insert(i, byte),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// The pass accepts exactly what serde_json accepted before it and reads the same
        /// members; what it refuses is `NotJson` (`NotCloudEvent` without a CloudEvents
        /// `Content-Type`), and `decode` never panics.
        #[test]
        fn the_pass_reads_what_serde_json_reads(payload in prop_oneof![
            payload(),
            proptest::collection::vec(any::<u8>(), 0..64),
        ]) {
            let ours_read = ours(&payload);
            prop_assert_eq!(&ours_read, &reference(&payload), "{:?}", String::from_utf8_lossy(&payload));
            let payload = Bytes::from(payload);
            let mut ct = HeaderMap::new();
            ct.insert("Content-Type", STRUCTURED_CONTENT_TYPE);
            let with_ct = decode(Some(&ct), &payload);
            let without = decode(None, &payload);
            if ours_read.is_none() {
                prop_assert_eq!(with_ct.err().map(|e| e.kind()), Some(DecodeErrorKind::NotJson));
                prop_assert_eq!(without.err().map(|e| e.kind()), Some(DecodeErrorKind::NotCloudEvent));
            }
        }

        /// Whatever the fast path (`read_plain`) reads, the general pass reads the same: an
        /// event in the plain shape, with members of every kind added (spec names, escaped
        /// names, extensions, values of each JSON type, whitespace) and then changed at up to
        /// three places. Where the fast path takes an event, the general pass reads it as a
        /// spec 1.0 event with the same attributes, data and extensions, in the same order.
        #[test]
        fn the_plain_path_reads_what_the_general_path_reads(
            members in proptest::collection::vec(
                (
                    member_name_text(),
                    prop_oneof![json_value(), "\"[a-z0-9 ]{0,10}\"", Just("7".to_owned())],
                    prop_oneof![Just(""), Just(" "), Just("\n\t")],
                ),
                0..6,
            ),
            edits in proptest::collection::vec(
                (
                    any::<proptest::sample::Index>(),
                    0..3u8,
                    proptest::sample::select(b"{}[],:\"\\ 0-eE.u\x01\xc3ntf;".to_vec()),
                ),
                0..3,
            ),
        ) {
            let mut body = vec![
                r#""specversion":"1.0""#.to_owned(),
                r#""id":"i-1""#.to_owned(),
                r#""source":"s""#.to_owned(),
                r#""type":"t""#.to_owned(),
            ];
            body.extend(members.into_iter().map(|(n, v, ws)| format!("{ws}{n}{ws}:{ws}{v}{ws}")));
            let mut payload = format!("{{{}}}", body.join(",")).into_bytes();
            apply_edits(&mut payload, edits);
            let Ok(text) = payload_text(&payload) else {
                return Ok(());
            };
            let Some(plain) = read_plain(text) else {
                return Ok(());
            };
            let mut general = read_event(&payload).expect("the general pass reads it");
            prop_assert_eq!(general.check_members().ok(), Some(true));
            let parts = general.parts();
            prop_assert_eq!(parts.specversion.as_deref(), Some("1.0"));
            prop_assert!(parts.attributes[5].is_none(), "no dataschema");
            let at = |span: Option<Span>| span.map(|s| s.of(text).expect("a place in the text"));
            for (i, place) in plain.attributes.iter().enumerate() {
                prop_assert_eq!(at(*place), parts.attributes[i].as_deref(), "{}", V10_ATTRIBUTES[i]);
            }
            prop_assert_eq!(at(plain.datacontenttype), parts.datacontenttype.as_deref());
            prop_assert_eq!(at(plain.data).filter(|d| *d != "null"), general.data.filter(|d| *d != "null"));
            let theirs: Vec<(String, String)> = parts
                .extensions
                .iter()
                .map(|(name, value)| {
                    let value = match value {
                        PartsValue::Str(text) => format!("s:{text}"),
                        PartsValue::Bool(b) => format!("b:{b}"),
                        PartsValue::Int(i) => format!("i:{i}"),
                    };
                    (name.to_string(), value)
                })
                .collect();
            let ours: Vec<(String, String)> = plain
                .extensions
                .iter()
                .flatten()
                .map(|(name, value)| {
                    let value = match value {
                        WireValue::Str(span) => format!("s:{}", at(Some(*span)).unwrap_or_default()),
                        WireValue::Bool(b) => format!("b:{b}"),
                        WireValue::Int(i) => format!("i:{i}"),
                    };
                    (at(Some(*name)).unwrap_or_default().to_owned(), value)
                })
                .collect();
            prop_assert_eq!(ours, theirs, "{}", text);
        }

        /// The encoder's check of JSON text data (`is_json_text`) accepts exactly the UTF-8
        /// text that serde_json reads as one value (the check it replaced), on generated
        /// values changed at up to three places and on arbitrary bytes.
        #[test]
        fn json_text_check_agrees_with_serde_json(text in prop_oneof![
            (json_value(), proptest::collection::vec((
                any::<proptest::sample::Index>(),
                0..3u8,
                proptest::sample::select(b"{}[],:\"\\ 0-eE.u\x01\xc3ntf".to_vec()),
            ), 0..3)).prop_map(|(value, edits)| {
                let mut bytes = format!(" {value}\n").into_bytes();
                apply_edits(&mut bytes, edits);
                bytes
            }),
            proptest::collection::vec(any::<u8>(), 0..32),
        ]) {
            let reference = std::str::from_utf8(&text).is_ok()
                && serde_json::from_slice::<serde::de::IgnoredAny>(&text).is_ok();
            prop_assert_eq!(is_json_text(&text), reference, "{:?}", String::from_utf8_lossy(&text));
        }

        /// Any 1.0 event encoded in structured mode decodes to itself, byte for byte: every
        /// attribute and extension, and its data (JSON data as the JSON text the encoder wrote).
        #[test]
        fn structured_round_trip_is_exact(
            (id, source, ty, subject) in (".+", ".+", ".+", proptest::option::of(".+")),
            time in proptest::option::of((-62_167_219_200i64..253_402_300_800, 0..1_000_000_000u32)),
            extensions in proptest::collection::vec(("[a-z][a-z0-9]{0,7}", prop_oneof![
                any::<String>().prop_map(ExtensionValue::String),
                any::<bool>().prop_map(ExtensionValue::Boolean),
                any::<i64>().prop_map(ExtensionValue::Integer),
            ]), 0..4),
            data in prop_oneof![
                Just(None),
                any::<String>().prop_map(|t| {
                    Some(("application/json", Data::Json(serde_json::Value::String(t))))
                }),
                Just(Some((
                    "application/json",
                    Data::Json(serde_json::json!({"a": [1, 2.5, null], "é": "x\u{1}"})),
                ))),
                any::<String>().prop_map(|t| Some(("text/plain", Data::String(t)))),
                proptest::collection::vec(any::<u8>(), 0..40)
                    .prop_map(|b| Some(("application/octet-stream", Data::Binary(b)))),
            ],
        ) {
            let mut event = EventBuilderV10::new().id(id).source(source).ty(ty).build().unwrap();
            event.set_subject(subject);
            event.set_time(time.and_then(|(s, n)| chrono::DateTime::from_timestamp(s, n)));
            for (name, value) in extensions {
                if super::super::spec_attribute_name(&name).is_none() && name != "data" {
                    event.set_extension(&name, value);
                }
            }
            if let Some((ct, data)) = data {
                event.set_data(ct, data);
            }
            let msg = encode(&event, ContentMode::Structured).unwrap();
            let back = decode(Some(&msg.headers.to_header_map()), &msg.payload).unwrap();
            let mut expected: Event = event.clone();
            if let Some(Data::Json(value)) = event.data() {
                expected.set_data_unchecked(serde_json::to_vec(value).unwrap());
            }
            prop_assert_eq!(back, expected);
        }
    }

    /// Members that set or hide a `transactionid`, in the ways a sender may write one.
    fn transaction_id_member() -> impl Strategy<Value = String> {
        let name = prop_oneof![
            Just(r#""transactionid""#),
            Just(r#""transacti\u006fnid""#),
            Just(r#""transactionId""#),
            Just(r#""data""#),
            Just(r#""id""#),
        ];
        let value = prop_oneof![
            Just(r#""tid-a""#),
            Just(r#""tid-b""#),
            Just(r#""\u0074id-a""#),
            Just(r#""""#),
            Just("7"),
            Just("true"),
            Just("null"),
            Just(r#"{"transactionid":"tid-b"}"#),
            Just(r#"["tid-b"]"#),
        ];
        (name, value).prop_map(|(n, v)| format!("{n}:{v}"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Whenever `decode` succeeds, the transaction id read without decoding (when one is
        /// read) is the decoded event's: on events with `transactionid` members written in
        /// every way a sender may (escaped, twice, nested, not a string), changed at up to
        /// three places, spec 1.0 and 0.3, with or without `data_base64`, with no headers, the
        /// structured Content-Type, that and `ce-*` headers, or `ce-*` headers alone (binary);
        /// and each decoded 1.0 event re-encoded in binary mode.
        #[test]
        fn peeked_transaction_id_is_what_decode_reads(
            version in prop_oneof![Just("1.0"), Just("0.3")],
            base64 in any::<bool>(),
            header_set in 0..4u8,
            members in proptest::collection::vec(transaction_id_member(), 0..4),
            edits in proptest::collection::vec((
                any::<proptest::sample::Index>(),
                0..3u8,
                proptest::sample::select(b"{}[],:\"\\ 0-u\x01\xc3t".to_vec()),
            ), 0..3),
        ) {
            use crate::cloudevent::EventExt;
            let mut bytes = format!(
                r#"{{"specversion":"{version}","id":"i","source":"s","type":"t"{}{}}}"#,
                if base64 { r#","data_base64":"aGk=""# } else { "" },
                members.iter().map(|m| format!(",{m}")).collect::<String>(),
            )
            .into_bytes();
            apply_edits(&mut bytes, edits);
            let payload = Bytes::from(bytes);
            // No headers; the structured Content-Type; that and `ce-*` headers too (still
            // structured); `ce-*` headers alone (binary: the payload is the data).
            let mut headers = HeaderMap::new();
            if matches!(header_set, 1 | 2) {
                headers.insert("Content-Type", STRUCTURED_CONTENT_TYPE);
            }
            if matches!(header_set, 2 | 3) {
                for (name, value) in [
                    ("ce-specversion", "1.0"),
                    ("ce-id", "h"),
                    ("ce-source", "s"),
                    ("ce-type", "t"),
                    ("ce-transactionid", "tid-b"),
                ] {
                    headers.insert(name, value);
                }
            }
            let headers = (header_set > 0).then_some(headers);
            if let Ok(event) = decode(headers.as_ref(), &payload) {
                let peeked = crate::codec::peek_transaction_id(headers.as_ref(), &payload);
                if let Some(tid) = peeked {
                    prop_assert_eq!(
                        event.transaction_id().map(|t| t.as_str().to_owned()),
                        Some(tid.into_owned()),
                        "{:?}", String::from_utf8_lossy(&payload)
                    );
                }
                // The same event in binary mode.
                let msg = encode(&event, ContentMode::Binary).unwrap();
                let headers = msg.headers.to_header_map();
                let peeked = crate::codec::peek_transaction_id(Some(&headers), &msg.payload);
                let back = decode(Some(&headers), &msg.payload).unwrap();
                prop_assert_eq!(
                    peeked.map(Cow::into_owned),
                    back.transaction_id().map(|t| t.as_str().to_owned())
                );
            }
        }
    }

    /// What this library sends is read without decoding, in both modes: the skip is taken.
    #[test]
    fn transaction_ids_this_library_writes_are_peeked() {
        use crate::cloudevent::{new_event_with_tid, TransactionId};
        let tid = TransactionId::generate();
        let event =
            new_event_with_tid("t", "s", &serde_json::json!({"a": [1]}), tid.clone()).unwrap();
        for mode in [ContentMode::Structured, ContentMode::Binary] {
            let msg = encode(&event, mode).unwrap();
            let headers = msg.headers.to_header_map();
            assert_eq!(
                crate::codec::peek_transaction_id(Some(&headers), &msg.payload).as_deref(),
                Some(tid.as_str()),
                "{mode:?}"
            );
        }
        let none = new_event_with_tid("t", "s", &1, TransactionId::generate()).unwrap();
        let mut none = none;
        none.remove_extension(crate::cloudevent::TRANSACTION_ID_EXTENSION);
        let msg = encode(&none, ContentMode::Structured).unwrap();
        assert_eq!(crate::codec::peek_transaction_id(None, &msg.payload), None);
    }
}
