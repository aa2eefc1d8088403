//! The packet, as the shared parsers read and rewrite it.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use filter_common::{
    packet::{MAX_PACKET_OFFSET, Packet, PacketMut},
    reply::MAX_REPLY_KEEP,
};

/// The packet, bounds-checked on every read as the verifier demands. The
/// packet pointers are re-read from the context on each access rather than
/// kept: a kept pointer carries the bounds each header layout proved (they
/// differ with VLAN tags, IP options, extension headers), which would make the
/// verifier walk the name loops once per layout.
pub struct XdpPacket<'a> {
    pub ctx: &'a XdpContext,
}

impl Packet for XdpPacket<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.ctx.data_end() - self.ctx.data()
    }

    #[inline(always)]
    fn u8_at(&self, off: usize) -> Option<u8> {
        let p = self.at(off, 1)?;
        // SAFETY: `p` is inside the packet (`at`).
        Some(unsafe { *(p as *const u8) })
    }

    #[inline(always)]
    fn be16_at(&self, off: usize) -> Option<u16> {
        let p = self.at(off, 2)?;
        // SAFETY: both bytes are inside the packet (`at`).
        Some(unsafe { u16::from_be_bytes([*(p as *const u8), *((p + 1) as *const u8)]) })
    }
}

impl XdpPacket<'_> {
    /// The address of `len` bytes at `off`, checked against the packet's
    /// end on the very pointer that is then dereferenced.
    #[inline(always)]
    fn at(&self, off: usize, len: usize) -> Option<usize> {
        if off >= MAX_PACKET_OFFSET {
            return None;
        }
        // Hidden, so the bounds check and the load use the very pointer the
        // verifier checked, not a strength-reduced copy.
        let p = filter_common::hide(self.ctx.data() + off);
        if p + len > self.ctx.data_end() {
            return None;
        }
        Some(p)
    }
}

impl PacketMut for XdpPacket<'_> {
    #[inline(always)]
    fn set_u8(&mut self, off: usize, v: u8) -> Option<()> {
        let p = self.at(off, 1)?;
        // SAFETY: `p` is inside the packet (`at`).
        unsafe { *(p as *mut u8) = v };
        Some(())
    }

    /// Tail first; where the frame has no tailroom (veth in native mode
    /// has little), grow at the head and move the kept bytes to the new
    /// start.
    #[inline(always)]
    fn grow(&mut self, len: usize, keep: usize) -> bool {
        if self.resize(len) {
            return true;
        }
        let cur = self.len();
        if len <= cur || len - cur > 64 {
            return false;
        }
        let d = len - cur;
        // SAFETY: the helper checks the new start against the headroom.
        if unsafe { bpf_xdp_adjust_head(self.ctx.ctx, -(d as i32)) } != 0 {
            return false;
        }
        // Ascending copy to lower addresses: safe for the overlap.
        for i in 0..MAX_REPLY_KEEP.div_ceil(2) {
            let k = 2 * i;
            if k >= keep {
                break;
            }
            let Some(w) = self.be16_at(d + k) else { return false };
            if self.set_be16(k, w).is_none() {
                return false;
            }
        }
        true
    }

    #[inline(always)]
    fn resize(&mut self, len: usize) -> bool {
        let delta = len as i64 - self.len() as i64;
        // SAFETY: the helper checks the new size against the frame.
        delta == 0 || unsafe { bpf_xdp_adjust_tail(self.ctx.ctx, delta as i32) } == 0
    }
}
