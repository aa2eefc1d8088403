//! `cargo xtask demo` runs this: blokir blocking the 11 Telegram names of
//! Indonesia's 2017 order, shown with real `dig` queries through a small
//! network of namespaces built for the occasion and removed at the end.
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
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context as _, bail};
use blokir_tests::netns::{
    Answer, Daemon, EDGE_CLIENT_IFACE, Family, METRICS_ADDR, Query, RESOLVER4, RESOLVER6, TELEGRAM_NAMES, Topology, Transport, telegram_rules,
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

fn namespace_demo(blokir: &Path) -> anyhow::Result<bool> {
    let mut ok = true;
    println!("blokir demo: dropping DNS queries for listed names at a router, in XDP.\n");
    println!("Building a small network of three namespaces on this machine (removed at the end):");
    let topo = Topology::new()?.with_blokir(blokir);
    println!("  client    {:<12} {:<16} runs dig", "198.18.0.1", "2001:db8::1");
    println!("  edge      router: interface {EDGE_CLIENT_IFACE} faces the client; blokir attaches there");
    println!("  resolver  {RESOLVER4:<12} {RESOLVER6:<16} runs dnsmasq (DNS over UDP and TCP)");
    println!("  ({}, {}, {})\n", topo.client(), topo.edge(), topo.resolver());

    let sample = ["t.me", "web.telegram.org", "my.telegram.org", "nottelegram.org"];
    println!("1. Without blokir, every name resolves:");
    let queries: Vec<Query> = sample.iter().map(|n| Query::udp4(n)).collect();
    ok &= dig(&topo, &queries, |_| false, |_| "")?;

    let rules = topo.dir().join("telegram.rules");
    std::fs::write(&rules, telegram_rules())?;
    println!("\n2. Start blokir on the edge with the 11 names of Indonesia's 2017 order ({}):", rules.display());
    println!("     {}", TELEGRAM_NAMES.join(" "));
    println!("  $ blokir run --iface {EDGE_CLIENT_IFACE} --rules telegram.rules   (in the edge namespace)");
    let started = Instant::now();
    let daemon = topo.start_daemon(std::slice::from_ref(&rules))?;
    println!("  ready in {:.2} s", started.elapsed().as_secs_f64());
    ok &= cli(&daemon, &["status"])?;

    println!("\n3. Queries from the client (dig +tries=1 +time=1: a dropped query gets no answer within 1 s):");
    let mut queries: Vec<Query> = TELEGRAM_NAMES.iter().map(|n| Query::udp4(n)).collect();
    for n in ["t.me", "web.telegram.org"] {
        queries.extend([Query::udp6(n), Query::tcp4(n), Query::tcp6(n)]);
    }
    queries.push(Query::udp4("WeB.TeLeGrAm.OrG"));
    queries.extend(["my.telegram.org", "nottelegram.org", "example.test"].map(Query::udp4));
    queries.push(Query::tcp6("my.telegram.org"));
    let note = |n: &str| match n {
        "my.telegram.org" => "  (not listed: the rules are exact names)",
        "WeB.TeLeGrAm.OrG" => "  (names match whatever their case)",
        _ => "",
    };
    ok &= dig(&topo, &queries, listed, note)?;
    let blocked = queries.iter().filter(|q| listed(&q.name)).count();

    println!("\n4. What blokir counted (curl http://{METRICS_ADDR}/metrics, on the edge):");
    let m = daemon.metrics()?;
    let nonzero = |prefix: &str| m.lines_of(prefix).into_iter().filter(|l| !l.ends_with(" 0")).collect::<Vec<_>>();
    for l in nonzero("blokir_blocked_total").into_iter().chain(nonzero("blokir_list_blocked_total")) {
        println!("  {l}");
    }
    // The top rules by hits (blokir exports only the top N rules, by default 100).
    let hits = nonzero("blokir_rule_hits_total");
    for l in hits.iter().take(3) {
        println!("  {l}");
    }
    if hits.len() > 3 {
        println!("  ... and {} more blokir_rule_hits_total lines", hits.len() - 3);
    }
    let counted: u64 = m.samples().iter().filter(|(n, _, _)| n == "blokir_blocked_total").map(|(_, _, v)| *v as u64).sum();
    println!("  => {counted} queries blocked; the client sent {blocked} queries for listed names.");
    if counted != blocked as u64 {
        println!("  <-- UNEXPECTED: the counters should equal the queries sent");
        ok = false;
    }

    println!("\n5. Change the rules while it runs (the local list, kept across restarts):");
    let t0 = Instant::now();
    ok &= cli(&daemon, &["rules", "add", "*.example.test"])?;
    println!("  (the command took {} ms)", t0.elapsed().as_millis());
    let below = |n: &str| if n == "example.test" { "  (`*.` covers names below example.test only)" } else { "" };
    ok &= dig(&topo, &[Query::udp4("www.example.test"), Query::tcp6("mail.example.test"), Query::udp4("example.test")], |n| n != "example.test", below)?;
    ok &= cli(&daemon, &["rules", "check", "www.example.test", "t.me", "my.telegram.org"])?;
    ok &= cli(&daemon, &["rules", "del", "*.example.test"])?;
    ok &= dig(&topo, &[Query::udp4("www.example.test")], |_| false, |_| "")?;

    println!("\n6. Stop blokir (SIGTERM): it detaches the program, and the names resolve again.");
    daemon.stop()?;
    if topo.xdp_attached()? {
        println!("  <-- UNEXPECTED: an XDP program is still attached to {EDGE_CLIENT_IFACE}");
        ok = false;
    }
    ok &= dig(&topo, &[Query::udp4("t.me")], |_| false, |_| "")?;
    drop(topo);
    println!("\nNamespaces removed.");
    if ok {
        println!("Demo passed: every listed name was blocked over UDP and TCP, IPv4 and IPv6; the others resolved.");
    } else {
        println!("DEMO FAILED: see the lines marked UNEXPECTED above.");
    }
    Ok(ok)
}
