//! The whole per-packet decision, eth -> ip -> l4 -> app, shared by the XDP
//! program and by host tests and fuzzers. The caller supplies the packet and
//! an `Env` that hands out the scratch buffer, settings and rules only once a
//! name has to be read, so packets that are not inspected cost no map lookups.

use crate::{
    counters::Proto,
    dns::{self, DnsSkip},
    name::{CanonBuf, Decision, canon_start, match_canon},
    packet::{Af, IPPROTO_TCP, IPPROTO_UDP, Malformed, Packet, Skip, parse_l3, parse_tcp, parse_udp},
    reply::QueryAt,
    rules::{Config, RuleLookup},
};

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
    /// A TCP segment with payload, not to port 53: it may carry a TLS
    /// ClientHello, read by the stream stage (`tls`) with per-flow state.
    TcpPayload,
    /// A later IP fragment: passed, it has no transport header.
    Fragment,
    /// The program has no settings yet: passed.
    Unconfigured,
    Malformed(Malformed),
    /// The name is not all in this packet (a split TCP/53 segment): passed.
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
        matches!(self, Inspection::Decided { decision: Decision::Block(_), .. })
    }
}

#[inline(always)]
pub fn inspect<P: Packet + ?Sized, E: Env>(p: &P, env: &mut E) -> Inspection {
    let l3 = match parse_l3(p) {
        Ok(l3) => l3,
        Err(skip) => return from_skip(skip),
    };
    if l3.later_fragment {
        return if l3.proto == IPPROTO_UDP || l3.proto == IPPROTO_TCP { Inspection::Fragment } else { Inspection::Other };
    }
    let (proto, l4) = match l3.proto {
        IPPROTO_UDP => match parse_udp(p, &l3) {
            Ok(l4) if l4.dst_port == dns::DNS_PORT => (Proto::DnsUdp, l4),
            Ok(_) => return Inspection::Other,
            Err(skip) => return from_skip(skip),
        },
        IPPROTO_TCP => match parse_tcp(p, &l3) {
            Ok(l4) if l4.dst_port == dns::DNS_PORT => (Proto::DnsTcp, l4),
            Ok(l4) if l4.payload_off < l4.payload_end => return Inspection::TcpPayload,
            Ok(_) => return Inspection::Other,
            Err(skip) => return from_skip(skip),
        },
        _ => return Inspection::Other,
    };
    // Segments without payload (handshake, ACKs) are not queries.
    if proto == Proto::DnsTcp && l4.payload_off >= l4.payload_end {
        return Inspection::Other;
    }
    // Stage boundary: everything the DNS stage and the verdict after it need,
    // made opaque, so the stage is verified once for all header layouts.
    let flags = E::opaque(proto as usize | (l3.af as usize) << 1 | (l3.plain as usize) << 2);
    let l3_off = E::opaque(l3.l3_off);
    let l4_off = E::opaque(l3.l4_off);
    let payload_off = E::opaque(l4.payload_off);
    let payload_end = E::opaque(l4.payload_end);
    let Some((buf, cfg, rules)) = env.resources() else {
        return Inspection::Unconfigured;
    };
    if !cfg.is_configured() {
        return Inspection::Unconfigured;
    }
    // DNS over TCP: a 2-byte length prefix, then the message.
    let msg_off = payload_off + 2 * (flags & 1);
    let result = dns::parse_query(p, msg_off, payload_end, buf, E::opaque).map(|q| (q, match_canon(buf, E::opaque(canon_start(q.canon_len)), cfg, rules)));
    let proto = if flags & 1 == 0 { Proto::DnsUdp } else { Proto::DnsTcp };
    let af = if flags & 2 == 0 { Af::V4 } else { Af::V6 };
    match result {
        Ok((q, decision)) => {
            let at = QueryAt { af, l3_off, l4_off, msg_off, question_end: q.end, qtype: q.qtype, plain: flags & 4 != 0 };
            Inspection::Decided { proto, af, decision, at }
        }
        Err(DnsSkip::NotQuery) => Inspection::Other,
        // A TCP segment may end anywhere: a question cut short there is
        // incomplete, not malformed.
        Err(DnsSkip::Malformed(Malformed::DnsTruncated | Malformed::DnsHeader)) if proto == Proto::DnsTcp && msg_stops_early(p, payload_off, payload_end) => {
            Inspection::Incomplete { proto, af }
        }
        Err(DnsSkip::Malformed(m)) => Inspection::Malformed(m),
    }
}

/// Whether the TCP segment holds less of the DNS message than its length
/// prefix announces.
#[inline(always)]
fn msg_stops_early<P: Packet + ?Sized>(p: &P, payload_off: usize, payload_end: usize) -> bool {
    match p.be16_at(payload_off) {
        Some(len) if payload_off + 2 <= payload_end => payload_end - (payload_off + 2) < len as usize,
        _ => true,
    }
}

#[inline(always)]
const fn from_skip(skip: Skip) -> Inspection {
    match skip {
        Skip::Other => Inspection::Other,
        Skip::Malformed(m) => Inspection::Malformed(m),
    }
}
