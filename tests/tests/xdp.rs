//! BPF_PROG_TEST_RUN on the real XDP object: real packets in, verdicts and
//! counter deltas out. Every test loads its own program, with rules applied
//! through the real engine, and asserts the exact verdict of each packet and
//! exactly which counters moved.

use blokir_tests::{
    Loaded, XDP_DROP, XDP_PASS, action_name, capture_frames, counter_deltas, describe_counters,
    model::Model,
    netns::TELEGRAM_NAMES,
    packets::{Frame, QUERY_FLAGS, Transport, dns, query, query_with_cookie, question, raw_message, tcp_prefixed, wire_name},
};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use filter_common::{
    counters::{FRAGMENTS, Outcome, Proto, action_index, malformed_index, proto_index},
    inspect::Inspection,
    packet::{Af, Malformed},
    reply::DnsAction,
};
use hickory_proto::{
    op::{Message, MessageType, OpCode},
    rr::RecordType,
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

/// Offsets in an untagged frame without IP options or extension headers.
const ETH: usize = 14;
const L4_V4: usize = ETH + 20;
const L4_V6: usize = ETH + 40;

// ---------------------------------------------------------------------------
// Helpers

/// UDP and TCP, each over IPv4 and IPv6.
fn transports() -> [Frame; 4] {
    [Frame::udp(), Frame::udp().v6(), Frame::tcp(), Frame::tcp().v6()]
}

fn with_transport(frame: &Frame, transport: Transport) -> Frame {
    Frame { transport, ..frame.clone() }
}

fn label(frame: &Frame) -> String {
    let (proto, af) = frame.proto_af();
    format!("{}/{}{}", proto.name(), af.name(), if frame.vlans.is_empty() { String::new() } else { format!(" vlans {:?}", frame.vlans) })
}

/// What a query is expected to meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// Dropped by a block rule.
    Drop,
    /// Passed: no rule applies.
    Pass,
    /// Passed: an allow rule applies.
    Allow,
}

impl Want {
    fn verdict(self) -> u32 {
        if self == Want::Drop { XDP_DROP } else { XDP_PASS }
    }

    /// The counters a query read over `frame` bumps (besides `PACKETS`).
    fn counted(self, frame: &Frame) -> Vec<u32> {
        let (proto, af) = frame.proto_af();
        let mut v = vec![proto_index(proto, af, Outcome::Inspected)];
        match self {
            // Every list's DNS action is `drop` here.
            Want::Drop => v.extend([proto_index(proto, af, Outcome::Blocked), action_index(DnsAction::Drop)]),
            Want::Allow => v.push(proto_index(proto, af, Outcome::Allowed)),
            Want::Pass => {}
        }
        v
    }
}

/// Sends the DNS message `msg` over `frame` and checks verdict and counters.
fn check_msg(l: &mut Loaded, what: &str, frame: &Frame, msg: &[u8], want: Want) {
    let packet = frame.build(&tcp_prefixed(frame, msg));
    l.expect(&format!("{what} over {}", label(frame)), &packet, want.verdict(), &want.counted(frame));
}

/// A standard A query for `name` over `frame`.
fn check(l: &mut Loaded, frame: &Frame, name: &str, want: Want) {
    l.expect(&format!("{name:?} over {}", label(frame)), &dns(frame, name), want.verdict(), &want.counted(frame));
}

/// A standard A query for `name` over UDP and TCP, IPv4 and IPv6.
fn check_all(l: &mut Loaded, name: &str, want: Want) {
    for frame in transports() {
        check(l, &frame, name, want);
    }
}

fn check_table(l: &mut Loaded, table: &[(&str, Want)]) {
    for (name, want) in table {
        check_all(l, name, *want);
    }
}

/// `bytes` written over `packet` at `at`.
fn patched(mut packet: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
    packet[at..at + bytes.len()].copy_from_slice(bytes);
    packet
}

fn truncated(mut packet: Vec<u8>, len: usize) -> Vec<u8> {
    packet.truncate(len);
    packet
}

// ---------------------------------------------------------------------------
// 1-2. Rule semantics

#[test]
fn telegram_2017_list_drops_exactly_the_listed_names() {
    let mut l = Loaded::new(&TELEGRAM_NAMES);
    for name in TELEGRAM_NAMES {
        check_all(&mut l, name, Want::Drop);
    }
    let unlisted = [
        "www.telegram.org",
        "telegram.com",
        "example.org",
        "org",
        "me",
        "api.t.me",
        "x.venus.web.telegram.org",
        "flora-2.web.telegram.org",
        "mercury.web.telegram.org",
        // Look-alikes.
        "nottelegram.org",
        "telegram.org.evil.example",
        "t.me.example",
        "tt.me",
        "web-telegram.org",
        "telegram.organic",
        "webtelegram.org",
    ];
    for name in unlisted {
        check_all(&mut l, name, Want::Pass);
    }
}

#[test]
fn subtree_rules_allow_rules_and_live_changes() {
    let mut l = Loaded::new(&["*.telegram.org", "allow core.telegram.org"]);
    check_table(
        &mut l,
        &[
            ("web.telegram.org", Want::Drop),
            ("venus.web.telegram.org", Want::Drop),
            ("core.telegram.org", Want::Allow),
            // The allow rule is exact: names below it are still blocked.
            ("x.core.telegram.org", Want::Drop),
            // `*.` covers names strictly below.
            ("telegram.org", Want::Pass),
            ("org", Want::Pass),
            ("nottelegram.org", Want::Pass),
            // Case and the trailing dot do not matter.
            ("WeB.TeLeGrAm.OrG", Want::Drop),
            ("web.telegram.org.", Want::Drop),
            ("WEB.TELEGRAM.ORG.", Want::Drop),
            ("CoRe.TeLeGrAm.OrG.", Want::Allow),
        ],
    );

    // `.name` covers the name itself too.
    l.set_list("test", &[".telegram.org"]);
    check_table(
        &mut l,
        &[
            ("telegram.org", Want::Drop),
            ("TeLeGrAm.OrG.", Want::Drop),
            ("core.telegram.org", Want::Drop),
            ("web.telegram.org", Want::Drop),
            ("nottelegram.org", Want::Pass),
            ("telegram.org.evil.example", Want::Pass),
        ],
    );

    // Rules written in mixed case with a trailing dot; a subtree allow rule.
    l.set_list("test", &["*.TeLeGrAm.OrG.", "allow .Core.Telegram.Org."]);
    check_table(
        &mut l,
        &[
            ("web.telegram.org", Want::Drop),
            ("telegram.org", Want::Pass),
            ("core.telegram.org", Want::Allow),
            ("x.core.telegram.org", Want::Allow),
            ("xcore.telegram.org", Want::Drop),
        ],
    );

    // An allow rule in another list wins over the block rules of this one,
    // and is counted against its own list.
    l.set_list("exceptions", &["allow web.telegram.org"]);
    let exceptions = l.engine.list("exceptions").unwrap().id;
    let before = l.kernel.list_hits(exceptions).unwrap();
    check_all(&mut l, "web.telegram.org", Want::Allow);
    check_all(&mut l, "desktop.telegram.org", Want::Drop);
    let after = l.kernel.list_hits(exceptions).unwrap();
    assert_eq!([after[0] - before[0], after[1] - before[1]], [0, 4], "list hits [blocked, allowed] of the exception list");

    // Live changes: the very next packet sees the new rules.
    let packet = dns(&Frame::udp(), "web.telegram.org");
    let udp4 = Frame::udp();
    l.expect("allowed by the exception list", &packet, XDP_PASS, &Want::Allow.counted(&udp4));
    l.set_list("exceptions", &[]);
    l.expect("exception list emptied", &packet, XDP_DROP, &Want::Drop.counted(&udp4));
    l.set_list("test", &[]);
    l.expect("all rules removed", &packet, XDP_PASS, &Want::Pass.counted(&udp4));
    l.set_list("test", &["web.telegram.org"]);
    l.expect("exact rule added", &packet, XDP_DROP, &Want::Drop.counted(&udp4));
    l.set_list("test", &["core.telegram.org"]);
    l.expect("replaced by another name", &packet, XDP_PASS, &Want::Pass.counted(&udp4));
}

// ---------------------------------------------------------------------------
// 3. Encapsulations

#[test]
fn encapsulations_are_seen_through() {
    let mut l = Loaded::new(&["web.telegram.org"]);
    // Offset 0 without M: a whole datagram behind a Fragment header (an
    // atomic fragment). First fragments are tests/tests/fragments.rs's.
    let atomic = [0x00, 0x00, 0, 0, 0, 42];
    let ah = [0, 0, 0, 0, 1, 0, 0, 0, 1, 0]; // reserved, SPI 1, sequence 1
    let encapsulations = [
        ("plain IPv4", Frame::udp()),
        ("802.1Q", Frame::udp().vlans(&[100])),
        ("QinQ (0x88a8 + 0x8100)", Frame::udp().vlans(&[100, 200])),
        ("802.1Q, IPv6", Frame::udp().v6().vlans(&[7])),
        ("QinQ, IPv6", Frame::udp().v6().vlans(&[7, 4094])),
        ("IPv4 router alert option (IHL 6)", Frame::udp().ipv4_options(&[0x94, 4, 0, 0])),
        ("IPv4 40 bytes of options (IHL 15)", Frame::udp().ipv4_options(&[[1; 39].as_slice(), &[0]].concat())),
        ("IPv4 options in QinQ", Frame::udp().vlans(&[1, 2]).ipv4_options(&[1, 1, 1, 0])),
        ("IPv6 hop-by-hop", Frame::udp().v6().ipv6_ext(0, &[])),
        ("IPv6 destination options", Frame::udp().v6().ipv6_ext(60, &[])),
        ("IPv6 24-byte destination options (PadN)", Frame::udp().v6().ipv6_ext(60, &[1, 20])),
        ("IPv6 routing", Frame::udp().v6().ipv6_ext(43, &[4, 0])),
        ("IPv6 atomic fragment (offset 0, no M)", Frame::udp().v6().ipv6_ext(44, &atomic)),
        ("IPv6 authentication header", Frame::udp().v6().ipv6_ext(51, &ah)),
        (
            "IPv6 hop-by-hop, destination options, routing, atomic fragment",
            Frame::udp().v6().ipv6_ext(0, &[]).ipv6_ext(60, &[]).ipv6_ext(43, &[4, 0]).ipv6_ext(44, &atomic),
        ),
        ("IPv6 7 extension headers in QinQ", (0..7).fold(Frame::udp().v6().vlans(&[5, 6]), |f, _| f.ipv6_ext(60, &[]))),
        ("IPv6 8 extension headers (the most followed)", (0..8).fold(Frame::udp().v6(), |f, _| f.ipv6_ext(60, &[]))),
    ];
    for (what, frame) in &encapsulations {
        for frame in [with_transport(frame, Transport::Udp), with_transport(frame, Transport::Tcp)] {
            let what = format!("{what}, {}", label(&frame));
            l.expect(&format!("{what}, listed"), &dns(&frame, "web.telegram.org"), XDP_DROP, &Want::Drop.counted(&frame));
            l.expect(&format!("{what}, unlisted"), &dns(&frame, "www.telegram.org"), XDP_PASS, &Want::Pass.counted(&frame));
        }
    }

    // Three tags are more than the program follows.
    for frame in transports() {
        let frame = frame.vlans(&[1, 2, 3]);
        l.expect(&format!("three VLAN tags, {}", label(&frame)), &dns(&frame, "web.telegram.org"), XDP_PASS, &[malformed_index(Malformed::L2)]);
    }
}

#[test]
fn later_fragments_pass_and_are_counted() {
    let mut l = Loaded::new(&["web.telegram.org"]);
    // Later fragments that happen to start with a perfect DNS query.
    let later = |offset_field: u16| [offset_field.to_be_bytes().as_slice(), &[0, 0, 0, 9]].concat();
    let cases = [
        ("IPv4, offset 185, last", Frame::udp().fragment(185, false)),
        ("IPv4, offset 1, more", Frame::udp().fragment(1, true)),
        ("IPv4, QinQ, offset 8191", Frame::udp().vlans(&[1, 2]).fragment(8191, false)),
        ("IPv4, TCP, offset 185", Frame::tcp().fragment(185, true)),
        ("IPv6, offset 185, last", Frame::udp().v6().ipv6_ext(44, &later(185 << 3))),
        ("IPv6, offset 1, more", Frame::udp().v6().ipv6_ext(44, &later(1 << 3 | 1))),
        ("IPv6, hop-by-hop then fragment", Frame::udp().v6().ipv6_ext(0, &[]).ipv6_ext(44, &later(185 << 3))),
        ("IPv6, TCP, offset 185", Frame::tcp().v6().ipv6_ext(44, &later(185 << 3))),
    ];
    for (what, frame) in cases {
        l.expect(what, &dns(&frame, "web.telegram.org"), XDP_PASS, &[FRAGMENTS]);
    }
    // A later fragment of something else (ICMP) is not a DNS fragment.
    let icmp = patched(dns(&Frame::udp().fragment(185, false), "web.telegram.org"), ETH + 9, &[1]);
    l.expect("IPv4 later fragment of ICMP", &icmp, XDP_PASS, &[]);
}

// ---------------------------------------------------------------------------
// 4. Names and query types

#[test]
fn longest_names_and_deepest_names() {
    // 4 labels of 63, 63, 63 and 61 bytes: 253 characters, 255 on the wire.
    let longest = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
    assert_eq!((longest.len(), wire_name(&longest).len()), (253, 255));
    let parent = longest[64..].to_string();
    let sibling = format!("{}.{parent}", "e".repeat(63));
    let mut l = Loaded::new(&[&longest]);
    check_table(&mut l, &[(&longest, Want::Drop), (&longest.to_uppercase(), Want::Drop), (&parent, Want::Pass), (&sibling, Want::Pass)]);
    l.set_list("test", &[&format!("*.{parent}")]);
    check_table(&mut l, &[(&longest, Want::Drop), (&sibling, Want::Drop), (&parent, Want::Pass)]);

    // 127 one-character labels: 253 characters, the deepest name there is.
    let deepest = vec!["a"; 127].join(".");
    let below_126 = &deepest[2..];
    assert_eq!(deepest.len(), 253);
    let other_127 = format!("b.{below_126}");
    l.set_list("test", &[&deepest]);
    check_table(&mut l, &[(&deepest, Want::Drop), (&deepest.to_uppercase(), Want::Drop), (below_126, Want::Pass), (&other_127, Want::Pass)]);
    l.set_list("test", &[&format!("*.{below_126}")]);
    check_table(&mut l, &[(&deepest, Want::Drop), (&other_127, Want::Drop), (below_126, Want::Pass)]);
    l.set_list("test", &["*.a", "allow b.a.a"]);
    check_table(&mut l, &[(&deepest, Want::Drop), (&other_127, Want::Drop), ("a", Want::Pass), ("b.a.a", Want::Allow)]);
}

/// The root name (`. NS`, every resolver's priming query) has no label to
/// match: it is inspected and passed, whatever the previous packet on the
/// CPU matched (the scratch buffer is per CPU and outlives a packet).
#[test]
fn root_name_queries_pass_after_blocked_and_allowed_ones() {
    let mut l = Loaded::new(&["web.telegram.org", "allow core.telegram.org"]);
    for frame in transports() {
        for previous in ["web.telegram.org", "core.telegram.org", "web.telegram.org"] {
            let want = if previous == "web.telegram.org" { Want::Drop } else { Want::Allow };
            for _ in 0..4 {
                check(&mut l, &frame, previous, want);
                // Built anew: over TCP each is its own connection (the same
                // segment again would be a retransmission, passed unread).
                let root = frame.build(&tcp_prefixed(&frame, &query(".", RecordType::NS, true)));
                l.expect(&format!("root query after {previous} over {}", label(&frame)), &root, XDP_PASS, &Want::Pass.counted(&frame));
            }
        }
    }
}

#[test]
fn every_query_type_with_and_without_edns_and_cookies() {
    let mut l = Loaded::new(&["web.telegram.org", "*.t.me"]);
    for qtype in [RecordType::A, RecordType::AAAA, RecordType::HTTPS, RecordType::TXT, RecordType::ANY] {
        for (name, want) in [("web.telegram.org", Want::Drop), ("x.t.me", Want::Drop), ("t.me", Want::Pass), ("telegram.org", Want::Pass)] {
            let messages = [("plain", query(name, qtype, false)), ("EDNS", query(name, qtype, true)), ("EDNS, cookie, DO", query_with_cookie(name, qtype))];
            for (extra, msg) in messages {
                for frame in transports() {
                    check_msg(&mut l, &format!("{qtype} {name} ({extra})"), &frame, &msg, want);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 5. What is not inspected, and what is malformed

#[test]
fn responses_other_opcodes_and_other_ports_pass_uninspected() {
    let mut l = Loaded::new(&[".telegram.org"]);
    let name = wire_name("web.telegram.org");
    let q = question(&name, 1);
    let messages = [
        ("response (QR=1)", raw_message(0x8180, 1, &q)),
        ("response with RCODE NXDOMAIN", raw_message(0x8183, 1, &q)),
        ("IQUERY (opcode 1)", raw_message(1 << 11, 1, &q)),
        ("STATUS (opcode 2)", raw_message(2 << 11, 1, &q)),
        ("NOTIFY (opcode 4)", raw_message(4 << 11, 1, &q)),
        ("UPDATE (opcode 5)", raw_message(5 << 11, 1, &q)),
        ("opcode 15", raw_message(15 << 11, 1, &q)),
        // A response with no question: not a query, so not malformed either.
        ("response with qdcount 0", raw_message(0x8180, 0, &[])),
    ];
    for (what, msg) in &messages {
        for frame in transports() {
            l.expect(&format!("{what} over {}", label(&frame)), &frame.build(&tcp_prefixed(&frame, msg)), XDP_PASS, &[]);
        }
    }
    let query = raw_message(QUERY_FLAGS, 1, &q);
    for (what, frame) in [
        ("mDNS (5353)", Frame::udp().ports(5353, 5353)),
        ("from port 53", Frame::udp().ports(53, 40000)),
        ("from port 53, TCP", Frame::tcp().ports(53, 40000)),
        ("to 443 (QUIC)", Frame::udp().v6().ports(40000, 443)),
        ("to 853 (DoT)", Frame::tcp().ports(40000, 853)),
    ] {
        l.expect(what, &frame.build(&tcp_prefixed(&frame, &query)), XDP_PASS, &[]);
    }
    // Neither IP nor IP transport that is inspected.
    let udp = dns(&Frame::udp(), "web.telegram.org");
    l.expect("ARP ethertype", &patched(udp.clone(), 12, &[0x08, 0x06]), XDP_PASS, &[]);
    l.expect("ICMP", &patched(udp.clone(), ETH + 9, &[1]), XDP_PASS, &[]);
    let v6 = dns(&Frame::udp().v6(), "web.telegram.org");
    l.expect("IPv6 no next header", &patched(v6, ETH + 6, &[59]), XDP_PASS, &[]);
    // Sanity: the same query to port 53 is dropped.
    l.expect("the query itself", &udp, XDP_DROP, &Want::Drop.counted(&Frame::udp()));
}

#[test]
fn malformed_dns_passes_and_is_counted() {
    // Rules covering every name fragment used below.
    let mut l = Loaded::new(&[".telegram.org", "web", ".example", ".a", ".org"]);
    let web = wire_name("web.telegram.org");
    let long = [["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(63)].join("."), "telegram.org".into()].join(".");
    let just_over = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(62)].join(".");
    assert_eq!((wire_name(&long).len(), wire_name(&just_over).len()), (270, 256));
    let q = |name: &[u8]| raw_message(QUERY_FLAGS, 1, &question(name, 1));
    let cases: Vec<(&str, Vec<u8>, Malformed)> = vec![
        ("compression pointer as the name", q(&[0xc0, 0x0c]), Malformed::DnsLabel),
        ("compression pointer after a label", q(&[&web[..4], &[0xc0, 0x0c]].concat()), Malformed::DnsLabel),
        ("compression pointer after two labels", q(&[&web[..13], &[0xc0, 0x0c]].concat()), Malformed::DnsLabel),
        ("label length 0x40", q(&[&[0x40][..], &[b'a'; 64], &web].concat()), Malformed::DnsLabel),
        ("label length 0x80", q(&[&[0x80][..], &web].concat()), Malformed::DnsLabel),
        ("qdcount 0", raw_message(QUERY_FLAGS, 0, &question(&web, 1)), Malformed::DnsHeader),
        ("qdcount 2", raw_message(QUERY_FLAGS, 2, &[question(&web, 1), question(&web, 28)].concat()), Malformed::DnsHeader),
        ("qdcount 0xffff", raw_message(QUERY_FLAGS, 0xffff, &question(&web, 1)), Malformed::DnsHeader),
        ("11-byte header", truncated(q(&web), 11), Malformed::DnsHeader),
        ("no DNS header at all", Vec::new(), Malformed::DnsHeader),
        ("header only", raw_message(QUERY_FLAGS, 1, &[]), Malformed::DnsTruncated),
        ("name cut inside a label", q(&web[..9]), Malformed::DnsTruncated),
        ("name without its root byte", q(&web[..web.len() - 1]), Malformed::DnsTruncated),
        ("no QTYPE/QCLASS", raw_message(QUERY_FLAGS, 1, &web), Malformed::DnsTruncated),
        ("QCLASS cut short", truncated(q(&web), 12 + web.len() + 3), Malformed::DnsTruncated),
        ("name over 255 wire bytes", q(&wire_name(&long)), Malformed::DnsNameTooLong),
        ("name of 256 wire bytes", q(&wire_name(&just_over)), Malformed::DnsNameTooLong),
    ];
    for (what, msg, reason) in &cases {
        for frame in transports() {
            let packet = frame.build(&tcp_prefixed(&frame, msg));
            l.expect(&format!("{what} over {}", label(&frame)), &packet, XDP_PASS, &[malformed_index(*reason)]);
        }
    }

    // The UDP length, not the frame, bounds the message: a name running
    // past it is truncated even though the bytes follow in the frame.
    let full = dns(&Frame::udp(), "web.telegram.org");
    let udp_len = (8 + 12 + 9) as u16;
    l.expect(
        "UDP length ends inside the name",
        &patched(full.clone(), L4_V4 + 4, &udp_len.to_be_bytes()),
        XDP_PASS,
        &[malformed_index(Malformed::DnsTruncated)],
    );
    // So does the IP total length (trailing bytes are Ethernet padding).
    let ip_len = (20 + 8 + 12 + 9) as u16;
    l.expect(
        "IPv4 total length ends inside the name",
        &patched(full.clone(), ETH + 2, &ip_len.to_be_bytes()),
        XDP_PASS,
        &[malformed_index(Malformed::DnsTruncated)],
    );
    // And the frame itself: the query cut short.
    l.expect("frame ends inside the name", &truncated(full.clone(), L4_V4 + 8 + 12 + 9), XDP_PASS, &[malformed_index(Malformed::DnsTruncated)]);
    // Padding after a complete query is fine.
    let padded = [full.as_slice(), &[0; 32]].concat();
    l.expect("Ethernet padding after the query", &padded, XDP_DROP, &Want::Drop.counted(&Frame::udp()));
}

#[test]
fn malformed_headers_pass_and_are_counted() {
    let mut l = Loaded::new(&[".telegram.org"]);
    let v4 = dns(&Frame::udp(), "web.telegram.org");
    let v6 = dns(&Frame::udp().v6(), "web.telegram.org");
    let tcp4 = dns(&Frame::tcp(), "web.telegram.org");
    let tcp6 = dns(&Frame::tcp().v6(), "web.telegram.org");
    let ext = dns(&Frame::udp().v6().ipv6_ext(60, &[]), "web.telegram.org");
    let nine_ext = dns(&(0..9).fold(Frame::udp().v6(), |f, _| f.ipv6_ext(60, &[])), "web.telegram.org");
    let cases: Vec<(&str, Vec<u8>, Malformed)> = vec![
        ("VLAN ethertype without a tag", truncated(patched(v4.clone(), 12, &[0x81, 0x00]), ETH), Malformed::L2),
        ("VLAN tag cut short", truncated(dns(&Frame::udp().vlans(&[9]), "web.telegram.org"), ETH + 3), Malformed::L2),
        ("three VLAN tags", dns(&Frame::udp().vlans(&[1, 2, 3]), "web.telegram.org"), Malformed::L2),
        ("truncated IPv4 header", truncated(v4.clone(), ETH + 10), Malformed::Ipv4),
        ("IPv4 header without its options", truncated(dns(&Frame::udp().ipv4_options(&[1; 8]), "web.telegram.org"), ETH + 24), Malformed::Ipv4),
        ("IPv4 IHL 4", patched(v4.clone(), ETH, &[0x44]), Malformed::Ipv4),
        ("IPv4 IHL 0", patched(v4.clone(), ETH, &[0x40]), Malformed::Ipv4),
        ("IPv4 version 6", patched(v4.clone(), ETH, &[0x65]), Malformed::Ipv4),
        ("IPv4 total length below the header", patched(v4.clone(), ETH + 2, &[0, 19]), Malformed::Ipv4),
        ("bad IPv6 version", patched(v6.clone(), ETH, &[0x40]), Malformed::Ipv6),
        ("IPv6 version 0", patched(v6.clone(), ETH, &[0x00]), Malformed::Ipv6),
        ("truncated IPv6 header", truncated(v6.clone(), ETH + 5), Malformed::Ipv6),
        ("IPv6 extension header cut short", truncated(ext.clone(), L4_V6 + 1), Malformed::Ipv6),
        ("IPv6 extension header past the payload", patched(ext.clone(), L4_V6 + 1, &[255]), Malformed::Ipv6),
        ("nine IPv6 extension headers", nine_ext, Malformed::Ipv6),
        ("truncated UDP header", truncated(v4.clone(), L4_V4 + 4), Malformed::L4),
        ("truncated UDP header, IPv6", truncated(v6.clone(), L4_V6 + 5), Malformed::L4),
        ("UDP length 7", patched(v4.clone(), L4_V4 + 4, &[0, 7]), Malformed::L4),
        ("UDP length 0", patched(v6.clone(), L4_V6 + 4, &[0, 0]), Malformed::L4),
        ("truncated TCP header", truncated(tcp4.clone(), L4_V4 + 12), Malformed::L4),
        ("TCP data offset 4", patched(tcp4.clone(), L4_V4 + 12, &[0x40]), Malformed::L4),
        ("TCP data offset 15 past the packet", truncated(patched(tcp6.clone(), L4_V6 + 12, &[0xf0]), L4_V6 + 40), Malformed::L4),
    ];
    for (what, packet, reason) in &cases {
        l.expect(what, packet, XDP_PASS, &[malformed_index(*reason)]);
    }
}

/// An IPv6 packet cut inside its 40-byte fixed header is counted as a bad
/// IPv6 header, not as a bad transport header.
#[test]
fn ipv6_header_cut_inside_the_addresses_is_an_ipv6_malformation() {
    let mut l = Loaded::new(&[".telegram.org"]);
    let v6 = dns(&Frame::udp().v6(), "web.telegram.org");
    for len in [ETH + 7, ETH + 8, ETH + 30, ETH + 39] {
        l.expect(&format!("IPv6 header cut at {}", len - ETH), &truncated(v6.clone(), len), XDP_PASS, &[malformed_index(Malformed::Ipv6)]);
    }
}

// ---------------------------------------------------------------------------
// 6. DNS over TCP

// Queries split across segments, several per connection, reordered: the
// `dns_tcp` suite.

// ---------------------------------------------------------------------------
// 7. Real clients

/// The rules' meaning, written independently of the engine: exact,
/// strictly-below (`*.`) and subtree (`.`) patterns; allow wins.
struct Reference {
    rules: Vec<(bool, String)>,
}

impl Reference {
    fn new(rules: &[&str]) -> Self {
        let rules = rules
            .iter()
            .map(|r| {
                let (allow, pattern) = r.strip_prefix("allow ").map_or((false, *r), |p| (true, p));
                (allow, pattern.trim_end_matches('.').to_ascii_lowercase())
            })
            .collect();
        Reference { rules }
    }

    fn applies(pattern: &str, name: &str) -> bool {
        let below = |parent: &str| name.len() > parent.len() + 1 && name.ends_with(parent) && name.as_bytes()[name.len() - parent.len() - 1] == b'.';
        if let Some(parent) = pattern.strip_prefix("*.") {
            below(parent)
        } else if let Some(parent) = pattern.strip_prefix('.') {
            name == parent || below(parent)
        } else {
            name == pattern
        }
    }

    /// What the rules say about `name` (lowercase, no trailing dot).
    fn decide(&self, name: &str) -> Want {
        let any = |allow: bool| self.rules.iter().any(|(a, p)| *a == allow && Self::applies(p, name));
        if any(true) {
            Want::Allow
        } else if any(false) {
            Want::Drop
        } else {
            Want::Pass
        }
    }
}

#[test]
fn reference_rules_mean_what_the_syntax_says() {
    let r = Reference::new(&["a.example", "*.b.example", ".c.example", "allow x.c.example"]);
    let table = [
        ("a.example", Want::Drop),
        ("x.a.example", Want::Pass),
        ("b.example", Want::Pass),
        ("x.b.example", Want::Drop),
        ("xb.example", Want::Pass),
        ("c.example", Want::Drop),
        ("y.c.example", Want::Drop),
        ("x.c.example", Want::Allow),
        ("example", Want::Pass),
    ];
    for (name, want) in table {
        assert_eq!(r.decide(name), want, "{name}");
    }
}

/// A DNS query as an independent parser (etherparse, hickory) reads it.
struct Query {
    proto: Proto,
    af: Af,
    /// Lowercase, no trailing dot.
    name: String,
}

/// The DNS query in `frame`, if it is one (to port 53, QR=0, opcode QUERY).
/// Panics on DNS that hickory cannot read: the capture holds well-formed
/// DNS only.
fn reference_query(frame: &[u8]) -> Option<Query> {
    let packet = SlicedPacket::from_ethernet(frame).ok()?;
    let af = match packet.net? {
        NetSlice::Ipv4(_) => Af::V4,
        NetSlice::Ipv6(_) => Af::V6,
        NetSlice::Arp(_) => return None,
    };
    let (proto, msg) = match packet.transport? {
        TransportSlice::Udp(u) if u.destination_port() == 53 => (Proto::DnsUdp, u.payload()),
        TransportSlice::Tcp(t) if t.destination_port() == 53 && !t.payload().is_empty() => {
            let p = t.payload();
            let len = u16::from_be_bytes([p[0], p[1]]) as usize;
            assert_eq!(p.len(), 2 + len, "one whole DNS message per TCP segment");
            (Proto::DnsTcp, &p[2..])
        }
        _ => return None,
    };
    let msg = Message::from_vec(msg).expect("well-formed DNS");
    if msg.message_type() != MessageType::Query || msg.op_code() != OpCode::Query {
        return None;
    }
    assert_eq!(msg.queries().len(), 1);
    let labels: Vec<String> = msg.queries()[0].name().iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect();
    Some(Query { proto, af, name: labels.join(".") })
}

/// Runs every packet of the capture, plus every captured UDP query re-sent
/// over TCP (IPv4 and IPv6), under `rules`, and checks each verdict and
/// counter delta against the reference. Returns (dropped, per-name wants).
fn run_capture(rules: &[&str]) -> (usize, Vec<(String, Want)>) {
    let reference = Reference::new(rules);
    let mut l = Loaded::new(rules);
    let mut packets = capture_frames();
    let resent: Vec<Vec<u8>> = packets
        .iter()
        .filter_map(|p| match SlicedPacket::from_ethernet(p).ok()?.transport? {
            TransportSlice::Udp(u) if u.destination_port() == 53 => Some(u.payload().to_vec()),
            _ => None,
        })
        .flat_map(|msg| [Frame::tcp(), Frame::tcp().v6()].map(|f| f.build(&tcp_prefixed(&f, &msg))))
        .collect();
    assert!(!resent.is_empty());
    packets.extend(resent);

    let (mut dropped, mut seen) = (0, Vec::new());
    let mut model = Model::default();
    for (i, packet) in packets.iter().enumerate() {
        let (verdict, want_counted) = match reference_query(packet) {
            Some(q) => {
                let want = reference.decide(&q.name);
                seen.push((q.name.clone(), want));
                let mut c = vec![proto_index(q.proto, q.af, Outcome::Inspected)];
                match want {
                    Want::Drop => c.extend([proto_index(q.proto, q.af, Outcome::Blocked), action_index(DnsAction::Drop)]),
                    Want::Allow => c.push(proto_index(q.proto, q.af, Outcome::Allowed)),
                    Want::Pass => {}
                }
                (want.verdict(), c)
            }
            // TLS (read by the stream stage, modelled), QUIC, responses,
            // ICMPv6, TCP handshakes.
            None => model.run(&l.engine, &l.kernel.config(), packet),
        };
        l.expect(&format!("packet {i} of the capture"), packet, verdict, &want_counted);
        dropped += usize::from(verdict == XDP_DROP);
    }
    (dropped, seen)
}

fn want_of(seen: &[(String, Want)], name: &str) -> Want {
    let wants: Vec<Want> = seen.iter().filter(|(n, _)| n == name).map(|(_, w)| *w).collect();
    assert!(!wants.is_empty(), "{name} is in the capture");
    assert!(wants.iter().all(|w| *w == wants[0]));
    wants[0]
}

#[test]
fn real_client_capture_matches_the_reference() {
    let rules = ["blocked.example", "*.blocked.example", "blocked.test", "allow allowed.example", "allow www.portal.blocked.example"];
    let (dropped, seen) = run_capture(&rules);
    println!("{dropped} of the capture's packets dropped; queries: {seen:?}");
    // 19 UDP queries in the capture, each also re-sent over TCP twice.
    assert_eq!(seen.len(), 19 * 3);
    assert!(dropped > 0);
    for (name, want) in [
        ("blocked.example", Want::Drop),
        ("portal.blocked.example", Want::Drop),
        ("a-1.portal.blocked.example", Want::Drop),
        ("www.portal.blocked.example", Want::Allow),
        ("blocked.test", Want::Drop),
        ("allowed.example", Want::Allow),
        ("x.test", Want::Pass),
        ("notblocked.example", Want::Pass),
        ("blocked.example.evil.example", Want::Pass),
    ] {
        assert_eq!(want_of(&seen, name), want, "{name}");
    }
}

#[test]
fn real_client_capture_matches_the_reference_with_finer_rules() {
    let rules = ["*.portal.blocked.example", "api.blocked.example", ".blocked.test", "allow b.portal.blocked.example", ".evil.example"];
    let (dropped, seen) = run_capture(&rules);
    assert!(dropped > 0);
    for (name, want) in [
        ("blocked.example", Want::Pass),
        ("portal.blocked.example", Want::Pass),
        ("www.portal.blocked.example", Want::Drop),
        ("b.portal.blocked.example", Want::Allow),
        ("api.blocked.example", Want::Drop),
        ("dl.blocked.example", Want::Pass),
        ("blocked.test", Want::Drop),
        ("blocked.example.evil.example", Want::Drop),
        ("notblocked.example", Want::Pass),
    ] {
        assert_eq!(want_of(&seen, name), want, "{name}");
    }
}

// ---------------------------------------------------------------------------
// 8. Host and kernel agree

/// DNS messages to mutate: the fixtures' queries.
fn seed_messages() -> Vec<Vec<u8>> {
    let longest = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
    let deepest = vec!["a"; 127].join(".");
    let mut names: Vec<&str> = TELEGRAM_NAMES.to_vec();
    names.extend(["WeB.TeLeGrAm.OrG.", "www.telegram.org", "core.telegram.org", "nottelegram.org", "x.blocked.example", ".", &longest, &deepest]);
    let mut msgs = Vec::new();
    for name in names {
        msgs.push(query(name, RecordType::A, false));
        msgs.push(query(name, RecordType::AAAA, true));
        msgs.push(query_with_cookie(name, RecordType::HTTPS));
    }
    msgs
}

/// Frames the seeds travel in.
fn seed_frames() -> Vec<Frame> {
    let mut frames = transports().to_vec();
    frames.extend([
        Frame::udp().vlans(&[100]),
        Frame::tcp().vlans(&[100, 200]),
        Frame::udp().ipv4_options(&[0x94, 4, 0, 0]),
        Frame::udp().v6().ipv6_ext(0, &[]).ipv6_ext(44, &[0, 1, 0, 0, 0, 1]),
        Frame::tcp().v6().ipv6_ext(60, &[]),
        Frame::udp().fragment(0, true),
    ]);
    frames
}

/// One random change: a bit flip, a random byte, a cut, an insertion or a
/// deletion, somewhere at or after `from`.
fn mutate(rng: &mut StdRng, data: &mut Vec<u8>, from: usize) {
    let from = from.min(data.len());
    let at = |rng: &mut StdRng, len: usize| rng.random_range(from..=len);
    match rng.random_range(0..6) {
        0 if data.len() > from => {
            let i = rng.random_range(from..data.len());
            data[i] ^= 1 << rng.random_range(0..8);
        }
        1 if data.len() > from => {
            let i = rng.random_range(from..data.len());
            data[i] = *[0x00, 0x01, 0x3f, 0x40, 0x80, 0xc0, 0xff, rng.random()].choose(rng).unwrap();
        }
        2 => {
            let n = at(rng, data.len());
            data.truncate(n);
        }
        3 => {
            let i = at(rng, data.len());
            let n = rng.random_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            data.splice(i..i, bytes);
        }
        4 if data.len() > from => {
            let i = rng.random_range(from..data.len());
            let n = rng.random_range(1..=(data.len() - i).min(8));
            data.drain(i..i + n);
        }
        _ => {
            // A plausible length byte (new label) at a random place.
            let i = at(rng, data.len());
            data.insert(i, rng.random_range(0..70));
        }
    }
}

#[test]
fn host_and_kernel_agree_on_real_and_mutated_packets() {
    let rules =
        [&TELEGRAM_NAMES[..], &["*.telegram.org", "allow core.telegram.org", ".blocked.example", "blocked.test", "allow allowed.example", ".a", "allow b.a.a"]]
            .concat();
    let mut l = Loaded::new(&rules);
    let mut rng = StdRng::seed_from_u64(0x0b10_c1e5);
    let seeds = seed_messages();
    let frames = seed_frames();

    let mut packets = capture_frames();
    for msg in &seeds {
        for frame in &frames {
            packets.push(frame.build(&tcp_prefixed(frame, msg)));
        }
    }
    let unmutated = packets.len();
    // Mutations of the DNS message, framed afterwards (so the lower layers
    // are consistent and the DNS parser is reached).
    for _ in 0..3000 {
        let mut msg = seeds.choose(&mut rng).unwrap().clone();
        for _ in 0..rng.random_range(1..=3) {
            mutate(&mut rng, &mut msg, 0);
        }
        let frame = frames.choose(&mut rng).unwrap();
        let payload = if rng.random_bool(0.8) { tcp_prefixed(frame, &msg) } else { msg };
        packets.push(frame.build(&payload));
    }
    // Mutations of whole frames (headers included), kept long enough for
    // BPF_PROG_TEST_RUN (an Ethernet header at least).
    for _ in 0..2000 {
        let mut frame = packets[..unmutated].choose(&mut rng).unwrap().clone();
        for _ in 0..rng.random_range(1..=3) {
            mutate(&mut rng, &mut frame, 12);
        }
        if frame.len() >= ETH {
            packets.push(frame);
        }
    }

    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    let mut model = Model::default();
    for (i, packet) in packets.iter().enumerate() {
        let host = l.host_inspect(packet);
        let (want_verdict, counted) = model.run(&l.engine, &l.kernel.config(), packet);
        let (verdict, delta) = l.run(packet);
        let want = counter_deltas(&counted);
        assert_eq!(
            (action_name(verdict), describe_counters(&delta)),
            (action_name(want_verdict), describe_counters(&want)),
            "packet {i} (host: {host:?}): {packet:02x?}"
        );
        let kind = match host {
            Inspection::Decided { decision, .. } => format!("{decision:?}").split('(').next().unwrap().to_string(),
            Inspection::Malformed(m) => format!("Malformed({m:?})"),
            other => format!("{other:?}"),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    println!("{} packets ({unmutated} unmutated): {kinds:?}", packets.len());
    // The mutations reach every outcome the DNS stage has.
    for kind in [
        "Block",
        "Allow",
        "NoMatch",
        "Other",
        "Malformed(DnsHeader)",
        "Malformed(DnsLabel)",
        "Malformed(DnsTruncated)",
        "Malformed(DnsNameTooLong)",
        "Malformed(L4)",
    ] {
        assert!(kinds.get(kind).copied().unwrap_or(0) > 0, "no packet ended as {kind}: {kinds:?}");
    }
}

/// The first look (a Bloom filter before the rule map) never hides a listed
/// name: with 20,000 rules, 4,000 of them under four names (so that their
/// blocks fill up and unlisted names there pass the first look), every
/// listed name and its subtree is dropped, unlisted names that pass the
/// first look are still passed (the rule map says no), and so after a swap
/// that changes 1 % of the rules.
#[test]
fn the_first_look_never_hides_a_listed_name_and_never_blocks_an_unlisted_one() {
    use filter_common::name::{CanonBuf, dotted_to_canon, full_name_probe};
    let crowded: Vec<String> = (0..4).flat_map(|j| (0..1000).map(move |i| format!("n{i}.big{j}.test"))).collect();
    let subtrees: Vec<String> = (0..16_000).map(|i| format!("w{i}.e{}.org", i % 8000)).collect();
    let rules_of =
        |crowded: &[String], subtrees: &[String]| -> Vec<String> { crowded.iter().cloned().chain(subtrees.iter().map(|s| format!(".{s}"))).collect() };
    let rules = rules_of(&crowded, &subtrees);
    let refs: Vec<&str> = rules.iter().map(String::as_str).collect();
    let mut l = Loaded::with_capacity(&refs, 1 << 15);
    let frame = Frame::udp();
    let drops = |l: &mut Loaded, name: &str| l.verdict(&dns(&frame, name)) == XDP_DROP;
    let listed_all_dropped = |l: &mut Loaded, crowded: &[String], subtrees: &[String]| {
        for name in crowded {
            assert!(drops(l, name), "{name} is listed but passed");
        }
        for name in subtrees {
            assert!(drops(l, name) && drops(l, &format!("a.b.{name}")), "{name} or below is listed but passed");
        }
    };
    listed_all_dropped(&mut l, &crowded, &subtrees);
    // Unlisted names: the ones whose probe passes the first look must pass
    // all the same; some must not pass it, or the filter is not in use.
    // No rule names a `u` label.
    let check_unlisted = |l: &mut Loaded| {
        let (mut hits, mut misses) = (0, 0);
        let r = l.engine.hash_r();
        for i in 0..3000 {
            for name in [format!("u{i}.big{}.test", i % 4), format!("u{i}.e{i}.org")] {
                let mut buf = CanonBuf::default();
                let len = dotted_to_canon(name.as_bytes(), 0, name.len(), &mut buf).unwrap();
                let (key, block) = full_name_probe(&mut buf, len, &r).unwrap();
                if l.kernel.first_look_passes(block, &key) {
                    hits += 1;
                    assert!(!drops(l, &name), "{name} is not listed but dropped");
                } else {
                    misses += 1;
                }
            }
        }
        assert!(hits >= 1000 && misses >= 1000, "{hits} unlisted names passed the first look, {misses} did not");
    };
    check_unlisted(&mut l);
    // A 1 % swap: 160 subtree rules out, 160 in, 40 crowded names out.
    let removed: Vec<String> = subtrees[..160].to_vec();
    let subtrees2: Vec<String> = subtrees[160..].iter().cloned().chain((0..160).map(|i| format!("v{i}.e{i}.org"))).collect();
    let crowded2: Vec<String> = crowded[40..].to_vec();
    let rules2 = rules_of(&crowded2, &subtrees2);
    let refs2: Vec<&str> = rules2.iter().map(String::as_str).collect();
    l.set_list("test", &refs2);
    listed_all_dropped(&mut l, &crowded2, &subtrees2);
    for name in removed.iter().chain(&crowded[..40]) {
        assert!(!drops(&mut l, name), "{name} was taken off the list but is still dropped");
    }
    check_unlisted(&mut l);
}
