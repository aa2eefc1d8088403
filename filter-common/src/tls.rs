//! TLS ClientHello server names, read as a stream.
//!
//! A ClientHello may arrive in any number of TCP segments (Chromium's ~2 KB
//! hello with an ML-KEM key share takes two; splitting it into 1-byte
//! segments is a classic evasion), so the parser keeps its whole state in a
//! per-flow `Hello` (an LRU map value in the kernel) and consumes each
//! segment's bytes where the last one stopped. It follows the record layer
//! (a hello may span several records), the handshake header and the
//! ClientHello fields, skips extensions it does not need in one step each,
//! and writes the `server_name` straight into canonical form (see `name`), so
//! it needs no buffer for the hello itself.
//!
//! All state is read from and written to memory at each step (`load`/`store`):
//! in the kernel that memory is a map value, which the verifier does not
//! track, so the step loop is verified once per step, not once per history.

use crate::{
    name::{CANON_END, CanonBuf, MAX_DOTTED_LEN, MAX_LABEL_LEN, ascii_lower},
    packet::Packet,
};

pub const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u32 = 1;
const EXT_SERVER_NAME: u32 = 0;
/// Encrypted ClientHello (draft-ietf-tls-esni).
const EXT_ECH: u32 = 0xfe0d;
const NAME_TYPE_HOST: u32 = 0;
/// TLS records carry at most 2^14 bytes (plus expansion, never in a hello).
const MAX_RECORD_LEN: u32 = (1 << 14) + 256;
/// Flows whose ClientHello is being read (or that are blocked) that the
/// kernel tracks at once; the least recently used go first.
pub const DEFAULT_FLOW_CAPACITY: u32 = 1 << 16;

/// Parser steps per call of `feed` (about 4k verifier instructions each).
/// A step reads one or two bytes of a
/// field, one byte of the name, or skips a field or an extension: a real
/// hello needs about 60 plus the name's length. When a segment needs more,
/// the kernel's stream stage tail-calls itself to go on, so each round is
/// verified as a short loop.
pub const MAX_STEPS: usize = 32;
/// Rounds of `feed` per segment. The kernel allows 33 tail calls in a
/// chain: one enters the stream stage (two for a hello on an HTTP port,
/// through the HTTP stage), 29 start further rounds, one goes on to the
/// match stage and one to the answer stage (a RST to the client or the
/// server).
pub const MAX_ROUNDS: usize = 30;

/// Where the parser is in the hello.
mod stage {
    /// Handshake header: type (1) and length (3).
    pub const HS_HEADER: u32 = 0;
    /// legacy_version (2) and random (32).
    pub const SKIP_VERSION_RANDOM: u32 = 1;
    pub const SESSION_ID_LEN: u32 = 2;
    pub const SKIP_SESSION_ID: u32 = 3;
    pub const CIPHERS_LEN: u32 = 4;
    pub const SKIP_CIPHERS: u32 = 5;
    pub const COMPRESSION_LEN: u32 = 6;
    pub const SKIP_COMPRESSION: u32 = 7;
    pub const EXTENSIONS_LEN: u32 = 8;
    /// Extension type (2) and length (2).
    pub const EXT_HEADER: u32 = 9;
    pub const SKIP_EXT: u32 = 10;
    pub const SNI_LIST_LEN: u32 = 11;
    pub const SNI_NAME_TYPE: u32 = 12;
    pub const SNI_NAME_LEN: u32 = 13;
    pub const NAME: u32 = 14;
}

/// What a segment told the parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The hello continues in later segments.
    NeedMore,
    /// The server name is complete: its canonical length is given. Reported
    /// once, at the end of the segment that completed it (the parser walks
    /// on to the end of the extensions for ECH): `Hello::ended` says whether
    /// the hello ended there too.
    Name(usize),
    /// The hello ended after a name reported for an earlier segment (or
    /// broke the format after it).
    End,
    /// The hello ended without a server_name extension.
    NoName,
    /// Not a ClientHello, or one that breaks the format.
    NotHello,
    /// This call's steps ran out before the segment's end: call again.
    StepsExhausted,
}

/// The per-flow parser state.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Hello {
    /// TCP sequence number of the next byte the parser expects.
    pub next_seq: u32,
    /// `flow::KIND_TLS` (see `flow::Flow`).
    pub kind: u32,
    /// See `flow::Flow::passed_seq`.
    pub passed_seq: u32,
    stage: u32,
    /// Bytes still to read (fields) or skip in the current stage.
    need: u32,
    /// The field being read, big-endian.
    acc: u32,
    /// Record-header bytes still to read (0: inside a record's payload).
    rec_need: u32,
    rec_acc: u32,
    /// Payload bytes left in the current record.
    record_left: u32,
    /// Bytes left in the ClientHello body, and in the extensions block
    /// (once it started).
    hello_left: u32,
    exts_left: u32,
    /// Server-name bytes read, and where the current label began.
    name_pos: u32,
    label_start: u32,
    name_len: u32,
    /// The server_name extension's length, then its name list's length.
    sni_len: u32,
    /// `FLAG_*`.
    pub flags: u32,
    /// Per segment, kept here with the rest: the offset being read, bytes the
    /// last step took, the outcome so far (`DONE_*`), the canonical length of
    /// a finished name.
    cursor: u32,
    taken: u32,
    done: u32,
    canon_len: u32,
    /// Rounds of `feed` (tail calls) spent on the current segment.
    pub rounds: u32,
    /// The sequence number of offset 0 of the segment being fed, and that
    /// of the name's first byte (`flow::rewritten` compares later copies of
    /// the name's bytes with what was read).
    base: u32,
    pub name_seq: u32,
    /// The server name in canonical form as it is read (`bytes`, `starts`).
    pub name: [u8; 2 * 256],
}

impl Hello {
    /// An encrypted_client_hello extension was seen.
    pub const FLAG_ECH: u32 = 1;
    /// A server_name extension was seen.
    pub const FLAG_SNI: u32 = 2;
    /// The flow is blocked: its later segments are dropped.
    pub const FLAG_BLOCKED: u32 = 4;
    /// The server name is complete.
    pub const FLAG_NAME: u32 = 8;
    /// The name was reported (`Progress::Name`).
    pub const FLAG_REPORTED: u32 = 16;
    /// The hello ended (or broke the format) after the name.
    pub const FLAG_END: u32 = 32;
    /// The name matched an ECH-outer rule: it is matched again (and the
    /// flow blocked) if the rest of the hello carries ECH.
    pub const FLAG_ECH_PENDING: u32 = 64;
    /// The walk after the name ran out of budget (`name_so_far`): whether
    /// ECH follows is unknown.
    pub const FLAG_CUT: u32 = 128;
    /// The blocked flow's client segments are answered with a TCP RST.
    pub const FLAG_RESET: u32 = 256;
    /// The blocked connection's server end was sent a RST.
    pub const FLAG_SERVER_CLOSED: u32 = 512;
    /// The name passed and the hello was read to its end: the flow is kept
    /// only so that later copies of the name's bytes are compared
    /// (`flow::rewritten`).
    pub const FLAG_WATCH: u32 = 1024;

    /// Whether the hello ended (after its name).
    pub fn ended(&self) -> bool {
        ld(&self.flags) & Hello::FLAG_END != 0
    }

    /// Whether an encrypted_client_hello extension was seen so far.
    pub fn has_ech(&self) -> bool {
        ld(&self.flags) & Hello::FLAG_ECH != 0
    }

    /// Sets `FLAG_*` bits.
    pub fn set(&mut self, bits: u32) {
        let flags = ld(&self.flags) | bits;
        st(&mut self.flags, flags);
    }

    /// Marks the flow blocked; with `reset`, its client segments are
    /// answered with a TCP RST.
    pub fn block(&mut self, reset: bool) {
        let flags = ld(&self.flags) | Hello::FLAG_BLOCKED | if reset { Hello::FLAG_RESET } else { 0 };
        st(&mut self.flags, flags);
    }

    pub fn is_blocked(&self) -> bool {
        ld(&self.flags) & Hello::FLAG_BLOCKED != 0
    }

    /// Whether the blocked connection's server end was sent a RST.
    pub fn server_closed(&self) -> bool {
        ld(&self.flags) & Hello::FLAG_SERVER_CLOSED != 0
    }

    /// A blocked flow whose segments are answered with a TCP RST.
    pub fn resets(&self) -> bool {
        ld(&self.flags) & Hello::FLAG_RESET != 0
    }

    /// A parser at the first byte of a TLS stream whose first segment starts
    /// at sequence number `seq`.
    pub fn new(seq: u32) -> Self {
        let mut h = Hello {
            next_seq: 0,
            kind: 0,
            passed_seq: 0,
            stage: 0,
            need: 0,
            acc: 0,
            rec_need: 0,
            rec_acc: 0,
            record_left: 0,
            hello_left: 0,
            exts_left: 0,
            name_pos: 0,
            label_start: 0,
            name_len: 0,
            sni_len: 0,
            flags: 0,
            cursor: 0,
            taken: 0,
            done: 0,
            canon_len: 0,
            rounds: 0,
            base: 0,
            name_seq: 0,
            name: [0; 512],
        };
        h.reset(seq);
        h
    }

    /// Resets the parser (not the name bytes, which are written before read)
    /// for a stream whose first segment starts at `seq`.
    pub fn reset(&mut self, seq: u32) {
        (self.next_seq, self.passed_seq) = (seq, seq);
        self.kind = crate::flow::KIND_TLS;
        self.stage = stage::HS_HEADER;
        self.need = 4;
        self.rec_need = 5;
        (self.acc, self.rec_acc, self.record_left, self.hello_left, self.exts_left) = (0, 0, 0, 0, 0);
        (self.name_pos, self.label_start, self.name_len, self.sni_len, self.flags, self.cursor) = (0, 0, 0, 0, 0, 0);
        (self.taken, self.done, self.canon_len, self.rounds, self.base, self.name_seq) = (0, 0, 0, 0, 0, 0);
    }

    /// The name passed and the parser is done: the flow is only watched
    /// for rewritten copies of the name (`FLAG_WATCH`).
    pub fn watch(&mut self) {
        let flags = ld(&self.flags) | Hello::FLAG_WATCH;
        st(&mut self.flags, flags);
    }

    pub fn watched(&self) -> bool {
        ld(&self.flags) & Hello::FLAG_WATCH != 0
    }

    /// The name bytes read so far: where they start, and how many.
    pub fn name_read(&self) -> (u32, u32) {
        (ld(&self.name_seq), ld(&self.name_pos))
    }

    /// A parser at the first byte of a bare handshake stream, with no TLS
    /// record layer around it: QUIC's CRYPTO stream (RFC 9001 4.1) carries
    /// the ClientHello that way (read by the daemon, see
    /// filter-user's `quic`).
    pub fn new_handshake() -> Self {
        let mut h = Hello::new(0);
        h.rec_need = 0;
        h.record_left = u32::MAX;
        h
    }

    /// The canonical length of the finished name.
    pub fn canon_len(&self) -> usize {
        ld(&self.canon_len) as usize
    }

    /// Copies the finished name into a matcher buffer.
    pub fn copy_name(&self, buf: &mut CanonBuf) {
        buf.bytes.copy_from_slice(&self.name[..256]);
        buf.starts.copy_from_slice(&self.name[256..]);
    }
}

/// A TCP flow, one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    /// 4 or 6.
    pub family: u32,
}

impl FlowKey {
    /// The flow of a TCP segment (addresses read from the IP header).
    #[inline(always)]
    pub fn of<P: Packet + ?Sized>(p: &P, l3: &crate::packet::L3, l4: &crate::packet::L4) -> Option<Self> {
        let mut k = FlowKey { src_port: l4.src_port, dst_port: l4.dst_port, ..FlowKey::default() };
        let (src, len) = match l3.af {
            crate::packet::Af::V4 => (l3.l3_off + 12, 4),
            crate::packet::Af::V6 => (l3.l3_off + 8, 16),
        };
        k.family = if len == 4 { 4 } else { 6 };
        for i in 0..8 {
            if 2 * i >= len {
                break;
            }
            let [a, b] = p.be16_at(src + 2 * i)?.to_be_bytes();
            let [c, d] = p.be16_at(src + len + 2 * i)?.to_be_bytes();
            (k.src[2 * i], k.src[2 * i + 1], k.dst[2 * i], k.dst[2 * i + 1]) = (a, b, c, d);
        }
        Some(k)
    }
}

/// Whether a segment that starts a flow looks like the start of a TLS
/// ClientHello (content type 22, major version 3, handshake type 1, as far
/// as the segment goes): only then is a parser set up. (A TLS 1.2 client's
/// second flight also starts with a handshake record.)
#[inline(always)]
pub fn starts_hello<P: Packet + ?Sized>(p: &P, off: usize, end: usize) -> bool {
    off < end
        && p.u8_at(off) == Some(CONTENT_HANDSHAKE)
        && (off + 1 >= end || p.u8_at(off + 1) == Some(3))
        && (off + 5 >= end || p.u8_at(off + 5) == Some(HANDSHAKE_CLIENT_HELLO as u8))
}

#[inline(always)]
fn ld(v: &u32) -> u32 {
    // SAFETY: a plain field; volatile keeps the parser state in memory.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn st(v: &mut u32, x: u32) {
    // SAFETY: as in `ld`.
    unsafe { core::ptr::write_volatile(v, x) }
}

/// Where a segment starting at sequence number `seq`, with payload
/// `off..end`, stands relative to what the parser has read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The segment starts past bytes the parser has not seen (reordered or
    /// after a loss).
    Ahead,
    /// All of it was read already (a retransmission).
    Behind,
    /// Unread bytes start at this offset.
    At(usize),
}

#[inline(always)]
pub fn resume(h: &Hello, seq: u32, off: usize, end: usize) -> Resume {
    resume_at(ld(&h.next_seq), seq, off, end)
}

/// `resume` for a parser expecting sequence number `next_seq`.
#[inline(always)]
pub fn resume_at(next_seq: u32, seq: u32, off: usize, end: usize) -> Resume {
    let read = next_seq.wrapping_sub(seq) as i32;
    if read < 0 {
        return Resume::Ahead;
    }
    let start = off + read as usize;
    if start >= end { Resume::Behind } else { Resume::At(start) }
}

/// Feeds the segment bytes `off..end` (which start at the parser's
/// `next_seq`) to the parser, for at most `MAX_STEPS` steps.
#[inline(always)]
pub fn feed<P: Packet + ?Sized>(h: &mut Hello, p: &P, off: usize, end: usize) -> Progress {
    st(&mut h.cursor, off as u32);
    let base = ld(&h.next_seq).wrapping_sub(off as u32);
    st(&mut h.base, base);
    st(&mut h.done, DONE_NOT_YET);
    for _ in 0..MAX_STEPS {
        step(h, p, end);
        if ld(&h.done) != DONE_NOT_YET {
            break;
        }
    }
    // Steps that ran out just as the segment did: the segment is read (a
    // name it completed is reported now, not lost to a next round that
    // finds nothing left to read).
    if ld(&h.done) == DONE_NOT_YET && ld(&h.cursor) as usize >= end {
        st(&mut h.done, DONE_NEED_MORE);
    }
    let consumed = ld(&h.cursor).wrapping_sub(off as u32);
    let next_seq = ld(&h.next_seq).wrapping_add(consumed);
    st(&mut h.next_seq, next_seq);
    let done = ld(&h.done);
    let flags = ld(&h.flags);
    if flags & Hello::FLAG_NAME == 0 {
        return match done {
            DONE_NOT_YET => Progress::StepsExhausted,
            DONE_NEED_MORE => Progress::NeedMore,
            DONE_END => Progress::NoName,
            _ => Progress::NotHello,
        };
    }
    // After the name: a format error ends the walk, and the name's verdict
    // stands (the name was read whole and checked).
    match done {
        DONE_NOT_YET => return Progress::StepsExhausted,
        DONE_END | DONE_NOT_HELLO => h.set(Hello::FLAG_END),
        _ => {}
    }
    if ld(&h.flags) & Hello::FLAG_REPORTED == 0 {
        h.set(Hello::FLAG_REPORTED);
        return Progress::Name(ld(&h.canon_len) as usize);
    }
    if done == DONE_NEED_MORE { Progress::NeedMore } else { Progress::End }
}

/// Reports a name complete in a call that ran out of steps (the kernel's
/// tail-call chain is at its end): the name's verdict applies, the walk
/// after it (ECH) stays unfinished. `None` if no name is complete, or it was
/// reported already.
pub fn name_so_far(h: &mut Hello) -> Option<usize> {
    let flags = ld(&h.flags);
    if flags & Hello::FLAG_NAME == 0 || flags & Hello::FLAG_REPORTED != 0 {
        return None;
    }
    h.set(Hello::FLAG_REPORTED | Hello::FLAG_END | Hello::FLAG_CUT);
    Some(ld(&h.canon_len) as usize)
}

// Outcomes, kept in `Hello::done`.
const DONE_NOT_YET: u32 = 0;
const DONE_NEED_MORE: u32 = 1;
/// The extensions (the hello) ended.
const DONE_END: u32 = 3;
const DONE_NOT_HELLO: u32 = 4;

/// One parser step. Every branch ends by storing what it decided, and what
/// follows reads it back: the paths through a step rejoin as one state.
#[inline(always)]
fn step<P: Packet + ?Sized>(h: &mut Hello, p: &P, end: usize) {
    let pos = ld(&h.cursor) as usize;
    if pos >= end {
        st(&mut h.done, DONE_NEED_MORE);
        return;
    }
    // The record layer: a 5-byte header before each record's payload.
    let rec_need = ld(&h.rec_need);
    if rec_need > 0 {
        record_byte(h, p, pos, rec_need);
        return;
    }
    let record_left = ld(&h.record_left);
    if record_left == 0 {
        st(&mut h.rec_need, 5);
        st(&mut h.rec_acc, 0);
        return;
    }
    read(h, p, pos, end, record_left);
    if ld(&h.done) != DONE_NOT_YET {
        return;
    }
    // Account for what was read.
    let taken = ld(&h.taken);
    st(&mut h.cursor, (pos as u32).wrapping_add(taken));
    st(&mut h.record_left, record_left.wrapping_sub(taken));
    if ld(&h.stage) != stage::HS_HEADER {
        let hello_left = ld(&h.hello_left);
        if taken > hello_left {
            st(&mut h.done, DONE_NOT_HELLO);
            return;
        }
        st(&mut h.hello_left, hello_left - taken);
    }
    if ld(&h.stage) >= stage::EXT_HEADER {
        let exts_left = ld(&h.exts_left);
        if taken > exts_left {
            st(&mut h.done, DONE_NOT_HELLO);
            return;
        }
        st(&mut h.exts_left, exts_left - taken);
    }
    let need = ld(&h.need).wrapping_sub(taken);
    st(&mut h.need, need);
    if need == 0 {
        next_stage(h);
    }
}

/// A byte of a record header: type 22 (handshake), version, length.
#[inline(always)]
fn record_byte<P: Packet + ?Sized>(h: &mut Hello, p: &P, pos: usize, rec_need: u32) {
    let Some(b) = p.u8_at(pos) else {
        st(&mut h.done, DONE_NEED_MORE);
        return;
    };
    st(&mut h.cursor, pos as u32 + 1);
    if rec_need == 5 && b != CONTENT_HANDSHAKE {
        st(&mut h.done, DONE_NOT_HELLO);
        return;
    }
    let acc = ((ld(&h.rec_acc) << 8) | u32::from(b)) & 0xffff;
    st(&mut h.rec_acc, acc);
    st(&mut h.rec_need, rec_need - 1);
    if rec_need == 1 {
        if acc == 0 || acc > MAX_RECORD_LEN {
            st(&mut h.done, DONE_NOT_HELLO);
            return;
        }
        st(&mut h.record_left, acc);
    }
}

/// Reads (or skips) what the current stage takes from the bytes at `pos`,
/// within the record and the segment; stores the byte count in `taken`.
#[inline(always)]
fn read<P: Packet + ?Sized>(h: &mut Hello, p: &P, pos: usize, end: usize, record_left: u32) {
    let stage = ld(&h.stage);
    let need = ld(&h.need);
    let mut avail = (end - pos) as u32;
    if avail > record_left {
        avail = record_left;
    }
    let take = if avail < need { avail } else { need };
    if matches!(stage, stage::SKIP_VERSION_RANDOM | stage::SKIP_SESSION_ID | stage::SKIP_CIPHERS | stage::SKIP_COMPRESSION | stage::SKIP_EXT) {
        st(&mut h.taken, take);
    } else if stage == stage::NAME {
        match p.u8_at(pos) {
            Some(b) => name_byte(h, b, pos),
            None => st(&mut h.done, DONE_NEED_MORE),
        }
        st(&mut h.taken, 1);
    } else if take >= 2 {
        // A field of 1 to 4 bytes: two bytes per step where it can.
        match p.be16_at(pos) {
            Some(w) => {
                let acc = (ld(&h.acc) << 16) | u32::from(w);
                st(&mut h.acc, acc);
            }
            None => st(&mut h.done, DONE_NEED_MORE),
        }
        st(&mut h.taken, 2);
    } else {
        match p.u8_at(pos) {
            Some(b) => {
                let acc = (ld(&h.acc) << 8) | u32::from(b);
                st(&mut h.acc, acc);
            }
            None => st(&mut h.done, DONE_NEED_MORE),
        }
        st(&mut h.taken, 1);
    }
}

/// Moves on from the stage whose field is complete (its value in `acc`).
/// Each arm stores the next stage and what it needs (a zero-length field,
/// such as an empty extension, is completed by the next step).
#[inline(always)]
fn next_stage(h: &mut Hello) {
    let v = ld(&h.acc);
    st(&mut h.acc, 0);
    match ld(&h.stage) {
        stage::HS_HEADER if v >> 24 == HANDSHAKE_CLIENT_HELLO => {
            st(&mut h.hello_left, v & 0xff_ffff);
            go(h, stage::SKIP_VERSION_RANDOM, 34);
        }
        stage::SKIP_VERSION_RANDOM => go(h, stage::SESSION_ID_LEN, 1),
        stage::SESSION_ID_LEN => go(h, stage::SKIP_SESSION_ID, v),
        stage::SKIP_SESSION_ID => go(h, stage::CIPHERS_LEN, 2),
        stage::CIPHERS_LEN => go(h, stage::SKIP_CIPHERS, v),
        stage::SKIP_CIPHERS => go(h, stage::COMPRESSION_LEN, 1),
        stage::COMPRESSION_LEN => go(h, stage::SKIP_COMPRESSION, v),
        stage::SKIP_COMPRESSION => go(h, stage::EXTENSIONS_LEN, 2),
        // The extensions are the hello's last field: they end where it does.
        stage::EXTENSIONS_LEN if v == ld(&h.hello_left) => {
            st(&mut h.exts_left, v);
            go(h, stage::EXT_HEADER, 4);
        }
        // Only the first server_name extension is read (a second one, which
        // RFC 8446 forbids, is skipped like any other).
        stage::EXT_HEADER if v >> 16 == EXT_SERVER_NAME && ld(&h.flags) & Hello::FLAG_NAME == 0 => {
            let flags = ld(&h.flags) | Hello::FLAG_SNI;
            st(&mut h.flags, flags);
            st(&mut h.sni_len, v & 0xffff);
            go(h, stage::SNI_LIST_LEN, 2);
        }
        stage::EXT_HEADER => {
            if v >> 16 == EXT_ECH {
                h.set(Hello::FLAG_ECH);
            }
            // An empty extension is skipped at once, so that the end of
            // the block is seen in the segment that ends with it.
            if v & 0xffff == 0 { go(h, stage::EXT_HEADER, 4) } else { go(h, stage::SKIP_EXT, v & 0xffff) }
        }
        stage::SKIP_EXT => go(h, stage::EXT_HEADER, 4),
        // The extension holds exactly the name list, and the list at least
        // the first name (RFC 6066): lengths that disagree are no hello.
        stage::SNI_LIST_LEN if v + 2 == ld(&h.sni_len) => {
            st(&mut h.sni_len, v);
            go(h, stage::SNI_NAME_TYPE, 1);
        }
        stage::SNI_NAME_TYPE if v == NAME_TYPE_HOST => go(h, stage::SNI_NAME_LEN, 2),
        stage::SNI_NAME_LEN if v >= 1 && v as usize <= MAX_DOTTED_LEN + 1 && v + 3 <= ld(&h.sni_len) => {
            st(&mut h.name_len, v);
            go(h, stage::NAME, v);
        }
        stage::NAME => finish_name(h),
        _ => st(&mut h.done, DONE_NOT_HELLO),
    }
    // The extensions block (the hello) ended.
    if ld(&h.stage) == stage::EXT_HEADER && ld(&h.exts_left) == 0 && ld(&h.done) == DONE_NOT_YET {
        st(&mut h.done, DONE_END);
    }
}

#[inline(always)]
fn go(h: &mut Hello, next: u32, need: u32) {
    st(&mut h.stage, next);
    st(&mut h.need, need);
}

/// One byte of the dotted server name, written in canonical form as
/// `dotted_to_canon` does: a byte at position `j` lands at `CANON_END - j`,
/// and a dot writes the length of the label before it.
#[inline(always)]
fn name_byte(h: &mut Hello, b: u8, pos: usize) {
    let j = ld(&h.name_pos);
    if j == 0 {
        let at = ld(&h.base).wrapping_add(pos as u32);
        st(&mut h.name_seq, at);
    }
    let at = (CANON_END - (j as usize & CANON_END)) & CANON_END;
    if b == b'.' {
        let len = j.wrapping_sub(ld(&h.label_start));
        if len == 0 || len as usize > MAX_LABEL_LEN {
            st(&mut h.done, DONE_NOT_HELLO);
            return;
        }
        h.name[at] = len as u8;
        h.name[256 + at] = 1;
        st(&mut h.label_start, j + 1);
    } else {
        h.name[at] = ascii_lower(b);
        h.name[256 + at] = 0;
    }
    st(&mut h.name_pos, j + 1);
}

/// Closes the last label (a trailing dot is allowed and ignored) and stores
/// the canonical length.
#[inline(always)]
fn finish_name(h: &mut Hello) {
    let n = ld(&h.name_len);
    let len = n.wrapping_sub(ld(&h.label_start));
    if len == 0 {
        // "name." : the dot already closed the last label.
        if n < 2 {
            st(&mut h.done, DONE_NOT_HELLO);
            return;
        }
        st(&mut h.canon_len, n);
    } else {
        if n as usize > MAX_DOTTED_LEN || len as usize > MAX_LABEL_LEN {
            st(&mut h.done, DONE_NOT_HELLO);
            return;
        }
        let at = (CANON_END - (n as usize & CANON_END)) & CANON_END;
        h.name[at] = len as u8;
        h.name[256 + at] = 1;
        st(&mut h.canon_len, n + 1);
    }
    h.set(Hello::FLAG_NAME);
    // Walk on: the rest of the name list (other names are not read), then
    // the other extensions' headers, for ECH. `sni_len` holds the list's
    // length, which covers the name's type and length fields.
    let rest = ld(&h.sni_len).wrapping_sub(n + 3);
    if rest == 0 { go(h, stage::EXT_HEADER, 4) } else { go(h, stage::SKIP_EXT, rest) }
}
