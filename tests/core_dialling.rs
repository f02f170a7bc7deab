//! What the core logs about dialling its peers, and that a server stopping dials no one
//! (PROTOCOL.md §4.4), with simulated time and no sockets.
//!
//! The log is captured per test thread by a small `log::Log`: each test sees only the lines its
//! own server wrote.

mod common;
mod support;

use common::keys::test_key;
use serde_json::json;
use socp::core::federation::FedConfig;
use socp::core::server::{Action, ConnId, Input, Limits, Timer};
use socp::wire::types;
use std::cell::RefCell;
use std::sync::Once;
use support::*;

// -------------------------------------------------------------------- log capture

thread_local! {
    static LINES: RefCell<Option<Vec<(log::Level, String)>>> = const { RefCell::new(None) };
}

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        LINES.with(|lines| {
            if let Some(lines) = lines.borrow_mut().as_mut() {
                lines.push((record.level(), record.args().to_string()));
            }
        });
    }

    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

/// Starts capturing this thread's log lines (at every level).
fn capture() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        log::set_logger(&CAPTURE).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Trace);
    });
    LINES.with(|lines| *lines.borrow_mut() = Some(Vec::new()));
}

/// The lines logged on this thread since the last call.
fn logged() -> Vec<(log::Level, String)> {
    LINES.with(|lines| {
        lines
            .borrow_mut()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    })
}

/// The lines an operator running with `RUST_LOG=info` (or `warn`) sees.
fn at_least(lines: &[(log::Level, String)], level: log::Level) -> Vec<String> {
    lines
        .iter()
        .filter(|(l, _)| *l <= level)
        .map(|(_, s)| s.clone())
        .collect()
}

// -------------------------------------------------------------------- harness

/// "srv-a" with bootstrap peers server2 at 9002 and server3 at 9003; started.
fn harness() -> CoreHarness {
    let cfg = FedConfig {
        bootstrap: vec![spec("server2", 9002), spec("server3", 9003)],
        advertise_port: 9001,
        ..FedConfig::default()
    };
    let limits = Limits {
        hello_timeout_ms: 10_000,
        error_burst: 50,
        error_refill_per_s: 10,
        max_message_size: 256 * 1024,
    };
    CoreHarness::build(
        Setup::new("srv-a")
            .limits(limits)
            .federation(cfg)
            .at(MONO0, WALL0)
            .started(),
    )
}

/// Fires `Redial(t)`, answers the dial with connection `c`, and brings the link up with a
/// welcome from `peer`.
fn link_out(h: &mut CoreHarness, t: u32, c: ConnId, peer: &Peer) {
    h.input(Input::Timer(Timer::Redial(t)));
    assert_eq!(dial_targets(&h.take()), [t]);
    h.input(Input::Dialled { conn: c, target: t });
    h.welcome(c, peer, json!([]), json!([]));
    let closes = h
        .take()
        .into_iter()
        .filter(|a| matches!(a, Action::Close { .. }))
        .count();
    assert_eq!(closes, 0, "the link to {} came up", peer.id);
}

// -------------------------------------------------------------------- tests

/// §4.4 with an operator's log: the first failure is a warning naming the peer and why; the
/// next ones are logged only at debug (each one, truthfully: never as a success), with a
/// warning summarising them at most every 10 attempts and 5 minutes. Coming back, going down,
/// and the first failure after that are each logged above debug again.
#[test]
fn an_unreachable_peer_is_reported_once_then_summarised() {
    let mut h = harness();
    capture();
    let mut at = MONO0;
    let mut warned_at: Vec<u32> = Vec::new();
    let mut summaries: Vec<String> = Vec::new();
    for attempt in 1..=40u32 {
        h.advance_to(at);
        h.input(Input::Timer(Timer::Redial(0)));
        assert_eq!(dial_targets(&h.take()), [0], "attempt {attempt}");
        h.input(Input::DialFailed {
            target: 0,
            reason: "Connection refused (os error 111)".into(),
        });
        let redials = redial_timers(&h.take());
        assert_eq!(redials.len(), 1, "attempt {attempt}: {redials:?}");
        at = redials[0].0;

        let lines = logged();
        let all: Vec<&String> = lines.iter().map(|(_, s)| s).collect();
        // Every attempt and its failure are logged with the address (at debug at least) …
        assert!(
            all.iter().any(|l| l.contains("ws://127.0.0.1:9002")
                && l.contains(&format!("failed (attempt {attempt})"))
                && l.contains("Connection refused")),
            "attempt {attempt}: {all:#?}"
        );
        // … and never as a success.
        assert!(
            !all.iter()
                .any(|l| l.contains("link up") || l.contains("succeeded")),
            "attempt {attempt}: {all:#?}"
        );
        let info = at_least(&lines, log::Level::Info);
        let warn = at_least(&lines, log::Level::Warn);
        if attempt == 1 {
            assert_eq!(warn.len(), 1, "the first failure is a warning: {lines:#?}");
            assert!(
                warn[0].contains("dial to peer ws://127.0.0.1:9002 failed (attempt 1)")
                    && warn[0].contains("Connection refused")
                    && warn[0].contains("next try in"),
                "{warn:#?}"
            );
            warned_at.push(attempt);
            continue;
        }
        // Above debug, a repeated failure says nothing, or one summary line.
        assert!(info.len() <= 1, "attempt {attempt}: {info:#?}");
        assert_eq!(info, warn, "attempt {attempt}: no info-level chatter");
        if let Some(line) = warn.first() {
            assert!(
                line.contains(&format!(
                    "still unreachable after {attempt} attempts since "
                )) && line.contains("2027-01-15 08:00:00 UTC")
                    && line.contains("next try in")
                    && line.contains("ws://127.0.0.1:9002"),
                "attempt {attempt}: {line}"
            );
            warned_at.push(attempt);
            summaries.push(line.clone());
        }
    }
    assert!(summaries.len() >= 2, "{warned_at:?}: {summaries:#?}");
    assert!(warned_at[1] >= 11, "not before 10 attempts: {warned_at:?}");
    for pair in warned_at.windows(2) {
        assert!(pair[1] - pair[0] >= 10, "{warned_at:?}");
    }

    // It comes back: a warning says so (the operator was told it was unreachable), with its id.
    h.advance_to(at);
    link_out(&mut h, 0, conn(1), &Peer::new("srv-b", "server2", 9002));
    let warn = at_least(&logged(), log::Level::Warn);
    assert!(
        warn.len() == 1
            && warn[0].contains("link up with server srv-b at ws://127.0.0.1:9002")
            && warn[0].contains("after 40 failed attempts"),
        "{warn:#?}"
    );

    // It goes down: a warning with its id and address.
    h.input(Input::Closed { conn: conn(1) });
    let redials = redial_timers(&h.take());
    assert_eq!(redials.len(), 1, "{redials:?}");
    let warn = at_least(&logged(), log::Level::Warn);
    assert!(
        warn.len() == 1
            && warn[0].contains("link to server srv-b down")
            && warn[0].contains("ws://127.0.0.1:9002"),
        "{warn:#?}"
    );

    // The first failure after that is a warning again, naming the peer by its id too.
    h.advance_to(redials[0].0);
    h.input(Input::Timer(Timer::Redial(0)));
    assert_eq!(dial_targets(&h.take()), [0]);
    h.input(Input::DialFailed {
        target: 0,
        reason: "Connection refused (os error 111)".into(),
    });
    let warn = at_least(&logged(), log::Level::Warn);
    assert!(
        warn.len() == 1
            && warn[0].contains("dial to peer srv-b (ws://127.0.0.1:9002) failed (attempt 1)"),
        "{warn:#?}"
    );
}

/// A graceful shutdown closes every link; none of them is redialled, and nothing armed before
/// (a redial timer, a dial under way) dials again.
#[test]
fn after_shutdown_a_closing_link_schedules_no_redial() {
    let mut h = harness();
    let (link_b, link_c) = (conn(1), conn(2));
    link_out(&mut h, 0, link_b, &Peer::new("srv-b", "server2", 9002));
    // server3: a dial under way (connected, no welcome yet).
    h.input(Input::Timer(Timer::Redial(1)));
    assert_eq!(dial_targets(&h.take()), [1]);
    h.input(Input::Dialled {
        conn: link_c,
        target: 1,
    });
    h.take();

    h.shutdown();
    let actions = h.take();
    let closed: Vec<ConnId> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Close { conn, .. } => Some(*conn),
            _ => None,
        })
        .collect();
    assert!(
        closed.contains(&link_b) && closed.contains(&link_c),
        "{actions:#?}"
    );
    assert!(redial_timers(&actions).is_empty(), "{actions:#?}");
    assert!(dial_targets(&actions).is_empty(), "{actions:#?}");

    // What the net layer reports while it finishes: the closes, a dial that failed, a redial
    // timer armed earlier, a dial that connected late.
    h.input(Input::Closed { conn: link_b });
    h.input(Input::Closed { conn: link_c });
    h.input(Input::DialFailed {
        target: 1,
        reason: "Connection refused (os error 111)".into(),
    });
    h.input(Input::Timer(Timer::Redial(0)));
    h.input(Input::Timer(Timer::Redial(1)));
    let late = conn(3);
    h.input(Input::Dialled {
        conn: late,
        target: 0,
    });
    let actions = h.take();
    assert!(redial_timers(&actions).is_empty(), "{actions:#?}");
    assert!(dial_targets(&actions).is_empty(), "{actions:#?}");
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Send { .. })),
        "no hello on a dial that connects during shutdown: {actions:#?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Close { conn, .. } if *conn == late)),
        "it is closed: {actions:#?}"
    );
}

/// Users are named in the log by the display name they chose and their id, coming online and
/// going offline.
#[test]
fn users_are_logged_by_display_name_and_id() {
    let mut h = harness();
    h.take();
    capture();
    let key = test_key("user1");
    let c = conn(7);
    h.input(Input::Opened {
        conn: c,
        peer: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    });
    let hello = json!({
        "client": "t",
        "pubkey": key.public_key().encoded(),
        "enc_pubkey": key.public_key().encoded(),
        "meta": {"display_name": "Alice"},
    });
    let hello = user_frame_at(
        types::USER_HELLO,
        "id-alice",
        "",
        h.now.wall_ms,
        &hello,
        None,
    );
    h.input(Input::Text {
        conn: c,
        text: &hello,
    });
    let challenge = envelopes_to(&h.take(), c)
        .into_iter()
        .find(|e| e.kind == types::AUTH_CHALLENGE)
        .expect("a challenge");
    let resp = json!({
        "nonce": challenge.payload["nonce"],
        "server_id": "srv-a",
        "user_id": "id-alice",
    });
    let resp = user_frame_at(
        types::AUTH_RESPONSE,
        "id-alice",
        "srv-a",
        h.now.wall_ms,
        &resp,
        Some(&key),
    );
    h.input(Input::Text {
        conn: c,
        text: &resp,
    });
    h.input(Input::Closed { conn: c });
    let info = at_least(&logged(), log::Level::Info);
    assert!(
        info.iter()
            .any(|l| l.starts_with("user Alice (id id-alice) online (conn #7)")),
        "{info:#?}"
    );
    assert!(
        info.iter()
            .any(|l| l.starts_with("user Alice (id id-alice) offline (conn #7)")),
        "{info:#?}"
    );
}

/// The rule behind the log above: a run's first failure is reported, then at most one summary
/// per 10 attempts and 5 minutes, whichever is later.
#[test]
fn failure_log_reports_the_first_then_summaries() {
    use socp::core::federation::{
        FailureLog, SUMMARY_EVERY_ATTEMPTS, SUMMARY_EVERY_MS, failure_log,
    };
    assert_eq!(failure_log(1, 0, 0), FailureLog::First);
    assert_eq!(failure_log(1, 7, 0), FailureLog::First, "a new run");
    let n = SUMMARY_EVERY_ATTEMPTS;
    assert_eq!(failure_log(n, 1, SUMMARY_EVERY_MS), FailureLog::Quiet);
    assert_eq!(
        failure_log(n + 1, 1, SUMMARY_EVERY_MS - 1),
        FailureLog::Quiet
    );
    assert_eq!(failure_log(n + 1, 1, SUMMARY_EVERY_MS), FailureLog::Summary);
    assert_eq!(failure_log(100, 1, u64::MAX), FailureLog::Summary);
}
