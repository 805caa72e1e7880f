//! Recovery cost: a shard's log holding 1,000,000 persistent 1 KiB messages (and the settle
//! records of a consumer that acked half of them), read from disk, replayed and folded back into
//! queue contents.
//!
//! Target (durability issue): under 5 seconds for 1M messages on the 2-core reference machine.
//! Under `cargo test --all-targets` it runs with 12,800 messages as a smoke test. (Both are
//! multiples of the 64-message settle batch, so exactly half the messages are live.)

#[path = "support/mod.rs"]
mod support;

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use shards::record::{encode_record, replay};
use shards::wal::{fold, LoggedQueue, WalEntry};
use shards::{Message, Queue};

fn main() {
    let messages: u64 = if support::measuring() {
        1_000_000
    } else {
        12_800
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("wal-0000000000000001.log");
    let queues: Vec<LoggedQueue> = (0..4)
        .map(|i| LoggedQueue {
            vhost: Bytes::from_static(b"/"),
            name: Bytes::from(format!("orders-{i}")),
        })
        .collect();
    let body = Bytes::from(vec![0x5Au8; 1024]);
    let mut log = BytesMut::with_capacity(messages as usize * 1100);
    let mut payload = BytesMut::new();
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
                    ids,
                }
                .encode(&mut payload);
                encode_record(&mut log, kind, &payload);
            }
        }
    }
    std::fs::write(&path, &log).expect("write the log");
    drop(log);

    let started = Instant::now();
    let image = Bytes::from(std::fs::read(&path).expect("read the log"));
    let read = started.elapsed();
    let replayed = replay(image);
    let entries: Vec<WalEntry> = replayed
        .records
        .iter()
        .map(|record| WalEntry::decode(record).expect("intact"))
        .collect();
    let folded = fold(entries);
    let mut restored = 0usize;
    for (_, recovered) in folded {
        let mut queue = Queue::new();
        for message in recovered {
            queue.restore(message.id, message.message, message.redelivered);
            restored += 1;
        }
        std::hint::black_box(&queue);
    }
    let total = started.elapsed();
    assert_eq!(restored as u64, messages / 2, "half were acked");
    println!(
        "recovery of {messages} × 1 KiB persistent messages ({} MiB log): {:.2} s total, {:.2} s reading",
        std::fs::metadata(&path).map(|m| m.len() >> 20).unwrap_or(0),
        total.as_secs_f64(),
        read.as_secs_f64()
    );
    if support::measuring() {
        assert!(total.as_secs_f64() < 5.0, "over the 5 s target");
    }
}
