//! REPORT.md, summary.json and cost.png from one run's measurements.

use std::fmt::Write as _;

use anyhow::Context as _;
use serde_json::json;

use crate::{
    Args,
    micro::{CLASSES, ClassResult, Micro},
    veth::{PROBES, SCRAPERS, Veth},
};

/// The classes whose packets carry a name that is read and matched.
const NAMED: [&str; 5] = ["dns_allowed", "dns_blocked_exact", "dns_blocked_subtree", "tls_one_segment", "tls_split_second"];
const TWO_M: f64 = 2_000_000.0;

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{ncpu} CPUs ({cpu}), Linux {}", kernel.trim())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn find<'a>(rs: &'a [ClassResult], class: &str, rules: usize) -> Option<&'a ClassResult> {
    rs.iter().find(|r| r.class == class && r.rules == rules)
}

pub fn write(args: &Args, m: &Micro, veth: Option<&Veth>, counts: &[usize], samples: usize, elapsed: f64) -> anyhow::Result<()> {
    let max = *counts.iter().max().context("counts")?;
    let min = *counts.iter().min().context("counts")?;
    let at = |c: &str| find(&m.results, c, max).map(ClassResult::net).unwrap_or(f64::NAN);
    let named_sum = |k: usize| NAMED.iter().filter_map(|c| find(&m.results, c, k)).map(ClassResult::net).sum::<f64>();
    let scaling = named_sum(max) / named_sum(min);
    let load = &m.load;
    let scale_to_2m = TWO_M / max as f64;
    let bytes_per_rule = load.memlock() as f64 / max as f64;
    let noop = find(&m.results, "dns_allowed", max).map(|r| r.noop_mean).unwrap_or(f64::NAN);

    let (ratio, ipt_net, blokir_prog) = match veth {
        Some(v) => {
            let base = v.runs.iter().find(|r| r.name == "unfiltered").map(|r| r.cpu_per_packet()).unwrap_or(0.0);
            let ipt = v.runs.iter().find(|r| r.name.starts_with("iptables") && r.rules == 1000).map(|r| r.cpu_per_packet() - base);
            let prog = v.runs.iter().find(|r| r.name.starts_with("blokir") && r.rules == 1000).and_then(|r| r.prog_ns);
            match (ipt, prog) {
                (Some(i), Some(p)) => (Some(i / p), Some(i), Some(p)),
                _ => (None, ipt, prog),
            }
        }
        None => (None, None, None),
    };

    // The program's own time per packet in the live veth path (bpf_stats),
    // net of the no-op's in the same place.
    let live = |k: usize| -> Option<f64> {
        let v = veth?;
        let noop = v.runs.iter().find(|r| r.name.starts_with("no-op"))?.prog_ns?;
        Some(v.runs.iter().find(|r| r.name.starts_with("blokir") && r.rules == k)?.prog_ns? - noop)
    };
    let mut summary = json!({
        "noop_ns": noop,
        "dns_allowed_ns": at("dns_allowed"),
        "dns_blocked_ns": (at("dns_blocked_exact") + at("dns_blocked_subtree")) / 2.0,
        "clienthello_ns": at("tls_one_segment"),
        "clienthello_split_ns": at("tls_split_second"),
        "scaling_2m_over_10": scaling,
        "kernel_bytes_per_rule": bytes_per_rule,
        "load_2m_seconds": load.load_s() * scale_to_2m,
        "iptables_1k_cpu_ratio": ratio,
    });
    let extra = json!({
        "quick": args.quick,
        "max_rules": max,
        "rule_counts": counts,
        "samples_per_class": samples,
        "dns_blocked_exact_ns": at("dns_blocked_exact"),
        "dns_blocked_subtree_ns": at("dns_blocked_subtree"),
        "clienthello_split_first_ns": at("tls_split_first"),
        "http_get_ns": at("http_get"),
        "udp_other_ns": at("udp_other"),
        "tcp_ack_ns": at("tcp_ack"),
        "tcp_syn_ns": at("tcp_syn"),
        "tcp_data_ns": at("tcp_data"),
        "quic_initial_ns": at("quic_initial"),
        "isp_mix_ns": crate::micro::ISP_MIX.iter().map(|(class, share)| share * at(class)).sum::<f64>(),
        "swap_1pct_seconds": load.swap_s(),
        "daemon_swap_peak_mib": veth.map(|v| v.daemon.swap_hwm_kib as f64 / 1024.0),
        "load_seconds_measured": load.load_s(),
        "swap_seconds": load.swap_s(),
        "swap_changed_rules": load.swap_changed,
        "program_load_seconds": load.program_load_s,
        "rule_capacity": load.capacity,
        "daemon_rss_mib": veth.map(|v| v.daemon.rss_kib as f64 / 1024.0),
        "daemon_ready_seconds": veth.map(|v| v.daemon.ready_s),
        "metrics_scrape_p50_ms_during_swap": veth.map(|v| v.scrapes.p50_ms),
        "metrics_scrape_p99_ms_during_swap": veth.map(|v| v.scrapes.p99_ms),
        "metrics_scrape_max_ms_during_swap": veth.map(|v| v.scrapes.max_ms),
        "metrics_scrapes_during_swap": veth.map(|v| v.scrapes.scrapes),
        "metrics_swap_seconds": veth.map(|v| v.scrapes.swap_s),
        "iptables_1k_net_cpu_ns": ipt_net,
        "blokir_program_ns_veth": blokir_prog,
        "live_dns_mix_net_ns_1k_rules": live(1000),
        "live_dns_mix_net_ns_max_rules": live(max),
        "machine": machine(),
        "elapsed_seconds": elapsed,
    });
    if let (Some(s), Some(e)) = (summary.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    std::fs::write(args.out.join("summary.json"), serde_json::to_string_pretty(&summary)? + "\n")?;
    plot(args, m, counts).context("drawing cost.png")?;

    // REPORT.md
    let mut r = String::new();
    let w = &mut r;
    let mode = if args.quick { "`--quick` (smaller counts: not the headline run)" } else { "full" };
    writeln!(w, "# blokir benchmark report\n")?;
    writeln!(w, "Machine: {}. Run: {mode}, {elapsed:.0} s; load average at the end {}.", machine(), loadavg())?;
    writeln!(
        w,
        "The machine is shared (other builds ran during this run), so absolute figures are noisy: compare **ratios within this run** \
         (blokir against the no-op program measured packet by packet alongside it; iptables against blokir in the same network).\n"
    )?;
    writeln!(w, "## Headline (`summary.json`)\n")?;
    writeln!(w, "Targets are issue #14's (line rate on one core's share of a 10-100 GbE box); cold unless said, net of the no-op.\n")?;
    writeln!(w, "| figure | value | target |\n| --- | --- | --- |")?;
    let ok = |b: bool| if b { "met" } else { "**not met**" };
    writeln!(w, "| no-op XDP program, cold, per packet (`noop_ns`) | {noop:.0} ns | |")?;
    let two_m = if args.quick { format!("{max} rules (`--quick`)") } else { format!("{max} rules") };
    // (figure, summary key, unit, target: at most this).
    let rows: [(&str, &str, &str, f64); 14] = [
        ("DNS query, allowed", "dns_allowed_ns", "ns", 150.0),
        ("DNS query, blocked (mean of exact and subtree)", "dns_blocked_ns", "ns", 250.0),
        ("ClientHello, name in the first segment", "clienthello_ns", "ns", 300.0),
        ("ClientHello split, the segment that completes the name", "clienthello_split_ns", "ns", 300.0),
        ("HTTP GET", "http_get_ns", "ns", 300.0),
        ("TCP data segment of an allowed flow (port 443)", "tcp_data_ns", "ns", 40.0),
        ("TCP SYN", "tcp_syn_ns", "ns", 100.0),
        ("ISP mix, mean per packet (see section 1)", "isp_mix_ns", "ns", 40.0),
        ("cost with the most rules ÷ with the fewest (named classes)", "scaling_2m_over_10", "", 1.2),
        ("kernel memory per rule", "kernel_bytes_per_rule", "B", 64.0),
        ("parse + load 2M names (scaled from a smaller count under `--quick`)", "load_2m_seconds", "s", 3.0),
        ("swap a 1 %-changed list, atomically", "swap_1pct_seconds", "s", 1.0),
        ("daemon RSS with the rules / peak during a swap", "daemon_rss_mib", "MiB", 256.0),
        ("`blokir run` with the rules: start to ready", "daemon_ready_seconds", "s", 5.0),
    ];
    for (figure, key, unit, target) in rows {
        match summary[key].as_f64() {
            Some(v) if key == "daemon_rss_mib" => {
                let peak = summary["daemon_swap_peak_mib"].as_f64().unwrap_or(f64::NAN);
                writeln!(
                    w,
                    "| {figure}, {two_m} (`{key}`, `daemon_swap_peak_mib`) | {v:.0} / {peak:.0} MiB | ≤ 256 / ≤ 512 MiB: {} |",
                    ok(v <= 256.0 && peak <= 512.0)
                )?
            }
            Some(v) => {
                let shown = if unit == "s" || unit.is_empty() { format!("{v:.2} {unit}") } else { format!("{v:.0} {unit}") };
                writeln!(w, "| {figure}, {two_m} (`{key}`) | {} | {}: {} |", shown.trim(), format!("≤ {target} {unit}").trim(), ok(v <= target))?
            }
            None => writeln!(w, "| {figure} (`{key}`) | not measured | ≤ {target} {unit} |")?,
        }
    }
    match veth {
        Some(v) => writeln!(
            w,
            "| /metrics p99 latency, {SCRAPERS} scrapers during a swap of {} rules (`metrics_scrape_p99_ms_during_swap`) | {:.1} ms | < 100 ms: {} |",
            v.scrapes.rules,
            v.scrapes.p99_ms,
            ok(v.scrapes.p99_ms < 100.0)
        )?,
        None => writeln!(w, "| /metrics p99 latency during a swap | not measured (`--no-veth`) | < 100 ms |")?,
    }
    match ratio {
        Some(x) => writeln!(w, "| iptables CPU per packet ÷ blokir's, 1,000 rules (`iptables_1k_cpu_ratio`) | {x:.0}× | ≥ 100×: {} |", ok(x >= 100.0))?,
        None => writeln!(w, "| iptables CPU per packet ÷ blokir's, 1,000 rules | not measured | ≥ 100× |")?,
    }

    writeln!(w, "\n## 1. Per-packet cost (BPF_PROG_TEST_RUN)\n")?;
    writeln!(
        w,
        "Method. blokir's real object (all five programs, the entry tail-calling the stages), loaded through the verifier with the \
         generated list applied by the rule engine exactly as the daemon does, and an XDP program that only returns `XDP_PASS`, \
         loaded in the same process. **Cold**: {samples} distinct packets per class, each run once (`repeat = 1`) by blokir and \
         then by the no-op; the kernel's own per-run duration is collected for both, the slowest 1% of each dropped \
         (preemption on a shared machine), and the means subtracted: the fixed cost of a test run (timer reads, context set-up) \
         cancels, and what is left is blokir's own work. DNS names are drawn at random from the list ({max} rules, 60% exact names, \
         40% subtree rules `.name`) or from unlisted names made by the same generator, so the rule map's buckets and entries are \
         not in cache (the map for {max} rules is far larger than the CPU caches, and every test run is a system call in between); \
         every TCP segment is a new flow (its own 4-tuple), as the TLS stage keeps per-flow state. ClientHellos are real captured \
         hellos re-targeted to the drawn names: {} for the one-segment class, {} cut just before the server_name extension for \
         the split class (its first segment fed first; both segments measured). Half of the hellos are to listed names. **Hot**: one \
         packet, `repeat = 100,000` (the figure BPF_PROG_TEST_RUN gives by default; for TLS the repeats after the first meet \
         the flow state the first run left, so hot TLS figures are not the cost of a new hello). Every verdict is checked (blocked → XDP_DROP, or for a ClientHello XDP_PASS \
         as a RST to the server; others → XDP_PASS): a run with a wrong verdict fails.\n",
        m.hello_clients.0, m.hello_clients.1
    )?;
    writeln!(w, "![net cost per class](cost.png)\n")?;
    for &k in counts.iter().rev() {
        writeln!(w, "### {k} rules\n")?;
        writeln!(
            w,
            "| class | packets | cold ns | no-op ns | net ns (mean) | net ns (median) | ÷ no-op | hot net ns |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        )?;
        for (c, desc) in CLASSES {
            if let Some(x) = find(&m.results, c, k) {
                writeln!(
                    w,
                    "| {desc} | {} | {:.0} | {:.0} | **{:.0}** | {:.0} | {:.2} | {:.0} |",
                    x.packets,
                    x.cold_mean,
                    x.noop_mean,
                    x.net(),
                    x.net_median(),
                    x.ratio(),
                    x.hot_net()
                )?;
            }
        }
        writeln!(w)?;
    }

    // Where the time goes, from this run's own numbers.
    let net_at = |c: &str, k: usize| find(&m.results, c, k).map(ClassResult::net).unwrap_or(f64::NAN);
    let hot_at = |c: &str, k: usize| find(&m.results, c, k).map(ClassResult::hot_net).unwrap_or(f64::NAN);
    writeln!(w, "### Reading these figures\n")?;
    writeln!(
        w,
        "- The entry program alone (Ethernet to the transport header, then pass) costs {:.0} ns net for non-DNS UDP and {:.0} ns for a \
         TCP ACK: these packets never reach a stage. A client's SYN costs {:.0} ns: the entry program records \
         where the connection's data starts (an LRU map lookup and insert, after a look for the pair's flow).\n\
         - A DNS query for an unlisted name costs {:.0} ns cold with {min} rules and {:.0} ns with {max}: the difference, {:.0} ns, is \
         what a large rule map adds (bucket and entry cache misses, one probe per label); the rest is the DNS stage's own work \
         (tail calls, name canonicalisation and hashing, per-CPU scratch maps) with cold caches and TLB. Hot, the same query costs \
         {:.0} ns.\n\
         - A plain HTTP GET costs {:.0} ns: the HTTP stage parses the headers again, records the flow in the LRU map, reads the \
         request up to its Host header, and the match stage matches the name.\n\
         - Cold figures put a system call and the no-op's run between two packets, so the program starts with cold caches every \
         time: an upper bound for a NIC's back-to-back packets; the hot figures are a lower bound that traffic with many \
         distinct names does not reach. {}\n",
        net_at("udp_other", max),
        net_at("tcp_ack", max),
        net_at("tcp_syn", max),
        net_at("dns_allowed", min),
        net_at("dns_allowed", max),
        net_at("dns_allowed", max) - net_at("dns_allowed", min),
        hot_at("dns_allowed", max),
        net_at("http_get", max),
        match live(max) {
            Some(l) => format!(
                "For comparison, the live path of section 4 (DNS traffic through a veth router: names cold, the program run \
                 back to back from the veth's NAPI loop, timed by the kernel's bpf_stats) measured {l:.0} ns per packet net of a no-op \
                 with {max} rules, mostly unlisted names: closer to the {} figure.",
                if (l - net_at("dns_allowed", max)).abs() < (l - hot_at("dns_allowed", max)).abs() { "cold" } else { "hot" }
            ),
            None => String::new(),
        }
    )?;

    writeln!(
        w,
        "- A data segment of a TCP flow whose hello was already allowed costs {:.0} ns net (port 443, 1.4 KB): the bulk of a link's \
         packets. The entry program looks the flow up and passes the segment itself (no tail call): the cost is that lookup in \
         the LRU flow table, whose element is cold. The ISP mix (`isp_mix_ns`) weighs the classes by a guessed share of packets: {}; it comes to **{:.0} ns** per \
         packet net.\n",
        net_at("tcp_data", max),
        crate::micro::ISP_MIX.iter().map(|(c, s)| format!("{c} {:.1} %", s * 100.0)).collect::<Vec<_>>().join(", "),
        crate::micro::ISP_MIX.iter().map(|(c, s)| s * net_at(c, max)).sum::<f64>()
    )?;

    stage_split(w, m, max)?;

    writeln!(w, "## 2. Scaling\n")?;
    writeln!(w, "Net cold cost (ns) by rule count; the same unlisted names at every count, listed names drawn from the rules loaded.\n")?;
    write!(w, "| class |")?;
    for k in counts {
        write!(w, " {k} |")?;
    }
    writeln!(w, " {max} ÷ {min} |")?;
    writeln!(w, "| --- |{}", " ---: |".repeat(counts.len() + 1))?;
    for (c, desc) in CLASSES {
        write!(w, "| {desc} |")?;
        for &k in counts {
            write!(w, " {:.0} |", find(&m.results, c, k).map(ClassResult::net).unwrap_or(f64::NAN))?;
        }
        let (a, b) = (find(&m.results, c, max).map(ClassResult::net), find(&m.results, c, min).map(ClassResult::net));
        writeln!(
            w,
            " {} |",
            match (a, b) {
                (Some(a), Some(b)) if b > 5.0 => format!("{:.2}", a / b),
                _ => "–".into(),
            }
        )?;
    }
    writeln!(
        w,
        "\n`scaling_2m_over_10` is the sum of the net costs of the five classes that read a name, at {max} rules ÷ at {min}: {scaling:.2}. With {min} rules the listed names are few and stay cached, so this ratio includes cache misses that only a large list causes.\n"
    )?;

    writeln!(w, "## 3. Memory and load times\n")?;
    writeln!(
        w,
        "Rules loaded through the daemon's path (read the file, plan, write the maps): {max} rules ({} name nodes) into maps sized for {} (the next power of two).\n",
        load.nodes, load.capacity
    )?;
    writeln!(w, "| step | time |\n| --- | ---: |")?;
    writeln!(w, "| load the program (verifier, all five programs) | {:.2} s |", load.program_load_s)?;
    writeln!(w, "| parse {max} rules from the file | {:.2} s |", load.parse_s)?;
    writeln!(w, "| plan (engine diff) | {:.2} s |", load.plan_s)?;
    writeln!(w, "| write the maps | {:.2} s |", load.apply_s)?;
    writeln!(w, "| **parse + load** | **{:.2} s** |", load.load_s())?;
    writeln!(
        w,
        "| atomic swap to a version with {} rules changed (1%): parse {:.2} s, plan {:.2} s, {} map writes {:.2} s | **{:.2} s** |",
        load.swap_changed,
        load.swap_parse_s,
        load.swap_plan_s,
        load.swap_writes,
        load.swap_apply_s,
        load.swap_s()
    )?;
    writeln!(w, "\nKernel memory, from each map's `memlock` in `/proc/self/fdinfo` (the kernel's own accounting):\n")?;
    writeln!(w, "| map type | max entries | key B | value B | memlock |\n| --- | ---: | ---: | ---: | ---: |")?;
    for mm in &load.maps {
        writeln!(w, "| {} | {} | {} | {} | {:.1} MiB |", map_type(mm.map_type), mm.max_entries, mm.key_size, mm.value_size, mm.memlock as f64 / 1048576.0)?;
    }
    writeln!(
        w,
        "\nTotal {:.1} MiB = **{bytes_per_rule:.0} B per rule** at {max} rules; the maps sized by the rule capacity (rule map, rule-hit counters) \
         account for {:.1} MiB ({:.0} B per rule), the rest (per-CPU scratch, TLS flow table, counters) is fixed. \
         The benchmark process's resident memory grew by {} MiB while loading (the engine's host-side copy of the rules).\n",
        load.memlock() as f64 / 1048576.0,
        load.rule_memlock() as f64 / 1048576.0,
        load.rule_memlock() as f64 / max as f64,
        (load.rss_after.saturating_sub(load.rss_before)) / 1024
    )?;
    if let Some(v) = veth {
        let d = &v.daemon;
        let dm: u64 = d.maps.iter().map(|m| m.memlock).sum();
        writeln!(
            w,
            "The real daemon (`blokir run --rules` with {} rules, default `--rule-capacity` 4,194,304, in the router namespace): \
             ready (program loaded, maps written, attached) {:.1} s after start; **RSS {:.0} MiB** (peak {:.0} MiB; {:.0} MiB after \
             the swap of 1 rule in 20 below); its maps hold \
             {:.1} MiB of kernel memory ({:.0} B per rule at the default capacity).\n",
            d.rules,
            d.ready_s,
            d.rss_kib as f64 / 1024.0,
            d.hwm_kib as f64 / 1024.0,
            d.swap_hwm_kib as f64 / 1024.0,
            dm as f64 / 1048576.0,
            dm as f64 / d.rules as f64
        )?;
    }

    if let Some(v) = veth {
        let s = &v.scrapes;
        writeln!(
            w,
            "/metrics during a list swap: {SCRAPERS} clients scraped the daemon in a loop while `blokir rules reload` swapped its {} rules \
             for a version changing {} of them ({:.1} s under the daemon's lock: parse, plan, map writes). {} scrapes were begun and \
             answered during the swap: **p50 {:.1} ms, p99 {:.1} ms**, max {:.1} ms (`metrics_scrape_p99_ms_during_swap`). A scrape \
             reads the counters from the maps itself and the lists' figures as published after the last change, so it never waits \
             for a swap.\n",
            s.rules, s.changed, s.swap_s, s.scrapes, s.p50_ms, s.p99_ms, s.max_ms
        )?;
    }

    writeln!(w, "## 4. Side by side with iptables string matching\n")?;
    match veth {
        None => writeln!(w, "Not run (`--no-veth`).\n")?,
        Some(v) => {
            writeln!(
                w,
                "Three network namespaces, client → router → sink, joined by veth pairs (198.18.0.0/15 only). The client sends DNS \
                 queries over UDP with `sendmmsg` (batches of 64) as fast as it can for {:.0} s per configuration, from one thread pinned \
                 to CPU 0; the sink counts what arrives with `recvmmsg` on CPU 1. The traffic cycles through {} distinct queries: 28 in 32 \
                 for unlisted names, 3 in 32 for listed names (blocked by every filter), and 1 in 32 a probe name (below). The router \
                 forwards, and filters its ingress from the client:\n\n\
                 - **blokir**: the real daemon (`blokir run --mode native`), so XDP runs in the veth driver's NAPI path, as on a NIC. \
                 (Generic mode would run after an skb is built, which is not how blokir runs on a physical NIC.) A no-op XDP program \
                 in the same place is measured too: attaching any native XDP program to veth switches it to its NAPI path, a veth \
                 property.\n\
                 - **iptables**: `iptables -A FORWARD -p udp --dport 53 -m string --algo bm --hex-string '|08|telegram|03|org|' -j DROP`, \
                 one rule per name (iptables-nft with the xt_string match), the same names as blokir's list: telegram.org and the \
                 first names of the generated list.\n\n\
                 CPU per packet is the CPU time of the threads that carry the traffic (sender, sink, ksoftirqd; from the scheduler's \
                 per-thread `schedstat`, in ns; this kernel charges softirq work to the thread it runs in), divided by the packets that \
                 entered the router; other processes on the machine do not count. blokir's own program time is also read from the \
                 kernel (`kernel.bpf_stats_enabled`, the entry program's `run_time_ns / run_cnt`, tail calls included).\n",
                v.seconds, v.ring
            )?;
            let base = v.runs.iter().find(|r| r.name == "unfiltered").map(|r| r.cpu_per_packet()).unwrap_or(0.0);
            writeln!(
                w,
                "| router filter | sent, pps | lost before the router | into the router, pps | delivered, pps | CPU ns / packet | ÷ unfiltered | over unfiltered, ns | XDP program ns / packet |"
            )?;
            writeln!(w, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")?;
            for run in &v.runs {
                writeln!(
                    w,
                    "| {} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {} |",
                    run.name,
                    run.sent as f64 / run.seconds,
                    run.lost,
                    run.pps_in(),
                    run.pps_out(),
                    run.cpu_per_packet(),
                    run.cpu_per_packet() / base.max(1.0),
                    run.cpu_per_packet() - base,
                    run.prog_ns.map_or("".into(), |p| format!("{p:.0}"))
                )?;
            }
            writeln!(
                w,
                "\nPackets per second depend on how much of CPU 0 the sender got from the other processes on this shared machine; \
                 CPU per packet does not, and is the figure to compare.\n"
            )?;
            if let (Some(r), Some(i), Some(p)) = (ratio, ipt_net, blokir_prog) {
                writeln!(
                    w,
                    "\n`iptables_1k_cpu_ratio` = iptables' CPU per packet over the unfiltered router with 1,000 rules ({i:.0} ns) ÷ \
                     blokir's program time per packet with 1,000 rules in the same path ({p:.0} ns) = **{r:.0}×**. (blokir's own \
                     difference to the unfiltered router is within the noise of the whole path and includes veth's NAPI switch, see \
                     the no-op row; blocked queries dropped at ingress also save the router forwarding them.)\n"
                )?;
            }
            if let (Some(a), Some(b)) = (live(1000), live(max)) {
                writeln!(
                    w,
                    "blokir's program in the live path, net of the no-op program's time in the same place (also from bpf_stats): \
                     **{a:.0} ns** per packet with 1,000 rules and **{b:.0} ns** with {max}, over this traffic (mostly allowed names, \
                     each of the {} distinct queries seen once per cycle: the names are cold, the program is warm).\n",
                    v.ring
                )?;
            }
            writeln!(w, "Correctness: probe queries that reached the sink, of those sent (blokir's list has `telegram.org` as an exact name):\n")?;
            write!(w, "| router filter |")?;
            for (n, blocked) in PROBES {
                write!(w, " {n} ({}) |", if blocked { "listed" } else { "not listed" })?;
            }
            writeln!(w, "\n| --- |{}", " ---: |".repeat(PROBES.len()))?;
            for run in &v.runs {
                write!(w, "| {} |", run.name)?;
                for (_, got, sent) in &run.probes {
                    write!(w, " {got} / {sent} |")?;
                }
                writeln!(w)?;
            }
            writeln!(
                w,
                "\nSubstring matching cannot tell a name from a longer name that contains it: `|08|telegram|03|org|` also matches \
                 `my.telegram.org` (a name the exact rule does not list) and `telegram.org.evil.example`. The rule as written here, \
                 with the label length byte first, does not match `nottelegram.org` (`|0b|nottelegram|03|org|`); the plainer form \
                 many operators use, `-m string --string telegram`, would. blokir matches whole names by their labels, so only \
                 `telegram.org` is blocked.\n"
            )?;
        }
    }
    writeln!(
        w,
        "## Reproducing\n\n`cargo xtask bench` (as root; ~{:.0} min here) or `cargo xtask bench --quick` (< 1 min). The list is generated from a fixed seed; the hash keys are random per run, as in the daemon.",
        elapsed / 60.0
    )?;
    std::fs::write(args.out.join("REPORT.md"), r)?;
    Ok(())
}

fn map_type(t: u32) -> String {
    match t {
        1 => "hash".into(),
        2 => "array".into(),
        3 => "prog array".into(),
        5 => "hash (per CPU)".into(),
        6 => "array (per CPU)".into(),
        9 => "LRU hash".into(),
        n => format!("type {n}"),
    }
}

fn plot(args: &Args, m: &Micro, counts: &[usize]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let font =
        std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").context("the DejaVu font (fonts-dejavu-core; `cargo xtask setup` installs it)")?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font).map_err(|_| anyhow::anyhow!("registering the font"))?;
    let path = args.out.join("cost.png");
    let root = BitMapBackend::new(&path, (1400, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = CLASSES.len();
    let ymax = m.results.iter().map(|r| r.net()).fold(10.0, f64::max) * 1.15;
    let ymin = m.results.iter().map(|r| r.net()).fold(0.0, f64::min).min(0.0);
    // A band under zero for the class names.
    let band = (ymax - ymin) * 0.08;
    let mut chart = ChartBuilder::on(&root)
        .caption("blokir: net cost per packet over a no-op XDP program (BPF_PROG_TEST_RUN, cold)", ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, (ymin - band)..ymax)?;
    let short = ["DNS allowed", "DNS exact", "DNS subtree", "TLS 1 seg", "TLS split 1st", "TLS split 2nd", "HTTP GET", "UDP other", "TCP ACK"];
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("ns per packet, net of the no-op")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    chart.draw_series(
        short.iter().enumerate().map(|(i, s)| Text::new(s.to_string(), (i as f64 + 0.08, ymin - band * 0.35), ("sans-serif", 15).into_font().color(&BLACK))),
    )?;
    chart.draw_series(std::iter::once(PathElement::new(vec![(0.0, 0.0), (n as f64, 0.0)], BLACK)))?;
    let colors = [RGBColor(0x9e, 0xca, 0xe1), RGBColor(0x42, 0x92, 0xc6), RGBColor(0x08, 0x51, 0x9c), RGBColor(0x08, 0x30, 0x6b)];
    let groups = counts.len().max(1) as f64;
    for (j, &k) in counts.iter().enumerate() {
        let color = colors[j % colors.len()];
        let width = 0.8 / groups;
        chart
            .draw_series(CLASSES.iter().enumerate().filter_map(|(i, (c, _))| {
                let r = find(&m.results, c, k)?;
                let x0 = i as f64 + 0.1 + j as f64 * width;
                Some(Rectangle::new([(x0, 0.0), (x0 + width * 0.9, r.net())], color.filled()))
            }))?
            .label(format!("{k} rules"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}

/// The per-class split of the cost between the entry program, the reading
/// stages and the match and answer stages (`micro::StageSplit`).
fn stage_split(w: &mut impl std::fmt::Write, m: &Micro, max: usize) -> anyhow::Result<()> {
    if m.stages.is_empty() {
        return Ok(());
    }
    writeln!(w, "### Where the time goes ({max} rules)\n")?;
    writeln!(
        w,
        "Every class measured twice more in the same run with the tail-call chain cut short: the entry program alone (every stage's \
         slot emptied, so each tail call returns and the packet passes), then with the stages that read a packet (DNS, which \
         matches its name itself; TLS, HTTP, QUIC, the compare stage) but not the match stage (TLS and HTTP names) nor the answer \
         stage (DNS answers, RSTs): a name read goes no further, and the reader fails closed as when a tail call fails. The differences are each part's share of the net cold cost; hellos that set a flow up before the \
         measured segment always run the whole chain. The three runs are seconds apart, not packet by packet (a stage slot's \
         update waits for an RCU grace period), so a class the entry program serves alone (other UDP, ACK, SYN) shows this \
         method's noise: it should read the same in every column but the first, and a difference there (the SYN's LRU map \
         fuller or emptier from run to run) is the margin to allow the others. This VM exposes no hardware performance counters (`perf stat -e \
         instructions` says `<not supported>`; no `cpu` PMU), so instructions executed and cache misses cannot be counted here; on a \
         host with a PMU, `bpftool prog profile id <entry program> cycles instructions llc_misses` over the same traffic adds them.\n"
    )?;
    writeln!(w, "| class | entry program ns | reading stages ns | match and answer ns | whole ns |\n| --- | ---: | ---: | ---: | ---: |")?;
    for (c, desc) in CLASSES {
        if let Some(x) = m.stages.iter().find(|x| x.class == *c) {
            writeln!(w, "| {desc} | {:.0} | {:.0} | {:.0} | **{:.0}** |", x.entry, x.readers - x.entry, x.whole - x.readers, x.whole)?;
        }
    }
    writeln!(w)?;
    Ok(())
}
