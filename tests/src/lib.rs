//! Helpers for blokir's integration tests: the real XDP object with rules
//! loaded through the real engine, packet fixtures, and the shared captures.

pub mod packets;

use std::path::PathBuf;

use blokir::{
    ebpf::Kernel,
    rules::{Engine, Rule},
};
use filter_common::hash::lane_multiplier;

/// The real program, loaded through the verifier, with `rules` applied by the
/// same engine the daemon uses.
pub struct Loaded {
    pub kernel: Kernel,
    pub engine: Engine,
}

impl Loaded {
    pub fn new(rules: &[&str]) -> Self {
        Self::with_capacity(rules, 1 << 16)
    }

    pub fn with_capacity(rules: &[&str], capacity: u32) -> Self {
        let mut kernel = Kernel::load(capacity).expect("load the XDP program (needs root)");
        let engine = Engine::new([lane_multiplier(rand::random()), lane_multiplier(rand::random())], capacity as usize, capacity);
        kernel.write_config(engine.config()).unwrap();
        let mut l = Loaded { kernel, engine };
        l.set_list("test", rules);
        l
    }

    pub fn set_list(&mut self, list: &str, rules: &[&str]) {
        let rules: Vec<Rule> = rules.iter().map(|r| Rule::parse(r).unwrap()).collect();
        let change = self.engine.plan_replace(list, None, &rules).unwrap();
        self.engine.apply(change, &mut self.kernel).unwrap();
    }

    /// The XDP action for one packet.
    pub fn verdict(&mut self, packet: &[u8]) -> u32 {
        self.kernel.test_run(packet, 1).unwrap().0
    }

    pub fn counter(&self, index: u32) -> u64 {
        self.kernel.counters().unwrap()[index as usize]
    }
}

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// `../shared/pcaps/` next to the checkout (or `$BLOKIR_PCAPS`).
pub fn pcaps_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BLOKIR_PCAPS") {
        return d.into();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/pcaps")
}
