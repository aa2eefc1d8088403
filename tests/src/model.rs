//! A host model of the kernel's programs, built on the same shared code:
//! the entry program (`inspect` and its counting), the stream stages (the
//! per-flow ClientHello and HTTP request parsers, with their tail-call
//! rounds) and the match stage. Fed the same packets as the real object, it must give the same
//! verdicts and move the same counters (katran's BpfTester, inverted: the
//! model is the specification of the glue).

use std::collections::HashMap;

use filter_common::{
    counters::{self, Outcome, Proto},
    http::{self, Request, starts_request},
    inspect::{Inspection, inspect},
    name::{CanonBuf, Decision, canon_start, match_canon},
    packet::{Af, IPPROTO_TCP, parse_l3, parse_tcp},
    rules::Config,
    tls::{FlowKey, Hello, MAX_ROUNDS, Progress, Resume, feed, resume, starts_hello},
};

use crate::{HostEnv, Loaded, XDP_DROP, XDP_PASS};

/// The flow table (the kernel's LRU map, without eviction: tests stay far
/// below its capacity).
#[derive(Default)]
pub struct Model {
    flows: HashMap<FlowKey, Box<Hello>>,
    requests: HashMap<FlowKey, Box<Request>>,
}

impl Model {
    /// The verdict for `packet` and the counters it moves (besides
    /// `PACKETS`), with every list's DNS action `drop` (see `counted`).
    pub fn run(&mut self, l: &Loaded, packet: &[u8]) -> (u32, Vec<u32>) {
        let mut env = HostEnv { buf: CanonBuf::default(), cfg: l.kernel.config(), nodes: l.engine.nodes() };
        let inspection = inspect(packet, &mut env);
        match inspection {
            Inspection::TcpPayload => {
                let http_port = parse_l3(packet).ok().and_then(|l3| parse_tcp(packet, &l3).ok()).is_some_and(|l4| env.cfg.is_http_port(l4.dst_port));
                if http_port { self.http(l, &env.cfg, packet) } else { self.stream(l, packet) }
            }
            other => (if other.blocks() { XDP_DROP } else { XDP_PASS }, crate::counted(&other)),
        }
    }

    /// The HTTP stage: a TLS flow on an HTTP port goes on to the TLS stage.
    fn http(&mut self, l: &Loaded, cfg: &Config, p: &[u8]) -> (u32, Vec<u32>) {
        let Ok(l3) = parse_l3(p) else { return (XDP_PASS, vec![]) };
        let Ok(l4) = parse_tcp(p, &l3) else { return (XDP_PASS, vec![]) };
        let Some(key) = FlowKey::of(p, &l3, &l4) else { return (XDP_PASS, vec![]) };
        let (off, end) = (l4.payload_off, l4.payload_end);
        if cfg.is_block_page(key.family, &key.dst) {
            return (XDP_PASS, vec![]);
        }
        if self.flows.contains_key(&key) || (!self.requests.contains_key(&key) && starts_hello(p, off, end)) {
            return self.stream(l, p);
        }
        let req = match self.requests.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) if starts_request(p, off, end) => e.insert(Box::new(Request::new(l4.seq))),
            std::collections::hash_map::Entry::Vacant(_) => return (XDP_PASS, vec![]),
        };
        if req.is_blocked() {
            return (XDP_DROP, vec![]);
        }
        let mut progress = http::Progress::StepsExhausted;
        for _ in 0..http::MAX_ROUNDS {
            let start = match http::resume(req, l4.seq, off, end) {
                Resume::At(start) => start,
                Resume::Behind => return (XDP_PASS, vec![]),
                Resume::Ahead => return (XDP_DROP, vec![counters::HTTP_OUT_OF_ORDER]),
            };
            progress = http::feed(req, p, start, end);
            if progress != http::Progress::StepsExhausted {
                break;
            }
        }
        // The verdict, its counters, and whether the flow is kept.
        let (verdict, c, keep) = match progress {
            http::Progress::NeedMore => (XDP_PASS, vec![], true),
            http::Progress::NoHost => (XDP_PASS, vec![counters::HTTP_NO_HOST], false),
            http::Progress::BadHost => (XDP_PASS, vec![counters::HTTP_BAD_HOST], false),
            http::Progress::NotRequest => (XDP_PASS, vec![counters::HTTP_NOT_REQUEST], false),
            http::Progress::TooLong | http::Progress::StepsExhausted => {
                req.block();
                (XDP_DROP, vec![counters::HTTP_TOO_LONG], true)
            }
            http::Progress::Name(len) => {
                let mut buf = CanonBuf::default();
                req.copy_name(&mut buf);
                let (verdict, c, blocked) = matched(l, cfg, &mut buf, len, Proto::Http, l3.af);
                if blocked {
                    req.block();
                }
                (verdict, c, blocked)
            }
        };
        if !keep {
            self.requests.remove(&key);
        }
        (verdict, c)
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
                let (verdict, m, blocked) = matched(l, &l.kernel.config(), &mut buf, len, Proto::Tls, l3.af);
                c.extend(m);
                if blocked {
                    hello.block();
                } else {
                    self.flows.remove(&key);
                }
                (verdict, c)
            }
        }
    }
}

/// The match stage: the verdict, its counters, and whether the flow is
/// blocked.
fn matched(l: &Loaded, cfg: &Config, buf: &mut CanonBuf, len: usize, proto: Proto, af: Af) -> (u32, Vec<u32>, bool) {
    let mut c = vec![counters::proto_index(proto, af, Outcome::Inspected)];
    match match_canon(buf, canon_start(len), cfg, &l.engine.nodes()) {
        Decision::Block(_) => {
            c.push(counters::proto_index(proto, af, Outcome::Blocked));
            (XDP_DROP, c, true)
        }
        Decision::Allow(_) => {
            c.push(counters::proto_index(proto, af, Outcome::Allowed));
            (XDP_PASS, c, false)
        }
        Decision::NoMatch => (XDP_PASS, c, false),
    }
}
