//! blokir's XDP program: reads each packet (eth -> ip -> l4 -> app) with the
//! shared parsers in `filter-common`, matches the name against the rule maps,
//! counts what happened and returns one verdict.
#![no_std]
#![no_main]
// The BPF target has no AtomicU64::fetch_add; the intrinsic lowers to BPF's
// atomic add.
#![feature(core_intrinsics)]
// `barrier` below: inline asm is still unstable on the BPF target.
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, xdp_action},
    helpers::bpf_xdp_adjust_tail,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use filter_common::{
    counters::{self, Outcome, Proto},
    inspect::{Env, Inspection, OPAQUE_LIMIT, inspect},
    name::{CanonBuf, Decision},
    packet::{MAX_PACKET_OFFSET, Packet, PacketMut},
    reply::{DnsAction, NoReply, QueryAt, build_reply},
    rules::{Config, DEFAULT_RULE_CAPACITY, MAX_LISTS, NameKey, NodeRules, RuleLookup, RuleRef},
};

#[map(name = "RULES")]
static RULES: HashMap<NameKey, NodeRules> = HashMap::with_max_entries(DEFAULT_RULE_CAPACITY, BPF_F_NO_PREALLOC);

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNTERS, 0);

/// Hits per rule id. Shared, not per-CPU: 8 bytes a rule instead of 8 per
/// rule per CPU; only blocked or allowed packets touch it. Mmapable, so the
/// daemon reads all of it without a syscall per rule.
#[map(name = "RULE_HITS")]
static RULE_HITS: Array<u64> = Array::with_max_entries(DEFAULT_RULE_CAPACITY, BPF_F_MMAPABLE);

#[map(name = "LIST_HITS")]
static LIST_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_LISTS * counters::LIST_COUNTERS, 0);

/// Per-CPU space for the canonical name: too big for the 512-byte stack.
#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<CanonBuf> = PerCpuArray::with_max_entries(1, 0);

/// The DNS action of each list (a `DnsAction`; 0, drop, by default).
#[map(name = "LIST_ACTIONS")]
static LIST_ACTIONS: Array<u32> = Array::with_max_entries(MAX_LISTS, 0);

/// Round-trip slot for `Env::opaque`.
#[map(name = "OPAQUE")]
static OPAQUE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The packet, bounds-checked on every read as the verifier demands. The
/// packet pointers are re-read from the context on each access rather than
/// kept: a kept pointer carries the bounds each header layout proved (they
/// differ with VLAN tags, IP options, extension headers), which would make the
/// verifier walk the name loops once per layout.
struct XdpPacket<'a> {
    ctx: &'a XdpContext,
}

impl Packet for XdpPacket<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.ctx.data_end() - self.ctx.data()
    }

    #[inline(always)]
    fn u8_at(&self, off: usize) -> Option<u8> {
        if off >= MAX_PACKET_OFFSET {
            return None;
        }
        let p = barrier(self.ctx.data() + off);
        if p + 1 > self.ctx.data_end() {
            return None;
        }
        // SAFETY: `p` is inside the packet, checked above.
        Some(unsafe { *(p as *const u8) })
    }

    #[inline(always)]
    fn be16_at(&self, off: usize) -> Option<u16> {
        if off >= MAX_PACKET_OFFSET {
            return None;
        }
        let p = barrier(self.ctx.data() + off);
        if p + 2 > self.ctx.data_end() {
            return None;
        }
        // SAFETY: both bytes are inside the packet, checked above.
        Some(unsafe { u16::from_be_bytes([*(p as *const u8), *((p + 1) as *const u8)]) })
    }
}

impl PacketMut for XdpPacket<'_> {
    #[inline(always)]
    fn set_u8(&mut self, off: usize, v: u8) -> Option<()> {
        if off >= MAX_PACKET_OFFSET {
            return None;
        }
        let p = barrier(self.ctx.data() + off);
        if p + 1 > self.ctx.data_end() {
            return None;
        }
        // SAFETY: `p` is inside the packet, checked above.
        unsafe { *(p as *mut u8) = v };
        Some(())
    }

    #[inline(always)]
    fn resize(&mut self, len: usize) -> bool {
        let delta = len as i64 - self.len() as i64;
        // SAFETY: the helper checks the new size against the frame.
        delta == 0 || unsafe { bpf_xdp_adjust_tail(self.ctx.ctx, delta as i32) } == 0
    }
}

/// Hides how `x` was computed from LLVM (like libbpf's `barrier_var`), so
/// the bounds check and the load use the very pointer the verifier checked,
/// instead of a strength-reduced copy it cannot relate to the check.
#[inline(always)]
fn barrier(mut x: usize) -> usize {
    // SAFETY: a register move to itself. (An empty asm block would leave two
    // line-info records on one instruction, which the kernel rejects.)
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) x, options(nomem, nostack, preserves_flags)) };
    x
}

struct Rules;

impl RuleLookup for Rules {
    #[inline(always)]
    fn lookup(&self, key: &NameKey) -> Option<NodeRules> {
        // SAFETY: the value is copied out at once; the map never hands out
        // memory that is freed under an RCU read section.
        unsafe { RULES.get(key) }.copied()
    }
}

struct Maps {
    rules: Rules,
}

impl Env for Maps {
    type Rules = Rules;

    #[inline(always)]
    fn resources(&mut self) -> Option<(&mut CanonBuf, &Config, &Rules)> {
        let buf = SCRATCH.get_ptr_mut(0)?;
        let cfg = CONFIG.get(0)?;
        // SAFETY: per-CPU scratch, and XDP programs do not nest on a CPU.
        Some((unsafe { &mut *buf }, cfg, &self.rules))
    }

    #[inline(always)]
    fn opaque(x: usize) -> usize {
        match OPAQUE.get_ptr_mut(0) {
            // SAFETY: per-CPU slot; volatile so the compiler keeps the round trip.
            Some(p) => unsafe {
                core::ptr::write_volatile(p, x.min(OPAQUE_LIMIT - 1) as u64);
                core::ptr::read_volatile(p) as usize & (OPAQUE_LIMIT - 1)
            },
            None => x.min(OPAQUE_LIMIT - 1),
        }
    }
}

#[xdp]
pub fn blokir(ctx: XdpContext) -> u32 {
    let mut pkt = XdpPacket { ctx: &ctx };
    count(counters::PACKETS);
    let inspection = inspect(&pkt, &mut Maps { rules: Rules });
    account(&mut pkt, &inspection)
}

/// Counts what the inspection found and turns it into the XDP verdict.
#[inline(always)]
fn account(pkt: &mut XdpPacket, inspection: &Inspection) -> u32 {
    match *inspection {
        Inspection::Other => xdp_action::XDP_PASS,
        Inspection::Fragment => {
            count(counters::FRAGMENTS);
            xdp_action::XDP_PASS
        }
        Inspection::Unconfigured => {
            count(counters::UNCONFIGURED);
            xdp_action::XDP_PASS
        }
        Inspection::Malformed(reason) => {
            count(counters::malformed_index(reason));
            xdp_action::XDP_PASS
        }
        Inspection::Incomplete { proto, af } => {
            count(counters::proto_index(proto, af, Outcome::Incomplete));
            xdp_action::XDP_PASS
        }
        Inspection::Decided { proto, af, decision, at } => {
            count(counters::proto_index(proto, af, Outcome::Inspected));
            match decision {
                Decision::NoMatch => xdp_action::XDP_PASS,
                Decision::Allow(rule) => {
                    count(counters::proto_index(proto, af, Outcome::Allowed));
                    hit(rule, counters::LIST_ALLOWED);
                    xdp_action::XDP_PASS
                }
                Decision::Block(rule) => {
                    count(counters::proto_index(proto, af, Outcome::Blocked));
                    hit(rule, counters::LIST_BLOCKED);
                    // TCP/53 queries are dropped: an answer needs a TCP exchange.
                    let action = match proto {
                        Proto::DnsUdp => LIST_ACTIONS.get(rule.list()).map_or(DnsAction::Drop, |a| DnsAction::from_u32(*a)),
                        Proto::DnsTcp => DnsAction::Drop,
                    };
                    respond(pkt, &at, action)
                }
            }
        }
    }
}

/// Answers a blocked query as its list says (XDP_TX), or drops it.
#[inline(always)]
fn respond(pkt: &mut XdpPacket, at: &QueryAt, action: DnsAction) -> u32 {
    let result = match CONFIG.get(0) {
        Some(cfg) => build_reply(pkt, at, action, cfg, Maps::opaque),
        None => Err(NoReply::Packet),
    };
    match result {
        Ok(()) => {
            count(counters::action_index(action));
            return xdp_action::XDP_TX;
        }
        Err(NoReply::Drop) => {}
        Err(NoReply::NotPlain) => count(counters::REPLY_NOT_PLAIN),
        Err(NoReply::Packet) => count(counters::REPLY_FAILED),
    }
    count(counters::action_index(DnsAction::Drop));
    xdp_action::XDP_DROP
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn hit(rule: RuleRef, kind: u32) {
    if let Some(c) = LIST_HITS.get_ptr_mut(rule.list() * counters::LIST_COUNTERS + kind) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    if let Some(c) = RULE_HITS.get_ptr_mut(rule.id()) {
        // SAFETY: a valid, aligned u64 in the map; shared between CPUs, so
        // added atomically.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(c, 1) };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No panic path is reachable: every index is masked or checked.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
