//! Disk use stays proportional to live data: the write-ahead log rolls into segments, segments
//! whose messages are all settled are deleted, and the oldest segment is compacted when little
//! of it is live. What stays live survives a restart, in order.

mod common;

use std::time::Duration;

use amqprs::channel::Channel;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, ConfirmSelectArguments,
    QueueDeclareArguments,
};
use amqprs::BasicProperties;
use common::{
    consume_with_prefetch, drain_no_ack, log_bytes, log_bytes_fall_below, next_delivery,
    open_channel, Broker, ChannelRecorder,
};

/// Small segments, so that a few megabytes roll through many of them.
const CONFIG: &str = "[storage]\nsegment_bytes_max = 65536\ncompact_live_fraction = 0.5\n[queues]\nplacement = \"balanced\"\n";

/// Puts `channel` in confirm mode, declares `queue` durable and publishes `count` persistent
/// 1 KiB messages to it, numbered in their first 8 bytes, with confirms (a window of 200).
async fn publish_backlog(channel: &Channel, recorder: &ChannelRecorder, queue: &str, count: u64) {
    channel
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    let mut declare = QueueDeclareArguments::new(queue);
    declare.durable(true);
    channel.queue_declare(declare).await.unwrap();
    for i in 0..count {
        let mut payload = vec![0x42u8; 1024];
        payload[..8].copy_from_slice(&i.to_be_bytes());
        channel
            .basic_publish(
                BasicProperties::default().with_persistence(true).finish(),
                payload,
                BasicPublishArguments::new("", queue),
            )
            .await
            .unwrap();
        if i % 200 == 199 {
            recorder
                .wait_for("confirms", |r| r.confirmed_up_to() > i)
                .await;
        }
    }
    recorder
        .wait_for("all confirms", |r| r.confirmed_up_to() == count)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_segments_are_deleted_and_sparse_ones_compacted() {
    let broker = Broker::start_with_config(CONFIG);
    let (_c, channel, recorder) = open_channel(&broker).await;
    const MESSAGES: u64 = 3000;
    publish_backlog(&channel, &recorder, "disk", MESSAGES).await;
    let written = log_bytes(&broker.data_path());
    assert!(
        written > 2_000_000,
        "3 MB of messages are on disk: {written}"
    );

    // Consume everything, acking all but every 100th message.
    let (_cc, consumer, _) = open_channel(&broker).await;
    let (_, mut rx) = consumer
        .basic_consume_rx(BasicConsumeArguments::new("disk", "drain"))
        .await
        .unwrap();
    let mut kept = Vec::new();
    for _ in 0..MESSAGES {
        let message = next_delivery(&mut rx).await;
        let content = message.content.unwrap();
        let n = u64::from_be_bytes(content[..8].try_into().unwrap());
        let tag = message.deliver.unwrap().delivery_tag();
        if n % 100 == 0 {
            kept.push(n);
        } else {
            consumer
                .basic_ack(BasicAckArguments::new(tag, false))
                .await
                .unwrap();
        }
    }
    // Disk use falls towards the live data (30 messages) plus the active segments.
    let remaining =
        log_bytes_fall_below(&broker.data_path(), 600_000, Duration::from_secs(5)).await;
    assert!(remaining < 600_000, "log bytes after settling: {remaining}");

    // The 30 unacked messages survive a restart (redelivered), in order.
    drop(consumer);
    let broker = broker.stop(libc::SIGTERM).restart();
    let mut recovered = Vec::new();
    for (body, redelivered) in drain_no_ack(&broker, "disk").await {
        assert!(redelivered);
        recovered.push(u64::from_be_bytes(body[..8].try_into().unwrap()));
    }
    assert_eq!(recovered, kept);
}

/// Messages the broker logged as compacted (its debug log says how many, per segment).
fn compacted_messages(log: &str) -> u64 {
    log.lines()
        .filter_map(|line| line.split(": ").nth(1))
        .filter_map(|rest| rest.strip_suffix(" live messages compacted"))
        .filter_map(|count| count.parse::<u64>().ok())
        .sum()
}

/// A paged backlog consumed in order is not compacted on its way out: every segment passes
/// below the compaction threshold while it drains, and compacting it then would read back and
/// log again the messages about to be acked. Sparse segments whose messages stay are still
/// compacted (`settled_segments_are_deleted_and_sparse_ones_compacted`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drained_in_order_is_not_rewritten() {
    let config = format!("{CONFIG}memory_budget_bytes = 65536\n");
    let broker = Broker::start_with_config(&config);
    let (_c, channel, recorder) = open_channel(&broker).await;
    const MESSAGES: u64 = 4000;
    publish_backlog(&channel, &recorder, "backlog", MESSAGES).await;

    // Drained as a PerfTest consumer would: a prefetch window, acks with `multiple`.
    let (_cc, consumer, _) = open_channel(&broker).await;
    let (_, mut rx) = consume_with_prefetch(&consumer, "backlog", "drain", 500).await;
    for n in 1..=MESSAGES {
        let message = next_delivery(&mut rx).await;
        if n % 50 == 0 {
            let tag = message.deliver.unwrap().delivery_tag();
            consumer
                .basic_ack(BasicAckArguments::new(tag, true))
                .await
                .unwrap();
        }
    }
    let remaining =
        log_bytes_fall_below(&broker.data_path(), 400_000, Duration::from_secs(5)).await;
    assert!(remaining < 400_000, "log bytes after draining: {remaining}");
    let compacted = compacted_messages(&broker.log());
    assert!(
        compacted < MESSAGES / 40,
        "{compacted} of {MESSAGES} messages compacted while draining"
    );
}
