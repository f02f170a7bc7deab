//! One mesh with the deployed Python servers (issue 14): their frames, made by an independent
//! implementation (`tests/fixtures/gen_deployed.py`, Python `cryptography`), fed to our server
//! core with a real `socp` client session attached in memory; and what our client emits checked
//! by that implementation (`tests/fixtures/verify_content_sig.py`), the way their clients check.

mod common;
mod support;

use common::keys::test_key;
use serde_json::{Value, json};
use socp::client::{Identity, Pins, Session};
use socp::core::federation::FedConfig;
use socp::core::server::{Action, CloseCode, ConnId, Input, Limits, Timer, close};
use socp::wire::{Envelope, types};
use std::io::Write;
use std::process::{Command, Stdio};
use support::*;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/deployed.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Our server "srv-a" (server1) and, in memory, the connections around it: `socp` sessions,
/// the link to the deployed server "srv-py" (played from the vectors), and raw connections.
struct Mesh {
    h: CoreHarness,
    sessions: Vec<(ConnId, Session)>,
    link: ConnId,
    to_link: Vec<Envelope>,
    to_raw: Vec<(ConnId, Envelope)>,
    closes: Vec<(ConnId, CloseCode)>,
}

impl Mesh {
    /// srv-a, with srv-py (server2 at 127.0.0.1:9002) as its pinned bootstrap peer, dialled.
    fn new(wall_ms: i64) -> Mesh {
        let limits = Limits {
            hello_timeout_ms: 10_000,
            error_burst: 50,
            error_refill_per_s: 10,
            max_message_size: 256 * 1024,
        };
        let cfg = FedConfig {
            bootstrap: vec![spec("server2", 9002)],
            advertise_port: 9001,
            ..FedConfig::default()
        };
        let setup = Setup::new("srv-a")
            .limits(limits)
            .federation(cfg)
            .at(1_000, wall_ms)
            .started();
        let mut mesh = Mesh {
            h: CoreHarness::build(setup),
            sessions: Vec::new(),
            link: ConnId(1),
            to_link: Vec::new(),
            to_raw: Vec::new(),
            closes: Vec::new(),
        };
        mesh.h.take(); // the first dial's timer: fired at once
        mesh.h.fire(Timer::Redial(0));
        assert_eq!(dial_targets(&mesh.h.take()), [0]);
        mesh.input(Input::Dialled {
            conn: mesh.link,
            target: 0,
        });
        assert_eq!(kinds(&mesh.to_link), [types::SERVER_HELLO_JOIN]);
        mesh.to_link.clear();
        mesh
    }

    fn input(&mut self, input: Input<'_>) {
        self.h.input(input);
        self.settle();
    }

    /// Carries frames both ways until nothing moves.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.sessions.len() {
                let conn = self.sessions[i].0;
                for text in std::mem::take(&mut self.sessions[i].1.outbox) {
                    self.h.input(Input::Text { conn, text: &text });
                    moved = true;
                }
            }
            let actions = self.h.take();
            moved |= !actions.is_empty();
            for a in &actions {
                if let Some(o) = outgoing(a) {
                    let env = Envelope::parse(o.text).unwrap();
                    if o.conn == self.link {
                        self.to_link.push(env);
                    } else if let Some((_, s)) =
                        self.sessions.iter_mut().find(|(c, _)| *c == o.conn)
                    {
                        s.on_frame(o.text, self.h.now.wall_ms);
                    } else {
                        self.to_raw.push((o.conn, env));
                    }
                } else if let Action::Close { conn, code, .. } = a {
                    self.closes.push((*conn, *code));
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn open(&mut self) -> ConnId {
        let conn = self.h.fresh_conn();
        self.input(Input::Opened {
            conn,
            peer: LOOPBACK,
        });
        conn
    }

    /// A `socp` session for `user_id` with fixture key `key`, through its hello.
    fn connect(&mut self, user_id: &str, key: &str) -> usize {
        let conn = self.open();
        let me = Identity {
            user_id: user_id.into(),
            display_name: user_id.into(),
            key: test_key(key).into(),
        };
        let mut session = Session::new(me, "ws://srv-a", Pins::default());
        session.hello(self.h.now.wall_ms);
        self.sessions.push((conn, session));
        self.settle();
        assert!(self.sessions.last().unwrap().1.ready(), "hello completed");
        self.sessions.len() - 1
    }

    fn command(&mut self, i: usize, line: &str) {
        self.sessions[i].1.command(line, self.h.now.wall_ms);
        self.settle();
    }

    /// Events of session `i` so far, as the lines `socp` prints.
    fn shown(&mut self, i: usize) -> Vec<String> {
        let (_, s) = &mut self.sessions[i];
        let me = s.me.user_id.clone();
        s.events.drain(..).map(|e| e.human(&me)).collect()
    }

    /// A frame from srv-py on the link.
    fn peer_sends(&mut self, text: &str) {
        self.input(Input::Text {
            conn: self.link,
            text,
        });
    }
}

/// Runs the independent verifier over `items`; returns its verdict per item.
fn python_verdicts(items: &[Value]) -> Vec<String> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/verify_content_sig.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (with the cryptography package) runs the independent verifier");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(items).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("Error") || out.status.code() == Some(1),
        "verifier failed to run: {stderr}"
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn deployed_servers_users_and_ours_see_each_other_as_authentic() {
    let v = vectors();
    let ts = v["ts"].as_i64().unwrap();
    let mut mesh = Mesh::new(ts + 1_000);
    let alice = mesh.connect("alice", "user1");
    mesh.shown(alice);

    // Their WELCOME (salt-478 signature, ASCII-escaped JSON, clients without server_id).
    mesh.peer_sends(v["welcome"].as_str().unwrap());
    assert!(mesh.closes.is_empty(), "{:?}", mesh.closes);
    assert_eq!(
        mesh.shown(alice),
        ["* pyalice is online (pyalice on srv-py)"]
    );

    // Their SERVER_DELIVER in the standard's form, content_sig over the bytes (salt 478).
    mesh.peer_sends(v["deliver"].as_str().unwrap());
    let text = v["deliver_text"].as_str().unwrap();
    assert_eq!(mesh.shown(alice), [format!("[dm] pyalice: {text}")]);

    // What socp sends their users: a DM, an /all copy and file chunks.
    mesh.to_link.clear();
    mesh.command(alice, "/tell pyalice hello from rust");
    mesh.command(alice, "/all hello everyone");
    let dir = common::proc::TempDir::new("interop-file");
    let file = dir.0.join("notes.txt");
    std::fs::write(&file, vec![b'x'; 1000]).unwrap();
    mesh.command(alice, &format!("/file pyalice {}", file.display()));
    while mesh.sessions[alice].1.pump(mesh.h.now.wall_ms) {
        mesh.settle();
    }
    mesh.settle();
    let alice_pub = test_key("user1").public_key().encoded().to_string();
    let mut items = Vec::new();
    for f in &mesh.to_link {
        let p = &f.payload;
        let to = match f.kind.as_str() {
            types::SERVER_DELIVER | types::FILE_CHUNK => json!("pyalice"),
            types::MSG_PUBLIC_CHANNEL => Value::Null,
            _ => continue,
        };
        assert_eq!(p["user_id"], "pyalice");
        items.push(
            json!({"pubkey": alice_pub, "ciphertext": p["ciphertext"], "from": "alice",
                          "to": to, "ts": p["ts"], "content_sig": p["content_sig"]}),
        );
    }
    let sent = kinds(&mesh.to_link);
    for kind in [
        types::SERVER_DELIVER,
        types::MSG_PUBLIC_CHANNEL,
        types::FILE_CHUNK,
    ] {
        assert!(sent.contains(&kind), "{sent:?}");
    }
    assert_eq!(
        items.len(),
        1 + 1 + 3,
        "a DM, an /all copy, 3 chunks of 1000 bytes"
    );
    assert_eq!(python_verdicts(&items), vec!["ok"; items.len()]);
    // And the verifier does say FAIL: a signature bound to another recipient.
    let mut wrong = items[0].clone();
    wrong["to"] = json!("mallory");
    assert_eq!(python_verdicts(&[wrong]), ["FAIL"]);
}

#[test]
fn their_clients_account_frames_get_an_error_that_says_what_we_speak() {
    let v = vectors();
    let mut mesh = Mesh::new(v["ts"].as_i64().unwrap());
    for frame in ["legacy_register", "legacy_login"] {
        let conn = mesh.open();
        mesh.input(Input::Text {
            conn,
            text: v[frame].as_str().unwrap(),
        });
        let errors: Vec<&Envelope> = mesh
            .to_raw
            .iter()
            .filter(|(c, _)| *c == conn)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(errors.len(), 1, "{frame}: {errors:?}");
        let detail = errors[0].payload["detail"].as_str().unwrap();
        assert!(detail.contains("challenge-response"), "{frame}: {detail}");
        assert!(!detail.contains("missing"), "{frame}: {detail}");
        assert_eq!(mesh.closes.last(), Some(&(conn, close::POLICY)), "{frame}");
    }
}
