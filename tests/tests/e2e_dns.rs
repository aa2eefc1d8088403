//! End to end, the way a user sees it: real `dig` in a client namespace,
//! through an edge router where `blokir run` has attached the XDP program to
//! the client-facing interface, to a real dnsmasq in a resolver namespace.
//! A blocked query gets no answer (dig gives up after its one 1 s try); an
//! unlisted one resolves. See `blokir_tests::netns` for the network.
//!
//! Dropped queries cost dig's 1 s timeout each, so they are sent in parallel
//! batches. Run as root, serially:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test e2e_dns -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use blokir_tests::netns::{Answer, Daemon, Family, Metrics, Query, TELEGRAM_NAMES, Topology, Transport, UNLISTED_NAMES, telegram_rules};

const ALL: [(Transport, Family); 4] = [(Transport::Udp, Family::V4), (Transport::Udp, Family::V6), (Transport::Tcp, Family::V4), (Transport::Tcp, Family::V6)];

/// What the client sent while one daemon ran: every dig run puts exactly one
/// query on the wire (`+tries=1`, and the client's TCP never retransmits).
#[derive(Default)]
struct Tally {
    sent: BTreeMap<(Transport, Family), u64>,
    blocked: BTreeMap<(Transport, Family), u64>,
}

impl Tally {
    /// Runs `queries` at once; each must be dropped (dig times out).
    #[track_caller]
    fn blocked(&mut self, topo: &Topology, queries: &[Query]) -> Vec<Answer> {
        self.run(topo, queries, &vec![true; queries.len()])
    }

    /// Runs `queries` at once; each must resolve to the served address.
    #[track_caller]
    fn resolved(&mut self, topo: &Topology, queries: &[Query]) -> Vec<Answer> {
        self.run(topo, queries, &vec![false; queries.len()])
    }

    /// Runs `queries` at once; `blocked[i]` says what query `i` must get.
    #[track_caller]
    fn run(&mut self, topo: &Topology, queries: &[Query], blocked: &[bool]) -> Vec<Answer> {
        let answers = topo.dig_all(queries).expect("running dig in the client namespace");
        for (a, &b) in answers.iter().zip(blocked) {
            let key = (a.query.transport, a.query.family);
            *self.sent.entry(key).or_default() += 1;
            if b {
                assert!(a.timed_out(), "expected {} to be blocked (dig timing out), got:\n{a}", a.query);
                *self.blocked.entry(key).or_default() += 1;
            } else {
                assert!(a.resolved_to_expected(), "expected {} to resolve to {:?}, got:\n{a}", a.query, a.query.expected());
            }
        }
        answers
    }

    fn total_blocked(&self) -> u64 {
        self.blocked.values().sum()
    }

    /// blokir_blocked_total equals what was blocked, per protocol and
    /// family; blokir_inspected_total is at least what was sent.
    #[track_caller]
    fn check(&self, m: &Metrics) {
        for (t, f) in ALL {
            let labels = [("proto", t.label()), ("af", f.label())];
            let blocked = m.value("blokir_blocked_total", &labels).unwrap_or_else(|| panic!("no blokir_blocked_total{labels:?} in\n{}", m.text));
            let want = self.blocked.get(&(t, f)).copied().unwrap_or(0);
            assert_eq!(blocked, want, "blokir_blocked_total{labels:?}: the client sent {want} queries that were dropped\n{}", m.lines_of("blokir_").join("\n"));
            let inspected = m.value("blokir_inspected_total", &labels).unwrap_or_else(|| panic!("no blokir_inspected_total{labels:?} in\n{}", m.text));
            let sent = self.sent.get(&(t, f)).copied().unwrap_or(0);
            assert!(inspected >= sent, "blokir_inspected_total{labels:?} is {inspected}, but the client sent {sent} queries");
        }
    }
}

fn queries(names: &[&str], t: Transport, f: Family) -> Vec<Query> {
    names.iter().map(|n| Query::new(n, t, f)).collect()
}

/// Writes the Telegram list to `telegram.rules` (list `telegram`).
fn telegram_file(topo: &Topology) -> PathBuf {
    let path = topo.dir().join("telegram.rules");
    std::fs::write(&path, telegram_rules()).unwrap();
    path
}

fn start(topo: &Topology, rules: &[PathBuf]) -> Daemon {
    let d = topo.start_daemon(rules).expect("starting blokir in the edge namespace");
    assert!(topo.xdp_attached().unwrap(), "blokir reported ready but no XDP program is on the edge's interface");
    d
}

#[track_caller]
fn stop(topo: &Topology, d: Daemon) {
    d.stop().expect("blokir stops cleanly on SIGTERM");
    assert!(!topo.xdp_attached().unwrap(), "the XDP program is still attached after blokir exited");
}

#[track_caller]
fn cli_ok(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args).unwrap();
    assert!(out.success(), "blokir {args:?} failed:\n{out}");
    out.stdout
}

#[test]
fn telegram_names_are_blocked_over_udp_and_tcp_on_ipv4_and_ipv6_and_counted_exactly() {
    let topo = Topology::new().unwrap();
    let rules = telegram_file(&topo);
    let before = topo.client_snmp().unwrap();
    let daemon = start(&topo, &[rules]);
    let mut tally = Tally::default();

    // Unlisted names resolve over every transport (including the names under
    // a listed one: the rules are exact).
    for (t, f) in ALL {
        tally.resolved(&topo, &queries(&UNLISTED_NAMES, t, f));
    }
    // Every listed name is dropped over every transport; the first batch also
    // carries mixed-case spellings, which must be blocked too.
    let started = Instant::now();
    for (i, (t, f)) in ALL.into_iter().enumerate() {
        let mut batch = queries(&TELEGRAM_NAMES, t, f);
        if i == 0 {
            batch.push(Query::new("WeB.TeLeGrAm.OrG", Transport::Udp, Family::V4));
            batch.push(Query::new("T.ME.", Transport::Tcp, Family::V6));
        }
        tally.blocked(&topo, &batch);
    }
    eprintln!("{} blocked queries in {:?}", tally.total_blocked(), started.elapsed());

    // The resolver never saw a listed name, and saw every unlisted one.
    let seen = topo.resolver_queries();
    for name in TELEGRAM_NAMES {
        assert!(!seen.iter().any(|s| s == name), "the resolver got a query for {name}:\n{}", topo.resolver_log());
    }
    for name in UNLISTED_NAMES {
        assert_eq!(seen.iter().filter(|s| *s == name).count(), 4, "the resolver should have got 4 queries for {name}:\n{}", topo.resolver_log());
    }

    // One dig run, one query on the wire: the client's kernel agrees.
    let after = topo.client_snmp().unwrap();
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    assert_eq!(delta("Tcp.RetransSegs"), 0, "the client retransmitted TCP segments: the counts below would not be exact");
    assert_eq!(delta("Udp.OutDatagrams"), tally.sent[&(Transport::Udp, Family::V4)]);
    assert_eq!(delta("Udp6OutDatagrams"), tally.sent[&(Transport::Udp, Family::V6)]);

    let m = daemon.metrics().unwrap();
    tally.check(&m);
    assert_eq!(m.value("blokir_list_blocked_total", &[("list", "telegram")]), Some(tally.total_blocked()));
    assert_eq!(m.value("blokir_list_blocked_total", &[("list", "local")]), Some(0));
    // t.me: 4 transports plus `T.ME.`; web.telegram.org: 4 plus the mixed case.
    assert_eq!(m.value("blokir_rule_hits_total", &[("list", "telegram"), ("rule", "t.me")]), Some(5), "{}", m.lines_of("blokir_rule_hits").join("\n"));
    assert_eq!(m.value("blokir_rule_hits_total", &[("list", "telegram"), ("rule", "web.telegram.org")]), Some(5));
    assert_eq!(m.value("blokir_rule_hits_total", &[("list", "telegram"), ("rule", "telegram.me")]), Some(4));
    assert_eq!(m.value("blokir_list_rules", &[("list", "telegram")]), Some(11));

    // SIGTERM detaches the program, and the names resolve again.
    stop(&topo, daemon);
    let a = topo.dig(&Query::udp4("t.me")).unwrap();
    assert!(a.resolved_to_expected(), "t.me should resolve once blokir is stopped:\n{a}");
}

#[test]
fn rules_added_live_are_enforced_at_once_and_del_lifts_them() {
    let topo = Topology::new().unwrap();
    let daemon = start(&topo, &[telegram_file(&topo)]);
    let mut tally = Tally::default();
    tally.resolved(&topo, &[Query::udp4("www.example.test"), Query::tcp6("mail.example.test")]);

    let t0 = Instant::now();
    let out = cli_ok(&daemon, &["rules", "add", "*.example.test"]);
    let cli = t0.elapsed();
    assert!(out.contains("added: *.example.test") && out.contains("enforced in"), "{out}");
    // The very next queries are dropped; the apex is not below itself.
    tally.run(&topo, &[Query::udp4("www.example.test"), Query::tcp6("mail.example.test"), Query::udp6("example.test")], &[true, true, false]);
    assert!(cli < Duration::from_secs(1), "`blokir rules add` took {cli:?}");
    eprintln!("`blokir rules add` returned, rule enforced, in {cli:?}: {}", out.trim());

    // `rules check` names the rule and its list.
    let out = cli_ok(&daemon, &["rules", "check", "www.example.test", "WEB.telegram.org", "example.test"]);
    assert!(out.contains("www.example.test: blocked by `*.example.test` (list local)"), "{out}");
    assert!(out.contains("web.telegram.org: blocked by `web.telegram.org` (list telegram)"), "{out}");
    assert!(out.contains("example.test: passed (no rule)"), "{out}");
    let out = cli_ok(&daemon, &["rules", "list"]);
    assert!(out.lines().any(|l| l.split_whitespace().take(2).eq(["local", "*.example.test"])), "{out}");

    let m = daemon.metrics().unwrap();
    tally.check(&m);
    assert_eq!(m.value("blokir_list_blocked_total", &[("list", "local")]), Some(2));
    assert_eq!(m.value("blokir_rule_hits_total", &[("list", "local"), ("rule", "*.example.test")]), Some(2));

    let out = cli_ok(&daemon, &["rules", "del", "*.example.test"]);
    assert!(out.contains("removed: *.example.test"), "{out}");
    tally.resolved(&topo, &[Query::udp4("www.example.test"), Query::tcp6("mail.example.test")]);
    // Deleting a rule that is not there, or one from a rules file, is refused.
    let out = daemon.cli(&["rules", "del", "*.example.test"]).unwrap();
    assert!(!out.success() && out.stderr.contains("not in the local list"), "{out}");
    let out = daemon.cli(&["rules", "del", "t.me"]).unwrap();
    assert!(!out.success() && out.stderr.contains("list telegram") && out.stderr.contains("rules reload"), "{out}");

    tally.check(&daemon.metrics().unwrap());
    stop(&topo, daemon);
}

#[test]
fn local_rules_survive_a_daemon_restart() {
    let topo = Topology::new().unwrap();
    let rules = telegram_file(&topo);
    let daemon = start(&topo, std::slice::from_ref(&rules));
    cli_ok(&daemon, &["rules", "add", "*.example.test"]);
    cli_ok(&daemon, &["rules", "add", "--allow", "web.telegram.org"]);
    stop(&topo, daemon);
    let saved = std::fs::read_to_string(topo.state_dir().join("local.rules")).unwrap();
    assert!(saved.contains("*.example.test") && saved.contains("allow web.telegram.org"), "{saved}");

    let daemon = start(&topo, &[rules]);
    let out = cli_ok(&daemon, &["rules", "list"]);
    for rule in [["local", "*.example.test"], ["local", "allow"]] {
        assert!(out.lines().any(|l| l.split_whitespace().take(2).eq(rule)), "{rule:?} missing after the restart:\n{out}");
    }
    let mut tally = Tally::default();
    // The local block rule, the file's rules, and the allow rule that wins
    // over the file's block rule all hold after the restart.
    tally.run(&topo, &[Query::udp4("www.example.test"), Query::tcp4("t.me"), Query::udp4("web.telegram.org")], &[true, true, false]);
    let m = daemon.metrics().unwrap();
    tally.check(&m);
    assert_eq!(m.value("blokir_allow_rule_hits_total", &[("proto", "dns_udp"), ("af", "ipv4")]), Some(1));
    assert_eq!(m.value("blokir_list_allowed_total", &[("list", "local")]), Some(1));
    stop(&topo, daemon);
}

#[test]
fn reload_with_a_bad_line_is_refused_and_the_old_rules_stay() {
    let topo = Topology::new().unwrap();
    let path = telegram_file(&topo);
    let daemon = start(&topo, std::slice::from_ref(&path));
    let mut tally = Tally::default();

    // The new file drops t.me, adds www.example.test, and has a bad line.
    let good: String = TELEGRAM_NAMES[1..].iter().map(|n| format!("{n}\n")).collect::<String>() + "www.example.test\n";
    let bad_line = good.lines().count() + 2;
    std::fs::write(&path, format!("{good}# a comment\nweb..telegram.org\n")).unwrap();
    let out = daemon.cli(&["rules", "reload"]).unwrap();
    assert!(!out.success(), "a reload with a bad line must fail:\n{out}");
    let want = format!("{}:{bad_line}: empty label", path.display());
    assert!(out.stderr.contains(&want), "expected `{want}` in:\n{out}");
    // Nothing changed: t.me still blocked, www.example.test still resolves.
    tally.run(&topo, &[Query::udp4("t.me"), Query::udp4("www.example.test")], &[true, false]);

    std::fs::write(&path, &good).unwrap();
    let out = cli_ok(&daemon, &["rules", "reload"]);
    assert!(out.contains("list telegram: 1 added, 1 removed, 10 unchanged"), "{out}");
    tally.run(&topo, &[Query::udp6("t.me"), Query::udp6("www.example.test")], &[false, true]);
    tally.check(&daemon.metrics().unwrap());
    stop(&topo, daemon);
}

#[test]
fn daemon_refuses_to_start_on_a_bad_rules_file() {
    let topo = Topology::new().unwrap();
    let path = topo.dir().join("broken.rules");
    std::fs::write(&path, "t.me\ntelegram.org\nweb.*.telegram.org\n\ncore telegram.org\n").unwrap();
    let out = blokir_tests::netns::run(&mut topo.daemon_command(std::slice::from_ref(&path)).unwrap(), Duration::from_secs(15)).unwrap();
    assert!(!out.success(), "blokir must refuse a bad rules file:\n{out}");
    for want in [format!("{}:3: `*` is only allowed", path.display()), format!("{}:5: unknown action \"core\"", path.display())] {
        assert!(out.stderr.contains(&want), "expected `{want}` in:\n{out}");
    }
    assert!(!topo.xdp_attached().unwrap(), "a refused start must not leave the program attached");
    let a = topo.dig(&Query::udp4("t.me")).unwrap();
    assert!(a.resolved_to_expected(), "{a}");
}
