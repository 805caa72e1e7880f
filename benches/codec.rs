//! Codec microbenchmarks: decoding a publish (method + header + body) and encoding a deliver, the
//! two things the broker does for every message.
//!
//! `cargo bench --bench codec` measures; under `cargo test --all-targets` (no `--bench` flag) each
//! case runs a few iterations as a smoke test.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use shardmq::codec::{
    decode_frame, encode_content, BasicDeliver, BasicProperties, BasicPublish, Frame, Method,
    ShortStr,
};

struct Case {
    name: &'static str,
    bytes_per_op: usize,
    run: Box<dyn FnMut()>,
}

fn publish_frames(body_bytes: usize, messages: usize) -> BytesMut {
    let publish: Method = BasicPublish {
        exchange: ShortStr::from_static("amq.direct"),
        routing_key: ShortStr::from_static("bench.queue"),
        ..Default::default()
    }
    .into();
    let properties = BasicProperties {
        delivery_mode: Some(2),
        content_type: Some(ShortStr::from_static("application/octet-stream")),
        ..Default::default()
    }
    .to_bytes();
    let body = vec![0xA5u8; body_bytes];
    let mut out = BytesMut::new();
    for _ in 0..messages {
        encode_content(&mut out, 1, &publish, &properties, &body, 131072);
    }
    out
}

fn decode_case(name: &'static str, body_bytes: usize) -> Case {
    const BATCH: usize = 256;
    let encoded = publish_frames(body_bytes, BATCH);
    let bytes_per_op = encoded.len() / BATCH;
    Case {
        name,
        bytes_per_op,
        run: Box::new(move || {
            let mut buffer = encoded.clone();
            let mut frames = 0;
            while let Some(frame) = decode_frame(&mut buffer, 131072).expect("valid") {
                if matches!(frame, Frame::Body { .. }) {
                    frames += 1;
                }
                black_box(frame);
            }
            assert_eq!(frames, BATCH);
        }),
    }
}

fn encode_case(name: &'static str, body_bytes: usize) -> Case {
    const BATCH: usize = 256;
    let deliver: Method = BasicDeliver {
        consumer_tag: ShortStr::from_static("amq.ctag-benchmark"),
        delivery_tag: 1,
        redelivered: false,
        exchange: ShortStr::from_static("amq.direct"),
        routing_key: ShortStr::from_static("bench.queue"),
    }
    .into();
    let properties = BasicProperties {
        delivery_mode: Some(2),
        ..Default::default()
    }
    .to_bytes();
    let body = vec![0x5Au8; body_bytes];
    let mut out = BytesMut::with_capacity(BATCH * (body_bytes + 128));
    Case {
        name,
        bytes_per_op: body_bytes + 100,
        run: Box::new(move || {
            out.clear();
            for _ in 0..BATCH {
                encode_content(&mut out, 1, &deliver, &properties, &body, 131072);
            }
            black_box(&out);
        }),
    }
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let mut cases = vec![
        decode_case("decode publish, 16 B body", 16),
        decode_case("decode publish, 1 KiB body", 1024),
        encode_case("encode deliver, 16 B body", 16),
        encode_case("encode deliver, 1 KiB body", 1024),
    ];
    for case in &mut cases {
        if !measuring {
            (case.run)();
            continue;
        }
        // Warm up, then run batches of 256 messages for about a second.
        for _ in 0..50 {
            (case.run)();
        }
        let started = Instant::now();
        let mut batches = 0u64;
        while started.elapsed() < Duration::from_secs(1) {
            (case.run)();
            batches += 1;
        }
        let elapsed = started.elapsed();
        let messages = batches * 256;
        let ns_per_message = elapsed.as_nanos() as f64 / messages as f64;
        let mib_per_sec =
            (messages as f64 * case.bytes_per_op as f64) / elapsed.as_secs_f64() / (1 << 20) as f64;
        println!(
            "{:<32} {:>8.1} ns/message {:>10.0} messages/s {:>8.0} MiB/s",
            case.name,
            ns_per_message,
            1e9 / ns_per_message,
            mib_per_sec
        );
    }
}
