//! Who is online where (PROTOCOL.md §7): every online user of the mesh, the server hosting
//! each, their key and meta, plus the index of users connected here.
//!
//! The directory is plain data: it does no I/O and no crypto. Users are kept in a `BTreeMap`
//! so `LIST_RESPONSE` (sorted by `user_id`) needs no sort.

use crate::crypto::PublicKey;
use crate::server::ConnId;
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
        json!({
            "user_id": user_id,
            "server_id": entry.server_id,
            "pubkey": entry.pubkey.encoded(),
            "meta": entry.meta,
        })
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
