//! Sessions: the core's connection table and the pool of signed challenges (PROTOCOL.md §5.2).
//!
//! Every open connection has a [`State`] (fresh, in a user's hello, a user, a link being
//! dialled, a link), an error budget (§10) and a login budget (§5.3). [`Sessions`] owns them,
//! with private fields: the `impl Server` glue asks it where a connection stands and what it
//! may still do, and does the sending.

use crate::core::login::{CONN_BURST, CONN_REFILL_MS};
use crate::core::server::{ConnId, Limits};
use crate::crypto::PublicKey;
use crate::wire::frame::Signed;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Where a connection stands.
#[derive(Debug)]
pub(crate) enum State {
    /// Open, nothing received yet: the first frame decides what it is (§1).
    Fresh,
    /// Said it is a user; no challenge outstanding (a hello failed, or before login).
    UserPending,
    /// `AUTH_CHALLENGE` sent, waiting for `AUTH_RESPONSE`.
    Challenged(Box<Challenge>),
    /// Hello complete: frames are from this user.
    User { user_id: String },
    /// We dialled peer target `target` and sent `SERVER_HELLO_JOIN`; waiting for the welcome.
    Dialling { target: u32 },
    /// A live link to another server (§4).
    Peer { server_id: String },
}

/// An `AUTH_CHALLENGE` outstanding: who said hello, with what, and the nonce it must sign.
#[derive(Debug)]
pub(crate) struct Challenge {
    user_id: String,
    pubkey: Arc<PublicKey>,
    meta: Map<String, Value>,
    nonce: String,
    peer_sig: bool,
    early: Option<Early>,
}

/// The newcomer's `USER_ADVERTISE` and `USER_HELLO_ACK` payloads, signed while it signs its
/// answer (see `Server::sign_early`). Nothing of them is sent unless the answer verifies.
#[derive(Debug)]
pub(crate) struct Early {
    pub(crate) advert: Signed,
    pub(crate) ack: Signed,
    /// The advert's signed `ts` (the hello's wall time).
    pub(crate) ts: i64,
    /// How many of its own users' `USER_REMOVE`s the server had signed when the advert was
    /// made: an advert older than one of them may not be sent (see `Server::user_online`).
    pub(crate) removes: u64,
}

/// What a completed hello brings: the user, its key and meta, and whether it takes other
/// servers' signatures (§5.6).
pub(crate) struct Hello {
    pub(crate) user_id: String,
    pub(crate) pubkey: Arc<PublicKey>,
    pub(crate) meta: Map<String, Value>,
    pub(crate) peer_sig: bool,
}

impl Challenge {
    pub(crate) fn new(hello: Hello, nonce: String, early: Option<Early>) -> Challenge {
        Challenge {
            user_id: hello.user_id,
            pubkey: hello.pubkey,
            meta: hello.meta,
            nonce,
            peer_sig: hello.peer_sig,
            early,
        }
    }

    pub(crate) fn user_id(&self) -> &str {
        &self.user_id
    }

    pub(crate) fn pubkey(&self) -> &Arc<PublicKey> {
        &self.pubkey
    }

    pub(crate) fn meta(&self) -> &Map<String, Value> {
        &self.meta
    }

    pub(crate) fn nonce(&self) -> &str {
        &self.nonce
    }

    /// The hello, once the challenge is answered, and what was signed for it meanwhile.
    pub(crate) fn into_hello(self) -> (Hello, Option<Early>) {
        let hello = Hello {
            user_id: self.user_id,
            pubkey: self.pubkey,
            meta: self.meta,
            peer_sig: self.peer_sig,
        };
        (hello, self.early)
    }
}

#[derive(Debug)]
struct Conn {
    state: State,
    errors: Bucket,
    /// Login attempts on this connection (§5.3).
    logins: Bucket,
    /// Where an accepted connection comes from (§5.3 login budgets); `None` for one we dialled.
    peer: Option<IpAddr>,
    /// A user who announced `peer-sig` (§5.6): frames other servers signed reach it unchanged.
    peer_sig: bool,
}

/// A token bucket. Errors cost a signature each, so a connection that keeps provoking them is
/// answered only while its budget lasts; login attempts are limited the same way (§5.3).
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    tokens: u32,
    last_refill_ms: u64,
}

impl Bucket {
    pub(crate) fn new(burst: u32, now_ms: u64) -> Bucket {
        Bucket {
            tokens: burst,
            last_refill_ms: now_ms,
        }
    }

    /// Whether the bucket would hold all `burst` tokens at `now_ms`.
    pub(crate) fn is_full_at(&self, now_ms: u64, burst: u32, refill_ms: u64) -> bool {
        let earned = now_ms.saturating_sub(self.last_refill_ms) / refill_ms.max(1);
        u64::from(self.tokens) + earned >= u64::from(burst)
    }

    /// Takes one token if there is one; `burst` tokens at most, one more every `refill_ms`.
    pub(crate) fn take(&mut self, now_ms: u64, burst: u32, refill_ms: u64) -> bool {
        let refill_ms = refill_ms.max(1);
        let earned = now_ms.saturating_sub(self.last_refill_ms) / refill_ms;
        if earned > 0 {
            self.tokens = (self.tokens as u64 + earned).min(burst as u64) as u32;
            self.last_refill_ms += earned * refill_ms;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Signed challenges kept ready. A hello takes one, so its answer waits for no signature, and
/// the deferred work signs a replacement while the user computes its response: a login's
/// path is one signature shorter. Each nonce is random, kept only in memory and used once; a
/// hello still costs one signature, as before, so draining the pool gains an attacker nothing.
/// The pool grows by one per hello that finds it empty, up to this size (bursts of logins).
const CHALLENGE_POOL: usize = 4;

/// The connection table and the challenge pool.
#[derive(Debug)]
pub(crate) struct Sessions {
    conns: HashMap<ConnId, Conn>,
    /// `AUTH_CHALLENGE`s signed ahead of need: (nonce, signed payload).
    challenges: Vec<(String, Signed)>,
    error_burst: u32,
    error_refill_ms: u64,
}

/// How many connections stand where (see [`Sessions::census`]).
pub(crate) struct Counts {
    pub(crate) pending: usize,
    pub(crate) user: usize,
    pub(crate) peer: usize,
}

impl Sessions {
    pub(crate) fn new(limits: &Limits) -> Sessions {
        Sessions {
            conns: HashMap::new(),
            challenges: Vec::new(),
            error_burst: limits.error_burst,
            error_refill_ms: 1000 / u64::from(limits.error_refill_per_s.max(1)),
        }
    }

    // -------------------------------------------------------------------- the table

    /// Starts tracking a connection in `state`; `peer` is where an accepted one comes from.
    pub(crate) fn open(&mut self, conn: ConnId, state: State, peer: Option<IpAddr>, now_ms: u64) {
        self.conns.insert(
            conn,
            Conn {
                state,
                errors: Bucket::new(self.error_burst, now_ms),
                logins: Bucket::new(CONN_BURST, now_ms),
                peer,
                peer_sig: false,
            },
        );
    }

    /// Forgets a connection; returns where it stood.
    pub(crate) fn remove(&mut self, conn: ConnId) -> Option<State> {
        self.conns.remove(&conn).map(|c| c.state)
    }

    pub(crate) fn contains(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn)
    }

    /// Every connection.
    pub(crate) fn ids(&self) -> Vec<ConnId> {
        self.conns.keys().copied().collect()
    }

    pub(crate) fn state(&self, conn: ConnId) -> Option<&State> {
        self.conns.get(&conn).map(|c| &c.state)
    }

    pub(crate) fn set_state(&mut self, conn: ConnId, state: State) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = state;
        }
    }

    /// Puts `replacement` in the place of the connection's state; returns the old one.
    pub(crate) fn take_state(&mut self, conn: ConnId, replacement: State) -> Option<State> {
        self.conns
            .get_mut(&conn)
            .map(|c| std::mem::replace(&mut c.state, replacement))
    }

    /// Whether `conn` is still before its hello (fresh, a user's hello or login under way).
    pub(crate) fn is_pending(&self, conn: ConnId) -> bool {
        matches!(
            self.state(conn),
            Some(State::Fresh | State::UserPending | State::Challenged(_))
        )
    }

    /// Whether `conn` is open and nothing was received on it yet.
    pub(crate) fn is_fresh(&self, conn: ConnId) -> bool {
        matches!(self.state(conn), Some(State::Fresh))
    }

    /// Whether `conn` is a user who announced `peer-sig` (§5.6).
    pub(crate) fn is_peer_sig(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.peer_sig)
    }

    pub(crate) fn set_peer_sig(&mut self, conn: ConnId, peer_sig: bool) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.peer_sig = peer_sig;
        }
    }

    /// The users who take other servers' signatures: connection and user id.
    pub(crate) fn peer_sig_users(&self) -> Vec<(ConnId, String)> {
        self.conns
            .iter()
            .filter(|(_, c)| c.peer_sig)
            .filter_map(|(conn, c)| match &c.state {
                State::User { user_id } => Some((*conn, user_id.clone())),
                _ => None,
            })
            .collect()
    }

    /// How many connections are pending, users and links. Walks the table: for reports.
    pub(crate) fn census(&self) -> Counts {
        let mut counts = Counts {
            pending: 0,
            user: 0,
            peer: 0,
        };
        for conn in self.conns.values() {
            match conn.state {
                State::User { .. } => counts.user += 1,
                State::Peer { .. } => counts.peer += 1,
                _ => counts.pending += 1,
            }
        }
        counts
    }

    // -------------------------------------------------------------------- budgets

    /// Spends one token of the connection's error budget (§10): `None` for a connection not
    /// here, `Some(false)` when the budget is spent.
    pub(crate) fn spend_error(&mut self, conn: ConnId, now_ms: u64) -> Option<bool> {
        let c = self.conns.get_mut(&conn)?;
        Some(
            c.errors
                .take(now_ms, self.error_burst, self.error_refill_ms),
        )
    }

    /// One login attempt against the connection's own budget (§5.3): where it comes from, if
    /// it may try. Only accepted connections have a source, and only they may log in.
    pub(crate) fn spend_login(&mut self, conn: ConnId, now_ms: u64) -> Option<IpAddr> {
        let c = self.conns.get_mut(&conn)?;
        let peer = c.peer?;
        c.logins
            .take(now_ms, CONN_BURST, CONN_REFILL_MS)
            .then_some(peer)
    }

    // -------------------------------------------------------------------- the challenge pool

    /// A challenge signed ahead of need, if there is one.
    pub(crate) fn take_challenge(&mut self) -> Option<(String, Signed)> {
        self.challenges.pop()
    }

    /// Whether the pool has room for another challenge.
    pub(crate) fn wants_challenge(&self) -> bool {
        self.challenges.len() < CHALLENGE_POOL
    }

    pub(crate) fn add_challenge(&mut self, ready: (String, Signed)) {
        self.challenges.push(ready);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new(&Limits {
            hello_timeout_ms: 10_000,
            error_burst: 2,
            error_refill_per_s: 1,
            max_message_size: 1 << 20,
        })
    }

    #[test]
    fn the_error_budget_is_per_connection_and_refills() {
        let mut s = sessions();
        let (a, b) = (ConnId(1), ConnId(2));
        s.open(a, State::Fresh, None, 0);
        s.open(b, State::Fresh, None, 0);
        assert_eq!(s.spend_error(a, 0), Some(true));
        assert_eq!(s.spend_error(a, 0), Some(true));
        assert_eq!(s.spend_error(a, 0), Some(false));
        assert_eq!(s.spend_error(b, 0), Some(true), "b has its own");
        assert_eq!(s.spend_error(a, 1000), Some(true), "one more a second");
        assert_eq!(s.spend_error(ConnId(3), 0), None);
    }

    #[test]
    fn only_accepted_connections_may_log_in_within_their_budget() {
        let mut s = sessions();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        s.open(ConnId(1), State::Fresh, Some(ip), 0);
        s.open(ConnId(2), State::Dialling { target: 0 }, None, 0);
        for _ in 0..CONN_BURST {
            assert_eq!(s.spend_login(ConnId(1), 0), Some(ip));
        }
        assert_eq!(s.spend_login(ConnId(1), 0), None);
        assert_eq!(s.spend_login(ConnId(2), 0), None, "dialled: no source");
    }

    #[test]
    fn states_and_peer_sig_users() {
        let mut s = sessions();
        s.open(ConnId(1), State::Fresh, None, 0);
        s.open(ConnId(2), State::Fresh, None, 0);
        assert!(s.is_fresh(ConnId(1)) && s.is_pending(ConnId(1)));
        let user = |id: &str| State::User {
            user_id: id.to_string(),
        };
        s.set_state(ConnId(1), user("u"));
        s.set_state(ConnId(2), user("v"));
        s.set_peer_sig(ConnId(1), true);
        assert!(!s.is_pending(ConnId(1)));
        assert_eq!(s.peer_sig_users(), [(ConnId(1), "u".to_string())]);
        let counts = s.census();
        assert_eq!((counts.pending, counts.user, counts.peer), (0, 2, 0));
        assert!(matches!(s.remove(ConnId(1)), Some(State::User { .. })));
        assert!(!s.contains(ConnId(1)));
    }
}
