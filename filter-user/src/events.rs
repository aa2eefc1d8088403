//! The opt-in event log of blocked names (`blokir run --event-log`).
//!
//! The kernel writes one small record per sampled block to a BPF ring buffer
//! (Linux 5.8+): protocol, address family, rule and the canonical name the
//! stage matched; never an address or a port. With the log off the kernel
//! writes nothing (one config read per block). Sampling is per rule and in
//! the kernel (`--event-log-sample 1/N`: a rule's 1st, N+1th, ... block), so
//! a flood of one name costs the ring buffer 1/N of its bandwidth; the rate
//! limit (`--event-log-rate N/s`, a token bucket) is applied here, where it
//! is simple and exact, and what it holds back is counted and reported.
//! QUIC blocks are decided here (the daemon reads the Initials), so they are
//! sampled here, the same way, and go through the same rate limit.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use aya::maps::{MapData, RingBuf};
use filter_common::{
    counters::Proto,
    name::{CANON_CAP, MAX_CANON_LEN},
    packet::Af,
    rules::{BlockEvent, RuleRef},
};
use tokio::io::{Interest, unix::AsyncFd};

use crate::daemon::{Shared, lock};

/// The tracing target of the events (filter with `RUST_LOG=blokir::events=info`).
pub const TARGET: &str = "blokir::events";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventLog {
    /// One event per `sample` blocks of each rule.
    pub sample: u32,
    /// Events logged per second at most (and in a burst).
    pub rate: u32,
}

/// Events logged and held back by the rate limit, for /metrics.
#[derive(Debug, Default)]
pub struct EventCounts {
    pub logged: AtomicU64,
    pub suppressed: AtomicU64,
}

/// `N` or `N/s`, at least 1.
pub fn parse_rate(s: &str) -> Result<u32, String> {
    let n = s.strip_suffix("/s").unwrap_or(s);
    n.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| format!("{s:?}: expected a number of events per second, such as 100/s"))
}

/// `1/N` or `N`, at least 1.
pub fn parse_sample(s: &str) -> Result<u32, String> {
    let n = s.strip_prefix("1/").unwrap_or(s);
    n.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| format!("{s:?}: expected 1/N (one event per N blocks of each rule), such as 1/10"))
}

/// The dotted name of a canonical name (`[3]"gro" [8]"margelet"` ->
/// `telegram.org`), or `None` if the record does not hold a whole one.
pub fn dotted(canon: &[u8]) -> Option<String> {
    let mut labels = Vec::new();
    let mut i = 0;
    while i < canon.len() {
        let l = canon[i] as usize;
        let label = canon.get(i + 1..i + 1 + l).filter(|_| l > 0)?;
        labels.push(label.iter().rev().map(|b| *b as char).collect::<String>());
        i += 1 + l;
    }
    labels.reverse();
    (!labels.is_empty()).then(|| labels.join("."))
}

fn name_of(ev: &BlockEvent) -> Option<String> {
    let start = ev.start as usize;
    if !(CANON_CAP - MAX_CANON_LEN..CANON_CAP).contains(&start) {
        return None;
    }
    dotted(&ev.name[start..])
}

fn proto_name(p: u32) -> &'static str {
    Proto::ALL.iter().find(|x| **x as u32 == p).map_or("unknown", |x| x.name())
}

fn af_name(a: u32) -> &'static str {
    Af::ALL.iter().find(|x| **x as u32 == a).map_or("unknown", |x| x.name())
}

/// A token bucket: `rate` tokens a second, at most `rate` saved.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The log's one writer, shared by the ring buffer's reader and the QUIC
/// reader.
#[derive(Clone)]
pub struct Events {
    log: EventLog,
    counts: Arc<EventCounts>,
    limit: Arc<Mutex<Limit>>,
}

struct Limit {
    bucket: Bucket,
    held_back: u64,
    /// QUIC blocks per rule, for the sampling (bounded by the rules).
    quic_blocks: HashMap<u32, u64>,
}

impl Events {
    pub fn new(log: EventLog, counts: Arc<EventCounts>) -> Self {
        let bucket = Bucket { rate: f64::from(log.rate), tokens: f64::from(log.rate), at: Instant::now() };
        Events { log, counts, limit: Arc::new(Mutex::new(Limit { bucket, held_back: 0, quic_blocks: HashMap::new() })) }
    }

    /// A QUIC flow blocked by `rule` (its `name`, dotted), logged if the
    /// rule's sample takes it, as the kernel samples the other protocols.
    pub fn quic_block(&self, shared: &Shared, af: Af, rule: RuleRef, name: Option<String>) {
        let sampled = {
            let mut limit = self.limit.lock().unwrap_or_else(|e| e.into_inner());
            let n = limit.quic_blocks.entry(rule.id()).or_default();
            *n += 1;
            (*n - 1).is_multiple_of(u64::from(self.log.sample))
        };
        if sampled {
            self.emit(shared, Proto::Quic.name(), af.name(), rule, name);
        }
    }

    /// One sampled block, logged within the rate limit (`shared` is locked
    /// here: never call with it held).
    fn emit(&self, shared: &Shared, proto: &str, af: &str, rule: RuleRef, name: Option<String>) {
        {
            let mut limit = self.limit.lock().unwrap_or_else(|e| e.into_inner());
            if !limit.bucket.take() {
                limit.held_back += 1;
                self.counts.suppressed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if limit.held_back > 0 {
                tracing::warn!(target: TARGET, suppressed = limit.held_back, "events over --event-log-rate were not logged");
                limit.held_back = 0;
            }
        }
        let (list, rule) = {
            let state = lock(shared);
            let info = state.engine.rule(rule.id());
            (
                info.as_ref().and_then(|i| state.engine.list_name(i.list)).unwrap_or("?").to_string(),
                info.map(|i| i.rule.to_string()).unwrap_or_else(|| "?".into()),
            )
        };
        let name = name.unwrap_or_else(|| "?".into());
        self.counts.logged.fetch_add(1, Ordering::Relaxed);
        tracing::info!(target: TARGET, proto, af, list, rule, name, "blocked");
    }
}

/// Reads the ring buffer until the daemon stops, logging each event within
/// the rate limit.
pub async fn run(ring: RingBuf<MapData>, shared: Shared, events: Events) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd and keeps it open, the same
    // one, for as long as the AsyncFd owns the ring buffer.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        // `emit` takes the daemon's lock, which a list swap holds for
        // seconds: off the runtime's workers, which serve /metrics.
        tokio::task::block_in_place(|| {
            while let Some(item) = ring.next() {
                if item.len() < size_of::<BlockEvent>() {
                    continue;
                }
                // SAFETY: the kernel wrote a whole BlockEvent (checked size).
                let ev: BlockEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                drop(item);
                events.emit(&shared, proto_name(ev.proto), af_name(ev.af), ev.rule, name_of(&ev));
            }
        });
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use filter_common::name::{CanonBuf, canon_start, dotted_to_canon};

    use super::*;

    #[test]
    fn canonical_names_read_back_as_dotted() {
        for n in ["t.me", "web.telegram.org", "a.b.c.d.example", "x"] {
            let mut b = CanonBuf::default();
            let len = dotted_to_canon(n.as_bytes(), 0, n.len(), &mut b).unwrap();
            let start = canon_start(len);
            assert_eq!(dotted(&b.bytes[start..]).as_deref(), Some(n));
            let ev = BlockEvent { proto: 0, af: 0, rule: Default::default(), start: start as u32, name: b.bytes };
            assert_eq!(name_of(&ev).as_deref(), Some(n));
        }
        assert_eq!(dotted(&[3, b'a']), None);
        assert_eq!(dotted(&[0]), None);
    }

    #[test]
    fn rates_and_samples_parse() {
        assert_eq!(parse_rate("100/s"), Ok(100));
        assert_eq!(parse_rate("5"), Ok(5));
        assert!(parse_rate("0").is_err() && parse_rate("x/s").is_err());
        assert_eq!(parse_sample("1/10"), Ok(10));
        assert_eq!(parse_sample("1"), Ok(1));
        assert!(parse_sample("1/0").is_err() && parse_sample("2/3").is_err());
    }
}
