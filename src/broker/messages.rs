//! What shards say to each other: the mailbox messages of the broker layer.
//!
//! Three conversations travel on the mesh:
//! - metadata: a connection's shard asks the coordinator (shard 0) for a change; the coordinator
//!   validates it, applies it on every shard (`Apply`/`Applied`) and answers;
//! - queue operations: publishes, consumes, credit, settlements, gets and purges go to the shard
//!   that owns the queue;
//! - deliveries and confirms come back to the shard of the connection concerned.
//!
//! Requests carry a `token`; the answer is a [`ShardMessage::Reply`] with the same token, sent to
//! the asking shard. Everything here is plain `Send` data.

use std::sync::Arc;

use shards::queue::{ChannelKey, Consumer, ConsumerKey, Got, MessageId};
use shards::{Message, ShardId};
use smallvec::SmallVec;

use super::routing::{BindingDef, ConnectionRef, ExchangeDef, MetaOp};
use crate::codec::{FieldTable, ShortStr};
use crate::connection::error::AmqpError;

/// Ids a settlement names; inline for the usual few (an ack of one allocates nothing).
pub type SettledIds = SmallVec<[MessageId; 4]>;

/// A queue, named within its vhost: a shared handle to a [`QueueName`].
///
/// Every delivery, unacked entry and settlement names its queue, so the handle is what moves:
/// 8 bytes, cloned with one reference count, hashed from the name's precomputed hash, and equal
/// at once when both sides hold the same handle (routing on the owner's shard made the one the
/// owner keys its queue by, and a settlement carries back the handle its delivery came with).
/// Derefs to the name.
#[derive(Clone)]
pub struct QueueKey(Arc<QueueName>);

/// A queue's vhost and name, with their hash computed once.
pub struct QueueName {
    pub vhost: ShortStr,
    pub name: ShortStr,
    hash: u64,
}

/// One hasher for every shard and thread: a handle made on one shard hashes alike on another.
fn name_hash(vhost: &ShortStr, name: &ShortStr) -> u64 {
    static STATE: std::sync::LazyLock<ahash::RandomState> =
        std::sync::LazyLock::new(ahash::RandomState::new);
    STATE.hash_one((vhost, name))
}

impl QueueKey {
    pub fn new(vhost: ShortStr, name: ShortStr) -> QueueKey {
        let hash = name_hash(&vhost, &name);
        QueueKey(Arc::new(QueueName { vhost, name, hash }))
    }

    /// The very same handle: the queue it was made for, not a later one of the same name.
    pub fn is(&self, other: &QueueKey) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for QueueKey {
    type Target = QueueName;
    fn deref(&self) -> &QueueName {
        &self.0
    }
}

impl PartialEq for QueueName {
    fn eq(&self, other: &QueueName) -> bool {
        self.hash == other.hash && self.name == other.name && self.vhost == other.vhost
    }
}

impl Eq for QueueName {}

impl std::hash::Hash for QueueName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialOrd for QueueName {
    fn partial_cmp(&self, other: &QueueName) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for QueueName {
    fn cmp(&self, other: &QueueName) -> std::cmp::Ordering {
        (&self.vhost, &self.name).cmp(&(&other.vhost, &other.name))
    }
}

impl std::fmt::Debug for QueueName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}/{:?}", self.vhost, self.name)
    }
}

impl PartialEq for QueueKey {
    fn eq(&self, other: &QueueKey) -> bool {
        self.is(other) || *self.0 == *other.0
    }
}

impl Eq for QueueKey {}

impl std::hash::Hash for QueueKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialOrd for QueueKey {
    fn partial_cmp(&self, other: &QueueKey) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for QueueKey {
    fn cmp(&self, other: &QueueKey) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl std::fmt::Debug for QueueKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A metadata change a connection asks the coordinator for.
#[derive(Debug, Clone)]
pub enum MetaRequest {
    DeclareExchange {
        def: ExchangeDef,
        passive: bool,
    },
    DeleteExchange {
        name: ShortStr,
        if_unused: bool,
    },
    Bind(BindingDef),
    Unbind(BindingDef),
    DeclareQueue {
        /// Empty: the server names the queue.
        name: ShortStr,
        passive: bool,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: FieldTable,
    },
    DeleteQueue {
        name: ShortStr,
        if_unused: bool,
        if_empty: bool,
    },
    /// Delete the queue if it has no consumers (sent by the owning shard): an auto-delete
    /// queue lost its last consumer, or an x-expires queue went unused for that long.
    DeleteUnusedQueue {
        name: ShortStr,
    },
    /// A connection ended: its exclusive queues go.
    ConnectionClosed,
}

/// What the coordinator answers to a [`MetaRequest`].
#[derive(Debug, Clone)]
pub enum MetaOutcome {
    Done,
    /// queue.declare: the queue's name (server-named ones are new), its owner, and whether this
    /// declare created it.
    Queue {
        name: ShortStr,
        owner: ShardId,
        created: bool,
    },
    /// queue.delete: messages the queue held.
    Deleted {
        message_count: u32,
    },
}

/// An answer to a request, matched to it by token.
#[derive(Debug)]
pub enum Reply {
    Meta(Result<MetaOutcome, AmqpError>),
    /// A metadata change was applied on the answering shard.
    Applied,
    /// basic.consume registered (or refused).
    Consume(Result<(), AmqpError>),
    /// basic.get: the message, with the owner's handle of the queue (its settlement names it).
    Get(Result<Option<(QueueKey, Got)>, AmqpError>),
    /// purge or delete: how many messages went.
    Count(Result<u32, AmqpError>),
    /// Ready messages and consumers of a queue (declare-ok); `None` if it does not exist here.
    Stats(Option<(u32, u32)>),
}

/// Where a publisher wants its confirm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfirmTo {
    pub connection: u64,
    pub channel: u16,
    pub seq: u64,
}

/// What a client's settle method (or the broker on its behalf) does with deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// basic.ack: done with.
    Ack,
    /// Back to the queue, marked redelivered.
    Requeue,
    /// basic.reject / basic.nack without requeue: dead-lettered if the queue says so.
    Reject,
}

/// One mailbox message.
#[derive(Debug)]
pub enum ShardMessage {
    /// To the coordinator. (Rare metadata changes are boxed: a mailbox message is moved a few
    /// times per publish, and its size is that of its largest variant.)
    Meta {
        token: u64,
        vhost: ShortStr,
        requester: ConnectionRef,
        request: Box<MetaRequest>,
    },
    /// From the coordinator: apply this change to your copy of the vhost's routing table.
    Apply {
        token: u64,
        vhost: ShortStr,
        op: Box<MetaOp>,
    },
    /// To the owner of `queues` (all on the receiving shard).
    Publish {
        /// Inline for the usual single queue: a publish allocates no list.
        queues: SmallVec<[QueueKey; 1]>,
        message: Message,
        confirm: Option<ConfirmTo>,
    },
    /// To a publisher's shard: the owner has the message (`durable`: and, if it is persistent,
    /// on disk), or could not take it (`ok` false: the publisher gets basic.nack).
    Confirmed {
        to: ConfirmTo,
        ok: bool,
    },
    /// To an owner: answer `Reply::Applied` once everything sent before this is durable
    /// (tx.commit waits for it).
    SyncBarrier {
        token: u64,
    },
    Consume {
        token: u64,
        queue: QueueKey,
        consumer: Consumer,
    },
    Cancel {
        queue: QueueKey,
        consumer: ConsumerKey,
    },
    Credit {
        queue: QueueKey,
        consumer: ConsumerKey,
        amount: u32,
    },
    /// Settle delivered messages. `queue` is the handle the deliveries came with: a queue
    /// deleted and declared again since is another queue, which the settlement must not touch
    /// (its ids start over).
    Settle {
        queue: QueueKey,
        ids: SettledIds,
        settlement: Settlement,
    },
    Get {
        token: u64,
        queue: QueueKey,
        channel: ChannelKey,
        no_ack: bool,
    },
    Purge {
        token: u64,
        queue: QueueKey,
    },
    Stats {
        token: u64,
        queue: QueueKey,
    },
    /// A channel closed: drop its consumers on these queues and requeue what it held.
    ChannelClosed {
        channel: ChannelKey,
        queues: Vec<QueueKey>,
    },
    /// From the coordinator to a queue's owner, before the delete is applied everywhere: check
    /// the conditions, drop the messages, cancel the consumers, and answer with the count.
    DeleteQueueData {
        token: u64,
        queue: QueueKey,
        if_unused: bool,
        if_empty: bool,
    },
    /// To a consumer's shard.
    Deliver {
        consumer: ConsumerKey,
        queue: QueueKey,
        /// The queue is durable: acking the delivery writes to the owner's log.
        durable: bool,
        owner: ShardId,
        id: MessageId,
        message: Message,
        redelivered: bool,
    },
    /// To a consumer's shard: an on-demand consumer (shared channel prefetch) has no credit
    /// while `ready` messages wait.
    CreditWanted {
        consumer: ConsumerKey,
        ready: u32,
    },
    /// To a consumer's shard: the queue went away under the consumer.
    ConsumerCancelled {
        consumer: ConsumerKey,
    },
    /// From the coordinator's shard to every shard: the data directory's disk went below (or
    /// back above) `queues.disk_free_limit_bytes`.
    DiskAlarm {
        on: bool,
    },
    /// To a requester's shard: a reply published to its direct reply-to address
    /// (`amq.rabbitmq.reply-to.*`), for the reply consumer `key` names on that channel.
    DirectReply {
        connection: u64,
        channel: u16,
        key: u64,
        message: Message,
    },
    Reply {
        token: u64,
        reply: Reply,
    },
    /// To other shards: whether the sender holds their publishers back, and why (the alarm goes
    /// to every shard, waiting for consumers to those whose publishers feed the sender).
    Flow {
        state: PublisherFlow,
    },
    /// The answer to `Flow { state: Draining }`: the sender holds its publishers now, and what
    /// they published before is ahead of this in the channel.
    FlowHeld,
}

/// Whether a shard holds publishers back (they stop reading), and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublisherFlow {
    Open,
    /// Its consumers are taking its messages over the memory budget faster than paging them out
    /// would (RabbitMQ's "flow": publishers just wait, nobody is told). Sent only to the shards
    /// whose publishers sent it messages lately.
    Draining,
    /// It holds more messages in memory than paging keeps up with (the memory alarm: clients
    /// that asked are sent connection.blocked).
    MemoryAlarm,
}

impl ShardMessage {
    /// Bytes of message data this carries, as its destination will count them once it is
    /// handled: a publish counts once per queue it goes to (a fanout to 8 queues on one shard is
    /// 8 queued messages there, however little it holds on the way); zero for control messages.
    /// Outboxes and the mesh bound what waits in them by this.
    pub fn message_bytes(&self) -> usize {
        match self {
            ShardMessage::Publish {
                message, queues, ..
            } => message.size_bytes() * queues.len(),
            ShardMessage::Deliver { message, .. } => message.size_bytes(),
            _ => 0,
        }
    }
}

impl crate::runtime::mesh::Weighed for Vec<ShardMessage> {
    fn weight(&self) -> usize {
        self.iter().map(ShardMessage::message_bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn short(s: &str) -> ShortStr {
        ShortStr::try_from(s).unwrap()
    }

    #[test]
    fn handles_made_apart_from_the_same_names_are_one_key() {
        let mut map = HashMap::new();
        map.insert(QueueKey::new(short("/"), short("orders")), 1);
        map.insert(QueueKey::new(short("other"), short("orders")), 2);
        let again = QueueKey::new(short("/"), short("orders"));
        assert_eq!(map.get(&again), Some(&1));
        assert_eq!(
            map.get(&QueueKey::new(short("other"), short("orders"))),
            Some(&2)
        );
        assert_eq!(map.get(&QueueKey::new(short("/"), short("order"))), None);
        assert_ne!(again, QueueKey::new(short("/"), short("Orders")));
        assert_eq!(again.clone(), again);
        assert!(QueueKey::new(short("/"), short("a")) < QueueKey::new(short("/"), short("b")));
        assert_eq!(
            (again.vhost.as_bytes(), again.name.as_bytes()),
            (&b"/"[..], &b"orders"[..])
        );
        assert_eq!(std::mem::size_of::<QueueKey>(), 8);
    }

    /// A publish weighs what it becomes where it goes: once per queue (the mesh and the
    /// outboxes bound fanouts by this).
    #[test]
    fn a_publish_weighs_its_message_once_per_queue() {
        use crate::runtime::mesh::Weighed;
        let message = shards::Message::with_copied_body(b"", b"q", &[0x10, 0, 2], &[7; 256], false);
        let size = message.size_bytes();
        let publish = |names: &[&str]| ShardMessage::Publish {
            queues: names
                .iter()
                .map(|name| QueueKey::new(short("/"), short(name)))
                .collect(),
            message: message.clone(),
            confirm: None,
        };
        assert_eq!(publish(&["a"]).message_bytes(), size);
        assert_eq!(publish(&["a", "b", "c"]).message_bytes(), 3 * size);
        let batch = vec![publish(&["a", "b"]), ShardMessage::SyncBarrier { token: 1 }];
        assert_eq!(batch.weight(), 2 * size);
    }
}
