//! One AMQP queue as its owning shard holds it: ready messages in order, messages delivered and
//! not yet settled, and the consumers it dispatches to.
//!
//! A message's life:
//!
//! ```text
//! publish --> Ready --dispatch/get--> Unacked --ack--> gone
//!               ^                        |
//!               +--------requeue---------+   (redelivered = true, back at its old position)
//! ```
//!
//! A no-ack delivery goes straight from Ready to gone.
//!
//! Credit: a consumer receives a message only while it holds credit, which its connection's shard
//! grants (prefetch) and re-grants as the client settles deliveries. The queue never delivers past
//! the credit it was given, so the prefetch limit holds however far apart the two shards are.
//!
//! Paging: a ready message is either in memory (its body in the queue's slab) or paged out —
//! only its place in the log (a [`Location`]) stays. The shard pages out logged messages when
//! its memory budget is exceeded and reads them back, in order, before they are delivered:
//! dispatch and get stop at a paged message until it is filled in again. Long stretches of paged
//! entries (32 bytes each) are packed into frozen runs (a few bytes each, see
//! [`crate::frozen_run`]), one marker entry in `ready` per run, so that a backlog of millions
//! costs megabytes, not hundreds of them; anything that needs one of a run's messages (reading
//! it back, compaction moving its record, a requeue into its ids) unpacks the run first, and
//! `freeze_paged` packs what compaction unpacked once it is done.
//!
//! Invariants (checked by `check_invariants` in tests and debug builds):
//! - `ready` is sorted by message id, and no id is both ready and unacked;
//! - a ready entry's slot is either `PAGED` (and it has a location), `FROZEN` (a marker: its
//!   run in `frozen`, whose ids lie between the entries before and after it) or holds its body;
//! - `frozen_extra` is the messages in runs beyond one per marker, so the queue's length is
//!   `ready.len() + frozen_extra`;
//! - `memory_bytes` is the size of the ready messages in memory, `unacked_bytes` that of the
//!   delivered ones held for their ack, and the meter holds both sums over every queue that
//!   shares it;
//! - every consumer key appears once.

use std::cell::Cell;
use std::collections::VecDeque;
use std::iter::Rev;
use std::ops::Range;
use std::rc::Rc;

use crate::frozen_run::{FrozenRun, PagedEntry};
use crate::id_map::IdMap;

use crate::message::Message;
use crate::ShardId;

/// Where a logged message's record lies: the log segment (its generation), the record's offset
/// in that file and its length in bytes (header included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    pub segment: u32,
    pub len: u32,
    pub offset: u64,
}

impl Location {
    /// The byte just past the record.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// Bytes of messages held in memory, summed over every queue of a shard: ready messages (the
/// pager's input) and delivered ones waiting for their ack (which cannot be paged, but count
/// towards the memory alarm). Shared by the queues; only the owning shard touches it.
#[derive(Debug, Clone, Default)]
pub struct MemoryMeter {
    ready: Rc<Cell<usize>>,
    unacked: Rc<Cell<usize>>,
}

impl MemoryMeter {
    /// Bytes of ready messages in memory.
    pub fn bytes(&self) -> usize {
        self.ready.get()
    }

    /// Bytes of delivered messages not acked yet.
    pub fn unacked_bytes(&self) -> usize {
        self.unacked.get()
    }

    fn add(&self, bytes: usize) {
        self.ready.set(self.ready.get() + bytes);
    }

    fn sub(&self, bytes: usize) {
        self.ready.set(self.ready.get().saturating_sub(bytes));
    }
}

pub type MessageId = u64;

/// A consumer, named by the connection that owns it and a number that connection chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsumerKey {
    pub shard: ShardId,
    pub connection: u64,
    pub consumer: u64,
}

/// A channel that holds unacked messages (through a consumer or basic.get).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    pub shard: ShardId,
    pub connection: u64,
    pub channel: u16,
}

/// How many more deliveries a consumer may receive before its connection grants more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credit {
    Limited(u32),
    Unlimited,
}

impl Credit {
    fn available(self) -> bool {
        !matches!(self, Credit::Limited(0))
    }

    fn take_one(&mut self) {
        if let Credit::Limited(n) = self {
            *n = n.saturating_sub(1);
        }
    }
}

#[derive(Debug, Clone)]
pub struct Consumer {
    pub key: ConsumerKey,
    pub channel: ChannelKey,
    pub no_ack: bool,
    pub exclusive: bool,
    pub credit: Credit,
    /// Credit comes from a pool its channel shares among consumers (basic.qos global): when
    /// the consumer runs out while messages wait, the queue asks for more (see `dispatch`).
    pub on_demand: bool,
    /// Asked for credit and not answered yet: ask once per starvation.
    pub asked: bool,
    /// x-priority: a consumer gets messages only while no consumer of a higher priority has
    /// credit for them.
    pub priority: i32,
}

/// A ready message, 32 bytes: its id with the redelivered and persistent flags packed into the
/// top bits (ids never reach 2^62), its place in the log (`len == 0`: not logged), and the slab
/// slot of its body (`PAGED`: not in memory).
#[derive(Debug, Clone)]
struct Ready {
    tagged_id: u64,
    location: Location,
    slot: u32,
}

const REDELIVERED_BIT: u64 = 1 << 63;
const PERSISTENT_BIT: u64 = 1 << 62;
const ID_MASK: u64 = PERSISTENT_BIT - 1;
const PAGED: u32 = u32::MAX;
/// A marker for a frozen run; its `location.offset` is the run's index in `Queue::frozen`.
const FROZEN: u32 = u32::MAX - 1;
/// Paged entries are packed this many at a time...
const RUN_MAX: usize = 4096;
/// ...and not at all below this many in a row (a run must be worth its marker).
const RUN_MIN: usize = 64;

fn tag(id: MessageId, redelivered: bool, persistent: bool) -> u64 {
    debug_assert!(id <= ID_MASK);
    id | if redelivered { REDELIVERED_BIT } else { 0 } | if persistent { PERSISTENT_BIT } else { 0 }
}
const NOT_LOGGED: Location = Location {
    segment: 0,
    len: 0,
    offset: 0,
};

impl Ready {
    fn id(&self) -> MessageId {
        self.tagged_id & ID_MASK
    }

    fn redelivered(&self) -> bool {
        self.tagged_id & REDELIVERED_BIT != 0
    }

    fn persistent(&self) -> bool {
        self.tagged_id & PERSISTENT_BIT != 0
    }

    /// Paged out: a plain paged entry or a frozen run's marker.
    fn is_paged(&self) -> bool {
        self.slot >= FROZEN
    }

    fn is_frozen(&self) -> bool {
        self.slot == FROZEN
    }

    fn run_index(&self) -> usize {
        self.location.offset as usize
    }

    fn paged_entry(&self) -> PagedEntry {
        PagedEntry {
            id: self.id(),
            redelivered: self.redelivered(),
            persistent: self.persistent(),
            location: self.location,
        }
    }

    fn from_paged(entry: PagedEntry) -> Ready {
        Ready {
            tagged_id: tag(entry.id, entry.redelivered, entry.persistent),
            location: entry.location,
            slot: PAGED,
        }
    }

    fn location(&self) -> Option<Location> {
        (self.location.len != 0).then_some(self.location)
    }
}

#[derive(Debug, Clone)]
struct Unacked {
    message: Message,
    holder: ChannelKey,
    location: Option<Location>,
}

/// A message still in the queue, as compaction needs it.
#[derive(Debug, Clone)]
pub struct Found<'a> {
    /// The body, unless it is paged out.
    pub message: Option<&'a Message>,
    pub location: Option<Location>,
    /// Delivered before (unacked now, or requeued).
    pub delivered: bool,
    /// delivery-mode 2.
    pub persistent: bool,
}

/// One message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub consumer: ConsumerKey,
    pub id: MessageId,
    pub message: Message,
    pub redelivered: bool,
    /// The message left the queue for good (a no-ack consumer).
    pub no_ack: bool,
    /// It has a record in the log (which a no-ack delivery settles).
    pub logged: bool,
}

/// A message taken by basic.get.
#[derive(Debug, Clone)]
pub struct Got {
    pub id: MessageId,
    pub message: Message,
    pub redelivered: bool,
    /// Ready messages left after this one.
    pub remaining: u32,
    /// It has a record in the log.
    pub logged: bool,
}

/// What the pager may take, in `Queue::pageable_runs`' order.
struct PageableRuns {
    back: Range<usize>,
    middle: Vec<Range<usize>>,
    front: Rev<Range<usize>>,
}

/// A message that left the queue without being delivered or acked: expired, dropped from the
/// head of a full queue, or rejected without requeue. Its owner may dead-letter it, and must
/// settle its record if it has one.
#[derive(Debug, Clone)]
pub struct Dropped {
    pub id: MessageId,
    pub message: Message,
    pub location: Option<Location>,
}

impl Dropped {
    /// (id, persistent) if it has a record in the log, as `ack` reports settled messages.
    pub fn logged(&self) -> Option<(MessageId, bool)> {
        self.location
            .map(|_| (self.id, self.message.is_persistent()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumeRefusal {
    /// An exclusive consumer holds the queue.
    ExclusiveConsumerPresent,
    /// An exclusive consume was asked for while consumers exist.
    ConsumersPresent,
}

#[derive(Debug, Default)]
pub struct Queue {
    ready: VecDeque<Ready>,
    /// Bodies of ready messages in memory, indexed by `Ready::slot`; `free` lists empty slots.
    slab: Vec<Option<Message>>,
    free: Vec<u32>,
    /// Bytes of the ready messages in memory (see `MemoryMeter`).
    memory_bytes: usize,
    /// Body bytes of the ready messages in memory, and record bytes of the paged ones (their
    /// bodies are not known until read back): what x-max-length-bytes limits.
    body_bytes: u64,
    paged_record_bytes: u64,
    paged_count: usize,
    /// Frozen runs, indexed by their markers; `frozen_free` lists empty places.
    frozen: Vec<Option<FrozenRun>>,
    frozen_free: Vec<usize>,
    /// Messages in frozen runs beyond one per marker.
    frozen_extra: usize,
    /// Paged entries `restore` appended since it last froze them.
    restored_unfrozen: usize,
    meter: MemoryMeter,
    unacked: IdMap<Unacked>,
    /// Bytes of the messages in `unacked` (see `MemoryMeter::unacked_bytes`).
    unacked_bytes: usize,
    consumers: Vec<Consumer>,
    /// Index in `consumers` to try first on the next dispatch (round-robin).
    cursor: usize,
    /// Only the first consumer receives messages (x-single-active-consumer); the next takes
    /// over when it leaves.
    single_active: bool,
    /// Some consumer has a priority other than 0 (x-priority): dispatch compares them.
    consumers_prioritized: bool,
    /// The sequence number of the next message (its id, in a queue without priorities).
    next_sequence: u64,
    /// Messages were published into priority lanes (`publish_in`), so in-memory messages may
    /// lie between paged ones.
    has_lanes: bool,
}

/// Ids of a priority queue's messages carry `255 - priority` above their sequence number, so
/// that id order is delivery order: higher priorities first, publish order within one. Ids
/// stay below 2^61, clear of `Ready`'s flag bits.
const LANE_SHIFT: u32 = 53;
const SEQUENCE_MASK: u64 = (1 << LANE_SHIFT) - 1;

/// The sequence number in an id (the id itself in a queue without priorities).
pub fn sequence_of(id: MessageId) -> u64 {
    id & SEQUENCE_MASK
}

fn id_in_lane(sequence: u64, priority: Option<u8>) -> MessageId {
    match priority {
        None => sequence,
        Some(priority) => u64::from(u8::MAX - priority) << LANE_SHIFT | sequence,
    }
}

impl Queue {
    pub fn new() -> Queue {
        Queue::default()
    }

    /// A queue whose in-memory bytes count towards `meter` (shared by a shard's queues).
    pub fn with_meter(meter: MemoryMeter) -> Queue {
        let mut queue = Queue::default();
        queue.meter = meter;
        queue
    }

    /// Delivers to one consumer at a time, the longest registered (RabbitMQ's single active
    /// consumer), instead of round-robin.
    pub fn set_single_active(&mut self, single_active: bool) {
        self.single_active = single_active;
    }

    /// The id the next published message gets (it is logged under that id before it is
    /// published), in a queue without priorities.
    pub fn next_id(&self) -> MessageId {
        self.next_sequence
    }

    /// The id the next message published in priority lane `lane` gets (a priority queue's
    /// every message has a lane: its priority, capped at the queue's x-max-priority).
    pub fn next_id_in(&self, lane: Option<u8>) -> MessageId {
        id_in_lane(self.next_sequence, lane)
    }

    /// Sequence numbers below `next` are never used again (recovery: the log still mentions
    /// ids with them).
    pub fn reserve_sequence_below(&mut self, next: u64) {
        self.next_sequence = self.next_sequence.max(next);
    }

    fn store(&mut self, message: Message) -> u32 {
        let bytes = message.size_bytes();
        self.memory_bytes += bytes;
        self.body_bytes += message.body().len() as u64;
        self.meter.add(bytes);
        match self.free.pop() {
            Some(slot) => {
                self.slab[slot as usize] = Some(message);
                slot
            }
            None => {
                self.slab.push(Some(message));
                u32::try_from(self.slab.len() - 1).unwrap_or(PAGED)
            }
        }
    }

    fn take(&mut self, slot: u32) -> Option<Message> {
        let message = self.slab.get_mut(slot as usize)?.take()?;
        let bytes = message.size_bytes();
        self.memory_bytes -= bytes;
        self.body_bytes -= message.body().len() as u64;
        self.meter.sub(bytes);
        if self.memory_bytes == 0 && self.slab.len() > 1024 {
            // Everything left is paged (or the queue is empty): give the slab back.
            debug_assert!(self.slab.iter().all(Option::is_none));
            self.slab = Vec::new();
            self.free = Vec::new();
        } else {
            self.free.push(slot);
        }
        Some(message)
    }

    /// Keeps a delivered message until it is settled.
    fn hold(&mut self, id: MessageId, unacked: Unacked) {
        let bytes = unacked.message.size_bytes();
        self.unacked_bytes += bytes;
        let total = &self.meter.unacked;
        total.set(total.get() + bytes);
        if let Some(replaced) = self.unacked.insert(id, unacked) {
            self.forget_unacked_bytes(replaced.message.size_bytes());
        }
    }

    /// Takes a delivered message back (settled or requeued).
    fn release(&mut self, id: MessageId) -> Option<Unacked> {
        let unacked = self.unacked.remove(id)?;
        self.forget_unacked_bytes(unacked.message.size_bytes());
        Some(unacked)
    }

    fn forget_unacked_bytes(&mut self, bytes: usize) {
        self.unacked_bytes -= bytes;
        let total = &self.meter.unacked;
        total.set(total.get().saturating_sub(bytes));
    }

    fn push_ready(&mut self, id: MessageId, message: Message, location: Option<Location>) {
        let persistent = message.is_persistent();
        let slot = self.store(message);
        self.ready.push_back(Ready {
            tagged_id: tag(id, false, persistent),
            location: location.unwrap_or(NOT_LOGGED),
            slot,
        });
    }

    /// Ready messages (the count declare-ok and get-ok report).
    pub fn message_count(&self) -> u32 {
        u32::try_from(self.ready.len() + self.frozen_extra).unwrap_or(u32::MAX)
    }

    /// Bytes the queue's ready entries take (its entry array and its frozen runs), bodies not
    /// counted.
    pub fn entry_bytes(&self) -> usize {
        self.ready.capacity() * std::mem::size_of::<Ready>()
            + self.frozen.capacity() * std::mem::size_of::<Option<FrozenRun>>()
            + self
                .frozen
                .iter()
                .flatten()
                .map(|run| run.size_bytes() - std::mem::size_of::<FrozenRun>())
                .sum::<usize>()
    }

    /// Bytes of ready messages held in memory (paged-out ones not counted).
    pub fn ready_bytes(&self) -> usize {
        self.memory_bytes
    }

    /// The size of the ready messages as x-max-length-bytes counts it: their bodies, or for
    /// paged-out ones the length of their record in the log.
    pub fn content_bytes(&self) -> u64 {
        self.body_bytes + self.paged_record_bytes
    }

    /// The first ready message, unless the queue is empty or it is paged out.
    pub fn front(&self) -> Option<(MessageId, &Message)> {
        let ready = self.ready.front().filter(|r| !r.is_paged())?;
        let message = self.slab.get(ready.slot as usize)?.as_ref()?;
        Some((ready.id(), message))
    }

    /// The id of the first ready message, paged out or not.
    pub fn front_id(&self) -> Option<MessageId> {
        self.ready.front().map(Ready::id)
    }

    /// Ready messages whose body is paged out.
    pub fn paged_count(&self) -> usize {
        self.paged_count
    }

    /// The first ready message is paged out: dispatch and get wait for it to be read back.
    pub fn front_is_paged(&self) -> bool {
        self.ready.front().is_some_and(Ready::is_paged)
    }

    /// Message `id` is delivered and not settled yet.
    pub fn holds_unacked(&self, id: MessageId) -> bool {
        self.unacked.contains_key(id)
    }

    pub fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    pub fn consumer_count(&self) -> u32 {
        u32::try_from(self.consumers.len()).unwrap_or(u32::MAX)
    }

    pub fn consumers(&self) -> &[Consumer] {
        &self.consumers
    }

    /// Appends a message; `location` is where its Enqueue record lies, if it was logged.
    pub fn publish(&mut self, message: Message, location: Option<Location>) -> MessageId {
        self.publish_in(None, message, location)
    }

    /// `publish` into a priority lane (`next_id_in`): ahead of every message of a lower one.
    pub fn publish_in(
        &mut self,
        lane: Option<u8>,
        message: Message,
        location: Option<Location>,
    ) -> MessageId {
        let id = self.next_id_in(lane);
        self.next_sequence += 1;
        self.has_lanes |= lane.is_some();
        if self.last_ready_id().is_none_or(|last| last < id) {
            self.push_ready(id, message, location);
        } else {
            self.insert_ready(id, message, location, false);
        }
        id
    }

    /// The highest ready id (a frozen run's last one if it ends the queue).
    fn last_ready_id(&self) -> Option<MessageId> {
        let last = self.ready.back()?;
        match last.is_frozen() {
            true => self.run_of(last).map(FrozenRun::last_id),
            false => Some(last.id()),
        }
    }

    pub fn add_consumer(&mut self, consumer: Consumer) -> Result<(), ConsumeRefusal> {
        if self.consumers.iter().any(|c| c.exclusive) {
            return Err(ConsumeRefusal::ExclusiveConsumerPresent);
        }
        if consumer.exclusive && !self.consumers.is_empty() {
            return Err(ConsumeRefusal::ConsumersPresent);
        }
        debug_assert!(self.consumers.iter().all(|c| c.key != consumer.key));
        self.consumers_prioritized |= consumer.priority != 0;
        self.consumers.push(consumer);
        Ok(())
    }

    /// Removes a consumer; its unacked messages stay unacked (the channel still holds them).
    pub fn remove_consumer(&mut self, key: ConsumerKey) -> bool {
        let Some(index) = self.consumers.iter().position(|c| c.key == key) else {
            return false;
        };
        self.consumers.remove(index);
        if self.cursor > index {
            self.cursor -= 1;
        }
        true
    }

    /// Removes every consumer `channel` owns; returns their keys.
    pub fn remove_consumers_of(&mut self, channel: ChannelKey) -> Vec<ConsumerKey> {
        let keys: Vec<ConsumerKey> = self
            .consumers
            .iter()
            .filter(|c| c.channel == channel)
            .map(|c| c.key)
            .collect();
        for key in &keys {
            self.remove_consumer(*key);
        }
        keys
    }

    /// Adds credit to a consumer. Unknown consumers (already cancelled) are ignored.
    pub fn grant_credit(&mut self, key: ConsumerKey, amount: u32) {
        if let Some(consumer) = self.consumers.iter_mut().find(|c| c.key == key) {
            if let Credit::Limited(n) = &mut consumer.credit {
                *n = n.saturating_add(amount);
            }
            consumer.asked = false;
        }
    }

    /// On-demand consumers that ran out of credit while messages are ready, each reported once
    /// until credit is granted again: (consumer, ready messages).
    pub fn credit_wanted(&mut self, out: &mut Vec<(ConsumerKey, u32)>) {
        if self.ready.is_empty() {
            return;
        }
        let ready = self.message_count();
        for consumer in &mut self.consumers {
            if consumer.on_demand && !consumer.credit.available() && !consumer.asked {
                consumer.asked = true;
                out.push((consumer.key, ready));
            }
        }
    }

    /// Hands ready messages to consumers round-robin, as far as their credit goes and up to the
    /// first paged-out message.
    pub fn dispatch(&mut self, out: &mut Vec<Delivery>) {
        self.dispatch_expiring(out, |_, _| false, &mut Vec::new());
    }

    /// `dispatch`, except that each message `expired` names when it reaches the front is taken
    /// off into `dropped` instead of being delivered (TTL: messages expire at the head).
    pub fn dispatch_expiring(
        &mut self,
        out: &mut Vec<Delivery>,
        mut expired: impl FnMut(MessageId, &Message) -> bool,
        dropped: &mut Vec<Dropped>,
    ) {
        while !self.consumers.is_empty() {
            self.drop_front_while(&mut expired, dropped, usize::MAX);
            if self.ready.is_empty() || self.front_is_paged() {
                return;
            }
            let Some(index) = self.next_consumer() else {
                return;
            };
            let Some((ready, message)) = self.pop_front() else {
                return;
            };
            let consumer = &mut self.consumers[index];
            consumer.credit.take_one();
            let (key, no_ack, holder) = (consumer.key, consumer.no_ack, consumer.channel);
            if !no_ack {
                self.hold(
                    ready.id(),
                    Unacked {
                        message: message.clone(),
                        holder,
                        location: ready.location(),
                    },
                );
            }
            out.push(Delivery {
                consumer: key,
                id: ready.id(),
                redelivered: ready.redelivered(),
                no_ack,
                logged: ready.location.len != 0,
                message,
            });
        }
    }

    /// The consumer to hand the next message to: round-robin among those with credit of the
    /// highest priority present, from the cursor on; with a single active consumer, the
    /// oldest or none.
    fn next_consumer(&mut self) -> Option<usize> {
        let count = if self.single_active {
            self.cursor = 0;
            1
        } else {
            self.consumers.len()
        };
        let with_credit = |offset: &usize| {
            let consumer = &self.consumers[(self.cursor + offset) % count];
            consumer.credit.available().then_some(consumer.priority)
        };
        let offset = if self.consumers_prioritized {
            let top = (0..count).filter_map(|o| with_credit(&o)).max()?;
            (0..count).find(|o| with_credit(o) == Some(top))?
        } else {
            (0..count).find(|o| with_credit(o).is_some())?
        };
        let index = (self.cursor + offset) % count;
        self.cursor = (index + 1) % count;
        Some(index)
    }

    /// Takes messages off the front while they are in memory and `drop` says so, at most
    /// `limit` of them, into `dropped`; returns how many.
    pub fn drop_front_while(
        &mut self,
        mut drop: impl FnMut(MessageId, &Message) -> bool,
        dropped: &mut Vec<Dropped>,
        limit: usize,
    ) -> usize {
        let mut count = 0;
        while count < limit && self.front().is_some_and(|(id, message)| drop(id, message)) {
            let Some((ready, message)) = self.pop_front() else {
                break;
            };
            dropped.push(Dropped {
                id: ready.id(),
                message,
                location: ready.location(),
            });
            count += 1;
        }
        count
    }

    /// The first ready message with its body, unless it is paged out.
    fn pop_front(&mut self) -> Option<(Ready, Message)> {
        if self.front_is_paged() {
            return None;
        }
        let ready = self.ready.pop_front()?;
        let message = self.take(ready.slot)?;
        Some((ready, message))
    }

    /// basic.get: the first ready message, if any. None also when it is paged out (check
    /// `front_is_paged` first).
    pub fn get(&mut self, holder: ChannelKey, no_ack: bool) -> Option<Got> {
        let (ready, message) = self.pop_front()?;
        if !no_ack {
            self.hold(
                ready.id(),
                Unacked {
                    message: message.clone(),
                    holder,
                    location: ready.location(),
                },
            );
        }
        Some(Got {
            id: ready.id(),
            redelivered: ready.redelivered(),
            message,
            remaining: self.message_count(),
            logged: ready.location.len != 0,
        })
    }

    /// Settles delivered messages for good; returns how many were unacked. Those with a record
    /// in the log are added to `logged` as (id, persistent): their records must be settled.
    pub fn ack(&mut self, ids: &[MessageId], logged: &mut impl Extend<(MessageId, bool)>) -> usize {
        let mut settled = 0;
        for id in ids {
            if let Some(unacked) = self.release(*id) {
                settled += 1;
                if unacked.location.is_some() {
                    logged.extend([(*id, unacked.message.is_persistent())]);
                }
            }
        }
        settled
    }

    /// Takes delivered messages back for good without an ack (reject or nack without requeue),
    /// into `dropped`; returns how many were unacked.
    pub fn reject(&mut self, ids: &[MessageId], dropped: &mut Vec<Dropped>) -> usize {
        let before = dropped.len();
        for id in ids {
            if let Some(unacked) = self.release(*id) {
                dropped.push(Dropped {
                    id: *id,
                    message: unacked.message,
                    location: unacked.location,
                });
            }
        }
        dropped.len() - before
    }

    /// Puts a message recovered from the log back, paged out, in id order, before the queue
    /// serves.
    pub fn restore(&mut self, id: MessageId, location: Location, redelivered: bool) {
        debug_assert!(self.ready.back().is_none_or(|last| last.id() < id));
        debug_assert!(location.len != 0);
        self.next_sequence = self.next_sequence.max(sequence_of(id) + 1);
        self.has_lanes |= id > SEQUENCE_MASK;
        self.paged_count += 1;
        self.paged_record_bytes += u64::from(location.len);
        self.ready.push_back(Ready {
            tagged_id: tag(id, redelivered, true),
            location,
            slot: PAGED,
        });
        self.restored_unfrozen += 1;
        if self.restored_unfrozen >= RUN_MAX {
            self.freeze_from(self.ready.len() - self.restored_unfrozen);
            self.restored_unfrozen = 0;
        }
    }

    /// Room for `additional` more ready messages (recovery knows how many come), which
    /// `restore` packs into runs as they arrive.
    pub fn reserve(&mut self, additional: usize) {
        self.ready
            .reserve_exact(additional.min(RUN_MAX) + additional / RUN_MAX);
    }

    /// Packs the plain paged entries from `start` on into frozen runs, as long as at least
    /// `RUN_MAX` of them follow in a row.
    fn freeze_from(&mut self, mut start: usize) {
        loop {
            let in_a_row = self
                .ready
                .range(start.min(self.ready.len())..)
                .take(RUN_MAX)
                .take_while(|r| r.slot == PAGED)
                .count();
            if in_a_row < RUN_MAX {
                // The entry array grew while the backlog was in memory: give most of it back.
                let len = self.ready.len();
                if self.ready.capacity() > 4 * len.max(RUN_MAX) {
                    self.ready.shrink_to(2 * len.max(RUN_MAX));
                }
                return;
            }
            let entries = self
                .ready
                .range(start..start + RUN_MAX)
                .map(Ready::paged_entry);
            let Some(run) = FrozenRun::pack(entries, RUN_MAX) else {
                start += 1;
                continue;
            };
            let taken = run.len();
            if taken < RUN_MIN {
                // A segment ends or the records go back: leave these as they are.
                start += taken;
                continue;
            }
            let index = match self.frozen_free.pop() {
                Some(index) => {
                    self.frozen[index] = Some(run);
                    index
                }
                None => {
                    self.frozen.push(Some(run));
                    self.frozen.len() - 1
                }
            };
            let first = self.ready[start].id();
            self.ready.drain(start + 1..start + taken);
            self.ready[start] = Ready {
                tagged_id: first,
                location: Location {
                    segment: 0,
                    len: 0,
                    offset: index as u64,
                },
                slot: FROZEN,
            };
            self.frozen_extra += taken - 1;
            start += 1;
        }
    }

    /// Unpacks the frozen run whose marker is at `position` back into plain paged entries,
    /// moving whichever side of the deque is shorter.
    fn thaw_at(&mut self, position: usize) {
        let marker = &self.ready[position];
        debug_assert!(marker.is_frozen());
        let index = marker.run_index();
        let Some(run) = self.frozen.get_mut(index).and_then(Option::take) else {
            return;
        };
        self.frozen_free.push(index);
        self.frozen_extra -= run.len() - 1;
        let entries = run.entries().map(Ready::from_paged);
        if position <= self.ready.len() / 2 {
            let before: Vec<Ready> = self.ready.drain(..position).collect();
            self.ready.pop_front();
            let thawed: Vec<Ready> = entries.collect();
            for ready in thawed.into_iter().rev().chain(before.into_iter().rev()) {
                self.ready.push_front(ready);
            }
        } else {
            let after: Vec<Ready> = self.ready.drain(position + 1..).collect();
            self.ready.pop_back();
            self.ready.extend(entries);
            self.ready.extend(after);
        }
        if self.frozen.iter().all(Option::is_none) {
            self.frozen = Vec::new();
            self.frozen_free = Vec::new();
        }
    }

    /// Packs every stretch of at least `RUN_MAX` plain paged entries (after compaction moved
    /// the records of unpacked runs).
    pub fn freeze_paged(&mut self) {
        let mut starts = Vec::new();
        let mut position = 0;
        while position < self.ready.len() {
            let in_a_row = self
                .ready
                .range(position..)
                .take_while(|r| r.slot == PAGED)
                .count();
            if in_a_row >= RUN_MAX {
                starts.push(position);
            }
            position += in_a_row.max(1);
        }
        // From the back, so that packing one stretch does not move the next one's start.
        for start in starts.into_iter().rev() {
            self.freeze_from(start);
        }
    }

    /// The position of the frozen run's marker whose ids span `id`, if any.
    fn frozen_position(&self, id: MessageId) -> Option<usize> {
        if self.frozen.is_empty() {
            return None;
        }
        let after = self.ready.partition_point(|r| r.id() <= id);
        let position = after.checked_sub(1)?;
        let marker = &self.ready[position];
        let run = self.frozen.get(marker.run_index())?.as_ref()?;
        (marker.is_frozen() && run.last_id() >= id).then_some(position)
    }

    /// Unpacks the run that may hold `id`, so that it can be found as a plain entry.
    fn thaw_for(&mut self, id: MessageId) {
        if let Some(position) = self.frozen_position(id) {
            self.thaw_at(position);
        }
    }

    fn run_of(&self, marker: &Ready) -> Option<&FrozenRun> {
        self.frozen.get(marker.run_index())?.as_ref()
    }

    /// Paged-out messages among the first `window` ready ones, in order, up to `bytes_max` of
    /// records (at least one): what to read back next.
    pub fn paged_window(&self, window: usize, bytes_max: u64) -> Vec<(MessageId, Location)> {
        let mut out = Vec::new();
        if self.paged_count == 0 {
            return out;
        }
        let mut bytes = 0u64;
        let mut seen = 0;
        let mut take = |id: MessageId, location: Location| {
            bytes += u64::from(location.len);
            if bytes > bytes_max && !out.is_empty() {
                return false;
            }
            out.push((id, location));
            true
        };
        for ready in &self.ready {
            if ready.is_frozen() {
                let Some(run) = self.run_of(ready) else {
                    continue;
                };
                for entry in run.entries() {
                    if seen >= window || !take(entry.id, entry.location) {
                        return out;
                    }
                    seen += 1;
                }
                continue;
            }
            if seen >= window {
                break;
            }
            seen += 1;
            if ready.is_paged() && !take(ready.id(), ready.location) {
                break;
            }
        }
        out
    }

    fn ready_position(&self, id: MessageId) -> Option<usize> {
        // Ids are dense wherever nothing left out of order (the front of a paged backlog, which
        // is read back and looked up id by id): look where a dense run would put `id` before
        // bisecting the whole deque, whose every step misses the cache when it is long.
        let front = self.ready.front()?.id();
        let offset = id.checked_sub(front)?;
        let plain = |r: &Ready| r.id() == id && !r.is_frozen();
        if let Some(guess) = usize::try_from(offset)
            .ok()
            .filter(|&g| self.ready.get(g).is_some_and(plain))
        {
            return Some(guess);
        }
        let position = self.ready.partition_point(|r| r.id() < id);
        self.ready
            .get(position)
            .is_some_and(plain)
            .then_some(position)
    }

    /// Puts a paged-out message's body back (read from the log). False if the message is no
    /// longer ready or no longer paged out.
    pub fn fill(&mut self, id: MessageId, message: Message) -> bool {
        self.thaw_for(id);
        let Some(position) = self.ready_position(id) else {
            return false;
        };
        if !self.ready[position].is_paged() {
            return false;
        }
        let slot = self.store(message);
        self.ready[position].slot = slot;
        self.paged_count -= 1;
        self.paged_record_bytes -= u64::from(self.ready[position].location.len);
        true
    }

    /// Drops a paged-out message whose record could not be read back; Some(persistent) if it
    /// was there.
    pub fn drop_unreadable(&mut self, id: MessageId) -> Option<bool> {
        self.thaw_for(id);
        let position = self.ready_position(id)?;
        if !self.ready[position].is_paged() {
            return None;
        }
        let ready = self.ready.remove(position)?;
        self.paged_count -= 1;
        self.paged_record_bytes -= u64::from(ready.location.len);
        Some(ready.persistent())
    }

    /// The runs of in-memory ready messages the pager may take, each in the order it takes
    /// them: the run at the back (after the last paged message; delivered last) from its
    /// oldest message, and the run after the first `keep` at the front (messages requeued
    /// there, or read back for consumers that left) from its newest. Each run ends at a paged
    /// message, so the scan is bounded by what is in memory, not by the queue's length; and each
    /// is taken from that paged side, so what stays in memory stays at the run's far end. Taken
    /// the other way, a run cut short (by the bytes wanted, or at a record not yet durable)
    /// would leave messages between paged ones, which no scan reaches until the queue does: the
    /// pager then could not bring memory down (a test publishing transient messages under a
    /// 1 MiB budget stalled its publisher for a second at a time).
    ///
    /// A priority queue also gets new messages in the middle (at the end of their lane, ahead
    /// of lower lanes already paged): there every run between paged messages is taken too, the
    /// lowest lane's first, each from its start (after a paged message). That scan is as long
    /// as the entries between the front and back runs (a frozen run counts one).
    fn pageable_runs(&self, keep: usize) -> PageableRuns {
        let len = self.ready.len();
        let mut back = len;
        while back > keep && !self.ready[back - 1].is_paged() {
            back -= 1;
        }
        let mut front = keep;
        while front < back && !self.ready[front].is_paged() {
            front += 1;
        }
        let mut middle = Vec::new();
        if self.has_lanes {
            let mut position = front;
            while position < back {
                if self.ready[position].is_paged() {
                    position += 1;
                    continue;
                }
                let start = position;
                while position < back && !self.ready[position].is_paged() {
                    position += 1;
                }
                middle.push(start..position);
            }
            middle.reverse();
        }
        PageableRuns {
            back: back..len,
            middle,
            front: (keep.min(front)..front).rev(),
        }
    }

    /// In-memory ready messages with no record in the log, up to `bytes`, keeping the first
    /// `keep`, in the order `pageable_runs` gives: what to write out before paging them.
    /// Returned in queue order, so that written one after the other their records lie in the
    /// log in the order they will be read back (page-in reads contiguous records in one go).
    pub fn unlogged_from_back(&self, bytes: usize, keep: usize) -> Vec<(MessageId, &Message)> {
        let mut out = Vec::new();
        let mut total = 0;
        let runs = self.pageable_runs(keep);
        let middle = runs.middle.iter().flat_map(Range::clone);
        for position in runs.back.chain(middle).chain(runs.front) {
            if total >= bytes {
                break;
            }
            let ready = &self.ready[position];
            if ready.location.len != 0 {
                continue;
            }
            if let Some(message) = self.slab.get(ready.slot as usize).and_then(Option::as_ref) {
                total += message.size_bytes();
                out.push((ready.id(), message));
            }
        }
        out.sort_unstable_by_key(|(id, _)| *id);
        out
    }

    /// Pages out logged messages until `bytes` are freed, keeping the first `keep` ready
    /// messages, in the order of `pageable_runs`; each run stops at its first message whose
    /// record is missing or not durable yet (`durable`). Returns the bytes freed.
    pub fn page_out(
        &mut self,
        bytes: usize,
        keep: usize,
        durable: impl Fn(&Location) -> bool,
    ) -> usize {
        let runs = self.pageable_runs(keep);
        let back_start = runs.back.start;
        let mut freed = self.page_run(runs.back, bytes, &durable);
        for run in runs.middle {
            freed += self.page_run(run, bytes.saturating_sub(freed), &durable);
        }
        freed += self.page_run(runs.front, bytes.saturating_sub(freed), &durable);
        // The entries just paged at the back join the paged stretch before them (whose plain
        // tail is shorter than a run, or it would have been frozen).
        let mut start = back_start;
        while start > 0 && back_start - start < RUN_MAX && self.ready[start - 1].slot == PAGED {
            start -= 1;
        }
        self.freeze_from(start);
        freed
    }

    fn page_run(
        &mut self,
        positions: impl Iterator<Item = usize>,
        bytes: usize,
        durable: &impl Fn(&Location) -> bool,
    ) -> usize {
        let mut freed = 0;
        for position in positions {
            if freed >= bytes {
                break;
            }
            let ready = &self.ready[position];
            if ready.location.len == 0 || !durable(&ready.location) {
                break;
            }
            let (slot, record_bytes) = (ready.slot, u64::from(ready.location.len));
            if let Some(message) = self.take(slot) {
                freed += message.size_bytes();
            }
            self.ready[position].slot = PAGED;
            self.paged_count += 1;
            self.paged_record_bytes += record_bytes;
        }
        freed
    }

    /// A message was logged again elsewhere (compaction): remember its new place.
    pub fn relocate(&mut self, id: MessageId, location: Location) -> bool {
        if let Some(unacked) = self.unacked.get_mut(id) {
            unacked.location = Some(location);
            return true;
        }
        self.thaw_for(id);
        match self.ready_position(id) {
            Some(position) => {
                let ready = &mut self.ready[position];
                if ready.is_paged() {
                    self.paged_record_bytes -= u64::from(ready.location.len);
                    self.paged_record_bytes += u64::from(location.len);
                }
                ready.location = location;
                true
            }
            None => false,
        }
    }

    /// Persistent messages that were delivered before and are still here, ready or unacked (a
    /// clean shutdown logs their marks).
    pub fn delivered_persistent_ids(&self) -> Vec<MessageId> {
        let mut ids: Vec<MessageId> = self
            .unacked
            .iter()
            .filter(|(_, u)| u.message.is_persistent())
            .map(|(id, _)| id)
            .collect();
        for ready in &self.ready {
            if ready.is_frozen() {
                let entries = self.run_of(ready).into_iter().flat_map(FrozenRun::entries);
                ids.extend(
                    entries
                        .filter(|e| e.redelivered && e.persistent)
                        .map(|e| e.id),
                );
            } else if ready.redelivered() && ready.persistent() {
                ids.push(ready.id());
            }
        }
        ids.sort_unstable();
        ids
    }

    /// Puts delivered messages back where they were, marked redelivered.
    pub fn requeue(&mut self, ids: &[MessageId]) -> usize {
        let mut requeued = 0;
        for id in ids {
            if let Some(unacked) = self.release(*id) {
                self.insert_ready(*id, unacked.message, unacked.location, true);
                requeued += 1;
            }
        }
        requeued
    }

    /// Requeues everything `channel` holds (the channel closed without settling).
    pub fn requeue_all_of(&mut self, channel: ChannelKey) -> usize {
        let mut ids: Vec<MessageId> = self
            .unacked
            .iter()
            .filter(|(_, u)| u.holder == channel)
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        self.requeue(&ids)
    }

    /// Puts a message in the middle of the queue, at its id's place (a requeue, or a message of
    /// a higher priority lane than the last).
    fn insert_ready(
        &mut self,
        id: MessageId,
        message: Message,
        location: Option<Location>,
        redelivered: bool,
    ) {
        self.thaw_for(id);
        let position = self.ready.partition_point(|r| r.id() < id);
        let persistent = message.is_persistent();
        let slot = self.store(message);
        self.ready.insert(
            position,
            Ready {
                tagged_id: tag(id, redelivered, persistent),
                location: location.unwrap_or(NOT_LOGGED),
                slot,
            },
        );
    }

    /// A message still in the queue, ready or delivered. A packed one is unpacked (compaction
    /// asks, to move its record).
    pub fn find(&mut self, id: MessageId) -> Option<Found<'_>> {
        if self.unacked.contains_key(id) {
            let unacked = self.unacked.get(id)?;
            return Some(Found {
                message: Some(&unacked.message),
                location: unacked.location,
                delivered: true,
                persistent: unacked.message.is_persistent(),
            });
        }
        self.thaw_for(id);
        let ready = &self.ready[self.ready_position(id)?];
        Some(Found {
            message: self.slab.get(ready.slot as usize).and_then(Option::as_ref),
            location: ready.location(),
            delivered: ready.redelivered(),
            persistent: ready.persistent(),
        })
    }

    /// Drops every ready message; returns how many. Those with a record in the log are added
    /// to `logged` as (id, persistent).
    pub fn purge(&mut self, logged: &mut Vec<(MessageId, bool)>) -> u32 {
        let count = self.message_count();
        for ready in &self.ready {
            if ready.is_frozen() {
                let entries = self.run_of(ready).into_iter().flat_map(FrozenRun::entries);
                logged.extend(entries.map(|e| (e.id, e.persistent)));
            } else if ready.location.len != 0 {
                logged.push((ready.id(), ready.persistent()));
            }
        }
        self.ready.clear();
        self.frozen = Vec::new();
        self.frozen_free = Vec::new();
        self.frozen_extra = 0;
        self.restored_unfrozen = 0;
        self.slab = Vec::new();
        self.free = Vec::new();
        self.meter.sub(self.memory_bytes);
        self.memory_bytes = 0;
        self.body_bytes = 0;
        self.paged_record_bytes = 0;
        self.paged_count = 0;
        count
    }

    /// Panics if an invariant is broken. For tests and debug builds.
    pub fn check_invariants(&self) {
        let mut previous = None;
        let mut bytes = 0;
        let mut body_bytes = 0;
        let mut record_bytes = 0;
        let mut paged = 0;
        let mut in_memory = 0;
        let mut runs = 0;
        let mut extra = 0;
        for ready in &self.ready {
            if ready.is_frozen() {
                let run = self.run_of(ready).expect("a marker's run is there");
                assert_eq!(
                    run.first_id(),
                    ready.id(),
                    "a marker names its run's first id"
                );
                for entry in run.entries() {
                    assert!(previous < Some(entry.id), "a run out of order");
                    assert!(
                        !self.unacked.contains_key(entry.id),
                        "id both frozen and unacked"
                    );
                    assert!(entry.location.len != 0, "a frozen message without a record");
                    record_bytes += u64::from(entry.location.len);
                    previous = Some(entry.id);
                }
                assert_eq!(previous, Some(run.last_id()), "a run's last id");
                paged += run.len();
                extra += run.len() - 1;
                runs += 1;
                continue;
            }
            assert!(previous < Some(ready.id()), "ready out of order");
            assert!(
                !self.unacked.contains_key(ready.id()),
                "id both ready and unacked"
            );
            previous = Some(ready.id());
            if ready.is_paged() {
                assert!(
                    ready.location.len != 0,
                    "a paged message without a location"
                );
                record_bytes += u64::from(ready.location.len);
                paged += 1;
            } else {
                let message = self.slab[ready.slot as usize]
                    .as_ref()
                    .expect("a ready slot holds its body");
                bytes += message.size_bytes();
                body_bytes += message.body().len() as u64;
                in_memory += 1;
            }
        }
        assert_eq!(bytes, self.memory_bytes, "memory_bytes drifted");
        assert_eq!(body_bytes, self.body_bytes, "body_bytes drifted");
        assert_eq!(
            record_bytes, self.paged_record_bytes,
            "paged_record_bytes drifted"
        );
        let held: usize = self.unacked.values().map(|u| u.message.size_bytes()).sum();
        assert_eq!(held, self.unacked_bytes, "unacked_bytes drifted");
        assert_eq!(paged, self.paged_count, "paged_count drifted");
        assert_eq!(extra, self.frozen_extra, "frozen_extra drifted");
        assert_eq!(
            runs,
            self.frozen.iter().flatten().count(),
            "a run without a marker"
        );
        assert_eq!(
            in_memory,
            self.slab.iter().filter(|s| s.is_some()).count(),
            "slab holds bodies of messages no longer ready"
        );
        for (i, a) in self.consumers.iter().enumerate() {
            assert!(self.consumers[i + 1..].iter().all(|b| b.key != a.key));
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // A deleted queue's messages no longer count against the shard's budget.
        self.meter.sub(self.memory_bytes);
        let unacked = self.unacked_bytes;
        self.forget_unacked_bytes(unacked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(body: &str) -> Message {
        Message::new(b"", b"q", &[0, 0], Bytes::from(body.to_string()), false)
    }

    const CHANNEL: ChannelKey = ChannelKey {
        shard: ShardId(1),
        connection: 7,
        channel: 1,
    };

    fn consumer(n: u64, credit: Credit) -> Consumer {
        Consumer {
            key: ConsumerKey {
                shard: ShardId(1),
                connection: 7,
                consumer: n,
            },
            channel: CHANNEL,
            no_ack: false,
            exclusive: false,
            credit,
            on_demand: false,
            asked: false,
            priority: 0,
        }
    }

    fn bodies(deliveries: &[Delivery]) -> Vec<String> {
        deliveries
            .iter()
            .map(|d| String::from_utf8_lossy(d.message.body()).into_owned())
            .collect()
    }

    #[test]
    fn expired_messages_leave_the_head_instead_of_being_delivered() {
        let mut queue = Queue::new();
        for body in ["old", "old", "fresh", "old"] {
            queue.publish(message(body), None);
        }
        let expired = |_: MessageId, m: &Message| m.body().as_ref() == b"old";
        let mut dropped = Vec::new();
        let mut out = Vec::new();
        // No consumer: nothing is looked at.
        queue.dispatch_expiring(&mut out, expired, &mut dropped);
        assert!(dropped.is_empty());
        queue.add_consumer(consumer(1, Credit::Unlimited)).unwrap();
        queue.dispatch_expiring(&mut out, expired, &mut dropped);
        // The head's two go; the one behind "fresh" waits its turn at the head, then goes too.
        assert_eq!(bodies(&out), ["fresh"]);
        let ids: Vec<MessageId> = dropped.iter().map(|d| d.id).collect();
        assert_eq!(ids, [0, 1, 3]);
        assert_eq!(queue.message_count(), 0);
        assert_eq!(queue.unacked_count(), 1);
        queue.check_invariants();
    }

    #[test]
    fn a_single_active_consumer_takes_everything_until_it_leaves() {
        let mut queue = Queue::new();
        queue.set_single_active(true);
        queue.add_consumer(consumer(1, Credit::Limited(2))).unwrap();
        queue.add_consumer(consumer(2, Credit::Unlimited)).unwrap();
        for body in ["a", "b", "c"] {
            queue.publish(message(body), None);
        }
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        // The first consumer's credit runs out; the second still waits.
        assert_eq!(bodies(&out), ["a", "b"]);
        assert!(out.iter().all(|d| d.consumer.consumer == 1));
        queue.remove_consumer(consumer(1, Credit::Unlimited).key);
        out.clear();
        queue.dispatch(&mut out);
        assert_eq!(bodies(&out), ["c"]);
        assert_eq!(out[0].consumer.consumer, 2);
        queue.check_invariants();
    }

    #[test]
    fn priority_lanes_go_out_highest_first_and_in_order_within_one() {
        let mut queue = Queue::new();
        for (lane, body) in [
            (0, "low-1"),
            (5, "mid-1"),
            (9, "high"),
            (0, "low-2"),
            (5, "mid-2"),
        ] {
            let expected = queue.next_id_in(Some(lane));
            assert_eq!(queue.publish_in(Some(lane), message(body), None), expected);
        }
        queue.check_invariants();
        let first = queue.get(CHANNEL, false).unwrap();
        assert_eq!(first.message.body().as_ref(), b"high");
        // Requeued, it goes back ahead of everything again.
        queue.requeue(&[first.id]);
        queue.check_invariants();
        queue.add_consumer(consumer(1, Credit::Unlimited)).unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        assert_eq!(bodies(&out), ["high", "mid-1", "mid-2", "low-1", "low-2"]);
        assert!(out[0].redelivered);
        // Ids stay unique across lanes and clear of the flag bits.
        assert!(out.iter().all(|d| d.id <= ID_MASK));
        assert_eq!(sequence_of(out[0].id), 2);
    }

    #[test]
    fn messages_between_paged_lanes_can_be_paged_too() {
        let mut queue = Queue::new();
        let at = |n: u64| Location {
            segment: 1,
            len: 10,
            offset: n * 10,
        };
        for (n, lane) in [(0, 4), (1, 4), (2, 0), (3, 0)] {
            queue.publish_in(Some(lane), message("paged"), Some(at(n)));
        }
        queue.page_out(usize::MAX, 0, |_| true);
        assert_eq!(queue.paged_count(), 4);
        // A lane-3 message lands between the paged lanes 4 and 0: not at either end.
        let middle = queue.publish_in(Some(3), message("middle"), Some(at(4)));
        assert!(queue.page_out(usize::MAX, 0, |_| true) > 0);
        assert_eq!(queue.paged_count(), 5);
        let order: Vec<MessageId> = queue
            .paged_window(10, u64::MAX)
            .iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(order[2], middle);
        queue.check_invariants();
    }

    #[test]
    fn restored_lanes_keep_their_order_and_new_ids_follow_every_sequence() {
        let mut queue = Queue::new();
        let at = |n: u64| Location {
            segment: 1,
            len: 10,
            offset: n * 10,
        };
        // Recovery restores in id order: the higher lane's (sequence 7) before the lower's.
        let high = id_in_lane(7, Some(3));
        let low = id_in_lane(2, Some(0));
        assert!(high < low);
        queue.restore(high, at(7), false);
        queue.restore(low, at(2), false);
        assert_eq!(queue.next_id_in(Some(3)), id_in_lane(8, Some(3)));
        queue.reserve_sequence_below(20);
        let id = queue.publish_in(Some(3), message("new"), None);
        assert_eq!(sequence_of(id), 20);
        let order: Vec<MessageId> = queue
            .paged_window(10, u64::MAX)
            .iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(
            order,
            [high, low],
            "the new one waits in memory between them"
        );
        queue.check_invariants();
    }

    #[test]
    fn higher_priority_consumers_go_first_while_they_have_credit() {
        let mut queue = Queue::new();
        let with_priority = |n: u64, credit: Credit, priority: i32| Consumer {
            priority,
            ..consumer(n, credit)
        };
        queue
            .add_consumer(with_priority(1, Credit::Unlimited, 0))
            .unwrap();
        queue
            .add_consumer(with_priority(2, Credit::Limited(2), 5))
            .unwrap();
        queue
            .add_consumer(with_priority(3, Credit::Limited(2), 5))
            .unwrap();
        for body in ["a", "b", "c", "d", "e", "f"] {
            queue.publish(message(body), None);
        }
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        let to: Vec<u64> = out.iter().map(|d| d.consumer.consumer).collect();
        // Round-robin between the two of priority 5, then the rest to the one left.
        assert_eq!(to, [2, 3, 2, 3, 1, 1]);
    }

    #[test]
    fn the_head_is_dropped_a_message_at_a_time_and_rejects_hand_messages_back() {
        let mut queue = Queue::new();
        for body in ["a", "b", "c"] {
            queue.publish(message(body), None);
        }
        let mut dropped = Vec::new();
        assert_eq!(queue.drop_front_while(|_, _| true, &mut dropped, 1), 1);
        assert_eq!(dropped[0].message.body().as_ref(), b"a");
        assert_eq!(dropped[0].logged(), None, "no record, nothing to settle");
        let got = queue.get(CHANNEL, false).unwrap();
        let mut rejected = Vec::new();
        assert_eq!(queue.reject(&[got.id, 99], &mut rejected), 1);
        assert_eq!(rejected[0].message.body().as_ref(), b"b");
        assert_eq!(queue.unacked_count(), 0);
        assert_eq!(queue.message_count(), 1);
        queue.check_invariants();
    }

    #[test]
    fn content_bytes_count_bodies_and_paged_records() {
        let mut queue = Queue::new();
        let at = |n: u64| Location {
            segment: 1,
            len: 100,
            offset: n * 100,
        };
        queue.publish(message("12345"), Some(at(0)));
        queue.publish(message("123"), Some(at(1)));
        assert_eq!(queue.content_bytes(), 8);
        queue.page_out(usize::MAX, 0, |_| true);
        assert_eq!(queue.content_bytes(), 200, "paged: their records' length");
        queue.check_invariants();
        assert!(queue.fill(0, message("12345")));
        assert_eq!(queue.content_bytes(), 105);
        let mut dropped = Vec::new();
        queue.drop_front_while(|_, _| true, &mut dropped, usize::MAX);
        assert_eq!(dropped.len(), 1, "stops at the paged message");
        assert_eq!(dropped[0].logged(), Some((0, false)));
        assert_eq!(queue.content_bytes(), 100);
        queue.purge(&mut Vec::new());
        assert_eq!(queue.content_bytes(), 0);
        queue.check_invariants();
    }

    #[test]
    fn round_robin_within_credit() {
        let mut queue = Queue::new();
        for i in 0..5 {
            queue.publish(message(&i.to_string()), None);
        }
        queue.add_consumer(consumer(1, Credit::Limited(1))).unwrap();
        queue
            .add_consumer(consumer(2, Credit::Limited(10)))
            .unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        let to: Vec<u64> = out.iter().map(|d| d.consumer.consumer).collect();
        assert_eq!(to, vec![1, 2, 2, 2, 2]);
        assert_eq!(bodies(&out), vec!["0", "1", "2", "3", "4"]);
        assert_eq!(queue.unacked_count(), 5);
        queue.check_invariants();
    }

    #[test]
    fn credit_stops_and_resumes_dispatch() {
        let mut queue = Queue::new();
        for i in 0..3 {
            queue.publish(message(&i.to_string()), None);
        }
        queue.add_consumer(consumer(1, Credit::Limited(1))).unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        assert_eq!(out.len(), 1);
        queue.dispatch(&mut out);
        assert_eq!(out.len(), 1, "no credit, no delivery");
        queue.ack(&[out[0].id], &mut Vec::new());
        queue.grant_credit(out[0].consumer, 1);
        queue.dispatch(&mut out);
        assert_eq!(bodies(&out), vec!["0", "1"]);
    }

    #[test]
    fn requeued_messages_return_to_their_position_marked_redelivered() {
        let mut queue = Queue::new();
        for i in 0..4 {
            queue.publish(message(&i.to_string()), None);
        }
        let first = queue.get(CHANNEL, false).unwrap();
        let second = queue.get(CHANNEL, false).unwrap();
        assert_eq!(second.remaining, 2);
        queue.requeue(&[second.id, first.id]);
        queue.check_invariants();
        let again: Vec<Got> = (0..4).map(|_| queue.get(CHANNEL, true).unwrap()).collect();
        let order: Vec<String> = again
            .iter()
            .map(|g| String::from_utf8_lossy(g.message.body()).into_owned())
            .collect();
        assert_eq!(order, vec!["0", "1", "2", "3"]);
        assert!(again[0].redelivered && again[1].redelivered);
        assert!(!again[2].redelivered);
        assert!(queue.get(CHANNEL, true).is_none());
    }

    #[test]
    fn messages_are_found_by_id_with_gaps_in_the_ready_ids() {
        let mut queue = Queue::new();
        for i in 0..8 {
            queue.publish(message(&i.to_string()), None);
        }
        let got: Vec<Got> = (0..5).map(|_| queue.get(CHANNEL, false).unwrap()).collect();
        // Ready: 1, 3, then 5..8 — ids no longer dense from the front.
        queue.requeue(&[got[3].id, got[1].id]);
        queue.check_invariants();
        let body = |found: Found<'_>| {
            found
                .message
                .map(|m| String::from_utf8_lossy(m.body()).into_owned())
        };
        for (i, got) in got.iter().enumerate() {
            let found = queue.find(got.id).expect("still in the queue");
            assert!(found.delivered);
            assert_eq!(body(found), Some(i.to_string()));
        }
        let first = got[0].id;
        for i in 5..8u64 {
            let found = queue.find(first + i).expect("ready");
            assert!(!found.delivered);
            assert_eq!(body(found), Some(i.to_string()));
        }
        assert!(queue.find(first + 8).is_none());
        queue.ack(&[got[0].id], &mut Vec::new());
        assert!(queue.find(got[0].id).is_none());
    }

    #[test]
    fn no_ack_deliveries_are_not_kept() {
        let mut queue = Queue::new();
        queue.publish(message("a"), None);
        let mut c = consumer(1, Credit::Unlimited);
        c.no_ack = true;
        queue.add_consumer(c).unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(queue.unacked_count(), 0);
    }

    #[test]
    fn exclusive_consumers_are_alone() {
        let mut queue = Queue::new();
        let mut exclusive = consumer(1, Credit::Unlimited);
        exclusive.exclusive = true;
        queue.add_consumer(exclusive).unwrap();
        assert_eq!(
            queue.add_consumer(consumer(2, Credit::Unlimited)),
            Err(ConsumeRefusal::ExclusiveConsumerPresent)
        );
        let mut queue = Queue::new();
        queue.add_consumer(consumer(1, Credit::Unlimited)).unwrap();
        let mut exclusive = consumer(2, Credit::Unlimited);
        exclusive.exclusive = true;
        assert_eq!(
            queue.add_consumer(exclusive),
            Err(ConsumeRefusal::ConsumersPresent)
        );
    }

    #[test]
    fn closing_a_channel_requeues_what_it_held() {
        let mut queue = Queue::new();
        for i in 0..3 {
            queue.publish(message(&i.to_string()), None);
        }
        queue.add_consumer(consumer(1, Credit::Unlimited)).unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        assert_eq!(queue.remove_consumers_of(CHANNEL).len(), 1);
        assert_eq!(queue.requeue_all_of(CHANNEL), 3);
        assert_eq!(queue.message_count(), 3);
        queue.check_invariants();
    }

    #[test]
    fn purge_drops_ready_but_not_unacked() {
        let mut queue = Queue::new();
        for i in 0..3 {
            queue.publish(message(&i.to_string()), None);
        }
        let held = queue.get(CHANNEL, false).unwrap();
        assert_eq!(queue.purge(&mut Vec::new()), 2);
        assert_eq!(queue.message_count(), 0);
        assert_eq!(queue.requeue(&[held.id]), 1);
        assert_eq!(queue.message_count(), 1);
        assert_eq!(queue.ready_bytes(), held.message.size_bytes());
    }

    #[test]
    fn on_demand_consumers_ask_once_per_starvation() {
        let mut queue = Queue::new();
        let mut c = consumer(1, Credit::Limited(0));
        c.on_demand = true;
        queue.add_consumer(c).unwrap();
        let mut wants = Vec::new();
        queue.credit_wanted(&mut wants);
        assert!(wants.is_empty(), "nothing ready, nothing to ask for");
        queue.publish(message("a"), None);
        queue.publish(message("b"), None);
        queue.credit_wanted(&mut wants);
        assert_eq!(wants.len(), 1);
        assert_eq!(wants[0].1, 2);
        queue.credit_wanted(&mut wants);
        assert_eq!(wants.len(), 1, "asked already");
        queue.grant_credit(wants[0].0, 1);
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        assert_eq!(out.len(), 1);
        queue.credit_wanted(&mut wants);
        assert_eq!(wants.len(), 2, "starved again with one ready");
    }

    fn location(n: u64) -> Location {
        Location {
            segment: 1,
            len: 100,
            offset: n * 100,
        }
    }

    fn body_of(message: &Message) -> String {
        String::from_utf8_lossy(message.body()).into_owned()
    }

    /// Cycles of writing out and paging, each cut short by the bytes wanted, never leave
    /// in-memory messages between paged ones, where no later pass would find them.
    #[test]
    fn paging_in_short_passes_strands_nothing_between_paged_messages() {
        let mut queue = Queue::new();
        let write_and_page = |queue: &mut Queue, bytes: usize| {
            let ids: Vec<u64> = queue
                .unlogged_from_back(bytes, 1)
                .iter()
                .map(|(id, _)| *id)
                .collect();
            for &id in &ids {
                assert!(queue.relocate(id, location(id)));
            }
            queue.page_out(usize::MAX, 1, |_| true);
            ids
        };
        for i in 0..5 {
            queue.publish(message(&i.to_string()), None);
        }
        assert_eq!(write_and_page(&mut queue, usize::MAX), vec![1, 2, 3, 4]);
        for i in 5..8 {
            queue.publish(message(&i.to_string()), None);
        }
        // One message's worth: the oldest of the back run, next to the paged ones.
        assert_eq!(write_and_page(&mut queue, 1), vec![5]);
        queue.publish(message("8"), None);
        assert_eq!(
            write_and_page(&mut queue, usize::MAX),
            vec![6, 7, 8],
            "6 and 7 are still reachable"
        );
        assert_eq!(queue.paged_count(), 8);
        queue.check_invariants();
    }

    /// Reads paged messages back as the shard's pager does (a window at a time) and delivers
    /// them to a no-ack consumer; returns the delivered bodies.
    fn drain_paged(queue: &mut Queue) -> Vec<String> {
        let mut c = consumer(9, Credit::Unlimited);
        c.no_ack = true;
        queue.add_consumer(c).unwrap();
        let mut delivered = Vec::new();
        loop {
            let mut out = Vec::new();
            queue.dispatch(&mut out);
            delivered.extend(bodies(&out));
            let window = queue.paged_window(PAGE_WINDOW, 1 << 20);
            if window.is_empty() {
                break;
            }
            for (id, location) in window {
                assert_eq!(location, self::location(id), "the record of {id}");
                assert!(queue.fill(id, message(&id.to_string())));
            }
            queue.check_invariants();
        }
        delivered
    }

    const PAGE_WINDOW: usize = 256;

    /// A queue of `count` messages with back-to-back records, all paged out.
    fn paged_backlog(count: u64) -> Queue {
        let mut queue = Queue::with_meter(MemoryMeter::default());
        for i in 0..count {
            queue.publish(message(&i.to_string()), Some(location(i)));
        }
        queue.page_out(usize::MAX, 1, |_| true);
        queue.check_invariants();
        queue
    }

    #[test]
    fn a_paged_backlog_is_packed_into_runs_and_read_back_in_order() {
        const COUNT: u64 = 100_000;
        let mut queue = paged_backlog(COUNT);
        assert_eq!(queue.message_count() as u64, COUNT);
        assert_eq!(
            queue.paged_count() as u64,
            COUNT - 1,
            "all but the first kept"
        );
        assert!(
            queue.ready.len() < 2 * RUN_MAX,
            "{} entries",
            queue.ready.len()
        );
        let bytes = queue.entry_bytes();
        assert!(
            bytes < COUNT as usize * 8,
            "{bytes} bytes for {COUNT} messages"
        );
        let delivered = drain_paged(&mut queue);
        let expected: Vec<String> = (0..COUNT).map(|i| i.to_string()).collect();
        assert_eq!(delivered, expected);
        assert_eq!(queue.message_count(), 0);
        assert!(queue.frozen.is_empty(), "no run left behind");
    }

    #[test]
    fn recovered_messages_are_packed_as_they_are_restored() {
        const COUNT: u64 = 3 * RUN_MAX as u64 + 17;
        let mut queue = Queue::new();
        queue.reserve(COUNT as usize);
        for id in 0..COUNT {
            queue.restore(id, location(id), id % 1000 == 0);
        }
        queue.check_invariants();
        assert_eq!(queue.message_count() as u64, COUNT);
        assert!(
            queue.ready.len() < RUN_MAX + 8,
            "{} entries",
            queue.ready.len()
        );
        let redelivered: Vec<u64> = (0..COUNT).filter(|id| id % 1000 == 0).collect();
        assert_eq!(queue.delivered_persistent_ids(), redelivered);
        let found = queue.find(5000).unwrap();
        assert!(found.message.is_none() && found.persistent && found.delivered);
        assert_eq!(found.location, Some(location(5000)));
        assert!(queue.find(COUNT).is_none());
        let delivered = drain_paged(&mut queue);
        assert_eq!(delivered.len() as u64, COUNT);
        assert!(delivered
            .iter()
            .enumerate()
            .all(|(i, b)| *b == i.to_string()));
    }

    /// What reaches into a run unpacks it: compaction moving a record, a requeue between its
    /// ids, an unreadable record; purge settles every packed message.
    #[test]
    fn runs_are_unpacked_by_whatever_needs_one_of_their_messages() {
        let mut queue = Queue::with_meter(MemoryMeter::default());
        // 0 is delivered and held (unacked) before the rest is paged and packed.
        let count = 2 * RUN_MAX as u64 + 100;
        for i in 0..count {
            queue.publish(message(&i.to_string()), Some(location(i)));
        }
        queue.add_consumer(consumer(1, Credit::Limited(1))).unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        assert_eq!(bodies(&out), vec!["0"]);
        queue.remove_consumer(consumer(1, Credit::Unlimited).key);
        queue.page_out(usize::MAX, 0, |_| true);
        queue.check_invariants();
        assert!(!queue.frozen.is_empty());

        // Compaction moved 3000's record.
        let moved = Location {
            segment: 9,
            len: 100,
            offset: 0,
        };
        assert!(queue.relocate(3000, moved));
        assert_eq!(queue.find(3000).unwrap().location, Some(moved));
        queue.check_invariants();
        // An unknown id is ignored; 0 goes back before the first run.
        assert!(!queue.relocate(count + 5, moved));
        assert_eq!(queue.requeue(&[0]), 1);
        queue.check_invariants();
        assert_eq!(queue.drop_unreadable(5000), Some(false));
        assert_eq!(queue.message_count() as u64, count - 1);
        queue.check_invariants();

        let mut logged = Vec::new();
        assert_eq!(queue.purge(&mut logged) as u64, count - 1);
        let mut ids: Vec<u64> = logged.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        let expected: Vec<u64> = (0..count).filter(|&id| id != 5000).collect();
        assert_eq!(ids, expected);
        queue.check_invariants();
        assert!(queue.frozen.is_empty());
    }

    /// Compaction unpacks the runs it moves (find, then relocate each message); once it is
    /// done the queue packs them again, with their new places.
    #[test]
    fn runs_unpacked_by_compaction_are_packed_again() {
        const COUNT: u64 = 3 * RUN_MAX as u64;
        let mut queue = paged_backlog(COUNT);
        let packed = queue.ready.len();
        assert!(packed < RUN_MAX + 8, "{packed} entries");
        let moved = |id: u64| Location {
            segment: 2,
            len: 100,
            offset: id * 100,
        };
        for id in 1..COUNT {
            assert!(queue.find(id).is_some_and(|f| f.message.is_none()));
            assert!(queue.relocate(id, moved(id)));
        }
        assert!(queue.ready.len() as u64 == COUNT, "all unpacked");
        queue.freeze_paged();
        queue.check_invariants();
        assert_eq!(queue.ready.len(), packed);
        assert_eq!(queue.message_count() as u64, COUNT);
        assert_eq!(queue.find(7).unwrap().location, Some(moved(7)));
        queue.check_invariants();
    }

    /// Random publishes, page-outs, page-ins with deliveries, acks, requeues, relocations and
    /// purges against a model of which ids are ready: the queue keeps its invariants, its count
    /// and its order, with runs packed and unpacked all along.
    #[test]
    fn frozen_runs_agree_with_a_model_under_random_operations() {
        use std::collections::BTreeSet;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut random = move |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below.max(1)
        };
        let mut queue = Queue::with_meter(MemoryMeter::default());
        let mut ready: BTreeSet<u64> = BTreeSet::new();
        let mut unacked: Vec<u64> = Vec::new();
        let mut packed_seen = false;
        for step in 0..400 {
            match random(10) {
                0..=2 => {
                    // A quarter of the batches have some messages without a record (they stay
                    // in memory, between paged ones).
                    let unlogged_every = if random(4) == 0 { 50 } else { u64::MAX };
                    for _ in 0..random(3000) {
                        let id = queue.next_id();
                        let logged = random(unlogged_every) != 0;
                        let at = logged.then(|| location(id));
                        assert_eq!(queue.publish(message(&id.to_string()), at), id);
                        ready.insert(id);
                    }
                }
                3 | 4 => {
                    queue.page_out(usize::MAX, random(300) as usize, |_| true);
                }
                5 | 6 => {
                    while queue.front_is_paged() {
                        for (id, at) in queue.paged_window(PAGE_WINDOW, 1 << 20) {
                            assert_eq!(at, location(id));
                            assert!(queue.fill(id, message(&id.to_string())));
                        }
                    }
                    let credit = random(500) as u32 + 1;
                    queue
                        .add_consumer(consumer(1, Credit::Limited(credit)))
                        .unwrap();
                    let mut out = Vec::new();
                    queue.dispatch(&mut out);
                    queue.remove_consumer(consumer(1, Credit::Unlimited).key);
                    let expected: Vec<u64> = ready.iter().copied().take(out.len()).collect();
                    let got: Vec<u64> = out.iter().map(|d| d.id).collect();
                    assert_eq!(got, expected, "step {step}: delivered in order");
                    for id in got {
                        ready.remove(&id);
                        unacked.push(id);
                    }
                }
                7 => {
                    let split = random(unacked.len() as u64 + 1) as usize;
                    let settled: Vec<u64> = unacked.drain(..split).collect();
                    assert_eq!(queue.ack(&settled, &mut Vec::new()), settled.len());
                    let back = random(unacked.len() as u64 + 1) as usize;
                    let requeued: Vec<u64> = unacked.drain(..back).collect();
                    assert_eq!(queue.requeue(&requeued), requeued.len());
                    ready.extend(requeued);
                }
                8 => {
                    if let Some(&id) = ready.iter().nth(random(ready.len() as u64) as usize) {
                        let logged = queue.find(id).unwrap().location.is_some();
                        let moved = Location {
                            segment: 9,
                            len: 100,
                            offset: id * 100,
                        };
                        if logged && queue.find(id).unwrap().message.is_some() {
                            assert!(queue.relocate(id, moved));
                            assert_eq!(queue.find(id).unwrap().location, Some(moved));
                            // Back where the model's page-ins expect it.
                            assert!(queue.relocate(id, location(id)));
                        }
                        queue.freeze_paged();
                    }
                }
                _ => {
                    if random(4) == 0 {
                        let mut logged = Vec::new();
                        assert_eq!(queue.purge(&mut logged) as usize, ready.len());
                        ready.clear();
                    }
                }
            }
            packed_seen |= !queue.frozen.is_empty();
            queue.check_invariants();
            assert_eq!(queue.message_count() as usize, ready.len(), "step {step}");
        }
        assert!(packed_seen, "the operations packed runs at some point");
    }

    #[test]
    fn a_requeue_into_a_run_goes_back_to_its_place() {
        let mut queue = Queue::with_meter(MemoryMeter::default());
        let count = 2 * RUN_MAX as u64;
        for i in 0..count {
            queue.publish(message(&i.to_string()), Some(location(i)));
        }
        // Deliver 0..3 and keep 1 unacked; the rest is paged and packed.
        queue.add_consumer(consumer(1, Credit::Limited(3))).unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        queue.remove_consumer(consumer(1, Credit::Unlimited).key);
        let mut logged = Vec::new();
        queue.ack(&[0, 2], &mut logged);
        queue.page_out(usize::MAX, 0, |_| true);
        assert!(!queue.frozen.is_empty());
        assert_eq!(queue.requeue(&[1]), 1);
        queue.check_invariants();
        let delivered = drain_paged(&mut queue);
        let expected: Vec<String> = std::iter::once(1)
            .chain(3..count)
            .map(|i| i.to_string())
            .collect();
        assert_eq!(delivered, expected);
    }

    #[test]
    fn a_ready_entry_is_small() {
        assert!(std::mem::size_of::<Ready>() <= 32);
    }

    #[test]
    fn paged_out_messages_wait_to_be_filled_and_keep_their_order() {
        let meter = MemoryMeter::default();
        let mut queue = Queue::with_meter(meter.clone());
        for i in 0..6 {
            queue.publish(message(&i.to_string()), Some(location(i)));
        }
        queue.publish(message("unlogged"), None);
        let all = meter.bytes();
        assert_eq!(all, queue.ready_bytes());
        // Keep the first two; record 4 is not durable yet, so the run stops there: 5 waits for
        // it (paging it would leave 4 between paged messages), the unlogged one cannot go.
        let freed = queue.page_out(usize::MAX, 2, |l| l.offset != 400);
        assert_eq!(queue.paged_count(), 2, "2 and 3 paged out");
        assert_eq!(meter.bytes(), all - freed);
        queue.check_invariants();

        let got: Vec<String> = (0..2)
            .map(|_| body_of(&queue.get(CHANNEL, true).unwrap().message))
            .collect();
        assert_eq!(got, vec!["0", "1"]);
        assert!(queue.front_is_paged());
        assert!(queue.get(CHANNEL, true).is_none(), "waits for the page-in");
        let mut c = consumer(1, Credit::Unlimited);
        c.no_ack = true;
        queue.add_consumer(c).unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        assert!(out.is_empty());

        let wanted = queue.paged_window(10, u64::MAX);
        let ids: Vec<u64> = wanted.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(queue.paged_window(10, 150).len(), 1, "bounded by bytes");
        for (id, _) in wanted {
            assert!(queue.fill(id, message(&id.to_string())));
        }
        assert!(!queue.fill(2, message("again")), "already filled");
        queue.check_invariants();
        queue.dispatch(&mut out);
        assert_eq!(bodies(&out), vec!["2", "3", "4", "5", "unlogged"]);
        assert_eq!(meter.bytes(), 0);
        queue.check_invariants();
        queue.publish(message("left"), None);
        assert!(meter.bytes() > 0);
        drop(queue);
        assert_eq!(meter.bytes(), 0, "a dropped queue gives its bytes back");
    }

    #[test]
    fn the_meter_counts_delivered_messages_until_they_are_settled() {
        let meter = MemoryMeter::default();
        let mut queue = Queue::with_meter(meter.clone());
        for i in 0..4 {
            queue.publish(message(&i.to_string()), None);
        }
        let one = meter.bytes() / 4;
        queue.add_consumer(consumer(1, Credit::Unlimited)).unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        assert_eq!(out.len(), 4);
        assert_eq!(meter.bytes(), 0, "nothing ready");
        assert_eq!(
            meter.unacked_bytes(),
            4 * one,
            "all four held for their acks"
        );
        let ids: Vec<MessageId> = out.iter().map(|d| d.id).collect();
        queue.ack(&ids[..1], &mut Vec::new());
        assert_eq!(meter.unacked_bytes(), 3 * one);
        queue.remove_consumer(consumer(1, Credit::Unlimited).key);
        queue.requeue(&ids[1..2]);
        assert_eq!(
            meter.unacked_bytes(),
            2 * one,
            "a requeued message is ready again"
        );
        assert_eq!(meter.bytes(), one);
        queue.check_invariants();
        drop(queue);
        assert_eq!(
            meter.bytes() + meter.unacked_bytes(),
            0,
            "a dropped queue gives all back"
        );
    }

    #[test]
    fn unlogged_messages_are_written_out_from_the_paged_side() {
        let mut queue = Queue::new();
        for i in 0..5 {
            let location = (i == 3).then(|| location(i));
            queue.publish(message(&i.to_string()), location);
        }
        let ids: Vec<u64> = queue
            .unlogged_from_back(usize::MAX, 1)
            .iter()
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(
            ids,
            vec![1, 2, 4],
            "skips the logged one and the kept head; queue order"
        );
        let first = queue.unlogged_from_back(1, 1);
        assert_eq!(first.len(), 1, "bounded by bytes");
        assert_eq!(
            first[0].0, 1,
            "nothing paged yet: the back run starts after the kept head"
        );
        for id in [4, 2, 1] {
            assert!(queue.relocate(id, location(id)));
        }
        queue.page_out(usize::MAX, 1, |_| true);
        assert_eq!(queue.paged_count(), 4);
        let mut logged = Vec::new();
        queue.purge(&mut logged);
        assert_eq!(
            logged,
            vec![(1, false), (2, false), (3, false), (4, false)],
            "transient copies are reported as logged, not persistent"
        );
        queue.check_invariants();
    }

    #[test]
    fn messages_requeued_before_a_paged_backlog_can_be_paged_too() {
        let mut queue = Queue::new();
        for i in 0..6 {
            queue.publish(message(&i.to_string()), None);
        }
        queue.add_consumer(consumer(1, Credit::Unlimited)).unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        assert_eq!(out.len(), 6);
        queue.remove_consumer(consumer(1, Credit::Unlimited).key);
        for i in 6..9 {
            queue.publish(message(&i.to_string()), Some(location(i)));
        }
        assert_eq!(
            queue.page_out(usize::MAX, 0, |_| true),
            3 * out[0].message.size_bytes()
        );
        // The consumer left: its six come back to the front, before the paged 6..9.
        queue.requeue(&[0, 1, 2, 3, 4, 5]);
        let ids: Vec<u64> = queue
            .unlogged_from_back(usize::MAX, 2)
            .iter()
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(ids, vec![2, 3, 4, 5], "the front run after the kept head");
        for id in 2..6 {
            assert!(queue.relocate(id, location(id)));
        }
        queue.page_out(usize::MAX, 2, |_| true);
        assert_eq!(queue.paged_count(), 7);
        queue.check_invariants();
    }

    #[test]
    fn recovered_messages_start_paged_and_requeues_keep_locations() {
        let mut queue = Queue::new();
        queue.restore(3, location(3), false);
        queue.restore(8, location(8), true);
        assert_eq!(queue.next_id(), 9);
        assert_eq!(queue.message_count(), 2);
        assert_eq!(queue.ready_bytes(), 0);
        assert!(queue.fill(3, message("three")));
        let got = queue.get(CHANNEL, false).unwrap();
        assert_eq!(got.id, 3);
        assert_eq!(queue.find(3).unwrap().location, Some(location(3)));
        assert!(queue.relocate(3, location(30)));
        queue.requeue(&[3]);
        let found = queue.find(3).unwrap();
        assert_eq!(found.location, Some(location(30)));
        assert!(found.delivered && found.message.is_some());
        assert!(queue.find(8).unwrap().message.is_none(), "still paged");
        assert_eq!(queue.delivered_persistent_ids(), vec![8]);
        assert_eq!(queue.drop_unreadable(8), Some(true));
        assert_eq!(queue.message_count(), 1);
        let mut persistent = Vec::new();
        assert_eq!(queue.purge(&mut persistent), 1);
        queue.check_invariants();
    }

    #[test]
    fn unknown_ids_are_ignored() {
        let mut queue = Queue::new();
        assert_eq!(queue.ack(&[42], &mut Vec::new()), 0);
        assert_eq!(queue.requeue(&[42]), 0);
    }
}
