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
//! This file is the event loop ([`Net`]); beside it are the hashed timer wheel ([`timer`]), the
//! plain-or-TLS byte stream under tungstenite ([`tls`], which the `socp` client uses too) and
//! the answers to plain HTTP requests on the WebSocket port ([`http`]). The layer owns I/O and
//! time; it must not decide what a frame means or keep protocol state: it parses nothing past
//! the WebSocket frame, and every decision about a SOCP frame is the core's.

pub mod http;
mod outbox;
pub mod signpool;
pub mod timer;
pub mod tls;

use crate::config::Config;
use crate::core::server::{self, Action, ConnId, Input, Server, Time};
use crate::net::outbox::{Outbox, Pumped, Wrote, write_from};
use crate::net::timer::TimerWheel;
use crate::net::tls::{MaybeTls, TlsStream};
use crate::wire::frame::{Completions, Frame, lock};
use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::server::{NoCallback, ServerHandshake};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error as WsError, Message, WebSocket};

/// A connection's byte stream: plain TCP, or TLS over it when we serve `wss://` or dial a
/// `wss://` peer. tungstenite runs over either unchanged; see [`crate::net::tls`] for how TLS keeps
/// the event-loop rules (reads drain decrypted data, records are flushed eagerly).
type Stream = MaybeTls<TcpStream>;

/// The close frame a read error calls for when the peer broke RFC 6455 (§7.4.1): 1007 for a
/// text message that is not UTF-8 (§8.1), 1002 for a frame that breaks the framing rules
/// (reserved bits set, §5.2; an unmasked client frame, §5.1; bad opcodes, fragmentation,
/// control frames or close payload, §5.4-5.5). None for the rest (a reset, an I/O error):
/// those end the connection without a frame.
fn violation(e: &WsError) -> Option<(u16, &'static str)> {
    use tungstenite::error::ProtocolError as P;
    match e {
        WsError::Utf8(_) => Some((CloseCode::Invalid.into(), "invalid UTF-8")),
        WsError::Protocol(
            P::NonZeroReservedBits
            | P::UnmaskedFrameFromClient
            | P::MaskedFrameFromServer
            | P::FragmentedControlFrame
            | P::ControlFrameTooBig
            | P::UnknownControlFrameType(_)
            | P::UnknownDataFrameType(_)
            | P::UnexpectedContinueFrame
            | P::ExpectedFragment(_)
            | P::InvalidOpcode(_)
            | P::InvalidCloseSequence,
        ) => Some((CloseCode::Protocol.into(), "protocol error")),
        _ => None,
    }
}

/// The listening socket.
const LISTENER: Token = Token(usize::MAX - 1);
/// The read end of the self-pipe that SIGINT/SIGTERM write to.
const SIGNAL: Token = Token(usize::MAX - 2);
/// Signer threads completed frames.
const SIGNED: Token = Token(usize::MAX - 3);

/// Dropped connections reported to the core per loop turn: each can cost a `USER_REMOVE` to
/// every user, so a mass leave is handled in slices with polls in between (issue "signatures
/// off the loop": 2,000 users leaving at once stalled everyone for 13 s).
const GONE_SLICE: usize = 64;

/// Messages read per loop turn (text frames for the core, close frames, pings), over all
/// connections; the rest wait in the
/// backlog for the next turn (after a poll, so completed signatures and timers are not held up
/// by a burst of input).
const TURN_BUDGET: usize = 256;

/// A loop turn this long is logged (at debug), with what it handled.
const SLOW_TURN: Duration = Duration::from_millis(20);

/// Bytes written from the outboxes per loop turn (see [`Net::flush_dirty`]).
const FLUSH_BUDGET: usize = 1 << 20;

/// Frames routed to one connection that may wait for their signatures before the senders
/// feeding it are paused (backpressure, as for a reader that does not keep up).
const SIGN_BACKLOG: usize = 16;

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

type Handshake = MidHandshake<ServerHandshake<Stream, NoCallback>>;
type ClientHs = MidHandshake<ClientHandshake<Stream>>;

enum Io {
    /// Accepted; its request head is peeked at, not consumed, until it shows whether it is a
    /// WebSocket upgrade (then `Handshaking`, which reads it as before) or a plain HTTP
    /// request (then `Http`). See [`Net::sniff_request`]. Over TLS, what is peeked at is the
    /// decrypted request (the TLS handshake runs as it is peeked for).
    Accepted(Stream),
    /// Answering a plain HTTP request (`GET /healthz`, `GET /metrics`); closed after it.
    Http(HttpReply),
    /// The WebSocket handshake has not completed.
    Handshaking(Handshake),
    /// We are dialling a peer: TCP connect under way (§4.4, DESIGN rule 4). `tls`: the TLS
    /// client side to run over it once connected (a `wss://` peer).
    Connecting {
        stream: TcpStream,
        url: String,
        tls: Option<Box<rustls::ClientConnection>>,
    },
    /// We dialled a peer: TCP is up, our WebSocket handshake is under way.
    ClientHandshaking(ClientHs),
    /// Open and known to the core.
    Open(WebSocket<Stream>),
    /// Close frame sent; flushing and waiting for the peer's reply until the linger deadline.
    Closing(WebSocket<Stream>),
    /// Transient, while a handshake step owns the stream.
    Gone,
}

struct Conn {
    id: ConnId,
    io: Io,
    /// The peer target this connection dials for, until it is open.
    dial: Option<u32>,
    /// The incoming stream can no longer be parsed (a refused frame is half read): only raw
    /// bytes are read and dropped from now on. tungstenite must not read again after an
    /// error: its codec keeps the refused frame's header.
    discard: bool,
    /// Has written data not yet flushed.
    dirty: bool,
    /// The socket refused data (`WouldBlock`): the peer reads slower than we write. Since when.
    blocked_since: Option<u64>,
    /// We stopped reading this connection because frames routed for it fed a blocked one.
    paused: bool,
    /// What the socket has not taken yet, beyond the frame tungstenite holds.
    out: Outbox,
    /// Its outbox waits for a signature, and the frame will report it ([`Frame::watch`]).
    signing: bool,
    /// Senders were paused because too many frames for it wait for signatures.
    holds_back: bool,
    /// The core closed it while frames before the close still waited for their signatures:
    /// the close frame follows them (see [`Net::start_closing`]). Not read meanwhile.
    close_after: Option<Option<(u16, &'static str)>>,
    /// The core has been told it is gone (once is enough).
    reported: bool,
}

/// A response to a plain HTTP request, and how much of it the socket took.
struct HttpReply {
    stream: Stream,
    out: Vec<u8>,
    sent: usize,
    /// All of it has left (TLS records flushed) and our side is shut down.
    shut: bool,
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
    /// looked (see [`Net::wait_for_signature`]).
    completions: Completions,
    /// Set by the signer threads when they complete frames (None: signing in line).
    signed: Option<Arc<AtomicBool>>,
    /// Dropped connections reported to the core this turn (see [`GONE_SLICE`]).
    gone_this_turn: usize,
    /// Messages read this turn (see [`TURN_BUDGET`]).
    inputs_this_turn: usize,
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
                info!("signing on {n} thread(s)");
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
        self.start.elapsed().as_millis() as u64
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
        let io = |stream| {
            Io::Accepted(match tls {
                Some(conn) => MaybeTls::Tls(Box::new(TlsStream::new(conn.into(), stream))),
                None => MaybeTls::Plain(stream),
            })
        };
        // The request is looked at when it arrives (a readable event).
        match self.insert_conn(stream, io, None) {
            Ok(id) => debug!("conn {id}: accepted from {addr}"),
            Err(e) => warn!("register {addr}: {e}"),
        }
    }

    /// Registers a new socket with the poll under a fresh slab slot and [`ConnId`], and arms
    /// its handshake deadline.
    fn insert_conn(
        &mut self,
        mut stream: TcpStream,
        io: impl FnOnce(TcpStream) -> Io,
        dial: Option<u32>,
    ) -> io::Result<ConnId> {
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        self.poll.registry().register(
            &mut stream,
            Token(idx),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.serial = self.serial.wrapping_add(1);
        let id = ConnId((u64::from(self.serial) << 32) | idx as u64);
        entry.insert(Conn {
            id,
            io: io(stream),
            dial,
            discard: false,
            dirty: false,
            blocked_since: None,
            out: Outbox::default(),
            paused: false,
            signing: false,
            holds_back: false,
            close_after: None,
            reported: false,
        });
        let at = self.mono_ms() + self.handshake_timeout_ms;
        self.wheel.insert(at, NetTimer::Handshake(id));
        Ok(id)
    }

    /// Peeks at an accepted connection's request head (up to [`http::MAX_HEAD`] bytes, not
    /// consumed): a WebSocket upgrade goes to tungstenite's handshake exactly as before, on any
    /// path; a plain HTTP request is answered here and the connection closed. An incomplete
    /// head waits for more bytes (a new readable event) under the handshake deadline.
    fn sniff_request(&mut self, idx: usize) {
        let Some(Conn {
            io: Io::Accepted(stream),
            id,
            ..
        }) = self.conns.get_mut(idx)
        else {
            return;
        };
        let id = *id;
        let mut buf = [0u8; http::MAX_HEAD];
        let n = loop {
            let peeked = match stream {
                MaybeTls::Plain(tcp) => tcp.peek(&mut buf),
                // A client that does not speak TLS fails here (an error), and is dropped.
                MaybeTls::Tls(tls) => tls.peek(&mut buf),
            };
            match peeked {
                Ok(0) => return self.drop_conn(idx),
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => return self.drop_conn(idx),
            }
        };
        let plain = match http::classify(&buf[..n], n == buf.len()) {
            http::Request::Incomplete => return,
            http::Request::WebSocket => None,
            http::Request::Plain(request) => Some(request),
        };
        let conn = &mut self.conns[idx];
        let Io::Accepted(stream) = std::mem::replace(&mut conn.io, Io::Gone) else {
            unreachable!("checked above")
        };
        let Some(request) = plain else {
            let ws_config = Some(self.ws_config);
            conn.io = Io::Handshaking(ServerHandshake::start(stream, NoCallback, ws_config));
            return self.drive_handshake(idx);
        };
        debug!("conn {id}: plain HTTP request: {request:?}");
        // In the `Http` state first, so the report counts this connection as one.
        conn.io = Io::Http(HttpReply {
            stream,
            out: Vec::new(),
            sent: 0,
            shut: false,
        });
        let out = http::answer(request, &self.core, &self.net_stats());
        if let Io::Http(reply) = &mut self.conns[idx].io {
            reply.out = out;
        }
        self.drive_http(idx);
    }

    /// Writes the reply to a plain HTTP request, then half-closes and reads what the client
    /// still sends until it closes: closing with unread input would reset the connection and
    /// could destroy the reply before the client read it. The handshake deadline bounds it all.
    fn drive_http(&mut self, idx: usize) {
        let Some(Conn {
            io: Io::Http(reply),
            ..
        }) = self.conns.get_mut(idx)
        else {
            return;
        };
        while reply.sent < reply.out.len() {
            match reply.stream.write(&reply.out[reply.sent..]) {
                Ok(0) => return self.drop_conn(idx),
                Ok(n) => reply.sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return, // a writable event resumes
                Err(_) => return self.drop_conn(idx),
            }
        }
        if !reply.shut {
            // Over TLS, records rustls still holds must leave before our side shuts.
            match reply.stream.flush() {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return, // a writable event resumes
                Err(_) => return self.drop_conn(idx),
            }
            if let MaybeTls::Tls(tls) = &mut reply.stream {
                let _ = tls.close_notify();
            }
            let _ = reply.stream.tcp().shutdown(Shutdown::Write);
            reply.shut = true;
        }
        let mut buf = [0u8; 4096];
        for _ in 0..16 {
            match reply.stream.read(&mut buf) {
                Ok(0) => return self.drop_conn(idx),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => return self.drop_conn(idx),
            }
        }
        // Still sending after its answer: not worth more of the loop's time.
        self.drop_conn(idx);
    }

    /// The net layer's numbers for `GET /metrics` and `GET /healthz`.
    fn net_stats(&self) -> crate::core::metrics::NetStats {
        let mut stats = crate::core::metrics::NetStats {
            uptime_ms: self.mono_ms(),
            ..Default::default()
        };
        for (_, conn) in &self.conns {
            match conn.io {
                Io::Accepted(_)
                | Io::Handshaking(_)
                | Io::Connecting { .. }
                | Io::ClientHandshaking(_) => stats.handshaking += 1,
                Io::Http(_) => stats.http += 1,
                Io::Closing(_) => stats.closing += 1,
                Io::Open(_) | Io::Gone => {}
            }
            stats.outbox_bytes += conn.out.bytes();
            stats.blocked += usize::from(conn.blocked_since.is_some());
        }
        stats
    }

    fn drive_handshake(&mut self, idx: usize) {
        let Some(conn) = self.conns.get_mut(idx) else {
            return;
        };
        let Io::Handshaking(_) = conn.io else { return };
        let Io::Handshaking(mid) = std::mem::replace(&mut conn.io, Io::Gone) else {
            unreachable!("checked above")
        };
        match mid.handshake() {
            Ok(ws) => {
                // Login budgets are per source address (§5.3). A socket whose peer address is
                // gone is already dead: nothing it sent will be read.
                let unknown = std::net::Ipv4Addr::UNSPECIFIED.into();
                let peer = ws.get_ref().tcp().peer_addr().map_or(unknown, |a| a.ip());
                conn.io = Io::Open(ws);
                let id = conn.id;
                let now = self.now();
                self.core.handle(now, Input::Opened { conn: id, peer });
                self.apply_actions();
                self.read_frames(idx);
            }
            Err(HandshakeError::Interrupted(mid)) => conn.io = Io::Handshaking(mid),
            Err(HandshakeError::Failure(e)) => {
                debug!("conn {}: handshake failed: {e}", conn.id);
                self.drop_conn(idx);
            }
        }
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
        match self.insert_conn(
            stream,
            |stream| Io::Connecting { stream, url, tls },
            Some(target),
        ) {
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

    /// DESIGN rule 4: on readiness, check `take_error()` and `peer_addr()`; only a connected
    /// socket starts the client handshake.
    fn drive_connect(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        let Io::Connecting { stream, .. } = &conn.io else {
            return;
        };
        match stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => return self.drop_conn_because(idx, &e.to_string()),
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotConnected => return, // not yet
            Err(e) => return self.drop_conn_because(idx, &e.to_string()),
        }
        let Io::Connecting { stream, url, tls } = std::mem::replace(&mut conn.io, Io::Gone) else {
            unreachable!("checked above")
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!("set_nodelay: {e}");
        }
        // With TLS, its handshake runs inside the WebSocket handshake's reads and writes.
        let stream = match tls {
            Some(conn) => MaybeTls::Tls(Box::new(TlsStream::new((*conn).into(), stream))),
            None => MaybeTls::Plain(stream),
        };
        let result =
            tungstenite::client::client_with_config(url, stream, Some(self.peer_ws_config));
        self.client_handshake_step(idx, result.map(|(ws, _)| ws));
    }

    fn drive_client_handshake(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        let Io::ClientHandshaking(_) = conn.io else {
            return;
        };
        let Io::ClientHandshaking(mid) = std::mem::replace(&mut conn.io, Io::Gone) else {
            unreachable!("checked above")
        };
        let result = mid.handshake().map(|(ws, _)| ws);
        self.client_handshake_step(idx, result);
    }

    fn client_handshake_step(
        &mut self,
        idx: usize,
        result: Result<WebSocket<Stream>, HandshakeError<ClientHandshake<Stream>>>,
    ) {
        match result {
            Ok(ws) => {
                let conn = &mut self.conns[idx];
                conn.io = Io::Open(ws);
                let (id, target) = (conn.id, conn.dial.take().expect("a dial"));
                let now = self.now();
                self.core.handle(now, Input::Dialled { conn: id, target });
                self.apply_actions();
                self.read_frames(idx);
            }
            Err(HandshakeError::Interrupted(mid)) => {
                self.conns[idx].io = Io::ClientHandshaking(mid);
            }
            Err(HandshakeError::Failure(e)) => {
                self.drop_conn_because(idx, &format!("WebSocket handshake: {e}"));
            }
        }
    }

    // ------------------------------------------------------------ readiness

    fn on_ready(&mut self, idx: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get(idx) else {
            return;
        };
        match conn.io {
            Io::Accepted(_) => self.sniff_request(idx),
            Io::Http(_) => self.drive_http(idx),
            Io::Handshaking(_) => self.drive_handshake(idx),
            Io::Connecting { .. } => self.drive_connect(idx),
            Io::ClientHandshaking(_) => self.drive_client_handshake(idx),
            Io::Open(_) | Io::Closing(_) => {
                if writable {
                    self.mark_dirty(idx);
                }
                if readable {
                    self.read_frames(idx);
                }
            }
            Io::Gone => {}
        }
    }

    /// Reads until `WouldBlock` (or the read budget), handing each message to the core.
    fn read_frames(&mut self, idx: usize) {
        for _ in 0..READ_BUDGET {
            if self.inputs_this_turn >= TURN_BUDGET {
                // Enough for one turn (a login storm is 1,000 hellos in one poll): the rest
                // is read after the next poll, so frames signed meanwhile leave in between.
                return self.backlog.push(idx);
            }
            let Some(conn) = self.conns.get_mut(idx) else {
                return;
            };
            let id = conn.id;
            let closing = matches!(conn.io, Io::Closing(_));
            if conn.discard {
                return self.discard_input(idx);
            }
            if conn.paused {
                return; // resumed (and read) when what it feeds drains
            }
            if conn.close_after.is_some() {
                return; // the core is done with it: closed once its last frames are signed
            }
            let result = match &mut conn.io {
                Io::Open(ws) | Io::Closing(ws) => ws.read(),
                _ => return,
            };
            let now = self.now();
            if result.is_ok() {
                // Every message counts: a mass leave is a thousand close frames in one poll.
                self.inputs_this_turn += 1;
            }
            match result {
                Ok(Message::Text(text)) if !closing => {
                    self.hit_blocked.clear();
                    self.core.handle(
                        now,
                        Input::Text {
                            conn: id,
                            text: text.as_str(),
                        },
                    );
                    self.apply_actions();
                    if let Some(why) = self.hit_still_blocked() {
                        // Backpressure: what this connection sends to others cannot leave
                        // as fast as it arrives. Stop reading it until the blocked
                        // connection drains.
                        if let Some(conn) = self.conns.get_mut(idx)
                            && !conn.paused
                        {
                            debug!("conn {id}: paused ({why})");
                            conn.paused = true;
                            self.paused.push(idx);
                        }
                        return;
                    }
                }
                Ok(Message::Binary(_)) if !closing => {
                    self.core.handle(now, Input::Binary { conn: id });
                    self.apply_actions();
                }
                Ok(Message::Close(_)) => {
                    // tungstenite queued the close reply; flush it, then drop.
                    debug!("conn {}: peer closed", id);
                    self.start_closing(idx, None);
                }
                Ok(_) => self.mark_dirty(idx), // ping (pong queued), pong, or data while closing
                Err(WsError::Io(e)) if e.kind() == ErrorKind::WouldBlock => return,
                Err(WsError::Io(e)) if e.kind() == ErrorKind::Interrupted => {}
                Err(WsError::Capacity(e)) if !closing => {
                    info!("conn {}: {e}", id);
                    self.conns[idx].discard = true;
                    self.core.handle(now, Input::TooLarge { conn: id });
                    self.apply_actions();
                    return;
                }
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                    self.drop_conn(idx);
                    return;
                }
                Err(e) if closing => {
                    // The rest of a refused frame: discard it rather than close with unread
                    // bytes, which would reset the connection and could destroy our ERROR
                    // and close frame before the peer reads them.
                    debug!("conn {id}: discarding input while closing: {e}");
                    self.conns[idx].discard = true;
                    return self.discard_input(idx);
                }
                Err(e) => {
                    let Some(code) = violation(&e) else {
                        debug!("conn {id}: read: {e}");
                        self.drop_conn(idx);
                        return;
                    };
                    // RFC 6455 §7.1.7: the peer broke the protocol; fail the connection with
                    // a close frame that says how (issue "trust at the edges"), not a bare
                    // TCP close. tungstenite must not read again (its codec may hold part of
                    // the refused frame): from now on only raw bytes are read and dropped.
                    info!("conn {id}: {e}; closing with {}", code.0);
                    self.conns[idx].discard = true;
                    self.start_closing(idx, Some(code));
                    self.discard_input(idx);
                    // The core forgot the connection: what it says about that (a
                    // USER_REMOVE) goes out now.
                    self.apply_actions();
                    return;
                }
            }
        }
        self.backlog.push(idx);
    }

    /// Reads and drops raw bytes from a closing connection until `WouldBlock`; at end of
    /// stream the connection is dropped (the linger timer bounds the rest).
    fn discard_input(&mut self, idx: usize) {
        let mut buf = [0u8; 4096];
        loop {
            let ws = match self.conns.get_mut(idx).map(|c| &mut c.io) {
                Some(Io::Closing(ws) | Io::Open(ws)) => ws,
                _ => return,
            };
            match ws.get_mut().read(&mut buf) {
                Ok(0) => return self.drop_conn(idx),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.drop_conn(idx),
            }
        }
    }

    // ------------------------------------------------------------ actions

    /// Carries out the core's actions, in order, taking them one at a time
    /// ([`Server::poll_action`]). Carrying one out never feeds the core: what it causes (a
    /// connection dropped or closed, a dial that failed) waits in `gone` and is reported once
    /// the core has nothing left for us.
    fn apply_actions(&mut self) {
        loop {
            let Some(action) = self.core.poll_action() else {
                if self.gone_this_turn < GONE_SLICE && self.report_gone() {
                    self.gone_this_turn += 1;
                    continue;
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

    /// Writes `text` to connection `id`, or queues it behind what the socket has not taken.
    /// `routed`: a frame the core routes for the input's sender ([`Action::Route`]); only
    /// those pause the input's connection when `id` is blocked (see `hit_blocked`).
    fn send(&mut self, id: ConnId, frame: Frame, routed: bool) {
        let Some(idx) = self.index_of(id) else {
            return;
        };
        let conn = &mut self.conns[idx];
        let Io::Open(ws) = &mut conn.io else {
            return;
        };
        let at = conn.out.place_for(&frame);
        let text = match frame.ready() {
            Some(text) if conn.blocked_since.is_none() && at == 0 => text.clone(),
            _ => {
                // The socket is full, or this frame or one before it waits for its
                // signature: wait in line, in order, without a copy.
                let signing = frame.ready().is_none();
                let passed = at < conn.out.len();
                // Goes before every frame still waiting: it is the one to watch now.
                let first_waiting = signing && conn.out.first_unsigned_at().is_none_or(|p| at <= p);
                let watched = first_waiting.then(|| frame.clone());
                conn.out.insert(at, frame, 0);
                if routed {
                    self.hit_blocked.push(id);
                }
                if let Some(frame) = watched {
                    if frame.watch(idx, &self.completions) {
                        self.mark_dirty(idx);
                    } else {
                        self.conns[idx].signing = true;
                    }
                } else if signing {
                    self.wait_for_signature(idx);
                } else if passed {
                    self.mark_dirty(idx); // may be first in line now
                }
                return self.check_waiting(idx);
            }
        };
        match write_from(ws, &text, 0) {
            Ok(Wrote::All) => self.mark_dirty(idx),
            // The rest waits for the next writable event.
            Ok(Wrote::Blocked(next)) => {
                // First in line: it may have passed presence still being signed (`at` is 0),
                // and the rest of a message must follow its first fragments.
                conn.out.insert(at, Frame::ready_text(text), next);
                if routed {
                    self.hit_blocked.push(id);
                }
                self.mark_blocked(idx);
                self.mark_dirty(idx);
                self.check_waiting(idx);
            }
            Err(WsError::WriteBufferFull(_)) => {
                info!("conn {}: not reading, write buffer full; closing", id);
                self.drop_conn(idx);
            }
            Err(e) => {
                debug!("conn {}: write: {e}", id);
                self.drop_conn(idx);
            }
        }
    }

    /// Whether a blocked connection that frames routed for the input just handled went to
    /// still is. One closed meanwhile (past the write limit) resumes nobody later: pausing the
    /// sender behind it would pause it for good (issue "trust at the edges").
    ///
    /// A connection with more than [`SIGN_BACKLOG`] frames waiting for their signatures counts
    /// as blocked too: the signers are what does not keep up, and a sender read faster than its
    /// frames are signed would queue signing work without bound. It resumes its senders once
    /// it is back under that mark ([`Net::flush_dirty`]).
    /// Returns why, if so.
    fn hit_still_blocked(&mut self) -> Option<&'static str> {
        let mut why = None;
        for id in std::mem::take(&mut self.hit_blocked) {
            if let Some(idx) = self.index_of(id) {
                let conn = &mut self.conns[idx];
                if conn.out.signing_backlog() > SIGN_BACKLOG {
                    conn.holds_back = true;
                    why = why.or(Some("frames for a destination wait for their signatures"));
                }
                if conn.blocked_since.is_some() {
                    why = Some("a destination is not keeping up");
                }
            }
        }
        why
    }

    /// Lists `idx` among the connections to look at when signatures complete.
    ///
    /// The first frame of its outbox still waiting is asked to report `idx` when it is
    /// complete ([`Frame::watch`]); that is the one holding the rest back.
    fn wait_for_signature(&mut self, idx: usize) {
        let Some(conn) = self.conns.get_mut(idx) else {
            return;
        };
        if conn.signing {
            return;
        }
        let ready_now = match conn.out.first_unsigned() {
            Some(frame) => frame.watch(idx, &self.completions),
            None => true,
        };
        if ready_now {
            self.mark_dirty(idx);
        } else {
            conn.signing = true;
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
                conn.signing = false;
                self.mark_dirty(idx);
            }
        }
    }

    /// Closes a connection with more than `max_write_buffer` bytes waiting for it.
    fn check_waiting(&mut self, idx: usize) {
        let Some(conn) = self.conns.get(idx) else {
            return;
        };
        if conn.out.bytes() > self.max_write_buffer {
            info!(
                "conn {}: not reading, write buffer full ({} bytes waiting); closing",
                conn.id,
                conn.out.bytes()
            );
            self.drop_conn(idx);
        }
    }

    /// The socket refused data: remember since when, and arm the slow-reader deadline.
    fn mark_blocked(&mut self, idx: usize) {
        let now = self.mono_ms();
        let conn = &mut self.conns[idx];
        if conn.blocked_since.is_none() {
            conn.blocked_since = Some(now);
            let at = now + self.slow_reader_timeout_ms;
            self.wheel.insert(at, NetTimer::Blocked(conn.id, now));
        }
    }

    /// A blocked connection drained: everything paused behind it may be read again.
    fn unblocked(&mut self, idx: usize) {
        if let Some(conn) = self.conns.get_mut(idx)
            && conn.blocked_since.take().is_some()
        {
            self.resume_paused();
        }
    }

    /// A connection that paused senders for its signing backlog is back under the mark.
    fn signed_enough(&mut self, idx: usize) {
        if let Some(conn) = self.conns.get_mut(idx)
            && conn.holds_back
            && conn.out.signing_backlog() <= SIGN_BACKLOG
        {
            conn.holds_back = false;
            self.resume_paused();
        }
    }

    fn resume_paused(&mut self) {
        for idx in std::mem::take(&mut self.paused) {
            if let Some(conn) = self.conns.get_mut(idx) {
                conn.paused = false;
                self.backlog.push(idx);
            }
        }
    }

    fn mark_dirty(&mut self, idx: usize) {
        if let Some(conn) = self.conns.get_mut(idx)
            && !conn.dirty
        {
            conn.dirty = true;
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
            dirty.sort_by_key(|&idx| self.conns.get(idx).map_or(0, |c| c.out.bytes()));
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
            conn.dirty = false;
            let closing = matches!(conn.io, Io::Closing(_));
            let before = conn.out.bytes();
            let result = match &mut conn.io {
                // tungstenite's buffer written out: hand it what waits.
                Io::Open(ws) | Io::Closing(ws) => ws.flush().and_then(|()| conn.out.pump(ws)),
                _ => continue,
            };
            written += before.saturating_sub(conn.out.bytes());
            match result {
                Ok(Pumped::Drained | Pumped::Blocked)
                    if conn.close_after.is_some() && !conn.out.has_pending() =>
                {
                    // Its last frames are signed (written or queued): now the close frame.
                    let code = conn.close_after.take().flatten();
                    self.unblocked(idx);
                    self.start_closing(idx, code);
                    // Input that arrived meanwhile is read (and dropped) as closing goes on.
                    self.backlog.push(idx);
                }
                Ok(Pumped::Drained) => {
                    self.unblocked(idx);
                    self.signed_enough(idx);
                }
                Ok(Pumped::Signing) => {
                    self.unblocked(idx);
                    self.wait_for_signature(idx);
                    self.signed_enough(idx);
                }

                Ok(Pumped::Blocked) => {
                    self.mark_blocked(idx);
                    self.signed_enough(idx);
                }
                // Kept in tungstenite's buffer; the writable event brings us back.
                Err(WsError::Io(e)) if e.kind() == ErrorKind::WouldBlock => self.mark_blocked(idx),
                Err(WsError::ConnectionClosed) if closing => self.drop_conn(idx),
                Err(e) => {
                    debug!("conn {}: flush: {e}", conn.id);
                    self.drop_conn(idx);
                }
            }
        }
        if self.shutting_down && self.conns.is_empty() {
            self.shutdown_done = true;
        }
    }

    /// Sends a close frame (when `code` is given) and lingers until the peer answers or the
    /// deadline passes. The core is told the connection is gone now.
    fn start_closing(&mut self, idx: usize, code: Option<(u16, &'static str)>) {
        let Some(conn) = self.conns.get_mut(idx) else {
            return;
        };
        match conn.io {
            Io::Open(_) => {}
            Io::Accepted(_)
            | Io::Http(_)
            | Io::Handshaking(_)
            | Io::Connecting { .. }
            | Io::ClientHandshaking(_) => {
                return self.drop_conn(idx);
            }
            Io::Closing(_) | Io::Gone => return,
        }
        let id = conn.id;
        // A close we start (an error, a policy) follows the frames before it, which may still
        // wait for their signatures (see `flush_dirty`). After the peer's close nothing more
        // can be sent: what waits is dropped (`spill` skips it).
        if code.is_some() && conn.out.has_pending() {
            if conn.close_after.is_none() {
                conn.close_after = Some(code);
                if !std::mem::replace(&mut conn.reported, true) {
                    self.gone.push_back(Gone::Closed(id));
                }
                self.wait_for_signature(idx);
                let at = self.mono_ms() + SIGNING_GRACE_MS;
                self.wheel.insert(at, NetTimer::SigningGrace(id));
            }
            return;
        }
        let Io::Open(mut ws) = std::mem::replace(&mut conn.io, Io::Gone) else {
            unreachable!("checked above")
        };
        // Whatever waits goes before the close frame.
        conn.out.spill(&mut ws);
        let sent = match code {
            None => true,
            Some((code, reason)) => {
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                };
                match ws.close(Some(frame)) {
                    Ok(()) => true,
                    Err(WsError::Io(e)) => e.kind() == ErrorKind::WouldBlock,
                    Err(_) => false,
                }
            }
        };
        conn.io = Io::Closing(ws);
        // The core hears of it once the actions under way are carried out (see `gone`).
        if !std::mem::replace(&mut conn.reported, true) {
            self.gone.push_back(Gone::Closed(id));
        }
        if !sent {
            return self.drop_conn(idx);
        }
        self.mark_dirty(idx);
        let at = self.mono_ms() + CLOSE_LINGER_MS;
        self.wheel.insert(at, NetTimer::CloseLinger(id));
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
        let conn = self.conns.remove(idx);
        if conn.blocked_since.is_some() || conn.holds_back {
            self.resume_paused();
        }
        let was_open = matches!(conn.io, Io::Open(_)) && !conn.reported;
        debug!("conn {}: dropped", conn.id);
        drop(conn.io); // closes the socket, which also removes it from the poll
        // The core hears of it once the actions under way are carried out (see `Gone`).
        if was_open {
            self.gone.push_back(Gone::Closed(conn.id));
        } else if let Some(target) = conn.dial {
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
        let now = self.now();
        match gone {
            Gone::Closed(conn) => self.core.handle(now, Input::Closed { conn }),
            Gone::DialFailed(target, reason) => {
                self.core.handle(now, Input::DialFailed { target, reason })
            }
        }
        true
    }

    fn index_of(&self, id: ConnId) -> Option<usize> {
        let idx = (id.0 & 0xffff_ffff) as usize;
        match self.conns.get(idx) {
            Some(conn) if conn.id == id => Some(idx),
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
                        && matches!(
                            self.conns[idx].io,
                            Io::Accepted(_)
                                | Io::Http(_)
                                | Io::Handshaking(_)
                                | Io::Connecting { .. }
                                | Io::ClientHandshaking(_)
                        )
                    {
                        info!("conn {}: connection or WebSocket handshake timed out", id);
                        self.drop_conn_because(idx, "timed out connecting");
                    }
                }
                NetTimer::Blocked(id, since) => {
                    if let Some(idx) = self.index_of(id)
                        && self.conns[idx].blocked_since == Some(since)
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
                        && self.conns[idx].close_after.is_some()
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
                NetTimer::Core(timer) => {
                    let now = self.now();
                    self.core.handle(now, Input::Timer(timer));
                    self.apply_actions();
                }
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
            .filter(|(_, c)| {
                matches!(
                    c.io,
                    Io::Accepted(_)
                        | Io::Http(_)
                        | Io::Handshaking(_)
                        | Io::Connecting { .. }
                        | Io::ClientHandshaking(_)
                )
            })
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
