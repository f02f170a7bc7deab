//! The benchmark works: `socp-bench` with tiny parameters starts its three servers, runs the
//! presence, public, dm and file (20 000 bytes: 45 chunks, two ACKs) scenarios, stops everything, and writes a JSON file whose numbers
//! are sane (every message delivered, max >= p50 > 0). The idle scenario is left out: it needs
//! a thousand connections to say anything.
//!
//! `socp-bench` starts the `socp-server` it finds next to itself, in the workspace's
//! `target/<profile>/`. Plain `cargo test` at the workspace root builds it (the `socp` package's
//! own tests need it); `cargo test -p socp-bench` alone does not, so build it first there
//! (`cargo build --bin socp-server`), or the bench says it has no server binary.

use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn bench_runs_tiny_scenarios_and_writes_sane_json() {
    let dir = std::env::temp_dir().join(format!("socp-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("results.json");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_socp-bench"))
        .args([
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
            "--json",
        ])
        .arg(&json_path)
        .output()
        .expect("run socp-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "socp-bench failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert!(stdout.contains("== socp-bench results =="), "{stdout}");

    let text = std::fs::read_to_string(&json_path).expect("results file written");
    let _ = std::fs::remove_dir_all(&dir);
    let v: Value = serde_json::from_str(&text).expect("valid JSON");
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
