//! Evasions of the TCP stream stages (issue #13), built packet by packet
//! and run through the kernel's TLS and HTTP stages against the host model:
//! zapret's `seqovl` (a first segment starting before the connection's
//! start), urgent bytes (ByeDPI `--oob`/`--disoob`), and fake segments
//! "fooled" so that the server discards them (no ACK, TCP MD5 or TCP-AO
//! option, a sequence number far behind), TLS and HTTP, IPv4 and IPv6,
//! listed and unlisted names, under both tamper policies.

use blokir_tests::{Loaded, PASS_AS_RST, XDP_DROP, XDP_PASS, assert_blocked_from_name, model::Model, packets::Frame};
use filter_common::{
    counters,
    flow::{TAMPER_BLOCK, TAMPER_PASS},
};

const LISTED: &str = "blocked.example";
const UNLISTED: &str = "allowed.example";
const ISN: u32 = 7_000_000;

/// One connection: its SYN, and frames of its data at sequence numbers
/// relative to the first data byte (ISN + 1).
struct Conn {
    frame: Frame,
}

impl Conn {
    fn new(tls: bool, v6: bool, sport: u16) -> Self {
        let frame = if v6 { Frame::tcp().v6() } else { Frame::tcp() }.ports(sport, if tls { 443 } else { 80 });
        Conn { frame }
    }
    fn syn(&self) -> Vec<u8> {
        self.frame.clone().syn(ISN).build(&[])
    }
    /// Data at `rel` (relative to ISN + 1; negative: before the start),
    /// shaped by `f`.
    fn data(&self, rel: i64, bytes: &[u8], f: impl FnOnce(Frame) -> Frame) -> Vec<u8> {
        let seq = (i64::from(ISN) + 1 + rel) as u32;
        f(self.frame.clone().seq_ack(seq, 1)).build(bytes)
    }
}

/// The stream that names `host`: a ClientHello, or an HTTP request head.
fn stream(tls: bool, host: &str) -> Vec<u8> {
    if tls { blokir_tests::packets::client_hello(host) } else { blokir_tests::packets::http_get(&[host]) }
}

/// Where the name starts in `stream(tls, host)`.
fn name_at(tls: bool, host: &str) -> usize {
    let s = stream(tls, host);
    s.windows(host.len()).position(|w| w == host.as_bytes()).unwrap()
}

fn set_tamper(l: &mut Loaded, policy: u32) {
    let mut cfg = l.kernel.config();
    cfg.tamper_policy = policy;
    l.kernel.write_config(cfg).unwrap();
}

fn all_pass(verdicts: &[u32], what: &str) {
    assert!(verdicts.iter().all(|v| *v == XDP_PASS), "{what}: {verdicts:?}");
}

/// Every combination of protocol and family, with a fresh client port.
fn each(mut f: impl FnMut(bool, bool, u16)) {
    let mut sport = 30000;
    for tls in [true, false] {
        for v6 in [false, true] {
            sport += 1;
            f(tls, v6, sport);
        }
    }
}

#[test]
fn seqovl_bytes_before_the_start_are_trimmed_and_never_stall_a_flow() {
    let mut l = Loaded::new(&[LISTED]);
    let mut model = Model::default();
    let mut sport = 31000u16;
    for tls in [true, false] {
        for v6 in [false, true] {
            for host in [LISTED, UNLISTED] {
                // zapret's seqovl: 1, 5 and 336 bytes "before" ISN + 1,
                // the first segment cut inside the name or whole.
                for before in [1i64, 5, 336] {
                    for cut in [None, Some(name_at(tls, host) + 3)] {
                        sport += 1;
                        let c = Conn::new(tls, v6, sport);
                        let s = stream(tls, host);
                        let cut = cut.unwrap_or(s.len());
                        let mut first = vec![b'Z'; before as usize];
                        first.extend_from_slice(&s[..cut]);
                        let mut frames = vec![c.syn(), c.data(-before, &first, |f| f)];
                        if cut < s.len() {
                            frames.push(c.data(cut as i64, &s[cut..], |f| f));
                        }
                        frames.push(c.data(s.len() as i64, b"more bytes", |f| f));
                        let what = format!("seqovl {before} before, cut {cut}, tls={tls} v6={v6} {host}");
                        let early = l.counter(counters::TCP_EARLY);
                        let v = l.run_with_model(&mut model, &frames, &what);
                        assert_eq!(l.counter(counters::TCP_EARLY), early, "{what}: nothing is early");
                        if host == LISTED {
                            assert_blocked_from_name(&v[1..], &what);
                        } else {
                            all_pass(&v, &what);
                        }
                    }
                }
                // A segment wholly before the start (old data) passes
                // unread; the start stays on record.
                sport += 1;
                let c = Conn::new(tls, v6, sport);
                let s = stream(tls, host);
                let frames = vec![c.syn(), c.data(-40, &[b'Z'; 40], |f| f), c.data(10, &s[10..], |f| f), c.data(0, &s, |f| f)];
                let what = format!("stale then early then whole, tls={tls} v6={v6} {host}");
                let v = l.run_with_model(&mut model, &frames, &what);
                assert_eq!(&v[..3], &[XDP_PASS, XDP_PASS, XDP_DROP], "{what}");
                assert_eq!(v[3], if host == LISTED { PASS_AS_RST } else { XDP_PASS }, "{what}");
            }
        }
    }
}

/// The hello or request with one urgent byte: `oob` inserts it after the
/// part up to the name's third byte, on the first segment (ByeDPI `--oob`:
/// part one, then the urgent byte, with URG and the pointer after it);
/// `disoob` sends it as the first byte of the connection.
fn urgent_frames(c: &Conn, s: &[u8], at: usize, disoob: bool) -> Vec<Vec<u8>> {
    if disoob {
        let mut first = vec![b'X'];
        first.extend_from_slice(&s[..at]);
        vec![c.syn(), c.data(0, &first, |f| f.urgent(1)), c.data(at as i64 + 1, &s[at..], |f| f)]
    } else {
        let mut first = s[..at].to_vec();
        first.push(b'X');
        let ptr = first.len() as u16;
        vec![c.syn(), c.data(0, &first, |f| f.urgent(ptr)), c.data(at as i64 + 1, &s[at..], |f| f)]
    }
}

#[test]
fn urgent_bytes_on_a_flow_being_read_block_it_or_are_counted() {
    let mut l = Loaded::new(&[LISTED]);
    let mut model = Model::default();
    let mut blocked = 0;
    each(|tls, v6, sport| {
        for disoob in [false, true] {
            for (i, host) in [LISTED, UNLISTED].into_iter().enumerate() {
                let c = Conn::new(tls, v6, sport + 100 * (1 + i as u16) + 1000 * u16::from(disoob));
                let s = stream(tls, host);
                let frames = urgent_frames(&c, &s, name_at(tls, host) + 3, disoob);
                let what = format!("urgent, disoob={disoob}, tls={tls} v6={v6} {host}");
                let urgent = l.counter(counters::EVASION_URGENT);
                let v = l.run_with_model(&mut model, &frames, &what);
                // Tampering before the name is decided: blocked whatever the
                // name, from the urgent segment on.
                assert_eq!(v, [XDP_PASS, PASS_AS_RST, XDP_DROP], "{what}");
                assert_eq!(l.counter(counters::EVASION_URGENT), urgent + 1, "{what}");
                blocked += 1;
            }
        }
    });
    assert_eq!(l.counter(counters::EVASION_URGENT), blocked);
    // `pass`: counted, and read as it stands.
    set_tamper(&mut l, TAMPER_PASS);
    let mut model = Model::default();
    each(|tls, v6, sport| {
        let c = Conn::new(tls, v6, sport + 5000);
        let s = stream(tls, UNLISTED);
        let frames = urgent_frames(&c, &s, name_at(tls, UNLISTED) - 2, false);
        let what = format!("urgent under pass, tls={tls} v6={v6}");
        let urgent = l.counter(counters::EVASION_URGENT);
        l.run_with_model(&mut model, &frames, &what);
        assert_eq!(l.counter(counters::EVASION_URGENT), urgent + 1, "{what}");
    });
    // Real clients never send URG; a flow without it is unaffected, and URG
    // on a pure ACK or on a flow that is not read is not looked at.
    set_tamper(&mut l, TAMPER_BLOCK);
    each(|tls, v6, sport| {
        let c = Conn::new(tls, v6, sport + 6000);
        let frames = vec![c.syn(), c.data(0, b"SSH-2.0-OpenSSH_9.2\r\n", |f| f), c.data(21, b"x", |f| f.urgent(1)), c.data(22, &[], |f| f.urgent(1))];
        let what = format!("urgent on a flow not read, tls={tls} v6={v6}");
        let urgent = l.counter(counters::EVASION_URGENT);
        all_pass(&l.run_with_model(&mut model, &frames, &what), &what);
        assert_eq!(l.counter(counters::EVASION_URGENT), urgent, "{what}");
    });
}

/// TCP options: a fooled fake's (MD5, AO, a list too long to be real) and a
/// real client's.
const MD5: [u8; 20] = [1, 1, 19, 18, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5];
const TS_MD5: [u8; 32] =
    [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2, 19, 18, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 1, 1];
const AO: [u8; 16] = [29, 16, 1, 1, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a];
const NOPS_THEN_MD5: [u8; 32] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 19, 18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const REAL_TS_SACK: [u8; 24] = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2, 1, 1, 5, 10, 0, 0, 0, 9, 0, 0, 0, 10];

/// A way a fake is fooled so that the server discards it, as a frame
/// shaper.
type Fooling = (&'static str, fn(Frame) -> Frame);

/// The foolings blokir sees on the segment itself (a sequence number far
/// behind is not read at all: see the test below).
fn foolings() -> Vec<Fooling> {
    vec![
        ("no ACK", |f| f.no_ack()),
        ("MD5 option", |f| f.tcp_options(&MD5)),
        ("timestamps and MD5", |f| f.tcp_options(&TS_MD5)),
        ("TCP-AO option", |f| f.tcp_options(&AO)),
        ("14 NOPs, then MD5", |f| f.tcp_options(&NOPS_THEN_MD5)),
    ]
}

/// zapret's fakedsplit: the fake of part one (naming `fake_host`, as long
/// as the real name), the real part one, the fake again; then part two
/// (real), and more data.
fn fakedsplit(c: &Conn, real: &[u8], fake: &[u8], cut: usize, fool: fn(Frame) -> Frame) -> Vec<Vec<u8>> {
    vec![
        c.syn(),
        c.data(0, &fake[..cut], fool),
        c.data(0, &real[..cut], |f| f),
        c.data(0, &fake[..cut], fool),
        c.data(cut as i64, &real[cut..], |f| f),
        c.data(real.len() as i64, b"after", |f| f),
    ]
}

#[test]
fn fake_segments_the_server_discards_decide_nothing() {
    let mut l = Loaded::new(&[LISTED]);
    let mut model = Model::default();
    // The fake names an unlisted host of the same length.
    assert_eq!(LISTED.len(), UNLISTED.len());
    for policy in [TAMPER_BLOCK, TAMPER_PASS] {
        set_tamper(&mut l, policy);
        for (k, (fooling, fool)) in foolings().into_iter().enumerate() {
            each(|tls, v6, sport| {
                for (i, host) in [LISTED, UNLISTED].into_iter().enumerate() {
                    let c = Conn::new(tls, v6, sport + 10 * k as u16 + 100 * i as u16 + 1000 * policy as u16);
                    let real = stream(tls, host);
                    let fake = stream(tls, UNLISTED);
                    let cut = name_at(tls, host) + 4;
                    let frames = fakedsplit(&c, &real, &fake, cut, fool);
                    let what = format!("fakedsplit, {fooling}, policy {policy}, tls={tls} v6={v6} {host}");
                    let fakes = l.counter(counters::EVASION_FAKE);
                    let v = l.run_with_model(&mut model, &frames, &what);
                    if policy == TAMPER_BLOCK {
                        // Caught at the first fake, whatever the name.
                        assert_blocked_from_name(&v, &what);
                        assert_eq!(v[1], PASS_AS_RST, "{what}");
                        assert_eq!(l.counter(counters::EVASION_FAKE), fakes + 1, "{what}");
                    } else {
                        // The fakes pass unread (the server discards them);
                        // the real bytes decide.
                        if host == LISTED {
                            assert_blocked_from_name(&v, &what);
                            assert_eq!(v[4], PASS_AS_RST, "{what}");
                        } else {
                            all_pass(&v, &what);
                        }
                        assert_eq!(l.counter(counters::EVASION_FAKE), fakes + 2, "{what}");
                    }
                }
            });
        }
    }
}

#[test]
fn fakes_far_behind_and_real_options_are_no_tampering() {
    let mut l = Loaded::new(&[LISTED]);
    let mut model = Model::default();
    each(|tls, v6, sport| {
        for (i, host) in [LISTED, UNLISTED].into_iter().enumerate() {
            let c = Conn::new(tls, v6, sport + 100 * i as u16);
            let real = stream(tls, host);
            let fake = stream(tls, UNLISTED);
            let cut = name_at(tls, host) + 4;
            // zapret's badseq: the fake 10,000 bytes behind (out of the
            // window: discarded), before the first real segment and after
            // it; the real segments carry a real stack's options.
            let frames = vec![
                c.syn(),
                c.data(-10_000, &fake[..cut], |f| f),
                c.data(0, &real[..cut], |f| f.tcp_options(&REAL_TS_SACK)),
                c.data(-10_000 + cut as i64, &fake[cut..], |f| f),
                c.data(cut as i64, &real[cut..], |f| f.tcp_options(&REAL_TS_SACK[..12])),
            ];
            let what = format!("badseq fakes, tls={tls} v6={v6} {host}");
            let before = (l.counter(counters::EVASION_FAKE), l.counter(counters::EVASION_URGENT));
            let v = l.run_with_model(&mut model, &frames, &what);
            if host == LISTED {
                assert_eq!(v, [XDP_PASS, XDP_PASS, XDP_PASS, XDP_PASS, PASS_AS_RST], "{what}");
            } else {
                all_pass(&v, &what);
            }
            assert_eq!((l.counter(counters::EVASION_FAKE), l.counter(counters::EVASION_URGENT)), before, "{what}");
        }
    });
}

/// An unlisted name as long as the others: what the fakes below name.
const DECOY: &str = "decoyed.example";

/// zapret's foolings that the segment itself does not show (blokir reads
/// such a fake as any segment): a bad TCP checksum, a TTL (hop limit) of 1,
/// a wrong ACK number. Applied to the built frame.
/// A fooling blokir does not see, as a name and a shaper of the built
/// frame (`true`: IPv6).
type BlindFooling = (&'static str, fn(Vec<u8>, bool) -> Vec<u8>);

fn blind_foolings() -> Vec<BlindFooling> {
    vec![
        ("badsum", |mut f, v6| {
            let tcp = if v6 { 14 + 40 } else { 14 + usize::from(f[14] & 0xf) * 4 };
            f[tcp + 16] ^= 0x5a;
            f
        }),
        ("ttl 1", |mut f, v6| {
            if v6 {
                f[14 + 7] = 1;
            } else {
                f[14 + 8] = 1;
                let ihl = usize::from(f[14] & 0xf) * 4;
                f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
                let sum = blokir_tests::packets::ipv4_checksum(&f[14..14 + ihl]);
                f[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
            }
            f
        }),
        ("badack", |f, _| f),
    ]
}

/// A fake of `bytes` at `rel`, fooled by `fooling` (badack: the ACK number
/// 66,000 before the real one).
fn blind_fake(c: &Conn, rel: i64, bytes: &[u8], v6: bool, fooling: BlindFooling) -> Vec<u8> {
    let seq = (i64::from(ISN) + 1 + rel) as u32;
    let ack = if fooling.0 == "badack" { 1u32.wrapping_sub(66_000) } else { 1 };
    (fooling.1)(c.frame.clone().seq_ack(seq, ack).build(bytes), v6)
}

#[test]
fn fakes_fooled_off_the_segment_are_told_by_their_rewritten_name() {
    let mut l = Loaded::new(&[LISTED]);
    let mut model = Model::default();
    assert_eq!(LISTED.len(), DECOY.len());
    assert_eq!(UNLISTED.len(), DECOY.len());
    let mut sport = 33000u16;
    for policy in [TAMPER_BLOCK, TAMPER_PASS] {
        set_tamper(&mut l, policy);
        for fooling in blind_foolings() {
            each(|tls, v6, _| {
                for host in [LISTED, UNLISTED] {
                    // zapret's fakedsplit: part one's fake (naming the
                    // decoy) first, cut 4 bytes into the name; the real
                    // part one; the fake again; part two; more data.
                    sport += 1;
                    let c = Conn::new(tls, v6, sport);
                    let real = stream(tls, host);
                    let fake = stream(tls, DECOY);
                    let cut = name_at(tls, host) + 4;
                    let frames = vec![
                        c.syn(),
                        blind_fake(&c, 0, &fake[..cut], v6, fooling),
                        c.data(0, &real[..cut], |f| f),
                        blind_fake(&c, 0, &fake[..cut], v6, fooling),
                        c.data(cut as i64, &real[cut..], |f| f),
                        c.data(real.len() as i64, b"after", |f| f),
                    ];
                    let what = format!("fakedsplit, {}, policy {policy}, tls={tls} v6={v6} {host}", fooling.0);
                    let rewrites = l.counter(counters::EVASION_REWRITE);
                    let v = l.run_with_model(&mut model, &frames, &what);
                    // The real part one differs from the fake read first.
                    assert_eq!(l.counter(counters::EVASION_REWRITE), rewrites + 1, "{what}");
                    if policy == TAMPER_BLOCK {
                        // Blocked at the real copy, whatever the name: the
                        // server's end is closed.
                        assert_eq!(v, [XDP_PASS, XDP_PASS, PASS_AS_RST, XDP_DROP, XDP_DROP, XDP_DROP], "{what}");
                    } else {
                        // Counted only: the name read stands.
                        all_pass(&v, &what);
                    }

                    // zapret's fakeddisorder: part two first (ahead of the
                    // parser: dropped, the client's stack sends it again
                    // once part one is acknowledged), then as fakedsplit.
                    sport += 1;
                    let c = Conn::new(tls, v6, sport);
                    let frames = vec![
                        c.syn(),
                        c.data(cut as i64, &real[cut..], |f| f),
                        blind_fake(&c, 0, &fake[..cut], v6, fooling),
                        c.data(0, &real[..cut], |f| f),
                        blind_fake(&c, 0, &fake[..cut], v6, fooling),
                        c.data(cut as i64, &real[cut..], |f| f),
                    ];
                    let what = format!("fakeddisorder, {}, policy {policy}, tls={tls} v6={v6} {host}", fooling.0);
                    let rewrites = l.counter(counters::EVASION_REWRITE);
                    let v = l.run_with_model(&mut model, &frames, &what);
                    assert_eq!(l.counter(counters::EVASION_REWRITE), rewrites + 1, "{what}");
                    if policy == TAMPER_BLOCK {
                        assert_eq!(v, [XDP_PASS, XDP_DROP, XDP_PASS, PASS_AS_RST, XDP_DROP, XDP_DROP], "{what}");
                    } else {
                        // The fake's name (the decoy, read first with the
                        // real part two) stands: counted only.
                        assert_eq!(v, [XDP_PASS, XDP_DROP, XDP_PASS, XDP_PASS, XDP_PASS, XDP_PASS], "{what}");
                    }

                    // The whole fake first, then the real stream whole.
                    sport += 1;
                    let c = Conn::new(tls, v6, sport);
                    let frames = vec![c.syn(), blind_fake(&c, 0, &fake, v6, fooling), c.data(0, &real, |f| f), c.data(real.len() as i64, b"after", |f| f)];
                    let what = format!("whole fake first, {}, policy {policy}, tls={tls} v6={v6} {host}", fooling.0);
                    let rewrites = l.counter(counters::EVASION_REWRITE);
                    let v = l.run_with_model(&mut model, &frames, &what);
                    assert_eq!(l.counter(counters::EVASION_REWRITE), rewrites + 1, "{what}");
                    if policy == TAMPER_BLOCK || host == LISTED {
                        // Under `pass` the real copy, which starts a hello
                        // or request on a flow whose name passed, is read
                        // afresh: a listed name is blocked.
                        assert_eq!(v, [XDP_PASS, XDP_PASS, PASS_AS_RST, XDP_DROP], "{what}");
                    } else {
                        all_pass(&v, &what);
                    }
                }
            });
        }
    }
}

#[test]
fn retransmissions_of_the_same_bytes_are_no_rewrite() {
    let mut l = Loaded::new(&[LISTED]);
    let mut model = Model::default();
    for policy in [TAMPER_BLOCK, TAMPER_PASS] {
        set_tamper(&mut l, policy);
        each(|tls, v6, sport| {
            for (i, host) in [LISTED, UNLISTED].into_iter().enumerate() {
                let c = Conn::new(tls, v6, sport + 100 * i as u16 + 1000 * policy as u16 + 3000);
                let s = stream(tls, host);
                let cut = name_at(tls, host) + 4;
                // Cut in the name; the first part sent again, the whole
                // sent again (cut otherwise: as a stack may repacketize),
                // its name's last bytes in another case, then more data.
                let mut shouted = s.clone();
                let at = name_at(tls, host);
                shouted[at + 8..at + 15].make_ascii_uppercase();
                let frames = vec![
                    c.syn(),
                    c.data(0, &s[..cut], |f| f),
                    c.data(0, &s[..cut], |f| f),
                    c.data(cut as i64, &s[cut..], |f| f),
                    c.data(0, &s, |f| f),
                    c.data(cut as i64 - 2, &s[cut - 2..cut + 6], |f| f),
                    c.data(0, &shouted, |f| f),
                    c.data(s.len() as i64, b"after", |f| f),
                ];
                let what = format!("retransmissions, policy {policy}, tls={tls} v6={v6} {host}");
                let rewrites = l.counter(counters::EVASION_REWRITE);
                let v = l.run_with_model(&mut model, &frames, &what);
                assert_eq!(l.counter(counters::EVASION_REWRITE), rewrites, "{what}");
                if host == LISTED {
                    assert_eq!(v[..4], [XDP_PASS, XDP_PASS, XDP_PASS, PASS_AS_RST], "{what}");
                    assert_blocked_from_name(&v, &what);
                } else {
                    all_pass(&v, &what);
                }
            }
        });
    }
}

/// A segment that went through the compare stage and passed unread (a
/// retransmission) leaves the next segment its checks: found by xdp's
/// mutation test, where a copy that changed nothing left the flow
/// marked mid-segment and the kernel skipped the next copy's compare.
#[test]
fn a_retransmission_through_the_compare_leaves_the_next_segment_checked() {
    let mut l = Loaded::new(&[LISTED]);
    let mut model = Model::default();
    each(|tls, v6, sport| {
        // Watched (the name passed, the stream was read): the stream again
        // but its first 4 bytes (so that it starts no hello or request),
        // the same; then such a copy naming the decoy.
        let c = Conn::new(tls, v6, sport + 6000);
        let (s, decoy) = (stream(tls, UNLISTED), stream(tls, DECOY));
        let frames = vec![c.syn(), c.data(0, &s, |f| f), c.data(4, &s[4..], |f| f), c.data(4, &decoy[4..], |f| f)];
        let what = format!("watched, tls={tls} v6={v6}");
        let rewrites = l.counter(counters::EVASION_REWRITE);
        let v = l.run_with_model(&mut model, &frames, &what);
        assert_eq!(v, [XDP_PASS, XDP_PASS, XDP_PASS, PASS_AS_RST], "{what}");
        assert_eq!(l.counter(counters::EVASION_REWRITE), rewrites + 1, "{what}");

        // Still being read (cut 4 bytes into the name): part one again,
        // then part two as a fake without ACK.
        let c = Conn::new(tls, v6, sport + 7000);
        let cut = name_at(tls, UNLISTED) + 4;
        let frames = vec![c.syn(), c.data(0, &s[..cut], |f| f), c.data(0, &s[..cut], |f| f), c.data(cut as i64, &s[cut..], |f| f.no_ack())];
        let what = format!("being read, tls={tls} v6={v6}");
        let fakes = l.counter(counters::EVASION_FAKE);
        let v = l.run_with_model(&mut model, &frames, &what);
        assert_eq!(v, [XDP_PASS, XDP_PASS, XDP_PASS, PASS_AS_RST], "{what}");
        assert_eq!(l.counter(counters::EVASION_FAKE), fakes + 1, "{what}");
    });
}

/// A SYN on a flow whose hello or request is being read. The server holds
/// the connection and discards it, but a fake one (any ISN, a TTL that
/// dies on the way) once made blokir forget the flow, and the rest of the
/// name passed unread. It is tampering: under `block` the flow is blocked
/// and the server's end closed (the SYN goes on as a RST), so that a new
/// connection on the pair (the client's next SYN) starts afresh; under
/// `pass` the flow is forgotten.
#[test]
fn a_syn_while_a_name_is_read_blocks_the_flow_under_block() {
    let mut l = Loaded::new(&[LISTED]);
    let mut model = Model::default();
    for policy in [TAMPER_BLOCK, TAMPER_PASS] {
        set_tamper(&mut l, policy);
        let mut sport = 32000 + policy as u16 * 100;
        for host in [LISTED, UNLISTED] {
            for isn_off in [3000u32, 1 << 31, u32::MAX - 10] {
                each_kind(&mut |tls, v6| {
                    sport += 1;
                    let c = Conn::new(tls, v6, sport);
                    let s = stream(tls, host);
                    let cut = name_at(tls, host) - 2;
                    let fake_syn = c.frame.clone().syn(ISN.wrapping_add(isn_off)).build(&[]);
                    let frames = [c.syn(), c.data(0, &s[..cut], |f| f), fake_syn, c.data(cut as i64, &s[cut..], |f| f)];
                    let what = format!("SYN mid-read +{isn_off}, tls={tls} v6={v6} {host} policy {policy}");
                    let syns = l.counter(counters::EVASION_SYN);
                    let v = l.run_with_model(&mut model, &frames, &what);
                    assert_eq!(l.counter(counters::EVASION_SYN), syns + 1, "{what}");
                    if policy == TAMPER_BLOCK {
                        assert_eq!(v, [XDP_PASS, XDP_PASS, PASS_AS_RST, XDP_DROP], "{what}");
                    } else {
                        all_pass(&v, &what);
                    }
                });
            }
        }
        // A new connection on the pair of one whose hello stopped half
        // read: its first SYN closes the old one, the next starts afresh.
        sport += 1;
        let c = Conn::new(true, false, sport);
        let s = stream(true, UNLISTED);
        let cut = name_at(true, UNLISTED) - 2;
        let new_isn = ISN.wrapping_add(900_000);
        let syn2 = c.frame.clone().syn(new_isn).build(&[]);
        let frames = [c.syn(), c.data(0, &s[..cut], |f| f), syn2.clone(), syn2, c.frame.clone().seq_ack(new_isn + 1, 1).build(&s)];
        let what = format!("a new connection on a half-read pair, policy {policy}");
        let v = l.run_with_model(&mut model, &frames, &what);
        let first = if policy == TAMPER_BLOCK { PASS_AS_RST } else { XDP_PASS };
        assert_eq!(v, [XDP_PASS, XDP_PASS, first, XDP_PASS, XDP_PASS], "{what}");
    }
}

/// Two SYNs with different ISNs before the first data (a fake one with a
/// TTL that dies on the way, before or after the real one): the later one
/// is dropped, so only the start on record can start the server's
/// connection. A start moved by a fake SYN once made the real data look
/// stale (passed unread) or trimmed.
#[test]
fn a_second_syn_with_another_isn_is_dropped() {
    let mut l = Loaded::new(&[LISTED]);
    let mut model = Model::default();
    let mut sport = 33000;
    for host in [LISTED, UNLISTED] {
        each_kind(&mut |tls, v6| {
            let s = stream(tls, host);
            // The fake's start lies past the whole stream: the real data
            // looked wholly before it.
            sport += 1;
            let c = Conn::new(tls, v6, sport);
            let fake = c.frame.clone().syn(ISN + 5000).build(&[]);
            let what = format!("a fake SYN after the real one, tls={tls} v6={v6} {host}");
            let before = l.counter(counters::EVASION_SYN);
            let v = l.run_with_model(&mut model, &[c.syn(), fake, c.data(0, &s, |f| f)], &what);
            assert_eq!(l.counter(counters::EVASION_SYN), before + 1, "{what}");
            assert_eq!(&v[..2], &[XDP_PASS, XDP_DROP], "{what}");
            assert_eq!(v[2], if host == LISTED { PASS_AS_RST } else { XDP_PASS }, "{what}");
            // The fake first: the real SYN never reaches the server, so
            // the client gets no connection to send its hello on.
            sport += 1;
            let c = Conn::new(tls, v6, sport);
            let fake = c.frame.clone().syn(ISN + 5000).build(&[]);
            let what = format!("a fake SYN before the real one, tls={tls} v6={v6} {host}");
            let v = l.run_with_model(&mut model, &[fake, c.syn(), c.syn()], &what);
            assert_eq!(v, [XDP_PASS, XDP_DROP, XDP_DROP], "{what}");
            // seqovl after a fake SYN: trimmed against the real start.
            sport += 1;
            let c = Conn::new(tls, v6, sport);
            let fake = c.frame.clone().syn(ISN + 5000).build(&[]);
            let mut first = vec![b'Z'; 5];
            first.extend_from_slice(&s);
            let what = format!("a fake SYN, then seqovl, tls={tls} v6={v6} {host}");
            let v = l.run_with_model(&mut model, &[c.syn(), fake, c.data(-5, &first, |f| f)], &what);
            assert_eq!(v[2], if host == LISTED { PASS_AS_RST } else { XDP_PASS }, "{what}");
        });
    }
    // A SYN resent with its ISN is no conflict.
    let c = Conn::new(true, false, 33900);
    let s = stream(true, LISTED);
    let before = l.counter(counters::EVASION_SYN);
    let v = l.run_with_model(&mut model, &[c.syn(), c.syn(), c.data(0, &s, |f| f)], "a SYN resent");
    assert_eq!(l.counter(counters::EVASION_SYN), before, "a SYN resent");
    assert_eq!(&v[..2], &[XDP_PASS, XDP_PASS], "a SYN resent");
    assert_blocked_from_name(&v, "a SYN resent");
}

/// Each protocol and family.
fn each_kind(go: &mut impl FnMut(bool, bool)) {
    for tls in [true, false] {
        for v6 in [false, true] {
            go(tls, v6);
        }
    }
}
