//! Every Host header counts (issue #13): a request with an unlisted Host and
//! then a listed one (some servers serve the second) is blocked; so is any
//! request with two Host headers, which RFC 9112 has servers refuse. The
//! kernel's HTTP stage on whole, 1-byte and otherwise cut requests, IPv4 and
//! IPv6, checked against the host model.

use blokir_tests::{Loaded, XDP_PASS, assert_blocked_from_name, model::Model, packets::Frame};
use filter_common::counters::{self, Outcome, Proto, proto_index};
use filter_common::packet::Af;

/// The segments of `stream` cut at `cuts`, from client port `sport` to 80.
fn segments(v6: bool, sport: u16, stream: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let seq0 = 5_000_000u32;
    let frame = if v6 { Frame::tcp().v6() } else { Frame::tcp() }.ports(sport, 80);
    let mut bounds: Vec<usize> = cuts.iter().copied().filter(|c| *c > 0 && *c < stream.len()).collect();
    bounds.push(stream.len());
    let mut start = 0;
    bounds
        .into_iter()
        .map(|end| {
            let f = frame.clone().seq_ack(seq0.wrapping_add(start as u32), 1).build(&stream[start..end]);
            start = end;
            f
        })
        .collect()
}

fn head(lines: &[&str]) -> Vec<u8> {
    let mut r = lines.join("\r\n").into_bytes();
    r.extend_from_slice(b"\r\nUser-Agent: curl/8.14.1\r\nAccept: */*\r\n\r\n");
    r
}

#[test]
fn a_listed_name_in_any_host_header_blocks_and_a_repeated_host_is_counted() {
    let mut l = Loaded::new(&["blocked.example"]);
    let mut model = Model::default();
    // (what, head, blocked, only by a second Host header: a listed first
    // name blocks by itself if its segment ends before the second Host)
    let cases = [
        ("unlisted then listed", head(&["GET / HTTP/1.1", "Host: ok.example", "host:blocked.example"]), true, true),
        ("listed then unlisted", head(&["GET / HTTP/1.1", "Host: blocked.example", "Host: ok.example"]), true, false),
        ("two unlisted", head(&["GET / HTTP/1.1", "Host: ok.example", "X-A: 1", "HOST: other.example"]), true, true),
        ("an IP literal, then listed", head(&["GET / HTTP/1.1", "Host: [2001:db8::2]", "Host: blocked.example"]), true, true),
        ("absolute-form target, its Host, a listed Host", head(&["GET http://ok.example/ HTTP/1.1", "Host: ok.example", "Host: blocked.example"]), true, true),
        ("absolute-form target and its Host", head(&["GET http://ok.example/ HTTP/1.1", "Host: ok.example"]), false, false),
        ("one unlisted Host, a Host-like header", head(&["GET / HTTP/1.1", "Host: ok.example", "Hostname: blocked.example"]), false, false),
    ];
    let (mut sport, mut repeats, mut blocks) = (42000u16, 0, 0);
    for (what, req, blocked, repeat) in &cases {
        let n = req.len();
        let second = req.windows(6).rposition(|w| w.eq_ignore_ascii_case(b"\nhost:")).map_or(n / 2, |p| p + 1);
        for (how, cuts) in [("whole", vec![]), ("1-byte", (1..n).collect()), ("before the last Host", vec![second]), ("inside it", vec![second + 3])] {
            for v6 in [false, true] {
                sport += 1;
                let mut stream = req.clone();
                stream.extend_from_slice(b"body bytes of the flow");
                let frames = segments(v6, sport, &stream, &cuts);
                let what = format!("{what}, {how}, v6={v6}");
                let verdicts = l.run_with_model(&mut model, &frames, &what);
                if *blocked {
                    assert_blocked_from_name(&verdicts, &what);
                } else {
                    assert!(verdicts.iter().all(|v| *v == XDP_PASS), "{what}: {verdicts:?}");
                }
                repeats += u64::from(*repeat);
                blocks += u64::from(*blocked);
            }
        }
    }
    // Each blocked flow is counted once: by its listed name, or as a
    // repeat.
    let repeated = l.counter(counters::EVASION_HOST_REPEAT);
    let by_name: u64 = [Af::V4, Af::V6].iter().map(|af| l.counter(proto_index(Proto::Http, *af, Outcome::Blocked))).sum();
    assert!(repeated >= repeats, "{repeated} repeats counted, {repeats} at least");
    assert_eq!(repeated + by_name, blocks);
}
