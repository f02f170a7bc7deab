//! Federation over loopback (PROTOCOL.md §4, §6, §7, §8): real `socp-server` processes pinned
//! to each other with `--bootstrap`, `socp` line clients on each, and fake servers that speak
//! signed server frames by hand with the fixture keys.
//!
//! Every process is stopped by `Drop`. Nothing sleeps for long: the tests wait for log lines
//! and client output, with the generous `WAIT` as the only deadline.

mod common;

use common::keys::test_key;
use common::proc::{Line, Raw, ServerProc, TempDir, WAIT, free_ports, now_ms};
use serde_json::{Value, json};
use socp::crypto::PrivateKey;
use socp::wire::{Envelope, SignedPayload, encode_frame};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

/// Fixture keys of servers A, B and C; their ids are `srv-server1` .. `srv-server3`.
const KEYS: [&str; 3] = ["server1", "server2", "server3"];
/// Quick redials: a restarted or late peer is found within about half a second.
const FAST: [&str; 2] = ["--backoff-max-ms", "500"];

fn sid(key_name: &str) -> String {
    format!("srv-{key_name}")
}

/// A `--bootstrap` value: the server at `port`, pinned to the fixture key `key_name`.
fn pin(key_name: &str, port: u16) -> String {
    format!(
        "ws://127.0.0.1:{port}#{}",
        test_key(key_name).public_key().encoded()
    )
}

fn start(key_name: &str, port: u16, flags: &[String]) -> ServerProc {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    ServerProc::start_on(key_name, port, &flags)
}

/// Flags of mesh server `i` (on `ports[i]`): quick redials, extra flags, every other pinned.
fn mesh_flags(i: usize, ports: &[u16], extra: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = FAST.iter().chain(extra).map(|s| s.to_string()).collect();
    for (j, &port) in ports.iter().enumerate() {
        if j != i {
            flags.push("--bootstrap".into());
            flags.push(pin(KEYS[j], port));
        }
    }
    flags
}

/// Waits until every server has logged a link with each of the others.
fn wait_full_mesh(servers: &[&ServerProc]) {
    for s in servers {
        let needles: Vec<String> = servers
            .iter()
            .filter(|o| o.server_id != s.server_id)
            .map(|o| format!("link up with server {}", o.server_id))
            .collect();
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        s.wait_logs(&needles);
    }
}

/// Starts A, B and C, each pinned to the others, in `order` (indices into `KEYS`), waiting
/// `delays_ms[k]` before the k-th start; returns them as [A, B, C] once the mesh is up.
fn start_mesh(order: [usize; 3], delays_ms: [u64; 3]) -> ([ServerProc; 3], Vec<u16>) {
    let ports = free_ports(3);
    let mut slots: [Option<ServerProc>; 3] = [None, None, None];
    for (k, &i) in order.iter().enumerate() {
        if delays_ms[k] > 0 {
            std::thread::sleep(Duration::from_millis(delays_ms[k]));
        }
        slots[i] = Some(start(KEYS[i], ports[i], &mesh_flags(i, &ports, &[])));
    }
    let [a, b, c] = slots.map(Option::unwrap);
    wait_full_mesh(&[&a, &b, &c]);
    ([a, b, c], ports)
}

fn full_mesh() -> ([ServerProc; 3], Vec<u16>) {
    start_mesh([0, 1, 2], [0, 0, 0])
}

// ------------------------------------------------------------------ line clients

/// Sends `/list` and returns the listed users as `"name@server"`.
fn list(user: &mut Line) -> Vec<String> {
    user.send("/list");
    let header = loop {
        let l = user.expect(" online:");
        if l.starts_with("* ") && l.ends_with(" online:") {
            break l;
        }
    };
    let n: usize = header[2..header.len() - " online:".len()]
        .parse()
        .unwrap_or_else(|_| panic!("bad /list header {header:?}"));
    (0..n)
        .map(|_| {
            // "  NAME ID on SERVER" (plus " (you)" for oneself)
            let entry = user.expect("");
            let words: Vec<&str> = entry.split_whitespace().collect();
            assert!(
                words.len() >= 4 && words[2] == "on",
                "bad /list entry {entry:?}"
            );
            format!("{}@{}", words[0], words[3])
        })
        .collect()
}

/// Polls `/list` until it shows exactly `want` (`"name@server"`), in any order.
fn wait_list(user: &mut Line, want: &[String]) {
    let mut want = want.to_vec();
    want.sort();
    let deadline = Instant::now() + WAIT;
    loop {
        let mut got = list(user);
        got.sort();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/list never became {want:?}; last {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn at(name: &str, key_name: &str) -> String {
    format!("{name}@{}", sid(key_name))
}

/// Waits until `user` has printed a line containing each of `needles`, in any order.
fn expect_all(user: &mut Line, needles: &[String]) {
    let deadline = Instant::now() + WAIT;
    while let Some(missing) = needles
        .iter()
        .find(|n| !user.seen.iter().any(|l| l.contains(n.as_str())))
    {
        assert!(
            Instant::now() < deadline,
            "never saw {missing:?}; saw {:#?}",
            user.seen
        );
        user.drain_for(Duration::from_millis(50));
    }
}

/// How many lines `user` has printed so far that contain `needle`.
fn count(user: &Line, needle: &str) -> usize {
    user.seen.iter().filter(|l| l.contains(needle)).count()
}

// ------------------------------------------------------------------ 1. start orders

/// Starts the mesh in `order`, then one user per server: each sees the two others in `/list`.
fn mesh_forms(order: [usize; 3], delays_ms: [u64; 3]) {
    let t0 = Instant::now();
    let (servers, _ports) = start_mesh(order, delays_ms);
    eprintln!("mesh {order:?} up after {:?}", t0.elapsed());
    let dir = TempDir::new("mesh-order");
    let names = ["ann", "ben", "cat"];
    let mut users: Vec<Line> = (0..3)
        .map(|i| {
            let key = format!("user{}", i + 1);
            Line::start(&servers[i], names[i], &key, &dir.0)
        })
        .collect();
    let want: Vec<String> = (0..3).map(|i| at(names[i], KEYS[i])).collect();
    for user in &mut users {
        wait_list(user, &want);
    }
}

#[test]
fn mesh_forms_when_started_a_b_c() {
    mesh_forms([0, 1, 2], [0, 0, 0]);
}

#[test]
fn mesh_forms_when_started_c_b_a() {
    mesh_forms([2, 1, 0], [0, 0, 0]);
}

#[test]
fn mesh_forms_when_started_b_a_then_c_later() {
    mesh_forms([1, 0, 2], [0, 0, 1500]);
}

#[test]
fn mesh_forms_in_a_random_order() {
    // MESH_SEED=<n> replays a run.
    let seed: u64 = std::env::var("MESH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mut rng = seed | 1;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut order = [0, 1, 2];
    for i in (1..3).rev() {
        order.swap(i, next(i as u64 + 1) as usize);
    }
    let delays = [0, next(1200), next(1200)];
    eprintln!(
        "mesh_forms_in_a_random_order: MESH_SEED={seed} order {order:?} delays {delays:?} ms"
    );
    mesh_forms(order, delays);
}

/// Users already online when a server joins the mesh are seen by its users, and see them.
#[test]
fn users_online_before_a_server_joins_are_seen_there() {
    let ports = free_ports(3);
    let a = start(KEYS[0], ports[0], &mesh_flags(0, &ports, &[]));
    let b = start(KEYS[1], ports[1], &mesh_flags(1, &ports, &[]));
    wait_full_mesh(&[&a, &b]);
    let dir = TempDir::new("mesh-late");
    let mut ann = Line::start(&a, "ann", "user1", &dir.0);
    let mut ben = Line::start(&b, "ben", "user2", &dir.0);
    ann.expect("* ben is online");

    let c = start(KEYS[2], ports[2], &mesh_flags(2, &ports, &[]));
    a.wait_log("link up with server srv-server3");
    b.wait_log("link up with server srv-server3");
    c.wait_logs(&[
        "link up with server srv-server1",
        "link up with server srv-server2",
    ]);
    let mut cat = Line::start(&c, "cat", "user3", &dir.0);
    ann.expect("* cat is online");
    ben.expect("* cat is online");
    let want: Vec<String> = ["ann", "ben", "cat"]
        .iter()
        .zip(KEYS)
        .map(|(name, key)| at(name, key))
        .collect();
    for user in [&mut ann, &mut ben, &mut cat] {
        wait_list(user, &want);
    }
    cat.send("/tell ann hello from the newcomer");
    ann.expect("[dm] cat: hello from the newcomer");
}

// ------------------------------------------------------------------ 2. chat across servers

/// alice on A and bob on B (logging in `first`, then the other); then carol on C and dave on A.
fn chat_across_servers(first: &str) {
    let ([a, b, c], _) = full_mesh();
    let dir = TempDir::new("mesh-chat");
    let second = if first == "alice" { "bob" } else { "alice" };
    let start_user = |name: &str| match name {
        "alice" => Line::start(&a, "alice", "user1", &dir.0),
        _ => Line::start(&b, "bob", "user2", &dir.0),
    };
    let mut one = start_user(first);
    let mut two = start_user(second);
    one.expect(&format!("* {second} is online"));

    // Both ways at once.
    one.send(&format!("/tell {second} hello from {first}"));
    two.send(&format!("/tell {first} hello from {second} é"));
    two.expect(&format!("[dm] {first}: hello from {first}"));
    one.expect(&format!("[dm] {second}: hello from {second} é"));
    let (mut alice, mut bob) = if first == "alice" {
        (one, two)
    } else {
        (two, one)
    };

    let mut carol = Line::start(&c, "carol", "user3", &dir.0);
    let mut dave = Line::start(&a, "dave", "user4", &dir.0);
    let everyone = [
        at("alice", "server1"),
        at("bob", "server2"),
        at("carol", "server3"),
        at("dave", "server1"),
    ];
    let names = ["alice", "bob", "carol", "dave"];
    let mut users = [&mut alice, &mut bob, &mut carol, &mut dave];
    for user in users.iter_mut() {
        wait_list(user, &everyone);
    }

    // /all from each reaches every other user exactly once, and never the sender.
    for (i, user) in users.iter_mut().enumerate() {
        user.send(&format!("/all hi from {}", names[i]));
    }
    for (i, user) in users.iter_mut().enumerate() {
        let others: Vec<String> = (names.iter().enumerate())
            .filter(|(j, _)| *j != i)
            .map(|(_, from)| format!("[all] {from}: hi from {from}"))
            .collect();
        expect_all(user, &others);
    }
    for (i, user) in users.iter_mut().enumerate() {
        user.drain_for(Duration::from_millis(500));
        for (j, from) in names.iter().enumerate() {
            let n = count(user, &format!("[all] {from}: hi from {from}"));
            let want = usize::from(i != j);
            assert_eq!(
                n, want,
                "{} got {from}'s /all {n} times: {:#?}",
                names[i], user.seen
            );
        }
        assert!(
            !user
                .seen
                .iter()
                .any(|l| l.contains("NOT AUTHENTIC") || l.starts_with("! ")),
            "{}: {:#?}",
            names[i],
            user.seen
        );
        // /list is complete on every server.
        let mut got = list(user);
        got.sort();
        let mut want = everyone.to_vec();
        want.sort();
        assert_eq!(got, want, "{}'s /list", names[i]);
    }
}

#[test]
fn chat_across_servers_alice_first() {
    chat_across_servers("alice");
}

#[test]
fn chat_across_servers_bob_first() {
    chat_across_servers("bob");
}

// ------------------------------------------------------------------ 3. kill -9 and restart

#[test]
fn a_killed_server_comes_back_with_its_links_and_users() {
    let ([a, mut b, c], ports) = full_mesh();
    let dir = TempDir::new("mesh-kill");
    let mut alice = Line::start(&a, "alice", "user1", &dir.0);
    let mut bob = Line::start(&b, "bob", "user2", &dir.0);
    let mut carol = Line::start(&c, "carol", "user3", &dir.0);
    // A raw user on A, to see the server's own answer to a DM for bob (the line client
    // refuses by itself once bob is gone from its directory).
    let mut raw = Raw::hello(&a, "raw-ann", &test_key("user5"));
    let everyone = [
        at("alice", "server1"),
        at("bob", "server2"),
        at("carol", "server3"),
        at("raw-ann", "server1"),
    ];
    for user in [&mut alice, &mut bob, &mut carol] {
        wait_list(user, &everyone);
    }
    alice.send("/tell bob before the crash");
    bob.expect("[dm] alice: before the crash");

    // kill -9 while users chat.
    carol.send("/all racing the crash");
    bob.send("/tell alice racing the crash too");
    b.kill9();
    for s in [&a, &c] {
        s.wait_log("link to server srv-server2 down");
    }
    alice.expect("* bob went offline (id-bob)");
    carol.expect("* bob went offline (id-bob)");

    // While B is down: a DM to bob is refused out loud, not swallowed.
    alice.send("/tell bob are you there");
    let refusal = alice.expect("! ");
    assert!(
        refusal.contains("no user bob is online") || refusal.contains("USER_NOT_FOUND"),
        "{refusal}"
    );
    send_raw_dm(&mut raw, &test_key("user5"), "id-bob", "user2");
    let (code, detail) = link_error(&mut raw);
    assert_eq!(code, "USER_NOT_FOUND", "{detail}");
    // The rest of the mesh keeps working.
    alice.send("/tell carol B is gone");
    carol.expect("[dm] alice: B is gone");

    // Same port, same data directory: the links come back.
    let b_flags = mesh_flags(1, &ports, &[]);
    let b_refs: Vec<&str> = b_flags.iter().map(String::as_str).collect();
    let b = b.restart_same_port(&b_refs);
    a.wait_log("link up with server srv-server2");
    c.wait_log("link up with server srv-server2");
    b.wait_logs(&[
        "link up with server srv-server1",
        "link up with server srv-server3",
    ]);

    // And presence with them.
    drop(bob);
    let mut bob = Line::start(&b, "bob", "user2", &dir.0);
    alice.expect("* bob is online");
    carol.expect("* bob is online");
    for user in [&mut alice, &mut bob, &mut carol] {
        wait_list(user, &everyone);
    }
    alice.send("/tell bob welcome back");
    bob.expect("[dm] alice: welcome back");
    bob.send("/tell carol hello again");
    carol.expect("[dm] bob: hello again");
}

/// Sends a `MSG_DIRECT` from `raw` (key `key`) to user `to` (fixture key `to_key`).
fn send_raw_dm(raw: &mut Raw, key: &PrivateKey, to: &str, to_key: &str) {
    let ct = test_key(to_key)
        .public_key()
        .encrypt(b"are you there")
        .unwrap();
    let ciphertext = socp::wire::b64::encode(&ct);
    let ts = now_ms();
    let content_sig = socp::crypto::make_content_sig(key, &ct, &raw.user_id, Some(to), ts);
    let payload = json!({"ciphertext": ciphertext, "sender_pub": key.public_key().encoded(),
                         "content_sig": content_sig});
    let signed = SignedPayload::unsigned(&payload).unwrap();
    raw.send_text(&encode_frame("MSG_DIRECT", &raw.user_id, to, ts, &signed));
}

// ------------------------------------------------------------------ 4. partial mesh

/// A and C each bootstrap only B and run with `--no-mesh`; B bootstraps both. With
/// `c_before_a`, A starts only once the B–C link is up and carol is online on C; otherwise
/// all three start at once.
fn partial_mesh(c_before_a: bool) {
    let ports = free_ports(3);
    let (pa, pb, pc) = (ports[0], ports[1], ports[2]);
    let flags = |extra: &[&str], peers: &[(&str, u16)]| {
        let mut f: Vec<String> = FAST.iter().chain(extra).map(|s| s.to_string()).collect();
        for (key, port) in peers {
            f.push("--bootstrap".into());
            f.push(pin(key, *port));
        }
        f
    };
    let start_a = || start("server1", pa, &flags(&["--no-mesh"], &[("server2", pb)]));
    let early_a = (!c_before_a).then(start_a);
    let b = start(
        "server2",
        pb,
        &flags(&[], &[("server1", pa), ("server3", pc)]),
    );
    let c = start("server3", pc, &flags(&["--no-mesh"], &[("server2", pb)]));
    c.wait_log("link up with server srv-server2");
    let dir = TempDir::new("mesh-partial");
    let mut carol_early = None;
    let a = match early_a {
        Some(a) => {
            b.wait_logs(&[
                "link up with server srv-server1",
                "link up with server srv-server3",
            ]);
            a
        }
        None => {
            b.wait_log("link up with server srv-server3");
            // carol is online before A joins: A learns her from B's SERVER_WELCOME.
            carol_early = Some(Line::start(&c, "carol", "user3", &dir.0));
            let a = start_a();
            b.wait_log("link up with server srv-server1");
            a
        }
    };
    a.wait_log("link up with server srv-server2");

    let mut alice = Line::start(&a, "alice", "user1", &dir.0);
    let mut carol = carol_early.unwrap_or_else(|| Line::start(&c, "carol", "user3", &dir.0));
    let both = [at("alice", "server1"), at("carol", "server3")];
    wait_list(&mut alice, &both);
    wait_list(&mut carol, &both);

    alice.send("/tell carol through the middle");
    carol.expect("[dm] alice: through the middle");
    // It went through B (A has no link to C).
    b.wait_log("SERVER_DELIVER from \"srv-server1\"");

    carol.send("/all to everyone from C");
    alice.expect("[all] carol: to everyone from C");
    b.wait_log("MSG_PUBLIC_CHANNEL from \"srv-server3\"");
    for user in [&alice, &carol] {
        assert!(
            !user
                .seen
                .iter()
                .any(|l| l.contains("NOT AUTHENTIC") || l.starts_with("! ")),
            "{:#?}",
            user.seen
        );
    }
}

#[test]
fn partial_mesh_relays_through_the_middle() {
    partial_mesh(true);
}

#[test]
fn partial_mesh_relays_through_the_middle_whatever_the_start_order() {
    partial_mesh(false);
}

// ------------------------------------------------------------------ 5. security

/// A frame from a (fake) server: signed with `key`, `ts` now.
fn server_frame(kind: &str, from: &str, to: &str, payload: &Value, key: &PrivateKey) -> String {
    let signed = SignedPayload::sign(payload, key).unwrap();
    encode_frame(kind, from, to, now_ms(), &signed)
}

fn hello_payload(port: u16, key: &PrivateKey) -> Value {
    json!({"host": "127.0.0.1", "port": port, "pubkey": key.public_key().encoded()})
}

/// `USER_ADVERTISE` payload for user `user_id` (fixture key `user_key`) hosted by `server_id`.
fn advert(user_id: &str, server_id: &str, user_key: &str) -> Value {
    json!({"user_id": user_id, "server_id": server_id,
           "pubkey": test_key(user_key).public_key().encoded(),
           "meta": {"display_name": user_id}})
}

/// Connects to `server` and opens a link as `srv-server4` with `SERVER_HELLO_LINK`, signed
/// with the server4 fixture key (pinned there through a `--bootstrap` to `listed_port`).
fn link_as_server4(server: &ServerProc, listed_port: u16) -> Raw {
    let key = test_key("server4");
    let mut raw = Raw::connect(server);
    raw.user_id = "srv-server4".into();
    raw.send_text(&server_frame(
        "SERVER_HELLO_LINK",
        "srv-server4",
        &server.server_id,
        &hello_payload(listed_port, &key),
        &key,
    ));
    server.wait_log("link up with server srv-server4");
    raw
}

/// The next `USER_ADVERTISE` or `USER_REMOVE` a user receives.
fn next_presence(user: &mut Raw) -> Envelope {
    loop {
        let env = user.recv();
        if env.kind == "USER_ADVERTISE" || env.kind == "USER_REMOVE" {
            return env;
        }
    }
}

fn expect_presence(user: &mut Raw, kind: &str, user_id: &str) {
    let env = next_presence(user);
    assert_eq!(
        (env.kind.as_str(), env.payload["user_id"].as_str()),
        (kind, Some(user_id)),
        "{env:?}"
    );
}

/// The next `ERROR` on a link or user connection; returns `(code, detail)`.
fn link_error(link: &mut Raw) -> (String, String) {
    let e = link.recv_kind("ERROR");
    let s = |k: &str| e.payload[k].as_str().unwrap_or_default().to_string();
    (s("code"), s("detail"))
}

/// A server that must not become linked: A pins server4's key for B's address.
#[test]
fn a_peer_whose_key_does_not_match_its_pin_is_refused() {
    let ports = free_ports(2);
    let (pa, pb) = (ports[0], ports[1]);
    let fast: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    // A pins B correctly (so it accepts B's hello and answers with a welcome); B pins the
    // wrong key (server4's) for A's address.
    let a = start(
        "server1",
        pa,
        &[fast.clone(), vec!["--bootstrap".into(), pin("server2", pb)]].concat(),
    );
    let b = start(
        "server2",
        pb,
        &[fast, vec!["--bootstrap".into(), pin("server4", pa)]].concat(),
    );
    b.wait_logs_without(
        &[
            // B's own dial: A's welcome is signed with a key other than the pinned one.
            &format!(
                "SERVER_WELCOME from ws://127.0.0.1:{pa} refused: \
                 signature does not verify against the pinned key"
            ),
            // A's dial: A's key is not pinned at B.
            "SERVER_HELLO_JOIN refused: server key not pinned here",
            // And B keeps trying, truthfully reporting failure.
            &format!("dial to peer ws://127.0.0.1:{pa} failed (attempt 2)"),
        ],
        &["link up with server"],
    );
    a.wait_logs(&["peer refused our hello: server key not pinned here"]);
}

/// An impostor with another key under the id of a server A has linked with before.
#[test]
fn an_impostor_under_a_known_server_id_is_refused() {
    let ports = free_ports(2);
    let (pa, pb) = (ports[0], ports[1]);
    let fast: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    let a = start(
        "server1",
        pa,
        &[fast.clone(), vec!["--bootstrap".into(), pin("server2", pb)]].concat(),
    );
    let b_flags: Vec<String> = [fast, vec!["--bootstrap".into(), pin("server1", pa)]].concat();
    let mut b = start("server2", pb, &b_flags);
    a.wait_log("link up with server srv-server2");
    b.kill9();
    a.wait_log("link to server srv-server2 down");
    // Let A see B's port closed before the impostor takes it: a hello B sent just before it
    // died may still be in A's socket buffer, and is legitimately B's.
    a.wait_log(&format!(
        "dial to peer srv-server2 (ws://127.0.0.1:{pb}) failed"
    ));

    // server4's key, calling itself srv-server2, on B's port; it pins A correctly.
    let b_refs: Vec<&str> = b_flags.iter().map(String::as_str).collect();
    let impostor = ServerProc::start_on_as("server4", "srv-server2", pb, &b_refs);
    a.wait_logs_without(
        &[
            // A redials B's address: the welcome is not signed by B's pinned key.
            &format!(
                "SERVER_WELCOME from ws://127.0.0.1:{pb} refused: \
                 signature does not verify against the pinned key"
            ),
            // The impostor dials A: srv-server2 is pinned to another key.
            "SERVER_HELLO_JOIN refused: key does not match the one pinned for this server id",
            &format!("dial to peer srv-server2 (ws://127.0.0.1:{pb}) failed"),
        ],
        &["link up with server srv-server2"],
    );
    drop(impostor);

    // The real B, back on its port, is welcome again.
    let b = b.restart_same_port(&b_refs);
    a.wait_log("link up with server srv-server2");
    b.wait_log("link up with server srv-server1");
}

/// A started with server4 pinned (through a bootstrap entry for a port nobody listens on), a
/// watching user, and a fake srv-server4 linked with `SERVER_HELLO_LINK`.
fn a_with_fake_server4(extra: &[&str]) -> (ServerProc, Raw, Raw) {
    let ports = free_ports(2);
    let (pa, unused) = (ports[0], ports[1]);
    let mut flags: Vec<String> = FAST.iter().chain(extra).map(|s| s.to_string()).collect();
    flags.push("--bootstrap".into());
    flags.push(pin("server4", unused));
    let a = start("server1", pa, &flags);
    let watcher = Raw::hello(&a, "watcher", &test_key("user1"));
    let link = link_as_server4(&a, unused);
    (a, watcher, link)
}

#[test]
fn user_advertise_with_a_bad_signature_or_a_foreign_server_id_is_dropped() {
    let (a, mut watcher, mut link) = a_with_fake_server4(&[]);
    let s3 = test_key("server3");
    let s4 = test_key("server4");
    let to = "*";

    // Signed with another key than server4's pinned one.
    link.send_text(&server_frame(
        "USER_ADVERTISE",
        "srv-server4",
        to,
        &advert("forged-sig", "srv-server4", "user5"),
        &s3,
    ));
    let (code, detail) = link_error(&mut link);
    assert_eq!(code, "INVALID_SIG", "{detail}");

    // Correctly signed by server4, but claiming a user of another server.
    link.send_text(&server_frame(
        "USER_ADVERTISE",
        "srv-server4",
        to,
        &advert("foreign-host", "srv-server3", "user6"),
        &s4,
    ));
    let (code, detail) = link_error(&mut link);
    assert_eq!(code, "INVALID_SIG", "{detail}");
    assert!(detail.contains("server_id"), "{detail}");

    // From a server that is not pinned at all, over server4's link.
    link.send_text(&server_frame(
        "USER_ADVERTISE",
        "srv-server3",
        to,
        &advert("unpinned-host", "srv-server3", "user7"),
        &s3,
    ));
    let (code, detail) = link_error(&mut link);
    assert_eq!(code, "INVALID_SIG", "{detail}");

    // The channel works: a correct advertise is relayed to the user, and is the first one.
    link.send_text(&server_frame(
        "USER_ADVERTISE",
        "srv-server4",
        to,
        &advert("genuine", "srv-server4", "user8"),
        &s4,
    ));
    expect_presence(&mut watcher, "USER_ADVERTISE", "genuine");
    let mut users = watcher.list(&a);
    users.sort();
    assert_eq!(users, ["genuine", "watcher"]);
}

#[test]
fn replayed_presence_frames_are_dropped() {
    let (a, mut watcher, mut link) = a_with_fake_server4(&[]);
    let s4 = test_key("server4");
    let frame = |kind: &str, payload: &Value| server_frame(kind, "srv-server4", "*", payload, &s4);
    let remove = json!({"user_id": "rex", "server_id": "srv-server4"});

    let advertise_rex = frame("USER_ADVERTISE", &advert("rex", "srv-server4", "user5"));
    link.send_text(&advertise_rex);
    expect_presence(&mut watcher, "USER_ADVERTISE", "rex");
    link.send_text(&advertise_rex); // an exact duplicate
    let remove_rex = frame("USER_REMOVE", &remove);
    link.send_text(&remove_rex);
    expect_presence(&mut watcher, "USER_REMOVE", "rex");

    // Replaying the old advertise must not bring rex back.
    link.send_text(&advertise_rex);
    link.send_text(&frame(
        "USER_ADVERTISE",
        &advert("sync1", "srv-server4", "user6"),
    ));
    expect_presence(&mut watcher, "USER_ADVERTISE", "sync1");
    let mut users = watcher.list(&a);
    users.sort();
    assert_eq!(users, ["sync1", "watcher"]);

    // rex really comes back (a fresh frame); replaying the old remove must not take him away.
    std::thread::sleep(Duration::from_millis(2)); // a distinct ts
    link.send_text(&frame(
        "USER_ADVERTISE",
        &advert("rex", "srv-server4", "user5"),
    ));
    expect_presence(&mut watcher, "USER_ADVERTISE", "rex");
    link.send_text(&remove_rex);
    link.send_text(&frame(
        "USER_ADVERTISE",
        &advert("sync2", "srv-server4", "user7"),
    ));
    expect_presence(&mut watcher, "USER_ADVERTISE", "sync2");
    let mut users = watcher.list(&a);
    users.sort();
    assert_eq!(users, ["rex", "sync1", "sync2", "watcher"]);

    // None of this was answered with an error: duplicates are dropped silently (§6).
    link.ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    loop {
        match link.ws.read() {
            Ok(Message::Text(t)) => {
                let env = Envelope::parse(&t).unwrap();
                assert_ne!(env.kind, "ERROR", "{env:?}");
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

/// Accepts one WebSocket connection on `listener` (a fake server being dialled).
fn accept_ws(listener: &TcpListener) -> WebSocket<TcpStream> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(WAIT)).unwrap();
                return tungstenite::accept(stream).expect("WebSocket handshake");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "nobody dialled the fake server");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn read_env(ws: &mut WebSocket<TcpStream>) -> Envelope {
    loop {
        match ws.read().expect("read frame") {
            Message::Text(t) => return Envelope::parse(&t).expect("frame parses"),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

/// Reads until the peer closes; returns the close code.
fn close_code(ws: &mut WebSocket<TcpStream>) -> u16 {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return f.code.into(),
            Ok(Message::Close(None)) => return 1005,
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

fn silent_ms(line: &str) -> u64 {
    line.split("silent for ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {line:?}"))
}

/// A dials a fake srv-server4, which answers the welcome and then says nothing.
#[test]
fn a_silent_peer_we_dialled_is_declared_dead_and_redialled() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_port = listener.local_addr().unwrap().port();
    let pa = free_ports(1)[0];
    let s4 = test_key("server4");
    let flags: Vec<String> = FAST
        .iter()
        .chain(&["--heartbeat-ms", "200", "--dead-after-ms", "600"])
        .map(|s| s.to_string())
        .chain(["--bootstrap".to_string(), pin("server4", fake_port)])
        .collect();
    let a = start("server1", pa, &flags);

    let mut first = accept_ws(&listener);
    let join = read_env(&mut first);
    assert_eq!(join.kind, "SERVER_HELLO_JOIN");
    assert_eq!(join.from, "srv-server1");
    assert_eq!(join.to, format!("127.0.0.1:{fake_port}"));
    assert!(
        socp::wire::verify_payload_sig(test_key("server1").public_key(), &join.payload, &join.sig)
            .unwrap()
    );
    let welcome = json!({"assigned_id": "srv-server1", "servers": [], "clients": []});
    let text = server_frame(
        "SERVER_WELCOME",
        "srv-server4",
        "srv-server1",
        &welcome,
        &s4,
    );
    first.send(Message::Text(text.into())).unwrap();
    a.wait_log(&format!(
        "link up with server srv-server4 at ws://127.0.0.1:{fake_port} (dialled by us)"
    ));
    let linked = Instant::now();

    // Nothing more from the fake: dead after ~600 ms, not 45 s.
    let dead = a.wait_log("link to server srv-server4 silent for");
    assert!(dead.contains("declaring it dead"), "{dead}");
    assert!(silent_ms(&dead) >= 600, "{dead}");
    a.wait_log("link to server srv-server4 down");
    assert_eq!(close_code(&mut first), 1001);

    // And redialled: a fresh SERVER_HELLO_JOIN reaches the fake.
    let mut second = accept_ws(&listener);
    let join = read_env(&mut second);
    assert_eq!(join.kind, "SERVER_HELLO_JOIN");
    let took = linked.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "dead and redialled after {took:?}"
    );
}

/// A fake srv-server4 dials A with `SERVER_HELLO_LINK` and then says nothing.
#[test]
fn a_silent_peer_that_dialled_us_is_declared_dead() {
    let ports = free_ports(2);
    let (pa, unused) = (ports[0], ports[1]);
    let flags: Vec<String> = FAST
        .iter()
        .chain(&["--heartbeat-ms", "200", "--dead-after-ms", "600"])
        .map(|s| s.to_string())
        .chain(["--bootstrap".to_string(), pin("server4", unused)])
        .collect();
    let a = start("server1", pa, &flags);
    let mut watcher = Raw::hello(&a, "watcher", &test_key("user1"));
    let mut link = link_as_server4(&a, unused);
    let s4 = test_key("server4");
    link.send_text(&server_frame(
        "USER_ADVERTISE",
        "srv-server4",
        "*",
        &advert("ghost", "srv-server4", "user5"),
        &s4,
    ));
    expect_presence(&mut watcher, "USER_ADVERTISE", "ghost");

    let dead = a.wait_log("link to server srv-server4 silent for");
    assert!(dead.contains("declaring it dead"), "{dead}");
    assert!(silent_ms(&dead) >= 600, "{dead}");
    a.wait_log("link to server srv-server4 down");
    // Its users go offline with it (§7), and A redials the address it was given.
    expect_presence(&mut watcher, "USER_REMOVE", "ghost");
    a.wait_logs(&[
        &format!("dialling peer srv-server4 (ws://127.0.0.1:{unused}) (attempt 1)"),
        &format!("dial to peer srv-server4 (ws://127.0.0.1:{unused}) failed (attempt 1)"),
    ]);
    assert_eq!(link.expect_close(), 1001);
}
