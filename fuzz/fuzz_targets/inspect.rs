//! Arbitrary bytes as an Ethernet frame through the whole per-packet pipeline
//! (`inspect`), with a host rule map.
//!
//! Besides "never panics", every decision is checked against an independent
//! reading of the frame: `blokir_fuzz::locate` walks the headers over plain
//! slices, hickory-proto reads the question, and `reference_decision` applies
//! the documented rule semantics to hickory's (lowercased) labels.
//!
//! * Decided: the frame must hold a standard one-question query to port 53
//!   whose question hickory reads without compression, and the decision must
//!   be the reference decision. For a block, the name must be covered by a
//!   block rule and by no allow rule.
//!
//!   The question is read with hickory's own question decoder
//!   (`Query::read` after the 12-byte header), not only with
//!   `Message::from_vec`: the filter reads the header and the question and
//!   nothing after it, so a query whose answer/authority/additional sections
//!   are garbage (bad counts, a broken OPT record, trailing bytes) is still a
//!   query for that name, and a resolver would at most answer FORMERR; dropping
//!   it is fine. What is not acceptable is deciding on a question that is
//!   itself malformed (cut short, compressed, spilling past the message), so
//!   hickory's question decoder must accept it. When `Message::from_vec`
//!   does parse the message, its first question must be the same.
//! * Not decided: if the independent reading finds such a well-formed query,
//!   the filter has been bypassed: that is a failure too.
#![no_main]

use blokir_fuzz::{RULE_SET, covered, dirty, is_single_question_query, locate, reference_decision, reference_question};
use filter_common::{
    counters::Proto,
    dns::parse_query,
    dns_tcp::{self, READ_CAP},
    inspect::{Env, Inspection, inspect},
    name::{CanonBuf, Decision, canon_start, match_canon},
    packet::Af,
    rules::{Config, NameKey, NodeRules},
};
use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;

struct HostEnv<'a> {
    buf: &'a mut CanonBuf,
    cfg: &'a Config,
    rules: &'a HashMap<NameKey, NodeRules>,
}

impl Env for HostEnv<'_> {
    type Rules = HashMap<NameKey, NodeRules>;
    fn resources(&mut self) -> Option<(&mut CanonBuf, &Config, &Self::Rules)> {
        Some((&mut *self.buf, self.cfg, self.rules))
    }
}

fuzz_target!(|data: &[u8]| {
    let set = &*RULE_SET;
    let mut buf = Box::<CanonBuf>::default();
    dirty(&mut buf, data);
    let mut env = HostEnv { buf: &mut buf, cfg: &set.cfg, rules: &set.map };
    let result = inspect(data, &mut env);

    let found = locate(data).filter(|l| is_single_question_query(l.msg)).and_then(|l| Some((l, reference_question(l.msg)?)));
    let found = found.filter(|(_, q)| !q.compressed);

    match result {
        Inspection::Decided { proto, af, decision, at } => {
            let Some((loc, q)) = found else {
                panic!("decided {decision:?} but there is no well-formed uncompressed query: {:?}", locate(data));
            };
            // Where an answer would be written: the message the walker found.
            assert_eq!(at.msg_off, loc.msg.as_ptr() as usize - data.as_ptr() as usize, "message offset");
            assert!(at.question_end > at.msg_off + 12 && at.question_end <= at.msg_off + loc.msg.len(), "question end");
            assert_eq!(proto, if loc.tcp { Proto::DnsTcp } else { Proto::DnsUdp });
            assert_eq!(af, if loc.v6 { Af::V6 } else { Af::V4 });
            if let Ok(m) = Message::from_vec(loc.msg) {
                assert_eq!(m.queries().first(), Some(&q.query), "Message::from_vec reads another question");
            }
            let want = reference_decision(&q.labels);
            assert_eq!(decision, want, "name {:?}", q.query.name());
            if let Decision::Block(_) = decision {
                let (block, allow) = covered(&q.labels);
                assert!(block && !allow, "blocked {:?}: block rule {block}, allow rule {allow}", q.query.name());
            }
        }
        // TCP/53 goes to the DNS-over-TCP stage, which reads the segment as
        // the start of a stream: its first question must be the one read,
        // or the message not whole in the segment (the server cannot act
        // on it either; the reader goes on with the next segment).
        Inspection::TcpPayload if found.as_ref().is_some_and(|(l, _)| l.tcp) => {
            let (loc, q) = found.unwrap();
            let off = loc.msg.as_ptr() as usize - data.as_ptr() as usize;
            let announced = u16::from_be_bytes([data[off - 2], data[off - 1]]) as usize;
            let mut reader = Box::new(dns_tcp::Query::new(0));
            let mut progress = dns_tcp::feed(&mut reader, data, off - 2, off + loc.msg.len());
            // Rounds, as the kernel's tail calls.
            while progress == dns_tcp::Progress::StepsExhausted {
                let at = off - 2 + reader.next_seq as usize;
                progress = dns_tcp::feed(&mut reader, data, at, off + loc.msg.len());
            }
            match progress {
                dns_tcp::Progress::Question { end } => {
                    let mut buf = CanonBuf::default();
                    let read = parse_query(&reader.buf[..], 2, end, &mut buf, |x| x).expect("the reader's copy holds the question");
                    let decision = match_canon(&mut buf, canon_start(read.canon_len), &set.cfg, &set.map);
                    assert_eq!(decision, reference_decision(&q.labels), "name {:?} over TCP", q.query.name());
                }
                dns_tcp::Progress::StepsExhausted => unreachable!(),
                dns_tcp::Progress::Unreadable => panic!("a frame's bytes are all readable on the host"),
                dns_tcp::Progress::NeedMore => {
                    assert!(loc.msg.len() < announced.min(READ_CAP - 2), "a whole message unread: {:?}", q.query.name())
                }
            }
        }
        // A first IP fragment that may carry a query is dropped whole
        // (--fragments drop, the default): blocked, not a bypass.
        Inspection::FirstFragment { drop: true } => {}
        other => {
            if let Some((_, q)) = found {
                panic!("bypass: {other:?} for a well-formed query for {:?}", q.query.name());
            }
        }
    }
});
