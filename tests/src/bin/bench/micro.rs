//! Per-packet cost under BPF_PROG_TEST_RUN, against a no-op XDP program in
//! the same run; rule scaling; list load and swap times; kernel memory.
//!
//! Cold: every measured packet is a distinct packet (a name drawn at random
//! from the list or from unlisted names, a new TCP flow), run once
//! (`repeat = 1`), immediately followed by the no-op program on the same
//! packet; the kernel's per-run durations are collected for both and the
//! no-op's is subtracted, so the fixed cost of a test run (timer reads,
//! context set-up) cancels. Hot: one packet, `repeat = 100,000`.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};
use blokir::{
    ebpf::Kernel,
    policy::{DnsPolicy, TrafficPolicy},
    rules::{Engine, Rule, file::read_rules},
};
use blokir_tests::{PASS_AS_RST, XDP_DROP, XDP_PASS, noop};
use filter_common::{
    hash::lane_multiplier,
    rules::{STAGE_MATCH, STAGE_REPLY},
};
use rand::Rng;

use crate::{
    names::{List, ListIndex, NameGen, unlisted},
    packets::{self, HelloTemplate},
};

pub const LIST: &str = "bench";
const HOT_REPEAT: u32 = 100_000;

/// The classes, in report order: key, description.
pub const CLASSES: &[(&str, &str)] = &[
    ("dns_allowed", "DNS query (UDP), name not listed"),
    ("dns_blocked_exact", "DNS query (UDP), blocked by an exact rule"),
    ("dns_blocked_subtree", "DNS query (UDP), a name below a subtree rule"),
    ("tls_one_segment", "ClientHello, SNI in the first segment (half listed)"),
    ("tls_split_first", "split ClientHello: 1st segment (no name yet)"),
    ("tls_split_second", "split ClientHello: 2nd segment, completes the name (half listed)"),
    ("http_get", "HTTP GET on port 80, unlisted Host (read and matched by the HTTP stage)"),
    ("udp_other", "UDP, not DNS (1.2 KB datagram to port 443)"),
    ("tcp_ack", "TCP ACK without payload"),
    ("tcp_syn", "TCP SYN of a new connection (its start recorded)"),
    ("tcp_data", "TCP data (1.4 KB) of an established flow to port 443 whose hello was allowed"),
    ("quic_initial", "QUIC client Initial (1.2 KB, a new flow) handed up to the daemon's reader"),
];

/// The ISP mix (`isp_mix_ns`): share of packets by class, a guess at a
/// subscriber link's downstream-and-upstream packet counts as XDP on the
/// subscriber side sees them (bulk TCP and its ACKs dominate, QUIC next).
pub const ISP_MIX: &[(&str, f64)] = &[
    ("tcp_data", 0.55),
    ("tcp_ack", 0.25),
    ("udp_other", 0.15),
    ("dns_allowed", 0.02),
    ("dns_blocked_exact", 0.001),
    ("dns_blocked_subtree", 0.001),
    ("tls_one_segment", 0.006),
    ("tls_split_first", 0.002),
    ("tls_split_second", 0.002),
    ("http_get", 0.002),
    ("tcp_syn", 0.016),
    ("quic_initial", 0.002),
];

/// One class at one rule count.
#[derive(Clone, Debug)]
pub struct ClassResult {
    pub class: &'static str,
    pub rules: usize,
    pub packets: usize,
    /// Cold, per packet: blokir's and the no-op's trimmed means (the slowest
    /// 1% of runs of each dropped: preemption on a busy machine), medians.
    pub cold_mean: f64,
    pub cold_median: f64,
    pub noop_mean: f64,
    pub noop_median: f64,
    pub hot: f64,
    pub hot_noop: f64,
}

impl ClassResult {
    pub fn net(&self) -> f64 {
        self.cold_mean - self.noop_mean
    }
    pub fn net_median(&self) -> f64 {
        self.cold_median - self.noop_median
    }
    pub fn hot_net(&self) -> f64 {
        self.hot - self.hot_noop
    }
    pub fn ratio(&self) -> f64 {
        self.cold_mean / self.noop_mean.max(1.0)
    }
}

/// How much of the tail-call chain is installed (`Kernel::install_stages`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Chain {
    /// The entry program alone: every tail call returns, the packet passes.
    Entry,
    /// And the stages that read a packet (DNS, TLS, HTTP, QUIC, DNS over TCP,
    /// the compare stage): a name read goes no further.
    Readers,
    /// And the match and answer stages: the whole program.
    Whole,
}

impl Chain {
    fn keeps(self, slot: u32) -> bool {
        match self {
            Chain::Entry => false,
            Chain::Readers => !matches!(slot, STAGE_MATCH | STAGE_REPLY),
            Chain::Whole => true,
        }
    }
}

/// One class's net cold cost (ns, at the most rules) by how much of the
/// chain ran: the differences are the entry program's, the readers' and the
/// match and answer stages' shares.
#[derive(Clone, Debug)]
pub struct StageSplit {
    pub class: &'static str,
    pub entry: f64,
    pub readers: f64,
    pub whole: f64,
}

#[derive(Clone, Debug)]
pub struct MapMem {
    pub map_type: u32,
    pub max_entries: u64,
    pub key_size: u64,
    pub value_size: u64,
    pub memlock: u64,
}

#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    pub capacity: u32,
    pub program_load_s: f64,
    pub parse_s: f64,
    pub plan_s: f64,
    pub apply_s: f64,
    pub nodes: usize,
    pub swap_changed: usize,
    pub swap_parse_s: f64,
    pub swap_plan_s: f64,
    pub swap_apply_s: f64,
    pub swap_writes: usize,
    pub maps: Vec<MapMem>,
    pub rss_before: u64,
    pub rss_after: u64,
}

impl LoadResult {
    pub fn load_s(&self) -> f64 {
        self.parse_s + self.plan_s + self.apply_s
    }
    pub fn swap_s(&self) -> f64 {
        self.swap_parse_s + self.swap_plan_s + self.swap_apply_s
    }
    pub fn memlock(&self) -> u64 {
        self.maps.iter().map(|m| m.memlock).sum()
    }
    /// The maps sized by the rule capacity (the rule map, its first look and
    /// the rule-hit counters); the rest (scratch, flows, counters) is fixed.
    pub fn rule_memlock(&self) -> u64 {
        let look = u64::from(filter_common::rules::first_look_words(self.capacity));
        self.maps.iter().filter(|m| m.max_entries == u64::from(self.capacity) || m.max_entries == look).map(|m| m.memlock).sum()
    }
}

pub struct Micro {
    pub results: Vec<ClassResult>,
    /// Where the time goes, at the most rules: each class's net cold cost
    /// with the chain cut after the entry program and after the readers.
    pub stages: Vec<StageSplit>,
    pub load: LoadResult,
    pub hello_clients: (String, String),
}

pub struct Params {
    pub counts: Vec<usize>,
    pub samples: usize,
    pub dir: PathBuf,
}

struct Bench {
    kernel: Kernel,
    engine: Engine,
    noop: OwnedFd,
    flow: usize,
    chain: Chain,
}

impl Bench {
    fn set(&mut self, rules: &[Rule], source: Option<PathBuf>) -> anyhow::Result<(f64, f64, usize)> {
        let t = Instant::now();
        let change = self.engine.plan_replace(LIST, source, rules)?;
        let plan = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let summary = self.engine.apply(change, &mut self.kernel)?;
        Ok((plan, t.elapsed().as_secs_f64(), summary.writes))
    }

    fn install(&mut self, chain: Chain) -> anyhow::Result<()> {
        self.kernel.install_stages(|slot| chain.keeps(slot))
    }

    /// Measures from now on with the chain cut as `chain` says.
    fn cut(&mut self, chain: Chain) -> anyhow::Result<()> {
        self.install(chain)?;
        self.chain = chain;
        Ok(())
    }

    /// Runs packets that set flows up for the ones measured next (hellos
    /// before their data), through the whole chain whatever is measured
    /// (all at once: a stage slot's update waits for an RCU grace period).
    fn setup<'a>(&mut self, packets: impl IntoIterator<Item = &'a [u8]>) -> anyhow::Result<()> {
        if self.chain != Chain::Whole {
            self.install(Chain::Whole)?;
        }
        for packet in packets {
            self.kernel.test_run(packet, 1)?;
        }
        if self.chain != Chain::Whole {
            self.install(self.chain)?;
        }
        Ok(())
    }

    fn next_flow(&mut self) -> usize {
        self.flow += 1;
        self.flow
    }

    /// Runs `packet` once in blokir and once in the no-op: the two
    /// durations in ns; checks blokir's verdict (when the whole chain runs).
    fn pair(&mut self, packet: &[u8], want: u32, what: &str) -> anyhow::Result<(f64, f64)> {
        let (action, out, d) = self.kernel.test_run(packet, 1)?;
        let action = if action == XDP_PASS && out != packet { PASS_AS_RST } else { action };
        if action != want && self.chain == Chain::Whole {
            bail!("{what}: blokir returned {} where {} was expected", blokir_tests::action_name(action), blokir_tests::action_name(want));
        }
        let (_, dn) = noop::test_run(&self.noop, packet, 1)?;
        Ok((d.as_nanos() as f64, dn.as_nanos() as f64))
    }

    fn hot(&mut self, packet: &[u8]) -> anyhow::Result<(f64, f64)> {
        let (_, _, d) = self.kernel.test_run(packet, HOT_REPEAT)?;
        let (_, dn) = noop::test_run(&self.noop, packet, HOT_REPEAT)?;
        Ok((d.as_nanos() as f64, dn.as_nanos() as f64))
    }
}

fn trimmed_mean(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let keep = (v.len() * 99 / 100).max(1);
    v[..keep].iter().sum::<f64>() / keep as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Collected per-run durations of one class.
#[derive(Default)]
struct Runs {
    blokir: Vec<f64>,
    noop: Vec<f64>,
    hot: (f64, f64),
}

impl Runs {
    fn push(&mut self, (b, n): (f64, f64)) {
        self.blokir.push(b);
        self.noop.push(n);
    }

    fn result(mut self, class: &'static str, rules: usize) -> ClassResult {
        ClassResult {
            class,
            rules,
            packets: self.blokir.len(),
            cold_mean: trimmed_mean(&mut self.blokir),
            cold_median: median(&mut self.blokir),
            noop_mean: trimmed_mean(&mut self.noop),
            noop_median: median(&mut self.noop),
            hot: self.hot.0,
            hot_noop: self.hot.1,
        }
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// The BPF maps process `pid` holds, once each, with the kernel's memory
/// accounting for each (`memlock` in fdinfo).
pub fn maps_of(pid: &str) -> anyhow::Result<Vec<MapMem>> {
    let mut seen = std::collections::HashSet::new();
    let mut maps = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
        let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)?.trim().parse::<u64>().ok());
        let (Some(id), Some(map_type)) = (field("map_id:"), field("map_type:")) else { continue };
        if !seen.insert(id) {
            continue;
        }
        maps.push(MapMem {
            map_type: map_type as u32,
            max_entries: field("max_entries:").unwrap_or(0),
            key_size: field("key_size:").unwrap_or(0),
            value_size: field("value_size:").unwrap_or(0),
            memlock: field("memlock:").unwrap_or(0),
        });
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.memlock));
    Ok(maps)
}

fn parse_timed(path: &Path) -> anyhow::Result<(Vec<Rule>, f64)> {
    let t = Instant::now();
    let rules = read_rules(path).map_err(|e| anyhow::anyhow!(e.report()))?;
    Ok((rules, t.elapsed().as_secs_f64()))
}

pub fn run(list: &List, index: &ListIndex, p: &Params) -> anyhow::Result<Micro> {
    let max = *p.counts.iter().max().context("no rule counts")?;
    let capacity = (max as u32).next_power_of_two().max(1 << 16);
    let path = p.dir.join("list-max.rules");
    std::fs::write(&path, list.file_text(max))?;

    let mut load = LoadResult { capacity, rss_before: rss_kib(), ..Default::default() };
    let t = Instant::now();
    let kernel = Kernel::load(capacity).context("loading blokir (needs root)")?;
    load.program_load_s = t.elapsed().as_secs_f64();
    let engine = Engine::new([lane_multiplier(rand::random()), lane_multiplier(rand::random())], capacity as usize, capacity);
    let noop = noop::load_xdp_pass().context("loading the no-op XDP program")?;
    let mut b = Bench { kernel, engine, noop, flow: 0, chain: Chain::Whole };
    // The daemon's default settings (QUIC read on every UDP port but 53,
    // fragments and tampering blocked...), as an operator runs it.
    let mut cfg = b.engine.config();
    DnsPolicy::default().apply_to(&mut cfg);
    TrafficPolicy::default().apply_to(&mut cfg)?;
    b.kernel.write_config(cfg)?;

    // The daemon's path: read the file, plan, write the maps.
    let (rules, parse_s) = parse_timed(&path)?;
    if rules.len() != max {
        bail!("the list file gave {} rules, not {max}", rules.len());
    }
    let (plan_s, apply_s, _) = b.set(&rules, Some(path.clone()))?;
    (load.parse_s, load.plan_s, load.apply_s) = (parse_s, plan_s, apply_s);
    load.nodes = b.engine.node_count();
    load.maps = maps_of("self")?;
    load.rss_after = rss_kib();
    eprintln!("bench: loaded {max} rules in {:.2} s (parse {parse_s:.2}, plan {plan_s:.2}, write {apply_s:.2})", load.load_s());

    let (one, two) = packets::hello_templates()?;
    let hello_clients = (one.client.to_string(), two.client.to_string());
    let mut g = NameGen::new(0xb10c);
    let allowed = unlisted(&mut g, list, index, p.samples);

    let mut results = Vec::new();
    let mut stages = Vec::new();
    let mut counts = p.counts.clone();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    for (n, &k) in counts.iter().enumerate() {
        if n > 0 {
            let rules: Vec<Rule> = (0..k).map(|i| Rule::parse(&list.rule(i))).collect::<Result<_, _>>()?;
            b.set(&rules, None)?;
        }
        eprintln!("bench: measuring every class with {k} rules");
        let whole = classes(&mut b, list, k, &allowed, &mut g, &one, &two, p.samples)?;
        if n == 0 {
            let mut cut = Vec::new();
            for chain in [Chain::Entry, Chain::Readers] {
                eprintln!("bench: measuring every class with the chain cut: {chain:?}");
                b.cut(chain)?;
                cut.push(classes(&mut b, list, k, &allowed, &mut g, &one, &two, p.samples)?);
            }
            b.cut(Chain::Whole)?;
            stages = whole
                .iter()
                .zip(&cut[0])
                .zip(&cut[1])
                .map(|((w, e), r)| StageSplit { class: w.class, entry: e.net(), readers: r.net(), whole: w.net() })
                .collect();
            swap(&mut b, list, max, &p.dir, &mut load)?;
        }
        results.extend(whole);
    }
    Ok(Micro { results, stages, load, hello_clients })
}

/// Replaces the loaded list by a version with 1% of its rules changed.
fn swap(b: &mut Bench, list: &List, max: usize, dir: &Path, load: &mut LoadResult) -> anyhow::Result<()> {
    let mut g = NameGen::new(0x5a9);
    let mut text = String::with_capacity(max * 24);
    let mut changed = 0;
    for i in 0..max {
        if i % 100 == 50 {
            text.push_str(&format!("{}.changed.example\n", g.label()));
            changed += 1;
        } else {
            text.push_str(&list.rule(i));
            text.push('\n');
        }
    }
    let path = dir.join("list-v2.rules");
    std::fs::write(&path, text)?;
    let (rules, parse_s) = parse_timed(&path)?;
    let (plan_s, apply_s, writes) = b.set(&rules, Some(path))?;
    (load.swap_parse_s, load.swap_plan_s, load.swap_apply_s, load.swap_writes, load.swap_changed) = (parse_s, plan_s, apply_s, writes, changed);
    eprintln!("bench: swapped in a version with {changed} rules changed in {:.2} s ({writes} map writes)", load.swap_s());
    // Back to the original, for the measurements that follow.
    let rules: Vec<Rule> = (0..max).map(|i| Rule::parse(&list.rule(i))).collect::<Result<_, _>>()?;
    b.set(&rules, None)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn classes(
    b: &mut Bench,
    list: &List,
    k: usize,
    allowed: &[String],
    g: &mut NameGen,
    one: &HelloTemplate,
    two: &HelloTemplate,
    samples: usize,
) -> anyhow::Result<Vec<ClassResult>> {
    let pick = |g: &mut NameGen, subtree: bool| loop {
        let i = g.rng().random_range(0..k);
        if List::is_subtree(i) == subtree {
            break i;
        }
    };
    let mut out = Vec::new();
    // A blocked TLS flow's name segment goes on as a RST to the server.
    let verdict = |listed: bool| if listed { PASS_AS_RST } else { XDP_PASS };

    // DNS.
    let mut runs = Runs::default();
    for (i, name) in allowed.iter().enumerate() {
        runs.push(b.pair(&packets::dns_query(name, i), XDP_PASS, "allowed DNS query")?);
    }
    runs.hot = b.hot(&packets::dns_query(&allowed[0], 0))?;
    out.push(runs.result("dns_allowed", k));

    let mut runs = Runs::default();
    let mut first = None;
    for i in 0..samples {
        let pkt = packets::dns_query(&list.names[pick(g, false)], i);
        runs.push(b.pair(&pkt, XDP_DROP, "DNS query for an exact rule")?);
        first.get_or_insert(pkt);
    }
    runs.hot = b.hot(first.as_ref().context("no samples")?)?;
    out.push(runs.result("dns_blocked_exact", k));

    let mut runs = Runs::default();
    let mut first = None;
    for i in 0..samples {
        let name = format!("{}.{}", g.label(), list.names[pick(g, true)]);
        let pkt = packets::dns_query(&name, i);
        runs.push(b.pair(&pkt, XDP_DROP, "DNS query below a subtree rule")?);
        first.get_or_insert(pkt);
    }
    runs.hot = b.hot(first.as_ref().context("no samples")?)?;
    out.push(runs.result("dns_blocked_subtree", k));

    // TLS: each hello a new flow; half to listed names.
    let tls_name = |g: &mut NameGen, i: usize| -> (String, bool) {
        if i.is_multiple_of(2) { (list.names[pick(g, false)].clone(), true) } else { (allowed[i].clone(), false) }
    };
    let mut runs = Runs::default();
    for i in 0..samples {
        let (name, listed) = tls_name(g, i);
        let flow = b.next_flow();
        let seg = packets::hello_segments(one, &name, flow, false)?.remove(0);
        runs.push(b.pair(&seg, verdict(listed), "one-segment ClientHello")?);
    }
    // Hot: the same segment again and again (after the first run, the flow's
    // state reads it as a retransmission).
    let flow = b.next_flow();
    runs.hot = b.hot(&packets::hello_segments(one, &allowed[1], flow, false)?.remove(0))?;
    out.push(runs.result("tls_one_segment", k));

    let (mut r1, mut r2) = (Runs::default(), Runs::default());
    for i in 0..samples {
        let (name, listed) = tls_name(g, i);
        let flow = b.next_flow();
        let segs = packets::hello_segments(two, &name, flow, true)?;
        r1.push(b.pair(&segs[0], XDP_PASS, "first segment of a split ClientHello")?);
        r2.push(b.pair(&segs[1], verdict(listed), "second segment of a split ClientHello")?);
    }
    let flow = b.next_flow();
    let segs = packets::hello_segments(two, &allowed[1], flow, true)?;
    r1.hot = b.hot(&segs[0])?;
    let flow = b.next_flow();
    let segs = packets::hello_segments(two, &allowed[1], flow, true)?;
    b.setup([&segs[0][..]])?;
    r2.hot = b.hot(&segs[1])?;
    out.push(r1.result("tls_split_first", k));
    out.push(r2.result("tls_split_second", k));

    // HTTP requests to unlisted names (their Host is read and matched).
    let mut runs = Runs::default();
    for name in allowed {
        let flow = b.next_flow();
        runs.push(b.pair(&packets::http_get(name, flow), XDP_PASS, "HTTP GET")?);
    }
    runs.hot = b.hot(&packets::http_get(&allowed[0], 0))?;
    out.push(runs.result("http_get", k));

    let mut runs = Runs::default();
    for i in 0..samples {
        runs.push(b.pair(&packets::udp_other(i), XDP_PASS, "UDP datagram")?);
    }
    runs.hot = b.hot(&packets::udp_other(0))?;
    out.push(runs.result("udp_other", k));

    let mut runs = Runs::default();
    for _ in 0..samples {
        let flow = b.next_flow();
        runs.push(b.pair(&packets::tcp_ack(flow), XDP_PASS, "TCP ACK")?);
    }
    runs.hot = b.hot(&packets::tcp_ack(0))?;
    out.push(runs.result("tcp_ack", k));

    let mut runs = Runs::default();
    for _ in 0..samples {
        let flow = b.next_flow();
        runs.push(b.pair(&packets::tcp_syn(flow), XDP_PASS, "TCP SYN")?);
    }
    runs.hot = b.hot(&packets::tcp_syn(0))?;
    out.push(runs.result("tcp_syn", k));

    // Data of flows already decided: the hello (to an unlisted name) run
    // first, unmeasured; then a data segment after it.
    let mut hellos = Vec::with_capacity(samples);
    let mut data = Vec::with_capacity(samples);
    for i in 0..samples {
        let flow = b.next_flow();
        let name = &allowed[i % allowed.len()];
        let hello = packets::hello_segments(one, name, flow, false)?.remove(0);
        let seq = 1_000_000u32 + (hello.len() - 54) as u32;
        data.push(packets::tcp_data(flow, seq));
        hellos.push(hello);
    }
    b.setup(hellos.iter().map(Vec::as_slice))?;
    let mut runs = Runs::default();
    for pkt in &data {
        runs.push(b.pair(pkt, XDP_PASS, "TCP data of an allowed flow")?);
    }
    runs.hot = b.hot(data.first().context("no samples")?)?;
    out.push(runs.result("tcp_data", k));

    // QUIC Initials of new flows, their ClientHellos to unlisted names:
    // copied to the daemon's perf buffer (open here, and drained between
    // runs as the daemon's reader would). Hot: the same flow's Initial
    // again, over the per-flow cap after the first few.
    let mut sink = b.kernel.quic_sink()?;
    let mut runs = Runs::default();
    for i in 0..samples {
        let flow = b.next_flow();
        let pkt = packets::quic_initial(&allowed[i % allowed.len()], flow);
        runs.push(b.pair(&pkt, XDP_PASS, "QUIC Initial")?);
        sink.drain();
    }
    let flow = b.next_flow();
    runs.hot = b.hot(&packets::quic_initial(&allowed[0], flow))?;
    sink.drain();
    out.push(runs.result("quic_initial", k));
    for r in &out {
        eprintln!(
            "  {:<20} {:>7} rules: {:>6.0} ns cold (no-op {:>4.0}, net {:>5.0}), hot net {:>5.0}",
            r.class,
            r.rules,
            r.cold_mean,
            r.noop_mean,
            r.net(),
            r.hot_net()
        );
    }
    Ok(out)
}
