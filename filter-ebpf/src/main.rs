//! blokir's XDP programs: read each packet (eth -> ip -> l4 -> app) with the
//! shared parsers in `filter-common`, match the name against the rule maps,
//! count what happened and return one verdict.
#![no_std]
#![no_main]
// The BPF target has no AtomicU64::fetch_add; the intrinsic lowers to BPF's
// atomic add (maps.rs).
#![feature(core_intrinsics)]
// `barrier` (packet.rs): inline asm is still unstable on the BPF target.
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

mod dns;
mod maps;
mod packet;
mod tls;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use filter_common::{counters, inspect::inspect};

use crate::{
    maps::{Maps, Rules, count},
    packet::XdpPacket,
};

/// The entry program: every packet. DNS is decided here; TCP segments that
/// may carry a ClientHello go on to `blokir_tls`.
#[xdp]
pub fn blokir(ctx: XdpContext) -> u32 {
    let mut pkt = XdpPacket { ctx: &ctx };
    count(counters::PACKETS);
    let inspection = inspect(&pkt, &mut Maps { rules: Rules });
    dns::account(&mut pkt, &inspection)
}

/// The stream stage: TLS ClientHello server names, with per-flow state.
#[xdp]
pub fn blokir_tls(ctx: XdpContext) -> u32 {
    tls::stream(&XdpPacket { ctx: &ctx })
}

/// The answer stage: a blocked DNS query turned into its answer.
#[xdp]
pub fn blokir_reply(ctx: XdpContext) -> u32 {
    dns::reply(&mut XdpPacket { ctx: &ctx })
}

/// The match stage: a server name the stream stage finished.
#[xdp]
pub fn blokir_match(_ctx: XdpContext) -> u32 {
    tls::decide()
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
