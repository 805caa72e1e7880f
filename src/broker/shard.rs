//! One shard's broker state: its copy of every vhost's routing table, the queues it owns, the
//! connections it serves, and its mailbox.
//!
//! Everything a shard sends — to another shard or to itself — goes through [`ShardBroker::post`]
//! into a per-destination outbox, flushed by a task that runs once the current task yields. So:
//! - messages to one destination keep their order (one outbox, one FIFO mesh channel);
//! - everything produced while handling one read or one incoming batch leaves as one mesh send;
//! - a message to this same shard is handled by the flush task, never re-entrantly inside the
//!   code that posted it (a connection may be mid-borrow when it publishes to its own queue);
//! - publisher confirms that arrive in one batch leave as one basic.ack per channel, sent once
//!   the batch is handled ([`ShardBroker::handle_batch`]).
//!
//! Memory: the pager keeps ready messages near `queues.memory_budget_bytes`; past twice that
//! (ready and unacked messages) the shard raises its memory alarm (`check_flow`), and every
//! shard's publishing connections stop reading until it clears. Past the budget while consumers
//! take the excess fast enough, publishers wait for them instead of the pager writing it out
//! (`check_drain`).
//!
//! Invariant: a queue in `queues` is owned by this shard in every routing table copy.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ahash::{HashMap, HashMapExt};
use log::{debug, warn};
use shards::queue::{ChannelKey, ConsumeRefusal, ConsumerKey, Delivery, Dropped};
use shards::{Location, MemoryMeter, MessageId, Queue, ShardId};

use std::path::Path;

use log::{error, info};
use roaring::RoaringTreemap;
use shards::record::{self, RECORD_HEADER_BYTES};
use shards::wal::{LoggedIds, LoggedQueue, MessageRecord, Recovery, WalEntry};

use super::coordinator::Coordinator;
use super::dead_letter::{self, Reason};
use super::messages::{
    MetaRequest, PublisherFlow, QueueKey, QueueName, Reply, Settlement, ShardMessage,
};
use super::meta_log::{self, DurableMetadata};
use super::oneshot;
use super::queue_policy::{now_ms, priority_lane, DeadLetterTarget, Expiry, Overflow, QueuePolicy};
use super::routing::{ConnectionRef, MetaOp, QueueDef, VhostRouting};
use super::storage::{
    after_synced, Appended, CompactionHost, LiveMessage, RetainedSegment, SegmentedWal, Writers,
};
use crate::codec::{ReplyCode, ShortStr};
use crate::config::{Config, QueuePlacement};
use crate::connection::error::AmqpError;
use crate::runtime::log_file::{sync_directory, LogWriter};
use crate::runtime::mesh::{Mesh, SendError};
use crate::runtime::sync::Signal;

/// The coordinator of metadata changes lives on this shard.
pub const COORDINATOR: ShardId = ShardId(0);

/// A consumed queue keeps this many of its first ready messages in memory (read back ahead of
/// delivery, never paged out).
const PAGE_IN_WINDOW: usize = 256;
/// Capacity of the reused dispatch vector kept between dispatches (deliveries, ~80 B each).
const DELIVERIES_KEPT_MAX: usize = 4096;
/// One page-in reads at most this many bytes of records.
const PAGE_IN_BYTES_MAX: u64 = 1 << 20;
/// Delivered marks per record at a clean shutdown.
const MARKS_PER_RECORD: usize = 65536;
/// A reader yields to the outbox's flush task once this much message data or this many
/// messages wait in it: publishes reach their queues (and the pager and flow control see them)
/// in bounded batches, however fast a client sends.
const OUTBOX_FLUSH_BYTES: usize = 1 << 20;
const OUTBOX_FLUSH_MESSAGES: usize = 4096;
/// Readers stop reading while more message data than this waits in the outbox (the mesh is
/// congested: another shard does not take its messages as fast as they come).
const OUTBOX_BYTES_MAX: usize = 16 << 20;
/// How often a shard that paused publishers looks whether its memory is back under the limit.
const FLOW_CHECK_INTERVAL: Duration = Duration::from_millis(5);
/// Publishers paused this long without memory falling resume (see `ShardBroker::check_flow`).
const FLOW_STALL: Duration = Duration::from_secs(1);
/// How often `watch_disk` looks at the free space.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(1);
/// While publishers wait for consumers to drain the excess over the budget, memory must fall by
/// a sixty-fourth of the budget every `DRAIN_WINDOW`, or the shard pages instead and does not
/// wait for consumers again for `DRAIN_REFUSED_FOR` (see `ShardBroker::check_drain`).
const DRAIN_WINDOW: Duration = Duration::from_millis(50);
const DRAIN_REFUSED_FOR: Duration = Duration::from_secs(1);
/// The first window starts once every shard told to hold its publishers has answered (what they
/// published before is in), or after this long whatever they answered.
const DRAIN_HELD_WAIT_MAX: Duration = Duration::from_secs(1);
/// The pager may have half the budget unsynced, but at least this much: with a small budget,
/// a tighter bound made paging slower than the log takes it and kept more in memory
/// (`transient_messages_are_paged_under_pressure`, 1 MiB budget: RSS grew 58-66 MB with half
/// the budget, 55-58 with this, 56-57 before there was a bound).
const PAGE_OUT_IN_FLIGHT_MIN: usize = 4 << 20;
/// After a burst past the budget, how often a shard looks whether its messages in memory are
/// back under a quarter of the budget (then it gives free memory back, `trim_after_burst`).
const TRIM_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// When the log left a sparse segment to drain, reclaiming runs again after this even if no
/// settlement asks for it.
const RECLAIM_RETRY: Duration = Duration::from_secs(1);

/// Bytes available to unprivileged users on the disk that holds `path` (statvfs).
fn free_disk_bytes(path: &Path) -> Result<u64, String> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: statvfs writes only into the struct it is given; zeroed is a valid value of it.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// Hands the allocator's free pages back to the system. After a pause the pager has freed many
/// message buffers scattered through the heap; glibc keeps such pages resident until trimmed.
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the broker needs from a local connection to hand it deliveries and confirms.
pub trait ConnectionPort {
    /// A message for one of the connection's consumers. Returns false if the consumer is gone
    /// (the caller then requeues the message).
    fn deliver(&self, delivery: IncomingDelivery) -> bool;
    /// The queue behind a consumer was deleted.
    fn consumer_cancelled(&self, consumer: u64);
    /// A reply to the direct reply-to consumer of `channel` that `key` names (dropped if that
    /// consumer is gone).
    fn deliver_reply(&self, channel: u16, key: u64, message: shards::Message);
    /// The owner of a published message has it (`ok`), or failed to store it. Returns whether
    /// acks may be due: the shard then calls `send_confirms` once it has handled the batch of
    /// messages this came in, so that a batch's confirms leave as one basic.ack (multiple).
    fn confirmed(&self, channel: u16, seq: u64, ok: bool) -> bool;
    /// Sends the acks that `confirmed` made due.
    fn send_confirms(&self);
    /// An on-demand consumer has run out of credit while `ready` messages wait.
    fn credit_wanted(&self, consumer: u64, ready: u32);
}

/// A delivery as it reaches the consumer's connection.
#[derive(Debug, Clone)]
pub struct IncomingDelivery {
    pub consumer: u64,
    pub queue: QueueKey,
    pub durable: bool,
    pub owner: ShardId,
    pub id: shards::MessageId,
    pub message: shards::Message,
    pub redelivered: bool,
}

struct OwnedQueue {
    /// The handle the queue map is keyed by: deliveries carry clones of it, so that their
    /// settlements find the queue by pointer.
    key: QueueKey,
    queue: Queue,
    /// Persistent messages on a durable queue are logged.
    durable: bool,
    auto_delete: bool,
    /// Auto-delete applies once a queue has had a consumer.
    had_consumer: bool,
    /// What its x-arguments make it do, and its messages' deadlines.
    policy: QueuePolicy,
    expiry: Expiry,
    /// The deadline an expiry timer is armed for.
    expiry_timer: Option<u64>,
    /// When it was last used (declared, read by basic.get, or left by its last consumer), on
    /// `now_ms`'s clock: an x-expires queue expires that long after.
    last_used: u64,
}

impl OwnedQueue {
    /// Whether dispatching needs the policy's checks (the usual queue does not).
    fn is_policed(&self) -> bool {
        !self.policy.is_plain() || !self.expiry.is_empty()
    }

    /// `Queue::dispatch` under the queue's policy: messages whose time is up leave the head
    /// into `expired` (with or without consumers), then a queue past its length limits drops
    /// from its head into `overflowed`. Returns whether the head must be read back first (it
    /// is paged out and due to go).
    fn dispatch_policed(
        &mut self,
        deliveries: &mut Vec<Delivery>,
        expired: &mut Vec<Dropped>,
        overflowed: &mut Vec<Dropped>,
    ) -> bool {
        let now = now_ms();
        let ttl = self.policy.message_ttl;
        let expiry = &self.expiry;
        // A message published this very millisecond still goes to a consumer waiting for it
        // (so that a TTL of 0 means "now or never", as in RabbitMQ); one left waiting does not.
        let past = |id: MessageId, message: &shards::Message| {
            expiry
                .deadline(id, Some(message), ttl)
                .is_some_and(|deadline| deadline < now)
        };
        self.queue.dispatch_expiring(deliveries, past, expired);
        for delivery in deliveries.iter().filter(|d| d.no_ack) {
            self.expiry.forget(delivery.id);
        }
        self.drop_expired(now, expired);
        let over_limit = |queue: &Queue| {
            self.policy
                .over_limit(queue.message_count(), queue.content_bytes())
        };
        while over_limit(&self.queue) {
            if self.queue.drop_front_while(|_, _| true, overflowed, 1) == 0 {
                break;
            }
        }
        for dropped in overflowed.iter() {
            self.expiry.forget(dropped.id);
        }
        let head_due = self
            .queue
            .front_id()
            .and_then(|id| self.expiry.deadline(id, None, ttl))
            .is_some_and(|deadline| deadline <= now);
        self.queue.front_is_paged() && (head_due || over_limit(&self.queue))
    }

    /// Takes the messages at the head whose time is up (`now` or before) into `expired`.
    fn drop_expired(&mut self, now: u64, expired: &mut Vec<Dropped>) {
        let ttl = self.policy.message_ttl;
        let expiry = &self.expiry;
        let due = |id: MessageId, message: &shards::Message| {
            expiry
                .deadline(id, Some(message), ttl)
                .is_some_and(|deadline| deadline <= now)
        };
        let from = expired.len();
        self.queue.drop_front_while(due, expired, usize::MAX);
        for dropped in &expired[from..] {
            self.expiry.forget(dropped.id);
        }
    }

    /// When the head of the queue expires, if it has a deadline.
    fn head_deadline(&self) -> Option<u64> {
        let id = self.queue.front_id()?;
        let message = self.queue.front().map(|(_, message)| message);
        self.expiry.deadline(id, message, self.policy.message_ttl)
    }
}

/// Counters of what crossed the mesh, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct MeshCounters {
    pub batches_sent: u64,
    pub messages_sent: u64,
    pub deliveries_received: u64,
    pub publishes_received: u64,
    /// Batches the mesh refused as congested (sent again later).
    pub batches_held_back: u64,
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
    /// An emptied batch of this shard's own messages, to take the outbox's place when the flush
    /// task takes it: handling local messages posts more, and a vector grown from nothing for
    /// each round reallocated (and copied) its way up every time.
    spare_local_batch: RefCell<Vec<ShardMessage>>,
    /// Connections with publisher confirms to send at the end of the batch being handled.
    confirms_due: RefCell<Vec<(u64, Rc<dyn ConnectionPort>)>>,
    flush_scheduled: Cell<bool>,
    /// Raised when a congested outbox drained (readers waiting on back-pressure resume).
    pub outbox_drained: Signal,
    outbox_messages_max: usize,
    /// Bytes of message data waiting in the outbox (see `ShardMessage::message_bytes`).
    outbox_bytes: Cell<usize>,
    coordinator: Option<Rc<Coordinator>>,
    placement: QueuePlacement,
    next_placement: Cell<usize>,
    counters: Cell<MeshCounters>,
    /// This shard's write-ahead log (persistent messages on durable queues).
    wal: RefCell<Option<Rc<SegmentedWal>>>,
    reclaiming: Cell<bool>,
    /// A reclaim is due after `RECLAIM_RETRY` (the log's head segment was left to drain).
    reclaim_retry: Cell<bool>,
    segment_bytes_max: u64,
    compact_live_fraction: f64,
    /// Bytes of ready messages in memory over all owned queues, and the budget past which the
    /// pager pages persistent ones out.
    meter: MemoryMeter,
    memory_budget: usize,
    /// The pager runs again only once memory passed this (it found nothing more to page).
    page_out_floor: Cell<usize>,
    /// Bytes the pager wrote (messages not in the log before) that wait for their sync: the log
    /// holds a copy of them until then, so at most half the budget is in flight.
    page_out_writing: Cell<usize>,
    /// Queues with a page-in under way.
    paging_in: RefCell<ahash::HashSet<QueueKey>>,
    /// Per shard (this one included): whether it holds publishers back. Publishing connections
    /// do not read while any does.
    flow: RefCell<Vec<PublisherFlow>>,
    /// Raised when no shard holds publishers back any more.
    pub flow_resumed: Signal,
    /// The data directory's disk is below its free-space limit (`watch_disk`): publishers
    /// are held as by a memory alarm.
    disk_alarm: Cell<bool>,
    /// This shard raises its memory alarm past this many bytes of messages in memory.
    flow_limit: Cell<usize>,
    /// Until then, this shard pages rather than waiting for its consumers (they were too slow).
    drain_refused_until: Cell<Option<Instant>>,
    /// Per shard: whether its publishers sent messages here since publishers last waited for
    /// this shard's consumers (`check_drain`).
    publishers_from: Vec<Cell<bool>>,
    /// Whether publishers wait for this shard's consumers (`check_drain`); never with the alarm.
    draining: Cell<bool>,
    /// Per shard: how many times it was told to hold its publishers for this shard's consumers
    /// and has not answered yet (`FlowHeld`).
    held_answers_due: Vec<Cell<u32>>,
    /// A watcher waits for memory to fall after a burst past the budget (`trim_after_burst`).
    trim_pending: Cell<bool>,
    /// The metadata log (the coordinator's shard only).
    meta_log: RefCell<Option<Rc<LogWriter>>>,
    /// Reused by `dispatch`, so that handing out messages does not grow a vector each time.
    deliveries: RefCell<Vec<Delivery>>,
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
                let vhost = ShortStr::try_from(vhost.as_str()).unwrap_or_default();
                (vhost.clone(), VhostRouting::new(vhost))
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
            spare_local_batch: RefCell::new(Vec::new()),
            confirms_due: RefCell::new(Vec::new()),
            flush_scheduled: Cell::new(false),
            outbox_drained: Signal::default(),
            outbox_messages_max: config.runtime.mesh_channel_capacity * 64,
            outbox_bytes: Cell::new(0),
            coordinator: (id == COORDINATOR).then(Coordinator::new),
            placement: config.queues.placement,
            next_placement: Cell::new(0),
            counters: Cell::new(MeshCounters::default()),
            wal: RefCell::new(None),
            reclaiming: Cell::new(false),
            reclaim_retry: Cell::new(false),
            segment_bytes_max: config.storage.segment_bytes_max,
            compact_live_fraction: config.storage.compact_live_fraction,
            meter: MemoryMeter::default(),
            memory_budget: config.queues.memory_budget_bytes,
            page_out_floor: Cell::new(0),
            page_out_writing: Cell::new(0),
            paging_in: RefCell::new(ahash::HashSet::default()),
            flow: RefCell::new(vec![PublisherFlow::Open; shard_count]),
            drain_refused_until: Cell::new(None),
            publishers_from: (0..shard_count).map(|_| Cell::new(false)).collect(),
            draining: Cell::new(false),
            held_answers_due: (0..shard_count).map(|_| Cell::new(0)).collect(),
            trim_pending: Cell::new(false),
            flow_resumed: Signal::default(),
            flow_limit: Cell::new(config.queues.memory_budget_bytes.saturating_mul(2)),
            disk_alarm: Cell::new(false),
            meta_log: RefCell::new(None),
            deliveries: RefCell::new(Vec::new()),
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
        self.outbox_bytes.get() > OUTBOX_BYTES_MAX || self.outbox_len() > self.outbox_messages_max
    }

    /// Whether the outbox holds enough that a reader should yield, so the flush task hands it
    /// on (to the queues here or the mesh) before the reader reads more.
    pub fn wants_flush(&self) -> bool {
        self.outbox_bytes.get() >= OUTBOX_FLUSH_BYTES || self.outbox_len() >= OUTBOX_FLUSH_MESSAGES
    }

    fn outbox_len(&self) -> usize {
        self.outbox.borrow().iter().map(Vec::len).sum()
    }

    /// Whether publishers should stop reading: some shard holds them back.
    pub fn publishers_paused(&self) -> bool {
        self.disk_alarm.get()
            || self
                .flow
                .borrow()
                .iter()
                .any(|&state| state != PublisherFlow::Open)
    }

    /// The data directory's disk is short of space (see `watch_disk`).
    pub fn disk_alarm(&self) -> bool {
        self.disk_alarm.get()
    }

    /// Whether some shard has raised its memory alarm (clients are told they are blocked).
    pub fn memory_alarm(&self) -> bool {
        self.flow.borrow().contains(&PublisherFlow::MemoryAlarm)
    }

    fn own_flow(&self) -> PublisherFlow {
        self.flow.borrow()[self.id.index()]
    }

    fn set_flow(&self, shard: ShardId, state: PublisherFlow) {
        let mut states = self.flow.borrow_mut();
        if let Some(slot) = states.get_mut(shard.index()) {
            *slot = state;
        }
        if states.iter().all(|&state| state == PublisherFlow::Open) && !self.disk_alarm.get() {
            drop(states);
            self.flow_resumed.notify_all();
        }
    }

    /// Checks the free space of `data_dir`'s disk every `DISK_CHECK_EVERY` and tells every
    /// shard when it goes below `limit` bytes or back above (run by one shard).
    pub fn watch_disk(self: &Rc<Self>, data_dir: std::path::PathBuf, limit: u64) {
        if limit == 0 {
            return;
        }
        let shard = self.clone();
        glommio::spawn_local(async move {
            let mut alarm = false;
            loop {
                match free_disk_bytes(&data_dir) {
                    Ok(free) if (free < limit) != alarm => {
                        alarm = !alarm;
                        if alarm {
                            warn!(
                                "disk alarm: {free} bytes free on the disk of {} (limit \
                                 {limit}): publishers blocked",
                                data_dir.display()
                            );
                        } else {
                            info!("disk alarm cleared: {free} bytes free (limit {limit})");
                        }
                        for index in 0..shard.shard_count {
                            shard.post(ShardId(index), ShardMessage::DiskAlarm { on: alarm });
                        }
                    }
                    Ok(_) => {}
                    Err(e) => warn!("cannot read the free space of {}: {e}", data_dir.display()),
                }
                glommio::timer::sleep(DISK_CHECK_EVERY).await;
            }
        })
        .detach();
    }

    /// Pauses publishers everywhere once this shard's messages in memory pass the flow limit
    /// (twice the budget: the pager writes more slowly than they arrive), and resumes them from
    /// a watcher once they are back under one and a half budgets. What paging cannot take (the
    /// read-ahead of consumed queues, say) must not stall publishers for good: when memory has
    /// not fallen for `FLOW_STALL` and the pager has no write under way, they resume and the
    /// limit moves a budget above. (A slow disk keeps them paused: its writes are under way.)
    fn check_flow(self: &Rc<Self>) {
        if self.draining.get()
            || self.own_flow() != PublisherFlow::Open
            || self.messages_in_memory() <= self.flow_limit.get()
        {
            return;
        }
        info!(
            "{}: {} bytes of ready and {} of unacked messages in memory (budget {}): \
             publishers paused",
            self.id,
            self.meter.bytes(),
            self.meter.unacked_bytes(),
            self.memory_budget
        );
        self.announce_flow(PublisherFlow::MemoryAlarm);
        glommio::spawn_local(self.clone().watch_flow()).detach();
    }

    /// Holds publishers back, instead of paging, once ready messages pass the memory budget
    /// (called after a publish to a queue with consumers): if they take messages faster than the
    /// publishers send them, waiting for them costs nothing but the publishers' pace (as
    /// RabbitMQ's credit flow slows a publisher to its queue's), where paging would write out
    /// and read back messages that were about to be delivered. Consumers that do not bring
    /// memory down by a sixty-fourth of the budget every `DRAIN_WINDOW` are too slow for that:
    /// the shard lets publishers go, pages, and does not wait for consumers again for
    /// `DRAIN_REFUSED_FOR`. Only the shards whose publishers sent messages here since publishers
    /// last waited are told (waiting is routine, unlike the alarm, and must not stall unrelated
    /// traffic); each holds all its publishers.
    fn check_drain(self: &Rc<Self>) {
        if self.meter.bytes() <= self.memory_budget
            || self.draining.get()
            || self.own_flow() != PublisherFlow::Open
            || self
                .drain_refused_until
                .get()
                .is_some_and(|until| Instant::now() < until)
        {
            return;
        }
        self.trim_after_burst();
        let sources: Vec<ShardId> = (0..self.shard_count)
            .map(ShardId)
            .filter(|shard| self.publishers_from[shard.index()].replace(false))
            .collect();
        debug!(
            "{}: {} bytes of ready messages (budget {}): publishers wait for consumers",
            self.id,
            self.meter.bytes(),
            self.memory_budget
        );
        self.draining.set(true);
        for shard in sources.iter().filter(|&&shard| shard != self.id) {
            let due = &self.held_answers_due[shard.index()];
            due.set(due.get() + 1);
        }
        self.tell_flow(&sources, PublisherFlow::Draining);
        glommio::spawn_local(self.clone().watch_drain(sources)).detach();
    }

    /// While publishers wait for consumers: lets them go once memory is under three quarters of
    /// the budget, or pages if it does not fall fast enough. Windows start once the held shards
    /// have answered: until then what their publishers sent before holding is still arriving
    /// (up to the mesh's and the outbox's bounds, which a busy shard takes a while to take in),
    /// and counting it against the consumers made them look too slow whenever the publishers'
    /// connections were on another shard.
    async fn watch_drain(self: Rc<Self>, sources: Vec<ShardId>) {
        let resume_at = self.memory_budget / 4 * 3;
        let started = Instant::now();
        // The window's highest point: what was read before publishers stopped still arrives.
        let (mut since, mut highest) = (started, self.meter.bytes());
        loop {
            glommio::timer::sleep(FLOW_CHECK_INTERVAL).await;
            let now = self.meter.bytes();
            if now <= resume_at {
                break;
            }
            highest = highest.max(now);
            let answered = sources
                .iter()
                .all(|shard| self.held_answers_due[shard.index()].get() == 0);
            if !answered && started.elapsed() < DRAIN_HELD_WAIT_MAX {
                since = Instant::now();
                continue;
            }
            if since.elapsed() >= DRAIN_WINDOW {
                if highest - now < self.memory_budget / 64 {
                    info!(
                        "{}: consumers drain {} bytes of messages too slowly: paging instead",
                        self.id, now
                    );
                    self.drain_refused_until
                        .set(Some(Instant::now() + DRAIN_REFUSED_FOR));
                    self.draining.set(false);
                    self.tell_flow(&sources, PublisherFlow::Open);
                    self.page_out_floor.set(0);
                    self.maybe_page_out();
                    return;
                }
                (since, highest) = (Instant::now(), now);
            }
        }
        self.draining.set(false);
        self.tell_flow(&sources, PublisherFlow::Open);
    }

    /// While this shard holds publishers: runs the pager (which otherwise runs on publishes)
    /// until memory is back under one and a half budgets or stalls, then lets publishers go.
    async fn watch_flow(self: Rc<Self>) {
        let resume_at = self.memory_budget / 2 * 3;
        let mut lowest = self.messages_in_memory();
        let mut fell_at = Instant::now();
        loop {
            glommio::timer::sleep(FLOW_CHECK_INTERVAL).await;
            self.page_out_floor.set(0);
            self.maybe_page_out();
            let now = self.messages_in_memory();
            if now <= resume_at {
                self.flow_limit.set(self.memory_budget.saturating_mul(2));
                info!("{}: publishers resumed", self.id);
                break;
            }
            if now < lowest {
                lowest = now;
                fell_at = Instant::now();
            } else if fell_at.elapsed() >= FLOW_STALL && self.page_out_writing.get() == 0 {
                self.flow_limit.set(now.saturating_add(self.memory_budget));
                info!(
                    "{}: {now} bytes of messages in memory do not page out: publishers resumed \
                     up to {} bytes",
                    self.id,
                    self.flow_limit.get()
                );
                break;
            }
        }
        self.announce_flow(PublisherFlow::Open);
        release_free_memory();
    }

    /// Memory passed the budget: once messages in memory are back under a quarter of it, hand
    /// the allocator's free pages back. glibc keeps them resident otherwise (after a 4 x 4
    /// burst on two shards: 17 MiB in use, 190 MiB of free heap resident for good), and an
    /// alarm, the only other time they go back, may never come.
    fn trim_after_burst(self: &Rc<Self>) {
        if self.trim_pending.replace(true) {
            return;
        }
        let shard = self.clone();
        glommio::spawn_local(async move {
            while shard.messages_in_memory() > shard.memory_budget / 4 {
                glommio::timer::sleep(TRIM_CHECK_INTERVAL).await;
            }
            release_free_memory();
            shard.trim_pending.set(false);
        })
        .detach();
    }

    /// What the memory alarm watches: ready messages in memory and delivered ones not acked.
    fn messages_in_memory(&self) -> usize {
        self.meter.bytes() + self.meter.unacked_bytes()
    }

    fn announce_flow(self: &Rc<Self>, state: PublisherFlow) {
        let every: Vec<ShardId> = (0..self.shard_count).map(ShardId).collect();
        self.tell_flow(&every, state);
    }

    /// Sets this shard's flow state as `shards` see it (this one included or not).
    fn tell_flow(self: &Rc<Self>, shards: &[ShardId], state: PublisherFlow) {
        for &shard in shards {
            if shard == self.id {
                self.set_flow(self.id, state);
            } else {
                self.post(shard, ShardMessage::Flow { state });
            }
        }
    }

    /// Queues `message` for `to` (possibly this shard); it leaves when the current task yields.
    pub fn post(self: &Rc<Self>, to: ShardId, message: ShardMessage) {
        if let Some(outbox) = self.outbox.borrow_mut().get_mut(to.index()) {
            self.outbox_bytes
                .set(self.outbox_bytes.get() + message.message_bytes());
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
                request: Box::new(request),
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
                    .map(|(index, batch)| {
                        let fresh = if index == self.id.index() {
                            std::mem::take(&mut *self.spare_local_batch.borrow_mut())
                        } else {
                            Vec::new()
                        };
                        (index, std::mem::replace(batch, fresh))
                    })
                    .collect()
            };
            self.outbox_bytes.set(0);
            if batches.is_empty() {
                break;
            }
            let mut congested = false;
            for (index, batch) in batches {
                let to = ShardId(index);
                if to == self.id {
                    let mut batch = batch;
                    self.handle_batch(self.id, batch.drain(..));
                    // Keep the emptied vector for the next round (a burst's is not kept).
                    if batch.capacity() <= OUTBOX_FLUSH_MESSAGES * 2 {
                        *self.spare_local_batch.borrow_mut() = batch;
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
                        self.count(|c| c.batches_held_back += 1);
                        let bytes: usize = batch.iter().map(ShardMessage::message_bytes).sum();
                        self.outbox_bytes.set(self.outbox_bytes.get() + bytes);
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

    /// The mailbox: handles a batch of messages from `from` (another shard, or this one), then
    /// sends the publisher confirms they made due, one ack per channel.
    pub fn handle_batch(
        self: &Rc<Self>,
        from: ShardId,
        batch: impl IntoIterator<Item = ShardMessage>,
    ) {
        for message in batch {
            self.handle(from, message);
        }
        let due = std::mem::take(&mut *self.confirms_due.borrow_mut());
        for (_, port) in due {
            port.send_confirms();
        }
    }

    /// Handles one message from `from` (another shard, or this one).
    pub fn handle(self: &Rc<Self>, from: ShardId, message: ShardMessage) {
        match message {
            ShardMessage::Meta {
                token,
                vhost,
                requester,
                request,
            } => match &self.coordinator {
                Some(coordinator) => coordinator.submit(from, token, vhost, requester, *request),
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
                queues,
                message,
                confirm,
            } => {
                self.count(|c| c.publishes_received += u64::from(from != self.id));
                if let Some(source) = self.publishers_from.get(from.index()) {
                    source.set(true);
                }
                let mut logged = Writers::new();
                let mut to_consumed_queue = false;
                let mut refused = false;
                let mut refused_letters = Vec::new();
                for key in queues {
                    {
                        // One lookup: logging the record touches no queue.
                        let mut queues = self.queues.borrow_mut();
                        let Some(owned) = queues.get_mut(&key) else {
                            continue;
                        };
                        let queue = &owned.queue;
                        if owned.policy.refuses(
                            queue.message_count(),
                            queue.content_bytes(),
                            message.body().len(),
                        ) {
                            refused = true;
                            if owned.policy.overflow == Overflow::RejectPublishDlx {
                                if let Some(target) = &owned.policy.dead_letter {
                                    refused_letters.push((owned.key.clone(), target.clone()));
                                }
                            }
                            continue;
                        }
                        to_consumed_queue |= owned.queue.consumer_count() > 0;
                        let lane = priority_lane(&message, owned.policy.max_priority);
                        let mut location = None;
                        if owned.durable && message.is_persistent() {
                            let appended = self.log_message(
                                &logged_queue(&owned.key),
                                owned.queue.next_id_in(lane),
                                &message,
                            );
                            if let Some(Appended {
                                writer,
                                location: at,
                            }) = appended
                            {
                                location = Some(at);
                                if !logged.iter().any(|w| Rc::ptr_eq(w, &writer)) {
                                    logged.push(writer);
                                }
                            }
                        }
                        let id = owned.queue.publish_in(lane, message.clone(), location);
                        owned
                            .expiry
                            .published(id, &message, owned.policy.message_ttl, now_ms);
                    }
                    self.dispatch(&key);
                }
                for (key, target) in refused_letters {
                    self.dead_letter(&key, &target, [&message], Reason::MaxLen);
                }
                if to_consumed_queue {
                    self.check_drain();
                }
                self.maybe_page_out();
                self.check_flow();
                if let Some(confirm) = confirm {
                    self.after_logged(logged, move |shard, ok| {
                        let ok = ok && !refused;
                        shard.post(from, ShardMessage::Confirmed { to: confirm, ok })
                    });
                }
            }
            ShardMessage::Flow { state } => {
                self.set_flow(from, state);
                if state == PublisherFlow::Draining {
                    self.post(from, ShardMessage::FlowHeld);
                }
            }
            ShardMessage::FlowHeld => {
                if let Some(due) = self.held_answers_due.get(from.index()) {
                    due.set(due.get().saturating_sub(1));
                }
            }
            ShardMessage::Confirmed { to, ok } => {
                let port = self.connections.borrow().get(&to.connection).cloned();
                if let Some(port) = port {
                    if port.confirmed(to.channel, to.seq, ok) {
                        let mut due = self.confirms_due.borrow_mut();
                        if !due
                            .iter()
                            .any(|(connection, _)| *connection == to.connection)
                        {
                            due.push((to.connection, port));
                        }
                    }
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
                settlement,
            } => {
                let mut logged: smallvec::SmallVec<[(MessageId, bool); 4]> =
                    smallvec::SmallVec::new();
                let mut rejected = Vec::new();
                let mut target = None;
                let durable = match self.queues.borrow_mut().get_mut(&queue) {
                    Some(owned) if owned.key.is(&queue) => {
                        match settlement {
                            Settlement::Requeue => {
                                owned.queue.requeue(&ids);
                            }
                            Settlement::Reject if owned.policy.dead_letter.is_some() => {
                                owned.queue.reject(&ids, &mut rejected);
                                target = owned.policy.dead_letter.clone();
                            }
                            Settlement::Ack | Settlement::Reject => {
                                owned.queue.ack(&ids, &mut logged);
                            }
                        }
                        if settlement != Settlement::Requeue {
                            for id in &ids {
                                owned.expiry.forget(*id);
                            }
                        }
                        owned.durable
                    }
                    // Gone, or deleted and declared again: those deliveries went with it.
                    _ => false,
                };
                self.settle_logged(&queue, durable, &logged);
                if let Some(target) = target {
                    self.discard(&queue, durable, Some(&target), &rejected, Reason::Rejected);
                }
                if settlement == Settlement::Requeue {
                    self.dispatch(&queue);
                }
            }
            ShardMessage::Get {
                token,
                queue,
                channel,
                no_ack,
            } => {
                // Expired messages leave the head before it is taken.
                let policed = self
                    .queues
                    .borrow()
                    .get(&queue)
                    .is_some_and(OwnedQueue::is_policed);
                if policed {
                    self.dispatch(&queue);
                }
                let paged = self
                    .queues
                    .borrow()
                    .get(&queue)
                    .is_some_and(|owned| owned.queue.front_is_paged());
                if paged {
                    // Read the head back first, then answer as if it had been there.
                    let shard = self.clone();
                    glommio::spawn_local(async move {
                        shard.page_in_head(&queue).await;
                        shard.handle(
                            from,
                            ShardMessage::Get {
                                token,
                                queue,
                                channel,
                                no_ack,
                            },
                        );
                    })
                    .detach();
                    return;
                }
                let mut expired = Vec::new();
                let mut dead_letter = None;
                let result = match self.queues.borrow_mut().get_mut(&queue) {
                    None => Err(no_queue(&queue)),
                    Some(owned) => {
                        owned.last_used = now_ms();
                        let mut got = owned.queue.get(channel, no_ack);
                        if let Some(got) = got.as_mut().filter(|_| owned.is_policed()) {
                            if no_ack {
                                owned.expiry.forget(got.id);
                            }
                            // What is expired behind it is gone before it is counted.
                            owned.drop_expired(now_ms(), &mut expired);
                            got.remaining = owned.queue.message_count();
                            dead_letter.clone_from(&owned.policy.dead_letter);
                        }
                        let logged = got
                            .as_ref()
                            .filter(|g| g.logged)
                            .map(|g| (g.id, g.message.is_persistent()));
                        let got = got.map(|got| (owned.key.clone(), got));
                        Ok((got, logged, owned.durable))
                    }
                };
                let result = result.map(|(got, logged, durable)| {
                    if let Some((id, persistent)) = logged {
                        if no_ack {
                            self.settle_logged(&queue, durable, &[(id, persistent)]);
                        } else if durable && persistent {
                            self.log(WalEntry::Delivered {
                                queue: logged_queue(&queue),
                                ids: smallvec::smallvec![id],
                            });
                        }
                    }
                    let target = dead_letter.as_ref();
                    self.discard(&queue, durable, target, &expired, Reason::Expired);
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
                let mut logged = Vec::new();
                let mut durable = false;
                let result = match self.queues.borrow_mut().get_mut(&queue) {
                    None => Err(no_queue(&queue)),
                    Some(owned) => {
                        durable = owned.durable;
                        let purged = owned.queue.purge(&mut logged);
                        let queue = &owned.queue;
                        owned.expiry.retain(|id| queue.holds_unacked(id));
                        Ok(purged)
                    }
                };
                self.settle_logged(&queue, durable, &logged);
                self.post(
                    from,
                    ShardMessage::Reply {
                        token,
                        reply: Reply::Count(result),
                    },
                );
            }
            ShardMessage::Stats { token, queue } => {
                // A declare (passive or not) asks: it renews an x-expires queue's lease.
                let stats = self.queues.borrow_mut().get_mut(&queue).map(|owned| {
                    owned.last_used = now_ms();
                    (owned.queue.message_count(), owned.queue.consumer_count())
                });
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
                durable,
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
                        durable,
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
                            ids: smallvec::smallvec![id],
                            settlement: Settlement::Requeue,
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
            ShardMessage::DiskAlarm { on } => {
                self.disk_alarm.set(on);
                if !on {
                    // Resumes publishers unless a shard's memory still holds them.
                    self.set_flow(self.id, self.own_flow());
                }
            }
            ShardMessage::DirectReply {
                connection,
                channel,
                key,
                message,
            } => {
                // A requester gone since is no error: the reply is dropped, as RabbitMQ drops it.
                let port = self.connections.borrow().get(&connection).cloned();
                if let Some(port) = port {
                    port.deliver_reply(channel, key, message);
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
        // Taken, not borrowed: a nested dispatch (none today) would just allocate its own.
        let mut deliveries = std::mem::take(&mut *self.deliveries.borrow_mut());
        let mut wants = Vec::new();
        let mut page_in = false;
        let mut durable = false;
        // The queue's own handle, not `key` (which may be a consumer's copy): settlements come
        // back with it.
        let mut handle = None;
        let mut expired = Vec::new();
        let mut overflowed = Vec::new();
        let mut dead_letter = None;
        let mut expiry_timer = None;
        if let Some(owned) = self.queues.borrow_mut().get_mut(key) {
            handle = Some(owned.key.clone());
            if owned.is_policed() {
                page_in = owned.dispatch_policed(&mut deliveries, &mut expired, &mut overflowed);
                if !expired.is_empty() || !overflowed.is_empty() {
                    dead_letter = owned.policy.dead_letter.clone();
                }
                let due = owned.head_deadline().filter(|due| *due >= now_ms());
                if let Some(due) = due.filter(|due| owned.expiry_timer.is_none_or(|t| t > *due)) {
                    owned.expiry_timer = Some(due);
                    expiry_timer = Some(due);
                }
            } else {
                owned.queue.dispatch(&mut deliveries);
            }
            owned.queue.credit_wanted(&mut wants);
            page_in |= owned.queue.paged_count() > 0 && owned.queue.consumer_count() > 0;
            durable = owned.durable;
        }
        if let Some(queue) = &handle {
            let target = dead_letter.as_ref();
            self.discard(queue, durable, target, &expired, Reason::Expired);
            self.discard(queue, durable, target, &overflowed, Reason::MaxLen);
            if let Some(due) = expiry_timer {
                self.arm_expiry(queue.clone(), due);
            }
        }
        // No-ack deliveries left the queue for good: their records are settled now.
        let gone: Vec<(MessageId, bool)> = deliveries
            .iter()
            .filter(|d| d.no_ack && d.logged)
            .map(|d| (d.id, d.message.is_persistent()))
            .collect();
        self.settle_logged(key, durable, &gone);
        if page_in {
            self.start_page_in(key);
        }
        for (consumer, ready) in wants {
            self.post(
                consumer.shard,
                ShardMessage::CreditWanted { consumer, ready },
            );
        }
        for delivery in deliveries.drain(..) {
            // Deliveries come only from the queue found above.
            let Some(queue) = handle.clone() else {
                break;
            };
            self.post(
                delivery.consumer.shard,
                ShardMessage::Deliver {
                    consumer: delivery.consumer,
                    queue,
                    durable,
                    owner: self.id,
                    id: delivery.id,
                    message: delivery.message,
                    redelivered: delivery.redelivered,
                },
            );
        }
        // A burst's worth of capacity is kept; a huge one (a backlog handed out) is given back.
        if deliveries.capacity() <= DELIVERIES_KEPT_MAX {
            *self.deliveries.borrow_mut() = deliveries;
        }
    }

    /// Dispatches `key` again at `due` (its head's deadline), to expire what is due then.
    fn arm_expiry(self: &Rc<Self>, key: QueueKey, due: u64) {
        let shard = self.clone();
        glommio::spawn_local(async move {
            // glommio polls a new task at once, and a timer already due may not wait: a
            // dispatch nested in the caller's would dead-letter ahead of what it dropped.
            futures_lite::future::yield_now().await;
            glommio::timer::sleep(Duration::from_millis(due.saturating_sub(now_ms()))).await;
            if let Some(owned) = shard.queues.borrow_mut().get_mut(&key) {
                if owned.expiry_timer == Some(due) {
                    owned.expiry_timer = None;
                }
            }
            shard.dispatch(&key);
        })
        .detach();
    }

    /// Messages that left `queue` undelivered for `reason`: dead-lettered to `target`, if the
    /// queue has one, and their records settled.
    fn discard(
        self: &Rc<Self>,
        queue: &QueueKey,
        durable: bool,
        target: Option<&DeadLetterTarget>,
        dropped: &[Dropped],
        reason: Reason,
    ) {
        if dropped.is_empty() {
            return;
        }
        if let Some(target) = target {
            self.dead_letter(queue, target, dropped.iter().map(|d| &d.message), reason);
        }
        let logged: Vec<(MessageId, bool)> = dropped.iter().filter_map(Dropped::logged).collect();
        self.settle_logged(queue, durable, &logged);
    }

    /// Publishes the letters of `messages`, which died in `queue`, to `target` (routed by this
    /// shard's copy of the vhost's routing table, as a publish from a connection would be). A
    /// letter that nothing routes is dropped, as RabbitMQ drops it.
    fn dead_letter<'a>(
        self: &Rc<Self>,
        queue: &QueueKey,
        target: &DeadLetterTarget,
        messages: impl IntoIterator<Item = &'a shards::Message>,
        reason: Reason,
    ) {
        let now_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let mut routed = Vec::new();
        for message in messages {
            let Some(letter) = dead_letter::letter(message, &queue.name, reason, target, now_secs)
            else {
                warn!(
                    "{}: queue '{}': a message's properties could not be read; not dead-lettered",
                    self.id, queue.name
                );
                continue;
            };
            self.with_routing(&queue.vhost, |routing| {
                routing.route(
                    &letter.exchange,
                    &letter.routing_key,
                    Some(&letter.headers),
                    &mut routed,
                )
            });
            routed.retain(|to| !letter.cycles_back_to(&to.key.name));
            routed.sort_by_key(|to| to.owner.index());
            for owned_by_one in routed.chunk_by(|a, b| a.owner == b.owner) {
                self.post(
                    owned_by_one[0].owner,
                    ShardMessage::Publish {
                        queues: owned_by_one.iter().map(|to| to.key.clone()).collect(),
                        message: letter.message.clone(),
                        confirm: None,
                    },
                );
            }
        }
    }

    fn after_consumer_removed(self: &Rc<Self>, key: &QueueKey) {
        let unused_auto_delete = match self.queues.borrow_mut().get_mut(key) {
            Some(owned) if owned.queue.consumer_count() == 0 => {
                owned.last_used = now_ms();
                owned.auto_delete && owned.had_consumer
            }
            _ => false,
        };
        if unused_auto_delete {
            debug!(
                "{}: auto-delete queue '{}' lost its last consumer",
                self.id, key.name
            );
            self.delete_if_unused(key);
        }
    }

    /// Asks the coordinator to delete `key` unless it has consumers by then.
    fn delete_if_unused(self: &Rc<Self>, key: &QueueKey) {
        self.post(
            COORDINATOR,
            ShardMessage::Meta {
                token: 0,
                vhost: key.vhost.clone(),
                requester: ConnectionRef {
                    shard: self.id,
                    connection: u64::MAX,
                },
                request: Box::new(MetaRequest::DeleteUnusedQueue {
                    name: key.name.clone(),
                }),
            },
        );
    }

    /// Deletes the queue `key` names once it has gone unused for `expires` ms (x-expires),
    /// looking again whenever it might have.
    fn watch_lease(self: &Rc<Self>, key: QueueKey, expires: u64) {
        let shard = self.clone();
        glommio::spawn_local(async move {
            let mut wait = expires;
            loop {
                glommio::timer::sleep(Duration::from_millis(wait.max(1))).await;
                let lease = shard
                    .queues
                    .borrow()
                    .get(&key)
                    .filter(|owned| owned.key.is(&key))
                    .map(|owned| (owned.queue.consumer_count(), owned.last_used));
                // Gone, or deleted and declared again (which watches its own lease).
                let Some((consumers, last_used)) = lease else {
                    return;
                };
                let idle_until = last_used.saturating_add(expires);
                let now = now_ms();
                wait = if consumers > 0 {
                    expires
                } else if now >= idle_until {
                    debug!("{}: queue '{}' expired unused", shard.id, key.name);
                    shard.delete_if_unused(&key);
                    // A consumer may come first: look again later.
                    expires
                } else {
                    idle_until - now
                };
            }
        })
        .detach();
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
        } else if let Some(wal) = self.wal.borrow().as_ref() {
            wal.forget_queue(&logged_queue(key));
            self.schedule_reclaim();
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
                // The routing table's handle: publishes routed here carry it, and find the
                // queue by pointer.
                let key = self
                    .routing
                    .borrow()
                    .get(vhost)
                    .and_then(|routing| routing.queue_key(&def.name).cloned())
                    .unwrap_or_else(|| QueueKey::new(vhost.clone(), def.name.clone()));
                if self.queues.borrow().contains_key(&key) {
                    return;
                }
                let policy = QueuePolicy::from_arguments(&def.arguments);
                if let Some(ttl) = policy.message_ttl {
                    // Messages restored from the log expire from now: look then.
                    self.arm_expiry(key.clone(), now_ms().saturating_add(ttl));
                }
                if let Some(expires) = policy.expires {
                    self.watch_lease(key.clone(), expires);
                }
                let mut queue = Queue::with_meter(self.meter.clone());
                queue.set_single_active(policy.single_active_consumer);
                let owned = OwnedQueue {
                    key: key.clone(),
                    queue,
                    durable: def.durable,
                    auto_delete: def.auto_delete,
                    had_consumer: false,
                    policy,
                    expiry: Expiry::new(now_ms()),
                    expiry_timer: None,
                    last_used: now_ms(),
                };
                self.queues.borrow_mut().insert(key, owned);
            }
            MetaOp::DeleteQueue { name } => {
                let key = QueueKey::new(vhost.clone(), name.clone());
                // Normally gone already (DeleteQueueData); an exclusive queue's owner may learn
                // of the delete only here.
                if self.queues.borrow().contains_key(&key) {
                    let _ = self.delete_queue_data(&key, false, false);
                }
            }
            _ => {}
        }
    }

    /// Appends to this shard's log, if it has one; returns the segment log that holds it and
    /// where the record lies.
    fn log(self: &Rc<Self>, entry: WalEntry) -> Option<Appended> {
        let reclaimable = matches!(
            entry,
            WalEntry::Settle { .. } | WalEntry::DeleteQueue { .. }
        );
        let wal = self.wal.borrow().clone()?;
        let appended = wal.append(&entry);
        if reclaimable {
            self.schedule_reclaim();
        }
        Some(appended)
    }

    /// Logs a persistent message's Enqueue record (not cloning the message into an entry).
    fn log_message(
        &self,
        queue: &LoggedQueue,
        id: MessageId,
        message: &shards::Message,
    ) -> Option<Appended> {
        let wal = self.wal.borrow().clone()?;
        Some(wal.append_message(MessageRecord::Enqueue, queue, id, message))
    }

    /// Past the memory budget, pages messages out of the in-memory runs at the queues' ends (see
    /// `Queue::page_out`), down to three quarters of the budget: first those whose records are
    /// durable already (persistent messages on durable queues); if that is not enough, others
    /// are written out as PagedOut records (a quarter budget per pass, half a budget unsynced at
    /// most) and paged once those are synced.
    fn maybe_page_out(self: &Rc<Self>) {
        let used = self.meter.bytes();
        if used <= self.memory_budget.max(self.page_out_floor.get()) || self.draining.get() {
            return;
        }
        self.trim_after_burst();
        let Some(wal) = self.wal.borrow().clone() else {
            return;
        };
        let target = used - self.memory_budget / 4 * 3;
        let mut freed = 0;
        let mut written: Vec<(QueueKey, Vec<(MessageId, Location)>)> = Vec::new();
        let mut bytes_written = 0;
        {
            let mut queues = self.queues.borrow_mut();
            for owned in queues.values_mut() {
                if freed >= target {
                    break;
                }
                let keep = page_keep(owned);
                freed += owned
                    .queue
                    .page_out(target - freed, keep, |l| wal.is_durable(l));
            }
            // Write out at most a quarter budget per pass, and half a budget (at least
            // `PAGE_OUT_IN_FLIGHT_MIN`) until synced: the log holds copies of what it writes
            // until then. Records are encoded from the queued messages in place (appending
            // touches no queue).
            let in_flight_max = (self.memory_budget / 2).max(PAGE_OUT_IN_FLIGHT_MIN);
            let room = in_flight_max.saturating_sub(self.page_out_writing.get());
            let mut wanted = target
                .saturating_sub(freed)
                .min(self.memory_budget / 4)
                .min(room);
            for (key, owned) in queues.iter() {
                if wanted == 0 {
                    break;
                }
                let batch = owned.queue.unlogged_from_back(wanted, page_keep(owned));
                if batch.is_empty() {
                    continue;
                }
                let queue = logged_queue(key);
                // A message's size counts 128 bytes of bookkeeping, more than a record's framing
                // and queue names take in the usual case: room for the whole batch at once.
                wal.reserve(batch.iter().map(|(_, m)| m.size_bytes()).sum());
                let mut placed = Vec::with_capacity(batch.len());
                for (id, message) in batch {
                    wanted = wanted.saturating_sub(message.size_bytes());
                    bytes_written += message.size_bytes();
                    let appended = wal.append_message(MessageRecord::PagedOut, &queue, id, message);
                    placed.push((id, appended.location));
                }
                written.push((key.clone(), placed));
            }
        }
        for (key, placed) in written {
            if let Some(owned) = self.queues.borrow_mut().get_mut(&key) {
                for (id, location) in placed {
                    owned.queue.relocate(id, location);
                }
            }
        }
        if bytes_written > 0 {
            self.page_out_writing
                .set(self.page_out_writing.get() + bytes_written);
            let shard = self.clone();
            wal.after_all_synced(move |_| {
                shard
                    .page_out_writing
                    .set(shard.page_out_writing.get() - bytes_written);
                shard.page_out_floor.set(0);
                shard.maybe_page_out();
            });
        }
        // What is left cannot be paged now (not yet durable, or being written): try again only
        // after memory grew by another eighth of the budget, or the writes are synced.
        let now = self.meter.bytes();
        self.page_out_floor.set(if now > self.memory_budget {
            now + self.memory_budget / 8
        } else {
            0
        });
        debug!(
            "{}: paged out {freed} bytes; {now} bytes of messages in memory",
            self.id
        );
    }

    /// Reads back the paged-out messages at the head of a consumed queue, in the background;
    /// delivers them once they are in.
    fn start_page_in(self: &Rc<Self>, key: &QueueKey) {
        if self.paging_in.borrow().contains(key) {
            return;
        }
        let wanted = self.page_in_wanted(key);
        if wanted.is_empty() {
            return;
        }
        self.paging_in.borrow_mut().insert(key.clone());
        let shard = self.clone();
        let key = key.clone();
        glommio::spawn_local(async move {
            shard.page_in(&key, wanted).await;
            shard.paging_in.borrow_mut().remove(&key);
            shard.dispatch(&key);
            shard.maybe_page_out();
        })
        .detach();
    }

    /// Waits until the first ready message of `key` is in memory (or the queue is empty or
    /// gone), reading it back if no page-in is under way.
    async fn page_in_head(self: &Rc<Self>, key: &QueueKey) {
        loop {
            let paged = self
                .queues
                .borrow()
                .get(key)
                .is_some_and(|owned| owned.queue.front_is_paged());
            if !paged {
                return;
            }
            if self.paging_in.borrow().contains(key) {
                glommio::timer::sleep(Duration::from_micros(200)).await;
                continue;
            }
            let wanted = self.page_in_wanted(key);
            self.paging_in.borrow_mut().insert(key.clone());
            self.page_in(key, wanted).await;
            self.paging_in.borrow_mut().remove(key);
        }
    }

    /// The paged-out messages at the head of `key` to read back next.
    fn page_in_wanted(&self, key: &QueueKey) -> Vec<(MessageId, Location)> {
        self.queues.borrow().get(key).map_or(Vec::new(), |owned| {
            owned.queue.paged_window(PAGE_IN_WINDOW, PAGE_IN_BYTES_MAX)
        })
    }

    async fn page_in(self: &Rc<Self>, key: &QueueKey, wanted: Vec<(MessageId, Location)>) {
        // glommio polls a new task at once: let the caller release its borrows first.
        futures_lite::future::yield_now().await;
        let Some(wal) = self.wal.borrow().clone() else {
            return;
        };
        let locations: Vec<Location> = wanted.iter().map(|(_, l)| *l).collect();
        let messages = wal.read(&locations).await;
        let mut lost = Vec::new();
        if let Some(owned) = self.queues.borrow_mut().get_mut(key) {
            for ((id, location), message) in wanted.into_iter().zip(messages) {
                match message {
                    Some(message) => {
                        owned.queue.fill(id, message);
                    }
                    None => {
                        // Compaction may have moved the record while it was being read: the
                        // next page-in reads it from its new place.
                        let moved = owned
                            .queue
                            .find(id)
                            .is_some_and(|found| found.location != Some(location));
                        let dropped = if moved {
                            None
                        } else {
                            owned.queue.drop_unreadable(id)
                        };
                        if let Some(persistent) = dropped {
                            lost.push((id, persistent));
                            error!(
                                "{}: queue '{}': message {id} could not be read back from \
                                 log segment {} at offset {}; it is lost",
                                self.id, key.name, location.segment, location.offset
                            );
                        }
                    }
                }
            }
        }
        let durable = self.queues.borrow().get(key).is_some_and(|o| o.durable);
        self.settle_logged(key, durable, &lost);
    }

    /// Messages that left a queue for good, with records in the log: (id, persistent). On a
    /// durable queue the persistent ones get a Settle record; the others only had PagedOut
    /// copies, which replay ignores, so they are just forgotten.
    fn settle_logged(self: &Rc<Self>, key: &QueueKey, durable: bool, logged: &[(MessageId, bool)]) {
        // The usual case (transient messages kept in memory): nothing was logged.
        if logged.is_empty() {
            return;
        }
        let settled = |wanted: bool| -> LoggedIds {
            logged
                .iter()
                .filter(|(_, persistent)| (durable && *persistent) == wanted)
                .map(|(id, _)| *id)
                .collect()
        };
        let records = settled(true);
        if !records.is_empty() {
            self.log(WalEntry::Settle {
                queue: logged_queue(key),
                ids: records,
            });
        }
        let copies = settled(false);
        if !copies.is_empty() {
            if let Some(wal) = self.wal.borrow().as_ref() {
                wal.forget_settled(&logged_queue(key), copies);
            }
            self.schedule_reclaim();
        }
    }

    /// Runs `then` once the records in `logged` are durable (at once if there are none).
    fn after_logged(
        self: &Rc<Self>,
        logged: Writers,
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
            let draining = match wal {
                Some(wal) => wal.reclaim(shard.as_ref()).await,
                None => false,
            };
            shard.reclaiming.set(false);
            if draining && !shard.reclaim_retry.replace(true) {
                // Settlements call reclaim again while consumers drain; this covers them
                // stopping before the segment is empty.
                glommio::timer::sleep(RECLAIM_RETRY).await;
                shard.reclaim_retry.set(false);
                shard.schedule_reclaim();
            }
        })
        .detach();
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
        log.append_with(|out| meta_log::encode(vhost, op, out));
        let (sender, receiver) = oneshot::channel();
        log.after_sync(move |ok| sender.send(ok));
        receiver.await.unwrap_or(false)
    }

    /// Start-up, before the shard serves: applies the durable metadata, replays this shard's
    /// write-ahead log segments (one at a time, keeping only where each live message lies) into
    /// its durable queues, paged out, and opens a new segment for what comes next. The old
    /// segments stay until reclaiming deletes them. The coordinator's shard also rewrites the
    /// metadata log.
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
        let mut recovery = Recovery::new();
        let mut retained = Vec::new();
        for (generation, path) in &files {
            let Ok(tag) = u32::try_from(*generation) else {
                return Err(format!(
                    "{}: log generation {generation} out of range",
                    self.id
                ));
            };
            // Before the shard serves: a blocking read is fine here (one segment at a time).
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
            let mut enqueued_count = 0;
            for record in &replayed.records {
                match WalEntry::decode(record) {
                    Ok(entry) => {
                        enqueued_count += u64::from(matches!(
                            entry,
                            WalEntry::Enqueue { .. } | WalEntry::PagedOut { .. }
                        ));
                        let location = Location {
                            segment: tag,
                            len: (record.payload.len() + RECORD_HEADER_BYTES) as u32,
                            offset: record.offset,
                        };
                        recovery.apply(&entry, location);
                    }
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
            retained.push(RetainedSegment {
                generation: *generation,
                path: path.clone(),
                bytes: replayed.valid_bytes,
                enqueued_count,
                live: HashMap::new(),
            });
        }
        let mut restored = 0usize;
        let mut orphaned = 0usize;
        let mut orphans = Vec::new();
        for (logged, recovered) in recovery.finish() {
            let key = QueueKey::new(
                ShortStr::from_bytes(logged.vhost.clone()).unwrap_or_default(),
                ShortStr::from_bytes(logged.name.clone()).unwrap_or_default(),
            );
            let mut queues = self.queues.borrow_mut();
            let Some(owned) = queues.get_mut(&key).filter(|owned| owned.durable) else {
                if !recovered.messages.is_empty() || recovered.next_sequence > 0 {
                    orphaned += recovered.messages.len();
                    orphans.push(logged);
                }
                continue;
            };
            restored += recovered.messages.len();
            owned.queue.reserve(recovered.messages.len());
            for message in &recovered.messages {
                owned
                    .queue
                    .restore(message.id, message.location, message.redelivered);
                let segment = retained
                    .binary_search_by_key(&u64::from(message.location.segment), |s| s.generation)
                    .ok()
                    .and_then(|index| retained.get_mut(index));
                if let Some(segment) = segment {
                    segment
                        .live
                        .entry(logged.clone())
                        .or_insert_with(RoaringTreemap::new)
                        .insert(message.id);
                }
            }
            owned.queue.reserve_sequence_below(recovered.next_sequence);
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
        let generation = files.last().map_or(1, |(generation, _)| generation + 1);
        let wal = SegmentedWal::open(
            &dir,
            retained,
            generation,
            self.segment_bytes_max,
            self.compact_live_fraction,
        )
        .await
        .map_err(|e| format!("{}: cannot create a log in {}: {e}", self.id, dir.display()))?;
        // Queues deleted while their last records were not yet logged: make it explicit, so a
        // new queue of the same name never inherits their messages.
        for queue in orphans {
            wal.append(&WalEntry::DeleteQueue { queue });
        }
        let (sender, receiver) = oneshot::channel();
        wal.after_all_synced(move |ok| sender.send(ok));
        if receiver.await != Some(true) {
            return Err(format!("{}: the new log could not be written", self.id));
        }
        sync_directory(&dir).map_err(|e| format!("{}: {e}", self.id))?;
        *self.wal.borrow_mut() = Some(wal);
        self.schedule_reclaim();

        if self.coordinator.is_some() {
            let path = data_dir.join(format!("meta-{:016}.log", metadata.next_generation));
            let log = LogWriter::create(&path)
                .await
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            log.append_with(|out| meta_log::encode_header(self.shard_count, out));
            for (vhost, op) in &metadata.ops {
                log.append_with(|out| meta_log::encode(vhost, op, out));
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
            // Nothing may follow the clean-shutdown mark: stop compaction first.
            wal.begin_close();
            // Delivery marks are not logged as deliveries happen; record the flags now.
            for (key, owned) in self.queues.borrow().iter().filter(|(_, o)| o.durable) {
                let ids = owned.queue.delivered_persistent_ids();
                for chunk in ids.chunks(MARKS_PER_RECORD) {
                    wal.append(&WalEntry::Delivered {
                        queue: logged_queue(key),
                        ids: chunk.into(),
                    });
                }
            }
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

    pub fn with_queue_def<T>(&self, key: &QueueKey, f: impl FnOnce(&QueueDef) -> T) -> Option<T> {
        self.routing
            .borrow()
            .get(&key.vhost)
            .and_then(|routing| routing.queue(&key.name).map(f))
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

/// Ready messages the pager leaves in memory at the head of a queue: a consumed queue keeps the
/// window its deliveries come from; any other keeps its first message.
fn page_keep(owned: &OwnedQueue) -> usize {
    if owned.queue.consumer_count() > 0 {
        PAGE_IN_WINDOW
    } else {
        1
    }
}

impl CompactionHost for ShardBroker {
    fn find(&self, queue: &LoggedQueue, id: MessageId) -> Option<LiveMessage> {
        let key = queue_key(queue)?;
        let mut queues = self.queues.borrow_mut();
        let owned = queues.get_mut(&key)?;
        let queue_durable = owned.durable;
        let found = owned.queue.find(id)?;
        let durable = queue_durable && found.persistent;
        Some(LiveMessage {
            message: found.message.cloned(),
            location: found.location,
            delivered: found.delivered,
            durable,
        })
    }

    fn relocate(&self, queue: &LoggedQueue, id: MessageId, location: Location) {
        if let Some(key) = queue_key(queue) {
            if let Some(owned) = self.queues.borrow_mut().get_mut(&key) {
                owned.queue.relocate(id, location);
            }
        }
    }

    fn relocations_done(&self, queue: &LoggedQueue) {
        if let Some(key) = queue_key(queue) {
            if let Some(owned) = self.queues.borrow_mut().get_mut(&key) {
                owned.queue.freeze_paged();
            }
        }
    }
}

fn queue_key(queue: &LoggedQueue) -> Option<QueueKey> {
    Some(QueueKey::new(
        ShortStr::from_bytes(queue.vhost.clone()).ok()?,
        ShortStr::from_bytes(queue.name.clone()).ok()?,
    ))
}

fn logged_queue(key: &QueueName) -> LoggedQueue {
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

pub fn no_queue(queue: &QueueName) -> AmqpError {
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
