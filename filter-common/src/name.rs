//! The canonical name form and the matcher.
//!
//! A name is matched against the rules of every ancestor (`org`,
//! `telegram.org`, `web.telegram.org`), so the canonical form puts ancestors
//! first: labels from the last to the first, each as its length byte followed
//! by its ASCII-lowercased bytes **reversed**:
//!
//! ```text
//! web.telegram.org  ->  [3]"gro" [8]"margelet" [3]"bew"
//! ```
//!
//! Every ancestor is then a prefix, so one left-to-right pass hashes them all.
//! Both DNS wire names and dotted names (SNI, Host, rule patterns) map to this
//! form in one forward scan, writing right-aligned into a 256-byte buffer: a
//! byte at input position `j` lands at `CANON_END - j` (shifted by one for wire
//! names), and length bytes are written once the label length is known.

use crate::{
    hash::Hasher,
    packet::Packet,
    rules::{Config, NameKey, RuleLookup, RuleRef},
};

/// Size of the canonical-name buffer.
pub const CANON_CAP: usize = 256;
/// Index of the buffer's last byte: canonical names end here.
pub const CANON_END: usize = CANON_CAP - 1;
/// Longest canonical name: a 255-byte wire name minus its root byte.
pub const MAX_CANON_LEN: usize = 254;
/// Longest dotted name (no trailing dot).
pub const MAX_DOTTED_LEN: usize = 253;
/// Longest label.
pub const MAX_LABEL_LEN: usize = 63;

/// Scratch space for one canonical name (a per-CPU map value in the kernel).
///
/// Besides the name, it holds what the two passes tell each other, in memory
/// rather than in registers: the BPF verifier does not track values in map
/// memory, so a loop whose decisions come from loads has the same state in
/// every iteration whatever the label lengths were, and is verified once per
/// iteration instead of once per possible history.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CanonBuf {
    /// The canonical name, right-aligned (ending at `CANON_END`).
    pub bytes: [u8; CANON_CAP],
    /// 1 where a canonical label starts (its length byte), 0 elsewhere,
    /// over the name's range.
    pub starts: [u8; CANON_CAP],
    /// Never read or written. LLVM turns `starts[i & CANON_END]` in the
    /// matcher's loop into a pointer bumped from the name's start, dropping
    /// the mask; the verifier then bounds it by start (up to 255) plus the
    /// iteration count (up to 254), so the value must reach that far.
    pub slack: [u8; CANON_CAP],
    /// The wire parser's position of the next length byte.
    pub next: u64,
    /// The matcher's label count so far.
    pub depth: u64,
    /// The key being looked up: built here rather than on the stack, where
    /// the verifier would carry its value from one iteration to the next.
    pub key: NameKey,
    /// What the matcher found so far (a `RuleRef`), kept here for the same
    /// reason.
    pub found: u64,
    /// The first look's block of the name (`rules::first_look_slot`): set
    /// at depths 1 and 2, kept below.
    pub block: u64,
}

impl Default for CanonBuf {
    fn default() -> Self {
        Self { bytes: [0; CANON_CAP], starts: [0; CANON_CAP], slack: [0; CANON_CAP], next: 0, depth: 0, key: NameKey { h: [0, 0] }, found: 0, block: 0 }
    }
}

impl CanonBuf {
    /// The canonical name of length `len` held in the buffer.
    pub fn canon(&self, len: usize) -> &[u8] {
        &self.bytes[CANON_CAP - len.min(MAX_CANON_LEN)..]
    }

    /// Stores one canonical byte at `slot`, noting whether a label starts there.
    #[inline(always)]
    pub fn put(&mut self, slot: usize, byte: u8, label_start: bool) {
        self.bytes[slot & CANON_END] = byte;
        self.starts[slot & CANON_END] = label_start as u8;
    }

    /// Reads one of the in-memory loop registers (`next`, `depth`).
    #[inline(always)]
    pub fn load(reg: &u64) -> u64 {
        // SAFETY: a plain field; volatile keeps it in memory (see above).
        unsafe { core::ptr::read_volatile(reg) }
    }

    #[inline(always)]
    pub fn store(reg: &mut u64, v: u64) {
        // SAFETY: as in `load`.
        unsafe { core::ptr::write_volatile(reg, v) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameError {
    Empty,
    EmptyLabel,
    LabelTooLong,
    TooLong,
    /// The input ended inside the name.
    Truncated,
    /// A compression pointer or reserved label type where a label must be.
    BadLabel,
}

#[inline(always)]
pub const fn ascii_lower(b: u8) -> u8 {
    if b.wrapping_sub(b'A') < 26 { b | 0x20 } else { b }
}

/// Writes the dotted name `src[off..off + len]` (one trailing dot allowed) in
/// canonical form; returns the canonical length.
#[inline(always)]
pub fn dotted_to_canon<P: Packet + ?Sized>(src: &P, off: usize, len: usize, buf: &mut CanonBuf) -> Result<usize, NameError> {
    let mut n = len;
    if n > 0 && src.u8_at(off + n - 1) == Some(b'.') {
        n -= 1;
    }
    if n == 0 {
        return Err(NameError::Empty);
    }
    if n > MAX_DOTTED_LEN {
        return Err(NameError::TooLong);
    }
    let mut label_start = 0usize;
    for j in 0..MAX_DOTTED_LEN {
        if j >= n {
            break;
        }
        let b = src.u8_at(off + j).ok_or(NameError::Truncated)?;
        let at = (CANON_END - j) & CANON_END;
        if b == b'.' {
            let l = j - label_start;
            if l == 0 {
                return Err(NameError::EmptyLabel);
            }
            if l > MAX_LABEL_LEN {
                return Err(NameError::LabelTooLong);
            }
            buf.put(at, l as u8, true);
            label_start = j + 1;
        } else {
            buf.put(at, ascii_lower(b), false);
        }
    }
    let l = n - label_start;
    if l == 0 {
        return Err(NameError::EmptyLabel);
    }
    if l > MAX_LABEL_LEN {
        return Err(NameError::LabelTooLong);
    }
    buf.put(CANON_END - n, l as u8, true);
    Ok(n + 1)
}

/// Where a canonical name of length `len` starts in the buffer.
#[inline(always)]
pub const fn canon_start(len: usize) -> usize {
    CANON_CAP.wrapping_sub(len)
}

/// Hashes every ancestor of the canonical name starting at `start` (see
/// `canon_start`), top-level label first, calling `f(depth, key, block,
/// is_full_name, found)` (`block`: see `rules::first_look_slot`); stops when `f` returns `true`. `found` is a word
/// in the buffer, zeroed first, for `f` to record results in. An ancestor
/// ends where the next label starts (`starts`), or at the end of the name.
///
/// It takes the start rather than the length so that the kernel's pointer
/// arithmetic is `buffer + start + k`, never `buffer + 256 - len`, whose
/// negative variable part the verifier refuses.
#[inline(always)]
pub fn walk_ancestors<F: FnMut(u32, &NameKey, u64, bool, &mut u64) -> bool>(buf: &mut CanonBuf, start: usize, r: &[u64; 2], mut f: F) {
    // Zeroed before anything else: the buffer outlives the packet (a per-CPU
    // map value in the kernel), so an empty name (the root) must not leave
    // the previous name's result in `found`.
    CanonBuf::store(&mut buf.found, 0);
    if !(CANON_CAP - MAX_CANON_LEN..=CANON_END).contains(&start) {
        return;
    }
    let mut h = Hasher::new();
    // The depth lives in memory: as a register it would be a different
    // constant on each path and the verifier would track every one.
    CanonBuf::store(&mut buf.depth, 0);
    // Counted from 0 with the exit tested at the bottom, so that the loop's
    // only back-edge is that conditional jump: kernels before 6.7 refuse a
    // back-edge reached by falling through, which `for i in start..CANON_CAP`
    // compiled to (the increment laid out just above the loop's head). Each
    // index is masked after `hide`, on the register that indexes: 6.12 does
    // not carry the range check on `start` over to a copy of it.
    // The shape is what the verifiers of 6.1 and 6.12 accept:
    // - the exit is tested at the bottom, after a hidden increment, so the
    //   only back-edge is that conditional jump (before 6.7 a back-edge
    //   reached by falling through is refused, and `for i in start..CANON_CAP`
    //   compiled to a latch laid out above the loop's head);
    // - the count `k` is a constant in each iteration: with `i` alone, a range
    //   that narrows, 6.1 sees the same state twice at the loop's head
    //   ("infinite loop detected");
    // - each index is masked after `hide`, on the register that indexes
    //   (6.12 does not carry the bound checked on a copy of `start`).
    let mut i = start;
    let mut k = 0;
    loop {
        h.push(r, buf.bytes[crate::hide(i) & CANON_END]);
        let full = i >= CANON_END;
        if full || buf.starts[crate::hide(i + 1) & CANON_END] != 0 {
            let depth = CanonBuf::load(&buf.depth) + 1;
            CanonBuf::store(&mut buf.depth, depth);
            let [k0, k1] = h.finish(r);
            CanonBuf::store(&mut buf.key.h[0], k0);
            CanonBuf::store(&mut buf.key.h[1], k1);
            // The first lane of this key at depths 1 and 2, the one kept
            // below: arithmetic, not a branch on the depth.
            let top = 0u64.wrapping_sub(depth.wrapping_sub(3) >> 63);
            let block = (k0 & top) | (CanonBuf::load(&buf.block) & !top);
            CanonBuf::store(&mut buf.block, block);
            if f(depth as u32, &buf.key, block, full, &mut buf.found) {
                return;
            }
        }
        i = crate::hide(i + 1);
        k += 1;
        // At most MAX_CANON_LEN iterations: start is at least 2.
        if i > CANON_END || k >= MAX_CANON_LEN {
            return;
        }
    }
}

/// The key of the full canonical name (rule insertion uses it).
pub fn full_name_key(buf: &mut CanonBuf, len: usize, r: &[u64; 2]) -> Option<NameKey> {
    full_name_probe(buf, len, r).map(|(key, _)| key)
}

/// The key of the full canonical name and its first-look block
/// (`rules::first_look_slot`).
pub fn full_name_probe(buf: &mut CanonBuf, len: usize, r: &[u64; 2]) -> Option<(NameKey, u64)> {
    let mut out = None;
    walk_ancestors(buf, canon_start(len), r, |_, key, block, full, _| {
        if full {
            out = Some((*key, block));
        }
        full
    });
    out
}

/// What the rules decide for one name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No rule applies.
    NoMatch,
    /// An allow rule applies: allow rules win over block rules.
    Allow(RuleRef),
    /// The most specific block rule that applies.
    Block(RuleRef),
}

/// Matches the canonical name starting at `start` (see `canon_start`)
/// against the rules: exact rules on the name itself, subtree rules on each
/// proper ancestor, allow over block.
#[inline(always)]
pub fn match_canon<L: RuleLookup + ?Sized>(buf: &mut CanonBuf, start: usize, cfg: &Config, rules: &L) -> Decision {
    // The rule found so far lives in `found` (memory), not in a register.
    walk_ancestors(buf, start, &cfg.hash_r, |depth, key, block, full, found| {
        if !cfg.has_depth(depth) || !rules.may_hold(cfg, block, key) {
            return false;
        }
        let Some(node) = rules.lookup(key) else {
            return false;
        };
        let r = if full { node.exact } else { node.below };
        if r.is_none() {
            return false;
        }
        CanonBuf::store(found, u64::from(r.0));
        r.is_allow()
    });
    let found = RuleRef(CanonBuf::load(&buf.found) as u32);
    if found.is_none() {
        Decision::NoMatch
    } else if found.is_allow() {
        Decision::Allow(found)
    } else {
        Decision::Block(found)
    }
}

/// Userspace's view of a node map, for `match_canon` outside the kernel.
#[cfg(feature = "std")]
impl<S: core::hash::BuildHasher> RuleLookup for std::collections::HashMap<NameKey, crate::rules::NodeRules, S> {
    fn lookup(&self, key: &NameKey) -> Option<crate::rules::NodeRules> {
        self.get(key).copied()
    }
}

/// The dotted form of the canonical name in `buf`, which must hold exactly
/// one name (as a fresh buffer does after one name was written): it starts
/// at the first label-start mark and ends at the buffer's end. For display
/// (the host model, `blokir replay`, the QUIC reader).
#[cfg(feature = "std")]
pub fn canon_to_dotted(buf: &CanonBuf) -> std::string::String {
    use std::{string::String, vec::Vec};
    let Some(start) = buf.starts.iter().position(|s| *s == 1) else { return ".".into() };
    let canon = &buf.bytes[start..CANON_CAP];
    let mut labels = Vec::new();
    let mut i = 0;
    while i < canon.len() {
        let len = canon[i] as usize;
        let label: Vec<u8> = canon[i + 1..(i + 1 + len).min(canon.len())].iter().rev().copied().collect();
        labels.push(String::from_utf8_lossy(&label).into_owned());
        i += 1 + len;
    }
    labels.reverse();
    labels.join(".")
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::format;

    fn canon_of(s: &str) -> (CanonBuf, usize) {
        let mut b = CanonBuf::default();
        let n = dotted_to_canon(s.as_bytes(), 0, s.len(), &mut b).unwrap();
        (b, n)
    }

    #[test]
    fn canonical_form_reverses_labels_and_bytes() {
        let (b, n) = canon_of("WeB.TeLeGrAm.OrG.");
        assert_eq!(b.canon(n), b"\x03gro\x08margelet\x03bew");
    }

    #[test]
    fn dotted_errors() {
        let mut b = CanonBuf::default();
        let mut conv = |s: &str| dotted_to_canon(s.as_bytes(), 0, s.len(), &mut b);
        assert_eq!(conv(""), Err(NameError::Empty));
        assert_eq!(conv("."), Err(NameError::Empty));
        assert_eq!(conv("a..b"), Err(NameError::EmptyLabel));
        assert_eq!(conv(".a"), Err(NameError::EmptyLabel));
        assert_eq!(conv(&"a".repeat(64)), Err(NameError::LabelTooLong));
        assert_eq!(conv(&"a".repeat(63)), Ok(64));
        let long = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
        assert_eq!(long.len(), 253);
        assert_eq!(conv(&long), Ok(254));
        assert_eq!(conv(&format!("x{long}")), Err(NameError::TooLong));
    }

    #[test]
    fn ancestors_are_walked_top_down() {
        let r = [crate::hash::lane_multiplier(1), crate::hash::lane_multiplier(2)];
        let (mut b, n) = canon_of("a.b.c");
        let mut seen = [None; 4];
        walk_ancestors(&mut b, canon_start(n), &r, |d, k, _, full, _| {
            seen[d as usize] = Some((*k, full));
            false
        });
        for (d, name) in [(1, "c"), (2, "b.c"), (3, "a.b.c")] {
            let (mut cb, cn) = canon_of(name);
            assert_eq!(seen[d].unwrap().0, full_name_key(&mut cb, cn, &r).unwrap(), "{name}");
            assert_eq!(seen[d].unwrap().1, d == 3);
        }
    }
}
