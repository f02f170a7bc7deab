//! One behavioural suite for every [`Persistence`] the core can be given: the SQLite `Store`
//! (in memory, and on disk, where the seen-cache has its own connection) and the in-memory
//! `MemStore` the core tests use. Each test body below runs against all three (see `suite!` at
//! the end), through the trait only, so the two implementations cannot drift apart unnoticed.

mod common;

use common::proc::TempDir;
use serde_json::json;
use socp::core::persist::{
    Conflict, MemStore, PersistError, Persistence, ServerRecord, UserRecord,
};
use socp::store::Store;

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

/// The conflict `r` failed with; panics on success or on any other error.
fn conflict(r: Result<(), PersistError>) -> Conflict {
    match r {
        Err(PersistError::Conflict(c)) => c,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn key_of(s: &dyn Persistence, id: &str) -> Option<String> {
    s.known_user_key(id).unwrap()
}

// ------------------------------------------------------------------- the bodies

/// §5.2: a user id is bound to the key of its first hello and keeps it.
fn a_binding_keeps_its_first_key(s: &dyn Persistence) {
    assert_eq!(key_of(s, "alice"), None);
    s.bind_user(&key_user("alice", "K1", "Alice")).unwrap();
    assert_eq!(key_of(s, "alice").as_deref(), Some("K1"));
    // The same key again, with the same or another meta: fine.
    s.bind_user(&key_user("alice", "K1", "Alice")).unwrap();
    s.bind_user(&key_user("alice", "K1", "Alicia")).unwrap();
    // Another key: refused, binding untouched.
    assert_eq!(
        conflict(s.bind_user(&key_user("alice", "K2", "Mallory"))),
        Conflict::KeyBound
    );
    assert_eq!(key_of(s, "alice").as_deref(), Some("K1"));
    // Other ids are independent.
    s.bind_user(&key_user("bob", "K2", "Bob")).unwrap();
    assert_eq!(key_of(s, "bob").as_deref(), Some("K2"));
}

/// A hello never creates an account, whatever the record it binds carries.
fn a_binding_never_creates_credentials(s: &dyn Persistence) {
    s.bind_user(&account("bob", "K", "Bob")).unwrap();
    assert_eq!(s.user_by_display_name("Bob").unwrap(), None);
    assert_eq!(key_of(s, "bob").as_deref(), Some("K"));
    // The id is taken now, for registration too.
    assert_eq!(
        conflict(s.register_account(&account("bob", "K", "Bobby"))),
        Conflict::UserIdTaken
    );
    assert_eq!(s.user_by_display_name("Bobby").unwrap(), None);
}

/// §5.3: registration's rules, checked in the documented order, and a refused one writes
/// nothing.
fn registration_conflicts(s: &dyn Persistence) {
    // A key-only user may carry a name; it does not own it.
    s.bind_user(&key_user("k1", "KK", "Carol")).unwrap();
    assert_eq!(s.user_by_display_name("Carol").unwrap(), None);

    s.register_account(&account("c1", "KC", "Carol")).unwrap();
    assert_eq!(
        s.user_by_display_name("Carol").unwrap(),
        Some(account("c1", "KC", "Carol"))
    );
    // Names compare exactly.
    assert_eq!(s.user_by_display_name("carol").unwrap(), None);

    // The name is checked before the id: both taken → the name.
    assert_eq!(
        conflict(s.register_account(&account("c1", "KC", "Carol"))),
        Conflict::DisplayNameTaken
    );
    assert_eq!(
        conflict(s.register_account(&account("c2", "KC2", "Carol"))),
        Conflict::DisplayNameTaken
    );
    assert_eq!(
        key_of(s, "c2"),
        None,
        "a refused registration wrote nothing"
    );
    assert_eq!(
        conflict(s.register_account(&account("k1", "KK", "Kay"))),
        Conflict::UserIdTaken
    );
    assert_eq!(s.user_by_display_name("Kay").unwrap(), None);

    // Not an account: no name (checked first), no password.
    let mut nameless = key_user("n1", "KN", "x");
    nameless.meta = json!({});
    assert_eq!(
        conflict(s.register_account(&nameless)),
        Conflict::DisplayNameMissing
    );
    nameless.meta = json!({ "display_name": "" });
    assert_eq!(
        conflict(s.register_account(&nameless)),
        Conflict::DisplayNameMissing
    );
    assert_eq!(
        conflict(s.register_account(&key_user("n2", "KN", "Nopass"))),
        Conflict::PasswordMissing
    );
    assert_eq!(key_of(s, "n1"), None);
    assert_eq!(key_of(s, "n2"), None);
}

/// A later hello of an account updates its meta (and version) but never its credentials or
/// its login name; an unchanged meta changes nothing.
fn a_hello_updates_an_accounts_meta_only(s: &dyn Persistence) {
    s.register_account(&account("d1", "KD", "Dana")).unwrap();
    s.bind_user(&key_user("d1", "KD", "Dana")).unwrap();
    assert_eq!(s.user_by_display_name("Dana").unwrap().unwrap().version, 1);

    s.bind_user(&key_user("d1", "KD", "Dee")).unwrap();
    let got = s.user_by_display_name("Dana").unwrap().unwrap();
    assert_eq!(got.meta, json!({ "display_name": "Dee" }));
    assert_eq!(got.version, 2);
    assert_eq!(got.pake_password, "hash-d1");
    assert_eq!(got.privkey_store, "blob-d1");
    assert_eq!(s.user_by_display_name("Dee").unwrap(), None);

    // A record that claims a higher version wins over old + 1.
    let mut newer = key_user("d1", "KD", "Dot");
    newer.version = 10;
    s.bind_user(&newer).unwrap();
    assert_eq!(s.user_by_display_name("Dana").unwrap().unwrap().version, 10);
    // Same meta again: version stays.
    s.bind_user(&key_user("d1", "KD", "Dot")).unwrap();
    assert_eq!(s.user_by_display_name("Dana").unwrap().unwrap().version, 10);
}

/// §7: the key first seen for a remote user stays; a user bound here is known by its binding.
fn remote_user_keys_keep_the_first_seen(s: &dyn Persistence) {
    s.remember_user_key("remote", "R1").unwrap();
    s.remember_user_key("remote", "R2").unwrap();
    assert_eq!(key_of(s, "remote").as_deref(), Some("R1"));

    s.bind_user(&key_user("local", "L1", "Lo")).unwrap();
    s.remember_user_key("local", "R3").unwrap();
    assert_eq!(key_of(s, "local").as_deref(), Some("L1"));
    assert_eq!(key_of(s, "nobody"), None);
}

/// §4.2: servers come back ordered by id; pins only accumulate; an unpinned record cannot
/// replace a pinned key, a pinned one can.
fn servers_keep_their_pins(s: &dyn Persistence) {
    assert!(s.servers().unwrap().is_empty());
    s.upsert_server(&server("b", "KB", false)).unwrap();
    s.upsert_server(&server("a", "KA", true)).unwrap();
    // An unpinned update of a pinned server with the same key: address changes, pin stays.
    let mut moved = server("a", "KA", false);
    moved.host = "example.org".into();
    moved.port = 65535;
    s.upsert_server(&moved).unwrap();
    // An unpinned server's key may change, and it may be pinned.
    s.upsert_server(&server("b", "KB2", true)).unwrap();
    s.upsert_server(&server("c", "KC", false)).unwrap();
    assert_eq!(
        s.servers().unwrap(),
        vec![
            ServerRecord {
                pinned: true,
                ..moved.clone()
            },
            server("b", "KB2", true),
            server("c", "KC", false),
        ]
    );
    assert_eq!(
        conflict(s.upsert_server(&server("a", "EVIL", false))),
        Conflict::ServerPinned
    );
    assert_eq!(
        s.servers().unwrap()[0],
        ServerRecord {
            pinned: true,
            ..moved
        }
    );
    s.upsert_server(&server("a", "KA2", true)).unwrap();
    assert_eq!(s.servers().unwrap()[0], server("a", "KA2", true));
}

/// §8: the stored channel version only grows.
fn the_channel_version_only_grows(s: &dyn Persistence) {
    assert_eq!(s.public_channel_version().unwrap(), 0);
    s.set_public_channel_version(5).unwrap();
    assert_eq!(s.public_channel_version().unwrap(), 5);
    s.set_public_channel_version(3).unwrap();
    assert_eq!(s.public_channel_version().unwrap(), 5);
    s.set_public_channel_version(6).unwrap();
    assert_eq!(s.public_channel_version().unwrap(), 6);
}

/// §6 *Across restarts*: entries come back earliest expiry first, expired ones are pruned, an
/// entry keeps its first expiry.
fn the_seen_cache_expires_and_orders(s: &dyn Persistence) {
    let k = |b: u8| [b; 32];
    s.remember_seen(&k(1), 300).unwrap();
    s.remember_seen(&k(2), 100).unwrap();
    s.remember_seen(&k(3), 200).unwrap();
    s.remember_seen(&k(4), 50).unwrap();
    // Remembered again with a later expiry: the first stays.
    s.remember_seen(&k(2), 1_000).unwrap();
    assert_eq!(
        s.seen_entries(0).unwrap(),
        vec![(k(4), 50), (k(2), 100), (k(3), 200), (k(1), 300)]
    );
    // Expired means `until < now`: an entry expiring at `now` is still there.
    assert_eq!(
        s.seen_entries(100).unwrap(),
        vec![(k(2), 100), (k(3), 200), (k(1), 300)]
    );
    // Pruned for good: a later read at an earlier time does not bring k(4) back.
    assert_eq!(s.seen_entries(0).unwrap().len(), 3);
    s.forget_seen(201).unwrap();
    assert_eq!(s.seen_entries(0).unwrap(), vec![(k(1), 300)]);
    s.forget_seen(i64::MAX).unwrap();
    assert!(s.seen_entries(i64::MIN).unwrap().is_empty());
}

/// Values with quotes and SQL in them are data, and a checkpoint loses nothing.
fn odd_values_round_trip_and_survive_a_checkpoint(s: &dyn Persistence) {
    let id = "o'brien\"; DROP TABLE users; --";
    s.bind_user(&key_user(id, "K'", "it's")).unwrap();
    s.register_account(&account("x'y", "K\"", "d'n")).unwrap();
    s.remember_user_key("r'", "K;").unwrap();
    s.upsert_server(&server("s'", "K'", true)).unwrap();
    s.checkpoint().unwrap();
    assert_eq!(key_of(s, id).as_deref(), Some("K'"));
    assert_eq!(
        s.user_by_display_name("d'n").unwrap(),
        Some(account("x'y", "K\"", "d'n"))
    );
    assert_eq!(key_of(s, "r'").as_deref(), Some("K;"));
    assert_eq!(s.servers().unwrap(), vec![server("s'", "K'", true)]);
}

// ------------------------------------------------------------------- the backends

/// Runs each body against the SQLite store in memory, the SQLite store on disk, and MemStore.
macro_rules! suite {
    ($($body:ident),* $(,)?) => {
        mod sqlite_in_memory {
            $( #[test] fn $body() { super::$body(&super::Store::open_in_memory().unwrap()); } )*
        }
        mod sqlite_on_disk {
            $(
                #[test]
                fn $body() {
                    let dir = super::TempDir::new(concat!("persist-", stringify!($body)));
                    super::$body(&super::Store::open(&dir.0.join("socp.db")).unwrap());
                }
            )*
        }
        mod mem_store {
            $( #[test] fn $body() { super::$body(&super::MemStore::new()); } )*
        }
    };
}

suite!(
    a_binding_keeps_its_first_key,
    a_binding_never_creates_credentials,
    registration_conflicts,
    a_hello_updates_an_accounts_meta_only,
    remote_user_keys_keep_the_first_seen,
    servers_keep_their_pins,
    the_channel_version_only_grows,
    the_seen_cache_expires_and_orders,
    odd_values_round_trip_and_survive_a_checkpoint,
);
