//! Clients that do one thing at a time on their socket. rabbitmq-c (behind php-amqp and many C
//! programs) writes an ack with a blocking `send` and reads nothing meanwhile. The broker stops
//! reading a client that does not read what it is sent; had it stopped reading acks too, such a
//! consumer, blocked writing acks the broker no longer reads, would never read again, and the
//! broker would never drain what it owes it: the connection would hang for good.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::raw::{close_arguments, method_frame, short_string, RawClient, RawFrame};
use common::{assert_broker_serves, lapin_channel, lapin_publish, rss_bytes, Broker};

const MESSAGES: u64 = 40_000;
/// Their acks (22 bytes each) are more than the broker's socket buffer and the client's hold.
const READ_BEFORE_ACKING: u64 = 20_000;

/// The delivery tag of a basic.deliver method frame (60, 60), if it is one.
fn delivery_tag(frame: &RawFrame) -> Option<u64> {
    if frame.method_ids() != Some((60, 60)) {
        return None;
    }
    let tag_at = 4 + 1 + usize::from(frame.payload[4]);
    let bytes = frame.payload.get(tag_at..tag_at + 8)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Reads frames until the next basic.deliver and returns its tag (its header and body frames
/// are skipped on the way to the next one).
fn next_delivery(client: &mut RawClient) -> u64 {
    loop {
        let frame = client
            .read_method()
            .expect("the broker keeps the connection open");
        assert!(frame.close_code().is_none(), "the broker closed: {frame:?}");
        if let Some(tag) = delivery_tag(&frame) {
            return tag;
        }
    }
}

/// Small socket buffers, as a busy host gives: the pipes fill after a few hundred small frames.
fn small_socket_buffers(client: &RawClient) {
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        let size: libc::c_int = 16384;
        // SAFETY: a valid socket and a pointer to an int of the size given.
        let set = unsafe {
            libc::setsockopt(
                client.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "setsockopt");
    }
}

fn ack(tag: u64, multiple: bool) -> Vec<u8> {
    let mut arguments = tag.to_be_bytes().to_vec();
    arguments.push(u8::from(multiple));
    method_frame(1, 60, 80, &arguments)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_blocked_writing_acks_is_still_read() {
    // A small outbound limit, so that the broker holds back soon after the client stops reading.
    let broker = Broker::start_with_config(
        "[connection]\nframe_max_bytes = 8192\noutbound_buffer_bytes_max = 8192\n",
    );
    let (_connection, channel) = lapin_channel(&broker).await;
    channel
        .queue_declare(
            "sync-acks".into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declare");
    let body = vec![7u8; 1024];
    for _ in 0..MESSAGES {
        lapin_publish(&channel, "", "sync-acks", &body).await;
    }

    let port = broker.port();
    let consumer = tokio::task::spawn_blocking(move || {
        let addr = format!("127.0.0.1:{port}").parse().expect("address");
        let mut client = RawClient::handshake(addr, 0, 8192, 0);
        small_socket_buffers(&client);
        assert_eq!(
            client.open_channel(1).map(|f| f.method_ids()),
            Some(Some((20, 11)))
        );
        let mut consume = vec![0, 0];
        short_string(&mut consume, "sync-acks");
        short_string(&mut consume, "");
        consume.push(0); // no-local, no-ack, exclusive, no-wait all off
        consume.extend_from_slice(&0u32.to_be_bytes());
        client.send(&method_frame(1, 60, 20, &consume));
        assert_eq!(
            client.read_method().and_then(|f| f.method_ids()),
            Some((60, 21))
        );

        let mut tags = Vec::new();
        while (tags.len() as u64) < READ_BEFORE_ACKING {
            tags.push(next_delivery(&mut client));
        }
        // The broker now has more to send than the client reads. Ack what was read, one write
        // per ack and no read in between, as rabbitmq-c does: each write must go through.
        client
            .stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .expect("write timeout");
        for &tag in &tags {
            if let Err(e) = client.stream.write_all(&ack(tag, false)) {
                panic!("the ack of delivery {tag} could not be written: {e} (the broker stopped reading acks)");
            }
        }
        // Then the rest, acked as they come.
        while (tags.len() as u64) < MESSAGES {
            let tag = next_delivery(&mut client);
            client.send(&ack(tag, false));
            tags.push(tag);
        }
        // Close cleanly: closing with the last delivery's frames unread would reset the socket
        // and drop acks still on their way.
        client.send(&method_frame(0, 10, 50, &close_arguments(200)));
        while let Some(frame) = client.read_method() {
            if frame.method_ids() == Some((10, 51)) {
                break;
            }
        }
        tags
    });
    let tags = tokio::time::timeout(Duration::from_secs(60), consumer)
        .await
        .expect("the consumer finished in time")
        .expect("the consumer thread");
    let mut unique = tags.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len() as u64,
        MESSAGES,
        "every message delivered once"
    );

    // Every ack was taken: once the consumer's connection is gone (which requeues whatever it
    // left unacked), nothing is back in the queue.
    let mut left = None;
    for _ in 0..100 {
        let declared = channel
            .queue_declare(
                "sync-acks".into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("passive declare");
        if declared.consumer_count() == 0 {
            left = Some(declared.message_count());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        left,
        Some(0),
        "messages requeued (acks lost), or the consumer never left"
    );
}

/// The other side of reading settlements while a client's backlog is over the limit: what the
/// broker answers by itself must stay bounded. A client that never reads and sends channel.open
/// and channel.close without end is answered until the backlog is over the limit, then only a
/// little more, and then not read at all: its writes block, and the broker's memory stays put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_cannot_grow_the_backlog_with_requests() {
    let broker = Broker::start_with_config(
        "[connection]\nframe_max_bytes = 8192\noutbound_buffer_bytes_max = 8192\n",
    );
    let (port, pid) = (broker.port(), broker.pid());
    let rss_before = rss_bytes(pid);
    let flooder = tokio::task::spawn_blocking(move || {
        let addr = format!("127.0.0.1:{port}").parse().expect("address");
        let mut client = RawClient::handshake(addr, 0, 8192, 0);
        small_socket_buffers(&client);
        client
            .stream
            .set_write_timeout(Some(Duration::from_secs(3)))
            .expect("write timeout");
        let mut pairs = Vec::new();
        for _ in 0..1024 {
            pairs.extend(method_frame(1, 20, 10, &[0]));
            pairs.extend(method_frame(1, 20, 40, &close_arguments(200)));
        }
        // Up to 256 MiB of requests, whose answers would take about as much.
        let mut written = 0usize;
        while written < 256 << 20 {
            match client.stream.write(&pairs) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        (client, written)
    });
    let (client, written) = tokio::time::timeout(Duration::from_secs(120), flooder)
        .await
        .expect("the flood ended in time")
        .expect("the flooding thread");
    assert!(
        written < 256 << 20,
        "the broker kept reading a client that does not read ({written} bytes taken)"
    );
    let grown = rss_bytes(pid).saturating_sub(rss_before);
    assert!(
        grown < 64 << 20,
        "the broker grew by {grown} bytes answering {written} bytes of requests"
    );
    assert_broker_serves(&broker).await;
    drop(client);
}
