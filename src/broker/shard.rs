//! One shard's broker state: its copy of every vhost's routing table, the queues it owns, the
//! connections it serves, and its mailbox.
//!
//! Everything a shard sends — to another shard or to itself — goes through [`ShardBroker::post`]
//! into a per-destination outbox, flushed by a task that runs once the current task yields. So:
//! - messages to one destination keep their order (one outbox, one FIFO mesh channel);
//! - everything produced while handling one read or one incoming batch leaves as one mesh send;
//! - a message to this same shard is handled by the flush task, never re-entrantly inside the
//!   code that posted it (a connection may be mid-borrow when it publishes to its own queue).
//!
//! Invariant: a queue in `queues` is owned by this shard in every routing table copy.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use ahash::{HashMap, HashMapExt};
use log::{debug, warn};
use shards::queue::{ChannelKey, ConsumeRefusal, ConsumerKey, Delivery};
use shards::{Message, MessageId, Queue, ShardId};

use std::path::Path;

use bytes::BytesMut;
use log::info;
use shards::record;
use shards::wal::{self, LoggedQueue, WalEntry};

use super::coordinator::Coordinator;
use super::messages::{MetaRequest, QueueKey, Reply, ShardMessage};
use super::meta_log::{self, DurableMetadata};
use super::oneshot;
use super::routing::{ConnectionRef, MetaOp, QueueDef, VhostRouting};
use super::storage::{after_synced, SegmentedWal};
use crate::codec::{ReplyCode, ShortStr};
use crate::config::{Config, QueuePlacement};
use crate::connection::error::AmqpError;
use crate::runtime::log_file::{sync_directory, LogWriter};
use crate::runtime::mesh::{Mesh, SendError};
use crate::runtime::sync::Signal;

/// The coordinator of metadata changes lives on this shard.
pub const COORDINATOR: ShardId = ShardId(0);

/// What the broker needs from a local connection to hand it deliveries and confirms.
pub trait ConnectionPort {
    /// A message for one of the connection's consumers. Returns false if the consumer is gone
    /// (the caller then requeues the message).
    fn deliver(&self, delivery: IncomingDelivery) -> bool;
    /// The queue behind a consumer was deleted.
    fn consumer_cancelled(&self, consumer: u64);
    /// The owner of a published message has it (`ok`), or failed to store it.
    fn confirmed(&self, channel: u16, seq: u64, ok: bool);
    /// An on-demand consumer has run out of credit while `ready` messages wait.
    fn credit_wanted(&self, consumer: u64, ready: u32);
}

/// A delivery as it reaches the consumer's connection.
#[derive(Debug, Clone)]
pub struct IncomingDelivery {
    pub consumer: u64,
    pub queue: QueueKey,
    pub owner: ShardId,
    pub id: shards::MessageId,
    pub message: shards::Message,
    pub redelivered: bool,
}

struct OwnedQueue {
    queue: Queue,
    /// Persistent messages on a durable queue are logged.
    durable: bool,
    auto_delete: bool,
    /// Auto-delete applies once a queue has had a consumer.
    had_consumer: bool,
}

/// Counters of what crossed the mesh, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct MeshCounters {
    pub batches_sent: u64,
    pub messages_sent: u64,
    pub deliveries_received: u64,
    pub publishes_received: u64,
}

pub struct ShardBroker {
    pub id: ShardId,
    shard_count: usize,
    mesh: Rc<Mesh<Vec<ShardMessage>>>,
    routing: RefCell<HashMap<ShortStr, VhostRouting>>,
    queues: RefCell<HashMap<QueueKey, OwnedQueue>>,
    connections: RefCell<HashMap<u64, Rc<dyn ConnectionPort>>>,
    pending: RefCell<HashMap<u64, oneshot::Sender<Reply>>>,
    next_token: Cell<u64>,
    outbox: RefCell<Vec<Vec<ShardMessage>>>,
    flush_scheduled: Cell<bool>,
    /// Raised when a congested outbox drained (readers waiting on back-pressure resume).
    pub outbox_drained: Signal,
    outbox_messages_max: usize,
    coordinator: Option<Rc<Coordinator>>,
    placement: QueuePlacement,
    next_placement: Cell<usize>,
    counters: Cell<MeshCounters>,
    /// This shard's write-ahead log (persistent messages on durable queues).
    wal: RefCell<Option<Rc<SegmentedWal>>>,
    reclaiming: Cell<bool>,
    segment_bytes_max: u64,
    compact_live_fraction: f64,
    /// The metadata log (the coordinator's shard only).
    meta_log: RefCell<Option<Rc<LogWriter>>>,
}

impl ShardBroker {
    pub fn new(
        id: ShardId,
        shard_count: usize,
        mesh: Rc<Mesh<Vec<ShardMessage>>>,
        config: &Config,
    ) -> Rc<ShardBroker> {
        let routing = config
            .vhosts
            .iter()
            .map(|vhost| {
                (
                    ShortStr::try_from(vhost.as_str()).unwrap_or_default(),
                    VhostRouting::new(),
                )
            })
            .collect();
        let broker = Rc::new(ShardBroker {
            id,
            shard_count,
            mesh,
            routing: RefCell::new(routing),
            queues: RefCell::new(HashMap::new()),
            connections: RefCell::new(HashMap::new()),
            pending: RefCell::new(HashMap::new()),
            next_token: Cell::new(1),
            outbox: RefCell::new((0..shard_count).map(|_| Vec::new()).collect()),
            flush_scheduled: Cell::new(false),
            outbox_drained: Signal::default(),
            outbox_messages_max: config.runtime.mesh_channel_capacity * 64,
            coordinator: (id == COORDINATOR).then(Coordinator::new),
            placement: config.queues.placement,
            next_placement: Cell::new(0),
            counters: Cell::new(MeshCounters::default()),
            wal: RefCell::new(None),
            reclaiming: Cell::new(false),
            segment_bytes_max: config.storage.segment_bytes_max,
            compact_live_fraction: config.storage.compact_live_fraction,
            meta_log: RefCell::new(None),
        });
        if let Some(coordinator) = &broker.coordinator {
            coordinator.start(broker.clone());
        }
        broker
    }

    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    pub fn counters(&self) -> MeshCounters {
        self.counters.get()
    }

    fn count(&self, update: impl FnOnce(&mut MeshCounters)) {
        let mut counters = self.counters.get();
        update(&mut counters);
        self.counters.set(counters);
    }

    /// Runs `read` against the routing table of `vhost` (None if the vhost does not exist).
    pub fn with_routing<T>(
        &self,
        vhost: &ShortStr,
        read: impl FnOnce(&VhostRouting) -> T,
    ) -> Option<T> {
        self.routing.borrow().get(vhost).map(read)
    }

    pub fn register_connection(&self, id: u64, port: Rc<dyn ConnectionPort>) {
        self.connections.borrow_mut().insert(id, port);
    }

    pub fn unregister_connection(&self, id: u64) {
        self.connections.borrow_mut().remove(&id);
    }

    /// Whether outgoing traffic is piling up faster than the mesh takes it: readers should pause.
    pub fn is_backlogged(&self) -> bool {
        let total: usize = self.outbox.borrow().iter().map(Vec::len).sum();
        total > self.outbox_messages_max
    }

    /// Queues `message` for `to` (possibly this shard); it leaves when the current task yields.
    pub fn post(self: &Rc<Self>, to: ShardId, message: ShardMessage) {
        if let Some(outbox) = self.outbox.borrow_mut().get_mut(to.index()) {
            outbox.push(message);
        } else {
            warn!("{}: message for unknown {to} dropped", self.id);
            return;
        }
        if !self.flush_scheduled.replace(true) {
            let shard = self.clone();
            glommio::spawn_local(async move { shard.flush().await }).detach();
        }
    }

    /// Sends a request and returns the future of its reply.
    pub fn request(
        self: &Rc<Self>,
        to: ShardId,
        make: impl FnOnce(u64) -> ShardMessage,
    ) -> oneshot::Receiver<Reply> {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        let (sender, receiver) = oneshot::channel();
        self.pending.borrow_mut().insert(token, sender);
        self.post(to, make(token));
        receiver
    }

    /// Asks the coordinator for a metadata change and waits for its answer.
    pub async fn meta(
        self: &Rc<Self>,
        vhost: &ShortStr,
        requester: ConnectionRef,
        request: MetaRequest,
    ) -> Result<super::messages::MetaOutcome, AmqpError> {
        let vhost = vhost.clone();
        let reply = self
            .request(COORDINATOR, |token| ShardMessage::Meta {
                token,
                vhost,
                requester,
                request,
            })
            .await;
        match reply {
            Some(Reply::Meta(result)) => result,
            other => Err(internal_error("metadata request", &other)),
        }
    }

    async fn flush(self: Rc<Self>) {
        // glommio polls a new task at once; yield so that the task that posted finishes first
        // (and everything it posts joins this batch).
        futures_lite::future::yield_now().await;
        loop {
            // Take everything queued so far; handling local messages may queue more.
            let batches: Vec<(usize, Vec<ShardMessage>)> = {
                let mut outbox = self.outbox.borrow_mut();
                outbox
                    .iter_mut()
                    .enumerate()
                    .filter(|(_, batch)| !batch.is_empty())
                    .map(|(index, batch)| (index, std::mem::take(batch)))
                    .collect()
            };
            if batches.is_empty() {
                break;
            }
            let mut congested = false;
            for (index, batch) in batches {
                let to = ShardId(index);
                if to == self.id {
                    for message in batch {
                        self.handle(self.id, message);
                    }
                    continue;
                }
                let count = batch.len() as u64;
                match self.mesh.send(to, batch) {
                    Ok(()) => self.count(|c| {
                        c.batches_sent += 1;
                        c.messages_sent += count;
                    }),
                    Err(SendError::Congested(crate::runtime::mesh::Envelope::Message(batch))) => {
                        // Put it back in front of anything queued since, and retry shortly.
                        let mut outbox = self.outbox.borrow_mut();
                        let newer = std::mem::replace(&mut outbox[index], batch);
                        outbox[index].extend(newer);
                        congested = true;
                    }
                    Err(error) => warn!("{}: dropped a batch for {to}: {error}", self.id),
                }
            }
            if congested {
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        }
        self.flush_scheduled.set(false);
        self.outbox_drained.notify_all();
    }

    /// The mailbox: handles one message from `from` (another shard, or this one).
    pub fn handle(self: &Rc<Self>, from: ShardId, message: ShardMessage) {
        match message {
            ShardMessage::Meta {
                token,
                vhost,
                requester,
                request,
            } => match &self.coordinator {
                Some(coordinator) => coordinator.submit(from, token, vhost, requester, request),
                None => warn!("{}: metadata request sent to a non-coordinator", self.id),
            },
            ShardMessage::Apply { token, vhost, op } => {
                self.apply_meta(&vhost, &op);
                self.post(
                    from,
                    ShardMessage::Reply {
                        token,
                        reply: Reply::Applied,
                    },
                );
            }
            ShardMessage::Publish {
                vhost,
                queues,
                message,
                confirm,
            } => {
                self.count(|c| c.publishes_received += u64::from(from != self.id));
                let mut logged: Vec<Rc<LogWriter>> = Vec::new();
                for name in queues {
                    let key = QueueKey {
                        vhost: vhost.clone(),
                        name,
                    };
                    let stored = match self.queues.borrow_mut().get_mut(&key) {
                        Some(owned) => {
                            let id = owned.queue.publish(message.clone());
                            Some((id, owned.durable && message.is_persistent()))
                        }
                        None => None,
                    };
                    let Some((id, durable)) = stored else {
                        continue;
                    };
                    if durable {
                        let writer = self.log(WalEntry::Enqueue {
                            queue: logged_queue(&key),
                            id,
                            message: message.clone(),
                        });
                        if let Some(writer) = writer {
                            if !logged.iter().any(|w| Rc::ptr_eq(w, &writer)) {
                                logged.push(writer);
                            }
                        }
                    }
                    self.dispatch(&key);
                }
                if let Some(confirm) = confirm {
                    self.after_logged(logged, move |shard, ok| {
                        shard.post(from, ShardMessage::Confirmed { to: confirm, ok })
                    });
                }
            }
            ShardMessage::Confirmed { to, ok } => {
                let port = self.connections.borrow().get(&to.connection).cloned();
                if let Some(port) = port {
                    port.confirmed(to.channel, to.seq, ok);
                }
            }
            ShardMessage::SyncBarrier { token } => {
                let reply = move |shard: &Rc<Self>| {
                    shard.post(
                        from,
                        ShardMessage::Reply {
                            token,
                            reply: Reply::Applied,
                        },
                    )
                };
                let wal = self.wal.borrow().clone();
                match wal {
                    Some(wal) => {
                        let shard = self.clone();
                        wal.after_all_synced(move |_| reply(&shard));
                    }
                    None => reply(self),
                }
            }
            ShardMessage::Consume {
                token,
                queue,
                consumer,
            } => {
                let result = match self.queues.borrow_mut().get_mut(&queue) {
                    None => Err(no_queue(&queue)),
                    Some(owned) => match owned.queue.add_consumer(consumer) {
                        Ok(()) => {
                            owned.had_consumer = true;
                            Ok(())
                        }
                        Err(ConsumeRefusal::ExclusiveConsumerPresent) => Err(AmqpError::channel(
                            ReplyCode::AccessRefused,
                            format_args!(
                                "queue '{}' in vhost '{}' in exclusive use",
                                queue.name, queue.vhost
                            ),
                        )),
                        Err(ConsumeRefusal::ConsumersPresent) => Err(AmqpError::channel(
                            ReplyCode::AccessRefused,
                            format_args!(
                                "cannot obtain exclusive access to queue '{}' in vhost '{}': \
                                 it has consumers",
                                queue.name, queue.vhost
                            ),
                        )),
                    },
                };
                let registered = result.is_ok();
                self.post(
                    from,
                    ShardMessage::Reply {
                        token,
                        reply: Reply::Consume(result),
                    },
                );
                // After the reply, on the same ordered path: the consumer side holds any
                // delivery that arrives before it has written consume-ok.
                if registered {
                    self.dispatch(&queue);
                }
            }
            ShardMessage::Cancel { queue, consumer } => {
                let removed = self
                    .queues
                    .borrow_mut()
                    .get_mut(&queue)
                    .is_some_and(|owned| owned.queue.remove_consumer(consumer));
                if removed {
                    self.after_consumer_removed(&queue);
                }
            }
            ShardMessage::Credit {
                queue,
                consumer,
                amount,
            } => {
                if let Some(owned) = self.queues.borrow_mut().get_mut(&queue) {
                    owned.queue.grant_credit(consumer, amount);
                }
                self.dispatch(&queue);
            }
            ShardMessage::Settle {
                queue,
                ids,
                requeue,
            } => {
                let mut persistent = Vec::new();
                let durable = match self.queues.borrow_mut().get_mut(&queue) {
                    Some(owned) => {
                        if requeue {
                            owned.queue.requeue(&ids);
                        } else {
                            owned.queue.ack(&ids, &mut persistent);
                        }
                        owned.durable
                    }
                    None => false,
                };
                if durable && !persistent.is_empty() {
                    self.log(WalEntry::Settle {
                        queue: logged_queue(&queue),
                        ids: persistent,
                    });
                }
                if requeue {
                    self.dispatch(&queue);
                }
            }
            ShardMessage::Get {
                token,
                queue,
                channel,
                no_ack,
            } => {
                let result = match self.queues.borrow_mut().get_mut(&queue) {
                    None => Err(no_queue(&queue)),
                    Some(owned) => {
                        let got = owned.queue.get(channel, no_ack);
                        let log = got
                            .as_ref()
                            .filter(|g| owned.durable && g.message.is_persistent());
                        Ok((got.clone(), log.map(|g| g.id)))
                    }
                };
                let result = result.map(|(got, logged_id)| {
                    if let Some(id) = logged_id {
                        let entry = if no_ack {
                            WalEntry::Settle {
                                queue: logged_queue(&queue),
                                ids: vec![id],
                            }
                        } else {
                            WalEntry::Delivered {
                                queue: logged_queue(&queue),
                                ids: vec![id],
                            }
                        };
                        self.log(entry);
                    }
                    got
                });
                self.post(
                    from,
                    ShardMessage::Reply {
                        token,
                        reply: Reply::Get(result),
                    },
                );
            }
            ShardMessage::Purge { token, queue } => {
                let mut persistent = Vec::new();
                let result = match self.queues.borrow_mut().get_mut(&queue) {
                    None => Err(no_queue(&queue)),
                    Some(owned) => {
                        let count = owned.queue.purge(&mut persistent);
                        if !owned.durable {
                            persistent.clear();
                        }
                        Ok(count)
                    }
                };
                if !persistent.is_empty() {
                    self.log(WalEntry::Settle {
                        queue: logged_queue(&queue),
                        ids: persistent,
                    });
                }
                self.post(
                    from,
                    ShardMessage::Reply {
                        token,
                        reply: Reply::Count(result),
                    },
                );
            }
            ShardMessage::Stats { token, queue } => {
                let stats = self
                    .queues
                    .borrow()
                    .get(&queue)
                    .map(|owned| (owned.queue.message_count(), owned.queue.consumer_count()));
                self.post(
                    from,
                    ShardMessage::Reply {
                        token,
                        reply: Reply::Stats(stats),
                    },
                );
            }
            ShardMessage::ChannelClosed { channel, queues } => {
                for queue in queues {
                    let removed = match self.queues.borrow_mut().get_mut(&queue) {
                        Some(owned) => {
                            let removed = owned.queue.remove_consumers_of(channel);
                            owned.queue.requeue_all_of(channel);
                            !removed.is_empty()
                        }
                        None => false,
                    };
                    if removed {
                        self.after_consumer_removed(&queue);
                    }
                    self.dispatch(&queue);
                }
            }
            ShardMessage::DeleteQueueData {
                token,
                queue,
                if_unused,
                if_empty,
            } => {
                let result = self.delete_queue_data(&queue, if_unused, if_empty);
                self.post(
                    from,
                    ShardMessage::Reply {
                        token,
                        reply: Reply::Count(result),
                    },
                );
            }
            ShardMessage::Deliver {
                consumer,
                queue,
                owner,
                id,
                message,
                redelivered,
            } => {
                self.count(|c| c.deliveries_received += u64::from(from != self.id));
                let port = self.connections.borrow().get(&consumer.connection).cloned();
                let delivered = port.is_some_and(|port| {
                    port.deliver(IncomingDelivery {
                        consumer: consumer.consumer,
                        queue: queue.clone(),
                        owner,
                        id,
                        message,
                        redelivered,
                    })
                });
                if !delivered {
                    // The consumer went away while the message travelled: give it back.
                    self.post(
                        owner,
                        ShardMessage::Settle {
                            queue,
                            ids: vec![id],
                            requeue: true,
                        },
                    );
                }
            }
            ShardMessage::CreditWanted { consumer, ready } => {
                let port = self.connections.borrow().get(&consumer.connection).cloned();
                if let Some(port) = port {
                    port.credit_wanted(consumer.consumer, ready);
                }
            }
            ShardMessage::ConsumerCancelled { consumer } => {
                let port = self.connections.borrow().get(&consumer.connection).cloned();
                if let Some(port) = port {
                    port.consumer_cancelled(consumer.consumer);
                }
            }
            ShardMessage::Reply { token, reply } => {
                let sender = self.pending.borrow_mut().remove(&token);
                if let Some(sender) = sender {
                    sender.send(reply);
                }
            }
        }
    }

    /// Delivers what the queue's consumers have credit for.
    fn dispatch(self: &Rc<Self>, key: &QueueKey) {
        let mut deliveries: Vec<Delivery> = Vec::new();
        let mut wants = Vec::new();
        if let Some(owned) = self.queues.borrow_mut().get_mut(key) {
            owned.queue.dispatch(&mut deliveries);
            owned.queue.credit_wanted(&mut wants);
        }
        for (consumer, ready) in wants {
            self.post(
                consumer.shard,
                ShardMessage::CreditWanted { consumer, ready },
            );
        }
        for delivery in deliveries {
            self.post(
                delivery.consumer.shard,
                ShardMessage::Deliver {
                    consumer: delivery.consumer,
                    queue: key.clone(),
                    owner: self.id,
                    id: delivery.id,
                    message: delivery.message,
                    redelivered: delivery.redelivered,
                },
            );
        }
    }

    fn after_consumer_removed(self: &Rc<Self>, key: &QueueKey) {
        let unused_auto_delete = self.queues.borrow().get(key).is_some_and(|owned| {
            owned.auto_delete && owned.had_consumer && owned.queue.consumer_count() == 0
        });
        if unused_auto_delete {
            debug!(
                "{}: auto-delete queue '{}' lost its last consumer",
                self.id, key.name
            );
            self.post(
                COORDINATOR,
                ShardMessage::Meta {
                    token: 0,
                    vhost: key.vhost.clone(),
                    requester: ConnectionRef {
                        shard: self.id,
                        connection: u64::MAX,
                    },
                    request: MetaRequest::AutoDeleteQueue {
                        name: key.name.clone(),
                    },
                },
            );
        }
    }

    fn delete_queue_data(
        self: &Rc<Self>,
        key: &QueueKey,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, AmqpError> {
        let mut queues = self.queues.borrow_mut();
        let Some(owned) = queues.get(key) else {
            return Ok(0);
        };
        if if_unused && owned.queue.consumer_count() > 0 {
            return Err(AmqpError::channel(
                ReplyCode::PreconditionFailed,
                format_args!("queue '{}' in vhost '{}' in use", key.name, key.vhost),
            ));
        }
        if if_empty && owned.queue.message_count() > 0 {
            return Err(AmqpError::channel(
                ReplyCode::PreconditionFailed,
                format_args!("queue '{}' in vhost '{}' not empty", key.name, key.vhost),
            ));
        }
        let Some(owned) = queues.remove(key) else {
            return Ok(0);
        };
        drop(queues);
        if owned.durable {
            self.log(WalEntry::DeleteQueue {
                queue: logged_queue(key),
            });
        }
        for consumer in owned.queue.consumers() {
            self.post(
                consumer.key.shard,
                ShardMessage::ConsumerCancelled {
                    consumer: consumer.key,
                },
            );
        }
        Ok(owned.queue.message_count())
    }

    /// Applies a validated metadata change to this shard's copy; creates or drops the queue
    /// if this shard owns it.
    pub fn apply_meta(self: &Rc<Self>, vhost: &ShortStr, op: &MetaOp) {
        if let Some(routing) = self.routing.borrow_mut().get_mut(vhost) {
            routing.apply(op);
        }
        match op {
            MetaOp::DeclareQueue(def) if def.owner == self.id => {
                let key = QueueKey {
                    vhost: vhost.clone(),
                    name: def.name.clone(),
                };
                self.queues
                    .borrow_mut()
                    .entry(key)
                    .or_insert_with(|| OwnedQueue {
                        queue: Queue::new(),
                        durable: def.durable,
                        auto_delete: def.auto_delete,
                        had_consumer: false,
                    });
            }
            MetaOp::DeleteQueue { name } => {
                let key = QueueKey {
                    vhost: vhost.clone(),
                    name: name.clone(),
                };
                // Normally gone already (DeleteQueueData); an exclusive queue's owner may learn
                // of the delete only here.
                if self.queues.borrow().contains_key(&key) {
                    let _ = self.delete_queue_data(&key, false, false);
                }
            }
            _ => {}
        }
    }

    /// Appends to this shard's log, if it has one; returns the segment log that holds it.
    fn log(self: &Rc<Self>, entry: WalEntry) -> Option<Rc<LogWriter>> {
        let reclaimable = matches!(
            entry,
            WalEntry::Settle { .. } | WalEntry::DeleteQueue { .. }
        );
        let wal = self.wal.borrow().clone()?;
        let writer = wal.append(&entry);
        if reclaimable {
            self.schedule_reclaim();
        }
        Some(writer)
    }

    /// Runs `then` once the records in `logged` are durable (at once if there are none).
    fn after_logged(
        self: &Rc<Self>,
        logged: Vec<Rc<LogWriter>>,
        then: impl FnOnce(&Rc<Self>, bool) + 'static,
    ) {
        let shard = self.clone();
        after_synced(logged, move |ok| then(&shard, ok));
    }

    /// Frees log segments whose messages are all settled, in a background task.
    fn schedule_reclaim(self: &Rc<Self>) {
        if self.reclaiming.replace(true) {
            return;
        }
        let shard = self.clone();
        glommio::spawn_local(async move {
            // Let the current batch of settlements land first.
            futures_lite::future::yield_now().await;
            let wal = shard.wal.borrow().clone();
            if let Some(wal) = wal {
                let lookup = shard.clone();
                wal.reclaim(move |queue, id| lookup.find_message(queue, id))
                    .await;
            }
            shard.reclaiming.set(false);
        })
        .detach();
    }

    fn find_message(&self, queue: &LoggedQueue, id: MessageId) -> Option<(Message, bool)> {
        let key = QueueKey {
            vhost: ShortStr::from_bytes(queue.vhost.clone()).ok()?,
            name: ShortStr::from_bytes(queue.name.clone()).ok()?,
        };
        let queues = self.queues.borrow();
        let (message, delivered) = queues.get(&key)?.queue.find(id)?;
        Some((message.clone(), delivered))
    }

    /// Appends a metadata change to the metadata log (coordinator only) and waits until it is
    /// durable. Returns false if the log failed.
    pub async fn log_meta(&self, vhost: &ShortStr, op: &MetaOp) -> bool {
        let log = self.meta_log.borrow().clone();
        let Some(log) = log else {
            return true;
        };
        let logged = self
            .with_routing(vhost, |routing| meta_log::is_logged(routing, op))
            .unwrap_or(false);
        if !logged {
            return true;
        }
        let mut payload = BytesMut::new();
        let kind = meta_log::encode(vhost, op, &mut payload);
        log.append(kind, &payload);
        let (sender, receiver) = oneshot::channel();
        log.after_sync(move |ok| sender.send(ok));
        receiver.await.unwrap_or(false)
    }

    /// Start-up, before the shard serves: applies the durable metadata, replays this shard's
    /// write-ahead log into its durable queues, writes the live state as a new log generation,
    /// and removes the old ones. The coordinator's shard does the same for the metadata log.
    pub async fn open_storage(
        self: &Rc<Self>,
        data_dir: &Path,
        metadata: &DurableMetadata,
    ) -> Result<(), String> {
        for (vhost, op) in &metadata.ops {
            self.apply_meta(vhost, op);
        }
        let dir = data_dir.join(format!("shard-{}", self.id.index()));
        let files = meta_log::generations(&dir, "wal")
            .map_err(|e| format!("{}: cannot list {}: {e}", self.id, dir.display()))?;
        let mut entries = Vec::new();
        for (_, path) in &files {
            let image = std::fs::read(path)
                .map_err(|e| format!("{}: cannot read {}: {e}", self.id, path.display()))?;
            let replayed = record::replay(bytes::Bytes::from(image));
            if replayed.dropped_bytes > 0 {
                warn!(
                    "{}: {}: dropped a damaged tail of {} bytes after {} intact bytes ({})",
                    self.id,
                    path.display(),
                    replayed.dropped_bytes,
                    replayed.valid_bytes,
                    replayed.stopped_by.unwrap_or("unknown")
                );
            }
            for record in &replayed.records {
                match WalEntry::decode(record) {
                    Ok(entry) => entries.push(entry),
                    Err(record::Malformed(what)) => {
                        warn!(
                            "{}: {}: malformed record at offset {} ({what}); ignoring the rest",
                            self.id,
                            path.display(),
                            record.offset
                        );
                        break;
                    }
                }
            }
        }
        let mut restored = 0usize;
        let mut orphaned = 0usize;
        for (logged, messages) in wal::fold(entries) {
            let key = QueueKey {
                vhost: ShortStr::from_bytes(logged.vhost).unwrap_or_default(),
                name: ShortStr::from_bytes(logged.name).unwrap_or_default(),
            };
            let mut queues = self.queues.borrow_mut();
            match queues.get_mut(&key).filter(|owned| owned.durable) {
                Some(owned) => {
                    restored += messages.len();
                    for recovered in messages {
                        owned
                            .queue
                            .restore(recovered.id, recovered.message, recovered.redelivered);
                    }
                }
                None => orphaned += messages.len(),
            }
        }
        if !files.is_empty() {
            info!(
                "{}: recovered {restored} persistent messages from {} log files{}",
                self.id,
                files.len(),
                if orphaned > 0 {
                    format!(" ({orphaned} of queues that no longer exist dropped)")
                } else {
                    String::new()
                }
            );
        }
        // The new generation: the live state, then the changes from here on.
        let generation = files.last().map_or(1, |(generation, _)| generation + 1);
        let wal = SegmentedWal::create(
            &dir,
            generation,
            self.segment_bytes_max,
            self.compact_live_fraction,
        )
        .await
        .map_err(|e| format!("{}: cannot create a log in {}: {e}", self.id, dir.display()))?;
        for (key, owned) in self.queues.borrow().iter().filter(|(_, o)| o.durable) {
            let queue = logged_queue(key);
            let mut redelivered = Vec::new();
            for (id, message, was_redelivered) in owned.queue.ready_messages() {
                if !message.is_persistent() {
                    continue;
                }
                wal.append(&WalEntry::Enqueue {
                    queue: queue.clone(),
                    id,
                    message: message.clone(),
                });
                if was_redelivered {
                    redelivered.push(id);
                }
            }
            if !redelivered.is_empty() {
                wal.append(&WalEntry::Delivered {
                    queue,
                    ids: redelivered,
                });
            }
        }
        let (sender, receiver) = oneshot::channel();
        wal.after_all_synced(move |ok| sender.send(ok));
        if receiver.await != Some(true) {
            return Err(format!("{}: the new log could not be written", self.id));
        }
        for (_, old) in &files {
            std::fs::remove_file(old)
                .map_err(|e| format!("{}: cannot remove {}: {e}", self.id, old.display()))?;
        }
        sync_directory(&dir).map_err(|e| format!("{}: {e}", self.id))?;
        *self.wal.borrow_mut() = Some(wal);

        if self.coordinator.is_some() {
            let path = data_dir.join(format!("meta-{:016}.log", metadata.next_generation));
            let log = LogWriter::create(&path)
                .await
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            let mut payload = BytesMut::new();
            let kind = meta_log::encode_header(self.shard_count, &mut payload);
            log.append(kind, &payload);
            for (vhost, op) in &metadata.ops {
                let mut payload = BytesMut::new();
                let kind = meta_log::encode(vhost, op, &mut payload);
                log.append(kind, &payload);
            }
            sync_log(&log).await?;
            for old in &metadata.files {
                std::fs::remove_file(old)
                    .map_err(|e| format!("cannot remove {}: {e}", old.display()))?;
            }
            sync_directory(data_dir).map_err(|e| e.to_string())?;
            *self.meta_log.borrow_mut() = Some(log);
        }
        Ok(())
    }

    /// Graceful shutdown: marks the log as cleanly closed (so the next start trusts its delivery
    /// marks) and waits until everything is on disk.
    pub async fn close_storage(&self) {
        let wal = self.wal.borrow().clone();
        if let Some(wal) = wal {
            wal.append(&WalEntry::CleanShutdown);
            let (sender, receiver) = oneshot::channel();
            wal.after_all_synced(move |ok| sender.send(ok));
            if receiver.await != Some(true) {
                warn!("{}: the log could not be closed cleanly", self.id);
            }
        }
    }

    /// The owner of a queue that is about to be created.
    pub fn place_queue(&self, requester: ConnectionRef) -> ShardId {
        match self.placement {
            QueuePlacement::ClientLocal => requester.shard,
            QueuePlacement::Balanced => {
                let next = self.next_placement.get();
                self.next_placement.set(next + 1);
                ShardId(next % self.shard_count)
            }
        }
    }

    pub fn queue_def(&self, key: &QueueKey) -> Option<QueueDef> {
        self.routing
            .borrow()
            .get(&key.vhost)
            .and_then(|routing| routing.queue(&key.name).cloned())
    }

    /// The channel key of a local connection's channel.
    pub fn channel_key(&self, connection: u64, channel: u16) -> ChannelKey {
        ChannelKey {
            shard: self.id,
            connection,
            channel,
        }
    }

    pub fn consumer_key(&self, connection: u64, consumer: u64) -> ConsumerKey {
        ConsumerKey {
            shard: self.id,
            connection,
            consumer,
        }
    }
}

fn logged_queue(key: &QueueKey) -> LoggedQueue {
    LoggedQueue {
        vhost: key.vhost.clone().into_bytes(),
        name: key.name.clone().into_bytes(),
    }
}

async fn sync_log(log: &Rc<LogWriter>) -> Result<(), String> {
    let (sender, receiver) = oneshot::channel();
    log.after_sync(move |ok| sender.send(ok));
    match receiver.await {
        Some(true) => Ok(()),
        _ => Err("a log could not be written".into()),
    }
}

pub fn no_queue(queue: &QueueKey) -> AmqpError {
    AmqpError::channel(
        ReplyCode::NotFound,
        format_args!("no queue '{}' in vhost '{}'", queue.name, queue.vhost),
    )
}

pub fn internal_error(what: &str, reply: &Option<Reply>) -> AmqpError {
    AmqpError::connection(
        ReplyCode::InternalError,
        format_args!("unexpected answer to {what}: {reply:?}"),
    )
}
