//! Who makes the server's signatures (issue "signatures off the loop").
//!
//! The core never signs itself: it builds a payload's canonical text, wraps it in a
//! [`Signed`] and hands it to its [`Signer`] with an [`Urgency`]. Frames made from it take
//! their place in each connection's order at once and are completed when the signature is
//! made ([`crate::wire::frame`]).
//!
//! - [`InlineSigner`] signs at once, on the caller's thread: core tests (deterministic) and
//!   `--sign-threads 0` (one-core machines).
//! - The net layer's pool ([`crate::net::signpool`]) signs on worker threads and wakes the
//!   event loop when frames are complete.

use crate::crypto::PrivateKey;
use crate::wire::frame::Signed;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Whose work a signature is. A pool serves conversations first (see the README, "Signatures
/// off the loop"): the frames of users already talking must not wait behind a login storm's
/// or a mass leave's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// Frames carried for users and servers already connected: deliveries, channel copies,
    /// file frames, heartbeats, errors.
    Conversation,
    /// Logins and leaves: challenges, acks, directory and channel snapshots, presence.
    Bulk,
    /// Work nobody waits for: our users' adverts signed afresh to stay inside the peers'
    /// freshness window (§6). Signed when nothing else waits.
    Background,
}

/// Signatures made and the time they took, for `GET /metrics`. Shared with signer threads.
#[derive(Debug, Default)]
pub struct SignStats {
    signatures: AtomicU64,
    nanos: AtomicU64,
}

impl SignStats {
    pub fn signatures(&self) -> u64 {
        self.signatures.load(Ordering::Relaxed)
    }

    pub fn seconds(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// Signs `signed` with `key` now, on this thread, and counts it.
    pub fn sign_now(&self, key: &PrivateKey, signed: &Signed) {
        let start = Instant::now();
        let sig = key.sign_b64(signed.canonical().as_bytes());
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.signatures.fetch_add(1, Ordering::Relaxed);
        self.nanos.fetch_add(ns, Ordering::Relaxed);
        signed.complete(sig);
    }
}

/// Makes the server's signatures.
pub trait Signer {
    /// Signs `signed`, now or later; [`Signed::complete`] writes the frames waiting for it.
    fn submit(&self, signed: &Signed, urgency: Urgency);
    /// Whether a signature submitted now would start without keeping anything else waiting.
    /// Work done ahead of need (a newcomer's advert and ack, signed while it signs its
    /// answer: `Server::on_user_hello`) is submitted only then.
    fn spare(&self) -> bool;
    fn stats(&self) -> &Arc<SignStats>;
}

/// Signs at once, on the calling thread.
pub struct InlineSigner {
    key: Arc<PrivateKey>,
    stats: Arc<SignStats>,
}

impl InlineSigner {
    pub fn new(key: Arc<PrivateKey>) -> InlineSigner {
        InlineSigner {
            key,
            stats: Arc::default(),
        }
    }
}

impl Signer for InlineSigner {
    fn submit(&self, signed: &Signed, _urgency: Urgency) {
        self.stats.sign_now(&self.key, signed);
    }

    /// Never: a signature made ahead of need would be made on the caller's thread, in the
    /// turn that needs none (and for a hello never answered, for nothing).
    fn spare(&self) -> bool {
        false
    }

    fn stats(&self) -> &Arc<SignStats> {
        &self.stats
    }
}
