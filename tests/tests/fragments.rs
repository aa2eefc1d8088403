//! IP fragments (issue #13): the datagram that carries a DNS query, a TLS
//! ClientHello or an HTTP request sent as two IPv4 fragments or with an
//! IPv6 Fragment header, in either order. The first fragment of such a
//! datagram is dropped under `--fragments drop` (the default), so the
//! receiver's reassembly never completes; later fragments pass. Every
//! verdict and counter is checked against the host model too.

use blokir_tests::{
    Loaded, XDP_DROP, XDP_PASS,
    model::Model,
    packets::{Frame, client_hello, dns, fragments, http_get},
};
use filter_common::{
    counters::{EVASION_FRAGMENT, FRAGMENTS},
    inspect::{FRAGMENTS_DROP, FRAGMENTS_PASS},
    rules::MAX_TLS_PORTS,
};

const LISTED: &str = "web.telegram.org";
const UNLISTED: &str = "www.telegram.org";

/// A datagram blokir reads, by what it carries.
struct Datagram {
    what: String,
    frame: Vec<u8>,
    /// Where the first fragment ends: inside the name.
    cut: usize,
}

/// The datagrams carrying `name` over IPv4 and IPv6: a UDP and a TCP DNS
/// query, a ClientHello to 443, an HTTP request to 80 (TCP from a port of
/// the name's own: a flow blocked by one name is not another's).
fn datagrams(name: &str) -> Vec<Datagram> {
    let sport = if name == LISTED { 40001 } else { 40002 };
    let mut v = Vec::new();
    for v6 in [false, true] {
        let fam = |f: Frame| if v6 { f.v6() } else { f };
        let af = if v6 { "IPv6" } else { "IPv4" };
        // UDP header 8, DNS header 12: the name starts at 20.
        v.push(Datagram { what: format!("UDP/53 query, {af}"), frame: dns(&fam(Frame::udp()), name), cut: 24 });
        // TCP header 20, length prefix 2, DNS header 12.
        v.push(Datagram { what: format!("TCP/53 query, {af}"), frame: dns(&fam(Frame::tcp()), name), cut: 40 });
        let hello = client_hello(name);
        // The server name is the hello's last bytes.
        let cut = (20 + hello.len() - name.len() / 2) / 8 * 8;
        v.push(Datagram { what: format!("ClientHello to 443, {af}"), frame: fam(Frame::tcp().ports(sport, 443)).build(&hello), cut });
        // "GET / HTTP/1.1\r\nHost: " is 22 bytes.
        v.push(Datagram { what: format!("HTTP request to 80, {af}"), frame: fam(Frame::tcp().ports(sport, 80)).build(&http_get(&[name])), cut: 48 });
    }
    v
}

fn set_policy(l: &mut Loaded, policy: u32) {
    let mut cfg = l.kernel.config();
    cfg.fragment_policy = policy;
    l.kernel.write_config(cfg).unwrap();
}

#[test]
fn whole_datagrams_are_read_and_their_first_fragments_dropped_in_either_order() {
    let mut l = Loaded::new(&[LISTED]);
    for name in [LISTED, UNLISTED] {
        for d in datagrams(name) {
            let what = format!("{} for {name}", d.what);
            // Whole, the name is read and decides (a blocked TLS or HTTP
            // segment goes on as a RST to the server).
            let mut model = Model::default();
            let whole = l.run_with_model(&mut model, std::slice::from_ref(&d.frame), &format!("{what}, whole"));
            assert_eq!(whole[0] == XDP_PASS, name == UNLISTED, "{what}, whole: {whole:?}");
            // Cut in two, whatever the name: the first fragment is
            // dropped, counted; the later one passes, as before.
            let [first, later] = fragments(&d.frame, d.cut);
            for (order, frames) in [("in order", [first.clone(), later.clone()]), ("later one first", [later.clone(), first.clone()])] {
                let what = format!("{what}, fragments {order}");
                let mut model = Model::default();
                l.run_with_model(&mut model, &frames, &what);
                let first_at = usize::from(order != "in order");
                l.expect(&format!("{what}: first"), &frames[first_at], XDP_DROP, &[EVASION_FRAGMENT]);
                l.expect(&format!("{what}: later"), &frames[1 - first_at], XDP_PASS, &[FRAGMENTS]);
            }
        }
    }
}

#[test]
fn under_the_pass_policy_first_fragments_pass_unread_and_are_counted() {
    let mut l = Loaded::new(&[LISTED]);
    set_policy(&mut l, FRAGMENTS_PASS);
    for d in datagrams(LISTED) {
        let [first, later] = fragments(&d.frame, d.cut);
        let mut model = Model::default();
        l.run_with_model(&mut model, &[first.clone(), later.clone()], &d.what);
        l.expect(&format!("{}: first", d.what), &first, XDP_PASS, &[EVASION_FRAGMENT]);
        l.expect(&format!("{}: later", d.what), &later, XDP_PASS, &[FRAGMENTS]);
    }
    set_policy(&mut l, FRAGMENTS_DROP);
    let [first, _] = fragments(&dns(&Frame::udp(), LISTED), 24);
    l.expect("drop again", &first, XDP_DROP, &[EVASION_FRAGMENT]);
}

/// A program with TLS read on port 443 only: TCP to 8443 is nobody's.
fn tls_on_443_only() -> Loaded {
    let mut l = Loaded::new(&[LISTED]);
    let mut cfg = l.kernel.config();
    cfg.tls_all_ports = 0;
    cfg.tls_ports = [0; MAX_TLS_PORTS];
    cfg.tls_ports[0] = 443;
    l.kernel.write_config(cfg).unwrap();
    l
}

#[test]
fn fragments_of_other_traffic_pass_untouched() {
    let mut l = tls_on_443_only();
    let hello = client_hello(LISTED);
    let mut icmp = dns(&Frame::udp(), LISTED);
    icmp[14 + 9] = 1;
    let cases = [
        ("UDP to 5353", dns(&Frame::udp().ports(40000, 5353), LISTED), 24),
        ("UDP to 5353, IPv6", dns(&Frame::udp().v6().ports(40000, 5353), LISTED), 24),
        ("TCP to 8443", Frame::tcp().ports(40000, 8443).build(&hello), 24),
        ("TCP to 8443, IPv6", Frame::tcp().v6().ports(40000, 8443).build(&hello), 24),
        ("ICMP", icmp, 24),
    ];
    for (what, frame, cut) in cases {
        let [first, later] = fragments(&frame, cut);
        let mut model = Model::default();
        l.run_with_model(&mut model, &[first.clone(), later.clone()], what);
        l.expect(&format!("{what}: first"), &first, XDP_PASS, &[]);
        let later_counted: &[u32] = if what == "ICMP" { &[] } else { &[FRAGMENTS] };
        l.expect(&format!("{what}: later"), &later, XDP_PASS, later_counted);
    }
    // A ClientHello to 443 still is a read port's.
    let [first, _] = fragments(&Frame::tcp().ports(40000, 443).build(&hello), 24);
    l.expect("TCP to 443", &first, XDP_DROP, &[EVASION_FRAGMENT]);
}

#[test]
fn tiny_first_fragments_are_dropped_whatever_their_port() {
    let mut l = tls_on_443_only();
    let hello = client_hello(LISTED);
    let cases = [
        // The TCP header's flags and data offset in the later fragment
        // (RFC 1858): its ports alone say nothing.
        ("TCP header cut at 8, to 8443", fragments(&Frame::tcp().ports(40000, 8443).build(&hello), 8)),
        ("TCP header cut at 16, IPv6", fragments(&Frame::tcp().v6().ports(40000, 8443).build(&hello), 16)),
        // The ports in the later fragment: a 24-byte Destination Options
        // header runs past the first.
        ("IPv6 extension headers cut", fragments(&Frame::udp().v6().ipv6_ext(60, &[1, 20]).build(&[0; 64]), 16)),
        ("IPv6 extension headers cut, TCP to 8443", fragments(&Frame::tcp().v6().ports(40000, 8443).ipv6_ext(60, &[1, 20]).build(&hello), 16)),
    ];
    for (what, [first, later]) in &cases {
        let mut model = Model::default();
        l.run_with_model(&mut model, &[first.clone(), later.clone()], what);
        l.expect(&format!("{what}: first"), first, XDP_DROP, &[EVASION_FRAGMENT]);
    }
    // Whole in the first fragment, the same headers are a port's like any.
    let [first, _] = fragments(&Frame::tcp().v6().ports(40000, 8443).ipv6_ext(60, &[1, 20]).build(&hello), 48);
    l.expect("IPv6 extension headers and TCP header whole, to 8443", &first, XDP_PASS, &[]);
    set_policy(&mut l, FRAGMENTS_PASS);
    for (what, [first, _]) in &cases {
        l.expect(&format!("{what}: first, pass policy"), first, XDP_PASS, &[EVASION_FRAGMENT]);
    }
}
