//! HTTP request Host names: the streaming parser against httparse on
//! generated requests cut at every byte; and the kernel's HTTP stage on the
//! same requests and on the classic evasions, checked against the host model.

use blokir_tests::{Loaded, PASS_AS_RST, XDP_DROP, XDP_PASS, assert_blocked_from_name, model::Model, packets::client_hello};
use etherparse::PacketBuilder;
use filter_common::{
    counters::{self, Outcome, Proto},
    http::{MAX_HEAD_BYTES, MAX_ROUNDS, Progress, Request, feed, resume},
    name::{CanonBuf, dotted_to_canon},
    packet::Af,
    tls::Resume,
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};

// ---------------------------------------------------------------------------
// The parser against httparse

/// Parses `stream` cut at `cuts` (in order); the outcome and the canonical
/// name read.
fn host_parse(stream: &[u8], cuts: &[usize]) -> (Progress, Option<Vec<u8>>) {
    let seq0 = 7u32;
    let mut r = Box::new(Request::new(seq0));
    let mut bounds: Vec<usize> = cuts.iter().copied().filter(|&c| c > 0 && c < stream.len()).collect();
    bounds.sort();
    bounds.push(stream.len());
    let (mut start, mut progress) = (0, Progress::NeedMore);
    for end in bounds {
        if end <= start {
            continue;
        }
        let seg = &stream[start..end];
        for _ in 0..MAX_ROUNDS {
            let Resume::At(at) = resume(&r, seq0.wrapping_add(start as u32), 0, seg.len()) else { panic!("in-order segment not at the parser") };
            progress = feed(&mut r, seg, at, seg.len());
            if progress != Progress::StepsExhausted {
                break;
            }
        }
        if progress != Progress::NeedMore {
            break;
        }
        start = end;
    }
    let name = match progress {
        Progress::Name(len) => {
            let mut buf = CanonBuf::default();
            r.copy_name(&mut buf);
            Some(buf.canon(len).to_vec())
        }
        _ => None,
    };
    (progress, name)
}

fn canon(dotted: &str) -> Option<Vec<u8>> {
    let mut buf = CanonBuf::default();
    let n = dotted_to_canon(dotted.as_bytes(), 0, dotted.len(), &mut buf).ok()?;
    Some(buf.canon(n).to_vec())
}

/// What a server makes of the request's name, by httparse: the Host
/// header's value without its port and one trailing dot, lowercased, if it
/// is a domain name; `None` for a request without Host. (Absolute-form
/// targets are not generated here: see the unit tests.)
fn reference(stream: &[u8]) -> Result<Option<Option<Vec<u8>>>, String> {
    let mut headers = vec![httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(stream) {
        Ok(httparse::Status::Complete(_)) => {}
        other => return Err(format!("httparse: {other:?}")),
    }
    let Some(h) = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host")) else { return Ok(None) };
    let v = std::str::from_utf8(h.value).map_err(|e| e.to_string())?;
    let host = v.split(':').next().unwrap_or_default();
    let host = host.strip_suffix('.').unwrap_or(host);
    let ok =
        !host.is_empty() && host.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    Ok(Some(if ok { canon(&host.to_ascii_lowercase()) } else { None }))
}

const FILLER: [(&str, &str); 8] = [
    ("User-Agent", "curl/8.14.1"),
    ("Accept", "*/*"),
    ("Accept-Language", "en-US,en;q=0.9"),
    ("Cookie", "session=0123456789abcdef; theme=dark; host=evil.example"),
    ("X-Host", "evil.example"),
    ("Hostname", "evil.example"),
    ("Connection", "keep-alive"),
    ("Referer", "http://evil.example/host:"),
];

/// A random request: method, target, headers in random order and case, the
/// Host with random whitespace, case, port and trailing dot.
fn random_request(rng: &mut StdRng, host: &str) -> Vec<u8> {
    let methods = ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"];
    let method = methods[rng.random_range(0..methods.len())];
    let path: String = (0..rng.random_range(0..300)).map(|_| rng.random_range(b'a'..=b'z') as char).collect();
    let mut headers: Vec<(String, String)> = FILLER.iter().filter(|_| rng.random_bool(0.6)).map(|(n, v)| (n.to_string(), v.to_string())).collect();
    for i in 0..rng.random_range(0..20) {
        headers.push((format!("X-Pad-{i}"), "p".repeat(rng.random_range(0..200))));
    }
    let name = ["Host", "host", "HOST", "hOsT"][rng.random_range(0..4)];
    let value: String = host.chars().map(|c| if rng.random_bool(0.3) { c.to_ascii_uppercase() } else { c }).collect();
    let dot = if rng.random_bool(0.2) { "." } else { "" };
    let port = [String::new(), ":80".into(), ":8080".into()][rng.random_range(0..3)].clone();
    let ws = [("", ""), (" ", ""), ("  ", " "), ("\t", "\t")][rng.random_range(0..4)];
    headers.shuffle(rng);
    let at = rng.random_range(0..=headers.len());
    headers.insert(at, (name.into(), format!("{}{value}{dot}{port}{}", ws.0, ws.1)));
    let eol = if rng.random_bool(0.9) { "\r\n" } else { "\n" };
    let mut s = format!("{method} /{path} HTTP/1.1{eol}");
    for (n, v) in headers {
        s.push_str(&format!("{n}:{v}{eol}"));
    }
    s.push_str(eol);
    s.into_bytes()
}

#[test]
fn parser_agrees_with_httparse_on_generated_requests_cut_anywhere() {
    let mut rng = StdRng::seed_from_u64(80);
    let hosts = ["blocked.example", "www.portal.blocked.example", "a-1.x_y.test", "localhost", "198.18.1.1", "xn--bcher-kva.example"];
    let mut checked = 0;
    for i in 0..600 {
        let host = hosts[i % hosts.len()];
        let req = random_request(&mut rng, host);
        let want = reference(&req).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&req)));
        let want = want.expect("generated requests have a Host");
        let whole = host_parse(&req, &[]);
        assert_eq!(whole.1, want, "{}", String::from_utf8_lossy(&req));
        assert_eq!(whole.1, canon(host), "the name itself");
        // Cut at every byte (the first few requests), and at random places.
        let cuts: Vec<Vec<usize>> = if i < 30 {
            (1..req.len()).map(|c| vec![c]).chain([(1..req.len()).collect()]).collect()
        } else {
            (0..4).map(|_| (0..rng.random_range(1..8)).map(|_| rng.random_range(1..req.len())).collect()).collect()
        };
        for c in cuts {
            assert_eq!(host_parse(&req, &c), whole, "cut at {c:?}: {}", String::from_utf8_lossy(&req));
            checked += 1;
        }
    }
    println!("{checked} cut requests checked");
}

/// Requests as real clients send them (curl 8, Python http.client, Chromium,
/// wget, an HTTP/1.0 client), each compared with httparse.
#[test]
fn parser_agrees_with_httparse_on_real_client_requests() {
    let requests: [&[u8]; 5] = [
        b"GET / HTTP/1.1\r\nHost: blocked.example\r\nUser-Agent: curl/8.14.1\r\nAccept: */*\r\n\r\n",
        b"GET /x?y=1 HTTP/1.1\r\nHost: www.portal.blocked.example:8080\r\nAccept-Encoding: identity\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: allowed.example\r\nConnection: keep-alive\r\nUpgrade-Insecure-Requests: 1\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36\r\nAccept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\nAccept-Encoding: gzip, deflate\r\nAccept-Language: en-US,en;q=0.9\r\n\r\n",
        b"GET /file HTTP/1.1\r\nUser-Agent: Wget/1.25.0\r\nAccept: */*\r\nAccept-Encoding: identity\r\nHost: dl.blocked.example\r\nConnection: Keep-Alive\r\n\r\n",
        b"GET / HTTP/1.0\r\nUser-Agent: old\r\n\r\n",
    ];
    for req in requests {
        let want = reference(req).unwrap();
        let (progress, name) = host_parse(req, &[]);
        match want {
            Some(w) => assert_eq!(name, w, "{}", String::from_utf8_lossy(req)),
            None => assert_eq!(progress, Progress::NoHost),
        }
    }
}

// ---------------------------------------------------------------------------
// The kernel's HTTP stage

#[derive(Clone, Copy)]
struct Flow {
    v6: bool,
    vlan: Option<u16>,
    sport: u16,
    dport: u16,
}

impl Flow {
    fn v4(sport: u16) -> Self {
        Flow { v6: false, vlan: None, sport, dport: 80 }
    }

    fn frame(&self, payload: &[u8], seq: u32) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let (c6, s6) = ([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        let mut v = Vec::new();
        match (self.vlan, self.v6) {
            (None, false) => eth.ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64).tcp(self.sport, self.dport, seq, 64240).ack(1).psh().write(&mut v, payload),
            (None, true) => eth.ipv6(c6, s6, 64).tcp(self.sport, self.dport, seq, 64240).ack(1).psh().write(&mut v, payload),
            (Some(id), false) => eth
                .single_vlan(etherparse::VlanId::try_new(id).unwrap())
                .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
                .tcp(self.sport, self.dport, seq, 64240)
                .ack(1)
                .psh()
                .write(&mut v, payload),
            (Some(id), true) => eth
                .single_vlan(etherparse::VlanId::try_new(id).unwrap())
                .ipv6(c6, s6, 64)
                .tcp(self.sport, self.dport, seq, 64240)
                .ack(1)
                .psh()
                .write(&mut v, payload),
        }
        .unwrap();
        v
    }

    /// The segments of `stream` cut at `cuts`.
    fn segments(&self, stream: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let seq0 = 3_000_000u32;
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([&stream.len()]) {
            if end > start {
                out.push(self.frame(&stream[start..end], seq0.wrapping_add(start as u32)));
                start = end;
            }
        }
        out
    }
}

fn request(host: &str) -> Vec<u8> {
    format!("GET /index.html HTTP/1.1\r\nUser-Agent: curl/8.14.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n").into_bytes()
}

const LISTED: [&str; 3] = ["blocked.example", "*.blocked.example", "allow ok.blocked.example"];

#[test]
fn kernel_blocks_listed_hosts_in_every_cut_and_passes_the_others() {
    let mut l = Loaded::new(&LISTED);
    let mut model = Model::default();
    let mut rng = StdRng::seed_from_u64(3);
    let mut sport = 40000u16;
    let hosts = [
        ("blocked.example", true),
        ("WWW.Blocked.Example:8080", true),
        ("ok.blocked.example", false),
        ("notblocked.example", false),
        ("blocked.example.evil.example", false),
    ];
    for (host, listed) in hosts {
        let req = request(host);
        let n = req.len();
        let mut random: Vec<usize> = (0..5).map(|_| rng.random_range(1..n)).collect();
        random.sort();
        let name_at = req.windows(5).position(|w| w == b"Host:").unwrap() + 7;
        for (what, cuts) in
            [("whole", vec![]), ("1-byte", (1..n).collect()), ("random", random), ("name split", vec![name_at + 3]), ("header name split", vec![name_at - 5])]
        {
            for (v6, vlan) in [(false, None), (true, None), (false, Some(42)), (true, Some(7))] {
                sport += 1;
                let flow = Flow { v6, vlan, ..Flow::v4(sport) };
                // A body after the head, in the same flow.
                let mut stream = req.clone();
                stream.extend_from_slice(b"trailing bytes of the flow");
                let frames = flow.segments(&stream, &cuts);
                let what = format!("{host}, {what}, v6={v6}, vlan={vlan:?}");
                let verdicts = l.run_with_model(&mut model, &frames, &what);
                if listed {
                    assert_blocked_from_name(&verdicts, &what);
                } else {
                    assert!(verdicts.iter().all(|v| *v == XDP_PASS), "{what}: {verdicts:?}");
                }
            }
        }
    }
    let c = l.kernel.counters().unwrap();
    let get = |af, o| c[counters::proto_index(Proto::Http, af, o) as usize];
    // 5 hosts x 5 cuts x 2 (with and without VLAN) per family.
    assert_eq!(get(Af::V4, Outcome::Inspected), 50);
    assert_eq!(get(Af::V6, Outcome::Blocked), 20);
    assert_eq!(get(Af::V4, Outcome::Allowed), 10);
}

#[test]
fn reordered_segments_wait_for_the_gap_and_retransmissions_are_read_once() {
    let mut l = Loaded::new(&LISTED);
    let mut model = Model::default();
    let req = request("www.blocked.example");
    let frames = Flow::v4(41000).segments(&req, &(10..req.len()).step_by(10).collect::<Vec<_>>());
    assert!(frames.len() > 6);
    assert_eq!(l.run_with_model(&mut model, &frames[..1], "first"), [XDP_PASS]);
    let before = l.counter(counters::HTTP_OUT_OF_ORDER);
    assert_eq!(l.run_with_model(&mut model, &[frames[3].clone(), frames[2].clone()], "ahead"), [XDP_DROP, XDP_DROP]);
    assert_eq!(l.counter(counters::HTTP_OUT_OF_ORDER), before + 2);
    // Segment 0 again (a retransmission), then in order from 1.
    assert_eq!(l.run_with_model(&mut model, &frames[..1], "retransmission"), [XDP_PASS]);
    let verdicts = l.run_with_model(&mut model, &frames[1..], "in order");
    assert_blocked_from_name(&verdicts, "in order");
}

#[test]
fn requests_without_a_usable_host_pass_and_are_counted() {
    let mut l = Loaded::new(&LISTED);
    let mut model = Model::default();
    let cases: [(&[u8], u32, u32); 6] = [
        (b"GET / HTTP/1.0\r\nUser-Agent: old\r\n\r\n", XDP_PASS, counters::HTTP_NO_HOST),
        (b"GET / HTTP/1.1\r\nHost: [2001:db8::2]:80\r\n\r\n", XDP_PASS, counters::HTTP_BAD_HOST),
        (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", XDP_PASS, counters::HTTP_BAD_HOST),
        (b"GIVE / HTTP/1.1\r\nHost: blocked.example\r\n\r\n", XDP_PASS, counters::HTTP_NOT_REQUEST),
        (b"get / HTTP/1.1\r\nHost: blocked.example\r\n\r\n", XDP_PASS, 0),
        (b"POST http://BLOCKED.example:81/x HTTP/1.1\r\nHost: unlisted.example\r\n\r\n", PASS_AS_RST, 0),
    ];
    for (i, (req, verdict, counter)) in cases.into_iter().enumerate() {
        let before = l.counters();
        let v = l.run_with_model(&mut model, &[Flow::v4(42000 + i as u16).frame(req, 1)], &String::from_utf8_lossy(req));
        assert_eq!(v, [verdict], "{}", String::from_utf8_lossy(req));
        if counter != 0 {
            assert_eq!(l.counters()[counter as usize], before[counter as usize] + 1, "{}", String::from_utf8_lossy(req));
        }
    }
}

#[test]
fn a_head_without_a_name_within_the_limit_blocks_the_flow() {
    let mut l = Loaded::new(&["unrelated.example"]);
    let mut model = Model::default();
    // Padding headers, 1400-byte segments, past the limit without a Host.
    let mut stream = b"GET / HTTP/1.1\r\n".to_vec();
    while stream.len() < MAX_HEAD_BYTES as usize + 2000 {
        stream.extend_from_slice(format!("X-Pad: {}\r\n", "p".repeat(90)).as_bytes());
    }
    stream.extend_from_slice(b"Host: unrelated.example\r\n\r\n");
    let cuts: Vec<usize> = (1400..stream.len()).step_by(1400).collect();
    let before = l.counter(counters::HTTP_TOO_LONG);
    let verdicts = l.run_with_model(&mut model, &Flow::v4(43000).segments(&stream, &cuts), "too long");
    assert_blocked_from_name(&verdicts, "too long");
    assert!(verdicts[..(MAX_HEAD_BYTES as usize / 1400)].iter().all(|v| *v == XDP_PASS));
    assert_eq!(l.counter(counters::HTTP_TOO_LONG), before + 1);
}

#[test]
fn keep_alive_requests_are_each_read_and_ports_are_configurable() {
    let mut l = Loaded::new(&LISTED);
    let mut model = Model::default();
    let flow = Flow::v4(44000);
    // An unlisted request, answered; then a listed one on the same
    // connection: read as a new request.
    let first = request("unlisted.example");
    let second = request("blocked.example");
    let seq1 = 3_000_000u32;
    let v = l.run_with_model(&mut model, &[flow.frame(&first, seq1), flow.frame(&second, seq1 + first.len() as u32)], "keep-alive");
    assert_eq!(v, [XDP_PASS, PASS_AS_RST]);
    // Port 8080 is not an HTTP port by default: its payload is left to the
    // TLS stage, which does not read requests.
    let alt = Flow { dport: 8080, ..Flow::v4(44001) };
    assert_eq!(l.run_with_model(&mut model, &[alt.frame(&second, 1)], "port 8080, default"), [XDP_PASS]);
    let mut cfg = l.kernel.config();
    cfg.http_ports[1] = 8080;
    l.kernel.write_config(cfg).unwrap();
    let alt = Flow { dport: 8080, ..Flow::v4(44002) };
    assert_eq!(l.run_with_model(&mut model, &[alt.frame(&second, 1)], "port 8080, configured"), [PASS_AS_RST]);
    // And port 80 can be dropped from the set.
    cfg.http_ports = [0; filter_common::rules::MAX_HTTP_PORTS];
    cfg.http_ports[0] = 8080;
    l.kernel.write_config(cfg).unwrap();
    assert_eq!(l.run_with_model(&mut model, &[Flow::v4(44003).frame(&second, 1)], "port 80, removed"), [XDP_PASS]);
}

#[test]
fn requests_to_the_block_page_pass_unread() {
    // The DNS `redirect` action sends listed names to the block page: the
    // requests that follow carry those names and must reach it.
    let mut l = Loaded::new(&LISTED);
    let mut model = Model::default();
    let req = request("www.blocked.example");
    let mut cfg = l.kernel.config();
    (cfg.redirect_v4, cfg.redirect_flags) = ([198, 18, 0, 2], filter_common::rules::Config::REDIRECT_V4);
    l.kernel.write_config(cfg).unwrap();
    assert_eq!(l.run_with_model(&mut model, &[Flow::v4(46000).frame(&req, 1)], "to the IPv4 block page"), [XDP_PASS]);
    assert_eq!(l.run_with_model(&mut model, &[Flow { v6: true, ..Flow::v4(46001) }.frame(&req, 1)], "IPv6, no IPv6 block page"), [PASS_AS_RST]);
    cfg.redirect_v6 = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    cfg.redirect_flags |= filter_common::rules::Config::REDIRECT_V6;
    l.kernel.write_config(cfg).unwrap();
    assert_eq!(l.run_with_model(&mut model, &[Flow { v6: true, ..Flow::v4(46002) }.frame(&req, 1)], "to the IPv6 block page"), [XDP_PASS]);
    cfg.redirect_v4 = [198, 18, 0, 3];
    l.kernel.write_config(cfg).unwrap();
    assert_eq!(l.run_with_model(&mut model, &[Flow::v4(46003).frame(&req, 1)], "another IPv4 address"), [PASS_AS_RST]);
}

#[test]
fn a_tls_hello_on_an_http_port_is_read_by_the_tls_stage() {
    let mut l = Loaded::new(&LISTED);
    let mut model = Model::default();
    let hello = client_hello("www.blocked.example");
    let cuts: Vec<usize> = (1..hello.len()).step_by(9).collect();
    let before = l.counter(counters::proto_index(Proto::Tls, Af::V4, Outcome::Blocked));
    let verdicts = l.run_with_model(&mut model, &Flow::v4(45000).segments(&hello, &cuts), "tls on port 80");
    assert_blocked_from_name(&verdicts, "tls on port 80");
    assert_eq!(l.counter(counters::proto_index(Proto::Tls, Af::V4, Outcome::Blocked)), before + 1);
    let verdicts = l.run_with_model(&mut model, &Flow::v4(45001).segments(&client_hello("fine.example"), &[]), "tls on port 80, unlisted");
    assert_eq!(verdicts, [XDP_PASS]);
}
