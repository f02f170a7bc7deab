//! The core's storage boundary: the [`Persistence`] trait, the records it keeps, its typed
//! errors, and [`MemStore`], an implementation in memory (DESIGN.md "The shape": the core
//! "reaches storage only through a `Persistence` trait").
//!
//! The server's implementation is [`Store`](crate::store::Store) (SQLite, one database per
//! server, PROTOCOL.md §11). The core calls the trait synchronously: a key binding or an
//! account is durable when the call returns `Ok`, so the reply that confirms it (§5.2, §5.3) is
//! queued only after that (§11). [`MemStore`] keeps the same rules in `HashMap`s and
//! `BTreeMap`s, for core tests and throwaway servers; `tests/persistence.rs` runs one
//! behavioural suite against both.
//!
//! Every operation here is one the core performs; what only the server's start-up needs (its
//! own id in `server_meta`, the file checks) stays on `Store`.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// What the core persists (§11), one method per operation it performs.
///
/// Writes are durable when they return `Ok` (the seen-cache's need only survive the process
/// being killed, see [`Persistence::remember_seen`]). A write that fails changes nothing. Errors
/// are typed: [`PersistError::Conflict`] is the client's doing and names the rule; anything
/// else is [`PersistError::Unavailable`].
pub trait Persistence {
    /// Binds a user id to its key on its first hello (§5.2): inserts the user if absent; if
    /// present with the same `pubkey`, stores the new `meta` (bumping `version` if it changed);
    /// if present with another key, fails with [`Conflict::KeyBound`].
    ///
    /// Never creates or changes credentials: a new user is key-only (empty `privkey_store` and
    /// `pake_password`, whatever `rec` holds), and a registered account keeps its password, key
    /// blob and login name. A hello with unchanged meta writes nothing.
    fn bind_user(&self, rec: &UserRecord) -> Result<(), PersistError>;

    /// Creates a registered account for `USER_REGISTER` (§5.3), whose login name is
    /// `meta.display_name`. Fails, checked in this order, with [`Conflict::DisplayNameMissing`],
    /// [`Conflict::PasswordMissing`] (`rec` is not an account), [`Conflict::DisplayNameTaken`]
    /// (another account has that login name) or [`Conflict::UserIdTaken`] (the id exists,
    /// registered or key-only).
    fn register_account(&self, rec: &UserRecord) -> Result<(), PersistError>;

    /// The registered account whose login name is `name` (compared exactly), for `USER_LOGIN`
    /// (§5.3). Key-only users are not accounts and are never found.
    fn user_by_display_name(&self, name: &str) -> Result<Option<UserRecord>, PersistError>;

    /// The key known for `user_id`: the one it is bound to here (§5.2), else the one first seen
    /// for it from another server (§7).
    fn known_user_key(&self, user_id: &str) -> Result<Option<String>, PersistError>;

    /// Remembers `pubkey` as the key of remote user `user_id`, unless one is remembered already
    /// (the first seen stays, §7 *A user stays where it is*).
    fn remember_user_key(&self, user_id: &str, pubkey: &str) -> Result<(), PersistError>;

    /// Every known server, ordered by id (§4.2, §11 "so links come back after a restart").
    fn servers(&self) -> Result<Vec<ServerRecord>, PersistError>;

    /// Records a server (§4): inserts it, or updates its address and key. Pins only accumulate;
    /// a pinned server's key is replaced only by a pinned record, and an unpinned record with
    /// another key fails with [`Conflict::ServerPinned`].
    fn upsert_server(&self, rec: &ServerRecord) -> Result<(), PersistError>;

    /// The public channel's stored `version` (§8); 0 before any is stored.
    fn public_channel_version(&self) -> Result<i64, PersistError>;

    /// Stores the public channel's `version`: the stored value becomes `max(stored, v)` (§8).
    fn set_public_channel_version(&self, v: i64) -> Result<(), PersistError>;

    /// Records a seen-cache entry kept until `until_ms` (wall ms, §6 *Across restarts*). An
    /// entry already recorded for `key` keeps its expiry. Need survive only the process being
    /// killed, not power loss (one per relayed frame must not cost an fsync).
    fn remember_seen(&self, key: &[u8; 32], until_ms: i64) -> Result<(), PersistError>;

    /// Deletes the seen-cache entries expired at `now_ms` (`until_ms < now_ms`), then returns
    /// those left, earliest expiry first.
    fn seen_entries(&self, now_ms: i64) -> Result<Vec<([u8; 32], i64)>, PersistError>;

    /// Deletes the seen-cache entries expired at `now_ms` (`until_ms < now_ms`).
    fn forget_seen(&self, now_ms: i64) -> Result<(), PersistError>;

    /// Compacts what is stored (SQLite: folds the WAL into the main file), e.g. at shutdown.
    fn checkpoint(&self) -> Result<(), PersistError>;
}

/// A write that contradicts what is stored, or a record that cannot be stored. Nothing was
/// written. The core tells the client from the variant (§10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// The user id is bound to another key (§5.2).
    KeyBound,
    /// Another registered account has this login name (§5.3).
    DisplayNameTaken,
    /// The user id exists already, registered or key-only (§5.3).
    UserIdTaken,
    /// An account needs a `meta.display_name` (its login name).
    DisplayNameMissing,
    /// An account needs a password verifier.
    PasswordMissing,
    /// The server is pinned to another key, and the record is not trusted to replace it (§4.2).
    ServerPinned,
}

impl Conflict {
    /// The rule, in words (sent to the client in `ERROR.detail`).
    pub fn as_str(self) -> &'static str {
        match self {
            Conflict::KeyBound => "user id bound to another key",
            Conflict::DisplayNameTaken => "display name taken",
            Conflict::UserIdTaken => "user id taken",
            Conflict::DisplayNameMissing => "display name missing",
            Conflict::PasswordMissing => "password missing",
            Conflict::ServerPinned => "server pinned to another key",
        }
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a [`Persistence`] operation failed.
#[derive(Debug)]
pub enum PersistError {
    /// The client's doing: the write breaks a rule of what is stored. Nothing was written.
    Conflict(Conflict),
    /// The storage failed (I/O, a corrupt or busy database, a database file that was deleted
    /// while open). Not the client's fault: nothing is confirmed; the core logs it and answers
    /// that storage is unavailable.
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
}

impl fmt::Display for PersistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PersistError::Conflict(c) => c.fmt(f),
            PersistError::Unavailable(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for PersistError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PersistError::Conflict(_) => None,
            PersistError::Unavailable(e) => Some(&**e),
        }
    }
}

impl From<Conflict> for PersistError {
    fn from(c: Conflict) -> Self {
        PersistError::Conflict(c)
    }
}

/// One row of `users` (§11): a user id bound to its key (§5.2), and for registered accounts
/// (§5.3) the encrypted private key blob and the salted hash of `auth`.
///
/// Key-only users (who said hello with a key file) have empty `privkey_store` and
/// `pake_password`. `Debug` redacts both secrets.
#[derive(Clone, PartialEq)]
pub struct UserRecord {
    /// The user's id (§2).
    pub user_id: String,
    /// The user's public key, in the canonical form the caller emits (§3: base64url DER SPKI).
    /// Compared as a string, so the caller must normalise before storing or binding.
    pub pubkey: String,
    /// The encrypted private key blob of a registered account (§5.3), else empty.
    pub privkey_store: String,
    /// The salted hash of `auth` of a registered account (§5.3), else empty.
    pub pake_password: String,
    /// The user's `meta` object (`display_name`, §2), stored as JSON text.
    pub meta: serde_json::Value,
    /// Grows each time the stored `meta` changes.
    pub version: i64,
}

impl fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = |s: &str| {
            if s.is_empty() {
                "<empty>"
            } else {
                "<redacted>"
            }
        };
        f.debug_struct("UserRecord")
            .field("user_id", &self.user_id)
            .field("pubkey", &self.pubkey)
            .field("privkey_store", &secret(&self.privkey_store))
            .field("pake_password", &secret(&self.pake_password))
            .field("meta", &self.meta)
            .field("version", &self.version)
            .finish()
    }
}

/// One known server (§11 "plus the known servers"), so links come back after a restart (§4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerRecord {
    /// The server's id (§2).
    pub server_id: String,
    /// Where to dial it.
    pub host: String,
    /// Where to dial it.
    pub port: u16,
    /// Its public key (§4.1), canonical form.
    pub pubkey: String,
    /// Whether its key is trusted for links (§4.2): from the bootstrap list or vouched for by a
    /// trusted server. Once pinned, stays pinned.
    pub pinned: bool,
}

/// A [`Persistence`] in memory, with the rules [`Store`](crate::store::Store) keeps (conflicts,
/// pins that only accumulate, a channel version that only grows, expiry of the seen-cache,
/// servers ordered by id). Nothing survives the value: for tests and throwaway servers.
#[derive(Debug, Default)]
pub struct MemStore {
    inner: RefCell<Mem>,
}

#[derive(Debug, Default)]
struct Mem {
    users: HashMap<String, UserRecord>,
    /// Login name → user id of every registered account (§5.3). A login name is the account's
    /// `meta.display_name` at registration and never changes after.
    accounts: HashMap<String, String>,
    /// The key first seen for each user hosted elsewhere (§7).
    peer_keys: HashMap<String, String>,
    servers: BTreeMap<String, ServerRecord>,
    channel_version: i64,
    seen: HashMap<[u8; 32], i64>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }
}

impl Persistence for MemStore {
    fn bind_user(&self, rec: &UserRecord) -> Result<(), PersistError> {
        let mut m = self.inner.borrow_mut();
        match m.users.get_mut(&rec.user_id) {
            None => {
                m.users.insert(
                    rec.user_id.clone(),
                    UserRecord {
                        user_id: rec.user_id.clone(),
                        pubkey: rec.pubkey.clone(),
                        privkey_store: String::new(),
                        pake_password: String::new(),
                        meta: rec.meta.clone(),
                        version: rec.version,
                    },
                );
            }
            Some(user) if user.pubkey != rec.pubkey => return Err(Conflict::KeyBound.into()),
            Some(user) => {
                if user.meta != rec.meta {
                    user.version = user.version.saturating_add(1).max(rec.version);
                    user.meta = rec.meta.clone();
                }
            }
        }
        Ok(())
    }

    fn register_account(&self, rec: &UserRecord) -> Result<(), PersistError> {
        let name = rec
            .meta
            .get("display_name")
            .and_then(serde_json::Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or(Conflict::DisplayNameMissing)?;
        if rec.pake_password.is_empty() {
            return Err(Conflict::PasswordMissing.into());
        }
        let mut m = self.inner.borrow_mut();
        if m.accounts.contains_key(name) {
            return Err(Conflict::DisplayNameTaken.into());
        }
        if m.users.contains_key(&rec.user_id) {
            return Err(Conflict::UserIdTaken.into());
        }
        m.accounts.insert(name.to_string(), rec.user_id.clone());
        m.users.insert(rec.user_id.clone(), rec.clone());
        Ok(())
    }

    fn user_by_display_name(&self, name: &str) -> Result<Option<UserRecord>, PersistError> {
        let m = self.inner.borrow();
        Ok(m.accounts.get(name).and_then(|id| m.users.get(id)).cloned())
    }

    fn known_user_key(&self, user_id: &str) -> Result<Option<String>, PersistError> {
        let m = self.inner.borrow();
        Ok(m.users
            .get(user_id)
            .map(|u| &u.pubkey)
            .or_else(|| m.peer_keys.get(user_id))
            .cloned())
    }

    fn remember_user_key(&self, user_id: &str, pubkey: &str) -> Result<(), PersistError> {
        self.inner
            .borrow_mut()
            .peer_keys
            .entry(user_id.to_string())
            .or_insert_with(|| pubkey.to_string());
        Ok(())
    }

    fn servers(&self) -> Result<Vec<ServerRecord>, PersistError> {
        Ok(self.inner.borrow().servers.values().cloned().collect())
    }

    fn upsert_server(&self, rec: &ServerRecord) -> Result<(), PersistError> {
        let mut m = self.inner.borrow_mut();
        let pinned = match m.servers.get(&rec.server_id) {
            Some(old) if old.pinned && !rec.pinned && old.pubkey != rec.pubkey => {
                return Err(Conflict::ServerPinned.into());
            }
            Some(old) => old.pinned || rec.pinned,
            None => rec.pinned,
        };
        m.servers.insert(
            rec.server_id.clone(),
            ServerRecord {
                pinned,
                ..rec.clone()
            },
        );
        Ok(())
    }

    fn public_channel_version(&self) -> Result<i64, PersistError> {
        Ok(self.inner.borrow().channel_version)
    }

    fn set_public_channel_version(&self, v: i64) -> Result<(), PersistError> {
        let mut m = self.inner.borrow_mut();
        m.channel_version = m.channel_version.max(v);
        Ok(())
    }

    fn remember_seen(&self, key: &[u8; 32], until_ms: i64) -> Result<(), PersistError> {
        self.inner.borrow_mut().seen.entry(*key).or_insert(until_ms);
        Ok(())
    }

    fn seen_entries(&self, now_ms: i64) -> Result<Vec<([u8; 32], i64)>, PersistError> {
        self.forget_seen(now_ms)?;
        let mut out: Vec<([u8; 32], i64)> = self
            .inner
            .borrow()
            .seen
            .iter()
            .map(|(k, until)| (*k, *until))
            .collect();
        out.sort_by_key(|&(key, until)| (until, key));
        Ok(out)
    }

    fn forget_seen(&self, now_ms: i64) -> Result<(), PersistError> {
        self.inner
            .borrow_mut()
            .seen
            .retain(|_, until| *until >= now_ms);
        Ok(())
    }

    fn checkpoint(&self) -> Result<(), PersistError> {
        Ok(())
    }
}
