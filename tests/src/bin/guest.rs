//! What the kernel matrix runs inside each booted kernel (`cargo xtask
//! kernels`): the programs loaded with their verifier figures, the captures
//! replayed through the real program, the program attached natively and
//! generically to a veth pair with real DNS queries and ClientHellos crossing
//! it, through a SIGKILL and a restart, and the packet-level suites.
//!
//! One line per result goes to the file given as the first argument (the
//! guest's second serial port), apart from the kernel's console:
//! `insns PROGRAM N`, `step NAME ok|FAIL DETAIL`, replay output between
//! `replay-begin NAME` and `replay-end`, and `done` last.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use blokir::ebpf::Kernel;
use blokir_tests::packets;
use hickory_proto::{op::Message, rr::RecordType};

/// Rules every check uses: subtrees and an exception, as the real-client
/// capture's names need (see ../shared/pcaps/README.md).
const RULES: &str = ".blocked.example\nallow mac.blocked.example\nblocked.test\n";
/// The verifier's budget per program: half of its 1M-instruction limit.
const BUDGET: u32 = 500_000;

const CLIENT_NS: &str = "client";
const EDGE_IFACE: &str = "edge0";
const EDGE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT_ADDR: &str = "198.18.0.1/24";
const PIN_DIR: &str = "/sys/fs/bpf/blokir";
const SOCKET: &str = "/run/blokir.sock";

struct Report(File);

impl Report {
    fn line(&mut self, line: &str) {
        // The serial port is the only way out: a failed write has nowhere to go.
        let _ = writeln!(self.0, "{line}");
        let _ = self.0.flush();
        eprintln!("guest: {line}");
    }

    fn step(&mut self, name: &str, result: anyhow::Result<String>) {
        match result {
            Ok(detail) => self.line(&format!("step {name} ok {detail}")),
            Err(e) => self.line(&format!("step {name} FAIL {}", format!("{e:#}").replace('\n', " | "))),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = args.next().context("usage: guest RESULTS-FILE [SUITES-DIR]")?;
    let suites = PathBuf::from(args.next().unwrap_or_else(|| "/suites".into()));
    let mut r = Report(File::options().append(true).create(true).open(&out).with_context(|| format!("opening {out}"))?);
    let blokir = PathBuf::from(std::env::var_os("BLOKIR_BIN").context("BLOKIR_BIN is not set")?);
    let pcaps = blokir_tests::pcaps_dir();
    let rules = Path::new("/tmp/national.rules");
    std::fs::write(rules, RULES)?;

    r.line(&format!("kernel {}", std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()));
    // BLOKIR_STEPS (comma-separated) picks some of: load, replay, suites, attach.
    let steps = std::env::var("BLOKIR_STEPS").unwrap_or_default();
    let wanted = |s: &str| steps.is_empty() || steps.split(',').any(|x| x == s);
    if wanted("load") {
        let res = load(&mut r);
        r.step("load", res);
    }
    if wanted("replay") {
        for (name, extra) in [("drop", &[][..]), ("answers", &["--dns-action", "nxdomain", "--tcp-action", "reset"][..])] {
            let res = replay(&mut r, &blokir, &pcaps, rules, name, extra);
            r.step(&format!("replay-{name}"), res);
        }
    }
    if wanted("attach") {
        for mode in ["native", "generic"] {
            let res = attach(&blokir, rules, mode);
            r.step(&format!("attach-{mode}"), res);
        }
    }
    if wanted("doctor") {
        let res = doctor(&blokir);
        r.step("doctor", res);
    }
    if wanted("suites") {
        let mut entries: Vec<_> = std::fs::read_dir(&suites).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
        entries.sort();
        for binary in entries {
            match run_suites(&binary) {
                Ok(modules) => {
                    for (module, res) in modules {
                        r.step(&format!("suite-{module}"), res);
                    }
                }
                Err(e) => r.step(&format!("suites {}", binary.display()), Err(e)),
            }
        }
    }
    r.line("done");
    Ok(())
}

/// Every program through this kernel's verifier, with its figures.
fn load(r: &mut Report) -> anyhow::Result<String> {
    let kernel = Kernel::load(1 << 16)?;
    let mut over = Vec::new();
    for (name, n) in kernel.verified_instructions()? {
        let n = n.context("the kernel reports no verified instruction count")?;
        r.line(&format!("insns {name} {n}"));
        if n > BUDGET {
            over.push(format!("{name} {n}"));
        }
    }
    ensure!(over.is_empty(), "over the verifier budget of {BUDGET}: {}", over.join(", "));
    Ok(String::new())
}

/// `blokir replay` over every capture, its JSON lines passed on for the host
/// to compare with its own run.
fn replay(r: &mut Report, blokir: &Path, pcaps: &Path, rules: &Path, name: &str, extra: &[&str]) -> anyhow::Result<String> {
    let mut files: Vec<_> =
        std::fs::read_dir(pcaps)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "pcap" || e == "pcapng")).collect();
    files.sort();
    ensure!(!files.is_empty(), "no captures in {}", pcaps.display());
    for f in &files {
        let out = Command::new(blokir)
            .arg("replay")
            .arg(f)
            .arg("--rules")
            .arg(rules)
            .args(["--rule-capacity", "65536", "--output", "json"])
            .args(extra)
            .env("NO_COLOR", "1")
            .output()?;
        let file = f.file_name().unwrap_or_default().to_string_lossy();
        r.line(&format!("replay-begin {name} {file}"));
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            r.line(l);
        }
        r.line("replay-end");
        ensure!(out.status.success(), "{file}: blokir replay exited with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(format!("{} captures", files.len()))
}

/// The packet-level suites' binary (each suite a module), its tests sharing
/// one loaded program and sampling the exhaustive sweeps: one result per
/// suite, with its failed tests.
fn run_suites(binary: &Path) -> anyhow::Result<Vec<(String, anyhow::Result<String>)>> {
    let start = Instant::now();
    let out = Command::new(binary).args(["--test-threads=1"]).env("BLOKIR_SHARE_PROGRAM", "1").env("BLOKIR_SAMPLE_SWEEPS", "1").output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // "test MODULE::NAME ... ok|FAILED|ignored"
    let mut modules: BTreeMap<String, (u32, Vec<String>)> = BTreeMap::new();
    for l in stdout.lines() {
        let Some((test, outcome)) = l.strip_prefix("test ").and_then(|l| l.split_once(" ... ")) else { continue };
        let (module, name) = test.split_once("::").unwrap_or(("", test));
        let entry = modules.entry(module.to_string()).or_default();
        match outcome {
            "ok" => entry.0 += 1,
            _ => entry.1.push(format!("{name}: {outcome}")),
        }
    }
    ensure!(!modules.is_empty(), "{} ran no tests ({}): {}", binary.display(), out.status, stderr.lines().take(4).collect::<Vec<_>>().join(" / "));
    let panics: Vec<&str> = stdout.lines().chain(stderr.lines()).filter(|l| l.contains("panicked")).take(6).collect();
    let mut results = Vec::new();
    for (module, (passed, failed)) in modules {
        let res = if failed.is_empty() {
            Ok(format!("{passed} passed"))
        } else {
            Err(anyhow!("{passed} passed; failed: {}; {}", failed.join(", "), panics.join(" / ")))
        };
        results.push((module, res));
    }
    let summary = stdout.lines().rev().find(|l| l.starts_with("test result:")).unwrap_or("no summary");
    let all = if out.status.success() { Ok(format!("{summary} in {:.0?}", start.elapsed())) } else { Err(anyhow!("{summary}; exit {}", out.status)) };
    results.push(("all".to_string(), all));
    Ok(results)
}

/// `blokir doctor` on a free veth: every check passes on a kernel of the
/// matrix, native XDP is tried and left detached; a missing interface is a
/// FAIL with exit code 5.
fn doctor(blokir: &Path) -> anyhow::Result<String> {
    let net = Veth::new()?;
    let run = |iface: &str| {
        Command::new(blokir)
            .args(["doctor", "--iface", iface, "--state-dir", "/tmp/doctor-state", "--pin-dir", "/sys/fs/bpf/doctor", "--output", "json"])
            .env("NO_COLOR", "1")
            .output()
    };
    let out = run(EDGE_IFACE)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "blokir doctor exited with {}: {text} {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    let report: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("blokir doctor's JSON: {text}"))?;
    let checks = report["checks"].as_array().context("no checks")?;
    let level =
        |check: &str| checks.iter().find(|c| c["check"] == check).map(|c| (c["level"].as_str().unwrap_or_default().to_string(), c["detail"].to_string()));
    for check in ["kernel", "privileges", &format!("iface {EDGE_IFACE}"), &format!("native {EDGE_IFACE}")] {
        let (lvl, detail) = level(check).with_context(|| format!("no {check} line in {text}"))?;
        ensure!(lvl == "ok", "{check}: {lvl} {detail}");
    }
    ensure!(!net.xdp_attached()?, "the no-op program stayed attached to {EDGE_IFACE}");
    let missing = run("missing0")?;
    ensure!(missing.status.code() == Some(5), "a missing interface: exit {} ({})", missing.status, String::from_utf8_lossy(&missing.stdout));
    Ok(format!("{} checks, worst {}", checks.len(), report["result"]))
}

/// The program on a veth pair in `mode`: listed names' DNS queries and
/// ClientHellos from a client namespace never reach this side's servers,
/// others do; the same after a SIGKILL of the daemon (the pinned link keeps
/// the program) and after a restart.
fn attach(blokir: &Path, rules: &Path, mode: &str) -> anyhow::Result<String> {
    let net = Veth::new()?;
    let servers = Servers::start()?;
    let mut daemon = Daemon::start(blokir, rules, mode)?;
    let mut seen = Vec::new();
    for phase in ["running", "after SIGKILL", "restarted"] {
        match phase {
            "after SIGKILL" => daemon.kill()?,
            "restarted" => daemon = Daemon::start(blokir, rules, mode)?,
            _ => {}
        }
        ensure!(net.xdp_attached()?, "{phase}: no XDP program on {EDGE_IFACE}");
        let got = net.in_client(|| probe(&servers))?;
        seen.push(format!("{phase}: {got}"));
    }
    daemon.stop()?;
    ensure!(!net.xdp_attached()?, "the program stayed attached after `blokir cleanup`");
    Ok(seen.join("; "))
}

/// Queries and hellos for a listed and an unlisted name: the listed ones
/// must never reach the servers, the unlisted ones must.
fn probe(servers: &Servers) -> anyhow::Result<String> {
    let mut failures = Vec::new();
    for (name, listed) in [("www.portal.blocked.example", true), ("blocked.test", true), ("mac.blocked.example", false), ("allowed.example", false)] {
        let answered = dns_query(name)?;
        if answered == listed {
            failures.push(format!("DNS {name}: answered={answered}"));
        }
        let before = servers.hellos(name);
        let delivered = send_hello(name)?;
        // The server reads what TCP delivered; a dropped segment never is.
        let reached = delivered && wait_for(|| servers.hellos(name) > before, Duration::from_secs(2));
        if reached == listed {
            failures.push(format!("TLS {name}: reached the server={reached}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join(", "));
    Ok("listed names stopped, others through".into())
}

fn dns_query(name: &str) -> anyhow::Result<bool> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    let query = packets::query(name, RecordType::A, false);
    let mut buf = [0u8; 1500];
    // Three tries: an answer lost to ARP resolution is not a block.
    for _ in 0..3 {
        sock.send_to(&query, SocketAddr::from((EDGE_ADDR, 53)))?;
        if let Ok(n) = sock.recv(&mut buf) {
            let m = Message::from_vec(&buf[..n])?;
            if m.answers().is_empty() {
                bail!("{name}: an answer without records");
            }
            return Ok(true);
        }
    }
    Ok(false)
}

/// Connects and sends a ClientHello for `name`; false when the connection
/// itself failed.
fn send_hello(name: &str) -> anyhow::Result<bool> {
    let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::from((EDGE_ADDR, 443)), Duration::from_secs(2)) else {
        return Ok(false);
    };
    s.write_all(&packets::client_hello(name))?;
    // Lingers in the background: the kernel keeps retransmitting a dropped
    // hello until the socket is gone; dropping it resets the connection.
    thread::spawn(move || {
        thread::sleep(Duration::from_secs(3));
        drop(s);
    });
    Ok(true)
}

fn wait_for(mut f: impl FnMut() -> bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A DNS server answering every A query, and a TCP server on 443 recording
/// the server names of the hellos it reads, on the edge side.
struct Servers {
    names: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Servers {
    fn start() -> anyhow::Result<Self> {
        let names = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let udp = UdpSocket::bind((EDGE_ADDR, 53)).context("binding the DNS server")?;
        udp.set_read_timeout(Some(Duration::from_millis(200)))?;
        let st = stop.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = udp.recv_from(&mut buf) else { continue };
                if let Ok(q) = Message::from_vec(&buf[..n]) {
                    let _ = udp.send_to(&answer(&q), from);
                }
            }
        });
        let tcp = TcpListener::bind((EDGE_ADDR, 443)).context("binding the TLS server")?;
        tcp.set_nonblocking(true)?;
        let (st, seen) = (stop.clone(), names.clone());
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((conn, _)) = tcp.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let seen = seen.clone();
                thread::spawn(move || {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    // Records the name as soon as the whole hello is in:
                    // the client keeps its end open.
                    let (mut hello, mut chunk) = (Vec::new(), [0u8; 1500]);
                    while let Ok(n @ 1..) = (&conn).read(&mut chunk) {
                        hello.extend_from_slice(&chunk[..n]);
                        if let Some(name) = sni(&hello) {
                            seen.lock().unwrap_or_else(|e| e.into_inner()).push(name);
                            break;
                        }
                    }
                });
            }
        });
        Ok(Servers { names, stop })
    }

    fn hellos(&self, name: &str) -> usize {
        self.names.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|n| *n == name).count()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn answer(q: &Message) -> Vec<u8> {
    use hickory_proto::rr::{Name, RData, Record, rdata::A};
    let mut m = Message::new();
    m.set_id(q.id()).set_message_type(hickory_proto::op::MessageType::Response).set_recursion_desired(true).set_recursion_available(true);
    for query in q.queries() {
        m.add_query(query.clone());
        let name: Name = query.name().clone();
        m.add_answer(Record::from_rdata(name, 60, RData::A(A(Ipv4Addr::new(198, 18, 0, 100)))));
    }
    m.to_vec().unwrap_or_default()
}

/// The server name of a ClientHello (the shape `packets::client_hello` and
/// real clients send), read with tls-parser.
fn sni(record: &[u8]) -> Option<String> {
    use tls_parser::{TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_client_hello_extensions, parse_tls_plaintext};
    let (_, plain) = parse_tls_plaintext(record).ok()?;
    plain.msg.iter().find_map(|m| match m {
        TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)) => {
            let (_, exts) = parse_tls_client_hello_extensions(ch.ext?).ok()?;
            exts.into_iter().find_map(|e| match e {
                TlsExtension::SNI(names) => names.first().map(|(_, n)| String::from_utf8_lossy(n).into_owned()),
                _ => None,
            })
        }
        _ => None,
    })
}

/// A veth pair: `edge0` here (198.18.0.2, where the program goes), its peer
/// in the `client` namespace (198.18.0.1).
struct Veth;

impl Veth {
    fn new() -> anyhow::Result<Self> {
        let _ = ip(&["netns", "del", CLIENT_NS]);
        let _ = ip(&["link", "del", EDGE_IFACE]);
        ip(&["netns", "add", CLIENT_NS])?;
        ip(&["link", "add", EDGE_IFACE, "type", "veth", "peer", "name", "client0"])?;
        ip(&["link", "set", "client0", "netns", CLIENT_NS])?;
        ip(&["addr", "add", "198.18.0.2/24", "dev", EDGE_IFACE])?;
        ip(&["link", "set", EDGE_IFACE, "up"])?;
        ip(&["-n", CLIENT_NS, "addr", "add", CLIENT_ADDR, "dev", "client0"])?;
        ip(&["-n", CLIENT_NS, "link", "set", "client0", "up"])?;
        ip(&["-n", CLIENT_NS, "link", "set", "lo", "up"])?;
        Ok(Veth)
    }

    fn xdp_attached(&self) -> anyhow::Result<bool> {
        let out = ip(&["link", "show", EDGE_IFACE])?;
        Ok(out.split_whitespace().any(|w| w.starts_with("xdp")))
    }

    /// Runs `f` on a thread inside the client namespace (its sockets are
    /// that namespace's).
    fn in_client<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(format!("/run/netns/{CLIENT_NS}"))?;
                // SAFETY: setns on a thread of our own, with a namespace fd.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("entering the client namespace: {}", std::io::Error::last_os_error());
                }
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
        })
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", EDGE_IFACE]);
        let _ = ip(&["netns", "del", CLIENT_NS]);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Daemon {
    child: Child,
    blokir: PathBuf,
}

impl Daemon {
    /// `blokir run` as an operator starts it; returns once `status` shows the
    /// program attached.
    fn start(blokir: &Path, rules: &Path, mode: &str) -> anyhow::Result<Self> {
        let log = File::create("/tmp/blokir.log")?;
        let child = Command::new(blokir)
            .args(["--socket", SOCKET, "run", "--iface", EDGE_IFACE, "--mode", mode, "--pin-dir", PIN_DIR, "--state-dir", "/tmp/state"])
            .args(["--metrics-addr", "127.0.0.1:9947", "--rule-capacity", "65536", "--rules"])
            .arg(rules)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut d = Daemon { child, blokir: blokir.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(status) = d.child.try_wait()? {
                bail!("blokir run exited with {status}: {}", log_tail());
            }
            ensure!(Instant::now() < deadline, "blokir run was not ready in 300 s: {}", log_tail());
            let out = Command::new(blokir).args(["--socket", SOCKET, "status", "--output", "json"]).output()?;
            if out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .is_ok_and(|v| v["attached"].as_array().is_some_and(|a| a.iter().any(|x| x["iface"] == EDGE_IFACE)))
            {
                return Ok(d);
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Stops the daemon and removes what it left attached and pinned.
    fn stop(mut self) -> anyhow::Result<()> {
        self.kill()?;
        let out = Command::new(&self.blokir).args(["cleanup", "--pin-dir", PIN_DIR]).output()?;
        ensure!(out.status.success(), "blokir cleanup: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(())
    }
}

impl Drop for Daemon {
    /// A failed check leaves nothing running or pinned for the next mode.
    fn drop(&mut self) {
        if self.child.try_wait().is_ok_and(|s| s.is_none()) {
            let _ = self.kill();
            let _ = Command::new(&self.blokir).args(["cleanup", "--pin-dir", PIN_DIR]).output();
        }
    }
}

fn log_tail() -> String {
    let f = File::open("/tmp/blokir.log").map(BufReader::new);
    let lines: Vec<String> = f.map(|f| f.lines().map_while(Result::ok).collect()).unwrap_or_default();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}
