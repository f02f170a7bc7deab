//! Micro-benchmarks of the RSA-4096 operations every message costs (PROTOCOL.md §3.1):
//! RSASSA-PSS signing and verification with salt length 32, as `socp::crypto` does them.
//!
//! Run: `cargo bench --bench crypto`. The key is a fixed TEST-ONLY key from
//! `tests/fixtures/keys` (never use it for anything real).

use criterion::{Criterion, criterion_group, criterion_main};
use socp::crypto::PrivateKey;
use std::hint::black_box;

/// TEST-ONLY key (tests/fixtures/keys/user1.pem).
const TEST_KEY_PEM: &str = include_str!("../tests/fixtures/keys/user1.pem");

/// A typical signed payload: the canonical `AUTH_RESPONSE` a user signs at login.
const MESSAGE: &[u8] = br#"{"nonce":"q7bK0l7m2c6WfN5yT1dS4a8xJ3eR9uV0hG2iL5oP6sA","server_id":"3f9a1c52-8b7e-4d21-9c3a-5e6f7a8b9c0d","user_id":"5c0e2d44-1f3b-4a6c-8d9e-0a1b2c3d4e5f"}"#;

fn crypto(c: &mut Criterion) {
    let key = PrivateKey::from_pem(TEST_KEY_PEM).expect("fixture key parses");
    let public = key.public_key().clone();
    let sig = key.sign(MESSAGE);

    let mut group = c.benchmark_group("rsa4096");
    group.bench_function("pss_sign_salt32", |b| {
        b.iter(|| key.sign(black_box(MESSAGE)))
    });
    group.bench_function("pss_verify_salt32", |b| {
        b.iter(|| assert!(public.verify(black_box(MESSAGE), black_box(&sig))))
    });
    group.finish();
}

criterion_group!(benches, crypto);
criterion_main!(benches);
