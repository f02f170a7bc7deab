//! Dialling (PROTOCOL.md §4.4): the peers we dial, their backoff with jitter, and what the log
//! has said about each run of failures. A component of [`super::Federation`] with private
//! state: the `impl Server` glue asks it what to dial and when to redial, and arms the timers.

use super::{FedConfig, peer_url};
use crate::crypto::PublicKey;
use log::{debug, info, warn};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetState {
    /// A redial timer is armed.
    Waiting,
    /// A dial or welcome is under way.
    Dialling,
    /// Linked (by our dial or theirs).
    Linked,
}

/// A peer we keep dialling until linked.
#[derive(Debug)]
struct Target {
    id: Option<String>,
    host: String,
    port: u16,
    key: Arc<PublicKey>,
    /// Dial with `wss://`.
    tls: bool,
    /// Dials since the start or the last link: the failures in a row, once one has failed.
    attempts: u32,
    state: TargetState,
    /// What the log has said about this run of failures (see [`failure_log`]).
    report: Report,
    /// Why the dial under way failed, when the core knows better than "connection closed"
    /// (a refused hello, a bad or missing welcome).
    note: Option<String>,
}

impl Target {
    /// How the log names it: `srv-b (ws://10.0.0.2:9000)`, or the address alone until its id
    /// is known.
    fn name(&self) -> String {
        let url = self.url();
        match &self.id {
            Some(id) => format!("{id} ({url})"),
            None => url,
        }
    }

    /// `ws://host:port` or `wss://host:port`, for logs.
    fn url(&self) -> String {
        peer_url(self.tls, &self.host, self.port)
    }
}

/// What the log has said about a peer, so that it reports each change once and summarises
/// the rest (§4.4: every attempt is logged, truthfully; only the level varies).
#[derive(Debug, Default, Clone)]
struct Report {
    /// Wall time of the first failure of this run.
    failing_since_ms: i64,
    /// Failed dials in this run.
    failures: u32,
    /// The attempt of the last line at `warn` about this run (0: none yet).
    attempt: u32,
    /// When that line was logged (monotonic).
    at_ms: u64,
    /// An operator at `RUST_LOG=warn` was told the peer is down or unreachable, and not yet
    /// that it is back.
    warned: bool,
    /// A link with it has been up: a failure now follows a link that went down.
    was_linked: bool,
}

/// A repeated failure is summarised at `warn` at most once per this many attempts …
pub const SUMMARY_EVERY_ATTEMPTS: u32 = 10;
/// … and at most once per this many milliseconds.
pub const SUMMARY_EVERY_MS: u64 = 5 * 60 * 1000;

/// How a failed dial is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureLog {
    /// The first failure of a run (since the start, or since the link went down): `warn`.
    First,
    /// A summary of the failures since the last line at `warn`: `warn`.
    Summary,
    /// Any other failure: `debug` only.
    Quiet,
}

/// How to log failure number `attempt` of a run, when the last line at `warn` about it was at
/// attempt `last_reported` (0: none), `ms_since_reported` ago.
pub fn failure_log(attempt: u32, last_reported: u32, ms_since_reported: u64) -> FailureLog {
    if attempt <= 1 || last_reported == 0 {
        FailureLog::First
    } else if attempt.saturating_sub(last_reported) >= SUMMARY_EVERY_ATTEMPTS
        && ms_since_reported >= SUMMARY_EVERY_MS
    {
        FailureLog::Summary
    } else {
        FailureLog::Quiet
    }
}

/// `2027-01-15 08:00:00 UTC` for a wall time in ms since the epoch.
fn utc(wall_ms: i64) -> String {
    let secs = wall_ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// A delay for the log: `1.0 s`.
fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// A dial to make: where to, and with which scheme.
#[derive(Debug)]
pub(super) struct Dial {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) tls: bool,
}

/// A target's pinned key and address, to check a welcome against.
#[derive(Debug)]
pub(super) struct Expected {
    pub(super) key: Arc<PublicKey>,
    pub(super) host: String,
    pub(super) port: u16,
    /// Its URL, for logs.
    pub(super) url: String,
}

/// The peers we dial and when: the dial targets with their backoff and failure log.
#[derive(Debug)]
pub(super) struct Dialling {
    targets: Vec<Target>,
    /// The state of the backoff jitter.
    rng: u64,
    backoff_base_ms: u64,
    backoff_max_ms: u64,
    /// The scheme of a server learned of (`FedConfig::peer_tls`).
    peer_tls: bool,
    /// A graceful shutdown has begun: nothing is dialled or redialled any more.
    stopping: bool,
}

impl Dialling {
    pub(super) fn new(cfg: &FedConfig) -> Dialling {
        Dialling {
            targets: Vec::new(),
            rng: cfg.rng_seed | 1,
            backoff_base_ms: cfg.backoff_base_ms,
            backoff_max_ms: cfg.backoff_max_ms,
            peer_tls: cfg.peer_tls,
            stopping: false,
        }
    }

    /// Every target's index.
    pub(super) fn all(&self) -> std::ops::Range<u32> {
        0..self.targets.len() as u32
    }

    /// A graceful shutdown has begun: nothing is dialled or redialled from now on.
    pub(super) fn stop(&mut self) {
        self.stopping = true;
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// The server id of dial target `t`, once known.
    pub(super) fn target_id(&self, t: u32) -> Option<String> {
        self.targets.get(t as usize).and_then(|t| t.id.clone())
    }

    /// Whether `key` is the key of a target (a bootstrap peer, or a server we dial).
    pub(super) fn has_key(&self, key: &PublicKey) -> bool {
        self.targets.iter().any(|t| *t.key == *key)
    }

    /// `host:port` of target `t`, for the `to` of our hello.
    pub(super) fn address(&self, t: u32) -> Option<String> {
        let target = self.targets.get(t as usize)?;
        Some(format!("{}:{}", target.host, target.port))
    }

    /// What a welcome for target `t` must match.
    pub(super) fn expected(&self, t: u32) -> Option<Expected> {
        let target = self.targets.get(t as usize)?;
        Some(Expected {
            key: Arc::clone(&target.key),
            host: target.host.clone(),
            port: target.port,
            url: target.url(),
        })
    }

    /// Backoff before attempt `attempts + 1`: base·2^(attempts−1), capped, ±20 % jitter.
    fn backoff_ms(&mut self, attempts: u32) -> u64 {
        let exp = attempts.saturating_sub(1).min(20);
        let delay = self
            .backoff_base_ms
            .saturating_mul(1 << exp)
            .min(self.backoff_max_ms);
        // xorshift64*: jitter needs spread, not secrecy.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11; // 53 bits
        let unit = r as f64 / (1u64 << 53) as f64; // [0, 1)
        (delay as f64 * (0.8 + 0.4 * unit)) as u64
    }

    /// Adds a dial target unless one with the same key exists (then refreshes its id and
    /// address). Returns the index of a new target. `tls`: the scheme of a bootstrap peer,
    /// which wins over an existing target's; `None` for a server learned of, dialled with
    /// `peer_tls`.
    pub(super) fn add_target(
        &mut self,
        id: Option<&str>,
        host: &str,
        port: u16,
        key: &Arc<PublicKey>,
        tls: Option<bool>,
    ) -> Option<u32> {
        if let Some(t) = self.targets.iter_mut().find(|t| t.key == *key) {
            if let Some(id) = id {
                t.id = Some(id.to_string());
            }
            if !host.is_empty() && port != 0 {
                t.host = host.to_string();
                t.port = port;
            }
            if let Some(tls) = tls {
                t.tls = tls;
            }
            return None;
        }
        if host.is_empty() || port == 0 {
            return None;
        }
        self.targets.push(Target {
            id: id.map(str::to_string),
            host: host.to_string(),
            port,
            key: Arc::clone(key),
            tls: tls.unwrap_or(self.peer_tls),
            attempts: 0,
            state: TargetState::Waiting,
            report: Report::default(),
            note: None,
        });
        Some(self.targets.len() as u32 - 1)
    }

    /// [`Timer::Redial`](crate::core::server::Timer::Redial) for target `t`: the dial to make,
    /// if one is due (`linked` says whether a server id has a live link).
    pub(super) fn redial(&mut self, t: u32, linked: impl Fn(&str) -> bool) -> Option<Dial> {
        if self.stopping {
            return None;
        }
        let target = self.targets.get_mut(t as usize)?;
        if target.state != TargetState::Waiting {
            return None;
        }
        if target.id.as_deref().is_some_and(linked) {
            target.state = TargetState::Linked;
            return None;
        }
        target.attempts += 1;
        target.state = TargetState::Dialling;
        target.note = None;
        // The first attempt of a run at info; the retries at debug (their failures are
        // summarised, see `dial_ended`).
        let level = if target.attempts == 1 {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        log::log!(
            level,
            "dialling peer {} (attempt {})",
            target.name(),
            target.attempts
        );
        Some(Dial {
            host: target.host.clone(),
            port: target.port,
            tls: target.tls,
        })
    }

    /// Why the dial under way for target `t` is failing, for the line
    /// [`Dialling::dial_ended`] logs when its connection closes.
    pub(super) fn note_failure(&mut self, t: u32, why: String) {
        if let Some(target) = self.targets.get_mut(t as usize) {
            target.note = Some(why);
        }
    }

    /// A dial or a link handshake for target `t` ended without a link: logs it truthfully and
    /// returns the delay of the next attempt (`None`: none, shutting down or linked). The first
    /// failure of a run is a warning, the next ones are logged at debug and summarised at warn
    /// (see [`failure_log`]).
    pub(super) fn dial_ended(
        &mut self,
        now_mono_ms: u64,
        now_wall_ms: i64,
        t: u32,
        reason: &str,
    ) -> Option<u64> {
        let target = self.targets.get_mut(t as usize)?;
        if target.state == TargetState::Linked {
            return None;
        }
        let reason = target.note.take().unwrap_or_else(|| reason.to_string());
        let Some(delay) = self.backoff(t) else {
            let target = &self.targets[t as usize];
            info!(
                "dial to peer {} failed (attempt {}): {reason}; not retried: shutting down",
                target.name(),
                target.attempts
            );
            return None;
        };
        let target = &mut self.targets[t as usize];
        let (name, attempt) = (target.name(), target.attempts);
        let report = &mut target.report;
        report.failures += 1;
        let next = secs(delay);
        match failure_log(
            attempt,
            report.attempt,
            now_mono_ms.saturating_sub(report.at_ms),
        ) {
            FailureLog::First => {
                report.failing_since_ms = now_wall_ms;
                let since = if report.was_linked {
                    "; unreachable since its link went down"
                } else {
                    ""
                };
                warn!(
                    "dial to peer {name} failed (attempt {attempt}): {reason}{since}; next try \
                     in {next}; further failures are logged at debug and summarised every \
                     {SUMMARY_EVERY_ATTEMPTS} attempts"
                );
            }
            FailureLog::Summary => warn!(
                "dial to peer {name} failed (attempt {attempt}): {reason}; still unreachable \
                 after {attempt} attempts since {}; next try in {next}",
                utc(report.failing_since_ms)
            ),
            FailureLog::Quiet => {
                debug!(
                    "dial to peer {name} failed (attempt {attempt}): {reason}; next try in {next}"
                );
                return Some(delay);
            }
        }
        report.attempt = attempt;
        report.at_ms = now_mono_ms;
        report.warned = true;
        Some(delay)
    }

    /// Target `t` waits for its next dial: returns the delay, or `None` while shutting down.
    fn backoff(&mut self, t: u32) -> Option<u64> {
        self.targets[t as usize].state = TargetState::Waiting;
        if self.stopping {
            return None;
        }
        let attempts = self.targets[t as usize].attempts;
        Some(self.backoff_ms(attempts.max(1)))
    }

    /// A link to `server_id` with `key` is up: its targets stop dialling and start a new run.
    /// Without one, and with `remember`, it becomes a target, to be redialled if the link
    /// drops. Returns the failures told to the operator at `warn` (`Some`: they were told the
    /// peer was down or unreachable, and are to be told it is back).
    pub(super) fn linked(
        &mut self,
        server_id: &str,
        host: &str,
        port: u16,
        key: &Arc<PublicKey>,
        remember: bool,
    ) -> Option<u32> {
        let mut have_target = false;
        let mut failed = 0;
        let mut warned = false;
        for target in self.targets.iter_mut().filter(|t| t.key == *key) {
            target.id = Some(server_id.to_string());
            target.state = TargetState::Linked;
            if target.report.warned {
                failed = failed.max(target.report.failures);
                warned = true;
            }
            target.attempts = 0;
            target.note = None;
            target.report = Report {
                was_linked: true,
                ..Report::default()
            };
            have_target = true;
        }
        if !have_target
            && remember
            && let Some(t) = self.add_target(Some(server_id), host, port, key, None)
        {
            self.targets[t as usize].state = TargetState::Linked;
        }
        warned.then_some(failed)
    }

    /// The link to `server_id` (pinned to `key`, if known) went down: its targets start a new
    /// run of dials, reported at warn. Returns each target with the delay of its next dial.
    pub(super) fn link_lost(
        &mut self,
        server_id: &str,
        key: Option<&Arc<PublicKey>>,
    ) -> Vec<(u32, u64)> {
        let targets: Vec<u32> = self
            .all()
            .filter(|&t| {
                let target = &self.targets[t as usize];
                target.id.as_deref() == Some(server_id) || Some(&target.key) == key
            })
            .collect();
        let mut redials = Vec::new();
        for t in targets {
            let target = &mut self.targets[t as usize];
            target.attempts = 0;
            target.report = Report {
                warned: true,
                was_linked: true,
                ..Report::default()
            };
            if let Some(delay) = self.backoff(t) {
                redials.push((t, delay));
            }
        }
        redials
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let cfg = FedConfig::default();
        let mut dialling = Dialling::new(&cfg);
        for attempts in 1..30 {
            let base = (cfg.backoff_base_ms << (attempts - 1).min(20)).min(cfg.backoff_max_ms);
            let delay = dialling.backoff_ms(attempts);
            assert!(
                delay >= base * 8 / 10 && delay <= base * 12 / 10,
                "{attempts}: {delay}"
            );
        }
    }

    #[test]
    fn stopping_dials_nothing() {
        let mut dialling = Dialling::new(&FedConfig::default());
        dialling.stop();
        assert!(dialling.is_stopping());
        assert!(dialling.redial(0, |_| false).is_none());
        assert!(dialling.all().is_empty());
    }
}
