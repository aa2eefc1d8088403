//! The packets of each class: DNS queries (hickory-proto), ClientHellos
//! (real captured hellos re-targeted to other names), a plain HTTP request,
//! non-DNS UDP and a bare TCP ACK.

use anyhow::bail;
use blokir_tests::{
    capture_frames,
    packets::{Frame, dns},
};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

/// A distinct client for flow `i`: 198.18.x.y and a port, so every
/// measured TCP segment starts a flow of its own.
pub fn client(i: usize) -> ([u8; 4], u16) {
    let host = (i % 60_000) as u32 + 256;
    ([198, 18, (host >> 8) as u8, host as u8], 10_000 + (i / 60_000 % 50_000) as u16)
}

pub const SERVER: [u8; 4] = [198, 19, 0, 2];

pub fn dns_query(name: &str, i: usize) -> Vec<u8> {
    dns(&Frame::udp().ports(20_000 + (i % 40_000) as u16, 53), name)
}

pub fn tcp(i: usize, dport: u16, seq: u32, payload: &[u8], psh: bool) -> Vec<u8> {
    let (src, sport) = client(i);
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src, SERVER, 64).tcp(sport, dport, seq, 64240).ack(1);
    let b = if psh { b.psh() } else { b };
    let mut v = Vec::with_capacity(64 + payload.len());
    b.write(&mut v, payload).expect("building a TCP frame");
    v
}

pub fn udp(i: usize, dport: u16, payload: &[u8]) -> Vec<u8> {
    let (src, sport) = client(i);
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src, SERVER, 64).udp(sport, dport);
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("building a UDP frame");
    v
}

pub fn http_get(name: &str, i: usize) -> Vec<u8> {
    let req = format!("GET / HTTP/1.1\r\nHost: {name}\r\nUser-Agent: curl/8.14.1\r\nAccept: */*\r\n\r\n");
    tcp(i, 80, 1_000_000, req.as_bytes(), true)
}

/// A QUIC-sized datagram to port 443 (not DNS: passed after the headers).
pub fn udp_other(i: usize) -> Vec<u8> {
    let mut payload = vec![0x40u8; 1200];
    payload[1..9].copy_from_slice(&(i as u64).to_be_bytes());
    udp(i, 443, &payload)
}

/// A QUIC v1 client Initial of flow `i` to port 443 (padded to 1,200
/// bytes, as clients send them), its ClientHello naming `name`.
pub fn quic_initial(name: &str, i: usize) -> Vec<u8> {
    use blokir::quic::{initial::Version, seal};
    let dcid = (i as u64).to_be_bytes();
    udp(i, 443, &seal::initial(Version::V1, &dcid, &[7; 4], 0, &seal::crypto_frame(0, &seal::client_hello(name, false, 0)), 1200))
}

pub fn tcp_ack(i: usize) -> Vec<u8> {
    tcp(i, 443, 2_000_000, &[], false)
}

/// A full-sized TLS application-data segment of flow `i` to port 443, at
/// `seq` (after its hello).
pub fn tcp_data(i: usize, seq: u32) -> Vec<u8> {
    let mut record = vec![0u8; 1400];
    record[..5].copy_from_slice(&[0x17, 0x03, 0x03, 0x05, 0x73]);
    tcp(i, 443, seq, &record, true)
}

/// A client's SYN: a new connection, whose start the TLS stage records.
pub fn tcp_syn(i: usize) -> Vec<u8> {
    let (src, sport) = client(i);
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src, SERVER, 64).tcp(sport, 443, 3_000_000, 64240).syn();
    let mut v = Vec::with_capacity(64);
    b.write(&mut v, &[]).expect("building a TCP SYN");
    v
}

/// A captured ClientHello record, with where its server_name extension is.
#[derive(Clone)]
pub struct HelloTemplate {
    pub record: Vec<u8>,
    pub client: &'static str,
}

/// Offsets in a hello record: of the extensions' total length, and of the
/// server_name extension's type.
fn layout(record: &[u8]) -> Option<(usize, usize)> {
    let mut p = 5 + 4 + 2 + 32;
    p += 1 + usize::from(*record.get(p)?);
    p += 2 + usize::from(u16::from_be_bytes([*record.get(p)?, *record.get(p + 1)?]));
    p += 1 + usize::from(*record.get(p)?);
    let ext_len_at = p;
    p += 2;
    while p + 4 <= record.len() {
        let (k, len) = (u16::from_be_bytes([record[p], record[p + 1]]), usize::from(u16::from_be_bytes([record[p + 2], record[p + 3]])));
        if k == 0 {
            return Some((ext_len_at, p));
        }
        p += 4 + len;
    }
    None
}

impl HelloTemplate {
    /// The hello with its server name replaced by `name` (every length
    /// field adjusted), and the offset of the server_name extension.
    pub fn with_name(&self, name: &str) -> (Vec<u8>, usize) {
        let r = &self.record;
        let (ext_len_at, sni) = layout(r).expect("templates have a server_name");
        let old_len = 4 + usize::from(u16::from_be_bytes([r[sni + 2], r[sni + 3]]));
        let n = name.len();
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&((5 + n) as u16).to_be_bytes());
        ext.extend_from_slice(&((3 + n) as u16).to_be_bytes());
        ext.push(0);
        ext.extend_from_slice(&(n as u16).to_be_bytes());
        ext.extend_from_slice(name.as_bytes());
        let mut out = r[..sni].to_vec();
        out.extend_from_slice(&ext);
        out.extend_from_slice(&r[sni + old_len..]);
        let delta = ext.len() as isize - old_len as isize;
        let fix16 = |v: &mut Vec<u8>, at: usize| {
            let x = (u16::from_be_bytes([v[at], v[at + 1]]) as isize + delta) as u16;
            v[at..at + 2].copy_from_slice(&x.to_be_bytes());
        };
        fix16(&mut out, 3);
        fix16(&mut out, ext_len_at);
        let hs = ((u32::from(out[6]) << 16 | u32::from(out[7]) << 8 | u32::from(out[8])) as isize + delta) as u32;
        out[6..9].copy_from_slice(&hs.to_be_bytes()[1..]);
        (out, sni)
    }
}

/// A one-segment hello (curl or OpenSSL, a few hundred bytes) and
/// Chromium's two-segment one (~1.8 KB with its ML-KEM key share), from the
/// real-client capture.
pub fn hello_templates() -> anyhow::Result<(HelloTemplate, HelloTemplate)> {
    // (client address, client port) -> (sequence number, payload)
    type Flows = std::collections::BTreeMap<(Vec<u8>, u16), Vec<(u32, Vec<u8>)>>;
    let mut flows = Flows::new();
    for frame in capture_frames() {
        let Ok(s) = SlicedPacket::from_ethernet(&frame) else { continue };
        let Some(TransportSlice::Tcp(t)) = s.transport else { continue };
        if t.payload().is_empty() || t.destination_port() != 443 {
            continue;
        }
        let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else { continue };
        flows.entry((ip.header().source().to_vec(), t.source_port())).or_default().push((t.sequence_number(), t.payload().to_vec()));
    }
    let (mut small, mut large) = (None, None);
    for segments in flows.values() {
        let isn = segments[0].0;
        let mut stream = Vec::new();
        for (seq, data) in segments {
            if seq.wrapping_sub(isn) as usize == stream.len() {
                stream.extend_from_slice(data);
            }
        }
        if stream.len() < 5 || stream[0] != 22 || stream[5] != 1 {
            continue;
        }
        let len = 5 + usize::from(u16::from_be_bytes([stream[3], stream[4]]));
        if stream.len() < len || layout(&stream[..len]).is_none() {
            continue;
        }
        stream.truncate(len);
        if len < 1200 && small.is_none() {
            small = Some(HelloTemplate { record: stream, client: "curl/OpenSSL/Python (one segment)" });
        } else if len > 1500 && large.is_none() {
            large = Some(HelloTemplate { record: stream, client: "Chromium (two segments)" });
        }
    }
    match (small, large) {
        (Some(s), Some(l)) => Ok((s, l)),
        _ => bail!("the capture has no one-segment and no two-segment ClientHello to IPv4 port 443"),
    }
}

/// One flow's segments for a hello to `name`: all in one segment, or cut
/// just before the server_name extension (the name in the second segment).
pub fn hello_segments(t: &HelloTemplate, name: &str, i: usize, split: bool) -> anyhow::Result<Vec<Vec<u8>>> {
    let (record, sni) = t.with_name(name);
    let seq0 = 1_000_000u32;
    if !split {
        return Ok(vec![tcp(i, 443, seq0, &record, true)]);
    }
    let cut = sni;
    if cut == 0 || cut >= record.len() {
        bail!("cannot split the hello before its server name");
    }
    Ok(vec![tcp(i, 443, seq0, &record[..cut], false), tcp(i, 443, seq0 + cut as u32, &record[cut..], true)])
}
