//! The public channel (PROTOCOL.md §8): one channel, `group_id = "public"`, whose members are
//! the online users of the directory. What this module owns is the channel's `version`, which
//! only grows: every membership change bumps it, and a server adopts the largest it sees.

/// The channel's version counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicChannel {
    version: i64,
}

impl PublicChannel {
    /// Resumes from the version persisted at the last shutdown.
    pub fn new(version: i64) -> Self {
        PublicChannel {
            version: version.max(0),
        }
    }

    pub fn version(&self) -> i64 {
        self.version
    }

    /// A member joined or left here.
    pub fn bump(&mut self) -> i64 {
        // A peer may have made us adopt any version (§8): never overflow.
        self.version = self.version.saturating_add(1);
        self.version
    }

    /// A peer reported `version`; adopt it when larger. Returns whether it was adopted.
    pub fn adopt(&mut self, version: i64) -> bool {
        if version > self.version {
            self.version = version;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_only_grows() {
        let mut c = PublicChannel::new(5);
        assert_eq!(c.bump(), 6);
        assert!(!c.adopt(3));
        assert_eq!(c.version(), 6);
        assert!(c.adopt(10));
        assert_eq!(c.bump(), 11);
        assert_eq!(PublicChannel::new(-4).version(), 0);
    }
}
