//! The net layer: the only code that touches sockets, the clock and the timer wheel
//! (DESIGN.md "The shape" and "Rules of the event loop").
//!
//! One thread, one `mio::Poll`. It accepts connections, drives non-blocking WebSocket
//! handshakes under a deadline, reads frames until `WouldBlock`, hands each to the core with the
//! current [`Time`], and carries out the core's [`Action`]s: `write()` to every recipient, then
//! one `flush()` per connection per loop turn.
//!
//! Every connection's registration is `READABLE | WRITABLE`, edge-triggered: a writable event
//! comes only when a full socket buffer drains, so nothing spins on it.
//!
//! This file is the event loop ([`Net`]): the registry of connections, timers, the lists of
//! connections to flush, read again or keep paused, and the one place inputs reach the core
//! (losses apart: they wait in a queue and are fed while the core's actions are carried out).
//! Beside it are one connection and its I/O (`conn`: handshakes, reads, writes, closing), its
//! outbox of messages the socket has not taken yet (`outbox`), the signer threads
//! ([`signpool`]), the hashed timer wheel ([`timer`]), the plain-or-TLS byte stream under
//! tungstenite ([`tls`], which the `socp` client uses too) and the answers to plain HTTP
//! requests on the WebSocket port ([`http`]). The layer owns I/O and
//! time; it must not decide what a frame means or keep protocol state: it parses nothing past
//! the WebSocket frame, and every decision about a SOCP frame is the core's.

mod conn;
pub mod http;
mod outbox;
pub mod signpool;
pub mod timer;
pub mod tls;

use crate::config::Config;
use crate::core::server::{self, Action, ConnId, Input, Server, Time};
use crate::net::conn::{Closing, Code, Conn, Flushed, Received, Sent, Step};
use crate::net::timer::TimerWheel;
use crate::net::tls::MaybeTls;
use crate::wire::frame::{Completions, Frame, lock};
use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read};
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::protocol::WebSocketConfig;

/// A connection's byte stream: plain TCP, or TLS over it when we serve `wss://` or dial a
/// `wss://` peer. tungstenite runs over either unchanged; see [`crate::net::tls`] for how TLS keeps
/// the event-loop rules (reads drain decrypted data, records are flushed eagerly).
type Stream = MaybeTls<TcpStream>;

/// The listening socket.
const LISTENER: Token = Token(usize::MAX - 1);
/// The read end of the self-pipe that SIGINT/SIGTERM write to.
const SIGNAL: Token = Token(usize::MAX - 2);
/// Signer threads completed frames.
const SIGNED: Token = Token(usize::MAX - 3);

/// Dropped connections reported to the core per loop turn (and within [`TURN_TIME`]): each
/// can cost a `USER_REMOVE` to every user, so a mass leave is handled in slices with polls in
/// between (issue "signatures off the loop": 2,000 users leaving at once stalled everyone for
/// 13 s).
const GONE_SLICE: usize = 64;

/// Messages read per loop turn (text frames for the core, close frames, pings), over all
/// connections (text messages within [`TURN_TIME`]); the rest wait in the backlog for the next turn
/// (after a poll, so completed signatures, timers and users already talking are not held up by
/// a burst of input).
const TURN_BUDGET: usize = 256;

/// How long a turn may spend on messages read, and apart from that on dropped connections
/// reported, before the rest waits for the next poll. The cost of one varies a thousandfold (a
/// login or a loss is a frame to every user), so a count alone would let a storm's turn run
/// for tens of milliseconds while a user already talking waits for the next poll. Apart, so
/// that a mass leave's losses do not keep its close frames unread (a connection not yet known
/// to be closing is sent every other leaver's `USER_REMOVE`).
const TURN_TIME: Duration = Duration::from_millis(2);

/// Time a loop turn spent on each kind of input.
#[derive(Default)]
struct Spent {
    /// Text messages read and handled (with what they caused, losses apart).
    reading: Duration,
    /// Dropped connections reported (with the `USER_REMOVE`s and the rest they caused).
    losses: Duration,
}

/// A loop turn this long is logged (at debug), with what it handled.
const SLOW_TURN: Duration = Duration::from_millis(20);

/// Bytes written from the outboxes per loop turn (see [`Net::flush_dirty`]). With 1 MiB a
/// login storm's turns were long enough to put the probe's p99 at 4–30x its idle value
/// (issue "signatures off the loop", A/B in the README); a conversation's frame, least
/// loaded, goes out early in any turn.
const FLUSH_BUDGET: usize = 256 << 10;

/// Messages read from one connection in one loop turn before others get a turn; the rest wait
/// in the backlog (read again next turn without waiting for a new readiness event).
const READ_BUDGET: usize = 64;
/// How long a closing connection may take to flush and see the peer's close reply.
const CLOSE_LINGER_MS: u64 = 2_000;
/// How long a connection closed by the core may wait for the signatures of its last frames
/// (behind a storm's queue of signing work) before it is dropped without them.
const SIGNING_GRACE_MS: u64 = 12_000;
/// How long a graceful shutdown waits for connections to finish closing.
const SHUTDOWN_LINGER_MS: u64 = 1_000;

/// Milliseconds since `start`: the loop's monotonic clock.
fn mono_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// A dropped connection the core has not been told about yet (see `Net::gone`).
enum Gone {
    Closed(ConnId),
    DialFailed(u32, String),
}

/// Timers of the net layer; the core's own ride inside [`NetTimer::Core`].
#[derive(Debug, Clone, Copy)]
enum NetTimer {
    Handshake(ConnId),
    CloseLinger(ConnId),
    /// A connection closed by the core still waits for its last frames' signatures: drop it
    /// if it still does.
    SigningGrace(ConnId),
    /// The connection has been blocked since this time; close it if it still is.
    Blocked(ConnId, u64),
    Shutdown,
    Core(server::Timer),
}

/// The event loop and everything it owns.
pub struct Net {
    poll: Poll,
    listener: TcpListener,
    signals: Option<UnixStream>,
    conns: Slab<Conn>,
    serial: u32,
    wheel: TimerWheel<NetTimer>,
    start: Instant,
    core: Server,
    ws_config: WebSocketConfig,
    /// Outbound links receive `SERVER_WELCOME`, which carries the whole directory.
    peer_ws_config: WebSocketConfig,
    /// Serve `wss://`: accepted connections speak TLS first (`--tls-cert`, `--tls-key`).
    tls: Option<Arc<rustls::ServerConfig>>,
    /// How `wss://` peers are dialled, or why they cannot be (no usable roots).
    peer_tls: Result<Arc<rustls::ClientConfig>, String>,
    handshake_timeout_ms: u64,
    max_connections: usize,
    /// Connections with unflushed writes.
    dirty: Vec<usize>,
    /// Connections whose read budget ran out with data possibly left.
    backlog: Vec<usize>,
    /// Connections not read while a connection their routed frames go to is blocked
    /// (backpressure).
    paused: Vec<usize>,
    /// Blocked connections that frames routed for the input's sender ([`Action::Route`]) went
    /// to, while handling one input. Broadcasts and the server's own frames are not counted:
    /// they wait in the blocked connection's outbox (bounded by `max_write_buffer`), and
    /// whoever caused them is not slowed down (issue "trust at the edges": a login, which
    /// broadcasts to every user, waited for a user who never reads).
    hit_blocked: Vec<ConnId>,
    /// A connection blocked this long is a reader that does not keep up: it is closed.
    slow_reader_timeout_ms: u64,
    /// Bytes that may wait for one connection before it is closed as not reading.
    max_write_buffer: usize,
    /// Connections dropped and not yet reported to the core, oldest first. Reporting one can
    /// make the core broadcast to every user (a `USER_REMOVE`); were that done in the middle of
    /// carrying out another broadcast whose sends are what failed — many connections lost at
    /// once — each loss would queue a broadcast behind the rest, and the queued actions would
    /// grow with connections squared (2.5 GiB resident after 10 000 users left at once). So
    /// each is reported after the actions under way are done, and its own are carried out
    /// before the next one is reported.
    gone: VecDeque<Gone>,
    /// Scratch space for expired timers.
    fired: Vec<NetTimer>,
    shutting_down: bool,
    shutdown_done: bool,
    /// Connections whose outbox's first waiting frame has been completed since the loop last
    /// looked (see [`Conn::wait_for_signature`]).
    completions: Completions,
    /// Set by the signer threads when they complete frames (None: signing in line).
    signed: Option<Arc<AtomicBool>>,
    /// Dropped connections reported to the core this turn (see [`GONE_SLICE`]).
    gone_this_turn: usize,
    /// Messages read this turn (see [`TURN_BUDGET`]).
    inputs_this_turn: usize,
    /// What this turn has spent on messages read and on losses reported (see [`TURN_TIME`]).
    spent: Spent,
}

impl Net {
    /// Sets up the loop around a bound listener. `signals` is the read end of the self-pipe the
    /// signal handlers write to (none in tests that stop the server by killing it).
    pub fn new(
        cfg: &Config,
        listener: std::net::TcpListener,
        signals: Option<std::os::unix::net::UnixStream>,
        core: Server,
    ) -> io::Result<Net> {
        let poll = Poll::new()?;
        let mut core = core;
        let signed = match cfg.sign_threads {
            0 => None,
            n => {
                let waker = mio::Waker::new(poll.registry(), SIGNED)?;
                let key = Arc::clone(core.private_key());
                let pool = signpool::SignPool::start(key, n, Box::new(waker))?;
                let woken = pool.woken();
                core.set_signer(Box::new(pool));
                info!("signing on {n} thread(s), and one for conversations only");
                Some(woken)
            }
        };
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let signals = match signals {
            Some(s) => {
                s.set_nonblocking(true)?;
                let mut s = UnixStream::from_std(s);
                poll.registry()
                    .register(&mut s, SIGNAL, Interest::READABLE)?;
                Some(s)
            }
            None => None,
        };
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(cfg.read_buffer_size)
            // Eager writes: frames leave at once; what the socket refuses waits for flush().
            .write_buffer_size(0)
            .max_write_buffer_size(cfg.max_write_buffer)
            .max_message_size(Some(cfg.max_message_size))
            .max_frame_size(Some(cfg.max_message_size));
        let peer_ws_config = ws_config
            .max_message_size(Some(cfg.max_peer_message_size))
            .max_frame_size(Some(cfg.max_peer_message_size));
        Ok(Net {
            peer_ws_config,
            tls: None,
            peer_tls: Err("no TLS client configuration".into()),
            poll,
            listener,
            signals,
            conns: Slab::new(),
            serial: 0,
            wheel: TimerWheel::new(10, 1024, 0),
            start: Instant::now(),
            core,
            ws_config,
            handshake_timeout_ms: cfg.handshake_timeout_ms,
            max_connections: cfg.max_connections,
            dirty: Vec::new(),
            backlog: Vec::new(),
            paused: Vec::new(),
            hit_blocked: Vec::new(),
            slow_reader_timeout_ms: cfg.slow_reader_timeout_ms,
            max_write_buffer: cfg.max_write_buffer,
            fired: Vec::new(),
            gone: VecDeque::new(),
            shutting_down: false,
            shutdown_done: false,
            completions: Completions::default(),
            signed,
            gone_this_turn: 0,
            inputs_this_turn: 0,
            spent: Spent::default(),
        })
    }

    /// Serves `wss://` with `server` (None: plain `ws://`), and dials `wss://` peers with
    /// `peers` (an error says why they cannot be dialled; each such dial fails with it).
    pub fn with_tls(
        mut self,
        server: Option<Arc<rustls::ServerConfig>>,
        peers: Result<Arc<rustls::ClientConfig>, String>,
    ) -> Net {
        self.tls = server;
        self.peer_tls = peers;
        self
    }

    /// Runs until a graceful shutdown completes.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let now = self.now();
        self.core.start(now);
        self.apply_actions();
        while !self.shutdown_done {
            self.gone_this_turn = 0;
            self.inputs_this_turn = 0;
            let timeout =
                if self.backlog.is_empty() && self.gone.is_empty() && self.dirty.is_empty() {
                    self.wheel
                        .next_deadline()
                        .map(|at| Duration::from_millis(at.saturating_sub(self.mono_ms())))
                } else {
                    Some(Duration::ZERO)
                };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let turn_start = Instant::now();
            self.spent = Spent::default();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    SIGNAL => self.on_signal(),
                    SIGNED => {} // below, once per turn
                    Token(idx) => self.on_ready(idx, event.is_readable(), event.is_writable()),
                }
                // A connection this event dropped: the core hears of it before the next input.
                self.apply_actions();
            }
            for idx in std::mem::take(&mut self.backlog) {
                self.read_frames(idx);
                self.apply_actions();
            }
            self.fire_timers();
            self.apply_actions();
            self.end_turn();
            self.flush_dirty();
            // Connections dropped while flushing may have left the core something to say
            // (a `USER_REMOVE` for the others).
            while self.core.has_actions() || self.core.has_deferred() {
                self.apply_actions();
                self.end_turn();
                self.flush_dirty();
            }
            let took = turn_start.elapsed();
            if took >= SLOW_TURN {
                // Every connection waited this long: worth knowing why.
                debug!(
                    "slow loop turn: {} ms, {} events, {} messages read, {} losses reported",
                    took.as_millis(),
                    events.iter().count(),
                    self.inputs_this_turn,
                    self.gone_this_turn
                );
            }
        }
        info!("shutdown complete");
        Ok(())
    }

    fn now(&self) -> Time {
        Time {
            mono_ms: self.mono_ms(),
            wall_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
        }
    }

    fn mono_ms(&self) -> u64 {
        mono_ms(self.start)
    }

    // ------------------------------------------------------------ accept and handshake

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, addr)) => {
                    if self.shutting_down {
                        continue; // dropped: we are going away
                    }
                    if self.conns.len() >= self.max_connections {
                        warn!("refusing {addr}: {} connections open", self.conns.len());
                        continue;
                    }
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!("set_nodelay for {addr}: {e}");
                    }
                    self.add_conn(stream, addr);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: log and wait for the next readiness event.
                    warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn add_conn(&mut self, stream: TcpStream, addr: std::net::SocketAddr) {
        // With TLS, its handshake runs as the request is looked at (then inside the WebSocket
        // handshake's reads), under the same deadline.
        let tls = match &self.tls {
            Some(config) => match rustls::ServerConnection::new(Arc::clone(config)) {
                Ok(conn) => Some(conn),
                Err(e) => return warn!("TLS for {addr}: {e}"),
            },
            None => None,
        };
        // The request is looked at when it arrives (a readable event).
        match self.insert_conn(stream, |id, stream| Conn::accepted(id, stream, tls)) {
            Ok(id) => debug!("conn {id}: accepted from {addr}"),
            Err(e) => warn!("register {addr}: {e}"),
        }
    }

    /// Registers a new socket with the poll under a fresh slab slot and [`ConnId`], and arms
    /// its handshake deadline.
    fn insert_conn(
        &mut self,
        mut stream: TcpStream,
        conn: impl FnOnce(ConnId, TcpStream) -> Conn,
    ) -> io::Result<ConnId> {
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        self.poll.registry().register(
            &mut stream,
            Token(idx),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.serial = self.serial.wrapping_add(1);
        let id = conn::conn_id(self.serial, idx);
        entry.insert(conn(id, stream));
        let at = self.mono_ms() + self.handshake_timeout_ms;
        self.wheel.insert(at, NetTimer::Handshake(id));
        Ok(id)
    }

    /// The net layer's numbers for `GET /metrics` and `GET /healthz`.
    fn net_stats(&self) -> crate::core::metrics::NetStats {
        let mut stats = crate::core::metrics::NetStats {
            uptime_ms: self.mono_ms(),
            ..Default::default()
        };
        for (_, conn) in &self.conns {
            conn.count(&mut stats);
        }
        stats
    }

    // ------------------------------------------------------------ dialling peers

    /// Starts a non-blocking connect to a peer; the outcome comes back to the core as
    /// `Dialled` or `DialFailed`. `tls`: a `wss://` peer, whose certificate must be valid for
    /// `host` (its pinned key is checked by the core as for any peer).
    fn dial(&mut self, target: u32, host: &str, port: u16, tls: bool) {
        let tls = match tls {
            false => None,
            true => {
                let started = match &self.peer_tls {
                    Ok(config) => crate::net::tls::server_name(host).and_then(|name| {
                        rustls::ClientConnection::new(Arc::clone(config), name)
                            .map_err(|e| format!("TLS: {e}"))
                    }),
                    Err(why) => Err(format!("cannot dial wss://: {why}")),
                };
                match started {
                    Ok(conn) => Some(Box::new(conn)),
                    Err(why) => return self.dial_failed(target, &why),
                }
            }
        };
        // Name lookup blocks; peers are normally given as addresses, and this runs only on
        // (re)dials, never per frame.
        let addr = match (host, port).to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(addr)) => addr,
            Ok(None) => return self.dial_failed(target, "no address for that host"),
            Err(e) => return self.dial_failed(target, &format!("address lookup: {e}")),
        };
        let stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => return self.dial_failed(target, &e.to_string()),
        };
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let url = if host.contains(':') {
            format!("{scheme}://[{host}]:{port}/")
        } else {
            format!("{scheme}://{host}:{port}/")
        };
        let shown = url.clone();
        let connecting = |id, stream| Conn::connecting(id, stream, target, url, tls);
        match self.insert_conn(stream, connecting) {
            Ok(id) => debug!("conn {id}: connecting to {shown}"),
            Err(e) => self.dial_failed(target, &e.to_string()),
        }
    }

    /// Reported to the core with the other losses (see `gone`), not while its actions are
    /// being carried out.
    fn dial_failed(&mut self, target: u32, reason: &str) {
        self.gone
            .push_back(Gone::DialFailed(target, reason.to_string()));
    }

    // ------------------------------------------------------------ readiness

    fn on_ready(&mut self, idx: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(idx) else {
            return;
        };
        match conn.advance(&self.ws_config, &self.peer_ws_config) {
            Step::Open => {
                if writable {
                    self.mark_dirty(idx);
                }
                if readable {
                    self.read_frames(idx);
                }
            }
            step => self.opening(idx, step),
        }
    }

    /// Carries out what a step of a connection not open yet came to ([`Conn::advance`]).
    fn opening(&mut self, idx: usize, step: Step) {
        let Some(conn) = self.conns.get(idx) else {
            return;
        };
        let id = conn.id();
        match step {
            Step::Wait | Step::Open => {}
            Step::Http(request) => {
                let out = http::answer(request, &self.core, &self.net_stats());
                let step = self.conns[idx].answer(out);
                self.opening(idx, step);
            }
            Step::Accepted(peer) => {
                self.input(Input::Opened { conn: id, peer });
                self.read_frames(idx);
            }
            Step::Dialled(target) => {
                self.input(Input::Dialled { conn: id, target });
                self.read_frames(idx);
            }
            Step::Drop(reason) => self.drop_conn_because(idx, &reason),
        }
    }

    /// Reads until `WouldBlock` (or the read budget), handing each message to the core.
    fn read_frames(&mut self, idx: usize) {
        for _ in 0..READ_BUDGET {
            if self.inputs_this_turn >= TURN_BUDGET
                || (self.inputs_this_turn > 0 && self.spent.reading >= TURN_TIME)
            {
                // Enough for one turn (a login storm is 1,000 hellos in one poll): the rest
                // is read after the next poll, so frames signed meanwhile leave in between.
                return self.backlog.push(idx);
            }
            let Some(conn) = self.conns.get_mut(idx) else {
                return;
            };
            let id = conn.id();
            let received = conn.read();
            if let Received::Text(_) | Received::Binary | Received::PeerClosed | Received::Control =
                received
            {
                // Every message counts: a mass leave is a thousand close frames in one poll.
                self.inputs_this_turn += 1;
            }
            match received {
                Received::Text(text) => {
                    self.hit_blocked.clear();
                    let (started, losses) = (Instant::now(), self.spent.losses);
                    self.input(Input::Text {
                        conn: id,
                        text: text.as_str(),
                    });
                    // Losses reported meanwhile are on their own account.
                    self.spent.reading += started
                        .elapsed()
                        .saturating_sub(self.spent.losses.saturating_sub(losses));
                    if let Some(why) = self.hit_still_blocked() {
                        // Backpressure: what this connection sends to others cannot leave
                        // as fast as it arrives. Stop reading it until the blocked
                        // connection drains.
                        if let Some(conn) = self.conns.get_mut(idx)
                            && conn.pause()
                        {
                            debug!("conn {id}: paused ({why})");
                            self.paused.push(idx);
                        }
                        return;
                    }
                }
                Received::Binary => self.input(Input::Binary { conn: id }),
                // tungstenite queued the close reply; flush it, then drop.
                Received::PeerClosed => self.start_closing(idx, None),
                Received::Control => self.mark_dirty(idx),
                Received::TooLarge => return self.input(Input::TooLarge { conn: id }),
                Received::Violation(code) => {
                    self.start_closing(idx, Some(code));
                    // What came after the refused frame is read and dropped.
                    if let Some(conn) = self.conns.get_mut(idx)
                        && let Received::Lost = conn.read()
                    {
                        self.drop_conn(idx);
                    }
                    // The core forgot the connection: what it says about that (a
                    // USER_REMOVE) goes out now.
                    return self.apply_actions();
                }
                Received::Nothing => return,
                Received::Lost => return self.drop_conn(idx),
            }
        }
        self.backlog.push(idx);
    }

    // ------------------------------------------------------------ inputs and actions

    /// Hands one input to the core, then carries out what it calls for: every input from a
    /// connection, a timer or the loop (losses apart: [`Net::report_gone`]), one at a time,
    /// each one's actions done before the next is read (backpressure is decided between them).
    fn input(&mut self, input: Input<'_>) {
        self.feed(input);
        self.apply_actions();
    }

    /// Hands one input to the core, at the current time (see [`Net::input`]; a loss is fed
    /// from inside [`Net::apply_actions`]).
    fn feed(&mut self, input: Input<'_>) {
        let now = self.now();
        self.core.handle(now, input);
    }

    /// Carries out the core's actions, in order, taking them one at a time
    /// ([`Server::poll_action`]). Carrying one out never feeds the core: what it causes (a
    /// connection dropped or closed, a dial that failed) waits in `gone` and is reported once
    /// the core has nothing left for us.
    fn apply_actions(&mut self) {
        // A loss reported here: when, so that what it costs (its actions) is accounted.
        let mut loss: Option<Instant> = None;
        loop {
            let Some(action) = self.core.poll_action() else {
                if let Some(at) = loss.take() {
                    self.spent.losses += at.elapsed();
                }
                let spent = self.gone_this_turn > 0 && self.spent.losses >= TURN_TIME;
                if self.gone_this_turn < GONE_SLICE && !spent {
                    let at = Instant::now();
                    if self.report_gone() {
                        loss = Some(at);
                        self.gone_this_turn += 1;
                        continue;
                    }
                }
                return;
            };
            match action {
                Action::Send { conn, text } => self.send(conn, text, false),
                Action::Route { conn, text } => self.send(conn, text, true),
                Action::Close { conn, code, reason } => {
                    if let Some(idx) = self.index_of(conn) {
                        self.start_closing(idx, Some((code.code(), reason)));
                    }
                }
                Action::Timer { at_ms, timer } => self.wheel.insert(at_ms, NetTimer::Core(timer)),
                Action::Dial {
                    target,
                    host,
                    port,
                    tls,
                } => self.dial(target, &host, port, tls),
            }
        }
    }

    /// Writes `frame` to connection `id`, or queues it ([`Conn::send`]). `routed`: a frame the
    /// core routes for the input's sender ([`Action::Route`]); only those pause the input's
    /// connection when `id` is blocked (see `hit_blocked`).
    fn send(&mut self, id: ConnId, frame: Frame, routed: bool) {
        let Some(idx) = self.index_of(id) else {
            return;
        };
        let start = self.start;
        let now_ms = move || mono_ms(start);
        match self.conns[idx].send(frame, now_ms, self.max_write_buffer, &self.completions) {
            Sent::Written => self.mark_dirty(idx),
            Sent::Queued { blocked, flush } => {
                if routed {
                    self.hit_blocked.push(id);
                }
                if let Some(since) = blocked {
                    self.blocked_deadline(id, since);
                }
                if flush {
                    self.mark_dirty(idx);
                }
            }
            Sent::Overflow => self.drop_conn(idx),
            Sent::NotOpen => {}
        }
    }

    /// Whether a blocked connection that frames routed for the input just handled went to
    /// still is. One closed meanwhile (past the write limit) resumes nobody later: pausing the
    /// sender behind it would pause it for good (issue "trust at the edges").
    ///
    /// A connection with more than [`SIGN_BACKLOG`](conn::SIGN_BACKLOG) frames waiting for
    /// their signatures counts as blocked too: the signers are what does not keep up, and a
    /// sender read faster than its frames are signed would queue signing work without bound.
    /// It resumes its senders once it is back under that mark ([`Net::flush_dirty`]).
    /// Returns why, if so.
    fn hit_still_blocked(&mut self) -> Option<&'static str> {
        let mut why = None;
        for id in std::mem::take(&mut self.hit_blocked) {
            if let Some(idx) = self.index_of(id) {
                let conn = &mut self.conns[idx];
                if conn.hold_back() {
                    why = why.or(Some("frames for a destination wait for their signatures"));
                }
                if conn.is_blocked() {
                    why = Some("a destination is not keeping up");
                }
            }
        }
        why
    }

    /// Lists `idx` among the connections to look at when signatures complete
    /// ([`Conn::wait_for_signature`]), or among those to flush if nothing is to be waited for.
    fn wait_for_signature(&mut self, idx: usize) {
        if let Some(conn) = self.conns.get_mut(idx)
            && conn.wait_for_signature(&self.completions)
        {
            self.mark_dirty(idx);
        }
    }

    /// The end of a loop turn: the core's end-of-turn work (snapshots shared by the turn's
    /// newcomers, challenges signed ahead), then every connection whose outbox waited for a
    /// signature that is made by now is flushed (by [`Net::flush_dirty`]).
    fn end_turn(&mut self) {
        if let Some(woken) = &self.signed {
            // Cleared before looking: a completion after the look sets it and wakes us again.
            woken.swap(false, Ordering::AcqRel);
        }
        if self.core.has_deferred() {
            let now = self.now();
            self.core.run_deferred(now);
            self.apply_actions();
        }
        let completed = std::mem::take(&mut *lock(&self.completions));
        for idx in completed {
            if let Some(conn) = self.conns.get_mut(idx) {
                conn.signed();
                self.mark_dirty(idx);
            }
        }
    }

    /// The socket refused data: remember since when, and arm the slow-reader deadline.
    fn mark_blocked(&mut self, idx: usize) {
        let now_ms = self.mono_ms();
        if let Some(conn) = self.conns.get_mut(idx)
            && conn.block(now_ms)
        {
            let id = conn.id();
            self.blocked_deadline(id, now_ms);
        }
    }

    /// Closes `id` if it is still blocked, as it has been since `since`, when the slow-reader
    /// timeout has passed.
    fn blocked_deadline(&mut self, id: ConnId, since: u64) {
        let at = since + self.slow_reader_timeout_ms;
        self.wheel.insert(at, NetTimer::Blocked(id, since));
    }

    /// A blocked connection drained: everything paused behind it may be read again.
    fn unblocked(&mut self, idx: usize) {
        if let Some(conn) = self.conns.get_mut(idx)
            && conn.unblock()
        {
            self.resume_paused();
        }
    }

    /// A connection that paused senders for its signing backlog is back under the mark.
    fn signed_enough(&mut self, idx: usize) {
        if let Some(conn) = self.conns.get_mut(idx)
            && conn.signed_enough()
        {
            self.resume_paused();
        }
    }

    fn resume_paused(&mut self) {
        for idx in std::mem::take(&mut self.paused) {
            if let Some(conn) = self.conns.get_mut(idx) {
                conn.resume();
                self.backlog.push(idx);
            }
        }
    }

    fn mark_dirty(&mut self, idx: usize) {
        if let Some(conn) = self.conns.get_mut(idx)
            && conn.mark_dirty()
        {
            self.dirty.push(idx);
        }
    }

    /// One flush per dirty connection per loop turn.
    ///
    /// Connections with the least waiting go first, and one turn writes at most
    /// [`FLUSH_BUDGET`] bytes from the outboxes: after a login burst, newcomers' directory
    /// snapshots (~0.8 KiB per user online, each) must not hold up a conversation's next
    /// frame for a whole turn. The rest stay dirty for the next turn, which polls without
    /// waiting.
    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        if dirty.len() > 1 {
            dirty.sort_by_key(|&idx| self.conns.get(idx).map_or(0, Conn::waiting));
        }
        let mut written = 0usize;
        for (n, &idx) in dirty.iter().enumerate() {
            if written >= FLUSH_BUDGET {
                for &rest in &dirty[n..] {
                    if self.conns.contains(rest) {
                        self.dirty.push(rest); // still marked dirty
                    }
                }
                break;
            }
            let Some(conn) = self.conns.get_mut(idx) else {
                continue;
            };
            let before = conn.waiting();
            let flushed = conn.flush();
            written += before.saturating_sub(conn.waiting());
            match flushed {
                Flushed::Close(code) => {
                    self.unblocked(idx);
                    self.start_closing(idx, code);
                    // Input that arrived meanwhile is read (and dropped) as closing goes on.
                    self.backlog.push(idx);
                }
                Flushed::Drained => {
                    self.unblocked(idx);
                    self.signed_enough(idx);
                }
                Flushed::Signing => {
                    self.unblocked(idx);
                    self.wait_for_signature(idx);
                    self.signed_enough(idx);
                }
                Flushed::Blocked { pumped } => {
                    self.mark_blocked(idx);
                    if pumped {
                        self.signed_enough(idx);
                    }
                }
                Flushed::Failed => self.drop_conn(idx),
                Flushed::Idle => {}
            }
        }
        if self.shutting_down && self.conns.is_empty() {
            self.shutdown_done = true;
        }
    }

    /// Sends a close frame (when `code` is given) and lingers until the peer answers or the
    /// deadline passes ([`Conn::start_close`]). The core is told the connection is gone now.
    fn start_closing(&mut self, idx: usize, code: Option<Code>) {
        let Some(conn) = self.conns.get_mut(idx) else {
            return;
        };
        let id = conn.id();
        match conn.start_close(code, &self.completions) {
            Closing::Already | Closing::AfterSignatures { started: false, .. } => {}
            Closing::NotOpen => self.drop_conn(idx),
            Closing::AfterSignatures {
                started: true,
                flush,
            } => {
                self.report_closed(idx);
                if flush {
                    self.mark_dirty(idx);
                }
                let at = self.mono_ms() + SIGNING_GRACE_MS;
                self.wheel.insert(at, NetTimer::SigningGrace(id));
            }
            Closing::Sent => {
                self.report_closed(idx);
                self.mark_dirty(idx);
                let at = self.mono_ms() + CLOSE_LINGER_MS;
                self.wheel.insert(at, NetTimer::CloseLinger(id));
            }
            Closing::Failed => {
                self.report_closed(idx);
                self.drop_conn(idx);
            }
        }
    }

    /// The core hears a closing connection is gone once the actions under way are carried
    /// out (see `gone`); once is enough.
    fn report_closed(&mut self, idx: usize) {
        if let Some(conn) = self.conns.get_mut(idx)
            && conn.report()
        {
            self.gone.push_back(Gone::Closed(conn.id()));
        }
    }

    /// Forgets the connection: closes the socket and tells the core.
    fn drop_conn(&mut self, idx: usize) {
        if !self.conns.contains(idx) {
            return;
        }
        self.drop_conn_because(idx, "connection closed");
    }

    /// [`Net::drop_conn`], with the reason a dial that never opened failed.
    fn drop_conn_because(&mut self, idx: usize, reason: &str) {
        if !self.conns.contains(idx) {
            return;
        }
        let ended = self.conns.remove(idx).end();
        if ended.held_senders {
            self.resume_paused();
        }
        // The core hears of it once the actions under way are carried out (see `Gone`).
        if ended.report {
            self.gone.push_back(Gone::Closed(ended.id));
        } else if let Some(target) = ended.dial {
            self.gone
                .push_back(Gone::DialFailed(target, reason.to_string()));
        }
        if self.shutting_down && self.conns.is_empty() {
            self.shutdown_done = true;
        }
    }

    /// Tells the core about one dropped connection; false when none is waiting.
    fn report_gone(&mut self) -> bool {
        let Some(gone) = self.gone.pop_front() else {
            return false;
        };
        match gone {
            Gone::Closed(conn) => self.feed(Input::Closed { conn }),
            Gone::DialFailed(target, reason) => self.feed(Input::DialFailed { target, reason }),
        }
        true
    }

    fn index_of(&self, id: ConnId) -> Option<usize> {
        let idx = conn::slot(id);
        match self.conns.get(idx) {
            Some(conn) if conn.id() == id => Some(idx),
            _ => None,
        }
    }

    // ------------------------------------------------------------ timers and signals

    fn fire_timers(&mut self) {
        let now_ms = self.mono_ms();
        self.wheel.expire(now_ms, &mut self.fired);
        for timer in std::mem::take(&mut self.fired) {
            match timer {
                NetTimer::Handshake(id) => {
                    if let Some(idx) = self.index_of(id)
                        && self.conns[idx].is_opening()
                    {
                        info!("conn {}: connection or WebSocket handshake timed out", id);
                        self.drop_conn_because(idx, "timed out connecting");
                    }
                }
                NetTimer::Blocked(id, since) => {
                    if let Some(idx) = self.index_of(id)
                        && self.conns[idx].blocked_since(since)
                    {
                        info!(
                            "conn {id}: has not taken our data for {} ms; closing",
                            self.slow_reader_timeout_ms
                        );
                        self.drop_conn(idx);
                    }
                }
                NetTimer::CloseLinger(id) => {
                    if let Some(idx) = self.index_of(id) {
                        self.drop_conn(idx);
                    }
                }
                NetTimer::SigningGrace(id) => {
                    if let Some(idx) = self.index_of(id)
                        && self.conns[idx].closes_after_signing()
                    {
                        info!("conn {id}: its last frames were not signed in time; dropping it");
                        self.drop_conn(idx);
                    }
                }
                NetTimer::Shutdown => {
                    let left: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
                    for idx in left {
                        self.drop_conn(idx);
                    }
                    self.shutdown_done = true;
                }
                NetTimer::Core(timer) => self.input(Input::Timer(timer)),
            }
        }
    }

    fn on_signal(&mut self) {
        let mut buf = [0u8; 64];
        if let Some(pipe) = &mut self.signals {
            while matches!(pipe.read(&mut buf), Ok(n) if n > 0) {}
        }
        if self.shutting_down {
            return;
        }
        info!("signal received: closing connections and shutting down");
        self.shutting_down = true;
        let _ = self.poll.registry().deregister(&mut self.listener);
        // Handshakes under way, ours included: a dial to a peer is abandoned, not completed
        // (and the core, stopping, does not redial it).
        let handshaking: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.is_opening())
            .map(|(i, _)| i)
            .collect();
        for idx in handshaking {
            self.drop_conn(idx);
        }
        let now = self.now();
        self.core.shutdown(now);
        self.apply_actions();
        let at = self.mono_ms() + SHUTDOWN_LINGER_MS;
        self.wheel.insert(at, NetTimer::Shutdown);
        if self.conns.is_empty() {
            self.shutdown_done = true;
        }
    }
}
