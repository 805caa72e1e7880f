//! `loadgen`: a load generator for AMQP 0.9.1 brokers, modelled on RabbitMQ's PerfTest and built
//! on a third-party client (rabbitmq-c, loaded at run time: `rabbitmq_c`), so it shares no code
//! with shardmq.
//!
//! Every producer and consumer is a thread with a connection of its own. Producers put a send timestamp in the
//! first 8 bytes of each body; consumers record end-to-end latency in an HDR histogram. At the
//! end it prints a summary and one JSON line (`--json`), including the CPU seconds the generator
//! itself used, so a report can tell when the generator, not the broker, was the bottleneck.

mod options;
mod rabbitmq_c;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use options::{ExchangeKind, Options};
use rabbitmq_c::{Connection, Event, Target};

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

/// How long a blocked wait (for a delivery, for a confirm) lasts before `stop` is looked at.
const WAIT_STEP: Duration = Duration::from_millis(100);

fn connect(options: &Options, name: &str) -> Result<Connection, String> {
    let target = Target {
        host: &options.host,
        port: options.port,
        vhost: &options.vhost,
        user: &options.user,
        password: &options.password,
    };
    Connection::open(&target, name)
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

fn declare_topology(options: &Options) -> Result<(), String> {
    let mut connection = connect(options, "loadgen-setup")?;
    if options.exchange == ExchangeKind::Fanout {
        connection.exchange_declare("loadgen.fanout", "fanout")?;
    }
    for index in 0..options.queues {
        let name = queue_name(options, index);
        connection.queue_declare(&name, options.persistent)?;
        if options.purge {
            connection.queue_purge(&name)?;
        }
        let binding = match options.exchange {
            ExchangeKind::Default => None,
            ExchangeKind::Direct => Some(("amq.direct", name.clone())),
            ExchangeKind::Fanout => Some(("loadgen.fanout", String::new())),
            ExchangeKind::Topic => Some(("amq.topic", format!("loadgen.{name}.#"))),
        };
        if let Some((exchange, key)) = binding {
            connection.queue_bind(&name, exchange, &key)?;
        }
    }
    Ok(())
}

/// Deletes what `declare_topology` created, so the next run starts from an empty broker.
fn delete_topology(options: &Options) -> Result<(), String> {
    let mut connection = connect(options, "loadgen-cleanup")?;
    for index in 0..options.queues {
        connection.queue_delete(&queue_name(options, index))?;
    }
    if options.exchange == ExchangeKind::Fanout {
        connection.exchange_delete("loadgen.fanout")?;
    }
    Ok(())
}

/// A producer's view of its confirms: the highest tag settled so far.
struct Confirms<'a> {
    highest: u64,
    counters: &'a Counters,
}

impl Confirms<'_> {
    fn apply(&mut self, event: Event) {
        match event {
            Event::Confirmed { tag, multiple } if tag > self.highest => {
                let newly = if multiple { tag - self.highest } else { 1 };
                self.counters.confirmed.fetch_add(newly, Ordering::Relaxed);
                self.highest = tag;
            }
            Event::Nacked { tag } => {
                self.highest = self.highest.max(tag);
                self.counters.nacked.fetch_add(1, Ordering::Relaxed);
            }
            Event::Returned => {
                self.counters.returned.fetch_add(1, Ordering::Relaxed);
            }
            Event::Confirmed { .. } | Event::Other => {}
        }
    }

    /// Takes in what the broker has sent, waiting at most `timeout`.
    fn read(&mut self, connection: &mut Connection, timeout: Duration) -> Result<bool, String> {
        match connection.next_event(timeout)? {
            Some(event) => {
                self.apply(event);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Publishes without confirms look for what the broker sent (a channel closed, say) once per
/// this many messages; with confirms, once per `CONFIRM_POLL_EVERY`.
const EVENT_POLL_EVERY: u64 = 1024;
const CONFIRM_POLL_EVERY: u64 = 64;

fn produce(
    options: &Options,
    index: usize,
    counters: &Counters,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut connection = connect(options, &format!("loadgen-producer-{index}"))?;
    if options.confirm.is_some() {
        connection.confirm_select()?;
    }
    connection.batch_writes();
    let (exchange, routing_key) = target(options, index);
    let properties = rabbitmq_c::properties(options.persistent);
    let mut body = vec![0u8; options.size.max(16)];
    let mut confirms = Confirms {
        highest: 0,
        counters,
    };
    let poll_every = if options.confirm.is_some() {
        CONFIRM_POLL_EVERY
    } else {
        EVENT_POLL_EVERY
    };
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if options.messages.is_some_and(|limit| sent >= limit) {
            break;
        }
        if let Some(rate) = options.rate {
            // Evenly spaced, as PerfTest's rate limiter spaces them.
            let due = started + Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                connection.flush()?;
                thread::sleep(wait);
            }
        }
        if sent % poll_every == 0 {
            while confirms.read(&mut connection, Duration::ZERO)? {}
        }
        if let Some(window) = options.confirm {
            while sent >= confirms.highest + window && !stop.load(Ordering::Relaxed) {
                if confirms.read(&mut connection, WAIT_STEP)? {
                    while confirms.read(&mut connection, Duration::ZERO)? {}
                }
            }
        }
        body[..8].copy_from_slice(&now_ns().to_be_bytes());
        body[8..16].copy_from_slice(&sent.to_be_bytes());
        connection.publish(&exchange, &routing_key, &properties, &body)?;
        sent += 1;
        counters.sent.fetch_add(1, Ordering::Relaxed);
    }
    // Wait (bounded) for the last confirms before closing.
    if options.confirm.is_some() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while confirms.highest < sent && Instant::now() < deadline {
            confirms.read(&mut connection, WAIT_STEP)?;
        }
    }
    Ok(())
}

fn consume(
    options: &Options,
    index: usize,
    counters: &Counters,
    latency: &Mutex<Histogram<u64>>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut connection = connect(options, &format!("loadgen-consumer-{index}"))?;
    if let Some(prefetch) = options.prefetch {
        connection.basic_qos(prefetch)?;
    }
    connection.basic_consume(
        &queue_name(options, index % options.queues),
        options.auto_ack,
    )?;
    connection.batch_writes();
    let mut local =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut unacked = 0u64;
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        let tag = match connection.next_delivery(WAIT_STEP) {
            Ok(Some(delivery)) => {
                if let Some(stamp) = delivery.body.get(..8) {
                    let sent = u64::from_be_bytes(stamp.try_into().unwrap_or_default());
                    let _ = local.record(now_ns().saturating_sub(sent).max(1));
                }
                delivery.tag
            }
            Ok(None) => continue,
            Err(e) => break Err(e),
        };
        counters.received.fetch_add(1, Ordering::Relaxed);
        if !options.auto_ack {
            unacked += 1;
            if unacked >= options.multi_ack {
                if let Err(e) = connection.ack(tag, true) {
                    break Err(e);
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
    };
    if let Ok(mut merged) = latency.lock() {
        let _ = merged.add(&local);
    }
    result
}

fn main() {
    let options = match options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("loadgen: {message}\n\n{}", options::USAGE);
            std::process::exit(2);
        }
    };
    std::process::exit(run(&options));
}

/// Counts a producer's or consumer's failure.
fn report(counters: &Counters, role: &str, result: thread::Result<Result<(), String>>) {
    let message = match result {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(_) => format!("{role} thread panicked"),
    };
    eprintln!("loadgen: {role}: {message}");
    counters.errors.fetch_add(1, Ordering::Relaxed);
}

fn run(options: &Options) -> i32 {
    if let Err(e) = declare_topology(options) {
        eprintln!("loadgen: {e}");
        return 1;
    }
    let counters = Counters::default();
    let stop = AtomicBool::new(false);
    let latency = Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds"),
    );
    let mut idle = Vec::new();
    for index in 0..options.idle_connections {
        match connect(options, &format!("loadgen-idle-{index}")) {
            Ok(connection) => idle.push(connection),
            Err(e) => {
                eprintln!("loadgen: idle connection {index}: {e}");
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let cpu_before = cpu_seconds();
    // Each producer and consumer is a thread with its own connection (rabbitmq-c blocks).
    let elapsed = thread::scope(|scope| {
        let (counters, stop, latency) = (&counters, &stop, &latency);
        let consumers: Vec<_> = (0..options.consumers)
            .map(|index| scope.spawn(move || consume(options, index, counters, latency, stop)))
            .collect();
        // Consumers first, so that nothing is measured against an empty subscription.
        thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let producers: Vec<_> = (0..options.producers)
            .map(|index| scope.spawn(move || produce(options, index, counters, stop)))
            .collect();
        let deadline = started + Duration::from_secs_f64(options.duration);
        loop {
            thread::sleep(Duration::from_millis(20));
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
                if counters.confirmed.load(Ordering::Relaxed)
                    + counters.nacked.load(Ordering::Relaxed)
                    >= sent
                {
                    break;
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for producer in producers {
            report(counters, "producer", producer.join());
        }
        for consumer in consumers {
            report(counters, "consumer", consumer.join());
        }
        elapsed
    });
    drop(idle);
    let cpu = cpu_seconds() - cpu_before;
    if options.cleanup {
        if let Err(e) = delete_topology(options) {
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
    let cores = thread::available_parallelism().map_or(1, usize::from) as f64;
    if cpu / elapsed > 0.5 * cores {
        eprintln!(
            "loadgen: warning: the generator used {:.1} of the machine's {cores} cores; it, not the broker, may be the bottleneck",
            cpu / elapsed,
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
