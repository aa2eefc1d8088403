//! The whole per-packet decision, eth -> ip -> l4 -> app, shared by the XDP
//! program and by host tests and fuzzers. The caller supplies the packet and
//! an `Env` that hands out the scratch buffer, settings and rules only once a
//! name has to be read, so packets that are not inspected cost no map lookups.

use crate::{
    counters::Proto,
    dns::{self, DnsSkip},
    name::{CanonBuf, Decision, canon_start, match_canon},
    packet::{Af, IPPROTO_TCP, IPPROTO_UDP, L3, Malformed, Packet, Skip, parse_l3_fragments, parse_tcp, parse_udp},
    quic,
    reply::QueryAt,
    rules::{Config, RuleLookup},
};

/// `Config::fragment_policy`: first fragments of datagrams blokir reads
/// (`Fragmented`) are dropped (the default, 0 so that zeroed settings
/// drop), or passed unread. Either way they are counted
/// (`counters::EVASION_FRAGMENT`).
pub const FRAGMENTS_DROP: u32 = 0;
pub const FRAGMENTS_PASS: u32 = 1;

/// Resources the inspection needs once it reaches a name.
pub trait Env {
    type Rules: RuleLookup + ?Sized;
    /// Scratch buffer, settings and rules, or `None` when unavailable.
    fn resources(&mut self) -> Option<(&mut CanonBuf, &Config, &Self::Rules)>;

    /// Returns `x` (a packet offset or length), clamped below `OPAQUE_LIMIT`
    /// (no parser reads past `MAX_PACKET_OFFSET` anyway). In the kernel it
    /// round-trips through map memory, which the verifier does not track, so
    /// every path into the next stage (any VLAN depth, IP options, extension
    /// headers) presents the same state and the stage's loops are verified
    /// once rather than once per path. Called at the stage boundaries only.
    fn opaque(x: usize) -> usize {
        x.min(OPAQUE_LIMIT - 1)
    }
}

/// `Env::opaque` returns values below this. A packet pointer plus such an
/// offset stays below the verifier's 64 KiB packet-offset limit, so it keeps
/// tracking bounds checks on it.
pub const OPAQUE_LIMIT: usize = 1 << 15;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inspection {
    /// Not a protocol blokir inspects.
    Other,
    /// A QUIC Initial; `drop` if the policy drops it.
    Quic {
        af: Af,
        drop: bool,
    },
    /// A TCP segment for the stream stages (`tls`, `http`, `dns_tcp`),
    /// which keep per-flow state: one with payload (a DNS query to port 53,
    /// or a TLS ClientHello or an HTTP request), or a client's SYN (a
    /// connection starts: see `conn`).
    TcpPayload,
    /// A later IP fragment: passed, it has no transport header.
    Fragment,
    /// The first fragment of a datagram blokir reads (see `Fragmented`);
    /// `drop` under the `drop` fragment policy (`Config::fragment_policy`).
    FirstFragment {
        drop: bool,
    },
    /// The program has no settings yet: passed.
    Unconfigured,
    Malformed(Malformed),
    /// The name is not all in this packet (a split TCP/53 segment): passed.
    /// Not produced since TCP/53 is read as a stream (`dns_tcp`); see
    /// `DnsAt::tcp`.
    Incomplete {
        proto: Proto,
        af: Af,
    },
    Decided {
        proto: Proto,
        af: Af,
        decision: Decision,
        /// Where the query lies, for answering it.
        at: QueryAt,
    },
}

impl Inspection {
    /// Whether the packet is to be dropped.
    pub const fn blocks(&self) -> bool {
        matches!(
            self,
            Inspection::Decided { decision: Decision::Block(_), .. } | Inspection::Quic { drop: true, .. } | Inspection::FirstFragment { drop: true }
        )
    }
}

/// Where a UDP DNS message to port 53 lies: what the entry program hands the
/// DNS stage (a per-CPU map value in the kernel, hence plain integers).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsAt {
    /// 1 for TCP/53, 0 for UDP/53. Always 0: TCP/53 goes to the
    /// DNS-over-TCP stage (`dns_tcp`), which reads queries across segments.
    /// The stage keeps its TCP branch as it was verified on the pre-6.7
    /// kernels: the same stage without it was refused on 6.1 (E2BIG).
    pub tcp: u32,
    /// 1 for IPv6.
    pub v6: u32,
    /// 1 when the packet could be answered in place (see `L3::plain`).
    pub plain: u32,
    pub l3_off: u32,
    pub l4_off: u32,
    pub payload_off: u32,
    pub payload_end: u32,
}

/// What the lower layers (eth -> ip -> l4) make of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Classified {
    /// Not a protocol blokir inspects.
    Other,
    /// A later IP fragment.
    Fragment,
    /// The first fragment of a TCP or UDP datagram that may carry a name.
    FirstFragment(Fragmented),
    Malformed(Malformed),
    /// A TCP segment with payload to this port: for the DNS-over-TCP stage
    /// if it is 53, the HTTP stage if it is one of `Config::http_ports`, else
    /// the TLS stage if it is a TLS port (`Config::is_tls_port`), else
    /// passed unread.
    TcpPayload(u16),
    /// A client's SYN without payload to this port: for the TLS stage, which
    /// records where the connection's data starts, if the port is 53, an
    /// HTTP or a TLS port.
    TcpSyn(u16),
    /// A QUIC Initial (see `quic::is_initial`) to this UDP port (not 53):
    /// counted and subject to the QUIC policy in the entry program if the
    /// port is a QUIC port (`Config::is_quic_port`).
    Quic(Af, u16),
    /// Another datagram to this UDP port (not 53): with `--quic read`,
    /// dropped if its flow is blocked (the QUIC stage), else passed.
    QuicOther(u16),
    /// A UDP DNS message to port 53: for the DNS stage.
    Dns(DnsAt),
}

/// The first fragment of a datagram that may carry a name. Fragments are
/// not reassembled (XDP sees one frame at a time), so the name may lie in a
/// fragment blokir never relates to its ports; but a datagram without its
/// first fragment never reaches the application (the receiver's reassembly
/// times out), so dropping the first fragment blocks the whole datagram,
/// whatever order its fragments come in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragmented {
    /// UDP or TCP to port 53: always read.
    Dns,
    /// TCP to this port (not 53): read if it is an HTTP or a TLS port.
    Tcp(u16),
    /// The transport header (or the IPv6 extension headers before it) does
    /// not fit whole in the first fragment: the ports or the TCP flags are
    /// in a later fragment (RFC 1858, RFC 3128). Never sent by a real
    /// stack; treated as a fragment to an inspected port.
    Tiny,
}

impl Fragmented {
    /// Whether a first fragment so classified is subject to the fragment
    /// policy under settings `cfg` (on the host; the kernel reads the port
    /// bitmaps).
    pub fn is_inspected(self, cfg: &Config) -> bool {
        match self {
            Fragmented::Dns | Fragmented::Tiny => true,
            Fragmented::Tcp(port) => cfg.is_http_port(port) || cfg.is_tls_port(port),
        }
    }
}

/// What a first fragment (`L3::first_fragment`) holds of its transport
/// header: `None` for one that cannot carry a name blokir reads (another
/// protocol, UDP to a port other than 53).
#[inline(always)]
fn first_fragment<P: Packet + ?Sized>(p: &P, l3: &L3) -> Option<Fragmented> {
    if l3.headers_cut {
        return Some(Fragmented::Tiny);
    }
    // The whole header must lie within the fragment: UDP's 8 bytes, TCP's
    // 20 and its options (the data offset is in its 13th byte).
    let min = match l3.proto {
        IPPROTO_UDP => 8,
        IPPROTO_TCP => 20,
        _ => return None,
    };
    if l3.l4_off + min > l3.end {
        return Some(Fragmented::Tiny);
    }
    let dst_port = p.be16_at(l3.l4_off + 2)?;
    if l3.proto == IPPROTO_UDP {
        return (dst_port == dns::DNS_PORT).then_some(Fragmented::Dns);
    }
    let doff = ((p.u8_at(l3.l4_off + 12)? >> 4) as usize) * 4;
    if doff < 20 || l3.l4_off + doff > l3.end {
        return Some(Fragmented::Tiny);
    }
    Some(if dst_port == dns::DNS_PORT { Fragmented::Dns } else { Fragmented::Tcp(dst_port) })
}

/// The entry stage: Ethernet, VLANs, IP and the transport header.
#[inline(always)]
pub fn classify<P: Packet + ?Sized>(p: &P) -> Classified {
    let l3 = match parse_l3_fragments(p) {
        Ok(l3) => l3,
        Err(Skip::Other) => return Classified::Other,
        Err(Skip::Malformed(m)) => return Classified::Malformed(m),
    };
    if l3.later_fragment {
        return if l3.proto == IPPROTO_UDP || l3.proto == IPPROTO_TCP { Classified::Fragment } else { Classified::Other };
    }
    if l3.first_fragment {
        return match first_fragment(p, &l3) {
            Some(f) => Classified::FirstFragment(f),
            None => Classified::Other,
        };
    }
    let l4 = match l3.proto {
        IPPROTO_UDP => match parse_udp(p, &l3) {
            Ok(l4) if l4.dst_port == dns::DNS_PORT => l4,
            // Any other port may carry QUIC: the caller checks the QUIC
            // ports. Most datagrams fail the Initial's length test at once.
            Ok(l4) if quic::is_initial(p, l4.payload_off, l4.payload_end) => return Classified::Quic(l3.af, l4.dst_port),
            Ok(l4) => return Classified::QuicOther(l4.dst_port),
            Err(Skip::Malformed(m)) => return Classified::Malformed(m),
            Err(Skip::Other) => return Classified::Other,
        },
        IPPROTO_TCP => match parse_tcp(p, &l3) {
            // Segments without payload (handshake, ACKs) are not queries; a
            // SYN starts a connection the stream stages follow.
            Ok(l4) if l4.payload_off >= l4.payload_end => {
                return if l4.is_syn() { Classified::TcpSyn(l4.dst_port) } else { Classified::Other };
            }
            // DNS over TCP is a stream too (`dns_tcp`).
            Ok(l4) => return Classified::TcpPayload(l4.dst_port),
            Err(Skip::Malformed(m)) => return Classified::Malformed(m),
            Err(Skip::Other) => return Classified::Other,
        },
        _ => return Classified::Other,
    };
    let off = |x: usize| x.min(OPAQUE_LIMIT - 1) as u32;
    Classified::Dns(DnsAt {
        tcp: 0,
        v6: (l3.af == Af::V6) as u32,
        plain: l3.plain as u32,
        l3_off: off(l3.l3_off),
        l4_off: off(l3.l4_off),
        payload_off: off(l4.payload_off),
        payload_end: off(l4.payload_end),
    })
}

/// The DNS stage: reads the query's name and matches it.
#[inline(always)]
pub fn dns_stage<P: Packet + ?Sized, E: Env>(p: &P, at: &DnsAt, env: &mut E) -> Inspection {
    // Stage boundary: in the kernel this stage is its own program, fed from
    // a map; on the host the values go through `opaque` just the same.
    let tcp = E::opaque(at.tcp as usize) & 1;
    let v6 = E::opaque(at.v6 as usize);
    let plain = E::opaque(at.plain as usize);
    let l3_off = E::opaque(at.l3_off as usize);
    let l4_off = E::opaque(at.l4_off as usize);
    let payload_off = E::opaque(at.payload_off as usize);
    let payload_end = E::opaque(at.payload_end as usize);
    let Some((buf, cfg, rules)) = env.resources() else {
        return Inspection::Unconfigured;
    };
    if !cfg.is_configured() {
        return Inspection::Unconfigured;
    }
    // DNS over TCP: a 2-byte length prefix, then the message. The question
    // must lie within that message, not run on into whatever follows it in
    // the segment.
    let (msg_end, short) = msg_end(p, tcp, payload_off, payload_end);
    // Made opaque again: otherwise what the verifier learns about the
    // offsets while reading the prefix (one state per outcome) carries into
    // the name loops, which are then verified once per outcome.
    // `tcp` too: `msg_end` branched on it, and a known value carried
    // through the matcher's loop would have it verified once per value.
    let tcp = E::opaque(tcp) & 1;
    let msg_off = E::opaque(payload_off + 2 * tcp);
    let msg_end = E::opaque(msg_end);
    let short = E::opaque(short as usize);
    let result = dns::parse_query(p, msg_off, msg_end, buf, E::opaque).map(|q| (q, match_canon(buf, E::opaque(canon_start(q.canon_len)), cfg, rules)));
    let proto = if tcp == 0 { Proto::DnsUdp } else { Proto::DnsTcp };
    let af = if v6 == 0 { Af::V4 } else { Af::V6 };
    match result {
        Ok((q, decision)) => {
            let at = QueryAt { af, l3_off, l4_off, msg_off, question_end: q.end, qtype: q.qtype, plain: plain != 0 };
            Inspection::Decided { proto, af, decision, at }
        }
        Err(DnsSkip::NotQuery) => Inspection::Other,
        // A TCP segment may end anywhere: a question cut short there is
        // incomplete, not malformed.
        Err(DnsSkip::Malformed(Malformed::DnsTruncated | Malformed::DnsHeader)) if proto == Proto::DnsTcp && short != 0 => Inspection::Incomplete { proto, af },
        Err(DnsSkip::Malformed(m)) => Inspection::Malformed(m),
    }
}

/// The whole per-packet decision on the host: the entry stage and the DNS
/// stage, as the kernel chains them. (TCP payload is left to the stream
/// stage, which keeps per-flow state: `Inspection::TcpPayload`.)
#[inline(always)]
pub fn inspect<P: Packet + ?Sized, E: Env>(p: &P, env: &mut E) -> Inspection {
    match classify(p) {
        Classified::Other | Classified::QuicOther(_) => Inspection::Other,
        Classified::Fragment => Inspection::Fragment,
        Classified::FirstFragment(f) => match env.resources() {
            Some((_, cfg, _)) if !f.is_inspected(cfg) => Inspection::Other,
            Some((_, cfg, _)) => Inspection::FirstFragment { drop: cfg.is_configured() && cfg.fragment_policy == FRAGMENTS_DROP },
            None => Inspection::FirstFragment { drop: false },
        },
        Classified::Malformed(m) => Inspection::Malformed(m),
        Classified::TcpPayload(_) | Classified::TcpSyn(_) => Inspection::TcpPayload,
        Classified::Quic(af, port) => match env.resources() {
            Some((_, cfg, _)) if !cfg.is_quic_port(port) => Inspection::Other,
            Some((_, cfg, _)) => Inspection::Quic { af, drop: cfg.is_configured() && cfg.quic_policy == quic::POLICY_DROP },
            None => Inspection::Quic { af, drop: false },
        },
        Classified::Dns(at) => dns_stage(p, &at, env),
    }
}

/// Where the DNS message ends: the datagram's end for UDP (`tcp` = 0); for
/// TCP the end its length prefix announces, or the segment's end if that
/// comes first. Also whether a TCP segment holds less of the message than
/// the prefix announces (or no whole prefix).
#[inline(always)]
fn msg_end<P: Packet + ?Sized>(p: &P, tcp: usize, payload_off: usize, payload_end: usize) -> (usize, bool) {
    if tcp & 1 == 0 {
        return (payload_end, false);
    }
    match p.be16_at(payload_off) {
        Some(len) if payload_off + 2 + (len as usize) < payload_end => (payload_off + 2 + len as usize, false),
        Some(len) if payload_off + 2 <= payload_end => (payload_end, payload_off + 2 + (len as usize) > payload_end),
        _ => (payload_end, true),
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{
        hash::lane_multiplier,
        name::{dotted_to_canon, full_name_key},
        rules::{NameKey, NodeRules, RuleRef},
    };
    use std::vec::Vec;

    /// A rule map of one node.
    struct OneNode(NameKey, NodeRules);

    impl RuleLookup for OneNode {
        fn lookup(&self, key: &NameKey) -> Option<NodeRules> {
            (*key == self.0).then_some(self.1)
        }
    }

    struct HostEnv {
        buf: CanonBuf,
        cfg: Config,
        rules: OneNode,
    }

    impl Env for HostEnv {
        type Rules = OneNode;
        fn resources(&mut self) -> Option<(&mut CanonBuf, &Config, &Self::Rules)> {
            Some((&mut self.buf, &self.cfg, &self.rules))
        }
    }

    /// An environment with an exact block rule on `blocked.example`.
    fn env() -> HostEnv {
        let mut cfg = Config { hash_r: [lane_multiplier(1), lane_multiplier(2)], ..Config::default() };
        cfg.add_depth(2);
        let mut buf = CanonBuf::default();
        let n = dotted_to_canon(&b"blocked.example"[..], 0, 15, &mut buf).unwrap();
        let key = full_name_key(&mut buf, n, &cfg.hash_r).unwrap();
        let rules = OneNode(key, NodeRules { exact: RuleRef::new(1, 0, false), below: RuleRef::NONE });
        HostEnv { buf, cfg, rules }
    }

    /// An IPv4/TCP frame to port 53 whose segment is `prefix` then `msg`.
    fn tcp_frame(prefix: u16, msg: &[u8]) -> Vec<u8> {
        let mut f = Vec::from([2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        let total = (20 + 20 + 2 + msg.len()) as u16;
        f.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(&prefix.to_be_bytes());
        f.extend_from_slice(msg);
        f
    }

    fn query() -> Vec<u8> {
        let mut m = Vec::from([0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        m.extend_from_slice(b"\x07blocked\x07example\x00\x00\x01\x00\x01");
        m
    }

    #[test]
    fn tcp_queries_go_to_the_stream_stage() {
        let msg = query();
        // Whole or cut, a TCP/53 segment is read by the DNS-over-TCP stage.
        assert_eq!(inspect(tcp_frame(msg.len() as u16, &msg).as_slice(), &mut env()), Inspection::TcpPayload);
        assert_eq!(inspect(tcp_frame(200, &msg[..17]).as_slice(), &mut env()), Inspection::TcpPayload);
    }
}
