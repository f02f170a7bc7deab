//! The frames a linked server sends (PROTOCOL.md §4, §6–§9), parsed once into [`PeerFrame`].
//!
//! As with [`crate::wire::user`], a frame's type is known before its payload is judged: a
//! frame from a peer is checked first as a whole (its sender's pinned key, the seen-cache, its
//! signature, §6), and only a frame that passes is answered with its payload's error, so each
//! variant keeps its payload as a [`Payload`].

use crate::wire::user::Payload;
use crate::wire::{Envelope, Fields, WireError, types};

/// One frame from a linked server (or from a server we dialled, before its welcome), by type.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerFrame<'a> {
    /// `ERROR {code, detail}` (§10), read leniently: `"?"` and `""` when absent. Never
    /// answered.
    Error { code: &'a str, detail: &'a str },
    /// `HEARTBEAT` (§4.4).
    Heartbeat,
    /// `SERVER_ANNOUNCE {host, port, pubkey}` (§4.3).
    Announce(Announce<'a>),
    /// `USER_ADVERTISE` (§7). The entry itself is read when it is learned.
    Advertise(Payload<Presence<'a>>),
    /// `USER_REMOVE` (§7).
    Remove(Payload<Presence<'a>>),
    /// `PUBLIC_CHANNEL_ADD` (§8): forwarded as it is.
    ChannelAdd,
    /// `PUBLIC_CHANNEL_UPDATED {version}` (§8).
    ChannelUpdated(Payload<i64>),
    /// `SERVER_DELIVER`, `MSG_PUBLIC_CHANNEL`, `FILE_START`, `FILE_CHUNK`, `FILE_END` (§6, §9).
    Delivery(Delivery<'a>),
    /// `SERVER_WELCOME` (§4.3).
    Welcome,
    /// `SERVER_HELLO_JOIN` or `SERVER_HELLO_LINK` (§4.3).
    Hello,
    /// Any other type, as sent: answered with `UNKNOWN_TYPE` (see [`crate::wire::user::unknown_type`]).
    Unknown(&'a str),
}

/// `SERVER_ANNOUNCE`: its key is needed (to verify the frame) before the rest is looked at, so
/// the two parts are judged separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce<'a> {
    /// `pubkey`, as sent.
    pub pubkey: Payload<&'a str>,
    /// `host` and `port` (1–65535).
    pub addr: Payload<(&'a str, u16)>,
}

/// `USER_ADVERTISE` / `USER_REMOVE`: the user (a well-formed id) and its server as claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence<'a> {
    pub user_id: &'a str,
    pub server_id: &'a str,
}

/// A frame routed between servers toward one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery<'a> {
    /// The type the local recipient gets: `USER_DELIVER` for `SERVER_DELIVER`, else the same.
    pub local_kind: &'static str,
    /// The recipient and the sender, both well-formed ids. Read only when the frame is for
    /// this server: one relayed elsewhere goes on unchanged.
    pub route: Payload<Route<'a>>,
}

/// Who a delivery is for and from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    pub user_id: &'a str,
    pub sender: &'a str,
}

impl<'a> PeerFrame<'a> {
    /// Parses `env` by its type. Never fails: a payload's error is kept in its variant, an
    /// unknown type is [`PeerFrame::Unknown`].
    pub fn parse(env: &'a Envelope) -> PeerFrame<'a> {
        let f = env.fields();
        let delivery = |local_kind| {
            PeerFrame::Delivery(Delivery {
                local_kind,
                route: parse_route(f),
            })
        };
        match env.kind.as_str() {
            types::ERROR => PeerFrame::Error {
                code: f.str("code").unwrap_or("?"),
                detail: f.str("detail").unwrap_or(""),
            },
            types::HEARTBEAT => PeerFrame::Heartbeat,
            types::SERVER_ANNOUNCE => PeerFrame::Announce(Announce {
                pubkey: f.str("pubkey"),
                addr: parse_addr(f),
            }),
            types::USER_ADVERTISE => PeerFrame::Advertise(parse_presence(f)),
            types::USER_REMOVE => PeerFrame::Remove(parse_presence(f)),
            types::PUBLIC_CHANNEL_ADD => PeerFrame::ChannelAdd,
            types::PUBLIC_CHANNEL_UPDATED => PeerFrame::ChannelUpdated(f.i64("version")),
            types::SERVER_DELIVER => delivery(types::USER_DELIVER),
            types::MSG_PUBLIC_CHANNEL => delivery(types::MSG_PUBLIC_CHANNEL),
            types::FILE_START => delivery(types::FILE_START),
            types::FILE_CHUNK => delivery(types::FILE_CHUNK),
            types::FILE_END => delivery(types::FILE_END),
            types::SERVER_WELCOME => PeerFrame::Welcome,
            types::SERVER_HELLO_JOIN | types::SERVER_HELLO_LINK => PeerFrame::Hello,
            other => PeerFrame::Unknown(other),
        }
    }
}

/// `host` and `port` of a server (§4.3).
pub fn parse_addr(f: Fields<'_>) -> Payload<(&str, u16)> {
    let host = f.str("host")?;
    Ok((host, port_of(f)?))
}

/// `port`: 1–65535.
pub fn port_of(f: Fields<'_>) -> Payload<u16> {
    match f.i64("port")? {
        p @ 1..=65535 => Ok(p as u16),
        _ => Err(WireError::field("port", "must be 1-65535")),
    }
}

fn parse_presence(f: Fields<'_>) -> Payload<Presence<'_>> {
    Ok(Presence {
        user_id: f.id("user_id")?,
        server_id: f.str("server_id")?,
    })
}

fn parse_route(f: Fields<'_>) -> Payload<Route<'_>> {
    Ok(Route {
        user_id: f.id("user_id")?,
        sender: f.id("sender")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn env(kind: &str, payload: Value) -> Envelope {
        let Value::Object(payload) = payload else {
            unreachable!()
        };
        Envelope {
            kind: kind.into(),
            from: "s1".into(),
            to: "s2".into(),
            ts: 1,
            payload,
            sig: String::new(),
        }
    }

    #[test]
    fn deliveries_name_the_type_the_user_gets() {
        let e = env("SERVER_DELIVER", json!({"user_id": "u", "sender": "v"}));
        let PeerFrame::Delivery(d) = PeerFrame::parse(&e) else {
            panic!("not a delivery")
        };
        assert_eq!(d.local_kind, "USER_DELIVER");
        assert_eq!(
            d.route,
            Ok(Route {
                user_id: "u",
                sender: "v"
            })
        );
        let e = env("FILE_CHUNK", json!({"user_id": "u"}));
        let PeerFrame::Delivery(d) = PeerFrame::parse(&e) else {
            panic!("not a delivery")
        };
        assert_eq!(d.local_kind, "FILE_CHUNK");
        assert_eq!(d.route.unwrap_err().detail, "payload.sender: missing");
    }

    #[test]
    fn an_announce_keeps_its_key_apart_from_its_address() {
        let e = env(
            "SERVER_ANNOUNCE",
            json!({"pubkey": "k", "host": "h", "port": 0}),
        );
        let PeerFrame::Announce(a) = PeerFrame::parse(&e) else {
            panic!("not an announce")
        };
        assert_eq!(a.pubkey, Ok("k"));
        assert_eq!(a.addr.unwrap_err().detail, "payload.port: must be 1-65535");
    }

    #[test]
    fn errors_are_read_leniently_and_unknown_types_kept() {
        let e = env("ERROR", json!({"code": 5}));
        assert_eq!(
            PeerFrame::parse(&e),
            PeerFrame::Error {
                code: "?",
                detail: ""
            }
        );
        let e = env("USER_HELLO", json!({}));
        assert_eq!(PeerFrame::parse(&e), PeerFrame::Unknown("USER_HELLO"));
        let e = env("PUBLIC_CHANNEL_UPDATED", json!({"version": "1"}));
        assert!(matches!(
            PeerFrame::parse(&e),
            PeerFrame::ChannelUpdated(Err(_))
        ));
    }
}
