//! The server names of QUIC client flows, read from their Initials: each
//! datagram handed up by the kernel is opened (every coalesced Initial in
//! it), its CRYPTO frames go into the flow's stream, and the stream's new
//! contiguous bytes into the shared ClientHello parser (`filter_common::tls`,
//! the one the kernel runs on TCP, without the record layer).
//!
//! State is bounded: at most `capacity` flows (the least recently seen go
//! first), each forgotten `ttl` after its last Initial, each stream at most
//! `stream::MAX_STREAM` bytes.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use filter_common::{
    name::CanonBuf,
    tls::{FlowKey, Hello, Progress, feed},
};

use super::{
    initial::{Keys, Version, long_header, open},
    stream::{CryptoStream, FrameError},
};

/// Flows read at once by default.
pub const DEFAULT_CAPACITY: usize = 4096;
/// A flow whose hello is not read within this time after its last Initial
/// is forgotten.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// What a datagram told the reader about its flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The hello goes on in later Initials (or nothing new was read).
    Pending,
    /// The server name is complete (reported once per flow). `ended`: the
    /// rest of the hello was read too, and `ech` says whether it carries an
    /// encrypted_client_hello extension; if not, `Ended` follows.
    Name { canon: Canon, len: usize, ech: bool, ended: bool },
    /// The hello ended after a name reported earlier.
    Ended { ech: bool },
    /// The hello ended without a server name.
    NoName,
    /// The CRYPTO stream does not start with a ClientHello.
    NotHello,
    /// No Initial in the datagram opened with the flow's keys (junk on
    /// the same ports, a server's or a corrupted packet).
    Undecryptable,
    /// The stream broke the frame format or outgrew `MAX_STREAM`.
    GaveUp,
    /// The flow's hello was read already.
    Done,
}

/// A canonical name as the matcher takes it (compared and shown dotted).
#[derive(Clone)]
pub struct Canon(pub Box<CanonBuf>);

impl std::fmt::Debug for Canon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", filter_common::name::canon_to_dotted(&self.0))
    }
}

impl PartialEq for Canon {
    fn eq(&self, other: &Self) -> bool {
        self.0.bytes == other.0.bytes && self.0.starts == other.0.starts
    }
}

impl Eq for Canon {}

struct Flow {
    /// The keys of the flow's first DCID: a client's later Initials may
    /// carry the server's connection ID but keep these keys (RFC 9001 5.2).
    first: Option<(Version, Vec<u8>, Keys)>,
    stream: CryptoStream,
    hello: Box<Hello>,
    done: bool,
    seen: Instant,
}

pub struct Reader {
    flows: HashMap<FlowKey, Flow>,
    capacity: usize,
    ttl: Duration,
}

impl Default for Reader {
    fn default() -> Self {
        Reader::new(DEFAULT_CAPACITY, DEFAULT_TTL)
    }
}

impl Reader {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Reader { flows: HashMap::new(), capacity: capacity.max(1), ttl }
    }

    /// Flows being read.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Reads the UDP payload `datagram` of flow `key` (client to server).
    pub fn datagram(&mut self, key: FlowKey, datagram: &[u8], now: Instant) -> Event {
        if !self.flows.contains_key(&key) {
            self.make_room(now);
            let flow = Flow { first: None, stream: CryptoStream::default(), hello: Box::new(Hello::new_handshake()), done: false, seen: now };
            self.flows.insert(key, flow);
        }
        let flow = self.flows.get_mut(&key).expect("inserted above");
        flow.seen = now;
        if flow.done {
            return Event::Done;
        }
        let event = read(flow, datagram);
        if !matches!(event, Event::Pending | Event::Undecryptable) && !matches!(event, Event::Name { ended: false, .. }) {
            flow.done = true;
        }
        // A flow none of whose datagrams opened is forgotten at once: junk
        // does not hold a slot.
        if event == Event::Undecryptable && flow.first.is_none() {
            self.flows.remove(&key);
        }
        event
    }

    /// Drops expired flows, then the least recently seen if still full.
    fn make_room(&mut self, now: Instant) {
        if self.flows.len() < self.capacity {
            return;
        }
        let ttl = self.ttl;
        self.flows.retain(|_, f| now.duration_since(f.seen) < ttl);
        while self.flows.len() >= self.capacity {
            let oldest = self.flows.iter().min_by_key(|(_, f)| f.seen).map(|(k, _)| *k).expect("a full table is not empty");
            self.flows.remove(&oldest);
        }
    }
}

/// Opens every Initial of the datagram into the flow's stream, then feeds
/// the parser.
fn read(flow: &mut Flow, datagram: &[u8]) -> Event {
    let mut d = datagram.to_vec();
    let mut off = 0;
    let mut opened = false;
    while off < d.len() {
        let Ok(h) = long_header(&d, off) else { break };
        let next = h.end;
        if h.initial {
            let dcid = d[h.dcid.0..h.dcid.1].to_vec();
            // This packet's DCID first (a first Initial, or one after a
            // Retry), then the flow's first one.
            let mut payload = None;
            let own = Keys::client(h.version, &dcid);
            let mut scratch = d.clone();
            match open(&mut scratch, off, &h, &own) {
                Ok((_, range)) => {
                    payload = Some(scratch[range.0..range.1].to_vec());
                    let retry = flow.first.as_ref().is_some_and(|(v, first, _)| *v != h.version || *first != dcid);
                    if flow.first.is_none() || retry {
                        if retry {
                            // A new DCID that opens with its own keys: the
                            // client restarted (after a Retry or a Version
                            // Negotiation) and sends its hello again.
                            flow.stream = CryptoStream::default();
                            *flow.hello = Hello::new_handshake();
                        }
                        flow.first = Some((h.version, dcid, own));
                    }
                }
                Err(_) => {
                    if let Some((v, _, keys)) = &flow.first
                        && *v == h.version
                        && let Ok((_, range)) = open(&mut d, off, &h, keys)
                    {
                        payload = Some(d[range.0..range.1].to_vec());
                    }
                }
            }
            if let Some(p) = payload {
                opened = true;
                match flow.stream.take_frames(&p) {
                    Ok(()) => {}
                    Err(FrameError::Malformed | FrameError::TooLong) => return Event::GaveUp,
                }
            }
        }
        off = next;
    }
    if !opened {
        return Event::Undecryptable;
    }
    parse(flow)
}

/// Feeds the stream's new contiguous bytes to the parser.
fn parse(flow: &mut Flow) -> Event {
    let data = flow.stream.contiguous();
    let hello = &mut flow.hello;
    let mut event = Event::Pending;
    // Each call takes a bounded number of steps; a hello of `MAX_STREAM`
    // bytes takes far fewer calls than this.
    for _ in 0..100_000 {
        let at = hello.next_seq as usize;
        if at >= data.len() {
            break;
        }
        match feed(hello, data, at, data.len()) {
            Progress::StepsExhausted | Progress::NeedMore => {}
            Progress::Name(len) => {
                let mut canon = Box::<CanonBuf>::default();
                hello.copy_name(&mut canon);
                event = Event::Name { canon: Canon(canon), len, ech: hello.has_ech(), ended: hello.ended() };
                if hello.ended() {
                    return event;
                }
            }
            Progress::End => {
                return match event {
                    Event::Name { canon, len, .. } => Event::Name { canon, len, ech: hello.has_ech(), ended: true },
                    _ => Event::Ended { ech: hello.has_ech() },
                };
            }
            Progress::NoName => return Event::NoName,
            Progress::NotHello => return Event::NotHello,
        }
    }
    event
}
