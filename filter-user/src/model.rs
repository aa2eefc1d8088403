//! A host model of the kernel's programs, built on the same shared code:
//! the entry program (`inspect` and its counting), the stream stages (the
//! per-flow ClientHello and HTTP request parsers, with their tail-call
//! rounds) and the match stage. Fed the same packets as the real object, it must give the same
//! verdicts and move the same counters (katran's BpfTester, inverted: the
//! model is the specification of the glue). `blokir replay` uses it to name
//! what the kernel decided on: the name read and the rule that matched.
//!
//! With `--quic read` it is the QUIC stage and the daemon's reader together
//! (`quic`): the Initials the kernel hands up are read on the spot, and a
//! blocked flow is reported (`Step::quic_blocked`) for the caller to write
//! into the kernel's `QUIC_BLOCKED`, as the daemon does.

use std::{collections::HashMap, time::Instant};

use filter_common::{
    counters::{self, Outcome, Proto},
    dns::{DNS_PORT, DnsSkip, parse_query},
    dns_tcp::{self, Query},
    flow::{Start, SynRecord, SynVerdict, Tamper, name_overlap, on_syn, rewritten, sign, start_of, suspect_first, tamper},
    http::{self, Request, starts_request},
    inspect::{Classified, Env, Inspection, classify, inspect},
    name::{CanonBuf, Decision, canon_start, match_canon},
    packet::{Af, IPPROTO_TCP, L3, L4, fake_signs, parse_l3, parse_tcp, parse_udp},
    quic::{MAX_HANDED_UP, OVERLOAD_DROP, PER_FLOW_CAP, POLICY_READ},
    reply::{DnsAction, NoReply},
    reset::{TcpAction, Toward, build_reset},
    rules::{Config, MAX_LISTS, RuleRef},
    tls::{FlowKey, Hello, MAX_ROUNDS, Progress, Resume, feed, name_so_far, resume, starts_hello},
};

use crate::{
    quic::{
        Event, Reader,
        verdict::{Verdict, verdict},
    },
    rules::{Engine, engine::Nodes},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
/// Not an XDP action: how tests and `blokir replay` name a segment passed
/// on rewritten into a RST to its server (`XDP_PASS` with a new packet),
/// which blocks it as a drop would.
pub const PASS_AS_RST: u32 = 0x100 | XDP_PASS;

/// What the model made of one packet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub verdict: u32,
    /// The counters it moves, besides `PACKETS`.
    pub counted: Vec<u32>,
    /// The protocol and family whose name was read (or was to be read).
    pub proto: Option<(Proto, Af)>,
    /// The name read, dotted and lower-case.
    pub name: Option<String>,
    /// The rule that decided: a block rule, or an allow rule.
    pub rule: Option<RuleRef>,
    /// The packet as rewritten: sent back (`XDP_TX`, a TCP RST to the
    /// client) or passed on (`XDP_PASS`, a RST to the server).
    pub sent: Option<Vec<u8>>,
    /// A QUIC flow the daemon's reader blocked on this Initial (which
    /// passes): the caller writes it into `QUIC_BLOCKED`, as the daemon does,
    /// for the kernel to drop the flow's later datagrams.
    pub quic_blocked: Option<FlowKey>,
}

/// The flow table and the connection starts (the kernel's LRU maps,
/// without eviction: tests stay far below their capacity).
#[derive(Default)]
pub struct Model {
    /// The ECH-outer lists (`--ech-outer-list`), bit `list id`: the kernel
    /// reads them from `LIST_ACTIONS`.
    pub ech_outer: u128,
    flows: HashMap<FlowKey, Flow>,
    requests: HashMap<FlowKey, HttpFlow>,
    /// DNS-over-TCP readers with a message under way.
    queries: HashMap<FlowKey, Box<Query>>,
    /// Where the data of connections whose SYN was seen starts, until their
    /// first data segment.
    syns: HashMap<FlowKey, SynRecord>,
    /// Lists (by id) whose TCP action is `reset`.
    resets: std::collections::HashSet<u32>,
    quic: QuicFlows,
}

/// `--quic read`: the QUIC stage's maps and the daemon's reader.
#[derive(Default)]
struct QuicFlows {
    /// `QUIC_SEEN`: Initials handed up per flow.
    seen: HashMap<FlowKey, u32>,
    /// `QUIC_BLOCKED`, with the name and rule that blocked each flow.
    blocked: HashMap<FlowKey, (Option<String>, Option<RuleRef>)>,
    reader: Reader,
    /// Flows whose name matched an ECH-outer rule before ECH was seen.
    pending: HashMap<FlowKey, (Option<String>, RuleRef)>,
}

/// The name and rule that blocked a flow, for its later segments.
type Seen = Option<(Option<String>, Option<RuleRef>)>;

struct Flow {
    hello: Box<Hello>,
    seen: Seen,
}

struct HttpFlow {
    request: Box<Request>,
    seen: Seen,
}

impl Step {
    /// The verdict, with `PASS_AS_RST` for a segment passed on as a RST.
    pub fn fate(&self) -> u32 {
        if self.verdict == XDP_PASS && self.sent.is_some() { PASS_AS_RST } else { self.verdict }
    }
}

impl Model {
    /// The TCP action of list `id` (`drop` unless set).
    pub fn set_tcp_action(&mut self, id: u8, action: TcpAction) {
        debug_assert!(u32::from(id) < MAX_LISTS);
        match action {
            TcpAction::Reset => self.resets.insert(u32::from(id)),
            TcpAction::Drop => self.resets.remove(&u32::from(id)),
        };
    }

    /// The verdict for `packet` (`Step::fate`) and the counters it moves
    /// (besides `PACKETS`), with every list's DNS action `drop` (see `counted`),
    /// under the program's settings `cfg` (HTTP and TLS ports, block page,
    /// QUIC).
    pub fn run(&mut self, engine: &Engine, cfg: &Config, packet: &[u8]) -> (u32, Vec<u32>) {
        let step = self.step(engine, cfg, packet);
        (step.fate(), step.counted)
    }

    /// `run`, with what was read and which rule decided.
    pub fn step(&mut self, engine: &Engine, cfg: &Config, packet: &[u8]) -> Step {
        let mut env = HostEnv { buf: CanonBuf::default(), cfg: *cfg, nodes: engine.nodes() };
        let read_quic = cfg.is_configured() && cfg.quic_policy == POLICY_READ;
        match inspect(packet, &mut env) {
            Inspection::Quic { af, drop: false } if read_quic => self.quic(engine, cfg, packet, Some(af)),
            Inspection::Other if read_quic && matches!(classify(packet), Classified::QuicOther(_)) => self.quic(engine, cfg, packet, None),
            Inspection::TcpPayload => {
                let Ok(l3) = parse_l3(packet) else { return Step { verdict: XDP_PASS, ..Step::default() } };
                let Ok(l4) = parse_tcp(packet, &l3) else { return Step { verdict: XDP_PASS, ..Step::default() } };
                // The entry program's tail calls: TCP to ports that are
                // neither 53 nor HTTP nor TLS ports passes unread; payload
                // to 53 goes to the DNS-over-TCP stage, SYNs to the TLS
                // stage.
                let dns = l4.dst_port == DNS_PORT;
                if !dns && !cfg.is_http_port(l4.dst_port) && !cfg.is_tls_port(l4.dst_port) {
                    return Step { verdict: XDP_PASS, ..Step::default() };
                }
                if dns && l4.payload_off < l4.payload_end {
                    return self.dns_tcp(engine, cfg, packet);
                }
                if l4.is_syn()
                    && let Some(step) = self.syn(cfg, packet)
                {
                    return step;
                }
                if cfg.is_http_port(l4.dst_port) && !l4.is_syn() { self.http(engine, cfg, packet) } else { self.stream(engine, cfg, packet) }
            }
            other => {
                // ECH-outer rules apply to ClientHellos only.
                let other = match other {
                    Inspection::Decided { proto, af, decision: Decision::Block(rule), at } if self.is_ech_outer(rule) => {
                        let step = Step {
                            verdict: XDP_PASS,
                            counted: counted(&Inspection::Decided { proto, af, decision: Decision::NoMatch, at }),
                            ..Step::default()
                        };
                        return Step { proto: Some((proto, af)), name: Some(canon_to_dotted(&env.buf)), rule: Some(rule), ..step };
                    }
                    other => other,
                };
                let mut step = Step { verdict: if other.blocks() { XDP_DROP } else { XDP_PASS }, counted: counted(&other), ..Step::default() };
                match other {
                    Inspection::Decided { proto, af, decision, .. } => {
                        step.proto = Some((proto, af));
                        step.name = Some(canon_to_dotted(&env.buf));
                        step.rule = rule_of(decision);
                    }
                    Inspection::Quic { af, .. } => step.proto = Some((Proto::Quic, af)),
                    _ => {}
                }
                step
            }
        }
    }

    fn is_ech_outer(&self, rule: RuleRef) -> bool {
        (self.ech_outer >> rule.list()) & 1 != 0
    }

    /// The QUIC stage (`filter-ebpf/src/quic.rs`) for a datagram to UDP/443
    /// (`initial`: a client Initial, counted by the entry program), then the
    /// daemon's reader (`quic::handoff`) for an Initial handed up. The
    /// per-CPU budget is not modelled: a replay or a test hands up far fewer
    /// than 2,000 Initials per 10 ms.
    fn quic(&mut self, engine: &Engine, cfg: &Config, p: &[u8], initial: Option<Af>) -> Step {
        let mut step = Step { verdict: XDP_PASS, ..Step::default() };
        if let Some(af) = initial {
            step.counted.push(counters::proto_index(Proto::Quic, af, Outcome::Inspected));
            step.proto = Some((Proto::Quic, af));
        }
        let Ok(l3) = parse_l3(p) else { return step };
        let Ok(l4) = parse_udp(p, &l3) else { return step };
        let Some(key) = FlowKey::of(p, &l3, &l4) else { return step };
        if let Some((name, rule)) = self.quic.blocked.get(&key) {
            step.counted.push(counters::proto_index(Proto::Quic, l3.af, Outcome::Blocked));
            return Step { verdict: XDP_DROP, proto: Some((Proto::Quic, l3.af)), name: name.clone(), rule: *rule, ..step };
        }
        if initial.is_none() {
            return step;
        }
        let seen = self.quic.seen.entry(key).or_default();
        if *seen >= PER_FLOW_CAP {
            step.counted.push(counters::QUIC_OVER_CAP);
            if cfg.quic_overload == OVERLOAD_DROP {
                step.counted.push(counters::proto_index(Proto::Quic, l3.af, Outcome::Blocked));
                step.verdict = XDP_DROP;
            }
            return step;
        }
        *seen += 1;
        step.counted.push(counters::QUIC_HANDED_UP);
        // The daemon's side, on the frame as handed up.
        let frame = &p[..p.len().min(MAX_HANDED_UP as usize)];
        let Ok(l3) = parse_l3(frame) else { return step };
        let Ok(l4) = parse_udp(frame, &l3) else { return step };
        let ech_outer = self.ech_outer;
        let blocked = match self.quic.reader.datagram(key, &frame[l4.payload_off..l4.payload_end], Instant::now()) {
            Event::Name { mut canon, len, ech, ended } => {
                let decision = match_canon(&mut canon.0, canon_start(len), cfg, &engine.nodes());
                step.name = Some(canon_to_dotted(&canon.0));
                step.rule = rule_of(decision);
                match verdict(decision, ech, ended, |r| (ech_outer >> r.list()) & 1 != 0) {
                    Verdict::Block(_) => true,
                    Verdict::Pass(_) => false,
                    Verdict::WaitForEch(rule) => {
                        self.quic.pending.insert(key, (step.name.clone(), rule));
                        false
                    }
                }
            }
            Event::Ended { ech } => match self.quic.pending.remove(&key) {
                Some((name, rule)) if ech => {
                    (step.name, step.rule) = (name, Some(rule));
                    true
                }
                _ => false,
            },
            _ => false,
        };
        if blocked {
            self.quic.blocked.insert(key, (step.name.clone(), step.rule));
            step.quic_blocked = Some(key);
        }
        step
    }

    /// A client's SYN (`conn::syn` and `conn::blocked_syn` in the kernel):
    /// a blocked flow on its addresses and ports whose server end is still
    /// open has it closed by a RST made of the SYN, and is forgotten.
    /// Otherwise `None` for a SYN with data, read on as the first segment.
    /// One without on a TLS or HTTP flow being read is tampering; on a DNS
    /// reader, counted and passed; else other state is forgotten and the
    /// start of the connection's data recorded, or the SYN dropped if it
    /// conflicts with the one before (`flow::on_syn`).
    fn syn(&mut self, cfg: &Config, p: &[u8]) -> Option<Step> {
        let l3 = parse_l3(p).ok()?;
        let l4 = parse_tcp(p, &l3).ok()?;
        let key = FlowKey::of(p, &l3, &l4)?;
        let open = match (self.flows.get(&key), self.requests.get(&key)) {
            (Some(f), _) if f.hello.is_blocked() && !f.hello.server_closed() => Some(f.hello.passed_seq),
            (_, Some(r)) if r.request.is_blocked() && !r.request.server_closed() => Some(r.request.passed_seq),
            _ => None,
        };
        if let Some(seq) = open {
            let step = reset(p, Toward::Server(seq), Step::default());
            if step.verdict == XDP_PASS {
                self.flows.remove(&key);
                self.requests.remove(&key);
            }
            return Some(step);
        }
        if l4.payload_off < l4.payload_end {
            return None;
        }
        // A flow being read (`conn::syn`).
        let step = Step { verdict: XDP_PASS, ..Step::default() };
        let tampered = if let Some(f) = self.flows.get_mut(&key).filter(|f| !f.hello.watched() && !f.hello.is_blocked()) {
            Some(on_tamper(p, cfg, &mut *f.hello, sign::SYN, step.clone()))
        } else if let Some(r) = self.requests.get_mut(&key).filter(|r| !r.request.watched() && !r.request.is_blocked()) {
            Some(on_tamper(p, cfg, &mut *r.request, sign::SYN, step.clone()))
        } else if self.queries.contains_key(&key) {
            return Some(Step { counted: vec![counters::EVASION_SYN], ..step });
        } else {
            None
        };
        match tampered {
            Some(Checked::Forget(step)) => {
                self.flows.remove(&key);
                self.requests.remove(&key);
                return Some(step);
            }
            Some(Checked::Done(step) | Checked::Go(step, _)) => return Some(step),
            None => {}
        }
        self.flows.remove(&key);
        self.requests.remove(&key);
        self.queries.remove(&key);
        match on_syn(self.syns.get(&key).copied(), l4.data_seq(), now_ns()) {
            SynVerdict::Record(r) => {
                self.syns.insert(key, r);
            }
            SynVerdict::Resent => {}
            SynVerdict::Conflict => return Some(Step { verdict: XDP_DROP, counted: vec![counters::EVASION_SYN], ..step }),
        }
        Some(step)
    }

    /// A data segment of an untracked flow against its connection's start
    /// (`conn::start`): the drop of an early one, the pass of a stale one,
    /// or where it stands (the record stays until `started`).
    fn start(&self, key: &FlowKey, seq: u32, len: usize) -> Result<Start, Box<Step>> {
        match start_of(self.syns.get(key).map(|r| r.seq), seq, len as u32) {
            Start::Early => Err(Box::new(Step { verdict: XDP_DROP, counted: vec![counters::TCP_EARLY], ..Step::default() })),
            Start::Stale => Err(Box::new(Step { verdict: XDP_PASS, ..Step::default() })),
            start => Ok(start),
        }
    }

    /// `conn::started`.
    fn started(&mut self, key: &FlowKey, start: Start) {
        if let Start::First { .. } = start {
            self.syns.remove(key);
        }
    }

    /// `conn::tamper_first`: a suspect first segment that starts no flow.
    fn tamper_first(&mut self, p: &[u8], key: &FlowKey, start: Start, flags: u8, cfg: &Config, at: u32) -> Step {
        let signs = if flags & filter_common::packet::TCP_URG != 0 { filter_common::flow::sign::URGENT } else { filter_common::flow::sign::NO_ACK };
        match tamper(signs, cfg.tamper_policy) {
            Tamper::Block { counter } => {
                self.started(key, start);
                let mut hello = Box::new(Hello::new(at));
                hello.block(false);
                let step = block(p, false, at, Step { counted: vec![counter], ..Step::default() }, &mut hello.flags, Hello::FLAG_SERVER_CLOSED);
                self.requests.remove(key);
                self.flows.insert(*key, Flow { hello, seen: None });
                step
            }
            Tamper::Skip { counter } | Tamper::Count { counter } => Step { verdict: XDP_PASS, counted: vec![counter], ..Step::default() },
            Tamper::Forget { counter } => {
                self.started(key, start);
                Step { verdict: XDP_PASS, counted: vec![counter], ..Step::default() }
            }
        }
    }

    /// The HTTP stage: a TLS flow on an HTTP port goes on to the TLS stage;
    /// requests to the block page pass unread.
    fn http(&mut self, engine: &Engine, cfg: &Config, p: &[u8]) -> Step {
        let pass = Step { verdict: XDP_PASS, ..Step::default() };
        let Ok(l3) = parse_l3(p) else { return pass };
        let Ok(l4) = parse_tcp(p, &l3) else { return pass };
        let Some(key) = FlowKey::of(p, &l3, &l4) else { return pass };
        let (off, end) = (l4.payload_off, l4.payload_end);
        if cfg.is_block_page(key.family, &key.dst) {
            return pass;
        }
        let seq = l4.data_seq();
        if self.flows.contains_key(&key) {
            return self.stream(engine, cfg, p);
        }
        if !self.requests.contains_key(&key) {
            let start = match self.start(&key, seq, end.saturating_sub(off)) {
                Ok(start) => start,
                Err(step) => return *step,
            };
            let trim = match start {
                Start::First { trim } => trim,
                _ => 0,
            };
            let at = off + trim as usize;
            if starts_hello(p, at, end) {
                return self.stream(engine, cfg, p);
            }
            if !starts_request(p, at, end) {
                if suspect_first(start, l4.flags) {
                    return self.tamper_first(p, &key, start, l4.flags, cfg, seq.wrapping_add(trim));
                }
                self.started(&key, start);
                return pass;
            }
            self.requests.insert(key, HttpFlow { request: Box::new(Request::new(seq.wrapping_add(trim))), seen: None });
            self.started(&key, start);
        }
        let flow = self.requests.get_mut(&key).expect("tracked");
        let mut step = Step { proto: Some((Proto::Http, l3.af)), ..pass };
        let req = &mut flow.request;
        if req.is_blocked() {
            (step.name, step.rule) = flow.seen.clone().unwrap_or_default();
            if req.resets() {
                return reset(p, Toward::Client, step);
            }
            return Step { verdict: XDP_DROP, ..step };
        }
        let mut spent;
        (step, spent) = match check(p, &l3, &l4, cfg, &mut **req, step) {
            Checked::Go(step, spent) => (step, spent),
            Checked::Done(step) => return step,
            Checked::Forget(step) => {
                self.requests.remove(&key);
                return step;
            }
        };
        if req.watched() {
            if !starts_request(p, off, end) {
                return step;
            }
            req.reset(seq);
            // Read afresh with one round spent (see the stream stages).
            spent = 1;
        }
        let mut progress = http::Progress::StepsExhausted;
        for _ in spent as usize..http::MAX_ROUNDS {
            let start = match http::resume(req, seq, off, end) {
                Resume::At(start) => start,
                Resume::Behind => return step,
                Resume::Ahead => return Step { verdict: XDP_DROP, counted: vec![counters::HTTP_OUT_OF_ORDER], ..step },
            };
            progress = http::feed(req, p, start, end);
            if progress != http::Progress::StepsExhausted {
                break;
            }
        }
        // The verdict's counters, and whether the flow is kept.
        let ended = |counter: u32, step: &mut Step| {
            step.counted.push(counter);
            false
        };
        let keep = match progress {
            http::Progress::NeedMore => {
                req.passed_seq = req.next_seq;
                true
            }
            http::Progress::NoHost => ended(counters::HTTP_NO_HOST, &mut step),
            http::Progress::BadHost => ended(counters::HTTP_BAD_HOST, &mut step),
            http::Progress::NotRequest => ended(counters::HTTP_NOT_REQUEST, &mut step),
            // The head ended after a name that passed: watched.
            http::Progress::End => {
                req.watch();
                true
            }
            http::Progress::HostRepeat => {
                req.block(false);
                step.counted.push(counters::EVASION_HOST_REPEAT);
                step = block(p, false, req.passed_seq, step, &mut req.flags, Request::FLAG_SERVER_CLOSED);
                true
            }
            http::Progress::TooLong | http::Progress::StepsExhausted => {
                req.block(false);
                step.counted.push(counters::HTTP_TOO_LONG);
                step = block(p, false, req.passed_seq, step, &mut req.flags, Request::FLAG_SERVER_CLOSED);
                true
            }
            http::Progress::Name(len) => {
                let mut buf = CanonBuf::default();
                req.copy_name(&mut buf);
                let blocked = matched(engine, cfg, self.ech_outer, &mut buf, len, Proto::Http, l3.af, &mut step, None, false);
                if blocked {
                    flow.seen = Some((step.name.clone(), step.rule));
                    let resets = self.resets.contains(&step.rule.map_or(u32::MAX, |r| r.list()));
                    req.block(resets);
                    step = block(p, resets, req.passed_seq, step, &mut req.flags, Request::FLAG_SERVER_CLOSED);
                } else if !req.ended() {
                    // Read on to the head's end, for a second Host.
                    req.passed_seq = req.next_seq;
                } else {
                    req.watch();
                }
                true
            }
        };
        if !keep {
            self.requests.remove(&key);
        }
        step
    }

    /// The DNS-over-TCP stage (`filter-ebpf/src/dns_tcp.rs`) with its
    /// rounds through the match stage: every question of the segment read,
    /// the segment dropped at a listed one with the reader left where it
    /// was, or passed with the reader kept.
    fn dns_tcp(&mut self, engine: &Engine, cfg: &Config, p: &[u8]) -> Step {
        let pass = Step { verdict: XDP_PASS, ..Step::default() };
        let Ok(l3) = parse_l3(p) else { return pass };
        let Ok(l4) = parse_tcp(p, &l3) else { return pass };
        let Some(key) = FlowKey::of(p, &l3, &l4) else { return pass };
        let (off, end, seq, af) = (l4.payload_off, l4.payload_end, l4.data_seq(), l3.af);
        if self.flows.contains_key(&key) || self.requests.contains_key(&key) {
            return pass;
        }
        let mut q = match self.queries.get(&key) {
            Some(q) => q.clone(),
            None => Box::new(Query::new(self.syns.get(&key).map_or(seq, |r| r.seq))),
        };
        let mut step = Step { proto: Some((Proto::DnsTcp, af)), ..pass };
        // Tail calls so far: the entry program's into this stage, and its
        // header half's into its reading half.
        let mut calls = 2;
        let too_many = |mut step: Step| {
            step.counted.push(counters::DNS_TCP_TOO_MANY);
            Step { verdict: XDP_DROP, ..step }
        };
        loop {
            let start = match dns_tcp::resume(&q, seq, off, end) {
                Resume::At(start) => start,
                // A later round, the segment read to its end.
                Resume::Behind if calls > 2 => break,
                Resume::Behind => return step,
                Resume::Ahead => return Step { verdict: XDP_DROP, counted: vec![counters::DNS_TCP_OUT_OF_ORDER], ..step },
            };
            let msg_end = match dns_tcp::feed(&mut q, p, start, end) {
                dns_tcp::Progress::Question { end } => end,
                dns_tcp::Progress::NeedMore => break,
                dns_tcp::Progress::Unreadable => return too_many(step),
                // A new round of this stage.
                dns_tcp::Progress::StepsExhausted => {
                    if calls >= dns_tcp::MAX_TAIL_CALLS {
                        return too_many(step);
                    }
                    calls += 1;
                    continue;
                }
            };
            // To the question program.
            if calls >= dns_tcp::MAX_TAIL_CALLS {
                return too_many(step);
            }
            calls += 1;
            let mut buf = CanonBuf::default();
            match parse_query(&q.buf[..], 2, msg_end, &mut buf, |x| x) {
                Ok(question) => {
                    // To the match stage, and back.
                    if calls >= dns_tcp::MAX_TAIL_CALLS {
                        return too_many(step);
                    }
                    calls += 1;
                    if matched(engine, cfg, self.ech_outer, &mut buf, question.canon_len, Proto::DnsTcp, af, &mut step, None, false) {
                        step.counted.push(counters::action_index(DnsAction::Drop));
                        return step;
                    }
                }
                Err(DnsSkip::NotQuery) => {}
                Err(DnsSkip::Malformed(m)) => step.counted.push(counters::malformed_index(m)),
            }
            if calls >= dns_tcp::MAX_TAIL_CALLS {
                return too_many(step);
            }
            calls += 1;
        }
        // The segment passes: the reader is kept.
        q.rounds = 0;
        q.passed_seq = q.next_seq;
        if q.between() {
            self.queries.remove(&key);
            self.syns.insert(key, SynRecord::new(q.next_seq, now_ns()));
        } else {
            step.counted.push(counters::proto_index(Proto::DnsTcp, af, Outcome::Incomplete));
            self.queries.insert(key, q);
        }
        step
    }

    fn stream(&mut self, engine: &Engine, cfg: &Config, p: &[u8]) -> Step {
        let pass = Step { verdict: XDP_PASS, ..Step::default() };
        let Ok(l3) = parse_l3(p) else { return pass };
        if l3.proto != IPPROTO_TCP || l3.later_fragment {
            return pass;
        }
        let Ok(l4) = parse_tcp(p, &l3) else { return pass };
        let Some(key) = FlowKey::of(p, &l3, &l4) else { return pass };
        let (off, end) = (l4.payload_off, l4.payload_end);
        let seq = l4.data_seq();
        // An HTTP flow (a SYN with data on its ports, or the HTTP ports
        // changed under it): not this stage's.
        if self.requests.contains_key(&key) {
            return pass;
        }
        if !self.flows.contains_key(&key) {
            let start = match self.start(&key, seq, end.saturating_sub(off)) {
                Ok(start) => start,
                Err(step) => return *step,
            };
            let trim = match start {
                Start::First { trim } => trim,
                _ => 0,
            };
            if !starts_hello(p, off + trim as usize, end) {
                if suspect_first(start, l4.flags) {
                    return self.tamper_first(p, &key, start, l4.flags, cfg, seq.wrapping_add(trim));
                }
                self.started(&key, start);
                return pass;
            }
            self.flows.insert(key, Flow { hello: Box::new(Hello::new(seq.wrapping_add(trim))), seen: None });
            self.started(&key, start);
        }
        let flow = self.flows.get_mut(&key).expect("tracked");
        let mut step = Step { proto: Some((Proto::Tls, l3.af)), ..pass };
        let hello = &mut flow.hello;
        if hello.is_blocked() {
            // A later segment of a blocked flow: named after its hello.
            (step.name, step.rule) = flow.seen.clone().unwrap_or_default();
            if hello.resets() {
                return reset(p, Toward::Client, step);
            }
            return Step { verdict: XDP_DROP, ..step };
        }
        let mut spent;
        (step, spent) = match check(p, &l3, &l4, cfg, &mut **hello, step) {
            Checked::Go(step, spent) => (step, spent),
            Checked::Done(step) => return step,
            Checked::Forget(step) => {
                self.flows.remove(&key);
                return step;
            }
        };
        if hello.watched() {
            if !starts_hello(p, off, end) {
                return step;
            }
            hello.reset(seq);
            // Read afresh with one round spent (see the stream stages).
            spent = 1;
        }
        let mut progress = Progress::StepsExhausted;
        for _ in spent as usize..MAX_ROUNDS {
            let start = match resume(hello, seq, off, end) {
                Resume::At(start) => start,
                Resume::Behind => return step,
                Resume::Ahead => return Step { verdict: XDP_DROP, counted: vec![counters::TLS_OUT_OF_ORDER], ..step },
            };
            let had_ech = hello.has_ech();
            progress = feed(hello, p, start, end);
            if !had_ech && hello.has_ech() {
                step.counted.push(counters::TLS_ECH);
            }
            if progress != Progress::StepsExhausted {
                break;
            }
        }
        if progress == Progress::StepsExhausted {
            // Out of rounds: a name read whole still gets its verdict.
            match name_so_far(hello) {
                Some(len) => progress = Progress::Name(len),
                None => {
                    hello.block(false);
                    step.counted.push(counters::TLS_TOO_COMPLEX);
                    return block(p, false, hello.passed_seq, step, &mut hello.flags, Hello::FLAG_SERVER_CLOSED);
                }
            }
        }
        // An ECH-outer rule waited for ECH, which came: the name is
        // matched again.
        if hello.flags & Hello::FLAG_ECH_PENDING != 0 && hello.has_ech() {
            hello.flags &= !Hello::FLAG_ECH_PENDING;
            let len = hello.canon_len();
            return self.decide(engine, cfg, p, key, len, step, true);
        }
        let finish = |flows: &mut HashMap<FlowKey, Flow>, mut step: Step, counter: Option<u32>| {
            flows.remove(&key);
            step.counted.extend(counter);
            step
        };
        match progress {
            Progress::NeedMore | Progress::StepsExhausted => {
                hello.passed_seq = hello.next_seq;
                step
            }
            // The hello ended after a name that passed: watched.
            Progress::End => {
                hello.watch();
                step
            }
            Progress::NoName => finish(&mut self.flows, step, Some(counters::TLS_NO_SNI)),
            Progress::NotHello => finish(&mut self.flows, step, Some(counters::TLS_NOT_HELLO)),
            Progress::Name(len) => self.decide(engine, cfg, p, key, len, step, false),
        }
    }

    /// The match stage for the ClientHello of flow `key`, whose name is
    /// `len` bytes long (`again`: matched before, see `matched`).
    #[allow(clippy::too_many_arguments)]
    fn decide(&mut self, engine: &Engine, cfg: &Config, p: &[u8], key: FlowKey, len: usize, mut step: Step, again: bool) -> Step {
        let Some(flow) = self.flows.get_mut(&key) else { return step };
        let hello = &mut flow.hello;
        let mut buf = CanonBuf::default();
        hello.copy_name(&mut buf);
        let af = step.proto.map_or(Af::V4, |(_, af)| af);
        if matched(engine, cfg, self.ech_outer, &mut buf, len, Proto::Tls, af, &mut step, Some(&mut **hello), again) {
            flow.seen = Some((step.name.clone(), step.rule));
            let resets = self.resets.contains(&step.rule.map_or(u32::MAX, |r| r.list()));
            hello.block(resets);
            block(p, resets, hello.passed_seq, step, &mut hello.flags, Hello::FLAG_SERVER_CLOSED)
        } else if !hello.ended() {
            // Walked on to the hello's end (for ECH, and an ECH-outer rule
            // waiting for it): the segment passes.
            hello.passed_seq = hello.next_seq;
            flow.seen = Some((step.name.clone(), step.rule));
            step
        } else {
            hello.watch();
            step
        }
    }
}

/// What `check` leaves of a segment.
enum Checked {
    /// Read on (its counters added), with the rounds already spent.
    Go(Step, u32),
    /// Its verdict.
    Done(Step),
    /// Its verdict; the flow is forgotten.
    Forget(Step),
}

/// The parsers of the TCP stream stages, as `conn::check` sees them
/// (`flow::Flow`'s variants).
trait Parser {
    fn watched(&self) -> bool;
    fn name_read(&self) -> (u32, u32);
    fn name(&self) -> &[u8; 512];
    fn block_for_tamper(&mut self, p: &[u8], step: Step) -> Step;
    fn passed_seq_mut(&mut self) -> &mut u32;
}

impl Parser for Hello {
    fn watched(&self) -> bool {
        Hello::watched(self)
    }
    fn name_read(&self) -> (u32, u32) {
        Hello::name_read(self)
    }
    fn name(&self) -> &[u8; 512] {
        &self.name
    }
    fn block_for_tamper(&mut self, p: &[u8], step: Step) -> Step {
        self.block(false);
        block(p, false, self.passed_seq, step, &mut self.flags, Hello::FLAG_SERVER_CLOSED)
    }
    fn passed_seq_mut(&mut self) -> &mut u32 {
        &mut self.passed_seq
    }
}

impl Parser for Request {
    fn watched(&self) -> bool {
        Request::watched(self)
    }
    fn name_read(&self) -> (u32, u32) {
        Request::name_read(self)
    }
    fn name(&self) -> &[u8; 512] {
        &self.name
    }
    fn block_for_tamper(&mut self, p: &[u8], step: Step) -> Step {
        self.block(false);
        block(p, false, self.passed_seq, step, &mut self.flags, Request::FLAG_SERVER_CLOSED)
    }
    fn passed_seq_mut(&mut self) -> &mut u32 {
        &mut self.passed_seq
    }
}

/// `conn::check`, the compare stage (`conn::rewrite`) and `conn::tamper`:
/// fake segments and urgent bytes (not looked at on a watched flow), then
/// the compare of a segment that covers name bytes read, under the tamper
/// policy. A segment that went through the compare comes back to its stream
/// stage with one round spent (`Go`'s count).
fn check(p: &[u8], l3: &L3, l4: &L4, cfg: &Config, parser: &mut impl Parser, step: Step) -> Checked {
    let (seq, off, end) = (l4.data_seq(), l4.payload_off, l4.payload_end);
    let signs = if parser.watched() { 0 } else { fake_signs(p, l4.flags, l3.l4_off, off, end) };
    let (at, len) = parser.name_read();
    let overlaps = name_overlap(seq, end.saturating_sub(off) as u32, at, len).is_some();
    let signs = if signs == 0 && overlaps && rewritten(p, seq, off, end, at, len, parser.name()) {
        // `Flow::passed_back_to`.
        let passed = parser.passed_seq_mut();
        if passed.wrapping_sub(seq) as i32 > 0 {
            *passed = seq;
        }
        sign::REWRITE
    } else {
        signs
    };
    if signs == 0 {
        return Checked::Go(step, u32::from(overlaps));
    }
    on_tamper(p, cfg, parser, signs, step)
}

/// `conn::tamper`: the tamper policy's answer to a segment bearing `signs`
/// on a flow being read.
fn on_tamper(p: &[u8], cfg: &Config, parser: &mut impl Parser, signs: u32, mut step: Step) -> Checked {
    match tamper(signs, cfg.tamper_policy) {
        Tamper::Block { counter } => {
            step.counted.push(counter);
            Checked::Done(parser.block_for_tamper(p, step))
        }
        Tamper::Skip { counter } => {
            step.counted.push(counter);
            Checked::Done(step)
        }
        Tamper::Forget { counter } => {
            step.counted.push(counter);
            Checked::Forget(step)
        }
        Tamper::Count { counter } => {
            step.counted.push(counter);
            Checked::Go(step, 1)
        }
    }
}

/// The model's monotonic clock, for SYN records (the kernel's
/// `bpf_ktime_get_ns`; only differences matter).
fn now_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The block of a flow (by the match stage, or by a stream stage out of
/// budget): `reset` answers the client; `drop` sends the segment on as a
/// RST at `passed_seq` to close the server's end, noted in `flags`
/// (`closed`) once written.
fn block(p: &[u8], reset_action: bool, passed_seq: u32, step: Step, flags: &mut u32, closed: u32) -> Step {
    if reset_action {
        return reset(p, Toward::Client, step);
    }
    let step = reset(p, Toward::Server(passed_seq), step);
    if step.verdict == XDP_PASS {
        *flags |= closed;
    }
    step
}

/// The answer stage for a TCP segment to become a RST `to` the client or
/// the server: the RST sent, or a drop and why.
fn reset(p: &[u8], to: Toward, mut step: Step) -> Step {
    let mut out = p.to_vec();
    match build_reset(&mut out, to, |x| x) {
        Ok(()) if to == Toward::Client => {
            step.counted.push(counters::TCP_RESETS);
            Step { verdict: XDP_TX, sent: Some(out), ..step }
        }
        Ok(()) => {
            step.counted.push(counters::TCP_SERVER_RESETS);
            Step { verdict: XDP_PASS, sent: Some(out), ..step }
        }
        Err(NoReply::NotPlain) => {
            step.counted.push(counters::TCP_RESET_NOT_PLAIN);
            Step { verdict: XDP_DROP, ..step }
        }
        Err(_) => {
            step.counted.push(counters::TCP_RESET_FAILED);
            Step { verdict: XDP_DROP, ..step }
        }
    }
}

/// The match stage: adds its counters, name and rule to `step`, sets its
/// verdict, and says whether the flow is blocked. An ECH-outer rule (a list
/// in `ech_outer`) blocks only a ClientHello (`hello`) with ECH, or whose
/// walk after the name was cut short; if the hello goes on, the rule waits
/// in it (`FLAG_ECH_PENDING`) and the name is matched `again` if ECH comes
/// (not counted as inspected twice).
#[allow(clippy::too_many_arguments)]
fn matched(
    engine: &Engine,
    cfg: &Config,
    ech_outer: u128,
    buf: &mut CanonBuf,
    len: usize,
    proto: Proto,
    af: Af,
    step: &mut Step,
    hello: Option<&mut Hello>,
    again: bool,
) -> bool {
    if !again {
        step.counted.push(counters::proto_index(proto, af, Outcome::Inspected));
    }
    let decision = match_canon(buf, canon_start(len), cfg, &engine.nodes());
    step.name = Some(canon_to_dotted(buf));
    step.rule = rule_of(decision);
    if let Decision::Block(rule) = decision
        && (ech_outer >> rule.list()) & 1 != 0
    {
        let Some(h) = hello else { return false };
        if !h.has_ech() && h.flags & Hello::FLAG_CUT == 0 {
            if !h.ended() {
                h.set(Hello::FLAG_ECH_PENDING);
            }
            return false;
        }
        step.counted.push(counters::TLS_ECH_OUTER_BLOCKED);
    }
    match decision {
        Decision::Block(_) => {
            step.counted.push(counters::proto_index(proto, af, Outcome::Blocked));
            step.verdict = XDP_DROP;
            true
        }
        Decision::Allow(_) => {
            step.counted.push(counters::proto_index(proto, af, Outcome::Allowed));
            false
        }
        Decision::NoMatch => false,
    }
}

/// The rule behind a decision.
fn rule_of(d: Decision) -> Option<RuleRef> {
    match d {
        Decision::Block(r) | Decision::Allow(r) => Some(r),
        Decision::NoMatch => None,
    }
}

pub use filter_common::name::canon_to_dotted;

/// `inspect`'s environment on the host: a scratch buffer, the engine's
/// settings and its node map.
pub struct HostEnv<'a> {
    pub buf: CanonBuf,
    pub cfg: Config,
    pub nodes: Nodes<'a>,
}

impl<'a> Env for HostEnv<'a> {
    type Rules = Nodes<'a>;
    fn resources(&mut self) -> Option<(&mut CanonBuf, &Config, &Nodes<'a>)> {
        Some((&mut self.buf, &self.cfg, &self.nodes))
    }
}

/// The counters the XDP program bumps for `inspection`, besides `PACKETS`
/// (mirrors `account` in filter-ebpf), with every list's DNS action `drop`.
pub fn counted(inspection: &Inspection) -> Vec<u32> {
    use counters::proto_index;
    match *inspection {
        Inspection::Other | Inspection::TcpPayload => vec![],
        Inspection::Fragment => vec![counters::FRAGMENTS],
        Inspection::FirstFragment { .. } => vec![counters::EVASION_FRAGMENT],
        Inspection::Quic { af, drop } => {
            let mut v = vec![proto_index(Proto::Quic, af, Outcome::Inspected)];
            if drop {
                v.push(proto_index(Proto::Quic, af, Outcome::Blocked));
            }
            v
        }
        Inspection::Unconfigured => vec![counters::UNCONFIGURED],
        Inspection::Malformed(m) => vec![counters::malformed_index(m)],
        Inspection::Incomplete { proto, af } => vec![proto_index(proto, af, Outcome::Incomplete)],
        Inspection::Decided { proto, af, decision, .. } => {
            let mut v = vec![proto_index(proto, af, Outcome::Inspected)];
            match decision {
                Decision::NoMatch => {}
                Decision::Allow(_) => v.push(proto_index(proto, af, Outcome::Allowed)),
                Decision::Block(_) => v.extend([proto_index(proto, af, Outcome::Blocked), counters::action_index(DnsAction::Drop)]),
            }
            v
        }
    }
}
