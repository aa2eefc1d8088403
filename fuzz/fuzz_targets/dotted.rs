//! `dotted_to_canon` on arbitrary bytes, and `walk_ancestors` over its output.
//!
//! Input: a control byte, then the bytes. The control byte picks the offset
//! of the name (0..4) and how far `len` reaches past the buffer (0..4: the
//! converter must then fail as truncated, not read out of bounds).
//!
//! Checked against a reference written from the definition (one trailing dot
//! dropped; 1..=253 bytes; labels of 1..=63 bytes separated by `.`; any other
//! byte is label content; ASCII letters fold to lower case):
//! * success/failure agree with the reference, with the same canonical bytes
//!   and label-start marks;
//! * `walk_ancestors` visits exactly one ancestor per label, with depths
//!   1, 2, ... in order, only the last with `full = true`, and each key is
//!   `full_name_key` of that ancestor converted on its own; the last key is
//!   `full_name_key` of the whole name;
//! * a walk stopped early (the callback returns `true`) stops at once.
#![no_main]

use blokir_fuzz::{HASH_R, dirty, reference_canon};
use filter_common::{
    name::{CANON_CAP, CanonBuf, NameError, canon_start, dotted_to_canon, full_name_key, walk_ancestors},
    rules::NameKey,
};
use libfuzzer_sys::fuzz_target;

/// The reference: labels (lowercased) of a valid dotted name.
fn reference(name: &[u8]) -> Option<Vec<Vec<u8>>> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    let labels: Vec<Vec<u8>> = name.split(|&b| b == b'.').map(<[u8]>::to_ascii_lowercase).collect();
    labels.iter().all(|l| (1..=63).contains(&l.len())).then_some(labels)
}

fn key_of(name: &[u8]) -> NameKey {
    let mut b = Box::<CanonBuf>::default();
    dirty(&mut b, name);
    let n = dotted_to_canon(name, 0, name.len(), &mut b).expect("ancestor converts");
    full_name_key(&mut b, n, &HASH_R).expect("ancestor key")
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, bytes)) = data.split_first() else {
        return;
    };
    let off = usize::from(ctl & 3);
    let over = usize::from((ctl >> 2) & 3);
    let len = bytes.len().saturating_sub(off) + over;

    let mut buf = Box::<CanonBuf>::default();
    dirty(&mut buf, data);
    let result = dotted_to_canon(bytes, off, len, &mut buf);

    let in_bounds = off + len <= bytes.len();
    let want = if in_bounds { reference(&bytes[off..off + len]) } else { None };
    let Some(labels) = want else {
        assert!(result.is_err(), "accepted {:?} (in bounds: {in_bounds})", bytes.get(off..).map(String::from_utf8_lossy));
        if !in_bounds && reference(&bytes[off.min(bytes.len())..]).is_some() {
            // Past the buffer only: the converter must notice the missing bytes.
            assert!(matches!(result, Err(NameError::Truncated | NameError::TooLong)), "{result:?}");
        }
        return;
    };
    let n = result.unwrap_or_else(|e| panic!("rejected ({e:?}) a valid name {:?}", String::from_utf8_lossy(&bytes[off..off + len])));
    let (want_bytes, want_starts) = reference_canon(&labels);
    assert_eq!(n, want_bytes.len());
    assert_eq!(buf.canon(n), want_bytes.as_slice());
    let starts: Vec<bool> = buf.starts[CANON_CAP - n..].iter().map(|&s| s != 0).collect();
    assert_eq!(starts, want_starts);

    let full = full_name_key(&mut buf.clone(), n, &HASH_R).expect("full name key");
    let mut seen: Vec<(u32, NameKey, bool)> = Vec::new();
    walk_ancestors(&mut buf, canon_start(n), &HASH_R, |depth, key, _, is_full, _| {
        seen.push((depth, *key, is_full));
        false
    });
    assert_eq!(seen.len(), labels.len(), "ancestors of {labels:?}");
    for (i, &(depth, key, is_full)) in seen.iter().enumerate() {
        assert_eq!(depth as usize, i + 1);
        assert_eq!(is_full, i + 1 == labels.len());
        let ancestor = labels[labels.len() - 1 - i..].join(&b'.');
        assert_eq!(key, key_of(&ancestor), "depth {depth} of {labels:?}");
    }
    assert_eq!(seen.last().map(|s| s.1), Some(full));

    // Stopping early: the callback returning true ends the walk.
    let stop = usize::from(ctl >> 4) % labels.len() + 1;
    let mut calls = 0;
    walk_ancestors(&mut buf, canon_start(n), &HASH_R, |depth, _, _, _, _| {
        calls += 1;
        depth as usize == stop
    });
    assert_eq!(calls, stop);
});
