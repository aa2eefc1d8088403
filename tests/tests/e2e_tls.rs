//! End to end, TLS: real clients (curl, `openssl s_client`, Python's `ssl`,
//! headless Chromium) in the client namespace, through the edge where
//! `blokir run` reads ClientHello server names, to real `openssl s_server
//! -www` processes in the resolver namespace. A listed name's handshake
//! stalls (the segment that completes the name, and every later one, is
//! dropped); an unlisted name gets the s_server status page.
//!
//! Both ends are captured (tcpdump on the client's and on the resolver's
//! interface). The client side shows every hello as sent: its segments and
//! where the name sat. The resolver side shows what the edge let through.
//! Besides what each client reports, the tests check that no listed name ever
//! reached a server, that the servers answered no listed hello, that they got
//! exactly the bytes before the segment that completed the name, and that
//! /metrics counts what was on the wire.
//!
//! `openssl s_server` serves one connection at a time, and a stalled handshake
//! holds it until the connection dies. So the server runs on several
//! addresses (one process each), each blocked attempt of a batch gets its own,
//! stalled connections are destroyed (`ss -K`, both ends) after the batch,
//! and a probe then shows every server still answering: a blocked attempt
//! failed because of the edge, not because its server was busy.
//!
//! Chromium maps only the test name to a server (`--host-resolver-rules="MAP
//! NAME ADDR, MAP * ~NOTFOUND"`): with `MAP * ADDR` its own background
//! requests (component updates, accounts) go to the same single-threaded
//! s_server and hold it with a POST it never answers, so the page never
//! loads. `--timeout=5000` ends a stalled page load with an empty DOM.
//!
//! The captures are taken at the client and at the resolver, not on the
//! edge's client-facing interface: XDP runs before packet taps, so a capture
//! there never shows the segments the program dropped. The client's side
//! shows exactly what reached the edge (the XDP program on the veth peer
//! turns the client's segmentation offload off: what is captured there is
//! what is on the wire). `BLOKIR_KEEP_CAPTURES=DIR` keeps both captures of
//! a failed test.
//!
//! Run as root, serially:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test e2e_tls -- --test-threads=1`.

use std::{
    cell::Cell,
    collections::BTreeMap,
    fmt,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use blokir_tests::netns::{
    CLIENT_IFACE, Captured, Daemon, EDGE_RESOLVER4, EDGE_RESOLVER6, Metrics, RESOLVER_IFACE, Running, Topology, run, send_signal, start,
};
use etherparse::{NetSlice, SlicedPacket, TcpOptionElement, TransportSlice};
use tls_parser::{TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_client_hello_extensions, parse_tls_plaintext};

/// A line of the s_server `-www` status page.
const PAGE: &str = "Ciphers supported in s_server binary";

/// The rules: `.blocked.example` and below, `blocked.test` exactly, and one
/// allow rule under the blocked domain.
const RULES: &str = "# TLS end to end\n.blocked.example\nblocked.test\nallow open.blocked.example\n";

/// Whether `RULES` blocks `name` (ASCII case ignored).
fn listed(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    !allowed_by_rule(&n) && (n == "blocked.example" || n.ends_with(".blocked.example") || n == "blocked.test")
}

fn allowed_by_rule(name: &str) -> bool {
    name.eq_ignore_ascii_case("open.blocked.example")
}

/// The server MSS the tiny-segment test sets on the resolver's routes.
const TINY_MSS: u16 = 64;

// ---------------------------------------------------------------------------
// Clients

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    /// `curl -sk --max-time 5 --resolve NAME:443:ADDR https://NAME/`.
    Curl,
    /// `openssl s_client -brief` (TLS 1.3).
    OpenSsl,
    /// `openssl s_client -brief -tls1_2`.
    OpenSsl12,
    /// Python's `ssl`, then `GET /`.
    Python,
    /// Headless Chromium, `--dump-dom`.
    Chromium,
}

/// Python's `ssl` module: a handshake with `server_hostname`, then `GET /`.
/// Exit 3 (and `TIMEOUT`) when the handshake times out.
const PYTHON: &str = r#"
import socket, ssl, sys
addr, name = sys.argv[1], sys.argv[2]
c = ssl.create_default_context()
c.check_hostname = False
c.verify_mode = ssl.CERT_NONE
s = socket.create_connection((addr, 443), timeout=5)
try:
    t = c.wrap_socket(s, server_hostname=name)
except TimeoutError as e:
    print("TIMEOUT", e)
    sys.exit(3)
print("HANDSHAKE", t.version(), t.cipher()[0], flush=True)
t.sendall(b"GET / HTTP/1.0\r\n\r\n")
page = b""
try:
    while chunk := t.recv(65536):
        page += chunk
except (ssl.SSLError, OSError):
    pass
sys.stdout.write(page.decode("latin-1"))
"#;

/// One client run: `client` connects to `server`:443 with server name `name`.
#[derive(Clone, Debug)]
struct Attempt {
    client: Client,
    name: String,
    server: IpAddr,
    /// The client's port (curl `--local-port`), if not the kernel's pick.
    local_port: Option<u16>,
}

fn attempt(client: Client, name: &str, server: impl Into<IpAddr>) -> Attempt {
    Attempt { client, name: name.to_string(), server: server.into(), local_port: None }
}

impl Attempt {
    fn af(&self) -> &'static str {
        if self.server.is_ipv4() { "ipv4" } else { "ipv6" }
    }

    /// The server address as URLs and `host:port` take it.
    fn host(&self) -> String {
        match self.server {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        }
    }

    /// How long the run may take before it is killed (the clients' own
    /// timeouts are shorter).
    fn limit(&self) -> Duration {
        Duration::from_secs(if self.client == Client::Chromium { 35 } else { 12 })
    }

    fn command(&self, topo: &Topology, n: u32) -> Command {
        let c = topo.client();
        let (name, host) = (self.name.as_str(), self.host());
        match self.client {
            Client::Curl => {
                let mut cmd = topo.exec(c, "curl");
                cmd.args(["-sk", "--max-time", "5", "--resolve", &format!("{name}:443:{host}")]);
                if self.server.is_ipv6() {
                    cmd.arg("-6");
                }
                if let Some(port) = self.local_port {
                    cmd.args(["--local-port", &port.to_string()]);
                }
                cmd.arg(format!("https://{name}/"));
                cmd
            }
            Client::OpenSsl | Client::OpenSsl12 => {
                let mut cmd = topo.exec(c, "timeout");
                cmd.args(["5", "openssl", "s_client", "-connect", &format!("{host}:443"), "-servername", name, "-brief"]);
                if self.client == Client::OpenSsl12 {
                    cmd.arg("-tls1_2");
                }
                cmd
            }
            Client::Python => {
                let mut cmd = topo.exec(c, "timeout");
                cmd.args(["10", "python3", "-c", PYTHON, &self.server.to_string(), name]);
                cmd
            }
            Client::Chromium => blokir_tests::web::chromium(topo, name, self.server, &topo.dir().join(format!("chromium-{n}"))),
        }
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {} -> {}:443 ({})", self.client, self.name, self.host(), self.af())?;
        match self.local_port {
            Some(p) => write!(f, " from port {p}"),
            None => Ok(()),
        }
    }
}

/// What a client run did.
struct Outcome {
    attempt: Attempt,
    out: Captured,
}

impl Outcome {
    fn all(&self) -> String {
        format!("{}\n{}", self.out.stdout, self.out.stderr)
    }

    /// The client got what an unblocked run gets: the page, or (s_client) a
    /// finished handshake of the expected version.
    fn served(&self) -> bool {
        let ok = self.out.success();
        match self.attempt.client {
            Client::Curl | Client::Chromium => ok && self.out.stdout.contains(PAGE),
            Client::OpenSsl => ok && self.all().contains("CONNECTION ESTABLISHED") && self.all().contains("Protocol version: TLSv1.3"),
            Client::OpenSsl12 => ok && self.all().contains("CONNECTION ESTABLISHED") && self.all().contains("Protocol version: TLSv1.2"),
            Client::Python => ok && self.out.stdout.contains("HANDSHAKE TLSv1.3") && self.out.stdout.contains(PAGE),
        }
    }

    /// The run failed the way a stalled handshake makes it fail: a timeout,
    /// and no sign of a finished handshake.
    fn stalled(&self) -> bool {
        let all = self.all();
        let no_handshake = !all.contains(PAGE)
            && !all.contains("CONNECTION ESTABLISHED")
            && !all.contains("Cipher")
            && !all.contains("Verification")
            && !all.contains("HANDSHAKE");
        no_handshake
            && match self.attempt.client {
                // 28: timeout; 35/56: the handshake or the read failed.
                Client::Curl => matches!(self.out.code(), Some(28 | 35 | 56)),
                // Killed by `timeout 5`.
                Client::OpenSsl | Client::OpenSsl12 => self.out.code() == Some(124),
                Client::Python => self.out.code() == Some(3) && self.out.stdout.starts_with("TIMEOUT"),
                Client::Chromium => self.out.stderr.contains("Page load timed out") || self.out.stderr.contains("Page load failed"),
            }
    }

    fn summary(&self) -> String {
        let what = if self.served() {
            "served"
        } else if self.stalled() {
            "stalled"
        } else {
            "FAILED ODDLY"
        };
        format!("{}: {what} (exit {:?} after {:.1?})", self.attempt, self.out.code(), self.out.elapsed)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Chromium's stderr is mostly D-Bus noise.
        let stderr: Vec<&str> = self.out.stderr.lines().filter(|l| !l.contains("dbus")).collect();
        write!(f, "{}\n`{}`\n--- stdout\n{}\n--- stderr\n{}", self.summary(), self.out.command, self.out.stdout.trim_end(), stderr.join("\n"))
    }
}

// ---------------------------------------------------------------------------
// Packet captures

/// tcpdump writing port-443 traffic on one interface to a pcap file.
struct Capture {
    child: Option<Child>,
    path: PathBuf,
    log: PathBuf,
}

impl Capture {
    fn start(topo: &Topology, ns: &str, iface: &str, path: PathBuf) -> Self {
        let log = path.with_extension("log");
        let err = File::create(&log).unwrap();
        // `--immediate-mode`: packets are written as they come, not when a
        // ring-buffer block fills (else a stop can lose the last second).
        let child = topo
            .exec(ns, "tcpdump")
            .args(["-i", iface, "-n", "-s", "0", "-U", "--immediate-mode", "-B", "16384", "-Z", "root", "-w"])
            .arg(&path)
            .arg("tcp port 443")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("starting tcpdump");
        let mut c = Capture { child: Some(child), path, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c.log_text().contains("listening on") {
            if let Some(status) = c.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tcpdump on {iface} in {ns} exited with {status}:\n{}", c.log_text());
            }
            assert!(Instant::now() < deadline, "tcpdump on {iface} in {ns} is not capturing after 10 s:\n{}", c.log_text());
            thread::sleep(Duration::from_millis(10));
        }
        c
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops tcpdump (SIGINT: it writes what it has and exits) and checks
    /// that the kernel dropped nothing.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        send_signal(child.id(), "INT").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tcpdump did not stop within 5 s of SIGINT:\n{}", self.log_text());
            }
            thread::sleep(Duration::from_millis(10));
        }
        let log = self.log_text();
        assert!(log.lines().any(|l| l.trim() == "0 packets dropped by kernel"), "tcpdump lost packets: {}\n{log}", self.path.display());
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One TCP connection to port 443 as a capture saw it.
#[derive(Default)]
struct Flow {
    /// The client's initial sequence number (from its SYN).
    isn: Option<u32>,
    /// The MSS the server announced in its SYN-ACK.
    server_mss: Option<u16>,
    /// Client payload segments in capture order: sequence number, bytes.
    segments: Vec<(u32, Vec<u8>)>,
    /// Payload bytes the server sent.
    from_server: usize,
}

/// (client, server) socket addresses.
type FlowKey = (SocketAddr, SocketAddr);

/// The flows of a capture. `live`: tcpdump is still writing it, so the
/// last packet may be cut short.
fn read_flows(path: &Path, live: bool) -> BTreeMap<FlowKey, Flow> {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = pcap_file::pcap::PcapReader::new(file).unwrap();
    let mut flows = BTreeMap::<FlowKey, Flow>::new();
    while let Some(p) = reader.next_packet() {
        let p = match p {
            Ok(p) => p,
            Err(_) if live => break,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        let Ok(s) = SlicedPacket::from_ethernet(&p.data) else { continue };
        let (src, dst): (IpAddr, IpAddr) = match &s.net {
            Some(NetSlice::Ipv4(ip)) => (ip.header().source_addr().into(), ip.header().destination_addr().into()),
            Some(NetSlice::Ipv6(ip)) => (ip.header().source_addr().into(), ip.header().destination_addr().into()),
            _ => continue,
        };
        let Some(TransportSlice::Tcp(t)) = &s.transport else { continue };
        if t.destination_port() == 443 {
            let f = flows.entry((SocketAddr::new(src, t.source_port()), SocketAddr::new(dst, 443))).or_default();
            if t.syn() && !t.ack() {
                f.isn = Some(t.sequence_number());
            }
            if !t.payload().is_empty() {
                f.segments.push((t.sequence_number(), t.payload().to_vec()));
            }
        } else if t.source_port() == 443 {
            let f = flows.entry((SocketAddr::new(dst, t.destination_port()), SocketAddr::new(src, 443))).or_default();
            if t.syn() && t.ack() {
                f.server_mss = t.options_iterator().find_map(|o| match o {
                    Ok(TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
                    _ => None,
                });
            }
            f.from_server += t.payload().len();
        }
    }
    flows
}

/// The client's byte stream of a flow.
struct Stream {
    /// The bytes from the first one on, up to the first gap.
    bytes: Vec<u8>,
    /// The distinct segments (stream offsets), in order.
    segments: Vec<Range<usize>>,
}

impl Flow {
    fn stream(&self) -> Stream {
        let Some(isn) = self.isn else { return Stream { bytes: vec![], segments: vec![] } };
        let mut segs: Vec<(usize, &[u8])> = self.segments.iter().map(|(seq, d)| (seq.wrapping_sub(isn.wrapping_add(1)) as usize, d.as_slice())).collect();
        segs.sort_by_key(|(at, d)| (*at, d.len()));
        segs.dedup_by_key(|(at, d)| (*at, d.len()));
        let mut bytes = Vec::new();
        for (at, d) in &segs {
            if *at > bytes.len() {
                break;
            }
            if at + d.len() > bytes.len() {
                bytes.extend_from_slice(&d[bytes.len() - at..]);
            }
        }
        Stream { bytes, segments: segs.iter().map(|(at, d)| *at..at + d.len()).collect() }
    }
}

/// A ClientHello at the start of a stream, read as far as its server name.
struct HelloInfo {
    /// Its record's length, header included.
    len: usize,
    /// All of the record is in the stream. A client whose hello was blocked
    /// early may never send the rest: its window stalls once the edge drops
    /// a segment.
    complete: bool,
    sni: Option<String>,
    /// Where the name's bytes are in the stream.
    name_at: Option<Range<usize>>,
    /// Where an encrypted_client_hello extension (Chromium sends GREASE
    /// ones, anywhere in the list) starts in the stream.
    ech_at: Option<usize>,
}

/// Reads the ClientHello the stream starts with (one record, as every
/// client here sends it) up to the end of its server name; `None` if the
/// stream stops before that or is not a hello. A whole hello is read by
/// tls-parser too, and the two must agree.
fn hello(stream: &[u8]) -> Option<HelloInfo> {
    let u8_at = |i: usize| stream.get(i).copied().map(usize::from);
    let u16_at = |i: usize| Some(u8_at(i)? << 8 | u8_at(i + 1)?);
    if u8_at(0)? != 22 || u8_at(5)? != 1 {
        return None;
    }
    let len = 5 + u16_at(3)?;
    let complete = stream.len() >= len;
    // Handshake header (4), version (2), random (32), then the
    // variable-length session id, cipher suites and compression methods.
    let mut p = 5 + 4 + 2 + 32;
    p += 1 + u8_at(p)?;
    p += 2 + u16_at(p)?;
    p += 1 + u8_at(p)?;
    let exts_end = (p + 2 + u16_at(p)?).min(len);
    p += 2;
    let (mut sni, mut name_at, mut ech_at) = (None, None, None);
    // Past the stream's end (a hello the edge stalled), the walk stops.
    while p + 4 <= exts_end && p + 4 <= stream.len() {
        let (kind, ext_len) = (u16_at(p)?, u16_at(p + 2)?);
        if kind == 0xfe0d && ech_at.is_none() {
            ech_at = Some(p);
        }
        if kind == 0 && sni.is_none() {
            // server_name_list length (2), name type (1), name length (2).
            let n = u16_at(p + 7)?;
            let at = p + 9..p + 9 + n;
            sni = Some(String::from_utf8_lossy(stream.get(at.clone())?).into_owned());
            name_at = Some(at);
        }
        p += 4 + ext_len;
    }
    if sni.is_none() && !complete {
        return None;
    }
    if complete {
        // tls-parser's reading of the same hello.
        let (_, plain) = parse_tls_plaintext(&stream[..len]).expect("tls-parser reads the hello");
        let Some(TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch))) = plain.msg.first() else { panic!("tls-parser: not a ClientHello") };
        let (_, exts) = parse_tls_client_hello_extensions(ch.ext.unwrap_or_default()).expect("tls-parser reads the extensions");
        let theirs = exts.iter().find_map(|e| match e {
            TlsExtension::SNI(names) => names.first().map(|(_, n)| String::from_utf8_lossy(n).into_owned()),
            _ => None,
        });
        assert_eq!(theirs, sni, "tls-parser reads another server name");
    }
    Some(HelloInfo { len, complete, sni, name_at, ech_at })
}

// ---------------------------------------------------------------------------
// The bench

/// A topology with blokir on the edge, s_server on `servers` addresses per
/// family in the resolver namespace, and both ends captured. Fields drop in
/// order: captures and servers first, the namespaces last.
struct Bench {
    captures: Vec<Capture>,
    /// The s_server processes, killed on drop.
    _servers: Vec<Running>,
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
    tiny: bool,
    /// Runs started so far (Chromium profiles are numbered by it).
    runs: Cell<u32>,
    /// Every run so far: what it should have got, and what it got.
    log: std::cell::RefCell<Vec<String>>,
    daemon: Daemon,
    topo: Topology,
}

/// The client and server sides of every flow, and /metrics, once a bench
/// has finished.
struct Wire {
    client: BTreeMap<FlowKey, Flow>,
    server: BTreeMap<FlowKey, Flow>,
    metrics: Metrics,
}

impl Bench {
    fn new(servers: u8, tiny: bool) -> Self {
        Self::with_options(servers, tiny, &[])
    }

    /// `new`, the daemon run with more `blokir run` options.
    fn with_options(servers: u8, tiny: bool, options: &[&str]) -> Self {
        let started = Instant::now();
        let topo = Topology::new().unwrap();
        let r = topo.resolver().to_string();
        if tiny {
            // The resolver announces a 64-byte MSS to the client in its
            // SYN-ACKs, so the client cuts what it sends (the hello) into
            // 52-byte segments (64 less the timestamp option). A route MSS
            // on the client's side would not do: it sets what the client
            // announces, not what it sends.
            let mss = TINY_MSS.to_string();
            topo.run_in(&r, &["ip", "route", "change", "default", "via", &EDGE_RESOLVER4.to_string(), "advmss", &mss], Duration::from_secs(10))
                .unwrap()
                .ok()
                .unwrap();
            topo.run_in(&r, &["ip", "-6", "route", "change", "default", "via", &EDGE_RESOLVER6.to_string(), "advmss", &mss], Duration::from_secs(10))
                .unwrap()
                .ok()
                .unwrap();
        }
        let rules = topo.dir().join("tls.rules");
        std::fs::write(&rules, RULES).unwrap();
        let daemon = topo.start_daemon_with(&[rules], options).expect("starting blokir in the edge namespace");
        assert!(topo.xdp_attached().unwrap(), "blokir reported ready but no XDP program is on the edge's interface");

        // A self-signed certificate, and s_server on every address.
        let (cert, key) = blokir_tests::web::self_signed(topo.dir()).unwrap();
        let v4: Vec<Ipv4Addr> = (0..servers).map(|i| Ipv4Addr::new(198, 18, 1, 10 + i)).collect();
        let v6: Vec<Ipv6Addr> = (0..servers).map(|i| Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10 + u16::from(i))).collect();
        let mut procs = Vec::new();
        let mut want = Vec::new();
        for a in v4.iter().map(|a| IpAddr::from(*a)).chain(v6.iter().map(|a| IpAddr::from(*a))) {
            let (prefix, accept) = match a {
                IpAddr::V4(a) => (format!("{a}/24"), format!("{a}:443")),
                IpAddr::V6(a) => (format!("{a}/64"), format!("[{a}]:443")),
            };
            let mut add = vec!["ip", "addr", "add", &prefix, "dev", RESOLVER_IFACE];
            if a.is_ipv6() {
                add.push("nodad");
            }
            topo.run_in(&r, &add, Duration::from_secs(10)).unwrap().ok().unwrap();
            let mut cmd = topo.exec(&r, "openssl");
            cmd.args(["s_server", "-accept", &accept, "-www", "-quiet", "-cert"]).arg(&cert).arg("-key").arg(&key);
            procs.push(start(&mut cmd).unwrap());
            want.push(accept);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = topo.run_in(&r, &["ss", "-H", "-n", "-l", "-t"], Duration::from_secs(5)).unwrap().ok().unwrap().stdout;
            let listening: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().nth(3)).collect();
            if want.iter().all(|w| listening.contains(&w.as_str())) {
                break;
            }
            assert!(Instant::now() < deadline, "s_server is not listening on all of {want:?} after 10 s:\n{out}");
            thread::sleep(Duration::from_millis(20));
        }
        let captures = vec![
            Capture::start(&topo, topo.client(), CLIENT_IFACE, topo.dir().join("client.pcap")),
            Capture::start(&topo, &r, RESOLVER_IFACE, topo.dir().join("resolver.pcap")),
        ];
        eprintln!("bench up in {:.1?} (servers on {} addresses per family{})", started.elapsed(), servers, if tiny { ", server MSS 64" } else { "" });
        Bench { captures, _servers: procs, v4, v6, tiny, runs: Cell::new(0), log: Default::default(), daemon, topo }
    }

    /// Runs `attempts` at once and checks each: a listed name stalls, any
    /// other is served. The blocked ones must each have a server of their
    /// own (see the module documentation); afterwards the stalled
    /// connections are destroyed and every server they used must answer.
    #[track_caller]
    fn expect(&self, attempts: &[Attempt]) -> Vec<Outcome> {
        let blocked: Vec<&Attempt> = attempts.iter().filter(|a| listed(&a.name)).collect();
        let mut used: Vec<IpAddr> = blocked.iter().map(|a| a.server).collect();
        used.sort();
        used.dedup();
        assert_eq!(used.len(), blocked.len(), "two blocked attempts of a batch share a server");
        assert!(blocked.is_empty() || blocked.len() == attempts.len(), "a batch is all blocked or all unlisted (a stalled server would fail the others)");

        let outcomes = self.run(attempts);
        let mut failures = Vec::new();
        for o in &outcomes {
            let want_blocked = listed(&o.attempt.name);
            let good = if want_blocked { o.stalled() } else { o.served() };
            self.log.borrow_mut().push(format!("{} (want {})", o.summary(), if want_blocked { "stalled" } else { "served" }));
            if !good {
                failures.push(format!("expected {}: {o}", if want_blocked { "a stalled handshake (blocked)" } else { "the page (not blocked)" }));
            }
        }
        if !blocked.is_empty() {
            self.reset();
            // The servers of the blocked attempts were free and still answer.
            let probes: Vec<Attempt> = used.iter().map(|s| attempt(Client::Curl, "probe.allowed.example", *s)).collect();
            for p in self.run(&probes) {
                self.log.borrow_mut().push(format!("{} (server probe)", p.summary()));
                if !p.served() {
                    failures.push(format!("the server of a blocked attempt does not answer an unlisted name: {p}"));
                }
            }
        }
        assert!(failures.is_empty(), "{}\n\n{}", failures.join("\n\n"), self.keep_evidence());
        outcomes
    }

    fn run(&self, attempts: &[Attempt]) -> Vec<Outcome> {
        let running: Vec<Running> = attempts
            .iter()
            .map(|a| {
                let n = self.runs.get();
                self.runs.set(n + 1);
                start(&mut a.command(&self.topo, n)).unwrap()
            })
            .collect();
        attempts.iter().zip(running).map(|(a, r)| Outcome { attempt: a.clone(), out: r.finish(a.limit()).unwrap() }).collect()
    }

    /// Destroys every connection to port 443 at both ends: the stalled ones
    /// would hold their s_server, and the client would retransmit.
    fn reset(&self) {
        let (c, r) = (self.topo.client(), self.topo.resolver());
        for (ns, dir) in [(c, "dport"), (r, "sport")] {
            run(self.topo.exec(ns, "ss").args(["-K", "-t", "-n", "state", "connected", dir, "=", ":443"]), Duration::from_secs(10)).unwrap().ok().unwrap();
        }
    }

    /// Stops the captures and reads them; scrapes /metrics.
    fn finish(&mut self) -> Wire {
        // Let the last ACKs and FINs through before stopping.
        thread::sleep(Duration::from_millis(100));
        for c in &mut self.captures {
            c.stop();
        }
        let dir = self.topo.dir();
        Wire {
            client: read_flows(&dir.join("client.pcap"), false),
            server: read_flows(&dir.join("resolver.pcap"), false),
            metrics: self.daemon.metrics().unwrap(),
        }
    }

    /// The daemon's log, and where the captures were kept: they go with the
    /// topology's directory unless `$BLOKIR_KEEP_CAPTURES` names a directory
    /// to copy them to.
    fn keep_evidence(&self) -> String {
        let mut note = format!("the daemon's log:\n{}", self.daemon.log());
        if let Some(keep) = std::env::var_os("BLOKIR_KEEP_CAPTURES") {
            let dir = PathBuf::from(keep).join(self.topo.client().trim_end_matches("-c"));
            let copied = std::fs::create_dir_all(&dir).and_then(|_| {
                for f in ["client.pcap", "resolver.pcap"] {
                    std::fs::copy(self.topo.dir().join(f), dir.join(f))?;
                }
                Ok(())
            });
            note += &match copied {
                Ok(()) => format!("\ncaptures (client side: all the client sent; resolver side: what passed the edge) in {}", dir.display()),
                Err(e) => format!("\ncopying the captures to {}: {e}", dir.display()),
            };
        } else {
            note += "\n(set BLOKIR_KEEP_CAPTURES=DIR to keep the client- and resolver-side captures)";
        }
        note
    }

    /// For the hellos with a listed name the client sent so far: how many
    /// had the name end in their first segment, and how many later.
    fn listed_name_positions(&self) -> (usize, usize) {
        let flows = read_flows(&self.topo.dir().join("client.pcap"), true);
        let mut at = (0, 0);
        for flow in flows.values() {
            let stream = flow.stream();
            if let Some(HelloInfo { sni: Some(sni), name_at: Some(name), .. }) = hello(&stream.bytes)
                && listed(&sni)
            {
                if stream.segments.first().is_some_and(|s| s.contains(&(name.end - 1))) {
                    at.0 += 1;
                } else {
                    at.1 += 1;
                }
            }
        }
        at
    }
}

// ---------------------------------------------------------------------------
// Checking the wire and the counters

/// A client flow with a hello, as the client sent it and the server got it.
struct Handshake {
    key: FlowKey,
    sni: String,
    ech_at: Option<usize>,
    hello_len: usize,
    /// The client sent all of the hello.
    complete: bool,
    /// The client's segments, up to the end of the hello.
    segments: Vec<Range<usize>>,
    name_at: Range<usize>,
    /// Bytes of the client's stream that reached the server (up to a gap).
    server_got: usize,
    from_server: usize,
    server_mss: Option<u16>,
}

impl Handshake {
    fn af(&self) -> &'static str {
        if self.key.0.is_ipv4() { "ipv4" } else { "ipv6" }
    }

    /// Whether the edge counts the hello's ECH extension: the parser meets
    /// it (its 4-byte header) unless the flow was blocked, with the segment
    /// that completed the name, before the segment that holds it.
    fn ech_counted(&self) -> bool {
        let Some(at) = self.ech_at else { return false };
        if !listed(&self.sni) {
            return true;
        }
        self.segments.iter().position(|s| s.contains(&(at + 3))).is_some_and(|i| i <= self.name_segments().1)
    }

    /// Indexes of the segments holding the name's first and last byte.
    fn name_segments(&self) -> (usize, usize) {
        let find = |b: usize| self.segments.iter().position(|s| s.contains(&b)).expect("the name is in a segment");
        (find(self.name_at.start), find(self.name_at.end - 1))
    }

    fn describe(&self) -> String {
        let sizes: Vec<usize> = self.segments.iter().map(|s| s.len()).collect();
        let (first, last) = self.name_segments();
        let sizes = if sizes.len() > 12 { format!("{} segments of at most {} bytes", sizes.len(), sizes.iter().max().unwrap()) } else { format!("{sizes:?}") };
        let at = if first == last { format!("segment {}", first + 1) } else { format!("segments {}-{}", first + 1, last + 1) };
        format!(
            "{} {} {:?}: hello of {} bytes{} in {sizes}, name at {}..{} in {at}; server got {} bytes, sent {}",
            self.af(),
            self.key.0,
            self.sni,
            self.hello_len,
            if self.complete { "" } else { " (not all sent)" },
            self.name_at.start,
            self.name_at.end,
            self.server_got,
            self.from_server
        )
    }
}

/// Checks every hello on the wire against the rules and the counters, and
/// returns them. Panics with everything known on the first disagreement.
#[track_caller]
fn check_wire(bench: &Bench, wire: &Wire) -> Vec<Handshake> {
    let mut handshakes = Vec::new();
    let mut problems = Vec::new();
    for (key, flow) in &wire.client {
        let stream = flow.stream();
        if stream.bytes.is_empty() {
            continue;
        }
        let Some(h) = hello(&stream.bytes) else {
            problems.push(format!("{key:?}: the client's {} bytes do not start with a ClientHello whose server name is all there", stream.bytes.len()));
            continue;
        };
        let (Some(sni), Some(name_at)) = (h.sni, h.name_at) else {
            problems.push(format!("{key:?}: a ClientHello without a server name"));
            continue;
        };
        let server = wire.server.get(key);
        let server_stream = server.map(Flow::stream);
        let segments = stream.segments.iter().filter(|s| s.start < h.len).cloned().collect();
        let hs = Handshake {
            key: *key,
            sni,
            ech_at: h.ech_at,
            hello_len: h.len,
            complete: h.complete,
            segments,
            name_at,
            server_got: server_stream.as_ref().map_or(0, |s| s.bytes.len()),
            from_server: server.map_or(0, |f| f.from_server),
            server_mss: server.and_then(|f| f.server_mss).or(flow.server_mss),
        };
        let got = server_stream.map(|s| s.bytes).unwrap_or_default();
        if listed(&hs.sni) {
            // The segment that completes the name is dropped, and all after
            // it: the server got exactly the bytes before that segment, never
            // the whole name, and answered nothing.
            let (_, last) = hs.name_segments();
            let cut = hs.segments[last].start;
            let name = hs.sni.to_ascii_lowercase();
            if got.to_ascii_lowercase().windows(name.len()).any(|w| w == name.as_bytes()) {
                problems.push(format!("LISTED NAME REACHED THE SERVER: {}", hs.describe()));
            } else if hs.from_server != 0 {
                problems.push(format!("the server answered a listed hello: {}", hs.describe()));
            } else if hs.server_got != cut {
                problems.push(format!(
                    "the server got {} bytes of a listed hello, not the {cut} before the name's last segment: {}",
                    hs.server_got,
                    hs.describe()
                ));
            }
        } else if !hs.complete || hs.server_got < hs.hello_len || hs.from_server == 0 {
            problems.push(format!("AN UNLISTED HELLO DID NOT GET THROUGH: {}", hs.describe()));
        }
        if bench.tiny {
            // Every segment fits the MSS the server announced: the route's
            // 64, raised to the kernel's floor of 88 by newer kernels (CI's
            // and this one's). The smallest hello here, 209 bytes, takes 3.
            let fits = hs.server_mss.is_some_and(|m| (TINY_MSS..=88).contains(&m) && hs.segments.iter().all(|s| s.len() <= usize::from(m)));
            if !fits || hs.segments.len() < 3 {
                problems.push(format!(
                    "expected a hello cut into segments of at most the server's MSS ({TINY_MSS} to 88; announced {:?}): {}",
                    hs.server_mss,
                    hs.describe()
                ));
            }
        }
        handshakes.push(hs);
    }

    // The counters: every hello on the wire was read once; the listed ones
    // were blocked.
    let m = &wire.metrics;
    for af in ["ipv4", "ipv6"] {
        let of_af: Vec<&Handshake> = handshakes.iter().filter(|h| h.af() == af).collect();
        let want = [
            ("blokir_inspected_total", of_af.len()),
            ("blokir_blocked_total", of_af.iter().filter(|h| listed(&h.sni)).count()),
            ("blokir_allow_rule_hits_total", of_af.iter().filter(|h| allowed_by_rule(&h.sni)).count()),
        ];
        for (metric, want) in want {
            let got = m.value(metric, &[("proto", "tls"), ("af", af)]);
            if got != Some(want as u64) {
                problems.push(format!("{metric}{{proto=\"tls\",af=\"{af}\"}} is {got:?}; the wire shows {want}"));
            }
        }
    }
    let events = [("ech", handshakes.iter().filter(|h| h.ech_counted()).count()), ("no_sni", 0), ("out_of_order", 0), ("too_complex", 0)];
    for (event, want) in events {
        let got = m.value("blokir_tls_hellos_total", &[("event", event)]);
        if got != Some(want as u64) {
            problems.push(format!("blokir_tls_hellos_total{{event=\"{event}\"}} is {got:?}; the wire shows {want}"));
        }
    }
    let listed_hellos = handshakes.iter().filter(|h| listed(&h.sni)).count() as u64;
    let list_blocked = m.value("blokir_list_blocked_total", &[("list", "tls")]);
    if list_blocked != Some(listed_hellos) {
        problems.push(format!("blokir_list_blocked_total{{list=\"tls\"}} is {list_blocked:?}; the wire shows {listed_hellos} listed hellos"));
    }

    eprintln!("--- runs");
    for l in bench.log.borrow().iter() {
        eprintln!("{l}");
    }
    eprintln!("--- hellos on the wire (client side; what reached the server)");
    for h in &handshakes {
        eprintln!("{}{}", if listed(&h.sni) { "BLOCKED " } else { "passed  " }, h.describe());
    }
    eprintln!("--- /metrics\n{}", m.text.lines().filter(|l| l.contains("tls")).collect::<Vec<_>>().join("\n"));
    assert!(problems.is_empty(), "{}\n\n{}", problems.join("\n"), bench.keep_evidence());
    handshakes
}

/// Every attempt's name appears in some hello on the wire, as often as it
/// was tried at least.
#[track_caller]
fn assert_every_attempt_on_the_wire(attempts: &[Attempt], handshakes: &[Handshake]) {
    for a in attempts {
        let tried = attempts.iter().filter(|b| b.name == a.name && b.af() == a.af()).count();
        let seen = handshakes.iter().filter(|h| h.sni == a.name && h.af() == a.af()).count();
        assert!(seen >= tried, "{a}: tried {tried} times, {seen} hellos with that name on the wire");
    }
}

// ---------------------------------------------------------------------------
// The tests

#[test]
fn curl_openssl_and_python_stall_on_listed_names_and_get_the_page_otherwise() {
    let started = Instant::now();
    let mut bench = Bench::new(6, false);
    let (v4, v6) = (bench.v4.clone(), bench.v6.clone());
    use Client::*;
    // Unlisted: look-alikes, a name below an exact rule, a name under an
    // allow rule; TLS 1.3 and 1.2. Spread over the servers (they serve one
    // at a time; these are quick).
    let unlisted = [
        attempt(Curl, "allowed.example", v4[0]),
        attempt(Curl, "notblocked.example", v4[1]),
        attempt(Curl, "blocked.example.evil.example", v4[2]),
        attempt(Curl, "x.blocked.test", v4[3]),
        attempt(Curl, "open.blocked.example", v4[4]),
        attempt(OpenSsl, "allowed.example", v4[5]),
        attempt(OpenSsl12, "allowed.example", v4[0]),
        attempt(Python, "allowed.example", v4[1]),
        attempt(Curl, "allowed.example", v6[0]),
        attempt(OpenSsl, "allowed.example", v6[1]),
        attempt(OpenSsl12, "blocked.test.example", v6[2]),
        attempt(Python, "allowed.example", v6[3]),
    ];
    bench.expect(&unlisted);
    // Listed: each on its own server.
    let blocked = [
        attempt(Curl, "portal.blocked.example", v4[0]),
        attempt(Curl, "blocked.example", v4[1]),
        attempt(Curl, "blocked.test", v4[2]),
        attempt(OpenSsl, "BLOCKED.TEST", v4[3]),
        attempt(OpenSsl12, "api.blocked.example", v4[4]),
        attempt(Python, "mac.blocked.example", v4[5]),
        attempt(Curl, "b.portal.blocked.example", v6[0]),
        attempt(OpenSsl, "dl.blocked.example", v6[1]),
        attempt(OpenSsl12, "blocked.test", v6[2]),
        attempt(Python, "www.blocked.example", v6[3]),
        attempt(OpenSsl, "Open.Blocked.Example.Blocked.Example", v6[4]),
    ];
    bench.expect(&blocked);
    let wire = bench.finish();
    let handshakes = check_wire(&bench, &wire);
    assert_every_attempt_on_the_wire(&[&unlisted[..], &blocked[..]].concat(), &handshakes);
    eprintln!("done in {:.1?}", started.elapsed());
}

#[test]
fn chromium_with_a_two_segment_hello_is_blocked_wherever_the_name_sits() {
    let started = Instant::now();
    let mut bench = Bench::new(4, false);
    let (v4, v6) = (bench.v4.clone(), bench.v6.clone());
    let unlisted = [
        attempt(Client::Chromium, "www.allowed.example", v4[0]),
        attempt(Client::Chromium, "www.portal.allowed.example", v4[1]),
        attempt(Client::Chromium, "www.allowed.example", v6[0]),
    ];
    bench.expect(&unlisted);
    let blocked = [
        attempt(Client::Chromium, "www.portal.blocked.example", v4[0]),
        attempt(Client::Chromium, "www.portal.blocked.example", v4[1]),
        attempt(Client::Chromium, "www.portal.blocked.example", v4[2]),
        attempt(Client::Chromium, "portal.blocked.example", v4[3]),
        attempt(Client::Chromium, "www.portal.blocked.example", v6[0]),
        attempt(Client::Chromium, "www.portal.blocked.example", v6[1]),
    ];
    // Chromium shuffles its extensions: the name ends in the first segment
    // or in the second, about half the time each. Both must be blocked, so
    // run the batch again (rarely needed: each run sends two hellos) until
    // both happened.
    let mut rounds = 0;
    while rounds < 4 {
        bench.expect(&blocked);
        rounds += 1;
        let (first, second) = bench.listed_name_positions();
        if first > 0 && second > 0 {
            break;
        }
    }
    let wire = bench.finish();
    let handshakes = check_wire(&bench, &wire);
    assert_every_attempt_on_the_wire(&[&unlisted[..], &blocked[..]].concat(), &handshakes);
    // Chromium's hellos (ML-KEM key share) take two segments here.
    let chromium: Vec<&Handshake> = handshakes.iter().filter(|h| h.sni.contains("portal")).collect();
    for h in &chromium {
        assert!(h.hello_len > 1500 && h.segments.len() == 2, "expected a two-segment hello: {}", h.describe());
    }
    let listed_in = |seg: usize| chromium.iter().filter(|h| listed(&h.sni) && h.name_segments().1 == seg).count();
    let (first, second) = (listed_in(0), listed_in(1));
    eprintln!("Chromium hellos: {}; listed ones with the name ending in the first segment: {first}, in the second: {second} ({rounds} rounds)", chromium.len());
    assert!(first > 0 && second > 0, "after {rounds} rounds, the listed name never ended in one of the two segments ({first}, {second})");
    eprintln!("done in {:.1?}", started.elapsed());
}

#[test]
fn tiny_segments_from_a_small_server_mss_do_not_evade_and_do_not_block() {
    let started = Instant::now();
    let mut bench = Bench::new(4, true);
    let (v4, v6) = (bench.v4.clone(), bench.v6.clone());
    use Client::*;
    // A name longer than a segment's payload (84 bytes > 52, or 76 where the
    // kernel floors the MSS).
    let long_listed = "a-long-name-that-spans-several-tiny-segments.even-at-76-bytes.portal.blocked.example";
    let long_unlisted = "a-long-name-that-spans-several-tiny-segments.even-at-76-bytes.portal.allowed.example";
    let unlisted = [
        attempt(Curl, "allowed.example", v4[0]),
        attempt(Curl, long_unlisted, v4[1]),
        attempt(OpenSsl, "allowed.example", v4[2]),
        attempt(Python, "allowed.example", v4[3]),
        attempt(Curl, "allowed.example", v6[0]),
        attempt(OpenSsl12, "allowed.example", v6[1]),
        attempt(Chromium, "www.allowed.example", v6[2]),
    ];
    bench.expect(&unlisted);
    let blocked = [
        attempt(Curl, long_listed, v4[0]),
        attempt(Curl, "portal.blocked.example", v4[1]),
        attempt(OpenSsl, "BLOCKED.TEST", v4[2]),
        attempt(Chromium, "www.portal.blocked.example", v4[3]),
        attempt(Curl, long_listed, v6[0]),
        attempt(OpenSsl12, "api.blocked.example", v6[1]),
        attempt(Python, "mac.blocked.example", v6[2]),
        attempt(Chromium, "www.portal.blocked.example", v6[3]),
    ];
    bench.expect(&blocked);
    let wire = bench.finish();
    let handshakes = check_wire(&bench, &wire);
    assert_every_attempt_on_the_wire(&[&unlisted[..], &blocked[..]].concat(), &handshakes);
    for h in handshakes.iter().filter(|h| h.sni.starts_with("a-long-name")) {
        let (first, last) = h.name_segments();
        assert!(last > first, "the long name should span segments: {}", h.describe());
    }
    eprintln!("done in {:.1?}", started.elapsed());
}

#[test]
fn a_blocked_connections_server_end_is_closed_and_its_port_can_be_reused() {
    // `drop`: the segment that completes the name goes on as a RST that
    // closes the server's end at once (single-threaded s_server, stuck
    // reading the hello otherwise, is free again). `reset`: the client is
    // answered, and the server's end stays open until a new connection
    // comes from the same port (a client reusing it, or a NAT in front of
    // many): its SYN goes on as that RST (a forged SYN cannot release the
    // blocked flow: it closes the connection it would resume), and the
    // client's retransmitted SYN connects and is read afresh.
    let started = Instant::now();
    let from = |mut a: Attempt, port: u16| {
        a.local_port = Some(port);
        a
    };
    // (`reset` in generic mode: on veth, XDP_TX in native mode reaches the
    // peer only if it has an XDP program too.)
    for (action, options) in [("drop", &[][..]), ("reset", &["--mode", "generic", "--tcp-action", "reset"][..])] {
        let mut bench = Bench::with_options(1, false, options);
        let (v4, v6) = (bench.v4[0], bench.v6[0]);
        let (c, r) = (bench.topo.client().to_string(), bench.topo.resolver().to_string());
        let server_ends = |bench: &Bench, port: u16| {
            let filter = ["(", "sport", "=", ":443", "and", "dport", "=", &format!(":{port}"), ")"];
            let out = run(bench.topo.exec(&r, "ss").args(["-H", "-t", "-n", "state", "established"]).args(filter), Duration::from_secs(10));
            out.unwrap().ok().unwrap().stdout.lines().filter(|l| !l.trim().is_empty()).count()
        };
        // A port per family: the first family's last connection leaves its
        // port in TIME_WAIT.
        for (server, port) in [(IpAddr::from(v4), 40443), (IpAddr::from(v6), 40444)] {
            let blocked = bench.run(&[from(attempt(Client::Curl, "portal.blocked.example", server), port)]);
            let o = &blocked[0];
            match action {
                "drop" => assert!(o.stalled() && o.out.code() == Some(28), "{action}: {o}"),
                // Reset at once: the handshake or the read failed.
                _ => assert!(matches!(o.out.code(), Some(35 | 56)) && o.out.elapsed < Duration::from_millis(1500), "{action}: {o}"),
            }
            let want = usize::from(action == "reset");
            assert_eq!(server_ends(&bench, port), want, "{action}: the blocked connection's server end (open only with reset)");
            // The client's end goes away without a word, as when a NAT
            // forgets the mapping: destroyed with its RST held back.
            let hold_rsts = |verb: &str| {
                for tables in ["iptables", "ip6tables"] {
                    let rule = [verb, "OUTPUT", "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "DROP"];
                    run(bench.topo.exec(&c, tables).args(rule), Duration::from_secs(10)).unwrap().ok().unwrap();
                }
            };
            hold_rsts("-I");
            run(bench.topo.exec(&c, "ss").args(["-K", "-t", "-n", "state", "connected", "dport", "=", ":443"]), Duration::from_secs(10)).unwrap().ok().unwrap();
            hold_rsts("-D");
            assert_eq!(server_ends(&bench, port), want, "{action}: the client's end went without a word");
            let fine = bench.run(&[from(attempt(Client::Curl, "allowed.example", server), port)]);
            assert!(fine[0].served(), "{action}: the new connection from port {port}: {}\n{}", fine[0], bench.keep_evidence());
            assert_eq!(server_ends(&bench, port), 0, "{action}: the blocked connection's server end is closed");
        }
        let wire = bench.finish();
        for af in ["ipv4", "ipv6"] {
            // The blocked hello, the unlisted hello.
            assert_eq!(wire.metrics.value("blokir_inspected_total", &[("proto", "tls"), ("af", af)]), Some(2), "{action}: {}", wire.metrics.text);
            assert_eq!(wire.metrics.value("blokir_blocked_total", &[("proto", "tls"), ("af", af)]), Some(1), "{action}: {}", wire.metrics.text);
        }
        // One RST to the server per blocked connection: at the block
        // (drop), or made of the new connection's SYN (reset).
        assert_eq!(wire.metrics.value("blokir_tcp_events_total", &[("event", "server_reset")]), Some(2), "{action}: {}", wire.metrics.text);
        assert_eq!(wire.metrics.value("blokir_tcp_resets_total", &[]), Some(if action == "reset" { 2 } else { 0 }), "{action}: {}", wire.metrics.text);
    }
    eprintln!("done in {:.1?}", started.elapsed());
}

#[test]
fn with_tls_ports_listed_a_hello_to_another_port_is_not_read() {
    // `--tls-ports 8443`: the servers listen on 443, which is then neither a
    // TLS nor an HTTP port: a listed name's hello reaches its server whole
    // and the page is served; /metrics shows no TLS inspection at all.
    // (With the default, every port, the same names stall: the tests above.)
    let mut bench = Bench::with_options(1, false, &["--tls-ports", "8443"]);
    let (v4, v6) = (bench.v4[0], bench.v6[0]);
    let attempts = [attempt(Client::Curl, "portal.blocked.example", v4), attempt(Client::Curl, "blocked.test", v6)];
    let outcomes = bench.run(&attempts);
    for o in &outcomes {
        assert!(listed(&o.attempt.name) && o.served(), "a listed name on a port that is not read must be served: {o}\n{}", bench.keep_evidence());
    }
    let wire = bench.finish();
    // Each hello reached its server with its name.
    let mut names: Vec<String> = wire.server.values().filter_map(|f| hello(&f.stream().bytes)?.sni).collect();
    names.sort();
    assert_eq!(names, ["blocked.test", "portal.blocked.example"], "the hellos the servers got");
    let m = &wire.metrics;
    for af in ["ipv4", "ipv6"] {
        for counter in ["blokir_inspected_total", "blokir_blocked_total"] {
            assert_eq!(m.value(counter, &[("proto", "tls"), ("af", af)]).unwrap_or(0), 0, "{counter} {af}: {}", m.text);
        }
    }
    let moved: Vec<&str> =
        ["blokir_tls_hellos_total", "blokir_tcp_events_total", "blokir_flows{"].iter().flat_map(|p| m.lines_of(p)).filter(|l| !l.ends_with(" 0")).collect();
    assert!(moved.is_empty(), "no TLS or TCP event counted, no flow tracked: {moved:?}");
    // Each connection's SYN, ACK, hello, ACKs, request and FIN went through
    // the program (it saw them; it did not read them).
    assert!(m.value("blokir_packets_total", &[]).unwrap_or(0) >= 10, "the program saw the traffic: {}", m.text);
}
