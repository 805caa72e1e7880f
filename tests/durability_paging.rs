//! Paging: past the shard's memory budget, persistent messages on durable queues leave memory
//! (only their place in the log stays) and are read back, in order, when delivered. Checked
//! through a real client: order and bodies survive paging, a restart, a crash and compaction of
//! segments whose live messages are paged out; the broker's memory does not grow with the
//! backlog, a publisher faster than paging is held off, and one faster than its consumer waits
//! for it instead of paging.

mod common;

use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicGetArguments, BasicPublishArguments, Channel,
    QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::BasicProperties;
use common::{
    consume_with_prefetch, drain_no_ack, log_bytes, log_bytes_fall_below, log_files_gone,
    next_delivery, open_channel, open_confirming_channel, rss_bytes, written_log_files, Broker,
    ChannelRecorder,
};

/// A 64 KiB budget per shard, 1 MiB segments, queues spread over both shards.
const CONFIG: &str = "[storage]\nsegment_bytes_max = 1048576\n[queues]\nplacement = \"balanced\"\nmemory_budget_bytes = 65536\n";

fn body(n: u64, size: usize) -> Vec<u8> {
    let mut body = vec![(n % 251) as u8; size];
    body[..8].copy_from_slice(&n.to_be_bytes());
    body
}

fn number(content: &[u8], size: usize) -> u64 {
    assert_eq!(content.len(), size, "body length");
    let n = u64::from_be_bytes(content[..8].try_into().unwrap());
    assert!(
        content[8..].iter().all(|b| *b == (n % 251) as u8),
        "body of {n} intact"
    );
    n
}

async fn declare_durable(channel: &Channel, name: &str) {
    let mut declare = QueueDeclareArguments::new(name);
    declare.durable(true);
    channel.queue_declare(declare).await.unwrap();
}

/// Publishes `range` to `queue` with confirms (window 500); every `transient_every`-th message
/// is transient (those stay in memory, between paged-out ones).
async fn publish(
    channel: &Channel,
    recorder: &ChannelRecorder,
    queue: &str,
    range: std::ops::Range<u64>,
    size: usize,
    transient_every: u64,
) {
    let first_seq = recorder.confirmed_up_to();
    let count = range.end - range.start;
    for (sent, n) in range.enumerate() {
        let persistent = transient_every == 0 || n % transient_every != 0;
        channel
            .basic_publish(
                BasicProperties::default()
                    .with_persistence(persistent)
                    .finish(),
                body(n, size),
                BasicPublishArguments::new("", queue),
            )
            .await
            .unwrap();
        let sent = sent as u64 + 1;
        while first_seq + sent > 500 + recorder.confirmed_up_to() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while recorder.confirmed_up_to() < first_seq + count {
        assert!(std::time::Instant::now() < deadline, "confirms");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// (number, redelivered) of `count` messages consumed with prefetch 50 and acked.
async fn consume(channel: &Channel, queue: &str, count: u64, size: usize) -> Vec<(u64, bool)> {
    let (tag, mut rx) = consume_with_prefetch(channel, queue, "", 50).await;
    let mut out = Vec::new();
    for _ in 0..count {
        let message = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a delivery in time")
            .expect("channel open");
        let deliver = message.deliver.unwrap();
        out.push((
            number(&message.content.unwrap(), size),
            deliver.redelivered(),
        ));
        channel
            .basic_ack(BasicAckArguments::new(deliver.delivery_tag(), false))
            .await
            .unwrap();
    }
    channel
        .basic_cancel(amqprs::channel::BasicCancelArguments::new(&tag))
        .await
        .unwrap();
    out
}

async fn get_all(broker: &Broker, queue: &str, size: usize) -> Vec<(u64, bool)> {
    drain_no_ack(broker, queue)
        .await
        .into_iter()
        .map(|(body, redelivered)| (number(&body, size), redelivered))
        .collect()
}

async fn ready(channel: &Channel, queue: &str) -> u32 {
    let mut passive = QueueDeclareArguments::new(queue);
    passive.passive(true);
    channel.queue_declare(passive).await.unwrap().unwrap().1
}

/// Waits until `queue` holds at least `count` ready messages; fails with `failure` once
/// `deadline` passes.
async fn wait_for_ready(
    channel: &Channel,
    queue: &str,
    count: u64,
    deadline: std::time::Instant,
    failure: &str,
) {
    while u64::from(ready(channel, queue).await) < count {
        assert!(std::time::Instant::now() < deadline, "{failure}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The numbers of all messages in `queue`, taken out with no-ack gets, in order.
async fn numbers_in(broker: &Broker, queue: &str, size: usize) -> Vec<u64> {
    get_all(broker, queue, size)
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// A broker started with `config` and a channel on it in confirm mode.
async fn confirming_broker(
    config: &str,
) -> (
    Broker,
    amqprs::connection::Connection,
    Channel,
    ChannelRecorder,
) {
    let broker = Broker::start_with_config(config);
    let (connection, channel, recorder) = open_confirming_channel(&broker).await;
    (broker, connection, channel, recorder)
}

/// A broker with a 64 KiB budget whose queues live on the shard of the connection declaring
/// them, and a channel that declared the (non-durable) `queue`.
async fn small_budget_broker(queue: &str) -> (Broker, amqprs::connection::Connection, Channel) {
    let config = "[queues]\nplacement = \"client-local\"\nmemory_budget_bytes = 65536\n";
    let broker = Broker::start_with_config(config);
    let (connection, channel, _) = open_channel(&broker).await;
    channel
        .queue_declare(QueueDeclareArguments::new(queue))
        .await
        .unwrap();
    (broker, connection, channel)
}

/// Publishes messages 0..count, transient and without confirms, as fast as the client goes.
async fn publish_unconfirmed(channel: &Channel, queue: &str, count: u64, size: usize) {
    for n in 0..count {
        channel
            .basic_publish(
                BasicProperties::default(),
                body(n, size),
                BasicPublishArguments::new("", queue),
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_backlog_is_delivered_in_order_across_restarts() {
    const SIZE: usize = 1024;
    let (broker, _c, channel, recorder) = confirming_broker(CONFIG).await;
    declare_durable(&channel, "backlog").await;
    publish(&channel, &recorder, "backlog", 0..3000, SIZE, 7).await;
    assert_eq!(ready(&channel, "backlog").await, 3000);

    // basic.get from a paged head, then a consumer through the rest of the first half.
    let (_g, getter, _) = open_channel(&broker).await;
    let mut got = Vec::new();
    for _ in 0..10 {
        let mut args = BasicGetArguments::new("backlog");
        args.no_ack(true);
        let (_, _, content) = getter.basic_get(args).await.unwrap().expect("a message");
        got.push(number(&content, SIZE));
    }
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    let consumed = consume(&getter, "backlog", 1490, SIZE).await;
    let numbers: Vec<u64> = consumed.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (10..1500).collect::<Vec<_>>());
    assert!(consumed.iter().all(|(_, redelivered)| !redelivered));

    // A clean restart: the persistent rest comes back in order (transient messages are gone),
    // not redelivered — except what the consumer had prefetched (at most 50) when it left.
    drop(getter);
    let broker = broker.stop(libc::SIGTERM).restart();
    let (_c2, channel, _) = open_channel(&broker).await;
    let expected: Vec<(u64, bool)> = (1500..3000)
        .filter(|n| n % 7 != 0)
        .map(|n| (n, false))
        .collect();
    let half = expected.len() / 2;
    let consumed = consume(&channel, "backlog", half as u64, SIZE).await;
    let numbers: Vec<u64> = consumed.iter().map(|(n, _)| *n).collect();
    let expected_numbers: Vec<u64> = expected[..half].iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, expected_numbers);
    for (n, redelivered) in &consumed {
        assert!(!redelivered || *n < 1550, "{n} flagged redelivered");
    }
    assert!(consumed.iter().any(|(_, r)| !r));

    // A crash: what is left comes back again, now flagged redelivered.
    drop(channel);
    let broker = broker.stop(libc::SIGKILL).restart();
    let rest = get_all(&broker, "backlog", SIZE).await;
    let expected_rest: Vec<(u64, bool)> =
        expected[half..].iter().map(|(n, _)| (*n, true)).collect();
    assert_eq!(rest, expected_rest);
}

/// Segments whose few live messages are paged out are compacted all the same: the bodies are
/// read back from the old segment and logged again, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_holding_paged_messages_are_compacted() {
    const SIZE: usize = 1024;
    let config = "[storage]\nsegment_bytes_max = 65536\ncompact_live_fraction = 0.5\n[queues]\nplacement = \"client-local\"\nmemory_budget_bytes = 16384\n";
    let (broker, _c, channel, recorder) = confirming_broker(config).await;
    // Both queues on the publisher's shard, their messages interleaved in its log.
    declare_durable(&channel, "keep").await;
    declare_durable(&channel, "drain").await;
    for round in 0..30u64 {
        publish(&channel, &recorder, "keep", round..round + 1, SIZE, 0).await;
        publish(
            &channel,
            &recorder,
            "drain",
            round * 100..round * 100 + 99,
            SIZE,
            0,
        )
        .await;
    }
    let written = log_bytes(&broker.data_path());
    assert!(written > 2_500_000, "3 MB on disk: {written}");

    let (_d, drainer, _) = open_channel(&broker).await;
    let drained = consume(&drainer, "drain", 2970, SIZE).await;
    assert_eq!(drained.len(), 2970);
    let remaining =
        log_bytes_fall_below(&broker.data_path(), 400_000, Duration::from_secs(10)).await;
    assert!(remaining < 400_000, "log bytes after draining: {remaining}");

    let broker = broker.stop(libc::SIGTERM).restart();
    let kept = get_all(&broker, "keep", SIZE).await;
    assert_eq!(
        kept,
        (0..30).map(|n| (n, false)).collect::<Vec<_>>(),
        "the paged messages survived compaction and a restart"
    );
}

/// A paged backlog long enough to be packed into frozen runs (over 4,096 messages in a row),
/// its records interleaved with another queue's: once the other queue is drained, compaction
/// moves the packed messages' records (unpacking their runs), a restart packs them again as it
/// restores them, and every message comes back once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_packed_into_runs_survives_compaction_and_a_restart() {
    const SIZE: usize = 64;
    const KEEP: u64 = 10_000;
    let config = "[storage]\nsegment_bytes_max = 1048576\ncompact_live_fraction = 0.5\n[queues]\nplacement = \"client-local\"\nmemory_budget_bytes = 65536\n";
    let (broker, _c, channel, recorder) = confirming_broker(config).await;
    declare_durable(&channel, "keep").await;
    declare_durable(&channel, "drain").await;
    for block in 0..KEEP / 100 {
        publish(
            &channel,
            &recorder,
            "keep",
            block * 100..block * 100 + 100,
            SIZE,
            0,
        )
        .await;
        publish(
            &channel,
            &recorder,
            "drain",
            block * 300..block * 300 + 300,
            SIZE,
            0,
        )
        .await;
    }
    assert_eq!(u64::from(ready(&channel, "keep").await), KEEP);
    // The segments the backlog filled; the active one goes on taking the acks and moved records.
    let mut filled = written_log_files(&broker.data_path());
    filled.sort();
    filled.pop();
    assert!(filled.len() >= 4, "over 4 MB logged: {filled:?}");

    let (_d, drainer, _) = open_channel(&broker).await;
    let drained = consume(&drainer, "drain", 3 * KEEP, SIZE).await;
    assert_eq!(drained.len() as u64, 3 * KEEP);
    // Each of them is compacted away. (What is left, the moved records and the acks, fills
    // about two new segments, so a byte count is no sharper a test.)
    let left = log_files_gone(&filled, Duration::from_secs(20)).await;
    assert!(left.is_empty(), "not compacted: {left:?} of {filled:?}");
    assert_eq!(u64::from(ready(&channel, "keep").await), KEEP);

    let broker = broker.stop(libc::SIGTERM).restart();
    let kept = get_all(&broker, "keep", SIZE).await;
    assert_eq!(
        kept,
        (0..KEEP).map(|n| (n, false)).collect::<Vec<_>>(),
        "the packed messages survived compaction and a restart, in order"
    );
}

/// The broker's resident memory does not grow with a persistent backlog: 40 MB of messages
/// through a 1 MiB budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_a_backlog() {
    const SIZE: usize = 4096;
    const MESSAGES: u64 = 10_000;
    let config = "[queues]\nmemory_budget_bytes = 1048576\n";
    let (broker, _c, channel, recorder) = confirming_broker(config).await;
    declare_durable(&channel, "big").await;
    publish(&channel, &recorder, "big", 0..100, SIZE, 0).await;
    let baseline = rss_bytes(broker.pid());
    publish(&channel, &recorder, "big", 100..MESSAGES, SIZE, 0).await;
    let grown = rss_bytes(broker.pid()).saturating_sub(baseline);
    let data = MESSAGES * SIZE as u64;
    assert!(
        grown < data / 3,
        "RSS grew by {grown} bytes for {data} bytes of queued messages"
    );
    let (_d, consumer, _) = open_channel(&broker).await;
    let consumed = consume(&consumer, "big", MESSAGES, SIZE).await;
    let numbers: Vec<u64> = consumed.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (0..MESSAGES).collect::<Vec<_>>());
}

/// Transient messages (here on a non-durable queue) are written out under memory pressure as
/// well, and come back in order; a no-ack consumer takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_messages_are_paged_under_pressure() {
    const SIZE: usize = 4096;
    const MESSAGES: u64 = 20_000;
    let config =
        "[storage]\nsegment_bytes_max = 1048576\n[queues]\nmemory_budget_bytes = 1048576\n";
    let (broker, _c, channel, recorder) = confirming_broker(config).await;
    channel
        .queue_declare(QueueDeclareArguments::new("scratch"))
        .await
        .unwrap();
    publish(&channel, &recorder, "scratch", 0..100, SIZE, 1).await;
    let baseline = rss_bytes(broker.pid());
    publish(&channel, &recorder, "scratch", 100..MESSAGES, SIZE, 1).await;
    let grown = rss_bytes(broker.pid()).saturating_sub(baseline);
    let data = MESSAGES * SIZE as u64;
    eprintln!("transient paging: RSS grew by {grown} bytes for {data} bytes published");
    // Every message is written out after it arrived, through the log's buffers, and 1 MiB
    // segments roll about once per 250 messages: each segment the log rolled past must give its
    // writer's buffers back at once (it took 55-58 MB when they waited to be idle a second).
    assert!(
        grown < data / 4,
        "RSS grew by {grown} bytes for {data} bytes of transient messages"
    );
    assert!(
        log_bytes(&broker.data_path()) > data / 2,
        "the messages were written out"
    );

    let (_d, consumer, _) = open_channel(&broker).await;
    let mut args = BasicConsumeArguments::new("scratch", "");
    args.manual_ack(false);
    let (_, mut rx) = consumer.basic_consume_rx(args).await.unwrap();
    for n in 0..MESSAGES {
        let message = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a delivery in time")
            .expect("channel open");
        assert_eq!(number(&message.content.unwrap(), SIZE), n);
    }
    // Consumed: the written-out copies are dead, and their segments go.
    let remaining =
        log_bytes_fall_below(&broker.data_path(), data / 4, Duration::from_secs(5)).await;
    assert!(
        remaining < data / 4,
        "log bytes after consuming: {remaining}"
    );
}

/// Flow control: a publisher without confirms, faster than the pager, is held off (its socket
/// is not read) while the shard's messages in memory are over twice the budget, so memory stays
/// bounded by the configuration; nothing is lost and the order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_faster_than_paging_is_paused() {
    const SIZE: usize = 4096;
    const MESSAGES: u64 = 20_000;
    // A 64 KiB budget: the pager writes out a quarter of it per log sync, far slower than
    // this publisher sends, so the alarm must hold it.
    let (broker, _c, channel) = small_budget_broker("firehose").await;
    let baseline = rss_bytes(broker.pid());
    let pid = broker.pid();
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    publish_unconfirmed(&channel, "firehose", MESSAGES, SIZE).await;
    // Everything published has arrived once the queue holds it all.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    wait_for_ready(
        &channel,
        "firehose",
        MESSAGES,
        deadline,
        "all messages queued",
    )
    .await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let grown = sampler.join().unwrap().saturating_sub(baseline);
    let data = MESSAGES * SIZE as u64;
    eprintln!("flow control: RSS grew by {grown} bytes (peak) for {data} bytes published");
    assert!(
        broker.log_contains("publishers paused"),
        "the publisher was paused"
    );
    assert!(
        grown < data / 4,
        "RSS grew by {grown} bytes for {data} bytes published"
    );
    let numbers = numbers_in(&broker, "firehose", SIZE).await;
    assert_eq!(numbers, (0..MESSAGES).collect::<Vec<_>>());
}

/// A publisher faster than its queue's consumer (here one with prefetch 1, a round trip per
/// message): past the budget the broker holds the publisher back while the consumer drains the
/// excess, instead of writing out messages about to be delivered (as RabbitMQ's flow control
/// slows a publisher to its queue). Nothing is paged, memory stays bounded, nothing is lost and
/// the order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_faster_than_its_consumer_waits_instead_of_paging() {
    let (broker, _c, channel) = small_budget_broker("stream").await;
    let (grown, data) = publisher_waits_for_its_consumer(&broker, &channel, "stream").await;
    assert!(
        grown < data / 4,
        "RSS grew by {grown} bytes for {data} bytes published"
    );
}

/// The same with the publisher's connection on another shard than the queue: what it sent
/// before it was held is still on its way over the mesh when the queue's shard starts timing
/// its consumer, and must not count against the consumer (it did: the shard found the consumer
/// too slow and paged). Memory is not checked here: what is in flight between shards is bounded
/// by `mesh_channel_bytes` and the outbox, not by the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_on_another_shard_waits_for_the_consumer_too() {
    let (broker, _c, _channel) = small_budget_broker("stream").await;
    let queue_shard = placement(&broker, "stream").expect("the queue is placed");
    // Connections land on shards by the kernel's hash: open them until one is on the other.
    let mut connections = Vec::new();
    let mut publisher = None;
    for attempt in 0..32 {
        let (connection, channel, _) = open_channel(&broker).await;
        let probe = format!("probe-{attempt}");
        channel
            .queue_declare(QueueDeclareArguments::new(&probe))
            .await
            .unwrap();
        let shard = placement(&broker, &probe);
        channel
            .queue_delete(QueueDeleteArguments::new(&probe))
            .await
            .unwrap();
        connections.push(connection);
        if shard.is_some_and(|shard| shard != queue_shard) {
            publisher = Some(channel);
            break;
        }
    }
    let publisher = publisher.expect("a connection on the other shard");
    publisher_waits_for_its_consumer(&broker, &publisher, "stream").await;
}

/// The shard a queue was placed on, from the broker's log.
fn placement(broker: &Broker, queue: &str) -> Option<usize> {
    (0..2).find(|shard| {
        broker.log_contains(&format!(
            "queue '{queue}' in vhost '/' placed on shard-{shard}"
        ))
    })
}

/// Publishes 5,000 messages of 4 KiB through `channel` to `queue` while a prefetch-1 consumer
/// takes them: the publisher is held back rather than the messages paged, and every message
/// arrives in order. Returns how much the broker's RSS grew and the bytes published.
async fn publisher_waits_for_its_consumer(
    broker: &Broker,
    channel: &Channel,
    queue: &str,
) -> (u64, u64) {
    const SIZE: usize = 4096;
    const MESSAGES: u64 = 5_000;
    let (_d, consumer, _) = open_channel(broker).await;
    let (_, mut rx) = consume_with_prefetch(&consumer, queue, "", 1).await;
    let received = tokio::spawn(async move {
        let mut numbers = Vec::new();
        while (numbers.len() as u64) < MESSAGES {
            let message = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("a delivery in time")
                .expect("channel open");
            numbers.push(number(&message.content.unwrap(), SIZE));
            let tag = message.deliver.unwrap().delivery_tag();
            consumer
                .basic_ack(BasicAckArguments::new(tag, false))
                .await
                .unwrap();
        }
        numbers
    });
    let baseline = rss_bytes(broker.pid());
    publish_unconfirmed(channel, queue, MESSAGES, SIZE).await;
    let numbers = received.await.unwrap();
    assert_eq!(numbers, (0..MESSAGES).collect::<Vec<_>>());
    let grown = rss_bytes(broker.pid()).saturating_sub(baseline);
    let data = MESSAGES * SIZE as u64;
    let written = log_bytes(&broker.data_path());
    eprintln!("publisher waits: RSS grew by {grown} bytes, log holds {written}, for {data} bytes");
    assert!(
        broker.log_contains("publishers wait for consumers"),
        "the publisher was held back"
    );
    assert!(
        written < data / 8,
        "{written} bytes written out for {data} bytes of messages a consumer took"
    );
    (grown, data)
}

/// A consumer that drains nothing (it holds its one prefetched message and never acks) must not
/// hold the publisher back for long: the shard finds that waiting does not bring memory down,
/// pages instead, and the publisher goes on; nothing is lost and the order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_drains_nothing_gets_paging_not_a_stalled_publisher() {
    const SIZE: usize = 4096;
    const MESSAGES: u64 = 2_000;
    let (broker, _c, channel) = small_budget_broker("stuck").await;
    let (_d, consumer, _) = open_channel(&broker).await;
    let (_, mut rx) = consume_with_prefetch(&consumer, "stuck", "", 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    publish_unconfirmed(&channel, "stuck", MESSAGES, SIZE).await;
    // Everything published has arrived once the queue holds all but the one delivered.
    let held_back = "the publisher was held back";
    wait_for_ready(&channel, "stuck", MESSAGES - 1, deadline, held_back).await;
    let first = next_delivery(&mut rx).await;
    assert_eq!(number(&first.content.unwrap(), SIZE), 0);
    assert!(
        broker.log_contains("paging instead"),
        "the shard gave up waiting for the consumer"
    );
    let data = MESSAGES * SIZE as u64;
    let written = log_bytes(&broker.data_path());
    assert!(
        written > data / 2,
        "{written} bytes written out for {data} bytes of messages nobody took"
    );
    // The held message goes back to the head of the queue with the consumer's channel.
    consumer.close().await.unwrap();
    let numbers = numbers_in(&broker, "stuck", SIZE).await;
    assert_eq!(numbers, (0..MESSAGES).collect::<Vec<_>>());
}

/// After a burst past the budget, once the messages are gone, the shard gives the allocator's
/// free pages back: resident memory falls at least halfway back to where it was before the
/// burst (without the trim, glibc kept 80% of it: 88 of 107 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_goes_back_after_a_burst() {
    const SIZE: usize = 2048;
    const MESSAGES: u64 = 30_000;
    let config = "[queues]\nplacement = \"client-local\"\nmemory_budget_bytes = 33554432\n";
    let broker = Broker::start_with_config(config);
    let (_c, channel, _) = open_channel(&broker).await;
    channel
        .queue_declare(QueueDeclareArguments::new("burst"))
        .await
        .unwrap();
    let before = rss_bytes(broker.pid());
    publish_unconfirmed(&channel, "burst", MESSAGES, SIZE).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    wait_for_ready(&channel, "burst", MESSAGES, deadline, "all messages queued").await;
    let burst = rss_bytes(broker.pid());
    channel
        .queue_delete(QueueDeleteArguments::new("burst"))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let target = before + (burst - before) / 2;
    let mut after = rss_bytes(broker.pid());
    while after > target && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = rss_bytes(broker.pid());
    }
    eprintln!("RSS before {before}, after the burst {burst}, after its messages went {after}");
    assert!(
        after <= target,
        "RSS stayed at {after} bytes after a burst to {burst} (before: {before})"
    );
}

/// A no-ack consumer settles persistent messages for good: they do not come back after a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_deliveries_do_not_come_back_after_a_restart() {
    let (broker, _c, channel, recorder) = confirming_broker(CONFIG).await;
    declare_durable(&channel, "fire-and-forget").await;
    publish(&channel, &recorder, "fire-and-forget", 0..500, 256, 0).await;
    let (_d, consumer, _) = open_channel(&broker).await;
    let mut args = BasicConsumeArguments::new("fire-and-forget", "");
    args.manual_ack(false);
    let (_, mut rx) = consumer.basic_consume_rx(args).await.unwrap();
    for n in 0..500 {
        let message = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a delivery in time")
            .expect("channel open");
        assert_eq!(number(&message.content.unwrap(), 256), n);
    }
    assert_eq!(ready(&channel, "fire-and-forget").await, 0);
    drop(consumer);
    let broker = broker.stop(libc::SIGTERM).restart();
    let (_c2, channel, _) = open_channel(&broker).await;
    assert_eq!(ready(&channel, "fire-and-forget").await, 0);
}
