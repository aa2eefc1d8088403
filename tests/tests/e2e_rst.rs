//! End to end, the TCP `reset` action: real `curl` in the client namespace,
//! through the edge where `blokir run --tcp-action reset` runs (generic XDP:
//! its XDP_TX takes the device's transmit path, see e2e_answers), to real
//! `openssl s_server -www` (TLS) and Python `http.server` (HTTP) in the
//! resolver namespace. A listed name fails at once with a connection reset
//! (curl exit 35 or 56, "Connection reset by peer"); an unlisted name is
//! served; a list whose TCP action is `drop` still stalls until curl's
//! timeout. /metrics counts every RST. The servers get no RST: their side
//! of a reset connection stays open. A named list's TCP action is set and
//! changed from the CLI (`lists add|set --tcp-action`) and kept across a
//! restart.
//!
//! Run as root, serially:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test e2e_rst -- --test-threads=1`.

use std::{net::IpAddr, time::Duration};

use blokir_tests::{
    netns::{Daemon, Topology},
    web::{PAGE, curl, start_servers},
};

/// curl to a listed name fails at once with a connection reset.
#[track_caller]
fn assert_reset(topo: &Topology, scheme: &str, name: &str, server: IpAddr) {
    let (out, took) = curl(topo, scheme, name, server, 5).unwrap();
    let what = format!("{scheme}://{name} at {server}, {took:.2?}");
    assert!(matches!(out.code(), Some(35 | 56)), "{what}: curl should fail with a reset: {out}");
    assert!(out.stderr.contains("reset by peer"), "{what}: {out}");
    // Typically 20-550 ms here, process start-up included; the bound
    // leaves room for a loaded CI machine and is far below the 5 s
    // a dropped flow takes.
    assert!(took < Duration::from_millis(1500), "{what}: not fast");
    eprintln!("{what}: curl exit {:?}, {}", out.code(), out.stderr.trim());
}

/// curl to a listed name whose flows are dropped waits for its 2 s timeout.
#[track_caller]
fn assert_stalls(topo: &Topology, scheme: &str, name: &str, server: IpAddr) {
    let (out, took) = curl(topo, scheme, name, server, 2).unwrap();
    let what = format!("{scheme}://{name} at {server}, {took:.2?}");
    assert_eq!(out.code(), Some(28), "{what}: curl should time out: {out}");
    assert!(took >= Duration::from_millis(1900), "{what}");
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

    let (servers, _procs) = start_servers(&topo).unwrap();

    // Unlisted names first: s_server serves one connection at a time, and a
    // reset connection stays open on its side.
    for server in servers {
        let (out, _) = curl(&topo, "https", "fine.example", server, 5).unwrap();
        assert!(out.success() && out.stdout.contains(PAGE), "https fine.example at {server}: {out}");
        let (out, _) = curl(&topo, "http", "fine.example", server, 5).unwrap();
        assert!(out.success(), "http fine.example at {server}: {out}");
    }

    let mut resets = 0;
    for server in servers {
        for (scheme, name) in [("https", "www.blocked.example"), ("http", "blocked.example")] {
            assert_reset(&topo, scheme, name, server);
            resets += 1;
        }
    }
    // The servers got no RST: the TLS connections are still open there.
    let out = topo.run_in(&r, &["ss", "-H", "-n", "-t", "state", "established", "sport", "=", ":443"], Duration::from_secs(5)).unwrap().ok().unwrap();
    assert!(out.stdout.lines().count() >= 2, "the servers' side of the reset TLS connections:\n{}", out.stdout);

    // A `drop` list: curl waits for its timeout.
    assert_stalls(&topo, "http", "quiet.example", servers[0]);

    let m = daemon.metrics().unwrap();
    assert_eq!(m.value("blokir_tcp_resets_total", &[]), Some(resets), "{}", m.lines_of("blokir_tcp").join("\n"));
    for reason in ["not_plain", "failed"] {
        assert_eq!(m.value("blokir_tcp_reset_fallbacks_total", &[("reason", reason)]), Some(0), "{}", m.lines_of("blokir_tcp").join("\n"));
    }
}

#[track_caller]
fn cli_ok(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args).unwrap();
    assert!(out.success(), "blokir {args:?} failed:\n{out}");
    out.stdout
}

/// `blokir lists ls --output json`, the row of list `name`.
fn lists_row(d: &Daemon, name: &str) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = serde_json::from_str(&cli_ok(d, &["lists", "ls", "--output", "json"])).unwrap();
    rows.into_iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no list {name} in `lists ls`"))
}

/// A named list's TCP action set from the CLI against a running daemon:
/// `lists add --tcp-action reset` resets at once; `lists set --tcp-action
/// drop` makes the flows stall, in force at once and without fetching the
/// source (it is gone by then); after a restart the list's own setting is
/// still in force and wins over `run`'s --tcp-action and --list-tcp-action,
/// until `lists set --clear tcp-action` hands the choice back to them.
#[test]
fn a_named_lists_tcp_action_is_set_from_the_cli_at_once_and_kept_across_restarts() {
    let topo = Topology::new().unwrap();
    let daemon = topo.start_daemon_with(&[], &["--mode", "generic"]).expect("starting blokir in the edge namespace");
    let (servers, _procs) = start_servers(&topo).unwrap();
    let server = servers[0];
    // The unlisted name first (s_server serves one connection at a time).
    let (out, _) = curl(&topo, "https", "fine.example", server, 5).unwrap();
    assert!(out.success() && out.stdout.contains(PAGE), "https fine.example: {out}");

    let source = topo.dir().join("rst.rules");
    std::fs::write(&source, ".blocked.example\n").unwrap();
    cli_ok(&daemon, &["lists", "add", "rst", "--source", source.to_str().unwrap(), "--tcp-action", "reset"]);
    let row = lists_row(&daemon, "rst");
    assert_eq!((&row["dns_action"], &row["tcp_action"], &row["ech_outer"]), (&"drop".into(), &"reset".into(), &false.into()), "{row}");
    let table = cli_ok(&daemon, &["lists", "ls"]);
    let line = table.lines().find(|l| l.starts_with("rst ")).unwrap_or_else(|| panic!("{table}"));
    assert_eq!(line.split_whitespace().collect::<Vec<_>>()[4..7], ["drop", "reset", "no"], "{table}");
    assert_reset(&topo, "https", "www.blocked.example", server);
    assert_reset(&topo, "http", "blocked.example", server);

    // Changed in place: the source is gone, so a fetch would fail.
    std::fs::remove_file(&source).unwrap();
    let out = cli_ok(&daemon, &["lists", "set", "rst", "--tcp-action", "drop"]);
    assert!(out.contains("TCP action drop"), "{out}");
    assert_stalls(&topo, "http", "blocked.example", server);
    assert_stalls(&topo, "https", "www.blocked.example", server);
    let (out, _) = curl(&topo, "http", "fine.example", server, 5).unwrap();
    assert!(out.success(), "http fine.example (the server is up): {out}");
    let row = lists_row(&daemon, "rst");
    assert_eq!((&row["tcp_action"], &row["version"], &row["last_error"]), (&"drop".into(), &1.into(), &serde_json::Value::Null), "{row}");
    let m = daemon.metrics().unwrap();
    assert_eq!(m.value("blokir_tcp_resets_total", &[]), Some(2), "no reset after the change:\n{}", m.lines_of("blokir_tcp").join("\n"));

    // Lists that are not named lists are refused with the reason (exit 3).
    let out = daemon.cli(&["lists", "set", "nope", "--tcp-action", "reset"]).unwrap();
    assert!(out.code() == Some(3) && out.stderr.contains("no list nope"), "{out}");
    let out = daemon.cli(&["lists", "set", "local", "--tcp-action", "reset"]).unwrap();
    assert!(out.code() == Some(3) && out.stderr.contains("not a named list"), "{out}");

    // A restart where `run` says reset: the list's own drop wins.
    daemon.stop().unwrap();
    let daemon = topo.start_daemon_with(&[], &["--mode", "generic", "--tcp-action", "reset", "--list-tcp-action", "rst=reset"]).expect("restarting blokir");
    assert_eq!(lists_row(&daemon, "rst")["tcp_action"], "drop");
    assert_stalls(&topo, "http", "blocked.example", server);
    // Cleared, `run`'s flags decide again.
    let out = cli_ok(&daemon, &["lists", "set", "rst", "--clear", "tcp-action"]);
    assert!(out.contains("TCP action reset"), "{out}");
    assert_reset(&topo, "http", "blocked.example", server);
    let row = lists_row(&daemon, "rst");
    assert_eq!((&row["tcp_action"], &row["own"]["tcp_action"]), (&"reset".into(), &serde_json::Value::Null), "{row}");

    // An ECH-outer list never blocks HTTP requests.
    cli_ok(&daemon, &["lists", "set", "rst", "--ech-outer", "true"]);
    assert_eq!(lists_row(&daemon, "rst")["ech_outer"], true);
    let (out, _) = curl(&topo, "http", "blocked.example", server, 5).unwrap();
    assert!(out.success(), "http blocked.example (ECH-outer list): {out}");
    daemon.stop().unwrap();
}
