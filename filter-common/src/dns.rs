//! DNS queries: the header checks and the question name, read straight from
//! the packet into canonical form.

use crate::{
    name::{CANON_END, CanonBuf, NameError, ascii_lower},
    packet::{Malformed, Packet},
};

pub const DNS_PORT: u16 = 53;
pub const DNS_HEADER_LEN: usize = 12;
/// Longest name on the wire, root byte included.
pub const MAX_WIRE_NAME: usize = 255;

/// A DNS query's question, once read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Question {
    /// Length of the canonical name in the scratch buffer.
    pub canon_len: usize,
    pub qtype: u16,
    /// Offset just past QTYPE/QCLASS.
    pub end: usize,
}

/// Why a DNS message is not inspected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsSkip {
    /// A response or another opcode: not a query to filter.
    NotQuery,
    Malformed(Malformed),
}

/// Reads the DNS message at `off..end`: a standard query (QR=0, OPCODE=0)
/// with exactly one question, whose name is written to `buf`. `opaque` is
/// `Env::opaque`: the name's length goes through it before use, so all the
/// loop's exits continue as one state in the verifier.
#[inline(always)]
pub fn parse_query<P: Packet + ?Sized>(p: &P, off: usize, end: usize, buf: &mut CanonBuf, opaque: impl Fn(usize) -> usize) -> Result<Question, DnsSkip> {
    if off + DNS_HEADER_LEN > end {
        return Err(DnsSkip::Malformed(Malformed::DnsHeader));
    }
    let flags = p.be16_at(off + 2).ok_or(DnsSkip::Malformed(Malformed::DnsHeader))?;
    // QR (bit 15) = 0 and OPCODE (bits 11-14) = QUERY.
    if flags & 0xf800 != 0 {
        return Err(DnsSkip::NotQuery);
    }
    let qdcount = p.be16_at(off + 4).ok_or(DnsSkip::Malformed(Malformed::DnsHeader))?;
    if qdcount != 1 {
        return Err(DnsSkip::Malformed(Malformed::DnsHeader));
    }
    let name_off = off + DNS_HEADER_LEN;
    let wire_len = match qname_to_canon(p, name_off, end, buf) {
        Ok(n) => opaque(n),
        Err(NameError::Truncated) => return Err(DnsSkip::Malformed(Malformed::DnsTruncated)),
        Err(NameError::TooLong) => return Err(DnsSkip::Malformed(Malformed::DnsNameTooLong)),
        Err(_) => return Err(DnsSkip::Malformed(Malformed::DnsLabel)),
    };
    if wire_len == 0 || wire_len > MAX_WIRE_NAME {
        return Err(DnsSkip::Malformed(Malformed::DnsNameTooLong));
    }
    let q = name_off + wire_len;
    if q + 4 > end {
        return Err(DnsSkip::Malformed(Malformed::DnsTruncated));
    }
    let qtype = p.be16_at(q).ok_or(DnsSkip::Malformed(Malformed::DnsTruncated))?;
    Ok(Question { canon_len: wire_len - 1, qtype, end: q + 4 })
}

/// Converts the wire name at `off` (ending before `end`) to canonical form;
/// returns its wire length including the root byte.
///
/// Every wire byte at position `j >= 1` fills canonical slot
/// `CANON_END + 1 - j`: a label byte writes itself (lowercased), and a length
/// byte (or the root) writes the length of the label *before* it, which is
/// exactly where the canonical form wants that label's length. The write
/// position depends on the loop counter alone, and the position of the next
/// length byte is kept in `buf.next` (memory), so the loop looks the same to
/// the verifier whatever the label lengths.
#[inline(always)]
pub fn qname_to_canon<P: Packet + ?Sized>(p: &P, off: usize, end: usize, buf: &mut CanonBuf) -> Result<usize, NameError> {
    let mut label_len = 0u8;
    // One exit after the loop: every `break` joins there, so the code after
    // the loop is verified once per outcome, not once per position.
    // A name still going at position 254 is longer than 255 bytes: the loop
    // bound is the length check.
    let mut result = Err(NameError::TooLong);
    CanonBuf::store(&mut buf.next, 0);
    for j in 0..MAX_WIRE_NAME {
        let pos = off + j;
        let Some(b) = (if pos < end { p.u8_at(pos) } else { None }) else {
            result = Err(NameError::Truncated);
            break;
        };
        let slot = CANON_END + 1 - j;
        if j as u64 != CanonBuf::load(&buf.next) {
            buf.put(slot, ascii_lower(b), false);
            continue;
        }
        if j > 0 {
            buf.put(slot, label_len, true);
        }
        if b == 0 {
            result = Ok(j + 1);
            break;
        }
        if b & 0xc0 != 0 {
            result = Err(NameError::BadLabel);
            break;
        }
        label_len = b;
        CanonBuf::store(&mut buf.next, (j + b as usize + 1) as u64);
    }
    result
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::name::dotted_to_canon;
    use std::format;

    fn wire(name: &str) -> std::vec::Vec<u8> {
        let mut v = std::vec::Vec::new();
        for l in name.split('.').filter(|l| !l.is_empty()) {
            v.push(l.len() as u8);
            v.extend_from_slice(l.as_bytes());
        }
        v.push(0);
        v
    }

    #[test]
    fn wire_and_dotted_agree() {
        for name in ["a", "web.telegram.org", "WeB.TeLeGrAm.OrG", "flora-1.web.telegram.org", "x.y"] {
            let w = wire(name);
            let mut a = CanonBuf::default();
            let mut b = CanonBuf::default();
            let n = qname_to_canon(w.as_slice(), 0, w.len(), &mut a).unwrap();
            assert_eq!(n, w.len());
            let m = dotted_to_canon(name.as_bytes(), 0, name.len(), &mut b).unwrap();
            assert_eq!(a.canon(n - 1), b.canon(m), "{name}");
        }
    }

    #[test]
    fn longest_name_fits_and_one_more_byte_does_not() {
        let name = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
        let w = wire(&name);
        assert_eq!(w.len(), 255);
        let mut buf = CanonBuf::default();
        assert_eq!(qname_to_canon(w.as_slice(), 0, w.len(), &mut buf), Ok(255));
        let w = wire(&format!("e.{name}"));
        assert_eq!(qname_to_canon(w.as_slice(), 0, w.len(), &mut buf), Err(NameError::TooLong));
    }

    #[test]
    fn pointers_and_truncation_are_errors() {
        let mut buf = CanonBuf::default();
        let p: &[u8] = &[3, b'a', b'b', b'c', 0xc0, 0x0c];
        assert_eq!(qname_to_canon(p, 0, p.len(), &mut buf), Err(NameError::BadLabel));
        let p: &[u8] = &[3, b'a', b'b'];
        assert_eq!(qname_to_canon(p, 0, p.len(), &mut buf), Err(NameError::Truncated));
        let p: &[u8] = &[0x40, b'a'];
        assert_eq!(qname_to_canon(p, 0, p.len(), &mut buf), Err(NameError::BadLabel));
    }
}
