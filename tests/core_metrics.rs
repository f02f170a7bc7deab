//! The core's counters for `GET /metrics` (`Server::metrics`), driven with simulated time and
//! no sockets: frames by type, errors by code, signatures, dedup drops and rate-limited logins
//! are counted at the core's choke points.

mod common;

use common::keys::test_key;
use serde_json::json;
use socp::core::dedup::Stale;
use socp::core::federation::{FedConfig, PeerSpec};
use socp::core::server::{Action, ConnId, Input, Limits, Server, Time};
use socp::store::Store;
use socp::wire::{ErrorCode, SignedPayload, encode_frame, types};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

const SRV: &str = "srv-a";

struct Harness {
    server: Server,
    now: Time,
    actions: Vec<Action>,
    next: u64,
}

impl Harness {
    fn new(error_burst: u32) -> Harness {
        let limits = Limits {
            hello_timeout_ms: 10_000,
            error_burst,
            error_refill_per_s: 1,
            max_message_size: 256 * 1024,
        };
        let peer_b = PeerSpec {
            host: "127.0.0.1".into(),
            port: 9002,
            tls: false,
            key: Arc::new(
                socp::crypto::PublicKey::parse(test_key("server2").public_key().encoded()).unwrap(),
            ),
        };
        let cfg = FedConfig {
            bootstrap: vec![peer_b],
            advertise_port: 9001,
            ..FedConfig::default()
        };
        let store = Store::open_in_memory().unwrap();
        let server =
            Server::new(SRV.into(), test_key("server1"), limits, store).with_federation(cfg);
        let mut h = Harness {
            server,
            now: Time {
                mono_ms: 5_000,
                wall_ms: 1_800_000_000_000,
            },
            actions: Vec::new(),
            next: 1,
        };
        h.server.start(h.now);
        h.drain();
        h
    }

    fn drain(&mut self) {
        self.server.run_deferred(self.now);
        self.actions.extend(self.server.actions());
    }

    fn input(&mut self, input: Input<'_>) {
        self.server.handle(self.now, input);
        self.drain();
    }

    fn open(&mut self) -> ConnId {
        let c = ConnId((self.next << 32) | self.next);
        self.next += 1;
        self.input(Input::Opened {
            conn: c,
            peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
        });
        c
    }

    fn send(&mut self, conn: ConnId, text: &str) {
        self.input(Input::Text { conn, text });
    }

    /// Frames sent (Send or Route) since the last call, as their types.
    fn sent_types(&mut self) -> Vec<String> {
        self.actions
            .drain(..)
            .filter_map(|a| match a {
                Action::Send { text, .. } | Action::Route { text, .. } => {
                    Some(socp::wire::Envelope::parse(text.as_str()).unwrap().kind)
                }
                _ => None,
            })
            .collect()
    }
}

fn unsigned(kind: &str, from: &str, to: &str, ts: i64, payload: &serde_json::Value) -> String {
    encode_frame(
        kind,
        from,
        to,
        ts,
        &SignedPayload::unsigned(payload).unwrap(),
    )
}

#[test]
fn frames_errors_and_signatures_are_counted() {
    let mut h = Harness::new(20);
    let signed_at_start = h.server.metrics().signatures();
    let c = h.open();
    // Not JSON, then an unknown type: both are `other`; each gets an error.
    h.send(c, "{not json");
    assert_eq!(h.sent_types(), ["ERROR"]);
    let m = h.server.metrics();
    assert_eq!(m.frames_received("other"), 1);
    assert_eq!(
        m.frames_received("FROBNICATE"),
        1,
        "unknown types count as other"
    );
    assert_eq!(m.errors_sent(ErrorCode::UnknownType), 1);
    assert_eq!(m.frames_sent(types::ERROR), 1);
    assert_eq!(m.signatures(), signed_at_start + 1, "the error is signed");

    // The same error on another connection: its signature is reused, not made again.
    let c2 = h.open();
    h.send(c2, "{not json");
    assert_eq!(h.sent_types(), ["ERROR"]);
    let m = h.server.metrics();
    assert_eq!(m.errors_sent(ErrorCode::UnknownType), 2);
    assert_eq!(m.frames_sent(types::ERROR), 2);
    assert_eq!(m.signatures(), signed_at_start + 1);
    assert!(m.signing_seconds() > 0.0);

    // A hello: counted by type, answered with a challenge signed ahead of need.
    let c3 = h.open();
    let key = test_key("user1");
    let pubkey = key.public_key().encoded();
    let hello = json!({"client": "t", "pubkey": pubkey, "enc_pubkey": pubkey});
    h.send(
        c3,
        &unsigned(types::USER_HELLO, "alice", "", h.now.wall_ms, &hello),
    );
    assert_eq!(h.sent_types(), [types::AUTH_CHALLENGE]);
    let m = h.server.metrics();
    assert_eq!(m.frames_received(types::USER_HELLO), 1);
    assert_eq!(m.frames_sent(types::AUTH_CHALLENGE), 1);
    assert_eq!(m.frames_received(types::MSG_DIRECT), 0);
}

#[test]
fn errors_over_the_budget_are_counted_as_not_sent() {
    let mut h = Harness::new(2);
    let c = h.open();
    // USER_LOGIN leaves the connection open after a refusal; each bad one costs an error.
    let login = json!({"display_name": "nobody", "auth": 5});
    for _ in 0..4 {
        h.send(
            c,
            &unsigned(types::USER_LOGIN, "", "", h.now.wall_ms, &login),
        );
    }
    assert_eq!(h.sent_types(), ["ERROR", "ERROR"]);
    let m = h.server.metrics();
    assert_eq!(m.errors_sent(ErrorCode::BadKey), 2);
    assert_eq!(m.errors_unsent(), 2);
    assert_eq!(m.frames_received(types::USER_LOGIN), 4);
}

#[test]
fn logins_refused_by_the_rate_limit_are_counted() {
    let mut h = Harness::new(50);
    let c = h.open();
    let auth = socp::account::auth_token("guess", "victim");
    let login = json!({"display_name": "victim", "auth": auth});
    for _ in 0..socp::core::login::CONN_BURST + 2 {
        h.send(
            c,
            &unsigned(types::USER_LOGIN, "", "", h.now.wall_ms, &login),
        );
    }
    let m = h.server.metrics();
    assert_eq!(m.logins_rate_limited(), 2);
    assert_eq!(
        m.errors_sent(ErrorCode::BadKey),
        u64::from(socp::core::login::CONN_BURST) + 2
    );
}

#[test]
fn dedup_drops_are_counted_by_reason() {
    let mut h = Harness::new(50);
    let b_key = test_key("server2");
    let hello = json!({"host": "127.0.0.1", "port": 9002, "pubkey": b_key.public_key().encoded()});
    let signed = |kind: &str, ts: i64, payload: &serde_json::Value| {
        encode_frame(
            kind,
            "srv-b",
            SRV,
            ts,
            &SignedPayload::sign(payload, &b_key).unwrap(),
        )
    };
    let link = h.open();
    h.send(
        link,
        &signed(types::SERVER_HELLO_LINK, h.now.wall_ms, &hello),
    );
    assert!(
        !h.sent_types().contains(&"ERROR".to_string()),
        "link refused"
    );
    // (Heartbeats are not recorded in the seen-cache: an announce is, keyed on its envelope.)
    let announce = signed(types::SERVER_ANNOUNCE, h.now.wall_ms, &hello);
    h.send(link, &announce);
    h.sent_types();
    let m = h.server.metrics();
    assert_eq!(m.dedup_drops(Stale::Duplicate), 0);
    h.send(link, &announce);
    h.send(link, &announce);
    let stale = signed(types::SERVER_ANNOUNCE, h.now.wall_ms - 600_000, &hello);
    h.send(link, &stale);
    assert!(h.sent_types().is_empty(), "drops are silent");
    let m = h.server.metrics();
    assert_eq!(m.dedup_drops(Stale::Duplicate), 2);
    assert_eq!(m.dedup_drops(Stale::OutOfWindow), 1);
    assert_eq!(m.frames_received(types::SERVER_ANNOUNCE), 4);
    assert_eq!(m.frames_received(types::SERVER_HELLO_LINK), 1);
}
