//! Micro-benchmarks of the per-frame work that is not RSA: canonical JSON of a typical
//! `USER_DELIVER` payload (what a signature covers, PROTOCOL.md §3.3), writing a frame
//! (`wire::encode_frame`) and parsing an incoming one (`Envelope::parse`).
//!
//! Run: `cargo bench --bench wire`. The payload is built once with a fixed TEST-ONLY key from
//! `tests/fixtures/keys`, so its sizes are those of real traffic (a 683-character ciphertext, a
//! 734-character `sender_pub`, a 683-character `content_sig`).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};
use socp::crypto::{self, PrivateKey};
use socp::wire::{self, Envelope, SignedPayload};
use std::hint::black_box;

/// TEST-ONLY keys (tests/fixtures/keys/user1.pem and user2.pem).
const SENDER_PEM: &str = include_str!("../tests/fixtures/keys/user1.pem");
const RECIPIENT_PEM: &str = include_str!("../tests/fixtures/keys/user2.pem");

const SENDER: &str = "5c0e2d44-1f3b-4a6c-8d9e-0a1b2c3d4e5f";
const RECIPIENT: &str = "9a8b7c6d-5e4f-4321-8765-0fedcba98765";
const SERVER: &str = "3f9a1c52-8b7e-4d21-9c3a-5e6f7a8b9c0d";
const TS: i64 = 1_760_000_000_123;

/// The `USER_DELIVER` payload a server sends a recipient (§5.5).
fn user_deliver_payload() -> Value {
    let sender = PrivateKey::from_pem(SENDER_PEM).expect("fixture key parses");
    let recipient = PrivateKey::from_pem(RECIPIENT_PEM).expect("fixture key parses");
    let ct = recipient
        .public_key()
        .encrypt(b"hello bob, this is a typical short chat message")
        .expect("encrypt");
    let ciphertext = socp::wire::b64::encode(&ct);
    let content_sig = crypto::make_content_sig(&sender, &ct, SENDER, Some(RECIPIENT), TS);
    json!({
        "ciphertext": ciphertext,
        "sender": SENDER,
        "sender_pub": sender.public_key().encoded(),
        "content_sig": content_sig,
        "ts": TS,
    })
}

fn wire_benches(c: &mut Criterion) {
    let payload = user_deliver_payload();
    let server_key = PrivateKey::from_pem(RECIPIENT_PEM).expect("fixture key parses");
    let signed = SignedPayload::sign(&payload, &server_key).expect("canonical");
    let frame = wire::encode_frame("USER_DELIVER", SERVER, RECIPIENT, TS, &signed);

    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Bytes(signed.canonical.len() as u64));
    group.bench_function("canonical_json_user_deliver", |b| {
        b.iter(|| socp::wire::canon::canonical(black_box(&payload)).expect("canonical"))
    });
    group.throughput(Throughput::Bytes(frame.len() as u64));
    group.bench_function("encode_frame_user_deliver", |b| {
        b.iter(|| {
            wire::encode_frame(
                black_box("USER_DELIVER"),
                SERVER,
                RECIPIENT,
                TS,
                black_box(&signed),
            )
        })
    });
    group.bench_function("envelope_parse_user_deliver", |b| {
        b.iter(|| Envelope::parse(black_box(&frame)).expect("parses"))
    });
    group.finish();
}

criterion_group!(benches, wire_benches);
criterion_main!(benches);
