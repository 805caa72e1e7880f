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
//!
//! A log whose last record is CleanShutdown was closed by a graceful shutdown, with every
//! Delivered mark on disk. Any other log ends in a crash, and then every recovered message comes
//! back redelivered: Delivered marks are not synced before a delivery leaves, so a message may
//! have reached a consumer without its mark, and the spec's flag means "may have been delivered".
//!
//! Replay is a fold: a message is live if it was enqueued and not settled since, and its
//! queue was not deleted after it; a live message that was delivered comes back redelivered.
//! Message ids are per queue and increase with publish order, so sorting by id restores order.

use std::collections::BTreeMap;

use ahash::HashMap;
use bytes::{BufMut, Bytes, BytesMut};

use crate::message::Message;
use crate::queue::MessageId;
use crate::record::{put_long, put_short, Malformed, PayloadReader, Record};

pub const KIND_ENQUEUE: u8 = 1;
pub const KIND_SETTLE: u8 = 2;
pub const KIND_DELIVERED: u8 = 3;
pub const KIND_DELETE_QUEUE: u8 = 4;
pub const KIND_CLEAN_SHUTDOWN: u8 = 5;

/// A queue, named within its vhost, as the log names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LoggedQueue {
    pub vhost: Bytes,
    pub name: Bytes,
}

#[derive(Debug, Clone, PartialEq)]
pub enum WalEntry {
    Enqueue {
        queue: LoggedQueue,
        id: MessageId,
        message: Message,
    },
    Settle {
        queue: LoggedQueue,
        ids: Vec<MessageId>,
    },
    Delivered {
        queue: LoggedQueue,
        ids: Vec<MessageId>,
    },
    DeleteQueue {
        queue: LoggedQueue,
    },
    CleanShutdown,
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

fn read_ids(reader: &mut PayloadReader) -> Result<Vec<MessageId>, Malformed> {
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
                put_queue(payload, queue);
                payload.put_u64_le(*id);
                put_long(payload, message.envelope());
                put_long(payload, message.body());
                KIND_ENQUEUE
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
            KIND_ENQUEUE => {
                let id = reader.u64()?;
                let envelope = reader.long()?;
                let body = reader.long()?;
                let message = Message::from_parts(envelope, body).ok_or(Malformed("envelope"))?;
                WalEntry::Enqueue { queue, id, message }
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

/// A message that survived replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    pub id: MessageId,
    pub message: Message,
    pub redelivered: bool,
}

/// Folds log entries, oldest first, into each queue's live messages in publish order. Unless
/// the last entry is CleanShutdown, every message comes back redelivered (see the module doc).
pub fn fold(entries: impl IntoIterator<Item = WalEntry>) -> HashMap<LoggedQueue, Vec<Recovered>> {
    let mut queues: HashMap<LoggedQueue, BTreeMap<MessageId, Recovered>> = HashMap::default();
    let mut clean = false;
    for entry in entries {
        clean = matches!(entry, WalEntry::CleanShutdown);
        match entry {
            WalEntry::Enqueue { queue, id, message } => {
                queues.entry(queue).or_default().insert(
                    id,
                    Recovered {
                        id,
                        message,
                        redelivered: false,
                    },
                );
            }
            WalEntry::Settle { queue, ids } => {
                if let Some(messages) = queues.get_mut(&queue) {
                    for id in ids {
                        messages.remove(&id);
                    }
                }
            }
            WalEntry::Delivered { queue, ids } => {
                if let Some(messages) = queues.get_mut(&queue) {
                    for id in ids {
                        if let Some(message) = messages.get_mut(&id) {
                            message.redelivered = true;
                        }
                    }
                }
            }
            WalEntry::DeleteQueue { queue } => {
                queues.remove(&queue);
            }
            WalEntry::CleanShutdown => {}
        }
    }
    queues
        .into_iter()
        .map(|(queue, messages)| {
            let messages = messages
                .into_values()
                .map(|mut recovered| {
                    recovered.redelivered |= !clean;
                    recovered
                })
                .collect();
            (queue, messages)
        })
        .collect()
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
                ids: vec![7, 9],
            },
            WalEntry::Delivered {
                queue: queue("b"),
                ids: vec![1],
            },
            WalEntry::DeleteQueue { queue: queue("b") },
            WalEntry::CleanShutdown,
        ];
        assert_eq!(read_back(log(&entries)), entries);
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
                ids: vec![1, 3],
            },
            WalEntry::Settle {
                queue: queue("a"),
                ids: vec![3],
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
        let folded = fold(entries);
        let a = &folded[&queue("a")];
        let summary: Vec<(u64, bool)> = a.iter().map(|r| (r.id, r.redelivered)).collect();
        assert_eq!(summary, vec![(1, true), (2, false)]);
        assert!(!folded.contains_key(&queue("gone")));
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
        let folded = fold(entries);
        assert!(folded[&queue("a")].iter().all(|r| r.redelivered));
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
                ids: vec![1],
            },
            WalEntry::Enqueue {
                queue: queue("a"),
                id: 3,
                message: message("three"),
            },
        ]);
        let third = log(&[WalEntry::Settle {
            queue: queue("a"),
            ids: vec![3],
        }]);
        let empty = Bytes::new();
        let ids = |segments: &[&Bytes]| -> Vec<u64> {
            let entries: Vec<WalEntry> = segments
                .iter()
                .flat_map(|s| read_back((*s).clone()))
                .collect();
            fold(entries)
                .get(&queue("a"))
                .map(|m| m.iter().map(|r| r.id).collect())
                .unwrap_or_default()
        };
        assert_eq!(ids(&[&first, &second, &third, &empty]), vec![2]);
        // The middle segment lost: its settle and enqueue are gone, nothing else breaks.
        assert_eq!(ids(&[&first, &third]), vec![1, 2]);
        // The first lost: settles of unknown ids are ignored.
        assert_eq!(ids(&[&second, &third]), Vec::<u64>::new());
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
