//! Packet fixtures: DNS queries built with hickory-proto, wrapped in
//! Ethernet (with optional 802.1Q/802.1ad tags), IPv4 (with options) or IPv6
//! (with extension headers), and UDP or TCP.

use etherparse::{IpNumber, Ipv4Header, Ipv6Header, TcpHeader, UdpHeader};
use filter_common::{counters::Proto, packet::Af};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query},
    rr::{
        Name, RecordType,
        rdata::opt::{EdnsCode, EdnsOption},
    },
};

pub const CLIENT4: [u8; 4] = [198, 18, 0, 1];
pub const SERVER4: [u8; 4] = [198, 18, 0, 2];
pub const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// How to wrap a payload.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Outer tag first; ethertypes 0x88a8 (outer of two) and 0x8100.
    pub vlans: Vec<u16>,
    pub ipv6: bool,
    pub transport: Transport,
    pub src_port: u16,
    pub dst_port: u16,
    /// IPv4 options (a multiple of 4 bytes).
    pub ipv4_options: Vec<u8>,
    /// IPv6 extension headers as (type, body); bodies are padded to size.
    pub ipv6_ext: Vec<(u8, Vec<u8>)>,
    /// IPv4 fragment offset in 8-byte units, and more-fragments.
    pub fragment: Option<(u16, bool)>,
    /// TCP sequence and acknowledgment numbers.
    pub seq: u32,
    pub ack: u32,
    /// A client's SYN (no ACK) instead of a data segment.
    pub syn: bool,
    /// A data segment without the ACK flag (a "fooled" fake).
    pub no_ack: bool,
    /// URG set, with this urgent pointer.
    pub urgent: Option<u16>,
    /// Raw TCP options (padded to a multiple of 4 with EOL).
    pub tcp_options: Vec<u8>,
}

impl Default for Frame {
    fn default() -> Self {
        Frame {
            vlans: Vec::new(),
            ipv6: false,
            transport: Transport::Udp,
            src_port: 40000,
            dst_port: 53,
            ipv4_options: Vec::new(),
            ipv6_ext: Vec::new(),
            fragment: None,
            seq: 1000,
            ack: 1,
            syn: false,
            no_ack: false,
            urgent: None,
            tcp_options: Vec::new(),
        }
    }
}

impl Frame {
    pub fn udp() -> Self {
        Frame::default()
    }
    pub fn tcp() -> Self {
        Frame { transport: Transport::Tcp, ..Frame::default() }
    }
    pub fn v6(mut self) -> Self {
        self.ipv6 = true;
        self
    }
    pub fn vlans(mut self, tags: &[u16]) -> Self {
        self.vlans = tags.to_vec();
        self
    }
    pub fn ports(mut self, src: u16, dst: u16) -> Self {
        (self.src_port, self.dst_port) = (src, dst);
        self
    }
    pub fn ipv4_options(mut self, options: &[u8]) -> Self {
        self.ipv4_options = options.to_vec();
        self
    }
    /// Appends one IPv6 extension header (see `ipv6_ext`).
    pub fn ipv6_ext(mut self, kind: u8, body: &[u8]) -> Self {
        self.ipv6_ext.push((kind, body.to_vec()));
        self
    }
    /// An IPv4 fragment: offset in 8-byte units, and more-fragments.
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        self.fragment = Some((offset, more));
        self
    }
    /// TCP sequence and acknowledgment numbers.
    /// A client's SYN with initial sequence number `isn`.
    pub fn syn(mut self, isn: u32) -> Self {
        (self.syn, self.seq) = (true, isn);
        self
    }
    /// A data segment without ACK.
    pub fn no_ack(mut self) -> Self {
        self.no_ack = true;
        self
    }
    /// URG set, with urgent pointer `ptr`.
    pub fn urgent(mut self, ptr: u16) -> Self {
        self.urgent = Some(ptr);
        self
    }
    /// Raw TCP options.
    pub fn tcp_options(mut self, options: &[u8]) -> Self {
        self.tcp_options = options.to_vec();
        self
    }
    pub fn seq_ack(mut self, seq: u32, ack: u32) -> Self {
        (self.seq, self.ack) = (seq, ack);
        self
    }
    /// The address family and transport, as the counters name them.
    pub fn proto_af(&self) -> (Proto, Af) {
        let proto = match self.transport {
            Transport::Udp => Proto::DnsUdp,
            Transport::Tcp => Proto::DnsTcp,
        };
        (proto, if self.ipv6 { Af::V6 } else { Af::V4 })
    }

    /// The client port of a TCP segment: a query to 53 from the default
    /// port is its own connection, as `dig +tcp` opens one per query (the
    /// DNS-over-TCP stage reads a connection's queries as one stream, and
    /// a second query at the same sequence number would be a
    /// retransmission). Tests that follow one connection set its ports.
    fn tcp_src_port(&self, payload: &[u8]) -> u16 {
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        if self.src_port != Frame::default().src_port || self.dst_port != 53 || payload.is_empty() {
            return self.src_port;
        }
        20000 + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 20000
    }

    /// The whole Ethernet frame carrying `payload` as is (`dns` and
    /// `tcp_prefixed` add the TCP/53 length prefix).
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut l4 = Vec::new();
        let proto = match self.transport {
            Transport::Udp => {
                UdpHeader { source_port: self.src_port, destination_port: self.dst_port, length: (8 + payload.len()) as u16, checksum: 0 }
                    .write(&mut l4)
                    .unwrap();
                l4.extend_from_slice(payload);
                IpNumber::UDP
            }
            Transport::Tcp => {
                let mut h = TcpHeader::new(self.tcp_src_port(payload), self.dst_port, self.seq, 64240);
                if self.syn {
                    h.syn = true;
                } else {
                    h.psh = true;
                    h.ack = !self.no_ack;
                    h.acknowledgment_number = if self.no_ack { 0 } else { self.ack };
                }
                if let Some(ptr) = self.urgent {
                    (h.urg, h.urgent_pointer) = (true, ptr);
                }
                if !self.tcp_options.is_empty() {
                    let mut o = self.tcp_options.clone();
                    o.resize(o.len().div_ceil(4) * 4, 0);
                    h.set_options_raw(&o).unwrap();
                }
                h.write(&mut l4).unwrap();
                l4.extend_from_slice(payload);
                IpNumber::TCP
            }
        };
        let mut ip = Vec::new();
        if self.ipv6 {
            let mut ext = Vec::new();
            for (i, (kind, body)) in self.ipv6_ext.iter().enumerate() {
                let next = self.ipv6_ext.get(i + 1).map(|e| e.0).unwrap_or(proto.0);
                let mut h = vec![next, 0];
                h.extend_from_slice(body);
                match *kind {
                    44 => h.resize(8, 0),
                    51 => {
                        let len = (h.len().max(12).div_ceil(4)) * 4;
                        h.resize(len, 0);
                        h[1] = (len / 4 - 2) as u8;
                    }
                    _ => {
                        let len = h.len().max(8).div_ceil(8) * 8;
                        h.resize(len, 0);
                        h[1] = (len / 8 - 1) as u8;
                    }
                }
                ext.extend_from_slice(&h);
            }
            let next_header = self.ipv6_ext.first().map(|e| IpNumber(e.0)).unwrap_or(proto);
            Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: (ext.len() + l4.len()) as u16,
                next_header,
                hop_limit: 64,
                source: CLIENT6,
                destination: SERVER6,
            }
            .write(&mut ip)
            .unwrap();
            ip.extend_from_slice(&ext);
        } else {
            let mut h = Ipv4Header::new(l4.len() as u16, 64, proto, CLIENT4, SERVER4).unwrap();
            h.options = self.ipv4_options.as_slice().try_into().unwrap();
            // The total length counts the options too.
            h.set_payload_len(l4.len()).unwrap();
            if let Some((offset, more)) = self.fragment {
                h.dont_fragment = false;
                h.fragment_offset = offset.try_into().unwrap();
                h.more_fragments = more;
            }
            h.header_checksum = h.calc_header_checksum();
            h.write(&mut ip).unwrap();
        }
        ip.extend_from_slice(&l4);
        let mut eth = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        for (i, tag) in self.vlans.iter().enumerate() {
            let tpid: u16 = if i == 0 && self.vlans.len() > 1 { 0x88a8 } else { 0x8100 };
            eth.extend_from_slice(&tpid.to_be_bytes());
            eth.extend_from_slice(&tag.to_be_bytes());
        }
        eth.extend_from_slice(&(if self.ipv6 { 0x86ddu16 } else { 0x0800 }).to_be_bytes());
        eth.extend_from_slice(&ip);
        eth
    }
}

/// A standard recursive query for `name` (case kept as given).
pub fn query(name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(0x1234).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// A query frame over `frame`'s transport (TCP gets its length prefix).
pub fn dns(frame: &Frame, name: &str) -> Vec<u8> {
    let msg = query(name, RecordType::A, true);
    frame.build(&tcp_prefixed(frame, &msg))
}

pub fn tcp_prefixed(frame: &Frame, msg: &[u8]) -> Vec<u8> {
    match frame.transport {
        Transport::Udp => msg.to_vec(),
        Transport::Tcp => {
            let mut v = (msg.len() as u16).to_be_bytes().to_vec();
            v.extend_from_slice(msg);
            v
        }
    }
}

/// A query for `name` with EDNS carrying a client cookie (RFC 7873) and the
/// DO bit, as `dig +cookie +dnssec` sends.
pub fn query_with_cookie(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(0x4321).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    let mut e = Edns::new();
    e.set_max_payload(1232).set_dnssec_ok(true);
    e.options_mut().insert(EdnsOption::Unknown(EdnsCode::Cookie.into(), vec![0x5e, 0xc0, 0x0c, 0x1e, 0x11, 0x22, 0x33, 0x44]));
    m.set_edns(e);
    m.to_vec().unwrap()
}

/// The wire form of a dotted name: each label as given (no checks, so
/// over-long labels and names can be built), then the root byte.
pub fn wire_name(name: &str) -> Vec<u8> {
    let mut v = Vec::new();
    for label in name.split('.').filter(|l| !l.is_empty()) {
        v.push(label.len() as u8);
        v.extend_from_slice(label.as_bytes());
    }
    v.push(0);
    v
}

/// One question: the name bytes exactly as given, then QTYPE and QCLASS IN.
pub fn question(name_bytes: &[u8], qtype: u16) -> Vec<u8> {
    let mut v = name_bytes.to_vec();
    v.extend_from_slice(&qtype.to_be_bytes());
    v.extend_from_slice(&1u16.to_be_bytes());
    v
}

/// A DNS message from raw parts: the 12-byte header (id 0x1234, `flags`,
/// `qdcount`, other counts 0), then `body` as is.
pub fn raw_message(flags: u16, qdcount: u16, body: &[u8]) -> Vec<u8> {
    let mut v = vec![0x12, 0x34];
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&qdcount.to_be_bytes());
    v.extend_from_slice(&[0; 6]);
    v.extend_from_slice(body);
    v
}

/// Flags of a standard recursive query (QR=0, OPCODE=QUERY, RD=1).
pub const QUERY_FLAGS: u16 = 0x0100;

/// A minimal TLS ClientHello for `sni`: one cipher suite, one extension
/// (server_name), in one record.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let name = sni.as_bytes();
    let mut ext = Vec::new();
    ext.extend_from_slice(&[0, 0]);
    ext.extend_from_slice(&((name.len() + 5) as u16).to_be_bytes());
    ext.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(name);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// The IP datagram in the Ethernet frame `whole` cut into two fragments,
/// each a whole frame: the first carries the first `cut` bytes (a multiple
/// of 8) of what follows the IPv4 header (the IPv6 fixed header: later
/// extension headers are fragmentable, as a Destination Options header
/// after the Fragment header is), more to come; the second the rest. IPv6
/// gets a Fragment header. Checksums are left as they were.
pub fn fragments(whole: &[u8], cut: usize) -> [Vec<u8>; 2] {
    let l3 = filter_common::packet::parse_l3(whole).expect("an IP frame");
    let v6 = l3.af == Af::V6;
    let split = if v6 { l3.l3_off + 40 } else { l3.l4_off };
    let (head, rest) = (&whole[..split], &whole[split..l3.end]);
    assert!(cut.is_multiple_of(8) && cut > 0 && cut < rest.len(), "cut {cut} of {}", rest.len());
    let piece = |offset: usize, bytes: &[u8], more: bool| {
        let mut f = head.to_vec();
        let ip = l3.l3_off;
        if v6 {
            let next = f[ip + 6];
            f[ip + 6] = 44;
            f[ip + 4..ip + 6].copy_from_slice(&((8 + bytes.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&((offset as u16) | u16::from(more)).to_be_bytes());
            f.extend_from_slice(&0x0b10_c1d0u32.to_be_bytes());
        } else {
            let ihl = split - ip;
            f[ip + 2..ip + 4].copy_from_slice(&((ihl + bytes.len()) as u16).to_be_bytes());
            f[ip + 6..ip + 8].copy_from_slice(&((offset as u16 / 8) | if more { 0x2000 } else { 0 }).to_be_bytes());
            f[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
            let sum = ipv4_checksum(&f[ip..split]);
            f[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
        }
        f.extend_from_slice(bytes);
        f
    };
    [piece(0, &rest[..cut], true), piece(cut, &rest[cut..], false)]
}

/// The IPv4 header checksum of `header` (its checksum field zero).
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A plain HTTP/1.1 GET for `/` with these Host headers, in order.
pub fn http_get(hosts: &[&str]) -> Vec<u8> {
    let mut r = b"GET / HTTP/1.1\r\n".to_vec();
    for h in hosts {
        r.extend_from_slice(format!("Host: {h}\r\n").as_bytes());
    }
    r.extend_from_slice(b"User-Agent: blokir-tests\r\nAccept: */*\r\n\r\n");
    r
}
