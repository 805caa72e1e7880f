//! Queue arguments applied, through lapin: dead-letter exchanges (reject, nack, expiry,
//! overflow) with RabbitMQ's x-death headers, message TTL per queue and per message, length
//! limits with each overflow mode, queue expiry, single active consumer, priorities of messages
//! and of consumers, and direct reply-to; across two shards (balanced placement), through
//! paging, and across a restart.

mod common;

use std::time::{Duration, Instant};

use common::{
    drain_no_ack, lapin_channel, lapin_publish_confirmed, lapin_publish_with, Broker, BALANCED,
    BALANCED_PAGING,
};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};

const WAIT: Duration = Duration::from_secs(10);

fn arguments(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in entries {
        table.insert(ShortString::from(*name), value.clone());
    }
    table
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

async fn declare(channel: &Channel, name: &str, durable: bool, args: &[(&str, AMQPValue)]) {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable,
                ..QueueDeclareOptions::default()
            },
            arguments(args),
        )
        .await
        .expect("queue.declare");
}

async fn confirming_channel(broker: &Broker) -> (lapin::Connection, Channel) {
    let (connection, channel) = lapin_channel(broker).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    (connection, channel)
}

async fn passive_declare(channel: &Channel, queue: &str) -> lapin::Result<lapin::Queue> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

async fn message_count(channel: &Channel, queue: &str) -> u32 {
    passive_declare(channel, queue)
        .await
        .expect("passive declare")
        .message_count()
}

/// Waits until `queue` holds `count` ready messages.
async fn wait_for_count(channel: &Channel, queue: &str, count: u32) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = message_count(channel, queue).await;
        if now == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "queue '{queue}' holds {now} messages, not {count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A consumer on `queue` tagged `tag` (the broker names it if empty).
async fn consume(
    channel: &Channel,
    queue: &str,
    tag: &str,
    no_ack: bool,
    args: &[(&str, AMQPValue)],
) -> lapin::Consumer {
    channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            arguments(args),
        )
        .await
        .expect("basic.consume")
}

/// The consumer's next delivery, within `WAIT`; `what` names it when it does not come.
async fn next_delivery(consumer: &mut lapin::Consumer, what: &str) -> lapin::message::Delivery {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: not in time"))
        .expect("a delivery")
        .expect("delivery ok")
}

/// The x-death records of a delivery's headers, each as (queue, reason, count, exchange,
/// routing keys).
fn deaths(properties: &BasicProperties) -> Vec<(String, String, i64, String, Vec<String>)> {
    let headers = properties.headers().clone().unwrap_or_default();
    let Some(AMQPValue::FieldArray(records)) = headers.inner().get("x-death") else {
        return Vec::new();
    };
    let string = |table: &FieldTable, field: &str| match table.inner().get(field) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("x-death field {field}: {other:?}"),
    };
    records
        .as_slice()
        .iter()
        .map(|record| {
            let AMQPValue::FieldTable(table) = record else {
                panic!("an x-death record that is not a table: {record:?}");
            };
            let count = match table.inner().get("count") {
                Some(AMQPValue::LongLongInt(n)) => *n,
                other => panic!("count: {other:?}"),
            };
            let keys = match table.inner().get("routing-keys") {
                Some(AMQPValue::FieldArray(keys)) => keys
                    .as_slice()
                    .iter()
                    .map(|k| match k {
                        AMQPValue::LongString(s) => s.to_string(),
                        other => panic!("routing key {other:?}"),
                    })
                    .collect(),
                other => panic!("routing-keys: {other:?}"),
            };
            assert!(
                matches!(table.inner().get("time"), Some(AMQPValue::Timestamp(t)) if *t > 0),
                "a death has its time"
            );
            (
                string(table, "queue"),
                string(table, "reason"),
                count,
                string(table, "exchange"),
                keys,
            )
        })
        .collect()
}

#[tokio::test]
async fn a_rejected_job_comes_back_through_a_ttl_retry_queue_with_its_deaths() {
    // work --(rejected)--> retry-x --> retry (TTL 300 ms) --(expired)--> "" / "work" --> work
    let broker = Broker::start_with_config(BALANCED);
    let (_connection, channel) = lapin_channel(&broker).await;
    channel
        .exchange_declare(
            "retry-x".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange.declare");
    declare(
        &channel,
        "work",
        false,
        &[("x-dead-letter-exchange", text("retry-x"))],
    )
    .await;
    declare(
        &channel,
        "retry",
        false,
        &[
            ("x-message-ttl", AMQPValue::LongInt(300)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("work")),
        ],
    )
    .await;
    channel
        .queue_bind(
            "retry".into(),
            "retry-x".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue.bind");
    let mut consumer = consume(&channel, "work", "worker", false, &[]).await;
    let properties = BasicProperties::default().with_headers(arguments(&[("job", text("7"))]));
    lapin_publish_confirmed(&channel, "", "work", b"job", properties).await;

    let first = next_delivery(&mut consumer, "the job in time").await;
    assert!(deaths(&first.properties).is_empty());
    first
        .reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
    let rejected_at = Instant::now();

    let again = next_delivery(&mut consumer, "the job back in time").await;
    let waited = rejected_at.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "it waited out the retry queue's TTL: {waited:?}"
    );
    assert_eq!(again.data, b"job");
    assert!(!again.redelivered, "a dead letter is a new message");
    assert_eq!(again.exchange.as_str(), "");
    assert_eq!(again.routing_key.as_str(), "work");
    let headers = again.properties.headers().clone().unwrap_or_default();
    assert_eq!(
        headers.inner().get("job"),
        Some(&text("7")),
        "its own header kept"
    );
    assert_eq!(
        headers.inner().get("x-first-death-reason"),
        Some(&text("rejected"))
    );
    assert_eq!(
        deaths(&again.properties),
        [
            (
                "retry".into(),
                "expired".into(),
                1,
                "retry-x".into(),
                vec!["work".to_string()]
            ),
            (
                "work".into(),
                "rejected".into(),
                1,
                "".into(),
                vec!["work".to_string()]
            ),
        ]
    );
    again.ack(BasicAckOptions::default()).await.expect("ack");
    assert_eq!(message_count(&channel, "retry").await, 0);
    assert_eq!(message_count(&channel, "work").await, 0);
}

#[tokio::test]
async fn length_limits_drop_the_oldest_or_refuse_the_newest() {
    let broker = Broker::start_with_config(BALANCED);
    let (_connection, channel) = confirming_channel(&broker).await;
    declare(&channel, "dead", false, &[]).await;
    declare(
        &channel,
        "newest",
        false,
        &[
            ("x-max-length", AMQPValue::LongInt(2)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("dead")),
        ],
    )
    .await;
    declare(
        &channel,
        "oldest",
        false,
        &[
            ("x-max-length", AMQPValue::LongInt(2)),
            ("x-overflow", text("reject-publish")),
        ],
    )
    .await;
    declare(
        &channel,
        "small",
        false,
        &[("x-max-length-bytes", AMQPValue::LongInt(10))],
    )
    .await;
    for i in 0..5 {
        let body = format!("m{i}");
        let newest =
            lapin_publish_confirmed(&channel, "", "newest", body.as_bytes(), Default::default())
                .await;
        assert!(newest.is_ack(), "drop-head takes every message");
        let oldest =
            lapin_publish_confirmed(&channel, "", "oldest", body.as_bytes(), Default::default())
                .await;
        assert_eq!(
            oldest.is_nack(),
            i >= 2,
            "reject-publish refuses once full: message {i}"
        );
    }
    for body in ["aaaa", "bbbb", "cccc", "dd"] {
        lapin_publish_confirmed(&channel, "", "small", body.as_bytes(), Default::default()).await;
    }
    let bodies = |messages: Vec<(Vec<u8>, bool)>| -> Vec<String> {
        messages
            .into_iter()
            .map(|(body, _)| String::from_utf8(body).unwrap())
            .collect()
    };
    assert_eq!(bodies(drain_no_ack(&broker, "newest").await), ["m3", "m4"]);
    assert_eq!(bodies(drain_no_ack(&broker, "oldest").await), ["m0", "m1"]);
    assert_eq!(
        bodies(drain_no_ack(&broker, "small").await),
        ["bbbb", "cccc", "dd"]
    );
    wait_for_count(&channel, "dead", 3).await;
    assert_eq!(
        bodies(drain_no_ack(&broker, "dead").await),
        ["m0", "m1", "m2"]
    );
}

#[tokio::test]
async fn per_message_expiration_and_invalid_expirations() {
    let broker = Broker::start_with_config(BALANCED);
    let (_connection, channel) = confirming_channel(&broker).await;
    declare(&channel, "q", false, &[]).await;
    let expiring = |ms: &str| BasicProperties::default().with_expiration(ms.into());
    lapin_publish_confirmed(&channel, "", "q", b"gone", expiring("0")).await;
    lapin_publish_confirmed(&channel, "", "q", b"kept", expiring("60000")).await;
    lapin_publish_confirmed(&channel, "", "q", b"soon gone", expiring("100")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = channel
        .basic_get("q".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .expect("a message");
    assert_eq!(got.delivery.data, b"kept");
    assert_eq!(
        got.message_count, 0,
        "the expired one behind it went once it reached the head"
    );
    assert_eq!(message_count(&channel, "q").await, 0);

    // RabbitMQ refuses a publish whose expiration is not a number, on the channel.
    let result = channel
        .basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions::default(),
            b"bad",
            expiring("soon"),
        )
        .await;
    let closed = match result {
        Err(error) => error,
        Ok(confirm) => confirm.await.expect_err("the channel is closed"),
    };
    let text = closed.to_string();
    assert!(
        text.contains("406") || text.contains("PRECONDITION_FAILED"),
        "{text}"
    );
    assert!(
        text.contains("invalid expiration 'soon': no_integer"),
        "{text}"
    );
    let (_connection, other) = lapin_channel(&broker).await;
    assert_eq!(message_count(&other, "q").await, 0, "the broker serves on");
}

#[tokio::test]
async fn a_paged_backlog_expires_in_order_into_its_dead_letter_queue() {
    // A memory budget of a few messages: the backlog is paged out, and each expiring head is
    // read back to be dead-lettered.
    let broker = Broker::start_with_config(BALANCED_PAGING);
    let (_connection, channel) = confirming_channel(&broker).await;
    declare(&channel, "dead", true, &[]).await;
    declare(
        &channel,
        "delay",
        true,
        &[
            ("x-message-ttl", AMQPValue::LongInt(500)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("dead")),
        ],
    )
    .await;
    let body = |i: usize| format!("{i:04}{}", "x".repeat(1020));
    let persistent = BasicProperties::default().with_delivery_mode(2);
    for i in 0..300 {
        let confirm = lapin_publish_confirmed(
            &channel,
            "",
            "delay",
            body(i).as_bytes(),
            persistent.clone(),
        )
        .await;
        assert!(confirm.is_ack());
    }
    wait_for_count(&channel, "dead", 300).await;
    assert_eq!(message_count(&channel, "delay").await, 0);
    let letters = drain_no_ack(&broker, "dead").await;
    assert_eq!(letters.len(), 300);
    for (i, (letter, _)) in letters.iter().enumerate() {
        assert_eq!(
            String::from_utf8_lossy(&letter[..4]),
            format!("{i:04}"),
            "in order"
        );
        assert_eq!(letter, body(i).as_bytes());
    }
}

#[tokio::test]
async fn dead_letters_and_ttls_survive_a_restart() {
    let broker = Broker::start_with_config(BALANCED);
    {
        let (_connection, channel) = confirming_channel(&broker).await;
        declare(&channel, "ready", true, &[]).await;
        let to_ready = [
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("ready")),
        ];
        declare(&channel, "work", true, &to_ready).await;
        let mut delayed = to_ready.to_vec();
        delayed.push(("x-message-ttl", AMQPValue::LongInt(1_000)));
        declare(&channel, "delay", true, &delayed).await;
        let persistent = BasicProperties::default().with_delivery_mode(2);
        lapin_publish_confirmed(&channel, "", "work", b"rejected", persistent.clone()).await;
        lapin_publish_confirmed(&channel, "", "delay", b"delayed", persistent).await;
        let got = channel
            .basic_get("work".into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get")
            .expect("a message");
        got.delivery
            .reject(BasicRejectOptions { requeue: false })
            .await
            .expect("reject");
        wait_for_count(&channel, "ready", 1).await;
    }
    let broker = broker.stop(libc::SIGTERM).restart();
    let (_connection, channel) = lapin_channel(&broker).await;
    let restarted = Instant::now();
    // The TTL counts again from the restart (publish times are not logged).
    wait_for_count(&channel, "ready", 2).await;
    assert_eq!(message_count(&channel, "delay").await, 0);
    assert!(restarted.elapsed() < WAIT);
    let mut letters: Vec<Vec<u8>> = drain_no_ack(&broker, "ready")
        .await
        .into_iter()
        .map(|(body, _)| body)
        .collect();
    letters.sort();
    assert_eq!(letters, [b"delayed".to_vec(), b"rejected".to_vec()]);
}

#[tokio::test]
async fn an_unused_queue_expires_and_stays_gone_after_a_restart() {
    let broker = Broker::start_with_config(BALANCED);
    let (_connection, channel) = lapin_channel(&broker).await;
    declare(
        &channel,
        "lease",
        true,
        &[("x-expires", AMQPValue::LongInt(300))],
    )
    .await;
    let declared = Instant::now();
    let deadline = declared + WAIT;
    let gone = loop {
        // A fresh channel each time: a passive declare of a missing queue closes its channel
        // (and renews the lease of one still there, as in RabbitMQ).
        let (_c, probe) = lapin_channel(&broker).await;
        if let Err(error) = passive_declare(&probe, "lease").await {
            break error.to_string();
        }
        assert!(Instant::now() < deadline, "the queue never expired");
        tokio::time::sleep(Duration::from_millis(400)).await;
    };
    assert!(gone.contains("404") || gone.contains("NOT_FOUND"), "{gone}");
    assert!(declared.elapsed() >= Duration::from_millis(300));
    drop(channel);
    let broker = broker.stop(libc::SIGTERM).restart();
    let (_connection, channel) = lapin_channel(&broker).await;
    assert!(
        passive_declare(&channel, "lease").await.is_err(),
        "the expired queue stays deleted"
    );
}

#[tokio::test]
async fn a_single_active_consumer_hands_over_when_its_connection_dies() {
    let broker = Broker::start_with_config(BALANCED);
    let (_connection, channel) = confirming_channel(&broker).await;
    declare(
        &channel,
        "sac",
        false,
        &[("x-single-active-consumer", AMQPValue::Boolean(true))],
    )
    .await;
    let (first_connection, first_channel) = lapin_channel(&broker).await;
    let mut first = consume(&first_channel, "sac", "first", false, &[]).await;
    let (_second_connection, second_channel) = lapin_channel(&broker).await;
    let mut second = consume(&second_channel, "sac", "second", false, &[]).await;
    for i in 0..4 {
        lapin_publish_confirmed(
            &channel,
            "",
            "sac",
            format!("m{i}").as_bytes(),
            Default::default(),
        )
        .await;
    }
    for i in 0..4 {
        let delivery = next_delivery(&mut first, "the active consumer gets it").await;
        assert_eq!(delivery.data, format!("m{i}").as_bytes());
        if i < 2 {
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), second.next())
            .await
            .is_err(),
        "the waiting consumer gets nothing"
    );
    // The active one goes with two unacked: they and what comes next go to the other.
    first_connection
        .close(200, "bye".into())
        .await
        .expect("close");
    lapin_publish_confirmed(&channel, "", "sac", b"m4", Default::default()).await;
    let mut taken_over = Vec::new();
    while taken_over.len() < 3 {
        let delivery = next_delivery(&mut second, "the next consumer takes over").await;
        taken_over.push((
            String::from_utf8(delivery.data.clone()).unwrap(),
            delivery.redelivered,
        ));
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    assert_eq!(
        taken_over,
        [
            ("m2".to_string(), true),
            ("m3".to_string(), true),
            ("m4".to_string(), false)
        ]
    );
}

#[tokio::test]
async fn a_priority_queue_keeps_its_order_through_paging_and_a_restart() {
    let broker = Broker::start_with_config(BALANCED_PAGING);
    let (_connection, channel) = confirming_channel(&broker).await;
    declare(
        &channel,
        "urgent-first",
        true,
        &[("x-max-priority", AMQPValue::ShortShortUInt(4))],
    )
    .await;
    // Priority i % 7, capped at 4; 1 KiB bodies, so that most are paged out.
    let body = |i: usize| format!("{i:03}{}", "x".repeat(1021));
    for i in 0..140 {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority((i % 7) as u8);
        lapin_publish_confirmed(&channel, "", "urgent-first", body(i).as_bytes(), properties).await;
    }
    let mut expected: Vec<usize> = (0..140).collect();
    expected.sort_by_key(|i| (std::cmp::Reverse((i % 7).min(4)), *i));
    let broker = broker.stop(libc::SIGTERM).restart();
    let drained: Vec<usize> = drain_no_ack(&broker, "urgent-first")
        .await
        .into_iter()
        .map(|(body, _)| String::from_utf8_lossy(&body[..3]).parse().unwrap())
        .collect();
    assert_eq!(drained, expected);
}

#[tokio::test]
async fn a_higher_priority_consumer_is_served_first_while_it_has_credit() {
    let broker = Broker::start_with_config(BALANCED);
    let (_connection, channel) = confirming_channel(&broker).await;
    declare(&channel, "jobs", false, &[]).await;
    let (_high_connection, high_channel) = lapin_channel(&broker).await;
    high_channel
        .basic_qos(3, Default::default())
        .await
        .expect("basic.qos");
    let mut high = consume(
        &high_channel,
        "jobs",
        "high",
        false,
        &[("x-priority", AMQPValue::LongInt(5))],
    )
    .await;
    let (_low_connection, low_channel) = lapin_channel(&broker).await;
    let mut low = consume(&low_channel, "jobs", "low", true, &[]).await;
    for i in 0..10 {
        lapin_publish_confirmed(
            &channel,
            "",
            "jobs",
            format!("j{i}").as_bytes(),
            Default::default(),
        )
        .await;
    }
    let mut to_high = Vec::new();
    for _ in 0..3 {
        let delivery = next_delivery(&mut high, "to the high-priority consumer").await;
        to_high.push(delivery);
    }
    let mut to_low = Vec::new();
    for _ in 0..7 {
        let delivery = next_delivery(&mut low, "to the other consumer").await;
        to_low.push(String::from_utf8(delivery.data).unwrap());
    }
    let high_bodies: Vec<&[u8]> = to_high.iter().map(|d| d.data.as_slice()).collect();
    assert_eq!(
        high_bodies,
        [b"j0", b"j1", b"j2"],
        "the first three, while it had credit"
    );
    assert_eq!(to_low, ["j3", "j4", "j5", "j6", "j7", "j8", "j9"]);
    // Credit back: the next message goes to the higher priority again.
    to_high[0]
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    // The ack's credit travels from the consumer's shard to the queue's; a declare from the same
    // connection follows it there, so once answered the credit is in.
    passive_declare(&high_channel, "jobs")
        .await
        .expect("passive declare");
    lapin_publish_confirmed(&channel, "", "jobs", b"j10", Default::default()).await;
    let next = next_delivery(&mut high, "to the high-priority consumer").await;
    assert_eq!(next.data, b"j10");
}

#[tokio::test]
async fn rpc_over_direct_reply_to_from_several_connections() {
    let broker = Broker::start_with_config(BALANCED);
    let (_server_connection, server) = lapin_channel(&broker).await;
    declare(&server, "rpc", false, &[]).await;
    let mut requests = consume(&server, "rpc", "server", true, &[]).await;
    let responder = server.clone();
    let serving = tokio::spawn(async move {
        // Answers each request with its body reversed, to its reply-to, with its correlation id.
        while let Some(Ok(request)) = requests.next().await {
            let reply_to = request.properties.reply_to().clone().expect("a reply-to");
            assert!(reply_to.as_str().starts_with("amq.rabbitmq.reply-to."));
            let mut body = request.data.clone();
            body.reverse();
            let properties = BasicProperties::default()
                .with_correlation_id(request.properties.correlation_id().clone().unwrap());
            lapin_publish_with(&responder, "", reply_to.as_str(), &body, properties).await;
        }
    });
    let mut clients = Vec::new();
    for client in 0..4 {
        let (connection, channel) = lapin_channel(&broker).await;
        let mut replies = consume(&channel, "amq.rabbitmq.reply-to", "", true, &[]).await;
        for n in 0..5 {
            let properties = BasicProperties::default()
                .with_reply_to("amq.rabbitmq.reply-to".into())
                .with_correlation_id(format!("{client}-{n}").into());
            let body = format!("request {client}-{n}");
            lapin_publish_with(&channel, "", "rpc", body.as_bytes(), properties).await;
            let reply = next_delivery(&mut replies, "the reply").await;
            assert_eq!(
                reply
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.as_str()),
                Some(format!("{client}-{n}").as_str())
            );
            let mut expected = body.into_bytes();
            expected.reverse();
            assert_eq!(reply.data, expected);
            assert_eq!(reply.exchange.as_str(), "");
        }
        clients.push(connection);
    }
    // A reply consumer takes no acks, and only one per channel.
    let (_connection, channel) = lapin_channel(&broker).await;
    let refused = channel
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("a reply consumer with acks");
    assert!(
        refused
            .to_string()
            .contains("reply consumer cannot acknowledge"),
        "{refused}"
    );
    serving.abort();
}
