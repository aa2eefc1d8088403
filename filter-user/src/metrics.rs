//! /metrics in the Prometheus text format, read from the BPF maps at scrape
//! time, and /healthz, /readyz; over TCP, TLS or a Unix socket, optionally
//! behind basic auth. No subscriber address or queried name is ever a label:
//! rule labels are the operator's own patterns, and only the top N rules by
//! hits are exported, so millions of rules never become millions of series.

use std::{
    collections::BTreeMap,
    fmt::{self, Debug},
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex, OnceLock, TryLockError, atomic::Ordering},
    time::{Duration, Instant, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use axum::{
    Router,
    extract::{Request, State as AxumState},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use base64::Engine as _;
use filter_common::{
    counters::{self, Outcome, Proto},
    packet::{Af, Malformed},
    reply::DnsAction,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet, text::encode},
    metrics::MetricType,
    registry::{Registry, Unit},
};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_rustls::{TlsAcceptor, rustls, server::TlsStream};

use crate::socket::SocketFile;
use crate::{
    daemon::{ListStatus, Shared, State, lock},
    ebpf::{FlowCensus, FlowTable, MapReaders},
    events::EventCounts,
};

/// What the endpoint serves from: the daemon's state once the rules are
/// loaded and the program attached, and the interfaces it should be on.
///
/// A scrape never waits for the daemon's lock, which a list swap holds for
/// as long as it takes (seconds for millions of rules): the kernel's figures
/// come from map handles of the endpoint's own (`MapReaders`), and the
/// daemon's (lists, their status, the top rules' names) from `Figures`,
/// taken afresh when the lock is free and otherwise the last ones taken.
pub struct Context {
    state: OnceLock<Shared>,
    ifaces: Vec<String>,
    /// Where the pins are, and whether they outlive the daemon (/readyz).
    pins: String,
    readers: OnceLock<MapReaders>,
    published: Published,
    flows: OnceLock<Flows>,
    events: OnceLock<Arc<EventCounts>>,
    quic: OnceLock<Arc<crate::quic::counts::QuicCounts>>,
}

/// Counting the flow table walks all of it (see `FlowTable`): done at most
/// once per `FLOW_COUNT_MAX_AGE`, by one scrape at a time; the others show
/// the last count meanwhile.
struct Flows {
    table: Mutex<FlowTable>,
    capacity: u32,
    counted: Mutex<Option<(Instant, FlowCensus)>>,
}

const FLOW_COUNT_MAX_AGE: Duration = Duration::from_secs(10);

/// The daemon's figures as last read: after each change (`State::publish`)
/// and by each scrape that finds the daemon's lock free.
#[derive(Clone, Default)]
pub struct Published(Arc<Mutex<Option<Arc<Figures>>>>);

impl Published {
    /// After a change, under the lock its caller holds: the lists, their
    /// status and the map figures for the scrapes to come. The top rules
    /// stay as last ranked (ranking walks every rule's hits: a scrape does
    /// it when the lock is free, not every `rules add`).
    pub fn publish(&self, state: &State) {
        let top = self.last().map(|f| (f.top.clone(), f.ranked));
        self.set(Figures::read(state, top));
    }

    /// For a scrape that found the lock free: everything, the top rules
    /// ranked afresh.
    fn refresh(&self, state: &State) -> Arc<Figures> {
        self.set(Figures::read(state, None))
    }

    fn set(&self, figures: Figures) -> Arc<Figures> {
        let f = Arc::new(figures);
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(f.clone());
        f
    }

    fn last(&self) -> Option<Arc<Figures>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One of the top rules by hits: list, rule, hits.
type TopRule = (String, String, u64);

/// The daemon's side of a scrape, read under its lock.
pub struct Figures {
    /// When the top rules were ranked, and how long that took.
    ranked: (Instant, Duration),
    /// Each list: name, id, rules.
    lists: Vec<(String, u8, usize)>,
    status: BTreeMap<String, ListStatus>,
    top: Vec<TopRule>,
    nodes: u64,
    capacity: u32,
    /// Interfaces attached, with their XDP mode.
    attached: Vec<(String, &'static str)>,
}

impl Figures {
    /// `state`'s figures, with `top` as the top rules (and when they were
    /// ranked), or ranked now.
    fn read(state: &State, top: Option<(Vec<TopRule>, (Instant, Duration))>) -> Self {
        let (top, ranked) = top.unwrap_or_else(|| {
            let started = Instant::now();
            (Self::top(state), (started, started.elapsed()))
        });
        Figures {
            ranked,
            lists: state.engine.lists().iter().map(|l| (l.name.clone(), l.id, l.len())).collect(),
            status: state.list_status.clone(),
            top,
            nodes: state.engine.node_count() as u64,
            capacity: state.kernel.capacity(),
            attached: state
                .kernel
                .attachments()
                .iter()
                .map(|a| (a.iface.clone(), if a.mode == crate::ebpf::Mode::Native { "native" } else { "generic" }))
                .collect(),
        }
    }

    /// The top `--top-rules` rules by hits (ties: lower id first).
    fn top(state: &State) -> Vec<TopRule> {
        let hits = state.kernel.rule_hits();
        let mut top: Vec<(u64, u32)> =
            state.engine.all_rules().map(|(id, _, _)| (hits.get(id as usize).copied().unwrap_or(0), id)).filter(|(h, _)| *h > 0).collect();
        let n = state.top_rules.min(top.len());
        if n > 0 && n < top.len() {
            top.select_nth_unstable_by(n - 1, |a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        }
        top.truncate(n);
        top.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        top.iter()
            .filter_map(|(h, id)| {
                let info = state.engine.rule(*id)?;
                Some((state.engine.list_name(info.list)?.to_string(), info.rule.to_string(), *h))
            })
            .collect()
    }
}

impl Context {
    pub fn new(ifaces: Vec<String>, pins: crate::pin::PinDir) -> Arc<Self> {
        Arc::new(Context {
            state: OnceLock::new(),
            ifaces,
            pins: pins.persistence(),
            readers: OnceLock::new(),
            published: Published::default(),
            flows: OnceLock::new(),
            events: OnceLock::new(),
            quic: OnceLock::new(),
        })
    }

    /// Where the daemon publishes its figures after each change.
    pub fn published(&self) -> Published {
        self.published.clone()
    }

    /// The event log's counters, served from now on.
    pub fn event_counts(&self) -> Arc<EventCounts> {
        self.events.get_or_init(Default::default).clone()
    }

    /// The QUIC reader's counters (`--quic read`), served from now on.
    pub fn quic_counts(&self) -> Arc<crate::quic::counts::QuicCounts> {
        self.quic.get_or_init(Default::default).clone()
    }

    /// Called once the rules are in the maps and the program is attached.
    pub fn set_ready(&self, shared: Shared) -> anyhow::Result<()> {
        {
            let state = lock(&shared);
            let _ = self.readers.set(state.kernel.readers().context("opening the maps /metrics reads")?);
            match state.kernel.flow_table() {
                Ok(t) => {
                    let _ = self.flows.set(Flows { capacity: t.capacity, table: Mutex::new(t), counted: Mutex::new(None) });
                }
                Err(e) => tracing::warn!("opening the TLS flow table: {e:#}"),
            }
            self.published.refresh(&state);
        }
        let _ = self.state.set(shared);
        Ok(())
    }

    /// The daemon's figures: read now if its lock is free, else the last
    /// ones published (a list swap in flight holds the lock; the figures
    /// from before it are served until it ends). Ranking the top rules
    /// walks every rule under the lock: scrapes rank again only once the
    /// last ranking is twice as old as it took, so that however many
    /// scrape at once, they hold the lock at most half the time and never
    /// crowd the control socket out of it (with few rules, every scrape
    /// ranks afresh).
    fn figures(&self, shared: &Shared) -> Option<Arc<Figures>> {
        let last = self.published.last();
        if last.as_ref().is_some_and(|f| f.ranked.0.elapsed() < 2 * f.ranked.1) {
            return last;
        }
        let state = match shared.try_lock() {
            Ok(s) => Some(s),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        match state {
            Some(state) => Some(self.published.refresh(&state)),
            None => last,
        }
    }

    /// The flows in the flow table (at most `FLOW_COUNT_MAX_AGE` old) and its
    /// capacity.
    fn flows(&self) -> Option<(FlowCensus, u32)> {
        let flows = self.flows.get()?;
        let fresh = || flows.counted.lock().unwrap_or_else(|e| e.into_inner()).filter(|(at, _)| at.elapsed() < FLOW_COUNT_MAX_AGE);
        if fresh().is_none() {
            // One scrape walks the table; the others show the last count
            // (all wait for the very first).
            let have_one = flows.counted.lock().unwrap_or_else(|e| e.into_inner()).is_some();
            let table = match flows.table.try_lock() {
                Ok(t) => Some(t),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) if have_one => None,
                Err(TryLockError::WouldBlock) => Some(flows.table.lock().unwrap_or_else(|e| e.into_inner())),
            };
            if let Some(table) = table
                && fresh().is_none()
            {
                match table.census() {
                    Ok(c) => *flows.counted.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), c)),
                    Err(e) => tracing::warn!("counting TLS flows: {e:#}"),
                }
            }
        }
        let counted = *flows.counted.lock().unwrap_or_else(|e| e.into_inner());
        counted.map(|(_, c)| (c, flows.capacity))
    }

    /// Why the daemon is not ready to filter, if it is not.
    fn not_ready(&self) -> Option<String> {
        let Some(figures) = self.published.last() else { return Some("loading the rules".into()) };
        let missing: Vec<&str> = self.ifaces.iter().filter(|i| !figures.attached.iter().any(|(a, _)| a == *i)).map(String::as_str).collect();
        (!missing.is_empty()).then(|| format!("not attached to {}", missing.join(", ")))
    }
}

struct Blokir {
    ctx: Arc<Context>,
    figures: Arc<Figures>,
    flows: Option<(FlowCensus, u32)>,
}

impl Debug for Blokir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Blokir")
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn family<'a>(enc: &mut DescriptorEncoder, name: &str, help: &str, kind: MetricType, rows: impl IntoIterator<Item = (Labels<'a>, u64)>) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        let mut f = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => f.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
            _ => f.encode_gauge(&(v as i64))?,
        }
    }
    Ok(())
}

/// A gauge in a base unit (`_bytes`, `_seconds`), possibly fractional.
fn gauge_in<'a>(enc: &mut DescriptorEncoder, name: &str, help: &str, unit: Unit, rows: impl IntoIterator<Item = (Labels<'a>, f64)>) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, Some(&unit), MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

impl Collector for Blokir {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let (Some(readers), figures) = (self.ctx.readers.get(), &self.figures) else { return Err(fmt::Error) };
        let c = match readers.counters() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("reading counters: {e:#}");
                return Err(fmt::Error);
            }
        };
        let get = |i: u32| c.get(i as usize).copied().unwrap_or(0);
        family(&mut enc, "blokir_packets", "Packets the XDP program saw.", MetricType::Counter, [(vec![], get(counters::PACKETS))])?;
        family(
            &mut enc,
            "blokir_fragments",
            "Later IP fragments, passed uninspected (no transport header).",
            MetricType::Counter,
            [(vec![], get(counters::FRAGMENTS))],
        )?;
        family(
            &mut enc,
            "blokir_unconfigured",
            "Packets passed before the daemon configured the program.",
            MetricType::Counter,
            [(vec![], get(counters::UNCONFIGURED))],
        )?;
        for (outcome, name, help) in [
            (Outcome::Inspected, "blokir_inspected", "Packets whose name was read and matched against the rules."),
            (Outcome::Blocked, "blokir_blocked", "Packets dropped by a block rule."),
            (Outcome::Allowed, "blokir_allow_rule_hits", "Packets passed because an allow rule matched."),
            (Outcome::Incomplete, "blokir_incomplete", "Packets whose name was not all in the packet (split TCP segment), passed."),
        ] {
            let rows = Proto::ALL
                .iter()
                .flat_map(|p| Af::ALL.iter().map(move |a| (vec![("proto", p.name()), ("af", a.name())], get(counters::proto_index(*p, *a, outcome)))));
            family(&mut enc, name, help, MetricType::Counter, rows)?;
        }
        let rows = Malformed::ALL.iter().map(|m| (vec![("reason", m.name())], get(counters::malformed_index(*m))));
        family(&mut enc, "blokir_malformed", "Malformed packets by reason, passed.", MetricType::Counter, rows)?;
        family(
            &mut enc,
            "blokir_tls_hellos",
            "ClientHello events: no server_name (passed), encrypted_client_hello seen, segments dropped for arriving ahead of the hello's bytes, hellos too complex to read (flow blocked), streams that started like TLS but were not a hello, hellos blocked by an ECH-outer rule (--ech-outer-list).",
            MetricType::Counter,
            counters::TLS_EVENTS.map(|(e, i)| (vec![("event", e)], get(i))),
        )?;
        family(
            &mut enc,
            "blokir_http_requests",
            "HTTP request events: no Host header (passed), a Host that is not a domain name (passed), streams that started like a method but were not a request (passed), no name within the head limit (flow blocked), segments dropped for arriving ahead of the request's bytes.",
            MetricType::Counter,
            counters::HTTP_EVENTS.map(|(e, i)| (vec![("event", e)], get(i))),
        )?;
        let rows = DnsAction::ALL.iter().map(|a| (vec![("action", a.name())], get(counters::action_index(*a))));
        family(
            &mut enc,
            "blokir_dns_actions",
            "Blocked DNS queries by what was done: dropped, or answered (nxdomain, refused, nodata, redirect).",
            MetricType::Counter,
            rows,
        )?;
        let rows = counters::ANSWER_FALLBACKS.map(|(r, i)| (vec![("reason", r)], get(i)));
        family(
            &mut enc,
            "blokir_dns_answer_fallbacks",
            "Blocked UDP queries dropped instead of answered: IP options, extension headers or fragments (not_plain), or the packet could not be rewritten (failed).",
            MetricType::Counter,
            rows,
        )?;

        family(
            &mut enc,
            "blokir_tcp_resets",
            "TCP RSTs sent back to clients of flows blocked by a list whose TCP action is reset.",
            MetricType::Counter,
            [(vec![], get(counters::TCP_RESETS))],
        )?;
        let rows = counters::TCP_EVENTS.map(|(e, i)| (vec![("event", e)], get(i)));
        family(
            &mut enc,
            "blokir_tcp_events",
            "TCP connection events: data segments of a new connection held back (dropped) because they came before its first (early_segment); RSTs sent on to servers to close the server's end of a blocked connection, made of the segment that completed a name on a drop list or of a new connection's SYN on the ports of a blocked flow (server_reset).",
            MetricType::Counter,
            rows,
        )?;
        let rows = counters::RESET_FALLBACKS.map(|(r, i)| (vec![("reason", r)], get(i)));
        family(
            &mut enc,
            "blokir_tcp_reset_fallbacks",
            "Segments of reset flows dropped instead: IP options or IPv6 extension headers (not_plain), or the RST could not be written or its stage not reached (failed).",
            MetricType::Counter,
            rows,
        )?;

        let rows = counters::QUIC_FATES.map(|(k, i)| (vec![("fate", k)], get(i)));
        family(
            &mut enc,
            "blokir_quic_initials",
            "QUIC client Initials in the kernel's QUIC stage (--quic read): handed up to the daemon, or not (over the per-flow cap, over the per-CPU budget, undelivered: the daemon's buffer full or no daemon), then passed or dropped by --quic-on-overload.",
            MetricType::Counter,
            rows,
        )?;
        let rows = counters::EVASIONS.map(|(k, i)| (vec![("kind", k)], get(i)));
        family(
            &mut enc,
            "blokir_evasions",
            "Circumvention attempts seen: first IP fragments of DNS queries or of TCP to the HTTP and TLS ports, dropped or passed by --fragments (fragment); HTTP requests with a second Host header, blocked (host_repeat); urgent bytes (urgent) and fake segments the server discards (fake) on TLS and HTTP flows being read, blocked or passed by --on-tamper.",
            MetricType::Counter,
            rows,
        )?;

        let lists = &figures.lists;
        let list_hits: Vec<[u64; 2]> = lists.iter().map(|(_, id, _)| readers.list_hits(*id).unwrap_or_default()).collect();
        family(
            &mut enc,
            "blokir_list_blocked",
            "Packets blocked by a rule of each list.",
            MetricType::Counter,
            lists.iter().zip(&list_hits).map(|((l, _, _), h)| (vec![("list", l.as_str())], h[0])),
        )?;
        family(
            &mut enc,
            "blokir_list_allowed",
            "Packets passed by an allow rule of each list.",
            MetricType::Counter,
            lists.iter().zip(&list_hits).map(|((l, _, _), h)| (vec![("list", l.as_str())], h[1])),
        )?;
        family(&mut enc, "blokir_list_rules", "Rules in each list.", MetricType::Gauge, lists.iter().map(|(l, _, n)| (vec![("list", l.as_str())], *n as u64)))?;
        family(
            &mut enc,
            "blokir_rule_hits",
            "Packets matched by each rule (the top rules by hits only).",
            MetricType::Counter,
            figures.top.iter().map(|(l, r, h)| (vec![("list", l.as_str()), ("rule", r.as_str())], *h)),
        )?;

        family(&mut enc, "blokir_rule_nodes", "Name nodes in the kernel rule map.", MetricType::Gauge, [(vec![], figures.nodes)])?;
        family(
            &mut enc,
            "blokir_rule_capacity",
            "Name nodes (and rule ids) the kernel maps hold.",
            MetricType::Gauge,
            [(vec![], u64::from(figures.capacity))],
        )?;
        encode_state(&mut enc, figures, readers, &self.ctx.ifaces, self.flows)?;
        if let Some(ev) = self.ctx.events.get() {
            let rows = [("logged", ev.logged.load(Ordering::Relaxed)), ("suppressed", ev.suppressed.load(Ordering::Relaxed))];
            family(
                &mut enc,
                "blokir_events",
                "Blocked-name events of the opt-in event log: logged, or held back by --event-log-rate.",
                MetricType::Counter,
                rows.map(|(o, v)| (vec![("outcome", o)], v)),
            )?;
        }
        // Served with zeros unless `--quic read` is on, like the kernel's
        // counters: the dashboard reads them either way.
        {
            let q = self.ctx.quic.get().cloned().unwrap_or_default();
            family(
                &mut enc,
                "blokir_quic_reader",
                "QUIC Initials read by the daemon (--quic read), by outcome: read, undecryptable, gave_up (reassembly), not_hello, no_name; hellos whose name was read (name), blocked, allowed; lost (the kernel's perf buffer was full).",
                MetricType::Counter,
                q.outcomes().map(|(o, v)| (vec![("outcome", o)], v)),
            )?;
            // Per-bucket counts: the encoder makes them cumulative (the
            // last bucket, slower than all bounds, goes to +Inf).
            let bounds = crate::quic::counts::LATENCY_BUCKETS_US.iter().map(|b| *b as f64 / 1e6).chain([f64::INFINITY]);
            let buckets: Vec<(f64, u64)> = bounds.zip(q.latency.iter().map(|c| c.load(Ordering::Relaxed))).collect();
            let count = buckets.iter().map(|(_, c)| c).sum();
            let sum = q.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let mut m = enc.encode_descriptor(
                "blokir_quic_verdict_latency_seconds",
                "Blocked QUIC flows by the time from the Initial's handoff in the kernel to the verdict in the map.",
                None,
                MetricType::Histogram,
            )?;
            let no_labels: Vec<(&str, &str)> = Vec::new();
            m.encode_family(&no_labels)?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        family(&mut enc, "blokir_build_info", "Build information.", MetricType::Gauge, [(vec![("version", env!("CARGO_PKG_VERSION"))], 1)])?;
        Ok(())
    }
}

/// The families that read the daemon's bookkeeping and map metadata.
fn encode_state(enc: &mut DescriptorEncoder, figures: &Figures, readers: &MapReaders, ifaces: &[String], flows: Option<(FlowCensus, u32)>) -> fmt::Result {
    // Each configured interface: 1 with the mode in use, or 0 (mode "none")
    // when the program is not attached there.
    let mut attached: Vec<(String, &'static str, u64)> = figures.attached.iter().map(|(i, m)| (i.clone(), *m, 1)).collect();
    for i in ifaces {
        if !attached.iter().any(|(a, _, _)| a == i) {
            attached.push((i.clone(), "none", 0));
        }
    }
    family(
        enc,
        "blokir_attached",
        "1 for each interface the program is attached to, with its XDP mode; 0 (mode none) for a configured interface it is not attached to.",
        MetricType::Gauge,
        attached.iter().map(|(i, m, v)| (vec![("iface", i.as_str()), ("mode", *m)], *v)),
    )?;

    let status = &figures.status;
    family(
        enc,
        "blokir_list_version",
        "Version of each list: 1 after the first load, incremented by each update that changed its rules.",
        MetricType::Gauge,
        status.iter().map(|(l, s)| (vec![("list", l.as_str())], s.version)),
    )?;
    let seconds = |t: Option<std::time::SystemTime>| t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs_f64());
    gauge_in(
        enc,
        "blokir_list_last_update_timestamp",
        "When each list was last read and applied successfully (changed or not), in Unix time.",
        Unit::Seconds,
        status.iter().filter_map(|(l, s)| Some((vec![("list", l.as_str())], seconds(s.last_update)?))),
    )?;
    family(
        enc,
        "blokir_list_update_failures",
        "Updates of each list that were refused (unreadable or bad file, capacity, kernel write); the rules in force stayed as they were.",
        MetricType::Counter,
        status.iter().map(|(l, s)| (vec![("list", l.as_str())], s.failures)),
    )?;
    family(
        enc,
        "blokir_list_shrinks_refused",
        "Of those, updates refused for taking away more of the list than --max-shrink allows (an emptied file, a cut-off download); the last good version stayed.",
        MetricType::Counter,
        status.iter().map(|(l, s)| (vec![("list", l.as_str())], s.shrinks_refused)),
    )?;

    if let Some((c, cap)) = flows {
        family(
            enc,
            "blokir_tls_flows",
            "Flows in the flow table the TLS and HTTP stages share (names being read, and blocked flows).",
            MetricType::Gauge,
            [(vec![], c.total)],
        )?;
        family(
            enc,
            "blokir_flows",
            "Flows in the flow table by protocol and state: reading (a ClientHello, request head or DNS-over-TCP query not complete yet), blocked, or watched (the name passed; kept to compare later copies of its bytes).",
            MetricType::Gauge,
            [
                (vec![("proto", "tls"), ("state", "reading")], c.tls_reading),
                (vec![("proto", "tls"), ("state", "blocked")], c.tls_blocked),
                (vec![("proto", "http"), ("state", "reading")], c.http_reading),
                (vec![("proto", "http"), ("state", "blocked")], c.http_blocked),
                (vec![("proto", "tls"), ("state", "watched")], c.tls_watched),
                (vec![("proto", "http"), ("state", "watched")], c.http_watched),
                (vec![("proto", "dns_tcp"), ("state", "reading")], c.dns_tcp_reading),
            ],
        )?;
        family(
            enc,
            "blokir_tls_flow_capacity",
            "Flows the TLS flow table holds (least recently used ones are evicted).",
            MetricType::Gauge,
            [(vec![], u64::from(cap))],
        )?;
    }
    match readers.map_memory() {
        Ok(maps) => {
            let names: Vec<(String, f64)> = maps.into_iter().map(|(n, b)| (n.to_ascii_lowercase(), b as f64)).collect();
            gauge_in(
                enc,
                "blokir_map_memory",
                "Memory the kernel accounts to each BPF map of the program (memlock in fdinfo).",
                Unit::Bytes,
                names.iter().map(|(n, b)| (vec![("map", n.as_str())], *b)),
            )?;
        }
        Err(e) => tracing::warn!("reading map memory: {e:#}"),
    }
    Ok(())
}

/// Renders the metrics page in OpenMetrics (`openmetrics`) or in the
/// Prometheus text format 0.0.4 (for clients that do not ask for OpenMetrics,
/// such as curl and `promtool check metrics`).
fn render(ctx: &Arc<Context>, shared: &Shared, openmetrics: bool) -> Result<String, fmt::Error> {
    let figures = ctx.figures(shared).ok_or(fmt::Error)?;
    let flows = ctx.flows();
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Blokir { ctx: ctx.clone(), figures, flows }));
    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(if openmetrics { out } else { to_text_format(&out) })
}

/// OpenMetrics to the Prometheus text format: the family of a counter is
/// named with its `_total` suffix, and `# UNIT` and `# EOF` go.
fn to_text_format(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

async fn metrics_page(AxumState(ctx): AxumState<Arc<Context>>, headers: HeaderMap) -> Response {
    let Some(shared) = ctx.state.get().cloned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: loading the rules\n").into_response();
    };
    let openmetrics = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("application/openmetrics-text"));
    match tokio::task::spawn_blocking(move || render(&ctx, &shared, openmetrics)).await {
        Ok(Ok(body)) => {
            let kind = if openmetrics { "application/openmetrics-text; version=1.0.0; charset=utf-8" } else { "text/plain; version=0.0.4; charset=utf-8" };
            ([(header::CONTENT_TYPE, kind)], body).into_response()
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "reading the BPF maps failed\n").into_response(),
    }
}

async fn readyz(AxumState(ctx): AxumState<Arc<Context>>) -> Response {
    let pins = ctx.pins.clone();
    match tokio::task::spawn_blocking(move || ctx.not_ready()).await {
        Ok(None) => (StatusCode::OK, format!("ready\n{pins}\n")).into_response(),
        Ok(Some(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n{pins}\n")).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Where and how the endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    /// A Unix socket, created mode 0600 (root only) and removed on exit.
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs a path (unix:/run/blokir/metrics.sock)".into()),
            Some(path) => Ok(Listen::Unix(PathBuf::from(path))),
            None => s.parse().map(Listen::Tcp).map_err(|e| format!("{e}: expected HOST:PORT ([::1]:9947 for IPv6) or unix:/path")),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Endpoint {
    pub listen: Listen,
    /// PEM certificate chain and private key: serve HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `user:bcrypt-hash` lines: require basic auth.
    pub basic_auth_file: Option<PathBuf>,
}

/// The endpoint's listener, bound and configured, not serving yet.
pub struct Bound {
    listener: Listener,
    tls: Option<TlsAcceptor>,
    users: Option<Arc<Users>>,
    _socket: Option<SocketFile>,
    pub describe: String,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Reads the TLS and auth settings and binds; every error is reported here,
/// before anything is loaded.
pub async fn bind(ep: &Endpoint) -> anyhow::Result<Bound> {
    let tls = ep.tls.as_ref().map(|(cert, key)| tls_acceptor(cert, key)).transpose()?;
    let users = ep.basic_auth_file.as_ref().map(|p| Users::read(p).map(Arc::new)).transpose()?;
    let (listener, socket) = match &ep.listen {
        Listen::Tcp(a) => (Listener::Tcp(TcpListener::bind(a).await.with_context(|| format!("binding the metrics endpoint {a}"))?), None),
        Listen::Unix(p) => {
            if tls.is_some() {
                bail!("--metrics-tls-cert needs a TCP --metrics-addr, not a Unix socket");
            }
            let (l, f) = SocketFile::bind(p, "metrics socket")?;
            (Listener::Unix(l), Some(f))
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let auth = if users.is_some() { ", basic auth" } else { "" };
    let describe = format!("{scheme} {}{auth}", ep.listen);
    Ok(Bound { listener, tls, users, _socket: socket, describe })
}

impl Bound {
    pub async fn serve(self, ctx: Arc<Context>) -> std::io::Result<()> {
        let mut app =
            Router::new().route("/metrics", get(metrics_page)).route("/readyz", get(readyz)).route("/healthz", get(|| async { "ok\n" })).with_state(ctx);
        if let Some(users) = self.users {
            app = app.layer(middleware::from_fn_with_state(users, basic_auth));
        }
        let _socket = self._socket;
        match (self.listener, self.tls) {
            (Listener::Tcp(l), None) => axum::serve(l, app).await,
            (Listener::Tcp(l), Some(tls)) => axum::serve(TlsListener::spawn(l, tls)?, app).await,
            (Listener::Unix(l), _) => axum::serve(l, app).await,
        }
    }
}

fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the certificate chain {}", cert.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate in it", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading the private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not make a TLS configuration")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts TCP connections and completes their TLS handshakes in tasks of
/// their own, so one slow or silent client never holds up the others.
struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

/// Handshakes in progress at once, and how long one may take.
const MAX_HANDSHAKES: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsListener {
    fn spawn(tcp: TcpListener, tls: TlsAcceptor) -> std::io::Result<Self> {
        let addr = tcp.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else { return };
                let (stream, peer) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("metrics endpoint: accepting: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    // A failed handshake is the client's problem; not logged
                    // with its address (no subscriber data in logs).
                    if let Ok(Ok(s)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                        let _ = tx.send((s, peer)).await;
                    }
                    drop(permit);
                });
            }
        });
        Ok(TlsListener { rx, addr })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Basic-auth users, as in Prometheus's web config: `user:bcrypt-hash`.
pub struct Users {
    users: Vec<(String, String)>,
    /// Checked when the user is unknown, so that the answer takes as long as
    /// for a known user with a wrong password.
    dummy: String,
}

impl Users {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut users = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("{}:{}", path.display(), n + 1);
            let Some((user, hash)) = line.split_once(':') else { bail!("{}: expected user:bcrypt-hash", at()) };
            if user.is_empty() {
                bail!("{}: empty user name", at());
            }
            let parts: bcrypt::HashParts = hash.parse().map_err(|e| anyhow::anyhow!("{}: not a bcrypt hash: {e}", at()))?;
            users.push((user.to_string(), parts.to_string()));
        }
        if users.is_empty() {
            bail!("{}: no user in it", path.display());
        }
        let cost = users[0].1.parse::<bcrypt::HashParts>().map(|p| p.get_cost()).unwrap_or(bcrypt::DEFAULT_COST);
        let dummy = bcrypt::hash(rand::random::<[u8; 16]>(), cost)?;
        Ok(Users { users, dummy })
    }

    /// Whether `header` (an Authorization value) names a user with the
    /// right password. Every user name is compared in full, and one bcrypt
    /// check is made whether or not the user exists.
    fn check(&self, header: &str) -> bool {
        let Some(b64) = header.strip_prefix("Basic ") else { return false };
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else { return false };
        let Some(colon) = raw.iter().position(|b| *b == b':') else { return false };
        let (user, password) = (&raw[..colon], &raw[colon + 1..]);
        let mut found: Option<&str> = None;
        for (u, hash) in &self.users {
            if ct_eq(u.as_bytes(), user) && found.is_none() {
                found = Some(hash);
            }
        }
        let ok = bcrypt::verify(password, found.unwrap_or(&self.dummy)).unwrap_or(false);
        ok && found.is_some()
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

async fn basic_auth(AxumState(users): AxumState<Arc<Users>>, request: Request, next: Next) -> Response {
    let header = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    // bcrypt takes tens of milliseconds by design: off the async workers.
    let ok = match header {
        Some(h) => tokio::task::spawn_blocking(move || users.check(&h)).await.unwrap_or(false),
        None => false,
    };
    if !ok {
        return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic realm=\"blokir\", charset=\"UTF-8\"")], "unauthorized\n").into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!("127.0.0.1:9947".parse(), Ok(Listen::Tcp("127.0.0.1:9947".parse().unwrap())));
        assert_eq!("[::1]:9947".parse(), Ok(Listen::Tcp("[::1]:9947".parse().unwrap())));
        assert_eq!("unix:/run/m.sock".parse(), Ok(Listen::Unix("/run/m.sock".into())));
        assert!("unix:".parse::<Listen>().is_err());
        assert!("localhost".parse::<Listen>().is_err());
    }

    #[test]
    fn text_format_names_counters_with_total() {
        let om = "# HELP a_b X.\n# TYPE a_b counter\na_b_total 1\n# HELP m Mem.\n# TYPE m_bytes gauge\n# UNIT m_bytes bytes\nm_bytes 3\n# EOF\n";
        assert_eq!(to_text_format(om), "# HELP a_b_total X.\n# TYPE a_b_total counter\na_b_total 1\n# HELP m Mem.\n# TYPE m_bytes gauge\nm_bytes 3\n");
    }

    #[test]
    fn basic_auth_checks_user_and_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        std::fs::write(&path, format!("# scrapers\nprom:{hash}\n")).unwrap();
        let users = Users::read(&path).unwrap();
        let b = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
        assert!(users.check(&b("prom:s3cret")));
        assert!(!users.check(&b("prom:wrong")));
        assert!(!users.check(&b("other:s3cret")));
        assert!(!users.check(&b("pro:s3cret")));
        assert!(!users.check("Bearer x"));
        std::fs::write(&path, "prom:notahash\n").unwrap();
        assert!(Users::read(&path).is_err());
    }
}
