//! The engine's copy of the kernel's rule map: every node's key, value and
//! first-look block in two arrays sorted by key (28 bytes a node), instead
//! of a hash map of nodes with their rule slots (about 115 bytes a node at
//! 2M nodes, the map's buckets half empty). A lookup is a binary search;
//! a change is merged in, in one pass.

use filter_common::rules::{NameKey, NodeRules};

/// A node's value and its first-look block. The block is only ever used
/// under `Config::look_mask` (below 2^27), so its low 32 bits suffice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeVal {
    pub value: NodeRules,
    pub block: u32,
}

#[derive(Debug, Default)]
pub struct NodeStore {
    keys: Vec<NameKey>,
    vals: Vec<NodeVal>,
}

impl NodeStore {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn get(&self, key: &NameKey) -> Option<&NodeVal> {
        self.keys.binary_search(key).ok().map(|i| &self.vals[i])
    }

    pub fn iter(&self) -> impl Iterator<Item = (&NameKey, &NodeVal)> {
        self.keys.iter().zip(&self.vals)
    }

    /// For looking up keys in ascending order: each lookup starts where the
    /// last one ended (a binary search of 2M random keys is ~21 cache
    /// misses; a walk costs the gaps between the keys looked up).
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor { store: self, at: 0 }
    }

    /// Applies `updates`, sorted by key without repeats: `Some` sets a node,
    /// `None` removes it.
    pub fn merge(&mut self, updates: &[(NameKey, Option<NodeVal>)]) {
        debug_assert!(updates.windows(2).all(|w| w[0].0 < w[1].0));
        let grows = updates.iter().filter(|(_, v)| v.is_some()).count();
        let (mut keys, mut vals) = (Vec::with_capacity(self.keys.len() + grows), Vec::with_capacity(self.keys.len() + grows));
        let mut at = 0;
        for (key, val) in updates {
            let next = seek(&self.keys, at, key);
            keys.extend_from_slice(&self.keys[at..next]);
            vals.extend_from_slice(&self.vals[at..next]);
            at = next;
            if self.keys.get(at) == Some(key) {
                at += 1;
            }
            if let Some(v) = val {
                keys.push(*key);
                vals.push(*v);
            }
        }
        keys.extend_from_slice(&self.keys[at..]);
        vals.extend_from_slice(&self.vals[at..]);
        keys.shrink_to_fit();
        vals.shrink_to_fit();
        (self.keys, self.vals) = (keys, vals);
    }
}

pub struct Cursor<'a> {
    store: &'a NodeStore,
    at: usize,
}

impl<'a> Cursor<'a> {
    /// Node `key`, which is not below the key of the last call.
    pub fn get(&mut self, key: &NameKey) -> Option<&'a NodeVal> {
        self.at = seek(&self.store.keys, self.at, key);
        (self.store.keys.get(self.at) == Some(key)).then(|| &self.store.vals[self.at])
    }
}

/// The first place at or after `from` whose key is not below `key`:
/// galloping from `from`, then a binary search of the last stride.
fn seek(keys: &[NameKey], from: usize, key: &NameKey) -> usize {
    let (mut lo, mut hi, mut step) = (from, from, 1);
    while hi < keys.len() && keys[hi] < *key {
        lo = hi + 1;
        hi = from + step;
        step *= 2;
    }
    let hi = hi.min(keys.len());
    lo + keys[lo..hi].partition_point(|k| k < key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use filter_common::rules::RuleRef;

    fn key(n: u64) -> NameKey {
        NameKey { h: [n, n * 7] }
    }

    fn val(n: u32) -> NodeVal {
        NodeVal { value: NodeRules { exact: RuleRef::new(n, 0, false), below: RuleRef::NONE }, block: n }
    }

    #[test]
    fn merges_sets_and_removes() {
        let mut s = NodeStore::default();
        s.merge(&[(key(2), Some(val(2))), (key(5), Some(val(5))), (key(9), Some(val(9)))]);
        assert_eq!(s.len(), 3);
        s.merge(&[(key(1), Some(val(1))), (key(5), None), (key(9), Some(val(19))), (key(10), None)]);
        let got: Vec<(u64, u32)> = s.iter().map(|(k, v)| (k.h[0], v.block)).collect();
        assert_eq!(got, [(1, 1), (2, 2), (9, 19)]);
        assert_eq!(s.get(&key(9)), Some(&val(19)));
        assert!(s.get(&key(5)).is_none());
    }

    #[test]
    fn a_cursor_finds_what_a_search_finds() {
        let mut s = NodeStore::default();
        let updates: Vec<_> = (0..1000u64).map(|n| (key(n * 3), Some(val(n as u32)))).collect();
        s.merge(&updates);
        let mut c = s.cursor();
        for n in 0..3000u64 {
            assert_eq!(c.get(&key(n)), s.get(&key(n)), "{n}");
        }
        let mut c = s.cursor();
        assert!(c.get(&key(2997)).is_some() && c.get(&key(2998)).is_none() && c.get(&key(5000)).is_none());
    }
}
