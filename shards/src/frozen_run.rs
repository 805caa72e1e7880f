//! A run of paged-out ready messages packed into a few bytes each.
//!
//! A paged message needs only its id, two flags and its record's place in the log; as a queue
//! entry that is 32 bytes, and a backlog of millions of paged messages made the queue's memory
//! grow with its length. Consecutive paged messages whose records lie in one segment at rising
//! offsets are packed here instead, each as three varints: the id step with the two flags, the
//! gap from the previous record's end and the record's length, usually 4-5 bytes in all (the
//! step is 1 and the gap 0 when the records were written one after the other).
//!
//! Invariants: ids strictly rise, offsets never go below the previous record's end, every entry
//! has a record (`len > 0`), and `count` and `last_id` match the encoding.

use crate::queue::{Location, MessageId};

/// One paged message as a run holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedEntry {
    pub id: MessageId,
    pub redelivered: bool,
    pub persistent: bool,
    pub location: Location,
}

#[derive(Debug, Clone)]
pub struct FrozenRun {
    segment: u32,
    count: u32,
    first_id: MessageId,
    last_id: MessageId,
    encoded: Box<[u8]>,
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut value = 0u64;
    let mut shift = 0;
    while let Some(&byte) = bytes.get(*at) {
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    value
}

impl FrozenRun {
    /// Packs the longest prefix of `entries` (at most `max`) that can share a run. None if not
    /// even the first can (it has no record).
    pub fn pack(entries: impl IntoIterator<Item = PagedEntry>, max: usize) -> Option<FrozenRun> {
        let mut encoded = Vec::new();
        let mut first: Option<PagedEntry> = None;
        let (mut previous_id, mut previous_end, mut count) = (0u64, 0u64, 0usize);
        for entry in entries.into_iter().take(max) {
            let head = *first.get_or_insert(entry);
            let fits = entry.location.len != 0
                && entry.location.segment == head.location.segment
                && entry.location.offset >= previous_end
                && (count == 0 || entry.id > previous_id);
            if !fits {
                break;
            }
            let step = entry.id - if count == 0 { head.id } else { previous_id };
            put_varint(
                &mut encoded,
                step << 2 | u64::from(entry.redelivered) << 1 | u64::from(entry.persistent),
            );
            put_varint(&mut encoded, entry.location.offset - previous_end);
            put_varint(&mut encoded, u64::from(entry.location.len));
            previous_id = entry.id;
            previous_end = entry.location.end();
            count += 1;
        }
        let head = first?;
        if count == 0 {
            return None;
        }
        Some(FrozenRun {
            segment: head.location.segment,
            count: u32::try_from(count).ok()?,
            first_id: head.id,
            last_id: previous_id,
            encoded: encoded.into_boxed_slice(),
        })
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn first_id(&self) -> MessageId {
        self.first_id
    }

    pub fn last_id(&self) -> MessageId {
        self.last_id
    }

    /// Bytes the run takes in memory.
    pub fn size_bytes(&self) -> usize {
        std::mem::size_of::<FrozenRun>() + self.encoded.len()
    }

    /// The entries, in order.
    pub fn entries(&self) -> impl Iterator<Item = PagedEntry> + '_ {
        let (mut at, mut id, mut end) = (0usize, self.first_id, 0u64);
        (0..self.count).map(move |_| {
            let tagged = get_varint(&self.encoded, &mut at);
            let gap = get_varint(&self.encoded, &mut at);
            let len = get_varint(&self.encoded, &mut at);
            id += tagged >> 2;
            let offset = end + gap;
            let location = Location {
                segment: self.segment,
                len: u32::try_from(len).unwrap_or(u32::MAX),
                offset,
            };
            end = location.end();
            PagedEntry {
                id,
                redelivered: tagged & 2 != 0,
                persistent: tagged & 1 != 0,
                location,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, segment: u32, offset: u64, len: u32) -> PagedEntry {
        PagedEntry {
            id,
            redelivered: id % 3 == 0,
            persistent: id % 2 == 0,
            location: Location {
                segment,
                len,
                offset,
            },
        }
    }

    #[test]
    fn entries_come_back_as_packed_in_a_few_bytes_each() {
        // Back-to-back records with ids in steps of one, then some gaps in both.
        let mut entries = Vec::new();
        let mut offset = 4096;
        for id in 10..1010u64 {
            let len = 300 + (id % 7) as u32;
            let id = if id > 900 { id * 3 } else { id };
            entries.push(entry(id, 5, offset, len));
            offset += u64::from(len) + if id % 11 == 0 { 64 } else { 0 };
        }
        let run = FrozenRun::pack(entries.iter().copied(), 4096).unwrap();
        assert_eq!(run.len(), entries.len());
        assert_eq!(run.entries().collect::<Vec<_>>(), entries);
        assert_eq!(run.first_id(), 10);
        assert_eq!(run.last_id(), 1009 * 3);
        assert!(
            run.size_bytes() < entries.len() * 6,
            "{} bytes",
            run.size_bytes()
        );
    }

    #[test]
    fn a_run_stops_where_the_segment_changes_or_offsets_go_back() {
        let entries = [
            entry(1, 2, 0, 100),
            entry(2, 2, 100, 100),
            entry(3, 3, 0, 100),
        ];
        assert_eq!(FrozenRun::pack(entries, 10).unwrap().len(), 2);
        assert_eq!(FrozenRun::pack(entries, 1).unwrap().len(), 1, "at most max");
        let entries = [entry(1, 2, 500, 100), entry(2, 2, 100, 100)];
        assert_eq!(FrozenRun::pack(entries, 10).unwrap().len(), 1);
        assert!(
            FrozenRun::pack([entry(1, 2, 0, 0)], 10).is_none(),
            "no record"
        );
    }
}
