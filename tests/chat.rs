//! The real `socp-server` and `socp` line clients over loopback (issue 2).

mod common;

use common::proc::{Line, ServerProc, TempDir};
use std::time::Duration;

fn two_users_chat(first: &str, second: &str) {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("chat");
    let keys = |name: &str| if name == "alice" { "user1" } else { "user2" };
    let mut a = Line::start(&server, first, keys(first), &dir.0);
    let mut b = Line::start(&server, second, keys(second), &dir.0);
    a.expect(&format!("* {second} is online"));

    // Both ways at once.
    a.send(&format!("/tell {second} hello from {first}"));
    b.send(&format!("/tell {first} hello from {second} é"));
    b.expect(&format!("[dm] {first}: hello from {first}"));
    a.expect(&format!("[dm] {second}: hello from {second} é"));

    a.send("/list");
    a.expect("* 2 online:");
    let listing = a.drain_for(Duration::from_millis(300)).join("\n");
    assert!(
        listing.contains(&format!("{first} id-{first}")),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("{second} id-{second}")),
        "{listing}"
    );
    assert!(
        !a.seen.iter().any(|l| l.contains("NOT AUTHENTIC")),
        "{:?}",
        a.seen
    );
}

#[test]
fn alice_then_bob_chat_both_ways() {
    two_users_chat("alice", "bob");
}

#[test]
fn bob_then_alice_chat_both_ways() {
    two_users_chat("bob", "alice");
}

#[test]
fn all_reaches_everyone_but_the_sender_exactly_once() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("all");
    let mut alice = Line::start(&server, "alice", "user1", &dir.0);
    let mut bob = Line::start(&server, "bob", "user2", &dir.0);
    let mut carol = Line::start(&server, "carol", "user3", &dir.0);
    alice.expect("* carol is online");
    bob.expect("* carol is online");

    carol.send("/all hello everyone");
    alice.expect("[all] carol: hello everyone");
    bob.expect("[all] carol: hello everyone");
    let quiet = Duration::from_millis(500);
    for client in [&mut alice, &mut bob] {
        let more = client.drain_for(quiet);
        assert!(
            !more.iter().any(|l| l.contains("hello everyone")),
            "{more:?}"
        );
    }
    let own = carol.drain_for(quiet);
    assert!(!own.iter().any(|l| l.contains("[all]")), "{own:?}");
}

#[test]
fn a_user_leaving_is_seen_by_the_others() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("leave");
    let mut alice = Line::start(&server, "alice", "user1", &dir.0);
    let mut bob = Line::start(&server, "bob", "user2", &dir.0);
    alice.expect("* bob is online");
    bob.send("/quit");
    assert!(bob.wait_exit().success());
    alice.expect("* bob went offline (id-bob)");
    alice.send("/tell bob are you there");
    alice.expect("! warning: no user bob is online");
}

#[test]
fn piped_input_is_sent_before_the_client_exits() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("pipe");
    let mut bob = Line::start(&server, "bob", "user2", &dir.0);
    let mut alice = Line::start(&server, "alice", "user1", &dir.0);
    alice.send("/tell bob last words");
    alice.close_stdin();
    assert!(alice.wait_exit().success());
    bob.expect("[dm] alice: last words");
}

#[test]
fn long_text_is_split_into_446_byte_messages() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("long");
    let mut alice = Line::start(&server, "alice", "user1", &dir.0);
    let mut bob = Line::start(&server, "bob", "user2", &dir.0);
    alice.expect("* bob is online");
    let text: String = "0123456789".repeat(50); // 500 bytes
    alice.send(&format!("/tell bob {text}"));
    let first = bob.expect("[dm] alice: ");
    let second = bob.expect("[dm] alice: ");
    let got = |l: &str| l.trim_start_matches("[dm] alice: ").to_string();
    assert_eq!(got(&first).len(), 446);
    assert_eq!(format!("{}{}", got(&first), got(&second)), text);
}

#[test]
fn json_output_is_one_object_per_line() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("json");
    let mut alice = Line::start(&server, "alice", "user1", &dir.0);
    // A second client for bob, in JSON mode, started by hand.
    let key = common::keys::test_key("user2");
    let key_file = serde_json::json!({"user_id": "id-bob", "display_name": "bob",
                                      "private_key": key.to_pem()});
    std::fs::write(dir.0.join("bob.json"), key_file.to_string()).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_socp"))
        .args([
            "--server",
            &server.url(),
            "--name",
            "bob",
            "--json",
            "--data-dir",
        ])
        .arg(&dir.0)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    alice.expect("* bob is online");
    alice.send("/tell bob {\"not\": \"json\"}");
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let mut events = Vec::new();
    while events.len() < 2 {
        let line = lines.next().expect("output").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
        events.push(v);
    }
    assert_eq!(events[0]["event"], "connected");
    assert_eq!(events[1]["event"], "dm");
    assert_eq!(events[1]["text"], "{\"not\": \"json\"}");
    assert_eq!(events[1]["authentic"], true);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_directory_larger_than_one_frame_arrives_whole() {
    // Messages over 4 KiB are sent as fragmented WebSocket messages; six users make the
    // LIST_RESPONSE about 5 KiB.
    let server = ServerProc::start("server1", &[]);
    let names = ["u1", "u2", "u3", "u4", "u5", "u6"];
    let mut users: Vec<common::proc::Raw> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            common::proc::Raw::hello(
                &server,
                n,
                &common::keys::test_key(&format!("user{}", i + 1)),
            )
        })
        .collect();
    // The first LIST_RESPONSE waiting for u1 is the one from its own hello; ask for a fresh one.
    users[0].recv_kind("LIST_RESPONSE");
    let listed = users[0].list(&server);
    assert_eq!(listed, names.to_vec());
    // And the line client reassembles it too.
    let dir = TempDir::new("frag");
    let mut alice = Line::start(&server, "alice", "user7", &dir.0);
    alice.send("/list");
    alice.expect("* 7 online:");
    drop(users.drain(..));
}

#[test]
fn a_message_whose_content_signature_fails_is_shown_as_not_authentic() {
    // The server passes content_sig through (§3.5); the receiving client must catch a bad one.
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("forged");
    let mut bob = Line::start(&server, "bob", "user2", &dir.0);
    let mallory_key = common::keys::test_key("user5");
    let mut mallory = common::proc::Raw::hello(&server, "mallory", &mallory_key);
    bob.expect("* mallory is online");
    let bob_key = common::keys::test_key("user2");
    let ts = common::proc::now_ms();
    let raw = bob_key.public_key().encrypt(b"trust me").unwrap();
    let ct = socp::b64::encode(&raw);
    // Signed over other bytes than the ones sent.
    let bad_sig =
        socp::crypto::make_content_sig(&mallory_key, &raw, "mallory", Some("id-bob"), ts + 1);
    let payload = serde_json::json!({"ciphertext": ct, "content_sig": bad_sig,
                                     "sender_pub": mallory_key.public_key().encoded()});
    let signed = socp::wire::SignedPayload::unsigned(&payload).unwrap();
    mallory.send_text(&socp::wire::encode_frame(
        "MSG_DIRECT",
        "mallory",
        "id-bob",
        ts,
        &signed,
    ));
    let line = bob.expect("[dm] mallory");
    assert_eq!(
        line,
        "[dm] mallory (NOT AUTHENTIC: content signature does not verify): trust me"
    );
}
