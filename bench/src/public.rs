//! Scenario b, public-channel fan-out: one `/all` to the N-1 other members, K times, from a
//! different sender each time (client `k % N`, so every server takes a turn).
//!
//! As the real client does (PROTOCOL.md §8), the sender encrypts the text once per member
//! under that member's key, signs each copy's `content_sig`, and sends one
//! `MSG_PUBLIC_CHANNEL` per member; here each copy is sent as soon as it is produced. The
//! producing runs on a separate thread (the sender's "device") and hands each frame to the event
//! loop, which keeps reading everybody's sockets meanwhile.
//!
//! Measured per event, from the **scheduled** start of production: the first and the last
//! member's receipt, and the time the sender spent producing all copies. When the last receipt
//! is close to the production time, the sender is the bottleneck; when it is much later, the
//! servers are.

use crate::common::{
    Mesh, Meter, Outcome, Sample, SampleKind, Samples, Trouble, all_ready, row, since,
};
use crate::fleet::{MsgKey, Note, msg_key, wall_ms};
use crate::stats::{Lat, round3};
use mio::Waker;
use serde_json::json;
use socp::crypto::{PrivateKey, PublicKey};
use socp::wire::{self, SignedPayload, types};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

struct Job {
    event: usize,
    at: Instant,
    sender_id: String,
    key: Arc<PrivateKey>,
    /// (client index, user id, key)
    recipients: Vec<(usize, String, Arc<PublicKey>)>,
}

enum Produced {
    Copy {
        event: usize,
        recipient: usize,
        key: MsgKey,
        frame: String,
        plaintext: String,
    },
    Done {
        event: usize,
        started: Instant,
        finished: Instant,
    },
}

/// The sender's device: produces each job's copies at (or after) its scheduled time.
fn producer(jobs: Receiver<Job>, out: Sender<Produced>, waker: Arc<Waker>) {
    for job in jobs {
        if let Some(wait) = job.at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let started = Instant::now();
        let ts = wall_ms();
        let sender_pub = job.key.public_key().encoded().to_string();
        for (recipient, rid, pubkey) in job.recipients {
            let plaintext = format!("socp-bench /all event {} to {rid}", job.event);
            let Ok(ct) = pubkey.encrypt(plaintext.as_bytes()) else {
                continue; // counted as never delivered
            };
            let ciphertext = socp::wire::b64::encode(&ct);
            let content_sig =
                socp::crypto::make_content_sig(&job.key, &ct, &job.sender_id, None, ts);
            let payload = json!({
                "ciphertext": ciphertext,
                "sender_pub": sender_pub,
                "content_sig": content_sig,
            });
            let signed = SignedPayload::unsigned(&payload).expect("strings only");
            let frame =
                wire::encode_frame(types::MSG_PUBLIC_CHANNEL, &job.sender_id, &rid, ts, &signed);
            let key = msg_key(&ciphertext).expect("a 683-character ciphertext");
            let copy = Produced::Copy {
                event: job.event,
                recipient,
                key,
                frame,
                plaintext,
            };
            if out.send(copy).is_err() {
                return;
            }
            let _ = waker.wake();
        }
        let done = Produced::Done {
            event: job.event,
            started,
            finished: Instant::now(),
        };
        if out.send(done).is_err() {
            return;
        }
        let _ = waker.wake();
    }
}

#[derive(Default, Clone)]
struct Event {
    sender: usize,
    received: usize,
    first: Option<Instant>,
    last: Option<Instant>,
    done: Option<Instant>,
}

pub fn run(m: &mut Mesh) -> Result<Outcome, String> {
    all_ready(&m.fleet, &m.steady)?;
    let n = m.steady.len();
    let copies = n - 1;
    let k_total = m.opts.repeat;
    // Auto: the CPU work one /all causes, as if done on one core (per copy: the sender's
    // encryption and signature, and about two server signatures), plus 250 ms.
    let estimate_ms = copies as f64 * (m.encrypt_ms + 3.0 * m.sign_ms);
    let interval_ms = m
        .opts
        .public_interval_ms
        .unwrap_or((estimate_ms + 250.0).ceil() as u64);
    let interval = Duration::from_millis(interval_ms);
    let timeout = m.timeout();

    let (job_tx, job_rx) = mpsc::channel();
    let (out_tx, out_rx) = mpsc::channel();
    let waker = m.fleet.waker();
    let worker = std::thread::spawn(move || producer(job_rx, out_tx, waker));

    let t0 = Instant::now() + Duration::from_millis(300);
    let sched = |k: usize| t0 + interval * k as u32;
    let mut events = vec![Event::default(); k_total];
    for (k, event) in events.iter_mut().enumerate() {
        let sender = m.steady[k % n];
        event.sender = sender;
        let recipients = m
            .steady
            .iter()
            .filter(|&&c| c != sender)
            .map(|&c| {
                let client = &m.fleet.clients[c];
                (
                    c,
                    client.user_id.clone(),
                    Arc::clone(m.fleet.key_of(c).public_key()),
                )
            })
            .collect();
        let job = Job {
            event: k,
            at: sched(k),
            sender_id: m.fleet.clients[sender].user_id.clone(),
            key: Arc::clone(m.fleet.key_of(sender)),
            recipients,
        };
        job_tx.send(job).map_err(|_| "producer thread ended")?;
    }
    drop(job_tx);

    let meter = Meter::start(&m.pids);
    let (mut first, mut last, mut each, mut production, mut lag): (Lat, Lat, Lat, Lat, Lat) =
        Default::default();
    let mut expected: HashMap<MsgKey, (usize, usize, String)> = HashMap::new();
    let mut trouble = Trouble::default();
    let mut samples = Samples::new(8);
    let (mut deliveries, mut produced, mut send_failures) = (0u64, 0u64, 0u64);
    let mut last_rx: Option<Instant> = None;
    let mut done_events = 0usize;
    loop {
        let now = Instant::now();
        // Finished: every event produced, and each delivered fully or timed out.
        let finished = done_events == k_total
            && events
                .iter()
                .all(|e| e.received == copies || e.done.is_some_and(|d| now > d + timeout));
        if finished {
            break;
        }
        if now > sched(k_total) + timeout * 4 {
            return Err("public: the producer did not finish in time".into());
        }
        m.fleet
            .turn(Some(Duration::from_millis(20)))
            .map_err(|e| format!("poll: {e}"))?;
        while let Ok(p) = out_rx.try_recv() {
            match p {
                Produced::Copy {
                    event,
                    recipient,
                    key,
                    frame,
                    plaintext,
                } => {
                    produced += 1;
                    expected.insert(key, (event, recipient, plaintext));
                    if !m.fleet.send(events[event].sender, frame) {
                        send_failures += 1;
                    }
                }
                Produced::Done {
                    event,
                    started,
                    finished,
                } => {
                    done_events += 1;
                    events[event].done = Some(finished);
                    lag.record(since(started, sched(event)));
                    production.record(finished - started);
                }
            }
        }
        m.fleet.flush_dirty();
        for note in std::mem::take(&mut m.fleet.notes) {
            match note {
                Note::Message {
                    client,
                    key,
                    at,
                    text,
                } => {
                    let Some((k, recipient, plaintext)) = expected.remove(&key) else {
                        continue;
                    };
                    if recipient != client {
                        *trouble
                            .errors
                            .entry("BENCH_MISDELIVERED".into())
                            .or_default() += 1;
                        continue;
                    }
                    let e = &mut events[k];
                    e.received += 1;
                    e.first.get_or_insert(at);
                    e.last = Some(at);
                    deliveries += 1;
                    last_rx = Some(at);
                    each.record(since(at, sched(k)));
                    if e.received == 1 || e.received == copies {
                        samples.push(Sample {
                            recipient,
                            text,
                            what: SampleKind::Message {
                                sender: e.sender,
                                public: true,
                                plaintext,
                            },
                        });
                    }
                }
                other => {
                    trouble.note(&m.fleet, &other);
                }
            }
        }
    }
    let _ = worker.join();
    let reading = meter.stop();
    for (k, e) in events.iter().enumerate() {
        if let (Some(f), Some(l)) = (e.first, e.last) {
            first.record(since(f, sched(k)));
            last.record(since(l, sched(k)));
        }
    }
    let lost = (k_total * copies) as u64 - deliveries;
    let active_s = last_rx.map_or(0.0, |t| since(t, t0).as_secs_f64());
    let per_s = if active_s > 0.0 {
        deliveries as f64 / active_s
    } else {
        0.0
    };
    let verified = samples.verify(&m.fleet);
    let (ls, ps, lg) = (last.summary(), production.summary(), lag.summary());
    let ratio = if ps.p50 > 0.0 { ls.p50 / ps.p50 } else { 0.0 };
    let mut lines = vec![
        format!(
            "{k_total} x /all to {copies} members, every {interval_ms} ms{}; {deliveries} copies \
             received ({per_s:.0}/s over {active_s:.1} s), {lost} lost",
            if m.opts.public_interval_ms.is_none() {
                " (auto)"
            } else {
                ""
            }
        ),
        format!(
            "last receipt p50 {:.1} ms vs production p50 {:.1} ms: {ratio:.2}x \
             (sender start lag p50 {:.2} ms, max {:.2} ms)",
            ls.p50, ps.p50, lg.p50, lg.max
        ),
        reading.line(),
        format!(
            "sampled frames fully verified: {}/{}",
            verified["ok"], verified["checked"]
        ),
    ];
    if send_failures > 0 {
        lines.push(format!(
            "{send_failures} copies could not be sent (sender offline)"
        ));
    }
    lines.extend(trouble.line());
    let json = json!({
        "status": if lost == 0 && trouble.is_clean() { "ok" } else { "degraded" },
        "events": k_total,
        "members": copies,
        "interval_ms": interval_ms,
        "interval_auto": m.opts.public_interval_ms.is_none(),
        "definition": "from the scheduled start of production of one /all (encrypt + sign one \
                       MSG_PUBLIC_CHANNEL per member, each sent as produced) until the first \
                       and the last member reads its copy; production = time the sender spent \
                       producing all copies",
        "latency_ms": {
            "first": first.json(),
            "last": last.json(),
            "each": each.json(),
            "production": production.json(),
        },
        "last_over_production_p50": round3(ratio),
        "sender_lag_ms": lag.json(),
        "produced": produced,
        "deliveries": deliveries,
        "lost": lost,
        "deliveries_per_s": round3(per_s),
        "cpu": reading.json(),
        "trouble": trouble.json(),
        "verified_samples": verified,
    });
    Ok(Outcome {
        name: "public",
        json,
        rows: vec![
            row("first member receives", &first),
            row("last member receives", &last),
            row("every member", &each),
            row("sender production time", &production),
        ],
        lines,
    })
}
