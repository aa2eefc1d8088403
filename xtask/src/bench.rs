//! `cargo xtask bench [--quick]`: the benchmark suite (tests/src/bin/bench),
//! built in release mode with the release daemon, as root. Writes
//! bench/results/REPORT.md, summary.json and cost.png.
//!
//! The full run loads up to 2M rules and takes several minutes; `--quick`
//! gives the same figures from smaller counts in under a minute. Not part of
//! `cargo xtask test`: the figures are measurements, not pass/fail checks.

use std::process::Command;

use anyhow::bail;

use crate::{cargo, is_root, root, run as run_cmd};

pub fn run(quick: bool) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark loads XDP programs and builds network namespaces: run `cargo xtask bench` as root");
    }
    run_cmd(&mut cargo(&["build", "--release", "--bin", "blokir", "--bin", "bench"]))?;
    let mut cmd = Command::new(root().join("target/release/bench"));
    cmd.arg("--blokir").arg(root().join("target/release/blokir")).arg("--out").arg(root().join("bench/results"));
    if quick {
        cmd.arg("--quick");
    }
    run_cmd(&mut cmd)
}
