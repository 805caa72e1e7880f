//! Routing cost: a topic exchange with 10,000 bindings, and a direct exchange with as many.

#[path = "support/mod.rs"]
mod support;

use std::hint::black_box;

use shardmq::broker::routing::{BindingDef, Destination, MetaOp, QueueDef, VhostRouting};
use shardmq::codec::{FieldTable, ShortStr};
use shards::ShardId;

const BINDINGS: usize = 10_000;

fn s(text: &str) -> ShortStr {
    ShortStr::try_from(text).expect("short")
}

fn setup(exchange: &str, key_of: impl Fn(usize) -> String) -> VhostRouting {
    let mut routing = VhostRouting::new(s("/"));
    for i in 0..BINDINGS {
        let queue = s(&format!("q{i}"));
        routing.apply(&MetaOp::DeclareQueue(QueueDef {
            name: queue.clone(),
            owner: ShardId(i % 2),
            durable: false,
            exclusive: None,
            auto_delete: false,
            arguments: FieldTable::new(),
        }));
        routing.apply(&MetaOp::Bind(BindingDef {
            source: s(exchange),
            destination: Destination::Queue(queue),
            routing_key: s(&key_of(i)),
            arguments: FieldTable::new(),
        }));
    }
    routing
}

fn main() {
    // A realistic mix: exact keys, single-word wildcards, and multi-word tails.
    let topic = setup("amq.topic", |i| match i % 4 {
        0 => format!("region{}.service{}.created", i % 40, i % 500),
        1 => format!("region{}.*.deleted", i % 40),
        2 => format!("region{}.service{}.#", i % 40, i % 500),
        _ => format!("audit.#.user{}", i % 1000),
    });
    let keys: Vec<ShortStr> = (0..64)
        .map(|i| {
            s(&format!(
                "region{}.service{}.created",
                i % 40,
                (i * 7) % 500
            ))
        })
        .chain((0..64).map(|i| s(&format!("audit.login.user{}", i * 13))))
        .collect();
    let exchange = s("amq.topic");
    let mut out = Vec::new();
    let mut matched = 0usize;
    support::measure("topic route, 10,000 bindings", keys.len() as u64, || {
        for key in &keys {
            topic.route(&exchange, key, None, &mut out);
            matched += out.len();
        }
        black_box(matched);
    });
    topic.route(&exchange, &keys[0], None, &mut out);
    assert!(!out.is_empty(), "the benchmark keys match something");

    let direct = setup("amq.direct", |i| format!("key{i}"));
    let exchange = s("amq.direct");
    let keys: Vec<ShortStr> = (0..128).map(|i| s(&format!("key{}", i * 71))).collect();
    support::measure("direct route, 10,000 bindings", keys.len() as u64, || {
        for key in &keys {
            direct.route(&exchange, key, None, &mut out);
            black_box(out.len());
        }
    });
}
