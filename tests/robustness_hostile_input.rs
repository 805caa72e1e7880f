//! Hostile input over the socket while a healthy client works next to it.
//!
//! One broker; an amqprs client publishes with confirms and consumes the whole time. The suite
//! sends every kind of broken or malicious input the conformance issue lists, several rounds,
//! and checks for each the spec's answer (connection.close with the right code, or a clean socket
//! close). Afterwards: the healthy client saw no error and received every confirmed message in
//! order, the broker's memory and open descriptors are back at their baseline, and it still
//! serves new clients.

mod common;

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicConsumeArguments, BasicPublishArguments, ConfirmSelectArguments, QueueDeclareArguments,
};
use amqprs::connection::Connection;
use amqprs::BasicProperties;
use common::raw::{frame, method_frame, RawClient, PROTOCOL_HEADER};
use common::{assert_broker_serves, guest, rss_bytes, Broker, ChannelRecorder, CloseRecorder};

const CONFIG: &str = "[connection]\nhandshake_timeout_ms = 2000\n";

/// A client that keeps publishing (with confirms) and consuming until told to stop.
struct HealthyClient {
    stop: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Result<u64, String>>,
}

impl HealthyClient {
    async fn start(broker: &Broker) -> HealthyClient {
        let connection = Connection::open(&guest(broker)).await.expect("connect");
        let closes = CloseRecorder::default();
        connection.register_callback(closes.clone()).await.unwrap();
        let publisher = connection.open_channel(None).await.unwrap();
        let publisher_events = ChannelRecorder::default();
        publisher
            .register_callback(publisher_events.clone())
            .await
            .unwrap();
        publisher
            .confirm_select(ConfirmSelectArguments::default())
            .await
            .unwrap();
        publisher
            .queue_declare(QueueDeclareArguments::new("healthy"))
            .await
            .unwrap();
        let consumer = connection.open_channel(None).await.unwrap();
        let consumer_events = ChannelRecorder::default();
        consumer
            .register_callback(consumer_events.clone())
            .await
            .unwrap();
        let mut consume = BasicConsumeArguments::new("healthy", "healthy-consumer");
        consume.manual_ack(false);
        let (_, mut deliveries) = consumer.basic_consume_rx(consume).await.unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let (stop_flag, count) = (stop.clone(), published.clone());
        let task = tokio::spawn(async move {
            // Dropping an amqprs channel closes it: the consumer's lives as long as the task.
            let _consumer = consumer;
            let mut received = 0u64;
            let mut next = 0u64;
            loop {
                if !stop_flag.load(Ordering::Relaxed) {
                    publisher
                        .basic_publish(
                            BasicProperties::default(),
                            next.to_be_bytes().to_vec(),
                            BasicPublishArguments::new("", "healthy"),
                        )
                        .await
                        .map_err(|e| format!("publish {next}: {e}"))?;
                    next += 1;
                    count.store(next, Ordering::Relaxed);
                }
                // Drain what has arrived; pace publishing at a few hundred per second.
                let wait = tokio::time::sleep(Duration::from_millis(3));
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        message = deliveries.recv() => {
                            let message = message.ok_or("the consumer was closed")?;
                            let body = message.content.unwrap_or_default();
                            let got = u64::from_be_bytes(
                                body.as_slice().try_into().map_err(|_| "a foreign body")?,
                            );
                            if got != received {
                                return Err(format!("expected message {received}, got {got}"));
                            }
                            received += 1;
                        }
                        _ = &mut wait => break,
                    }
                }
                if stop_flag.load(Ordering::Relaxed) && received == next {
                    break;
                }
            }
            if publisher_events.confirmed_up_to() < next {
                // Confirms may trail the deliveries by a moment.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let problems = [
                (!closes.codes().is_empty())
                    .then(|| format!("connection closes {:?}", closes.codes())),
                (!publisher_events.closes.lock().unwrap().is_empty())
                    .then(|| format!("publisher closes {:?}", publisher_events.closes)),
                (!consumer_events.closes.lock().unwrap().is_empty())
                    .then(|| format!("consumer closes {:?}", consumer_events.closes)),
                (!publisher_events.nacks.lock().unwrap().is_empty()).then(|| "nacks".to_string()),
                (publisher_events.confirmed_up_to() < next)
                    .then(|| format!("confirmed {} of {next}", publisher_events.confirmed_up_to())),
            ];
            if let Some(problem) = problems.into_iter().flatten().next() {
                return Err(problem);
            }
            connection.close().await.map_err(|e| e.to_string())?;
            Ok(received)
        });
        HealthyClient {
            stop,
            published,
            task,
        }
    }

    /// Stops publishing, waits until everything published arrived; returns the count.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let received = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the healthy client finishes")
            .expect("the healthy client's task")
            .unwrap_or_else(|e| panic!("the healthy client saw an error: {e}"));
        assert_eq!(received, self.published.load(Ordering::Relaxed));
        received
    }
}

fn short_string(value: &[u8]) -> Vec<u8> {
    let mut out = vec![value.len() as u8];
    out.extend_from_slice(value);
    out
}

/// queue.declare arguments: reserved, name, no flags, then `table` as the arguments table.
fn queue_declare(name: &[u8], table: &[u8]) -> Vec<u8> {
    let mut arguments = vec![0, 0];
    arguments.extend(short_string(name));
    arguments.push(0);
    arguments.extend_from_slice(&(table.len() as u32).to_be_bytes());
    arguments.extend_from_slice(table);
    arguments
}

fn basic_publish(routing_key: &str) -> Vec<u8> {
    let mut arguments = vec![0, 0];
    arguments.extend(short_string(b""));
    arguments.extend(short_string(routing_key.as_bytes()));
    arguments.push(0);
    method_frame(1, 60, 40, &arguments)
}

fn content_header(body_size: u64) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&60u16.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload.extend_from_slice(&body_size.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    frame(2, 1, &payload)
}

/// A handshaken client with channel 1 open.
fn with_channel(addr: SocketAddr) -> RawClient {
    let mut client = RawClient::handshake(addr, 0, 0, 0);
    assert_eq!(client.open_channel(1).unwrap().method_ids(), Some((20, 11)));
    client
}

/// Sends `bytes` and expects connection.close with `code`, then the socket closed.
fn expect_connection_close(mut client: RawClient, bytes: &[u8], code: u16, what: &str) {
    client.send(bytes);
    let close = client
        .read_method()
        .unwrap_or_else(|| panic!("{what}: socket closed without connection.close"));
    assert_eq!(close.method_ids(), Some((10, 50)), "{what}: {close:?}");
    assert_eq!(close.close_code(), Some(code), "{what}");
    client.send_close_ok();
    assert!(
        client.closed_within(Duration::from_secs(5)),
        "{what}: socket closed"
    );
}

/// One round of every attack, each checked for the spec's answer.
fn attack_round(addr: SocketAddr) {
    // A wrong protocol header: ours back, then the socket closes.
    for header in [&b"AMQP\x00\x00\x08\x00"[..], b"GET / HTTP/1.0\r\n\r\n"] {
        let mut client = RawClient::connect(addr);
        client.send(header);
        let mut answer = [0u8; 8];
        std::io::Read::read_exact(&mut client.stream, &mut answer).expect("header back");
        assert_eq!(&answer, PROTOCOL_HEADER);
        assert!(client.closed_within(Duration::from_secs(5)), "bad header");
    }

    // A truncated frame, then the client hangs up: the broker closes its side cleanly.
    let mut client = with_channel(addr);
    let declare = method_frame(1, 50, 10, &queue_declare(b"never", &[]));
    client.send(&declare[..declare.len() / 2]);
    client.stream.shutdown(Shutdown::Write).unwrap();
    assert!(
        client.closed_within(Duration::from_secs(5)),
        "truncated frame"
    );

    // A frame larger than frame_max (4096 negotiated).
    let mut client = RawClient::handshake(addr, 0, 4096, 0);
    client.open_channel(1).unwrap();
    expect_connection_close(client, &frame(3, 1, &[0u8; 8000]), 501, "oversized frame");

    // Unknown frame types.
    for frame_type in [0u8, 4, 7, 255] {
        expect_connection_close(
            with_channel(addr),
            &frame(frame_type, 0, b"x"),
            501,
            "unknown frame type",
        );
    }

    // A method on a channel never opened.
    expect_connection_close(
        RawClient::handshake(addr, 0, 0, 0),
        &method_frame(7, 50, 10, &queue_declare(b"q", &[])),
        504,
        "method on an unopened channel",
    );

    // Content without a method: a header, then a body.
    expect_connection_close(
        with_channel(addr),
        &content_header(3),
        505,
        "header without publish",
    );
    expect_connection_close(
        with_channel(addr),
        &frame(3, 1, b"abc"),
        505,
        "body without publish",
    );

    // A body longer than its header declared.
    let mut bytes = basic_publish("healthy-not");
    bytes.extend(content_header(3));
    bytes.extend(frame(3, 1, b"abcdef"));
    expect_connection_close(with_channel(addr), &bytes, 501, "body longer than declared");

    // A header declaring a 1 TB body: the channel is closed with 406 at once, and the
    // connection goes on working.
    let mut client = with_channel(addr);
    let mut bytes = basic_publish("healthy-not");
    bytes.extend(content_header(1 << 40));
    client.send(&bytes);
    let close = client.read_method().expect("channel.close");
    assert_eq!(close.method_ids(), Some((20, 40)), "1 TB header: {close:?}");
    assert_eq!(close.close_code(), Some(406));
    client.send(&method_frame(1, 20, 41, &[]));
    assert_eq!(client.open_channel(2).unwrap().method_ids(), Some((20, 11)));

    // Field tables nested 2,000 deep (inside frame_max): refused, no stack overflow.
    let mut table = Vec::new();
    for _ in 0..2000 {
        let mut outer = short_string(b"k");
        outer.push(b'F');
        outer.extend_from_slice(&(table.len() as u32).to_be_bytes());
        outer.extend_from_slice(&table);
        table = outer;
    }
    expect_connection_close(
        with_channel(addr),
        &method_frame(1, 50, 10, &queue_declare(b"deep", &table)),
        501,
        "deeply nested tables",
    );

    // A short string of 255 bytes is valid: a queue with a 255-byte name is declared.
    let mut client = with_channel(addr);
    let name = vec![b'n'; 255];
    client.send(&method_frame(1, 50, 10, &queue_declare(&name, &[])));
    let declare_ok = client.read_method().expect("declare-ok");
    assert_eq!(declare_ok.method_ids(), Some((50, 11)));
    client.send(&method_frame(1, 50, 40, &{
        let mut delete = vec![0, 0];
        delete.extend(short_string(&name));
        delete.push(0);
        delete
    }));
    assert_eq!(client.read_method().unwrap().method_ids(), Some((50, 41)));

    // A long string declaring 4 GB.
    let mut arguments = vec![0, 0];
    arguments.extend(short_string(b"q"));
    arguments.push(0);
    arguments.extend_from_slice(&0xFFFF_FFF0u32.to_be_bytes());
    arguments.extend_from_slice(b"only a few bytes");
    expect_connection_close(
        with_channel(addr),
        &method_frame(1, 50, 10, &arguments),
        501,
        "4 GB long string",
    );

    // channel_max + 1.
    let mut client = RawClient::handshake(addr, 16, 0, 0);
    assert_eq!(
        client.open_channel(16).unwrap().method_ids(),
        Some((20, 11))
    );
    expect_connection_close(
        client,
        &method_frame(17, 20, 10, &[0]),
        530,
        "channel_max + 1",
    );
}

/// The protocol header one byte per second: dropped by the handshake timeout (2 s here).
fn slowloris(addr: SocketAddr) -> Duration {
    let mut client = RawClient::connect(addr);
    let started = Instant::now();
    let mut dropped = false;
    for byte in PROTOCOL_HEADER.iter().take(7) {
        if std::io::Write::write_all(&mut client.stream, &[*byte]).is_err() {
            dropped = true;
            break;
        }
        if client.closed_within(Duration::from_secs(1)) {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "slowloris was not dropped");
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(6),
        "dropped after {elapsed:?}"
    );
    elapsed
}

/// Thousands of connections opened and dropped without closing, at every stage of the
/// handshake.
fn connection_flood(addr: SocketAddr, count: usize) {
    for i in 0..count {
        match i % 3 {
            0 => drop(TcpStream::connect(addr).expect("connect")),
            1 => {
                let mut client = RawClient::connect(addr);
                client.send(PROTOCOL_HEADER);
            }
            _ => drop(RawClient::handshake(addr, 0, 0, 0)),
        }
    }
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

/// Waits up to 10 s for `measure` to drop to `limit` or below; returns the last value.
fn settles_to(limit: u64, measure: impl Fn() -> u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = measure();
        if value <= limit || Instant::now() > deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_the_spec_answer_and_leaves_no_trace() {
    let broker = Broker::start_with_config(CONFIG);
    let healthy = HealthyClient::start(&broker).await;
    let (addr, pid) = (broker.addr, broker.pid());

    let (baseline_rss, baseline_fds, later_rss, fds_after) =
        tokio::task::spawn_blocking(move || {
            // A first round warms up allocator arenas and buffers; it is the baseline.
            attack_round(addr);
            connection_flood(addr, 300);
            std::thread::sleep(Duration::from_millis(500));
            let baseline_rss = rss_bytes(pid);
            let baseline_fds = open_descriptors(pid);

            for _ in 0..3 {
                attack_round(addr);
            }
            let slow = slowloris(addr);
            eprintln!("slowloris dropped after {slow:?}");
            connection_flood(addr, 3000);

            let fds_after = settles_to(baseline_fds as u64, || open_descriptors(pid) as u64);
            let slack = 8 << 20;
            let later_rss = settles_to(baseline_rss + slack, || rss_bytes(pid));
            (baseline_rss, baseline_fds, later_rss, fds_after)
        })
        .await
        .unwrap();

    let delivered = healthy.finish().await;
    eprintln!(
        "healthy client: {delivered} messages; broker RSS {} KiB at baseline, {} KiB after; \
         descriptors {baseline_fds} -> {fds_after}",
        baseline_rss >> 10,
        later_rss >> 10
    );
    assert!(
        delivered > 100,
        "the healthy client barely ran: {delivered}"
    );
    assert!(
        fds_after <= baseline_fds as u64,
        "descriptors {baseline_fds} -> {fds_after}: connections leaked"
    );
    assert!(
        later_rss <= baseline_rss + (8 << 20),
        "RSS grew from {baseline_rss} to {later_rss} over three rounds and 3,000 connections"
    );
    assert_broker_serves(&broker).await;
    assert!(!broker.log_contains("panicked"), "{}", broker.log());
}

#[tokio::test]
async fn max_connections_refuses_with_530_and_frees_slots_on_close() {
    let broker = Broker::start_with_config("[connection]\nmax_connections = 2\n");
    let first = Connection::open(&guest(&broker)).await.expect("first");
    let second = Connection::open(&guest(&broker)).await.expect("second");
    let refusal = common::refused(&guest(&broker)).await;
    assert!(
        refusal.contains("530") || refusal.contains("limit"),
        "{refusal}"
    );
    // A socket that never finishes the handshake does not count against the limit.
    let addr = broker.addr;
    let idle = tokio::task::spawn_blocking(move || {
        let mut client = RawClient::connect(addr);
        client.send(PROTOCOL_HEADER);
        client
    })
    .await
    .unwrap();
    first.close().await.unwrap();
    // The slot is given back when the connection ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    let third = loop {
        match Connection::open(&guest(&broker)).await {
            Ok(connection) => break connection,
            Err(e) if Instant::now() > deadline => panic!("no slot freed: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let channel = third.open_channel(None).await.expect("works");
    channel.close().await.unwrap();
    third.close().await.unwrap();
    second.close().await.unwrap();
    drop(idle);
    assert!(broker.log_contains("node connection limit (2) is reached"));
}
