//! `cargo xtask setup|demo|test|bench`: everything a fresh machine needs, from
//! clone to green.

mod bench;
mod demo;
mod kernels;
mod package;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (apt packages, the pinned BPF
    /// toolchain, bpf-linker, cargo-fuzz); a fast no-op when all is there.
    Setup,
    /// Set up, build, and show blokir blocking the 2017 Telegram list: on
    /// network namespaces of its own, or on IFACE.
    Demo {
        /// Filter this interface instead of building a namespace demo.
        #[arg(long)]
        iface: Option<String>,
    },
    /// Set up and run every test: formatting, clippy, unit tests, the real
    /// XDP program under BPF_PROG_TEST_RUN, end-to-end runs in network
    /// namespaces, and a fuzzing smoke run. Needs root.
    Test {
        /// Seconds each fuzz target runs.
        #[arg(long, default_value_t = 10)]
        fuzz_seconds: u32,
    },
    /// Set up and run the kernel matrix alone: boot each kernel (Debian's 6.1
    /// and 6.12 unless given) under QEMU and run the kernel suites inside.
    Kernels {
        /// Kernel series (6.1, 6.12) or linux-image-*-amd64-unsigned packages.
        kernels: Vec<String>,
        /// Only these steps (load, replay, suites, attach), comma-separated.
        #[arg(long, value_delimiter = ',')]
        steps: Vec<String>,
        /// Minutes each guest may take before it is stopped and failed.
        #[arg(long, default_value_t = 25)]
        timeout_minutes: u64,
    },
    /// Build target/debian/blokir_VERSION_amd64.deb (release binary, systemd
    /// unit, /etc/blokir/blokir.toml, manual pages, completions, the Grafana
    /// dashboard and alert rules); with --check, lint it, install it on this
    /// machine, check it and purge it (as `cargo xtask test` does).
    Package {
        #[arg(long)]
        check: bool,
    },
    /// Set up and run the benchmark suite (release build, as root): the
    /// per-packet cost of each packet class against a no-op XDP program,
    /// scaling to 2M rules, memory and load times, and iptables string
    /// matching side by side. Writes bench/results/.
    Bench {
        /// Smaller counts: the same figures in under a minute.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::all(),
        Task::Demo { iface } => {
            setup::all()?;
            demo::run(iface.as_deref())
        }
        Task::Test { fuzz_seconds } => {
            setup::all()?;
            test(fuzz_seconds)
        }
        Task::Kernels { kernels, steps, timeout_minutes } => {
            setup::all()?;
            kernels::run_matrix(kernels::Options { kernels, steps, timeout: std::time::Duration::from_secs(timeout_minutes * 60), background: false })
        }
        Task::Bench { quick } => {
            setup::all()?;
            bench::run(quick)
        }
        Task::Package { check } => {
            setup::all()?;
            let deb = package::build()?;
            if check {
                if !is_root() {
                    bail!("the check installs and purges the package: run `cargo xtask package --check` as root");
                }
                package::check(&deb)?;
            }
            Ok(())
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs a command (in the workspace root unless it names a directory),
/// failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(root());
    }
    eprintln!("+ {}", describe(cmd));
    let status = cmd.status().with_context(|| format!("running {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|s| s.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false)
}

/// `cargo SUBCOMMAND [--locked] ARGS...`: `--locked` under CI, so the
/// committed Cargo.lock is what is tested. It goes right after the
/// subcommand, never after a `--`.
pub fn cargo(args: &[&str]) -> Command {
    cargo_in(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())), args)
}

/// `cargo(args)` at the lowest CPU priority.
fn cargo_in_background(args: &[&str]) -> Command {
    cargo_in(lowest_priority(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())), args)
}

fn cargo_in(mut c: Command, args: &[&str]) -> Command {
    let (sub, rest) = args.split_first().expect("a cargo subcommand");
    c.arg(sub);
    if std::env::var_os("CI").is_some() {
        c.arg("--locked");
    }
    c.args(rest);
    c
}

/// `program` run at the lowest CPU priority (`nice -n 19`): work that
/// fills the time the host suites spend waiting.
pub fn lowest_priority(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("nice");
    c.args(["-n", "19"]).arg(program);
    c
}

/// Runs `cmd` (in the workspace root unless it names a directory) with
/// its output in `target/test-logs/<name>.log`, failing on a non-zero exit
/// with the log's end.
fn run_logged(name: &str, cmd: &mut Command) -> anyhow::Result<()> {
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(root());
    }
    let dir = root().join("target/test-logs");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    eprintln!("+ {} (in the background; output in {})", describe(cmd), path.display());
    let status = cmd.stdout(log.try_clone()?).stderr(log).status().with_context(|| format!("running {}", describe(cmd)))?;
    if !status.success() {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        bail!("{} failed: {status}; the end of {}:\n{}", describe(cmd), path.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    Ok(())
}

fn test(fuzz_seconds: u32) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the tests load XDP programs and build network namespaces: run `cargo xtask test` as root");
    }
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args(["fmt", "--all", "--", "--check"]))?;
    run(&mut cargo(&["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The daemon binary the end-to-end tests drive.
    run(&mut cargo(&["build", "--bin", "blokir"]))?;
    let bin = root().join("target/debug/blokir");
    // The kernels ISP boxes run, booted under QEMU with the kernel suites:
    // their payload is built here (as `cargo test` builds the suites), and
    // the guests boot at the lowest CPU priority beside the host suites,
    // which spend most of their time waiting on namespaces and real
    // clients; so do the package's release build and the fuzzers' build.
    // Every part runs to its end and every failure is reported.
    let matrix = kernels::Matrix::prepare(kernels::Options {
        kernels: Vec::new(),
        steps: Vec::new(),
        timeout: std::time::Duration::from_secs(45 * 60),
        background: true,
    })?;
    let outcomes: Vec<(&str, anyhow::Result<()>)> = std::thread::scope(|s| {
        let guests = s.spawn(|| matrix.run());
        let release = s.spawn(|| run_logged("release-build", &mut cargo_in_background(&["build", "--release", "--bin", package::NAME])));
        let fuzzers = s.spawn(setup::fuzz_build);
        // One test binary at a time: the end-to-end tests share the kernel's
        // namespaces and interfaces, and each file's tests run serially.
        let host = run(cargo(&["test", "--", "--test-threads=1"]).env("BLOKIR_BIN", &bin));
        // The Debian package, installed, checked and purged.
        let deb = joined(release).and_then(|()| package::check(&package::build()?));
        vec![("the host suites", host), ("the package", deb), ("the kernel matrix", joined(guests)), ("the fuzzers' build", joined(fuzzers))]
    });
    let failed: Vec<String> = outcomes.iter().filter_map(|(what, r)| r.as_ref().err().map(|e| format!("{what}: {e:#}"))).collect();
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
    }
    setup::fuzz(fuzz_seconds)
}

fn joined(h: std::thread::ScopedJoinHandle<'_, anyhow::Result<()>>) -> anyhow::Result<()> {
    h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the thread panicked")))
}
