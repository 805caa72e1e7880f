//! Hostile and broken peers at the byte level: bad protocol header, oversized frames, silence
//! instead of heartbeats, channel numbers past channel_max. A healthy third-party client keeps
//! working next to each of them.

mod common;

use std::time::{Duration, Instant};

use amqprs::connection::Connection;
use common::raw::{frame, RawClient, PROTOCOL_HEADER};
use common::{assert_broker_serves, guest, Broker};

#[tokio::test]
async fn garbage_instead_of_the_protocol_header_gets_the_header_and_a_close() {
    let broker = Broker::start();
    let healthy = Connection::open(&guest(&broker)).await.expect("connect");
    let addr = broker.addr;
    tokio::task::spawn_blocking(move || {
        for garbage in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"AMQP\x00\x00\x08\x00",
            b"AMQP\x01\x01\x00\x0a",
        ] {
            let mut client = RawClient::connect(addr);
            client.send(garbage);
            let mut answer = [0u8; 8];
            std::io::Read::read_exact(&mut client.stream, &mut answer).expect("header back");
            assert_eq!(&answer, PROTOCOL_HEADER);
            assert!(
                client.closed_within(Duration::from_secs(5)),
                "socket closed"
            );
        }
    })
    .await
    .unwrap();
    let channel = healthy.open_channel(None).await.expect("healthy works");
    channel.close().await.unwrap();
    healthy.close().await.unwrap();
}

#[tokio::test]
async fn oversized_frame_is_a_501_frame_error() {
    let broker = Broker::start();
    let healthy = Connection::open(&guest(&broker)).await.expect("connect");
    let addr = broker.addr;
    tokio::task::spawn_blocking(move || {
        let mut client = RawClient::handshake(addr, 0, 4096, 0);
        let open_ok = client.open_channel(1).expect("channel.open-ok");
        assert_eq!(open_ok.method_ids(), Some((20, 11)));
        // A body frame of 8,000 bytes where 4,096 was negotiated.
        client.send(&frame(3, 1, &vec![0u8; 8000]));
        let close = client.read_method().expect("connection.close");
        assert_eq!(close.method_ids(), Some((10, 50)));
        assert_eq!(close.close_code(), Some(501));
        assert!(client.closed_within(Duration::from_secs(5)));
    })
    .await
    .unwrap();
    let channel = healthy.open_channel(None).await.expect("healthy works");
    channel.close().await.unwrap();
    healthy.close().await.unwrap();
}

#[tokio::test]
async fn bad_frame_end_and_unknown_frame_type_are_501() {
    let broker = Broker::start();
    let addr = broker.addr;
    tokio::task::spawn_blocking(move || {
        let mut bad_end = frame(8, 0, &[]);
        *bad_end.last_mut().unwrap() = 0x00;
        for bytes in [bad_end, frame(7, 0, &[])] {
            let mut client = RawClient::handshake(addr, 0, 0, 0);
            client.send(&bytes);
            let close = client.read_method().expect("connection.close");
            assert_eq!(close.close_code(), Some(501), "{close:?}");
        }
    })
    .await
    .unwrap();
    assert_broker_serves(&broker).await;
}

#[tokio::test]
async fn a_silent_peer_is_disconnected_after_two_heartbeat_intervals() {
    let broker = Broker::start();
    let healthy = Connection::open(&guest(&broker)).await.expect("connect");
    let addr = broker.addr;
    let elapsed = tokio::task::spawn_blocking(move || {
        let mut client = RawClient::handshake(addr, 0, 0, 1);
        let started = Instant::now();
        // Send nothing, not even heartbeats.
        assert!(
            client.closed_within(Duration::from_secs(6)),
            "broker closed the socket"
        );
        started.elapsed()
    })
    .await
    .unwrap();
    assert!(
        elapsed >= Duration::from_millis(1900),
        "closed too early: {elapsed:?}"
    );
    assert!(broker.log_contains("missed heartbeats"), "{}", broker.log());
    let channel = healthy.open_channel(None).await.expect("healthy works");
    channel.close().await.unwrap();
    healthy.close().await.unwrap();
}

#[tokio::test]
async fn broker_sends_heartbeats_on_schedule() {
    let broker = Broker::start();
    let addr = broker.addr;
    tokio::task::spawn_blocking(move || {
        let mut client = RawClient::handshake(addr, 0, 0, 2);
        let started = Instant::now();
        let mut heartbeats = 0;
        while started.elapsed() < Duration::from_millis(3500) {
            // Keep the broker from timing us out.
            client.send(&frame(8, 0, &[]));
            client
                .stream
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut header = [0u8; 8];
            if std::io::Read::read_exact(&mut client.stream, &mut header).is_ok() {
                assert_eq!(header, [8, 0, 0, 0, 0, 0, 0, 0xCE]);
                heartbeats += 1;
            }
        }
        assert!(
            heartbeats >= 2,
            "got {heartbeats} heartbeats in 3.5 s at a 2 s interval"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn channel_number_above_channel_max_is_refused() {
    let broker = Broker::start();
    let addr = broker.addr;
    tokio::task::spawn_blocking(move || {
        let mut client = RawClient::handshake(addr, 8, 0, 0);
        assert_eq!(client.open_channel(8).unwrap().method_ids(), Some((20, 11)));
        let close = client.open_channel(9).expect("connection.close");
        assert_eq!(close.close_code(), Some(530));
        client.send_close_ok();
        assert!(client.closed_within(Duration::from_secs(5)));
    })
    .await
    .unwrap();
    assert_broker_serves(&broker).await;
}

#[tokio::test]
async fn content_without_a_publish_is_an_unexpected_frame() {
    let broker = Broker::start();
    let addr = broker.addr;
    tokio::task::spawn_blocking(move || {
        let mut client = RawClient::handshake(addr, 0, 0, 0);
        client.open_channel(1).expect("open-ok");
        client.send(&frame(3, 1, b"stray body"));
        let close = client.read_method().expect("connection.close");
        assert_eq!(close.close_code(), Some(505));
    })
    .await
    .unwrap();
    assert_broker_serves(&broker).await;
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_dropped() {
    let broker = Broker::start_with_config("[connection]\nhandshake_timeout_ms = 500\n");
    let addr = broker.addr;
    tokio::task::spawn_blocking(move || {
        let mut client = RawClient::connect(addr);
        client.send(PROTOCOL_HEADER);
        assert_eq!(client.read_method().unwrap().method_ids(), Some((10, 10)));
        assert!(client.closed_within(Duration::from_secs(5)));
    })
    .await
    .unwrap();
    assert_broker_serves(&broker).await;
}

/// A client that never answers our connection.close is dropped after `close_timeout_ms`, also
/// on a connection without heartbeats (whose timer otherwise sleeps until the connection
/// closes).
#[tokio::test]
async fn a_client_that_never_sends_close_ok_is_dropped() {
    let broker = Broker::start_with_config("[connection]\nclose_timeout_ms = 300\n");
    let addr = broker.addr;
    tokio::task::spawn_blocking(move || {
        let mut client = RawClient::handshake(addr, 8, 0, 0);
        assert_eq!(client.open_channel(8).unwrap().method_ids(), Some((20, 11)));
        // Past the handshake's 500 ms tick: the timer now sleeps until something wakes it.
        std::thread::sleep(Duration::from_millis(700));
        let close = client.open_channel(9).expect("connection.close");
        assert_eq!(close.close_code(), Some(530));
        assert!(client.closed_within(Duration::from_secs(5)));
    })
    .await
    .unwrap();
    assert_broker_serves(&broker).await;
}
