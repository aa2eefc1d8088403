//! `blokir doctor`: whether this box can run blokir as configured, checked
//! before anything is loaded, one line per fact with what to do about it.
//! `blokir run` runs the same checks first (all but the native-XDP trial)
//! and refuses to start with the same words when one fails.

mod link;

use std::{
    fmt,
    io::ErrorKind,
    net::TcpListener,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{ebpf::Mode, metrics::Listen, pin::PinDir, support};
use link::{Trial, XdpMode};

/// `blokir run` and `blokir doctor` exit with this code when a check fails.
pub const EXIT_PREFLIGHT: u8 = 5;

/// Linux refuses native XDP above this MTU on drivers without XDP
/// multi-buffer (a frame must fit one 4 KiB page with XDP's 256-byte
/// headroom and the skb_shared_info tail).
const SINGLE_PAGE_MTU: u32 = 3498;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

/// One fact about the box: what was checked, how it stands, what to do.
#[derive(Debug, Serialize)]
pub struct Finding {
    pub check: String,
    pub level: Level,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn new(check: impl Into<String>, level: Level, detail: impl Into<String>) -> Self {
        Finding { check: check.into(), level, detail: detail.into(), fix: None }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4}  {:<14} {}", self.level, self.check, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      -> {fix}")?;
        }
        Ok(())
    }
}

/// What `blokir run` would be started with.
pub struct Target<'a> {
    pub ifaces: &'a [String],
    pub mode: Mode,
    pub state_dir: &'a Path,
    pub pin_dir: &'a Path,
    pub metrics: &'a Listen,
    /// Attach a no-op program in native mode to each free interface and
    /// detach it (doctor only: on some drivers attaching XDP restarts the
    /// rings, a moment without traffic).
    pub native_trial: bool,
    /// Check whether a running daemon holds the pin directory (doctor only:
    /// `run` takes that lock itself).
    pub daemon_running: bool,
}

/// Every check, in the order an operator would fix them.
pub fn examine(t: &Target) -> Vec<Finding> {
    let mut out = vec![kernel(), btf(), privileges()];
    let pins = PinDir::at(t.pin_dir);
    for iface in t.ifaces {
        out.extend(interface(iface, t, &pins));
    }
    let running = t.daemon_running && daemon_holds(t.pin_dir);
    out.push(pin_dir(t, running));
    out.push(state_dir(t.state_dir));
    let mut m = metrics(t.metrics);
    if running && m.level == Level::Fail && m.detail.ends_with("in use") {
        // Most likely by that daemon itself: a restart frees it.
        m.level = Level::Warn;
        m.detail.push_str(" (by the running blokir daemon, presumably)");
    }
    out.push(m);
    out
}

/// Whether a running daemon holds the pin directory's lock.
fn daemon_holds(pin_dir: &Path) -> bool {
    pin_dir.exists() && PinDir::at(pin_dir).lock().is_err_and(|e| format!("{e:#}").contains("another blokir daemon"))
}

/// The worst level found.
pub fn worst(findings: &[Finding]) -> Level {
    findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok)
}

/// What `blokir run` refuses to start over: the failed checks, one line
/// each (with what to do), or None.
pub fn refusal(findings: &[Finding]) -> Option<String> {
    let failed: Vec<String> = findings.iter().filter(|f| f.level == Level::Fail).map(ToString::to_string).collect();
    (!failed.is_empty()).then(|| failed.join("\n"))
}

fn kernel() -> Finding {
    let release = support::release();
    let tested = support::TESTED;
    match support::version(&release) {
        Some(v) if v < support::FLOOR => Finding::new(
            "kernel",
            Level::Fail,
            format!("Linux {release} is below the supported floor {}.{}", support::FLOOR.0, support::FLOOR.1),
        )
        .fix(format!("run blokir on Linux {}.{} or later (CI runs {tested})", support::FLOOR.0, support::FLOOR.1)),
        None => Finding::new("kernel", Level::Fail, format!("cannot read the kernel version from {release:?}")),
        Some(v) if support::TESTED_VERSIONS.contains(&v) => {
            Finding::new("kernel", Level::Ok, format!("Linux {release}, one of the kernels CI runs ({tested})"))
        }
        Some(_) => Finding::new(
            "kernel",
            Level::Warn,
            format!("Linux {release}: above the floor {}.{} but not one CI runs ({tested})", support::FLOOR.0, support::FLOOR.1),
        )
        .fix("expected to work; if a program is refused, `blokir run` says which and keeps the verifier's log"),
    }
}

fn btf() -> Finding {
    match Path::new("/sys/kernel/btf/vmlinux").exists() {
        true => Finding::new("btf", Level::Ok, "kernel BTF at /sys/kernel/btf/vmlinux"),
        false => Finding::new("btf", Level::Warn, "no kernel BTF (/sys/kernel/btf/vmlinux): every kernel CI runs has it; untested without")
            .fix("use a distribution kernel built with CONFIG_DEBUG_INFO_BTF=y"),
    }
}

/// Capabilities by number (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

fn privileges() -> Finding {
    let Some(caps) = effective_caps() else { return Finding::new("privileges", Level::Warn, "cannot read CapEff from /proc/self/status") };
    let has = |c: u32| caps & (1 << c) != 0;
    let bpf = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON));
    let missing: Vec<&str> =
        [(!has(CAP_NET_ADMIN)).then_some("CAP_NET_ADMIN"), (!bpf).then_some("CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)")].into_iter().flatten().collect();
    let held: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_PERFMON, "CAP_PERFMON"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")]
        .into_iter()
        .filter(|(c, _)| has(*c))
        .map(|(_, n)| n)
        .collect();
    // Since Linux 5.11 BPF memory is charged to the memory cgroup, not to
    // RLIMIT_MEMLOCK: below the floor only.
    let memlock = "BPF memory is charged to the memory cgroup (no RLIMIT_MEMLOCK needed)";
    match missing.is_empty() {
        true => Finding::new("privileges", Level::Ok, format!("{}; {memlock}", held.join(" "))),
        false => Finding::new("privileges", Level::Fail, format!("missing {}", missing.join(" and ")))
            .fix("run as root, or as the systemd unit in packaging/systemd/ runs it (its CapabilityBoundingSet)"),
    }
}

fn interface(name: &str, t: &Target, pins: &PinDir) -> Vec<Finding> {
    let check = format!("iface {name}");
    let link = match link::query(name) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return vec![
                Finding::new(check, Level::Fail, "no such interface in this network namespace")
                    .fix("check the name (`ip link`), or run blokir in the namespace that has it"),
            ];
        }
        Err(e) => return vec![Finding::new(check, Level::Fail, format!("reading it over netlink: {e}"))],
    };
    let mut out = Vec::new();
    let driver = link.driver.as_deref().unwrap_or("no driver named");
    let queues = link.rx_queues.map(|q| format!("{q} RX queue{}", if q == 1 { "" } else { "s" })).unwrap_or_else(|| "RX queues unknown".into());
    let state = format!("driver {driver}, {queues}, MTU {}, {}", link.mtu, if link.admin_up { format!("up (oper {})", link.oper) } else { "down".into() });
    out.push(match link.admin_up {
        true => Finding::new(check.clone(), Level::Ok, state),
        false => {
            Finding::new(check.clone(), Level::Warn, state).fix(format!("blokir attaches to a down interface, but nothing flows: `ip link set dev {name} up`"))
        }
    });
    let xdp = format!("xdp {name}");
    match link.xdp {
        Some((id, mode)) => {
            let prog = link::program_name(id);
            let named = prog.as_deref().map(|p| format!(" {p}")).unwrap_or_default();
            match pins.pinned_link(name) {
                Some((path, _)) => {
                    out.push(Finding::new(
                        xdp,
                        Level::Ok,
                        format!(
                            "program{named} (id {id}) attached in {} mode by the pinned link {}: `run` takes it over without a gap",
                            mode.name(),
                            path.display()
                        ),
                    ));
                    if mode == XdpMode::Generic && t.mode == Mode::Native {
                        out.push(
                            Finding::new(format!("mode {name}"), Level::Warn, "--mode native, but the pinned link is in generic mode: `run` keeps it")
                                .fix("to switch, stop with --detach-on-exit or run `blokir cleanup`, then start"),
                        );
                    }
                }
                None => out.push(
                    Finding::new(
                        xdp,
                        Level::Fail,
                        format!("another XDP program{named} (id {id}) is attached in {} mode, not by a link pinned in {}", mode.name(), pins.describe()),
                    )
                    .fix(format!(
                        "blokir cannot attach beside it: detach it (`ip link set dev {name} xdp off`), or give the --pin-dir of the blokir that attached it"
                    )),
                ),
            }
        }
        None if t.native_trial => out.push(native(name, &link, t.mode)),
        None => {}
    }
    if link.mtu > SINGLE_PAGE_MTU && t.mode != Mode::Generic && !(t.native_trial && link.xdp.is_none()) {
        out.push(
            Finding::new(
                format!("mtu {name}"),
                Level::Warn,
                format!("MTU {} is above {SINGLE_PAGE_MTU}: drivers without XDP multi-buffer refuse native XDP there", link.mtu),
            )
            .fix("`blokir doctor` on a free interface tries it; lower the MTU or use --mode generic if refused"),
        );
    }
    out
}

/// Attaches a no-op program in native mode and detaches it.
fn native(name: &str, link: &link::Link, mode: Mode) -> Finding {
    let check = format!("native {name}");
    let fallback = |why: String| match mode {
        Mode::Native => Finding::new(check.clone(), Level::Fail, format!("{why}; --mode native cannot attach"))
            .fix("use --mode auto or generic (slower: after the kernel's skb is built)"),
        Mode::Auto => Finding::new(check.clone(), Level::Warn, format!("{why}; --mode auto falls back to generic XDP (slower)")),
        Mode::Generic => Finding::new(check.clone(), Level::Ok, format!("{why}; --mode generic asked")),
    };
    match link::try_native(link.index) {
        Ok(Trial::Attached) => Finding::new(
            check.clone(),
            Level::Ok,
            format!(
                "a no-op XDP program attached in native mode and detached{}",
                match mode {
                    Mode::Generic => " (--mode generic asked: native would be faster)",
                    _ => "",
                }
            ),
        ),
        Ok(Trial::Unsupported) => fallback(format!("the driver {} has no native XDP", link.driver.as_deref().unwrap_or("(none)"))),
        Ok(Trial::Refused(e)) if link.mtu > SINGLE_PAGE_MTU && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ERANGE | libc::EOPNOTSUPP)) => {
            let mut f = fallback(format!("native XDP refused at MTU {} ({e})", link.mtu));
            f.fix.get_or_insert_with(|| format!("lower the MTU to {SINGLE_PAGE_MTU} or less for native XDP"));
            f
        }
        Ok(Trial::Refused(e)) => fallback(format!("native XDP refused ({e})")),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => Finding::new(check, Level::Warn, format!("not tried: loading a program needs privileges ({e})")),
        Err(e) => Finding::new(check, Level::Warn, format!("not tried: loading a no-op program failed ({e})")),
    }
}

fn pin_dir(t: &Target, running: bool) -> Finding {
    match crate::pin::preflight(t.pin_dir) {
        Err(why) => Finding::new("pin dir", Level::Fail, why),
        Ok(line) if running => Finding::new("pin dir", Level::Warn, format!("{line}; a blokir daemon is running and holds it"))
            .fix("`blokir run` refuses until it stops (a restart takes over its program without a gap)"),
        Ok(line) => Finding::new("pin dir", Level::Ok, line),
    }
}

/// Whether `dir` (or, while missing, the nearest directory above it, where
/// `run` creates it) takes a new file.
fn state_dir(dir: &Path) -> Finding {
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if existing == dir && !dir.is_dir() {
        return Finding::new("state dir", Level::Fail, format!("{} is not a directory", dir.display())).fix("give --state-dir a directory");
    }
    let probe: PathBuf = existing.join(format!(".blokir-doctor-{}", std::process::id()));
    let created = std::fs::File::create_new(&probe);
    let _ = std::fs::remove_file(&probe);
    match created {
        Ok(_) if existing == dir => Finding::new("state dir", Level::Ok, format!("{} is writable", dir.display())),
        Ok(_) => Finding::new("state dir", Level::Ok, format!("{} does not exist yet; `run` creates it in {}", dir.display(), existing.display())),
        Err(e) => {
            let why = match e.raw_os_error() {
                Some(libc::EROFS) => "is on a read-only file system".to_string(),
                Some(libc::EACCES | libc::EPERM) => "is not writable by this user".to_string(),
                _ => format!("cannot take a new file ({e})"),
            };
            Finding::new("state dir", Level::Fail, format!("{} {why}: the local list and the named lists are kept there", existing.display()))
                .fix("give --state-dir a writable directory (systemd: StateDirectory=blokir or ReadWritePaths=)")
        }
    }
}

fn metrics(listen: &Listen) -> Finding {
    match listen {
        Listen::Tcp(addr) => match TcpListener::bind(addr) {
            Ok(_) => Finding::new("metrics", Level::Ok, format!("{addr} is free")),
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                Finding::new("metrics", Level::Fail, format!("{addr} is in use")).fix("stop what listens there (`ss -ltnp`), or choose another --metrics-addr")
            }
            Err(e) => Finding::new("metrics", Level::Fail, format!("cannot listen on {addr}: {e}")).fix("choose an address of this host with --metrics-addr"),
        },
        Listen::Unix(path) => match (UnixStream::connect(path), path.parent()) {
            (Ok(_), _) => Finding::new("metrics", Level::Fail, format!("unix:{} is in use", path.display())).fix("stop it, or choose another --metrics-addr"),
            (Err(_), Some(dir)) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
                Finding::new("metrics", Level::Fail, format!("unix:{}: {} does not exist", path.display(), dir.display()))
            }
            _ => Finding::new("metrics", Level::Ok, format!("unix:{} is free", path.display())),
        },
    }
}
