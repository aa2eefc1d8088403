//! Builds the XDP program with the pinned nightly and embeds it (OUT_DIR/blokir).
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The BPF toolchain: pinned so that a newer nightly (another LLVM) can never
/// silently change the object the verifier sees. `cargo xtask setup` installs it.
const BPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let pkg = meta.packages.into_iter().find(|p| p.name.as_str() == "filter-ebpf").ok_or_else(|| anyhow!("filter-ebpf package not found"))?;
    let root = pkg.manifest_path.parent().ok_or_else(|| anyhow!("no parent for {}", pkg.manifest_path))?;
    println!("cargo:rerun-if-changed={}", root.join("../filter-common/src"));
    aya_build::build_ebpf([Package { name: pkg.name.as_str(), root_dir: root.as_str(), ..Default::default() }], Toolchain::Custom(BPF_TOOLCHAIN))
}
