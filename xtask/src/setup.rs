//! Installs what a fresh machine lacks, idempotently and fast when all is
//! there: Debian packages, the pinned BPF toolchain with rust-src, bpf-linker
//! built against Debian's LLVM 22, cargo-fuzz, and the Python packages the
//! tests run (aioquic, the HTTP/3 server of the QUIC end-to-end tests).

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{is_root, root, run};

/// The BPF toolchain (same LLVM 22 as Debian's llvm-22); filter-user's
/// build.rs pins the same one.
pub const BPF_TOOLCHAIN: &str = "nightly-2026-05-20";
const BPF_LINKER_VERSION: &str = "0.13";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// aioquic from PyPI: Debian 12's python3-aioquic (0.9) predates the HTTP/3
/// API the server script uses.
const AIOQUIC: &str = "aioquic==1.7.2";

/// Debian packages: LLVM for bpf-linker, and the real programs the tests and
/// the demo run (dig, dnsmasq, ip, ss, ethtool, tcpdump, curl, openssl,
/// Chromium, Python: its `ssl` client and `http.server`), Prometheus with
/// promtool for the metrics tests, what the benchmark needs (iptables to
/// compare with, a font for its plot), and systemd-analyze to check the
/// shipped unit.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "dnsutils",
    "dnsmasq-base",
    "iproute2",
    "ethtool",
    "tcpdump",
    "curl",
    "openssl",
    "chromium",
    // ngtcp2's HTTP/3 client (gtlsclient), a second QUIC client.
    "ngtcp2-client",
    "iptables",
    "fonts-dejavu-core",
    "prometheus",
    "systemd",
    // The Debian package: its linter, and man to read its manual pages.
    "lintian",
    "man-db",
    "dpkg-dev",
    "python3",
    // The kernel matrix: Debian's kernels booted under QEMU with an
    // initramfs of busybox, blokir and the test programs.
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "binutils",
];

pub fn all() -> anyhow::Result<()> {
    packages()?;
    toolchain()?;
    bpf_linker()?;
    cargo_fuzz()?;
    python_packages()
}

/// aioquic for the `python3` first on PATH (the one the tests run).
fn python_packages() -> anyhow::Result<()> {
    if Command::new("python3").args(["-c", "import aioquic.h3.connection"]).output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    // Debian's own python3 refuses pip installs (PEP 668) unless told.
    if Command::new("python3").args(["-m", "pip", "install", "--quiet", AIOQUIC]).status().is_ok_and(|s| s.success()) {
        return Ok(());
    }
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "--break-system-packages", AIOQUIC]))
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]).output().map(|o| o.stdout.ends_with(b"install ok installed")).unwrap_or(false)
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}: run `cargo xtask setup` as root, or `apt-get install {}`", missing.join(" "));
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get").args(["install", "-y", "-q", "--no-install-recommends"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))
}

fn toolchain() -> anyhow::Result<()> {
    let out = Command::new("rustup").args(["component", "list", "--installed", "--toolchain", BPF_TOOLCHAIN]).output().context("running rustup")?;
    if out.status.success() && String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    run(Command::new("rustup").args(["toolchain", "install", BPF_TOOLCHAIN, "--profile", "minimal", "--component", "rust-src"]))
}

fn bpf_linker() -> anyhow::Result<()> {
    let ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("bpf-linker {BPF_LINKER_VERSION}.")))
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    // bpf-linker's build reads LLVM_PREFIX; llvm-sys reads LLVM_SYS_221_PREFIX.
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", &format!("^{BPF_LINKER_VERSION}"), "--no-default-features", "--features", "llvm-22", "--locked"])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))
}

fn cargo_fuzz() -> anyhow::Result<()> {
    if Command::new("cargo").args(["fuzz", "--version"]).output().map(|o| o.status.success()).unwrap_or(false) {
        return Ok(());
    }
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// Writes the fuzzers' seed corpus and builds every fuzz target, at the
/// lowest CPU priority (`cargo xtask test` does it beside the host suites).
pub fn fuzz_build() -> anyhow::Result<()> {
    let dir = root().join("fuzz");
    let toolchain = format!("+{BPF_TOOLCHAIN}");
    crate::run_logged("fuzz-seeds", crate::lowest_priority("cargo").args([&toolchain, "run", "--quiet", "--example", "make_seeds"]).current_dir(&dir))?;
    crate::run_logged("fuzz-build", crate::lowest_priority("cargo").args([&toolchain, "fuzz", "build"]).current_dir(&dir))
}

/// Runs every fuzz target for `seconds` with the pinned nightly, from the
/// seed corpus the fuzz crate writes (blocks, allows, every malformation;
/// `fuzz_build`).
pub fn fuzz(seconds: u32) -> anyhow::Result<()> {
    let dir = root().join("fuzz");
    let list = Command::new("cargo").args([&format!("+{BPF_TOOLCHAIN}"), "fuzz", "list"]).current_dir(&dir).output().context("cargo fuzz list")?;
    let targets = String::from_utf8_lossy(&list.stdout).lines().map(str::to_string).collect::<Vec<_>>();
    if targets.is_empty() {
        bail!("no fuzz targets found in {}", dir.display());
    }
    for t in targets {
        run(Command::new("cargo").args([&format!("+{BPF_TOOLCHAIN}"), "fuzz", "run", &t, "--", &format!("-max_total_time={seconds}")]).current_dir(&dir))?;
    }
    Ok(())
}
