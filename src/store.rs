//! SQLite persistence: one database per server (PROTOCOL.md §11).
//!
//! The store keeps what must survive a restart: every user ever bound to this server and the
//! registered accounts (§5.2, §5.3), the public channel's row and version (§8), the known and
//! pinned servers so links come back (§4.2), and a small key/value table for the server's own
//! settings. [`Store`] implements the core's [`Persistence`] trait (DESIGN.md "The shape"): the
//! server hands its `Store` to the core, which calls it synchronously and through the trait only;
//! the start-up code (`src/bin/socp-server.rs`, [`crate::identity`]) uses the rest ([`Store::open`],
//! `server_meta`). The records it keeps ([`UserRecord`], [`ServerRecord`]) are the core's types,
//! re-exported here.
//!
//! Rules every method keeps (§11):
//! - The journal is WAL with `synchronous=FULL`, so a write is on disk when its method returns
//!   `Ok` — the caller replies to the client only after that.
//! - All SQL is parameterised; no value is ever formatted into SQL text.
//! - The schema is versioned with `PRAGMA user_version` and migrated at open.
//! - A write is refused (`StoreError::Detached`) when the database or its WAL is no longer the
//!   file at its path: see `Files`.

use std::cell::Cell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};

use crate::core::persist::{Conflict, PersistError, Persistence};
pub use crate::core::persist::{ServerRecord, UserRecord};

/// Why a store operation failed; callers decide what to tell the client from the variant.
#[derive(Debug)]
pub enum StoreError {
    /// The database itself failed (I/O error inside SQLite, corrupt file, busy beyond the
    /// timeout, or a stored value that does not parse). Not the client's fault: log it and
    /// answer with a server error.
    Sqlite(rusqlite::Error),
    /// Creating the database's directory or file, or setting its permissions, failed.
    Io(std::io::Error),
    /// The write contradicts what is stored (a user id bound to another key, a display name or
    /// user id already taken, a server pinned to another key) or the record is unusable (e.g. an
    /// account with no display name). Nothing was written; the variant says which rule.
    Conflict(Conflict),
    /// The database cannot be used by this server (written by a newer version, or not in WAL
    /// mode): found at open; the message says why.
    Unusable(&'static str),
    /// The database file or its WAL was deleted or replaced while open (see `Files`): a write
    /// would land where the next start will not find it, so none is made or acknowledged.
    Detached,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Sqlite(e) => write!(f, "database error: {e}"),
            StoreError::Io(e) => write!(f, "database file error: {e}"),
            StoreError::Conflict(why) => why.fmt(f),
            StoreError::Unusable(why) => f.write_str(why),
            StoreError::Detached => f.write_str("the database file was deleted or replaced"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Sqlite(e) => Some(e),
            StoreError::Io(e) => Some(e),
            StoreError::Conflict(_) | StoreError::Unusable(_) | StoreError::Detached => None,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(e)
    }
}

/// For the core: a conflict stays a conflict; anything else is storage being unavailable.
impl From<StoreError> for PersistError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(c) => PersistError::Conflict(c),
            other => PersistError::Unavailable(Box::new(other)),
        }
    }
}

/// The server's database handle (§11). The server opens it and hands it to the core, which
/// uses it as its [`Persistence`]; single-threaded use.
pub struct Store {
    conn: Connection,
    /// A second connection to the same file for the seen-cache (§6 *Across restarts*) and
    /// the keys of users hosted elsewhere (§7), with `synchronous=NORMAL`: a row per frame from
    /// another server, or per user another server tells of, must not cost an fsync on the
    /// event loop (a mesh's logins learned a thousand users an fsync at a time, and a linked
    /// server could make up users to stall the loop). A WAL commit without fsync survives the
    /// process being killed, which is what a replay after a restart needs; an OS crash may lose
    /// the last few, a key then being learned again. `None` in memory.
    seen: Option<Connection>,
    /// The files of a database on disk; `None` in memory.
    files: Option<Files>,
}

/// Which files an open database is, so that a write is made and acknowledged only while they
/// are still the files at the database's path (§11: an account write is durable before the
/// client is told; issue "storage that disappears is not noticed").
///
/// SQLite keeps writing through its open descriptors to a database or WAL that was deleted or
/// replaced: the writes succeed, and the next start, which opens whatever is at the path, never
/// sees them. So every write method compares the (device, inode) of the database and of its WAL
/// at their paths with those recorded at open, before writing and again after committing, and
/// fails with [`StoreError::Detached`] if either differs or is gone. The first failure logs an
/// error. The `-shm` file holds no data (it is rebuilt from the WAL) and is not checked.
///
/// Storage is back only when the paths name the very same files again (e.g. they were moved
/// away and moved back). A new file at the path is never adopted while running: an empty one
/// would silently drop every account (and let someone register a taken name again), an old copy
/// would roll the server back behind its users' backs. Restarting the server opens whatever is
/// at the path then — the operator's decision.
#[derive(Debug)]
struct Files {
    db: PathBuf,
    wal: PathBuf,
    db_id: FileId,
    /// `None` if there was no WAL at open (nothing to compare).
    wal_id: Option<FileId>,
    /// Whether the last check failed, so that a loss and a return are each logged once.
    lost: Cell<bool>,
}

/// (device, inode) of a file.
type FileId = (u64, u64);

/// The (device, inode) of the file at `path`. On other systems than unix the files are not
/// compared (`(0, 0)` for any file that exists).
fn file_id(path: &Path) -> std::io::Result<FileId> {
    let meta = std::fs::metadata(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Ok((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Ok((0, 0))
    }
}

impl Files {
    /// Records the files at `path` and `path-wal`, which the caller has just opened.
    fn at(path: &Path) -> Result<Files, StoreError> {
        let db = std::path::absolute(path)?;
        let mut wal = db.clone().into_os_string();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        Ok(Files {
            db_id: file_id(&db)?,
            wal_id: file_id(&wal).ok(),
            db,
            wal,
            lost: Cell::new(false),
        })
    }

    /// `Ok` while the paths still name the files recorded at open.
    fn check(&self) -> Result<(), StoreError> {
        let same = file_id(&self.db).ok() == Some(self.db_id)
            && self
                .wal_id
                .is_none_or(|id| file_id(&self.wal).ok() == Some(id));
        if same {
            if self.lost.replace(false) {
                log::warn!(
                    "database {} is back at its path; writes resume",
                    self.db.display()
                );
            }
            Ok(())
        } else {
            if !self.lost.replace(true) {
                log::error!(
                    "database {} (or its -wal) is no longer the file at that path: deleted or \
                     replaced while open. Refusing every write until the same files are back; \
                     restart the server to open what is at the path now",
                    self.db.display()
                );
            }
            Err(StoreError::Detached)
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.conn.path())
            .finish()
    }
}

/// The schema version this code writes; `PRAGMA user_version` holds the version on disk.
const SCHEMA_VERSION: i64 = 2;

/// How long a statement waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The public channel's group row (§8).
const PUBLIC_GROUP: &str = "public";
const PUBLIC_CREATOR: &str = "system";

/// Schema version 1: the tables §11 names, with the columns it names, plus `server_meta`.
///
/// `users.display_name` is the login name of a registered account (§5.3), copied from
/// `meta.display_name` at registration and never changed after: `auth` is salted with it, so the
/// account can only ever log in under that name. It is unique among registered accounts
/// (`pake_password <> ''`); key-only users leave it NULL and may share names (§2).
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS users (
    user_id       TEXT PRIMARY KEY NOT NULL,
    pubkey        TEXT NOT NULL,
    privkey_store TEXT NOT NULL DEFAULT '',
    pake_password TEXT NOT NULL DEFAULT '',
    meta          TEXT NOT NULL DEFAULT '{}',
    version       INTEGER NOT NULL DEFAULT 0,
    display_name  TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS users_account_display_name
    ON users(display_name) WHERE pake_password <> '';
CREATE TABLE IF NOT EXISTS groups (
    group_id   TEXT PRIMARY KEY NOT NULL,
    creator_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    meta       TEXT NOT NULL DEFAULT '{}',
    version    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS group_members (
    group_id    TEXT NOT NULL,
    member_id   TEXT NOT NULL,
    role        TEXT NOT NULL DEFAULT 'member',
    wrapped_key TEXT NOT NULL DEFAULT '',
    added_at    INTEGER NOT NULL,
    PRIMARY KEY (group_id, member_id)
);
CREATE TABLE IF NOT EXISTS servers (
    server_id TEXT PRIMARY KEY NOT NULL,
    host      TEXT NOT NULL,
    port      INTEGER NOT NULL CHECK (port BETWEEN 0 AND 65535),
    pubkey    TEXT NOT NULL,
    pinned    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS server_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
";

/// Schema version 2: what guards against replays and key substitution across restarts.
///
/// - `seen_frames`: the seen-cache entries of frames from other servers whose payload carries
///   its own `ts` (§6): a replay after a restart is still a duplicate until the entry expires.
/// - `peer_user_keys`: the key first seen for each user hosted elsewhere (§7 *A user stays
///   where it is*): gossip never changes it, across restarts too.
const SCHEMA_V2: &str = "
CREATE TABLE IF NOT EXISTS seen_frames (
    key      BLOB PRIMARY KEY NOT NULL,
    until_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS peer_user_keys (
    user_id    TEXT PRIMARY KEY NOT NULL,
    pubkey     TEXT NOT NULL,
    first_seen INTEGER NOT NULL
);
";

const USER_COLUMNS: &str = "user_id, pubkey, privkey_store, pake_password, meta, version";

/// The `users` row a login lookup reads when no account has the name, so that a known and an
/// unknown name cost the same work (§5.3; issue: a login for a known name took ~8 µs longer,
/// because only it read a row, with its ~4 KiB sealed key spilling onto an overflow page).
/// Kept at a fixed rowid, so reaching it costs what reaching a found account's row costs; its
/// id cannot be a user's (§2 ids have no `#`); it has no login name, so it is never found as an
/// account; its fields have the sizes of a real account's, so it spans as many pages.
const LOGIN_DUMMY_ROWID: i64 = 0;
const LOGIN_DUMMY_ID: &str = "#login-dummy";
/// Lengths of an RSA-4096 public key (base64url DER SPKI, §3.2) and of its §5.3 `privkey_store`
/// (the test `login_lookup_reads_the_same_pages_for_known_and_unknown_names` checks them).
const SPKI_LEN: usize = 734;
const SEALED_KEY_LEN: usize = 4400;

impl Store {
    /// Opens (creating if needed) the server's database at `path` (§11): creates the parent
    /// directory, keeps the file private (mode 0600 on unix: it holds password hashes), turns on
    /// the WAL journal with `synchronous=FULL`, and creates or migrates the schema.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            create_private_dir_all(parent)?;
        }
        create_private_file(path)?;
        let conn = Connection::open(path)?;
        let mut store = Store::init(conn)?;
        let seen = Connection::open(path)?;
        seen.busy_timeout(BUSY_TIMEOUT)?;
        seen.pragma_update(None, "synchronous", "NORMAL")?;
        store.seen = Some(seen);
        // SQLite gives the -wal and -shm files the main file's mode; an older file made with a
        // looser mode is tightened here.
        restrict_permissions(path)?;
        let mode: String = store
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unusable("could not switch the database to WAL"));
        }
        // The migration's transaction has created the WAL, so both files exist now.
        store.files = Some(Files::at(path)?);
        Ok(store)
    }

    /// Opens a fresh database in memory with the same schema, for tests and throwaway servers.
    /// (SQLite keeps an in-memory database's journal in memory; there is no WAL.)
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Store::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store, StoreError> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // journal_mode answers with a row, so it is read rather than executed.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        // FULL: in WAL mode each commit fsyncs the WAL, so a committed account survives power
        // loss (§11 "durable before the client is told").
        conn.pragma_update(None, "synchronous", "FULL")?;
        let store = Store {
            conn,
            seen: None,
            files: None,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Brings the schema up to [`SCHEMA_VERSION`], one step per version, each in a transaction,
    /// and makes sure the public channel's row exists (§8).
    fn migrate(&self) -> Result<(), StoreError> {
        let tx = self.immediate()?;
        let on_disk: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if on_disk > SCHEMA_VERSION {
            return Err(StoreError::Unusable(
                "database was written by a newer version of this server",
            ));
        }
        if on_disk < 1 {
            tx.execute_batch(SCHEMA_V1)?;
        }
        if on_disk < 2 {
            tx.execute_batch(SCHEMA_V2)?;
        }
        // Later versions: `if on_disk < 3 { ... }` here.
        if on_disk != SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        tx.execute(
            "INSERT OR IGNORE INTO groups (group_id, creator_id, created_at, meta, version)
             VALUES (?1, ?2, ?3, '{}', 0)",
            params![PUBLIC_GROUP, PUBLIC_CREATOR, unix_ms()],
        )?;
        tx.execute(
            "INSERT OR IGNORE INTO users
                 (rowid, user_id, pubkey, privkey_store, pake_password, meta, version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
            params![
                LOGIN_DUMMY_ROWID,
                LOGIN_DUMMY_ID,
                "A".repeat(SPKI_LEN),
                "A".repeat(SEALED_KEY_LEN),
                crate::account::DUMMY_VERIFIER,
                r#"{"display_name":"login-dummy"}"#
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Fails with [`StoreError::Detached`] unless the database is still the file at its path
    /// (see `Files`). Every write method calls it before writing and after committing.
    fn check_files(&self) -> Result<(), StoreError> {
        self.files.as_ref().map_or(Ok(()), Files::check)
    }

    /// A write transaction that takes the write lock at BEGIN, so a read-check-write sequence
    /// cannot be raced by another connection.
    fn immediate(&self) -> Result<Transaction<'_>, StoreError> {
        Ok(Transaction::new_unchecked(
            &self.conn,
            TransactionBehavior::Immediate,
        )?)
    }

    /// Looks up a user by id: to check a hello's key against the bound one (§5.2).
    pub fn user(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE user_id = ?1");
        Ok(self
            .conn
            .prepare_cached(&sql)?
            .query_row([user_id], user_from_row)
            .optional()?)
    }

    /// Finds the registered account whose login name is `name`, for `USER_LOGIN` (§5.3). Only
    /// accounts with a password are found; key-only users are not accounts. The name is the
    /// `meta.display_name` given at registration, compared exactly.
    ///
    /// Known or not, the name costs the same work: one probe of the login-name index, then one
    /// row read by rowid and decoded — the account's, or else the dummy row (see
    /// `LOGIN_DUMMY_ROWID`), which is then reported as `None`.
    pub fn user_by_display_name(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users WHERE rowid = COALESCE(
                 (SELECT rowid FROM users WHERE display_name = ?1 AND pake_password <> ''),
                 ?2)"
        );
        let record = self
            .conn
            .prepare_cached(&sql)?
            .query_row(params![name, LOGIN_DUMMY_ROWID], user_from_row)
            .optional()?;
        Ok(record.filter(|r| r.user_id != LOGIN_DUMMY_ID))
    }

    /// Binds a user id to its key on its first hello (§5.2): inserts the user if absent; if
    /// present with the same `pubkey`, stores the new `meta` (bumping `version` if it changed);
    /// if present with another key, fails with [`Conflict::KeyBound`].
    ///
    /// Never creates or changes credentials: a new row is key-only (empty `privkey_store` and
    /// `pake_password`, whatever `rec` holds), and a registered account keeps its password, key
    /// blob and login name. A hello with unchanged meta writes nothing (no fsync per hello).
    pub fn bind_user(&self, rec: &UserRecord) -> Result<(), StoreError> {
        self.check_files()?;
        let tx = self.immediate()?;
        let existing: Option<(String, String, i64)> = tx
            .prepare_cached("SELECT pubkey, meta, version FROM users WHERE user_id = ?1")?
            .query_row([&rec.user_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        match existing {
            None => {
                tx.prepare_cached(
                    "INSERT INTO users
                         (user_id, pubkey, privkey_store, pake_password, meta, version)
                     VALUES (?1, ?2, '', '', ?3, ?4)",
                )?
                .execute(params![
                    rec.user_id,
                    rec.pubkey,
                    rec.meta.to_string(),
                    rec.version
                ])?;
            }
            Some((pubkey, _, _)) if pubkey != rec.pubkey => {
                return Err(StoreError::Conflict(Conflict::KeyBound));
            }
            Some((_, old_meta, old_version)) => {
                let unchanged = serde_json::from_str::<serde_json::Value>(&old_meta)
                    .is_ok_and(|old| old == rec.meta);
                if unchanged {
                    return Ok(()); // the transaction rolls back; nothing was written
                }
                let version = old_version.saturating_add(1).max(rec.version);
                tx.prepare_cached("UPDATE users SET meta = ?1, version = ?2 WHERE user_id = ?3")?
                    .execute(params![rec.meta.to_string(), version, rec.user_id])?;
            }
        }
        tx.commit()?;
        self.check_files()
    }

    /// Creates a registered account for `USER_REGISTER` (§5.3): a new user with its key blob and
    /// password hash, whose login name is `meta.display_name`. Committed (on disk) when it
    /// returns `Ok`, so the caller may then send `USER_REGISTERED` (§11).
    ///
    /// Fails with [`Conflict::DisplayNameMissing`] / [`Conflict::PasswordMissing`] if `rec` is
    /// not an account, [`Conflict::DisplayNameTaken`] if another registered account has that
    /// name (the caller answers `NAME_IN_USE`), and [`Conflict::UserIdTaken`] if the user id
    /// exists (registered or key-only). Checked in that order.
    pub fn register_account(&self, rec: &UserRecord) -> Result<(), StoreError> {
        let name = rec
            .meta
            .get("display_name")
            .and_then(serde_json::Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or(StoreError::Conflict(Conflict::DisplayNameMissing))?;
        if rec.pake_password.is_empty() {
            return Err(StoreError::Conflict(Conflict::PasswordMissing));
        }
        self.check_files()?;
        let tx = self.immediate()?;
        let name_taken = tx
            .prepare_cached("SELECT 1 FROM users WHERE display_name = ?1 AND pake_password <> ''")?
            .exists([name])?;
        if name_taken {
            return Err(StoreError::Conflict(Conflict::DisplayNameTaken));
        }
        let id_taken = tx
            .prepare_cached("SELECT 1 FROM users WHERE user_id = ?1")?
            .exists([&rec.user_id])?;
        if id_taken {
            return Err(StoreError::Conflict(Conflict::UserIdTaken));
        }
        tx.prepare_cached(
            "INSERT INTO users
                 (user_id, pubkey, privkey_store, pake_password, meta, version, display_name)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            rec.user_id,
            rec.pubkey,
            rec.privkey_store,
            rec.pake_password,
            rec.meta.to_string(),
            rec.version,
            name
        ])?;
        tx.commit()?;
        self.check_files()
    }

    /// Every known server, ordered by id: at start the net layer redials them and loads their
    /// pins (§4.2, §11 "so links come back after a restart").
    pub fn servers(&self) -> Result<Vec<ServerRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT server_id, host, port, pubkey, pinned FROM servers ORDER BY server_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ServerRecord {
                server_id: r.get(0)?,
                host: r.get(1)?,
                port: r.get(2)?,
                pubkey: r.get(3)?,
                pinned: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Records a server learned from the bootstrap list, `SERVER_WELCOME` or `SERVER_ANNOUNCE`
    /// (§4): inserts it, or updates its address and key.
    ///
    /// Pins only accumulate: `pinned` never goes from true to false here. A pinned server's key
    /// is replaced only by a record that is itself pinned (trusted, §4.2); an unpinned record
    /// with another key fails with [`Conflict::ServerPinned`] and changes
    /// nothing, so an unvouched claim cannot overwrite a pin.
    pub fn upsert_server(&self, rec: &ServerRecord) -> Result<(), StoreError> {
        self.check_files()?;
        let tx = self.immediate()?;
        let existing: Option<(String, bool)> = tx
            .prepare_cached("SELECT pubkey, pinned FROM servers WHERE server_id = ?1")?
            .query_row([&rec.server_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((pubkey, true)) = &existing
            && !rec.pinned
            && *pubkey != rec.pubkey
        {
            return Err(StoreError::Conflict(Conflict::ServerPinned));
        }
        tx.prepare_cached(
            "INSERT INTO servers (server_id, host, port, pubkey, pinned)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (server_id) DO UPDATE SET
                 host = excluded.host,
                 port = excluded.port,
                 pubkey = excluded.pubkey,
                 pinned = MAX(servers.pinned, excluded.pinned)",
        )?
        .execute(params![
            rec.server_id,
            rec.host,
            rec.port,
            rec.pubkey,
            rec.pinned
        ])?;
        tx.commit()?;
        self.check_files()
    }

    /// Reads a server setting from `server_meta` (e.g. the server's own id, so it survives
    /// restarts, §4.1).
    pub fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT value FROM server_meta WHERE key = ?1")?
            .query_row([key], |r| r.get(0))
            .optional()?)
    }

    /// Writes a server setting to `server_meta`, replacing any old value; durable on `Ok`.
    pub fn meta_set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.check_files()?;
        self.conn
            .prepare_cached(
                "INSERT INTO server_meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute([key, value])?;
        self.check_files()
    }

    /// The public channel's stored `version` (§8), so it keeps growing across restarts.
    pub fn public_channel_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT version FROM groups WHERE group_id = ?1")?
            .query_row([PUBLIC_GROUP], |r| r.get(0))?)
    }

    /// Stores the public channel's `version` (§8: it only grows; a server adopts the largest it
    /// sees): the stored value becomes `max(stored, v)`.
    pub fn set_public_channel_version(&self, v: i64) -> Result<(), StoreError> {
        self.check_files()?;
        self.conn
            .prepare_cached("UPDATE groups SET version = MAX(version, ?1) WHERE group_id = ?2")?
            .execute(params![v, PUBLIC_GROUP])?;
        self.check_files()
    }

    /// Records a seen-cache entry kept until `until_ms` (wall ms, §6 *Across restarts*).
    pub fn remember_seen(&self, key: &[u8; 32], until_ms: i64) -> Result<(), StoreError> {
        self.seen
            .as_ref()
            .unwrap_or(&self.conn)
            .prepare_cached("INSERT OR IGNORE INTO seen_frames (key, until_ms) VALUES (?1, ?2)")?
            .execute(params![&key[..], until_ms])?;
        Ok(())
    }

    /// Deletes the entries expired at `now_ms`, then returns those left, oldest expiry first.
    pub fn seen_entries(&self, now_ms: i64) -> Result<Vec<([u8; 32], i64)>, StoreError> {
        self.forget_seen(now_ms)?;
        let mut stmt = self
            .conn
            .prepare("SELECT key, until_ms FROM seen_frames ORDER BY until_ms")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (key, until) = row?;
            if let Ok(key) = <[u8; 32]>::try_from(key.as_slice()) {
                out.push((key, until));
            }
        }
        Ok(out)
    }

    /// Deletes the seen-cache entries expired at `now_ms`.
    pub fn forget_seen(&self, now_ms: i64) -> Result<(), StoreError> {
        self.seen
            .as_ref()
            .unwrap_or(&self.conn)
            .prepare_cached("DELETE FROM seen_frames WHERE until_ms < ?1")?
            .execute([now_ms])?;
        Ok(())
    }

    /// The key known for `user_id`: the one it is bound to here (§5.2), else the one first seen
    /// for it from another server (§7).
    pub fn known_user_key(&self, user_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT pubkey FROM users WHERE user_id = ?1
                 UNION ALL SELECT pubkey FROM peer_user_keys WHERE user_id = ?1 LIMIT 1",
            )?
            .query_row([user_id], |r| r.get(0))
            .optional()?)
    }

    /// Remembers `pubkey` as the key of remote user `user_id`, unless one is known already.
    pub fn remember_user_key(&self, user_id: &str, pubkey: &str) -> Result<(), StoreError> {
        self.seen
            .as_ref()
            .unwrap_or(&self.conn)
            .prepare_cached(
                "INSERT OR IGNORE INTO peer_user_keys (user_id, pubkey, first_seen)
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![user_id, pubkey, unix_ms()])?;
        Ok(())
    }

    /// Folds the WAL back into the main file and truncates it (`PRAGMA wal_checkpoint(TRUNCATE)`),
    /// e.g. at clean shutdown or when idle, so the WAL does not grow without bound. A checkpoint
    /// blocked by a reader is not an error; the next one catches up.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy != 0 {
            log::debug!("WAL checkpoint could not complete (database busy)");
        }
        Ok(())
    }
}

/// The core's operations (see [`Persistence`] for what each promises) are the methods of the
/// same names above; errors other than a conflict become [`PersistError::Unavailable`].
impl Persistence for Store {
    fn bind_user(&self, rec: &UserRecord) -> Result<(), PersistError> {
        Ok(Store::bind_user(self, rec)?)
    }

    fn register_account(&self, rec: &UserRecord) -> Result<(), PersistError> {
        Ok(Store::register_account(self, rec)?)
    }

    fn user_by_display_name(&self, name: &str) -> Result<Option<UserRecord>, PersistError> {
        Ok(Store::user_by_display_name(self, name)?)
    }

    fn known_user_key(&self, user_id: &str) -> Result<Option<String>, PersistError> {
        Ok(Store::known_user_key(self, user_id)?)
    }

    fn remember_user_key(&self, user_id: &str, pubkey: &str) -> Result<(), PersistError> {
        Ok(Store::remember_user_key(self, user_id, pubkey)?)
    }

    fn servers(&self) -> Result<Vec<ServerRecord>, PersistError> {
        Ok(Store::servers(self)?)
    }

    fn upsert_server(&self, rec: &ServerRecord) -> Result<(), PersistError> {
        Ok(Store::upsert_server(self, rec)?)
    }

    fn public_channel_version(&self) -> Result<i64, PersistError> {
        Ok(Store::public_channel_version(self)?)
    }

    fn set_public_channel_version(&self, v: i64) -> Result<(), PersistError> {
        Ok(Store::set_public_channel_version(self, v)?)
    }

    fn remember_seen(&self, key: &[u8; 32], until_ms: i64) -> Result<(), PersistError> {
        Ok(Store::remember_seen(self, key, until_ms)?)
    }

    fn seen_entries(&self, now_ms: i64) -> Result<Vec<([u8; 32], i64)>, PersistError> {
        Ok(Store::seen_entries(self, now_ms)?)
    }

    fn forget_seen(&self, now_ms: i64) -> Result<(), PersistError> {
        Ok(Store::forget_seen(self, now_ms)?)
    }

    fn checkpoint(&self) -> Result<(), PersistError> {
        Ok(Store::checkpoint(self)?)
    }
}

/// Maps a `SELECT {USER_COLUMNS}` row; `meta` is JSON text.
fn user_from_row(r: &Row<'_>) -> rusqlite::Result<UserRecord> {
    let meta: String = r.get(4)?;
    let meta = serde_json::from_str(&meta).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(UserRecord {
        user_id: r.get(0)?,
        pubkey: r.get(1)?,
        privkey_store: r.get(2)?,
        pake_password: r.get(3)?,
        meta,
        version: r.get(5)?,
    })
}

/// Unix time in milliseconds (§1 `ts` units), for `created_at`.
fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Creates the database's directory (and its parents), private to the server's user on unix.
fn create_private_dir_all(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates the database file with mode 0600 before SQLite opens it, so it is never readable by
/// others, even briefly (it holds password hashes, §5.3).
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets mode 0600 on the database file and its WAL companions, if present (unix only).
fn restrict_permissions(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let p = Path::new(&p);
            match std::fs::metadata(p) {
                Ok(m) if m.permissions().mode() & 0o777 != 0o600 => {
                    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !suffix.is_empty() => {}
                Err(e) => return Err(e),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    /// A unique temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir()
                .join(format!("socp-store-{tag}-{}-{nanos}", std::process::id()));
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn key_user(id: &str, key: &str, name: &str) -> UserRecord {
        UserRecord {
            user_id: id.into(),
            pubkey: key.into(),
            privkey_store: String::new(),
            pake_password: String::new(),
            meta: json!({ "display_name": name }),
            version: 1,
        }
    }

    fn account(id: &str, key: &str, name: &str) -> UserRecord {
        UserRecord {
            privkey_store: format!("blob-{id}"),
            pake_password: format!("hash-{id}"),
            ..key_user(id, key, name)
        }
    }

    fn server(id: &str, key: &str, pinned: bool) -> ServerRecord {
        ServerRecord {
            server_id: id.into(),
            host: "127.0.0.1".into(),
            port: 9000,
            pubkey: key.into(),
            pinned,
        }
    }

    fn conflict(r: Result<(), StoreError>) -> &'static str {
        match r {
            Err(StoreError::Conflict(why)) => why.as_str(),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[test]
    fn bind_then_rebind() {
        let s = Store::open_in_memory().unwrap();
        assert_eq!(s.user("alice").unwrap(), None);
        s.bind_user(&key_user("alice", "K1", "Alice")).unwrap();
        let got = s.user("alice").unwrap().unwrap();
        assert_eq!(got, key_user("alice", "K1", "Alice"));

        // Same key, same meta: fine, nothing changes.
        s.bind_user(&key_user("alice", "K1", "Alice")).unwrap();
        assert_eq!(s.user("alice").unwrap().unwrap().version, 1);
        // Same key, new meta: stored, version grows.
        s.bind_user(&key_user("alice", "K1", "Alicia")).unwrap();
        let got = s.user("alice").unwrap().unwrap();
        assert_eq!(got.meta, json!({ "display_name": "Alicia" }));
        assert_eq!(got.version, 2);
        // Another key: refused, row untouched.
        assert_eq!(
            conflict(s.bind_user(&key_user("alice", "K2", "Mallory"))),
            "user id bound to another key"
        );
        assert_eq!(s.user("alice").unwrap().unwrap().pubkey, "K1");
    }

    #[test]
    fn bind_never_creates_credentials() {
        let s = Store::open_in_memory().unwrap();
        s.bind_user(&account("bob", "K", "Bob")).unwrap();
        let got = s.user("bob").unwrap().unwrap();
        assert!(got.pake_password.is_empty() && got.privkey_store.is_empty());
        assert_eq!(s.user_by_display_name("Bob").unwrap(), None);
    }

    #[test]
    fn register_and_find_by_display_name() {
        let s = Store::open_in_memory().unwrap();
        // A key-only user may carry the name; it is not an account.
        s.bind_user(&key_user("k1", "KK", "Carol")).unwrap();
        assert_eq!(s.user_by_display_name("Carol").unwrap(), None);

        s.register_account(&account("c1", "KC", "Carol")).unwrap();
        let got = s.user_by_display_name("Carol").unwrap().unwrap();
        assert_eq!(got, account("c1", "KC", "Carol"));
        assert_eq!(s.user("c1").unwrap().unwrap(), got);
        // Names compare exactly.
        assert_eq!(s.user_by_display_name("carol").unwrap(), None);

        assert_eq!(
            conflict(s.register_account(&account("c2", "KC2", "Carol"))),
            "display name taken"
        );
        assert_eq!(s.user("c2").unwrap(), None);
        assert_eq!(
            conflict(s.register_account(&account("c1", "KC", "Carol2"))),
            "user id taken"
        );
        assert_eq!(
            conflict(s.register_account(&account("k1", "KK", "Kay"))),
            "user id taken"
        );
        let mut nameless = account("n1", "KN", "x");
        nameless.meta = json!({});
        assert_eq!(
            conflict(s.register_account(&nameless)),
            "display name missing"
        );
        assert_eq!(
            conflict(s.register_account(&key_user("n2", "KN", "Nopass"))),
            "password missing"
        );

        // A later hello of the account updates meta but keeps credentials and login name.
        s.bind_user(&key_user("c1", "KC", "Caro")).unwrap();
        let got = s.user_by_display_name("Carol").unwrap().unwrap();
        assert_eq!(got.user_id, "c1");
        assert_eq!(got.pake_password, "hash-c1");
        assert_eq!(got.meta, json!({ "display_name": "Caro" }));
    }

    #[test]
    fn servers_upsert_keeps_pin() {
        let s = Store::open_in_memory().unwrap();
        assert!(s.servers().unwrap().is_empty());
        s.upsert_server(&server("b", "KB", false)).unwrap();
        s.upsert_server(&server("a", "KA", true)).unwrap();
        // An unpinned update of a pinned server: address changes, pin stays.
        let mut moved = server("a", "KA", false);
        moved.host = "example.org".into();
        moved.port = 65535;
        s.upsert_server(&moved).unwrap();
        // Pinning an unpinned one works.
        s.upsert_server(&server("b", "KB2", true)).unwrap();
        assert_eq!(
            s.servers().unwrap(),
            vec![
                ServerRecord {
                    pinned: true,
                    ..moved.clone()
                },
                server("b", "KB2", true)
            ]
        );
        // An unpinned record cannot replace a pinned key.
        assert_eq!(
            conflict(s.upsert_server(&server("a", "EVIL", false))),
            "server pinned to another key"
        );
        assert_eq!(s.servers().unwrap()[0].pubkey, "KA");
        // A pinned (trusted) record can.
        s.upsert_server(&server("a", "KA2", true)).unwrap();
        assert_eq!(s.servers().unwrap()[0].pubkey, "KA2");
    }

    #[test]
    fn channel_version_only_grows() {
        let s = Store::open_in_memory().unwrap();
        assert_eq!(s.public_channel_version().unwrap(), 0);
        s.set_public_channel_version(5).unwrap();
        assert_eq!(s.public_channel_version().unwrap(), 5);
        s.set_public_channel_version(3).unwrap();
        assert_eq!(s.public_channel_version().unwrap(), 5);
        s.set_public_channel_version(6).unwrap();
        assert_eq!(s.public_channel_version().unwrap(), 6);
    }

    #[test]
    fn meta_table() {
        let s = Store::open_in_memory().unwrap();
        assert_eq!(s.meta_get("server_id").unwrap(), None);
        s.meta_set("server_id", "one").unwrap();
        s.meta_set("server_id", "two").unwrap();
        assert_eq!(s.meta_get("server_id").unwrap().as_deref(), Some("two"));
    }

    #[test]
    fn quotes_round_trip() {
        let s = Store::open_in_memory().unwrap();
        let id = "o'brien\"; DROP TABLE users; --";
        s.bind_user(&key_user(id, "K'", "it's")).unwrap();
        let got = s.user(id).unwrap().unwrap();
        assert_eq!(got.user_id, id);
        assert_eq!(got.pubkey, "K'");
        assert_eq!(got.meta["display_name"], "it's");
        s.register_account(&account("x'y", "K", "d'n")).unwrap();
        assert_eq!(
            s.user_by_display_name("d'n").unwrap().unwrap().user_id,
            "x'y"
        );
        s.meta_set("k'", "v'").unwrap();
        assert_eq!(s.meta_get("k'").unwrap().as_deref(), Some("v'"));
        s.upsert_server(&server("s'", "K'", true)).unwrap();
        assert_eq!(s.servers().unwrap()[0].server_id, "s'");
    }

    #[test]
    fn schema_has_the_tables_section_11_names() {
        let s = Store::open_in_memory().unwrap();
        for (table, cols) in [
            (
                "users",
                &[
                    "user_id",
                    "pubkey",
                    "privkey_store",
                    "pake_password",
                    "meta",
                    "version",
                ][..],
            ),
            (
                "groups",
                &["group_id", "creator_id", "created_at", "meta", "version"][..],
            ),
            (
                "group_members",
                &["group_id", "member_id", "role", "wrapped_key", "added_at"][..],
            ),
            (
                "servers",
                &["server_id", "host", "port", "pubkey", "pinned"][..],
            ),
            ("server_meta", &["key", "value"][..]),
        ] {
            let mut stmt = s
                .conn
                .prepare("SELECT name FROM pragma_table_info(?1)")
                .unwrap();
            let have: Vec<String> = stmt
                .query_map([table], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            for c in cols {
                assert!(have.iter().any(|h| h == c), "{table}.{c} missing");
            }
        }
        let creator: String = s
            .conn
            .query_row(
                "SELECT creator_id FROM groups WHERE group_id = 'public'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(creator, "system");
    }

    #[test]
    fn file_db_is_wal_private_and_survives_reopen() {
        let tmp = TempDir::new("reopen");
        let path = tmp.0.join("nested").join("server.db");
        {
            let s = Store::open(&path).unwrap();
            let mode: String = s
                .conn
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
            let sync: i64 = s
                .conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap();
            assert_eq!(sync, 2, "synchronous=FULL");

            s.register_account(&account("u1", "K1", "Dana")).unwrap();
            s.bind_user(&key_user("u2", "K2", "Eve")).unwrap();
            s.upsert_server(&server("srv-a", "KS", true)).unwrap();
            s.meta_set("server_id", "me").unwrap();
            s.set_public_channel_version(7).unwrap();
            // Drop without a checkpoint: the data must come back from the WAL too.
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(
                s.user_by_display_name("Dana").unwrap().unwrap(),
                account("u1", "K1", "Dana")
            );
            assert_eq!(s.user("u2").unwrap().unwrap(), key_user("u2", "K2", "Eve"));
            assert_eq!(s.servers().unwrap(), vec![server("srv-a", "KS", true)]);
            assert_eq!(s.meta_get("server_id").unwrap().as_deref(), Some("me"));
            assert_eq!(s.public_channel_version().unwrap(), 7);
            let v: i64 = s
                .conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v, SCHEMA_VERSION);
            assert_eq!(
                conflict(s.register_account(&account("u3", "K3", "Dana"))),
                "display name taken"
            );
            s.checkpoint().unwrap();
        }
        // Still there after a checkpoint folded the WAL into the main file.
        let s = Store::open(&path).unwrap();
        assert_eq!(s.user("u1").unwrap().unwrap().user_id, "u1");
    }

    /// Issue "storage that disappears is not noticed" (§11): writes into files that are no
    /// longer at the database's path are refused, and resume when the same files are back.
    #[test]
    fn writes_are_refused_while_the_database_files_are_not_at_their_path() {
        let tmp = TempDir::new("detached");
        let path = tmp.0.join("server.db");
        let s = Store::open(&path).unwrap();
        s.register_account(&account("u1", "K1", "Dana")).unwrap();
        let side = tmp.0.join("aside");
        std::fs::create_dir(&side).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let name = format!("server.db{suffix}");
            std::fs::rename(tmp.0.join(&name), side.join(&name)).unwrap();
        }
        let refused = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Detached));
        assert!(refused(s.register_account(&account("u2", "K2", "Eve"))));
        assert!(refused(s.bind_user(&key_user("u1", "K1", "Dana"))));
        assert!(refused(s.bind_user(&key_user("u3", "K3", "Fay"))));
        assert!(refused(s.upsert_server(&server("srv-a", "KS", true))));
        assert!(refused(s.meta_set("server_id", "me")));
        assert!(refused(s.set_public_channel_version(3)));
        // A new, empty database at the path is not adopted.
        drop(Store::open(&path).unwrap());
        assert!(refused(s.register_account(&account("u2", "K2", "Eve"))));
        // The same files moved back: writes resume.
        for suffix in ["", "-wal", "-shm"] {
            let name = format!("server.db{suffix}");
            let _ = std::fs::remove_file(tmp.0.join(&name));
            std::fs::rename(side.join(&name), tmp.0.join(&name)).unwrap();
        }
        s.register_account(&account("u2", "K2", "Eve")).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.user("u1").unwrap().unwrap().user_id, "u1");
        assert_eq!(s.user("u2").unwrap().unwrap().user_id, "u2");
    }

    /// Only the WAL deleted: the committed writes in it would be lost at the next start too.
    #[test]
    fn a_write_is_refused_when_only_the_wal_is_deleted() {
        let tmp = TempDir::new("walgone");
        let path = tmp.0.join("server.db");
        let s = Store::open(&path).unwrap();
        s.meta_set("k", "v").unwrap();
        std::fs::remove_file(tmp.0.join("server.db-wal")).unwrap();
        assert!(matches!(s.meta_set("k", "w"), Err(StoreError::Detached)));
    }

    /// Pages SQLite has fetched on `s`'s connection so far (from its cache or from the file).
    fn pages_fetched(s: &Store) -> i64 {
        let mut total = 0;
        for op in [
            rusqlite::ffi::SQLITE_DBSTATUS_CACHE_HIT,
            rusqlite::ffi::SQLITE_DBSTATUS_CACHE_MISS,
        ] {
            let (mut cur, mut high) = (0, 0);
            // SAFETY: the handle is valid for as long as `s` lives, and sqlite3_db_status only
            // reads counters into the two integers we own.
            let rc = unsafe {
                rusqlite::ffi::sqlite3_db_status(s.conn.handle(), op, &mut cur, &mut high, 0)
            };
            assert_eq!(rc, rusqlite::ffi::SQLITE_OK);
            total += i64::from(cur);
        }
        total
    }

    /// Issue (timing): a `USER_LOGIN` for a known name took ~8 µs longer than for an unknown
    /// one, because only a known name read a row (with its ~4 KiB sealed key). Timing tests are
    /// flaky, so this asserts the cause instead: the lookup reads as many database pages for an
    /// unknown name as for a known one, and decodes a row either way.
    #[test]
    fn login_lookup_reads_the_same_pages_for_known_and_unknown_names() {
        let tmp = TempDir::new("lookup");
        let s = Store::open(&tmp.0.join("server.db")).unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys/user1.pem");
        let key =
            crate::crypto::PrivateKey::from_pem(&std::fs::read_to_string(path).unwrap()).unwrap();
        // One real account (a sealed RSA-4096 key), and more of the same size.
        let mut real = account("00000000-0000-4000-8000-000000000000", "K", "user-0");
        real.pubkey = key.public_key().encoded().to_string();
        real.privkey_store = crate::account::seal_private_key(&key, "pw");
        real.pake_password = crate::account::password_verifier(&[0; 32]);
        assert_eq!(real.pubkey.len(), SPKI_LEN);
        assert!(
            real.privkey_store.len().abs_diff(SEALED_KEY_LEN) < 16,
            "a sealed key is {} long",
            real.privkey_store.len()
        );
        for i in 0..200 {
            let mut rec = real.clone();
            rec.user_id = format!("{i:08}-0000-4000-8000-000000000000");
            rec.meta = json!({ "display_name": format!("user-{i}") });
            s.register_account(&rec).unwrap();
        }
        let cost = |name: &str| {
            let before = pages_fetched(&s);
            let found = s.user_by_display_name(name).unwrap();
            (pages_fetched(&s) - before, found.is_some())
        };
        // Warm the statement cache, then compare.
        cost("user-7");
        for (known, unknown) in [
            ("user-7", "nobody"),
            ("user-150", "user-1500"),
            ("user-0", ""),
        ] {
            let (k, found) = cost(known);
            let (u, not_found) = cost(unknown);
            assert!(found && !not_found);
            assert_eq!(k, u, "pages read for {known:?} and for {unknown:?}");
        }
    }

    #[test]
    fn newer_schema_is_refused() {
        let tmp = TempDir::new("newer");
        let path = tmp.0.join("server.db");
        drop(Store::open(&path).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        assert!(matches!(Store::open(&path), Err(StoreError::Unusable(_))));
    }

    #[test]
    fn debug_redacts_secrets() {
        let text = format!("{:?}", account("z", "K", "Zed"));
        assert!(
            !text.contains("hash-z") && !text.contains("blob-z"),
            "{text}"
        );
    }
}
