//! Bad input from the network (issue 2): each gets the right answer, and the server keeps
//! serving everyone else. Every test ends by checking that two healthy users still chat.

mod common;

use common::keys::test_key;
use common::proc::{Raw, ServerProc, WAIT, frame};
use serde_json::json;
use socp::crypto::{self, PrivateKey};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// Two users who must keep being served whatever the others do.
struct Healthy {
    alice: Raw,
    bob: Raw,
    bob_key: PrivateKey,
}

impl Healthy {
    fn new(server: &ServerProc) -> Healthy {
        let alice = Raw::hello(server, "alice", &test_key("user1"));
        let bob = Raw::hello(server, "bob", &test_key("user2"));
        Healthy {
            alice,
            bob,
            bob_key: test_key("user2"),
        }
    }

    /// alice sends bob a DM; bob receives and decrypts it.
    fn check(&mut self, text: &str) {
        let alice_key = test_key("user1");
        let ct = crate::common::proc::now_ms(); // distinct per call
        let raw = self
            .bob_key
            .public_key()
            .encrypt(format!("{text} {ct}").as_bytes())
            .unwrap();
        let ciphertext = socp::wire::b64::encode(&raw);
        let ts = common::proc::now_ms();
        let content_sig = crypto::make_content_sig(&alice_key, &raw, "alice", Some("bob"), ts);
        let payload = json!({"ciphertext": ciphertext, "sender_pub": alice_key.public_key().encoded(),
                             "content_sig": content_sig});
        let signed = socp::wire::SignedPayload::unsigned(&payload).unwrap();
        let text_frame = socp::wire::encode_frame("MSG_DIRECT", "alice", "bob", ts, &signed);
        self.alice.send_text(&text_frame);
        let got = self.bob.recv_kind("USER_DELIVER");
        assert_eq!(got.payload["sender"], "alice");
        assert_eq!(got.payload["ts"], ts);
        let plain = self
            .bob_key
            .decrypt(&socp::wire::b64::decode(got.payload["ciphertext"].as_str().unwrap()).unwrap())
            .unwrap();
        assert_eq!(String::from_utf8(plain).unwrap(), format!("{text} {ct}"));
    }
}

fn error_of(raw: &mut Raw) -> (String, String) {
    let e = raw.recv_kind("ERROR");
    (
        e.payload["code"].as_str().unwrap().to_string(),
        e.payload["detail"].as_str().unwrap().to_string(),
    )
}

#[test]
fn invalid_json_first_is_refused_and_closed() {
    let server = ServerProc::start("server1", &[]);
    let mut ok = Healthy::new(&server);
    let mut bad = Raw::connect(&server);
    bad.send_text("{this is not json");
    assert_eq!(error_of(&mut bad).0, "UNKNOWN_TYPE");
    assert_eq!(bad.expect_close(), 1008);
    ok.check("after invalid json");
}

#[test]
fn after_the_hello_bad_frames_are_answered_not_punished() {
    let server = ServerProc::start("server1", &[]);
    let mut ok = Healthy::new(&server);
    let mut carol = Raw::hello(&server, "carol", &test_key("user3"));

    carol.send_text("not json at all");
    assert_eq!(
        error_of(&mut carol),
        ("UNKNOWN_TYPE".into(), "invalid JSON".into())
    );

    carol
        .ws
        .send(Message::Binary(vec![1, 2, 3].into()))
        .unwrap();
    assert_eq!(
        error_of(&mut carol),
        (
            "UNKNOWN_TYPE".into(),
            "binary frames are not supported".into()
        )
    );

    carol.send_text(&frame(
        "FROBNICATE",
        "carol",
        "srv-server1",
        &json!({}),
        None,
    ));
    let (code, detail) = error_of(&mut carol);
    assert_eq!(code, "UNKNOWN_TYPE");
    assert!(detail.contains("FROBNICATE"), "{detail}");

    // A wrong `from`: the sender is bound to the connection (§5.2).
    let dm = frame("MSG_DIRECT", "alice", "bob", &json!({}), None);
    carol.send_text(&dm);
    assert_eq!(
        error_of(&mut carol),
        ("INVALID_SIG".into(), "sender does not match session".into())
    );

    // A malformed payload names the field.
    let dm = frame(
        "MSG_DIRECT",
        "carol",
        "bob",
        &json!({"ciphertext": 5}),
        None,
    );
    carol.send_text(&dm);
    let (code, detail) = error_of(&mut carol);
    assert_eq!(code, "BAD_KEY");
    assert!(detail.starts_with("payload.ciphertext"), "{detail}");

    // Still connected and served.
    assert!(carol.list(&server).contains(&"carol".to_string()));
    ok.check("after bad frames");
}

#[test]
fn a_frame_before_the_hello_is_refused() {
    let server = ServerProc::start("server1", &[]);
    let mut ok = Healthy::new(&server);
    let mut bad = Raw::connect(&server);
    bad.send_text(&frame("LIST_REQUEST", "x", "", &json!({}), None));
    assert_eq!(error_of(&mut bad).0, "INVALID_SIG");
    assert_eq!(bad.expect_close(), 1008);

    // Between USER_HELLO and AUTH_RESPONSE, other frames are dropped with an error.
    let key = test_key("user4");
    let mut mid = Raw::connect(&server);
    let pubkey = key.public_key().encoded();
    mid.send_text(&frame(
        "USER_HELLO",
        "dave",
        "",
        &json!({"pubkey": pubkey}),
        None,
    ));
    mid.recv_kind("AUTH_CHALLENGE");
    mid.send_text(&frame("MSG_DIRECT", "dave", "bob", &json!({}), None));
    assert_eq!(error_of(&mut mid).0, "INVALID_SIG");
    ok.check("after early frames");
}

#[test]
fn a_forged_auth_response_is_refused() {
    let server = ServerProc::start("server1", &[]);
    let mut ok = Healthy::new(&server);
    let real = test_key("user4");
    let forger = test_key("user5");
    let mut bad = Raw::connect(&server);
    let pubkey = real.public_key().encoded();
    bad.send_text(&frame(
        "USER_HELLO",
        "dave",
        "",
        &json!({"pubkey": pubkey}),
        None,
    ));
    let ch = bad.recv_kind("AUTH_CHALLENGE");
    let resp =
        json!({"nonce": ch.payload["nonce"], "server_id": server.server_id, "user_id": "dave"});
    bad.send_text(&frame(
        "AUTH_RESPONSE",
        "dave",
        &server.server_id,
        &resp,
        Some(&forger),
    ));
    assert_eq!(error_of(&mut bad).0, "INVALID_SIG");
    assert!(!ok.alice.list(&server).contains(&"dave".to_string()));
    ok.check("after forgery");
}

#[test]
fn weak_keys_are_refused() {
    let server = ServerProc::start("server1", &[]);
    let mut ok = Healthy::new(&server);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys/");
    for name in ["weak2048.pub.pem", "e3.pub.pem"] {
        let pem = std::fs::read_to_string(format!("{dir}{name}")).unwrap();
        let mut bad = Raw::connect(&server);
        bad.send_text(&frame(
            "USER_HELLO",
            "eve",
            "",
            &json!({"pubkey": pem}),
            None,
        ));
        let (code, detail) = error_of(&mut bad);
        assert_eq!(code, "BAD_KEY", "{name}");
        assert!(detail.starts_with("payload.pubkey"), "{name}: {detail}");
    }
    ok.check("after weak keys");
}

#[test]
fn an_oversized_frame_is_refused_and_closed() {
    let server = ServerProc::start("server1", &[]);
    let mut ok = Healthy::new(&server);
    let mut big = Raw::hello(&server, "carol", &test_key("user3"));
    let huge = "x".repeat(70 * 1024);
    big.send_text(&frame(
        "MSG_DIRECT",
        "carol",
        "bob",
        &json!({"pad": huge}),
        None,
    ));
    let (code, detail) = error_of(&mut big);
    assert_eq!(code, "BAD_KEY");
    assert!(detail.contains("65536"), "{detail}");
    assert_eq!(big.expect_close(), 1009);
    ok.check("after an oversized frame");
}

#[test]
fn a_handshake_that_never_finishes_is_cut_off() {
    let server = ServerProc::start("server1", &["--handshake-timeout-ms", "300"]);
    let mut ok = Healthy::new(&server);
    let mut stalled = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stalled.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap(); // never finished
    stalled.set_read_timeout(Some(WAIT)).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let n = stalled.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the server should close a stalled handshake");
    assert!(start.elapsed() >= Duration::from_millis(250));
    ok.check("after a stalled handshake");
}

#[test]
fn a_hello_that_never_comes_times_out() {
    let server = ServerProc::start("server1", &["--hello-timeout-ms", "300"]);
    let mut ok = Healthy::new(&server);
    let mut idle = Raw::connect(&server);
    assert_eq!(error_of(&mut idle).0, "TIMEOUT");
    assert_eq!(idle.expect_close(), 1008);
    ok.check("after a hello timeout");
}

#[test]
fn a_second_session_for_an_online_user_is_refused() {
    let server = ServerProc::start("server1", &[]);
    let mut ok = Healthy::new(&server);
    let mut dup = Raw::connect(&server);
    let pubkey = test_key("user1").public_key().encoded().to_string();
    dup.send_text(&frame(
        "USER_HELLO",
        "alice",
        "",
        &json!({"pubkey": pubkey}),
        None,
    ));
    assert_eq!(error_of(&mut dup).0, "NAME_IN_USE");
    assert_eq!(dup.expect_close(), 1008);
    ok.check("after a duplicate login");
}

#[test]
fn a_client_that_never_reads_is_disconnected_without_harming_others() {
    let server = ServerProc::start(
        "server1",
        &[
            "--max-write-buffer",
            "131072",
            "--slow-reader-timeout-ms",
            "1000",
        ],
    );
    let mut ok = Healthy::new(&server);
    let mut slow = Raw::hello(&server, "carol", &test_key("user3"));
    // Ask for the directory again and again, never reading the answers.
    let request = frame("LIST_REQUEST", "carol", &server.server_id, &json!({}), None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut refused = false;
    while Instant::now() < deadline {
        if slow.ws.send(Message::Text(request.clone().into())).is_err() {
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "the server never gave up on a client that does not read"
    );
    // Closed either because its buffer filled or because it stopped taking data.
    let why = server.wait_log("; closing");
    assert!(
        why.contains("write buffer full") || why.contains("has not taken our data"),
        "{why}"
    );
    ok.check("after a slow reader");
}

/// One client frame as raw bytes: FIN, opcode text, `rsv` (0-7) in the reserved bits, and a
/// mask unless `masked` is false. Payloads here are under 126 bytes.
fn raw_text_frame(payload: &[u8], rsv: u8, masked: bool) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut out = vec![0x80 | (rsv << 4) | 0x1];
    if !masked {
        out.push(payload.len() as u8);
        out.extend_from_slice(payload);
        return out;
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    out.push(0x80 | payload.len() as u8);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// After a valid WebSocket handshake (and, with `user`, a hello), writes `bytes` to the socket
/// as they are; returns the close code the server answers with.
fn close_code_for_raw(server: &ServerProc, user: bool, bytes: &[u8]) -> u16 {
    let mut raw = if user {
        Raw::hello(server, "carol", &test_key("user3"))
    } else {
        Raw::connect(server)
    };
    raw.ws.get_mut().write_all(bytes).unwrap();
    raw.expect_close()
}

/// RFC 6455 §8.1: a text message that is not UTF-8 fails the connection with 1007.
#[test]
fn invalid_utf8_in_a_text_frame_is_closed_with_1007() {
    let server = ServerProc::start("server1", &[]);
    let mut ok = Healthy::new(&server);
    let bad = raw_text_frame(b"{\"type\":\"\xc3\x28\xff\"}", 0, true);
    assert_eq!(close_code_for_raw(&server, false, &bad), 1007);
    assert_eq!(close_code_for_raw(&server, true, &bad), 1007);
    ok.check("after invalid UTF-8");
}

/// RFC 6455 §5.2: reserved bits set with no extension negotiated fail the connection: 1002.
#[test]
fn a_frame_with_reserved_bits_set_is_closed_with_1002() {
    let server = ServerProc::start("server1", &[]);
    let mut ok = Healthy::new(&server);
    for rsv in [0b100, 0b010, 0b001] {
        let bad = raw_text_frame(b"{}", rsv, true);
        assert_eq!(
            close_code_for_raw(&server, false, &bad),
            1002,
            "rsv {rsv:03b}"
        );
    }
    assert_eq!(
        close_code_for_raw(&server, true, &raw_text_frame(b"{}", 0b100, true)),
        1002
    );
    ok.check("after reserved bits");
}

/// RFC 6455 §5.1: a server closes the connection on an unmasked client frame: 1002.
#[test]
fn an_unmasked_client_frame_is_closed_with_1002() {
    let server = ServerProc::start("server1", &[]);
    let mut ok = Healthy::new(&server);
    let bad = raw_text_frame(b"{}", 0, false);
    assert_eq!(close_code_for_raw(&server, false, &bad), 1002);
    assert_eq!(close_code_for_raw(&server, true, &bad), 1002);
    ok.check("after an unmasked frame");
}
