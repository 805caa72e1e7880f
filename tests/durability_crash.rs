//! Crash tests: the broker is killed with SIGKILL while several producers publish persistent
//! messages with confirms to durable queues on both shards. After every restart each confirmed
//! message is present exactly once, in publish order; nothing appears twice. Several rounds on
//! the same data directory, each killed at a different moment.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use amqprs::channel::{
    BasicGetArguments, BasicPublishArguments, ConfirmSelectArguments, QueueDeclareArguments,
};
use amqprs::BasicProperties;
use common::{open_channel, Broker, BALANCED};

const PRODUCERS: usize = 3;
const ROUNDS: u64 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_sigkill_exactly_once() {
    let mut broker = Broker::start_with_config(BALANCED);
    for round in 0..ROUNDS {
        // Producers run until the kill.
        let mut recorders = Vec::new();
        let mut tasks = Vec::new();
        let mut connections = Vec::new();
        for producer in 0..PRODUCERS {
            let (connection, channel, recorder) = open_channel(&broker).await;
            channel
                .confirm_select(ConfirmSelectArguments::default())
                .await
                .unwrap();
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

        let (_c, channel, _) = open_channel(&broker).await;
        for (producer, confirmed) in confirmed.iter().copied().enumerate() {
            let queue = format!("crash-{producer}");
            let mut seen = Vec::new();
            loop {
                let mut args = BasicGetArguments::new(&queue);
                args.no_ack(true);
                match channel.basic_get(args).await.unwrap() {
                    Some((_, _, content)) => {
                        let body = String::from_utf8(content).unwrap();
                        let parts: Vec<&str> = body.split(':').collect();
                        assert_eq!(
                            parts[0],
                            round.to_string(),
                            "a message of an earlier round came back: {body}"
                        );
                        assert_eq!(parts[1], producer.to_string());
                        seen.push(parts[2].parse::<u64>().unwrap());
                    }
                    None => break,
                }
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
