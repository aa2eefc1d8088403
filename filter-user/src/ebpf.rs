//! The XDP program and its maps, as the daemon and the tests use them.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, ProgramArray},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use filter_common::{
    counters,
    reply::DnsAction,
    rules::{
        Config, DNS_PROGRAM_NAME, MAP_CONFIG, MAP_COUNTERS, MAP_EVENTS, MAP_FLOWS, MAP_LIST_ACTIONS, MAP_LIST_HITS, MAP_RULE_HITS, MAP_RULES, MAP_STAGES,
        MATCH_PROGRAM_NAME, MAX_LISTS, NameKey, NodeRules, PROGRAM_NAME, REPLY_PROGRAM_NAME, STAGE_DNS, STAGE_MATCH, STAGE_REPLY, STAGE_TLS, TLS_PROGRAM_NAME,
    },
    tls::{FlowKey, Hello},
};

use crate::rules::Target;

/// The entry program and the stages it tail-calls.
const PROGRAMS: [&str; 5] = [PROGRAM_NAME, DNS_PROGRAM_NAME, TLS_PROGRAM_NAME, MATCH_PROGRAM_NAME, REPLY_PROGRAM_NAME];

/// The XDP program, built by build.rs with the pinned BPF toolchain.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/blokir"));

/// How to attach: native (driver) XDP, generic (skb) XDP, or native with a
/// fallback to generic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Native,
    Generic,
    #[default]
    Auto,
}

pub struct Attachment {
    pub iface: String,
    pub mode: Mode,
    link: XdpLinkId,
}

/// The loaded program and typed handles on its maps.
pub struct Kernel {
    ebpf: Ebpf,
    rules: HashMap<MapData, NameKey, NodeRules>,
    config: Array<MapData, Config>,
    counters: PerCpuArray<MapData, u64>,
    list_hits: PerCpuArray<MapData, u64>,
    list_actions: Array<MapData, u32>,
    rule_hits: Array<MapData, u64>,
    hits_view: HitsView,
    /// Kept open: the kernel empties a program array once no file refers to it.
    _stages: ProgramArray<MapData>,
    cfg: Config,
    attachments: Vec<Attachment>,
    capacity: u32,
}

impl Kernel {
    /// Loads the program through the verifier with maps for `capacity` rule
    /// nodes and rule ids.
    pub fn load(capacity: u32) -> anyhow::Result<Self> {
        let mut ebpf =
            EbpfLoader::new().map_max_entries(MAP_RULES, capacity).map_max_entries(MAP_RULE_HITS, capacity).load(OBJECT).context("loading the BPF object")?;
        for name in PROGRAMS {
            let prog: &mut Xdp = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?.try_into()?;
            prog.load().with_context(|| format!("the kernel's verifier refused the XDP program {name}"))?;
        }
        let stage_fd = |ebpf: &Ebpf, name: &str| -> anyhow::Result<_> {
            let prog: &Xdp = ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?;
            Ok(prog.fd()?.try_clone()?)
        };
        let stages_fds = [
            (STAGE_DNS, stage_fd(&ebpf, DNS_PROGRAM_NAME)?),
            (STAGE_TLS, stage_fd(&ebpf, TLS_PROGRAM_NAME)?),
            (STAGE_MATCH, stage_fd(&ebpf, MATCH_PROGRAM_NAME)?),
            (STAGE_REPLY, stage_fd(&ebpf, REPLY_PROGRAM_NAME)?),
        ];
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the object"));
        let rules = HashMap::try_from(take(MAP_RULES)?)?;
        let config = Array::try_from(take(MAP_CONFIG)?)?;
        let counters = PerCpuArray::try_from(take(MAP_COUNTERS)?)?;
        let list_hits = PerCpuArray::try_from(take(MAP_LIST_HITS)?)?;
        let list_actions = Array::try_from(take(MAP_LIST_ACTIONS)?)?;
        let hits_map = take(MAP_RULE_HITS)?;
        let hits_view = match &hits_map {
            Map::Array(data) => HitsView::map(data, capacity)?,
            _ => bail!("{MAP_RULE_HITS} is not an array"),
        };
        let rule_hits = Array::try_from(hits_map)?;
        let mut stages = ProgramArray::try_from(take(MAP_STAGES)?)?;
        for (slot, fd) in &stages_fds {
            stages.set(*slot, fd, 0).context("installing the tail-called stages")?;
        }
        Ok(Kernel {
            ebpf,
            rules,
            config,
            counters,
            list_hits,
            list_actions,
            rule_hits,
            hits_view,
            _stages: stages,
            cfg: Config::default(),
            attachments: Vec::new(),
            capacity,
        })
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    fn program(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self.ebpf.program_mut(PROGRAM_NAME).ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing"))?.try_into()?)
    }

    /// Instructions the verifier processed to accept each program.
    pub fn verified_instructions(&self) -> anyhow::Result<Vec<(&'static str, Option<u32>)>> {
        PROGRAMS
            .into_iter()
            .map(|name| {
                let prog: &Xdp = self.ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?;
                Ok((name, prog.info()?.verified_instruction_count()))
            })
            .collect()
    }

    /// Runs the program on one packet with BPF_PROG_TEST_RUN: returns the XDP
    /// action and the packet as the program left it.
    pub fn test_run(&mut self, packet: &[u8], repeat: u32) -> anyhow::Result<(u32, Vec<u8>, std::time::Duration)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions { data_in: Some(packet), data_out: Some(&mut out), repeat, ..Default::default() };
        let result = self.program()?.test_run(opts)?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration))
    }

    pub fn write_config(&mut self, cfg: Config) -> anyhow::Result<()> {
        self.config.set(0, cfg, 0).context("writing the program's settings")?;
        self.cfg = cfg;
        Ok(())
    }

    /// What the program does with blocked UDP queries of list `id`.
    pub fn write_list_action(&mut self, id: u8, action: DnsAction) -> anyhow::Result<()> {
        self.list_actions.set(u32::from(id), action as u32, 0).context("writing a list's DNS action")
    }

    pub fn attach(&mut self, iface: &str, mode: Mode) -> anyhow::Result<Mode> {
        let prog = self.program()?;
        let attempt = |prog: &mut Xdp, m: XdpMode| prog.attach(iface, m);
        let (link, used) = match mode {
            Mode::Native => (attempt(prog, XdpMode::Driver), Mode::Native),
            Mode::Generic => (attempt(prog, XdpMode::Skb), Mode::Generic),
            Mode::Auto => match attempt(prog, XdpMode::Driver) {
                Ok(link) => (Ok(link), Mode::Native),
                Err(e) => {
                    tracing::warn!(iface, "native XDP unavailable ({e}); using generic XDP");
                    (attempt(prog, XdpMode::Skb), Mode::Generic)
                }
            },
        };
        let link = link.map_err(|e: ProgramError| anyhow!(e)).with_context(|| format!("attaching to {iface}"))?;
        self.attachments.push(Attachment { iface: iface.to_string(), mode: used, link });
        Ok(used)
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Detaches from every interface.
    pub fn detach_all(&mut self) {
        let attachments = std::mem::take(&mut self.attachments);
        for a in attachments {
            match self.program().and_then(|p| Ok(p.detach(a.link)?)) {
                Ok(()) => tracing::info!(iface = a.iface, "detached"),
                Err(e) => tracing::error!(iface = a.iface, "detaching: {e:#}"),
            }
        }
    }

    /// The global counters, summed over CPUs, indexed as in `counters`.
    pub fn counters(&self) -> anyhow::Result<Vec<u64>> {
        (0..counters::COUNTERS).map(|i| Ok(self.counters.get(&i, 0)?.iter().sum())).collect()
    }

    /// `[blocked, allowed]` for list `id`, summed over CPUs.
    pub fn list_hits(&self, id: u8) -> anyhow::Result<[u64; 2]> {
        let base = u32::from(id) * counters::LIST_COUNTERS;
        debug_assert!(u32::from(id) < MAX_LISTS);
        let get = |k: u32| -> anyhow::Result<u64> { Ok(self.list_hits.get(&(base + k), 0)?.iter().sum()) };
        Ok([get(counters::LIST_BLOCKED)?, get(counters::LIST_ALLOWED)?])
    }

    /// Hit counters of all rule ids, read straight from the mapped array.
    pub fn rule_hits(&self) -> &[u64] {
        self.hits_view.as_slice()
    }

    /// Entries in the TLS flow table and its capacity (see `FlowTable`).
    pub fn flow_entries(&self) -> anyhow::Result<(u64, u32)> {
        let t = self.flow_table()?;
        Ok((t.count()?, t.capacity))
    }

    /// A handle of its own on the TLS flow table, to count it without
    /// holding the daemon's lock.
    pub fn flow_table(&self) -> anyhow::Result<FlowTable> {
        let Some(Map::LruHashMap(data)) = self.ebpf.map(MAP_FLOWS) else { bail!("{MAP_FLOWS} is missing or not an LRU hash map") };
        let info = data.info()?;
        let map = Map::from_map_data(MapData::from_id(info.id())?)?;
        Ok(FlowTable { map, capacity: info.max_entries() })
    }

    /// The kernel's memory accounting (`memlock` in fdinfo) of every map the
    /// programs use, by map name.
    pub fn map_memory(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut ids = std::collections::BTreeSet::new();
        for name in PROGRAMS {
            let prog: &Xdp = self.ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?;
            ids.extend(prog.info()?.map_ids()?.unwrap_or_default());
        }
        let mut out = Vec::new();
        for id in ids {
            let info = aya::maps::MapInfo::from_id(id)?;
            let fd = info.fd()?;
            let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))?;
            let bytes = fdinfo.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            out.push((info.name_as_str().unwrap_or("").to_string(), bytes));
        }
        Ok(out)
    }

    /// The event ring buffer (for the one reader of the event log).
    pub fn take_events(&mut self) -> anyhow::Result<aya::maps::RingBuf<MapData>> {
        let map = self.ebpf.take_map(MAP_EVENTS).ok_or_else(|| anyhow!("map {MAP_EVENTS} missing (or already taken)"))?;
        Ok(aya::maps::RingBuf::try_from(map)?)
    }

    /// A map of the loaded object (for tests that fill or inspect it).
    pub fn map(&self, name: &str) -> Option<&Map> {
        self.ebpf.map(name)
    }
    pub fn map_mut(&mut self, name: &str) -> Option<&mut Map> {
        self.ebpf.map_mut(name)
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.detach_all();
    }
}

impl Target for Kernel {
    fn write_node(&mut self, key: &NameKey, value: Option<&NodeRules>) -> anyhow::Result<()> {
        match value {
            Some(v) => self.rules.insert(key, v, 0).context("writing the rule map"),
            None => match self.rules.remove(key) {
                Ok(()) => Ok(()),
                Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(e).context("removing from the rule map"),
            },
        }
    }

    fn write_depth_mask(&mut self, mask: [u64; 2]) -> anyhow::Result<()> {
        let cfg = Config { depth_mask: mask, ..self.cfg };
        self.write_config(cfg)
    }

    fn reset_hits(&mut self, id: u32) -> anyhow::Result<()> {
        self.rule_hits.set(id, 0, 0).context("resetting a rule's hit counter")
    }
}

/// The TLS flow table, counted by walking its keys (BPF_MAP_GET_NEXT_KEY,
/// one syscall per entry: 150 ms for 64K entries in a release build, 250 ms
/// in a debug one, measured by tests/tests/e2e_metrics.rs; /metrics caches
/// the count). A key
/// deleted during the walk restarts it from the first key, so under heavy
/// churn the count can overshoot: it is capped at the capacity.
pub struct FlowTable {
    map: Map,
    pub capacity: u32,
}

impl FlowTable {
    pub fn count(&self) -> anyhow::Result<u64> {
        let flows: HashMap<&MapData, FlowKey, Hello> = HashMap::try_from(&self.map)?;
        Ok(flows.keys().take(self.capacity as usize).filter(Result::is_ok).count() as u64)
    }
}

/// A read-only mapping of the (BPF_F_MMAPABLE) rule-hit array: scraping
/// millions of counters costs a memory read, not a syscall each.
struct HitsView {
    ptr: NonNull<u64>,
    len: usize,
    bytes: usize,
}

// SAFETY: a read-only shared mapping; the kernel updates it atomically.
unsafe impl Send for HitsView {}
unsafe impl Sync for HitsView {}

impl HitsView {
    fn map(data: &MapData, len: u32) -> anyhow::Result<Self> {
        let bytes = (len as usize * 8).next_multiple_of(4096);
        // SAFETY: mapping a BPF array fd read-only; the kernel checks the size.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ, libc::MAP_SHARED, data.fd().as_fd().as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            bail!("mapping {MAP_RULE_HITS}: {}", std::io::Error::last_os_error());
        }
        Ok(HitsView { ptr: NonNull::new(ptr.cast()).ok_or_else(|| anyhow!("mmap returned null"))?, len: len as usize, bytes })
    }

    fn as_slice(&self) -> &[u64] {
        // SAFETY: `len` u64s are mapped for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HitsView {
    fn drop(&mut self) {
        // SAFETY: unmapping what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}
