//! Duplicate suppression for frames between servers (PROTOCOL.md §6 *Dedup*).
//!
//! The key is SHA-256 of (`type`, `from`, `to`, `ts`, canonical payload): the signature covers
//! only the payload, so the envelope fields go into the key. Entries are bounded in number and in
//! age; a frame whose `ts` lies outside the age window (either direction) is refused outright, so
//! an evicted entry can never be replayed.

use std::collections::{HashSet, VecDeque};

/// A frame's dedup key.
pub type Key = [u8; 32];

/// Computes the key of a frame. Fields are length-prefixed so no two frames share a key.
pub fn key(kind: &str, from: &str, to: &str, ts: i64, canonical_payload: &str) -> Key {
    let mut buf = Vec::with_capacity(64 + canonical_payload.len());
    for part in [kind, from, to] {
        buf.extend_from_slice(&(part.len() as u64).to_be_bytes());
        buf.extend_from_slice(part.as_bytes());
    }
    buf.extend_from_slice(&ts.to_be_bytes());
    buf.extend_from_slice(canonical_payload.as_bytes());
    crate::crypto::sha256(&buf)
}

/// Why a frame is not new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// Seen before.
    Duplicate,
    /// Its `ts` is further from our clock than the window.
    OutOfWindow,
}

/// The seen-cache: insertion-ordered, so expiry pops from the front.
///
/// An entry lives until the frame could no longer pass the window check: max(insert time,
/// frame `ts`) + window. (Expiring by insert time alone would let a frame whose `ts` is ahead of
/// our clock be replayed after eviction.) An entry with a late expiry can hold back later ones
/// behind it by at most one window: they are kept longer, never shorter.
#[derive(Debug)]
pub struct SeenCache {
    window_ms: i64,
    max_entries: usize,
    set: HashSet<Key>,
    order: VecDeque<(i64, Key)>, // (wall time the entry may go, key)
}

impl SeenCache {
    pub fn new(window_ms: u64, max_entries: usize) -> SeenCache {
        SeenCache {
            window_ms: window_ms as i64,
            max_entries: max_entries.max(1),
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether a frame with this key and `ts` would be accepted now (does not record it).
    pub fn check(&mut self, key: &Key, ts: i64, now_wall_ms: i64) -> Result<(), Stale> {
        self.expire(now_wall_ms);
        if (ts - now_wall_ms).abs() > self.window_ms {
            return Err(Stale::OutOfWindow);
        }
        if self.set.contains(key) {
            return Err(Stale::Duplicate);
        }
        Ok(())
    }

    /// Records a frame with timestamp `ts` as seen (after it verified, so a forgery cannot shadow
    /// the real frame).
    pub fn insert(&mut self, key: Key, ts: i64, now_wall_ms: i64) {
        if self.set.insert(key) {
            self.order
                .push_back((now_wall_ms.max(ts) + self.window_ms, key));
            while self.order.len() > self.max_entries {
                if let Some((_, old)) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn expire(&mut self, now_wall_ms: i64) {
        while let Some((until, key)) = self.order.front() {
            if now_wall_ms <= *until {
                break;
            }
            self.set.remove(key);
            self.order.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_caught_and_fields_all_count() {
        let mut c = SeenCache::new(300_000, 100);
        let k = key("USER_ADVERTISE", "a", "*", 5, "{}");
        assert_eq!(c.check(&k, 5, 10), Ok(()));
        c.insert(k, 5, 10);
        assert_eq!(c.check(&k, 5, 11), Err(Stale::Duplicate));
        for other in [
            key("USER_REMOVE", "a", "*", 5, "{}"),
            key("USER_ADVERTISE", "b", "*", 5, "{}"),
            key("USER_ADVERTISE", "a", "x", 5, "{}"),
            key("USER_ADVERTISE", "a", "*", 6, "{}"),
            key("USER_ADVERTISE", "a", "*", 5, "{\"a\":1}"),
            key("USER_ADVERTISE", "a*", "", 5, "{}"),
        ] {
            assert_ne!(other, k);
        }
    }

    #[test]
    fn frames_outside_the_window_are_refused_both_ways() {
        let mut c = SeenCache::new(1000, 100);
        let k = key("T", "a", "b", 0, "{}");
        assert_eq!(c.check(&k, 0, 1001), Err(Stale::OutOfWindow));
        assert_eq!(c.check(&k, 2001, 1000), Err(Stale::OutOfWindow));
        assert_eq!(c.check(&k, 1500, 1000), Ok(()));
    }

    #[test]
    fn entries_expire_by_age_and_by_count() {
        let mut c = SeenCache::new(1000, 2);
        let keys: Vec<Key> = (0..3).map(|i| key("T", "a", "b", i, "{}")).collect();
        c.insert(keys[0], 0, 0);
        c.insert(keys[1], 0, 0);
        c.insert(keys[2], 0, 0);
        assert_eq!(c.len(), 2);
        assert_eq!(c.check(&keys[0], 0, 0), Ok(()));
        assert_eq!(c.check(&keys[2], 0, 500), Err(Stale::Duplicate));
        // After the window the entry is gone; but so is any frame that old.
        assert_eq!(c.check(&keys[2], 0, 1500), Err(Stale::OutOfWindow));
        assert!(c.is_empty());
    }

    #[test]
    fn a_frame_from_a_clock_ahead_cannot_be_replayed_after_eviction() {
        let mut c = SeenCache::new(1000, 100);
        let k = key("T", "a", "b", 600, "{}");
        c.insert(k, 600, 0); // its ts is 600 ms ahead of our clock
        // At 1500 the frame is still inside the window (ts 600 is 900 ms old): still a duplicate.
        assert_eq!(c.check(&k, 600, 1500), Err(Stale::Duplicate));
        // Once out of the window it is refused for that reason instead.
        assert_eq!(c.check(&k, 600, 1601), Err(Stale::OutOfWindow));
    }
}
