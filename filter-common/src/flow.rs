//! The per-flow state of the stream stages: one LRU map holds the TLS
//! ClientHello parser (`tls::Hello`) or the HTTP request parser
//! (`http::Request`) of each tracked flow, or the DNS-over-TCP reader
//! (`dns_tcp::Query`) of a connection with a query under way, so the two share the flow budget
//! (`tls::DEFAULT_FLOW_CAPACITY`) and the memory (one value is the larger of
//! the two, ~600 bytes).

use crate::{
    dns_tcp::Query,
    http::Request,
    name::{CANON_END, MAX_DOTTED_LEN, ascii_lower},
    packet::Packet,
    tls::Hello,
};

/// `Flow::kind` of a TLS flow.
pub const KIND_TLS: u32 = 1;
/// `Flow::kind` of an HTTP flow.
pub const KIND_HTTP: u32 = 2;
/// `Flow::kind` of a DNS-over-TCP flow with a message under way.
pub const KIND_DNS: u32 = 3;

/// A tracked flow's parser. Both variants are `#[repr(C)]` and start with
/// `next_seq`, `kind`, `passed_seq`, so those can be read through either.
#[repr(C)]
#[derive(Clone, Copy)]
pub union Flow {
    pub hello: Hello,
    pub request: Request,
    pub query: Query,
}

impl Flow {
    /// Which parser the flow holds (`KIND_*`).
    #[inline(always)]
    pub fn kind(&self) -> u32 {
        // SAFETY: both variants start with `next_seq, kind` (#[repr(C)]),
        // and every value is written whole by one of them.
        unsafe { core::ptr::read_volatile(&self.hello.kind) }
    }

    /// The sequence number after the last byte of the stream passed on to
    /// the server, which is what the server expects next: the stream
    /// stages move it when a segment passes. A blocked flow keeps it: the
    /// RST that closes the server's end (`reset::Toward::Server`) carries
    /// it.
    #[inline(always)]
    pub fn passed_seq(&self) -> u32 {
        // SAFETY: as `kind`.
        unsafe { core::ptr::read_volatile(&self.hello.passed_seq) }
    }

    /// Moves `passed_seq` back to `seq` if that is before it: a rewritten
    /// copy at `seq` shows that the server did not take the bytes read there
    /// (it discarded the fake they came from), so it expects `seq` at the
    /// latest (the RST that closes its end must carry what it expects).
    #[inline(always)]
    pub fn passed_back_to(&mut self, seq: u32) {
        if self.passed_seq().wrapping_sub(seq) as i32 > 0 {
            // Writing a field of a union is safe: every variant starts with
            // `next_seq, kind, passed_seq` (#[repr(C)]).
            self.hello.passed_seq = seq;
        }
    }

    /// Whether the flow is blocked, and whether its server end was sent a
    /// RST (`close_server`).
    #[inline(always)]
    pub fn blocked(&self) -> (bool, bool) {
        // SAFETY: the variant `kind` names.
        unsafe {
            if self.kind() == KIND_DNS {
                // A DNS flow is never blocked as a whole.
                (false, false)
            } else if self.kind() == KIND_HTTP {
                (self.request.is_blocked(), self.request.server_closed())
            } else {
                (self.hello.is_blocked(), self.hello.server_closed())
            }
        }
    }

    /// Notes that the blocked connection's server end was sent a RST.
    #[inline(always)]
    pub fn close_server(&mut self) {
        // SAFETY: the variant `kind` names; `flags` is public in both.
        unsafe {
            if self.kind() == KIND_HTTP {
                self.request.flags |= Request::FLAG_SERVER_CLOSED;
            } else {
                self.hello.flags |= Hello::FLAG_SERVER_CLOSED;
            }
        }
    }

    /// Whether the flow's name passed and its parser is done: it is kept
    /// only to compare later copies of the name's bytes (`rewritten`).
    #[inline(always)]
    pub fn watched(&self) -> bool {
        // SAFETY: the variant `kind` names.
        unsafe {
            match self.kind() {
                KIND_HTTP => self.request.watched(),
                KIND_TLS => self.hello.watched(),
                _ => false,
            }
        }
    }

    /// Marks a TLS or HTTP flow whose name passed and whose parser is done
    /// as watched (see `watched`).
    #[inline(always)]
    pub fn watch(&mut self) {
        // SAFETY: the variant `kind` names.
        unsafe { if self.kind() == KIND_HTTP { self.request.watch() } else { self.hello.watch() } }
    }

    /// The name bytes the flow's parser read: where they start, how many,
    /// and the canonical buffer holding them (see `rewritten`). A DNS flow:
    /// none.
    #[inline(always)]
    pub fn name_read(&self) -> (u32, u32, &[u8; 512]) {
        // SAFETY: the variant `kind` names.
        unsafe {
            match self.kind() {
                KIND_HTTP => {
                    let (at, len) = self.request.name_read();
                    (at, len, &self.request.name)
                }
                KIND_TLS => {
                    let (at, len) = self.hello.name_read();
                    (at, len, &self.hello.name)
                }
                _ => (0, 0, &self.hello.name),
            }
        }
    }

    /// Whether the segment (payload `off..end` at `seq`) carries a copy of
    /// name bytes the flow's parser read that differs from them (see
    /// `rewritten`).
    #[inline(always)]
    pub fn rewritten<P: Packet + ?Sized>(&self, p: &P, seq: u32, off: usize, end: usize) -> bool {
        let (at, len, name) = self.name_read();
        rewritten(p, seq, off, end, at, len, name)
    }

    /// Whether `len` bytes at `seq` cover some of the name bytes read.
    #[inline(always)]
    pub fn overlaps_name(&self, seq: u32, len: u32) -> bool {
        let (at, n, _) = self.name_read();
        name_overlap(seq, len, at, n).is_some()
    }

    /// Whether the TLS stage would pass a segment (`seq`, `len` payload
    /// bytes) of this flow untouched, unless it starts a ClientHello: a
    /// watched hello (its name passed), not blocked, between rounds, the
    /// segment wholly off the name's bytes (nothing to compare). Most of a
    /// TLS connection's packets; the entry program passes them itself
    /// (`conn::idle_tls`), without the tail call and the stage's parse.
    #[inline(always)]
    pub fn idle_tls(&self, seq: u32, len: u32) -> bool {
        if self.kind() != KIND_TLS {
            return false;
        }
        // SAFETY: the variant `kind` names.
        let hello = unsafe { &self.hello };
        !hello.is_blocked() && hello.watched() && hello.rounds == 0 && !self.overlaps_name(seq, len)
    }

    /// Sets the parser's rounds of `feed` on the current segment.
    #[inline(always)]
    pub fn set_rounds(&mut self, rounds: u32) {
        // Writing a field of a union is safe: both variants hold `rounds`.
        if self.kind() == KIND_HTTP {
            self.request.rounds = rounds;
        } else {
            self.hello.rounds = rounds;
        }
    }

    /// Marks the flow blocked: its later segments are dropped, or with
    /// `reset` answered with a TCP RST.
    #[inline(always)]
    pub fn block(&mut self, reset: bool) {
        // SAFETY: the variant `kind` names.
        unsafe { if self.kind() == KIND_HTTP { self.request.block(reset) } else { self.hello.block(reset) } }
    }

    /// Whether the flow's hello, request or DNS message is still being read
    /// (not blocked, nor decided and watched).
    #[inline(always)]
    pub fn reading(&self) -> bool {
        !self.watched() && !self.blocked().0
    }
}

/// `SYNS`' value: where a connection's data starts (its SYN's sequence
/// number + 1, or for DNS over TCP where the next message starts), and when
/// that was recorded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynRecord {
    pub seq: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` (the model: its own monotonic clock).
    pub at_ns: u64,
}

impl SynRecord {
    #[inline(always)]
    pub fn new(seq: u32, at_ns: u64) -> Self {
        SynRecord { seq, _pad: 0, at_ns }
    }
}

/// How long a SYN record stands against a SYN with another sequence
/// number: no client starts two connections on one address and port pair
/// so close together (a SYN is resent with its ISN, at 1, 3, 7 s; Linux
/// keeps a closed connection's pair in TIME_WAIT for 60 s). After it, a SYN
/// is a new connection on the pair.
pub const SYN_CONFLICT_NS: u64 = 30_000_000_000;

/// What blokir does with a client's SYN without data on a pair that has no
/// flow being read (`conn::syn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynVerdict {
    /// Pass it, and record this start.
    Record(SynRecord),
    /// Pass it, the record standing (the SYN resent).
    Resent,
    /// Drop it, counted (`sign::SYN`): another ISN than the SYN passed
    /// within `SYN_CONFLICT_NS`. Two SYNs with different ISNs (a fake one
    /// with a TTL that dies before the server, before or after the real
    /// one) would leave the start blokir reads against unknown; a start
    /// moved by a fake made the real data look stale or trimmed, and pass
    /// unread. Only the SYN that passed can start the server's connection,
    /// so the record is right whenever the server has one: a client whose
    /// first SYN was a fake gets no connection.
    Conflict,
}

/// The verdict on a SYN whose data starts at `seq`, at `now`, given the
/// pair's record.
#[inline(always)]
pub fn on_syn(record: Option<SynRecord>, seq: u32, now: u64) -> SynVerdict {
    match record {
        Some(r) if now.wrapping_sub(r.at_ns) < SYN_CONFLICT_NS => {
            if r.seq == seq {
                SynVerdict::Resent
            } else {
                SynVerdict::Conflict
            }
        }
        _ => SynVerdict::Record(SynRecord::new(seq, now)),
    }
}

/// Capacity of the map of connections between their SYN and their first
/// data segment (`SYNS`, LRU): 56 bytes of key and value.
pub const DEFAULT_SYN_CAPACITY: u32 = 1 << 17;

/// Where a data segment stands to the start of its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// No SYN on record (it came before the program, or was evicted).
    Unknown,
    /// The connection's first data segment; its first `trim` bytes lie
    /// before the connection's start (zapret's `seqovl`: a few bytes
    /// "before" ISN+1). The receiver takes the segment from the start on
    /// (Linux trims the head of a segment that starts before `rcv_nxt`), so
    /// the stream is read from there.
    First { trim: u32 },
    /// Data beyond the first byte, come before the first segment: held back
    /// (dropped) until the first has passed, so that the later part of a
    /// ClientHello or request cannot slip through ahead of the part that
    /// starts its flow.
    Early,
    /// All of it lies before the connection's start: the receiver discards
    /// it as old data, so it is passed unread, and the start stays on
    /// record.
    Stale,
}

/// Where a data segment of `len` bytes starting at `seq` stands, given the
/// sequence number its connection's data starts at (`expect`, recorded
/// from the SYN).
#[inline(always)]
pub fn start_of(expect: Option<u32>, seq: u32, len: u32) -> Start {
    let Some(e) = expect else { return Start::Unknown };
    let ahead = seq.wrapping_sub(e) as i32;
    if ahead > 0 {
        return Start::Early;
    }
    // Bytes before the start: at most the segment's (`ahead` < 0 here,
    // and -i32::MIN does not fit; such a segment is far behind anyway).
    let before = e.wrapping_sub(seq);
    if before < len { Start::First { trim: before } } else { Start::Stale }
}

/// Signs on a data segment that the receiver's stack would not read it as
/// it stands (`fake_signs`): what the circumvention tools "fool" their fake
/// segments with, and urgent bytes.
pub mod sign {
    /// URG set: the receiver takes the byte at the urgent pointer out of
    /// the stream (RFC 6093; Linux without `SO_OOBINLINE`).
    pub const URGENT: u32 = 1;
    /// No ACK flag (and no SYN): Linux discards such a data segment.
    pub const NO_ACK: u32 = 2;
    /// A TCP MD5 signature (kind 19) or TCP-AO (kind 29) option, or an
    /// option list no real stack sends (not walked within
    /// `packet::TCP_OPTION_SLOTS` options): a server without a key for the
    /// connection drops the segment (Linux: `TCPMD5Unexpected`), or, for AO
    /// before Linux 6.7, reads it; either way a flow being read does not
    /// carry one.
    pub const SIGNED: u32 = 4;
    /// A copy of name bytes already read that differs from them
    /// (`rewritten`): one of the two copies is a fake, and the one read
    /// may be it. Retransmissions never change bytes.
    pub const REWRITE: u32 = 8;
    /// A SYN without data while the flow's hello or request is being read:
    /// the server discards it (RFC 5961 §4: a challenge ACK), but forgetting
    /// the flow would let the rest of the name pass unread; and it is also
    /// how a new connection on the same pair starts, whose data read on as
    /// the old one's would stall or pass unread. Under `block` the flow is
    /// blocked and the server's end closed, so that the client's next SYN
    /// starts afresh.
    pub const SYN: u32 = 16;
}

/// Where `seg` bytes at `seq` overlap the `len` name bytes from `name_seq`
/// on: the first overlapping byte's place in the name and in the segment,
/// and how many overlap; `None` if none do.
#[inline(always)]
pub fn name_overlap(seq: u32, seg: u32, name_seq: u32, len: u32) -> Option<(u32, u32, u32)> {
    // The name's first byte in the segment, or the segment's first byte
    // in the name.
    let into_seg = name_seq.wrapping_sub(seq);
    let (j0, k0) = if (into_seg as i32) >= 0 { (0, into_seg) } else { (seq.wrapping_sub(name_seq), 0) };
    if j0 >= len || k0 >= seg {
        return None;
    }
    Some((j0, k0, (len - j0).min(seg - k0)))
}

/// Whether the segment with payload `off..end` at sequence number `seq`
/// carries a copy of some of the `len` name bytes read from `name_seq` on
/// (held in canonical form in `name`, a parser's `bytes` then `starts`:
/// byte `j` of the dotted name at `CANON_END - j`, a dot as a label start)
/// that differs from them. Letter case is not a difference (the name is
/// matched without it). Bytes outside the name are not compared: a fake
/// that only moves where the parser finds the name, its name bytes equal
/// to what the real copy holds there, is not caught.
#[inline(always)]
pub fn rewritten<P: Packet + ?Sized>(p: &P, seq: u32, off: usize, end: usize, name_seq: u32, len: u32, name: &[u8; 512]) -> bool {
    if off >= end {
        return false;
    }
    let Some((j0, k0, count)) = name_overlap(seq, (end - off) as u32, name_seq, len) else { return false };
    for i in 0..=MAX_DOTTED_LEN as u32 {
        if i >= count {
            break;
        }
        let Some(b) = p.u8_at(off + (k0 + i) as usize) else { break };
        let at = (CANON_END - ((j0 + i) as usize & CANON_END)) & CANON_END;
        let differs = if name[256 + at] != 0 { b != b'.' } else { ascii_lower(b) != name[at] };
        if differs {
            return true;
        }
    }
    false
}

/// `--on-tamper block`: a flow being read that carries a fake segment or
/// urgent bytes is blocked (`Config::tamper_policy`).
pub const TAMPER_BLOCK: u32 = 0;
/// `--on-tamper pass`: counted; a segment the receiver discards is passed
/// unread (the flow is read on), and a flow with urgent bytes is no longer
/// read (it passes).
pub const TAMPER_PASS: u32 = 1;

/// What a flow being read does with a segment that bears `signs`
/// (`sign::*`, not 0) under the tamper policy `policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// Block the flow (its counter: `counter`).
    Block { counter: u32 },
    /// Count it and pass the segment unread: the receiver discards it.
    Skip { counter: u32 },
    /// Count it, forget the flow (it is no longer read) and pass the
    /// segment: the bytes the receiver reads are not the segment's.
    Forget { counter: u32 },
    /// Count it and handle the segment as any other (read what it holds
    /// past what was read): a rewritten copy under `pass`, which may be
    /// the real one.
    Count { counter: u32 },
}

/// The tamper policy's answer to a segment with `signs`.
#[inline(always)]
pub fn tamper(signs: u32, policy: u32) -> Tamper {
    // Under `pass` the flow is no longer read, as with urgent bytes.
    if signs == sign::SYN {
        let counter = crate::counters::EVASION_SYN;
        return if policy != TAMPER_PASS { Tamper::Block { counter } } else { Tamper::Forget { counter } };
    }
    // A rewrite, alone: the segment's signs are those of a real one.
    if signs == sign::REWRITE {
        let counter = crate::counters::EVASION_REWRITE;
        return if policy != TAMPER_PASS { Tamper::Block { counter } } else { Tamper::Count { counter } };
    }
    let discarded = signs & (sign::NO_ACK | sign::SIGNED) != 0;
    let counter = if discarded { crate::counters::EVASION_FAKE } else { crate::counters::EVASION_URGENT };
    if policy != TAMPER_PASS {
        Tamper::Block { counter }
    } else if discarded {
        Tamper::Skip { counter }
    } else {
        Tamper::Forget { counter }
    }
}

/// Whether a connection's first data segment (`start`) with TCP flags
/// `flags` is suspect whatever it carries: urgent data, or data without an
/// ACK (a SYN with data, TCP Fast Open, is no data segment here). Such a
/// segment starts a flow even if it does not start a hello or request, as
/// its bytes are not what the receiver reads (an urgent byte before the
/// hello, ByeDPI's `--disoob`).
#[inline(always)]
pub fn suspect_first(start: Start, flags: u8) -> bool {
    use crate::packet::{TCP_ACK, TCP_SYN, TCP_URG};
    matches!(start, Start::First { .. }) && (flags & TCP_URG != 0 || flags & (TCP_ACK | TCP_SYN) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_placed_against_the_start_modulo_2_32() {
        assert_eq!(start_of(None, 5, 10), Start::Unknown);
        assert_eq!(start_of(Some(5), 5, 10), Start::First { trim: 0 });
        assert_eq!(start_of(Some(5), 6, 10), Start::Early);
        assert_eq!(start_of(Some(u32::MAX), 3, 10), Start::Early);
    }

    #[test]
    fn a_syn_with_another_isn_within_the_window_is_a_conflict() {
        let SynVerdict::Record(r) = on_syn(None, 100, 5) else { panic!() };
        assert_eq!(r, SynRecord::new(100, 5));
        assert_eq!(on_syn(Some(r), 100, 9), SynVerdict::Resent);
        assert_eq!(on_syn(Some(r), 7000, 9), SynVerdict::Conflict);
        let later = 5 + SYN_CONFLICT_NS;
        assert_eq!(on_syn(Some(r), 7000, later), SynVerdict::Record(SynRecord::new(7000, later)));
        use crate::counters::EVASION_SYN;
        assert_eq!(tamper(sign::SYN, TAMPER_BLOCK), Tamper::Block { counter: EVASION_SYN });
        assert_eq!(tamper(sign::SYN, TAMPER_PASS), Tamper::Forget { counter: EVASION_SYN });
    }

    #[test]
    fn bytes_before_the_start_are_trimmed() {
        // seqovl: 3 bytes before the start, 7 after.
        assert_eq!(start_of(Some(5), 2, 10), Start::First { trim: 3 });
        assert_eq!(start_of(Some(1), u32::MAX, 10), Start::First { trim: 2 });
        // Wholly before: old data.
        assert_eq!(start_of(Some(5), 4, 1), Start::Stale);
        assert_eq!(start_of(Some(5), 4, 0), Start::Stale);
        assert_eq!(start_of(Some(3), u32::MAX, 4), Start::Stale);
        assert_eq!(start_of(Some(5), 5 + (1 << 31), 100), Start::Stale);
    }

    #[test]
    fn tamper_policy() {
        use crate::counters::{EVASION_FAKE, EVASION_URGENT};
        assert_eq!(tamper(sign::URGENT, TAMPER_BLOCK), Tamper::Block { counter: EVASION_URGENT });
        assert_eq!(tamper(sign::URGENT, TAMPER_PASS), Tamper::Forget { counter: EVASION_URGENT });
        assert_eq!(tamper(sign::NO_ACK | sign::URGENT, TAMPER_PASS), Tamper::Skip { counter: EVASION_FAKE });
        assert_eq!(tamper(sign::SIGNED, TAMPER_BLOCK), Tamper::Block { counter: EVASION_FAKE });
        assert!(suspect_first(Start::First { trim: 0 }, 0x20 | 0x10));
        assert!(suspect_first(Start::First { trim: 0 }, 0x08));
        assert!(!suspect_first(Start::First { trim: 0 }, 0x18));
        assert!(!suspect_first(Start::Unknown, 0x20));
        use crate::counters::EVASION_REWRITE;
        assert_eq!(tamper(sign::REWRITE, TAMPER_BLOCK), Tamper::Block { counter: EVASION_REWRITE });
        assert_eq!(tamper(sign::REWRITE, TAMPER_PASS), Tamper::Count { counter: EVASION_REWRITE });
        // A fake sign with it: the segment is a fake.
        assert_eq!(tamper(sign::REWRITE | sign::NO_ACK, TAMPER_PASS), Tamper::Skip { counter: EVASION_FAKE });
    }

    /// A canonical name as the parsers hold it, read from `dotted`.
    fn held(dotted: &[u8]) -> [u8; 512] {
        let mut name = [0u8; 512];
        for (j, &b) in dotted.iter().enumerate() {
            let at = CANON_END - j;
            if b == b'.' {
                name[256 + at] = 1;
            } else {
                name[at] = ascii_lower(b);
            }
        }
        name
    }

    #[test]
    fn rewritten_copies_of_the_name_are_told_from_retransmissions() {
        let name = held(b"allowed.example");
        let n = 15;
        // The name at seq 110 (offset 10 of a segment at 100).
        let mut seg = b"0123456789allowed.example\r\n".to_vec();
        assert!(!rewritten(&seg[..], 100, 0, seg.len(), 110, n, &name));
        // Letter case is no difference.
        seg[10] = b'A';
        assert!(!rewritten(&seg[..], 100, 0, seg.len(), 110, n, &name));
        let mut other = b"0123456789blocked.example\r\n".to_vec();
        assert!(rewritten(&other[..], 100, 0, other.len(), 110, n, &name));
        // Only the bytes read are compared: 3 of the name so far.
        assert!(!rewritten(&other[..], 100, 0, other.len(), 110, 0, &name));
        other[10..13].copy_from_slice(b"all");
        assert!(!rewritten(&other[..], 100, 0, other.len(), 110, 3, &name));
        assert!(rewritten(&other[..], 100, 0, other.len(), 110, 4, &name));
        // A dot where a letter was, and the other way round.
        assert!(rewritten(&b"allowedxexample"[..], 110, 0, 15, 110, n, &name));
        assert!(rewritten(&b"allowed.e.ample"[..], 110, 0, 15, 110, n, &name));
        // A segment starting inside the name, or ending inside it; one
        // wholly before or after; across 2^32.
        assert!(!rewritten(&b"ed.example"[..], 115, 0, 10, 110, n, &name));
        assert!(rewritten(&b"ed.exbmple"[..], 115, 0, 10, 110, n, &name));
        assert!(rewritten(&b"xxxalloweX"[..], 107, 0, 10, 110, n, &name));
        assert!(!rewritten(&b"xxxallowed"[..], 107, 0, 10, 110, n, &name));
        assert!(!rewritten(&b"zzzz"[..], 125, 0, 4, 110, n, &name));
        assert!(!rewritten(&b"zzzz"[..], 106, 0, 4, 110, n, &name));
        assert!(rewritten(&b"zzzzz"[..], 106, 0, 5, 110, n, &name));
        assert!(rewritten(&b"zzbllowed"[..], u32::MAX - 1, 0, 9, 0, n, &name));
        assert!(!rewritten(&b"zzallowed"[..], u32::MAX - 1, 0, 9, 0, n, &name));
        // Payload offsets within a larger packet.
        assert!(!rewritten(&b"HDRallowed"[..], 0, 3, 10, 0, n, &name));
        assert!(rewritten(&b"HDRallowex"[..], 0, 3, 10, 0, n, &name));
    }
}
