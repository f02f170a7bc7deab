//! TLS (issue "Ready for operators and scripts", item 7): `socp-server` serves `wss://` with
//! `--tls-cert`/`--tls-key`, `socp` dials it with `--ca-file`, and servers link over `wss://`.
//! Real processes over loopback, with the TEST-ONLY CA of `tests/fixtures/tls/`.

mod common;

use common::proc::{Line, ServerProc, TempDir, WAIT, bootstrap_wss, free_ports, run_socp};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A file of `tests/fixtures/tls/`.
fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The flags that make a server serve `wss://` with the test certificate.
fn tls_flags() -> Vec<String> {
    vec![
        "--tls-cert".into(),
        fixture("server.pem"),
        "--tls-key".into(),
        fixture("server.key"),
    ]
}

fn start_tls(key_name: &str, extra: &[&str]) -> ServerProc {
    let mut flags = tls_flags();
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    ServerProc::start(key_name, &flags)
}

/// A `socp` client of `server` that trusts the test CA.
fn client(server: &ServerProc, name: &str, key_name: &str, dir: &TempDir) -> Line {
    let ca = fixture("ca.pem");
    Line::start_args(server, name, key_name, &dir.0, &["--ca-file", &ca])
}

/// Waits until the peer closes `stream` (end of stream or a reset); false on timeout.
fn closed_by_peer(stream: &mut TcpStream, within: Duration) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn a_client_chats_over_wss_with_the_private_ca() {
    let server = start_tls("server1", &[]);
    assert!(server.tls, "the address line says wss://");
    let dir = TempDir::new("tls-chat");
    let mut alice = client(&server, "alice", "user1", &dir);
    let mut bob = client(&server, "bob", "user2", &dir);
    alice.expect("* bob is online");

    alice.send("/tell bob hello over TLS");
    bob.send("/tell alice and back é");
    bob.expect("[dm] alice: hello over TLS");
    alice.expect("[dm] bob: and back é");

    // A burst: many frames arrive in few TLS records, and what rustls has decrypted but
    // tungstenite has not read yet must still be read (no new readiness event comes for it).
    for i in 0..40 {
        alice.send(&format!("/all burst {i}"));
    }
    for i in 0..40 {
        bob.expect(&format!("[all] alice: burst {i}"));
    }
}

#[test]
fn the_ca_file_may_come_from_the_environment() {
    let server = start_tls("server1", &[]);
    let dir = TempDir::new("tls-env");
    let data = dir.0.to_str().unwrap();
    let run = run_socp(
        &[
            "--server",
            &server.url(),
            "--name",
            "alice",
            "--data-dir",
            data,
        ],
        "/list\n",
        &[("SOCP_CA_FILE", &fixture("ca.pem"))],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.out.contains("* connected as alice"), "{run:?}");
}

#[test]
fn a_client_that_does_not_trust_the_certificate_refuses_the_server() {
    let server = start_tls("server1", &[]);
    let dir = TempDir::new("tls-refuse");
    let data = dir.0.to_str().unwrap();
    let url = server.url();
    let other = fixture("other-ca.pem");
    // Another CA's file, then the system's roots (which do not hold the test CA).
    for extra in [vec!["--ca-file", other.as_str()], vec![]] {
        let mut args = vec![
            "--server",
            url.as_str(),
            "--name",
            "alice",
            "--data-dir",
            data,
        ];
        args.extend(extra.iter().copied());
        let run = run_socp(&args, "/list\n", &[]);
        assert_eq!(run.code, Some(4), "cannot connect: {run:?}");
        assert!(run.err.contains("cannot connect"), "{run:?}");
        assert!(run.err.contains("certificate"), "says why: {run:?}");
        assert!(!run.out.contains("connected as"), "{run:?}");
    }
    // A CA file that is not there is the user's mistake, said plainly.
    let run = run_socp(
        &[
            "--server",
            &url,
            "--name",
            "alice",
            "--data-dir",
            data,
            "--ca-file",
            "/nonexistent/ca.pem",
        ],
        "",
        &[],
    );
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(run.err.contains("/nonexistent/ca.pem"), "{run:?}");
}

#[test]
fn plain_connections_to_a_tls_port_fail_cleanly_and_disturb_nobody() {
    let server = start_tls("server1", &["--handshake-timeout-ms", "1000"]);
    let dir = TempDir::new("tls-plain");
    let mut alice = client(&server, "alice", "user1", &dir);
    let mut bob = client(&server, "bob", "user2", &dir);
    alice.expect("* bob is online");

    // `socp` speaking ws:// to the TLS port: cannot connect (4), promptly.
    let plain = format!("ws://127.0.0.1:{}", server.port);
    let data = dir.0.to_str().unwrap();
    let started = Instant::now();
    let run = run_socp(
        &["--server", &plain, "--name", "carol", "--data-dir", data],
        "/list\n",
        &[],
    );
    assert_eq!(run.code, Some(4), "{run:?}");
    assert!(run.err.contains("cannot connect"), "{run:?}");
    assert!(started.elapsed() < Duration::from_secs(8), "{run:?}");

    // A raw plaintext HTTP request is answered by closing the connection.
    let mut http = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        .unwrap();
    assert!(
        closed_by_peer(&mut http, WAIT),
        "plaintext request not closed"
    );
    // A connection that never starts its TLS handshake meets the handshake deadline.
    let mut idle = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    assert!(
        closed_by_peer(&mut idle, Duration::from_secs(8)),
        "a silent connection outlived the handshake deadline"
    );

    // Meanwhile the TLS users carry on.
    alice.send("/tell bob still here");
    bob.expect("[dm] alice: still here");
    bob.send("/tell alice me too");
    alice.expect("[dm] bob: me too");
    assert!(
        !alice.seen.iter().any(|l| l.contains("went offline")),
        "{:?}",
        alice.seen
    );
}

#[test]
fn two_servers_link_over_wss_and_a_dm_crosses() {
    let ports = free_ports(2);
    let (boot_a, boot_b) = (
        bootstrap_wss("server1", ports[0]),
        bootstrap_wss("server2", ports[1]),
    );
    let ca = fixture("ca.pem");
    let flags = |boot: &str| {
        let mut f = tls_flags();
        f.extend(
            [
                "--ca-file",
                &ca,
                "--bootstrap",
                boot,
                "--backoff-max-ms",
                "300",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        f
    };
    let (fa, fb) = (flags(&boot_b), flags(&boot_a));
    let fa: Vec<&str> = fa.iter().map(String::as_str).collect();
    let fb: Vec<&str> = fb.iter().map(String::as_str).collect();
    let a = ServerProc::start_on("server1", ports[0], &fa);
    let b = ServerProc::start_on("server2", ports[1], &fb);
    assert!(a.tls && b.tls);
    a.wait_log("link up with server srv-server2");
    b.wait_log("link up with server srv-server1");

    let dir = TempDir::new("tls-link");
    let mut alice = client(&a, "alice", "user1", &dir);
    let mut bob = client(&b, "bob", "user2", &dir);
    alice.expect("* bob is online");
    alice.send("/tell bob across the TLS link");
    bob.expect("[dm] alice: across the TLS link");
    bob.send("/tell alice and back");
    alice.expect("[dm] bob: and back");
}

#[test]
fn a_server_does_not_link_to_a_peer_whose_certificate_it_does_not_trust() {
    let ports = free_ports(2);
    let other = fixture("other-ca.pem");
    let fb = tls_flags();
    let fb: Vec<&str> = fb.iter().map(String::as_str).collect();
    let b = ServerProc::start_on("server2", ports[1], &fb);
    let boot_b = bootstrap_wss("server2", b.port);
    let a = ServerProc::start_on(
        "server1",
        ports[0],
        &[
            "--ca-file",
            &other,
            "--bootstrap",
            &boot_b,
            "--backoff-max-ms",
            "300",
        ],
    );
    let line = a.wait_log_without(
        &format!("dial to peer wss://127.0.0.1:{} failed", b.port),
        &["link up with"],
    );
    assert!(line.contains("certificate"), "{line}");
}

#[test]
fn tls_flags_come_in_pairs_and_bad_files_are_reported() {
    let server = env!("CARGO_BIN_EXE_socp-server");
    let dir = TempDir::new("tls-flags");
    let run = |args: &[&str]| {
        Command::new(server)
            .args(["--port", "0", "--data-dir"])
            .arg(&dir.0)
            .args(args)
            .stdin(Stdio::null())
            .env_remove("SOCP_TLS_CERT")
            .env_remove("SOCP_TLS_KEY")
            .output()
            .expect("run socp-server")
    };
    let cert = fixture("server.pem");
    let key = fixture("server.key");
    for args in [
        vec!["--tls-cert", cert.as_str()],
        vec!["--tls-key", key.as_str()],
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "usage error: {err}");
        assert!(
            err.contains("--tls-cert") && err.contains("--tls-key"),
            "{err}"
        );
    }
    // A key that is not a key: refused at start, naming the file.
    let out = run(&["--tls-cert", &cert, "--tls-key", &fixture("ca.pem")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("ca.pem"), "{err}");
}

/// Announces carry host and port only: a server that serves TLS dials the servers it learns of
/// with `wss://` (`--peer-scheme` defaults to its own). A and C know only B; they find each
/// other through B and link over TLS. (With `--peer-scheme ws` they never link.)
#[test]
fn servers_learned_of_through_a_peer_are_dialled_with_wss() {
    let ports = free_ports(3);
    let ca = fixture("ca.pem");
    let start = |key_name: &str, port: u16, boot: &[String]| {
        let mut f = tls_flags();
        f.extend(["--ca-file", &ca, "--backoff-max-ms", "300"].map(String::from));
        for b in boot {
            f.extend(["--bootstrap".to_string(), b.clone()]);
        }
        let f: Vec<&str> = f.iter().map(String::as_str).collect();
        ServerProc::start_on(key_name, port, &f)
    };
    // B pins A and C; A and C pin only B, and learn of each other from it.
    let b = start(
        "server2",
        ports[1],
        &[
            bootstrap_wss("server1", ports[0]),
            bootstrap_wss("server3", ports[2]),
        ],
    );
    let a = start("server1", ports[0], &[bootstrap_wss("server2", ports[1])]);
    let c = start("server3", ports[2], &[bootstrap_wss("server2", ports[1])]);
    b.wait_logs(&[
        "link up with server srv-server1",
        "link up with server srv-server3",
    ]);
    // Whichever of A and C dials the other, it dials a server it learned of: with wss://.
    a.wait_log("link up with server srv-server3");
    c.wait_log("link up with server srv-server1");

    let dir = TempDir::new("tls-gossip");
    let mut ann = client(&a, "ann", "user1", &dir);
    let mut cat = client(&c, "cat", "user3", &dir);
    ann.expect("* cat is online");
    ann.send("/tell cat found you through B");
    cat.expect("[dm] ann: found you through B");
}

/// `GET /healthz` is answered over TLS on a TLS port (the request is looked at once
/// decrypted), and a WebSocket still works beside it.
#[test]
fn healthz_is_served_over_tls() {
    let server = start_tls("server1", &[]);
    let config =
        socp::net::tls::client_config(Some(std::path::Path::new(&fixture("ca.pem")))).unwrap();
    let sock = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let name = socp::net::tls::server_name("localhost").unwrap();
    let mut tls = socp::net::tls::TlsStream::client(&config, name, sock).unwrap();
    tls.handshake().unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    tls.flush().unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            // The server may close without waiting for our close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("read: {e}; so far {:?}", String::from_utf8_lossy(&reply)),
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"status\":\"ok\""), "{reply}");
    assert!(reply.contains("\"server_id\":\"srv-server1\""), "{reply}");

    let dir = TempDir::new("tls-health");
    let mut alice = client(&server, "alice", "user1", &dir);
    alice.send("/list");
    alice.expect("* 1 online:");
}
