//! The XDP program and its maps, as the daemon and the tests use them.

use rayon::prelude::*;
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap as _, Map, MapData, MapError, MapInfo, MapType, PerCpuArray, ProgramArray},
    programs::{
        ProgramError, ProgramInfo, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use filter_common::{
    counters,
    dns::DNS_PORT,
    flow::Flow,
    quic::{BlockedFlow, MAP_QUIC_BLOCKED, MAP_QUIC_BLOCKED_PORTS, MAP_QUIC_INITIALS, MAP_QUIC_SEEN, QUIC_PROGRAM_NAME},
    reply::DnsAction,
    reset::{TcpAction, list_action_word},
    rules::{
        Config, DNS_PROGRAM_NAME, DNS_TCP_PROGRAM_NAME, DNS_TCP_QUESTION_PROGRAM_NAME, DNS_TCP_READ_PROGRAM_NAME, HTTP_PORT_WORDS, HTTP_PROGRAM_NAME,
        MAP_CONFIG, MAP_COUNTERS, MAP_EVENTS, MAP_FIRST_LOOK, MAP_FLOWS, MAP_HTTP_PORTS, MAP_LIST_ACTIONS, MAP_LIST_HITS, MAP_QUIC_PORTS, MAP_RULE_HITS,
        MAP_RULES, MAP_STAGES, MAP_SYNS, MAP_TLS_PORTS, MATCH_PROGRAM_NAME, MAX_LISTS, NameKey, NodeRules, PROGRAM_NAME, REPLY_PROGRAM_NAME,
        REWRITE_PROGRAM_NAME, RuleRef, STAGE_DNS, STAGE_DNS_TCP, STAGE_DNS_TCP_QUESTION, STAGE_DNS_TCP_READ, STAGE_HTTP, STAGE_MATCH, STAGE_QUIC, STAGE_REPLY,
        STAGE_REWRITE, STAGE_TLS, TLS_PROGRAM_NAME,
    },
    tls::FlowKey,
};

use crate::{
    pin::{PinDir, lists_tag, mode_name},
    rules::{Target, first_look},
};

/// The entry program and the stages it tail-calls.
const PROGRAMS: [&str; 11] = [
    PROGRAM_NAME,
    DNS_PROGRAM_NAME,
    TLS_PROGRAM_NAME,
    HTTP_PROGRAM_NAME,
    DNS_TCP_PROGRAM_NAME,
    DNS_TCP_READ_PROGRAM_NAME,
    DNS_TCP_QUESTION_PROGRAM_NAME,
    MATCH_PROGRAM_NAME,
    REPLY_PROGRAM_NAME,
    QUIC_PROGRAM_NAME,
    REWRITE_PROGRAM_NAME,
];

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

/// One interface's XDP link, pinned in the pin directory: the program stays
/// attached when the daemon exits, whatever the way.
pub struct Attachment {
    pub iface: String,
    pub mode: Mode,
    /// The pinned link's path (its file keeps the link, and so the program,
    /// attached).
    pub path: PathBuf,
    /// The link was pinned by an earlier daemon and switched to this
    /// program atomically (bpf_link_update).
    pub adopted: bool,
    /// The program the link ran before the switch, when adopted.
    pub previous_program: Option<u32>,
    link: FdLink,
}

impl Attachment {
    /// The kernel's view: the link's id and the id of the program it runs;
    /// `None` when the link no longer holds a program (interface gone).
    pub fn link_ids(&self) -> Option<(u32, u32)> {
        let info = self.link.info().ok()?;
        (info.program_id() != 0).then(|| (info.id(), info.program_id()))
    }
}

/// Whether `e` says the link is no longer attached to its interface
/// (ENOLINK from bpf_link_update).
fn is_defunct(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.raw_os_error() == Some(libc::ENOLINK)))
}

/// A map whose contents carry over from one program to the next, pinned by
/// the pin directory and reused when its layout is the one expected.
struct SharedMap {
    name: &'static str,
    file: String,
    ty: MapType,
    key: u32,
    value: u32,
    max_entries: u32,
}

impl SharedMap {
    fn all(lists: &[&str]) -> [SharedMap; 6] {
        let size = |n: usize| n as u32;
        [
            SharedMap {
                name: MAP_FLOWS,
                file: MAP_FLOWS.to_string(),
                ty: MapType::LruHash,
                key: size(size_of::<filter_common::tls::FlowKey>()),
                value: size(size_of::<Flow>()),
                max_entries: filter_common::tls::DEFAULT_FLOW_CAPACITY,
            },
            SharedMap {
                name: MAP_SYNS,
                file: MAP_SYNS.to_string(),
                ty: MapType::LruHash,
                key: size(size_of::<filter_common::tls::FlowKey>()),
                value: size(size_of::<filter_common::flow::SynRecord>()),
                max_entries: filter_common::flow::DEFAULT_SYN_CAPACITY,
            },
            SharedMap { name: MAP_COUNTERS, file: MAP_COUNTERS.to_string(), ty: MapType::PerCpuArray, key: 4, value: 8, max_entries: counters::COUNTERS },
            // List ids follow the order of the lists, so per-list counters
            // carry over only to the same ordered set of lists.
            SharedMap {
                name: MAP_LIST_HITS,
                file: format!("{MAP_LIST_HITS}_{}", lists_tag(lists)),
                ty: MapType::PerCpuArray,
                key: 4,
                value: 8,
                max_entries: counters::LIST_HITS_ENTRIES,
            },
            // Blocked QUIC flows stay blocked across a restart, as TLS
            // flows do (a handshake half done must not finish after it).
            SharedMap {
                name: MAP_QUIC_BLOCKED,
                file: MAP_QUIC_BLOCKED.to_string(),
                ty: MapType::LruHash,
                key: size(size_of::<filter_common::tls::FlowKey>()),
                value: size(size_of::<BlockedFlow>()),
                max_entries: filter_common::quic::QUIC_BLOCKED_CAPACITY,
            },
            SharedMap {
                name: MAP_QUIC_BLOCKED_PORTS,
                file: MAP_QUIC_BLOCKED_PORTS.to_string(),
                ty: MapType::Array,
                key: 4,
                value: 8,
                max_entries: HTTP_PORT_WORDS,
            },
        ]
    }

    /// Why the pinned map at `path` cannot be reused, if it cannot.
    fn incompatible(&self, info: &MapInfo) -> Option<String> {
        let ty = info.map_type().ok();
        let found = (ty, info.key_size(), info.value_size(), info.max_entries(), info.map_flags());
        let want = (Some(self.ty), self.key, self.value, self.max_entries, 0);
        (found != want).then(|| {
            format!(
                "type {:?}, key {} B, value {} B, {} entries, flags {:#x}; this program needs type {:?}, key {} B, value {} B, {} entries, flags 0",
                found.0, found.1, found.2, found.3, found.4, want.0, want.1, want.2, want.3
            )
        })
    }
}

/// The loaded program and typed handles on its maps.
pub struct Kernel {
    ebpf: Ebpf,
    rules: HashMap<MapData, NameKey, NodeRules>,
    /// The rule map's fd, for batched writes (aya has none).
    rules_fd: std::os::fd::OwnedFd,
    config: Array<MapData, Config>,
    counters: PerCpuArray<MapData, u64>,
    list_hits: PerCpuArray<MapData, u64>,
    list_actions: Array<MapData, u32>,
    rule_hits: Array<MapData, u64>,
    hits_view: Arc<SharedWords>,
    /// The first look (`FIRST_LOOK`), mapped writable.
    look: SharedWords,
    /// Kept open (and pinned by the daemon): the kernel empties a program
    /// array once no file refers to it.
    stages: ProgramArray<MapData>,
    /// The stages' programs by slot (`install_stages`).
    stage_fds: Vec<(u32, aya::programs::ProgramFd)>,
    cfg: Config,
    http_ports_written: bool,
    tls_ports_written: bool,
    quic_ports_written: bool,
    attachments: Vec<Attachment>,
    capacity: u32,
    /// Shared maps reused from a previous program (pinned ones only).
    adopted_maps: Vec<&'static str>,
    loaded_at: Option<SystemTime>,
    program_id: u32,
}

/// A port bitmap of a port set: all ones for all ports (`all` not 0), else
/// `ports`'.
fn port_set_words(all: u32, ports: &[u16]) -> [u64; HTTP_PORT_WORDS as usize] {
    if all != 0 { [u64::MAX; HTTP_PORT_WORDS as usize] } else { port_words(ports) }
}

/// A port bitmap (bit `port % 64` of word `port / 64`) of `ports` (0: an
/// unused slot).
fn port_words(ports: &[u16]) -> [u64; HTTP_PORT_WORDS as usize] {
    let mut words = [0u64; HTTP_PORT_WORDS as usize];
    for p in ports.iter().filter(|p| **p != 0) {
        words[usize::from(*p) / 64] |= 1 << (p % 64);
    }
    words
}

impl Kernel {
    /// Loads the program through the verifier with maps for `capacity` rule
    /// nodes and rule ids.
    pub fn load(capacity: u32) -> anyhow::Result<Self> {
        Self::load_with(capacity, None)
    }

    /// Loads the program with the maps that carry state across restarts
    /// (TLS flows, counters) opened from `pins` when a previous program left
    /// compatible ones there, else created and pinned. The rule maps are
    /// always new: the program that runs now keeps its own until the switch.
    /// `lists` are the list names in id order.
    pub fn load_pinned(capacity: u32, pins: &PinDir, lists: &[&str]) -> anyhow::Result<Self> {
        Self::load_with(capacity, Some((pins, lists)))
    }

    fn load_with(capacity: u32, pins: Option<(&PinDir, &[&str])>) -> anyhow::Result<Self> {
        crate::support::check_floor()?;
        let mut loader = EbpfLoader::new();
        let look_words = filter_common::rules::first_look_words(capacity);
        loader.map_max_entries(MAP_RULES, capacity).map_max_entries(MAP_RULE_HITS, capacity).map_max_entries(MAP_FIRST_LOOK, look_words);
        let mut adopted_maps = Vec::new();
        if let Some((pins, lists)) = pins {
            for m in SharedMap::all(lists) {
                let path = pins.map_path(&m.file);
                if path.exists() {
                    match MapInfo::from_pin(&path) {
                        Ok(info) => match m.incompatible(&info) {
                            None => adopted_maps.push(m.name),
                            Some(why) => {
                                tracing::warn!(map = m.name, path = %path.display(), "the pinned map has another layout ({why}): replacing it with a new one");
                                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                            }
                        },
                        Err(e) => {
                            tracing::warn!(map = m.name, path = %path.display(), "the pinned object is not a readable map ({e}): replacing it");
                            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                        }
                    }
                }
                loader.map_pin_path(m.name, path);
            }
        }
        let mut ebpf = loader.load(OBJECT).context("loading the BPF object")?;
        for name in PROGRAMS {
            let prog: &mut Xdp = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?.try_into()?;
            match prog.load() {
                Err(ProgramError::LoadError { io_error, verifier_log }) => {
                    return Err(crate::support::refused(name, &io_error, &verifier_log.to_string()).into());
                }
                r => r.with_context(|| format!("loading the XDP program {name}"))?,
            }
        }
        let (program_id, loaded_at) = {
            let prog: &Xdp = ebpf.program(PROGRAM_NAME).ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing"))?.try_into()?;
            let info = prog.info()?;
            (info.id(), info.loaded_at())
        };
        let stage_fd = |ebpf: &Ebpf, name: &str| -> anyhow::Result<_> {
            let prog: &Xdp = ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?;
            Ok(prog.fd()?.try_clone()?)
        };
        let stages_fds = [
            (STAGE_DNS, stage_fd(&ebpf, DNS_PROGRAM_NAME)?),
            (STAGE_TLS, stage_fd(&ebpf, TLS_PROGRAM_NAME)?),
            (STAGE_HTTP, stage_fd(&ebpf, HTTP_PROGRAM_NAME)?),
            (STAGE_DNS_TCP, stage_fd(&ebpf, DNS_TCP_PROGRAM_NAME)?),
            (STAGE_DNS_TCP_READ, stage_fd(&ebpf, DNS_TCP_READ_PROGRAM_NAME)?),
            (STAGE_DNS_TCP_QUESTION, stage_fd(&ebpf, DNS_TCP_QUESTION_PROGRAM_NAME)?),
            (STAGE_MATCH, stage_fd(&ebpf, MATCH_PROGRAM_NAME)?),
            (STAGE_REPLY, stage_fd(&ebpf, REPLY_PROGRAM_NAME)?),
            (STAGE_QUIC, stage_fd(&ebpf, QUIC_PROGRAM_NAME)?),
            (STAGE_REWRITE, stage_fd(&ebpf, REWRITE_PROGRAM_NAME)?),
        ];
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the object"));
        let rules_map = take(MAP_RULES)?;
        let rules_fd = match &rules_map {
            Map::HashMap(data) => data.fd().as_fd().try_clone_to_owned()?,
            _ => bail!("{MAP_RULES} is not a hash map"),
        };
        let rules = HashMap::try_from(rules_map)?;
        let config = Array::try_from(take(MAP_CONFIG)?)?;
        let counters = PerCpuArray::try_from(take(MAP_COUNTERS)?)?;
        let list_hits = PerCpuArray::try_from(take(MAP_LIST_HITS)?)?;
        let list_actions = Array::try_from(take(MAP_LIST_ACTIONS)?)?;
        let hits_map = take(MAP_RULE_HITS)?;
        let hits_view = match &hits_map {
            Map::Array(data) => Arc::new(SharedWords::map(data, capacity, MAP_RULE_HITS)?),
            _ => bail!("{MAP_RULE_HITS} is not an array"),
        };
        let rule_hits = Array::try_from(hits_map)?;
        let look = match take(MAP_FIRST_LOOK)? {
            Map::Array(data) => SharedWords::map(&data, look_words, MAP_FIRST_LOOK)?,
            _ => bail!("{MAP_FIRST_LOOK} is not an array"),
        };
        let stages_map = take(MAP_STAGES)?;
        if let Some((pins, _)) = pins {
            // The kernel empties a program array when no file refers to it any
            // more: pinned, the stages outlive this process with the program.
            let path = pins.stages_path(program_id);
            stages_map.pin(&path).with_context(|| format!("pinning the stages at {}", path.display()))?;
        }
        let mut stages = ProgramArray::try_from(stages_map)?;
        for (slot, fd) in &stages_fds {
            stages.set(*slot, fd, 0).context("installing the tail-called stages")?;
        }
        Ok(Kernel {
            ebpf,
            rules,
            rules_fd,
            config,
            counters,
            list_hits,
            list_actions,
            rule_hits,
            hits_view,
            look,
            stages,
            stage_fds: stages_fds.into(),
            cfg: Config::default(),
            http_ports_written: false,
            tls_ports_written: false,
            quic_ports_written: false,
            attachments: Vec::new(),
            capacity,
            adopted_maps,
            loaded_at,
            program_id,
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
        // The first look is this program's, sized at load: always on (rule
        // nodes reach the map only through `Target`, which sets their bits).
        let cfg = Config { look_mask: self.look.words().len() as u64 - 1, ..cfg };
        if cfg.http_ports != self.cfg.http_ports || !self.http_ports_written {
            self.write_ports(MAP_HTTP_PORTS, &port_words(&cfg.http_ports)).context("writing the HTTP ports")?;
            self.http_ports_written = true;
        }
        if (cfg.tls_ports, cfg.tls_all_ports) != (self.cfg.tls_ports, self.cfg.tls_all_ports) || !self.tls_ports_written {
            self.write_ports(MAP_TLS_PORTS, &port_set_words(cfg.tls_all_ports, &cfg.tls_ports)).context("writing the TLS ports")?;
            self.tls_ports_written = true;
        }
        if (cfg.quic_ports, cfg.quic_all_ports) != (self.cfg.quic_ports, self.cfg.quic_all_ports) || !self.quic_ports_written {
            // Port 53 is DNS's: never QUIC's.
            let mut words = port_set_words(cfg.quic_all_ports, &cfg.quic_ports);
            words[usize::from(DNS_PORT) / 64] &= !(1 << (DNS_PORT % 64));
            self.write_ports(MAP_QUIC_PORTS, &words).context("writing the QUIC ports")?;
            self.quic_ports_written = true;
        }
        self.config.set(0, cfg, 0).context("writing the program's settings")?;
        self.cfg = cfg;
        Ok(())
    }

    /// A port bitmap (`HTTP_PORTS`, `TLS_PORTS`, `QUIC_PORTS`): the ports added first,
    /// then the others removed, so a port kept in the set never leaves it.
    fn write_ports(&mut self, name: &str, words: &[u64; HTTP_PORT_WORDS as usize]) -> anyhow::Result<()> {
        let mut map: Array<&mut MapData, u64> = Array::try_from(self.ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing"))?)?;
        for (i, w) in words.iter().enumerate() {
            let old = map.get(&(i as u32), 0)?;
            if old != *w {
                map.set(i as u32, old | w, 0)?;
                map.set(i as u32, w, 0)?;
            }
        }
        Ok(())
    }

    /// What the program does with blocked UDP queries and blocked TCP flows
    /// of list `id`.
    pub fn write_list_action(&mut self, id: u8, action: DnsAction, tcp: TcpAction) -> anyhow::Result<()> {
        self.write_list_policy(id, action, tcp, false)
    }

    /// `write_list_action`, and whether the list is an ECH-outer list (its
    /// rules block only ClientHellos with ECH; `--ech-outer-list`).
    pub fn write_list_policy(&mut self, id: u8, action: DnsAction, tcp: TcpAction, ech_outer: bool) -> anyhow::Result<()> {
        let word = list_action_word(action, tcp) | if ech_outer { filter_common::rules::LIST_ECH_OUTER } else { 0 };
        self.list_actions.set(u32::from(id), word, 0).context("writing a list's policy")
    }

    /// Puts the program on `iface` through the link pinned in `pins`: an
    /// existing link (left by an earlier daemon) is switched to this program
    /// atomically, so every packet meets either the old program or the new
    /// one; otherwise a new link is created and pinned. An existing link keeps
    /// its mode (changing it needs a detach: `blokir cleanup` first).
    pub fn attach(&mut self, iface: &str, mode: Mode, pins: &PinDir) -> anyhow::Result<&Attachment> {
        if let Some((path, pinned_mode)) = pins.pinned_link(iface) {
            match self.adopt(iface, &path, pinned_mode) {
                Ok(a) => {
                    if mode != Mode::Auto && mode != pinned_mode {
                        tracing::warn!(
                            iface,
                            "the pinned link is in {} mode, kept (switching modes would leave the interface unfiltered for a moment); to change it, stop with --detach-on-exit or run `blokir cleanup`, then start",
                            mode_name(pinned_mode)
                        );
                    }
                    self.attachments.push(a);
                    return Ok(self.attachments.last().expect("just pushed"));
                }
                Err(e) if is_defunct(&e) => {
                    // The link's interface went away (and maybe came back):
                    // it filters nothing and cannot be updated.
                    tracing::warn!(iface, path = %path.display(), "the pinned link is no longer attached ({e:#}); attaching anew");
                    pins.remove_link(iface)?;
                }
                Err(e) => return Err(e.context(format!("taking over {iface}: the previous program stays attached"))),
            }
        }
        let a = self.attach_new(iface, mode, pins)?;
        self.attachments.push(a);
        Ok(self.attachments.last().expect("just pushed"))
    }

    fn adopt(&mut self, iface: &str, path: &std::path::Path, mode: Mode) -> anyhow::Result<Attachment> {
        let fd_link = FdLink::from(PinnedLink::from_pin(path)?);
        let previous_program = Some(fd_link.info()?.program_id());
        let xdp_link = XdpLink::try_from(fd_link).context("the pinned object is not an XDP link")?;
        let prog = self.program()?;
        let id = prog.attach_to_link(xdp_link).context("switching the link to the new program (bpf_link_update)")?;
        let link = FdLink::try_from(prog.take_link(id)?)?;
        Ok(Attachment { iface: iface.to_string(), mode, path: path.to_path_buf(), adopted: true, previous_program, link })
    }

    fn attach_new(&mut self, iface: &str, mode: Mode, pins: &PinDir) -> anyhow::Result<Attachment> {
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
        let id = link.map_err(|e: ProgramError| anyhow!(e)).with_context(|| format!("attaching to {iface}"))?;
        // A netlink attachment (kernels before 5.9) cannot be pinned: it is
        // detached again when dropped here.
        let link = FdLink::try_from(prog.take_link(id)?)
            .map_err(|_| anyhow!("attaching to {iface}: the kernel has no XDP bpf_link (Linux 5.9 or later is needed)"))?;
        let path = pins.link_path(iface, used);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let pinned = link.pin(&path).with_context(|| format!("pinning the link of {iface} at {}", path.display()))?;
        Ok(Attachment { iface: iface.to_string(), mode: used, path, adopted: false, previous_program: None, link: pinned.into() })
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Which shared maps (TLS flows, counters) came from a previous program.
    pub fn adopted_maps(&self) -> &[&'static str] {
        &self.adopted_maps
    }

    /// The entry program's kernel id and load time.
    pub fn program_info(&self) -> anyhow::Result<ProgramInfo> {
        let prog: &Xdp = self.ebpf.program(PROGRAM_NAME).ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing"))?.try_into()?;
        Ok(prog.info()?)
    }

    /// The entry program's kernel id.
    pub fn program_id(&self) -> u32 {
        self.program_id
    }

    /// When the entry program was loaded.
    pub fn loaded_at(&self) -> Option<SystemTime> {
        self.loaded_at
    }

    /// Detaches from every interface: unpins the links and closes them.
    pub fn detach_all(&mut self, pins: &PinDir) {
        for a in std::mem::take(&mut self.attachments) {
            match pins.remove_link(&a.iface) {
                Ok(_) => tracing::info!(iface = a.iface, "detached"),
                Err(e) => tracing::error!(iface = a.iface, "detaching: {e:#}"),
            }
        }
    }

    /// The global counters, summed over CPUs, indexed as in `counters`.
    pub fn counters(&self) -> anyhow::Result<Vec<u64>> {
        sum_counters(&self.counters)
    }

    /// `[blocked, allowed]` for list `id`, summed over CPUs (and the
    /// daemon's QUIC verdicts).
    pub fn list_hits(&self, id: u8) -> anyhow::Result<[u64; 2]> {
        sum_list_hits(&self.list_hits, id)
    }

    /// Zeroes list `id`'s counters, for a list that takes a freed id.
    pub fn reset_list_hits(&mut self, id: u8) -> anyhow::Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let id = u32::from(id);
        for k in [counters::LIST_BLOCKED, counters::LIST_ALLOWED] {
            for i in [id * counters::LIST_COUNTERS + k, counters::user_list_index(id, k)] {
                let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])?;
                self.list_hits.set(i, zeros, 0).context("resetting a list's counters")?;
            }
        }
        Ok(())
    }

    /// Puts the loaded program back in the state `load` left it in: no rules,
    /// no flows, counters at zero, settings to be written again. Tests share
    /// one verified program this way where each load is slow (the kernel
    /// matrix's emulated guests).
    pub fn clear_state(&mut self) -> anyhow::Result<()> {
        let keys: Vec<NameKey> = self.rules.keys().collect::<Result<_, _>>()?;
        for k in &keys {
            self.rules.remove(k)?;
        }
        fn clear<V: aya::Pod>(map: Option<&mut Map>, name: &str) -> anyhow::Result<()> {
            let mut map: HashMap<&mut MapData, filter_common::tls::FlowKey, V> = map.ok_or_else(|| anyhow!("map {name} missing"))?.try_into()?;
            let keys: Vec<_> = map.keys().collect::<Result<_, _>>()?;
            keys.iter().try_for_each(|k| map.remove(k)).with_context(|| format!("emptying {name}"))
        }
        clear::<Flow>(self.ebpf.map_mut(MAP_FLOWS), MAP_FLOWS)?;
        clear::<filter_common::flow::SynRecord>(self.ebpf.map_mut(MAP_SYNS), MAP_SYNS)?;
        clear::<u32>(self.ebpf.map_mut(MAP_QUIC_SEEN), MAP_QUIC_SEEN)?;
        // Unless a test took them (`take_quic`).
        if self.ebpf.map(MAP_QUIC_BLOCKED).is_some() {
            clear::<BlockedFlow>(self.ebpf.map_mut(MAP_QUIC_BLOCKED), MAP_QUIC_BLOCKED)?;
        }
        if let Some(map) = self.ebpf.map_mut(MAP_QUIC_BLOCKED_PORTS) {
            let mut ports: Array<&mut MapData, u64> = Array::try_from(map)?;
            for i in 0..HTTP_PORT_WORDS {
                ports.set(i, 0, 0)?;
            }
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        for i in 0..counters::COUNTERS {
            self.counters.set(i, aya::maps::PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
        }
        for i in 0..counters::LIST_HITS_ENTRIES {
            self.list_hits.set(i, aya::maps::PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
        }
        for id in 0..MAX_LISTS {
            self.list_actions.set(id, 0, 0)?;
        }
        let hit: Vec<u32> = self.rule_hits().iter().enumerate().filter(|(_, n)| **n != 0).map(|(i, _)| i as u32).collect();
        for i in hit {
            self.rule_hits.set(i, 0, 0)?;
        }
        self.cfg = Config::default();
        self.config.set(0, self.cfg, 0)?;
        // The rule map is empty and the first look off (`look_mask` 0).
        for w in self.look.words() {
            w.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        self.http_ports_written = false;
        self.tls_ports_written = false;
        self.quic_ports_written = false;
        Ok(())
    }

    /// Hit counters of all rule ids, read straight from the mapped array.
    pub fn rule_hits(&self) -> &[u64] {
        self.hits_view.as_slice()
    }

    /// The flows in the flow table, and its capacity (see `FlowTable`).
    pub fn flow_census(&self) -> anyhow::Result<(FlowCensus, u32)> {
        let t = self.flow_table()?;
        Ok((t.census()?, t.capacity))
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
        map_memory(&self.map_ids()?)
    }

    /// The ids of every map the programs use.
    fn map_ids(&self) -> anyhow::Result<Vec<u32>> {
        let mut ids = std::collections::BTreeSet::new();
        for name in PROGRAMS {
            let prog: &Xdp = self.ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?;
            ids.extend(prog.info()?.map_ids()?.unwrap_or_default());
        }
        Ok(ids.into_iter().collect())
    }

    /// Handles of their own on what /metrics reads (see `MapReaders`).
    pub fn readers(&self) -> anyhow::Result<MapReaders> {
        Ok(MapReaders {
            counters: own_per_cpu(self.counters.map())?,
            list_hits: own_per_cpu(self.list_hits.map())?,
            hits: self.hits_view.clone(),
            map_ids: self.map_ids()?,
        })
    }

    /// The QUIC stage's maps, for the daemon's reader (`quic::handoff`):
    /// the Initials handed up, and where its verdicts go.
    pub fn take_quic(&mut self) -> anyhow::Result<(aya::maps::PerfEventArray<MapData>, QuicVerdicts)> {
        let mut take = |name: &str| self.ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing (or already taken)"));
        let perf = take(MAP_QUIC_INITIALS)?;
        let blocked = HashMap::try_from(take(MAP_QUIC_BLOCKED)?)?;
        let blocked_ports = Array::try_from(take(MAP_QUIC_BLOCKED_PORTS)?)?;
        let verdicts = QuicVerdicts { blocked, blocked_ports, rule_hits: self.hits_view.clone(), list_hits: own_per_cpu(self.list_hits.map())? };
        Ok((aya::maps::PerfEventArray::try_from(perf)?, verdicts))
    }

    /// Blocks QUIC flow `key` as the daemon's reader does (for `replay` and
    /// the kernel suites, which play the daemon's part with the model).
    pub fn block_quic_flow(&mut self, key: FlowKey) -> anyhow::Result<()> {
        let [Some(blocked), Some(ports)] = self.ebpf.maps_disjoint_mut([MAP_QUIC_BLOCKED, MAP_QUIC_BLOCKED_PORTS]) else {
            bail!("map {MAP_QUIC_BLOCKED} or {MAP_QUIC_BLOCKED_PORTS} missing (or taken)");
        };
        write_quic_block(&mut HashMap::try_from(blocked)?, &mut Array::try_from(ports)?, key, blocked_flow(RuleRef(1), std::time::Duration::ZERO))
    }

    /// A reader of the handed-up Initials that only drains them, for
    /// `replay` and the kernel suites, which play the daemon's part with the
    /// host model: without one, the kernel cannot hand Initials up
    /// (`undelivered`). The map stays in place for the next one.
    pub fn quic_sink(&self) -> anyhow::Result<QuicSink> {
        let Some(Map::PerfEventArray(data)) = self.ebpf.map(MAP_QUIC_INITIALS) else {
            bail!("map {MAP_QUIC_INITIALS} missing (or taken)");
        };
        let data = MapData::from_fd(data.fd().as_fd().try_clone_to_owned()?)?;
        let mut perf = aya::maps::PerfEventArray::try_from(Map::PerfEventArray(data))?;
        let cpus = aya::util::online_cpus().map_err(|(_, e)| e)?;
        let buffers = cpus.into_iter().map(|cpu| perf.open(cpu, Some(16))).collect::<Result<_, _>>()?;
        Ok(QuicSink { buffers })
    }

    /// Whether list `id` is an ECH-outer list (`LIST_ACTIONS`).
    pub fn list_is_ech_outer(&self, id: u32) -> bool {
        self.list_actions.get(&id, 0).is_ok_and(|w| w & filter_common::rules::LIST_ECH_OUTER != 0)
    }

    /// The event ring buffer (for the one reader of the event log).
    pub fn take_events(&mut self) -> anyhow::Result<aya::maps::RingBuf<MapData>> {
        let map = self.ebpf.take_map(MAP_EVENTS).ok_or_else(|| anyhow!("map {MAP_EVENTS} missing (or already taken)"))?;
        Ok(aya::maps::RingBuf::try_from(map)?)
    }

    /// Whether a probe (`first_look::Probe`) passes the first look now.
    pub fn first_look_passes(&self, block: u64, key: &NameKey) -> bool {
        first_look::may_hold(self.look.words(), block, key)
    }

    /// Installs the stages `keep` takes and empties the other slots, where a
    /// tail call returns and the packet passes: the benchmark measures how a
    /// packet's time splits between the entry program and the stages by
    /// cutting the chain short. The daemon installs them all at load.
    pub fn install_stages(&mut self, keep: impl Fn(u32) -> bool) -> anyhow::Result<()> {
        for (slot, fd) in &self.stage_fds {
            if keep(*slot) {
                self.stages.set(*slot, fd, 0).context("installing a stage")?;
            } else {
                // An empty slot's delete fails with ENOENT (aya reports it
                // as a syscall error, never as KeyNotFound): already done.
                match self.stages.clear_index(slot) {
                    Ok(()) => {}
                    Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e).context("emptying a stage's slot"),
                }
            }
        }
        Ok(())
    }

    /// A map of the loaded object (for tests that fill or inspect it).
    pub fn map(&self, name: &str) -> Option<&Map> {
        self.ebpf.map(name)
    }
    pub fn map_mut(&mut self, name: &str) -> Option<&mut Map> {
        self.ebpf.map_mut(name)
    }
}

/// Runs of inserts shorter than this are written in one call.
const PARALLEL_WRITES: usize = 1 << 16;

impl Target for Kernel {
    fn write_node(&mut self, key: &NameKey, value: Option<&NodeRules>) -> anyhow::Result<()> {
        match value {
            Some(v) => match batch::update(self.rules_fd.as_raw_fd(), std::slice::from_ref(key), std::slice::from_ref(v)) {
                (_, Ok(())) => Ok(()),
                (_, Err(e)) => Err(e).context("writing the rule map"),
            },
            None => match self.rules.remove(key) {
                Ok(()) => Ok(()),
                Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(e).context("removing from the rule map"),
            },
        }
    }

    /// Runs of inserts and of removals, each one BPF_MAP_*_BATCH call (Linux
    /// 5.6+) instead of a call per node: 2M nodes load in a fraction of the
    /// time.
    fn write_nodes(&mut self, nodes: &[(NameKey, Option<NodeRules>)]) -> Result<(), (usize, anyhow::Error)> {
        let fd = self.rules_fd.as_raw_fd();
        let mut at = 0;
        while at < nodes.len() {
            let insert = nodes[at].1.is_some();
            let run = nodes[at..].iter().take_while(|(_, v)| v.is_some() == insert).count();
            if insert {
                // A big run is written from every core in pieces, at once
                // (the hash map locks per bucket): a 2M-node load spends
                // most of its time in the kernel's inserts. Each piece is
                // copied into the call's arrays on its own, so the copies
                // of a whole run are never held at once.
                let piece = run.div_ceil(rayon::current_num_threads()).clamp(PARALLEL_WRITES, 4 * PARALLEL_WRITES);
                let failed = nodes[at..at + run]
                    .par_chunks(piece)
                    .enumerate()
                    .map(|(i, chunk)| {
                        let keys: Vec<NameKey> = chunk.iter().map(|(k, _)| *k).collect();
                        let values: Vec<NodeRules> = chunk.iter().filter_map(|(_, v)| *v).collect();
                        (i * piece, batch::update(fd, &keys, &values))
                    })
                    .filter_map(|(start, (done, result))| result.err().map(|e| (start + done, e)))
                    .min_by_key(|(n, _)| *n);
                if let Some((n, e)) = failed {
                    // Pieces after the failed one may be written: a single
                    // piece says exactly how far it got, several say all.
                    let n = if run <= piece { at + n } else { at + run };
                    return Err((n, anyhow!(e).context("writing the rule map")));
                }
            } else {
                let keys: Vec<NameKey> = nodes[at..at + run].iter().map(|(k, _)| *k).collect();
                // A node already gone is fine: skip it and go on.
                let mut from = 0;
                while from < keys.len() {
                    match batch::delete(fd, &keys[from..]) {
                        (_, Ok(())) => break,
                        (done, Err(e)) if e.raw_os_error() == Some(libc::ENOENT) => from += done + 1,
                        (done, Err(e)) => return Err((at + from + done, anyhow!(e).context("removing from the rule map"))),
                    }
                }
            }
            at += run;
        }
        Ok(())
    }

    fn write_depth_mask(&mut self, mask: [u64; 2]) -> anyhow::Result<()> {
        let cfg = Config { depth_mask: mask, ..self.cfg };
        self.write_config(cfg)
    }

    fn reset_hits(&mut self, id: u32) -> anyhow::Result<()> {
        self.rule_hits.set(id, 0, 0).context("resetting a rule's hit counter")
    }

    fn look_add(&mut self, probes: &[first_look::Probe]) -> anyhow::Result<()> {
        first_look::add(self.look.words(), probes.iter().copied());
        Ok(())
    }

    fn look_rebuild(&mut self, probes: &mut dyn Iterator<Item = first_look::Probe>) -> anyhow::Result<()> {
        let new = first_look::build(self.look.words().len(), probes);
        let changed = first_look::rebuild(self.look.words(), &new, || {});
        tracing::debug!(changed, "first look rebuilt");
        Ok(())
    }
}

/// The flow table of the TLS and HTTP stages, counted by walking it
/// (BPF_MAP_GET_NEXT_KEY and a lookup per entry: the keys alone took 150 ms
/// for 64K entries in a release build, 250 ms in a debug one, measured by
/// tests/tests/e2e_metrics.rs; /metrics caches the census). A key
/// deleted during the walk restarts it from the first key, so under heavy
/// churn the count can overshoot: it is capped at the capacity.
pub struct FlowTable {
    map: Map,
    pub capacity: u32,
}

/// The flows in the table, by protocol and state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCensus {
    pub total: u64,
    /// Hellos / requests whose name is not read yet (incomplete so far).
    pub tls_reading: u64,
    pub tls_blocked: u64,
    pub http_reading: u64,
    pub http_blocked: u64,
    /// Flows whose name passed, kept to compare later copies of its bytes
    /// (`Flow::watched`).
    pub tls_watched: u64,
    pub http_watched: u64,
    /// DNS-over-TCP connections with a query under way (never blocked as
    /// a whole).
    pub dns_tcp_reading: u64,
}

impl FlowTable {
    /// Walks the table (entries read one at a time: a flow gone meanwhile is
    /// skipped).
    pub fn census(&self) -> anyhow::Result<FlowCensus> {
        let flows: HashMap<&MapData, FlowKey, Flow> = HashMap::try_from(&self.map)?;
        let mut c = FlowCensus::default();
        for (_, flow) in flows.iter().take(self.capacity as usize).filter_map(Result::ok) {
            c.total += 1;
            if flow.kind() == filter_common::flow::KIND_DNS {
                c.dns_tcp_reading += 1;
                continue;
            }
            if flow.watched() {
                *if flow.kind() == filter_common::flow::KIND_HTTP { &mut c.http_watched } else { &mut c.tls_watched } += 1;
                continue;
            }
            // SAFETY: the variant `kind` names (see `Flow`).
            let (http, blocked) = unsafe {
                match flow.kind() {
                    filter_common::flow::KIND_HTTP => (true, flow.request.is_blocked()),
                    _ => (false, flow.hello.is_blocked()),
                }
            };
            *match (http, blocked) {
                (false, false) => &mut c.tls_reading,
                (false, true) => &mut c.tls_blocked,
                (true, false) => &mut c.http_reading,
                (true, true) => &mut c.http_blocked,
            } += 1;
        }
        Ok(c)
    }
}

/// See [`Kernel::quic_sink`].
pub struct QuicSink {
    buffers: Vec<aya::maps::perf::PerfEventArrayBuffer<MapData>>,
}

impl QuicSink {
    /// Discards what was handed up, so the buffers never fill.
    pub fn drain(&mut self) {
        for b in &mut self.buffers {
            b.for_each(|_| {});
        }
    }
}

/// Writes blocked QUIC flow `key`: its server port into
/// `QUIC_BLOCKED_PORTS` first, as a datagram that finds the flow must find
/// its port (the entry program looks the flow up only then).
fn write_quic_block<B, P>(blocked: &mut HashMap<B, FlowKey, BlockedFlow>, ports: &mut Array<P, u64>, key: FlowKey, flow: BlockedFlow) -> anyhow::Result<()>
where
    B: std::borrow::BorrowMut<MapData>,
    P: std::borrow::BorrowMut<MapData>,
{
    let word = u32::from(key.dst_port) / 64;
    let bit = 1u64 << (key.dst_port % 64);
    let old = ports.get(&word, 0).context("reading the blocked QUIC ports")?;
    if old & bit == 0 {
        ports.set(word, old | bit, 0).context("writing the blocked QUIC ports")?;
    }
    blocked.insert(key, flow, 0).context("writing a blocked QUIC flow")
}

/// Flow state blocked by `rule`, its last datagram `silent` ago.
fn blocked_flow(rule: RuleRef, silent: std::time::Duration) -> BlockedFlow {
    BlockedFlow { rule: rule.0.max(1), _pad: 0, last_ns: monotonic_ns().saturating_sub(silent.as_nanos() as u64) }
}

/// CLOCK_MONOTONIC in ns: the kernel's `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A handle of its own on per-CPU array `data` (readers that outlive the
/// loader's borrow).
fn own_per_cpu(data: &MapData) -> anyhow::Result<PerCpuArray<MapData, u64>> {
    Ok(PerCpuArray::try_from(Map::from_map_data(MapData::from_id(data.info()?.id())?)?)?)
}

/// Where the daemon's QUIC verdicts go: blocked flows into `QUIC_BLOCKED`
/// (their server port first into `QUIC_BLOCKED_PORTS`), and each verdict's
/// rule into the per-rule and per-list hits, as the match stage counts a
/// TLS verdict over TCP.
pub struct QuicVerdicts {
    blocked: HashMap<MapData, FlowKey, BlockedFlow>,
    blocked_ports: Array<MapData, u64>,
    rule_hits: Arc<SharedWords>,
    /// `LIST_HITS`, whose second half only this writes.
    list_hits: PerCpuArray<MapData, u64>,
}

impl QuicVerdicts {
    /// Blocks flow `key` by `rule`: the QUIC stage drops its datagrams
    /// from now on. Counted apart (`count`), so that the verdict is in the
    /// map first.
    pub fn block(&mut self, key: FlowKey, rule: RuleRef) -> anyhow::Result<()> {
        self.block_silent(key, rule, std::time::Duration::ZERO)
    }

    /// `block`, as if the flow's last datagram came `silent` ago (tests of
    /// the idle rule, `BLOCK_IDLE_NS`).
    pub fn block_silent(&mut self, key: FlowKey, rule: RuleRef, silent: std::time::Duration) -> anyhow::Result<()> {
        write_quic_block(&mut self.blocked, &mut self.blocked_ports, key, blocked_flow(rule, silent))
    }

    /// Counts a verdict of `rule` (`blocked`, or a hello passed by an allow
    /// rule) for the rule and its list, as the match stage counts a TLS
    /// verdict.
    pub fn count(&mut self, rule: RuleRef, blocked: bool) {
        self.rule_hits.add(rule.id());
        let kind = if blocked { counters::LIST_BLOCKED } else { counters::LIST_ALLOWED };
        let i = counters::user_list_index(rule.list(), kind);
        let r = self.list_hits.get(&i, 0).map_err(anyhow::Error::from).and_then(|values| {
            let mut v = values.to_vec();
            v[0] += 1;
            Ok(self.list_hits.set(i, aya::maps::PerCpuValues::try_from(v)?, 0)?)
        });
        if let Err(e) = r {
            tracing::warn!("counting a QUIC verdict for list {}: {e:#}", rule.list());
        }
    }
}

/// A shared mapping of a BPF_F_MMAPABLE array of u64s, read and written
/// with memory accesses, no syscall: the first look (`FIRST_LOOK`, whose
/// bits the daemon sets and clears with word stores) and the rule hits
/// (millions of counters scraped with a read each; the daemon adds its QUIC
/// verdicts' hits atomically, as the kernel adds its own).
struct SharedWords {
    ptr: NonNull<AtomicU64>,
    len: usize,
    bytes: usize,
}

// SAFETY: a shared mapping accessed only through atomics (or plain reads of
// counters, where a torn read cannot happen on aligned u64s).
unsafe impl Send for SharedWords {}
unsafe impl Sync for SharedWords {}

impl SharedWords {
    fn map(data: &MapData, len: u32, name: &str) -> anyhow::Result<Self> {
        let bytes = (len as usize * 8).next_multiple_of(4096);
        // SAFETY: mapping a BPF_F_MMAPABLE array fd; the kernel checks the size.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, data.fd().as_fd().as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            bail!("mapping {name}: {}", std::io::Error::last_os_error());
        }
        Ok(SharedWords { ptr: NonNull::new(ptr.cast()).ok_or_else(|| anyhow!("mmap returned null"))?, len: len as usize, bytes })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `len` u64s are mapped for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_slice(&self) -> &[u64] {
        // SAFETY: as `words`; counters only read.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast(), self.len) }
    }

    /// One more for word `i` (a rule's hits).
    fn add(&self, i: u32) {
        if let Some(w) = self.words().get(i as usize) {
            w.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: unmapping what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// What /metrics reads from the kernel, on handles of its own: the
/// counters, the per-list and per-rule hits, and the maps' memory. Reading
/// them never takes the daemon's lock, so a scrape never waits for a list
/// swap.
pub struct MapReaders {
    counters: PerCpuArray<MapData, u64>,
    list_hits: PerCpuArray<MapData, u64>,
    hits: Arc<SharedWords>,
    map_ids: Vec<u32>,
}

impl MapReaders {
    /// Every counter, summed over CPUs (indexes of `filter_common::counters`).
    pub fn counters(&self) -> anyhow::Result<Vec<u64>> {
        sum_counters(&self.counters)
    }

    /// `[blocked, allowed]` for list `id`, summed over CPUs (and the
    /// daemon's QUIC verdicts).
    pub fn list_hits(&self, id: u8) -> anyhow::Result<[u64; 2]> {
        sum_list_hits(&self.list_hits, id)
    }

    /// Each rule id's hits (a shared read-only mapping of the kernel's array).
    pub fn rule_hits(&self) -> &[u64] {
        self.hits.as_slice()
    }

    pub fn map_memory(&self) -> anyhow::Result<Vec<(String, u64)>> {
        map_memory(&self.map_ids)
    }
}

fn sum_counters(map: &PerCpuArray<MapData, u64>) -> anyhow::Result<Vec<u64>> {
    (0..counters::COUNTERS).map(|i| Ok(map.get(&i, 0)?.iter().sum())).collect()
}

fn sum_list_hits(map: &PerCpuArray<MapData, u64>, id: u8) -> anyhow::Result<[u64; 2]> {
    let id = u32::from(id);
    debug_assert!(id < MAX_LISTS);
    let sum = |i: u32| -> anyhow::Result<u64> { Ok(map.get(&i, 0)?.iter().sum::<u64>()) };
    let get = |k: u32| -> anyhow::Result<u64> { Ok(sum(id * counters::LIST_COUNTERS + k)? + sum(counters::user_list_index(id, k))?) };
    Ok([get(counters::LIST_BLOCKED)?, get(counters::LIST_ALLOWED)?])
}

/// The kernel's memory accounting (`memlock` in fdinfo) of maps `ids`, by name.
fn map_memory(ids: &[u32]) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for &id in ids {
        let info = aya::maps::MapInfo::from_id(id)?;
        let fd = info.fd()?;
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))?;
        let bytes = fdinfo.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        out.push((info.name_as_str().unwrap_or("").to_string(), bytes));
    }
    Ok(out)
}

/// BPF_MAP_UPDATE_BATCH and BPF_MAP_DELETE_BATCH, which aya does not wrap.
mod batch {
    use std::{os::fd::RawFd, time::Duration};

    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

    /// The `batch` member of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }

    /// Runs `cmd` over `count` entries: how many were done, and the error
    /// that stopped it.
    fn call(cmd: libc::c_long, fd: RawFd, keys: u64, values: u64, count: usize) -> (usize, std::io::Result<()>) {
        let mut attr = Attr { keys, values, count: count as u32, map_fd: fd as u32, ..Default::default() };
        // SAFETY: `attr` is a valid bpf_attr prefix of its size; `keys` and
        // `values` point to `count` entries of the map's key and value sizes.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, &mut attr as *mut Attr, std::mem::size_of::<Attr>() as u32) };
        let result = if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
        (attr.count as usize, result)
    }

    /// Writes every entry, waiting out the kernel's element cache running
    /// dry. A map without preallocation takes each new element from a
    /// per-CPU cache that an irq_work refills (Linux 6.1+); a syscall that
    /// inserts faster than the refill runs gets ENOMEM with gigabytes free
    /// (seen once in a fresh-clone CI, a 2M-name list refused after 24 s;
    /// amazonlinux/amazon-linux-2023#1129 has it at every batch on some
    /// hosts). The entries written stay written, so the rest is retried
    /// after a pause that lets the refill run.
    pub fn update<K, V>(fd: RawFd, keys: &[K], values: &[V]) -> (usize, std::io::Result<()>) {
        debug_assert_eq!(keys.len(), values.len());
        retrying(keys.len(), |from| {
            let (keys, values) = (&keys[from..], &values[from..]);
            call(BPF_MAP_UPDATE_BATCH, fd, keys.as_ptr() as u64, values.as_ptr() as u64, keys.len())
        })
    }

    /// Pauses before a retry: from a tick's worth up to 64 ms.
    const FIRST_PAUSE: Duration = Duration::from_millis(1);
    const LONGEST_PAUSE: Duration = Duration::from_millis(64);
    /// ENOMEMs in a row, none with progress, before a write gives up (1.7 s
    /// of pauses): by then memory is really short.
    const PATIENCE: u32 = 30;

    /// Runs `write(from)` over entries `from..count` until all are done,
    /// retrying ENOMEM; how many were done, and the error that stopped it.
    fn retrying(count: usize, mut write: impl FnMut(usize) -> (usize, std::io::Result<()>)) -> (usize, std::io::Result<()>) {
        let (mut from, mut pause, mut fruitless) = (0, FIRST_PAUSE, 0);
        loop {
            let (done, result) = write(from);
            from += done;
            match result {
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && from < count => {
                    if done > 0 {
                        (pause, fruitless) = (FIRST_PAUSE, 0);
                    } else {
                        fruitless += 1;
                    }
                    if fruitless > PATIENCE {
                        return (from, Err(e));
                    }
                    tracing::debug!(written = from, of = count, ?pause, "the kernel's element cache ran dry: retrying");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(LONGEST_PAUSE);
                }
                result => return (from, result),
            }
        }
    }

    pub fn delete<K>(fd: RawFd, keys: &[K]) -> (usize, std::io::Result<()>) {
        call(BPF_MAP_DELETE_BATCH, fd, keys.as_ptr() as u64, 0, keys.len())
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::io::Error;

        fn enomem() -> std::io::Result<()> {
            Err(Error::from_raw_os_error(libc::ENOMEM))
        }

        #[test]
        fn a_dry_cache_is_waited_out_and_nothing_is_written_twice() {
            let mut calls = vec![];
            let (done, result) = retrying(100, |from| {
                calls.push(from);
                match calls.len() {
                    1 => (40, enomem()),
                    2 => (0, enomem()),
                    _ => (100 - from, Ok(())),
                }
            });
            assert_eq!((done, result.is_ok()), (100, true));
            assert_eq!(calls, [0, 40, 40]);
        }

        #[test]
        fn progress_renews_patience_and_a_cache_that_stays_dry_is_refused() {
            // One entry per call, each followed by ENOMEM: slow, but it ends.
            let count = 2 * PATIENCE as usize;
            let mut calls = 0;
            let (done, result) = retrying(count, |from| {
                calls += 1;
                (1, if from + 1 == count { Ok(()) } else { enomem() })
            });
            assert_eq!((done, result.is_ok(), calls), (count, true, 2 * PATIENCE));
            let mut calls = 0;
            let (done, result) = retrying(10, |_| {
                calls += 1;
                (if calls == 1 { 3 } else { 0 }, enomem())
            });
            assert_eq!((done, result.unwrap_err().raw_os_error(), calls), (3, Some(libc::ENOMEM), PATIENCE + 2));
        }

        #[test]
        fn other_errors_are_not_retried() {
            let mut calls = 0;
            let (done, result) = retrying(10, |_| {
                calls += 1;
                (2, Err(Error::from_raw_os_error(libc::E2BIG)))
            });
            assert_eq!((done, result.unwrap_err().raw_os_error(), calls), (2, Some(libc::E2BIG), 1));
        }
    }
}
