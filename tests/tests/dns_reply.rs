//! Answers built in XDP: for each action, the program's output packet is a
//! valid DNS response to the input query (checked with hickory-proto), with
//! addresses and ports swapped, VLAN tags kept and checksums correct; and the
//! host build of the same answer is byte-for-byte what the kernel sent.

use std::net::{Ipv4Addr, Ipv6Addr};

use blokir_tests::{
    Loaded, XDP_DROP,
    packets::{Frame, query, tcp_prefixed},
};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use filter_common::{
    counters,
    inspect::{Env, Inspection, inspect},
    name::CanonBuf,
    reply::{DnsAction, build_reply},
    rules::Config,
};
use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{RData, RecordType},
};

const XDP_TX: u32 = 3;
const PAGE4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 80);
const PAGE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x80);

/// The program with `web.telegram.org` blocked by list "test", answered
/// with `action`.
fn loaded(action: DnsAction) -> Loaded {
    let mut l = Loaded::new(&["web.telegram.org", "*.t.me"]);
    let mut cfg = l.engine.config();
    cfg.answer_ttl = 300;
    cfg.redirect_flags = Config::REDIRECT_V4 | Config::REDIRECT_V6;
    cfg.redirect_v4 = PAGE4.octets();
    cfg.redirect_v6 = PAGE6.octets();
    l.kernel.write_config(cfg).unwrap();
    let id = l.engine.list("test").unwrap().id;
    l.kernel.write_list_action(id, action, filter_common::reset::TcpAction::Drop).unwrap();
    l
}

/// Runs `pkt` through the kernel; returns the action and output packet.
fn run(l: &mut Loaded, pkt: &[u8]) -> (u32, Vec<u8>) {
    let (action, out, _) = l.kernel.test_run(pkt, 1).unwrap();
    (action, out)
}

/// The same answer built on the host by the shared code.
fn host_reply(l: &Loaded, pkt: &[u8], action: DnsAction) -> Vec<u8> {
    struct Host<'a>(CanonBuf, Config, blokir::rules::engine::Nodes<'a>);
    impl<'a> Env for Host<'a> {
        type Rules = blokir::rules::engine::Nodes<'a>;
        fn resources(&mut self) -> Option<(&mut CanonBuf, &Config, &Self::Rules)> {
            Some((&mut self.0, &self.1, &self.2))
        }
    }
    let mut cfg = l.engine.config();
    cfg.answer_ttl = 300;
    cfg.redirect_flags = Config::REDIRECT_V4 | Config::REDIRECT_V6;
    cfg.redirect_v4 = PAGE4.octets();
    cfg.redirect_v6 = PAGE6.octets();
    let mut env = Host(CanonBuf::default(), cfg, l.engine.nodes());
    let Inspection::Decided { at, .. } = inspect(pkt, &mut env) else { panic!("not decided") };
    let mut out = pkt.to_vec();
    build_reply(&mut out, &at, action, &cfg, |x| x).unwrap();
    out
}

/// Checks everything below DNS and returns the DNS message.
fn check_frame(input: &[u8], out: &[u8]) -> Message {
    // Ethernet addresses swapped, VLAN tags and ethertype kept.
    assert_eq!(out[0..6], input[6..12]);
    assert_eq!(out[6..12], input[0..6]);
    let sin = SlicedPacket::from_ethernet(input).unwrap();
    let sout = SlicedPacket::from_ethernet(out).unwrap();
    let vlans = sin.link_exts.len();
    assert_eq!(vlans, sout.link_exts.len());
    let l3 = 14 + 4 * vlans;
    assert_eq!(out[12..l3], input[12..l3]);
    let (Some(TransportSlice::Udp(uin)), Some(TransportSlice::Udp(uout))) = (&sin.transport, &sout.transport) else { panic!("not UDP") };
    assert_eq!((uout.source_port(), uout.destination_port()), (uin.destination_port(), uin.source_port()));
    let payload = uout.payload();
    assert_eq!(uout.length() as usize, 8 + payload.len());
    match (&sin.net, &sout.net) {
        (Some(NetSlice::Ipv4(a)), Some(NetSlice::Ipv4(b))) => {
            let (ha, hb) = (a.header(), b.header());
            assert_eq!((hb.source(), hb.destination()), (ha.destination(), ha.source()));
            assert_eq!(hb.total_len() as usize, 20 + 8 + payload.len());
            assert_eq!(out.len(), l3 + 20 + 8 + payload.len(), "nothing after the datagram");
            let h = hb.to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 header checksum");
            let want = uout.to_header().calc_checksum_ipv4(&h, payload).unwrap();
            assert_eq!(uout.checksum(), want, "UDP checksum over IPv4");
        }
        (Some(NetSlice::Ipv6(a)), Some(NetSlice::Ipv6(b))) => {
            let (ha, hb) = (a.header(), b.header());
            assert_eq!((hb.source(), hb.destination()), (ha.destination(), ha.source()));
            assert_eq!(hb.payload_length() as usize, 8 + payload.len());
            assert_eq!(out.len(), l3 + 40 + 8 + payload.len(), "nothing after the datagram");
            let want = uout.to_header().calc_checksum_ipv6(&hb.to_header(), payload).unwrap();
            assert_eq!(uout.checksum(), want, "UDP checksum over IPv6");
        }
        _ => panic!("address family changed"),
    }
    Message::from_vec(payload).expect("a valid DNS message")
}

/// The answer must echo the query and carry `rcode` and `answers`.
fn check_answer(query: &Message, resp: &Message, rcode: ResponseCode, answers: &[RData]) {
    assert_eq!(resp.id(), query.id());
    assert_eq!(resp.message_type(), MessageType::Response);
    assert_eq!(resp.op_code(), OpCode::Query);
    assert!(resp.authoritative() && resp.recursion_available());
    assert_eq!(resp.recursion_desired(), query.recursion_desired());
    assert_eq!(resp.response_code(), rcode);
    assert_eq!(resp.queries(), query.queries());
    let got: Vec<RData> = resp.answers().iter().map(|r| r.data().clone()).collect();
    assert_eq!(got, answers);
    for a in resp.answers() {
        assert_eq!(a.name(), query.queries()[0].name());
        assert_eq!(a.ttl(), 300);
    }
    assert!(resp.name_servers().is_empty());
    match (query.extensions(), resp.extensions()) {
        (None, None) => {}
        (Some(q), Some(r)) => {
            assert_eq!(r.max_payload(), 1232);
            assert_eq!(r.flags().dnssec_ok, q.flags().dnssec_ok);
            assert_eq!(r.version(), 0);
        }
        (q, r) => panic!("EDNS in query: {}, in answer: {}", q.is_some(), r.is_some()),
    }
}

fn frames() -> Vec<(&'static str, Frame)> {
    vec![("ipv4", Frame::udp()), ("ipv6", Frame::udp().v6()), ("ipv4 802.1Q", Frame::udp().vlans(&[100])), ("ipv6 QinQ", Frame::udp().v6().vlans(&[100, 200]))]
}

#[test]
fn every_action_answers_with_a_valid_response() {
    use hickory_proto::rr::rdata::{A, AAAA};
    let cases: [(DnsAction, RecordType, ResponseCode, Vec<RData>); 7] = [
        (DnsAction::Nxdomain, RecordType::A, ResponseCode::NXDomain, vec![]),
        (DnsAction::Refused, RecordType::A, ResponseCode::Refused, vec![]),
        (DnsAction::Nodata, RecordType::AAAA, ResponseCode::NoError, vec![]),
        (DnsAction::Redirect, RecordType::A, ResponseCode::NoError, vec![RData::A(A(PAGE4))]),
        (DnsAction::Redirect, RecordType::AAAA, ResponseCode::NoError, vec![RData::AAAA(AAAA(PAGE6))]),
        // Other types get NODATA.
        (DnsAction::Redirect, RecordType::HTTPS, ResponseCode::NoError, vec![]),
        (DnsAction::Redirect, RecordType::TXT, ResponseCode::NoError, vec![]),
    ];
    for (action, qtype, rcode, answers) in cases {
        let mut l = loaded(action);
        for (label, frame) in frames() {
            for edns in [false, true] {
                for name in ["web.telegram.org", "WeB.TeLeGrAm.OrG.", "x.y.t.me"] {
                    let msg = query(name, qtype, edns);
                    let input = frame.build(&msg);
                    let before = l.counter(counters::action_index(action));
                    let (verdict, out) = run(&mut l, &input);
                    let what = format!("{action:?} {qtype} {label} edns={edns} {name}");
                    assert_eq!(verdict, XDP_TX, "{what}");
                    assert_eq!(l.counter(counters::action_index(action)), before + 1, "{what}");
                    let resp = check_frame(&input, &out);
                    check_answer(&Message::from_vec(&msg).unwrap(), &resp, rcode, &answers);
                    assert_eq!(out, host_reply(&l, &input, action), "host and kernel answers differ: {what}");
                }
            }
        }
    }
}

#[test]
fn dnssec_ok_and_cookies_are_handled() {
    let mut l = loaded(DnsAction::Nxdomain);
    let mut m = Message::from_vec(&query("web.telegram.org", RecordType::A, true)).unwrap();
    let edns = m.extensions_mut().as_mut().unwrap();
    edns.set_dnssec_ok(true);
    edns.options_mut().insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(10, vec![1, 2, 3, 4, 5, 6, 7, 8]));
    let msg = m.to_vec().unwrap();
    let input = Frame::udp().build(&msg);
    let (verdict, out) = run(&mut l, &input);
    assert_eq!(verdict, XDP_TX);
    let resp = check_frame(&input, &out);
    check_answer(&m, &resp, ResponseCode::NXDomain, &[]);
    // The client's cookie is not echoed (we are no cookie server).
    assert!(resp.extensions().as_ref().unwrap().options().as_ref().is_empty());
}

#[test]
fn drop_tcp_and_unanswerable_packets_are_dropped_and_counted() {
    let mut l = loaded(DnsAction::Nxdomain);
    let msg = query("web.telegram.org", RecordType::A, true);
    // TCP/53: dropped, never answered.
    let tcp = Frame::tcp();
    let drops = l.counter(counters::action_index(DnsAction::Drop));
    assert_eq!(run(&mut l, &tcp.build(&tcp_prefixed(&tcp, &msg))).0, XDP_DROP);
    assert_eq!(l.counter(counters::action_index(DnsAction::Drop)), drops + 1);
    // IP options and IPv6 extension headers: dropped, counted as not plain.
    let mut with_options = Frame::udp();
    with_options.ipv4_options = vec![1, 1, 1, 1];
    let mut with_ext = Frame::udp().v6();
    with_ext.ipv6_ext = vec![(0, vec![1, 4, 0, 0, 0, 0])];
    for frame in [with_options, with_ext] {
        let not_plain = l.counter(counters::REPLY_NOT_PLAIN);
        assert_eq!(run(&mut l, &frame.build(&msg)).0, XDP_DROP);
        assert_eq!(l.counter(counters::REPLY_NOT_PLAIN), not_plain + 1);
    }
    // A list whose action is drop.
    let mut l = loaded(DnsAction::Drop);
    assert_eq!(run(&mut l, &Frame::udp().build(&msg)).0, XDP_DROP);
    // Unlisted names still pass untouched.
    let mut l = loaded(DnsAction::Redirect);
    let input = Frame::udp().build(&query("core.telegram.org", RecordType::A, true));
    let (verdict, out) = run(&mut l, &input);
    assert_eq!((verdict, out), (2, input));
}
