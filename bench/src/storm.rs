//! Scenario s, login storm and mass leave (issue 11): while two users on the first server (the
//! *probe*) exchange direct messages at `--probe-rate`, S extra clients on that server log in
//! at once, and later all leave at once.
//!
//! - **The probe is apart**: its two users have their own connections and event loop, on a
//!   thread of their own ([`Probe`]). An unrelated user reads its socket on its own machine; in
//!   one loop with the storm clients, a probe message that arrived was read only after the
//!   frames of a thousand storm clients ready in the same poll, and that wait was the bench's,
//!   not the server's. The thread still shares this machine's CPUs with the servers and the
//!   rest of the bench. Presence is timed on two steady users of the first server (the
//!   *watchers*), read by the main loop.
//! - **Before the clock**: the probe's messages are encrypted and signed (on every CPU, as in the
//!   dm scenario), and the S storm clients' TCP connections and WebSocket handshakes are made;
//!   each waits, open and silent, with its `USER_HELLO` held back. The hellos themselves are
//!   built when sent (a few µs each); the `AUTH_RESPONSE` signature covers the server's nonce,
//!   so it cannot be made beforehand: a separate bench thread makes it ([`Signer`]), so that the
//!   loop keeps reading the storm clients while they sign. Its signing time is
//!   reported, and the bench's whole CPU time with it.
//! - **Login storm**: after `--probe-idle` seconds of probe alone (the idle baseline), every
//!   storm client's `USER_HELLO` is written in one burst. Timed from the burst: each client's
//!   `USER_HELLO_ACK` ("all hellos complete"), its `LIST_RESPONSE` and its
//!   `PUBLIC_CHANNEL_SNAPSHOT` (the server sends both after every hello, PROTOCOL.md §7), and the
//!   watchers' `USER_ADVERTISE` of every storm user.
//! - **Mass leave**: after another `--probe-idle` seconds of probe with the storm users online,
//!   every storm client writes a WebSocket close frame and shuts its side of the socket, in one
//!   burst. Timed: until both watchers have read the `USER_REMOVE` of every storm user, and
//!   until the server has closed every storm connection.
//!
//! The probe's figure is a **one-way** delivery latency, not a round trip: from each message's
//! scheduled send time (message j at j/R s; even j from the first probe user to the second, odd j
//! back) until the receiver reads its `USER_DELIVER`. Sender and receiver are in one thread,
//! so both ends use one monotonic clock; a round trip would be two such legs. Messages count in
//! the phase during which they were scheduled: idle (before the burst was written), storm (from
//! the burst until everything timed above is complete). No message is scheduled after a phase
//! completes; those in flight are waited for, and any not delivered within `--timeout` counts
//! as lost.

use crate::common::{
    Mesh, Meter, MeterReading, Outcome, Pacer, Samples, Trouble, all_ready, login_all, row, since,
};
use crate::dm::{Pre, precompute};
use crate::fleet::{Fleet, MsgKey, Note, Phase, ServerEnd, Signer};
use crate::stats::{Lat, round3};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Which burst a stage ends with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Burst {
    Login,
    Leave,
}

/// The probe's figures over one phase.
#[derive(Default)]
struct ProbePhase {
    latency: Lat,
    /// How late the loop wrote each message (the bench's own delay, inside `latency`).
    lag: Lat,
    sent: u64,
    delivered: u64,
    /// The slowest message: when it was due, in ms from the burst (negative: before it), and
    /// its latency in ms. Where in a storm the worst wait falls says what it waited for.
    worst: Option<(f64, f64)>,
}

impl ProbePhase {
    fn json(&self, meter: &Option<MeterReading>) -> Value {
        json!({
            "sent": self.sent,
            "delivered": self.delivered,
            "lost": self.sent - self.delivered,
            "latency_ms": self.latency.json(),
            "sender_lag_max_ms": round3(self.lag.summary().max),
            "worst_due_after_burst_ms": self.worst.map(|w| round3(w.0)),
            "cpu": meter.as_ref().map(MeterReading::json),
        })
    }
}

/// What one stage (probe idle, then a burst) measured.
struct Stage {
    idle: ProbePhase,
    busy: ProbePhase,
    idle_meter: Option<MeterReading>,
    busy_meter: Option<MeterReading>,
    /// Time to write the burst (every hello or every close).
    burst_write_ms: f64,
    /// Per storm client, from the burst: hello acknowledged, list, snapshot (login) or the
    /// server's close (leave).
    acked: Lat,
    listed: Lat,
    ready: Lat,
    closed: Lat,
    /// Seconds from the burst until the last of each (None: never completed).
    all_acked_s: Option<f64>,
    all_listed_s: Option<f64>,
    all_ready_s: Option<f64>,
    all_closed_s: Option<f64>,
    /// Until both probe users have seen the advert (login) or removal (leave) of every storm
    /// user.
    probe_saw_all_s: Option<f64>,
    /// (signatures, ms) the bench's signer made during the stage.
    signing: (u64, f64),
    precompute_s: f64,
    trouble: Trouble,
}

fn secs(d: Option<Duration>) -> Option<f64> {
    d.map(|d| round3(d.as_secs_f64()))
}

/// The probe: two users with connections and an event loop of their own, run on a thread of
/// their own during each stage. An unrelated user is on another machine: its messages must be
/// read when they arrive, not after this process's main loop has read a thousand storm
/// clients' frames (that wait is the bench's, not the server's). The thread shares the CPUs
/// with everything else, as such a user's machine would not.
struct Probe {
    fleet: Fleet,
    users: [usize; 2],
    samples: Samples,
}

/// One probe message as sent: when it was due, how late the probe wrote it, and (once read)
/// its one-way latency.
struct Probed {
    due: Instant,
    lag: Duration,
    latency: Option<Duration>,
}

impl Probe {
    /// Two users `{prefix}-probe0` and `-probe1` on the first server, logged in.
    fn start(m: &Mesh, timeout: Duration) -> Result<Probe, String> {
        let ends = m
            .fleet
            .servers
            .iter()
            .map(|e| ServerEnd {
                url: e.url.clone(),
                addr: e.addr,
                server_id: None,
                key: None,
            })
            .collect();
        let mut fleet = Fleet::new(ends, 4 << 10).map_err(|e| format!("probe: {e}"))?;
        fleet.peer_sig = m.fleet.peer_sig;
        let prefix = &m.opts.id_prefix;
        let users = [0, 1].map(|i| fleet.add_client(format!("{prefix}-probe{i}"), 0, true));
        login_all(
            &mut fleet,
            &m.pids,
            &users,
            2,
            timeout,
            "probe",
            &mut |_| Ok(()),
        )?;
        Ok(Probe {
            fleet,
            users,
            samples: Samples::new(8),
        })
    }

    /// Sends `msgs` on schedule from `t0` until told (through `stop`) when the stage's work
    /// was complete; no message due after that is sent. Then waits for those in flight, up to
    /// `timeout`. Returns the probe, each message sent (in order), and what went wrong.
    fn run(
        mut self,
        mut msgs: Vec<Pre>,
        t0: Instant,
        stop: mpsc::Receiver<Instant>,
        timeout: Duration,
    ) -> Result<(Probe, Vec<Probed>, Trouble), String> {
        let index: HashMap<MsgKey, usize> =
            msgs.iter().enumerate().map(|(i, p)| (p.key, i)).collect();
        let _pacer = Pacer::start(
            self.fleet.waker(),
            msgs.iter().map(|p| t0 + p.offset).collect(),
        );
        let mut sent: Vec<Probed> = Vec::with_capacity(msgs.len());
        let mut delivered = 0usize;
        let mut trouble = Trouble::default();
        let mut until: Option<Instant> = None;
        loop {
            if until.is_none() {
                match stop.try_recv() {
                    Ok(at) => until = Some(at),
                    Err(mpsc::TryRecvError::Empty) => {}
                    Err(mpsc::TryRecvError::Disconnected) => {
                        return Err("the probe was abandoned".into());
                    }
                }
            }
            let now = Instant::now();
            let mut wrote = false;
            while let Some(p) = msgs.get_mut(sent.len()) {
                let due = t0 + p.offset;
                if due > now || until.is_some_and(|u| due > u) {
                    break;
                }
                let (sender, frame) = (p.sender, std::mem::take(&mut p.frame));
                if !self.fleet.send(sender, frame) {
                    return Err(format!(
                        "probe user {} is no longer connected",
                        self.fleet.clients[sender].user_id
                    ));
                }
                sent.push(Probed {
                    due,
                    lag: since(now, due),
                    latency: None,
                });
                wrote = true;
            }
            if wrote {
                self.fleet.flush_dirty();
            }
            match until {
                Some(u) if delivered == sent.len() || now > u + timeout => break,
                None if sent.len() == msgs.len() => {
                    return Err(format!(
                        "the probe ran out of its {} precomputed messages before the stage \
                         completed",
                        msgs.len()
                    ));
                }
                _ => {}
            }
            let wait = msgs.get(sent.len()).map_or(Duration::from_millis(50), |p| {
                (t0 + p.offset).saturating_duration_since(now)
            });
            self.fleet
                .turn(Some(wait.min(Duration::from_millis(50))))
                .map_err(|e| format!("probe poll: {e}"))?;
            for note in std::mem::take(&mut self.fleet.notes) {
                match note {
                    Note::Message {
                        client,
                        key,
                        at,
                        text,
                    } => {
                        let Some(&i) = index.get(&key) else { continue };
                        let Some(s) = sent.get_mut(i) else { continue };
                        if s.latency.is_some() || msgs[i].receiver != client {
                            continue;
                        }
                        s.latency = Some(since(at, s.due));
                        delivered += 1;
                        if i % 50 == 0 {
                            self.samples.push(msgs[i].sample(client, text));
                        }
                    }
                    // Presence of the storm users (not in this fleet) is ignored by the fleet.
                    other => {
                        trouble.note(&self.fleet, &other);
                    }
                }
            }
        }
        Ok((self, sent, trouble))
    }
}

/// Runs the probe for `--probe-idle` s, then the burst, until the burst's work is complete
/// (or `--timeout` after it), then waits for the probe's messages in flight. `watchers` are
/// the two steady users on the first server whose presence updates are timed.
fn stage(
    m: &mut Mesh,
    probe: Probe,
    watchers: [usize; 2],
    storm: std::ops::Range<usize>,
    burst: Burst,
) -> Result<(Stage, Probe), String> {
    let rate = m.opts.probe_rate;
    let idle_s = m.opts.probe_idle_s;
    let timeout = m.timeout();
    // Enough for the idle phase and a burst that takes the whole timeout, with a margin for a
    // late burst: the stage ends on the timeout, not by running out of messages.
    let count = (rate * (idle_s + m.opts.timeout_s + 5.0)).ceil() as usize + 1;
    let tag = match burst {
        Burst::Login => "storm-login",
        Burst::Leave => "storm-leave",
    };
    let pre_started = Instant::now();
    let [p0, p1] = probe.users;
    let msgs: Vec<Pre> = precompute(&probe.fleet, &[(p0, p1), (p1, p0)], count, rate, tag);
    let precompute_s = pre_started.elapsed().as_secs_f64();
    let s_n = storm.len();
    let member = |c: usize| storm.contains(&c);
    let mut acked = vec![false; s_n];
    let mut listed = vec![false; s_n];
    let mut ready = vec![false; s_n];
    let mut closed = vec![false; s_n];
    let (mut n_acked, mut n_listed, mut n_ready, mut n_closed) = (0, 0, 0, 0);
    // Storm users each watcher has seen arrive (login) or leave (leave).
    let mut saw = [vec![false; s_n], vec![false; s_n]];
    let mut n_saw = [0usize; 2];
    // Progress on stderr at every tenth (large storms take tens of seconds).
    let tenth = s_n.div_ceil(10).max(1);
    let progress = s_n >= 200;
    let mut st = Stage {
        idle: ProbePhase::default(),
        busy: ProbePhase::default(),
        idle_meter: None,
        busy_meter: None,
        burst_write_ms: 0.0,
        acked: Lat::default(),
        listed: Lat::default(),
        ready: Lat::default(),
        closed: Lat::default(),
        all_acked_s: None,
        all_listed_s: None,
        all_ready_s: None,
        all_closed_s: None,
        probe_saw_all_s: None,
        signing: (0, 0.0),
        precompute_s,
        trouble: Trouble::default(),
    };
    let signing0 = m.fleet.signer.as_ref().map_or((0, 0.0), Signer::work);

    let mut meter = Meter::start(&m.pids);
    let t0 = Instant::now() + Duration::from_millis(100);
    let burst_due = t0 + Duration::from_secs_f64(idle_s);
    let _pacer = Pacer::start(m.fleet.waker(), vec![burst_due]);
    let (stop, stop_rx) = mpsc::channel();
    let probe_waker = probe.fleet.waker();
    let probe_thread = std::thread::spawn(move || probe.run(msgs, t0, stop_rx, timeout));
    let tell_probe = |at: Instant| {
        let _ = stop.send(at);
        let _ = probe_waker.wake();
    };
    let mut burst_at: Option<Instant> = None;
    // When the burst's work was complete (or timed out): the probe schedules nothing later.
    let mut done_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if burst_at.is_none() && now >= burst_due {
            m.fleet.flush_dirty();
            st.idle_meter = Some(meter.stop());
            meter = Meter::start(&m.pids);
            let started = Instant::now();
            for c in storm.clone() {
                match burst {
                    Burst::Login => {
                        if !m.fleet.hello(c) {
                            return Err(format!(
                                "storm client {} is not waiting to say hello (phase {:?})",
                                m.fleet.clients[c].user_id, m.fleet.clients[c].phase
                            ));
                        }
                    }
                    Burst::Leave => m.fleet.hang_up(c),
                }
            }
            m.fleet.flush_dirty();
            st.burst_write_ms = started.elapsed().as_secs_f64() * 1000.0;
            burst_at = Some(started);
        }
        if let Some(b) = burst_at
            && done_at.is_none()
        {
            let complete = match burst {
                Burst::Login => n_acked == s_n && n_listed == s_n && n_ready == s_n,
                Burst::Leave => n_closed == s_n,
            } && n_saw == [s_n, s_n];
            if complete {
                done_at = Some(now);
                tell_probe(now);
                st.busy_meter = Some(meter.stop());
            } else if now > b + timeout {
                done_at = Some(now);
                tell_probe(now);
                st.busy_meter = Some(meter.stop());
                st.trouble.examples.push(format!(
                    "{} not complete {:.0} s after the burst: {n_acked} hellos acknowledged, \
                     {n_listed} lists, {n_ready} snapshots, {n_closed} connections closed of \
                     {s_n}; the watchers saw {} and {} of {s_n}",
                    match burst {
                        Burst::Login => "login storm",
                        Burst::Leave => "mass leave",
                    },
                    timeout.as_secs_f64(),
                    n_saw[0],
                    n_saw[1]
                ));
            }
        }
        // The probe's thread ends once it has its messages in flight back (or fails).
        if probe_thread.is_finished() {
            break;
        }
        let wait = if burst_at.is_none() {
            burst_due.saturating_duration_since(now)
        } else {
            Duration::from_millis(50)
        };
        m.fleet
            .turn(Some(wait.min(Duration::from_millis(50))))
            .map_err(|e| format!("poll: {e}"))?;
        for note in std::mem::take(&mut m.fleet.notes) {
            let from_burst = |at: Instant| burst_at.map(|b| since(at, b));
            match note {
                Note::Acked { client, at } if member(client) && burst == Burst::Login => {
                    let k = client - storm.start;
                    if !std::mem::replace(&mut acked[k], true)
                        && let Some(d) = from_burst(at)
                    {
                        n_acked += 1;
                        st.acked.record(d);
                        if n_acked == s_n {
                            st.all_acked_s = secs(Some(d));
                        }
                    }
                }
                Note::Listed { client, at } if member(client) && burst == Burst::Login => {
                    let k = client - storm.start;
                    if !std::mem::replace(&mut listed[k], true)
                        && let Some(d) = from_burst(at)
                    {
                        n_listed += 1;
                        st.listed.record(d);
                        if n_listed == s_n {
                            st.all_listed_s = secs(Some(d));
                        }
                    }
                }
                Note::Ready { client, at } if member(client) && burst == Burst::Login => {
                    let k = client - storm.start;
                    if !listed[k] {
                        st.trouble.examples.push(format!(
                            "{} got its snapshot before its LIST_RESPONSE",
                            m.fleet.clients[client].user_id
                        ));
                        *st.trouble.errors.entry("BENCH".into()).or_default() += 1;
                    }
                    if !std::mem::replace(&mut ready[k], true)
                        && let Some(d) = from_burst(at)
                    {
                        n_ready += 1;
                        st.ready.record(d);
                        if progress && n_ready % tenth == 0 {
                            eprintln!(
                                "  [storm] {n_ready}/{s_n} logged in after {:.1} s",
                                d.as_secs_f64()
                            );
                        }
                        if n_ready == s_n {
                            st.all_ready_s = secs(Some(d));
                        }
                    }
                }
                Note::Closed {
                    client,
                    expected: true,
                    ..
                } if member(client) && burst == Burst::Leave => {
                    let k = client - storm.start;
                    if !std::mem::replace(&mut closed[k], true) {
                        n_closed += 1;
                        let d = from_burst(Instant::now());
                        if progress
                            && n_closed % tenth == 0
                            && let Some(d) = d
                        {
                            eprintln!(
                                "  [storm] {n_closed}/{s_n} closed by the server after {:.1} s",
                                d.as_secs_f64()
                            );
                        }
                        if let Some(d) = d {
                            st.closed.record(d);
                        }
                        if n_closed == s_n {
                            st.all_closed_s = secs(d);
                        }
                    }
                }
                Note::Advertise {
                    client, user, at, ..
                } if burst == Burst::Login && member(user) && watchers.contains(&client) => {
                    let p = usize::from(client == watchers[1]);
                    if !std::mem::replace(&mut saw[p][user - storm.start], true) {
                        n_saw[p] += 1;
                        if n_saw == [s_n, s_n] {
                            st.probe_saw_all_s = secs(from_burst(at));
                        }
                    }
                }
                Note::Remove { client, user, at }
                    if burst == Burst::Leave && member(user) && watchers.contains(&client) =>
                {
                    let p = usize::from(client == watchers[1]);
                    if !std::mem::replace(&mut saw[p][user - storm.start], true) {
                        n_saw[p] += 1;
                        if n_saw == [s_n, s_n] {
                            st.probe_saw_all_s = secs(from_burst(at));
                        }
                    }
                }
                other => {
                    st.trouble.note(&m.fleet, &other);
                }
            }
        }
    }
    let (probe, sent, trouble) = probe_thread
        .join()
        .map_err(|_| "the probe's thread panicked".to_string())??;
    // A message belongs to the phase it was due in: before the burst was written, or after.
    let burst_at = burst_at.ok_or("the probe ended before the burst")?;
    for s in &sent {
        let phase = if s.due < burst_at {
            &mut st.idle
        } else {
            &mut st.busy
        };
        phase.sent += 1;
        phase.lag.record(s.lag);
        if let Some(l) = s.latency {
            phase.delivered += 1;
            phase.latency.record(l);
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            let due = if s.due < burst_at {
                -ms(burst_at - s.due)
            } else {
                ms(s.due - burst_at)
            };
            if phase.worst.is_none_or(|(_, worst)| ms(l) > worst) {
                phase.worst = Some((due, ms(l)));
            }
        }
    }
    for (code, n) in trouble.errors {
        *st.trouble.errors.entry(code).or_default() += n;
    }
    st.trouble.disconnects += trouble.disconnects;
    st.trouble.examples.extend(trouble.examples);
    let signing1 = m.fleet.signer.as_ref().map_or((0, 0.0), Signer::work);
    st.signing = (signing1.0 - signing0.0, signing1.1 - signing0.1);
    Ok((st, probe))
}

/// Ratio of a storm phase's probe p99 to the idle p99 (None when either is missing).
fn ratio(busy: &Lat, idle: &Lat) -> Option<f64> {
    let (b, i) = (busy.summary(), idle.summary());
    (b.count > 0 && i.count > 0 && i.p99 > 0.0).then(|| round3(b.p99 / i.p99))
}

fn opt_s(x: Option<f64>) -> String {
    x.map_or("NOT COMPLETE".into(), |s| format!("{s:.2} s"))
}

/// The target: each storm phase's probe p99 at most this many times the idle p99.
const TARGET_RATIO: f64 = 3.0;

pub fn run(m: &mut Mesh) -> Result<Outcome, String> {
    all_ready(&m.fleet, &m.steady)?;
    let s_n = m.opts.storm_users;
    let on_first: Vec<usize> = m
        .steady
        .iter()
        .copied()
        .filter(|&c| m.fleet.clients[c].server == 0)
        .collect();
    let [a, b, ..] = on_first[..] else {
        return Err(format!(
            "the storm's watchers are two steady clients on the first server; it has {} \
             (--clients must be at least 2 x --servers)",
            on_first.len()
        ));
    };
    run_with(m, [a, b], s_n)
}

fn run_with(m: &mut Mesh, watchers: [usize; 2], s_n: usize) -> Result<Outcome, String> {
    let prefix = m.opts.id_prefix.clone();
    let first = m.fleet.clients.len();
    for i in 0..s_n {
        let c = m.fleet.add_client(format!("{prefix}-s{i}"), 0, false);
        let client = &mut m.fleet.clients[c];
        client.raw_after_ready = true;
        client.hold_hello = true;
    }
    let storm = first..first + s_n;
    let timeout = m.timeout();

    // Connections and WebSocket handshakes, before any clock: 64 at a time.
    eprintln!("  [storm] opening {s_n} connections (hellos held back) ...");
    let opened = Instant::now();
    let mut trouble = Trouble::default();
    let mut next = first;
    loop {
        let connecting = storm
            .clone()
            .filter(|&c| {
                matches!(
                    m.fleet.clients[c].phase,
                    Phase::Connecting | Phase::Handshaking
                )
            })
            .count();
        let open = storm
            .clone()
            .filter(|&c| m.fleet.clients[c].phase == Phase::Open)
            .count();
        if open == s_n {
            break;
        }
        let mut budget = 64usize.saturating_sub(connecting);
        while budget > 0 && next < storm.end {
            m.fleet.connect(next)?;
            next += 1;
            budget -= 1;
        }
        if opened.elapsed() > timeout {
            return Err(format!(
                "only {open} of {s_n} storm connections open after {:.0} s (phases: {})",
                timeout.as_secs_f64(),
                m.fleet.phase_counts()
            ));
        }
        m.fleet
            .turn(Some(Duration::from_millis(20)))
            .map_err(|e| format!("poll: {e}"))?;
        for note in std::mem::take(&mut m.fleet.notes) {
            if trouble.note(&m.fleet, &note) {
                return Err(format!(
                    "while opening the storm's connections: {}",
                    trouble.examples.join("; ")
                ));
            }
        }
    }
    let connect_s = opened.elapsed().as_secs_f64();

    let probe = Probe::start(m, timeout)?;
    m.fleet.signer = Some(Signer::start(1, m.fleet.waker()));
    eprintln!(
        "  [storm] probe idle {} s, then {s_n} hellos at once ...",
        m.opts.probe_idle_s
    );
    let login = stage(m, probe, watchers, storm.clone(), Burst::Login);
    let (login, probe) = match login {
        Ok(s) => s,
        Err(e) => {
            m.fleet.signer = None;
            return Err(e);
        }
    };
    let (leave, probe) = if login.all_ready_s.is_some() {
        eprintln!(
            "  [storm] probe idle {} s, then {s_n} leave at once ...",
            m.opts.probe_idle_s
        );
        let leave = stage(m, probe, watchers, storm.clone(), Burst::Leave);
        m.fleet.signer = None;
        let (leave, probe) = leave?;
        (Some(leave), probe)
    } else {
        (None, probe)
    };
    m.fleet.signer = None;
    let verified = probe.samples.verify(&probe.fleet);

    let pu = |i: usize| probe.fleet.clients[probe.users[i]].user_id.clone();
    let wu = |i: usize| m.fleet.clients[watchers[i]].user_id.clone();
    let login_ratio = ratio(&login.busy.latency, &login.idle.latency);
    let leave_ratio = leave
        .as_ref()
        .and_then(|l| ratio(&l.busy.latency, &login.idle.latency));
    let leave_ratio_online = leave
        .as_ref()
        .and_then(|l| ratio(&l.busy.latency, &l.idle.latency));
    let lost = |s: &Stage| (s.idle.sent - s.idle.delivered) + (s.busy.sent - s.busy.delivered);
    let total_lost = lost(&login) + leave.as_ref().map_or(0, lost);
    let complete = login.all_ready_s.is_some()
        && login.probe_saw_all_s.is_some()
        && leave
            .as_ref()
            .is_some_and(|l| l.all_closed_s.is_some() && l.probe_saw_all_s.is_some());
    let clean = login.trouble.is_clean()
        && login.trouble.examples.is_empty()
        && leave
            .as_ref()
            .is_some_and(|l| l.trouble.is_clean() && l.trouble.examples.is_empty());
    let status = if complete && clean && total_lost == 0 && verified["problems"] == json!([]) {
        "ok"
    } else {
        "degraded"
    };

    let phase_line = |name: &str, p: &ProbePhase, meter: &Option<MeterReading>| {
        let s = p.latency.summary();
        format!(
            "probe, {name}: {} sent, {} delivered; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms \
             ({}; sender lag max {:.2} ms); {}",
            p.sent,
            p.delivered,
            s.p50,
            s.p99,
            s.max,
            p.worst.map_or("-".into(), |(due, _)| format!(
                "the slowest due {due:+.0} ms from the burst"
            )),
            p.lag.summary().max,
            meter
                .as_ref()
                .map_or("CPU not measured".into(), MeterReading::line)
        )
    };
    let ratio_text = |r: Option<f64>| match r {
        Some(r) => format!(
            "{r:.2} x idle ({})",
            if r <= TARGET_RATIO {
                "within the 3 x target"
            } else {
                "ABOVE the 3 x target"
            }
        ),
        None => "not measured".into(),
    };
    let mut lines = vec![
        format!(
            "probe: {} <-> {} on server 1 (own connections, own thread), {:.0} DMs/s \
             alternating directions; one-way latency from each scheduled send; watchers {} and \
             {} (steady users on server 1); {s_n} storm clients on server 1, connections opened \
             beforehand in {connect_s:.1} s",
            pu(0),
            pu(1),
            m.opts.probe_rate,
            wu(0),
            wu(1)
        ),
        phase_line("idle", &login.idle, &login.idle_meter),
        format!(
            "login storm: {s_n} hellos written in {:.1} ms; all USER_HELLO_ACKs after {}, all \
             LIST_RESPONSEs after {}, all snapshots after {}; the watchers saw every advert \
             after {}",
            login.burst_write_ms,
            opt_s(login.all_acked_s),
            opt_s(login.all_listed_s),
            opt_s(login.all_ready_s),
            opt_s(login.probe_saw_all_s)
        ),
        phase_line("login storm", &login.busy, &login.busy_meter),
        format!(
            "probe p99 during the login storm: {}",
            ratio_text(login_ratio)
        ),
        format!(
            "bench signing (1 thread apart from the loop): {} AUTH_RESPONSE signatures, {:.0} ms",
            login.signing.0, login.signing.1
        ),
    ];
    if let Some(l) = &leave {
        lines.extend([
            phase_line(
                &format!("idle, {s_n} storm users online"),
                &l.idle,
                &l.idle_meter,
            ),
            format!(
                "mass leave: {s_n} closes written in {:.1} ms; the watchers saw every \
                 USER_REMOVE after {}; the server closed every storm connection after {}",
                l.burst_write_ms,
                opt_s(l.probe_saw_all_s),
                opt_s(l.all_closed_s)
            ),
            phase_line("mass leave", &l.busy, &l.busy_meter),
            format!(
                "probe p99 during the mass leave: {} ({} x the idle p99 with the storm users \
                 online)",
                ratio_text(leave_ratio),
                leave_ratio_online.map_or("-".into(), |r| format!("{r:.2}"))
            ),
        ]);
    } else {
        lines.push("mass leave: NOT RUN (the login storm did not complete)".into());
    }
    lines.push(format!(
        "sampled probe messages fully verified: {}/{}",
        verified["ok"], verified["checked"]
    ));
    // The loop's worst delay in writing a probe message, over every phase.
    let lag_max = [Some(&login), leave.as_ref()]
        .into_iter()
        .flatten()
        .flat_map(|s| [&s.idle, &s.busy])
        .map(|p| p.lag.summary().max)
        .fold(0.0, f64::max);
    for (name, s) in [("login", Some(&login)), ("leave", leave.as_ref())] {
        if let Some(s) = s {
            lines.extend(s.trouble.line().map(|l| format!("{name}: {l}")));
            if s.trouble.is_clean() {
                lines.extend(s.trouble.examples.iter().map(|e| format!("{name}: {e}")));
            }
        }
    }

    let mut rows = vec![
        row("probe, idle", &login.idle.latency),
        row("probe, login storm", &login.busy.latency),
    ];
    if let Some(l) = &leave {
        rows.push(row("probe, idle, storm online", &l.idle.latency));
        rows.push(row("probe, mass leave", &l.busy.latency));
    }
    rows.push(row("storm hello ack (from burst)", &login.acked));
    rows.push(row("storm snapshot (from burst)", &login.ready));
    if let Some(l) = &leave {
        rows.push(row("storm closed (from burst)", &l.closed));
    }

    let json = json!({
        "status": status,
        "definition": "probe: one-way DM latency between two users on the first server with \
                       their own connections and event loop on a thread of the bench's own, \
                       from each message's scheduled send (j/R s, directions alternating) to the \
                       receiver's read of its USER_DELIVER, counted in the phase it was \
                       scheduled in; login storm: S clients, connected beforehand, write their \
                       USER_HELLO in one burst, times from the burst to each USER_HELLO_ACK, \
                       LIST_RESPONSE and PUBLIC_CHANNEL_SNAPSHOT and to both watchers (two \
                       steady users on the first server) having \
                       every USER_ADVERTISE; mass leave: all S write a close frame and shut \
                       their socket in one burst, times from the burst to both watchers \
                       having every USER_REMOVE and to the server closing every connection",
        "storm_users": s_n,
        "probe_users": [pu(0), pu(1)],
        "watchers": [wu(0), wu(1)],
        "probe_rate_per_s": m.opts.probe_rate,
        "connect_beforehand_s": round3(connect_s),
        "probe": {
            "idle": login.idle.json(&login.idle_meter),
            "login_storm": login.busy.json(&login.busy_meter),
            "idle_storm_online": leave.as_ref().map(|l| l.idle.json(&l.idle_meter)),
            "mass_leave": leave.as_ref().map(|l| l.busy.json(&l.busy_meter)),
            "p99_over_idle_login_storm": login_ratio,
            "p99_over_idle_mass_leave": leave_ratio,
            "p99_over_idle_storm_online_mass_leave": leave_ratio_online,
            "target_ratio": TARGET_RATIO,
            "sender_lag_max_ms": round3(lag_max),
            "precompute_s": round3(login.precompute_s + leave.as_ref().map_or(0.0, |l| l.precompute_s)),
        },
        "login": {
            "burst_write_ms": round3(login.burst_write_ms),
            "hellos_complete_s": login.all_acked_s,
            "lists_complete_s": login.all_listed_s,
            "snapshots_complete_s": login.all_ready_s,
            "probe_adverts_complete_s": login.probe_saw_all_s,
            "latency_ms": {
                "hello_ack": login.acked.json(),
                "list_response": login.listed.json(),
                "snapshot": login.ready.json(),
            },
            "bench_signing": {
                "threads": 1,
                "signatures": login.signing.0,
                "ms": round3(login.signing.1),
            },
            "trouble": login.trouble.json(),
        },
        "leave": leave.as_ref().map(|l| json!({
            "burst_write_ms": round3(l.burst_write_ms),
            "probe_removes_complete_s": l.probe_saw_all_s,
            "connections_closed_s": l.all_closed_s,
            "latency_ms": {"closed": l.closed.json()},
            "trouble": l.trouble.json(),
        })),
        "lost": total_lost,
        "verified_samples": verified,
    });
    Ok(Outcome {
        name: "storm",
        json,
        rows,
        lines,
    })
}
