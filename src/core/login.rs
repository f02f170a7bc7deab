//! Accounts on the server (PROTOCOL.md §5.3): `USER_REGISTER` and `USER_LOGIN`, part of the
//! sans-IO core.
//!
//! The server stores a salted hash of the client's `auth` and the client's sealed key, never
//! anything that opens it. An unknown name and a wrong password get the same answer after the
//! same work (a dummy verifier is checked for unknown names), compared in constant time.
//!
//! Login attempts are limited with token buckets so that guessing stays bounded and a stranger
//! cannot lock an account out (§5.3; the issue "anyone can lock an account out": with one budget
//! per name, shared by everyone, one guess a second kept the owner out). An attempt spends one
//! token from each of, in order:
//!
//! - its connection's budget ([`CONN_BURST`]);
//! - its source's budget, whatever the names ([`SOURCE_BURST`]): one address is bounded;
//! - the budget of (name, source) ([`PAIR_BURST`]): what one address may guess at one name. A
//!   guesser spends its own address's budgets, never the owner's;
//! - the name's ceiling, from every source together ([`NAME_BURST`]): a guesser spread over many
//!   addresses is bounded too. It is ten times what one address may spend on one name, so only
//!   a guesser with more than ten addresses guessing at full speed at once can exhaust it and so
//!   hold the name up: that is the price of the bound.
//!
//! A source is an IPv4 address, or the /64 prefix of an IPv6 address: one host or site usually
//! holds a whole /64, so counting its addresses one by one would give it 2^64 budgets. An
//! IPv4-mapped IPv6 address (a dual-stack listener) is its IPv4 address. Users behind one NAT
//! share their address's budgets.
//!
//! A limited attempt is refused at once, so nobody else waits (the event loop never sleeps).
//! Every map is bounded ([`MAX_TRACKED`]); see `LoginBudgets::take` for what happens when one
//! is full.
//!
//! `Accounts` owns the server-wide budgets (private) and decides registrations and logins
//! against the store it is handed; the connection's own budget is the session's
//! (`Sessions::spend_login`). The `impl Server` methods here are glue:
//! they verify the frame, draw the salt, and send the answer.

use crate::account;
use crate::core::persist::{Conflict, PersistError, Persistence, UserRecord};
use crate::core::server::{ConnId, Server, Time, store_error};
use crate::core::sessions::Bucket;
use crate::core::signer::Urgency;
use crate::crypto::PublicKey;
use crate::wire::user::{Login, NewAccount, Register, auth_bytes};
use crate::wire::{self, Envelope, ErrorCode, WireError, types};
use log::info;
use serde_json::json;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};

/// Login attempts a connection may make at once, then one more every [`CONN_REFILL_MS`].
pub const CONN_BURST: u32 = 5;
pub const CONN_REFILL_MS: u64 = 12_000;
/// Login attempts per (display name, source), then one more every [`PAIR_REFILL_MS`].
pub const PAIR_BURST: u32 = 10;
pub const PAIR_REFILL_MS: u64 = 6_000;
/// Login attempts per source (whatever the names), then one more every [`SOURCE_REFILL_MS`].
pub const SOURCE_BURST: u32 = 30;
pub const SOURCE_REFILL_MS: u64 = 2_000;
/// Login attempts per display name from all sources together, then one more every
/// [`NAME_REFILL_MS`]: the ceiling on guessing one name (100 a minute, 144 000 a day).
pub const NAME_BURST: u32 = 100;
pub const NAME_REFILL_MS: u64 = 600;
/// Keys tracked by each budget map (sources, (name, source) pairs, names).
pub const MAX_TRACKED: usize = 10_000;

/// Where a login attempt comes from, for its budgets (§5.3): an IPv4 address, or the /64
/// prefix of an IPv6 address. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Source(IpAddr);

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !u128::from(u64::MAX);
                Source(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
            v4 => Source(v4),
        }
    }
}

/// Token buckets by key, at most [`MAX_TRACKED`] of them.
#[derive(Debug)]
struct Budgets<K> {
    burst: u32,
    refill_ms: u64,
    buckets: HashMap<K, Bucket>,
}

impl<K: Eq + Hash> Budgets<K> {
    fn new(burst: u32, refill_ms: u64) -> Budgets<K> {
        Budgets {
            burst,
            refill_ms,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token from `key`'s bucket (a new key starts full). `None` if the key is not
    /// tracked and cannot be: the map is full even after forgetting the buckets that have
    /// refilled completely (they hold no information).
    fn take(&mut self, now_ms: u64, key: K) -> Option<bool> {
        let (burst, refill_ms) = (self.burst, self.refill_ms);
        if self.buckets.len() >= MAX_TRACKED && !self.buckets.contains_key(&key) {
            self.buckets
                .retain(|_, b| !b.is_full_at(now_ms, burst, refill_ms));
            if self.buckets.len() >= MAX_TRACKED {
                return None;
            }
        }
        let bucket = self
            .buckets
            .entry(key)
            .or_insert_with(|| Bucket::new(burst, now_ms));
        Some(bucket.take(now_ms, burst, refill_ms))
    }
}

/// The server-wide login budgets (§5.3): per source, per (name, source), per name.
#[derive(Debug)]
struct LoginBudgets {
    sources: Budgets<Source>,
    pairs: Budgets<(String, Source)>,
    names: Budgets<String>,
}

impl Default for LoginBudgets {
    fn default() -> Self {
        LoginBudgets {
            sources: Budgets::new(SOURCE_BURST, SOURCE_REFILL_MS),
            pairs: Budgets::new(PAIR_BURST, PAIR_REFILL_MS),
            names: Budgets::new(NAME_BURST, NAME_REFILL_MS),
        }
    }
}

impl LoginBudgets {
    /// One attempt at `name` from `source`: whether every budget had a token.
    ///
    /// When a map is full of live buckets (thousands of sources or names active at once): a new
    /// source or name is refused rather than the map grown, so both bounds keep holding; a new
    /// (name, source) pair goes without its pair budget, since the source's and the name's still
    /// bound it, rather than refusing every owner not yet tracked. A name that no account can
    /// have (§2) spends only the source's budget and is not remembered: its lookup finds nothing
    /// whatever the password, and its text (up to a frame long) is never kept.
    pub(crate) fn take(&mut self, now_ms: u64, source: Source, name: &str) -> bool {
        if self.sources.take(now_ms, source) != Some(true) {
            return false;
        }
        if !crate::wire::ids::is_valid_display_name(name) {
            return true;
        }
        if self.pairs.take(now_ms, (name.to_string(), source)) == Some(false) {
            return false;
        }
        self.names.take(now_ms, name.to_string()) == Some(true)
    }
}

fn invalid_credentials() -> WireError {
    WireError::new(ErrorCode::BadKey, "invalid credentials")
}

/// Why a login was refused.
#[derive(Debug)]
pub(crate) enum Refused {
    /// A budget had no token left (§5.3).
    RateLimited,
    /// No such name, or the wrong password: one answer for both.
    Credentials,
    /// The store could not be read.
    Store(WireError),
}

/// Accounts (§5.3): registering, checking a login, and the server-wide login budgets. Private
/// state; the accounts themselves are in the store it is handed.
#[derive(Debug, Default)]
pub(crate) struct Accounts {
    budgets: LoginBudgets,
}

impl Accounts {
    /// Stores a new account for `user_id` with `pubkey`, its password verifier salted with
    /// `salt`. Durable when this returns.
    pub(crate) fn register(
        store: &dyn Persistence,
        salt: &[u8; 16],
        user_id: &str,
        pubkey: &PublicKey,
        account: &NewAccount<'_>,
    ) -> Result<(), WireError> {
        let record = UserRecord {
            user_id: user_id.to_string(),
            pubkey: pubkey.encoded().to_string(),
            privkey_store: account.privkey_store.to_string(),
            pake_password: account::password_verifier_with_salt(salt, &account.auth),
            meta: json!({"display_name": account.display_name}),
            version: 1,
        };
        match store.register_account(&record) {
            Ok(()) => Ok(()),
            Err(PersistError::Conflict(
                what @ (Conflict::DisplayNameTaken | Conflict::UserIdTaken),
            )) => Err(WireError::new(ErrorCode::NameInUse, what.as_str())),
            Err(e) => Err(store_error(&e)),
        }
    }

    /// One login attempt at `name` with `auth`, from `source` (`None`: a connection that may
    /// not log in, or whose own budget is spent): the account, if every budget had a token
    /// and the password matches.
    pub(crate) fn login(
        &mut self,
        store: &dyn Persistence,
        now_ms: u64,
        source: Option<IpAddr>,
        name: &str,
        auth: &str,
    ) -> Result<UserRecord, Refused> {
        let allowed = source.is_some_and(|ip| self.budgets.take(now_ms, Source::of(ip), name));
        if !allowed {
            return Err(Refused::RateLimited);
        }
        // Known or not, the name costs one index probe and one row read and decoded (a dummy
        // row for an unknown name, see store.rs), then one verifier check: the same work
        // (§5.3; issue: a known name took ~8 µs longer when only it fetched a row).
        let record = store
            .user_by_display_name(name)
            .map_err(|e| Refused::Store(store_error(&e)))?;
        let verifier = record
            .as_ref()
            .map_or(account::DUMMY_VERIFIER, |r| r.pake_password.as_str());
        // Malformed auth is checked like a wrong one: same work, same answer.
        let auth = auth_bytes(auth).unwrap_or_default();
        let matches = account::check_password(verifier, &auth);
        record.filter(|_| matches).ok_or(Refused::Credentials)
    }
}

impl Server {
    /// `USER_REGISTER {user_id, pubkey, privkey_store, auth, meta:{display_name}}`, signed by the
    /// new key. Durable before `USER_REGISTERED` is sent.
    pub(crate) fn on_register(
        &mut self,
        now: Time,
        conn: ConnId,
        env: &Envelope,
        register: Register<'_>,
    ) -> Result<(), WireError> {
        let Register {
            user_id,
            pubkey,
            account,
        } = register;
        let pubkey = self.parse_key("pubkey", pubkey)?;
        let account = account?;
        if !wire::verify_payload_sig(&pubkey, &env.payload, &env.sig)? {
            return Err(WireError::new(
                ErrorCode::InvalidSig,
                "USER_REGISTER must be signed by the key it registers",
            ));
        }
        let mut salt = [0; 16];
        self.fill_random(&mut salt);
        Accounts::register(self.store.as_ref(), &salt, user_id, &pubkey, &account)?;
        let display_name = account.display_name;
        info!("account {display_name} registered as user {user_id} (conn {conn})");
        let payload = json!({"user_id": user_id});
        self.send_signed(
            now,
            conn,
            types::USER_REGISTERED,
            user_id,
            &payload,
            Urgency::Bulk,
        );
        Ok(())
    }

    /// `USER_LOGIN {display_name, auth}` → `USER_LOGGED_IN {user_id, privkey_store}`. The
    /// attempt spends the connection's login budget first (see the module documentation).
    pub(crate) fn on_login(
        &mut self,
        now: Time,
        conn: ConnId,
        login: Login<'_>,
    ) -> Result<(), WireError> {
        let Login {
            display_name: name,
            auth,
        } = login;
        let source = self.spend_conn_login(now, conn);
        let record = match self
            .accounts
            .login(self.store.as_ref(), now.mono_ms, source, name, auth)
        {
            Ok(record) => record,
            Err(Refused::RateLimited) => {
                info!("conn {conn}: login attempts for {name:?} rate-limited");
                self.metrics.login_rate_limited();
                return Err(WireError::new(
                    ErrorCode::BadKey,
                    "too many login attempts; wait and try again",
                ));
            }
            Err(Refused::Credentials) => {
                info!("conn {conn}: failed login for {name:?}");
                return Err(invalid_credentials());
            }
            Err(Refused::Store(err)) => return Err(err),
        };
        info!("conn {conn}: {name} logged in as user {}", record.user_id);
        let payload = json!({"user_id": record.user_id, "privkey_store": record.privkey_store});
        self.send_signed(
            now,
            conn,
            types::USER_LOGGED_IN,
            &record.user_id,
            &payload,
            Urgency::Bulk,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        assert_eq!(Source::of(ip("192.0.2.1")), Source(ip("192.0.2.1")));
        assert_ne!(Source::of(ip("192.0.2.1")), Source::of(ip("192.0.2.2")));
        assert_eq!(
            Source::of(ip("::ffff:192.0.2.1")),
            Source::of(ip("192.0.2.1"))
        );
        assert_eq!(
            Source::of(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            Source(ip("2001:db8:1:2::"))
        );
        assert_eq!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:3::1"))
        );
    }

    #[test]
    fn every_map_is_bounded() {
        let mut b = LoginBudgets::default();
        let now = 1_000;
        // Spray names from many sources until every map is full of live buckets.
        let source =
            |i: usize| Source::of(IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]));
        for i in 0..MAX_TRACKED {
            assert!(b.take(now, source(i), &format!("n{i}")));
        }
        assert_eq!(b.sources.buckets.len(), MAX_TRACKED);
        assert_eq!(b.names.buckets.len(), MAX_TRACKED);
        // A new source, or a new name, is refused rather than the maps grown.
        assert!(!b.take(now, source(MAX_TRACKED), "n0"));
        assert!(!b.take(now, source(0), "brand-new"));
        // A known source and a known name, as a new pair: allowed without a pair budget.
        assert!(b.take(now, source(1), "n0"));
        assert_eq!(b.pairs.buckets.len(), MAX_TRACKED);
        // A name no account can have is not remembered.
        let long = "x".repeat(100);
        assert!(b.take(now, source(2), &long));
        assert!(!b.names.buckets.contains_key(&long));
        for map in [
            b.sources.buckets.len(),
            b.pairs.buckets.len(),
            b.names.buckets.len(),
        ] {
            assert!(map <= MAX_TRACKED);
        }
        // Once the buckets have refilled they are forgotten, and new keys fit again.
        let later = now + u64::from(NAME_BURST) * NAME_REFILL_MS + 60_000;
        assert!(b.take(later, source(MAX_TRACKED), "brand-new"));
        assert_eq!(b.names.buckets.len(), 1);
    }
}
