//! The DNS stage's verdict, and the answer stage.

use aya_ebpf::bindings::xdp_action;
use filter_common::{
    counters::{self, Outcome, Proto},
    inspect::{Env as _, Inspection},
    name::{Decision, canon_start},
    reply::{DnsAction, NoReply, QueryAt, build_reply},
    rules::{LIST_ACTION_MASK, STAGE_REPLY},
};

use crate::{
    maps::{CONFIG, LIST_ACTIONS, Maps, REPLY_JOB, ReplyJob, STAGES, block_event, count, hit},
    packet::XdpPacket,
};

/// Counts what the inspection found and turns it into the XDP verdict.
#[inline(always)]
pub fn account(pkt: &mut XdpPacket, inspection: &Inspection) -> u32 {
    match *inspection {
        Inspection::Other => xdp_action::XDP_PASS,
        // Decided by the entry program; not a DNS stage outcome.
        Inspection::TcpPayload | Inspection::Quic { .. } | Inspection::FirstFragment { .. } => xdp_action::XDP_PASS,
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
                // ECH-outer rules apply to ClientHellos only.
                Decision::Block(rule) if crate::tls::is_ech_outer(rule) => xdp_action::XDP_PASS,
                Decision::Block(rule) => {
                    count(counters::proto_index(proto, af, Outcome::Blocked));
                    hit(rule, counters::LIST_BLOCKED);
                    block_event(proto, af, rule, name_start(&at));
                    // Only UDP queries reach this stage (TCP/53 is the
                    // `dns_tcp` stage's, which drops them).
                    let action = match proto {
                        Proto::DnsUdp => LIST_ACTIONS.get(rule.list()).map_or(DnsAction::Drop, |a| DnsAction::from_u32(*a & LIST_ACTION_MASK)),
                        Proto::DnsTcp | Proto::Tls | Proto::Http | Proto::Quic => DnsAction::Drop,
                    };
                    if action == DnsAction::Drop {
                        count(counters::action_index(DnsAction::Drop));
                        return xdp_action::XDP_DROP;
                    }
                    to_reply(pkt, &at, action)
                }
            }
        }
    }
}

/// Where the question's name starts in `SCRATCH`: its canonical form is the
/// wire name (from the header's end to QTYPE) less its root byte.
#[inline(always)]
fn name_start(at: &QueryAt) -> usize {
    let wire = at.question_end.wrapping_sub(at.msg_off + 12 + 4);
    canon_start(wire.wrapping_sub(1))
}

/// Hands a blocked query to the answer stage.
#[inline(always)]
fn to_reply(pkt: &XdpPacket, at: &QueryAt, action: DnsAction) -> u32 {
    if let Some(job) = REPLY_JOB.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *job = ReplyJob::new(at, action) };
        // SAFETY: the slot holds the answer stage.
        unsafe { STAGES.tail_call(pkt.ctx, STAGE_REPLY) };
    }
    // The stage is not there: drop.
    count(counters::REPLY_FAILED);
    count(counters::action_index(DnsAction::Drop));
    xdp_action::XDP_DROP
}

/// The answer stage: rewrites the blocked query into its answer, or a TCP
/// segment into a RST (`conn::reset`), or drops it.
#[inline(always)]
pub fn reply(pkt: &mut XdpPacket) -> u32 {
    let (Some(job), Some(cfg)) = (REPLY_JOB.get(0), CONFIG.get(0)) else { return xdp_action::XDP_DROP };
    if let Some((to, forget)) = job.reset_toward() {
        return crate::conn::reset(pkt, to, &job.flow, forget);
    }
    let (at, action) = job.get();
    match build_reply(pkt, &at, action, cfg, Maps::opaque) {
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
