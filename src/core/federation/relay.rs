//! Relaying between servers (PROTOCOL.md §6, §7, §8): the seen-cache frames from peers go
//! through, the newest presence applied per user, the announces handed to new links, and the
//! public-channel news not yet told. A component of [`super::Federation`] with private state;
//! verifying, forwarding and signing are the `impl Server` glue's part.

use super::FedConfig;
use crate::core::dedup::{Key, SeenCache, Stale};
use crate::wire::frame::Frame;
use std::collections::HashMap;

/// Heartbeat rounds between our periodic `SERVER_ANNOUNCE`s (8 × 15 s = 2 minutes, well inside
/// the 5-minute window in which a relayed copy is still accepted).
pub(super) const REANNOUNCE_EVERY: u32 = 8;

/// Public-channel changes since the last announcement.
#[derive(Debug)]
pub(super) struct ChannelNews {
    /// The channel version before the first of these changes (`if_version` of the ADD).
    pub(super) if_version: i64,
    /// Users who joined (logged in here), in order.
    pub(super) added: Vec<String>,
}

/// What relaying remembers.
#[derive(Debug)]
pub(super) struct Relay {
    seen: SeenCache,
    window_ms: u64,
    max_entries: usize,
    /// §7: the newest signed presence `ts` applied per (hosting server, user); older adverts
    /// and removes are ignored. Bounded like the seen-cache: an entry older than the window
    /// can go, since a frame that old is refused anyway.
    presence: HashMap<(String, String), i64>,
    /// The latest verified `SERVER_ANNOUNCE` of each server, as received: handed unchanged to
    /// every new link. Servers re-announce every [`REANNOUNCE_EVERY`] heartbeats, so these stay
    /// inside the peers' dedup window.
    announces: HashMap<String, Frame>,
    /// Heartbeat rounds since our last announce.
    rounds: u32,
    /// Public-channel changes not yet told to the other servers (see
    /// [`super::CHANNEL_BATCH_MS`]).
    channel_news: Option<ChannelNews>,
}

impl Relay {
    pub(super) fn new(cfg: &FedConfig) -> Relay {
        Relay {
            seen: SeenCache::new(cfg.dedup_window_ms, cfg.dedup_max_entries),
            window_ms: cfg.dedup_window_ms,
            max_entries: cfg.dedup_max_entries,
            presence: HashMap::new(),
            announces: HashMap::new(),
            rounds: 0,
            channel_news: None,
        }
    }

    // -------------------------------------------------------------------- seen-cache (§6)

    /// A seen-cache entry saved before a restart.
    pub(super) fn restore_seen(&mut self, key: Key, until: i64) {
        self.seen.restore(key, until);
    }

    /// Whether a frame with `key`, fresh by `ts`, is new and inside the window.
    pub(super) fn check_seen(&mut self, key: &Key, ts: i64, now_wall_ms: i64) -> Result<(), Stale> {
        self.seen.check(key, ts, now_wall_ms)
    }

    /// Records a verified frame; returns until when it is remembered.
    pub(super) fn record_seen(&mut self, key: Key, ts: i64, now_wall_ms: i64) -> i64 {
        self.seen.insert(key, ts, now_wall_ms)
    }

    // -------------------------------------------------------------------- presence order (§7)

    /// §7 ordering: whether presence for `user_id` from `server_id` signed at `ts` is at least
    /// as new as the newest applied; if so, it becomes the newest.
    pub(super) fn presence_is_newest(
        &mut self,
        server_id: &str,
        user_id: &str,
        ts: i64,
        now_wall_ms: i64,
    ) -> bool {
        let key = (server_id.to_string(), user_id.to_string());
        if let Some(&newest) = self.presence.get(&key) {
            if ts < newest {
                return false;
            }
        } else if self.presence.len() >= self.max_entries {
            let oldest = now_wall_ms.saturating_sub(self.window_ms as i64);
            self.presence.retain(|_, t| *t >= oldest);
            if self.presence.len() >= self.max_entries {
                return true; // a flood of presence: ordered by the window and dedup alone
            }
        }
        self.presence.insert(key, ts);
        true
    }

    // -------------------------------------------------------------------- announces (§4.3)

    /// The latest verified announce of `server_id`.
    pub(super) fn keep_announce(&mut self, server_id: String, text: Frame) {
        self.announces.insert(server_id, text);
    }

    /// The announces of every server but those in `except`, for a new link.
    pub(super) fn announces_except(&self, except: &[&str]) -> Vec<Frame> {
        self.announces
            .iter()
            .filter(|(id, _)| !except.contains(&id.as_str()))
            .map(|(_, text)| text.clone())
            .collect()
    }

    /// One heartbeat round went by: whether our own announce is due again.
    pub(super) fn announce_due(&mut self) -> bool {
        self.rounds += 1;
        if self.rounds >= REANNOUNCE_EVERY {
            self.rounds = 0;
            return true;
        }
        false
    }

    // -------------------------------------------------------------------- channel news (§8)

    /// The channel changed from version `if_version` (`added` joined): returns whether this is
    /// the first change of a batch (the batch timer is then to be armed).
    pub(super) fn channel_changed(&mut self, if_version: i64, added: Option<&str>) -> bool {
        let first = self.channel_news.is_none();
        let news = self.channel_news.get_or_insert_with(|| ChannelNews {
            if_version,
            added: Vec::new(),
        });
        if let Some(user_id) = added
            && !news.added.iter().any(|id| id == user_id)
        {
            news.added.push(user_id.to_string());
        }
        first
    }

    /// The channel changes of this batch, now to be told.
    pub(super) fn take_channel_news(&mut self) -> Option<ChannelNews> {
        self.channel_news.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_older_than_the_newest_applied_is_refused() {
        let mut relay = Relay::new(&FedConfig::default());
        assert!(relay.presence_is_newest("b", "u", 10, 0));
        assert!(relay.presence_is_newest("b", "u", 10, 0), "as new: applied");
        assert!(!relay.presence_is_newest("b", "u", 9, 0));
        assert!(
            relay.presence_is_newest("c", "u", 9, 0),
            "per hosting server"
        );
    }

    #[test]
    fn channel_news_batches_until_taken() {
        let mut relay = Relay::new(&FedConfig::default());
        assert!(relay.channel_changed(4, Some("u")), "the first change arms");
        assert!(!relay.channel_changed(5, Some("u")));
        assert!(!relay.channel_changed(6, Some("v")));
        let news = relay.take_channel_news().unwrap();
        assert_eq!(
            (news.if_version, news.added),
            (4, vec!["u".into(), "v".into()])
        );
        assert!(relay.take_channel_news().is_none());
    }

    #[test]
    fn announces_fall_due_every_few_rounds() {
        let mut relay = Relay::new(&FedConfig::default());
        let due: Vec<bool> = (0..2 * REANNOUNCE_EVERY)
            .map(|_| relay.announce_due())
            .collect();
        assert_eq!(due.iter().filter(|d| **d).count(), 2);
        assert!(due[REANNOUNCE_EVERY as usize - 1]);
    }
}
