//! Messaging through a second client library, lapin: its own codec, connection and confirm
//! handling, against the same broker (two shards, queues spread over both).

mod common;

use std::time::Duration;

use common::{lapin_channel, lapin_publish_confirmed, Broker, BALANCED};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind};

const WAIT: Duration = Duration::from_secs(10);

async fn declare(channel: &Channel, name: &str) {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue.declare");
}

async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
) -> Confirmation {
    lapin_publish_confirmed(channel, exchange, routing_key, body, Default::default()).await
}

#[tokio::test]
async fn consume_with_prefetch_and_confirmed_publishes() {
    let broker = Broker::start_with_config(BALANCED);
    let (_pc, publisher) = lapin_channel(&broker).await;
    let (_cc, consumer_channel) = lapin_channel(&broker).await;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    declare(&publisher, "work").await;
    for i in 0..50 {
        let confirmation = publish(&publisher, "", "work", format!("job-{i}").as_bytes()).await;
        assert!(confirmation.is_ack(), "job-{i}: {confirmation:?}");
    }
    consumer_channel
        .basic_qos(5, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = consumer_channel
        .basic_consume(
            "work".into(),
            "worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..50 {
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("delivery in time")
            .expect("consumer open")
            .expect("delivery");
        assert_eq!(delivery.data, format!("job-{i}").into_bytes());
        assert_eq!(delivery.routing_key.as_str(), "work");
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
}

#[tokio::test]
async fn topic_routing_get_and_nack_requeue() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel) = lapin_channel(&broker).await;
    channel
        .exchange_declare(
            "logs".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    declare(&channel, "errors").await;
    channel
        .queue_bind(
            "errors".into(),
            "logs".into(),
            "*.error".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    publish(&channel, "logs", "db.error", b"disk full").await;
    publish(&channel, "logs", "db.info", b"ignored").await;
    let message = channel
        .basic_get("errors".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("one message");
    assert_eq!(message.delivery.data, b"disk full");
    assert_eq!(message.message_count, 0);
    assert!(!message.delivery.redelivered);
    message
        .delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let again = channel
        .basic_get("errors".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("requeued");
    assert!(again.delivery.redelivered);
    assert!(channel
        .basic_get("errors".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn mandatory_publish_without_a_route_is_returned() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel) = lapin_channel(&broker).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirmation = channel
        .basic_publish(
            "amq.direct".into(),
            "nobody-home".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"bounce",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let returned = confirmation.take_message().expect("a returned message");
    assert_eq!(returned.data, b"bounce");
    assert_eq!(returned.reply_code, 312);
}

#[tokio::test]
async fn transactions_commit_through_lapin() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel) = lapin_channel(&broker).await;
    declare(&channel, "txq").await;
    channel.tx_select().await.unwrap();
    publish(&channel, "", "txq", b"a").await;
    publish(&channel, "", "txq", b"b").await;
    channel.tx_commit().await.unwrap();
    let declared = channel
        .queue_declare(
            "txq".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(declared.message_count(), 2);
}

#[tokio::test]
async fn headers_arguments_and_errors_through_lapin() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel) = lapin_channel(&broker).await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-custom".into(), AMQPValue::LongString("v".into()));
    channel
        .queue_declare(
            "args".into(),
            QueueDeclareOptions::default(),
            arguments.clone(),
        )
        .await
        .unwrap();
    // Same arguments: fine. Different: 406 and the channel closes.
    channel
        .queue_declare("args".into(), QueueDeclareOptions::default(), arguments)
        .await
        .unwrap();
    let error = channel
        .queue_declare(
            "args".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("inequivalent arguments");
    assert!(
        error.to_string().contains("406") || error.to_string().contains("PRECONDITION"),
        "{error}"
    );
}

/// RabbitMQ's checks on queue arguments: a negative x-message-ttl or a dead-letter routing key
/// without a dead-letter exchange is refused with 406 and RabbitMQ's wording, closing only that
/// channel; the connection goes on, and valid arguments (applied or not) are accepted.
#[tokio::test]
async fn invalid_queue_arguments_are_refused_as_rabbitmq_refuses_them() {
    let broker = Broker::start_with_config(BALANCED);
    let (connection, _channel) = lapin_channel(&broker).await;
    let refused = [
        (
            "x-message-ttl",
            AMQPValue::LongInt(-5),
            "invalid arg 'x-message-ttl' for queue 'bad' in vhost '/': {value_negative,-5}",
        ),
        (
            "x-dead-letter-routing-key",
            AMQPValue::LongString("dead".into()),
            "invalid arg 'x-dead-letter-routing-key' for queue 'bad' in vhost '/': \
             routing_key_but_no_dlx_defined",
        ),
        (
            "x-max-priority",
            AMQPValue::LongString("9".into()),
            "invalid arg 'x-max-priority' for queue 'bad' in vhost '/': \
             \"expected integer, got longstr\"",
        ),
    ];
    for (name, value, text) in refused {
        let channel = connection.create_channel().await.expect("channel");
        let mut arguments = FieldTable::default();
        arguments.insert(name.into(), value);
        let error = channel
            .queue_declare("bad".into(), QueueDeclareOptions::default(), arguments)
            .await
            .expect_err("refused");
        let error = error.to_string();
        assert!(
            error.contains("PRECONDITION_FAILED") && error.contains(text),
            "{name}: {error}"
        );
    }
    let channel = connection.create_channel().await.expect("channel");
    let mut arguments = FieldTable::default();
    arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(60_000));
    arguments.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(10));
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString("dead".into()),
    );
    channel
        .queue_declare("good".into(), QueueDeclareOptions::default(), arguments)
        .await
        .expect("valid arguments are accepted");
}
