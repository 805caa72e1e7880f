//! A channel's unacknowledged deliveries, ordered by delivery tag.
//!
//! Tags are issued in increasing order and entries are inserted as they are issued, so a
//! `VecDeque` sorted by tag holds them: acks in order pop the front, `multiple` drains a prefix,
//! an out-of-order single ack is a binary search. Unlike a B-tree, none of this allocates once
//! the deque has grown to the channel's working size. Tags of no-ack deliveries are never
//! inserted, so there are no gaps to store.

use std::collections::VecDeque;

/// Entries `drain_up_to` scans from the front before it bisects.
const NEAR_FRONT: usize = 16;

#[derive(Debug)]
pub struct Unacked<T> {
    entries: VecDeque<(u64, T)>,
}

impl<T> Default for Unacked<T> {
    fn default() -> Self {
        Unacked {
            entries: VecDeque::new(),
        }
    }
}

impl<T> Unacked<T> {
    /// Records `tag`; tags normally arrive in increasing order (others are placed in order).
    pub fn insert(&mut self, tag: u64, value: T) {
        match self.entries.back() {
            Some(&(last, _)) if last >= tag => {
                let at = self.entries.partition_point(|(t, _)| *t < tag);
                if self.entries.get(at).is_some_and(|(t, _)| *t == tag) {
                    self.entries[at].1 = value;
                } else {
                    self.entries.insert(at, (tag, value));
                }
            }
            _ => self.entries.push_back((tag, value)),
        }
    }

    fn position(&self, tag: u64) -> Option<usize> {
        let near = self.entries.len().min(NEAR_FRONT);
        if let Some(at) = (0..near).find(|&i| self.entries[i].0 >= tag) {
            return (self.entries[at].0 == tag).then_some(at);
        }
        self.entries.binary_search_by_key(&tag, |(t, _)| *t).ok()
    }

    pub fn contains(&self, tag: u64) -> bool {
        self.position(tag).is_some()
    }

    pub fn remove(&mut self, tag: u64) -> Option<T> {
        let at = self.position(tag)?;
        self.entries.remove(at).map(|(_, value)| value)
    }

    /// Removes every entry with a tag up to and including `upper`, in tag order.
    pub fn drain_up_to(&mut self, upper: u64) -> impl Iterator<Item = T> + '_ {
        // Acks usually settle a few entries at the front: look there before bisecting the whole
        // deque (a binary search over thousands of entries misses the cache at every step).
        let near = self.entries.len().min(NEAR_FRONT);
        let end = match (0..near).find(|&i| self.entries[i].0 > upper) {
            Some(end) => end,
            None => self.entries.partition_point(|(t, _)| *t <= upper),
        };
        self.entries.drain(..end).map(|(_, value)| value)
    }

    /// Removes every entry, in tag order.
    pub fn drain_all(&mut self) -> impl Iterator<Item = T> + '_ {
        self.entries.drain(..).map(|(_, value)| value)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().map(|(_, value)| value)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_out_of_order_and_multiple() {
        let mut unacked = Unacked::default();
        for tag in 1..=10u64 {
            unacked.insert(tag, tag * 10);
        }
        assert_eq!(unacked.remove(1), Some(10));
        assert_eq!(unacked.remove(5), Some(50));
        assert_eq!(unacked.remove(5), None);
        assert!(!unacked.contains(5) && unacked.contains(6));
        assert_eq!(
            unacked.drain_up_to(7).collect::<Vec<_>>(),
            vec![20, 30, 40, 60, 70]
        );
        assert_eq!(unacked.len(), 3);
        // A tag issued out of order still lands in its place.
        unacked.insert(4, 40);
        assert_eq!(
            unacked.values().copied().collect::<Vec<_>>(),
            vec![40, 80, 90, 100]
        );
        assert_eq!(unacked.drain_up_to(u64::MAX).count(), 4);
        assert!(unacked.is_empty());
    }

    #[test]
    fn matches_a_btreemap_under_random_operations() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut model = std::collections::BTreeMap::new();
        let mut unacked = Unacked::default();
        let mut tag = 0u64;
        for _ in 0..20_000 {
            match next() % 4 {
                0 | 1 => {
                    tag += 1 + next() % 3;
                    model.insert(tag, tag);
                    unacked.insert(tag, tag);
                }
                2 => {
                    let probe = next() % (tag + 2);
                    assert_eq!(unacked.remove(probe), model.remove(&probe));
                }
                _ => {
                    let upper = next() % (tag + 2);
                    let keep = model.split_off(&(upper + 1));
                    let taken: Vec<u64> =
                        std::mem::replace(&mut model, keep).into_values().collect();
                    assert_eq!(unacked.drain_up_to(upper).collect::<Vec<_>>(), taken);
                }
            }
            assert_eq!(unacked.len(), model.len());
        }
    }
}
