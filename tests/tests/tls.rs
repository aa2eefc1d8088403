//! TLS ClientHello server names: the streaming parser against tls-parser on
//! every ClientHello of the real-client capture, cut into segments and
//! records every which way; and the kernel's stream stage on the same
//! hellos and on the classic evasions, checked against the host model.

use std::collections::BTreeMap;

use blokir_tests::{Loaded, PASS_AS_RST, XDP_DROP, XDP_PASS, assert_blocked_from_name, capture_frames, model::Model};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use filter_common::{
    counters,
    name::{CanonBuf, dotted_to_canon},
    packet::Af,
    tls::{Hello, MAX_ROUNDS, Progress, Resume, feed, resume},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tls_parser::{TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_client_hello_extensions, parse_tls_plaintext};

/// A captured client-to-server TCP stream that starts with a ClientHello.
struct Hello0 {
    /// The hello's records, reassembled.
    bytes: Vec<u8>,
    /// Where the client's segments cut it.
    cuts: Vec<usize>,
    /// The server name, as tls-parser reads it.
    sni: Option<String>,
    client: &'static str,
}

/// Every ClientHello in the capture (client and server ports as captured).
fn captured_hellos() -> Vec<Hello0> {
    // (client address, client port, server port) -> (sequence number, payload)
    type Flows = BTreeMap<(Vec<u8>, u16, u16), Vec<(u32, Vec<u8>)>>;
    let mut flows = Flows::new();
    for frame in capture_frames() {
        let Ok(s) = SlicedPacket::from_ethernet(&frame) else { continue };
        let Some(TransportSlice::Tcp(t)) = s.transport else { continue };
        if t.payload().is_empty() || ![443, 8443].contains(&t.destination_port()) {
            continue;
        }
        let src = match &s.net {
            Some(etherparse::NetSlice::Ipv4(ip)) => ip.header().source().to_vec(),
            Some(etherparse::NetSlice::Ipv6(ip)) => ip.header().source().to_vec(),
            _ => continue,
        };
        flows.entry((src, t.source_port(), t.destination_port())).or_default().push((t.sequence_number(), t.payload().to_vec()));
    }
    let mut hellos = Vec::new();
    for segments in flows.values() {
        let isn = segments[0].0;
        let mut stream = Vec::new();
        let mut cuts = Vec::new();
        for (seq, data) in segments {
            let at = seq.wrapping_sub(isn) as usize;
            if at == stream.len() {
                stream.extend_from_slice(data);
                cuts.push(stream.len());
            }
        }
        if stream.first() != Some(&22) {
            continue;
        }
        let len = 5 + usize::from(u16::from_be_bytes([stream[3], stream[4]]));
        if stream.len() < len {
            continue;
        }
        stream.truncate(len);
        cuts.retain(|c| *c < len);
        let (sni, client) = reference_sni(&stream);
        hellos.push(Hello0 { bytes: stream, cuts, sni, client });
    }
    hellos
}

/// The server name and a guess of the client, per tls-parser.
fn reference_sni(record: &[u8]) -> (Option<String>, &'static str) {
    let (_, plain) = parse_tls_plaintext(record).expect("tls-parser reads the hello");
    let Some(TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch))) = plain.msg.first() else { panic!("not a ClientHello") };
    let (_, exts) = parse_tls_client_hello_extensions(ch.ext.unwrap_or_default()).expect("extensions");
    let client = if exts.iter().any(|e| matches!(e, TlsExtension::Grease(..))) { "chromium" } else { "openssl-based" };
    let sni = exts.iter().find_map(|e| match e {
        TlsExtension::SNI(names) => names.first().map(|(_, n)| String::from_utf8_lossy(n).into_owned()),
        _ => None,
    });
    (sni, client)
}

/// The record(s) re-framed: the handshake cut into records at `splits`.
fn reframe(record: &[u8], splits: &[usize]) -> Vec<u8> {
    let body = &record[5..];
    let mut out = Vec::new();
    let mut start = 0;
    for &end in splits.iter().chain([&body.len()]) {
        if end <= start || end > body.len() {
            continue;
        }
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&((end - start) as u16).to_be_bytes());
        out.extend_from_slice(&body[start..end]);
        start = end;
    }
    out
}

/// Runs the host parser over `stream` cut at `cuts`, as the kernel does:
/// each segment in rounds of `feed`. Returns the first outcome other than
/// `NeedMore` (a name, or the end without one); after a name the parser
/// walks on (for ECH) to the hello's end, as the kernel does.
fn host_parse(stream: &[u8], cuts: &[usize]) -> (Progress, Box<Hello>) {
    let mut name = None;
    let seq0 = 7_000_000u32;
    let mut h = Box::new(Hello::new(seq0));
    let mut start = 0;
    for &end in cuts.iter().chain([&stream.len()]) {
        if end <= start {
            continue;
        }
        let seg = &stream[start..end];
        let seq = seq0.wrapping_add(start as u32);
        let mut progress = Progress::StepsExhausted;
        for _ in 0..MAX_ROUNDS {
            // All of it read when the last round's steps ran out at its end.
            let Resume::At(off) = resume(&h, seq, 0, seg.len()) else {
                progress = Progress::NeedMore;
                break;
            };
            progress = feed(&mut h, seg, off, seg.len());
            if progress != Progress::StepsExhausted {
                break;
            }
        }
        match progress {
            Progress::NeedMore => {}
            Progress::Name(_) if !h.ended() => name = Some(progress),
            Progress::End => return (name.expect("a name before the end"), h),
            _ => return (name.unwrap_or(progress), h),
        }
        start = end;
    }
    (name.unwrap_or(Progress::NeedMore), h)
}

/// Whether tls-parser finds an encrypted_client_hello extension (which it
/// reports as an unknown extension).
fn reference_ech(record: &[u8]) -> bool {
    let (_, plain) = parse_tls_plaintext(record).expect("tls-parser reads the hello");
    let Some(TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch))) = plain.msg.first() else { panic!("not a ClientHello") };
    let (_, exts) = parse_tls_client_hello_extensions(ch.ext.unwrap_or_default()).expect("extensions");
    exts.iter().any(|e| matches!(e, TlsExtension::Unknown(t, _) if t.0 == 0xfe0d))
}

fn canon(name: &str) -> Vec<u8> {
    let mut b = CanonBuf::default();
    let n = dotted_to_canon(name.as_bytes(), 0, name.len(), &mut b).unwrap();
    b.canon(n).to_vec()
}

/// The parser's name, canonical.
fn parsed_name(progress: Progress, h: &Hello) -> Option<Vec<u8>> {
    match progress {
        Progress::Name(len) => {
            let mut b = CanonBuf::default();
            h.copy_name(&mut b);
            Some(b.canon(len).to_vec())
        }
        _ => None,
    }
}

#[test]
fn every_captured_hello_in_every_cut_and_framing_gives_tls_parsers_name() {
    let hellos = captured_hellos();
    let mut by_client = BTreeMap::<&str, usize>::new();
    for h in &hellos {
        *by_client.entry(h.client).or_default() += 1;
    }
    println!("{} ClientHellos: {by_client:?}", hellos.len());
    assert!(hellos.len() >= 20 && by_client.get("chromium").copied().unwrap_or(0) >= 6, "{by_client:?}");
    // Chromium's hello spans two segments.
    assert!(hellos.iter().any(|h| h.client == "chromium" && !h.cuts.is_empty()));

    let mut rng = StdRng::seed_from_u64(443);
    for (i, h) in hellos.iter().enumerate() {
        let want = h.sni.as_deref().map(|s| canon(&s.to_ascii_lowercase()));
        let want_ech = reference_ech(&h.bytes);
        // Every Chromium hello carries ECH GREASE (in a random place).
        assert!(want_ech || h.client != "chromium", "hello {i}");
        let n = h.bytes.len();
        let mut cuttings: Vec<(String, Vec<usize>)> =
            vec![("whole".into(), vec![]), ("as captured".into(), h.cuts.clone()), ("1-byte segments".into(), (1..n).collect())];
        // Cut inside the name, and just before and after it.
        if let Some(sni) = &h.sni {
            let at = h.bytes.windows(sni.len()).position(|w| w == sni.as_bytes()).expect("the name is in the hello");
            for c in [at - 1, at, at + 1, at + sni.len() / 2, at + sni.len() - 1, at + sni.len()] {
                cuttings.push((format!("cut at {c}"), vec![c]));
            }
        }
        for k in 0..10 {
            let mut cuts: Vec<usize> = (0..rng.random_range(1..12)).map(|_| rng.random_range(1..n)).collect();
            cuts.sort();
            cuttings.push((format!("random {k}"), cuts));
        }
        for (what, cuts) in &cuttings {
            let (progress, parser) = host_parse(&h.bytes, cuts);
            assert_eq!(parser.has_ech(), want_ech, "hello {i} ({}), {what}: ECH", h.client);
            match &want {
                Some(w) => assert_eq!(parsed_name(progress, &parser).as_ref(), Some(w), "hello {i} ({}), {what}: {progress:?}", h.client),
                None => assert_eq!(progress, Progress::NoName, "hello {i}, {what}"),
            }
        }
        // The handshake re-framed into several records, then cut too.
        for _ in 0..5 {
            let mut splits: Vec<usize> = (0..rng.random_range(1..6)).map(|_| rng.random_range(1..n - 5)).collect();
            splits.sort();
            let framed = reframe(&h.bytes, &splits);
            for cuts in [vec![], (1..framed.len()).step_by(3).collect::<Vec<_>>()] {
                let (progress, parser) = host_parse(&framed, &cuts);
                assert_eq!(parsed_name(progress, &parser), want, "hello {i} in records cut at {splits:?}");
                assert_eq!(parser.has_ech(), want_ech, "hello {i} in records cut at {splits:?}: ECH");
            }
        }
    }
}

#[test]
fn broken_and_foreign_streams_never_yield_a_name() {
    let hellos = captured_hellos();
    let h = &hellos[0].bytes;
    // Truncated anywhere before the name's end: more is needed, no name.
    let sni = hellos[0].sni.clone().unwrap();
    let end = h.windows(sni.len()).position(|w| w == sni.as_bytes()).unwrap() + sni.len();
    for cut in 1..end {
        assert_eq!(host_parse(&h[..cut], &[]).0, Progress::NeedMore, "cut at {cut}");
    }
    // Not a handshake record, not a ClientHello, a name with an empty label.
    let mut not_hs = h.clone();
    not_hs[0] = 23;
    assert_eq!(host_parse(&not_hs, &[]).0, Progress::NotHello);
    let mut server_hello = h.clone();
    server_hello[5] = 2;
    assert_eq!(host_parse(&server_hello, &[]).0, Progress::NotHello);
    let mut bad = h.clone();
    let at = bad.windows(sni.len()).position(|w| w == sni.as_bytes()).unwrap();
    bad[at] = b'.';
    assert_eq!(host_parse(&bad, &[]).0, Progress::NotHello);
    // Random bytes after a plausible record header: never a panic, never a
    // name that tls-parser would not find.
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..3000 {
        let mut s = h.clone();
        for _ in 0..rng.random_range(1..8) {
            let i = rng.random_range(0..s.len());
            s[i] = rng.random();
        }
        let (progress, parser) = host_parse(&s, &[rng.random_range(1..s.len())]);
        if let Some(name) = parsed_name(progress, &parser) {
            let Ok((_, plain)) = parse_tls_plaintext(&s) else { continue };
            if let Some(TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch))) = plain.msg.first()
                && let Ok((_, exts)) = parse_tls_client_hello_extensions(ch.ext.unwrap_or_default())
                && let Some((_, n)) = exts.iter().find_map(|e| if let TlsExtension::SNI(v) = e { v.first().copied() } else { None })
            {
                // Raw bytes: the parser keeps non-ASCII bytes as they are.
                let mut b = CanonBuf::default();
                let len = dotted_to_canon(n, 0, n.len(), &mut b).expect("a name the parser accepted");
                assert_eq!(name, b.canon(len));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The kernel's stream stage

/// Client segments of one TCP flow carrying `stream` cut at `cuts`.
fn segments(stream: &[u8], cuts: &[usize], v6: bool, sport: u16) -> Vec<(usize, Vec<u8>)> {
    let seq0 = 1_000_000u32;
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain([&stream.len()]) {
        if end <= start {
            continue;
        }
        out.push((start, tcp_frame(&stream[start..end], seq0.wrapping_add(start as u32), v6, sport)));
        start = end;
    }
    out
}

fn tcp_frame(payload: &[u8], seq: u32, v6: bool, sport: u16) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let b = if v6 {
        eth.ipv6([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], 64)
    } else {
        eth.ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
    };
    let b = b.tcp(sport, 443, seq, 64240).ack(1).psh();
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

#[test]
fn kernel_blocks_listed_hellos_in_every_cut_and_passes_the_others() {
    let hellos = captured_hellos();
    let names: Vec<String> = hellos.iter().filter_map(|h| h.sni.clone()).collect();
    let listed = ["blocked.example", "*.blocked.example", "blocked.test"];
    let mut l = Loaded::new(&listed);
    let mut model = Model::default();
    let mut rng = StdRng::seed_from_u64(9);
    let mut sport = 20000u16;
    let mut swept = std::collections::BTreeSet::new();
    for (i, h) in hellos.iter().enumerate() {
        let sni = h.sni.clone().unwrap_or_default().to_ascii_lowercase();
        let is_listed = sni == "blocked.example" || sni.ends_with(".blocked.example") || sni == "blocked.test";
        let n = h.bytes.len();
        let mut random: Vec<usize> = (0..6).map(|_| rng.random_range(1..n)).collect();
        random.sort();
        let sweep = blokir_tests::exhaustive_sweeps() || swept.insert(h.client);
        for (what, cuts) in [("whole", vec![]), ("as captured", h.cuts.clone()), ("1-byte", (1..n).collect()), ("random", random)] {
            if what == "1-byte" && !sweep {
                continue;
            }
            for v6 in [false, true] {
                sport += 1;
                // Some application data after the hello, in the same flow.
                let mut stream = h.bytes.clone();
                stream.extend_from_slice(&[23, 3, 3, 0, 4, 1, 2, 3, 4]);
                let frames: Vec<Vec<u8>> = segments(&stream, &cuts, v6, sport).into_iter().map(|(_, f)| f).collect();
                let what = format!("hello {i} ({sni}, {}), {what}, v6={v6}", h.client);
                let verdicts = l.run_with_model(&mut model, &frames, &what);
                if is_listed {
                    assert_blocked_from_name(&verdicts, &what);
                } else {
                    assert!(verdicts.iter().all(|v| *v == XDP_PASS), "{what}: {verdicts:?}");
                }
            }
        }
    }
    assert!(names.iter().any(|n| n.ends_with("blocked.example")) && names.iter().any(|n| n == "x.test"));
    let c = l.kernel.counters().unwrap();
    println!(
        "tls inspected/blocked ipv4: {}/{}",
        c[counters::proto_index(counters::Proto::Tls, filter_common::packet::Af::V4, counters::Outcome::Inspected) as usize],
        c[counters::proto_index(counters::Proto::Tls, filter_common::packet::Af::V4, counters::Outcome::Blocked) as usize]
    );
}

/// A Chromium hello (two segments, ML-KEM) from the capture to a listed name.
fn chromium_listed() -> Hello0 {
    captured_hellos()
        .into_iter()
        .find(|h| h.client == "chromium" && h.sni.as_deref() == Some("www.portal.blocked.example"))
        .expect("a Chromium hello to www.portal.blocked.example")
}

#[test]
fn segments_ahead_of_the_parser_are_held_back_until_the_gap_fills() {
    let h = chromium_listed();
    let mut l = Loaded::new(&[".blocked.example"]);
    let mut model = Model::default();
    let frames: Vec<Vec<u8>> = segments(&h.bytes, &(1..h.bytes.len()).step_by(300).collect::<Vec<_>>(), false, 31000).into_iter().map(|(_, f)| f).collect();
    assert!(frames.len() >= 6);
    // The hello starts; then segments 3 and 2 arrive before 1: dropped and
    // counted, so that the client sends them again once 1 is through.
    assert_eq!(l.run_with_model(&mut model, &frames[..1], "first"), [XDP_PASS]);
    let before = l.counter(counters::TLS_OUT_OF_ORDER);
    assert_eq!(l.run_with_model(&mut model, &[frames[3].clone(), frames[2].clone()], "ahead"), [XDP_DROP, XDP_DROP]);
    assert_eq!(l.counter(counters::TLS_OUT_OF_ORDER), before + 2);
    // In order from 1: blocked once the name is complete.
    let verdicts = l.run_with_model(&mut model, &frames[1..], "in order");
    assert_blocked_from_name(&verdicts, "in order");
}

#[test]
fn retransmissions_and_overlaps_are_read_once() {
    let h = chromium_listed();
    let mut l = Loaded::new(&["www.portal.blocked.example"]);
    let mut model = Model::default();
    let n = h.bytes.len();
    // Segment 1, segment 1 again, then an overlapping segment that starts
    // inside segment 1 and carries the rest.
    let first = tcp_frame(&h.bytes[..600], 1_000_000, false, 32000);
    let overlap = tcp_frame(&h.bytes[500..n], 1_000_500, false, 32000);
    let v = l.run_with_model(&mut model, &[first.clone(), first, overlap], "retransmit and overlap");
    assert_eq!(v, [XDP_PASS, XDP_PASS, PASS_AS_RST]);
}

#[test]
fn upper_case_names_and_ech_and_missing_sni_are_handled() {
    let hellos = captured_hellos();
    // OpenSSL's -servername BLOCKED.TEST keeps the case on the wire.
    let upper = hellos.iter().find(|h| h.sni.as_deref() == Some("BLOCKED.TEST")).expect("the capture has an upper-case SNI");
    let mut l = Loaded::new(&["blocked.test"]);
    let mut model = Model::default();
    let v = l.run_with_model(&mut model, &[tcp_frame(&upper.bytes, 5, false, 33000)], "upper case");
    assert_eq!(v, [PASS_AS_RST]);
    // Chromium sends an ECH GREASE extension, in a random place: counted
    // once per hello wherever it sits, whole or as captured (two segments).
    let chrome: Vec<&Hello0> = hellos.iter().filter(|h| h.client == "chromium" && h.sni.is_some()).collect();
    let sni_at = |h: &Hello0| find_sni_extension(&h.bytes);
    assert!(chrome.iter().any(|h| extension_at(&h.bytes, 0xfe0d).unwrap() < sni_at(h)), "a Chromium hello with ECH before server_name");
    assert!(chrome.iter().any(|h| extension_at(&h.bytes, 0xfe0d).unwrap() > sni_at(h)), "a Chromium hello with ECH after server_name");
    for (i, h) in chrome.iter().enumerate() {
        for (k, cuts) in [vec![], h.cuts.clone()].into_iter().enumerate() {
            let ech = l.counter(counters::TLS_ECH);
            let frames: Vec<Vec<u8>> = segments(&h.bytes, &cuts, i % 2 == 1, 33100 + 2 * i as u16 + k as u16).into_iter().map(|(_, f)| f).collect();
            l.run_with_model(&mut model, &frames, "ech");
            assert_eq!(l.counter(counters::TLS_ECH), ech + 1, "chromium hello {i}, cuts {cuts:?}");
        }
    }
    // A hello whose server_name extension type is changed: no SNI.
    let mut no_sni = hellos.iter().find(|h| h.client != "chromium" && h.sni.is_some()).unwrap().bytes.clone();
    let at = find_sni_extension(&no_sni);
    no_sni[at] = 0xfa;
    no_sni[at + 1] = 0xfa;
    let before = l.counter(counters::TLS_NO_SNI);
    let v = l.run_with_model(&mut model, &[tcp_frame(&no_sni, 5, false, 33002)], "no sni");
    assert_eq!(v, [XDP_PASS]);
    assert_eq!(l.counter(counters::TLS_NO_SNI), before + 1);
}

/// Offset of the server_name extension's type in a hello record.
fn find_sni_extension(record: &[u8]) -> usize {
    extension_at(record, 0).expect("a server_name extension")
}

/// Offset of the first extension of type `kind` in a (single-record) hello.
fn extension_at(record: &[u8], kind: u16) -> Option<usize> {
    let mut p = 5 + 4 + 2 + 32;
    p += 1 + usize::from(record[p]);
    p += 2 + usize::from(u16::from_be_bytes([record[p], record[p + 1]]));
    p += 1 + usize::from(record[p]);
    p += 2;
    while p + 4 <= record.len() {
        let (k, len) = (u16::from_be_bytes([record[p], record[p + 1]]), usize::from(u16::from_be_bytes([record[p + 2], record[p + 3]])));
        if k == kind {
            return Some(p);
        }
        p += 4 + len;
    }
    None
}

#[test]
fn a_hello_too_complex_for_the_step_budget_is_blocked() {
    // A hello with thousands of empty extensions first (before the name):
    // no real client sends one; past the per-segment budget the flow is
    // blocked.
    let h = chromium_listed();
    let record = &h.bytes;
    let mut p = 4 + 2 + 32;
    p += 1 + usize::from(record[5 + p]);
    p += 2 + usize::from(u16::from_be_bytes([record[5 + p], record[5 + p + 1]]));
    p += 1 + usize::from(record[5 + p]);
    let mut body = record[5..5 + p + 2].to_vec();
    let padding: Vec<u8> = (0..3000).flat_map(|_| [0xff, 0x01, 0, 0]).collect();
    body.extend_from_slice(&padding);
    body.extend_from_slice(&record[5 + p + 2..]);
    // Fix the handshake, extensions and record lengths.
    let hs_len = body.len() - 4;
    body[1..4].copy_from_slice(&(hs_len as u32).to_be_bytes()[1..]);
    let exts_len = body.len() - p - 2;
    body[p..p + 2].copy_from_slice(&(exts_len as u16).to_be_bytes());
    let stream = reframe(&[&[22, 3, 1, 0, 0][..], &body].concat(), &[]);
    let mut l = Loaded::new(&["unlisted.example"]);
    let mut model = Model::default();
    let before = l.counter(counters::TLS_TOO_COMPLEX);
    // One 3400-byte segment of empty extensions needs about 1600 steps (2
    // each): more than 30 rounds of 32. The flow is blocked, its server end
    // closed.
    let frame = tcp_frame(&stream[..3400], 77, false, 34000);
    let v = l.run_with_model(&mut model, &[frame], "too complex");
    assert_eq!(v, [PASS_AS_RST]);
    assert_eq!(l.counter(counters::TLS_TOO_COMPLEX), before + 1);
}

// ---------------------------------------------------------------------------
// Encrypted ClientHello

/// A ClientHello record with the extensions `exts` (type, body), in order.
fn crafted_hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend([0, 2, 0x13, 0x01, 1, 0]);
    let mut e = Vec::new();
    for (t, b) in exts {
        e.extend(t.to_be_bytes());
        e.extend((b.len() as u16).to_be_bytes());
        e.extend(b);
    }
    body.extend((e.len() as u16).to_be_bytes());
    body.extend(e);
    let mut hs = vec![1];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut rec = vec![22, 3, 1];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

fn sni_ext(name: &str) -> (u16, Vec<u8>) {
    let mut list = vec![0];
    list.extend((name.len() as u16).to_be_bytes());
    list.extend(name.as_bytes());
    let mut b = (list.len() as u16).to_be_bytes().to_vec();
    b.extend(list);
    (0, b)
}

/// An ECH extension (outer, as Chromium's GREASE looks: config id, key,
/// payload; the contents are not read).
fn ech_ext() -> (u16, Vec<u8>) {
    (0xfe0d, [&[0u8, 0, 1, 0, 1, 0x42, 0, 32][..], &[9; 32], &[0, 144], &[5; 144]].concat())
}

/// ECH before, after or without server_name; with ECH alone; with other
/// extensions around (an empty one last, as Chromium's GREASE often is).
fn crafted_hellos(name: &str) -> Vec<(&'static str, Vec<u8>, bool)> {
    let grease = (0x2a2a, vec![]);
    let alpn = (16, vec![0, 3, 2, b'h', b'2']);
    vec![
        ("ECH before SNI", crafted_hello(&[alpn.clone(), ech_ext(), sni_ext(name), grease.clone()]), true),
        ("ECH after SNI", crafted_hello(&[alpn.clone(), sni_ext(name), (21, vec![0; 200]), ech_ext(), grease.clone()]), true),
        ("ECH last", crafted_hello(&[sni_ext(name), alpn.clone(), ech_ext()]), true),
        ("no ECH", crafted_hello(&[alpn.clone(), sni_ext(name), grease.clone()]), false),
        ("SNI last, no ECH", crafted_hello(&[alpn.clone(), sni_ext(name)]), false),
    ]
}

/// Cuttings of a hello: whole, right after the name (ECH, if after it, in
/// the second segment), and in 1-byte segments.
fn ech_cuttings(hello: &[u8], name: &str) -> Vec<(&'static str, Vec<usize>)> {
    let after_name = hello.windows(name.len()).position(|w| w == name.as_bytes()).unwrap() + name.len();
    vec![("whole", vec![]), ("cut after the name", vec![after_name]), ("1-byte", (1..hello.len()).collect())]
}

#[test]
fn the_parser_sees_ech_wherever_it_sits() {
    for (what, hello, ech) in crafted_hellos("cloudflare-ech.com") {
        assert_eq!(reference_ech(&hello), ech, "{what}: tls-parser");
        for (cut, cuts) in ech_cuttings(&hello, "cloudflare-ech.com") {
            let (progress, h) = host_parse(&hello, &cuts);
            assert_eq!(parsed_name(progress, &h), Some(canon("cloudflare-ech.com")), "{what}, {cut}");
            assert_eq!((h.has_ech(), h.ended()), (ech, true), "{what}, {cut}");
        }
    }
    // No server name: ECH is seen all the same.
    let (progress, h) = host_parse(&crafted_hello(&[ech_ext(), (16, vec![0, 3, 2, b'h', b'2'])]), &[]);
    assert_eq!((progress, h.has_ech()), (Progress::NoName, true));
}

/// The program with list "test" (normal.example) and ECH-outer list "ech"
/// (cloudflare-ech.com and below), and the model told the same.
fn ech_loaded() -> (Loaded, Model) {
    let mut l = Loaded::new(&["normal.example"]);
    l.set_list("ech", &[".cloudflare-ech.com", ".blocked.example"]);
    let id = l.engine.list("ech").unwrap().id;
    l.kernel.write_list_policy(id, filter_common::reply::DnsAction::Drop, filter_common::reset::TcpAction::Drop, true).unwrap();
    let mut model = Model::default();
    model.ech_outer = 1 << id;
    (l, model)
}

#[test]
fn an_ech_outer_list_blocks_only_hellos_with_ech() {
    let (mut l, mut model) = ech_loaded();
    let mut sport = 40000u16;
    let mut flow = |l: &mut Loaded, model: &mut Model, stream: &[u8], cuts: &[usize], v6: bool, what: &str| {
        sport += 1;
        let mut stream = stream.to_vec();
        // Application data after the hello, in the same flow.
        stream.extend_from_slice(&[23, 3, 3, 0, 4, 1, 2, 3, 4]);
        let frames: Vec<Vec<u8>> = segments(&stream, cuts, v6, sport).into_iter().map(|(_, f)| f).collect();
        l.run_with_model(model, &frames, what)
    };
    for v6 in [false, true] {
        for name in ["cloudflare-ech.com", "normal.example", "unlisted.example"] {
            for (what, hello, ech) in crafted_hellos(name) {
                for (cut, cuts) in ech_cuttings(&hello, name) {
                    if cut == "1-byte" && v6 && !blokir_tests::exhaustive_sweeps() {
                        continue;
                    }
                    let what = format!("{name}, {what}, {cut}, v6={v6}");
                    let (blocked, ech_blocked, ech_count) = (
                        l.counter(counters::TLS_ECH_OUTER_BLOCKED),
                        l.counter(counters::proto_index(counters::Proto::Tls, if v6 { Af::V6 } else { Af::V4 }, counters::Outcome::Blocked)),
                        l.counter(counters::TLS_ECH),
                    );
                    let verdicts = flow(&mut l, &mut model, &hello, &cuts, v6, &what);
                    let listed = name == "normal.example" || (name == "cloudflare-ech.com" && ech);
                    if listed {
                        assert_blocked_from_name(&verdicts, &what);
                    } else {
                        assert!(verdicts.iter().all(|v| *v == XDP_PASS), "{what}: {verdicts:?}");
                    }
                    let by_ech = u64::from(name == "cloudflare-ech.com" && ech);
                    assert_eq!(l.counter(counters::TLS_ECH_OUTER_BLOCKED), blocked + by_ech, "{what}");
                    let tls_blocked = l.counter(counters::proto_index(counters::Proto::Tls, if v6 { Af::V6 } else { Af::V4 }, counters::Outcome::Blocked));
                    assert_eq!(tls_blocked, ech_blocked + u64::from(listed), "{what}");
                    // ECH is counted once per hello, where the parser meets
                    // it (a hello blocked by a normal rule is not read on).
                    let read_past_ech =
                        !(name == "normal.example" && cut != "whole" && extension_at(&hello, 0xfe0d).is_some_and(|e| e > find_sni_extension(&hello)));
                    if read_past_ech {
                        assert_eq!(l.counter(counters::TLS_ECH), ech_count + u64::from(ech), "{what}");
                    }
                }
            }
        }
    }
    // The captured Chromium hellos carry ECH GREASE: blocked when their name
    // is on the ECH-outer list, in every cut; the others' hellos pass.
    let hellos = captured_hellos();
    for (i, h) in hellos.iter().enumerate().filter(|(_, h)| h.sni.as_deref().is_some_and(|s| s.to_ascii_lowercase().ends_with("blocked.example"))) {
        let n = h.bytes.len();
        for (cut, cuts) in [("whole", vec![]), ("as captured", h.cuts.clone()), ("1-byte", (1..n).collect())] {
            let what = format!("captured hello {i} ({}, {:?}), {cut}", h.client, h.sni);
            let verdicts = flow(&mut l, &mut model, &h.bytes, &cuts, i % 2 == 0, &what);
            if h.client == "chromium" {
                assert_blocked_from_name(&verdicts, &what);
            } else {
                assert!(!reference_ech(&h.bytes), "{what}");
                assert!(verdicts.iter().all(|v| *v == XDP_PASS), "{what}: {verdicts:?}");
            }
        }
    }
    assert!(hellos.iter().any(|h| h.client == "chromium" && h.sni.as_deref().is_some_and(|s| s.ends_with("blocked.example"))));
    assert!(hellos.iter().any(|h| h.client != "chromium" && h.sni.as_deref().is_some_and(|s| s.ends_with("blocked.example"))));
}

#[test]
fn an_ech_outer_block_decided_by_a_later_segment_follows_the_lists_tcp_action() {
    // ECH after the name, in the segment after it: the name is matched
    // again there, and the list's action (here reset) applies as to any
    // other block: the segment comes back as a RST, counted once as
    // inspected and once as blocked.
    let (mut l, mut model) = ech_loaded();
    let id = l.engine.list("ech").unwrap().id;
    l.kernel.write_list_policy(id, filter_common::reply::DnsAction::Drop, filter_common::reset::TcpAction::Reset, true).unwrap();
    model.set_tcp_action(id, filter_common::reset::TcpAction::Reset);
    let name = "cloudflare-ech.com";
    let (_, hello, _) = crafted_hellos(name).into_iter().find(|(what, _, _)| *what == "ECH after SNI").unwrap();
    let (_, cuts) = ech_cuttings(&hello, name).into_iter().find(|(cut, _)| *cut == "cut after the name").unwrap();
    for v6 in [false, true] {
        let af = if v6 { Af::V6 } else { Af::V4 };
        let index = |o| counters::proto_index(counters::Proto::Tls, af, o);
        let before = [l.counter(index(counters::Outcome::Inspected)), l.counter(index(counters::Outcome::Blocked)), l.counter(counters::TCP_RESETS)];
        let frames: Vec<Vec<u8>> = segments(&hello, &cuts, v6, 47000 + u16::from(v6)).into_iter().map(|(_, f)| f).collect();
        let verdicts = l.run_with_model(&mut model, &frames, &format!("v6={v6}"));
        assert_eq!(verdicts, [XDP_PASS, blokir_tests::XDP_TX], "v6={v6}");
        let after = [l.counter(index(counters::Outcome::Inspected)), l.counter(index(counters::Outcome::Blocked)), l.counter(counters::TCP_RESETS)];
        assert_eq!(after, [before[0] + 1, before[1] + 1, before[2] + 1], "v6={v6}: inspected, blocked, resets");
    }
}

#[test]
fn ech_outer_rules_leave_dns_alone() {
    use blokir_tests::packets::{Frame, dns};
    let (mut l, mut model) = ech_loaded();
    for frame in [Frame::udp(), Frame::udp().v6(), Frame::tcp()] {
        let v = l.run_with_model(&mut model, &[dns(&frame, "cloudflare-ech.com")], "dns to an ECH-outer name");
        assert_eq!(v, [XDP_PASS]);
        let v = l.run_with_model(&mut model, &[dns(&frame, "normal.example")], "dns to a normal name");
        assert_eq!(v, [XDP_DROP]);
    }
}

#[test]
fn a_name_before_a_walk_too_long_for_the_budget_keeps_its_verdict() {
    // The name first, then 800 empty extensions (1600 steps; no real
    // client sends them): the walk for ECH runs out of rounds; the name's verdict
    // applies, and an ECH-outer rule blocks (ECH may hide in the rest).
    let (mut l, mut model) = ech_loaded();
    let padding: Vec<(u16, Vec<u8>)> = (0..800).map(|_| (0xff01, vec![])).collect();
    for (k, (name, want)) in [("normal.example", PASS_AS_RST), ("unlisted.example", XDP_PASS), ("cloudflare-ech.com", PASS_AS_RST)].into_iter().enumerate() {
        let hello = crafted_hello(&[[sni_ext(name)].as_slice(), &padding, &[ech_ext()]].concat());
        let too_complex = l.counter(counters::TLS_TOO_COMPLEX);
        let v = l.run_with_model(&mut model, &[tcp_frame(&hello, 77, k % 2 == 1, 41000 + k as u16)], name);
        assert_eq!(v, [want], "{name}");
        assert_eq!(l.counter(counters::TLS_TOO_COMPLEX), too_complex, "{name}");
    }
}

#[test]
fn a_name_completed_by_a_segments_last_step_is_reported_with_that_segment() {
    // Python's 517-byte hello in 52-byte segments (a 64-byte server MSS): the
    // third segment completes the name with the 32nd step of a round and
    // ends there. Its verdict must come with it, not with the next segment.
    let name = "mac.blocked.example";
    let padding = (21, vec![0; 218]);
    let hello = crafted_hello(&[sni_ext(name), (11, vec![3, 0, 1, 2]), (10, vec![0; 22]), padding]);
    let at = hello.windows(name.len()).position(|w| w == name.as_bytes()).unwrap();
    let mut l = Loaded::new(&["*.blocked.example"]);
    let mut model = Model::default();
    let mut checked = 0;
    // Segment lengths that end a segment at each point just past the name.
    for seg in 40..70 {
        let cuts: Vec<usize> = (seg..hello.len()).step_by(seg).collect();
        let first = cuts.iter().position(|c| *c >= at + name.len()).unwrap_or(cuts.len());
        for v6 in [false, true] {
            let frames: Vec<Vec<u8>> = segments(&hello, &cuts, v6, 46000 + 2 * seg as u16 + v6 as u16).into_iter().map(|(_, f)| f).collect();
            let v = l.run_with_model(&mut model, &frames, &format!("{seg}-byte segments, v6={v6}"));
            assert_eq!(v.iter().position(|v| *v != XDP_PASS), Some(first), "{seg}-byte segments: {v:?}");
            assert_blocked_from_name(&v, &format!("{seg}-byte segments"));
            checked += 1;
        }
    }
    assert_eq!(checked, 60);
}
