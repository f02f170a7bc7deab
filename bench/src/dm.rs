//! Scenario c, direct messages: cross-server DMs (sender and receiver on different servers) at
//! a fixed rate R for D seconds, and optionally a ramp that raises R step by step.
//!
//! Message `j` is scheduled at `j / R` seconds after the start. Every message is encrypted and
//! signed **before** the window opens (on all CPUs), so that during the window the event loop
//! only writes frames: the load generator stays cheap and on time. Latency counts from each
//! message's scheduled time, so a server that stalls cannot hide it by slowing the sender; if the
//! loop itself sends late, that is reported as sender lag.

use crate::common::{
    Mesh, Meter, MeterReading, Outcome, Pacer, Sample, SampleKind, Samples, Trouble, all_ready,
    since,
};
use crate::fleet::{Fleet, MsgKey, Note, msg_key, wall_ms};
use crate::stats::{Lat, Summary, round3};
use serde_json::{Value, json};
use socp::crypto::PrivateKey;
use socp::wire::{self, SignedPayload, types};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::Utf8Bytes;

/// A ready-to-send message.
pub struct Pre {
    /// When it is due, from the start of its window.
    pub offset: Duration,
    pub sender: usize,
    pub receiver: usize,
    pub frame: String,
    pub key: MsgKey,
    pub plaintext: String,
}

impl Pre {
    /// This message as `recipient` read it, to check completely once the clock has stopped.
    pub fn sample(&self, recipient: usize, text: Utf8Bytes) -> Sample {
        Sample {
            recipient,
            text,
            what: SampleKind::Message {
                sender: self.sender,
                public: false,
                plaintext: self.plaintext.clone(),
            },
        }
    }
}

/// For each steady client, a receiver on another server (the next such client), if any.
fn pairs(fleet: &Fleet, steady: &[usize]) -> (Vec<(usize, usize)>, bool) {
    let n = steady.len();
    let mut cross = true;
    let pairs = (0..n)
        .map(|i| {
            let s = steady[i];
            let other = (1..n)
                .map(|d| steady[(i + d) % n])
                .find(|&r| fleet.clients[r].server != fleet.clients[s].server);
            match other {
                Some(r) => (s, r),
                None => {
                    cross = false;
                    (s, steady[(i + 1) % n])
                }
            }
        })
        .collect();
    (pairs, cross)
}

/// Encrypts and signs `count` messages at `rate` per second, on every CPU; message `j` goes
/// from `pairs[j % pairs.len()].0` to `.1`.
pub fn precompute(
    fleet: &Fleet,
    pairs: &[(usize, usize)],
    count: usize,
    rate: f64,
    tag: &str,
) -> Vec<Pre> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = count.div_ceil(threads).max(1);
    let ts = wall_ms();
    // What the threads need of each client: its id and key.
    let users: Vec<(String, Arc<PrivateKey>)> = (0..fleet.clients.len())
        .map(|c| {
            (
                fleet.clients[c].user_id.clone(),
                Arc::clone(fleet.key_of(c)),
            )
        })
        .collect();
    let build = |j: usize| -> Pre {
        let (sender, receiver) = pairs[j % pairs.len()];
        let ((sid, skey), (rid, rkey)) = (&users[sender], &users[receiver]);
        let plaintext = format!("socp-bench dm {tag} #{j}");
        let ct = rkey
            .public_key()
            .encrypt(plaintext.as_bytes())
            .expect("OAEP encryption of a short text");
        let ciphertext = socp::wire::b64::encode(&ct);
        let content_sig = socp::crypto::make_content_sig(skey, &ct, sid, Some(rid), ts);
        let payload = json!({
            "ciphertext": ciphertext,
            "sender_pub": skey.public_key().encoded(),
            "content_sig": content_sig,
        });
        let signed = SignedPayload::unsigned(&payload).expect("strings only");
        Pre {
            offset: Duration::from_secs_f64(j as f64 / rate),
            sender,
            receiver,
            frame: wire::encode_frame(types::MSG_DIRECT, sid, rid, ts, &signed),
            key: msg_key(&ciphertext).expect("a 683-character ciphertext"),
            plaintext,
        }
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .step_by(chunk)
            .map(|start| {
                let build = &build;
                scope.spawn(move || {
                    (start..(start + chunk).min(count))
                        .map(build)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("precompute thread"))
            .collect()
    })
}

/// One fixed-rate window.
struct Window {
    rate: f64,
    sent: u64,
    delivered: u64,
    lost: u64,
    latency: Lat,
    /// Delivery latency of the messages scheduled in the first and in the second half of the
    /// window: a queue that grows without bound shows as a second half much slower than the
    /// first, however high or low the latency itself is.
    halves: [Lat; 2],
    lag: Lat,
    active_s: f64,
    precompute_s: f64,
    meter: MeterReading,
    trouble: Trouble,
    samples: Value,
}

impl Window {
    /// Median latency of the second half over the first (1 when steady).
    fn growth(&self) -> f64 {
        let (a, b) = (self.halves[0].summary().p50, self.halves[1].summary().p50);
        if a > 0.0 { b / a } else { 0.0 }
    }

    fn json(&self) -> Value {
        json!({
            "rate_per_s": round3(self.rate),
            "sent": self.sent,
            "delivered": self.delivered,
            "lost": self.lost,
            "latency_ms": {
                "delivery": self.latency.json(),
                "first_half": self.halves[0].json(),
                "second_half": self.halves[1].json(),
            },
            "growth": round3(self.growth()),
            "sender_lag_ms": self.lag.json(),
            "delivered_per_s": round3(self.delivered as f64 / self.active_s.max(1e-9)),
            "active_s": round3(self.active_s),
            "precompute_s": round3(self.precompute_s),
            "cpu": self.meter.json(),
            "trouble": self.trouble.json(),
            "verified_samples": self.samples,
        })
    }
}

fn window(m: &mut Mesh, pairs: &[(usize, usize)], rate: f64, secs: f64, tag: &str) -> Window {
    let count = ((rate * secs).round() as usize).max(1);
    let pre_started = Instant::now();
    let mut msgs = precompute(&m.fleet, pairs, count, rate, tag);
    let precompute_s = pre_started.elapsed().as_secs_f64();
    let index: HashMap<MsgKey, usize> = msgs.iter().enumerate().map(|(i, p)| (p.key, i)).collect();
    let mut delivered = vec![false; msgs.len()];
    let (mut latency, mut lag) = (Lat::default(), Lat::default());
    let mut halves: [Lat; 2] = Default::default();
    let half_point = msgs.last().map_or(Duration::ZERO, |p| p.offset) / 2;
    let mut trouble = Trouble::default();
    let mut samples = Samples::new(8);
    let (mut sent, mut got) = (0u64, 0u64);
    let mut last_rx: Option<Instant> = None;
    let timeout = m.timeout();
    let meter = Meter::start(&m.pids);
    let t0 = Instant::now() + Duration::from_millis(100);
    let last_sched = t0 + msgs.last().map_or(Duration::ZERO, |p| p.offset);
    let mut next = 0usize;
    let _pacer = Pacer::start(
        m.fleet.waker(),
        msgs.iter().map(|p| t0 + p.offset).collect(),
    );
    loop {
        let now = Instant::now();
        let mut wrote = false;
        while next < msgs.len() && t0 + msgs[next].offset <= now {
            let frame = std::mem::take(&mut msgs[next].frame);
            if m.fleet.send(msgs[next].sender, frame) {
                sent += 1;
            }
            lag.record(since(now, t0 + msgs[next].offset));
            next += 1;
            wrote = true;
        }
        if wrote {
            m.fleet.flush_dirty();
        }
        if next == msgs.len() && (got == sent || now > last_sched + timeout) {
            break;
        }
        let wait = if next < msgs.len() {
            (t0 + msgs[next].offset).saturating_duration_since(now)
        } else {
            Duration::from_millis(50)
        };
        if let Err(e) = m.fleet.turn(Some(wait.min(Duration::from_millis(50)))) {
            trouble.examples.push(format!("poll: {e}"));
            break;
        }
        for note in std::mem::take(&mut m.fleet.notes) {
            match note {
                Note::Message {
                    client,
                    key,
                    at,
                    text,
                } => {
                    let Some(&i) = index.get(&key) else { continue };
                    if delivered[i] || msgs[i].receiver != client {
                        continue;
                    }
                    delivered[i] = true;
                    got += 1;
                    last_rx = Some(at);
                    let took = since(at, t0 + msgs[i].offset);
                    latency.record(took);
                    halves[usize::from(msgs[i].offset > half_point)].record(took);
                    if i % (msgs.len() / 8).max(1) == 0 {
                        samples.push(msgs[i].sample(client, text));
                    }
                }
                other => {
                    trouble.note(&m.fleet, &other);
                }
            }
        }
    }
    Window {
        rate,
        sent,
        delivered: got,
        lost: msgs.len() as u64 - got,
        latency,
        halves,
        lag,
        active_s: last_rx.map_or(0.0, |t| since(t, t0).as_secs_f64()),
        precompute_s,
        meter: meter.stop(),
        trouble,
        samples: samples.verify(&m.fleet),
    }
}

pub fn run(m: &mut Mesh) -> Result<Outcome, String> {
    all_ready(&m.fleet, &m.steady)?;
    let (pairs, cross) = pairs(&m.fleet, &m.steady);
    let w = window(m, &pairs, m.opts.rate, m.opts.duration_s, "fixed");
    let s = w.latency.summary();
    let lg = w.lag.summary();
    let mut lines = vec![
        format!(
            "{} DMs at {:.0}/s for {:.0} s{}: {} delivered ({:.0}/s), {} lost; encrypted and \
             signed beforehand in {:.1} s",
            w.sent,
            w.rate,
            m.opts.duration_s,
            if cross {
                ", sender and receiver on different servers"
            } else {
                ", SAME server (only one server)"
            },
            w.delivered,
            w.delivered as f64 / w.active_s.max(1e-9),
            w.lost,
            w.precompute_s
        ),
        format!(
            "p50 {:.2} ms; the crypto on its path (2 signatures + 1 verification) costs {:.2} ms \
             on an idle machine, {:.2} ms with every CPU signing: {:+.2} / {:+.2} ms beyond it \
             (target: under 1 ms)",
            s.p50,
            m.dm_floor_ms[0],
            m.dm_floor_ms[1],
            s.p50 - m.dm_floor_ms[0],
            s.p50 - m.dm_floor_ms[1],
        ),
        format!(
            "sender lag behind schedule: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            lg.p50, lg.p99, lg.max
        ),
        w.meter.line(),
        format!(
            "sampled frames fully verified: {}/{}",
            w.samples["ok"], w.samples["checked"]
        ),
    ];
    lines.extend(w.trouble.line());
    let mut rows = vec![("delivery".to_string(), s)];
    let mut json = w.json();
    json["status"] = json!(if w.lost == 0 && w.trouble.is_clean() {
        "ok"
    } else {
        "degraded"
    });
    json["cross_server"] = json!(cross);
    json["crypto_floor_ms"] = json!({
        "idle_machine": round3(m.dm_floor_ms[0]),
        "all_cpus_signing": round3(m.dm_floor_ms[1]),
    });
    json["p50_above_floor_ms"] = json!({
        "idle_machine": round3(s.p50 - m.dm_floor_ms[0]),
        "all_cpus_signing": round3(s.p50 - m.dm_floor_ms[1]),
    });
    json["duration_s"] = json!(m.opts.duration_s);
    json["definition"] = json!(
        "from each message's scheduled send time (message j at j/R s) until the receiver \
         reads its USER_DELIVER; messages are precomputed, the window only sends"
    );
    json["ramp"] = Value::Null;
    if m.opts.find_max_rate {
        let mut tr = Trouble::default();
        m.quiesce(Duration::from_secs(1), &mut tr)?;
        let (ramp, ramp_rows, ramp_lines) = ramp(m, &pairs)?;
        json["ramp"] = ramp;
        rows.extend(ramp_rows);
        lines.extend(ramp_lines);
    }
    Ok(Outcome {
        name: "dm",
        json,
        rows,
        lines,
    })
}

/// Table rows: (metric, latency summary).
type Rows = Vec<(String, Summary)>;

/// A step's latency is growing without bound when its second half's median is more than this
/// many times its first half's.
const MAX_GROWTH: f64 = 2.0;

/// `--find-max-rate`: steps at R, R*F, ... while the rate is *sustained*: nothing lost, no
/// errors, the sender never more than `--max-lag-ms` behind, and latency not growing within
/// the step (second half's median at most [`MAX_GROWTH`] x the first half's). Reported too: the
/// highest rate up to which every step also kept its p99 within 2x the first step's p99.
fn ramp(m: &mut Mesh, pairs: &[(usize, usize)]) -> Result<(Value, Rows, Vec<String>), String> {
    let mut steps = Vec::new();
    let mut rows = Vec::new();
    let mut lines = Vec::new();
    let mut base_p99: Option<f64> = None;
    let mut best: Option<f64> = None;
    let mut best_p99: Option<f64> = None;
    let mut p99_held = true;
    let mut stop_reason = format!("all {} steps passed", m.opts.max_steps);
    for step in 0..m.opts.max_steps {
        let rate = m.opts.rate * m.opts.ramp_factor.powi(step as i32);
        eprintln!(
            "  [dm ramp] step {step}: {rate:.0}/s for {} s",
            m.opts.step_duration_s
        );
        let w = window(
            m,
            pairs,
            rate,
            m.opts.step_duration_s,
            &format!("ramp{step}"),
        );
        let s = w.latency.summary();
        let lag_max = w.lag.summary().max;
        let growth = w.growth();
        let base = *base_p99.get_or_insert(s.p99);
        let mut why = Vec::new();
        if w.lost > 0 {
            why.push(format!("{} lost", w.lost));
        }
        if !w.trouble.is_clean() {
            why.push("errors or disconnects".to_string());
        }
        if lag_max > m.opts.max_lag_ms {
            why.push(format!(
                "sender lag {lag_max:.1} ms > {} ms",
                m.opts.max_lag_ms
            ));
        }
        if growth > MAX_GROWTH {
            why.push(format!(
                "latency growing: second half's median {growth:.1} x the first half's"
            ));
        }
        let pass = why.is_empty();
        let p99_ok = s.p99 <= 2.0 * base;
        p99_held &= pass && p99_ok;
        if p99_held {
            best_p99 = Some(rate);
        }
        rows.push((format!("ramp {rate:.0}/s delivery"), s));
        lines.push(format!(
            "ramp step {step}: {rate:.0}/s -> p50 {:.1} ms, p99 {:.1} ms ({:.1} x first step's), \
             growth {growth:.2}, lag max {lag_max:.1} ms, {} lost: {}; {}",
            s.p50,
            s.p99,
            s.p99 / base.max(1e-9),
            w.lost,
            if pass { "SUSTAINED" } else { "FAIL" },
            w.meter.line()
        ));
        let mut j = w.json();
        j["step"] = json!(step);
        j["pass"] = json!(pass);
        j["p99_within_2x_first"] = json!(p99_ok);
        j["fail_reasons"] = json!(why);
        steps.push(j);
        if pass {
            best = Some(rate);
        } else {
            stop_reason = format!("step {step} ({rate:.0}/s) failed: {}", why.join(", "));
            break;
        }
        let mut tr = Trouble::default();
        m.quiesce(Duration::from_secs(1), &mut tr)?;
    }
    lines.push(match best {
        Some(r) => format!("highest sustained rate: {r:.0}/s ({stop_reason})"),
        None => format!("no step passed ({stop_reason})"),
    });
    lines.push(match best_p99 {
        Some(r) => {
            format!("highest rate with every step's p99 within 2 x the first step's: {r:.0}/s")
        }
        None => "no step kept its p99 within 2 x the first step's".to_string(),
    });
    let json = json!({
        "rule": "a step is sustained when every message is delivered, no errors, sender lag <= \
                 max_lag_ms, and the second half's median latency <= 2 x the first half's",
        "max_rate_per_s": best.map(round3),
        "max_rate_p99_within_2x_first_per_s": best_p99.map(round3),
        "stop_reason": stop_reason,
        "steps": steps,
    });
    Ok((json, rows, lines))
}
