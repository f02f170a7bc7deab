//! Scenario d, idle cost: n logged-in connections that do nothing, on ONE fresh server (no
//! peers, so no heartbeats), and what they cost that server:
//!
//! - resident memory per connection: (VmRSS after - VmRSS before) / n, from
//!   `/proc/PID/status`. "After" is at the end of the idle window, so it also holds whatever
//!   the logins left in the allocator (buffers that grew and were not returned);
//! - wake-ups: the `voluntary_ctxt_switches` delta over the idle window (an event loop that
//!   sleeps in `epoll_wait` until something happens switches only when it wakes);
//! - CPU time over the window.
//!
//! Logging n clients in is O(n^2) work for the server by protocol: each login sends the
//! newcomer the whole directory (`LIST_RESPONSE`, about 1 KB per online user) and tells every
//! online user (`USER_ADVERTISE`). The benchmark reports how the time per login grows.
//!
//! The server is started with `--hello-timeout-ms 5000 --handshake-timeout-ms 5000`, and the
//! window opens 5.5 s after the last login, so that the per-connection deadline timers armed at
//! connect time have all fired (they are no-ops by then, but each firing wakes the loop). With
//! `--connect` the server's own settings apply.
//!
//! Guard rails: the server's and the bench's resident memory are sampled twice a second during
//! the logins (the samples go into the JSON as `memory_timeline`), and the logins stop when either
//! passes `--idle-max-rss-mb` (status `aborted`, with the per-connection figure at that point):
//! the machine is shared, and on this server memory per connection grows with the number of users
//! online. Once logged in, a bench client drops its WebSocket layer and discards raw bytes, so the
//! bench's own memory stays small. After the window every client disconnects at once and the
//! server's VmRSS is read again when its CPU time has stopped moving: memory that stays then is
//! held by the allocator, not by connections.

use crate::common::{Outcome, Trouble, login_all};
use crate::fleet::{Fleet, Phase, ServerEnd};
use crate::opts::Opts;
use crate::procs::{self, Spawn};
use crate::stats::{self, round3};
use serde_json::{Value, json};
use std::net::ToSocketAddrs;
use std::path::Path;
use std::time::{Duration, Instant};

/// Where the idle connections go.
pub enum Target<'a> {
    /// Start a fresh server per size.
    Spawn { bin: &'a Path },
    /// A running server (its pid, if given, for the `/proc` figures).
    Connect { url: &'a str, pid: Option<u32> },
}

/// The deadline timers of the idle server (see the module doc).
const IDLE_TIMEOUT_MS: u64 = 5000;

pub fn run(opts: &Opts, target: &Target) -> Outcome {
    let mut sizes = Vec::new();
    let mut lines = Vec::new();
    let mut all_ok = true;
    for &n in &opts.idle_conns {
        eprintln!("[idle] {n} connections");
        match one(opts, target, n) {
            Ok((json, mut l)) => {
                sizes.push(json);
                lines.append(&mut l);
            }
            Err((status, why, extra)) => {
                all_ok = false;
                lines.push(format!("{n} connections: {status}: {why}"));
                let mut j = json!({"connections": n, "status": status, "note": why});
                if let (Some(o), Value::Object(e)) = (j.as_object_mut(), extra) {
                    o.extend(e);
                }
                sizes.push(j);
            }
        }
    }
    Outcome {
        name: "idle",
        json: json!({
            "status": if all_ok { "ok" } else { "incomplete" },
            "definition": "n logged-in connections that send nothing, on one server without \
                           peers; memory = (VmRSS at the end of the window - VmRSS before any \
                           client) / n; wake-ups = voluntary context switches during the window",
            "sizes": sizes,
        }),
        rows: Vec::new(),
        lines,
    }
}

type Failure = (&'static str, String, Value);

/// Resident memory (KiB) of the server and of this process, sampled during the logins.
struct Sample {
    ready: usize,
    at_s: f64,
    server_kb: Option<u64>,
    bench_kb: Option<u64>,
}

fn timeline_json(samples: &[Sample]) -> Value {
    // At most ~40 points, evenly spaced, always with the last.
    let step = samples.len().div_ceil(40).max(1);
    let mut picked: Vec<&Sample> = samples.iter().step_by(step).collect();
    if let Some(last) = samples.last()
        && !std::ptr::eq(*picked.last().unwrap_or(&last), last)
    {
        picked.push(last);
    }
    Value::Array(
        picked
            .iter()
            .map(|s| {
                json!({"ready": s.ready, "at_s": round3(s.at_s),
                       "server_vm_rss_kb": s.server_kb, "bench_vm_rss_kb": s.bench_kb})
            })
            .collect(),
    )
}

fn one(opts: &Opts, target: &Target, n: usize) -> Result<(Value, Vec<String>), Failure> {
    let fail = |e: String| ("failed", e, Value::Null);
    let need = n as u64 + 256;
    match stats::open_files_limit() {
        Some(limit) if limit >= need => {}
        Some(limit) => {
            return Err((
                "skipped",
                format!(
                    "needs about {need} open files in this process and in the server, but the \
                     limit is {limit}: run `ulimit -n {}` in this shell first (socp-bench cannot \
                     raise it itself: it has no libc binding)",
                    need.next_power_of_two().max(need + 1024)
                ),
                Value::Null,
            ));
        }
        None => {}
    }
    // The server.
    let max_write_buffer = (32usize << 20).max(n * 2048 + (1 << 20));
    let flags = vec![
        "--max-connections".to_string(),
        (n + 100).to_string(),
        "--max-write-buffer".to_string(),
        max_write_buffer.to_string(),
        "--hello-timeout-ms".to_string(),
        IDLE_TIMEOUT_MS.to_string(),
        "--handshake-timeout-ms".to_string(),
        IDLE_TIMEOUT_MS.to_string(),
    ];
    let spawned = matches!(target, Target::Spawn { .. });
    let (set, url, pid) = match target {
        Target::Spawn { bin } => {
            let spawn = Spawn {
                bin,
                extra: flags.clone(),
                mesh: false,
                log_level: &opts.server_log,
                tag: "idle",
                env: opts.server_env(),
            };
            let mut set = procs::start(&spawn, 1).map_err(fail)?;
            set.keep = opts.keep_logs;
            let url = set.servers[0].url();
            let pid = set.servers[0].pid;
            (Some(set), url, Some(pid))
        }
        Target::Connect { url, pid } => (None, url.to_string(), *pid),
    };
    let addr = url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| fail(format!("cannot resolve {url}")))?;
    let end = ServerEnd {
        url: url.clone(),
        addr,
        server_id: None,
        key: None,
    };
    let mut fleet = Fleet::new(vec![end], 8192).map_err(|e| fail(e.to_string()))?;
    let who: Vec<usize> = (0..n)
        .map(|i| {
            let c = fleet.add_client(format!("{}-i{i}", opts.id_prefix), 0, false);
            fleet.clients[c].raw_after_ready = true;
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = pid.and_then(stats::proc_status);
    let pids: Vec<u32> = pid.into_iter().collect();
    let timeout = Duration::from_secs_f64(opts.idle_setup_timeout_s);
    let me = std::process::id();
    let limit_kb = opts.idle_max_rss_mb * 1024;
    let mut timeline: Vec<Sample> = Vec::new();
    let t_login = Instant::now();
    // Few logins in flight: each waits for the ones ahead, within the 5 s hello deadline.
    let login = login_all(&mut fleet, &pids, &who, 8, timeout, "idle", &mut |ready| {
        let server_kb = pid.and_then(stats::proc_status).map(|s| s.vm_rss_kb);
        let bench_kb = stats::proc_status(me).map(|s| s.vm_rss_kb);
        timeline.push(Sample {
            ready,
            at_s: t_login.elapsed().as_secs_f64(),
            server_kb,
            bench_kb,
        });
        for (who, kb) in [("the server", server_kb), ("socp-bench", bench_kb)] {
            if let Some(kb) = kb.filter(|&kb| kb > limit_kb) {
                return Err(format!(
                    "stopped after {ready} of {n} logins: {who} uses {:.2} GiB resident \
                     (limit --idle-max-rss-mb {})",
                    kb as f64 / 1048576.0,
                    opts.idle_max_rss_mb
                ));
            }
        }
        Ok(())
    });
    let login = match login {
        Ok(l) => l,
        Err(e) => {
            let status = if e.contains("--idle-max-rss-mb") {
                "aborted"
            } else {
                "failed"
            };
            let last = timeline.last();
            let per_conn = last.and_then(|l| {
                let (b, s) = (before?, l.server_kb?);
                (l.ready > 0).then(|| (s as f64 - b.vm_rss_kb as f64) * 1024.0 / l.ready as f64)
            });
            let extra = json!({
                "reached_connections": last.map(|l| l.ready),
                "vm_rss_kb_before": before.map(|s| s.vm_rss_kb),
                "server_rss_bytes_per_connection_at_stop": per_conn.map(round3),
                "largest_list_response_bytes": fleet.max_list_bytes,
                "memory_timeline": timeline_json(&timeline),
            });
            let note = match per_conn {
                Some(p) => format!("{e}; {p:.0} bytes per connection at that point"),
                None => e,
            };
            return Err((status, note, extra));
        }
    };
    let list_bytes = fleet.max_list_bytes;

    // Settle: keep reading until the deadline timers of the last connections have fired.
    let mut trouble = Trouble::default();
    let settle_until = Instant::now() + Duration::from_millis(IDLE_TIMEOUT_MS + 500);
    turn_until(&mut fleet, settle_until, &mut trouble).map_err(fail)?;

    // The idle window.
    let mid = pid.and_then(stats::proc_status);
    let cpu_mid = pid.and_then(stats::cpu_ms);
    let bytes_mid = fleet.bytes_in;
    let bench_cpu_mid = stats::cpu_ms(0);
    let window = Duration::from_secs_f64(opts.idle_window_s);
    let w0 = Instant::now();
    turn_until(&mut fleet, w0 + window, &mut trouble).map_err(fail)?;
    let window_s = w0.elapsed().as_secs_f64();
    let after = pid.and_then(stats::proc_status);
    let cpu_after = pid.and_then(stats::cpu_ms);
    let bytes_window = fleet.bytes_in - bytes_mid;
    let bench_cpu_window = stats::cpu_ms(0).zip(bench_cpu_mid).map(|(b, a)| b - a);
    let bench_rss = stats::proc_status(me).map(|s| s.vm_rss_kb);
    let online = fleet
        .clients
        .iter()
        .filter(|c| c.phase == Phase::Ready)
        .count();

    // Everyone leaves at once: is the memory given back? (Per-connection buffers are freed with
    // their connection; memory the allocator keeps is not.)
    fleet.drop_all();
    drop(fleet);
    let (gone, gone_s) = match pid {
        Some(pid) => wait_cpu_quiet(pid, Duration::from_secs(60)),
        None => (None, 0.0),
    };
    drop(set); // stops the server

    let rss_per_conn = before
        .zip(after)
        .map(|(b, a)| (a.vm_rss_kb as f64 - b.vm_rss_kb as f64) * 1024.0 / n as f64);
    let wakeups = mid
        .zip(after)
        .map(|(m, a)| a.voluntary_ctxt_switches - m.voluntary_ctxt_switches);
    let nonvol = mid
        .zip(after)
        .map(|(m, a)| a.nonvoluntary_ctxt_switches - m.nonvoluntary_ctxt_switches);
    let cpu_window = cpu_mid.zip(cpu_after).map(|(a, b)| b - a);
    let not_measured = "not measured (no server pid)";
    let mib = |kb: u64| kb as f64 / 1024.0;
    let mut lines = vec![
        format!("{n} connections: {}", login.slope_line()),
        if spawned {
            format!(
                "  largest LIST_RESPONSE a login received: {:.1} KiB (server --max-write-buffer \
                 set to {:.1} MiB, at least the default and room for it)",
                list_bytes as f64 / 1024.0,
                max_write_buffer as f64 / 1048576.0
            )
        } else {
            format!(
                "  largest LIST_RESPONSE a login received: {:.1} KiB",
                list_bytes as f64 / 1024.0
            )
        },
        format!("  login phase: {}", login.meter.line()),
        match (before, after, rss_per_conn) {
            (Some(b), Some(a), Some(per)) => format!(
                "  server VmRSS {:.1} MiB before, {:.1} MiB with {n} idle: {:.0} bytes per \
                 connection; {} after all disconnected",
                mib(b.vm_rss_kb),
                mib(a.vm_rss_kb),
                per,
                gone.map_or("?".into(), |g| format!(
                    "{:.1} MiB ({gone_s:.1} s later)",
                    mib(g.vm_rss_kb)
                ))
            ),
            _ => format!("  memory {not_measured}"),
        },
        match (wakeups, nonvol, cpu_window) {
            (Some(w), Some(nv), Some(cpu)) => format!(
                "  idle {window_s:.1} s: {w} voluntary context switches ({:.2}/s), {nv} \
                 involuntary, server CPU {cpu:.0} ms; clients received {bytes_window} bytes",
                w as f64 / window_s
            ),
            _ => format!(
                "  idle {window_s:.1} s: wake-ups {not_measured}; clients received \
                 {bytes_window} bytes"
            ),
        },
        format!(
            "  socp-bench itself: VmRSS {} MiB, CPU {} ms in the window",
            bench_rss.map_or("?".into(), |k| format!("{:.0}", mib(k))),
            bench_cpu_window.map_or("?".into(), |c| format!("{c:.0}"))
        ),
    ];
    if online != n {
        lines.push(format!(
            "  PROBLEM: only {online} of {n} still online at the end"
        ));
    }
    lines.extend(trouble.line());
    let status = if online == n && trouble.is_clean() {
        "ok"
    } else {
        "degraded"
    };
    let json = json!({
        "connections": n,
        "status": status,
        "server_flags": if spawned { json!(flags) } else { Value::Null },
        "login": login.json(),
        "largest_list_response_bytes": list_bytes,
        "vm_rss_kb_before": before.map(|s| s.vm_rss_kb),
        "vm_rss_kb_after": after.map(|s| s.vm_rss_kb),
        "rss_bytes_per_connection": rss_per_conn.map(round3),
        "vm_rss_kb_after_all_disconnected": gone.map(|s| s.vm_rss_kb),
        "disconnect_processing_s": round3(gone_s),
        "memory_timeline": timeline_json(&timeline),
        "window_s": round3(window_s),
        "voluntary_ctxt_switches": wakeups,
        "wakeups_per_s": wakeups.map(|w| round3(w as f64 / window_s)),
        "nonvoluntary_ctxt_switches": nonvol,
        "server_cpu_ms_window": cpu_window.map(round3),
        "bench_cpu_ms_window": bench_cpu_window.map(round3),
        "bench_vm_rss_kb": bench_rss,
        "bytes_received_in_window": bytes_window,
        "still_online": online,
        "trouble": trouble.json(),
    });
    Ok((json, lines))
}

/// Waits until the server's CPU time stops growing for a second (it has processed every
/// disconnect), at most `limit`; returns its status then and how long that took.
fn wait_cpu_quiet(pid: u32, limit: Duration) -> (Option<stats::ProcStatus>, f64) {
    let t0 = Instant::now();
    let mut last = stats::cpu_ms(pid);
    let mut quiet_since = Instant::now();
    while t0.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(200));
        let now = stats::cpu_ms(pid);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_secs(1) {
            break;
        }
    }
    let waited = quiet_since.duration_since(t0).as_secs_f64();
    (stats::proc_status(pid), waited)
}

fn turn_until(fleet: &mut Fleet, until: Instant, trouble: &mut Trouble) -> Result<(), String> {
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        fleet
            .turn(Some(left.min(Duration::from_millis(500))))
            .map_err(|e| format!("poll: {e}"))?;
        for note in std::mem::take(&mut fleet.notes) {
            trouble.note(fleet, &note);
        }
    }
    Ok(())
}
