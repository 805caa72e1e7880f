//! Codec microbenchmarks: decoding a publish (method + header + body) and encoding a deliver, the
//! two things the broker does for every message.
//!
//! `cargo bench --bench codec` measures; under `cargo test --all-targets` (no `--bench` flag) each
//! case runs a few iterations as a smoke test.

#[path = "support/mod.rs"]
mod support;

use std::hint::black_box;

use bytes::BytesMut;
use shardmq::codec::{
    decode_frame, encode_content, encode_delivery, BasicProperties, BasicPublish, DeliverArgs,
    Frame, Method, ShortStr,
};

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

const BATCH: usize = 256;

fn decode_case(name: &str, body_bytes: usize) {
    let encoded = publish_frames(body_bytes, BATCH);
    support::measure(name, BATCH as u64, move || {
        let mut buffer = encoded.clone();
        let mut frames = 0;
        while let Some(frame) = decode_frame(&mut buffer, 131072).expect("valid") {
            if matches!(frame, Frame::Body { .. }) {
                frames += 1;
            }
            black_box(frame);
        }
        assert_eq!(frames, BATCH);
    });
}

fn encode_case(name: &str, body_bytes: usize) {
    let properties = BasicProperties {
        delivery_mode: Some(2),
        ..Default::default()
    }
    .to_bytes();
    let body = vec![0x5Au8; body_bytes];
    let mut out = BytesMut::with_capacity(BATCH * (body_bytes + 128));
    support::measure(name, BATCH as u64, move || {
        out.clear();
        for tag in 0..BATCH as u64 {
            let deliver = DeliverArgs {
                consumer_tag: b"amq.ctag-benchmark",
                delivery_tag: tag + 1,
                redelivered: false,
                exchange: b"amq.direct",
                routing_key: b"bench.queue",
            };
            encode_delivery(&mut out, 1, deliver, &properties, &body, 131072);
        }
        black_box(&out);
    });
}

fn main() {
    decode_case("decode publish, 16 B body", 16);
    decode_case("decode publish, 1 KiB body", 1024);
    encode_case("encode deliver, 16 B body", 16);
    encode_case("encode deliver, 1 KiB body", 1024);
}
