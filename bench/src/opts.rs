//! Command line of `socp-bench` (lexopt; `--help` by hand; usage errors exit 2).

use serde_json::{Value, json};
use std::path::PathBuf;

pub const USAGE: &str = "\
socp-bench: fan-out latency benchmark for socp-server (loopback only)

USAGE: cargo run --release --bin socp-bench -- [OPTIONS]

Starts M socp-server processes pinned to each other (or uses --connect servers), logs in N
lightweight clients (one mio event loop, round-robin over the servers) and runs scenarios on an
open-loop schedule: latency counts from each message's SCHEDULED time, and a sender that falls
behind its schedule is reported (lag), never silently slowed down.

SCENARIOS (--scenario LIST, comma-separated, or 'all' = presence,public,dm,idle):
  presence  one extra client logs in and out K times; latency from the scheduled login to each
            of the N others seeing its USER_ADVERTISE (first and last receiver per event)
  public    a client sends one /all to the N-1 others K times: it encrypts+signs one
            MSG_PUBLIC_CHANNEL per member and sends each as produced; last-receive latency from
            the start of production vs. the time spent producing
  dm        cross-server direct messages at rate R for D seconds (precomputed before the window)
  file      (not in 'all') one file from a client on server 1 to one on server 2, paced by the
            server's ACKs (window 64): MB/s and chunks/s end to end, servers' CPU, and the rate
            as a fraction of what signing allows; every chunk verified afterwards
  idle      n idle logged-in connections on one fresh server: resident memory per connection,
            wake-ups (voluntary context switches) and CPU over an idle window
  storm     (not in 'all') two steady users on server 1 exchange DMs at --probe-rate (the probe)
            while S extra clients on server 1 log in at once (connections opened beforehand,
            every USER_HELLO sent in one burst) and later all leave at once: time until every
            hello is acknowledged, every client has its LIST_RESPONSE and snapshot, and the
            probe users have seen every USER_REMOVE; the probe's one-way DM latency in each
            phase (idle, login storm, mass leave) and each storm phase's p99 over the idle p99

OPTIONS:
  --servers M             servers to start [3]
  --connect URL           use a running server instead (repeatable); no servers are started
  --pid PID               pid of a --connect server, in the same order, for CPU and memory
                          figures (repeatable; optional)
  --server-bin PATH       socp-server binary [next to this executable]
  --scenario LIST         see above [all]
  --clients N             steady clients for presence/public/dm [100]
  --repeat K              presence and public events [20]
  --presence-interval-ms MS  time between scheduled logins [300]
  --public-interval-ms MS    time between scheduled /all [auto: (N-1) x (one OAEP encryption
                          + 3 signatures, from the crypto floor) + 250 ms: the CPU work of one
                          /all (sender + servers) done on one core, plus slack]
  --rate R                direct messages per second [200]
  --duration S            seconds of direct messages [10]
  --find-max-rate         also ramp the DM rate up in steps (see below)
  --ramp-factor F         rate multiplier per step [1.2]
  --step-duration S       seconds per ramp step [5]
  --max-steps N           ramp steps at most [8]
  --max-lag-ms MS         a step whose sender fell this far behind schedule fails [10]
  --file-size BYTES       size of the file scenario's file [5242880]
  --storm-users S         storm clients logging in at once, then leaving at once [1000]
  --probe-rate R          the storm scenario's probe DMs per second (alternating directions) [20]
  --probe-idle S          seconds of probe before each storm phase (the idle baseline) [5]
  --sign-threads N        start the servers with SOCP_SIGN_THREADS=N in their environment
                          (their signing threads, where the server supports it); not with
                          --connect [unset: the server's default]
  --idle-conns LIST       idle connection counts, e.g. 1000,10000 [1000]
  --idle-window S         seconds of idle measurement [10]
  --idle-setup-timeout S  give up logging idle clients in after this [600]
  --idle-max-rss-mb MB    stop logging idle clients in when the server's or this process's
                          resident memory passes this [4096]
  --timeout S             longest wait for any one step (logins, deliveries) [60]
  --id-prefix P           prefix of the benchmark's user ids [bench]
  --json PATH             results file [bench-results.json]
  --peer-sig              clients announce the peer-sig capability (PROTOCOL.md §5.6): frames other
                          servers signed reach them unchanged (default: re-signed copies)
  --keep-logs             keep the servers' data directories (logs) and print where
  --server-log FILTER     the servers' RUST_LOG, e.g. socp::net=debug for the slow-turn log
                          (with --keep-logs) [info]
  --compare BEFORE AFTER  compare two results files (latency, rates, CPU, memory side by side,
                          regressions over 10 % marked); runs nothing
  -h, --help              this help

RAMP (--find-max-rate): runs dm steps at R, R*F, R*F^2, ... while the rate is SUSTAINED: every
message delivered, the sender never more than --max-lag-ms behind schedule, and latency not
growing within the step (the second half's median at most 2x the first half's). It reports the
highest sustained rate, and the highest rate up to which every step's p99 also stayed within 2x
the first step's p99 (a stricter reading: queueing without unbounded growth).

Everything runs on this machine: the servers, the clients and the senders share its CPUs, and
the report shows each one's CPU time so you can see who was the bottleneck.
";

/// Which scenarios to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scenarios {
    pub presence: bool,
    pub public: bool,
    pub dm: bool,
    pub idle: bool,
    pub file: bool,
    pub storm: bool,
}

impl Scenarios {
    fn parse(list: &str) -> Result<Scenarios, String> {
        let mut s = Scenarios::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "presence" => s.presence = true,
                "public" => s.public = true,
                "dm" => s.dm = true,
                "idle" => s.idle = true,
                "file" => s.file = true,
                "storm" => s.storm = true,
                "all" => {
                    s = Scenarios {
                        presence: true,
                        public: true,
                        dm: true,
                        idle: true,
                        file: s.file,
                        storm: s.storm,
                    }
                }
                other => return Err(format!("unknown scenario {other:?}")),
            }
        }
        if !(s.presence || s.public || s.dm || s.idle || s.file || s.storm) {
            return Err("no scenario chosen".into());
        }
        Ok(s)
    }

    /// Whether the mesh and its N steady clients are needed.
    pub fn mesh(&self) -> bool {
        self.presence || self.public || self.dm || self.file || self.storm
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (on, name) in [
            (self.presence, "presence"),
            (self.public, "public"),
            (self.dm, "dm"),
            (self.idle, "idle"),
            (self.file, "file"),
            (self.storm, "storm"),
        ] {
            if on {
                v.push(name);
            }
        }
        v
    }
}

/// Every parameter of a run (all of them go into the JSON results).
#[derive(Debug, Clone)]
pub struct Opts {
    pub servers: usize,
    pub connect: Vec<String>,
    pub pids: Vec<u32>,
    pub server_bin: Option<PathBuf>,
    pub scenarios: Scenarios,
    pub clients: usize,
    pub repeat: usize,
    pub presence_interval_ms: u64,
    pub public_interval_ms: Option<u64>,
    pub rate: f64,
    pub duration_s: f64,
    pub find_max_rate: bool,
    pub ramp_factor: f64,
    pub step_duration_s: f64,
    pub max_steps: usize,
    pub max_lag_ms: f64,
    pub file_size: usize,
    pub storm_users: usize,
    pub probe_rate: f64,
    pub probe_idle_s: f64,
    /// Passed to the servers started as `SOCP_SIGN_THREADS` (only when given).
    pub sign_threads: Option<usize>,
    pub idle_conns: Vec<usize>,
    pub idle_window_s: f64,
    pub idle_setup_timeout_s: f64,
    pub idle_max_rss_mb: u64,
    pub timeout_s: f64,
    pub id_prefix: String,
    pub json: PathBuf,
    pub keep_logs: bool,
    /// `RUST_LOG` of the servers started.
    pub server_log: String,
    /// Clients announce `caps:["peer-sig"]` (PROTOCOL.md §5.6).
    pub peer_sig: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            servers: 3,
            connect: Vec::new(),
            pids: Vec::new(),
            server_bin: None,
            scenarios: Scenarios::parse("all").expect("valid"),
            clients: 100,
            repeat: 20,
            presence_interval_ms: 300,
            public_interval_ms: None,
            rate: 200.0,
            duration_s: 10.0,
            find_max_rate: false,
            ramp_factor: 1.2,
            step_duration_s: 5.0,
            max_steps: 8,
            max_lag_ms: 10.0,
            file_size: 5 << 20,
            storm_users: 1000,
            probe_rate: 20.0,
            probe_idle_s: 5.0,
            sign_threads: None,
            idle_conns: vec![1000],
            idle_window_s: 10.0,
            idle_setup_timeout_s: 600.0,
            idle_max_rss_mb: 4096,
            timeout_s: 60.0,
            id_prefix: "bench".into(),
            json: PathBuf::from("bench-results.json"),
            keep_logs: false,
            server_log: "info".into(),
            peer_sig: false,
        }
    }
}

pub enum Parsed {
    Run(Box<Opts>),
    /// `--compare BEFORE AFTER`: compare two results files; nothing is run.
    Compare(PathBuf, PathBuf),
    Help,
}

fn num<T: std::str::FromStr>(name: &str, v: std::ffi::OsString) -> Result<T, String> {
    let s = v.into_string().map_err(|_| format!("{name}: not UTF-8"))?;
    s.parse()
        .map_err(|_| format!("{name}: {s:?} is not a valid number"))
}

fn positive(name: &str, x: f64) -> Result<f64, String> {
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(format!("{name} must be a positive number"))
    }
}

pub fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Parsed, String> {
    use lexopt::prelude::*;
    let mut o = Opts::default();
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Long("compare") => {
                let before = p.value().map_err(s)?.into();
                let after = p
                    .value()
                    .map_err(|_| "--compare needs two files: BEFORE.json AFTER.json".to_string())?
                    .into();
                return Ok(Parsed::Compare(before, after));
            }
            Long("servers") => o.servers = num("--servers", p.value().map_err(s)?)?,
            Long("connect") => o.connect.push(string(p.value().map_err(s)?)?),
            Long("pid") => o.pids.push(num("--pid", p.value().map_err(s)?)?),
            Long("server-bin") => o.server_bin = Some(p.value().map_err(s)?.into()),
            Long("scenario") => o.scenarios = Scenarios::parse(&string(p.value().map_err(s)?)?)?,
            Long("clients") => o.clients = num("--clients", p.value().map_err(s)?)?,
            Long("repeat") => o.repeat = num("--repeat", p.value().map_err(s)?)?,
            Long("presence-interval-ms") => {
                o.presence_interval_ms = num("--presence-interval-ms", p.value().map_err(s)?)?
            }
            Long("public-interval-ms") => {
                o.public_interval_ms = Some(num("--public-interval-ms", p.value().map_err(s)?)?)
            }
            Long("rate") => o.rate = positive("--rate", num("--rate", p.value().map_err(s)?)?)?,
            Long("duration") => {
                o.duration_s = positive("--duration", num("--duration", p.value().map_err(s)?)?)?
            }
            Long("find-max-rate") => o.find_max_rate = true,
            Long("ramp-factor") => o.ramp_factor = num("--ramp-factor", p.value().map_err(s)?)?,
            Long("step-duration") => {
                o.step_duration_s = positive(
                    "--step-duration",
                    num("--step-duration", p.value().map_err(s)?)?,
                )?
            }
            Long("max-steps") => o.max_steps = num("--max-steps", p.value().map_err(s)?)?,
            Long("max-lag-ms") => o.max_lag_ms = num("--max-lag-ms", p.value().map_err(s)?)?,
            Long("file-size") => o.file_size = num("--file-size", p.value().map_err(s)?)?,
            Long("storm-users") => o.storm_users = num("--storm-users", p.value().map_err(s)?)?,
            Long("probe-rate") => {
                o.probe_rate =
                    positive("--probe-rate", num("--probe-rate", p.value().map_err(s)?)?)?
            }
            Long("probe-idle") => {
                o.probe_idle_s =
                    positive("--probe-idle", num("--probe-idle", p.value().map_err(s)?)?)?
            }
            Long("sign-threads") => {
                o.sign_threads = Some(num("--sign-threads", p.value().map_err(s)?)?)
            }
            Long("idle-conns") => {
                o.idle_conns = string(p.value().map_err(s)?)?
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .parse()
                            .map_err(|_| format!("--idle-conns: {n:?} is not a count"))
                    })
                    .collect::<Result<_, _>>()?
            }
            Long("idle-window") => {
                o.idle_window_s = positive(
                    "--idle-window",
                    num("--idle-window", p.value().map_err(s)?)?,
                )?
            }
            Long("idle-setup-timeout") => {
                o.idle_setup_timeout_s = positive(
                    "--idle-setup-timeout",
                    num("--idle-setup-timeout", p.value().map_err(s)?)?,
                )?
            }
            Long("idle-max-rss-mb") => {
                o.idle_max_rss_mb = num("--idle-max-rss-mb", p.value().map_err(s)?)?
            }
            Long("timeout") => {
                o.timeout_s = positive("--timeout", num("--timeout", p.value().map_err(s)?)?)?
            }
            Long("id-prefix") => o.id_prefix = string(p.value().map_err(s)?)?,
            Long("json") => o.json = p.value().map_err(s)?.into(),
            Long("keep-logs") => o.keep_logs = true,
            Long("server-log") => o.server_log = string(p.value().map_err(s)?)?,
            Long("peer-sig") => o.peer_sig = true,
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    o.check()?;
    Ok(Parsed::Run(Box::new(o)))
}

fn s(e: lexopt::Error) -> String {
    e.to_string()
}

fn string(v: std::ffi::OsString) -> Result<String, String> {
    v.into_string()
        .map_err(|_| "argument is not UTF-8".to_string())
}

impl Opts {
    fn check(&self) -> Result<(), String> {
        if self.connect.is_empty() && !(1..=16).contains(&self.servers) {
            return Err("--servers must be 1 to 16".into());
        }
        if !self.pids.is_empty() && self.pids.len() != self.connect.len() {
            return Err("give one --pid per --connect server, in the same order".into());
        }
        for url in &self.connect {
            let rest = url
                .strip_prefix("ws://")
                .ok_or_else(|| format!("--connect {url}: only ws:// URLs"))?;
            let host = rest.split(['/', ':']).next().unwrap_or("");
            if !matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "") {
                return Err(format!(
                    "--connect {url}: loopback only (127.0.0.1, localhost, [::1])"
                ));
            }
        }
        if self.scenarios.mesh() && self.clients < 2 {
            return Err("--clients must be at least 2".into());
        }
        if self.scenarios.mesh() && self.clients > 20_000 {
            return Err("--clients at most 20000".into());
        }
        if self.file_size > 64 << 20 {
            return Err("--file-size: at most 67108864 (the server's default limit)".into());
        }
        if self.storm_users == 0 || self.storm_users > 20_000 {
            return Err("--storm-users must be 1 to 20000".into());
        }
        if self.probe_rate > 1000.0 {
            return Err("--probe-rate: at most 1000 per second".into());
        }
        if self.probe_idle_s > 600.0 {
            return Err("--probe-idle: at most 600 seconds".into());
        }
        if self.probe_rate * (self.probe_idle_s + self.timeout_s) > 200_000.0 {
            return Err(
                "--probe-rate x (--probe-idle + --timeout): at most 200,000 probe messages".into(),
            );
        }
        match self.sign_threads {
            Some(0) | Some(1025..) => return Err("--sign-threads must be 1 to 1024".into()),
            Some(_) if !self.connect.is_empty() => {
                return Err(
                    "--sign-threads sets the servers this benchmark starts; with --connect, \
                     give it to your servers instead"
                        .into(),
                );
            }
            _ => {}
        }
        if self.idle_conns.iter().any(|&n| n == 0 || n > 100_000) {
            return Err("--idle-conns: counts from 1 to 100000".into());
        }
        if self.repeat == 0 {
            return Err("--repeat must be at least 1".into());
        }
        if !(self.ramp_factor > 1.0 && self.ramp_factor <= 10.0) {
            return Err("--ramp-factor must be above 1 and at most 10".into());
        }
        if self.max_steps == 0 || self.max_steps > 50 {
            return Err("--max-steps must be 1 to 50".into());
        }
        if self.rate * self.duration_s > 2_000_000.0 {
            return Err("--rate x --duration: at most 2,000,000 messages".into());
        }
        let p = &self.id_prefix;
        if p.is_empty() || p.len() > 16 || !socp::wire::ids::is_valid_display_name(p) {
            return Err("--id-prefix: 1-16 characters of [A-Za-z0-9._-]".into());
        }
        Ok(())
    }

    /// Environment variables for the servers the benchmark starts.
    pub fn server_env(&self) -> Vec<(String, String)> {
        self.sign_threads
            .map(|n| ("SOCP_SIGN_THREADS".to_string(), n.to_string()))
            .into_iter()
            .collect()
    }

    /// The parameters as JSON (stable keys; `null` for unset options).
    pub fn json(&self) -> Value {
        json!({
            "servers": if self.connect.is_empty() { self.servers } else { self.connect.len() },
            "connect": self.connect,
            "pids": self.pids,
            "scenarios": self.scenarios.names(),
            "clients": self.clients,
            "repeat": self.repeat,
            "presence_interval_ms": self.presence_interval_ms,
            "public_interval_ms": self.public_interval_ms,
            "rate_per_s": self.rate,
            "duration_s": self.duration_s,
            "find_max_rate": self.find_max_rate,
            "ramp_factor": self.ramp_factor,
            "step_duration_s": self.step_duration_s,
            "max_steps": self.max_steps,
            "max_lag_ms": self.max_lag_ms,
            "file_size": self.file_size,
            "storm_users": self.storm_users,
            "probe_rate_per_s": self.probe_rate,
            "probe_idle_s": self.probe_idle_s,
            "sign_threads": self.sign_threads,
            "idle_conns": self.idle_conns,
            "idle_window_s": self.idle_window_s,
            "idle_setup_timeout_s": self.idle_setup_timeout_s,
            "idle_max_rss_mb": self.idle_max_rss_mb,
            "timeout_s": self.timeout_s,
            "id_prefix": self.id_prefix,
            "peer_sig": self.peer_sig,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Opts, String> {
        match parse(args.iter().map(std::ffi::OsString::from))? {
            Parsed::Run(o) => Ok(*o),
            _ => Err("not a run".into()),
        }
    }

    #[test]
    fn storm_is_its_own_scenario_with_its_options() {
        let all = run(&["--scenario", "all"]).unwrap();
        assert!(!all.scenarios.storm && all.scenarios.dm);
        let o = run(&[
            "--scenario",
            "storm",
            "--storm-users",
            "30",
            "--probe-rate",
            "5",
        ])
        .unwrap();
        assert!(o.scenarios.storm && o.scenarios.mesh() && !o.scenarios.dm);
        assert_eq!(o.scenarios.names(), ["storm"]);
        assert_eq!((o.storm_users, o.probe_rate), (30, 5.0));
        assert_eq!(o.json()["storm_users"], 30);
        for bad in [
            &["--storm-users", "0"][..],
            &["--storm-users", "20001"],
            &["--probe-rate", "0"],
            &["--probe-idle", "-1"],
            &["--probe-rate", "1000", "--timeout", "600"],
        ] {
            assert!(run(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sign_threads_reaches_started_servers_only_when_given() {
        let o = run(&[]).unwrap();
        assert!(o.server_env().is_empty());
        assert_eq!(o.json()["sign_threads"], Value::Null);
        let o = run(&["--sign-threads", "3"]).unwrap();
        assert_eq!(
            o.server_env(),
            [("SOCP_SIGN_THREADS".to_string(), "3".to_string())]
        );
        assert_eq!(o.json()["sign_threads"], 3);
        assert!(run(&["--sign-threads", "0"]).is_err());
        let e = run(&["--sign-threads", "2", "--connect", "ws://127.0.0.1:1"]).unwrap_err();
        assert!(e.contains("--connect"), "{e}");
    }
}
