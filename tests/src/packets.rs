//! Packet fixtures: DNS queries built with hickory-proto, wrapped in
//! Ethernet (with optional 802.1Q/802.1ad tags), IPv4 (with options) or IPv6
//! (with extension headers), and UDP or TCP.

use etherparse::{IpNumber, Ipv4Header, Ipv6Header, TcpHeader, UdpHeader};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query},
    rr::{Name, RecordType},
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

    /// The whole Ethernet frame carrying `payload`. For TCP/53 the payload
    /// is the DNS message and the 2-byte length prefix is added here.
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
                let mut h = TcpHeader::new(self.src_port, self.dst_port, 1000, 64240);
                h.psh = true;
                h.ack = true;
                h.acknowledgment_number = 1;
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
            h.set_options(&self.ipv4_options).unwrap();
            if let Some((offset, more)) = self.fragment {
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
