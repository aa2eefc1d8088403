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
    let tcp = E::opaque(proto as usize);
    let v6 = E::opaque(l3.af as usize);
    let plain = E::opaque(l3.plain as usize);
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
    // DNS over TCP: a 2-byte length prefix, then the message. The question
    // must lie within that message, not run on into whatever follows it in
    // the segment.
    let (msg_end, short) = msg_end(p, tcp, payload_off, payload_end);
    // Made opaque again: otherwise what the verifier learns about the
    // offsets while reading the prefix (one state per outcome) carries into
    // the DNS stage, which is then verified once per outcome (+50k insns).
    let msg_off = E::opaque(payload_off + 2 * (tcp & 1));
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

#[inline(always)]
const fn from_skip(skip: Skip) -> Inspection {
    match skip {
        Skip::Other => Inspection::Other,
        Skip::Malformed(m) => Inspection::Malformed(m),
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
        let mut cfg = Config { hash_r: [lane_multiplier(1), lane_multiplier(2)], depth_mask: [0, 0] };
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
    fn tcp_question_must_lie_within_the_announced_message() {
        let msg = query();
        let f = tcp_frame(msg.len() as u16, &msg);
        assert!(inspect(f.as_slice(), &mut env()).blocks());
        // The prefix announces a message that ends inside the question; the
        // rest of the segment is not part of it.
        let f = tcp_frame(17, &msg);
        assert_eq!(inspect(f.as_slice(), &mut env()), Inspection::Malformed(Malformed::DnsTruncated));
        // A segment shorter than the announced message is still incomplete.
        let f = tcp_frame(200, &msg[..17]);
        assert!(matches!(inspect(f.as_slice(), &mut env()), Inspection::Incomplete { .. }));
    }
}
