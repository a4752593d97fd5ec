//! CloudEvent creation helpers and the identity newtypes of the wire contract:
//! [`EventType`], [`QueryOp`], [`TransactionId`], event ids `cloudevent-<xid>`, UTC times and
//! JSON data, plus [`EventExt`] to read and write the `transactionid` extension and typed data.
//!
//! # Examples
//!
//! ```
//! use ce_messaging::cloudevent::{new_event, EventExt, EventType};
//! use cloudevents::AttributesReader;
//!
//! #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
//! struct Order { id: u32 }
//!
//! let event = new_event(&EventType::from("org.example.order.created"), "orders", &Order { id: 7 })?;
//! assert!(event.id().starts_with("cloudevent-"));
//! assert!(event.transaction_id().unwrap().as_str().starts_with("tid-"));
//! assert_eq!(event.data_as::<Order>()?, Order { id: 7 });
//! # Ok::<(), ce_messaging::error::EventError>(())
//! ```

use std::borrow::Borrow;
use std::fmt;

use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesReader, AttributesWriter, Data, Event, EventBuilder, EventBuilderV10};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{Error, EventError, EventErrorKind};

/// The name of the CloudEvents extension that carries the transaction id.
pub const TRANSACTION_ID_EXTENSION: &str = "transactionid";

/// A `source` value that asks the connection to fill in its configured source (client id).
pub const AUTO_POPULATE_SOURCE: &str = "AUTO_POPULATE";

/// The content type of the data of events created by this module.
pub const JSON_CONTENT_TYPE: &str = "application/json";

macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a string.
            pub fn new(value: impl Into<String>) -> Self {
                $name(value.into())
            }

            /// The string value.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Unwraps into the string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                $name(value.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(value: String) -> Self {
                $name(value)
            }
        }

        impl From<&String> for $name {
            fn from(value: &String) -> Self {
                $name(value.clone())
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

string_newtype! {
    /// The CloudEvents `type` of a persisted event, e.g. `org.example.order.created`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::cloudevent::EventType;
    /// let ty = EventType::from("org.example.order.created");
    /// assert_eq!(ty.as_str(), "org.example.order.created");
    /// ```
    EventType
}

string_newtype! {
    /// A query operation: the CloudEvents `type` of a request, and its NATS subject,
    /// e.g. `cyverse.workspace.get`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::cloudevent::QueryOp;
    /// let op = QueryOp::from("cyverse.workspace.get");
    /// assert_eq!(op.to_string(), "cyverse.workspace.get");
    /// ```
    QueryOp
}

string_newtype! {
    /// A transaction id (`tid-<xid>`), carried in the `transactionid` extension so that
    /// responses can be matched to requests.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::cloudevent::TransactionId;
    /// let tid = TransactionId::generate();
    /// assert!(tid.as_str().starts_with("tid-"));
    /// assert_eq!(tid.as_str().len(), 4 + 20);
    /// ```
    TransactionId
}

impl TransactionId {
    /// A new, globally unique transaction id `tid-<xid>`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::cloudevent::TransactionId;
    /// assert_ne!(TransactionId::generate(), TransactionId::generate());
    /// ```
    pub fn generate() -> Self {
        TransactionId(prefixed_xid("tid-"))
    }
}

/// The longest event type or query op, in bytes (UTF-8): the NATS recommendation for a whole
/// subject (under 256 characters). An event's subject adds `NATS_JS_SUBJECT_PREFIX` (itself at
/// most 255 bytes) and a dot, so it stays far below the server's 4 KiB protocol line.
///
/// # Examples
///
/// ```
/// use ce_messaging::cloudevent::{check_type, MAX_TYPE_LEN};
/// assert!(check_type(&"x".repeat(MAX_TYPE_LEN)).is_ok());
/// assert!(check_type(&"x".repeat(MAX_TYPE_LEN + 1)).is_err());
/// ```
pub const MAX_TYPE_LEN: usize = 255;

/// Checks the one rule for event types and query ops, which become NATS subjects (an op is the
/// request subject, a type the last tokens of `<prefix>.<type>`): dot-separated tokens, none
/// empty (no leading, trailing or double dot), no wildcard character (`*`, `>`) anywhere, no
/// whitespace (also Unicode whitespace) and no control characters, at most [`MAX_TYPE_LEN`]
/// bytes, and a first token other than `_priority` (reserved for the subjects of priority
/// levels, `<prefix>._priority.<p>.<type>`). Every entry point checks it (publish, listen, EventSource, request, reply streams,
/// the CLI through them) and refuses a bad name at once, before anything is sent or
/// subscribed.
///
/// # Errors
///
/// [`EventErrorKind::InvalidType`] with a detail that quotes the name (escaped, cut at 80
/// characters) and says what is wrong.
///
/// # Examples
///
/// ```
/// use ce_messaging::cloudevent::check_type;
/// use ce_messaging::error::EventErrorKind;
///
/// assert!(check_type("org.example.order.created").is_ok());
/// for bad in ["probe.*", ">", "a b", "a..b", ".a", "a\tb", "", "_priority.0.x"] {
///     assert_eq!(check_type(bad).unwrap_err().kind(), EventErrorKind::InvalidType);
/// }
/// ```
pub fn check_type(name: &str) -> Result<(), EventError> {
    let refuse = |why: String| {
        Err(Error::with_detail(
            EventErrorKind::InvalidType,
            format!("{}: {why}", quoted_prefix(name)),
        ))
    };
    if name.is_empty() {
        return refuse("is empty".into());
    }
    if name.len() > MAX_TYPE_LEN {
        return refuse(format!(
            "is {} bytes long, at most {MAX_TYPE_LEN} are allowed",
            name.len()
        ));
    }
    if let Some((at, c)) = name
        .char_indices()
        .find(|(_, c)| c.is_whitespace() || c.is_control() || matches!(c, '*' | '>'))
    {
        let what = if matches!(c, '*' | '>') {
            "a wildcard"
        } else if c.is_whitespace() {
            "whitespace"
        } else {
            "a control character"
        };
        return refuse(format!(
            "contains {what} ({c:?} at byte {at}); types and ops are literal subject tokens"
        ));
    }
    if name.split('.').any(str::is_empty) {
        return refuse("has an empty token (a leading, trailing or double '.')".into());
    }
    if name.split('.').next() == Some(crate::events::PRIORITY_TOKEN) {
        return refuse(format!(
            "starts with the reserved token {:?} (the subjects of priority levels)",
            crate::events::PRIORITY_TOKEN
        ));
    }
    Ok(())
}

/// `name` quoted with escapes, cut after 80 characters so a huge name stays readable.
fn quoted_prefix(name: &str) -> String {
    const SHOWN: usize = 80;
    match name.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}... ({} bytes)", &name[..cut], name.len()),
        None => format!("{name:?}"),
    }
}

impl EventType {
    /// Checks this type against the subject-token rule, see [`check_type`].
    ///
    /// # Errors
    ///
    /// As [`check_type`].
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::cloudevent::EventType;
    /// assert!(EventType::from("org.example.order.created").check().is_ok());
    /// assert!(EventType::from("org.example.*").check().is_err());
    /// ```
    pub fn check(&self) -> Result<(), EventError> {
        check_type(&self.0)
    }
}

impl QueryOp {
    /// Checks this op against the subject-token rule, see [`check_type`].
    ///
    /// # Errors
    ///
    /// As [`check_type`].
    ///
    /// # Examples
    ///
    /// ```
    /// use ce_messaging::cloudevent::QueryOp;
    /// assert!(QueryOp::from("cyverse.workspace.get").check().is_ok());
    /// assert!(QueryOp::from("cyverse..get").check().is_err());
    /// ```
    pub fn check(&self) -> Result<(), EventError> {
        check_type(&self.0)
    }
}

/// A new, globally unique event id `cloudevent-<xid>`.
///
/// # Examples
///
/// ```
/// let id = ce_messaging::cloudevent::new_event_id();
/// assert!(id.starts_with("cloudevent-"));
/// assert_eq!(id.len(), "cloudevent-".len() + 20);
/// ```
pub fn new_event_id() -> String {
    prefixed_xid("cloudevent-")
}

/// `prefix` and a new xid, in one allocation of the exact length. The xid's text is written
/// here rather than by its `Display`, which goes through the formatting machinery and
/// `format!`'s growing string (about 1,000 instructions an id): a new event, with its id and
/// its transaction id, costs 1,250 instructions less (callgrind, `scripts/instructions`).
pub(crate) fn prefixed_xid(prefix: &str) -> String {
    let mut text = String::with_capacity(prefix.len() + XID_TEXT_LEN);
    text.push_str(prefix);
    push_xid(&mut text, &xid::new());
    text
}

/// Characters in an xid's text form.
const XID_TEXT_LEN: usize = 20;

/// Appends `id` in xid's text form: its 12 bytes as base32hex (RFC 4648 section 7, lower
/// case), 20 digits of 5 bits from the most significant, the last padded with zero bits.
fn push_xid(text: &mut String, id: &xid::Id) {
    const DIGITS: &[u8; 32] = b"0123456789abcdefghijklmnopqrstuv";
    let [b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11] = *id.as_bytes();
    // Two words: the first 60 bits make digits 0-11, the last 36 and 4 bits of padding
    // digits 12-19 (40 bits).
    let high = u64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7]) >> 4;
    let low = (u64::from_be_bytes([0, 0, 0, b7, b8, b9, b10, b11]) & 0xF_FFFF_FFFF) << 4;
    let mut digits = [0u8; XID_TEXT_LEN];
    for (i, digit) in digits.iter_mut().enumerate() {
        let value = if i < 12 {
            high >> (5 * (11 - i))
        } else {
            low >> (5 * (19 - i))
        };
        *digit = DIGITS[(value & 31) as usize];
    }
    // Invariant: every digit is an ASCII letter or digit of `DIGITS`, so the text is UTF-8.
    text.push_str(std::str::from_utf8(&digits).unwrap_or_default());
}

/// Creates an event with JSON `data`, the given `type` and `source`, a fresh id, the current UTC
/// time, `datacontenttype: application/json` and a new transaction id.
///
/// The data is held as its JSON text (`serde_json::to_vec`), `Data::Binary` with the JSON
/// content type: the form a decoded event carries it in, so JSON data has one form
/// everywhere in this library. Read it with [`EventExt::data_as`]. The codec writes it as the
/// `data` member (structured mode) or as the payload (binary mode), as it is. Objects keep
/// the order in which `T` serializes its fields (a struct: declaration order), not the sorted
/// order a `serde_json::Value` would give them. The sdk's own serde
/// (`serde_json::to_vec(&event)`) writes bytes as `data_base64`: to send such an event
/// through the sdk, use [`codec::encode`](crate::codec::encode) instead.
///
/// # Examples
///
/// ```
/// use ce_messaging::cloudevent::{new_event, EventExt};
/// use cloudevents::{AttributesReader, Data};
///
/// let event = new_event("org.example.ping", "pinger", &serde_json::json!({"n": 1}))?;
/// assert_eq!(event.ty(), "org.example.ping");
/// assert_eq!(event.source().as_str(), "pinger");
/// assert_eq!(event.datacontenttype(), Some("application/json"));
/// assert_eq!(event.data(), Some(&Data::Binary(br#"{"n":1}"#.to_vec())));
/// assert_eq!(event.data_as::<serde_json::Value>()?, serde_json::json!({"n": 1}));
/// assert!(event.transaction_id().is_some());
/// # Ok::<(), ce_messaging::error::EventError>(())
/// ```
pub fn new_event<T: Serialize + ?Sized>(
    event_type: impl AsRef<str>,
    source: impl Into<String>,
    data: &T,
) -> Result<Event, EventError> {
    new_event_with_tid(event_type, source, data, TransactionId::generate())
}

/// Like [`new_event`], with the given transaction id (to answer or continue a transaction).
///
/// # Examples
///
/// ```
/// use ce_messaging::cloudevent::{new_event_with_tid, EventExt, TransactionId};
///
/// let tid = TransactionId::from("tid-c2hb2r8ck8sl4rbj5te0");
/// let event = new_event_with_tid("org.example.pong", "ponger", &42, tid.clone())?;
/// assert_eq!(event.transaction_id(), Some(tid));
/// # Ok::<(), ce_messaging::error::EventError>(())
/// ```
pub fn new_event_with_tid<T: Serialize + ?Sized>(
    event_type: impl AsRef<str>,
    source: impl Into<String>,
    data: &T,
    tid: TransactionId,
) -> Result<Event, EventError> {
    build_event(
        new_event_id(),
        event_type.as_ref(),
        source.into(),
        data,
        tid,
    )
}

/// Like [`new_event`], with an id of the caller's choosing instead of a fresh one.
///
/// The id is what de-duplicates a publish (`Nats-Msg-Id`, see the wire contract): an id
/// derived from the business fact (`order-1042-created`) makes a publish retried after a
/// crash or restart (when the first event value is gone) a duplicate within the stream's
/// duplicate window instead of a second event, and makes a retried
/// [`request`](crate::events::EventConnection::request) report its publish as a duplicate.
///
/// # Errors
///
/// `Build` when `id` is empty (the CloudEvents spec requires a non-empty id);
/// `DataSerialize` when the data does not serialize.
///
/// # Examples
///
/// ```
/// use ce_messaging::cloudevent::{new_event_with_id, EventExt};
/// use cloudevents::AttributesReader;
///
/// let event = new_event_with_id("order-1042-created", "org.example.order.created", "shop", &1042)?;
/// assert_eq!(event.id(), "order-1042-created");
/// assert!(event.transaction_id().is_some());
/// assert!(new_event_with_id("", "org.example.order.created", "shop", &1042).is_err());
/// # Ok::<(), ce_messaging::error::EventError>(())
/// ```
pub fn new_event_with_id<T: Serialize + ?Sized>(
    id: impl Into<String>,
    event_type: impl AsRef<str>,
    source: impl Into<String>,
    data: &T,
) -> Result<Event, EventError> {
    let id = id.into();
    if id.is_empty() {
        return Err(Error::with_detail(
            EventErrorKind::Build,
            "an event id must not be empty",
        ));
    }
    build_event(
        id,
        event_type.as_ref(),
        source.into(),
        data,
        TransactionId::generate(),
    )
}

fn build_event<T: Serialize + ?Sized>(
    id: String,
    event_type: &str,
    source: String,
    data: &T,
    tid: TransactionId,
) -> Result<Event, EventError> {
    // The data as its JSON text, the form a decoded event carries it in: encoded once here,
    // sent as it is, parsed only when a handler asks for a type (`EventExt::data_as`).
    let json = serde_json::to_vec(data)
        .map_err(|e| Error::with_source(EventErrorKind::DataSerialize, e))?;
    // The builder is a large value moved through every call: only the required attributes
    // go through it (one chain, built in place); the rest are set on the built event.
    let mut event = EventBuilderV10::new()
        .id(id)
        .ty(event_type)
        .source(source)
        .build()
        .map_err(|e| Error::with_source(EventErrorKind::Build, e))?;
    event.set_time(Some(chrono::Utc::now()));
    event.set_data(JSON_CONTENT_TYPE, Data::Binary(json));
    event.set_extension(TRANSACTION_ID_EXTENSION, tid.into_string());
    Ok(event)
}

/// Like [`new_event`], with the source left as [`AUTO_POPULATE_SOURCE`] so the connection that
/// sends it fills in its configured source.
///
/// # Examples
///
/// ```
/// use ce_messaging::cloudevent::{new_event_auto_source, AUTO_POPULATE_SOURCE};
/// use cloudevents::AttributesReader;
///
/// let event = new_event_auto_source("org.example.ping", &())?;
/// assert_eq!(event.source().as_str(), AUTO_POPULATE_SOURCE);
/// # Ok::<(), ce_messaging::error::EventError>(())
/// ```
pub fn new_event_auto_source<T: Serialize + ?Sized>(
    event_type: impl AsRef<str>,
    data: &T,
) -> Result<Event, EventError> {
    new_event(event_type, AUTO_POPULATE_SOURCE, data)
}

/// Whether the event's source asks to be auto-populated (empty or [`AUTO_POPULATE_SOURCE`]).
///
/// # Examples
///
/// ```
/// use ce_messaging::cloudevent::{needs_source, new_event, new_event_auto_source};
/// assert!(needs_source(&new_event_auto_source("t", &1)?));
/// assert!(!needs_source(&new_event("t", "me", &1)?));
/// # Ok::<(), ce_messaging::error::EventError>(())
/// ```
pub fn needs_source(event: &Event) -> bool {
    let source = event.source().as_str();
    source.is_empty() || source == AUTO_POPULATE_SOURCE
}

/// Fills in `source` when the event asks for it (see [`needs_source`]).
///
/// # Examples
///
/// ```
/// use ce_messaging::cloudevent::{new_event_auto_source, populate_source};
/// use cloudevents::AttributesReader;
///
/// let mut event = new_event_auto_source("t", &1)?;
/// populate_source(&mut event, "billing-service");
/// assert_eq!(event.source().as_str(), "billing-service");
/// # Ok::<(), ce_messaging::error::EventError>(())
/// ```
pub fn populate_source(event: &mut Event, source: &str) {
    if needs_source(event) {
        cloudevents::AttributesWriter::set_source(event, source.to_owned());
    }
}

/// The `transactionid` extension, found by walking the extensions: an event has a few, and
/// walking them is cheaper than the SipHash a lookup in the sdk's map costs (issue 16).
fn transaction_id_value(event: &Event) -> Option<&ExtensionValue> {
    event
        .iter_extensions()
        .find(|(name, _)| *name == TRANSACTION_ID_EXTENSION)
        .map(|(_, value)| value)
}

/// Whether [`EventExt::transaction_id`] would find one, without copying it out (the request,
/// reply and response paths only ask whether to set one).
pub(crate) fn has_transaction_id(event: &Event) -> bool {
    match transaction_id_value(event) {
        Some(ExtensionValue::String(s)) => !s.is_empty(),
        Some(ExtensionValue::Integer(_) | ExtensionValue::Boolean(_)) => true,
        None => false,
    }
}

/// Read and write this library's conventions on a [`cloudevents::Event`].
///
/// # Examples
///
/// ```
/// use ce_messaging::cloudevent::{new_event, EventExt, TransactionId};
///
/// let mut event = new_event("t", "s", &vec![1, 2, 3])?;
/// let tid = TransactionId::generate();
/// event.set_transaction_id(&tid);
/// assert_eq!(event.transaction_id(), Some(tid));
/// assert_eq!(event.data_as::<Vec<u8>>()?, vec![1, 2, 3]);
/// # Ok::<(), ce_messaging::error::EventError>(())
/// ```
pub trait EventExt {
    /// The `transactionid` extension, if present and non-empty.
    fn transaction_id(&self) -> Option<TransactionId>;

    /// Sets the `transactionid` extension.
    fn set_transaction_id(&mut self, tid: &TransactionId);

    /// Deserializes the data as JSON into `T`. Accepts binary or string data holding JSON
    /// text (the form [`new_event`] builds and a decoded event carries, see
    /// [`codec::decode`](crate::codec::decode)), parsed here once, straight into `T`; and
    /// `Data::Json` (a `serde_json::Value`, as events built with the sdk's builder hold it).
    fn data_as<T: DeserializeOwned>(&self) -> Result<T, EventError>;

    /// The event type as an [`EventType`].
    fn event_type(&self) -> EventType;
}

/// The error of [`EventExt::data_as`] when the data is not JSON of type `T`.
#[cold]
pub(crate) fn data_error<T>(e: serde_json::Error, id: &str, ty: &str) -> EventError {
    Error::with_source(EventErrorKind::DataDeserialize, e).detail(format!(
        "data of event {id} (type {ty}) into {}",
        std::any::type_name::<T>()
    ))
}

impl EventExt for Event {
    fn transaction_id(&self) -> Option<TransactionId> {
        match transaction_id_value(self) {
            Some(ExtensionValue::String(s)) if !s.is_empty() => Some(TransactionId(s.clone())),
            Some(ExtensionValue::Integer(i)) => Some(TransactionId(i.to_string())),
            Some(ExtensionValue::Boolean(b)) => Some(TransactionId(b.to_string())),
            _ => None,
        }
    }

    fn set_transaction_id(&mut self, tid: &TransactionId) {
        self.set_extension(TRANSACTION_ID_EXTENSION, tid.as_str());
    }

    fn data_as<T: DeserializeOwned>(&self) -> Result<T, EventError> {
        let result = match self.data() {
            None => return Err(Error::new(EventErrorKind::NoData)),
            Some(Data::Json(value)) => T::deserialize(value),
            // JSON text is UTF-8: checked once, which is cheaper than serde_json checking each
            // string of a byte slice (bytes that are not UTF-8 get serde_json's own error).
            Some(Data::Binary(bytes)) => match std::str::from_utf8(bytes) {
                Ok(text) => serde_json::from_str(text),
                Err(_) => serde_json::from_slice(bytes),
            },
            Some(Data::String(text)) => serde_json::from_str(text),
        };
        result.map_err(|e| data_error::<T>(e, self.id(), self.ty()))
    }

    fn event_type(&self) -> EventType {
        EventType(self.ty().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Workspace {
        name: String,
        size: u64,
    }

    proptest::proptest! {
        /// The ids' xid text is what xid's own `Display` writes, for any 12 bytes.
        #[test]
        fn xid_text_is_xids_display(bytes in proptest::array::uniform12(proptest::num::u8::ANY)) {
            let id = xid::Id(bytes);
            let mut text = String::from("p-");
            push_xid(&mut text, &id);
            proptest::prop_assert_eq!(text, format!("p-{id}"));
        }
    }

    #[test]
    fn generated_ids_are_their_prefix_and_a_new_xid() {
        let ids = [
            ("cloudevent-", new_event_id()),
            ("cloudevent-", new_event_id()),
            ("tid-", TransactionId::generate().into_string()),
        ];
        assert_ne!(ids[0].1, ids[1].1);
        for (prefix, id) in &ids {
            let text = id.strip_prefix(prefix).expect("the prefix");
            let parsed: xid::Id = text.parse().expect("an xid");
            assert_eq!(&parsed.to_string(), text);
            assert_eq!(
                id.len(),
                id.capacity(),
                "one allocation of the exact length"
            );
        }
    }

    #[test]
    fn has_transaction_id_agrees_with_transaction_id() {
        let mut event = new_event("a.b", "test", &()).unwrap();
        let values = [
            None,
            Some(ExtensionValue::String(String::new())),
            Some(ExtensionValue::String("tid-1".into())),
            Some(ExtensionValue::Integer(7)),
            Some(ExtensionValue::Boolean(false)),
        ];
        for value in values {
            match value {
                Some(value) => event.set_extension(TRANSACTION_ID_EXTENSION, value),
                None => {
                    event.remove_extension(TRANSACTION_ID_EXTENSION);
                }
            }
            assert_eq!(
                has_transaction_id(&event),
                event.transaction_id().is_some(),
                "{:?}",
                event.extension(TRANSACTION_ID_EXTENSION)
            );
        }
    }

    #[test]
    fn new_event_has_contract_identity() {
        let event = new_event(
            "cyverse.workspace.created",
            "ws",
            &Workspace {
                name: "a".into(),
                size: 1,
            },
        )
        .unwrap();
        let id = event.id();
        assert!(id.starts_with("cloudevent-"), "{id}");
        assert_eq!(id.len(), 31);
        let tid = event.transaction_id().unwrap();
        assert!(tid.as_str().starts_with("tid-"));
        assert_eq!(event.datacontenttype(), Some(JSON_CONTENT_TYPE));
        let time = event.time().unwrap();
        let age = chrono::Utc::now() - *time;
        assert!(age.num_seconds() < 5 && age.num_seconds() >= 0);
        assert_eq!(event.specversion(), cloudevents::event::SpecVersion::V10);
    }

    #[test]
    fn new_event_data_is_its_json_text_in_field_order() {
        // Fields out of alphabetical order: the text keeps `T`'s order (a `Value` would sort).
        #[derive(Serialize)]
        struct Order {
            zone: &'static str,
            amount: f64,
            items: Vec<u32>,
        }
        let order = Order {
            zone: "é\"",
            amount: 2.5,
            items: vec![1, 2],
        };
        let event = new_event("t", "s", &order).unwrap();
        assert_eq!(event.datacontenttype(), Some(JSON_CONTENT_TYPE));
        assert_eq!(
            event.data(),
            Some(&Data::Binary(
                r#"{"zone":"é\"","amount":2.5,"items":[1,2]}"#.as_bytes().to_vec()
            ))
        );
        // The reply helpers build their events with `new_event_with_tid`: the same form.
        let reply = new_event_with_tid("t", "s", &"ok", TransactionId::generate()).unwrap();
        assert_eq!(reply.data(), Some(&Data::Binary(br#""ok""#.to_vec())));
        let err = new_event("t", "s", &std::collections::HashMap::from([((1, 2), 3)]));
        assert_eq!(err.unwrap_err().kind(), EventErrorKind::DataSerialize);
    }

    #[test]
    fn data_as_reads_json_value_data_as_sdk_built_events_hold_it() {
        let expected = Workspace {
            name: "é x".into(),
            size: 9,
        };
        let event = EventBuilderV10::new()
            .id("x")
            .ty("t")
            .source("s")
            .data(
                JSON_CONTENT_TYPE,
                serde_json::json!({"size": 9, "name": "é x"}),
            )
            .build()
            .unwrap();
        assert!(matches!(event.data(), Some(Data::Json(_))));
        assert_eq!(event.data_as::<Workspace>().unwrap(), expected);
        let built = new_event("t", "s", &expected).unwrap();
        assert!(matches!(built.data(), Some(Data::Binary(_))));
        assert_eq!(built.data_as::<Workspace>().unwrap(), expected);
        assert_eq!(
            built.data_as::<serde_json::Value>().unwrap(),
            *match event.data() {
                Some(Data::Json(value)) => value,
                other => panic!("{other:?}"),
            }
        );
    }

    #[test]
    fn data_as_reads_json_binary_and_string_data() {
        let mut event = new_event(
            "t",
            "s",
            &Workspace {
                name: "é x".into(),
                size: 9,
            },
        )
        .unwrap();
        let expected = Workspace {
            name: "é x".into(),
            size: 9,
        };
        assert_eq!(event.data_as::<Workspace>().unwrap(), expected);
        event.set_data_unchecked(br#"{"name":"\u00e9 x","size":9}"#.to_vec());
        assert_eq!(event.data_as::<Workspace>().unwrap(), expected);
        event.set_data_unchecked(r#"{"name":"é x","size":9}"#);
        assert_eq!(event.data_as::<Workspace>().unwrap(), expected);
        // Bytes that are not UTF-8 are not JSON text.
        event.set_data_unchecked(b"{\"name\":\"\xff\",\"size\":9}".to_vec());
        assert_eq!(
            event.data_as::<Workspace>().unwrap_err().kind(),
            EventErrorKind::DataDeserialize
        );
    }

    #[test]
    fn data_as_wrong_type_is_a_typed_error_naming_the_event() {
        let event = new_event("t", "s", &"not a workspace").unwrap();
        let err = event.data_as::<Workspace>().unwrap_err();
        assert_eq!(err.kind(), EventErrorKind::DataDeserialize);
        assert!(err.to_string().contains(event.id()), "{err}");
    }

    #[test]
    fn missing_data_is_no_data() {
        let event = EventBuilderV10::new()
            .id("x")
            .ty("t")
            .source("s")
            .build()
            .unwrap();
        assert_eq!(
            event.data_as::<u32>().unwrap_err().kind(),
            EventErrorKind::NoData
        );
    }

    #[test]
    fn given_tid_is_kept_and_auto_source_is_populated() {
        let tid = TransactionId::generate();
        let event = new_event_with_tid("t", "s", &1, tid.clone()).unwrap();
        assert_eq!(event.transaction_id(), Some(tid));

        let mut event = new_event_auto_source("t", &1).unwrap();
        assert!(needs_source(&event));
        populate_source(&mut event, "svc");
        assert_eq!(event.source().as_str(), "svc");
        populate_source(&mut event, "other");
        assert_eq!(event.source().as_str(), "svc", "an explicit source is kept");
    }

    #[test]
    fn the_subject_token_rule_accepts_literal_tokens_and_refuses_the_rest() {
        for good in [
            "a",
            "org.example.order.created",
            "a-b_c.d$e.F9",
            "caf\u{e9}.cr\u{e8}me",
            "a#b.c+d",
        ] {
            assert!(check_type(good).is_ok(), "{good:?} is valid");
        }
        let long = "x".repeat(MAX_TYPE_LEN + 1);
        let cases: [(&str, &str); 17] = [
            ("", "empty"),
            ("probe.*", "wildcard"),
            ("probe.>", "wildcard"),
            ("*", "wildcard"),
            (">", "wildcard"),
            ("a.b*c", "wildcard"),
            ("a>b", "wildcard"),
            ("a b", "whitespace"),
            ("a\tb", "whitespace"),
            ("a\r\nb", "whitespace"),
            ("a\u{a0}b", "whitespace"),
            ("a\u{0}b", "control"),
            ("a\u{7f}b", "control"),
            ("a..b", "empty token"),
            (".a", "empty token"),
            ("a.", "empty token"),
            (&long, "bytes long"),
        ];
        for (bad, why) in cases {
            let err = check_type(bad).expect_err(bad);
            assert_eq!(err.kind(), EventErrorKind::InvalidType);
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
        // Multi-byte characters count in bytes, as the server counts them.
        let accents = "\u{e9}".repeat(MAX_TYPE_LEN / 2 + 1);
        assert!(check_type(&accents).is_err());
    }

    #[test]
    fn an_invalid_type_is_quoted_escaped_and_cut() {
        let err = check_type("a\tb").unwrap_err();
        assert!(err.to_string().contains(r#""a\tb""#), "{err}");
        let huge = format!("{}.*", "y".repeat(5000));
        let text = check_type(&huge).unwrap_err().to_string();
        assert!(text.len() < 300, "{text}");
        assert!(text.contains("5002 bytes"), "{text}");
    }

    #[test]
    fn ids_are_unique() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_event_id()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
