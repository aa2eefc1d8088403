//! HTTP/1 request Host names, read as a stream.
//!
//! A plain HTTP request may arrive in any number of TCP segments (1-byte
//! segments, or the Host header cut anywhere, are classic evasions), so the
//! parser keeps its state per flow in a `Request` (the same LRU map value as
//! the TLS parser's `Hello`, see `flow::Flow`) and consumes each segment's
//! bytes where the last one stopped, one byte per step:
//!
//! - the method token and a space, one of `METHODS` (case-sensitive, as
//!   servers read it); anything else is not a request;
//! - the request target: an absolute-form target (`GET http://name/ ...`,
//!   what clients send to proxies) names the host itself, and servers then
//!   ignore the Host header (RFC 9112 3.2.2), so its authority is the name;
//!   any other target is skipped to the end of the line;
//! - header lines: a line whose name is `Host` (any case) followed by `:`
//!   gives the name (optional whitespace, then the value up to `:port`, `/`,
//!   whitespace or the line's end); other lines are skipped; an empty line
//!   ends the head without a Host (HTTP/1.0);
//! - every Host header counts: after the name the parser reads on to the
//!   end of the head (the name is reported at the end of the segment that
//!   completed it, or at the head's end, whichever comes first), and a
//!   second Host header (a first one after an absolute-form target) is
//!   `HostRepeat`: some servers serve the second of two, so a request with
//!   two is blocked whatever they name (RFC 9112 3.2 has servers refuse it
//!   with 400 anyway);
//! - the name is written straight into canonical form (lowercased, one
//!   trailing dot ignored), as the TLS parser does; bytes that cannot be in
//!   a domain name (letters, digits, `-`, `_`, `.`) make it no name (IP
//!   literals in brackets, garbage), passed.
//!
//! The parser gives up after `MAX_HEAD_BYTES` bytes without finding the name:
//! such a flow is blocked (as TLS blocks hellos too complex to read), since
//! passing it would let anyone pad a request past the limit to slip a listed
//! Host through, and common servers refuse request heads that long anyway.
//!
//! State is read from and written to memory at each step, as in `tls`, so the
//! kernel's step loop is verified once per step, not once per history.

use crate::{
    name::{CANON_END, CanonBuf, MAX_DOTTED_LEN, MAX_LABEL_LEN, ascii_lower},
    packet::Packet,
};

/// Request methods recognized at the start of a flow (RFC 9110 9.3 and PATCH),
/// each followed by a space.
pub const METHODS: [&[u8]; 9] = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE"];
/// The longest method.
const MAX_METHOD_LEN: u32 = 7;
/// Bytes of a request (request line and headers) read before the name must
/// be found. nginx refuses request lines over 8 KiB by default, Apache over
/// 8190 bytes; browsers, curl and Python send Host right after the request
/// line.
pub const MAX_HEAD_BYTES: u32 = 16 * 1024;
/// The default HTTP port.
pub const HTTP_PORT: u16 = 80;

/// Parser steps per call of `feed`: a step reads one byte, and when that
/// leaves the parser inside a line it skips (the request line's target, a
/// header other than Host), up to `SKIP_BYTES` more bytes to the line's end
/// in a tight loop. A step costs the verifier ~10k instructions, a skipped
/// byte ~150: a segment gets `MAX_STEPS * MAX_ROUNDS` (480) steps, enough for
/// a 253-byte name after a hundred header lines, and up to 15k bytes.
pub const MAX_STEPS: usize = 16;
/// Bytes of a skipped line read per step.
pub const SKIP_BYTES: usize = 32;
/// Rounds of `feed` per segment (see `tls::MAX_ROUNDS`).
pub const MAX_ROUNDS: usize = crate::tls::MAX_ROUNDS;

/// Where the parser is in the request.
mod stage {
    /// The method token, up to its space.
    pub const METHOD: u32 = 0;
    /// The first byte of the request target.
    pub const TARGET: u32 = 1;
    /// `http://` of an absolute-form target.
    pub const SCHEME: u32 = 2;
    /// The rest of a line, skipped.
    pub const LINE: u32 = 3;
    /// The start of a header line: matching `host:`.
    pub const HEADER_NAME: u32 = 4;
    /// A CR at the start of a line: the empty line ending the head.
    pub const END_CR: u32 = 5;
    /// Whitespace after `Host:`.
    pub const HOST_SPACE: u32 = 6;
    /// The name.
    pub const HOST: u32 = 7;
}

/// What a segment told the parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The request head continues in later segments.
    NeedMore,
    /// The name is complete: its canonical length is given.
    Name(usize),
    /// The head ended without a Host header.
    NoHost,
    /// The Host (or absolute target) is empty or not a domain name.
    BadHost,
    /// Not an HTTP request.
    NotRequest,
    /// A second Host header (see the module documentation).
    HostRepeat,
    /// The head ended after a name already reported.
    End,
    /// No name within `MAX_HEAD_BYTES`, or a segment the kernel cannot read
    /// to its end.
    TooLong,
    /// This call's steps ran out before the segment's end: call again.
    StepsExhausted,
}

/// The per-flow parser state. Starts as `flow::Flow` requires: `next_seq`,
/// `kind`, `passed_seq`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Request {
    /// TCP sequence number of the next byte the parser expects.
    pub next_seq: u32,
    /// `flow::KIND_HTTP`.
    pub kind: u32,
    /// See `flow::Flow::passed_seq`.
    pub passed_seq: u32,
    /// `FLAG_*`.
    pub flags: u32,
    stage: u32,
    /// Bytes of the current token matched (method, `host:`, `http://`).
    matched: u32,
    /// The method's bytes so far, big-endian (high word, low word).
    method_hi: u32,
    method_lo: u32,
    /// Bytes of the request read so far.
    scanned: u32,
    /// Name bytes read, and where the current label began.
    name_pos: u32,
    label_start: u32,
    /// Per segment: the offset being read, the outcome so far (`DONE_*`),
    /// the canonical length of a finished name.
    cursor: u32,
    done: u32,
    canon_len: u32,
    /// Rounds of `feed` (tail calls) spent on the current segment.
    pub rounds: u32,
    /// The sequence number of offset 0 of the segment being fed, and that
    /// of the name's first byte (see `tls::Hello`).
    base: u32,
    pub name_seq: u32,
    /// The name in canonical form as it is read (`bytes`, `starts`).
    pub name: [u8; 2 * 256],
}

impl Request {
    /// The flow is blocked: its later segments are dropped.
    pub const FLAG_BLOCKED: u32 = 1;
    /// The target is in absolute form: its authority is the name.
    const FLAG_ABSOLUTE: u32 = 2;
    /// The blocked flow's client segments are answered with a TCP RST.
    pub const FLAG_RESET: u32 = 4;
    /// The blocked connection's server end was sent a RST.
    pub const FLAG_SERVER_CLOSED: u32 = 8;
    /// A name was read (Host, or an absolute-form target): the parser reads
    /// on, watching for another Host header.
    const FLAG_NAMED: u32 = 16;
    /// A Host header line was met.
    const FLAG_HOST_SEEN: u32 = 32;
    /// The name was reported to the caller (`Progress::Name`).
    const FLAG_REPORTED: u32 = 64;
    /// The request head ended.
    const FLAG_ENDED: u32 = 128;
    /// The Host (or absolute-form target) was not a domain name.
    const FLAG_BAD: u32 = 256;
    /// The name passed and the head was read to its end: the flow is kept
    /// only so that later copies of the name's bytes are compared
    /// (`flow::rewritten`).
    pub const FLAG_WATCH: u32 = 512;

    /// A parser at the first byte of a request whose first segment starts
    /// at sequence number `seq`.
    pub fn new(seq: u32) -> Self {
        let mut r = Request {
            next_seq: 0,
            kind: 0,
            passed_seq: 0,
            flags: 0,
            stage: 0,
            matched: 0,
            method_hi: 0,
            method_lo: 0,
            scanned: 0,
            name_pos: 0,
            label_start: 0,
            cursor: 0,
            done: 0,
            canon_len: 0,
            rounds: 0,
            base: 0,
            name_seq: 0,
            name: [0; 512],
        };
        r.reset(seq);
        r
    }

    /// Resets the parser (not the name bytes, which are written before read).
    pub fn reset(&mut self, seq: u32) {
        (self.next_seq, self.passed_seq) = (seq, seq);
        self.kind = crate::flow::KIND_HTTP;
        self.stage = stage::METHOD;
        (self.flags, self.matched, self.method_hi, self.method_lo, self.scanned) = (0, 0, 0, 0, 0);
        (self.name_pos, self.label_start, self.cursor, self.done, self.canon_len, self.rounds) = (0, 0, 0, 0, 0, 0);
        (self.base, self.name_seq) = (0, 0);
    }

    /// The name passed and the parser is done: the flow is only watched
    /// for rewritten copies of the name (`FLAG_WATCH`).
    pub fn watch(&mut self) {
        let flags = ld(&self.flags) | Request::FLAG_WATCH;
        st(&mut self.flags, flags);
    }

    pub fn watched(&self) -> bool {
        ld(&self.flags) & Request::FLAG_WATCH != 0
    }

    /// The name bytes read so far: where they start, and how many.
    pub fn name_read(&self) -> (u32, u32) {
        (ld(&self.name_seq), ld(&self.name_pos))
    }

    /// Marks the flow blocked; with `reset`, its client segments are
    /// answered with a TCP RST.
    pub fn block(&mut self, reset: bool) {
        let flags = ld(&self.flags) | Request::FLAG_BLOCKED | if reset { Request::FLAG_RESET } else { 0 };
        st(&mut self.flags, flags);
    }

    pub fn is_blocked(&self) -> bool {
        ld(&self.flags) & Request::FLAG_BLOCKED != 0
    }

    /// Whether the blocked connection's server end was sent a RST.
    pub fn server_closed(&self) -> bool {
        ld(&self.flags) & Request::FLAG_SERVER_CLOSED != 0
    }

    /// A blocked flow whose segments are answered with a TCP RST.
    pub fn resets(&self) -> bool {
        ld(&self.flags) & Request::FLAG_RESET != 0
    }

    /// Whether the request head ended: a flow whose name passed is kept
    /// until then, for a second Host header.
    pub fn ended(&self) -> bool {
        ld(&self.flags) & Request::FLAG_ENDED != 0
    }

    /// Copies the finished name into a matcher buffer.
    pub fn copy_name(&self, buf: &mut CanonBuf) {
        buf.bytes.copy_from_slice(&self.name[..256]);
        buf.starts.copy_from_slice(&self.name[256..]);
    }
}

/// Whether a segment that starts a flow can start a request: its first byte
/// starts one of `METHODS`. (The parser checks the rest.)
#[inline(always)]
pub fn starts_request<P: Packet + ?Sized>(p: &P, off: usize, end: usize) -> bool {
    off < end && matches!(p.u8_at(off), Some(b'G' | b'P' | b'H' | b'D' | b'O' | b'C' | b'T'))
}

/// Where a segment starting at `seq` stands relative to what was read.
#[inline(always)]
pub fn resume(r: &Request, seq: u32, off: usize, end: usize) -> crate::tls::Resume {
    crate::tls::resume_at(ld(&r.next_seq), seq, off, end)
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

// Outcomes, kept in `Request::done`.
const DONE_NOT_YET: u32 = 0;
const DONE_NEED_MORE: u32 = 1;
const DONE_NAME: u32 = 2;
const DONE_NO_HOST: u32 = 3;
const DONE_BAD_HOST: u32 = 4;
const DONE_NOT_REQUEST: u32 = 5;
const DONE_TOO_LONG: u32 = 6;
const DONE_HOST_REPEAT: u32 = 7;
const DONE_END: u32 = 8;

/// Feeds the segment bytes `off..end` (which start at the parser's
/// `next_seq`) to the parser, for at most `MAX_STEPS` bytes.
#[inline(always)]
pub fn feed<P: Packet + ?Sized>(r: &mut Request, p: &P, off: usize, end: usize) -> Progress {
    st(&mut r.cursor, off as u32);
    let base = ld(&r.next_seq).wrapping_sub(off as u32);
    st(&mut r.base, base);
    st(&mut r.done, DONE_NOT_YET);
    for _ in 0..MAX_STEPS {
        step(r, p, end);
        if ld(&r.stage) == stage::LINE && ld(&r.done) == DONE_NOT_YET {
            skip_line(r, p, end);
        }
        if ld(&r.done) != DONE_NOT_YET {
            break;
        }
    }
    let cursor = ld(&r.cursor);
    if ld(&r.done) == DONE_NOT_YET && cursor as usize >= end {
        st(&mut r.done, DONE_NEED_MORE);
    }
    // A name read in this segment is reported at its end.
    let flags = ld(&r.flags);
    if ld(&r.done) == DONE_NEED_MORE && flags & (Request::FLAG_NAMED | Request::FLAG_REPORTED) == Request::FLAG_NAMED {
        st(&mut r.done, DONE_NAME);
    }
    if ld(&r.done) == DONE_NAME {
        st(&mut r.flags, flags | Request::FLAG_REPORTED);
    }
    let consumed = cursor.wrapping_sub(off as u32);
    let next_seq = ld(&r.next_seq).wrapping_add(consumed);
    st(&mut r.next_seq, next_seq);
    match ld(&r.done) {
        DONE_NOT_YET => Progress::StepsExhausted,
        DONE_NEED_MORE => Progress::NeedMore,
        DONE_NAME => Progress::Name(ld(&r.canon_len) as usize),
        DONE_NO_HOST => Progress::NoHost,
        DONE_BAD_HOST => Progress::BadHost,
        DONE_TOO_LONG => Progress::TooLong,
        DONE_HOST_REPEAT => Progress::HostRepeat,
        DONE_END => Progress::End,
        _ => Progress::NotRequest,
    }
}

/// One byte. Every branch ends by storing what it decided.
#[inline(always)]
fn step<P: Packet + ?Sized>(r: &mut Request, p: &P, end: usize) {
    let pos = ld(&r.cursor) as usize;
    if pos >= end {
        st(&mut r.done, DONE_NEED_MORE);
        return;
    }
    let scanned = ld(&r.scanned);
    // A byte in the segment the kernel cannot read (past the offsets it
    // reads into a packet) would leave the rest of the flow unread.
    let Some(b) = p.u8_at(pos).filter(|_| scanned < MAX_HEAD_BYTES) else {
        st(&mut r.done, DONE_TOO_LONG);
        return;
    };
    st(&mut r.scanned, scanned + 1);
    st(&mut r.cursor, pos as u32 + 1);
    match ld(&r.stage) {
        stage::METHOD => method_byte(r, b),
        stage::TARGET => {
            if b == b'h' || b == b'H' {
                go(r, stage::SCHEME, 1);
            } else {
                line_byte(r, b);
            }
        }
        stage::SCHEME => {
            let m = ld(&r.matched);
            if ascii_lower(b) == byte_of(b"http://", m) {
                if m + 1 == 7 {
                    let flags = ld(&r.flags) | Request::FLAG_ABSOLUTE;
                    st(&mut r.flags, flags);
                    go(r, stage::HOST, 0);
                } else {
                    st(&mut r.matched, m + 1);
                }
            } else {
                line_byte(r, b);
            }
        }
        stage::LINE => line_byte(r, b),
        stage::HEADER_NAME => header_byte(r, b),
        stage::END_CR => {
            if b == b'\n' {
                head_end(r);
            } else {
                st(&mut r.done, DONE_NOT_REQUEST);
            }
        }
        stage::HOST_SPACE => {
            if b == b'\r' || b == b'\n' {
                bad_host(r, b);
            } else if b != b' ' && b != b'\t' {
                go(r, stage::HOST, 0);
                host_byte(r, b, pos);
            }
        }
        _ => host_byte(r, b, pos),
    }
}

/// Skips bytes of a line to its end (at most `SKIP_BYTES`); the segment's
/// end and the byte limit are left to the next step.
#[inline(always)]
fn skip_line<P: Packet + ?Sized>(r: &mut Request, p: &P, end: usize) {
    for _ in 0..SKIP_BYTES {
        let pos = ld(&r.cursor) as usize;
        let scanned = ld(&r.scanned);
        if pos >= end || scanned >= MAX_HEAD_BYTES {
            break;
        }
        let Some(b) = p.u8_at(pos) else { break };
        st(&mut r.cursor, pos as u32 + 1);
        st(&mut r.scanned, scanned + 1);
        if b == b'\n' {
            go(r, stage::HEADER_NAME, 0);
            break;
        }
    }
}

#[inline(always)]
fn go(r: &mut Request, next: u32, matched: u32) {
    st(&mut r.stage, next);
    st(&mut r.matched, matched);
}

/// Byte `i` of `s` (0 past its end).
#[inline(always)]
fn byte_of(s: &[u8], i: u32) -> u8 {
    s.get(i as usize).copied().unwrap_or(0)
}

/// A byte of the method token, or the space after it.
#[inline(always)]
fn method_byte(r: &mut Request, b: u8) {
    let m = ld(&r.matched);
    if b == b' ' {
        let (hi, lo) = (ld(&r.method_hi), ld(&r.method_lo));
        // An early exit per method: a flag or-ed over all of them would
        // be compiled to one stored 0/1 per method, and the verifier would
        // walk every combination.
        if METHOD_WORDS.contains(&(hi, lo)) {
            go(r, stage::TARGET, 0);
        } else {
            st(&mut r.done, DONE_NOT_REQUEST);
        }
    } else if b.is_ascii_uppercase() && m < MAX_METHOD_LEN {
        let (hi, lo) = (ld(&r.method_hi), ld(&r.method_lo));
        st(&mut r.method_hi, (hi << 8) | (lo >> 24));
        st(&mut r.method_lo, (lo << 8) | u32::from(b));
        st(&mut r.matched, m + 1);
    } else {
        st(&mut r.done, DONE_NOT_REQUEST);
    }
}

/// `METHODS` as `method_byte` accumulates them.
const METHOD_WORDS: [(u32, u32); METHODS.len()] = {
    let mut w = [(0, 0); METHODS.len()];
    let mut i = 0;
    while i < METHODS.len() {
        w[i] = method_words(METHODS[i]);
        i += 1;
    }
    w
};

/// A method's bytes as `method_byte` accumulates them.
const fn method_words(m: &[u8]) -> (u32, u32) {
    let (mut hi, mut lo) = (0u32, 0u32);
    let mut i = 0;
    while i < m.len() {
        hi = (hi << 8) | (lo >> 24);
        lo = (lo << 8) | m[i] as u32;
        i += 1;
    }
    (hi, lo)
}

/// A byte of a line being skipped: a line feed starts the next header line
/// (a bare LF ends a line too, as servers accept).
#[inline(always)]
fn line_byte(r: &mut Request, b: u8) {
    if b == b'\n' {
        go(r, stage::HEADER_NAME, 0);
    } else {
        go(r, stage::LINE, 0);
    }
}

/// A byte of a header line's start, matched against `host:`.
#[inline(always)]
fn header_byte(r: &mut Request, b: u8) {
    let m = ld(&r.matched);
    if m == 0 && b == b'\r' {
        go(r, stage::END_CR, 0);
    } else if m == 0 && b == b'\n' {
        head_end(r);
    } else if ascii_lower(b) == byte_of(b"host:", m) {
        if m + 1 == 5 {
            let flags = ld(&r.flags);
            if flags & Request::FLAG_HOST_SEEN != 0 {
                st(&mut r.done, DONE_HOST_REPEAT);
            } else {
                st(&mut r.flags, flags | Request::FLAG_HOST_SEEN);
                // After an absolute-form target, which names the host,
                // the first Host header is skipped.
                go(r, if flags & (Request::FLAG_NAMED | Request::FLAG_BAD) != 0 { stage::LINE } else { stage::HOST_SPACE }, 0);
            }
        } else {
            st(&mut r.matched, m + 1);
        }
    } else {
        line_byte(r, b);
    }
}

/// A byte of the name, written in canonical form as `dotted_to_canon` does:
/// a byte at position `j` lands at `CANON_END - j`, and a dot writes the
/// length of the label before it. The name ends at a port, a path, a query,
/// whitespace or the line's end.
#[inline(always)]
fn host_byte(r: &mut Request, b: u8, pos: usize) {
    let j = ld(&r.name_pos);
    if j == 0 {
        let at = ld(&r.base).wrapping_add(pos as u32);
        st(&mut r.name_seq, at);
    }
    let at = (CANON_END - (j as usize & CANON_END)) & CANON_END;
    if matches!(b, b':' | b'/' | b'?' | b'#' | b' ' | b'\t' | b'\r' | b'\n') {
        finish_name(r, b);
    } else if j as usize > MAX_DOTTED_LEN {
        bad_host(r, b);
    } else if b == b'.' {
        let len = j.wrapping_sub(ld(&r.label_start));
        if len == 0 || len as usize > MAX_LABEL_LEN {
            bad_host(r, b);
        } else {
            r.name[at] = len as u8;
            r.name[256 + at] = 1;
            st(&mut r.label_start, j + 1);
            st(&mut r.name_pos, j + 1);
        }
    } else if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
        r.name[at] = ascii_lower(b);
        r.name[256 + at] = 0;
        st(&mut r.name_pos, j + 1);
    } else {
        bad_host(r, b);
    }
}

/// The Host (or absolute-form target) is no domain name: the parser reads
/// on to the head's end (`BadHost` then), watching for another Host.
#[inline(always)]
fn bad_host(r: &mut Request, b: u8) {
    let flags = ld(&r.flags);
    st(&mut r.flags, flags | Request::FLAG_BAD);
    line_byte(r, b);
}

/// The empty line that ends the head.
#[inline(always)]
fn head_end(r: &mut Request) {
    let flags = ld(&r.flags) | Request::FLAG_ENDED;
    st(&mut r.flags, flags);
    let done = if flags & Request::FLAG_REPORTED != 0 {
        DONE_END
    } else if flags & Request::FLAG_NAMED != 0 {
        DONE_NAME
    } else if flags & Request::FLAG_BAD != 0 {
        DONE_BAD_HOST
    } else {
        DONE_NO_HOST
    };
    st(&mut r.done, done);
}

/// Closes the last label (a trailing dot is allowed and ignored) and stores
/// the canonical length; the parser reads on from `b`, the byte that ended
/// the name.
#[inline(always)]
fn finish_name(r: &mut Request, b: u8) {
    let n = ld(&r.name_pos);
    let len = n.wrapping_sub(ld(&r.label_start));
    if len == 0 {
        // Empty, or "name." : the dot already closed the last label.
        if n < 2 {
            bad_host(r, b);
            return;
        }
        st(&mut r.canon_len, n);
    } else {
        if n as usize > MAX_DOTTED_LEN || len as usize > MAX_LABEL_LEN {
            bad_host(r, b);
            return;
        }
        let at = (CANON_END - (n as usize & CANON_END)) & CANON_END;
        r.name[at] = len as u8;
        r.name[256 + at] = 1;
        st(&mut r.canon_len, n + 1);
    }
    let flags = ld(&r.flags);
    st(&mut r.flags, flags | Request::FLAG_NAMED);
    line_byte(r, b);
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{boxed::Box, vec::Vec};

    use super::*;
    use crate::name::{canon_start, dotted_to_canon};

    /// Parses `stream` cut at `cuts`, each piece a segment in order; returns
    /// the outcome and the name read (dotted form re-derived through the
    /// canonical form).
    fn parse(stream: &[u8], cuts: &[usize]) -> (Progress, Option<Vec<u8>>) {
        let seq0 = 1000u32;
        let mut r = Box::new(Request::new(seq0));
        let mut bounds: Vec<usize> = cuts.iter().copied().filter(|&c| c > 0 && c < stream.len()).collect();
        bounds.push(stream.len());
        let mut start = 0;
        let mut progress = Progress::NeedMore;
        for end in bounds {
            let seg = &stream[start..end];
            let seq = seq0.wrapping_add(start as u32);
            loop {
                let at = match resume(&r, seq, 0, seg.len()) {
                    crate::tls::Resume::At(at) => at,
                    other => panic!("in-order segment reported {other:?}"),
                };
                progress = feed(&mut r, seg, at, seg.len());
                if progress != Progress::StepsExhausted {
                    break;
                }
            }
            if progress != Progress::NeedMore {
                break;
            }
            start = end;
        }
        let name = match progress {
            Progress::Name(len) => {
                let mut buf = CanonBuf::default();
                r.copy_name(&mut buf);
                Some(buf.canon(len).to_vec())
            }
            _ => None,
        };
        (progress, name)
    }

    fn canon(dotted: &str) -> Vec<u8> {
        let mut buf = CanonBuf::default();
        let n = dotted_to_canon(dotted.as_bytes(), 0, dotted.len(), &mut buf).unwrap();
        assert_eq!(canon_start(n), 256 - n);
        buf.canon(n).to_vec()
    }

    #[test]
    fn reads_the_host_however_the_request_is_cut() {
        let req = b"GET /index.html HTTP/1.1\r\nUser-Agent: x\r\nHOST:  WWW.Example.COM.:8080\r\nAccept: */*\r\n\r\n";
        let want = Some(canon("www.example.com"));
        assert_eq!(parse(req, &[]).1, want);
        for cut in 0..req.len() {
            assert_eq!(parse(req, &[cut]).1, want, "cut at {cut}");
        }
        let every: Vec<usize> = (1..req.len()).collect();
        assert_eq!(parse(req, &every).1, want);
    }

    #[test]
    fn methods_targets_and_the_end_of_the_head() {
        for m in METHODS {
            let mut req = m.to_vec();
            req.extend_from_slice(b" / HTTP/1.1\r\nhost: a.example\r\n\r\n");
            assert_eq!(parse(&req, &[]).1, Some(canon("a.example")), "{}", std::str::from_utf8(m).unwrap());
        }
        assert_eq!(parse(b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n", &[]).0, Progress::NoHost);
        assert_eq!(parse(b"GET / HTTP/1.0\n\n", &[]).0, Progress::NoHost);
        assert_eq!(parse(b"get / HTTP/1.1\r\nHost: a\r\n\r\n", &[]).0, Progress::NotRequest);
        assert_eq!(parse(b"GETS / HTTP/1.1\r\nHost: a\r\n\r\n", &[]).0, Progress::NotRequest);
        assert_eq!(parse(b"GET\t/ HTTP/1.1\r\n", &[]).0, Progress::NotRequest);
        assert_eq!(parse(b"\x16\x03\x01", &[]).0, Progress::NotRequest);
        // An absolute-form target names the host; Host is then ignored.
        assert_eq!(parse(b"GET http://Proxy.Example:81/x HTTP/1.1\r\nHost: other.example\r\n\r\n", &[]).1, Some(canon("proxy.example")));
        assert_eq!(parse(b"GET HTTP://a.example HTTP/1.1\r\n\r\n", &[]).1, Some(canon("a.example")));
        // A path that merely starts with h is skipped.
        assert_eq!(parse(b"GET h/x HTTP/1.1\r\nHost: b.example\r\n\r\n", &[]).1, Some(canon("b.example")));
        // Header names that only start like Host, and Host in values.
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHostname: x.example\r\nX-Host: y.example\r\nHost:z.example\r\n\r\n", &[]).1, Some(canon("z.example")));
        // No name before the limit.
        let mut long = b"GET /".to_vec();
        long.resize(MAX_HEAD_BYTES as usize + 10, b'a');
        assert_eq!(parse(&long, &[]).0, Progress::TooLong);
        // Requests still in progress.
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a.exam", &[]).0, Progress::NeedMore);
    }

    #[test]
    fn host_values_that_are_not_names() {
        for v in ["", "[2001:db8::1]:80", "a..b", ".a", "a b", "ex@mple.com", "*.example", "a.example;x"] {
            let req = std::format!("GET / HTTP/1.1\r\nHost: {v}\r\n\r\n");
            let (p, _) = parse(req.as_bytes(), &[]);
            // "a b" reads "a"; the others are no names.
            if v == "a b" {
                assert_eq!(p, Progress::Name(2), "{v:?}");
            } else {
                assert_eq!(p, Progress::BadHost, "{v:?}");
            }
        }
        let long = std::format!("GET / HTTP/1.1\r\nHost: {}.{}.{}.{}\r\n\r\n", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61));
        assert_eq!(parse(long.as_bytes(), &[]).1, Some(canon(&long[22..22 + 253])));
        let too_long = std::format!("GET / HTTP/1.1\r\nHost: {}.{}.{}.{}\r\n\r\n", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(62));
        assert_eq!(parse(too_long.as_bytes(), &[]).0, Progress::BadHost);
        let label = std::format!("GET / HTTP/1.1\r\nHost: {}.example\r\n\r\n", "a".repeat(64));
        assert_eq!(parse(label.as_bytes(), &[]).0, Progress::BadHost);
    }

    /// Feeds the segments `cuts` make of `req` in order; every outcome.
    fn outcomes(req: &[u8], cuts: &[usize]) -> Vec<Progress> {
        let mut r = Box::new(Request::new(0));
        let mut bounds = cuts.to_vec();
        bounds.push(req.len());
        let (mut start, mut out) = (0, Vec::new());
        for end in bounds {
            let seg = &req[start..end];
            let progress = loop {
                let crate::tls::Resume::At(at) = resume(&r, start as u32, 0, seg.len()) else { panic!("not in order") };
                let p = feed(&mut r, seg, at, seg.len());
                if p != Progress::StepsExhausted {
                    break p;
                }
            };
            out.push(progress);
            // A name reported before the head's end leaves the flow read on.
            if !(progress == Progress::NeedMore || matches!(progress, Progress::Name(_)) && !r.ended()) {
                break;
            }
            start = end;
        }
        out
    }

    #[test]
    fn a_second_host_header_is_a_repeat_wherever_the_request_is_cut() {
        for (req, first) in [
            (&b"GET / HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\nhost:b.example\r\n\r\n"[..], Progress::Name(10)),
            (b"GET / HTTP/1.1\r\nHost: [::1]\r\nHost: b.example\r\n\r\n", Progress::NeedMore),
            (b"GET / HTTP/1.1\r\nHost:\r\nHost: b.example\r\n\r\n", Progress::NeedMore),
            (b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nHOST: b.example\r\n\r\n", Progress::Name(10)),
        ] {
            let what = std::string::String::from_utf8_lossy(req);
            assert_eq!(outcomes(req, &[]), [Progress::HostRepeat], "{what}");
            // Cut before the second Host: the first name is reported at
            // the end of its segment, the repeat with the next.
            let second = req.windows(6).rposition(|w| w.eq_ignore_ascii_case(b"\nhost:")).unwrap() + 1;
            assert_eq!(outcomes(req, &[second]), [first, Progress::HostRepeat], "{what}");
            // Cut at every byte.
            let every: Vec<usize> = (1..req.len()).collect();
            assert_eq!(outcomes(req, &every).last(), Some(&Progress::HostRepeat), "{what}");
        }
        // One Host after an absolute-form target is no repeat; neither is
        // a header that merely starts like Host.
        let one = b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nHostname: b\r\n\r\n";
        assert_eq!(parse(one, &[]).1, Some(canon("a.example")));
        assert_eq!(outcomes(one, &[]), [Progress::Name(10)]);
    }

    #[test]
    fn the_name_is_reported_once_and_the_head_read_to_its_end() {
        let req = b"GET / HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\n\r\n";
        // The first segment ends inside Accept: the name, then the end.
        assert_eq!(outcomes(req, &[40]), [Progress::Name(10), Progress::End]);
        assert_eq!(outcomes(req, &[40, 45]), [Progress::Name(10), Progress::NeedMore, Progress::End]);
        // Whole, or cut inside the name: the name at the head's end, or at
        // the end of the segment that completed it.
        assert_eq!(outcomes(req, &[]), [Progress::Name(10)]);
        assert_eq!(outcomes(req, &[25]), [Progress::NeedMore, Progress::Name(10)]);
    }

    #[test]
    fn method_words_are_distinct() {
        for (i, a) in METHODS.iter().enumerate() {
            assert!(a.len() as u32 <= MAX_METHOD_LEN);
            for b in &METHODS[i + 1..] {
                assert_ne!(method_words(a), method_words(b));
            }
        }
    }
}
