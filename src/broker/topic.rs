//! Topic matching by a trie over the dot-separated words of binding keys.
//!
//! `*` matches exactly one word and `#` zero or more. A routing key is split on `.`; the empty
//! routing key has no words (so `#` matches it and `*` does not), as RabbitMQ splits it. Matching
//! walks the trie once per message: no regular expressions, no per-binding scan.
//!
//! Runs of `#` are collapsed on insert (`a.#.#.b` is `a.#.b`): they match the same keys, and
//! collapsing keeps matching polynomial.

use ahash::HashMap;

use crate::codec::ShortStr;

#[derive(Debug)]
struct Node<T> {
    children: HashMap<Box<[u8]>, Node<T>>,
    star: Option<Box<Node<T>>>,
    hash: Option<Box<Node<T>>>,
    /// What is bound with a key ending at this node.
    bound: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            children: HashMap::default(),
            star: None,
            hash: None,
            bound: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.bound.is_empty()
            && self.children.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
    }
}

/// The words of a binding key with runs of `#` collapsed.
fn binding_words(key: &[u8]) -> Vec<&[u8]> {
    let mut words: Vec<&[u8]> = Vec::new();
    if key.is_empty() {
        return words;
    }
    for word in key.split(|b| *b == b'.') {
        if word == b"#" && words.last() == Some(&&b"#"[..]) {
            continue;
        }
        words.push(word);
    }
    words
}

fn routing_words(key: &[u8]) -> Vec<&[u8]> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split(|b| *b == b'.').collect()
    }
}

/// A set of bindings `T` keyed by topic binding keys.
#[derive(Debug)]
pub struct TopicTrie<T> {
    root: Node<T>,
    len: usize,
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        TopicTrie {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<T: PartialEq + Clone> TopicTrie<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `value` under `binding_key`; returns false if it was there already.
    pub fn insert(&mut self, binding_key: &ShortStr, value: T) -> bool {
        let mut node = &mut self.root;
        for word in binding_words(binding_key.as_bytes()) {
            node = match word {
                b"*" => node.star.get_or_insert_with(Default::default),
                b"#" => node.hash.get_or_insert_with(Default::default),
                word => node.children.entry(word.into()).or_default(),
            };
        }
        if node.bound.contains(&value) {
            return false;
        }
        node.bound.push(value);
        self.len += 1;
        true
    }

    /// Removes `value` from under `binding_key`; returns whether it was there.
    pub fn remove(&mut self, binding_key: &ShortStr, value: &T) -> bool {
        let words = binding_words(binding_key.as_bytes());
        let removed = remove_at(&mut self.root, &words, value);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Removes every value `predicate` selects; returns how many.
    pub fn remove_where(&mut self, predicate: &mut impl FnMut(&T) -> bool) -> usize {
        let removed = remove_where_at(&mut self.root, predicate);
        self.len -= removed;
        removed
    }

    /// Calls `visit` with every binding key and value in the trie.
    pub fn for_each(&self, visit: &mut impl FnMut(&[u8], &T)) {
        let mut key = Vec::new();
        for_each_at(&self.root, &mut key, 0, visit);
    }

    /// Calls `found` for every value bound with a key that matches `routing_key`. A value bound
    /// under several matching keys is reported once per key; callers deduplicate.
    pub fn for_each_match(&self, routing_key: &[u8], found: &mut impl FnMut(&T)) {
        let words = routing_words(routing_key);
        match_at(&self.root, &words, found);
    }
}

fn remove_at<T: PartialEq>(node: &mut Node<T>, words: &[&[u8]], value: &T) -> bool {
    let Some((first, rest)) = words.split_first() else {
        let before = node.bound.len();
        node.bound.retain(|v| v != value);
        return node.bound.len() != before;
    };
    let (removed, now_empty) = match *first {
        b"*" => match node.star.as_deref_mut() {
            Some(child) => (remove_at(child, rest, value), child.is_empty()),
            None => (false, false),
        },
        b"#" => match node.hash.as_deref_mut() {
            Some(child) => (remove_at(child, rest, value), child.is_empty()),
            None => (false, false),
        },
        word => match node.children.get_mut(word) {
            Some(child) => (remove_at(child, rest, value), child.is_empty()),
            None => (false, false),
        },
    };
    if now_empty {
        match *first {
            b"*" => node.star = None,
            b"#" => node.hash = None,
            word => {
                node.children.remove(word);
            }
        }
    }
    removed
}

fn remove_where_at<T>(node: &mut Node<T>, predicate: &mut impl FnMut(&T) -> bool) -> usize {
    let before = node.bound.len();
    node.bound.retain(|v| !predicate(v));
    let mut removed = before - node.bound.len();
    for slot in [&mut node.star, &mut node.hash] {
        if let Some(child) = slot.as_deref_mut() {
            removed += remove_where_at(child, predicate);
            if child.is_empty() {
                *slot = None;
            }
        }
    }
    node.children.retain(|_, child| {
        removed += remove_where_at(child, predicate);
        !child.is_empty()
    });
    removed
}

fn for_each_at<T>(
    node: &Node<T>,
    key: &mut Vec<u8>,
    depth: usize,
    visit: &mut impl FnMut(&[u8], &T),
) {
    for value in &node.bound {
        visit(key, value);
    }
    let mut descend = |word: &[u8], child: &Node<T>, key: &mut Vec<u8>| {
        let start = key.len();
        if depth > 0 {
            key.push(b'.');
        }
        key.extend_from_slice(word);
        for_each_at(child, key, depth + 1, visit);
        key.truncate(start);
    };
    if let Some(star) = &node.star {
        descend(b"*", star, key);
    }
    if let Some(hash) = &node.hash {
        descend(b"#", hash, key);
    }
    for (word, child) in &node.children {
        descend(word, child, key);
    }
}

fn match_at<T>(node: &Node<T>, words: &[&[u8]], found: &mut impl FnMut(&T)) {
    if let Some(hash) = &node.hash {
        // `#` consumes zero or more words: try every split.
        for skip in 0..=words.len() {
            match_at(hash, &words[skip..], found);
        }
    }
    let Some((first, rest)) = words.split_first() else {
        node.bound.iter().for_each(found);
        return;
    };
    if let Some(child) = node.children.get(*first) {
        match_at(child, rest, found);
    }
    if let Some(star) = &node.star {
        match_at(star, rest, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ShortStr {
        ShortStr::try_from(s).unwrap()
    }

    fn matches(bindings: &[&str], routing_key: &str) -> Vec<String> {
        let mut trie = TopicTrie::default();
        for binding in bindings {
            trie.insert(&key(binding), binding.to_string());
        }
        let mut found = Vec::new();
        trie.for_each_match(routing_key.as_bytes(), &mut |v: &String| {
            found.push(v.clone())
        });
        found.sort();
        found.dedup();
        found
    }

    /// (binding key, routing key, matches) — RabbitMQ's semantics.
    const CASES: &[(&str, &str, bool)] = &[
        ("a.b.c", "a.b.c", true),
        ("a.b.c", "a.b", false),
        ("a.*.c", "a.b.c", true),
        ("a.*.c", "a.c", false),
        ("a.*.c", "a.b.b.c", false),
        ("a.#", "a", true),
        ("a.#", "a.b.c", true),
        ("a.#.c", "a.c", true),
        ("a.#.c", "a.b.x.c", true),
        ("a.#.c", "a.b.x.d", false),
        ("#", "", true),
        ("#", "anything.at.all", true),
        ("*", "", false),
        ("*", "one", true),
        ("*", "one.two", false),
        ("#.#", "a", true),
        ("a.#.#.b", "a.b", true),
        ("*.#", "", false),
        ("*.#", "x", true),
        ("#.*", "x.y", true),
        ("", "", true),
        ("", "a", false),
        ("a..b", "a..b", true),
        ("a.*.b", "a..b", true),
        ("x.#.y.*", "x.y.z", true),
        ("x.#.y.*", "x.y", false),
    ];

    #[test]
    fn topic_semantics_table() {
        for (binding, routing_key, expected) in CASES {
            let found = !matches(&[binding], routing_key).is_empty();
            assert_eq!(
                found, *expected,
                "binding {binding:?} vs routing key {routing_key:?}"
            );
        }
    }

    #[test]
    fn remove_prunes_and_counts() {
        let mut trie = TopicTrie::default();
        assert!(trie.insert(&key("a.*.#"), 1));
        assert!(!trie.insert(&key("a.*.#"), 1));
        assert!(trie.insert(&key("a.*.#"), 2));
        assert!(trie.insert(&key("b"), 3));
        assert_eq!(trie.len(), 3);
        assert!(trie.remove(&key("a.*.#"), &1));
        assert!(!trie.remove(&key("a.*.#"), &1));
        assert_eq!(trie.remove_where(&mut |v| *v >= 2), 2);
        assert!(trie.is_empty());
        assert!(trie.root.is_empty());
    }

    #[test]
    fn for_each_gives_back_every_binding_key() {
        let mut trie = TopicTrie::default();
        let keys = ["", "a", ".a", "a..b", "*.x.#", "#", "a.#.#.b"];
        for (i, k) in keys.iter().enumerate() {
            trie.insert(&key(k), i);
        }
        let mut seen = Vec::new();
        trie.for_each(&mut |k: &[u8], v: &usize| {
            seen.push((String::from_utf8(k.to_vec()).unwrap(), *v))
        });
        seen.sort_by_key(|(_, v)| *v);
        let expected: Vec<(String, usize)> = keys
            .iter()
            .enumerate()
            // runs of # are collapsed on insert
            .map(|(i, k)| (k.replace("#.#", "#"), i))
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn many_hashes_stay_fast() {
        let mut trie = TopicTrie::default();
        trie.insert(&key("#.#.#.#.#.#.#.#.#.#.x"), 1);
        let long_key = vec!["w"; 200].join(".");
        let started = std::time::Instant::now();
        let mut found = 0;
        trie.for_each_match(long_key.as_bytes(), &mut |_| found += 1);
        assert_eq!(found, 0);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
