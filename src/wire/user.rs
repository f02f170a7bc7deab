//! The frames a client connection sends (PROTOCOL.md §5, §9), parsed once into [`UserFrame`].
//!
//! The frame's type is matched against the type names here and nowhere else in the user-side
//! core; every payload field the core reads is looked up and validated here, and the core gets
//! typed values.
//!
//! A frame's type is known before its payload is judged: each variant holds its payload as a
//! [`Payload`], the validated value or the error naming the bad field. The core decides first
//! whether the type is welcome in the connection's state (a second `USER_HELLO` is refused as
//! such whatever its payload, an `AUTH_RESPONSE` consumes the challenge even when malformed),
//! and only then answers a bad payload with its error.

use crate::wire::{
    self, AuthResponse, Envelope, ErrorCode, Fields, RSA_BLOCK, UserHello, UserMessage, WireError,
    types,
};

/// A payload as parsed: the typed value, or the error to answer (`BAD_KEY` naming the field).
pub type Payload<T> = Result<T, WireError>;

/// One frame from a client connection, by type.
#[derive(Debug, Clone, PartialEq)]
pub enum UserFrame<'a> {
    /// `USER_HELLO` (§5.2).
    Hello(Payload<Hello<'a>>),
    /// `AUTH_RESPONSE` (§5.2). Its signature is checked by the core, which knows the key.
    AuthResponse(Payload<AuthResponse<'a>>),
    /// `USER_REGISTER` (§5.3). Its signature is checked by the core against `pubkey`.
    Register(Payload<Register<'a>>),
    /// `USER_LOGIN` (§5.3).
    Login(Payload<Login<'a>>),
    /// `MSG_DIRECT` (§5.4).
    Direct(Payload<Addressed<'a, UserMessage<'a>>>),
    /// `MSG_PUBLIC_CHANNEL` (§8).
    PublicChannel(Payload<Addressed<'a, UserMessage<'a>>>),
    /// `FILE_START`, `FILE_CHUNK`, `FILE_END` (§9).
    File(Payload<FileFrame<'a>>),
    /// `LIST_REQUEST` (§5.5): no payload fields.
    ListRequest,
    /// `CTRL_CLOSE`: the client says goodbye.
    CtrlClose,
    /// `SERVER_HELLO_JOIN` or `SERVER_HELLO_LINK`: not a user at all but a server introducing
    /// itself (§4.3); the federation side takes the frame from here.
    ServerHello,
    /// Any other type, as sent: answered with `UNKNOWN_TYPE` (see [`unknown_type`]).
    Unknown(&'a str),
}

/// `USER_HELLO`: the user id it claims (the envelope `from`, a well-formed id) and its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello<'a> {
    pub user_id: &'a str,
    pub hello: UserHello<'a>,
}

/// A payload for user `to` (the envelope `to`, a well-formed id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressed<'a, T> {
    pub to: &'a str,
    pub body: T,
}

/// `USER_REGISTER {user_id, pubkey, privkey_store, auth, meta:{display_name}}` (§5.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register<'a> {
    /// A well-formed id; the envelope `from` is empty or the same.
    pub user_id: &'a str,
    /// As sent: the core parses the key.
    pub pubkey: &'a str,
    /// The rest, judged after the key (an unusable key is the answer before any of these).
    pub account: Payload<NewAccount<'a>>,
}

/// What `USER_REGISTER` stores besides the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAccount<'a> {
    /// Base64, at most [`MAX_PRIVKEY_STORE`] characters.
    pub privkey_store: &'a str,
    /// The decoded `auth`: 32 bytes.
    pub auth: Vec<u8>,
    /// A valid display name (§2).
    pub display_name: &'a str,
}

/// `USER_LOGIN {display_name, auth}` (§5.3). Both as sent: a malformed `auth` must cost the
/// same work as a wrong one, so the core decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login<'a> {
    pub display_name: &'a str,
    pub auth: &'a str,
}

/// A file frame (§9): its recipient (a well-formed id), its `file_id` (a well-formed id) and
/// what the frame type adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFrame<'a> {
    pub to: &'a str,
    pub file_id: &'a str,
    pub part: FilePart<'a>,
}

/// What each file frame type carries besides `file_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilePart<'a> {
    /// `FILE_START`: `size` is not negative, `sha256` is 64 hex digits.
    Start {
        name: &'a str,
        size: i64,
        sha256: &'a str,
    },
    /// `FILE_CHUNK`: `index` is not negative, both fields base64 of one RSA block at most.
    Chunk {
        index: i64,
        ciphertext: &'a str,
        content_sig: &'a str,
    },
    /// `FILE_END`.
    End,
}

impl FileFrame<'_> {
    /// The frame type, as it is routed on (§9: the recipient gets the same type).
    pub fn kind(&self) -> &'static str {
        match self.part {
            FilePart::Start { .. } => types::FILE_START,
            FilePart::Chunk { .. } => types::FILE_CHUNK,
            FilePart::End => types::FILE_END,
        }
    }
}

/// Largest sealed key accepted (the §5.3 document for an RSA-4096 key is about 3.4 KiB).
pub const MAX_PRIVKEY_STORE: usize = 16 * 1024;

impl<'a> UserFrame<'a> {
    /// Parses `env` by its type. Never fails: a payload's error is kept in its variant, an
    /// unknown type is [`UserFrame::Unknown`].
    pub fn parse(env: &'a Envelope) -> UserFrame<'a> {
        match env.kind.as_str() {
            types::USER_HELLO => UserFrame::Hello(parse_hello(env)),
            types::AUTH_RESPONSE => UserFrame::AuthResponse(AuthResponse::parse(env.fields())),
            types::USER_REGISTER => UserFrame::Register(parse_register(env)),
            types::USER_LOGIN => UserFrame::Login(parse_login(env.fields())),
            types::MSG_DIRECT => UserFrame::Direct(parse_message(env)),
            types::MSG_PUBLIC_CHANNEL => UserFrame::PublicChannel(parse_message(env)),
            types::FILE_START | types::FILE_CHUNK | types::FILE_END => {
                UserFrame::File(parse_file(env))
            }
            types::LIST_REQUEST => UserFrame::ListRequest,
            types::CTRL_CLOSE => UserFrame::CtrlClose,
            types::SERVER_HELLO_JOIN | types::SERVER_HELLO_LINK => UserFrame::ServerHello,
            other => UserFrame::Unknown(other),
        }
    }
}

/// The answer to a frame type the receiver does not take (§10): `UNKNOWN_TYPE` naming it
/// (its first 40 characters).
pub fn unknown_type(kind: &str) -> WireError {
    let shown: String = kind.chars().take(40).collect();
    WireError::new(ErrorCode::UnknownType, format!("unknown type {shown:?}"))
}

fn parse_hello(env: &Envelope) -> Payload<Hello<'_>> {
    wire::check_id("from", &env.from)?;
    Ok(Hello {
        user_id: &env.from,
        hello: UserHello::parse(env.fields())?,
    })
}

fn parse_message(env: &Envelope) -> Payload<Addressed<'_, UserMessage<'_>>> {
    wire::check_id("to", &env.to)?;
    Ok(Addressed {
        to: &env.to,
        body: UserMessage::parse(env.fields())?,
    })
}

fn parse_register(env: &Envelope) -> Payload<Register<'_>> {
    let f = env.fields();
    let user_id = f.id("user_id")?;
    if !env.from.is_empty() && env.from != user_id {
        return Err(WireError::new(
            ErrorCode::InvalidSig,
            "envelope from differs from payload.user_id",
        ));
    }
    Ok(Register {
        user_id,
        pubkey: f.str("pubkey")?,
        account: parse_account(f),
    })
}

fn parse_account(f: Fields<'_>) -> Payload<NewAccount<'_>> {
    let privkey_store = f.str("privkey_store")?;
    if privkey_store.len() > MAX_PRIVKEY_STORE || wire::b64::decode(privkey_store).is_none() {
        return Err(WireError::field(
            "privkey_store",
            "must be base64, at most 16 KiB",
        ));
    }
    let auth = auth_bytes(f.str("auth")?)
        .ok_or_else(|| WireError::field("auth", "must be 32 bytes of base64"))?;
    let display_name = f
        .obj("meta")?
        .str("display_name")
        .map_err(|_| WireError::field("meta.display_name", "missing"))?;
    if !wire::ids::is_valid_display_name(display_name) {
        return Err(WireError::field(
            "meta.display_name",
            "must be 1-32 characters of [A-Za-z0-9._-]",
        ));
    }
    Ok(NewAccount {
        privkey_store,
        auth,
        display_name,
    })
}

fn parse_login(f: Fields<'_>) -> Payload<Login<'_>> {
    Ok(Login {
        display_name: f.str("display_name")?,
        auth: f.str("auth")?,
    })
}

fn parse_file(env: &Envelope) -> Payload<FileFrame<'_>> {
    wire::check_id("to", &env.to)?;
    let f = env.fields();
    let file_id = f.id("file_id")?;
    let part = match env.kind.as_str() {
        types::FILE_START => {
            let name = f.str("name")?;
            let size = f.i64("size")?;
            if size < 0 {
                return Err(WireError::field("size", "must not be negative"));
            }
            let sha256 = f.str("sha256")?;
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(WireError::field("sha256", "must be 64 hex digits"));
            }
            FilePart::Start { name, size, sha256 }
        }
        types::FILE_CHUNK => {
            let index = f.i64("index")?;
            if index < 0 {
                return Err(WireError::field("index", "must not be negative"));
            }
            FilePart::Chunk {
                index,
                ciphertext: f.b64("ciphertext", RSA_BLOCK)?,
                content_sig: f.b64("content_sig", RSA_BLOCK)?,
            }
        }
        _ => FilePart::End,
    };
    Ok(FileFrame {
        to: &env.to,
        file_id,
        part,
    })
}

/// `auth` as raw bytes: base64 of exactly 32 bytes (§5.3).
pub fn auth_bytes(auth: &str) -> Option<Vec<u8>> {
    wire::b64::decode(auth).filter(|b| b.len() == 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(kind: &str, from: &str, to: &str, payload: serde_json::Value) -> Envelope {
        let serde_json::Value::Object(payload) = payload else {
            unreachable!()
        };
        Envelope {
            kind: kind.into(),
            from: from.into(),
            to: to.into(),
            ts: 1,
            payload,
            sig: String::new(),
        }
    }

    #[test]
    fn each_type_is_its_variant_and_others_are_unknown() {
        let e = env("LIST_REQUEST", "a", "s", serde_json::json!({}));
        assert_eq!(UserFrame::parse(&e), UserFrame::ListRequest);
        let e = env("CTRL_CLOSE", "a", "s", serde_json::json!({}));
        assert_eq!(UserFrame::parse(&e), UserFrame::CtrlClose);
        let e = env("SERVER_HELLO_LINK", "a", "s", serde_json::json!({}));
        assert_eq!(UserFrame::parse(&e), UserFrame::ServerHello);
        // Types are case-sensitive (§1).
        let e = env("list_request", "a", "s", serde_json::json!({}));
        assert_eq!(UserFrame::parse(&e), UserFrame::Unknown("list_request"));
        assert_eq!(
            unknown_type(&"X".repeat(100)).detail,
            format!("unknown type {:?}", "X".repeat(40))
        );
    }

    #[test]
    fn a_bad_payload_keeps_its_type_and_names_the_field() {
        let e = env("MSG_DIRECT", "a", "b", serde_json::json!({"ciphertext": 5}));
        let UserFrame::Direct(Err(err)) = UserFrame::parse(&e) else {
            panic!("not a MSG_DIRECT with an error")
        };
        assert_eq!(err.detail, "payload.ciphertext: must be a string");
        // The envelope `to` is checked first.
        let e = env(
            "MSG_PUBLIC_CHANNEL",
            "a",
            "no spaces",
            serde_json::json!({}),
        );
        let UserFrame::PublicChannel(Err(err)) = UserFrame::parse(&e) else {
            panic!("not a MSG_PUBLIC_CHANNEL with an error")
        };
        assert_eq!(err.detail, "envelope to: malformed id");
        let e = env("USER_HELLO", "", "s", serde_json::json!({"pubkey": "k"}));
        assert!(matches!(UserFrame::parse(&e), UserFrame::Hello(Err(_))));
    }

    #[test]
    fn file_frames_are_typed_by_part() {
        let sha = "0".repeat(64);
        let e = env(
            "FILE_START",
            "a",
            "b",
            serde_json::json!({"file_id": "f1", "name": "n", "size": 3, "sha256": sha}),
        );
        let UserFrame::File(Ok(file)) = UserFrame::parse(&e) else {
            panic!("not a valid FILE_START")
        };
        assert_eq!(
            (file.to, file.file_id, file.kind()),
            ("b", "f1", "FILE_START")
        );
        assert!(matches!(file.part, FilePart::Start { size: 3, .. }));

        let e = env(
            "FILE_CHUNK",
            "a",
            "b",
            serde_json::json!({"file_id": "f1", "index": -1, "ciphertext": "AA", "content_sig": "AA"}),
        );
        let UserFrame::File(Err(err)) = UserFrame::parse(&e) else {
            panic!("a negative index was taken")
        };
        assert_eq!(err.detail, "payload.index: must not be negative");

        let e = env("FILE_END", "a", "b", serde_json::json!({"file_id": "f1"}));
        let UserFrame::File(Ok(file)) = UserFrame::parse(&e) else {
            panic!("not a valid FILE_END")
        };
        assert_eq!((file.part, file.kind()), (FilePart::End, "FILE_END"));
    }

    #[test]
    fn register_checks_its_fields_in_order() {
        let auth = wire::b64::encode(&[7; 32]);
        let good = serde_json::json!({"user_id": "u1", "pubkey": "k", "privkey_store": "AAAA",
            "auth": auth, "meta": {"display_name": "alice"}});
        let e = env("USER_REGISTER", "", "", good.clone());
        let UserFrame::Register(Ok(reg)) = UserFrame::parse(&e) else {
            panic!("a good USER_REGISTER was refused")
        };
        let account = reg.account.unwrap();
        assert_eq!((reg.user_id, account.display_name), ("u1", "alice"));
        assert_eq!(account.auth, vec![7; 32]);

        let e = env("USER_REGISTER", "u2", "", good.clone());
        let UserFrame::Register(Err(err)) = UserFrame::parse(&e) else {
            panic!("from and user_id differ")
        };
        assert_eq!(err.code, ErrorCode::InvalidSig);

        let mut short = good;
        short["auth"] = serde_json::json!(wire::b64::encode(&[7; 31]));
        let e = env("USER_REGISTER", "", "", short);
        let UserFrame::Register(Ok(Register {
            account: Err(err), ..
        })) = UserFrame::parse(&e)
        else {
            panic!("a 31-byte auth was taken")
        };
        assert_eq!(err.detail, "payload.auth: must be 32 bytes of base64");
    }
}
