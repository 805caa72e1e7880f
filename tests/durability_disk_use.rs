//! Disk use stays proportional to live data: the write-ahead log rolls into segments, segments
//! whose messages are all settled are deleted, and the oldest segment is compacted when little
//! of it is live. What stays live survives a restart, in order.

mod common;

use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, ConfirmSelectArguments,
    QueueDeclareArguments,
};
use amqprs::BasicProperties;
use common::{drain_no_ack, log_bytes, open_channel, Broker};

/// Small segments, so that a few megabytes roll through many of them.
const CONFIG: &str = "[storage]\nsegment_bytes_max = 65536\ncompact_live_fraction = 0.5\n[queues]\nplacement = \"balanced\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_segments_are_deleted_and_sparse_ones_compacted() {
    let broker = Broker::start_with_config(CONFIG);
    let (_c, channel, recorder) = open_channel(&broker).await;
    channel
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    let mut declare = QueueDeclareArguments::new("disk");
    declare.durable(true);
    channel.queue_declare(declare).await.unwrap();
    let body = vec![0x42u8; 1024];
    const MESSAGES: u64 = 3000;
    for i in 0..MESSAGES {
        let mut payload = body.clone();
        payload[..8].copy_from_slice(&i.to_be_bytes());
        channel
            .basic_publish(
                BasicProperties::default().with_persistence(true).finish(),
                payload,
                BasicPublishArguments::new("", "disk"),
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
        .wait_for("all confirms", |r| r.confirmed_up_to() == MESSAGES)
        .await;
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
        let message = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("delivery")
            .expect("open");
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
    let mut remaining = u64::MAX;
    for _ in 0..100 {
        remaining = log_bytes(&broker.data_path());
        if remaining < 600_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
