//! Writes a small seed corpus for the targets into `corpus/<target>/`
//! (relative to the current directory): run it from `fuzz/` with
//! `cargo +nightly-2026-05-20 run --example make_seeds` before the first fuzzing run.
//! Existing files are left alone.

use std::{fs, path::Path};

use blokir_fuzz::{
    LONGEST, RULES,
    seed::{Wrap, frame, query, wire_name},
};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    let path = dir.join(name);
    if !path.exists() {
        fs::write(path, bytes).expect("seed");
    }
}

/// The TLS handshake records at the start of each captured TCP payload
/// (a minimal pcap and header walk: Ethernet, IPv4/IPv6, TCP).
fn captured_hellos() -> Vec<Vec<u8>> {
    let Ok(pcap) = fs::read("../../shared/pcaps/real-clients-dev.pcap") else { return Vec::new() };
    let mut out = Vec::new();
    let mut p = 24;
    while p + 16 <= pcap.len() {
        let len = u32::from_le_bytes(pcap[p + 8..p + 12].try_into().unwrap()) as usize;
        let frame = &pcap[p + 16..(p + 16 + len).min(pcap.len())];
        p += 16 + len;
        let (l4, proto) = match frame.get(12..14) {
            Some([0x08, 0x00]) => (14 + usize::from(frame[14] & 0x0f) * 4, frame[23]),
            Some([0x86, 0xdd]) => (14 + 40, frame[20]),
            _ => continue,
        };
        if proto != 6 || frame.len() < l4 + 20 {
            continue;
        }
        let payload = &frame[l4 + usize::from(frame[l4 + 12] >> 4) * 4..];
        if payload.starts_with(&[22, 3]) {
            out.push(payload.to_vec());
        }
    }
    out
}

fn main() {
    // The first byte of an http_request input chooses the segmentation.
    let requests: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: www.blocked.example\r\nUser-Agent: curl/8.14.1\r\nAccept: */*\r\n\r\n",
        b"POST /form HTTP/1.1\r\nUser-Agent: x\r\nhost:  WWW.Bad.Test.:8080 \r\nContent-Length: 0\r\n\r\n",
        b"GET / HTTP/1.0\nAccept: */*\n\n",
        b"GET http://proxy.example/ HTTP/1.1\r\nHost: other.example\r\n\r\n",
    ];
    for (i, r) in requests.iter().enumerate() {
        write("http_request", &format!("request-{i}"), &[&[(i as u8) * 67][..], r].concat());
    }
    // tcp_signs: flags, options, payload.
    let signs: [&[u8]; 5] = [
        b"\x18\x01\x01\x08\x0a\0\0\0\x01\0\0\0\x02x",
        b"\x18\x01\x01\x13\x12\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0x",
        b"\x38\x1d\x10\x01\x01\0\0\0\0\0\0\0\0\0\0\0\0x",
        b"\x08\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x13\x12x",
        b"\x10",
    ];
    for (i, s) in signs.iter().enumerate() {
        write("tcp_signs", &format!("segment-{i}"), s);
    }
    for (i, hello) in captured_hellos().iter().enumerate() {
        // The first byte of a tls_hello input chooses the segmentation.
        write("tls_hello", &format!("captured-{i}"), &[&[i as u8][..], hello].concat());
    }
    let mut names: Vec<String> = RULES.iter().map(|r| r.name.to_string()).collect();
    names.extend(
        [
            "www.blocked.example",
            "www.bad.test",
            "a.ok.bad.test",
            "a.fine.bad.test",
            "b.a.deep.fine.bad.test",
            "z.worse.bad.test",
            "foo.x",
            "BLOCKED.Example",
            "example.com",
            // The root: no labels, no rule applies (whatever the previous
            // packet left in the scratch buffer).
            ".",
        ]
        .map(String::from),
    );
    names.push(format!("e.{LONGEST}"));
    let wraps = [
        Wrap::default(),
        Wrap { tcp: true, ..Wrap::default() },
        Wrap { v6: true, ..Wrap::default() },
        Wrap { v6: true, tcp: true, ipv6_ext: vec![0, 60, 44], ..Wrap::default() },
        Wrap { vlans: vec![0x88a8, 0x8100], ipv4_options: 8, ..Wrap::default() },
        // As many extension headers as the filter follows.
        Wrap { v6: true, ipv6_ext: vec![60; blokir_fuzz::IPV6_EXT_FOLLOWED], ..Wrap::default() },
    ];
    for (i, name) in names.iter().enumerate() {
        let wire = wire_name(name);
        for (k, w) in wraps.iter().enumerate() {
            write("inspect", &format!("q{i:02}-{k}"), &frame(&query(&wire, 1, k % 2 == 0), w));
        }
        // dns_name: control byte 0 (name at offset 0, nothing cut), and
        // one at offset 12 behind a header.
        let mut d = vec![0u8];
        d.extend_from_slice(&wire);
        write("dns_name", &format!("n{i:02}"), &d);
        let mut d = vec![12u8];
        d.extend_from_slice(&query(&wire, 28, false));
        write("dns_name", &format!("m{i:02}"), &d);
        let mut d = vec![0u8];
        d.extend_from_slice(name.as_bytes());
        write("dotted", &format!("d{i:02}"), &d);
    }
    // A compressed name: "www" at offset 13, then a pointer to "example.com" at 0.
    let mut d = vec![13u8];
    d.extend_from_slice(&wire_name("example.com"));
    d.extend_from_slice(&[3, b'w', b'w', b'w', 0xc0, 0x00]);
    write("dns_name", "pointer", &d);
    quic_seeds();
}

/// quic_initial: the RFC 9001 and RFC 9369 client Initials as datagrams
/// (mode 0), and hellos sealed from their frames (mode 1) over 1 to 3
/// Initials of both versions, coalesced or not, after junk or not;
/// quic_crypto: a hello's CRYPTO data in shuffled, overlapping pieces, and
/// pieces at the cap.
fn quic_seeds() {
    use blokir_fuzz::quic::seal::{client_hello, crypto_frame};
    for (i, file) in ["rfc9001-a2.hex", "rfc9369-a2.hex"].iter().enumerate() {
        let Ok(hex) = fs::read_to_string(Path::new("../filter-user/src/quic/testdata").join(file)) else { continue };
        let hex: String = hex.split_whitespace().collect();
        let d: Vec<u8> = (0..hex.len()).step_by(2).filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect();
        write("quic_initial", &format!("rfc-{i}"), &[&[0u8][..], &(d.len() as u16).to_be_bytes(), &d].concat());
    }
    let hello = client_hello("quic.portal.blocked.example", true, 1200);
    // PING, CRYPTO pieces last first, PADDING between.
    let mut frames = vec![0x01];
    for (i, piece) in hello.chunks(300).enumerate().rev() {
        frames.extend(crypto_frame((i * 300) as u64, piece));
        frames.extend([0, 0]);
    }
    for flags in [0x00u8, 0x01, 0x02, 0x05, 0x13, 0x24, 0x35] {
        let dcid: &[u8] = match flags % 3 {
            0 => &[0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08],
            1 => &[],
            _ => &[0x5a; 20],
        };
        write("quic_initial", &format!("sealed-{flags:02x}"), &[&[1, flags, dcid.len() as u8][..], dcid, &frames].concat());
    }
    let mut pieces = Vec::new();
    for (i, piece) in hello.chunks(200).enumerate().rev() {
        let at = (i * 200).saturating_sub(7) as u16;
        let data = &hello[at as usize..(at as usize + piece.len() + 7).min(hello.len())];
        pieces.extend(at.to_be_bytes());
        pieces.push(data.len().min(255) as u8);
        pieces.extend(&data[..data.len().min(255)]);
    }
    write("quic_crypto", "hello", &[&[0u8][..], &pieces].concat());
    write("quic_crypto", "cap", &[0, 0x82, 0x50, 200, 1, 2, 3, 0xc3, 0xff, 100, 4, 5, 6]);
    write("quic_crypto", "frames", &[&[1u8][..], &frames].concat());
}
