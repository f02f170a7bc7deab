//! The benchmark works: `socp-bench` with tiny parameters starts its three servers, runs the
//! presence, public, dm and file (20 000 bytes: 45 chunks, two ACKs) scenarios, stops
//! everything, and writes a JSON file whose numbers are sane (every message delivered, max >=
//! p50 > 0). The idle scenario is left out: it needs a thousand connections to say anything.
//!
//! `socp-bench` starts the `socp-server` it finds next to itself, in the workspace's
//! `target/<profile>/`. Plain `cargo test` at the workspace root builds it (the `socp` package's
//! own tests need it); `cargo test -p socp-bench` alone does not, so build it first there
//! (`cargo build --bin socp-server`), or the bench says it has no server binary.

use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `socp-bench` with `args` and `--json` into a directory of its own (`tag`); asserts it
/// succeeded within `limit`; returns its standard output and the results file.
fn run_bench(tag: &str, args: &[&str], limit: Duration) -> (String, Value) {
    let dir = std::env::temp_dir().join(format!("socp-bench-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("results.json");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_socp-bench"))
        .args(args)
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("run socp-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "socp-bench failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(started.elapsed() < limit, "took {:?}", started.elapsed());
    let text = std::fs::read_to_string(&json_path).expect("results file written");
    let _ = std::fs::remove_dir_all(&dir);
    (stdout, serde_json::from_str(&text).expect("valid JSON"))
}

#[test]
fn bench_runs_tiny_scenarios_and_writes_sane_json() {
    let (stdout, v) = run_bench(
        "smoke",
        &[
            "--clients",
            "6",
            "--repeat",
            "2",
            "--rate",
            "20",
            "--duration",
            "2",
            "--scenario",
            "presence,public,dm,file",
            "--file-size",
            "20000",
            "--timeout",
            "20",
            "--id-prefix",
            "smoke",
        ],
        Duration::from_secs(60),
    );
    assert!(stdout.contains("== socp-bench results =="), "{stdout}");

    assert_eq!(v["schema"], "socp-bench/1");
    assert!(v["command_line"].as_array().is_some_and(|a| a.len() > 1));
    assert!(v["machine"]["nproc"].as_u64().is_some_and(|n| n >= 1));
    assert_eq!(v["parameters"]["clients"], 6);
    assert_eq!(v["scenarios"]["idle"]["status"], "not_run");
    let floor = &v["crypto_floor"];
    for op in ["pss_sign_salt32", "pss_verify_salt32"] {
        sane(&format!("crypto_floor.{op}"), &floor[op], 200);
    }

    let presence = &v["scenarios"]["presence"];
    assert_eq!(presence["status"], "ok", "{presence:#}");
    for h in ["first", "last", "hello"] {
        sane(&format!("presence.{h}"), &presence["latency_ms"][h], 2);
    }
    sane("presence.each", &presence["latency_ms"]["each"], 2 * 6);

    let public = &v["scenarios"]["public"];
    assert_eq!(public["status"], "ok", "{public:#}");
    for h in ["first", "last", "production"] {
        sane(&format!("public.{h}"), &public["latency_ms"][h], 2);
    }
    assert_eq!(public["deliveries"], 2 * 5);
    assert_eq!(public["lost"], 0);

    let dm = &v["scenarios"]["dm"];
    assert_eq!(dm["status"], "ok", "{dm:#}");
    assert_eq!(dm["cross_server"], true);
    assert_eq!(dm["sent"], 40);
    assert_eq!(dm["delivered"], 40);
    sane("dm.delivery", &dm["latency_ms"]["delivery"], 40);

    let file = &v["scenarios"]["file"];
    assert_eq!(file["status"], "ok", "{file:#}");
    assert_eq!(file["chunks"], 45);
    assert_eq!(file["acks"], 2);
    assert_eq!(file["verified"]["chunks"], 45);
    assert_eq!(file["verified"]["sha256_ok"], true);
    assert!(
        file["payload_mb_per_s"].as_f64().is_some_and(|x| x > 0.0),
        "{file:#}"
    );
    assert!(
        file["fraction_of_signing_limit"]
            .as_f64()
            .is_some_and(|x| x > 0.0),
        "{file:#}"
    );
    for s in ["presence", "public", "dm"] {
        let checked = &v["scenarios"][s]["verified_samples"];
        assert!(checked["checked"].as_u64().unwrap() > 0, "{s}: {checked}");
        assert_eq!(checked["ok"], checked["checked"], "{s}: {checked}");
    }
}

/// The storm scenario at small scale: 30 clients log in at once and leave at once on one server
/// while two probe users exchange DMs; every number the lead reads is there and sane.
/// `--sign-threads` only reaches the server's environment (`SOCP_SIGN_THREADS`): a server that
/// does not know it must still start.
#[test]
fn bench_runs_a_small_storm_and_reports_every_phase() {
    let (stdout, v) = run_bench(
        "storm",
        &[
            "--servers",
            "1",
            "--clients",
            "2",
            "--scenario",
            "storm",
            "--storm-users",
            "30",
            "--probe-rate",
            "40",
            "--probe-idle",
            "1",
            "--sign-threads",
            "2",
            "--timeout",
            "20",
            "--id-prefix",
            "smokestorm",
        ],
        Duration::from_secs(90),
    );
    assert!(
        stdout.contains("probe p99 during the login storm"),
        "{stdout}"
    );
    assert_eq!(v["parameters"]["storm_users"], 30);
    assert_eq!(v["parameters"]["sign_threads"], 2);
    assert_eq!(v["scenarios"]["dm"]["status"], "not_run");

    let storm = &v["scenarios"]["storm"];
    assert_eq!(storm["status"], "ok", "{storm:#}");
    assert_eq!(storm["lost"], 0, "{storm:#}");
    assert_eq!(storm["storm_users"], 30);
    // The probe: 1 s of idle at 40/s, then as long as each burst's work lasts. The message
    // due at the burst's scheduled time is idle when the burst is written after it (the probe
    // runs on its own thread), so 40 or 41.
    let probe = &storm["probe"];
    for phase in ["idle", "idle_storm_online"] {
        let h = &probe[phase]["latency_ms"];
        let n = h["count"].as_u64().unwrap();
        assert!((40..=41).contains(&n), "{phase}: {h}");
        sane(&format!("storm.probe.{phase}"), h, n);
    }
    for phase in ["idle", "login_storm", "idle_storm_online", "mass_leave"] {
        let p = &probe[phase];
        assert_eq!(p["delivered"], p["sent"], "{phase}: {p}");
        assert_eq!(p["lost"], 0, "{phase}: {p}");
        let cpu = &p["cpu"];
        assert!(
            cpu["server_cpu_ms_total"].as_f64().is_some(),
            "{phase}: {cpu}"
        );
        assert!(cpu["bench_cpu_ms"].as_f64().is_some(), "{phase}: {cpu}");
    }
    // A burst's phase holds the messages scheduled while it lasted: possibly none when it
    // is quicker than one probe interval, so only counted when there are some.
    for phase in ["login_storm", "mass_leave"] {
        let h = &probe[phase]["latency_ms"];
        let n = h["count"].as_u64().unwrap();
        if n > 0 {
            sane(&format!("storm.probe.{phase}"), h, n);
        }
    }
    let ratio = &probe["p99_over_idle_login_storm"];
    assert!(
        ratio.is_null() || ratio.as_f64().is_some_and(|r| r > 0.0),
        "{probe:#}"
    );
    // Every storm client acknowledged, listed and given its snapshot, in that order.
    let login = &storm["login"];
    for k in ["hello_ack", "list_response", "snapshot"] {
        sane(&format!("storm.login.{k}"), &login["latency_ms"][k], 30);
    }
    let s = |v: &Value, k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing: {v:#}"))
    };
    let (acked, listed, ready) = (
        s(login, "hellos_complete_s"),
        s(login, "lists_complete_s"),
        s(login, "snapshots_complete_s"),
    );
    assert!(
        0.0 < acked && acked <= listed && listed <= ready,
        "{login:#}"
    );
    assert!(s(login, "probe_adverts_complete_s") > 0.0, "{login:#}");
    assert_eq!(login["bench_signing"]["signatures"], 30, "{login:#}");
    // Every storm user's removal reached both probe users; the server closed every connection.
    let leave = &storm["leave"];
    assert!(s(leave, "probe_removes_complete_s") > 0.0, "{leave:#}");
    assert!(s(leave, "connections_closed_s") > 0.0, "{leave:#}");
    sane("storm.leave.closed", &leave["latency_ms"]["closed"], 30);
    let checked = &storm["verified_samples"];
    assert!(checked["checked"].as_u64().unwrap() > 0, "{checked}");
    assert_eq!(checked["ok"], checked["checked"], "{checked}");
}

/// `count` values, and `max >= p99 >= p50 > 0`.
fn sane(what: &str, h: &Value, count: u64) {
    assert_eq!(h["count"].as_u64(), Some(count), "{what}: {h}");
    let f = |k: &str| {
        h[k].as_f64()
            .unwrap_or_else(|| panic!("{what}.{k} missing: {h}"))
    };
    assert!(f("p50_ms") > 0.0, "{what}: {h}");
    assert!(f("max_ms") >= f("p99_ms"), "{what}: {h}");
    assert!(f("p99_ms") >= f("p50_ms"), "{what}: {h}");
    assert!(f("max_ms") < 60_000.0, "{what}: {h}");
}
