//! The HTTP stage: reads HTTP request Host names across TCP segments with
//! per-flow state (the TLS stage's flow map), and blocks the flow from the
//! segment that completes a listed name on. Reached for TCP payload to the
//! configured HTTP ports; a TLS ClientHello on such a port goes on to the
//! TLS stage.

use aya_ebpf::bindings::xdp_action;
use filter_common::{
    counters::{self, Proto},
    flow::{KIND_HTTP, KIND_TLS, Start, suspect_first},
    http::{MAX_ROUNDS, Progress, feed, resume, starts_request},
    inspect::Env as _,
    packet::{IPPROTO_TCP, parse_l3, parse_tcp},
    reset::Toward,
    rules::{STAGE_HTTP, STAGE_TLS},
    tls::{FlowKey, Resume, starts_hello},
};

use crate::{
    conn::{self, to_reset},
    maps::{CONFIG, FLOW_INIT, FLOWS, Maps, STAGES, count},
    packet::XdpPacket,
    tls::{finish, to_match},
};

#[inline(always)]
pub fn stream(pkt: &XdpPacket) -> u32 {
    let Ok(l3) = parse_l3(pkt) else { return xdp_action::XDP_PASS };
    if l3.proto != IPPROTO_TCP || l3.later_fragment {
        return xdp_action::XDP_PASS;
    }
    let Ok(l4) = parse_tcp(pkt, &l3) else { return xdp_action::XDP_PASS };
    let Some(key) = FlowKey::of(pkt, &l3, &l4) else { return xdp_action::XDP_PASS };
    // SYNs (with data: TCP Fast Open) are the TLS stage's.
    if l4.is_syn() {
        return to_tls(pkt);
    }
    let af = l3.af;
    // Stage boundary (see `Env::opaque`).
    let tcp = Maps::opaque(l3.l4_off);
    let flags = l4.flags;
    let off = Maps::opaque(l4.payload_off);
    let end = Maps::opaque(l4.payload_end);
    let seq = l4.data_seq();
    // Requests to the block page (the DNS `redirect` action's address) are
    // for listed names by design: they pass unread.
    if CONFIG.get(0).is_some_and(|c| c.is_block_page(key.family, &key.dst)) {
        return xdp_action::XDP_PASS;
    }
    let flow = match FLOWS.get_ptr_mut(&key) {
        Some(f) => f,
        None => {
            let start = conn::start(&key, seq, end.saturating_sub(off));
            let trim = match start {
                Start::Early => return xdp_action::XDP_DROP,
                Start::Stale => return xdp_action::XDP_PASS,
                Start::First { trim } => trim,
                Start::Unknown => 0,
            };
            let at = off + trim as usize;
            // The TLS stage looks at the start again, and takes it.
            if starts_hello(pkt, at, end) {
                return to_tls(pkt);
            }
            if !starts_request(pkt, at, end) {
                if suspect_first(start, flags) {
                    return conn::tamper_first(pkt, &key, start, flags, seq.wrapping_add(trim));
                }
                conn::started(&key, start);
                return xdp_action::XDP_PASS;
            }
            let Some(init) = FLOW_INIT.get_ptr_mut(0) else { return xdp_action::XDP_PASS };
            // SAFETY: per-CPU staging slot; `reset` writes the variant whole
            // but for the name bytes, which are written before read.
            let init = unsafe { &mut *init };
            unsafe { init.request.reset(seq.wrapping_add(trim)) };
            if FLOWS.insert(&key, init, 0).is_err() {
                return xdp_action::XDP_PASS;
            }
            conn::started(&key, start);
            match FLOWS.get_ptr_mut(&key) {
                Some(f) => f,
                None => return xdp_action::XDP_PASS,
            }
        }
    };
    // SAFETY: the LRU map's value for this flow (see the TLS stage).
    let flow = unsafe { &mut *flow };
    match flow.kind() {
        KIND_HTTP => {}
        KIND_TLS => return to_tls(pkt),
        _ => return xdp_action::XDP_PASS,
    }
    let first_round = {
        // SAFETY: the variant `kind` names.
        let req = unsafe { &flow.request };
        if req.is_blocked() {
            return if req.resets() { to_reset(pkt, Toward::Client, &key, false) } else { xdp_action::XDP_DROP };
        }
        req.rounds == 0
    };
    if let Some(verdict) = conn::check(pkt, flow, &key, flags, tcp, off, end, seq, first_round) {
        return verdict;
    }
    // The name passed and the head was read: only watched (above), but a
    // segment that starts a request (the next one on the connection) is
    // read afresh, as on a flow forgotten.
    if flow.watched() {
        if !starts_request(pkt, off, end) {
            // The compare stage's round ends with the segment: the next
            // one is checked afresh.
            flow.request.rounds = 0;
            return xdp_action::XDP_PASS;
        }
        // SAFETY: the variant `kind` names.
        unsafe { flow.request.reset(seq) };
        // Counted as one round spent (the compare stage's, when it came
        // through it: the tail calls' budget), whether or not it did: a
        // branch here took the TLS stage past the verifier's budget.
        flow.request.rounds = 1;
    }
    // SAFETY: the variant `kind` names.
    let req = unsafe { &mut flow.request };
    let start = match resume(req, seq, off, end) {
        Resume::At(start) => start,
        Resume::Behind => {
            req.rounds = 0;
            return xdp_action::XDP_PASS;
        }
        Resume::Ahead => {
            req.rounds = 0;
            count(counters::HTTP_OUT_OF_ORDER);
            return xdp_action::XDP_DROP;
        }
    };
    let progress = feed(req, pkt, start, end);
    if progress == Progress::StepsExhausted {
        // Go on with this segment in a fresh round (see the TLS stage); out
        // of rounds, the flow is blocked below.
        let rounds = req.rounds + 1;
        req.rounds = rounds;
        if (rounds as usize) < MAX_ROUNDS {
            // SAFETY: the slot holds this program.
            unsafe { STAGES.tail_call(pkt.ctx, STAGE_HTTP) };
        }
    }
    req.rounds = 0;
    match progress {
        Progress::NeedMore => {
            req.passed_seq = req.next_seq;
            xdp_action::XDP_PASS
        }
        Progress::Name(len) => {
            if to_match(pkt, |buf| req.copy_name(buf), &key, len, af, Proto::Http, false) {
                return xdp_action::XDP_PASS;
            }
            count(counters::HTTP_TOO_LONG);
            req.block(false);
            xdp_action::XDP_DROP
        }
        Progress::NoHost => finish(&key, counters::HTTP_NO_HOST),
        Progress::BadHost => finish(&key, counters::HTTP_BAD_HOST),
        Progress::NotRequest => finish(&key, counters::HTTP_NOT_REQUEST),
        // The head ended after a name that passed: the flow is watched.
        Progress::End => {
            req.watch();
            xdp_action::XDP_PASS
        }
        Progress::HostRepeat => {
            count(counters::EVASION_HOST_REPEAT);
            req.block(false);
            to_reset(pkt, Toward::Server(req.passed_seq), &key, false)
        }
        Progress::TooLong | Progress::StepsExhausted => {
            count(counters::HTTP_TOO_LONG);
            req.block(false);
            to_reset(pkt, Toward::Server(req.passed_seq), &key, false)
        }
    }
}

/// A TLS flow on an HTTP port: the TLS stage reads it.
#[inline(always)]
fn to_tls(pkt: &XdpPacket) -> u32 {
    // SAFETY: the slot holds the TLS stage.
    unsafe { STAGES.tail_call(pkt.ctx, STAGE_TLS) };
    xdp_action::XDP_PASS
}
