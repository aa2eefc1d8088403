//! `blokir replay`, the way an operator runs it: the real binary on the
//! shared real-client capture, its JSON lines checked against names read
//! independently (hickory-proto for DNS, tls-parser for ClientHellos) and
//! the rules' meaning; the same capture as pcapng with Linux cooked headers;
//! answering actions; and refusals of bad input.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use blokir_tests::{blokir_bin, capture_frames, netns, pcaps_dir};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use hickory_proto::op::Message;
use serde_json::Value;
use tls_parser::{TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_client_hello_extensions, parse_tls_plaintext};

const RULES: &str = "# replay test\n.blocked.example\nallow mac.blocked.example\nblocked.test\n";

/// The rule that decides `name` under `RULES`, if any.
fn expected_rule(name: &str) -> Option<&'static str> {
    let under = |n: &str, d: &str| n == d || n.ends_with(&format!(".{d}"));
    if under(name, "mac.blocked.example") && name == "mac.blocked.example" {
        Some("allow mac.blocked.example")
    } else if under(name, "blocked.example") {
        Some(".blocked.example")
    } else if name == "blocked.test" {
        Some("blocked.test")
    } else {
        None
    }
}

fn blocks(name: &str) -> bool {
    expected_rule(name).is_some_and(|r| !r.starts_with("allow"))
}

struct Replay {
    records: Vec<Value>,
    summary: Value,
}

fn replay(dir: &Path, capture: &Path, extra: &[&str]) -> Replay {
    let rules = dir.join("national.rules");
    std::fs::write(&rules, RULES).unwrap();
    let out = netns::run(
        Command::new(blokir_bin().unwrap()).arg("replay").arg(capture).arg("--rules").arg(&rules).args(["--output", "json"]).args(extra),
        Duration::from_secs(60),
    )
    .unwrap()
    .ok()
    .unwrap();
    let mut lines: Vec<Value> = out.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect();
    let summary = lines.pop().expect("a summary line")["summary"].clone();
    assert!(summary.is_object(), "the last line is the summary: {summary}");
    Replay { records: lines, summary }
}

/// The query name of a DNS query frame (UDP or TCP to port 53), lower-case
/// without the trailing dot.
fn dns_name(frame: &[u8]) -> Option<(&'static str, String)> {
    let s = SlicedPacket::from_ethernet(frame).ok()?;
    let (proto, payload) = match s.transport? {
        TransportSlice::Udp(u) if u.destination_port() == 53 => ("dns_udp", u.payload().to_vec()),
        TransportSlice::Tcp(t) if t.destination_port() == 53 && t.payload().len() > 2 => ("dns_tcp", t.payload()[2..].to_vec()),
        _ => return None,
    };
    let m = Message::from_vec(&payload).ok()?;
    let q = m.queries().first()?;
    Some((proto, q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase()))
}

/// (client address, client port, server port)
type Flow = (Vec<u8>, u16, u16);

/// Client-to-server TCP segments with payload by flow (client address,
/// client port, server port): frame indexes, and the server name that
/// tls-parser reads from the reassembled stream.
fn tls_flows(frames: &[Vec<u8>]) -> BTreeMap<Flow, (Vec<usize>, Option<String>)> {
    type Segments = Vec<(u32, Vec<u8>)>;
    let mut flows: BTreeMap<Flow, (Vec<usize>, Segments)> = BTreeMap::new();
    for (i, frame) in frames.iter().enumerate() {
        let Ok(s) = SlicedPacket::from_ethernet(frame) else { continue };
        let Some(TransportSlice::Tcp(t)) = s.transport else { continue };
        if t.payload().is_empty() || ![443, 8443].contains(&t.destination_port()) {
            continue;
        }
        let src = match &s.net {
            Some(NetSlice::Ipv4(ip)) => ip.header().source().to_vec(),
            Some(NetSlice::Ipv6(ip)) => ip.header().source().to_vec(),
            _ => continue,
        };
        let flow = flows.entry((src, t.source_port(), t.destination_port())).or_default();
        flow.0.push(i);
        flow.1.push((t.sequence_number(), t.payload().to_vec()));
    }
    flows
        .into_iter()
        .map(|(key, (indexes, segments))| {
            let isn = segments[0].0;
            let mut stream = Vec::new();
            for (seq, data) in &segments {
                if seq.wrapping_sub(isn) as usize == stream.len() {
                    stream.extend_from_slice(data);
                }
            }
            (key, (indexes, reference_sni(&stream)))
        })
        .collect()
}

fn reference_sni(stream: &[u8]) -> Option<String> {
    let (_, plain) = parse_tls_plaintext(stream).ok()?;
    let Some(TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch))) = plain.msg.first() else { return None };
    let (_, exts) = parse_tls_client_hello_extensions(ch.ext.unwrap_or_default()).ok()?;
    exts.iter().find_map(|e| match e {
        TlsExtension::SNI(names) => names.first().map(|(_, n)| String::from_utf8_lossy(n).to_ascii_lowercase()),
        _ => None,
    })
}

fn s(v: &Value) -> Option<&str> {
    v.as_str()
}

#[test]
fn every_packet_of_the_capture_gets_the_kernels_verdict_with_its_name_and_rule() {
    let dir = tempfile::tempdir().unwrap();
    let frames = capture_frames();
    let r = replay(dir.path(), &pcaps_dir().join("real-clients-dev.pcap"), &[]);

    assert_eq!(r.records.len(), frames.len(), "one line per packet");
    for (i, rec) in r.records.iter().enumerate() {
        assert_eq!(rec["index"], i, "packets in capture order");
        for key in ["verdict", "proto", "name", "rule"] {
            assert!(rec.get(key).is_some(), "{rec}: no {key}");
        }
    }
    let tally = |v: &str| r.records.iter().filter(|x| x["verdict"] == v).count();
    for v in ["pass", "drop", "tx", "rst", "aborted", "skipped"] {
        assert_eq!(r.summary[v], tally(v), "summary {v}: {}", r.summary);
    }
    assert_eq!(r.summary["packets"], frames.len());
    assert_eq!(r.summary["disagreements"], 0);

    // DNS: every query named as hickory reads it, decided by the rules.
    let mut queries = 0;
    for (i, frame) in frames.iter().enumerate() {
        let Some((proto, name)) = dns_name(frame) else { continue };
        queries += 1;
        let rec = &r.records[i];
        assert_eq!((s(&rec["proto"]), s(&rec["name"])), (Some(proto), Some(name.as_str())), "packet {i}");
        assert_eq!(s(&rec["rule"]), expected_rule(&name), "packet {i} ({name})");
        assert_eq!(rec["verdict"], if blocks(&name) { "drop" } else { "pass" }, "packet {i} ({name})");
        if expected_rule(&name).is_some() {
            assert_eq!(rec["list"], "national", "packet {i}");
        }
    }
    assert!(queries >= 15, "the capture's DNS queries were found ({queries})");

    // TLS: each flow named after its hello; a listed name's flow is blocked
    // from the segment that completes the name on (that one goes on as a
    // RST that closes the server's end, the later ones are dropped), the
    // others never.
    let flows = tls_flows(&frames);
    let (mut blocked_flows, mut passed_flows) = (0, 0);
    for (key, (indexes, sni)) in &flows {
        let Some(sni) = sni else { continue };
        let recs: Vec<&Value> = indexes.iter().map(|i| &r.records[*i]).collect();
        assert!(recs.iter().any(|x| s(&x["name"]) == Some(sni.as_str()) && x["proto"] == "tls"), "flow {key:?} ({sni}) named: {recs:?}");
        let first = recs.iter().position(|x| x["verdict"] != "pass");
        if blocks(sni) {
            blocked_flows += 1;
            let d = first.unwrap_or_else(|| panic!("flow {key:?} to {sni} not blocked: {recs:?}"));
            assert_eq!(s(&recs[d]["rule"]), expected_rule(sni), "flow {key:?}");
            assert_eq!(recs[d]["verdict"], "rst", "flow {key:?} to {sni}: {recs:?}");
            assert!(recs[d + 1..].iter().all(|x| x["verdict"] == "drop"), "flow {key:?} to {sni}: a later segment passed: {recs:?}");
        } else {
            passed_flows += 1;
            assert_eq!(first, None, "flow {key:?} to {sni} blocked: {recs:?}");
        }
    }
    assert!(blocked_flows >= 10 && passed_flows >= 5, "{blocked_flows} blocked and {passed_flows} passed TLS flows in the capture");
}

/// The capture as pcapng with Linux cooked (SLL2) headers, as `tcpdump -i
/// any` writes it: the same verdicts, names and rules.
#[test]
fn a_pcapng_capture_with_linux_cooked_headers_replays_the_same() {
    use pcap_file::{
        DataLink,
        pcapng::{
            PcapNgWriter,
            blocks::{enhanced_packet::EnhancedPacketBlock, interface_description::InterfaceDescriptionBlock},
        },
    };
    let dir = tempfile::tempdir().unwrap();
    let frames = capture_frames();
    let path = dir.path().join("any.pcapng");
    let mut w = PcapNgWriter::new(std::fs::File::create(&path).unwrap()).unwrap();
    w.write_pcapng_block(InterfaceDescriptionBlock::new(DataLink::LINUX_SLL2, 65535)).unwrap();
    for f in &frames {
        // protocol, reserved, ifindex, ARPHRD_ETHER, PACKET_HOST, halen, address
        let mut sll2 = [f[12], f[13], 0, 0, 0, 0, 0, 2, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0].to_vec();
        sll2[12..18].copy_from_slice(&f[6..12]);
        sll2.extend_from_slice(&f[14..]);
        let len = sll2.len() as u32;
        let block = EnhancedPacketBlock { interface_id: 0, timestamp: Duration::ZERO, original_len: len, data: sll2.into(), options: vec![] };
        w.write_pcapng_block(block).unwrap();
    }
    drop(w);
    let plain = replay(dir.path(), &pcaps_dir().join("real-clients-dev.pcap"), &[]);
    let cooked = replay(dir.path(), &path, &[]);
    assert_eq!(plain.records, cooked.records);
}

#[test]
fn answering_actions_show_as_tx_for_udp_queries_and_drop_for_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let frames = capture_frames();
    let r = replay(dir.path(), &pcaps_dir().join("real-clients-dev.pcap"), &["--list-dns-action", "national=nxdomain"]);
    let mut udp = 0;
    for (i, frame) in frames.iter().enumerate() {
        let Some((proto, name)) = dns_name(frame) else { continue };
        if blocks(&name) {
            let want = if proto == "dns_udp" { "tx" } else { "drop" };
            udp += usize::from(proto == "dns_udp");
            assert_eq!(r.records[i]["verdict"], want, "packet {i} ({proto} {name})");
        }
    }
    assert!(udp > 0);
    assert_eq!(r.summary["tx"], udp);
}

fn refused(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let mut cmd = Command::new(blokir_bin().unwrap());
    cmd.arg("replay");
    for a in args {
        cmd.arg(a);
    }
    let out = netns::run(&mut cmd, Duration::from_secs(30)).unwrap();
    assert!(!out.success(), "{out}");
    assert!(out.stdout.is_empty(), "nothing printed before the refusal: {out}");
    out.stderr
}

#[test]
fn bad_captures_and_rule_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let capture = pcaps_dir().join("real-clients-dev.pcap");
    let missing = dir.path().join("missing.pcap");
    assert!(refused(&[&missing]).contains(&missing.display().to_string()));

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a capture at all\n").unwrap();
    let e = refused(&[&text]);
    assert!(e.contains("neither a pcap nor a pcapng"), "{e}");

    let bad = dir.path().join("bad.rules");
    std::fs::write(&bad, "good.example\nbad name!\n").unwrap();
    let e = refused(&[&capture, &"--rules", &bad]);
    assert!(e.contains(&format!("{}:2:", bad.display())), "FILE:LINE in {e}");

    let e = refused(&[&capture, &"--list-dns-action", &"nosuchlist=nxdomain"]);
    assert!(e.contains("nosuchlist"), "{e}");

    // Link types the program cannot take are named.
    let ppp = dir.path().join("ppp.pcap");
    let header = pcap_file::pcap::PcapHeader { datalink: pcap_file::DataLink::PPP, ..Default::default() };
    drop(pcap_file::pcap::PcapWriter::with_header(std::fs::File::create(&ppp).unwrap(), header).unwrap());
    let e = refused(&[&ppp]);
    assert!(e.contains("PPP") && e.contains("not supported"), "{e}");
}

/// Without rules nothing is dropped, and names are still read.
#[test]
fn without_rules_every_packet_passes_and_names_are_still_shown() {
    let dir = tempfile::tempdir().unwrap();
    let empty: PathBuf = dir.path().join("empty.rules");
    std::fs::write(&empty, "").unwrap();
    let out = netns::run(
        Command::new(blokir_bin().unwrap()).arg("replay").arg(pcaps_dir().join("real-clients-dev.pcap")).arg("--rules").arg(&empty),
        Duration::from_secs(60),
    )
    .unwrap()
    .ok()
    .unwrap();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with(" PACKET  VERDICT"), "a table header: {}", lines[0]);
    assert!(lines[1..lines.len() - 1].iter().all(|l| l.split_whitespace().nth(1) == Some("pass")), "{}", out.stdout);
    assert!(out.stdout.contains("portal.blocked.example"), "names are read: {}", out.stdout);
    assert!(lines.last().unwrap().contains("0 dropped"), "{}", lines.last().unwrap());
}

#[test]
fn the_tcp_reset_action_shows_as_tx_for_blocked_tls_flows() {
    let dir = tempfile::tempdir().unwrap();
    let frames = capture_frames();
    let r = replay(dir.path(), &pcaps_dir().join("real-clients-dev.pcap"), &["--tcp-action", "reset"]);
    assert_eq!(r.summary["disagreements"], 0);
    let mut reset = 0;
    for (key, (indexes, sni)) in &tls_flows(&frames) {
        let Some(sni) = sni else { continue };
        let recs: Vec<&Value> = indexes.iter().map(|i| &r.records[*i]).collect();
        let first = recs.iter().position(|x| x["verdict"] != "pass");
        if blocks(sni) {
            let f = first.unwrap_or_else(|| panic!("flow {key:?} to {sni} not blocked: {recs:?}"));
            assert!(recs[f..].iter().all(|x| x["verdict"] == "tx"), "flow {key:?} to {sni}: every segment from the name on is reset: {recs:?}");
            reset += recs.len() - f;
        } else {
            assert_eq!(first, None, "flow {key:?} to {sni}: {recs:?}");
        }
    }
    assert!(reset >= 10, "{reset} reset segments");
    // DNS queries keep their own action (drop), so every `tx` is a reset.
    assert_eq!(r.summary["tx"], reset);
}

/// The client datagrams to UDP/443 of a capture, by flow: frame indexes.
fn quic_flows(frames: &[Vec<u8>]) -> BTreeMap<Flow, Vec<usize>> {
    let mut flows: BTreeMap<Flow, Vec<usize>> = BTreeMap::new();
    for (i, frame) in frames.iter().enumerate() {
        let Ok(s) = SlicedPacket::from_ethernet(frame) else { continue };
        let Some(TransportSlice::Udp(u)) = s.transport else { continue };
        let src = match &s.net {
            Some(NetSlice::Ipv4(ip)) => ip.header().source().to_vec(),
            Some(NetSlice::Ipv6(ip)) => ip.header().source().to_vec(),
            _ => continue,
        };
        if u.destination_port() == 443 {
            flows.entry((src, u.source_port(), 443)).or_default().push(i);
        }
    }
    flows
}

fn frames_of(path: &Path) -> Vec<Vec<u8>> {
    let mut reader = pcap_file::pcap::PcapReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut frames = Vec::new();
    while let Some(p) = reader.next_packet() {
        frames.push(p.unwrap().data.into_owned());
    }
    frames
}

/// QUIC (`--quic read`, replay's default): Chromium's whole first flight
/// (`tests/data/chromium-quic.pcap`: IPv4 to quic.portal.blocked.example,
/// IPv6 to x.test; two Initials carry each hello, retransmissions follow).
/// The Initial that completes a listed name passes with the name and rule
/// (the daemon's verdict follows it) and every later datagram of the flow
/// is dropped; the unlisted flow passes, named. Without rules, or with
/// `--quic pass`, nothing is dropped (and `pass` reads no name).
#[test]
fn quic_names_are_read_and_a_listed_flow_is_blocked_after_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let capture = blokir_tests::data_capture("chromium-quic.pcap");
    let frames = frames_of(&capture);
    let flows = quic_flows(&frames);
    assert_eq!(flows.len(), 2, "two QUIC flows in the capture");
    let r = replay(dir.path(), &capture, &[]);
    assert_eq!((r.records.len(), &r.summary["disagreements"]), (frames.len(), &Value::from(0)));
    for (key, indexes) in &flows {
        let recs: Vec<&Value> = indexes.iter().map(|i| &r.records[*i]).collect();
        assert!(recs.iter().all(|x| x["proto"] == "quic"), "{recs:?}");
        let named = recs.iter().position(|x| !x["name"].is_null()).unwrap_or_else(|| panic!("flow {key:?} not named: {recs:?}"));
        let name = s(&recs[named]["name"]).unwrap();
        assert_eq!(name, if key.0.len() == 4 { "quic.portal.blocked.example" } else { "x.test" }, "flow {key:?}");
        assert_eq!(named, 1, "the hello ends in the second Initial: {recs:?}");
        assert!(recs[..=named].iter().all(|x| x["verdict"] == "pass"), "{recs:?}");
        assert_eq!(s(&recs[named]["rule"]), expected_rule(name), "flow {key:?}");
        if blocks(name) {
            assert_eq!(recs[named]["list"], "national");
            assert!(s(&recs[named]["note"]).is_some_and(|n| n.contains("QUIC flow blocked")), "{}", recs[named]);
            assert!(recs.len() > named + 2, "retransmissions after the name: {recs:?}");
            assert!(recs[named + 1..].iter().all(|x| x["verdict"] == "drop" && s(&x["name"]) == Some(name)), "{recs:?}");
        } else {
            assert!(recs.iter().all(|x| x["verdict"] == "pass"), "{recs:?}");
        }
    }
    assert_eq!(r.summary["drop"], flows.values().next().unwrap().len() - 2);

    // Without the rule: every datagram passes, the names are still read.
    let empty = dir.path().join("empty.rules");
    std::fs::write(&empty, "").unwrap();
    let out = netns::run(
        Command::new(blokir_bin().unwrap()).arg("replay").arg(&capture).arg("--rules").arg(&empty).args(["--output", "json"]),
        Duration::from_secs(60),
    )
    .unwrap()
    .ok()
    .unwrap();
    let lines: Vec<Value> = out.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines[..lines.len() - 1].iter().all(|x| x["verdict"] == "pass"), "{}", out.stdout);
    assert!(lines.iter().any(|x| x["name"] == "quic.portal.blocked.example"), "{}", out.stdout);

    // `--quic pass`: Initials pass unread.
    let r = replay(dir.path(), &capture, &["--quic", "pass"]);
    assert!(r.records.iter().all(|x| x["verdict"] == "pass" && x["name"].is_null() && x["proto"] == "quic"), "{:?}", r.records);
    assert_eq!(r.summary["drop"], 0);
}

/// The shared capture's QUIC Initials are each the first of a connection
/// whose second Initial was never sent (the capture's server port sent
/// ICMP port unreachable): read, but the hello never completes, so they
/// pass unnamed, even with a rule for their name.
#[test]
fn the_shared_captures_lone_first_initials_pass_unnamed() {
    let dir = tempfile::tempdir().unwrap();
    let frames = capture_frames();
    let r = replay(dir.path(), &pcaps_dir().join("real-clients-dev.pcap"), &[]);
    let flows = quic_flows(&frames);
    assert_eq!(flows.len(), 3);
    for indexes in flows.values() {
        for i in indexes {
            let rec = &r.records[*i];
            assert_eq!((&rec["proto"], &rec["verdict"], rec["name"].is_null()), (&Value::from("quic"), &Value::from("pass"), true), "{rec}");
        }
    }
}
