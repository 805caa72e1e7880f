//! Proof that messages really cross cores: with queues spread over both shards, one connection
//! publishing to and consuming from every queue must hand work to the other shard. Each shard
//! logs its mesh counters at shutdown; the test reads them.

mod common;

use std::time::Duration;

use amqprs::channel::{
    BasicConsumeArguments, BasicPublishArguments, ConfirmSelectArguments, QueueDeclareArguments,
};
use amqprs::BasicProperties;
use common::{next_delivery, open_channel, Broker, BALANCED};

fn counter(line: &str, label: &str) -> u64 {
    // "... {n} publishes and {m} deliveries received from other shards"
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == label)
        .and_then(|i| words[i - 1].parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn publishes_and_deliveries_cross_the_mesh() {
    let broker = Broker::start_with_config(BALANCED);
    let (_connection, channel, recorder) = open_channel(&broker).await;
    channel
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    let queues = ["q0", "q1", "q2", "q3"];
    let mut receivers = Vec::new();
    for queue in queues {
        channel
            .queue_declare(QueueDeclareArguments::new(queue))
            .await
            .unwrap();
        let mut consume = BasicConsumeArguments::new(queue, "");
        consume.manual_ack(false);
        receivers.push(channel.basic_consume_rx(consume).await.unwrap().1);
    }
    for round in 0..25 {
        for queue in queues {
            channel
                .basic_publish(
                    BasicProperties::default(),
                    format!("{queue}-{round}").into_bytes(),
                    BasicPublishArguments::new("", queue),
                )
                .await
                .unwrap();
        }
    }
    recorder
        .wait_for("100 confirms", |r| r.confirmed_up_to() == 100)
        .await;
    for (queue, rx) in queues.iter().zip(receivers.iter_mut()) {
        for round in 0..25 {
            let message = next_delivery(rx).await;
            assert_eq!(
                message.content.unwrap(),
                format!("{queue}-{round}").into_bytes()
            );
        }
    }
    broker.signal(libc::SIGTERM);
    // Wait off the runtime so the client can still answer the broker's connection.close.
    let (status, broker) = tokio::task::spawn_blocking(move || {
        let mut broker = broker;
        let status = broker.wait_exit(Duration::from_secs(15));
        (status, broker)
    })
    .await
    .unwrap();
    assert!(status.expect("exits").success());
    assert!(broker.log_contains("mesh traffic"));
    let log = broker.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("mesh traffic")).collect();
    assert_eq!(lines.len(), 2, "one line per shard:\n{log}");
    let publishes: u64 = lines.iter().map(|l| counter(l, "publishes")).sum();
    let deliveries: u64 = lines.iter().map(|l| counter(l, "deliveries")).sum();
    // Two of the four queues live on the other shard: half of the traffic crossed.
    assert!(
        publishes >= 50,
        "publishes that crossed: {publishes}\n{log}"
    );
    assert!(
        deliveries >= 50,
        "deliveries that crossed: {deliveries}\n{log}"
    );
}
