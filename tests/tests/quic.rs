//! QUIC Initials: crafted datagrams (versions 1 and 2, other packet types,
//! short headers, other versions, short datagrams, other ports) and
//! Chromium's captured Initials through the real program, with the `pass`
//! and `drop` policies, every verdict and counter checked against the host
//! model.

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
            // Not to port 443.
            let (verdict, delta) = check(&mut l, &mut model, &datagram(v6, vlan, 8443, &initials[0].1), "port 8443");
            assert_eq!((verdict, delta.len()), (XDP_PASS, 1));
        }
    }
    let c = l.kernel.counters().unwrap();
    let get = |af, o| c[counters::proto_index(Proto::Quic, af, o) as usize];
    assert_eq!((get(Af::V4, Outcome::Inspected), get(Af::V4, Outcome::Blocked)), (12, 6));
    assert_eq!((get(Af::V6, Outcome::Inspected), get(Af::V6, Outcome::Blocked)), (12, 6));
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
/// (at most `PER_FLOW_CAP` per flow); once the daemon writes a flow into
/// `QUIC_BLOCKED`, every datagram of it to UDP/443 is dropped (Initials and
/// short-header packets alike), and other flows are untouched.
#[test]
fn read_policy_hands_initials_up_and_drops_blocked_flows() {
    use filter_common::{
        quic::{MAP_QUIC_BLOCKED, PER_FLOW_CAP, POLICY_READ},
        tls::FlowKey,
    };
    let mut l = Loaded::new(&["blocked.example"]);
    let mut cfg = l.kernel.config();
    cfg.quic_policy = POLICY_READ;
    l.kernel.write_config(cfg).unwrap();
    let inspected = counters::proto_index(Proto::Quic, Af::V4, Outcome::Inspected);
    let blocked = counters::proto_index(Proto::Quic, Af::V4, Outcome::Blocked);
    let initial = datagram(false, None, 443, &long_header(0xc3, VERSION_1, 8, 1200));
    let short = datagram(false, None, 443, &long_header(0x43, VERSION_1, 8, 1200));
    for i in 0..PER_FLOW_CAP + 2 {
        let fate = if i < PER_FLOW_CAP { counters::QUIC_HANDED_UP } else { counters::QUIC_OVER_CAP };
        l.expect(&format!("Initial {i}"), &initial, XDP_PASS, &[inspected, fate]);
    }
    l.expect("short header, flow not blocked", &short, XDP_PASS, &[]);
    let key = FlowKey {
        src: [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        dst: [198, 18, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        src_port: 50000,
        dst_port: 443,
        family: 4,
    };
    {
        let map = l.kernel.map_mut(MAP_QUIC_BLOCKED).unwrap();
        let mut blocked_flows: aya::maps::HashMap<_, FlowKey, u32> = aya::maps::HashMap::try_from(map).unwrap();
        blocked_flows.insert(key, 1, 0).unwrap();
    }
    l.expect("Initial of the blocked flow", &initial, XDP_DROP, &[inspected, blocked]);
    l.expect("short header of the blocked flow", &short, XDP_DROP, &[blocked]);
    // Another client port: another flow.
    let mut other = initial.clone();
    other[34..36].copy_from_slice(&50001u16.to_be_bytes());
    other[40..42].copy_from_slice(&[0, 0]); // no UDP checksum
    l.expect("Initial of another flow", &other, XDP_PASS, &[inspected, counters::QUIC_HANDED_UP]);
}
