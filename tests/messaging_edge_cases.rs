//! The rest of the model's corners through amqprs: internal exchanges, delete conditions,
//! exclusive consumers, reused consumer tags, immediate, recover, concurrent declares of one
//! name from connections on different cores, and acks that outlive their queue.

mod common;

use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicGetArguments, BasicPublishArguments,
    ExchangeDeclareArguments, ExchangeDeleteArguments, QueueBindArguments, QueueDeclareArguments,
    QueueDeleteArguments,
};
use amqprs::connection::Connection;
use amqprs::BasicProperties;
use common::{guest, open_channel, Broker, CloseRecorder, BALANCED};

#[tokio::test]
async fn publishing_to_an_internal_exchange_is_refused() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel, recorder) = open_channel(&broker).await;
    let mut args = ExchangeDeclareArguments::new("hidden", "fanout");
    args.internal(true);
    channel.exchange_declare(args).await.unwrap();
    let _ = channel
        .basic_publish(
            BasicProperties::default(),
            b"x".to_vec(),
            BasicPublishArguments::new("hidden", ""),
        )
        .await;
    assert_eq!(recorder.close_code().await, 403);
}

#[tokio::test]
async fn delete_conditions_are_checked() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, setup, _) = open_channel(&broker).await;
    setup
        .exchange_declare(ExchangeDeclareArguments::new("used", "direct"))
        .await
        .unwrap();
    setup
        .queue_declare(QueueDeclareArguments::new("bound"))
        .await
        .unwrap();
    setup
        .queue_bind(QueueBindArguments::new("bound", "used", "k"))
        .await
        .unwrap();
    setup
        .basic_publish(
            BasicProperties::default(),
            b"x".to_vec(),
            BasicPublishArguments::new("", "bound"),
        )
        .await
        .unwrap();

    let (_c1, channel, recorder) = open_channel(&broker).await;
    let mut args = ExchangeDeleteArguments::new("used");
    args.if_unused = true;
    let _ = channel.exchange_delete(args).await;
    assert_eq!(recorder.close_code().await, 406, "exchange in use");

    let (_c2, channel, recorder) = open_channel(&broker).await;
    let mut args = QueueDeleteArguments::new("bound");
    args.if_empty(true);
    let _ = channel.queue_delete(args).await;
    assert_eq!(recorder.close_code().await, 406, "queue not empty");

    let (_c3, channel, recorder) = open_channel(&broker).await;
    let (_tag, _rx) = setup
        .basic_consume_rx(BasicConsumeArguments::new("bound", "holder"))
        .await
        .unwrap();
    let mut args = QueueDeleteArguments::new("bound");
    args.if_unused(true);
    let _ = channel.queue_delete(args).await;
    assert_eq!(recorder.close_code().await, 406, "queue in use");
}

#[tokio::test]
async fn exclusive_consumers_and_reused_tags() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, owner, _) = open_channel(&broker).await;
    owner
        .queue_declare(QueueDeclareArguments::new("solo"))
        .await
        .unwrap();
    let mut exclusive = BasicConsumeArguments::new("solo", "only");
    exclusive.exclusive(true);
    let (_tag, _rx) = owner.basic_consume_rx(exclusive).await.unwrap();

    let (_c2, other, recorder) = open_channel(&broker).await;
    let _ = other
        .basic_consume_rx(BasicConsumeArguments::new("solo", "second"))
        .await;
    assert_eq!(recorder.close_code().await, 403, "queue in exclusive use");

    // The same tag twice on one channel is a connection error (530).
    let connection = Connection::open(&guest(&broker)).await.unwrap();
    let closes = CloseRecorder::default();
    connection.register_callback(closes.clone()).await.unwrap();
    let channel = connection.open_channel(None).await.unwrap();
    channel
        .queue_declare(QueueDeclareArguments::new("shared"))
        .await
        .unwrap();
    let _first = channel
        .basic_consume_rx(BasicConsumeArguments::new("shared", "dup"))
        .await
        .unwrap();
    let _ = channel
        .basic_consume_rx(BasicConsumeArguments::new("shared", "dup"))
        .await;
    let (code, text) = closes
        .wait_close(Duration::from_secs(5))
        .await
        .expect("connection.close");
    assert_eq!(code, 530, "{text}");
}

#[tokio::test]
async fn immediate_publish_is_not_implemented_as_in_rabbitmq() {
    let broker = Broker::start_with_config(BALANCED);
    let connection = Connection::open(&guest(&broker)).await.unwrap();
    let closes = CloseRecorder::default();
    connection.register_callback(closes.clone()).await.unwrap();
    let channel = connection.open_channel(None).await.unwrap();
    let mut args = BasicPublishArguments::new("", "anything");
    args.immediate(true);
    let _ = channel
        .basic_publish(BasicProperties::default(), b"x".to_vec(), args)
        .await;
    let (code, text) = closes
        .wait_close(Duration::from_secs(5))
        .await
        .expect("connection.close");
    assert_eq!(code, 540, "{text}");
}

#[tokio::test]
async fn recover_redelivers_everything_unacked() {
    let broker = Broker::start_with_config(BALANCED);
    let (_c, channel, _) = open_channel(&broker).await;
    channel
        .queue_declare(QueueDeclareArguments::new("rec"))
        .await
        .unwrap();
    for i in 0..3 {
        channel
            .basic_publish(
                BasicProperties::default(),
                format!("{i}").into_bytes(),
                BasicPublishArguments::new("", "rec"),
            )
            .await
            .unwrap();
    }
    let (_, mut rx) = channel
        .basic_consume_rx(BasicConsumeArguments::new("rec", "c"))
        .await
        .unwrap();
    for _ in 0..3 {
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(!first.deliver.unwrap().redelivered());
    }
    channel.basic_recover(true).await.unwrap();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let again = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(again.deliver.unwrap().redelivered());
        bodies.push(String::from_utf8(again.content.unwrap()).unwrap());
    }
    assert_eq!(bodies, vec!["0", "1", "2"]);
}

#[tokio::test]
async fn concurrent_declares_of_one_name_resolve_to_one_queue() {
    let broker = Broker::start_with_config(BALANCED);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let port = broker.port();
        tasks.push(tokio::spawn(async move {
            let args = amqprs::connection::OpenConnectionArguments::new(
                "127.0.0.1",
                port,
                "guest",
                "guest",
            );
            let connection = Connection::open(&args).await.unwrap();
            let channel = connection.open_channel(None).await.unwrap();
            // Half ask for a durable queue: those that come second must get 406.
            let mut declare = QueueDeclareArguments::new("contested");
            declare.durable(i % 2 == 0);
            let result = channel.queue_declare(declare).await;
            (i % 2 == 0, result.is_ok(), connection)
        }));
    }
    let mut ok_durable = 0;
    let mut ok_transient = 0;
    for task in tasks {
        let (durable, ok, _connection) = task.await.unwrap();
        if ok {
            if durable {
                ok_durable += 1;
            } else {
                ok_transient += 1;
            }
        }
    }
    // Exactly one kind won, and every declare of that kind succeeded.
    assert!(
        (ok_durable, ok_transient) == (8, 0) || (ok_durable, ok_transient) == (0, 8),
        "durable ok {ok_durable}, transient ok {ok_transient}"
    );
}

/// A delivery's queue is deleted and declared again under the same name; the new queue numbers
/// its messages from the start again. Acking the old delivery must not settle the new queue's
/// message that has the same number: that one stays unacked, and comes back when its channel
/// closes.
#[tokio::test]
async fn an_ack_for_a_deleted_queue_does_not_settle_its_successor() {
    // Queues live with their connection: both incarnations on one shard, numbered alike.
    let broker = Broker::start();
    let connection = Connection::open(&guest(&broker)).await.unwrap();
    let old = connection.open_channel(None).await.unwrap();
    let new = connection.open_channel(None).await.unwrap();
    // Publishes `body` to "again" on `channel`, gets a message back and checks it is `body`.
    let round_trip = |channel: &amqprs::channel::Channel, body: &'static str| {
        let channel = channel.clone();
        async move {
            channel
                .basic_publish(
                    BasicProperties::default(),
                    body.as_bytes().to_vec(),
                    BasicPublishArguments::new("", "again"),
                )
                .await
                .unwrap();
            let (got, _, content) = channel
                .basic_get(BasicGetArguments::new("again"))
                .await
                .unwrap()
                .expect("a message");
            assert_eq!(content, body.as_bytes());
            got
        }
    };
    old.queue_declare(QueueDeclareArguments::new("again"))
        .await
        .unwrap();
    let got_old = round_trip(&old, "old").await;

    new.queue_delete(QueueDeleteArguments::new("again"))
        .await
        .unwrap();
    new.queue_declare(QueueDeclareArguments::new("again"))
        .await
        .unwrap();
    let got_new = round_trip(&new, "new").await;
    assert_eq!(got_new.delivery_tag(), 1);

    old.basic_ack(BasicAckArguments::new(got_old.delivery_tag(), false))
        .await
        .unwrap();
    // A round trip on the same channel: the ack has reached the owner before this answer.
    let mut passive = QueueDeclareArguments::new("again");
    passive.passive(true);
    old.queue_declare(passive.clone()).await.unwrap();
    new.close().await.unwrap();

    let (_, ready, _) = old.queue_declare(passive).await.unwrap().unwrap();
    assert_eq!(
        ready, 1,
        "the new message is requeued, not acked by the stale tag"
    );
    let (again, _, body) = old
        .basic_get(BasicGetArguments::new("again"))
        .await
        .unwrap()
        .expect("the new message again");
    assert_eq!(body, b"new");
    assert!(again.redelivered());
    connection.close().await.unwrap();
}
