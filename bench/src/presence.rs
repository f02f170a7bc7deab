//! Scenario a, presence fan-out: with N steady clients online, one more client (the *joiner*,
//! on server 0) logs in K times on a fixed schedule, and logs out once all N have seen it.
//!
//! Latency counts from the **scheduled** login time (when the joiner starts to connect): it
//! includes the TCP and WebSocket handshakes and the hello's round trips (one RSA signature on
//! each side), which is what a person waits for before the others see them online. Per event:
//! the first and the last of the N receivers. If a cycle overruns, the next login starts late
//! and that lag stays in its latency (open loop; no coordinated omission).
//!
//! The logout half is measured too (from the moment the joiner closes to each `USER_REMOVE`),
//! because the next login must wait for it: the servers refuse an id still listed as online.

use crate::common::{
    Mesh, Meter, Outcome, Pacer, Sample, SampleKind, Samples, Trouble, all_ready, row, since,
};
use crate::fleet::{Note, Phase};
use crate::stats::{Lat, round3};
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(PartialEq, Eq)]
enum Step {
    /// Waiting for the scheduled login (or for the previous logout to finish).
    Wait,
    /// Connecting and saying hello; the others' adverts are counted.
    Login,
    /// Closed; the others' removals are counted.
    Logout,
}

pub fn run(m: &mut Mesh) -> Result<Outcome, String> {
    all_ready(&m.fleet, &m.steady)?;
    let n = m.steady.len();
    let k_total = m.opts.repeat;
    let interval = Duration::from_millis(m.opts.presence_interval_ms);
    let timeout = m.timeout();
    let joiner_id = format!("{}-j0", m.opts.id_prefix);
    let joiner = m.fleet.add_client(joiner_id.clone(), 0, false);
    let clients = m.fleet.clients.len();

    let (mut first, mut last, mut each, mut hello, mut lag): (Lat, Lat, Lat, Lat, Lat) =
        Default::default();
    let (mut off_first, mut off_last): (Lat, Lat) = Default::default();
    let mut missed_adverts = 0u64;
    let mut missed_removes = 0u64;
    let mut trouble = Trouble::default();
    let mut samples = Samples::new(8);
    let mut deliveries = 0u64;
    let mut last_rx: Option<Instant> = None;
    let mut seen = vec![usize::MAX; clients]; // event number that client has seen
    let mut removed = vec![usize::MAX; clients];

    let meter = Meter::start(&m.pids);
    let t0 = Instant::now() + Duration::from_millis(200);
    let mut step = Step::Wait;
    let mut k = 0usize;
    let sched = |k: usize| t0 + interval * k as u32;
    let _pacer = Pacer::start(m.fleet.waker(), (0..k_total).map(sched).collect());
    let (mut count, mut ev_first, mut ev_last) = (0usize, None::<Instant>, None::<Instant>);
    let (mut joiner_ready, mut joiner_closed) = (false, false);
    let mut logout_at = t0;
    let (mut rm_count, mut rm_first, mut rm_last) = (0usize, None::<Instant>, None::<Instant>);
    let mut deadline = t0 + timeout;

    loop {
        let now = Instant::now();
        match step {
            Step::Wait => {
                if now >= sched(k) && m.fleet.clients[joiner].phase == Phase::Offline {
                    lag.record(since(now, sched(k)));
                    m.fleet.connect(joiner)?;
                    step = Step::Login;
                    (count, ev_first, ev_last) = (0, None, None);
                    joiner_ready = false;
                    deadline = now + timeout;
                }
            }
            Step::Login => {
                if (joiner_ready && count == n) || now > deadline {
                    missed_adverts += (n - count) as u64;
                    if let (Some(f), Some(l)) = (ev_first, ev_last) {
                        first.record(since(f, sched(k)));
                        last.record(since(l, sched(k)));
                    }
                    m.fleet.close(joiner);
                    m.fleet.flush_dirty();
                    logout_at = Instant::now();
                    step = Step::Logout;
                    (rm_count, rm_first, rm_last) = (0, None, None);
                    joiner_closed = false;
                    deadline = logout_at + timeout;
                }
            }
            Step::Logout => {
                if (rm_count == n && joiner_closed) || now > deadline {
                    missed_removes += (n - rm_count) as u64;
                    if let (Some(f), Some(l)) = (rm_first, rm_last) {
                        off_first.record(since(f, logout_at));
                        off_last.record(since(l, logout_at));
                    }
                    k += 1;
                    if k == k_total {
                        break;
                    }
                    if !joiner_closed {
                        return Err("the joiner's connection did not close".into());
                    }
                    step = Step::Wait;
                    continue;
                }
            }
        }
        let wait = match step {
            Step::Wait => sched(k).saturating_duration_since(now),
            _ => Duration::from_millis(50),
        };
        m.fleet
            .turn(Some(wait.min(Duration::from_millis(50))))
            .map_err(|e| format!("poll: {e}"))?;
        for note in std::mem::take(&mut m.fleet.notes) {
            match note {
                Note::Ready { client, at } if client == joiner => {
                    hello.record(since(at, sched(k)));
                    joiner_ready = true;
                }
                Note::Advertise {
                    client,
                    user,
                    at,
                    text,
                } if user == joiner && step == Step::Login && client != joiner => {
                    if seen[client] != k {
                        seen[client] = k;
                        count += 1;
                        deliveries += 1;
                        last_rx = Some(at);
                        each.record(since(at, sched(k)));
                        ev_first.get_or_insert(at);
                        ev_last = Some(at);
                        if count == 1 || count == n {
                            samples.push(Sample {
                                recipient: client,
                                text,
                                what: SampleKind::Advertise {
                                    user_id: joiner_id.clone(),
                                },
                            });
                        }
                    }
                }
                Note::Remove { client, user, at } if user == joiner && step == Step::Logout => {
                    if removed[client] != k {
                        removed[client] = k;
                        rm_count += 1;
                        deliveries += 1;
                        last_rx = Some(at);
                        rm_first.get_or_insert(at);
                        rm_last = Some(at);
                    }
                }
                Note::Closed {
                    client,
                    expected: true,
                    ..
                } if client == joiner => joiner_closed = true,
                other => {
                    if let Note::Closed { client, .. } = &other
                        && *client == joiner
                    {
                        joiner_closed = true;
                    }
                    trouble.note(&m.fleet, &other);
                }
            }
        }
    }
    let reading = meter.stop();
    let active_s = last_rx.map_or(0.0, |t| since(t, t0).as_secs_f64());
    let per_s = if active_s > 0.0 {
        deliveries as f64 / active_s
    } else {
        0.0
    };
    let verified = samples.verify(&m.fleet);
    let lag_s = lag.summary();
    let mut lines = vec![
        format!(
            "{k_total} logins of {joiner_id} on server 0, seen by {n} clients; every {} ms; \
             {deliveries} presence frames received ({per_s:.0}/s over {active_s:.1} s)",
            interval.as_millis()
        ),
        format!(
            "login start lag behind schedule: p50 {:.2} ms, max {:.2} ms",
            lag_s.p50, lag_s.max
        ),
        format!(
            "missed: {missed_adverts} adverts, {missed_removes} removals (after {:.0} s each)",
            timeout.as_secs_f64()
        ),
        reading.line(),
        format!(
            "sampled frames fully verified: {}/{}",
            verified["ok"], verified["checked"]
        ),
    ];
    lines.extend(trouble.line());
    let json = json!({
        "status": if missed_adverts == 0 && missed_removes == 0 && trouble.is_clean() { "ok" } else { "degraded" },
        "events": k_total,
        "receivers": n,
        "interval_ms": interval.as_millis() as u64,
        "definition": "latency from the scheduled login (joiner starts to connect) until each \
                       of the N others reads the joiner's USER_ADVERTISE; first/last = first \
                       and last receiver per event; each = every receipt; hello = until the \
                       joiner has its USER_HELLO_ACK, LIST_RESPONSE and snapshot; offline = \
                       from the joiner's close to each USER_REMOVE",
        "latency_ms": {
            "first": first.json(),
            "last": last.json(),
            "each": each.json(),
            "hello": hello.json(),
            "offline_first": off_first.json(),
            "offline_last": off_last.json(),
        },
        "sender_lag_ms": lag.json(),
        "deliveries": deliveries,
        "deliveries_per_s": round3(per_s),
        "missed": {"adverts": missed_adverts, "removes": missed_removes},
        "cpu": reading.json(),
        "trouble": trouble.json(),
        "verified_samples": verified,
    });
    Ok(Outcome {
        name: "presence",
        json,
        rows: vec![
            row("advert, first receiver", &first),
            row("advert, last receiver", &last),
            row("advert, every receiver", &each),
            row("joiner hello complete", &hello),
            row("offline, first receiver", &off_first),
            row("offline, last receiver", &off_last),
        ],
        lines,
    })
}
