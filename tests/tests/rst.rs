//! TCP resets and connection starts. The `reset` action: a client segment
//! of a flow blocked by name (TLS server name, HTTP Host) comes back as a
//! RST|ACK (XDP_TX); `drop` lists and unlisted names are unaffected. A new
//! connection (SYN) on the addresses and ports of a blocked flow: the SYN
//! goes on to the server as a RST at the byte the server expects, closing
//! the blocked connection's end, and the next SYN is read afresh. Data that
//! comes before a new connection's first segment is held back. Every packet
//! is checked field by field with etherparse and against the host model.

use blokir_tests::{
    Loaded, PASS_AS_RST, XDP_DROP, XDP_PASS, XDP_TX, action_name, counter_deltas, describe_counters,
    model::Model,
    packets::{Frame, client_hello},
};
use etherparse::{LinkSlice, NetSlice, SlicedPacket, TransportSlice};
use filter_common::{counters, reply::DnsAction, reset::TcpAction};

fn request(host: &str) -> Vec<u8> {
    format!("GET /index.html HTTP/1.1\r\nHost: {host}\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\n\r\n").into_bytes()
}

/// The program with list `resets` (TCP action reset) and list `drops`
/// (TCP action drop), and the host model told the same.
fn setup() -> (Loaded, Model) {
    let mut l = Loaded::new(&[]);
    let mut model = Model::default();
    l.set_list("resets", &["blocked.example", "*.blocked.example"]);
    l.set_list("drops", &["dropped.example"]);
    for (list, action) in [("resets", TcpAction::Reset), ("drops", TcpAction::Drop)] {
        let id = l.engine.list(list).unwrap().id;
        l.kernel.write_list_action(id, DnsAction::Drop, action).unwrap();
        model.set_tcp_action(id, action);
    }
    (l, model)
}

/// Runs `frame` through the kernel and the model; they must agree on the
/// verdict, the counters and the packet sent back or on. Returns the
/// verdict (`PASS_AS_RST` for a segment passed on as a RST).
#[track_caller]
fn run(l: &mut Loaded, model: &mut Model, frame: &[u8], what: &str) -> u32 {
    run_out(l, model, frame, what).0
}

/// `run`, and the packet as it left.
#[track_caller]
fn run_out(l: &mut Loaded, model: &mut Model, frame: &[u8], what: &str) -> (u32, Vec<u8>) {
    let before = l.counters();
    let (verdict, out, _) = l.kernel.test_run(frame, 1).unwrap();
    let delta: Vec<u64> = l.counters().iter().zip(&before).map(|(a, b)| a - b).collect();
    let step = model.step(&l.engine, &l.kernel.config(), frame);
    let want = counter_deltas(&step.counted);
    assert_eq!((action_name(verdict), describe_counters(&delta)), (action_name(step.verdict), describe_counters(&want)), "{what}: kernel and model differ");
    if verdict == XDP_TX {
        assert_eq!(Some(&out), step.sent.as_ref(), "{what}: the kernel's RST and the model's differ");
        check_reset(frame, &out, what);
    }
    if verdict == XDP_PASS {
        assert_eq!(out, step.sent.unwrap_or_else(|| frame.to_vec()), "{what}: the packet passed on differs from the model's");
    }
    (if verdict == XDP_PASS && out != frame { PASS_AS_RST } else { verdict }, out)
}

/// `out` is the RST|ACK answering `input`, field by field.
#[track_caller]
fn check_reset(input: &[u8], out: &[u8], what: &str) {
    let i = SlicedPacket::from_ethernet(input).unwrap();
    let o = SlicedPacket::from_ethernet(out).unwrap_or_else(|e| panic!("{what}: the RST does not parse: {e:?}"));
    let (Some(LinkSlice::Ethernet2(ie)), Some(LinkSlice::Ethernet2(oe))) = (&i.link, &o.link) else { panic!("{what}: not Ethernet") };
    assert_eq!((oe.source(), oe.destination()), (ie.destination(), ie.source()), "{what}: Ethernet addresses swapped");
    let tags = |p: &SlicedPacket| p.vlan().map(|v| format!("{:?}", v.to_header()));
    assert_eq!(tags(&o), tags(&i), "{what}: VLAN tags kept");
    let (Some(TransportSlice::Tcp(it)), Some(TransportSlice::Tcp(ot))) = (&i.transport, &o.transport) else { panic!("{what}: not TCP") };
    assert_eq!((ot.source_port(), ot.destination_port()), (it.destination_port(), it.source_port()), "{what}: ports swapped");
    assert!(ot.rst() && ot.ack() && !ot.syn() && !ot.fin() && !ot.psh() && !ot.urg(), "{what}: flags RST|ACK only");
    assert_eq!(ot.sequence_number(), it.acknowledgment_number(), "{what}: seq is the segment's ack");
    let consumed = it.payload().len() as u32 + u32::from(it.syn()) + u32::from(it.fin());
    assert_eq!(ot.acknowledgment_number(), it.sequence_number().wrapping_add(consumed), "{what}: ack covers the segment");
    assert_eq!((ot.data_offset(), ot.window_size(), ot.urgent_pointer()), (5, 0, 0), "{what}: no options, window 0");
    assert!(ot.payload().is_empty(), "{what}: no payload");
    let th = ot.to_header();
    match (&i.net, &o.net) {
        (Some(NetSlice::Ipv4(iv)), Some(NetSlice::Ipv4(ov))) => {
            let oh = ov.header().to_header();
            assert_eq!((oh.source, oh.destination), (iv.header().destination(), iv.header().source()), "{what}: IPv4 addresses swapped");
            assert_eq!((oh.total_len, oh.time_to_live), (40, 64), "{what}: IPv4 length and TTL");
            assert_eq!(oh.header_checksum, oh.calc_header_checksum(), "{what}: IPv4 header checksum");
            assert_eq!(th.checksum, th.calc_checksum_ipv4(&oh, &[]).unwrap(), "{what}: TCP checksum");
        }
        (Some(NetSlice::Ipv6(iv)), Some(NetSlice::Ipv6(ov))) => {
            let oh = ov.header().to_header();
            assert_eq!((oh.source, oh.destination), (iv.header().destination(), iv.header().source()), "{what}: IPv6 addresses swapped");
            assert_eq!((oh.payload_length, oh.hop_limit), (20, 64), "{what}: IPv6 length and hop limit");
            assert_eq!(th.checksum, th.calc_checksum_ipv6(&oh, &[]).unwrap(), "{what}: TCP checksum");
        }
        _ => panic!("{what}: address family changed"),
    }
}

/// The frames of one client flow: `stream` cut at `cuts`, then one more
/// segment of data after it.
fn flow_frames(base: &Frame, stream: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let (seq0, ack) = (3_000_000_000u32, 777_777u32);
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain([&stream.len()]) {
        if end <= start {
            continue;
        }
        out.push(base.clone().seq_ack(seq0.wrapping_add(start as u32), ack).build(&stream[start..end]));
        start = end;
    }
    out.push(base.clone().seq_ack(seq0.wrapping_add(stream.len() as u32), ack).build(b"more data"));
    out
}

fn shapes() -> Vec<(&'static str, Frame)> {
    vec![("ipv4", Frame::tcp()), ("ipv6", Frame::tcp().v6()), ("ipv4 vlan", Frame::tcp().vlans(&[42])), ("ipv6 qinq", Frame::tcp().v6().vlans(&[7, 42]))]
}

#[test]
fn listed_tls_and_http_flows_get_a_rst_from_the_name_on() {
    let (mut l, mut model) = setup();
    let mut sport = 40000;
    let mut sent = 0;
    for (shape, base) in shapes() {
        for (proto, port, stream) in [("tls", 443, client_hello("www.blocked.example")), ("http", 80, request("www.blocked.example"))] {
            let len = stream.len();
            for cuts in [vec![], vec![len / 2], vec![9, 40, len - 3]] {
                sport += 1;
                let frames = flow_frames(&base.clone().ports(sport, port), &stream, &cuts);
                let what = format!("{proto} {shape} cut at {cuts:?}");
                let verdicts: Vec<u32> = frames.iter().enumerate().map(|(i, f)| run(&mut l, &mut model, f, &format!("{what}, segment {i}"))).collect();
                // Passed until the name is complete, then a RST for every segment.
                let first = verdicts.iter().position(|v| *v != XDP_PASS).unwrap_or_else(|| panic!("{what}: never blocked: {verdicts:?}"));
                assert!(verdicts[first..].iter().all(|v| *v == XDP_TX), "{what}: {verdicts:?}");
                // A hello ends with its name; a request's Host line comes before its end.
                if proto == "tls" {
                    assert_eq!(verdicts.len() - first, 2, "{what}: the name completes with the hello: {verdicts:?}");
                } else {
                    assert!(verdicts.len() - first >= 2, "{what}: {verdicts:?}");
                }
                sent += verdicts.len() - first;
            }
        }
    }
    assert_eq!(l.counter(counters::TCP_RESETS), sent as u64, "one RST per blocked segment");
}

#[test]
fn drop_lists_and_unlisted_names_are_unaffected() {
    let (mut l, mut model) = setup();
    let mut sport = 41000;
    for (shape, base) in shapes() {
        for (proto, port, name, want) in [
            ("tls", 443, "dropped.example", PASS_AS_RST),
            ("http", 80, "dropped.example", PASS_AS_RST),
            ("tls", 443, "fine.example", XDP_PASS),
            ("http", 80, "fine.example", XDP_PASS),
        ] {
            sport += 1;
            let stream = if proto == "tls" { client_hello(name) } else { request(name) };
            let frames = flow_frames(&base.clone().ports(sport, port), &stream, &[]);
            let what = format!("{proto} {shape} {name}");
            let verdicts: Vec<u32> = frames.iter().map(|f| run(&mut l, &mut model, f, &what)).collect();
            // A drop list's name segment goes on as a RST to the server;
            // what follows is dropped.
            let later = if want == PASS_AS_RST { XDP_DROP } else { want };
            assert_eq!(verdicts, [want, later], "{what}");
        }
    }
    assert_eq!(l.counter(counters::TCP_RESETS), 0);
}

#[test]
fn the_choice_is_per_list_and_can_change() {
    let (mut l, mut model) = setup();
    let hello = |sport| Frame::tcp().ports(sport, 443).build(&client_hello("blocked.example"));
    assert_eq!(run(&mut l, &mut model, &hello(42001), "reset list"), XDP_TX);
    let id = l.engine.list("resets").unwrap().id;
    l.kernel.write_list_action(id, DnsAction::Nxdomain, TcpAction::Drop).unwrap();
    model.set_tcp_action(id, TcpAction::Drop);
    assert_eq!(run(&mut l, &mut model, &hello(42002), "now drop"), PASS_AS_RST);
    // The DNS action in the same word is still read as such.
    let q = blokir_tests::packets::dns(&Frame::udp(), "blocked.example");
    assert_eq!(l.verdict(&q), XDP_TX, "a DNS query of the list is answered (nxdomain)");
}

#[test]
fn segments_with_ip_options_or_extension_headers_are_dropped_and_counted() {
    let (mut l, mut model) = setup();
    let hello = client_hello("blocked.example");
    for (what, base) in [
        ("ipv4 options", Frame::tcp().ipv4_options(&[1, 1, 1, 0]).ports(43001, 443)),
        ("ipv6 destination options", Frame::tcp().v6().ipv6_ext(60, &[1, 4, 0, 0, 0, 0]).ports(43002, 443)),
    ] {
        let frame = base.build(&hello);
        let before = l.counter(counters::TCP_RESET_NOT_PLAIN);
        assert_eq!(run(&mut l, &mut model, &frame, what), XDP_DROP, "{what}");
        assert_eq!(l.counter(counters::TCP_RESET_NOT_PLAIN), before + 1, "{what}");
    }
}

/// `out` is the RST to the server made of the segment `input`, at `seq`.
#[track_caller]
fn check_server_reset(input: &[u8], out: &[u8], seq: u32, what: &str) {
    let i = SlicedPacket::from_ethernet(input).unwrap();
    let o = SlicedPacket::from_ethernet(out).unwrap_or_else(|e| panic!("{what}: the RST does not parse: {e:?}"));
    let (Some(LinkSlice::Ethernet2(ie)), Some(LinkSlice::Ethernet2(oe))) = (&i.link, &o.link) else { panic!("{what}: not Ethernet") };
    assert_eq!((oe.source(), oe.destination()), (ie.source(), ie.destination()), "{what}: Ethernet addresses kept");
    let tags = |p: &SlicedPacket| p.vlan().map(|v| format!("{:?}", v.to_header()));
    assert_eq!(tags(&o), tags(&i), "{what}: VLAN tags kept");
    let (Some(TransportSlice::Tcp(it)), Some(TransportSlice::Tcp(ot))) = (&i.transport, &o.transport) else { panic!("{what}: not TCP") };
    assert_eq!((ot.source_port(), ot.destination_port()), (it.source_port(), it.destination_port()), "{what}: ports kept");
    assert!(ot.rst() && !ot.ack() && !ot.syn() && !ot.fin() && !ot.psh() && !ot.urg(), "{what}: flags RST only");
    assert_eq!(ot.sequence_number(), seq, "{what}: seq is the byte the server expects");
    assert_eq!((ot.data_offset(), ot.window_size(), ot.urgent_pointer()), (5, 0, 0), "{what}: no options, window 0");
    assert!(ot.payload().is_empty(), "{what}: no payload");
    let th = ot.to_header();
    match (&i.net, &o.net) {
        (Some(NetSlice::Ipv4(iv)), Some(NetSlice::Ipv4(ov))) => {
            let (ih, oh) = (iv.header().to_header(), ov.header().to_header());
            assert_eq!((oh.source, oh.destination, oh.time_to_live), (ih.source, ih.destination, ih.time_to_live), "{what}: IPv4 addresses and TTL kept");
            assert_eq!(oh.total_len, 40, "{what}: IPv4 length");
            assert_eq!(oh.header_checksum, oh.calc_header_checksum(), "{what}: IPv4 header checksum");
            assert_eq!(th.checksum, th.calc_checksum_ipv4(&oh, &[]).unwrap(), "{what}: TCP checksum");
        }
        (Some(NetSlice::Ipv6(iv)), Some(NetSlice::Ipv6(ov))) => {
            let (ih, oh) = (iv.header().to_header(), ov.header().to_header());
            assert_eq!((oh.source, oh.destination, oh.hop_limit), (ih.source, ih.destination, ih.hop_limit), "{what}: IPv6 addresses and hop limit kept");
            assert_eq!(oh.payload_length, 20, "{what}: IPv6 length");
            assert_eq!(th.checksum, th.calc_checksum_ipv6(&oh, &[]).unwrap(), "{what}: TCP checksum");
        }
        _ => panic!("{what}: address family changed"),
    }
}

/// The sequence number of a TCP frame.
fn seq_of(frame: &[u8]) -> u32 {
    let Some(TransportSlice::Tcp(t)) = SlicedPacket::from_ethernet(frame).unwrap().transport else { panic!("not TCP") };
    t.sequence_number()
}

/// The client's initial sequence number in `flow_frames`.
const ISN: u32 = 3_000_000_000 - 1;

#[test]
fn a_blocked_connections_server_end_is_closed_and_a_new_one_on_its_ports_is_read_afresh() {
    // `drop`: the segment that completes the name goes on as a RST at the
    // byte the server expects, which closes the server's end at once; a new
    // connection from the same port just starts afresh. `reset`: the client
    // is answered, and the server's end is closed when a new connection
    // comes: its SYN goes on as that RST, and the client's next SYN starts
    // afresh.
    let (mut l, mut model) = setup();
    let mut sport = 44000;
    let mut closed = 0;
    for (shape, base) in shapes() {
        for (proto, port, name, reset) in
            [("tls", 443, "www.blocked.example", true), ("tls", 443, "dropped.example", false), ("http", 80, "dropped.example", false)]
        {
            sport += 1;
            let base = base.clone().ports(sport, port);
            let stream = |name: &str| if proto == "tls" { client_hello(name) } else { request(name) };
            let what = format!("{proto} {shape} {name}");
            assert_eq!(run(&mut l, &mut model, &base.clone().syn(ISN).build(&[]), &format!("{what}: SYN")), XDP_PASS);
            let blocked = stream(name);
            let frames = flow_frames(&base, &blocked, &[blocked.len() - 20]);
            let outs: Vec<(u32, Vec<u8>)> = frames.iter().enumerate().map(|(i, f)| run_out(&mut l, &mut model, f, &format!("{what}, segment {i}"))).collect();
            let verdicts: Vec<u32> = outs.iter().map(|(v, _)| *v).collect();
            let first = verdicts.iter().position(|v| *v != XDP_PASS).unwrap_or_else(|| panic!("{what}: never blocked: {verdicts:?}"));
            // The server got everything before the first blocked segment.
            let expects = seq_of(&frames[first]);
            let syn = base.clone().syn(1_234_567).build(&[]);
            if reset {
                assert!(verdicts[first..].iter().all(|v| *v == XDP_TX), "{what}: {verdicts:?}");
                // The client (or a NAT) opens a new connection from the same
                // port: its SYN closes the old connection's server end.
                let (verdict, out) = run_out(&mut l, &mut model, &syn, &format!("{what}: new SYN"));
                assert_eq!(verdict, PASS_AS_RST, "{what}: the new SYN");
                check_server_reset(&syn, &out, expects, &what);
            } else {
                assert_eq!(verdicts[first], PASS_AS_RST, "{what}: {verdicts:?}");
                assert!(verdicts[first + 1..].iter().all(|v| *v == XDP_DROP), "{what}: {verdicts:?}");
                check_server_reset(&frames[first], &outs[first].1, expects, &what);
                assert_eq!(run(&mut l, &mut model, &syn, &format!("{what}: new SYN")), XDP_PASS, "{what}: the server's end is closed already");
            }
            closed += 1;
            // The SYN (again), and the new connection, are read afresh.
            assert_eq!(run(&mut l, &mut model, &syn, &format!("{what}: SYN again")), XDP_PASS);
            let fine = stream("fine.example");
            for (i, f) in fine
                .chunks(fine.len() / 2 + 1)
                .scan(1_234_568u32, |seq, c| {
                    let f = base.clone().seq_ack(*seq, 1).build(c);
                    *seq = seq.wrapping_add(c.len() as u32);
                    Some(f)
                })
                .enumerate()
            {
                assert_eq!(run(&mut l, &mut model, &f, &format!("{what}: new connection, segment {i}")), XDP_PASS);
            }
            // And a third, to the listed name again, is blocked again.
            assert_eq!(run(&mut l, &mut model, &base.clone().syn(ISN).build(&[]), &format!("{what}: third SYN")), XDP_PASS);
            let again: Vec<u32> =
                frames.iter().enumerate().map(|(i, f)| run(&mut l, &mut model, f, &format!("{what}, third connection, segment {i}"))).collect();
            assert_eq!(again, verdicts, "{what}: the third connection");
            closed += u64::from(!reset);
        }
    }
    assert_eq!(l.counter(counters::TCP_SERVER_RESETS), closed);
}

#[test]
fn the_server_reset_is_at_the_first_byte_the_server_lacks() {
    let (mut l, mut model) = setup();
    let base = Frame::tcp().ports(45001, 443);
    let hello = client_hello("dropped.example");
    let n = hello.len();
    let seq0 = ISN.wrapping_add(1);
    // Segment 1 (into the name), then one that overlaps it and carries the
    // rest: the server has segment 1's bytes, whatever the overlap.
    let cut = hello.windows(7).position(|w| w == b"dropped").unwrap() + 3;
    let frames = [base.clone().seq_ack(seq0, 1).build(&hello[..cut]), base.clone().seq_ack(seq0 + cut as u32 - 10, 1).build(&hello[cut - 10..n])];
    assert_eq!(run(&mut l, &mut model, &frames[0], "segment 1"), XDP_PASS);
    let (verdict, out) = run_out(&mut l, &mut model, &frames[1], "overlap");
    assert_eq!(verdict, PASS_AS_RST);
    check_server_reset(&frames[1], &out, seq0 + cut as u32, "after an overlap");
}

#[test]
fn a_syn_whose_rst_cannot_be_written_is_dropped_and_the_flow_stays_blocked() {
    let (mut l, mut model) = setup();
    let base = Frame::tcp().ipv4_options(&[1, 1, 1, 0]).ports(45101, 443);
    assert_eq!(run(&mut l, &mut model, &base.clone().seq_ack(ISN + 1, 1).build(&client_hello("dropped.example")), "hello"), XDP_DROP);
    let before = l.counter(counters::TCP_RESET_NOT_PLAIN);
    assert_eq!(run(&mut l, &mut model, &base.clone().syn(7).build(&[]), "SYN with IP options"), XDP_DROP);
    assert_eq!(l.counter(counters::TCP_RESET_NOT_PLAIN), before + 1);
    assert_eq!(run(&mut l, &mut model, &base.clone().seq_ack(ISN + 1, 1).build(&client_hello("dropped.example")), "resent"), XDP_DROP);
}

#[test]
fn data_before_a_connections_first_segment_is_held_back() {
    let (mut l, mut model) = setup();
    let mut sport = 46000;
    for (shape, base) in shapes() {
        for (proto, port, stream) in [("tls", 443, client_hello("dropped.example")), ("http", 80, request("dropped.example")), ("other", 5000, vec![7u8; 300])]
        {
            sport += 1;
            let base = base.clone().ports(sport, port);
            let what = format!("{proto} {shape}");
            // The name is in the second segment, which comes first.
            let frames = flow_frames(&base, &stream, &[20]);
            assert_eq!(run(&mut l, &mut model, &base.clone().syn(ISN).build(&[]), &format!("{what}: SYN")), XDP_PASS);
            let early = l.counter(counters::TCP_EARLY);
            assert_eq!(run(&mut l, &mut model, &frames[1], &format!("{what}: second segment first")), XDP_DROP);
            assert_eq!(l.counter(counters::TCP_EARLY), early + 1, "{what}");
            let verdicts: Vec<u32> = frames.iter().enumerate().map(|(i, f)| run(&mut l, &mut model, f, &format!("{what}, segment {i} in order"))).collect();
            let want = if proto == "other" { vec![XDP_PASS; 3] } else { vec![XDP_PASS, PASS_AS_RST, XDP_DROP] };
            assert_eq!(verdicts, want, "{what}");
        }
    }
    // TCP Fast Open: a hello in the SYN is the first segment.
    let base = Frame::tcp().ports(46100, 443);
    let tfo = base.clone().syn(ISN).build(&client_hello("dropped.example"));
    assert_eq!(run(&mut l, &mut model, &tfo, "hello in the SYN"), PASS_AS_RST);
    let fine = base.clone().ports(46101, 443).syn(ISN).build(&client_hello("fine.example"));
    assert_eq!(run(&mut l, &mut model, &fine, "unlisted hello in the SYN"), XDP_PASS);
}

/// `--tls-ports 443,8443`: payload and SYNs to other ports (not HTTP ports)
/// pass unread and nothing is recorded for them; the listed ports and the
/// HTTP ports are read as with every port (the default), and a hello on an
/// HTTP port still goes on to the TLS stage.
#[test]
fn only_the_tls_ports_are_read_when_they_are_listed() {
    let (mut l, mut model) = setup();
    let mut cfg = l.kernel.config();
    assert_eq!(cfg.tls_all_ports, 1, "all ports by default");
    cfg.tls_ports[..2].copy_from_slice(&[443, 8443]);
    cfg.tls_all_ports = 0;
    l.kernel.write_config(cfg).unwrap();
    let hello = client_hello("dropped.example");
    let mut sport = 47000;
    for (shape, base) in shapes() {
        for (port, read) in [(443, true), (8443, true), (80, true), (5000, false)] {
            sport += 1;
            let base = base.clone().ports(sport, port);
            let what = format!("port {port} {shape}");
            let frames = flow_frames(&base, &hello, &[20]);
            let before = l.counters();
            assert_eq!(run(&mut l, &mut model, &base.clone().syn(ISN).build(&[]), &format!("{what}: SYN")), XDP_PASS);
            // The name is in the second segment, which comes first: held
            // back where the SYN was recorded, passed where it was not.
            let early = run(&mut l, &mut model, &frames[1], &format!("{what}: second segment first"));
            let verdicts: Vec<u32> = frames.iter().enumerate().map(|(i, f)| run(&mut l, &mut model, f, &format!("{what}, segment {i} in order"))).collect();
            let moved: u64 = l.counters().iter().sum::<u64>() - before.iter().sum::<u64>();
            if read {
                assert_eq!((early, verdicts), (XDP_DROP, vec![XDP_PASS, PASS_AS_RST, XDP_DROP]), "{what}");
                assert!(moved > 5, "{what}: the early segment and the blocked hello are counted");
            } else {
                assert_eq!((early, verdicts), (XDP_PASS, vec![XDP_PASS; 3]), "{what}");
                // Five packets, and no other counter (TLS, TCP events) moved.
                assert_eq!(moved, 5, "{what}: {:?}", describe_counters(&l.counters().iter().zip(&before).map(|(a, b)| a - b).collect::<Vec<_>>()));
            }
        }
        // A whole hello without a SYN seen (picked up mid-stream), and one in
        // a SYN (TCP Fast Open): read on a TLS port only.
        for (port, want) in [(443, PASS_AS_RST), (5000, XDP_PASS)] {
            sport += 1;
            let base = base.clone().ports(sport, port);
            let before: u64 = l.counters().iter().sum();
            assert_eq!(run(&mut l, &mut model, &base.clone().seq_ack(5, 1).build(&hello), &format!("{shape}: whole hello to {port}")), want);
            sport += 1;
            let tfo = base.clone().ports(sport, port).syn(ISN).build(&hello);
            assert_eq!(run(&mut l, &mut model, &tfo, &format!("{shape}: hello in a SYN to {port}")), want);
            let moved = l.counters().iter().sum::<u64>() - before;
            // Unread: two packets counted, nothing else.
            assert_eq!(moved == 2, want == XDP_PASS, "{shape} port {port}: {moved} counts");
        }
    }
    // Back to every port: port 5000 is read again.
    cfg.tls_all_ports = 1;
    l.kernel.write_config(cfg).unwrap();
    let base = Frame::tcp().ports(47900, 5000);
    assert_eq!(run(&mut l, &mut model, &base.clone().syn(ISN).build(&[]), "all: SYN"), XDP_PASS);
    let frames = flow_frames(&base, &hello, &[20]);
    assert_eq!(run(&mut l, &mut model, &frames[1], "all: early"), XDP_DROP);
    let verdicts: Vec<u32> = frames.iter().enumerate().map(|(i, f)| run(&mut l, &mut model, f, &format!("all, segment {i}"))).collect();
    assert_eq!(verdicts, [XDP_PASS, PASS_AS_RST, XDP_DROP]);
}
