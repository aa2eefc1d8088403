//! End to end, IP fragments (issue #13): DNS queries crafted in the client
//! namespace (tests/e2e_fragments.py, raw sockets) and sent to the real
//! dnsmasq whole or as two fragments (IPv4, IPv6 Fragment header), in order
//! or later fragment first, judged at the server: dnsmasq's log of the
//! questions it got, and the answers that came back. Without blokir the
//! fragments are reassembled and answered (the harness check); under
//! `blokir run` (default `--fragments drop`) no fragmented query reaches
//! dnsmasq, a whole unlisted one is answered, and each first fragment is
//! counted; under `--fragments pass` they pass.
//!
//! Run as root, serially:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test e2e_fragments -- --test-threads=1`.

use std::time::Duration;

use blokir_tests::netns::{CLIENT4, CLIENT6, RESOLVER4, RESOLVER6, Topology, telegram_rules};

const LISTED: &str = "web.telegram.org";
const UNLISTED: &str = "my.telegram.org";
const FRAGMENTED: [&str; 2] = ["in_order", "reversed"];

/// One query: name, IPv6, how it is sent, its source port (also its DNS id
/// and IP identification: unique in the test).
struct Case(&'static str, bool, &'static str, u16);

/// Sends `cases` at once; the source ports of those answered.
fn send(topo: &Topology, cases: &[Case]) -> Vec<u16> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e_fragments.py");
    let json =
        serde_json::to_string(&cases.iter().map(|c| serde_json::json!({"name": c.0, "v6": c.1, "frag": c.2, "sport": c.3})).collect::<Vec<_>>()).unwrap();
    let args = [CLIENT4.to_string(), RESOLVER4.to_string(), CLIENT6.to_string(), RESOLVER6.to_string(), json];
    let out = topo.run_in(topo.client(), &[&["python3", script], &args.each_ref().map(String::as_str)[..]].concat(), Duration::from_secs(20)).unwrap();
    let out = out.ok().unwrap();
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

/// `name` fragmented over both families, in both orders, from ports
/// `base..`.
fn fragmented(name: &'static str, base: u16) -> Vec<Case> {
    let mut v = Vec::new();
    for v6 in [false, true] {
        for order in FRAGMENTED {
            v.push(Case(name, v6, order, base + v.len() as u16));
        }
    }
    v
}

fn ports(cases: &[Case]) -> Vec<u16> {
    let mut p: Vec<u16> = cases.iter().map(|c| c.3).collect();
    p.sort();
    p
}

/// How often dnsmasq got a question for `name`.
fn asked(topo: &Topology, name: &str) -> usize {
    topo.resolver_queries().iter().filter(|q| *q == name).count()
}

#[test]
fn fragmented_queries_never_reach_the_resolver_and_whole_unlisted_ones_do() {
    let topo = Topology::new().unwrap();
    let rules = topo.dir().join("telegram.rules");
    std::fs::write(&rules, telegram_rules()).unwrap();

    // Harness check: without blokir, the server reassembles the fragments
    // and answers every query.
    let plain = fragmented(LISTED, 20000);
    assert_eq!(send(&topo, &plain), ports(&plain), "without blokir the fragmented queries are answered\n{}", topo.resolver_log());
    assert_eq!(asked(&topo, LISTED), plain.len(), "{}", topo.resolver_log());

    let daemon = topo.start_daemon(std::slice::from_ref(&rules)).unwrap();
    let mut cases = fragmented(LISTED, 21000);
    cases.extend(fragmented(UNLISTED, 22000));
    cases.extend([Case(LISTED, false, "whole", 23000), Case(LISTED, true, "whole", 23001)]);
    let whole_unlisted = [Case(UNLISTED, false, "whole", 23002), Case(UNLISTED, true, "whole", 23003)];
    cases.extend(whole_unlisted);
    // Only the whole unlisted queries are answered: a fragmented query is
    // dropped whatever its name.
    assert_eq!(send(&topo, &cases), vec![23002, 23003], "{}", daemon.log());
    assert_eq!(asked(&topo, LISTED), plain.len(), "no new question for the listed name reached dnsmasq\n{}", topo.resolver_log());
    assert_eq!(asked(&topo, UNLISTED), 2, "only the whole unlisted queries reached dnsmasq\n{}", topo.resolver_log());
    let m = daemon.metrics().unwrap();
    assert_eq!(m.value("blokir_evasions_total", &[("kind", "fragment")]), Some(8), "{}", m.lines_of("blokir_").join("\n"));
    assert_eq!(m.value("blokir_fragments_total", &[]), Some(8), "the later fragments passed");
    daemon.stop().unwrap();

    // `--fragments pass`: passed unread, counted.
    let daemon = topo.start_daemon_with(&[rules], &["--fragments", "pass"]).unwrap();
    let passed = fragmented(LISTED, 24000);
    assert_eq!(send(&topo, &passed), ports(&passed), "{}", daemon.log());
    let m = daemon.metrics().unwrap();
    assert_eq!(m.value("blokir_evasions_total", &[("kind", "fragment")]), Some(4), "{}", m.lines_of("blokir_").join("\n"));
    daemon.stop().unwrap();
}
