//! What the benchmarks share: run a case for about a second (or once as a smoke test when not
//! invoked with `--bench`, as `cargo test --all-targets` does) and print a line.

#![allow(dead_code)] // each benchmark uses part of this

use std::time::{Duration, Instant};

/// Whether the binary runs as a benchmark (`cargo bench`) rather than a smoke test.
pub fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Runs `run` (which performs `ops_per_run` operations) repeatedly for about a second and
/// prints ns per operation; when not measuring, runs it once.
pub fn measure(name: &str, ops_per_run: u64, mut run: impl FnMut()) {
    if !measuring() {
        run();
        return;
    }
    for _ in 0..20 {
        run();
    }
    let started = Instant::now();
    let mut runs = 0u64;
    while started.elapsed() < Duration::from_secs(1) {
        run();
        runs += 1;
    }
    let elapsed = started.elapsed();
    let ops = runs * ops_per_run;
    let ns_per_op = elapsed.as_nanos() as f64 / ops as f64;
    println!(
        "{name:<48} {ns_per_op:>10.1} ns/op {:>12.0} ops/s",
        1e9 / ns_per_op
    );
}
