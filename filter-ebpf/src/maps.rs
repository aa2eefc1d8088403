//! The maps the programs share with each other and with the daemon, and
//! the small helpers that read and count through them.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use filter_common::{
    counters::{self, Proto},
    flow::{Flow, SynRecord},
    inspect::{DnsAt, Env, OPAQUE_LIMIT},
    name::{CANON_CAP, CanonBuf},
    packet::Af,
    reply::{DnsAction, QueryAt},
    reset::Toward,
    rules::{
        BlockEvent, Config, DEFAULT_RULE_CAPACITY, EVENTS_BYTES, HTTP_PORT_WORDS, MAX_LISTS, NameKey, NodeRules, RuleLookup, RuleRef, STAGE_COUNT,
        first_look_slot, first_look_words,
    },
    tls::FlowKey,
};

#[map(name = "RULES")]
pub static RULES: HashMap<NameKey, NodeRules> = HashMap::with_max_entries(DEFAULT_RULE_CAPACITY, BPF_F_NO_PREALLOC);

/// The first look before `RULES`: a blocked Bloom filter of the rule
/// nodes (`rules::first_look_slot`), sized by the loader with `RULES`
/// (`first_look_words`). Mmapable: its blocks then start on a page, so each
/// is one cache line, and the daemon sets bits with plain atomic stores.
#[map(name = "FIRST_LOOK")]
pub static FIRST_LOOK: Array<u64> = Array::with_max_entries(first_look_words(DEFAULT_RULE_CAPACITY), BPF_F_MMAPABLE);

#[map(name = "CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNTERS, 0);

/// Hits per rule id. Shared, not per-CPU: 8 bytes a rule instead of 8 per
/// rule per CPU; only blocked or allowed packets touch it. Mmapable, so the
/// daemon reads all of it without a syscall per rule.
#[map(name = "RULE_HITS")]
pub static RULE_HITS: Array<u64> = Array::with_max_entries(DEFAULT_RULE_CAPACITY, BPF_F_MMAPABLE);

#[map(name = "LIST_HITS")]
pub static LIST_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::LIST_HITS_ENTRIES, 0);

/// Per-CPU space for the canonical name: too big for the 512-byte stack.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<CanonBuf> = PerCpuArray::with_max_entries(1, 0);

/// The actions of each list: its `DnsAction` in the low byte (0, drop, by
/// default), `reset::LIST_TCP_RESET` for its TCP action `reset`.
#[map(name = "LIST_ACTIONS")]
pub static LIST_ACTIONS: Array<u32> = Array::with_max_entries(MAX_LISTS, 0);

/// The HTTP ports (`Config::http_ports`) as a bitmap: bit `port % 64` of
/// word `port / 64`; one lookup instead of a loop over the list.
#[map(name = "HTTP_PORTS")]
pub static HTTP_PORTS: Array<u64> = Array::with_max_entries(HTTP_PORT_WORDS, 0);

/// The TLS ports (`Config::tls_ports`, all ones for all ports), laid out as
/// `HTTP_PORTS`.
#[map(name = "TLS_PORTS")]
pub static TLS_PORTS: Array<u64> = Array::with_max_entries(HTTP_PORT_WORDS, 0);

/// The QUIC ports (`Config::quic_ports`, all ones for all ports), laid out
/// as `HTTP_PORTS`.
#[map(name = "QUIC_PORTS")]
pub static QUIC_PORTS: Array<u64> = Array::with_max_entries(HTTP_PORT_WORDS, 0);

/// Whether `port`'s bit is set in a port bitmap (`HTTP_PORTS`, `TLS_PORTS`,
/// `QUIC_PORTS`, `QUIC_BLOCKED_PORTS`).
#[inline(always)]
pub fn has_port(map: &Array<u64>, port: u16) -> bool {
    map.get(u32::from(port) >> 6).is_some_and(|w| (*w >> (port & 63)) & 1 != 0)
}

/// Round-trip slot for `Env::opaque`.
#[map(name = "OPAQUE")]
pub static OPAQUE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Flows whose ClientHello or HTTP request head is being read, or that are
/// blocked.
#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(filter_common::tls::DEFAULT_FLOW_CAPACITY, 0);

/// Connections between their SYN and their first data segment: the
/// sequence number their data starts at (see `flow::Start`).
#[map(name = "SYNS")]
pub static SYNS: LruHashMap<FlowKey, SynRecord> = LruHashMap::with_max_entries(filter_common::flow::DEFAULT_SYN_CAPACITY, 0);

/// Per-CPU staging for a new flow's state (too big for the stack).
#[map(name = "FLOW_INIT")]
pub static FLOW_INIT: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU working copy of the DNS-over-TCP reader of the segment being
/// read (`dns_tcp`): written back to `FLOWS` only if the segment passes.
#[map(name = "DNS_WORK")]
pub static DNS_WORK: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

/// What the DNS-over-TCP stage's header half hands its reading half: the
/// segment's flow, sequence number, family and payload. Through map
/// memory, so the reader is verified once, not once per header layout.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsTcpJob {
    pub flow: FlowKey,
    pub seq: u32,
    pub v6: u32,
    pub off: u32,
    pub end: u32,
}

#[map(name = "DNS_TCP_JOB")]
pub static DNS_TCP_JOB: PerCpuArray<DnsTcpJob> = PerCpuArray::with_max_entries(1, 0);

/// The stages reached by tail call, each verified on its own budget:
/// `STAGE_DNS` (queries), `STAGE_TLS` (ClientHellos), `STAGE_HTTP` (HTTP
/// requests), `STAGE_MATCH` (a finished server or Host name) and
/// `STAGE_REPLY` (answers to blocked queries).
#[map(name = "STAGES")]
pub static STAGES: ProgramArray = ProgramArray::with_max_entries(STAGE_COUNT, 0);

/// What the stream stage hands the match stage (the name itself is in
/// `SCRATCH`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MatchJob {
    pub flow: FlowKey,
    /// Where the canonical name starts in `SCRATCH`.
    pub start: u32,
    /// 0 for IPv4, 1 for IPv6.
    pub v6: u32,
    /// The stream protocol (`Proto::Tls`, `Proto::Http` or `Proto::DnsTcp`).
    pub proto: u32,
    /// 1 if the name was matched before (an ECH-outer rule waiting for
    /// ECH): not counted as inspected again.
    pub again: u32,
}

/// What the DNS stage hands the answer stage.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ReplyJob {
    l3_off: u32,
    l4_off: u32,
    msg_off: u32,
    question_end: u32,
    qtype: u32,
    /// Bit 0: IPv6; bit 1: plain (see `QueryAt`).
    flags: u32,
    action: u32,
    /// `SERVER_RESET`'s sequence number.
    seq: u32,
    /// The flow of a TCP reset.
    pub flow: FlowKey,
}

impl ReplyJob {
    #[inline(always)]
    pub fn new(at: &QueryAt, action: DnsAction) -> Self {
        let flags = (at.af == Af::V6) as u32 | (at.plain as u32) << 1;
        let off = |x: usize| x as u32;
        ReplyJob {
            l3_off: off(at.l3_off),
            l4_off: off(at.l4_off),
            msg_off: off(at.msg_off),
            question_end: off(at.question_end),
            qtype: at.qtype as u32,
            flags,
            action: action as u32,
            seq: 0,
            flow: FlowKey::default(),
        }
    }

    /// The job of a TCP segment to be turned into a RST to its client (the
    /// answer stage reads the packet's headers again).
    const TCP_RESET: u32 = 0x100;
    /// The job of a segment to be turned into a RST to its server at
    /// `seq`, after which the blocked flow is marked (`Flow::close_server`)
    /// or, with `SERVER_RESET_FORGET`, forgotten.
    const SERVER_RESET: u32 = 0x101;
    const SERVER_RESET_FORGET: u32 = 0x102;

    /// A RST `to` the client or the server; `forget` the flow once a RST
    /// to the server is written.
    #[inline(always)]
    pub fn tcp_reset(to: Toward, flow: FlowKey, forget: bool) -> Self {
        let (action, seq) = match to {
            Toward::Client => (Self::TCP_RESET, 0),
            Toward::Server(seq) => (if forget { Self::SERVER_RESET_FORGET } else { Self::SERVER_RESET }, seq),
        };
        ReplyJob { l3_off: 0, l4_off: 0, msg_off: 0, question_end: 0, qtype: 0, flags: 0, action, seq, flow }
    }

    /// Where the RST goes, and whether the flow is then forgotten, if the
    /// job is a TCP reset.
    #[inline(always)]
    pub fn reset_toward(&self) -> Option<(Toward, bool)> {
        match self.action {
            Self::TCP_RESET => Some((Toward::Client, false)),
            Self::SERVER_RESET => Some((Toward::Server(self.seq), false)),
            Self::SERVER_RESET_FORGET => Some((Toward::Server(self.seq), true)),
            _ => None,
        }
    }

    #[inline(always)]
    pub fn get(&self) -> (QueryAt, DnsAction) {
        let at = QueryAt {
            af: if self.flags & 1 != 0 { Af::V6 } else { Af::V4 },
            l3_off: Maps::opaque(self.l3_off as usize),
            l4_off: Maps::opaque(self.l4_off as usize),
            msg_off: Maps::opaque(self.msg_off as usize),
            question_end: Maps::opaque(self.question_end as usize),
            qtype: self.qtype as u16,
            plain: self.flags & 2 != 0,
        };
        (at, DnsAction::from_u32(self.action))
    }
}

/// What the entry program hands the DNS stage.
#[map(name = "DNS_JOB")]
pub static DNS_JOB: PerCpuArray<DnsAt> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "REPLY_JOB")]
pub static REPLY_JOB: PerCpuArray<ReplyJob> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "MATCH_JOB")]
pub static MATCH_JOB: PerCpuArray<MatchJob> = PerCpuArray::with_max_entries(1, 0);

pub struct Rules;

impl RuleLookup for Rules {
    #[inline(always)]
    fn lookup(&self, key: &NameKey) -> Option<NodeRules> {
        // SAFETY: the value is copied out at once; the map never hands out
        // memory that is freed under an RCU read section.
        unsafe { RULES.get(key) }.copied()
    }

    #[inline(always)]
    fn may_hold(&self, cfg: &Config, block: u64, key: &NameKey) -> bool {
        let (word, bits) = first_look_slot(cfg.look_mask, block, key);
        // A word out of reach cannot happen (the mask fits the map); it
        // would send the probe to the rule map.
        FIRST_LOOK.get(word).is_none_or(|w| *w & bits == bits)
    }
}

pub struct Maps {
    pub rules: Rules,
}

impl Env for Maps {
    type Rules = Rules;

    #[inline(always)]
    fn resources(&mut self) -> Option<(&mut CanonBuf, &Config, &Rules)> {
        let buf = SCRATCH.get_ptr_mut(0)?;
        let cfg = CONFIG.get(0)?;
        // SAFETY: per-CPU scratch, and XDP programs do not nest on a CPU.
        Some((unsafe { &mut *buf }, cfg, &self.rules))
    }

    #[inline(always)]
    fn opaque(x: usize) -> usize {
        match OPAQUE.get_ptr_mut(0) {
            // SAFETY: per-CPU slot; volatile so the compiler keeps the round trip.
            Some(p) => unsafe {
                core::ptr::write_volatile(p, x.min(OPAQUE_LIMIT - 1) as u64);
                core::ptr::read_volatile(p) as usize & (OPAQUE_LIMIT - 1)
            },
            None => x.min(OPAQUE_LIMIT - 1),
        }
    }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn hit(rule: RuleRef, kind: u32) {
    if let Some(c) = LIST_HITS.get_ptr_mut(rule.list() * counters::LIST_COUNTERS + kind) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    if let Some(c) = RULE_HITS.get_ptr_mut(rule.id()) {
        // SAFETY: a valid, aligned u64 in the map; shared between CPUs, so
        // added atomically.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(c, 1) };
    }
}

/// Blocked names for the daemon's opt-in event log (Linux 5.8+ ring buffer).
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Writes the name a stage just blocked (in `SCRATCH`, from `start`) to the
/// event ring buffer, when the event log is on and this is the rule's
/// sampled block; called after `hit`, which counted this block. Costs one
/// config read when the log is off. A full ring buffer loses the event.
/// Callers pass `start` from memory read after the match (not a value kept
/// live across the matcher's loop, which doubles the verifier's work).
#[inline(always)]
pub fn block_event(proto: Proto, af: Af, rule: RuleRef, start: usize) {
    let Some(cfg) = CONFIG.get(0) else { return };
    let every = cfg.event_sample as u64;
    if every == 0 {
        return;
    }
    let Some(hits) = RULE_HITS.get_ptr(rule.id()) else { return };
    // SAFETY: a u64 of the map; shared between CPUs, so read once.
    let hits = unsafe { core::ptr::read_volatile(hits) };
    if hits.wrapping_sub(1).checked_rem(every) != Some(0) {
        return;
    }
    let Some(buf) = SCRATCH.get_ptr(0) else { return };
    let Some(mut entry) = EVENTS.reserve::<BlockEvent>(0) else { return };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved record, `buf` the per-CPU scratch; the
    // name is copied a word at a time (volatile, so that it is not turned
    // into a memcpy call the BPF target cannot make).
    unsafe {
        (*ev).proto = proto as u32;
        (*ev).af = af as u32;
        (*ev).rule = rule;
        (*ev).start = start.min(CANON_CAP) as u32;
        let src = (*buf).bytes.as_ptr() as *const u64;
        let dst = core::ptr::addr_of_mut!((*ev).name) as *mut u64;
        for i in 0..CANON_CAP / 8 {
            core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i)));
        }
    }
    entry.submit(0);
}
