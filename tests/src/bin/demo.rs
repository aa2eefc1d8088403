//! `cargo xtask demo` runs this: blokir blocking the 11 Telegram names of
//! Indonesia's 2017 order and a second list answered and reset, shown with
//! real `dig`, `curl` and headless Chromium against real dnsmasq, openssl
//! s_server and Python http.server, through a small network of namespaces
//! built for the occasion and removed at the end; a rule added live, a
//! `kill -9` and restart under a stream of queries, the counters, and a
//! closing table.
//!
//! ```text
//! demo [--blokir PATH]                 the namespace demo; exits 1 if any
//!                                      query got what it should not
//! demo [--blokir PATH] --iface IFACE   write target/demo/telegram.rules and
//!                                      exec `blokir run --iface IFACE` on it
//! ```
//!
//! Needs root. PATH defaults to `$BLOKIR_BIN`, else target/debug/blokir.

use std::{
    net::IpAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use blokir_tests::{
    netns::{self, Answer, Daemon, EDGE_CLIENT_IFACE, Family, METRICS_ADDR, Query, RESOLVER4, RESOLVER6, TELEGRAM_NAMES, Topology, Transport, telegram_rules},
    web,
};

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Args {
    blokir: Option<PathBuf>,
    iface: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args { blokir: None, iface: None };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--blokir" => args.blokir = Some(it.next().context("--blokir needs a path")?.into()),
            "--iface" => args.iface = Some(it.next().context("--iface needs an interface name")?),
            "-h" | "--help" => {
                println!("usage: demo [--blokir PATH] [--iface IFACE]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (usage: demo [--blokir PATH] [--iface IFACE])"),
        }
    }
    Ok(args)
}

fn run() -> anyhow::Result<bool> {
    let args = parse_args()?;
    let blokir = match args.blokir {
        Some(p) => p,
        None => blokir_tests::blokir_bin()?,
    };
    match args.iface {
        Some(iface) => Err(on_interface(&blokir, &iface)),
        None => namespace_demo(&blokir),
    }
}

/// Writes the list and becomes `blokir run` on `iface` (returns only if the
/// exec fails).
fn on_interface(blokir: &Path, iface: &str) -> anyhow::Error {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/demo");
    let rules = dir.join("telegram.rules");
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&rules, telegram_rules())) {
        return anyhow::Error::new(e).context(format!("writing {}", rules.display()));
    }
    let rules = rules.canonicalize().unwrap_or(rules);
    println!("blokir will filter {iface} with the 11 Telegram names in {}.", rules.display());
    println!("From another terminal (as root):");
    println!("  {} rules check t.me example.org", blokir.display());
    println!("  {} rules add '*.example.test'", blokir.display());
    println!("  curl -s http://127.0.0.1:9947/metrics | grep blocked");
    println!("Stop with Ctrl-C: the program is detached and its pins removed on exit (--cleanup).\n");
    let err = Command::new(blokir).args(["run", "--cleanup", "--iface", iface, "--rules"]).arg(&rules).exec();
    anyhow::Error::new(err).context(format!("running {}", blokir.display()))
}

/// Prints one answer and says whether it is what `blocked` expects.
fn show(a: &Answer, blocked: bool, note: &str) -> bool {
    let proto = match a.query.transport {
        Transport::Udp => "UDP",
        Transport::Tcp => "TCP",
    };
    let af = if a.query.family == Family::V4 { "IPv4" } else { "IPv6" };
    let (verdict, good) = match (a.timed_out(), a.resolved_to_expected()) {
        (true, _) => ("BLOCKED ", blocked),
        (false, true) => ("resolved", !blocked),
        (false, false) => ("ERROR   ", false),
    };
    let answer = if a.timed_out() { "no answer (the query was dropped at the edge)".to_string() } else { a.summary() };
    let flag = if good { "" } else { "   <-- UNEXPECTED" };
    println!("  {verdict}  {:<26} {:<4}  {proto}/{af}  {answer}{note}{flag}", a.query.name, a.query.family.record_type());
    if !good {
        println!("{}", a.out.to_string().lines().map(|l| format!("      | {l}\n")).collect::<String>());
    }
    good
}

/// Runs the queries at once and prints them; `blocked(name)` says which
/// must be dropped.
fn dig(topo: &Topology, queries: &[Query], blocked: impl Fn(&str) -> bool, note: impl Fn(&str) -> &'static str) -> anyhow::Result<bool> {
    let answers = topo.dig_all(queries)?;
    Ok(answers.iter().fold(true, |ok, a| show(a, blocked(&a.query.name), note(&a.query.name)) & ok))
}

fn cli(d: &Daemon, args: &[&str]) -> anyhow::Result<bool> {
    let shown: Vec<String> = args.iter().map(|a| if a.contains('*') { format!("'{a}'") } else { a.to_string() }).collect();
    println!("  $ blokir {}", shown.join(" "));
    let out = d.cli(args)?;
    for l in out.stdout.lines().chain(out.stderr.lines()) {
        println!("    {l}");
    }
    Ok(out.success())
}

fn listed(name: &str) -> bool {
    TELEGRAM_NAMES.contains(&name.to_ascii_lowercase().trim_end_matches('.'))
}

/// One row of the closing table: what was sent, how much of it was
/// blocked, and how much should have been.
struct Row {
    what: &'static str,
    sent: usize,
    blocked: usize,
    expected: usize,
}

/// The table every step adds to.
#[derive(Default)]
struct Tally(Vec<Row>);

impl Tally {
    fn add(&mut self, what: &'static str, blocked: bool, expected: bool) {
        match self.0.iter_mut().find(|r| r.what == what) {
            Some(r) => {
                r.sent += 1;
                r.blocked += usize::from(blocked);
                r.expected += usize::from(expected);
            }
            None => self.0.push(Row { what, sent: 1, blocked: usize::from(blocked), expected: usize::from(expected) }),
        }
    }

    fn print(&self) -> bool {
        println!("  {:<34} {:>5} {:>8} {:>9}", "what", "sent", "blocked", "expected");
        let mut ok = true;
        for r in &self.0 {
            let flag = if r.blocked == r.expected { "" } else { "   <-- UNEXPECTED" };
            ok &= r.blocked == r.expected;
            println!("  {:<34} {:>5} {:>8} {:>9}{flag}", r.what, r.sent, r.blocked, r.expected);
        }
        ok
    }
}

/// The second list: gambling names, answered NXDOMAIN and reset.
const JUDI: [&str; 2] = [".judi.test", "slot88.test"];

fn judi(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "judi.test" || n.ends_with(".judi.test") || n == "slot88.test"
}

/// dig through `topo` for each query, printed, tallied under `what`.
fn dig_rows(
    topo: &Topology,
    tally: &mut Tally,
    what: &'static str,
    queries: &[Query],
    expect_blocked: impl Fn(&str) -> bool,
    note: impl Fn(&str) -> &'static str,
) -> anyhow::Result<bool> {
    let answers = topo.dig_all(queries)?;
    let mut ok = true;
    for a in &answers {
        let expected = expect_blocked(&a.query.name);
        let answered_by_edge = judi(&a.query.name);
        // A blocked query is dropped (no answer) or answered NXDOMAIN by
        // blokir itself (its list's action).
        let blocked = a.timed_out() || (answered_by_edge && a.status.as_deref() == Some("NXDOMAIN"));
        let proto = match a.query.transport {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        };
        let af = if a.query.family == Family::V4 { "IPv4" } else { "IPv6" };
        let verdict = match (blocked, a.timed_out()) {
            (true, true) => "BLOCKED ",
            (true, false) => "ANSWERED",
            (false, _) if a.resolved_to_expected() => "resolved",
            _ => "ERROR   ",
        };
        let answer = match (blocked, a.timed_out()) {
            (true, true) => "no answer (dropped at the edge)".to_string(),
            (true, false) => "NXDOMAIN (answered by blokir at the edge)".to_string(),
            _ => a.summary(),
        };
        let good = blocked == expected && (blocked || a.resolved_to_expected());
        ok &= good;
        let flag = if good { "" } else { "   <-- UNEXPECTED" };
        println!("  {verdict}  {:<26} {:<4}  {proto}/{af}  {answer}{}{flag}", a.query.name, a.query.family.record_type(), note(&a.query.name));
        tally.add(what, blocked, expected);
    }
    Ok(ok)
}

/// One web request from the client, printed and tallied: `Ok(blocked)`.
enum Web {
    Curl(&'static str),
    Chromium,
}

fn fetch(topo: &Topology, tally: &mut Tally, what: &'static str, how: Web, name: &str, server: IpAddr, expect: &str) -> anyhow::Result<bool> {
    let started = Instant::now();
    let (shown, blocked, detail) = match how {
        Web::Curl(scheme) => {
            let (out, took) = web::curl(topo, scheme, name, server, 3)?;
            let served = out.success();
            let reset = out.stderr.contains("reset by peer");
            let detail = match (served, reset) {
                (true, _) => format!("served ({} bytes)", out.stdout.len()),
                (false, true) => format!("Connection reset by peer after {:.2} s", took.as_secs_f64()),
                (false, false) => format!("no answer: curl gave up after {:.1} s (exit {:?})", took.as_secs_f64(), out.code()),
            };
            (format!("curl {scheme}://{name}/"), !served, detail)
        }
        Web::Chromium => {
            let profile = topo.dir().join(format!("chromium-{}", topo.dir().read_dir()?.count()));
            let out = netns::start(&mut web::chromium(topo, name, server, &profile))?.finish(Duration::from_secs(40))?;
            let served = out.stdout.contains(web::PAGE);
            let detail = if served { "page loaded".to_string() } else { format!("no page after {:.1} s", started.elapsed().as_secs_f64()) };
            (format!("chromium https://{name}/"), !served, detail)
        }
    };
    let expected = expect != "served";
    let good = blocked == expected && (!blocked || expect != "reset" || detail.contains("reset by peer"));
    let flag = if good { "" } else { "   <-- UNEXPECTED" };
    println!("  {:<8}  {shown:<42} {detail}{flag}", if blocked { "BLOCKED" } else { "served" });
    tally.add(what, blocked, expected);
    Ok(good)
}

/// Queries sent while the daemon is SIGKILLed and restarted: `(listed
/// sent, listed answered, unlisted sent, unlisted answered)`.
fn stream(topo: &Topology, stop: &AtomicBool) -> (usize, usize, usize, usize) {
    let mut seen = (0, 0, 0, 0);
    let queries = [Query::udp4("t.me"), Query::tcp4("web.telegram.org"), Query::udp6("example.test"), Query::tcp4("www.example.test")];
    while !stop.load(Ordering::Relaxed) {
        let Ok(answers) = topo.dig_all(&queries) else { continue };
        for a in answers {
            match listed(&a.query.name) {
                true => (seen.0 += 1, seen.1 += usize::from(!a.timed_out())),
                false => (seen.2 += 1, seen.3 += usize::from(a.resolved_to_expected())),
            };
        }
    }
    seen
}

fn namespace_demo(blokir: &Path) -> anyhow::Result<bool> {
    let mut ok = true;
    let mut tally = Tally::default();
    println!("blokir demo: blocking listed names at a router, in XDP: DNS queries, HTTPS by server name, HTTP by Host.\n");
    println!("Building a small network of three namespaces on this machine (removed at the end):");
    let topo = Topology::new()?.with_blokir(blokir);
    let (servers, _servers) = web::start_servers(&topo)?;
    let server = servers[0];
    println!("  client    {:<12} {:<16} runs dig, curl and headless Chromium", "198.18.0.1", "2001:db8::1");
    println!("  edge      router: interface {EDGE_CLIENT_IFACE} faces the client; blokir attaches there");
    println!("  resolver  {RESOLVER4:<12} {RESOLVER6:<16} runs dnsmasq (DNS over UDP and TCP), openssl s_server (:443), python http.server (:80)");
    println!("  ({}, {}, {})\n", topo.client(), topo.edge(), topo.resolver());

    println!("1. Without blokir, every name resolves and every site answers:");
    let queries: Vec<Query> = ["t.me", "web.telegram.org", "my.telegram.org"].iter().map(|n| Query::udp4(n)).collect();
    ok &= dig(&topo, &queries, |_| false, |_| "")?;
    let mut before = Tally::default();
    ok &= fetch(&topo, &mut before, "", Web::Curl("https"), "t.me", server, "served")?;
    ok &= fetch(&topo, &mut before, "", Web::Curl("http"), "t.me", server, "served")?;

    let rules = topo.dir().join("telegram.rules");
    std::fs::write(&rules, telegram_rules())?;
    let judi_rules = topo.dir().join("judi.rules");
    std::fs::write(&judi_rules, JUDI.join("\n") + "\n")?;
    println!("\n2. Start blokir on the edge with two lists:");
    println!("     telegram.rules: the 11 names of Indonesia's 2017 order ({}): dropped", TELEGRAM_NAMES.join(" "));
    println!("     judi.rules:     {} (`.name`: the name and below): answered NXDOMAIN, TCP flows reset", JUDI.join(" "));
    // Generic XDP: on veth, answers and resets sent back with XDP_TX in
    // native mode reach the peer only if it runs XDP too (see the README).
    let options = ["--mode", "generic", "--list-dns-action", "judi=nxdomain", "--list-tcp-action", "judi=reset"];
    println!("  $ blokir run --iface {EDGE_CLIENT_IFACE} --rules telegram.rules --rules judi.rules {}", options.join(" "));
    let started = Instant::now();
    // What the resolver got before blokir ran (step 1 asked for listed names).
    let asked_before = topo.resolver_queries().len();
    let leaked = || topo.resolver_queries().into_iter().skip(asked_before).filter(|n| listed(n) || judi(n)).collect::<Vec<String>>();
    let lists = [rules.clone(), judi_rules.clone()];
    let daemon = topo.start_daemon_with(&lists, &options)?;
    println!("  ready in {:.2} s", started.elapsed().as_secs_f64());
    ok &= cli(&daemon, &["status"])?;

    println!("\n3. DNS queries from the client (dig +tries=1 +time=1: a dropped query gets no answer within 1 s):");
    let mut queries: Vec<Query> = TELEGRAM_NAMES.iter().map(|n| Query::udp4(n)).collect();
    for n in ["t.me", "web.telegram.org"] {
        queries.extend([Query::udp6(n), Query::tcp4(n), Query::tcp6(n)]);
    }
    queries.push(Query::udp4("WeB.TeLeGrAm.OrG"));
    queries.extend([Query::udp4("www.judi.test"), Query::tcp6("judi.test"), Query::udp6("slot88.test")]);
    queries.extend(["my.telegram.org", "nottelegram.org", "example.test"].map(Query::udp4));
    queries.push(Query::tcp6("my.telegram.org"));
    let note = |n: &str| match n {
        "my.telegram.org" => "  (not listed: the rules are exact names)",
        "WeB.TeLeGrAm.OrG" => "  (names match whatever their case)",
        "judi.test" => "  (queries over TCP are dropped whatever the list's action)",
        _ => "",
    };
    ok &= dig_rows(&topo, &mut tally, "DNS queries", &queries, |n| listed(n) || judi(n), note)?;
    let dns_listed = queries.iter().filter(|q| listed(&q.name) || judi(&q.name)).count();
    let leak = leaked();
    if !leak.is_empty() {
        println!("  <-- UNEXPECTED: the resolver got queries for listed names: {leak:?}");
        ok = false;
    }

    println!("\n4. HTTPS by server name (the TLS ClientHello's SNI), HTTP by Host, to the real servers:");
    // Served first: s_server takes one connection at a time, and a blocked
    // connection stays open on its side until it times out.
    for (how, name, expect) in [
        (Web::Curl("https"), "example.test", "served"),
        (Web::Chromium, "example.test", "served"),
        (Web::Curl("https"), "www.judi.test", "reset"),
        (Web::Curl("https"), "t.me", "dropped"),
        (Web::Chromium, "web.telegram.org", "dropped"),
    ] {
        let what = if matches!(how, Web::Chromium) { "HTTPS (Chromium, 2-segment hello)" } else { "HTTPS (curl)" };
        ok &= fetch(&topo, &mut tally, what, how, name, server, expect)?;
    }
    for (name, expect) in [("example.test", "served"), ("slot88.test", "reset"), ("t.me", "dropped")] {
        ok &= fetch(&topo, &mut tally, "HTTP (curl)", Web::Curl("http"), name, server, expect)?;
    }
    println!("  (dropped: the client waits in vain; reset: blokir answers with a TCP RST built in XDP, and the client fails at once)");

    println!("\n5. What blokir counted (curl http://{METRICS_ADDR}/metrics on the edge: what Prometheus scrapes):");
    let m = daemon.metrics()?;
    let nonzero = |prefix: &str| m.lines_of(prefix).into_iter().filter(|l| !l.ends_with(" 0")).map(str::to_string).collect::<Vec<_>>();
    for l in nonzero("blokir_blocked_total").into_iter().chain(nonzero("blokir_list_blocked_total")).chain(nonzero("blokir_tcp_resets_total")) {
        println!("  {l}");
    }
    let dns_counted: u64 = m
        .samples()
        .iter()
        .filter(|(n, l, _)| n == "blokir_blocked_total" && l.get("proto").is_some_and(|p| p.starts_with("dns")))
        .map(|(_, _, v)| *v as u64)
        .sum();
    println!("  => {dns_counted} DNS queries blocked; the client sent {dns_listed} for listed names.");
    if dns_counted != dns_listed as u64 {
        println!("  <-- UNEXPECTED: the DNS counters should equal the queries sent");
        ok = false;
    }

    println!("\n6. Change the rules while it runs (the local list, kept across restarts):");
    let t0 = Instant::now();
    ok &= cli(&daemon, &["rules", "add", "*.example.test"])?;
    println!("  (the command took {} ms)", t0.elapsed().as_millis());
    let below = |n: &str| if n == "example.test" { "  (`*.` covers names below example.test only)" } else { "" };
    let queries = [Query::udp4("www.example.test"), Query::tcp6("mail.example.test"), Query::udp4("example.test")];
    ok &= dig_rows(&topo, &mut tally, "DNS queries, rule added live", &queries, |n| n != "example.test", below)?;
    ok &= cli(&daemon, &["rules", "check", "www.example.test", "t.me", "www.judi.test", "my.telegram.org"])?;
    ok &= cli(&daemon, &["rules", "del", "*.example.test"])?;
    ok &= dig_rows(&topo, &mut tally, "DNS queries, rule removed", &[Query::udp4("www.example.test")], |_| false, |_| "")?;

    println!("\n7. kill -9 the daemon while the client keeps querying, and start it again:");
    let stop = AtomicBool::new(false);
    let (seen, restart) = std::thread::scope(|s| -> anyhow::Result<_> {
        let queries = s.spawn(|| stream(&topo, &stop));
        std::thread::sleep(Duration::from_secs(1));
        println!("  $ kill -9 {}", daemon.pid());
        daemon.kill()?;
        println!("  no daemon: the XDP program stays attached (its link is pinned in bpffs) and keeps filtering");
        std::thread::sleep(Duration::from_secs(2));
        let t0 = Instant::now();
        let again = topo.start_daemon_with(&lists, &options);
        let took = t0.elapsed();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        let seen = queries.join().expect("the query stream");
        Ok((seen, again.map(|d| (d, took))))
    })?;
    let (daemon, took) = restart?;
    println!("  $ blokir run ...   (ready in {:.2} s: it took over the pinned program atomically)", took.as_secs_f64());
    let (listed_sent, listed_answered, unlisted_sent, unlisted_answered) = seen;
    println!("  queries for listed names:   {listed_sent} sent, {listed_answered} answered");
    println!("  queries for unlisted names: {unlisted_sent} sent, {unlisted_answered} answered");
    for _ in 0..listed_sent {
        tally.add("DNS queries across kill -9", true, true);
    }
    for i in 0..unlisted_sent {
        tally.add("DNS queries across kill -9", i >= unlisted_answered, false);
    }
    if listed_answered > 0 || listed_sent == 0 || unlisted_answered != unlisted_sent {
        println!("  <-- UNEXPECTED: nothing listed may be answered, everything else must be");
        ok = false;
    }
    let leak = leaked();
    if !leak.is_empty() {
        println!("  <-- UNEXPECTED: the resolver got queries for listed names: {leak:?}");
        ok = false;
    } else {
        println!("  dnsmasq's log holds not one query for a listed name.");
    }

    println!("\n8. Stop blokir (SIGTERM; this demo runs it with --cleanup): it detaches, and the names resolve again.");
    daemon.stop()?;
    if topo.xdp_attached()? {
        println!("  <-- UNEXPECTED: an XDP program is still attached to {EDGE_CLIENT_IFACE}");
        ok = false;
    }
    ok &= dig(&topo, &[Query::udp4("t.me")], |_| false, |_| "")?;
    drop(_servers);
    drop(topo);
    println!("\nNamespaces removed.\n");
    ok &= tally.print();
    if ok {
        println!("\nDemo passed: every listed name was blocked (DNS, HTTPS, HTTP; dropped, answered or reset), the others went through.");
    } else {
        println!("\nDEMO FAILED: see the lines marked UNEXPECTED above.");
    }
    Ok(ok)
}
