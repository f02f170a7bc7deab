//! The real `socp-server` and `socp` line clients over loopback (issue 2).

mod common;

use common::proc::{Line, Run, ServerProc, TempDir, run_socp};
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
    use std::os::unix::fs::PermissionsExt; // as the client creates it (else a warning comes first)
    std::fs::set_permissions(
        dir.0.join("bob.json"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
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
    let ct = socp::wire::b64::encode(&raw);
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

// -------------------------------------------------------------------- scripting: exit codes

/// Writes the fixture key `key_name` as `name`'s key file in `dir` (as `Line::start` does).
fn place_key(dir: &std::path::Path, name: &str, key_name: &str) {
    let key = common::keys::test_key(key_name);
    let body = serde_json::json!({"user_id": format!("id-{name}"), "display_name": name,
                                  "private_key": key.to_pem()});
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, body.to_string()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `socp --server URL --name alice --data-dir DIR EXTRA…`, alice's key placed in DIR.
fn alice(server: &ServerProc, dir: &TempDir, extra: &[&str], input: &str) -> Run {
    place_key(&dir.0, "alice", "user1");
    let url = server.url();
    let data = dir.0.to_string_lossy().into_owned();
    let mut args = vec!["--server", &url, "--name", "alice", "--data-dir", &data];
    args.extend_from_slice(extra);
    run_socp(&args, input, &[])
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[test]
fn sent_events_say_to_whom_and_how_many_copies() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("sent");
    let downloads = TempDir::new("sent-dl");
    let dl = downloads.0.to_string_lossy().into_owned();
    let mut bob = Line::start_args(&server, "bob", "user2", &dir.0, &["--downloads", &dl]);
    let mut carol = Line::start(&server, "carol", "user3", &dir.0);
    bob.expect("* carol is online");
    let file = dir.0.join("note.txt");
    std::fs::write(&file, "hello file").unwrap();
    let long = "y".repeat(500);
    let input = format!(
        "/tell bob hi\n/tell carol {long}\n/all hello all\n/file bob {}\n",
        file.display()
    );

    let run = alice(&server, &dir, &[], &input);
    assert_eq!(run.code, Some(0), "{run:?}");
    for line in [
        "* sent to bob\n",
        "* sent to carol in 2 parts\n",
        "* sent to 2 users: bob, carol\n",
        "* sent note.txt (10 bytes) to bob\n",
    ] {
        assert!(run.out.contains(line), "no {line:?} in {run:?}");
    }
    bob.expect("[dm] alice: hi");
    carol.expect("[all] alice: hello all");

    let run = alice(&server, &dir, &["--json"], &input);
    assert_eq!(run.code, Some(0), "{run:?}");
    let sent: Vec<serde_json::Value> = json_lines(&run.out)
        .into_iter()
        .filter(|e| e["event"] == "sent")
        .collect();
    assert_eq!(sent.len(), 4, "{run:?}");
    assert_eq!(
        sent[0],
        serde_json::json!({"event": "sent", "command": "tell", "to": ["id-bob"],
                           "names": ["bob"], "copies": 1, "parts": 1})
    );
    assert_eq!(sent[1]["to"], serde_json::json!(["id-carol"]));
    assert_eq!(sent[1]["parts"], 2);
    assert_eq!(sent[2]["command"], "all");
    assert_eq!(sent[2]["to"], serde_json::json!(["id-bob", "id-carol"]));
    assert_eq!(sent[2]["names"], serde_json::json!(["bob", "carol"]));
    assert_eq!(sent[2]["copies"], 2);
    assert_eq!(sent[3]["command"], "file");
    assert_eq!(sent[3]["to"], serde_json::json!(["id-bob"]));
    assert_eq!(sent[3]["copies"], 1);
    assert_eq!(sent[3]["file"], "note.txt");
    assert_eq!(sent[3]["size"], 10);
}

#[test]
fn a_failed_command_exits_1_after_running_the_rest() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("fail");
    let mut bob = Line::start(&server, "bob", "user2", &dir.0);
    for bad in [
        "/tell nobody hi",
        "/file nobody /etc/hostname",
        "/file bob /no/such/file",
        "/tell bob",
        "/frobnicate",
        "just text",
    ] {
        let run = alice(
            &server,
            &dir,
            &[],
            &format!("{bad}\n/tell bob after {bad}\n"),
        );
        assert_eq!(run.code, Some(1), "{bad}: {run:?}");
        assert!(run.out.contains("! warning: "), "{bad}: {run:?}");
        // The rest of the script still ran.
        bob.expect(&format!("[dm] alice: after {bad}"));
    }
    // Success is 0.
    let run = alice(&server, &dir, &[], "/tell bob fine\n/list\n");
    assert_eq!(run.code, Some(0), "{run:?}");
}

#[test]
fn the_server_going_away_mid_session_exits_3() {
    let mut server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("gone");
    let mut alice = Line::start(&server, "alice", "user1", &dir.0);
    server.terminate(); // closes every connection with 1001
    alice.expect("* disconnected");
    assert_eq!(alice.wait_exit().code(), Some(3));

    let server = ServerProc::start("server1", &[]);
    let mut alice = Line::start(&server, "alice", "user1", &dir.0);
    let mut server = server;
    server.kill9(); // no close frame: the connection just ends
    assert_eq!(alice.wait_exit().code(), Some(3), "{:?}", alice.seen);
}

#[test]
fn cannot_connect_exits_4_and_says_so_in_json_too() {
    let port = common::proc::free_ports(1)[0];
    let dir = TempDir::new("noconn");
    place_key(&dir.0, "alice", "user1");
    let url = format!("ws://127.0.0.1:{port}");
    let data = dir.0.to_string_lossy().into_owned();
    let args = ["--server", &url, "--name", "alice", "--data-dir", &data];
    let run = run_socp(&args, "", &[]);
    assert_eq!(run.code, Some(4), "{run:?}");
    assert!(run.err.contains("cannot connect"), "{run:?}");

    let mut json = args.to_vec();
    json.push("--json");
    let run = run_socp(&json, "", &[]);
    assert_eq!(run.code, Some(4), "{run:?}");
    let events = json_lines(&run.out);
    assert_eq!(events.len(), 1, "{run:?}");
    assert_eq!(events[0]["event"], "fatal");
    assert_eq!(events[0]["code"], "CANNOT_CONNECT");
    assert_eq!(events[0]["exit"], 4);
    assert!(events[0]["detail"].as_str().unwrap().contains(&url));
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["--bogus"][..],
        &["--name", "bad name!"],
        &["--name", "a", "--login", "b"],
    ] {
        let run = run_socp(args, "", &[]);
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.err.contains("socp --help"), "{run:?}");
    }
    let run = run_socp(&["--bogus", "--json"], "", &[]);
    assert_eq!(run.code, Some(2), "{run:?}");
    let events = json_lines(&run.out);
    assert_eq!(events[0]["event"], "fatal");
    assert_eq!(events[0]["code"], "USAGE");
}

#[test]
fn json_warnings_carry_a_stable_code_and_help_is_not_a_warning() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("codes");
    let run = alice(
        &server,
        &dir,
        &["--json"],
        "/help\n/tell nobody hi\n/frobnicate\n/all hi\n",
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    let events = json_lines(&run.out);
    let help = events.iter().find(|e| e["event"] == "help").expect("help");
    assert!(help["text"].as_str().unwrap().contains("/tell"), "{help}");
    let codes: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "warning")
        .map(|e| e["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["NO_SUCH_USER", "UNKNOWN_COMMAND", "NO_RECIPIENTS"]);

    let run = alice(&server, &dir, &[], "/help\n");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.out.contains("\n  /tell"), "{run:?}");
    assert!(!run.out.contains("warning"), "{run:?}");
}

#[test]
fn a_key_file_readable_by_others_is_warned_about() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("perm");
    place_key(&dir.0, "alice", "user1");
    use std::os::unix::fs::PermissionsExt;
    let key = dir.0.join("alice.json");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let url = server.url();
    let data = dir.0.to_string_lossy().into_owned();
    let args = [
        "--server",
        &url,
        "--name",
        "alice",
        "--data-dir",
        &data,
        "--json",
    ];
    let run = run_socp(&args, "", &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let events = json_lines(&run.out);
    let warning = events
        .iter()
        .find(|e| e["event"] == "warning")
        .expect("a warning");
    assert_eq!(warning["code"], "KEY_FILE_PERMISSIONS", "{run:?}");
    assert!(
        warning["detail"].as_str().unwrap().contains("chmod 600"),
        "{run:?}"
    );
}

#[test]
fn the_client_reads_socp_client_data_dir_not_the_servers_variable() {
    let server = ServerProc::start("server1", &[]);
    let (mine, servers, home) = (
        TempDir::new("cdir"),
        TempDir::new("sdir"),
        TempDir::new("home"),
    );
    place_key(&mine.0, "alice", "user1");
    let url = server.url();
    let env = [
        ("SOCP_CLIENT_DATA_DIR", mine.0.to_str().unwrap()),
        ("SOCP_DATA_DIR", servers.0.to_str().unwrap()),
        ("HOME", home.0.to_str().unwrap()),
        ("XDG_DATA_HOME", ""),
    ];
    let run = run_socp(&["--server", &url, "--name", "alice"], "", &env);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.out.contains("* connected as alice (id-alice)"),
        "{run:?}"
    );
    assert!(mine.0.join("server-pins.json").exists());
    assert_eq!(std::fs::read_dir(&servers.0).unwrap().count(), 0);

    // A key left in the server's variable's folder is not silently replaced by a new one.
    let env = [
        ("SOCP_DATA_DIR", mine.0.to_str().unwrap()),
        ("HOME", home.0.to_str().unwrap()),
        ("XDG_DATA_HOME", ""),
    ];
    let run = run_socp(&["--server", &url, "--name", "alice"], "", &env);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.err.contains("SOCP_CLIENT_DATA_DIR"), "{run:?}");
    assert!(!home.0.join(".local/share/socp/alice.json").exists());
}
