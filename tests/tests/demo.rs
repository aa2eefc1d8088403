//! `cargo xtask demo` as a new user runs it: the demo program (built with
//! this package) against the daemon under test, every step checked by the
//! demo itself (it exits non-zero on anything unexpected). Run as root:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test demo`.

use std::{process::Command, time::Duration};

use blokir_tests::netns;

#[test]
fn the_demo_shows_every_protocol_blocked_and_passes() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_demo"));
    cmd.arg("--blokir").arg(blokir_tests::blokir_bin().unwrap());
    let out = netns::run(&mut cmd, Duration::from_secs(300)).unwrap();
    assert!(out.success(), "{out}");
    assert!(!out.stdout.contains("UNEXPECTED"), "{out}");
    for shown in [
        "ANSWERED  www.judi.test",
        "NXDOMAIN (answered by blokir at the edge)",
        "Connection reset by peer",
        "chromium https://example.test/             page loaded",
        "chromium https://web.telegram.org/",
        "queries for listed names:",
        "dnsmasq's log holds not one query for a listed name.",
        "Demo passed",
    ] {
        assert!(out.stdout.contains(shown), "the demo did not show {shown:?}:\n{out}");
    }
}
