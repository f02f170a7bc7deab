//! Real processes over loopback: a `socp-server` on an ephemeral port, raw WebSocket clients
//! that speak frames by hand, and `socp` line clients driven through their stdin/stdout.
//! Everything started here is killed and reaped on drop; temporary directories are removed.

use super::keys::test_key;
use serde_json::{Value, json};
use socp::crypto::PrivateKey;
use socp::wire::{Envelope, SignedPayload, encode_frame};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

/// Generous: CI machines are slow and shared. Tests wait only as long as they must.
pub const WAIT: Duration = Duration::from_secs(15);

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("socp-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `socp-server`.
pub struct ServerProc {
    pub child: Child,
    pub port: u16,
    /// It serves `wss://` (its address line said so).
    pub tls: bool,
    pub server_id: String,
    pub key: PrivateKey,
    pub dir: TempDir,
    /// Lines the server logged (stderr), collected in the background.
    pub log: Receiver<String>,
}

impl ServerProc {
    /// Starts a server with the fixture key `key_name` and extra flags.
    pub fn start(key_name: &str, extra: &[&str]) -> ServerProc {
        let dir = TempDir::new("srv");
        let key = test_key(key_name);
        let server_id = format!("srv-{key_name}");
        let key_file = json!({"server_id": server_id, "private_key": key.to_pem()});
        std::fs::write(dir.0.join("server.key"), key_file.to_string()).unwrap();
        Self::start_in(dir, key, server_id, extra)
    }

    /// Starts (or restarts) a server whose key file is already in `dir`, on any free port.
    pub fn start_in(dir: TempDir, key: PrivateKey, server_id: String, extra: &[&str]) -> Self {
        Self::start_in_on(dir, key, server_id, 0, extra)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("server never logged {needle:?}");
    }

    /// Waits for a log line containing any of `needles`; returns it.
    pub fn wait_log_any(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) if needles.iter().any(|n| line.contains(n)) => return line,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("server never logged any of {needles:?}");
    }

    /// Kills the process (`kill -9`) and starts it again on the same data directory.
    pub fn restart(mut self, extra: &[&str]) -> ServerProc {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, TempDir(PathBuf::new()));
        let key = PrivateKey::from_pem(&self.key.to_pem()).unwrap();
        Self::start_in(dir, key, self.server_id.clone(), extra)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines_of(stream: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A WebSocket client that speaks raw frames.
pub struct Raw {
    pub ws: WebSocket<TcpStream>,
    pub user_id: String,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A frame as a user sends it: unsigned unless `key` is given.
pub fn frame(
    kind: &str,
    from: &str,
    to: &str,
    payload: &Value,
    key: Option<&PrivateKey>,
) -> String {
    let signed = match key {
        Some(k) => SignedPayload::sign(payload, k).unwrap(),
        None => SignedPayload::unsigned(payload).unwrap(),
    };
    encode_frame(kind, from, to, now_ms(), &signed)
}

impl Raw {
    pub fn connect(server: &ServerProc) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (ws, _) = tungstenite::client(server.url(), stream).expect("handshake");
        Raw {
            ws,
            user_id: String::new(),
        }
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).unwrap();
    }

    /// The next text frame, parsed. Panics on timeout or close.
    pub fn recv(&mut self) -> Envelope {
        loop {
            match self.ws.read().expect("read frame") {
                Message::Text(t) => return Envelope::parse(&t).expect("server frame parses"),
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => {}
            }
        }
    }

    /// The next frame of type `kind`, skipping others (presence traffic etc.).
    pub fn recv_kind(&mut self, kind: &str) -> Envelope {
        loop {
            let env = self.recv();
            if env.kind == kind {
                return env;
            }
        }
    }

    /// Reads until the server closes; returns the close code.
    pub fn expect_close(&mut self) -> u16 {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(frame))) => return frame.code.into(),
                Ok(Message::Close(None)) => return 1005,
                Ok(_) => {}
                Err(e) => panic!("no close frame: {e}"),
            }
        }
    }

    /// The full hello (§5.2) as `user_id` with `key`; returns after `USER_HELLO_ACK`.
    pub fn hello(server: &ServerProc, user_id: &str, key: &PrivateKey) -> Raw {
        let mut raw = Raw::connect(server);
        raw.user_id = user_id.to_string();
        let pubkey = key.public_key().encoded();
        let hello = json!({"client": "test", "pubkey": pubkey, "enc_pubkey": pubkey,
                           "meta": {"display_name": user_id}});
        raw.send_text(&frame("USER_HELLO", user_id, "", &hello, None));
        let ch = raw.recv_kind("AUTH_CHALLENGE");
        let nonce = ch.payload["nonce"].as_str().unwrap();
        let resp = json!({"nonce": nonce, "server_id": server.server_id, "user_id": user_id});
        raw.send_text(&frame(
            "AUTH_RESPONSE",
            user_id,
            &server.server_id,
            &resp,
            Some(key),
        ));
        let ack = raw.recv_kind("USER_HELLO_ACK");
        assert_eq!(ack.payload["user_id"], user_id);
        raw
    }

    /// Sends `LIST_REQUEST` and returns the user ids of the `LIST_RESPONSE`.
    pub fn list(&mut self, server: &ServerProc) -> Vec<String> {
        let f = frame(
            "LIST_REQUEST",
            &self.user_id.clone(),
            &server.server_id,
            &json!({}),
            None,
        );
        self.send_text(&f);
        let resp = self.recv_kind("LIST_RESPONSE");
        resp.payload["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["user_id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// A `socp` line client driven through stdin/stdout.
pub struct Line {
    pub child: Child,
    stdin: Option<ChildStdin>,
    out: Receiver<String>,
    /// Every line seen so far.
    pub seen: Vec<String>,
}

impl Line {
    /// Starts `socp --name name` against `server`, with the fixture key `key_name` pre-placed
    /// in its data directory (`dir`).
    pub fn start(server: &ServerProc, name: &str, key_name: &str, dir: &Path) -> Line {
        Self::start_args(server, name, key_name, dir, &[])
    }

    /// [`Line::start`] with extra `socp` arguments.
    pub fn start_args(
        server: &ServerProc,
        name: &str,
        key_name: &str,
        dir: &Path,
        extra: &[&str],
    ) -> Line {
        let key = test_key(key_name);
        let key_file = json!({"user_id": format!("id-{name}"), "display_name": name,
                              "private_key": key.to_pem()});
        let path = dir.join(format!("{name}.json"));
        if !path.exists() {
            std::fs::write(&path, key_file.to_string()).unwrap();
            // As the client creates its key files (else it warns that others can read it).
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_socp"))
            .args(["--server", &server.url(), "--name", name, "--data-dir"])
            .arg(dir)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start socp");
        let out = lines_of(child.stdout.take().unwrap());
        let stdin = child.stdin.take();
        let mut line = Line {
            child,
            stdin,
            out,
            seen: Vec::new(),
        };
        line.expect("* connected as");
        line
    }

    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{text}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin (end of input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for an output line containing `needle`; returns it.
    pub fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.out.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("never saw {needle:?}; saw {:#?}", self.seen);
    }

    /// Collects output lines for `quiet` after the last one (to check something did NOT come).
    pub fn drain_for(&mut self, quiet: Duration) -> Vec<String> {
        let mut got = Vec::new();
        while let Ok(line) = self.out.recv_timeout(quiet) {
            self.seen.push(line.clone());
            got.push(line);
        }
        got
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "socp did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reserves `n` distinct free loopback ports: binds `127.0.0.1:0` for each (all at once, so
/// they differ), reads the ports, and releases them. A server started on one right after
/// (`ServerProc::start_on`) gets it unless something else grabbed it in between, which the
/// kernel makes unlikely (it hands out ports for `bind(0)` and outgoing connections from
/// disjoint halves of the ephemeral range).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl ServerProc {
    /// Like [`ServerProc::start`], but listening on `port` (known in advance, so that other
    /// servers can be given it with `--bootstrap` before this one starts).
    pub fn start_on(key_name: &str, port: u16, extra: &[&str]) -> ServerProc {
        Self::start_on_as(key_name, &format!("srv-{key_name}"), port, extra)
    }

    /// Like [`ServerProc::start_on`], with the server id `server_id` in the key file (e.g. an
    /// impostor holding another key under a known server's id).
    pub fn start_on_as(key_name: &str, server_id: &str, port: u16, extra: &[&str]) -> ServerProc {
        let dir = TempDir::new("srv");
        let key = test_key(key_name);
        let key_file = json!({"server_id": server_id, "private_key": key.to_pem()});
        std::fs::write(dir.0.join("server.key"), key_file.to_string()).unwrap();
        Self::start_in_on(dir, key, server_id.to_string(), port, extra)
    }

    /// Like [`ServerProc::start_in`], on `port` (0: any free port).
    pub fn start_in_on(
        dir: TempDir,
        key: PrivateKey,
        server_id: String,
        port: u16,
        extra: &[&str],
    ) -> ServerProc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_socp-server"))
            .args(["--port", &port.to_string(), "--data-dir"])
            .arg(&dir.0)
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start socp-server");
        let log = lines_of(child.stderr.take().unwrap());
        let out = lines_of(child.stdout.take().unwrap());
        let Ok(line) = out.recv_timeout(WAIT) else {
            // Most likely the port was taken: show why the server gave up.
            let _ = child.kill();
            let _ = child.wait();
            let why: Vec<String> = log.try_iter().collect();
            panic!("socp-server on port {port} did not report its address; it logged {why:#?}");
        };
        let got: u16 = line
            .split("127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        assert!(port == 0 || got == port, "{line}");
        assert!(line.contains(&format!("server_id={server_id}")), "{line}");
        ServerProc {
            child,
            port: got,
            tls: line.contains("wss://"),
            server_id,
            key,
            dir,
            log,
        }
    }

    /// `kill -9`: the process dies at once, without closing its links cleanly.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the process (`kill -9`, if still running) and starts it again on the same port
    /// and data directory (same key, id and database).
    pub fn restart_same_port(mut self, extra: &[&str]) -> ServerProc {
        self.kill9();
        let dir = std::mem::replace(&mut self.dir, TempDir(PathBuf::new()));
        let key = PrivateKey::from_pem(&self.key.to_pem()).unwrap();
        Self::start_in_on(dir, key, self.server_id.clone(), self.port, extra)
    }

    /// Waits until a log line containing each of `needles` has been seen, in any order;
    /// returns the matching lines (in the order of `needles`).
    pub fn wait_logs(&self, needles: &[&str]) -> Vec<String> {
        self.wait_logs_without(needles, &[])
    }

    /// Like [`ServerProc::wait_logs`], panicking if a line containing any of `forbidden` comes
    /// first.
    pub fn wait_logs_without(&self, needles: &[&str], forbidden: &[&str]) -> Vec<String> {
        let mut found: Vec<Option<String>> = vec![None; needles.len()];
        let mut seen: Vec<String> = Vec::new();
        let deadline = Instant::now() + WAIT;
        while found.iter().any(Option::is_none) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            let Ok(line) = self.log.recv_timeout(left) else {
                break;
            };
            seen.push(line.clone());
            if let Some(bad) = forbidden.iter().find(|f| line.contains(*f)) {
                panic!(
                    "server {} logged {bad:?} while waiting for {needles:?}: {line}\n\
                     lines seen while waiting:\n{}",
                    self.server_id,
                    seen.join("\n")
                );
            }
            for (slot, needle) in found.iter_mut().zip(needles) {
                if slot.is_none() && line.contains(needle) {
                    *slot = Some(line.clone());
                }
            }
        }
        let missing: Vec<&&str> = needles
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(n, _)| n)
            .collect();
        assert!(
            missing.is_empty(),
            "server {} never logged {missing:?}; lines seen while waiting:\n{}",
            self.server_id,
            seen.join("\n")
        );
        found.into_iter().map(Option::unwrap).collect()
    }

    /// Waits for a log line containing `needle`, panicking if a line containing any of
    /// `forbidden` comes first. Returns the line.
    pub fn wait_log_without(&self, needle: &str, forbidden: &[&str]) -> String {
        self.wait_logs_without(&[needle], forbidden).remove(0)
    }
}

/// `--bootstrap` for the fixture server `key_name` listening on `port`.
pub fn bootstrap(key_name: &str, port: u16) -> String {
    format!(
        "ws://127.0.0.1:{port}#{}",
        test_key(key_name).public_key().encoded()
    )
}

/// `--bootstrap` for the fixture server `key_name` serving `wss://` on `port`.
pub fn bootstrap_wss(key_name: &str, port: u16) -> String {
    bootstrap(key_name, port).replacen("ws://", "wss://", 1)
}

/// Servers A (server1) and B (server2), pinned to each other and linked; `extra_a` goes to A.
pub fn linked_pair(extra_a: &[&str]) -> (ServerProc, ServerProc) {
    let ports = free_ports(2);
    let (boot_a, boot_b) = (
        bootstrap("server1", ports[0]),
        bootstrap("server2", ports[1]),
    );
    let mut args_a = vec!["--bootstrap", &boot_b, "--backoff-max-ms", "300"];
    args_a.extend_from_slice(extra_a);
    let a = ServerProc::start_on("server1", ports[0], &args_a);
    let b = ServerProc::start_on(
        "server2",
        ports[1],
        &["--bootstrap", &boot_a, "--backoff-max-ms", "300"],
    );
    a.wait_log("link up with server srv-server2");
    b.wait_log("link up with server srv-server1");
    (a, b)
}

/// How a `socp` run ended: its exit code and everything it printed.
pub struct Run {
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub out: String,
    pub err: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.out, self.err
        )
    }
}

/// Runs `socp ARGS` to completion with `input` on stdin and `env` added to its environment
/// (`SOCP_*` variables of the test process are removed first). Panics if it does not exit.
pub fn run_socp(args: &[&str], input: &str, env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_socp"));
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars() {
        if name.starts_with("SOCP_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("start socp");
    let mut stdin = child.stdin.take().unwrap();
    // The client may exit before reading its input (a usage error): ignore a broken pipe.
    let _ = stdin.write_all(input.as_bytes());
    drop(stdin);
    let out = lines_of(child.stdout.take().unwrap());
    let err = lines_of(child.stderr.take().unwrap());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "socp {args:?} did not exit; printed {:?} {:?}",
                out.try_iter().collect::<Vec<_>>(),
                err.try_iter().collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let collect = |rx: Receiver<String>| rx.iter().map(|l| l + "\n").collect::<String>();
    Run {
        code: status.code(),
        out: collect(out),
        err: collect(err),
    }
}
