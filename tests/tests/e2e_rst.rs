//! End to end, the TCP `reset` action: real `curl` in the client namespace,
//! through the edge where `blokir run --tcp-action reset` runs (generic XDP:
//! its XDP_TX takes the device's transmit path, see e2e_answers), to real
//! `openssl s_server -www` (TLS) and Python `http.server` (HTTP) in the
//! resolver namespace. A listed name fails at once with a connection reset
//! (curl exit 35 or 56, "Connection reset by peer"); an unlisted name is
//! served; a list whose TCP action is `drop` still stalls until curl's
//! timeout. /metrics counts every RST. The servers get no RST: their side
//! of a reset connection stays open.
//!
//! Run as root, serially:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test e2e_rst -- --test-threads=1`.

use std::{
    net::IpAddr,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use blokir_tests::netns::{Captured, RESOLVER4, RESOLVER6, Topology, run, start};

/// A line of the s_server `-www` status page.
const PAGE: &str = "Ciphers supported in s_server binary";

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// curl to `scheme://name/` at `server`, with its time.
fn curl(topo: &Topology, scheme: &str, name: &str, server: IpAddr, max_time: u32) -> (Captured, Duration) {
    let port = if scheme == "https" { 443 } else { 80 };
    let addr = match server {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let mut cmd = topo.exec(topo.client(), "curl");
    cmd.args(["-sSk", "--max-time", &max_time.to_string(), "--resolve", &format!("{name}:{port}:{addr}"), &format!("{scheme}://{name}/")]);
    let started = Instant::now();
    let out = start(&mut cmd).unwrap().finish(Duration::from_secs(u64::from(max_time) + 5)).unwrap();
    (out, started.elapsed())
}

#[test]
fn listed_names_fail_at_once_with_a_reset_unlisted_ones_are_served_and_drop_lists_stall() {
    let topo = Topology::new().unwrap();
    let r = topo.resolver().to_string();
    let reset_rules = topo.dir().join("reset.rules");
    std::fs::write(&reset_rules, ".blocked.example\n").unwrap();
    let quiet_rules = topo.dir().join("quiet.rules");
    std::fs::write(&quiet_rules, "quiet.example\n").unwrap();
    let daemon = topo
        .start_daemon_with(&[reset_rules, quiet_rules], &["--mode", "generic", "--tcp-action", "reset", "--list-tcp-action", "quiet=drop"])
        .expect("starting blokir in the edge namespace");
    assert!(topo.xdp_attached().unwrap());

    // Servers: s_server on :443 and http.server on :80, both families.
    let (cert, key) = (topo.dir().join("cert.pem"), topo.dir().join("key.pem"));
    let out = run(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=test", "-days", "1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(out.success(), "{out}");
    let www = topo.dir().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let mut procs = Vec::new();
    let servers = [IpAddr::from(RESOLVER4), IpAddr::from(RESOLVER6)];
    for a in servers {
        let accept = match a {
            IpAddr::V4(a) => format!("{a}:443"),
            IpAddr::V6(a) => format!("[{a}]:443"),
        };
        let mut cmd = topo.exec(&r, "openssl");
        cmd.args(["s_server", "-accept", &accept, "-www", "-quiet", "-cert"]).arg(&cert).arg("-key").arg(&key);
        procs.push(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
        let mut cmd = topo.exec(&r, "python3");
        cmd.args(["-m", "http.server", "--bind", &a.to_string(), "--directory"]).arg(&www).arg("80");
        procs.push(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    }
    let _procs = Killed(procs);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = topo.run_in(&r, &["ss", "-H", "-n", "-l", "-t"], Duration::from_secs(5)).unwrap().ok().unwrap().stdout;
        if out.matches(":443").count() >= 2 && out.matches(":80 ").count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "servers not listening after 10 s:\n{out}");
        thread::sleep(Duration::from_millis(50));
    }

    // Unlisted names first: s_server serves one connection at a time, and a
    // reset connection stays open on its side.
    for server in servers {
        let (out, _) = curl(&topo, "https", "fine.example", server, 5);
        assert!(out.success() && out.stdout.contains(PAGE), "https fine.example at {server}: {out}");
        let (out, _) = curl(&topo, "http", "fine.example", server, 5);
        assert!(out.success(), "http fine.example at {server}: {out}");
    }

    let mut resets = 0;
    for server in servers {
        for (scheme, name) in [("https", "www.blocked.example"), ("http", "blocked.example")] {
            let (out, took) = curl(&topo, scheme, name, server, 5);
            let what = format!("{scheme}://{name} at {server}, {took:.2?}");
            assert!(matches!(out.code(), Some(35 | 56)), "{what}: curl should fail with a reset: {out}");
            assert!(out.stderr.contains("reset by peer"), "{what}: {out}");
            // Typically 20-550 ms here, process start-up included; the bound
            // leaves room for a loaded CI machine and is far below the 5 s
            // a dropped flow takes.
            assert!(took < Duration::from_millis(1500), "{what}: not fast");
            eprintln!("{what}: curl exit {:?}, {}", out.code(), out.stderr.trim());
            resets += 1;
        }
    }
    // The servers got no RST: the TLS connections are still open there.
    let out = topo.run_in(&r, &["ss", "-H", "-n", "-t", "state", "established", "sport", "=", ":443"], Duration::from_secs(5)).unwrap().ok().unwrap();
    assert!(out.stdout.lines().count() >= 2, "the servers' side of the reset TLS connections:\n{}", out.stdout);

    // A `drop` list: curl waits for its timeout.
    let (out, took) = curl(&topo, "http", "quiet.example", servers[0], 2);
    assert_eq!(out.code(), Some(28), "http quiet.example (drop list): {out}");
    assert!(took >= Duration::from_millis(1900), "{took:?}");

    let m = daemon.metrics().unwrap();
    assert_eq!(m.value("blokir_tcp_resets_total", &[]), Some(resets), "{}", m.lines_of("blokir_tcp").join("\n"));
    for reason in ["not_plain", "failed"] {
        assert_eq!(m.value("blokir_tcp_reset_fallbacks_total", &[("reason", reason)]), Some(0), "{}", m.lines_of("blokir_tcp").join("\n"));
    }
}
