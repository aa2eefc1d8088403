//! The same DNS traffic through a router in network namespaces, filtered by
//! blokir (the real daemon, native XDP on the router's veth), by iptables
//! string rules (the way many ISPs block names on Linux), or not at all.
//!
//! ```text
//!  client (sender)          router                        sink (counts)
//!  eth0 ────────────── c0 [XDP | iptables FORWARD]  s0 ──────────── eth0
//!  198.18.0.1/24       198.18.0.254/24   198.18.1.254/24         198.18.1.1/24
//! ```
//!
//! Only 198.18.0.0/15; every packet stays in these namespaces, which are
//! removed (with their iptables rules and the daemon) on drop, error or not.
//!
//! CPU per packet: the CPU time of every thread that carries the traffic,
//! from the scheduler's own per-thread accounting (`schedstat`, ns): the
//! sender (its sendmmsg calls run the client's and the router's whole
//! receive path in softirq on its own CPU: this kernel has no separate IRQ
//! time accounting), the sink, and ksoftirqd (softirq work deferred under
//! load), divided by the packets that entered the router. Other processes
//! on the machine do not count.

use std::{
    collections::HashMap,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use blokir_tests::{
    netns::{Captured, run as run_cmd},
    noop,
    packets::{query, wire_name},
};
use hickory_proto::rr::RecordType;

use crate::{
    micro::{MapMem, maps_of},
    names::{List, ListIndex, NameGen, unlisted},
};

/// Names whose fate the correctness check reports: listed (exact rule),
/// look-alikes, a name below an exact rule.
pub const PROBES: [(&str, bool); 4] = [("telegram.org", true), ("nottelegram.org", false), ("my.telegram.org", false), ("telegram.org.evil.example", false)];
pub const SIZES: [usize; 3] = [10, 100, 1000];

pub struct Params {
    pub quick: bool,
    pub blokir: PathBuf,
    pub dir: PathBuf,
    pub max_rules: usize,
}

/// One configuration's run.
#[derive(Clone, Debug)]
pub struct Run {
    pub name: String,
    pub rules: usize,
    pub seconds: f64,
    pub sent: u64,
    /// Packets that entered the router, and that the client's veth dropped
    /// (the router's queue full).
    pub entered: u64,
    pub lost: u64,
    pub delivered: u64,
    pub cpu_ns: u64,
    /// Of the probes: how many reached the sink, of how many sent.
    pub probes: Vec<(String, u64, u64)>,
    /// The XDP program's kernel-measured run time per packet (bpf_stats;
    /// blokir's entry program with its tail calls, or the no-op).
    pub prog_ns: Option<f64>,
}

impl Run {
    pub fn cpu_per_packet(&self) -> f64 {
        self.cpu_ns as f64 / self.entered.max(1) as f64
    }
    pub fn pps_in(&self) -> f64 {
        self.entered as f64 / self.seconds
    }
    pub fn pps_out(&self) -> f64 {
        self.delivered as f64 / self.seconds
    }
}

pub struct Daemon2M {
    pub rules: usize,
    pub ready_s: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// VmHWM after the swap of `scrapes_during_swap`: the peak over the
    /// start and the swap.
    pub swap_hwm_kib: u64,
    pub maps: Vec<MapMem>,
}

/// /metrics scraped by `SCRAPERS` clients at once while the daemon swaps
/// its whole list for a new version (`rules reload`).
pub struct ScrapesDuringSwap {
    pub rules: usize,
    /// Rules the new version changes (added + removed).
    pub changed: usize,
    pub swap_s: f64,
    /// Scrapes begun and answered during the swap.
    pub scrapes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub const SCRAPERS: usize = 50;

pub struct Veth {
    pub runs: Vec<Run>,
    pub daemon: Daemon2M,
    pub scrapes: ScrapesDuringSwap,
    pub seconds: f64,
    /// Distinct queries in the traffic.
    pub ring: usize,
}

// ---------------------------------------------------------------------------
// The network

struct Net {
    client: String,
    router: String,
    sink: String,
    daemon: Option<Child>,
}

fn ip(args: &[&str]) -> anyhow::Result<Captured> {
    run_cmd(Command::new("ip").args(args), Duration::from_secs(20))?.ok()
}

/// Removes namespaces left by a benchmark process that is gone (one stopped
/// with Ctrl-C).
fn sweep_stale() {
    for e in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("blokirbench-") else { continue };
        let Some((pid, _)) = rest.split_once('-') else { continue };
        if pid.parse::<u32>().is_ok_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = run_cmd(Command::new("ip").args(["netns", "del", &name]), Duration::from_secs(10));
        }
    }
}

impl Net {
    fn new() -> anyhow::Result<Net> {
        sweep_stale();
        let pid = std::process::id();
        let [client, router, sink] = ["c", "r", "s"].map(|r| format!("blokirbench-{pid}-{r}"));
        let net = Net { client, router, sink, daemon: None };
        let (c, r, s) = (net.client.clone(), net.router.clone(), net.sink.clone());
        for ns in [&c, &r, &s] {
            ip(&["netns", "add", ns])?;
        }
        ip(&["-n", &r, "link", "add", "c0", "type", "veth", "peer", "name", "eth0", "netns", &c])?;
        ip(&["-n", &r, "link", "add", "s0", "type", "veth", "peer", "name", "eth0", "netns", &s])?;
        for (ns, dev, addr) in [(&c, "eth0", "198.18.0.1/24"), (&r, "c0", "198.18.0.254/24"), (&r, "s0", "198.18.1.254/24"), (&s, "eth0", "198.18.1.1/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        for ns in [&c, &r, &s] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", &c, "route", "add", "default", "via", "198.18.0.254"])?;
        ip(&["-n", &s, "route", "add", "default", "via", "198.18.1.254"])?;
        run_cmd(Command::new("ip").args(["netns", "exec", &r, "sysctl", "-qw", "net.ipv4.ip_forward=1"]), Duration::from_secs(10))?.ok()?;
        // Static neighbours: no ARP in the measurement.
        let mac = |ns: &str, dev: &str| -> anyhow::Result<String> {
            let out = ip(&["-n", ns, "-j", "link", "show", dev])?;
            let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
            v[0]["address"].as_str().map(str::to_string).ok_or_else(|| anyhow!("no MAC for {dev} in {ns}"))
        };
        let (c_mac, rc_mac, rs_mac, s_mac) = (mac(&c, "eth0")?, mac(&r, "c0")?, mac(&r, "s0")?, mac(&s, "eth0")?);
        ip(&["-n", &c, "neigh", "replace", "198.18.0.254", "lladdr", &rc_mac, "dev", "eth0", "nud", "permanent"])?;
        ip(&["-n", &r, "neigh", "replace", "198.18.0.1", "lladdr", &c_mac, "dev", "c0", "nud", "permanent"])?;
        ip(&["-n", &r, "neigh", "replace", "198.18.1.1", "lladdr", &s_mac, "dev", "s0", "nud", "permanent"])?;
        ip(&["-n", &s, "neigh", "replace", "198.18.1.254", "lladdr", &rs_mac, "dev", "eth0", "nud", "permanent"])?;
        Ok(net)
    }

    fn iptables_restore(&self, text: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.router, "iptables-restore"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running iptables-restore")?;
        child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("iptables-restore failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Packets the client's veth sent, and dropped (the router's backlog full).
    fn client_tx(&self) -> anyhow::Result<(u64, u64)> {
        let out = ip(&["-n", &self.client, "-s", "-j", "link", "show", "eth0"])?;
        let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
        let tx = &v[0]["stats64"]["tx"];
        Ok((tx["packets"].as_u64().unwrap_or(0), tx["dropped"].as_u64().unwrap_or(0)))
    }

    fn start_daemon(&mut self, blokir: &Path, rules: &Path, dir: &Path) -> anyhow::Result<(u32, f64)> {
        self.stop_daemon();
        let socket = dir.join("blokir.sock");
        let state = dir.join("state");
        std::fs::create_dir_all(&state)?;
        let log = std::fs::File::create(dir.join("blokir.log"))?;
        let t = Instant::now();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.router])
            .arg(blokir)
            .arg("--socket")
            .arg(&socket)
            .args(["run", "--iface", "c0", "--mode", "native", "--metrics-addr", "127.0.0.1:9947", "--state-dir"])
            .arg(&state)
            .arg("--rules")
            .arg(rules)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting blokir run")?;
        let pid = child.id();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(c) = self.daemon.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("blokir exited with {status}: {}", std::fs::read_to_string(dir.join("blokir.log")).unwrap_or_default());
            }
            if Instant::now() > deadline {
                bail!("blokir was not ready within 120 s");
            }
            // A daemon still loading its rules may not answer yet: only a
            // timely, attached status counts.
            if let Ok(out) = run_cmd(Command::new(blokir).arg("--socket").arg(&socket).args(["status", "--output", "json"]), Duration::from_secs(30))
                && out.success()
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&out.stdout)
                && v["attached"].as_array().is_some_and(|a| !a.is_empty())
            {
                return Ok((pid, t.elapsed().as_secs_f64()));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            // SIGTERM: the daemon detaches cleanly.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_daemon();
        for ns in [&self.client, &self.router, &self.sink] {
            let _ = run_cmd(Command::new("ip").args(["netns", "del", ns]), Duration::from_secs(10));
        }
    }
}

/// `SCRAPERS` clients scrape /metrics in a loop while the daemon (serving
/// `file`, the whole list) reloads a version of it with one rule in 20
/// changed; the latencies of the scrapes begun and answered during the swap.
fn scrapes_during_swap(net: &Net, p: &Params, list: &List, file: &Path) -> anyhow::Result<ScrapesDuringSwap> {
    let n = p.max_rules - 1;
    let mut text = String::from("telegram.org\n");
    let mut changed = 0;
    for i in 0..n {
        let rule = list.rule(i);
        if i % 20 == 0 {
            // The leaving rule, and the arriving one.
            changed += 2;
            text.push_str(&format!("swapped-{i}.bench.test\n"));
        } else {
            text.push_str(&rule);
            text.push('\n');
        }
    }
    std::fs::write(file, text)?;
    let done = Arc::new(AtomicBool::new(false));
    let swapping = Arc::new(AtomicBool::new(false));
    let scrapers: Vec<_> = (0..SCRAPERS)
        .map(|_| {
            let (done, swapping) = (done.clone(), swapping.clone());
            in_netns(&net.router, move || {
                let mut during = Vec::new();
                while !done.load(Ordering::Acquire) {
                    let began_in_swap = swapping.load(Ordering::Acquire);
                    let t = Instant::now();
                    scrape_once()?;
                    if began_in_swap && swapping.load(Ordering::Acquire) {
                        during.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                }
                Ok(during)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    let socket = p.dir.join("blokir.sock");
    swapping.store(true, Ordering::Release);
    let t = Instant::now();
    let out = run_cmd(Command::new(&p.blokir).arg("--socket").arg(&socket).args(["rules", "reload", "--force"]), Duration::from_secs(600))?;
    let swap_s = t.elapsed().as_secs_f64();
    swapping.store(false, Ordering::Release);
    done.store(true, Ordering::Release);
    let mut ms = Vec::new();
    for s in scrapers {
        ms.extend(s.join().map_err(|_| anyhow!("a scraper panicked"))??);
    }
    if !out.success() {
        bail!("rules reload during the scrapes: {out}");
    }
    if ms.is_empty() {
        bail!("no scrape was answered during the {swap_s:.1} s swap");
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    let r = ScrapesDuringSwap { rules: p.max_rules, changed, swap_s, scrapes: ms.len(), p50_ms: at(0.5), p99_ms: at(0.99), max_ms: at(1.0) };
    eprintln!(
        "bench: {SCRAPERS} scrapers during a {:.1} s swap of {} rules: {} scrapes, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        r.swap_s, r.rules, r.scrapes, r.p50_ms, r.p99_ms, r.max_ms
    );
    Ok(r)
}

/// One GET /metrics from the daemon in this thread's namespace, read whole.
fn scrape_once() -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect("127.0.0.1:9947").context("connecting to /metrics")?;
    conn.set_read_timeout(Some(Duration::from_secs(600)))?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: blokir\r\nConnection: close\r\n\r\n")?;
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply)?;
    if !reply.starts_with(b"HTTP/1.1 200") {
        bail!("/metrics answered {:?}", String::from_utf8_lossy(&reply[..reply.len().min(100)]));
    }
    Ok(())
}

/// Runs `f` on a new thread inside namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> thread::JoinHandle<anyhow::Result<T>> {
    let path = Path::new("/run/netns").join(ns);
    thread::spawn(move || {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: setns on a valid namespace file; affects this thread only.
        if unsafe { noop::setns(file.as_raw_fd(), noop::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("entering a network namespace");
        }
        f()
    })
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % 2, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn tid() -> u32 {
    // SAFETY: no arguments.
    unsafe { libc::gettid() as u32 }
}

/// A thread's CPU time so far (ns), from the scheduler.
fn schedstat(pid: u32, tid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

fn ksoftirqd() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            std::fs::read_to_string(e.path().join("comm")).ok()?.starts_with("ksoftirqd/").then_some(pid)
        })
        .collect()
}

/// The XDP programs of `pid`: (run_time_ns, run_cnt) of the one that runs
/// for every packet (blokir's entry, whose time includes the tail-called
/// stages; or the no-op).
fn prog_stats(pid: u32) -> (u64, u64) {
    let mut best = (0, 0);
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
        let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)?.trim().parse::<u64>().ok());
        if let (Some(6), Some(t), Some(n)) = (field("prog_type:"), field("run_time_ns:"), field("run_cnt:"))
            && n > best.1
        {
            best = (t, n);
        }
    }
    best
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Traffic

/// `n` queries, in sending order: every 32nd a probe, 3 in 32 listed
/// (blocked by every filter), the rest distinct unlisted names (so the
/// rule map is read cold, as with real traffic).
fn traffic(list: &List, index: &ListIndex, n: usize) -> Vec<Vec<u8>> {
    let mut g = NameGen::new(0x7e1e);
    let others = unlisted(&mut g, list, index, n);
    (0..n)
        .map(|j| {
            let name = match j % 32 {
                0 => PROBES[(j / 32) % PROBES.len()].0.to_string(),
                1..=3 => list.names[j % 9].clone(),
                _ => others[j].clone(),
            };
            query(&name, RecordType::A, true)
        })
        .collect()
}

struct SinkCounts {
    total: u64,
    probes: HashMap<Vec<u8>, u64>,
}

fn sink(stop: Arc<AtomicBool>, ready: Arc<AtomicBool>, tid_out: Arc<AtomicU64>) -> anyhow::Result<SinkCounts> {
    pin(1);
    tid_out.store(u64::from(tid()), Ordering::SeqCst);
    let sock = std::net::UdpSocket::bind("198.18.1.1:53").context("binding the sink")?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let size: libc::c_int = 32 << 20;
    // SAFETY: setting an int socket option on our socket.
    unsafe {
        libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&size as *const libc::c_int).cast(), 4);
    }
    let wires: Vec<Vec<u8>> = PROBES.iter().map(|(n, _)| wire_name(n)).collect();
    let mut counts = SinkCounts { total: 0, probes: HashMap::new() };
    ready.store(true, Ordering::SeqCst);
    const BATCH: usize = 64;
    let mut bufs = vec![[0u8; 512]; BATCH];
    loop {
        let mut iov: Vec<libc::iovec> = bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
        // SAFETY: zeroed mmsghdrs pointing at live iovecs.
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: `msgs` describes BATCH valid buffers.
        let n = unsafe { libc::recvmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0, std::ptr::null_mut()) };
        if n <= 0 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            continue;
        }
        for (m, b) in msgs.iter().zip(&bufs).take(n as usize) {
            counts.total += 1;
            let msg = &b[..m.msg_len as usize];
            if let Some(w) = wires.iter().find(|w| msg.len() >= 12 + w.len() && msg[12..12 + w.len()] == w[..]) {
                *counts.probes.entry(w.clone()).or_default() += 1;
            }
        }
    }
    Ok(counts)
}

fn sender(payloads: Arc<Vec<Vec<u8>>>, seconds: f64, tid_out: Arc<AtomicU64>) -> anyhow::Result<(u64, Vec<u64>)> {
    pin(0);
    tid_out.store(u64::from(tid()), Ordering::SeqCst);
    let sock = std::net::UdpSocket::bind("198.18.0.1:0").context("binding the sender")?;
    sock.connect("198.18.1.1:53")?;
    const BATCH: usize = 64;
    let mut sent = 0u64;
    let mut sent_per = vec![0u64; payloads.len()];
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut at = 0usize;
    while Instant::now() < end {
        let idx: Vec<usize> = (0..BATCH).map(|k| (at + k) % payloads.len()).collect();
        let mut iov: Vec<libc::iovec> = idx.iter().map(|&i| libc::iovec { iov_base: payloads[i].as_ptr() as *mut _, iov_len: payloads[i].len() }).collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: a zeroed mmsghdr is valid; we point it at one iovec.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: `msgs` describes BATCH valid, live buffers.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) || e.raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            return Err(e).context("sendmmsg");
        }
        for &i in &idx[..n as usize] {
            sent_per[i] += 1;
        }
        sent += n as u64;
        at = (at + n as usize) % payloads.len();
    }
    Ok((sent, sent_per))
}

struct Traffic {
    payloads: Arc<Vec<Vec<u8>>>,
    probe_index: Vec<(String, Vec<usize>)>,
}

fn measure(net: &Net, t: &Traffic, name: &str, rules: usize, seconds: f64, daemon: Option<u32>) -> anyhow::Result<Run> {
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let (sink_tid, send_tid) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sink_thread = {
        let (stop, ready, tid) = (stop.clone(), ready.clone(), sink_tid.clone());
        in_netns(&net.sink, move || sink(stop, ready, tid))
    };
    while !ready.load(Ordering::SeqCst) {
        if sink_thread.is_finished() {
            return Err(sink_thread.join().map_err(|_| anyhow!("sink panicked"))?.err().unwrap_or_else(|| anyhow!("sink ended")));
        }
        thread::sleep(Duration::from_millis(5));
    }
    let softirqd = ksoftirqd();
    let me = std::process::id();
    let soft = |v: &[u32]| v.iter().map(|p| schedstat(*p, *p)).sum::<u64>();
    let (tx0, drop0) = net.client_tx()?;
    let prog0 = daemon.map(prog_stats);
    let soft0 = soft(&softirqd);
    let sink0 = schedstat(me, sink_tid.load(Ordering::SeqCst) as u32);
    let start = Instant::now();
    let sender_thread = {
        let (p, tid) = (t.payloads.clone(), send_tid.clone());
        in_netns(&net.client, move || {
            let r = sender(p, seconds, tid.clone());
            // The thread's own CPU time, read before it exits.
            let own = schedstat(std::process::id(), tid.load(Ordering::SeqCst) as u32);
            r.map(|(s, per)| (s, per, own))
        })
    };
    let (sent, sent_per, send_cpu) = sender_thread.join().map_err(|_| anyhow!("sender panicked"))??;
    let elapsed = start.elapsed().as_secs_f64();
    // Let the last packets drain.
    thread::sleep(Duration::from_millis(300));
    let soft1 = soft(&softirqd);
    let sink1 = schedstat(me, sink_tid.load(Ordering::SeqCst) as u32);
    let prog1 = daemon.map(prog_stats);
    let (tx1, drop1) = net.client_tx()?;
    stop.store(true, Ordering::SeqCst);
    let counts = sink_thread.join().map_err(|_| anyhow!("sink panicked"))??;
    // The client's veth counts what it handed to the router; what it could
    // not (the router's queue full) is counted as dropped instead.
    let entered = (tx1 - tx0).min(sent);
    let lost = drop1 - drop0;
    let cpu_ns = send_cpu + (sink1 - sink0) + (soft1 - soft0);
    let probes = t
        .probe_index
        .iter()
        .map(|(n, idx)| {
            let sent: u64 = idx.iter().map(|&i| sent_per[i]).sum();
            (n.clone(), counts.probes.get(&wire_name(n)).copied().unwrap_or(0), sent)
        })
        .collect();
    let prog_ns = match (prog0, prog1) {
        (Some(a), Some(b)) if b.1 > a.1 => Some((b.0 - a.0) as f64 / (b.1 - a.1) as f64),
        _ => None,
    };
    let run = Run { name: name.to_string(), rules, seconds: elapsed, sent, entered, lost, delivered: counts.total, cpu_ns, probes, prog_ns };
    eprintln!(
        "  {:<28} {:>9.0} pps in, {:>9.0} pps delivered, {:>6.0} ns CPU/packet{}",
        run.name,
        run.pps_in(),
        run.pps_out(),
        run.cpu_per_packet(),
        prog_ns.map_or(String::new(), |p| format!(", program {p:.0} ns/packet"))
    );
    Ok(run)
}

/// `iptables-restore` input: one DROP rule per name in the FORWARD chain,
/// matching the name's DNS wire form anywhere in UDP/53 packets, as
/// operators write them (`--hex-string '|08|telegram|03|org|'`).
fn iptables_rules(names: &[String]) -> String {
    let mut s = String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for n in names {
        let mut hex = String::new();
        for label in n.split('.') {
            hex.push_str(&format!("|{:02x}|{label}", label.len()));
        }
        hex.push('|');
        s.push_str(&format!("-A FORWARD -p udp --dport 53 -m string --algo bm --hex-string \"{hex}\" -j DROP\n"));
    }
    s.push_str("COMMIT\n");
    s
}

/// The `k` names of a comparison list: telegram.org, then the list's first.
fn comparison_names(list: &List, k: usize) -> Vec<String> {
    std::iter::once("telegram.org".to_string()).chain(list.names.iter().take(k - 1).cloned()).collect()
}

struct BpfStats(Option<String>);

impl BpfStats {
    fn enable() -> Self {
        let old = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok();
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
        BpfStats(old)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", old.trim());
        }
    }
}

pub fn run(list: &List, index: &ListIndex, p: &Params) -> anyhow::Result<Veth> {
    let seconds = if p.quick { 1.0 } else { 4.0 };
    eprintln!("bench: veth router: blokir vs iptables string rules vs unfiltered, {seconds} s each");
    let mut net = Net::new()?;
    let _stats = BpfStats::enable();
    let ring = if p.quick { 65_536 } else { 1 << 20 };
    let payloads = traffic(list, index, ring);
    let probe_index =
        PROBES.iter().map(|(n, _)| (n.to_string(), (0..payloads.len()).filter(|j| j % 32 == 0 && PROBES[(j / 32) % PROBES.len()].0 == *n).collect())).collect();
    let t = Traffic { payloads: Arc::new(payloads), probe_index };
    let mut runs = Vec::new();

    runs.push(measure(&net, &t, "unfiltered", 0, seconds, None)?);

    // The cost of XDP itself on veth (native mode turns on the veth's NAPI
    // path): a no-op program on the same interface.
    {
        let router = net.router.clone();
        let link = in_netns(&router, || {
            let ifindex = unsafe { noop::if_nametoindex(c"c0".as_ptr()) };
            if ifindex == 0 {
                bail!("no c0 in the router");
            }
            let prog = noop::load_xdp_pass()?;
            Ok((noop::xdp_link(&prog, ifindex)?, prog))
        })
        .join()
        .map_err(|_| anyhow!("attaching the no-op panicked"))??;
        runs.push(measure(&net, &t, "no-op XDP (native)", 0, seconds, Some(std::process::id()))?);
        drop(link);
    }

    // blokir with the comparison lists, then with the whole list.
    for k in SIZES {
        let file = p.dir.join(format!("compare-{k}.rules"));
        std::fs::write(&file, comparison_names(list, k).join("\n") + "\n")?;
        let (pid, _) = net.start_daemon(&p.blokir, &file, &p.dir)?;
        runs.push(measure(&net, &t, &format!("blokir, {k} rules"), k, seconds, Some(pid))?);
    }

    let file = p.dir.join("all.rules");
    std::fs::write(&file, format!("telegram.org\n{}", list.file_text(p.max_rules - 1)))?;
    let (pid, ready_s) = net.start_daemon(&p.blokir, &file, &p.dir)?;
    let mut daemon = Daemon2M {
        rules: p.max_rules,
        ready_s,
        rss_kib: status_kib(pid, "VmRSS:"),
        hwm_kib: status_kib(pid, "VmHWM:"),
        swap_hwm_kib: 0,
        maps: maps_of(&pid.to_string())?,
    };
    eprintln!("bench: the daemon with {} rules: ready in {ready_s:.1} s, RSS {} MiB (peak {} MiB)", p.max_rules, daemon.rss_kib / 1024, daemon.hwm_kib / 1024);
    runs.push(measure(&net, &t, &format!("blokir, {} rules", p.max_rules), p.max_rules, seconds, Some(pid))?);
    let scrapes = scrapes_during_swap(&net, p, list, &file)?;
    daemon.swap_hwm_kib = status_kib(pid, "VmHWM:");
    net.stop_daemon();

    for k in SIZES {
        net.iptables_restore(&iptables_rules(&comparison_names(list, k)))?;
        runs.push(measure(&net, &t, &format!("iptables string, {k} rules"), k, seconds, None)?);
    }
    net.iptables_restore("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")?;
    drop(net);
    Ok(Veth { runs, daemon, scrapes, seconds, ring })
}
