//! QUIC Initials: crafted datagrams (versions 1 and 2, other packet types,
//! short headers, other versions, short datagrams, any port, the QUIC
//! ports) and
//! Chromium's captured Initials through the real program, with the `pass`
//! and `drop` policies, every verdict and counter checked against the host
//! model.

use blokir::quic::{initial::Version, seal};
use blokir_tests::{Loaded, XDP_DROP, XDP_PASS, capture_frames, counter_deltas, describe_counters, model::Model};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use filter_common::{
    counters::{self, Outcome, Proto},
    packet::Af,
    quic::{POLICY_DROP, VERSION_1, VERSION_2},
};

fn datagram(v6: bool, vlan: Option<u16>, dport: u16, payload: &[u8]) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let (c6, s6) = ([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    let mut v = Vec::new();
    match (vlan, v6) {
        (None, false) => eth.ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64).udp(50000, dport).write(&mut v, payload),
        (None, true) => eth.ipv6(c6, s6, 64).udp(50000, dport).write(&mut v, payload),
        (Some(id), false) => {
            eth.single_vlan(etherparse::VlanId::try_new(id).unwrap()).ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64).udp(50000, dport).write(&mut v, payload)
        }
        (Some(id), true) => eth.single_vlan(etherparse::VlanId::try_new(id).unwrap()).ipv6(c6, s6, 64).udp(50000, dport).write(&mut v, payload),
    }
    .unwrap();
    v
}

/// A long-header packet: first byte, version, an 8-byte DCID (or `dcid_len`
/// announced), padded to `len`.
fn long_header(first: u8, version: u32, dcid_len: u8, len: usize) -> Vec<u8> {
    let mut p = vec![first];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(dcid_len);
    p.extend((0..dcid_len).map(|i| i.wrapping_mul(37)));
    p.extend_from_slice(&[8, 1, 2, 3, 4, 5, 6, 7, 8, 0]);
    p.resize(len, 0);
    p
}

fn check(l: &mut Loaded, model: &mut Model, frame: &[u8], what: &str) -> (u32, Vec<(String, u64)>) {
    let (want, counted) = model.run(&l.engine, &l.kernel.config(), frame);
    let (got, delta) = l.run(frame);
    assert_eq!((got, describe_counters(&delta)), (want, describe_counters(&counter_deltas(&counted))), "{what}");
    (got, describe_counters(&delta))
}

#[test]
fn initials_are_counted_and_dropped_by_the_drop_policy() {
    let mut l = Loaded::new(&["blocked.example"]);
    let mut model = Model::default();
    let initials = [
        ("v1", long_header(0xc3, VERSION_1, 8, 1200)),
        ("v2", long_header(0xd3, VERSION_2, 20, 1350)),
        ("v1, empty DCID", long_header(0xc0, VERSION_1, 0, 1252)),
    ];
    let others = [
        ("v1 0-RTT", long_header(0xd3, VERSION_1, 8, 1200)),
        ("v1 Handshake", long_header(0xe3, VERSION_1, 8, 1200)),
        ("v2 Retry type", long_header(0xc3, VERSION_2, 8, 1200)),
        ("short header", long_header(0x43, VERSION_1, 8, 1200)),
        ("no fixed bit", long_header(0x83, VERSION_1, 8, 1200)),
        ("draft-29", long_header(0xc3, 0xff00_001d, 8, 1200)),
        ("version negotiation", long_header(0xc3, 0, 8, 1200)),
        ("DCID of 21", long_header(0xc3, VERSION_1, 21, 1200)),
        ("1199 bytes", long_header(0xc3, VERSION_1, 8, 1199)),
    ];
    for drop in [false, true] {
        if drop {
            let mut cfg = l.kernel.config();
            cfg.quic_policy = POLICY_DROP;
            l.kernel.write_config(cfg).unwrap();
        }
        for (v6, vlan) in [(false, None), (true, None), (false, Some(5)), (true, Some(4094))] {
            let af = if v6 { Af::V6 } else { Af::V4 };
            for (what, p) in &initials {
                let what = format!("{what}, v6={v6}, vlan={vlan:?}, drop={drop}");
                let (verdict, delta) = check(&mut l, &mut model, &datagram(v6, vlan, 443, p), &what);
                assert_eq!(verdict, if drop { XDP_DROP } else { XDP_PASS }, "{what}");
                let seen = format!("quic_{}_inspected", af.name());
                assert!(delta.contains(&(seen, 1)), "{what}: {delta:?}");
            }
            for (what, p) in &others {
                let what = format!("{what}, v6={v6}, vlan={vlan:?}, drop={drop}");
                let (verdict, delta) = check(&mut l, &mut model, &datagram(v6, vlan, 443, p), &what);
                assert_eq!((verdict, delta.len()), (XDP_PASS, 1), "{what}: {delta:?}");
            }
            // Any UDP port is a QUIC port by default; DNS's is not (the
            // DNS stage reads it).
            let seen = format!("quic_{}_inspected", af.name());
            let (verdict, delta) = check(&mut l, &mut model, &datagram(v6, vlan, 8443, &initials[0].1), "port 8443");
            assert_eq!(verdict, if drop { XDP_DROP } else { XDP_PASS });
            assert!(delta.contains(&(seen.clone(), 1)), "port 8443: {delta:?}");
            let (_, delta) = check(&mut l, &mut model, &datagram(v6, vlan, 53, &initials[0].1), "port 53");
            assert!(!delta.iter().any(|(k, _)| k.starts_with("quic")), "port 53: {delta:?}");
        }
    }
    let c = l.kernel.counters().unwrap();
    let get = |af, o| c[counters::proto_index(Proto::Quic, af, o) as usize];
    assert_eq!((get(Af::V4, Outcome::Inspected), get(Af::V4, Outcome::Blocked)), (16, 8));
    assert_eq!((get(Af::V6, Outcome::Inspected), get(Af::V6, Outcome::Blocked)), (16, 8));
}

/// `--quic-ports`: only the ports listed are read; an Initial to another
/// port passes uncounted, whatever the policy.
#[test]
fn quic_ports_limit_what_is_read() {
    let mut l = Loaded::new(&["blocked.example"]);
    let mut model = Model::default();
    let mut cfg = l.kernel.config();
    cfg.quic_policy = POLICY_DROP;
    cfg.quic_all_ports = 0;
    cfg.quic_ports[..2].copy_from_slice(&[443, 4433]);
    l.kernel.write_config(cfg).unwrap();
    let initial = long_header(0xc3, VERSION_1, 8, 1200);
    for v6 in [false, true] {
        for (port, read) in [(443, true), (4433, true), (8443, false), (443 + 1, false)] {
            let what = format!("port {port}, v6={v6}");
            let (verdict, delta) = check(&mut l, &mut model, &datagram(v6, None, port, &initial), &what);
            assert_eq!((verdict, delta.len()), if read { (XDP_DROP, 3) } else { (XDP_PASS, 1) }, "{what}: {delta:?}");
        }
    }
}

#[test]
fn chromium_initials_from_the_capture() {
    let frames = capture_frames();
    // Client datagrams to UDP/443 whose first packet is a v1 Initial, read
    // with etherparse.
    let initial = |f: &[u8]| {
        let Ok(s) = SlicedPacket::from_ethernet(f) else { return false };
        let Some(TransportSlice::Udp(u)) = s.transport else { return false };
        let p = u.payload();
        u.destination_port() == 443 && p.len() >= 1200 && p[0] & 0xf0 == 0xc0 && p[1..5] == [0, 0, 0, 1]
    };
    let want = frames.iter().filter(|f| initial(f)).count();
    assert!(want > 0, "the capture has Chromium's QUIC Initials");
    for drop in [false, true] {
        let mut l = Loaded::new(&["blocked.example"]);
        let mut model = Model::default();
        if drop {
            let mut cfg = l.kernel.config();
            cfg.quic_policy = POLICY_DROP;
            l.kernel.write_config(cfg).unwrap();
        }
        let mut dropped = 0;
        for (i, f) in frames.iter().enumerate() {
            let (verdict, _) = check(&mut l, &mut model, f, &format!("captured frame {i}, drop={drop}"));
            if initial(f) {
                assert_eq!(verdict, if drop { XDP_DROP } else { XDP_PASS });
                dropped += usize::from(verdict == XDP_DROP);
            }
        }
        let c = l.kernel.counters().unwrap();
        let seen: u64 = Af::ALL.iter().map(|af| c[counters::proto_index(Proto::Quic, *af, Outcome::Inspected) as usize]).sum();
        assert_eq!(seen as usize, want);
        assert_eq!(dropped, if drop { want } else { 0 });
        println!("{want} captured Initials, drop={drop}");
    }
}

/// `--quic read`, the kernel's side: Initials pass and go up to the daemon
/// (at most `PER_FLOW_CAP` per flow); those that cannot go up (past the cap,
/// or no reader: the daemon is down) get the overload policy, pass or drop;
/// once the daemon blocks a flow, every datagram of it is dropped
/// (Initials and short-header packets alike), on any port, and other flows
/// are untouched.
#[test]
fn read_policy_hands_initials_up_and_drops_blocked_flows() {
    use filter_common::{
        quic::{OVERLOAD_DROP, PER_FLOW_CAP, POLICY_READ},
        rules::RuleRef,
        tls::FlowKey,
    };
    let mut l = Loaded::new(&["blocked.example"]);
    let mut cfg = l.kernel.config();
    cfg.quic_policy = POLICY_READ;
    l.kernel.write_config(cfg).unwrap();
    let inspected = counters::proto_index(Proto::Quic, Af::V4, Outcome::Inspected);
    let blocked = counters::proto_index(Proto::Quic, Af::V4, Outcome::Blocked);
    let with_port = |mut f: Vec<u8>, sport: u16, dport: u16| {
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f[40..42].copy_from_slice(&[0, 0]); // no UDP checksum
        f
    };
    let initial = datagram(false, None, 443, &long_header(0xc3, VERSION_1, 8, 1200));
    let short = datagram(false, None, 443, &long_header(0x43, VERSION_1, 8, 1200));

    // No reader yet (the daemon down): undelivered, then the overload policy.
    l.expect("Initial, no reader", &initial, XDP_PASS, &[inspected, counters::QUIC_UNDELIVERED]);
    cfg.quic_overload = OVERLOAD_DROP;
    l.kernel.write_config(cfg).unwrap();
    l.expect("Initial, no reader, overload drop", &initial, XDP_DROP, &[inspected, counters::QUIC_UNDELIVERED, blocked]);
    l.expect("short header, no reader, overload drop", &short, XDP_PASS, &[]);

    // The daemon's end: a buffer on every CPU.
    let (mut perf, mut verdicts) = l.kernel.take_quic().unwrap();
    let buffers: Vec<_> = aya::util::online_cpus().unwrap().into_iter().map(|cpu| perf.open(cpu, Some(64)).unwrap()).collect();
    let fresh = with_port(initial.clone(), 50002, 443);
    for i in 0..PER_FLOW_CAP + 2 {
        let (fate, verdict) = if i < PER_FLOW_CAP { (vec![counters::QUIC_HANDED_UP], XDP_PASS) } else { (vec![counters::QUIC_OVER_CAP, blocked], XDP_DROP) };
        l.expect(&format!("Initial {i}"), &fresh, verdict, &[&[inspected][..], &fate].concat());
    }
    let handed: usize = buffers.iter().map(|b| usize::from(b.readable())).sum();
    assert!(handed > 0, "the Initials reached a buffer");
    cfg.quic_overload = filter_common::quic::OVERLOAD_PASS;
    l.kernel.write_config(cfg).unwrap();
    l.expect("Initial past the cap, overload pass", &fresh, XDP_PASS, &[inspected, counters::QUIC_OVER_CAP]);
    l.expect("short header, flow not blocked", &short, XDP_PASS, &[]);

    let key = |sport: u16, dport: u16| FlowKey {
        src: [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        dst: [198, 18, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        src_port: sport,
        dst_port: dport,
        family: 4,
    };
    let rule = RuleRef::new(1, 0, false);
    verdicts.block(key(50000, 443), rule).unwrap();
    verdicts.count(rule, true);
    l.expect("Initial of the blocked flow", &initial, XDP_DROP, &[inspected, blocked]);
    l.expect("short header of the blocked flow", &short, XDP_DROP, &[blocked]);
    l.expect("Initial of another flow", &with_port(initial.clone(), 50001, 443), XDP_PASS, &[inspected, counters::QUIC_HANDED_UP]);
    l.expect("short header of another flow", &with_port(short.clone(), 50001, 443), XDP_PASS, &[]);
    // On another port: datagrams of its flows pass without a lookup until
    // one of them is blocked.
    let short_8443 = with_port(short.clone(), 50000, 8443);
    l.expect("short header to 8443", &short_8443, XDP_PASS, &[]);
    // What other UDP costs (printed, not asserted: timing on a shared
    // machine): no lookup where no flow is blocked, one where one is.
    let per_packet = |l: &mut Loaded, f: &[u8]| l.kernel.test_run(f, 100_000).unwrap().2.as_nanos();
    let unblocked_port = per_packet(&mut l, &short_8443);
    verdicts.block(key(50000, 8443), rule).unwrap();
    verdicts.count(rule, true);
    l.expect("short header to 8443, blocked", &short_8443, XDP_DROP, &[blocked]);
    let other_flow = with_port(short.clone(), 50009, 8443);
    let blocked_port = per_packet(&mut l, &other_flow);
    println!("a short-header datagram: {unblocked_port} ns a packet to a port without blocked flows, {blocked_port} ns to one with (the lookup)");
    // The verdicts' rule hits, as the match stage counts TLS blocks.
    assert_eq!(l.kernel.rule_hits()[1], 2);
    assert_eq!(l.kernel.list_hits(0).unwrap(), [2, 0]);
    verdicts.count(rule, false);
    assert_eq!((l.kernel.rule_hits()[1], l.kernel.list_hits(0).unwrap()), (3, [2, 1]));

    // A blocked flow silent for `BLOCK_IDLE_NS`: its other datagrams are
    // still dropped (and keep it blocked); an Initial opens a new
    // connection, read afresh, and the flow is forgotten.
    let idle = std::time::Duration::from_nanos(filter_common::quic::BLOCK_IDLE_NS);
    let stale = with_port(initial.clone(), 50003, 443);
    verdicts.block_silent(key(50003, 443), rule, idle).unwrap();
    l.expect("short header of a silent blocked flow", &with_port(short.clone(), 50003, 443), XDP_DROP, &[blocked]);
    l.expect("Initial of it, right after", &stale, XDP_DROP, &[inspected, blocked]);
    verdicts.block_silent(key(50003, 443), rule, idle).unwrap();
    l.expect("Initial of a silent blocked flow", &stale, XDP_PASS, &[inspected, counters::QUIC_HANDED_UP]);
    l.expect("short header after it", &with_port(short.clone(), 50003, 443), XDP_PASS, &[]);
    verdicts.block_silent(key(50003, 443), rule, idle - std::time::Duration::from_secs(5)).unwrap();
    l.expect("Initial of a blocked flow silent not long enough", &stale, XDP_DROP, &[inspected, blocked]);
    drop(buffers);
}

/// A client datagram of flow `sport` (IPv4 or IPv6) to UDP/443.
fn flow_datagram(v6: bool, sport: u16, payload: &[u8]) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let (c6, s6) = ([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    let mut v = Vec::new();
    if v6 {
        eth.ipv6(c6, s6, 64).udp(sport, 443).write(&mut v, payload).unwrap();
    } else {
        eth.ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64).udp(sport, 443).write(&mut v, payload).unwrap();
    }
    v
}

/// `hello` over `packets` Initials of `version`, in stream order, each
/// padded to 1200 bytes.
fn initials(version: Version, dcid: &[u8], hello: &[u8], packets: usize) -> Vec<Vec<u8>> {
    let chunk = hello.len().div_ceil(packets);
    hello
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| seal::initial(version, dcid, &[7; 4], i as u32, &seal::crypto_frame((i * chunk) as u64, part), 1200))
        .collect()
}

/// `--quic read`, the kernel and the daemon together, as the host model
/// runs them (the model plays the daemon: the flows its reader blocks are
/// written into `QUIC_BLOCKED`): crafted flows of both versions and
/// families with the hello over 1 to 3 Initials, then a retransmission and
/// a short-header packet. A listed name's flow passes until the Initial
/// that completes the name (the verdict follows it) and is dropped after;
/// an unlisted one passes whole; junk is handed up and passes; past 8
/// Initials a flow is no longer handed up.
#[test]
fn read_policy_blocks_a_listed_flow_after_its_name_as_the_model_does() {
    use filter_common::quic::POLICY_READ;
    let mut l = Loaded::new(&[".blocked.example"]);
    let mut cfg = l.kernel.config();
    cfg.quic_policy = POLICY_READ;
    l.kernel.write_config(cfg).unwrap();
    let mut model = Model::default();
    let short = long_header(0x43, VERSION_1, 8, 1200);
    let mut sport = 40000;
    for v6 in [false, true] {
        for version in [Version::V1, Version::V2] {
            for packets in [1, 2, 3] {
                for (name, listed) in [("quic.portal.blocked.example", true), ("x.test", false)] {
                    sport += 1;
                    let what = format!("{name}, {version:?}, {packets} Initials, v6={v6}");
                    let hello = seal::client_hello(name, false, 800 * packets);
                    let flow = initials(version, &[0x5a; 8], &hello, packets);
                    for (i, d) in flow.iter().enumerate() {
                        let step = l.step_with_model(&mut model, &flow_datagram(v6, sport, d), &format!("{what}: Initial {i}"));
                        assert_eq!(step.fate(), XDP_PASS, "{what}: Initial {i}");
                        let last = i + 1 == flow.len();
                        assert_eq!(step.name.as_deref(), last.then_some(name), "{what}: Initial {i}");
                        assert_eq!(step.quic_blocked.is_some(), last && listed, "{what}: Initial {i}");
                    }
                    let want = if listed { XDP_DROP } else { XDP_PASS };
                    for (later, d) in [("a retransmission", &flow[0]), ("a short-header packet", &short)] {
                        let step = l.step_with_model(&mut model, &flow_datagram(v6, sport, d), &format!("{what}: {later}"));
                        assert_eq!(step.fate(), want, "{what}: {later}");
                        if listed {
                            assert_eq!(step.name.as_deref(), Some(name), "{what}: {later} named after the flow's hello");
                        }
                    }
                }
            }
        }
    }
    // Another version's Initial and a Handshake packet of a fresh flow:
    // not Initials, so neither counted nor handed up; they pass.
    let mut draft = seal::initial(Version::V1, &[0x5a; 8], &[], 0, &seal::crypto_frame(0, &seal::client_hello("blocked.example", false, 0)), 1200);
    draft[1..5].copy_from_slice(&0xff00_001du32.to_be_bytes());
    let mut handshake = seal::initial(Version::V1, &[0x5a; 8], &[], 0, &seal::crypto_frame(0, &seal::client_hello("blocked.example", false, 0)), 1200);
    handshake[0] = (handshake[0] & 0xcf) | 0x20;
    for (what, d) in [("draft-29", draft), ("a Handshake packet", handshake)] {
        let step = l.step_with_model(&mut model, &flow_datagram(false, 39998, &d), what);
        assert_eq!((step.fate(), step.counted.len(), step.name), (XDP_PASS, 0, None), "{what}");
    }
    // Junk that looks like an Initial: handed up, unread, passed; the
    // ninth of a flow is not handed up.
    let junk = long_header(0xc3, VERSION_1, 8, 1200);
    let verdicts = l.run_with_model(&mut model, &vec![flow_datagram(false, 39999, &junk); 10], "junk Initials");
    assert!(verdicts.iter().all(|v| *v == XDP_PASS));
    let c = l.kernel.counters().unwrap();
    assert_eq!(c[counters::QUIC_OVER_CAP as usize], 2, "Initials past the per-flow cap");
}

/// Chromium's whole first flight (two Initials carrying its hello, then
/// its retransmissions, to a server that never answers), IPv4 to a listed
/// name and IPv6 to an unlisted one: the first flow is blocked from its
/// second Initial on, the other passes; kernel and model agree throughout.
#[test]
fn chromiums_first_flight_through_the_kernel_and_the_reader() {
    use filter_common::quic::POLICY_READ;
    let path = blokir_tests::data_capture("chromium-quic.pcap");
    let mut reader = pcap_file::pcap::PcapReader::new(std::fs::File::open(&path).unwrap()).unwrap();
    let mut frames = Vec::new();
    while let Some(p) = reader.next_packet() {
        frames.push(p.unwrap().data.into_owned());
    }
    let mut l = Loaded::new(&[".blocked.example"]);
    let mut cfg = l.kernel.config();
    cfg.quic_policy = POLICY_READ;
    l.kernel.write_config(cfg).unwrap();
    let mut model = Model::default();
    let mut named = Vec::new();
    let mut verdicts = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let step = l.step_with_model(&mut model, f, &format!("captured datagram {i}"));
        let v6 = SlicedPacket::from_ethernet(f).unwrap().net.is_some_and(|n| matches!(n, etherparse::NetSlice::Ipv6(_)));
        named.push((v6, step.name.clone(), step.quic_blocked.is_some()));
        verdicts.push((v6, step.fate()));
    }
    let v4: Vec<u32> = verdicts.iter().filter(|(v6, _)| !v6).map(|(_, v)| *v).collect();
    let v6: Vec<u32> = verdicts.iter().filter(|(v6, _)| *v6).map(|(_, v)| *v).collect();
    assert!(v4.len() >= 3 && v6.len() >= 3, "{verdicts:?}");
    // The hello spans the first two Initials: the second names the flow.
    assert_eq!(&v4[..2], &[XDP_PASS, XDP_PASS]);
    assert!(v4[2..].iter().all(|v| *v == XDP_DROP), "{v4:?}");
    assert!(v6.iter().all(|v| *v == XDP_PASS), "{v6:?}");
    let v4_named: Vec<_> = named.iter().filter(|(v6, n, _)| !v6 && n.is_some()).collect();
    assert_eq!(v4_named[0], &(false, Some("quic.portal.blocked.example".to_string()), true));
    assert!(named.iter().any(|(v6, n, blocked)| *v6 && n.as_deref() == Some("x.test") && !blocked), "{named:?}");
}
