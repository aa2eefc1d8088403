//! Answers to blocked DNS queries, built in place from the query so that the
//! XDP program can send them back (XDP_TX): Ethernet addresses, IP addresses
//! and ports swapped, VLAN tags kept, the question echoed, an EDNS OPT record
//! when the query had one, a correct IPv4 header checksum and a correct UDP
//! checksum (IPv4 and IPv6).

use crate::{
    dns::DNS_HEADER_LEN,
    packet::{Af, PacketMut},
    rules::Config,
};

/// What to do with a blocked DNS query over UDP. (TCP/53 queries are always
/// dropped: an answer would need a TCP exchange.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum DnsAction {
    Drop = 0,
    /// NXDOMAIN: the name does not exist.
    Nxdomain = 1,
    /// REFUSED: the server will not answer.
    Refused = 2,
    /// NOERROR with no answer.
    Nodata = 3,
    /// The configured block-page address: A answers for A queries, AAAA for
    /// AAAA, NODATA for other types (or when that family has no address).
    Redirect = 4,
}

impl DnsAction {
    pub const COUNT: usize = 5;
    pub const ALL: [DnsAction; Self::COUNT] = [DnsAction::Drop, DnsAction::Nxdomain, DnsAction::Refused, DnsAction::Nodata, DnsAction::Redirect];
    pub const fn name(self) -> &'static str {
        match self {
            DnsAction::Drop => "drop",
            DnsAction::Nxdomain => "nxdomain",
            DnsAction::Refused => "refused",
            DnsAction::Nodata => "nodata",
            DnsAction::Redirect => "redirect",
        }
    }
    /// From a list's `LIST_ACTIONS` word (its low byte; the bits above
    /// are the TCP action, `reset::LIST_TCP_RESET`). Unknown values mean `Drop`.
    #[inline(always)]
    pub const fn from_u32(v: u32) -> Self {
        match v & 0xff {
            1 => DnsAction::Nxdomain,
            2 => DnsAction::Refused,
            3 => DnsAction::Nodata,
            4 => DnsAction::Redirect,
            _ => DnsAction::Drop,
        }
    }
}

/// Where a UDP query lies in its packet, as `inspect` found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryAt {
    pub af: Af,
    pub l3_off: usize,
    pub l4_off: usize,
    pub msg_off: usize,
    /// Just past the question's QTYPE and QCLASS.
    pub question_end: usize,
    pub qtype: u16,
    /// No IP options, extension headers or fragmentation: answerable.
    pub plain: bool,
}

pub const QTYPE_A: u16 = 1;
pub const QTYPE_AAAA: u16 = 28;
const QTYPE_OPT: u16 = 41;
const OPT_LEN: usize = 11;
/// An answer record with a compressed name, before its data.
const ANSWER_FIXED_LEN: usize = 12;
/// The UDP payload size the answers advertise (the DNS flag day 2020 value).
pub const EDNS_UDP_SIZE: u16 = 1232;
const RCODE_NOERROR: u8 = 0;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_REFUSED: u8 = 5;
/// Longest UDP datagram an answer can be: header, a 255-byte name, QTYPE and
/// QCLASS, an AAAA record and an OPT record. Bounds the checksum loop.
const MAX_REPLY_UDP_LEN: usize = 8 + DNS_HEADER_LEN + 255 + 4 + ANSWER_FIXED_LEN + 16 + OPT_LEN;
/// The most bytes an answer keeps from its query (headers with two VLAN
/// tags and IPv6, through the question): bounds the move when it grows at
/// the head.
pub const MAX_REPLY_KEEP: usize = 14 + 8 + 40 + 8 + DNS_HEADER_LEN + 255 + 4;

/// Why a blocked query is dropped instead of answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoReply {
    /// The action is `Drop`.
    Drop,
    /// IP options, IPv6 extension headers or a fragment: dropped.
    NotPlain,
    /// The packet could not be read, resized or written as needed.
    Packet,
}

/// Rewrites the query in `p` into its answer. `opaque` is `Env::opaque`:
/// offsets go through it before the checksum loop so that the loop is
/// verified once.
#[inline(always)]
pub fn build_reply<P: PacketMut + ?Sized>(p: &mut P, q: &QueryAt, action: DnsAction, cfg: &Config, opaque: impl Fn(usize) -> usize) -> Result<(), NoReply> {
    const E: NoReply = NoReply::Packet;
    if action == DnsAction::Drop {
        return Err(NoReply::Drop);
    }
    if !q.plain {
        return Err(NoReply::NotPlain);
    }
    let (m, qe) = (q.msg_off, q.question_end);
    if qe < m + DNS_HEADER_LEN {
        return Err(E);
    }
    // Read what the answer echoes before anything is overwritten.
    let rd = p.u8_at(m + 2).ok_or(E)? & 0x01;
    let arcount = p.be16_at(m + 10).ok_or(E)?;
    let has_opt = arcount >= 1 && p.u8_at(qe) == Some(0) && p.be16_at(qe + 1) == Some(QTYPE_OPT);
    let do_bit = if has_opt { p.u8_at(qe + 7).ok_or(E)? & 0x80 } else { 0 };

    let (rcode, rdata_len) = match action {
        DnsAction::Nxdomain => (RCODE_NXDOMAIN, 0),
        DnsAction::Refused => (RCODE_REFUSED, 0),
        DnsAction::Redirect if q.qtype == QTYPE_A && cfg.redirect_flags & Config::REDIRECT_V4 != 0 => (RCODE_NOERROR, 4),
        DnsAction::Redirect if q.qtype == QTYPE_AAAA && cfg.redirect_flags & Config::REDIRECT_V6 != 0 => (RCODE_NOERROR, 16),
        _ => (RCODE_NOERROR, 0),
    };
    let answer_len = if rdata_len > 0 { ANSWER_FIXED_LEN + rdata_len } else { 0 };
    let dns_len = (qe - m) + answer_len + if has_opt { OPT_LEN } else { 0 };
    let resized = if m + dns_len > p.len() { p.grow(m + dns_len, qe) } else { p.resize(m + dns_len) };
    if !resized {
        return Err(E);
    }

    // The answer, right after the question; its name points at the question's.
    if rdata_len > 0 {
        p.set_be16(qe, 0xc000 | DNS_HEADER_LEN as u16).ok_or(E)?;
        p.set_be16(qe + 2, q.qtype).ok_or(E)?;
        p.set_be16(qe + 4, 1).ok_or(E)?;
        p.set_be16(qe + 6, (cfg.answer_ttl >> 16) as u16).ok_or(E)?;
        p.set_be16(qe + 8, cfg.answer_ttl as u16).ok_or(E)?;
        p.set_be16(qe + 10, rdata_len as u16).ok_or(E)?;
        let d = qe + ANSWER_FIXED_LEN;
        if rdata_len == 4 {
            for (i, b) in cfg.redirect_v4.iter().enumerate() {
                p.set_u8(d + i, *b).ok_or(E)?;
            }
        } else {
            for (i, b) in cfg.redirect_v6.iter().enumerate() {
                p.set_u8(d + i, *b).ok_or(E)?;
            }
        }
    }
    // The OPT record: our UDP size, version 0, the query's DO bit, no options.
    if has_opt {
        let o = qe + answer_len;
        p.set_u8(o, 0).ok_or(E)?;
        p.set_be16(o + 1, QTYPE_OPT).ok_or(E)?;
        p.set_be16(o + 3, EDNS_UDP_SIZE).ok_or(E)?;
        p.set_be16(o + 5, 0).ok_or(E)?;
        p.set_u8(o + 7, do_bit).ok_or(E)?;
        p.set_u8(o + 8, 0).ok_or(E)?;
        p.set_be16(o + 9, 0).ok_or(E)?;
    }
    // Header: QR, AA, the query's RD, RA, RCODE; one question.
    p.set_u8(m + 2, 0x80 | 0x04 | rd).ok_or(E)?;
    p.set_u8(m + 3, 0x80 | rcode).ok_or(E)?;
    p.set_be16(m + 6, u16::from(rdata_len > 0)).ok_or(E)?;
    p.set_be16(m + 8, 0).ok_or(E)?;
    p.set_be16(m + 10, u16::from(has_opt)).ok_or(E)?;

    // Back to where the query came from.
    swap(p, 0, 6, 6)?;
    let l4 = q.l4_off;
    swap(p, l4, l4 + 2, 2)?;
    let udp_len = 8 + dns_len;
    p.set_be16(l4 + 4, udp_len as u16).ok_or(E)?;
    p.set_be16(l4 + 6, 0).ok_or(E)?;
    let pseudo = rewrite_ip(p, q.af, q.l3_off, udp_len, true)?;
    let (l4, udp_len) = (opaque(l4), opaque(udp_len));
    let sum = pseudo + 17 + udp_len as u64 + sum_bytes(p, l4, udp_len);
    // A computed 0 is sent as 0xffff: 0 means "no checksum".
    let csum = match !fold(sum) {
        0 => 0xffff,
        c => c,
    };
    p.set_be16(l4 + 6, csum).ok_or(E)
}

/// Rewrites the plain IP header at `l3` for a packet carrying `l4_len`
/// transport bytes: length set, the IPv4 header checksum; if `back` (a
/// reply), addresses swapped and TTL (hop limit) 64. Returns the
/// pseudo-header's address sum.
#[inline(always)]
pub(crate) fn rewrite_ip<P: PacketMut + ?Sized>(p: &mut P, af: Af, l3: usize, l4_len: usize, back: bool) -> Result<u64, NoReply> {
    const E: NoReply = NoReply::Packet;
    Ok(match af {
        Af::V4 => {
            if back {
                swap(p, l3 + 12, l3 + 16, 4)?;
                p.set_u8(l3 + 8, 64).ok_or(E)?;
            }
            p.set_be16(l3 + 2, (20 + l4_len) as u16).ok_or(E)?;
            p.set_be16(l3 + 10, 0).ok_or(E)?;
            let sum = sum_words(p, l3, 10, 10);
            p.set_be16(l3 + 10, !fold(sum)).ok_or(E)?;
            sum_words(p, l3 + 12, 4, 4)
        }
        Af::V6 => {
            if back {
                swap(p, l3 + 8, l3 + 24, 16)?;
                p.set_u8(l3 + 7, 64).ok_or(E)?;
            }
            p.set_be16(l3 + 4, l4_len as u16).ok_or(E)?;
            sum_words(p, l3 + 8, 16, 16)
        }
    })
}

/// Swaps `n` bytes at `a` with `n` bytes at `b`.
#[inline(always)]
pub(crate) fn swap<P: PacketMut + ?Sized>(p: &mut P, a: usize, b: usize, n: usize) -> Result<(), NoReply> {
    for i in 0..16 {
        if i >= n {
            break;
        }
        let (x, y) = (p.u8_at(a + i).ok_or(NoReply::Packet)?, p.u8_at(b + i).ok_or(NoReply::Packet)?);
        p.set_u8(a + i, y).ok_or(NoReply::Packet)?;
        p.set_u8(b + i, x).ok_or(NoReply::Packet)?;
    }
    Ok(())
}

/// Sums `words` 16-bit words at `off` (at most `max`).
#[inline(always)]
pub(crate) fn sum_words<P: PacketMut + ?Sized>(p: &P, off: usize, words: usize, max: usize) -> u64 {
    let mut sum = 0u64;
    for i in 0..max {
        if i >= words {
            break;
        }
        sum += u64::from(p.be16_at(off + 2 * i).unwrap_or(0));
    }
    sum
}

/// Sums `len` bytes at `off` as 16-bit words, an odd last byte padded.
#[inline(always)]
fn sum_bytes<P: PacketMut + ?Sized>(p: &P, off: usize, len: usize) -> u64 {
    let mut sum = 0u64;
    for i in 0..MAX_REPLY_UDP_LEN.div_ceil(2) {
        let k = 2 * i;
        if k >= len {
            break;
        }
        sum += if k + 1 < len { u64::from(p.be16_at(off + k).unwrap_or(0)) } else { u64::from(p.u8_at(off + k).unwrap_or(0)) << 8 };
    }
    sum
}

#[inline(always)]
pub(crate) const fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
