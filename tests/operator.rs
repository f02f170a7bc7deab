//! What an operator meets starting the real `socp-server`: the help, boolean environment
//! variables, and start-up errors that name their cause.

mod common;

use common::keys::test_key;
use common::proc::{TempDir, WAIT};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

fn server() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_socp-server"));
    cmd.env_remove("SOCP_DATA_DIR")
        .env_remove("SOCP_DB")
        .env_remove("SOCP_SERVER_KEYFILE")
        .env_remove("SOCP_OPEN_JOIN")
        .env_remove("SOCP_BOOTSTRAP")
        .env_remove("XDG_DATA_HOME")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

/// Root ignores file modes; a test about a read-only file runs the server as `nobody` then,
/// owning its data directory.
fn as_unprivileged(cmd: &mut Command, dir: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    const NOBODY: u32 = 65534;
    chown_tree(dir, NOBODY);
    cmd.uid(NOBODY).gid(NOBODY);
}

fn chown_tree(path: &Path, id: u32) {
    std::os::unix::fs::chown(path, Some(id), Some(id)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), id);
        }
    }
}

/// Runs the server to the end (it is expected to fail at start).
fn run_to_exit(cmd: &mut Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(WAIT)
        .expect("the server exits at once")
        .unwrap()
}

/// Starts the server, waits for its "listening" line, and stops it with SIGTERM. Returns the
/// line, or what it wrote to stderr when it exited instead.
fn start_and_stop(cmd: &mut Command) -> Result<String, String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(WAIT).unwrap_or_default();
    if line.starts_with("socp-server listening on ") {
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if line.starts_with("socp-server listening on ") {
        assert!(out.status.success(), "{:?}: {stderr}", out.status);
        Ok(line + &stderr)
    } else {
        Err(stderr)
    }
}

fn write_key(dir: &Path, key_name: &str) {
    let key = test_key(key_name);
    let body = json!({"server_id": format!("srv-{key_name}"), "private_key": key.to_pem()});
    std::fs::write(dir.join("server.key"), body.to_string()).unwrap();
    std::fs::set_permissions(dir.join("server.key"), PermissionsExt::from_mode(0o600)).unwrap();
}

#[test]
fn help_shows_the_data_directory_it_would_use() {
    let home = TempDir::new("help-home");
    let out = server()
        .arg("--help")
        .env("HOME", &home.0)
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let expected = home.0.join(".local/share/socp-server");
    assert!(
        help.contains(&format!("{}", expected.display())),
        "{expected:?} not in:\n{help}"
    );

    let out = server()
        .arg("--help")
        .env("SOCP_DATA_DIR", "/srv/socp-data")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("/srv/socp-data"), "{help}");
}

#[test]
fn a_data_directory_that_is_a_file_is_named_with_the_reason() {
    let tmp = TempDir::new("dd-file");
    let file = tmp.0.join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    for dir in [file.clone(), file.join("below")] {
        let out = run_to_exit(server().args(["--port", "0", "--data-dir"]).arg(&dir));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{dir:?}: {stderr}");
        assert_ne!(out.status.code(), Some(2), "not a usage error: {stderr}");
        assert!(
            stderr.contains(&format!("data directory {}", dir.display())),
            "{dir:?}: {stderr}"
        );
        assert!(stderr.contains("not a directory"), "{dir:?}: {stderr}");
    }
}

/// A read-only `socp.db` is reported as such before SQLite touches it, and once the operator
/// makes it writable again the server starts (no read-only `-shm` left behind blocks it).
#[test]
fn a_read_only_database_is_reported_and_recovers_after_chmod() {
    let tmp = TempDir::new("ro-db");
    let dir = tmp.0.join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, PermissionsExt::from_mode(0o700)).unwrap();
    write_key(&dir, "server1");
    let mut cmd = server();
    cmd.args(["--port", "0", "--data-dir"]).arg(&dir);
    as_unprivileged(&mut cmd, &dir);
    start_and_stop(&mut cmd).expect("a first start creates the database");

    let db = dir.join("socp.db");
    std::fs::set_permissions(&db, PermissionsExt::from_mode(0o400)).unwrap();
    let mut cmd = server();
    cmd.args(["--port", "0", "--data-dir"]).arg(&dir);
    as_unprivileged(&mut cmd, &dir);
    let stderr = start_and_stop(&mut cmd).expect_err("a read-only database stops the start");
    assert!(
        stderr.contains(&format!("database {}", db.display())) && stderr.contains("not writable"),
        "{stderr}"
    );
    for companion in ["socp.db-shm", "socp.db-wal"] {
        if let Ok(meta) = std::fs::metadata(dir.join(companion)) {
            assert!(
                meta.permissions().mode() & 0o200 != 0,
                "{companion} left read-only"
            );
        }
    }

    // The operator fixes the mode; even a read-only -shm left by an older version is repaired.
    std::fs::set_permissions(&db, PermissionsExt::from_mode(0o600)).unwrap();
    let shm = dir.join("socp.db-shm");
    std::fs::write(&shm, b"").unwrap();
    std::fs::set_permissions(&shm, PermissionsExt::from_mode(0o400)).unwrap();
    let mut cmd = server();
    cmd.args(["--port", "0", "--data-dir"]).arg(&dir);
    as_unprivileged(&mut cmd, &dir);
    start_and_stop(&mut cmd).expect("starts once the database is writable again");
}

#[test]
fn print_pubkey_touches_only_the_key_file() {
    let tmp = TempDir::new("pk-only");
    let dir = tmp.0.join("data");
    let out = server()
        .args(["--print-pubkey", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8(out.stdout).unwrap().trim().is_empty());
    assert!(dir.join("server.key").exists());
    assert!(!dir.join("socp.db").exists(), "no database created");

    // An existing key is printed as it is, still without a database.
    std::fs::remove_file(dir.join("server.key")).unwrap();
    write_key(&dir, "server2");
    let out = server()
        .args(["--print-pubkey", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        test_key("server2").public_key().encoded()
    );
    assert!(!dir.join("socp.db").exists(), "no database created");
}

#[test]
fn boolean_environment_variables_take_the_usual_spellings_or_exit_2() {
    let tmp = TempDir::new("bool-env");
    write_key(&tmp.0, "server1");
    let line = start_and_stop(
        server()
            .args(["--port", "0", "--data-dir"])
            .arg(&tmp.0)
            .env("SOCP_OPEN_JOIN", "yes"),
    )
    .expect("SOCP_OPEN_JOIN=yes is accepted");
    assert!(
        line.contains("open join"),
        "the server says it accepts unpinned servers: {line}"
    );

    let out = run_to_exit(
        server()
            .args(["--port", "0", "--data-dir"])
            .arg(&tmp.0)
            .env("SOCP_OPEN_JOIN", "maybe"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("SOCP_OPEN_JOIN") && stderr.contains("maybe"),
        "{stderr}"
    );
}

/// `contrib/socp-server.service` keeps the data in its state directory, stops with the signal
/// the server handles, and carries the hardening it promises; `systemd-analyze verify` accepts
/// it where systemd is installed.
#[test]
fn the_service_unit_is_hardened_and_verifies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("contrib/socp-server.service")).unwrap();
    let lines: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for wanted in [
        "ExecStart=/usr/local/bin/socp-server",
        "DynamicUser=yes",
        "StateDirectory=socp-server",
        "Environment=SOCP_DATA_DIR=%S/socp-server",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
        "LockPersonality=yes",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "KillSignal=SIGTERM",
        "WantedBy=multi-user.target",
    ] {
        assert!(lines.contains(&wanted), "{wanted:?} missing from the unit");
    }

    let analyze = Command::new("systemd-analyze").arg("--version").output();
    if !analyze.is_ok_and(|o| o.status.success()) {
        eprintln!("systemd-analyze not installed: verify skipped");
        return;
    }
    // The unit as installed, but starting the binary under test (verify checks it exists).
    let tmp = TempDir::new("unit");
    let copy = tmp.0.join("socp-server.service");
    let local = unit.replace(
        "ExecStart=/usr/local/bin/socp-server",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_socp-server")),
    );
    std::fs::write(&copy, local).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn the_licence_is_mit_or_apache_2() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"MIT OR Apache-2.0\""));
    let mit = std::fs::read_to_string(root.join("LICENSE-MIT")).unwrap();
    assert!(mit.contains("Copyright (c) 2026 the socp authors"), "{mit}");
    let apache = std::fs::read_to_string(root.join("LICENSE-APACHE")).unwrap();
    assert!(apache.contains("Version 2.0, January 2004"));
}
