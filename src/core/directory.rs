//! Who is online where (PROTOCOL.md §7): every online user of the mesh, the server hosting
//! each, their key and meta, plus the index of users connected here.
//!
//! The directory is plain data: it does no I/O and no crypto. Users are kept in a `BTreeMap`
//! so `LIST_RESPONSE` (sorted by `user_id`) needs no sort.

use crate::core::server::ConnId;
use crate::crypto::PublicKey;
use crate::wire::Text;
use crate::wire::canon::{self, NotCanonical};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// One online user.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The server hosting the user (ours for local users).
    pub server_id: String,
    /// The user's connection, when the user is connected to this server.
    pub local: Option<ConnId>,
    pub pubkey: Arc<PublicKey>,
    pub meta: Map<String, Value>,
    /// For a remote user, the newest `USER_ADVERTISE` its hosting server signed that was
    /// applied here, exactly as received: handed unchanged to each new link (§4.3, §7), since
    /// only that server may sign the user's presence. None for local users and for users known
    /// only from a `SERVER_WELCOME`. Goes with the entry, so a user who left is never re-sent.
    pub advert: Option<Text>,
    /// For a local user: when its advert last went to every link (wall ms). See
    /// `Server::refresh_adverts`.
    pub advertised_ms: i64,
}

impl Entry {
    /// The user's display name, when its meta carries one.
    pub fn display_name(&self) -> Option<&str> {
        self.meta.get("display_name").and_then(Value::as_str)
    }
}

/// The online users of the mesh.
#[derive(Debug, Default)]
pub struct Directory {
    users: BTreeMap<String, Entry>,
    local: HashMap<ConnId, String>,
    version: i64,
}

impl Directory {
    pub fn get(&self, user_id: &str) -> Option<&Entry> {
        self.users.get(user_id)
    }

    /// Records `user_id` as online; replaces any previous entry.
    pub fn insert(&mut self, user_id: &str, entry: Entry) {
        if let Some(conn) = entry.local {
            self.local.insert(conn, user_id.to_string());
        }
        if let Some(old) = self.users.insert(user_id.to_string(), entry)
            && let Some(conn) = old.local
        {
            self.local.remove(&conn);
        }
        self.version += 1;
    }

    /// Removes `user_id` when it is hosted by `server_id` (§7: a `USER_REMOVE` deletes the
    /// entry only if it still points to that server). Returns the removed entry.
    pub fn remove_if_hosted_by(&mut self, user_id: &str, server_id: &str) -> Option<Entry> {
        if self.users.get(user_id)?.server_id != server_id {
            return None;
        }
        let entry = self.users.remove(user_id)?;
        if let Some(conn) = entry.local {
            self.local.remove(&conn);
        }
        self.version += 1;
        Some(entry)
    }

    /// Keeps `advert` as the original `USER_ADVERTISE` of remote user `user_id` (see
    /// [`Entry::advert`]); nothing happens for a user not in the directory or a local one.
    pub fn set_advert(&mut self, user_id: &str, advert: Text) {
        if let Some(e) = self.users.get_mut(user_id)
            && e.local.is_none()
        {
            e.advert = Some(advert);
        }
    }

    /// Up to `max` local users whose advert last went out before `before` (wall ms), the
    /// longest ago first.
    pub fn local_adverts_due(&self, before: i64, max: usize) -> Vec<String> {
        let mut due: Vec<(i64, &str)> = self
            .local
            .values()
            .filter_map(|id| Some((self.users.get(id)?.advertised_ms, id.as_str())))
            .filter(|(at, _)| *at < before)
            .collect();
        due.sort_unstable();
        due.truncate(max);
        due.into_iter().map(|(_, id)| id.to_string()).collect()
    }

    /// Records that local user `user_id`'s advert went to every link at `at_ms`.
    pub fn set_advertised(&mut self, user_id: &str, at_ms: i64) {
        if let Some(e) = self.users.get_mut(user_id)
            && e.local.is_some()
        {
            e.advertised_ms = at_ms;
        }
    }

    /// How many users are connected here.
    pub fn local_len(&self) -> usize {
        self.local.len()
    }

    /// The original adverts of the remote users not hosted by `except`, sorted by user id:
    /// what a new link to `except` is told of the users behind other servers (§4.3).
    pub fn remote_adverts(&self, except: &str) -> Vec<Text> {
        self.users
            .values()
            .filter(|e| e.local.is_none() && e.server_id != except)
            .filter_map(|e| e.advert.clone())
            .collect()
    }

    /// Users hosted by `server_id`.
    pub fn users_hosted_by(&self, server_id: &str) -> Vec<String> {
        self.users
            .iter()
            .filter(|(_, e)| e.server_id == server_id)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Connections of all local users.
    pub fn local_conns(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.local.keys().copied()
    }

    /// Ids of the users connected here.
    pub fn local_users(&self) -> impl Iterator<Item = &str> + '_ {
        self.local.values().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Grows on every change; sent as `LIST_RESPONSE.version`.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// Online user ids, sorted.
    pub fn user_ids(&self) -> impl Iterator<Item = &str> + '_ {
        self.users.keys().map(String::as_str)
    }

    /// The directory entry as it travels in `LIST_RESPONSE`, `SERVER_WELCOME` and
    /// `USER_ADVERTISE`: `{user_id, server_id, pubkey, meta}`.
    pub fn entry_json(user_id: &str, entry: &Entry) -> Value {
        Self::user_json(user_id, &entry.server_id, &entry.pubkey, &entry.meta)
    }

    /// [`Directory::entry_json`] of a user not (yet) in the directory.
    pub fn user_json(
        user_id: &str,
        server_id: &str,
        pubkey: &PublicKey,
        meta: &Map<String, Value>,
    ) -> Value {
        json!({
            "user_id": user_id,
            "server_id": server_id,
            "pubkey": pubkey.encoded(),
            "meta": meta,
        })
    }

    /// The canonical text of the `LIST_RESPONSE` payload `{servers, users, version}` (§5.5,
    /// §5.6), written straight from the entries: with thousands of users online this is the
    /// largest payload a server builds, once per login, and no intermediate JSON tree is needed
    /// for it. `servers` (id, encoded key), sorted by id, is left out when empty. Equal to
    /// `canon::canonical(&json!({"servers": […], "users": self.list_json(), "version": version}))`.
    pub fn list_canonical(
        &self,
        version: i64,
        servers: &[(&str, &str)],
    ) -> Result<String, NotCanonical> {
        let mut out = String::with_capacity(64 + self.users.len() * 900 + servers.len() * 800);
        out.push('{');
        if !servers.is_empty() {
            out.push_str("\"servers\":[");
            for (i, (id, key)) in servers.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str("{\"pubkey\":");
                canon::write_string(key, &mut out);
                out.push_str(",\"server_id\":");
                canon::write_string(id, &mut out);
                out.push('}');
            }
            out.push_str("],");
        }
        out.push_str("\"users\":[");
        for (i, (id, e)) in self.users.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            // Keys in byte order: meta, pubkey, server_id, user_id.
            out.push_str("{\"meta\":");
            canon::write_canonical_object(&e.meta, &mut out)?;
            out.push_str(",\"pubkey\":");
            canon::write_string(e.pubkey.encoded(), &mut out);
            out.push_str(",\"server_id\":");
            canon::write_string(&e.server_id, &mut out);
            out.push_str(",\"user_id\":");
            canon::write_string(id, &mut out);
            out.push('}');
        }
        out.push_str("],\"version\":");
        out.push_str(&version.to_string());
        out.push('}');
        Ok(out)
    }

    /// Every online user, sorted by `user_id` (§5.5 `LIST_RESPONSE.users`).
    pub fn list_json(&self) -> Value {
        Value::Array(
            self.users
                .iter()
                .map(|(id, e)| Self::entry_json(id, e))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::PrivateKey;

    #[test]
    fn list_canonical_is_the_canonical_form_of_list_json() {
        let private = PrivateKey::from_pem(include_str!("../../tests/fixtures/keys/user1.pem"));
        let key = Arc::clone(private.unwrap().public_key());
        let mut dir = Directory::default();
        assert_eq!(
            dir.list_canonical(0, &[]).unwrap(),
            canon::canonical(&json!({"users": dir.list_json(), "version": 0})).unwrap()
        );
        let metas = [
            json!({}),
            json!({"display_name": "Zoë \"q\"", "z": [1, {"b": 2, "a": -3}], "a": null}),
            json!({"pubkey": "x", "display_name": "tab\there"}),
        ];
        for (i, (id, meta)) in ["zed", "Bob", "émile"].iter().zip(metas).enumerate() {
            let Value::Object(meta) = meta else {
                unreachable!()
            };
            let entry = Entry {
                server_id: format!("srv-{i}"),
                local: (i == 1).then_some(ConnId(7)),
                pubkey: Arc::clone(&key),
                meta,
                advert: None,
                advertised_ms: 0,
            };
            dir.insert(id, entry);
        }
        let version = dir.version();
        let expected =
            canon::canonical(&json!({"users": dir.list_json(), "version": version})).unwrap();
        assert_eq!(dir.list_canonical(version, &[]).unwrap(), expected);
        let servers = [("srv-b", "KEY-B"), ("srv-c", "KEY \"C\"")];
        let expected = canon::canonical(&json!({
            "servers": [{"server_id": "srv-b", "pubkey": "KEY-B"},
                        {"server_id": "srv-c", "pubkey": "KEY \"C\""}],
            "users": dir.list_json(),
            "version": version,
        }))
        .unwrap();
        assert_eq!(dir.list_canonical(version, &servers).unwrap(), expected);
    }

    #[test]
    fn local_adverts_due_are_the_oldest_local_ones_and_remote_adverts_skip_the_host() {
        let private = PrivateKey::from_pem(include_str!("../../tests/fixtures/keys/user1.pem"));
        let key = Arc::clone(private.unwrap().public_key());
        let mut dir = Directory::default();
        let entry = |server: &str, local: Option<u64>, at: i64, advert: Option<&str>| Entry {
            server_id: server.into(),
            local: local.map(ConnId),
            pubkey: Arc::clone(&key),
            meta: Map::new(),
            advert: advert.map(|t| Text::from(t.to_string())),
            advertised_ms: at,
        };
        dir.insert("a", entry("me", Some(1), 300, None));
        dir.insert("b", entry("me", Some(2), 100, None));
        dir.insert("c", entry("me", Some(3), 200, None));
        dir.insert("d", entry("me", Some(4), 900, None));
        dir.insert("r", entry("srv-x", None, 0, Some("rx")));
        dir.insert("s", entry("srv-y", None, 0, Some("sy")));
        dir.insert("t", entry("srv-y", None, 0, None));
        assert_eq!(dir.local_adverts_due(500, 10), ["b", "c", "a"]);
        assert_eq!(dir.local_adverts_due(500, 2), ["b", "c"]);
        assert!(dir.local_adverts_due(100, 10).is_empty());
        dir.set_advertised("b", 1000);
        dir.set_advertised("r", 1000); // remote: nothing to do
        assert_eq!(dir.local_adverts_due(500, 10), ["c", "a"]);
        assert_eq!(dir.local_len(), 4);
        // A local user's entry keeps no advert to relay.
        dir.set_advert("a", Text::from("x".to_string()));
        assert!(dir.get("a").unwrap().advert.is_none());
        let texts = |v: Vec<Text>| v.iter().map(|t| t.as_str().to_string()).collect::<Vec<_>>();
        assert_eq!(texts(dir.remote_adverts("me")), ["rx", "sy"]);
        assert_eq!(texts(dir.remote_adverts("srv-y")), ["rx"]);
        // Gone with the user.
        dir.remove_if_hosted_by("r", "srv-x");
        assert_eq!(texts(dir.remote_adverts("srv-y")), Vec::<String>::new());
    }
}
