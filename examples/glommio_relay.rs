//! The wake-up floor of glommio itself: `perf/wakeup_floor/relay.c`'s relay (serve one producer,
//! then one consumer; forward the producer's bytes to the consumer; read and drop the
//! consumer's acks), written on glommio the way shardmq's connections are: one executor pinned
//! to CPU 0, a task per socket, reads and writes through glommio's `TcpStream`. No protocol.
//!
//! `perf/wakeup_floor.py --relay glommio` builds and runs it beside the C relay's producer and
//! consumer, so the two relays' CPU per message compare directly, and shardmq's against both:
//! what the C relay does not pay but this one does is glommio's loop; what shardmq pays beyond
//! this one is shardmq's own.
//!
//!     cargo run --release --example glommio_relay -- PORT
//!
//! Prints one JSON line like the C relay's (interval_us is always 0 here).

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;

use futures_lite::future::poll_fn;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};

const MESSAGE: usize = 256;

async fn read_some(stream: &RefCell<TcpStream>, buffer: &mut [u8]) -> std::io::Result<usize> {
    poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_read(cx, buffer)).await
}

async fn write_all(stream: &RefCell<TcpStream>, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let written =
            poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_write(cx, bytes)).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[written..];
    }
    Ok(())
}

fn cpu_seconds() -> (f64, f64) {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    (seconds(usage.ru_utime), seconds(usage.ru_stime))
}

fn wakeups() -> u64 {
    // Voluntary context switches of this thread: one per time the executor went to sleep.
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn relay(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let producer = RefCell::new(listener.accept().await?);
    let consumer = Rc::new(RefCell::new(listener.accept().await?));
    producer.borrow().set_nodelay(true)?;
    consumer.borrow().set_nodelay(true)?;
    let (user0, sys0) = cpu_seconds();
    let wakeups0 = wakeups();
    // The consumer's acks are read and dropped; the task ends with the executor.
    glommio::spawn_local({
        let consumer = consumer.clone();
        async move {
            let mut buffer = vec![0u8; 1 << 16];
            while let Ok(1..) = read_some(&consumer, &mut buffer).await {}
        }
    })
    .detach();
    let mut buffer = vec![0u8; 1 << 16];
    let mut forwarded = 0usize;
    loop {
        let got = read_some(&producer, &mut buffer).await?;
        if got == 0 {
            break;
        }
        forwarded += got;
        write_all(&consumer, &buffer[..got]).await?;
    }
    let (user1, sys1) = cpu_seconds();
    let woke = wakeups() - wakeups0;
    let messages = forwarded / MESSAGE;
    let (user, sys) = (user1 - user0, sys1 - sys0);
    let per_message = if messages > 0 {
        (user + sys) / messages as f64 * 1e6
    } else {
        0.0
    };
    println!(
        "{{\"interval_us\": 0, \"messages\": {messages}, \"wakeups\": {woke}, \"user_s\": {user:.3}, \
         \"sys_s\": {sys:.3}, \"us_per_message\": {per_message:.2}}}"
    );
    Ok(())
}

fn main() {
    let port: u16 = match std::env::args().nth(1).map(|p| p.parse()) {
        Some(Ok(port)) => port,
        _ => {
            eprintln!("usage: glommio_relay PORT");
            std::process::exit(2);
        }
    };
    let result = LocalExecutorBuilder::new(Placement::Fixed(0))
        .name("relay")
        .spawn(move || relay(port))
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|handle| {
            handle
                .join()
                .map_err(|e| std::io::Error::other(e.to_string()))?
        });
    if let Err(e) = result {
        eprintln!("glommio_relay: {e}");
        std::process::exit(1);
    }
}
