//! Randomised bad input for the core (stands in for fuzzing, which needs a nightly toolchain
//! this project does not have): thousands of mutated frames from an unauthenticated
//! connection, from a logged-in user and from a linked peer server. The core must never panic,
//! and must keep serving a healthy user afterwards. The seed is fixed so failures reproduce;
//! set SOCP_ROBUSTNESS_SEED to explore others.

mod common;
mod support;

use common::keys::test_key;
use serde_json::{Map, Value, json};
use socp::core::federation::FedConfig;
use socp::core::server::{Action, ConnId, Input, Limits};
use socp::crypto::PrivateKey;
use socp::wire::{SignedPayload, encode_frame};
use support::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const TYPES: &[&str] = &[
    "USER_HELLO",
    "AUTH_RESPONSE",
    "USER_REGISTER",
    "USER_LOGIN",
    "MSG_DIRECT",
    "MSG_PUBLIC_CHANNEL",
    "FILE_START",
    "FILE_CHUNK",
    "FILE_END",
    "LIST_REQUEST",
    "CTRL_CLOSE",
    "SERVER_HELLO_JOIN",
    "SERVER_HELLO_LINK",
    "SERVER_WELCOME",
    "SERVER_ANNOUNCE",
    "SERVER_DELIVER",
    "USER_ADVERTISE",
    "USER_REMOVE",
    "PUBLIC_CHANNEL_ADD",
    "PUBLIC_CHANNEL_UPDATED",
    "HEARTBEAT",
    "ERROR",
    "ACK",
    "NOPE",
    "",
];

fn random_value(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth > 2 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(rng.next() as i64),
        3 => json!(-1.5e300),
        4 => json!(*rng.pick(&["", "alice", "srv-b", "*", "../..", "é😀", "\u{0}", "AAAA"])),
        5 => json!("x".repeat(rng.below(3000))),
        6 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.below(5) {
                let k = *rng.pick(&[
                    "user_id",
                    "server_id",
                    "pubkey",
                    "meta",
                    "ciphertext",
                    "content_sig",
                    "sender",
                    "file_id",
                    "index",
                    "size",
                    "sha256",
                    "name",
                    "nonce",
                    "auth",
                    "display_name",
                    "host",
                    "port",
                    "users",
                    "clients",
                    "servers",
                    "version",
                    "add",
                    "ts",
                    "code",
                    "detail",
                    "msg_ref",
                    "privkey_store",
                ]);
                m.insert(k.to_string(), random_value(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// A valid-looking payload for `kind`, so that mutations reach deep into the handlers.
fn template(kind: &str, rng: &mut Rng) -> Value {
    let ct = "A".repeat(683);
    // Fresh ids, so each FILE_START opens a new transfer rather than being refused as a repeat.
    let file_id = format!("f{}", rng.below(1_000_000));
    match kind {
        "MSG_DIRECT" | "MSG_PUBLIC_CHANNEL" => {
            json!({"ciphertext": ct, "content_sig": ct, "sender_pub": "MIICIjAN"})
        }
        "FILE_START" => json!({"file_id": file_id, "name": "x.bin", "size": 10,
                              "sha256": "0".repeat(64), "mode": "dm"}),
        "FILE_CHUNK" => {
            json!({"file_id": file_id, "index": 0, "ciphertext": ct, "content_sig": ct})
        }
        "FILE_END" => json!({"file_id": file_id}),
        "USER_ADVERTISE" => json!({"user_id": "zed", "server_id": "srv-b",
                                  "pubkey": test_key("user8").public_key().encoded(),
                                  "meta": {"display_name": "zed"}}),
        "SERVER_DELIVER" => json!({"user_id": "alice", "sender": "zed", "ciphertext": ct,
                                  "sender_pub": "x", "content_sig": ct, "ts": 1}),
        _ => json!({}),
    }
}

/// A frame: mostly well-formed envelopes with random payloads, sometimes raw junk, and often a
/// valid template with one field changed or one random extra field added.
fn random_frame(rng: &mut Rng, from: &str, key: Option<&PrivateKey>, now: i64) -> String {
    if rng.below(3) == 0 {
        let kind = *rng.pick(&[
            "MSG_DIRECT",
            "MSG_PUBLIC_CHANNEL",
            "FILE_START",
            "FILE_CHUNK",
            "FILE_END",
            "USER_ADVERTISE",
            "SERVER_DELIVER",
        ]);
        let mut payload = template(kind, rng);
        let field = *rng.pick(&["file_id", "size", "index", "extra", "meta", "user_id", "ts"]);
        payload[field] = random_value(rng, 1);
        let to = *rng.pick(&["bob", "bob", "bob", "alice", "srv-a", "srv-a", "*"]);
        // Signed when the sender has a key, so a peer's frames pass verification and reach
        // the handlers behind it; non-canonical payloads go out raw (and must be refused).
        return match (key, SignedPayload::unsigned(&payload)) {
            (Some(k), Ok(_)) => encode_frame(
                kind,
                from,
                to,
                now,
                &SignedPayload::sign(&payload, k).unwrap(),
            ),
            _ => json!({"type": kind, "from": from, "to": to, "ts": now, "payload": payload,
                        "sig": ""})
            .to_string(),
        };
    }
    match rng.below(10) {
        0 => "{not json".into(),
        1 => json!([1, 2, 3]).to_string(),
        2 => json!({"type": rng.pick(TYPES), "from": 5, "to": null}).to_string(),
        _ => {
            let payload = random_value(rng, 0);
            let payload = if payload.is_object() {
                payload
            } else {
                json!({"v": payload})
            };
            let kind = *rng.pick(TYPES);
            let to = *rng.pick(&["", "srv-a", "srv-b", "alice", "bob", "*", "127.0.0.1:1"]);
            let ts = if rng.below(4) == 0 {
                rng.next() as i64
            } else {
                now
            };
            let signed = match (key, SignedPayload::unsigned(&payload)) {
                (Some(k), Ok(_)) if rng.below(2) == 0 => SignedPayload::sign(&payload, k).unwrap(),
                (_, Ok(s)) => s,
                (_, Err(_)) => {
                    // Non-canonical (floats): send it raw.
                    return json!({"type": kind, "from": from, "to": to, "ts": ts,
                                  "payload": payload, "sig": ""})
                    .to_string();
                }
            };
            encode_frame(kind, from, to, ts, &signed)
        }
    }
}

/// "srv-a" with srv-b (server2 at 127.0.0.1:9002) as its pinned bootstrap peer; not started.
fn harness() -> CoreHarness {
    let fed = FedConfig {
        advertise_port: 9001,
        bootstrap: vec![spec("server2", 9002)],
        ..FedConfig::default()
    };
    let limits = Limits {
        hello_timeout_ms: 30_000,
        error_burst: 32,
        error_refill_per_s: 4,
        max_message_size: 65536,
    };
    let setup = Setup::new("srv-a")
        .limits(limits)
        .federation(fed)
        // Many transfers at once, so random FILE_STARTs keep reaching the routing code.
        .transfer_limits(socp::core::transfer::TransferLimits {
            max_per_user: usize::MAX,
            ..Default::default()
        })
        .at(0, 1_800_000_000_000);
    CoreHarness::build(setup)
}

/// Feeds one input; returns its actions (and only its own).
fn step(h: &mut CoreHarness, input: Input<'_>) -> Vec<Action> {
    h.take();
    h.input(input);
    h.take()
}

/// An inbound link from srv-b (pinned through the bootstrap list).
fn peer(h: &mut CoreHarness, key: &PrivateKey) -> ConnId {
    let conn = h.open_fresh();
    let hello = json!({"host": "127.0.0.1", "port": 9002, "pubkey": key.public_key().encoded()});
    let text = signed_frame(
        "SERVER_HELLO_JOIN",
        "srv-b",
        "127.0.0.1:9001",
        h.now.wall_ms,
        &hello,
        key,
    );
    let acts = step(h, Input::Text { conn, text: &text });
    assert!(
        envelopes_to(&acts, conn)
            .iter()
            .any(|e| e.kind == "SERVER_WELCOME")
    );
    conn
}

#[test]
fn random_frames_never_crash_the_core_and_service_continues() {
    let seed = std::env::var("SOCP_ROBUSTNESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0001u64);
    eprintln!("robustness seed {seed} (set SOCP_ROBUSTNESS_SEED to reproduce)");
    let mut rng = Rng(seed | 1);
    let mut h = harness();
    h.start();
    h.take();
    let (alice_key, bob_key, b_key) = (test_key("user1"), test_key("user2"), test_key("server2"));
    let mut alice = h.user("alice", &alice_key);
    let bob = h.user("bob", &bob_key);
    let peer = peer(&mut h, &b_key);

    for round in 0..6000 {
        // Random frames include CTRL_CLOSE: keep alice logged in so hers reach deep handlers.
        if h.server.directory().get("alice").is_none() {
            alice = h.user("alice", &alice_key);
        }
        h.now.mono_ms += rng.below(50) as u64;
        h.now.wall_ms += rng.below(50) as i64;
        let (conn, from, key) = match rng.below(4) {
            0 => (h.open_fresh(), "mallory", None),
            1 => (alice, "alice", Some(&alice_key)),
            2 => (peer, *rng.pick(&["srv-b", "srv-c", "srv-a"]), Some(&b_key)),
            _ => (peer, "srv-b", Some(&b_key)),
        };
        let text = random_frame(&mut rng, from, key, h.now.wall_ms);
        if rng.below(20) == 0 {
            step(&mut h, Input::Binary { conn });
        } else {
            step(&mut h, Input::Text { conn, text: &text });
        }
        // Now and then a stranger's connection goes away (alice, bob and the link stay).
        if round % 97 == 0 && from == "mallory" {
            step(&mut h, Input::Closed { conn });
        }
    }

    // The core still serves: bob (re)connects if he was dropped, and alice reaches him.
    let alice = h.user("carol", &test_key("user3"));
    let bob_conn = if h.server.directory().get("bob").is_some() {
        bob
    } else {
        h.user("bob", &bob_key)
    };
    let raw = bob_key.public_key().encrypt(b"still here").unwrap();
    let ct = socp::wire::b64::encode(&raw);
    let ts = h.now.wall_ms;
    let sig = socp::crypto::make_content_sig(&test_key("user3"), &raw, "carol", Some("bob"), ts);
    let payload = json!({"ciphertext": ct, "sender_pub": test_key("user3").public_key().encoded(),
                         "content_sig": sig});
    let signed = SignedPayload::unsigned(&payload).unwrap();
    let acts = step(
        &mut h,
        Input::Text {
            conn: alice,
            text: &encode_frame("MSG_DIRECT", "carol", "bob", ts, &signed),
        },
    );
    let got = envelopes_to(&acts, bob_conn);
    assert!(
        got.iter().any(|e| e.kind == "USER_DELIVER"),
        "service stopped: {got:?}"
    );
}

#[test]
fn a_file_frame_with_a_float_in_an_extra_field_is_refused_not_fatal() {
    // Regression: the user's file payload is forwarded whole and signed by the server; a float
    // anywhere in it has no canonical form (§3.3), which used to panic the server.
    let mut h = harness();
    let (alice_key, bob_key) = (test_key("user1"), test_key("user2"));
    let alice = h.user("alice", &alice_key);
    let _bob = h.user("bob", &bob_key);
    let start = json!({"file_id": "f1", "name": "x", "size": 1, "sha256": "0".repeat(64),
                       "mode": "dm", "extra": 1.5});
    let text = json!({"type": "FILE_START", "from": "alice", "to": "bob", "ts": h.now.wall_ms,
                      "payload": start, "sig": ""})
    .to_string();
    let acts = step(
        &mut h,
        Input::Text {
            conn: alice,
            text: &text,
        },
    );
    let errors: Vec<_> = envelopes_to(&acts, alice)
        .into_iter()
        .filter(|e| e.kind == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "{acts:?}");
    assert_eq!(errors[0].payload["code"], "BAD_KEY");
}
