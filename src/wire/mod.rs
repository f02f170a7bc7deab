//! The wire layer: what goes over a WebSocket as text, and nothing else (PROTOCOL.md §1–§3).
//!
//! It owns the envelope and frame types (this file), canonical JSON ([`canon`], the bytes every
//! signature covers), base64 as the wire writes and reads it ([`b64`]) and ids and display names
//! ([`ids`]), and the frames that come in, parsed once by type: [`user::UserFrame`] from a client
//! connection, [`peer::PeerFrame`] from a linked server. It turns text into typed values and
//! typed values into text; it must not touch a socket, a clock, the store or any server state
//! (the core decides what a frame *means*).
//!
//! This file is the wire profile (PROTOCOL.md §1, §5–§10): the envelope, frame types, error
//! codes, typed payloads with validation that names the bad field, and the strict emitter.
//!
//! Parsing is lenient where §1–§3 say *Accept*; emitting is strict: [`encode_frame`] always
//! writes the six envelope fields, and the payload text it embeds is the canonical form that
//! was signed, so the bytes on the wire are the bytes the signature covers.

pub mod b64;
pub mod canon;
pub mod frame;
pub mod ids;
pub mod peer;
pub mod user;

use canon::NotCanonical;
use serde_json::{Map, Value};

/// A shared, immutable frame text. Fan-out sends one allocation to many connections
/// (reference-counted, no copy per recipient).
pub type Text = tungstenite::Utf8Bytes;

/// The six error codes of the standard (§10). Specifics go in `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    UserNotFound,
    InvalidSig,
    BadKey,
    Timeout,
    UnknownType,
    NameInUse,
}

impl ErrorCode {
    /// The code as it appears in `payload.code`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UserNotFound => "USER_NOT_FOUND",
            ErrorCode::InvalidSig => "INVALID_SIG",
            ErrorCode::BadKey => "BAD_KEY",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::UnknownType => "UNKNOWN_TYPE",
            ErrorCode::NameInUse => "NAME_IN_USE",
        }
    }
}

/// A protocol error to report to the peer: a code and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub code: ErrorCode,
    pub detail: String,
}

impl WireError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        WireError {
            code,
            detail: detail.into(),
        }
    }

    /// A malformed payload field: `BAD_KEY` naming the field (issue: "validation that names the
    /// bad field in `detail`").
    pub fn field(field: &str, problem: &str) -> Self {
        WireError::new(ErrorCode::BadKey, format!("payload.{field}: {problem}"))
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code.as_str(), self.detail)
    }
}

impl From<NotCanonical> for WireError {
    fn from(_: NotCanonical) -> Self {
        WireError::new(
            ErrorCode::BadKey,
            "payload contains a non-integer number (PROTOCOL §3.3)",
        )
    }
}

/// Frame type names (case-sensitive, §1).
pub mod types {
    pub const USER_HELLO: &str = "USER_HELLO";
    pub const AUTH_CHALLENGE: &str = "AUTH_CHALLENGE";
    pub const AUTH_RESPONSE: &str = "AUTH_RESPONSE";
    pub const USER_HELLO_ACK: &str = "USER_HELLO_ACK";
    pub const USER_REGISTER: &str = "USER_REGISTER";
    pub const USER_REGISTERED: &str = "USER_REGISTERED";
    pub const USER_LOGIN: &str = "USER_LOGIN";
    pub const USER_LOGGED_IN: &str = "USER_LOGGED_IN";
    pub const MSG_DIRECT: &str = "MSG_DIRECT";
    pub const USER_DELIVER: &str = "USER_DELIVER";
    pub const MSG_PUBLIC_CHANNEL: &str = "MSG_PUBLIC_CHANNEL";
    pub const FILE_START: &str = "FILE_START";
    pub const FILE_CHUNK: &str = "FILE_CHUNK";
    pub const FILE_END: &str = "FILE_END";
    pub const LIST_REQUEST: &str = "LIST_REQUEST";
    pub const LIST_RESPONSE: &str = "LIST_RESPONSE";
    pub const PUBLIC_CHANNEL_SNAPSHOT: &str = "PUBLIC_CHANNEL_SNAPSHOT";
    pub const PUBLIC_CHANNEL_ADD: &str = "PUBLIC_CHANNEL_ADD";
    pub const PUBLIC_CHANNEL_UPDATED: &str = "PUBLIC_CHANNEL_UPDATED";
    pub const USER_ADVERTISE: &str = "USER_ADVERTISE";
    pub const USER_REMOVE: &str = "USER_REMOVE";
    pub const SERVER_HELLO_JOIN: &str = "SERVER_HELLO_JOIN";
    pub const SERVER_WELCOME: &str = "SERVER_WELCOME";
    pub const SERVER_HELLO_LINK: &str = "SERVER_HELLO_LINK";
    pub const SERVER_ANNOUNCE: &str = "SERVER_ANNOUNCE";
    pub const SERVER_DELIVER: &str = "SERVER_DELIVER";
    pub const HEARTBEAT: &str = "HEARTBEAT";
    pub const ACK: &str = "ACK";
    pub const ERROR: &str = "ERROR";
    pub const CTRL_CLOSE: &str = "CTRL_CLOSE";
}

/// The capability a client names in `USER_HELLO.caps` to take frames signed by other servers
/// unchanged (§5.6).
pub const CAP_PEER_SIG: &str = "peer-sig";

/// A parsed incoming frame (§1 *Envelope*).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub kind: String,
    pub from: String,
    pub to: String,
    pub ts: i64,
    pub payload: Map<String, Value>,
    /// `""` when unsigned or absent (*Accept*: a missing `sig` as `""`).
    pub sig: String,
}

impl Envelope {
    /// Parses one WebSocket text message. Invalid JSON and a missing `type` are
    /// `UNKNOWN_TYPE`; other envelope problems are `BAD_KEY` naming the field.
    pub fn parse(text: &str) -> Result<Envelope, WireError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|_| WireError::new(ErrorCode::UnknownType, "invalid JSON"))?;
        let Value::Object(mut obj) = value else {
            return Err(WireError::new(
                ErrorCode::UnknownType,
                "a frame must be a JSON object",
            ));
        };
        let kind = match obj.remove("type") {
            Some(Value::String(s)) => s,
            _ => return Err(WireError::new(ErrorCode::UnknownType, "missing type")),
        };
        if is_legacy_account_frame(&kind, &obj) {
            return Err(WireError::new(ErrorCode::BadKey, LEGACY_ACCOUNTS));
        }
        let mut string = |name: &str| match obj.remove(name) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(envelope_error(name, "must be a string")),
            None => Err(envelope_error(name, "missing")),
        };
        let from = string("from")?;
        let to = string("to")?;
        let sig = match obj.remove("sig") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s,
            Some(_) => return Err(envelope_error("sig", "must be a string")),
        };
        let ts = match obj.get("ts") {
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| envelope_error("ts", "must be an integer"))?,
            Some(_) => return Err(envelope_error("ts", "must be an integer")),
            None => return Err(envelope_error("ts", "missing")),
        };
        let payload = match obj.remove("payload") {
            Some(Value::Object(p)) => p,
            Some(_) => return Err(envelope_error("payload", "must be an object")),
            None => return Err(envelope_error("payload", "missing")),
        };
        // §3.3: a payload with a non-integer number has no canonical form. Refused here, at
        // the one edge every frame passes, so whatever the core takes from a frame into a
        // payload it signs is canonical by construction.
        if !payload.values().all(canon::integers_only) {
            return Err(NotCanonical.into());
        }
        Ok(Envelope {
            kind,
            from,
            to,
            ts,
            payload,
            sig,
        })
    }

    /// Typed access to the payload's fields.
    pub fn fields(&self) -> Fields<'_> {
        Fields(&self.payload)
    }
}

/// The answer to the account frames of the deployed Python servers' clients (§5.3): they send
/// a plaintext password and prove no key, which this server does not accept.
pub const LEGACY_ACCOUNTS: &str = "this server does not accept password accounts that send \
    the password itself: it needs the challenge-response login of SOCP \
    (USER_HELLO, AUTH_CHALLENGE, AUTH_RESPONSE signed by your key, PROTOCOL §5.2) and, for \
    accounts, USER_REGISTER {user_id, pubkey, privkey_store, auth, meta} signed by the new key \
    or USER_LOGIN {display_name, auth} with auth = PBKDF2 of the password (§5.3); use a \
    client that speaks it, such as socp";

/// Whether an account frame is of the scheme §5.3 refuses: a `password` in the payload, or no
/// `auth` (the plaintext-password clients send `{user_id, password}` and often no envelope).
fn is_legacy_account_frame(kind: &str, obj: &Map<String, Value>) -> bool {
    if kind != types::USER_REGISTER && kind != types::USER_LOGIN {
        return false;
    }
    match obj.get("payload") {
        Some(Value::Object(p)) => p.contains_key("password") || !p.contains_key("auth"),
        _ => false,
    }
}

fn envelope_error(field: &str, problem: &str) -> WireError {
    WireError::new(ErrorCode::BadKey, format!("envelope {field}: {problem}"))
}

/// Field accessors over a payload object; every error names the field.
#[derive(Clone, Copy)]
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl<'a> Fields<'a> {
    pub fn str(&self, name: &str) -> Result<&'a str, WireError> {
        match self.0.get(name) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(WireError::field(name, "must be a string")),
            None => Err(WireError::field(name, "missing")),
        }
    }

    pub fn opt_str(&self, name: &str) -> Result<Option<&'a str>, WireError> {
        match self.0.get(name) {
            Some(Value::String(s)) => Ok(Some(s)),
            None | Some(Value::Null) => Ok(None),
            Some(_) => Err(WireError::field(name, "must be a string")),
        }
    }

    pub fn i64(&self, name: &str) -> Result<i64, WireError> {
        match self.0.get(name) {
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| WireError::field(name, "must be an integer")),
            Some(_) => Err(WireError::field(name, "must be an integer")),
            None => Err(WireError::field(name, "missing")),
        }
    }

    pub fn obj(&self, name: &str) -> Result<Fields<'a>, WireError> {
        match self.0.get(name) {
            Some(Value::Object(o)) => Ok(Fields(o)),
            Some(_) => Err(WireError::field(name, "must be an object")),
            None => Err(WireError::field(name, "missing")),
        }
    }

    /// An id field (§2): a UUID or 1–64 characters of `[A-Za-z0-9._-]`.
    pub fn id(&self, name: &str) -> Result<&'a str, WireError> {
        let s = self.str(name)?;
        if ids::is_valid_id(s) {
            Ok(s)
        } else {
            Err(WireError::field(name, "malformed id"))
        }
    }

    /// A base64 field whose decoded size is at most `max` bytes.
    pub fn b64(&self, name: &str, max: usize) -> Result<&'a str, WireError> {
        let s = self.str(name)?;
        // Cheap bound first: base64 of `max` bytes is at most 4*ceil(max/3) characters.
        if s.len() > max.div_ceil(3) * 4 {
            return Err(WireError::field(name, "too long"));
        }
        match crate::wire::b64::decode(s) {
            Some(bytes) if bytes.len() <= max => Ok(s),
            Some(_) => Err(WireError::field(name, "too long")),
            None => Err(WireError::field(name, "not base64")),
        }
    }
}

/// Size of one RSA-4096 block: the largest ciphertext or signature.
pub const RSA_BLOCK: usize = 512;

/// Checks the envelope `from` is a well-formed id (§2).
pub fn check_id(what: &str, id: &str) -> Result<(), WireError> {
    if ids::is_valid_id(id) {
        Ok(())
    } else {
        Err(WireError::new(
            ErrorCode::BadKey,
            format!("envelope {what}: malformed id"),
        ))
    }
}

/// `MSG_DIRECT` / `MSG_PUBLIC_CHANNEL` as a user sends them (§5.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserMessage<'a> {
    pub ciphertext: &'a str,
    pub sender_pub: &'a str,
    pub content_sig: &'a str,
}

impl<'a> UserMessage<'a> {
    pub fn parse(f: Fields<'a>) -> Result<Self, WireError> {
        Ok(UserMessage {
            ciphertext: f.b64("ciphertext", RSA_BLOCK)?,
            sender_pub: f.str("sender_pub")?,
            content_sig: f.b64("content_sig", RSA_BLOCK)?,
        })
    }
}

/// Largest `meta` object (canonical JSON bytes) a user may present.
pub const MAX_META_BYTES: usize = 1024;

/// `USER_HELLO` (§5.2).
#[derive(Debug, Clone, PartialEq)]
pub struct UserHello<'a> {
    pub pubkey: &'a str,
    /// Absent means "the same as `pubkey`" (one pair serves both, §5.1).
    pub enc_pubkey: Option<&'a str>,
    /// `meta` as sent, with a validated `display_name` when present.
    pub meta: Map<String, Value>,
    /// `caps` names `"peer-sig"` (§5.6): the client takes frames signed by other servers.
    pub peer_sig: bool,
}

impl<'a> UserHello<'a> {
    pub fn parse(f: Fields<'a>) -> Result<Self, WireError> {
        let pubkey = f.str("pubkey")?;
        let enc_pubkey = f.opt_str("enc_pubkey")?;
        let meta = match f.0.get("meta") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(WireError::field("meta", "must be an object")),
        };
        // meta travels in every directory frame to every user: keep it small.
        if canon::canonical_object(&meta)?.len() > MAX_META_BYTES {
            return Err(WireError::field("meta", "too large (at most 1024 bytes)"));
        }
        match meta.get("display_name") {
            None => {}
            Some(Value::String(name)) if ids::is_valid_display_name(name) => {}
            Some(_) => {
                return Err(WireError::field(
                    "meta.display_name",
                    "must be 1-32 characters of [A-Za-z0-9._-]",
                ));
            }
        }
        // Unknown capabilities, and a `caps` that is not a list of strings, are ignored.
        let peer_sig =
            f.0.get("caps")
                .and_then(Value::as_array)
                .is_some_and(|caps| {
                    caps.iter()
                        .any(|c| c.as_str() == Some(crate::wire::CAP_PEER_SIG))
                });
        Ok(UserHello {
            pubkey,
            enc_pubkey,
            meta,
            peer_sig,
        })
    }
}

/// `AUTH_RESPONSE` (§5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthResponse<'a> {
    pub nonce: &'a str,
    pub server_id: &'a str,
    pub user_id: &'a str,
}

impl<'a> AuthResponse<'a> {
    pub fn parse(f: Fields<'a>) -> Result<Self, WireError> {
        Ok(AuthResponse {
            nonce: f.str("nonce")?,
            server_id: f.str("server_id")?,
            user_id: f.id("user_id")?,
        })
    }
}

/// A payload ready to send: its canonical text and the signature over it. Built once per
/// distinct payload, however many frames carry it (§3.4).
#[derive(Debug, Clone)]
pub struct SignedPayload {
    pub canonical: String,
    pub sig: String,
}

impl SignedPayload {
    /// Canonicalises and signs `payload`.
    pub fn sign(payload: &Value, key: &crate::crypto::PrivateKey) -> Result<Self, NotCanonical> {
        Ok(Self::sign_canonical(canon::canonical(payload)?, key))
    }

    /// Signs a payload already in canonical form (the caller built it with [`canon`]).
    pub fn sign_canonical(canonical: String, key: &crate::crypto::PrivateKey) -> Self {
        let sig = key.sign_b64(canonical.as_bytes());
        SignedPayload { canonical, sig }
    }

    /// An unsigned payload (`sig: ""`), as users may send to their own server (§3.4).
    pub fn unsigned(payload: &Value) -> Result<Self, NotCanonical> {
        Ok(SignedPayload {
            canonical: canon::canonical(payload)?,
            sig: String::new(),
        })
    }
}

/// Writes one frame: the six envelope fields, the payload as its canonical text.
pub fn encode_frame(kind: &str, from: &str, to: &str, ts: i64, payload: &SignedPayload) -> String {
    let mut out = String::with_capacity(payload.canonical.len() + payload.sig.len() + 128);
    out.push_str("{\"type\":");
    canon::write_string(kind, &mut out);
    out.push_str(",\"from\":");
    canon::write_string(from, &mut out);
    out.push_str(",\"to\":");
    canon::write_string(to, &mut out);
    out.push_str(",\"ts\":");
    out.push_str(&ts.to_string());
    out.push_str(",\"payload\":");
    out.push_str(&payload.canonical);
    out.push_str(",\"sig\":");
    canon::write_string(&payload.sig, &mut out);
    out.push('}');
    out
}

/// Verifies a transport signature (§3.4) over `payload`: the canonical form first, then the
/// ASCII-escaped fallback when the payload has non-ASCII text.
pub fn verify_payload_sig(
    key: &crate::crypto::PublicKey,
    payload: &Map<String, Value>,
    sig: &str,
) -> Result<bool, NotCanonical> {
    let canonical = canon::canonical_object(payload)?;
    verify_canonical(key, &canonical, payload, sig)
}

/// [`verify_payload_sig`] for a caller that already has the canonical form.
pub fn verify_canonical(
    key: &crate::crypto::PublicKey,
    canonical: &str,
    payload: &Map<String, Value>,
    sig: &str,
) -> Result<bool, NotCanonical> {
    if sig.is_empty() {
        return Ok(false);
    }
    if key.verify_b64(canonical.as_bytes(), sig) {
        return Ok(true);
    }
    if canonical.is_ascii() {
        return Ok(false);
    }
    let ascii = canon::canonical_object_ascii(payload)?;
    Ok(key.verify_b64(ascii.as_bytes(), sig))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_a_full_envelope_and_tolerates_missing_sig_and_newline() {
        let e = Envelope::parse(
            "{\"type\":\"LIST_REQUEST\",\"from\":\"alice\",\"to\":\"srv\",\"ts\":5,\"payload\":{}}\n",
        )
        .unwrap();
        assert_eq!(e.kind, "LIST_REQUEST");
        assert_eq!((e.from.as_str(), e.to.as_str(), e.ts), ("alice", "srv", 5));
        assert_eq!(e.sig, "");
    }

    #[test]
    fn classifies_envelope_errors() {
        assert_eq!(
            Envelope::parse("{nope").unwrap_err().code,
            ErrorCode::UnknownType
        );
        assert_eq!(
            Envelope::parse("[1]").unwrap_err().code,
            ErrorCode::UnknownType
        );
        let e = Envelope::parse(r#"{"type":"X","from":"a","to":"b","ts":1.5,"payload":{}}"#)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadKey);
        assert!(e.detail.contains("ts"), "{}", e.detail);
        let e =
            Envelope::parse(r#"{"type":"X","from":"a","to":"b","ts":1,"payload":[]}"#).unwrap_err();
        assert!(e.detail.contains("payload"), "{}", e.detail);
    }

    #[test]
    fn a_payload_with_a_non_integer_number_anywhere_is_refused_at_the_edge() {
        // §3.3: such a payload has no canonical form, so nothing in it may reach a signature.
        for payload in [
            r#"{"x":1.5}"#,
            r#"{"meta":{"deep":[1,{"f":2.0}]}}"#,
            r#"{"ok":"1.5","n":1e3}"#,
        ] {
            let text = format!(r#"{{"type":"X","from":"a","to":"b","ts":1,"payload":{payload}}}"#);
            let e = Envelope::parse(&text).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadKey, "{payload}");
            assert!(e.detail.contains("non-integer"), "{}", e.detail);
        }
        let fine = r#"{"type":"X","from":"a","to":"b","ts":1,"payload":{"n":-3,"b":[true,null]}}"#;
        assert!(Envelope::parse(fine).is_ok());
    }

    #[test]
    fn the_deployed_clients_account_frames_are_told_what_we_speak() {
        for text in [
            r#"{"type":"USER_REGISTER","ts":1,"payload":{"user_id":"a","password":"pw"}}"#,
            r#"{"type":"USER_LOGIN","from":"a","to":"","ts":1,"payload":{"user_id":"a","password":"pw"},"sig":""}"#,
        ] {
            let e = Envelope::parse(text).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadKey);
            assert_eq!(e.detail, LEGACY_ACCOUNTS);
        }
        // Our own account frames are not caught.
        let ours = r#"{"type":"USER_LOGIN","from":"","to":"","ts":1,"payload":{"display_name":"a","auth":"x"},"sig":""}"#;
        assert!(Envelope::parse(ours).is_ok());
    }

    #[test]
    fn field_errors_name_the_field() {
        let p = json!({"ciphertext": 5, "sender_pub": "k", "content_sig": "AA"});
        let Value::Object(m) = p else { unreachable!() };
        let e = UserMessage::parse(Fields(&m)).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadKey);
        assert_eq!(e.detail, "payload.ciphertext: must be a string");

        let p = json!({"pubkey": "k", "meta": {"display_name": "no spaces allowed"}});
        let Value::Object(m) = p else { unreachable!() };
        let e = UserHello::parse(Fields(&m)).unwrap_err();
        assert!(e.detail.starts_with("payload.meta.display_name"), "{e}");
    }

    #[test]
    fn oversized_base64_is_refused() {
        let big = "A".repeat(700);
        let p = json!({"ciphertext": big, "sender_pub": "k", "content_sig": "AA"});
        let Value::Object(m) = p else { unreachable!() };
        assert_eq!(
            UserMessage::parse(Fields(&m)).unwrap_err().detail,
            "payload.ciphertext: too long"
        );
    }

    #[test]
    fn encodes_all_six_fields_with_the_canonical_payload() {
        let payload = SignedPayload::unsigned(&json!({"b": "x\"y", "a": 1})).unwrap();
        let text = encode_frame("ACK", "srv", "u\n", 7, &payload);
        assert_eq!(
            text,
            r#"{"type":"ACK","from":"srv","to":"u\n","ts":7,"payload":{"a":1,"b":"x\"y"},"sig":""}"#
        );
        let back = Envelope::parse(&text).unwrap();
        assert_eq!(back.to, "u\n");
        assert_eq!(back.payload.get("b"), Some(&json!("x\"y")));
    }
}
