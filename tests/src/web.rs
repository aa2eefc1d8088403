//! Real web servers and clients around a [`Topology`]: `openssl s_server`
//! and Python's `http.server` in the resolver namespace, `curl` and headless
//! Chromium in the client's (used by the end-to-end suites and the demo).

use std::{
    net::IpAddr,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure};

use crate::netns::{Captured, RESOLVER4, RESOLVER6, Topology, run, start};

/// A line of the s_server `-www` status page.
pub const PAGE: &str = "Ciphers supported in s_server binary";

/// Processes killed (and reaped) on drop.
pub struct Killed(pub Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `addr` as URLs and `host:port` take it.
pub fn host(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// A self-signed certificate and key in `dir` (`cert.pem`, `key.pem`).
pub fn self_signed(dir: &Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = run(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=test", "-days", "1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        Duration::from_secs(30),
    )?;
    ensure!(out.success(), "{out}");
    Ok((cert, key))
}

/// Real servers in the resolver namespace: `openssl s_server -www` on :443
/// (one connection at a time) and Python `http.server` on :80, on both
/// families' addresses; returns once all four listen.
pub fn start_servers(topo: &Topology) -> anyhow::Result<([IpAddr; 2], Killed)> {
    let r = topo.resolver().to_string();
    let (cert, key) = self_signed(topo.dir())?;
    let www = topo.dir().join("www");
    std::fs::create_dir_all(&www)?;
    let mut procs = Killed(Vec::new());
    let servers = [IpAddr::from(RESOLVER4), IpAddr::from(RESOLVER6)];
    for a in servers {
        let mut cmd = topo.exec(&r, "openssl");
        cmd.args(["s_server", "-accept", &format!("{}:443", host(a)), "-www", "-quiet", "-cert"]).arg(&cert).arg("-key").arg(&key);
        procs.0.push(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
        let mut cmd = topo.exec(&r, "python3");
        cmd.args(["-m", "http.server", "--bind", &a.to_string(), "--directory"]).arg(&www).arg("80");
        procs.0.push(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = topo.run_in(&r, &["ss", "-H", "-n", "-l", "-t"], Duration::from_secs(5))?.ok()?.stdout;
        if out.matches(":443").count() >= 2 && out.matches(":80 ").count() >= 2 {
            break;
        }
        if Instant::now() >= deadline {
            bail!("servers not listening after 10 s:\n{out}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok((servers, procs))
}

/// curl from the client to `scheme://name/` at `server` (`--resolve`), with
/// its time.
pub fn curl(topo: &Topology, scheme: &str, name: &str, server: IpAddr, max_time: u32) -> anyhow::Result<(Captured, Duration)> {
    let port = if scheme == "https" { 443 } else { 80 };
    let mut cmd = topo.exec(topo.client(), "curl");
    cmd.args(["-sSk", "--max-time", &max_time.to_string(), "--resolve", &format!("{name}:{port}:{}", host(server)), &format!("{scheme}://{name}/")]);
    let started = Instant::now();
    let out = start(&mut cmd)?.finish(Duration::from_secs(u64::from(max_time) + 5))?;
    Ok((out, started.elapsed()))
}

/// Headless Chromium in the client namespace loading `https://name/` from
/// `server`, printing the page's DOM; its profile in `profile`. Only `name`
/// is mapped: Chromium's own background requests would otherwise go to the
/// single-threaded s_server and hold it. `--timeout` ends a stalled load
/// with an empty DOM; QUIC is off (TCP is what this reads).
pub fn chromium(topo: &Topology, name: &str, server: IpAddr, profile: &Path) -> Command {
    let mut cmd = topo.exec(topo.client(), "timeout");
    cmd.args(["-k", "3", "30", "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]);
    cmd.args(["--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic"]);
    cmd.args(["--ignore-certificate-errors", "--timeout=5000"]);
    cmd.arg(format!("--user-data-dir={}", profile.display()));
    cmd.arg(format!("--host-resolver-rules=MAP {name} {}, MAP * ~NOTFOUND", host(server)));
    cmd.args(["--dump-dom", &format!("https://{name}/")]);
    cmd
}
