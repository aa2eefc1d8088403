//! Layouts of the BPF maps that hold the rules and the program's settings.
//!
//! Rules live in one hash map keyed by the keyed hash of a domain node
//! (`NameKey`); the value says what applies to the node itself (`exact`) and
//! what applies to every name strictly below it (`below`). A query walks its
//! name from the top-level label down, so the lookup cost is one hash-map probe
//! per label, whatever the number of rules.

/// A `LIST_ACTIONS` entry: the list's `DnsAction` in the low byte, and
/// `LIST_ECH_OUTER` if the list names ECH outer names (`blokir run
/// --ech-outer-list`): its rules block only ClientHellos that carry the
/// encrypted_client_hello extension, and no DNS query or HTTP request.
pub const LIST_ACTION_MASK: u32 = 0xff;
pub const LIST_ECH_OUTER: u32 = 1 << 8;

/// Map names, shared by the object and the loader.
pub const MAP_RULES: &str = "RULES";
/// The first look before `RULES` (see `first_look_slot`).
pub const MAP_FIRST_LOOK: &str = "FIRST_LOOK";
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_RULE_HITS: &str = "RULE_HITS";
pub const MAP_LIST_HITS: &str = "LIST_HITS";
pub const MAP_SCRATCH: &str = "SCRATCH";
pub const MAP_LIST_ACTIONS: &str = "LIST_ACTIONS";
/// The XDP programs' names in the object: the entry program, and the stages
/// reached by tail call through `STAGES`.
pub const PROGRAM_NAME: &str = "blokir";
pub const TLS_PROGRAM_NAME: &str = "blokir_tls";
pub const MATCH_PROGRAM_NAME: &str = "blokir_match";
pub const REPLY_PROGRAM_NAME: &str = "blokir_reply";
pub const DNS_PROGRAM_NAME: &str = "blokir_dns";
pub const HTTP_PROGRAM_NAME: &str = "blokir_http";
pub const DNS_TCP_PROGRAM_NAME: &str = "blokir_dns_tcp";
pub const DNS_TCP_READ_PROGRAM_NAME: &str = "blokir_dns_tcp_read";
pub const DNS_TCP_QUESTION_PROGRAM_NAME: &str = "blokir_dns_tcp_question";
pub const REWRITE_PROGRAM_NAME: &str = "blokir_rewrite";
/// Slots of the `STAGES` program array.
pub const STAGE_TLS: u32 = 0;
pub const STAGE_MATCH: u32 = 1;
pub const STAGE_REPLY: u32 = 2;
pub const STAGE_DNS: u32 = 3;
pub const STAGE_HTTP: u32 = 4;
/// The QUIC stage (`quic::QUIC_PROGRAM_NAME`).
pub const STAGE_QUIC: u32 = 5;
pub const STAGE_DNS_TCP: u32 = 6;
pub const STAGE_DNS_TCP_READ: u32 = 7;
pub const STAGE_DNS_TCP_QUESTION: u32 = 8;
/// The compare of name bytes read with a later copy (`flow::rewritten`).
pub const STAGE_REWRITE: u32 = 9;
pub const STAGE_COUNT: u32 = 10;
pub const MAP_STAGES: &str = "STAGES";
pub const MAP_FLOWS: &str = "FLOWS";
pub const MAP_SYNS: &str = "SYNS";
pub const MAP_EVENTS: &str = "EVENTS";
/// Size of the event ring buffer (a power of two, whole pages): room for
/// about 900 events the daemon has not read yet; more are lost.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// One blocked name, as the kernel writes it to the event ring buffer (opt-in,
/// see `Config::event_sample`). No address, no port: only what was blocked
/// and by which rule.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockEvent {
    /// A `counters::Proto`.
    pub proto: u32,
    /// An `packet::Af`.
    pub af: u32,
    /// The rule that blocked the name.
    pub rule: RuleRef,
    /// Where the canonical name starts in `name` (`name::canon_start`).
    pub start: u32,
    /// The canonical name, right-aligned, as the stage matched it.
    pub name: [u8; crate::name::CANON_CAP],
}

/// The HTTP ports as a bitmap of 64-bit words (written from
/// `Config::http_ports` with the settings).
pub const MAP_HTTP_PORTS: &str = "HTTP_PORTS";
pub const HTTP_PORT_WORDS: u32 = 65536 / 64;
/// The TLS ports as a bitmap of the same layout (`Config::tls_ports`; all
/// ones for all ports).
pub const MAP_TLS_PORTS: &str = "TLS_PORTS";
/// The QUIC ports as a bitmap of the same layout (`Config::quic_ports`; all
/// ones for all ports).
pub const MAP_QUIC_PORTS: &str = "QUIC_PORTS";

/// Default number of domain nodes the rule map holds (the loader may size it
/// differently); the national list is ~2M names.
pub const DEFAULT_RULE_CAPACITY: u32 = 1 << 22;
/// Bits of the first look per rule node of capacity: about 0.5 % of probes
/// of unlisted names pass it when the rule map is full.
pub const FIRST_LOOK_BITS_PER_NODE: u64 = 16;
/// u64 words in one block of the first look: one 64-byte cache line.
pub const FIRST_LOOK_BLOCK_WORDS: u64 = 8;

/// Size of the first look (u64 words, a power of two, whole blocks) for a
/// rule map of `capacity` nodes.
pub const fn first_look_words(capacity: u32) -> u32 {
    let words = (capacity as u64 * FIRST_LOOK_BITS_PER_NODE / 64).next_power_of_two();
    if words < FIRST_LOOK_BLOCK_WORDS {
        FIRST_LOOK_BLOCK_WORDS as u32
    } else if words > 1 << 26 {
        1 << 26
    } else {
        words as u32
    }
}

/// Where the first look keeps a node: the word (index into `FIRST_LOOK`)
/// and the four bits of it that are all set when the node may be in the
/// rule map. `mask` is `Config::look_mask`; `block` is the first lane of the
/// key of the node's ancestor with two labels (its own if it has one or
/// two: `walk_ancestors` passes it), so every probe of one name past its
/// top-level label reads the same 64-byte block — one cache line for a
/// name that is not listed, whatever its depth. A blocked Bloom filter with
/// the bits in one word of the block: one load per probe. The bits come
/// from the key's second lane, independent of the first. With `mask` 0 the
/// bits are 0, and every probe passes.
#[inline(always)]
pub const fn first_look_slot(mask: u64, block: u64, key: &NameKey) -> (u32, u64) {
    let h = key.h[1];
    let word = (block & mask & !(FIRST_LOOK_BLOCK_WORDS - 1)) | (h & (FIRST_LOOK_BLOCK_WORDS - 1));
    let bits = (1u64 << ((h >> 3) & 63)) | (1u64 << ((h >> 9) & 63)) | (1u64 << ((h >> 15) & 63)) | (1u64 << ((h >> 21) & 63));
    // All ones when `mask` is not 0, without a branch.
    let on = 0u64.wrapping_sub((mask | mask.wrapping_neg()) >> 63);
    ((word & mask) as u32, bits & on)
}

/// Rule ids are 24 bits; id 0 means "no rule".
pub const MAX_RULE_ID: u32 = (1 << 24) - 1;
/// Lists are numbered 0..MAX_LISTS.
pub const MAX_LISTS: u32 = 128;
/// TCP ports whose payload is read as HTTP requests (`Config::http_ports`).
pub const MAX_HTTP_PORTS: usize = 16;
/// TCP ports whose payload is read for TLS ClientHellos, when not all are
/// (`Config::tls_ports`).
pub const MAX_TLS_PORTS: usize = 16;
/// UDP ports whose datagrams are read for QUIC Initials, when not all are
/// (`Config::quic_ports`).
pub const MAX_QUIC_PORTS: usize = 16;
/// Label depths tracked by `Config::depth_mask` (a name has at most 127).
pub const MAX_DEPTH: u32 = 128;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameKey {
    pub h: [u64; 2],
}

/// A reference to one rule: 24-bit rule id, 7-bit list id, allow flag.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleRef(pub u32);

impl RuleRef {
    pub const NONE: RuleRef = RuleRef(0);
    const ALLOW: u32 = 1 << 31;

    /// `id` must be in `1..=MAX_RULE_ID` and `list` below `MAX_LISTS`.
    pub const fn new(id: u32, list: u32, allow: bool) -> Self {
        RuleRef((id & MAX_RULE_ID) | ((list & (MAX_LISTS - 1)) << 24) | if allow { Self::ALLOW } else { 0 })
    }
    #[inline(always)]
    pub const fn is_none(self) -> bool {
        self.0 & MAX_RULE_ID == 0
    }
    #[inline(always)]
    pub const fn id(self) -> u32 {
        self.0 & MAX_RULE_ID
    }
    #[inline(always)]
    pub const fn list(self) -> u32 {
        (self.0 >> 24) & (MAX_LISTS - 1)
    }
    #[inline(always)]
    pub const fn is_allow(self) -> bool {
        self.0 & Self::ALLOW != 0
    }
}

/// What the rules say about one domain node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeRules {
    /// Applies to the node's own name.
    pub exact: RuleRef,
    /// Applies to every name strictly below the node.
    pub below: RuleRef,
}

impl NodeRules {
    pub const fn is_empty(&self) -> bool {
        self.exact.is_none() && self.below.is_none()
    }
}

/// The program's settings: one entry of an array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Secret lane multipliers of the name hash; all zero means "not
    /// configured yet", and the program then passes everything.
    pub hash_r: [u64; 2],
    /// Bit `d - 1` (of 128) is set when some rule node has `d` labels; other
    /// depths are not looked up. A superset is always safe.
    pub depth_mask: [u64; 2],
    /// TTL of the records in DNS answers (seconds).
    pub answer_ttl: u32,
    /// Which of `redirect_v4` / `redirect_v6` are set (`REDIRECT_V4|V6`).
    pub redirect_flags: u32,
    /// The block page's addresses, for the `redirect` action.
    pub redirect_v4: [u8; 4],
    pub redirect_v6: [u8; 16],
    /// The event log of blocked names: 0 off (no event is written); N: one
    /// event for every N blocks by each rule (its 1st, N+1th, ...).
    pub event_sample: u32,
    /// What QUIC Initials get (`quic::POLICY_PASS`, `POLICY_DROP` or
    /// `POLICY_READ`).
    pub quic_policy: u32,
    /// TCP destination ports whose payload is read as HTTP requests (0:
    /// an unused slot); other ports' payload goes to the TLS stage if it is
    /// a TLS port.
    pub http_ports: [u16; MAX_HTTP_PORTS],
    /// TCP destination ports whose payload is read for TLS ClientHellos (0:
    /// an unused slot), unless `tls_all_ports` is set.
    pub tls_ports: [u16; MAX_TLS_PORTS],
    /// 1: every port is a TLS port (the default); `tls_ports` is ignored.
    pub tls_all_ports: u32,
    /// What first IP fragments of datagrams blokir reads get
    /// (`inspect::FRAGMENTS_DROP` or `FRAGMENTS_PASS`).
    pub fragment_policy: u32,
    /// What a TCP flow being read that carries fake segments or urgent
    /// bytes gets (`flow::TAMPER_BLOCK` or `TAMPER_PASS`).
    pub tamper_policy: u32,
    /// 1: QUIC is read on every UDP port but 53 (the default);
    /// `quic_ports` is ignored.
    pub quic_all_ports: u32,
    /// UDP destination ports read for QUIC Initials (0: an unused slot),
    /// unless `quic_all_ports` is set.
    pub quic_ports: [u16; MAX_QUIC_PORTS],
    /// What an Initial the daemon cannot be handed gets under
    /// `quic::POLICY_READ` (over the per-CPU budget, over the per-flow cap,
    /// or its buffer full or gone): `quic::OVERLOAD_PASS` or
    /// `OVERLOAD_DROP`. Also keeps the size a multiple of 8: no padding
    /// bytes in the map value.
    pub quic_overload: u32,
    /// The first look's word count minus one (`first_look_words`); 0: no
    /// first look, every probe goes to the rule map.
    pub look_mask: u64,
}

impl Default for Config {
    /// Unconfigured, HTTP on port 80, TLS on every port.
    fn default() -> Self {
        let mut http_ports = [0; MAX_HTTP_PORTS];
        http_ports[0] = crate::http::HTTP_PORT;
        Config {
            hash_r: [0; 2],
            depth_mask: [0; 2],
            answer_ttl: 0,
            redirect_flags: 0,
            redirect_v4: [0; 4],
            redirect_v6: [0; 16],
            event_sample: 0,
            quic_policy: crate::quic::POLICY_PASS,
            http_ports,
            tls_ports: [0; MAX_TLS_PORTS],
            tls_all_ports: 1,
            fragment_policy: crate::inspect::FRAGMENTS_DROP,
            tamper_policy: crate::flow::TAMPER_BLOCK,
            quic_all_ports: 1,
            quic_ports: [0; MAX_QUIC_PORTS],
            quic_overload: crate::quic::OVERLOAD_PASS,
            look_mask: 0,
        }
    }
}

impl Config {
    pub const REDIRECT_V4: u32 = 1;
    pub const REDIRECT_V6: u32 = 2;

    #[inline(always)]
    pub const fn is_configured(&self) -> bool {
        self.hash_r[0] != 0 && self.hash_r[1] != 0
    }
    /// Arithmetic only, no branch on the depth: a branch the verifier can
    /// decide from a known depth would make it track every depth value
    /// separately, multiplying the states of the matcher's loop.
    #[inline(always)]
    pub const fn has_depth(&self, depth: u32) -> bool {
        let d = depth.wrapping_sub(1) as u64;
        // 1 for depths 65..=128, else 0; depths past 128 select nothing.
        let hi = (d >> 6) & 1;
        let over = d >> 7;
        let valid = 1 ^ ((over | over.wrapping_neg()) >> 63);
        let word = (self.depth_mask[0] & hi.wrapping_sub(1)) | (self.depth_mask[1] & 0u64.wrapping_sub(hi));
        (word >> (d & 63)) & valid != 0
    }
    /// Whether TCP payload to `port` is read as HTTP (on the host; the
    /// kernel reads the `HTTP_PORTS` bitmap).
    pub fn is_http_port(&self, port: u16) -> bool {
        port != 0 && self.http_ports.contains(&port)
    }
    /// Whether TCP payload to `port` (not an HTTP port) is read for TLS
    /// ClientHellos, and clients' SYNs to it recorded (on the host; the
    /// kernel reads the `TLS_PORTS` bitmap).
    pub fn is_tls_port(&self, port: u16) -> bool {
        self.tls_all_ports != 0 || (port != 0 && self.tls_ports.contains(&port))
    }

    /// Whether UDP datagrams to `port` are read for QUIC Initials (on the
    /// host; the kernel reads the `QUIC_PORTS` bitmap). Port 53 is DNS's.
    pub fn is_quic_port(&self, port: u16) -> bool {
        port != crate::dns::DNS_PORT && (self.quic_all_ports != 0 || (port != 0 && self.quic_ports.contains(&port)))
    }

    /// Whether `dst` (a `FlowKey` address: family 4 or 6, IPv4 in the first
    /// 4 bytes) is the block page's address of that family. Requests to the
    /// block page are never blocked: the names redirected there are listed.
    #[inline(always)]
    pub fn is_block_page(&self, family: u32, dst: &[u8; 16]) -> bool {
        let word = |b: &[u8], i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if family == 4 {
            return self.redirect_flags & Config::REDIRECT_V4 != 0 && word(dst, 0) == word(&self.redirect_v4, 0);
        }
        // Early exits, one word at a time: no flag per word for the verifier
        // to combine.
        if self.redirect_flags & Config::REDIRECT_V6 == 0 {
            return false;
        }
        for i in 0..4 {
            if word(dst, 4 * i) != word(&self.redirect_v6, 4 * i) {
                return false;
            }
        }
        true
    }

    pub fn add_depth(&mut self, depth: u32) {
        let d = depth.wrapping_sub(1);
        if d < MAX_DEPTH {
            self.depth_mask[(d >> 6) as usize] |= 1 << (d & 63);
        }
    }
}

/// The rule-map interface the matcher needs: the kernel implements it with a
/// BPF hash map, userspace and tests with a host map.
pub trait RuleLookup {
    fn lookup(&self, key: &NameKey) -> Option<NodeRules>;
    /// The first look, before `lookup`: `false` only when no node with
    /// `key` is in the map (`block`: see `first_look_slot`). An exact map
    /// needs none.
    #[inline(always)]
    fn may_hold(&self, _cfg: &Config, _block: u64, _key: &NameKey) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_ref_round_trips() {
        let r = RuleRef::new(MAX_RULE_ID, MAX_LISTS - 1, true);
        assert_eq!((r.id(), r.list(), r.is_allow(), r.is_none()), (MAX_RULE_ID, MAX_LISTS - 1, true, false));
        let r = RuleRef::new(1, 0, false);
        assert_eq!((r.id(), r.list(), r.is_allow(), r.is_none()), (1, 0, false, false));
        assert!(RuleRef::NONE.is_none());
    }

    #[test]
    fn depth_mask_covers_all_depths() {
        let mut c = Config::default();
        for d in [1, 2, 63, 64, 65, 127, 128] {
            assert!(!c.has_depth(d));
            c.add_depth(d);
            assert!(c.has_depth(d));
        }
        assert!(!c.has_depth(0) && !c.has_depth(129) && !c.has_depth(3));
    }
}
