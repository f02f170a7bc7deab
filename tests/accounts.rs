//! Accounts (issue 4, PROTOCOL.md §5.3) against the real binaries.

mod common;

use common::proc::{Raw, ServerProc, TempDir, WAIT, frame};
use serde_json::json;
use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `socp ARGS` against `server` with `input` on stdin; returns (success, stdout, stderr).
fn socp(server: &ServerProc, dir: &TempDir, args: &[&str], input: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_socp"))
        .args(["--server", &server.url(), "--data-dir"])
        .arg(&dir.0)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "socp {args:?} did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn password_file(dir: &TempDir, name: &str, password: &str) -> String {
    let path = dir.0.join(name);
    std::fs::write(&path, format!("{password}\n")).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn register_then_log_in_from_a_fresh_client_and_chat_with_bob_on_another_server() {
    let (server, server_b) = common::proc::linked_pair(&[]);
    let first = TempDir::new("acct-a");
    let pw = password_file(&first, "pw", "correct horse battery");
    let (ok, out, err) = socp(
        &server,
        &first,
        &["--register", "alice", "--password-file", &pw],
        "",
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("* registered alice as "), "{out}");
    assert!(out.contains("* connected as alice"), "{out}");

    // A fresh client: new data directory, no key file anywhere.
    let fresh = TempDir::new("acct-b");
    let pw2 = password_file(&fresh, "pw", "correct horse battery");
    let bob_dir = TempDir::new("acct-bob");
    let mut bob = common::proc::Line::start(&server_b, "bob", "user2", &bob_dir.0);
    let (ok, out, err) = socp(
        &server,
        &fresh,
        &["--login", "alice", "--password-file", &pw2],
        "/tell bob hello from an account\n",
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("* connected as alice"), "{out}");
    let line = bob.expect("[dm] alice: hello from an account");
    assert!(!line.contains("NOT AUTHENTIC"), "{line}");
    let entries: Vec<_> = std::fs::read_dir(&fresh.0).unwrap().collect();
    assert!(
        entries.iter().all(|e| !e
            .as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".json")
            || ["server-pins.json", "user-pins.json"]
                .contains(&e.as_ref().unwrap().file_name().to_str().unwrap())),
        "logging in must not need or write a key file"
    );
}

#[test]
fn wrong_password_and_unknown_name_get_identical_answers() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("acct-same");
    let pw = password_file(&dir, "pw", "s3cret");
    assert!(
        socp(
            &server,
            &dir,
            &["--register", "alice", "--password-file", &pw],
            ""
        )
        .0
    );

    let wrong = socp::account::auth_token("not it", "alice");
    let unknown = socp::account::auth_token("s3cret", "nobody");
    let mut answers = Vec::new();
    for (name, auth) in [("alice", wrong), ("nobody", unknown)] {
        let mut raw = Raw::connect(&server);
        let login = json!({"display_name": name, "auth": auth});
        raw.send_text(&frame("USER_LOGIN", "", "", &login, None));
        let reply = raw.recv();
        assert_eq!(reply.kind, "ERROR");
        answers.push(reply.payload);
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0]["code"], "BAD_KEY");
    assert_eq!(answers[0]["detail"], "invalid credentials");

    // The right password works through the same frames.
    let mut raw = Raw::connect(&server);
    let login =
        json!({"display_name": "alice", "auth": socp::account::auth_token("s3cret", "alice")});
    raw.send_text(&frame("USER_LOGIN", "", "", &login, None));
    let ok = raw.recv_kind("USER_LOGGED_IN");
    assert!(ok.payload["privkey_store"].as_str().unwrap().len() > 100);
}

#[test]
fn a_display_name_is_registered_once() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("acct-twice");
    let pw = password_file(&dir, "pw", "pw-one");
    assert!(
        socp(
            &server,
            &dir,
            &["--register", "alice", "--password-file", &pw],
            ""
        )
        .0
    );
    let pw2 = password_file(&dir, "pw2", "pw-two");
    let (ok, _, err) = socp(
        &server,
        &dir,
        &["--register", "alice", "--password-file", &pw2],
        "",
    );
    assert!(!ok);
    assert!(err.contains("NAME_IN_USE"), "{err}");
}

#[test]
fn an_account_survives_kill_9_right_after_registering() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("acct-durable");
    let pw = password_file(&dir, "pw", "durable");
    let (ok, out, _) = socp(
        &server,
        &dir,
        &["--register", "carol", "--password-file", &pw],
        "",
    );
    assert!(ok, "{out}");
    let server = server.restart(&[]); // SIGKILL, then start on the same database
    let (ok, out, err) = socp(
        &server,
        &dir,
        &["--login", "carol", "--password-file", &pw],
        "",
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("* connected as carol"), "{out}");
}

#[test]
fn login_attempts_are_rate_limited_per_connection_and_per_name_and_address() {
    let server = ServerProc::start("server1", &[]);
    let bad = socp::account::auth_token("guess", "victim");
    let attempt = |raw: &mut Raw, name: &str| {
        let login = json!({"display_name": name, "auth": bad});
        raw.send_text(&frame("USER_LOGIN", "", "", &login, None));
        raw.recv_kind("ERROR").payload["detail"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Per connection: 5 attempts, then refused (whatever the name).
    let mut raw = Raw::connect(&server);
    for i in 0..5 {
        assert_eq!(attempt(&mut raw, &format!("n{i}")), "invalid credentials");
    }
    assert!(attempt(&mut raw, "n5").starts_with("too many login attempts"));

    // Per name from one address: 10 attempts, then refused even on fresh connections.
    for _ in 0..2 {
        let mut raw = Raw::connect(&server);
        for _ in 0..5 {
            assert_eq!(attempt(&mut raw, "victim"), "invalid credentials");
        }
    }
    let mut raw = Raw::connect(&server);
    assert!(attempt(&mut raw, "victim").starts_with("too many login attempts"));
    // Others are not slowed down: another name on the same fresh connection still works.
    assert_eq!(attempt(&mut raw, "someone-else"), "invalid credentials");
}

#[test]
fn the_password_never_reaches_the_server() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("acct-secret");
    let secret = "Tr0ub4dor&3-unique-marker";
    let pw = password_file(&dir, "pw", secret);
    assert!(
        socp(
            &server,
            &dir,
            &["--register", "dave", "--password-file", &pw],
            ""
        )
        .0
    );
    let mut everything = Vec::new();
    for entry in std::fs::read_dir(&server.dir.0).unwrap() {
        everything.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let text = String::from_utf8_lossy(&everything);
    assert!(
        !text.contains(secret),
        "the password is in the server's files"
    );
    assert!(text.contains("dave"), "the account should be stored");
}

/// `USER_REGISTER` for `name` on a fresh connection, signed by the fixture key `key_name`;
/// returns the reply.
fn register_raw(server: &ServerProc, name: &str, key_name: &str) -> socp::wire::Envelope {
    let key = common::keys::test_key(key_name);
    let user_id = format!("id-{name}");
    let payload = json!({
        "user_id": user_id,
        "pubkey": key.public_key().encoded(),
        "privkey_store": "c2VhbGVk",
        "auth": socp::b64::encode(&[7; 32]),
        "meta": {"display_name": name},
    });
    let mut raw = Raw::connect(server);
    raw.send_text(&frame("USER_REGISTER", &user_id, "", &payload, Some(&key)));
    raw.recv()
}

/// Issue "storage that disappears is not noticed": with socp.db and its -wal/-shm deleted while
/// the server ran, registrations kept being acknowledged and were gone after a restart. §11: an
/// account write is durable before the client is told it succeeded, so the server must refuse.
#[test]
fn a_registration_is_refused_once_the_database_files_are_deleted() {
    let server = ServerProc::start("server1", &[]);
    assert_eq!(
        register_raw(&server, "before", "user1").kind,
        "USER_REGISTERED"
    );
    for suffix in ["", "-wal", "-shm"] {
        let path = server.dir.0.join(format!("socp.db{suffix}"));
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let reply = register_raw(&server, "after", "user2");
    assert_eq!(reply.kind, "ERROR", "{reply:?}");
    assert_eq!(reply.payload["code"], "TIMEOUT");
    assert_eq!(reply.payload["detail"], "storage unavailable, try again");
    server.wait_log("no longer the file at");
    // Still refused: nothing is acknowledged into a database that the next start will not open.
    assert_eq!(register_raw(&server, "later", "user3").kind, "ERROR");
}
