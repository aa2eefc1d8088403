//! Restarts and upgrades without a gap: the XDP links and the state that must
//! carry over (TLS flows, counters) are pinned in bpffs, so a killed daemon
//! leaves filtering running and a new one switches each link to its freshly
//! filled program atomically. Real `dig` against a real dnsmasq through the
//! edge, as in e2e_dns; the TLS flow carry-over runs the real programs under
//! BPF_PROG_TEST_RUN. Run as root, serially:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test e2e_restart -- --test-threads=1`.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use blokir::{ebpf::Kernel, pin::PinDir, rules::Rule};
use blokir_tests::{
    XDP_DROP, XDP_PASS,
    netns::{Answer, Daemon, Family, Metrics, Query, TELEGRAM_NAMES, Topology, Transport, telegram_rules},
    packets::client_hello,
};
use etherparse::PacketBuilder;
use filter_common::hash::lane_multiplier;

const ALL: [(Transport, Family); 4] = [(Transport::Udp, Family::V4), (Transport::Udp, Family::V6), (Transport::Tcp, Family::V4), (Transport::Tcp, Family::V6)];

/// Added with `blokir rules add` (the resolver serves it: were it let
/// through, dnsmasq would log it).
const ADDED: &str = "mail.example.test";
/// Names nobody blocks, in the stream throughout.
const ALLOWED: [&str; 3] = ["example.test", "www.example.test", "nottelegram.org"];

fn write(topo: &Topology, name: &str, text: &str) -> PathBuf {
    let path = topo.dir().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[track_caller]
fn cli_ok(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args).unwrap();
    assert!(out.success(), "blokir {args:?} failed:\n{out}");
    out.stdout
}

fn status(d: &Daemon) -> serde_json::Value {
    serde_json::from_str(&cli_ok(d, &["status", "--output", "json"])).unwrap()
}

/// blokir_blocked_total summed over protocols and families.
fn blocked_total(m: &Metrics) -> u64 {
    ALL.iter().map(|(t, f)| m.value("blokir_blocked_total", &[("proto", t.label()), ("af", f.label())]).unwrap_or(0)).sum()
}

/// What the stream of queries saw.
#[derive(Default)]
struct Seen {
    /// When the batch started, the answer, whether it had to be blocked.
    answers: Vec<(Duration, Answer, bool)>,
}

/// Sends batches of blocked and allowed queries over every transport until
/// `stop` is set: every batch takes about dig's 1 s timeout.
fn stream(topo: &Topology, stop: &AtomicBool, t0: Instant) -> Seen {
    let mut seen = Seen::default();
    let blocked: Vec<&str> = TELEGRAM_NAMES.iter().copied().chain([ADDED]).collect();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let mut batch = Vec::new();
        for (k, (t, f)) in ALL.into_iter().enumerate() {
            batch.push((Query::new(blocked[(i + k) % blocked.len()], t, f), true));
            batch.push((Query::new(ALLOWED[(i + k) % ALLOWED.len()], t, f), false));
        }
        i += 1;
        let queries: Vec<Query> = batch.iter().map(|(q, _)| q.clone()).collect();
        let at = t0.elapsed();
        for (a, (_, b)) in topo.dig_all(&queries).expect("dig").into_iter().zip(&batch) {
            seen.answers.push((at, a, *b));
        }
    }
    seen
}

#[test]
fn sigkill_and_restart_under_a_stream_of_queries_lets_nothing_blocked_through_and_stops_nothing() {
    let topo = Arc::new(Topology::new().unwrap());
    let telegram = write(&topo, "telegram.rules", &telegram_rules());
    let extra = write(&topo, "extra.rules", "my.telegram.org\n");

    let d = topo.start_daemon_as_given(std::slice::from_ref(&telegram), &[]).unwrap();
    cli_ok(&d, &["rules", "add", ADDED]);
    let first = status(&d);
    assert_eq!(first["attached"][0]["adopted"], false, "{first}");
    assert_eq!(first["attached"][0]["link_pinned"], true, "{first}");

    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let runner = {
        let (topo, stop) = (topo.clone(), stop.clone());
        thread::spawn(move || stream(&topo, &stop, t0))
    };
    let mut events = Vec::new();
    thread::sleep(Duration::from_secs(3));

    // Kill, restart (the last time with one more list), several times.
    let mut d = d;
    let mut last_blocked = blocked_total(&d.metrics().unwrap());
    let mut last_program = first["attached"][0]["program_id"].as_u64().unwrap();
    let mut gaps = Vec::new();
    for round in 0..3 {
        let before = blocked_total(&d.metrics().unwrap());
        assert!(before >= last_blocked, "round {round}: blokir_blocked_total went from {last_blocked} to {before}");
        d.kill().unwrap();
        let killed = Instant::now();
        events.push((t0.elapsed(), "killed"));
        assert!(topo.xdp_attached().unwrap(), "round {round}: the program went away with the killed daemon");
        // No daemon for a moment: the stream goes on against the pinned program.
        thread::sleep(Duration::from_millis(1500));
        let rules = if round == 2 { vec![telegram.clone(), extra.clone()] } else { vec![telegram.clone()] };
        d = topo.start_daemon_as_given(&rules, &[]).unwrap();
        gaps.push(killed.elapsed());
        events.push((t0.elapsed(), "new daemon ready"));
        let s = status(&d);
        let a = &s["attached"][0];
        assert_eq!(a["adopted"], true, "round {round}: the new daemon did not take over the pinned link: {s}");
        assert_eq!(a["previous_program_id"].as_u64(), Some(last_program), "{s}");
        assert_ne!(a["program_id"].as_u64(), Some(last_program), "round {round}: the link still runs the old program: {s}");
        let adopted: Vec<&str> = s["adopted_maps"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert!(adopted.contains(&"FLOWS") && adopted.contains(&"COUNTERS"), "round {round}: {s}");
        assert_eq!(adopted.contains(&"LIST_HITS"), round != 2, "per-list counters carry over for the same lists only: {s}");
        let log = d.log();
        let line = log.lines().find(|l| l.contains("switched the pinned link to the new program")).unwrap_or_else(|| panic!("{log}"));
        eprintln!("round {round}: {}", line.split_once("INFO").map_or(line, |x| x.1).trim());
        last_program = a["program_id"].as_u64().unwrap();
        // The counters go on from where they were.
        let after = blocked_total(&d.metrics().unwrap());
        assert!(after >= before, "round {round}: blokir_blocked_total was {before} before the kill, {after} after the restart");
        last_blocked = after;
        // The rule added before the kill is enforced by the new program.
        let out = cli_ok(&d, &["rules", "check", ADDED]);
        assert!(out.contains("blocked by `mail.example.test` (list local)"), "{out}");
        thread::sleep(Duration::from_secs(2));
    }
    stop.store(true, Ordering::Relaxed);
    let seen = runner.join().unwrap();
    // The third daemon blocks the extra list too.
    let a = topo.dig(&Query::udp4("my.telegram.org")).unwrap();
    assert!(a.timed_out(), "my.telegram.org should be blocked by the extra list:\n{a}");

    let blocked_sent = seen.answers.iter().filter(|(_, _, b)| *b).count() as u64;
    for (at, a, blocked) in &seen.answers {
        if *blocked {
            assert!(a.timed_out(), "{} got through (batch sent at {at:?}; {events:?}):\n{a}", a.query);
        } else {
            assert!(a.resolved_to_expected(), "{} was not answered (batch sent at {at:?}; {events:?}): traffic stopped\n{a}", a.query);
        }
    }
    let names = topo.resolver_queries();
    for n in TELEGRAM_NAMES.iter().chain([&ADDED]) {
        assert!(!names.iter().any(|s| s == n), "the resolver got a query for {n}:\n{}", topo.resolver_log());
    }
    let allowed_sent = seen.answers.len() as u64 - blocked_sent;
    let m = d.metrics().unwrap();
    let total = blocked_total(&m);
    assert!(total >= blocked_sent, "blokir_blocked_total is {total}, but {blocked_sent} blocked queries were sent since the first daemon");
    eprintln!(
        "{blocked_sent} blocked and {allowed_sent} allowed queries over 3 kill/restart rounds (kill to ready: {gaps:?}); none blocked got through, all allowed answered; blokir_blocked_total {total}"
    );
    d.stop().unwrap();
    assert!(topo.xdp_attached().unwrap(), "a default stop leaves the program attached");
    let out = topo.blokir_cli(&["cleanup", "--pin-dir", topo.pin_dir().to_str().unwrap()]).unwrap();
    assert!(out.success(), "{out}");
}

/// Started as an operator starts it in a namespace, `ip netns exec EDGE
/// blokir run` with the default pin directory: `ip netns exec` gives it a
/// fresh /sys without bpffs, and pins on a bpffs mounted there would die
/// with the daemon. They go on the bpffs outside, so a SIGKILL under a
/// stream of queries leaves the program attached and a restart takes over:
/// not one blocked query is answered. `blokir cleanup`, also under `ip
/// netns exec`, finds them there.
#[test]
fn under_ip_netns_exec_with_the_default_pin_dir_a_sigkill_and_restart_leak_nothing() {
    sigkill_and_restart_with_the_default_pin_dir(Topology::start_daemon_default_pins, "outside this mount namespace", |_| ());
}

/// The same, with the daemon sandboxed as the packaged systemd unit
/// sandboxes it (`Topology::daemon_command_as_unit`: its own mount
/// namespace, the file system read-only but /sys/fs/bpf and its
/// directories, /proc showing processes only, its capability bounding set)
/// and in the edge namespace as `NetworkNamespacePath=` puts it.
#[test]
fn with_the_systemd_units_sandbox_a_sigkill_and_restart_leak_nothing() {
    sigkill_and_restart_with_the_default_pin_dir(Topology::start_daemon_as_unit, "/sys/fs/bpf/blokir", |d| {
        // The sandbox is in place: seen from outside, the daemon's
        // capabilities are the unit's bounding set, its root is read-only,
        // its /proc shows processes only, and PID 1's root is out of reach.
        let pid = d.pid();
        let bounding = |pid: &str| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            u64::from_str_radix(status.lines().find_map(|l| l.strip_prefix("CapBnd:")).unwrap().trim(), 16).unwrap()
        };
        // CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21, CAP_SYS_RESOURCE 24, CAP_PERFMON 38,
        // CAP_BPF 39, of those this machine allows at all.
        let unit: u64 = [12, 21, 24, 38, 39].iter().map(|b| 1u64 << b).sum();
        assert_eq!(bounding(&pid.to_string()), unit & bounding("self"));
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let field = |l: &str, i: usize| l.split(' ').nth(i).unwrap_or_default().to_string();
        let root = mounts.lines().rfind(|l| field(l, 4) == "/").unwrap();
        assert!(field(root, 5).starts_with("ro"), "{root}");
        // The last mount on a point is the one seen there.
        let proc_ = mounts.lines().rfind(|l| field(l, 4) == "/proc").unwrap();
        assert!(proc_.contains("hidepid=invisible") && proc_.contains("subset=pid"), "{proc_}");
    });
}

/// Kills the daemon (started by `start`, default pin directory, whose
/// `status` names it `pin_dir`) under a stream of queries, restarts it, and
/// counts blocked queries answered: none may be.
fn sigkill_and_restart_with_the_default_pin_dir(start: fn(&Topology, &[PathBuf], &[&str]) -> anyhow::Result<Daemon>, pin_dir: &str, check: fn(&Daemon)) {
    blokir_tests::netns::host_bpffs().unwrap();
    let host_pins = Path::new(blokir::pin::DEFAULT_PIN_DIR);
    let topo = Arc::new(Topology::new().unwrap());
    let cleanup = || topo.run_in(topo.edge(), &[topo.blokir().unwrap().to_str().unwrap(), "cleanup"], Duration::from_secs(30)).unwrap();
    assert!(!host_pins.join("links").exists() || cleanup().success(), "a stale {} could not be cleaned", host_pins.display());
    // Every name the stream expects blocked (ADDED too).
    let telegram = write(&topo, "telegram.rules", &format!("{}{ADDED}\n", telegram_rules()));
    let d = start(&topo, std::slice::from_ref(&telegram), &[]).unwrap();
    check(&d);
    let s = status(&d);
    assert!(s["pin_dir"].as_str().is_some_and(|p| p.contains(pin_dir)), "{s}");
    assert_eq!(s["pins_outlive_daemon"], true, "{s}");
    // /readyz says so too.
    let readyz = topo.run_in(topo.edge(), &["curl", "-sS", &format!("http://{}/readyz", blokir_tests::netns::METRICS_ADDR)], Duration::from_secs(10)).unwrap();
    assert!(readyz.stdout.starts_with("ready\npins in /sys/fs/bpf/blokir") && readyz.stdout.contains("they outlive the daemon"), "{readyz}");
    assert!(host_pins.join("links").join(blokir_tests::netns::EDGE_CLIENT_IFACE).exists(), "the link is not pinned on the host's bpffs: {s}");

    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let runner = {
        let (topo, stop) = (topo.clone(), stop.clone());
        thread::spawn(move || stream(&topo, &stop, t0))
    };
    thread::sleep(Duration::from_secs(2));
    let mut d = d;
    d.kill().unwrap();
    thread::sleep(Duration::from_secs(2));
    assert!(topo.xdp_attached().unwrap(), "the program went away with the killed daemon");
    d = start(&topo, std::slice::from_ref(&telegram), &[]).unwrap();
    let s = status(&d);
    assert_eq!(s["attached"][0]["adopted"], true, "the new daemon did not take over the pinned link: {s}");
    thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let seen = runner.join().unwrap();

    let blocked: Vec<_> = seen.answers.iter().filter(|(_, _, b)| *b).collect();
    let answered: Vec<String> = blocked.iter().filter(|(_, a, _)| !a.timed_out()).map(|(at, a, _)| format!("{} at {at:?}", a.query)).collect();
    assert!(blocked.len() >= 8 && answered.is_empty(), "{} of {} blocked queries answered: {answered:?}", answered.len(), blocked.len());
    for (at, a, b) in &seen.answers {
        assert!(*b || a.resolved_to_expected(), "{} was not answered (at {at:?}): traffic stopped\n{a}", a.query);
    }
    eprintln!("{} blocked queries across a SIGKILL and a restart: none answered", blocked.len());
    d.kill().unwrap();
    let out = cleanup();
    assert!(out.success() && !host_pins.join("links").join(blokir_tests::netns::EDGE_CLIENT_IFACE).exists(), "{out}");
    assert!(!topo.xdp_attached().unwrap(), "cleanup under ip netns exec left the program attached");
}

#[test]
fn exit_behaviours_default_keeps_filtering_detach_on_exit_and_cleanup() {
    let topo = Topology::new().unwrap();
    let telegram = write(&topo, "telegram.rules", &telegram_rules());
    let rules = std::slice::from_ref(&telegram);
    let pin_dir = topo.pin_dir();
    let pin = pin_dir.to_str().unwrap();

    // Default: a clean stop leaves the program attached and filtering.
    let d = topo.start_daemon_as_given(rules, &[]).unwrap();
    let s = status(&d);
    let mode = s["attached"][0]["mode"].as_str().unwrap().to_string();
    let table = cli_ok(&d, &["status"]);
    assert!(table.lines().any(|l| l.split_whitespace().take(3).eq(["c0", "yes", mode.as_str()])), "{table}");
    // A second daemon on the same pin directory is refused.
    let mut cmd = topo.exec(topo.edge(), topo.blokir().unwrap());
    cmd.arg("--socket").arg(topo.dir().join("other.sock")).args(["run", "--iface", "c0", "--pin-dir", pin, "--metrics-addr", "127.0.0.1:0"]);
    cmd.arg("--state-dir").arg(topo.dir().join("other-state"));
    let other = blokir_tests::netns::run(&mut cmd, Duration::from_secs(30)).unwrap();
    assert!(!other.success() && other.stderr.contains("another blokir daemon is using the pin directory"), "{other}");
    // Refused before anything is announced.
    assert!(!other.stderr.contains("serving"), "{other}");
    // So is a bad rule file (on an interface of its own: c0 holds the
    // first daemon's program, which another pin directory cannot take over).
    let bad = write(&topo, "bad.rules", "t.me\nbad..name\n");
    let mut cmd = topo.exec(topo.edge(), topo.blokir().unwrap());
    cmd.arg("--socket").arg(topo.dir().join("other.sock")).args(["run", "--iface", "lo", "--metrics-addr", "127.0.0.1:0", "--rules"]).arg(&bad);
    cmd.arg("--pin-dir").arg(topo.dir().join("bpf/other")).arg("--state-dir").arg(topo.dir().join("other-state"));
    let other = blokir_tests::netns::run(&mut cmd, Duration::from_secs(30)).unwrap();
    assert!(!other.success() && other.stderr.contains("bad.rules:2") && !other.stderr.contains("serving"), "{other}");
    d.stop().unwrap();
    assert!(topo.xdp_attached().unwrap(), "the default stop detached the program");
    let pinned = topo.pinned();
    assert!(pinned.contains(&format!("links/c0/{mode}")) && pinned.contains(&format!("maps/v{}/FLOWS", blokir::pin::LAYOUT)), "{pinned:?}");
    let a = topo.dig(&Query::udp4("t.me")).unwrap();
    assert!(a.timed_out(), "with no daemon, the pinned program should still block t.me:\n{a}");
    // `blokir status` without a daemon says what the pins still run.
    let out = topo.blokir_cli(&["status", "--pin-dir", pin, "--output", "json"]).unwrap();
    assert_eq!(out.code(), Some(1), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (v["daemon"].as_bool(), v["attached"][0]["iface"].as_str(), v["attached"][0]["attached"].as_bool()),
        (Some(false), Some("c0"), Some(true)),
        "{v}"
    );
    assert_eq!(v["attached"][0]["program_id"], s["attached"][0]["program_id"], "{v}");
    assert!(topo.dig(&Query::tcp6("example.test")).unwrap().resolved_to_expected());

    // `blokir cleanup` detaches it and removes every pin.
    let out = topo.blokir_cli(&["cleanup", "--pin-dir", pin]).unwrap();
    assert!(out.success() && out.stdout.contains("detached from c0"), "{out}");
    assert!(!topo.xdp_attached().unwrap(), "still attached after `blokir cleanup`");
    assert!(!pin_dir.exists(), "{:?}", topo.pinned());
    assert!(topo.dig(&Query::udp4("t.me")).unwrap().resolved_to_expected());

    // --detach-on-exit: detached, maps kept; the next daemon adopts them.
    let d = topo.start_daemon_as_given(rules, &["--detach-on-exit"]).unwrap();
    assert_eq!(status(&d)["adopted_maps"].as_array().map(Vec::len), Some(0), "fresh start");
    assert!(topo.dig(&Query::udp4("t.me")).unwrap().timed_out());
    let before = blocked_total(&d.metrics().unwrap());
    d.stop().unwrap();
    assert!(!topo.xdp_attached().unwrap(), "--detach-on-exit left the program attached");
    let pinned = topo.pinned();
    assert!(!pinned.iter().any(|p| p.starts_with("links/")) && pinned.contains(&format!("maps/v{}/COUNTERS", blokir::pin::LAYOUT)), "{pinned:?}");

    // --cleanup: starts from the kept maps, removes everything on exit.
    let d = topo.start_daemon_as_given(rules, &["--cleanup"]).unwrap();
    let s = status(&d);
    assert_eq!(s["attached"][0]["adopted"], false, "no link was left to adopt: {s}");
    assert!(s["adopted_maps"].as_array().unwrap().iter().any(|m| m == "COUNTERS"), "{s}");
    assert!(blocked_total(&d.metrics().unwrap()) >= before, "counters did not carry over through --detach-on-exit");
    d.stop().unwrap();
    assert!(!topo.xdp_attached().unwrap(), "--cleanup left the program attached");
    assert!(!pin_dir.exists(), "--cleanup left pins: {:?}", topo.pinned());

    // The two exit options exclude each other.
    let out = topo.blokir_cli(&["run", "--iface", "c0", "--detach-on-exit", "--cleanup"]).unwrap();
    assert_eq!(out.code(), Some(2), "{out}");
}

#[test]
fn interfaces_no_longer_given_are_detached_by_the_next_daemon() {
    let topo = Topology::new().unwrap();
    let edge = topo.edge().to_string();
    topo.run_in(&edge, &["ip", "link", "add", "dum0", "type", "veth", "peer", "name", "dum1"], Duration::from_secs(10)).unwrap().ok().unwrap();
    topo.run_in(&edge, &["ip", "link", "set", "dum0", "up"], Duration::from_secs(10)).unwrap().ok().unwrap();
    let on_dummy =
        || topo.run_in(&edge, &["ip", "link", "show", "dum0"], Duration::from_secs(10)).unwrap().stdout.split_whitespace().any(|w| w.starts_with("xdp"));
    let d = topo.start_daemon_as_given(&[], &["--iface", "dum0", "--mode", "generic"]).unwrap();
    assert!(on_dummy(), "not attached to dum0");
    d.kill().unwrap();
    assert!(on_dummy());
    // An interface that went away and came back: its pinned link is
    // defunct, so the next daemon attaches anew.
    topo.run_in(&edge, &["ip", "link", "del", "dum0"], Duration::from_secs(10)).unwrap().ok().unwrap();
    topo.run_in(&edge, &["ip", "link", "add", "dum0", "type", "veth", "peer", "name", "dum1"], Duration::from_secs(10)).unwrap().ok().unwrap();
    topo.run_in(&edge, &["ip", "link", "set", "dum0", "up"], Duration::from_secs(10)).unwrap().ok().unwrap();
    assert!(!on_dummy());
    let d = topo.start_daemon_as_given(&[], &["--iface", "dum0", "--mode", "generic"]).unwrap();
    assert!(on_dummy(), "not attached to the new dum0");
    assert!(d.log().contains("the pinned link is no longer attached"), "{}", d.log());
    let s = status(&d);
    let dum = s["attached"].as_array().unwrap().iter().find(|a| a["iface"] == "dum0").cloned().unwrap();
    assert_eq!((dum["adopted"].as_bool(), dum["attached"].as_bool()), (Some(false), Some(true)), "{s}");
    d.kill().unwrap();
    // Started without dum0: it is detached.
    let d = topo.start_daemon_with(&[], &["--mode", "generic"]).unwrap();
    assert!(!on_dummy(), "dum0 is still filtered though the new daemon was not given it");
    assert!(d.log().contains("detached: pinned by an earlier daemon but not given with --iface"), "{}", d.log());
    assert!(topo.xdp_attached().unwrap());
    d.stop().unwrap();
}

#[test]
fn a_pinned_map_with_another_layout_is_replaced_with_a_log_line() {
    let topo = Topology::new().unwrap();
    let telegram = write(&topo, "telegram.rules", &telegram_rules());
    // Pin a map of another type and size where FLOWS belongs (the object's
    // CONFIG array: created by the loader, no program loaded).
    let maps = topo.pin_dir().join(format!("maps/v{}", blokir::pin::LAYOUT));
    std::fs::create_dir_all(&maps).unwrap();
    let mut ebpf = aya::EbpfLoader::new().load(blokir::ebpf::OBJECT).unwrap();
    ebpf.map_mut("CONFIG").unwrap().pin(maps.join("FLOWS")).unwrap();
    drop(ebpf);

    let d = topo.start_daemon_with(std::slice::from_ref(&telegram), &[]).unwrap();
    assert!(d.log().contains("the pinned map has another layout"), "{}", d.log());
    let s = status(&d);
    assert!(!s["adopted_maps"].as_array().unwrap().iter().any(|m| m == "FLOWS"), "{s}");
    let info = aya::maps::MapInfo::from_pin(maps.join("FLOWS")).unwrap();
    assert_eq!(info.map_type().unwrap(), aya::maps::MapType::LruHash, "FLOWS was not replaced");
    assert!(topo.dig(&Query::tcp4("web.telegram.org")).unwrap().timed_out());
    d.stop().unwrap();
}

// ---------------------------------------------------------------------------
// TLS flows across an upgrade, under BPF_PROG_TEST_RUN

fn tcp_frame(payload: &[u8], seq: u32) -> Vec<u8> {
    let b =
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64).tcp(40000, 443, seq, 64240).ack(1).psh();
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

/// A program loaded the way the daemon loads it, rules filled by the engine.
fn load(pins: Option<&PinDir>, rules: &[&str]) -> Kernel {
    let mut kernel = match pins {
        Some(p) => Kernel::load_pinned(1 << 12, p, &["local", "test"]).unwrap(),
        None => Kernel::load(1 << 12).unwrap(),
    };
    let mut engine = blokir::rules::Engine::new([lane_multiplier(rand::random()), lane_multiplier(rand::random())], 1 << 12, 1 << 12);
    kernel.write_config(engine.config()).unwrap();
    let rules: Vec<Rule> = rules.iter().map(|r| Rule::parse(r).unwrap()).collect();
    let change = engine.plan_replace("test", None, &rules).unwrap();
    engine.apply(change, &mut kernel).unwrap();
    kernel
}

/// A bpffs of the test's own, unmounted on drop.
struct Bpffs(tempfile::TempDir);

impl Bpffs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.path()).status().unwrap().success();
        assert!(ok, "mounting bpffs (needs root)");
        Bpffs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[test]
fn a_tls_flow_blocked_before_an_upgrade_stays_blocked_after_it() {
    let fs = Bpffs::new();
    let pins = PinDir::create(fs.path().join("blokir")).unwrap();
    let hello = client_hello("www.blocked.example");
    // The name is in the second segment: a segment that cannot start a
    // hello never starts a flow, so only the carried-over flow state can
    // block its retransmission.
    let cut = hello.len() - 8;
    let seq0 = 5_000_000u32;
    let first = tcp_frame(&hello[..cut], seq0);
    let second = tcp_frame(&hello[cut..], seq0 + cut as u32);
    let data = tcp_frame(&[23, 3, 3, 0, 2, 1, 2], seq0 + hello.len() as u32);

    let mut old = load(Some(&pins), &["*.blocked.example"]);
    assert_eq!(old.test_run(&first, 1).unwrap().0, XDP_PASS);
    // Blocked: the name segment goes on as a RST that closes the server's end.
    let (verdict, out, _) = old.test_run(&second, 1).unwrap();
    assert!(verdict == XDP_PASS && out != second && out.len() < second.len(), "the old program did not block the hello");
    let old_counters = old.counters().unwrap();

    // The upgrade: a new program with new rule maps (another hash secret) and
    // the pinned FLOWS and COUNTERS; the old one goes away.
    let mut new = load(Some(&pins), &["*.blocked.example"]);
    assert_eq!(new.adopted_maps(), ["FLOWS", "SYNS", "COUNTERS", "LIST_HITS", "QUIC_BLOCKED", "QUIC_BLOCKED_PORTS"]);
    drop(old);
    assert_eq!(new.test_run(&second, 1).unwrap().0, XDP_DROP, "the retransmitted name segment passed the new program");
    assert_eq!(new.test_run(&data, 1).unwrap().0, XDP_DROP, "later data of the blocked flow passed the new program");
    let counters = new.counters().unwrap();
    assert!(counters.iter().zip(&old_counters).all(|(n, o)| n >= o), "counters went back: {old_counters:?} -> {counters:?}");
    assert!(counters[filter_common::counters::PACKETS as usize] >= old_counters[filter_common::counters::PACKETS as usize] + 2);

    // Without the carried-over state the same segment passes: what the
    // pinned map is for.
    let mut fresh = load(None, &["*.blocked.example"]);
    assert_eq!(fresh.test_run(&second, 1).unwrap().0, XDP_PASS);
}

/// A QUIC datagram of flow 198.18.0.1:40000 -> 198.18.0.2:443 whose first
/// byte is `first` (0x43: a short header; 0xc3: a v1 Initial).
fn quic_frame(first: u8) -> Vec<u8> {
    let mut payload = vec![0u8; 1200];
    payload[0] = first;
    payload[1..5].copy_from_slice(&filter_common::quic::VERSION_1.to_be_bytes());
    payload[5] = 8;
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64).udp(40000, 443);
    let mut v = Vec::new();
    b.write(&mut v, &payload).unwrap();
    v
}

/// `load` with QUIC names read (`--quic read`, the daemon's default).
fn load_quic(pins: Option<&PinDir>) -> Kernel {
    let mut kernel = load(pins, &["*.blocked.example"]);
    let mut cfg = kernel.config();
    cfg.quic_policy = filter_common::quic::POLICY_READ;
    kernel.write_config(cfg).unwrap();
    kernel
}

/// A QUIC flow the daemon blocked mid-handshake (the client's Handshake
/// Finished not yet through) stays blocked after an upgrade, and the QUIC
/// share of its list's counts carries over with the kernel's.
#[test]
fn a_quic_flow_blocked_before_an_upgrade_stays_blocked_after_it() {
    let fs = Bpffs::new();
    let pins = PinDir::create(fs.path().join("blokir")).unwrap();
    let key = filter_common::tls::FlowKey {
        src: [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        dst: [198, 18, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        src_port: 40000,
        dst_port: 443,
        family: 4,
    };
    let (short, initial) = (quic_frame(0x43), quic_frame(0xc3));
    let list = 1u8;
    let rule = filter_common::rules::RuleRef::new(1, u32::from(list), false);

    let mut old = load_quic(Some(&pins));
    assert_eq!(old.test_run(&short, 1).unwrap().0, XDP_PASS);
    {
        let (_perf, mut verdicts) = old.take_quic().unwrap();
        verdicts.block(key, rule).unwrap();
        verdicts.count(rule, true);
    }
    assert_eq!(old.test_run(&short, 1).unwrap().0, XDP_DROP, "the old program let the blocked flow through");
    assert_eq!(old.list_hits(list).unwrap(), [1, 0]);

    let mut new = load_quic(Some(&pins));
    drop(old);
    assert!(new.adopted_maps().contains(&"QUIC_BLOCKED"), "{:?}", new.adopted_maps());
    assert_eq!(new.test_run(&short, 1).unwrap().0, XDP_DROP, "a short-header datagram of the blocked flow passed the new program");
    assert_eq!(new.test_run(&initial, 1).unwrap().0, XDP_DROP, "a retransmitted Initial of the blocked flow passed the new program");
    assert_eq!(new.list_hits(list).unwrap(), [1, 0], "the QUIC block's count did not carry over");
    {
        let (_perf, mut verdicts) = new.take_quic().unwrap();
        verdicts.count(rule, true);
    }
    assert_eq!(new.list_hits(list).unwrap(), [2, 0]);
    new.reset_list_hits(list).unwrap();
    assert_eq!(new.list_hits(list).unwrap(), [0, 0], "a list taking a freed id starts from zero");

    // Without the carried-over state the flow passes: what the pinned map
    // is for.
    let mut fresh = load_quic(None);
    assert_eq!(fresh.test_run(&short, 1).unwrap().0, XDP_PASS);
}

/// Counts the bytes one connection brings to 198.18.1.1:8443, into a file.
const COUNTING_SERVER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.18.1.1", 8443)); s.listen()
c, _ = s.accept(); n = 0
while True:
    d = c.recv(65536)
    if not d: break
    n += len(d)
    with open(sys.argv[1], "w") as f: f.write(str(n))
"#;

/// Sends a hello in two segments (the name in the second), the second once
/// the file `argv[3]` exists, then holds the connection.
const TWO_SEGMENT_CLIENT: &str = r#"
import os, socket, sys, time
h = bytes.fromhex(sys.argv[1]); cut = int(sys.argv[2])
for _ in range(100):
    try:
        c = socket.create_connection(("198.18.1.1", 8443), timeout=1); break
    except OSError: time.sleep(0.05)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.send(h[:cut])
while not os.path.exists(sys.argv[3]): time.sleep(0.02)
c.send(h[cut:]); print("sent", flush=True)
time.sleep(60)
"#;

/// Starts a two-segment hello, SIGKILLs and restarts the daemon between its
/// segments, then lets the name segment go; returns the bytes the server
/// got. `forget_flows` removes the pinned flow state before the restart
/// (the control: what a restart without it would let through).
fn hello_across_a_restart(forget_flows: bool) -> (usize, usize) {
    let topo = Topology::new().unwrap();
    let rules = write(&topo, "tls.rules", "*.blocked.example\n");
    let d = topo.start_daemon_as_given(std::slice::from_ref(&rules), &[]).unwrap();
    let count = topo.dir().join("received");
    let go = topo.dir().join("go");
    let _server = blokir_tests::netns::start(topo.exec(topo.resolver(), "python3").args(["-c", COUNTING_SERVER]).arg(&count)).unwrap();
    let hello = client_hello("www.blocked.example");
    let cut = hello.len() - 8;
    let hex: String = hello.iter().map(|b| format!("{b:02x}")).collect();
    let _client = blokir_tests::netns::start(topo.exec(topo.client(), "python3").args(["-c", TWO_SEGMENT_CLIENT, &hex, &cut.to_string()]).arg(&go)).unwrap();
    let received = || std::fs::read_to_string(&count).ok().and_then(|s| s.parse::<usize>().ok());
    let deadline = Instant::now() + Duration::from_secs(10);
    while received() != Some(cut) {
        assert!(Instant::now() < deadline, "the first segment ({cut} bytes) never reached the server: {:?}", received());
        thread::sleep(Duration::from_millis(20));
    }
    // The hello is half read: its state is in the pinned flow map.
    d.kill().unwrap();
    if forget_flows {
        std::fs::remove_file(topo.pin_dir().join(format!("maps/v{}/FLOWS", blokir::pin::LAYOUT))).unwrap();
    }
    let d = topo.start_daemon_as_given(std::slice::from_ref(&rules), &[]).unwrap();
    assert_eq!(status(&d)["adopted_maps"].as_array().unwrap().contains(&"FLOWS".into()), !forget_flows);
    std::fs::write(&go, "").unwrap();
    // The name segment, and its retransmissions if it is blocked.
    thread::sleep(Duration::from_secs(2));
    let got = received().unwrap_or(0);
    eprintln!("forget_flows={forget_flows}: the server got {got} of {} bytes", hello.len());
    d.stop().unwrap();
    let out = topo.blokir_cli(&["cleanup", "--pin-dir", topo.pin_dir().to_str().unwrap()]).unwrap();
    assert!(out.success(), "{out}");
    (got, cut)
}

#[test]
fn a_tls_hello_half_read_before_a_restart_is_blocked_after_it_end_to_end() {
    let (got, cut) = hello_across_a_restart(false);
    assert_eq!(got, cut, "the segment with the blocked name reached the server after the restart");
    // The control: without the carried-over flow state, the name segment
    // starts no flow and passes.
    let (got, cut) = hello_across_a_restart(true);
    assert!(got > cut, "without the pinned flow state the name segment should have passed (the server got {got} bytes)");
}

/// Pins on a bpffs mounted only in the daemon's own mount namespace (here
/// by a wrapper under `ip netns exec`) die with it: `status` and /readyz
/// say so, where an operator looks.
#[test]
fn pins_that_would_die_with_the_daemon_are_reported_as_such() {
    let topo = Topology::new().unwrap();
    let private = topo.dir().join("private-bpf");
    std::fs::create_dir_all(&private).unwrap();
    let cmd = topo.daemon_command_default_pins(&[]).unwrap();
    // The same daemon command, behind a wrapper that mounts its own bpffs.
    let program = cmd.get_program().to_string_lossy().into_owned();
    let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    // `netns exec EDGE`, then the daemon's own.
    let (ip_exec, daemon) = args.split_at(3);
    let script = format!("mount -t bpf bpf {0} && exec \"$@\" --pin-dir {0}/blokir --cleanup", private.display());
    let mut wrapped = std::process::Command::new(&program);
    wrapped.args(ip_exec).args(["sh", "-c", &script, "sh"]).args(daemon);
    let log = topo.dir().join("private.log");
    let file = std::fs::File::create(&log).unwrap();
    // `ip netns exec` and the wrapper exec the daemon: it keeps this pid.
    let mut child = wrapped.stdin(std::process::Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap();
    let started = Instant::now();
    let s = loop {
        let out = topo.blokir_cli(&["status", "--output", "json"]).unwrap();
        if out.success() {
            break serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the daemon did not start: {out}\n{}", std::fs::read_to_string(&log).unwrap());
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(s["pins_outlive_daemon"], false, "{s}");
    assert!(s["pins"].as_str().is_some_and(|p| p.contains("they die with the daemon")), "{s}");
    let table = topo.blokir_cli(&["status"]).unwrap();
    assert!(table.stdout.contains("they die with the daemon and the program detaches"), "{table}");
    let readyz = topo.run_in(topo.edge(), &["curl", "-sS", &format!("http://{}/readyz", blokir_tests::netns::METRICS_ADDR)], Duration::from_secs(10)).unwrap();
    assert!(readyz.stdout.starts_with("ready\n") && readyz.stdout.contains("they die with the daemon"), "{readyz}");
    blokir_tests::netns::send_signal(child.id(), "TERM").unwrap();
    assert!(child.wait().unwrap().success(), "{}", std::fs::read_to_string(&log).unwrap());
}
