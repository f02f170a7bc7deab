//! The key pool of the benchmark's clients.
//!
//! **TEST-ONLY KEYS.** These are the fixed RSA-4096 keys of `tests/fixtures/keys/user1.pem` ..
//! `user8.pem`, committed to the repository for tests. They are public knowledge: never use them
//! for anything but tests and benchmarks on loopback. Generating fresh RSA-4096 keys would cost
//! about half a second each; client `i` reuses key `i % 8` under its own `user_id` (distinct ids
//! may share a key: a server binds each id to a key, PROTOCOL.md §5.2).

use socp::crypto::PrivateKey;
use std::sync::Arc;

/// PEM text of the TEST-ONLY pool keys.
const POOL_PEM: [&str; 8] = [
    include_str!("../../tests/fixtures/keys/user1.pem"),
    include_str!("../../tests/fixtures/keys/user2.pem"),
    include_str!("../../tests/fixtures/keys/user3.pem"),
    include_str!("../../tests/fixtures/keys/user4.pem"),
    include_str!("../../tests/fixtures/keys/user5.pem"),
    include_str!("../../tests/fixtures/keys/user6.pem"),
    include_str!("../../tests/fixtures/keys/user7.pem"),
    include_str!("../../tests/fixtures/keys/user8.pem"),
];

/// Parses the eight TEST-ONLY keys.
pub fn pool() -> Vec<Arc<PrivateKey>> {
    POOL_PEM
        .iter()
        .map(|pem| Arc::new(PrivateKey::from_pem(pem).expect("fixture test key parses")))
        .collect()
}
