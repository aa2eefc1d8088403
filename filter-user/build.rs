//! Builds the XDP program with the pinned nightly and embeds it (OUT_DIR/blokir).
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The BPF toolchain: pinned so that a newer nightly (another LLVM) can never
/// silently change the object the verifier sees. `cargo xtask setup` installs it.
const BPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    commit();
    let meta = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let pkg = meta.packages.into_iter().find(|p| p.name.as_str() == "filter-ebpf").ok_or_else(|| anyhow!("filter-ebpf package not found"))?;
    let root = pkg.manifest_path.parent().ok_or_else(|| anyhow!("no parent for {}", pkg.manifest_path))?;
    println!("cargo:rerun-if-changed={}", root.join("../filter-common/src"));
    aya_build::build_ebpf([Package { name: pkg.name.as_str(), root_dir: root.as_str(), ..Default::default() }], Toolchain::Custom(BPF_TOOLCHAIN))
}

/// The commit `blokir --version` names (`unknown` outside a git checkout),
/// rebuilt when HEAD moves.
fn commit() {
    let git = |args: &[&str]| {
        std::process::Command::new("git").args(args).output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BLOKIR_COMMIT={commit}");
    for path in ["HEAD", "packed-refs"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])) {
        println!("cargo:rerun-if-changed={branch}");
    }
}
