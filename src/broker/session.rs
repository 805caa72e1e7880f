//! The broker side of one connection: what each of its channels has in flight (consumers,
//! delivery tags, unacked deliveries, confirms, transactions) and how the AMQP methods of the
//! exchange, queue, basic, tx and confirm classes become work for the shards.
//!
//! A session lives on its connection's shard. It talks to queues only through
//! [`ShardBroker::post`] and [`ShardBroker::request`], so a queue on this shard and a queue on
//! another core are handled the same way. Deliveries and confirms come back through
//! [`ConnectionPort`].
//!
//! Credit (prefetch) is granted from here: a consumer with a prefetch limit gets that many
//! credits and one more per settled delivery; a consumer without one (prefetch 0 or no-ack) gets
//! a window of `consumer_window_messages` that refills as deliveries are written to the socket,
//! so the broker's buffers stay bounded whatever the client asked for.
//!
//! Invariant: no `RefCell` borrow is held across an `.await`; deliveries may arrive (and borrow
//! the session) while a method waits for a reply.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use super::unacked::Unacked as UnackedDeliveries;
use std::rc::Rc;

use ahash::HashMap;
use log::debug;
use shards::queue::{Consumer, Credit, MessageId};
use shards::{Message, ShardId};
use smallvec::{smallvec, SmallVec};

use super::direct_reply::{ReplyAddress, PSEUDO_QUEUE};
use super::messages::{
    ConfirmTo, MetaOutcome, MetaRequest, QueueKey, Reply, SettledIds, Settlement, ShardMessage,
};
use super::queue_arguments;
use super::queue_policy::parse_expiration;
use super::routing::{
    BindingDef, ConnectionRef, Destination, ExchangeDef, ExchangeKind, RoutedQueue,
};
use super::shard::{internal_error, no_queue, ConnectionPort, IncomingDelivery, ShardBroker};
use crate::codec::{
    BasicAck, BasicCancel, BasicCancelOk, BasicConsume, BasicConsumeOk, BasicGetEmpty, BasicGetOk,
    BasicNack, BasicProperties, BasicPublish, BasicQosOk, BasicRecoverOk, BasicReturn,
    ConfirmSelectOk, DeliverArgs, ExchangeBindOk, ExchangeDeclareOk, ExchangeDeleteOk,
    ExchangeUnbindOk, Method, QueueBindOk, QueueDeclareOk, QueueDeleteOk, QueuePurgeOk,
    QueueUnbindOk, ReplyCode, ShortStr, TxCommitOk, TxRollbackOk, TxSelectOk, EXPIRATION_FLAG,
    HEADERS_FLAG, REPLY_TO_FLAG, USER_ID_FLAG,
};
use crate::connection::error::AmqpError;
use crate::connection::machine::{Command, ConnectionMachine, Content};
use crate::runtime::sync::Notify;

/// Bodies shorter than this are copied out of the read buffer before they are queued.
const BODY_COPY_BYTES_MAX: usize = 8 * 1024;

/// A delivery the client has not settled yet.
#[derive(Debug, Clone)]
struct Unacked {
    queue: QueueKey,
    /// Settling it writes to the owner's log (see `settlement_barrier`).
    durable: bool,
    owner: ShardId,
    id: MessageId,
    /// The consumer it went to; `None` for basic.get.
    consumer: Option<u64>,
}

#[derive(Debug)]
struct ConsumerState {
    channel: u16,
    tag: ShortStr,
    queue: QueueKey,
    owner: ShardId,
    no_ack: bool,
    mode: CreditMode,
    /// Window credits earned by written deliveries and not yet granted.
    window_owed: u32,
    /// Shared-mode credit granted and not yet used by a delivery.
    outstanding: u32,
    /// Shared mode: the consumer's own limit (basic.qos global=false set too), and its
    /// deliveries not settled yet.
    cap: Option<u32>,
    own_unacked: u32,
    /// consume-ok has been written; until then deliveries wait in `early`.
    confirmed: bool,
    early: Vec<IncomingDelivery>,
}

/// Where a consumer's credit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CreditMode {
    /// basic.qos global=false: its own limit, refilled as the client settles.
    Prefetch,
    /// No limit (prefetch 0 or no-ack): a window refilled as deliveries are written.
    Window,
    /// basic.qos global=true: the channel's pool, granted when the queue asks.
    Shared,
}

/// Publisher confirms of one channel. Seqs are confirmed to the client in order, with one
/// basic.ack (multiple) for every run of them that all owners have confirmed.
#[derive(Debug, Default)]
struct Confirms {
    /// Owners that still have to confirm each seq after `acked_up_to`, in seq order (a deque:
    /// confirms arrive in order, so the front empties as the back grows, and nothing is
    /// allocated per message).
    pending: VecDeque<u32>,
    acked_up_to: u64,
    /// Nacked seqs above `acked_up_to`: a multiple ack must not cover them.
    nacked: std::collections::BTreeSet<u64>,
}

impl Confirms {
    /// Gives the next publish its seq; `owners` must each confirm it (none: it is confirmed).
    fn publish(&mut self, owners: u32) -> u64 {
        self.pending.push_back(owners);
        self.acked_up_to + self.pending.len() as u64
    }

    /// An owner has `seq` (`ok`), or failed to store it. Returns whether this changed anything
    /// (false for a seq already answered).
    fn confirm(&mut self, seq: u64, ok: bool) -> bool {
        let Some(index) = seq.checked_sub(self.acked_up_to + 1) else {
            return false;
        };
        let Some(remaining) = self.pending.get_mut(index as usize) else {
            return false;
        };
        if ok {
            *remaining = remaining.saturating_sub(1);
            true
        } else {
            // One owner failed to store it: nacked, whatever the others say.
            *remaining = 0;
            self.nacked.insert(seq)
        }
    }

    /// The acks for the seqs confirmed since the last call, in order: one multiple ack, or one
    /// per seq when a nack falls among them.
    fn take_acks(&mut self) -> SmallVec<[BasicAck; 1]> {
        let confirmed = self.pending.iter().take_while(|r| **r == 0).count() as u64;
        if confirmed == 0 {
            return SmallVec::new();
        }
        let from = self.acked_up_to + 1;
        let up_to = self.acked_up_to + confirmed;
        self.pending.drain(..confirmed as usize);
        self.acked_up_to = up_to;
        if self.nacked.range(from..=up_to).next().is_none() {
            return smallvec![BasicAck {
                delivery_tag: up_to,
                multiple: up_to > from,
            }];
        }
        let acks = (from..=up_to)
            .filter(|seq| !self.nacked.contains(seq))
            .map(|seq| BasicAck {
                delivery_tag: seq,
                multiple: false,
            })
            .collect();
        self.nacked = self.nacked.split_off(&(up_to + 1));
        acks
    }
}

/// Work a transactional channel defers to tx.commit.
#[derive(Debug)]
enum TxOp {
    Publish {
        exchange: ShortStr,
        routing_key: ShortStr,
        mandatory: bool,
        content: Box<Content>,
    },
    Settle {
        delivery_tag: u64,
        multiple: bool,
        requeue: Option<bool>,
    },
}

#[derive(Debug, Default)]
struct ChannelState {
    next_delivery_tag: u64,
    unacked: UnackedDeliveries<Unacked>,
    consumers: HashMap<ShortStr, u64>,
    /// basic.qos global=false: the limit of consumers created from now on.
    prefetch_count: u16,
    /// basic.qos global=true.
    global_prefetch: u16,
    confirm: Option<Confirms>,
    tx: Option<Vec<TxOp>>,
    /// The queue an empty queue name stands for (the last one declared on this channel).
    last_queue: Option<ShortStr>,
    /// Shared-pool accounting (basic.qos global=true): unacked deliveries of shared-mode
    /// consumers and credit granted to them but not used yet. Their sum never exceeds
    /// `global_prefetch`.
    shared_unacked: u32,
    shared_outstanding: u32,
    /// Shared-mode consumers that asked for credit when the pool was empty.
    waiting: Vec<(u64, u32)>,
    /// Deliveries that arrived while channel.flow was off; written when it is back on.
    paused: Vec<IncomingDelivery>,
    /// The direct reply-to consumer: its tag and the key its address carries.
    reply_consumer: Option<(ShortStr, u64)>,
}

impl ChannelState {
    fn shared_available(&self) -> u32 {
        u32::from(self.global_prefetch)
            .saturating_sub(self.shared_unacked + self.shared_outstanding)
    }
}

#[derive(Default)]
struct State {
    channels: HashMap<u16, ChannelState>,
    consumers: HashMap<u64, ConsumerState>,
}

pub struct Session {
    shard: Rc<ShardBroker>,
    connection: u64,
    machine: Rc<RefCell<ConnectionMachine>>,
    write_wanted: Rc<Notify>,
    /// Notified with the writer when output the client may be waiting for is queued (see
    /// `answer_queued`): it ends a coalesced read's wait.
    pub answered: Notify,
    /// Notified with the writer when a confirm, or a delivery to a prefetch-limited consumer, is
    /// queued (see `window_answer_queued`): it may end a coalesced read's wait, as the reader
    /// decides (`connection::coalescing`).
    pub window_answered: Notify,
    state: RefCell<State>,
    /// Owners sent a settlement since the last barrier (see `execute`).
    settled_owners: RefCell<Vec<ShardId>>,
    next_consumer: Cell<u64>,
    consumer_window: u32,
    outbound_bytes_max: usize,
    tag_seed: ahash::RandomState,
    /// Has published: its reads pause while the broker pauses publishers.
    published: Cell<bool>,
    /// The vhost opened (connection.open sets it once), kept so commands do not rebuild it.
    vhost: RefCell<Option<ShortStr>>,
    /// Reused by `publish` for the queues a message routes to.
    routed: RefCell<Vec<RoutedQueue>>,
    /// Channels with confirms to send once the shard has handled its current batch of
    /// messages (`ConnectionPort::send_confirms`).
    confirms_due: RefCell<SmallVec<[u16; 2]>>,
}

impl Session {
    pub fn new(
        shard: Rc<ShardBroker>,
        connection: u64,
        machine: Rc<RefCell<ConnectionMachine>>,
        write_wanted: Rc<Notify>,
        consumer_window: u32,
        outbound_bytes_max: usize,
    ) -> Rc<Session> {
        Rc::new(Session {
            shard,
            connection,
            machine,
            write_wanted,
            answered: Notify::default(),
            window_answered: Notify::default(),
            state: RefCell::new(State::default()),
            settled_owners: RefCell::new(Vec::new()),
            next_consumer: Cell::new(1),
            consumer_window,
            outbound_bytes_max,
            tag_seed: ahash::RandomState::new(),
            published: Cell::new(false),
            vhost: RefCell::new(None),
            routed: RefCell::new(Vec::new()),
            confirms_due: RefCell::new(SmallVec::new()),
        })
    }

    fn me(&self) -> ConnectionRef {
        ConnectionRef {
            shard: self.shard.id,
            connection: self.connection,
        }
    }

    fn vhost(&self) -> ShortStr {
        if let Some(vhost) = &*self.vhost.borrow() {
            return vhost.clone();
        }
        let machine = self.machine.borrow();
        let vhost = ShortStr::try_from(machine.vhost().unwrap_or("/")).unwrap_or_default();
        if machine.vhost().is_some() {
            *self.vhost.borrow_mut() = Some(vhost.clone());
        }
        vhost
    }

    /// Queues `method` on `channel` for the writer.
    pub fn send(&self, channel: u16, method: impl Into<Method>) {
        self.machine
            .borrow_mut()
            .send_method(channel, &method.into());
        self.answer_queued();
    }

    /// Wakes the writer for output the client may be waiting for (a method, a basic.get-ok, a
    /// return): a client that streams publishes or acks may stop to wait for it, so the
    /// connection's coalesced read must not make it wait longer (see `connection::driver`).
    fn answer_queued(&self) {
        self.write_wanted.notify();
        self.answered.notify();
    }

    /// Wakes the writer for output that reopens a client's window: a confirm (a publisher may
    /// hold a fixed number unconfirmed) or a delivery to a prefetch-limited consumer (its acks
    /// wait on it). Whether it ends a coalesced read's wait is the reader's choice: a client far
    /// from its window's end goes on streaming, and it is cheaper to let its messages gather.
    fn window_answer_queued(&self) {
        self.write_wanted.notify();
        self.window_answered.notify();
    }

    /// Sends `reply` unless the client asked for no-wait.
    fn reply(&self, channel: u16, no_wait: bool, method: impl Into<Method>) {
        if !no_wait {
            self.send(channel, method);
        }
    }

    /// Raises `error` on `channel`, naming `cause`; cleans up the channel for a channel error.
    /// `cause` is the (class id, method id) of the method that failed.
    fn raise(&self, channel: u16, mut error: AmqpError, cause: (u16, u16)) {
        if error.class_id == 0 {
            (error.class_id, error.method_id) = cause;
        }
        let closes_channel = error.scope == crate::connection::error::Scope::Channel;
        self.machine.borrow_mut().raise(channel, error);
        self.answer_queued();
        if closes_channel {
            self.channel_closed(channel);
        }
    }

    fn with_channel<T>(&self, channel: u16, f: impl FnOnce(&mut ChannelState) -> T) -> T {
        let mut state = self.state.borrow_mut();
        f(state.channels.entry(channel).or_default())
    }

    fn random_tag(&self, prefix: &str) -> ShortStr {
        let n = self.next_consumer.get();
        let hash = self.tag_seed.hash_one((self.connection, n));
        ShortStr::try_from(format!("{prefix}{}-{hash:016x}", self.shard.id.index()))
            .unwrap_or_default()
    }

    /// Whether `method` settles deliveries (ack, nack, reject): it adds nothing to what the
    /// connection must write, so its reader takes it even while the client does not read.
    pub fn is_settlement(method: &Method) -> bool {
        matches!(
            method,
            Method::BasicAck(_) | Method::BasicNack(_) | Method::BasicReject(_)
        )
    }

    /// Whether `method` is one a client streams without waiting for an answer: a publish or a
    /// settlement (ack, nack, reject). These never wait for anything, so
    /// [`Session::execute_streamed`] carries them out synchronously, and the connection's reader
    /// may coalesce its reads around them (see `connection::driver`).
    pub fn is_streamed(method: &Method) -> bool {
        matches!(method, Method::BasicPublish(_)) || Self::is_settlement(method)
    }

    /// Carries out one method; errors become channel or connection closes.
    pub async fn execute(self: &Rc<Self>, command: Command) {
        if Self::is_streamed(&command.method) {
            self.execute_streamed(command);
            return;
        }
        let channel = command.channel;
        let cause = (command.method.class_id(), command.method.method_id());
        // Acks are fire-and-forget, but once a client sees the reply to a later method it may
        // count on them: before answering anything, make the settlements sent so far durable.
        self.settlement_barrier().await;
        if let Err(error) = self.run(channel, command.method).await {
            self.raise(channel, error, cause);
        }
    }

    /// Carries out a publish or a settlement ([`Session::is_streamed`]) without a future: this
    /// runs for every message, and building `run`'s future moved the command into it.
    pub fn execute_streamed(self: &Rc<Self>, command: Command) {
        let Command {
            channel,
            method,
            content,
        } = command;
        let cause = (method.class_id(), method.method_id());
        let result = match method {
            Method::BasicPublish(m) => self.basic_publish(channel, m, content),
            Method::BasicAck(m) => self.settle_or_defer(channel, m.delivery_tag, m.multiple, None),
            Method::BasicNack(m) => {
                self.settle_or_defer(channel, m.delivery_tag, m.multiple, Some(m.requeue))
            }
            Method::BasicReject(m) => {
                self.settle_or_defer(channel, m.delivery_tag, false, Some(m.requeue))
            }
            other => Err(AmqpError::connection(
                ReplyCode::InternalError,
                format_args!("{} is not a streamed method", other.name()),
            )),
        };
        if let Err(error) = result {
            self.raise(channel, error, cause);
        }
    }

    /// Waits until every owner that was sent a settlement (ack or drop) since the last barrier
    /// has it on disk.
    async fn settlement_barrier(self: &Rc<Self>) {
        let owners = std::mem::take(&mut *self.settled_owners.borrow_mut());
        self.sync_owners(owners).await;
    }

    /// Waits until each of `owners` has everything this connection sent it on disk (all
    /// barriers in flight at once).
    async fn sync_owners(&self, owners: Vec<ShardId>) {
        let barriers: Vec<_> = owners
            .into_iter()
            .map(|owner| {
                self.shard
                    .request(owner, |token| ShardMessage::SyncBarrier { token })
            })
            .collect();
        for barrier in barriers {
            barrier.await;
        }
    }

    /// Carries out a method that is not streamed (only basic.publish carries content).
    async fn run(self: &Rc<Self>, channel: u16, method: Method) -> Result<(), AmqpError> {
        let vhost = self.vhost();
        match method {
            Method::ExchangeDeclare(m) => {
                let kind = match ExchangeKind::parse(m.exchange_type.as_bytes()) {
                    Some(kind) => kind,
                    None if m.passive => ExchangeKind::Direct,
                    None => {
                        return Err(AmqpError::connection(
                            ReplyCode::CommandInvalid,
                            format_args!("unknown exchange type '{}'", m.exchange_type),
                        ))
                    }
                };
                let def = ExchangeDef {
                    name: m.exchange.clone(),
                    kind,
                    durable: m.durable,
                    auto_delete: m.auto_delete,
                    internal: m.internal,
                    arguments: m.arguments.clone(),
                };
                self.meta(
                    &vhost,
                    MetaRequest::DeclareExchange {
                        def,
                        passive: m.passive,
                    },
                )
                .await?;
                self.reply(channel, m.no_wait, ExchangeDeclareOk {});
            }
            Method::ExchangeDelete(m) => {
                self.meta(
                    &vhost,
                    MetaRequest::DeleteExchange {
                        name: m.exchange.clone(),
                        if_unused: m.if_unused,
                    },
                )
                .await?;
                self.reply(channel, m.no_wait, ExchangeDeleteOk {});
            }
            Method::ExchangeBind(m) => {
                let binding =
                    exchange_binding(&m.source, &m.destination, &m.routing_key, &m.arguments);
                self.meta(&vhost, MetaRequest::Bind(binding)).await?;
                self.reply(channel, m.no_wait, ExchangeBindOk {});
            }
            Method::ExchangeUnbind(m) => {
                let binding =
                    exchange_binding(&m.source, &m.destination, &m.routing_key, &m.arguments);
                self.meta(&vhost, MetaRequest::Unbind(binding)).await?;
                self.reply(channel, m.no_wait, ExchangeUnbindOk {});
            }
            Method::QueueDeclare(m) if m.queue.as_bytes() == PSEUDO_QUEUE.as_bytes() => {
                // As RabbitMQ answers for the direct reply-to pseudo-queue.
                self.reply(
                    channel,
                    m.no_wait,
                    QueueDeclareOk {
                        queue: m.queue.clone(),
                        message_count: 0,
                        consumer_count: 1,
                    },
                );
            }
            Method::QueueDeclare(m) => {
                let name = if m.passive && m.queue.is_empty() {
                    self.queue_name(channel, &m.queue)?
                } else {
                    m.queue.clone()
                };
                let outcome = self
                    .meta(
                        &vhost,
                        MetaRequest::DeclareQueue {
                            name,
                            passive: m.passive,
                            durable: m.durable,
                            exclusive: m.exclusive,
                            auto_delete: m.auto_delete,
                            arguments: m.arguments.clone(),
                        },
                    )
                    .await?;
                let MetaOutcome::Queue {
                    name,
                    owner,
                    created,
                } = outcome
                else {
                    return Err(internal_error("queue.declare", &None));
                };
                self.with_channel(channel, |c| c.last_queue = Some(name.clone()));
                let (message_count, consumer_count) = if created {
                    (0, 0)
                } else {
                    self.queue_stats(owner, &vhost, &name).await
                };
                self.reply(
                    channel,
                    m.no_wait,
                    QueueDeclareOk {
                        queue: name,
                        message_count,
                        consumer_count,
                    },
                );
            }
            Method::QueueBind(m) => {
                let queue = self.queue_name(channel, &m.queue)?;
                let binding = BindingDef {
                    source: m.exchange.clone(),
                    destination: Destination::Queue(queue),
                    routing_key: m.routing_key.clone(),
                    arguments: m.arguments.clone(),
                };
                self.meta(&vhost, MetaRequest::Bind(binding)).await?;
                self.reply(channel, m.no_wait, QueueBindOk {});
            }
            Method::QueueUnbind(m) => {
                let queue = self.queue_name(channel, &m.queue)?;
                let binding = BindingDef {
                    source: m.exchange.clone(),
                    destination: Destination::Queue(queue),
                    routing_key: m.routing_key.clone(),
                    arguments: m.arguments.clone(),
                };
                self.meta(&vhost, MetaRequest::Unbind(binding)).await?;
                self.send(channel, QueueUnbindOk {});
            }
            Method::QueuePurge(m) => {
                let (queue, owner) = self.accessible_queue(channel, &vhost, &m.queue)?;
                let reply = self
                    .shard
                    .request(owner, |token| ShardMessage::Purge { token, queue })
                    .await;
                let message_count = match reply {
                    Some(Reply::Count(result)) => result?,
                    other => return Err(internal_error("queue.purge", &other)),
                };
                self.reply(channel, m.no_wait, QueuePurgeOk { message_count });
            }
            Method::QueueDelete(m) => {
                let name = self.queue_name(channel, &m.queue)?;
                let outcome = self
                    .meta(
                        &vhost,
                        MetaRequest::DeleteQueue {
                            name,
                            if_unused: m.if_unused,
                            if_empty: m.if_empty,
                        },
                    )
                    .await?;
                let message_count = match outcome {
                    MetaOutcome::Deleted { message_count } => message_count,
                    _ => 0,
                };
                self.reply(channel, m.no_wait, QueueDeleteOk { message_count });
            }
            Method::ChannelFlow(m) => {
                if m.active {
                    self.resume_flow(channel);
                }
            }
            Method::BasicQos(m) => {
                if m.prefetch_size != 0 {
                    return Err(AmqpError::connection(
                        ReplyCode::NotImplemented,
                        format_args!("prefetch_size!=0 ({})", m.prefetch_size),
                    ));
                }
                self.with_channel(channel, |c| {
                    if m.global {
                        c.global_prefetch = m.prefetch_count;
                    } else {
                        c.prefetch_count = m.prefetch_count;
                    }
                });
                self.send(channel, BasicQosOk {});
            }
            Method::BasicConsume(m) if m.queue.as_bytes() == PSEUDO_QUEUE.as_bytes() => {
                self.consume_replies(channel, &m)?;
            }
            Method::BasicConsume(m) => {
                let (queue, owner) = self.accessible_queue(channel, &vhost, &m.queue)?;
                let priority = consumer_priority(&m.arguments, &queue)?;
                let tag = if m.consumer_tag.is_empty() {
                    self.random_tag("amq.ctag-")
                } else {
                    m.consumer_tag.clone()
                };
                let duplicate = self.with_channel(channel, |c| c.consumers.contains_key(&tag));
                if duplicate {
                    return Err(AmqpError::connection(
                        ReplyCode::NotAllowed,
                        format_args!("attempt to reuse consumer tag '{tag}'"),
                    ));
                }
                let (prefetch, global) =
                    self.with_channel(channel, |c| (c.prefetch_count, c.global_prefetch));
                // Both limits, as RabbitMQ applies them: with a channel-wide one the consumer
                // draws from the channel's pool, capped by its own; with only its own it holds
                // that credit; with neither it gets a window.
                let cap = (prefetch > 0).then_some(u32::from(prefetch));
                let (mode, initial_credit) = if m.no_ack {
                    (CreditMode::Window, self.consumer_window)
                } else if global > 0 {
                    (CreditMode::Shared, 0)
                } else if prefetch > 0 {
                    (CreditMode::Prefetch, u32::from(prefetch))
                } else {
                    (CreditMode::Window, self.consumer_window)
                };
                let id = self.next_consumer.get();
                self.next_consumer.set(id + 1);
                let key = self.shard.consumer_key(self.connection, id);
                // Registered before the request, so that deliveries that overtake the reply
                // (the owner dispatches as soon as it registers the consumer) are held until
                // consume-ok is written, and a second consume with this tag is refused.
                {
                    let mut state = self.state.borrow_mut();
                    state
                        .channels
                        .entry(channel)
                        .or_default()
                        .consumers
                        .insert(tag.clone(), id);
                    state.consumers.insert(
                        id,
                        ConsumerState {
                            channel,
                            tag: tag.clone(),
                            queue: queue.clone(),
                            owner,
                            no_ack: m.no_ack,
                            mode,
                            window_owed: 0,
                            outstanding: 0,
                            cap,
                            own_unacked: 0,
                            confirmed: false,
                            early: Vec::new(),
                        },
                    );
                }
                let consumer = Consumer {
                    key,
                    channel: self.shard.channel_key(self.connection, channel),
                    no_ack: m.no_ack,
                    exclusive: m.exclusive,
                    credit: Credit::Limited(initial_credit),
                    on_demand: mode == CreditMode::Shared,
                    asked: false,
                    priority,
                };
                let request_queue = queue.clone();
                let reply = self
                    .shard
                    .request(owner, |token| ShardMessage::Consume {
                        token,
                        queue: request_queue,
                        consumer,
                    })
                    .await;
                let result = match reply {
                    Some(Reply::Consume(result)) => result,
                    other => Err(internal_error("basic.consume", &other)),
                };
                if let Err(error) = result {
                    let mut state = self.state.borrow_mut();
                    state.consumers.remove(&id);
                    if let Some(c) = state.channels.get_mut(&channel) {
                        c.consumers.remove(&tag);
                    }
                    return Err(error);
                }
                if !self.machine.borrow().is_channel_open(channel) {
                    // The channel closed while we waited; its cleanup did not know this
                    // consumer yet: undo here.
                    self.state.borrow_mut().consumers.remove(&id);
                    self.shard.post(
                        owner,
                        ShardMessage::Cancel {
                            queue,
                            consumer: key,
                        },
                    );
                    return Ok(());
                }
                self.reply(channel, m.no_wait, BasicConsumeOk { consumer_tag: tag });
                let early = {
                    let mut state = self.state.borrow_mut();
                    match state.consumers.get_mut(&id) {
                        Some(consumer) => {
                            consumer.confirmed = true;
                            std::mem::take(&mut consumer.early)
                        }
                        None => Vec::new(),
                    }
                };
                for delivery in early {
                    self.deliver(delivery);
                }
            }
            Method::BasicCancel(m) => {
                self.with_channel(channel, |c| {
                    if c.reply_consumer
                        .as_ref()
                        .is_some_and(|(tag, _)| *tag == m.consumer_tag)
                    {
                        c.reply_consumer = None;
                    }
                });
                let id = self.with_channel(channel, |c| c.consumers.remove(&m.consumer_tag));
                let removed = id.and_then(|id| {
                    let consumer = self.state.borrow_mut().consumers.remove(&id)?;
                    Some((id, consumer))
                });
                if let Some((id, consumer)) = removed {
                    self.forget_consumer(&consumer);
                    self.shard.post(
                        consumer.owner,
                        ShardMessage::Cancel {
                            queue: consumer.queue,
                            consumer: self.shard.consumer_key(self.connection, id),
                        },
                    );
                }
                self.reply(
                    channel,
                    m.no_wait,
                    BasicCancelOk {
                        consumer_tag: m.consumer_tag.clone(),
                    },
                );
            }
            Method::BasicGet(m) => {
                let (queue, owner) = self.accessible_queue(channel, &vhost, &m.queue)?;
                let holder = self.shard.channel_key(self.connection, channel);
                let reply = self
                    .shard
                    .request(owner, |token| ShardMessage::Get {
                        token,
                        queue,
                        channel: holder,
                        no_ack: m.no_ack,
                    })
                    .await;
                let got = match reply {
                    Some(Reply::Get(result)) => result?,
                    other => return Err(internal_error("basic.get", &other)),
                };
                let Some((queue, got)) = got else {
                    self.send(channel, BasicGetEmpty::default());
                    return Ok(());
                };
                if !self.machine.borrow().is_channel_open(channel) {
                    self.shard.post(
                        owner,
                        ShardMessage::Settle {
                            queue,
                            ids: smallvec![got.id],
                            settlement: Settlement::Requeue,
                        },
                    );
                    return Ok(());
                }
                let delivery_tag = self.with_channel(channel, |c| {
                    c.next_delivery_tag += 1;
                    let tag = c.next_delivery_tag;
                    if !m.no_ack {
                        c.unacked.insert(
                            tag,
                            Unacked {
                                durable: self.shard.with_queue_def(&queue, |q| q.durable)
                                    == Some(true),
                                queue,
                                owner,
                                id: got.id,
                                consumer: None,
                            },
                        );
                    }
                    tag
                });
                let message = &got.message;
                let get_ok = BasicGetOk {
                    delivery_tag,
                    redelivered: got.redelivered,
                    exchange: short(message.exchange_shared()),
                    routing_key: short(message.routing_key_shared()),
                    message_count: got.remaining,
                };
                self.machine.borrow_mut().send_content(
                    channel,
                    &get_ok.into(),
                    message.properties(),
                    message.body(),
                );
                self.answer_queued();
            }
            Method::BasicRecover(m) => {
                self.recover(channel, m.requeue)?;
                self.send(channel, BasicRecoverOk {});
            }
            Method::BasicRecoverAsync(m) => self.recover(channel, m.requeue)?,
            Method::TxSelect(_) => {
                let confirming = self.with_channel(channel, |c| c.confirm.is_some());
                if confirming {
                    return Err(AmqpError::channel(
                        ReplyCode::PreconditionFailed,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                self.with_channel(channel, |c| {
                    c.tx.get_or_insert_with(Vec::new);
                });
                self.send(channel, TxSelectOk {});
            }
            Method::TxCommit(_) => {
                let ops = self.take_tx(channel)?;
                let mut owners: Vec<ShardId> = Vec::new();
                for op in ops {
                    match op {
                        TxOp::Publish {
                            exchange,
                            routing_key,
                            mandatory,
                            content,
                        } => {
                            self.publish(
                                channel,
                                &vhost,
                                &exchange,
                                &routing_key,
                                mandatory,
                                *content,
                                Some(&mut owners),
                            );
                        }
                        TxOp::Settle {
                            delivery_tag,
                            multiple,
                            requeue,
                        } => self.settle(channel, delivery_tag, multiple, requeue)?,
                    }
                }
                // commit-ok only once every owner has the published messages on disk.
                self.sync_owners(owners).await;
                self.send(channel, TxCommitOk {});
            }
            Method::TxRollback(_) => {
                self.take_tx(channel)?;
                self.send(channel, TxRollbackOk {});
            }
            Method::ConfirmSelect(m) => {
                let transactional = self.with_channel(channel, |c| c.tx.is_some());
                if transactional {
                    return Err(AmqpError::channel(
                        ReplyCode::PreconditionFailed,
                        "cannot switch from tx to confirm mode",
                    ));
                }
                self.with_channel(channel, |c| {
                    c.confirm.get_or_insert_with(Confirms::default);
                });
                self.reply(channel, m.nowait, ConfirmSelectOk {});
            }
            other => {
                return Err(AmqpError::connection(
                    ReplyCode::CommandInvalid,
                    format_args!("unexpected method {}", other.name()),
                ))
            }
        }
        Ok(())
    }

    async fn meta(
        self: &Rc<Self>,
        vhost: &ShortStr,
        request: MetaRequest,
    ) -> Result<MetaOutcome, AmqpError> {
        self.shard.meta(vhost, self.me(), request).await
    }

    async fn queue_stats(&self, owner: ShardId, vhost: &ShortStr, name: &ShortStr) -> (u32, u32) {
        let queue = QueueKey::new(vhost.clone(), name.clone());
        match self
            .shard
            .request(owner, |token| ShardMessage::Stats { token, queue })
            .await
        {
            Some(Reply::Stats(Some(stats))) => stats,
            _ => (0, 0),
        }
    }

    /// An empty queue name stands for the channel's last declared queue.
    fn queue_name(&self, channel: u16, name: &ShortStr) -> Result<ShortStr, AmqpError> {
        if !name.is_empty() {
            return Ok(name.clone());
        }
        self.with_channel(channel, |c| c.last_queue.clone())
            .ok_or_else(|| AmqpError::channel(ReplyCode::NotFound, "no previously declared queue"))
    }

    /// Resolves a queue this connection may use: it exists, and is not another connection's
    /// exclusive queue.
    fn accessible_queue(
        &self,
        channel: u16,
        vhost: &ShortStr,
        name: &ShortStr,
    ) -> Result<(QueueKey, ShardId), AmqpError> {
        let name = self.queue_name(channel, name)?;
        let key = QueueKey::new(vhost.clone(), name);
        let (exclusive, owner) = self
            .shard
            .with_queue_def(&key, |def| (def.exclusive, def.owner))
            .ok_or_else(|| no_queue(&key))?;
        if exclusive.is_some_and(|holder| holder != self.me()) {
            return Err(AmqpError::channel(
                ReplyCode::ResourceLocked,
                format_args!(
                    "cannot obtain exclusive access to locked queue '{}' in vhost '{}'",
                    key.name, key.vhost
                ),
            ));
        }
        Ok((key, owner))
    }

    fn basic_publish(
        self: &Rc<Self>,
        channel: u16,
        m: BasicPublish,
        content: Option<Content>,
    ) -> Result<(), AmqpError> {
        let Some(content) = content else {
            return Err(internal_error("basic.publish without content", &None));
        };
        if m.immediate {
            return Err(AmqpError::connection(
                ReplyCode::NotImplemented,
                "immediate=true",
            ));
        }
        let vhost = self.vhost();
        let mut content = content;
        self.check_publish(channel, &vhost, &m.exchange, &mut content)?;
        let transactional = self.with_channel(channel, |c| c.tx.is_some());
        if transactional {
            self.with_channel(channel, |c| {
                if let Some(tx) = &mut c.tx {
                    tx.push(TxOp::Publish {
                        exchange: m.exchange,
                        routing_key: m.routing_key,
                        mandatory: m.mandatory,
                        content: Box::new(content),
                    });
                }
            });
        } else {
            self.publish(
                channel,
                &vhost,
                &m.exchange,
                &m.routing_key,
                m.mandatory,
                content,
                None,
            );
        }
        Ok(())
    }

    /// basic.consume from the direct reply-to pseudo-queue, as RabbitMQ takes it.
    fn consume_replies(&self, channel: u16, m: &BasicConsume) -> Result<(), AmqpError> {
        let tag = if m.consumer_tag.is_empty() {
            self.random_tag("amq.ctag-")
        } else {
            m.consumer_tag.clone()
        };
        if self.with_channel(channel, |c| c.consumers.contains_key(&tag)) {
            return Err(AmqpError::connection(
                ReplyCode::NotAllowed,
                format_args!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        if !m.no_ack {
            return Err(AmqpError::channel(
                ReplyCode::PreconditionFailed,
                "reply consumer cannot acknowledge",
            ));
        }
        let key = self
            .tag_seed
            .hash_one((self.connection, channel, tag.as_bytes()));
        let set = self.with_channel(channel, |c| {
            c.reply_consumer.is_none() && {
                c.reply_consumer = Some((tag.clone(), key));
                true
            }
        });
        if !set {
            return Err(AmqpError::channel(
                ReplyCode::PreconditionFailed,
                "reply consumer already set",
            ));
        }
        self.reply(channel, m.no_wait, BasicConsumeOk { consumer_tag: tag });
        Ok(())
    }

    /// A request naming the direct reply-to pseudo-queue as its reply-to gets the channel's
    /// reply address there instead (`content`'s properties are encoded again).
    fn address_replies(
        &self,
        channel: u16,
        properties: &mut BasicProperties,
        content: &mut Content,
    ) -> Result<(), AmqpError> {
        if properties
            .reply_to
            .as_ref()
            .is_none_or(|to| to.as_bytes() != PSEUDO_QUEUE.as_bytes())
        {
            return Ok(());
        }
        let key = self.with_channel(channel, |c| c.reply_consumer.as_ref().map(|(_, key)| *key));
        let Some(key) = key else {
            return Err(AmqpError::channel(
                ReplyCode::PreconditionFailed,
                "fast reply consumer does not exist",
            ));
        };
        let address = ReplyAddress {
            shard: self.shard.id,
            connection: self.connection,
            channel,
            key,
        };
        properties.reply_to = Some(address.routing_key());
        content.header.raw_properties = properties.to_bytes();
        Ok(())
    }

    /// A publish to the default exchange with a reply address as its routing key goes to that
    /// requester's channel too (its routing goes on as usual, to no queue).
    fn send_if_reply(&self, routing_key: &ShortStr, message: &Message) {
        let Some(address) = ReplyAddress::parse(routing_key.as_bytes(), self.shard.shard_count())
        else {
            return;
        };
        self.shard.post(
            address.shard,
            ShardMessage::DirectReply {
                connection: address.connection,
                channel: address.channel,
                key: address.key,
                message: message.clone(),
            },
        );
    }

    /// RabbitMQ's checks on a publish; rewrites a direct reply-to request's reply-to into the
    /// channel's reply address.
    fn check_publish(
        &self,
        channel: u16,
        vhost: &ShortStr,
        exchange: &ShortStr,
        content: &mut Content,
    ) -> Result<(), AmqpError> {
        if !exchange.is_empty() {
            // Whether it is internal, not a clone of its definition: this runs for every publish.
            let internal = self
                .shard
                .with_routing(vhost, |r| r.exchange(exchange).map(|def| def.internal))
                .flatten();
            match internal {
                None => {
                    return Err(AmqpError::channel(
                        ReplyCode::NotFound,
                        format_args!("no exchange '{exchange}' in vhost '{vhost}'"),
                    ))
                }
                Some(true) => {
                    return Err(AmqpError::channel(
                        ReplyCode::AccessRefused,
                        format_args!(
                            "cannot publish to internal exchange '{exchange}' in vhost '{vhost}'"
                        ),
                    ))
                }
                Some(false) => {}
            }
        }
        let mut checked = content
            .header
            .properties_if_any(USER_ID_FLAG | EXPIRATION_FLAG | REPLY_TO_FLAG);
        if let Some(properties) = checked.as_mut() {
            self.address_replies(channel, properties, content)?;
        }
        let expiration = checked.as_ref().and_then(|p| p.expiration.as_ref());
        if let Some(expiration) = expiration {
            if let Err(reason) = parse_expiration(expiration.as_bytes()) {
                return Err(AmqpError::channel(
                    ReplyCode::PreconditionFailed,
                    format_args!("invalid expiration '{expiration}': {reason}"),
                ));
            }
        }
        let user_id = checked.and_then(|p| p.user_id);
        if let Some(user_id) = &user_id {
            let machine = self.machine.borrow();
            let user = machine.user().unwrap_or("");
            if user_id.as_bytes() != user.as_bytes() {
                return Err(AmqpError::channel(
                    ReplyCode::PreconditionFailed,
                    format_args!(
                        "user_id property set to '{user_id}' but authenticated user was '{user}'"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Routes and posts one message; the owning shards it went to are added to `owners` (a
    /// transaction's commit waits for them).
    #[allow(clippy::too_many_arguments)]
    fn publish(
        self: &Rc<Self>,
        channel: u16,
        vhost: &ShortStr,
        exchange: &ShortStr,
        routing_key: &ShortStr,
        mandatory: bool,
        content: Content,
        mut owners: Option<&mut Vec<ShardId>>,
    ) {
        self.published.set(true);
        // Taken out (not borrowed) for the duration: posting below never re-enters, but a
        // nested publish would find an empty vector and simply allocate its own.
        let mut routed = std::mem::take(&mut *self.routed.borrow_mut());
        let headers = content
            .header
            .properties_if_any(HEADERS_FLAG)
            .and_then(|p| p.headers);
        self.shard.with_routing(vhost, |r| {
            r.route(exchange, routing_key, headers.as_ref(), &mut routed)
        });
        let persistent = content.header.persistent;
        let properties = &content.header.raw_properties;
        // A small body is a slice of a whole read buffer: queued for long, it would keep that
        // buffer alive. Small bodies get their own copy (in the envelope's buffer); large ones
        // stay zero-copy.
        let message = if content.body.len() < BODY_COPY_BYTES_MAX {
            Message::with_copied_body(
                exchange.as_bytes(),
                routing_key.as_bytes(),
                properties,
                &content.body,
                persistent,
            )
        } else {
            Message::new(
                exchange.as_bytes(),
                routing_key.as_bytes(),
                properties,
                content.body,
                persistent,
            )
        };
        if exchange.is_empty() {
            self.send_if_reply(routing_key, &message);
        }
        if routed.is_empty() {
            *self.routed.borrow_mut() = routed;
            if mandatory {
                let returned = BasicReturn {
                    reply_code: ReplyCode::NoRoute.code(),
                    reply_text: ShortStr::from_static("NO_ROUTE"),
                    exchange: exchange.clone(),
                    routing_key: routing_key.clone(),
                };
                self.machine.borrow_mut().send_content(
                    channel,
                    &returned.into(),
                    message.properties(),
                    message.body(),
                );
                self.answer_queued();
            }
            // Nothing to wait for: confirmed at once.
            let confirming = self.with_channel(channel, |c| {
                c.confirm.as_mut().map(|confirms| confirms.publish(0))
            });
            if confirming.is_some() {
                self.send_acks(channel);
            }
            return;
        }
        // One Publish per owning shard, carrying every target queue it owns.
        if routed.len() > 1 {
            routed.sort_by_key(|queue| queue.owner.index());
        }
        let seq = self.with_channel(channel, |c| {
            let confirms = c.confirm.as_mut()?;
            let owner_count = routed
                .chunk_by(|a, b| a.owner == b.owner)
                .count()
                .try_into()
                .unwrap_or(u32::MAX);
            Some(confirms.publish(owner_count))
        });
        let mut queues: SmallVec<[QueueKey; 1]> = SmallVec::new();
        let mut drained = routed.drain(..).peekable();
        while let Some(RoutedQueue { key, owner }) = drained.next() {
            // The handles move into the message, one per owner.
            queues.push(key);
            if drained.peek().is_some_and(|next| next.owner == owner) {
                continue;
            }
            if let Some(owners) = owners.as_deref_mut().filter(|o| !o.contains(&owner)) {
                owners.push(owner);
            }
            self.shard.post(
                owner,
                ShardMessage::Publish {
                    queues: std::mem::take(&mut queues),
                    message: message.clone(),
                    confirm: seq.map(|seq| ConfirmTo {
                        connection: self.connection,
                        channel,
                        seq,
                    }),
                },
            );
        }
        drop(drained);
        *self.routed.borrow_mut() = routed;
    }

    fn take_tx(&self, channel: u16) -> Result<Vec<TxOp>, AmqpError> {
        self.with_channel(channel, |c| c.tx.as_mut().map(std::mem::take))
            .ok_or_else(|| {
                AmqpError::channel(
                    ReplyCode::PreconditionFailed,
                    "channel is not transactional",
                )
            })
    }

    fn settle_or_defer(
        &self,
        channel: u16,
        delivery_tag: u64,
        multiple: bool,
        requeue: Option<bool>,
    ) -> Result<(), AmqpError> {
        let deferred = self.with_channel(channel, |c| match &mut c.tx {
            Some(tx) => {
                tx.push(TxOp::Settle {
                    delivery_tag,
                    multiple,
                    requeue,
                });
                true
            }
            None => false,
        });
        if deferred {
            return Ok(());
        }
        self.settle(channel, delivery_tag, multiple, requeue)
    }

    /// ack (`requeue` None), nack or reject of one tag or, with `multiple`, every tag up to it.
    fn settle(
        &self,
        channel: u16,
        delivery_tag: u64,
        multiple: bool,
        requeue: Option<bool>,
    ) -> Result<(), AmqpError> {
        let settlement = match requeue {
            None => Settlement::Ack,
            Some(true) => Settlement::Requeue,
            Some(false) => Settlement::Reject,
        };
        let settled: SmallVec<[Unacked; 1]> = self.with_channel(channel, |c| {
            if multiple {
                let upper = if delivery_tag == 0 {
                    u64::MAX
                } else {
                    delivery_tag
                };
                if delivery_tag != 0 && !c.unacked.contains(delivery_tag) {
                    return Err(unknown_tag(delivery_tag));
                }
                Ok(c.unacked.drain_up_to(upper).collect())
            } else {
                c.unacked
                    .remove(delivery_tag)
                    .map(|u| smallvec![u])
                    .ok_or_else(|| unknown_tag(delivery_tag))
            }
        })?;
        self.release(channel, settled, settlement);
        Ok(())
    }

    /// Tells owners what happened to `deliveries` and refills the credit they used.
    fn release(
        &self,
        channel: u16,
        deliveries: impl IntoIterator<Item = Unacked>,
        settlement: Settlement,
    ) {
        let requeue = settlement == Settlement::Requeue;
        // Few queues and consumers per channel: short inline lists beat hash maps (and an ack of
        // one delivery allocates nothing).
        let mut by_queue: SmallVec<[(QueueKey, bool, ShardId, SettledIds); 1]> = SmallVec::new();
        let mut credit: SmallVec<[(u64, u32); 2]> = SmallVec::new();
        for unacked in deliveries {
            if let Some(consumer) = unacked.consumer {
                match credit.iter_mut().find(|(id, _)| *id == consumer) {
                    Some((_, amount)) => *amount += 1,
                    None => credit.push((consumer, 1)),
                }
            }
            // By handle: deliveries from a queue since deleted and declared again under the
            // same name go to that old queue, not with the new one's.
            match by_queue.iter_mut().find(|(q, ..)| q.is(&unacked.queue)) {
                Some((.., ids)) => ids.push(unacked.id),
                None => by_queue.push((
                    unacked.queue,
                    unacked.durable,
                    unacked.owner,
                    smallvec![unacked.id],
                )),
            }
        }
        for (queue, durable, owner, ids) in by_queue {
            if !requeue && durable {
                let mut owners = self.settled_owners.borrow_mut();
                if !owners.contains(&owner) {
                    owners.push(owner);
                }
            }
            self.shard.post(
                owner,
                ShardMessage::Settle {
                    queue,
                    ids,
                    settlement,
                },
            );
        }
        let mut shared_released = 0;
        {
            let mut state = self.state.borrow_mut();
            for (id, amount) in credit {
                let Some(consumer) = state.consumers.get_mut(&id) else {
                    continue;
                };
                if consumer.mode == CreditMode::Shared {
                    consumer.own_unacked = consumer.own_unacked.saturating_sub(amount);
                }
                match consumer.mode {
                    CreditMode::Prefetch => self.shard.post(
                        consumer.owner,
                        ShardMessage::Credit {
                            queue: consumer.queue.clone(),
                            consumer: self.shard.consumer_key(self.connection, id),
                            amount,
                        },
                    ),
                    CreditMode::Shared => shared_released += amount,
                    CreditMode::Window => {}
                }
            }
        }
        if shared_released > 0 {
            self.with_channel(channel, |c| {
                c.shared_unacked = c.shared_unacked.saturating_sub(shared_released)
            });
            self.serve_waiting(channel);
        }
    }

    /// Grants shared-pool credit to consumers that asked while none could be given. Each is
    /// tried once; those still without room wait again.
    fn serve_waiting(&self, channel: u16) {
        let waiting = self.with_channel(channel, |c| std::mem::take(&mut c.waiting));
        for (consumer, ready) in waiting {
            self.grant_shared(channel, consumer, ready);
        }
    }

    /// Gives a shared-mode consumer what the pool and its own limit allow of what it asked
    /// for; with no room it waits for the next settlement.
    fn grant_shared(&self, channel: u16, consumer: u64, ready: u32) {
        let room = {
            let state = self.state.borrow();
            let Some(c) = state.consumers.get(&consumer) else {
                return;
            };
            c.cap.map_or(u32::MAX, |cap| {
                cap.saturating_sub(c.own_unacked + c.outstanding)
            })
        };
        let grant = self.with_channel(channel, |c| {
            let grant = c.shared_available().min(ready).min(room);
            if grant == 0 {
                if !c.waiting.iter().any(|(id, _)| *id == consumer) {
                    c.waiting.push((consumer, ready));
                }
            } else {
                c.shared_outstanding += grant;
            }
            grant
        });
        if grant == 0 {
            return;
        }
        let target = {
            let mut state = self.state.borrow_mut();
            state.consumers.get_mut(&consumer).map(|c| {
                c.outstanding += grant;
                (c.owner, c.queue.clone())
            })
        };
        match target {
            Some((owner, queue)) => self.shard.post(
                owner,
                ShardMessage::Credit {
                    queue,
                    consumer: self.shard.consumer_key(self.connection, consumer),
                    amount: grant,
                },
            ),
            None => self.with_channel(channel, |c| c.shared_outstanding -= grant),
        }
    }

    /// A consumer left (cancelled by the client or the broker): return its unused shared
    /// credit to the pool.
    fn forget_consumer(&self, consumer: &ConsumerState) {
        if consumer.mode != CreditMode::Shared {
            return;
        }
        self.with_channel(consumer.channel, |c| {
            c.shared_outstanding = c.shared_outstanding.saturating_sub(consumer.outstanding);
        });
        self.serve_waiting(consumer.channel);
    }

    fn recover(&self, channel: u16, requeue: bool) -> Result<(), AmqpError> {
        if !requeue {
            return Err(AmqpError::connection(
                ReplyCode::NotImplemented,
                "requeue=false",
            ));
        }
        let all: Vec<Unacked> = self.with_channel(channel, |c| c.unacked.drain_all().collect());
        self.release(channel, all, Settlement::Requeue);
        Ok(())
    }

    /// Releases everything a closed channel held: its consumers go, its unacked messages are
    /// requeued by their owners.
    pub fn channel_closed(&self, channel: u16) {
        let Some(state) = self.state.borrow_mut().channels.remove(&channel) else {
            return;
        };
        let mut queues: Vec<(ShardId, QueueKey)> = Vec::new();
        {
            let mut session = self.state.borrow_mut();
            for id in state.consumers.values() {
                if let Some(consumer) = session.consumers.remove(id) {
                    queues.push((consumer.owner, consumer.queue));
                }
            }
        }
        for unacked in state.unacked.values() {
            queues.push((unacked.owner, unacked.queue.clone()));
        }
        queues.sort();
        queues.dedup();
        let channel_key = self.shard.channel_key(self.connection, channel);
        let mut by_owner: Vec<(ShardId, Vec<QueueKey>)> = Vec::new();
        for (owner, queue) in queues {
            match by_owner.iter_mut().find(|(o, _)| *o == owner) {
                Some((_, list)) => list.push(queue),
                None => by_owner.push((owner, vec![queue])),
            }
        }
        for (owner, queues) in by_owner {
            self.shard.post(
                owner,
                ShardMessage::ChannelClosed {
                    channel: channel_key,
                    queues,
                },
            );
        }
    }

    /// The connection ended: release every channel and drop its exclusive queues.
    pub fn connection_closed(&self) {
        let channels: Vec<u16> = self.state.borrow().channels.keys().copied().collect();
        for channel in channels {
            self.channel_closed(channel);
        }
        let vhosts = self.machine.borrow().vhost().map(str::to_string);
        if let Some(vhost) = vhosts {
            self.shard.post(
                super::shard::COORDINATOR,
                ShardMessage::Meta {
                    token: 0,
                    vhost: ShortStr::try_from(vhost).unwrap_or_default(),
                    requester: self.me(),
                    request: Box::new(MetaRequest::ConnectionClosed),
                },
            );
        }
        self.shard.unregister_connection(self.connection);
    }

    /// Whether this connection has published (publisher flow control applies to it).
    pub fn has_published(&self) -> bool {
        self.published.get()
    }

    /// Grants window credit earned by written deliveries (called after the writer drained).
    pub fn on_drained(&self) {
        let mut state = self.state.borrow_mut();
        for (id, consumer) in state.consumers.iter_mut() {
            if consumer.window_owed > 0 {
                self.shard.post(
                    consumer.owner,
                    ShardMessage::Credit {
                        queue: consumer.queue.clone(),
                        consumer: self.shard.consumer_key(self.connection, *id),
                        amount: std::mem::take(&mut consumer.window_owed),
                    },
                );
            }
        }
    }

    fn send_acks(&self, channel: u16) {
        let acks = self.with_channel(channel, |c| {
            c.confirm
                .as_mut()
                .map(Confirms::take_acks)
                .unwrap_or_default()
        });
        if acks.is_empty() {
            return;
        }
        let mut machine = self.machine.borrow_mut();
        for ack in acks {
            machine.send_method(channel, &ack.into());
        }
        drop(machine);
        self.window_answer_queued();
    }
}

fn exchange_binding(
    source: &ShortStr,
    destination: &ShortStr,
    routing_key: &ShortStr,
    arguments: &crate::codec::FieldTable,
) -> BindingDef {
    BindingDef {
        source: source.clone(),
        destination: Destination::Exchange(destination.clone()),
        routing_key: routing_key.clone(),
        arguments: arguments.clone(),
    }
}

/// A name the message carries (at most 255 bytes by construction), shared, not copied.
fn short(bytes: bytes::Bytes) -> ShortStr {
    ShortStr::from_bytes(bytes).unwrap_or_default()
}

fn unknown_tag(delivery_tag: u64) -> AmqpError {
    AmqpError::channel(
        ReplyCode::PreconditionFailed,
        format_args!("unknown delivery tag {delivery_tag}"),
    )
}

impl ConnectionPort for Session {
    fn deliver(&self, delivery: IncomingDelivery) -> bool {
        let (channel, tag, no_ack, mode) = {
            let mut state = self.state.borrow_mut();
            let Some(consumer) = state.consumers.get_mut(&delivery.consumer) else {
                return false;
            };
            if !consumer.confirmed {
                consumer.early.push(delivery);
                return true;
            }
            if consumer.mode == CreditMode::Shared {
                consumer.outstanding = consumer.outstanding.saturating_sub(1);
                consumer.own_unacked += 1;
            }
            (
                consumer.channel,
                consumer.tag.clone(),
                consumer.no_ack,
                consumer.mode,
            )
        };
        let flow = self.machine.borrow().channel_flow_active(channel);
        match flow {
            None => return false,
            Some(false) => {
                // channel.flow is off: hold it (credit bounds how many) until it is on again.
                self.with_channel(channel, |c| {
                    if mode == CreditMode::Shared {
                        c.shared_outstanding = c.shared_outstanding.saturating_sub(1);
                        c.shared_unacked += 1;
                    }
                    c.paused.push(delivery)
                });
                return true;
            }
            Some(true) => {}
        }
        self.write_delivery(channel, tag, no_ack, mode, delivery, true);
        true
    }

    fn consumer_cancelled(&self, consumer: u64) {
        let Some(state) = self.state.borrow_mut().consumers.remove(&consumer) else {
            return;
        };
        self.forget_consumer(&state);
        self.with_channel(state.channel, |c| c.consumers.remove(&state.tag));
        let notify = self.machine.borrow().client().consumer_cancel_notify;
        debug!(
            "connection {}: consumer '{}' cancelled by the broker (queue '{}' deleted)",
            self.connection, state.tag, state.queue.name
        );
        if notify && self.machine.borrow().is_channel_open(state.channel) {
            self.send(
                state.channel,
                BasicCancel {
                    consumer_tag: state.tag,
                    no_wait: true,
                },
            );
        }
    }

    fn deliver_reply(&self, channel: u16, key: u64, message: Message) {
        if !self.machine.borrow().is_channel_open(channel) {
            return;
        }
        let to = self.with_channel(channel, |c| {
            let (tag, _) = c.reply_consumer.clone().filter(|(_, k)| *k == key)?;
            c.next_delivery_tag += 1;
            Some((tag, c.next_delivery_tag))
        });
        let Some((tag, delivery_tag)) = to else {
            return;
        };
        let args = DeliverArgs {
            consumer_tag: tag.as_bytes(),
            delivery_tag,
            redelivered: false,
            exchange: message.exchange(),
            routing_key: message.routing_key(),
        };
        self.machine.borrow_mut().send_delivery(
            channel,
            args,
            message.properties(),
            message.body(),
        );
        self.write_wanted.notify();
    }

    fn confirmed(&self, channel: u16, seq: u64, ok: bool) -> bool {
        let known = self.with_channel(channel, |c| {
            c.confirm
                .as_mut()
                .is_some_and(|confirms| confirms.confirm(seq, ok))
        });
        if !known || !self.machine.borrow().is_channel_open(channel) {
            return false;
        }
        if !ok {
            self.send(
                channel,
                BasicNack {
                    delivery_tag: seq,
                    multiple: false,
                    requeue: false,
                },
            );
        }
        let mut due = self.confirms_due.borrow_mut();
        if !due.contains(&channel) {
            due.push(channel);
        }
        true
    }

    fn send_confirms(&self) {
        let due = std::mem::take(&mut *self.confirms_due.borrow_mut());
        for channel in due {
            if self.machine.borrow().is_channel_open(channel) {
                self.send_acks(channel);
            }
        }
    }

    fn credit_wanted(&self, consumer: u64, ready: u32) {
        let channel = self
            .state
            .borrow()
            .consumers
            .get(&consumer)
            .map(|c| c.channel);
        if let Some(channel) = channel {
            self.grant_shared(channel, consumer, ready);
        }
    }
}

impl Session {
    /// Writes one delivery to the socket buffer and records it as unacked. `count_shared`:
    /// whether a shared-mode delivery still has to move from outstanding to unacked (false for
    /// deliveries held while channel.flow was off, which were counted when they arrived).
    fn write_delivery(
        &self,
        channel: u16,
        tag: ShortStr,
        no_ack: bool,
        mode: CreditMode,
        delivery: IncomingDelivery,
        count_shared: bool,
    ) {
        let delivery_tag = self.with_channel(channel, |c| {
            if mode == CreditMode::Shared && count_shared {
                c.shared_outstanding = c.shared_outstanding.saturating_sub(1);
                c.shared_unacked += 1;
            }
            c.next_delivery_tag += 1;
            let tag = c.next_delivery_tag;
            if !no_ack {
                c.unacked.insert(
                    tag,
                    Unacked {
                        queue: delivery.queue.clone(),
                        durable: delivery.durable,
                        owner: delivery.owner,
                        id: delivery.id,
                        consumer: Some(delivery.consumer),
                    },
                );
            }
            tag
        });
        let message = &delivery.message;
        let args = DeliverArgs {
            consumer_tag: tag.as_bytes(),
            delivery_tag,
            redelivered: delivery.redelivered,
            exchange: message.exchange(),
            routing_key: message.routing_key(),
        };
        let outbound_full = {
            let mut machine = self.machine.borrow_mut();
            machine.send_delivery(channel, args, message.properties(), message.body());
            machine.outbound().len() > self.outbound_bytes_max
        };
        if mode != CreditMode::Window {
            // Its credit comes back with its acks: the client may stop acking until it has this.
            self.window_answer_queued();
            return;
        }
        self.write_wanted.notify();
        // Window credit: earned now, granted in batches, held back while the socket lags.
        let grant = {
            let mut state = self.state.borrow_mut();
            let Some(consumer) = state.consumers.get_mut(&delivery.consumer) else {
                return;
            };
            consumer.window_owed += 1;
            let batch = (self.consumer_window / 4).max(1);
            (!outbound_full && consumer.window_owed >= batch).then(|| {
                (
                    consumer.owner,
                    consumer.queue.clone(),
                    std::mem::take(&mut consumer.window_owed),
                )
            })
        };
        if let Some((owner, queue, amount)) = grant {
            self.shard.post(
                owner,
                ShardMessage::Credit {
                    queue,
                    consumer: self.shard.consumer_key(self.connection, delivery.consumer),
                    amount,
                },
            );
        }
    }

    /// channel.flow active=true: write what arrived while it was off.
    fn resume_flow(&self, channel: u16) {
        let paused = self.with_channel(channel, |c| std::mem::take(&mut c.paused));
        for delivery in paused {
            let consumer = {
                let state = self.state.borrow();
                state
                    .consumers
                    .get(&delivery.consumer)
                    .map(|c| (c.tag.clone(), c.no_ack, c.mode))
            };
            match consumer {
                Some((tag, no_ack, mode)) => {
                    self.write_delivery(channel, tag, no_ack, mode, delivery, false)
                }
                // Cancelled meanwhile: back to its queue.
                None => self.shard.post(
                    delivery.owner,
                    ShardMessage::Settle {
                        queue: delivery.queue,
                        ids: smallvec![delivery.id],
                        settlement: Settlement::Requeue,
                    },
                ),
            }
        }
    }
}

/// A basic.consume's x-priority (0 without one), its arguments refused as RabbitMQ refuses them
/// (406, channel level).
fn consumer_priority(
    arguments: &crate::codec::FieldTable,
    queue: &QueueKey,
) -> Result<i32, AmqpError> {
    if let Some(text) = queue_arguments::consume_refusal(
        arguments,
        &queue.name.to_str_lossy(),
        &queue.vhost.to_str_lossy(),
    ) {
        return Err(AmqpError::channel(ReplyCode::PreconditionFailed, text));
    }
    let priority = arguments.get("x-priority").and_then(|p| p.as_i64());
    Ok(priority.map_or(0, |p| p.clamp(i32::MIN.into(), i32::MAX.into()) as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(confirms: &mut Confirms) -> Vec<(u64, bool)> {
        confirms
            .take_acks()
            .into_iter()
            .map(|ack| (ack.delivery_tag, ack.multiple))
            .collect()
    }

    #[test]
    fn confirms_leave_in_order_as_one_multiple_ack_per_run() {
        let mut confirms = Confirms::default();
        let seqs: Vec<u64> = (0..4).map(|_| confirms.publish(1)).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert!(confirms.confirm(2, true));
        assert!(acks(&mut confirms).is_empty(), "seq 1 is still pending");
        assert!(confirms.confirm(1, true));
        assert!(confirms.confirm(3, true));
        assert_eq!(acks(&mut confirms), [(3, true)]);
        assert!(!confirms.confirm(2, true), "already acked");
        assert!(!confirms.confirm(9, true), "never published");
        assert!(confirms.confirm(4, true));
        assert_eq!(acks(&mut confirms), [(4, false)]);
        assert_eq!(confirms.publish(0), 5, "routed nowhere: confirmed at once");
        assert_eq!(acks(&mut confirms), [(5, false)]);
    }

    #[test]
    fn a_seq_waits_for_every_owner_and_a_nack_is_not_covered_by_a_multiple_ack() {
        let mut confirms = Confirms::default();
        for owners in [2, 1, 1] {
            confirms.publish(owners);
        }
        assert!(confirms.confirm(1, true));
        assert!(confirms.confirm(2, false));
        assert!(!confirms.confirm(2, false), "nacked once");
        assert!(confirms.confirm(3, true));
        assert!(acks(&mut confirms).is_empty(), "seq 1 has one owner to go");
        assert!(confirms.confirm(1, true));
        assert_eq!(acks(&mut confirms), [(1, false), (3, false)]);
        assert!(confirms.nacked.is_empty());
        confirms.publish(1);
        assert!(confirms.confirm(4, true));
        assert_eq!(acks(&mut confirms), [(4, false)]);
    }
}
