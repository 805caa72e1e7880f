//! Write-ahead log throughput with group commit: 1 KiB records appended with a confirm window of
//! 1,000 outstanding, each confirmed only after the fdatasync that covers it (the broker's
//! publisher-confirm path for persistent messages), through io_uring with O_DIRECT.

#[path = "support/mod.rs"]
mod support;

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use shardmq::runtime::log_file::LogWriter;

const WINDOW: u64 = 1000;

fn main() {
    let records: u64 = if support::measuring() { 300_000 } else { 2_000 };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("wal-bench.log");
    let handle = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let log = LogWriter::create(&path).await.expect("create the log");
            let payload = vec![0xA5u8; 1024];
            let confirmed = Rc::new(Cell::new(0u64));
            let started = Instant::now();
            for appended in 0..records {
                log.append_with(|out| {
                    out.extend_from_slice(&payload);
                    1
                });
                let counter = confirmed.clone();
                log.after_sync(move |ok| {
                    assert!(ok, "the log failed");
                    counter.set(counter.get() + 1);
                });
                while appended >= confirmed.get() + WINDOW {
                    glommio::timer::sleep(Duration::from_micros(50)).await;
                }
            }
            while confirmed.get() < records {
                glommio::timer::sleep(Duration::from_micros(50)).await;
            }
            let elapsed = started.elapsed();
            println!(
                "wal append + fdatasync, 1 KiB records, window {WINDOW}: {:>10.0} records/s, {:.0} MiB/s ({records} records in {:.2} s)",
                records as f64 / elapsed.as_secs_f64(),
                (records * 1033) as f64 / elapsed.as_secs_f64() / (1 << 20) as f64,
                elapsed.as_secs_f64()
            );
        })
        .expect("executor");
    handle.join().expect("benchmark ran");
}
