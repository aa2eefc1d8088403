//! Answers built in XDP, end to end, the way a user sees them: real `dig`,
//! glibc's resolver (`getent`) and `curl` in the client namespace, through
//! the edge where `blokir run` answers blocked queries with NXDOMAIN,
//! REFUSED, NODATA or a block page's address, to a real dnsmasq that must
//! never see a blocked query. See `blokir_tests::netns` for the network.
//!
//! An answered query comes back at once (a dropped one would cost dig its
//! whole timeout). Every dig run puts exactly one UDP query on the wire, so
//! `blokir_dns_actions_total` must equal what the client sent, which the
//! client's own kernel counters confirm.
//!
//! blokir runs in native XDP mode (the default on a NIC) except for the
//! per-list test, which runs in generic mode; for native `XDP_TX` to reach
//! the client over veth, the client's end gets a no-op XDP program
//! (`ClientWire`). Run as root, serially:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test e2e_answers -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use blokir_tests::{
    netns::{
        self, Captured, Daemon, Metrics, Query, RESOLVER_IFACE, RESOLVER4, RESOLVER6, Running, TELEGRAM_NAMES, Topology, UNLISTED_NAMES, address_of,
        telegram_rules,
    },
    noop,
};

/// A dig run that gets an answer from blokir, `ip netns exec` and dig's
/// start-up included, takes well under this (about 30 ms when the machine is
/// idle); a dropped query would take dig's whole 2 s timeout.
const FAST: Duration = Duration::from_millis(750);
/// dig's own measure of the round trip (`;; Query time: N msec`).
const FAST_QUERY_MS: u64 = 100;
const PAGE4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 80);
const PAGE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x80);
/// What the block page says; curl must print it.
const PAGE_TEXT: &str = "blokir test block page: this name is blocked";

// ---------------------------------------------------------------------------
// dig, read the way a person reads it

/// One record line of a section: `web.telegram.org. 120 IN A 198.18.1.80`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    name: String,
    ttl: u32,
    class: String,
    rtype: String,
    data: String,
}

/// What one dig run printed.
#[derive(Debug)]
struct Dig {
    out: Captured,
    status: Option<String>,
    flags: Vec<String>,
    /// QUERY, ANSWER, AUTHORITY, ADDITIONAL.
    counts: BTreeMap<String, u32>,
    /// The OPT pseudosection's EDNS line, when there is one.
    edns: Option<String>,
    question: Vec<String>,
    answers: Vec<Record>,
    /// `;; MSG SIZE  rcvd: N`.
    size: Option<usize>,
    /// `;; SERVER: ADDR#53(ADDR) (UDP)`.
    server: Option<String>,
    /// `;; Query time: N msec`.
    query_ms: Option<u64>,
}

impl Dig {
    fn parse(out: Captured) -> Self {
        let text = out.stdout.clone();
        let after = |prefix: &str| text.lines().find_map(|l| l.strip_prefix(prefix)).map(str::trim);
        let status = text.split_once("status: ").and_then(|(_, r)| r.split([',', ' ']).next()).map(str::to_string);
        let mut flags = Vec::new();
        let mut counts = BTreeMap::new();
        if let Some(line) = after(";; flags:") {
            let (f, c) = line.split_once(';').unwrap_or((line, ""));
            flags = f.split_whitespace().map(str::to_string).collect();
            for part in c.split(',') {
                if let Some((k, v)) = part.split_once(':')
                    && let Ok(v) = v.trim().parse()
                {
                    counts.insert(k.trim().to_string(), v);
                }
            }
        }
        let mut section = "";
        let (mut question, mut answers) = (Vec::new(), Vec::new());
        let mut edns = None;
        for line in text.lines() {
            if let Some(s) = line.strip_prefix(";; ").and_then(|s| s.strip_suffix(':')) {
                section = if s.ends_with("SECTION") || s.ends_with("PSEUDOSECTION") { s } else { "" };
                continue;
            }
            if line.trim().is_empty() {
                section = "";
                continue;
            }
            match section {
                "OPT PSEUDOSECTION" if line.starts_with("; EDNS:") => edns = Some(line.trim_start_matches("; ").to_string()),
                "QUESTION SECTION" => question.push(line.trim_start_matches(';').split_whitespace().collect::<Vec<_>>().join(" ")),
                "ANSWER SECTION" => {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    if let [name, ttl, class, rtype, ref data @ ..] = f[..]
                        && let Ok(ttl) = ttl.parse()
                    {
                        answers.push(Record { name: name.into(), ttl, class: class.into(), rtype: rtype.into(), data: data.join(" ") });
                    }
                }
                _ => {}
            }
        }
        let size = after(";; MSG SIZE  rcvd:").and_then(|s| s.parse().ok());
        let server = after(";; SERVER:").map(str::to_string);
        let query_ms = after(";; Query time:").and_then(|s| s.strip_suffix("msec")?.trim().parse().ok());
        Dig { out, status, flags, counts, edns, question, answers, size, server, query_ms }
    }

    fn count(&self, section: &str) -> Option<u32> {
        self.counts.get(section).copied()
    }

    /// No response: dig gave up after its one try.
    fn timed_out(&self) -> bool {
        self.out.code() == Some(9) && self.out.stdout.contains("no servers could be reached")
    }
}

impl std::fmt::Display for Dig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.out)
    }
}

/// `dig +tries=1 +time=2 ARGS` from the client.
fn dig(topo: &Topology, args: &[&str]) -> Dig {
    let mut cmd = topo.exec(topo.client(), "dig");
    cmd.args(["+tries=1", "+time=2"]).args(args);
    Dig::parse(netns::run(&mut cmd, Duration::from_secs(10)).expect("running dig in the client namespace"))
}

/// Length of `name` in DNS wire form.
fn wire_len(name: &str) -> usize {
    name.trim_end_matches('.').split('.').map(|l| l.len() + 1).sum::<usize>() + 1
}

/// What an answer built by blokir looks like to dig: a quick, clean response
/// from the server asked, `qr aa rd ra`, the question echoed as asked, an OPT
/// record (UDP size 1232) exactly when the query had one, `status`, and
/// `answer_rdata` bytes of answer data (0: no answer record). The message
/// size dig reports is exactly that: nothing more in the datagram.
#[track_caller]
fn assert_answered(d: &Dig, server: IpAddr, name: &str, qtype: &str, status: &str, edns: bool, answer_rdata: usize) {
    assert!(d.out.success(), "dig failed:\n{d}");
    assert!(d.query_ms.is_some_and(|ms| ms <= FAST_QUERY_MS), "the answer took {:?} ms by dig's measure:\n{d}", d.query_ms);
    assert!(d.out.elapsed < FAST, "the dig run took {:?} (a dropped query would take the whole timeout):\n{d}", d.out.elapsed);
    let all = format!("{}{}", d.out.stdout, d.out.stderr).to_ascii_lowercase();
    for bad in ["warning", "malformed", "mismatch", "trailing", "formerr"] {
        assert!(!all.contains(bad), "dig complains ({bad}):\n{d}");
    }
    assert_eq!(d.status.as_deref(), Some(status), "status:\n{d}");
    assert_eq!(d.flags, ["qr", "aa", "rd", "ra"], "flags:\n{d}");
    assert_eq!(d.server.as_deref(), Some(format!("{server}#53({server}) (UDP)").as_str()), "the answer must come from the server asked:\n{d}");
    assert_eq!(d.question, [format!("{}. IN {qtype}", name.trim_end_matches('.'))], "the question must be echoed as asked:\n{d}");
    let want = [("QUERY", 1), ("ANSWER", u32::from(answer_rdata > 0)), ("AUTHORITY", 0), ("ADDITIONAL", u32::from(edns))];
    for (section, n) in want {
        assert_eq!(d.count(section), Some(n), "{section} count:\n{d}");
    }
    if edns {
        assert_eq!(d.edns.as_deref(), Some("EDNS: version: 0, flags:; udp: 1232"), "the OPT record:\n{d}");
    } else {
        assert_eq!(d.edns, None, "an OPT record in the answer to a query without one:\n{d}");
    }
    let size = 12 + wire_len(name) + 4 + if answer_rdata > 0 { 12 + answer_rdata } else { 0 } + if edns { 11 } else { 0 };
    assert_eq!(d.size, Some(size), "message size:\n{d}");
}

// ---------------------------------------------------------------------------
// The client's wire

/// A no-op XDP program (`return XDP_PASS`) attached in native mode to the
/// client's interface, for as long as this lives.
///
/// The veth driver hands a frame sent with `XDP_TX` on one end (the edge's
/// `c0`, where blokir runs in native mode) to the peer (the client's `eth0`)
/// only when the peer runs an XDP program in native mode: otherwise the frame
/// is dropped (`rx_queue_0_xdp_tx_errors` in `ethtool -S c0`) or, with GRO on
/// the peer, queued but never delivered (seen on Linux 6.18). A NIC puts it
/// on the wire; this makes the veth pair behave like one. (Generic XDP needs
/// nothing: its `XDP_TX` goes through the device's normal transmit path.)
struct ClientWire {
    _link: OwnedFd,
}

impl ClientWire {
    fn attach(topo: &Topology) -> Self {
        let ns = Path::new("/run/netns").join(topo.client());
        // The interface is looked up in the thread's network namespace: a
        // thread of its own enters the client's.
        let link = thread::spawn(move || -> std::io::Result<OwnedFd> {
            let ns = std::fs::File::open(&ns)?;
            // SAFETY: plain system calls on valid arguments; the thread ends
            // right after (setns changes only this thread's namespace).
            unsafe {
                if noop::setns(ns.as_raw_fd(), noop::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ifindex = noop::if_nametoindex(c"eth0".as_ptr());
                if ifindex == 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let prog = noop::load_xdp_pass()?;
                noop::xdp_link(&prog, ifindex)
            }
        })
        .join()
        .expect("the attaching thread panicked")
        .expect("attaching a no-op XDP program to the client's interface");
        let wire = ClientWire { _link: link };
        let out = topo.run_in(topo.client(), &["ip", "link", "show", netns::CLIENT_IFACE], Duration::from_secs(5)).unwrap();
        assert!(out.stdout.split_whitespace().any(|w| w == "xdp"), "no native XDP program on the client's interface:\n{out}");
        wire
    }
}

/// `ethtool -S c0` in the edge: the veth driver's XDP counters.
fn edge_xdp_stats(topo: &Topology) -> BTreeMap<String, u64> {
    let out = topo.run_in(topo.edge(), &["ethtool", "-S", netns::EDGE_CLIENT_IFACE], Duration::from_secs(5)).unwrap();
    out.stdout.lines().filter_map(|l| l.trim().split_once(": ")).filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?))).collect()
}

// ---------------------------------------------------------------------------
// The daemon and what it counts

fn rules_file(topo: &Topology, list: &str, text: &str) -> PathBuf {
    let path = topo.dir().join(format!("{list}.rules"));
    std::fs::write(&path, text).unwrap();
    path
}

fn start(topo: &Topology, rules: &[PathBuf], options: &[&str]) -> Daemon {
    let d = topo.start_daemon_with(rules, options).expect("starting blokir in the edge namespace");
    assert!(topo.xdp_attached().unwrap(), "blokir reported ready but no XDP program is on the edge's interface");
    d
}

#[track_caller]
fn cli_ok(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args).unwrap();
    assert!(out.success(), "blokir {args:?} failed:\n{out}");
    out.stdout
}

/// `blokir_dns_actions_total` for each action: exactly `want` (actions not
/// named: 0), no fallbacks, and every blocked query counted by one action.
#[track_caller]
fn assert_actions(m: &Metrics, want: &[(&str, u64)]) {
    assert_actions_and_fallbacks(m, want, 0);
}

/// `assert_actions`, with `failed` answers that could not be built (and
/// were dropped).
#[track_caller]
fn assert_actions_and_fallbacks(m: &Metrics, want: &[(&str, u64)], failed: u64) {
    let lines = m.lines_of("blokir_dns_").join("\n");
    for action in ["drop", "nxdomain", "refused", "nodata", "redirect"] {
        let n = want.iter().find(|(a, _)| *a == action).map_or(0, |(_, n)| *n);
        assert_eq!(m.value("blokir_dns_actions_total", &[("action", action)]), Some(n), "blokir_dns_actions_total{{action={action:?}}}:\n{lines}");
    }
    for (reason, n) in [("not_plain", 0), ("failed", failed)] {
        assert_eq!(m.value("blokir_dns_answer_fallbacks_total", &[("reason", reason)]), Some(n), "{lines}");
    }
    let blocked: u64 = m.samples().iter().filter(|(n, _, _)| n == "blokir_blocked_total").map(|(_, _, v)| *v as u64).sum();
    assert_eq!(blocked, want.iter().map(|(_, n)| n).sum::<u64>(), "blokir_blocked_total against the actions:\n{}", m.lines_of("blokir_").join("\n"));
}

/// The client's kernel counters, to confirm what the client sent and got.
struct Snmp(BTreeMap<String, u64>);

impl Snmp {
    fn now(topo: &Topology) -> Self {
        Snmp(topo.client_snmp().unwrap())
    }

    /// `key` now minus `key` in `before`.
    fn since(topo: &Topology, before: &Snmp, key: &str) -> u64 {
        let now = Snmp::now(topo);
        now.0.get(key).copied().unwrap_or(0) - before.0.get(key).copied().unwrap_or(0)
    }

    /// UDP datagrams the client sent (IPv4 and IPv6) since `self`.
    fn udp_sent_since(&self, topo: &Topology) -> u64 {
        let now = Snmp::now(topo);
        ["Udp.OutDatagrams", "Udp6OutDatagrams"].iter().map(|k| now.0.get(*k).copied().unwrap_or(0) - self.0.get(*k).copied().unwrap_or(0)).sum()
    }
}

/// None of `names` reached the resolver (in any letter case).
#[track_caller]
fn assert_resolver_never_saw(topo: &Topology, names: &[&str]) {
    let seen = topo.resolver_queries();
    for name in names {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        assert!(!seen.contains(&name), "the resolver got a query for {name}:\n{}", topo.resolver_log());
    }
}

// ---------------------------------------------------------------------------
// 1. NXDOMAIN

#[test]
fn nxdomain_answers_come_at_once_over_ipv4_and_ipv6_and_never_reach_the_resolver() {
    let topo = Topology::new().unwrap();
    let _wire = ClientWire::attach(&topo);
    let rules = rules_file(&topo, "telegram", &telegram_rules());
    let before = Snmp::now(&topo);
    let daemon = start(&topo, &[rules], &["--dns-action", "nxdomain", "--mode", "native"]);
    let (v4, v6) = (IpAddr::from(RESOLVER4), IpAddr::from(RESOLVER6));
    let (s4, s6) = (format!("@{v4}"), format!("@{v6}"));
    let mut answered = [0u64; 2];

    // Unlisted names still resolve through dnsmasq, over both families.
    let unlisted: Vec<Query> = UNLISTED_NAMES.iter().flat_map(|n| [Query::udp4(n), Query::udp6(n)]).collect();
    for a in topo.dig_all(&unlisted).unwrap() {
        assert!(a.resolved_to_expected(), "an unlisted name must resolve as before:\n{a}");
    }
    let unlisted_sent = [UNLISTED_NAMES.len() as u64; 2];

    // Blocked: NXDOMAIN at once, with and without EDNS, over IPv4 and IPv6.
    for (server, s, qtype, af) in [(v4, &s4, "A", 0), (v6, &s6, "AAAA", 1)] {
        for edns in [true, false] {
            let d = dig(&topo, &[if edns { "+edns" } else { "+noedns" }, s, "web.telegram.org", qtype]);
            assert_answered(&d, server, "web.telegram.org", qtype, "NXDOMAIN", edns, 0);
            answered[af] += 1;
            eprintln!("{qtype} over {server} (EDNS {edns}): NXDOMAIN, dig ran {:?}, query time {:?} ms", d.out.elapsed, d.query_ms);
        }
    }
    // The query's RD is echoed (dig +nordflag: `qr aa ra`); its DO bit too.
    let d = dig(&topo, &["+nordflag", &s4, "t.me", "A"]);
    answered[0] += 1;
    assert!(d.out.success() && d.status.as_deref() == Some("NXDOMAIN"), "{d}");
    assert_eq!(d.flags, ["qr", "aa", "ra"], "RD must be echoed from the query:\n{d}");
    let d = dig(&topo, &["+dnssec", &s6, "telegram.org", "AAAA"]);
    answered[1] += 1;
    assert!(d.out.success() && d.status.as_deref() == Some("NXDOMAIN"), "{d}");
    assert_eq!(d.edns.as_deref(), Some("EDNS: version: 0, flags: do; udp: 1232"), "the DO bit must be echoed:\n{d}");
    // Resolvers randomize the case; the answer echoes it.
    let d = dig(&topo, &[&s4, "WeB.TeLeGrAm.OrG", "MX"]);
    answered[0] += 1;
    assert_answered(&d, v4, "WeB.TeLeGrAm.OrG", "MX", "NXDOMAIN", true, 0);

    // TCP/53 queries are still dropped (answering would need a TCP exchange).
    let d = dig(&topo, &["+tcp", "+time=1", &s4, "web.telegram.org", "A"]);
    topo.kill_client_tcp().unwrap();
    assert!(d.timed_out(), "a blocked TCP query must be dropped:\n{d}");

    assert_resolver_never_saw(&topo, &["web.telegram.org", "t.me", "telegram.org"]);
    let seen = topo.resolver_queries();
    for name in UNLISTED_NAMES {
        assert_eq!(seen.iter().filter(|s| *s == name).count(), 2, "the resolver should have got 2 queries for {name}:\n{}", topo.resolver_log());
    }

    // The client's kernel: one datagram out per dig run, one answer back for
    // each, none with a bad checksum.
    for (af, (out, inn, csum)) in
        [("Udp.OutDatagrams", "Udp.InDatagrams", "Udp.InCsumErrors"), ("Udp6OutDatagrams", "Udp6InDatagrams", "Udp6InCsumErrors")].into_iter().enumerate()
    {
        let sent = unlisted_sent[af] + answered[af];
        assert_eq!(Snmp::since(&topo, &before, out), sent, "{out}: the client sent one datagram per dig run");
        assert_eq!(Snmp::since(&topo, &before, inn), sent, "{inn}: the client got one answer per query");
        assert_eq!(Snmp::since(&topo, &before, csum), 0, "{csum}");
    }

    // The driver sent every answer back out (XDP_TX) and lost none.
    let total = answered.iter().sum::<u64>();
    let xdp = edge_xdp_stats(&topo);
    let sum = |suffix: &str| xdp.iter().filter(|(k, _)| k.ends_with(suffix)).map(|(_, v)| v).sum::<u64>();
    assert_eq!((sum("_xdp_tx"), sum("_xdp_tx_errors")), (total, 0), "XDP_TX frames sent and lost by the edge's veth driver: {xdp:?}");

    let m = daemon.metrics().unwrap();
    assert_actions(&m, &[("nxdomain", total), ("drop", 1)]);
    assert_eq!(m.value("blokir_blocked_total", &[("proto", "dns_udp"), ("af", "ipv4")]), Some(answered[0]));
    assert_eq!(m.value("blokir_blocked_total", &[("proto", "dns_udp"), ("af", "ipv6")]), Some(answered[1]));
    assert_eq!(m.value("blokir_list_blocked_total", &[("list", "telegram")]), Some(total + 1));
    let out = cli_ok(&daemon, &["status"]);
    assert!(out.lines().any(|l| l.starts_with("list telegram: 11 rules") && l.ends_with("blocked DNS queries: nxdomain")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("list local: 0 rules") && l.ends_with("blocked DNS queries: nxdomain")), "{out}");
    daemon.stop().expect("blokir stops cleanly on SIGTERM");
}

// ---------------------------------------------------------------------------
// 2. One action per list

#[test]
fn each_list_answers_with_its_own_action() {
    let topo = Topology::new().unwrap();
    let telegram = rules_file(&topo, "telegram", &telegram_rules());
    let ads = rules_file(&topo, "ads", "www.example.test\n");
    let misc = rules_file(&topo, "misc", "mail.example.test\n");
    // Generic XDP this time: its XDP_TX takes the device's transmit path.
    let options = [
        "--mode",
        "generic",
        "--dns-action",
        "nodata",
        "--list-dns-action",
        "telegram=nxdomain",
        "--list-dns-action",
        "ads=refused",
        "--list-dns-action",
        "local=drop",
    ];
    let daemon = start(&topo, &[telegram.clone(), ads.clone(), misc.clone()], &options);
    let out = cli_ok(&daemon, &["rules", "add", "my.telegram.org"]);
    assert!(out.contains("added: my.telegram.org"), "{out}");
    let (v4, v6) = (IpAddr::from(RESOLVER4), IpAddr::from(RESOLVER6));
    let (s4, s6) = (format!("@{v4}"), format!("@{v6}"));

    // list telegram: nxdomain; list ads: refused; list misc: the default,
    // nodata (NOERROR, no answer); list local: dropped.
    let cases = [
        (v4, &s4, "web.telegram.org", "A", "NXDOMAIN"),
        (v6, &s6, "t.me", "AAAA", "NXDOMAIN"),
        (v4, &s4, "www.example.test", "A", "REFUSED"),
        (v6, &s6, "www.example.test", "AAAA", "REFUSED"),
        (v4, &s4, "mail.example.test", "A", "NOERROR"),
        (v6, &s6, "mail.example.test", "AAAA", "NOERROR"),
    ];
    for (server, s, name, qtype, status) in cases {
        let d = dig(&topo, &[s, name, qtype]);
        assert_answered(&d, server, name, qtype, status, true, 0);
        assert!(d.answers.is_empty(), "{d}");
    }
    let d = dig(&topo, &["+time=1", &s4, "my.telegram.org", "A"]);
    assert!(d.timed_out(), "the local list drops:\n{d}");
    // An unlisted name resolves.
    let a = topo.dig(&Query::udp4("example.test")).unwrap();
    assert!(a.resolved_to_expected(), "{a}");
    assert_resolver_never_saw(&topo, &["web.telegram.org", "t.me", "www.example.test", "mail.example.test", "my.telegram.org"]);

    let m = daemon.metrics().unwrap();
    assert_actions(&m, &[("nxdomain", 2), ("refused", 2), ("nodata", 2), ("drop", 1)]);
    for (list, n) in [("telegram", 2), ("ads", 2), ("misc", 2), ("local", 1)] {
        assert_eq!(m.value("blokir_list_blocked_total", &[("list", list)]), Some(n), "list {list}:\n{}", m.lines_of("blokir_list_").join("\n"));
    }

    // `blokir status` says what each list's blocked queries get.
    let out = cli_ok(&daemon, &["status"]);
    assert!(out.lines().any(|l| l == "attached: c0 (generic)"), "{out}");
    for (list, rules, path, action) in
        [("telegram", 11, Some(&telegram), "nxdomain"), ("ads", 1, Some(&ads), "refused"), ("misc", 1, Some(&misc), "nodata"), ("local", 1, None, "drop")]
    {
        let source = path.map(|p| format!(" from {}", p.display())).unwrap_or_default();
        let want = format!("list {list}: {rules} rules{source}, blocked DNS queries: {action}");
        assert!(out.lines().any(|l| l == want), "expected `{want}` in:\n{out}");
    }
    let json: serde_json::Value = serde_json::from_str(&cli_ok(&daemon, &["status", "--output", "json"])).unwrap();
    let actions: BTreeMap<String, String> = json["lists"]
        .as_array()
        .expect("lists")
        .iter()
        .map(|l| (l["name"].as_str().unwrap().to_string(), l["dns_action"].as_str().unwrap_or_default().to_string()))
        .collect();
    let want: BTreeMap<String, String> =
        [("telegram", "nxdomain"), ("ads", "refused"), ("misc", "nodata"), ("local", "drop")].map(|(l, a)| (l.to_string(), a.to_string())).into();
    assert_eq!(actions, want, "{json:#}");
    daemon.stop().expect("blokir stops cleanly on SIGTERM");
}

// ---------------------------------------------------------------------------
// 3. Redirect to a block page

/// `/etc/netns/<client>/resolv.conf`: `ip netns exec` bind-mounts it over
/// /etc/resolv.conf, so glibc (getent, curl) in the client namespace asks the
/// resolver through the edge. Removed on drop.
struct ClientResolvConf {
    dir: PathBuf,
    /// Whether /etc/netns was made for it (and goes with it).
    made_root: bool,
}

impl ClientResolvConf {
    fn new(topo: &Topology) -> Self {
        sweep_stale_netns_etc();
        let root = Path::new("/etc/netns");
        let made_root = !root.exists();
        let dir = root.join(topo.client());
        std::fs::create_dir_all(&dir).expect("creating /etc/netns/<client>");
        let guard = ClientResolvConf { dir, made_root };
        std::fs::write(guard.dir.join("resolv.conf"), format!("nameserver {RESOLVER4}\noptions timeout:1 attempts:1\n")).unwrap();
        guard
    }
}

impl Drop for ClientResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if self.made_root {
            // Only if nothing else was put there meanwhile.
            let _ = std::fs::remove_dir("/etc/netns");
        }
    }
}

/// Removes `/etc/netns/blkr-PID-*` left by test processes that died.
fn sweep_stale_netns_etc() {
    for e in std::fs::read_dir("/etc/netns").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let mut parts = name.split('-');
        if let (Some("blkr"), Some(pid)) = (parts.next(), parts.next().and_then(|p| p.parse::<u32>().ok()))
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The block page: an HTTP server on 198.18.1.80:80 and [2001:db8:1::80]:80
/// in the resolver namespace, logging each request's Host header and
/// client. Killed on drop (the namespace's removal would kill it too).
struct BlockPage {
    server: Option<Running>,
    log: PathBuf,
}

const SERVER_PY: &str = r#"
import http.server, socket, sys, threading
page, log = open(sys.argv[1], "rb").read(), open(sys.argv[2], "a", buffering=1)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        log.write("GET host=%s from=%s\n" % (self.headers.get("Host"), self.client_address[0]))
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)
    def log_message(self, *args):
        pass
class V6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
servers = [http.server.ThreadingHTTPServer((sys.argv[3], 80), Handler), V6((sys.argv[4], 80), Handler)]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
"#;

impl BlockPage {
    fn start(topo: &Topology) -> Self {
        let r = topo.resolver();
        for addr in [format!("{PAGE4}/24"), format!("{PAGE6}/64")] {
            let out = topo.run_in(r, &["ip", "addr", "add", &addr, "dev", RESOLVER_IFACE, "nodad"], Duration::from_secs(5)).unwrap();
            assert!(out.success(), "{out}");
        }
        let dir = topo.dir().join("page");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("index.html"), format!("<html><body><h1>{PAGE_TEXT}</h1></body></html>\n")).unwrap();
        std::fs::write(dir.join("server.py"), SERVER_PY).unwrap();
        let log = dir.join("requests.log");
        let mut cmd = topo.exec(r, "python3");
        cmd.arg(dir.join("server.py")).arg(dir.join("index.html")).arg(&log).arg(PAGE4.to_string()).arg(PAGE6.to_string());
        let mut page = BlockPage { server: Some(netns::start(&mut cmd).expect("starting python3")), log };
        // Ready when it listens on both addresses.
        let want = [format!("{PAGE4}:80"), format!("[{PAGE6}]:80")];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = topo.run_in(r, &["ss", "-H", "-n", "-l", "-t"], Duration::from_secs(5)).unwrap();
            let listening: Vec<&str> = out.stdout.lines().filter_map(|l| l.split_whitespace().nth(3)).collect();
            if want.iter().all(|w| listening.contains(&w.as_str())) {
                break;
            }
            if Instant::now() >= deadline {
                let server = page.server.take().unwrap().finish(Duration::from_millis(100));
                panic!("the block page is not listening on {want:?} after 10 s:\n{}\n{server:?}", out.stdout);
            }
            thread::sleep(Duration::from_millis(20));
        }
        page
    }

    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(str::to_string).collect()
    }
}

impl Drop for BlockPage {
    fn drop(&mut self) {
        // Dropping a `Running` kills the process.
        self.server.take();
    }
}

/// `curl -s --max-time 5 -w ... ARGS` from the client: (exit, body, remote
/// ip, HTTP code, how long).
fn curl(topo: &Topology, args: &[&str]) -> Captured {
    let mut cmd = topo.exec(topo.client(), "curl");
    cmd.args(["-s", "-S", "--max-time", "5", "-w", "\nremote=%{remote_ip} code=%{http_code}\n"]).args(args);
    netns::run(&mut cmd, Duration::from_secs(10)).expect("running curl in the client namespace")
}

/// `getent KIND NAME` from the client: the addresses glibc resolved.
fn getent(topo: &Topology, kind: &str, name: &str) -> (Captured, Vec<IpAddr>) {
    let out = topo.run_in(topo.client(), &["getent", kind, name], Duration::from_secs(10)).unwrap();
    let mut addrs: Vec<IpAddr> = out.stdout.lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
    addrs.dedup();
    (out, addrs)
}

/// The redirect daemon: `telegram` and `sizes` (`*.size.test`) lists, both
/// answered with the block page's addresses, TTL 120.
fn start_redirect(topo: &Topology) -> Daemon {
    let telegram = rules_file(topo, "telegram", &telegram_rules());
    let sizes = rules_file(topo, "sizes", "*.size.test\n");
    let (p4, p6) = (PAGE4.to_string(), PAGE6.to_string());
    start(topo, &[telegram, sizes], &["--mode", "native", "--dns-action", "redirect", "--redirect-ipv4", &p4, "--redirect-ipv6", &p6, "--answer-ttl", "120"])
}

/// Runs the dig command lines from the client at the same time.
fn dig_many(topo: &Topology, runs: &[Vec<String>]) -> Vec<Dig> {
    let running: Vec<Running> = runs.iter().map(|args| netns::start(topo.exec(topo.client(), "dig").args(args)).expect("starting dig")).collect();
    running.into_iter().map(|r| Dig::parse(r.finish(Duration::from_secs(10)).expect("dig finishes"))).collect()
}

#[test]
fn redirect_answers_carry_the_block_page_addresses_for_every_query_size() {
    let topo = Topology::new().unwrap();
    let _wire = ClientWire::attach(&topo);
    let daemon = start_redirect(&topo);
    let (p4, p6) = (PAGE4.to_string(), PAGE6.to_string());
    let (v4, v6) = (IpAddr::from(RESOLVER4), IpAddr::from(RESOLVER6));
    let (s4, s6) = (format!("@{v4}"), format!("@{v6}"));
    let mut redirected = 0u64;
    // Queries that got no answer at all: checked last, so that one run
    // reports every one of them.
    let mut lost: Vec<String> = Vec::new();

    // A gets the IPv4 page, AAAA the IPv6 one, whatever family the query
    // travels over; other types get NOERROR without an answer.
    for (server, s) in [(v4, &s4), (v6, &s6)] {
        for (qtype, data, len) in [("A", &p4, 4), ("AAAA", &p6, 16)] {
            for edns in [true, false] {
                let d = dig(&topo, &[if edns { "+edns" } else { "+noedns" }, s, "web.telegram.org", qtype]);
                if d.timed_out() {
                    lost.push(format!("web.telegram.org {qtype} over {server} (EDNS {edns})"));
                    continue;
                }
                redirected += 1;
                assert_answered(&d, server, "web.telegram.org", qtype, "NOERROR", edns, len);
                let want = Record { name: "web.telegram.org.".into(), ttl: 120, class: "IN".into(), rtype: qtype.into(), data: data.clone() };
                assert_eq!(d.answers, [want], "the answer record:\n{d}");
            }
        }
        for qtype in ["TXT", "MX"] {
            let d = dig(&topo, &[s, "web.telegram.org", qtype]);
            redirected += 1;
            assert_answered(&d, server, "web.telegram.org", qtype, "NOERROR", true, 0);
        }
    }
    // The answer's name points at the question, so it has the query's case.
    let d = dig(&topo, &[&s4, "Flora-1.Web.Telegram.ORG", "A"]);
    redirected += 1;
    assert_answered(&d, v4, "Flora-1.Web.Telegram.ORG", "A", "NOERROR", true, 4);
    assert_eq!(d.answers.iter().map(|r| (r.name.as_str(), r.data.as_str())).collect::<Vec<_>>(), [("Flora-1.Web.Telegram.ORG.", p4.as_str())], "{d}");

    // Every size of query: names of 64 consecutive lengths put the query's
    // frame at every offset from a 64-byte boundary, for A and AAAA over
    // IPv4 and IPv6, as dig sends them (EDNS with an 8-byte client cookie).
    let mut runs = Vec::new();
    for (server, ip_len) in [(v4, 20), (v6, 40)] {
        for (qtype, data, rdata) in [("A", &p4, 4), ("AAAA", &p6, 16)] {
            for n in 1..=64 {
                // A label holds at most 63 bytes: the 64th length takes two.
                let prefix = if n < 64 { "a".repeat(n) } else { format!("{}.a", "a".repeat(n - 2)) };
                let name = format!("{prefix}.size.test");
                let frame = 14 + ip_len + 8 + 12 + wire_len(&name) + 4 + 11 + 12;
                // The answer: the cookie gone, an answer record added.
                runs.push((server, qtype, data, name, frame, frame - 12 + (12 + rdata)));
            }
        }
    }
    let started = Instant::now();
    for chunk in runs.chunks(128) {
        let args: Vec<Vec<String>> =
            chunk.iter().map(|(server, qtype, _, name, _, _)| ["+tries=1", "+time=1", &format!("@{server}"), name, qtype].map(String::from).to_vec()).collect();
        for ((server, qtype, data, name, frame, answer), d) in chunk.iter().zip(dig_many(&topo, &args)) {
            if d.timed_out() {
                lost.push(format!("{name} {qtype} over {server}: query frame {frame} bytes, answer {answer}"));
                continue;
            }
            redirected += 1;
            let want = Record { name: format!("{name}."), ttl: 120, class: "IN".into(), rtype: (*qtype).into(), data: (*data).clone() };
            assert!(d.out.success() && d.status.as_deref() == Some("NOERROR") && d.answers == [want], "{name} {qtype} over {server}:\n{d}");
        }
    }
    eprintln!("{} queries of every size in {:?}; {} lost", runs.len(), started.elapsed(), lost.len());

    // What was lost was counted as a fallback to dropping, not as answered.
    let m = daemon.metrics().unwrap();
    assert_actions_and_fallbacks(&m, &[("redirect", redirected), ("drop", lost.len() as u64)], lost.len() as u64);
    assert_resolver_never_saw(&topo, &["web.telegram.org"]);
    assert!(!topo.resolver_queries().iter().any(|q| q.ends_with(".size.test")), "{}", topo.resolver_log());
    assert!(
        lost.is_empty(),
        "{} of {} redirect queries got no answer (blokir_dns_answer_fallbacks_total{{reason=\"failed\"}}: the answer could not be built, \
         bpf_xdp_adjust_tail refused to grow the frame):\n{}",
        lost.len(),
        redirected + lost.len() as u64,
        lost.join("\n")
    );
    daemon.stop().expect("blokir stops cleanly on SIGTERM");
}

#[test]
fn redirect_answers_lead_curl_to_the_block_page() {
    let topo = Topology::new().unwrap();
    let _wire = ClientWire::attach(&topo);
    let daemon = start_redirect(&topo);
    let (p4, p6) = (PAGE4.to_string(), PAGE6.to_string());

    // A browser's view: glibc's resolver in the client asks the resolver
    // through the edge, and curl lands on the block page.
    let page = BlockPage::start(&topo);
    let _resolv = ClientResolvConf::new(&topo);
    let before = Snmp::now(&topo);
    let (out, addrs) = getent(&topo, "ahostsv4", "web.telegram.org");
    assert_eq!(addrs, [IpAddr::from(PAGE4)], "{out}");
    let (out, addrs) = getent(&topo, "ahostsv6", "web.telegram.org");
    assert_eq!(addrs, [IpAddr::from(PAGE6)], "{out}");
    for (args, remote) in [(vec![], None), (vec!["-4"], Some(&p4)), (vec!["-6"], Some(&p6))] {
        let args: Vec<&str> = args.into_iter().chain(["http://web.telegram.org/"]).collect();
        let out = curl(&topo, &args);
        assert!(out.success(), "curl {args:?} must reach the block page:\n{out}");
        assert!(out.stdout.contains(PAGE_TEXT), "curl {args:?} must print the block page:\n{out}");
        assert!(out.stdout.contains("code=200"), "{out}");
        let got = out.stdout.split_once("remote=").and_then(|(_, r)| r.split_whitespace().next()).unwrap_or_default().to_string();
        match remote {
            Some(r) => assert_eq!(&got, r, "curl {args:?} connected to the wrong address:\n{out}"),
            None => assert!(got == p4 || got == p6, "curl connected to {got}, not the block page:\n{out}"),
        }
    }
    // Every lookup the client made went out as one UDP query and was
    // answered by blokir.
    let redirected = before.udp_sent_since(&topo);
    assert!(redirected >= 5, "the client sent {redirected} DNS queries for 2 getent and 3 curl runs");
    let requests = page.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert!(requests.iter().all(|r| r.starts_with("GET host=web.telegram.org from=")), "{requests:?}");
    assert!(requests.iter().any(|r| r.ends_with(&format!("from={}", netns::CLIENT4))), "{requests:?}");
    assert!(requests.iter().any(|r| r.ends_with(&format!("from={}", netns::CLIENT6))), "{requests:?}");

    // An unlisted name resolves to its real address, and curl goes there
    // (nothing listens there: the edge has no route, so it fails at once).
    let (real4, real6) = address_of("example.test").unwrap();
    let (out, addrs) = getent(&topo, "ahostsv4", "example.test");
    assert_eq!(addrs, [IpAddr::from(real4)], "{out}");
    let (out, addrs) = getent(&topo, "ahostsv6", "example.test");
    assert_eq!(addrs, [IpAddr::from(real6)], "{out}");
    for (flag, addr) in [("-4", real4.to_string()), ("-6", format!("[{real6}]"))] {
        let out = curl(&topo, &["-v", flag, "http://example.test/"]);
        assert!(!out.success() && !out.stdout.contains(PAGE_TEXT), "nothing listens at example.test's real address:\n{out}");
        assert!(out.stderr.contains(&format!("Trying {addr}:80")), "curl {flag} must try example.test's real address {addr}:\n{out}");
        assert!(!out.stderr.contains(&p4) && !out.stderr.contains(&p6), "an unlisted name must not be redirected:\n{out}");
    }
    assert_eq!(page.requests().len(), 3, "the block page got a request for an unlisted name");

    assert_resolver_never_saw(&topo, &["web.telegram.org"]);
    assert!(topo.resolver_queries().iter().any(|q| q == "example.test"), "{}", topo.resolver_log());
    assert_actions(&daemon.metrics().unwrap(), &[("redirect", redirected)]);
    let out = cli_ok(&daemon, &["status"]);
    assert!(out.lines().any(|l| l.starts_with("list telegram: 11 rules") && l.ends_with("blocked DNS queries: redirect")), "{out}");
    daemon.stop().expect("blokir stops cleanly on SIGTERM");
}

// ---------------------------------------------------------------------------
// 5. Refused configurations

#[test]
fn daemon_refuses_answer_settings_it_cannot_honour() {
    let topo = Topology::new().unwrap();
    let rules = rules_file(&topo, "telegram", &telegram_rules());
    let cases: [(&[&str], i32, &str); 5] = [
        (&["--dns-action", "redirect"], 1, "the redirect action needs --redirect-ipv4 and/or --redirect-ipv6"),
        (&["--list-dns-action", "telegram=redirect", "--answer-ttl", "30"], 1, "the redirect action needs --redirect-ipv4 and/or --redirect-ipv6"),
        (&["--list-dns-action", "nosuch=nxdomain"], 1, "--list-dns-action names list \"nosuch\", but the lists are: local, telegram"),
        (&["--dns-action", "NXDOMAIN"], 2, "expected one of: drop, nxdomain, refused, nodata, redirect"),
        (&["--list-dns-action", "telegram"], 2, "expected LIST=ACTION"),
    ];
    for (options, code, message) in cases {
        let mut cmd = topo.daemon_command(std::slice::from_ref(&rules)).unwrap();
        cmd.args(options);
        let out = netns::run(&mut cmd, Duration::from_secs(15)).unwrap();
        assert_eq!(out.code(), Some(code), "blokir run {options:?} must be refused with exit {code}:\n{out}");
        assert!(out.stderr.contains(message), "expected `{message}` in:\n{out}");
        assert!(!topo.xdp_attached().unwrap(), "a refused start left the program attached ({options:?})");
        assert!(!topo.socket().exists(), "a refused start left a control socket ({options:?})");
    }
    // Nothing in the way: the names resolve.
    let a = topo.dig(&Query::udp4(TELEGRAM_NAMES[6])).unwrap();
    assert!(a.resolved_to_expected(), "{a}");

    // The same redirect with one address is accepted (the refusals above are
    // about the settings, not the rest of the command line): AAAA queries
    // get the IPv6 page, A queries NODATA.
    let _wire = ClientWire::attach(&topo);
    let daemon = start(&topo, &[rules], &["--list-dns-action", "telegram=redirect", "--redirect-ipv6", &PAGE6.to_string()]);
    let server = format!("@{RESOLVER4}");
    let d = dig(&topo, &[&server, "web.telegram.org", "A"]);
    assert_answered(&d, RESOLVER4.into(), "web.telegram.org", "A", "NOERROR", true, 0);
    let d = dig(&topo, &[&server, "web.telegram.org", "AAAA"]);
    assert_answered(&d, RESOLVER4.into(), "web.telegram.org", "AAAA", "NOERROR", true, 16);
    assert_eq!(d.answers.iter().map(|r| r.data.as_str()).collect::<Vec<_>>(), [PAGE6.to_string()], "{d}");
    assert_actions(&daemon.metrics().unwrap(), &[("redirect", 2)]);
    daemon.stop().expect("blokir stops cleanly on SIGTERM");
}
