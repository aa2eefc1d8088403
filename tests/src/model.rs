//! A host model of the kernel's programs, built on the same shared code:
//! the entry program (`inspect` and its counting), the stream stage (the
//! per-flow ClientHello parser, with its tail-call rounds) and the match
//! stage. Fed the same packets as the real object, it must give the same
//! verdicts and move the same counters (katran's BpfTester, inverted: the
//! model is the specification of the glue).

use std::collections::HashMap;

use filter_common::{
    counters::{self, Outcome, Proto},
    inspect::{Inspection, inspect},
    name::{CanonBuf, Decision, canon_start, match_canon},
    packet::{IPPROTO_TCP, parse_l3, parse_tcp},
    tls::{FlowKey, Hello, MAX_ROUNDS, Progress, Resume, feed, resume, starts_hello},
};

use crate::{HostEnv, Loaded, XDP_DROP, XDP_PASS};

/// The flow table (the kernel's LRU map, without eviction: tests stay far
/// below its capacity).
#[derive(Default)]
pub struct Model {
    flows: HashMap<FlowKey, Box<Hello>>,
}

impl Model {
    /// The verdict for `packet` and the counters it moves (besides
    /// `PACKETS`), with every list's DNS action `drop` (see `counted`).
    pub fn run(&mut self, l: &Loaded, packet: &[u8]) -> (u32, Vec<u32>) {
        let mut env = HostEnv { buf: CanonBuf::default(), cfg: l.engine.config(), nodes: l.engine.nodes() };
        let inspection = inspect(packet, &mut env);
        match inspection {
            Inspection::TcpPayload => self.stream(l, packet),
            other => (if other.blocks() { XDP_DROP } else { XDP_PASS }, crate::counted(&other)),
        }
    }

    fn stream(&mut self, l: &Loaded, p: &[u8]) -> (u32, Vec<u32>) {
        let Ok(l3) = parse_l3(p) else { return (XDP_PASS, vec![]) };
        if l3.proto != IPPROTO_TCP || l3.later_fragment {
            return (XDP_PASS, vec![]);
        }
        let Ok(l4) = parse_tcp(p, &l3) else { return (XDP_PASS, vec![]) };
        let Some(key) = FlowKey::of(p, &l3, &l4) else { return (XDP_PASS, vec![]) };
        let (off, end) = (l4.payload_off, l4.payload_end);
        let hello = match self.flows.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) if starts_hello(p, off, end) => e.insert(Box::new(Hello::new(l4.seq))),
            std::collections::hash_map::Entry::Vacant(_) => return (XDP_PASS, vec![]),
        };
        if hello.is_blocked() {
            return (XDP_DROP, vec![]);
        }
        let mut progress = Progress::StepsExhausted;
        for _ in 0..MAX_ROUNDS {
            let start = match resume(hello, l4.seq, off, end) {
                Resume::At(start) => start,
                Resume::Behind => return (XDP_PASS, vec![]),
                Resume::Ahead => return (XDP_DROP, vec![counters::TLS_OUT_OF_ORDER]),
            };
            progress = feed(hello, p, start, end);
            if progress != Progress::StepsExhausted {
                break;
            }
        }
        let mut c = vec![];
        if !matches!(progress, Progress::NeedMore | Progress::StepsExhausted) && hello.flags & Hello::FLAG_ECH != 0 {
            c.push(counters::TLS_ECH);
        }
        let finish = |flows: &mut HashMap<FlowKey, Box<Hello>>, mut c: Vec<u32>, counter: u32| {
            flows.remove(&key);
            c.push(counter);
            (XDP_PASS, c)
        };
        match progress {
            Progress::NeedMore => (XDP_PASS, c),
            Progress::StepsExhausted => {
                hello.block();
                c.push(counters::TLS_TOO_COMPLEX);
                (XDP_DROP, c)
            }
            Progress::NoName => finish(&mut self.flows, c, counters::TLS_NO_SNI),
            Progress::NotHello => finish(&mut self.flows, c, counters::TLS_NOT_HELLO),
            Progress::Name(len) => {
                let mut buf = CanonBuf::default();
                hello.copy_name(&mut buf);
                c.push(counters::proto_index(Proto::Tls, l3.af, Outcome::Inspected));
                match match_canon(&mut buf, canon_start(len), &l.engine.config(), &l.engine.nodes()) {
                    Decision::Block(_) => {
                        hello.block();
                        c.push(counters::proto_index(Proto::Tls, l3.af, Outcome::Blocked));
                        (XDP_DROP, c)
                    }
                    Decision::Allow(_) => {
                        c.push(counters::proto_index(Proto::Tls, l3.af, Outcome::Allowed));
                        self.flows.remove(&key);
                        (XDP_PASS, c)
                    }
                    Decision::NoMatch => {
                        self.flows.remove(&key);
                        (XDP_PASS, c)
                    }
                }
            }
        }
    }
}
