//! `GET /healthz` and `GET /metrics` on the server's one port (issue "Ready for operators and
//! scripts", item 8), against the real `socp-server` over loopback: plain HTTP requests get a
//! quick answer and a closed connection, and WebSocket clients are served as before.

mod common;

use common::keys::test_key;
use common::proc::{Raw, ServerProc, WAIT, frame, linked_pair, now_ms};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// One HTTP response, read until the server closed the connection.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

/// Sends `request` as it is and reads the reply to the end: the server must close the
/// connection after answering (a read that times out fails the test).
fn http(port: u16, request: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(request).unwrap();
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .expect("the server answers and closes the connection");
    let text = String::from_utf8(raw).expect("a UTF-8 reply");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line:?}");
    let status = status_line[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap_or_else(|| panic!("header {l:?}"));
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let reply = Reply {
        status,
        headers,
        body: body.to_string(),
    };
    // (The head of a HEAD reply gives the length of the body it leaves out.)
    if let Some(len) = reply.header("Content-Length")
        && !request.starts_with(b"HEAD ")
    {
        assert_eq!(len.parse::<usize>().unwrap(), reply.body.len(), "{text}");
    }
    assert_eq!(reply.header("Connection"), Some("close"), "{text}");
    reply
}

fn get(server: &ServerProc, path: &str) -> Reply {
    http(
        server.port,
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n").as_bytes(),
    )
}

fn healthz(server: &ServerProc) -> Value {
    let reply = get(server, "/healthz");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("Content-Type"), Some("application/json"));
    reply.json()
}

/// `GET /metrics`, checked line by line against the Prometheus text format (0.0.4): every
/// sample is `name{labels} value` of a family announced by `# HELP` and `# TYPE` lines.
/// Returns the samples by series (`name` or `name{labels}`, as written).
fn metrics(server: &ServerProc) -> HashMap<String, f64> {
    let reply = get(server, "/metrics");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ctype = reply.header("Content-Type").unwrap();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    parse_exposition(&reply.body)
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_exposition(body: &str) -> HashMap<String, f64> {
    let mut helped = HashSet::new();
    let mut typed = HashSet::new();
    let mut samples = HashMap::new();
    assert!(body.ends_with('\n'), "the last line ends with a newline");
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap();
            assert!(is_name(name) && !text.is_empty(), "{line}");
            assert!(helped.insert(name.to_string()), "HELP twice: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(is_name(name), "{line}");
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            assert!(helped.contains(name), "TYPE before HELP: {line}");
            assert!(typed.insert(name.to_string()), "TYPE twice: {line}");
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value of {line:?}"));
        let name = match series.split_once('{') {
            None => series,
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                for pair in labels.split(',') {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                    assert!(is_name(k), "{line}");
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "{line}"
                    );
                }
                name
            }
        };
        assert!(is_name(name), "{line}");
        assert!(typed.contains(name), "sample without # TYPE: {line}");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "series twice: {line}"
        );
    }
    samples
}

fn sample(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no {series} in {:#?}", sorted(m)))
}

fn sorted(m: &HashMap<String, f64>) -> Vec<(&String, &f64)> {
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

/// alice sends bob a DM; bob receives it.
fn dm(alice: &mut Raw, bob: &mut Raw) {
    let (alice_key, bob_key) = (test_key("user1"), test_key("user2"));
    let ct = bob_key.public_key().encrypt(b"hi bob").unwrap();
    let ciphertext = socp::wire::b64::encode(&ct);
    let ts = now_ms();
    let content_sig = socp::crypto::make_content_sig(&alice_key, &ct, "alice", Some("bob"), ts);
    let payload = json!({"ciphertext": ciphertext, "sender_pub": alice_key.public_key().encoded(),
                         "content_sig": content_sig});
    let signed = socp::wire::SignedPayload::unsigned(&payload).unwrap();
    alice.send_text(&socp::wire::encode_frame(
        "MSG_DIRECT",
        "alice",
        "bob",
        ts,
        &signed,
    ));
    assert_eq!(bob.recv_kind("USER_DELIVER").payload["sender"], "alice");
}

#[test]
fn healthz_and_metrics_report_users_frames_signatures_and_errors() {
    let server = ServerProc::start("server1", &[]);
    let h = healthz(&server);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["server_id"], server.server_id);
    assert_eq!(h["links_up"], 0);
    assert_eq!(h["links"], json!([]));
    assert_eq!(h["users_local"], 0);
    assert_eq!(h["users_mesh"], 0);
    assert!(h["uptime_s"].is_u64(), "{h}");
    // One signature, a spare challenge, made by a signer thread soon after the start.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let m = loop {
        let m = metrics(&server);
        if sample(&m, "socp_signatures_total") >= 1.0 || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(sample(&m, r#"socp_users_online{scope="local"}"#), 0.0);
    assert_eq!(
        sample(&m, r#"socp_signatures_total"#),
        1.0,
        "a spare challenge"
    );

    let mut alice = Raw::hello(&server, "alice", &test_key("user1"));
    let h = healthz(&server);
    assert_eq!(
        (h["users_local"].as_u64(), h["users_mesh"].as_u64()),
        (Some(1), Some(1))
    );
    let m = metrics(&server);
    assert_eq!(sample(&m, r#"socp_users_online{scope="local"}"#), 1.0);
    assert_eq!(sample(&m, r#"socp_users_online{scope="mesh"}"#), 1.0);
    assert_eq!(sample(&m, r#"socp_connections{kind="user"}"#), 1.0);

    let mut bob = Raw::hello(&server, "bob", &test_key("user2"));
    dm(&mut alice, &mut bob);
    // An unknown type: answered with UNKNOWN_TYPE, counted as `other` (a bounded label set).
    alice.send_text(&frame("FROBNICATE", "alice", "", &json!({}), None));
    assert_eq!(alice.recv_kind("ERROR").payload["code"], "UNKNOWN_TYPE");

    let h = healthz(&server);
    assert_eq!(
        (h["users_local"].as_u64(), h["users_mesh"].as_u64()),
        (Some(2), Some(2))
    );
    let m = metrics(&server);
    let received = |t: &str| sample(&m, &format!("socp_frames_received_total{{type=\"{t}\"}}"));
    let sent = |t: &str| sample(&m, &format!("socp_frames_sent_total{{type=\"{t}\"}}"));
    assert_eq!(received("MSG_DIRECT"), 1.0);
    assert_eq!(received("USER_HELLO"), 2.0);
    assert_eq!(received("AUTH_RESPONSE"), 2.0);
    assert_eq!(received("other"), 1.0);
    assert_eq!(received("HEARTBEAT"), 0.0, "every known type is listed");
    assert!(
        !m.keys().any(|k| k.contains("FROBNICATE")),
        "{:#?}",
        sorted(&m)
    );
    assert_eq!(sent("USER_DELIVER"), 1.0);
    assert_eq!(sent("AUTH_CHALLENGE"), 2.0);
    assert_eq!(sent("USER_HELLO_ACK"), 2.0);
    // bob's advert to alice; alice is the only one online when she logs in.
    assert_eq!(sent("USER_ADVERTISE"), 1.0);
    assert_eq!(sent("ERROR"), 1.0);
    assert_eq!(
        sample(&m, r#"socp_errors_sent_total{code="UNKNOWN_TYPE"}"#),
        1.0
    );
    assert_eq!(sample(&m, r#"socp_errors_sent_total{code="BAD_KEY"}"#), 0.0);
    assert_eq!(sample(&m, r#"socp_users_online{scope="local"}"#), 2.0);
    assert_eq!(sample(&m, r#"socp_connections{kind="user"}"#), 2.0);
    assert_eq!(sample(&m, r#"socp_connections{kind="peer"}"#), 0.0);
    assert_eq!(sample(&m, "socp_links_up"), 0.0);
    // Per login: the challenge (signed ahead), the advert, the ack, the list and the snapshot
    // (the list and the channel snapshot may reuse nothing here); the DM's delivery; the error.
    assert!(
        sample(&m, "socp_signatures_total") >= 10.0,
        "{:#?}",
        sorted(&m)
    );
    assert!(sample(&m, "socp_signing_seconds_total") > 0.0);
    assert_eq!(
        sample(&m, r#"socp_dedup_drops_total{reason="duplicate"}"#),
        0.0
    );
    assert_eq!(
        sample(&m, r#"socp_dedup_drops_total{reason="out_of_window"}"#),
        0.0
    );
    assert_eq!(sample(&m, "socp_outbox_bytes"), 0.0);
    assert_eq!(sample(&m, "socp_logins_rate_limited_total"), 0.0);
    assert!(sample(&m, "socp_uptime_seconds") >= 0.0);

    // WebSocket clients are served as before.
    let _carol = Raw::hello(&server, "carol", &test_key("user3"));
    assert_eq!(alice.list(&server), vec!["alice", "bob", "carol"]);
}

#[test]
fn other_http_requests_get_a_quick_error_and_a_closed_connection() {
    let server = ServerProc::start("server1", &[]);
    let reply = get(&server, "/nope");
    assert_eq!(reply.status, 404);
    let reply = get(&server, "/");
    assert_eq!(reply.status, 404, "no upgrade: not a WebSocket");
    let reply = http(
        server.port,
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\nx=1&y=2",
    );
    assert_eq!(reply.status, 405);
    assert!(reply.header("Allow").unwrap().contains("GET"));
    let reply = http(server.port, b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(reply.status, 405);
    for garbage in [
        &b"hello there\r\n\r\n"[..],
        b"GET /healthz HTTP/9.9\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
    ] {
        let reply = http(server.port, garbage);
        assert_eq!(reply.status, 400, "{garbage:?}");
    }
    // HTTP/1.0, a query string, and HEAD (the head alone) are answered too.
    let reply = http(server.port, b"GET /healthz HTTP/1.0\r\n\r\n");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["server_id"], server.server_id);
    let reply = get(&server, "/metrics?name[]=socp_links_up");
    assert_eq!(reply.status, 200);
    let reply = http(server.port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(reply.status, 200);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("Content-Type"), Some("application/json"));
    let length: usize = reply.header("Content-Length").unwrap().parse().unwrap();
    assert!(length > 0);

    // A WebSocket upgrade works as before, on any path (the upgrade decides, not the path).
    for path in ["", "/healthz", "/metrics", "/anything"] {
        let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let url = format!("{}{path}", server.url());
        let (mut ws, _) = tungstenite::client(url, stream).expect("handshake");
        let key = test_key("user1");
        let pubkey = key.public_key().encoded();
        let hello = json!({"client": "test", "pubkey": pubkey, "enc_pubkey": pubkey});
        let f = frame("USER_HELLO", "alice", "", &hello, None);
        ws.send(Message::Text(f.into())).unwrap();
        match ws.read().unwrap() {
            Message::Text(t) => assert!(t.contains("AUTH_CHALLENGE"), "{t}"),
            other => panic!("{other:?}"),
        }
    }
    let mut alice = Raw::hello(&server, "alice", &test_key("user1"));
    assert_eq!(alice.list(&server), vec!["alice"]);
    assert_eq!(healthz(&server)["users_local"], 1);
}

#[test]
fn an_unfinished_request_is_dropped_at_the_handshake_deadline_and_harms_nobody() {
    let server = ServerProc::start("server1", &["--handshake-timeout-ms", "500"]);
    let mut alice = Raw::hello(&server, "alice", &test_key("user1"));
    let mut slow = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    slow.set_read_timeout(Some(WAIT)).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let start = Instant::now();
    // Meanwhile, everyone else is served.
    assert_eq!(healthz(&server)["users_local"], 1);
    assert_eq!(alice.list(&server), vec!["alice"]);
    let mut buf = [0u8; 64];
    match slow.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection closed, got {other:?}"),
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(healthz(&server)["users_local"], 1);
}

#[test]
fn healthz_and_metrics_count_links_and_users_across_the_mesh() {
    let (a, b) = linked_pair(&[]);
    let _alice = Raw::hello(&a, "alice", &test_key("user1"));
    let _bob = Raw::hello(&b, "bob", &test_key("user2"));
    let deadline = Instant::now() + WAIT;
    let h = loop {
        let h = healthz(&a);
        if h["users_mesh"] == 2 || Instant::now() > deadline {
            break h;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(h["server_id"], "srv-server1");
    assert_eq!(h["links_up"], 1);
    assert_eq!(h["links"], json!(["srv-server2"]));
    assert_eq!(h["users_local"], 1);
    assert_eq!(h["users_mesh"], 2);
    let m = metrics(&a);
    assert_eq!(sample(&m, "socp_links_up"), 1.0);
    assert_eq!(sample(&m, r#"socp_connections{kind="peer"}"#), 1.0);
    assert_eq!(sample(&m, r#"socp_connections{kind="user"}"#), 1.0);
    assert_eq!(sample(&m, r#"socp_users_online{scope="local"}"#), 1.0);
    assert_eq!(sample(&m, r#"socp_users_online{scope="mesh"}"#), 2.0);
    // bob's advert came over the link.
    assert!(sample(&m, r#"socp_frames_received_total{type="USER_ADVERTISE"}"#) >= 1.0);
    assert_eq!(
        sample(&m, r#"socp_server_info{server_id="srv-server1"}"#),
        1.0
    );
}
