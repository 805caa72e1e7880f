//! Crash tests: the broker is killed with SIGKILL while several producers publish persistent
//! messages with confirms to durable queues on both shards. After every restart each confirmed
//! message is present exactly once, in publish order; nothing appears twice. Several rounds on
//! the same data directory, each killed at a different moment. The memory budget is tiny, so most
//! messages are paged out and come back from the log when read.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use amqprs::channel::{BasicPublishArguments, QueueDeclareArguments};
use amqprs::BasicProperties;
use common::{
    consume_with_prefetch, drain_no_ack, next_delivery, open_channel, open_confirming_channel,
    Broker, BALANCED_PAGING,
};

const PRODUCERS: usize = 3;
const ROUNDS: u64 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_sigkill_exactly_once() {
    let mut broker = Broker::start_with_config(BALANCED_PAGING);
    for round in 0..ROUNDS {
        // Producers run until the kill.
        let mut recorders = Vec::new();
        let mut tasks = Vec::new();
        let mut connections = Vec::new();
        for producer in 0..PRODUCERS {
            let (connection, channel, recorder) = open_confirming_channel(&broker).await;
            let mut declare = QueueDeclareArguments::new(&format!("crash-{producer}"));
            declare.durable(true);
            channel.queue_declare(declare).await.unwrap();
            recorders.push(recorder.clone());
            connections.push(connection);
            tasks.push(tokio::spawn(async move {
                let queue = format!("crash-{producer}");
                for n in 0u64.. {
                    let body = format!("{round}:{producer}:{n}");
                    let sent = channel
                        .basic_publish(
                            BasicProperties::default().with_persistence(true).finish(),
                            body.into_bytes(),
                            BasicPublishArguments::new("", &queue),
                        )
                        .await;
                    if sent.is_err() {
                        return;
                    }
                    // A confirm window of 500, as a real publisher keeps.
                    while n >= 500 + recorder.confirmed_up_to() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    if n % 20 == 19 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        // Every producer is under way, then a different kill point every round.
        for recorder in &recorders {
            recorder
                .wait_for("a first confirm", |r| r.confirmed_up_to() > 0)
                .await;
        }
        tokio::time::sleep(Duration::from_millis(50 + round * 170)).await;
        let stopped = broker.stop(libc::SIGKILL);
        let confirmed: Vec<u64> = recorders.iter().map(|r| r.confirmed_up_to()).collect();
        for task in tasks {
            task.abort();
        }
        drop(connections);
        broker = stopped.restart();

        for (producer, confirmed) in confirmed.iter().copied().enumerate() {
            let queue = format!("crash-{producer}");
            let mut seen = Vec::new();
            for (body, _) in drain_no_ack(&broker, &queue).await {
                let body = String::from_utf8(body).unwrap();
                let parts: Vec<&str> = body.split(':').collect();
                assert_eq!(
                    parts[0],
                    round.to_string(),
                    "a message of an earlier round came back: {body}"
                );
                assert_eq!(parts[1], producer.to_string());
                seen.push(parts[2].parse::<u64>().unwrap());
            }
            // In publish order, no duplicates.
            assert!(
                seen.windows(2).all(|w| w[0] < w[1]),
                "round {round} producer {producer}: out of order or duplicated"
            );
            // Every confirmed message (confirms are per producer, seq n+1 is message n) is there.
            let present: BTreeSet<u64> = seen.iter().copied().collect();
            for n in 0..confirmed {
                assert!(
                    present.contains(&n),
                    "round {round} producer {producer}: confirmed message {n} lost ({} confirmed, {} recovered)",
                    confirmed,
                    seen.len()
                );
            }
            assert!(
                confirmed > 0,
                "round {round}: producer {producer} had nothing confirmed"
            );
        }
    }
}

/// SIGKILL while a consumer acks: no message acked before a completed synchronous method
/// reappears; every message never acked is back, redelivered (the broker cannot know what it
/// had delivered), each once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_stay_acked_across_sigkill() {
    use amqprs::channel::{BasicAckArguments, BasicQosArguments};

    const MESSAGES: u64 = 2000;
    let mut broker = Broker::start_with_config(BALANCED_PAGING);
    for round in 0..2u64 {
        let queue = format!("work-{round}");
        {
            let (_c, channel, recorder) = open_confirming_channel(&broker).await;
            let mut declare = QueueDeclareArguments::new(&queue);
            declare.durable(true);
            channel.queue_declare(declare).await.unwrap();
            for n in 0..MESSAGES {
                channel
                    .basic_publish(
                        BasicProperties::default().with_persistence(true).finish(),
                        n.to_string().into_bytes(),
                        BasicPublishArguments::new("", &queue),
                    )
                    .await
                    .unwrap();
            }
            recorder
                .wait_for("all confirms", |r| r.confirmed_up_to() == MESSAGES)
                .await;
        }
        let (connection, consumer, _) = open_channel(&broker).await;
        let (_, mut rx) = consume_with_prefetch(&consumer, &queue, "worker", 50).await;
        let mut acked_durably: BTreeSet<u64> = BTreeSet::new();
        let mut acked_pending: Vec<u64> = Vec::new();
        let stop_after = 500 + round * 600;
        for _ in 0..stop_after {
            let message = next_delivery(&mut rx).await;
            let n: u64 = String::from_utf8(message.content.unwrap())
                .unwrap()
                .parse()
                .unwrap();
            consumer
                .basic_ack(BasicAckArguments::new(
                    message.deliver.unwrap().delivery_tag(),
                    false,
                ))
                .await
                .unwrap();
            acked_pending.push(n);
            if acked_pending.len() == 25 {
                // A synchronous method: its reply means the acks before it are on disk.
                consumer
                    .basic_qos(BasicQosArguments::new(0, 50, false))
                    .await
                    .unwrap();
                acked_durably.extend(acked_pending.drain(..));
            }
        }
        let stopped = broker.stop(libc::SIGKILL);
        drop(connection);
        broker = stopped.restart();

        let mut recovered = Vec::new();
        for (body, redelivered) in drain_no_ack(&broker, &queue).await {
            assert!(redelivered, "after a crash every message is flagged");
            recovered.push(String::from_utf8(body).unwrap().parse::<u64>().unwrap());
        }
        assert!(
            recovered.windows(2).all(|w| w[0] < w[1]),
            "round {round}: order or duplicates"
        );
        let present: BTreeSet<u64> = recovered.iter().copied().collect();
        for n in &acked_durably {
            assert!(
                !present.contains(n),
                "round {round}: acked message {n} came back"
            );
        }
        for n in 0..MESSAGES {
            let acked = acked_durably.contains(&n) || acked_pending.contains(&n);
            assert!(
                acked || present.contains(&n),
                "round {round}: unacked message {n} lost"
            );
        }
    }
}
