//! Pieces shared by the fuzz targets and the seed generator: the rule set the
//! `inspect` target runs with, a reference matcher over label lists, an
//! independent slice-based frame walker, a reference DNS question reader
//! built on hickory-proto, and a scratch-buffer filler that leaves stale
//! garbage behind (the kernel's scratch buffer is a per-CPU map value that
//! keeps whatever the previous packet wrote).
//!
//! `quic` is the daemon's QUIC Initial reader itself, compiled from
//! filter-user's sources: filter-user cannot be a dependency here (its build
//! script builds the XDP object with another toolchain), and these modules
//! need only filter-common and `ring`.
//!
//! Nothing else here calls filter-common's parsers: the walker and the reference
//! matcher are written from the protocol specifications and the documented
//! rule semantics, so that a fuzz target comparing the two is a real check.

use std::{collections::HashMap, sync::LazyLock};

use filter_common::{
    hash::lane_multiplier,
    name::{CanonBuf, Decision, dotted_to_canon, full_name_key},
    rules::{Config, NameKey, NodeRules, RuleRef},
};
use hickory_proto::{
    op::Query,
    rr::Name,
    serialize::binary::{BinDecodable, BinDecoder},
};

/// Whether a rule applies to the node's own name or to every name strictly
/// below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Exact,
    Below,
}

/// One rule: the node's dotted name (any case), its scope and the reference
/// reported when it decides.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub name: &'static str,
    pub scope: Scope,
    pub rule: RuleRef,
}

const fn rule(name: &'static str, scope: Scope, id: u32, list: u32, allow: bool) -> Rule {
    Rule { name, scope, rule: RuleRef::new(id, list, allow) }
}

/// The longest dotted name (253 bytes, four labels): an exact block rule on
/// it exercises the length limits end to end.
pub const LONGEST: &str = concat!(
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.",
    "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.",
    "ccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc.",
    "ddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd",
);

/// The rule set of the `inspect` target. Several rules may share a node (the
/// map then holds their `exact` and `below` side by side).
pub const RULES: &[Rule] = &[
    // Exact block; names below it are not blocked.
    rule("blocked.example", Scope::Exact, 1, 0, false),
    // Subtree block; the node itself is not blocked.
    rule("bad.test", Scope::Below, 2, 1, false),
    // Allow rules inside the blocked subtree: allow wins.
    rule("ok.bad.test", Scope::Exact, 3, 2, true),
    rule("fine.bad.test", Scope::Below, 4, 2, true),
    // A block below an allowed subtree: the allow above still wins.
    rule("deep.fine.bad.test", Scope::Below, 5, 1, false),
    // A more specific block inside a blocked subtree: reported instead.
    rule("worse.bad.test", Scope::Below, 6, 3, false),
    rule("worse.bad.test", Scope::Exact, 7, 3, false),
    // A one-label subtree, so that mutated names hit rules often.
    rule("x", Scope::Below, 8, 4, false),
    rule("allow.x", Scope::Exact, 9, 5, true),
    // Rule names are canonicalized: case folds, non-ASCII bytes are kept.
    rule("Mixed.CASE.Example", Scope::Exact, 10, 6, false),
    rule("caf\u{e9}.x", Scope::Exact, 11, 5, true),
    rule(LONGEST, Scope::Exact, 12, 7, false),
];

/// Lane multipliers of the `inspect` target's hash.
pub const HASH_R: [u64; 2] = [lane_multiplier(0x9e37_79b9_7f4a_7c15), lane_multiplier(0xc2b2_ae3d_27d4_eb4f)];

/// The rule set as the program sees it: settings and the node map.
pub struct RuleSet {
    pub cfg: Config,
    pub map: HashMap<NameKey, NodeRules>,
}

/// `RULES`, keyed as the daemon would key them.
pub static RULE_SET: LazyLock<RuleSet> = LazyLock::new(|| {
    let mut cfg = Config { hash_r: HASH_R, ..Config::default() };
    let mut map: HashMap<NameKey, NodeRules> = HashMap::new();
    let mut buf = Box::<CanonBuf>::default();
    for r in RULES {
        let n = dotted_to_canon(r.name.as_bytes(), 0, r.name.len(), &mut buf).expect("rule name");
        let key = full_name_key(&mut buf, n, &HASH_R).expect("rule key");
        let node = map.entry(key).or_default();
        match r.scope {
            Scope::Exact => node.exact = r.rule,
            Scope::Below => node.below = r.rule,
        }
        cfg.add_depth(r.name.split('.').count() as u32);
    }
    RuleSet { cfg, map }
});

/// Labels of a rule name, lowercased (ASCII only), leftmost first.
fn rule_labels(name: &str) -> Vec<Vec<u8>> {
    name.split('.').map(|l| l.as_bytes().to_ascii_lowercase()).collect()
}

/// The documented semantics, over lowercased labels (leftmost first): exact
/// rules apply to the name itself, subtree rules to names strictly below
/// their node; any applicable allow rule wins (the one nearest the root is
/// reported); otherwise the most specific (deepest) applicable block rule.
pub fn reference_decision(labels: &[Vec<u8>]) -> Decision {
    let mut allow: Option<(usize, RuleRef)> = None;
    let mut block: Option<(usize, RuleRef)> = None;
    for r in RULES {
        let node = rule_labels(r.name);
        let applies = match r.scope {
            Scope::Exact => labels == node.as_slice(),
            Scope::Below => labels.len() > node.len() && labels.ends_with(&node),
        };
        if !applies {
            continue;
        }
        let depth = node.len();
        if r.rule.is_allow() {
            if allow.is_none_or(|(d, _)| depth < d) {
                allow = Some((depth, r.rule));
            }
        } else if block.is_none_or(|(d, _)| depth > d) {
            block = Some((depth, r.rule));
        }
    }
    match (allow, block) {
        (Some((_, a)), _) => Decision::Allow(a),
        (None, Some((_, b))) => Decision::Block(b),
        (None, None) => Decision::NoMatch,
    }
}

/// Whether some block rule covers the name (exact on it, or a subtree rule on
/// a proper ancestor), and whether some allow rule does.
pub fn covered(labels: &[Vec<u8>]) -> (bool, bool) {
    let (mut block, mut allow) = (false, false);
    for r in RULES {
        let node = rule_labels(r.name);
        let applies = match r.scope {
            Scope::Exact => labels == node.as_slice(),
            Scope::Below => labels.len() > node.len() && labels.ends_with(&node),
        };
        if applies {
            if r.rule.is_allow() {
                allow = true;
            } else {
                block = true;
            }
        }
    }
    (block, allow)
}

/// Fills every field of the scratch buffer with bytes derived from `seed`:
/// the parsers must not depend on what the previous packet left there.
pub fn dirty(buf: &mut CanonBuf, seed: &[u8]) {
    // FNV-1a over the input, then xorshift.
    let mut x = seed.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..buf.bytes.len() {
        let v = next();
        buf.bytes[i] = v as u8;
        // Mostly non-zero: stale "label starts" everywhere.
        buf.starts[i] = (v >> 8) as u8 | ((v >> 16) as u8 & 1);
        buf.slack[i] = (v >> 24) as u8;
    }
    buf.next = next();
    buf.depth = next();
    buf.key = NameKey { h: [next(), next()] };
    buf.found = next();
}

/// IPv6 extension headers the filter follows to reach the transport header.
pub const IPV6_EXT_FOLLOWED: usize = filter_common::packet::MAX_IPV6_EXT_HEADERS;

/// Where an independent reading of a frame finds a DNS message sent to port
/// 53.
#[derive(Clone, Copy, Debug)]
pub struct Located<'a> {
    pub tcp: bool,
    pub v6: bool,
    /// The DNS message: for UDP the datagram payload; for TCP the bytes after
    /// the 2-byte length prefix, up to the length it announces or the end of
    /// the segment, whichever comes first.
    pub msg: &'a [u8],
}

fn be16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

/// Reads an Ethernet frame down to a DNS message to port 53 over UDP or TCP.
/// Returns `None` for anything else, for later fragments (no transport
/// header) and for headers that are cut short or inconsistent.
///
/// Two limits follow the filter's design rather than the protocols (which
/// have none): at most `MAX_VLAN_DEPTH` VLAN tags and at most
/// `IPV6_EXT_FOLLOWED` IPv6 extension headers; frames beyond them are
/// counted as malformed by the filter and passed.
pub fn locate(frame: &[u8]) -> Option<Located<'_>> {
    use filter_common::packet::MAX_VLAN_DEPTH;
    let mut ethertype = be16(frame, 12)?;
    let mut off = 14;
    let mut tags = 0;
    while ethertype == 0x8100 || ethertype == 0x88a8 {
        if tags == MAX_VLAN_DEPTH {
            return None;
        }
        ethertype = be16(frame, off + 2)?;
        off += 4;
        tags += 1;
    }
    let (v6, proto, l4, ip_end) = match ethertype {
        0x0800 => {
            let ip = frame.get(off..)?;
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl {
                return None;
            }
            let total = usize::from(be16(ip, 2)?);
            if total < ihl {
                return None;
            }
            // Fragment offset (13 bits) non-zero: no transport header here.
            if be16(ip, 6)? & 0x1fff != 0 {
                return None;
            }
            (false, ip[9], off + ihl, frame.len().min(off + total))
        }
        0x86dd => {
            let ip = frame.get(off..)?;
            if ip.len() < 40 || ip[0] >> 4 != 6 {
                return None;
            }
            let end = frame.len().min(off + 40 + usize::from(be16(ip, 4)?));
            let mut next = ip[6];
            let mut hdr = off + 40;
            let mut n = 0;
            loop {
                let len = match next {
                    0 | 43 | 60 => (usize::from(*frame.get(hdr + 1)?) + 1) * 8,
                    44 => {
                        // Fragment offset non-zero: a later fragment.
                        if be16(frame, hdr + 2)? & 0xfff8 != 0 {
                            return None;
                        }
                        8
                    }
                    51 => (usize::from(*frame.get(hdr + 1)?) + 2) * 4,
                    _ => break,
                };
                if n == IPV6_EXT_FOLLOWED {
                    return None;
                }
                next = *frame.get(hdr)?;
                hdr += len;
                n += 1;
                if hdr > end {
                    return None;
                }
            }
            (true, next, hdr, end)
        }
        _ => return None,
    };
    let seg = frame.get(l4..ip_end)?;
    match proto {
        17 => {
            if seg.len() < 8 || be16(seg, 2)? != 53 {
                return None;
            }
            let ulen = usize::from(be16(seg, 4)?);
            if ulen < 8 {
                return None;
            }
            Some(Located { tcp: false, v6, msg: &seg[8..seg.len().min(ulen)] })
        }
        6 => {
            if seg.len() < 20 || be16(seg, 2)? != 53 {
                return None;
            }
            let doff = usize::from(seg[12] >> 4) * 4;
            if doff < 20 || seg.len() < doff {
                return None;
            }
            let payload = &seg[doff..];
            let announced = usize::from(be16(payload, 0)?);
            let body = &payload[2..];
            Some(Located { tcp: true, v6, msg: &body[..body.len().min(announced)] })
        }
        _ => None,
    }
}

/// A DNS question as hickory-proto reads it.
#[derive(Clone, Debug)]
pub struct RefQuestion {
    pub query: Query,
    /// The name's labels, ASCII-lowercased, leftmost first.
    pub labels: Vec<Vec<u8>>,
    /// The name uses a compression pointer.
    pub compressed: bool,
}

/// The message's header says: a standard query (QR = 0, OPCODE = QUERY) with
/// exactly one question.
pub fn is_single_question_query(msg: &[u8]) -> bool {
    msg.len() >= 12 && msg[2] & 0xf8 == 0 && be16(msg, 4) == Some(1)
}

/// The first question of a DNS message, read by hickory-proto alone (header
/// skipped, nothing after QTYPE/QCLASS looked at).
pub fn reference_question(msg: &[u8]) -> Option<RefQuestion> {
    let mut d = BinDecoder::new(msg);
    d.read_slice(12).ok()?;
    let query = Query::read(&mut d).ok()?;
    Some(RefQuestion { labels: lower_labels(query.name()), compressed: uses_pointer(msg, 12), query })
}

/// A name's labels as raw bytes (no presentation escaping), ASCII-lowercased.
pub fn lower_labels(name: &Name) -> Vec<Vec<u8>> {
    name.to_lowercase().iter().map(<[u8]>::to_vec).collect()
}

/// Whether the wire name at `off` (already known to be well formed) reaches
/// a compression pointer before its root label.
pub fn uses_pointer(msg: &[u8], mut off: usize) -> bool {
    while let Some(&b) = msg.get(off) {
        match b {
            0 => return false,
            b if b & 0xc0 != 0 => return true,
            b => off += usize::from(b) + 1,
        }
    }
    false
}

/// The canonical form of a label list, built from its definition: labels from
/// the last to the first, each as its length byte and then its bytes
/// reversed. Also returns where labels start.
pub fn reference_canon(labels: &[Vec<u8>]) -> (Vec<u8>, Vec<bool>) {
    let mut bytes = Vec::new();
    let mut starts = Vec::new();
    for l in labels.iter().rev() {
        bytes.push(l.len() as u8);
        starts.push(true);
        bytes.extend(l.iter().rev().map(u8::to_ascii_lowercase));
        starts.extend(std::iter::repeat_n(false, l.len()));
    }
    (bytes, starts)
}

/// Seed-building helpers (used by `examples/make_seeds.rs`).
/// The daemon's QUIC reader (`filter-user/src/quic/`): Initial headers and
/// decryption, the CRYPTO stream, the per-flow reader, and the encryptor the
/// tests build flows with.
#[path = "../../filter-user/src/quic"]
pub mod quic {
    pub mod initial;
    pub mod reader;
    pub mod seal;
    pub mod stream;
}

pub mod seed {
    /// A wire name from a dotted one (labels as given, no escaping).
    pub fn wire_name(dotted: &str) -> Vec<u8> {
        let mut v = Vec::new();
        for l in dotted.split('.').filter(|l| !l.is_empty()) {
            v.push(l.len() as u8);
            v.extend_from_slice(l.as_bytes());
        }
        v.push(0);
        v
    }

    /// A one-question standard query, optionally with an EDNS OPT record.
    pub fn query(name: &[u8], qtype: u16, edns: bool) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, edns as u8];
        m.extend_from_slice(name);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        if edns {
            m.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        }
        m
    }

    /// How to wrap a DNS message in a frame.
    #[derive(Clone, Debug, Default)]
    pub struct Wrap {
        pub vlans: Vec<u16>,
        pub v6: bool,
        pub tcp: bool,
        pub ipv4_options: usize,
        /// IPv6 extension headers (types 0, 43, 44, 60).
        pub ipv6_ext: Vec<u8>,
    }

    pub fn frame(msg: &[u8], w: &Wrap) -> Vec<u8> {
        let mut l4 = Vec::new();
        if w.tcp {
            l4.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
            l4.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        } else {
            l4.extend_from_slice(&[0x9c, 0x40, 0, 53]);
            l4.extend_from_slice(&((msg.len() + 8) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(msg);
        let proto = if w.tcp { 6 } else { 17 };
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        for &t in &w.vlans {
            f.extend_from_slice(&t.to_be_bytes());
            f.extend_from_slice(&[0, 7]);
        }
        if w.v6 {
            let mut ext = Vec::new();
            let mut next = proto;
            for &t in w.ipv6_ext.iter().rev() {
                let mut h = vec![next, 0, 0, 0, 0, 0, 0, 0];
                if t == 44 {
                    h[3] = 1; // more fragments, offset 0
                }
                h.extend_from_slice(&ext);
                ext = h;
                next = t;
            }
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[next, 64]);
            f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            f.extend_from_slice(&ext);
        } else {
            let ihl = 20 + w.ipv4_options;
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            f.push(0x40 | (ihl / 4) as u8);
            f.push(0);
            f.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2]);
            f.extend(std::iter::repeat_n(1u8, w.ipv4_options)); // NOPs
        }
        f.extend_from_slice(&l4);
        f
    }
}
