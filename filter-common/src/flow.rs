//! The per-flow state of the stream stages: one LRU map holds the TLS
//! ClientHello parser (`tls::Hello`) or the HTTP request parser
//! (`http::Request`) of each tracked flow, so the two share the flow budget
//! (`tls::DEFAULT_FLOW_CAPACITY`) and the memory (one value is the larger of
//! the two, ~600 bytes).

use crate::{http::Request, tls::Hello};

/// `Flow::kind` of a TLS flow.
pub const KIND_TLS: u32 = 1;
/// `Flow::kind` of an HTTP flow.
pub const KIND_HTTP: u32 = 2;

/// A tracked flow's parser. Both variants are `#[repr(C)]` and start with
/// `next_seq` then `kind`, so `kind` can be read through either.
#[repr(C)]
#[derive(Clone, Copy)]
pub union Flow {
    pub hello: Hello,
    pub request: Request,
}

impl Flow {
    /// Which parser the flow holds (`KIND_*`).
    #[inline(always)]
    pub fn kind(&self) -> u32 {
        // SAFETY: both variants start with `next_seq: u32, kind: u32`
        // (#[repr(C)]), and every value is written whole by one of them.
        unsafe { core::ptr::read_volatile(&self.hello.kind) }
    }

    /// Marks the flow blocked: its later segments are dropped.
    #[inline(always)]
    pub fn block(&mut self) {
        // SAFETY: the variant `kind` names.
        unsafe { if self.kind() == KIND_HTTP { self.request.block() } else { self.hello.block() } }
    }

    /// Marks the flow blocked: its later client segments are answered with
    /// a TCP RST.
    #[inline(always)]
    pub fn block_reset(&mut self) {
        // SAFETY: the variant `kind` names.
        unsafe { if self.kind() == KIND_HTTP { self.request.block_reset() } else { self.hello.block_reset() } }
    }
}
