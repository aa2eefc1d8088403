//! The per-flow state of the stream stages: one LRU map holds the TLS
//! ClientHello parser (`tls::Hello`) or the HTTP request parser
//! (`http::Request`) of each tracked flow, or the DNS-over-TCP reader
//! (`dns_tcp::Query`) of a connection with a query under way, so the two share the flow budget
//! (`tls::DEFAULT_FLOW_CAPACITY`) and the memory (one value is the larger of
//! the two, ~600 bytes).

use crate::{dns_tcp::Query, http::Request, tls::Hello};

/// `Flow::kind` of a TLS flow.
pub const KIND_TLS: u32 = 1;
/// `Flow::kind` of an HTTP flow.
pub const KIND_HTTP: u32 = 2;
/// `Flow::kind` of a DNS-over-TCP flow with a message under way.
pub const KIND_DNS: u32 = 3;

/// A tracked flow's parser. Both variants are `#[repr(C)]` and start with
/// `next_seq`, `kind`, `passed_seq`, so those can be read through either.
#[repr(C)]
#[derive(Clone, Copy)]
pub union Flow {
    pub hello: Hello,
    pub request: Request,
    pub query: Query,
}

impl Flow {
    /// Which parser the flow holds (`KIND_*`).
    #[inline(always)]
    pub fn kind(&self) -> u32 {
        // SAFETY: both variants start with `next_seq, kind` (#[repr(C)]),
        // and every value is written whole by one of them.
        unsafe { core::ptr::read_volatile(&self.hello.kind) }
    }

    /// The sequence number after the last byte of the stream passed on to
    /// the server, which is what the server expects next: the stream
    /// stages move it when a segment passes. A blocked flow keeps it: the
    /// RST that closes the server's end (`reset::Toward::Server`) carries
    /// it.
    #[inline(always)]
    pub fn passed_seq(&self) -> u32 {
        // SAFETY: as `kind`.
        unsafe { core::ptr::read_volatile(&self.hello.passed_seq) }
    }

    /// Whether the flow is blocked, and whether its server end was sent a
    /// RST (`close_server`).
    #[inline(always)]
    pub fn blocked(&self) -> (bool, bool) {
        // SAFETY: the variant `kind` names.
        unsafe {
            if self.kind() == KIND_DNS {
                // A DNS flow is never blocked as a whole.
                (false, false)
            } else if self.kind() == KIND_HTTP {
                (self.request.is_blocked(), self.request.server_closed())
            } else {
                (self.hello.is_blocked(), self.hello.server_closed())
            }
        }
    }

    /// Notes that the blocked connection's server end was sent a RST.
    #[inline(always)]
    pub fn close_server(&mut self) {
        // SAFETY: the variant `kind` names; `flags` is public in both.
        unsafe {
            if self.kind() == KIND_HTTP {
                self.request.flags |= Request::FLAG_SERVER_CLOSED;
            } else {
                self.hello.flags |= Hello::FLAG_SERVER_CLOSED;
            }
        }
    }

    /// Marks the flow blocked: its later segments are dropped, or with
    /// `reset` answered with a TCP RST.
    #[inline(always)]
    pub fn block(&mut self, reset: bool) {
        // SAFETY: the variant `kind` names.
        unsafe { if self.kind() == KIND_HTTP { self.request.block(reset) } else { self.hello.block(reset) } }
    }
}

/// Capacity of the map of connections between their SYN and their first
/// data segment (`SYNS`, LRU): 48 bytes of key and value each.
pub const DEFAULT_SYN_CAPACITY: u32 = 1 << 17;

/// Where a data segment stands to the start of its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// No SYN on record (it came before the program, or was evicted).
    Unknown,
    /// The connection's first data segment; its first `trim` bytes lie
    /// before the connection's start (zapret's `seqovl`: a few bytes
    /// "before" ISN+1). The receiver takes the segment from the start on
    /// (Linux trims the head of a segment that starts before `rcv_nxt`), so
    /// the stream is read from there.
    First { trim: u32 },
    /// Data beyond the first byte, come before the first segment: held back
    /// (dropped) until the first has passed, so that the later part of a
    /// ClientHello or request cannot slip through ahead of the part that
    /// starts its flow.
    Early,
    /// All of it lies before the connection's start: the receiver discards
    /// it as old data, so it is passed unread, and the start stays on
    /// record.
    Stale,
}

/// Where a data segment of `len` bytes starting at `seq` stands, given the
/// sequence number its connection's data starts at (`expect`, recorded
/// from the SYN).
#[inline(always)]
pub fn start_of(expect: Option<u32>, seq: u32, len: u32) -> Start {
    let Some(e) = expect else { return Start::Unknown };
    let ahead = seq.wrapping_sub(e) as i32;
    if ahead > 0 {
        return Start::Early;
    }
    // Bytes before the start: at most the segment's (`ahead` < 0 here,
    // and -i32::MIN does not fit; such a segment is far behind anyway).
    let before = e.wrapping_sub(seq);
    if before < len { Start::First { trim: before } } else { Start::Stale }
}

/// Signs on a data segment that the receiver's stack would not read it as
/// it stands (`fake_signs`): what the circumvention tools "fool" their fake
/// segments with, and urgent bytes.
pub mod sign {
    /// URG set: the receiver takes the byte at the urgent pointer out of
    /// the stream (RFC 6093; Linux without `SO_OOBINLINE`).
    pub const URGENT: u32 = 1;
    /// No ACK flag (and no SYN): Linux discards such a data segment.
    pub const NO_ACK: u32 = 2;
    /// A TCP MD5 signature (kind 19) or TCP-AO (kind 29) option, or an
    /// option list no real stack sends (not walked within
    /// `packet::TCP_OPTION_SLOTS` options): a server without a key for the
    /// connection drops the segment (Linux: `TCPMD5Unexpected`), or, for AO
    /// before Linux 6.7, reads it; either way a flow being read does not
    /// carry one.
    pub const SIGNED: u32 = 4;
}

/// `--on-tamper block`: a flow being read that carries a fake segment or
/// urgent bytes is blocked (`Config::tamper_policy`).
pub const TAMPER_BLOCK: u32 = 0;
/// `--on-tamper pass`: counted; a segment the receiver discards is passed
/// unread (the flow is read on), and a flow with urgent bytes is no longer
/// read (it passes).
pub const TAMPER_PASS: u32 = 1;

/// What a flow being read does with a segment that bears `signs`
/// (`sign::*`, not 0) under the tamper policy `policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// Block the flow (its counter: `counter`).
    Block { counter: u32 },
    /// Count it and pass the segment unread: the receiver discards it.
    Skip { counter: u32 },
    /// Count it, forget the flow (it is no longer read) and pass the
    /// segment: the bytes the receiver reads are not the segment's.
    Forget { counter: u32 },
}

/// The tamper policy's answer to a segment with `signs`.
#[inline(always)]
pub fn tamper(signs: u32, policy: u32) -> Tamper {
    let discarded = signs & (sign::NO_ACK | sign::SIGNED) != 0;
    let counter = if discarded { crate::counters::EVASION_FAKE } else { crate::counters::EVASION_URGENT };
    if policy != TAMPER_PASS {
        Tamper::Block { counter }
    } else if discarded {
        Tamper::Skip { counter }
    } else {
        Tamper::Forget { counter }
    }
}

/// Whether a connection's first data segment (`start`) with TCP flags
/// `flags` is suspect whatever it carries: urgent data, or data without an
/// ACK (a SYN with data, TCP Fast Open, is no data segment here). Such a
/// segment starts a flow even if it does not start a hello or request, as
/// its bytes are not what the receiver reads (an urgent byte before the
/// hello, ByeDPI's `--disoob`).
#[inline(always)]
pub fn suspect_first(start: Start, flags: u8) -> bool {
    use crate::packet::{TCP_ACK, TCP_SYN, TCP_URG};
    matches!(start, Start::First { .. }) && (flags & TCP_URG != 0 || flags & (TCP_ACK | TCP_SYN) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_placed_against_the_start_modulo_2_32() {
        assert_eq!(start_of(None, 5, 10), Start::Unknown);
        assert_eq!(start_of(Some(5), 5, 10), Start::First { trim: 0 });
        assert_eq!(start_of(Some(5), 6, 10), Start::Early);
        assert_eq!(start_of(Some(u32::MAX), 3, 10), Start::Early);
    }

    #[test]
    fn bytes_before_the_start_are_trimmed() {
        // seqovl: 3 bytes before the start, 7 after.
        assert_eq!(start_of(Some(5), 2, 10), Start::First { trim: 3 });
        assert_eq!(start_of(Some(1), u32::MAX, 10), Start::First { trim: 2 });
        // Wholly before: old data.
        assert_eq!(start_of(Some(5), 4, 1), Start::Stale);
        assert_eq!(start_of(Some(5), 4, 0), Start::Stale);
        assert_eq!(start_of(Some(3), u32::MAX, 4), Start::Stale);
        assert_eq!(start_of(Some(5), 5 + (1 << 31), 100), Start::Stale);
    }

    #[test]
    fn tamper_policy() {
        use crate::counters::{EVASION_FAKE, EVASION_URGENT};
        assert_eq!(tamper(sign::URGENT, TAMPER_BLOCK), Tamper::Block { counter: EVASION_URGENT });
        assert_eq!(tamper(sign::URGENT, TAMPER_PASS), Tamper::Forget { counter: EVASION_URGENT });
        assert_eq!(tamper(sign::NO_ACK | sign::URGENT, TAMPER_PASS), Tamper::Skip { counter: EVASION_FAKE });
        assert_eq!(tamper(sign::SIGNED, TAMPER_BLOCK), Tamper::Block { counter: EVASION_FAKE });
        assert!(suspect_first(Start::First { trim: 0 }, 0x20 | 0x10));
        assert!(suspect_first(Start::First { trim: 0 }, 0x08));
        assert!(!suspect_first(Start::First { trim: 0 }, 0x18));
        assert!(!suspect_first(Start::Unknown, 0x20));
    }
}
