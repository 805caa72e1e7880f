//! The shards at run time: one glommio executor per shard pinned to one CPU, the AMQP listener
//! on every shard, the mesh between them, start-up and graceful shutdown.
//!
//! Start-up, in order:
//! 1. Shard 0 is spawned and binds the listen address (port 0 resolves to a free port here).
//! 2. Shards 1..n are spawned, in index order, and bind the same address; glommio sets
//!    SO_REUSEPORT, so the kernel spreads new connections over all shards and each connection
//!    stays on the core that accepted it.
//! 3. Every shard joins the mesh and pings every other shard; when all pongs are in, it reports
//!    ready and starts accepting. [`Broker::start`] returns once every shard is ready.
//!
//! Shutdown: [`Broker::shutdown`] raises a flag each shard polls; the shard stops accepting,
//! sends connection.close 320 CONNECTION_FORCED on every connection, waits up to
//! `runtime.shutdown_grace_ms` for them to finish, shuts down the sockets still open, and exits.

pub mod log_file;
pub mod mesh;
pub mod sync;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use glommio::net::TcpListener;
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use log::{debug, error, info, warn};
use shards::ShardId;

use crate::broker::messages::ShardMessage;
use crate::broker::meta_log::{self, DurableMetadata};
use crate::broker::shard::{ShardBroker, COORDINATOR};
use crate::config::Config;
use crate::connection::auth::Directory;
use crate::connection::{Connection, ConnectionSettings};
use mesh::{Mesh, MeshPlan};
use sync::Event;

/// How long start-up waits for a shard to bind, join the mesh and answer pings.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long start-up waits for the shards to replay their logs: recovery reads every live
/// segment (about 5 GB for 5,000,000 queued 1 KiB messages), which may take minutes on a slow
/// disk, and must not be cut short.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often a shard looks at the process-wide shutdown flag.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);

/// A running broker: its shards' threads and the address they listen on.
pub struct Broker {
    local_addr: SocketAddr,
    shard_count: usize,
    shutdown_requested: Arc<AtomicBool>,
    shards: Vec<ExecutorJoinHandle<Result<(), String>>>,
}

/// The CPUs this process may run on (its affinity mask), in ascending order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set, and sched_getaffinity writes
    // at most size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let result =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if result != 0 {
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..count).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: cpu < CPU_SETSIZE, the bound CPU_ISSET requires.
        .filter(|cpu| unsafe { libc::CPU_ISSET(*cpu, &set) })
        .collect()
}

/// Stops the broker from any thread.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<AtomicBool>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Dropped when a shard's main future ends, normally or by a panic unwinding it. A shard that
/// ends without a shutdown having been asked for takes the whole broker down with it, so a half
/// broker never keeps serving.
struct ShardExitGuard {
    shard: ShardId,
    shutdown_requested: Arc<AtomicBool>,
}

impl Drop for ShardExitGuard {
    fn drop(&mut self) {
        if !self.shutdown_requested.swap(true, Ordering::AcqRel) {
            error!("{} stopped unexpectedly; stopping the broker", self.shard);
        }
    }
}

/// Everything a shard thread needs; all of it is `Send`.
struct ShardStart {
    shard: ShardId,
    metadata: Arc<DurableMetadata>,
    config: Arc<Config>,
    listen: SocketAddr,
    mesh: MeshPlan<Vec<ShardMessage>>,
    bound: Option<mpsc::Sender<Result<SocketAddr, String>>>,
    ready: mpsc::Sender<Result<(), String>>,
    shutdown_requested: Arc<AtomicBool>,
    /// Open connections over all shards, for `connection.max_connections`.
    open_connections: Arc<AtomicUsize>,
}

impl Broker {
    /// Starts every shard and returns once all of them accept connections.
    pub fn start(config: &Config) -> Result<Broker, String> {
        let cpus = allowed_cpus();
        let shard_count = if config.shards == 0 {
            cpus.len().max(1)
        } else {
            config.shards
        };
        for index in 0..shard_count {
            let dir = config.data_dir.join(format!("shard-{index}"));
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
        }
        // Durable metadata first: every shard applies it before it replays its own log.
        let metadata = meta_log::recover(&config.data_dir, &config.vhosts).map_err(|e| {
            format!(
                "cannot read the metadata log in {}: {e}",
                config.data_dir.display()
            )
        })?;
        if let Some(recorded) = metadata.shard_count {
            if recorded != shard_count {
                return Err(format!(
                    "{} was written by {recorded} shards and this broker runs {shard_count}; \
                     queues are owned by shard number, so start it with --shards {recorded}",
                    config.data_dir.display()
                ));
            }
        }
        let metadata = Arc::new(metadata);
        let config = Arc::new(config.clone());
        let shutdown_requested = Arc::new(AtomicBool::new(false));
        let open_connections = Arc::new(AtomicUsize::new(0));
        let mesh = MeshPlan::new(
            shard_count,
            config.runtime.mesh_channel_capacity,
            config.runtime.mesh_channel_bytes,
        );
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut broker = Broker {
            local_addr: config.listen,
            shard_count,
            shutdown_requested: shutdown_requested.clone(),
            shards: Vec::with_capacity(shard_count),
        };
        for index in 0..shard_count {
            let (bound_tx, bound_rx) = mpsc::channel();
            let start = ShardStart {
                shard: ShardId(index),
                metadata: metadata.clone(),
                config: config.clone(),
                listen: broker.local_addr,
                mesh: mesh.clone(),
                bound: (index == 0).then_some(bound_tx),
                ready: ready_tx.clone(),
                shutdown_requested: shutdown_requested.clone(),
                open_connections: open_connections.clone(),
            };
            let cpu = cpus[index % cpus.len().max(1)];
            let spawned = LocalExecutorBuilder::new(Placement::Fixed(cpu))
                .name(&format!("shard-{index}"))
                .io_memory(config.runtime.io_memory_bytes)
                .ring_depth(config.runtime.ring_depth)
                .spawn(move || run_shard(start));
            match spawned {
                Ok(handle) => broker.shards.push(handle),
                Err(e) => {
                    broker.abort();
                    return Err(format!(
                        "cannot start shard {index} on CPU {cpu}: {e}. Each shard locks \
                         runtime.io_memory_bytes = {} for io_uring; all shards together must fit \
                         `ulimit -l`",
                        config.runtime.io_memory_bytes
                    ));
                }
            }
            if index == 0 {
                match bound_rx.recv_timeout(START_TIMEOUT) {
                    Ok(Ok(addr)) => broker.local_addr = addr,
                    Ok(Err(e)) => {
                        broker.abort();
                        return Err(e);
                    }
                    Err(_) => {
                        broker.abort();
                        return Err("shard 0 did not bind its listener in time".into());
                    }
                }
            }
        }
        for _ in 0..shard_count {
            match ready_rx.recv_timeout(RECOVERY_TIMEOUT) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    broker.abort();
                    return Err(e);
                }
                Err(_) => {
                    broker.abort();
                    return Err("a shard did not become ready in time".into());
                }
            }
        }
        info!(
            "shardmq {} listening on {} with {shard_count} shards",
            env!("CARGO_PKG_VERSION"),
            broker.local_addr
        );
        Ok(broker)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    /// Asks every shard to close its connections and stop. Returns at once; see [`Broker::join`].
    pub fn shutdown(&self) {
        self.shutdown_handle().shutdown();
    }

    /// A handle another thread (a signal handler's) can use to stop the broker.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown_requested.clone())
    }

    /// Waits for every shard to stop. Errors name each shard that failed.
    pub fn join(self) -> Result<(), String> {
        let mut errors = Vec::new();
        for (index, handle) in self.shards.into_iter().enumerate() {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("shard {index}: {e}")),
                Err(e) => errors.push(format!("shard {index} panicked or failed: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn abort(&mut self) {
        self.shutdown();
        // Shards that started wait at most START_TIMEOUT for their peers, then exit.
        for handle in self.shards.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Waits for `future` at most `limit`.
async fn within<T>(limit: Duration, future: impl std::future::Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(future.await) }, async {
        glommio::timer::sleep(limit).await;
        None
    })
    .await
}

/// One shard's state, shared by its tasks (never by other threads).
struct Shard {
    id: ShardId,
    settings: Rc<ConnectionSettings>,
    broker: Rc<ShardBroker>,
    consumer_window: u32,
    connections: RefCell<ahash::HashMap<u64, Rc<Connection>>>,
    next_connection_id: Cell<u64>,
    stopping: Event,
}

async fn run_shard(start: ShardStart) -> Result<(), String> {
    let ShardStart {
        shard,
        metadata,
        config,
        listen,
        mesh,
        bound,
        ready,
        shutdown_requested,
        open_connections,
    } = start;
    let _exit_guard = ShardExitGuard {
        shard,
        shutdown_requested: shutdown_requested.clone(),
    };
    let report = |result: Result<(), String>| {
        let _ = ready.send(result.clone());
        result
    };
    let listener = match TcpListener::bind(listen) {
        Ok(listener) => listener,
        Err(e) => {
            let message = format!("{shard} cannot listen on {listen}: {e}");
            if let Some(bound) = &bound {
                let _ = bound.send(Err(message.clone()));
            }
            return report(Err(message));
        }
    };
    if let Some(bound) = bound {
        let addr = listener
            .local_addr()
            .map_err(|e| format!("{shard}: listener has no address: {e}"))?;
        let _ = bound.send(Ok(addr));
    }
    let (mesh, receivers) = match within(START_TIMEOUT, Mesh::join(mesh, shard)).await {
        Some(Ok(joined)) => joined,
        Some(Err(e)) => return report(Err(e)),
        None => return report(Err(format!("{shard}: other shards did not join the mesh"))),
    };
    let broker = ShardBroker::new(shard, mesh.shard_count(), mesh.clone(), &config);
    let mailbox = broker.clone();
    mesh.serve(
        receivers,
        Rc::new(move |from, batch: Vec<ShardMessage>| mailbox.handle_batch(from, batch)),
    );
    if let Err(e) = broker.open_storage(&config.data_dir, &metadata).await {
        return report(Err(e));
    }
    if shard == COORDINATOR {
        broker.watch_disk(config.data_dir.clone(), config.queues.disk_free_limit_bytes);
    }
    // Peers may still be replaying their logs.
    match within(RECOVERY_TIMEOUT, mesh.ping_all(shard.index() as u64 + 1)).await {
        Some(Ok(())) => {}
        Some(Err(e)) => return report(Err(e)),
        None => return report(Err(format!("{shard}: peers did not answer pings"))),
    }
    debug!(
        "{shard}: mesh up with {} shards, accepting on {listen}",
        mesh.shard_count()
    );
    report(Ok(()))?;

    let state = Rc::new(Shard {
        id: shard,
        settings: Rc::new(ConnectionSettings::new(
            Directory::from_config(&config),
            config.connection.clone(),
            open_connections,
        )),
        broker: broker.clone(),
        consumer_window: config.queues.consumer_window_messages,
        connections: RefCell::new(ahash::HashMap::default()),
        next_connection_id: Cell::new(0),
        stopping: Event::default(),
    });
    let watcher = state.clone();
    glommio::spawn_local(async move {
        while !shutdown_requested.load(Ordering::Acquire) {
            glommio::timer::sleep(SHUTDOWN_POLL).await;
        }
        watcher.stopping.set();
    })
    .detach();

    accept_until_stopped(&state, &listener).await;
    drop(listener);
    close_all_connections(
        &state,
        Duration::from_millis(config.runtime.shutdown_grace_ms),
    )
    .await;
    broker.close_storage().await;
    let counters = broker.counters();
    info!(
        "{shard}: mesh traffic: {} messages in {} batches sent, {} publishes and {} deliveries \
         received from other shards, {} congested sends retried",
        counters.messages_sent,
        counters.batches_sent,
        counters.publishes_received,
        counters.deliveries_received,
        counters.batches_held_back
    );
    Ok(())
}

async fn accept_until_stopped(state: &Rc<Shard>, listener: &TcpListener) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            state.stopping.wait().await;
            None
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                // Out of descriptors or memory: back off instead of spinning.
                warn!("{}: accept failed: {e}", state.id);
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let id = state.next_connection_id.get();
        state.next_connection_id.set(id + 1);
        let connection = match Connection::new(
            id,
            stream,
            state.settings.clone(),
            state.broker.clone(),
            state.consumer_window,
        ) {
            Ok(connection) => connection,
            Err(e) => {
                debug!("{}: dropped a connection at accept: {e}", state.id);
                continue;
            }
        };
        state
            .connections
            .borrow_mut()
            .insert(id, connection.clone());
        let owner = state.clone();
        glommio::spawn_local(async move {
            connection.run().await;
            owner.connections.borrow_mut().remove(&id);
        })
        .detach();
    }
}

async fn close_all_connections(state: &Rc<Shard>, grace: Duration) {
    let connections: Vec<Rc<Connection>> = state.connections.borrow().values().cloned().collect();
    if connections.is_empty() {
        return;
    }
    info!(
        "{}: closing {} connections for shutdown",
        state.id,
        connections.len()
    );
    for connection in &connections {
        connection.begin_shutdown();
    }
    let deadline = Instant::now() + grace;
    while connections.iter().any(|c| !c.is_finished()) && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    let stragglers: Vec<&Rc<Connection>> =
        connections.iter().filter(|c| !c.is_finished()).collect();
    if !stragglers.is_empty() {
        error!(
            "{}: {} connections did not close within {grace:?}; closing their sockets",
            state.id,
            stragglers.len()
        );
        for connection in &stragglers {
            connection.force_close();
        }
        // Let their tasks see the closed sockets and log.
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use glommio::channels::channel_mesh::Receivers;

    use super::*;

    /// Runs `body` as each of two shards joined to `plan`, on an executor of its own.
    fn on_two_shards<F, Fut>(plan: MeshPlan<u64>, body: F)
    where
        F: Fn(usize, Rc<Mesh<u64>>, Receivers<mesh::Envelope<u64>>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let handles: Vec<_> = (0..2)
            .map(|index| {
                let (plan, body) = (plan.clone(), body.clone());
                LocalExecutorBuilder::new(Placement::Unbound)
                    .spawn(move || async move {
                        let (mesh, receivers) = Mesh::join(plan, ShardId(index)).await.unwrap();
                        body(index, mesh, receivers).await;
                    })
                    .unwrap()
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
    }

    /// A test message weighs its value in bytes.
    impl mesh::Weighed for u64 {
        fn weight(&self) -> usize {
            *self as usize
        }
    }

    /// Past the byte bound sends are refused, however few batches are in flight, until the
    /// receiver has handled what it was sent.
    #[test]
    fn bytes_in_flight_past_the_bound_report_congestion_until_handled() {
        static HANDLED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        on_two_shards(
            MeshPlan::new(2, 64, 100),
            |index, mesh, receivers| async move {
                if index == 1 {
                    // Take nothing in for a while, then handle everything.
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                    mesh.serve(
                        receivers,
                        Rc::new(|_, weight| {
                            HANDLED.fetch_add(weight, std::sync::atomic::Ordering::SeqCst);
                        }),
                    );
                    glommio::timer::sleep(Duration::from_millis(500)).await;
                    return;
                }
                let to = ShardId(1);
                mesh.send(to, 60).unwrap();
                mesh.send(to, 60).unwrap();
                assert!(mesh.is_congested(to));
                assert!(matches!(
                    mesh.send(to, 60),
                    Err(mesh::SendError::Congested(_))
                ));
                // Weightless messages (replies, settlements) still pass.
                mesh.send(to, 0).unwrap();
                let started = std::time::Instant::now();
                while mesh.is_congested(to) {
                    assert!(started.elapsed() < Duration::from_secs(5));
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                }
                assert_eq!(HANDLED.load(std::sync::atomic::Ordering::SeqCst), 120);
                mesh.send(to, 60).unwrap();
                drop(receivers);
            },
        );
    }

    /// Two shards on two executors send each other messages through the mesh.
    #[test]
    fn mesh_carries_messages_between_two_shards() {
        on_two_shards(
            MeshPlan::new(2, 16, usize::MAX),
            |index, mesh, receivers| async move {
                mesh.serve(receivers, Rc::new(|_, _| {}));
                // Twice: the second round reuses the channels after the first drained.
                for round in 1..=2u64 {
                    mesh.ping_all(round * 10 + index as u64).await.unwrap();
                }
                assert!(matches!(
                    mesh.send(ShardId(index), 1),
                    Err(mesh::SendError::ToSelf(_))
                ));
                // Keep serving until the peer finished its pings too.
                glommio::timer::sleep(Duration::from_millis(100)).await;
            },
        );
    }

    /// More messages than the channel holds are kept in order and all arrive.
    #[test]
    fn a_full_channel_overflows_in_order_then_reports_congestion() {
        static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        on_two_shards(
            MeshPlan::new(2, 3, usize::MAX),
            |index, mesh, mut receivers| async move {
                if index == 0 {
                    // Shard 1 does not read yet: the channel (3) fills, then the
                    // overflow queue (3), then sends are refused.
                    let mut sent = 0u64;
                    while sent < 1000 {
                        match mesh.send(ShardId(1), sent) {
                            Ok(()) => sent += 1,
                            Err(mesh::SendError::Congested(_)) => break,
                            Err(other) => panic!("{other}"),
                        }
                    }
                    assert!(sent < 1000, "the mesh never reported congestion");
                    assert!(mesh.is_congested(ShardId(1)));
                    SENT.store(sent, std::sync::atomic::Ordering::SeqCst);
                    drop(receivers);
                    // Stay alive while the flusher drains the overflow.
                    while mesh.is_congested(ShardId(1)) {
                        glommio::timer::sleep(Duration::from_millis(5)).await;
                    }
                    glommio::timer::sleep(Duration::from_millis(200)).await;
                } else {
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                    let sent = SENT.load(std::sync::atomic::Ordering::SeqCst);
                    let mut nonces = Vec::new();
                    for (_, receiver) in receivers.streams() {
                        while (nonces.len() as u64) < sent {
                            match receiver.recv().await {
                                Some(mesh::Envelope::Message(nonce)) => nonces.push(nonce),
                                other => panic!("unexpected {other:?}"),
                            }
                        }
                    }
                    assert_eq!(nonces, (0..sent).collect::<Vec<_>>());
                }
            },
        );
    }
}
