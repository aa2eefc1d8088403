//! The daemon's end of `--quic read`: the Initials the kernel's QUIC stage
//! hands up (a perf buffer per CPU) are read (`Reader`), matched with the
//! rules in force, and the blocked flows written into `QUIC_BLOCKED`, where
//! the stage drops their later datagrams; each verdict's rule is counted in
//! the per-rule and per-list hits, and each block in the event log (if on).

use std::{
    collections::HashMap as StdHashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Context as _;
use aya::maps::{MapData, PerfEventArray, perf::PerfEvent};
use filter_common::{
    name::{canon_start, match_canon},
    packet::{parse_l3, parse_udp},
    quic::InitialMeta,
    rules::RuleRef,
    tls::FlowKey,
};

use crate::{
    ebpf::QuicVerdicts,
    events::{Events, dotted},
};
use tokio::io::{Interest, unix::AsyncFd};

use super::{
    Event, Reader,
    counts::QuicCounts,
    verdict::{Verdict, verdict},
};
use crate::daemon::{Shared, lock};

/// Pages of each CPU's perf buffer (a datagram takes under half a page).
const PAGES: usize = 64;

struct Flows {
    reader: Reader,
    /// Flows whose name matched an ECH-outer rule before ECH was seen, and
    /// the name (dotted, for the event log).
    pending: StdHashMap<FlowKey, (RuleRef, Option<String>)>,
    verdicts: QuicVerdicts,
}

/// Reads every CPU's buffer until the daemon stops.
pub async fn run(
    mut perf: PerfEventArray<MapData>,
    verdicts: QuicVerdicts,
    shared: Shared,
    counts: Arc<QuicCounts>,
    events: Option<Events>,
) -> anyhow::Result<()> {
    let cpus = aya::util::online_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    let flows = Arc::new(Mutex::new(Flows { reader: Reader::default(), pending: StdHashMap::new(), verdicts }));
    let mut tasks = Vec::new();
    for cpu in cpus {
        let buf = perf.open(cpu, Some(PAGES)).with_context(|| format!("opening the QUIC perf buffer of CPU {cpu}"))?;
        // SAFETY: the buffer owns its perf event fd and keeps it open, the
        // same one, for as long as the AsyncFd owns the buffer.
        let mut fd = unsafe { AsyncFd::register_with_interest(buf, Interest::READABLE) }.context("polling a QUIC perf buffer")?;
        let (shared, counts, flows, events) = (shared.clone(), counts.clone(), flows.clone(), events.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok(mut guard) = fd.readable_mut().await else { return };
                let mut samples = Vec::new();
                guard.get_inner_mut().for_each(|ev| match ev {
                    PerfEvent::Sample { head, tail } => samples.push([head, tail].concat()),
                    PerfEvent::Lost { count } => QuicCounts::add(&counts.lost, count),
                });
                guard.clear_ready();
                // Matching takes the daemon's lock, which a list swap holds
                // for seconds: off the runtime's workers, which serve
                // /metrics and the control socket.
                tokio::task::block_in_place(|| {
                    for s in samples {
                        handle(&s, &shared, &counts, &flows, events.as_ref());
                    }
                });
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

/// `bpf_ktime_get_ns`'s clock.
fn ktime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One datagram handed up: `InitialMeta`, then the frame.
fn handle(sample: &[u8], shared: &Shared, counts: &QuicCounts, flows: &Mutex<Flows>, events: Option<&Events>) {
    let meta_len = size_of::<InitialMeta>();
    if sample.len() < meta_len {
        return;
    }
    // SAFETY: the kernel wrote a whole InitialMeta first (checked size).
    let meta: InitialMeta = unsafe { std::ptr::read_unaligned(sample.as_ptr().cast()) };
    let Some(frame) = sample.get(meta_len..meta_len + meta.len as usize) else { return };
    let Ok(l3) = parse_l3(frame) else { return };
    let Ok(l4) = parse_udp(frame, &l3) else { return };
    let Some(key) = FlowKey::of(frame, &l3, &l4) else { return };
    QuicCounts::add(&counts.initials, 1);
    let mut f = flows.lock().unwrap_or_else(|e| e.into_inner());
    let event = f.reader.datagram(key, &frame[l4.payload_off..l4.payload_end], Instant::now());
    let block = match event {
        Event::Name { mut canon, len, ech, ended } => {
            QuicCounts::add(&counts.names, 1);
            let v = {
                let state = lock(shared);
                let cfg = state.kernel.config();
                let decision = match_canon(&mut canon.0, canon_start(len), &cfg, &state.engine.nodes());
                verdict(decision, ech, ended, |r| state.kernel.list_is_ech_outer(r.list()))
            };
            let name = || events.and_then(|_| dotted(&canon.0.bytes[canon_start(len)..]));
            match v {
                Verdict::Block(rule) => Some((rule, name())),
                Verdict::Pass(rule) => {
                    if let Some(rule) = rule {
                        QuicCounts::add(&counts.allowed, 1);
                        f.verdicts.count(rule, false);
                    }
                    None
                }
                Verdict::WaitForEch(rule) => {
                    f.pending.insert(key, (rule, name()));
                    None
                }
            }
        }
        Event::Ended { ech } => f.pending.remove(&key).filter(|_| ech),
        Event::NoName => {
            QuicCounts::add(&counts.no_name, 1);
            None
        }
        Event::NotHello => {
            QuicCounts::add(&counts.not_hello, 1);
            None
        }
        Event::Undecryptable => {
            QuicCounts::add(&counts.undecryptable, 1);
            None
        }
        Event::GaveUp => {
            QuicCounts::add(&counts.gave_up, 1);
            None
        }
        Event::Pending | Event::Done => None,
    };
    let Some((rule, name)) = block else { return };
    match f.verdicts.block(key, rule) {
        Ok(()) => {
            counts.latency(ktime_ns().saturating_sub(meta.ktime_ns) / 1000);
            QuicCounts::add(&counts.blocked, 1);
            f.verdicts.count(rule, true);
        }
        Err(e) => {
            tracing::warn!("{e:#}");
            return;
        }
    }
    drop(f);
    if let Some(events) = events {
        events.quic_block(shared, l3.af, rule, name);
    }
}
