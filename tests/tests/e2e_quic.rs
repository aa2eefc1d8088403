//! End to end, QUIC: headless Chromium in the client namespace, forced onto
//! QUIC (`--origin-to-force-quic-on`), sends its Initials through the edge
//! where `blokir run` counts them, to a UDP listener on port 443 in the
//! resolver namespace that logs every datagram it gets. With `--quic pass`
//! every Initial reaches the listener and /metrics counts exactly those; with
//! `--quic drop` none does, and every one is counted as seen and blocked.
//!
//! Run as root, serially:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test e2e_quic -- --test-threads=1`.

use std::{
    fs::File,
    net::IpAddr,
    path::PathBuf,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use blokir_tests::netns::{RESOLVER4, RESOLVER6, Topology, run};

/// Binds UDP/443 on each address given, prints `ready`, then one line per
/// datagram: its length, first byte and version (hex).
const LISTENER: &str = r#"
import select, socket, sys
socks = []
for a in sys.argv[1:]:
    s = socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((a, 443))
    socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        d, peer = s.recvfrom(65535)
        print(len(d), d[0], d[1:5].hex(), peer[0], flush=True)
"#;

struct Listener {
    child: Child,
    log: PathBuf,
}

impl Listener {
    fn start(topo: &Topology, n: u32) -> Self {
        let log = topo.dir().join(format!("udp-{n}.log"));
        let file = File::create(&log).unwrap();
        let mut cmd = topo.exec(topo.resolver(), "python3");
        cmd.args(["-c", LISTENER, &RESOLVER4.to_string(), &RESOLVER6.to_string()]);
        let child = cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap();
        let l = Listener { child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !l.text().starts_with("ready") {
            assert!(Instant::now() < deadline, "the UDP listener did not start: {}", l.text());
            thread::sleep(Duration::from_millis(20));
        }
        l
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// QUIC v1 Initials received from `from` (datagrams of 1200 bytes or
    /// more whose first packet has a long header of type Initial).
    fn initials(&self, from: &str) -> u64 {
        self.text()
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() == 4
                    && f[0].parse::<usize>().is_ok_and(|n| n >= 1200)
                    && f[1].parse::<u8>().is_ok_and(|b| b & 0xf0 == 0xc0)
                    && f[2] == "00000001"
                    && f[3] == from
            })
            .count() as u64
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium(topo: &Topology, n: u32, server: IpAddr) {
    let name = "quic.portal.blocked.example";
    let mut cmd = topo.exec(topo.client(), "timeout");
    cmd.args(["-k", "3", "20", "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]);
    cmd.args(["--disable-background-networking", "--disable-component-update", "--disable-sync", "--ignore-certificate-errors", "--timeout=4000"]);
    cmd.args(["--enable-quic", &format!("--origin-to-force-quic-on={name}:443")]);
    cmd.arg(format!("--user-data-dir={}", topo.dir().join(format!("chromium-{n}")).display()));
    let server = match server {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    cmd.arg(format!("--host-resolver-rules=MAP {name} {server}, MAP * ~NOTFOUND"));
    cmd.args(["--dump-dom", &format!("https://{name}/")]);
    run(&mut cmd, Duration::from_secs(30)).unwrap();
}

#[test]
fn chromium_initials_are_counted_and_pass_or_are_dropped_by_policy() {
    let started = Instant::now();
    let topo = Topology::new().unwrap();
    let rules = topo.dir().join("quic.rules");
    std::fs::write(&rules, ".blocked.example\n").unwrap();
    let mut n = 0;
    for policy in ["pass", "drop"] {
        let daemon = topo.start_daemon_with(std::slice::from_ref(&rules), &["--quic", policy]).expect("starting blokir");
        let listener = Listener::start(&topo, n);
        for (server, af) in [(IpAddr::from(RESOLVER4), "ipv4"), (IpAddr::from(RESOLVER6), "ipv6")] {
            chromium(&topo, n, server);
            n += 1;
            thread::sleep(Duration::from_millis(200));
            let m = daemon.metrics().unwrap();
            let seen = m.value("blokir_inspected_total", &[("proto", "quic"), ("af", af)]).unwrap();
            let blocked = m.value("blokir_blocked_total", &[("proto", "quic"), ("af", af)]).unwrap();
            let from = match server {
                IpAddr::V4(_) => "198.18.0.1".to_string(),
                IpAddr::V6(_) => "2001:db8::1".to_string(),
            };
            let received = listener.initials(&from);
            eprintln!("{policy} {af}: {seen} Initials seen, {blocked} blocked, {received} received");
            assert!(seen >= 1, "{policy} {af}: Chromium sent no Initial the edge recognized\n{}\n{}", listener.text(), m.text);
            if policy == "pass" {
                assert_eq!((received, blocked), (seen, 0), "{policy} {af}\n{}", listener.text());
            } else {
                assert_eq!((received, blocked), (0, seen), "{policy} {af}\n{}", listener.text());
            }
        }
        daemon.stop().unwrap();
    }
    eprintln!("done in {:.1?}", started.elapsed());
}

/// `--quic read`: Chromium's hello (two Initials, shuffled CRYPTO frames)
/// is read by the daemon. Listed, the flow is blocked once its name is read:
/// the Initials Chromium sends after that (it retransmits, as no server
/// answers) never reach the listener, and every one of them is counted as
/// blocked. Unlisted, every Initial reaches the listener and none is blocked.
#[test]
fn read_blocks_a_listed_name_and_passes_an_unlisted_one() {
    let topo = Topology::new().unwrap();
    for (n, (list, listed)) in (100..).zip([(".blocked.example\n", true), ("other.example\n", false)]) {
        let rules = topo.dir().join(format!("quic-read-{n}.rules"));
        std::fs::write(&rules, list).unwrap();
        let daemon = topo.start_daemon_with(std::slice::from_ref(&rules), &["--quic", "read"]).expect("starting blokir");
        let listener = Listener::start(&topo, n);
        chromium(&topo, n, IpAddr::from(RESOLVER4));
        thread::sleep(Duration::from_millis(300));
        let m = daemon.metrics().unwrap();
        let seen = m.value("blokir_inspected_total", &[("proto", "quic"), ("af", "ipv4")]).unwrap();
        let blocked = m.value("blokir_blocked_total", &[("proto", "quic"), ("af", "ipv4")]).unwrap();
        let names = m.value("blokir_quic_reader_total", &[("outcome", "name")]).unwrap();
        let flows_blocked = m.value("blokir_quic_reader_total", &[("outcome", "blocked")]).unwrap();
        let handed_up = m.value("blokir_quic_initials_total", &[("fate", "handed_up")]).unwrap();
        let received = listener.initials("198.18.0.1");
        eprintln!(
            "listed {listed}: {seen} seen, {handed_up} handed up, {names} names, {flows_blocked} flows blocked, {blocked} Initials dropped, {received} received"
        );
        assert!(names >= 1, "no name read\n{}", m.text);
        assert_eq!(received + blocked, seen, "every Initial seen was received or dropped\n{}", listener.text());
        if listed {
            assert!(flows_blocked >= 1 && blocked >= 1, "listed: nothing blocked\n{}", m.text);
            assert!(received <= 2 * flows_blocked, "listed: {received} Initials reached the server after {flows_blocked} flows were blocked");
        } else {
            assert_eq!((flows_blocked, blocked), (0, 0), "unlisted\n{}", m.text);
        }
        daemon.stop().unwrap();
    }
}
