//! blokir's XDP programs: read each packet (eth -> ip -> l4 -> app) with the
//! shared parsers in `filter-common`, match the name against the rule maps,
//! count what happened and return one verdict.
#![no_std]
#![no_main]
// The BPF target has no AtomicU64::fetch_add; the intrinsic lowers to BPF's
// atomic add (maps.rs).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conn;
mod dns;
mod dns_tcp;
mod http;
mod maps;
mod packet;
mod quic;
mod tls;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use filter_common::{
    counters::{self, Outcome, Proto},
    dns::DNS_PORT,
    inspect::{Classified, FRAGMENTS_DROP, Fragmented, classify, dns_stage},
    quic::{POLICY_DROP, POLICY_READ},
    rules::{STAGE_DNS, STAGE_DNS_TCP, STAGE_HTTP, STAGE_TLS},
};

use crate::{
    maps::{CONFIG, DNS_JOB, HTTP_PORTS, Maps, QUIC_PORTS, Rules, STAGES, TLS_PORTS, count, has_port},
    packet::XdpPacket,
};

/// The entry program: every packet. It reads the lower layers and hands UDP
/// DNS queries to `blokir_dns`, TCP payload to port 53 to `blokir_dns_tcp`,
/// TCP payload to the HTTP ports to `blokir_http`, TCP payload to the TLS
/// ports to `blokir_tls`, and QUIC Initials to the QUIC ports (and datagrams of
/// flows that may be blocked) to `blokir_quic` by tail call, so that each
/// stage is verified on its own. It records clients' SYNs to port 53 or
/// either kind of port itself (`conn::syn`).
/// TCP to other ports passes unread. First IP fragments of what the stages
/// read are dropped (or passed) by the fragment policy: the rest of such a
/// datagram is never seen whole.
#[xdp]
pub fn blokir(ctx: XdpContext) -> u32 {
    let pkt = XdpPacket { ctx: &ctx };
    count(counters::PACKETS);
    match classify(&pkt) {
        Classified::Other => {}
        Classified::Fragment => count(counters::FRAGMENTS),
        Classified::FirstFragment(f) => {
            let inspected = match f {
                Fragmented::Tcp(port) => has_port(&HTTP_PORTS, port) || has_port(&TLS_PORTS, port),
                Fragmented::Dns | Fragmented::Tiny => true,
            };
            if inspected {
                count(counters::EVASION_FRAGMENT);
                if CONFIG.get(0).is_some_and(|c| c.is_configured() && c.fragment_policy == FRAGMENTS_DROP) {
                    return xdp_action::XDP_DROP;
                }
            }
        }
        Classified::Malformed(m) => count(counters::malformed_index(m)),
        // SAFETY (each tail call): the slots hold programs of this object;
        // the call returns only if a slot is empty, and then the packet passes.
        Classified::TcpPayload(port) => {
            if port == DNS_PORT {
                unsafe { STAGES.tail_call(&ctx, STAGE_DNS_TCP) };
            } else if has_port(&HTTP_PORTS, port) {
                unsafe { STAGES.tail_call(&ctx, STAGE_HTTP) };
            } else if has_port(&TLS_PORTS, port) {
                if conn::idle_tls(&pkt) {
                    return xdp_action::XDP_PASS;
                }
                unsafe { STAGES.tail_call(&ctx, STAGE_TLS) };
            }
        }
        Classified::TcpSyn(port) => {
            if port == DNS_PORT || has_port(&HTTP_PORTS, port) || has_port(&TLS_PORTS, port) {
                return conn::syn(&pkt);
            }
        }
        Classified::Quic(af, port) => {
            if has_port(&QUIC_PORTS, port) {
                count(counters::proto_index(Proto::Quic, af, Outcome::Inspected));
                match CONFIG.get(0).map(|c| if c.is_configured() { c.quic_policy } else { 0 }) {
                    Some(POLICY_DROP) => {
                        count(counters::proto_index(Proto::Quic, af, Outcome::Blocked));
                        return xdp_action::XDP_DROP;
                    }
                    Some(POLICY_READ) => quic::enter(&ctx, true),
                    _ => {}
                }
            }
        }
        // Any other UDP datagram (DNS aside): one bitmap read, and the QUIC
        // stage's lookup only where a blocked flow has that server port.
        Classified::QuicOther(port) => {
            if has_port(&quic::QUIC_BLOCKED_PORTS, port) && CONFIG.get(0).is_some_and(|c| c.is_configured() && c.quic_policy == POLICY_READ) {
                quic::enter(&ctx, false);
            }
        }
        Classified::Dns(at) => {
            if let Some(job) = DNS_JOB.get_ptr_mut(0) {
                // SAFETY: per-CPU slot.
                unsafe {
                    *job = at;
                    STAGES.tail_call(&ctx, STAGE_DNS);
                }
            }
        }
    }
    xdp_action::XDP_PASS
}

/// The DNS stage: the query's name, matched; dropped or answered.
#[xdp]
pub fn blokir_dns(ctx: XdpContext) -> u32 {
    let mut pkt = XdpPacket { ctx: &ctx };
    let Some(at) = DNS_JOB.get(0).copied() else { return xdp_action::XDP_PASS };
    let inspection = dns_stage(&pkt, &at, &mut Maps { rules: Rules });
    dns::account(&mut pkt, &inspection)
}

/// The stream stage: TLS ClientHello server names, with per-flow state.
#[xdp]
pub fn blokir_tls(ctx: XdpContext) -> u32 {
    tls::stream(&XdpPacket { ctx: &ctx })
}

/// The HTTP stage: HTTP request Host names, with per-flow state.
#[xdp]
pub fn blokir_http(ctx: XdpContext) -> u32 {
    http::stream(&XdpPacket { ctx: &ctx })
}

/// The QUIC stage: client Initials handed to the daemon, blocked flows
/// dropped.
#[xdp]
pub fn blokir_quic(ctx: XdpContext) -> u32 {
    quic::stage(&ctx)
}

/// The DNS-over-TCP stage's header half: the segment's flow and payload,
/// handed on to `blokir_dns_tcp_read`.
#[xdp]
pub fn blokir_dns_tcp(ctx: XdpContext) -> u32 {
    dns_tcp::headers(&XdpPacket { ctx: &ctx })
}

/// The DNS-over-TCP stage's reading half: queries read across segments,
/// with per-flow state.
#[xdp]
pub fn blokir_dns_tcp_read(ctx: XdpContext) -> u32 {
    dns_tcp::stream(&XdpPacket { ctx: &ctx })
}

/// The DNS-over-TCP stage's question: read from the reader's buffer and
/// handed to the match stage.
#[xdp]
pub fn blokir_dns_tcp_question(ctx: XdpContext) -> u32 {
    dns_tcp::question(&XdpPacket { ctx: &ctx })
}

/// The compare stage: a later copy of a stream's name bytes, compared with
/// those read.
#[xdp]
pub fn blokir_rewrite(ctx: XdpContext) -> u32 {
    conn::rewrite(&XdpPacket { ctx: &ctx })
}

/// The answer stage: a blocked DNS query turned into its answer, or a
/// blocked TCP segment into a RST.
#[xdp]
pub fn blokir_reply(ctx: XdpContext) -> u32 {
    dns::reply(&mut XdpPacket { ctx: &ctx })
}

/// The match stage: a server name the stream stage finished.
#[xdp]
pub fn blokir_match(ctx: XdpContext) -> u32 {
    tls::decide(&XdpPacket { ctx: &ctx })
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
