//! The QUIC stage (`--quic read`): a client Initial passes (XDP cannot wait
//! for the daemon), and a copy goes up to the daemon, which reads its
//! server name and writes the flows the rules block into `QUIC_BLOCKED`;
//! every later datagram of theirs is dropped here. Bounded: at most
//! `PER_FLOW_CAP` Initials per flow and `CPU_BUDGET` per CPU per
//! `BUDGET_WINDOW_NS` go up; the others, and those the daemon's buffer does
//! not take (full, or no daemon), get the overload policy
//! (`Config::quic_overload`).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_CURRENT_CPU, xdp_action},
    helpers::{bpf_ktime_get_ns, bpf_perf_event_output},
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, PerfEventByteArray},
    programs::XdpContext,
};
use filter_common::{
    counters::{self, Outcome, Proto},
    packet::{Packet, parse_l3, parse_udp},
    quic::{BUDGET_WINDOW_NS, BlockedFlow, CPU_BUDGET, InitialMeta, MAX_HANDED_UP, OVERLOAD_DROP, PER_FLOW_CAP, QUIC_BLOCKED_CAPACITY, QUIC_SEEN_CAPACITY},
    rules::HTTP_PORT_WORDS,
    tls::FlowKey,
};

use crate::{
    maps::{CONFIG, count},
    packet::XdpPacket,
};

#[map(name = "QUIC_BLOCKED")]
pub static QUIC_BLOCKED: LruHashMap<FlowKey, BlockedFlow> = LruHashMap::with_max_entries(QUIC_BLOCKED_CAPACITY, 0);

/// The server ports of `QUIC_BLOCKED`'s flows (`quic::MAP_QUIC_BLOCKED_PORTS`).
#[map(name = "QUIC_BLOCKED_PORTS")]
pub static QUIC_BLOCKED_PORTS: Array<u64> = Array::with_max_entries(HTTP_PORT_WORDS, 0);

#[map(name = "QUIC_SEEN")]
pub static QUIC_SEEN: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(QUIC_SEEN_CAPACITY, 0);

#[map(name = "QUIC_INITIALS")]
pub static QUIC_INITIALS: PerfEventByteArray = PerfEventByteArray::new(0);

/// Per CPU: what the entry program classified the datagram it tail-calls
/// the stage for as (`JOB_*`).
#[map(name = "QUIC_JOB")]
pub static QUIC_JOB: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
pub const JOB_OTHER: u32 = 0;
pub const JOB_INITIAL: u32 = 1;

/// Per CPU: the budget window's start and the Initials handed up in it.
#[map(name = "QUIC_BUDGET")]
pub static QUIC_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Tail-calls the QUIC stage for a datagram to a QUIC port (`initial` or not);
/// returns only if it could not.
#[inline(always)]
pub fn enter(ctx: &XdpContext, initial: bool) {
    if let Some(job) = QUIC_JOB.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; the tail call returns only if the slot is
        // empty (then the packet passes).
        unsafe {
            *job = if initial { JOB_INITIAL } else { JOB_OTHER };
            crate::maps::STAGES.tail_call(ctx, filter_common::rules::STAGE_QUIC);
        }
    }
}

pub fn stage(ctx: &XdpContext) -> u32 {
    let pkt = XdpPacket { ctx };
    let Ok(l3) = parse_l3(&pkt) else { return xdp_action::XDP_PASS };
    let Ok(l4) = parse_udp(&pkt, &l3) else { return xdp_action::XDP_PASS };
    let Some(key) = FlowKey::of(&pkt, &l3, &l4) else { return xdp_action::XDP_PASS };
    let initial = QUIC_JOB.get(0).copied() == Some(JOB_INITIAL);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(b) = QUIC_BLOCKED.get_ptr_mut(&key) {
        // SAFETY: the flow's value; CPUs racing on it only blur `last_ns`.
        let forget = unsafe {
            let forget = initial && (*b).idle_at(now);
            (*b).last_ns = now;
            forget
        };
        if !forget {
            count(counters::proto_index(Proto::Quic, l3.af, Outcome::Blocked));
            return xdp_action::XDP_DROP;
        }
        // An Initial after the flow's silence: a new connection on the same
        // addresses and ports, read afresh.
        let _ = QUIC_BLOCKED.remove(&key);
        let _ = QUIC_SEEN.remove(&key);
    }
    // Not an Initial (a Handshake or short-header packet of a flow not
    // blocked, or any other datagram to the port): passes, not handed up.
    if !initial {
        return xdp_action::XDP_PASS;
    }
    let seen = match QUIC_SEEN.get_ptr_mut(&key) {
        // SAFETY: the flow's value; a race between CPUs only blurs the cap.
        Some(n) => unsafe {
            let v = *n;
            if v >= PER_FLOW_CAP {
                return overload(counters::QUIC_OVER_CAP, l3.af);
            }
            *n = v + 1;
            true
        },
        None => false,
    };
    if !seen {
        let _ = QUIC_SEEN.insert(&key, &1, 0);
    }
    let Some(b) = QUIC_BUDGET.get_ptr_mut(0) else { return xdp_action::XDP_PASS };
    // SAFETY: the per-CPU slot.
    unsafe {
        if now.wrapping_sub((*b)[0]) >= BUDGET_WINDOW_NS {
            *b = [now, 0];
        }
        if (*b)[1] >= CPU_BUDGET {
            return overload(counters::QUIC_OVER_BUDGET, l3.af);
        }
        (*b)[1] += 1;
    }
    let len = (pkt.len() as u32).min(MAX_HANDED_UP);
    let meta = InitialMeta { len, _pad: 0, ktime_ns: now };
    // SAFETY: `meta` is a plain `repr(C)` struct on the stack.
    let bytes = unsafe { core::slice::from_raw_parts(&meta as *const InitialMeta as *const u8, core::mem::size_of::<InitialMeta>()) };
    // The upper flag bits ask the kernel to append `len` bytes of the
    // packet. Called directly (aya's `output` drops the result): it fails
    // when this CPU's buffer is full or has no reader (the daemon is gone:
    // closing the map's file removes its perf events).
    let flags = (u64::from(len) << 32) | u64::from(BPF_F_CURRENT_CPU as u32);
    // SAFETY: `QUIC_INITIALS` is the map (a transparent wrapper of its
    // definition); `bytes` is on the stack for the call.
    let r = unsafe {
        bpf_perf_event_output(
            ctx.as_ptr(),
            &QUIC_INITIALS as *const PerfEventByteArray as *mut core::ffi::c_void,
            flags,
            bytes.as_ptr() as *mut _,
            bytes.len() as u64,
        )
    };
    if r != 0 {
        return overload(counters::QUIC_UNDELIVERED, l3.af);
    }
    count(counters::QUIC_HANDED_UP);
    xdp_action::XDP_PASS
}

/// An Initial that does not go up (`fate`): counted, and passed or dropped
/// by the overload policy.
#[inline(always)]
fn overload(fate: u32, af: filter_common::packet::Af) -> u32 {
    count(fate);
    if CONFIG.get(0).is_some_and(|c| c.quic_overload == OVERLOAD_DROP) {
        count(counters::proto_index(Proto::Quic, af, Outcome::Blocked));
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}
