//! End to end, HTTP: real `curl` in the client namespace, through the edge
//! where `blokir run` reads HTTP request Host names, to real Python
//! `http.server` processes in the resolver namespace (IPv4 and IPv6 on port
//! 80, and IPv4 on 8080, added with `--http-ports 80,8080`). A request to a
//! listed name never reaches the server (the segment that completes the name
//! and every later one are dropped) and curl times out; any other request is
//! served. Each request asks for a path of its own, so the servers' logs show
//! exactly which requests reached them. /metrics must count them exactly.
//!
//! Run as root, serially:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test e2e_http -- --test-threads=1`.

use std::{
    fs::File,
    net::IpAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use blokir_tests::netns::{EDGE_RESOLVER4, EDGE_RESOLVER6, RESOLVER4, RESOLVER6, Running, Topology, start};

const RULES: &str = "# HTTP end to end\n.blocked.example\nblocked.test\nallow open.blocked.example\n";

/// What curl is asked to do.
struct Attempt {
    /// The URL's host (the Host header curl sends), or an explicit Host
    /// header for a URL with the server's address.
    host: &'static str,
    explicit_host: bool,
    server: IpAddr,
    port: u16,
    blocked: bool,
}

impl Attempt {
    fn path(&self, n: usize) -> String {
        format!("/attempt-{n}")
    }

    fn command(&self, topo: &Topology, n: usize) -> Command {
        let addr = match self.server {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        let mut cmd = topo.exec(topo.client(), "curl");
        // A listed name stalls: curl gives up after --max-time.
        cmd.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "4"]);
        if self.explicit_host {
            cmd.args(["-H", &format!("Host: {}", self.host)]);
            cmd.arg(format!("http://{addr}:{}{}", self.port, self.path(n)));
        } else {
            cmd.args(["--resolve", &format!("{}:{}:{addr}", self.host, self.port)]);
            cmd.arg(format!("http://{}:{}{}", self.host, self.port, self.path(n)));
        }
        cmd
    }
}

/// A `python3 -m http.server` on `addr:port` in the resolver namespace,
/// logging each request it gets (`"GET /path HTTP/1.1" 404`) to a file.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn start(topo: &Topology, addr: IpAddr, port: u16) -> Self {
        let dir = topo.dir().join("www");
        std::fs::create_dir_all(&dir).unwrap();
        let log = topo.dir().join(format!("http-{addr}-{port}.log"));
        let file = File::create(&log).unwrap();
        let mut cmd = topo.exec(topo.resolver(), "python3");
        cmd.args(["-u", "-m", "http.server", "--bind", &addr.to_string(), "--directory"]).arg(&dir).arg(port.to_string());
        let child = cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap();
        Server { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(topo: &Topology, want: &[String], servers: &[Server]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = topo.run_in(topo.resolver(), &["ss", "-H", "-n", "-l", "-t"], Duration::from_secs(5)).unwrap().ok().unwrap().stdout;
        let listening: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().nth(3)).collect();
        if want.iter().all(|w| listening.contains(&w.as_str())) {
            return;
        }
        let logs: String = servers.iter().map(Server::log).collect();
        assert!(Instant::now() < deadline, "http.server is not listening on all of {want:?} after 30 s:\n{out}\nserver logs:\n{logs}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn curl_requests_to_listed_hosts_never_reach_the_server_and_others_are_served() {
    bench(false);
}

/// The resolver announces a 64-byte MSS, so curl cuts each request into
/// 52-byte segments (64 less the timestamp option; 76 on kernels that
/// raise it to their floor of 88): the Host header, and often the name,
/// is split.
#[test]
fn requests_in_tiny_segments_from_a_small_server_mss_are_read_whole() {
    bench(true);
}

fn bench(tiny: bool) {
    let started = Instant::now();
    let topo = Topology::new().unwrap();
    if tiny {
        for (ip, via) in [("-4", EDGE_RESOLVER4.to_string()), ("-6", EDGE_RESOLVER6.to_string())] {
            topo.run_in(topo.resolver(), &["ip", ip, "route", "change", "default", "via", &via, "advmss", "64"], Duration::from_secs(10))
                .unwrap()
                .ok()
                .unwrap();
        }
    }
    let rules = topo.dir().join("http.rules");
    std::fs::write(&rules, RULES).unwrap();
    let daemon = topo.start_daemon_with(&[rules], &["--http-ports", "80,8080"]).expect("starting blokir in the edge namespace");
    assert!(topo.xdp_attached().unwrap());
    let (v4, v6) = (IpAddr::from(RESOLVER4), IpAddr::from(RESOLVER6));
    let servers = [Server::start(&topo, v4, 80), Server::start(&topo, v6, 80), Server::start(&topo, v4, 8080)];
    wait_listening(&topo, &[format!("{RESOLVER4}:80"), format!("[{RESOLVER6}]:80"), format!("{RESOLVER4}:8080")], &servers);

    let a = |host, server, port, blocked| Attempt { host, explicit_host: false, server, port, blocked };
    let attempts = [
        a("portal.blocked.example", v4, 80, true),
        a("portal.blocked.example", v6, 80, true),
        a("blocked.example", v4, 80, true),
        a("BLOCKED.TEST", v6, 80, true),
        a("blocked.test", v4, 8080, true),
        Attempt { host: "WWW.Blocked.Example.", explicit_host: true, server: v4, port: 80, blocked: true },
        a("open.blocked.example", v4, 80, false),
        a("open.blocked.example", v6, 80, false),
        a("allowed.example", v4, 80, false),
        a("allowed.example", v6, 80, false),
        a("notblocked.example", v4, 8080, false),
        a("blocked.test.evil.example", v6, 80, false),
    ];
    // All at once: the blocked ones each wait out curl's --max-time.
    let running: Vec<Running> = attempts.iter().enumerate().map(|(n, at)| start(&mut at.command(&topo, n)).unwrap()).collect();
    if tiny {
        // While the blocked connections stall: the client sends 52-byte
        // segments on them.
        thread::sleep(Duration::from_millis(1500));
        let out = topo
            .run_in(topo.client(), &["ss", "-H", "-t", "-i", "state", "established", "( dport = :80 or dport = :8080 )"], Duration::from_secs(5))
            .unwrap()
            .ok()
            .unwrap()
            .stdout;
        // 64 less the timestamp option, or 76 where the kernel raises the
        // route's MSS to its floor of 88 (CI's, this one's): every request
        // (85 bytes or more) spans segments either way.
        let mss: Vec<u32> = out.split_whitespace().filter_map(|w| w.strip_prefix("mss:")).map(|m| m.parse().unwrap()).collect();
        assert!(!mss.is_empty() && mss.iter().all(|m| *m <= 76), "the client's segment size on its stalled connections: {mss:?}\n{out}");
    }
    let results: Vec<_> = running.into_iter().map(|r| r.finish(Duration::from_secs(20)).unwrap()).collect();
    thread::sleep(Duration::from_millis(300));
    let log: String = servers.iter().map(Server::log).collect();
    let mut failures = Vec::new();
    for (n, (at, out)) in attempts.iter().zip(&results).enumerate() {
        let reached = log.contains(&format!("GET {} HTTP/1.1", at.path(n)));
        let served = out.success() && out.stdout.trim() == "404";
        let ok = if at.blocked { !out.success() && out.code() == Some(28) && !reached } else { served && reached };
        eprintln!(
            "{} {}:{} via {}: curl {:?} {} in {:.1?}; reached the server: {reached}",
            if ok { "ok  " } else { "FAIL" },
            at.host,
            at.port,
            at.server,
            out.code(),
            out.stdout.trim(),
            out.elapsed
        );
        if !ok {
            failures.push(format!("{}: {out}", at.host));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\nserver log:\n{log}\nblokir log:\n{}", daemon.log());

    let m = daemon.metrics().unwrap();
    eprintln!("--- /metrics\n{}", m.text.lines().filter(|l| l.contains("http")).collect::<Vec<_>>().join("\n"));
    let count = |af: &str, pred: &dyn Fn(&Attempt) -> bool| attempts.iter().filter(|at| (at.server.is_ipv4() == (af == "ipv4")) && pred(at)).count() as u64;
    for af in ["ipv4", "ipv6"] {
        let labels = [("proto", "http"), ("af", af)];
        assert_eq!(m.value("blokir_inspected_total", &labels), Some(count(af, &|_| true)), "{af}\n{}", m.text);
        assert_eq!(m.value("blokir_blocked_total", &labels), Some(count(af, &|a| a.blocked)), "{af}\n{}", m.text);
        assert_eq!(m.value("blokir_allow_rule_hits_total", &labels), Some(count(af, &|a| a.host == "open.blocked.example")), "{af}\n{}", m.text);
    }
    for event in ["no_host", "bad_host", "not_request", "too_long", "out_of_order"] {
        assert_eq!(m.value("blokir_http_requests_total", &[("event", event)]), Some(0), "{event}\n{}", m.text);
    }
    assert_eq!(m.value("blokir_list_blocked_total", &[("list", "http")]), Some(attempts.iter().filter(|a| a.blocked).count() as u64), "{}", m.text);
    // Nothing went to the TLS stage's counters.
    assert_eq!(m.value("blokir_inspected_total", &[("proto", "tls"), ("af", "ipv4")]), Some(0));
    daemon.stop().unwrap();
    eprintln!("done in {:.1?}", started.elapsed());
}
