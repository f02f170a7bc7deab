//! Federation: links between servers, presence across the mesh, and routing (PROTOCOL.md §4,
//! §6, §7, §8). This is part of the sans-IO core: the `impl Server` methods here are fed by the
//! same inputs and answer with the same actions. They are glue: the state is [`Federation`]'s
//! components, each with private fields, called with what they need:
//!
//! - `dialling`: the peers we dial, backoff with jitter, and the failure log (what to dial,
//!   when to redial, what the operator has been told).
//! - `links`: the live link to each server (one per pair), the pinned servers, the pins
//!   version, the signed heartbeat.
//! - `relay`: the seen-cache, the newest presence per user, the announces handed to new
//!   links, the public-channel news not yet told.
//!
//! The glue holds what needs the rest of the server (the outbox, the signer, the store, the
//! directory): here the dials, hellos, links and heartbeats, and in `inbound` the frames that
//! come over a link:
//!
//! - **Pins** (§4.2): a server may link only if its key is pinned — given in `--bootstrap`,
//!   remembered in the database, listed in a `SERVER_WELCOME` from a pinned server, or announced
//!   (`SERVER_ANNOUNCE`) over a link to a pinned server. `--open-join` accepts anyone.
//! - **Targets**: every peer we dial. A dial that fails, a welcome that does not come, and a
//!   link that dies all lead to a redial with exponential backoff and jitter, for ever (§4.4).
//! - **One link per pair**: the link dialled by the server with the smaller id wins.
//! - **Frames from peers** go through: pinned key of `from` → dedup (§6) → signature → handler.
//!   Dedup is checked before verifying but recorded only after, so a forgery cannot shadow the
//!   real frame.
//! - **Presence to local users** is re-signed by this server (one signature per event), so a
//!   client verifies everything with the one server key it pinned.

mod dialling;
mod inbound;
mod links;
mod relay;

pub use dialling::{FailureLog, SUMMARY_EVERY_ATTEMPTS, SUMMARY_EVERY_MS, failure_log};

use crate::core::persist::ServerRecord;
use crate::core::server::{ConnId, Server, State, Time, Timer, close};
use crate::core::signer::Urgency;
use crate::crypto::PublicKey;
use crate::wire::frame::{Frame, Lane};
use crate::wire::peer::{PeerFrame, port_of};
use crate::wire::{self, Envelope, ErrorCode, Fields, WireError, types};
use dialling::Dialling;
use links::{Admit, Links};
use log::{debug, info, warn};
use relay::Relay;
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// A peer given on the command line: where to dial it and the key we pin for it.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub host: String,
    pub port: u16,
    /// Dialled with `wss://` (its `--bootstrap` URL said so).
    pub tls: bool,
    pub key: Arc<PublicKey>,
}

/// Federation settings. Durations in milliseconds.
#[derive(Debug, Clone)]
pub struct FedConfig {
    /// Where peers can reach us: sent in our hellos and announces.
    pub advertise_host: String,
    pub advertise_port: u16,
    /// Peers dialled at start, with their pinned keys.
    pub bootstrap: Vec<PeerSpec>,
    /// Dial servers learned of from others, or remembered, with `wss://`: announces and the
    /// store carry host and port only, so their scheme is this one setting (`--peer-scheme`).
    /// A bootstrap peer keeps the scheme of its URL. Default off.
    pub peer_tls: bool,
    /// Accept links from servers whose key is not pinned (introducer mode). Default off.
    pub open_join: bool,
    /// Dial every server we learn of (full mesh). Off: dial only bootstrap peers.
    pub mesh: bool,
    /// `HEARTBEAT` interval. Default 15 000.
    pub heartbeat_ms: u64,
    /// A link silent this long is dead. Default 45 000.
    pub dead_after_ms: u64,
    /// How long a dialled peer has to send `SERVER_WELCOME`. Default 10 000.
    pub welcome_timeout_ms: u64,
    /// First retry delay; doubles per failed attempt. Default 1 000.
    pub backoff_base_ms: u64,
    /// Retry delay cap. Default 60 000.
    pub backoff_max_ms: u64,
    /// Dedup age window, and the largest accepted `ts` skew. Default 300 000 (5 minutes).
    pub dedup_window_ms: u64,
    /// Most entries in the dedup cache. Default 200 000.
    pub dedup_max_entries: usize,
    /// Seed of the backoff jitter.
    pub rng_seed: u64,
}

impl Default for FedConfig {
    fn default() -> Self {
        FedConfig {
            advertise_host: "127.0.0.1".into(),
            advertise_port: 8765,
            bootstrap: Vec::new(),
            peer_tls: false,
            open_join: false,
            mesh: true,
            heartbeat_ms: 15_000,
            dead_after_ms: 45_000,
            welcome_timeout_ms: 10_000,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
            dedup_window_ms: 300_000,
            dedup_max_entries: 200_000,
            rng_seed: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

/// A server's address as a URL. Announces carry no scheme: an address learned of is shown as
/// `ws://` (see `FedConfig::peer_tls` for how it is dialled).
fn ws_url(host: &str, port: u16) -> String {
    peer_url(false, host, port)
}

fn peer_url(tls: bool, host: &str, port: u16) -> String {
    let scheme = if tls { "wss" } else { "ws" };
    if host.contains(':') {
        format!("{scheme}://[{host}]:{port}")
    } else {
        format!("{scheme}://{host}:{port}")
    }
}

/// Federation state owned by the core: its settings and three components, each with private
/// state, that the `impl Server` glue below calls.
#[derive(Debug)]
pub struct Federation {
    cfg: FedConfig,
    dialling: Dialling,
    links: Links,
    relay: Relay,
}

/// Membership changes of the public channel are told to the other servers at most once per
/// this many ms (§8: `PUBLIC_CHANNEL_ADD`, then `PUBLIC_CHANNEL_UPDATED`). Batched, they cost
/// two signatures per burst of logins and logouts instead of up to two per login, and they
/// stay out of the moments where a login's own frames are signed and sent. Nothing waits
/// for them: members are the online users, which travel as presence at once.
pub const CHANNEL_BATCH_MS: u64 = 100;

/// The fewest of our users' adverts refreshed per heartbeat when any are due (see
/// `Server::refresh_adverts`).
const REFRESH_AT_LEAST: usize = 64;

impl Federation {
    pub fn new(cfg: FedConfig) -> Federation {
        Federation {
            dialling: Dialling::new(&cfg),
            links: Links::default(),
            relay: Relay::new(&cfg),
            cfg,
        }
    }

    /// Grows whenever a server's pinned key is added or changed.
    pub(crate) fn pins_version(&self) -> u64 {
        self.links.pins_version()
    }

    /// Every pinned server's id and key (encoded), sorted by id: `LIST_RESPONSE.servers` (§5.6).
    pub(crate) fn pinned_keys(&self) -> Vec<(&str, &str)> {
        self.links.pinned_keys()
    }

    /// The server id of dial target `t`, once known.
    pub(crate) fn target_id(&self, t: u32) -> Option<String> {
        self.dialling.target_id(t)
    }

    /// Connections of every live link but `except`.
    pub(crate) fn link_conns<'a>(
        &'a self,
        except: Option<&'a str>,
    ) -> impl Iterator<Item = ConnId> + 'a {
        self.links.conns(except)
    }

    /// Ids of the servers we have a live link to, sorted.
    pub fn linked(&self) -> Vec<&str> {
        self.links.linked()
    }

    /// Whether `key` belongs to a pinned server or a bootstrap peer.
    fn is_pinned_key(&self, key: &PublicKey) -> bool {
        self.dialling.has_key(key) || self.links.has_key(key)
    }
}

impl Server {
    // ------------------------------------------------------------ start and dialling (§4.4)

    pub(crate) fn fed_start(&mut self, now: Time) {
        // §6 *Across restarts*: frames seen before a restart are still duplicates.
        match self.store.seen_entries(now.wall_ms) {
            Ok(entries) => {
                for (key, until) in entries {
                    self.fed.relay.restore_seen(key, until);
                }
            }
            Err(e) => warn!("could not read the seen-cache: {e}"),
        }
        match self.store.servers() {
            Ok(records) => {
                let id = self.id.clone();
                for rec in records
                    .into_iter()
                    .filter(|r| r.pinned && r.server_id != id)
                {
                    match self.cached_key(&rec.pubkey) {
                        Ok(key) => self
                            .fed
                            .links
                            .restore(rec.server_id, key, rec.host, rec.port),
                        Err(e) => warn!("stored key of server {} is unusable: {e}", rec.server_id),
                    }
                }
            }
            Err(e) => warn!("could not read known servers: {e}"),
        }
        // Remembered servers first, so the operator's --bootstrap address wins for a key that
        // is both remembered and given.
        if self.fed.cfg.mesh {
            for (id, host, port, key) in self.fed.links.known() {
                self.fed
                    .dialling
                    .add_target(Some(&id), &host, port, &key, None);
            }
        }
        for spec in self.fed.cfg.bootstrap.clone() {
            let id = self.fed.links.id_of_key(&spec.key);
            self.fed.dialling.add_target(
                id.as_deref(),
                &spec.host,
                spec.port,
                &spec.key,
                Some(spec.tls),
            );
        }
        for t in self.fed.dialling.all() {
            self.out.arm(now.mono_ms, Timer::Redial(t));
        }
        self.out
            .arm(now.mono_ms + self.fed.cfg.heartbeat_ms, Timer::Heartbeat);
    }

    /// Dials a server we learned of, unless it is linked or we only dial bootstrap peers.
    fn ensure_target(&mut self, now: Time, id: &str, host: &str, port: u16, key: &Arc<PublicKey>) {
        if !self.fed.cfg.mesh || self.fed.links.is_linked(id) {
            return;
        }
        if let Some(t) = self
            .fed
            .dialling
            .add_target(Some(id), host, port, key, None)
        {
            self.out.arm(now.mono_ms, Timer::Redial(t));
        }
    }

    /// A graceful shutdown has begun: links that close are not redialled, and nothing armed
    /// before dials again.
    pub(crate) fn fed_stop(&mut self) {
        self.fed.dialling.stop();
    }

    pub(crate) fn on_redial(&mut self, _now: Time, t: u32) {
        let links = &self.fed.links;
        if let Some(dial) = self.fed.dialling.redial(t, |id| links.is_linked(id)) {
            self.out.dial(t, dial.host, dial.port, dial.tls);
        }
    }

    pub(crate) fn on_dial_failed(&mut self, now: Time, t: u32, reason: &str) {
        self.dial_ended(now, t, reason);
    }

    /// A dial or a link handshake for target `t` ended without a link: logged, and the next
    /// attempt armed (see `Dialling::dial_ended`).
    pub(crate) fn dial_ended(&mut self, now: Time, t: u32, reason: &str) {
        let ended = self
            .fed
            .dialling
            .dial_ended(now.mono_ms, now.wall_ms, t, reason);
        if let Some(delay) = ended {
            self.out.arm(now.mono_ms + delay, Timer::Redial(t));
        }
    }

    /// Our dial connected: open with `SERVER_HELLO_JOIN` and wait for the welcome (§4.3).
    pub(crate) fn on_dialled(&mut self, now: Time, conn: ConnId, t: u32) {
        let Some(to) = self.fed.dialling.address(t) else {
            return;
        };
        if self.fed.dialling.is_stopping() {
            self.out
                .close(conn, close::GOING_AWAY, "server shutting down");
            return;
        }
        self.open_conn(now, conn, State::Dialling { target: t });
        let payload = self.hello_payload();
        self.send_signed(
            now,
            conn,
            types::SERVER_HELLO_JOIN,
            &to,
            &payload,
            Urgency::Conversation,
        );
        self.out.arm(
            now.mono_ms + self.fed.cfg.welcome_timeout_ms,
            Timer::Welcome(conn),
        );
    }

    fn hello_payload(&self) -> Value {
        json!({
            "host": self.fed.cfg.advertise_host,
            "port": self.fed.cfg.advertise_port,
            "pubkey": self.public_key().encoded(),
        })
    }

    pub(crate) fn on_welcome_deadline(&mut self, now: Time, conn: ConnId) {
        if let Some(&State::Dialling { target }) = self.state(conn) {
            let why = format!(
                "no SERVER_WELCOME within {} ms",
                self.fed.cfg.welcome_timeout_ms
            );
            debug!("conn {conn}: {why}");
            self.fed.dialling.note_failure(target, why);
            self.close(now, conn, close::NORMAL, "welcome timeout");
        }
    }

    /// Frames on a connection we dialled, before the welcome: only `SERVER_WELCOME` counts.
    pub(crate) fn on_dialling_frame(
        &mut self,
        now: Time,
        conn: ConnId,
        t: u32,
        env: &Envelope,
    ) -> Result<(), WireError> {
        match PeerFrame::parse(env) {
            PeerFrame::Welcome => {
                self.on_welcome(now, conn, t, env);
                Ok(())
            }
            PeerFrame::Error { detail, .. } => {
                debug!("conn {conn}: peer refused our hello: {detail}");
                self.fed
                    .dialling
                    .note_failure(t, format!("peer refused our hello: {detail}"));
                Ok(())
            }
            _ => Err(WireError::new(
                ErrorCode::InvalidSig,
                "expected SERVER_WELCOME",
            )),
        }
    }

    fn on_welcome(&mut self, now: Time, conn: ConnId, t: u32, env: &Envelope) {
        let Some(expected) = self.fed.dialling.expected(t) else {
            // Not reached (targets are never removed); were it, the link must not hang.
            return self.close(now, conn, close::POLICY, "unknown dial target");
        };
        let (key, host, port, url) = (expected.key, expected.host, expected.port, expected.url);
        let from = env.from.as_str();
        let refuse = |server: &mut Server, why: &str| {
            // Logged at warn with the failure, once per run (see `dial_ended`).
            debug!("SERVER_WELCOME from {url} refused: {why}");
            server
                .fed
                .dialling
                .note_failure(t, format!("SERVER_WELCOME refused: {why}"));
            server.close(now, conn, close::POLICY, "bad welcome");
        };
        if !crate::wire::ids::is_valid_id(from) || from == self.id {
            return refuse(self, "malformed or colliding server id");
        }
        if !matches!(
            wire::verify_payload_sig(&key, &env.payload, &env.sig),
            Ok(true)
        ) {
            return refuse(self, "signature does not verify against the pinned key");
        }
        if self.fed.links.key_of(from).is_some_and(|k| k != key) {
            return refuse(self, "its id is pinned to another key");
        }
        if let Ok(assigned) = env.fields().str("assigned_id")
            && assigned != self.id
        {
            warn!(
                "peer {from} assigned us id {assigned:?}; keeping {}",
                self.id
            );
        }
        // The welcome is verified: what it lists is worth learning even if this link loses the
        // one-link-per-pair race (the surviving link was dialled by the other side).
        let from = from.to_string();
        self.link_up(now, conn, &from, true, &host, port, &key);
        if let Some(Value::Array(servers)) = env.payload.get("servers") {
            for s in servers {
                if let Some(s) = s.as_object() {
                    self.learn_server(now, s, &from);
                }
            }
        }
        if let Some(Value::Array(clients)) = env.payload.get("clients") {
            for c in clients {
                if let Some(c) = c.as_object()
                    && let Err(e) = self.learn_remote_user(now, c, &from, None)
                {
                    info!("SERVER_WELCOME from {from}: {}", e.detail);
                }
            }
        }
    }

    // ------------------------------------------------------------ being dialled (§4.3)

    pub(crate) fn on_server_hello(&mut self, now: Time, conn: ConnId, env: &Envelope) {
        if let Err(err) = self.accept_server_hello(now, conn, env) {
            info!("conn {conn}: {} refused: {}", env.kind, err.detail);
            self.error(now, conn, &err);
            self.close(now, conn, close::POLICY, "link refused");
        }
    }

    fn accept_server_hello(
        &mut self,
        now: Time,
        conn: ConnId,
        env: &Envelope,
    ) -> Result<(), WireError> {
        let from = env.from.as_str();
        wire::check_id("from", from)?;
        let f = env.fields();
        let host = f.str("host")?.to_string();
        let port = port_of(f)?;
        let key = self.parse_key("pubkey", f.str("pubkey")?)?;
        if !wire::verify_payload_sig(&key, &env.payload, &env.sig)? {
            return Err(WireError::new(
                ErrorCode::InvalidSig,
                "hello signature does not verify with the key it carries",
            ));
        }
        if from == self.id {
            return Err(WireError::new(
                ErrorCode::BadKey,
                "that is this server's id",
            ));
        }
        match self.fed.links.key_of(from) {
            Some(k) if k != key => {
                return Err(WireError::new(
                    ErrorCode::BadKey,
                    "key does not match the one pinned for this server id",
                ));
            }
            Some(_) => {}
            None if self.fed.is_pinned_key(&key) || self.fed.cfg.open_join => {}
            None => {
                return Err(WireError::new(
                    ErrorCode::BadKey,
                    "server key not pinned here (give it with --bootstrap, or run --open-join)",
                ));
            }
        }
        info!(
            "server {from} (ws://{host}:{port}) dialled us: {}",
            env.kind
        );
        if env.kind == types::SERVER_HELLO_JOIN {
            let servers = self.fed.links.welcome_servers(from);
            let welcome = json!({
                "assigned_id": from,
                "servers": servers,
                "clients": self.dir.list_json(),
            });
            self.send_signed(
                now,
                conn,
                types::SERVER_WELCOME,
                from,
                &welcome,
                Urgency::Conversation,
            );
        }
        self.link_up(now, conn, from, false, &host, port, &key);
        Ok(())
    }

    // ------------------------------------------------------------ links

    /// A link to `server_id` is up on `conn`. Keeps one link per pair (the one dialled by the
    /// smaller id); returns false when this one lost and was closed.
    #[allow(clippy::too_many_arguments)]
    fn link_up(
        &mut self,
        now: Time,
        conn: ConnId,
        server_id: &str,
        dialled_by_us: bool,
        host: &str,
        port: u16,
        key: &Arc<PublicKey>,
    ) -> bool {
        match self.fed.links.admit(&self.id, server_id, dialled_by_us) {
            Admit::New => {}
            Admit::Loses => {
                self.close(now, conn, close::NORMAL, "duplicate link");
                return false;
            }
            Admit::Replaces(old_conn) => self.close(now, old_conn, close::NORMAL, "duplicate link"),
        }
        self.set_state(
            conn,
            State::Peer {
                server_id: server_id.to_string(),
            },
        );
        self.fed
            .links
            .insert(server_id, conn, dialled_by_us, now.mono_ms);
        self.pin_server(now, server_id, host, port, key);
        // In a mesh, a server we do not dial yet becomes a target: redialled if the link drops.
        let remember = self.fed.cfg.mesh;
        let told = self
            .fed
            .dialling
            .linked(server_id, host, port, key, remember);
        let by = if dialled_by_us { "us" } else { "them" };
        let url = ws_url(host, port);
        if let Some(failed) = told {
            // The operator was told it was down or unreachable: tell them it is back, at the
            // same level.
            let after = match failed {
                0 => String::new(),
                1 => " after 1 failed attempt".into(),
                n => format!(" after {n} failed attempts"),
            };
            warn!("link up with server {server_id} at {url} (dialled by {by}){after}: back");
        } else {
            info!("link up with server {server_id} at {url} (dialled by {by})");
        }

        // §4.3: tell every linked server where we are — first, so the new peer can verify what
        // follows even when it learns of us only now. Then give the new peer the latest
        // announce of every other server we know, unchanged: in a mesh that is not full, that
        // is how servers two hops apart learn each other's keys whatever the start order.
        self.announce_self(now);
        let relayed = self.fed.relay.announces_except(&[server_id, &self.id]);
        for text in relayed {
            self.out.send(conn, text);
        }

        // §4.3: after the link is up, our directory of online users, as USER_ADVERTISE, each
        // signed afresh: the peer may have seen an earlier advert of the same user before a
        // link went down, and its seen-cache (§6) would drop that payload as a duplicate.
        let users: Vec<String> = self.dir.local_users().map(str::to_string).collect();
        for user_id in users {
            if let Some(signed) = self.advert(now, &user_id, Urgency::Bulk) {
                let text = self.own_broadcast(now, types::USER_ADVERTISE, &signed);
                let text = text.in_lane(Lane::presence(&user_id));
                self.out.send(conn, text);
            }
        }
        // … and the users behind other servers: only their hosting server may sign their
        // presence (§6 *Who may sign*), so each goes as the newest advert that server signed,
        // unchanged, as a broadcast is forwarded (§6) — the announces above let the peer verify
        // it. Without this, users learned while this link was down (in a partial mesh, before
        // it first came up) would never reach the peer (§7 *Login-order independence*). A copy
        // the peer has seen is a duplicate to it; one older than the peer's newest presence for
        // that user is ignored there (§7 `ts`); a user who left is gone from our directory, and
        // its advert with it.
        for advert in self.dir.remote_adverts(server_id) {
            self.out.send(conn, Frame::from(advert));
        }
        let payload = json!({"version": self.channel.version(), "wraps": []});
        if let Some(signed) = self.sign(&payload, Urgency::Conversation) {
            let text = self.own_broadcast(now, types::PUBLIC_CHANNEL_UPDATED, &signed);
            self.out.send(conn, text);
        }
        true
    }

    /// The link to `server_id` on `conn` is gone: its users go offline here, and we redial.
    pub(crate) fn link_down(&mut self, now: Time, conn: ConnId, server_id: &str) {
        if !self.fed.links.remove(server_id, conn) {
            return; // a duplicate that lost; the surviving link stands
        }
        let url = self
            .fed
            .links
            .url_of(server_id)
            .unwrap_or_else(|| "address unknown".into());
        let gone = self.dir.users_hosted_by(server_id);
        for user_id in &gone {
            if self.dir.remove_if_hosted_by(user_id, server_id).is_some() {
                let payload = json!({"user_id": user_id, "server_id": server_id});
                self.broadcast_local(now, types::USER_REMOVE, &payload, None, Urgency::Bulk);
                self.transfers_user_gone(now, user_id);
            }
        }
        if !gone.is_empty() {
            self.channel.bump();
        }
        let offline = match gone.len() {
            0 => String::new(),
            1 => "; 1 user behind it now offline".into(),
            n => format!("; {n} users behind it now offline"),
        };
        if self.fed.dialling.is_stopping() {
            info!("link to server {server_id} down ({url}): shutting down{offline}");
            return;
        }
        let key = self.fed.links.key_of(server_id);
        let redials = self.fed.dialling.link_lost(server_id, key.as_ref());
        let next = if redials.is_empty() {
            "not redialled (not a peer we dial)"
        } else {
            "redialling"
        };
        warn!("link to server {server_id} down ({url}){offline}; {next}");
        for (t, delay) in redials {
            self.out.arm(now.mono_ms + delay, Timer::Redial(t));
        }
    }

    /// Pins `server_id` to `key` at `host:port` and saves it; unchanged entries cost nothing.
    /// A new key is told at once to the users who take other servers' signatures (§5.6), before
    /// any frame that server signed can reach them.
    fn pin_server(
        &mut self,
        now: Time,
        server_id: &str,
        host: &str,
        port: u16,
        key: &Arc<PublicKey>,
    ) {
        let Some(new_key) = self.fed.links.pin(server_id, host, port, key) else {
            return;
        };
        let record = ServerRecord {
            server_id: server_id.to_string(),
            host: host.to_string(),
            port,
            pubkey: key.encoded().to_string(),
            pinned: true,
        };
        if let Err(e) = self.store.upsert_server(&record) {
            warn!("could not save server {server_id}: {e}");
        }
        if new_key {
            self.tell_servers(now);
        }
    }

    /// Sends a fresh `LIST_RESPONSE` (with `servers`, §5.6) to every user who takes other
    /// servers' signatures.
    fn tell_servers(&mut self, now: Time) {
        for (conn, user_id) in self.peer_sig_users() {
            self.send_list(now, conn, &user_id);
        }
    }

    /// A server named in a `SERVER_WELCOME` from `via` (which vouches for it).
    fn learn_server(&mut self, now: Time, entry: &Map<String, Value>, via: &str) {
        let f = Fields(entry);
        let (Ok(id), Ok(host), Ok(port), Ok(pubkey)) = (
            f.id("server_id"),
            f.str("host"),
            port_of(f),
            f.str("pubkey"),
        ) else {
            return debug!("ignoring a malformed server entry from {via}");
        };
        if id == self.id {
            return;
        }
        let key = match self.cached_key(pubkey) {
            Ok(k) => k,
            Err(e) => return warn!("server {id} listed by {via} has an unusable key: {e}"),
        };
        if self.fed.links.key_of(id).is_some_and(|k| k != key) {
            return warn!("{via} lists server {id} with a key other than the pinned one");
        }
        let (id, host) = (id.to_string(), host.to_string());
        self.pin_server(now, &id, &host, port, &key);
        self.ensure_target(now, &id, &host, port, &key);
    }

    // ------------------------------------------------------------ sending between servers

    /// Sends `text` toward server `host`: over its link, else to every link (§6 steps 2–3),
    /// never to `except`. Returns whether it went anywhere. Only for frames `route()` carries
    /// (a delivery, a channel copy, a file frame, or one relayed unchanged): they are
    /// flow-controlled ([`Action::Route`](crate::core::server::Action::Route)), unlike broadcasts to every link.
    pub(crate) fn route_toward(&mut self, host: &str, text: Frame, except: Option<&str>) -> bool {
        let conns: Vec<ConnId> = match self.fed.links.conn_of(host) {
            Some(conn) if Some(host) != except => vec![conn],
            _ => self.fed.links.conns(except).collect(),
        };
        for &conn in &conns {
            self.out.route(conn, text.clone());
        }
        !conns.is_empty()
    }

    /// Sends `text` to every linked server but `except`; returns how many.
    fn send_links(&mut self, text: Frame, except: Option<&str>) -> usize {
        let conns: Vec<ConnId> = self.fed.links.conns(except).collect();
        self.out.broadcast(conns.iter().copied(), &text);
        conns.len()
    }

    /// Forwards a broadcast unchanged to every link but the one it came from (§6).
    fn forward(&mut self, text: &str, came_from: &str) {
        if self.fed.links.len() > 1 {
            self.send_links(Frame::from(text.to_string()), Some(came_from));
        }
    }

    /// The public channel changed (its version was just bumped; `added` logged in here): the
    /// linked servers hear of it within [`CHANNEL_BATCH_MS`], together with any other change.
    pub(crate) fn channel_changed(&mut self, now: Time, added: Option<&str>) {
        if self.fed.links.is_empty() {
            return; // a link that comes up gets the version then (link_up)
        }
        let if_version = self.channel.version() - 1;
        if self.fed.relay.channel_changed(if_version, added) {
            self.out.arm(now.mono_ms + CHANNEL_BATCH_MS, Timer::Channel);
        }
    }

    /// [`Timer::Channel`]: tells linked servers about the channel changes since the last time
    /// (§8): one `PUBLIC_CHANNEL_ADD` for the users who joined and are still online, then
    /// `PUBLIC_CHANNEL_UPDATED` with the version now.
    pub(crate) fn on_channel_timer(&mut self, now: Time) {
        let Some(news) = self.fed.relay.take_channel_news() else {
            return;
        };
        if self.fed.links.is_empty() {
            return;
        }
        let mut added = news.added;
        added.retain(|id| self.dir.get(id).is_some_and(|e| e.local.is_some()));
        if !added.is_empty() {
            let payload = json!({"add": added, "if_version": news.if_version});
            if let Some(signed) = self.sign(&payload, Urgency::Bulk) {
                let text = self.own_broadcast(now, types::PUBLIC_CHANNEL_ADD, &signed);
                self.send_links(text, None);
            }
        }
        let version = self.channel.version();
        let payload = json!({"version": version, "wraps": []});
        if let Some(signed) = self.sign(&payload, Urgency::Bulk) {
            let text = self.own_broadcast(now, types::PUBLIC_CHANNEL_UPDATED, &signed);
            self.send_links(text, None);
        }
    }

    /// Heartbeats to every link; links silent too long are declared dead (§4.4).
    pub(crate) fn on_heartbeat(&mut self, now: Time) {
        let dead_after = self.fed.cfg.dead_after_ms;
        let dead = self.fed.links.silent(now.mono_ms, dead_after);
        for (id, conn, silent) in dead {
            warn!("link to server {id} silent for {silent} ms: declaring it dead");
            self.close(now, conn, close::GOING_AWAY, "link dead");
        }
        if !self.fed.links.is_empty()
            && let Some(signed) = self
                .fed
                .links
                .heartbeat()
                .or_else(|| self.sign(&json!({}), Urgency::Conversation))
        {
            self.fed.links.set_heartbeat(signed.clone());
            for (id, conn) in self.fed.links.all() {
                let text = signed.frame(types::HEARTBEAT, &self.id, &id, now.wall_ms);
                self.out.send(conn, text);
            }
        }
        if let Err(e) = self.store.forget_seen(now.wall_ms) {
            warn!("could not prune the saved seen-cache: {e}");
        }
        if self.fed.relay.announce_due() && !self.fed.links.is_empty() {
            self.announce_self(now);
        }
        if !self.fed.links.is_empty() {
            self.refresh_adverts(now);
        }
        self.out
            .arm(now.mono_ms + self.fed.cfg.heartbeat_ms, Timer::Heartbeat);
    }
}
