//! `socp-bench`: fan-out latency benchmark for `socp-server` (issue 5). Run
//! `cargo run --release --bin socp-bench -- --help` for the options; the code lives in
//! `src/bench/` (compiled into this binary only, not into the `socp` library).

#[path = "../bench/mod.rs"]
mod bench;

fn main() -> std::process::ExitCode {
    bench::main()
}
