//! What a shard's write-ahead log says about its durable queues, and how replay folds it back
//! into queue contents.
//!
//! Only persistent messages (delivery-mode 2) on durable queues are logged. Record kinds
//! (payloads little-endian; `queue` is `short vhost, short name`):
//!
//! | kind | entry      | payload                                              |
//! |------|------------|------------------------------------------------------|
//! | 1    | Enqueue    | queue, u64 id, long envelope, long body              |
//! | 2    | Settle     | queue, u32 count, count × u64 id (acked or dropped)  |
//! | 3    | Delivered  | queue, u32 count, count × u64 id                     |
//! | 4    | DeleteQueue| queue                                                |
//! | 5    | CleanShutdown | (empty)                                           |
//! | 6    | PagedOut   | as Enqueue                                           |
//!
//! PagedOut holds a message that is not durable (transient, or on a non-durable queue) written
//! out only to free memory: the queue reads it back from there, replay ignores it.
//!
//! A log whose last record is CleanShutdown was closed by a graceful shutdown, with every
//! Delivered mark on disk. Any other log ends in a crash, and then every recovered message comes
//! back redelivered: Delivered marks are not synced before a delivery leaves, so a message may
//! have reached a consumer without its mark, and the spec's flag means "may have been delivered".
//!
//! Replay is a fold: a message is live if it was enqueued and not settled since, and its
//! queue was not deleted after it; a live message that was delivered comes back redelivered.
//! Message ids are per queue and increase with publish order, so sorting by id restores order.
//! The fold keeps where each live message's record lies, not its body: a recovered backlog stays
//! paged out until it is delivered.

use ahash::HashMap;
use bytes::{BufMut, Bytes, BytesMut};
use roaring::RoaringTreemap;

use crate::message::Message;
use crate::queue::{Location, MessageId};
use crate::record::{put_long, put_short, Malformed, PayloadReader, Record};

pub const KIND_ENQUEUE: u8 = 1;
pub const KIND_SETTLE: u8 = 2;
pub const KIND_DELIVERED: u8 = 3;
pub const KIND_DELETE_QUEUE: u8 = 4;
pub const KIND_CLEAN_SHUTDOWN: u8 = 5;
pub const KIND_PAGED_OUT: u8 = 6;

/// A queue, named within its vhost, as the log names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LoggedQueue {
    pub vhost: Bytes,
    pub name: Bytes,
}

/// Which of the two records that carry a message: both have the same payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageRecord {
    /// A persistent message on a durable queue: replayed.
    Enqueue,
    /// A copy written out only to free memory: read back by its queue, ignored by replay.
    PagedOut,
}

/// Encodes an Enqueue or PagedOut payload from borrowed parts and returns the record kind: what
/// `WalEntry::encode` does for those entries, without a message cloned into an entry first
/// (a page-out logs thousands of queued messages in one go, their reference counts cold).
pub fn encode_message(
    payload: &mut BytesMut,
    record: MessageRecord,
    queue: &LoggedQueue,
    id: MessageId,
    message: &Message,
) -> u8 {
    put_queue(payload, queue);
    payload.put_u64_le(id);
    put_long(payload, message.envelope());
    put_long(payload, message.body());
    match record {
        MessageRecord::Enqueue => KIND_ENQUEUE,
        MessageRecord::PagedOut => KIND_PAGED_OUT,
    }
}

/// The ids of a Settle or Delivered record: an ack names one or a few, and building the record
/// should not allocate for them.
pub type LoggedIds = smallvec::SmallVec<[MessageId; 4]>;

#[derive(Debug, Clone, PartialEq)]
pub enum WalEntry {
    Enqueue {
        queue: LoggedQueue,
        id: MessageId,
        message: Message,
    },
    Settle {
        queue: LoggedQueue,
        ids: LoggedIds,
    },
    Delivered {
        queue: LoggedQueue,
        ids: LoggedIds,
    },
    DeleteQueue {
        queue: LoggedQueue,
    },
    CleanShutdown,
    PagedOut {
        queue: LoggedQueue,
        id: MessageId,
        message: Message,
    },
}

fn put_queue(out: &mut BytesMut, queue: &LoggedQueue) {
    put_short(out, &queue.vhost);
    put_short(out, &queue.name);
}

fn put_ids(out: &mut BytesMut, ids: &[MessageId]) {
    out.put_u32_le(ids.len() as u32);
    for id in ids {
        out.put_u64_le(*id);
    }
}

fn read_queue(reader: &mut PayloadReader) -> Result<LoggedQueue, Malformed> {
    Ok(LoggedQueue {
        vhost: reader.short()?,
        name: reader.short()?,
    })
}

fn read_ids(reader: &mut PayloadReader) -> Result<LoggedIds, Malformed> {
    let count = reader.u32()? as usize;
    if count > reader.remaining() / 8 {
        return Err(Malformed("id count"));
    }
    (0..count).map(|_| reader.u64()).collect()
}

impl WalEntry {
    /// The record kind and payload.
    pub fn encode(&self, payload: &mut BytesMut) -> u8 {
        match self {
            WalEntry::Enqueue { queue, id, message } => {
                encode_message(payload, MessageRecord::Enqueue, queue, *id, message)
            }
            WalEntry::PagedOut { queue, id, message } => {
                encode_message(payload, MessageRecord::PagedOut, queue, *id, message)
            }
            WalEntry::Settle { queue, ids } => {
                put_queue(payload, queue);
                put_ids(payload, ids);
                KIND_SETTLE
            }
            WalEntry::Delivered { queue, ids } => {
                put_queue(payload, queue);
                put_ids(payload, ids);
                KIND_DELIVERED
            }
            WalEntry::DeleteQueue { queue } => {
                put_queue(payload, queue);
                KIND_DELETE_QUEUE
            }
            WalEntry::CleanShutdown => KIND_CLEAN_SHUTDOWN,
        }
    }

    pub fn decode(record: &Record) -> Result<WalEntry, Malformed> {
        if record.kind == KIND_CLEAN_SHUTDOWN {
            return if record.payload.is_empty() {
                Ok(WalEntry::CleanShutdown)
            } else {
                Err(Malformed("trailing bytes"))
            };
        }
        let mut reader = PayloadReader::new(record.payload.clone());
        let queue = read_queue(&mut reader)?;
        let entry = match record.kind {
            KIND_ENQUEUE | KIND_PAGED_OUT => {
                let id = reader.u64()?;
                let envelope = reader.long()?;
                let body = reader.long()?;
                let message = Message::from_parts(envelope, body).ok_or(Malformed("envelope"))?;
                if record.kind == KIND_ENQUEUE {
                    WalEntry::Enqueue { queue, id, message }
                } else {
                    WalEntry::PagedOut { queue, id, message }
                }
            }
            KIND_SETTLE => WalEntry::Settle {
                queue,
                ids: read_ids(&mut reader)?,
            },
            KIND_DELIVERED => WalEntry::Delivered {
                queue,
                ids: read_ids(&mut reader)?,
            },
            KIND_DELETE_QUEUE => WalEntry::DeleteQueue { queue },
            _ => return Err(Malformed("record kind")),
        };
        if reader.remaining() != 0 {
            return Err(Malformed("trailing bytes"));
        }
        Ok(entry)
    }
}

/// A message that survived replay: where its Enqueue record lies, not its body (recovery keeps
/// a backlog paged out; bodies are read back when delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub id: MessageId,
    pub location: Location,
    pub redelivered: bool,
}

/// One queue's live messages after replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveredQueue {
    /// In publish (id) order.
    pub messages: Vec<Recovered>,
    /// Above the sequence number of every id the log mentions for this queue (the id's low
    /// bits, `queue::sequence_of`): new messages must not reuse an id that a retained Settle
    /// record could otherwise apply to.
    pub next_sequence: u64,
}

#[derive(Debug, Default)]
struct QueueFold {
    /// Enqueue records in log order (compaction may log one id twice: the later one counts).
    enqueued: Vec<(MessageId, Location)>,
    settled: RoaringTreemap,
    delivered: RoaringTreemap,
    next_sequence: u64,
}

impl QueueFold {
    fn saw(&mut self, id: MessageId) {
        self.next_sequence = self
            .next_sequence
            .max(crate::queue::sequence_of(id).saturating_add(1));
    }
}

/// The replay fold, fed one entry at a time in log order (oldest segment first), so that a log
/// far larger than memory can be recovered: per live message it keeps 24 bytes.
///
/// A message is live if it was enqueued and not settled, in the current incarnation of its
/// queue (a DeleteQueue record starts over). Ids are never reused within an incarnation — also
/// across restarts, see `RecoveredQueue::next_sequence` — so the settled set does not depend on order.
#[derive(Debug, Default)]
pub struct Recovery {
    queues: HashMap<LoggedQueue, QueueFold>,
    clean: bool,
}

impl Recovery {
    pub fn new() -> Recovery {
        Recovery::default()
    }

    /// Folds in the next entry; `location` is where its record lies.
    pub fn apply(&mut self, entry: &WalEntry, location: Location) {
        self.clean = matches!(entry, WalEntry::CleanShutdown);
        match entry {
            WalEntry::Enqueue { queue, id, .. } => {
                let fold = self.queue(queue);
                fold.saw(*id);
                fold.enqueued.push((*id, location));
            }
            WalEntry::Settle { queue, ids } => {
                let fold = self.queue(queue);
                for id in ids {
                    fold.saw(*id);
                    fold.settled.insert(*id);
                }
            }
            WalEntry::Delivered { queue, ids } => {
                let fold = self.queue(queue);
                for id in ids {
                    fold.saw(*id);
                    fold.delivered.insert(*id);
                }
            }
            WalEntry::DeleteQueue { queue } => {
                self.queues.insert(queue.clone(), QueueFold::default());
            }
            // Not durable: only a place to read a body back from while the broker ran.
            WalEntry::CleanShutdown | WalEntry::PagedOut { .. } => {}
        }
    }

    fn queue(&mut self, queue: &LoggedQueue) -> &mut QueueFold {
        // A key clone is two refcount increments.
        self.queues.entry(queue.clone()).or_default()
    }

    /// Each queue's live messages in publish order. Unless the last entry was CleanShutdown,
    /// every message comes back redelivered (see the module doc). Queues the log mentions with
    /// nothing live are listed too (their `next_sequence` matters).
    pub fn finish(self) -> HashMap<LoggedQueue, RecoveredQueue> {
        let clean = self.clean;
        self.queues
            .into_iter()
            .map(|(queue, mut fold)| {
                // Stable: of two records of one id, the later one (compaction's copy) stays last.
                fold.enqueued.sort_by_key(|(id, _)| *id);
                let mut messages: Vec<Recovered> = Vec::with_capacity(fold.enqueued.len());
                for (id, location) in fold.enqueued {
                    if fold.settled.contains(id) {
                        continue;
                    }
                    let recovered = Recovered {
                        id,
                        location,
                        redelivered: !clean || fold.delivered.contains(id),
                    };
                    match messages.last_mut() {
                        Some(last) if last.id == id => *last = recovered,
                        _ => messages.push(recovered),
                    }
                }
                let next_sequence = fold.next_sequence;
                (
                    queue,
                    RecoveredQueue {
                        messages,
                        next_sequence,
                    },
                )
            })
            .collect()
    }
}

/// Folds a whole log at once (tests and tools).
pub fn fold(
    entries: impl IntoIterator<Item = (WalEntry, Location)>,
) -> HashMap<LoggedQueue, RecoveredQueue> {
    let mut recovery = Recovery::new();
    for (entry, location) in entries {
        recovery.apply(&entry, location);
    }
    recovery.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{encode_record, replay};

    fn queue(name: &str) -> LoggedQueue {
        LoggedQueue {
            vhost: Bytes::from_static(b"/"),
            name: Bytes::copy_from_slice(name.as_bytes()),
        }
    }

    fn message(body: &str) -> Message {
        Message::new(
            b"",
            b"q",
            &[0x10, 0, 2],
            Bytes::copy_from_slice(body.as_bytes()),
            true,
        )
    }

    fn log(entries: &[WalEntry]) -> Bytes {
        let mut out = BytesMut::new();
        for entry in entries {
            let mut payload = BytesMut::new();
            let kind = entry.encode(&mut payload);
            encode_record(&mut out, kind, &payload);
        }
        out.freeze()
    }

    /// Entries with made-up record locations (the n-th entry at offset n).
    fn located(entries: Vec<WalEntry>) -> Vec<(WalEntry, Location)> {
        entries
            .into_iter()
            .enumerate()
            .map(|(n, entry)| {
                let location = Location {
                    segment: 1,
                    len: 1,
                    offset: n as u64,
                };
                (entry, location)
            })
            .collect()
    }

    fn read_back(bytes: Bytes) -> Vec<WalEntry> {
        replay(bytes)
            .records
            .iter()
            .map(|r| WalEntry::decode(r).unwrap())
            .collect()
    }

    #[test]
    fn entries_round_trip() {
        let entries = vec![
            WalEntry::Enqueue {
                queue: queue("a"),
                id: 7,
                message: message("x"),
            },
            WalEntry::Settle {
                queue: queue("a"),
                ids: smallvec::smallvec![7, 9],
            },
            WalEntry::Delivered {
                queue: queue("b"),
                ids: smallvec::smallvec![1],
            },
            WalEntry::DeleteQueue { queue: queue("b") },
            WalEntry::PagedOut {
                queue: queue("t"),
                id: 3,
                message: message("transient"),
            },
            WalEntry::CleanShutdown,
        ];
        assert_eq!(read_back(log(&entries)), entries);
        let folded = fold(located(entries));
        assert!(
            !folded.contains_key(&queue("t")),
            "paged-out copies are not replayed"
        );
    }

    #[test]
    fn fold_keeps_live_messages_in_order_with_delivery_marks() {
        let entries = vec![
            WalEntry::Enqueue {
                queue: queue("a"),
                id: 2,
                message: message("two"),
            },
            WalEntry::Enqueue {
                queue: queue("a"),
                id: 1,
                message: message("one"),
            },
            WalEntry::Enqueue {
                queue: queue("a"),
                id: 3,
                message: message("three"),
            },
            WalEntry::Delivered {
                queue: queue("a"),
                ids: smallvec::smallvec![1, 3],
            },
            WalEntry::Settle {
                queue: queue("a"),
                ids: smallvec::smallvec![3],
            },
            WalEntry::Enqueue {
                queue: queue("gone"),
                id: 1,
                message: message("x"),
            },
            WalEntry::DeleteQueue {
                queue: queue("gone"),
            },
            WalEntry::CleanShutdown,
        ];
        let folded = fold(located(entries));
        let a = &folded[&queue("a")];
        let summary: Vec<(u64, bool, u64)> = a
            .messages
            .iter()
            .map(|r| (r.id, r.redelivered, r.location.offset))
            .collect();
        assert_eq!(summary, vec![(1, true, 1), (2, false, 0)]);
        assert_eq!(a.next_sequence, 4);
        assert!(folded[&queue("gone")].messages.is_empty());
    }

    #[test]
    fn after_a_crash_everything_recovered_is_redelivered() {
        let entries = vec![
            WalEntry::Enqueue {
                queue: queue("a"),
                id: 1,
                message: message("one"),
            },
            WalEntry::CleanShutdown,
            WalEntry::Enqueue {
                queue: queue("a"),
                id: 2,
                message: message("two"),
            },
        ];
        let folded = fold(located(entries));
        assert!(folded[&queue("a")].messages.iter().all(|r| r.redelivered));
    }

    /// Segments are files; one may be missing (deleted by hand, lost) or empty (a crash right
    /// after a roll created the next one). Replay of what is there stays consistent.
    #[test]
    fn a_missing_or_empty_segment_file_is_survivable() {
        let first = log(&[
            WalEntry::Enqueue {
                queue: queue("a"),
                id: 1,
                message: message("one"),
            },
            WalEntry::Enqueue {
                queue: queue("a"),
                id: 2,
                message: message("two"),
            },
        ]);
        let second = log(&[
            WalEntry::Settle {
                queue: queue("a"),
                ids: smallvec::smallvec![1],
            },
            WalEntry::Enqueue {
                queue: queue("a"),
                id: 3,
                message: message("three"),
            },
        ]);
        let third = log(&[WalEntry::Settle {
            queue: queue("a"),
            ids: smallvec::smallvec![3],
        }]);
        let empty = Bytes::new();
        let ids = |segments: &[&Bytes]| -> Vec<u64> {
            let entries: Vec<WalEntry> = segments
                .iter()
                .flat_map(|s| read_back((*s).clone()))
                .collect();
            fold(located(entries))
                .get(&queue("a"))
                .map(|q| q.messages.iter().map(|r| r.id).collect())
                .unwrap_or_default()
        };
        assert_eq!(ids(&[&first, &second, &third, &empty]), vec![2]);
        // The middle segment lost: its settle and enqueue are gone, nothing else breaks.
        assert_eq!(ids(&[&first, &third]), vec![1, 2]);
        // The first lost: settles of unknown ids are ignored.
        assert_eq!(ids(&[&second, &third]), Vec::<u64>::new());
    }

    /// Compaction logs a live message again in a newer segment; until the old segment is gone
    /// replay sees it twice and must keep one copy, at the newer place.
    #[test]
    fn a_compacted_copy_wins_over_the_original() {
        let entries = vec![
            WalEntry::Enqueue {
                queue: queue("a"),
                id: 1,
                message: message("one"),
            },
            WalEntry::Enqueue {
                queue: queue("a"),
                id: 2,
                message: message("two"),
            },
            WalEntry::Enqueue {
                queue: queue("a"),
                id: 1,
                message: message("one"),
            },
        ];
        let folded = fold(located(entries));
        let places: Vec<(u64, u64)> = folded[&queue("a")]
            .messages
            .iter()
            .map(|r| (r.id, r.location.offset))
            .collect();
        assert_eq!(places, vec![(1, 2), (2, 1)]);
    }

    /// Ids mentioned only by Settle records still raise `next_sequence`, and a deleted queue's
    /// records do not apply to its successor of the same name.
    #[test]
    fn next_id_covers_every_id_the_log_mentions() {
        let entries = vec![
            WalEntry::Settle {
                queue: queue("a"),
                ids: smallvec::smallvec![41],
            },
            WalEntry::Enqueue {
                queue: queue("b"),
                id: 0,
                message: message("old"),
            },
            WalEntry::Settle {
                queue: queue("b"),
                ids: smallvec::smallvec![1],
            },
            WalEntry::DeleteQueue { queue: queue("b") },
            WalEntry::Enqueue {
                queue: queue("b"),
                id: 1,
                message: message("new"),
            },
        ];
        let folded = fold(located(entries));
        assert_eq!(folded[&queue("a")].next_sequence, 42);
        let b = &folded[&queue("b")];
        assert_eq!(b.messages.len(), 1);
        assert_eq!(b.messages[0].id, 1, "the old settle of id 1 does not apply");
        assert_eq!(b.next_sequence, 2);
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let record = Record {
            kind: KIND_SETTLE,
            payload: Bytes::from_static(&[1, b'/', 1, b'a', 255, 255, 255, 255]),
            offset: 0,
        };
        assert!(WalEntry::decode(&record).is_err());
        let record = Record {
            kind: 99,
            payload: Bytes::from_static(&[1, b'/', 1, b'a']),
            offset: 0,
        };
        assert!(WalEntry::decode(&record).is_err());
    }
}
