//! Helpers for blokir's integration tests: the real XDP object with rules
//! loaded through the real engine, packet fixtures, and the shared captures.

pub mod netns;
pub mod noop;
pub mod packets;
pub mod web;

use std::{mem::ManuallyDrop, path::PathBuf, sync::Mutex};

pub use blokir::model::{self, HostEnv, PASS_AS_RST, XDP_DROP, XDP_PASS, XDP_TX, counted};
use blokir::{
    ebpf::Kernel,
    rules::{Engine, Rule},
};
use filter_common::{
    counters::{self, Outcome, Proto},
    hash::lane_multiplier,
    inspect::{Inspection, inspect},
    name::CanonBuf,
    packet::{Af, Malformed},
    reply::DnsAction,
};

/// The real program, loaded through the verifier, with `rules` applied by the
/// same engine the daemon uses.
pub struct Loaded {
    /// Returned to `SHARED` on drop when programs are shared.
    pub kernel: ManuallyDrop<Kernel>,
    pub engine: Engine,
    /// Opened by the first step with the model, which plays the daemon.
    quic_sink: Option<blokir::ebpf::QuicSink>,
}

/// With `BLOKIR_SHARE_PROGRAM=1` (the kernel matrix's guests, where each
/// verification takes emulated seconds) the tests of one binary share one
/// loaded program, emptied between tests; otherwise each test loads its own.
static SHARED: Mutex<Option<Kernel>> = Mutex::new(None);

fn sharing() -> bool {
    std::env::var_os("BLOKIR_SHARE_PROGRAM").is_some_and(|v| v == "1")
}

/// Whether exhaustive sweeps (a hello cut at every byte, for every captured
/// hello and both address families) run in full: on the host they do; in
/// the kernel matrix's guests (`BLOKIR_SAMPLE_SWEEPS=1`, where emulation
/// makes each packet ten times dearer) a sample runs: one hello of each
/// client, IPv4 only.
pub fn exhaustive_sweeps() -> bool {
    std::env::var_os("BLOKIR_SAMPLE_SWEEPS").is_none_or(|v| v != "1")
}

impl Loaded {
    pub fn new(rules: &[&str]) -> Self {
        Self::with_capacity(rules, 1 << 16)
    }

    pub fn with_capacity(rules: &[&str], capacity: u32) -> Self {
        let shared = sharing().then(|| SHARED.lock().unwrap_or_else(|e| e.into_inner()).take()).flatten();
        let mut kernel = match shared {
            Some(mut k) if k.capacity() == capacity => {
                k.clear_state().expect("empty the shared program's maps");
                k
            }
            _ => Kernel::load(capacity).expect("load the XDP program (needs root)"),
        };
        let engine = Engine::new([lane_multiplier(rand::random()), lane_multiplier(rand::random())], capacity as usize, capacity);
        kernel.write_config(engine.config()).unwrap();
        let mut l = Loaded { kernel: ManuallyDrop::new(kernel), engine, quic_sink: None };
        l.set_list("test", rules);
        l
    }

    pub fn set_list(&mut self, list: &str, rules: &[&str]) {
        let rules: Vec<Rule> = rules.iter().map(|r| Rule::parse(r).unwrap()).collect();
        let change = self.engine.plan_replace(list, None, &rules).unwrap();
        self.engine.apply(change, &mut *self.kernel).unwrap();
    }

    /// The XDP action for one packet, `PASS_AS_RST` for one passed on
    /// rewritten (into a RST to its server).
    pub fn verdict(&mut self, packet: &[u8]) -> u32 {
        let (verdict, out, _) = self.kernel.test_run(packet, 1).unwrap();
        if verdict == XDP_PASS && out != packet { PASS_AS_RST } else { verdict }
    }

    pub fn counter(&self, index: u32) -> u64 {
        self.kernel.counters().unwrap()[index as usize]
    }

    /// All global counters, summed over CPUs.
    pub fn counters(&self) -> Vec<u64> {
        self.kernel.counters().unwrap()
    }

    /// Runs one packet: the verdict, and how far each counter moved.
    pub fn run(&mut self, packet: &[u8]) -> (u32, Vec<u64>) {
        let before = self.counters();
        let verdict = self.verdict(packet);
        let delta = self.counters().iter().zip(&before).map(|(a, b)| a - b).collect();
        (verdict, delta)
    }

    /// Asserts that `packet` gets `verdict` and that exactly `PACKETS` and
    /// the `counted` counters (see `counted`) went up by one each.
    #[track_caller]
    pub fn expect(&mut self, what: &str, packet: &[u8], verdict: u32, counted: &[u32]) {
        let (got, delta) = self.run(packet);
        let want = counter_deltas(counted);
        assert_eq!(
            (action_name(got), describe_counters(&delta)),
            (action_name(verdict), describe_counters(&want)),
            "{what}: (verdict, counter deltas) differ; packet {packet:02x?}"
        );
    }

    /// Runs `frames` through the kernel and `model` in order; asserts they
    /// agree on every verdict and counter; returns the verdicts. With
    /// `--quic read`, the QUIC flows the model's reader blocks are written
    /// into `QUIC_BLOCKED`, as the daemon does.
    #[track_caller]
    pub fn run_with_model(&mut self, model: &mut model::Model, frames: &[Vec<u8>], what: &str) -> Vec<u32> {
        frames.iter().enumerate().map(|(i, f)| self.step_with_model(model, f, &format!("{what}: segment {i}")).fate()).collect()
    }

    /// One frame through the kernel and `model`, which must agree on the
    /// verdict and counters; the model's step (a QUIC flow it blocks is
    /// written into `QUIC_BLOCKED`).
    #[track_caller]
    pub fn step_with_model(&mut self, model: &mut model::Model, frame: &[u8], what: &str) -> model::Step {
        // Only where the model reads QUIC: the other suites never need it.
        let cfg = self.kernel.config();
        if self.quic_sink.is_none() && cfg.is_configured() && cfg.quic_policy == filter_common::quic::POLICY_READ {
            self.quic_sink = Some(self.kernel.quic_sink().expect("opening the QUIC perf buffers"));
        }
        let step = model.step(&self.engine, &self.kernel.config(), frame);
        let (got, delta) = self.run(frame);
        if let Some(sink) = &mut self.quic_sink {
            sink.drain();
        }
        assert_eq!((got, describe_counters(&delta)), (step.fate(), describe_counters(&counter_deltas(&step.counted))), "{what}");
        if let Some(key) = step.quic_blocked {
            self.kernel.block_quic_flow(key).expect("writing a blocked QUIC flow");
        }
        step
    }

    /// The shared `inspect` run on the host over `packet`, against exactly
    /// the rules and settings the kernel holds.
    pub fn host_inspect(&self, packet: &[u8]) -> Inspection {
        let mut env = HostEnv { buf: CanonBuf::default(), cfg: self.engine.config(), nodes: self.engine.nodes() };
        inspect(packet, &mut env)
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        // SAFETY: `kernel` is taken once, here, and never used after.
        let kernel = unsafe { ManuallyDrop::take(&mut self.kernel) };
        if sharing() {
            *SHARED.lock().unwrap_or_else(|e| e.into_inner()) = Some(kernel);
        }
    }
}

/// A counter's name, as in `/metrics` (`dns_udp_ipv4_blocked`, `malformed_l4`).
pub fn counter_name(index: u32) -> String {
    match index {
        counters::PACKETS => return "packets".into(),
        counters::FRAGMENTS => return "fragments".into(),
        counters::UNCONFIGURED => return "unconfigured".into(),
        counters::TCP_RESETS => return "tcp_resets".into(),
        _ => {}
    }
    if let Some((name, _)) = counters::RESET_FALLBACKS.iter().find(|(_, i)| *i == index) {
        return format!("tcp_reset_{name}");
    }
    if let Some((name, _)) = counters::TLS_EVENTS.iter().find(|(_, i)| *i == index) {
        return format!("tls_{name}");
    }
    if let Some((name, _)) = counters::HTTP_EVENTS.iter().find(|(_, i)| *i == index) {
        return format!("http_{name}");
    }
    if let Some((name, _)) = counters::TCP_EVENTS.iter().find(|(_, i)| *i == index) {
        return format!("tcp_{name}");
    }
    if let Some((name, _)) = counters::EVASIONS.iter().find(|(_, i)| *i == index) {
        return format!("evasion_{name}");
    }
    if let Some((name, _)) = counters::QUIC_FATES.iter().find(|(_, i)| *i == index) {
        return format!("quic_{name}");
    }
    if let Some((name, _)) = counters::ANSWER_FALLBACKS.iter().find(|(_, i)| *i == index) {
        return format!("reply_{name}");
    }
    if let Some(a) = DnsAction::ALL.iter().find(|a| counters::action_index(**a) == index) {
        return format!("dns_action_{}", a.name());
    }
    for p in Proto::ALL {
        for a in Af::ALL {
            for o in Outcome::ALL {
                if counters::proto_index(p, a, o) == index {
                    return format!("{}_{}_{}", p.name(), a.name(), o.name());
                }
            }
        }
    }
    Malformed::ALL.iter().find(|m| counters::malformed_index(**m) == index).map_or(format!("counter{index}"), |m| format!("malformed_{}", m.name()))
}

/// The non-zero entries of a counter vector, by name.
/// The counter deltas of one packet that moved `counted` (as `Model::run`
/// or `counted` give them), besides `PACKETS`.
pub fn counter_deltas(counted: &[u32]) -> Vec<u64> {
    let mut want = vec![0u64; counters::COUNTERS as usize];
    for i in std::iter::once(counters::PACKETS).chain(counted.iter().copied()) {
        want[i as usize] += 1;
    }
    want
}

pub fn describe_counters(values: &[u64]) -> Vec<(String, u64)> {
    values.iter().enumerate().filter(|(_, v)| **v != 0).map(|(i, v)| (counter_name(i as u32), *v)).collect()
}

/// The verdicts of a flow to a listed name (a `drop` list): segments pass
/// until the one that completes the name, which goes on as a RST that
/// closes the server's end; every later one is dropped.
#[track_caller]
pub fn assert_blocked_from_name(verdicts: &[u32], what: &str) {
    let first = verdicts.iter().position(|v| *v != XDP_PASS).unwrap_or_else(|| panic!("{what}: never blocked: {verdicts:?}"));
    assert_eq!(verdicts[first], PASS_AS_RST, "{what}: the name segment goes on as a RST: {verdicts:?}");
    assert!(verdicts[first + 1..].iter().all(|v| *v == XDP_DROP), "{what}: {verdicts:?}");
}

pub fn action_name(action: u32) -> &'static str {
    match action {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        PASS_AS_RST => "XDP_PASS (as a RST to the server)",
        4 => "XDP_REDIRECT",
        _ => "unknown action",
    }
}

pub const XDP_ABORTED: u32 = 0;

/// Every frame of `real-clients-dev.pcap` (Ethernet), in capture order.
pub fn capture_frames() -> Vec<Vec<u8>> {
    let path = pcaps_dir().join("real-clients-dev.pcap");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = pcap_file::pcap::PcapReader::new(file).unwrap();
    assert_eq!(reader.header().datalink, pcap_file::DataLink::ETHERNET);
    let mut frames = Vec::new();
    while let Some(p) = reader.next_packet() {
        frames.push(p.unwrap().data.into_owned());
    }
    frames
}

/// One of the repository's own captures (`tests/data`; `chromium-quic.pcap`
/// holds Chromium's whole QUIC first flight, see `capture-quic.sh`): from
/// `pcaps_dir()` if it is there (the kernel matrix's guests get every
/// capture in one directory), else from the checkout.
pub fn data_capture(name: &str) -> PathBuf {
    let copied = pcaps_dir().join(name);
    if copied.is_file() { copied } else { PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data").join(name) }
}

/// `../shared/pcaps/` next to the checkout (or `$BLOKIR_PCAPS`).
pub fn pcaps_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BLOKIR_PCAPS") {
        return d.into();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/pcaps")
}

/// The daemon binary the end-to-end tests drive: `$BLOKIR_BIN`, else
/// `target/debug/blokir` in the workspace.
pub fn blokir_bin() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("BLOKIR_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/blokir"),
    };
    if !path.is_file() {
        anyhow::bail!(
            "the blokir daemon binary {} does not exist: run `cargo build --bin blokir` (or `cargo xtask test`, which builds it), or set BLOKIR_BIN",
            path.display()
        );
    }
    Ok(path)
}
