//! The shared harness of the integration tests: start the real `shardmq` binary on a free
//! loopback port with a temporary data directory, and stop it by PID when the test ends.
//!
//! Every wait is bounded, so a broken broker fails a test instead of hanging the suite.

#![allow(dead_code)] // each test binary uses part of the harness

pub mod raw;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long the broker gets to print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Broker {
    child: Child,
    pub addr: SocketAddr,
    data_dir: TempDir,
    config_toml: String,
    shards: usize,
    log: Arc<Mutex<String>>,
}

/// A broker that was stopped, with its data directory kept for a restart.
pub struct Stopped {
    data_dir: TempDir,
    config_toml: String,
    shards: usize,
    /// What the broker logged before it stopped.
    pub log: String,
}

impl Stopped {
    /// Starts the broker again on the same data directory (on a new port).
    pub fn restart(self) -> Broker {
        Broker::spawn(self.data_dir, &self.config_toml, self.shards)
    }

    /// Restarts with another shard count.
    pub fn override_shards(&mut self, shards: usize) {
        self.shards = shards;
    }
}

impl Broker {
    /// A broker with the embedded default config, two shards, on a free port.
    pub fn start() -> Broker {
        Broker::start_with_config("")
    }

    /// A broker with `config_toml` laid over the embedded default.
    pub fn start_with_config(config_toml: &str) -> Broker {
        Broker::spawn(
            tempfile::tempdir().expect("temporary data dir"),
            config_toml,
            2,
        )
    }

    /// Stops the broker with `signal` (SIGTERM for a clean stop, SIGKILL for a crash) and keeps
    /// its data directory.
    pub fn stop(mut self, signal: i32) -> Stopped {
        self.signal(signal);
        self.wait_exit(Duration::from_secs(20))
            .expect("the broker exits");
        let log = self.log();
        // Take the directory out; Drop only has the (already reaped) child left to handle.
        let data_dir = std::mem::replace(
            &mut self.data_dir,
            tempfile::tempdir().expect("placeholder dir"),
        );
        Stopped {
            data_dir,
            config_toml: self.config_toml.clone(),
            shards: self.shards,
            log,
        }
    }

    fn spawn(data_dir: TempDir, config_toml: &str, shards: usize) -> Broker {
        let config_path = data_dir.path().join("test-config.toml");
        std::fs::write(&config_path, config_toml).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardmq"))
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", "127.0.0.1:0", "--log-level", "debug"])
            .args(["--shards", &shards.to_string()])
            .arg("--data-dir")
            .arg(data_dir.path().join("data"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shardmq");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("stderr");
        let stderr_log = log.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                stderr_log
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (addr_tx, addr_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("shardmq listening on ") {
                    let _ = addr_tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = match addr_rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => addr.parse().expect("listening address parses"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                // The process is gone: read the rest of its log before quoting it (it may
                // have exited at once, before the reader caught up).
                let _ = stderr_reader.join();
                let text = log.lock().map(|l| l.clone()).unwrap_or_default();
                panic!("shardmq did not start within {START_TIMEOUT:?}; its log:\n{text}");
            }
        };
        Broker {
            child,
            addr,
            data_dir,
            config_toml: config_toml.to_string(),
            shards,
            log,
        }
    }

    /// The broker's data directory.
    pub fn data_path(&self) -> std::path::PathBuf {
        self.data_dir.path().join("data")
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the broker logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to 5 s for `needle` to appear in the log (it is read by another thread).
    pub fn log_contains(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.log.lock().unwrap().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Sends `signal` to the broker process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with the PID of a child we spawned and have not reaped.
        let result = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(result, 0, "kill failed");
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- shardmq log ---\n{}", self.log());
        }
    }
}

/// Connection arguments for the default guest user.
pub fn guest(broker: &Broker) -> amqprs::connection::OpenConnectionArguments {
    amqprs::connection::OpenConnectionArguments::new("127.0.0.1", broker.port(), "guest", "guest")
}

/// Records the reply codes of connection.close and channel.close the broker sends.
#[derive(Clone, Default)]
pub struct CloseRecorder {
    pub connection_codes: Arc<Mutex<Vec<(u16, String)>>>,
}

impl CloseRecorder {
    pub fn codes(&self) -> Vec<u16> {
        self.connection_codes
            .lock()
            .unwrap()
            .iter()
            .map(|(code, _)| *code)
            .collect()
    }

    /// Waits up to `limit` for a connection.close to arrive; returns its code and text.
    pub async fn wait_close(&self, limit: Duration) -> Option<(u16, String)> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(close) = self.connection_codes.lock().unwrap().first() {
                return Some(close.clone());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

#[async_trait::async_trait]
impl amqprs::callbacks::ConnectionCallback for CloseRecorder {
    async fn close(
        &mut self,
        _connection: &amqprs::connection::Connection,
        close: amqprs::Close,
    ) -> Result<(), amqprs::error::Error> {
        self.connection_codes
            .lock()
            .unwrap()
            .push((close.reply_code(), close.reply_text().to_string()));
        Ok(())
    }

    async fn blocked(&mut self, _connection: &amqprs::connection::Connection, _reason: String) {}

    async fn unblocked(&mut self, _connection: &amqprs::connection::Connection) {}

    async fn secret_updated(&mut self, _connection: &amqprs::connection::Connection) {}
}

/// Opens a connection and a channel, proving the broker still serves clients.
pub async fn assert_broker_serves(broker: &Broker) {
    let connection = tokio::time::timeout(
        Duration::from_secs(10),
        amqprs::connection::Connection::open(&guest(broker)),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let channel = connection.open_channel(None).await.expect("open a channel");
    channel.close().await.expect("close the channel");
    connection.close().await.expect("close the connection");
}

/// Opens a connection that the broker must refuse; returns the client's error text.
pub async fn refused(arguments: &amqprs::connection::OpenConnectionArguments) -> String {
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        amqprs::connection::Connection::open(arguments),
    )
    .await
    .expect("the broker answers in time");
    match attempt {
        Ok(_) => panic!("the broker accepted a connection it must refuse"),
        Err(error) => error.to_string(),
    }
}

/// A basic.return as recorded: reply code, routing key, body.
pub type Returned = (u16, String, Vec<u8>);

/// What the broker sent a channel outside of replies: closes, cancels, confirms, returns.
#[derive(Clone, Default)]
pub struct ChannelRecorder {
    pub closes: Arc<Mutex<Vec<(u16, String)>>>,
    pub cancels: Arc<Mutex<Vec<String>>>,
    pub acks: Arc<Mutex<Vec<(u64, bool)>>>,
    pub nacks: Arc<Mutex<Vec<(u64, bool)>>>,
    pub returns: Arc<Mutex<Vec<Returned>>>,
}

impl ChannelRecorder {
    /// Waits up to 5 s until `done` holds for the recorder.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&ChannelRecorder) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn close_code(&self) -> u16 {
        self.wait_for("channel.close", |r| !r.closes.lock().unwrap().is_empty())
            .await;
        self.closes.lock().unwrap()[0].0
    }

    /// The highest sequence number confirmed so far (acks are cumulative with `multiple`).
    pub fn confirmed_up_to(&self) -> u64 {
        self.acks
            .lock()
            .unwrap()
            .iter()
            .map(|(tag, _)| *tag)
            .max()
            .unwrap_or(0)
    }
}

#[async_trait::async_trait]
impl amqprs::callbacks::ChannelCallback for ChannelRecorder {
    async fn close(
        &mut self,
        _channel: &amqprs::channel::Channel,
        close: amqprs::CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        self.closes
            .lock()
            .unwrap()
            .push((close.reply_code(), close.reply_text().to_string()));
        Ok(())
    }

    async fn cancel(
        &mut self,
        _channel: &amqprs::channel::Channel,
        cancel: amqprs::Cancel,
    ) -> Result<(), amqprs::error::Error> {
        self.cancels
            .lock()
            .unwrap()
            .push(cancel.consumer_tag().to_string());
        Ok(())
    }

    async fn flow(
        &mut self,
        _channel: &amqprs::channel::Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &amqprs::channel::Channel, ack: amqprs::Ack) {
        self.acks
            .lock()
            .unwrap()
            .push((ack.delivery_tag(), ack.mutiple()));
    }

    async fn publish_nack(&mut self, _channel: &amqprs::channel::Channel, nack: amqprs::Nack) {
        self.nacks
            .lock()
            .unwrap()
            .push((nack.delivery_tag(), nack.multiple()));
    }

    async fn publish_return(
        &mut self,
        _channel: &amqprs::channel::Channel,
        ret: amqprs::Return,
        _basic_properties: amqprs::BasicProperties,
        content: Vec<u8>,
    ) {
        self.returns.lock().unwrap().push((
            ret.reply_code(),
            ret.routing_key().to_string(),
            content,
        ));
    }
}

/// A connection and a channel with a recorder attached.
pub async fn open_channel(
    broker: &Broker,
) -> (
    amqprs::connection::Connection,
    amqprs::channel::Channel,
    ChannelRecorder,
) {
    let connection = amqprs::connection::Connection::open(&guest(broker))
        .await
        .expect("connect");
    let channel = connection.open_channel(None).await.expect("channel");
    let recorder = ChannelRecorder::default();
    channel
        .register_callback(recorder.clone())
        .await
        .expect("channel callback");
    (connection, channel, recorder)
}

/// Consumes `queue` on `channel` with a per-consumer prefetch of `prefetch` (basic.qos, then
/// basic.consume); returns the consumer tag and its deliveries.
pub async fn consume_with_prefetch(
    channel: &amqprs::channel::Channel,
    queue: &str,
    consumer_tag: &str,
    prefetch: u16,
) -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<amqprs::channel::ConsumerMessage>,
) {
    channel
        .basic_qos(amqprs::channel::BasicQosArguments::new(0, prefetch, false))
        .await
        .unwrap();
    channel
        .basic_consume_rx(amqprs::channel::BasicConsumeArguments::new(
            queue,
            consumer_tag,
        ))
        .await
        .unwrap()
}

/// The next delivery, within 10 s.
pub async fn next_delivery(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<amqprs::channel::ConsumerMessage>,
) -> amqprs::channel::ConsumerMessage {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a delivery in time")
        .expect("consumer open")
}

/// Config for tests that want queues spread over the shards (so that publisher, consumer and
/// queue owner sit on different cores).
pub const BALANCED: &str = "[queues]\nplacement = \"balanced\"\n";

/// `BALANCED` with a memory budget of a few messages, so that persistent messages on durable
/// queues are paged out almost at once and read back from the log when delivered.
pub const BALANCED_PAGING: &str =
    "[queues]\nplacement = \"balanced\"\nmemory_budget_bytes = 8192\n";

/// Resident memory of a process in bytes (Linux /proc).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Bytes of every shard's write-ahead log segments under a data directory.
pub fn log_bytes(data: &std::path::Path) -> u64 {
    written_log_files(data)
        .iter()
        .map(|file| std::fs::metadata(file).map_or(0, |m| m.len()))
        .sum()
}

/// Waits up to `within` for the log files under `data` to shrink below `limit` bytes (segments
/// are reclaimed in the background); returns their size at the end.
pub async fn log_bytes_fall_below(data: &std::path::Path, limit: u64, within: Duration) -> u64 {
    let deadline = std::time::Instant::now() + within;
    loop {
        let bytes = log_bytes(data);
        if bytes < limit || std::time::Instant::now() >= deadline {
            return bytes;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `open_channel` with publisher confirms selected on the channel.
pub async fn open_confirming_channel(
    broker: &Broker,
) -> (
    amqprs::connection::Connection,
    amqprs::channel::Channel,
    ChannelRecorder,
) {
    let (connection, channel, recorder) = open_channel(broker).await;
    channel
        .confirm_select(amqprs::channel::ConfirmSelectArguments::default())
        .await
        .expect("confirm.select");
    (connection, channel, recorder)
}

/// The log segment files under `data` that hold anything (a segment created ahead of time is
/// still empty).
pub fn written_log_files(data: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for shard in std::fs::read_dir(data).unwrap().flatten() {
        if shard.file_name().to_string_lossy().starts_with("shard-") {
            for file in std::fs::read_dir(shard.path()).unwrap().flatten() {
                if file.metadata().unwrap().len() > 0 {
                    files.push(file.path());
                }
            }
        }
    }
    files
}

/// Waits up to `within` for every one of `files` to be deleted (reclaimed or compacted away in
/// the background); returns those still there at the end.
pub async fn log_files_gone(
    files: &[std::path::PathBuf],
    within: Duration,
) -> Vec<std::path::PathBuf> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left: Vec<_> = files.iter().filter(|f| f.exists()).cloned().collect();
        if left.is_empty() || std::time::Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A lapin connection as guest, within 10 s, and a channel on it.
pub async fn lapin_channel(broker: &Broker) -> (lapin::Connection, lapin::Channel) {
    let uri = format!("amqp://guest:guest@127.0.0.1:{}/%2f", broker.port());
    let connection = tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    (connection, channel)
}

/// Publishes `body` through lapin with default options and properties; the returned confirm
/// resolves when the broker confirms it (at once on a channel without confirms).
pub async fn lapin_publish(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
) -> lapin::PublisherConfirm {
    lapin_publish_with(channel, exchange, routing_key, body, Default::default()).await
}

/// `lapin_publish_with`, waiting for the broker's answer: its confirm on a confirming channel
/// (an ack at once on another).
pub async fn lapin_publish_confirmed(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> lapin::Confirmation {
    lapin_publish_with(channel, exchange, routing_key, body, properties)
        .await
        .await
        .expect("confirmation")
}

/// `lapin_publish` with `properties`.
pub async fn lapin_publish_with(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> lapin::PublisherConfirm {
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish")
}

/// Every message left in `queue` as (body, redelivered), taken one basic.get (no-ack) at a time
/// through lapin until get-empty. Drains go through lapin: amqprs 2.1.5's channel dispatcher
/// checks for a registered get responder before it looks at incoming frames, so a get-ok that
/// arrives between those two polls (the dispatcher thread preempted on a busy machine) panics
/// its task ("get responder must be registered") and the get fails.
pub async fn drain_no_ack(broker: &Broker, queue: &str) -> Vec<(Vec<u8>, bool)> {
    use lapin::options::BasicGetOptions;
    let (connection, channel) = lapin_channel(broker).await;
    let mut out = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        out.push((message.delivery.data, message.delivery.redelivered));
    }
    let _ = connection.close(200, "drained".into()).await;
    out
}
