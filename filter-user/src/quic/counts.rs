//! The daemon's QUIC counters (`blokir_quic_*` on /metrics).

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (microseconds) of the verdict-latency histogram buckets:
/// from the Initial's handoff in the kernel to the verdict in the map.
pub const LATENCY_BUCKETS_US: [u64; 8] = [50, 100, 250, 500, 1000, 2500, 10_000, 100_000];

#[derive(Debug, Default)]
pub struct QuicCounts {
    /// Datagrams read from the kernel, by outcome.
    pub initials: AtomicU64,
    pub undecryptable: AtomicU64,
    pub gave_up: AtomicU64,
    pub not_hello: AtomicU64,
    pub no_name: AtomicU64,
    /// Hellos whose name was read, and what they got.
    pub names: AtomicU64,
    pub blocked: AtomicU64,
    pub allowed: AtomicU64,
    /// Datagrams the kernel lost (its perf buffer full).
    pub lost: AtomicU64,
    /// Verdicts written, by latency bucket (the last one: slower).
    pub latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    pub latency_sum_us: AtomicU64,
}

impl QuicCounts {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn latency(&self, us: u64) {
        let i = LATENCY_BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(LATENCY_BUCKETS_US.len());
        Self::add(&self.latency[i], 1);
        Self::add(&self.latency_sum_us, us);
    }

    /// The counters by outcome, for /metrics.
    pub fn outcomes(&self) -> [(&'static str, u64); 9] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("read", g(&self.initials)),
            ("undecryptable", g(&self.undecryptable)),
            ("gave_up", g(&self.gave_up)),
            ("not_hello", g(&self.not_hello)),
            ("no_name", g(&self.no_name)),
            ("name", g(&self.names)),
            ("blocked", g(&self.blocked)),
            ("allowed", g(&self.allowed)),
            ("lost", g(&self.lost)),
        ]
    }
}
