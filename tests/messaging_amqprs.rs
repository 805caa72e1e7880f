//! Messaging through amqprs: declare, bind, publish, consume, get, ack/nack/reject, prefetch,
//! confirms, returns, transactions, exclusive and auto-delete queues, and their error codes.
//!
//! The broker runs with two shards and balanced queue placement, so publisher, consumer and
//! queue owner are spread over both cores.

mod common;

use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicGetArguments,
    BasicNackArguments, BasicPublishArguments, BasicQosArguments, BasicRejectArguments,
    ConfirmSelectArguments, ExchangeBindArguments, ExchangeDeclareArguments,
    ExchangeDeleteArguments, QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments,
    QueuePurgeArguments,
};
use amqprs::channel::{Channel, ConsumerMessage};
use amqprs::{BasicProperties, FieldTable, FieldValue};
use common::{
    consume_with_prefetch, next_delivery, open_channel, open_confirming_channel, Broker, BALANCED,
};
use tokio::sync::mpsc::UnboundedReceiver;

const WAIT: Duration = Duration::from_secs(10);

async fn declare(channel: &Channel, name: &str) -> (String, u32, u32) {
    channel
        .queue_declare(QueueDeclareArguments::new(name))
        .await
        .expect("queue.declare")
        .expect("declare-ok")
}

async fn publish(channel: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    channel
        .basic_publish(
            BasicProperties::default(),
            body.to_vec(),
            BasicPublishArguments::new(exchange, routing_key),
        )
        .await
        .expect("publish");
}

fn body(message: &ConsumerMessage) -> String {
    String::from_utf8(message.content.clone().unwrap_or_default()).unwrap()
}

fn tag(message: &ConsumerMessage) -> u64 {
    message.deliver.as_ref().unwrap().delivery_tag()
}

/// Nothing more arrives within a short while.
async fn assert_quiet(rx: &mut UnboundedReceiver<ConsumerMessage>) {
    let extra = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
    assert!(extra.is_err(), "unexpected extra delivery");
}

async fn get_body(channel: &Channel, queue: &str) -> Option<String> {
    let mut args = BasicGetArguments::new(queue);
    args.no_ack(true);
    channel
        .basic_get(args)
        .await
        .expect("basic.get")
        .map(|(_, _, content)| String::from_utf8(content).unwrap())
}

#[tokio::test]
async fn publish_and_consume_in_order_with_acks_across_connections() {
    let broker = Broker::start_with_config(BALANCED);
    let (_pc, publisher, _) = open_channel(&broker).await;
    let (_cc, consumer, _) = open_channel(&broker).await;
    let (name, messages, consumers) = declare(&publisher, "orders").await;
    assert_eq!((name.as_str(), messages, consumers), ("orders", 0, 0));
    for i in 0..200 {
        publish(&publisher, "", "orders", format!("m{i}").as_bytes()).await;
    }
    let (_, mut rx) = consumer
        .basic_consume_rx(BasicConsumeArguments::new("orders", "c1"))
        .await
        .expect("consume");
    for i in 0..200 {
        let message = next_delivery(&mut rx).await;
        assert_eq!(body(&message), format!("m{i}"));
        assert!(!message.deliver.as_ref().unwrap().redelivered());
        consumer
            .basic_ack(BasicAckArguments::new(tag(&message), false))
            .await
            .unwrap();
    }
    // Everything was acked: a passive declare sees an empty queue with one consumer.
    let mut passive = QueueDeclareArguments::new("orders");
    passive.passive(true);
    let (_, messages, consumers) = publisher.queue_declare(passive).await.unwrap().unwrap();
    assert_eq!((messages, consumers), (0, 1));
}

#[tokio::test]
async fn properties_and_large_bodies_arrive_intact() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel, _) = open_channel(&broker).await;
    declare(&channel, "props").await;
    let mut headers = FieldTable::new();
    headers.insert(
        "trace".try_into().unwrap(),
        FieldValue::S("abc".try_into().unwrap()),
    );
    headers.insert("n".try_into().unwrap(), FieldValue::I(42));
    let properties = BasicProperties::default()
        .with_content_type("application/json")
        .with_correlation_id("corr-1")
        .with_message_id("id-1")
        .with_reply_to("replies")
        .with_priority(3)
        .with_persistence(true)
        .with_headers(headers.clone())
        .finish();
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    channel
        .basic_publish(
            properties,
            big.clone(),
            BasicPublishArguments::new("", "props"),
        )
        .await
        .unwrap();
    let (_, received, content) = channel
        .basic_get(BasicGetArguments::new("props"))
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(content, big);
    assert_eq!(
        received.content_type().map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        received.correlation_id().map(String::as_str),
        Some("corr-1")
    );
    assert_eq!(received.message_id().map(String::as_str), Some("id-1"));
    assert_eq!(received.reply_to().map(String::as_str), Some("replies"));
    assert_eq!(received.priority(), Some(3));
    assert_eq!(received.delivery_mode(), Some(2));
    assert_eq!(received.headers(), Some(&headers));
}

/// A client that streams publishes has most of them cut across two reads (method and header in
/// one, the body in the next); the broker copies what such a publish holds from the first read
/// before reusing the buffer. Every body, routing key and property must come through intact,
/// including bodies of several frames.
#[tokio::test]
async fn a_stream_of_publishes_arrives_intact() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel, _) = open_channel(&broker).await;
    declare(&channel, "stream").await;
    channel
        .queue_bind(QueueBindArguments::new(
            "stream",
            "amq.direct",
            "stream-key",
        ))
        .await
        .unwrap();
    // Sizes from 1 byte to 20 KB, and every 97th one larger than a frame (128 KiB).
    let body = |i: usize| -> Vec<u8> {
        let size = if i % 97 == 0 {
            300_000
        } else {
            1 + i * 7919 % 20_000
        };
        (0..size).map(|j| (i * 31 + j) as u8).collect()
    };
    const COUNT: usize = 2000;
    for i in 0..COUNT {
        let properties = BasicProperties::default()
            .with_message_id(&i.to_string())
            .finish();
        channel
            .basic_publish(
                properties,
                body(i),
                BasicPublishArguments::new("amq.direct", "stream-key"),
            )
            .await
            .unwrap();
    }
    let (_, mut deliveries) = consume_with_prefetch(&channel, "stream", "", 500).await;
    for i in 0..COUNT {
        let message = next_delivery(&mut deliveries).await;
        let properties = message.basic_properties.as_ref().expect("properties");
        assert_eq!(properties.message_id(), Some(&i.to_string()));
        assert!(message.content.as_deref() == Some(&body(i)[..]), "body {i}");
        let deliver = message.deliver.expect("deliver");
        assert_eq!(deliver.routing_key(), "stream-key");
        channel
            .basic_ack(BasicAckArguments::new(deliver.delivery_tag(), false))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn basic_get_reports_counts_and_empty() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel, _) = open_channel(&broker).await;
    declare(&channel, "g").await;
    assert!(channel
        .basic_get(BasicGetArguments::new("g"))
        .await
        .unwrap()
        .is_none());
    for i in 0..3 {
        publish(&channel, "", "g", format!("{i}").as_bytes()).await;
    }
    let (get_ok, _, content) = channel
        .basic_get(BasicGetArguments::new("g"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(content, b"0");
    assert_eq!(get_ok.message_count(), 2);
    channel
        .basic_ack(BasicAckArguments::new(get_ok.delivery_tag(), false))
        .await
        .unwrap();
    assert_eq!(get_body(&channel, "g").await.as_deref(), Some("1"));
}

#[tokio::test]
async fn exchanges_route_by_type() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel, _) = open_channel(&broker).await;
    for queue in ["d", "f1", "f2", "t", "h"] {
        declare(&channel, queue).await;
    }
    channel
        .queue_bind(QueueBindArguments::new("d", "amq.direct", "key"))
        .await
        .unwrap();
    channel
        .exchange_declare(ExchangeDeclareArguments::new("fan", "fanout"))
        .await
        .unwrap();
    for queue in ["f1", "f2"] {
        channel
            .queue_bind(QueueBindArguments::new(queue, "fan", ""))
            .await
            .unwrap();
    }
    channel
        .queue_bind(QueueBindArguments::new("t", "amq.topic", "stock.*.nyse"))
        .await
        .unwrap();
    let mut match_args = FieldTable::new();
    match_args.insert(
        "x-match".try_into().unwrap(),
        FieldValue::S("any".try_into().unwrap()),
    );
    match_args.insert(
        "kind".try_into().unwrap(),
        FieldValue::S("pdf".try_into().unwrap()),
    );
    let mut bind = QueueBindArguments::new("h", "amq.headers", "");
    bind.arguments(match_args);
    channel.queue_bind(bind).await.unwrap();

    publish(&channel, "amq.direct", "key", b"direct").await;
    publish(&channel, "amq.direct", "other", b"lost").await;
    publish(&channel, "fan", "ignored", b"fanout").await;
    publish(&channel, "amq.topic", "stock.ibm.nyse", b"topic").await;
    publish(&channel, "amq.topic", "stock.ibm.lse", b"lost").await;
    let mut headers = FieldTable::new();
    headers.insert(
        "kind".try_into().unwrap(),
        FieldValue::S("pdf".try_into().unwrap()),
    );
    channel
        .basic_publish(
            BasicProperties::default().with_headers(headers).finish(),
            b"headers".to_vec(),
            BasicPublishArguments::new("amq.headers", ""),
        )
        .await
        .unwrap();

    assert_eq!(get_body(&channel, "d").await.as_deref(), Some("direct"));
    assert_eq!(get_body(&channel, "f1").await.as_deref(), Some("fanout"));
    assert_eq!(get_body(&channel, "f2").await.as_deref(), Some("fanout"));
    assert_eq!(get_body(&channel, "t").await.as_deref(), Some("topic"));
    assert_eq!(get_body(&channel, "h").await.as_deref(), Some("headers"));
    for queue in ["d", "f1", "f2", "t", "h"] {
        assert_eq!(
            get_body(&channel, queue).await,
            None,
            "{queue} got a stray message"
        );
    }
}

#[tokio::test]
async fn exchange_to_exchange_and_alternate_exchange() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel, _) = open_channel(&broker).await;
    channel
        .exchange_declare(ExchangeDeclareArguments::new("unrouted", "fanout"))
        .await
        .unwrap();
    let mut arguments = FieldTable::new();
    arguments.insert(
        "alternate-exchange".try_into().unwrap(),
        FieldValue::S("unrouted".try_into().unwrap()),
    );
    let mut main = ExchangeDeclareArguments::new("main", "direct");
    main.arguments(arguments);
    channel.exchange_declare(main).await.unwrap();
    channel
        .exchange_declare(ExchangeDeclareArguments::new("downstream", "topic"))
        .await
        .unwrap();
    channel
        .exchange_bind(ExchangeBindArguments::new("downstream", "main", "a.b"))
        .await
        .unwrap();
    declare(&channel, "via-e2e").await;
    declare(&channel, "via-ae").await;
    channel
        .queue_bind(QueueBindArguments::new("via-e2e", "downstream", "a.#"))
        .await
        .unwrap();
    channel
        .queue_bind(QueueBindArguments::new("via-ae", "unrouted", ""))
        .await
        .unwrap();
    publish(&channel, "main", "a.b", b"bound").await;
    publish(&channel, "main", "nowhere", b"alternate").await;
    assert_eq!(
        get_body(&channel, "via-e2e").await.as_deref(),
        Some("bound")
    );
    assert_eq!(
        get_body(&channel, "via-ae").await.as_deref(),
        Some("alternate")
    );
}

#[tokio::test]
async fn prefetch_limits_unacked_deliveries_per_consumer() {
    let broker = Broker::start_with_config(BALANCED);
    let (_pc, publisher, _) = open_channel(&broker).await;
    let (_cc, consumer, _) = open_channel(&broker).await;
    declare(&publisher, "pf").await;
    for i in 0..10 {
        publish(&publisher, "", "pf", format!("{i}").as_bytes()).await;
    }
    let (_, mut rx) = consume_with_prefetch(&consumer, "pf", "limited", 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next_delivery(&mut rx).await);
    }
    assert_quiet(&mut rx).await;
    // Acking two (multiple) lets exactly two more through.
    consumer
        .basic_ack(BasicAckArguments::new(tag(&held[1]), true))
        .await
        .unwrap();
    let more = [next_delivery(&mut rx).await, next_delivery(&mut rx).await];
    assert_eq!(body(&more[0]), "3");
    assert_eq!(body(&more[1]), "4");
    assert_quiet(&mut rx).await;
}

#[tokio::test]
async fn round_robin_between_consumers() {
    let broker = Broker::start_with_config(BALANCED);
    let (_pc, publisher, _) = open_channel(&broker).await;
    let (_c1, one, _) = open_channel(&broker).await;
    let (_c2, two, _) = open_channel(&broker).await;
    declare(&publisher, "rr").await;
    let mut consume = BasicConsumeArguments::new("rr", "a");
    consume.manual_ack(false);
    let (_, mut rx1) = one.basic_consume_rx(consume).await.unwrap();
    let mut consume = BasicConsumeArguments::new("rr", "b");
    consume.manual_ack(false);
    let (_, mut rx2) = two.basic_consume_rx(consume).await.unwrap();
    for i in 0..10 {
        publish(&publisher, "", "rr", format!("{i}").as_bytes()).await;
    }
    let mut first = Vec::new();
    let mut second = Vec::new();
    for _ in 0..5 {
        first.push(body(&next_delivery(&mut rx1).await));
        second.push(body(&next_delivery(&mut rx2).await));
    }
    assert_eq!(first, vec!["0", "2", "4", "6", "8"]);
    assert_eq!(second, vec!["1", "3", "5", "7", "9"]);
}

#[tokio::test]
async fn nack_and_reject_requeue_with_the_redelivered_flag_in_order() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel, _) = open_channel(&broker).await;
    declare(&channel, "rq").await;
    for i in 0..3 {
        publish(&channel, "", "rq", format!("{i}").as_bytes()).await;
    }
    let (_, mut rx) = channel
        .basic_consume_rx(BasicConsumeArguments::new("rq", "c"))
        .await
        .unwrap();
    let first = [
        next_delivery(&mut rx).await,
        next_delivery(&mut rx).await,
        next_delivery(&mut rx).await,
    ];
    // Nack the first two at once with requeue: they come back in their old order.
    channel
        .basic_nack(BasicNackArguments::new(tag(&first[1]), true, true))
        .await
        .unwrap();
    let again = [next_delivery(&mut rx).await, next_delivery(&mut rx).await];
    let bodies: Vec<String> = again.iter().map(body).collect();
    assert_eq!(bodies, vec!["0", "1"]);
    assert!(again
        .iter()
        .all(|m| m.deliver.as_ref().unwrap().redelivered()));
    // Reject one with requeue: it comes back.
    channel
        .basic_reject(BasicRejectArguments::new(tag(&again[0]), true))
        .await
        .unwrap();
    let third = next_delivery(&mut rx).await;
    assert_eq!(body(&third), "0");
    assert!(third.deliver.as_ref().unwrap().redelivered());
    // Nack without requeue drops.
    channel
        .basic_nack(BasicNackArguments::new(0, true, false))
        .await
        .unwrap();
    assert_quiet(&mut rx).await;
}

#[tokio::test]
async fn closing_a_channel_requeues_its_unacked_messages() {
    let broker = Broker::start_with_config(BALANCED);
    let (_pc, publisher, _) = open_channel(&broker).await;
    declare(&publisher, "cq").await;
    for i in 0..5 {
        publish(&publisher, "", "cq", format!("{i}").as_bytes()).await;
    }
    let (connection, consumer, _) = open_channel(&broker).await;
    let (_, mut rx) = consumer
        .basic_consume_rx(BasicConsumeArguments::new("cq", "c"))
        .await
        .unwrap();
    for _ in 0..5 {
        next_delivery(&mut rx).await;
    }
    consumer.close().await.unwrap();
    drop(connection);
    let mut bodies = Vec::new();
    for _ in 0..5 {
        let mut args = BasicGetArguments::new("cq");
        args.no_ack(true);
        let (get_ok, _, content) = loop {
            if let Some(got) = publisher.basic_get(args.clone()).await.unwrap() {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(get_ok.redelivered());
        bodies.push(String::from_utf8(content).unwrap());
    }
    assert_eq!(bodies, vec!["0", "1", "2", "3", "4"]);
}

#[tokio::test]
async fn publisher_confirms_ack_every_publish() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel, recorder) = open_confirming_channel(&broker).await;
    declare(&channel, "confirmed").await;
    channel
        .exchange_declare(ExchangeDeclareArguments::new("wide", "fanout"))
        .await
        .unwrap();
    declare(&channel, "wide-1").await;
    declare(&channel, "wide-2").await;
    for queue in ["wide-1", "wide-2"] {
        channel
            .queue_bind(QueueBindArguments::new(queue, "wide", ""))
            .await
            .unwrap();
    }
    for i in 0..100 {
        publish(&channel, "", "confirmed", format!("{i}").as_bytes()).await;
        publish(&channel, "wide", "", b"fan").await;
    }
    // Unroutable messages are confirmed too.
    publish(&channel, "", "no-such-queue", b"x").await;
    recorder
        .wait_for("201 confirms", |r| r.confirmed_up_to() == 201)
        .await;
    assert!(recorder.nacks.lock().unwrap().is_empty());
    // Confirms come in order, each seq once: a multiple ack covers everything since the last.
    let acks = recorder.acks.lock().unwrap().clone();
    let mut last = 0;
    for (tag, multiple) in acks {
        assert!(tag > last, "ack {tag} after {last}");
        assert!(
            multiple || tag == last + 1,
            "single ack {tag} skips seqs after {last}"
        );
        last = tag;
    }
}

#[tokio::test]
async fn mandatory_unroutable_messages_are_returned_then_confirmed() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel, recorder) = open_confirming_channel(&broker).await;
    let mut args = BasicPublishArguments::new("amq.direct", "nobody");
    args.mandatory(true);
    channel
        .basic_publish(BasicProperties::default(), b"bounce".to_vec(), args)
        .await
        .unwrap();
    recorder
        .wait_for("a return", |r| !r.returns.lock().unwrap().is_empty())
        .await;
    let (code, routing_key, content) = recorder.returns.lock().unwrap()[0].clone();
    assert_eq!(
        (code, routing_key.as_str(), content.as_slice()),
        (312, "nobody", &b"bounce"[..])
    );
    recorder
        .wait_for("the confirm", |r| r.confirmed_up_to() == 1)
        .await;
}

#[tokio::test]
async fn transactions_apply_at_commit_and_vanish_at_rollback() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel, _) = open_channel(&broker).await;
    let (_c2, observer, _) = open_channel(&broker).await;
    declare(&channel, "tx").await;
    channel.tx_select().await.unwrap();
    publish(&channel, "", "tx", b"rolled-back").await;
    channel.tx_rollback().await.unwrap();
    publish(&channel, "", "tx", b"committed").await;
    assert_eq!(
        get_body(&observer, "tx").await,
        None,
        "not visible before commit"
    );
    channel.tx_commit().await.unwrap();
    assert_eq!(
        get_body(&observer, "tx").await.as_deref(),
        Some("committed")
    );
    assert_eq!(get_body(&observer, "tx").await, None);

    // Acks in a transaction take effect at commit; rolled back, the message stays unacked and
    // comes back when the channel closes.
    publish(&observer, "", "tx", b"held").await;
    let get_ok = loop {
        if let Some((get_ok, _, _)) = channel
            .basic_get(BasicGetArguments::new("tx"))
            .await
            .unwrap()
        {
            break get_ok;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    channel
        .basic_ack(BasicAckArguments::new(get_ok.delivery_tag(), false))
        .await
        .unwrap();
    channel.tx_rollback().await.unwrap();
    channel.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get_body(&observer, "tx").await.as_deref(), Some("held"));
}

#[tokio::test]
async fn purge_and_delete_report_counts_and_conditions() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel, _) = open_channel(&broker).await;
    declare(&channel, "p").await;
    for _ in 0..4 {
        publish(&channel, "", "p", b"x").await;
    }
    let purged = channel
        .queue_purge(QueuePurgeArguments::new("p"))
        .await
        .unwrap();
    assert_eq!(purged, Some(4));
    publish(&channel, "", "p", b"x").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let deleted = channel
        .queue_delete(QueueDeleteArguments::new("p"))
        .await
        .unwrap();
    assert_eq!(deleted, Some(1));
    // Deleting again is fine (RabbitMQ's queue.delete is idempotent).
    channel
        .queue_delete(QueueDeleteArguments::new("p"))
        .await
        .unwrap();
}

#[tokio::test]
async fn server_named_queues_and_exclusive_and_auto_delete_lifetimes() {
    let broker = Broker::start_with_config(BALANCED);
    let (owner_connection, owner, _) = open_channel(&broker).await;
    let mut exclusive = QueueDeclareArguments::new("");
    exclusive.exclusive(true);
    let (name, _, _) = owner.queue_declare(exclusive).await.unwrap().unwrap();
    assert!(name.starts_with("amq.gen-"), "{name}");

    // Another connection cannot use it.
    let (_oc, other, recorder) = open_channel(&broker).await;
    let _ = other
        .basic_consume_rx(BasicConsumeArguments::new(&name, ""))
        .await;
    assert_eq!(recorder.close_code().await, 405);

    // When its connection closes, it goes.
    owner_connection.close().await.unwrap();
    let (_c3, checker, checker_recorder) = open_channel(&broker).await;
    let mut passive = QueueDeclareArguments::new(&name);
    passive.passive(true);
    let mut gone = false;
    for _ in 0..50 {
        if checker.queue_declare(passive.clone()).await.is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "exclusive queue survived its connection");
    assert_eq!(checker_recorder.close_code().await, 404);

    // An auto-delete queue goes when its last consumer cancels.
    let (_c4, channel, _) = open_channel(&broker).await;
    let mut auto = QueueDeclareArguments::new("auto");
    auto.auto_delete(true);
    channel.queue_declare(auto).await.unwrap();
    let (tag, _rx) = channel
        .basic_consume_rx(BasicConsumeArguments::new("auto", ""))
        .await
        .unwrap();
    channel
        .basic_cancel(BasicCancelArguments::new(&tag))
        .await
        .unwrap();
    let (_c5, probe, probe_recorder) = open_channel(&broker).await;
    let mut passive = QueueDeclareArguments::new("auto");
    passive.passive(true);
    let mut gone = false;
    for _ in 0..50 {
        if probe.queue_declare(passive.clone()).await.is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "auto-delete queue survived its last consumer");
    assert_eq!(probe_recorder.close_code().await, 404);
}

#[tokio::test]
async fn deleting_a_queue_cancels_its_consumers() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c1, consumer, recorder) = open_channel(&broker).await;
    let (_c2, admin, _) = open_channel(&broker).await;
    declare(&admin, "doomed").await;
    let (tag, _rx) = consumer
        .basic_consume_rx(BasicConsumeArguments::new("doomed", ""))
        .await
        .unwrap();
    admin
        .queue_delete(QueueDeleteArguments::new("doomed"))
        .await
        .unwrap();
    recorder
        .wait_for("basic.cancel", |r| !r.cancels.lock().unwrap().is_empty())
        .await;
    assert_eq!(recorder.cancels.lock().unwrap()[0], tag);
}

/// Each case runs on a fresh channel and expects that channel to be closed with `code`.
#[tokio::test]
async fn channel_errors_carry_rabbitmq_reply_codes() {
    let broker = Broker::start_with_config(BALANCED);
    let (_setup_connection, setup, _) = open_channel(&broker).await;
    declare(&setup, "existing").await;
    setup
        .exchange_declare(ExchangeDeclareArguments::new("ex", "direct"))
        .await
        .unwrap();

    type Case = (&'static str, u16);
    let cases: [Case; 11] = [
        ("publish to a missing exchange", 404),
        ("passive declare of a missing queue", 404),
        ("passive declare of a missing exchange", 404),
        ("redeclare a queue as durable", 406),
        ("redeclare an exchange with another type", 406),
        ("declare an amq. exchange", 403),
        ("declare an amq. queue", 403),
        ("bind a missing queue", 404),
        ("ack an unknown delivery tag", 406),
        ("tx.commit outside a transaction", 406),
        ("confirm.select on a transactional channel", 406),
    ];
    for (what, code) in cases {
        let (_connection, channel, recorder) = open_channel(&broker).await;
        let _ = tokio::time::timeout(WAIT, async {
            match what {
                "publish to a missing exchange" => {
                    let _ = channel
                        .basic_publish(
                            BasicProperties::default(),
                            b"x".to_vec(),
                            BasicPublishArguments::new("missing", "k"),
                        )
                        .await;
                    // The close arrives asynchronously; give the channel a method to fail on.
                    let _ = channel
                        .queue_declare(QueueDeclareArguments::new("existing"))
                        .await;
                }
                "passive declare of a missing queue" => {
                    let mut args = QueueDeclareArguments::new("missing");
                    args.passive(true);
                    let _ = channel.queue_declare(args).await;
                }
                "passive declare of a missing exchange" => {
                    let mut args = ExchangeDeclareArguments::new("missing", "direct");
                    args.passive(true);
                    let _ = channel.exchange_declare(args).await;
                }
                "redeclare a queue as durable" => {
                    let mut args = QueueDeclareArguments::new("existing");
                    args.durable(true);
                    let _ = channel.queue_declare(args).await;
                }
                "redeclare an exchange with another type" => {
                    let _ = channel
                        .exchange_declare(ExchangeDeclareArguments::new("ex", "fanout"))
                        .await;
                }
                "declare an amq. exchange" => {
                    let _ = channel
                        .exchange_declare(ExchangeDeclareArguments::new("amq.mine", "direct"))
                        .await;
                }
                "declare an amq. queue" => {
                    let _ = channel
                        .queue_declare(QueueDeclareArguments::new("amq.mine"))
                        .await;
                }
                "bind a missing queue" => {
                    let _ = channel
                        .queue_bind(QueueBindArguments::new("missing", "amq.direct", "k"))
                        .await;
                }
                "ack an unknown delivery tag" => {
                    let _ = channel.basic_ack(BasicAckArguments::new(99, false)).await;
                    let _ = channel
                        .queue_declare(QueueDeclareArguments::new("existing"))
                        .await;
                }
                "tx.commit outside a transaction" => {
                    let _ = channel.tx_commit().await;
                }
                "confirm.select on a transactional channel" => {
                    channel.tx_select().await.unwrap();
                    let _ = channel
                        .confirm_select(ConfirmSelectArguments::default())
                        .await;
                }
                _ => unreachable!(),
            }
        })
        .await;
        assert_eq!(recorder.close_code().await, code, "{what}");
    }
    // The setup channel never noticed.
    assert_eq!(get_body(&setup, "existing").await, None);
    setup
        .exchange_delete(ExchangeDeleteArguments::new("ex"))
        .await
        .unwrap();
}

#[tokio::test]
async fn global_prefetch_is_shared_by_the_channel_consumers() {
    let broker = Broker::start_with_config(BALANCED);
    let (_pc, publisher, _) = open_channel(&broker).await;
    let (_cc, consumer, _) = open_channel(&broker).await;
    // Two queues: with balanced placement they sit on different shards.
    for queue in ["g1", "g2"] {
        declare(&publisher, queue).await;
        for i in 0..10 {
            publish(&publisher, "", queue, format!("{queue}-{i}").as_bytes()).await;
        }
    }
    consumer
        .basic_qos(BasicQosArguments::new(0, 3, true))
        .await
        .unwrap();
    let (_, mut rx1) = consumer
        .basic_consume_rx(BasicConsumeArguments::new("g1", "one"))
        .await
        .unwrap();
    let (_, mut rx2) = consumer
        .basic_consume_rx(BasicConsumeArguments::new("g2", "two"))
        .await
        .unwrap();
    // Collect whatever arrives on either consumer: the channel as a whole holds 3 at most.
    let mut held = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(800);
    loop {
        tokio::select! {
            Some(m) = rx1.recv() => held.push(m),
            Some(m) = rx2.recv() => held.push(m),
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    assert_eq!(held.len(), 3, "the channel-wide limit is 3");
    // Settling one lets exactly one more through, from either queue.
    consumer
        .basic_ack(BasicAckArguments::new(tag(&held[0]), false))
        .await
        .unwrap();
    let mut more = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(800);
    loop {
        tokio::select! {
            Some(_) = rx1.recv() => more += 1,
            Some(_) = rx2.recv() => more += 1,
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    assert_eq!(more, 1);
}

#[tokio::test]
async fn channel_flow_off_holds_deliveries_until_it_is_on() {
    let broker = Broker::start_with_config(BALANCED);
    let (_pc, publisher, _) = open_channel(&broker).await;
    let (_cc, consumer, _) = open_channel(&broker).await;
    declare(&publisher, "flow").await;
    let (_, mut rx) = consumer
        .basic_consume_rx(BasicConsumeArguments::new("flow", "c"))
        .await
        .unwrap();
    consumer.flow(false).await.unwrap();
    for i in 0..3 {
        publish(&publisher, "", "flow", format!("{i}").as_bytes()).await;
    }
    assert_quiet(&mut rx).await;
    consumer.flow(true).await.unwrap();
    let bodies: Vec<String> = [
        next_delivery(&mut rx).await,
        next_delivery(&mut rx).await,
        next_delivery(&mut rx).await,
    ]
    .iter()
    .map(body)
    .collect();
    assert_eq!(bodies, vec!["0", "1", "2"]);
}

#[tokio::test]
async fn per_consumer_and_channel_prefetch_apply_together() {
    let broker = Broker::start_with_config(BALANCED);
    let (_pc, publisher, _) = open_channel(&broker).await;
    let (_cc, consumer, _) = open_channel(&broker).await;
    for queue in ["both-1", "both-2", "both-3"] {
        declare(&publisher, queue).await;
        for i in 0..10 {
            publish(&publisher, "", queue, format!("{queue}-{i}").as_bytes()).await;
        }
    }
    // Channel-wide 5, each consumer 2: three consumers hold 2 + 2 + 1.
    consumer
        .basic_qos(BasicQosArguments::new(0, 5, true))
        .await
        .unwrap();
    consumer
        .basic_qos(BasicQosArguments::new(0, 2, false))
        .await
        .unwrap();
    let mut receivers = Vec::new();
    for queue in ["both-1", "both-2", "both-3"] {
        let (_, rx) = consumer
            .basic_consume_rx(BasicConsumeArguments::new(queue, queue))
            .await
            .unwrap();
        receivers.push(rx);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut per_consumer = Vec::new();
    for rx in &mut receivers {
        let mut count = 0;
        while rx.try_recv().is_ok() {
            count += 1;
        }
        per_consumer.push(count);
    }
    assert!(
        per_consumer.iter().all(|n| *n <= 2),
        "per consumer: {per_consumer:?}"
    );
    assert_eq!(
        per_consumer.iter().sum::<usize>(),
        5,
        "channel-wide: {per_consumer:?}"
    );
}
