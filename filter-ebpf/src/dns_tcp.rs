//! The DNS-over-TCP stage: reads every query of a TCP/53 connection across
//! segments (`filter_common::dns_tcp`), and hands each question to the
//! match stage. A segment that completes a listed question is dropped, as
//! a whole-segment query always was; the connection's reader then stays
//! where it was, so the client's retransmission of that segment is read
//! (and dropped) again, and nothing after it reaches the server in order.
//!
//! The reader works on a per-CPU copy (`DNS_WORK`) for the whole segment,
//! across its rounds (one per question: this stage, then the match stage,
//! then back here for the rest of the segment), and is written back to
//! `FLOWS` only when the segment passes. Between messages the connection
//! needs no buffer: only where its next message starts, kept in `SYNS`
//! like a connection's start.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns};
use filter_common::{
    counters::{self, Outcome, Proto},
    dns::{DnsSkip, parse_query},
    dns_tcp::{BUF_LEN, Progress, feed, resume},
    flow::{Flow, KIND_DNS, SynRecord},
    inspect::{Env as _, OPAQUE_LIMIT},
    packet::{Af, IPPROTO_TCP, parse_l3, parse_tcp},
    reply::DnsAction,
    rules::{STAGE_DNS_TCP_QUESTION, STAGE_DNS_TCP_READ},
    tls::{FlowKey, Resume},
};

use crate::{
    maps::{DNS_TCP_JOB, DNS_WORK, DnsTcpJob, FLOWS, Maps, OPAQUE, SCRATCH, STAGES, SYNS, count},
    packet::XdpPacket,
    tls::to_match,
};

/// The header half: reads the segment's layers and hands the flow and
/// payload on through `DNS_TCP_JOB`. The reading half's loops would
/// otherwise be verified once per header layout (VLANs, IPv6 extension
/// headers), which the 6.1 verifier refuses as too large.
#[inline(always)]
pub fn headers(pkt: &XdpPacket) -> u32 {
    let Ok(l3) = parse_l3(pkt) else { return xdp_action::XDP_PASS };
    if l3.proto != IPPROTO_TCP || l3.later_fragment {
        return xdp_action::XDP_PASS;
    }
    let Ok(l4) = parse_tcp(pkt, &l3) else { return xdp_action::XDP_PASS };
    let Some(key) = FlowKey::of(pkt, &l3, &l4) else { return xdp_action::XDP_PASS };
    let Some(job) = DNS_TCP_JOB.get_ptr_mut(0) else { return xdp_action::XDP_PASS };
    // SAFETY: per-CPU slot.
    unsafe {
        *job = DnsTcpJob {
            flow: key,
            seq: l4.data_seq(),
            v6: (l3.af == Af::V6) as u32,
            off: Maps::opaque(l4.payload_off) as u32,
            end: Maps::opaque(l4.payload_end) as u32,
        };
        // SAFETY: the slot holds the reading half.
        STAGES.tail_call(pkt.ctx, STAGE_DNS_TCP_READ);
    }
    xdp_action::XDP_PASS
}

/// The reading half, for the segment `DNS_TCP_JOB` describes; also each
/// later round of the segment.
#[inline(always)]
pub fn stream(pkt: &XdpPacket) -> u32 {
    let Some(job) = DNS_TCP_JOB.get(0) else { return xdp_action::XDP_PASS };
    let key = job.flow;
    let af = if job.v6 == 0 { Af::V4 } else { Af::V6 };
    // Stage boundary (see `Env::opaque`).
    let off = Maps::opaque(job.off as usize);
    let end = Maps::opaque(job.end as usize);
    let seq = job.seq;
    let Some(work) = DNS_WORK.get_ptr_mut(0) else { return xdp_action::XDP_PASS };
    // SAFETY: per-CPU slot, this packet's for the whole tail-call chain.
    let work = unsafe { &mut *work };
    // SAFETY: the slot holds the DNS variant: written so below, and only
    // ever so.
    let rounds = unsafe { work.query.rounds };
    if rounds == 0 {
        // A new segment: the connection's reader, or a new one where its
        // next message starts (its SYN's record, or the end of the last
        // message); with neither (a connection picked up mid-stream, or
        // its record evicted), this segment starts a message.
        match FLOWS.get_ptr(&key) {
            Some(f) => {
                // SAFETY: the flow's map value.
                let f = unsafe { &*f };
                if f.kind() != KIND_DNS {
                    return xdp_action::XDP_PASS;
                }
                *work = *f;
            }
            None => {
                // SAFETY: a value of the map, copied out.
                let at = SYNS.get_ptr(&key).map_or(seq, |e| unsafe { core::ptr::read_volatile(e) }.seq);
                // SAFETY: the DNS variant, written whole but for the buffer,
                // which is written before it is read.
                unsafe { work.query.reset(at) };
            }
        }
    }
    // SAFETY: as above.
    let q = unsafe { &mut work.query };
    let start = match resume(q, seq, off, end) {
        Resume::At(start) => start,
        // A later round, the segment read to its end.
        Resume::Behind if rounds != 0 => return commit(&key, work, af),
        // Already read (a retransmission): the server has it, or drops it.
        Resume::Behind => return xdp_action::XDP_PASS,
        // Bytes the reader has not reached (reordered, or sent out of order
        // on purpose): the client resends them in order.
        Resume::Ahead => {
            q.rounds = 0;
            count(counters::DNS_TCP_OUT_OF_ORDER);
            return xdp_action::XDP_DROP;
        }
    };
    let msg_end = match feed(q, pkt, start, end) {
        Progress::Question { end } => end,
        Progress::NeedMore => return commit(&key, work, af),
        Progress::Unreadable => return too_many(),
        Progress::StepsExhausted => {
            q.rounds = rounds + 1;
            return next(pkt);
        }
    };
    q.rounds = rounds + 1;
    q.cursor_end = msg_end as u32;
    // SAFETY: the slot holds the question program.
    unsafe { STAGES.tail_call(pkt.ctx, STAGE_DNS_TCP_QUESTION) };
    too_many()
}

/// The question the reading half completed (in `DNS_WORK`), read in a
/// program of its own: after the reader's loop, the 6.1 verifier walked
/// the name's loop once per way out of it.
///
/// Nothing branchy is live across the name's loop, as 6.1 walks the loop
/// once per distinct state entering it: the end is masked rather than
/// `opaque` (whose fallback path would enter with other bounds), and the
/// flow and its family are read after the loop, not before. The name's
/// length goes through `OPAQUE` as `Env::opaque` does, but with the slot
/// looked up once, before the loop: `Maps::opaque`'s fallback for a failed
/// lookup keeps the length known, and the code after the loop was then
/// walked once per length.
#[inline(always)]
pub fn question(pkt: &XdpPacket) -> u32 {
    let (Some(work), Some(buf), Some(hold)) = (DNS_WORK.get_ptr_mut(0), SCRATCH.get_ptr_mut(0), OPAQUE.get_ptr_mut(0)) else { return too_many() };
    // SAFETY: per-CPU slot; volatile so the compiler keeps the round trip.
    let opaque = |x: usize| unsafe {
        core::ptr::write_volatile(hold, x.min(OPAQUE_LIMIT - 1) as u64);
        core::ptr::read_volatile(hold) as usize & (OPAQUE_LIMIT - 1)
    };
    // SAFETY: per-CPU slots; the DNS variant.
    let (q, buf) = unsafe { (&mut (*work).query, &mut *buf) };
    // The end is at most `READ_CAP`, below `BUF_LEN`: the mask changes
    // nothing but gives every path one bound. Volatile, so that the
    // compiler does not carry what it knows of the field.
    // SAFETY: a plain field of the slot.
    let msg_end = unsafe { core::ptr::read_volatile(&q.cursor_end) } as usize & (BUF_LEN - 1);
    match parse_query(&q.buf[..], 2, msg_end, buf, opaque) {
        Ok(question) => {
            let Some(job) = DNS_TCP_JOB.get(0) else { return too_many() };
            let af = if job.v6 == 0 { Af::V4 } else { Af::V6 };
            // The name is in `SCRATCH` already.
            let _ = to_match(pkt, |_| {}, &job.flow, question.canon_len, af, Proto::DnsTcp, false);
            too_many()
        }
        // A response or another opcode: not a query to filter.
        Err(DnsSkip::NotQuery) => next(pkt),
        // As a whole-segment query always was: counted, passed.
        Err(DnsSkip::Malformed(m)) => {
            count(counters::malformed_index(m));
            next(pkt)
        }
    }
}

/// Goes on with the rest of the segment in a new round (from the match
/// stage, after a question that passed).
#[inline(always)]
pub fn next(pkt: &XdpPacket) -> u32 {
    // SAFETY: the slot holds the reading half.
    unsafe { STAGES.tail_call(pkt.ctx, STAGE_DNS_TCP_READ) };
    too_many()
}

/// A listed question (the match stage counted it): the segment is dropped
/// and the reader stays where it was, as a whole-segment query was.
#[inline(always)]
pub fn blocked() -> u32 {
    count(counters::action_index(DnsAction::Drop));
    end_segment();
    xdp_action::XDP_DROP
}

/// More questions in one segment than the tail-call chain has rounds for
/// (about 15), or a question past the bytes the kernel reads into a packet
/// (jumbo frames): dropped, the reader unchanged (fail closed).
#[inline(always)]
fn too_many() -> u32 {
    count(counters::DNS_TCP_TOO_MANY);
    end_segment();
    xdp_action::XDP_DROP
}

#[inline(always)]
fn end_segment() {
    if let Some(work) = DNS_WORK.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { (*work).query.rounds = 0 };
    }
}

/// The segment passes: the reader is kept, in `FLOWS` with a message under
/// way (counted as incomplete), or in `SYNS` as where the next one starts.
#[inline(always)]
fn commit(key: &FlowKey, work: &mut Flow, af: Af) -> u32 {
    // SAFETY: the DNS variant.
    let q = unsafe { &mut work.query };
    q.rounds = 0;
    q.passed_seq = q.next_seq;
    if q.between() {
        let next = q.next_seq;
        let _ = FLOWS.remove(key);
        // SAFETY: a helper without arguments.
        let _ = SYNS.insert(key, &SynRecord::new(next, unsafe { bpf_ktime_get_ns() }), 0);
    } else {
        count(counters::proto_index(Proto::DnsTcp, af, Outcome::Incomplete));
        let _ = FLOWS.insert(key, work, 0);
    }
    xdp_action::XDP_PASS
}
