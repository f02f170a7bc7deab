//! One connection, owning its I/O (after rustls's `tlsserver-mio` example): its socket from
//! accept or dial to close, the handshakes over it, the WebSocket, and the messages waiting
//! for it ([`Outbox`]). Each method does the I/O and says what came of it ([`Step`],
//! [`Received`], [`Sent`], [`Flushed`], [`Closing`]); the event loop ([`super::Net`]) decides
//! what that means beyond this connection: the core's inputs, pausing senders, timers, the
//! lists of connections to flush or read again.

use crate::core::metrics::NetStats;
use crate::core::server::ConnId;
use crate::net::outbox::{Outbox, Pumped, Wrote, write_from};
use crate::net::tls::{MaybeTls, TlsStream};
use crate::net::{Stream, http};
use crate::wire::frame::{Completions, Frame};
use log::{debug, info};
use mio::net::TcpStream;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown};
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::server::{NoCallback, ServerHandshake};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error as WsError, Message, Utf8Bytes, WebSocket};

/// Frames routed to one connection that may wait for their signatures before the senders
/// feeding it are paused (backpressure, as for a reader that does not keep up).
pub(super) const SIGN_BACKLOG: usize = 16;

type Handshake = MidHandshake<ServerHandshake<Stream, NoCallback>>;
type ClientHs = MidHandshake<ClientHandshake<Stream>>;

/// A close frame to send: its code and reason.
pub(super) type Code = (u16, &'static str);

/// Where a connection is, from accept or dial to close.
enum Io {
    /// Accepted; its request head is peeked at, not consumed, until it shows whether it is a
    /// WebSocket upgrade (then `Handshaking`, which reads it as before) or a plain HTTP
    /// request (then `Http`). See [`Conn::advance`]. Over TLS, what is peeked at is the
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

/// A response to a plain HTTP request, and how much of it the socket took.
struct HttpReply {
    stream: Stream,
    out: Vec<u8>,
    sent: usize,
    /// All of it has left (TLS records flushed) and our side is shut down.
    shut: bool,
}

/// One connection (see the module's comment).
pub(super) struct Conn {
    id: ConnId,
    io: Io,
    /// The peer target this connection dials for, until it is open.
    dial: Option<u32>,
    /// The incoming stream can no longer be parsed (a refused frame is half read): only raw
    /// bytes are read and dropped from now on. tungstenite must not read again after an
    /// error: its codec keeps the refused frame's header.
    discard: bool,
    /// Listed among the connections with written data not yet flushed.
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
    /// the close frame follows them (see [`Conn::start_close`]). Not read meanwhile.
    close_after: Option<Option<Code>>,
    /// The core has been told it is gone (once is enough).
    reported: bool,
}

/// What driving a connection that is not open yet came to ([`Conn::advance`]).
pub(super) enum Step {
    /// Waiting for the peer: a readiness event resumes it.
    Wait,
    /// A plain HTTP request: answer it ([`Conn::answer`]).
    Http(http::Plain),
    /// A client's WebSocket handshake completed: open, from this address.
    Accepted(IpAddr),
    /// Our dial's WebSocket handshake completed: open, a link for this peer target.
    Dialled(u32),
    /// It failed, or it is done (a plain HTTP request answered): drop it, for this reason.
    Drop(String),
    /// Open or closing: read and flush it.
    Open,
}

/// What one read came to ([`Conn::read`]).
pub(super) enum Received {
    /// A text message, for the core.
    Text(Utf8Bytes),
    /// A binary message, for the core (which refuses it).
    Binary,
    /// A message over the size limit: the rest of the stream is read and dropped from now on.
    TooLarge,
    /// The peer's close frame: tungstenite queued our reply.
    PeerClosed,
    /// A ping (its pong queued), a pong, or data while closing: something may wait to be
    /// flushed.
    Control,
    /// The peer broke RFC 6455: close with this code. Its input is read and dropped from now on.
    Violation(Code),
    /// Nothing more for now: the socket has nothing (`WouldBlock`), or the connection is not
    /// read now (paused, to be closed once its last frames are signed, not open).
    Nothing,
    /// The stream ended or failed: drop the connection.
    Lost,
}

/// What sending one message came to ([`Conn::send`]).
pub(super) enum Sent {
    /// Handed to tungstenite whole: flush the connection.
    Written,
    /// Waits in the outbox, behind a full socket or a signature still being made (its own or
    /// an earlier frame's). `blocked`: the socket refused data just now, for the first time
    /// since it last drained: since when (arm the slow-reader deadline). `flush`: something in
    /// the outbox may leave now (flush the connection).
    Queued { blocked: Option<u64>, flush: bool },
    /// More than the write limit waits for the connection (it is not reading), or the socket
    /// failed: drop it (what was sent is not taken back).
    Overflow,
    /// Not open (handshaking or closing): nothing is sent.
    NotOpen,
}

/// What a flush came to ([`Conn::flush`]).
#[derive(Debug)]
pub(super) enum Flushed {
    /// Everything waiting is written.
    Drained,
    /// Written up to a frame whose signature is not made yet.
    Signing,
    /// The socket refused data; `pumped`: the outbox was looked at (tungstenite's own buffer
    /// was written out first).
    Blocked { pumped: bool },
    /// The core closed it, and the frames before the close are all signed now (written or
    /// waiting for the socket): send the close frame, with this code.
    Close(Option<Code>),
    /// The socket failed: drop the connection.
    Failed,
    /// Not open or closing: nothing to flush.
    Idle,
}

/// What starting to close came to ([`Conn::start_close`]).
pub(super) enum Closing {
    /// Closing already (or mid-step): nothing more to do.
    Already,
    /// It never opened: drop it.
    NotOpen,
    /// The close frame waits for the signatures of the frames before it. `started`: this
    /// call started the wait (the first time). `flush`: the first of them is signed already.
    AfterSignatures { started: bool, flush: bool },
    /// The close frame is written (or waits for the socket): flush, and linger for the reply.
    Sent,
    /// The socket failed: drop it.
    Failed,
}

/// What a dropped connection leaves behind ([`Conn::end`]).
pub(super) struct Ended {
    pub(super) id: ConnId,
    /// It was blocked or held back senders: they may be read again.
    pub(super) held_senders: bool,
    /// It was open and the core has not been told it is gone.
    pub(super) report: bool,
    /// It was a dial that never opened, for this peer target.
    pub(super) dial: Option<u32>,
}

/// The [`ConnId`] of the connection in slab slot `slot`, the `serial`th made: the slot in
/// the low 32 bits, the serial number (which tells a slot's successive tenants apart) above.
pub(super) fn conn_id(serial: u32, slot: usize) -> ConnId {
    ConnId((u64::from(serial) << 32) | slot as u64)
}

/// The slab slot in a [`ConnId`] (see [`conn_id`]).
pub(super) fn slot(id: ConnId) -> usize {
    (id.0 & 0xffff_ffff) as usize
}

impl Conn {
    fn new(id: ConnId, io: Io, dial: Option<u32>) -> Conn {
        Conn {
            id,
            io,
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
        }
    }

    /// An accepted socket, speaking TLS first when `tls` is given. Its request is looked at
    /// when it arrives ([`Conn::advance`]).
    pub(super) fn accepted(
        id: ConnId,
        stream: TcpStream,
        tls: Option<rustls::ServerConnection>,
    ) -> Conn {
        let stream = match tls {
            Some(conn) => MaybeTls::Tls(Box::new(TlsStream::new(conn.into(), stream))),
            None => MaybeTls::Plain(stream),
        };
        Conn::new(id, Io::Accepted(stream), None)
    }

    /// Our socket connecting to peer target `target` at `url`, with TLS over it once
    /// connected when `tls` is given.
    pub(super) fn connecting(
        id: ConnId,
        stream: TcpStream,
        target: u32,
        url: String,
        tls: Option<Box<rustls::ClientConnection>>,
    ) -> Conn {
        Conn::new(id, Io::Connecting { stream, url, tls }, Some(target))
    }

    pub(super) fn id(&self) -> ConnId {
        self.id
    }

    /// Not open yet: accepted, answering a plain HTTP request, or in a handshake (TCP, TLS or
    /// WebSocket; ours or a client's).
    pub(super) fn is_opening(&self) -> bool {
        matches!(
            self.io,
            Io::Accepted(_)
                | Io::Http(_)
                | Io::Handshaking(_)
                | Io::Connecting { .. }
                | Io::ClientHandshaking(_)
        )
    }

    /// Counts this connection in the net layer's numbers for `GET /metrics`.
    pub(super) fn count(&self, stats: &mut NetStats) {
        match self.io {
            Io::Http(_) => stats.http += 1,
            Io::Closing(_) => stats.closing += 1,
            Io::Accepted(_)
            | Io::Handshaking(_)
            | Io::Connecting { .. }
            | Io::ClientHandshaking(_) => stats.handshaking += 1,
            Io::Open(_) | Io::Gone => {}
        }
        stats.outbox_bytes += self.out.bytes();
        stats.blocked += usize::from(self.blocked_since.is_some());
    }

    // ------------------------------------------------------------ accept and handshakes

    /// Drives a connection that is not open yet one step, as far as its socket allows. An
    /// open (or closing) one says [`Step::Open`].
    ///
    /// Accepted: peeks at its request head (up to [`http::MAX_HEAD`] bytes, not consumed): a
    /// WebSocket upgrade goes to tungstenite's handshake exactly as before, on any path; a
    /// plain HTTP request is for the loop to answer ([`Step::Http`]). An incomplete head waits
    /// for more bytes (a new readable event) under the handshake deadline.
    ///
    /// Connecting (DESIGN rule 4): on readiness, `take_error()` and `peer_addr()` are
    /// checked; only a connected socket starts the client handshake, with `peer_config`.
    pub(super) fn advance(
        &mut self,
        config: &WebSocketConfig,
        peer_config: &WebSocketConfig,
    ) -> Step {
        match &self.io {
            Io::Accepted(_) => self.sniff_request(config),
            Io::Http(_) => self.drive_http(),
            Io::Handshaking(_) => self.drive_handshake(),
            Io::Connecting { .. } => self.drive_connect(peer_config),
            Io::ClientHandshaking(_) => {
                let Io::ClientHandshaking(mid) = std::mem::replace(&mut self.io, Io::Gone) else {
                    unreachable!("checked above")
                };
                let result = mid.handshake().map(|(ws, _)| ws);
                self.client_handshake_step(result)
            }
            Io::Open(_) | Io::Closing(_) => Step::Open,
            Io::Gone => Step::Wait,
        }
    }

    fn sniff_request(&mut self, config: &WebSocketConfig) -> Step {
        let Io::Accepted(stream) = &mut self.io else {
            return Step::Wait;
        };
        let mut buf = [0u8; http::MAX_HEAD];
        let closed = || Step::Drop("connection closed".into());
        let n = loop {
            let peeked = match stream {
                MaybeTls::Plain(tcp) => tcp.peek(&mut buf),
                // A client that does not speak TLS fails here (an error), and is dropped.
                MaybeTls::Tls(tls) => tls.peek(&mut buf),
            };
            match peeked {
                Ok(0) => return closed(),
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Wait,
                Err(_) => return closed(),
            }
        };
        let plain = match http::classify(&buf[..n], n == buf.len()) {
            http::Request::Incomplete => return Step::Wait,
            http::Request::WebSocket => None,
            http::Request::Plain(request) => Some(request),
        };
        let Io::Accepted(stream) = std::mem::replace(&mut self.io, Io::Gone) else {
            unreachable!("checked above")
        };
        let Some(request) = plain else {
            self.io = Io::Handshaking(ServerHandshake::start(stream, NoCallback, Some(*config)));
            return self.drive_handshake();
        };
        debug!("conn {}: plain HTTP request: {request:?}", self.id);
        // In the `Http` state first, so the report counts this connection as one.
        self.io = Io::Http(HttpReply {
            stream,
            out: Vec::new(),
            sent: 0,
            shut: false,
        });
        Step::Http(request)
    }

    /// Sends `out`, the reply to the plain HTTP request [`Conn::advance`] found, as far as
    /// the socket takes it (see [`Conn::advance`] for the rest).
    pub(super) fn answer(&mut self, out: Vec<u8>) -> Step {
        if let Io::Http(reply) = &mut self.io {
            reply.out = out;
        }
        self.drive_http()
    }

    /// Writes the reply to a plain HTTP request, then half-closes and reads what the client
    /// still sends until it closes: closing with unread input would reset the connection and
    /// could destroy the reply before the client read it. The handshake deadline bounds it all.
    fn drive_http(&mut self) -> Step {
        let Io::Http(reply) = &mut self.io else {
            return Step::Wait;
        };
        let closed = || Step::Drop("connection closed".into());
        while reply.sent < reply.out.len() {
            match reply.stream.write(&reply.out[reply.sent..]) {
                Ok(0) => return closed(),
                Ok(n) => reply.sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Wait, // a writable event resumes
                Err(_) => return closed(),
            }
        }
        if !reply.shut {
            // Over TLS, records rustls still holds must leave before our side shuts.
            match reply.stream.flush() {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Wait, // a writable event resumes
                Err(_) => return closed(),
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
                Ok(0) => return closed(),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Wait,
                Err(_) => return closed(),
            }
        }
        // Still sending after its answer: not worth more of the loop's time.
        closed()
    }

    fn drive_handshake(&mut self) -> Step {
        let Io::Handshaking(_) = self.io else {
            return Step::Wait;
        };
        let Io::Handshaking(mid) = std::mem::replace(&mut self.io, Io::Gone) else {
            unreachable!("checked above")
        };
        match mid.handshake() {
            Ok(ws) => {
                // Login budgets are per source address (§5.3). A socket whose peer address is
                // gone is already dead: nothing it sent will be read.
                let unknown = std::net::Ipv4Addr::UNSPECIFIED.into();
                let peer = ws.get_ref().tcp().peer_addr().map_or(unknown, |a| a.ip());
                self.io = Io::Open(ws);
                Step::Accepted(peer)
            }
            Err(HandshakeError::Interrupted(mid)) => {
                self.io = Io::Handshaking(mid);
                Step::Wait
            }
            Err(HandshakeError::Failure(e)) => {
                debug!("conn {}: handshake failed: {e}", self.id);
                Step::Drop("connection closed".into())
            }
        }
    }

    fn drive_connect(&mut self, peer_config: &WebSocketConfig) -> Step {
        let Io::Connecting { stream, .. } = &self.io else {
            return Step::Wait;
        };
        match stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => return Step::Drop(e.to_string()),
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotConnected => return Step::Wait, // not yet
            Err(e) => return Step::Drop(e.to_string()),
        }
        let Io::Connecting { stream, url, tls } = std::mem::replace(&mut self.io, Io::Gone) else {
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
        let result = tungstenite::client::client_with_config(url, stream, Some(*peer_config));
        self.client_handshake_step(result.map(|(ws, _)| ws))
    }

    fn client_handshake_step(
        &mut self,
        result: Result<WebSocket<Stream>, HandshakeError<ClientHandshake<Stream>>>,
    ) -> Step {
        match result {
            Ok(ws) => {
                self.io = Io::Open(ws);
                Step::Dialled(self.dial.take().expect("a dial"))
            }
            Err(HandshakeError::Interrupted(mid)) => {
                self.io = Io::ClientHandshaking(mid);
                Step::Wait
            }
            Err(HandshakeError::Failure(e)) => Step::Drop(format!("WebSocket handshake: {e}")),
        }
    }

    // ------------------------------------------------------------ reading

    /// Reads one message, if it may be read now (see [`Received::Nothing`]). Once the stream
    /// cannot be parsed any more, reads and drops raw bytes until `WouldBlock` instead.
    pub(super) fn read(&mut self) -> Received {
        if self.discard {
            return self.discard_input();
        }
        if self.paused || self.close_after.is_some() {
            // Paused: resumed (and read) when what it feeds drains. To be closed: the core is
            // done with it; closed once its last frames are signed.
            return Received::Nothing;
        }
        let (ws, closing) = match &mut self.io {
            Io::Open(ws) => (ws, false),
            Io::Closing(ws) => (ws, true),
            _ => return Received::Nothing,
        };
        let result = loop {
            match ws.read() {
                Err(WsError::Io(e)) if e.kind() == ErrorKind::Interrupted => {}
                result => break result,
            }
        };
        let id = self.id;
        match result {
            Ok(Message::Text(text)) if !closing => Received::Text(text),
            Ok(Message::Binary(_)) if !closing => Received::Binary,
            Ok(Message::Close(_)) => {
                debug!("conn {id}: peer closed");
                Received::PeerClosed
            }
            Ok(_) => Received::Control,
            Err(WsError::Io(e)) if e.kind() == ErrorKind::WouldBlock => Received::Nothing,
            Err(WsError::Capacity(e)) if !closing => {
                info!("conn {id}: {e}");
                self.discard = true;
                Received::TooLarge
            }
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Received::Lost,
            Err(e) if closing => {
                // The rest of a refused frame: discard it rather than close with unread
                // bytes, which would reset the connection and could destroy our ERROR
                // and close frame before the peer reads them.
                debug!("conn {id}: discarding input while closing: {e}");
                self.discard = true;
                self.discard_input()
            }
            Err(e) => {
                let Some(code) = violation(&e) else {
                    debug!("conn {id}: read: {e}");
                    return Received::Lost;
                };
                // RFC 6455 §7.1.7: the peer broke the protocol; fail the connection with
                // a close frame that says how (issue "trust at the edges"), not a bare
                // TCP close. tungstenite must not read again (its codec may hold part of
                // the refused frame): from now on only raw bytes are read and dropped.
                info!("conn {id}: {e}; closing with {}", code.0);
                self.discard = true;
                Received::Violation(code)
            }
        }
    }

    /// Reads and drops raw bytes until `WouldBlock`; at end of stream, [`Received::Lost`]
    /// (a linger timer bounds the rest).
    fn discard_input(&mut self) -> Received {
        let mut buf = [0u8; 4096];
        loop {
            let (Io::Closing(ws) | Io::Open(ws)) = &mut self.io else {
                return Received::Nothing;
            };
            match ws.get_mut().read(&mut buf) {
                Ok(0) => return Received::Lost,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Received::Nothing,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Received::Lost,
            }
        }
    }

    /// Stops reading it (backpressure); true if it was being read.
    pub(super) fn pause(&mut self) -> bool {
        !std::mem::replace(&mut self.paused, true)
    }

    /// Reads it again after [`Conn::pause`].
    pub(super) fn resume(&mut self) {
        self.paused = false;
    }

    // ------------------------------------------------------------ writing

    /// Writes `frame`, or queues it behind what the socket has not taken or what waits for a
    /// signature, in its lane's place ([`Outbox::place_for`]). `now_ms`: the clock, read
    /// only should the socket refuse it now. More than `max_waiting` bytes waiting is
    /// [`Sent::Overflow`].
    /// A frame waiting for its signature (or first in line for one) is watched: it reports
    /// this connection's slot to `completions` when complete ([`Frame::watch`]).
    pub(super) fn send(
        &mut self,
        frame: Frame,
        now_ms: impl FnOnce() -> u64,
        max_waiting: usize,
        completions: &Completions,
    ) -> Sent {
        let Io::Open(ws) = &mut self.io else {
            return Sent::NotOpen;
        };
        let at = self.out.place_for(&frame);
        let text = match frame.ready() {
            Some(text) if self.blocked_since.is_none() && at == 0 => text.clone(),
            _ => {
                // The socket is full, or this frame or one before it waits for its
                // signature: wait in line, in order, without a copy.
                let signing = frame.ready().is_none();
                let passed = at < self.out.len();
                // Goes before every frame still waiting: it is the one to watch now.
                let first_waiting = signing && self.out.first_unsigned_at().is_none_or(|p| at <= p);
                let watched = first_waiting.then(|| frame.clone());
                self.out.insert(at, frame, 0);
                let flush = if let Some(frame) = watched {
                    let ready = frame.watch(slot(self.id), completions);
                    self.signing |= !ready;
                    ready
                } else if signing {
                    self.wait_for_signature(completions)
                } else {
                    passed // may be first in line now
                };
                return self.queued(None, flush, max_waiting);
            }
        };
        match write_from(ws, &text, 0) {
            Ok(Wrote::All) => Sent::Written,
            // The rest waits for the next writable event.
            Ok(Wrote::Blocked(next)) => {
                // First in line: it may have passed presence not written yet (`at` is 0),
                // and the rest of a message must follow its first fragments.
                self.out.insert(at, Frame::ready_text(text), next);
                let now_ms = now_ms();
                let blocked = self.block(now_ms).then_some(now_ms);
                self.queued(blocked, true, max_waiting)
            }
            Err(WsError::WriteBufferFull(_)) => {
                info!("conn {}: not reading, write buffer full; closing", self.id);
                Sent::Overflow
            }
            Err(e) => {
                debug!("conn {}: write: {e}", self.id);
                Sent::Overflow
            }
        }
    }

    /// [`Sent::Queued`], unless more than `max_waiting` bytes wait now.
    fn queued(&self, blocked: Option<u64>, flush: bool, max_waiting: usize) -> Sent {
        if self.out.bytes() > max_waiting {
            info!(
                "conn {}: not reading, write buffer full ({} bytes waiting); closing",
                self.id,
                self.out.bytes()
            );
            return Sent::Overflow;
        }
        Sent::Queued { blocked, flush }
    }

    /// Asks the first frame of its outbox still waiting for its signature to report this
    /// connection when it is complete ([`Frame::watch`]): that is the one holding the rest
    /// back. True when there is nothing to wait for (flush it now).
    pub(super) fn wait_for_signature(&mut self, completions: &Completions) -> bool {
        if self.signing {
            return false;
        }
        let ready_now = match self.out.first_unsigned() {
            Some(frame) => frame.watch(slot(self.id), completions),
            None => true,
        };
        self.signing = !ready_now;
        ready_now
    }

    /// The frame it waited for is signed ([`Completions`]): it is to be flushed.
    pub(super) fn signed(&mut self) {
        self.signing = false;
    }

    /// Marks it to be flushed; true if it was not yet (list it).
    pub(super) fn mark_dirty(&mut self) -> bool {
        !std::mem::replace(&mut self.dirty, true)
    }

    /// Bytes waiting in its outbox.
    pub(super) fn waiting(&self) -> usize {
        self.out.bytes()
    }

    /// Writes out tungstenite's buffer, then hands it what waits in the outbox, until the
    /// socket refuses data or a frame waits for its signature. No longer dirty.
    pub(super) fn flush(&mut self) -> Flushed {
        self.dirty = false;
        let (ws, closing) = match &mut self.io {
            Io::Open(ws) => (ws, false),
            Io::Closing(ws) => (ws, true),
            _ => return Flushed::Idle,
        };
        // tungstenite's buffer written out: hand it what waits.
        match ws.flush().and_then(|()| self.out.pump(ws)) {
            Ok(Pumped::Drained | Pumped::Blocked)
                if self.close_after.is_some() && !self.out.has_pending() =>
            {
                // Its last frames are signed (written or queued): now the close frame.
                Flushed::Close(self.close_after.take().flatten())
            }
            Ok(Pumped::Drained) => Flushed::Drained,
            Ok(Pumped::Signing) => Flushed::Signing,
            Ok(Pumped::Blocked) => Flushed::Blocked { pumped: true },
            // Kept in tungstenite's buffer; the writable event brings us back.
            Err(WsError::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                Flushed::Blocked { pumped: false }
            }
            Err(WsError::ConnectionClosed) if closing => Flushed::Failed,
            Err(e) => {
                debug!("conn {}: flush: {e}", self.id);
                Flushed::Failed
            }
        }
    }

    // ------------------------------------------------------------ blocked, backlog

    /// The socket refused data at `now_ms`; true if it had not since it last drained (arm
    /// the slow-reader deadline for `now_ms`).
    pub(super) fn block(&mut self, now_ms: u64) -> bool {
        if self.blocked_since.is_some() {
            return false;
        }
        self.blocked_since = Some(now_ms);
        true
    }

    /// The socket took everything: true if it was blocked (what paused behind it may resume).
    pub(super) fn unblock(&mut self) -> bool {
        self.blocked_since.take().is_some()
    }

    /// Whether it has been blocked since `since` ([`Conn::block`]) without draining.
    pub(super) fn blocked_since(&self, since: u64) -> bool {
        self.blocked_since == Some(since)
    }

    pub(super) fn is_blocked(&self) -> bool {
        self.blocked_since.is_some()
    }

    /// More than [`SIGN_BACKLOG`] frames routed to it wait for their signatures: the senders
    /// feeding it are to be paused (it holds them back until it is under the mark again).
    pub(super) fn hold_back(&mut self) -> bool {
        let over = self.out.signing_backlog() > SIGN_BACKLOG;
        self.holds_back |= over;
        over
    }

    /// It held senders back for its signing backlog and is under the mark again: true once
    /// (they may resume).
    pub(super) fn signed_enough(&mut self) -> bool {
        if self.holds_back && self.out.signing_backlog() <= SIGN_BACKLOG {
            self.holds_back = false;
            return true;
        }
        false
    }

    // ------------------------------------------------------------ closing

    /// Sends a close frame (when `code` is given: none after the peer's close, whose reply
    /// tungstenite sends) after what waits. A close we start (an error, a policy) follows the
    /// frames before it, which may still wait for their signatures: then the close frame
    /// waits too ([`Flushed::Close`]), and nothing more is read. After the peer's close
    /// nothing more can be sent: everything still queued is dropped.
    pub(super) fn start_close(&mut self, code: Option<Code>, completions: &Completions) -> Closing {
        match self.io {
            Io::Open(_) => {}
            Io::Closing(_) | Io::Gone => return Closing::Already,
            _ => return Closing::NotOpen,
        }
        if code.is_some() && self.out.has_pending() {
            if self.close_after.is_some() {
                return Closing::AfterSignatures {
                    started: false,
                    flush: false,
                };
            }
            self.close_after = Some(code);
            let flush = self.wait_for_signature(completions);
            return Closing::AfterSignatures {
                started: true,
                flush,
            };
        }
        let Io::Open(mut ws) = std::mem::replace(&mut self.io, Io::Gone) else {
            unreachable!("checked above")
        };
        // Whatever waits goes before the close frame.
        self.out.spill(&mut ws);
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
        self.io = Io::Closing(ws);
        if sent { Closing::Sent } else { Closing::Failed }
    }

    /// Whether the core is still to be told it is gone, once it is closing: true the first
    /// time.
    pub(super) fn report(&mut self) -> bool {
        !std::mem::replace(&mut self.reported, true)
    }

    /// Whether it waits to send its close frame after its last frames' signatures.
    pub(super) fn closes_after_signing(&self) -> bool {
        self.close_after.is_some()
    }

    /// Forgets the connection: closes the socket (which also removes it from the poll).
    pub(super) fn end(self) -> Ended {
        debug!("conn {}: dropped", self.id);
        Ended {
            id: self.id,
            held_senders: self.blocked_since.is_some() || self.holds_back,
            report: matches!(self.io, Io::Open(_)) && !self.reported,
            dial: self.dial,
        }
    }
}

/// The close frame a read error calls for when the peer broke RFC 6455 (§7.4.1): 1007 for a
/// text message that is not UTF-8 (§8.1), 1002 for a frame that breaks the framing rules
/// (reserved bits set, §5.2; an unmasked client frame, §5.1; bad opcodes, fragmentation,
/// control frames or close payload, §5.4-5.5). None for the rest (a reset, an I/O error):
/// those end the connection without a frame.
fn violation(e: &WsError) -> Option<Code> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::outbox::tests::read_texts;
    use crate::wire::frame::{Signed, lock};
    use std::time::{Duration, Instant};
    use tungstenite::protocol::Role;

    /// An open server-side connection (non-blocking, eager writes, as the loop makes them) and
    /// the blocking client at the other end of it.
    fn open_pair() -> (Conn, WebSocket<std::net::TcpStream>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (stream, _) = listener.accept().expect("accept");
        stream.set_nonblocking(true).expect("non-blocking");
        let config = WebSocketConfig::default().write_buffer_size(0);
        let ws = WebSocket::from_raw_socket(
            MaybeTls::Plain(TcpStream::from_std(stream)),
            Role::Server,
            Some(config),
        );
        let client = WebSocket::from_raw_socket(client, Role::Client, None);
        (Conn::new(ConnId(5), Io::Open(ws), None), client)
    }

    /// A frame waiting for its signature holds back what is sent after it, and a close the
    /// core asks for meanwhile waits for it too: the peer gets everything in order, then the
    /// close frame. The connection is not read while its close waits.
    #[test]
    fn a_frame_waiting_for_its_signature_holds_back_later_frames_and_the_close() {
        let (mut conn, mut client) = open_pair();
        let completions = Completions::default();
        let now = || 7;
        let max = 1 << 20;
        let sent = conn.send(Frame::from("a".to_string()), now, max, &completions);
        assert!(matches!(sent, Sent::Written));
        let signed = Signed::pending("{}".into());
        let waiting = signed.frame("X", "s", "u", 1);
        let sent = conn.send(waiting.clone(), now, max, &completions);
        assert!(matches!(
            sent,
            Sent::Queued {
                blocked: None,
                flush: false
            }
        ));
        let sent = conn.send(Frame::from("b".to_string()), now, max, &completions);
        assert!(matches!(
            sent,
            Sent::Queued {
                blocked: None,
                flush: false
            }
        ));

        let code = (1008, "policy");
        let closing = conn.start_close(Some(code), &completions);
        assert!(matches!(
            closing,
            Closing::AfterSignatures {
                started: true,
                flush: false
            }
        ));
        assert!(conn.closes_after_signing());
        client.send(Message::text("ignored")).expect("client send");
        std::thread::sleep(Duration::from_millis(50));
        assert!(matches!(conn.read(), Received::Nothing));
        assert!(matches!(conn.flush(), Flushed::Signing));

        signed.complete("sig".into());
        assert_eq!(*lock(&completions), vec![slot(conn.id())]);
        conn.signed();
        match conn.flush() {
            Flushed::Close(Some(c)) => assert_eq!(c, code),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            conn.start_close(Some(code), &completions),
            Closing::Sent
        ));
        assert!(matches!(conn.flush(), Flushed::Drained));
        assert!(matches!(
            conn.start_close(None, &completions),
            Closing::Already
        ));

        assert_eq!(
            read_texts(&mut client, 3),
            ["a", waiting.as_str(), "b"].map(String::from)
        );
        match client.read().expect("read") {
            Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1008),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A peer that does not read: sends are written until the socket refuses one, which
    /// blocks the connection (once, since then) and queues the rest; past the write limit a
    /// send is an overflow. Once the peer reads, flushing drains the outbox and unblocks it.
    #[test]
    fn a_full_socket_queues_blocks_and_overflows_then_drains() {
        let (mut conn, mut client) = open_pair();
        let completions = Completions::default();
        let big = "x".repeat(1 << 20);
        let max = 1 << 30;
        let mut sent_count = 0;
        loop {
            assert!(sent_count < 256, "256 MiB did not fill the socket");
            sent_count += 1;
            match conn.send(Frame::from(big.clone()), || 7, max, &completions) {
                Sent::Written => {}
                Sent::Queued {
                    blocked: Some(7),
                    flush: true,
                } => break,
                _ => panic!("unexpected send"),
            }
        }
        assert!(conn.is_blocked() && conn.blocked_since(7));
        let sent = conn.send(Frame::from("tail".to_string()), || 8, max, &completions);
        assert!(matches!(
            sent,
            Sent::Queued {
                blocked: None,
                flush: false
            }
        ));
        let waiting = conn.waiting();
        assert!(waiting > 4, "the rest waits: {waiting}");
        let sent = conn.send(Frame::from("over".to_string()), || 8, waiting, &completions);
        assert!(matches!(sent, Sent::Overflow));

        let reader = std::thread::spawn(move || {
            read_texts(&mut client, sent_count + 2)
                .iter()
                .map(String::len)
                .collect::<Vec<usize>>()
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "the outbox never drained");
            match conn.flush() {
                Flushed::Drained => break,
                Flushed::Blocked { .. } => std::thread::sleep(Duration::from_millis(1)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(conn.waiting(), 0);
        assert!(conn.unblock() && !conn.is_blocked());
        let mut lens = vec![1 << 20; sent_count];
        lens.extend([4, 4]);
        assert_eq!(reader.join().expect("reader"), lens);
    }
}
