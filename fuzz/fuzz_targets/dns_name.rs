//! Differential: `qname_to_canon` (the filter's wire-name reader) against
//! hickory-proto's `Name::read`.
//!
//! Input: a control byte, then the bytes the name is read from. The control
//! byte picks the name's offset (0..16: the bytes before it are "earlier in
//! the message", so hickory can follow compression pointers into them), how
//! many bytes to cut from the end (0..8), and whether to pass an `end` past
//! the buffer (the reader must then stop at the buffer itself).
//!
//! Both readers see exactly the same bytes. Expected:
//! * hickory decodes a name without compression pointers <=> ours succeeds;
//!   then the wire lengths are equal, and our canonical bytes and label-start
//!   marks equal the canonical form built from hickory's lowercased labels,
//!   and equal what `dotted_to_canon` makes of the dotted name when no label
//!   contains a `.` byte (the dotted form cannot express such labels).
//! * hickory decodes a name through a compression pointer => ours rejects it
//!   as `BadLabel` (queries carry no pointers: that is the filter's rule).
//!
//! Label bytes are raw on both sides (`Name::read` takes any byte in a label,
//! and so does ours); "lowercased ASCII" is compared as raw lowercased label
//! bytes, not hickory's escaped presentation form. Length limits are the
//! same on both sides (255 wire bytes including the root, 63 per label), so
//! there is no exception for them.
#![no_main]

use blokir_fuzz::{dirty, lower_labels, reference_canon, uses_pointer};
use filter_common::{
    dns::qname_to_canon,
    name::{CANON_CAP, CanonBuf, NameError, dotted_to_canon},
};
use hickory_proto::{
    rr::Name,
    serialize::binary::{BinDecodable, BinDecoder},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, bytes)) = data.split_first() else {
        return;
    };
    let off = usize::from(ctl & 0x0f);
    let visible = bytes.len().saturating_sub(usize::from((ctl >> 4) & 7));
    // The end handed to our reader: the cut, or far past the buffer (then
    // only the buffer bounds it, and hickory sees the whole buffer).
    let (end, seen) = if ctl & 0x80 != 0 { (bytes.len() + 300, bytes) } else { (visible, &bytes[..visible]) };

    let mut buf = Box::<CanonBuf>::default();
    dirty(&mut buf, data);
    let ours = qname_to_canon(bytes, off, end, &mut buf);

    let mut d = BinDecoder::new(seen);
    let theirs = d.read_slice(off).ok().and_then(|_| Name::read(&mut d).ok()).map(|n| (n, d.index() - off));

    match (&ours, &theirs) {
        (_, Some((name, _))) if uses_pointer(seen, off) => {
            assert_eq!(ours, Err(NameError::BadLabel), "hickory followed a pointer to {name:?}");
        }
        (Ok(wire_len), Some((name, their_len))) => {
            assert_eq!(wire_len, their_len, "wire length of {name:?}");
            let labels = lower_labels(name);
            let canon_len = wire_len - 1;
            let (want, want_starts) = reference_canon(&labels);
            assert_eq!(buf.canon(canon_len), want.as_slice(), "canonical form of {name:?}");
            let starts: Vec<bool> = buf.starts[CANON_CAP - canon_len..].iter().map(|&s| s != 0).collect();
            assert_eq!(starts, want_starts, "label starts of {name:?}");
            if !labels.is_empty() && !labels.iter().any(|l| l.contains(&b'.')) {
                let dotted = labels.join(&b'.');
                let mut other = Box::<CanonBuf>::default();
                dirty(&mut other, &dotted);
                assert_eq!(dotted_to_canon(dotted.as_slice(), 0, dotted.len(), &mut other), Ok(canon_len), "dotted {name:?}");
                assert_eq!(other.canon(canon_len), buf.canon(canon_len), "dotted {name:?}");
                let other_starts: Vec<bool> = other.starts[CANON_CAP - canon_len..].iter().map(|&s| s != 0).collect();
                assert_eq!(other_starts, starts, "dotted {name:?}");
            }
        }
        (Ok(wire_len), None) => panic!("ours read a {wire_len}-byte name that hickory rejects"),
        (Err(e), Some((name, _))) => panic!("ours rejects ({e:?}) the name {name:?} that hickory reads"),
        (Err(_), None) => {}
    }
});
