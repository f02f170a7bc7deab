//! Lightweight benchmark clients: many WebSocket connections driven by ONE `mio` event loop
//! (non-blocking tungstenite, the same pattern as the server's `src/net/mod.rs`).
//!
//! A client speaks just enough SOCP to log in (PROTOCOL.md §5.2: `USER_HELLO` →
//! `AUTH_CHALLENGE` → signed `AUTH_RESPONSE` → `USER_HELLO_ACK`, `LIST_RESPONSE`,
//! `PUBLIC_CHANNEL_SNAPSHOT`) and to report what it receives. It does **not** verify signatures
//! or decrypt on the clock: one bench thread plays every client, and doing a real client's crypto
//! for each of them would measure the bench, not the server. Scenarios check a sample of the
//! received frames fully afterwards (see `scenarios::Samples`).
//!
//! Receive times are taken with `Instant::now()` right after tungstenite returns each message,
//! so a frame's time includes how long the bench took to get to it; the bench's own CPU time is
//! reported next to every scenario so that can be judged.

use crate::keys;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::{Value, json};
use socp::crypto::{PrivateKey, PublicKey};
use socp::wire::{self, Envelope, SignedPayload, types};
use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Error as WsError, Message, Utf8Bytes, WebSocket};

/// Wakes the loop when a producer thread has frames to send.
pub const WAKER: Token = Token(usize::MAX - 1);

/// Identifies a message by the start of its ciphertext (base64url of RSA-OAEP output, random:
/// 24 characters are 144 random bits).
pub type MsgKey = [u8; 24];

pub fn msg_key(ciphertext: &str) -> Option<MsgKey> {
    ciphertext.as_bytes().get(..24)?.try_into().ok()
}

pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A server the clients connect to, and what its `AUTH_CHALLENGE` told us about it.
pub struct ServerEnd {
    pub url: String,
    pub addr: SocketAddr,
    pub server_id: Option<String>,
    pub key: Option<Arc<PublicKey>>,
}

/// Where a client's login stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Offline,
    Connecting,
    Handshaking,
    /// WebSocket open, `USER_HELLO` held back until [`Fleet::hello`] (see `Client::hold_hello`).
    Open,
    HelloSent,
    Answered,
    Acked,
    Listed,
    /// Hello complete and the directory snapshot received (§7).
    Ready,
    Closing,
}

impl Phase {
    fn logging_in(self) -> bool {
        (Phase::Connecting..Phase::Ready).contains(&self)
    }
}

enum Io {
    None,
    Connecting(TcpStream),
    Handshaking(MidHandshake<ClientHandshake<TcpStream>>),
    Open(WebSocket<TcpStream>),
    Closing(WebSocket<TcpStream>),
    /// An idle client after its hello: the WebSocket (and the buffers tungstenite keeps at the
    /// size of the largest message received, the `LIST_RESPONSE`) is gone; incoming bytes are
    /// read and dropped. Such a client never sends again.
    Raw(TcpStream),
}

/// One benchmark user.
pub struct Client {
    pub user_id: String,
    /// Index into the TEST-ONLY key pool.
    pub key: usize,
    pub server: usize,
    /// Parse every frame and keep a directory (else, once ready, frames are only counted).
    pub track: bool,
    /// Once ready, drop the WebSocket layer and discard raw bytes (idle clients: keeps the
    /// bench's memory per connection small and constant).
    pub raw_after_ready: bool,
    /// Once the WebSocket is open, wait in [`Phase::Open`] for [`Fleet::hello`] instead of
    /// sending the `USER_HELLO` at once (a login storm: every hello leaves in one burst).
    pub hold_hello: bool,
    pub phase: Phase,
    io: Io,
    dirty: bool,
    /// We started the close (a logout), so its end is expected.
    we_closed: bool,
    /// The server's close frame was already reported as a `Note::Closed`.
    close_reported: bool,
    /// Bench users this client knows to be online (bit per client index).
    known: Vec<u64>,
    pub known_count: usize,
    pub frames_in: u64,
}

/// Something a client saw. `at` is when the bench read it.
pub enum Note {
    /// `USER_HELLO_ACK` read.
    Acked {
        client: usize,
        at: Instant,
    },
    /// `LIST_RESPONSE` read.
    Listed {
        client: usize,
        at: Instant,
    },
    Ready {
        client: usize,
        at: Instant,
    },
    Advertise {
        client: usize,
        user: usize,
        at: Instant,
        text: Utf8Bytes,
    },
    Remove {
        client: usize,
        user: usize,
        at: Instant,
    },
    /// `USER_DELIVER` or `MSG_PUBLIC_CHANNEL`.
    Message {
        client: usize,
        key: MsgKey,
        at: Instant,
        text: Utf8Bytes,
    },
    Error {
        client: usize,
        code: String,
        detail: String,
    },
    /// `FILE_START`, `FILE_CHUNK`, `FILE_END` or `ACK`, unparsed (the file scenario parses it).
    File {
        client: usize,
        kind: &'static str,
        at: Instant,
        text: Utf8Bytes,
    },
    /// The connection ended; `expected` when we closed it.
    Closed {
        client: usize,
        expected: bool,
        why: String,
    },
}

/// The clients and their event loop.
pub struct Fleet {
    poll: Poll,
    events: Events,
    waker: Arc<Waker>,
    pub servers: Vec<ServerEnd>,
    pub clients: Vec<Client>,
    ids: HashMap<String, usize>,
    pub keys: Vec<Arc<PrivateKey>>,
    ws_config: WebSocketConfig,
    dirty: Vec<usize>,
    pub notes: Vec<Note>,
    /// Clients between connect and ready.
    pub logging_in: usize,
    pub frames_in: u64,
    pub bytes_in: u64,
    /// The largest `LIST_RESPONSE` received (bytes).
    pub max_list_bytes: usize,
    /// Clients announce `caps:["peer-sig"]` (§5.6).
    pub peer_sig: bool,
    /// When set, `AUTH_RESPONSE` signatures are made on these threads instead of the loop's.
    pub signer: Option<Signer>,
}

impl Fleet {
    /// `read_buffer` is tungstenite's per-connection read chunk (allocated per connection).
    pub fn new(servers: Vec<ServerEnd>, read_buffer: usize) -> io::Result<Fleet> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(read_buffer)
            .write_buffer_size(0)
            // LIST_RESPONSE carries the whole directory: ~1 KB per online user.
            .max_message_size(Some(256 << 20))
            .max_frame_size(Some(256 << 20));
        Ok(Fleet {
            poll,
            events: Events::with_capacity(1024),
            waker,
            servers,
            clients: Vec::new(),
            ids: HashMap::new(),
            keys: keys::pool(),
            ws_config,
            dirty: Vec::new(),
            notes: Vec::new(),
            logging_in: 0,
            frames_in: 0,
            bytes_in: 0,
            max_list_bytes: 0,
            peer_sig: false,
            signer: None,
        })
    }

    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Adds an offline client; returns its index. Key `index % 8` of the pool.
    pub fn add_client(&mut self, user_id: String, server: usize, track: bool) -> usize {
        let idx = self.clients.len();
        self.ids.insert(user_id.clone(), idx);
        self.clients.push(Client {
            user_id,
            key: idx % self.keys.len(),
            server,
            track,
            raw_after_ready: false,
            hold_hello: false,
            phase: Phase::Offline,
            io: Io::None,
            dirty: false,
            we_closed: false,
            close_reported: false,
            known: Vec::new(),
            known_count: 0,
            frames_in: 0,
        });
        idx
    }

    pub fn key_of(&self, client: usize) -> &Arc<PrivateKey> {
        &self.keys[self.clients[client].key]
    }

    fn set_phase(&mut self, idx: usize, phase: Phase) {
        let c = &mut self.clients[idx];
        match (c.phase.logging_in(), phase.logging_in()) {
            (false, true) => self.logging_in += 1,
            (true, false) => self.logging_in -= 1,
            _ => {}
        }
        c.phase = phase;
    }

    /// Starts logging the client in (non-blocking connect; the rest follows in [`Fleet::turn`]).
    pub fn connect(&mut self, idx: usize) -> Result<(), String> {
        if self.clients[idx].phase != Phase::Offline {
            return Err(format!("client {idx} is not offline"));
        }
        let addr = self.servers[self.clients[idx].server].addr;
        let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        self.poll
            .registry()
            .register(
                &mut stream,
                Token(idx),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| format!("register: {e}"))?;
        let c = &mut self.clients[idx];
        c.io = Io::Connecting(stream);
        c.we_closed = false;
        c.close_reported = false;
        c.known.clear();
        c.known_count = 0;
        self.set_phase(idx, Phase::Connecting);
        Ok(())
    }

    /// Queues a text frame; false if the client is not open.
    pub fn send(&mut self, idx: usize, text: String) -> bool {
        let Io::Open(ws) = &mut self.clients[idx].io else {
            return false;
        };
        match ws.write(Message::Text(text.into())) {
            Ok(()) => {}
            Err(WsError::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => {
                self.fail(idx, format!("write: {e}"));
                return false;
            }
        }
        self.mark_dirty(idx);
        true
    }

    /// Starts a clean close (WebSocket close frame); `Note::Closed` follows when it is done.
    pub fn close(&mut self, idx: usize) {
        let c = &mut self.clients[idx];
        c.we_closed = true;
        match std::mem::replace(&mut c.io, Io::None) {
            Io::Open(mut ws) => {
                let _ = ws.close(None);
                c.io = Io::Closing(ws);
                self.set_phase(idx, Phase::Closing);
                self.mark_dirty(idx);
            }
            Io::Closing(ws) => c.io = Io::Closing(ws),
            Io::None => {}
            _ => self.finish(idx, true, "closed while connecting".into()),
        }
    }

    /// Sends the held-back `USER_HELLO` of a client in [`Phase::Open`]; false otherwise.
    pub fn hello(&mut self, idx: usize) -> bool {
        if self.clients[idx].phase != Phase::Open {
            return false;
        }
        self.send_hello(idx);
        true
    }

    /// Leaves at once: a ready raw client writes a WebSocket close frame and shuts its sending
    /// side (it keeps reading, and dropping, until the server closes: `Note::Closed`, expected);
    /// an open client starts a clean close ([`Fleet::close`]).
    pub fn hang_up(&mut self, idx: usize) {
        let c = &mut self.clients[idx];
        match &mut c.io {
            Io::Raw(stream) => {
                c.we_closed = true;
                // FIN + opcode close, masked, empty payload (RFC 6455 §5.5.1).
                let mask = socp::crypto::random_bytes::<4>();
                let frame = [0x88, 0x80, mask[0], mask[1], mask[2], mask[3]];
                // A socket buffer too full for 6 bytes means the server stopped reading: the
                // shutdown (FIN) still tells it we left.
                let _ = std::io::Write::write(stream, &frame);
                let _ = stream.shutdown(std::net::Shutdown::Write);
                self.set_phase(idx, Phase::Closing);
            }
            _ => self.close(idx),
        }
    }

    /// Drops every connection at once (end of a run).
    pub fn drop_all(&mut self) {
        for idx in 0..self.clients.len() {
            if !matches!(self.clients[idx].io, Io::None) {
                self.clients[idx].io = Io::None;
                self.set_phase(idx, Phase::Offline);
            }
        }
        self.dirty.clear();
    }

    /// One loop turn: wait up to `timeout` for readiness, handle it, flush what was written.
    pub fn turn(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let mut events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        match self.poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                self.events = events;
                return Err(e);
            }
        }
        for event in events.iter() {
            if event.token() == WAKER {
                continue;
            }
            self.on_ready(event.token().0, event.is_readable(), event.is_writable());
        }
        self.events = events;
        self.take_signed();
        self.flush_dirty();
        Ok(())
    }

    /// Flushes everything written since the last turn (also done at the end of every turn).
    pub fn flush_dirty(&mut self) {
        for idx in std::mem::take(&mut self.dirty) {
            let c = &mut self.clients[idx];
            c.dirty = false;
            let closing = matches!(c.io, Io::Closing(_));
            let result = match &mut c.io {
                Io::Open(ws) | Io::Closing(ws) => ws.flush(),
                _ => continue,
            };
            match result {
                Ok(()) => {}
                Err(WsError::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
                Err(WsError::ConnectionClosed) if closing => {
                    let expected = self.clients[idx].we_closed;
                    self.finish(idx, expected, "connection closed".into())
                }
                Err(e) => self.fail(idx, format!("flush: {e}")),
            }
        }
    }

    fn mark_dirty(&mut self, idx: usize) {
        let c = &mut self.clients[idx];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(idx);
        }
    }

    fn on_ready(&mut self, idx: usize, readable: bool, writable: bool) {
        let Some(c) = self.clients.get_mut(idx) else {
            return;
        };
        match &c.io {
            Io::None => {}
            Io::Connecting(stream) => {
                match stream.take_error() {
                    Ok(None) => {}
                    Ok(Some(e)) | Err(e) => return self.fail(idx, format!("connect: {e}")),
                }
                match stream.peer_addr() {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::NotConnected => return,
                    Err(e) => return self.fail(idx, format!("connect: {e}")),
                }
                let Io::Connecting(stream) = std::mem::replace(&mut c.io, Io::None) else {
                    unreachable!("matched above")
                };
                let _ = stream.set_nodelay(true);
                let url = format!("{}/", self.servers[c.server].url.trim_end_matches('/'));
                let result =
                    tungstenite::client::client_with_config(url, stream, Some(self.ws_config));
                self.set_phase(idx, Phase::Handshaking);
                self.handshake_step(idx, result.map(|(ws, _)| ws));
            }
            Io::Handshaking(_) => {
                let Io::Handshaking(mid) = std::mem::replace(&mut c.io, Io::None) else {
                    unreachable!("matched above")
                };
                self.handshake_step(idx, mid.handshake().map(|(ws, _)| ws));
            }
            Io::Open(_) | Io::Closing(_) => {
                if writable {
                    self.mark_dirty(idx);
                }
                if readable {
                    self.read_all(idx);
                }
            }
            Io::Raw(_) => {
                if readable {
                    self.discard_raw(idx);
                }
            }
        }
    }

    /// Reads and drops bytes of a raw (idle) client until `WouldBlock`.
    fn discard_raw(&mut self, idx: usize) {
        let mut buf = [0u8; 16 << 10];
        loop {
            let Io::Raw(stream) = &mut self.clients[idx].io else {
                return;
            };
            match std::io::Read::read(stream, &mut buf) {
                Ok(0) => {
                    let expected = self.clients[idx].we_closed;
                    return self.finish(idx, expected, "server closed the connection".into());
                }
                Ok(n) => self.bytes_in += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.fail(idx, format!("read: {e}")),
            }
        }
    }

    /// Replaces a ready idle client's WebSocket with its bare socket (see [`Io::Raw`]). Bytes
    /// tungstenite had already buffered are dropped with it: nobody reads them.
    fn go_raw(&mut self, idx: usize) {
        let c = &mut self.clients[idx];
        if let Io::Open(_) = c.io {
            let Io::Open(ws) = std::mem::replace(&mut c.io, Io::None) else {
                unreachable!("matched above")
            };
            c.io = Io::Raw(ws.into_inner());
            self.discard_raw(idx);
        }
    }

    fn handshake_step(
        &mut self,
        idx: usize,
        result: Result<WebSocket<TcpStream>, HandshakeError<ClientHandshake<TcpStream>>>,
    ) {
        match result {
            Ok(ws) => {
                self.clients[idx].io = Io::Open(ws);
                if self.clients[idx].hold_hello {
                    self.set_phase(idx, Phase::Open);
                } else {
                    self.send_hello(idx);
                }
                self.read_all(idx);
            }
            Err(HandshakeError::Interrupted(mid)) => self.clients[idx].io = Io::Handshaking(mid),
            Err(HandshakeError::Failure(e)) => self.fail(idx, format!("WebSocket handshake: {e}")),
        }
    }

    fn send_hello(&mut self, idx: usize) {
        let c = &self.clients[idx];
        let pubkey = self.keys[c.key].public_key().encoded();
        let payload = json!({
            "client": "socp-bench",
            "pubkey": pubkey,
            "enc_pubkey": pubkey,
            "meta": {"display_name": c.user_id},
            "caps": if self.peer_sig { vec![wire::CAP_PEER_SIG] } else { vec![] },
        });
        let signed = SignedPayload::unsigned(&payload).expect("strings only");
        let text = wire::encode_frame(types::USER_HELLO, &c.user_id, "", wall_ms(), &signed);
        self.set_phase(idx, Phase::HelloSent);
        self.send(idx, text);
    }

    /// Reads until `WouldBlock` (tungstenite may hold several messages per socket read).
    fn read_all(&mut self, idx: usize) {
        loop {
            let c = &mut self.clients[idx];
            let result = match &mut c.io {
                Io::Open(ws) | Io::Closing(ws) => ws.read(),
                _ => return,
            };
            let at = Instant::now();
            match result {
                Ok(Message::Text(text)) => {
                    c.frames_in += 1;
                    self.frames_in += 1;
                    self.bytes_in += text.len() as u64;
                    self.on_text(idx, text, at);
                    let c = &self.clients[idx];
                    if c.raw_after_ready && c.phase == Phase::Ready {
                        return self.go_raw(idx);
                    }
                }
                Ok(Message::Close(frame)) => {
                    // tungstenite queued the reply; flush it, then the read ends the stream.
                    if matches!(c.io, Io::Open(_)) {
                        c.close_reported = true;
                        let why = frame
                            .map(|f| format!("server closed: {} {}", u16::from(f.code), f.reason))
                            .unwrap_or_else(|| "server closed".into());
                        self.notes.push(Note::Closed {
                            client: idx,
                            expected: false,
                            why,
                        });
                        let Io::Open(ws) = std::mem::replace(&mut c.io, Io::None) else {
                            unreachable!("matched above")
                        };
                        c.io = Io::Closing(ws);
                        self.set_phase(idx, Phase::Closing);
                    }
                    self.mark_dirty(idx);
                }
                Ok(_) => self.mark_dirty(idx), // ping: the pong is queued
                Err(WsError::Io(e)) if e.kind() == ErrorKind::WouldBlock => return,
                Err(WsError::Io(e)) if e.kind() == ErrorKind::Interrupted => {}
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                    let expected = c.we_closed;
                    return self.finish(idx, expected, "connection closed".into());
                }
                Err(e) => {
                    let expected = c.we_closed;
                    return self.finish(idx, expected, format!("read: {e}"));
                }
            }
        }
    }

    /// An error on a connection we did not mean to lose.
    fn fail(&mut self, idx: usize, why: String) {
        self.finish(idx, false, why);
    }

    fn finish(&mut self, idx: usize, expected: bool, why: String) {
        let c = &mut self.clients[idx];
        let reported = std::mem::take(&mut c.close_reported);
        c.io = Io::None; // closes the socket (and removes it from the poll)
        self.set_phase(idx, Phase::Offline);
        // A server-initiated close was reported when its close frame arrived.
        if !reported {
            self.notes.push(Note::Closed {
                client: idx,
                expected,
                why,
            });
        }
    }

    fn on_text(&mut self, idx: usize, text: Utf8Bytes, at: Instant) {
        let c = &self.clients[idx];
        if !c.track && c.phase == Phase::Ready {
            return; // idle clients only count what they get
        }
        let kind = fast_kind(&text);
        if kind == Some(types::LIST_RESPONSE) {
            self.max_list_bytes = self.max_list_bytes.max(text.len());
        }
        // Frames a client ignores are not parsed (an untracked client's LIST_RESPONSE can be
        // megabytes: its directory is not needed).
        let file_kind = match kind {
            Some(types::FILE_START) => Some(types::FILE_START),
            Some(types::FILE_CHUNK) => Some(types::FILE_CHUNK),
            Some(types::FILE_END) => Some(types::FILE_END),
            Some(types::ACK) => Some(types::ACK),
            _ => None,
        };
        if let Some(kind) = file_kind {
            self.notes.push(Note::File {
                client: idx,
                kind,
                at,
                text,
            });
            return;
        }
        let wanted = match kind {
            Some(types::LIST_RESPONSE) if !c.track => {
                self.set_phase(idx, Phase::Listed);
                self.notes.push(Note::Listed { client: idx, at });
                return;
            }
            Some(types::PUBLIC_CHANNEL_SNAPSHOT) => {
                self.set_phase(idx, Phase::Ready);
                self.notes.push(Note::Ready { client: idx, at });
                return;
            }
            Some(types::USER_HELLO_ACK) => {
                self.set_phase(idx, Phase::Acked);
                self.notes.push(Note::Acked { client: idx, at });
                return;
            }
            Some(
                types::AUTH_CHALLENGE
                | types::LIST_RESPONSE
                | types::USER_ADVERTISE
                | types::USER_REMOVE
                | types::USER_DELIVER
                | types::MSG_PUBLIC_CHANNEL
                | types::ERROR,
            ) => true,
            Some(_) => false,
            None => true, // not in our server's form: parse to find out
        };
        if !wanted {
            return;
        }
        // Presence is what every client receives at once (a fan-out of N frames read by this
        // one thread): find its user without parsing the whole frame. Sampled frames are still
        // parsed and verified in full (`Samples::verify`).
        if let Some(kind @ (types::USER_ADVERTISE | types::USER_REMOVE)) = kind
            && let Some(id) = fast_user_id(&text)
        {
            if let Some(&user) = self.ids.get(id) {
                self.on_presence(idx, user, kind == types::USER_ADVERTISE, at, text);
            }
            return;
        }
        let env = match Envelope::parse(&text) {
            Ok(env) => env,
            Err(e) => {
                self.notes.push(Note::Error {
                    client: idx,
                    code: "BENCH".into(),
                    detail: format!("unparseable frame: {e}"),
                });
                return;
            }
        };
        match env.kind.as_str() {
            types::AUTH_CHALLENGE => self.on_challenge(idx, &env),
            types::USER_HELLO_ACK => {
                self.set_phase(idx, Phase::Acked);
                self.notes.push(Note::Acked { client: idx, at });
            }
            types::PUBLIC_CHANNEL_SNAPSHOT => {
                self.set_phase(idx, Phase::Ready);
                self.notes.push(Note::Ready { client: idx, at });
            }
            types::LIST_RESPONSE => {
                if let Some(Value::Array(users)) = env.payload.get("users") {
                    for u in users {
                        if let Some(id) = u.get("user_id").and_then(Value::as_str)
                            && let Some(&user) = self.ids.get(id)
                        {
                            self.set_known(idx, user, true);
                        }
                    }
                }
                self.set_phase(idx, Phase::Listed);
                self.notes.push(Note::Listed { client: idx, at });
            }
            types::USER_ADVERTISE | types::USER_REMOVE => {
                let Some(id) = env.payload.get("user_id").and_then(Value::as_str) else {
                    return;
                };
                let Some(&user) = self.ids.get(id) else {
                    return; // not one of ours
                };
                let online = env.kind == types::USER_ADVERTISE;
                self.on_presence(idx, user, online, at, text);
            }
            types::USER_DELIVER | types::MSG_PUBLIC_CHANNEL => {
                if let Some(key) = env
                    .payload
                    .get("ciphertext")
                    .and_then(Value::as_str)
                    .and_then(msg_key)
                {
                    self.notes.push(Note::Message {
                        client: idx,
                        key,
                        at,
                        text,
                    });
                }
            }
            types::ERROR => {
                let f = env.fields();
                self.notes.push(Note::Error {
                    client: idx,
                    code: f.str("code").unwrap_or("?").to_string(),
                    detail: f.str("detail").unwrap_or("").to_string(),
                });
            }
            _ => {}
        }
    }

    /// A `USER_ADVERTISE` (`online`) or `USER_REMOVE` for one of our users reached `idx`.
    fn on_presence(&mut self, idx: usize, user: usize, online: bool, at: Instant, text: Utf8Bytes) {
        self.set_known(idx, user, online);
        let client = idx;
        self.notes.push(if online {
            Note::Advertise {
                client,
                user,
                at,
                text,
            }
        } else {
            Note::Remove { client, user, at }
        });
    }

    fn set_known(&mut self, idx: usize, user: usize, online: bool) {
        let c = &mut self.clients[idx];
        if !c.track {
            return;
        }
        let (word, bit) = (user / 64, 1u64 << (user % 64));
        if c.known.len() <= word {
            c.known.resize(word + 1, 0);
        }
        let was = c.known[word] & bit != 0;
        if online && !was {
            c.known[word] |= bit;
            c.known_count += 1;
        } else if !online && was {
            c.known[word] &= !bit;
            c.known_count -= 1;
        }
    }

    /// Whether client `idx` has `user` in its directory.
    pub fn knows(&self, idx: usize, user: usize) -> bool {
        let c = &self.clients[idx];
        c.known
            .get(user / 64)
            .is_some_and(|w| w & (1u64 << (user % 64)) != 0)
    }

    /// §5.2 step 3: sign `{nonce, server_id, user_id}` with the client's key.
    fn on_challenge(&mut self, idx: usize, env: &Envelope) {
        let f = env.fields();
        let (Ok(nonce), Ok(server_id), Ok(server_pub)) =
            (f.str("nonce"), f.str("server_id"), f.str("server_pubkey"))
        else {
            return self.fail(idx, "malformed AUTH_CHALLENGE".into());
        };
        let server = self.clients[idx].server;
        let end = &mut self.servers[server];
        match &end.key {
            Some(k) if k.encoded() == server_pub => {}
            Some(_) => {
                return self.fail(idx, "the server presented a different key".into());
            }
            None => match PublicKey::parse(server_pub) {
                Ok(k) => {
                    end.key = Some(Arc::new(k));
                    end.server_id = Some(server_id.to_string());
                }
                Err(e) => return self.fail(idx, format!("server key: {e}")),
            },
        }
        let c = &self.clients[idx];
        let job = SignJob {
            client: idx,
            user_id: c.user_id.clone(),
            server_id: server_id.to_string(),
            nonce: nonce.to_string(),
            key: Arc::clone(&self.keys[c.key]),
        };
        self.set_phase(idx, Phase::Answered);
        match &self.signer {
            Some(signer) => signer.submit(job),
            None => {
                let (text, _) = job.answer();
                self.send(idx, text);
            }
        }
    }

    /// Sends the `AUTH_RESPONSE`s the signer threads finished (clients still waiting for them).
    fn take_signed(&mut self) {
        let Some(signer) = &self.signer else { return };
        let done: Vec<(usize, String)> = match signer.done.lock() {
            Ok(rx) => rx.try_iter().collect(),
            Err(_) => return,
        };
        for (idx, text) in done {
            if self.clients[idx].phase == Phase::Answered {
                self.send(idx, text);
            }
        }
    }

    /// Clients by phase, for progress and error messages.
    pub fn phase_counts(&self) -> String {
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for c in &self.clients {
            *counts.entry(format!("{:?}", c.phase)).or_default() += 1;
        }
        counts
            .iter()
            .map(|(p, n)| format!("{p}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// One `AUTH_RESPONSE` to sign (§5.2 step 3).
pub struct SignJob {
    client: usize,
    user_id: String,
    server_id: String,
    nonce: String,
    key: Arc<PrivateKey>,
}

impl SignJob {
    /// The signed `AUTH_RESPONSE` frame, and how long the signature took.
    fn answer(&self) -> (String, Duration) {
        let payload =
            json!({"nonce": self.nonce, "server_id": self.server_id, "user_id": self.user_id});
        let started = Instant::now();
        let signed = SignedPayload::sign(&payload, &self.key).expect("strings only");
        let took = started.elapsed();
        let text = wire::encode_frame(
            types::AUTH_RESPONSE,
            &self.user_id,
            &self.server_id,
            wall_ms(),
            &signed,
        );
        (text, took)
    }
}

/// Threads that sign `AUTH_RESPONSE`s for the loop, so that a burst of logins does not stall
/// it: the loop goes on reading and timing every other client while they sign. Stopped (and
/// joined) on drop.
pub struct Signer {
    jobs: Option<std::sync::mpsc::Sender<SignJob>>,
    /// In a mutex only so that the fleet stays `Sync` (scenarios share it with worker threads
    /// read-only); only the loop's thread takes from it.
    done: std::sync::Mutex<std::sync::mpsc::Receiver<(usize, String)>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Nanoseconds spent in signatures, over all threads.
    signing_ns: Arc<std::sync::atomic::AtomicU64>,
    signed: Arc<std::sync::atomic::AtomicU64>,
}

impl Signer {
    pub fn start(threads: usize, waker: Arc<Waker>) -> Signer {
        let (jobs, rx) = std::sync::mpsc::channel::<SignJob>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let (tx, done) = std::sync::mpsc::channel();
        let signing_ns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let signed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads = (0..threads.max(1))
            .map(|_| {
                let (rx, tx, waker) = (Arc::clone(&rx), tx.clone(), Arc::clone(&waker));
                let (ns, count) = (Arc::clone(&signing_ns), Arc::clone(&signed));
                std::thread::spawn(move || {
                    loop {
                        let job = {
                            let Ok(rx) = rx.lock() else { return };
                            match rx.recv() {
                                Ok(job) => job,
                                Err(_) => return, // the loop dropped the sender
                            }
                        };
                        let (text, took) = job.answer();
                        ns.fetch_add(took.as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if tx.send((job.client, text)).is_err() {
                            return;
                        }
                        let _ = waker.wake();
                    }
                })
            })
            .collect();
        Signer {
            jobs: Some(jobs),
            done: std::sync::Mutex::new(done),
            threads,
            signing_ns,
            signed,
        }
    }

    fn submit(&self, job: SignJob) {
        if let Some(jobs) = &self.jobs {
            // The threads live as long as the sender: a send cannot fail while we hold it.
            let _ = jobs.send(job);
        }
    }

    /// (signatures made, milliseconds spent making them, summed over threads).
    pub fn work(&self) -> (u64, f64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.signed.load(Relaxed),
            self.signing_ns.load(Relaxed) as f64 / 1e6,
        )
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The `type` of a frame in the form our server emits (`{"type":"X",...`), without parsing
/// the rest; `None` for any other form.
fn fast_kind(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("{\"type\":\"")?;
    let end = rest.find('"')?;
    let kind = &rest[..end];
    (!kind.contains('\\')).then_some(kind)
}

/// The payload's `user_id` of a presence frame in our server's form: canonical JSON sorts it
/// last among the payload's keys, and only the base64url `sig` follows, so its last
/// `"user_id":"` is the one. `None` (parse it instead) for anything unusual.
fn fast_user_id(text: &str) -> Option<&str> {
    const KEY: &str = "\"user_id\":\"";
    let start = text.rfind(KEY)? + KEY.len();
    let rest = &text[start..];
    let end = rest.find('"')?;
    let id = &rest[..end];
    let tail = &rest[end..];
    let plain = !id.contains('\\') && tail.starts_with("\"},\"sig\":\"");
    plain.then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_user_id_finds_the_payloads_user_only_in_our_form() {
        let advert = r#"{"type":"USER_ADVERTISE","from":"s","to":"*","ts":1,"payload":{"meta":{"user_id":"x"},"pubkey":"k","server_id":"s","user_id":"bench-3"},"sig":"abc"}"#;
        assert_eq!(fast_user_id(advert), Some("bench-3"));
        let remove = r#"{"type":"USER_REMOVE","from":"s","to":"*","ts":1,"payload":{"server_id":"s","user_id":"bench-j0"},"sig":"abc"}"#;
        assert_eq!(fast_user_id(remove), Some("bench-j0"));
        // Anything else is left to the full parser.
        let escaped = r#"{"type":"USER_REMOVE","payload":{"user_id":"a"b"},"sig":"x"}"#;
        assert_eq!(fast_user_id(escaped), None);
        let reordered =
            r#"{"type":"USER_REMOVE","payload":{"user_id":"a","server_id":"s"},"sig":"x"}"#;
        assert_eq!(fast_user_id(reordered), None);
        assert_eq!(fast_user_id(r#"{"type":"USER_REMOVE"}"#), None);
    }

    #[test]
    fn fast_kind_reads_our_form_only() {
        assert_eq!(fast_kind(r#"{"type":"ACK","from":"a"}"#), Some("ACK"));
        assert_eq!(fast_kind(r#"{"from":"a","type":"ACK"}"#), None);
        assert_eq!(fast_kind(r#"{"type":"A\"B"}"#), None);
    }
}
