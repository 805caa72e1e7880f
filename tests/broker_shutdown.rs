//! SIGTERM and SIGINT: the broker stops accepting, closes every connection with 320
//! CONNECTION_FORCED, and exits 0.

mod common;

use std::time::Duration;

use amqprs::connection::Connection;
use common::{guest, Broker, CloseRecorder};

async fn shutdown_by(signal: i32) {
    let mut broker = Broker::start();
    let mut recorders = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..4 {
        let connection = Connection::open(&guest(&broker)).await.expect("connect");
        let recorder = CloseRecorder::default();
        connection
            .register_callback(recorder.clone())
            .await
            .unwrap();
        connection.open_channel(None).await.expect("channel");
        recorders.push(recorder);
        connections.push(connection);
    }
    broker.signal(signal);
    for recorder in &recorders {
        let (code, text) = recorder
            .wait_close(Duration::from_secs(10))
            .await
            .expect("connection.close from the broker");
        assert_eq!(code, 320, "{text}");
        assert!(text.contains("CONNECTION_FORCED"), "{text}");
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = broker.wait_exit(Duration::from_secs(15));
        (status, broker)
    })
    .await
    .unwrap();
    let (status, broker) = status;
    let status = status.expect("the broker exits");
    assert!(status.success(), "exit status {status:?}\n{}", broker.log());
    assert!(
        std::net::TcpStream::connect_timeout(&broker.addr, Duration::from_secs(1)).is_err(),
        "nothing listens after shutdown"
    );
}

#[tokio::test]
async fn sigterm_closes_connections_with_320_and_exits_0() {
    shutdown_by(libc::SIGTERM).await;
}

#[tokio::test]
async fn sigint_closes_connections_with_320_and_exits_0() {
    shutdown_by(libc::SIGINT).await;
}
