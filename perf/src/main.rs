//! `loadgen`: a load generator for AMQP 0.9.1 brokers, modelled on RabbitMQ's PerfTest and built
//! on a third-party client (amqprs), so it shares no code with shardmq.
//!
//! Every producer and consumer has its own connection. Producers put a send timestamp in the
//! first 8 bytes of each body; consumers record end-to-end latency in an HDR histogram. At the
//! end it prints a summary and one JSON line (`--json`), including the CPU seconds the generator
//! itself used, so a report can tell when the generator, not the broker, was the bottleneck.

mod options;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, ExchangeDeclareArguments, ExchangeDeleteArguments, QueueBindArguments,
    QueueDeclareArguments, QueueDeleteArguments, QueuePurgeArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use hdrhistogram::Histogram;
use options::{ExchangeKind, Options};
use tokio::sync::mpsc::error::TryRecvError;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given; zeroed is a valid initial value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    confirmed: AtomicU64,
    nacked: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
    returned: AtomicU64,
}

/// Counts confirms (acks with `multiple` cover every earlier tag) and wakes the producer
/// waiting for room in its confirm window.
#[derive(Clone)]
struct ConfirmTracker {
    highest: Arc<AtomicU64>,
    counters: Arc<Counters>,
    confirmed: Arc<tokio::sync::Notify>,
}

#[async_trait::async_trait]
impl ChannelCallback for ConfirmTracker {
    async fn close(
        &mut self,
        _: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        eprintln!("loadgen: channel closed by the broker: {close}");
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let tag = ack.delivery_tag();
        let previous = self.highest.fetch_max(tag, Ordering::Relaxed);
        if tag > previous {
            let newly = if ack.mutiple() { tag - previous } else { 1 };
            self.counters.confirmed.fetch_add(newly, Ordering::Relaxed);
        }
        self.confirmed.notify_one();
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        self.highest
            .fetch_max(nack.delivery_tag(), Ordering::Relaxed);
        self.counters.nacked.fetch_add(1, Ordering::Relaxed);
        self.confirmed.notify_one();
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {
        self.counters.returned.fetch_add(1, Ordering::Relaxed);
    }
}

async fn connect(options: &Options, name: &str) -> Result<Connection, String> {
    let mut arguments = OpenConnectionArguments::new(
        &options.host,
        options.port,
        &options.user,
        &options.password,
    );
    arguments.virtual_host(&options.vhost).connection_name(name);
    Connection::open(&arguments)
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", options.host, options.port))
}

fn queue_name(options: &Options, index: usize) -> String {
    format!("{}-{index}", options.queue_prefix)
}

/// Where producer `index` publishes: (exchange, routing key).
fn target(options: &Options, index: usize) -> (String, String) {
    let queue = queue_name(options, index % options.queues);
    match options.exchange {
        ExchangeKind::Default => (String::new(), queue),
        ExchangeKind::Direct => ("amq.direct".into(), queue),
        ExchangeKind::Fanout => ("loadgen.fanout".into(), String::new()),
        ExchangeKind::Topic => ("amq.topic".into(), format!("loadgen.{queue}.event")),
    }
}

async fn declare_topology(options: &Options) -> Result<(), String> {
    let connection = connect(options, "loadgen-setup").await?;
    let channel = connection
        .open_channel(None)
        .await
        .map_err(|e| e.to_string())?;
    if options.exchange == ExchangeKind::Fanout {
        channel
            .exchange_declare(ExchangeDeclareArguments::new("loadgen.fanout", "fanout"))
            .await
            .map_err(|e| e.to_string())?;
    }
    for index in 0..options.queues {
        let name = queue_name(options, index);
        let mut declare = QueueDeclareArguments::new(&name);
        declare.durable(options.persistent);
        channel
            .queue_declare(declare)
            .await
            .map_err(|e| e.to_string())?;
        if options.purge {
            channel
                .queue_purge(QueuePurgeArguments::new(&name))
                .await
                .map_err(|e| e.to_string())?;
        }
        let binding = match options.exchange {
            ExchangeKind::Default => None,
            ExchangeKind::Direct => Some(("amq.direct", name.clone())),
            ExchangeKind::Fanout => Some(("loadgen.fanout", String::new())),
            ExchangeKind::Topic => Some(("amq.topic", format!("loadgen.{name}.#"))),
        };
        if let Some((exchange, key)) = binding {
            channel
                .queue_bind(QueueBindArguments::new(&name, exchange, &key))
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    let _ = channel.close().await;
    let _ = connection.close().await;
    Ok(())
}

/// Deletes what `declare_topology` created, so the next run starts from an empty broker.
async fn delete_topology(options: &Options) -> Result<(), String> {
    let connection = connect(options, "loadgen-cleanup").await?;
    let channel = connection
        .open_channel(None)
        .await
        .map_err(|e| e.to_string())?;
    for index in 0..options.queues {
        channel
            .queue_delete(QueueDeleteArguments::new(&queue_name(options, index)))
            .await
            .map_err(|e| e.to_string())?;
    }
    if options.exchange == ExchangeKind::Fanout {
        channel
            .exchange_delete(ExchangeDeleteArguments::new("loadgen.fanout"))
            .await
            .map_err(|e| e.to_string())?;
    }
    let _ = channel.close().await;
    let _ = connection.close().await;
    Ok(())
}

async fn produce(
    options: Arc<Options>,
    index: usize,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let connection = connect(&options, &format!("loadgen-producer-{index}")).await?;
    let channel = connection
        .open_channel(None)
        .await
        .map_err(|e| e.to_string())?;
    let highest = Arc::new(AtomicU64::new(0));
    let confirmed = Arc::new(tokio::sync::Notify::new());
    channel
        .register_callback(ConfirmTracker {
            highest: highest.clone(),
            counters: counters.clone(),
            confirmed: confirmed.clone(),
        })
        .await
        .map_err(|e| e.to_string())?;
    if options.confirm.is_some() {
        channel
            .confirm_select(ConfirmSelectArguments::default())
            .await
            .map_err(|e| e.to_string())?;
    }
    let (exchange, routing_key) = target(&options, index);
    let properties = BasicProperties::default()
        .with_persistence(options.persistent)
        .finish();
    let mut body = vec![0u8; options.size.max(16)];
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if options.messages.is_some_and(|limit| sent >= limit) {
            break;
        }
        if let Some(rate) = options.rate {
            let due = started + Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        if let Some(window) = options.confirm {
            // Woken by the next confirm (tokio's timers tick in milliseconds: polling with a
            // sleep idled the producer for a millisecond each time its window was full). The
            // timeout only bounds the wait for `stop`.
            while sent >= highest.load(Ordering::Relaxed) + window && !stop.load(Ordering::Relaxed)
            {
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), confirmed.notified()).await;
            }
        }
        body[..8].copy_from_slice(&now_ns().to_be_bytes());
        body[8..16].copy_from_slice(&sent.to_be_bytes());
        let published = channel
            .basic_publish(
                properties.clone(),
                body.clone(),
                BasicPublishArguments::new(&exchange, &routing_key),
            )
            .await;
        if published.is_err() {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
        sent += 1;
        counters.sent.fetch_add(1, Ordering::Relaxed);
        if sent % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // Wait (bounded) for the last confirms before closing.
    if options.confirm.is_some() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while highest.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let _ = channel.close().await;
    let _ = connection.close().await;
    Ok(())
}

async fn consume(
    options: Arc<Options>,
    index: usize,
    counters: Arc<Counters>,
    latency: Arc<Mutex<Histogram<u64>>>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let connection = connect(&options, &format!("loadgen-consumer-{index}")).await?;
    let channel = connection
        .open_channel(None)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(prefetch) = options.prefetch {
        channel
            .basic_qos(BasicQosArguments::new(0, prefetch, false))
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut arguments =
        BasicConsumeArguments::new(&queue_name(&options, index % options.queues), "");
    arguments.manual_ack(!options.auto_ack);
    let (_, mut deliveries) = channel
        .basic_consume_rx(arguments)
        .await
        .map_err(|e| e.to_string())?;
    let mut local =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut unacked = 0u64;
    let mut taken = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // A ready delivery is taken without arming a timer; the timeout only bounds waiting.
        // Taking them may not yield (no ack to send: auto-ack, multi-ack), so yield now and
        // then to let this worker's other tasks (the connection's reader) run.
        let next = match deliveries.try_recv() {
            Ok(message) => {
                taken += 1;
                if taken % 64 == 0 {
                    tokio::task::yield_now().await;
                }
                Ok(Some(message))
            }
            Err(TryRecvError::Disconnected) => Ok(None),
            Err(TryRecvError::Empty) => {
                tokio::time::timeout(Duration::from_millis(100), deliveries.recv()).await
            }
        };
        let Ok(Some(message)) = next else {
            if matches!(next, Ok(None)) {
                break;
            }
            continue;
        };
        if let Some(body) = &message.content {
            if body.len() >= 8 {
                let sent = u64::from_be_bytes(body[..8].try_into().unwrap_or_default());
                let _ = local.record(now_ns().saturating_sub(sent).max(1));
            }
        }
        counters.received.fetch_add(1, Ordering::Relaxed);
        if !options.auto_ack {
            unacked += 1;
            if unacked >= options.multi_ack {
                if let Some(deliver) = &message.deliver {
                    let _ = channel
                        .basic_ack(BasicAckArguments::new(deliver.delivery_tag(), true))
                        .await;
                }
                unacked = 0;
            }
        }
        if options
            .consume_limit
            .is_some_and(|limit| counters.received.load(Ordering::Relaxed) >= limit)
        {
            stop.store(true, Ordering::Relaxed);
        }
    }
    if let Ok(mut merged) = latency.lock() {
        let _ = merged.add(&local);
    }
    let _ = channel.close().await;
    let _ = connection.close().await;
    Ok(())
}

fn main() {
    let options = match options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("loadgen: {message}\n\n{}", options::USAGE);
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.threads)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let code = runtime.block_on(run(Arc::new(options)));
    std::process::exit(code);
}

async fn run(options: Arc<Options>) -> i32 {
    if let Err(e) = declare_topology(&options).await {
        eprintln!("loadgen: {e}");
        return 1;
    }
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let latency = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds"),
    ));
    let mut idle = Vec::new();
    for index in 0..options.idle_connections {
        match connect(&options, &format!("loadgen-idle-{index}")).await {
            Ok(connection) => idle.push(connection),
            Err(e) => {
                eprintln!("loadgen: idle connection {index}: {e}");
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let cpu_before = cpu_seconds();
    let mut tasks = Vec::new();
    for index in 0..options.consumers {
        tasks.push(tokio::spawn(consume(
            options.clone(),
            index,
            counters.clone(),
            latency.clone(),
            stop.clone(),
        )));
    }
    // Consumers first, so that nothing is measured against an empty subscription.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    for index in 0..options.producers {
        tasks.push(tokio::spawn(produce(
            options.clone(),
            index,
            counters.clone(),
            stop.clone(),
        )));
    }
    let deadline = started + Duration::from_secs_f64(options.duration);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let producers_done = options.producers > 0
            && options.messages.is_some_and(|m| {
                counters.sent.load(Ordering::Relaxed) >= m * options.producers as u64
            });
        let consumers_only = options.producers == 0
            && options
                .consume_limit
                .is_some_and(|l| counters.received.load(Ordering::Relaxed) >= l);
        if Instant::now() >= deadline || stop.load(Ordering::Relaxed) || consumers_only {
            break;
        }
        if producers_done && options.consumers == 0 && options.confirm.is_some() {
            let sent = counters.sent.load(Ordering::Relaxed);
            if counters.confirmed.load(Ordering::Relaxed) + counters.nacked.load(Ordering::Relaxed)
                >= sent
            {
                break;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("loadgen: {e}");
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("loadgen: task failed: {e}");
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    drop(idle);
    let cpu = cpu_seconds() - cpu_before;
    if options.cleanup {
        if let Err(e) = delete_topology(&options).await {
            eprintln!("loadgen: cleanup: {e}");
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    let sent = counters.sent.load(Ordering::Relaxed);
    let received = counters.received.load(Ordering::Relaxed);
    let confirmed = counters.confirmed.load(Ordering::Relaxed);
    let errors = counters.errors.load(Ordering::Relaxed);
    let histogram = latency.lock().map(|h| h.clone()).unwrap_or_else(|_| {
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
    });
    let percentile = |q: f64| {
        if histogram.is_empty() {
            0.0
        } else {
            histogram.value_at_quantile(q) as f64 / 1e3
        }
    };
    let (p50, p99, p999, max) = (
        percentile(0.5),
        percentile(0.99),
        percentile(0.999),
        if histogram.is_empty() {
            0.0
        } else {
            histogram.max() as f64 / 1e3
        },
    );
    println!(
        "{}: sent {sent} ({:.0} msg/s), received {received} ({:.0} msg/s), confirmed {confirmed} ({:.0} msg/s), \
         latency µs p50 {p50:.0} p99 {p99:.0} p99.9 {p999:.0} max {max:.0}, errors {errors}, \
         loadgen CPU {cpu:.2} s over {elapsed:.2} s",
        options.label,
        sent as f64 / elapsed,
        received as f64 / elapsed,
        confirmed as f64 / elapsed,
    );
    if cpu / elapsed > 0.8 * options.threads as f64 {
        eprintln!(
            "loadgen: warning: the generator used {:.0}% of its {} threads; it, not the broker, may be the bottleneck",
            100.0 * cpu / elapsed / options.threads as f64,
            options.threads
        );
    }
    if options.json {
        println!(
            "{{\"label\":\"{}\",\"seconds\":{elapsed:.3},\"sent\":{sent},\"received\":{received},\
             \"confirmed\":{confirmed},\"send_rate\":{:.1},\"receive_rate\":{:.1},\"confirm_rate\":{:.1},\
             \"latency_us\":{{\"p50\":{p50:.1},\"p99\":{p99:.1},\"p999\":{p999:.1},\"max\":{max:.1}}},\
             \"errors\":{errors},\"loadgen_cpu_seconds\":{cpu:.3}}}",
            options.label.replace('"', "'"),
            sent as f64 / elapsed,
            received as f64 / elapsed,
            confirmed as f64 / elapsed,
        );
    }
    i32::from(errors > 0)
}
