//! Backpressure at the edges (issue "trust at the edges", item 1): a user who stops reading
//! slows down only whoever sends frames to it point to point (README "Backpressure between
//! hops"); a broadcast to it is queued, and nobody who merely caused a broadcast waits for it.

mod common;

use common::keys::test_key;
use common::proc::{Raw, ServerProc, WAIT, frame};
use serde_json::json;
use socp::wire::Envelope;
use std::io::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// The connection the server logged `user_id` online on (`#n`, as the net layer logs it).
fn conn_of(server: &ServerProc, user_id: &str) -> String {
    let line = server.wait_log(&format!("user {user_id} online (conn "));
    let tail = line.split("(conn ").nth(1).expect("a conn id");
    tail.trim_end_matches(')').to_string()
}

/// DMs from `sender` to `to`, one after the other, until `stop` is set or the connection fails.
/// Each is about 3 KiB when delivered (two RSA blocks and a key; the server neither decrypts
/// nor checks `content_sig`). The payload `ts` numbers them: `first_ts + i`. Blocking writes:
/// once the server stops reading `sender`, this thread waits in `send`. Reports the number
/// sent, and gives back the connection: closing it would reset it (the login's frames are
/// unread), and a reset loses what the server has not read yet.
fn send_dms(
    mut sender: Raw,
    to: &'static str,
    stop: Arc<AtomicBool>,
    first_ts: i64,
) -> (JoinHandle<Raw>, mpsc::Receiver<usize>) {
    let (done_tx, done) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let key = test_key("user1");
        let block = socp::wire::b64::encode(&[7u8; 512]);
        let payload = json!({"ciphertext": block, "sender_pub": key.public_key().encoded(),
                             "content_sig": block});
        let signed = socp::wire::SignedPayload::unsigned(&payload).unwrap();
        let mut sent = 0;
        while !stop.load(Ordering::SeqCst) {
            let ts = first_ts + sent as i64;
            let text = socp::wire::encode_frame("MSG_DIRECT", &sender.user_id, to, ts, &signed);
            if sender.ws.send(Message::Text(text.into())).is_err() {
                break;
            }
            sent += 1;
        }
        let _ = done_tx.send(sent);
        sender
    });
    (handle, done)
}

/// The next frame on `raw`, or why there is none (timeout, close).
fn next_frame(raw: &mut Raw) -> Result<Envelope, String> {
    loop {
        match raw.ws.read() {
            Ok(Message::Text(t)) => return Envelope::parse(&t).map_err(|e| e.to_string()),
            Ok(Message::Close(c)) => return Err(format!("closed: {c:?}")),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The measured bug: with one user not reading its socket, every login broadcasts a
/// `USER_ADVERTISE` to that user, and the newcomer whose login caused it was paused until the
/// non-reader was dropped (30 s). A newcomer must be answered at once.
#[test]
fn a_user_who_never_reads_does_not_freeze_a_newcomer() {
    let server = ServerProc::start("server1", &["--slow-reader-timeout-ms", "20000"]);
    let mut carol = Raw::hello(&server, "carol", &test_key("user3"));
    let alice = Raw::hello(&server, "alice", &test_key("user1"));
    let alice_conn = conn_of(&server, "alice");

    // carol stops reading; alice's DMs fill the server's socket to her until alice, whose
    // frames they are, is paused: from then on carol is genuinely blocked.
    let stop = Arc::new(AtomicBool::new(false));
    let (_dms, _) = send_dms(alice, "carol", stop.clone(), common::proc::now_ms());
    server.wait_log(&format!("conn {alice_conn}: paused"));

    // A newcomer logs in (a USER_ADVERTISE to carol, queued behind the DMs) and asks for the
    // directory.
    let mut dave = Raw::hello(&server, "dave", &test_key("user4"));
    // The login's own LIST_RESPONSE comes before the snapshot (README "Order of a login's
    // frames"): the one that counts is the answer to the request below.
    dave.recv_kind("PUBLIC_CHANNEL_SNAPSHOT");
    let patience = Duration::from_secs(5);
    dave.ws.get_mut().set_read_timeout(Some(patience)).unwrap();
    let asked = Instant::now();
    let request = frame("LIST_REQUEST", "dave", &server.server_id, &json!({}), None);
    dave.send_text(&request);
    let list = loop {
        match next_frame(&mut dave) {
            Ok(env) if env.kind == "LIST_RESPONSE" => break env,
            Ok(_) => {}
            Err(e) => panic!(
                "no LIST_RESPONSE within {patience:?} ({e}) while carol does not read \
                 (slow-reader timeout 20 s): the newcomer waits for her"
            ),
        }
    };
    assert!(asked.elapsed() < patience, "{:?}", asked.elapsed());
    let users: Vec<&str> = list.payload["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap())
        .collect();
    // carol is still connected (and still blocked): the answer did not wait for her drop.
    assert!(
        users.contains(&"carol") && users.contains(&"dave"),
        "{users:?}"
    );

    // The broadcast to carol was queued, not lost: once she reads, dave's advert is there.
    stop.store(true, Ordering::SeqCst);
    loop {
        let env = next_frame(&mut carol).expect("carol reads what waited for her");
        if env.kind == "USER_ADVERTISE" && env.payload["user_id"] == "dave" {
            break;
        }
    }
}

/// Backpressure still holds where it belongs: a user who sends DMs to a user who does not read
/// is paused (not read) until that one drains, so what waits for the slow reader stays bounded
/// (here far below the 256 KiB write limit, which would otherwise drop her) and every DM
/// arrives, in order, once she reads.
#[test]
fn a_dm_sender_to_a_user_who_never_reads_is_paused_until_she_reads() {
    let server = ServerProc::start(
        "server1",
        &[
            "--slow-reader-timeout-ms",
            "20000",
            "--max-write-buffer",
            "262144",
        ],
    );
    let mut carol = Raw::hello(&server, "carol", &test_key("user3"));
    let alice = Raw::hello(&server, "alice", &test_key("user1"));
    let alice_conn = conn_of(&server, "alice");

    let stop = Arc::new(AtomicBool::new(false));
    let first_ts = common::proc::now_ms();
    let (dms, done) = send_dms(alice, "carol", stop.clone(), first_ts);
    // (Paused first, maybe, while her frames wait for their signatures; then because carol's
    // socket is full.)
    server.wait_log(&format!(
        "conn {alice_conn}: paused (a destination is not keeping up)"
    ));
    stop.store(true, Ordering::SeqCst);

    // carol reads everything; alice is resumed as she does, and finishes her last DM. (Short
    // reads: the count of DMs sent may come only after carol has read the last one.)
    carol
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut got = 0usize;
    let mut sent = None;
    let deadline = Instant::now() + 4 * WAIT;
    while sent != Some(got) {
        assert!(Instant::now() < deadline, "got {got} of {sent:?} DMs");
        if sent.is_none() {
            sent = done.try_recv().ok();
        }
        let env = match carol.ws.read() {
            Ok(Message::Text(t)) => Envelope::parse(&t).unwrap(),
            Ok(Message::Close(c)) => panic!("carol was closed ({c:?}) after {got} DMs"),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                continue;
            }
            Err(e) => panic!("carol was dropped ({e}) after {got} DMs"),
        };
        if env.kind == "USER_DELIVER" {
            assert_eq!(env.payload["sender"], "alice");
            assert_eq!(
                env.payload["ts"],
                first_ts + got as i64,
                "in order, none lost"
            );
            got += 1;
        }
    }
    drop(dms.join().unwrap());
    assert!(got > 100, "only {got} DMs filled the socket?");
}

/// A `FILE_START` from `user_id` to carol carrying `pad` bytes in an extra field (forwarded as
/// it is, §9): one routed frame of about that size.
fn big_file_start(user_id: &str, pad: usize) -> String {
    let start = json!({"file_id": socp::wire::ids::new_uuid(), "name": "x.bin", "size": 10,
                       "sha256": "0".repeat(64), "mode": "dm", "note": "n".repeat(pad)});
    frame("FILE_START", user_id, "carol", &start, None)
}

/// A sender whose routed frame takes a stalled reader past the write limit: the reader is
/// closed on the spot, and the sender must not stay paused behind a connection that is gone
/// (nothing would ever resume it).
#[test]
fn a_sender_whose_frame_overflows_a_stalled_reader_is_not_left_paused() {
    let server = ServerProc::start(
        "server1",
        &[
            "--slow-reader-timeout-ms",
            "20000",
            "--max-write-buffer",
            "163840",
        ],
    );
    let _carol = Raw::hello(&server, "carol", &test_key("user3"));
    let alice = Raw::hello(&server, "alice", &test_key("user1"));
    let alice_conn = conn_of(&server, "alice");
    let stop = Arc::new(AtomicBool::new(false));
    let (_dms, _) = send_dms(alice, "carol", stop.clone(), common::proc::now_ms());
    // (Paused first, maybe, while her frames wait for their signatures; then because carol's
    // socket is full.)
    server.wait_log(&format!(
        "conn {alice_conn}: paused (a destination is not keeping up)"
    ));
    stop.store(true, Ordering::SeqCst);

    // 60 KB frames for carol from bob, dave, then erin, each sender paused behind her, until
    // one takes her past the 160 KiB limit (how many depends on how much of alice's is still
    // waiting: up to the 16 frames that may wait for their signatures): carol is closed.
    let mut senders = Vec::new();
    for (user_id, key) in [("bob", "user2"), ("dave", "user4"), ("erin", "user5")] {
        let mut raw = Raw::hello(&server, user_id, &test_key(key));
        raw.recv_kind("PUBLIC_CHANNEL_SNAPSHOT");
        senders.push((conn_of(&server, user_id), raw));
    }
    let mut last = None;
    for (i, (conn, raw)) in senders.iter_mut().enumerate() {
        let f = big_file_start(&raw.user_id.clone(), 60_000);
        raw.send_text(&f);
        let paused = format!("conn {conn}: paused");
        let full = "not reading, write buffer full";
        let line = server.wait_log_any(&[&paused, full]);
        if line.contains(full) {
            last = Some(i);
            break;
        }
    }
    let last = last.expect("three 60 KB frames did not take carol past 160 KiB");
    assert!(
        last >= 1,
        "one 60 KB frame took carol past the limit: alice's filled it"
    );
    let (_, erin) = &mut senders[last];
    let erin_id = erin.user_id.clone();

    let patience = Duration::from_secs(5);
    erin.ws.get_mut().set_read_timeout(Some(patience)).unwrap();
    let asked = Instant::now();
    erin.send_text(&frame(
        "LIST_REQUEST",
        &erin_id,
        &server.server_id,
        &json!({}),
        None,
    ));
    loop {
        match next_frame(erin) {
            Ok(env) if env.kind == "LIST_RESPONSE" => break,
            Ok(_) => {}
            Err(e) => panic!("erin is not read any more ({e}): paused behind a closed reader"),
        }
    }
    assert!(asked.elapsed() < patience, "{:?}", asked.elapsed());
}
