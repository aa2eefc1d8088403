//! Named lists, the way an operator runs them: `blokir lists add|ls|update|
//! rollback|rm` against a running daemon, real `dig` queries through the
//! attached program, sources in every format from files and from a URL
//! served by a small HTTP server inside the edge namespace (ETag and 304,
//! the server down, a bad hash), versions kept across restarts.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use blokir_tests::{
    XDP_DROP, XDP_PASS,
    netns::{Captured, Daemon, Query, TELEGRAM_NAMES, Topology},
    noop::{prog_fd_by_id, test_run},
    packets::{Frame, dns},
};

#[track_caller]
fn ok(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args).unwrap();
    assert!(out.success(), "blokir {args:?} failed:\n{out}");
    out.stdout
}

#[track_caller]
fn refused(d: &Daemon, args: &[&str]) -> Captured {
    let out = d.cli(args).unwrap();
    assert_eq!(out.code(), Some(3), "blokir {args:?} should be refused:\n{out}");
    out
}

#[track_caller]
fn assert_blocked(topo: &Topology, names: &[&str]) {
    let queries: Vec<Query> = names.iter().map(|n| Query::udp4(n)).collect();
    for a in topo.dig_all(&queries).unwrap() {
        assert!(a.timed_out(), "{} should be blocked:\n{a}", a.query);
    }
}

#[track_caller]
fn assert_resolves(topo: &Topology, names: &[&str]) {
    let queries: Vec<Query> = names.iter().map(|n| Query::udp4(n)).collect();
    for a in topo.dig_all(&queries).unwrap() {
        assert!(a.resolved_to_expected(), "{} should resolve:\n{a}", a.query);
    }
}

/// `blokir lists ls --output json`, by list name.
fn ls(d: &Daemon) -> serde_json::Map<String, serde_json::Value> {
    let out = ok(d, &["lists", "ls", "--output", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    rows.into_iter().map(|r| (r["name"].as_str().unwrap().to_string(), r)).collect()
}

fn write(topo: &Topology, name: &str, text: &str) -> PathBuf {
    let path = topo.dir().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn named_lists_in_every_format_are_enforced_listed_refused_when_bad_and_removed() {
    let topo = Topology::new().unwrap();
    let daemon = topo.start_daemon(&[]).unwrap();

    // A hosts file, the way vendors ship them.
    let hosts: String = TELEGRAM_NAMES[..6].iter().map(|n| format!("0.0.0.0 {n}\n")).collect();
    let hosts = write(&topo, "telegram.hosts", &format!("# Kominfo, July 2017\n127.0.0.1 localhost\n{hosts}"));
    let out = ok(&daemon, &["lists", "add", "kominfo", "--source", hosts.to_str().unwrap()]);
    assert!(out.contains("version 1 in force, 6 rules"), "{out}");
    assert_blocked(&topo, &TELEGRAM_NAMES[..6]);
    assert_resolves(&topo, &TELEGRAM_NAMES[6..]);

    // Adblock syntax, with an exception, and an RPZ zone.
    let adblock = write(&topo, "ads.txt", "[Adblock Plus 2.0]\n||example.test^\n@@||www.example.test^\n");
    ok(&daemon, &["lists", "add", "ads", "--source", adblock.to_str().unwrap(), "--format", "adblock"]);
    let rpz = write(&topo, "web.rpz", "$ORIGIN rpz.example.\n@ SOA ns hostmaster 1 3600 600 86400 60\n*.web.telegram.org CNAME .\n");
    ok(&daemon, &["lists", "add", "web", "--source", rpz.to_str().unwrap()]);
    assert_blocked(&topo, &["example.test", "mail.example.test", "venus.web.telegram.org", "flora-1.web.telegram.org"]);
    assert_resolves(&topo, &["www.example.test", "web.telegram.org"]);

    let lists = ls(&daemon);
    assert_eq!((&lists["kominfo"]["format"], &lists["kominfo"]["read_as"]), (&"auto".into(), &"hosts".into()));
    assert_eq!(lists["kominfo"]["rules"], 6);
    assert_eq!(lists["kominfo"]["version"], 1);
    assert_eq!(lists["ads"]["format"], "adblock");
    assert_eq!(lists["web"]["read_as"], "rpz");
    let table = ok(&daemon, &["lists", "ls"]);
    assert!(table.lines().any(|l| l.starts_with("kominfo") && l.contains("hosts") && l.ends_with(hosts.to_str().unwrap())), "{table}");
    // Columns line up: every row's SOURCE starts where the header's does.
    let column = table.lines().next().and_then(|h| h.find("SOURCE")).unwrap();
    for row in table.lines().skip(1) {
        let source = row.rfind(' ').map(|i| i + 1).unwrap();
        assert_eq!(source, column, "misaligned row {row:?} in\n{table}");
    }

    // A bad list is refused with every bad line, and nothing changes.
    let bad = write(&topo, "bad.rpz", "$ORIGIN rpz.example.\nmy.telegram.org CNAME .\nexample.test A 192.0.2.1\nnottelegram.org CNAME walled.garden.\n");
    let out = refused(&daemon, &["lists", "add", "bad", "--source", bad.to_str().unwrap()]);
    let at = |line: usize| format!("{}:{line}:", bad.display());
    assert!(out.stderr.contains(&at(3)) && out.stderr.contains(&at(4)), "both bad lines reported:\n{out}");
    assert!(!ls(&daemon).contains_key("bad"));
    assert_resolves(&topo, &["nottelegram.org", "my.telegram.org"]);
    // Names, sources and taken names are checked.
    let out = daemon.cli(&["lists", "add", "Bad Name", "--source", "/x"]).unwrap();
    assert_eq!(out.code(), Some(2), "{out}");
    let out = refused(&daemon, &["lists", "add", "local", "--source", hosts.to_str().unwrap()]);
    assert!(out.stderr.contains("the CLI's own list"), "{out}");
    let out = refused(&daemon, &["lists", "add", "kominfo", "--source", hosts.to_str().unwrap()]);
    assert!(out.stderr.contains("exists"), "{out}");
    let out = refused(&daemon, &["lists", "add", "gone", "--source", "/nonexistent/list.txt"]);
    assert!(out.stderr.contains("/nonexistent/list.txt"), "{out}");

    // Sources are copied: a restart uses the kept copy even if the file is gone.
    std::fs::remove_file(&adblock).unwrap();
    daemon.stop().unwrap();
    let daemon = topo.start_daemon(&[]).unwrap();
    assert_blocked(&topo, &["mail.example.test", "t.me"]);
    assert_resolves(&topo, &["www.example.test"]);

    let out = ok(&daemon, &["lists", "rm", "kominfo"]);
    assert!(out.contains("removed (6 rules)"), "{out}");
    assert_resolves(&topo, &TELEGRAM_NAMES[..6]);
    assert!(!ls(&daemon).contains_key("kominfo"));
    refused(&daemon, &["lists", "rm", "kominfo"]);
    // Its id is free again; a new list starts with its own counters at 0.
    ok(&daemon, &["lists", "add", "again", "--source", hosts.to_str().unwrap()]);
    let m = daemon.metrics().unwrap();
    assert_eq!(m.value("blokir_list_blocked_total", &[("list", "again")]), Some(0), "{}", m.lines_of("blokir_list_blocked").join("\n"));
    daemon.stop().unwrap();
}

/// What the list server was asked.
#[derive(Default)]
struct Served {
    /// (status, If-None-Match sent)
    requests: Vec<(u16, Option<String>)>,
}

/// An HTTP/1.1 list server on 127.0.0.1 in the edge namespace (where the
/// daemon runs): serves `body` with an ETag (its version), answers 304 to a
/// matching If-None-Match, or `fail` (a 500) when set.
struct ListServer {
    state: Arc<Mutex<(String, u32, bool, Served)>>,
    port: u16,
}

impl ListServer {
    fn start(topo: &Topology) -> Self {
        let state = Arc::new(Mutex::new((String::new(), 0u32, false, Served::default())));
        let (tx, rx) = mpsc::channel();
        let netns = std::fs::File::open(format!("/run/netns/{}", topo.edge())).unwrap();
        let st = state.clone();
        thread::spawn(move || {
            // SAFETY: moves only this thread into the edge namespace.
            assert_eq!(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut inm = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':')
                        && k.eq_ignore_ascii_case("if-none-match")
                    {
                        inm = Some(v.trim().to_string());
                    }
                }
                let mut s = st.lock().unwrap();
                let etag = format!("\"v{}\"", s.1);
                let (status, body) = if s.2 {
                    (500, String::from("down for maintenance\n"))
                } else if inm.as_deref() == Some(etag.as_str()) {
                    (304, String::new())
                } else {
                    (200, s.0.clone())
                };
                s.3.requests.push((status, inm));
                drop(s);
                let reason = match status {
                    200 => "OK",
                    304 => "Not Modified",
                    _ => "Internal Server Error",
                };
                let _ = write!(stream, "HTTP/1.1 {status} {reason}\r\nETag: {etag}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            }
        });
        ListServer { state, port: rx.recv_timeout(Duration::from_secs(5)).unwrap() }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/trustpositif.txt", self.port)
    }

    fn publish(&self, body: &str) {
        let mut s = self.state.lock().unwrap();
        s.0 = body.to_string();
        s.1 += 1;
    }

    fn set_down(&self, down: bool) {
        self.state.lock().unwrap().2 = down;
    }

    fn last_request(&self) -> (u16, Option<String>) {
        self.state.lock().unwrap().3.requests.last().cloned().expect("a request")
    }
}

#[test]
fn url_lists_refresh_with_conditional_gets_survive_the_server_going_down_verify_hashes_and_roll_back() {
    let topo = Topology::new().unwrap();
    let server = ListServer::start(&topo);
    let url = server.url();
    // Generic XDP: its XDP_TX answers reach a veth peer without help (see
    // e2e_answers.rs).
    let generic = ["--mode", "generic"];
    let daemon = topo.start_daemon_with(&[], &generic).unwrap();

    server.publish("t.me\ntelegram.org\n");
    let out = ok(&daemon, &["lists", "add", "tp", "--source", &url, "--action", "nxdomain"]);
    assert!(out.contains("version 1 in force, 2 rules"), "{out}");
    let a = topo.dig(&Query::udp4("t.me")).unwrap();
    assert_eq!(a.status.as_deref(), Some("NXDOMAIN"), "the list's own action:\n{a}");

    // Nothing new: a conditional GET, answered 304, and nothing changes.
    let out = ok(&daemon, &["lists", "update", "tp"]);
    assert!(out.contains("not modified"), "{out}");
    assert_eq!(server.last_request(), (304, Some("\"v1\"".into())));

    // A new version: in force at once; the old one is kept.
    server.publish("web.telegram.org\ntelegram.org\n");
    let out = ok(&daemon, &["lists", "update", "tp"]);
    assert!(out.contains("version 2 in force"), "{out}");
    assert_eq!(topo.dig(&Query::udp4("web.telegram.org")).unwrap().status.as_deref(), Some("NXDOMAIN"));
    assert_resolves(&topo, &["t.me"]);
    assert_eq!(ls(&daemon)["tp"]["versions"], serde_json::json!([1, 2]));

    // The server goes down: the update fails with the reason, the rules in
    // force stay, and a restart uses the last good copy.
    server.set_down(true);
    let out = refused(&daemon, &["lists", "update", "tp"]);
    assert!(out.stderr.contains("HTTP 500"), "{out}");
    let row = &ls(&daemon)["tp"];
    assert!(row["last_error"].as_str().is_some_and(|e| e.contains("HTTP 500")), "{row}");
    assert_eq!(row["version"], 2);
    let m = daemon.metrics().unwrap();
    assert_eq!(m.value("blokir_list_version", &[("list", "tp")]), Some(2), "{}", m.lines_of("blokir_list").join("\n"));
    assert_eq!(m.value("blokir_list_update_failures_total", &[("list", "tp")]), Some(1));
    daemon.stop().unwrap();
    let daemon = topo.start_daemon_with(&[], &generic).unwrap();
    assert_eq!(topo.dig(&Query::udp4("web.telegram.org")).unwrap().status.as_deref(), Some("NXDOMAIN"));
    server.set_down(false);

    // Rollback: version 1 again, from its copy, without the server.
    let out = ok(&daemon, &["lists", "rollback", "tp"]);
    assert!(out.contains("version 1 back in force (was 2)"), "{out}");
    assert_eq!(topo.dig(&Query::udp4("t.me")).unwrap().status.as_deref(), Some("NXDOMAIN"));
    assert_resolves(&topo, &["web.telegram.org"]);
    let m = daemon.metrics().unwrap();
    assert_eq!(m.value("blokir_list_version", &[("list", "tp")]), Some(1));
    let out = refused(&daemon, &["lists", "rollback", "tp"]);
    assert!(out.stderr.contains("no version before 1"), "{out}");
    ok(&daemon, &["lists", "rollback", "tp", "--to", "2"]);
    assert_resolves(&topo, &["t.me"]);

    // A pinned hash that does not match refuses the download.
    let out = refused(&daemon, &["lists", "add", "pinned", "--source", &url, "--sha256", &"0".repeat(64)]);
    assert!(out.stderr.contains("SHA-256") && out.stderr.contains("refused"), "{out}");
    assert!(!ls(&daemon).contains_key("pinned"));

    // On a schedule: a new version is picked up without anyone asking.
    ok(&daemon, &["lists", "add", "auto", "--source", &url, "--refresh", "10s"]);
    server.publish("core.telegram.org\n");
    let started = Instant::now();
    while ls(&daemon)["auto"]["version"] != 2 {
        assert!(started.elapsed() < Duration::from_secs(30), "not refreshed: {}", ls(&daemon)["auto"]);
        thread::sleep(Duration::from_millis(500));
    }
    assert_blocked(&topo, &["core.telegram.org"]);
    daemon.stop().unwrap();
}

/// A list whose first line is one 50 MB label, from a file and from a URL
/// whose server someone else controls: refused at its line, with a short
/// excerpt of it; the CLI's output, the socket's reply, `lists ls` and
/// `lists.json` stay small, and the rules in force stay.
#[test]
fn a_fifty_megabyte_line_is_refused_with_a_short_excerpt_everywhere_it_shows() {
    const SMALL: usize = 16 << 10;
    let topo = Topology::new().unwrap();
    let server = ListServer::start(&topo);
    let daemon = topo.start_daemon_with(&[], &["--mode", "generic"]).unwrap();
    let huge = format!("{}.example\nt.me\n", "a".repeat(50 << 20));
    let path = write(&topo, "huge.rules", &huge);
    let small = |what: &str, out: &Captured| {
        assert!(out.stdout.len() + out.stderr.len() < SMALL, "{what}: {} bytes of output", out.stdout.len() + out.stderr.len());
        assert!(out.stderr.contains(":1: ") && out.stderr.contains("aaaa…[") && out.stderr.contains("bytes]"), "{what}: {}", out.stderr);
    };

    // Reading 50 MB takes a debug build a while.
    let refused_slowly = |args: &[&str]| {
        let out = daemon.cli_within(args, Duration::from_secs(120)).unwrap();
        assert_eq!(out.code(), Some(3), "blokir {args:?} should be refused (output: {} bytes)", out.stdout.len() + out.stderr.len());
        out
    };
    // A file, through the socket.
    let started = Instant::now();
    let out = refused_slowly(&["lists", "add", "huge", "--source", path.to_str().unwrap()]);
    eprintln!("a 50 MB line refused in {:?}", started.elapsed());
    small("lists add FILE", &out);
    assert!(!ls(&daemon).contains_key("huge"));

    // A URL: a good version first, then the huge one on update.
    server.publish("telegram.org\n");
    ok(&daemon, &["lists", "add", "tp", "--source", &server.url()]);
    server.publish(&huge);
    small("lists update URL", &refused_slowly(&["lists", "update", "tp"]));
    let row = &ls(&daemon)["tp"];
    assert!(row["last_error"].as_str().is_some_and(|e| e.len() < 4200 && e.contains("bytes]")), "{row}");
    assert_eq!(row["version"], 1, "the good version stays in force");
    let stored = std::fs::metadata(topo.state_dir().join("lists.json")).unwrap().len();
    assert!(stored < SMALL as u64, "lists.json is {stored} bytes");
    assert_blocked(&topo, &["telegram.org"]);
    daemon.stop().unwrap();

    // `replay` reads the file itself: the same short refusal.
    let replay = blokir_tests::netns::run(
        Command::new(blokir_tests::blokir_bin().unwrap()).arg("replay").arg(blokir_tests::pcaps_dir().join("real-clients-dev.pcap")).arg("--rules").arg(&path),
        // A hang guard, not a timing: a debug build on a loaded machine
        // took over 60 s once (it loads the program before the rules).
        Duration::from_secs(240),
    )
    .unwrap();
    assert!(!replay.success());
    small("replay --rules FILE", &replay);
}

/// Names of a generated national list: `n<i>.<one of 500 domains>.test`.
fn generated(range: std::ops::Range<usize>) -> impl Iterator<Item = String> {
    range.map(|i| format!("n{i}.d{}.test", i % 500))
}

/// The probes a swap is watched with, each checked on every pass: in both
/// versions (always blocked), in neither (never), only in the old one
/// (blocked, then passed for good), only in the new one (the reverse).
struct Probes {
    both: Vec<Vec<u8>>,
    neither: Vec<Vec<u8>>,
    leaving: Vec<Vec<u8>>,
    arriving: Vec<Vec<u8>>,
}

/// Runs every probe through the daemon's own program (BPF_PROG_TEST_RUN on
/// its fd) until `done`; returns the wrong verdicts and the passes made.
fn watch(program: u32, probes: &Probes, done: &std::sync::atomic::AtomicBool) -> (Vec<String>, usize) {
    let prog = prog_fd_by_id(program).unwrap();
    let mut wrong = Vec::new();
    let (mut left, mut arrived) = (vec![false; probes.leaving.len()], vec![false; probes.arriving.len()]);
    let mut passes = 0;
    while passes < 2 || !done.load(std::sync::atomic::Ordering::Acquire) {
        let verdict = |p: &[u8]| test_run(&prog, p, 1).unwrap().0;
        for (i, p) in probes.both.iter().enumerate() {
            if verdict(p) != XDP_DROP {
                wrong.push(format!("pass {passes}: a name in both versions (probe {i}) was let through"));
            }
        }
        for (i, p) in probes.neither.iter().enumerate() {
            if verdict(p) != XDP_PASS {
                wrong.push(format!("pass {passes}: a name in neither version (probe {i}) was blocked"));
            }
        }
        for (i, p) in probes.leaving.iter().enumerate() {
            match (verdict(p), left[i]) {
                (XDP_PASS, _) => left[i] = true,
                (_, true) => wrong.push(format!("pass {passes}: a name leaving the list (probe {i}) was blocked again")),
                _ => {}
            }
        }
        for (i, p) in probes.arriving.iter().enumerate() {
            match (verdict(p), arrived[i]) {
                (XDP_DROP, _) => arrived[i] = true,
                (_, true) => wrong.push(format!("pass {passes}: a name joining the list (probe {i}) was let through again")),
                _ => {}
            }
        }
        passes += 1;
    }
    if !left.iter().all(|l| *l) || !arrived.iter().all(|a| *a) {
        wrong.push("after the swap, not every leaving name passes and every arriving name is blocked".into());
    }
    (wrong, passes)
}

/// Swaps `big` to the contents of `file` (`lists update`, or `rollback`
/// with `args`) while the probes run; returns the command's output.
fn swap_watched(topo: &Topology, daemon: &Daemon, args: &[&str], probes: &Probes) -> String {
    let status: serde_json::Value = serde_json::from_str(&ok(daemon, &["status", "--output", "json"])).unwrap();
    let program = status["attached"][0]["program_id"].as_u64().unwrap() as u32;
    let done = std::sync::atomic::AtomicBool::new(false);
    let (out, (wrong, passes)) = thread::scope(|s| {
        let watcher = s.spawn(|| watch(program, probes, &done));
        let out = daemon.cli_within(args, Duration::from_secs(600)).unwrap();
        done.store(true, std::sync::atomic::Ordering::Release);
        (out, watcher.join().unwrap())
    });
    assert!(out.success(), "blokir {args:?}:\n{out}");
    eprintln!("{args:?}: {} ({passes} passes over the probes)", out.stdout.trim());
    assert!(wrong.is_empty(), "{} wrong verdicts during `{args:?}`, e.g.:\n{}", wrong.len(), wrong[..wrong.len().min(10)].join("\n"));
    assert!(passes >= 3, "the probes ran {passes} times: the swap was not watched");
    let _ = topo;
    out.stdout
}

/// The scale: a 2,000,000-name list is added, swapped for a version
/// that differs in 5% of its names while every kind of name is queried
/// through the live program in a loop, and rolled back the same way; not
/// one verdict is wrong at any moment.
#[test]
fn a_two_million_name_list_swaps_atomically_under_queries_and_rolls_back() {
    const N: usize = 2_000_000;
    const CHURN: usize = N / 20;
    let topo = Topology::new().unwrap();
    let daemon = topo.start_daemon(&[]).unwrap();
    let write_version = |names: &mut dyn Iterator<Item = String>| {
        let mut text = String::with_capacity(N * 24);
        for n in names {
            text.push_str(&n);
            text.push('\n');
        }
        std::fs::write(topo.dir().join("national.txt"), text).unwrap();
    };
    // Version 1: names 0..N; version 2: names CHURN..N+CHURN.
    write_version(&mut generated(0..N));
    let source = topo.dir().join("national.txt");
    let started = Instant::now();
    let out = daemon.cli_within(&["lists", "add", "national", "--source", source.to_str().unwrap()], Duration::from_secs(600)).unwrap();
    assert!(out.success(), "{out}");
    eprintln!("2M names added in {:?}: {}", started.elapsed(), out.stdout.trim());

    let probe = |names: Vec<String>| names.iter().map(|n| dns(&Frame::udp(), n)).collect::<Vec<_>>();
    let probes = Probes {
        both: probe(generated(CHURN..N).step_by(N / 64).collect()),
        neither: probe(generated(N + CHURN..N + CHURN + 16).chain(["d1.test".into(), "x.n5.d5.test".into()]).collect()),
        leaving: probe(generated(0..CHURN).step_by(CHURN / 32).collect()),
        arriving: probe(generated(N..N + CHURN).step_by(CHURN / 32).collect()),
    };
    write_version(&mut generated(CHURN..N + CHURN));
    let out = swap_watched(&topo, &daemon, &["lists", "update", "national"], &probes);
    assert!(out.contains("version 2 in force"), "{out}");

    let back = Probes { both: probes.both.clone(), neither: probes.neither.clone(), leaving: probes.arriving.clone(), arriving: probes.leaving.clone() };
    let out = swap_watched(&topo, &daemon, &["lists", "rollback", "national"], &back);
    assert!(out.contains("version 1 back in force"), "{out}");
    daemon.stop().unwrap();
}

/// Off a terminal (a file, the journal) the daemon's log lines carry no
/// colour codes; with `--log-format json` each line is one JSON object.
#[test]
fn logs_off_a_terminal_are_plain_and_json_logs_are_one_object_a_line() {
    let topo = Topology::new().unwrap();
    // As under systemd: stderr to a file, no NO_COLOR in the environment.
    let path = topo.dir().join("plain.log");
    let file = std::fs::File::create(&path).unwrap();
    let mut cmd = topo.daemon_command(&[]).unwrap();
    cmd.env_remove("NO_COLOR").args(["--mode", "generic", "--cleanup"]).stdout(file.try_clone().unwrap()).stderr(file);
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    // Logged once ready.
    while !std::fs::read_to_string(&path).unwrap().contains("serving /metrics") {
        assert!(started.elapsed() < Duration::from_secs(30) && child.try_wait().unwrap().is_none(), "{}", std::fs::read_to_string(&path).unwrap());
        thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(log.contains("rules loaded") && !log.contains('\u{1b}'), "{log:?}");

    let daemon = topo.start_daemon_with(&[], &["--mode", "generic"]).unwrap();
    ok(&daemon, &["rules", "add", "t.me"]);
    daemon.stop().unwrap();

    let daemon = topo.start_daemon_with(&[], &["--mode", "generic", "--log-format", "json"]).unwrap();
    assert_blocked(&topo, &["t.me"]);
    let log = daemon.log();
    assert!(log.contains("serving /metrics"), "{log}");
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string() && v["fields"].is_object(), "{line}");
    }
    daemon.stop().unwrap();
}

/// A list server that accepts and never answers holds up its own list only:
/// while its `lists add` hangs, another list is added and a rule changed at
/// once; the hanging one gives up when the server has been silent for the
/// idle timeout (`--fetch-idle-timeout`, 5 s here), not the 5-minute
/// download limit; and SIGTERM during such a download stops the daemon in
/// seconds.
#[test]
fn a_server_that_never_answers_holds_up_only_its_own_list_and_not_the_exit() {
    let topo = Topology::new().unwrap();
    let daemon = topo.start_daemon_with(&[], &["--mode", "generic", "--fetch-idle-timeout", "5"]).unwrap();
    let (tx, rx) = mpsc::channel();
    let netns = std::fs::File::open(format!("/run/netns/{}", topo.edge())).unwrap();
    let silent = thread::spawn(move || {
        // SAFETY: moves only this thread into the edge namespace.
        assert_eq!(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        tx.send(listener.local_addr().unwrap().port()).unwrap();
        // Accepts, reads, says nothing, until each client gives up.
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while (&conn).read(&mut buf).is_ok_and(|n| n > 0) {}
            });
        }
    });
    let url = format!("http://127.0.0.1:{}/list.txt", rx.recv_timeout(Duration::from_secs(5)).unwrap());
    let hang = |url: String| {
        let mut cli = Command::new(blokir_tests::blokir_bin().unwrap());
        cli.arg("--socket").arg(topo.socket()).args(["lists", "add", "stuck", "--source", &url]);
        thread::spawn(move || {
            let started = Instant::now();
            (blokir_tests::netns::run(&mut cli, Duration::from_secs(120)).unwrap(), started.elapsed())
        })
    };
    let hanging = hang(url.clone());
    thread::sleep(Duration::from_millis(500));
    let other = write(&topo, "other.rules", "t.me\n");
    let started = Instant::now();
    ok(&daemon, &["lists", "add", "other", "--source", other.to_str().unwrap()]);
    ok(&daemon, &["rules", "add", "telegram.org"]);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "other list operations waited for the hanging download: {took:?}");
    assert_blocked(&topo, &["t.me", "telegram.org"]);
    let (out, after) = hanging.join().unwrap();
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(after > Duration::from_secs(4) && after < Duration::from_secs(15), "gave up after {after:?}: {out}");
    assert!(out.stderr.contains("timeout: per read"), "{out}");
    assert!(!ls(&daemon).contains_key("stuck"));

    // Hanging again, and SIGTERM: the daemon does not wait for the download.
    let again = hang(url);
    thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    daemon.stop().unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?} with a download in flight");
    assert!(!again.join().unwrap().0.success());
    drop(silent);
}

/// `lists rm` when the state directory cannot be written (remounted
/// read-only under the daemon, as a full or failing disk would): refused
/// with the reason, and the list stays enforced, as the state on disk says;
/// once the directory is writable again, `rm` lifts it, and a restart agrees.
#[test]
fn lists_rm_on_a_read_only_state_dir_keeps_the_kernel_and_the_disk_in_agreement() {
    let topo = Topology::new().unwrap();
    let daemon = topo.start_daemon_with(&[], &["--mode", "generic"]).unwrap();
    let file = write(&topo, "tp.rules", "t.me\n");
    ok(&daemon, &["lists", "add", "tp", "--source", file.to_str().unwrap()]);
    assert_blocked(&topo, &["t.me"]);
    // Read-only in the daemon's own mount namespace (`ip netns exec` gave it one).
    let state = topo.state_dir();
    let in_daemon = |args: &[&str]| {
        let pid = daemon.pid().to_string();
        let out = blokir_tests::netns::run(Command::new("nsenter").args(["--target", &pid, "--mount", "--"]).args(args), Duration::from_secs(10)).unwrap();
        assert!(out.success(), "{out}");
    };
    let dir = state.to_str().unwrap();
    in_daemon(&["mount", "--bind", dir, dir]);
    in_daemon(&["mount", "-o", "remount,bind,ro", dir, dir]);
    let out = refused(&daemon, &["lists", "rm", "tp"]);
    assert!(out.stderr.contains("list tp stays in force") && out.stderr.contains("Read-only file system"), "{out}");
    assert_blocked(&topo, &["t.me"]);
    assert!(ls(&daemon).contains_key("tp"));
    in_daemon(&["umount", dir]);
    let out = ok(&daemon, &["lists", "rm", "tp"]);
    assert!(out.contains("list tp removed"), "{out}");
    assert_resolves(&topo, &["t.me"]);
    daemon.stop().unwrap();
    let daemon = topo.start_daemon_with(&[], &["--mode", "generic"]).unwrap();
    assert!(!ls(&daemon).contains_key("tp"));
    assert_resolves(&topo, &["t.me"]);
    daemon.stop().unwrap();
}

/// Lists that empty themselves: a list server answering a cut-off body and a
/// list file emptied in place, picked up by their scheduled refreshes, and a
/// rule file cut short and reloaded. Each update that would take away more
/// than the list's --max-shrink is refused, counted, and the last good
/// version stays in force (real queries are still blocked); by hand it is
/// refused with the way out, and `--force` applies it.
#[test]
fn a_list_that_empties_itself_is_refused_and_kept_until_forced() {
    let topo = Topology::new().unwrap();
    let server = ListServer::start(&topo);
    let lines = |names: &[&str]| names.iter().map(|n| format!("{n}\n")).collect::<String>();
    let (national, tp, fl) = (&TELEGRAM_NAMES[..4], &TELEGRAM_NAMES[4..8], &TELEGRAM_NAMES[8..]);
    let rules = write(&topo, "national.rules", &lines(national));
    let daemon = topo.start_daemon_with(std::slice::from_ref(&rules), &["--mode", "generic"]).unwrap();
    server.publish(&lines(tp));
    // Its own limit: a cut to half would pass run's 50% default.
    ok(&daemon, &["lists", "add", "tp", "--source", &server.url(), "--refresh", "10s", "--max-shrink", "20%"]);
    let file = write(&topo, "fl.txt", &lines(fl));
    ok(&daemon, &["lists", "add", "fl", "--source", file.to_str().unwrap(), "--refresh", "10s"]);
    assert_blocked(&topo, &TELEGRAM_NAMES);

    // Unattended: the server cuts the body in half, the file is emptied.
    server.publish(&lines(&tp[..2]));
    std::fs::write(&file, "").unwrap();
    let started = Instant::now();
    let lists = loop {
        let lists = ls(&daemon);
        if ["tp", "fl"].iter().all(|l| lists[*l]["last_error"].is_string()) {
            break lists;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "not refreshed: {lists:?}");
        thread::sleep(Duration::from_millis(300));
    };
    for (list, had, has, limit) in [("tp", 4, 2, "20%"), ("fl", 3, 0, "50%")] {
        let error = lists[list]["last_error"].as_str().unwrap();
        assert!(error.contains(&format!("{has} rules where {had} are in force")) && error.contains(&format!("--max-shrink {limit}")), "{list}: {error}");
        assert!(error.contains(&format!("`blokir lists update {list} --force`")), "{error}");
        assert_eq!((&lists[list]["version"], &lists[list]["rules"]), (&1.into(), &had.into()), "{list}");
    }
    assert_eq!((&lists["tp"]["max_shrink"], &lists["fl"]["max_shrink"]), (&20.into(), &serde_json::Value::Null));
    assert_blocked(&topo, &TELEGRAM_NAMES);
    let m = daemon.metrics().unwrap();
    for list in ["tp", "fl"] {
        let refused = m.value("blokir_list_shrinks_refused_total", &[("list", list)]);
        assert!(refused.is_some_and(|n| n >= 1), "{list}: {}", m.lines_of("blokir_list_shrinks").join("\n"));
        assert_eq!(m.value("blokir_list_version", &[("list", list)]), Some(1));
    }
    assert_eq!(m.value("blokir_list_shrinks_refused_total", &[("list", "national")]), Some(0));

    // By hand: refused the same way, now with an empty body; --force applies it.
    server.publish("");
    let out = refused(&daemon, &["lists", "update", "tp"]);
    assert!(out.stderr.contains("0 rules where 4 are in force") && out.stderr.contains("--force"), "{out}");
    assert_blocked(&topo, tp);
    let out = ok(&daemon, &["lists", "update", "tp", "--force"]);
    assert!(out.contains("version 2 in force, 0 rules"), "{out}");
    assert!(ok(&daemon, &["lists", "update", "fl", "--force"]).contains("version 2 in force, 0 rules"));
    assert_resolves(&topo, &[tp, fl].concat());

    // A rule file cut to one name of four: `rules reload` refuses it.
    std::fs::write(&rules, lines(&national[..1])).unwrap();
    let out = refused(&daemon, &["rules", "reload"]);
    assert!(out.stderr.contains("list national: the new version has 1 rules where 4 are in force"), "{out}");
    assert!(out.stderr.contains("`blokir rules reload --force`"), "{out}");
    assert_blocked(&topo, national);
    let m = daemon.metrics().unwrap();
    assert_eq!(m.value("blokir_list_shrinks_refused_total", &[("list", "national")]), Some(1));
    ok(&daemon, &["rules", "reload", "--force"]);
    assert_blocked(&topo, &national[..1]);
    assert_resolves(&topo, &national[1..]);
    daemon.stop().unwrap();
}

/// A scrape of /metrics from a thread of its own in `topo`'s edge namespace
/// (where the daemon serves it): the status line and the body.
fn scrape(topo: &Topology) -> thread::JoinHandle<(String, String)> {
    let netns = std::fs::File::open(format!("/run/netns/{}", topo.edge())).unwrap();
    thread::spawn(move || {
        // SAFETY: moves only this thread into the edge namespace.
        assert_eq!(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
        let mut conn = std::net::TcpStream::connect(blokir_tests::netns::METRICS_ADDR).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        write!(conn, "GET /metrics HTTP/1.1\r\nHost: blokir\r\nConnection: close\r\n\r\n").unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
        (head.lines().next().unwrap_or_default().to_string(), body.to_string())
    })
}

/// /metrics never waits for a list swap, which holds the daemon's lock for
/// as long as it takes: while `lists update` swaps a big list (and a
/// `blokir status`, which needs that lock, hangs behind it), 50 concurrent
/// scrapes are all answered in full, the first of them while the swap still
/// holds the lock. How long a swap lasts depends on the machine: when one
/// ends before a scrape is answered, the next try swaps a bigger list (a
/// scrape that waited for the lock could never beat any of them).
#[test]
fn fifty_concurrent_scrapes_are_answered_while_a_big_list_swaps() {
    const SIZES: [usize; 3] = [600_000, 1_200_000, 2_000_000];
    let topo = Topology::new().unwrap();
    let daemon = topo.start_daemon_with(&[], &["--mode", "generic"]).unwrap();
    let source = topo.dir().join("big.txt");
    let write_version = |range: std::ops::Range<usize>| std::fs::write(&source, generated(range).map(|n| n + "\n").collect::<String>()).unwrap();
    write_version(0..SIZES[0]);
    let out = daemon.cli_within(&["lists", "add", "big", "--source", source.to_str().unwrap()], Duration::from_secs(300)).unwrap();
    assert!(out.success(), "{out}");
    let socket = topo.socket();
    let cli = |args: &'static [&'static str]| {
        let mut cmd = Command::new(blokir_tests::blokir_bin().unwrap());
        cmd.arg("--socket").arg(&socket).args(args);
        thread::spawn(move || blokir_tests::netns::run(&mut cmd, Duration::from_secs(300)).unwrap())
    };
    let mut next = SIZES[0];
    let mut outcomes = Vec::new();
    for (try_, n) in SIZES.into_iter().enumerate() {
        // Every name new: the most work a swap of this size can be.
        write_version(next..next + n);
        next += n;
        let swap = cli(&["lists", "update", "big"]);
        // The swap holds the lock once a status asked after it has not come back.
        let blocked_status = loop {
            if swap.is_finished() {
                break None;
            }
            let status = cli(&["status", "--output", "json"]);
            thread::sleep(Duration::from_millis(300));
            if !status.is_finished() {
                break Some(status);
            }
        };
        let beaten = blocked_status.map(|blocked_status| {
            let scrapes: Vec<_> = (0..50).map(|_| scrape(&topo)).collect();
            // The first answer, and whether the lock was still held then.
            let (swap_done, status_done) = loop {
                if scrapes.iter().any(|s| s.is_finished()) {
                    break (swap.is_finished(), blocked_status.is_finished());
                }
                thread::sleep(Duration::from_millis(1));
            };
            let answers: Vec<(String, String)> = scrapes.into_iter().map(|s| s.join().unwrap()).collect();
            for (status, body) in &answers {
                assert!(
                    status.contains(" 200 ") && body.contains("blokir_list_rules{list=\"big\"}") && body.contains("blokir_packets_total"),
                    "{status}\n{body}"
                );
            }
            assert!(blocked_status.join().unwrap().success());
            !swap_done && !status_done
        });
        let out = swap.join().unwrap();
        assert!(out.success() && out.stdout.contains(&format!("version {} in force", try_ + 2)), "{out}");
        // After the swap, the figures are the new version's.
        let m = daemon.metrics().unwrap();
        assert_eq!(m.value("blokir_list_version", &[("list", "big")]), Some(try_ as u64 + 2));
        outcomes.push(format!(
            "{n} names: {}",
            match beaten {
                None => "the swap ended before a status request was seen waiting for it",
                Some(false) => "the first scrape was answered after the swap",
                Some(true) => "a scrape was answered first",
            }
        ));
        if beaten == Some(true) {
            break;
        }
        eprintln!("{}; swapping a bigger list", outcomes.last().unwrap());
    }
    assert!(outcomes.last().unwrap().ends_with("first"), "no swap outlasted the scrapes: {outcomes:?}");
    daemon.stop().unwrap();
}

/// Ctrl-C on `blokir lists add URL` whose server accepts and never answers
/// cancels the daemon's side of it: the daemon logs the cancel and frees the
/// list, so adding the same list again from a file goes through at once
/// instead of waiting the 30 s idle timeout of the abandoned download.
#[test]
fn an_interrupted_cli_cancels_its_list_download_in_the_daemon() {
    let topo = Topology::new().unwrap();
    let daemon = topo.start_daemon_with(&[], &["--mode", "generic"]).unwrap();
    let (tx, rx) = mpsc::channel();
    let netns = std::fs::File::open(format!("/run/netns/{}", topo.edge())).unwrap();
    thread::spawn(move || {
        // SAFETY: moves only this thread into the edge namespace.
        assert_eq!(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        tx.send(listener.local_addr().unwrap().port()).unwrap();
        // Accepts, says so, and never answers.
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let _ = tx.send(0);
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while (&conn).read(&mut buf).is_ok_and(|n| n > 0) {}
            });
        }
    });
    let url = format!("http://127.0.0.1:{}/list.txt", rx.recv_timeout(Duration::from_secs(5)).unwrap());
    let mut cmd = Command::new(blokir_tests::blokir_bin().unwrap());
    cmd.arg("--socket").arg(topo.socket()).args(["lists", "add", "tp", "--source", &url]).stderr(std::process::Stdio::piped());
    // Ctrl-C at a terminal: SIGINT with its default action. A harness run in
    // the background of a non-interactive shell (as CI may be) hands its
    // children SIGINT ignored, and an ignored SIGINT stays ignored across exec.
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut cli = cmd.spawn().unwrap();
    // The daemon's download has reached the server.
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(0), "the daemon never connected");
    blokir_tests::netns::send_signal(cli.id(), "INT").unwrap();
    assert!(!cli.wait().unwrap().success());
    let started = Instant::now();
    // Well before the 30 s idle timeout that would end the download anyway
    // (and that logs no cancel); a loaded CI machine took over 10 s once.
    while !daemon.log().contains("client went away; request cancelled") {
        assert!(started.elapsed() < Duration::from_secs(25), "no cancel in the log:\n{}", daemon.log());
        thread::sleep(Duration::from_millis(100));
    }
    // The same list, from a file: not held up by the abandoned download.
    let file = write(&topo, "tp.rules", "t.me\n");
    let out = ok(&daemon, &["lists", "add", "tp", "--source", file.to_str().unwrap()]);
    assert!(out.contains("version 1 in force"), "{out}");
    assert_blocked(&topo, &["t.me"]);
    daemon.stop().unwrap();
}
