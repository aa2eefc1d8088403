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

/// A Python server in the resolver namespace (`script` and `args`), its
/// output in `<name>.log`, started once it prints `ready`; killed on drop.
struct Logged {
    child: Child,
    log: PathBuf,
}

impl Logged {
    fn start<A: AsRef<std::ffi::OsStr>>(topo: &Topology, name: &str, script: &str, args: impl IntoIterator<Item = A>) -> Self {
        let log = topo.dir().join(format!("{name}.log"));
        let file = File::create(&log).unwrap();
        let mut cmd = topo.exec(topo.resolver(), "python3");
        cmd.args(["-c", script]).args(args);
        let child = cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap();
        let s = Logged { child, log };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !s.text().contains("ready") {
            assert!(Instant::now() < deadline, "{name} did not start (is aioquic installed? `cargo xtask setup`): {}", s.text());
            thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Listener(Logged);

impl Listener {
    fn start(topo: &Topology, n: u32) -> Self {
        Listener(Logged::start(topo, &format!("udp-{n}"), LISTENER, [RESOLVER4.to_string(), RESOLVER6.to_string()]))
    }

    fn text(&self) -> String {
        self.0.text()
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

/// An HTTP/3 server (aioquic) on UDP/443 and UDP/4433 of each address given, with the
/// certificate and key given. Each datagram it gets is processed `DELAY`
/// seconds late: the path's round trip, without sch_netem. Prints `ready`,
/// then `handshake SNI` for each handshake completed and `request
/// AUTHORITY PATH` for each HTTP/3 request, which it answers with a page
/// naming the authority.
const H3_SERVER: &str = r#"
import asyncio, sys
from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import HandshakeCompleted, ProtocolNegotiated

cert, key, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
received = QuicServer.datagram_received
QuicServer.datagram_received = lambda self, data, addr: asyncio.get_running_loop().call_later(delay, received, self, data, addr)

class H3(QuicConnectionProtocol):
    h3 = None
    def quic_event_received(self, event):
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self.h3 = H3Connection(self._quic)
        if isinstance(event, HandshakeCompleted):
            print("handshake", self._quic.tls.client_hello_server_name if hasattr(self._quic.tls, "client_hello_server_name") else "-", flush=True)
        for ev in (self.h3.handle_event(event) if self.h3 else []):
            if isinstance(ev, HeadersReceived):
                h = dict(ev.headers)
                authority = h.get(b":authority", b"").decode()
                print("request", authority, h.get(b":path", b"").decode(), flush=True)
                self.h3.send_headers(ev.stream_id, [(b":status", b"200"), (b"content-type", b"text/html")])
                self.h3.send_data(ev.stream_id, f"<html><body>h3 page of {authority}</body></html>".encode(), end_stream=True)
                self.transmit()

async def main():
    cfg = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    cfg.load_cert_chain(cert, key)
    for a in sys.argv[4:]:
        for port in (443, 4433):
            await serve(a, port, configuration=cfg, create_protocol=H3)
    print("ready", flush=True)
    await asyncio.Future()

asyncio.run(main())
"#;

/// One-way delay the server adds to each datagram it gets (seconds).
const SERVER_DELAY: &str = "0.005";

struct H3Server(Logged);

impl H3Server {
    fn start(topo: &Topology, cert: &std::path::Path, key: &std::path::Path) -> Self {
        let args: [std::ffi::OsString; 5] = [cert.into(), key.into(), SERVER_DELAY.into(), RESOLVER4.to_string().into(), RESOLVER6.to_string().into()];
        H3Server(Logged::start(topo, "h3-server", H3_SERVER, args))
    }

    fn text(&self) -> String {
        self.0.text()
    }

    /// HTTP/3 requests for the page (`/`; Chromium asks for the favicon
    /// too) the server got for `authority`.
    fn requests(&self, authority: &str) -> usize {
        self.text().lines().filter(|l| l.split_whitespace().collect::<Vec<_>>() == ["request", authority, "/"]).count()
    }

    fn handshakes(&self) -> usize {
        self.text().lines().filter(|l| l.starts_with("handshake")).count()
    }
}

/// The base64 SHA-256 of the certificate's public key, for Chromium's
/// `--ignore-certificate-errors-spki-list` (its QUIC ignores
/// `--ignore-certificate-errors`).
fn spki_hash(cert: &std::path::Path) -> String {
    let script = format!("openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64", cert.display());
    let out = std::process::Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Headless Chromium loading `https://name/` over HTTP/3 only (forced onto
/// QUIC for `name:443`; no TCP fallback is possible, as nothing listens on
/// TCP/443) from `server`; returns the DOM it printed.
fn chromium_h3(topo: &Topology, tag: &str, name: &str, server: IpAddr, spki: &str) -> String {
    let mut cmd = topo.exec(topo.client(), "timeout");
    cmd.args(["-k", "3", "25", "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]);
    cmd.args(["--disable-background-networking", "--disable-component-update", "--disable-sync", "--timeout=8000"]);
    cmd.args(["--enable-quic", &format!("--origin-to-force-quic-on={name}:443"), &format!("--ignore-certificate-errors-spki-list={spki}")]);
    cmd.arg(format!("--user-data-dir={}", topo.dir().join(format!("chromium-{tag}")).display()));
    cmd.arg(format!("--host-resolver-rules=MAP {name} {}, MAP * ~NOTFOUND", blokir_tests::web::host(server)));
    cmd.args(["--dump-dom", &format!("https://{name}/")]);
    run(&mut cmd, Duration::from_secs(35)).unwrap().stdout
}

/// Debian's ngtcp2 client (`gtlsclient`, GnuTLS) fetching
/// `https://name:4433/` from `server` over HTTP/3; returns what it
/// printed. It sends the host it connects to as its SNI ("localhost" for an
/// address), so `name` resolves to `server` through a hosts file bound over
/// /etc/hosts in a mount namespace of its own.
fn gtlsclient(topo: &Topology, name: &str, server: IpAddr) -> String {
    let hosts = topo.dir().join(format!("hosts-{name}-{server}"));
    std::fs::write(&hosts, format!("{server} {name}\n")).unwrap();
    let script = format!(
        "mount --bind {} /etc/hosts && exec timeout -k 2 12 gtlsclient --exit-on-all-streams-close --no-quic-dump --timeout=5s {name} 4433 https://{name}:4433/",
        hosts.display()
    );
    let mut cmd = topo.exec(topo.client(), "unshare");
    cmd.args(["-m", "sh", "-c", &script]);
    let out = run(&mut cmd, Duration::from_secs(20)).unwrap();
    format!("{}{}", out.stdout, out.stderr)
}

/// QUIC on a port other than 443 (read by default: every UDP port is a
/// QUIC port) from another client, ngtcp2's: without blokir the listed
/// name is fetched (the harness works); with it, a listed name never
/// reaches the server and an unlisted one does, over IPv4 and IPv6; with
/// `quic-ports = [443]` in a config file, 4433 is not read.
#[test]
fn ngtcp2_client_on_port_4433() {
    let topo = Topology::new().unwrap();
    let (cert, key) = blokir_tests::web::self_signed(topo.dir()).unwrap();
    let server = H3Server::start(&topo, &cert, &key);
    let (listed, unlisted) = ("h3.blocked.example", "h3.open.example");
    let (listed_at, unlisted_at) = (format!("{listed}:4433"), format!("{unlisted}:4433"));
    let out = gtlsclient(&topo, listed, IpAddr::from(RESOLVER4));
    assert_eq!(server.requests(&listed_at), 1, "without blokir the listed name is fetched:\n{out}\n{}", server.text());
    let rules = topo.dir().join("h3.rules");
    std::fs::write(&rules, "*.blocked.example\n").unwrap();
    // With the event log on: QUIC blocks, decided by the daemon, are logged
    // as the kernel's are.
    let daemon = topo.start_daemon_with(std::slice::from_ref(&rules), &["--event-log"]).expect("starting blokir");
    for (n, addr) in [IpAddr::from(RESOLVER4), IpAddr::from(RESOLVER6)].into_iter().enumerate() {
        let handshakes = server.handshakes();
        let out = gtlsclient(&topo, listed, addr);
        let m = daemon.metrics().unwrap();
        assert_eq!(
            (server.requests(&listed_at), server.handshakes()),
            (1, handshakes),
            "{addr}: the listed name is not fetched\n{out}\n{}\n{}",
            server.text(),
            m.lines_of("blokir_quic").join("\n") + &m.lines_of("blokir_inspected").join("\n")
        );
        let out = gtlsclient(&topo, unlisted, addr);
        assert_eq!(server.requests(&unlisted_at), n + 1, "{addr}: the unlisted name is fetched\n{out}\n{}", server.text());
        let m = daemon.metrics().unwrap();
        let blocked = m.value("blokir_quic_reader_total", &[("outcome", "blocked")]).unwrap();
        assert_eq!(blocked, n as u64 + 1, "{addr}\n{}", m.text);
    }
    let log = daemon.log();
    let events: Vec<&str> = log.lines().filter(|l| l.contains("blokir::events") && l.contains("name=")).collect();
    assert_eq!(events.len(), 2, "one event per blocked flow:\n{log}");
    for (line, af) in events.iter().zip(["\"ipv4\"", "\"ipv6\""]) {
        for field in ["proto=\"quic\"", af, "list=\"h3\"", "rule=\"*.blocked.example\"", "name=\"h3.blocked.example\""] {
            assert!(line.contains(field), "{field} missing in {line}");
        }
    }
    assert!(!log.contains("198.18.0.1") && !log.contains("2001:db8::1"), "a client address was logged:\n{log}");
    let m = daemon.metrics().unwrap();
    assert_eq!(m.value("blokir_events_total", &[("outcome", "logged")]), Some(2), "{}", m.text);
    daemon.stop().unwrap();
    // `quic-ports` from a config file: 4433 no longer read, the listed name
    // is fetched there, and nothing is counted.
    let config = topo.dir().join("blokir.toml");
    std::fs::write(&config, "quic-ports = [443]\nquic-on-overload = \"drop\"\n").unwrap();
    let daemon = topo.start_daemon_with(std::slice::from_ref(&rules), &["--config", config.to_str().unwrap()]).expect("starting blokir");
    let out = gtlsclient(&topo, listed, IpAddr::from(RESOLVER4));
    assert_eq!(server.requests(&listed_at), 2, "4433 is not a QUIC port: the listed name is fetched\n{out}\n{}", server.text());
    let m = daemon.metrics().unwrap();
    assert_eq!(m.value("blokir_inspected_total", &[("proto", "quic"), ("af", "ipv4")]), Some(0), "{}", m.text);
    daemon.stop().unwrap();
}

/// A real HTTP/3 server (aioquic, 5 ms of RTT) and headless Chromium:
/// without blokir the listed name loads over HTTP/3 (the harness works);
/// with `--quic read` (the default) a listed name never completes a QUIC
/// handshake and the server never sees its request, while an unlisted name
/// loaded at the same time does, over IPv4 and IPv6; /metrics counts the
/// blocked flow and its rule and list hits exactly.
#[test]
fn http3_server_a_listed_name_never_loads_an_unlisted_one_does() {
    let topo = Topology::new().unwrap();
    let (cert, key) = blokir_tests::web::self_signed(topo.dir()).unwrap();
    let spki = spki_hash(&cert);
    let server = H3Server::start(&topo, &cert, &key);
    let (listed, unlisted) = ("h3.blocked.example", "h3.open.example");

    // The harness: without blokir the listed name loads over HTTP/3.
    let dom = chromium_h3(&topo, "bare", listed, IpAddr::from(RESOLVER4), &spki);
    assert!(dom.contains(&format!("h3 page of {listed}")), "without blokir the page loads: {dom}\n{}", server.text());
    assert_eq!((server.requests(listed), server.handshakes()), (1, 1), "{}", server.text());

    let rules = topo.dir().join("h3.rules");
    std::fs::write(&rules, "*.blocked.example\n").unwrap();
    let daemon = topo.start_daemon_with(std::slice::from_ref(&rules), &[]).expect("starting blokir");
    for (n, (addr, af)) in [(IpAddr::from(RESOLVER4), "ipv4"), (IpAddr::from(RESOLVER6), "ipv6")].into_iter().enumerate() {
        let before = (server.requests(listed), server.requests(unlisted), server.handshakes());
        // Both at once: the unlisted flow is untouched by the other's block.
        let (blocked_dom, open_dom) = thread::scope(|s| {
            let open = s.spawn(|| chromium_h3(&topo, &format!("open-{af}"), unlisted, addr, &spki));
            let blocked = chromium_h3(&topo, &format!("blocked-{af}"), listed, addr, &spki);
            (blocked, open.join().unwrap())
        });
        let after = (server.requests(listed), server.requests(unlisted), server.handshakes());
        assert!(open_dom.contains(&format!("h3 page of {unlisted}")), "{af}: the unlisted name loads: {open_dom}\n{}", server.text());
        assert!(!blocked_dom.contains("h3 page"), "{af}: the listed name does not load: {blocked_dom}");
        assert_eq!(after.0, before.0, "{af}: the server saw no request for the listed name\n{}", server.text());
        assert_eq!(after.1, before.1 + 1, "{af}: the server saw the unlisted name's request\n{}", server.text());
        assert_eq!(after.2, before.2 + 1, "{af}: one handshake completed (the unlisted name's)\n{}", server.text());
        let m = daemon.metrics().unwrap();
        let flows_blocked = m.value("blokir_quic_reader_total", &[("outcome", "blocked")]).unwrap();
        let dropped = m.value("blokir_blocked_total", &[("proto", "quic"), ("af", af)]).unwrap();
        let list = m.value("blokir_list_blocked_total", &[("list", "h3")]).unwrap();
        let rule = m.value("blokir_rule_hits_total", &[("list", "h3"), ("rule", "*.blocked.example")]).unwrap();
        let n = n as u64 + 1;
        eprintln!("{af}: {flows_blocked} flows blocked, {dropped} datagrams dropped, list {list}, rule {rule}");
        // Chromium opens one connection per load; each listed one is
        // blocked once and counted once for its rule and list.
        assert_eq!((flows_blocked, list, rule), (n, n, n), "{af}\n{}", m.text);
        assert!(dropped >= 1, "{af}: the listed flow's later datagrams were dropped\n{}", m.text);
        let lat = m.value("blokir_quic_verdict_latency_seconds_count", &[]).unwrap();
        assert_eq!(lat, n, "{af}: one verdict latency per blocked flow");
    }
    daemon.stop().unwrap();
}

/// With the daemon down (killed: its program stays attached, and its perf
/// buffers are gone), new QUIC flows cannot be read: `--quic-on-overload
/// drop` drops their Initials (an unlisted name does not load; fail
/// closed), `pass` lets them through unread (it loads; fail open). The next
/// daemon finds each undelivered Initial counted.
#[test]
fn daemon_down_overload_policy_decides() {
    let topo = Topology::new().unwrap();
    let (cert, key) = blokir_tests::web::self_signed(topo.dir()).unwrap();
    let spki = spki_hash(&cert);
    let server = H3Server::start(&topo, &cert, &key);
    let name = "h3.open.example";
    let rules = topo.dir().join("h3.rules");
    std::fs::write(&rules, "*.blocked.example\n").unwrap();
    for policy in ["drop", "pass"] {
        let daemon = topo.start_daemon_as_given(std::slice::from_ref(&rules), &["--quic-on-overload", policy]).expect("starting blokir");
        daemon.kill().unwrap();
        let before = server.requests(name);
        let dom = chromium_h3(&topo, &format!("down-{policy}"), name, IpAddr::from(RESOLVER4), &spki);
        let loaded = dom.contains(&format!("h3 page of {name}"));
        assert_eq!((loaded, server.requests(name) - before), if policy == "pass" { (true, 1) } else { (false, 0) }, "{policy}: {dom}\n{}", server.text());
        // The next daemon takes the pinned program over, counters and all
        // (and removes the pins when it stops: the next round starts afresh).
        let daemon = topo.start_daemon_with(std::slice::from_ref(&rules), &[]).expect("restarting blokir");
        let m = daemon.metrics().unwrap();
        let undelivered = m.value("blokir_quic_initials_total", &[("fate", "undelivered")]).unwrap();
        let dropped = m.value("blokir_blocked_total", &[("proto", "quic"), ("af", "ipv4")]).unwrap();
        eprintln!("{policy}: {undelivered} undelivered Initials, {dropped} dropped");
        assert!(undelivered > 0, "{policy}: the Initials sent while the daemon was down are counted\n{}", m.text);
        assert_eq!(dropped, if policy == "drop" { undelivered } else { 0 }, "{policy}\n{}", m.text);
        daemon.stop().unwrap();
    }
}

/// Sends each datagram of the file (one hex line each) from a socket of
/// its own (a new flow) to `HOST:443`, `RATE` a second, paced; prints the
/// rate reached.
const BLASTER: &str = r#"
import socket, sys, time
path, host, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
grams = [bytes.fromhex(l) for l in open(path)]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
start = time.monotonic()
for i, g in enumerate(grams):
    ahead = start + i / rate - time.monotonic()
    if ahead > 0.001:
        time.sleep(ahead)
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.sendto(g, (host, 443))
    s.close()
print(f"{len(grams) / (time.monotonic() - start):.0f}", flush=True)
"#;

/// The histogram's bucket counts (`le` ascending, cumulative) from a scrape.
fn latency_buckets(m: &blokir_tests::netns::Metrics) -> Vec<(f64, u64)> {
    let mut b: Vec<(f64, u64)> = m
        .lines_of("blokir_quic_verdict_latency_seconds_bucket")
        .iter()
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    b
}

/// The bucket bound under which `q` of the verdicts between two scrapes lie.
fn quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> f64 {
    let d: Vec<(f64, u64)> = after.iter().zip(before).map(|(a, b)| (a.0, a.1 - b.1)).collect();
    let total = d.last().map_or(0, |x| x.1);
    d.iter().find(|(_, c)| *c as f64 >= q * total as f64).map_or(f64::NAN, |x| x.0)
}

/// Verdict latency (the Initial's handoff in the kernel to the verdict in
/// `QUIC_BLOCKED`) at rising rates of new QUIC flows, each a listed name's
/// whole hello in one Initial (sealed as a client seals it): every Initial
/// is accounted for (handed up, or over the budget, or undelivered), every
/// one handed up and not lost is read and blocked, and p50/p99 (as bucket
/// bounds) are printed per rate.
#[test]
fn verdict_latency_at_new_flow_rates() {
    use blokir::quic::{
        initial::Version,
        seal::{client_hello, crypto_frame, initial},
    };
    let topo = Topology::new().unwrap();
    let rules = topo.dir().join("load.rules");
    std::fs::write(&rules, "*.blocked.example\n").unwrap();
    let daemon = topo.start_daemon_with(std::slice::from_ref(&rules), &[]).expect("starting blokir");
    const FLOWS: u32 = 2000;
    let mut flow = 0u32;
    for rate in ["500", "2000", "10000"] {
        let path = topo.dir().join(format!("initials-{rate}.hex"));
        let text: String = (0..FLOWS)
            .map(|_| {
                flow += 1;
                let dcid = [&flow.to_be_bytes()[..], &[0x5a; 4]].concat();
                let hello = client_hello(&format!("f{flow}.blocked.example"), false, 0);
                let g = initial(Version::V1, &dcid, &[7; 8], 0, &crypto_frame(0, &hello), 1200);
                g.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n"
            })
            .collect();
        std::fs::write(&path, text).unwrap();
        let before = daemon.metrics().unwrap();
        let mut cmd = topo.exec(topo.client(), "python3");
        cmd.args(["-c", BLASTER]).arg(&path).args([&RESOLVER4.to_string(), rate]);
        let out = run(&mut cmd, Duration::from_secs(60)).unwrap();
        thread::sleep(Duration::from_millis(500));
        let after = daemon.metrics().unwrap();
        let delta = |name: &str, labels: &[(&str, &str)]| after.value(name, labels).unwrap() - before.value(name, labels).unwrap();
        let fates: Vec<u64> =
            ["handed_up", "over_flow_cap", "over_budget", "undelivered"].iter().map(|f| delta("blokir_quic_initials_total", &[("fate", f)])).collect();
        let reader: Vec<u64> = ["read", "name", "blocked", "lost"].iter().map(|o| delta("blokir_quic_reader_total", &[("outcome", o)])).collect();
        let (b, a) = (latency_buckets(&before), latency_buckets(&after));
        let (p50, p99) = (quantile(&b, &a, 0.5) * 1e6, quantile(&b, &a, 0.99) * 1e6);
        let spread: Vec<String> = a.iter().zip(&b).map(|(x, y)| format!("<={}us:{}", x.0 * 1e6, x.1 - y.1)).collect();
        eprintln!(
            "{rate}/s asked, {}/s sent: fates (handed up, over cap, over budget, undelivered) {fates:?}; reader (read, name, blocked, lost) {reader:?}; verdict latency p50 <= {p50} us, p99 <= {p99} us ({})",
            out.stdout.trim(),
            spread.join(" ")
        );
        // A new socket may get the source port of a flow blocked before: its
        // Initial is then dropped as that flow's, before any fate.
        let seen = delta("blokir_inspected_total", &[("proto", "quic"), ("af", "ipv4")]);
        let dropped = delta("blokir_blocked_total", &[("proto", "quic"), ("af", "ipv4")]);
        eprintln!("{rate}/s: {seen} Initials seen at the edge, {dropped} dropped as a blocked flow's");
        assert_eq!(seen, u64::from(FLOWS), "{rate}/s: every Initial reached the edge");
        assert_eq!(fates.iter().sum::<u64>() + dropped, seen, "{rate}/s: every Initial has a fate or was dropped");
        // The perf buffer's lost records are the Initials it had no room for:
        // undelivered, never handed up.
        assert_eq!(reader[0], fates[0], "{rate}/s: every Initial handed up is read");
        assert!(reader[3] <= fates[3], "{rate}/s: lost ones are undelivered ones");
        // A reused source port meets the reader's finished flow (its verdict
        // not yet in the kernel): read, no second name.
        assert!(reader[1] <= reader[0], "{rate}/s: every one read is a name, but for reused ports");
        assert_eq!(reader[2], reader[1], "{rate}/s: every name read is listed, and blocked");
    }
    daemon.stop().unwrap();
}
