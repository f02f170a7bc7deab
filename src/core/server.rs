//! The server core: a synchronous, deterministic state machine (DESIGN.md "The shape").
//!
//! It receives [`Input`]s — a connection opened, a text frame, a timer, a connection closed —
//! with the current [`Time`], and answers with [`Action`]s: frames to send, connections to
//! close, timers to arm. It never touches a socket or a clock, so it is tested with simulated
//! time and no network (`tests/core.rs`).
//!
//! Storage and randomness are handed to it. It reaches storage through the [`Persistence`]
//! trait, synchronously: a key binding or an account must be durable *before* the reply that
//! confirms it (PROTOCOL.md §11), and a synchronous call keeps that ordering obvious. The server
//! gives it the SQLite [`Store`](crate::store::Store); tests may give it a
//! [`MemStore`](crate::core::persist::MemStore). Its random bytes (challenge nonces, password
//! salts) come from a [`Random`] source: the OS's by default, a seeded one in tests that want
//! to replay a run.

use crate::core::channel::PublicChannel;
use crate::core::directory::{Directory, Entry};
use crate::core::federation::{FedConfig, Federation};
use crate::core::outbox::Outbox;
use crate::core::persist::{Persistence, UserRecord};
use crate::core::random::{OsRandom, Random};
pub(crate) use crate::core::sessions::State;
use crate::core::sessions::{self, Challenge, Early, Sessions};
use crate::core::signer::{InlineSigner, Signer, Urgency};
use crate::core::transfer::{TransferLimits, Transfers};
use crate::crypto::{KeyCache, PrivateKey, PublicKey};
use crate::wire::frame::{Frame, Lane, Signed, Slot};
use crate::wire::user::{Addressed, FileFrame, Hello, Payload, UserFrame, unknown_type};
use crate::wire::{self, AuthResponse, Envelope, ErrorCode, UserMessage, WireError, types};
use log::{debug, info, warn};
use serde_json::{Map, Value, json};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

/// Identifies one connection for its whole life; never reused (the net layer puts a generation
/// in the high bits), so a stale timer or action for a closed connection is harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    /// The connection's serial number (the high half); the slab index is an internal detail.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0 >> 32)
    }
}

/// The two clocks the core needs: monotonic for deadlines, wall for `ts` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time {
    pub mono_ms: u64,
    pub wall_ms: i64,
}

/// What the net layer reports.
#[derive(Debug)]
pub enum Input<'a> {
    /// An accepted connection finished its WebSocket handshake. `peer` is the address it comes
    /// from: login attempts are budgeted per source address (PROTOCOL.md §5.3).
    Opened { conn: ConnId, peer: IpAddr },
    /// One text message.
    Text { conn: ConnId, text: &'a str },
    /// One binary message (not part of the profile, §1).
    Binary { conn: ConnId },
    /// The peer sent a message over the size limit; the connection is about to be closed.
    TooLarge { conn: ConnId },
    /// The connection is gone (closed by the peer, an I/O error, or a full write buffer).
    Closed { conn: ConnId },
    /// A timer armed by [`Action::Timer`] fired.
    Timer(Timer),
    /// An outbound connection asked for by [`Action::Dial`] finished its WebSocket handshake.
    Dialled { conn: ConnId, target: u32 },
    /// An [`Action::Dial`] failed before a WebSocket was up (refused, timed out, bad handshake).
    DialFailed { target: u32, reason: String },
}

/// Timers the core arms. Each names what it is for; a timer whose connection is gone or has
/// moved on is a no-op when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// The connection must have completed its hello by now (§5.2).
    Hello(ConnId),
    /// Time to dial peer target `n` again (§4.4 backoff).
    Redial(u32),
    /// A dialled peer must have sent `SERVER_WELCOME` by now (§4.3).
    Welcome(ConnId),
    /// Send heartbeats and check links for silence (§4.4).
    Heartbeat,
    /// Abort file transfers that went idle (§9).
    Transfers,
    /// Tell the other servers about public-channel changes, batched (§8).
    Channel,
}

/// What the core asks the net layer to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send {
        conn: ConnId,
        text: Frame,
    },
    /// Like `Send`, for a frame `route()` carries for the sender of the input being handled
    /// (§6: a DM, a public-channel copy, a file frame, or one relayed toward another server).
    /// Only these are flow-controlled: while `conn` does not take data, the net layer stops
    /// reading the connection the input came from. What the server originates to many
    /// (presence, channel news, heartbeats, errors) is a `Send`: it never pauses the one whose
    /// input caused it (issue "trust at the edges": one user who never reads froze every
    /// newcomer, whose login broadcasts a `USER_ADVERTISE` to that user too).
    Route {
        conn: ConnId,
        text: Frame,
    },
    /// Close with this WebSocket close code. The core has already forgotten the connection.
    Close {
        conn: ConnId,
        code: CloseCode,
        reason: &'static str,
    },
    Timer {
        at_ms: u64,
        timer: Timer,
    },
    /// Open an outbound connection to a peer; answer with `Dialled` or `DialFailed`.
    Dial {
        target: u32,
        host: String,
        port: u16,
        /// `wss://`: TLS, the peer's certificate checked (in addition to its pinned key).
        tls: bool,
    },
}

/// The WebSocket close codes the core uses (§1). The net layer writes [`CloseCode::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: done (a `CTRL_CLOSE`, a duplicate link, a welcome that never came).
    Normal,
    /// 1001: this server is stopping, or a link went silent.
    GoingAway,
    /// 1008: the peer broke the protocol (a bad first frame, a hello timeout, a refused link).
    Policy,
    /// 1009: a message over the size limit.
    TooBig,
}

impl CloseCode {
    /// The code as the close frame carries it.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
        }
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> u16 {
        code.code()
    }
}

/// Short names for the close codes (§1).
pub mod close {
    use super::CloseCode;
    pub const NORMAL: CloseCode = CloseCode::Normal;
    pub const GOING_AWAY: CloseCode = CloseCode::GoingAway;
    pub const POLICY: CloseCode = CloseCode::Policy;
    pub const TOO_BIG: CloseCode = CloseCode::TooBig;
}

/// The core's own tunables (a subset of [`crate::config::Config`]).
#[derive(Debug, Clone)]
pub struct Limits {
    pub hello_timeout_ms: u64,
    pub error_burst: u32,
    pub error_refill_per_s: u32,
    pub max_message_size: usize,
}

impl From<&crate::config::Config> for Limits {
    fn from(c: &crate::config::Config) -> Self {
        Limits {
            hello_timeout_ms: c.hello_timeout_ms,
            error_burst: c.error_burst,
            error_refill_per_s: c.error_refill_per_s,
            max_message_size: c.max_message_size,
        }
    }
}

/// Signatures of recent `ERROR` payloads: the same error is often sent many times, and a
/// signature costs far more than a lookup. Bounded; cleared when full.
#[derive(Debug, Default)]
struct ErrorSigs(HashMap<String, Signed>);

const ERROR_SIG_CACHE: usize = 256;

/// The server core. See the module documentation.
///
/// It owns the components (each with private fields) and the dispatch. The fields marked
/// `pub(super)` are visible to every module of [`crate::core`]; by convention only its own
/// `impl` blocks there (`federation`, `login`, `transfer`, `metrics`) use them, and they call
/// the components' methods. Nothing outside the core sees any field.
pub struct Server {
    pub(super) id: String,
    key: Arc<PrivateKey>,
    /// Makes our signatures: in line, or a pool of threads (see [`crate::core::signer`]).
    signer: Box<dyn Signer>,
    limits: Limits,
    pub(super) store: Box<dyn Persistence + Send>,
    /// Where nonces and salts come from (see [`crate::core::random`]).
    random: Box<dyn Random + Send>,
    keys: KeyCache,
    /// The connection table and the challenge pool (see [`crate::core::sessions`]).
    sessions: Sessions,
    pub(super) dir: Directory,
    pub(super) channel: PublicChannel,
    pub(super) fed: Federation,
    /// Accounts and the login budgets per source, per (name, source) and per name (§5.3).
    pub(super) accounts: crate::core::login::Accounts,
    /// File transfers under way from local users (§9).
    pub(super) transfers: Transfers,
    error_sigs: ErrorSigs,
    /// The signed `LIST_RESPONSE` payload for the directory version it was built at: the
    /// payload changes only when the directory does, so repeated requests cost no signature.
    list_cache: Option<((i64, u64), Signed)>,
    /// The `PUBLIC_CHANNEL_SNAPSHOT` payload for the (channel, directory) versions it was built
    /// at, signed once for every newcomer who asks while they stay the same.
    snapshot_cache: Option<((i64, i64), Signed)>,
    /// `LIST_RESPONSE` and `PUBLIC_CHANNEL_SNAPSHOT` frames handed out during this turn whose
    /// payload is written at its end (see [`Server::run_deferred`]): the newcomers of a login
    /// burst share one snapshot, one canonical text and one signature (issue "signatures off
    /// the loop").
    burst: Vec<(BurstKind, Arc<Slot>)>,
    /// Work an input left for later, oldest first; see [`Deferred`].
    deferred: VecDeque<Deferred>,
    /// How many `USER_REMOVE`s of our own users we have signed: an advert signed ahead of
    /// need before one of them is not sent (see [`Server::user_online`]).
    own_removes: u64,
    /// Counters for `GET /metrics` (see [`crate::core::metrics`]).
    pub(super) metrics: crate::core::metrics::Metrics,
    /// What the net layer is to do, in order.
    pub(super) out: Outbox,
}

/// Work left for the end of the net layer's turn ([`Server::run_deferred`]).
#[derive(Debug)]
enum Deferred {
    /// Sign one `AUTH_CHALLENGE` ahead of need (see [`Sessions::wants_challenge`]).
    Challenge,
}

/// Frames whose payload is decided at the end of the turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BurstKind {
    List,
    Snapshot,
}

impl Server {
    /// A core for server `id` with key `key`, persisting to `store` (the server's SQLite
    /// [`Store`](crate::store::Store), or a [`MemStore`](crate::core::persist::MemStore)), its
    /// random bytes from the OS ([`OsRandom`]; see [`Server::with_random`]), signing in line
    /// (see [`Server::set_signer`]).
    pub fn new(
        id: String,
        key: PrivateKey,
        limits: Limits,
        store: impl Persistence + Send + 'static,
    ) -> Server {
        let key = Arc::new(key);
        let signer = Box::new(InlineSigner::new(Arc::clone(&key)));
        let channel = PublicChannel::new(store.public_channel_version().unwrap_or_else(|e| {
            warn!("could not read the public channel version: {e}");
            0
        }));
        let mut metrics = crate::core::metrics::Metrics::default();
        metrics.set_sign_stats(Arc::clone(signer.stats()));
        Server {
            id,
            key,
            signer,
            sessions: Sessions::new(&limits),
            limits,
            store: Box::new(store),
            random: Box::new(OsRandom),
            keys: KeyCache::new(4096),
            dir: Directory::default(),
            channel,
            error_sigs: ErrorSigs::default(),
            list_cache: None,
            snapshot_cache: None,
            burst: Vec::new(),
            deferred: VecDeque::new(),
            own_removes: 0,
            fed: Federation::new(FedConfig::default()),
            accounts: Default::default(),
            transfers: Transfers::new(TransferLimits::default()),
            metrics,
            out: Outbox::default(),
        }
    }

    /// Draws the core's random bytes (challenge nonces, password salts) from `random` instead
    /// of the OS. For tests: a server's nonces must be unpredictable, so only [`OsRandom`] is fit
    /// for one that serves users.
    pub fn with_random(mut self, random: impl Random + Send + 'static) -> Server {
        self.random = Box::new(random);
        self
    }

    /// Turns on federation with `cfg` (peers, pins, timings). Call [`Server::start`] next.
    pub fn with_federation(mut self, cfg: FedConfig) -> Server {
        self.fed = Federation::new(cfg);
        self
    }

    /// Sets the file-transfer limits (§9).
    pub fn with_transfer_limits(mut self, limits: TransferLimits) -> Server {
        self.transfers = Transfers::new(limits);
        self
    }

    /// Hands our signatures to `signer` from now on (the net layer's pool of threads).
    pub fn set_signer(&mut self, signer: Box<dyn Signer>) {
        self.metrics.set_sign_stats(Arc::clone(signer.stats()));
        self.signer = signer;
    }

    /// The server's private key, for a signer the net layer starts.
    pub fn private_key(&self) -> &Arc<PrivateKey> {
        &self.key
    }

    /// Arms the start-up work: a dial to every configured and remembered peer, heartbeats.
    pub fn start(&mut self, now: Time) {
        self.fed_start(now);
        self.deferred.push_back(Deferred::Challenge);
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn public_key(&self) -> &Arc<PublicKey> {
        self.key.public_key()
    }

    pub fn directory(&self) -> &Directory {
        &self.dir
    }

    /// The next thing the net layer is to do, in the order the core decided them; `None` when
    /// nothing is left. The pull half of the core's API: the net layer feeds an input with
    /// [`Server::handle`], then carries out actions until this says `None`, and calls
    /// [`Server::run_deferred`] at the end of its turn.
    pub fn poll_action(&mut self) -> Option<Action> {
        let action = self.out.pop()?;
        self.metrics.frame_leaving(&action);
        Some(action)
    }

    /// Every action produced so far, in order (the actions [`Server::poll_action`] would give).
    pub fn actions(&mut self) -> impl Iterator<Item = Action> + '_ {
        std::iter::from_fn(move || self.poll_action())
    }

    /// Whether actions are waiting to be drained.
    pub fn has_actions(&self) -> bool {
        !self.out.is_empty()
    }

    /// Feeds one input.
    pub fn handle(&mut self, now: Time, input: Input<'_>) {
        match input {
            Input::Opened { conn, peer } => {
                self.sessions
                    .open(conn, State::Fresh, Some(peer), now.mono_ms);
                self.out.arm(
                    now.mono_ms + self.limits.hello_timeout_ms,
                    Timer::Hello(conn),
                );
            }
            Input::Text { conn, text } => self.on_text(now, conn, text),
            Input::Binary { conn } => {
                self.metrics.frame_received(None);
                let err = WireError::new(ErrorCode::UnknownType, "binary frames are not supported");
                self.reject(now, conn, err);
            }
            Input::TooLarge { conn } => {
                let detail = format!("frame larger than {} bytes", self.limits.max_message_size);
                self.error(now, conn, &WireError::new(ErrorCode::BadKey, detail));
                self.close(now, conn, close::TOO_BIG, "message too big");
            }
            Input::Closed { conn } => self.forget(now, conn),
            Input::Dialled { conn, target } => self.on_dialled(now, conn, target),
            Input::DialFailed { target, reason } => self.on_dial_failed(now, target, &reason),
            Input::Timer(Timer::Redial(target)) => self.on_redial(now, target),
            Input::Timer(Timer::Welcome(conn)) => self.on_welcome_deadline(now, conn),
            Input::Timer(Timer::Heartbeat) => self.on_heartbeat(now),
            Input::Timer(Timer::Transfers) => self.on_transfer_sweep(now),
            Input::Timer(Timer::Channel) => self.on_channel_timer(now),
            Input::Timer(Timer::Hello(conn)) => {
                if self.sessions.is_pending(conn) {
                    info!("conn {}: hello not completed in time, closing", conn);
                    let err = WireError::new(ErrorCode::Timeout, "hello not completed in time");
                    self.error(now, conn, &err);
                    self.close(now, conn, close::POLICY, "hello timeout");
                }
            }
        }
    }

    /// Closes every connection with 1001 and saves what must survive a restart.
    pub fn shutdown(&mut self, now: Time) {
        // Links closed from here on are not redialled (§4.4 is about peers, not this stop).
        self.fed_stop();
        for conn in self.sessions.ids() {
            self.close(now, conn, close::GOING_AWAY, "server shutting down");
        }
        if let Err(e) = self
            .store
            .set_public_channel_version(self.channel.version())
        {
            warn!("could not save the public channel version: {e}");
        }
        if let Err(e) = self.store.checkpoint() {
            warn!("database checkpoint failed: {e}");
        }
    }

    // ---------------------------------------------------------------- dispatch

    fn on_text(&mut self, now: Time, conn: ConnId, text: &str) {
        enum Session {
            Unauthenticated,
            User(String),
            Dialling(u32),
            Peer(String),
        }
        let session = match self.state(conn) {
            None => return,
            Some(State::User { user_id }) => Session::User(user_id.clone()),
            Some(State::Dialling { target }) => Session::Dialling(*target),
            Some(State::Peer { server_id }) => Session::Peer(server_id.clone()),
            Some(_) => Session::Unauthenticated,
        };
        let env = match Envelope::parse(text) {
            Ok(env) => env,
            Err(err) => {
                self.metrics.frame_received(None);
                return self.reject(now, conn, err);
            }
        };
        self.metrics.frame_received(Some(&env.kind));
        debug!("conn {}: {} from {:?}", conn, env.kind, env.from);
        let result = match session {
            Session::Unauthenticated => self.on_unauthenticated(now, conn, &env),
            Session::User(user_id) if env.from != user_id => Err(WireError::new(
                ErrorCode::InvalidSig,
                "sender does not match session",
            )),
            Session::User(user_id) => self.on_user_frame(now, conn, &user_id, &env),
            Session::Dialling(target) => self.on_dialling_frame(now, conn, target, &env),
            Session::Peer(server_id) => self.on_peer_frame(now, &server_id, &env, text),
        };
        if let Err(err) = result {
            self.error(now, conn, &err);
        }
    }

    /// Frames before the hello completes (§1, §5.2).
    fn on_unauthenticated(
        &mut self,
        now: Time,
        conn: ConnId,
        env: &Envelope,
    ) -> Result<(), WireError> {
        let fresh = self.sessions.is_fresh(conn);
        match UserFrame::parse(env) {
            UserFrame::Hello(hello) => {
                // Each hello costs a challenge signature: after a connection's first, each
                // spends its login budget (§5.3), so one connection cannot keep the signers
                // busy. A refused one leaves the connection as it was.
                if !fresh && self.spend_conn_login(now, conn).is_none() {
                    info!("conn {conn}: hellos rate-limited");
                    self.metrics.login_rate_limited();
                    return Err(WireError::new(
                        ErrorCode::BadKey,
                        "too many hellos on this connection; wait and try again",
                    ));
                }
                self.set_state(conn, State::UserPending);
                self.on_user_hello(now, conn, hello?, fresh)
            }
            UserFrame::AuthResponse(resp) if !fresh => self.on_auth_response(now, conn, env, resp),
            UserFrame::ServerHello if fresh => {
                self.on_server_hello(now, conn, env);
                Ok(())
            }
            UserFrame::Register(register) => {
                self.set_state(conn, State::UserPending);
                self.on_register(now, conn, env, register?)
            }
            UserFrame::Login(login) => {
                self.set_state(conn, State::UserPending);
                self.on_login(now, conn, login?)
            }
            _ if fresh => {
                let err = WireError::new(
                    ErrorCode::InvalidSig,
                    "first frame must be USER_HELLO, USER_REGISTER, USER_LOGIN, \
                     SERVER_HELLO_JOIN or SERVER_HELLO_LINK",
                );
                self.reject_first(now, conn, err);
                Ok(())
            }
            _ => Err(WireError::new(
                ErrorCode::InvalidSig,
                "not authenticated: complete USER_HELLO first",
            )),
        }
    }

    /// Frames from an authenticated user (§5.4).
    fn on_user_frame(
        &mut self,
        now: Time,
        conn: ConnId,
        user_id: &str,
        env: &Envelope,
    ) -> Result<(), WireError> {
        match UserFrame::parse(env) {
            UserFrame::Direct(msg) => self.on_user_message(now, user_id, env.ts, msg?, false),
            UserFrame::PublicChannel(msg) => self.on_user_message(now, user_id, env.ts, msg?, true),
            UserFrame::File(file) => self.on_user_file(now, conn, user_id, env, file?),
            UserFrame::ListRequest => {
                self.send_list(now, conn, user_id);
                Ok(())
            }
            UserFrame::CtrlClose => {
                self.close(now, conn, close::NORMAL, "bye");
                Ok(())
            }
            UserFrame::Hello(_)
            | UserFrame::AuthResponse(_)
            | UserFrame::Register(_)
            | UserFrame::Login(_) => Err(WireError::new(
                ErrorCode::NameInUse,
                "already authenticated on this connection",
            )),
            UserFrame::ServerHello | UserFrame::Unknown(_) => Err(unknown_type(&env.kind)),
        }
    }

    // ---------------------------------------------------------------- hello (§5.2)

    /// `first`: the connection's first frame (only then is anything signed ahead for it).
    fn on_user_hello(
        &mut self,
        now: Time,
        conn: ConnId,
        hello: Hello<'_>,
        first: bool,
    ) -> Result<(), WireError> {
        let Hello { user_id, hello } = hello;
        let pubkey = self.parse_key("pubkey", hello.pubkey)?;
        if let Some(enc) = hello.enc_pubkey
            && self.parse_key("enc_pubkey", enc)? != pubkey
        {
            return Err(WireError::field(
                "enc_pubkey",
                "must be the same key as pubkey (one pair serves both, §5.1)",
            ));
        }
        self.check_binding(user_id, &pubkey)?;
        if self.dir.get(user_id).is_some() {
            return self.name_in_use(now, conn);
        }
        // A registered account owns its name (names are unique per server): another user id
        // may not call itself that.
        if let Some(Value::String(name)) = hello.meta.get("display_name")
            && let Some(account) = self
                .store
                .user_by_display_name(name)
                .map_err(|e| store_error(&e))?
            && account.user_id != user_id
        {
            let err = WireError::new(
                ErrorCode::NameInUse,
                format!("display name {name} belongs to a registered account"),
            );
            self.error(now, conn, &err);
            self.close(now, conn, close::POLICY, "display name taken");
            return Ok(());
        }
        // A challenge signed ahead of need, if there is one; the next is signed once this
        // one is on its way, while the user signs its answer.
        let challenge = self.sessions.take_challenge();
        let Some((nonce, signed)) = challenge.or_else(|| self.new_challenge()) else {
            return Err(WireError::new(
                ErrorCode::Timeout,
                "cannot sign a challenge",
            ));
        };
        self.deferred.push_back(Deferred::Challenge);
        let text = signed.frame(types::AUTH_CHALLENGE, &self.id, user_id, now.wall_ms);
        self.out.send(conn, text);
        let early = first
            .then(|| self.sign_early(now, user_id, &pubkey, &hello.meta))
            .flatten();
        self.set_state(
            conn,
            State::Challenged(Box::new(Challenge::new(
                sessions::Hello {
                    user_id: user_id.to_string(),
                    pubkey,
                    meta: hello.meta,
                    peer_sig: hello.peer_sig,
                },
                nonce,
                early,
            ))),
        );
        Ok(())
    }

    /// The newcomer's advert and `USER_HELLO_ACK`, signed while it signs its answer, if a
    /// signer is idle and nothing waits. Everyone else waits for the advert once the answer
    /// verifies: made now, it leaves one signature in a row on that path instead of two (the
    /// newcomer's, then ours). Neither payload depends on the answer; if it never comes or
    /// does not verify, neither is sent. This spends idle signers only, and only for a
    /// connection's first hello: a hello never answered costs up to two more signatures when
    /// the signers had nothing else to do, none when they are busy (a login storm gets the
    /// first hellos' only), and another hello on the same connection none.
    fn sign_early(
        &self,
        now: Time,
        user_id: &str,
        pubkey: &PublicKey,
        meta: &Map<String, Value>,
    ) -> Option<Early> {
        if !self.signer.spare() {
            return None;
        }
        let mut advert = Directory::user_json(user_id, &self.id, pubkey, meta);
        advert["ts"] = Value::from(now.wall_ms);
        Some(Early {
            advert: self.sign(&advert, Urgency::Bulk)?,
            ack: self.sign(&self.ack_payload(user_id), Urgency::Bulk)?,
            ts: now.wall_ms,
            removes: self.own_removes,
        })
    }

    /// The `USER_HELLO_ACK` payload `{user_id, server_id}` (§5.2 step 4).
    fn ack_payload(&self, user_id: &str) -> Value {
        json!({"user_id": user_id, "server_id": self.id})
    }

    /// A fresh `AUTH_CHALLENGE` payload `{nonce, server_id, server_pubkey}` (§5.2 step 2),
    /// signed. It names no user, so it can be made before anyone asks for it.
    fn new_challenge(&mut self) -> Option<(String, Signed)> {
        let mut nonce = [0; 32];
        self.random.fill(&mut nonce);
        let nonce = crate::wire::b64::encode(&nonce);
        let payload = json!({
            "nonce": nonce,
            "server_id": self.id,
            "server_pubkey": self.key.public_key().encoded(),
        });
        Some((nonce, self.sign(&payload, Urgency::Bulk)?))
    }

    fn on_auth_response(
        &mut self,
        now: Time,
        conn: ConnId,
        env: &Envelope,
        resp: Payload<AuthResponse<'_>>,
    ) -> Result<(), WireError> {
        // The nonce is single-use: whatever happens next, the challenge is consumed.
        let Some(State::Challenged(ch)) = self.sessions.take_state(conn, State::UserPending) else {
            return Err(WireError::new(
                ErrorCode::InvalidSig,
                "no challenge outstanding: send USER_HELLO first",
            ));
        };
        let resp = resp?;
        let from_ok = env.from.is_empty() || env.from == ch.user_id();
        if resp.nonce != ch.nonce()
            || resp.server_id != self.id
            || resp.user_id != ch.user_id()
            || !from_ok
        {
            return Err(WireError::new(
                ErrorCode::InvalidSig,
                "AUTH_RESPONSE does not match the challenge",
            ));
        }
        let verified = wire::verify_payload_sig(ch.pubkey(), &env.payload, &env.sig)?;
        if !verified {
            info!(
                "conn {}: AUTH_RESPONSE signature for {} does not verify",
                conn,
                ch.user_id()
            );
            return Err(WireError::new(
                ErrorCode::InvalidSig,
                "AUTH_RESPONSE signature does not verify",
            ));
        }
        // Re-check: another connection may have completed a hello for this id meanwhile.
        if self.dir.get(ch.user_id()).is_some() {
            return self.name_in_use(now, conn);
        }
        let record = UserRecord {
            user_id: ch.user_id().to_string(),
            pubkey: ch.pubkey().encoded().to_string(),
            privkey_store: String::new(),
            pake_password: String::new(),
            meta: Value::Object(ch.meta().clone()),
            version: 1,
        };
        if let Err(e) = self.store.bind_user(&record) {
            return Err(store_error(&e));
        }
        let (hello, early) = ch.into_hello();
        self.user_online(now, conn, hello, early);
        Ok(())
    }

    /// Step 4 of the hello: acknowledge, send the directory snapshot, tell everyone else.
    ///
    /// With `early` (see [`Server::sign_early`]) the advert and the ack signed during the
    /// challenge are sent. The advert's signed `ts` is then the hello's: it may be sent only
    /// if we signed no `USER_REMOVE` of ours since, since one could be this user's, from a
    /// login and leave on another connection completed in between, and peers order presence
    /// by `ts` (§7). Otherwise a fresh one is signed, as without `early`.
    fn user_online(
        &mut self,
        now: Time,
        conn: ConnId,
        hello: sessions::Hello,
        early: Option<Early>,
    ) {
        let sessions::Hello {
            user_id,
            pubkey,
            meta,
            peer_sig,
        } = hello;
        let name = user_name(&user_id, meta.get("display_name").and_then(Value::as_str));
        info!("user {name} online (conn {})", conn);
        self.sessions.set_peer_sig(conn, peer_sig);
        self.set_state(
            conn,
            State::User {
                user_id: user_id.clone(),
            },
        );
        let (early_advert, early_ack) = match early {
            Some(e) if e.removes == self.own_removes => (Some((e.advert, e.ts)), Some(e.ack)),
            Some(e) => (None, Some(e.ack)),
            None => (None, None),
        };
        self.dir.insert(
            &user_id,
            Entry {
                server_id: self.id.clone(),
                local: Some(conn),
                pubkey,
                meta,
                advert: None,
                // The refreshes count from the advert's own `ts`.
                advertised_ms: early_advert.as_ref().map_or(now.wall_ms, |(_, ts)| *ts),
            },
        );
        self.channel.bump();
        // The advert first: everyone else waits for it, and it is what presence latency
        // measures. The newcomer's own frames follow.
        let advert = match early_advert {
            Some((advert, _)) => Some(advert),
            None => self.advert(now, &user_id, Urgency::Bulk),
        };
        if let Some(advert) = advert {
            let text = self.own_broadcast(now, types::USER_ADVERTISE, &advert);
            self.broadcast(text.in_lane(Lane::presence(&user_id)), Some(conn), None);
        }
        // The newcomer's own frames, in this order before anything else reaches it (§7: no
        // other frame before its snapshot). The two snapshots are written at the end of the
        // turn, shared by every newcomer of the turn (see `burst`).
        if let Some(ack) =
            early_ack.or_else(|| self.sign(&self.ack_payload(&user_id), Urgency::Bulk))
        {
            let text = ack.frame(types::USER_HELLO_ACK, &self.id, &user_id, now.wall_ms);
            self.out.send(conn, text);
        }
        self.send_list(now, conn, &user_id);
        self.send_channel_snapshot(now, conn, &user_id);
        self.channel_changed(now, Some(&user_id));
    }

    /// A signed `USER_ADVERTISE` of local user `user_id` now: `{user_id, server_id, pubkey,
    /// meta, ts}` (§7). The signed `ts` orders presence and dates it for the peers' freshness
    /// window and seen-cache (§6), so an advert is never reused: a copy a peer saw before
    /// would be dropped as a duplicate.
    pub(crate) fn advert(&self, now: Time, user_id: &str, urgency: Urgency) -> Option<Signed> {
        let entry = self.dir.get(user_id).filter(|e| e.local.is_some())?;
        let mut payload = Directory::entry_json(user_id, entry);
        payload["ts"] = Value::from(now.wall_ms);
        self.sign(&payload, urgency)
    }

    /// Whether work is waiting for [`Server::run_deferred`].
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty() || (!self.burst.is_empty() && self.snapshots_signed())
    }

    /// Whether the last directory and channel snapshots are signed. Until they are, newcomers'
    /// snapshots wait (see [`Server::run_deferred`]): a login storm is then answered in as many
    /// snapshots as the signers can make, not one per turn of the loop, which with signing
    /// off the loop is short.
    fn snapshots_signed(&self) -> bool {
        fn signed<V>(cache: &Option<(V, Signed)>) -> bool {
            cache.as_ref().is_none_or(|(_, s)| s.sig().is_some())
        }
        signed(&self.list_cache) && signed(&self.snapshot_cache)
    }

    /// The end of a turn: the net layer calls this once it has handled the inputs of one
    /// readiness pass (a bounded slice). Writes the snapshots handed out during the turn —
    /// one `LIST_RESPONSE` payload and one `PUBLIC_CHANNEL_SNAPSHOT` payload, each signed
    /// once, for every newcomer of the turn — and signs challenges ahead of need. While the
    /// last snapshots are still being signed, newcomers wait for the next ones, so that a storm
    /// is answered in as few as the signers can make ([`Server::has_deferred`] says when).
    ///
    /// A snapshot written here is newer than its place in the newcomer's order: the presence
    /// changes in between also reach the newcomer, after it, and each is idempotent (an
    /// advert for a user listed, a removal for one not listed), so the newcomer ends where
    /// everyone else does (§7).
    pub fn run_deferred(&mut self, _now: Time) {
        if !self.burst.is_empty() && self.snapshots_signed() {
            let burst = std::mem::take(&mut self.burst);
            let list = burst
                .iter()
                .any(|(k, _)| *k == BurstKind::List)
                .then(|| self.list_payload())
                .flatten();
            let snapshot = burst
                .iter()
                .any(|(k, _)| *k == BurstKind::Snapshot)
                .then(|| self.snapshot_payload())
                .flatten();
            for (kind, slot) in burst {
                let signed = match kind {
                    BurstKind::List => &list,
                    BurstKind::Snapshot => &snapshot,
                };
                match signed {
                    Some(signed) => signed.attach(slot),
                    // Cannot happen (strings and integers only); the frame is never sent,
                    // and holds back its connection until the connection closes.
                    None => warn!("a snapshot could not be built"),
                }
            }
        }
        while let Some(work) = self.deferred.pop_front() {
            match work {
                Deferred::Challenge => {
                    if self.sessions.wants_challenge()
                        && let Some(ready) = self.new_challenge()
                    {
                        self.sessions.add_challenge(ready);
                    }
                }
            }
        }
    }

    fn name_in_use(&mut self, now: Time, conn: ConnId) -> Result<(), WireError> {
        let err = WireError::new(ErrorCode::NameInUse, "user id already online");
        self.error(now, conn, &err);
        self.close(now, conn, close::POLICY, "user id already online");
        Ok(())
    }

    /// §5.2: a user id, once bound to a key on this server, keeps that key.
    /// §7: nor may a hello here take the id of a user first seen elsewhere with another key.
    fn check_binding(&mut self, user_id: &str, pubkey: &Arc<PublicKey>) -> Result<(), WireError> {
        let known = self
            .store
            .known_user_key(user_id)
            .map_err(|e| store_error(&e))?;
        let Some(known) = known else {
            return Ok(());
        };
        match self.keys.get(&known) {
            Ok(bound) if bound == *pubkey => Ok(()),
            Ok(_) => Err(WireError::new(
                ErrorCode::BadKey,
                "user id is bound to another key (here, or as the mesh knows it)",
            )),
            Err(e) => {
                warn!("stored key of {user_id} does not parse: {e}");
                Err(WireError::new(
                    ErrorCode::BadKey,
                    "user id is bound to another key (here, or as the mesh knows it)",
                ))
            }
        }
    }

    // ---------------------------------------------------------------- messages (§5.4, §6, §8)

    fn on_user_message(
        &mut self,
        now: Time,
        user_id: &str,
        ts: i64,
        msg: Addressed<'_, UserMessage<'_>>,
        public: bool,
    ) -> Result<(), WireError> {
        let Addressed { to, body: msg } = msg;
        let sender_pub = self.parse_key("sender_pub", msg.sender_pub)?;
        let own = self.dir.get(user_id).map(|e| e.pubkey.clone());
        if own.as_ref() != Some(&sender_pub) {
            return Err(WireError::field("sender_pub", "is not your key"));
        }
        let mut payload = Map::new();
        payload.insert("ciphertext".into(), Value::from(msg.ciphertext));
        payload.insert("sender".into(), Value::from(user_id));
        payload.insert("sender_pub".into(), Value::from(msg.sender_pub));
        payload.insert("content_sig".into(), Value::from(msg.content_sig));
        payload.insert("ts".into(), Value::from(ts));
        let (local_kind, server_kind) = if public {
            (types::MSG_PUBLIC_CHANNEL, types::MSG_PUBLIC_CHANNEL)
        } else {
            (types::USER_DELIVER, types::SERVER_DELIVER)
        };
        self.route(now, to, local_kind, server_kind, payload)
    }

    /// `FILE_START` / `FILE_CHUNK` / `FILE_END` (§9): routed like a DM, the user's payload plus
    /// `sender` and `ts`.
    fn on_user_file(
        &mut self,
        now: Time,
        conn: ConnId,
        user_id: &str,
        env: &Envelope,
        file: FileFrame<'_>,
    ) -> Result<(), WireError> {
        // Errors name the file, so the sender knows which transfer failed.
        let name_file =
            |e: WireError| WireError::new(e.code, format!("file {}: {}", file.file_id, e.detail));
        self.transfer_check(now, conn, user_id, &file)
            .map_err(name_file)?;
        // The user's payload is forwarded as it is (§9): it is canonical, as every payload
        // that passed Envelope::parse is.
        let mut payload = env.payload.clone();
        payload.insert("sender".into(), Value::from(user_id));
        payload.insert("ts".into(), Value::from(env.ts));
        let kind = file.kind();
        match self.route(now, file.to, kind, kind, payload) {
            Ok(()) => {
                self.transfer_routed(now, conn, user_id, &file);
                Ok(())
            }
            Err(e) => {
                self.transfer_failed(user_id, &file);
                Err(name_file(e))
            }
        }
    }

    /// `route(target, frame)` of §6 for a frame from a local user to user `target`.
    /// `payload` is the form the recipient gets; the server-to-server form adds `user_id`.
    fn route(
        &mut self,
        now: Time,
        target: &str,
        local_kind: &str,
        server_kind: &str,
        mut payload: Map<String, Value>,
    ) -> Result<(), WireError> {
        let not_found = || {
            WireError::new(
                ErrorCode::UserNotFound,
                format!("user {target} is not online"),
            )
        };
        let Some(entry) = self.dir.get(target) else {
            return Err(not_found());
        };
        // 1. a local user.
        if let Some(dest) = entry.local {
            self.route_signed(now, dest, local_kind, target, &Value::Object(payload));
            return Ok(());
        }
        // 2./3. the hosting server, over its link or by flooding every link.
        let host = entry.server_id.clone();
        payload.insert("user_id".into(), Value::from(target));
        let lane = Lane::for_sender(payload.get("sender").and_then(Value::as_str));
        let Some(signed) = self.sign(&Value::Object(payload), Urgency::Conversation) else {
            return Err(not_found());
        };
        let text = signed
            .frame(server_kind, &self.id, &host, now.wall_ms)
            .in_lane(lane);
        if self.route_toward(&host, text, None) {
            Ok(())
        } else {
            Err(not_found())
        }
    }

    /// Signs `payload` and sends it to one connection as a frame `route()` carries for the
    /// input's sender: flow-controlled (see [`Action::Route`]).
    pub(crate) fn route_signed(
        &mut self,
        now: Time,
        conn: ConnId,
        kind: &str,
        to: &str,
        payload: &Value,
    ) {
        if let Some(text) = self.signed_frame(now, kind, to, payload, Urgency::Conversation) {
            let sender = payload.get("sender").and_then(Value::as_str);
            let text = text.in_lane(Lane::for_sender(sender));
            self.out.route(conn, text);
        }
    }

    /// `LIST_RESPONSE` (§5.5): every user online anywhere and, for clients that take other
    /// servers' signatures (§5.6), the key of every server we pin. One payload for everyone,
    /// signed once per (directory version, pinned servers).
    /// Its payload is written at the end of the turn (see [`Server::run_deferred`]).
    pub(crate) fn send_list(&mut self, now: Time, conn: ConnId, to: &str) {
        self.send_burst(now, conn, to, BurstKind::List);
    }

    /// `PUBLIC_CHANNEL_SNAPSHOT` (§8): the channel's version and members, written at the end
    /// of the turn like `LIST_RESPONSE`.
    fn send_channel_snapshot(&mut self, now: Time, conn: ConnId, to: &str) {
        self.send_burst(now, conn, to, BurstKind::Snapshot);
    }

    fn send_burst(&mut self, now: Time, conn: ConnId, to: &str, kind: BurstKind) {
        let frame_type = match kind {
            BurstKind::List => types::LIST_RESPONSE,
            BurstKind::Snapshot => types::PUBLIC_CHANNEL_SNAPSHOT,
        };
        let slot = Slot::new(frame_type, &self.id, to, now.wall_ms);
        self.burst.push((kind, Arc::clone(&slot)));
        let text = Frame::pending(slot);
        self.out.send(conn, text);
    }

    /// The `LIST_RESPONSE` payload now, signed once per (directory version, pinned servers).
    fn list_payload(&mut self) -> Option<Signed> {
        let version = (self.dir.version(), self.fed.pins_version());
        if let Some((v, signed)) = &self.list_cache
            && *v == version
        {
            return Some(signed.clone());
        }
        let servers = self.fed.pinned_keys();
        let canonical = match self.dir.list_canonical(version.0, &servers) {
            Ok(c) => c,
            Err(e) => {
                warn!("cannot build LIST_RESPONSE: {e}");
                return None;
            }
        };
        let signed = Signed::pending(canonical);
        self.signer.submit(&signed, Urgency::Bulk);
        self.list_cache = Some((version, signed.clone()));
        Some(signed)
    }

    /// The `PUBLIC_CHANNEL_SNAPSHOT` payload now, signed once per (channel, directory) version.
    fn snapshot_payload(&mut self) -> Option<Signed> {
        let version = (self.channel.version(), self.dir.version());
        if let Some((v, signed)) = &self.snapshot_cache
            && *v == version
        {
            return Some(signed.clone());
        }
        let members: Vec<&str> = self.dir.user_ids().collect();
        let payload = json!({"version": self.channel.version(), "members": members});
        let signed = self.sign(&payload, Urgency::Bulk)?;
        self.snapshot_cache = Some((version, signed.clone()));
        Some(signed)
    }

    // ---------------------------------------------------------------- connections

    /// The connection is gone: forget it, and tell whoever needs to know (§4.4, §7).
    fn forget(&mut self, now: Time, conn: ConnId) {
        let Some(old) = self.sessions.remove(conn) else {
            return;
        };
        match old {
            State::User { user_id } => {
                let id = self.id.clone();
                if let Some(entry) = self.dir.remove_if_hosted_by(&user_id, &id) {
                    let name = user_name(&user_id, entry.display_name());
                    info!("user {name} offline (conn {})", conn);
                    self.transfers_user_gone(now, &user_id);
                    // The signed `ts` orders it after the user's advert (§7).
                    let payload =
                        json!({"user_id": user_id, "server_id": self.id, "ts": now.wall_ms});
                    self.own_removes += 1;
                    if let Some(signed) = self.sign(&payload, Urgency::Bulk) {
                        let text = self.own_broadcast(now, types::USER_REMOVE, &signed);
                        self.broadcast(text.in_lane(Lane::presence(&user_id)), None, None);
                    }
                    self.channel.bump();
                    self.channel_changed(now, None);
                }
            }
            State::Dialling { target } => self.dial_ended(now, target, "connection closed"),
            State::Peer { server_id } => self.link_down(now, conn, &server_id),
            _ => {}
        }
    }

    pub(crate) fn close(&mut self, now: Time, conn: ConnId, code: CloseCode, reason: &'static str) {
        if self.sessions.contains(conn) {
            self.forget(now, conn);
            self.out.close(conn, code, reason);
        }
    }

    pub(crate) fn state(&self, conn: ConnId) -> Option<&State> {
        self.sessions.state(conn)
    }

    pub(crate) fn set_state(&mut self, conn: ConnId, state: State) {
        self.sessions.set_state(conn, state);
    }

    /// Starts tracking a connection we dialled, in `state`.
    pub(crate) fn open_conn(&mut self, now: Time, conn: ConnId, state: State) {
        self.sessions.open(conn, state, None, now.mono_ms);
    }

    /// One login attempt against the connection's own budget (§5.3): where it comes from, if
    /// it may try (see [`Sessions::spend_login`]).
    pub(crate) fn spend_conn_login(&mut self, now: Time, conn: ConnId) -> Option<IpAddr> {
        self.sessions.spend_login(conn, now.mono_ms)
    }

    /// How many connections are pending, users and links.
    pub(crate) fn conn_counts(&self) -> sessions::Counts {
        self.sessions.census()
    }

    /// The users who take other servers' signatures (§5.6): connection and user id.
    pub(crate) fn peer_sig_users(&self) -> Vec<(ConnId, String)> {
        self.sessions.peer_sig_users()
    }

    /// The key `text` encodes, from the cache of parsed keys.
    pub(crate) fn cached_key(
        &mut self,
        text: &str,
    ) -> Result<Arc<PublicKey>, crate::crypto::CryptoError> {
        self.keys.get(text)
    }

    /// Fills `buf` from the core's random source (see [`crate::core::random`]).
    pub(crate) fn fill_random(&mut self, buf: &mut [u8]) {
        self.random.fill(buf);
    }

    pub(crate) fn parse_key(
        &mut self,
        field: &str,
        text: &str,
    ) -> Result<Arc<PublicKey>, WireError> {
        self.keys
            .get(text)
            .map_err(|e| WireError::field(field, &e.to_string()))
    }

    // ---------------------------------------------------------------- sending

    /// Signs `payload` and sends it to one connection.
    pub(crate) fn send_signed(
        &mut self,
        now: Time,
        conn: ConnId,
        kind: &str,
        to: &str,
        payload: &Value,
        urgency: Urgency,
    ) {
        if let Some(text) = self.signed_frame(now, kind, to, payload, urgency) {
            self.out.send(conn, text);
        }
    }

    /// One frame from us, `payload` signed (see [`Server::sign`]).
    fn signed_frame(
        &self,
        now: Time,
        kind: &str,
        to: &str,
        payload: &Value,
        urgency: Urgency,
    ) -> Option<Frame> {
        let signed = self.sign(payload, urgency)?;
        Some(signed.frame(kind, &self.id, to, now.wall_ms))
    }

    /// Sends one frame to every local user but `except_user` and every linked server but
    /// `except_link`: one signature, one encoding, shared by every recipient.
    pub(crate) fn broadcast(
        &mut self,
        text: Frame,
        except_user: Option<ConnId>,
        except_link: Option<&str>,
    ) {
        // Links first: the other servers still have work to do (verify, re-sign, fan out),
        // which then overlaps with our writes to local users.
        let users = self.dir.local_conns().filter(|c| Some(*c) != except_user);
        let targets: Vec<ConnId> = self.fed.link_conns(except_link).chain(users).collect();
        self.out.broadcast(targets, &text);
    }

    /// Encodes a broadcast (`to: "*"`) that we originate. (A copy the mesh floods back to us
    /// is dropped by its `from`, before the seen-cache.)
    pub(crate) fn own_broadcast(&self, now: Time, kind: &str, signed: &Signed) -> Frame {
        signed.frame(kind, &self.id, "*", now.wall_ms)
    }

    /// Sends a frame (`to: "*"`) to every local user: `payload` signed by us, or, to users who
    /// take frames signed by other servers (§5.6), `original` — the frame a linked server
    /// signed, unchanged. Nothing is signed when every local user takes `original`.
    pub(crate) fn broadcast_local(
        &mut self,
        now: Time,
        kind: &str,
        payload: &Value,
        original: Option<&str>,
        urgency: Urgency,
    ) {
        let lane = payload
            .get("user_id")
            .and_then(Value::as_str)
            .map_or(Lane::Ordered, Lane::presence);
        let mut resigned = Vec::new();
        let mut unchanged = Vec::new();
        for conn in self.dir.local_conns() {
            match original {
                Some(_) if self.is_peer_sig(conn) => unchanged.push(conn),
                _ => resigned.push(conn),
            }
        }
        if let Some(original) = original.filter(|_| !unchanged.is_empty()) {
            let text = Frame::from(original.to_string()).in_lane(lane);
            self.out.broadcast(unchanged, &text);
        }
        if resigned.is_empty() {
            return;
        }
        let Some(signed) = self.sign(payload, urgency) else {
            return;
        };
        let text = signed.frame(kind, &self.id, "*", now.wall_ms).in_lane(lane);
        self.out.broadcast(resigned, &text);
    }

    /// Whether `conn` is a user who announced `peer-sig` (§5.6).
    pub(crate) fn is_peer_sig(&self, conn: ConnId) -> bool {
        self.sessions.is_peer_sig(conn)
    }

    /// Signs a payload we send (§3.4). Every payload the core builds holds only strings,
    /// integers, arrays and objects, and every payload it takes from a frame passed the edge's
    /// check for non-integer numbers ([`Envelope::parse`], §3.3), so this cannot fail; if it
    /// ever did, the frame is not sent and the bug is logged instead of crashing the server.
    /// The signature is made by the [`Signer`], now or later: frames made from the result
    /// are complete once it is.
    pub(crate) fn sign(&self, payload: &Value, urgency: Urgency) -> Option<Signed> {
        match crate::wire::canon::canonical(payload) {
            Ok(canonical) => {
                let signed = Signed::pending(canonical);
                self.signer.submit(&signed, urgency);
                Some(signed)
            }
            Err(e) => {
                log::error!("not sending a payload without a canonical form ({e}): a bug");
                None
            }
        }
    }

    /// Sends `ERROR {code, detail}` while the connection's error budget lasts (§10).
    pub(crate) fn error(&mut self, now: Time, conn: ConnId, err: &WireError) {
        match self.sessions.spend_error(conn, now.mono_ms) {
            None => return,
            Some(true) => {}
            Some(false) => {
                debug!("conn {}: error budget spent, not answering {err}", conn);
                self.metrics.error_unsent();
                return;
            }
        }
        // An error to a linked server is addressed to it, never "" (§6).
        let to = match self.sessions.state(conn) {
            None => return,
            Some(State::User { user_id }) => user_id.clone(),
            Some(State::Challenged(ch)) => ch.user_id().to_string(),
            Some(State::Peer { server_id }) => server_id.clone(),
            Some(State::Dialling { target }) => self.fed.target_id(*target).unwrap_or_default(),
            Some(_) => String::new(),
        };
        let payload = json!({"code": err.code.as_str(), "detail": err.detail});
        let Ok(canonical) = crate::wire::canon::canonical(&payload) else {
            return; // strings only: cannot happen
        };
        let signed = match self.error_sigs.0.get(&canonical) {
            Some(signed) => signed.clone(),
            None => {
                let signed = Signed::pending(canonical.clone());
                self.signer.submit(&signed, Urgency::Conversation);
                if self.error_sigs.0.len() >= ERROR_SIG_CACHE {
                    self.error_sigs.0.clear();
                }
                self.error_sigs.0.insert(canonical, signed.clone());
                signed
            }
        };
        let text = signed.frame(types::ERROR, &self.id, &to, now.wall_ms);
        self.metrics.error_sent(err.code);
        self.out.send(conn, text);
    }

    /// An error that also closes: a bad first frame (§1).
    fn reject_first(&mut self, now: Time, conn: ConnId, err: WireError) {
        self.error(now, conn, &err);
        self.close(now, conn, close::POLICY, "bad first frame");
    }

    /// An error for a frame the connection should not have sent; closes only a fresh one.
    fn reject(&mut self, now: Time, conn: ConnId, err: WireError) {
        if self.sessions.is_fresh(conn) {
            self.reject_first(now, conn, err);
        } else {
            self.error(now, conn, &err);
        }
    }
}

/// How the log names a user: `alice (id 5c0e…)` by the display name it chose (escaped: it is
/// the user's text), or its id alone when it has none or they are the same.
pub(crate) fn user_name(user_id: &str, display_name: Option<&str>) -> String {
    match display_name {
        Some(name) if !name.is_empty() && name != user_id => {
            let name: String = name.chars().take(64).flat_map(char::escape_debug).collect();
            format!("{name} (id {user_id})")
        }
        _ => user_id.to_string(),
    }
}

pub(crate) fn store_error(e: &crate::core::persist::PersistError) -> WireError {
    match e {
        crate::core::persist::PersistError::Conflict(what) => {
            WireError::new(ErrorCode::BadKey, what.as_str())
        }
        other => {
            warn!("storage error: {other}");
            WireError::new(ErrorCode::Timeout, "storage unavailable, try again")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_are_the_websocket_numbers() {
        let codes = [
            close::NORMAL,
            close::GOING_AWAY,
            close::POLICY,
            close::TOO_BIG,
        ];
        assert_eq!(codes.map(u16::from), [1000, 1001, 1008, 1009]);
    }
}
