//! Distributed locks built from exclusive queues and exclusive consumers, driven through amqprs.
//!
//! The recipes depend on broker behaviour, checked here: a holder whose TCP connection is cut,
//! or which goes silent (no heartbeats), loses its exclusive queue within two heartbeat
//! intervals and a waiting client then acquires it; passive declares report the true consumer
//! count at every step; an exclusive consume is refused with 403 while another consumer holds
//! the queue; a mandatory publish to a deleted queue comes back; and over many randomized rounds
//! no two clients ever hold the lock at once.
//!
//! Holders talk to the broker through a small TCP proxy in the test, which can cut the
//! connection (both sockets closed) or freeze it (sockets kept open, nothing forwarded): what a
//! crashed process and a hung or partitioned one look like to the broker.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicCancelArguments, BasicConsumeArguments, BasicPublishArguments, Channel,
    ConfirmSelectArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::BasicProperties;
use common::{guest, open_channel, Broker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HEARTBEAT_SECS: u16 = 1;

/// A one-connection TCP proxy between a client and the broker.
struct Proxy {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(broker: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let (frozen_flag, task_list) = (frozen.clone(), tasks.clone());
        let acceptor = tokio::spawn(async move {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = TcpStream::connect(broker).await else {
                return;
            };
            client.set_nodelay(true).ok();
            server.set_nodelay(true).ok();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = tokio::spawn(pump(client_read, server_write, frozen_flag.clone()));
            let down = tokio::spawn(pump(server_read, client_write, frozen_flag));
            task_list.lock().unwrap().extend([up, down]);
        });
        tasks.lock().unwrap().push(acceptor);
        Proxy {
            addr,
            frozen,
            tasks,
        }
    }

    fn arguments(&self) -> OpenConnectionArguments {
        let mut arguments =
            OpenConnectionArguments::new("127.0.0.1", self.addr.port(), "guest", "guest");
        arguments.heartbeat(HEARTBEAT_SECS);
        arguments
    }

    /// Stops forwarding in both directions; the sockets stay open.
    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Closes both sockets, as a crashed client's kernel would.
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 16384];
    loop {
        if frozen.load(Ordering::SeqCst) {
            // Hold the sockets open and forward nothing, for as long as the test runs.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = tokio::time::sleep(Duration::from_millis(20)) => continue,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if frozen.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One attempt to take the lock: declare `name` exclusive on a fresh channel.
async fn try_acquire(connection: &Connection, name: &str) -> Option<Channel> {
    let channel = connection.open_channel(None).await.ok()?;
    let mut declare = QueueDeclareArguments::new(name);
    declare.exclusive(true);
    match channel.queue_declare(declare).await {
        Ok(Some(_)) => Some(channel),
        _ => None,
    }
}

/// Retries until the lock is taken; returns the holding channel and when it was taken.
async fn acquire(connection: &Connection, name: &str, limit: Duration) -> (Channel, Instant) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(channel) = try_acquire(connection, name).await {
            return (channel, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "lock {name} not acquired in time"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn lost_within_two_heartbeats(release: impl FnOnce(&Proxy)) -> Duration {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.addr).await;
    let holder = Connection::open(&proxy.arguments()).await.expect("holder");
    let _held = try_acquire(&holder, "mutex")
        .await
        .expect("holder takes the lock");
    let waiter = Connection::open(&guest(&broker)).await.expect("waiter");
    assert!(
        try_acquire(&waiter, "mutex").await.is_none(),
        "405 while held"
    );

    let released = Instant::now();
    release(&proxy);
    let (_, acquired) = acquire(&waiter, "mutex", Duration::from_secs(10)).await;
    let took = acquired - released;
    let limit = Duration::from_secs(2 * u64::from(HEARTBEAT_SECS)) + Duration::from_millis(700);
    assert!(
        took <= limit,
        "the waiter got the lock {took:?} after release"
    );
    // amqprs reports the channels the broker closed with 405 when the connection closes.
    let _ = waiter.close().await;
    took
}

#[tokio::test]
async fn a_cut_connection_loses_its_exclusive_queue_and_a_waiter_takes_it() {
    let took = lost_within_two_heartbeats(Proxy::cut).await;
    // The broker sees the socket close at once; no heartbeat interval is needed.
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[tokio::test]
async fn a_silent_holder_loses_its_exclusive_queue_within_two_heartbeats() {
    let took = lost_within_two_heartbeats(Proxy::freeze).await;
    // The broker must wait for missed heartbeats: not before one interval has passed.
    assert!(
        took >= Duration::from_secs(u64::from(HEARTBEAT_SECS)),
        "took only {took:?}"
    );
}

async fn consumer_count(channel: &Channel, queue: &str) -> u32 {
    let mut passive = QueueDeclareArguments::new(queue);
    passive.passive(true);
    channel
        .queue_declare(passive)
        .await
        .expect("passive declare")
        .expect("declare-ok")
        .2
}

async fn consume(channel: &Channel, queue: &str, tag: &str, exclusive: bool) -> bool {
    let mut arguments = BasicConsumeArguments::new(queue, tag);
    arguments.exclusive(exclusive);
    channel.basic_consume_rx(arguments).await.is_ok()
}

#[tokio::test]
async fn exclusive_consumer_lock_and_true_consumer_counts() {
    let broker = Broker::start_with_config(common::BALANCED);
    let (observer, observe, _) = open_channel(&broker).await;
    observe
        .queue_declare(QueueDeclareArguments::new("leader"))
        .await
        .unwrap();
    assert_eq!(consumer_count(&observe, "leader").await, 0);

    let (holder, hold, hold_events) = open_channel(&broker).await;
    assert!(consume(&hold, "leader", "holder", true).await);
    assert_eq!(consumer_count(&observe, "leader").await, 1);

    // Another exclusive consume, and a plain one, are refused with 403 while it holds.
    let (contender, contend, contend_events) = open_channel(&broker).await;
    assert!(!consume(&contend, "leader", "contender", true).await);
    assert_eq!(contend_events.close_code().await, 403);
    let second = contender.open_channel(None).await.unwrap();
    assert!(!consume(&second, "leader", "plain", false).await);
    assert_eq!(consumer_count(&observe, "leader").await, 1);

    // The holder cancels: the count drops, and the next exclusive consume succeeds.
    hold.basic_cancel(BasicCancelArguments::new("holder"))
        .await
        .unwrap();
    assert_eq!(consumer_count(&observe, "leader").await, 0);
    let third = contender.open_channel(None).await.unwrap();
    assert!(consume(&third, "leader", "contender", true).await);
    assert_eq!(consumer_count(&observe, "leader").await, 1);
    assert!(hold_events.closes.lock().unwrap().is_empty());

    // The new holder's connection goes away: count 0, and the old holder can take it back.
    contender.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while consumer_count(&observe, "leader").await != 0 {
        assert!(Instant::now() < deadline, "consumer not removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(consume(&hold, "leader", "holder-again", true).await);
    assert_eq!(consumer_count(&observe, "leader").await, 1);
    holder.close().await.unwrap();
    observer.close().await.unwrap();
}

#[tokio::test]
async fn mandatory_publish_to_a_deleted_lock_queue_is_returned_then_confirmed() {
    let broker = Broker::start_with_config(common::BALANCED);
    let (connection, channel, events) = open_channel(&broker).await;
    let mut declare = QueueDeclareArguments::new("lock-inbox");
    declare.exclusive(true);
    channel.queue_declare(declare).await.unwrap();
    channel
        .queue_delete(QueueDeleteArguments::new("lock-inbox"))
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    let mut publish = BasicPublishArguments::new("", "lock-inbox");
    publish.mandatory(true);
    channel
        .basic_publish(BasicProperties::default(), b"wake up".to_vec(), publish)
        .await
        .unwrap();
    events
        .wait_for("the ack", |r| r.confirmed_up_to() >= 1)
        .await;
    let returns = events.returns.lock().unwrap().clone();
    assert_eq!(
        returns,
        vec![(312, "lock-inbox".to_string(), b"wake up".to_vec())]
    );
    connection.close().await.unwrap();
}

/// How a holder gives the lock up in the randomized test.
#[derive(Debug, Clone, Copy)]
enum Release {
    DeleteQueue,
    CloseConnection,
    CutConnection,
    FreezeConnection,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_two_clients_ever_hold_the_lock_over_randomized_rounds() {
    let broker = Arc::new(Broker::start_with_config(common::BALANCED));
    let holders = Arc::new(AtomicUsize::new(0));
    let acquisitions = Arc::new(AtomicUsize::new(0));
    let rounds_per_client = 12;
    let clients = 4;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (broker, holders, acquisitions) =
            (broker.clone(), holders.clone(), acquisitions.clone());
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (client as u64 + 1);
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            for _ in 0..rounds_per_client {
                let proxy = Proxy::start(broker.addr).await;
                let connection = Connection::open(&proxy.arguments()).await.expect("connect");
                let (channel, _) =
                    acquire(&connection, "shared-lock", Duration::from_secs(30)).await;
                // Whoever holds the lock is alone: the counter was 0.
                let others = holders.fetch_add(1, Ordering::SeqCst);
                assert_eq!(others, 0, "two clients hold the lock at once");
                acquisitions.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(next() % 30)).await;
                let release = match next() % 8 {
                    0..=2 => Release::DeleteQueue,
                    3..=5 => Release::CloseConnection,
                    6 => Release::CutConnection,
                    _ => Release::FreezeConnection,
                };
                // The holder stops acting as holder before it lets go.
                holders.fetch_sub(1, Ordering::SeqCst);
                match release {
                    Release::DeleteQueue => {
                        channel
                            .queue_delete(QueueDeleteArguments::new("shared-lock"))
                            .await
                            .expect("delete");
                        connection.close().await.expect("close");
                    }
                    Release::CloseConnection => connection.close().await.expect("close"),
                    Release::CutConnection => proxy.cut(),
                    Release::FreezeConnection => {
                        proxy.freeze();
                        // Keep the frozen connection around until the broker drops it.
                        tokio::time::sleep(Duration::from_millis(2600)).await;
                    }
                }
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(240), task)
            .await
            .expect("the rounds finish")
            .expect("no client saw two holders");
    }
    assert_eq!(
        acquisitions.load(Ordering::SeqCst),
        clients * rounds_per_client
    );
}
