//! /metrics as an ISP's monitoring would use it: scraped live and checked by
//! `promtool check metrics`, scraped by a real Prometheus server while real
//! `dig` traffic is blocked, the packaged alert rules and dashboard checked
//! against a live scrape, the endpoint over TLS with basic auth and over a
//! Unix socket, /readyz, and privacy (no queried name or client address in
//! the logs or the metrics).
//!
//! Run as root, serially:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test e2e_metrics -- --test-threads=1`.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use blokir_tests::{
    Loaded,
    netns::{self, Captured, EDGE_CLIENT_IFACE, Family, METRICS_ADDR, Metrics, Query, RESOLVER4, TELEGRAM_NAMES, Topology, Transport, telegram_rules},
};
use filter_common::{
    flow::Flow,
    rules::MAP_FLOWS,
    tls::{FlowKey, Hello},
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn telegram_file(topo: &Topology) -> PathBuf {
    let path = topo.dir().join("telegram.rules");
    std::fs::write(&path, telegram_rules()).unwrap();
    path
}

#[track_caller]
fn curl(topo: &Topology, args: &[&str]) -> Captured {
    let mut all = vec!["curl", "-sS", "--max-time", "10"];
    all.extend_from_slice(args);
    topo.run_in(topo.edge(), &all, Duration::from_secs(20)).unwrap()
}

/// `curl -w '%{http_code}'`: (status, body).
#[track_caller]
fn http(topo: &Topology, args: &[&str]) -> (u16, String) {
    let mut all = vec!["-o", "-", "-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let out = curl(topo, &all);
    let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", &out.stdout));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Runs dig queries at once; each must be blocked (dropped: dig times out)
/// or resolve, as `blocked` says.
#[track_caller]
fn dig(topo: &Topology, queries: &[Query], blocked: bool) {
    for a in topo.dig_all(queries).unwrap() {
        if blocked {
            assert!(a.timed_out(), "expected {} to be blocked, got:\n{a}", a.query);
        } else {
            assert!(a.resolved_to_expected(), "expected {} to resolve, got:\n{a}", a.query);
        }
    }
}

fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("blokir_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end].is_ascii_digit() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(text[start..end].to_string());
        i = end;
    }
    names
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn alert_rules_pass_promtool_and_each_fires_on_its_condition() {
    let dir = repo().join("packaging/prometheus");
    let check = netns::run(Command::new("promtool").args(["check", "rules", "alerts.yml"]).current_dir(&dir), Duration::from_secs(60)).unwrap();
    assert!(check.success() && !check.stdout.contains("WARNING") && !check.stderr.contains("WARNING"), "{check}");
    let test = netns::run(Command::new("promtool").args(["test", "rules", "alerts_test.yml"]).current_dir(&dir), Duration::from_secs(120)).unwrap();
    assert!(test.success(), "{test}");
    // Every alert of the file has a unit test.
    let alerts = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("alerts_test.yml")).unwrap();
    let names: Vec<&str> = alerts.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert!(names.len() >= 5, "{names:?}");
    for n in names {
        assert!(tests.contains(&format!("alertname: {n}")), "alert {n} has no test in alerts_test.yml");
    }
}

/// Counting the flow table at its capacity: every flow is found, in the
/// state it is in (the walk's time is printed, for the record).
#[test]
fn counting_a_full_flow_table_finds_every_flow_in_its_state() {
    let mut l = Loaded::new(&["t.me"]);
    let (empty, capacity) = l.kernel.flow_census().unwrap();
    assert_eq!((empty.total, capacity), (0, filter_common::tls::DEFAULT_FLOW_CAPACITY));
    {
        let map = l.kernel.map_mut(MAP_FLOWS).unwrap();
        let mut flows: aya::maps::HashMap<&mut aya::maps::MapData, FlowKey, Flow> = aya::maps::HashMap::try_from(map).unwrap();
        for i in 0..capacity {
            let mut key = FlowKey { family: 6, src_port: 443, ..FlowKey::default() };
            key.src[..4].copy_from_slice(&i.to_be_bytes());
            let mut hello = Hello::new(1);
            if i % 4 == 0 {
                hello.block(false);
            }
            flows.insert(key, Flow { hello }, 0).unwrap();
        }
    }
    let started = Instant::now();
    let (c, _) = l.kernel.flow_census().unwrap();
    eprintln!("counted {} of {capacity} flows in {:?}", c.total, started.elapsed());
    // The LRU map may have evicted a few while it was filled.
    assert!(c.total > u64::from(capacity) * 9 / 10 && c.total <= u64::from(capacity), "{c:?} of {capacity}");
    assert_eq!(c.tls_reading + c.tls_blocked, c.total, "{c:?}");
    assert_eq!((c.http_reading, c.http_blocked), (0, 0));
    let quarter = c.total / 4;
    assert!(c.tls_blocked.abs_diff(quarter) < quarter / 10, "a quarter are blocked: {c:?}");
}

#[test]
fn live_scrape_passes_promtool_and_carries_every_metric_the_dashboard_and_alerts_use() {
    let topo = Topology::new().unwrap();
    let file = telegram_file(&topo);
    let d = topo.start_daemon(std::slice::from_ref(&file)).unwrap();
    dig(&topo, &[Query::udp4("t.me"), Query::tcp6("web.telegram.org")], true);
    dig(&topo, &[Query::udp4("example.test")], false);
    let out = d.cli(&["rules", "add", "--allow", "core.telegram.org"]).unwrap();
    assert!(out.success(), "{out}");
    dig(&topo, &[Query::udp6("core.telegram.org")], false);

    // The text format, as curl and promtool read it.
    let m = d.metrics().unwrap();
    let mut promtool = Command::new("promtool").args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    promtool.stdin.take().unwrap().write_all(m.text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}\non\n{}", m.text);

    // OpenMetrics, as Prometheus asks for it.
    let om = curl(&topo, &["-H", "Accept: application/openmetrics-text;version=1.0.0", "-D", "-", &format!("http://{METRICS_ADDR}/metrics")]);
    assert!(om.stdout.contains("application/openmetrics-text") && om.stdout.trim_end().ends_with("# EOF"), "{om}");
    assert!(om.stdout.contains("# TYPE blokir_blocked counter") && om.stdout.contains("# UNIT blokir_map_memory_bytes bytes"), "{om}");

    // Every metric the packaged dashboard and alerts use is served.
    let served: BTreeSet<String> = m.samples().into_iter().map(|(n, _, _)| n).collect();
    for file in ["packaging/grafana/blokir.json", "packaging/prometheus/alerts.yml"] {
        let used = metric_names_in(&std::fs::read_to_string(repo().join(file)).unwrap());
        assert!(used.len() >= 5, "{file}: {used:?}");
        for name in used {
            assert!(served.contains(&name), "{file} uses {name}, which /metrics does not serve:\n{}", m.text);
        }
    }
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repo().join("packaging/grafana/blokir.json")).unwrap()).unwrap();
    assert!(dash["panels"].as_array().unwrap().len() >= 10);

    // The values.
    let v = |name: &str, labels: &[(&str, &str)]| m.value(name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{}", m.text));
    assert_eq!(v("blokir_blocked_total", &[("proto", "dns_udp"), ("af", "ipv4")]), 1);
    assert_eq!(v("blokir_blocked_total", &[("proto", "dns_tcp"), ("af", "ipv6")]), 1);
    assert_eq!(v("blokir_allow_rule_hits_total", &[("proto", "dns_udp"), ("af", "ipv6")]), 1);
    assert_eq!(v("blokir_list_blocked_total", &[("list", "telegram")]), 2);
    assert_eq!(v("blokir_list_allowed_total", &[("list", "local")]), 1);
    assert_eq!(v("blokir_rule_hits_total", &[("list", "telegram"), ("rule", "t.me")]), 1);
    assert_eq!(v("blokir_rule_hits_total", &[("list", "local"), ("rule", "allow core.telegram.org")]), 1);
    let attached: Vec<_> = m.samples().into_iter().filter(|(n, l, _)| n == "blokir_attached" && l["iface"] == EDGE_CLIENT_IFACE).collect();
    assert!(attached.len() == 1 && attached[0].2 == 1.0 && attached[0].1["mode"] != "none", "{attached:?}");
    assert_eq!(v("blokir_tls_flow_capacity", &[]), 65536);
    assert_eq!(v("blokir_tls_flows", &[]), 0);
    assert!(v("blokir_map_memory_bytes", &[("map", "rules")]) > 0);
    assert!(v("blokir_map_memory_bytes", &[("map", "flows")]) > 0);
    assert_eq!(v("blokir_list_rules", &[("list", "telegram")]), TELEGRAM_NAMES.len() as u64);
    assert_eq!(v("blokir_list_version", &[("list", "telegram")]), 1);
    assert_eq!(v("blokir_list_version", &[("list", "local")]), 2, "the local list: loaded (1), then one rule added (2)");
    assert_eq!(v("blokir_list_update_failures_total", &[("list", "telegram")]), 0);
    let stamp = |m: &Metrics, list: &str| {
        m.samples().into_iter().find(|(n, l, _)| n == "blokir_list_last_update_timestamp_seconds" && l.get("list").map(String::as_str) == Some(list)).unwrap().2
    };
    let loaded_at = stamp(&m, "telegram");
    assert!((now() - loaded_at).abs() < 120.0, "last update {loaded_at}, now {}", now());

    // A refused reload counts as a failure and changes nothing; an
    // unchanged reload refreshes the time, not the version; a changed one
    // bumps the version.
    std::fs::write(&file, format!("{}bad..name\n", telegram_rules())).unwrap();
    let out = d.cli(&["rules", "reload"]).unwrap();
    assert!(!out.success(), "{out}");
    let m = d.metrics().unwrap();
    assert_eq!(m.value("blokir_list_update_failures_total", &[("list", "telegram")]), Some(1));
    assert_eq!(m.value("blokir_list_version", &[("list", "telegram")]), Some(1));
    assert_eq!(stamp(&m, "telegram"), loaded_at);
    thread::sleep(Duration::from_millis(20));
    std::fs::write(&file, telegram_rules()).unwrap();
    assert!(d.cli(&["rules", "reload"]).unwrap().success());
    let m = d.metrics().unwrap();
    assert_eq!(m.value("blokir_list_version", &[("list", "telegram")]), Some(1));
    assert!(stamp(&m, "telegram") > loaded_at);
    std::fs::write(&file, format!("{}extra.example.test\n", telegram_rules())).unwrap();
    assert!(d.cli(&["rules", "reload"]).unwrap().success());
    let m = d.metrics().unwrap();
    assert_eq!(m.value("blokir_list_version", &[("list", "telegram")]), Some(2));
    assert_eq!(m.value("blokir_list_update_failures_total", &[("list", "telegram")]), Some(1));
    d.stop().unwrap();
}

/// Prometheus in the edge namespace, scraping the daemon every second.
struct Prometheus {
    _run: netns::Running,
    api: String,
}

const PROMETHEUS_ADDR: &str = "127.0.0.1:9090";

impl Prometheus {
    fn start(topo: &Topology) -> Self {
        let dir = topo.dir().join("prometheus");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: blokir\n    static_configs:\n      - targets: ['{METRICS_ADDR}']\n"),
        )
        .unwrap();
        let mut cmd = topo.exec(topo.edge(), "prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={PROMETHEUS_ADDR}"));
        let run = netns::start(&mut cmd).unwrap();
        let p = Prometheus { _run: run, api: format!("http://{PROMETHEUS_ADDR}/api/v1") };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http(topo, &[&format!("http://{PROMETHEUS_ADDR}/-/ready")]).0 != 200 {
            assert!(Instant::now() < deadline, "Prometheus was not ready within 60 s");
            thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// The result of an instant query: labels and value of each series.
    fn query(&self, topo: &Topology, q: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let out = curl(topo, &["--fail", "-G", &format!("{}/query", self.api), "--data-urlencode", &format!("query={q}")]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["status"], "success", "{v}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let labels = s["metric"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
                (labels, s["value"][1].as_str().unwrap().parse().unwrap())
            })
            .collect()
    }
}

#[test]
fn prometheus_scrapes_the_blocked_counts_of_real_dig_traffic() {
    let topo = Topology::new().unwrap();
    let d = topo.start_daemon(&[telegram_file(&topo)]).unwrap();
    let prom = Prometheus::start(&topo);

    // Distinct counts per protocol and family, so a mix-up shows.
    let sent: [(Transport, Family, &[&str]); 4] = [
        (Transport::Udp, Family::V4, &["t.me", "telegram.org", "web.telegram.org", "core.telegram.org"]),
        (Transport::Udp, Family::V6, &["telegram.me", "desktop.telegram.org", "macos.telegram.org"]),
        (Transport::Tcp, Family::V4, &["venus.web.telegram.org"]),
        (Transport::Tcp, Family::V6, &["pluto.web.telegram.org", "flora.web.telegram.org"]),
    ];
    let mut blocked = Vec::new();
    for (t, f, names) in sent {
        blocked.extend(names.iter().map(|n| Query::new(n, t, f)));
    }
    dig(&topo, &blocked, true);
    dig(&topo, &[Query::udp4("example.test"), Query::udp6("www.example.test"), Query::tcp4("my.telegram.org")], false);

    let want: BTreeMap<(String, String), f64> = sent.iter().map(|(t, f, names)| ((t.label().to_string(), f.label().to_string()), names.len() as f64)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let rows = prom.query(&topo, "sum by (proto, af) (blokir_blocked_total{job=\"blokir\"})");
        let got: BTreeMap<(String, String), f64> =
            rows.into_iter().filter(|(_, v)| *v > 0.0).map(|(l, v)| ((l["proto"].clone(), l["af"].clone()), v)).collect();
        if got == want || Instant::now() > deadline {
            break got;
        }
        thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(got, want, "blokir_blocked_total in Prometheus vs. the queries dig sent and saw dropped");
    let total: f64 = want.values().sum();
    let by_list = prom.query(&topo, "blokir_list_blocked_total{job=\"blokir\"}");
    assert_eq!(by_list.len(), 2, "{by_list:?}");
    for (l, v) in by_list {
        assert_eq!(v, if l["list"] == "telegram" { total } else { 0.0 }, "{l:?}");
    }
    let drops = prom.query(&topo, "blokir_dns_actions_total{job=\"blokir\", action=\"drop\"}");
    assert_eq!(drops.iter().map(|r| r.1).sum::<f64>(), total);
    let up = prom.query(&topo, "up{job=\"blokir\"}");
    assert_eq!(up.iter().map(|r| r.1).collect::<Vec<_>>(), vec![1.0]);
    let attached = prom.query(&topo, "blokir_attached{job=\"blokir\"}");
    assert_eq!(attached.len(), 1, "{attached:?}");
    assert_eq!((attached[0].0["iface"].as_str(), attached[0].1), (EDGE_CLIENT_IFACE, 1.0));
    d.stop().unwrap();
}

#[test]
fn endpoint_over_tls_with_basic_auth_and_over_a_unix_socket() {
    let topo = Topology::new().unwrap();
    let dir = topo.dir();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = netns::run(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=blokir-test"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(out.success(), "{out}");
    let users = dir.join("users");
    std::fs::write(&users, format!("# who may scrape\nprometheus:{}\n", bcrypt::hash("s3cret pass", 4).unwrap())).unwrap();
    let tls_addr = "127.0.0.1:9948";
    let d = topo
        .start_daemon_with(
            &[telegram_file(&topo)],
            &[
                "--metrics-addr",
                tls_addr,
                "--metrics-tls-cert",
                cert.to_str().unwrap(),
                "--metrics-tls-key",
                key.to_str().unwrap(),
                "--metrics-basic-auth-file",
                users.to_str().unwrap(),
            ],
        )
        .unwrap();
    let url = format!("https://{tls_addr}/metrics");
    let cacert = cert.to_str().unwrap();
    let (code, body) = http(&topo, &["--cacert", cacert, "-u", "prometheus:s3cret pass", &url]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("blokir_build_info{"), "{body}");
    for (who, creds) in [("no credentials", None), ("a wrong password", Some("prometheus:wrong")), ("an unknown user", Some("root:s3cret pass"))] {
        let mut args = vec!["--cacert", cacert, "-D", "-"];
        if let Some(c) = creds {
            args.extend(["-u", c]);
        }
        args.push(&url);
        let (code, body) = http(&topo, &args);
        assert_eq!(code, 401, "{who}: {body}");
        assert!(body.to_ascii_lowercase().contains("www-authenticate: basic realm=\"blokir\""), "{who}: {body}");
        assert!(!body.contains("blokir_build_info"), "{who}: {body}");
    }
    let plain = curl(&topo, &[&format!("http://{tls_addr}/metrics")]);
    assert!(!plain.stdout.contains("blokir_build_info"), "plain HTTP to the TLS endpoint: {plain}");
    d.stop().unwrap();

    // A Unix socket, root only, removed on exit.
    let sock = dir.join("metrics.sock");
    let d = topo.start_daemon_with(&[], &["--metrics-addr", &format!("unix:{}", sock.display())]).unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let (code, body) = http(&topo, &["--unix-socket", sock.to_str().unwrap(), "http://blokir/metrics"]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("blokir_attached{iface=\"c0\""), "{body}");
    let (code, body) = http(&topo, &["--unix-socket", sock.to_str().unwrap(), "http://blokir/readyz"]);
    assert!(code == 200 && body.starts_with("ready\n"), "{code} {body}");
    d.stop().unwrap();
    assert!(!sock.exists(), "the metrics socket is left behind");
}

/// /readyz answers 503 with the reason while a large list loads, and 200
/// once the program is attached; /healthz answers 200 throughout.
#[test]
fn readyz_is_503_while_loading_and_200_once_attached() {
    let topo = Topology::new().unwrap();
    let big = topo.dir().join("big.rules");
    let mut text = String::new();
    for i in 0..300_000 {
        text.push_str(&format!("n{i}.big.example.test\n"));
    }
    std::fs::write(&big, text).unwrap();
    let mut cmd = topo.daemon_command(&[big]).unwrap();
    let log = topo.dir().join("readyz.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap();
    let url = |p: &str| format!("http://{METRICS_ADDR}/{p}");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(child.try_wait().unwrap().is_none(), "blokir exited:\n{}", std::fs::read_to_string(&log).unwrap());
        assert!(Instant::now() < deadline, "not ready within 120 s; saw {seen:?}");
        let (code, body) = http(&topo, &["--max-time", "2", &url("readyz")]);
        if code == 0 {
            continue; // not listening yet
        }
        // Its second line says where the pins are and that they persist.
        let (first, pins) = body.split_once('\n').unwrap_or((&body, ""));
        assert!(pins.starts_with(&format!("pins in {}: they outlive the daemon", topo.pin_dir().display())), "{body}");
        if seen.last() != Some(&(code, first.to_string())) {
            seen.push((code, first.to_string()));
        }
        if code == 503 {
            assert_eq!(http(&topo, &[&url("healthz")]), (200, "ok\n".to_string()));
            // 503 too, unless the daemon became ready in between.
            let metrics = http(&topo, &[&url("metrics")]).0;
            assert!(metrics == 503 || http(&topo, &[&url("readyz")]).0 == 200, "/metrics answered {metrics} before /readyz said ready");
        }
        if code == 200 {
            break;
        }
    }
    assert_eq!(seen, vec![(503, "not ready: loading the rules".to_string()), (200, "ready".to_string())], "/readyz went through these answers");
    assert!(topo.xdp_attached().unwrap());
    netns::send_signal(child.id(), "TERM").unwrap();
    assert!(child.wait().unwrap().success());
}

/// With the defaults, neither the daemon's log nor /metrics carries a name
/// a subscriber looked up (that is not itself a rule) or a client address.
#[test]
fn no_queried_name_or_client_address_in_logs_or_metrics_by_default() {
    let topo = Topology::new().unwrap();
    let rules = topo.dir().join("wild.rules");
    std::fs::write(&rules, "*.example.test\n").unwrap();
    let d = topo.start_daemon(&[rules]).unwrap();
    let blocked = [Query::udp4("www.example.test"), Query::tcp6("mail.example.test"), Query::udp6("www.example.test")];
    dig(&topo, &blocked, true);
    dig(&topo, &[Query::udp4("my.telegram.org"), Query::tcp4("nottelegram.org")], false);
    let m = d.metrics().unwrap();
    assert_eq!(m.value("blokir_list_blocked_total", &[("list", "wild")]), Some(3), "the traffic was blocked");
    assert_eq!(m.value("blokir_rule_hits_total", &[("list", "wild"), ("rule", "*.example.test")]), Some(3));
    d.stop().unwrap();
    let log = std::fs::read_dir(topo.dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("blokir-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<String>();
    assert!(log.contains("attached"), "the daemon's log: {log}");
    for secret in ["www.example.test", "mail.example.test", "my.telegram.org", "nottelegram.org", "198.18.0.1", "2001:db8::1"] {
        assert!(!log.contains(secret), "the daemon's log contains {secret}:\n{log}");
        assert!(!m.text.contains(secret), "/metrics contains {secret}:\n{}", m.text);
    }
}

/// Lines of the daemon's log that are events (`blokir::events`) naming a
/// blocked name.
fn event_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("blokir::events") && l.contains("name=")).collect()
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}.example.test")).collect()
}

/// The event log: off by default (the kernel writes nothing, no event in
/// the log); on, each blocked name is logged with its protocol, family,
/// list and rule and no address; sampled per rule in the kernel; held to
/// its rate.
#[test]
fn event_log_is_opt_in_sampled_per_rule_and_rate_limited() {
    let topo = Topology::new().unwrap();
    let rules = topo.dir().join("wild.rules");
    std::fs::write(&rules, "*.example.test\n").unwrap();
    let tg = telegram_file(&topo);

    // Off by default.
    let d = topo.start_daemon(&[rules.clone(), tg.clone()]).unwrap();
    dig(&topo, &[Query::udp4("www.example.test"), Query::tcp6("t.me")], true);
    let m = d.metrics().unwrap();
    assert_eq!(m.value("blokir_list_blocked_total", &[("list", "wild")]), Some(1));
    assert!(m.lines_of("blokir_events").is_empty(), "{}", m.text);
    d.stop().unwrap();

    // On: every block (sample 1/1) within the default rate.
    let d = topo.start_daemon_with(&[rules.clone(), tg.clone()], &["--event-log"]).unwrap();
    dig(&topo, &[Query::udp4("www.example.test"), Query::tcp6("mail.example.test"), Query::udp6("web.telegram.org"), Query::tcp4("t.me")], true);
    dig(&topo, &[Query::udp4("my.telegram.org")], false);
    let deadline = Instant::now() + Duration::from_secs(5);
    while event_lines(&d.log()).len() < 4 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let log = d.log();
    let events = event_lines(&log);
    assert_eq!(events.len(), 4, "{log}");
    for (name, proto, af, list, rule) in [
        ("www.example.test", "dns_udp", "ipv4", "wild", "*.example.test"),
        ("mail.example.test", "dns_tcp", "ipv6", "wild", "*.example.test"),
        ("web.telegram.org", "dns_udp", "ipv6", "telegram", "web.telegram.org"),
        ("t.me", "dns_tcp", "ipv4", "telegram", "t.me"),
    ] {
        let line = events
            .iter()
            .find(|l| l.contains(&format!("name={name}")) || l.contains(&format!("name=\"{name}\"")))
            .unwrap_or_else(|| panic!("no event for {name}:\n{log}"));
        for field in [proto, af, list, rule] {
            assert!(line.contains(field), "{field} missing in {line}");
        }
    }
    assert!(!log.contains("my.telegram.org"), "a passed name was logged:\n{log}");
    for addr in ["198.18.0.1", "2001:db8::1"] {
        assert!(!log.contains(addr), "a client address was logged:\n{log}");
    }
    let m = d.metrics().unwrap();
    assert_eq!(m.value("blokir_events_total", &[("outcome", "logged")]), Some(4));
    d.stop().unwrap();

    // Sampled per rule: 1/3 of 7 blocks by one rule are its 1st, 4th, 7th.
    let d = topo.start_daemon_with(std::slice::from_ref(&rules), &["--event-log", "--event-log-sample", "1/3"]).unwrap();
    let sampled = names("s", 7);
    dig(&topo, &sampled.iter().map(|n| Query::udp4(n)).collect::<Vec<_>>(), true);
    thread::sleep(Duration::from_millis(500));
    let m = d.metrics().unwrap();
    assert_eq!(m.value("blokir_rule_hits_total", &[("list", "wild"), ("rule", "*.example.test")]), Some(7));
    assert_eq!(event_lines(&d.log()).len(), 3, "{}", d.log());
    assert_eq!(m.value("blokir_events_total", &[("outcome", "logged")]), Some(3));
    d.stop().unwrap();

    // Held to 2 a second: a burst of 8 logs 2 (3 if the burst spans a
    // refill), the rest is counted and reported with the next event.
    let d = topo.start_daemon_with(&[rules], &["--event-log", "--event-log-rate", "2/s"]).unwrap();
    dig(&topo, &names("r", 8).iter().map(|n| Query::udp4(n)).collect::<Vec<_>>(), true);
    thread::sleep(Duration::from_millis(300));
    let burst = event_lines(&d.log()).len();
    let m = d.metrics().unwrap();
    let suppressed = m.value("blokir_events_total", &[("outcome", "suppressed")]).unwrap();
    assert!((2..=3).contains(&burst), "{burst} events logged of a burst of 8 at 2/s:\n{}", d.log());
    assert_eq!(burst as u64 + suppressed, 8);
    thread::sleep(Duration::from_millis(1500));
    dig(&topo, &[Query::udp4("late.example.test")], true);
    thread::sleep(Duration::from_millis(300));
    let log = d.log();
    assert!(log.contains("late.example.test") && log.contains(&format!("suppressed={suppressed}")), "{log}");
    d.stop().unwrap();
}

/// A TLS connection to a listed name, blocked by its ClientHello: the event
/// log names it (protocol tls), /metrics counts it, and its blocked flow is
/// in the flow table.
#[test]
fn blocked_tls_hellos_are_logged_and_their_flows_counted() {
    let topo = Topology::new().unwrap();
    let d = topo.start_daemon_with(&[telegram_file(&topo)], &["--event-log"]).unwrap();
    // Any TCP listener will do: curl sends its ClientHello once connected.
    let server = RESOLVER4.to_string();
    let mut cmd = topo.exec(topo.resolver(), "python3");
    cmd.args(["-m", "http.server", "--bind", &server, "443"]);
    let _server = netns::start(&mut cmd).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !topo.run_in(topo.resolver(), &["ss", "-ltn", "sport = :443"], Duration::from_secs(5)).unwrap().stdout.contains(&server) {
        assert!(Instant::now() < deadline, "the TCP listener did not start");
        thread::sleep(Duration::from_millis(50));
    }
    let resolve = format!("web.telegram.org:443:{server}");
    let out = topo
        .run_in(topo.client(), &["curl", "-sS", "-k", "--max-time", "3", "--resolve", &resolve, "https://web.telegram.org/"], Duration::from_secs(10))
        .unwrap();
    assert!(!out.success() && out.stderr.contains("timed out"), "the hello should stall: {out}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while event_lines(&d.log()).is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let log = d.log();
    let events = event_lines(&log);
    assert_eq!(events.len(), 1, "{log}");
    for field in ["\"tls\"", "\"ipv4\"", "\"telegram\"", "web.telegram.org"] {
        assert!(events[0].contains(field), "{field} missing in {}", events[0]);
    }
    let m = d.metrics().unwrap();
    assert_eq!(m.value("blokir_blocked_total", &[("proto", "tls"), ("af", "ipv4")]), Some(1));
    assert_eq!(m.value("blokir_tls_flows", &[]), Some(1), "the blocked flow keeps its state");
    assert_eq!(m.value("blokir_flows", &[("proto", "tls"), ("state", "blocked")]), Some(1));
    assert_eq!(m.value("blokir_flows", &[("proto", "tls"), ("state", "reading")]), Some(0));
    d.stop().unwrap();
}
