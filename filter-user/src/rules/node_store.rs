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

    /// Applies `updates`, sorted by key without repeats: `Some` sets a node,
    /// `None` removes it.
    pub fn merge(&mut self, updates: &[(NameKey, Option<NodeVal>)]) {
        debug_assert!(updates.windows(2).all(|w| w[0].0 < w[1].0));
        let grows = updates.iter().filter(|(_, v)| v.is_some()).count();
        let (mut keys, mut vals) = (Vec::with_capacity(self.keys.len() + grows), Vec::with_capacity(self.keys.len() + grows));
        let mut at = 0;
        for (key, val) in updates {
            let run = self.keys[at..].partition_point(|k| k < key);
            keys.extend_from_slice(&self.keys[at..at + run]);
            vals.extend_from_slice(&self.vals[at..at + run]);
            at += run;
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
}
