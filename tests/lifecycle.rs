//! Start, identity, restart and shutdown of the real `socp-server`.

mod common;

use common::keys::test_key;
use common::proc::{Raw, ServerProc, TempDir};
use serde_json::json;
use std::process::Command;

#[test]
fn sigterm_closes_users_with_1001_and_exits_zero() {
    let mut server = ServerProc::start("server1", &[]);
    let mut alice = Raw::hello(&server, "alice", &test_key("user1"));
    let status = server.terminate();
    assert_eq!(alice.expect_close(), 1001);
    assert!(status.success(), "{status:?}");
}

#[test]
fn no_arguments_creates_identity_and_listens_on_the_default_port_config() {
    // `--port 0` stands in for 8765 so parallel tests cannot collide; everything else is default.
    let home = TempDir::new("home");
    let mut child = Command::new(env!("CARGO_BIN_EXE_socp-server"))
        .args(["--port", "0"])
        .env("HOME", &home.0)
        .env_remove("XDG_DATA_HOME")
        .env_remove("SOCP_DATA_DIR")
        .env_remove("SOCP_DB")
        .env_remove("SOCP_SERVER_KEYFILE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let line = out.next().unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.starts_with("socp-server listening on ws://127.0.0.1:"),
        "{line}"
    );
    let data = home.0.join(".local/share/socp-server");
    let key = data.join("server.key");
    assert!(data.join("socp.db").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn print_pubkey_prints_the_pinnable_key() {
    let dir = TempDir::new("pk");
    let key = test_key("server2");
    let key_file = json!({"server_id": "srv-b", "private_key": key.to_pem()});
    std::fs::write(dir.0.join("server.key"), key_file.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_socp-server"))
        .args(["--print-pubkey", "--data-dir"])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        key.public_key().encoded()
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["--port", "banana"][..],
        &["--frobnicate"],
        &["--bootstrap", "ws://x:1"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_socp-server"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    for args in [
        &["--frobnicate"][..],
        &["--name", "no spaces"],
        &["--name", "a", "--login", "b"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_socp"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "socp {args:?}");
    }
}

#[test]
fn identity_and_key_bindings_survive_a_restart() {
    let server = ServerProc::start("server1", &[]);
    drop(Raw::hello(&server, "alice", &test_key("user1")));
    let server = server.restart(&[]);
    // Same id, another key: refused, the binding is in the database (§5.2).
    let mut raw = Raw::connect(&server);
    let other = test_key("user2");
    let pubkey = other.public_key().encoded();
    raw.send_text(&common::proc::frame(
        "USER_HELLO",
        "alice",
        "",
        &json!({"client": "t", "pubkey": pubkey, "enc_pubkey": pubkey}),
        None,
    ));
    let err = raw.recv_kind("ERROR");
    assert_eq!(err.payload["code"], "BAD_KEY");
    // The right key still works.
    let mut alice = Raw::hello(&server, "alice", &test_key("user1"));
    assert_eq!(alice.list(&server), vec!["alice"]);
}
