//! Latency histograms (HdrHistogram, microsecond resolution, 3 significant digits) and the
//! per-process counters read from `/proc` (CPU time, resident memory, context switches).

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::time::Duration;

/// One latency distribution. Values are recorded in microseconds (at least 1 µs), up to one
/// hour; anything longer is clamped to one hour and counted in `clamped`.
pub struct Lat {
    hist: Histogram<u64>,
    clamped: u64,
}

const MAX_US: u64 = 3_600_000_000;

impl Default for Lat {
    fn default() -> Self {
        Lat {
            hist: Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"),
            clamped: 0,
        }
    }
}

/// The numbers printed and written for one distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub count: u64,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Lat {
    pub fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        if us > MAX_US {
            self.clamped += 1;
        }
        self.hist
            .record(us.clamp(1, MAX_US))
            .expect("value clamped into the histogram's range");
    }

    pub fn summary(&self) -> Summary {
        if self.hist.is_empty() {
            return Summary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Summary {
            count: self.hist.len(),
            min: ms(self.hist.min()),
            p50: ms(self.hist.value_at_quantile(0.50)),
            p99: ms(self.hist.value_at_quantile(0.99)),
            p999: ms(self.hist.value_at_quantile(0.999)),
            max: ms(self.hist.max()),
            mean: self.hist.mean() / 1000.0,
        }
    }

    /// `{count, min_ms, p50_ms, p99_ms, p999_ms, max_ms, mean_ms}`; the quantiles are `null`
    /// when nothing was recorded.
    pub fn json(&self) -> Value {
        let s = self.summary();
        let v = |x: f64| {
            if s.count == 0 {
                Value::Null
            } else {
                json!(round3(x))
            }
        };
        json!({
            "count": s.count,
            "min_ms": v(s.min),
            "p50_ms": v(s.p50),
            "p99_ms": v(s.p99),
            "p999_ms": v(s.p999),
            "max_ms": v(s.max),
            "mean_ms": v(s.mean),
            "clamped_over_1h": self.clamped,
        })
    }
}

/// Rounds to three decimals (microseconds when the unit is ms) for stable, readable JSON.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ------------------------------------------------------------------ /proc

/// Clock ticks per second for `/proc/PID/stat` times (`getconf CLK_TCK`; 100 if unavailable).
pub fn clk_tck() -> u64 {
    static TCK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// CPU time (user + system) of a process in milliseconds, from `/proc/PID/stat` (resolution:
/// one clock tick, usually 10 ms). `pid` 0 means this process.
pub fn cpu_ms(pid: u32) -> Option<f64> {
    let path = if pid == 0 {
        "/proc/self/stat".to_string()
    } else {
        format!("/proc/{pid}/stat")
    };
    let text = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces: fields after it start past the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 * 1000.0 / clk_tck() as f64)
}

/// The lines of `/proc/PID/status` the benchmark uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStatus {
    pub vm_rss_kb: u64,
    pub voluntary_ctxt_switches: u64,
    pub nonvoluntary_ctxt_switches: u64,
}

pub fn proc_status(pid: u32) -> Option<ProcStatus> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut s = ProcStatus::default();
    let mut seen = 0;
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let number = || value.split_whitespace().next()?.parse::<u64>().ok();
        match name {
            "VmRSS" => s.vm_rss_kb = number()?,
            "voluntary_ctxt_switches" => s.voluntary_ctxt_switches = number()?,
            "nonvoluntary_ctxt_switches" => s.nonvoluntary_ctxt_switches = number()?,
            _ => continue,
        }
        seen += 1;
    }
    (seen == 3).then_some(s)
}

/// CPU time of several processes, each `None` when it cannot be read.
pub fn cpu_all(pids: &[u32]) -> Vec<Option<f64>> {
    pids.iter().map(|&p| cpu_ms(p)).collect()
}

/// The soft limit on open files of this process, from `/proc/self/limits`.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        Some(u64::MAX)
    } else {
        soft.parse().ok()
    }
}
