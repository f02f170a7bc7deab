//! Duplicate suppression and freshness for frames between servers (PROTOCOL.md §6 *Dedup*).
//!
//! Judged on what the signature covers. `sig` covers only the payload, so a relay can rewrite
//! the envelope's `ts` and `to` at will:
//!
//! - a payload that carries its own `ts` (deliveries, channel copies, file frames, presence we
//!   emit) is keyed by SHA-256 of (`from`, canonical payload) — envelope `type`, `ts` and `to`
//!   left out, none of them signed — and its freshness is judged on `payload.ts`;
//! - a payload without `ts` (presence from deployed servers, heartbeats, announces) keeps the
//!   key over (`type`, `from`, `to`, envelope `ts`, payload) and the envelope `ts` window.
//!
//! Entries are bounded in number and in age; a frame whose `ts` lies outside the age window
//! (either direction) is refused outright, so an entry that expired can never be replayed. An
//! entry evicted early because the cache is full (a flood) raises a floor: from then on a frame
//! no newer than that entry is refused too, so a flood cannot be used to replay either.

use std::collections::{HashSet, VecDeque};

/// A frame's dedup key.
pub type Key = [u8; 32];

/// Computes the key of a frame. `payload_ts` is the payload's own signed `ts`, if it has one;
/// the envelope's `type`, `to` and `ts` then do not count (a `SERVER_DELIVER` re-sent as a
/// `MSG_PUBLIC_CHANNEL` is the same signed payload). Fields are length-prefixed so no two
/// frames share a key, and the two kinds of key are tagged apart.
pub fn key(
    kind: &str,
    from: &str,
    to: &str,
    envelope_ts: i64,
    payload_ts: Option<i64>,
    canonical_payload: &str,
) -> Key {
    let mut buf = Vec::with_capacity(80 + canonical_payload.len());
    let signed_ts = payload_ts.is_some();
    buf.push(u8::from(signed_ts));
    let envelope: &[&str] = if signed_ts {
        &[from]
    } else {
        &[kind, from, to]
    };
    for part in envelope {
        buf.extend_from_slice(&(part.len() as u64).to_be_bytes());
        buf.extend_from_slice(part.as_bytes());
    }
    if !signed_ts {
        buf.extend_from_slice(&envelope_ts.to_be_bytes());
    }
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
    /// Frames with a `ts` at or before this are refused: see the module documentation.
    floor: i64,
}

impl SeenCache {
    pub fn new(window_ms: u64, max_entries: usize) -> SeenCache {
        SeenCache {
            window_ms: window_ms as i64,
            max_entries: max_entries.max(1),
            set: HashSet::new(),
            order: VecDeque::new(),
            floor: i64::MIN,
        }
    }

    /// Whether a frame with this key and `ts` would be accepted now (does not record it).
    pub fn check(&mut self, key: &Key, ts: i64, now_wall_ms: i64) -> Result<(), Stale> {
        self.expire(now_wall_ms);
        // abs_diff: any i64 `ts` (even i64::MIN) is judged without overflow.
        if ts.abs_diff(now_wall_ms) > self.window_ms.unsigned_abs() || ts <= self.floor {
            return Err(Stale::OutOfWindow);
        }
        if self.set.contains(key) {
            return Err(Stale::Duplicate);
        }
        Ok(())
    }

    /// Records a frame with timestamp `ts` as seen (after it verified, so a forgery cannot shadow
    /// the real frame). Returns the wall time until which the entry is kept.
    pub fn insert(&mut self, key: Key, ts: i64, now_wall_ms: i64) -> i64 {
        let until = now_wall_ms.max(ts).saturating_add(self.window_ms);
        self.restore(key, until);
        until
    }

    /// Records an entry kept until `until` (wall ms): [`insert`](Self::insert)'s result, as
    /// saved before a restart (PROTOCOL.md §6 *Across restarts*).
    pub fn restore(&mut self, key: Key, until: i64) {
        if self.set.insert(key) {
            self.order.push_back((until, key));
            while self.order.len() > self.max_entries {
                if let Some((until, old)) = self.order.pop_front() {
                    self.set.remove(&old);
                    // The evicted frame's ts was at most `until - window` (see `insert`).
                    self.floor = self.floor.max(until.saturating_sub(self.window_ms));
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
        let k = key("USER_ADVERTISE", "a", "*", 5, None, "{}");
        assert_eq!(c.check(&k, 5, 10), Ok(()));
        c.insert(k, 5, 10);
        assert_eq!(c.check(&k, 5, 11), Err(Stale::Duplicate));
        for other in [
            key("USER_REMOVE", "a", "*", 5, None, "{}"),
            key("USER_ADVERTISE", "b", "*", 5, None, "{}"),
            key("USER_ADVERTISE", "a", "x", 5, None, "{}"),
            key("USER_ADVERTISE", "a", "*", 6, None, "{}"),
            key("USER_ADVERTISE", "a", "*", 5, None, "{\"a\":1}"),
            key("USER_ADVERTISE", "a*", "", 5, None, "{}"),
            key("USER_ADVERTISE", "a", "*", 5, Some(5), "{}"),
        ] {
            assert_ne!(other, k);
        }
    }

    #[test]
    fn a_payload_with_its_own_ts_is_keyed_on_what_the_signature_covers() {
        let payload = r#"{"ciphertext":"x","ts":5}"#;
        let k = key("SERVER_DELIVER", "a", "b", 5, Some(5), payload);
        // A relay rewrote the envelope's ts and to: still the same frame.
        assert_eq!(k, key("SERVER_DELIVER", "a", "c", 999, Some(5), payload));
        // Anything signed, or who signed it, makes another frame.
        assert_ne!(k, key("SERVER_DELIVER", "b", "b", 5, Some(5), payload));
        // The envelope's type is not signed either: another type is the same frame.
        assert_eq!(k, key("MSG_PUBLIC_CHANNEL", "a", "b", 5, Some(5), payload));
        assert_ne!(
            k,
            key("SERVER_DELIVER", "a", "b", 5, Some(6), r#"{"ts":6}"#)
        );
    }

    #[test]
    fn any_ts_is_judged_without_overflow() {
        let mut c = SeenCache::new(300_000, 100);
        let k = key("T", "a", "b", 0, None, "{}");
        for ts in [i64::MIN, i64::MIN + 1, i64::MAX] {
            assert_eq!(c.check(&k, ts, 1_000), Err(Stale::OutOfWindow));
        }
        assert_eq!(c.check(&k, 0, i64::MAX), Err(Stale::OutOfWindow));
        assert_eq!(c.check(&k, 0, i64::MIN), Err(Stale::OutOfWindow));
        // An entry near the end of time does not overflow its expiry.
        c.insert(k, i64::MAX - 1, i64::MAX - 1);
        assert_eq!(
            c.check(&k, i64::MAX - 1, i64::MAX - 1),
            Err(Stale::Duplicate)
        );
    }

    #[test]
    fn restored_entries_are_duplicates_until_they_expire() {
        let mut c = SeenCache::new(1000, 100);
        let k = key("T", "a", "b", 0, Some(500), "{}");
        let until = SeenCache::new(1000, 100).insert(k, 500, 400);
        c.restore(k, until);
        assert_eq!(c.check(&k, 500, 1200), Err(Stale::Duplicate));
        assert_eq!(c.check(&k, 500, 1501), Err(Stale::OutOfWindow));
    }

    #[test]
    fn frames_outside_the_window_are_refused_both_ways() {
        let mut c = SeenCache::new(1000, 100);
        let k = key("T", "a", "b", 0, None, "{}");
        assert_eq!(c.check(&k, 0, 1001), Err(Stale::OutOfWindow));
        assert_eq!(c.check(&k, 2001, 1000), Err(Stale::OutOfWindow));
        assert_eq!(c.check(&k, 1500, 1000), Ok(()));
    }

    #[test]
    fn entries_expire_by_age_and_by_count() {
        let mut c = SeenCache::new(1000, 2);
        let keys: Vec<Key> = (0..3).map(|i| key("T", "a", "b", i, None, "{}")).collect();
        for (ts, k) in keys.iter().enumerate() {
            c.insert(*k, ts as i64, 0);
        }
        assert_eq!(c.len(), 2);
        // keys[0] was evicted before its time (a flood): it is refused all the same, by the
        // floor its eviction raised, and so is any frame no newer than it.
        assert_eq!(c.check(&keys[0], 0, 0), Err(Stale::OutOfWindow));
        let other = key("T", "z", "b", 0, None, "{}");
        assert_eq!(c.check(&other, 0, 0), Err(Stale::OutOfWindow));
        assert_eq!(c.check(&other, 1, 0), Ok(()));
        assert_eq!(c.check(&keys[2], 2, 500), Err(Stale::Duplicate));
        // After the window the entry is gone; but so is any frame that old.
        assert_eq!(c.check(&keys[2], 2, 1500), Err(Stale::OutOfWindow));
        assert!(c.is_empty());
    }

    #[test]
    fn a_frame_from_a_clock_ahead_cannot_be_replayed_after_eviction() {
        let mut c = SeenCache::new(1000, 100);
        let k = key("T", "a", "b", 600, None, "{}");
        c.insert(k, 600, 0); // its ts is 600 ms ahead of our clock
        // At 1500 the frame is still inside the window (ts 600 is 900 ms old): still a duplicate.
        assert_eq!(c.check(&k, 600, 1500), Err(Stale::Duplicate));
        // Once out of the window it is refused for that reason instead.
        assert_eq!(c.check(&k, 600, 1601), Err(Stale::OutOfWindow));
    }
}
