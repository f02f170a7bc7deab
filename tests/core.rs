//! Integration tests of the sans-IO server core (`socp::core::server::Server`) with simulated
//! time and no sockets (DESIGN.md "Tests in three layers", first layer).
//!
//! A [`CoreHarness`] (tests/support) feeds the core `Input`s at a simulated time and collects its
//! `Action`s into an outbox; helpers take from the outbox the frames sent to one connection,
//! parsed, and **verified with the server's public key** (PROTOCOL.md §3.4: every frame a server
//! emits is signed).

mod common;
mod support;

use common::keys::test_key;
use serde_json::{Value, json};
use socp::core::random::SeededRandom;
use socp::core::server::{Action, ConnId, Input, Limits, Timer, close};
use socp::crypto::{self, PrivateKey};
use socp::wire::canon;
use socp::wire::{Envelope, types};
use std::net::{IpAddr, Ipv4Addr};
use support::*;

const SRV: &str = "srv";

/// "srv" (key server1) with `limits`, no federation, not started.
fn harness_with(limits: Limits) -> CoreHarness {
    CoreHarness::build(setup(limits))
}

/// "srv" (key server1) with `limits` on a `MemStore`.
fn setup(limits: Limits) -> Setup {
    Setup::new(SRV)
        .limits(limits)
        .mem_store()
        .at(5_000, 1_700_000_000_000)
}

fn harness() -> CoreHarness {
    harness_with(default_limits())
}

/// Asserts `frames` is exactly one `ERROR` with `code`, whose detail contains `detail`.
#[track_caller]
fn assert_error(frames: &[Envelope], code: &str, detail: &str) {
    assert_eq!(kinds(frames), [types::ERROR], "{frames:#?}");
    let e = &frames[0];
    assert_eq!(str_field(e, "code"), code, "{e:?}");
    assert!(
        str_field(e, "detail").contains(detail),
        "detail {:?} should contain {detail:?}",
        str_field(e, "detail")
    );
}

fn weak_key(file: &str) -> String {
    let path = format!("{}/tests/fixtures/keys/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

// -------------------------------------------------------------------- 1. hello

#[test]
fn full_hello_challenge_ack_then_list_then_snapshot() {
    let mut h = harness();
    let alice = test_key("user1");
    let c = conn(1);
    h.open(c);
    assert!(
        h.frames_to(c).is_empty(),
        "a server never speaks first (§1)"
    );

    let ch = h.challenge(c, "alice", &alice);
    assert_eq!(ch.to, "alice");
    let nonce = str_field(&ch, "nonce");
    let bytes = socp::wire::b64::decode(nonce).expect("nonce is base64");
    assert_eq!(bytes.len(), 32, "nonce is 32 bytes");
    assert!(
        nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "nonce is base64url without padding: {nonce}"
    );
    assert_eq!(socp::wire::b64::encode(&bytes), nonce);
    assert_eq!(str_field(&ch, "server_id"), SRV);
    assert_eq!(str_field(&ch, "server_pubkey"), h.server_pub.encoded());
    assert_eq!(
        keys_of(&ch.payload),
        ["nonce", "server_id", "server_pubkey"]
    );

    let frames = h.respond(c, "alice", &alice, &ch);
    assert_eq!(
        kinds(&frames),
        [
            types::USER_HELLO_ACK,
            types::LIST_RESPONSE,
            types::PUBLIC_CHANNEL_SNAPSHOT
        ]
    );
    assert_eq!(list_ids(&frames[1]), ["alice"]);
    let me = &frames[1].payload["users"][0];
    assert_eq!(me["server_id"], SRV);
    assert_eq!(me["pubkey"], alice.public_key().encoded());
    assert_eq!(me["meta"]["display_name"], "tester");
    let snap = &frames[2];
    assert!(snap.payload["version"].is_i64(), "{snap:?}");
    assert_eq!(snap.payload["members"], json!(["alice"]));
    assert!(h.closes(c).is_empty());

    // A second challenge uses a fresh nonce.
    let bob = test_key("user2");
    h.open(conn(2));
    let ch2 = h.challenge(conn(2), "bob", &bob);
    assert_ne!(str_field(&ch2, "nonce"), nonce);
}

// -------------------------------------------------------------------- 2. login order (§7)

#[test]
fn login_order_independence() {
    for order in [["alice", "bob"], ["bob", "alice"]] {
        let mut h = harness();
        let key = |name: &str| test_key(if name == "alice" { "user1" } else { "user2" });
        let (first, second) = (order[0], order[1]);
        let (c1, c2) = (conn(1), conn(2));

        let f1 = h.login(c1, first, &key(first));
        assert_eq!(list_ids(&f1[1]), [first]);

        let f2 = h.login(c2, second, &key(second));
        assert_eq!(
            kinds(&f2),
            [
                types::USER_HELLO_ACK,
                types::LIST_RESPONSE,
                types::PUBLIC_CHANNEL_SNAPSHOT
            ],
            "{order:?}"
        );
        // The newcomer sees both, sorted by user_id whatever the login order.
        assert_eq!(list_ids(&f2[1]), ["alice", "bob"], "{order:?}");
        let mut members: Vec<String> = f2[2].payload["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_owned())
            .collect();
        members.sort();
        assert_eq!(members, ["alice", "bob"], "{order:?}");

        // The one already online gets exactly one USER_ADVERTISE for the newcomer.
        let to_first = h.frames_to(c1);
        assert_eq!(kinds(&to_first), [types::USER_ADVERTISE], "{order:?}");
        let adv = &to_first[0];
        assert_eq!(adv.to, "*");
        assert_eq!(str_field(adv, "user_id"), second);
        assert_eq!(str_field(adv, "server_id"), SRV);
        assert_eq!(str_field(adv, "pubkey"), key(second).public_key().encoded());
        assert_eq!(adv.payload["meta"]["display_name"], "tester");
        // §7: presence carries its signed ts, which orders it and dates it (§6).
        assert_eq!(
            keys_of(&adv.payload),
            ["meta", "pubkey", "server_id", "ts", "user_id"]
        );
        assert_eq!(adv.payload["ts"], h.now.wall_ms);

        // Nothing else is pending for anyone.
        assert!(h.frames_to(c2).is_empty());
        assert_eq!(h.list(c1, first), ["alice", "bob"]);
    }
}

#[test]
fn the_advert_leaves_before_the_newcomers_snapshot_and_nothing_overtakes_the_snapshot() {
    let mut h = harness();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    let (ca, cb) = (conn(1), conn(2));
    h.login(ca, "alice", &alice);
    h.clear();
    h.open(cb);
    h.timers();
    let ch = h.challenge(cb, "bob", &bob);
    let resp = h.auth_response("bob", &bob, &ch);
    h.send_only(cb, &resp);

    // What the hello produces at once: the advert to the others, and the newcomer's frames in
    // their places; its two snapshots are written at the end of the turn (shared by the
    // turn's newcomers).
    assert!(h.has_deferred());
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_ADVERTISE]);
    assert_eq!(
        h.heads_to(cb),
        [
            (types::USER_HELLO_ACK, true),
            (types::LIST_RESPONSE, false),
            (types::PUBLIC_CHANNEL_SNAPSHOT, false)
        ]
    );

    // Alice answers before the turn ends: her message to bob queues behind his snapshot (§7).
    let ts = h.now.wall_ms;
    let payload = message_payload(&alice, bob.public_key(), "alice", Some("bob"), ts, "hi");
    let dm = user_frame_at(types::MSG_DIRECT, "alice", "bob", ts, &payload, None);
    h.send_only(ca, &dm);
    h.server.run_deferred(h.now);
    assert!(!h.has_deferred());
    let to_bob = h.frames_to(cb);
    assert_eq!(
        kinds(&to_bob),
        [
            types::USER_HELLO_ACK,
            types::LIST_RESPONSE,
            types::PUBLIC_CHANNEL_SNAPSHOT,
            types::USER_DELIVER
        ]
    );
    assert_eq!(list_ids(&to_bob[1]), ["alice", "bob"]);
}

/// Newcomers of one turn share one directory snapshot and one channel snapshot: one canonical
/// text and one signature each, however many log in together (issue "signatures off the
/// loop"), and each snapshot lists all of them.
#[test]
fn newcomers_of_one_turn_share_one_signed_snapshot() {
    let mut h = harness();
    let names = ["alice", "bob", "carol"];
    let conns: Vec<ConnId> = (1..=3).map(conn).collect();
    let mut responses = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let key = test_key(&format!("user{}", i + 1));
        h.open(conns[i]);
        h.timers();
        let ch = h.challenge(conns[i], name, &key);
        responses.push(h.auth_response(name, &key, &ch));
    }
    h.clear();
    let before = h.server.metrics().signatures();
    for (c, resp) in conns.iter().zip(&responses) {
        h.send_only(*c, resp);
    }
    h.server.run_deferred(h.now);
    // Per newcomer: its advert and its ack; then one LIST_RESPONSE and one channel snapshot
    // for the three (and the challenges signed ahead, replacing the three used).
    let signed = h.server.metrics().signatures() - before;
    assert!(
        signed <= 3 * 2 + 2 + 3,
        "{signed} signatures for three logins"
    );
    let mut lists = Vec::new();
    let mut snapshots = Vec::new();
    for c in &conns {
        let frames = h.frames_to(*c);
        let list = frames
            .iter()
            .find(|e| e.kind == types::LIST_RESPONSE)
            .unwrap();
        let snap = frames
            .iter()
            .find(|e| e.kind == types::PUBLIC_CHANNEL_SNAPSHOT)
            .unwrap();
        assert_eq!(list_ids(list), ["alice", "bob", "carol"]);
        lists.push(list.sig.clone());
        snapshots.push(snap.sig.clone());
    }
    assert!(
        lists.iter().all(|s| *s == lists[0]),
        "one signature for the three lists"
    );
    assert!(snapshots.iter().all(|s| *s == snapshots[0]));
}

#[test]
fn list_response_is_sorted_for_any_login_order() {
    let mut h = harness();
    let names = ["zoe", "mallory", "alice", "Bob", "carol-2", "carol.1"];
    for (i, name) in names.iter().enumerate() {
        h.login(
            conn(i as u64 + 1),
            name,
            &test_key(&format!("user{}", i + 1)),
        );
    }
    h.clear();
    let ids = h.list(conn(1), "zoe");
    let mut sorted: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    sorted.sort(); // byte order: uppercase first
    assert_eq!(ids, sorted);
}

// -------------------------------------------------------------------- 3. direct messages

#[test]
fn msg_direct_becomes_user_deliver() {
    let mut h = harness();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    let (ca, cb) = (conn(1), conn(2));
    h.login(ca, "alice", &alice);
    h.login(cb, "bob", &bob);
    h.clear();

    // The frame's ts differs from the server clock, to see which one is carried.
    let ts = h.now.wall_ms - 4_321;
    let payload = message_payload(&alice, bob.public_key(), "alice", Some("bob"), ts, "hi bob");
    let frame = user_frame_at(types::MSG_DIRECT, "alice", "bob", ts, &payload, None);
    h.advance(7);
    h.send(ca, &frame);

    assert!(h.frames_to(ca).is_empty(), "the sender gets nothing back");
    let got = h.frames_to(cb);
    assert_eq!(kinds(&got), [types::USER_DELIVER]);
    let d = &got[0];
    assert_eq!(d.to, "bob");
    assert_eq!(
        keys_of(&d.payload),
        ["ciphertext", "content_sig", "sender", "sender_pub", "ts"]
    );
    assert_eq!(d.payload["ciphertext"], payload["ciphertext"]);
    assert_eq!(d.payload["content_sig"], payload["content_sig"]);
    assert_eq!(d.payload["sender_pub"], payload["sender_pub"]);
    assert_eq!(d.payload["sender"], "alice");
    assert_eq!(
        d.payload["ts"],
        json!(ts),
        "payload.ts is the sender's frame ts (§3.5)"
    );
    // Bob can check content_sig and read the text.
    assert!(crypto::verify_content_sig(
        alice.public_key(),
        str_field(d, "content_sig"),
        str_field(d, "ciphertext"),
        "alice",
        Some("bob"),
        ts
    ));
    let ct = socp::wire::b64::decode(str_field(d, "ciphertext")).unwrap();
    assert_eq!(bob.decrypt(&ct).unwrap(), b"hi bob");
    assert!(h.drain().is_empty());
}

#[test]
fn msg_direct_to_unknown_user_is_user_not_found_to_sender_only() {
    let mut h = harness();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    let (ca, cb) = (conn(1), conn(2));
    h.login(ca, "alice", &alice);
    h.login(cb, "bob", &bob);
    h.clear();

    let ts = h.now.wall_ms;
    let payload = message_payload(&alice, bob.public_key(), "alice", Some("nobody"), ts, "?");
    let frame = user_frame_at(types::MSG_DIRECT, "alice", "nobody", ts, &payload, None);
    h.send(ca, &frame);
    assert_error(&h.frames_to(ca), "USER_NOT_FOUND", "nobody");
    assert!(h.frames_to(cb).is_empty());
    assert!(h.drain().is_empty(), "no close, nothing else");
}

#[test]
fn msg_direct_with_someone_elses_sender_pub_is_refused() {
    let mut h = harness();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    let (ca, cb) = (conn(1), conn(2));
    h.login(ca, "alice", &alice);
    h.login(cb, "bob", &bob);
    h.clear();

    // Alice claims bob's key as hers.
    let ts = h.now.wall_ms;
    let mut payload = message_payload(&alice, bob.public_key(), "alice", Some("bob"), ts, "x");
    payload["sender_pub"] = json!(bob.public_key().encoded());
    let frame = user_frame_at(types::MSG_DIRECT, "alice", "bob", ts, &payload, None);
    h.send(ca, &frame);
    assert_error(&h.frames_to(ca), "BAD_KEY", "payload.sender_pub");
    assert!(h.frames_to(cb).is_empty());
}

// -------------------------------------------------------------------- 4. public channel (§8)

#[test]
fn public_channel_copies_reach_each_member_once() {
    let mut h = harness();
    let (alice, bob, carol) = (test_key("user1"), test_key("user2"), test_key("user3"));
    let (ca, cb, cc) = (conn(1), conn(2), conn(3));
    h.login(ca, "alice", &alice);
    h.login(cb, "bob", &bob);
    h.login(cc, "carol", &carol);
    h.clear();

    let ts = h.now.wall_ms - 99;
    let mut sent = Vec::new();
    for (member, key) in [("bob", &bob), ("carol", &carol)] {
        let p = message_payload(&alice, key.public_key(), "alice", None, ts, "hello all");
        let f = user_frame_at(types::MSG_PUBLIC_CHANNEL, "alice", member, ts, &p, None);
        h.send(ca, &f);
        sent.push(p);
    }

    assert!(h.frames_to(ca).is_empty(), "the sender gets no copy");
    for ((c, member, key), p) in [(cb, "bob", &bob), (cc, "carol", &carol)]
        .into_iter()
        .zip(&sent)
    {
        let got = h.frames_to(c);
        assert_eq!(kinds(&got), [types::MSG_PUBLIC_CHANNEL], "{member}");
        let m = &got[0];
        assert_eq!(m.to, member);
        assert_eq!(
            m.payload["ciphertext"], p["ciphertext"],
            "{member} got its own copy"
        );
        assert_eq!(m.payload["sender"], "alice");
        assert_eq!(m.payload["ts"], json!(ts));
        assert!(crypto::verify_content_sig(
            alice.public_key(),
            str_field(m, "content_sig"),
            str_field(m, "ciphertext"),
            "alice",
            None,
            ts
        ));
        let ct = socp::wire::b64::decode(str_field(m, "ciphertext")).unwrap();
        assert_eq!(key.decrypt(&ct).unwrap(), b"hello all");
    }
    assert!(h.drain().is_empty());
}

// -------------------------------------------------------------------- 5. sender binding (§5.2)

#[test]
fn frame_from_another_sender_is_refused_and_not_delivered() {
    let mut h = harness();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    let (ca, cb) = (conn(1), conn(2));
    h.login(ca, "alice", &alice);
    h.login(cb, "bob", &bob);
    h.clear();

    // Alice's connection sends a DM claiming to be from "carol" (fully self-consistent otherwise).
    let ts = h.now.wall_ms;
    let p = message_payload(&alice, bob.public_key(), "carol", Some("bob"), ts, "spoof");
    let f = user_frame_at(types::MSG_DIRECT, "carol", "bob", ts, &p, Some(&alice));
    h.send(ca, &f);
    assert_error(
        &h.frames_to(ca),
        "INVALID_SIG",
        "sender does not match session",
    );
    assert!(h.frames_to(cb).is_empty(), "not delivered");
    assert!(h.closes(ca).is_empty());

    // Claiming to be bob, the recipient, is no better; nor is an empty `from`.
    for from in ["bob", ""] {
        let f = user_frame_at(types::MSG_DIRECT, from, "bob", ts, &p, None);
        h.send(ca, &f);
        assert_error(
            &h.frames_to(ca),
            "INVALID_SIG",
            "sender does not match session",
        );
        assert!(h.frames_to(cb).is_empty(), "not delivered");
    }
    let f = h.user_frame(types::LIST_REQUEST, "bob", SRV, &json!({}), None);
    h.send(ca, &f);
    assert_error(
        &h.frames_to(ca),
        "INVALID_SIG",
        "sender does not match session",
    );
    assert!(h.drain().is_empty());
}

// -------------------------------------------------------------------- 6. forged AUTH_RESPONSE

#[test]
fn forged_auth_response_is_refused_without_closing() {
    let mut h = harness();
    let (alice, bob, mallory) = (test_key("user1"), test_key("user2"), test_key("user3"));
    let (ca, cb) = (conn(1), conn(2));
    h.login(cb, "bob", &bob);
    h.open(ca);
    h.clear();

    // (a) Right payload, signed by a different key.
    let ch = h.challenge(ca, "alice", &alice);
    let f = h.user_frame(
        types::AUTH_RESPONSE,
        "alice",
        SRV,
        &auth_payload(&ch, "alice"),
        Some(&mallory),
    );
    h.send(ca, &f);
    assert_error(&h.frames_to(ca), "INVALID_SIG", "");
    assert!(h.closes(ca).is_empty(), "not closed");

    // (b) Signed by the right key, but over a nonce of its own choosing.
    let ch = h.challenge(ca, "alice", &alice);
    let mut p = auth_payload(&ch, "alice");
    p["nonce"] = json!(socp::wire::b64::encode(&[7u8; 32]));
    let f = h.user_frame(types::AUTH_RESPONSE, "alice", SRV, &p, Some(&alice));
    h.send(ca, &f);
    assert_error(&h.frames_to(ca), "INVALID_SIG", "");
    assert!(h.closes(ca).is_empty(), "not closed");

    // (c) Unsigned.
    let ch = h.challenge(ca, "alice", &alice);
    let f = h.user_frame(
        types::AUTH_RESPONSE,
        "alice",
        SRV,
        &auth_payload(&ch, "alice"),
        None,
    );
    h.send(ca, &f);
    assert_error(&h.frames_to(ca), "INVALID_SIG", "");

    // (d) A correct signature replayed for a consumed challenge: the nonce is single-use.
    let ch = h.challenge(ca, "alice", &alice);
    let good = h.user_frame(
        types::AUTH_RESPONSE,
        "alice",
        SRV,
        &auth_payload(&ch, "alice"),
        Some(&alice),
    );
    let bad = h.user_frame(
        types::AUTH_RESPONSE,
        "alice",
        SRV,
        &auth_payload(&ch, "alice"),
        Some(&mallory),
    );
    h.send(ca, &bad);
    assert_error(&h.frames_to(ca), "INVALID_SIG", "");
    h.send(ca, &good);
    assert_error(&h.frames_to(ca), "INVALID_SIG", "");

    // Alice is not online: bob was told nothing and does not list her.
    assert!(
        h.frames_to(cb).is_empty(),
        "no USER_ADVERTISE for a failed hello"
    );
    assert_eq!(h.list(cb, "bob"), ["bob"]);
    assert!(h.drain().is_empty(), "no close anywhere");

    // The connection is still usable: a proper hello now succeeds on it.
    let frames = h.hello(ca, "alice", &alice);
    assert_eq!(list_ids(&frames[1]), ["alice", "bob"]);
    assert_eq!(kinds(&h.frames_to(cb)), [types::USER_ADVERTISE]);
}

// -------------------------------------------------------------------- 7. key binding (§5.2)

#[test]
fn user_id_stays_bound_to_its_first_key() {
    let mut h = harness();
    let (key_a, key_b) = (test_key("user1"), test_key("user2"));

    h.login(conn(1), "user1", &key_a);
    h.closed(conn(1));
    assert!(h.drain().is_empty());

    // Same id, another key: refused at USER_HELLO, no challenge.
    h.open(conn(2));
    h.clear();
    let f = h.user_frame(
        types::USER_HELLO,
        "user1",
        "",
        &hello_payload(key_b.public_key().encoded()),
        None,
    );
    h.send(conn(2), &f);
    assert_error(&h.frames_to(conn(2)), "BAD_KEY", "");
    assert!(h.closes(conn(2)).is_empty());

    // Another id with key B is fine; and user1 with key A works again, on the same connection.
    h.login(conn(3), "someone-else", &key_b);
    h.clear();
    let frames = h.hello(conn(2), "user1", &key_a);
    assert_eq!(list_ids(&frames[1]), ["someone-else", "user1"]);

    // The binding survives the first key's sessions: key B is still refused after more logins.
    h.closed(conn(2));
    h.clear();
    h.open(conn(4));
    h.clear();
    let f = h.user_frame(
        types::USER_HELLO,
        "user1",
        "",
        &hello_payload(key_b.public_key().encoded()),
        None,
    );
    h.send(conn(4), &f);
    assert_error(&h.frames_to(conn(4)), "BAD_KEY", "");
}

#[test]
fn same_key_in_another_encoding_is_the_same_binding() {
    // §3.2: keys compare by their DER, not their text.
    let mut h = harness();
    let key = test_key("user1");
    h.login(conn(1), "user1", &key);
    h.closed(conn(1));
    h.open(conn(2));
    h.clear();
    let pem = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(key.public_key().spki_der());
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    };
    let f = h.user_frame(types::USER_HELLO, "user1", "", &hello_payload(&pem), None);
    h.send(conn(2), &f);
    let frames = h.frames_to(conn(2));
    assert_eq!(kinds(&frames), [types::AUTH_CHALLENGE], "{frames:#?}");
    h.respond(conn(2), "user1", &key, &frames[0]);
}

// -------------------------------------------------------------------- 8. NAME_IN_USE

#[test]
fn second_connection_for_an_online_user_gets_name_in_use_and_is_closed() {
    let mut h = harness();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    let (c1, c2, cb) = (conn(1), conn(2), conn(3));
    h.login(c1, "alice", &alice);
    h.login(cb, "bob", &bob);
    h.open(c2);
    h.clear();

    let f = h.user_frame(
        types::USER_HELLO,
        "alice",
        "",
        &hello_payload(alice.public_key().encoded()),
        None,
    );
    h.send(c2, &f);
    let actions = h.drain();
    // Exactly: ERROR NAME_IN_USE to c2, then close c2 with 1008. Nothing to anyone else.
    assert_eq!(actions.len(), 2, "{actions:#?}");
    let Action::Send { conn: to, text } = &actions[0] else {
        panic!("{actions:#?}")
    };
    assert_eq!(*to, c2);
    assert_error(&[h.check(text.as_str())], "NAME_IN_USE", "");
    assert!(
        matches!(actions[1], Action::Close { conn, code: close::POLICY, .. } if conn == c2),
        "{actions:#?}"
    );

    // The first connection is unaffected: alice still online, still served, no USER_REMOVE.
    assert_eq!(h.list(c1, "alice"), ["alice", "bob"]);
    assert_eq!(h.list(cb, "bob"), ["alice", "bob"]);
    let ts = h.now.wall_ms;
    let p = message_payload(
        &bob,
        alice.public_key(),
        "bob",
        Some("alice"),
        ts,
        "still there?",
    );
    h.send(
        cb,
        &user_frame_at(types::MSG_DIRECT, "bob", "alice", ts, &p, None),
    );
    assert_eq!(kinds(&h.frames_to(c1)), [types::USER_DELIVER]);
    // Late input on the closed connection is ignored.
    h.send(c2, &f);
    h.closed(c2);
    assert!(h.drain().is_empty());
}

#[test]
fn challenges_signed_ahead_are_each_used_once() {
    // Challenges are signed ahead of need (a pool refilled after each hello): every hello
    // still gets its own nonce, and a nonce answers only the connection it was sent to.
    let mut h = harness();
    let mut nonces = std::collections::HashSet::new();
    let keys: Vec<PrivateKey> = (1..=6).map(|i| test_key(&format!("user{i}"))).collect();
    let mut challenges = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let c = conn(i as u64 + 1);
        h.open(c);
        let ch = h.challenge(c, &format!("u{i}"), key);
        assert!(
            nonces.insert(str_field(&ch, "nonce").to_string()),
            "nonce reused"
        );
        challenges.push(ch);
    }
    // u0 answers with u1's challenge: refused; then with its own: accepted.
    let wrong = h.auth_response("u0", &keys[0], &challenges[1]);
    h.send(conn(1), &wrong);
    assert_error(&h.frames_to(conn(1)), "INVALID_SIG", "");
    let ch = h.challenge(conn(1), "u0", &keys[0]);
    assert!(
        nonces.insert(str_field(&ch, "nonce").to_string()),
        "nonce reused"
    );
    h.respond(conn(1), "u0", &keys[0], &ch);
    for i in 1..keys.len() {
        let c = conn(i as u64 + 1);
        h.respond(c, &format!("u{i}"), &keys[i], &challenges[i]);
    }
}

/// A harness whose core draws its random bytes from `SeededRandom::new(seed)`.
fn seeded(seed: u64) -> CoreHarness {
    CoreHarness::build(setup(default_limits()).seeded(seed))
}

#[test]
fn challenge_nonces_come_from_the_random_source_the_core_is_given() {
    // The core draws no randomness of its own: with a seeded source its nonces are that
    // source's bytes, 32 per challenge, in order (the first hello's, then the one signed ahead
    // for the next hello), and a whole hello still completes.
    let mut stream = SeededRandom::new(7);
    let mut expected = [[0u8; 32]; 2];
    for n in &mut expected {
        socp::core::random::Random::fill(&mut stream, n);
    }
    let expected = expected.map(|n| socp::wire::b64::encode(&n));
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    for _ in 0..2 {
        let mut h = seeded(7);
        h.open(conn(1));
        h.open(conn(2));
        let ch1 = h.challenge(conn(1), "alice", &alice);
        h.respond(conn(1), "alice", &alice, &ch1);
        let ch2 = h.challenge(conn(2), "bob", &bob);
        h.respond(conn(2), "bob", &bob, &ch2);
        let nonces = [ch1, ch2].map(|ch| str_field(&ch, "nonce").to_string());
        assert_eq!(nonces, expected);
    }
    // Another seed, other nonces; the OS source (the default) repeats nothing across servers.
    let mut h = seeded(8);
    h.open(conn(1));
    assert_ne!(
        str_field(&h.challenge(conn(1), "alice", &alice), "nonce"),
        expected[0]
    );
    let os_nonce = |h: &mut CoreHarness| {
        h.open(conn(1));
        str_field(&h.challenge(conn(1), "alice", &alice), "nonce").to_string()
    };
    let first = os_nonce(&mut harness());
    assert_ne!(first, os_nonce(&mut harness()));
    assert!(!expected.contains(&first));
}

#[test]
fn racing_hellos_for_one_id_the_second_response_gets_name_in_use() {
    let mut h = harness();
    let alice = test_key("user1");
    let (c1, c2) = (conn(1), conn(2));
    h.open(c1);
    h.open(c2);
    h.clear();
    // Both get a challenge: nobody is online yet.
    let ch1 = h.challenge(c1, "alice", &alice);
    let ch2 = h.challenge(c2, "alice", &alice);
    h.respond(c1, "alice", &alice, &ch1);
    let f = h.auth_response("alice", &alice, &ch2);
    h.send(c2, &f);
    assert_error(&h.frames_to(c2), "NAME_IN_USE", "");
    assert_eq!(h.closes(c2), [close::POLICY]);
    assert!(h.drain().is_empty(), "c1 is told nothing");
    assert_eq!(h.list(c1, "alice"), ["alice"]);
}

#[test]
fn a_registered_accounts_name_is_refused_to_other_user_ids() {
    // README: display names are unique per server. An account owns its name; a key-file user
    // (another user id) saying it is called that is refused, the account itself is not.
    let mut h = harness();
    let (owner, other) = (test_key("user1"), test_key("user2"));
    let (c1, c2, c3) = (conn(1), conn(2), conn(3));
    h.open(c1);
    h.clear();
    let register = json!({
        "user_id": "acct-alice",
        "pubkey": owner.public_key().encoded(),
        "privkey_store": socp::wire::b64::encode(b"sealed elsewhere"),
        "auth": socp::account::auth_token("a long password", "alice"),
        "meta": {"display_name": "alice"},
    });
    let f = h.user_frame(
        types::USER_REGISTER,
        "acct-alice",
        "",
        &register,
        Some(&owner),
    );
    h.send(c1, &f);
    assert_eq!(kinds(&h.frames_to(c1)), [types::USER_REGISTERED]);

    let hello_as = |key: &PrivateKey, name: &str| {
        let pubkey = key.public_key().encoded();
        json!({"client": "t", "pubkey": pubkey, "enc_pubkey": pubkey,
               "meta": {"display_name": name}})
    };
    h.open(c2);
    h.clear();
    let f = h.user_frame(
        types::USER_HELLO,
        "squatter",
        "",
        &hello_as(&other, "alice"),
        None,
    );
    h.send(c2, &f);
    assert_error(&h.frames_to(c2), "NAME_IN_USE", "alice");
    assert_eq!(h.closes(c2), [close::POLICY]);

    // The account's own user id may use it; names compare exactly, and key-only names are
    // not reserved.
    h.open(c3);
    h.clear();
    let f = h.user_frame(
        types::USER_HELLO,
        "acct-alice",
        "",
        &hello_as(&owner, "alice"),
        None,
    );
    h.send(c3, &f);
    assert_eq!(kinds(&h.frames_to(c3)), [types::AUTH_CHALLENGE]);
    let c4 = conn(4);
    h.open(c4);
    h.clear();
    let f = h.user_frame(
        types::USER_HELLO,
        "squatter",
        "",
        &hello_as(&other, "Alice"),
        None,
    );
    h.send(c4, &f);
    assert_eq!(kinds(&h.frames_to(c4)), [types::AUTH_CHALLENGE]);
}

// -------------------------------------------------------------------- 9. weak keys (§3.1)

#[test]
fn weak_keys_are_refused_naming_the_field() {
    let mut h = harness();
    for (i, (file, why)) in [
        ("weak2048.pub.pem", "2048 bits"),
        ("e3.pub.pem", "exponent 3"),
    ]
    .into_iter()
    .enumerate()
    {
        let c = conn(i as u64 + 1);
        h.open(c);
        h.clear();
        let pem = weak_key(file);
        let f = h.user_frame(
            types::USER_HELLO,
            "weakling",
            "",
            &hello_payload(&pem),
            None,
        );
        h.send(c, &f);
        let frames = h.frames_to(c);
        assert_error(&frames, "BAD_KEY", "payload.pubkey");
        assert!(str_field(&frames[0], "detail").contains(why), "{frames:?}");
        assert!(
            h.closes(c).is_empty(),
            "a bad hello is answered, not closed"
        );

        // A strong pubkey with a weak enc_pubkey is refused too, naming enc_pubkey.
        let mut p = hello_payload(test_key("user1").public_key().encoded());
        p["enc_pubkey"] = json!(pem);
        let f = h.user_frame(types::USER_HELLO, "weakling", "", &p, None);
        h.send(c, &f);
        assert_error(&h.frames_to(c), "BAD_KEY", "payload.enc_pubkey");
    }
    // The weak-keyed id never came online.
    let frames = h.login(conn(9), "observer", &test_key("user8"));
    assert_eq!(list_ids(&frames[1]), ["observer"]);
}

// -------------------------------------------------------------------- 10. first frame (§1)

/// Asserts the pending actions for `c` are exactly ERROR (code) then Close 1008, in that order.
#[track_caller]
fn assert_error_then_close(h: &mut CoreHarness, c: ConnId, code: Option<&str>, detail: &str) {
    let actions = h.drain();
    assert_eq!(actions.len(), 2, "{actions:#?}");
    let Action::Send { conn: to, text } = &actions[0] else {
        panic!("ERROR first: {actions:#?}")
    };
    assert_eq!(*to, c);
    let e = h.check(text.as_str());
    assert_eq!(e.kind, types::ERROR);
    if let Some(code) = code {
        assert_eq!(str_field(&e, "code"), code, "{e:?}");
    }
    assert!(str_field(&e, "detail").contains(detail), "{e:?}");
    assert!(
        matches!(actions[1], Action::Close { conn, code: close::POLICY, .. } if conn == c),
        "then close 1008: {actions:#?}"
    );
}

#[test]
fn bad_first_frame_is_answered_and_closed() {
    let mut h = harness();

    h.open(conn(1));
    h.clear();
    h.send(conn(1), "this is not json");
    assert_error_then_close(&mut h, conn(1), Some("UNKNOWN_TYPE"), "");

    h.open(conn(2));
    h.clear();
    let f = h.user_frame(types::LIST_REQUEST, "alice", SRV, &json!({}), None);
    h.send(conn(2), &f);
    assert_error_then_close(&mut h, conn(2), None, "");

    // A type nobody knows, first.
    h.open(conn(3));
    h.clear();
    let f = h.user_frame("NOT_A_TYPE", "alice", SRV, &json!({}), None);
    h.send(conn(3), &f);
    assert_error_then_close(&mut h, conn(3), None, "");

    // An AUTH_RESPONSE first (no hello before it).
    h.open(conn(4));
    h.clear();
    let f = h.user_frame(
        types::AUTH_RESPONSE,
        "alice",
        SRV,
        &json!({"nonce": "AAAA", "server_id": SRV, "user_id": "alice"}),
        Some(&test_key("user1")),
    );
    h.send(conn(4), &f);
    assert_error_then_close(&mut h, conn(4), None, "");

    h.open(conn(5));
    h.clear();
    h.binary(conn(5));
    assert_error_then_close(
        &mut h,
        conn(5),
        Some("UNKNOWN_TYPE"),
        "binary frames are not supported",
    );

    // Whatever comes after the close is ignored.
    h.send(conn(5), "still not json");
    assert!(h.drain().is_empty());
}

#[test]
fn bad_frames_after_the_hello_are_answered_but_not_closed() {
    let mut h = harness();
    let c = conn(1);
    h.login(c, "alice", &test_key("user1"));
    h.clear();

    h.send(c, "{not json");
    assert_error(&h.frames_to(c), "UNKNOWN_TYPE", "");
    h.send(c, "[1,2,3]");
    assert_error(&h.frames_to(c), "UNKNOWN_TYPE", "");
    let f = h.user_frame("NOT_A_TYPE", "alice", SRV, &json!({}), None);
    h.send(c, &f);
    assert_error(&h.frames_to(c), "UNKNOWN_TYPE", "NOT_A_TYPE");
    h.binary(c);
    assert_error(
        &h.frames_to(c),
        "UNKNOWN_TYPE",
        "binary frames are not supported",
    );
    // Type names are case-sensitive (§1).
    let f = h.user_frame("list_request", "alice", SRV, &json!({}), None);
    h.send(c, &f);
    assert_error(&h.frames_to(c), "UNKNOWN_TYPE", "");
    // A malformed envelope names the field.
    h.send(
        c,
        r#"{"type":"LIST_REQUEST","from":"alice","to":"srv","ts":1.5,"payload":{}}"#,
    );
    assert_error(&h.frames_to(c), "BAD_KEY", "ts");
    // A trailing newline is tolerated (§1).
    let f = h.user_frame(types::LIST_REQUEST, "alice", SRV, &json!({}), None);
    h.send(c, &format!("{f}\n"));
    assert_eq!(kinds(&h.frames_to(c)), [types::LIST_RESPONSE]);

    assert!(h.drain().is_empty(), "never closed");
    assert_eq!(h.list(c, "alice"), ["alice"]);
}

// -------------------------------------------------------------------- 11. before the hello ends

#[test]
fn frames_before_the_hello_completes_are_refused_and_dropped() {
    let mut h = harness();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    let (ca, cb) = (conn(1), conn(2));
    h.login(cb, "bob", &bob);
    h.open(ca);
    h.clear();

    let ch = h.challenge(ca, "alice", &alice);
    let f = h.user_frame(types::LIST_REQUEST, "alice", SRV, &json!({}), None);
    h.send(ca, &f);
    let frames = h.frames_to(ca);
    assert_eq!(
        kinds(&frames),
        [types::ERROR],
        "no LIST_RESPONSE: {frames:#?}"
    );
    assert!(h.closes(ca).is_empty(), "not closed");

    // A DM before the hello completes is not delivered.
    let ts = h.now.wall_ms;
    let p = message_payload(&alice, bob.public_key(), "alice", Some("bob"), ts, "early");
    h.send(
        ca,
        &user_frame_at(types::MSG_DIRECT, "alice", "bob", ts, &p, None),
    );
    assert_eq!(kinds(&h.frames_to(ca)), [types::ERROR]);
    assert!(h.frames_to(cb).is_empty(), "not delivered");
    assert!(h.drain().is_empty(), "not closed");

    // Dropped, not fatal: the outstanding challenge can still be answered.
    let frames = h.respond(ca, "alice", &alice, &ch);
    assert_eq!(list_ids(&frames[1]), ["alice", "bob"]);
}

// -------------------------------------------------------------------- 12. hello deadline

#[test]
fn hello_deadline_with_simulated_time() {
    let limits = default_limits();
    let timeout = limits.hello_timeout_ms;
    let mut h = harness_with(limits);
    let alice = test_key("user1");
    let (fresh, challenged, done) = (conn(1), conn(2), conn(3));

    let t0 = h.now.mono_ms;
    h.open(fresh);
    assert_eq!(h.timers(), [(t0 + timeout, Timer::Hello(fresh))]);
    h.advance(1_000);
    h.open(challenged);
    assert_eq!(
        h.timers(),
        [(t0 + 1_000 + timeout, Timer::Hello(challenged))]
    );
    h.challenge(challenged, "alice", &alice);
    h.open(done);
    let t_done = h.now.mono_ms;
    assert_eq!(h.timers(), [(t_done + timeout, Timer::Hello(done))]);
    h.hello(done, "bob", &test_key("user2"));
    assert!(h.drain().is_empty());

    // The net layer fires each timer at its time.
    h.advance(timeout - 1_000);
    assert_eq!(h.now.mono_ms, t0 + timeout);
    h.fire(Timer::Hello(fresh));
    let frames = h.frames_to(fresh);
    assert_error(&frames, "TIMEOUT", "");
    assert_eq!(h.closes(fresh), [close::POLICY]);
    assert!(h.drain().is_empty());

    h.advance(1_000);
    h.fire(Timer::Hello(challenged));
    let frames = h.frames_to(challenged);
    assert_error(&frames, "TIMEOUT", "");
    assert_eq!(frames[0].to, "alice");
    assert_eq!(h.closes(challenged), [close::POLICY]);
    assert!(h.drain().is_empty(), "bob was never told about alice");

    h.fire(Timer::Hello(done));
    assert!(h.drain().is_empty(), "a finished hello ignores its timer");
    assert_eq!(h.list(done, "bob"), ["bob"]);

    // A stale timer for a closed connection is a no-op, even fired twice.
    h.fire(Timer::Hello(fresh));
    h.fire(Timer::Hello(conn(77)));
    assert!(h.drain().is_empty());
}

// -------------------------------------------------------------------- 13. USER_REMOVE (§7)

#[test]
fn closing_a_user_sends_one_user_remove() {
    let mut h = harness();
    let (alice, bob, carol) = (test_key("user1"), test_key("user2"), test_key("user3"));
    let (ca, cb, cc) = (conn(1), conn(2), conn(3));
    h.login(ca, "alice", &alice);
    h.login(cb, "bob", &bob);
    h.clear();

    h.closed(cb);
    let got = h.frames_to(ca);
    assert_eq!(kinds(&got), [types::USER_REMOVE]);
    assert_eq!(got[0].to, "*");
    assert_eq!(
        Value::Object(got[0].payload.clone()),
        json!({"user_id": "bob", "server_id": SRV, "ts": h.now.wall_ms})
    );
    assert!(
        h.drain().is_empty(),
        "nothing to the closed connection, no Close action"
    );
    assert_eq!(h.list(ca, "alice"), ["alice"]);

    // A second Closed for the same connection changes nothing.
    h.closed(cb);
    assert!(h.drain().is_empty());

    // CTRL_CLOSE: closed with 1000, and the others are told once.
    h.login(cc, "carol", &carol);
    h.clear();
    let f = h.user_frame(types::CTRL_CLOSE, "carol", SRV, &json!({}), None);
    h.send(cc, &f);
    assert_eq!(h.closes(cc), [close::NORMAL]);
    let got = h.frames_to(ca);
    assert_eq!(kinds(&got), [types::USER_REMOVE]);
    assert_eq!(str_field(&got[0], "user_id"), "carol");
    assert!(h.drain().is_empty());
    h.closed(cc);
    assert!(
        h.drain().is_empty(),
        "the net layer's Closed after our close is a no-op"
    );

    // A connection that never finished its hello leaves without a USER_REMOVE.
    h.open(conn(4));
    h.clear();
    h.challenge(conn(4), "dave", &test_key("user4"));
    h.closed(conn(4));
    assert!(h.drain().is_empty());
    assert_eq!(h.list(ca, "alice"), ["alice"]);
}

#[test]
fn a_user_can_come_back_after_leaving() {
    let mut h = harness();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    h.login(conn(1), "alice", &alice);
    h.login(conn(2), "bob", &bob);
    h.closed(conn(2));
    h.clear();
    let frames = h.login(conn(3), "bob", &bob);
    assert_eq!(list_ids(&frames[1]), ["alice", "bob"]);
    assert_eq!(kinds(&h.frames_to(conn(1))), [types::USER_ADVERTISE]);
    // Messages reach the new connection, not the old one.
    let ts = h.now.wall_ms;
    let p = message_payload(
        &alice,
        bob.public_key(),
        "alice",
        Some("bob"),
        ts,
        "welcome back",
    );
    h.send(
        conn(1),
        &user_frame_at(types::MSG_DIRECT, "alice", "bob", ts, &p, None),
    );
    assert_eq!(kinds(&h.frames_to(conn(3))), [types::USER_DELIVER]);
    assert!(h.drain().is_empty());
}

// ------------------------------------------------ signed while the newcomer signs its answer

/// [`harness`] whose signer is always idle ([`RecordingSigner`] with `spare`); what it records.
fn with_spare_signer() -> (CoreHarness, Recorded) {
    let mut h = harness();
    let recorded = h.record_signatures(true);
    (h, recorded)
}

/// The advert of `user_id` (fixture key `key`) as signed at `ts`, exactly.
fn advert_payload(user_id: &str, key: &PrivateKey, ts: i64) -> Value {
    json!({
        "user_id": user_id,
        "server_id": SRV,
        "pubkey": key.public_key().encoded(),
        "meta": {"display_name": user_id},
        "ts": ts,
    })
}

/// Bob's hello on `c`, answered `ms` later: the payload of the advert alice (on `conn(1)`)
/// gets.
#[track_caller]
fn bob_answers_after(h: &mut CoreHarness, c: ConnId, bob: &PrivateKey, ms: u64) -> Value {
    let ch = h.challenge_with(c, "bob", &hello_payload_as(bob, "bob", &[]));
    h.advance(ms);
    h.respond(c, "bob", bob, &ch);
    let seen = h.frames_to(conn(1));
    assert_eq!(kinds(&seen), [types::USER_ADVERTISE]);
    Value::Object(seen[0].payload.clone())
}

#[test]
fn with_spare_signers_the_advert_and_ack_are_signed_during_the_challenge() {
    let (mut h, recorded) = with_spare_signer();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    h.login(conn(1), "alice", &alice);
    h.open(conn(2));
    h.clear();
    let hello_ms = h.now.wall_ms;
    let ch = h.challenge_with(conn(2), "bob", &hello_payload_as(&bob, "bob", &[]));
    h.advance(700); // bob signs his answer
    let before = recorded.stats.signatures();
    let frames = h.respond(conn(2), "bob", &bob, &ch); // checks the ack
    assert_eq!(
        kinds(&frames),
        [
            types::USER_HELLO_ACK,
            types::LIST_RESPONSE,
            types::PUBLIC_CHANNEL_SNAPSHOT
        ]
    );
    assert_eq!(
        recorded.stats.signatures() - before,
        2,
        "only the two snapshots are signed once the answer is in"
    );
    let seen = h.frames_to(conn(1));
    assert_eq!(kinds(&seen), [types::USER_ADVERTISE]);
    assert_eq!(
        Value::Object(seen[0].payload.clone()),
        advert_payload("bob", &bob, hello_ms),
        "the advert signed at the hello"
    );

    // In line (the default signer has none to spare), both are signed at the answer.
    let mut h = harness();
    h.login(conn(1), "alice", &alice);
    h.open(conn(2));
    h.clear();
    let advert = bob_answers_after(&mut h, conn(2), &bob, 700);
    assert_eq!(advert, advert_payload("bob", &bob, h.now.wall_ms));
}

#[test]
fn nothing_signed_ahead_for_a_failed_hello_is_sent_nor_for_a_second_hello() {
    let (mut h, _) = with_spare_signer();
    let (alice, bob, mallory) = (test_key("user1"), test_key("user2"), test_key("user3"));
    h.login(conn(1), "alice", &alice);
    h.open(conn(2));
    h.clear();
    let ch = h.challenge_with(conn(2), "bob", &hello_payload_as(&bob, "bob", &[]));
    let forged = h.user_frame(
        types::AUTH_RESPONSE,
        "bob",
        SRV,
        &auth_payload(&ch, "bob"),
        Some(&mallory),
    );
    h.send(conn(2), &forged);
    assert_error(&h.frames_to(conn(2)), "INVALID_SIG", "");
    assert!(
        h.frames_to(conn(1)).is_empty(),
        "no advert for a failed hello"
    );

    // Never answered: the connection goes, and nothing of bob is sent.
    h.open(conn(3));
    h.clear();
    h.challenge_with(conn(3), "bob", &hello_payload_as(&bob, "bob", &[]));
    h.closed(conn(3));
    assert!(h.drain().is_empty());
    assert_eq!(h.list(conn(1), "alice"), ["alice"]);

    // A second hello on a connection gets nothing signed ahead (a client repeating unanswered
    // hellos costs no more than before): its advert is made at the answer.
    let advert = bob_answers_after(&mut h, conn(2), &bob, 500);
    assert_eq!(advert, advert_payload("bob", &bob, h.now.wall_ms));
}

/// Each hello costs the server a signature (its challenge): after a connection's first, each
/// spends the connection's login budget (§5.3), and one refused leaves the challenge
/// outstanding as it was.
#[test]
fn hellos_repeated_on_one_connection_are_rate_limited() {
    /// One more hello from `user_id` on `c`: refused, with no challenge.
    #[track_caller]
    fn refused_hello(h: &mut CoreHarness, c: ConnId, user_id: &str, key: &PrivateKey) {
        let payload = hello_payload(key.public_key().encoded());
        let hello = h.user_frame(types::USER_HELLO, user_id, "", &payload, None);
        h.send(c, &hello);
        assert_error(&h.frames_to(c), "BAD_KEY", "too many hellos");
    }
    let mut h = harness();
    let alice = test_key("user1");
    let c = h.open_fresh();
    let mut ch = h.challenge(c, "alice", &alice);
    for _ in 0..socp::core::login::CONN_BURST {
        ch = h.challenge(c, "alice", &alice);
    }
    refused_hello(&mut h, c, "alice", &alice);
    assert!(h.closes(c).is_empty(), "not closed");
    assert_eq!(h.server.metrics().logins_rate_limited(), 1);
    // The last challenge still stands.
    h.respond(c, "alice", &alice, &ch);

    // The budget refills with time.
    let bob = test_key("user2");
    let c = h.open_fresh();
    for _ in 0..=socp::core::login::CONN_BURST {
        h.challenge(c, "bob", &bob);
    }
    refused_hello(&mut h, c, "bob", &bob);
    h.advance(socp::core::login::CONN_REFILL_MS);
    h.challenge(c, "bob", &bob);
}

/// Bob's hello on one connection, then a whole login and leave of bob on another before the
/// first answers: the advert signed at the first hello is older than the removal the peers
/// have applied (§7 orders presence by `ts`), so a fresh one is sent.
#[test]
fn an_advert_signed_before_a_removal_is_signed_again() {
    let (mut h, _) = with_spare_signer();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    h.login(conn(1), "alice", &alice);
    h.open(conn(2));
    h.open(conn(3));
    h.clear();
    let slow = h.challenge_with(conn(2), "bob", &hello_payload_as(&bob, "bob", &[]));
    h.advance(10);
    let ch = h.challenge_with(conn(3), "bob", &hello_payload_as(&bob, "bob", &[]));
    h.respond(conn(3), "bob", &bob, &ch);
    h.advance(10);
    h.closed(conn(3));
    h.advance(10);
    h.respond(conn(2), "bob", &bob, &slow);
    let seen = h.frames_to(conn(1));
    assert_eq!(
        kinds(&seen),
        [
            types::USER_ADVERTISE,
            types::USER_REMOVE,
            types::USER_ADVERTISE
        ]
    );
    let ts: Vec<i64> = seen
        .iter()
        .map(|e| e.payload["ts"].as_i64().unwrap())
        .collect();
    let t0 = h.now.wall_ms - 30;
    assert_eq!(ts, [t0 + 10, t0 + 20, t0 + 30], "each newer than the last");
}

// -------------------------------------------------------------------- 14. one sig per payload

#[test]
fn a_broadcast_is_one_frame_text_for_every_recipient() {
    let mut h = harness();
    let names = ["alice", "bob", "carol"];
    for (i, n) in names.iter().enumerate() {
        h.login(conn(i as u64 + 1), n, &test_key(&format!("user{}", i + 1)));
    }
    h.clear();
    h.login(conn(4), "dave", &test_key("user4"));
    let texts: Vec<String> = (1..=3)
        .map(|i| {
            let sent = h.sent_to(conn(i));
            assert_eq!(sent.len(), 1, "{sent:#?}");
            assert_eq!(sent[0].env.kind, types::USER_ADVERTISE);
            assert_eq!(str_field(&sent[0].env, "user_id"), "dave");
            sent[0].text.clone()
        })
        .collect();
    assert_eq!(texts[0], texts[1]);
    assert_eq!(texts[1], texts[2]);
    assert!(h.drain().is_empty());

    // Same for the USER_REMOVE when dave leaves.
    h.closed(conn(4));
    let texts: Vec<String> = (1..=3)
        .map(|i| {
            let sent = h.sent_to(conn(i));
            assert_eq!(sent.len(), 1, "{sent:#?}");
            assert_eq!(sent[0].env.kind, types::USER_REMOVE);
            sent[0].text.clone()
        })
        .collect();
    assert_eq!(texts[0], texts[1]);
    assert_eq!(texts[1], texts[2]);
}

// -------------------------------------------------------------------- 15. error budget (§10)

#[test]
fn error_budget_limits_answers_and_refills_with_time() {
    let limits = Limits {
        hello_timeout_ms: 10_000,
        error_burst: 5,
        error_refill_per_s: 2, // one token per 500 ms
        max_message_size: 256 * 1024,
    };
    let (burst, refill_ms) = (limits.error_burst as usize, 500);
    let mut h = harness_with(limits);
    let (c, other) = (conn(1), conn(2));
    h.login(c, "alice", &test_key("user1"));
    h.login(other, "bob", &test_key("user2"));
    h.clear();

    let errors = |h: &mut CoreHarness, c: ConnId, n: usize| -> usize {
        for _ in 0..n {
            h.send(c, "garbage");
        }
        let frames = h.frames_to(c);
        assert!(frames.iter().all(|f| f.kind == types::ERROR), "{frames:#?}");
        frames.len()
    };

    assert_eq!(errors(&mut h, c, 50), burst, "at most error_burst answered");
    assert_eq!(errors(&mut h, c, 10), 0, "budget spent");
    // The budget is per connection.
    assert_eq!(errors(&mut h, other, 2), 2);

    // Time refills it, one token per interval...
    h.advance(refill_ms - 1);
    assert_eq!(errors(&mut h, c, 10), 0);
    h.advance(1);
    assert_eq!(errors(&mut h, c, 10), 1);
    h.advance(3 * refill_ms);
    assert_eq!(errors(&mut h, c, 10), 3);
    // ... up to the burst, no more.
    h.advance(60_000);
    assert_eq!(errors(&mut h, c, 50), burst);
    assert!(h.drain().is_empty(), "never closed");

    // Normal traffic is not limited by a spent error budget.
    assert_eq!(h.list(c, "alice"), ["alice", "bob"]);
}

// -------------------------------------------------------------------- 16. ASCII canonical fallback

#[test]
fn auth_response_signed_over_python_ascii_form_is_accepted() {
    let mut h = harness();
    let alice = test_key("user1");
    let c = conn(1);
    h.open(c);
    h.clear();

    // A forged variant first: the ASCII form of a different payload does not verify.
    let ch = h.challenge(c, "alice", &alice);
    let mut p = auth_payload(&ch, "alice");
    p["note"] = json!("é ✓ 😀");
    let mut other = p.clone();
    other["note"] = json!("e");
    let sig = alice.sign_b64(canon::canonical_ascii(&other).unwrap().as_bytes());
    h.send(
        c,
        &frame_with_sig(types::AUTH_RESPONSE, "alice", SRV, h.now.wall_ms, &p, &sig),
    );
    assert_error(&h.frames_to(c), "INVALID_SIG", "");

    let ch = h.challenge(c, "alice", &alice);
    let mut p = auth_payload(&ch, "alice");
    p["note"] = json!("é ✓ 😀");
    let ascii = canon::canonical_ascii(&p).unwrap();
    assert!(ascii.is_ascii());
    assert!(
        ascii.contains(r"\u00e9") && ascii.contains(r"\ud83d\ude00"),
        "{ascii}"
    );
    assert_ne!(
        ascii,
        canon::canonical(&p).unwrap(),
        "the fallback is really exercised"
    );
    let sig = alice.sign_b64(ascii.as_bytes());
    h.send(
        c,
        &frame_with_sig(types::AUTH_RESPONSE, "alice", SRV, h.now.wall_ms, &p, &sig),
    );
    let frames = h.frames_to(c);
    assert_eq!(
        kinds(&frames),
        [
            types::USER_HELLO_ACK,
            types::LIST_RESPONSE,
            types::PUBLIC_CHANNEL_SNAPSHOT
        ]
    );
    assert!(h.closes(c).is_empty());
}

#[test]
fn auth_response_with_non_ascii_signed_canonically_is_accepted() {
    // The primary form (UTF-8 as-is) with non-ASCII text.
    let mut h = harness();
    let alice = test_key("user1");
    h.open(conn(1));
    h.clear();
    let ch = h.challenge(conn(1), "alice", &alice);
    let mut p = auth_payload(&ch, "alice");
    p["note"] = json!("héllo wörld");
    let f = h.user_frame(types::AUTH_RESPONSE, "alice", SRV, &p, Some(&alice));
    assert!(f.contains("héllo"), "sent as UTF-8");
    h.send(conn(1), &f);
    assert_eq!(h.frames_to(conn(1))[0].kind, types::USER_HELLO_ACK);
}

// -------------------------------------------------------------------- 17. salt-478 PSS (§3.1)

/// RSASSA-PSS SHA-256 with salt length 478 (the maximum for RSA-4096), as Python's
/// `PSS.MAX_LENGTH` signs, made with aws-lc-rs directly.
fn sign_salt_478(key: &PrivateKey, msg: &[u8]) -> String {
    use aws_lc_rs::signature::{RSA_PSS_SHA256, RsaPssSaltLength, RsaSignatureEncoding};
    const PSS_SALT_478: RsaSignatureEncoding =
        RSA_PSS_SHA256.with_pss_salt_length(RsaPssSaltLength::Custom(478));
    let pair = aws_lc_rs::rsa::KeyPair::from_pkcs8(&key.to_pkcs8_der()).unwrap();
    let mut sig = vec![0; pair.public_modulus_len()];
    pair.sign(
        &PSS_SALT_478,
        &aws_lc_rs::rand::SystemRandom::new(),
        msg,
        &mut sig,
    )
    .unwrap();
    socp::wire::b64::encode(&sig)
}

#[test]
fn auth_response_signed_with_salt_478_is_accepted() {
    let mut h = harness();
    let alice = test_key("user1");
    let c = conn(1);
    h.open(c);
    h.clear();

    // The helper really makes salt-478 signatures: salt-32 verification alone rejects them.
    let probe = sign_salt_478(&alice, b"probe");
    let salt32 = aws_lc_rs::signature::ParsedPublicKey::new(
        &aws_lc_rs::signature::RSA_PSS_2048_8192_SHA256,
        alice.public_key().spki_der(),
    )
    .unwrap();
    let raw = socp::wire::b64::decode(&probe).unwrap();
    assert!(salt32.verify_sig(b"probe", &raw).is_err());
    assert!(alice.public_key().verify(b"probe", &raw));

    let ch = h.challenge(c, "alice", &alice);
    let p = auth_payload(&ch, "alice");
    let sig = sign_salt_478(&alice, canon::canonical(&p).unwrap().as_bytes());
    h.send(
        c,
        &frame_with_sig(types::AUTH_RESPONSE, "alice", SRV, h.now.wall_ms, &p, &sig),
    );
    let frames = h.frames_to(c);
    assert_eq!(
        kinds(&frames),
        [
            types::USER_HELLO_ACK,
            types::LIST_RESPONSE,
            types::PUBLIC_CHANNEL_SNAPSHOT
        ],
        "{frames:#?}"
    );
    assert!(h.closes(c).is_empty());
}

#[test]
fn salt_478_signature_by_another_key_is_refused() {
    let mut h = harness();
    let (alice, mallory) = (test_key("user1"), test_key("user3"));
    h.open(conn(1));
    h.clear();
    let ch = h.challenge(conn(1), "alice", &alice);
    let p = auth_payload(&ch, "alice");
    let sig = sign_salt_478(&mallory, canon::canonical(&p).unwrap().as_bytes());
    h.send(
        conn(1),
        &frame_with_sig(types::AUTH_RESPONSE, "alice", SRV, h.now.wall_ms, &p, &sig),
    );
    assert_error(&h.frames_to(conn(1)), "INVALID_SIG", "");
}

// -------------------------------------------------------------------- extras

#[test]
fn too_large_frame_is_answered_and_closed_with_1009() {
    let mut h = harness();
    let c = conn(1);
    h.login(c, "alice", &test_key("user1"));
    h.login(conn(2), "bob", &test_key("user2"));
    h.clear();
    h.input(Input::TooLarge { conn: c });
    let frames = h.frames_to(c);
    assert_eq!(kinds(&frames), [types::ERROR]);
    assert_eq!(h.closes(c), [close::TOO_BIG]);
    // Alice is gone, and bob is told.
    assert_eq!(kinds(&h.frames_to(conn(2))), [types::USER_REMOVE]);
    assert!(h.drain().is_empty());
}

#[test]
fn a_second_hello_on_an_authenticated_connection_is_refused() {
    let mut h = harness();
    let alice = test_key("user1");
    let c = conn(1);
    h.login(c, "alice", &alice);
    h.clear();
    let f = h.user_frame(
        types::USER_HELLO,
        "alice",
        "",
        &hello_payload(alice.public_key().encoded()),
        None,
    );
    h.send(c, &f);
    let frames = h.frames_to(c);
    assert_eq!(kinds(&frames), [types::ERROR]);
    assert!(h.drain().is_empty(), "not closed");
    assert_eq!(h.list(c, "alice"), ["alice"]);
}

#[test]
fn shutdown_closes_everyone_with_1001() {
    let mut h = harness();
    h.login(conn(1), "alice", &test_key("user1"));
    h.open(conn(2));
    h.clear();
    h.shutdown();
    assert_eq!(h.closes(conn(1)), [close::GOING_AWAY]);
    assert_eq!(h.closes(conn(2)), [close::GOING_AWAY]);
    // Frames sent to users being closed (a USER_REMOVE to already-closed ones) are allowed,
    // but every one must still be signed.
    h.drain();
}

#[test]
fn error_budget_with_a_refill_rate_above_1000_per_second_does_not_panic() {
    let limits = Limits {
        hello_timeout_ms: 10_000,
        error_burst: 3,
        error_refill_per_s: 2_000,
        max_message_size: 256 * 1024,
    };
    let mut h = harness_with(limits);
    let c = conn(1);
    h.login(c, "alice", &test_key("user1"));
    h.clear();
    h.advance(1);
    h.send(c, "garbage");
    assert_error(&h.frames_to(c), "UNKNOWN_TYPE", "");
}

// -------------------------------------------------------------------- login budgets (§5.3)
//
// Issue "anyone can lock an account out": one wrong guess per second from fresh connections kept
// the owner from logging in, because the only per-name budget was shared by everyone. §5.3: a
// stranger cannot lock an account out, and guessing stays bounded.

/// `auth` for the tests: any 32 bytes (the server never sees a password, §5.3).
fn test_auth(byte: u8) -> String {
    socp::wire::b64::encode(&[byte; 32])
}

/// Registers account `name` (user id `user_id`, key `key`) with `auth` on a fresh connection.
fn register_account(h: &mut CoreHarness, c: ConnId, name: &str, user_id: &str, key: &PrivateKey) {
    h.open_from(c, "192.0.2.1".parse().unwrap());
    let payload = json!({
        "user_id": user_id,
        "pubkey": key.public_key().encoded(),
        "privkey_store": "c2VhbGVk",
        "auth": test_auth(7),
        "meta": {"display_name": name},
    });
    let frame = h.user_frame(types::USER_REGISTER, user_id, "", &payload, Some(key));
    h.send(c, &frame);
    let frames = h.frames_to(c);
    assert_eq!(kinds(&frames), [types::USER_REGISTERED], "{frames:#?}");
    h.closed(c);
    h.clear();
}

/// One `USER_LOGIN` for `name` on a fresh connection `c` from `peer`, then the connection
/// closes. Returns "ok" for `USER_LOGGED_IN`, else the `ERROR` detail.
fn login_attempt(h: &mut CoreHarness, c: ConnId, peer: IpAddr, name: &str, auth: &str) -> String {
    h.open_from(c, peer);
    let payload = json!({"display_name": name, "auth": auth});
    let frame = h.user_frame(types::USER_LOGIN, "", "", &payload, None);
    h.send(c, &frame);
    let frames = h.frames_to(c);
    h.closed(c);
    h.clear();
    assert_eq!(frames.len(), 1, "{frames:#?}");
    match frames[0].kind.as_str() {
        types::USER_LOGGED_IN => "ok".into(),
        types::ERROR => frames[0].payload["detail"].as_str().unwrap().into(),
        other => panic!("unexpected answer {other}"),
    }
}

fn limited(answer: &str) -> bool {
    answer.starts_with("too many login attempts")
}

#[test]
fn a_guesser_at_the_max_rate_from_one_address_cannot_lock_the_owner_out() {
    let mut h = harness();
    register_account(&mut h, conn(1), "alice", "alice-id", &test_key("user1"));
    let attacker: IpAddr = "203.0.113.66".parse().unwrap();
    let owner: IpAddr = "198.51.100.7".parse().unwrap();
    let (mut n, mut owner_ok, mut owner_tries, mut guesses) = (10, 0, 0, 0);
    // Ten wrong guesses a second from fresh connections (a new connection has a full budget)
    // for two minutes; the owner logs in from its own address every 10 s meanwhile.
    for step in 0..1200u64 {
        n += 1;
        let answer = login_attempt(&mut h, conn(n), attacker, "alice", &test_auth(1));
        assert_ne!(answer, "ok");
        guesses += u64::from(!limited(&answer));
        if step % 100 == 99 {
            n += 1;
            owner_tries += 1;
            if login_attempt(&mut h, conn(n), owner, "alice", &test_auth(7)) == "ok" {
                owner_ok += 1;
            }
        }
        h.advance(100);
    }
    assert_eq!(owner_ok, owner_tries, "the owner was locked out");
    // The guesser spent only its own address's budget for the name.
    let bound =
        u64::from(socp::core::login::PAIR_BURST) + 120_000 / socp::core::login::PAIR_REFILL_MS;
    assert!(
        guesses <= bound,
        "{guesses} guesses answered, bound {bound}"
    );
}

/// Counts the attempts (fresh connections from `peer(i)` for name `name(i)`, one every
/// `every_ms` for `steps` steps) that were answered rather than refused by a budget.
fn answered(
    h: &mut CoreHarness,
    first_conn: u64,
    steps: u64,
    every_ms: u64,
    peer: impl Fn(u64) -> IpAddr,
    name: impl Fn(u64) -> String,
) -> u64 {
    let mut answered = 0;
    for i in 0..steps {
        let answer = login_attempt(h, conn(first_conn + i), peer(i), &name(i), &test_auth(1));
        if !limited(&answer) {
            assert_eq!(answer, "invalid credentials");
            answered += 1;
        }
        h.advance(every_ms);
    }
    answered
}

#[test]
fn one_address_is_bounded_whatever_names_it_guesses() {
    use socp::core::login::{PAIR_BURST, PAIR_REFILL_MS, SOURCE_BURST, SOURCE_REFILL_MS};
    let mut h = harness();
    register_account(&mut h, conn(1), "alice", "alice-id", &test_key("user1"));
    let (steps, every_ms) = (600, 100); // 60 s at ten attempts a second
    let span = steps * every_ms;
    let one: IpAddr = "203.0.113.9".parse().unwrap();
    // Spraying names from one address: bounded by the address's budget.
    // Every other attempt writes the address as IPv4-mapped IPv6: still the same source.
    let mapped: IpAddr = "::ffff:203.0.113.9".parse().unwrap();
    let peer = |i: u64| if i.is_multiple_of(2) { one } else { mapped };
    let got = answered(&mut h, 100, steps, every_ms, peer, |i| format!("n{i}"));
    let bound = u64::from(SOURCE_BURST) + span / SOURCE_REFILL_MS;
    assert!(
        got <= bound,
        "{got} answered from one address, bound {bound}"
    );

    // One name from one address: bounded by the (name, address) budget.
    let other: IpAddr = "203.0.113.10".parse().unwrap();
    let got = answered(
        &mut h,
        10_000,
        steps,
        every_ms,
        |_| other,
        |_| "alice".into(),
    );
    let bound = u64::from(PAIR_BURST) + span / PAIR_REFILL_MS;
    assert!(got <= bound, "{got} answered for one name, bound {bound}");

    // IPv6: every address of one /64 is one source.
    let got = answered(
        &mut h,
        20_000,
        steps,
        every_ms,
        |i| {
            IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 1, 2, 0, 0, 0, i as u16,
            ))
        },
        |i| format!("m{i}"),
    );
    let bound = u64::from(SOURCE_BURST) + span / SOURCE_REFILL_MS;
    assert!(got <= bound, "{got} answered from one /64, bound {bound}");
}

#[test]
fn many_addresses_guessing_one_name_are_bounded_by_the_name_ceiling() {
    use socp::core::login::{NAME_BURST, NAME_REFILL_MS};
    let mut h = harness();
    register_account(&mut h, conn(1), "alice", "alice-id", &test_key("user1"));
    let (steps, every_ms) = (3000, 20); // 60 s at fifty attempts a second
    // Every attempt from another address (IPv4 and IPv6 /64s).
    let peer = |i: u64| -> IpAddr {
        if i.is_multiple_of(2) {
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32))
        } else {
            IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 0, i as u16, 0, 0, 0, 1,
            ))
        }
    };
    let got = answered(&mut h, 100, steps, every_ms, peer, |_| "alice".into());
    let bound = u64::from(NAME_BURST) + steps * every_ms / NAME_REFILL_MS;
    assert!(
        got <= bound,
        "{got} guesses at one name answered, bound {bound}"
    );
    assert!(got > 0);
}

// -------------------------------------------------------------------- flow control

/// The kinds of the frames in `actions`: those the net layer flow-controls (`Route`, §6
/// routing for the input's sender) and the rest (`Send`).
fn routed_and_sent(actions: &[Action]) -> (Vec<String>, Vec<String>) {
    let (mut routed, mut sent) = (Vec::new(), Vec::new());
    for o in actions.iter().filter_map(outgoing) {
        let kind = Envelope::parse(o.text).unwrap().kind;
        if o.routed {
            routed.push(kind);
        } else {
            sent.push(kind);
        }
    }
    (routed, sent)
}

/// Issue "trust at the edges": only what `route()` carries for a user (DMs, channel copies,
/// file frames) may pause that user when the recipient does not read; a login's broadcast and
/// the server's answers never do.
#[test]
fn only_routed_frames_are_flow_controlled() {
    let mut h = harness();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    let (ca, cb) = (conn(1), conn(2));
    h.login(ca, "alice", &alice);
    h.clear();

    // bob's login: the USER_ADVERTISE to alice and bob's own frames are not flow-controlled.
    h.open(cb);
    h.clear();
    let ch = h.challenge(cb, "bob", &bob);
    let resp = h.auth_response("bob", &bob, &ch);
    h.send(cb, &resp);
    let (routed, sent) = routed_and_sent(&h.drain());
    assert!(routed.is_empty(), "{routed:?}");
    assert!(
        sent.contains(&types::USER_ADVERTISE.to_string()),
        "{sent:?}"
    );

    // A DM and a channel copy from alice to bob are.
    let ts = h.now.wall_ms;
    for kind in [types::MSG_DIRECT, types::MSG_PUBLIC_CHANNEL] {
        let to = if kind == types::MSG_DIRECT {
            Some("bob")
        } else {
            None
        };
        let p = message_payload(&alice, bob.public_key(), "alice", to, ts, "hi");
        h.send(ca, &user_frame_at(kind, "alice", "bob", ts, &p, None));
    }
    let (routed, sent) = routed_and_sent(&h.drain());
    assert_eq!(routed, [types::USER_DELIVER, types::MSG_PUBLIC_CHANNEL]);
    assert!(sent.is_empty(), "{sent:?}");

    // alice's own answers (a LIST_RESPONSE, an ERROR) are not.
    h.send(
        ca,
        &h.user_frame(types::LIST_REQUEST, "alice", SRV, &json!({}), None),
    );
    h.send(ca, "garbage");
    let (routed, sent) = routed_and_sent(&h.drain());
    assert!(routed.is_empty(), "{routed:?}");
    assert_eq!(sent, [types::LIST_RESPONSE, types::ERROR]);
}

// -------------------------------------------------------------------- typed frames: the
// connection's state is judged before the payload

#[test]
fn a_frame_is_judged_by_its_type_in_the_state_before_its_payload() {
    let mut h = harness();
    let alice = test_key("user1");
    let bad = json!({"pubkey": 5});

    // Authenticated: a second hello is refused as such, whatever its payload.
    let ca = conn(1);
    h.login(ca, "alice", &alice);
    h.clear();
    let f = h.user_frame(types::USER_HELLO, "alice", SRV, &bad, None);
    h.send(ca, &f);
    let frames = h.frames_to(ca);
    assert_error(&frames, "NAME_IN_USE", "already authenticated");
    assert!(h.closes(ca).is_empty());

    // Fresh: a malformed AUTH_RESPONSE is a bad first frame, not a bad payload.
    let cf = conn(2);
    h.open(cf);
    h.timers();
    let f = h.user_frame(types::AUTH_RESPONSE, "bob", SRV, &json!({}), None);
    h.send(cf, &f);
    let frames = h.frames_to(cf);
    assert_error(&frames, "INVALID_SIG", "first frame must be");
    assert_eq!(h.closes(cf), [close::POLICY]);

    // Challenged: a malformed AUTH_RESPONSE names its field and still uses up the challenge.
    let bob = test_key("user2");
    let cb = conn(3);
    h.open(cb);
    h.timers();
    let ch = h.challenge(cb, "bob", &bob);
    let f = h.user_frame(types::AUTH_RESPONSE, "bob", SRV, &json!({"nonce": 1}), None);
    h.send(cb, &f);
    assert_error(
        &h.frames_to(cb),
        "BAD_KEY",
        "payload.nonce: must be a string",
    );
    let good = h.auth_response("bob", &bob, &ch);
    h.send(cb, &good);
    assert_error(&h.frames_to(cb), "INVALID_SIG", "no challenge outstanding");
    assert!(h.closes(cb).is_empty());

    // USER_REGISTER: an unusable key is the answer before the fields after it.
    let cr = conn(4);
    h.open(cr);
    h.timers();
    let register = json!({"user_id": "carol", "pubkey": "not a key", "privkey_store": "!",
        "auth": "", "meta": {}});
    let f = h.user_frame(types::USER_REGISTER, "carol", SRV, &register, None);
    h.send(cr, &f);
    assert_error(&h.frames_to(cr), "BAD_KEY", "payload.pubkey");
}
