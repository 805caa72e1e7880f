//! A third-party client (amqprs) connects, opens and closes channels, and closes cleanly.

mod common;

use std::time::Duration;

use amqprs::connection::Connection;
use common::{guest, Broker};

#[tokio::test]
async fn client_connects_opens_channels_and_closes_cleanly() {
    let broker = Broker::start();
    let connection = Connection::open(&guest(&broker)).await.expect("connect");
    let properties = connection.server_properties();
    assert_eq!(properties.product(), "shardmq");
    let capabilities = properties.capabilities();
    assert!(capabilities.publisher_confirms());
    assert!(capabilities.exchange_exchange_bindings());
    assert!(capabilities.basic_nack());
    assert!(capabilities.consumer_cancel_notify());
    assert!(capabilities.connection_blocked());
    assert!(capabilities.authentication_failure_close());
    assert!(capabilities.per_consumer_qos());

    let mut channels = Vec::new();
    for _ in 0..5 {
        channels.push(connection.open_channel(None).await.expect("open channel"));
    }
    // Close two in the middle and open more: numbers are reused and nothing breaks.
    channels.remove(1).close().await.expect("close channel");
    channels.remove(2).close().await.expect("close channel");
    for _ in 0..3 {
        channels.push(connection.open_channel(None).await.expect("reopen channel"));
    }
    assert_eq!(channels.len(), 6);
    for channel in channels {
        assert!(channel.is_open());
        channel.close().await.expect("close channel");
    }
    connection.close().await.expect("close connection");
    assert!(broker.log_contains("connection opened"), "{}", broker.log());
}

#[tokio::test]
async fn channel_flow_is_acknowledged() {
    let broker = Broker::start();
    let connection = Connection::open(&guest(&broker)).await.expect("connect");
    let channel = connection.open_channel(None).await.expect("channel");
    assert!(!channel.flow(false).await.expect("flow-ok"));
    assert!(channel.flow(true).await.expect("flow-ok"));
    channel.close().await.expect("close");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn many_connections_spread_over_the_shards_work_at_once() {
    let broker = Broker::start();
    let mut connections = Vec::new();
    for _ in 0..20 {
        connections.push(Connection::open(&guest(&broker)).await.expect("connect"));
    }
    for connection in &connections {
        let channel = connection.open_channel(None).await.expect("open channel");
        channel.close().await.expect("close channel");
    }
    for connection in connections {
        connection.close().await.expect("close");
    }
}

#[tokio::test]
async fn explicit_channel_numbers_up_to_channel_max() {
    let broker = Broker::start_with_config("[connection]\nchannel_max = 16\n");
    let connection = Connection::open(&guest(&broker)).await.expect("connect");
    assert_eq!(connection.channel_max(), 16);
    let channel = connection.open_channel(Some(16)).await.expect("channel 16");
    channel.close().await.expect("close");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn heartbeats_keep_an_idle_connection_alive() {
    let broker = Broker::start();
    let mut arguments = guest(&broker);
    arguments.heartbeat(1);
    let connection = Connection::open(&arguments).await.expect("connect");
    assert_eq!(connection.heartbeat(), 1);
    // Three intervals of silence from the application: the client's heartbeats and ours keep the
    // connection open.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(connection.is_open());
    let channel = connection.open_channel(None).await.expect("still usable");
    channel.close().await.expect("close");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn update_secret_with_the_current_password_is_accepted() {
    let broker = Broker::start();
    let connection = Connection::open(&guest(&broker)).await.expect("connect");
    connection
        .update_secret("guest", "rotation")
        .await
        .expect("update-secret-ok");
    let channel = connection.open_channel(None).await.expect("still usable");
    channel.close().await.expect("close");
    connection.close().await.expect("close");
}
