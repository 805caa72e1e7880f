//! A map keyed by message id, for ids that mostly arrive in increasing order and mostly leave in
//! the order they came: a queue's delivered, unsettled messages.
//!
//! Most entries live in a dense window, a `VecDeque<Option<V>>` covering the ids
//! `base..base + dense.len()`, so that insert and remove are an index, not a hash and a probe
//! into a table scattered over memory. Ids the window does not take (below `base`, or past a
//! long gap) go to a hash map. Invariants:
//! - an id is in at most one of the two (a `None` window slot may have its id in the map);
//! - the window's first and last slots are occupied (empty ones are trimmed);
//! - the window has at most `2 * live + SLACK` slots: past that its front entries move to the
//!   map. An entry moves at most once, so every operation stays amortized O(1) and memory stays
//!   proportional to the entries held, however long one old entry stays.

use std::collections::VecDeque;

use ahash::HashMap;

/// Empty slots the window may hold beyond its live entries (see the module doc).
const SLACK: usize = 64;
/// A window emptied out gives its buffer back once it is this large.
const CAPACITY_KEPT_MAX: usize = 4096;

#[derive(Debug)]
pub struct IdMap<V> {
    base: u64,
    dense: VecDeque<Option<V>>,
    /// Occupied slots of `dense`.
    live: usize,
    sparse: HashMap<u64, V>,
}

impl<V> Default for IdMap<V> {
    fn default() -> Self {
        IdMap {
            base: 0,
            dense: VecDeque::new(),
            live: 0,
            sparse: HashMap::default(),
        }
    }
}

impl<V> IdMap<V> {
    pub fn len(&self) -> usize {
        self.live + self.sparse.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The window slot of `id`, if the window covers it.
    fn slot(&self, id: u64) -> Option<usize> {
        let index = usize::try_from(id.checked_sub(self.base)?).ok()?;
        (index < self.dense.len()).then_some(index)
    }

    /// Inserts `value` under `id`; returns the value it replaces.
    pub fn insert(&mut self, id: u64, value: V) -> Option<V> {
        if self.dense.is_empty() {
            self.base = id;
        }
        let Some(offset) = id.checked_sub(self.base) else {
            return self.sparse.insert(id, value);
        };
        let mut index = usize::try_from(offset).unwrap_or(usize::MAX);
        if index >= self.dense.len() {
            if index - self.dense.len() > 2 * (self.live + 1) + SLACK {
                // A long jump: start the window afresh here rather than fill the gap.
                self.spill_all();
                self.base = id;
                index = 0;
            }
            self.dense.resize_with(index + 1, || None);
        }
        let replaced = match self.dense[index].replace(value) {
            Some(old) => Some(old),
            None => {
                self.live += 1;
                if self.sparse.is_empty() {
                    None
                } else {
                    self.sparse.remove(&id)
                }
            }
        };
        self.keep_dense();
        replaced
    }

    pub fn remove(&mut self, id: u64) -> Option<V> {
        if let Some(index) = self.slot(id) {
            if let Some(value) = self.dense[index].take() {
                self.live -= 1;
                self.trim();
                self.keep_dense();
                return Some(value);
            }
        }
        if self.sparse.is_empty() {
            return None;
        }
        self.sparse.remove(&id)
    }

    pub fn get(&self, id: u64) -> Option<&V> {
        if let Some(value) = self.slot(id).and_then(|index| self.dense[index].as_ref()) {
            return Some(value);
        }
        self.sparse.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut V> {
        match self.slot(id) {
            Some(index) if self.dense[index].is_some() => self.dense[index].as_mut(),
            _ => self.sparse.get_mut(&id),
        }
    }

    pub fn contains_key(&self, id: u64) -> bool {
        self.get(id).is_some()
    }

    /// Every value, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.dense.iter().flatten().chain(self.sparse.values())
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        let base = self.base;
        self.dense
            .iter()
            .enumerate()
            .filter_map(move |(offset, slot)| Some((base + offset as u64, slot.as_ref()?)))
            .chain(self.sparse.iter().map(|(id, value)| (*id, value)))
    }

    /// Drops empty slots at both ends of the window.
    fn trim(&mut self) {
        while self.dense.front().is_some_and(Option::is_none) {
            self.dense.pop_front();
            self.base += 1;
        }
        while self.dense.back().is_some_and(Option::is_none) {
            self.dense.pop_back();
        }
        if self.dense.is_empty() && self.dense.capacity() > CAPACITY_KEPT_MAX {
            self.dense = VecDeque::new();
        }
    }

    /// Moves front entries to the map while the window is mostly empty slots.
    fn keep_dense(&mut self) {
        while self.dense.len() > 2 * self.live + SLACK {
            if let Some(Some(value)) = self.dense.pop_front() {
                self.live -= 1;
                self.sparse.insert(self.base, value);
            }
            self.base += 1;
            self.trim();
        }
    }

    fn spill_all(&mut self) {
        let base = self.base;
        for (offset, slot) in self.dense.drain(..).enumerate() {
            if let Some(value) = slot {
                self.sparse.insert(base + offset as u64, value);
            }
        }
        self.live = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn check(map: &IdMap<u64>, model: &BTreeMap<u64, u64>) {
        assert_eq!(map.len(), model.len());
        for (id, value) in model {
            assert_eq!(map.get(*id), Some(value), "id {id}");
        }
        let mut values: Vec<u64> = map.values().copied().collect();
        values.sort_unstable();
        let mut expected: Vec<u64> = model.values().copied().collect();
        expected.sort_unstable();
        assert_eq!(values, expected);
        let mut entries: Vec<(u64, u64)> = map.iter().map(|(id, v)| (id, *v)).collect();
        entries.sort_unstable();
        assert_eq!(
            entries,
            model.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>()
        );
        assert!(map.dense.len() <= 2 * map.live + SLACK);
        assert!(map.dense.front().is_none_or(Option::is_some));
        assert!(map.dense.back().is_none_or(Option::is_some));
    }

    #[test]
    fn in_order_traffic_stays_in_the_window() {
        let mut map = IdMap::default();
        for id in 0..1000u64 {
            assert_eq!(map.insert(id, id), None);
            if id >= 10 {
                assert_eq!(map.remove(id - 10), Some(id - 10));
            }
        }
        assert_eq!(map.len(), 10);
        assert!(map.sparse.is_empty());
        assert_eq!(map.dense.len(), 10);
    }

    #[test]
    fn one_old_entry_does_not_pin_memory() {
        let mut map = IdMap::default();
        map.insert(0, 0);
        for id in 1..100_000u64 {
            map.insert(id, id);
            map.remove(id);
        }
        assert_eq!(map.len(), 1);
        assert_eq!(map.get(0), Some(&0));
        assert!(map.dense.len() <= SLACK + 2);
        assert_eq!(map.remove(0), Some(0));
        assert!(map.is_empty());
    }

    #[test]
    fn long_gaps_and_old_ids() {
        let mut map = IdMap::default();
        map.insert(10, 10);
        map.insert(1_000_000, 1);
        map.insert(5, 5);
        assert_eq!(map.insert(5, 6), Some(5));
        assert_eq!(map.get(10), Some(&10));
        assert_eq!(map.get(5), Some(&6));
        assert_eq!(map.get(1_000_000), Some(&1));
        assert!(map.dense.len() < 10);
        assert_eq!(map.remove(10), Some(10));
        assert_eq!(map.remove(10), None);
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn matches_a_btreemap_under_random_operations() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut map = IdMap::default();
        let mut model = BTreeMap::new();
        let mut high = 0u64;
        for round in 0..50_000u64 {
            match next() % 8 {
                0..=3 => {
                    high += 1 + next() % 3;
                    if next() % 200 == 0 {
                        high += 10_000;
                    }
                    assert_eq!(map.insert(high, round), model.insert(high, round));
                }
                4 => {
                    // An old id (a requeued message delivered again), maybe already held.
                    let id = next() % (high + 1);
                    assert_eq!(map.insert(id, round), model.insert(id, round));
                }
                5 | 6 => {
                    // Mostly the oldest, as acks in order do.
                    let id = match model.keys().next() {
                        Some(first) if next() % 4 != 0 => *first,
                        _ => next() % (high + 2),
                    };
                    assert_eq!(map.remove(id), model.remove(&id));
                }
                _ => {
                    let id = next() % (high + 2);
                    if let (Some(value), Some(expected)) = (map.get_mut(id), model.get_mut(&id)) {
                        *value += 1;
                        *expected += 1;
                    }
                    assert_eq!(map.contains_key(id), model.contains_key(&id));
                }
            }
            if round % 1000 == 0 {
                check(&map, &model);
            }
        }
        check(&map, &model);
    }
}
