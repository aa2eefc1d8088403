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
    /// No SYN on record (it came before the program, or was evicted), or
    /// the segment lies before the start.
    Unknown,
    /// The connection's first data segment.
    First,
    /// Data beyond the first byte, come before the first segment: held back
    /// (dropped) until the first has passed, so that the later part of a
    /// ClientHello or request cannot slip through ahead of the part that
    /// starts its flow.
    Early,
}

/// Where a data segment starting at `seq` stands, given the sequence
/// number its connection's data starts at (`expect`, recorded from the
/// SYN).
#[inline(always)]
pub fn start_of(expect: Option<u32>, seq: u32) -> Start {
    match expect {
        Some(e) if e == seq => Start::First,
        Some(e) if (seq.wrapping_sub(e) as i32) > 0 => Start::Early,
        _ => Start::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_placed_against_the_start_modulo_2_32() {
        assert_eq!(start_of(None, 5), Start::Unknown);
        assert_eq!(start_of(Some(5), 5), Start::First);
        assert_eq!(start_of(Some(5), 6), Start::Early);
        assert_eq!(start_of(Some(5), 4), Start::Unknown);
        assert_eq!(start_of(Some(u32::MAX), 3), Start::Early);
        assert_eq!(start_of(Some(3), u32::MAX), Start::Unknown);
    }
}
