//! The disk alarm through lapin: below `queues.disk_free_limit_bytes` of free space, a
//! connection that publishes is blocked with connection.blocked ("low on disk"), while a
//! connection that only consumes goes on. (That a blocked connection is not read is the memory
//! alarm's mechanism, tested with it.)

mod common;

use std::time::{Duration, Instant};

use common::{drain_no_ack, lapin_channel, lapin_publish, Broker};
use futures_lite::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

#[tokio::test]
async fn a_disk_short_of_space_blocks_publishers_and_not_consumers() {
    // No disk has this much free: the alarm is up from the first check, at start.
    let broker =
        Broker::start_with_config("[queues]\ndisk_free_limit_bytes = 9223372036854775807\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !broker.log_contains("disk alarm") {
        assert!(Instant::now() < deadline, "no disk alarm logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (connection, channel) = lapin_channel(&broker).await;
    let mut events = connection.events_listener();
    channel
        .queue_declare(
            "during-alarm".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declares go on");
    // One publish: lapin holds further ones itself once it is told the connection is blocked.
    drop(lapin_publish(&channel, "", "during-alarm", b"first").await);
    let reason = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.next().await {
                Some(lapin::Event::ConnectionBlocked(reason)) => return reason,
                Some(_) => continue,
                None => panic!("the connection's events ended"),
            }
        }
    })
    .await
    .expect("connection.blocked in time");
    assert_eq!(reason, "low on disk");
    let taken = drain_no_ack(&broker, "during-alarm").await;
    assert_eq!(
        taken,
        [(b"first".to_vec(), false)],
        "a consumer still takes it"
    );
}
