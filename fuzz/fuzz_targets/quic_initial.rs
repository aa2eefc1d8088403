//! The daemon's QUIC Initial reader on arbitrary datagrams and on Initials
//! sealed from the input (so that the fuzzer reaches past the AEAD into the
//! frames and the packet walk). Never panics; a long header read is within
//! its datagram and moves the walk on; a sealed Initial parses back to its
//! own fields and opens to its own frames; the reader never finds a
//! datagram of sealed Initials undecryptable, alone or coalesced, after
//! junk or not.
//!
//! Input: a mode byte. Even: datagrams, each a 2-byte length then its bytes.
//! Odd: flags, a DCID length (mod 21), the DCID, then the frames, cut over
//! 1 to 3 Initials of version 1 or 2, sent coalesced or one per datagram.

#![no_main]

use std::time::Instant;

use blokir_fuzz::quic::{
    initial::{Keys, LongHeader, Version, long_header, open},
    reader::{Event, Reader},
    seal,
};
use filter_common::tls::FlowKey;
use libfuzzer_sys::fuzz_target;

/// Walks the datagram's packets as the reader does, checking each header.
fn walk(d: &[u8]) {
    let mut off = 0;
    while off < d.len() {
        let Ok(h) = long_header(d, off) else { break };
        let LongHeader { dcid, pn_off, end, .. } = h;
        assert!(off + 6 <= dcid.0 && dcid.0 <= dcid.1 && dcid.1 - dcid.0 <= 20 && dcid.1 < pn_off && pn_off <= end && end <= d.len(), "{h:?} at {off}");
        let keys = Keys::client(h.version, &d[dcid.0..dcid.1]);
        let mut copy = d.to_vec();
        if let Ok((_, range)) = open(&mut copy, off, &h, &keys) {
            assert!(pn_off < range.0 && range.0 <= range.1 && range.1 + 16 == end, "{range:?} in {h:?}");
        }
        assert!(end > off, "the walk moves on");
        off = end;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let key = FlowKey::default();
    let now = Instant::now();
    let mut reader = Reader::new(4, std::time::Duration::from_secs(10));
    if mode & 1 == 0 {
        let mut at = 0;
        while at + 2 <= rest.len() {
            let len = usize::from(u16::from_be_bytes([rest[at], rest[at + 1]])) % 1600;
            let d = &rest[at + 2..(at + 2 + len).min(rest.len())];
            at += 2 + d.len();
            walk(d);
            reader.datagram(key, d, now);
        }
        return;
    }
    let [flags, dcid_len, rest @ ..] = rest else { return };
    let dcid_len = usize::from(*dcid_len % 21).min(rest.len());
    let (dcid, frames) = rest.split_at(dcid_len);
    let frames = &frames[..frames.len().min(3000)];
    let version = if flags & 1 == 0 { Version::V1 } else { Version::V2 };
    let packets = 1 + usize::from(flags >> 1) % 3;
    let coalesced = flags & 0x10 != 0;
    if flags & 0x20 != 0 {
        // Junk on the flow first: holds no state.
        let mut junk = vec![0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8];
        junk.resize(1200, 0x5a);
        assert_eq!(reader.datagram(key, &junk, now), Event::Undecryptable);
    }
    let piece = frames.len().div_ceil(packets).max(1);
    let mut sealed = Vec::new();
    for (pn, part) in frames.chunks(piece).enumerate() {
        let p = seal::initial(version, dcid, &[9; 4], pn as u32, part, if coalesced { 0 } else { 1200 });
        let h = long_header(&p, 0).expect("a sealed Initial's header");
        assert!(h.initial && h.version == version && &p[h.dcid.0..h.dcid.1] == dcid && h.end == p.len(), "{h:?}");
        let mut copy = p.clone();
        let (got_pn, range) = open(&mut copy, 0, &h, &Keys::client(version, dcid)).expect("a sealed Initial opens");
        assert_eq!(got_pn, pn as u64);
        let plain = &copy[range.0..range.1];
        assert!(plain.starts_with(part) && plain[part.len()..].iter().all(|b| *b == 0), "the frames back, then PADDING");
        sealed.push(p);
    }
    if sealed.is_empty() {
        return;
    }
    let datagrams = if coalesced { vec![sealed.concat()] } else { sealed };
    for d in &datagrams {
        walk(d);
        let e = reader.datagram(key, d, now);
        assert_ne!(e, Event::Undecryptable, "sealed Initials found undecryptable");
    }
});
