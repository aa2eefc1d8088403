//! QUIC Initial packets (RFC 9000 17.2.2, RFC 9369 for version 2).
//!
//! A client opens a QUIC connection (HTTP/3, UDP/443) with an Initial
//! packet whose CRYPTO frames carry the TLS ClientHello, server name
//! included. It is encrypted with keys derived from the packet's own
//! destination connection ID, so anyone can read it, but that takes HKDF and
//! AES-GCM per packet (and reassembly across packets), which XDP cannot do.
//! The entry program recognizes Initials on the QUIC ports (every UDP port
//! but 53 by default), counts them, and applies a policy: `pass`, `drop`
//! (browsers then fall back to TCP, where the TLS stage reads the server
//! name), or `read` (the daemon reads the name: `filter-user/src/quic`).

use crate::packet::Packet;

/// HTTP/3's UDP port (RFC 9114 3.1): Initials are read on every UDP port
/// (but 53) unless `--quic-ports` names others.
pub const QUIC_PORT: u16 = 443;
/// Clients pad datagrams carrying Initials to at least this many bytes
/// (RFC 9000 14.1); shorter ones are not (client) Initials.
pub const MIN_INITIAL_DATAGRAM: usize = 1200;
pub const VERSION_1: u32 = 0x0000_0001;
/// QUIC version 2 (RFC 9369): its long-header packet types are renumbered.
pub const VERSION_2: u32 = 0x6b33_43cf;
/// Longest connection ID in QUIC versions 1 and 2.
pub const MAX_CID_LEN: u8 = 20;

/// `Config::quic_policy`: what Initials get.
pub const POLICY_PASS: u32 = 0;
pub const POLICY_DROP: u32 = 1;
/// Initials pass and are handed to the daemon, which reads their server
/// name and blocks the flow (`QUIC_BLOCKED`) if the rules say so.
pub const POLICY_READ: u32 = 2;

/// `Config::quic_overload`: what an Initial that cannot go up to the daemon
/// gets under `POLICY_READ` (over the budget or the per-flow cap, or the
/// daemon's buffer full or gone).
pub const OVERLOAD_PASS: u32 = 0;
pub const OVERLOAD_DROP: u32 = 1;

/// The stage that hands Initials up and drops blocked flows.
pub const QUIC_PROGRAM_NAME: &str = "blokir_quic";
/// Client flows (`tls::FlowKey`, UDP) the daemon blocked; LRU.
pub const MAP_QUIC_BLOCKED: &str = "QUIC_BLOCKED";
pub const QUIC_BLOCKED_CAPACITY: u32 = 1 << 16;
/// A blocked flow is forgotten when an Initial comes after it has been
/// silent this long (a new connection on the same addresses and ports;
/// other datagrams keep it blocked). Longer than the handshake timeouts of
/// the QUIC stacks servers run (5-10 s: quic-go, msquic, Google's), so the
/// blocked connection is gone at the server by then.
pub const BLOCK_IDLE_NS: u64 = 300_000_000_000;

/// A blocked flow in `QUIC_BLOCKED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockedFlow {
    /// The rule that blocked it (never 0).
    pub rule: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of its last datagram, or of the
    /// verdict.
    pub last_ns: u64,
}

impl BlockedFlow {
    /// Whether an Initial at `now` opens a new connection: the flow has
    /// been silent for `BLOCK_IDLE_NS`.
    #[inline(always)]
    pub fn idle_at(&self, now: u64) -> bool {
        now.saturating_sub(self.last_ns) >= BLOCK_IDLE_NS
    }
}

/// Server ports of the flows in `QUIC_BLOCKED`, a bitmap laid out as
/// `rules::MAP_HTTP_PORTS` that only the daemon writes (before the flow):
/// a datagram that is not an Initial goes to the QUIC stage's lookup only
/// if its port has a blocked flow, so other UDP costs one array read.
pub const MAP_QUIC_BLOCKED_PORTS: &str = "QUIC_BLOCKED_PORTS";
/// Initials handed up per flow (LRU): the cap bounds what one flow costs.
pub const MAP_QUIC_SEEN: &str = "QUIC_SEEN";
pub const QUIC_SEEN_CAPACITY: u32 = 1 << 16;
/// Initials handed up per flow at most: a hello takes one to three, a
/// Retry or a lost packet a few more.
pub const PER_FLOW_CAP: u32 = 8;
/// Initials handed up per CPU per `BUDGET_WINDOW_NS` at most.
pub const CPU_BUDGET: u64 = 2000;
pub const BUDGET_WINDOW_NS: u64 = 10_000_000;
/// The perf event array the Initials go up by (`bpf_perf_event_output`
/// with the packet as context: the kernel copies a variable length of
/// packet bytes, which XDP cannot do into a ring buffer record before 5.18's
/// `bpf_xdp_load_bytes`).
pub const MAP_QUIC_INITIALS: &str = "QUIC_INITIALS";
/// Bytes of a frame handed up at most (Ethernet to the end of the UDP
/// payload).
pub const MAX_HANDED_UP: u32 = 1600;

/// The record before each frame handed up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InitialMeta {
    /// Bytes of the frame that follow.
    pub len: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` when it was handed up (verdict latency).
    pub ktime_ns: u64,
}

/// Whether the UDP payload `off..end` is a client's QUIC Initial: a long
/// header with the fixed bit, version 1 or 2 with that version's Initial
/// type, a destination connection ID of at most 20 bytes, in a datagram of
/// at least 1200 bytes.
#[inline(always)]
pub fn is_initial<P: Packet + ?Sized>(p: &P, off: usize, end: usize) -> bool {
    if end < off + MIN_INITIAL_DATAGRAM {
        return false;
    }
    let (Some(first), Some(hi), Some(lo), Some(dcid_len)) = (p.u8_at(off), p.be16_at(off + 1), p.be16_at(off + 3), p.u8_at(off + 5)) else {
        return false;
    };
    let version = (u32::from(hi) << 16) | u32::from(lo);
    let kind = (first >> 4) & 3;
    let initial = match version {
        VERSION_1 => kind == 0,
        VERSION_2 => kind == 1,
        _ => false,
    };
    first & 0xc0 == 0xc0 && initial && dcid_len <= MAX_CID_LEN
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    fn initial(first: u8, version: u32, dcid_len: u8, len: usize) -> Vec<u8> {
        let mut v = std::vec![first];
        v.extend_from_slice(&version.to_be_bytes());
        v.push(dcid_len);
        v.resize(len, 0);
        v
    }

    #[test]
    fn initials_of_both_versions_and_nothing_else() {
        let ok = |v: &[u8]| is_initial(v, 0, v.len());
        assert!(ok(&initial(0xc3, VERSION_1, 8, 1200)));
        assert!(ok(&initial(0xd3, VERSION_2, 20, 1252)));
        // v2's type 0 is Retry, v1's type 1 is 0-RTT; Handshake in both.
        assert!(!ok(&initial(0xc3, VERSION_2, 8, 1200)));
        assert!(!ok(&initial(0xd3, VERSION_1, 8, 1200)));
        assert!(!ok(&initial(0xe3, VERSION_1, 8, 1200)));
        // Short header, no fixed bit, other versions, long CIDs, short datagrams.
        assert!(!ok(&initial(0x43, VERSION_1, 8, 1200)));
        assert!(!ok(&initial(0x83, VERSION_1, 8, 1200)));
        assert!(!ok(&initial(0xc3, 0xff00_001d, 8, 1200)));
        assert!(!ok(&initial(0xc3, 0, 8, 1200)));
        assert!(!ok(&initial(0xc3, VERSION_1, 21, 1200)));
        assert!(!ok(&initial(0xc3, VERSION_1, 8, 1199)));
    }
}
