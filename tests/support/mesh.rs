//! A simulated mesh (like quinn-proto's test `Pair`): N server cores, each a [`CoreHarness`],
//! wired to each other under one simulated clock, with no sockets and no threads.
//!
//! What one core asks of the net layer becomes the others' inputs: an `Action::Dial` to a port
//! opens a connection to the server listening there (`Input::Opened` on its side,
//! `Input::Dialled` on the dialler's), or fails (`Input::DialFailed`) when that server is not
//! running or the pair is cut; a `Send`/`Route` on a wire is that frame, verified, arriving as
//! `Input::Text` at the other end; a `Close` is `Input::Closed` there; a `Timer` fires when the
//! clock reaches it. Events are carried in the order they were produced (one FIFO), timers in
//! order of deadline then arming, so a run is deterministic.
//!
//! Frames to users stay in their server's outbox, for the test to take with
//! [`CoreHarness::frames_to`] as usual (`mesh.nodes[i]`).

use super::{CoreHarness, LOOPBACK, Setup, outgoing};
use socp::core::federation::FedConfig;
use socp::core::server::{Action, ConnId, Input, Time, Timer};
use socp::wire::Envelope;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Ids of the servers, in node order; their fixture keys are "server1" … "server4".
pub const IDS: [&str; 4] = ["srv-a", "srv-b", "srv-c", "srv-d"];
/// Node `i` listens on `BASE_PORT + i`.
pub const BASE_PORT: u16 = 9001;
/// More events than this in one settle is a loop the dedup (§6) should have stopped.
const MAX_EVENTS: usize = 100_000;

/// What the network carries from one core to another.
#[derive(Debug)]
enum Event {
    Opened {
        node: usize,
        conn: ConnId,
    },
    Dialled {
        node: usize,
        conn: ConnId,
        target: u32,
    },
    DialFailed {
        node: usize,
        target: u32,
    },
    Text {
        node: usize,
        conn: ConnId,
        text: String,
    },
    Closed {
        node: usize,
        conn: ConnId,
    },
}

/// How a pair of servers loses its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The connection is reset: both ends see it close at once.
    Reset,
    /// Frames are lost and nothing says so: each end finds out from the silence (§4.4).
    Silent,
}

pub struct Mesh {
    pub nodes: Vec<CoreHarness>,
    /// One clock for every node.
    pub now: Time,
    running: Vec<bool>,
    /// Each end of a live connection between two nodes → the other end.
    wires: BTreeMap<(usize, ConnId), (usize, ConnId)>,
    /// The dialling ends of the wires.
    dialled: BTreeSet<(usize, ConnId)>,
    /// Ends whose owner has closed them or seen them close: frames to them are lost.
    gone: BTreeSet<(usize, ConnId)>,
    /// Connections of users (played by the test) at each node.
    users: BTreeSet<(usize, ConnId)>,
    /// Pairs (smaller index first) whose dials fail and whose frames are lost.
    cut: BTreeSet<(usize, usize)>,
    queue: VecDeque<Event>,
    /// Armed timers: (at, arming order) → (node, timer).
    timers: BTreeMap<(u64, u64), (usize, Timer)>,
    armed: u64,
    next_conn: u64,
    /// Every frame put on a wire, in order: (from node, to node, text).
    pub wire_log: Vec<(usize, usize, String)>,
    /// Every dial: (time, from node, to node, connected).
    pub dial_log: Vec<(u64, usize, usize, bool)>,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Mesh {
    /// `n` servers (`IDS[i]`, key "server{i+1}", port `BASE_PORT + i`), none started; node
    /// `i` dials the nodes `bootstrap[i]` lists (pinning their keys). Every node may verify
    /// frames signed by any other. `mesh`: dial every server learned of (the default).
    pub fn new(bootstrap: &[&[usize]], mesh: bool) -> Mesh {
        let n = bootstrap.len();
        assert!(n <= IDS.len());
        let now = Time {
            mono_ms: super::MONO0,
            wall_ms: super::WALL0,
        };
        let nodes = (0..n)
            .map(|i| {
                let cfg = FedConfig {
                    bootstrap: bootstrap[i]
                        .iter()
                        .map(|&j| super::spec(&format!("server{}", j + 1), BASE_PORT + j as u16))
                        .collect(),
                    advertise_port: BASE_PORT + i as u16,
                    mesh,
                    // Each its own jitter, as separate processes would have.
                    rng_seed: 0x5eed_0000 + i as u64,
                    ..FedConfig::default()
                };
                let mut setup = Setup::new(IDS[i])
                    .key(&format!("server{}", i + 1))
                    .federation(cfg)
                    .at(now.mono_ms, now.wall_ms);
                for j in (0..n).filter(|&j| j != i) {
                    setup = setup.peer(IDS[j], &format!("server{}", j + 1));
                }
                CoreHarness::build(setup)
            })
            .collect();
        Mesh {
            nodes,
            now,
            running: vec![false; n],
            wires: BTreeMap::new(),
            dialled: BTreeSet::new(),
            gone: BTreeSet::new(),
            users: BTreeSet::new(),
            cut: BTreeSet::new(),
            queue: VecDeque::new(),
            timers: BTreeMap::new(),
            armed: 0,
            next_conn: 1_000_000,
            wire_log: Vec::new(),
            dial_log: Vec::new(),
        }
    }

    /// Node `i`'s index from its id.
    pub fn node(&self, id: &str) -> usize {
        IDS.iter().position(|x| *x == id).expect("a mesh id")
    }

    /// Starts node `i` (it dials its bootstrap peers at once) and carries what follows.
    pub fn start(&mut self, i: usize) {
        assert!(!self.running[i], "{} started twice", IDS[i]);
        self.running[i] = true;
        self.nodes[i].now = self.now;
        self.nodes[i].start();
        self.settle();
    }

    /// Shuts node `i` down gracefully: its links close, it dials no more, its timers are
    /// dropped and dials to it fail.
    pub fn shutdown(&mut self, i: usize) {
        self.nodes[i].now = self.now;
        self.nodes[i].shutdown();
        self.collect(i);
        self.running[i] = false;
        self.timers.retain(|_, (node, _)| *node != i);
        self.settle();
    }

    // ---------------------------------------------------------------- time

    /// Advances the clock by `ms`, firing every timer that falls due on the way, each at its
    /// own time, and carrying everything that follows.
    pub fn advance(&mut self, ms: u64) {
        let until = self.now.mono_ms + ms;
        self.settle();
        while let Some((&(at, _), _)) = self.timers.iter().next() {
            if at > until {
                break;
            }
            self.set_clock(at);
            // Every timer due now fires before the network carries anything: two servers
            // whose timers fall due together act at once (their dials cross, say).
            let due: Vec<(u64, u64)> = self.timers.range(..(at + 1, 0)).map(|(k, _)| *k).collect();
            for key in due {
                let (node, timer) = self.timers.remove(&key).unwrap();
                if self.running[node] {
                    self.feed(node, Input::Timer(timer));
                }
            }
            self.settle();
        }
        self.set_clock(until);
    }

    fn set_clock(&mut self, mono_ms: u64) {
        if mono_ms > self.now.mono_ms {
            let ms = mono_ms - self.now.mono_ms;
            self.now.mono_ms += ms;
            self.now.wall_ms += ms as i64;
        }
    }

    /// The timers armed and not yet fired: (at, node, timer), in firing order.
    pub fn pending_timers(&self) -> Vec<(u64, usize, Timer)> {
        self.timers
            .iter()
            .map(|(&(at, _), &(node, timer))| (at, node, timer))
            .collect()
    }

    // ---------------------------------------------------------------- the network

    /// Loses the link between nodes `a` and `b` (and refuses their dials) until [`Mesh::heal`].
    pub fn cut(&mut self, a: usize, b: usize, how: Cut) {
        self.cut.insert(pair(a, b));
        if how == Cut::Reset {
            let ends: Vec<((usize, ConnId), (usize, ConnId))> = self
                .wires
                .iter()
                .filter(|((x, _), (y, _))| pair(*x, *y) == pair(a, b))
                .map(|(k, v)| (*k, *v))
                .collect();
            for ((x, cx), _) in ends {
                self.wires.remove(&(x, cx));
                self.queue.push_back(Event::Closed { node: x, conn: cx });
            }
        }
        self.settle();
    }

    /// Lets nodes `a` and `b` reach each other again (their redial timers do the rest).
    pub fn heal(&mut self, a: usize, b: usize) {
        self.cut.remove(&pair(a, b));
    }

    /// Live connections between nodes `a` and `b` (dialled, linked, or being closed by one
    /// end only).
    pub fn wires_between(&self, a: usize, b: usize) -> usize {
        let from_a = self
            .wires
            .iter()
            .filter(|((x, _), (y, _))| *x == a && *y == b)
            .count();
        // Connections whose end at `a` is already closed.
        let only_b = self
            .wires
            .iter()
            .filter(|((x, _), (y, c))| *x == b && *y == a && !self.wires.contains_key(&(a, *c)))
            .count();
        from_a + only_b
    }

    /// Live connections node `a` dialled to node `b`.
    pub fn wires_dialled(&self, a: usize, b: usize) -> usize {
        self.wires
            .iter()
            .filter(|(end, (y, _))| end.0 == a && *y == b && self.dialled.contains(end))
            .count()
    }

    /// The servers node `i` has a link with, as its core says (`/healthz`), sorted.
    pub fn linked(&self, i: usize) -> Vec<String> {
        let mut ids: Vec<String> = self.nodes[i]
            .server
            .census()
            .links
            .iter()
            .map(|s| s.to_string())
            .collect();
        ids.sort();
        ids
    }

    /// Who node `i`'s directory has online, and where: (user, server), sorted.
    pub fn directory(&self, i: usize) -> Vec<(String, String)> {
        let dir = self.nodes[i].server.directory();
        let mut all: Vec<(String, String)> = dir
            .user_ids()
            .map(|u| (u.to_string(), dir.get(u).unwrap().server_id.clone()))
            .collect();
        all.sort();
        all
    }

    // ---------------------------------------------------------------- users

    /// Logs `user_id` in at node `i` (display name `user_id`, `caps` announced) and carries
    /// what follows. Its frames then stay in node `i`'s outbox.
    pub fn login_caps(
        &mut self,
        i: usize,
        user_id: &str,
        key: &socp::crypto::PrivateKey,
        caps: &[&str],
    ) -> ConnId {
        self.settle();
        self.nodes[i].now = self.now;
        let c = self.nodes[i].user_caps(user_id, key, caps);
        self.users.insert((i, c));
        self.settle();
        c
    }

    pub fn login(&mut self, i: usize, user_id: &str, key: &socp::crypto::PrivateKey) -> ConnId {
        self.login_caps(i, user_id, key, &[])
    }

    /// A frame from a user at node `i`, and what follows.
    pub fn user_sends(&mut self, i: usize, c: ConnId, text: &str) {
        assert!(self.users.contains(&(i, c)), "not a user connection");
        self.feed(i, Input::Text { conn: c, text });
        self.settle();
    }

    /// The user on `c` at node `i` goes away.
    pub fn user_leaves(&mut self, i: usize, c: ConnId) {
        self.users.remove(&(i, c));
        self.feed(i, Input::Closed { conn: c });
        self.settle();
    }

    // ---------------------------------------------------------------- the engine

    /// One input to node `i` at the mesh's time; its actions are collected.
    fn feed(&mut self, i: usize, input: Input<'_>) {
        self.nodes[i].now = self.now;
        self.nodes[i].input(input);
        self.collect(i);
    }

    /// Carries events until none is left.
    pub fn settle(&mut self) {
        for i in 0..self.nodes.len() {
            self.collect(i);
        }
        let mut events = 0;
        while let Some(ev) = self.queue.pop_front() {
            events += 1;
            assert!(events < MAX_EVENTS, "the mesh does not settle: {ev:?}");
            match ev {
                Event::Opened { node, conn } => self.feed(
                    node,
                    Input::Opened {
                        conn,
                        peer: LOOPBACK,
                    },
                ),
                Event::Dialled { node, conn, target } => {
                    self.feed(node, Input::Dialled { conn, target })
                }
                Event::DialFailed { node, target } => self.feed(
                    node,
                    Input::DialFailed {
                        target,
                        reason: "Connection refused (os error 111)".into(),
                    },
                ),
                Event::Text { node, conn, text } => {
                    // A frame on a connection its receiver has already closed is lost.
                    if !self.gone.contains(&(node, conn)) {
                        self.feed(node, Input::Text { conn, text: &text });
                    }
                }
                Event::Closed { node, conn } => {
                    self.gone.insert((node, conn));
                    self.feed(node, Input::Closed { conn })
                }
            }
        }
    }

    /// Takes node `i`'s actions meant for the network, the clock or another node; frames and
    /// closes for its users stay in its outbox.
    fn collect(&mut self, i: usize) {
        // What one input sends to different connections goes out in the order of the
        // receiving ends, not the order the core listed them in (it walks hash maps: the order
        // of its links differs from run to run). Per connection, the order is the core's.
        let mut batch: Vec<((usize, ConnId), Event)> = Vec::new();
        let mut timers: Vec<(u64, String, Timer)> = Vec::new();
        let actions = std::mem::take(&mut self.nodes[i].outbox);
        for a in actions {
            if let Some(o) = outgoing(&a) {
                let end = (i, o.conn);
                if let Some(&(j, cj)) = self.wires.get(&end) {
                    // Every frame between servers is checked as it leaves.
                    self.nodes[i].check(o.text);
                    if !self.cut.contains(&pair(i, j)) {
                        let text = o.text.to_string();
                        batch.push((
                            (j, cj),
                            Event::Text {
                                node: j,
                                conn: cj,
                                text,
                            },
                        ));
                    }
                } else if self.users.contains(&end) {
                    self.nodes[i].outbox.push(a);
                }
                // Else: a connection already gone; the net layer drops it too.
                continue;
            }
            match a {
                Action::Timer { at_ms, timer } => timers.push((at_ms, format!("{timer:?}"), timer)),
                Action::Dial { target, port, .. } => {
                    let j = port.checked_sub(BASE_PORT).map_or(usize::MAX, usize::from);
                    let reachable = j < self.nodes.len()
                        && j != i
                        && self.running[j]
                        && !self.cut.contains(&pair(i, j));
                    self.dial_log.push((self.now.mono_ms, i, j, reachable));
                    if reachable {
                        let (ci, cj) = (self.fresh_conn(), self.fresh_conn());
                        self.wires.insert((i, ci), (j, cj));
                        self.dialled.insert((i, ci));
                        self.wires.insert((j, cj), (i, ci));
                        batch.push(((j, cj), Event::Opened { node: j, conn: cj }));
                        batch.push((
                            (i, ci),
                            Event::Dialled {
                                node: i,
                                conn: ci,
                                target,
                            },
                        ));
                    } else {
                        batch.push(((i, ConnId(0)), Event::DialFailed { node: i, target }));
                    }
                }
                Action::Close { conn, .. } => {
                    self.gone.insert((i, conn));
                    if let Some((j, cj)) = self.wires.remove(&(i, conn)) {
                        if !self.cut.contains(&pair(i, j)) && self.wires.remove(&(j, cj)).is_some()
                        {
                            batch.push(((j, cj), Event::Closed { node: j, conn: cj }));
                        }
                    } else if self.users.contains(&(i, conn)) {
                        self.users.remove(&(i, conn));
                        self.nodes[i].outbox.push(a);
                    }
                }
                Action::Send { .. } | Action::Route { .. } => unreachable!(),
            }
        }
        batch.sort_by_key(|(end, _)| *end); // stable: per connection, the core's order
        for (_, event) in batch {
            if let Event::Text { node, text, .. } = &event {
                self.wire_log.push((i, *node, text.clone()));
            }
            self.queue.push_back(event);
        }
        timers.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        for (at_ms, _, timer) in timers {
            self.armed += 1;
            self.timers.insert((at_ms, self.armed), (i, timer));
        }
    }

    /// The frames put on the wire from node `a` to node `b`, parsed, with their text.
    pub fn carried(&self, a: usize, b: usize) -> Vec<(Envelope, &str)> {
        self.wire_log
            .iter()
            .filter(|(x, y, _)| (*x, *y) == (a, b))
            .map(|(_, _, t)| (Envelope::parse(t).unwrap(), t.as_str()))
            .collect()
    }

    fn fresh_conn(&mut self) -> ConnId {
        self.next_conn += 1;
        super::conn(self.next_conn)
    }
}
