//! The mesh: a bounded single-producer single-consumer channel from every shard to every other
//! (glommio's channel mesh), with a send that never blocks the caller.
//!
//! Deadlock avoidance: a shard never awaits room in a peer's channel on its message path. `send`
//! tries the channel; when it is full the message waits in a small per-destination overflow queue
//! that a background task drains in order, and `send` reports congestion once that queue is full
//! so the caller can push back on its own input (stop reading a socket) instead of buffering
//! without bound. Each shard drains its receiving channels in dedicated tasks, so a full channel
//! always empties.
//!
//! Counting batches bounds nothing when a batch holds a megabyte of messages, so the mesh also
//! counts the bytes (as [`Weighed`] tells them) sent to each destination and not yet handled
//! there, in counters all shards share; past `bytes_max` a send reports congestion too. A
//! shard's receiver handles a message before it takes the next, so the count always falls.
//!
//! Invariant: the mesh peer id of a shard equals its shard index (shards join in index order and
//! start-up checks it), so a `ShardId` addresses the mesh directly.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use glommio::{GlommioError, ResourceType};
use log::{debug, warn};
use shards::ShardId;

use super::sync::Notify;

/// What travels on the mesh: the mesh's own liveness probes, or a message of the layer above.
#[derive(Debug)]
pub enum Envelope<M> {
    /// Asks the receiver to answer `Pong` with the same nonce.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Message(M),
}

pub type MeshBuilderFull<M> = MeshBuilder<Envelope<M>, Full>;

/// The bytes of memory a message holds, which the mesh bounds in flight.
pub trait Weighed {
    fn weight(&self) -> usize;
}

/// Everything every shard needs to join one mesh; cloned to each shard's thread.
pub struct MeshPlan<M: Send + 'static> {
    builder: MeshBuilderFull<M>,
    /// Bytes sent and not yet handled, one counter per (sender, receiver) pair.
    in_flight: Arc<[AtomicUsize]>,
    /// Per destination: messages kept back while its channel is full.
    overflow_max: usize,
    /// Per destination: bytes in flight past which sends report congestion.
    bytes_max: usize,
}

impl<M: Send + 'static> Clone for MeshPlan<M> {
    fn clone(&self) -> Self {
        MeshPlan {
            builder: self.builder.clone(),
            in_flight: self.in_flight.clone(),
            overflow_max: self.overflow_max,
            bytes_max: self.bytes_max,
        }
    }
}

impl<M: Send + 'static> MeshPlan<M> {
    /// A mesh of `shards` with channels of `capacity` messages (and as many in overflow), and at
    /// most about `bytes_max` bytes in flight from one shard to another.
    pub fn new(shards: usize, capacity: usize, bytes_max: usize) -> Self {
        MeshPlan {
            builder: MeshBuilder::full(shards, capacity),
            in_flight: (0..shards * shards).map(|_| AtomicUsize::new(0)).collect(),
            overflow_max: capacity,
            bytes_max,
        }
    }
}

/// Why a message was not accepted; the message comes back.
#[derive(Debug)]
pub enum SendError<M> {
    /// The destination's channel and overflow queue are both full: push back on input.
    Congested(Envelope<M>),
    /// The destination shard has stopped.
    Closed(Envelope<M>),
    /// A shard sends to itself with a local call, never over the mesh.
    ToSelf(Envelope<M>),
    /// The channel refused the message for another reason (it is gone with the error).
    Refused(String),
}

impl<M> fmt::Display for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Congested(_) => write!(f, "mesh channel congested"),
            SendError::Closed(_) => write!(f, "destination shard stopped"),
            SendError::ToSelf(_) => write!(f, "mesh send to self"),
            SendError::Refused(reason) => write!(f, "mesh send refused: {reason}"),
        }
    }
}

pub struct Mesh<M: Send + 'static> {
    shard: ShardId,
    senders: Senders<Envelope<M>>,
    /// Messages that found their channel full, per destination, in send order.
    overflow: RefCell<Vec<VecDeque<Envelope<M>>>>,
    overflow_max: usize,
    in_flight: Arc<[AtomicUsize]>,
    bytes_max: usize,
    flushing: Vec<Cell<bool>>,
    /// Pongs received for the nonce of the last `ping_all`.
    pongs: Cell<usize>,
    ping_nonce: Cell<u64>,
    pong_arrived: Notify,
}

impl<M: Weighed + Send + 'static> Mesh<M> {
    /// Joins the mesh as shard `shard`; resolves once every shard has joined.
    pub async fn join(
        plan: MeshPlan<M>,
        shard: ShardId,
    ) -> Result<(Rc<Mesh<M>>, Receivers<Envelope<M>>), String> {
        let MeshPlan {
            builder,
            in_flight,
            overflow_max,
            bytes_max,
        } = plan;
        let shard_count = builder.nr_peers();
        let (senders, receivers) = builder
            .join()
            .await
            .map_err(|e| format!("{shard} could not join the mesh: {e}"))?;
        if senders.peer_id() != shard.index() {
            return Err(format!(
                "{shard} joined the mesh as peer {}; shards must start in index order",
                senders.peer_id()
            ));
        }
        let mesh = Rc::new(Mesh {
            shard,
            senders,
            overflow: RefCell::new((0..shard_count).map(|_| VecDeque::new()).collect()),
            overflow_max,
            in_flight,
            bytes_max,
            flushing: (0..shard_count).map(|_| Cell::new(false)).collect(),
            pongs: Cell::new(0),
            ping_nonce: Cell::new(0),
            pong_arrived: Notify::default(),
        });
        Ok((mesh, receivers))
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn shard_count(&self) -> usize {
        self.senders.nr_consumers()
    }

    /// Whether `send` to `to` would report congestion.
    pub fn is_congested(&self, to: ShardId) -> bool {
        self.bytes_in_flight(self.shard, to) >= self.bytes_max
            || self
                .overflow
                .borrow()
                .get(to.index())
                .is_some_and(|queue| queue.len() >= self.overflow_max)
    }

    fn counter(&self, from: ShardId, to: ShardId) -> Option<&AtomicUsize> {
        self.in_flight
            .get(from.index() * self.shard_count() + to.index())
    }

    fn bytes_in_flight(&self, from: ShardId, to: ShardId) -> usize {
        self.counter(from, to)
            .map_or(0, |counter| counter.load(Ordering::Relaxed))
    }

    /// Sends without waiting. Order between two shards is kept.
    pub fn send(self: &Rc<Self>, to: ShardId, message: M) -> Result<(), SendError<M>> {
        let weight = message.weight();
        if weight > 0 && self.bytes_in_flight(self.shard, to) >= self.bytes_max {
            return Err(SendError::Congested(Envelope::Message(message)));
        }
        // Counted before the send, so that the receiver never takes off what is not added yet.
        let counter = self.counter(self.shard, to);
        if let Some(counter) = counter {
            counter.fetch_add(weight, Ordering::Relaxed);
        }
        let sent = self.send_envelope(to, Envelope::Message(message));
        if let (Err(_), Some(counter)) = (&sent, counter) {
            counter.fetch_sub(weight, Ordering::Relaxed);
        }
        sent
    }

    fn send_envelope(
        self: &Rc<Self>,
        to: ShardId,
        message: Envelope<M>,
    ) -> Result<(), SendError<M>> {
        if to == self.shard {
            return Err(SendError::ToSelf(message));
        }
        let mut overflow = self.overflow.borrow_mut();
        let Some(queue) = overflow.get_mut(to.index()) else {
            return Err(SendError::Closed(message));
        };
        if !queue.is_empty() {
            if queue.len() >= self.overflow_max {
                return Err(SendError::Congested(message));
            }
            queue.push_back(message);
            return Ok(());
        }
        match self.senders.try_send_to(to.index(), message) {
            Ok(()) => Ok(()),
            Err(GlommioError::WouldBlock(ResourceType::Channel(message))) => {
                queue.push_back(message);
                drop(overflow);
                self.start_flusher(to);
                Ok(())
            }
            Err(GlommioError::Closed(ResourceType::Channel(message))) => {
                Err(SendError::Closed(message))
            }
            Err(other) => Err(SendError::Refused(other.to_string())),
        }
    }

    fn start_flusher(self: &Rc<Self>, to: ShardId) {
        let flag = &self.flushing[to.index()];
        if flag.replace(true) {
            return;
        }
        let mesh = self.clone();
        glommio::spawn_local(async move {
            loop {
                let next = mesh.overflow.borrow_mut()[to.index()].pop_front();
                let Some(message) = next else { break };
                if mesh.senders.send_to(to.index(), message).await.is_err() {
                    debug!("{}: {to} stopped; dropping its overflow", mesh.shard);
                    mesh.overflow.borrow_mut()[to.index()].clear();
                    break;
                }
            }
            mesh.flushing[to.index()].set(false);
        })
        .detach();
    }

    /// Spawns one task per peer that drains its channel into `handler` (this shard's mailbox).
    pub fn serve(
        self: &Rc<Self>,
        mut receivers: Receivers<Envelope<M>>,
        handler: Rc<dyn Fn(ShardId, M)>,
    ) {
        for (peer, receiver) in receivers.streams() {
            let mesh = self.clone();
            let handler = handler.clone();
            glommio::spawn_local(async move {
                let from = ShardId(peer);
                while let Some(message) = receiver.recv().await {
                    match message {
                        Envelope::Ping { nonce } => {
                            if let Err(error) = mesh.send_envelope(from, Envelope::Pong { nonce }) {
                                warn!("{}: cannot answer a ping from {from}: {error}", mesh.shard);
                            }
                        }
                        Envelope::Pong { nonce } => {
                            if nonce == mesh.ping_nonce.get() {
                                mesh.pongs.set(mesh.pongs.get() + 1);
                                mesh.pong_arrived.notify();
                            }
                        }
                        Envelope::Message(message) => {
                            let weight = message.weight();
                            handler(from, message);
                            if let Some(counter) = mesh.counter(from, mesh.shard) {
                                counter.fetch_sub(weight, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
            .detach();
        }
    }

    /// Pings every other shard and waits for all of them to answer: proof that every channel
    /// from and to this shard works. Call after [`Mesh::serve`].
    pub async fn ping_all(self: &Rc<Self>, nonce: u64) -> Result<(), String> {
        self.ping_nonce.set(nonce);
        self.pongs.set(0);
        let peers: Vec<ShardId> = (0..self.shard_count())
            .map(ShardId)
            .filter(|peer| *peer != self.shard)
            .collect();
        for peer in &peers {
            self.send_envelope(*peer, Envelope::Ping { nonce })
                .map_err(|e| format!("{}: ping to {peer} failed: {e}", self.shard))?;
        }
        while self.pongs.get() < peers.len() {
            self.pong_arrived.wait().await;
        }
        Ok(())
    }
}
