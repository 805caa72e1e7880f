//! Connection-level refusals, seen through a third-party client (amqprs), while a healthy
//! connection next to them keeps working.

mod common;

use std::time::Duration;

use amqprs::channel::BasicQosArguments;
use amqprs::connection::{Connection, OpenConnectionArguments};
use common::{assert_broker_serves, guest, refused, Broker, CloseRecorder};

#[tokio::test]
async fn wrong_password_is_refused_with_403() {
    let broker = Broker::start();
    let healthy = Connection::open(&guest(&broker)).await.expect("connect");
    let arguments = OpenConnectionArguments::new("127.0.0.1", broker.port(), "guest", "wrong");
    let text = refused(&arguments).await;
    assert!(
        text.contains("403") || text.contains("ACCESS_REFUSED"),
        "{text}"
    );
    assert!(broker.log_contains("login refused"), "{}", broker.log());
    let channel = healthy
        .open_channel(None)
        .await
        .expect("healthy connection works");
    channel.close().await.expect("close");
    healthy.close().await.expect("close");
}

#[tokio::test]
async fn unknown_user_is_refused_with_403() {
    let broker = Broker::start();
    let arguments = OpenConnectionArguments::new("127.0.0.1", broker.port(), "mallory", "guest");
    let text = refused(&arguments).await;
    assert!(
        text.contains("403") || text.contains("ACCESS_REFUSED"),
        "{text}"
    );
    assert_broker_serves(&broker).await;
}

#[tokio::test]
async fn unknown_vhost_is_refused_with_530() {
    let broker = Broker::start();
    let mut arguments = guest(&broker);
    arguments.virtual_host("no-such-vhost");
    let text = refused(&arguments).await;
    assert!(
        text.contains("530") || text.contains("NOT_ALLOWED"),
        "{text}"
    );
    assert_broker_serves(&broker).await;
}

#[tokio::test]
async fn configured_users_and_vhosts_are_honoured() {
    let broker = Broker::start_with_config(
        r#"
vhosts = ["/", "staging"]
[[users]]
name = "app"
password = "s3cret"
vhosts = ["staging"]
"#,
    );
    let mut arguments = OpenConnectionArguments::new("127.0.0.1", broker.port(), "app", "s3cret");
    arguments.virtual_host("staging");
    let connection = Connection::open(&arguments)
        .await
        .expect("app may open staging");
    connection.close().await.expect("close");
    arguments.virtual_host("/");
    let text = refused(&arguments).await;
    assert!(
        text.contains("530") || text.contains("NOT_ALLOWED"),
        "{text}"
    );
    // The users list replaced the default one: guest is gone.
    refused(&guest(&broker)).await;
}

#[tokio::test]
async fn unsupported_qos_prefetch_size_closes_the_connection_with_540() {
    let broker = Broker::start();
    let healthy = Connection::open(&guest(&broker)).await.expect("connect");
    let connection = Connection::open(&guest(&broker)).await.expect("connect");
    let recorder = CloseRecorder::default();
    connection
        .register_callback(recorder.clone())
        .await
        .expect("callback");
    let channel = connection.open_channel(None).await.expect("channel");
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        channel.basic_qos(BasicQosArguments::new(1024, 10, false)),
    )
    .await;
    let (code, text) = recorder
        .wait_close(Duration::from_secs(5))
        .await
        .expect("connection.close from the broker");
    assert_eq!(code, 540, "{text}");
    assert!(text.contains("prefetch_size"), "{text}");
    let channel = healthy
        .open_channel(None)
        .await
        .expect("healthy connection works");
    channel.close().await.expect("close");
    healthy.close().await.expect("close");
}
