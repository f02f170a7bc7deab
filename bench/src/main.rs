//! `socp-bench`: a fan-out latency benchmark for `socp-server` (issue 5). Run
//! `cargo run --release --bin socp-bench -- --help` for the options.
//!
//! It is its own crate in the workspace (`bench/`), depending on the `socp` library by path, so
//! the shipped `socp-server` and `socp` carry none of its code, its `hdrhistogram` or the
//! TEST-ONLY keys of [`keys`].
//!
//! Layout:
//!
//! | module | what |
//! |---|---|
//! | [`opts`] | command line, every parameter |
//! | [`procs`] | starting M pinned servers on loopback, killing them on drop or signal |
//! | [`fleet`] | N lightweight WebSocket clients on ONE `mio` event loop |
//! | [`common`] | logins, directory convergence, CPU meters, errors, sample verification |
//! | [`presence`], [`public`], [`dm`], [`idle`], [`file`](mod@file), [`storm`] | the six scenarios |
//! | [`stats`] | HdrHistogram latencies and `/proc` counters |
//! | [`keys`] | the TEST-ONLY key pool of the clients |
//!
//! Honesty rules the code keeps: every latency counts from a **scheduled** time (open loop: a
//! slow server cannot slow the sender down and hide its own latency); a sender behind schedule
//! is reported as lag; lost messages are counted, never dropped from view; what could not be
//! measured is said so in the output (and is `null` in the JSON).

mod common;
mod compare;
mod dm;
mod file;
mod fleet;
mod idle;
mod keys;
mod opts;
mod presence;
mod procs;
mod public;
mod stats;
mod storm;

use common::{Mesh, Outcome, Trouble};
use fleet::{Fleet, ServerEnd, wall_ms};
use opts::{Opts, Parsed};
use serde_json::{Value, json};
use stats::{Lat, round3};
use std::ffi::OsString;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let opts = match opts::parse(args.iter().skip(1).cloned()) {
        Ok(Parsed::Run(o)) => o,
        Ok(Parsed::Help) => {
            print!("{}", opts::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Compare(before, after)) => {
            return match compare::run(&before, &after) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("socp-bench: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Err(e) => {
            eprintln!("socp-bench: {e}\nTry 'socp-bench --help'.");
            return ExitCode::from(2);
        }
    };
    procs::install_signal_cleanup();
    for &pid in &opts.pids {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "socp-server" {
            eprintln!(
                "socp-bench: WARNING: --pid {pid} is {:?}, not socp-server: its CPU and memory \
                 figures will not be the server's",
                comm.trim()
            );
        }
    }
    let command_line: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match run(&opts, command_line) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("socp-bench: some scenarios failed (see above and the JSON file)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("socp-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs everything; `Ok(false)` when a scenario failed (the results are still written).
fn run(opts: &Opts, command_line: Vec<String>) -> Result<bool, String> {
    let started_ms = wall_ms();
    if cfg!(debug_assertions) {
        eprintln!(
            "socp-bench: WARNING: this is a debug build; numbers from it are not comparable \
             (use cargo run --release)"
        );
    }
    let machine = machine_info();
    let git = git_info();

    eprintln!("crypto floor: timing 200 RSA-4096 operations of each kind ...");
    let floor = crypto_floor(200);
    let sign_ms = floor.sign.summary().mean;
    let encrypt_ms = floor.encrypt.summary().mean;
    // Issue 5's DM target: p50 under 2 signatures + 1 verification + 1 ms (typical costs).
    let dm_floor_ms = [
        2.0 * floor.sign.summary().p50 + floor.verify.summary().p50,
        2.0 * floor.sign_all_cpus.summary().p50 + floor.verify.summary().p50,
    ];

    let server_bin = match &opts.server_bin {
        Some(p) => p.clone(),
        None => server_bin_next_to_me()?,
    };
    let spawning = opts.connect.is_empty();
    if spawning && !server_bin.is_file() {
        return Err(format!(
            "no server binary at {} (build it: cargo build --release --bin socp-server, or \
             give --server-bin)",
            server_bin.display()
        ));
    }

    let server_binary = if spawning {
        server_binary_info(&server_bin)
    } else {
        Value::Null
    };
    if server_binary["older_than_sources"] == true {
        eprintln!(
            "socp-bench: WARNING: {} is older than the server's sources: you would measure an \
             old build. Run `cargo build --release` first.",
            server_bin.display()
        );
    }

    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut servers_json = Value::Null;
    let mut setup_json = Value::Null;
    let mut failed = false;

    if opts.scenarios.mesh() {
        match mesh_scenarios(opts, &server_bin, sign_ms, encrypt_ms, dm_floor_ms) {
            Ok((servers, setup, mut outs)) => {
                servers_json = servers;
                setup_json = setup;
                failed |= outs.iter().any(|o| o.json["status"] == "failed");
                outcomes.append(&mut outs);
            }
            Err(e) => {
                eprintln!("socp-bench: mesh setup failed: {e}");
                failed = true;
                setup_json = json!({"status": "failed", "note": e});
            }
        }
    }
    if opts.scenarios.idle {
        let target = if spawning {
            idle::Target::Spawn { bin: &server_bin }
        } else {
            idle::Target::Connect {
                url: &opts.connect[0],
                pid: opts.pids.first().copied(),
            }
        };
        let out = idle::run(opts, &target);
        failed |= out.json["sizes"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x["status"] == "failed"));
        outcomes.push(out);
    }

    let mut scenarios = serde_json::Map::new();
    for name in ["presence", "public", "dm", "idle", "file", "storm"] {
        let v = outcomes
            .iter()
            .find(|o| o.name == name)
            .map_or_else(|| json!({"status": "not_run"}), |o| o.json.clone());
        scenarios.insert(name.into(), v);
    }
    let results = json!({
        "schema": "socp-bench/1",
        "command_line": command_line,
        "started_unix_ms": started_ms,
        "finished_unix_ms": wall_ms(),
        "git": git,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "machine": machine,
        "parameters": opts.json(),
        "servers": servers_json,
        "server_binary": server_binary,
        "setup": setup_json,
        "crypto_floor": floor.json(),
        "scenarios": scenarios,
    });
    let text = serde_json::to_string_pretty(&results).expect("JSON values serialise");
    std::fs::write(&opts.json, text + "\n")
        .map_err(|e| format!("cannot write {}: {e}", opts.json.display()))?;

    print_report(opts, &results, &floor, &outcomes);
    println!("results written to {}", opts.json.display());
    Ok(!failed)
}

type MeshResult = (Value, Value, Vec<Outcome>);

/// Starts (or connects to) the servers, logs in the steady clients, runs presence, public and dm.
fn mesh_scenarios(
    opts: &Opts,
    server_bin: &std::path::Path,
    sign_ms: f64,
    encrypt_ms: f64,
    dm_floor_ms: [f64; 2],
) -> Result<MeshResult, String> {
    let n = opts.clients;
    let timeout = Duration::from_secs_f64(opts.timeout_s);
    // Large enough for n users' connections (plus the storm's) and for a LIST_RESPONSE of all
    // of them (~1 KB each).
    let all = n + if opts.scenarios.storm {
        opts.storm_users
    } else {
        0
    };
    let mut flags = vec![
        "--max-connections".to_string(),
        (4096).max(2 * all + 256).to_string(),
        "--max-write-buffer".to_string(),
        (32usize << 20).max(all * 2048 + (1 << 20)).to_string(),
    ];
    if opts.scenarios.storm {
        // The storm's connections wait, open and silent, while the probe precomputes and runs
        // its idle phase: longer than the default 30 s hello timeout on a slow run.
        flags.extend([
            "--hello-timeout-ms".to_string(),
            (((120.0 + 2.0 * opts.timeout_s + opts.probe_idle_s) * 1000.0).round() as u64)
                .to_string(),
        ]);
    }
    let mut set = None;
    let (urls, pids, links_s) = if opts.connect.is_empty() {
        eprintln!("starting {} servers ...", opts.servers);
        let spawn = procs::Spawn {
            bin: server_bin,
            extra: flags.clone(),
            mesh: true,
            log_level: &opts.server_log,
            tag: "mesh",
            env: opts.server_env(),
        };
        let mut s = procs::start(&spawn, opts.servers)?;
        s.keep = opts.keep_logs;
        if opts.keep_logs {
            for srv in &s.servers {
                eprintln!("  {} logs to {}", srv.server_id, srv.log_path().display());
            }
        }
        let links = procs::wait_links(&s, timeout)?;
        let urls: Vec<String> = s.servers.iter().map(|x| x.url()).collect();
        let pids: Vec<u32> = s.servers.iter().map(|x| x.pid).collect();
        set = Some(s);
        (urls, pids, Some(links.as_secs_f64()))
    } else {
        (opts.connect.clone(), opts.pids.clone(), None)
    };
    let servers_json = json!({
        "mode": if set.is_some() { "spawned" } else { "connect" },
        "urls": urls,
        "pids": pids,
        "flags": if set.is_some() { json!(flags) } else { Value::Null },
        "links_up_s": links_s.map(round3),
    });
    let ends = urls
        .iter()
        .map(|u| {
            let addr = u
                .trim_start_matches("ws://")
                .trim_end_matches('/')
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| format!("cannot resolve {u}"))?;
            Ok(ServerEnd {
                url: u.clone(),
                addr,
                server_id: None,
                key: None,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let m_servers = ends.len();
    let mut fleet = Fleet::new(ends, 4 << 10).map_err(|e| e.to_string())?;
    fleet.peer_sig = opts.peer_sig;
    let steady: Vec<usize> = (0..n)
        .map(|i| fleet.add_client(format!("{}-u{i}", opts.id_prefix), i % m_servers, true))
        .collect();
    eprintln!("logging in {n} clients over {m_servers} servers ...");
    let login_timeout = timeout.max(Duration::from_millis(50 * n as u64));
    let login = common::login_all(
        &mut fleet,
        &pids,
        &steady,
        32,
        login_timeout,
        "setup",
        &mut |_| Ok(()),
    )?;
    let converge_s = common::wait_converged(&mut fleet, &steady, login_timeout)?;
    eprintln!(
        "  {}; every client sees all {n} after {converge_s:.2} s more",
        login.slope_line()
    );
    let setup_json = json!({
        "status": "ok",
        "login": login.json(),
        "converged_after_s": round3(converge_s),
        "largest_list_response_bytes": fleet.max_list_bytes,
    });
    let mut mesh = Mesh {
        opts,
        fleet,
        pids,
        steady,
        sign_ms,
        encrypt_ms,
        dm_floor_ms,
    };
    let mut outs = Vec::new();
    type Scenario = fn(&mut Mesh) -> Result<Outcome, String>;
    let list: [(bool, &'static str, Scenario); 5] = [
        (opts.scenarios.presence, "presence", presence::run),
        (opts.scenarios.public, "public", public::run),
        (opts.scenarios.dm, "dm", dm::run),
        (opts.scenarios.file, "file", file::run),
        (opts.scenarios.storm, "storm", storm::run),
    ];
    for (on, name, scenario) in list {
        if !on {
            continue;
        }
        eprintln!("[{name}] running ...");
        let mut trouble = Trouble::default();
        mesh.quiesce(Duration::from_millis(500), &mut trouble)?;
        let started = Instant::now();
        let out = scenario(&mut mesh).unwrap_or_else(|e| {
            eprintln!("[{name}] FAILED: {e}");
            Outcome {
                name,
                json: json!({"status": "failed", "note": e}),
                rows: Vec::new(),
                lines: vec![format!("FAILED: {e}")],
            }
        });
        eprintln!("[{name}] done in {:.1} s", started.elapsed().as_secs_f64());
        outs.push(out);
    }
    mesh.fleet.drop_all();
    drop(mesh);
    drop(set); // stops the servers
    Ok((servers_json, setup_json, outs))
}

fn server_bin_next_to_me() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dir = me.parent().ok_or("the executable has no directory")?;
    // `cargo test` runs binaries from target/<profile>/; tests of other crates may run from
    // target/<profile>/deps/: look one level up as well.
    let here = dir.join("socp-server");
    if here.is_file() {
        return Ok(here);
    }
    let up = dir.parent().map(|d| d.join("socp-server"));
    Ok(up.filter(|p| p.is_file()).unwrap_or(here))
}

/// Path, modification time, and whether the server binary is older than the newest source file
/// of the crate it is built from (`cargo run --bin socp-bench` does not rebuild `socp-server`).
fn server_binary_info(bin: &std::path::Path) -> Value {
    fn newest(dir: &std::path::Path, depth: u32) -> Option<std::time::SystemTime> {
        let mut best = None;
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            let t = if path.is_dir() && depth > 0 {
                newest(&path, depth - 1)
            } else {
                entry.metadata().ok()?.modified().ok()
            };
            best = best.max(t);
        }
        best
    }
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .ok()
    };
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    // The workspace root: the server is built from the `socp` crate's `src/` and the shared
    // Cargo.lock; this crate (`bench/`, the bench's own sources) is outside that `src/`.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sources = newest(&root.join("src"), 3).max(
        std::fs::metadata(root.join("Cargo.lock"))
            .and_then(|m| m.modified())
            .ok(),
    );
    json!({
        "path": bin.display().to_string(),
        "modified_unix_s": built.and_then(unix),
        "newest_source_unix_s": sources.and_then(unix),
        "older_than_sources": match (built, sources) {
            (Some(b), Some(s)) => json!(b < s),
            _ => Value::Null,
        },
    })
}

// ------------------------------------------------------------------ crypto floor

struct Floor {
    ops: usize,
    sign: Lat,
    /// Signatures timed while every CPU signs at once (one thread per CPU): what a signature
    /// costs when servers and clients keep all cores busy, as under load in the scenarios.
    sign_all_cpus: Lat,
    cpus: usize,
    verify: Lat,
    encrypt: Lat,
    decrypt: Lat,
}

impl Floor {
    fn json(&self) -> Value {
        json!({
            "ops": self.ops,
            "key": "RSA-4096 (TEST-ONLY fixture key)",
            "pss_sign_salt32": self.sign.json(),
            "pss_sign_salt32_all_cpus_busy": self.sign_all_cpus.json(),
            "cpus": self.cpus,
            "pss_verify_salt32": self.verify.json(),
            "oaep_encrypt": self.encrypt.json(),
            "oaep_decrypt": self.decrypt.json(),
        })
    }
}

/// Times `ops` of each RSA-4096 operation with `socp::crypto`, one at a time.
fn crypto_floor(ops: usize) -> Floor {
    let key = &keys::pool()[0];
    let public = key.public_key();
    let msg = br#"{"nonce":"q7bK0l7m2c6WfN5yT1dS4a8xJ3eR9uV0hG2iL5oP6sA","server_id":"srv","user_id":"u"}"#;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut f = Floor {
        ops,
        sign: Lat::default(),
        sign_all_cpus: Lat::default(),
        cpus,
        verify: Lat::default(),
        encrypt: Lat::default(),
        decrypt: Lat::default(),
    };
    let sig = key.sign(msg);
    let ct = public.encrypt(b"socp-bench crypto floor").expect("encrypt");
    for _ in 0..ops {
        let t = Instant::now();
        std::hint::black_box(key.sign(std::hint::black_box(msg)));
        f.sign.record(t.elapsed());
        let t = Instant::now();
        assert!(public.verify(std::hint::black_box(msg), &sig));
        f.verify.record(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(public.encrypt(b"socp-bench crypto floor").expect("encrypt"));
        f.encrypt.record(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(key.decrypt(&ct).expect("decrypt"));
        f.decrypt.record(t.elapsed());
    }
    let per_thread = ops.div_ceil(cpus);
    let threads: Vec<_> = (0..cpus)
        .map(|_| {
            let key = std::sync::Arc::clone(key);
            std::thread::spawn(move || {
                let mut times = Vec::with_capacity(per_thread);
                for _ in 0..per_thread {
                    let t = Instant::now();
                    std::hint::black_box(key.sign(std::hint::black_box(msg)));
                    times.push(t.elapsed());
                }
                times
            })
        })
        .collect();
    for t in threads {
        for d in t.join().expect("a signing thread") {
            f.sign_all_cpus.record(d);
        }
    }
    f
}

// ------------------------------------------------------------------ machine and git

fn machine_info() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let mem_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string());
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_model": model,
        "mem_total_kb": mem_kb,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "kernel": kernel,
        "open_files_limit": stats::open_files_limit(),
        "clk_tck": stats::clk_tck(),
    })
}

fn git_info() -> Value {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "HEAD"]);
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    json!({"commit": commit, "dirty": dirty})
}

// ------------------------------------------------------------------ the table

fn print_report(opts: &Opts, results: &Value, floor: &Floor, outcomes: &[Outcome]) {
    let m = &results["machine"];
    let g = &results["git"];
    println!();
    println!("== socp-bench results ==");
    println!(
        "commit {}{}, {} build, {} CPUs ({}), {}",
        g["commit"]
            .as_str()
            .map_or("unknown", |c| &c[..c.len().min(12)]),
        if g["dirty"] == true {
            " + uncommitted changes"
        } else {
            ""
        },
        results["build"].as_str().unwrap_or("?"),
        m["nproc"],
        m["cpu_model"].as_str().unwrap_or("unknown CPU"),
        if opts.connect.is_empty() {
            format!("{} servers started on loopback", opts.servers)
        } else {
            format!("{} running servers", opts.connect.len())
        }
    );
    let (s, v, e, d) = (
        floor.sign.summary(),
        floor.verify.summary(),
        floor.encrypt.summary(),
        floor.decrypt.summary(),
    );
    println!(
        "crypto floor ({} of each, one thread): RSA-4096 PSS sign p50 {:.3} ms (mean {:.3}), \
         verify p50 {:.3} ms (mean {:.3}); OAEP encrypt p50 {:.3} ms, decrypt p50 {:.3} ms; \
         sign p50 {:.3} ms with all {} CPUs signing at once",
        floor.ops,
        s.p50,
        s.mean,
        v.p50,
        v.mean,
        e.p50,
        d.p50,
        floor.sign_all_cpus.summary().p50,
        floor.cpus
    );
    let setup = &results["setup"];
    if let Some(login) = setup.get("login") {
        println!(
            "setup: {} clients logged in over {:.1} s ({:.0}/s); directories converged {:.2} s \
             later",
            login["clients"],
            login["seconds"].as_f64().unwrap_or(0.0),
            login["logins_per_s"].as_f64().unwrap_or(0.0),
            setup["converged_after_s"].as_f64().unwrap_or(0.0)
        );
    } else if setup["status"] == "failed" {
        println!("setup FAILED: {}", setup["note"]);
    }
    println!();
    println!(
        "{:<9} {:<28} {:>7} {:>9} {:>9} {:>9} {:>9}   (ms)",
        "scenario", "latency", "count", "p50", "p99", "p99.9", "max"
    );
    for o in outcomes {
        for (metric, s) in &o.rows {
            if s.count == 0 {
                println!(
                    "{:<9} {:<28} {:>7} {:>9} {:>9} {:>9} {:>9}",
                    o.name, metric, 0, "-", "-", "-", "-"
                );
            } else {
                println!(
                    "{:<9} {:<28} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                    o.name, metric, s.count, s.p50, s.p99, s.p999, s.max
                );
            }
        }
    }
    for o in outcomes {
        println!();
        println!("{}:", o.name);
        for line in &o.lines {
            println!("  {line}");
        }
    }
    println!();
}
