//! TCP connections around the stream stages: where a connection's data
//! starts (recorded from its SYN), a new connection on the addresses and
//! ports of a blocked one, and the RSTs of blocked flows.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns};
use filter_common::{
    counters,
    flow::{self, Flow, KIND_DNS, KIND_HTTP, Start, SynVerdict, TAMPER_BLOCK, Tamper, sign, start_of},
    inspect::Env as _,
    packet::{TCP_URG, fake_signs, parse_l3, parse_tcp},
    reply::NoReply,
    reset::{Toward, build_reset},
    rules::{STAGE_HTTP, STAGE_REPLY, STAGE_REWRITE, STAGE_TLS},
    tls::{FlowKey, starts_hello},
};

use crate::{
    maps::{CONFIG, FLOW_INIT, FLOWS, Maps, REPLY_JOB, ReplyJob, STAGES, SYNS, count},
    packet::XdpPacket,
};

/// A data segment to a TLS port that the TLS stage would pass untouched:
/// of a watched flow, off its name's bytes (`Flow::idle_tls`), and not
/// starting a ClientHello (TLS 1.3's second one is read afresh). The bulk of
/// HTTPS packets, passed here instead of after a tail call, a second parse
/// and the stage's code, cold in cache. Anything else goes to the stage. A
/// segment that starts a hello is sent on before the flow's lookup: a new
/// connection's first segment, which has no flow yet.
#[inline(always)]
pub fn idle_tls(pkt: &XdpPacket) -> bool {
    let Ok(l3) = parse_l3(pkt) else { return false };
    let Ok(l4) = parse_tcp(pkt, &l3) else { return false };
    let (off, end) = (l4.payload_off, l4.payload_end);
    if l4.is_syn() || starts_hello(pkt, off, end) {
        return false;
    }
    let Some(key) = FlowKey::of(pkt, &l3, &l4) else { return false };
    // SAFETY: the flow's map value, only read (see the TLS stage).
    FLOWS.get_ptr(&key).is_some_and(|flow| unsafe { &*flow }.idle_tls(l4.data_seq(), end.saturating_sub(off) as u32))
}

/// A client's SYN without data, to port 53 or an HTTP or TLS port: the
/// entry program's (the stream stages' verification never walks it).
///
/// A blocked flow on the same addresses and ports: see `blocked_syn`. A
/// TLS or HTTP flow still being read: tampering (`flow::sign::SYN`). A
/// DNS-over-TCP reader with a message under way reads on (the server
/// discards the SYN). Any other state on the pair is stale: forgotten, and
/// the start recorded, unless the SYN conflicts with the one before it
/// (`flow::on_syn`): then it is dropped.
#[inline(always)]
pub fn syn(pkt: &XdpPacket) -> u32 {
    let Ok(l3) = parse_l3(pkt) else { return xdp_action::XDP_PASS };
    let Ok(l4) = parse_tcp(pkt, &l3) else { return xdp_action::XDP_PASS };
    let Some(key) = FlowKey::of(pkt, &l3, &l4) else { return xdp_action::XDP_PASS };
    let key = &key;
    // One lookup of the pair's flow for all three cases.
    if let Some(flow) = FLOWS.get_ptr_mut(key) {
        // SAFETY: the flow's map value (see the TLS stage).
        let flow = unsafe { &mut *flow };
        if let Some(verdict) = reset_open(pkt, flow, key) {
            return verdict;
        }
        if flow.reading() {
            if flow.kind() == KIND_DNS {
                count(counters::EVASION_SYN);
                return xdp_action::XDP_PASS;
            }
            // Under `block` the SYN becomes the RST that closes the server's
            // end; under `pass` the flow is forgotten.
            if let Some(verdict) = tamper(pkt, flow, key, sign::SYN) {
                return verdict;
            }
        }
        let _ = FLOWS.remove(key);
    }
    // SAFETY: a value of the map, copied out.
    let record = SYNS.get_ptr(key).map(|e| unsafe { core::ptr::read_volatile(e) });
    // SAFETY: a helper without arguments.
    match flow::on_syn(record, l4.data_seq(), unsafe { bpf_ktime_get_ns() }) {
        SynVerdict::Record(r) => {
            let _ = SYNS.insert(key, &r, 0);
        }
        SynVerdict::Resent => {}
        SynVerdict::Conflict => {
            count(counters::EVASION_SYN);
            return xdp_action::XDP_DROP;
        }
    }
    xdp_action::XDP_PASS
}

/// A SYN (with data or without) on the addresses and ports of a blocked
/// flow. If its server end was closed (the `drop` action does so at the
/// block), `None`: the flow is forgotten and the SYN starts afresh. If not
/// (the `reset` action answers the client only), the server may still hold
/// the connection open, waiting for the rest of a hello or request:
/// forgetting the flow would let a client forge a SYN and then resend what
/// was dropped. So the SYN goes on as a RST at the sequence number the
/// server expects, which closes that end, and the flow is forgotten; the
/// client's next SYN (1 s later) starts afresh. (A SYN with data, TCP Fast
/// Open, is otherwise its connection's first segment, read as such by the
/// stream stages.)
#[inline(always)]
pub fn blocked_syn(pkt: &XdpPacket, key: &FlowKey) -> Option<u32> {
    let flow = FLOWS.get_ptr(key)?;
    // SAFETY: the flow's map value.
    reset_open(pkt, unsafe { &*flow }, key)
}

/// `blocked_syn` for the flow found: the RST to its server's open end.
#[inline(always)]
fn reset_open(pkt: &XdpPacket, flow: &Flow, key: &FlowKey) -> Option<u32> {
    (flow.blocked() == (true, false)).then(|| to_reset(pkt, Toward::Server(flow.passed_seq()), key, true))
}

/// Where a data segment (`len` bytes at `seq`) of an untracked flow stands
/// to its connection's start. Early ones are counted. The record stays
/// until `started` (the HTTP stage hands a hello on to the TLS stage, which
/// looks again).
#[inline(always)]
pub fn start(key: &FlowKey, seq: u32, len: usize) -> Start {
    // SAFETY: a value of the map, copied out.
    let expect = SYNS.get_ptr(key).map(|e| unsafe { core::ptr::read_volatile(e) }.seq);
    let start = start_of(expect, seq, len as u32);
    if start == Start::Early {
        count(counters::TCP_EARLY);
    }
    start
}

/// The connection's first data segment was taken (read, or passed unread):
/// its start is no longer needed.
#[inline(always)]
pub fn started(key: &FlowKey, start: Start) {
    if let Start::First { .. } = start {
        let _ = SYNS.remove(key);
    }
}

/// The tamper checks of a segment (payload `off..end` at `seq`, TCP header
/// at `tcp`, flags `flags`) of a TLS or HTTP flow being read or watched,
/// once per segment (`first_round`; not again in the rounds that go on
/// with it): fake segments and urgent bytes (`fake_signs`; not looked at on
/// a watched flow, whose reading is over), then, if the segment covers name
/// bytes read, their compare (`rewrite`, a stage of its own: in the stream
/// stage the compare's loop multiplied the parser's states past the
/// verifier's budget), which comes back to the stream stage in a later
/// round. Returns the verdict if the segment ends here (see `tamper`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn check(pkt: &XdpPacket, flow: &mut Flow, key: &FlowKey, flags: u8, tcp: usize, off: usize, end: usize, seq: u32, first_round: bool) -> Option<u32> {
    if !first_round {
        return None;
    }
    let signs = if flow.watched() { 0 } else { fake_signs(pkt, flags, tcp, off, end) };
    // Through a map, so that the paths through the option walk rejoin.
    let signs = Maps::opaque(signs as usize) as u32;
    if signs != 0 {
        return tamper(pkt, flow, key, signs);
    }
    if flow.overlaps_name(seq, end.saturating_sub(off) as u32) {
        // SAFETY: the slot holds the compare stage.
        unsafe { STAGES.tail_call(pkt.ctx, STAGE_REWRITE) };
    }
    None
}

/// The compare stage (`blokir_rewrite`): a segment of a TLS or HTTP flow
/// that covers name bytes its parser read, compared with them
/// (`flow::rewritten`). A copy that differs is tampering (see `tamper`);
/// otherwise, or if counted only, the segment goes back to its stream
/// stage in a later round (`rounds` 1: the checks are not made again).
#[inline(always)]
pub fn rewrite(pkt: &XdpPacket) -> u32 {
    let Ok(l3) = parse_l3(pkt) else { return xdp_action::XDP_PASS };
    let Ok(l4) = parse_tcp(pkt, &l3) else { return xdp_action::XDP_PASS };
    let Some(key) = FlowKey::of(pkt, &l3, &l4) else { return xdp_action::XDP_PASS };
    let Some(flow) = FLOWS.get_ptr_mut(&key) else { return xdp_action::XDP_PASS };
    // SAFETY: the flow's map value (see the TLS stage).
    let flow = unsafe { &mut *flow };
    let (off, end) = (Maps::opaque(l4.payload_off), Maps::opaque(l4.payload_end));
    if flow.rewritten(pkt, l4.data_seq(), off, end) {
        flow.passed_back_to(l4.data_seq());
        if let Some(verdict) = tamper(pkt, flow, &key, sign::REWRITE) {
            return verdict;
        }
    }
    flow.set_rounds(1);
    let stage = if flow.kind() == KIND_HTTP { STAGE_HTTP } else { STAGE_TLS };
    // SAFETY: the slots hold the stream stages.
    unsafe { STAGES.tail_call(pkt.ctx, stage) };
    flow.set_rounds(0);
    xdp_action::XDP_PASS
}

/// A segment bearing `signs` (`flow::sign`, not 0) on a flow being read or
/// watched, under the tamper policy: the flow is blocked, its server end
/// closed as for a listed name; or the segment, which the receiver
/// discards, passes unread; or the flow is forgotten and the segment
/// passes; or (a rewrite under `pass`) it is counted and handled as any
/// other (`None`). A segment that ends here is never read: a path that
/// went on to the parser would have the verifier walk the parser once more.
#[inline(always)]
fn tamper(pkt: &XdpPacket, flow: &mut Flow, key: &FlowKey, signs: u32) -> Option<u32> {
    let policy = CONFIG.get(0).map_or(TAMPER_BLOCK, |c| c.tamper_policy);
    Some(match flow::tamper(signs, policy) {
        Tamper::Block { counter } => {
            count(counter);
            flow.block(false);
            to_reset(pkt, Toward::Server(flow.passed_seq()), key, false)
        }
        Tamper::Skip { counter } => {
            count(counter);
            xdp_action::XDP_PASS
        }
        Tamper::Forget { counter } => {
            count(counter);
            let _ = FLOWS.remove(key);
            xdp_action::XDP_PASS
        }
        Tamper::Count { counter } => {
            count(counter);
            return None;
        }
    })
}

/// A connection's first data segment that does not start a hello or a
/// request but bears urgent data or lacks an ACK (`flow::suspect_first`):
/// its bytes are not what the receiver reads (an urgent byte before the
/// hello, ByeDPI's `--disoob`; a fake). Under `block` the flow is recorded
/// as blocked (a TLS flow, whatever the port: the stages treat it alike)
/// and the server's end closed by a RST made of the segment at the
/// connection's start (`at`), without the parser's path. Under `pass` it
/// passes unread (a segment without ACK leaves the start on record: the
/// receiver discards it).
#[inline(always)]
pub fn tamper_first(pkt: &XdpPacket, key: &FlowKey, start: Start, flags: u8, at: u32) -> u32 {
    let signs = if flags & TCP_URG != 0 { flow::sign::URGENT } else { flow::sign::NO_ACK };
    let policy = CONFIG.get(0).map_or(TAMPER_BLOCK, |c| c.tamper_policy);
    match flow::tamper(signs, policy) {
        Tamper::Block { counter } => {
            count(counter);
            started(key, start);
            if let Some(init) = FLOW_INIT.get_ptr_mut(0) {
                // SAFETY: per-CPU staging slot, written whole by `reset`.
                let init = unsafe { &mut *init };
                unsafe { init.hello.reset(at) };
                init.block(false);
                let _ = FLOWS.insert(key, init, 0);
            }
            to_reset(pkt, Toward::Server(at), key, false)
        }
        // (`Count` is for rewrites, which a first segment has none of.)
        Tamper::Skip { counter } | Tamper::Count { counter } => {
            count(counter);
            xdp_action::XDP_PASS
        }
        Tamper::Forget { counter } => {
            count(counter);
            started(key, start);
            xdp_action::XDP_PASS
        }
    }
}

/// Hands a segment of the blocked flow `key` to the answer stage to become
/// a RST (see `reset`); drops it if that is not reached.
#[inline(always)]
pub fn to_reset(pkt: &XdpPacket, to: Toward, key: &FlowKey, forget: bool) -> u32 {
    if let Some(job) = REPLY_JOB.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *job = ReplyJob::tcp_reset(to, *key, forget) };
        // SAFETY: the slot holds the answer stage.
        unsafe { STAGES.tail_call(pkt.ctx, STAGE_REPLY) };
    }
    count(counters::TCP_RESET_FAILED);
    xdp_action::XDP_DROP
}

/// The answer stage's half for TCP: the segment rewritten into a RST back
/// to the client (XDP_TX), or on to the server (XDP_PASS; the blocked flow
/// is then marked as closed there, or forgotten), or dropped if that cannot
/// be done.
#[inline(always)]
pub fn reset(pkt: &mut XdpPacket, to: Toward, key: &FlowKey, forget: bool) -> u32 {
    match build_reset(pkt, to, Maps::opaque) {
        Ok(()) if to == Toward::Client => {
            count(counters::TCP_RESETS);
            return xdp_action::XDP_TX;
        }
        Ok(()) => {
            count(counters::TCP_SERVER_RESETS);
            if forget {
                let _ = FLOWS.remove(key);
            } else if let Some(flow) = FLOWS.get_ptr_mut(key) {
                // SAFETY: the flow's map value.
                unsafe { (*flow).close_server() };
            }
            return xdp_action::XDP_PASS;
        }
        Err(NoReply::NotPlain) => count(counters::TCP_RESET_NOT_PLAIN),
        Err(_) => count(counters::TCP_RESET_FAILED),
    }
    xdp_action::XDP_DROP
}
