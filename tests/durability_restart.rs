//! Restarts through a third-party client: durable exchanges, queues, bindings and persistent
//! messages survive; transient and exclusive ones do not; delivered-but-unacked messages come
//! back redelivered; acked ones never do; order is kept.

mod common;

use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicGetArguments, BasicPublishArguments, Channel, ExchangeDeclareArguments,
    QueueBindArguments, QueueDeclareArguments,
};
use amqprs::BasicProperties;
use common::{
    drain_no_ack, open_channel, open_confirming_channel, Broker, ChannelRecorder, BALANCED,
};

async fn durable_queue(channel: &Channel, name: &str) {
    let mut args = QueueDeclareArguments::new(name);
    args.durable(true);
    channel.queue_declare(args).await.unwrap();
}

async fn publish(
    channel: &Channel,
    recorder: &ChannelRecorder,
    published: &mut u64,
    exchange: &str,
    key: &str,
    body: &str,
    persistent: bool,
) {
    let properties = BasicProperties::default()
        .with_persistence(persistent)
        .finish();
    channel
        .basic_publish(
            properties,
            body.as_bytes().to_vec(),
            BasicPublishArguments::new(exchange, key),
        )
        .await
        .unwrap();
    *published += 1;
    let target = *published;
    recorder
        .wait_for("the confirm", |r| r.confirmed_up_to() >= target)
        .await;
}

/// (body, redelivered) of every message left in `queue`, taken with no-ack.
async fn drain(broker: &Broker, queue: &str) -> Vec<(String, bool)> {
    drain_no_ack(broker, queue)
        .await
        .into_iter()
        .map(|(body, redelivered)| (String::from_utf8(body).unwrap(), redelivered))
        .collect()
}

async fn exists(broker: &Broker, queue: &str) -> bool {
    let (_c, channel, _) = open_channel(broker).await;
    let mut args = QueueDeclareArguments::new(queue);
    args.passive(true);
    channel.queue_declare(args).await.is_ok()
}

#[tokio::test]
async fn durable_entities_and_persistent_messages_survive_a_restart() {
    let broker = Broker::start_with_config(BALANCED);
    {
        let (_c, channel, recorder) = open_confirming_channel(&broker).await;
        let mut durable_exchange = ExchangeDeclareArguments::new("events", "topic");
        durable_exchange.durable(true);
        channel.exchange_declare(durable_exchange).await.unwrap();
        channel
            .exchange_declare(ExchangeDeclareArguments::new("scratch", "fanout"))
            .await
            .unwrap();
        durable_queue(&channel, "orders").await;
        channel
            .queue_declare(QueueDeclareArguments::new("transient"))
            .await
            .unwrap();
        let mut exclusive = QueueDeclareArguments::new("mine");
        exclusive.durable(true);
        exclusive.exclusive(true);
        channel.queue_declare(exclusive).await.unwrap();
        channel
            .queue_bind(QueueBindArguments::new("orders", "events", "order.#"))
            .await
            .unwrap();
        channel
            .queue_bind(QueueBindArguments::new("transient", "events", "#"))
            .await
            .unwrap();

        let mut published = 0;
        for i in 0..5 {
            publish(
                &channel,
                &recorder,
                &mut published,
                "events",
                "order.new",
                &format!("p{i}"),
                true,
            )
            .await;
        }
        publish(
            &channel,
            &recorder,
            &mut published,
            "",
            "orders",
            "not-persistent",
            false,
        )
        .await;
        publish(
            &channel,
            &recorder,
            &mut published,
            "",
            "transient",
            "t",
            true,
        )
        .await;

        // Take p0 and leave it unacked: after the restart it is back, marked redelivered.
        let (get_ok, _, content) = channel
            .basic_get(BasicGetArguments::new("orders"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(content, b"p0");
        // Ack p1.
        let (acked, _, content) = channel
            .basic_get(BasicGetArguments::new("orders"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(content, b"p1");
        channel
            .basic_ack(BasicAckArguments::new(acked.delivery_tag(), false))
            .await
            .unwrap();
        let _keep_unacked = get_ok;
        // Let the ack reach the owner before the broker goes down.
        let mut passive = QueueDeclareArguments::new("orders");
        passive.passive(true);
        channel.queue_declare(passive).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stopped = broker.stop(libc::SIGTERM);
    let broker = stopped.restart();
    assert!(exists(&broker, "orders").await, "durable queue survived");
    assert!(
        !exists(&broker, "transient").await,
        "transient queue did not"
    );
    assert!(!exists(&broker, "mine").await, "exclusive queue did not");

    let (_c, channel, _) = open_channel(&broker).await;
    let mut passive = ExchangeDeclareArguments::new("events", "topic");
    passive.passive(true);
    channel
        .exchange_declare(passive)
        .await
        .expect("durable exchange survived");
    let (_c2, probe, probe_recorder) = open_channel(&broker).await;
    let mut passive = ExchangeDeclareArguments::new("scratch", "fanout");
    passive.passive(true);
    let _ = probe.exchange_declare(passive).await;
    assert_eq!(
        probe_recorder.close_code().await,
        404,
        "transient exchange is gone"
    );

    let messages = drain(&broker, "orders").await;
    assert_eq!(
        messages,
        vec![
            ("p0".to_string(), true),
            ("p2".to_string(), false),
            ("p3".to_string(), false),
            ("p4".to_string(), false),
        ]
    );

    // The binding survived too.
    channel
        .basic_publish(
            BasicProperties::default().with_persistence(true).finish(),
            b"after".to_vec(),
            BasicPublishArguments::new("events", "order.late"),
        )
        .await
        .unwrap();
    let mut got = None;
    for _ in 0..50 {
        got = drain(&broker, "orders").await.pop();
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got, Some(("after".to_string(), false)));

    // A second restart: what was consumed stays consumed.
    let broker = broker.stop(libc::SIGTERM).restart();
    assert!(drain(&broker, "orders").await.is_empty());
}

#[tokio::test]
async fn a_different_shard_count_is_refused_with_a_clear_message() {
    let broker = Broker::start_with_config(BALANCED);
    {
        let (_c, channel, _) = open_channel(&broker).await;
        durable_queue(&channel, "q").await;
    }
    let stopped = broker.stop(libc::SIGTERM);
    // The harness always runs two shards; rewrite the header by asking for one.
    let result = std::panic::catch_unwind(move || {
        let mut stopped = stopped;
        stopped.override_shards(1);
        stopped.restart()
    });
    let message = match result {
        Ok(broker) => panic!(
            "the broker started with a different shard count:\n{}",
            broker.log()
        ),
        Err(panic) => panic.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(message.contains("--shards 2"), "{message}");
}
