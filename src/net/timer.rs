//! A hashed timer wheel on a millisecond clock.
//!
//! DESIGN.md ("Timers"): every deadline the server keeps — bootstrap and reconnect backoff,
//! heartbeats and dead-link detection (PROTOCOL.md §7), handshake and first-frame deadlines
//! (§5.2), dedup expiry (§6) — lives in one wheel owned by the net layer. The poll timeout is
//! [`TimerWheel::next_deadline`], so an idle server (empty wheel) sleeps without a timeout.
//!
//! The wheel knows nothing about [`std::time::Instant`]: the net layer converts `Instant` to
//! milliseconds since it started, and tests drive the wheel with made-up times.
//!
//! There is no cancellation: a caller that no longer wants a timer lets it fire and ignores it
//! (the value names the connection and a generation, and a stale one is a no-op).

use std::cell::Cell;

/// One pending timer: its absolute deadline, an insertion sequence number (so equal deadlines
/// fire in insertion order), the tick of the slot it lives in, and the caller's value.
struct Entry<T> {
    at_ms: u64,
    seq: u64,
    /// The tick whose slot holds this entry: `at_ms / tick_ms`, or the wheel's current tick if
    /// the deadline was already in the past when inserted. Invariant: `slot_tick >= cursor`.
    slot_tick: u64,
    value: T,
}

/// The cached answer of [`TimerWheel::next_deadline`]; `Stale` once the earliest entry fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Earliest {
    Known(Option<u64>),
    Stale,
}

/// A hashed timer wheel: O(1) insert and O(1) amortised expiry per entry, for the many
/// per-connection deadlines the net layer keeps (DESIGN.md "Timers").
///
/// Time is milliseconds on the caller's monotonic clock (the net layer uses milliseconds since
/// start). Each slot covers one tick; an entry due more than one revolution ahead keeps its
/// absolute deadline and is skipped until it is due, so any deadline works.
pub struct TimerWheel<T> {
    tick_ms: u64,
    slots: Vec<Vec<Entry<T>>>,
    /// The lowest tick that may still hold a pending entry (every entry's `slot_tick >= cursor`).
    cursor: u64,
    len: usize,
    next_seq: u64,
    /// Cache for `next_deadline`, recomputed lazily from `&self` (hence the `Cell`).
    earliest: Cell<Earliest>,
}

impl<T> TimerWheel<T> {
    /// Creates an empty wheel whose slots each cover `tick_ms` milliseconds, with `slots` slots
    /// (e.g. 10 ms × 1024 slots ≈ 10 s per revolution), starting at time `now_ms`.
    ///
    /// # Panics
    /// If `tick_ms` or `slots` is zero.
    pub fn new(tick_ms: u64, slots: usize, now_ms: u64) -> Self {
        assert!(tick_ms > 0, "timer wheel tick must be at least 1 ms");
        assert!(slots > 0, "timer wheel needs at least one slot");
        TimerWheel {
            tick_ms,
            slots: (0..slots).map(|_| Vec::new()).collect(),
            cursor: now_ms / tick_ms,
            len: 0,
            next_seq: 0,
            earliest: Cell::new(Earliest::Known(None)),
        }
    }

    /// Schedules `value` to fire once the clock reaches `at_ms`. A deadline already in the past
    /// fires on the next [`expire`](Self::expire) call.
    pub fn insert(&mut self, at_ms: u64, value: T) {
        // A past deadline goes into the current slot, which the next expire always visits.
        let slot_tick = (at_ms / self.tick_ms).max(self.cursor);
        let seq = self.next_seq;
        self.next_seq += 1;
        let idx = self.slot_index(slot_tick);
        self.slots[idx].push(Entry {
            at_ms,
            seq,
            slot_tick,
            value,
        });
        self.len += 1;
        if let Earliest::Known(cur) = self.earliest.get() {
            let new = cur.map_or(at_ms, |c| c.min(at_ms));
            self.earliest.set(Earliest::Known(Some(new)));
        }
    }

    /// The earliest pending deadline (exact, in ms), or `None` if the wheel is empty — the net
    /// layer then polls with no timeout so an idle server never wakes up (DESIGN.md).
    ///
    /// Cheap: the answer is cached; it is recomputed only after the earliest entry fired, by
    /// scanning slots forward from the current tick until the first one holding an entry due
    /// within this revolution.
    pub fn next_deadline(&self) -> Option<u64> {
        match self.earliest.get() {
            Earliest::Known(v) => v,
            Earliest::Stale => {
                let v = self.compute_earliest();
                self.earliest.set(Earliest::Known(v));
                v
            }
        }
    }

    /// Moves the clock to `now_ms` and appends every value whose deadline is `<= now_ms` to
    /// `out`, in deadline order (equal deadlines in insertion order).
    ///
    /// A clock that goes backwards is treated as not having moved.
    pub fn expire(&mut self, now_ms: u64, out: &mut Vec<T>) {
        if self.len == 0 {
            self.cursor = self.cursor.max(now_ms / self.tick_ms);
            return;
        }
        let now_tick = (now_ms / self.tick_ms).max(self.cursor);
        // Fast path: nothing is due. Then no entry has `slot_tick < now_tick` (such an entry's
        // deadline is before `now_tick * tick_ms <= now_ms`), so the cursor may jump ahead.
        if let Earliest::Known(Some(e)) = self.earliest.get()
            && e > now_ms
        {
            self.cursor = now_tick;
            return;
        }

        let mut fired: Vec<Entry<T>> = Vec::new();
        let n = self.slots.len() as u64;
        // Visit each slot whose tick lies in [cursor, now_tick], at most once each.
        let span = (now_tick - self.cursor).saturating_add(1).min(n);
        for t in self.cursor..self.cursor + span {
            let idx = self.slot_index(t);
            let slot = &mut self.slots[idx];
            let mut i = 0;
            while i < slot.len() {
                if slot[i].at_ms <= now_ms {
                    fired.push(slot.swap_remove(i));
                } else {
                    i += 1;
                }
            }
        }
        // Every entry with slot_tick < now_tick was due (its deadline precedes now_tick's
        // start), so every pending entry now has slot_tick >= now_tick.
        self.cursor = now_tick;

        if fired.is_empty() {
            return;
        }
        self.len -= fired.len();
        self.earliest.set(if self.len == 0 {
            Earliest::Known(None)
        } else {
            Earliest::Stale
        });
        fired.sort_unstable_by_key(|e| (e.at_ms, e.seq));
        out.extend(fired.into_iter().map(|e| e.value));
    }

    /// How many timers are pending.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no timer is pending (then [`next_deadline`](Self::next_deadline) is `None`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot_index(&self, tick: u64) -> usize {
        (tick % self.slots.len() as u64) as usize
    }

    /// Finds the earliest deadline. Entries due within the current revolution sort by slot tick
    /// (an entry in tick `t` is due before `(t + 1) * tick_ms`, and past deadlines sit in the
    /// cursor's tick, which no other entry precedes), so the first slot in tick order holding
    /// such an entry holds the minimum. Only if every entry is further out do we scan all.
    fn compute_earliest(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let n = self.slots.len() as u64;
        for t in self.cursor..self.cursor + n {
            let min = self.slots[self.slot_index(t)]
                .iter()
                .filter(|e| e.slot_tick == t)
                .map(|e| e.at_ms)
                .min();
            if min.is_some() {
                return min;
            }
        }
        self.slots.iter().flatten().map(|e| e.at_ms).min()
    }
}

impl<T> std::fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerWheel")
            .field("tick_ms", &self.tick_ms)
            .field("slots", &self.slots.len())
            .field("cursor_tick", &self.cursor)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain<T>(w: &mut TimerWheel<T>, now: u64) -> Vec<T> {
        let mut out = Vec::new();
        w.expire(now, &mut out);
        out
    }

    #[test]
    fn empty_wheel_has_no_deadline() {
        let mut w: TimerWheel<u32> = TimerWheel::new(10, 64, 0);
        assert_eq!(w.next_deadline(), None);
        assert!(w.is_empty());
        assert!(drain(&mut w, 1_000_000).is_empty());
        assert_eq!(w.next_deadline(), None);
        w.insert(1_000_050, 1);
        assert_eq!(w.next_deadline(), Some(1_000_050));
        assert_eq!(drain(&mut w, 1_000_050), vec![1]);
        assert_eq!(w.next_deadline(), None);
        assert!(w.is_empty());
    }

    #[test]
    fn fires_in_deadline_order_with_ties_in_insertion_order() {
        let mut w = TimerWheel::new(10, 16, 0);
        w.insert(35, "c");
        w.insert(12, "a");
        w.insert(35, "d");
        w.insert(13, "b");
        w.insert(35, "e");
        w.insert(36, "f");
        assert_eq!(w.len(), 6);
        assert!(drain(&mut w, 11).is_empty());
        assert_eq!(drain(&mut w, 35), vec!["a", "b", "c", "d", "e"]);
        assert_eq!(w.len(), 1);
        assert_eq!(w.next_deadline(), Some(36));
        assert_eq!(drain(&mut w, 36), vec!["f"]);
    }

    #[test]
    fn exact_millisecond_within_a_tick() {
        let mut w = TimerWheel::new(10, 8, 0);
        w.insert(17, 1);
        assert!(drain(&mut w, 16).is_empty());
        assert_eq!(w.next_deadline(), Some(17));
        assert_eq!(drain(&mut w, 17), vec![1]);
    }

    #[test]
    fn past_deadlines_fire_on_next_expire() {
        let mut w = TimerWheel::new(10, 8, 1_000);
        w.insert(5, "ancient");
        w.insert(995, "recent");
        w.insert(1_000, "now");
        assert_eq!(w.next_deadline(), Some(5));
        // Even without the clock moving.
        assert_eq!(drain(&mut w, 1_000), vec!["ancient", "recent", "now"]);
        // After the cursor moved on, a past deadline still fires next time.
        assert!(drain(&mut w, 5_000).is_empty());
        w.insert(2_000, "late");
        assert_eq!(w.next_deadline(), Some(2_000));
        assert_eq!(drain(&mut w, 5_000), vec!["late"]);
    }

    #[test]
    fn far_future_entries_wait_their_turn() {
        // One revolution = 8 slots × 10 ms = 80 ms.
        let mut w = TimerWheel::new(10, 8, 0);
        w.insert(1_005, "far"); // same slot as 5, 85, 165, ...
        w.insert(5, "near");
        w.insert(245, "mid");
        assert_eq!(w.next_deadline(), Some(5));
        let mut t = 0;
        let mut fired = Vec::new();
        while t < 2_000 {
            t += 7;
            for v in drain(&mut w, t) {
                fired.push((v, t));
            }
        }
        assert_eq!(fired, vec![("near", 7), ("mid", 245), ("far", 1_008)]);
        assert!(w.is_empty());
    }

    #[test]
    fn far_future_entries_after_a_big_jump() {
        let mut w = TimerWheel::new(10, 8, 0);
        w.insert(10_000, 2);
        w.insert(500, 1);
        w.insert(100_000, 3);
        // Jump several revolutions at once.
        assert_eq!(drain(&mut w, 9_999), vec![1]);
        assert_eq!(w.next_deadline(), Some(10_000));
        assert_eq!(drain(&mut w, 10_000), vec![2]);
        assert_eq!(w.next_deadline(), Some(100_000));
        assert!(drain(&mut w, 99_999).is_empty());
        assert_eq!(drain(&mut w, 1_000_000), vec![3]);
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn next_deadline_tracks_inserts_and_expiries() {
        let mut w = TimerWheel::new(10, 32, 0);
        w.insert(500, 'a');
        assert_eq!(w.next_deadline(), Some(500));
        w.insert(200, 'b');
        assert_eq!(w.next_deadline(), Some(200));
        w.insert(300, 'c');
        assert_eq!(w.next_deadline(), Some(200));
        w.insert(5_000, 'd'); // beyond one revolution (320 ms)
        assert_eq!(drain(&mut w, 199), vec![]);
        assert_eq!(w.next_deadline(), Some(200));
        assert_eq!(drain(&mut w, 250), vec!['b']);
        assert_eq!(w.next_deadline(), Some(300));
        assert_eq!(drain(&mut w, 500), vec!['c', 'a']);
        // Only the far entry remains: found by the full scan.
        assert_eq!(w.next_deadline(), Some(5_000));
        w.insert(4_999, 'e');
        assert_eq!(w.next_deadline(), Some(4_999));
        assert_eq!(drain(&mut w, 4_999), vec!['e']);
        assert_eq!(w.next_deadline(), Some(5_000));
        assert_eq!(drain(&mut w, 5_000), vec!['d']);
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let mut w = TimerWheel::new(10, 8, 1_000);
        w.insert(1_050, 1);
        assert!(drain(&mut w, 500).is_empty());
        assert_eq!(w.next_deadline(), Some(1_050));
        assert_eq!(drain(&mut w, 1_050), vec![1]);
    }

    /// A tiny deterministic PRNG (xorshift64*) so the test needs no dependency.
    fn rng(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    fn many_entries_expire_correctly() {
        const N: u64 = 100_000;
        let mut w = TimerWheel::new(10, 1024, 0);
        let mut s = 0x9e37_79b9_7f4a_7c15;
        let mut deadlines = Vec::with_capacity(N as usize);
        for i in 0..N {
            // Up to ~60 s ahead: many revolutions of a ~10 s wheel.
            let at = rng(&mut s) % 60_000;
            deadlines.push(at);
            w.insert(at, (at, i));
        }
        assert_eq!(w.len(), N as usize);
        assert_eq!(w.next_deadline(), deadlines.iter().copied().min());

        let mut fired = 0u64;
        let mut last: Option<(u64, u64)> = None;
        let mut now = 0;
        let mut out = Vec::new();
        while now < 61_000 {
            now += 1 + rng(&mut s) % 37;
            out.clear();
            w.expire(now, &mut out);
            for &(at, i) in &out {
                assert!(at <= now, "fired early: {at} at {now}");
                assert!(last < Some((at, i)), "out of order");
                last = Some((at, i));
            }
            fired += out.len() as u64;
            // Nothing still pending is already due.
            if let Some(next) = w.next_deadline() {
                assert!(next > now);
            }
        }
        assert_eq!(fired, N);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn next_deadline_is_exact_under_random_load() {
        let mut w = TimerWheel::new(10, 64, 0);
        let mut s = 12345;
        let mut pending: Vec<u64> = Vec::new();
        let mut now = 0;
        for round in 0..2_000 {
            for _ in 0..(rng(&mut s) % 5) {
                // Mix past, near and far (beyond the 640 ms revolution) deadlines.
                let at = (now + rng(&mut s) % 3_000).saturating_sub(100);
                pending.push(at);
                w.insert(at, at);
            }
            assert_eq!(
                w.next_deadline(),
                pending.iter().copied().min(),
                "round {round}"
            );
            now += rng(&mut s) % 50;
            let mut out = Vec::new();
            w.expire(now, &mut out);
            let mut due: Vec<u64> = pending.iter().copied().filter(|&a| a <= now).collect();
            due.sort_unstable();
            pending.retain(|&a| a > now);
            assert_eq!(out, due, "round {round}");
            assert_eq!(w.len(), pending.len());
            assert_eq!(
                w.next_deadline(),
                pending.iter().copied().min(),
                "round {round}"
            );
        }
    }
}
