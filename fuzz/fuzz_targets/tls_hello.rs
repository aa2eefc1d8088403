//! The streaming ClientHello parser on arbitrary streams, cut into segments
//! chosen by the input, never panics; and whenever it reads a server name,
//! tls-parser reads the same name from the same bytes (when tls-parser reads
//! the stream as one record with a well-formed extension list), so the
//! parser never invents a name; and it sees an encrypted_client_hello
//! extension exactly when tls-parser finds one (after the name, the parser
//! walks on to the hello's end, as the kernel does). And the name bytes
//! read, compared with later copies (`flow::rewritten`): a copy of the same
//! bytes, whole or in overlapping windows the input chooses, is never a
//! rewrite; one with a name byte changed always is.

#![no_main]

use filter_common::{
    flow::rewritten,
    name::{CanonBuf, dotted_to_canon},
    tls::{Hello, MAX_ROUNDS, Progress, Resume, feed, resume},
};
use libfuzzer_sys::fuzz_target;
use tls_parser::{TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_client_hello_extensions, parse_tls_plaintext};

fuzz_target!(|data: &[u8]| {
    let Some((&cut_seed, stream)) = data.split_first() else { return };
    // Segment lengths from the seed: 1..=256 bytes, deterministic.
    let mut cuts = Vec::new();
    let mut at = 0usize;
    let mut x = u32::from(cut_seed) | 1;
    while at < stream.len() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        at += 1 + (x >> 16) as usize % if cut_seed & 0x80 != 0 { 8 } else { 256 };
        cuts.push(at.min(stream.len()));
    }
    let seq0 = 1u32;
    let mut h = Box::new(Hello::new(seq0));
    let mut start = 0;
    let mut outcome = Progress::NeedMore;
    let mut name = None;
    'segments: for end in cuts {
        let seg = &stream[start..end];
        let seq = seq0.wrapping_add(start as u32);
        for _ in 0..MAX_ROUNDS {
            let Resume::At(off) = resume(&h, seq, 0, seg.len()) else { break };
            outcome = feed(&mut h, seg, off, seg.len());
            if outcome != Progress::StepsExhausted {
                break;
            }
        }
        match outcome {
            Progress::NeedMore => {}
            Progress::Name(len) if !h.ended() => name = Some(len),
            Progress::Name(len) => {
                name = Some(len);
                break 'segments;
            }
            _ => break 'segments,
        }
        start = end;
    }
    if name.is_some() {
        retransmissions_are_no_rewrite(&h, stream, seq0, cut_seed);
    }
    // The walk finished (the hello ended) with a name or without one.
    let ended = h.ended() || outcome == Progress::NoName;
    if name.is_none() && outcome != Progress::NoName {
        return;
    }
    let Ok((_, plain)) = parse_tls_plaintext(stream) else { return };
    let Some(TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch))) = plain.msg.first() else {
        panic!("a name from a stream tls-parser reads as {:?}", plain.msg.first());
    };
    // Compared only when tls-parser reads the whole extension list: it checks
    // the contents of extensions this parser skips (and stops at the first
    // it dislikes).
    let Ok((rest, exts)) = parse_tls_client_hello_extensions(ch.ext.unwrap_or_default()) else { return };
    if !rest.is_empty() {
        return;
    }
    if ended && h.flags & Hello::FLAG_CUT == 0 {
        let ech = exts.iter().any(|e| matches!(e, TlsExtension::Unknown(t, _) if t.0 == 0xfe0d));
        assert_eq!(h.has_ech(), ech, "ECH differs from tls-parser's");
    }
    let Some(len) = name else { return };
    let mut ours = CanonBuf::default();
    h.copy_name(&mut ours);
    let ours = ours.canon(len).to_vec();
    let sni = exts.iter().find_map(|e| if let TlsExtension::SNI(v) = e { v.first().map(|(_, n)| *n) } else { None });
    let Some(sni) = sni else { panic!("we read a name; tls-parser finds no server_name") };
    let mut theirs = CanonBuf::default();
    let n = dotted_to_canon(sni, 0, sni.len(), &mut theirs).expect("a name we accepted is a valid dotted name");
    assert_eq!(ours, theirs.canon(n), "server name differs from tls-parser's");
});

/// Copies of the stream the parser read (`h`, from `seq0`) as a client's
/// retransmissions come: whole, and in windows of 1 to 64 bytes at offsets
/// the input chooses, overlapping each other and the name's edges; none is
/// a rewrite. The same with one name byte's low bit flipped is.
fn retransmissions_are_no_rewrite(h: &Hello, stream: &[u8], seq0: u32, seed: u8) {
    let (at, n) = h.name_read();
    assert!(n > 0);
    let copy = |bytes: &[u8], from: usize, to: usize| rewritten(&bytes[from..to], seq0.wrapping_add(from as u32), 0, to - from, at, n, &h.name);
    assert!(!copy(stream, 0, stream.len()), "the same bytes are no rewrite");
    let mut x = u32::from(seed) | 1;
    for _ in 0..16 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let from = (x >> 8) as usize % stream.len();
        let to = (from + 1 + (x >> 20) as usize % 64).min(stream.len());
        assert!(!copy(stream, from, to), "a window {from}..{to} of the same bytes is no rewrite");
    }
    let i = at.wrapping_sub(seq0) as usize + usize::from(seed) % n as usize;
    let mut changed = stream.to_vec();
    changed[i] ^= 1;
    assert!(copy(&changed, 0, changed.len()), "byte {i} changed");
    assert!(copy(&changed, i, i + 1), "byte {i} changed, alone");
}
