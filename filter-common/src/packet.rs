//! Link, network and transport headers: one `parse_*` per layer over a
//! bounds-checked byte source, in the style of xdp-tools' parsing helpers.

/// Farthest packet offset any parser reads; keeps every offset the verifier
/// sees bounded. XDP frames are at most a page.
pub const MAX_PACKET_OFFSET: usize = 4096;
/// 802.1Q / 802.1ad tags followed (QinQ is two).
pub const MAX_VLAN_DEPTH: usize = 2;
/// IPv6 extension headers followed before giving up (a transport header
/// behind more of them is not reached: the packet counts as malformed).
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Bounds-checked reads from a packet. The kernel implements it over the XDP
/// context; `[u8]` implements it for host code.
pub trait Packet {
    /// Bytes readable from offset 0.
    fn len(&self) -> usize;
    fn u8_at(&self, off: usize) -> Option<u8>;
    fn be16_at(&self, off: usize) -> Option<u16>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Packet for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn u8_at(&self, off: usize) -> Option<u8> {
        self.get(off).copied()
    }
    fn be16_at(&self, off: usize) -> Option<u16> {
        let b = self.get(off..off.checked_add(2)?)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// A packet that can be rewritten in place (to answer it).
pub trait PacketMut: Packet {
    /// Writes one byte; `None` past the end.
    fn set_u8(&mut self, off: usize, v: u8) -> Option<()>;
    /// Grows or shrinks the packet to `len` bytes at its tail; `false` when
    /// the packet cannot be resized so.
    fn resize(&mut self, len: usize) -> bool;

    fn set_be16(&mut self, off: usize, v: u16) -> Option<()> {
        let [a, b] = v.to_be_bytes();
        self.set_u8(off, a)?;
        self.set_u8(off + 1, b)
    }

    /// Grows the packet to `len` bytes, keeping its first `keep` bytes (the
    /// caller rewrites the rest). Where the tail has no room, the kernel
    /// grows at the head and moves those bytes.
    fn grow(&mut self, len: usize, keep: usize) -> bool {
        let _ = keep;
        self.resize(len)
    }
}

#[cfg(feature = "std")]
impl Packet for std::vec::Vec<u8> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn u8_at(&self, off: usize) -> Option<u8> {
        self.as_slice().u8_at(off)
    }
    fn be16_at(&self, off: usize) -> Option<u16> {
        self.as_slice().be16_at(off)
    }
}

#[cfg(feature = "std")]
impl PacketMut for std::vec::Vec<u8> {
    fn set_u8(&mut self, off: usize, v: u8) -> Option<()> {
        *self.get_mut(off)? = v;
        Some(())
    }
    fn resize(&mut self, len: usize) -> bool {
        std::vec::Vec::resize(self, len, 0);
        true
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Af {
    V4 = 0,
    V6 = 1,
}

/// Why a packet could not be read as far as the inspected protocol needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Malformed {
    /// Ethernet or VLAN header cut short, or more VLAN tags than followed.
    L2 = 0,
    /// IPv4 header bad or cut short.
    Ipv4 = 1,
    /// IPv6 header or extension chain bad, cut short or too long.
    Ipv6 = 2,
    /// UDP or TCP header bad or cut short.
    L4 = 3,
    /// DNS header cut short, or a query without exactly one question.
    DnsHeader = 4,
    /// A bad label: compression pointer or reserved label type in a query.
    DnsLabel = 5,
    /// A name longer than 255 wire bytes.
    DnsNameTooLong = 6,
    /// The question ends past the end of the datagram.
    DnsTruncated = 7,
}

impl Malformed {
    pub const COUNT: usize = 8;
    pub const ALL: [Malformed; Self::COUNT] = [
        Malformed::L2,
        Malformed::Ipv4,
        Malformed::Ipv6,
        Malformed::L4,
        Malformed::DnsHeader,
        Malformed::DnsLabel,
        Malformed::DnsNameTooLong,
        Malformed::DnsTruncated,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            Malformed::L2 => "l2",
            Malformed::Ipv4 => "ipv4",
            Malformed::Ipv6 => "ipv6",
            Malformed::L4 => "l4",
            Malformed::DnsHeader => "dns_header",
            Malformed::DnsLabel => "dns_label",
            Malformed::DnsNameTooLong => "dns_name_too_long",
            Malformed::DnsTruncated => "dns_truncated",
        }
    }
}

/// What the network layer tells the transport layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L3 {
    pub af: Af,
    pub proto: u8,
    /// Offset of the IP header.
    pub l3_off: usize,
    /// Offset of the transport header.
    pub l4_off: usize,
    /// End of the IP payload (Ethernet padding excluded).
    pub end: usize,
    /// Not the first fragment: there is no transport header to read.
    pub later_fragment: bool,
    /// The first fragment of a fragmented datagram (offset 0, more to
    /// come): its transport header, if whole, is the datagram's, but its
    /// payload is not all here (see `inspect::Fragmented`). For IPv6, read
    /// by `parse_l3_fragments` only.
    pub first_fragment: bool,
    /// A first fragment that ends inside the IPv6 extension headers (RFC
    /// 8200 4.5 has receivers drop it): `proto` is the header not reached
    /// past, `l4_off` the end (at most `MAX_PACKET_OFFSET`).
    pub headers_cut: bool,
    /// A bare fixed header: no IPv4 options or IPv6 extension headers, and
    /// not a fragment. Only such packets are answered in place.
    pub plain: bool,
}

/// Outcome of the lower layers for packets that are not inspected further.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Not a protocol blokir inspects.
    Other,
    Malformed(Malformed),
}

/// Ethernet and up to `MAX_VLAN_DEPTH` VLAN tags: returns the inner ethertype
/// and the offset of the network header.
#[inline(always)]
pub fn parse_eth<P: Packet + ?Sized>(p: &P) -> Result<(u16, usize), Skip> {
    let mut proto = p.be16_at(12).ok_or(Skip::Malformed(Malformed::L2))?;
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_DEPTH {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        proto = p.be16_at(off + 2).ok_or(Skip::Malformed(Malformed::L2))?;
        off += 4;
    }
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        return Err(Skip::Malformed(Malformed::L2));
    }
    Ok((proto, off))
}

#[inline(always)]
pub fn parse_ipv4<P: Packet + ?Sized>(p: &P, off: usize) -> Result<L3, Skip> {
    const BAD: Skip = Skip::Malformed(Malformed::Ipv4);
    let vihl = p.u8_at(off).ok_or(BAD)?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Err(BAD);
    }
    let total = p.be16_at(off + 2).ok_or(BAD)? as usize;
    let frag = p.be16_at(off + 6).ok_or(BAD)?;
    let proto = p.u8_at(off + 9).ok_or(BAD)?;
    // The whole header must be present (options included).
    p.u8_at(off + ihl - 1).ok_or(BAD)?;
    if total < ihl {
        return Err(BAD);
    }
    let end = clamp_end(p, off + total);
    // Fragment offset or more-fragments set: a fragment; offset 0 with
    // more-fragments: the first.
    let fragment = frag & 0x3fff != 0;
    Ok(L3 {
        af: Af::V4,
        proto,
        l3_off: off,
        l4_off: off + ihl,
        end,
        later_fragment: frag & 0x1fff != 0,
        first_fragment: frag & 0x3fff == 0x2000,
        headers_cut: false,
        plain: ihl == 20 && !fragment,
    })
}

/// The IPv6 header and its extension chain, as far as the transport header.
/// `first_fragment` and `headers_cut` are left false: see
/// `parse_l3_fragments`.
#[inline(always)]
pub fn parse_ipv6<P: Packet + ?Sized>(p: &P, off: usize) -> Result<L3, Skip> {
    walk_ipv6::<P, false>(p, off)
}

/// `parse_ipv6`; with `FRAGMENTS`, also whether the packet is a first
/// fragment, and one whose chain runs past its end. Only the entry stage
/// asks (through `parse_l3_fragments`): the flags it would otherwise carry
/// through the walk double the states the verifier walks in the stream
/// stages, which parse the lower layers again.
#[inline(always)]
fn walk_ipv6<P: Packet + ?Sized, const FRAGMENTS: bool>(p: &P, off: usize) -> Result<L3, Skip> {
    const BAD: Skip = Skip::Malformed(Malformed::Ipv6);
    let v = p.u8_at(off).ok_or(BAD)?;
    if v >> 4 != 6 {
        return Err(BAD);
    }
    let payload = p.be16_at(off + 4).ok_or(BAD)? as usize;
    let mut next = p.u8_at(off + 6).ok_or(BAD)?;
    // The whole fixed header must be present (addresses included).
    p.u8_at(off + 39).ok_or(BAD)?;
    let end = clamp_end(p, off + 40 + payload);
    let mut hdr = off + 40;
    let mut later_fragment = false;
    let mut first_fragment = false;
    let mut fragment = false;
    // A first fragment whose chain runs past its end hides the transport
    // header in a later fragment (a tiny-fragment evasion); any other
    // packet so cut is malformed.
    let cut = |first_fragment: bool, next: u8| {
        if !(FRAGMENTS && first_fragment) {
            return Err(BAD);
        }
        // `l4_off` is not read behind a cut; bounded all the same, as every
        // offset the verifier sees must be.
        let l4_off = if end < MAX_PACKET_OFFSET { end } else { MAX_PACKET_OFFSET };
        Ok(L3 { af: Af::V6, proto: next, l3_off: off, l4_off, end, later_fragment: false, first_fragment, headers_cut: true, plain: false })
    };
    // One pass per extension header, and one more to reach the transport
    // header behind the last of them.
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let Some(nh) = p.u8_at(hdr) else { return cut(first_fragment, next) };
                let Some(len) = p.u8_at(hdr + 1) else { return cut(first_fragment, next) };
                next = nh;
                hdr += (len as usize + 1) * 8;
            }
            // Fragment header: 8 bytes. Offset 0 with M set is a first
            // fragment; without M, a whole (atomic) datagram.
            44 => {
                let Some(nh) = p.u8_at(hdr) else { return cut(first_fragment, next) };
                let Some(frag) = p.be16_at(hdr + 2) else { return cut(first_fragment, next) };
                later_fragment = frag & 0xfff8 != 0;
                if FRAGMENTS {
                    first_fragment = frag & 0xfff9 == 1;
                }
                fragment = true;
                next = nh;
                hdr += 8;
            }
            // Authentication header: (len + 2) * 4 bytes.
            51 => {
                let Some(nh) = p.u8_at(hdr) else { return cut(first_fragment, next) };
                let Some(len) = p.u8_at(hdr + 1) else { return cut(first_fragment, next) };
                next = nh;
                hdr += (len as usize + 2) * 4;
            }
            _ => {
                let plain = hdr == off + 40 && !fragment;
                return Ok(L3 { af: Af::V6, proto: next, l3_off: off, l4_off: hdr, end, later_fragment, first_fragment, headers_cut: false, plain });
            }
        }
        if hdr > end {
            return cut(first_fragment, next);
        }
    }
    Err(BAD)
}

/// The network layer after Ethernet: IPv4, IPv6, or `Skip::Other`.
/// `first_fragment` and `headers_cut` are read for IPv4 only: see
/// `parse_l3_fragments`.
#[inline(always)]
pub fn parse_l3<P: Packet + ?Sized>(p: &P) -> Result<L3, Skip> {
    let (ethertype, off) = parse_eth(p)?;
    match ethertype {
        ETH_P_IP => parse_ipv4(p, off),
        ETH_P_IPV6 => parse_ipv6(p, off),
        _ => Err(Skip::Other),
    }
}

/// `parse_l3`, with `first_fragment` and `headers_cut` read for IPv6 too
/// (an IPv6 first fragment cut inside its extension headers is then no
/// error): the entry stage's.
#[inline(always)]
pub fn parse_l3_fragments<P: Packet + ?Sized>(p: &P) -> Result<L3, Skip> {
    let (ethertype, off) = parse_eth(p)?;
    match ethertype {
        ETH_P_IP => parse_ipv4(p, off),
        ETH_P_IPV6 => walk_ipv6::<P, true>(p, off),
        _ => Err(Skip::Other),
    }
}

/// A transport header's ports and where its payload lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4 {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload_off: usize,
    pub payload_end: usize,
    /// TCP sequence number (0 for UDP).
    pub seq: u32,
    /// TCP flags (`TCP_*`; 0 for UDP).
    pub flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;

/// TCP options walked for a signature option (`fake_signs`). Real stacks
/// send at most six on a data segment (Linux: NOP NOP timestamps, NOP NOP
/// SACK); a list longer than this is taken as signed.
pub const TCP_OPTION_SLOTS: usize = 10;

impl L4 {
    /// A client's connection request: SYN without ACK.
    #[inline(always)]
    pub const fn is_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// The sequence number of the first payload byte (a SYN takes one).
    #[inline(always)]
    pub const fn data_seq(&self) -> u32 {
        self.seq.wrapping_add((self.flags & TCP_SYN != 0) as u32)
    }
}

#[inline(always)]
pub fn parse_udp<P: Packet + ?Sized>(p: &P, l3: &L3) -> Result<L4, Skip> {
    const BAD: Skip = Skip::Malformed(Malformed::L4);
    let off = l3.l4_off;
    let src_port = p.be16_at(off).ok_or(BAD)?;
    let dst_port = p.be16_at(off + 2).ok_or(BAD)?;
    let len = p.be16_at(off + 4).ok_or(BAD)? as usize;
    if len < 8 {
        return Err(BAD);
    }
    let payload_end = if off + len < l3.end { off + len } else { l3.end };
    Ok(L4 { src_port, dst_port, payload_off: off + 8, payload_end, seq: 0, flags: 0 })
}

#[inline(always)]
pub fn parse_tcp<P: Packet + ?Sized>(p: &P, l3: &L3) -> Result<L4, Skip> {
    const BAD: Skip = Skip::Malformed(Malformed::L4);
    let off = l3.l4_off;
    let src_port = p.be16_at(off).ok_or(BAD)?;
    let dst_port = p.be16_at(off + 2).ok_or(BAD)?;
    let doff = ((p.u8_at(off + 12).ok_or(BAD)? >> 4) as usize) * 4;
    if doff < 20 {
        return Err(BAD);
    }
    p.u8_at(off + doff - 1).ok_or(BAD)?;
    let seq = (u32::from(p.be16_at(off + 4).ok_or(BAD)?) << 16) | u32::from(p.be16_at(off + 6).ok_or(BAD)?);
    let flags = p.u8_at(off + 13).ok_or(BAD)?;
    Ok(L4 { src_port, dst_port, payload_off: off + doff, payload_end: l3.end, seq, flags })
}

/// The signs (`flow::sign::*`) that the receiver does not read a TCP data
/// segment as it stands: urgent data, no ACK, a signature option. 0 for a
/// segment without payload. Given the TCP flags, and where the TCP header
/// (`tcp`), its payload (`off`) and the packet's data (`end`) lie, so that
/// a stage calls it with the offsets it passed through its boundary.
#[inline(always)]
pub fn fake_signs<P: Packet + ?Sized>(p: &P, flags: u8, tcp: usize, off: usize, end: usize) -> u32 {
    use crate::flow::sign;
    if off >= end {
        return 0;
    }
    let mut signs = 0;
    if flags & TCP_URG != 0 {
        signs |= sign::URGENT;
    }
    if flags & (TCP_ACK | TCP_SYN) == 0 {
        signs |= sign::NO_ACK;
    }
    if signed_options(p, tcp, off) {
        signs |= sign::SIGNED;
    }
    signs
}

/// Whether the options of the TCP header at `tcp` (ending at `end`) carry
/// an MD5 signature (kind 19) or TCP-AO (kind 29), or more options than
/// `TCP_OPTION_SLOTS`. Read as Linux's `tcp_parse_options` reads them: EOL
/// ends the list, NOP is one byte, an option that overruns the header ends
/// the walk. Unrolled, not a loop: a loop over options is one back-edge
/// more for the verifier (6.1 refused one reached by falling through), and
/// the bound is small. The offset is masked to the header's 60 bytes after
/// each option so that every path reaches the next one in the same state.
#[inline(always)]
#[allow(unused_assignments)]
fn signed_options<P: Packet + ?Sized>(p: &P, tcp: usize, end: usize) -> bool {
    let len = end.wrapping_sub(tcp);
    let mut rel = 20usize;
    macro_rules! option {
        () => {
            if rel >= len {
                return false;
            }
            let Some(kind) = p.u8_at(tcp + rel) else { return false };
            match kind {
                0 => return false,
                1 => rel += 1,
                19 | 29 => return true,
                _ => {
                    let Some(olen) = p.u8_at(tcp + rel + 1) else { return false };
                    if olen < 2 {
                        return false;
                    }
                    rel += olen as usize;
                }
            }
            if rel >= len {
                return false;
            }
            rel &= 63;
        };
    }
    // TCP_OPTION_SLOTS times.
    option!();
    option!();
    option!();
    option!();
    option!();
    option!();
    option!();
    option!();
    option!();
    option!();
    true
}

#[inline(always)]
fn clamp_end<P: Packet + ?Sized>(p: &P, end: usize) -> usize {
    let len = p.len();
    if end < len { end } else { len }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::sign;

    /// The signs of a TCP header with `options` and one payload byte.
    fn signs(flags: u8, options: &[u8]) -> u32 {
        let mut h = [0u8; 61];
        let off = 20 + options.len().div_ceil(4) * 4;
        h[20..20 + options.len()].copy_from_slice(options);
        h[12] = ((off / 4) as u8) << 4;
        h[off] = b'x';
        fake_signs(&h[..off + 1], flags, 0, off, off + 1)
    }

    #[test]
    fn signature_options_are_found_as_linux_walks_them() {
        let ack = TCP_ACK | 0x08;
        assert_eq!(signs(ack, &[]), 0);
        // Linux's data segment: NOP NOP timestamps, NOP NOP SACK.
        assert_eq!(signs(ack, &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2, 1, 1, 5, 10, 0, 0, 0, 9, 0, 0, 0, 10]), 0);
        assert_eq!(signs(ack, &[1, 1, 19, 18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), sign::SIGNED);
        assert_eq!(signs(ack, &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2, 29, 16, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), sign::SIGNED);
        // After EOL, or in an option that overruns the header: not read.
        assert_eq!(signs(ack, &[0, 19, 18]), 0);
        assert_eq!(signs(ack, &[8, 40, 19, 18]), 0);
        assert_eq!(signs(ack, &[1, 5, 1, 19]), 0);
        // More options than real stacks send.
        assert_eq!(signs(ack, &[1; 12]), sign::SIGNED);
        assert_eq!(signs(ack, &[1; 8]), 0);
        assert_eq!(signs(TCP_ACK | TCP_URG, &[]), sign::URGENT);
        assert_eq!(signs(0x08, &[]), sign::NO_ACK);
        assert_eq!(signs(TCP_SYN, &[]), 0);
    }
}
