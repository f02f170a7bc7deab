//! Federation: links between servers, presence across the mesh, and routing (PROTOCOL.md §4,
//! §6, §7, §8). This is part of the sans-IO core: these are `impl Server` methods, fed by the
//! same inputs and answering with the same actions.
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

use crate::core::dedup::{self, SeenCache, Stale};
use crate::core::directory::{Directory, Entry};
use crate::core::persist::ServerRecord;
use crate::core::server::{ConnId, Server, State, Time, Timer, close};
use crate::core::signer::Urgency;
use crate::crypto::PublicKey;
use crate::wire::canon;
use crate::wire::frame::{Frame, Lane, Signed};
use crate::wire::peer::{Announce, Delivery, PeerFrame, Presence, Route, port_of};
use crate::wire::user::unknown_type;
use crate::wire::{self, Envelope, ErrorCode, Fields, Text, WireError, types};
use log::{debug, info, warn};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetState {
    /// A redial timer is armed.
    Waiting,
    /// A dial or welcome is under way.
    Dialling,
    /// Linked (by our dial or theirs).
    Linked,
}

/// A peer we keep dialling until linked.
#[derive(Debug)]
struct Target {
    id: Option<String>,
    host: String,
    port: u16,
    key: Arc<PublicKey>,
    /// Dial with `wss://`.
    tls: bool,
    /// Dials since the start or the last link: the failures in a row, once one has failed.
    attempts: u32,
    state: TargetState,
    /// What the log has said about this run of failures (see [`failure_log`]).
    report: Report,
    /// Why the dial under way failed, when the core knows better than "connection closed"
    /// (a refused hello, a bad or missing welcome).
    note: Option<String>,
}

/// What the log has said about a peer, so that it reports each change once and summarises
/// the rest (§4.4: every attempt is logged, truthfully; only the level varies).
#[derive(Debug, Default, Clone)]
struct Report {
    /// Wall time of the first failure of this run.
    failing_since_ms: i64,
    /// Failed dials in this run.
    failures: u32,
    /// The attempt of the last line at `warn` about this run (0: none yet).
    attempt: u32,
    /// When that line was logged (monotonic).
    at_ms: u64,
    /// An operator at `RUST_LOG=warn` was told the peer is down or unreachable, and not yet
    /// that it is back.
    warned: bool,
    /// A link with it has been up: a failure now follows a link that went down.
    was_linked: bool,
}

/// A repeated failure is summarised at `warn` at most once per this many attempts …
pub const SUMMARY_EVERY_ATTEMPTS: u32 = 10;
/// … and at most once per this many milliseconds.
pub const SUMMARY_EVERY_MS: u64 = 5 * 60 * 1000;

/// How a failed dial is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureLog {
    /// The first failure of a run (since the start, or since the link went down): `warn`.
    First,
    /// A summary of the failures since the last line at `warn`: `warn`.
    Summary,
    /// Any other failure: `debug` only.
    Quiet,
}

/// How to log failure number `attempt` of a run, when the last line at `warn` about it was at
/// attempt `last_reported` (0: none), `ms_since_reported` ago.
pub fn failure_log(attempt: u32, last_reported: u32, ms_since_reported: u64) -> FailureLog {
    if attempt <= 1 || last_reported == 0 {
        FailureLog::First
    } else if attempt.saturating_sub(last_reported) >= SUMMARY_EVERY_ATTEMPTS
        && ms_since_reported >= SUMMARY_EVERY_MS
    {
        FailureLog::Summary
    } else {
        FailureLog::Quiet
    }
}

impl Target {
    /// How the log names it: `srv-b (ws://10.0.0.2:9000)`, or the address alone until its id
    /// is known.
    fn name(&self) -> String {
        let url = self.url();
        match &self.id {
            Some(id) => format!("{id} ({url})"),
            None => url,
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

/// `2027-01-15 08:00:00 UTC` for a wall time in ms since the epoch.
fn utc(wall_ms: i64) -> String {
    let secs = wall_ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// A delay for the log: `1.0 s`.
fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

impl Target {
    /// `ws://host:port` or `wss://host:port`, for logs.
    fn url(&self) -> String {
        peer_url(self.tls, &self.host, self.port)
    }
}

/// A pinned server: its key, and where it says it listens.
#[derive(Debug, Clone)]
struct Known {
    key: Arc<PublicKey>,
    host: String,
    port: u16,
}

#[derive(Debug)]
struct Link {
    conn: ConnId,
    dialled_by_us: bool,
    last_rx_ms: u64,
}

/// Federation state owned by the core.
#[derive(Debug)]
pub struct Federation {
    cfg: FedConfig,
    targets: Vec<Target>,
    known: HashMap<String, Known>,
    links: HashMap<String, Link>,
    seen: SeenCache,
    rng: u64,
    /// `HEARTBEAT`'s payload `{}` never changes: signed once.
    heartbeat: Option<Signed>,
    /// The latest verified `SERVER_ANNOUNCE` of each server, as received: handed unchanged to
    /// every new link. Servers re-announce every [`REANNOUNCE_EVERY`] heartbeats, so these stay
    /// inside the peers' dedup window.
    announces: HashMap<String, Frame>,
    /// Heartbeat rounds since our last announce.
    rounds: u32,
    /// A graceful shutdown has begun: nothing is dialled or redialled any more.
    stopping: bool,
    /// Public-channel changes not yet told to the other servers (see [`CHANNEL_BATCH_MS`]).
    channel_news: Option<ChannelNews>,
    /// §7: the newest signed presence `ts` applied per (hosting server, user); older adverts
    /// and removes are ignored. Bounded like the seen-cache: an entry older than the window
    /// can go, since a frame that old is refused anyway.
    presence: HashMap<(String, String), i64>,
    /// See [`Federation::pins_version`].
    pins_version: u64,
}

/// Membership changes of the public channel are told to the other servers at most once per
/// this many ms (§8: `PUBLIC_CHANNEL_ADD`, then `PUBLIC_CHANNEL_UPDATED`). Batched, they cost
/// two signatures per burst of logins and logouts instead of up to two per login, and they
/// stay out of the moments where a login's own frames are signed and sent. Nothing waits
/// for them: members are the online users, which travel as presence at once.
pub const CHANNEL_BATCH_MS: u64 = 100;

/// Public-channel changes since the last announcement.
#[derive(Debug)]
struct ChannelNews {
    /// The channel version before the first of these changes (`if_version` of the ADD).
    if_version: i64,
    /// Users who joined (logged in here), in order.
    added: Vec<String>,
}

/// Heartbeat rounds between our periodic `SERVER_ANNOUNCE`s (8 × 15 s = 2 minutes, well inside
/// the 5-minute window in which a relayed copy is still accepted).
const REANNOUNCE_EVERY: u32 = 8;

/// The fewest of our users' adverts refreshed per heartbeat when any are due (see
/// `Server::refresh_adverts`).
const REFRESH_AT_LEAST: usize = 64;

impl Federation {
    pub fn new(cfg: FedConfig) -> Federation {
        Federation {
            seen: SeenCache::new(cfg.dedup_window_ms, cfg.dedup_max_entries),
            rng: cfg.rng_seed | 1,
            cfg,
            targets: Vec::new(),
            known: HashMap::new(),
            links: HashMap::new(),
            heartbeat: None,
            announces: HashMap::new(),
            rounds: 0,
            stopping: false,
            channel_news: None,
            presence: HashMap::new(),
            pins_version: 0,
        }
    }

    /// Grows whenever a server's pinned key is added or changed.
    pub(crate) fn pins_version(&self) -> u64 {
        self.pins_version
    }

    /// Every pinned server's id and key (encoded), sorted by id: `LIST_RESPONSE.servers` (§5.6).
    pub(crate) fn pinned_keys(&self) -> Vec<(&str, &str)> {
        let mut keys: Vec<(&str, &str)> = self
            .known
            .iter()
            .map(|(id, k)| (id.as_str(), k.key.encoded()))
            .collect();
        keys.sort_unstable();
        keys
    }

    /// The server id of dial target `t`, once known.
    pub(crate) fn target_id(&self, t: u32) -> Option<String> {
        self.targets.get(t as usize).and_then(|t| t.id.clone())
    }

    /// §7 ordering: whether presence for `user_id` from `server_id` signed at `ts` is at least
    /// as new as the newest applied; if so, it becomes the newest.
    fn presence_is_newest(&mut self, server_id: &str, user_id: &str, ts: i64, now: Time) -> bool {
        let key = (server_id.to_string(), user_id.to_string());
        if let Some(&newest) = self.presence.get(&key) {
            if ts < newest {
                return false;
            }
        } else if self.presence.len() >= self.cfg.dedup_max_entries {
            let oldest = now.wall_ms.saturating_sub(self.cfg.dedup_window_ms as i64);
            self.presence.retain(|_, t| *t >= oldest);
            if self.presence.len() >= self.cfg.dedup_max_entries {
                return true; // a flood of presence: ordered by the window and dedup alone
            }
        }
        self.presence.insert(key, ts);
        true
    }

    /// Connections of every live link but `except`.
    pub(crate) fn link_conns<'a>(
        &'a self,
        except: Option<&'a str>,
    ) -> impl Iterator<Item = ConnId> + 'a {
        self.links
            .iter()
            .filter(move |(id, _)| Some(id.as_str()) != except)
            .map(|(_, l)| l.conn)
    }

    /// Ids of the servers we have a live link to, sorted.
    pub fn linked(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.links.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    /// Backoff before attempt `attempts + 1`: base·2^(attempts−1), capped, ±20 % jitter.
    fn backoff_ms(&mut self, attempts: u32) -> u64 {
        let exp = attempts.saturating_sub(1).min(20);
        let delay = self
            .cfg
            .backoff_base_ms
            .saturating_mul(1 << exp)
            .min(self.cfg.backoff_max_ms);
        // xorshift64*: jitter needs spread, not secrecy.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11; // 53 bits
        let unit = r as f64 / (1u64 << 53) as f64; // [0, 1)
        (delay as f64 * (0.8 + 0.4 * unit)) as u64
    }

    /// Adds a dial target unless one with the same key exists (then refreshes its id and
    /// address). Returns the index of a new target. `tls`: the scheme of a bootstrap peer,
    /// which wins over an existing target's; `None` for a server learned of, dialled with
    /// `peer_tls`.
    fn add_target(
        &mut self,
        id: Option<&str>,
        host: &str,
        port: u16,
        key: &Arc<PublicKey>,
        tls: Option<bool>,
    ) -> Option<u32> {
        if let Some(t) = self.targets.iter_mut().find(|t| t.key == *key) {
            if let Some(id) = id {
                t.id = Some(id.to_string());
            }
            if !host.is_empty() && port != 0 {
                t.host = host.to_string();
                t.port = port;
            }
            if let Some(tls) = tls {
                t.tls = tls;
            }
            return None;
        }
        if host.is_empty() || port == 0 {
            return None;
        }
        self.targets.push(Target {
            id: id.map(str::to_string),
            host: host.to_string(),
            port,
            key: Arc::clone(key),
            tls: tls.unwrap_or(self.cfg.peer_tls),
            attempts: 0,
            state: TargetState::Waiting,
            report: Report::default(),
            note: None,
        });
        Some(self.targets.len() as u32 - 1)
    }

    /// Whether `key` belongs to a pinned server or a bootstrap peer.
    fn is_pinned_key(&self, key: &PublicKey) -> bool {
        self.targets.iter().any(|t| *t.key == *key) || self.known.values().any(|k| *k.key == *key)
    }
}

impl Server {
    // ------------------------------------------------------------ start and dialling (§4.4)

    pub(crate) fn fed_start(&mut self, now: Time) {
        // §6 *Across restarts*: frames seen before a restart are still duplicates.
        match self.store.seen_entries(now.wall_ms) {
            Ok(entries) => {
                for (key, until) in entries {
                    self.fed.seen.restore(key, until);
                }
            }
            Err(e) => warn!("could not read the seen-cache: {e}"),
        }
        match self.store.servers() {
            Ok(records) => {
                for rec in records
                    .into_iter()
                    .filter(|r| r.pinned && r.server_id != self.id)
                {
                    match self.keys.get(&rec.pubkey) {
                        Ok(key) => {
                            self.fed.known.insert(
                                rec.server_id,
                                Known {
                                    key,
                                    host: rec.host,
                                    port: rec.port,
                                },
                            );
                        }
                        Err(e) => warn!("stored key of server {} is unusable: {e}", rec.server_id),
                    }
                }
            }
            Err(e) => warn!("could not read known servers: {e}"),
        }
        // Remembered servers first, so the operator's --bootstrap address wins for a key that
        // is both remembered and given.
        if self.fed.cfg.mesh {
            let known: Vec<(String, Known)> = self
                .fed
                .known
                .iter()
                .map(|(i, k)| (i.clone(), k.clone()))
                .collect();
            for (id, k) in known {
                self.fed
                    .add_target(Some(&id), &k.host, k.port, &k.key, None);
            }
        }
        for spec in self.fed.cfg.bootstrap.clone() {
            let id = self
                .fed
                .known
                .iter()
                .find(|(_, k)| k.key == spec.key)
                .map(|(id, _)| id.clone());
            self.fed.add_target(
                id.as_deref(),
                &spec.host,
                spec.port,
                &spec.key,
                Some(spec.tls),
            );
        }
        for t in 0..self.fed.targets.len() as u32 {
            self.out.arm(now.mono_ms, Timer::Redial(t));
        }
        self.out
            .arm(now.mono_ms + self.fed.cfg.heartbeat_ms, Timer::Heartbeat);
    }

    /// Dials a server we learned of, unless it is linked or we only dial bootstrap peers.
    fn ensure_target(&mut self, now: Time, id: &str, host: &str, port: u16, key: &Arc<PublicKey>) {
        if !self.fed.cfg.mesh || self.fed.links.contains_key(id) {
            return;
        }
        if let Some(t) = self.fed.add_target(Some(id), host, port, key, None) {
            self.out.arm(now.mono_ms, Timer::Redial(t));
        }
    }

    /// A graceful shutdown has begun: links that close are not redialled, and nothing armed
    /// before dials again.
    pub(crate) fn fed_stop(&mut self) {
        self.fed.stopping = true;
    }

    pub(crate) fn on_redial(&mut self, _now: Time, t: u32) {
        if self.fed.stopping {
            return;
        }
        let linked = |id: &Option<String>, fed: &Federation| {
            id.as_ref().is_some_and(|id| fed.links.contains_key(id))
        };
        let Some(target) = self.fed.targets.get(t as usize) else {
            return;
        };
        if target.state != TargetState::Waiting {
            return;
        }
        if linked(&target.id, &self.fed) {
            self.fed.targets[t as usize].state = TargetState::Linked;
            return;
        }
        let target = &mut self.fed.targets[t as usize];
        target.attempts += 1;
        target.state = TargetState::Dialling;
        target.note = None;
        // The first attempt of a run at info; the retries at debug (their failures are
        // summarised, see `dial_ended`).
        let level = if target.attempts == 1 {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        log::log!(
            level,
            "dialling peer {} (attempt {})",
            target.name(),
            target.attempts
        );
        self.out
            .dial(t, target.host.clone(), target.port, target.tls);
    }

    pub(crate) fn on_dial_failed(&mut self, now: Time, t: u32, reason: &str) {
        self.dial_ended(now, t, reason);
    }

    /// A dial or a link handshake for target `t` ended without a link: log it truthfully and
    /// arm the next attempt. The first failure of a run is a warning, the next ones are logged
    /// at debug and summarised at warn (see [`failure_log`]).
    pub(crate) fn dial_ended(&mut self, now: Time, t: u32, reason: &str) {
        let Some(target) = self.fed.targets.get_mut(t as usize) else {
            return;
        };
        if target.state == TargetState::Linked {
            return;
        }
        let reason = target.note.take().unwrap_or_else(|| reason.to_string());
        let Some(delay) = self.schedule_redial(now, t) else {
            let target = &self.fed.targets[t as usize];
            info!(
                "dial to peer {} failed (attempt {}): {reason}; not retried: shutting down",
                target.name(),
                target.attempts
            );
            return;
        };
        let target = &mut self.fed.targets[t as usize];
        let (name, attempt) = (target.name(), target.attempts);
        let report = &mut target.report;
        report.failures += 1;
        let next = secs(delay);
        match failure_log(
            attempt,
            report.attempt,
            now.mono_ms.saturating_sub(report.at_ms),
        ) {
            FailureLog::First => {
                report.failing_since_ms = now.wall_ms;
                let since = if report.was_linked {
                    "; unreachable since its link went down"
                } else {
                    ""
                };
                warn!(
                    "dial to peer {name} failed (attempt {attempt}): {reason}{since}; next try \
                     in {next}; further failures are logged at debug and summarised every \
                     {SUMMARY_EVERY_ATTEMPTS} attempts"
                );
            }
            FailureLog::Summary => warn!(
                "dial to peer {name} failed (attempt {attempt}): {reason}; still unreachable \
                 after {attempt} attempts since {}; next try in {next}",
                utc(report.failing_since_ms)
            ),
            FailureLog::Quiet => {
                debug!(
                    "dial to peer {name} failed (attempt {attempt}): {reason}; next try in {next}"
                );
                return;
            }
        }
        report.attempt = attempt;
        report.at_ms = now.mono_ms;
        report.warned = true;
    }

    /// Arms the next dial of target `t`; returns its delay, or `None` while shutting down.
    fn schedule_redial(&mut self, now: Time, t: u32) -> Option<u64> {
        if self.fed.stopping {
            self.fed.targets[t as usize].state = TargetState::Waiting;
            return None;
        }
        let attempts = self.fed.targets[t as usize].attempts;
        let delay = self.fed.backoff_ms(attempts.max(1));
        self.fed.targets[t as usize].state = TargetState::Waiting;
        self.out.arm(now.mono_ms + delay, Timer::Redial(t));
        Some(delay)
    }

    /// Our dial connected: open with `SERVER_HELLO_JOIN` and wait for the welcome (§4.3).
    pub(crate) fn on_dialled(&mut self, now: Time, conn: ConnId, t: u32) {
        let Some(target) = self.fed.targets.get(t as usize) else {
            return;
        };
        if self.fed.stopping {
            self.out
                .close(conn, close::GOING_AWAY, "server shutting down");
            return;
        }
        let to = format!("{}:{}", target.host, target.port);
        self.add_conn(now, conn, State::Dialling { target: t });
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
            "pubkey": self.key.public_key().encoded(),
        })
    }

    pub(crate) fn on_welcome_deadline(&mut self, now: Time, conn: ConnId) {
        if let Some(&State::Dialling { target }) = self.state(conn) {
            let why = format!(
                "no SERVER_WELCOME within {} ms",
                self.fed.cfg.welcome_timeout_ms
            );
            debug!("conn {conn}: {why}");
            self.note_dial_failure(target, why);
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
                self.note_dial_failure(t, format!("peer refused our hello: {detail}"));
                Ok(())
            }
            _ => Err(WireError::new(
                ErrorCode::InvalidSig,
                "expected SERVER_WELCOME",
            )),
        }
    }

    /// Why the dial under way for target `t` is failing, for the line [`Server::dial_ended`]
    /// logs when its connection closes.
    fn note_dial_failure(&mut self, t: u32, why: String) {
        if let Some(target) = self.fed.targets.get_mut(t as usize) {
            target.note = Some(why);
        }
    }

    fn on_welcome(&mut self, now: Time, conn: ConnId, t: u32, env: &Envelope) {
        let target = &self.fed.targets[t as usize];
        let (key, host, port) = (Arc::clone(&target.key), target.host.clone(), target.port);
        let url = target.url();
        let from = env.from.as_str();
        let refuse = |server: &mut Server, why: &str| {
            // Logged at warn with the failure, once per run (see `dial_ended`).
            debug!("SERVER_WELCOME from {url} refused: {why}");
            server.note_dial_failure(t, format!("SERVER_WELCOME refused: {why}"));
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
        if let Some(k) = self.fed.known.get(from)
            && k.key != key
        {
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
        match self.fed.known.get(from) {
            Some(k) if k.key != key => {
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
            let servers: Vec<Value> = self
                .fed
                .links
                .keys()
                .filter(|id| id.as_str() != from)
                .filter_map(|id| {
                    self.fed.known.get(id).map(|k| {
                        json!({"server_id": id, "host": k.host, "port": k.port,
                               "pubkey": k.key.encoded()})
                    })
                })
                .collect();
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
        if let Some(old) = self.fed.links.get(server_id) {
            let we_are_smaller = self.id.as_str() < server_id;
            // Same direction: the new link replaces a stale one. Otherwise the smaller id's
            // dial wins, on both ends alike.
            let keep_new = old.dialled_by_us == dialled_by_us || dialled_by_us == we_are_smaller;
            let dialler = if we_are_smaller {
                self.id.as_str()
            } else {
                server_id
            };
            info!("two links with {server_id}: keeping the one {dialler} dialled");
            if !keep_new {
                self.close(now, conn, close::NORMAL, "duplicate link");
                return false;
            }
            let old_conn = old.conn;
            self.fed.links.remove(server_id);
            self.close(now, old_conn, close::NORMAL, "duplicate link");
        }
        self.set_state(
            conn,
            State::Peer {
                server_id: server_id.to_string(),
            },
        );
        self.fed.links.insert(
            server_id.to_string(),
            Link {
                conn,
                dialled_by_us,
                last_rx_ms: now.mono_ms,
            },
        );
        self.pin_server(now, server_id, host, port, key);
        let mut have_target = false;
        let mut failed = 0;
        let mut warned = false;
        for target in self.fed.targets.iter_mut().filter(|t| t.key == *key) {
            target.id = Some(server_id.to_string());
            target.state = TargetState::Linked;
            if target.report.warned {
                failed = failed.max(target.report.failures);
                warned = true;
            }
            target.attempts = 0;
            target.note = None;
            target.report = Report {
                was_linked: true,
                ..Report::default()
            };
            have_target = true;
        }
        if !have_target && self.fed.cfg.mesh {
            // Remember it, so we redial it too if the link drops.
            if let Some(t) = self.fed.add_target(Some(server_id), host, port, key, None) {
                self.fed.targets[t as usize].state = TargetState::Linked;
            }
        }
        let by = if dialled_by_us { "us" } else { "them" };
        let url = ws_url(host, port);
        if warned {
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
        let relayed: Vec<Frame> = self
            .fed
            .announces
            .iter()
            .filter(|(id, _)| id.as_str() != server_id && **id != self.id)
            .map(|(_, text)| text.clone())
            .collect();
        for text in relayed {
            self.out.send(conn, text);
        }

        // §4.3: after the link is up, our directory of online users, as USER_ADVERTISE, each
        // signed afresh: the peer may have seen an earlier advert of the same user before a
        // link went down, and its seen-cache (§6) would drop that payload as a duplicate.
        let users: Vec<String> = self.dir.local_users().map(str::to_string).collect();
        for user_id in users {
            if let Some(signed) = self.advert(now, &user_id) {
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
        if self.fed.links.get(server_id).map(|l| l.conn) != Some(conn) {
            return; // a duplicate that lost; the surviving link stands
        }
        self.fed.links.remove(server_id);
        let url = self
            .fed
            .known
            .get(server_id)
            .map(|k| ws_url(&k.host, k.port))
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
        if self.fed.stopping {
            info!("link to server {server_id} down ({url}): shutting down{offline}");
            return;
        }
        let key = self.fed.known.get(server_id).map(|k| Arc::clone(&k.key));
        let targets: Vec<u32> = (0..self.fed.targets.len() as u32)
            .filter(|&t| {
                let target = &self.fed.targets[t as usize];
                target.id.as_deref() == Some(server_id) || Some(&target.key) == key.as_ref()
            })
            .collect();
        let next = if targets.is_empty() {
            "not redialled (not a peer we dial)"
        } else {
            "redialling"
        };
        warn!("link to server {server_id} down ({url}){offline}; {next}");
        for t in targets {
            let target = &mut self.fed.targets[t as usize];
            target.attempts = 0;
            target.state = TargetState::Dialling;
            target.report = Report {
                warned: true,
                was_linked: true,
                ..Report::default()
            };
            self.schedule_redial(now, t);
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
        let old_key = self.fed.known.get(server_id).map(|k| Arc::clone(&k.key));
        if let Some(k) = self.fed.known.get(server_id)
            && k.key == *key
            && k.host == host
            && k.port == port
        {
            return;
        }
        self.fed.known.insert(
            server_id.to_string(),
            Known {
                key: Arc::clone(key),
                host: host.to_string(),
                port,
            },
        );
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
        if old_key.as_ref() != Some(key) {
            self.fed.pins_version += 1;
            self.tell_servers(now);
        }
    }

    /// Sends a fresh `LIST_RESPONSE` (with `servers`, §5.6) to every user who takes other
    /// servers' signatures.
    fn tell_servers(&mut self, now: Time) {
        let users: Vec<(ConnId, String)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.peer_sig)
            .filter_map(|(conn, c)| match &c.state {
                State::User { user_id } => Some((*conn, user_id.clone())),
                _ => None,
            })
            .collect();
        for (conn, user_id) in users {
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
        let key = match self.keys.get(pubkey) {
            Ok(k) => k,
            Err(e) => return warn!("server {id} listed by {via} has an unusable key: {e}"),
        };
        if let Some(k) = self.fed.known.get(id)
            && k.key != key
        {
            return warn!("{via} lists server {id} with a key other than the pinned one");
        }
        let (id, host) = (id.to_string(), host.to_string());
        self.pin_server(now, &id, &host, port, &key);
        self.ensure_target(now, &id, &host, port, &key);
    }

    /// Records a remote user `{user_id, server_id, pubkey, meta}` told by server `sender`, and
    /// tells local users. An entry without `server_id` is hosted by `sender` (§4.3 *Accept*);
    /// an `advert` (`Some((frame text, link it came on))`) must be, and is forwarded to the
    /// other links once it is accepted, before it is re-signed for local users (§7). Refused, and logged (§7 *A user stays where it is*): a claim
    /// on a user hosted by another live linked server, and a key other than the one this
    /// server knows for the id (bound here, or first seen from the mesh).
    fn learn_remote_user(
        &mut self,
        now: Time,
        entry: &Map<String, Value>,
        sender: &str,
        advert: Option<(&str, &str)>,
    ) -> Result<(), WireError> {
        let f = Fields(entry);
        let user_id = f.id("user_id")?;
        let server_id = match entry.get("server_id") {
            None => sender,
            Some(_) => f.id("server_id")?,
        };
        if advert.is_some() && server_id != sender {
            return Err(WireError::new(
                ErrorCode::InvalidSig,
                "USER_ADVERTISE server_id differs from its sender",
            ));
        }
        if server_id == self.id {
            return Ok(());
        }
        let meta = entry
            .get("meta")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        // *Accept*: the key at the top or inside meta (§7).
        let Some(key_text) = f
            .str("pubkey")
            .ok()
            .or_else(|| meta.get("pubkey").and_then(Value::as_str))
        else {
            return Err(WireError::field("pubkey", "missing"));
        };
        let pubkey = self.parse_key("pubkey", key_text)?;
        if let Some(existing) = self.dir.get(user_id) {
            if existing.local.is_some() {
                info!("server {sender} claims user {user_id}, who is online here: refused");
                return Err(WireError::new(
                    ErrorCode::NameInUse,
                    format!("user {user_id} is online at server {}", self.id),
                ));
            }
            if existing.server_id != server_id && self.fed.links.contains_key(&existing.server_id) {
                warn!(
                    "server {sender} claims user {user_id} for server {server_id}, but live \
                     server {} hosts it: refused",
                    existing.server_id
                );
                return Err(WireError::new(
                    ErrorCode::NameInUse,
                    format!("user {user_id} is online at server {}", existing.server_id),
                ));
            }
            if existing.pubkey == pubkey && existing.server_id == server_id && existing.meta == meta
            {
                // Nothing new here; a server behind us may not know it yet. This advert (at
                // least as new as the last, §7) is the one a new link gets from now on.
                if let Some((text, link)) = advert {
                    self.dir.set_advert(user_id, Text::from(text.to_string()));
                    self.forward(text, link);
                }
                return Ok(());
            }
        }
        self.check_user_key(user_id, &pubkey, sender)?;
        let entry = Entry {
            server_id: server_id.to_string(),
            local: None,
            pubkey,
            meta,
            advert: advert.map(|(text, _)| Text::from(text.to_string())),
            advertised_ms: 0,
        };
        let relay = Directory::entry_json(user_id, &entry);
        self.dir.insert(user_id, entry);
        debug!("user {user_id} online at server {server_id}");
        // Forward first: the other servers' work then overlaps with ours.
        if let Some((text, link)) = advert {
            self.forward(text, link);
        }
        let original = advert.map(|(text, _)| text);
        self.broadcast_local(now, types::USER_ADVERTISE, &relay, original, Urgency::Bulk);
        Ok(())
    }

    /// §7: a user id's key, once known here, does not change through gossip. The first key
    /// seen for a remote user is remembered in the database, so a restart does not forget it.
    fn check_user_key(
        &mut self,
        user_id: &str,
        pubkey: &Arc<PublicKey>,
        sender: &str,
    ) -> Result<(), WireError> {
        let refused = |why: &str| {
            warn!("server {sender} gave user {user_id} another key than {why}: refused");
            Err(WireError::new(
                ErrorCode::BadKey,
                format!("user {user_id} has another key"),
            ))
        };
        if let Some(known) = self.dir.get(user_id) {
            return if known.pubkey == *pubkey {
                Ok(())
            } else {
                refused("the one it is online with")
            };
        }
        match self.store.known_user_key(user_id) {
            Ok(Some(known)) => match self.keys.get(&known) {
                Ok(known) if known == *pubkey => Ok(()),
                _ => refused("the one known here"),
            },
            Ok(None) => {
                if let Err(e) = self.store.remember_user_key(user_id, pubkey.encoded()) {
                    warn!("could not remember the key of user {user_id}: {e}");
                }
                Ok(())
            }
            Err(e) => {
                // The directory check above still holds; availability over a lookup.
                warn!("could not look up the key of user {user_id}: {e}");
                Ok(())
            }
        }
    }

    // ------------------------------------------------------------ frames from peers

    pub(crate) fn on_peer_frame(
        &mut self,
        now: Time,
        link: &str,
        env: &Envelope,
        text: &str,
    ) -> Result<(), WireError> {
        if let Some(l) = self.fed.links.get_mut(link) {
            l.last_rx_ms = now.mono_ms;
        }
        let frame = PeerFrame::parse(env);
        if let PeerFrame::Error { code, detail } = frame {
            info!("server {link} reports {code}: {detail}");
            return Ok(()); // never answer an error with an error
        }
        if env.from == self.id {
            return Ok(()); // our own frame, flooded back to us
        }
        // §6 *Who may sign*: the pinned key of `from`. An ANNOUNCE from a server we do not know
        // yet introduces it, proving possession of the key it carries; the link vouches for it.
        let key = match self.fed.known.get(&env.from) {
            Some(k) => Arc::clone(&k.key),
            None if let PeerFrame::Announce(announce) = &frame => {
                wire::check_id("from", &env.from)?;
                self.parse_key("pubkey", announce.pubkey.clone()?)?
            }
            None => {
                return Err(WireError::new(
                    ErrorCode::InvalidSig,
                    format!("unknown or unpinned server {:?}", env.from),
                ));
            }
        };
        let canonical = canon::canonical_object(&env.payload)?;
        // §6: judged on what the signature covers. A payload with its own `ts` is fresh by that
        // `ts` and the same frame whatever its envelope says; one without keeps the envelope's.
        let payload_ts = match env.payload.get("ts") {
            None => None,
            Some(_) => Some(env.fields().i64("ts")?),
        };
        let ts = payload_ts.unwrap_or(env.ts);
        let dedup_key = dedup::key(
            &env.kind, &env.from, &env.to, env.ts, payload_ts, &canonical,
        );
        match self.fed.seen.check(&dedup_key, ts, now.wall_ms) {
            Ok(()) => {}
            Err(Stale::Duplicate) => {
                self.metrics.dedup_drop(Stale::Duplicate);
                return Ok(());
            }
            Err(Stale::OutOfWindow) => {
                self.metrics.dedup_drop(Stale::OutOfWindow);
                debug!(
                    "dropping {} from {}: ts outside the window",
                    env.kind, env.from
                );
                return Ok(());
            }
        }
        if !wire::verify_canonical(&key, &canonical, &env.payload, &env.sig)? {
            return Err(WireError::new(
                ErrorCode::InvalidSig,
                format!("{} signature does not verify", env.kind),
            ));
        }
        // A heartbeat does nothing twice, and its one signed payload (`{}`) could otherwise be
        // re-sent with any envelope to fill the cache: it is not recorded.
        if !matches!(frame, PeerFrame::Heartbeat) {
            let until = self.fed.seen.insert(dedup_key, ts, now.wall_ms);
            if payload_ts.is_some()
                && let Err(e) = self.store.remember_seen(&dedup_key, until)
            {
                warn!("could not save a seen-cache entry: {e}");
            }
        }
        let is_advert = matches!(frame, PeerFrame::Advertise(_));
        match frame {
            PeerFrame::Heartbeat => Ok(()),
            PeerFrame::Announce(announce) => self.on_announce(now, env, announce, key, link, text),
            PeerFrame::Advertise(presence) | PeerFrame::Remove(presence) => {
                let Presence { user_id, server_id } = presence?;
                if server_id != env.from {
                    return Err(WireError::new(
                        ErrorCode::InvalidSig,
                        format!("{} server_id differs from its sender", env.kind),
                    ));
                }
                // §7: presence older than the newest applied for that user is ignored.
                if let Some(ts) = payload_ts
                    && !self.fed.presence_is_newest(server_id, user_id, ts, now)
                {
                    debug!("ignoring {} for {user_id}: older than the last", env.kind);
                    return Ok(());
                }
                if is_advert {
                    let advert = Some((text, link));
                    return self.learn_remote_user(now, &env.payload, &env.from, advert);
                }
                self.forward(text, link);
                if self.dir.remove_if_hosted_by(user_id, server_id).is_some() {
                    debug!("user {user_id} offline at server {server_id}");
                    let payload = json!({"user_id": user_id, "server_id": server_id});
                    self.broadcast_local(
                        now,
                        types::USER_REMOVE,
                        &payload,
                        Some(text),
                        Urgency::Bulk,
                    );
                    self.transfers_user_gone(now, user_id);
                }
                Ok(())
            }
            PeerFrame::ChannelAdd => {
                self.forward(text, link);
                Ok(())
            }
            PeerFrame::ChannelUpdated(version) => {
                self.channel.adopt(version?);
                self.forward(text, link);
                Ok(())
            }
            PeerFrame::Delivery(delivery) => {
                self.on_peer_delivery(now, env, delivery, link, text, &canonical)
            }
            PeerFrame::Welcome | PeerFrame::Hello => {
                debug!("ignoring {} on an established link", env.kind);
                Ok(())
            }
            // Answered above.
            PeerFrame::Error { .. } => Ok(()),
            PeerFrame::Unknown(kind) => Err(unknown_type(kind)),
        }
    }

    /// Re-advertises, signed afresh, our users whose advert last went to every link a third of
    /// the dedup window ago or more: a new link anywhere in the mesh is handed the adverts
    /// other servers keep of them (see `link_up`), and one older than the window would be
    /// refused there (§6 freshness), so a user online for long would never reach a server
    /// that links in later. As announces are (see [`REANNOUNCE_EVERY`]), adverts are kept
    /// inside the window. The receivers forward them and tell their users nothing (nothing
    /// changed). At most an eighth of our users (at least [`REFRESH_AT_LEAST`]) per heartbeat,
    /// so a login storm does not come back as a signing storm: with the defaults every advert
    /// relayed is at most 100 s + 15 s + 8 × 15 s old.
    fn refresh_adverts(&mut self, now: Time) {
        let third = (self.fed.cfg.dedup_window_ms / 3) as i64;
        let before = now.wall_ms.saturating_sub(third);
        let max = (self.dir.local_len() / 8).max(REFRESH_AT_LEAST);
        for user_id in self.dir.local_adverts_due(before, max) {
            if let Some(signed) = self.advert(now, &user_id) {
                let text = self.own_broadcast(now, types::USER_ADVERTISE, &signed);
                self.send_links(text, None);
                self.dir.set_advertised(&user_id, now.wall_ms);
            }
        }
    }

    /// Sends our `SERVER_ANNOUNCE` to every link.
    fn announce_self(&mut self, now: Time) {
        if let Some(signed) = self.sign(&self.hello_payload(), Urgency::Conversation) {
            let text = self.own_broadcast(now, types::SERVER_ANNOUNCE, &signed);
            self.send_links(text, None);
        }
    }

    fn on_announce(
        &mut self,
        now: Time,
        env: &Envelope,
        announce: Announce<'_>,
        key: Arc<PublicKey>,
        link: &str,
        text: &str,
    ) -> Result<(), WireError> {
        let (host, port) = announce.addr?;
        let host = host.to_string();
        if self.parse_key("pubkey", announce.pubkey?)? != key {
            return Err(WireError::field(
                "pubkey",
                "differs from the key pinned for this server",
            ));
        }
        let from = env.from.clone();
        self.fed
            .announces
            .insert(from.clone(), Frame::from(text.to_string()));
        if from != self.id {
            if !self.fed.known.contains_key(&from) {
                info!("learned server {from} at ws://{host}:{port} from server {link}");
            }
            self.pin_server(now, &from, &host, port, &key);
            self.ensure_target(now, &from, &host, port, &key);
        }
        self.forward(text, link);
        Ok(())
    }

    /// `SERVER_DELIVER`, server-to-server `MSG_PUBLIC_CHANNEL` and file frames (§6).
    fn on_peer_delivery(
        &mut self,
        now: Time,
        env: &Envelope,
        delivery: Delivery<'_>,
        link: &str,
        text: &str,
        canonical: &str,
    ) -> Result<(), WireError> {
        if env.to != self.id {
            // Relay unchanged toward `to`, never back where it came from.
            if !self.route_toward(&env.to, Frame::from(text.to_string()), Some(link)) {
                debug!("no route to server {} for a relayed {}", env.to, env.kind);
            }
            return Ok(());
        }
        let Route { user_id, sender } = delivery.route?;
        // A delivery may claim only a sender its signing server hosts (§6).
        if self.dir.get(sender).map(|e| e.server_id.as_str()) != Some(env.from.as_str()) {
            return Err(WireError::new(
                ErrorCode::InvalidSig,
                format!("server {} does not host {sender}", env.from),
            ));
        }
        let Some(dest) = self.dir.get(user_id).and_then(|e| e.local) else {
            debug!("{} for {user_id}, who is not here: dropped", env.kind);
            return Ok(());
        };
        let kind = delivery.local_kind;
        // §5.6: a user who takes other servers' signatures gets the payload that server signed,
        // unchanged (its `from` and `sig`; only `type` and `to` change): no signature here.
        // Only when the payload is complete: one without `ts` is re-signed with it.
        if self.is_peer_sig(dest) && env.payload.contains_key("ts") {
            let signed = Signed::ready(canonical.to_string(), env.sig.clone());
            let sender = env.payload.get("sender").and_then(Value::as_str);
            let text = signed
                .frame(kind, &env.from, user_id, env.ts)
                .in_lane(Lane::for_sender(sender));
            self.out.route(dest, text);
            return Ok(());
        }
        let mut payload = env.payload.clone();
        payload.remove("user_id");
        // §6 *Accept*: the standard's own form carries the original `ts` in the envelope only;
        // the user's frame always has it in the payload (§5.5), where `content_sig` needs it.
        payload.entry("ts").or_insert_with(|| Value::from(env.ts));
        self.route_signed(now, dest, kind, user_id, &Value::Object(payload));
        Ok(())
    }

    // ------------------------------------------------------------ sending between servers

    /// Sends `text` toward server `host`: over its link, else to every link (§6 steps 2–3),
    /// never to `except`. Returns whether it went anywhere. Only for frames `route()` carries
    /// (a delivery, a channel copy, a file frame, or one relayed unchanged): they are
    /// flow-controlled ([`Action::Route`]), unlike broadcasts to every link.
    pub(crate) fn route_toward(&mut self, host: &str, text: Frame, except: Option<&str>) -> bool {
        let conns: Vec<ConnId> = match self.fed.links.get(host) {
            Some(link) if Some(host) != except => vec![link.conn],
            _ => self.fed.link_conns(except).collect(),
        };
        for &conn in &conns {
            self.out.route(conn, text.clone());
        }
        !conns.is_empty()
    }

    /// Sends `text` to every linked server but `except`; returns how many.
    fn send_links(&mut self, text: Frame, except: Option<&str>) -> usize {
        let conns: Vec<ConnId> = self.fed.link_conns(except).collect();
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
        let news = match &mut self.fed.channel_news {
            Some(news) => news,
            None => {
                self.out.arm(now.mono_ms + CHANNEL_BATCH_MS, Timer::Channel);
                self.fed.channel_news.insert(ChannelNews {
                    if_version: self.channel.version() - 1,
                    added: Vec::new(),
                })
            }
        };
        if let Some(user_id) = added
            && !news.added.iter().any(|id| id == user_id)
        {
            news.added.push(user_id.to_string());
        }
    }

    /// [`Timer::Channel`]: tells linked servers about the channel changes since the last time
    /// (§8): one `PUBLIC_CHANNEL_ADD` for the users who joined and are still online, then
    /// `PUBLIC_CHANNEL_UPDATED` with the version now.
    pub(crate) fn on_channel_timer(&mut self, now: Time) {
        let Some(news) = self.fed.channel_news.take() else {
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
        let dead: Vec<(String, ConnId, u64)> = self
            .fed
            .links
            .iter()
            .map(|(id, l)| (id.clone(), l.conn, now.mono_ms.saturating_sub(l.last_rx_ms)))
            .filter(|(_, _, silent)| *silent >= dead_after)
            .collect();
        for (id, conn, silent) in dead {
            warn!("link to server {id} silent for {silent} ms: declaring it dead");
            self.close(now, conn, close::GOING_AWAY, "link dead");
        }
        if !self.fed.links.is_empty()
            && let Some(signed) = self
                .fed
                .heartbeat
                .clone()
                .or_else(|| self.sign(&json!({}), Urgency::Conversation))
        {
            self.fed.heartbeat = Some(signed.clone());
            let links: Vec<(String, ConnId)> = self
                .fed
                .links
                .iter()
                .map(|(id, l)| (id.clone(), l.conn))
                .collect();
            for (id, conn) in links {
                let text = signed.frame(types::HEARTBEAT, &self.id, &id, now.wall_ms);
                self.out.send(conn, text);
            }
        }
        if let Err(e) = self.store.forget_seen(now.wall_ms) {
            warn!("could not prune the saved seen-cache: {e}");
        }
        self.fed.rounds += 1;
        if self.fed.rounds >= REANNOUNCE_EVERY {
            self.fed.rounds = 0;
            if !self.fed.links.is_empty() {
                self.announce_self(now);
            }
        }
        if !self.fed.links.is_empty() {
            self.refresh_adverts(now);
        }
        self.out
            .arm(now.mono_ms + self.fed.cfg.heartbeat_ms, Timer::Heartbeat);
    }
}
