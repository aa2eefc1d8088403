//! A small network of three namespaces, built per test and removed on drop:
//!
//! ```text
//!  client                      edge (router)                    resolver
//!  eth0 ─────────────── c0 [blokir XDP]    r0 ─────────────── eth0
//!  198.18.0.1/24        198.18.0.254/24    198.18.1.254/24    198.18.1.1/24
//!  2001:db8::1/64       2001:db8::fe/64    2001:db8:1::fe/64  2001:db8:1::1/64
//!  (dig)                (forwarding on, v4 and v6)             (dnsmasq, UDP+TCP 53)
//! ```
//!
//! Only benchmarking (198.18.0.0/15) and documentation (2001:db8::/32)
//! addresses are used, and every packet stays inside these namespaces.
//! Namespace names carry a prefix, this process's pid and a counter, so runs
//! in parallel never collide; namespaces left behind by a process that died
//! without cleaning up (a demo stopped with Ctrl-C) are removed the next time
//! a topology is built. IPv6 duplicate address detection is off and the
//! build waits for every link to be operationally up, so the network is
//! usable the moment `Topology::new` returns.
//!
//! The client's TCP is tuned so that one `dig +tries=1` run puts exactly one
//! query on the wire even when the edge drops it: no tail-loss probe
//! (`tcp_early_retrans=0`), no SACK (so the FIN dig sends on giving up does
//! not make RACK mark the query lost), a 10 s minimum retransmission timeout
//! on the client's routes, and sockets left by dig are destroyed (`ss -K`)
//! right after it exits. A real client would retransmit, and each copy would
//! be dropped and counted too; the tuning only makes the counts exact.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const EDGE_CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const EDGE_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe);
pub const EDGE_RESOLVER4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);
pub const EDGE_RESOLVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xfe);
pub const RESOLVER4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const RESOLVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);

/// The client's interface (in the client namespace).
pub const CLIENT_IFACE: &str = "eth0";
/// The edge's client-facing interface: where blokir attaches.
pub const EDGE_CLIENT_IFACE: &str = "c0";
/// The edge's resolver-facing interface.
pub const EDGE_RESOLVER_IFACE: &str = "r0";
/// The resolver's interface (in the resolver namespace).
pub const RESOLVER_IFACE: &str = "eth0";
/// Where the daemon serves /metrics, inside the edge namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:9947";

/// The 11 names of the Indonesian government's July 2017 order to block
/// Telegram.
pub const TELEGRAM_NAMES: [&str; 11] = [
    "t.me",
    "telegram.me",
    "telegram.org",
    "core.telegram.org",
    "desktop.telegram.org",
    "macos.telegram.org",
    "web.telegram.org",
    "venus.web.telegram.org",
    "pluto.web.telegram.org",
    "flora.web.telegram.org",
    "flora-1.web.telegram.org",
];

/// Names the resolver also serves that the Telegram list does not cover
/// (its rules are exact names: `my.telegram.org` is not blocked).
pub const UNLISTED_NAMES: [&str; 5] = ["my.telegram.org", "nottelegram.org", "example.test", "www.example.test", "mail.example.test"];

/// A name the resolver serves for the readiness probes only.
pub const PROBE_NAME: &str = "probe.resolver.test";

/// The Telegram list as a rules file.
pub fn telegram_rules() -> String {
    let mut s = String::from("# The 11 names of Indonesia's 2017 order to block Telegram (exact names).\n");
    for n in TELEGRAM_NAMES {
        s.push_str(n);
        s.push('\n');
    }
    s
}

/// The A and AAAA answers the resolver gives for `name` (case-insensitive),
/// or `None` for a name it does not serve.
pub fn address_of(name: &str) -> Option<(Ipv4Addr, Ipv6Addr)> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let pick = |i: usize, net: u8| {
        let host = (i + 1) as u8;
        (Ipv4Addr::new(198, 19, net, host), Ipv6Addr::new(0x2001, 0xdb8, 0x100 + u16::from(net), 0, 0, 0, 0, u16::from(host)))
    };
    if let Some(i) = TELEGRAM_NAMES.iter().position(|n| *n == name) {
        return Some(pick(i, 0));
    }
    if name == PROBE_NAME {
        return Some(pick(0, 2));
    }
    UNLISTED_NAMES.iter().position(|n| *n == name).map(|i| pick(i, 1))
}

/// The resolver's hosts file: every name it serves, A and AAAA.
fn hosts_file() -> String {
    let mut s = String::new();
    for name in TELEGRAM_NAMES.iter().chain(UNLISTED_NAMES.iter()).chain([&PROBE_NAME]) {
        let (v4, v6) = address_of(name).expect("served");
        s.push_str(&format!("{v4} {name}\n{v6} {name}\n"));
    }
    s
}

// ---------------------------------------------------------------------------
// Running commands with bounded time

/// A finished command.
#[derive(Debug)]
pub struct Captured {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Captured {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Fails with the whole output unless the command exited 0.
    pub fn ok(self) -> anyhow::Result<Self> {
        if self.success() { Ok(self) } else { Err(anyhow!("{self}")) }
    }
}

impl fmt::Display for Captured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "`{}` exited with {} after {:?}", self.command, self.status, self.elapsed)?;
        if !self.stdout.is_empty() {
            writeln!(f, "--- stdout\n{}", self.stdout.trim_end())?;
        }
        if !self.stderr.is_empty() {
            writeln!(f, "--- stderr\n{}", self.stderr.trim_end())?;
        }
        Ok(())
    }
}

/// A started command whose output is being collected.
pub struct Running {
    command: String,
    child: Child,
    started: Instant,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
}

fn reader(pipe: Option<impl std::io::Read + Send + 'static>) -> Option<JoinHandle<Vec<u8>>> {
    pipe.map(|mut p| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            buf
        })
    })
}

/// Starts `cmd` with its output piped.
pub fn start(cmd: &mut Command) -> anyhow::Result<Running> {
    let command = describe(cmd);
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("starting `{command}`"))?;
    let (stdout, stderr) = (reader(child.stdout.take()), reader(child.stderr.take()));
    Ok(Running { command, child, started: Instant::now(), stdout, stderr })
}

impl Running {
    /// Waits at most `timeout` from its start; kills it if it runs longer.
    pub fn finish(mut self, timeout: Duration) -> anyhow::Result<Captured> {
        let deadline = self.started + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("`{}` did not finish within {timeout:?}; killed it", self.command);
            }
            thread::sleep(Duration::from_millis(5));
        };
        let elapsed = self.started.elapsed();
        let text = |h: Option<JoinHandle<Vec<u8>>>| h.map(|h| String::from_utf8_lossy(&h.join().unwrap_or_default()).into_owned()).unwrap_or_default();
        Ok(Captured { command: self.command.clone(), status, stdout: text(self.stdout.take()), stderr: text(self.stderr.take()), elapsed })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to completion within `timeout`, whatever its exit status.
pub fn run(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Captured> {
    start(cmd)?.finish(timeout)
}

/// Runs `ip ARGS`, failing on a non-zero exit.
fn ip(args: &[&str]) -> anyhow::Result<Captured> {
    run(Command::new("ip").args(args), Duration::from_secs(10))?.ok()
}

/// Sends `signal` (`TERM`, `KILL`) to `pid`.
pub fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    run(Command::new("kill").args(["-s", signal, &pid.to_string()]), Duration::from_secs(5))?.ok().map(drop)
}

// ---------------------------------------------------------------------------
// The topology

const PREFIX: &str = "blkr";
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Three namespaces, two veth pairs, a router and a DNS server. Everything is
/// removed on drop, processes started in the namespaces included.
pub struct Topology {
    client: String,
    edge: String,
    resolver: String,
    /// Namespaces created so far (all three once built).
    created: Vec<String>,
    dnsmasq: Option<Child>,
    blokir: Option<PathBuf>,
    dir: tempfile::TempDir,
    daemons_started: AtomicU32,
}

impl Topology {
    /// Builds the network and starts the resolver; returns once the client
    /// gets answers from it over UDP and TCP, IPv4 and IPv6.
    pub fn new() -> anyhow::Result<Self> {
        sweep_stale();
        let id = format!("{PREFIX}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let mut t = Topology {
            client: format!("{id}-c"),
            edge: format!("{id}-e"),
            resolver: format!("{id}-r"),
            created: Vec::new(),
            dnsmasq: None,
            blokir: None,
            dir: tempfile::Builder::new().prefix(&format!("{id}-")).tempdir().context("creating a temporary directory")?,
            daemons_started: AtomicU32::new(0),
        };
        // Daemons pin their links and maps in a bpffs of this topology's own,
        // visible inside `ip netns exec` (which hides the host's /sys) and
        // gone, with whatever is pinned in it, when unmounted on drop.
        std::fs::create_dir_all(t.bpffs())?;
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(t.bpffs()), Duration::from_secs(10))?.ok().context("mounting a bpffs for the pins")?;
        t.build().with_context(|| format!("building the namespaces {id}-{{c,e,r}} (needs root)"))?;
        t.start_resolver()?;
        Ok(t)
    }

    /// Uses this daemon binary instead of `$BLOKIR_BIN` / target/debug/blokir.
    pub fn with_blokir(mut self, path: impl Into<PathBuf>) -> Self {
        self.blokir = Some(path.into());
        self
    }

    /// The daemon binary: the one given to `with_blokir`, else `$BLOKIR_BIN`,
    /// else target/debug/blokir in the workspace.
    pub fn blokir(&self) -> anyhow::Result<PathBuf> {
        match &self.blokir {
            Some(b) => Ok(b.clone()),
            None => crate::blokir_bin(),
        }
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let (c, e, r) = (self.client.clone(), self.edge.clone(), self.resolver.clone());
        for ns in [&c, &e, &r] {
            ip(&["netns", "add", ns])?;
            self.created.push(ns.clone());
            // No duplicate address detection, link-local addresses included:
            // IPv6 works the moment a link is up.
            self.sysctl(ns, &["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", &c, "link", "add", CLIENT_IFACE, "type", "veth", "peer", "name", EDGE_CLIENT_IFACE, "netns", &e])?;
        ip(&["-n", &r, "link", "add", RESOLVER_IFACE, "type", "veth", "peer", "name", EDGE_RESOLVER_IFACE, "netns", &e])?;
        let addrs = [
            (&c, CLIENT_IFACE, CLIENT4, CLIENT6),
            (&e, EDGE_CLIENT_IFACE, EDGE_CLIENT4, EDGE_CLIENT6),
            (&e, EDGE_RESOLVER_IFACE, EDGE_RESOLVER4, EDGE_RESOLVER6),
            (&r, RESOLVER_IFACE, RESOLVER4, RESOLVER6),
        ];
        for (ns, dev, v4, v6) in addrs {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ip(&["-n", ns, "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        // IPv6 ignores a link until its operational state is UP, which the
        // kernel's link watcher sets up to a second after the carrier.
        let deadline = Instant::now() + Duration::from_secs(10);
        for (ns, dev) in [(&c, CLIENT_IFACE), (&e, EDGE_CLIENT_IFACE), (&e, EDGE_RESOLVER_IFACE), (&r, RESOLVER_IFACE)] {
            loop {
                let out = ip(&["-n", ns, "-o", "link", "show", dev])?;
                if out.stdout.contains(" state UP ") {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("{dev} in {ns} is not up after 10 s: {}", out.stdout);
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        self.sysctl(&e, &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        // See the module documentation: one dig run, one query on the wire.
        self.sysctl(&c, &["net.ipv4.tcp_early_retrans=0", "net.ipv4.tcp_sack=0"])?;
        let edge4 = EDGE_CLIENT4.to_string();
        let edge6 = EDGE_CLIENT6.to_string();
        ip(&["-n", &c, "route", "add", "default", "via", &edge4, "rto_min", "10s"])?;
        ip(&["-n", &c, "-6", "route", "add", "default", "via", &edge6, "rto_min", "10s"])?;
        ip(&["-n", &r, "route", "add", "default", "via", &EDGE_RESOLVER4.to_string()])?;
        ip(&["-n", &r, "-6", "route", "add", "default", "via", &EDGE_RESOLVER6.to_string()])?;
        Ok(())
    }

    fn sysctl(&self, ns: &str, settings: &[&str]) -> anyhow::Result<()> {
        run(self.exec(ns, "sysctl").arg("-qw").args(settings), Duration::from_secs(10))?.ok().map(drop)
    }

    fn start_resolver(&mut self) -> anyhow::Result<()> {
        let hosts = self.dir.path().join("hosts");
        std::fs::write(&hosts, hosts_file())?;
        let log = self.resolver_log_path();
        let out = std::fs::File::create(self.dir.path().join("dnsmasq.out"))?;
        let child = self
            .exec(&self.resolver, "dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--user=root",
                "--group=root",
                "--bind-dynamic",
                "--log-queries",
            ])
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg(format!("--listen-address={RESOLVER4}"))
            .arg(format!("--listen-address={RESOLVER6}"))
            .arg(format!("--pid-file={}", self.dir.path().join("dnsmasq.pid").display()))
            .arg(format!("--log-facility={}", log.display()))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting dnsmasq (package dnsmasq-base)")?;
        self.dnsmasq = Some(child);
        // Ready when dnsmasq listens on both addresses over both transports,
        // and the client gets answers that way (this also proves the routing
        // through the edge).
        let deadline = Instant::now() + Duration::from_secs(15);
        let want: Vec<String> = [RESOLVER4.to_string(), format!("[{RESOLVER6}]")].iter().map(|a| format!("{a}:53")).collect();
        loop {
            if let Some(status) = self.dnsmasq.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("dnsmasq exited with {status}:\n{}\n{}", self.file(Path::new("dnsmasq.out")), self.resolver_log());
            }
            let listening = run(self.exec(&self.resolver, "ss").args(["-H", "-n", "-l", "-t", "-u"]), Duration::from_secs(5))?.ok()?.stdout;
            let sockets: Vec<(&str, &str)> = listening.lines().filter_map(|l| Some((l.split_whitespace().next()?, l.split_whitespace().nth(4)?))).collect();
            if want.iter().all(|w| ["udp", "tcp"].iter().all(|p| sockets.contains(&(p, w.as_str())))) {
                break;
            }
            if Instant::now() >= deadline {
                bail!("dnsmasq is not listening on {want:?} after 15 s:\n{listening}\n{}", self.resolver_log());
            }
            thread::sleep(Duration::from_millis(10));
        }
        let probes: Vec<Query> = [(Transport::Udp, Family::V4), (Transport::Udp, Family::V6), (Transport::Tcp, Family::V4), (Transport::Tcp, Family::V6)]
            .into_iter()
            .map(|(t, f)| Query::new(PROBE_NAME, t, f))
            .collect();
        let answers = self.dig_all(&probes)?;
        if let Some(a) = answers.iter().find(|a| !a.resolved_to_expected()) {
            bail!("the client gets no answer from the resolver:\n{a}\n{}", self.resolver_log());
        }
        Ok(())
    }

    pub fn client(&self) -> &str {
        &self.client
    }

    pub fn edge(&self) -> &str {
        &self.edge
    }

    pub fn resolver(&self) -> &str {
        &self.resolver
    }

    /// A temporary directory for this topology's files (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's state directory (the same for every daemon started here).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The bpffs mounted for this topology.
    fn bpffs(&self) -> PathBuf {
        self.dir.path().join("bpf")
    }

    /// The daemons' `--pin-dir` (the same for every daemon started here).
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs().join("blokir")
    }

    /// Files pinned under the pin directory, as paths relative to it.
    pub fn pinned(&self) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else if let Ok(rel) = p.strip_prefix(base) {
                    out.push(rel.display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.pin_dir(), &self.pin_dir(), &mut out);
        out.sort();
        out
    }

    /// Runs `blokir ARGS...` on the host (not in a namespace), e.g.
    /// `cleanup --pin-dir DIR`.
    pub fn blokir_cli(&self, args: &[&str]) -> anyhow::Result<Captured> {
        run(Command::new(self.blokir()?).arg("--socket").arg(self.socket()).args(args).env("NO_COLOR", "1"), Duration::from_secs(30))
    }

    /// The daemon's control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/blokir.sock")
    }

    fn resolver_log_path(&self) -> PathBuf {
        self.dir.path().join("dnsmasq.log")
    }

    fn file(&self, name: &Path) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// dnsmasq's log, one `query[A] NAME from ADDR` line per query it got.
    pub fn resolver_log(&self) -> String {
        std::fs::read_to_string(self.resolver_log_path()).unwrap_or_default()
    }

    /// The names the resolver got queries for, lowercased, in order.
    pub fn resolver_queries(&self) -> Vec<String> {
        self.resolver_log()
            .lines()
            .filter_map(|l| l.split_once(": query[")?.1.split_once("] ")?.1.split_whitespace().next().map(str::to_ascii_lowercase))
            .collect()
    }

    /// `ip netns exec NS PROGRAM`: add arguments and run it.
    pub fn exec(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }

    /// Runs `ip netns exec NS ARGS...` within `timeout`.
    pub fn run_in(&self, ns: &str, args: &[&str], timeout: Duration) -> anyhow::Result<Captured> {
        let (program, rest) = args.split_first().ok_or_else(|| anyhow!("no command"))?;
        run(self.exec(ns, program).args(rest), timeout)
    }

    /// Runs one query from the client.
    pub fn dig(&self, q: &Query) -> anyhow::Result<Answer> {
        Ok(self.dig_all(std::slice::from_ref(q))?.remove(0))
    }

    /// Runs the queries from the client at the same time (a dropped query
    /// costs dig's 1 s timeout; these overlap), then removes the TCP sockets
    /// dig left behind so that nothing is retransmitted later.
    pub fn dig_all(&self, queries: &[Query]) -> anyhow::Result<Vec<Answer>> {
        let running = queries.iter().map(|q| start(self.exec(&self.client, "dig").args(q.dig_args()))).collect::<anyhow::Result<Vec<_>>>()?;
        let mut answers = Vec::new();
        for (q, r) in queries.iter().zip(running) {
            let out = r.finish(Duration::from_secs(10))?;
            answers.push(Answer::parse(q.clone(), out));
        }
        if queries.iter().any(|q| q.transport == Transport::Tcp) {
            self.kill_client_tcp()?;
        }
        Ok(answers)
    }

    /// Destroys the client's TCP sockets to port 53 (a dropped query would
    /// otherwise be retransmitted by the orphaned socket after dig exits).
    pub fn kill_client_tcp(&self) -> anyhow::Result<()> {
        run(self.exec(&self.client, "ss").args(["-K", "-t", "-n", "state", "all", "dport", "=", ":53"]), Duration::from_secs(10))?.ok().map(drop)
    }

    /// The client's kernel SNMP counters: `Tcp.RetransSegs`,
    /// `Udp.OutDatagrams`, `Udp6OutDatagrams`, ...
    pub fn client_snmp(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let out = run(self.exec(&self.client, "cat").args(["/proc/net/snmp", "/proc/net/snmp6"]), Duration::from_secs(10))?.ok()?;
        let mut m = BTreeMap::new();
        let mut header: Option<(String, Vec<String>)> = None;
        for line in out.stdout.lines() {
            if let Some((group, rest)) = line.split_once(": ") {
                let fields: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
                match header.take() {
                    Some((g, names)) if g == group => {
                        for (n, v) in names.iter().zip(&fields) {
                            if let Ok(v) = v.parse() {
                                m.insert(format!("{group}.{n}"), v);
                            }
                        }
                    }
                    _ => header = Some((group.to_string(), fields)),
                }
            } else if let [name, value] = line.split_whitespace().collect::<Vec<_>>()[..]
                && let Ok(v) = value.parse()
            {
                m.insert(name.to_string(), v);
            }
        }
        Ok(m)
    }

    /// Whether an XDP program is attached to the edge's client-facing
    /// interface (`xdp`, `xdpgeneric`, ... in `ip link show`).
    pub fn xdp_attached(&self) -> anyhow::Result<bool> {
        let out = ip(&["-n", &self.edge, "link", "show", EDGE_CLIENT_IFACE])?;
        Ok(out.stdout.split_whitespace().any(|w| w.starts_with("xdp")))
    }

    /// `blokir run` in the edge namespace on the client-facing interface,
    /// with this topology's socket, state directory and metrics address.
    pub fn daemon_command(&self, rules: &[PathBuf]) -> anyhow::Result<Command> {
        let mut cmd = self.daemon_command_default_pins(rules)?;
        cmd.arg("--pin-dir").arg(self.pin_dir());
        Ok(cmd)
    }

    /// `daemon_command` without `--pin-dir`: the default, as an operator
    /// runs it (under `ip netns exec`, whose fresh /sys has no bpffs).
    pub fn daemon_command_default_pins(&self, rules: &[PathBuf]) -> anyhow::Result<Command> {
        let mut cmd = self.exec(&self.edge, self.blokir()?);
        cmd.arg("--socket").arg(self.socket()).args(["run", "--iface", EDGE_CLIENT_IFACE, "--metrics-addr", METRICS_ADDR]);
        cmd.arg("--state-dir").arg(self.state_dir());
        for r in rules {
            cmd.arg("--rules").arg(r);
        }
        cmd.env("NO_COLOR", "1");
        Ok(cmd)
    }

    /// `blokir run` (default pin directory) as the packaged systemd unit
    /// (packaging/systemd/blokir.service) runs it, in the edge namespace:
    /// joined as `NetworkNamespacePath=` joins one (nsenter: the host's /sys
    /// and its bpffs stay), in a mount namespace of its own, slave to the
    /// host's, as systemd gives each sandboxed service, with the unit's
    /// `ProtectSystem=strict` (every mount read-only but /dev, /proc, /sys
    /// (`ReadWritePaths=/sys/fs/bpf`) and the state and runtime directories),
    /// `ProtectProc=invisible` and `ProcSubset=pid`, `NoNewPrivileges=yes`
    /// and its `CapabilityBoundingSet=`. Not reproduced: PrivateTmp,
    /// PrivateDevices, the system call filter, MemoryDenyWriteExecute.
    pub fn daemon_command_as_unit(&self, rules: &[PathBuf]) -> anyhow::Result<Command> {
        let plain = self.daemon_command_default_pins(rules)?;
        // `ip netns exec EDGE` off, the daemon's own arguments kept.
        let daemon: Vec<std::ffi::OsString> = plain.get_args().skip(3).map(ToOwned::to_owned).collect();
        let unit = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/blokir.service"))?;
        let caps = unit
            .lines()
            .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
            .context("no CapabilityBoundingSet= in the unit")?
            .split_whitespace()
            .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
            .collect::<String>();
        let writable = [self.state_dir(), self.socket().parent().context("socket dir")?.to_path_buf()];
        for d in &writable {
            std::fs::create_dir_all(d)?;
        }
        let script = format!(
            r#"set -e
for m in $(awk '{{print $5}}' /proc/self/mountinfo | sort -u); do
  case "$m" in /dev|/dev/*|/proc|/proc/*|/sys|/sys/*) ;; *) mount -o remount,bind,ro "$m" 2>/dev/null || true ;; esac
done
for d in {writable}; do mount --bind "$d" "$d"; mount -o remount,bind,rw "$d"; done
mount -t proc -o hidepid=invisible,subset=pid proc /proc
exec setpriv --no-new-privs --bounding-set -all{caps} "$@""#,
            writable = writable.iter().map(|d| format!("'{}'", d.display())).collect::<Vec<_>>().join(" "),
        );
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.edge)).args(["--", "unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", &script, "sh"]);
        cmd.args(daemon).env("NO_COLOR", "1");
        Ok(cmd)
    }

    /// `start_daemon_as_given` for the daemon as the systemd unit runs it
    /// (`daemon_command_as_unit`).
    pub fn start_daemon_as_unit(&self, rules: &[PathBuf], options: &[&str]) -> anyhow::Result<Daemon> {
        self.spawn_daemon(self.daemon_command_as_unit(rules)?, options)
    }

    /// Starts the daemon and waits until it answers `blokir status` with the
    /// program attached.
    pub fn start_daemon(&self, rules: &[PathBuf]) -> anyhow::Result<Daemon> {
        self.start_daemon_with(rules, &[])
    }

    /// `start_daemon` with more `blokir run` options (`--dns-action
    /// nxdomain`, ...). Unless `options` say otherwise, the daemon runs with
    /// `--cleanup`: a stopped daemon leaves nothing attached or pinned.
    pub fn start_daemon_with(&self, rules: &[PathBuf], options: &[&str]) -> anyhow::Result<Daemon> {
        let mut options = options.to_vec();
        if !options.iter().any(|o| ["--cleanup", "--detach-on-exit"].contains(o)) {
            options.push("--cleanup");
        }
        self.start_daemon_as_given(rules, &options)
    }

    /// Starts the daemon with exactly these options (no `--cleanup` added:
    /// with neither exit option, a stopped daemon leaves the program attached).
    pub fn start_daemon_as_given(&self, rules: &[PathBuf], options: &[&str]) -> anyhow::Result<Daemon> {
        self.spawn_daemon(self.daemon_command(rules)?, options)
    }

    /// `start_daemon_as_given` with the default pin directory.
    pub fn start_daemon_default_pins(&self, rules: &[PathBuf], options: &[&str]) -> anyhow::Result<Daemon> {
        self.spawn_daemon(self.daemon_command_default_pins(rules)?, options)
    }

    fn spawn_daemon(&self, mut cmd: Command, options: &[&str]) -> anyhow::Result<Daemon> {
        let n = self.daemons_started.fetch_add(1, Ordering::Relaxed);
        let log = self.dir.path().join(format!("blokir-{n}.log"));
        let file = std::fs::File::create(&log)?;
        cmd.args(options);
        let bin = self.blokir()?;
        let command = describe(&cmd);
        let child = cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file).spawn().with_context(|| format!("starting `{command}`"))?;
        let mut d = Daemon { child, bin, socket: self.socket(), log, edge: self.edge.clone(), command };
        d.wait_ready(Duration::from_secs(30))?;
        Ok(d)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut c) = self.dnsmasq.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.created.iter().rev() {
            remove_namespace(ns);
        }
        unmount(&self.bpffs());
    }
}

/// Lazily unmounts `dir` if something is mounted there (a bpffs: whatever
/// is pinned in it goes with it).
fn unmount(dir: &Path) {
    let _ = run(Command::new("umount").arg("-l").arg(dir), Duration::from_secs(10));
}

/// Kills the processes left in `ns` (all started by this harness) and
/// deletes it; its veth ends go with it.
fn remove_namespace(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids: Vec<u32> = run(Command::new("ip").args(["netns", "pids", ns]), Duration::from_secs(5))
            .map(|o| o.stdout.split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default();
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in pids {
            let _ = send_signal(pid, "KILL");
        }
        thread::sleep(Duration::from_millis(10));
    }
    if let Err(e) = ip(&["netns", "del", ns]) {
        eprintln!("warning: removing namespace {ns}: {e:#}");
    }
}

/// Removes namespaces of this harness whose creating process is gone.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let mut parts = name.split('-');
        let (Some(PREFIX), Some(pid), Some(n), Some(role), None) = (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) else { continue };
        let (Ok(pid), true, true) = (pid.parse::<u32>(), n.parse::<u32>().is_ok(), ["c", "e", "r"].contains(&role)) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_namespace(&name);
            // And its temporary directory, `{PREFIX}-{pid}-{n}-XXXXXX`.
            let dir_prefix = format!("{PREFIX}-{pid}-{n}-");
            for d in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
                if d.file_name().to_string_lossy().starts_with(&dir_prefix) {
                    unmount(&d.path().join("bpf"));
                    let _ = std::fs::remove_dir_all(d.path());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Queries

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    /// The `proto` label on /metrics.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "dns_udp",
            Transport::Tcp => "dns_tcp",
        }
    }
}

/// The address family of the query packet: IPv4 queries go to 198.18.1.1
/// for an A record, IPv6 queries to 2001:db8:1::1 for an AAAA record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The `af` label on /metrics.
    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    pub fn server(self) -> IpAddr {
        match self {
            Family::V4 => RESOLVER4.into(),
            Family::V6 => RESOLVER6.into(),
        }
    }

    pub fn record_type(self) -> &'static str {
        match self {
            Family::V4 => "A",
            Family::V6 => "AAAA",
        }
    }
}

/// One `dig +tries=1 +time=1` run from the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub name: String,
    pub transport: Transport,
    pub family: Family,
}

impl Query {
    pub fn new(name: &str, transport: Transport, family: Family) -> Self {
        Query { name: name.to_string(), transport, family }
    }

    pub fn udp4(name: &str) -> Self {
        Self::new(name, Transport::Udp, Family::V4)
    }

    pub fn udp6(name: &str) -> Self {
        Self::new(name, Transport::Udp, Family::V6)
    }

    pub fn tcp4(name: &str) -> Self {
        Self::new(name, Transport::Tcp, Family::V4)
    }

    pub fn tcp6(name: &str) -> Self {
        Self::new(name, Transport::Tcp, Family::V6)
    }

    /// dig's arguments: one try, a 1 s timeout.
    pub fn dig_args(&self) -> Vec<String> {
        let mut a = vec!["+tries=1".to_string(), "+time=1".to_string()];
        if self.transport == Transport::Tcp {
            a.push("+tcp".into());
        }
        a.push(format!("@{}", self.family.server()));
        a.push(self.name.clone());
        a.push(self.family.record_type().into());
        a
    }

    /// The address the resolver answers with, if it serves the name.
    pub fn expected(&self) -> Option<IpAddr> {
        address_of(&self.name).map(|(v4, v6)| match self.family {
            Family::V4 => IpAddr::from(v4),
            Family::V6 => IpAddr::from(v6),
        })
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({} {})", self.name, self.family.record_type(), if self.transport == Transport::Udp { "UDP" } else { "TCP" }, self.family.label())
    }
}

/// What dig reported.
#[derive(Debug)]
pub struct Answer {
    pub query: Query,
    pub out: Captured,
    /// `NOERROR`, `REFUSED`, ... when a response came.
    pub status: Option<String>,
    pub addresses: Vec<IpAddr>,
}

impl Answer {
    fn parse(query: Query, out: Captured) -> Self {
        let status = out.stdout.split_once("status: ").and_then(|(_, r)| r.split(|c: char| c == ',' || c.is_whitespace()).next()).map(str::to_string);
        let mut addresses = Vec::new();
        let mut in_answer = false;
        for line in out.stdout.lines() {
            if line.starts_with(";; ANSWER SECTION") {
                in_answer = true;
            } else if line.trim().is_empty() || line.starts_with(";;") {
                in_answer = false;
            } else if in_answer {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() >= 5
                    && (f[3] == "A" || f[3] == "AAAA")
                    && let Ok(a) = f[4].parse()
                {
                    addresses.push(a);
                }
            }
        }
        Answer { query, out, status, addresses }
    }

    /// No response: dig gave up after its one try (exit 9, "no servers could
    /// be reached").
    pub fn timed_out(&self) -> bool {
        self.out.code() == Some(9) && self.out.stdout.contains("no servers could be reached")
    }

    /// A NOERROR response with exactly the address the resolver serves.
    pub fn resolved_to_expected(&self) -> bool {
        self.out.success() && self.status.as_deref() == Some("NOERROR") && self.query.expected().is_some_and(|a| self.addresses == [a])
    }

    /// One line for people: `BLOCKED`, or what it resolved to.
    pub fn summary(&self) -> String {
        if self.timed_out() {
            "no answer: the query was dropped".into()
        } else if !self.addresses.is_empty() {
            self.addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        } else {
            format!("{} (exit {:?})", self.status.as_deref().unwrap_or("no response"), self.out.code())
        }
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}\n{}", self.query, self.summary(), self.out)
    }
}

// ---------------------------------------------------------------------------
// The daemon

/// A running `blokir run` in the edge namespace. Killed on drop if still
/// running; `stop` ends it the normal way (SIGTERM).
pub struct Daemon {
    child: Child,
    bin: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    edge: String,
    command: String,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("`{}` exited with {status}:\n{}", self.command, self.log());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("`{}` was not ready within {timeout:?}:\n{}", self.command, self.log());
            }
            if let Ok(out) = self.cli_within(&["status", "--output", "json"], left.min(Duration::from_secs(5)))
                && out.success()
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&out.stdout)
                && v["attached"].as_array().is_some_and(|a| a.iter().any(|x| x["iface"] == EDGE_CLIENT_IFACE))
            {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn cli_within(&self, args: &[&str], timeout: Duration) -> anyhow::Result<Captured> {
        run(Command::new(&self.bin).arg("--socket").arg(&self.socket).args(args).env("NO_COLOR", "1"), timeout)
    }

    /// Runs `blokir --socket SOCKET ARGS...` (the CLI talks to the daemon
    /// over its Unix socket; it need not run in the edge namespace).
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Captured> {
        self.cli_within(args, Duration::from_secs(10))
    }

    /// Scrapes /metrics with curl inside the edge namespace.
    pub fn metrics(&self) -> anyhow::Result<Metrics> {
        let out = run(
            Command::new("ip").args(["netns", "exec", &self.edge, "curl", "-sS", "--fail", "--max-time", "5", &format!("http://{METRICS_ADDR}/metrics")]),
            Duration::from_secs(10),
        )?
        .ok()?;
        Ok(Metrics { text: out.stdout })
    }

    /// Sends SIGKILL and waits until the process is gone.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        send_signal(self.pid(), "TERM")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                bail!("blokir did not stop within 10 s of SIGTERM:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(10));
        };
        if !status.success() {
            bail!("blokir exited with {status} after SIGTERM:\n{}", self.log());
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A /metrics page in the Prometheus text format.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub text: String,
}

impl Metrics {
    /// Every sample: metric name, labels, value.
    pub fn samples(&self) -> Vec<(String, BTreeMap<String, String>, f64)> {
        self.text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_sample).collect()
    }

    /// The value of the one sample of `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples().into_iter().find(|(n, l, _)| n == name && *l == want).map(|(_, _, v)| v as u64)
    }

    /// The lines of metrics whose names start with `prefix`.
    pub fn lines_of(&self, prefix: &str) -> Vec<&str> {
        self.text.lines().filter(|l| l.starts_with(prefix)).collect()
    }
}

fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else { return Some((series.to_string(), BTreeMap::new(), value)) };
    let body = rest.strip_suffix('}')?;
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut val = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => val.push('\n'),
                    c => val.push(c),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').trim().to_string(), val);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some((name.to_string(), labels, value))
}

/// Mounts bpffs at /sys/fs/bpf in the host's mount namespace when nothing
/// is there, as systemd does on every box blokir runs on: the tests that
/// run the daemon with its default pin directory inside `ip netns exec`
/// pin on the host's bpffs (a fresh VM or container may boot without one).
pub fn host_bpffs() -> anyhow::Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")?.lines().any(|l| l.split(' ').nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "));
    if !mounted {
        let status = Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status()?;
        anyhow::ensure!(status.success(), "mounting bpffs at /sys/fs/bpf: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines_parse() {
        let m = Metrics {
            text: "# HELP x y\nblokir_packets_total{} 17\nblokir_blocked_total{proto=\"dns_udp\",af=\"ipv4\"} 3\nblokir_rule_hits_total{list=\"local\",rule=\"*.a\\\"b\"} 2\nplain 5\n"
                .into(),
        };
        assert_eq!(m.value("blokir_packets_total", &[]), Some(17));
        assert_eq!(m.value("plain", &[]), Some(5));
        assert_eq!(m.value("blokir_blocked_total", &[("proto", "dns_udp"), ("af", "ipv4")]), Some(3));
        assert_eq!(m.value("blokir_blocked_total", &[("proto", "dns_udp")]), None);
        assert_eq!(m.value("blokir_rule_hits_total", &[("list", "local"), ("rule", "*.a\"b")]), Some(2));
    }

    #[test]
    fn every_served_name_has_its_own_addresses() {
        let all: Vec<_> = TELEGRAM_NAMES.iter().chain(UNLISTED_NAMES.iter()).chain([&PROBE_NAME]).map(|n| address_of(n).unwrap()).collect();
        let mut dedup = all.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), all.len());
        assert_eq!(address_of("WeB.TeLeGrAm.OrG."), address_of("web.telegram.org"));
        for (v4, v6) in all {
            assert_eq!(v4.octets()[..2], [198, 19]);
            assert_eq!(v6.segments()[..2], [0x2001, 0xdb8]);
        }
    }
}
