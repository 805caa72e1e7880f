//! Recovery cost: a shard's log holding 1,000,000 persistent 1 KiB messages (and the settle
//! records of a consumer that acked half of them) in 64 MiB segments, read from disk segment by
//! segment, checked, replayed and folded back into queue contents (paged out: where each live
//! message lies, as the broker's start-up does).
//!
//! Target (durability issue): under 5 seconds for 1M messages on the 2-core reference machine.
//! Under `cargo test --all-targets` it runs with 12,800 messages as a smoke test. (Both are
//! multiples of the 64-message settle batch, so exactly half the messages are live.)

#[path = "support/mod.rs"]
mod support;

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use shards::record::{encode_record, replay, RECORD_HEADER_BYTES};
use shards::wal::{LoggedQueue, Recovery, WalEntry};
use shards::{Location, Message, Queue};

const SEGMENT_BYTES: usize = 64 << 20;

fn main() {
    let messages: u64 = if support::measuring() {
        1_000_000
    } else {
        12_800
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut paths = Vec::new();
    let queues: Vec<LoggedQueue> = (0..4)
        .map(|i| LoggedQueue {
            vhost: Bytes::from_static(b"/"),
            name: Bytes::from(format!("orders-{i}")),
        })
        .collect();
    let body = Bytes::from(vec![0x5Au8; 1024]);
    let mut log = BytesMut::with_capacity(SEGMENT_BYTES + (1 << 20));
    let mut payload = BytesMut::new();
    let mut write_segment = |log: &mut BytesMut| {
        let path = dir
            .path()
            .join(format!("wal-{:016}.log", paths.len() as u64 + 1));
        std::fs::write(&path, &log[..]).expect("write a segment");
        log.clear();
        paths.push(path);
    };
    for id in 0..messages {
        let queue = &queues[(id % 4) as usize];
        let entry = WalEntry::Enqueue {
            queue: queue.clone(),
            id,
            message: Message::new(b"", &queue.name, &[0x10, 0, 2], body.clone(), true),
        };
        payload.clear();
        let kind = entry.encode(&mut payload);
        encode_record(&mut log, kind, &payload);
        // A consumer acks every other message, in batches.
        if id % 64 == 63 {
            for queue in &queues {
                let ids: Vec<u64> = (id - 63..=id).filter(|i| i % 2 == 0).collect();
                payload.clear();
                let kind = WalEntry::Settle {
                    queue: queue.clone(),
                    ids: ids.into(),
                }
                .encode(&mut payload);
                encode_record(&mut log, kind, &payload);
            }
        }
        if log.len() >= SEGMENT_BYTES {
            write_segment(&mut log);
        }
    }
    if !log.is_empty() {
        write_segment(&mut log);
    }
    drop(log);
    let log_bytes: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();

    let started = Instant::now();
    let mut read = std::time::Duration::ZERO;
    let mut recovery = Recovery::new();
    for (index, path) in paths.iter().enumerate() {
        let reading = Instant::now();
        let image = Bytes::from(std::fs::read(path).expect("read a segment"));
        read += reading.elapsed();
        let replayed = replay(image);
        for record in &replayed.records {
            let entry = WalEntry::decode(record).expect("intact");
            let location = Location {
                segment: index as u32 + 1,
                len: (record.payload.len() + RECORD_HEADER_BYTES) as u32,
                offset: record.offset,
            };
            recovery.apply(&entry, location);
        }
    }
    let mut restored = 0usize;
    for (_, recovered) in recovery.finish() {
        let mut queue = Queue::new();
        queue.reserve(recovered.messages.len());
        for message in recovered.messages {
            queue.restore(message.id, message.location, message.redelivered);
            restored += 1;
        }
        std::hint::black_box(&queue);
    }
    let total = started.elapsed();
    assert_eq!(restored as u64, messages / 2, "half were acked");
    println!(
        "recovery of {messages} × 1 KiB persistent messages ({} MiB log in {} segments): {:.2} s total, {:.2} s reading",
        log_bytes >> 20,
        paths.len(),
        total.as_secs_f64(),
        read.as_secs_f64()
    );
    if support::measuring() {
        assert!(total.as_secs_f64() < 5.0, "over the 5 s target");
    }
}
