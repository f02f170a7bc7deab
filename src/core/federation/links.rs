//! Links and pins (PROTOCOL.md §4.2, §4.3): the live link to each server, one per pair, and
//! the servers whose keys are pinned here. A component of [`super::Federation`] with private
//! state; saving a pin and telling users of it is the `impl Server` glue's part.

use super::ws_url;
use crate::core::server::ConnId;
use crate::crypto::PublicKey;
use crate::wire::frame::Signed;
use log::info;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

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

/// What becomes of a new link when one with the same server is up (one link per pair, §4.3).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admit {
    /// The first link with that server.
    New,
    /// It replaces the old link, whose connection is returned (forgotten here, to be closed).
    Replaces(ConnId),
    /// The old link stays: this one is to be closed.
    Loses,
}

/// The live links by server id, and the pinned servers.
#[derive(Debug, Default)]
pub(super) struct Links {
    links: HashMap<String, Link>,
    known: HashMap<String, Known>,
    /// See [`Links::pins_version`].
    pins_version: u64,
    /// `HEARTBEAT`'s payload `{}` never changes: signed once.
    heartbeat: Option<Signed>,
}

impl Links {
    // -------------------------------------------------------------------- live links

    /// Whether a link to `server_id` is up.
    pub(super) fn is_linked(&self, server_id: &str) -> bool {
        self.links.contains_key(server_id)
    }

    /// How many links are up.
    pub(super) fn len(&self) -> usize {
        self.links.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The connection of the link to `server_id`.
    pub(super) fn conn_of(&self, server_id: &str) -> Option<ConnId> {
        self.links.get(server_id).map(|l| l.conn)
    }

    /// Connections of every live link but `except`.
    pub(super) fn conns<'a>(
        &'a self,
        except: Option<&'a str>,
    ) -> impl Iterator<Item = ConnId> + 'a {
        self.links
            .iter()
            .filter(move |(id, _)| Some(id.as_str()) != except)
            .map(|(_, l)| l.conn)
    }

    /// Every link: server id and connection.
    pub(super) fn all(&self) -> Vec<(String, ConnId)> {
        self.links
            .iter()
            .map(|(id, l)| (id.clone(), l.conn))
            .collect()
    }

    /// Ids of the servers we have a live link to, sorted.
    pub(super) fn linked(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.links.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    /// A frame came over the link to `server_id`.
    pub(super) fn heard(&mut self, server_id: &str, now_mono_ms: u64) {
        if let Some(l) = self.links.get_mut(server_id) {
            l.last_rx_ms = now_mono_ms;
        }
    }

    /// Links silent for `dead_after_ms` or more: server id, connection, how long silent.
    pub(super) fn silent(
        &self,
        now_mono_ms: u64,
        dead_after_ms: u64,
    ) -> Vec<(String, ConnId, u64)> {
        self.links
            .iter()
            .map(|(id, l)| (id.clone(), l.conn, now_mono_ms.saturating_sub(l.last_rx_ms)))
            .filter(|(_, _, silent)| *silent >= dead_after_ms)
            .collect()
    }

    /// A link to `server_id` is up, dialled by us or by them: whether it stands, given the
    /// one up already (the smaller id's dial wins, on both ends alike). A link it replaces is
    /// forgotten here; add the new one with [`Links::insert`].
    pub(super) fn admit(&mut self, our_id: &str, server_id: &str, dialled_by_us: bool) -> Admit {
        let Some(old) = self.links.get(server_id) else {
            return Admit::New;
        };
        let we_are_smaller = our_id < server_id;
        // Same direction: the new link replaces a stale one. Otherwise the smaller id's
        // dial wins, on both ends alike.
        let keep_new = old.dialled_by_us == dialled_by_us || dialled_by_us == we_are_smaller;
        let dialler = if we_are_smaller { our_id } else { server_id };
        info!("two links with {server_id}: keeping the one {dialler} dialled");
        if !keep_new {
            return Admit::Loses;
        }
        let old_conn = old.conn;
        self.links.remove(server_id);
        Admit::Replaces(old_conn)
    }

    /// Records the link to `server_id` on `conn`.
    pub(super) fn insert(
        &mut self,
        server_id: &str,
        conn: ConnId,
        dialled_by_us: bool,
        now_mono_ms: u64,
    ) {
        self.links.insert(
            server_id.to_string(),
            Link {
                conn,
                dialled_by_us,
                last_rx_ms: now_mono_ms,
            },
        );
    }

    /// Forgets the link to `server_id` if it is the one on `conn`; returns whether it was (a
    /// duplicate that lost leaves the surviving link standing).
    pub(super) fn remove(&mut self, server_id: &str, conn: ConnId) -> bool {
        if self.conn_of(server_id) != Some(conn) {
            return false;
        }
        self.links.remove(server_id);
        true
    }

    /// The signed `HEARTBEAT` payload, once signed.
    pub(super) fn heartbeat(&self) -> Option<Signed> {
        self.heartbeat.clone()
    }

    pub(super) fn set_heartbeat(&mut self, signed: Signed) {
        self.heartbeat = Some(signed);
    }

    // -------------------------------------------------------------------- pins

    /// Grows whenever a server's pinned key is added or changed.
    pub(super) fn pins_version(&self) -> u64 {
        self.pins_version
    }

    /// Every pinned server's id and key (encoded), sorted by id: `LIST_RESPONSE.servers` (§5.6).
    pub(super) fn pinned_keys(&self) -> Vec<(&str, &str)> {
        let mut keys: Vec<(&str, &str)> = self
            .known
            .iter()
            .map(|(id, k)| (id.as_str(), k.key.encoded()))
            .collect();
        keys.sort_unstable();
        keys
    }

    /// Whether `server_id` is pinned.
    pub(super) fn is_known(&self, server_id: &str) -> bool {
        self.known.contains_key(server_id)
    }

    /// The key pinned for `server_id`.
    pub(super) fn key_of(&self, server_id: &str) -> Option<Arc<PublicKey>> {
        self.known.get(server_id).map(|k| Arc::clone(&k.key))
    }

    /// The pinned server with `key`, if any.
    pub(super) fn id_of_key(&self, key: &Arc<PublicKey>) -> Option<String> {
        self.known
            .iter()
            .find(|(_, k)| k.key == *key)
            .map(|(id, _)| id.clone())
    }

    /// Whether `key` is pinned for some server.
    pub(super) fn has_key(&self, key: &PublicKey) -> bool {
        self.known.values().any(|k| *k.key == *key)
    }

    /// Where `server_id` says it listens, as a URL for logs.
    pub(super) fn url_of(&self, server_id: &str) -> Option<String> {
        self.known.get(server_id).map(|k| ws_url(&k.host, k.port))
    }

    /// Every pinned server: id, address and key.
    pub(super) fn known(&self) -> Vec<(String, String, u16, Arc<PublicKey>)> {
        self.known
            .iter()
            .map(|(id, k)| (id.clone(), k.host.clone(), k.port, Arc::clone(&k.key)))
            .collect()
    }

    /// `SERVER_WELCOME.servers` for `to`: every other linked server we know (§4.3).
    pub(super) fn welcome_servers(&self, to: &str) -> Vec<Value> {
        self.links
            .keys()
            .filter(|id| id.as_str() != to)
            .filter_map(|id| {
                self.known.get(id).map(|k| {
                    json!({"server_id": id, "host": k.host, "port": k.port,
                           "pubkey": k.key.encoded()})
                })
            })
            .collect()
    }

    /// A pin read back at start: no pins version of its own.
    pub(super) fn restore(
        &mut self,
        server_id: String,
        key: Arc<PublicKey>,
        host: String,
        port: u16,
    ) {
        self.known.insert(server_id, Known { key, host, port });
    }

    /// Pins `server_id` to `key` at `host:port`. Returns `None` when nothing changed, else
    /// whether the key is new (the pins version then grows).
    pub(super) fn pin(
        &mut self,
        server_id: &str,
        host: &str,
        port: u16,
        key: &Arc<PublicKey>,
    ) -> Option<bool> {
        let old_key = self.key_of(server_id);
        if let Some(k) = self.known.get(server_id)
            && k.key == *key
            && k.host == host
            && k.port == port
        {
            return None;
        }
        self.known.insert(
            server_id.to_string(),
            Known {
                key: Arc::clone(key),
                host: host.to_string(),
                port,
            },
        );
        let new_key = old_key.as_ref() != Some(key);
        if new_key {
            self.pins_version += 1;
        }
        Some(new_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_link_per_pair_the_smaller_ids_dial_wins() {
        let mut links = Links::default();
        assert_eq!(links.admit("a", "b", true), Admit::New);
        links.insert("b", ConnId(1), true, 0);
        // "a" < "b": b's dial loses to ours, ours replaces a stale one of ours.
        assert_eq!(links.admit("a", "b", false), Admit::Loses);
        assert_eq!(links.admit("a", "b", true), Admit::Replaces(ConnId(1)));
        assert!(!links.is_linked("b"));
        links.insert("b", ConnId(2), true, 0);
        assert!(!links.remove("b", ConnId(1)), "a duplicate that lost");
        assert_eq!(links.conn_of("b"), Some(ConnId(2)));
        assert!(links.remove("b", ConnId(2)));
        assert!(links.is_empty());
    }

    #[test]
    fn silent_links_are_those_not_heard_from_for_long() {
        let mut links = Links::default();
        links.insert("b", ConnId(1), true, 0);
        links.insert("c", ConnId(2), false, 0);
        links.heard("c", 40);
        assert_eq!(links.silent(45, 45), [("b".to_string(), ConnId(1), 45)]);
        assert_eq!(links.linked(), ["b", "c"]);
        assert_eq!(links.conns(Some("b")).collect::<Vec<_>>(), [ConnId(2)]);
    }
}
