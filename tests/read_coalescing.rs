//! Read coalescing (`connection.read_coalesce_us`) through lapin: a client that streams
//! publishes or acks is read at most once per interval, but nothing the client waits for may be
//! held back by it. The interval here is 100 ms, the largest allowed, so that a wait that should
//! have ended early costs seconds over a run instead of microseconds. Confirms and
//! prefetch-limited deliveries end the wait only for clients that it slows (the broker probes:
//! `connection::coalescing`), so a client held back by its window may wait one interval per probe.

mod common;

use std::time::{Duration, Instant};

use common::{lapin_channel, lapin_publish, Broker};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::Channel;

const COALESCE_100_MS: &str = "[connection]\nread_coalesce_us = 100000\n";
const WAIT: Duration = Duration::from_secs(10);
/// A wait this long is most likely a whole interval: something the client waited for did not
/// end it.
const STALL: Duration = Duration::from_millis(80);
/// A few stalls may come from a busy test machine or the broker's probe (one interval at most);
/// a missed wake-up, or window answers held for a client they slow, makes dozens.
const STALLS_MAX: usize = 8;
/// Long enough for the broker to measure the client over several periods of four intervals.
const RUN_AT_LEAST: Duration = Duration::from_secs(3);

async fn declare(channel: &Channel, name: &str) -> u32 {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue.declare")
        .message_count()
}

/// Publishes `count` messages without waiting for anything: a streaming publisher.
async fn stream_publishes(channel: &Channel, queue: &str, count: usize) {
    for i in 0..count {
        lapin_publish(channel, "", queue, format!("m-{i}").as_bytes()).await;
    }
}

async fn confirming_channel(broker: &Broker) -> (lapin::Connection, Channel) {
    let (connection, channel) = lapin_channel(broker).await;
    confirm_select(&channel).await;
    (connection, channel)
}

async fn confirm_select(channel: &Channel) {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
}

async fn all_acked(confirms: Vec<lapin::PublisherConfirm>) {
    for confirm in confirms {
        let confirmation = tokio::time::timeout(WAIT, confirm)
            .await
            .expect("confirm in time")
            .expect("confirmation");
        assert!(confirmation.is_ack());
    }
}

#[tokio::test]
async fn a_streaming_publisher_loses_nothing_and_its_next_request_is_answered() {
    let broker = Broker::start_with_config(COALESCE_100_MS);
    let (_connection, channel) = lapin_channel(&broker).await;
    declare(&channel, "streamed").await;
    stream_publishes(&channel, "streamed", 20_000).await;
    let count = tokio::time::timeout(WAIT, declare(&channel, "streamed"))
        .await
        .expect("declare-ok in time");
    assert_eq!(
        count, 20_000,
        "every streamed publish is in the queue, in order before it"
    );
}

#[tokio::test]
async fn an_error_after_streaming_closes_only_its_channel() {
    let broker = Broker::start_with_config(COALESCE_100_MS);
    let (connection, channel) = lapin_channel(&broker).await;
    declare(&channel, "before-error").await;
    stream_publishes(&channel, "before-error", 20_000).await;
    let error = tokio::time::timeout(
        WAIT,
        channel.queue_declare(
            "missing".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("the error in time")
    .expect_err("a passive declare of a missing queue");
    assert!(
        error.to_string().contains("404") || error.to_string().contains("NOT_FOUND"),
        "{error}"
    );
    // The connection goes on, with everything published before the error.
    let again = connection.create_channel().await.expect("a new channel");
    let count = tokio::time::timeout(WAIT, declare(&again, "before-error"))
        .await
        .expect("declare-ok in time");
    assert_eq!(count, 20_000);
}

const LIMITED_MESSAGES: usize = 40_000;

/// Fills queue "limited" through a connection of its own.
async fn fill_limited(broker: &Broker) {
    let (_connection, publisher) = lapin_channel(broker).await;
    declare(&publisher, "limited").await;
    stream_publishes(&publisher, "limited", LIMITED_MESSAGES).await;
    assert_eq!(
        declare(&publisher, "limited").await as usize,
        LIMITED_MESSAGES
    );
}

/// Consumes "limited" on `channel` with a prefetch of 5, acking each message, for
/// `RUN_AT_LEAST` (or until it is empty); returns the waits for a delivery of `STALL` or more.
async fn consume_limited(channel: &Channel) -> Vec<Duration> {
    channel
        .basic_qos(5, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            "limited".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut stalls = Vec::new();
    let started = Instant::now();
    for i in 0..LIMITED_MESSAGES {
        if i % 1000 == 0 && started.elapsed() >= RUN_AT_LEAST {
            break;
        }
        let waited = Instant::now();
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("delivery in time")
            .expect("consumer open")
            .expect("delivery");
        if waited.elapsed() >= STALL {
            stalls.push(waited.elapsed());
        }
        assert_eq!(delivery.data, format!("m-{i}").into_bytes());
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    stalls
}

#[tokio::test]
async fn a_consumer_with_a_prefetch_limit_is_not_held_back() {
    // Its acks stream, but each ack it sends waits on the delivery before it: if the deliveries
    // did not end the interval, the consumer would wait whole intervals for its next messages.
    let broker = Broker::start_with_config(COALESCE_100_MS);
    fill_limited(&broker).await;
    let (_connection, channel) = lapin_channel(&broker).await;
    let stalls = consume_limited(&channel).await;
    assert!(
        stalls.len() <= STALLS_MAX,
        "{} deliveries waited {STALL:?} or more: {stalls:?}",
        stalls.len()
    );
}

#[tokio::test]
async fn a_limited_consumer_beside_a_busy_publisher_on_its_connection_is_not_held_back() {
    // The publisher, in confirm mode without a window, gains from holding window answers; the
    // consumer's prefetch of 5 would be held to 5 deliveries per interval. The broker must tell
    // them apart.
    let broker = Broker::start_with_config(COALESCE_100_MS);
    fill_limited(&broker).await;
    let (connection, consumer_channel) = lapin_channel(&broker).await;
    let publisher = connection.create_channel().await.expect("a second channel");
    confirm_select(&publisher).await;
    declare(&publisher, "busy").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishing = tokio::spawn({
        let stop = stop.clone();
        async move {
            // No window at all: it never waits for its confirms.
            let mut published = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                drop(lapin_publish(&publisher, "", "busy", b"busy").await);
                published += 1;
            }
            published
        }
    });
    let stalls = consume_limited(&consumer_channel).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let published = publishing.await.expect("the publisher");
    assert!(published > 0);
    assert!(
        stalls.len() <= STALLS_MAX,
        "{} deliveries waited {STALL:?} or more beside {published} publishes: {stalls:?}",
        stalls.len()
    );
}

#[tokio::test]
async fn a_publisher_that_streams_under_confirms_gets_every_confirm() {
    // No window: its confirms never end the wait, and it is read once per interval.
    let broker = Broker::start_with_config(COALESCE_100_MS);
    let (_connection, channel) = confirming_channel(&broker).await;
    declare(&channel, "streamed-confirmed").await;
    let mut confirms = Vec::with_capacity(30_000);
    for i in 0..30_000 {
        let body = format!("m-{i}");
        confirms.push(lapin_publish(&channel, "", "streamed-confirmed", body.as_bytes()).await);
    }
    all_acked(confirms).await;
    assert_eq!(declare(&channel, "streamed-confirmed").await, 30_000);
}

#[tokio::test]
async fn a_publisher_waiting_for_confirms_is_not_held_back() {
    // A window of 20: each batch waits for the confirms of the one before. If confirms did not
    // end the interval, batches would wait whole intervals for them.
    let broker = Broker::start_with_config(COALESCE_100_MS);
    let (_connection, channel) = confirming_channel(&broker).await;
    declare(&channel, "confirmed").await;
    let mut stalls = Vec::new();
    let started = Instant::now();
    let mut batches = 0;
    while started.elapsed() < RUN_AT_LEAST {
        let batch = batches;
        batches += 1;
        let sent = Instant::now();
        let mut confirms = Vec::with_capacity(20);
        for i in 0..20 {
            let body = format!("b{batch}-{i}");
            let confirm = lapin_publish(&channel, "", "confirmed", body.as_bytes()).await;
            confirms.push(confirm);
        }
        all_acked(confirms).await;
        if sent.elapsed() >= STALL {
            stalls.push(sent.elapsed());
        }
    }
    assert!(
        stalls.len() <= STALLS_MAX,
        "{} batches waited {STALL:?} or more for their confirms: {stalls:?}",
        stalls.len()
    );
    assert_eq!(declare(&channel, "confirmed").await, batches * 20);
}
