//! The streaming HTTP request parser on arbitrary streams, cut into segments
//! chosen by the input, never panics; and whenever it reads a name (or says
//! the head has no Host), httparse, reading the same bytes as a complete
//! request head, agrees: the Host header's value up to a port, path or
//! whitespace, without one trailing dot, lowercased, is that name (absolute-
//! form targets, whose authority names the host, are left to the unit
//! tests). And the name bytes read, compared with later copies
//! (`flow::rewritten`): a copy of the same bytes, whole or as cut, is never
//! a rewrite; one with a name byte changed (not in letter case) always is.

#![no_main]

use filter_common::{
    flow::rewritten,
    http::{MAX_ROUNDS, Progress, Request, feed, resume},
    name::{CanonBuf, dotted_to_canon},
    tls::Resume,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut_seed, stream)) = data.split_first() else { return };
    // Segment lengths from the seed: 1..=256 bytes (or 1..=8), deterministic.
    let mut cuts: Vec<usize> = Vec::new();
    let mut at = 0usize;
    let mut x = u32::from(cut_seed) | 1;
    while at < stream.len() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        at += 1 + (x >> 16) as usize % if cut_seed & 0x80 != 0 { 8 } else { 256 };
        cuts.push(at.min(stream.len()));
    }
    let seq0 = 9u32;
    let mut r = Box::new(Request::new(seq0));
    let mut start = 0;
    let mut outcome = Progress::NeedMore;
    for &end in &cuts {
        let seg = &stream[start..end];
        for _ in 0..MAX_ROUNDS {
            let Resume::At(off) = resume(&r, seq0.wrapping_add(start as u32), 0, seg.len()) else { break };
            outcome = feed(&mut r, seg, off, seg.len());
            if outcome != Progress::StepsExhausted {
                break;
            }
        }
        if outcome != Progress::NeedMore {
            break;
        }
        start = end;
    }
    let ours = match outcome {
        Progress::Name(len) => {
            let (at, n) = r.name_read();
            assert!(n > 0);
            // Retransmissions: the stream whole, and each segment as cut.
            assert!(!rewritten(stream, seq0, 0, stream.len(), at, n, &r.name), "the same bytes are no rewrite");
            let mut from = 0;
            for &to in &cuts {
                assert!(!rewritten(&stream[from..to], seq0.wrapping_add(from as u32), 0, to - from, at, n, &r.name));
                from = to;
            }
            // One name byte changed.
            let i = at.wrapping_sub(seq0) as usize + usize::from(cut_seed) % n as usize;
            let mut changed = stream.to_vec();
            changed[i] ^= 1;
            assert!(rewritten(&changed[..], seq0, 0, changed.len(), at, n, &r.name), "byte {i} changed");
            let mut buf = CanonBuf::default();
            r.copy_name(&mut buf);
            Some(buf.canon(len).to_vec())
        }
        Progress::NoHost => None,
        _ => return,
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(stream) else { return };
    if req.path.is_some_and(|p| p.len() >= 7 && p.as_bytes()[..7].eq_ignore_ascii_case(b"http://")) {
        return;
    }
    let host = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host")).map(|h| h.value);
    let Some(value) = host else {
        assert_eq!(ours, None, "a name from a request httparse reads without Host");
        return;
    };
    let name = value.split(|b| matches!(b, b':' | b'/' | b'?' | b'#' | b' ' | b'\t')).next().unwrap_or_default();
    let name = name.strip_suffix(b".").unwrap_or(name);
    let valid = !name.is_empty() && name.split(|b| *b == b'.').all(|l| !l.is_empty() && l.len() <= 63 && l.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_'));
    let want = valid.then(|| {
        let mut buf = CanonBuf::default();
        dotted_to_canon(&name.to_ascii_lowercase()[..], 0, name.len(), &mut buf).ok().map(|n| buf.canon(n).to_vec())
    });
    match want {
        Some(Some(w)) => assert_eq!(ours, Some(w), "host {:?}", String::from_utf8_lossy(value)),
        // Not a name (or too long for one): the parser must not have read one.
        _ => panic!("{outcome:?} for a Host httparse reads as {:?}", String::from_utf8_lossy(value)),
    }
});
