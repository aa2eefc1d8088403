//! /metrics in the Prometheus text format, read from the BPF maps at scrape
//! time. No subscriber address or queried name is ever a label: rule labels
//! are the operator's own patterns, and only the top N rules by hits are
//! exported, so millions of rules never become millions of series.

use std::fmt::{self, Debug};

use axum::{Router, extract::State as AxumState, http::header, response::IntoResponse, routing::get};
use filter_common::{
    counters::{self, Outcome, Proto},
    packet::{Af, Malformed},
    reply::DnsAction,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet, text::encode},
    metrics::MetricType,
    registry::Registry,
};

use crate::daemon::{Shared, lock};

struct Blokir(Shared);

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

impl Collector for Blokir {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let state = lock(&self.0);
        let c = match state.kernel.counters() {
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
            "ClientHello events: no server_name (passed), encrypted_client_hello seen, segments dropped for arriving ahead of the hello's bytes, hellos too complex to read (flow blocked), streams that started like TLS but were not a hello.",
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

        let lists = state.engine.lists();
        let list_hits: Vec<[u64; 2]> = lists.iter().map(|l| state.kernel.list_hits(l.id).unwrap_or_default()).collect();
        family(
            &mut enc,
            "blokir_list_blocked",
            "Packets blocked by a rule of each list.",
            MetricType::Counter,
            lists.iter().zip(&list_hits).map(|(l, h)| (vec![("list", l.name.as_str())], h[0])),
        )?;
        family(
            &mut enc,
            "blokir_list_allowed",
            "Packets passed by an allow rule of each list.",
            MetricType::Counter,
            lists.iter().zip(&list_hits).map(|(l, h)| (vec![("list", l.name.as_str())], h[1])),
        )?;
        family(
            &mut enc,
            "blokir_list_rules",
            "Rules in each list.",
            MetricType::Gauge,
            lists.iter().map(|l| (vec![("list", l.name.as_str())], l.len() as u64)),
        )?;

        // Top N rules by hits (ties: lower id first).
        let hits = state.kernel.rule_hits();
        let mut top: Vec<(u64, u32)> =
            state.engine.all_rules().map(|(id, _, _)| (hits.get(id as usize).copied().unwrap_or(0), id)).filter(|(h, _)| *h > 0).collect();
        let n = state.top_rules.min(top.len());
        if n > 0 && n < top.len() {
            top.select_nth_unstable_by(n - 1, |a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        }
        top.truncate(n);
        top.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let rows: Vec<(String, String, u64)> = top
            .iter()
            .filter_map(|(h, id)| {
                let info = state.engine.rule(*id)?;
                Some((state.engine.list_name(info.list)?.to_string(), info.rule.to_string(), *h))
            })
            .collect();
        family(
            &mut enc,
            "blokir_rule_hits",
            "Packets matched by each rule (the top rules by hits only).",
            MetricType::Counter,
            rows.iter().map(|(l, r, h)| (vec![("list", l.as_str()), ("rule", r.as_str())], *h)),
        )?;

        family(&mut enc, "blokir_rule_nodes", "Name nodes in the kernel rule map.", MetricType::Gauge, [(vec![], state.engine.node_count() as u64)])?;
        family(
            &mut enc,
            "blokir_rule_capacity",
            "Name nodes (and rule ids) the kernel maps hold.",
            MetricType::Gauge,
            [(vec![], u64::from(state.kernel.capacity()))],
        )?;
        let attached: Vec<(String, &'static str)> =
            state.kernel.attachments().iter().map(|a| (a.iface.clone(), if a.mode == crate::ebpf::Mode::Native { "native" } else { "generic" })).collect();
        family(
            &mut enc,
            "blokir_attached",
            "1 for each interface the program is attached to, with its XDP mode.",
            MetricType::Gauge,
            attached.iter().map(|(i, m)| (vec![("iface", i.as_str()), ("mode", *m)], 1)),
        )?;
        family(&mut enc, "blokir_build_info", "Build information.", MetricType::Gauge, [(vec![("version", env!("CARGO_PKG_VERSION"))], 1)])?;
        Ok(())
    }
}

/// Renders the metrics page.
pub fn render(shared: &Shared) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Blokir(shared.clone())));
    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}

async fn metrics_page(AxumState(shared): AxumState<Shared>) -> impl IntoResponse {
    match tokio::task::spawn_blocking(move || render(&shared)).await {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response(),
        _ => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "reading the BPF maps failed\n").into_response(),
    }
}

pub async fn serve(listener: tokio::net::TcpListener, shared: Shared) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(metrics_page)).route("/healthz", get(|| async { "ok\n" })).with_state(shared);
    axum::serve(listener, app).await
}
