//! One harness for the sans-IO core (`socp::core::server::Server`), shared by every core test
//! binary (`mod common; mod support;`): a server under simulated [`Time`], the connections
//! around it, login helpers, frame builders and the `Action`s it produced, taken apart.
//! [`mesh`] wires several of them together.
//!
//! Three things the core may change are each touched in one place only, so that such a change
//! is one edit here: servers are built by [`build_server`]; the work a core defers is run by
//! [`settle`], as the net layer does; the text of a frame an [`Action`] carries is read by
//! [`outgoing`].
#![allow(dead_code)]

pub mod mesh;

use crate::common::keys::test_key;
use serde_json::{Map, Value, json};
use socp::core::federation::{FedConfig, PeerSpec};
use socp::core::persist::MemStore;
use socp::core::random::SeededRandom;
use socp::core::server::{Action, CloseCode, ConnId, Input, Limits, Server, Time, Timer};
use socp::core::signer::{InlineSigner, SignStats, Signer, Urgency};
use socp::core::transfer::TransferLimits;
use socp::crypto::{self, PrivateKey, PublicKey};
use socp::store::Store;
use socp::wire::frame::Signed;
use socp::wire::{self, Envelope, SignedPayload, canon, encode_frame, types};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

/// Where accepted connections come from unless a test says otherwise (§5.3 login budgets).
pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The host every simulated server listens on.
pub const HOST: &str = "127.0.0.1";
/// 2027-01-15 08:00:00 UTC: the wall clock most harnesses start at.
pub const WALL0: i64 = 1_800_000_000_000;
pub const MONO0: u64 = 5_000;

/// A connection id shaped like the net layer's: a serial in the high half, a slot in the low.
pub fn conn(n: u64) -> ConnId {
    ConnId((n << 32) | n)
}

pub fn default_limits() -> Limits {
    Limits {
        hello_timeout_ms: 10_000,
        error_burst: 20,
        error_refill_per_s: 10,
        max_message_size: 256 * 1024,
    }
}

/// A peer as `--bootstrap` gives it: `127.0.0.1:port`, pinned to fixture key `key_name`.
pub fn spec(key_name: &str, port: u16) -> PeerSpec {
    PeerSpec {
        host: HOST.into(),
        port,
        tls: false,
        key: Arc::new(PublicKey::parse(test_key(key_name).public_key().encoded()).unwrap()),
    }
}

// -------------------------------------------------------------------- the three seams

/// How a server under test is made.
pub struct Setup {
    pub id: String,
    pub key: PrivateKey,
    pub limits: Limits,
    pub fed: Option<FedConfig>,
    pub transfer_limits: Option<TransferLimits>,
    pub store: Option<TestStore>,
    /// Seed of the core's random source (default: the OS's).
    pub seed: Option<u64>,
    pub now: Time,
    /// Call [`Server::start`] (dials, heartbeats, challenges signed ahead).
    pub start: bool,
    /// Servers whose frames this one may pass on unchanged, and the keys they verify with.
    pub peers: Vec<(String, Arc<PublicKey>)>,
}

impl Setup {
    /// Server `id` with fixture key "server1", [`default_limits`], no federation, an in-memory
    /// store, at ([`MONO0`], [`WALL0`]), not started.
    pub fn new(id: &str) -> Setup {
        Setup {
            id: id.into(),
            key: test_key("server1"),
            limits: default_limits(),
            fed: None,
            transfer_limits: None,
            store: None,
            seed: None,
            now: Time {
                mono_ms: MONO0,
                wall_ms: WALL0,
            },
            start: false,
            peers: Vec::new(),
        }
    }

    pub fn key(mut self, key_name: &str) -> Setup {
        self.key = test_key(key_name);
        self
    }

    pub fn limits(mut self, limits: Limits) -> Setup {
        self.limits = limits;
        self
    }

    pub fn federation(mut self, cfg: FedConfig) -> Setup {
        self.fed = Some(cfg);
        self
    }

    pub fn transfer_limits(mut self, limits: TransferLimits) -> Setup {
        self.transfer_limits = Some(limits);
        self
    }

    pub fn store(mut self, store: Store) -> Setup {
        self.store = Some(TestStore::Sqlite(store));
        self
    }

    /// Persists to a [`MemStore`] (default: SQLite in memory).
    pub fn mem_store(mut self) -> Setup {
        self.store = Some(TestStore::Mem(MemStore::new()));
        self
    }

    /// Draws the core's random bytes from `SeededRandom::new(seed)`.
    pub fn seeded(mut self, seed: u64) -> Setup {
        self.seed = Some(seed);
        self
    }

    pub fn at(mut self, mono_ms: u64, wall_ms: i64) -> Setup {
        self.now = Time { mono_ms, wall_ms };
        self
    }

    pub fn started(mut self) -> Setup {
        self.start = true;
        self
    }

    /// Frames signed by server `id` (fixture key `key_name`) may reach us through this one.
    pub fn peer(mut self, id: &str, key_name: &str) -> Setup {
        self.peers
            .push((id.into(), test_key(key_name).public_key().clone()));
        self
    }
}

/// What a server under test persists to.
pub enum TestStore {
    Sqlite(Store),
    Mem(MemStore),
}

/// A core for server `id`: the one place tests construct one.
pub fn build_server(
    id: &str,
    key: PrivateKey,
    limits: Limits,
    store: TestStore,
    fed: Option<FedConfig>,
    transfer_limits: Option<TransferLimits>,
) -> Server {
    let mut server = match store {
        TestStore::Sqlite(store) => Server::new(id.into(), key, limits, store),
        TestStore::Mem(store) => Server::new(id.into(), key, limits, store),
    };
    if let Some(cfg) = fed {
        server = server.with_federation(cfg);
    }
    if let Some(limits) = transfer_limits {
        server = server.with_transfer_limits(limits);
    }
    server
}

/// Collects what `server` produced into `out`, then runs the work it deferred and collects
/// again, until nothing is left: what the net layer does after each input. The one place tests
/// run deferred work.
pub fn settle(server: &mut Server, now: Time, out: &mut Vec<Action>) {
    loop {
        out.extend(server.actions());
        server.run_deferred(now);
        if !server.has_actions() {
            return;
        }
    }
}

/// A frame an action sends.
#[derive(Debug, Clone, Copy)]
pub struct Out<'a> {
    pub conn: ConnId,
    pub text: &'a str,
    /// An [`Action::Route`] (flow-controlled), not an [`Action::Send`].
    pub routed: bool,
}

/// The frame `a` sends, if it sends one. The one place tests read a frame's text.
pub fn outgoing(a: &Action) -> Option<Out<'_>> {
    match a {
        Action::Send { conn, text } => Some(Out {
            conn: *conn,
            text: text.as_str(),
            routed: false,
        }),
        Action::Route { conn, text } => Some(Out {
            conn: *conn,
            text: text.as_str(),
            routed: true,
        }),
        _ => None,
    }
}

/// The envelopes of the frames in `actions` sent to `c` (parsed, not verified).
pub fn envelopes_to(actions: &[Action], c: ConnId) -> Vec<Envelope> {
    actions
        .iter()
        .filter_map(outgoing)
        .filter(|o| o.conn == c)
        .filter_map(|o| Envelope::parse(o.text).ok())
        .collect()
}

/// The types of the frames in `actions` (parsed, not verified).
pub fn sent_kinds(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(outgoing)
        .map(|o| Envelope::parse(o.text).unwrap().kind)
        .collect()
}

/// The `Redial` timers among `actions`: (at, target).
pub fn redial_timers(actions: &[Action]) -> Vec<(u64, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Timer {
                at_ms,
                timer: Timer::Redial(t),
            } => Some((*at_ms, *t)),
            _ => None,
        })
        .collect()
}

/// The targets of the `Dial`s among `actions`.
pub fn dial_targets(actions: &[Action]) -> Vec<u32> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Dial { target, .. } => Some(*target),
            _ => None,
        })
        .collect()
}

// -------------------------------------------------------------------- signing, recorded

/// Signs in line, as the core's default signer does, and records each payload's canonical
/// text with the urgency it was submitted with. `spare` is what it answers to
/// [`Signer::spare`]: with `true` the core signs a newcomer's advert and ack during its
/// challenge, as it does when a pool's workers are idle.
pub struct RecordingSigner {
    inner: InlineSigner,
    spare: bool,
    pub log: Arc<Mutex<Vec<(String, Urgency)>>>,
}

impl Signer for RecordingSigner {
    fn submit(&self, signed: &Signed, urgency: Urgency) {
        let canonical = signed.canonical().to_string();
        self.log.lock().unwrap().push((canonical, urgency));
        self.inner.submit(signed, urgency)
    }

    fn spare(&self) -> bool {
        self.spare
    }

    fn stats(&self) -> &Arc<SignStats> {
        self.inner.stats()
    }
}

/// What a [`RecordingSigner`] saw: each payload and its urgency, and the signatures made.
pub struct Recorded {
    pub log: Arc<Mutex<Vec<(String, Urgency)>>>,
    pub stats: Arc<SignStats>,
}

impl Recorded {
    /// The urgency of every payload signed whose canonical text contains `needle`.
    pub fn urgencies(&self, needle: &str) -> Vec<Urgency> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(c, _)| c.contains(needle))
            .map(|(_, u)| *u)
            .collect()
    }
}

// -------------------------------------------------------------------- the harness

/// One frame the server sent: its exact text and its parsed, verified envelope.
#[derive(Debug, Clone)]
pub struct Sent {
    pub text: String,
    pub env: Envelope,
}

/// A server core under simulated time, and what it produced not yet taken by the test.
pub struct CoreHarness {
    pub server: Server,
    pub id: String,
    pub now: Time,
    pub server_pub: Arc<PublicKey>,
    /// Keys of the servers whose frames this one may pass on unchanged.
    pub peer_pubs: Vec<(String, Arc<PublicKey>)>,
    /// Actions produced and not yet taken, in order.
    pub outbox: Vec<Action>,
    pub next_conn: u64,
}

impl CoreHarness {
    /// The server `setup` describes; started (its first actions in the outbox) if it says so.
    pub fn build(setup: Setup) -> CoreHarness {
        let Setup {
            id,
            key,
            limits,
            fed,
            transfer_limits,
            store,
            seed,
            now,
            start,
            peers,
        } = setup;
        let store = store.unwrap_or_else(|| {
            TestStore::Sqlite(Store::open_in_memory().expect("in-memory store"))
        });
        let mut server = build_server(&id, key, limits, store, fed, transfer_limits);
        if let Some(seed) = seed {
            server = server.with_random(SeededRandom::new(seed));
        }
        let server_pub = server.public_key().clone();
        let mut h = CoreHarness {
            server,
            id,
            now,
            server_pub,
            peer_pubs: peers,
            outbox: Vec::new(),
            next_conn: 1,
        };
        if start {
            h.start();
        }
        h
    }

    /// Hands the server's signatures to a [`RecordingSigner`] answering `spare` to
    /// [`Signer::spare`]; returns what it records.
    pub fn record_signatures(&mut self, spare: bool) -> Recorded {
        let signer = RecordingSigner {
            inner: InlineSigner::new(Arc::clone(self.server.private_key())),
            spare,
            log: Arc::default(),
        };
        let recorded = Recorded {
            log: Arc::clone(&signer.log),
            stats: Arc::clone(signer.stats()),
        };
        self.server.set_signer(Box::new(signer));
        recorded
    }

    /// [`Server::start`]: dials, heartbeats, challenges signed ahead; its actions in the outbox.
    pub fn start(&mut self) {
        self.server.start(self.now);
        self.settle();
    }

    fn settle(&mut self) {
        settle(&mut self.server, self.now, &mut self.outbox);
    }

    // ---------------------------------------------------------------- time and inputs

    /// Advances both simulated clocks.
    pub fn advance(&mut self, ms: u64) {
        self.now.mono_ms += ms;
        self.now.wall_ms += ms as i64;
    }

    /// Moves the clocks forward to monotonic time `at` (never back).
    #[track_caller]
    pub fn advance_to(&mut self, at: u64) {
        assert!(
            at >= self.now.mono_ms,
            "timer in the past: {at} < {}",
            self.now.mono_ms
        );
        self.advance(at - self.now.mono_ms);
    }

    /// Feeds one input and everything it defers, as the net layer does.
    pub fn input(&mut self, input: Input<'_>) {
        self.server.handle(self.now, input);
        self.settle();
        assert!(!self.server.has_actions());
    }

    /// Feeds one frame and leaves the work the core deferred pending (the net layer runs it
    /// only after writing the frame's actions).
    pub fn send_only(&mut self, c: ConnId, text: &str) {
        self.server.handle(self.now, Input::Text { conn: c, text });
        self.outbox.extend(self.server.actions());
    }

    /// The types of the frames sent to `c` so far, each with whether it is complete (signed),
    /// without taking them.
    pub fn heads_to(&self, c: ConnId) -> Vec<(&'static str, bool)> {
        self.outbox
            .iter()
            .filter_map(|a| match a {
                Action::Send { conn, text } | Action::Route { conn, text } if *conn == c => {
                    let kind = socp::core::metrics::FRAME_TYPES
                        .iter()
                        .find(|k| text.head().starts_with(&format!("{{\"type\":\"{k}\"")))
                        .copied()
                        .unwrap_or("?");
                    Some((kind, text.ready().is_some()))
                }
                _ => None,
            })
            .collect()
    }

    /// Whether deferred work is pending (after [`CoreHarness::send_only`]).
    pub fn has_deferred(&self) -> bool {
        self.server.has_deferred()
    }

    pub fn send(&mut self, c: ConnId, text: &str) {
        self.input(Input::Text { conn: c, text });
    }

    pub fn fresh_conn(&mut self) -> ConnId {
        let c = conn(self.next_conn);
        self.next_conn += 1;
        c
    }

    pub fn open(&mut self, c: ConnId) {
        self.open_from(c, LOOPBACK);
    }

    /// Opens `c` as accepted from `peer`.
    pub fn open_from(&mut self, c: ConnId, peer: IpAddr) {
        self.input(Input::Opened { conn: c, peer });
    }

    /// Opens a fresh connection from loopback.
    pub fn open_fresh(&mut self) -> ConnId {
        let c = self.fresh_conn();
        self.open(c);
        c
    }

    pub fn binary(&mut self, c: ConnId) {
        self.input(Input::Binary { conn: c });
    }

    pub fn closed(&mut self, c: ConnId) {
        self.input(Input::Closed { conn: c });
    }

    pub fn fire(&mut self, timer: Timer) {
        self.input(Input::Timer(timer));
    }

    /// [`Server::shutdown`], its actions into the outbox.
    pub fn shutdown(&mut self) {
        self.server.shutdown(self.now);
        self.outbox.extend(self.server.actions());
    }

    // ---------------------------------------------------------------- what came out

    /// Every action produced since the last take, in order, unverified.
    pub fn take(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.outbox)
    }

    /// Every action produced since the last take, in order. Sent frames are verified.
    pub fn drain(&mut self) -> Vec<Action> {
        let actions = self.take();
        for o in actions.iter().filter_map(outgoing) {
            self.check(o.text);
        }
        actions
    }

    /// Discards everything pending (after verifying the frames in it).
    pub fn clear(&mut self) {
        self.drain();
    }

    /// Asserts nothing is pending but timers (which are discarded).
    #[track_caller]
    pub fn assert_silent(&mut self) {
        let rest: Vec<Action> = self
            .drain()
            .into_iter()
            .filter(|a| !matches!(a, Action::Timer { .. }))
            .collect();
        assert!(rest.is_empty(), "unexpected actions: {rest:#?}");
    }

    /// Parses one frame the server emitted and verifies its signature: its own frames with
    /// the server's key (and canonical on the wire, §3.4); frames it passes on unchanged with
    /// the key of the server that signed them.
    #[track_caller]
    pub fn check(&self, text: &str) -> Envelope {
        let env = Envelope::parse(text).unwrap_or_else(|e| panic!("server sent {text:?}: {e}"));
        assert!(!env.sig.is_empty(), "server frame is unsigned: {text}");
        let key = if env.from == self.id {
            let canonical = canon::canonical(&Value::Object(env.payload.clone())).unwrap();
            assert!(
                text.contains(&format!("\"payload\":{canonical},")),
                "payload not emitted in canonical form: {text}"
            );
            &self.server_pub
        } else {
            &self
                .peer_pubs
                .iter()
                .find(|(id, _)| *id == env.from)
                .unwrap_or_else(|| panic!("frame from unexpected sender: {text}"))
                .1
        };
        let ok = wire::verify_payload_sig(key, &env.payload, &env.sig)
            .unwrap_or_else(|_| panic!("payload not canonical: {text}"));
        assert!(
            ok,
            "frame does not verify with the key of {}: {text}",
            env.from
        );
        env
    }

    /// Takes out of the outbox the actions `f` picks, in order; the rest stay.
    pub fn extract<T>(&mut self, mut f: impl FnMut(&Action) -> Option<T>) -> Vec<T> {
        let mut picked = Vec::new();
        self.outbox.retain(|a| match f(a) {
            Some(t) => {
                picked.push(t);
                false
            }
            None => true,
        });
        picked
    }

    /// Takes the frames sent to `c`, with their exact text, verified.
    pub fn sent_to(&mut self, c: ConnId) -> Vec<Sent> {
        // (Only `c`'s are read: another connection's may still wait for its signature.)
        let texts = self.extract(|a| match a {
            Action::Send { conn, .. } | Action::Route { conn, .. } if *conn == c => {
                outgoing(a).map(|o| o.text.to_owned())
            }
            _ => None,
        });
        texts
            .into_iter()
            .map(|text| Sent {
                env: self.check(&text),
                text,
            })
            .collect()
    }

    /// Takes the frames sent to `c`, parsed and verified.
    pub fn frames_to(&mut self, c: ConnId) -> Vec<Envelope> {
        self.sent_to(c).into_iter().map(|s| s.env).collect()
    }

    /// The connections of the pending flow-controlled sends ([`Action::Route`]), in order.
    pub fn routed(&self) -> Vec<ConnId> {
        self.outbox
            .iter()
            .filter_map(outgoing)
            .filter(|o| o.routed)
            .map(|o| o.conn)
            .collect()
    }

    /// Takes the close actions for `c`: their codes.
    pub fn closes(&mut self, c: ConnId) -> Vec<CloseCode> {
        self.extract(|a| match a {
            Action::Close { conn, code, .. } if *conn == c => Some(*code),
            _ => None,
        })
    }

    /// Takes every close action: their connections.
    pub fn all_closes(&mut self) -> Vec<ConnId> {
        self.extract(|a| match a {
            Action::Close { conn, .. } => Some(*conn),
            _ => None,
        })
    }

    /// Takes the timer actions.
    pub fn timers(&mut self) -> Vec<(u64, Timer)> {
        self.extract(|a| match a {
            Action::Timer { at_ms, timer } => Some((*at_ms, *timer)),
            _ => None,
        })
    }

    /// Takes the `Redial` timers: (at_ms, target).
    pub fn redials(&mut self) -> Vec<(u64, u32)> {
        self.extract(|a| redial_timers(std::slice::from_ref(a)).pop())
    }

    /// Takes the `Dial` actions: (target, over TLS).
    pub fn dial_schemes(&mut self) -> Vec<(u32, bool)> {
        self.extract(|a| match a {
            Action::Dial { target, tls, .. } => Some((*target, *tls)),
            _ => None,
        })
    }

    /// Takes the `Dial` actions: (target, host, port).
    pub fn dials(&mut self) -> Vec<(u32, String, u16)> {
        self.extract(|a| match a {
            Action::Dial {
                target, host, port, ..
            } => Some((*target, host.clone(), *port)),
            _ => None,
        })
    }

    // ---------------------------------------------------------------- users

    /// A user frame at the current wall time.
    pub fn user_frame(
        &self,
        kind: &str,
        from: &str,
        to: &str,
        payload: &Value,
        key: Option<&PrivateKey>,
    ) -> String {
        user_frame_at(kind, from, to, self.now.wall_ms, payload, key)
    }

    /// Steps 1–2 of §5.2 with [`hello_payload`]: sends `USER_HELLO`, returns the challenge.
    pub fn challenge(&mut self, c: ConnId, user_id: &str, key: &PrivateKey) -> Envelope {
        self.challenge_with(c, user_id, &hello_payload(key.public_key().encoded()))
    }

    /// Steps 1–2 of §5.2: sends `USER_HELLO` with `payload` and returns the `AUTH_CHALLENGE`.
    #[track_caller]
    pub fn challenge_with(&mut self, c: ConnId, user_id: &str, payload: &Value) -> Envelope {
        let hello = self.user_frame(types::USER_HELLO, user_id, "", payload, None);
        self.send(c, &hello);
        let frames = self.frames_to(c);
        assert_eq!(kinds(&frames), [types::AUTH_CHALLENGE], "{frames:#?}");
        assert!(self.closes(c).is_empty());
        frames.into_iter().next().unwrap()
    }

    /// Step 3 of §5.2: the correct `AUTH_RESPONSE` to challenge `ch`, signed by `key`.
    pub fn auth_response(&self, user_id: &str, key: &PrivateKey, ch: &Envelope) -> String {
        let payload = auth_payload(ch, user_id);
        self.user_frame(types::AUTH_RESPONSE, user_id, &self.id, &payload, Some(key))
    }

    /// Steps 3–4 of §5.2 for a challenge: sends a correct `AUTH_RESPONSE` and returns every
    /// frame that came back, asserting the first is the `USER_HELLO_ACK`.
    #[track_caller]
    pub fn respond(
        &mut self,
        c: ConnId,
        user_id: &str,
        key: &PrivateKey,
        ch: &Envelope,
    ) -> Vec<Envelope> {
        let resp = self.auth_response(user_id, key, ch);
        self.send(c, &resp);
        let frames = self.frames_to(c);
        assert!(!frames.is_empty(), "no answer to AUTH_RESPONSE");
        assert_eq!(frames[0].kind, types::USER_HELLO_ACK, "{frames:#?}");
        assert_eq!(frames[0].to, user_id);
        assert_eq!(
            Value::Object(frames[0].payload.clone()),
            json!({"user_id": user_id, "server_id": self.id})
        );
        assert!(self.closes(c).is_empty());
        frames
    }

    /// The full hello (§5.2) on an open connection; returns the frames after `AUTH_RESPONSE`.
    pub fn hello(&mut self, c: ConnId, user_id: &str, key: &PrivateKey) -> Vec<Envelope> {
        let ch = self.challenge(c, user_id, key);
        self.respond(c, user_id, key, &ch)
    }

    /// Opens `c` and completes the hello ([`hello_payload`]). The timers pending are taken;
    /// frames to other connections stay in the outbox.
    pub fn login(&mut self, c: ConnId, user_id: &str, key: &PrivateKey) -> Vec<Envelope> {
        self.open(c);
        self.timers();
        self.hello(c, user_id, key)
    }

    /// A user `user_id` (display name `user_id`) on a fresh connection, announcing `caps`
    /// (§5.6): the hello completes with the ack, the list and the snapshot, and nothing else.
    #[track_caller]
    pub fn user_caps(&mut self, user_id: &str, key: &PrivateKey, caps: &[&str]) -> ConnId {
        let c = self.open_fresh();
        self.extract(|a| {
            matches!(a, Action::Timer { timer: Timer::Hello(x), .. } if *x == c).then_some(())
        });
        let ch = self.challenge_with(c, user_id, &hello_payload_as(key, user_id, caps));
        let frames = self.respond(c, user_id, key, &ch);
        assert_eq!(
            kinds(&frames),
            [
                types::USER_HELLO_ACK,
                types::LIST_RESPONSE,
                types::PUBLIC_CHANNEL_SNAPSHOT
            ],
            "{frames:#?}"
        );
        c
    }

    /// [`CoreHarness::user_caps`] without capabilities.
    pub fn user(&mut self, user_id: &str, key: &PrivateKey) -> ConnId {
        self.user_caps(user_id, key, &[])
    }

    /// `LIST_REQUEST` from `user_id` on `c`; returns the user ids of the `LIST_RESPONSE`.
    #[track_caller]
    pub fn list(&mut self, c: ConnId, user_id: &str) -> Vec<String> {
        let req = self.user_frame(types::LIST_REQUEST, user_id, &self.id, &json!({}), None);
        self.send(c, &req);
        let frames = self.frames_to(c);
        assert_eq!(kinds(&frames), [types::LIST_RESPONSE], "{frames:#?}");
        list_ids(&frames[0])
    }

    /// A `MSG_DIRECT` from `from` to `to` on `c`, dated 1 234 ms ago; returns (payload, ts).
    pub fn dm(
        &mut self,
        c: ConnId,
        from: &str,
        key: &PrivateKey,
        to: &str,
        to_key: &PublicKey,
    ) -> (Value, i64) {
        let ts = self.now.wall_ms - 1_234;
        let payload = message_payload(key, to_key, from, Some(to), ts, "hello over the mesh");
        let f = user_frame_at(types::MSG_DIRECT, from, to, ts, &payload, None);
        self.send(c, &f);
        (payload, ts)
    }

    // ---------------------------------------------------------------- played peers

    /// Fires `Redial(target)`, expects one `Dial` to `HOST:port`, answers `Dialled` on a fresh
    /// connection and checks the `SERVER_HELLO_JOIN` and the welcome timer. Returns the
    /// connection.
    #[track_caller]
    pub fn dial(&mut self, target: u32, port: u16) -> ConnId {
        self.fire(Timer::Redial(target));
        assert_eq!(self.dials(), [(target, HOST.to_string(), port)]);
        let c = self.fresh_conn();
        self.input(Input::Dialled { conn: c, target });
        let frames = self.frames_to(c);
        assert_eq!(kinds(&frames), [types::SERVER_HELLO_JOIN], "{frames:#?}");
        assert_eq!(frames[0].to, format!("{HOST}:{port}"));
        let timers = self.timers();
        assert!(
            timers.contains(&(self.now.mono_ms + 10_000, Timer::Welcome(c))),
            "{timers:?}"
        );
        c
    }

    /// `SERVER_WELCOME` from `peer` on `c`.
    pub fn welcome(&mut self, c: ConnId, peer: &Peer, servers: Value, clients: Value) {
        let payload = json!({"assigned_id": self.id, "servers": servers, "clients": clients});
        let f = peer.frame(types::SERVER_WELCOME, &self.id, self.now.wall_ms, &payload);
        self.send(c, &f);
    }

    /// Dials `peer` as target `target` and brings the link up with an empty welcome.
    #[track_caller]
    pub fn link_out(&mut self, target: u32, peer: &Peer) -> ConnId {
        let c = self.dial(target, peer.port);
        self.welcome(c, peer, json!([]), json!([]));
        assert!(self.closes(c).is_empty(), "link to {} refused", peer.id);
        let frames = self.frames_to(c);
        assert!(
            kinds(&frames).contains(&types::SERVER_ANNOUNCE),
            "{frames:#?}"
        );
        c
    }

    /// An inbound link from `peer` opened with `SERVER_HELLO_LINK` (no reply expected).
    #[track_caller]
    pub fn link_in(&mut self, peer: &Peer) -> ConnId {
        let c = self.open_fresh();
        let f = peer.frame(
            types::SERVER_HELLO_LINK,
            &self.id,
            self.now.wall_ms,
            &peer.hello_payload(),
        );
        self.send(c, &f);
        assert!(self.closes(c).is_empty(), "link from {} refused", peer.id);
        let frames = self.frames_to(c);
        assert!(
            !frames
                .iter()
                .any(|f| f.kind == types::ERROR || f.kind == types::SERVER_WELCOME),
            "{frames:#?}"
        );
        c
    }

    /// Fires `Heartbeat` and returns the connections that got a `HEARTBEAT`; checks the next
    /// heartbeat is armed 15 s on (re-announces of ourselves are checked and taken too).
    #[track_caller]
    pub fn heartbeat(&mut self) -> Vec<ConnId> {
        self.fire(Timer::Heartbeat);
        let frames = self.extract(|a| {
            outgoing(a)
                .filter(|o| {
                    !o.routed
                        && (o.text.contains("\"type\":\"HEARTBEAT\"")
                            || o.text.contains("\"type\":\"SERVER_ANNOUNCE\""))
                })
                .map(|o| (o.conn, o.text.to_owned()))
        });
        let mut got = Vec::new();
        for (conn, text) in frames {
            let env = self.check(&text);
            if env.kind == types::HEARTBEAT {
                assert_eq!(env.from, self.id);
                assert_eq!(Value::Object(env.payload.clone()), json!({}));
                assert_eq!(env.ts, self.now.wall_ms);
                got.push(conn);
            } else {
                // Every few rounds we re-announce ourselves (kept fresh for relaying).
                assert_eq!(env.kind, types::SERVER_ANNOUNCE);
                assert_eq!(
                    (env.from.as_str(), env.to.as_str()),
                    (self.id.as_str(), "*")
                );
            }
        }
        let timers = self.extract(|a| match a {
            Action::Timer {
                at_ms,
                timer: Timer::Heartbeat,
            } => Some(*at_ms),
            _ => None,
        });
        assert!(
            timers == [self.now.mono_ms + 15_000],
            "the next heartbeat is armed: {timers:?}"
        );
        got.sort();
        got
    }
}

// -------------------------------------------------------------------- a played peer server

/// A peer server played by the test: its id, its private key, and the port it "listens" on.
pub struct Peer {
    pub id: &'static str,
    pub key: PrivateKey,
    pub port: u16,
}

impl Peer {
    pub fn new(id: &'static str, key_name: &str, port: u16) -> Peer {
        Peer {
            id,
            key: test_key(key_name),
            port,
        }
    }

    pub fn pub_b64(&self) -> &str {
        self.key.public_key().encoded()
    }

    /// `{host, port, pubkey}` as in SERVER_HELLO_* and SERVER_ANNOUNCE.
    pub fn hello_payload(&self) -> Value {
        json!({"host": HOST, "port": self.port, "pubkey": self.pub_b64()})
    }

    /// A frame from this peer, signed with its key.
    pub fn frame(&self, kind: &str, to: &str, ts: i64, payload: &Value) -> String {
        signed_frame(kind, self.id, to, ts, payload, &self.key)
    }

    /// `{server_id, host, port, pubkey}` as in SERVER_WELCOME.servers.
    pub fn server_entry(&self) -> Value {
        json!({"server_id": self.id, "host": HOST, "port": self.port, "pubkey": self.pub_b64()})
    }
}

// -------------------------------------------------------------------- frames and payloads

/// A frame whose payload is signed by `key`.
pub fn signed_frame(
    kind: &str,
    from: &str,
    to: &str,
    ts: i64,
    payload: &Value,
    key: &PrivateKey,
) -> String {
    encode_frame(
        kind,
        from,
        to,
        ts,
        &SignedPayload::sign(payload, key).unwrap(),
    )
}

/// A user frame: signed by `key`, or with an empty `sig`.
pub fn user_frame_at(
    kind: &str,
    from: &str,
    to: &str,
    ts: i64,
    payload: &Value,
    key: Option<&PrivateKey>,
) -> String {
    let signed = match key {
        Some(k) => SignedPayload::sign(payload, k).unwrap(),
        None => SignedPayload::unsigned(payload).unwrap(),
    };
    encode_frame(kind, from, to, ts, &signed)
}

/// A frame with the given payload and an arbitrary signature text.
pub fn frame_with_sig(
    kind: &str,
    from: &str,
    to: &str,
    ts: i64,
    payload: &Value,
    sig: &str,
) -> String {
    let signed = SignedPayload {
        canonical: canon::canonical(payload).unwrap(),
        sig: sig.to_owned(),
    };
    encode_frame(kind, from, to, ts, &signed)
}

/// A `USER_HELLO` payload, display name "tester".
pub fn hello_payload(pubkey: &str) -> Value {
    json!({
        "client": "socp-core-tests",
        "pubkey": pubkey,
        "enc_pubkey": pubkey,
        "meta": {"display_name": "tester"},
    })
}

/// A `USER_HELLO` payload for `key`, with a display name and capabilities (§5.6).
pub fn hello_payload_as(key: &PrivateKey, display_name: &str, caps: &[&str]) -> Value {
    json!({
        "client": "socp-federation-tests",
        "pubkey": key.public_key().encoded(),
        "enc_pubkey": key.public_key().encoded(),
        "meta": {"display_name": display_name},
        "caps": caps,
    })
}

pub fn auth_payload(ch: &Envelope, user_id: &str) -> Value {
    json!({
        "nonce": ch.payload["nonce"],
        "server_id": ch.payload["server_id"],
        "user_id": user_id,
    })
}

/// A `MSG_DIRECT` / `MSG_PUBLIC_CHANNEL` payload as a client builds it (§5.4, §3.5).
pub fn message_payload(
    sender: &PrivateKey,
    recipient: &PublicKey,
    from: &str,
    to: Option<&str>,
    ts: i64,
    text: &str,
) -> Value {
    let raw = recipient.encrypt(text.as_bytes()).unwrap();
    let ct = wire::b64::encode(&raw);
    let content_sig = crypto::make_content_sig(sender, &raw, from, to, ts);
    json!({
        "ciphertext": ct,
        "sender_pub": sender.public_key().encoded(),
        "content_sig": content_sig,
    })
}

/// A `SERVER_DELIVER` payload (§6) of a DM from `sender` to `user_id`.
pub fn deliver_payload(
    user_id: &str,
    sender: &str,
    sender_key: &PrivateKey,
    recipient: &PublicKey,
    ts: i64,
) -> Value {
    let raw = recipient.encrypt(b"relayed").unwrap();
    let ct = wire::b64::encode(&raw);
    let content_sig = crypto::make_content_sig(sender_key, &raw, sender, Some(user_id), ts);
    json!({
        "user_id": user_id,
        "ciphertext": ct,
        "sender": sender,
        "sender_pub": sender_key.public_key().encoded(),
        "content_sig": content_sig,
        "ts": ts,
    })
}

/// A directory entry `{user_id, server_id, pubkey, meta}`.
pub fn client_entry(user_id: &str, server_id: &str, key: &PrivateKey) -> Value {
    json!({
        "user_id": user_id,
        "server_id": server_id,
        "pubkey": key.public_key().encoded(),
        "meta": {"display_name": user_id},
    })
}

// -------------------------------------------------------------------- looking at frames

pub fn kinds(frames: &[Envelope]) -> Vec<&str> {
    frames.iter().map(|f| f.kind.as_str()).collect()
}

/// The user ids of a `LIST_RESPONSE`.
#[track_caller]
pub fn list_ids(list: &Envelope) -> Vec<String> {
    assert_eq!(list.kind, types::LIST_RESPONSE);
    assert!(list.payload["version"].is_i64(), "{list:?}");
    list.payload["users"]
        .as_array()
        .expect("users array")
        .iter()
        .map(|u| u["user_id"].as_str().expect("user_id").to_owned())
        .collect()
}

#[track_caller]
pub fn str_field<'a>(env: &'a Envelope, name: &str) -> &'a str {
    env.payload
        .get(name)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("payload.{name} missing in {env:?}"))
}

pub fn keys_of(payload: &Map<String, Value>) -> Vec<&str> {
    payload.keys().map(String::as_str).collect()
}
