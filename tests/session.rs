//! The client's protocol session (`socp::client::Session`) fed frames by hand, as a server —
//! honest or not — would send them (no sockets): what the client shows and what it refuses.

mod common;

use common::keys::test_key;
use common::proc::TempDir;
use serde_json::{Value, json};
use socp::client::{Identity, Pins, Session};
use socp::crypto::{self, PrivateKey};
use socp::wire::{Envelope, SignedPayload, encode_frame, types};

const SRV: &str = "srv-a";
const TS: i64 = 1_800_000_000_000;

/// A session for alice (user1) whose pins live in `dir`, past its hello, with `others` in the
/// directory snapshot.
fn alice_with(dir: &TempDir, others: &[(&str, &PrivateKey)]) -> Session {
    let mut users = vec![entry("alice", &test_key("user1"))];
    users.extend(others.iter().map(|(id, key)| entry(id, key)));
    alice_after(dir, &json!({"users": users, "version": 1}))
}

/// A fresh session for alice (user1), pins in `dir`.
fn alice(dir: &TempDir) -> Session {
    let me = Identity {
        user_id: "alice".into(),
        display_name: "alice".into(),
        key: test_key("user1").into(),
    };
    Session::new(me, "ws://test", Pins::load(&dir.0.join("server-pins.json")))
}

/// [`alice`] past its hello, with the snapshot `list` (a `LIST_RESPONSE` payload).
fn alice_after(dir: &TempDir, list: &Value) -> Session {
    let mut s = alice(dir);
    s.hello(TS);
    let challenge = json!({"nonce": "bm9uY2U", "server_id": SRV,
                           "server_pubkey": test_key("server1").public_key().encoded()});
    s.on_frame(&server_frame(types::AUTH_CHALLENGE, &challenge), TS);
    s.on_frame(
        &server_frame(
            types::USER_HELLO_ACK,
            &json!({"user_id": "alice", "server_id": SRV}),
        ),
        TS,
    );
    s.on_frame(&server_frame(types::LIST_RESPONSE, list), TS);
    assert!(s.ready());
    s.outbox.clear();
    shown(&mut s);
    s
}

fn entry(user_id: &str, key: &PrivateKey) -> Value {
    json!({"user_id": user_id, "server_id": SRV, "pubkey": key.public_key().encoded(),
           "meta": {"display_name": user_id}})
}

/// A frame from the server, signed with its key (server1).
fn server_frame(kind: &str, payload: &Value) -> String {
    let signed = SignedPayload::sign(payload, &test_key("server1")).unwrap();
    encode_frame(kind, SRV, "alice", TS, &signed)
}

/// A DM from `from` to alice, signed with `key`, as the server delivers it.
fn dm_from(from: &str, key: &PrivateKey, text: &str, ts: i64) -> String {
    let raw = test_key("user1")
        .public_key()
        .encrypt(text.as_bytes())
        .unwrap();
    let payload = json!({
        "ciphertext": socp::wire::b64::encode(&raw),
        "sender": from,
        "sender_pub": key.public_key().encoded(),
        "content_sig": crypto::make_content_sig(key, &raw, from, Some("alice"), ts),
        "ts": ts,
    });
    server_frame(types::USER_DELIVER, &payload)
}

/// The events so far, as the human lines the client prints.
fn shown(s: &mut Session) -> Vec<String> {
    s.events.drain(..).map(|e| e.human("alice")).collect()
}

fn sent_kinds(s: &mut Session) -> Vec<String> {
    s.outbox
        .drain(..)
        .map(|f| Envelope::parse(&f).unwrap().kind)
        .collect()
}

#[test]
fn a_changed_user_key_is_a_loud_warning_and_blocks_both_ways_until_trusted() {
    let dir = TempDir::new("session-pins");
    let (bob, mallory) = (test_key("user2"), test_key("user3"));
    let mut s = alice_with(&dir, &[("bob", &bob)]);
    s.command("/tell bob hi", TS);
    assert_eq!(sent_kinds(&mut s), [types::MSG_DIRECT]);

    // The server now says bob has another key.
    s.on_frame(
        &server_frame(types::USER_ADVERTISE, &entry("bob", &mallory)),
        TS,
    );
    let warned = shown(&mut s).join("\n");
    assert!(
        warned.contains("THE KEY OF bob (bob) HAS CHANGED"),
        "{warned}"
    );
    assert!(warned.contains("/trust bob"), "{warned}");

    // Nothing goes to bob, and a message signed with the new key is not authentic.
    s.command("/tell bob are you there", TS);
    assert!(
        s.outbox.is_empty(),
        "nothing is sent to a user whose key changed"
    );
    assert!(shown(&mut s).join("\n").contains("not sent"));
    s.command("/all hello", TS);
    assert!(s.outbox.is_empty(), "nor any /all copy");
    shown(&mut s);
    s.on_frame(&dm_from("bob", &mallory, "it is me", TS + 1), TS);
    let got = shown(&mut s);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("[dm] bob (NOT AUTHENTIC: the key of bob changed"),
        "{got:?}"
    );

    // The pin survives a restart of the client: the new key is still not trusted.
    let mut s = alice_with(&dir, &[("bob", &mallory)]);
    // (alice_with drained the snapshot's events; the warning was among them.)
    s.command("/tell bob hi", TS);
    assert!(s.outbox.is_empty());
    shown(&mut s);

    // The person accepts the new key explicitly: then it is used, and pinned for good.
    s.command("/trust bob", TS);
    assert!(
        shown(&mut s)
            .join("\n")
            .contains("new key of bob (bob) is now trusted")
    );
    s.command("/tell bob hi", TS);
    assert_eq!(sent_kinds(&mut s), [types::MSG_DIRECT]);
    assert_eq!(shown(&mut s), ["* sent to bob"]);
    s.on_frame(&dm_from("bob", &mallory, "thanks", TS + 2), TS);
    assert_eq!(shown(&mut s), ["[dm] bob: thanks"]);
    let pins: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.0.join("user-pins.json")).unwrap())
            .unwrap();
    assert_eq!(pins["bob"], mallory.public_key().encoded());
}

#[test]
fn a_first_seen_key_is_pinned_without_a_warning() {
    let dir = TempDir::new("session-first");
    let bob = test_key("user2");
    let mut s = alice_with(&dir, &[]);
    s.on_frame(
        &server_frame(types::USER_ADVERTISE, &entry("bob", &bob)),
        TS,
    );
    assert_eq!(shown(&mut s), ["* bob is online (bob on srv-a)"]);
    s.on_frame(&dm_from("bob", &bob, "hello", TS + 1), TS);
    assert_eq!(shown(&mut s), ["[dm] bob: hello"]);
    s.command("/trust bob", TS);
    assert!(shown(&mut s).join("\n").contains("has not changed"));
}

/// A frame signed by another server (`from`, key `key`), as our server forwards it (§5.6).
fn frame_signed_by(kind: &str, from: &str, key: &PrivateKey, payload: &Value) -> String {
    let signed = SignedPayload::sign(payload, key).unwrap();
    encode_frame(kind, from, "alice", TS, &signed)
}

#[test]
fn frames_other_servers_signed_are_taken_only_from_servers_our_server_vouched_for() {
    let dir = TempDir::new("session-peer-sig");
    let mut s = alice(&dir);
    s.hello(TS);
    let hello = Envelope::parse(&s.outbox[0]).unwrap();
    assert_eq!(
        hello.payload["caps"],
        json!(["peer-sig"]),
        "§5.6: announced"
    );
    let (srv_b, srv_x, bob) = (test_key("server2"), test_key("server3"), test_key("user2"));
    let mut bob_entry = entry("bob", &bob);
    bob_entry["server_id"] = json!("srv-b");
    let list = json!({
        "servers": [{"server_id": "srv-b", "pubkey": srv_b.public_key().encoded()}],
        "users": [entry("alice", &test_key("user1")), bob_entry],
        "version": 1,
    });
    let mut s = alice_after(&dir, &list);

    // A delivery srv-b signed (its server-to-server payload, user_id included): authentic.
    let raw = test_key("user1")
        .public_key()
        .encrypt(b"via srv-b")
        .unwrap();
    let p = json!({
        "user_id": "alice",
        "ciphertext": socp::wire::b64::encode(&raw),
        "sender": "bob",
        "sender_pub": bob.public_key().encoded(),
        "content_sig": crypto::make_content_sig(&bob, &raw, "bob", Some("alice"), TS),
        "ts": TS,
    });
    s.on_frame(
        &frame_signed_by(types::USER_DELIVER, "srv-b", &srv_b, &p),
        TS,
    );
    assert_eq!(shown(&mut s), ["[dm] bob: via srv-b"]);

    // Signed by a server ours did not vouch for: refused, whatever its key says.
    s.on_frame(
        &frame_signed_by(types::USER_DELIVER, "srv-x", &srv_x, &p),
        TS,
    );
    let got = shown(&mut s).join("\n");
    assert!(got.contains("did not vouch"), "{got}");
    assert!(!got.contains("[dm]"), "{got}");
    // srv-b's name on srv-x's signature, or a payload altered on the way: refused.
    s.on_frame(
        &frame_signed_by(types::USER_DELIVER, "srv-b", &srv_x, &p),
        TS,
    );
    assert!(shown(&mut s).join("\n").contains("bad server signature"));
    let text = frame_signed_by(types::USER_DELIVER, "srv-b", &srv_b, &p);
    let altered = text.replace(
        &format!("\"ts\":{TS},\"user_id\""),
        &format!("\"ts\":{},\"user_id\"", TS + 1),
    );
    assert_ne!(altered, text);
    s.on_frame(&altered, TS);
    assert!(shown(&mut s).join("\n").contains("bad server signature"));
    // Only what a server forwards may carry another server's signature.
    let fake_list = json!({"users": [], "version": 9});
    s.on_frame(
        &frame_signed_by(types::LIST_RESPONSE, "srv-b", &srv_b, &fake_list),
        TS,
    );
    assert!(shown(&mut s).join("\n").contains("did not vouch"));
    s.outbox.clear();
    s.command("/tell bob still there?", TS);
    assert_eq!(
        sent_kinds(&mut s),
        [types::MSG_DIRECT],
        "the directory was not replaced"
    );
}

#[test]
fn what_another_server_signed_claims_only_what_that_server_may() {
    let dir = TempDir::new("session-claims");
    let (srv_b, bob, carol) = (test_key("server2"), test_key("user2"), test_key("user3"));
    let mut bob_entry = entry("bob", &bob);
    bob_entry["server_id"] = json!("srv-b");
    let list = json!({
        "servers": [{"server_id": "srv-b", "pubkey": srv_b.public_key().encoded()}],
        "users": [entry("alice", &test_key("user1")), bob_entry, entry("carol", &carol)],
        "version": 1,
    });
    let mut s = alice_after(&dir, &list);
    let raw = test_key("user1").public_key().encrypt(b"hi").unwrap();
    let delivery = |user_id: &str, sender: &str, key: &PrivateKey| {
        json!({
            "user_id": user_id,
            "ciphertext": socp::wire::b64::encode(&raw),
            "sender": sender,
            "sender_pub": key.public_key().encoded(),
            "content_sig": crypto::make_content_sig(key, &raw, sender, Some(user_id), TS),
            "ts": TS,
        })
    };
    // srv-b may not deliver to someone else, nor speak for carol (hosted by srv-a)...
    for p in [
        delivery("dave", "bob", &bob),
        delivery("alice", "carol", &carol),
    ] {
        s.on_frame(
            &frame_signed_by(types::USER_DELIVER, "srv-b", &srv_b, &p),
            TS,
        );
        let got = shown(&mut s).join("\n");
        assert!(got.contains("refused") && !got.contains("[dm]"), "{got}");
    }
    // ...nor announce or remove a user another server hosts.
    let mut carol_at_b = entry("carol", &carol);
    carol_at_b["server_id"] = json!("srv-a");
    s.on_frame(
        &frame_signed_by(types::USER_ADVERTISE, "srv-b", &srv_b, &carol_at_b),
        TS,
    );
    assert!(shown(&mut s).join("\n").contains("another server hosts"));
    // What it may say goes through.
    s.on_frame(
        &frame_signed_by(
            types::USER_DELIVER,
            "srv-b",
            &srv_b,
            &delivery("alice", "bob", &bob),
        ),
        TS,
    );
    assert_eq!(shown(&mut s), ["[dm] bob: hi"]);
}

#[test]
fn a_message_dated_far_from_our_clock_is_not_authentic() {
    let dir = TempDir::new("session-old");
    let bob = test_key("user2");
    let mut s = alice_with(&dir, &[("bob", &bob)]);
    let two_days = 2 * 24 * 3600 * 1000;
    s.on_frame(&dm_from("bob", &bob, "from the past", TS - two_days), TS);
    let got = shown(&mut s);
    assert!(
        got[0].contains("NOT AUTHENTIC: its time is more than a day"),
        "{got:?}"
    );
}

#[test]
fn a_file_under_way_is_refused_once_its_senders_key_changes() {
    let dir = TempDir::new("session-file-key");
    let (bob, mallory) = (test_key("user2"), test_key("user3"));
    let mut s = alice_with(&dir, &[("bob", &bob)]);
    s.downloads = dir.0.join("downloads");
    let data = b"twelve bytes";
    let start = json!({"file_id": "f1", "name": "a.txt", "size": data.len(), "mode": "dm",
                       "sha256": crypto::sha256_hex(data), "sender": "bob", "ts": TS});
    s.on_frame(&server_frame(types::FILE_START, &start), TS);
    assert!(shown(&mut s).join("\n").contains("receiving a.txt"));
    // bob's key changes; the next chunk, signed with the new key, is refused.
    s.on_frame(
        &server_frame(types::USER_ADVERTISE, &entry("bob", &mallory)),
        TS,
    );
    shown(&mut s);
    let raw = test_key("user1").public_key().encrypt(data).unwrap();
    let chunk = json!({"file_id": "f1", "index": 0, "ciphertext": socp::wire::b64::encode(&raw),
                       "content_sig": crypto::make_content_sig(&mallory, &raw, "bob", Some("alice"), TS),
                       "sender": "bob", "ts": TS});
    s.on_frame(&server_frame(types::FILE_CHUNK, &chunk), TS);
    let got = shown(&mut s).join("\n");
    assert!(
        got.contains("rejected") && got.contains("key of bob changed"),
        "{got}"
    );
    s.on_frame(
        &server_frame(
            types::FILE_END,
            &json!({"file_id": "f1", "sender": "bob", "ts": TS}),
        ),
        TS,
    );
    let got = shown(&mut s).join("\n");
    assert!(!got.contains("received file"), "{got}");
}

/// Alice (user1) starts sending `data` to bob (user2) through `maker`; returns the session and
/// the transfer's file id. Nothing is pumped yet.
fn sending(
    dir: &TempDir,
    data: &[u8],
    maker: Box<dyn socp::client::chunks::ChunkMaker>,
) -> (Session, String) {
    let bob = test_key("user2");
    let mut s = alice_with(dir, &[("bob", &bob)]);
    s.set_chunk_maker(maker);
    let path = dir.0.join("out.bin");
    std::fs::write(&path, data).unwrap();
    s.command(&format!("/file bob {}", path.display()), TS);
    let start: Value = serde_json::from_str(&s.outbox.remove(0)).unwrap();
    assert_eq!(start["type"], types::FILE_START);
    let file_id = start["payload"]["file_id"].as_str().unwrap().to_string();
    (s, file_id)
}

/// Deterministic bytes.
fn bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

/// Checks one `FILE_CHUNK` frame as bob would: its `content_sig` over (ciphertext, alice, bob,
/// the frame's `ts`) with alice's key; returns its index, `ts` and plaintext.
fn open_chunk(frame: &Value) -> (i64, i64, Vec<u8>) {
    assert_eq!(frame["type"], types::FILE_CHUNK, "{frame}");
    let p = &frame["payload"];
    let ts = frame["ts"].as_i64().unwrap();
    let ct = p["ciphertext"].as_str().unwrap();
    assert!(
        crypto::verify_content_sig(
            test_key("user1").public_key(),
            p["content_sig"].as_str().unwrap(),
            ct,
            "alice",
            Some("bob"),
            ts,
        ),
        "chunk {} has a bad content_sig",
        p["index"]
    );
    let raw = socp::wire::b64::decode(ct).unwrap();
    let plain = test_key("user2").decrypt(&raw).unwrap();
    (p["index"].as_i64().unwrap(), ts, plain)
}

/// The server's `ACK` of chunk `index` of `file_id`.
fn ack(file_id: &str, index: i64) -> String {
    server_frame(
        types::ACK,
        &json!({"msg_ref": format!("{file_id}:{index}")}),
    )
}

/// Waits (at most 20 s) until `done` holds.
fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !done() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    true
}

#[test]
fn chunks_prepared_out_of_order_on_threads_go_out_in_index_order_with_valid_signatures() {
    use socp::client::chunks::ThreadedMaker;
    let dir = TempDir::new("session-chunks-order");
    let data = bytes(446 * 150 + 17); // 151 chunks: more than two windows
    // Three workers that each sleep up to 3 ms before sealing: completions overtake each other.
    let maker = ThreadedMaker::start_with_jitter(3, None, 3000).unwrap();
    let probe = maker.probe();
    let (mut s, file_id) = sending(&dir, &data, Box::new(maker));
    let mut received = Vec::new();
    let mut next = 0;
    let mut now = TS;
    let mut ended = false;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ended {
        assert!(std::time::Instant::now() < deadline, "the file never ended");
        now += 1;
        if !s.pump(now) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for frame in std::mem::take(&mut s.outbox) {
            let frame: Value = serde_json::from_str(&frame).unwrap();
            if frame["type"] == types::FILE_END {
                assert_eq!(frame["payload"]["file_id"], file_id.as_str());
                ended = true;
                continue;
            }
            assert!(!ended, "a frame after FILE_END");
            let (index, ts, plain) = open_chunk(&frame);
            assert_eq!(index, next, "chunks out of order");
            assert!(
                ts <= now,
                "the frame's ts is the one signed, no later than sending"
            );
            next += 1;
            received.extend(plain);
            // The server acknowledges every 16th chunk.
            if index % 16 == 15 {
                s.on_frame(&ack(&file_id, index), now);
            }
        }
    }
    assert_eq!(next, 151);
    assert_eq!(received, data);
    assert!(
        probe.out_of_order() > 0,
        "the jittered workers never completed a chunk before a lower one"
    );
    assert!(probe.high_water() <= socp::core::transfer::WINDOW as usize);
    let got = shown(&mut s).join("\n");
    assert!(got.contains("out.bin"), "{got}");
    assert!(!s.sending_files());
    assert!(!probe.holds(&file_id), "the maker forgot the finished file");
}

#[test]
fn threads_prepare_no_more_than_the_window_ahead_and_sign_with_the_ts_they_send() {
    use socp::client::chunks::ThreadedMaker;
    use socp::core::transfer::WINDOW;
    let dir = TempDir::new("session-chunks-window");
    let data = bytes(446 * 300); // 300 chunks
    let maker = ThreadedMaker::start(2, None).unwrap();
    let probe = maker.probe();
    let (mut s, file_id) = sending(&dir, &data, Box::new(maker));
    // Nothing pumped: the workers fill the window, and stop there.
    assert!(wait_until(|| probe.ahead(&file_id) == WINDOW as usize));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(probe.ahead(&file_id), WINDOW as usize);
    assert!(s.can_pump());
    // Sent 5 s later: each frame carries the ts its chunk was signed with (the allowance's).
    let later = TS + 5_000;
    let mut sent = 0;
    while s.pump(later) {}
    for frame in std::mem::take(&mut s.outbox) {
        let (index, ts, _) = open_chunk(&serde_json::from_str(&frame).unwrap());
        assert_eq!(index, sent);
        assert_eq!(ts, TS, "chunk {index} was prepared at TS");
        sent += 1;
    }
    assert_eq!(sent, WINDOW, "exactly the window goes out without an ACK");
    assert!(!s.can_pump());
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        probe.ahead(&file_id),
        0,
        "nothing prepared beyond the window"
    );
    // An ACK of chunk 15 opens 16 more: those, and no more, are prepared, signed with its ts.
    let at_ack = TS + 6_000;
    s.on_frame(&ack(&file_id, 15), at_ack);
    assert!(wait_until(|| probe.ahead(&file_id) == 16));
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(probe.ahead(&file_id), 16);
    assert!(probe.high_water() <= WINDOW as usize);
    // Sent after more than a minute: signed again, with the time they are sent.
    let stale = at_ack + 120_000;
    while s.pump(stale) {}
    let frames = std::mem::take(&mut s.outbox);
    assert_eq!(frames.len(), 16);
    for frame in frames {
        let (index, ts, _) = open_chunk(&serde_json::from_str(&frame).unwrap());
        assert_eq!(index, sent);
        assert_eq!(ts, stale, "a stale chunk is signed again when sent");
        sent += 1;
    }
}

#[test]
fn quitting_mid_file_stops_and_joins_the_chunk_workers_promptly() {
    use socp::client::chunks::ThreadedMaker;
    let dir = TempDir::new("session-chunks-quit");
    let data = bytes(446 * 2000);
    let maker = ThreadedMaker::start_with_jitter(2, None, 2000).unwrap();
    let probe = maker.probe();
    let (mut s, file_id) = sending(&dir, &data, Box::new(maker));
    assert_eq!(probe.alive(), 2);
    // Some chunks go out; the workers are busy with the next ones.
    assert!(wait_until(|| {
        s.pump(TS);
        s.outbox.len() >= 20
    }));
    s.on_frame(&ack(&file_id, 15), TS);
    s.pump(TS);
    assert!(s.sending_files());
    assert_eq!(s.command("/quit", TS), socp::client::Outcome::Quit);
    let started = std::time::Instant::now();
    s.abandon_files();
    assert!(!s.sending_files());
    assert!(!probe.holds(&file_id), "the maker stops preparing the file");
    assert!(!s.can_pump() && !s.pump(TS));
    drop(s);
    let took = started.elapsed();
    assert_eq!(probe.alive(), 0, "a worker outlived the session");
    assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_s() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// Sends `data` from alice's session through `maker`, acknowledging like the server (every 16th
/// chunk), until `FILE_END`; returns the wall time taken and the CPU time of the session's thread.
fn time_sending(
    dir: &TempDir,
    data: &[u8],
    maker: Box<dyn socp::client::chunks::ChunkMaker>,
) -> (std::time::Duration, f64) {
    let (mut s, file_id) = sending(dir, data, maker);
    let started = std::time::Instant::now();
    let cpu = thread_cpu_s();
    let mut index = 0;
    loop {
        if !s.pump(TS) {
            // What the client's loop does is block until the maker's waker: sleep instead.
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        for frame in std::mem::take(&mut s.outbox) {
            if frame.contains(types::FILE_END) {
                return (started.elapsed(), thread_cpu_s() - cpu);
            }
            if index % 16 == 15 {
                s.on_frame(&ack(&file_id, index), TS);
            }
            index += 1;
        }
    }
}

/// Client-side throughput of `/file`: chunks made on the session's thread (inline) against
/// chunks made ahead by worker threads. Noisy on a shared machine: run it alone, e.g.
/// `cargo test --test session -- --ignored --nocapture chunk_throughput`.
#[test]
#[ignore = "a timing, not a check: run by hand"]
fn chunk_throughput_inline_vs_threaded() {
    use socp::client::chunks::{InlineMaker, ThreadedMaker};
    let dir = TempDir::new("session-chunks-timing");
    let data = bytes(446 * 1000);
    let spare = ThreadedMaker::spare_cores();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for round in 1..=3 {
        let (inline, inline_cpu) = time_sending(&dir, &data, Box::new(InlineMaker::default()));
        let mut line = format!(
            "round {round}: inline {:.0} ms (session thread CPU {:.0} ms)",
            inline.as_secs_f64() * 1e3,
            inline_cpu * 1e3
        );
        for workers in [spare, cores] {
            let maker = ThreadedMaker::start(workers, None).unwrap();
            let (threaded, cpu) = time_sending(&dir, &data, Box::new(maker));
            line += &format!(
                "; {workers} worker(s) {:.0} ms, inline/threaded {:.2} (session thread CPU {:.0} ms, {:.1}x less)",
                threaded.as_secs_f64() * 1e3,
                inline.as_secs_f64() / threaded.as_secs_f64(),
                cpu * 1e3,
                inline_cpu / cpu
            );
        }
        println!("{line}");
    }
}
