//! `cargo xtask kernels`: the kernel matrix. Debian's kernels (the ones ISP
//! boxes run) are downloaded once into a cache, booted under QEMU with a
//! small initramfs (busybox, blokir, the guest program and the packet-level
//! test suites), and what runs inside (tests/src/bin/guest.rs) reports back
//! over the guest's second serial port: verifier figures, the captures'
//! replays (compared here with this machine's own run), every suite, and
//! native and generic attach through a SIGKILL and a restart.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{cargo, root, run};

/// The kernels CI boots: Debian 12's own (6.1) and Debian 13's series as
/// Debian 12 packages it (6.12). The machine's own kernel is the third.
pub const MATRIX: &[&str] = &["6.1", "6.12"];

/// The packet-level suites run in every guest (the end-to-end ones need
/// real clients and servers the initramfs does not carry; the guest's own
/// attach check stands for them), in one binary
/// (`tests/tests/kernel_suites.rs`: dns_reply, fragments, http, http_hosts, quic, rst, tls, xdp) so
/// that a guest verifies the program once. The replays of every capture and the verifier figures are
/// the guest's own steps.
const SUITES: &[&str] = &["kernel_suites"];

/// What each guest runs, in order (`--steps` picks some).
pub const STEPS: &[&str] = &["load", "replay", "attach", "doctor", "suites"];

/// Where downloaded kernels are kept between runs.
fn cache() -> PathBuf {
    std::env::var_os("BLOKIR_KERNEL_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/cache/blokir-kernels".into())
}

pub struct Options {
    /// Series (`6.1`, `6.12`) or package names; empty: the matrix.
    pub kernels: Vec<String>,
    pub steps: Vec<String>,
    pub timeout: Duration,
    /// Run the guests at the lowest CPU priority (`cargo xtask test` boots
    /// them beside the host suites, which mostly wait on namespaces and
    /// real clients).
    pub background: bool,
}

/// A kernel package unpacked in the cache.
struct Kernel {
    package: String,
    release: String,
    dir: PathBuf,
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        self.dir.join(format!("boot/vmlinuz-{}", self.release))
    }

    fn modules(&self) -> PathBuf {
        self.dir.join(format!("lib/modules/{}", self.release))
    }
}

pub fn run_matrix(opts: Options) -> anyhow::Result<()> {
    Matrix::prepare(opts)?.run()
}

/// The matrix ready to boot: its kernels unpacked, the payload built and
/// this machine's replays made.
pub struct Matrix {
    opts: Options,
    kernels: Vec<Kernel>,
    payload: Payload,
    host: BTreeMap<String, Vec<String>>,
}

impl Matrix {
    pub fn prepare(opts: Options) -> anyhow::Result<Self> {
        if !crate::is_root() {
            bail!("the kernel matrix builds guests that load XDP programs: run it as root");
        }
        for s in &opts.steps {
            ensure!(STEPS.contains(&s.as_str()), "unknown step {s:?}: the steps are {}", STEPS.join(", "));
        }
        let specs: Vec<String> = if opts.kernels.is_empty() { MATRIX.iter().map(|s| s.to_string()).collect() } else { opts.kernels.clone() };
        let kernels = specs.iter().map(|s| fetch(&resolve(s)?)).collect::<anyhow::Result<Vec<_>>>()?;
        let payload = Payload::build()?;
        let host = payload.host_replays()?;
        Ok(Matrix { opts, kernels, payload, host })
    }

    /// Boots every kernel at once and reports; fails if any guest does.
    pub fn run(&self) -> anyhow::Result<()> {
        let (opts, kernels, payload) = (&self.opts, &self.kernels, &self.payload);
        let kvm = kvm_boots(&kernels[0], payload)?;
        eprintln!(
            "kernel matrix: {} under {}",
            kernels.iter().map(|k| k.release.as_str()).collect::<Vec<_>>().join(", "),
            if kvm { "KVM" } else { "TCG (software emulation)" }
        );
        let results: Vec<anyhow::Result<Outcome>> = thread::scope(|s| {
            let handles: Vec<_> = kernels.iter().map(|k| s.spawn(move || boot(k, payload, kvm, opts))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the guest thread panicked")))).collect()
        });
        let mut failed = Vec::new();
        let mut report = String::new();
        for (k, res) in kernels.iter().zip(results) {
            match res {
                Ok(o) => {
                    let problems = o.problems(&self.host, &opts.steps);
                    let _ = writeln!(report, "{}", o.summary(k));
                    for p in &problems {
                        let _ = writeln!(report, "  FAIL {p}");
                    }
                    if !problems.is_empty() {
                        failed.push(k.release.clone());
                    }
                }
                Err(e) => {
                    let _ = writeln!(report, "{}: FAIL {e:#}", k.release);
                    failed.push(k.release.clone());
                }
            }
        }
        eprint!("\n== kernel matrix ==\n{report}");
        std::fs::write(root().join("target/kernels/REPORT.txt"), &report)?;
        ensure!(failed.is_empty(), "the kernel matrix failed on {} (logs in target/kernels/)", failed.join(", "));
        Ok(())
    }
}

/// A series (`6.1`, `6.12`) or a package name to a kernel image package:
/// one already in the cache, else the newest Debian offers.
fn resolve(spec: &str) -> anyhow::Result<String> {
    if spec.starts_with("linux-image-") {
        return Ok(spec.to_string());
    }
    let matches = |name: &str| -> Option<u64> {
        let rest = name.strip_prefix("linux-image-")?.strip_suffix("-amd64-unsigned")?;
        let abi = match spec {
            // Debian 12: linux-image-6.1.0-NN-amd64-unsigned
            "6.1" => rest.strip_prefix("6.1.0-")?,
            // Debian 12's backport of Debian 13's kernel: 6.12.NN+deb12
            "6.12" => rest.strip_prefix("6.12.")?.strip_suffix("+deb12")?,
            _ => return None,
        };
        abi.parse().ok()
    };
    ensure!(matches!(spec, "6.1" | "6.12"), "unknown kernel {spec:?}: give 6.1, 6.12 or a linux-image-*-amd64-unsigned package name");
    let cached = std::fs::read_dir(cache()).into_iter().flatten().filter_map(|e| e.ok()).filter(|e| e.path().join(".ready").exists());
    if let Some(best) = cached.filter_map(|e| e.file_name().to_str().and_then(|n| matches(n).map(|v| (v, n.to_string())))).max() {
        return Ok(best.1);
    }
    let list = |cmd: &mut Command| -> anyhow::Result<Vec<String>> {
        let out = cmd.output().context("running apt-cache")?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect())
    };
    let mut names = list(Command::new("apt-cache").args(["pkgnames", "linux-image-"]))?;
    if !names.iter().any(|n| matches(n).is_some()) {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        names = list(Command::new("apt-cache").args(["pkgnames", "linux-image-"]))?;
    }
    names
        .into_iter()
        .filter_map(|n| matches(&n).map(|v| (v, n)))
        .max()
        .map(|(_, n)| n)
        .with_context(|| format!("Debian's archive offers no {spec} kernel (linux-image-*-amd64-unsigned)"))
}

/// The package downloaded and unpacked into the cache (once).
fn fetch(package: &str) -> anyhow::Result<Kernel> {
    let cache = cache();
    let dir = cache.join(package);
    if !dir.join(".ready").exists() {
        std::fs::create_dir_all(&cache)?;
        run(Command::new("apt-get").args(["download", "-q", package]).current_dir(&cache))?;
        let deb = std::fs::read_dir(&cache)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb")))
            .with_context(|| format!("apt-get download left no {package}_*.deb in {}", cache.display()))?;
        let tmp = cache.join(format!("{package}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir)?;
        std::fs::write(dir.join(".ready"), package)?;
        std::fs::remove_file(&deb)?;
    }
    let release = std::fs::read_dir(dir.join("lib/modules"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{}: no lib/modules/RELEASE", dir.display()))?;
    let k = Kernel { package: package.to_string(), release, dir };
    ensure!(k.vmlinuz().exists(), "{} is missing", k.vmlinuz().display());
    if !k.modules().join("modules.dep").exists() {
        run(Command::new("depmod").arg("-b").arg(&k.dir).arg(&k.release))?;
    }
    Ok(k)
}

/// What every guest carries, built once.
struct Payload {
    blokir: PathBuf,
    guest: PathBuf,
    suites: Vec<(String, PathBuf)>,
    pcaps: PathBuf,
}

impl Payload {
    fn build() -> anyhow::Result<Self> {
        run(&mut cargo(&["build", "--bin", "blokir"]))?;
        run(&mut cargo(&["build", "-p", "blokir-tests", "--bin", "guest"]))?;
        let mut args = vec!["test", "-p", "blokir-tests", "--no-run", "--message-format=json"];
        for s in SUITES {
            args.extend(["--test", s]);
        }
        let out = cargo(&args).current_dir(root()).stderr(Stdio::inherit()).output().context("building the test suites")?;
        ensure!(out.status.success(), "building the test suites failed");
        let mut suites = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
                && v["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test"))
                && SUITES.contains(&name)
            {
                suites.push((name.to_string(), PathBuf::from(exe)));
            }
        }
        ensure!(suites.len() == SUITES.len(), "found {} of the {} suites' executables", suites.len(), SUITES.len());
        let shared = std::env::var_os("BLOKIR_PCAPS").map(PathBuf::from).unwrap_or_else(|| root().join("../shared/pcaps"));
        ensure!(shared.is_dir(), "no captures at {} (../shared/pcaps beside the checkout)", shared.display());
        // The shared captures and the repository's own (tests/data: Chromium's
        // whole QUIC first flight), replayed alike on this machine and in guests.
        let pcaps = root().join("target/kernels/pcaps");
        let _ = std::fs::remove_dir_all(&pcaps);
        std::fs::create_dir_all(&pcaps)?;
        for dir in [shared, root().join("tests/data")] {
            for e in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
                let p = e?.path();
                if p.extension().is_some_and(|e| e == "pcap" || e == "pcapng") {
                    std::fs::copy(&p, pcaps.join(p.file_name().unwrap_or_default())).with_context(|| format!("copying {}", p.display()))?;
                }
            }
        }
        Ok(Payload { blokir: root().join("target/debug/blokir"), guest: root().join("target/debug/guest"), suites, pcaps })
    }

    /// This machine's own replays, which every guest's must equal.
    fn host_replays(&self) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
        let dir = root().join("target/kernels");
        std::fs::create_dir_all(&dir)?;
        let results = dir.join("host-results.txt");
        let _ = std::fs::remove_file(&results);
        let status = Command::new(&self.guest)
            .arg(&results)
            .env("BLOKIR_BIN", &self.blokir)
            .env("BLOKIR_PCAPS", &self.pcaps)
            .env("BLOKIR_STEPS", "replay")
            .stderr(Stdio::null())
            .status()
            .context("replaying the captures on this machine")?;
        ensure!(status.success(), "the guest program failed on this machine");
        let o = Outcome::parse(&std::fs::read_to_string(&results)?);
        if let Some(f) = o.steps.iter().find(|(_, (ok, _))| !ok) {
            bail!("replaying on this machine: {}: {}", f.0, f.1.1);
        }
        Ok(o.replays)
    }

    /// The initramfs for `k`: the payload, its libraries, and `k`'s veth
    /// module with what it depends on.
    fn initramfs(&self, k: &Kernel, out: &Path) -> anyhow::Result<()> {
        let tree = out.with_extension("d");
        let _ = std::fs::remove_dir_all(&tree);
        for d in ["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "suites", "pcaps", "modules", "etc"] {
            std::fs::create_dir_all(tree.join(d))?;
        }
        copy(Path::new("/bin/busybox"), &tree.join("bin/busybox"))?;
        let ip = which("ip")?;
        let mut elves = vec![(self.blokir.clone(), tree.join("bin/blokir")), (self.guest.clone(), tree.join("bin/guest")), (ip.clone(), tree.join("sbin/ip"))];
        for (name, exe) in &self.suites {
            elves.push((exe.clone(), tree.join("suites").join(name)));
        }
        for (from, to) in &elves {
            // Debug info would make the initramfs hundreds of megabytes.
            run(Command::new("strip").arg("--strip-debug").arg("-o").arg(to).arg(from))?;
            for lib in libraries(from)? {
                let dest = tree.join(lib.strip_prefix("/").unwrap_or(&lib));
                if !dest.exists() {
                    std::fs::create_dir_all(dest.parent().unwrap_or(&tree))?;
                    copy(&lib, &dest)?;
                }
            }
        }
        for e in std::fs::read_dir(&self.pcaps)? {
            let p = e?.path();
            if p.is_file() {
                copy(&p, &tree.join("pcaps").join(p.file_name().unwrap_or_default()))?;
            }
        }
        let mut order = String::new();
        for m in module_chain(k, "veth")? {
            let name = m.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let plain = name.trim_end_matches(".xz").trim_end_matches(".zst").to_string();
            let dest = tree.join("modules").join(&plain);
            let data = decompress(&m)?;
            std::fs::write(&dest, data)?;
            order.push_str(&plain);
            order.push('\n');
        }
        std::fs::write(tree.join("modules/order"), order)?;
        std::fs::write(tree.join("init"), INIT)?;
        set_mode(&tree.join("init"), 0o755)?;
        let cpio = Command::new("sh")
            .arg("-c")
            .arg(format!("find . | cpio -o -H newc -R 0:0 --quiet | gzip -1 > '{}'", out.display()))
            .current_dir(&tree)
            .status()
            .context("running cpio")?;
        ensure!(cpio.success(), "building the initramfs failed");
        std::fs::remove_dir_all(&tree)?;
        Ok(())
    }
}

/// The guest's PID 1: mounts, veth, then the guest program; its results go
/// to the second serial port.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
# /sbin first: iproute2's ip (netns, veth) before busybox's applet.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/netns /sys/fs/bpf/blokir
for m in $(cat /modules/order); do insmod /modules/$m || echo "step modules FAIL insmod $m" > /dev/ttyS1; done
ip link set lo up
for a in $(cat /proc/cmdline); do
  case "$a" in blokir.steps=*) export BLOKIR_STEPS="${a#blokir.steps=}";; esac
done
if [ "$BLOKIR_STEPS" = probe ]; then
  echo probe-ok > /dev/ttyS1
else
  BLOKIR_BIN=/bin/blokir BLOKIR_PCAPS=/pcaps /bin/guest /dev/ttyS1 /suites > /dev/console 2>&1
  echo "guest-exit $?" > /dev/ttyS1
fi
sync
poweroff -f
"#;

/// What a guest reported.
#[derive(Default)]
struct Outcome {
    kernel: String,
    insns: Vec<(String, u64)>,
    steps: Vec<(String, (bool, String))>,
    replays: BTreeMap<String, Vec<String>>,
    done: bool,
    accel: &'static str,
    took: Duration,
}

impl Outcome {
    fn parse(text: &str) -> Self {
        let mut o = Outcome::default();
        let mut replay: Option<(String, Vec<String>)> = None;
        for line in text.lines().map(|l| l.trim_end_matches('\r')) {
            if let Some((name, lines)) = &mut replay {
                if line == "replay-end" {
                    o.replays.insert(std::mem::take(name), std::mem::take(lines));
                    replay = None;
                } else {
                    lines.push(line.to_string());
                }
                continue;
            }
            let mut w = line.splitn(3, ' ');
            match (w.next(), w.next(), w.next()) {
                (Some("kernel"), Some(k), _) => o.kernel = k.to_string(),
                (Some("insns"), Some(p), Some(n)) => o.insns.push((p.to_string(), n.parse().unwrap_or(0))),
                (Some("step"), Some(name), Some(rest)) => {
                    let (verdict, detail) = rest.split_once(' ').unwrap_or((rest, ""));
                    o.steps.push((name.to_string(), (verdict == "ok", detail.to_string())));
                }
                (Some("replay-begin"), Some(a), Some(b)) => replay = Some((format!("{a} {b}"), Vec::new())),
                (Some("done"), None, None) => o.done = true,
                _ => {}
            }
        }
        o
    }

    /// Everything that is not as on this machine.
    fn problems(&self, host: &BTreeMap<String, Vec<String>>, wanted: &[String]) -> Vec<String> {
        let mut p: Vec<String> = self.steps.iter().filter(|(_, (ok, _))| !ok).map(|(n, (_, d))| format!("{n}: {d}")).collect();
        // A step that reported nothing did not run: as bad as one that failed.
        for step in STEPS.iter().filter(|s| wanted.is_empty() || wanted.iter().any(|w| w == *s)) {
            let prefix = match *step {
                "suites" => "suite-",
                other => other,
            };
            if self.done && !self.steps.iter().any(|(n, _)| n.starts_with(prefix)) {
                p.push(format!("{step}: the guest reported no result"));
            }
        }
        if !self.done {
            p.push("the guest did not finish (see its console log)".into());
        }
        let replayed = wanted.is_empty() || wanted.iter().any(|w| w == "replay");
        for (name, want) in host.iter().filter(|_| replayed) {
            match self.replays.get(name) {
                None if self.done => p.push(format!("replay {name}: no output from the guest")),
                None => {}
                Some(got) => {
                    // The summary's last line carries timings; records must match exactly.
                    let strip = |v: &[String]| v.iter().filter(|l| !l.contains("\"summary\"")).cloned().collect::<Vec<_>>();
                    let (got, want) = (strip(got), strip(want));
                    if got != want {
                        let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
                        p.push(format!(
                            "replay {name}: verdicts differ from this machine's at record {at} ({} vs {} records): guest {:?}, host {:?}",
                            got.len(),
                            want.len(),
                            got.get(at),
                            want.get(at)
                        ));
                    }
                }
            }
        }
        p
    }

    fn summary(&self, k: &Kernel) -> String {
        let insns = self.insns.iter().map(|(p, n)| format!("{} {:.1}k", p.trim_start_matches("blokir_"), *n as f64 / 1000.0)).collect::<Vec<_>>().join(", ");
        let steps = self.steps.iter().map(|(n, (ok, _))| format!("{n} {}", if *ok { "ok" } else { "FAIL" })).collect::<Vec<_>>().join(", ");
        format!("{} ({}, {}, {:.0?}): verified instructions: {insns}\n  {steps}", self.kernel, k.package, self.accel, self.took)
    }
}

/// Whether this machine's KVM boots a stock kernel (kvm-pvm hosts hang):
/// one short probe boot.
fn kvm_boots(k: &Kernel, payload: &Payload) -> anyhow::Result<bool> {
    if !Path::new("/dev/kvm").exists() || std::env::var_os("BLOKIR_NO_KVM").is_some() {
        return Ok(false);
    }
    let dir = root().join("target/kernels/kvm-probe");
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("initrd.gz");
    payload.initramfs(k, &initrd)?;
    let results = dir.join("results.txt");
    let _ = std::fs::remove_file(&results);
    let _ = qemu(k, &initrd, &dir, true, "probe", Duration::from_secs(20), false);
    Ok(std::fs::read_to_string(&results).is_ok_and(|s| s.contains("probe-ok")))
}

fn boot(k: &Kernel, payload: &Payload, kvm: bool, opts: &Options) -> anyhow::Result<Outcome> {
    let dir = root().join("target/kernels").join(&k.release);
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("initrd.gz");
    payload.initramfs(k, &initrd)?;
    let start = Instant::now();
    let steps = if opts.steps.is_empty() { STEPS.join(",") } else { opts.steps.join(",") };
    let timeout = opts.timeout;
    let finished = qemu(k, &initrd, &dir, kvm, &steps, timeout, opts.background)?;
    let mut o = Outcome::parse(&std::fs::read_to_string(dir.join("results.txt")).unwrap_or_default());
    o.accel = if kvm { "KVM" } else { "TCG" };
    o.took = start.elapsed();
    if !finished {
        o.steps.push(("boot".into(), (false, format!("no power-off within {timeout:?}; console: {}", dir.join("console.log").display()))));
    }
    Ok(o)
}

/// Boots `k` with `initrd`; false when it had to be killed at `timeout`.
fn qemu(k: &Kernel, initrd: &Path, dir: &Path, kvm: bool, steps: &str, timeout: Duration, background: bool) -> anyhow::Result<bool> {
    let _ = std::fs::remove_file(dir.join("results.txt"));
    let mut cmd = if background { crate::lowest_priority("qemu-system-x86_64") } else { Command::new("qemu-system-x86_64") };
    cmd.args(["-m", "2048", "-smp", "1", "-display", "none", "-monitor", "none", "-no-reboot", "-nic", "none"]);
    cmd.args(if kvm { ["-accel", "kvm", "-cpu", "host"] } else { ["-accel", "tcg", "-cpu", "max"] });
    cmd.arg("-kernel").arg(k.vmlinuz()).arg("-initrd").arg(initrd);
    // no_timer_check: a guest whose vCPU is starved during boot (TCG at the
    // lowest priority beside busy host suites) otherwise fails the IO-APIC
    // timer check and panics ("IO-APIC + timer doesn't work!").
    cmd.args(["-append", &format!("console=ttyS0 panic=-1 loglevel=4 no_timer_check blokir.steps={steps}")]);
    cmd.arg("-serial").arg(format!("file:{}", dir.join("console.log").display()));
    cmd.arg("-serial").arg(format!("file:{}", dir.join("results.txt").display()));
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().context("starting qemu-system-x86_64")?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// `veth`'s module file and those it needs, dependencies first.
fn module_chain(k: &Kernel, module: &str) -> anyhow::Result<Vec<PathBuf>> {
    let deps = std::fs::read_to_string(k.modules().join("modules.dep"))?;
    let line = deps
        .lines()
        .find(|l| l.split(':').next().and_then(|p| Path::new(p).file_name()).and_then(|n| n.to_str()).is_some_and(|n| n.split('.').next() == Some(module)))
        .with_context(|| format!("{}: no {module} module", k.modules().display()))?;
    let (own, needs) = line.split_once(':').unwrap_or((line, ""));
    // modules.dep lists what a module needs nearest first: load from the end.
    let mut chain: Vec<PathBuf> = needs.split_whitespace().rev().map(|p| k.modules().join(p)).collect();
    chain.push(k.modules().join(own));
    Ok(chain)
}

fn decompress(path: &Path) -> anyhow::Result<Vec<u8>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tool = match ext {
        "xz" => "xz",
        "zst" => "zstd",
        _ => return Ok(std::fs::read(path)?),
    };
    let out = Command::new(tool).args(["-dc"]).arg(path).output().with_context(|| format!("running {tool}"))?;
    ensure!(out.status.success(), "{tool} -dc {} failed", path.display());
    Ok(out.stdout)
}

/// The shared libraries `elf` loads, with the dynamic loader (`ldd`).
fn libraries(elf: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(elf).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    ensure!(out.status.success(), "ldd {} failed", elf.display());
    let mut libs = Vec::new();
    for l in text.lines() {
        let path = match l.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => l.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} is not installed"))
}

/// Copies following symlinks, keeping the mode.
fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}
