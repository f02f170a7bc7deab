//! Federation tests of the sans-IO server core (PROTOCOL.md §4, §6, §7, §8) with simulated time
//! and no sockets.
//!
//! The server under test is "srv-a" (key `server1`). The tests play its peers themselves — they
//! hold the peers' private keys and build their frames — and answer the core's `Dial` actions
//! with `Dialled` / `DialFailed`. Every frame the core emits is verified: frames from "srv-a" with
//! server1's public key (and in canonical form), frames it relays unchanged with the key of the
//! peer that signed them.

mod common;
mod support;

use common::keys::test_key;
use serde_json::{Value, json};
use socp::core::federation::{CHANNEL_BATCH_MS, FedConfig};
use socp::core::persist::MemStore;
use socp::core::server::{Action, ConnId, Input, Limits, Time, Timer, close};
use socp::core::signer::Urgency;
use socp::crypto::{self, PrivateKey, PublicKey};
use socp::store::Store;
use socp::wire::frame::Lane;
use socp::wire::{self, Envelope, types};
use std::net::{IpAddr, Ipv4Addr};
use support::*;

const SRV: &str = "srv-a";
const OUR_PORT: u16 = 9001;
/// An accepted connection from loopback (§5.3: login budgets are per source address).
fn opened(conn: ConnId) -> Input<'static> {
    Input::Opened {
        conn,
        peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

// -------------------------------------------------------------------- peers

fn srv_b() -> Peer {
    Peer::new("srv-b", "server2", 9002)
}

fn srv_c() -> Peer {
    Peer::new("srv-c", "server3", 9003)
}

// -------------------------------------------------------------------- harness

fn limits() -> Limits {
    Limits {
        hello_timeout_ms: 10_000,
        error_burst: 50,
        error_refill_per_s: 10,
        max_message_size: 256 * 1024,
    }
}

/// "srv-a" (key server1), bootstrap peer server2 at 127.0.0.1:9002, advertising port 9001,
/// `f` applied to its federation settings, on `store`, started at `now` (a restart, when the
/// store is reused). It may pass on frames of srv-b, srv-c and srv-d unchanged.
fn harness_on(
    id: &str,
    store: TestStore,
    now: Time,
    f: impl FnOnce(&mut FedConfig),
) -> CoreHarness {
    let mut cfg = FedConfig {
        bootstrap: vec![spec("server2", 9002)],
        advertise_port: OUR_PORT,
        ..FedConfig::default()
    };
    f(&mut cfg);
    let mut setup = Setup::new(id)
        .limits(limits())
        .federation(cfg)
        .at(now.mono_ms, now.wall_ms)
        .peer("srv-b", "server2")
        .peer("srv-c", "server3")
        .peer("srv-d", "server4")
        .started();
    setup.store = Some(store);
    CoreHarness::build(setup)
}

fn harness_as(id: &str, f: impl FnOnce(&mut FedConfig)) -> CoreHarness {
    let now = Time {
        mono_ms: MONO0,
        wall_ms: WALL0,
    };
    harness_on(id, TestStore::Mem(MemStore::new()), now, f)
}

fn harness_cfg(f: impl FnOnce(&mut FedConfig)) -> CoreHarness {
    harness_as(SRV, f)
}

/// "srv-a", bootstrap peer server2 at 127.0.0.1:9002, advertising port 9001; started.
fn harness() -> CoreHarness {
    harness_as(SRV, |_| {})
}

#[track_caller]
fn assert_error(frames: &[Envelope], code: &str) {
    assert_eq!(kinds(frames), [types::ERROR], "{frames:#?}");
    assert_eq!(str_field(&frames[0], "code"), code, "{:?}", frames[0]);
}

// -------------------------------------------------------------------- 1. backoff (§4.4)

#[test]
fn failed_dials_back_off_exponentially_for_ever() {
    let mut h = harness();
    let timers = h.timers();
    assert!(
        timers.contains(&(MONO0, Timer::Redial(0))),
        "dial at start: {timers:?}"
    );
    assert!(
        timers.contains(&(MONO0 + 15_000, Timer::Heartbeat)),
        "{timers:?}"
    );
    assert!(h.drain().is_empty());

    let mut at = MONO0;
    let mut capped = Vec::new();
    for attempt in 1..=25u32 {
        h.advance_to(at);
        h.fire(Timer::Redial(0));
        assert_eq!(
            h.dials(),
            [(0, HOST.to_string(), 9002)],
            "attempt {attempt}"
        );
        // A stray second firing while the dial is under way does not dial twice.
        h.fire(Timer::Redial(0));
        assert!(h.dials().is_empty(), "attempt {attempt}: dialled twice");
        h.assert_silent();

        h.input(Input::DialFailed {
            target: 0,
            reason: "connection refused".into(),
        });
        let redials = h.redials();
        assert_eq!(redials.len(), 1, "attempt {attempt}: {redials:?}");
        let (next, t) = redials[0];
        assert_eq!(t, 0);
        let delay = next - h.now.mono_ms;
        let nominal = (1_000u64 << (attempt - 1).min(10)).min(60_000);
        let (lo, hi) = (nominal * 8 / 10, nominal * 12 / 10);
        assert!(
            (lo..=hi).contains(&delay),
            "attempt {attempt}: delay {delay} ms outside {lo}..={hi}"
        );
        if nominal == 60_000 {
            capped.push(delay);
        }
        h.assert_silent();
        at = next;
    }
    assert!(capped.len() >= 15, "{capped:?}");
    assert!(
        capped.iter().any(|&d| d != capped[0]),
        "capped delays carry jitter: {capped:?}"
    );
    // Attempt 26 still happens.
    h.advance_to(at);
    h.fire(Timer::Redial(0));
    assert_eq!(h.dials().len(), 1, "never gives up");
}

// -------------------------------------------------------------------- 2. hello join, welcome timeout

#[test]
fn dialled_sends_signed_hello_join_and_times_out_without_welcome() {
    let mut h = harness();
    h.clear();
    h.fire(Timer::Redial(0));
    assert_eq!(h.dials(), [(0, HOST.to_string(), 9002)]);
    let c = h.fresh_conn();
    h.input(Input::Dialled { conn: c, target: 0 });

    let frames = h.frames_to(c);
    assert_eq!(kinds(&frames), [types::SERVER_HELLO_JOIN], "{frames:#?}");
    let hello = &frames[0];
    assert_eq!(hello.from, SRV);
    assert_eq!(hello.to, "127.0.0.1:9002");
    assert_eq!(hello.ts, h.now.wall_ms);
    assert_eq!(
        Value::Object(hello.payload.clone()),
        json!({"host": HOST, "port": OUR_PORT, "pubkey": test_key("server1").public_key().encoded()})
    );
    // Proof of possession: it verifies with the key it carries.
    let carried = PublicKey::parse(str_field(hello, "pubkey")).unwrap();
    assert!(wire::verify_payload_sig(&carried, &hello.payload, &hello.sig).unwrap());
    assert_eq!(h.timers(), [(h.now.mono_ms + 10_000, Timer::Welcome(c))]);
    h.assert_silent();

    // Silence for 9.999 s: nothing happens (a redial timer firing early is a no-op too).
    h.advance(9_999);
    h.fire(Timer::Redial(0));
    h.assert_silent();
    h.advance(1);
    h.fire(Timer::Welcome(c));
    assert_eq!(h.closes(c).len(), 1, "the dial without welcome is closed");
    assert!(h.frames_to(c).is_empty());
    let redials = h.redials();
    assert_eq!(redials.len(), 1, "{redials:?}");
    let delay = redials[0].0 - h.now.mono_ms;
    assert!(
        (800..=1_200).contains(&delay),
        "first retry after ~1 s: {delay}"
    );
    h.assert_silent();

    // The net layer reports the close: nothing more (no second redial).
    h.input(Input::Closed { conn: c });
    h.assert_silent();
    // A late welcome on the dead conn is ignored.
    let b = srv_b();
    h.welcome(c, &b, json!([]), json!([]));
    h.assert_silent();
    assert!(h.heartbeat().is_empty(), "no link");

    // The redial dials again.
    h.advance_to(redials[0].0);
    h.fire(Timer::Redial(0));
    assert_eq!(h.dials(), [(0, HOST.to_string(), 9002)]);
}

// -------------------------------------------------------------------- 3. welcome

#[test]
fn welcome_from_pinned_key_brings_link_up_and_announces() {
    let mut h = harness();
    h.clear();
    let b = srv_b();
    let c = h.dial(0, 9002);
    h.welcome(c, &b, json!([]), json!([]));
    assert!(h.closes(c).is_empty());
    let frames = h.frames_to(c);
    let k = kinds(&frames);
    assert!(k.contains(&types::PUBLIC_CHANNEL_UPDATED), "{k:?}");
    assert!(k.contains(&types::SERVER_ANNOUNCE), "{k:?}");
    for f in &frames {
        assert_eq!(f.from, SRV);
    }
    let ann = frames
        .iter()
        .find(|f| f.kind == types::SERVER_ANNOUNCE)
        .unwrap();
    assert_eq!(ann.to, "*");
    assert_eq!(
        Value::Object(ann.payload.clone()),
        json!({"host": HOST, "port": OUR_PORT, "pubkey": h.server_pub.encoded()})
    );
    let upd = frames
        .iter()
        .find(|f| f.kind == types::PUBLIC_CHANNEL_UPDATED)
        .unwrap();
    assert!(upd.payload["version"].is_i64(), "{upd:?}");
    assert_eq!(upd.payload["wraps"], json!([]));
    h.assert_silent();

    // The link is live: heartbeats go to it, and the welcome deadline no longer matters.
    h.fire(Timer::Welcome(c));
    assert!(
        h.closes(c).is_empty(),
        "the welcome timer is moot once linked"
    );
    h.assert_silent();
    assert_eq!(h.heartbeat(), [c]);
}

#[test]
fn welcome_signed_by_another_key_is_refused() {
    let mut h = harness();
    h.clear();
    let alice = test_key("user1");
    let ca = h.user("alice", &alice);
    h.clear();

    // "srv-b" answers our dial to server2's address, but signs with server3's key.
    let impostor = Peer::new("srv-b", "server3", 9002);
    let c = h.dial(0, 9002);
    let bob = test_key("user2");
    h.welcome(
        c,
        &impostor,
        json!([]),
        json!([client_entry("bob", "srv-b", &bob)]),
    );
    assert_eq!(h.closes(c).len(), 1, "the conn is closed");
    assert!(
        h.frames_to(c).is_empty(),
        "no announce, no directory to an impostor"
    );
    assert!(h.frames_to(ca).is_empty(), "its clients are not learned");
    assert_eq!(h.redials().len(), 1, "and we will try again");
    h.assert_silent();
    assert_eq!(h.list(ca, "alice"), ["alice"]);

    // No link: heartbeats go nowhere, and frames on the old conn are not accepted.
    assert!(h.heartbeat().is_empty());
    let ts = h.now.wall_ms;
    let deliver = json!({
        "user_id": "alice", "ciphertext": "AAAA", "sender": "bob",
        "sender_pub": bob.public_key().encoded(), "content_sig": "AAAA", "ts": ts,
    });
    let f = impostor.frame(types::SERVER_DELIVER, SRV, ts, &deliver);
    h.send(c, &f);
    let f = srv_b().frame(types::SERVER_DELIVER, SRV, ts, &deliver);
    h.send(c, &f);
    h.assert_silent();
}

// -------------------------------------------------------------------- 4. mesh

#[test]
fn welcome_servers_are_dialled_with_mesh_on() {
    let mut h = harness();
    h.clear();
    let (b, cc) = (srv_b(), srv_c());
    let c = h.dial(0, 9002);
    h.welcome(c, &b, json!([cc.server_entry()]), json!([]));
    assert!(h.closes(c).is_empty());
    let redials = h.redials();
    assert_eq!(
        redials,
        [(h.now.mono_ms, 1)],
        "srv-c becomes target 1, dialled now"
    );
    h.clear();
    h.fire(Timer::Redial(1));
    assert_eq!(h.dials(), [(1, HOST.to_string(), 9003)]);
}

/// Announces carry host and port only: a server learned of is dialled with `peer_tls`
/// (`--peer-scheme`), a bootstrap peer with the scheme of its URL.
#[test]
fn learned_servers_are_dialled_with_peer_tls_and_bootstrap_peers_with_their_own_scheme() {
    let mut h = harness_cfg(|cfg| cfg.peer_tls = true);
    h.clear();
    let (b, cc) = (srv_b(), srv_c());
    let c = h.dial(0, 9002); // ws:// bootstrap peer
    h.welcome(c, &b, json!([cc.server_entry()]), json!([]));
    h.clear();
    h.fire(Timer::Redial(1));
    assert_eq!(h.dial_schemes(), [(1, true)], "srv-c, learned of: wss://");

    let mut h = harness_cfg(|cfg| cfg.bootstrap[0].tls = true);
    h.clear();
    h.fire(Timer::Redial(0));
    assert_eq!(h.dial_schemes(), [(0, true)], "a wss:// bootstrap peer");
    let mut h = harness();
    h.clear();
    h.fire(Timer::Redial(0));
    assert_eq!(h.dial_schemes(), [(0, false)], "a ws:// bootstrap peer");
}

#[test]
fn welcome_servers_are_not_dialled_with_mesh_off() {
    let mut h = harness_cfg(|cfg| cfg.mesh = false);
    h.clear();
    let (b, cc) = (srv_b(), srv_c());
    let c = h.dial(0, 9002);
    h.welcome(c, &b, json!([cc.server_entry()]), json!([]));
    assert!(h.closes(c).is_empty());
    assert!(h.redials().is_empty());
    assert!(h.dials().is_empty());
    h.clear();
    for t in 0..3 {
        h.fire(Timer::Redial(t));
        assert!(h.dials().is_empty(), "target {t}");
    }
}

// -------------------------------------------------------------------- 5. welcome clients, DM

#[test]
fn welcome_clients_are_advertised_locally_and_reachable_by_dm() {
    let mut h = harness();
    h.clear();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    let ca = h.user("alice", &alice);
    h.clear();

    let b = srv_b();
    let c = h.dial(0, 9002);
    h.welcome(
        c,
        &b,
        json!([]),
        json!([client_entry("bob", "srv-b", &bob)]),
    );
    assert!(h.closes(c).is_empty());

    let to_alice = h.frames_to(ca);
    assert_eq!(kinds(&to_alice), [types::USER_ADVERTISE], "{to_alice:#?}");
    let adv = &to_alice[0];
    assert_eq!(adv.from, SRV, "re-signed by srv-a");
    assert_eq!(
        Value::Object(adv.payload.clone()),
        client_entry("bob", "srv-b", &bob)
    );

    // §4.3: the link gets our directory (alice) as USER_ADVERTISE.
    let to_link = h.frames_to(c);
    let ours: Vec<&Envelope> = to_link
        .iter()
        .filter(|f| f.kind == types::USER_ADVERTISE)
        .collect();
    assert_eq!(ours.len(), 1, "{to_link:#?}");
    let mut alice_entry = client_entry("alice", SRV, &alice);
    alice_entry["ts"] = ours[0].payload["ts"].clone();
    assert!(
        alice_entry["ts"].is_i64(),
        "presence we emit carries a signed ts (§7)"
    );
    assert_eq!(Value::Object(ours[0].payload.clone()), alice_entry);
    assert_eq!(ours[0].to, "*");
    h.assert_silent();

    assert_eq!(h.list(ca, "alice"), ["alice", "bob"]);

    let (sent, ts) = h.dm(ca, "alice", &alice, "bob", bob.public_key());
    assert!(h.frames_to(ca).is_empty(), "no error to the sender");
    let out = h.frames_to(c);
    assert_eq!(kinds(&out), [types::SERVER_DELIVER], "{out:#?}");
    let d = &out[0];
    assert_eq!(d.from, SRV);
    assert_eq!(d.to, "srv-b");
    assert_eq!(
        keys_of(&d.payload),
        [
            "ciphertext",
            "content_sig",
            "sender",
            "sender_pub",
            "ts",
            "user_id"
        ]
    );
    assert_eq!(d.payload["user_id"], "bob");
    assert_eq!(d.payload["sender"], "alice");
    assert_eq!(d.payload["ts"], json!(ts));
    assert_eq!(d.payload["ciphertext"], sent["ciphertext"]);
    assert_eq!(d.payload["sender_pub"], sent["sender_pub"]);
    assert_eq!(d.payload["content_sig"], sent["content_sig"]);
    h.assert_silent();
}

// -------------------------------------------------------------------- 6. inbound hellos

#[test]
fn inbound_hello_from_unpinned_key_is_refused() {
    let mut h = harness();
    h.clear();
    let d = Peer::new("srv-d", "server4", 9004);
    for kind in [types::SERVER_HELLO_JOIN, types::SERVER_HELLO_LINK] {
        let c = h.fresh_conn();
        h.input(opened(c));
        let f = d.frame(kind, "127.0.0.1:9001", h.now.wall_ms, &d.hello_payload());
        h.send(c, &f);
        assert_error(&h.frames_to(c), "BAD_KEY");
        assert_eq!(h.closes(c), [close::POLICY], "{kind}");
        h.assert_silent();
    }
    assert!(h.heartbeat().is_empty(), "no link");
}

#[test]
fn inbound_hello_join_from_pinned_key_gets_welcome() {
    let mut h = harness();
    h.clear();
    let (alice, carol) = (test_key("user1"), test_key("user3"));
    let ca = h.user("alice", &alice);
    let cc = h.user("carol", &carol);
    h.clear();

    let b = srv_b();
    let c = h.fresh_conn();
    h.input(opened(c));
    h.timers();
    let f = b.frame(
        types::SERVER_HELLO_JOIN,
        "127.0.0.1:9001",
        h.now.wall_ms,
        &b.hello_payload(),
    );
    h.send(c, &f);
    assert!(h.closes(c).is_empty());
    let frames = h.frames_to(c);
    assert_eq!(
        frames[0].kind,
        types::SERVER_WELCOME,
        "the welcome comes first: {frames:#?}"
    );
    let w = &frames[0];
    assert_eq!(w.from, SRV);
    assert_eq!(w.to, "srv-b");
    assert_eq!(w.payload["assigned_id"], "srv-b");
    assert!(w.payload["servers"].is_array(), "{w:?}");
    assert_eq!(
        w.payload["clients"],
        json!([
            client_entry("alice", SRV, &alice),
            client_entry("carol", SRV, &carol)
        ])
    );
    // Then our directory as USER_ADVERTISE frames (§4.3).
    let mut advertised: Vec<&str> = frames
        .iter()
        .filter(|f| f.kind == types::USER_ADVERTISE)
        .map(|f| str_field(f, "user_id"))
        .collect();
    advertised.sort();
    assert_eq!(advertised, ["alice", "carol"]);
    assert!(h.frames_to(ca).is_empty() && h.frames_to(cc).is_empty());
    h.assert_silent();
    assert_eq!(h.heartbeat(), [c], "the link is up");

    // Now srv-b is pinned to server2's key: a hello for "srv-b" with server3's key is refused.
    let impostor = Peer::new("srv-b", "server3", 9002);
    for kind in [types::SERVER_HELLO_JOIN, types::SERVER_HELLO_LINK] {
        let c2 = h.fresh_conn();
        h.input(opened(c2));
        let f = impostor.frame(
            kind,
            "127.0.0.1:9001",
            h.now.wall_ms,
            &impostor.hello_payload(),
        );
        h.send(c2, &f);
        assert_error(&h.frames_to(c2), "BAD_KEY");
        assert_eq!(h.closes(c2), [close::POLICY], "{kind}");
        h.assert_silent();
    }
    assert_eq!(h.heartbeat(), [c], "the real link stands");
}

#[test]
fn inbound_hello_with_key_not_matching_pin_is_refused_even_when_key_is_pinned_elsewhere() {
    // Bootstrap pins server2 and server3; srv-b comes up with server2's key. A hello claiming
    // id "srv-b" with server3's key (pinned, but for another server) is still refused.
    let mut h = harness_cfg(|cfg| cfg.bootstrap.push(spec("server3", 9003)));
    h.clear();
    let b = srv_b();
    let c = h.link_in(&b);
    h.clear();
    let impostor = Peer::new("srv-b", "server3", 9003);
    let c2 = h.fresh_conn();
    h.input(opened(c2));
    let f = impostor.frame(
        types::SERVER_HELLO_LINK,
        SRV,
        h.now.wall_ms,
        &impostor.hello_payload(),
    );
    h.send(c2, &f);
    assert_error(&h.frames_to(c2), "BAD_KEY");
    assert_eq!(h.closes(c2), [close::POLICY]);
    h.assert_silent();
    assert_eq!(h.heartbeat(), [c]);
}

#[test]
fn open_join_accepts_an_unknown_server() {
    let mut h = harness_cfg(|cfg| cfg.open_join = true);
    h.clear();
    let d = Peer::new("srv-d", "server4", 9004);
    let c = h.fresh_conn();
    h.input(opened(c));
    h.timers();
    let f = d.frame(
        types::SERVER_HELLO_JOIN,
        "127.0.0.1:9001",
        h.now.wall_ms,
        &d.hello_payload(),
    );
    h.send(c, &f);
    assert!(h.closes(c).is_empty());
    let frames = h.frames_to(c);
    assert_eq!(frames[0].kind, types::SERVER_WELCOME, "{frames:#?}");
    assert_eq!(frames[0].to, "srv-d");
    assert_eq!(frames[0].payload["assigned_id"], "srv-d");
    h.assert_silent();
    assert_eq!(h.heartbeat(), [c]);

    // Frames from srv-d over the link are now accepted (its key got pinned).
    let alice = test_key("user1");
    let ca = h.user("alice", &alice);
    h.clear();
    let dave = test_key("user4");
    let f = d.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &client_entry("dave", "srv-d", &dave),
    );
    h.send(c, &f);
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_ADVERTISE]);
    assert!(h.frames_to(c).is_empty());
}

// -------------------------------------------------------------------- 7. heartbeats and death

#[test]
fn silent_link_dies_after_45s_and_takes_its_users() {
    let mut h = harness_cfg(|cfg| {
        cfg.heartbeat_ms = 15_000;
        cfg.dead_after_ms = 45_000;
    });
    h.clear();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    let ca = h.user("alice", &alice);
    let b = srv_b();
    let c = h.dial(0, 9002);
    h.welcome(
        c,
        &b,
        json!([]),
        json!([client_entry("bob", "srv-b", &bob)]),
    );
    assert!(h.closes(c).is_empty());
    let last_rx = h.now.mono_ms;
    h.clear();
    assert_eq!(h.list(ca, "alice"), ["alice", "bob"]);

    // Heartbeat timers at +15 s, +30 s: HEARTBEAT to srv-b, link kept.
    let mut at = MONO0 + 15_000;
    loop {
        h.advance_to(at);
        let silent = h.now.mono_ms - last_rx;
        let got = h.heartbeat();
        if silent < 45_000 {
            assert_eq!(got, [c], "heartbeat at {silent} ms of silence");
            let hb = &h.outbox;
            assert!(
                hb.iter().all(|a| !matches!(a, Action::Close { .. })),
                "{hb:?}"
            );
            assert!(h.frames_to(ca).is_empty());
            h.assert_silent();
            at += 15_000;
            continue;
        }
        // At 45 s of silence the link is dead.
        assert!(got.is_empty(), "no heartbeat to a dead link");
        assert_eq!(
            h.closes(c).len(),
            1,
            "dead link closed at {silent} ms of silence"
        );
        break;
    }
    let to_alice = h.frames_to(ca);
    assert_eq!(kinds(&to_alice), [types::USER_REMOVE], "{to_alice:#?}");
    assert_eq!(
        Value::Object(to_alice[0].payload.clone()),
        json!({"user_id": "bob", "server_id": "srv-b"})
    );
    let redials = h.redials();
    assert_eq!(redials.len(), 1, "{redials:?}");
    assert_eq!(redials[0].1, 0);
    let delay = redials[0].0 - h.now.mono_ms;
    assert!(
        (800..=1_200).contains(&delay),
        "backoff restarts at ~1 s: {delay}"
    );
    h.assert_silent();
    assert_eq!(h.list(ca, "alice"), ["alice"]);

    // The close reaching us from the net layer changes nothing.
    h.input(Input::Closed { conn: c });
    h.assert_silent();
    // Redial: a new dial to srv-b.
    h.advance_to(redials[0].0);
    h.fire(Timer::Redial(0));
    assert_eq!(h.dials(), [(0, HOST.to_string(), 9002)]);
}

#[test]
fn link_with_peer_heartbeats_stays_up() {
    let mut h = harness();
    h.clear();
    let b = srv_b();
    let c = h.link_out(0, &b);
    h.clear();
    let mut at = MONO0 + 15_000;
    for round in 0..12 {
        // The peer's heartbeat arrives a little before ours.
        h.advance_to(at - 100);
        let f = b.frame(types::HEARTBEAT, SRV, h.now.wall_ms, &json!({}));
        h.send(c, &f);
        h.assert_silent();
        h.advance_to(at);
        assert_eq!(h.heartbeat(), [c], "round {round}");
        assert!(h.closes(c).is_empty(), "round {round}");
        h.assert_silent();
        at += 15_000;
    }
    // Any frame counts as life, not only HEARTBEAT: a USER_ADVERTISE keeps it up too.
    h.advance_to(at - 100);
    let f = b.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &client_entry("bob", "srv-b", &test_key("user2")),
    );
    h.send(c, &f);
    h.clear();
    h.advance_to(at);
    assert_eq!(h.heartbeat(), [c]);
    // Then silence: it dies 45 s after that last frame, not earlier.
    for _ in 0..2 {
        at += 15_000;
        h.advance_to(at);
        assert_eq!(h.heartbeat(), [c]);
        assert!(h.closes(c).is_empty());
    }
    at += 15_000;
    h.advance_to(at);
    assert!(h.heartbeat().is_empty());
    assert_eq!(h.closes(c).len(), 1);
}

/// Our users' adverts signed afresh for the links (to stay inside the peers' freshness window,
/// §6) are work nobody waits for: signed when nothing else waits (`Urgency::Background`), and
/// every frame sent after them on the link but presence of the same user may pass them while
/// they wait for their signatures (`Lane::Refresh`). They went as ordered frames at login
/// priority, so a heartbeat's batch (up to an eighth of the users) held up every cross-server
/// message behind it, and every login and leave.
#[test]
fn adverts_refreshed_for_links_are_background_work_in_a_lane_every_frame_may_pass() {
    let mut h = harness();
    let recorded = h.record_signatures(false);
    let b = srv_b();
    let link = h.link_out(0, &b);
    let alice = test_key("user1");
    let ca = h.fresh_conn();
    h.login(ca, "alice", &alice);
    h.clear();
    let mut refreshed = Vec::new();
    let mut at = MONO0 + 15_000;
    while refreshed.is_empty() && at < MONO0 + 200_000 {
        h.advance_to(at - 100);
        let f = b.frame(types::HEARTBEAT, SRV, h.now.wall_ms, &json!({}));
        h.send(link, &f);
        h.advance_to(at);
        assert_eq!(h.heartbeat(), [link]);
        refreshed = h.extract(|a| match a {
            Action::Send { conn, text }
                if *conn == link && text.as_str().contains("\"type\":\"USER_ADVERTISE\"") =>
            {
                Some((text.lane(), text.as_str().to_string()))
            }
            _ => None,
        });
        at += 15_000;
    }
    assert_eq!(refreshed.len(), 1, "alice's advert, refreshed once");
    let (lane, text) = &refreshed[0];
    assert_eq!(*lane, Lane::refresh("alice"));
    let env = h.check(text);
    assert_eq!(env.payload["user_id"], "alice");
    assert_eq!(env.payload["ts"], json!(h.now.wall_ms), "signed afresh");
    // Adverts only: `{meta, pubkey, server_id, ts, user_id}` in canonical order.
    assert_eq!(
        recorded.urgencies(&format!("\"server_id\":\"{SRV}\",\"ts\":")),
        [Urgency::Bulk, Urgency::Background],
        "the login's advert, then the refresh"
    );
}

// -------------------------------------------------------------------- 8. presence from peers

#[test]
fn user_advertise_from_peer_is_checked_recorded_and_relayed_once() {
    let mut h = harness();
    h.clear();
    let alice = test_key("user1");
    let ca = h.user("alice", &alice);
    let b = srv_b();
    let c = h.link_out(0, &b);
    h.clear();

    // A correct advert: alice gets it once, re-signed by srv-a.
    let bob = test_key("user2");
    let adv = client_entry("bob", "srv-b", &bob);
    let f = b.frame(types::USER_ADVERTISE, "*", h.now.wall_ms, &adv);
    h.send(c, &f);
    let got = h.frames_to(ca);
    assert_eq!(kinds(&got), [types::USER_ADVERTISE], "{got:#?}");
    assert_eq!(got[0].from, SRV);
    assert_eq!(Value::Object(got[0].payload.clone()), adv);
    h.assert_silent();
    // The very same frame again: nothing at all.
    h.send(c, &f);
    h.assert_silent();
    // Even a while later (still inside the window).
    h.advance(60_000);
    h.send(c, &f);
    h.assert_silent();
    assert_eq!(h.list(ca, "alice"), ["alice", "bob"]);

    // server_id ≠ from: refused, not recorded, not relayed.
    let carol = test_key("user3");
    let f = b.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &client_entry("carol", "srv-c", &carol),
    );
    h.send(c, &f);
    assert_error(&h.frames_to(c), "INVALID_SIG");
    assert!(h.frames_to(ca).is_empty());
    h.assert_silent();
    assert_eq!(h.list(ca, "alice"), ["alice", "bob"]);

    // Bad signature (signed by server3 though from srv-b): INVALID_SIG, not recorded.
    let dave = test_key("user4");
    let dave_adv = client_entry("dave", "srv-b", &dave);
    let ts = h.now.wall_ms;
    let forged = signed_frame(
        types::USER_ADVERTISE,
        "srv-b",
        "*",
        ts,
        &dave_adv,
        &test_key("server3"),
    );
    h.send(c, &forged);
    assert_error(&h.frames_to(c), "INVALID_SIG");
    assert!(h.frames_to(ca).is_empty());
    h.assert_silent();
    assert_eq!(h.list(ca, "alice"), ["alice", "bob"]);
    // A forgery does not shadow the genuine frame with the same type/from/to/ts/payload.
    let genuine = b.frame(types::USER_ADVERTISE, "*", ts, &dave_adv);
    h.send(c, &genuine);
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_ADVERTISE]);
    h.assert_silent();
    assert_eq!(h.list(ca, "alice"), ["alice", "bob", "dave"]);

    // A correctly signed advert 10 minutes old, or 10 minutes ahead: dropped silently.
    let erin = test_key("user5");
    for skew in [-600_000i64, 600_000] {
        let f = b.frame(
            types::USER_ADVERTISE,
            "*",
            h.now.wall_ms + skew,
            &client_entry("erin", "srv-b", &erin),
        );
        h.send(c, &f);
        h.assert_silent();
    }
    assert_eq!(h.list(ca, "alice"), ["alice", "bob", "dave"]);
}

#[test]
fn user_remove_deletes_only_if_entry_still_points_to_that_server() {
    let mut h = harness_cfg(|cfg| cfg.bootstrap.push(spec("server3", 9003)));
    h.clear();
    let alice = test_key("user1");
    let ca = h.user("alice", &alice);
    let (b, cc) = (srv_b(), srv_c());
    let lb = h.link_out(0, &b);
    let lc = h.link_in(&cc);
    h.clear();

    // bob is at srv-b, then moves to srv-c.
    let bob = test_key("user2");
    let f = b.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &client_entry("bob", "srv-b", &bob),
    );
    h.send(lb, &f);
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_ADVERTISE]);
    h.clear();
    h.advance(10);
    let srv_c_claims_bob = cc.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &client_entry("bob", "srv-c", &bob),
    );
    // §7: a user stays where it is while its live server has not removed it.
    h.send(lc, &srv_c_claims_bob);
    assert!(h.frames_to(ca).is_empty(), "the claim is refused");
    let err = h.frames_to(lc);
    assert_eq!(kinds(&err), [types::ERROR]);
    assert_eq!(err[0].payload["code"], "NAME_IN_USE");
    assert_eq!(
        err[0].to, "srv-c",
        "an error to a server is addressed to it"
    );
    h.clear();
    // srv-b removes bob (the deployed servers' form, without ts); then srv-c may host him.
    let f = b.frame(
        types::USER_REMOVE,
        "*",
        h.now.wall_ms,
        &json!({"user_id": "bob", "server_id": "srv-b"}),
    );
    h.send(lb, &f);
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_REMOVE]);
    h.clear();
    h.advance(10);
    let f = cc.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &client_entry("bob", "srv-c", &bob),
    );
    h.send(lc, &f);
    let got = h.frames_to(ca);
    assert_eq!(kinds(&got), [types::USER_ADVERTISE]);
    assert_eq!(got[0].payload["server_id"], "srv-c");
    h.clear();
    h.advance(10);

    // A late USER_REMOVE from srv-b: the entry points to srv-c now, so it stays.
    let f = b.frame(
        types::USER_REMOVE,
        "*",
        h.now.wall_ms,
        &json!({"user_id": "bob", "server_id": "srv-b"}),
    );
    h.send(lb, &f);
    assert!(h.frames_to(ca).is_empty(), "bob is not removed");
    assert!(h.frames_to(lb).is_empty(), "no error");
    h.clear();
    assert_eq!(h.list(ca, "alice"), ["alice", "bob"]);

    // srv-b may not remove a user on srv-c's behalf either.
    let f = b.frame(
        types::USER_REMOVE,
        "*",
        h.now.wall_ms,
        &json!({"user_id": "bob", "server_id": "srv-c"}),
    );
    h.send(lb, &f);
    assert!(h.frames_to(ca).is_empty());
    h.clear();
    assert_eq!(h.list(ca, "alice"), ["alice", "bob"]);

    // srv-c's USER_REMOVE deletes it and is relayed to alice.
    let f = cc.frame(
        types::USER_REMOVE,
        "*",
        h.now.wall_ms,
        &json!({"user_id": "bob", "server_id": "srv-c"}),
    );
    h.send(lc, &f);
    let got = h.frames_to(ca);
    assert_eq!(kinds(&got), [types::USER_REMOVE], "{got:#?}");
    assert_eq!(got[0].from, SRV);
    assert_eq!(
        Value::Object(got[0].payload.clone()),
        json!({"user_id": "bob", "server_id": "srv-c"})
    );
    h.clear();
    assert_eq!(h.list(ca, "alice"), ["alice"]);
}

// -------------------------------------------------------------------- 9. relay (§6)

#[test]
fn server_deliver_is_relayed_unchanged_or_delivered_locally() {
    let mut h = harness_cfg(|cfg| cfg.bootstrap.push(spec("server3", 9003)));
    h.clear();
    let alice = test_key("user1");
    let ca = h.user("alice", &alice);
    let (b, cc) = (srv_b(), srv_c());
    let lb = h.link_out(0, &b);
    let lc = h.link_in(&cc);
    h.clear();
    let (bob, carol) = (test_key("user2"), test_key("user3"));
    let f = b.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &client_entry("bob", "srv-b", &bob),
    );
    h.send(lb, &f);
    let f = cc.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &client_entry("carol", "srv-c", &carol),
    );
    h.send(lc, &f);
    h.clear();

    // srv-b → srv-c through us: the identical text, to srv-c's link only.
    let ts = h.now.wall_ms - 50;
    let p = deliver_payload("carol", "bob", &bob, carol.public_key(), ts);
    let f = b.frame(types::SERVER_DELIVER, "srv-c", ts, &p);
    h.send(lb, &f);
    assert_eq!(
        h.routed(),
        [lc],
        "flow-controlled: it is srv-b's frame (issue \"trust at the edges\")"
    );
    let relayed = h.sent_to(lc);
    assert_eq!(relayed.len(), 1, "{relayed:#?}");
    assert_eq!(relayed[0].text, f, "relayed unchanged");
    assert!(h.frames_to(lb).is_empty(), "never back to srv-b");
    assert!(h.frames_to(ca).is_empty());
    h.assert_silent();
    // The same frame again is a duplicate: not relayed twice.
    h.send(lb, &f);
    h.assert_silent();

    // §6: the same signed payload with another envelope `to` (or `ts`) is the same frame.
    let readdressed = b.frame(types::SERVER_DELIVER, "srv-x", ts + 7, &p);
    h.send(lb, &readdressed);
    h.assert_silent();

    // To a server we have no link to: flooded to every link but the one it came from.
    let p = deliver_payload("carol", "bob", &bob, carol.public_key(), ts + 1);
    let f = b.frame(types::SERVER_DELIVER, "srv-x", ts, &p);
    h.send(lb, &f);
    assert_eq!(h.routed(), [lc]);
    let relayed = h.sent_to(lc);
    assert_eq!(relayed.len(), 1);
    assert_eq!(relayed[0].text, f);
    assert!(h.frames_to(lb).is_empty(), "never back to srv-b");
    h.assert_silent();

    // To us, for alice: USER_DELIVER to alice, signed by srv-a.
    let p = deliver_payload("alice", "bob", &bob, alice.public_key(), ts);
    let f = b.frame(types::SERVER_DELIVER, SRV, ts, &p);
    h.send(lb, &f);
    assert_eq!(h.routed(), [ca]);
    let got = h.frames_to(ca);
    assert_eq!(kinds(&got), [types::USER_DELIVER], "{got:#?}");
    let d = &got[0];
    assert_eq!(d.from, SRV);
    assert_eq!(d.to, "alice");
    let mut expected = p.as_object().unwrap().clone();
    expected.remove("user_id");
    assert_eq!(d.payload, expected);
    assert!(crypto::verify_content_sig(
        bob.public_key(),
        str_field(d, "content_sig"),
        str_field(d, "ciphertext"),
        "bob",
        Some("alice"),
        ts
    ));
    assert!(h.frames_to(lb).is_empty());
    h.assert_silent();

    // srv-b claiming carol (hosted by srv-c) or an unknown user as sender: refused.
    for sender in ["carol", "nobody"] {
        let p = deliver_payload("alice", sender, &carol, alice.public_key(), ts + 1);
        let f = b.frame(types::SERVER_DELIVER, SRV, ts + 1, &p);
        h.send(lb, &f);
        assert_error(&h.frames_to(lb), "INVALID_SIG");
        assert!(h.frames_to(ca).is_empty(), "{sender}: not delivered");
        h.assert_silent();
    }
    // While carol's own server may.
    let p = deliver_payload("alice", "carol", &carol, alice.public_key(), ts + 2);
    let f = cc.frame(types::SERVER_DELIVER, SRV, ts + 2, &p);
    h.send(lc, &f);
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_DELIVER]);
    h.assert_silent();
}

#[test]
fn relay_with_a_single_link_never_goes_back() {
    let mut h = harness();
    h.clear();
    let b = srv_b();
    let lb = h.link_out(0, &b);
    h.clear();
    let (bob, carol) = (test_key("user2"), test_key("user3"));
    let ts = h.now.wall_ms;
    let p = deliver_payload("carol", "bob", &bob, carol.public_key(), ts);
    for to in ["srv-c", "srv-b"] {
        let f = b.frame(types::SERVER_DELIVER, to, ts, &p);
        h.send(lb, &f);
        h.assert_silent();
    }
}

// -------------------------------------------------------------------- 10. one link per pair

/// Dials srv-b and opens an inbound link from it; `inbound_first` says which comes up first.
/// Returns (our dial's conn, the inbound conn).
fn both_links(h: &mut CoreHarness, inbound_first: bool) -> (ConnId, ConnId) {
    let b = srv_b();
    let out = h.dial(0, 9002);
    h.clear();
    let inbound;
    if inbound_first {
        inbound = h.link_in(&b);
        h.clear();
        h.welcome(out, &b, json!([]), json!([]));
    } else {
        h.welcome(out, &b, json!([]), json!([]));
        assert!(h.closes(out).is_empty());
        h.clear();
        inbound = h.fresh_conn();
        h.input(opened(inbound));
        let f = b.frame(
            types::SERVER_HELLO_LINK,
            &h.id.clone(),
            h.now.wall_ms,
            &b.hello_payload(),
        );
        h.send(inbound, &f);
    }
    (out, inbound)
}

#[test]
fn one_link_per_pair_keeps_the_smaller_ids_dial() {
    for inbound_first in [true, false] {
        let mut h = harness();
        h.clear();
        let alice = test_key("user1");
        let ca = h.user("alice", &alice);
        h.clear();
        let (out, inbound) = both_links(&mut h, inbound_first);
        let closed = h.all_closes();
        assert_eq!(
            closed,
            [inbound],
            "inbound_first={inbound_first}: srv-a < srv-b, our dial wins"
        );
        assert!(h.frames_to(ca).is_empty(), "no user churn");
        assert!(h.redials().is_empty(), "no redial for the loser");
        h.clear();
        assert_eq!(h.heartbeat(), [out], "inbound_first={inbound_first}");
        // Frames on the surviving link are accepted.
        let bob = test_key("user2");
        let f = srv_b().frame(
            types::USER_ADVERTISE,
            "*",
            h.now.wall_ms,
            &client_entry("bob", "srv-b", &bob),
        );
        h.send(out, &f);
        assert_eq!(kinds(&h.frames_to(ca)), [types::USER_ADVERTISE]);
        h.assert_silent();
        // The loser's close reported by the net layer changes nothing.
        h.input(Input::Closed { conn: inbound });
        h.assert_silent();
        assert_eq!(h.heartbeat(), [out]);
        assert_eq!(h.list(ca, "alice"), ["alice", "bob"]);
    }
}

#[test]
fn one_link_per_pair_keeps_their_dial_when_their_id_is_smaller() {
    // The same race seen from "srv-z": srv-b < srv-z, so srv-b's dial (inbound here) wins.
    for inbound_first in [true, false] {
        let mut h = harness_as("srv-z", |_| {});
        h.clear();
        let (out, inbound) = both_links(&mut h, inbound_first);
        let closed = h.all_closes();
        assert_eq!(
            closed,
            [out],
            "inbound_first={inbound_first}: srv-b's dial wins"
        );
        assert!(h.redials().is_empty(), "no redial for the loser");
        h.clear();
        assert_eq!(h.heartbeat(), [inbound], "inbound_first={inbound_first}");
    }
}

// -------------------------------------------------------------------- 11. flooding

#[test]
fn dm_to_user_behind_unlinked_server_is_flooded_then_not_found_without_links() {
    let mut h = harness();
    h.clear();
    let alice = test_key("user1");
    let ca = h.user("alice", &alice);
    let (b, cc) = (srv_b(), srv_c());
    let lb = h.dial(0, 9002);
    // srv-b vouches for srv-c (pinning it); we do not get a link to srv-c.
    h.welcome(lb, &b, json!([cc.server_entry()]), json!([]));
    assert!(h.closes(lb).is_empty());
    h.clear();

    // carol's advert from srv-c arrives relayed by srv-b.
    let carol = test_key("user3");
    let f = cc.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &client_entry("carol", "srv-c", &carol),
    );
    h.send(lb, &f);
    let got = h.frames_to(ca);
    assert_eq!(kinds(&got), [types::USER_ADVERTISE], "{got:#?}");
    assert_eq!(got[0].payload["server_id"], "srv-c");
    h.assert_silent();

    let (sent, ts) = h.dm(ca, "alice", &alice, "carol", carol.public_key());
    assert!(h.frames_to(ca).is_empty());
    let out = h.frames_to(lb);
    assert_eq!(kinds(&out), [types::SERVER_DELIVER], "{out:#?}");
    assert_eq!(out[0].from, SRV);
    assert_eq!(out[0].to, "srv-c", "flooded toward srv-c");
    assert_eq!(out[0].payload["user_id"], "carol");
    assert_eq!(out[0].payload["ts"], json!(ts));
    assert_eq!(out[0].payload["ciphertext"], sent["ciphertext"]);
    h.assert_silent();

    // srv-b's link closes; carol (srv-c) is still listed, but there is no link left at all.
    h.input(Input::Closed { conn: lb });
    h.clear();
    h.dm(ca, "alice", &alice, "carol", carol.public_key());
    assert_error(&h.frames_to(ca), "USER_NOT_FOUND");
    h.assert_silent();
}

#[test]
fn dm_to_unknown_user_with_no_links_is_user_not_found() {
    let mut h = harness();
    h.clear();
    let alice = test_key("user1");
    let ca = h.user("alice", &alice);
    h.clear();
    h.dm(
        ca,
        "alice",
        &alice,
        "nobody",
        test_key("user2").public_key(),
    );
    assert_error(&h.frames_to(ca), "USER_NOT_FOUND");
    h.assert_silent();
}

// -------------------------------------------------------------------- extra: dedup window

#[test]
fn frame_from_a_peer_clock_ahead_cannot_be_replayed_after_eviction() {
    let mut h = harness();
    h.clear();
    let alice = test_key("user1");
    let ca = h.user("alice", &alice);
    let b = srv_b();
    let lb = h.dial(0, 9002);
    let bob = test_key("user2");
    h.welcome(
        lb,
        &b,
        json!([]),
        json!([client_entry("bob", "srv-b", &bob)]),
    );
    h.clear();

    // srv-b's clock runs 60 s ahead of ours: well inside the 5-minute window.
    let ts = h.now.wall_ms + 60_000;
    let p = deliver_payload("alice", "bob", &bob, alice.public_key(), ts);
    let f = b.frame(types::SERVER_DELIVER, SRV, ts, &p);
    h.send(lb, &f);
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_DELIVER]);
    h.assert_silent();

    // Replays of that exact frame, at any later time, must never be delivered again: while the
    // entry is cached it is a duplicate; once it may have been evicted, the ts must be out of
    // the window.
    for wait in [1_000u64, 100_000, 150_000, 50_000, 1, 30_000, 60_000] {
        h.advance(wait);
        // Keep the link alive.
        let hb = b.frame(types::HEARTBEAT, SRV, h.now.wall_ms, &json!({}));
        h.send(lb, &hb);
        h.send(lb, &f);
        let got = h.frames_to(ca);
        assert!(
            got.is_empty(),
            "replayed {} ms after the original (ts {} ms from our clock): {got:#?}",
            h.now.wall_ms - (ts - 60_000),
            ts - h.now.wall_ms
        );
        h.clear();
    }
}

// -------------------------------------------------------------------- extra: mesh introductions

#[test]
fn inbound_join_welcome_lists_linked_servers_and_remote_users() {
    let mut h = harness_cfg(|cfg| cfg.bootstrap.push(spec("server3", 9003)));
    h.clear();
    let alice = test_key("user1");
    let ca = h.user("alice", &alice);
    let cc = srv_c();
    let lc = h.link_in(&cc);
    let carol = test_key("user3");
    let f = cc.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &client_entry("carol", "srv-c", &carol),
    );
    h.send(lc, &f);
    h.clear();
    // The Hello timer armed when srv-c's connection opened is harmless on a link.
    h.advance(10_000);
    for c in 1..=h.next_conn {
        h.fire(Timer::Hello(conn(c)));
    }
    h.assert_silent();

    let b = srv_b();
    let lb = h.fresh_conn();
    h.input(opened(lb));
    let f = b.frame(
        types::SERVER_HELLO_JOIN,
        "127.0.0.1:9001",
        h.now.wall_ms,
        &b.hello_payload(),
    );
    h.send(lb, &f);
    let frames = h.frames_to(lb);
    assert_eq!(frames[0].kind, types::SERVER_WELCOME, "{frames:#?}");
    let w = &frames[0];
    assert_eq!(w.payload["servers"], json!([cc.server_entry()]));
    assert_eq!(
        w.payload["clients"],
        json!([
            client_entry("alice", SRV, &alice),
            client_entry("carol", "srv-c", &carol)
        ]),
        "every user online anywhere we know of"
    );
    assert!(h.frames_to(ca).is_empty());
    let to_c = h.frames_to(lc);
    assert!(
        to_c.iter()
            .all(|f| f.kind == types::SERVER_ANNOUNCE && f.from == SRV),
        "only our own announce goes to srv-c when srv-b links: {to_c:#?}"
    );
    h.clear();
    assert_eq!(h.heartbeat(), {
        let mut v = vec![lc, lb];
        v.sort();
        v
    });
}

#[test]
fn broadcasts_are_forwarded_unchanged_and_flood_back_is_dropped() {
    let mut h = harness_cfg(|cfg| cfg.bootstrap.push(spec("server3", 9003)));
    h.clear();
    let alice = test_key("user1");
    let ca = h.user("alice", &alice);
    let (b, cc) = (srv_b(), srv_c());
    let lb = h.link_out(0, &b);
    let lc = h.link_in(&cc);
    h.clear();

    // srv-b's advert: forwarded unchanged to srv-c only, relayed once to alice.
    let bob = test_key("user2");
    let f = b.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &client_entry("bob", "srv-b", &bob),
    );
    h.send(lb, &f);
    assert!(
        h.routed().is_empty(),
        "a broadcast never pauses the link it came from"
    );
    let fwd = h.sent_to(lc);
    assert_eq!(fwd.len(), 1, "{fwd:#?}");
    assert_eq!(fwd[0].text, f, "forwarded unchanged");
    assert!(h.frames_to(lb).is_empty(), "never back to srv-b");
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_ADVERTISE]);
    h.assert_silent();
    // The same advert flooded back to us by srv-c: dropped, not forwarded again.
    h.send(lc, &f);
    h.assert_silent();

    // A delivery that srv-b signed, relayed to us by srv-c, is delivered (sender bob is srv-b's).
    let ts = h.now.wall_ms;
    let p = deliver_payload("alice", "bob", &bob, alice.public_key(), ts);
    let f = b.frame(types::SERVER_DELIVER, SRV, ts, &p);
    h.send(lc, &f);
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_DELIVER]);
    h.assert_silent();
    // And a copy over the direct link is a duplicate.
    h.send(lb, &f);
    h.assert_silent();

    // A frame from an unknown server over a link is refused.
    let d = Peer::new("srv-d", "server4", 9004);
    let f = d.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &client_entry("dave", "srv-d", &test_key("user4")),
    );
    h.send(lb, &f);
    assert_error(&h.frames_to(lb), "INVALID_SIG");
    h.assert_silent();
    // An ERROR from a peer is never answered.
    let f = b.frame(
        types::ERROR,
        SRV,
        h.now.wall_ms,
        &json!({"code": "TIMEOUT", "detail": "x"}),
    );
    h.send(lb, &f);
    h.assert_silent();
    assert_eq!(h.list(ca, "alice"), ["alice", "bob"]);
}

#[test]
fn our_flooded_delivery_coming_back_is_dropped() {
    let mut h = harness_cfg(|cfg| cfg.open_join = true);
    h.clear();
    let alice = test_key("user1");
    let ca = h.user("alice", &alice);
    let (b, cc, d) = (srv_b(), srv_c(), Peer::new("srv-d", "server4", 9004));
    let lb = h.dial(0, 9002);
    h.welcome(lb, &b, json!([cc.server_entry()]), json!([]));
    let ld = h.link_in(&d);
    h.clear();
    let carol = test_key("user3");
    let f = cc.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &client_entry("carol", "srv-c", &carol),
    );
    h.send(lb, &f);
    h.clear();

    // carol's server has no link: the delivery goes to both links.
    h.dm(ca, "alice", &alice, "carol", carol.public_key());
    let to_b = h.sent_to(lb);
    let to_d = h.sent_to(ld);
    assert_eq!(to_b.len(), 1);
    assert_eq!(to_d.len(), 1);
    assert_eq!(to_b[0].text, to_d[0].text, "one frame, flooded");
    assert_eq!(to_b[0].env.to, "srv-c");
    h.assert_silent();
    // srv-d floods it back to us: dropped, not relayed to srv-b again.
    h.send(ld, &to_d[0].text);
    h.assert_silent();
}

#[test]
fn channel_changes_reach_the_links_batched_after_the_adverts() {
    let mut h = harness();
    h.clear();
    let b = srv_b();
    let lb = h.link_out(0, &b);
    h.clear();
    let start = h.now.mono_ms;

    // Two logins: each advert leaves at once, the channel news waits for one timer.
    let (alice, carol) = (test_key("user1"), test_key("user3"));
    let ca = h.user("alice", &alice);
    let first = h.timers();
    assert_eq!(
        first,
        [(start + CHANNEL_BATCH_MS, Timer::Channel)],
        "one timer for the batch"
    );
    h.advance(30);
    let cc = h.user("carol", &carol);
    assert!(
        !h.timers().iter().any(|(_, t)| *t == Timer::Channel),
        "no second timer while one is armed"
    );
    let to_link = h.frames_to(lb);
    assert_eq!(
        kinds(&to_link),
        [types::USER_ADVERTISE, types::USER_ADVERTISE],
        "{to_link:#?}"
    );
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_ADVERTISE]);
    h.assert_silent();

    h.advance_to(start + CHANNEL_BATCH_MS);
    h.fire(Timer::Channel);
    let news = h.frames_to(lb);
    assert_eq!(
        kinds(&news),
        [types::PUBLIC_CHANNEL_ADD, types::PUBLIC_CHANNEL_UPDATED],
        "{news:#?}"
    );
    let version = news[1].payload["version"].as_i64().unwrap();
    assert_eq!(news[0].payload["add"], json!(["alice", "carol"]));
    assert_eq!(news[0].payload["if_version"], json!(version - 2));
    assert_eq!(news[1].payload["wraps"], json!([]));
    h.assert_silent();
    // Fired again with nothing new: nothing.
    h.fire(Timer::Channel);
    h.assert_silent();

    // A logout is news too, without an ADD; a user who came and went within one batch is
    // not announced as added.
    h.input(Input::Closed { conn: cc });
    assert_eq!(kinds(&h.frames_to(lb)), [types::USER_REMOVE]);
    let dave = test_key("user4");
    let cd = h.user("dave", &dave);
    h.input(Input::Closed { conn: cd });
    assert_eq!(
        h.timers()
            .iter()
            .filter(|(_, t)| *t == Timer::Channel)
            .count(),
        1
    );
    h.clear();
    h.fire(Timer::Channel);
    let news = h.frames_to(lb);
    assert_eq!(kinds(&news), [types::PUBLIC_CHANNEL_UPDATED], "{news:#?}");
    assert_eq!(news[0].payload["version"], json!(version + 3));
    h.assert_silent();
}

// -------------------------------------------------------------------- 10. trust at the edges (§6, §7)

/// bob's directory entry as srv-b emits it, with its signed `ts` (§7).
fn entry_at(user_id: &str, server_id: &str, key: &PrivateKey, ts: i64) -> Value {
    let mut entry = client_entry(user_id, server_id, key);
    entry["ts"] = json!(ts);
    entry
}

/// `peer` advertises bob, hosted by itself with key `key`, at `ts`, on `link`.
fn advertise_bob(h: &mut CoreHarness, link: ConnId, peer: &Peer, key: &PrivateKey, ts: i64) {
    let advert = entry_at("bob", peer.id, key, ts);
    h.send(link, &peer.frame(types::USER_ADVERTISE, "*", ts, &advert));
}

/// srv-a with alice logged in and a link to srv-b, which hosts bob.
fn alice_and_bob_at_srv_b(
    h: &mut CoreHarness,
    alice: &PrivateKey,
    bob: &PrivateKey,
) -> (ConnId, ConnId) {
    let ca = h.user("alice", alice);
    let lb = h.link_out(0, &srv_b());
    let ts = h.now.wall_ms;
    h.send(
        lb,
        &srv_b().frame(
            types::USER_ADVERTISE,
            "*",
            ts,
            &entry_at("bob", "srv-b", bob, ts),
        ),
    );
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_ADVERTISE]);
    h.clear();
    (ca, lb)
}

#[test]
fn a_delivery_is_judged_on_its_signed_ts_whatever_its_envelope_says() {
    let mut h = harness();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    let (ca, lb) = alice_and_bob_at_srv_b(&mut h, &alice, &bob);
    let b = srv_b();

    let ts = h.now.wall_ms;
    let p = deliver_payload("alice", "bob", &bob, alice.public_key(), ts);
    h.send(lb, &b.frame(types::SERVER_DELIVER, SRV, ts, &p));
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_DELIVER]);

    // The same signed payload with a fresh envelope ts, a minute later: a duplicate.
    h.advance(60_000);
    h.send(lb, &b.frame(types::SERVER_DELIVER, SRV, h.now.wall_ms, &p));
    h.assert_silent();

    // A payload signed 10 minutes ago in a fresh envelope: outside the window.
    let old = deliver_payload(
        "alice",
        "bob",
        &bob,
        alice.public_key(),
        h.now.wall_ms - 600_000,
    );
    h.send(
        lb,
        &b.frame(types::SERVER_DELIVER, SRV, h.now.wall_ms, &old),
    );
    h.assert_silent();

    // Whatever ts a peer puts in the envelope, nothing overflows (debug builds panicked).
    for ts in [i64::MIN, i64::MAX] {
        h.send(lb, &b.frame(types::HEARTBEAT, SRV, ts, &json!({})));
        let odd = deliver_payload("alice", "bob", &bob, alice.public_key(), ts);
        h.send(lb, &b.frame(types::SERVER_DELIVER, SRV, ts, &odd));
        h.assert_silent();
    }
}

#[test]
fn a_replay_after_a_restart_is_refused_and_keys_are_remembered() {
    let dir = common::proc::TempDir::new("fed-restart");
    let path = dir.0.join("socp.db");
    let (alice, bob, mallory) = (test_key("user1"), test_key("user2"), test_key("user3"));
    let start = Time {
        mono_ms: MONO0,
        wall_ms: WALL0,
    };
    let mut h = harness_on(
        SRV,
        TestStore::Sqlite(Store::open(&path).unwrap()),
        start,
        |_| {},
    );
    let (ca, lb) = alice_and_bob_at_srv_b(&mut h, &alice, &bob);
    let ts = h.now.wall_ms;
    let p = deliver_payload("alice", "bob", &bob, alice.public_key(), ts);
    let dm = srv_b().frame(types::SERVER_DELIVER, SRV, ts, &p);
    h.send(lb, &dm);
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_DELIVER]);
    let stopped = h.now;
    drop(h);

    let later = Time {
        mono_ms: MONO0,
        wall_ms: stopped.wall_ms + 5_000,
    };
    let mut h = harness_on(
        SRV,
        TestStore::Sqlite(Store::open(&path).unwrap()),
        later,
        |_| {},
    );
    let (ca, lb) = alice_and_bob_at_srv_b(&mut h, &alice, &bob);
    // The frame delivered before the restart, replayed: still a duplicate.
    h.send(lb, &dm);
    h.assert_silent();
    // A new one gets through.
    let ts = h.now.wall_ms;
    let p = deliver_payload("alice", "bob", &bob, alice.public_key(), ts);
    h.send(lb, &srv_b().frame(types::SERVER_DELIVER, SRV, ts, &p));
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_DELIVER]);

    // bob leaves; the key first seen for him survived the restart: another key is refused.
    let b = srv_b();
    h.advance(10);
    let ts = h.now.wall_ms;
    let remove = json!({"user_id": "bob", "server_id": "srv-b", "ts": ts});
    h.send(lb, &b.frame(types::USER_REMOVE, "*", ts, &remove));
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_REMOVE]);
    h.advance(10);
    let ts = h.now.wall_ms;
    let swapped = entry_at("bob", "srv-b", &mallory, ts);
    h.send(lb, &b.frame(types::USER_ADVERTISE, "*", ts, &swapped));
    assert!(h.frames_to(ca).is_empty(), "the swapped key is not relayed");
    let err = h.frames_to(lb);
    assert_eq!(kinds(&err), [types::ERROR]);
    assert_eq!(err[0].payload["code"], "BAD_KEY");
    assert_eq!(h.list(ca, "alice"), ["alice"]);
}

#[test]
fn presence_is_ordered_by_its_signed_ts_and_replays_do_not_revive_a_user() {
    let mut h = harness();
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    let (ca, lb) = alice_and_bob_at_srv_b(&mut h, &alice, &bob);
    let b = srv_b();
    // alice_and_bob_at_srv_b advertised bob at this ts.
    let t1 = h.now.wall_ms;
    h.advance(1_000);
    let t2 = h.now.wall_ms;
    let remove = json!({"user_id": "bob", "server_id": "srv-b", "ts": t2});
    h.send(lb, &b.frame(types::USER_REMOVE, "*", t2, &remove));
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_REMOVE]);
    h.advance(1_000);

    // The old advert replayed in a fresh envelope: the same signed payload, a duplicate.
    let replay = b.frame(
        types::USER_ADVERTISE,
        "*",
        h.now.wall_ms,
        &entry_at("bob", "srv-b", &bob, t1),
    );
    h.send(lb, &replay);
    h.assert_silent();
    // Another advert signed before the remove: older than the newest applied, ignored.
    let stale = entry_at("bob", "srv-b", &bob, t1 + 500);
    h.send(
        lb,
        &b.frame(types::USER_ADVERTISE, "*", h.now.wall_ms, &stale),
    );
    h.assert_silent();
    assert_eq!(h.list(ca, "alice"), ["alice"]);
    // A newer one is applied.
    let fresh = entry_at("bob", "srv-b", &bob, h.now.wall_ms);
    h.send(
        lb,
        &b.frame(types::USER_ADVERTISE, "*", h.now.wall_ms, &fresh),
    );
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_ADVERTISE]);
}

#[test]
fn a_linked_server_can_neither_take_over_a_user_nor_change_its_key() {
    let mut h = harness_cfg(|cfg| cfg.bootstrap.push(spec("server3", 9003)));
    let (alice, bob, mallory) = (test_key("user1"), test_key("user2"), test_key("user3"));
    let (ca, lb) = alice_and_bob_at_srv_b(&mut h, &alice, &bob);
    let (b, c) = (srv_b(), srv_c());
    let lc = h.link_in(&c);
    h.clear();

    // srv-c claims bob, with its own key for him: refused while srv-b hosts him.
    h.advance(10);
    let ts = h.now.wall_ms;
    advertise_bob(&mut h, lc, &c, &mallory, ts);
    assert!(h.frames_to(ca).is_empty(), "alice is not told of the claim");
    let err = h.frames_to(lc);
    assert_eq!(kinds(&err), [types::ERROR]);
    assert_eq!(err[0].payload["code"], "NAME_IN_USE");
    assert_eq!(err[0].to, "srv-c");
    h.assert_silent();
    // srv-b itself cannot give bob another key either.
    advertise_bob(&mut h, lb, &b, &mallory, ts);
    assert!(h.frames_to(ca).is_empty());
    assert_eq!(h.frames_to(lb)[0].payload["code"], "BAD_KEY");
    h.assert_silent();

    // bob leaves srv-b. srv-c still cannot bring him back with another key...
    h.advance(10);
    let ts = h.now.wall_ms;
    let remove = json!({"user_id": "bob", "server_id": "srv-b", "ts": ts});
    h.send(lb, &b.frame(types::USER_REMOVE, "*", ts, &remove));
    assert_eq!(kinds(&h.frames_to(ca)), [types::USER_REMOVE]);
    h.clear(); // the remove, forwarded to srv-c
    advertise_bob(&mut h, lc, &c, &mallory, ts);
    assert!(h.frames_to(ca).is_empty());
    assert_eq!(h.frames_to(lc)[0].payload["code"], "BAD_KEY");
    // ...but may host him with his own.
    advertise_bob(&mut h, lc, &c, &bob, ts);
    let got = h.frames_to(ca);
    assert_eq!(kinds(&got), [types::USER_ADVERTISE]);
    assert_eq!(got[0].payload["server_id"], "srv-c");
    assert_eq!(got[0].payload["pubkey"], bob.public_key().encoded());
}

#[test]
fn welcome_clients_without_server_id_are_users_of_its_sender_after_every_start() {
    let dir = common::proc::TempDir::new("fed-welcome");
    let path = dir.0.join("socp.db");
    let (alice, bob) = (test_key("user1"), test_key("user2"));
    for restart in [false, true] {
        let start = Time {
            mono_ms: MONO0,
            wall_ms: WALL0 + if restart { 60_000 } else { 0 },
        };
        let mut h = harness_on(
            SRV,
            TestStore::Sqlite(Store::open(&path).unwrap()),
            start,
            |_| {},
        );
        let ca = h.user("alice", &alice);
        h.clear();
        let b = srv_b();
        let c = h.dial(0, 9002);
        // The deployed servers' form: {user_id, host, port, pubkey}, no server_id (§4.3).
        let deployed = json!({"user_id": "bob", "host": HOST, "port": 9002,
                              "pubkey": bob.public_key().encoded()});
        h.welcome(c, &b, json!([]), json!([deployed]));
        let got = h.frames_to(ca);
        assert_eq!(kinds(&got), [types::USER_ADVERTISE], "restart {restart}");
        assert_eq!(got[0].payload["server_id"], "srv-b");
        h.clear();

        // bob's DM in the standard's form: no payload.ts, the original ts in the envelope.
        let ts = h.now.wall_ms - 20;
        let mut p = deliver_payload("alice", "bob", &bob, alice.public_key(), ts);
        p.as_object_mut().unwrap().remove("ts");
        h.send(c, &b.frame(types::SERVER_DELIVER, SRV, ts, &p));
        let got = h.frames_to(ca);
        assert_eq!(kinds(&got), [types::USER_DELIVER], "{got:#?}");
        let f = &got[0].payload;
        assert_eq!(f["ts"], ts, "the envelope's ts is carried into the payload");
        assert!(crypto::verify_content_sig(
            bob.public_key(),
            f["content_sig"].as_str().unwrap(),
            f["ciphertext"].as_str().unwrap(),
            "bob",
            Some("alice"),
            ts,
        ));
        h.assert_silent();
    }
}

// -------------------------------------------------------------------- 11. peer-sig (§5.6)

#[test]
fn a_peer_sig_user_gets_other_servers_frames_unchanged_and_others_get_them_resigned() {
    let mut h = harness();
    let (alice, carol, bob) = (test_key("user1"), test_key("user3"), test_key("user2"));
    let ca = h.user_caps("alice", &alice, &["peer-sig", "some-future-cap"]);
    let cc = h.user("carol", &carol);
    h.clear();
    let b = srv_b();
    let lb = h.link_out(0, &b);
    // The new server's key reaches alice (only) before anything it signed: LIST_RESPONSE.servers.
    let to_alice = h.frames_to(ca);
    assert_eq!(kinds(&to_alice), [types::LIST_RESPONSE], "{to_alice:#?}");
    assert_eq!(
        to_alice[0].payload["servers"],
        json!([{"server_id": "srv-b", "pubkey": b.pub_b64()}])
    );
    assert!(h.frames_to(cc).is_empty(), "nothing for carol");
    h.clear();

    // bob's advert: alice gets srv-b's frame as it came, carol one srv-a signed.
    let ts = h.now.wall_ms;
    let advert = b.frame(
        types::USER_ADVERTISE,
        "*",
        ts,
        &entry_at("bob", "srv-b", &bob, ts),
    );
    h.send(lb, &advert);
    let got = h.sent_to(ca);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text, advert, "unchanged");
    let got = h.frames_to(cc);
    assert_eq!(kinds(&got), [types::USER_ADVERTISE]);
    assert_eq!(got[0].from, SRV);
    h.assert_silent();

    // A delivery to alice keeps srv-b's from and sig; only type and to change.
    let p = deliver_payload("alice", "bob", &bob, alice.public_key(), ts);
    h.send(lb, &b.frame(types::SERVER_DELIVER, SRV, ts, &p));
    let got = h.frames_to(ca);
    assert_eq!(kinds(&got), [types::USER_DELIVER]);
    assert_eq!(
        (got[0].from.as_str(), got[0].to.as_str()),
        ("srv-b", "alice")
    );
    assert_eq!(
        Value::Object(got[0].payload.clone()),
        p,
        "the payload srv-b signed"
    );
    // To carol, re-signed by srv-a without the server-to-server field.
    let p = deliver_payload("carol", "bob", &bob, carol.public_key(), ts + 1);
    h.send(lb, &b.frame(types::SERVER_DELIVER, SRV, ts + 1, &p));
    let got = h.frames_to(cc);
    assert_eq!(got[0].from, SRV);
    assert!(!got[0].payload.contains_key("user_id"));
    // A delivery without payload.ts (a server that re-signs, the standard's form): alice gets
    // it re-signed by srv-a, with the ts she needs for content_sig.
    let mut p = deliver_payload("alice", "bob", &bob, alice.public_key(), ts + 2);
    p.as_object_mut().unwrap().remove("ts");
    h.send(lb, &b.frame(types::SERVER_DELIVER, SRV, ts + 2, &p));
    let got = h.frames_to(ca);
    assert_eq!(
        (got[0].from.as_str(), &got[0].payload["ts"]),
        (SRV, &json!(ts + 2))
    );
    h.assert_silent();

    // carol leaves: bob's removal then costs srv-a no signature at all.
    h.input(Input::Closed { conn: cc });
    h.clear();
    h.advance(10);
    let ts = h.now.wall_ms;
    let remove = b.frame(
        types::USER_REMOVE,
        "*",
        ts,
        &json!({"user_id": "bob", "server_id": "srv-b", "ts": ts}),
    );
    h.send(lb, &remove);
    let got = h.sent_to(ca);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text, remove);
    h.assert_silent();
}

#[test]
fn a_relayed_frame_reaches_a_peer_sig_user_with_its_first_signature() {
    // srv-c is reached only through srv-b (a partial mesh).
    let mut h = harness_cfg(|cfg| cfg.mesh = false);
    let (alice, carol) = (test_key("user1"), test_key("user3"));
    let ca = h.user_caps("alice", &alice, &["peer-sig"]);
    let (b, c) = (srv_b(), srv_c());
    let lb = h.link_out(0, &b);
    h.clear();
    // srv-b relays srv-c's announce: srv-a pins srv-c and tells alice its key first.
    let announce = c.frame(
        types::SERVER_ANNOUNCE,
        "*",
        h.now.wall_ms,
        &c.hello_payload(),
    );
    h.send(lb, &announce);
    let got = h.frames_to(ca);
    assert_eq!(kinds(&got), [types::LIST_RESPONSE]);
    let servers = got[0].payload["servers"].as_array().unwrap().clone();
    assert!(servers.contains(&json!({"server_id": "srv-c", "pubkey": c.pub_b64()})));
    h.clear();
    let ts = h.now.wall_ms;
    h.send(
        lb,
        &c.frame(
            types::USER_ADVERTISE,
            "*",
            ts,
            &entry_at("carol", "srv-c", &carol, ts),
        ),
    );
    h.clear();
    let p = deliver_payload("alice", "carol", &carol, alice.public_key(), ts);
    let relayed = c.frame(types::SERVER_DELIVER, SRV, ts, &p);
    h.send(lb, &relayed);
    let got = h.frames_to(ca);
    assert_eq!(kinds(&got), [types::USER_DELIVER]);
    assert_eq!(got[0].from, "srv-c", "srv-c's signature, through srv-b");
    assert_eq!(Value::Object(got[0].payload.clone()), p);
}

// -------------------------------------------------------------------- 12. review fixes

#[test]
fn after_a_link_comes_back_our_users_are_advertised_afresh() {
    let mut h = harness();
    let alice = test_key("user1");
    h.user("alice", &alice);
    let b = srv_b();
    let adverts = |h: &mut CoreHarness, c: ConnId| -> Vec<Value> {
        h.frames_to(c)
            .into_iter()
            .filter(|f| f.kind == types::USER_ADVERTISE)
            .map(|f| Value::Object(f.payload))
            .collect()
    };
    let c = h.dial(0, 9002);
    h.welcome(c, &b, json!([]), json!([]));
    let first = adverts(&mut h, c);
    assert_eq!(first.len(), 1);
    h.clear();
    // The link drops and comes back within the peers' 5-minute seen-cache window: a re-sent
    // copy of the first advert would be a duplicate there, and alice would stay unseen.
    h.input(Input::Closed { conn: c });
    h.clear();
    h.advance(60_000);
    let c = h.dial(0, 9002);
    h.welcome(c, &b, json!([]), json!([]));
    let again = adverts(&mut h, c);
    assert_eq!(again.len(), 1);
    assert_ne!(again[0], first[0], "signed afresh");
    assert_eq!(again[0]["ts"], h.now.wall_ms);
}

#[test]
fn a_hello_here_cannot_take_the_id_of_a_user_the_mesh_knows_with_another_key() {
    let mut h = harness();
    let (alice, bob, mallory) = (test_key("user1"), test_key("user2"), test_key("user3"));
    let (_ca, lb) = alice_and_bob_at_srv_b(&mut h, &alice, &bob);
    let ts = h.now.wall_ms;
    let remove = json!({"user_id": "bob", "server_id": "srv-b", "ts": ts});
    h.send(lb, &srv_b().frame(types::USER_REMOVE, "*", ts, &remove));
    h.clear();
    // "bob" says hello here on a fresh connection with `key`: what does the server answer?
    let hello_as_bob = |h: &mut CoreHarness, key: &PrivateKey| -> Vec<Envelope> {
        let c = h.fresh_conn();
        h.input(opened(c));
        let payload = json!({"client": "t", "pubkey": key.public_key().encoded(), "meta": {}});
        h.send(
            c,
            &user_frame_at(types::USER_HELLO, "bob", "", h.now.wall_ms, &payload, None),
        );
        let got = h.frames_to(c);
        h.clear();
        got
    };
    // With another key: refused, as a rebinding would be.
    let got = hello_as_bob(&mut h, &mallory);
    assert_eq!(kinds(&got), [types::ERROR], "{got:#?}");
    assert_eq!(got[0].payload["code"], "BAD_KEY");
    // With bob's own key, he may come here.
    assert_eq!(kinds(&hello_as_bob(&mut h, &bob)), [types::AUTH_CHALLENGE]);
}
