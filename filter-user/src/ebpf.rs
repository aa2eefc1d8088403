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
        Config, DNS_PROGRAM_NAME, HTTP_PORT_WORDS, HTTP_PROGRAM_NAME, MAP_CONFIG, MAP_COUNTERS, MAP_HTTP_PORTS, MAP_LIST_ACTIONS, MAP_LIST_HITS, MAP_RULE_HITS,
        MAP_RULES, MAP_STAGES, MATCH_PROGRAM_NAME, MAX_LISTS, NameKey, NodeRules, PROGRAM_NAME, REPLY_PROGRAM_NAME, STAGE_DNS, STAGE_HTTP, STAGE_MATCH,
        STAGE_REPLY, STAGE_TLS, TLS_PROGRAM_NAME,
    },
};

use crate::rules::Target;

/// The entry program and the stages it tail-calls.
const PROGRAMS: [&str; 6] = [PROGRAM_NAME, DNS_PROGRAM_NAME, TLS_PROGRAM_NAME, HTTP_PROGRAM_NAME, MATCH_PROGRAM_NAME, REPLY_PROGRAM_NAME];

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
    http_ports_written: bool,
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
            (STAGE_HTTP, stage_fd(&ebpf, HTTP_PROGRAM_NAME)?),
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
            http_ports_written: false,
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

    /// The settings last written.
    pub fn config(&self) -> Config {
        self.cfg
    }

    pub fn write_config(&mut self, cfg: Config) -> anyhow::Result<()> {
        if cfg.http_ports != self.cfg.http_ports || !self.http_ports_written {
            self.write_http_ports(&cfg)?;
        }
        self.config.set(0, cfg, 0).context("writing the program's settings")?;
        self.cfg = cfg;
        Ok(())
    }

    /// The HTTP ports' bitmap: the ports added first, then the others
    /// removed, so a port kept in the set never leaves it.
    fn write_http_ports(&mut self, cfg: &Config) -> anyhow::Result<()> {
        let mut words = [0u64; HTTP_PORT_WORDS as usize];
        for p in cfg.http_ports.iter().filter(|p| **p != 0) {
            words[usize::from(*p) / 64] |= 1 << (p % 64);
        }
        let mut map: Array<&mut MapData, u64> = Array::try_from(self.ebpf.map_mut(MAP_HTTP_PORTS).ok_or_else(|| anyhow!("map {MAP_HTTP_PORTS} missing"))?)?;
        for (i, w) in words.iter().enumerate() {
            let old = map.get(&(i as u32), 0)?;
            if old != *w {
                map.set(i as u32, old | w, 0).context("writing the HTTP ports")?;
                map.set(i as u32, w, 0).context("writing the HTTP ports")?;
            }
        }
        self.http_ports_written = true;
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
