//! What every scenario shares: logging clients in, waiting for the directories to converge,
//! CPU meters, counting errors, the result of a scenario, and checking a sample of received
//! frames completely (server signature, decryption, `content_sig`) after the clock stops.

use crate::fleet::{Fleet, Note, Phase};
use crate::opts::Opts;
use crate::stats::{self, Lat, Summary, round3};
use serde_json::{Value, json};
use socp::crypto;
use socp::wire::{self, Envelope};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tungstenite::Utf8Bytes;

/// The mesh and its steady clients, shared by the presence, public and dm scenarios.
pub struct Mesh<'a> {
    pub opts: &'a Opts,
    pub fleet: Fleet,
    /// Server pids for `/proc` figures (empty when unknown).
    pub pids: Vec<u32>,
    /// Client indices of the N steady clients.
    pub steady: Vec<usize>,
    /// Measured cost of one PSS signature and one OAEP encryption, in ms (crypto floor).
    pub sign_ms: f64,
    pub encrypt_ms: f64,
    /// 2 signatures + 1 verification (p50s), in ms: the crypto on a cross-server DM's path,
    /// with signatures timed on an idle machine and with every CPU signing at once.
    pub dm_floor_ms: [f64; 2],
}

impl Mesh<'_> {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.opts.timeout_s)
    }

    /// Runs the loop for `d`, counting anything unexpected (used between scenarios so that one
    /// scenario's stragglers do not land in the next).
    pub fn quiesce(&mut self, d: Duration, trouble: &mut Trouble) -> Result<(), String> {
        let until = Instant::now() + d;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            self.fleet
                .turn(Some(left.min(Duration::from_millis(50))))
                .map_err(|e| format!("poll: {e}"))?;
            for note in std::mem::take(&mut self.fleet.notes) {
                trouble.note(&self.fleet, &note);
            }
        }
        Ok(())
    }
}

/// One scenario's outcome: JSON for the file, rows and lines for the table.
pub struct Outcome {
    pub name: &'static str,
    pub json: Value,
    pub rows: Vec<(String, Summary)>,
    pub lines: Vec<String>,
}

/// CPU time of the servers and of the bench between [`Meter::start`] and [`Meter::stop`].
pub struct Meter {
    pids: Vec<u32>,
    cpu0: Vec<Option<f64>>,
    bench0: Option<f64>,
    t0: Instant,
}

pub struct MeterReading {
    pub wall_s: f64,
    pub server_cpu_ms: Vec<Option<f64>>,
    pub bench_cpu_ms: Option<f64>,
}

impl Meter {
    pub fn start(pids: &[u32]) -> Meter {
        Meter {
            pids: pids.to_vec(),
            cpu0: stats::cpu_all(pids),
            bench0: stats::cpu_ms(0),
            t0: Instant::now(),
        }
    }

    pub fn stop(&self) -> MeterReading {
        let cpu1 = stats::cpu_all(&self.pids);
        MeterReading {
            wall_s: self.t0.elapsed().as_secs_f64(),
            server_cpu_ms: self
                .cpu0
                .iter()
                .zip(&cpu1)
                .map(|(a, b)| a.zip(*b).map(|(a, b)| b - a))
                .collect(),
            bench_cpu_ms: stats::cpu_ms(0).zip(self.bench0).map(|(b, a)| b - a),
        }
    }
}

impl MeterReading {
    pub fn json(&self) -> Value {
        let total: Option<f64> = if self.server_cpu_ms.is_empty() {
            None
        } else {
            self.server_cpu_ms.iter().copied().sum()
        };
        json!({
            "wall_s": round3(self.wall_s),
            "server_cpu_ms": self.server_cpu_ms.iter().map(|c| c.map(round3)).collect::<Vec<_>>(),
            "server_cpu_ms_total": total.map(round3),
            "bench_cpu_ms": self.bench_cpu_ms.map(round3),
        })
    }

    /// `servers CPU 123+98+101 ms (2.1 s wall), bench CPU 456 ms`.
    pub fn line(&self) -> String {
        let servers = if self.server_cpu_ms.is_empty() {
            "servers CPU not measured (no pids)".to_string()
        } else {
            let parts: Vec<String> = self
                .server_cpu_ms
                .iter()
                .map(|c| c.map_or("?".into(), |c| format!("{c:.0}")))
                .collect();
            format!("servers CPU {} ms", parts.join("+"))
        };
        let bench = self.bench_cpu_ms.map_or("?".into(), |c| format!("{c:.0}"));
        format!(
            "{servers}, bench CPU {bench} ms, over {:.2} s wall",
            self.wall_s
        )
    }
}

/// Errors and lost connections seen during a scenario.
#[derive(Default)]
pub struct Trouble {
    pub errors: BTreeMap<String, u64>,
    pub disconnects: u64,
    pub examples: Vec<String>,
}

impl Trouble {
    /// Counts `note` if it is an error or an unexpected close; returns whether it was one.
    pub fn note(&mut self, fleet: &Fleet, note: &Note) -> bool {
        match note {
            Note::Error {
                client,
                code,
                detail,
            } => {
                *self.errors.entry(code.clone()).or_default() += 1;
                self.example(format!(
                    "{} got ERROR {code}: {detail}",
                    fleet.clients[*client].user_id
                ));
                true
            }
            Note::Closed {
                client,
                expected: false,
                why,
            } => {
                self.disconnects += 1;
                self.example(format!(
                    "{} disconnected: {why}",
                    fleet.clients[*client].user_id
                ));
                true
            }
            _ => false,
        }
    }

    fn example(&mut self, s: String) {
        if self.examples.len() < 5 {
            self.examples.push(s);
        }
    }

    pub fn is_clean(&self) -> bool {
        self.errors.is_empty() && self.disconnects == 0
    }

    pub fn json(&self) -> Value {
        json!({"errors": self.errors, "disconnects": self.disconnects, "examples": self.examples})
    }

    pub fn line(&self) -> Option<String> {
        if self.is_clean() {
            return None;
        }
        let errs: Vec<String> = self
            .errors
            .iter()
            .map(|(c, n)| format!("{c} x{n}"))
            .collect();
        Some(format!(
            "PROBLEMS: errors [{}], unexpected disconnects {}; e.g. {}",
            errs.join(", "),
            self.disconnects,
            self.examples.join("; ")
        ))
    }
}

/// When each tenth of a login batch was ready.
pub struct LoginStats {
    pub n: usize,
    pub seconds: f64,
    /// (clients ready, seconds since the first connect)
    pub marks: Vec<(usize, f64)>,
    pub meter: MeterReading,
}

impl LoginStats {
    pub fn json(&self) -> Value {
        let mut prev = (0usize, 0.0f64);
        let marks: Vec<Value> = self
            .marks
            .iter()
            .map(|&(n, t)| {
                let per = if n > prev.0 {
                    (t - prev.1) * 1000.0 / (n - prev.0) as f64
                } else {
                    0.0
                };
                prev = (n, t);
                json!({"ready": n, "at_s": round3(t), "ms_per_login_since_previous": round3(per)})
            })
            .collect();
        json!({
            "clients": self.n,
            "seconds": round3(self.seconds),
            "logins_per_s": round3(self.n as f64 / self.seconds.max(1e-9)),
            "progress": marks,
            "cpu": self.meter.json(),
        })
    }

    /// `ms per login` at the first and the last tenth: shows whether a login costs more when
    /// more users are online.
    pub fn slope_line(&self) -> String {
        let per = |i: usize| -> Option<f64> {
            let (n1, t1) = *self.marks.get(i)?;
            let (n0, t0) = if i == 0 { (0, 0.0) } else { self.marks[i - 1] };
            (n1 > n0).then(|| (t1 - t0) * 1000.0 / (n1 - n0) as f64)
        };
        match (per(0), per(self.marks.len().saturating_sub(1))) {
            (Some(a), Some(b)) if self.marks.len() > 1 => format!(
                "{} logins in {:.1} s ({:.0}/s); {:.2} ms per login for the first tenth, \
                 {:.2} ms for the last",
                self.n,
                self.seconds,
                self.n as f64 / self.seconds.max(1e-9),
                a,
                b
            ),
            _ => format!("{} logins in {:.1} s", self.n, self.seconds),
        }
    }
}

/// Logs in `who` with at most `window` logins in flight; fails on any error or lost
/// connection, after `timeout`, or when `guard` (called about twice a second with the number of
/// clients ready) returns an error.
pub fn login_all(
    fleet: &mut Fleet,
    pids: &[u32],
    who: &[usize],
    window: usize,
    timeout: Duration,
    label: &str,
    guard: &mut dyn FnMut(usize) -> Result<(), String>,
) -> Result<LoginStats, String> {
    let meter = Meter::start(pids);
    let started = Instant::now();
    let deadline = started + timeout;
    let mut member = vec![false; fleet.clients.len()];
    for &c in who {
        member[c] = true;
    }
    let (mut next, mut ready) = (0usize, 0usize);
    let tenth = who.len().div_ceil(10).max(1);
    let mut marks = Vec::new();
    let progress = who.len() >= 2000;
    let mut next_guard = Instant::now();
    while ready < who.len() {
        if Instant::now() >= next_guard {
            guard(ready)?;
            next_guard = Instant::now() + Duration::from_millis(500);
        }
        while next < who.len() && fleet.logging_in < window {
            fleet.connect(who[next])?;
            next += 1;
        }
        fleet
            .turn(Some(Duration::from_millis(50)))
            .map_err(|e| format!("poll: {e}"))?;
        for note in std::mem::take(&mut fleet.notes) {
            match note {
                Note::Ready { client, .. } if member[client] => {
                    ready += 1;
                    if ready % tenth == 0 || ready == who.len() {
                        let t = started.elapsed().as_secs_f64();
                        marks.push((ready, t));
                        if progress {
                            eprintln!("  [{label}] {ready}/{} logged in after {t:.1} s", who.len());
                        }
                    }
                }
                Note::Error {
                    client,
                    code,
                    detail,
                } => {
                    return Err(format!(
                        "{label}: {} got ERROR {code}: {detail}",
                        fleet.clients[client].user_id
                    ));
                }
                Note::Closed {
                    client,
                    expected: false,
                    why,
                } => {
                    return Err(format!(
                        "{label}: {} lost its connection while logging in ({ready} of {} \
                         ready): {why}",
                        fleet.clients[client].user_id,
                        who.len()
                    ));
                }
                _ => {}
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{label}: only {ready} of {} clients logged in within {:.0} s (phases: {})",
                who.len(),
                timeout.as_secs_f64(),
                fleet.phase_counts()
            ));
        }
    }
    Ok(LoginStats {
        n: who.len(),
        seconds: started.elapsed().as_secs_f64(),
        marks,
        meter: meter.stop(),
    })
}

/// Waits until every steady client has every steady client in its directory: then every
/// server routes to every user (PROTOCOL.md §7).
pub fn wait_converged(
    fleet: &mut Fleet,
    steady: &[usize],
    timeout: Duration,
) -> Result<f64, String> {
    let started = Instant::now();
    loop {
        let counted = steady
            .iter()
            .all(|&c| fleet.clients[c].known_count >= steady.len());
        if counted
            && steady
                .iter()
                .all(|&c| steady.iter().all(|&u| fleet.knows(c, u)))
        {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > timeout {
            let missing: usize = steady
                .iter()
                .map(|&c| steady.iter().filter(|&&u| !fleet.knows(c, u)).count())
                .sum();
            return Err(format!(
                "directories did not converge within {:.0} s: {missing} (client, user) pairs \
                 missing",
                timeout.as_secs_f64()
            ));
        }
        fleet
            .turn(Some(Duration::from_millis(50)))
            .map_err(|e| format!("poll: {e}"))?;
        for note in std::mem::take(&mut fleet.notes) {
            if let Note::Closed {
                client,
                expected: false,
                why,
            } = note
            {
                return Err(format!(
                    "{} lost its connection: {why}",
                    fleet.clients[client].user_id
                ));
            }
        }
    }
}

/// A received frame to check completely once the clock has stopped.
pub struct Sample {
    pub recipient: usize,
    pub text: Utf8Bytes,
    pub what: SampleKind,
}

pub enum SampleKind {
    /// A `USER_ADVERTISE` for this user id.
    Advertise { user_id: String },
    /// A message from `sender` that must decrypt to `plaintext`.
    Message {
        sender: usize,
        public: bool,
        plaintext: String,
    },
}

/// Up to `cap` samples.
pub struct Samples {
    pub cap: usize,
    pub items: Vec<Sample>,
}

impl Samples {
    pub fn new(cap: usize) -> Samples {
        Samples {
            cap,
            items: Vec::new(),
        }
    }

    pub fn wants(&self) -> bool {
        self.items.len() < self.cap
    }

    pub fn push(&mut self, s: Sample) {
        if self.wants() {
            self.items.push(s);
        }
    }

    /// Checks every sample: the server's `sig` with the key its `AUTH_CHALLENGE` carried; for
    /// messages also decryption with the recipient's key and `content_sig` with the sender's.
    pub fn verify(&self, fleet: &Fleet) -> Value {
        let mut problems = Vec::new();
        let mut ok = 0;
        for s in &self.items {
            match check(fleet, s) {
                Ok(()) => ok += 1,
                Err(e) => problems.push(format!("{}: {e}", fleet.clients[s.recipient].user_id)),
            }
        }
        json!({"checked": self.items.len(), "ok": ok, "problems": problems})
    }
}

fn check(fleet: &Fleet, s: &Sample) -> Result<(), String> {
    let env = Envelope::parse(&s.text).map_err(|e| e.to_string())?;
    let rc = &fleet.clients[s.recipient];
    // The recipient's server, or (§5.6, --peer-sig) the server whose frame it forwarded.
    let server_key = fleet
        .servers
        .iter()
        .find(|end| end.server_id.as_deref() == Some(env.from.as_str()))
        .unwrap_or(&fleet.servers[rc.server])
        .key
        .as_ref()
        .ok_or("server key unknown")?;
    if !matches!(
        wire::verify_payload_sig(server_key, &env.payload, &env.sig),
        Ok(true)
    ) {
        return Err(format!("{}: server signature does not verify", env.kind));
    }
    let f = env.fields();
    match &s.what {
        SampleKind::Advertise { user_id } => {
            if f.str("user_id").map_err(|e| e.to_string())? != user_id {
                return Err("advertises another user".into());
            }
        }
        SampleKind::Message {
            sender,
            public,
            plaintext,
        } => {
            let sc = &fleet.clients[*sender];
            let ct = f.str("ciphertext").map_err(|e| e.to_string())?;
            let plain = socp::wire::b64::decode(ct)
                .ok_or("ciphertext is not base64")
                .and_then(|c| {
                    fleet
                        .key_of(s.recipient)
                        .decrypt(&c)
                        .map_err(|_| "does not decrypt")
                })?;
            if plain != plaintext.as_bytes() {
                return Err("decrypts to something else than was sent".into());
            }
            if f.str("sender").map_err(|e| e.to_string())? != sc.user_id {
                return Err("wrong sender".into());
            }
            let ts = f.i64("ts").map_err(|e| e.to_string())?;
            let to = if *public {
                None
            } else {
                Some(rc.user_id.as_str())
            };
            let sig = f.str("content_sig").map_err(|e| e.to_string())?;
            let sender_pub = fleet.key_of(*sender).public_key();
            if !crypto::verify_content_sig(sender_pub, sig, ct, &sc.user_id, to, ts) {
                return Err("content_sig does not verify".into());
            }
        }
    }
    Ok(())
}

/// A steady client's logged-in state, checked before a scenario starts.
pub fn all_ready(fleet: &Fleet, steady: &[usize]) -> Result<(), String> {
    let offline: Vec<&str> = steady
        .iter()
        .filter(|&&c| fleet.clients[c].phase != Phase::Ready)
        .map(|&c| fleet.clients[c].user_id.as_str())
        .take(5)
        .collect();
    if offline.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "steady clients no longer logged in: {}",
            offline.join(", ")
        ))
    }
}

/// Records `at - since` when `at` is later (a frame cannot arrive before it was scheduled, but
/// `Instant` arithmetic must not panic if it ever did).
pub fn since(at: Instant, since: Instant) -> Duration {
    at.saturating_duration_since(since)
}

/// A latency row for the table.
pub fn row(metric: &str, lat: &Lat) -> (String, Summary) {
    (metric.to_string(), lat.summary())
}

/// Wakes the fleet's event loop at given instants, to within the OS's sleep precision (tens of
/// µs). `mio`'s poll timeout has millisecond resolution and rounds up, so a sender woken by it
/// would leave every message up to 1 ms late — and, the schedule being open-loop, that lag
/// would count as the server's latency. The loop still polls with a timeout as a fallback.
pub struct Pacer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pacer {
    /// `times` in ascending order.
    pub fn start(waker: std::sync::Arc<mio::Waker>, times: Vec<Instant>) -> Pacer {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for at in times {
                // Sleep in slices so that `stop` is noticed within 50 ms.
                while let Some(left) = at.checked_duration_since(Instant::now()) {
                    if flag.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(left.min(Duration::from_millis(50)));
                }
                if flag.load(Ordering::Relaxed) || waker.wake().is_err() {
                    return;
                }
            }
        });
        Pacer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
