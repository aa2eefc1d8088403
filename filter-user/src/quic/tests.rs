//! The reader on the RFCs' vectors, on Chromium's real Initials, and on
//! crafted flows built with `seal`.

use std::time::{Duration, Instant};

use filter_common::{
    packet::{IPPROTO_UDP, parse_l3, parse_udp},
    tls::FlowKey,
};

use super::{
    Event, Reader,
    initial::{Keys, Version},
    seal::{client_hello, crypto_frame, initial, initial_with_keys},
};
use crate::model::canon_to_dotted;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn key(port: u16) -> FlowKey {
    FlowKey {
        src: [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        dst: [198, 18, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        src_port: port,
        dst_port: 443,
        family: 4,
    }
}

/// The name an event reports, with whether ECH was seen.
fn name(e: &Event) -> Option<(String, bool)> {
    match e {
        Event::Name { canon, ech, ended: true, .. } => Some((canon_to_dotted(&canon.0), *ech)),
        _ => None,
    }
}

#[test]
fn rfc_vectors_decrypt_to_their_hellos() {
    // RFC 9001 A.2 and RFC 9369 A.2: the same ClientHello (example.com)
    // protected with v1's and v2's keys for DCID 8394c8f03e515708.
    for (file, version) in [(include_str!("testdata/rfc9001-a2.hex"), Version::V1), (include_str!("testdata/rfc9369-a2.hex"), Version::V2)] {
        let d = hex(file);
        assert_eq!(d.len(), 1200);
        let mut r = Reader::default();
        let e = r.datagram(key(1), &d, Instant::now());
        assert_eq!(name(&e), Some(("example.com".into(), false)), "{version:?}");
        // A flow read whole is done: a retransmission is not read again.
        assert_eq!(r.datagram(key(1), &d, Instant::now()), Event::Done);
        // One bit flipped in the ciphertext: nothing opens.
        let mut bad = d.clone();
        bad[600] ^= 1;
        assert_eq!(Reader::default().datagram(key(1), &bad, Instant::now()), Event::Undecryptable);
        // The v1 packet read as v2 (or v2 as v1) does not open either.
        let mut other = d.clone();
        other[1..5].copy_from_slice(&if version == Version::V1 { Version::V2 } else { Version::V1 }.wire().to_be_bytes());
        assert_eq!(Reader::default().datagram(key(1), &other, Instant::now()), Event::Undecryptable);
    }
}

/// Chromium 156's Initials from the shared capture (UDP/443 datagrams).
fn chromium_initials() -> Vec<(FlowKey, Vec<u8>)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/pcaps/real-clients-dev.pcap");
    let path = std::env::var_os("BLOKIR_PCAPS").map_or(path, |d| std::path::PathBuf::from(d).join("real-clients-dev.pcap"));
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = pcap_file::pcap::PcapReader::new(file).unwrap();
    let mut out = Vec::new();
    while let Some(p) = reader.next_packet() {
        let frame = p.unwrap().data.into_owned();
        let Ok(l3) = parse_l3(&frame[..]) else { continue };
        if l3.proto != IPPROTO_UDP {
            continue;
        }
        let Ok(l4) = parse_udp(&frame[..], &l3) else { continue };
        if l4.dst_port != 443 {
            continue;
        }
        let Some(k) = flow_key(&frame, &l3, &l4) else { continue };
        out.push((k, frame[l4.payload_off..l4.payload_end].to_vec()));
    }
    out
}

fn flow_key(frame: &[u8], l3: &filter_common::packet::L3, l4: &filter_common::packet::L4) -> Option<FlowKey> {
    FlowKey::of(frame, l3, l4)
}

/// Chromium numbers its Initials from 1 and cuts its ~2 KB hello over two
/// of them in shuffled CRYPTO frames ("chaos protection"): the capture holds
/// the first Initial of three connections (the server never answered), each
/// with a gap after the first few dozen bytes of the stream. Each opens, its
/// frames parse, the reader waits for the rest, and one holds the name past
/// its gap.
#[test]
fn chromium_initials_from_the_capture() {
    use super::{
        initial::{long_header, open},
        stream::CryptoStream,
    };
    let initials = chromium_initials();
    assert_eq!(initials.len(), 3, "the capture's QUIC Initials");
    let mut r = Reader::default();
    let mut named = 0;
    for (k, d) in &initials {
        assert_eq!(r.datagram(*k, d, Instant::now()), Event::Pending);
        let mut d = d.clone();
        let h = long_header(&d, 0).unwrap();
        assert!(h.initial && h.version == Version::V1 && h.end == d.len());
        let keys = Keys::client(h.version, &d[h.dcid.0..h.dcid.1]);
        let (pn, range) = open(&mut d, 0, &h, &keys).unwrap();
        assert_eq!(pn, 1);
        let mut s = CryptoStream::default();
        s.take_frames(&d[range.0..range.1]).unwrap();
        let hello = s.contiguous();
        assert!((40..200).contains(&hello.len()), "a gap early in the stream: {} bytes before it", hello.len());
        assert_eq!(hello[0], 1, "a ClientHello");
        let total = u32::from_be_bytes([0, hello[1], hello[2], hello[3]]) as usize + 4;
        assert!((1700..2200).contains(&total), "an ML-KEM hello: {total} bytes");
        named += usize::from(d[range.0..range.1].windows(27).any(|w| w == b"quic.portal.blocked.example"));
    }
    assert!(named >= 1, "no Initial holds the name");
}

const DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];

/// A hello cut into `pieces` CRYPTO frames per packet over `packets`
/// Initials, the frames of each packet in reverse order with PING and
/// PADDING between, the packets themselves sent last first.
fn split_flow(version: Version, dcid: &[u8], hello: &[u8], packets: usize, pieces: usize) -> Vec<Vec<u8>> {
    let chunk = hello.len().div_ceil(packets);
    let mut out = Vec::new();
    for (p, part) in hello.chunks(chunk).enumerate() {
        let base = p * chunk;
        let piece = part.len().div_ceil(pieces);
        let mut frames = Vec::new();
        for (i, bytes) in part.chunks(piece).enumerate().rev() {
            frames.extend(crypto_frame((base + i * piece) as u64, bytes));
            frames.extend([0x01, 0x00, 0x00, 0x01]);
        }
        out.push(initial(version, dcid, &[1, 2, 3, 4], p as u32, &frames, 1200));
    }
    out.reverse();
    out
}

fn read_flow(datagrams: &[Vec<u8>]) -> Vec<Event> {
    let mut r = Reader::default();
    datagrams.iter().map(|d| r.datagram(key(7), d, Instant::now())).collect()
}

#[test]
fn hellos_in_one_two_and_three_initials_shuffled() {
    for version in [Version::V1, Version::V2] {
        for packets in [1, 2, 3] {
            let hello = client_hello("Quic.Portal.Blocked.Example", false, 900 * packets);
            let events = read_flow(&split_flow(version, &DCID, &hello, packets, 7));
            let (last, before) = events.split_last().unwrap();
            assert!(before.iter().all(|e| *e == Event::Pending), "{version:?} {packets}: {before:?}");
            assert_eq!(name(last), Some(("quic.portal.blocked.example".into(), false)), "{version:?} {packets}");
        }
    }
}

#[test]
fn dcid_lengths_0_8_20() {
    for dcid in [&[][..], &DCID[..], &[0x5a; 20][..]] {
        let hello = client_hello("b.portal.blocked.example", true, 1500);
        let events = read_flow(&split_flow(Version::V1, dcid, &hello, 2, 3));
        assert_eq!(name(events.last().unwrap()), Some(("b.portal.blocked.example".into(), true)), "DCID of {} bytes", dcid.len());
    }
}

#[test]
fn coalesced_packets_and_a_later_initial_to_the_servers_cid() {
    let hello = client_hello("x.test", false, 1500);
    let (a, b) = hello.split_at(700);
    let keys = Keys::client(Version::V1, &DCID);
    // The second half in an Initial to the server's CID (with the first
    // DCID's keys), coalesced with a 0-RTT-typed packet after it.
    let first = initial(Version::V1, &DCID, &[9], 0, &crypto_frame(0, a), 1200);
    let mut second = initial_with_keys(Version::V1, &keys, &[0xee; 8], &[9], 1, &crypto_frame(700, b), 0);
    let mut zero_rtt = vec![0xd3];
    zero_rtt.extend_from_slice(&1u32.to_be_bytes());
    zero_rtt.extend_from_slice(&[8, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0, 0x40, 30]);
    zero_rtt.extend_from_slice(&[0x77; 30]);
    second.extend_from_slice(&zero_rtt);
    let events = read_flow(&[first, second]);
    assert_eq!(events[0], Event::Pending);
    assert_eq!(name(&events[1]), Some(("x.test".into(), false)));
    // Two Initials coalesced in one datagram.
    let mut both = initial(Version::V2, &DCID, &[9], 0, &crypto_frame(700, b), 0);
    both.extend(initial(Version::V2, &DCID, &[9], 1, &crypto_frame(0, a), 0));
    assert_eq!(name(&read_flow(&[both])[0]), Some(("x.test".into(), false)));
}

#[test]
fn junk_first_then_retry_with_a_new_dcid() {
    let hello = client_hello("dl.blocked.example", false, 1500);
    let mut junk = vec![0xc0];
    junk.extend_from_slice(&1u32.to_be_bytes());
    junk.extend_from_slice(&[8; 8]);
    junk.resize(1200, 0x42);
    let mut r = Reader::default();
    let now = Instant::now();
    assert_eq!(r.datagram(key(9), &junk, now), Event::Undecryptable);
    assert!(r.is_empty(), "junk holds no slot");
    // Half the hello to the first DCID; a Retry (not seen here: it is the
    // server's) gives a new DCID, and the hello comes again whole.
    assert_eq!(r.datagram(key(9), &initial(Version::V1, &DCID, &[1], 0, &crypto_frame(0, &hello[..900]), 1200), now), Event::Pending);
    let new_dcid = [0x11; 18];
    let events: Vec<Event> = split_flow(Version::V1, &new_dcid, &hello, 2, 4).iter().map(|d| r.datagram(key(9), d, now)).collect();
    assert_eq!(name(events.last().unwrap()), Some(("dl.blocked.example".into(), false)));
}

#[test]
fn other_versions_and_packet_types_are_not_read() {
    let hello = client_hello("blocked.test", false, 0);
    let mut draft = initial(Version::V1, &DCID, &[], 0, &crypto_frame(0, &hello), 1200);
    draft[1..5].copy_from_slice(&0xff00_001du32.to_be_bytes());
    assert_eq!(read_flow(&[draft]), [Event::Undecryptable]);
    // A Handshake packet (v1 type 2) with the Initial keys.
    let mut hs = initial(Version::V1, &DCID, &[], 0, &crypto_frame(0, &hello), 1200);
    hs[0] = (hs[0] & 0xcf) | 0x20;
    assert_eq!(read_flow(&[hs]), [Event::Undecryptable]);
    // A stream that is not a ClientHello; one that breaks the frame format.
    let notls = initial(Version::V1, &DCID, &[], 0, &crypto_frame(0, &[2, 0, 0, 4, 0, 0, 0, 0]), 1200);
    assert_eq!(read_flow(&[notls]), [Event::NotHello]);
    let stream_frame = initial(Version::V1, &DCID, &[], 0, &[0x08, 0x00, 0x01, 0x61], 1200);
    assert_eq!(read_flow(&[stream_frame]), [Event::GaveUp]);
    // A hello without server_name.
    let mut nameless = client_hello("a", false, 0);
    let cut = nameless.len() - (4 + 2 + 1 + 2 + 1);
    nameless.truncate(cut);
    let len = (nameless.len() - 4) as u32;
    nameless[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
    let exts = (nameless.len() - 4 - 2 - 32 - 1 - 4 - 2 - 2) as u16;
    let at = 4 + 2 + 32 + 1 + 4 + 2;
    nameless[at..at + 2].copy_from_slice(&exts.to_be_bytes());
    assert_eq!(read_flow(&[initial(Version::V1, &DCID, &[], 0, &crypto_frame(0, &nameless), 1200)]), [Event::NoName]);
}

#[test]
fn the_table_is_bounded() {
    let mut r = Reader::new(4, Duration::from_secs(10));
    let hello = client_hello("x.test", false, 1500);
    let t0 = Instant::now();
    for port in 0..10u16 {
        let first = &split_flow(Version::V1, &DCID, &hello, 2, 1)[1];
        assert_eq!(r.datagram(key(port), first, t0 + Duration::from_millis(u64::from(port))), Event::Pending);
        assert!(r.len() <= 4);
    }
}
