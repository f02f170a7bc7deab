//! Accounts (issue 4, PROTOCOL.md §5.3) against the real binaries.

mod common;

use common::proc::{Raw, Run, ServerProc, TempDir, frame, run_socp};
use serde_json::json;
use std::process::Command;

/// Runs `socp ARGS` against `server` with `input` on stdin; returns (success, stdout, stderr).
fn socp(server: &ServerProc, dir: &TempDir, args: &[&str], input: &str) -> (bool, String, String) {
    let run = socp_run(server, dir, args, input);
    (run.code == Some(0), run.out, run.err)
}

/// Runs `socp --server URL --data-dir DIR ARGS` to completion.
fn socp_run(server: &ServerProc, dir: &TempDir, args: &[&str], input: &str) -> Run {
    let url = server.url();
    let data = dir.0.to_string_lossy().into_owned();
    let mut all = vec!["--server", &url, "--data-dir", &data];
    all.extend_from_slice(args);
    run_socp(&all, input, &[])
}

/// Registers the account "alice" (password "correct horse battery") with `socp` from `dir`,
/// asserting it worked; returns the password file's path.
fn register_alice(server: &ServerProc, dir: &TempDir) -> String {
    let pw = password_file(dir, "pw", "correct horse battery");
    let run = socp_run(
        server,
        dir,
        &["--register", "alice", "--password-file", &pw],
        "",
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    pw
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
    let pw = password_file(&dir, "pw", "s3cret-pw");
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
    let unknown = socp::account::auth_token("s3cret-pw", "nobody");
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
        json!({"display_name": "alice", "auth": socp::account::auth_token("s3cret-pw", "alice")});
    raw.send_text(&frame("USER_LOGIN", "", "", &login, None));
    let ok = raw.recv_kind("USER_LOGGED_IN");
    assert!(ok.payload["privkey_store"].as_str().unwrap().len() > 100);
}

#[test]
fn a_display_name_is_registered_once() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("acct-twice");
    let pw = password_file(&dir, "pw", "password-one");
    assert!(
        socp(
            &server,
            &dir,
            &["--register", "alice", "--password-file", &pw],
            ""
        )
        .0
    );
    let pw2 = password_file(&dir, "pw2", "password-two");
    let (ok, _, err) = socp(
        &server,
        &dir,
        &["--register", "alice", "--password-file", &pw2],
        "",
    );
    assert!(!ok);
    assert!(err.contains("NAME_IN_USE"), "{err}");
    let run = socp_run(
        &server,
        &dir,
        &["--register", "alice", "--password-file", &pw2],
        "",
    );
    assert_eq!(
        run.code,
        Some(5),
        "a name taken is a credentials failure: {run:?}"
    );
}

#[test]
fn an_account_survives_kill_9_right_after_registering() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("acct-durable");
    let pw = password_file(&dir, "pw", "durable-pw");
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
        "auth": socp::wire::b64::encode(&[7; 32]),
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

// -------------------------------------------------------------------- passwords and exit codes

#[test]
fn register_refuses_a_password_shorter_than_8_characters() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("acct-short");
    let pw = password_file(&dir, "pw", "1234567");
    let run = socp_run(
        &server,
        &dir,
        &["--register", "alice", "--password-file", &pw],
        "",
    );
    assert_eq!(run.code, Some(5), "{run:?}");
    assert!(run.err.contains("too short"), "{run:?}");
    assert!(run.err.contains("at least 8 characters"), "{run:?}");
    // Nothing was registered: the name is still free.
    let pw = password_file(&dir, "pw8", "12345678");
    let run = socp_run(
        &server,
        &dir,
        &["--register", "alice", "--password-file", &pw],
        "",
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.out.contains("* registered alice as "), "{run:?}");
}

#[test]
fn an_account_with_a_short_password_from_before_the_rule_still_logs_in() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("acct-old");
    let key = common::keys::test_key("user3");
    let register = json!({
        "user_id": "id-old",
        "pubkey": key.public_key().encoded(),
        "privkey_store": socp::account::seal_private_key(&key, "short"),
        "auth": socp::account::auth_token("short", "old"),
        "meta": {"display_name": "old"},
    });
    let mut raw = Raw::connect(&server);
    raw.send_text(&frame("USER_REGISTER", "id-old", "", &register, Some(&key)));
    raw.recv_kind("USER_REGISTERED");
    let pw = password_file(&dir, "pw", "short");
    let run = socp_run(
        &server,
        &dir,
        &["--login", "old", "--password-file", &pw],
        "",
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.out.contains("* connected as old (id-old)"), "{run:?}");
}

/// Runs `argv` under a pseudo-terminal (python3's `pty`): for each `(prompt, answer)` waits for
/// `prompt` in the output, then types `answer`. Returns the exit code and the whole output, or
/// `None` when python3 is not available.
fn under_pty(argv: &[&str], steps: &[(&str, &str)]) -> Option<(i32, String)> {
    const SCRIPT: &str = r#"
import json, os, pty, select, sys, time
steps = json.loads(sys.argv[1])
argv = sys.argv[2:]
pid, fd = pty.fork()
if pid == 0:
    os.execv(argv[0], argv)
out = b""
deadline = time.time() + 30
def read_some():
    global out
    r, _, _ = select.select([fd], [], [], 0.2)
    if r:
        try:
            data = os.read(fd, 4096)
        except OSError:
            return False
        if not data:
            return False
        out += data
    return time.time() < deadline
pos = 0
for want, answer in steps:
    while want.encode() not in out[pos:]:
        if not read_some():
            break
    if want.encode() not in out[pos:]:
        break
    pos = out.index(want.encode(), pos) + len(want)
    time.sleep(0.3)  # as a person would: after the prompt, once echo is off
    os.write(fd, (answer + "\n").encode())
while read_some():
    pass
if time.time() >= deadline:
    os.kill(pid, 9)
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;
    let steps = serde_json::to_string(steps).unwrap();
    let out = Command::new("python3")
        .args(["-c", SCRIPT, &steps])
        .args(argv)
        .output()
        .ok()?;
    Some((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

#[test]
fn register_at_a_terminal_asks_for_the_password_twice() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("acct-tty");
    let url = server.url();
    let data = dir.0.to_string_lossy().into_owned();
    let argv = [
        env!("CARGO_BIN_EXE_socp"),
        "--server",
        &url,
        "--data-dir",
        &data,
        "--register",
        "alice",
    ];
    let Some((code, out)) = under_pty(
        &argv,
        &[("New password", "password-one"), ("Repeat", "password-two")],
    ) else {
        eprintln!("skipped: python3 is not available");
        return;
    };
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("passwords do not match"), "{out}");
    assert!(!out.contains("password-one"), "echoed: {out}");

    let (code, out) = under_pty(&argv, &[("New password", "2short")]).unwrap();
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("password too short"), "{out}");

    let (code, out) = under_pty(
        &argv,
        &[
            ("New password", "password-one"),
            ("Repeat", "password-one"),
            ("connected as alice", "/quit"),
        ],
    )
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("* registered alice as "), "{out}");
}

#[test]
fn login_on_a_fresh_machine_creates_the_data_directory_and_pins_the_server() {
    let server = ServerProc::start("server1", &[]);
    let first = TempDir::new("acct-first");
    let pw = register_alice(&server, &first);

    let fresh = TempDir::new("acct-fresh");
    let data = fresh.0.join("not").join("yet");
    let url = server.url();
    let run = run_socp(
        &[
            "--server",
            &url,
            "--data-dir",
            data.to_str().unwrap(),
            "--login",
            "alice",
            "--password-file",
            &pw,
        ],
        "",
        &[],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(!run.err.contains("cannot save server pin"), "{run:?}");
    assert!(data.join("server-pins.json").exists(), "{run:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&data).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn bad_credentials_exit_5() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("acct-bad");
    register_alice(&server, &dir);
    let wrong = password_file(&dir, "wrong", "not the password");
    let run = socp_run(
        &server,
        &dir,
        &["--login", "alice", "--password-file", &wrong],
        "",
    );
    assert_eq!(run.code, Some(5), "{run:?}");
    assert!(run.err.contains("invalid credentials"), "{run:?}");

    let run = socp_run(
        &server,
        &dir,
        &["--login", "alice", "--password-file", &wrong, "--json"],
        "",
    );
    assert_eq!(run.code, Some(5), "{run:?}");
    let fatal: serde_json::Value = serde_json::from_str(run.out.trim()).expect("one JSON line");
    assert_eq!(fatal["event"], "fatal");
    assert_eq!(fatal["code"], "BAD_CREDENTIALS");
    assert_eq!(fatal["exit"], 5);
}

#[test]
fn a_key_file_user_cannot_take_a_registered_accounts_name() {
    let server = ServerProc::start("server1", &[]);
    let dir = TempDir::new("acct-squat");
    let pw = register_alice(&server, &dir);
    // Another key (a key file on some machine) calling itself alice.
    let key = common::keys::test_key("user2");
    let body = json!({"user_id": "id-squatter", "display_name": "alice",
                      "private_key": key.to_pem()});
    std::fs::write(dir.0.join("alice.json"), body.to_string()).unwrap();
    let run = socp_run(&server, &dir, &["--name", "alice"], "/tell alice hi\n");
    assert_eq!(run.code, Some(5), "{run:?}");
    assert!(run.out.contains("NAME_IN_USE"), "{run:?}");
    assert!(!run.out.contains("* connected as"), "{run:?}");
    // The account itself still logs in.
    let run = socp_run(
        &server,
        &dir,
        &["--login", "alice", "--password-file", &pw],
        "",
    );
    assert_eq!(run.code, Some(0), "{run:?}");
}
