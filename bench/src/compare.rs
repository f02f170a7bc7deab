//! `socp-bench --compare BEFORE.json AFTER.json`: the numbers that say whether a change made
//! the server faster or slower, from two result files side by side (issue 5: "the benchmark's
//! JSON output from before and after a change can be compared").
//!
//! Every latency quantile, throughput, CPU and memory figure present in both files is listed
//! with its ratio after/before; a change of more than 10 % in the bad direction is marked `!`
//! (lower is better for latency, CPU, memory and losses; higher for rates). The machine is
//! noisy: read single runs with care, and the crypto floor of each run (listed first) says how
//! fast this machine was at the time.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Which way is better for a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Lower,
    Higher,
    /// Context only (the crypto floor: how fast the machine was).
    Neither,
}

/// The metric a path names, judged by its last component.
fn judge(path: &str) -> Option<Better> {
    let last = path.rsplit('/').next().unwrap_or("");
    if path.starts_with("/crypto_floor/") {
        return matches!(last, "p50_ms" | "p99_ms").then_some(Better::Neither);
    }
    if !path.starts_with("/scenarios/")
        || path.contains("/progress/")
        || path.contains("/memory_timeline/")
        || path.contains("/verified_samples/")
        || path.contains("/parameters/")
    {
        return None;
    }
    match last {
        "p50_ms"
        | "p99_ms"
        | "p999_ms"
        | "max_ms"
        | "rss_bytes_per_connection"
        | "server_cpu_ms_total"
        | "transfer_s"
        | "wakeups_per_s"
        | "lost"
        | "adverts"
        | "removes"
        // storm: completion times from the burst, and the probe's p99 over its idle p99
        | "hellos_complete_s"
        | "lists_complete_s"
        | "snapshots_complete_s"
        | "probe_adverts_complete_s"
        | "probe_removes_complete_s"
        | "connections_closed_s"
        | "p99_over_idle_login_storm"
        | "p99_over_idle_mass_leave"
        | "p99_over_idle_storm_online_mass_leave" => Some(Better::Lower),
        "max_rate_per_s"
        | "max_rate_p99_within_2x_first_per_s"
        | "deliveries_per_s"
        | "delivered_per_s"
        | "payload_mb_per_s"
        | "chunks_per_s"
        | "fraction_of_signing_limit"
        | "logins_per_s" => Some(Better::Higher),
        _ => None,
    }
}

/// Numeric leaves of `v` by path. Array elements are named by their `connections` or
/// `rate_per_s` when they have one (idle sizes, ramp steps), so runs with different lists
/// still line up; otherwise by position.
fn flatten(v: &Value, path: String, out: &mut BTreeMap<String, f64>) {
    match v {
        Value::Object(map) => {
            for (k, x) in map {
                flatten(x, format!("{path}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                let label = ["connections", "rate_per_s"]
                    .iter()
                    .find_map(|k| x.get(*k).and_then(Value::as_f64))
                    .map_or_else(|| i.to_string(), |n| format!("{}", n.round()));
                flatten(x, format!("{path}/{label}"), out);
            }
        }
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.insert(path, x);
            }
        }
        _ => {}
    }
}

fn load(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not a results file: {e}", path.display()))
}

fn describe(v: &Value) -> String {
    let commit = v["git"]["commit"].as_str().unwrap_or("?");
    let dirty = if v["git"]["dirty"] == true {
        "+dirty"
    } else {
        ""
    };
    let short = commit.get(..12).unwrap_or(commit);
    format!(
        "commit {short}{dirty}, {}",
        v["command_line"].as_array().map_or(String::new(), |a| {
            a.iter()
                .skip(1)
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
    )
}

/// The comparison as lines of text.
pub fn report(before: &Value, after: &Value) -> Vec<String> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten(before, String::new(), &mut a);
    flatten(after, String::new(), &mut b);
    let mut lines = vec![
        format!("before: {}", describe(before)),
        format!("after:  {}", describe(after)),
        String::new(),
        format!(
            "{:<70} {:>11} {:>11} {:>7}",
            "metric", "before", "after", "ratio"
        ),
    ];
    let mut worse = 0;
    let mut shared = 0;
    for (path, &x) in &a {
        let (Some(better), Some(&y)) = (judge(path), b.get(path)) else {
            continue;
        };
        shared += 1;
        let ratio = if x != 0.0 {
            y / x
        } else if y == 0.0 {
            1.0
        } else {
            f64::INFINITY
        };
        let bad = match better {
            Better::Lower => ratio > 1.1,
            Better::Higher => ratio < 1.0 / 1.1,
            Better::Neither => false,
        };
        worse += usize::from(bad);
        lines.push(format!(
            "{:<70} {:>11.3} {:>11.3} {:>6.2}x{}",
            path,
            x,
            y,
            ratio,
            if bad { " !" } else { "" }
        ));
    }
    let only = |m: &BTreeMap<String, f64>, other: &BTreeMap<String, f64>| {
        m.keys()
            .filter(|p| judge(p).is_some() && !other.contains_key(*p))
            .count()
    };
    lines.push(String::new());
    lines.push(format!(
        "{shared} metrics in both files, {worse} worse by more than 10 % (marked !); \
         {} only before, {} only after",
        only(&a, &b),
        only(&b, &a)
    ));
    lines
}

pub fn run(before: &Path, after: &Path) -> Result<(), String> {
    for line in report(&load(before)?, &load(after)?) {
        println!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_up_metrics_by_name_and_marks_regressions() {
        let before = json!({
            "git": {"commit": "aaaaaaaaaaaaaaaa", "dirty": false},
            "command_line": ["socp-bench", "--scenario", "dm"],
            "crypto_floor": {"pss_sign_salt32": {"p50_ms": 1.5, "count": 200}},
            "scenarios": {
                "dm": {"latency_ms": {"delivery": {"p50_ms": 4.0, "p99_ms": 10.0, "count": 9}},
                       "ramp": {"max_rate_per_s": 400.0,
                                "steps": [{"rate_per_s": 200.0, "lost": 0}]}},
                "idle": {"sizes": [{"connections": 1000, "rss_bytes_per_connection": 15000.0}]},
            },
        });
        let after = json!({
            "git": {"commit": "bbbbbbbbbbbbbbbb", "dirty": true},
            "command_line": ["socp-bench"],
            "crypto_floor": {"pss_sign_salt32": {"p50_ms": 2.0, "count": 200}},
            "scenarios": {
                "dm": {"latency_ms": {"delivery": {"p50_ms": 4.2, "p99_ms": 12.0, "count": 9}},
                       "ramp": {"max_rate_per_s": 300.0,
                                "steps": [{"rate_per_s": 200.0, "lost": 0}]}},
                "idle": {"sizes": [{"connections": 3000, "rss_bytes_per_connection": 1.0},
                                   {"connections": 1000, "rss_bytes_per_connection": 14000.0}]},
            },
        });
        let lines = report(&before, &after);
        let line = |p: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(&format!("{p} ")))
                .unwrap_or_else(|| panic!("no line for {p}: {lines:#?}"))
                .clone()
        };
        assert!(lines[0].contains("aaaaaaaaaaaa,"), "{}", lines[0]);
        assert!(lines[1].contains("bbbbbbbbbbbb+dirty"), "{}", lines[1]);
        // 5 % slower: listed, not marked; 20 % slower: marked; fewer messages per second: marked.
        assert!(!line("/scenarios/dm/latency_ms/delivery/p50_ms").ends_with('!'));
        assert!(line("/scenarios/dm/latency_ms/delivery/p99_ms").ends_with("1.20x !"));
        assert!(line("/scenarios/dm/ramp/max_rate_per_s").ends_with('!'));
        // Idle sizes line up by connection count, not position; less memory is not a regression.
        assert!(!line("/scenarios/idle/sizes/1000/rss_bytes_per_connection").ends_with('!'));
        assert!(line("/scenarios/dm/ramp/steps/200/lost").ends_with("1.00x"));
        // The floor is context: never marked. Counts are not metrics.
        assert!(!line("/crypto_floor/pss_sign_salt32/p50_ms").ends_with('!'));
        assert!(!lines.iter().any(|l| l.contains("/count ")));
        let summary = lines.last().unwrap();
        assert!(
            summary.starts_with("6 metrics in both files, 2 worse"),
            "{summary}"
        );
        assert!(
            summary.ends_with("0 only before, 1 only after"),
            "{summary}"
        );
    }

    #[test]
    fn storm_numbers_are_lower_is_better_and_its_context_is_not_compared() {
        let storm = |hello_s: f64, ratio: f64, p99: f64| {
            json!({
                "git": {"commit": "cccccccccccccccc", "dirty": false},
                "command_line": ["socp-bench", "--scenario", "storm"],
                "scenarios": {"storm": {
                    "storm_users": 1000,
                    "probe_rate_per_s": 20.0,
                    "probe": {
                        "login_storm": {"latency_ms": {"p99_ms": p99, "count": 40}, "sent": 40},
                        "p99_over_idle_login_storm": ratio,
                        "target_ratio": 3.0,
                    },
                    "login": {"hellos_complete_s": hello_s, "burst_write_ms": 2.0},
                }},
            })
        };
        let lines = report(&storm(10.0, 4.0, 80.0), &storm(5.0, 2.0, 100.0));
        let line = |p: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(&format!("{p} ")))
                .cloned()
        };
        // Faster hellos and a lower ratio are improvements; a higher p99 is marked.
        let hello = line("/scenarios/storm/login/hellos_complete_s").expect("listed");
        assert!(hello.ends_with("0.50x"), "{hello}");
        let ratio = line("/scenarios/storm/probe/p99_over_idle_login_storm").expect("listed");
        assert!(ratio.ends_with("0.50x"), "{ratio}");
        let p99 = line("/scenarios/storm/probe/login_storm/latency_ms/p99_ms").expect("listed");
        assert!(p99.ends_with("1.25x !"), "{p99}");
        // Parameters and constants are not metrics.
        for p in [
            "storm_users",
            "probe_rate_per_s",
            "probe/target_ratio",
            "login/burst_write_ms",
        ] {
            assert!(
                line(&format!("/scenarios/storm/{p}")).is_none(),
                "{p}: {lines:#?}"
            );
        }
    }
}
