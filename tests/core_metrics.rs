//! The core's counters for `GET /metrics` (`Server::metrics`), driven with simulated time and
//! no sockets: frames by type, errors by code, signatures, dedup drops and rate-limited logins
//! are counted at the core's choke points.

mod common;
mod support;

use common::keys::test_key;
use serde_json::json;
use socp::core::dedup::Stale;
use socp::core::federation::FedConfig;
use socp::core::server::Limits;
use socp::wire::{ErrorCode, SignedPayload, encode_frame, types};
use support::*;

const SRV: &str = "srv-a";

/// "srv-a" with bootstrap peer server2 at 9002, errors answered `error_burst` at a time and
/// refilled at 1 a second; started.
fn harness(error_burst: u32) -> CoreHarness {
    let limits = Limits {
        hello_timeout_ms: 10_000,
        error_burst,
        error_refill_per_s: 1,
        max_message_size: 256 * 1024,
    };
    let cfg = FedConfig {
        bootstrap: vec![spec("server2", 9002)],
        advertise_port: 9001,
        ..FedConfig::default()
    };
    CoreHarness::build(Setup::new(SRV).limits(limits).federation(cfg).started())
}

#[test]
fn frames_errors_and_signatures_are_counted() {
    let mut h = harness(20);
    let signed_at_start = h.server.metrics().signatures();
    let c = h.open_fresh();
    // Not JSON, then an unknown type: both are `other`; each gets an error.
    h.send(c, "{not json");
    assert_eq!(sent_kinds(&h.take()), ["ERROR"]);
    let m = h.server.metrics();
    assert_eq!(m.frames_received("other"), 1);
    assert_eq!(
        m.frames_received("FROBNICATE"),
        1,
        "unknown types count as other"
    );
    assert_eq!(m.errors_sent(ErrorCode::UnknownType), 1);
    assert_eq!(m.frames_sent(types::ERROR), 1);
    assert_eq!(m.signatures(), signed_at_start + 1, "the error is signed");

    // The same error on another connection: its signature is reused, not made again.
    let c2 = h.open_fresh();
    h.send(c2, "{not json");
    assert_eq!(sent_kinds(&h.take()), ["ERROR"]);
    let m = h.server.metrics();
    assert_eq!(m.errors_sent(ErrorCode::UnknownType), 2);
    assert_eq!(m.frames_sent(types::ERROR), 2);
    assert_eq!(m.signatures(), signed_at_start + 1);
    assert!(m.signing_seconds() > 0.0);

    // A hello: counted by type, answered with a challenge signed ahead of need.
    let c3 = h.open_fresh();
    let key = test_key("user1");
    let pubkey = key.public_key().encoded();
    let hello = json!({"client": "t", "pubkey": pubkey, "enc_pubkey": pubkey});
    h.send(
        c3,
        &user_frame_at(types::USER_HELLO, "alice", "", h.now.wall_ms, &hello, None),
    );
    assert_eq!(sent_kinds(&h.take()), [types::AUTH_CHALLENGE]);
    let m = h.server.metrics();
    assert_eq!(m.frames_received(types::USER_HELLO), 1);
    assert_eq!(m.frames_sent(types::AUTH_CHALLENGE), 1);
    assert_eq!(m.frames_received(types::MSG_DIRECT), 0);
}

#[test]
fn errors_over_the_budget_are_counted_as_not_sent() {
    let mut h = harness(2);
    let c = h.open_fresh();
    // USER_LOGIN leaves the connection open after a refusal; each bad one costs an error.
    let login = json!({"display_name": "nobody", "auth": 5});
    for _ in 0..4 {
        h.send(
            c,
            &user_frame_at(types::USER_LOGIN, "", "", h.now.wall_ms, &login, None),
        );
    }
    assert_eq!(sent_kinds(&h.take()), ["ERROR", "ERROR"]);
    let m = h.server.metrics();
    assert_eq!(m.errors_sent(ErrorCode::BadKey), 2);
    assert_eq!(m.errors_unsent(), 2);
    assert_eq!(m.frames_received(types::USER_LOGIN), 4);
}

#[test]
fn logins_refused_by_the_rate_limit_are_counted() {
    let mut h = harness(50);
    let c = h.open_fresh();
    let auth = socp::account::auth_token("guess", "victim");
    let login = json!({"display_name": "victim", "auth": auth});
    for _ in 0..socp::core::login::CONN_BURST + 2 {
        h.send(
            c,
            &user_frame_at(types::USER_LOGIN, "", "", h.now.wall_ms, &login, None),
        );
    }
    let m = h.server.metrics();
    assert_eq!(m.logins_rate_limited(), 2);
    assert_eq!(
        m.errors_sent(ErrorCode::BadKey),
        u64::from(socp::core::login::CONN_BURST) + 2
    );
}

#[test]
fn dedup_drops_are_counted_by_reason() {
    let mut h = harness(50);
    let b_key = test_key("server2");
    let hello = json!({"host": "127.0.0.1", "port": 9002, "pubkey": b_key.public_key().encoded()});
    let signed = |kind: &str, ts: i64, payload: &serde_json::Value| {
        encode_frame(
            kind,
            "srv-b",
            SRV,
            ts,
            &SignedPayload::sign(payload, &b_key).unwrap(),
        )
    };
    let link = h.open_fresh();
    h.send(
        link,
        &signed(types::SERVER_HELLO_LINK, h.now.wall_ms, &hello),
    );
    assert!(
        !sent_kinds(&h.take()).contains(&"ERROR".to_string()),
        "link refused"
    );
    // (Heartbeats are not recorded in the seen-cache: an announce is, keyed on its envelope.)
    let announce = signed(types::SERVER_ANNOUNCE, h.now.wall_ms, &hello);
    h.send(link, &announce);
    sent_kinds(&h.take());
    let m = h.server.metrics();
    assert_eq!(m.dedup_drops(Stale::Duplicate), 0);
    h.send(link, &announce);
    h.send(link, &announce);
    let stale = signed(types::SERVER_ANNOUNCE, h.now.wall_ms - 600_000, &hello);
    h.send(link, &stale);
    assert!(sent_kinds(&h.take()).is_empty(), "drops are silent");
    let m = h.server.metrics();
    assert_eq!(m.dedup_drops(Stale::Duplicate), 2);
    assert_eq!(m.dedup_drops(Stale::OutOfWindow), 1);
    assert_eq!(m.frames_received(types::SERVER_ANNOUNCE), 4);
    assert_eq!(m.frames_received(types::SERVER_HELLO_LINK), 1);
}
