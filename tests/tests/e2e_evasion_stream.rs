//! End to end, evasions of the TCP stream stages (issue #13): ClientHellos
//! (Python's ssl, real) and HTTP requests sent from raw sockets in the
//! client namespace over a real TCP connection, as zapret and ByeDPI send
//! them (`seqovl`, urgent bytes `--oob`/`--disoob`, `fakedsplit` with fakes
//! fooled by no ACK, a TCP MD5 option, a bad checksum, a TTL of 1, a wrong
//! ACK number or a sequence number 10,000 bytes behind), a fake SYN (TTL 1,
//! another ISN) in the middle of the hello or request or before it, two
//! Host headers, and the segment as two IP fragments in either order, IPv4
//! and IPv6,
//! through `blokir
//! run` at the edge to a Python TLS and HTTP server (tests/
//! e2e_evasion_server.py), judged at the server: the names it was asked
//! for and answers. Without blokir every name reaches it (the harness
//! check: the packets are good and the server discards the fakes and the
//! urgent bytes); under blokir a listed name never does, an unlisted one
//! sent plainly, with `seqovl` or behind badseq fakes always does, and
//! fragmented ones never do (`--fragments drop`), and tampered flows are
//! blocked whatever their name (`--on-tamper block`, the default) or pass
//! with the real bytes read (`--on-tamper pass`: fakes are not read), but
//! for fakes fooled by checksum, TTL or ACK, which are read, and told only
//! by the real copy's different name bytes: under `pass` those are counted
//! and the name read first stands.
//!
//! Run as root, serially:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test e2e_evasion_stream -- --test-threads=1`.

use std::{
    fs::File,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use blokir_tests::netns::{CLIENT4, CLIENT6, RESOLVER4, RESOLVER6, Topology};

const HOWS: [&str; 15] = [
    "plain",
    "seqovl",
    "fakesyn-mid",
    "fakesyn-early",
    "oob",
    "disoob",
    "fakedsplit-noack",
    "fakedsplit-md5",
    "fakedsplit-badsum",
    "fakedsplit-ttl",
    "fakedsplit-badack",
    "fakedsplit-badseq",
    "hosts2",
    "frag-in_order",
    "frag-reversed",
];

/// Datagrams a receiver reassembles and blokir cannot read: refused under
/// `--fragments drop` (the default), listed name or not.
fn fragmented(c: &Case) -> bool {
    c.how.starts_with("frag-")
}

/// Fakes fooled by what the segment does not show: told by the rewrite of
/// the name bytes read.
fn blind(c: &Case) -> bool {
    matches!(c.how, "fakedsplit-badsum" | "fakedsplit-ttl" | "fakedsplit-badack")
}

struct Case {
    name: String,
    fake: String,
    v6: bool,
    tls: bool,
    how: &'static str,
    sport: u16,
}

/// Every strategy, TLS and HTTP, both families, for `listed` and unlisted
/// names, each with a name of its own (`N-tag.blocked.example` or
/// `N-tag.allowed.example`, the same length: the fake names the other).
fn cases(tag: &str, base: u16) -> Vec<Case> {
    let mut v = Vec::new();
    for how in HOWS {
        // Two Host headers are HTTP's.
        for tls in [true, false].into_iter().filter(|tls| !(how == "hosts2" && *tls)) {
            for v6 in [false, true] {
                for listed in [true, false] {
                    let n = v.len();
                    let (name, fake) = (format!("c{n}-{tag}.blocked.example"), format!("c{n}-{tag}.allowed.example"));
                    let (name, fake) = if listed { (name, fake) } else { (fake, name) };
                    v.push(Case { name, fake, v6, tls, how, sport: base + n as u16 });
                }
            }
        }
    }
    v
}

struct Server {
    child: Child,
    log: std::path::PathBuf,
}

impl Server {
    fn start(topo: &Topology) -> Self {
        let dir = topo.dir();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=e2e.example", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let log = dir.join("evasion-server.log");
        let file = File::create(&log).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e_evasion_server.py");
        let mut cmd = topo.exec(topo.resolver(), "python3");
        cmd.args(["-u", script, &RESOLVER4.to_string(), &RESOLVER6.to_string()]).arg(&cert).arg(&key);
        let child = cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap();
        let s = Server { child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.text().contains("ready") {
            assert!(Instant::now() < deadline, "the server did not start: {}", s.text());
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the server was asked for `case`'s name.
    fn reached(&self, case: &Case) -> bool {
        let want = format!("{} {}", if case.tls { "tls" } else { "http" }, case.name);
        self.text().lines().any(|l| l == want)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send(topo: &Topology, cases: &[Case]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e_evasion_client.py");
    let json = serde_json::to_string(
        &cases
            .iter()
            .map(|c| serde_json::json!({"name": c.name, "fake": c.fake, "v6": c.v6, "tls": c.tls, "how": c.how, "sport": c.sport}))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let args = [CLIENT4.to_string(), RESOLVER4.to_string(), CLIENT6.to_string(), RESOLVER6.to_string(), json];
    let out = topo.run_in(topo.client(), &[&["python3", script], &args.each_ref().map(String::as_str)[..]].concat(), Duration::from_secs(120)).unwrap();
    assert!(out.success() && out.stdout.contains("done"), "the client failed: {out:?}");
    // The server logs asynchronously.
    std::thread::sleep(Duration::from_millis(500));
}

fn listed(c: &Case) -> bool {
    c.name.ends_with(".blocked.example")
}

/// Flows whose tampering blokir sees (`--on-tamper` decides them). A fake
/// with a sequence number outside the window (`badseq`) is not seen: it is
/// never read, and the real bytes decide; a SYN with another ISN before the
/// data is dropped (counted), and the real bytes decide.
fn tampered(c: &Case) -> bool {
    !matches!(c.how, "plain" | "seqovl" | "fakedsplit-badseq" | "fakesyn-early") && !fragmented(c)
}

#[test]
fn evasions_of_the_stream_stages_never_get_a_listed_name_served() {
    let topo = Topology::new().unwrap();
    let server = Server::start(&topo);
    let rules = topo.dir().join("evasion.rules");
    std::fs::write(&rules, ".blocked.example\n").unwrap();

    // Harness check: without blokir every name reaches the server, whatever
    // the strategy (the server trims, takes the urgent byte out and
    // discards the fakes).
    let plain = cases("none", 20000);
    send(&topo, &plain);
    let missed: Vec<_> = plain.iter().filter(|c| !server.reached(c)).map(|c| format!("{} {} v6={}", c.how, c.name, c.v6)).collect();
    assert!(missed.is_empty(), "without blokir these did not reach the server: {missed:#?}\n{}", server.text());

    // `--on-tamper block` (the default).
    let daemon = topo.start_daemon(std::slice::from_ref(&rules)).unwrap();
    let block = cases("block", 22000);
    send(&topo, &block);
    for c in &block {
        // A second Host header blocks whatever either names.
        let want = !listed(c) && !tampered(c) && !fragmented(c);
        assert_eq!(server.reached(c), want, "{} {} tls={} v6={}\n{}\n{}", c.how, c.name, c.tls, c.v6, server.text(), daemon.log());
    }
    let m = daemon.metrics().unwrap();
    // oob and disoob, each TLS/HTTP x v4/v6 x two names.
    assert_eq!(m.value("blokir_evasions_total", &[("kind", "urgent")]), Some(16), "{}", m.lines_of("blokir_").join("\n"));
    // Each fakedsplit flow is caught at its first fake, or (checksum, TTL,
    // ACK) at the real copy of the fake's bytes.
    assert_eq!(m.value("blokir_evasions_total", &[("kind", "fake")]), Some(16), "{}", m.lines_of("blokir_").join("\n"));
    assert_eq!(m.value("blokir_evasions_total", &[("kind", "rewrite")]), Some(24), "{}", m.lines_of("blokir_").join("\n"));
    assert_eq!(m.value("blokir_tcp_events_total", &[("event", "early_segment")]), Some(0), "seqovl stalls nothing");
    // Each first fragment (TLS/HTTP x v4/v6 x two names x two orders), and
    // each request with two Host headers (v4/v6 x two names).
    assert_eq!(m.value("blokir_evasions_total", &[("kind", "fragment")]), Some(16), "{}", m.lines_of("blokir_").join("\n"));
    assert_eq!(m.value("blokir_evasions_total", &[("kind", "host_repeat")]), Some(4), "{}", m.lines_of("blokir_").join("\n"));
    // Each fake SYN (TLS/HTTP x v4/v6 x two names x mid-read or early).
    assert_eq!(m.value("blokir_evasions_total", &[("kind", "syn")]), Some(16), "{}", m.lines_of("blokir_").join("\n"));
    daemon.stop().unwrap();

    // `--on-tamper pass`: the fakes pass unread and the real bytes decide;
    // a flow with urgent bytes is no longer read.
    let daemon = topo.start_daemon_with(&[rules], &["--on-tamper", "pass"]).unwrap();
    let pass = cases("pass", 24000);
    send(&topo, &pass);
    for c in &pass {
        let want = match c.how {
            // No longer read once tampered with.
            "oob" | "disoob" | "fakesyn-mid" => true,
            "hosts2" => false,
            _ if fragmented(c) => false,
            // Counted only: the fake's name, read first, decides (it names
            // the other host).
            _ if blind(c) => listed(c),
            _ => !listed(c),
        };
        assert_eq!(server.reached(c), want, "pass: {} {} tls={} v6={}\n{}\n{}", c.how, c.name, c.tls, c.v6, server.text(), daemon.log());
    }
    let m = daemon.metrics().unwrap();
    assert_eq!(m.value("blokir_evasions_total", &[("kind", "rewrite")]), Some(24), "{}", m.lines_of("blokir_").join("\n"));
    daemon.stop().unwrap();
}
