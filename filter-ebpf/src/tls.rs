//! The stream stage: reads TLS ClientHellos across TCP segments with
//! per-flow state, and blocks the flow from the segment that completes a
//! listed server name on.

use aya_ebpf::bindings::xdp_action;
use filter_common::{
    counters::{self, Outcome, Proto},
    flow::{KIND_HTTP, KIND_TLS, Start, suspect_first},
    inspect::Env as _,
    name::{CanonBuf, Decision, canon_start, match_canon},
    packet::{Af, IPPROTO_TCP, parse_l3, parse_tcp},
    reset::{LIST_TCP_RESET, Toward},
    rules::{LIST_ECH_OUTER, RuleRef},
    rules::{STAGE_MATCH, STAGE_TLS},
    tls::{FlowKey, Hello, MAX_ROUNDS, Progress, Resume, feed, name_so_far, resume, starts_hello},
};

use crate::{
    conn::{self, to_reset},
    maps::{CONFIG, FLOW_INIT, FLOWS, LIST_ACTIONS, MATCH_JOB, Maps, Rules, SCRATCH, STAGES, block_event, count, hit},
    packet::XdpPacket,
};

#[inline(always)]
pub fn stream(pkt: &XdpPacket) -> u32 {
    let Ok(l3) = parse_l3(pkt) else { return xdp_action::XDP_PASS };
    if l3.proto != IPPROTO_TCP || l3.later_fragment {
        return xdp_action::XDP_PASS;
    }
    let Ok(l4) = parse_tcp(pkt, &l3) else { return xdp_action::XDP_PASS };
    let Some(key) = FlowKey::of(pkt, &l3, &l4) else { return xdp_action::XDP_PASS };
    // A SYN with data (TCP Fast Open; the entry program takes the others).
    if l4.is_syn()
        && let Some(verdict) = conn::blocked_syn(pkt, &key)
    {
        return verdict;
    }
    let af = l3.af;
    // Stage boundary (see `Env::opaque`).
    let tcp = Maps::opaque(l3.l4_off);
    let flags = l4.flags;
    let off = Maps::opaque(l4.payload_off);
    let end = Maps::opaque(l4.payload_end);
    let seq = l4.data_seq();
    let flow = match FLOWS.get_ptr_mut(&key) {
        Some(h) => h,
        None => {
            let start = conn::start(&key, seq, end.saturating_sub(off));
            let trim = match start {
                Start::Early => return xdp_action::XDP_DROP,
                Start::Stale => return xdp_action::XDP_PASS,
                Start::First { trim } => trim,
                Start::Unknown => 0,
            };
            if !starts_hello(pkt, off + trim as usize, end) {
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
            unsafe { init.hello.reset(seq.wrapping_add(trim)) };
            if FLOWS.insert(&key, init, 0).is_err() {
                return xdp_action::XDP_PASS;
            }
            conn::started(&key, start);
            match FLOWS.get_ptr_mut(&key) {
                Some(h) => h,
                None => return xdp_action::XDP_PASS,
            }
        }
    };
    // SAFETY: the LRU map's value for this flow; one CPU handles a flow's
    // packets at a time (RSS), and a stale read only delays a verdict.
    let flow = unsafe { &mut *flow };
    // An HTTP flow (only if the HTTP ports changed under it): not ours.
    if flow.kind() != KIND_TLS {
        return xdp_action::XDP_PASS;
    }
    let first_round = {
        // SAFETY: the variant `kind` names.
        let hello = unsafe { &flow.hello };
        if hello.is_blocked() {
            return if hello.resets() { to_reset(pkt, Toward::Client, &key, false) } else { xdp_action::XDP_DROP };
        }
        hello.rounds == 0
    };
    if let Some(verdict) = conn::check(pkt, flow, &key, flags, tcp, off, end, seq, first_round) {
        return verdict;
    }
    // The name passed and the hello was read: only watched (above), but a
    // segment that starts a hello (TLS 1.3's second ClientHello, after a
    // HelloRetryRequest) is read afresh, as on a flow forgotten.
    if flow.watched() {
        if !starts_hello(pkt, off, end) {
            // The compare stage's round ends with the segment: the next
            // one is checked afresh.
            flow.hello.rounds = 0;
            return xdp_action::XDP_PASS;
        }
        // SAFETY: the variant `kind` names.
        unsafe { flow.hello.reset(seq) };
        // Counted as one round spent (the compare stage's, when it came
        // through it: the tail calls' budget), whether or not it did: a
        // branch here took the TLS stage past the verifier's budget.
        flow.hello.rounds = 1;
    }
    // SAFETY: the variant `kind` names.
    let hello = unsafe { &mut flow.hello };
    let start = match resume(hello, seq, off, end) {
        Resume::At(start) => start,
        // Already read (a retransmission).
        Resume::Behind => {
            hello.rounds = 0;
            return xdp_action::XDP_PASS;
        }
        // Bytes the parser has not reached: the client resends them once
        // the gap before them is filled, in order.
        Resume::Ahead => {
            hello.rounds = 0;
            count(counters::TLS_OUT_OF_ORDER);
            return xdp_action::XDP_DROP;
        }
    };
    // ECH is counted when the parser first meets it, wherever it sits.
    let had_ech = hello.has_ech();
    let mut progress = feed(hello, pkt, start, end);
    if !had_ech && hello.has_ech() {
        count(counters::TLS_ECH);
    }
    if progress == Progress::StepsExhausted {
        // Go on with this segment in a fresh round: the parser resumes at
        // `next_seq`. The last round leaves the chain's last call to the
        // match stage.
        let rounds = hello.rounds + 1;
        hello.rounds = rounds;
        if (rounds as usize) < MAX_ROUNDS {
            // SAFETY: the slot holds this program.
            unsafe { STAGES.tail_call(pkt.ctx, STAGE_TLS) };
        }
        // Out of rounds: a name read whole still gets its verdict (the walk
        // after it for ECH is cut short); without one the flow is blocked.
        match name_so_far(hello) {
            Some(len) => progress = Progress::Name(len),
            None => {
                count(counters::TLS_TOO_COMPLEX);
                hello.block(false);
                return to_reset(pkt, Toward::Server(hello.passed_seq), &key, false);
            }
        }
    }
    hello.rounds = 0;
    // An ECH-outer rule matched the name in an earlier segment: with ECH in
    // this one, the name goes to the match stage again, which blocks the
    // flow as its list says (and counts and logs it).
    if hello.flags & Hello::FLAG_ECH_PENDING != 0 && hello.has_ech() {
        hello.flags &= !Hello::FLAG_ECH_PENDING;
        let len = hello.canon_len();
        if to_match(pkt, |buf| hello.copy_name(buf), &key, len, af, Proto::Tls, true) {
            return xdp_action::XDP_PASS;
        }
        count(counters::TLS_TOO_COMPLEX);
        hello.block(false);
        return xdp_action::XDP_DROP;
    }
    match progress {
        Progress::NeedMore => {
            hello.passed_seq = hello.next_seq;
            xdp_action::XDP_PASS
        }
        // The hello ended after a name that passed: the flow is watched.
        Progress::End => {
            hello.watch();
            xdp_action::XDP_PASS
        }
        Progress::Name(len) => {
            if to_match(pkt, |buf| hello.copy_name(buf), &key, len, af, Proto::Tls, false) {
                return xdp_action::XDP_PASS;
            }
            count(counters::TLS_TOO_COMPLEX);
            hello.block(false);
            xdp_action::XDP_DROP
        }
        Progress::NoName => finish(&key, counters::TLS_NO_SNI),
        Progress::NotHello => finish(&key, counters::TLS_NOT_HELLO),
        Progress::StepsExhausted => xdp_action::XDP_DROP,
    }
}

/// Hands a finished name (`copy` writes it into the scratch buffer) to the
/// match stage; `again` if it was matched before (not counted as inspected
/// again). Returns only if that failed: `false` if the tail-call chain
/// was at its limit (which `MAX_ROUNDS` leaves room for), and the caller
/// fails closed; `true` if the per-CPU slots were missing (never: they are
/// arrays).
#[inline(always)]
pub fn to_match(pkt: &XdpPacket, copy: impl FnOnce(&mut CanonBuf), key: &FlowKey, len: usize, af: Af, proto: Proto, again: bool) -> bool {
    let (Some(buf), Some(job)) = (SCRATCH.get_ptr_mut(0), MATCH_JOB.get_ptr_mut(0)) else { return true };
    // SAFETY: per-CPU scratch and job slots.
    let (buf, job) = unsafe { (&mut *buf, &mut *job) };
    copy(buf);
    (job.flow, job.start, job.v6, job.proto, job.again) = (*key, canon_start(len) as u32, af as u32, proto as u32, again as u32);
    // SAFETY: the slot holds the match stage.
    unsafe { STAGES.tail_call(pkt.ctx, STAGE_MATCH) };
    false
}

/// The match stage: matches the name a stream stage (TLS, HTTP or DNS over
/// TCP) finished. A blocked flow keeps its state (so its later segments are
/// dropped, or answered with a RST); any other forgets it.
#[inline(always)]
pub fn decide(pkt: &XdpPacket) -> u32 {
    let (Some(buf), Some(job), Some(cfg)) = (SCRATCH.get_ptr_mut(0), MATCH_JOB.get(0), CONFIG.get(0)) else { return xdp_action::XDP_PASS };
    // SAFETY: per-CPU scratch.
    let buf = unsafe { &mut *buf };
    let key = job.flow;
    let af = if job.v6 == 0 { Af::V4 } else { Af::V6 };
    let decision = match_canon(buf, Maps::opaque(job.start as usize), cfg, &Rules);
    // The protocol too (three values: one state each through the matcher).
    let proto = MATCH_JOB.get(0).map_or(Proto::Tls, |j| Proto::from_stream(j.proto));
    // Read again after the matcher's loop (see `block_event` below): a
    // branch before it doubles the states the verifier walks.
    if MATCH_JOB.get(0).is_some_and(|j| j.again == 0) {
        count(counters::proto_index(proto, af, Outcome::Inspected));
    }
    match decision {
        Decision::Block(rule) if ech_outer_defers(rule, proto, &key) => passed(pkt, proto, &key),
        Decision::Block(rule) => {
            count(counters::proto_index(proto, af, Outcome::Blocked));
            hit(rule, counters::LIST_BLOCKED);
            // The job is read again here: keeping `job.start` live across the
            // matcher's loop doubles the states the verifier walks.
            if let Some(j) = MATCH_JOB.get(0) {
                block_event(proto, af, rule, j.start as usize);
            }
            if proto == Proto::DnsTcp {
                return crate::dns_tcp::blocked();
            }
            let reset = LIST_ACTIONS.get(rule.list()).is_some_and(|a| *a & LIST_TCP_RESET != 0);
            let Some(h) = FLOWS.get_ptr_mut(&key) else { return xdp_action::XDP_DROP };
            // SAFETY: the flow's map value.
            let h = unsafe { &mut *h };
            h.block(reset);
            // `reset`: the client is answered. `drop`: the segment goes on as
            // a RST that closes the server's end, so that nothing the
            // client sends later (a retransmission after the flow's state
            // is evicted, a forged SYN and a resend) finds it open.
            let to = if reset { Toward::Client } else { Toward::Server(h.passed_seq()) };
            to_reset(pkt, to, &key, false)
        }
        Decision::Allow(rule) => {
            count(counters::proto_index(proto, af, Outcome::Allowed));
            hit(rule, counters::LIST_ALLOWED);
            passed(pkt, proto, &key)
        }
        Decision::NoMatch => passed(pkt, proto, &key),
    }
}

/// Whether the rule is on an ECH-outer list (`--ech-outer-list`).
#[inline(always)]
pub fn is_ech_outer(rule: RuleRef) -> bool {
    LIST_ACTIONS.get(rule.list()).is_some_and(|a| *a & LIST_ECH_OUTER != 0)
}

/// Whether an ECH-outer rule does not block (yet): it applies to
/// ClientHellos only, and to those carrying ECH. If the rest of the hello is
/// still to come, the flow remembers the rule and the stream stage blocks it
/// if ECH shows up (see `stream`). A hello whose walk after the name was cut
/// short (`FLAG_CUT`) is blocked: ECH may hide in what was not read.
#[inline(always)]
fn ech_outer_defers(rule: RuleRef, proto: Proto, key: &FlowKey) -> bool {
    if !is_ech_outer(rule) {
        return false;
    }
    if proto != Proto::Tls {
        return true;
    }
    let Some(flow) = FLOWS.get_ptr_mut(key) else { return true };
    // SAFETY: the flow's map value.
    let flow = unsafe { &mut *flow };
    if flow.kind() != KIND_TLS {
        return true;
    }
    // SAFETY: the variant `kind` names.
    let hello = unsafe { &mut flow.hello };
    if hello.has_ech() || hello.flags & Hello::FLAG_CUT != 0 {
        count(counters::TLS_ECH_OUTER_BLOCKED);
        return false;
    }
    if !hello.ended() {
        hello.set(Hello::FLAG_ECH_PENDING);
    }
    true
}

/// A name that passed: a DNS-over-TCP segment is read on (its next
/// question); a TLS or HTTP flow is handled by `forget`.
#[inline(always)]
fn passed(pkt: &XdpPacket, proto: Proto, key: &FlowKey) -> u32 {
    if proto == Proto::DnsTcp {
        return crate::dns_tcp::next(pkt);
    }
    forget(key)
}

/// A name that passed: the flow is watched (see `Flow::watched`), or a
/// ClientHello whose end is still to come is walked on for ECH, and an
/// HTTP head for a second Host (the stream stage watches them at the end):
/// its segment passes.
#[inline(always)]
fn forget(key: &FlowKey) -> u32 {
    if let Some(f) = FLOWS.get_ptr_mut(key) {
        // SAFETY: the flow's map value; `hello` is read only for a TLS flow.
        let f = unsafe { &mut *f };
        if f.kind() == KIND_TLS && !unsafe { f.hello.ended() } {
            // SAFETY: as above.
            unsafe { f.hello.passed_seq = f.hello.next_seq };
            return xdp_action::XDP_PASS;
        }
        // An HTTP request is read on to the end of its head, for a second
        // Host header.
        // SAFETY: `request` is read only for an HTTP flow.
        if f.kind() == KIND_HTTP && !unsafe { f.request.ended() } {
            // SAFETY: as above.
            unsafe { f.request.passed_seq = f.request.next_seq };
            return xdp_action::XDP_PASS;
        }
        // Kept, watched for rewritten copies of the name (`conn::check`),
        // until evicted or the addresses and ports start a new connection.
        f.watch();
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
pub fn finish(key: &FlowKey, counter: u32) -> u32 {
    count(counter);
    let _ = FLOWS.remove(key);
    xdp_action::XDP_PASS
}
