//! `blokir replay`: every packet of a capture through the real XDP program
//! (BPF_PROG_TEST_RUN), in capture order, so the program's per-flow state
//! builds up as it would on the wire, against rules loaded exactly as the
//! daemon loads them. For operators trying a list before deploying it.
//!
//! The verdict is the kernel's. The name and the rule come from the host
//! model of the same programs (`model`), run on the same packets beside it;
//! where the two disagree on blocking, the packet says so (a bug to report).

use std::{
    fs::File,
    io::{BufReader, Read},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use filter_common::{hash::lane_multiplier, rules::MAX_RULE_ID};
use pcap_file::{
    DataLink,
    pcap::PcapReader,
    pcapng::{Block, PcapNgReader},
};
use serde::Serialize;

use crate::{
    daemon::{apply_list, list_name},
    ebpf::Kernel,
    model::{Model, PASS_AS_RST, XDP_DROP, XDP_PASS, XDP_TX},
    policy::{DnsPolicy, ListSettings, QuicPolicy, TrafficPolicy},
    rules::{Engine, file::read_rules},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Largest frame BPF_PROG_TEST_RUN takes for XDP: a page less the headroom
/// and the shared-info tail (x86-64, 4 KiB pages).
pub const MAX_FRAME: usize = 4096 - 256 - 320;

/// One packet's outcome, as printed (one JSON object per line with
/// `--output json`).
#[derive(Debug, Serialize)]
pub struct Record {
    /// 0-based packet number in the capture.
    pub index: u64,
    /// `pass`, `drop`, `tx`, `aborted` (the XDP action), `rst` (passed on
    /// rewritten into a RST to the server: a blocked flow's server end
    /// closed), or `skipped` when the kernel could not run the frame (see
    /// `note`).
    pub verdict: &'static str,
    /// `dns_udp`, `dns_tcp`, `tls`, ...: what the name was read from.
    pub proto: Option<&'static str>,
    pub af: Option<&'static str>,
    pub name: Option<String>,
    /// The rule that decided (a block rule, or an allow rule `allow ...`).
    pub rule: Option<String>,
    pub list: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Totals over the capture.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub packets: u64,
    pub pass: u64,
    pub drop: u64,
    pub tx: u64,
    pub rst: u64,
    pub aborted: u64,
    pub skipped: u64,
    /// Frames cut short by the capture's snap length (read as captured).
    pub truncated: u64,
    /// Packets on which the kernel and the host model disagree.
    pub disagreements: u64,
}

pub struct Options {
    pub capture: PathBuf,
    pub rule_files: Vec<PathBuf>,
    pub capacity: u32,
    pub dns: DnsPolicy,
    /// What QUIC Initials get, as `run --quic`: with `read`, this command
    /// plays the daemon's part (see `run`).
    pub quic: QuicPolicy,
}

/// Loads the program and the rules, then calls `each` with every packet's
/// record in capture order.
pub fn run(opts: &Options, mut each: impl FnMut(&Record)) -> anyhow::Result<Summary> {
    if !(2..=MAX_RULE_ID).contains(&opts.capacity) {
        bail!("rule capacity must be between 2 and {MAX_RULE_ID}");
    }
    let mut lists = Vec::new();
    for path in &opts.rule_files {
        let name = list_name(path);
        if lists.iter().any(|(n, _, _): &(String, _, _)| *n == name) {
            bail!("{}: list name {name:?} is already used; rename the file", path.display());
        }
        let rules = read_rules(path).map_err(|e| anyhow::anyhow!(e.report()))?;
        lists.push((name, path.clone(), rules));
    }
    let names: Vec<&str> = lists.iter().map(|(n, _, _)| n.as_str()).collect();
    opts.dns.validate(&names)?;
    let mut capture = Capture::open(&opts.capture)?;

    let mut kernel = Kernel::load(opts.capacity)?;
    let mut engine = Engine::new([lane_multiplier(rand::random()), lane_multiplier(rand::random())], opts.capacity as usize, opts.capacity);
    let mut cfg = engine.config();
    opts.dns.apply_to(&mut cfg);
    TrafficPolicy { quic: opts.quic, ..TrafficPolicy::default() }.apply_to(&mut cfg)?;
    kernel.write_config(cfg)?;
    for (name, path, rules) in &lists {
        apply_list(&mut engine, &mut kernel, opts.dns.resolve(name, ListSettings::default()), name, Some(path.clone()), rules)?;
    }

    let mut model = Model::default();
    for (name, _, _) in &lists {
        if let Some(l) = engine.list(name) {
            let policy = opts.dns.resolve(name, ListSettings::default());
            if policy.ech_outer {
                model.ech_outer |= 1u128 << l.id;
            }
            model.set_tcp_action(l.id, policy.tcp);
        }
    }
    // The daemon's reader, as far as the kernel sees it: Initials are handed
    // up (the model reads them) rather than undelivered.
    let mut quic_sink = kernel.quic_sink()?;
    let mut summary = Summary::default();
    let mut index = 0u64;
    while let Some(frame) = capture.next_frame()? {
        let mut record = Record { index, verdict: "skipped", proto: None, af: None, name: None, rule: None, list: None, note: None };
        index += 1;
        summary.packets += 1;
        if frame.truncated {
            summary.truncated += 1;
            record.note = Some("cut short by the capture's snap length".into());
        }
        if frame.data.len() < 14 || frame.data.len() > MAX_FRAME {
            record.note = Some(format!("a {}-byte frame: BPF_PROG_TEST_RUN takes 14 to {MAX_FRAME} bytes", frame.data.len()));
            summary.skipped += 1;
            each(&record);
            continue;
        }
        let (action, out, _) = kernel.test_run(&frame.data, 1).with_context(|| format!("running packet {}", record.index))?;
        quic_sink.drain();
        let step = model.step(&engine, &kernel.config(), &frame.data);
        let model_fate = step.fate();
        let action = if action == XDP_PASS && out != frame.data { PASS_AS_RST } else { action };
        record.verdict = match action {
            0 => "aborted",
            1 => "drop",
            2 => "pass",
            3 => "tx",
            4 => "redirect",
            PASS_AS_RST => "rst",
            _ => "unknown",
        };
        match action {
            0 => summary.aborted += 1,
            1 => summary.drop += 1,
            3 => summary.tx += 1,
            PASS_AS_RST => summary.rst += 1,
            _ => summary.pass += 1,
        }
        if let Some((proto, af)) = step.proto {
            (record.proto, record.af) = (Some(proto.name()), Some(af.name()));
        }
        if let Some(key) = step.quic_blocked {
            // The daemon's part of `--quic read`: the Initial that completed
            // the name passed; the flow's later datagrams are dropped.
            kernel.block_quic_flow(key)?;
            record.note = Some("QUIC flow blocked: its later datagrams are dropped".into());
        }
        record.name = step.name;
        if let Some(r) = step.rule.and_then(|r| engine.rule(r.id())) {
            record.rule = Some(r.rule.to_string());
            record.list = engine.list_name(r.list).map(str::to_string);
        }
        // Answering (`tx`) and closing the server's end (`rst`) are the
        // kernel's ways of blocking too.
        let kernel_blocks = matches!(action, XDP_DROP | XDP_TX | PASS_AS_RST);
        if kernel_blocks != matches!(model_fate, XDP_DROP | XDP_TX | PASS_AS_RST) {
            summary.disagreements += 1;
            let says = match model_fate {
                XDP_DROP => "drop",
                XDP_TX => "tx",
                PASS_AS_RST => "rst",
                _ => "pass",
            };
            record.note = Some(format!("the host model says {says}: please report this capture"));
        }
        each(&record);
    }
    Ok(summary)
}

/// A frame, as an Ethernet frame for the XDP program.
struct Frame {
    data: Vec<u8>,
    truncated: bool,
}

/// A pcap or pcapng file, read one frame at a time.
enum Capture {
    Pcap(PcapReader<BufReader<File>>, DataLink),
    PcapNg(PcapNgReader<BufReader<File>>),
}

impl Capture {
    fn open(path: &Path) -> anyhow::Result<Self> {
        let what = || format!("{}", path.display());
        let mut file = File::open(path).with_context(what)?;
        let mut magic = [0u8; 4];
        file.read_exact(&mut magic).with_context(|| format!("{}: not a capture (shorter than 4 bytes)", path.display()))?;
        let file = BufReader::new(File::open(path).with_context(what)?);
        if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
            return Ok(Capture::PcapNg(PcapNgReader::new(file).with_context(|| format!("{}: not a pcapng file", path.display()))?));
        }
        let reader = PcapReader::new(file).with_context(|| format!("{}: neither a pcap nor a pcapng file", path.display()))?;
        let link = reader.header().datalink;
        ethernet(link, &[]).with_context(|| format!("{}", path.display()))?;
        Ok(Capture::Pcap(reader, link))
    }

    fn next_frame(&mut self) -> anyhow::Result<Option<Frame>> {
        match self {
            Capture::Pcap(reader, link) => match reader.next_packet() {
                None => Ok(None),
                Some(p) => {
                    let p = p.context("reading the capture")?;
                    Ok(Some(Frame { data: ethernet(*link, &p.data)?, truncated: (p.data.len() as u32) < p.orig_len }))
                }
            },
            Capture::PcapNg(reader) => loop {
                let Some(block) = reader.next_block() else { return Ok(None) };
                let (interface, data, orig_len) = match block.context("reading the capture")? {
                    Block::EnhancedPacket(p) => (Some(p.interface_id), p.data.into_owned(), p.original_len),
                    Block::SimplePacket(p) => (Some(0), p.data.into_owned(), p.original_len),
                    Block::Packet(p) => (Some(u32::from(p.interface_id)), p.data.into_owned(), p.original_len),
                    _ => (None, Vec::new(), 0),
                };
                let Some(interface) = interface else { continue };
                let link =
                    reader.interfaces().get(interface as usize).map(|i| i.linktype).context("a packet names an interface the capture does not describe")?;
                let truncated = (data.len() as u32) < orig_len;
                return Ok(Some(Frame { data: ethernet(link, &data)?, truncated }));
            },
        }
    }
}

/// The frame as Ethernet: Linux cooked captures (`tcpdump -i any`) and raw
/// IP get an Ethernet header with the same protocol; the XDP program sees
/// Ethernet frames.
fn ethernet(link: DataLink, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let with_header = |proto: u16, payload: &[u8]| {
        let mut f = Vec::with_capacity(14 + payload.len());
        f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&proto.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let ip_version = |payload: &[u8]| if payload.first().is_some_and(|b| b >> 4 == 6) { ETH_P_IPV6 } else { ETH_P_IP };
    Ok(match link {
        DataLink::ETHERNET => data.to_vec(),
        DataLink::LINUX_SLL if data.len() >= 16 => with_header(u16::from_be_bytes([data[14], data[15]]), &data[16..]),
        DataLink::LINUX_SLL2 if data.len() >= 20 => with_header(u16::from_be_bytes([data[0], data[1]]), &data[20..]),
        DataLink::LINUX_SLL | DataLink::LINUX_SLL2 => data.to_vec(),
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => with_header(ip_version(data), data),
        other => bail!("link type {other:?} is not supported (Ethernet, Linux cooked v1/v2 and raw IP are)"),
    })
}
