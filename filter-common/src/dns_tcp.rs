//! DNS over TCP as a stream: every message of a connection (a 2-byte length
//! prefix, then the message, RFC 1035 4.2.2 and RFC 7766), read across
//! segments however they are cut, one after another on the same connection.
//!
//! The reader copies the first `READ_CAP` bytes of each message (prefix,
//! header, the longest name, QTYPE and QCLASS: all a question can occupy)
//! into the flow's buffer and skips the rest of the message in one step.
//! When those bytes are in (`Progress::Question`), the caller reads the
//! question with the one DNS parser (`dns::parse_query`) over the buffer,
//! matches it, and feeds on. Nothing is read past the question, so the
//! state is bounded (`Query`, 544 bytes) whatever the message's length.

use crate::{
    dns::{DNS_HEADER_LEN, MAX_WIRE_NAME},
    flow::KIND_DNS,
    packet::Packet,
    tls::{Resume, resume_at},
};

/// Bytes of a message read: its prefix, header, longest name, QTYPE and
/// QCLASS. A question that does not end within them is malformed (its
/// name is longer than 255 bytes), so nothing past them decides anything.
pub const READ_CAP: usize = 2 + DNS_HEADER_LEN + MAX_WIRE_NAME + 4;
/// The buffer: a power of two above `READ_CAP`, so an index masked with
/// `BUF_LEN - 1` is in bounds for the verifier.
pub const BUF_LEN: usize = 512;
/// Steps per `feed`: one per byte copied, one per run skipped. A common
/// query (under 64 bytes) is read in one call; the longest question takes
/// five (`Progress::StepsExhausted`: the kernel goes on in a new round).
/// A loop this short is what the pre-6.7 verifiers accept: a whole
/// question's 275 steps in one call made the stage too large for 6.1.
pub const MAX_STEPS: usize = 64;

/// The kernel's limit on tail calls in one packet's chain
/// (`MAX_TAIL_CALL_CNT`): each question costs three (to the question
/// program, the match stage and back), so 10 short questions are read per
/// segment.
pub const MAX_TAIL_CALLS: usize = 33;

/// The per-flow reader. Starts as `flow::Flow` requires: `next_seq`,
/// `kind`, `passed_seq`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Query {
    /// TCP sequence number of the next byte the reader expects.
    pub next_seq: u32,
    /// `flow::KIND_DNS`.
    pub kind: u32,
    /// See `flow::Flow::passed_seq`.
    pub passed_seq: u32,
    /// Never set: a DNS flow is not blocked as a whole (see README,
    /// "DNS over TCP split across segments").
    pub flags: u32,
    /// Bytes of the current message (its prefix included) read so far.
    pos: u32,
    /// Its length with the prefix; 0 until the prefix is read.
    total: u32,
    /// Per segment: the offset being read.
    cursor: u32,
    /// Where the question's bytes end in `buf` (`Progress::Question`), for
    /// the kernel's question program.
    pub cursor_end: u32,
    /// Rounds (tail calls) spent on the current segment; 0 between
    /// segments (the kernel's per-CPU working copy uses it to tell a new
    /// segment from a round of the same one).
    pub rounds: u32,
    /// The current message's first `READ_CAP` bytes.
    pub buf: [u8; BUF_LEN],
}

/// What `feed` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The segment is read; a message may be under way.
    NeedMore,
    /// The current message's question bytes are in: `buf[2..end]` holds the
    /// message (or its first `READ_CAP - 2` bytes). The reader goes on
    /// from the next byte once the caller is done with it.
    Question { end: usize },
    /// The steps ran out before the segment did: feed on from `next_seq`.
    StepsExhausted,
    /// A byte of a question lies past what the kernel reads into a packet
    /// (`packet::MAX_PACKET_OFFSET`, jumbo frames only): the caller holds
    /// the segment back rather than pass it unread.
    Unreadable,
}

impl Query {
    /// A reader at the start of a message at sequence number `seq`.
    #[inline(always)]
    pub fn reset(&mut self, seq: u32) {
        self.next_seq = seq;
        self.kind = KIND_DNS;
        self.passed_seq = seq;
        self.flags = 0;
        self.pos = 0;
        self.total = 0;
        self.cursor = 0;
        self.cursor_end = 0;
        self.rounds = 0;
    }

    /// A reader at sequence number `seq` (host use).
    pub fn new(seq: u32) -> Self {
        let mut q = Query { next_seq: 0, kind: 0, passed_seq: 0, flags: 0, pos: 0, total: 0, cursor: 0, cursor_end: 0, rounds: 0, buf: [0; BUF_LEN] };
        q.reset(seq);
        q
    }

    /// Whether the reader stands between two messages: a flow there needs
    /// no buffer, only where the next message starts (`next_seq`).
    #[inline(always)]
    pub fn between(&self) -> bool {
        let (pos, total) = (ld(&self.pos), ld(&self.total));
        pos == 0 || (total != 0 && pos >= total)
    }
}

/// `tls::resume` for the DNS reader.
#[inline(always)]
pub fn resume(q: &Query, seq: u32, off: usize, end: usize) -> Resume {
    resume_at(ld(&q.next_seq), seq, off, end)
}

/// Feeds the segment bytes `off..end` (which start at the reader's
/// `next_seq`): copies message bytes up to `READ_CAP`, skips the rest,
/// message after message, until the segment ends or a question is in.
#[inline(always)]
pub fn feed<P: Packet + ?Sized>(q: &mut Query, p: &P, off: usize, end: usize) -> Progress {
    st(&mut q.cursor, off as u32);
    let mut question = false;
    let mut stopped = false;
    for _ in 0..MAX_STEPS {
        if step(q, p, end, &mut question) {
            stopped = true;
            break;
        }
    }
    let cursor = ld(&q.cursor);
    let unread = !question && (cursor as usize) < end;
    let consumed = cursor.wrapping_sub(off as u32);
    let next_seq = ld(&q.next_seq).wrapping_add(consumed);
    st(&mut q.next_seq, next_seq);
    if question {
        let total = ld(&q.total) as usize;
        return Progress::Question { end: if total < READ_CAP { total } else { READ_CAP } };
    }
    match (unread, stopped) {
        (false, _) => Progress::NeedMore,
        (true, false) => Progress::StepsExhausted,
        (true, true) => Progress::Unreadable,
    }
}

/// One byte copied, or one run skipped. Returns whether to stop: the
/// segment is read, or a question is in (`question`).
#[inline(always)]
fn step<P: Packet + ?Sized>(q: &mut Query, p: &P, end: usize, question: &mut bool) -> bool {
    let cursor = ld(&q.cursor) as usize;
    if cursor >= end {
        return true;
    }
    let pos = ld(&q.pos) as usize;
    let total = ld(&q.total) as usize;
    // A message read whole (or to the cap): skip to its end, then the next
    // message starts.
    if total != 0 && pos >= total.min(READ_CAP) {
        let skip = (total - pos).min(end - cursor);
        st(&mut q.cursor, (cursor + skip) as u32);
        if pos + skip >= total {
            st(&mut q.pos, 0);
            st(&mut q.total, 0);
        } else {
            st(&mut q.pos, (pos + skip) as u32);
        }
        return false;
    }
    // A byte past what the kernel reads into a packet: the segment stops
    // here, unread (`Progress::Unreadable`).
    let Some(b) = p.u8_at(cursor) else { return true };
    q.buf[pos & (BUF_LEN - 1)] = b;
    let pos = pos + 1;
    st(&mut q.pos, pos as u32);
    st(&mut q.cursor, (cursor + 1) as u32);
    let total = if pos == 2 {
        let t = 2 + ((q.buf[0] as usize) << 8 | q.buf[1] as usize);
        st(&mut q.total, t as u32);
        t
    } else {
        total
    };
    if total != 0 && pos >= total.min(READ_CAP) {
        *question = true;
        return true;
    }
    false
}

#[inline(always)]
fn ld(v: &u32) -> u32 {
    // SAFETY: a plain field; volatile keeps the reader's state in memory.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn st(v: &mut u32, x: u32) {
    // SAFETY: as in `ld`.
    unsafe { core::ptr::write_volatile(v, x) }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{dns::parse_query, name::CanonBuf};
    use std::{vec, vec::Vec};

    fn message(name: &[u8]) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(name);
        m.extend_from_slice(&[0, 1, 0, 1]);
        let mut s = (m.len() as u16).to_be_bytes().to_vec();
        s.extend_from_slice(&m);
        s
    }

    /// Feeds `stream` cut at `cuts`, in order; returns the canonical
    /// lengths of the questions read.
    fn read(stream: &[u8], cuts: &[usize]) -> Vec<usize> {
        let mut q = Query::new(100);
        let mut found = Vec::new();
        let mut bounds = cuts.to_vec();
        bounds.insert(0, 0);
        bounds.push(stream.len());
        for w in bounds.windows(2) {
            let seg = &stream[w[0]..w[1]];
            let Resume::At(mut start) = resume(&q, 100 + w[0] as u32, 0, seg.len()) else { continue };
            loop {
                match feed(&mut q, seg, start, seg.len()) {
                    Progress::Question { end } => {
                        let mut buf = CanonBuf::default();
                        let parsed = parse_query(&q.buf[..], 2, end, &mut buf, |x| x).unwrap();
                        found.push(parsed.canon_len);
                    }
                    Progress::StepsExhausted => {}
                    _ => break,
                }
                match resume(&q, 100 + w[0] as u32, 0, seg.len()) {
                    Resume::At(s) => start = s,
                    _ => break,
                }
            }
        }
        found
    }

    #[test]
    fn every_cut_reads_every_question() {
        let mut stream = message(b"\x07blocked\x07example\x00");
        stream.extend_from_slice(&message(b"\x01a\x02bc\x00"));
        for cut in 0..=stream.len() {
            assert_eq!(read(&stream, &[cut]), [16, 5], "cut at {cut}");
        }
        let ones: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(read(&stream, &ones), [16, 5]);
    }

    #[test]
    fn long_messages_are_read_to_the_cap_and_skipped() {
        let mut m = message(b"\x01a\x00");
        m.extend_from_slice(&[0; 1000]);
        let len = (m.len() - 2) as u16;
        m[..2].copy_from_slice(&len.to_be_bytes());
        m.extend_from_slice(&message(b"\x01b\x00"));
        assert_eq!(read(&m, &[]), [2, 2]);
        assert_eq!(read(&m, &[300, 700]), [2, 2]);
    }

    #[test]
    fn the_reader_fits_the_flow_value() {
        assert!(core::mem::size_of::<Query>() <= core::mem::size_of::<crate::flow::Flow>());
        const { assert!(READ_CAP < BUF_LEN) };
    }
}
