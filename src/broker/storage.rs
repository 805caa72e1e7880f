//! A shard's write-ahead log as a sequence of segment files, with the bookkeeping that keeps
//! disk use proportional to live data.
//!
//! Records go to the newest segment (`wal-<generation>.log`); when it passes
//! `storage.segment_bytes_max` the log rolls to a fresh one (created ahead of time, so rolling
//! never waits). Each segment keeps, per queue, a roaring bitmap of the message ids whose
//! Enqueue record it holds and that are not settled yet.
//!
//! Reclaiming works from the oldest segment only: a segment's Settle records may refer to
//! messages of older segments, so deleting one out of order could bring settled messages back
//! at replay. The oldest segment is deleted once nothing in it is live; when few of its messages
//! are live (below `storage.compact_live_fraction`), they are appended again to the newest
//! segment first (compaction), then it is deleted. Not while they are being consumed, though:
//! a backlog drained in order leaves each segment half live on its way out, and compacting then
//! rewrote every second message it was about to settle. A head segment whose live count fell
//! since a recent look, at a pace that empties it within `DRAIN_HORIZON`, is left to drain
//! (`reclaim` says so, and is called again later).
//!
//! Segments also serve reads: a paged-out message is read back from its record's
//! [`Location`]. A segment left by an earlier run is kept as it is (read-only, no writer) until
//! reclaiming deletes it, so start-up never rewrites a backlog. A compacted message is only
//! pointed at its new place once its new record is durable, and its old segment only goes
//! after that.
//!
//! The record formats and the replay fold live in `shards::wal`; this module only decides which
//! file a record goes to, when a file goes away, and reads records back.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use ahash::HashMap;
use bytes::Bytes;
use glommio::io::DmaFile;
use log::{debug, warn};
use roaring::RoaringTreemap;
use shards::record;
use shards::wal::{self, LoggedIds, LoggedQueue, MessageRecord, WalEntry};
use shards::{Location, Message, MessageId};

use crate::runtime::log_file::LogWriter;

/// Messages compacted per reclaim call at most: compaction is background work and must not
/// stall the shard's message path.
const COMPACT_MESSAGES_PER_CALL: usize = 4096;
/// One read of paged-out records covers at most this many bytes.
const READ_BYTES_MAX: u64 = 1 << 20;
/// A sparse head segment is not compacted while consumers settle its live messages fast enough
/// to empty it within this.
const DRAIN_HORIZON: Duration = Duration::from_secs(10);
/// A segment counts as draining only if its live count fell since a look at most this old:
/// settlements call `reclaim` all the time while consumers are at work, so an older look means
/// they stopped.
const DRAIN_LOOK_MAX_AGE: Duration = Duration::from_millis(250);
/// How many of the oldest segments each look notes: one settlement (an ack with `multiple`) can
/// empty several segments at once, and the one that becomes the head needs a history.
const LOOKED_SEGMENTS: usize = 8;

struct Segment {
    generation: u64,
    path: PathBuf,
    /// None for a segment an earlier run wrote: it is only read, never appended to.
    writer: Option<Rc<LogWriter>>,
    /// Opened on the first read.
    reader: Option<Rc<DmaFile>>,
    bytes: u64,
    live: HashMap<LoggedQueue, RoaringTreemap>,
    live_count: u64,
    enqueued_count: u64,
    /// When `reclaim` last looked at this segment (one of the `LOOKED_SEGMENTS` oldest), and its
    /// live count then.
    looked: Cell<Option<(Instant, u64)>>,
}

impl Segment {
    fn new(generation: u64, path: PathBuf, writer: Rc<LogWriter>) -> Segment {
        Segment {
            generation,
            path,
            writer: Some(writer),
            reader: None,
            bytes: 0,
            live: HashMap::default(),
            live_count: 0,
            enqueued_count: 0,
            looked: Cell::new(None),
        }
    }
}

/// A segment an earlier run left, as replay found it.
pub struct RetainedSegment {
    pub generation: u64,
    pub path: PathBuf,
    /// Bytes of intact records.
    pub bytes: u64,
    /// Enqueue records it holds.
    pub enqueued_count: u64,
    /// Live messages whose (latest) Enqueue record it holds.
    pub live: HashMap<LoggedQueue, RoaringTreemap>,
}

/// What was appended: the log to wait on for durability, and where the record lies.
pub struct Appended {
    pub writer: Rc<LogWriter>,
    pub location: Location,
}

/// A live message as compaction sees it.
pub struct LiveMessage {
    /// The body, unless it is paged out.
    pub message: Option<Message>,
    /// Where its record lies.
    pub location: Option<Location>,
    /// Delivered before.
    pub delivered: bool,
    /// Logged as Enqueue (persistent on a durable queue), not as a PagedOut copy.
    pub durable: bool,
}

/// What compaction needs from the shard's queues.
pub trait CompactionHost {
    /// A live message; None if the queue no longer has it.
    fn find(&self, queue: &LoggedQueue, id: MessageId) -> Option<LiveMessage>;
    /// The message's record now lies at `location`.
    fn relocate(&self, queue: &LoggedQueue, id: MessageId, location: Location);
    /// A round of relocations into `queue` is over (its paged messages, unpacked to be moved,
    /// can be packed again).
    fn relocations_done(&self, queue: &LoggedQueue);
}

pub struct SegmentedWal {
    dir: PathBuf,
    segment_bytes_max: u64,
    compact_live_fraction: f64,
    segments: RefCell<VecDeque<Segment>>,
    next_generation: Cell<u64>,
    spare: RefCell<Option<(u64, PathBuf, Rc<LogWriter>)>>,
    creating_spare: Cell<bool>,
    /// A clean shutdown is under way: reclaiming appends nothing more.
    closing: Cell<bool>,
}

/// The log writers a record went to: one in the common case, so kept inline.
pub type Writers = smallvec::SmallVec<[Rc<LogWriter>; 1]>;

/// Runs `callback(ok)` once everything appended so far to each of `writers` is durable (`ok`:
/// all of them succeeded).
pub fn after_synced(mut writers: Writers, callback: impl FnOnce(bool) + 'static) {
    if writers.len() <= 1 {
        // The common case (one active segment) needs no shared countdown.
        match writers.pop() {
            Some(writer) => writer.after_sync(callback),
            None => callback(true),
        }
        return;
    }
    let remaining = Rc::new(Cell::new(writers.len()));
    let all_ok = Rc::new(Cell::new(true));
    let callback = Rc::new(RefCell::new(Some(callback)));
    for writer in writers {
        let (remaining, all_ok, callback) = (remaining.clone(), all_ok.clone(), callback.clone());
        writer.after_sync(move |ok| {
            all_ok.set(all_ok.get() && ok);
            remaining.set(remaining.get() - 1);
            if remaining.get() == 0 {
                if let Some(callback) = callback.borrow_mut().take() {
                    callback(all_ok.get());
                }
            }
        });
    }
}

/// A message record for `queue` and `id` went to the active segment: it is live there.
fn account_live(segments: &mut VecDeque<Segment>, queue: &LoggedQueue, id: MessageId) {
    if let Some(active) = segments.back_mut() {
        // Looked up first: cloning the name costs two refcount updates per record, and the queue
        // is almost always there already.
        let live = match active.live.get_mut(queue) {
            Some(live) => live,
            None => active.live.entry(queue.clone()).or_default(),
        };
        if live.insert(id) {
            active.live_count += 1;
            active.enqueued_count += 1;
        }
    }
}

pub fn segment_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("wal-{generation:016}.log"))
}

impl SegmentedWal {
    /// Opens the log: the segments an earlier run left (oldest first), then a new segment,
    /// `wal-<generation>.log`, that takes every append from here on.
    pub async fn open(
        dir: &Path,
        retained: Vec<RetainedSegment>,
        generation: u64,
        segment_bytes_max: u64,
        compact_live_fraction: f64,
    ) -> std::io::Result<Rc<SegmentedWal>> {
        let path = segment_path(dir, generation);
        let writer = LogWriter::create(&path).await?;
        let mut segments: VecDeque<Segment> = retained
            .into_iter()
            .map(|r| Segment {
                generation: r.generation,
                path: r.path,
                writer: None,
                reader: None,
                bytes: r.bytes,
                live_count: r.live.values().map(RoaringTreemap::len).sum(),
                live: r.live,
                enqueued_count: r.enqueued_count,
                looked: Cell::new(None),
            })
            .collect();
        segments.push_back(Segment::new(generation, path, writer));
        Ok(Rc::new(SegmentedWal {
            dir: dir.to_path_buf(),
            segment_bytes_max,
            compact_live_fraction,
            segments: RefCell::new(segments),
            next_generation: Cell::new(generation + 1),
            spare: RefCell::new(None),
            creating_spare: Cell::new(false),
            closing: Cell::new(false),
        }))
    }

    /// Stops reclaiming for good (the shard is about to log its clean shutdown, which must be
    /// the last record).
    pub fn begin_close(&self) {
        self.closing.set(true);
    }

    /// Segment files in use.
    pub fn segment_count(&self) -> usize {
        self.segments.borrow().len()
    }

    /// Appends one entry; returns the log that holds it (wait on that one for durability) and
    /// where the record lies.
    pub fn append(self: &Rc<Self>, entry: &WalEntry) -> Appended {
        let appended = self.append_record(|out| entry.encode(out));
        self.account(entry);
        self.maybe_roll();
        appended
    }

    /// `append` of an Enqueue or PagedOut record made from borrowed parts, so that logging a
    /// queued message does not clone it into a `WalEntry` (see `wal::encode_message`).
    pub fn append_message(
        self: &Rc<Self>,
        record: MessageRecord,
        queue: &LoggedQueue,
        id: MessageId,
        message: &Message,
    ) -> Appended {
        let appended =
            self.append_record(|out| wal::encode_message(out, record, queue, id, message));
        account_live(&mut self.segments.borrow_mut(), queue, id);
        self.maybe_roll();
        appended
    }

    /// Makes room for about `bytes` of records about to be appended (see `LogWriter::reserve`).
    pub fn reserve(&self, bytes: usize) {
        if let Some(writer) = self
            .segments
            .borrow()
            .back()
            .and_then(|s| s.writer.as_ref())
        {
            writer.reserve(bytes);
        }
    }

    /// Appends one framed record that `encode` writes to the active segment.
    fn append_record(&self, encode: impl FnOnce(&mut bytes::BytesMut) -> u8) -> Appended {
        let mut segments = self.segments.borrow_mut();
        let Some(active) = segments.back_mut() else {
            unreachable!("a log always has an active segment");
        };
        let Some(writer) = active.writer.clone() else {
            unreachable!("the newest segment always has a writer");
        };
        let len = writer.append_with(encode);
        let location = Location {
            segment: generation_tag(active.generation),
            len: u32::try_from(len).unwrap_or(u32::MAX),
            offset: active.bytes,
        };
        active.bytes += len as u64;
        Appended { writer, location }
    }

    /// Runs `callback(ok)` once everything appended so far, in every segment, is durable.
    pub fn after_all_synced(&self, callback: impl FnOnce(bool) + 'static) {
        let writers: Writers = self
            .segments
            .borrow()
            .iter()
            .filter_map(|s| s.writer.clone())
            .collect();
        after_synced(writers, callback);
    }

    /// Whether the record at `location` is on disk (a message may be paged out only then).
    pub fn is_durable(&self, location: &Location) -> bool {
        let segments = self.segments.borrow();
        let Some(segment) = find_segment(&segments, location.segment) else {
            return false;
        };
        segment
            .writer
            .as_ref()
            .is_none_or(|writer| location.end() <= writer.synced_bytes())
    }

    /// Reads messages back from their Enqueue records, in the order given; None for a record
    /// that cannot be read or does not check out (a missing file, a bad checksum).
    pub async fn read(&self, locations: &[Location]) -> Vec<Option<Message>> {
        let mut out = Vec::with_capacity(locations.len());
        let mut start = 0;
        while start < locations.len() {
            // A run of records that lie back to back in one segment: one read.
            let first = locations[start];
            let mut end = start + 1;
            while end < locations.len()
                && locations[end].segment == first.segment
                && locations[end].offset == locations[end - 1].end()
                && locations[end].end() - first.offset <= READ_BYTES_MAX
            {
                end += 1;
            }
            let run = &locations[start..end];
            let span = run[run.len() - 1].end() - first.offset;
            match self.read_span(first.segment, first.offset, span).await {
                Some(image) => {
                    for location in run {
                        let from = (location.offset - first.offset) as usize;
                        let to = from + location.len as usize;
                        out.push(if to <= image.len() {
                            decode_message(image.slice(from..to))
                        } else {
                            None
                        });
                    }
                }
                None => out.extend(run.iter().map(|_| None)),
            }
            start = end;
        }
        out
    }

    async fn read_span(&self, segment: u32, offset: u64, len: u64) -> Option<Bytes> {
        let (reader, path) = {
            let segments = self.segments.borrow();
            let found = find_segment(&segments, segment)?;
            (found.reader.clone(), found.path.clone())
        };
        let reader = match reader {
            Some(reader) => reader,
            None => {
                let opened = match DmaFile::open(&path).await {
                    Ok(file) => Rc::new(file),
                    Err(e) => {
                        warn!("cannot open log segment {}: {e}", path.display());
                        return None;
                    }
                };
                let mut segments = self.segments.borrow_mut();
                if let Some(found) = find_segment_mut(&mut segments, segment) {
                    found.reader = Some(opened.clone());
                }
                opened
            }
        };
        match reader.read_at(offset, len as usize).await {
            Ok(result) if result.len() as u64 == len => Some(Bytes::copy_from_slice(&result)),
            Ok(result) => {
                warn!(
                    "log segment {}: short read at {offset}: {} of {len} bytes",
                    path.display(),
                    result.len()
                );
                None
            }
            Err(e) => {
                warn!(
                    "log segment {}: read at {offset} failed: {e}",
                    path.display()
                );
                None
            }
        }
    }

    fn account(&self, entry: &WalEntry) {
        let mut segments = self.segments.borrow_mut();
        match entry {
            WalEntry::Enqueue { queue, id, .. } | WalEntry::PagedOut { queue, id, .. } => {
                account_live(&mut segments, queue, *id);
            }
            WalEntry::Settle { queue, ids } => {
                for id in ids {
                    for segment in segments.iter_mut() {
                        if let Some(live) = segment.live.get_mut(queue) {
                            if live.remove(*id) {
                                segment.live_count -= 1;
                                break;
                            }
                        }
                    }
                }
            }
            WalEntry::DeleteQueue { queue } => {
                for segment in segments.iter_mut() {
                    if let Some(live) = segment.live.remove(queue) {
                        segment.live_count -= live.len();
                    }
                }
            }
            WalEntry::Delivered { .. } | WalEntry::CleanShutdown => {}
        }
    }

    /// Messages with PagedOut records left their queue: their records are dead now (no record
    /// is written; replay ignores PagedOut records anyway).
    pub fn forget_settled(&self, queue: &LoggedQueue, ids: LoggedIds) {
        self.account(&WalEntry::Settle {
            queue: queue.clone(),
            ids,
        });
    }

    /// A queue without durable records was deleted: its PagedOut records are dead.
    pub fn forget_queue(&self, queue: &LoggedQueue) {
        self.account(&WalEntry::DeleteQueue {
            queue: queue.clone(),
        });
    }

    fn maybe_roll(self: &Rc<Self>) {
        let active_bytes = self.segments.borrow().back().map_or(0, |s| s.bytes);
        if active_bytes >= self.segment_bytes_max / 2
            && self.spare.borrow().is_none()
            && !self.creating_spare.replace(true)
        {
            let generation = self.next_generation.get();
            self.next_generation.set(generation + 1);
            let path = segment_path(&self.dir, generation);
            let wal = self.clone();
            glommio::spawn_local(async move {
                match LogWriter::create(&path).await {
                    Ok(writer) => *wal.spare.borrow_mut() = Some((generation, path, writer)),
                    Err(e) => warn!("cannot create log segment {}: {e}", path.display()),
                }
                wal.creating_spare.set(false);
            })
            .detach();
        }
        if active_bytes >= self.segment_bytes_max {
            if let Some((generation, path, writer)) = self.spare.borrow_mut().take() {
                debug!("log rolls to {}", path.display());
                let mut segments = self.segments.borrow_mut();
                if let Some(rolled_past) = segments.back().and_then(|s| s.writer.as_ref()) {
                    rolled_past.seal();
                }
                segments.push_back(Segment::new(generation, path, writer));
            }
        }
    }

    /// Deletes the oldest segments that hold nothing live, compacting the oldest one first when
    /// little of it is live. Returns true if it left a sparse head segment to drain: call it
    /// again later, in case no settlement comes to do so.
    pub async fn reclaim(self: &Rc<Self>, host: &dyn CompactionHost) -> bool {
        let mut budget = COMPACT_MESSAGES_PER_CALL;
        loop {
            if self.closing.get() {
                return false;
            }
            let (live_count, enqueued_count, count) = {
                let segments = self.segments.borrow();
                let Some(head) = segments.front() else {
                    return false;
                };
                (head.live_count, head.enqueued_count, segments.len())
            };
            if count < 2 {
                return false;
            }
            if live_count > 0 {
                let draining = self.head_draining();
                let fraction = live_count as f64 / enqueued_count.max(1) as f64;
                // Never compact into a log that is itself only one segment behind: keep at
                // least the active segment and one more.
                if fraction >= self.compact_live_fraction || count < 3 || budget == 0 {
                    return false;
                }
                if draining {
                    return true;
                }
                budget = budget.saturating_sub(self.compact_head(host, budget).await);
                let still_live = self.segments.borrow().front().map_or(0, |h| h.live_count);
                if still_live > 0 {
                    return false;
                }
            }
            let Some(head) = self.segments.borrow_mut().pop_front() else {
                return false;
            };
            if let Some(writer) = &head.writer {
                writer.close();
            }
            if let Err(e) = glommio::io::remove(&head.path).await {
                warn!("cannot remove log segment {}: {e}", head.path.display());
            } else {
                debug!(
                    "removed log segment {} (generation {})",
                    head.path.display(),
                    head.generation
                );
            }
        }
    }

    /// Notes the live counts of the oldest segments (so that the next heads have a history when
    /// they become the head); true if the head's fell since a recent look, at a pace that
    /// empties it within `DRAIN_HORIZON`.
    fn head_draining(&self) -> bool {
        let now = Instant::now();
        let segments = self.segments.borrow();
        let mut draining = false;
        for (index, segment) in segments.iter().take(LOOKED_SEGMENTS).enumerate() {
            let previous = segment.looked.replace(Some((now, segment.live_count)));
            if index == 0 {
                draining = previous.is_some_and(|(at, live)| {
                    let elapsed = now.duration_since(at);
                    elapsed <= DRAIN_LOOK_MAX_AGE
                        && live > segment.live_count
                        && elapsed.as_secs_f64() * segment.live_count as f64
                            <= DRAIN_HORIZON.as_secs_f64() * (live - segment.live_count) as f64
                });
            }
        }
        draining
    }

    /// Logs the head segment's live messages again in the active one (reading back those that
    /// are paged out); once the copies are durable, points the queues at them and forgets them
    /// in the head. Returns how many it moved.
    async fn compact_head(self: &Rc<Self>, host: &dyn CompactionHost, budget: usize) -> usize {
        let (head_generation, live) = {
            let segments = self.segments.borrow();
            let Some(head) = segments.front() else {
                return 0;
            };
            let live: Vec<(LoggedQueue, MessageId)> = head
                .live
                .iter()
                .flat_map(|(queue, ids)| ids.iter().map(move |id| (queue.clone(), id)))
                .take(budget)
                .collect();
            (head.generation, live)
        };
        // Bodies of paged-out messages, read from the head itself.
        let mut paged: Vec<(usize, Location)> = Vec::new();
        for (index, (queue, id)) in live.iter().enumerate() {
            if let Some(LiveMessage {
                message: None,
                location: Some(location),
                ..
            }) = host.find(queue, *id)
            {
                paged.push((index, location));
            }
        }
        let locations: Vec<Location> = paged.iter().map(|(_, l)| *l).collect();
        let read = self.read(&locations).await;
        if self.closing.get() {
            return 0;
        }
        let mut bodies: HashMap<usize, Message> = HashMap::default();
        for ((index, _), message) in paged.into_iter().zip(read) {
            if let Some(message) = message {
                bodies.insert(index, message);
            }
        }
        let mut moved = Vec::new();
        for (index, (queue, id)) in live.into_iter().enumerate() {
            let Some(found) = host.find(&queue, id) else {
                // The queue dropped it: settle it here.
                self.forget(head_generation, &queue, id);
                continue;
            };
            let (delivered, durable) = (found.delivered, found.durable);
            let Some(message) = found.message.or_else(|| bodies.remove(&index)) else {
                warn!("log segment {head_generation}: message {id} could not be read back for compaction");
                continue;
            };
            let appended = if durable {
                self.append(&WalEntry::Enqueue {
                    queue: queue.clone(),
                    id,
                    message,
                })
            } else {
                self.append(&WalEntry::PagedOut {
                    queue: queue.clone(),
                    id,
                    message,
                })
            };
            if delivered && durable {
                self.append(&WalEntry::Delivered {
                    queue: queue.clone(),
                    ids: smallvec::smallvec![id],
                });
            }
            moved.push((queue, id, appended.location));
        }
        if moved.is_empty() {
            return 0;
        }
        let (sender, receiver) = super::oneshot::channel();
        self.after_all_synced(move |ok| sender.send(ok));
        if receiver.await != Some(true) {
            return 0;
        }
        let count = moved.len();
        debug!("log segment {head_generation}: {count} live messages compacted");
        let mut touched: Vec<LoggedQueue> = Vec::new();
        for (queue, id, location) in moved {
            self.forget(head_generation, &queue, id);
            if host.find(&queue, id).is_some() {
                host.relocate(&queue, id, location);
            } else {
                // Settled while the copy was written: the settle counted against the head.
                self.forget(u64::from(location.segment), &queue, id);
            }
            if touched.last() != Some(&queue) && !touched.contains(&queue) {
                touched.push(queue);
            }
        }
        for queue in &touched {
            host.relocations_done(queue);
        }
        count
    }

    fn forget(&self, generation: u64, queue: &LoggedQueue, id: MessageId) {
        let mut segments = self.segments.borrow_mut();
        let Some(segment) = segments.iter_mut().find(|s| s.generation == generation) else {
            return;
        };
        if let Some(live) = segment.live.get_mut(queue) {
            if live.remove(id) {
                segment.live_count -= 1;
            }
        }
    }
}

/// Segment generations as locations carry them (32 bits: four billion segments per data dir).
fn generation_tag(generation: u64) -> u32 {
    u32::try_from(generation).unwrap_or(u32::MAX)
}

fn find_segment(segments: &VecDeque<Segment>, tag: u32) -> Option<&Segment> {
    let index = segments
        .binary_search_by_key(&u64::from(tag), |s| s.generation)
        .ok()?;
    segments.get(index)
}

fn find_segment_mut(segments: &mut VecDeque<Segment>, tag: u32) -> Option<&mut Segment> {
    let index = segments
        .binary_search_by_key(&u64::from(tag), |s| s.generation)
        .ok()?;
    segments.get_mut(index)
}

/// The message of one Enqueue record read back; None if it does not check out.
fn decode_message(bytes: Bytes) -> Option<Message> {
    let replayed = record::replay(bytes);
    let record = replayed.records.first()?;
    match WalEntry::decode(record).ok()? {
        WalEntry::Enqueue { message, .. } | WalEntry::PagedOut { message, .. } => Some(message),
        _ => None,
    }
}
