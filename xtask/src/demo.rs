//! `cargo xtask demo`: blokir blocking the 11 Telegram names of Indonesia's
//! 2017 order.
//!
//! Without `--iface`, it builds a small network of its own (three network
//! namespaces: a client, a router and a server, all on 198.18.0.0/15 and
//! 2001:db8::/32), runs blokir on the router with two lists (one dropped,
//! one answered NXDOMAIN and reset), and shows real `dig`, `curl` and
//! headless Chromium against dnsmasq, openssl s_server and Python's
//! http.server: DNS, HTTPS and HTTP blocked or served, the counters, a rule
//! added live, a `kill -9` and restart under a stream of queries, and a
//! closing table; then removes everything. It exits non-zero if anything
//! got what it should not.
//!
//! With `--iface IFACE`, it writes `target/demo/telegram.rules` and runs
//! `blokir run --iface IFACE --rules target/demo/telegram.rules` in the
//! foreground (control socket /run/blokir/blokir.sock, state in
//! /var/lib/blokir, metrics on 127.0.0.1:9947) until Ctrl-C, which detaches
//! the program. This filters real traffic on IFACE.
//!
//! Both build the debug daemon (`cargo build --bin blokir`, the binary the
//! tests use too) and the demo program (tests/src/bin/demo.rs), and need root.

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, bail};

use crate::{cargo, is_root, root, run as run_cmd};

pub fn run(iface: Option<&str>) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo loads an XDP program and builds network namespaces: run `cargo xtask demo` as root");
    }
    run_cmd(&mut cargo(&["build", "--bin", "blokir", "--bin", "demo"]))?;
    let blokir = root().join("target/debug/blokir");
    let demo = root().join("target/debug/demo");
    let mut cmd = Command::new(&demo);
    cmd.arg("--blokir").arg(&blokir).current_dir(root());
    match iface {
        // Become the demo (which becomes `blokir run`): Ctrl-C reaches only
        // blokir, which detaches before exiting.
        Some(iface) => Err(anyhow::Error::new(cmd.args(["--iface", iface]).exec()).context(format!("running {}", demo.display()))),
        None => {
            let status = cmd.status().with_context(|| format!("running {}", demo.display()))?;
            if !status.success() {
                bail!("the demo failed ({status})");
            }
            Ok(())
        }
    }
}
