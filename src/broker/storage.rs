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
//! segment first (compaction), then it is deleted.
//!
//! The record formats and the replay fold live in `shards::wal`; this module only decides which
//! file a record goes to and when a file goes away.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use ahash::HashMap;
use bytes::BytesMut;
use log::{debug, warn};
use roaring::RoaringTreemap;
use shards::wal::{LoggedQueue, WalEntry};
use shards::{Message, MessageId};

use crate::runtime::log_file::LogWriter;

/// Messages compacted per reclaim call at most: compaction is background work and must not
/// stall the shard's message path.
const COMPACT_MESSAGES_PER_CALL: usize = 4096;

struct Segment {
    generation: u64,
    path: PathBuf,
    writer: Rc<LogWriter>,
    bytes: u64,
    live: HashMap<LoggedQueue, RoaringTreemap>,
    live_count: u64,
    enqueued_count: u64,
}

impl Segment {
    fn new(generation: u64, path: PathBuf, writer: Rc<LogWriter>) -> Segment {
        Segment {
            generation,
            path,
            writer,
            bytes: 0,
            live: HashMap::default(),
            live_count: 0,
            enqueued_count: 0,
        }
    }
}

pub struct SegmentedWal {
    dir: PathBuf,
    segment_bytes_max: u64,
    compact_live_fraction: f64,
    segments: RefCell<VecDeque<Segment>>,
    next_generation: Cell<u64>,
    spare: RefCell<Option<(u64, PathBuf, Rc<LogWriter>)>>,
    creating_spare: Cell<bool>,
}

/// Runs `callback(ok)` once everything appended so far to each of `writers` is durable (`ok`:
/// all of them succeeded).
pub fn after_synced(writers: Vec<Rc<LogWriter>>, callback: impl FnOnce(bool) + 'static) {
    if writers.is_empty() {
        callback(true);
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

fn segment_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("wal-{generation:016}.log"))
}

impl SegmentedWal {
    /// Creates the first segment, `wal-<generation>.log`, in `dir`.
    pub async fn create(
        dir: &Path,
        generation: u64,
        segment_bytes_max: u64,
        compact_live_fraction: f64,
    ) -> std::io::Result<Rc<SegmentedWal>> {
        let path = segment_path(dir, generation);
        let writer = LogWriter::create(&path).await?;
        let mut segments = VecDeque::new();
        segments.push_back(Segment::new(generation, path, writer));
        Ok(Rc::new(SegmentedWal {
            dir: dir.to_path_buf(),
            segment_bytes_max,
            compact_live_fraction,
            segments: RefCell::new(segments),
            next_generation: Cell::new(generation + 1),
            spare: RefCell::new(None),
            creating_spare: Cell::new(false),
        }))
    }

    /// Segment files in use.
    pub fn segment_count(&self) -> usize {
        self.segments.borrow().len()
    }

    /// Appends one entry; returns the log that holds it (wait on that one for durability).
    pub fn append(self: &Rc<Self>, entry: &WalEntry) -> Rc<LogWriter> {
        let mut payload = BytesMut::new();
        let kind = entry.encode(&mut payload);
        let writer = {
            let mut segments = self.segments.borrow_mut();
            let Some(active) = segments.back_mut() else {
                unreachable!("a log always has an active segment");
            };
            active.writer.append(kind, &payload);
            active.bytes += (payload.len() + shards::record::RECORD_HEADER_BYTES) as u64;
            active.writer.clone()
        };
        self.account(entry);
        self.maybe_roll();
        writer
    }

    /// Runs `callback(ok)` once everything appended so far, in every segment, is durable.
    pub fn after_all_synced(&self, callback: impl FnOnce(bool) + 'static) {
        let writers: Vec<Rc<LogWriter>> = self
            .segments
            .borrow()
            .iter()
            .map(|s| s.writer.clone())
            .collect();
        after_synced(writers, callback);
    }

    fn account(&self, entry: &WalEntry) {
        let mut segments = self.segments.borrow_mut();
        match entry {
            WalEntry::Enqueue { queue, id, .. } => {
                if let Some(active) = segments.back_mut() {
                    if active.live.entry(queue.clone()).or_default().insert(*id) {
                        active.live_count += 1;
                        active.enqueued_count += 1;
                    }
                }
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
                self.segments
                    .borrow_mut()
                    .push_back(Segment::new(generation, path, writer));
            }
        }
    }

    /// Deletes the oldest segments that hold nothing live, compacting the oldest one first when
    /// little of it is live. `message` finds a live message (and whether it was delivered) in
    /// the shard's queues.
    pub async fn reclaim(
        self: &Rc<Self>,
        message: impl Fn(&LoggedQueue, MessageId) -> Option<(Message, bool)>,
    ) {
        let mut budget = COMPACT_MESSAGES_PER_CALL;
        loop {
            let (live_count, enqueued_count, count) = {
                let segments = self.segments.borrow();
                let Some(head) = segments.front() else { return };
                (head.live_count, head.enqueued_count, segments.len())
            };
            if count < 2 {
                return;
            }
            if live_count > 0 {
                let fraction = live_count as f64 / enqueued_count.max(1) as f64;
                // Never compact into a log that is itself only one segment behind: keep at
                // least the active segment and one more.
                if fraction >= self.compact_live_fraction || count < 3 || budget == 0 {
                    return;
                }
                budget = budget.saturating_sub(self.compact_head(&message, budget));
                let still_live = self.segments.borrow().front().map_or(0, |h| h.live_count);
                if still_live > 0 {
                    return;
                }
            }
            let Some(head) = self.segments.borrow_mut().pop_front() else {
                return;
            };
            head.writer.close();
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

    /// Appends the head segment's live messages again to the active one; returns how many.
    fn compact_head(
        self: &Rc<Self>,
        message: &impl Fn(&LoggedQueue, MessageId) -> Option<(Message, bool)>,
        budget: usize,
    ) -> usize {
        let live: Vec<(LoggedQueue, MessageId)> = {
            let segments = self.segments.borrow();
            let Some(head) = segments.front() else {
                return 0;
            };
            head.live
                .iter()
                .flat_map(|(queue, ids)| ids.iter().map(move |id| (queue.clone(), id)))
                .take(budget)
                .collect()
        };
        let mut moved = 0;
        for (queue, id) in live {
            let Some((found, delivered)) = message(&queue, id) else {
                // Not in memory: the queue dropped it; settle it here.
                self.forget_in_head(&queue, id);
                continue;
            };
            self.forget_in_head(&queue, id);
            self.append(&WalEntry::Enqueue {
                queue: queue.clone(),
                id,
                message: found,
            });
            if delivered {
                self.append(&WalEntry::Delivered {
                    queue,
                    ids: vec![id],
                });
            }
            moved += 1;
        }
        moved
    }

    fn forget_in_head(&self, queue: &LoggedQueue, id: MessageId) {
        let mut segments = self.segments.borrow_mut();
        if let Some(head) = segments.front_mut() {
            if let Some(live) = head.live.get_mut(queue) {
                if live.remove(id) {
                    head.live_count -= 1;
                }
            }
        }
    }
}
