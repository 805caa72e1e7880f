//! Proof that messages really cross cores: with queues spread over both shards, one connection
//! publishing to and consuming from every queue must hand work to the other shard. Each shard
//! logs its mesh counters at shutdown; the test reads them.

mod common;

use std::time::Duration;

use amqprs::channel::{BasicConsumeArguments, BasicPublishArguments, QueueDeclareArguments};
use amqprs::BasicProperties;
use common::{next_delivery, open_confirming_channel, Broker, BALANCED};

fn counter(line: &str, label: &str) -> u64 {
    // "... {n} publishes and {m} deliveries received from other shards"
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == label)
        .and_then(|i| words[i - 1].parse().ok())
        .unwrap_or(0)
}

/// Stops the broker (SIGTERM) and sums the shards' mesh counters named by `labels`, from the
/// line each shard logs at shutdown; returns the log too.
async fn stop_and_count<const N: usize>(broker: Broker, labels: [&str; N]) -> (String, [u64; N]) {
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
    let log = broker.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("mesh traffic")).collect();
    assert_eq!(lines.len(), 2, "one line per shard:\n{log}");
    let sums = labels.map(|label| lines.iter().map(|l| counter(l, label)).sum());
    (log, sums)
}

#[tokio::test]
async fn publishes_and_deliveries_cross_the_mesh() {
    let broker = Broker::start_with_config(BALANCED);
    let (_connection, channel, recorder) = open_confirming_channel(&broker).await;
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
    let (log, [publishes, deliveries]) = stop_and_count(broker, ["publishes", "deliveries"]).await;
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

/// With room for one message in flight between two shards, a publisher that sends faster than
/// the other shard takes its messages in is held back (the mesh reports congestion, the sending
/// shard's outbox keeps them and its readers stop), and every message still arrives, confirmed,
/// in order.
#[tokio::test]
async fn a_congested_mesh_holds_publishers_back_and_loses_nothing() {
    const ROUNDS: usize = 2000;
    const SIZE: usize = 4096;
    let config = format!("{BALANCED}[runtime]\nmesh_channel_bytes = {SIZE}\n");
    let broker = Broker::start_with_config(&config);
    let (_connection, channel, recorder) = open_confirming_channel(&broker).await;
    // Placed round-robin: one queue on each shard, so one of them is across the mesh.
    let queues = ["near-or-far-0", "near-or-far-1"];
    for queue in queues {
        channel
            .queue_declare(QueueDeclareArguments::new(queue))
            .await
            .unwrap();
    }
    let body = |queue: &str, round: usize| {
        let mut body = format!("{queue}-{round}-").into_bytes();
        body.resize(SIZE, b'.');
        body
    };
    for round in 0..ROUNDS {
        for queue in queues {
            channel
                .basic_publish(
                    BasicProperties::default(),
                    body(queue, round),
                    BasicPublishArguments::new("", queue),
                )
                .await
                .unwrap();
        }
    }
    let total = (ROUNDS * queues.len()) as u64;
    recorder
        .wait_for("every publish confirmed", |r| r.confirmed_up_to() == total)
        .await;
    for queue in queues {
        let mut consume = BasicConsumeArguments::new(queue, "");
        consume.manual_ack(false);
        let (_, mut rx) = channel.basic_consume_rx(consume).await.unwrap();
        for round in 0..ROUNDS {
            let message = next_delivery(&mut rx).await;
            assert!(
                message.content.unwrap() == body(queue, round),
                "{queue}: message {round} out of order"
            );
        }
    }
    let (log, [crossed, retried]) = stop_and_count(broker, ["publishes", "congested"]).await;
    assert!(
        crossed >= ROUNDS as u64,
        "publishes that crossed: {crossed}\n{log}"
    );
    assert!(retried > 0, "the mesh never reported congestion\n{log}");
}
