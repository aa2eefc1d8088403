//! The first look's bits as the daemon writes them (the kernel's
//! `FIRST_LOOK`, mmapped; a host copy in tests). The layout is
//! `filter_common::rules::first_look_slot`'s.
//!
//! What keeps every verdict right: a node's bits are set before the node is
//! written to the rule map, and a bit is cleared only by `rebuild`, run when
//! the map holds exactly the nodes it is given. Each word is stored whole
//! (an aligned 8-byte store), so a probe reads either the word before or the
//! word after, and a bit needed by a node in the map is set in both.

use std::sync::atomic::{AtomicU64, Ordering};

use filter_common::rules::{NameKey, first_look_slot};

/// A rule node as the first look places it: its block (see
/// `first_look_slot`) and its key.
pub type Probe = (u64, NameKey);

/// Sets the bits of `probes`.
pub fn add(words: &[AtomicU64], probes: impl Iterator<Item = Probe>) {
    let mask = words.len() as u64 - 1;
    for (block, key) in probes {
        let (word, bits) = first_look_slot(mask, block, &key);
        // Release: the bits are visible before the rule map write that
        // follows.
        words[word as usize].fetch_or(bits, Ordering::Release);
    }
}

/// The words holding exactly `probes`' bits.
pub fn build(len: usize, probes: impl Iterator<Item = Probe>) -> Vec<u64> {
    let mask = len as u64 - 1;
    let mut out = vec![0u64; len];
    for (block, key) in probes {
        let (word, bits) = first_look_slot(mask, block, &key);
        out[word as usize] |= bits;
    }
    out
}

/// Rewrites `words` to `new` (from `build` over every node of the rule
/// map), word by word, calling `stored` after each word changed; returns
/// how many changed.
pub fn rebuild(words: &[AtomicU64], new: &[u64], mut stored: impl FnMut()) -> usize {
    let mut changed = 0;
    for (w, n) in words.iter().zip(new) {
        if w.load(Ordering::Relaxed) != *n {
            w.store(*n, Ordering::Release);
            changed += 1;
            stored();
        }
    }
    changed
}

/// Host words for a first look of `len` words (a power of two).
pub fn host(len: usize) -> Vec<AtomicU64> {
    (0..len).map(|_| AtomicU64::new(0)).collect()
}

/// Whether a probe passes the first look (the kernel's `may_hold`, on the
/// host).
pub fn may_hold(words: &[AtomicU64], block: u64, key: &NameKey) -> bool {
    let (word, bits) = first_look_slot(words.len() as u64 - 1, block, key);
    words[word as usize].load(Ordering::Acquire) & bits == bits
}
