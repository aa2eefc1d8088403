//! End to end, DNS over TCP split across segments (issue #13): queries
//! sent from plain TCP sockets in the client namespace
//! (tests/e2e_dns_tcp.py: TCP_NODELAY, one send per piece) to the real
//! dnsmasq, cut after the length prefix, inside the name, or into 1-byte
//! segments, one or several per connection, IPv4 and IPv6; and real `dig
//! +tcp`. Judged at the server (dnsmasq's log of the questions it got) and
//! the client (the answers): without blokir every split query is answered
//! (the harness check); under `blokir run` a listed name is never
//! answered nor seen by dnsmasq, and an unlisted one always is, alone or
//! before a listed one on the same connection.
//!
//! Run as root, serially:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test e2e_dns_tcp -- --test-threads=1`.

use std::time::Duration;

use blokir_tests::netns::{Query, RESOLVER4, RESOLVER6, Topology, telegram_rules};

const LISTED: &str = "web.telegram.org";
const UNLISTED: &str = "my.telegram.org";
const SPLITS: [&str; 4] = ["whole", "prefix", "name", "bytes"];

/// One connection: its names in order, IPv6, how each query is cut, and
/// the DNS id of its first query (unique in the test).
struct Case(Vec<&'static str>, bool, &'static str, u16);

/// Opens the connections at once; the DNS ids answered.
fn send(topo: &Topology, cases: &[Case]) -> Vec<u16> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e_dns_tcp.py");
    let json = serde_json::to_string(&cases.iter().map(|c| serde_json::json!({"names": c.0, "v6": c.1, "split": c.2, "id": c.3})).collect::<Vec<_>>()).unwrap();
    let args = [RESOLVER4.to_string(), RESOLVER6.to_string(), json];
    let out = topo.run_in(topo.client(), &[&["python3", script], &args.each_ref().map(String::as_str)[..]].concat(), Duration::from_secs(30)).unwrap();
    let out = out.ok().unwrap();
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

/// `names` on one connection, each split every way, over both families,
/// with ids from `base` (a step of 10 per connection).
fn every_split(names: &[&'static str], base: u16) -> Vec<Case> {
    let mut v = Vec::new();
    for v6 in [false, true] {
        for split in SPLITS {
            v.push(Case(names.to_vec(), v6, split, base + 10 * v.len() as u16));
        }
    }
    v
}

/// The ids of the queries of `cases` at position `i` on their connection.
fn ids(cases: &[Case], i: u16) -> Vec<u16> {
    let mut v: Vec<u16> = cases.iter().map(|c| c.3 + i).collect();
    v.sort();
    v
}

/// How often dnsmasq got a question for `name`.
fn asked(topo: &Topology, name: &str) -> usize {
    topo.resolver_queries().iter().filter(|q| *q == name).count()
}

#[test]
fn split_queries_for_listed_names_never_reach_the_resolver_and_unlisted_ones_do() {
    let topo = Topology::new().unwrap();
    let rules = topo.dir().join("telegram.rules");
    std::fs::write(&rules, telegram_rules()).unwrap();

    // Harness check: without blokir, every split query is answered.
    let plain = every_split(&[LISTED], 1000);
    assert_eq!(send(&topo, &plain), ids(&plain, 0), "without blokir the split queries are answered\n{}", topo.resolver_log());
    assert_eq!(asked(&topo, LISTED), plain.len(), "{}", topo.resolver_log());
    let pipelined = every_split(&[UNLISTED, LISTED], 2000);
    let mut both = ids(&pipelined, 0);
    both.extend(ids(&pipelined, 1));
    both.sort();
    assert_eq!(send(&topo, &pipelined), both, "{}", topo.resolver_log());
    let before = (asked(&topo, LISTED), asked(&topo, UNLISTED));

    let daemon = topo.start_daemon(std::slice::from_ref(&rules)).unwrap();
    let listed = every_split(&[LISTED], 3000);
    let unlisted = every_split(&[UNLISTED], 4000);
    // An unlisted query then a listed one on one connection: the first is
    // answered, the second never; two unlisted: both answered.
    let then_listed = every_split(&[UNLISTED, LISTED], 5000);
    let two_unlisted = every_split(&[UNLISTED, "nottelegram.org"], 6000);
    let mut want = ids(&unlisted, 0);
    want.extend(ids(&then_listed, 0));
    want.extend(ids(&two_unlisted, 0));
    want.extend(ids(&two_unlisted, 1));
    want.sort();
    let cases: Vec<Case> = listed.into_iter().chain(unlisted).chain(then_listed).chain(two_unlisted).collect();
    assert_eq!(send(&topo, &cases), want, "{}", daemon.log());
    assert_eq!(asked(&topo, LISTED), before.0, "no question for the listed name reached dnsmasq\n{}", topo.resolver_log());
    assert_eq!(asked(&topo, UNLISTED), before.1 + 3 * 8, "every unlisted question reached dnsmasq\n{}", topo.resolver_log());

    // Real dig over TCP, both families.
    let answers = topo.dig_all(&[Query::tcp4(LISTED), Query::tcp6(LISTED), Query::tcp4(UNLISTED), Query::tcp6(UNLISTED)]).unwrap();
    assert!(answers[..2].iter().all(|a| a.timed_out()), "{:?}", answers.iter().map(|a| a.summary()).collect::<Vec<_>>());
    assert!(answers[2..].iter().all(|a| a.resolved_to_expected()), "{:?}", answers.iter().map(|a| a.summary()).collect::<Vec<_>>());
    assert_eq!(asked(&topo, LISTED), before.0, "{}", topo.resolver_log());

    // Counted: every listed query blocked (its retransmissions too), the
    // split ones' first pieces as incomplete.
    let m = daemon.metrics().unwrap();
    let sum = |metric: &str| -> u64 { ["ipv4", "ipv6"].iter().map(|af| m.value(metric, &[("proto", "dns_tcp"), ("af", af)]).unwrap_or(0)).sum() };
    assert!(sum("blokir_blocked_total") >= 16 + 2, "{}", m.lines_of("blokir_").join("\n"));
    assert!(sum("blokir_incomplete_total") >= 3 * 6, "{}", m.lines_of("blokir_").join("\n"));
    topo.kill_client_tcp().unwrap();
    daemon.stop().unwrap();
}
