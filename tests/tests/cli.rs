//! The command line and packaging as an operator meets them: completion
//! scripts that a real bash loads and completes from, the daemon set up from
//! a config file, and the shipped systemd unit checked by systemd itself.

use std::{process::Command, time::Duration};

use blokir_tests::{
    blokir_bin,
    netns::{self, Query, Topology, telegram_rules},
};

/// What bash's completion function offers for `line` (the word being
/// completed is the last one, possibly empty).
fn complete(script: &str, line: &str) -> Vec<String> {
    let words: Vec<&str> = if line.ends_with(' ') { line.split_whitespace().chain([""]).collect() } else { line.split_whitespace().collect() };
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cword = words.len() - 1;
    let prev = if cword > 0 { words[cword - 1] } else { "" };
    let program = format!(
        "{script}\nCOMP_WORDS=({}); COMP_CWORD={cword}; COMP_LINE='{line}'; COMP_POINT={}; _blokir blokir '{}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        quoted.join(" "),
        line.len(),
        words[cword],
    );
    let out = netns::run(Command::new("bash").args(["--norc", "-c", &program]), Duration::from_secs(10)).unwrap().ok().unwrap();
    out.stdout.lines().map(str::to_string).collect()
}

#[test]
fn bash_completes_subcommands_and_options() {
    let out = netns::run(Command::new(blokir_bin().unwrap()).args(["completions", "bash"]), Duration::from_secs(10)).unwrap().ok().unwrap();
    let script = out.stdout;
    let has = |line: &str, want: &[&str]| {
        let got = complete(&script, line);
        for w in want {
            assert!(got.iter().any(|g| g == w), "`{line}` completes to {got:?}, without {w}");
        }
    };
    has("blokir r", &["run", "rules", "replay"]);
    has("blokir rules ", &["add", "del", "list", "check", "reload"]);
    has("blokir run --dns-", &["--dns-action"]);
    has("blokir run --mode ", &["native", "generic", "auto"]);
    has("blokir completions ", &["bash", "zsh", "fish"]);
}

#[test]
fn every_shell_gets_a_script_and_an_unknown_shell_is_refused() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = netns::run(Command::new(blokir_bin().unwrap()).args(["completions", shell]), Duration::from_secs(10)).unwrap().ok().unwrap();
        assert!(out.stdout.contains("replay"), "{shell}: {}", out.stdout);
    }
    let out = netns::run(Command::new(blokir_bin().unwrap()).args(["completions", "tcsh"]), Duration::from_secs(10)).unwrap();
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("possible values"), "{out}");
}

/// Bad list settings are refused by the command line itself (exit 2), with
/// the values that are allowed, before any daemon is asked.
#[test]
fn bad_list_settings_are_refused_with_the_allowed_values() {
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(blokir_bin().unwrap());
        cmd.args(["--socket", "/nonexistent/blokir.sock"]).args(args);
        netns::run(&mut cmd, Duration::from_secs(10)).unwrap()
    };
    for args in [&["lists", "add", "x", "--source", "/x", "--tcp-action", "bogus"][..], &["lists", "set", "x", "--tcp-action", "bogus"]] {
        let out = cli(args);
        assert_eq!(out.code(), Some(2), "{args:?}: {out}");
        assert!(out.stderr.contains("'bogus' for '--tcp-action") && out.stderr.contains("expected one of: drop, reset"), "{args:?}: {out}");
    }
    let out = cli(&["lists", "set", "x", "--ech-outer", "maybe"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("[possible values: true, false]"), "{out}");
    let out = cli(&["lists", "set", "x", "--action", "bogus"]);
    assert!(out.code() == Some(2) && out.stderr.contains("expected one of: drop, nxdomain, refused, nodata, redirect"), "{out}");
    let out = cli(&["lists", "set", "x", "--clear", "bogus"]);
    assert!(out.code() == Some(2) && out.stderr.contains("[possible values: action, tcp-action, ech-outer]"), "{out}");
    let out = cli(&["lists", "set", "x", "--tcp-action", "reset", "--clear", "tcp-action"]);
    assert!(out.code() == Some(2) && out.stderr.contains("--tcp-action and --clear tcp-action contradict each other"), "{out}");
    // `lists set` with nothing to set.
    let out = cli(&["lists", "set", "x"]);
    assert!(out.code() == Some(2) && out.stderr.contains("--tcp-action"), "{out}");
    // Good values get as far as the (absent) daemon: exit 1.
    let out = cli(&["lists", "set", "x", "--tcp-action", "reset", "--ech-outer", "false"]);
    assert!(out.code() == Some(1) && out.stderr.contains("is `blokir run` running?"), "{out}");
}

/// A rule capacity outside 2..=16777215 is a bad command line (exit 2, with
/// the range), for `run` and `replay`, before anything is read or loaded.
#[test]
fn a_bad_rule_capacity_is_refused_at_parse_time() {
    let dir = tempfile::tempdir().unwrap();
    for value in ["0", "1", "16777216", "lots"] {
        for sub in [&["run", "--iface", "blokir-none0", "--pin-dir"][..], &["replay", "none.pcap", "--rules"][..]] {
            let mut cmd = Command::new(blokir_bin().unwrap());
            cmd.args(sub).arg(dir.path().join("pins")).args(["--rule-capacity", value]);
            let out = netns::run(&mut cmd, Duration::from_secs(10)).unwrap();
            let why = format!("invalid value '{value}' for '--rule-capacity <RULE_CAPACITY>': \"{value}\" is not a rule capacity: a number from 2 to 16777215");
            assert!(out.code() == Some(2) && out.stderr.contains(&why), "{sub:?} {value}: want {why:?}: {out}");
            assert!(!dir.path().join("pins").exists(), "{out}");
        }
    }
}

/// List download timeouts are whole seconds from 1 to 300, else a bad
/// command line (exit 2).
#[test]
fn bad_fetch_timeouts_are_refused_at_parse_time() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [("--fetch-idle-timeout", "0"), ("--fetch-idle-timeout", "301"), ("--fetch-connect-timeout", "5s")] {
        let mut cmd = Command::new(blokir_bin().unwrap());
        cmd.args(["run", "--iface", "blokir-none0", "--pin-dir"]).arg(dir.path().join("pins")).args([flag, value]);
        let out = netns::run(&mut cmd, Duration::from_secs(10)).unwrap();
        let why = format!("\"{value}\" is not a timeout: whole seconds from 1 to 300");
        assert!(out.code() == Some(2) && out.stderr.contains(&why), "{flag} {value}: {out}");
    }
}

/// Bad `--max-shrink` values, of `run` and of `lists add`, are refused at
/// parse time with the range.
#[test]
fn a_bad_max_shrink_is_refused_at_parse_time() {
    let dir = tempfile::tempdir().unwrap();
    for value in ["101%", "150", "half", "0.5"] {
        let mut run = Command::new(blokir_bin().unwrap());
        run.args(["run", "--iface", "blokir-none0", "--pin-dir"]).arg(dir.path().join("pins")).args(["--max-shrink", value]);
        let mut add = Command::new(blokir_bin().unwrap());
        add.args(["lists", "add", "a", "--source", "/x", "--max-shrink", value]);
        for cmd in [&mut run, &mut add] {
            let out = netns::run(cmd, Duration::from_secs(10)).unwrap();
            let why = format!("\"{value}\" is not a share of a list: a percentage from 0% to 100%");
            assert!(out.code() == Some(2) && out.stderr.contains(&why), "{value}: {out}");
        }
    }
}

/// Bad `--tls-ports` values are refused with the reason (exit 2) before
/// anything is loaded, from the command line and from a config file.
#[test]
fn bad_tls_ports_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut cmd = Command::new(blokir_bin().unwrap());
        // A pin directory of its own: nothing may reach the system's.
        cmd.args(["run", "--iface", "blokir-none0", "--pin-dir"]).arg(dir.path().join("pins")).args(args);
        netns::run(&mut cmd, Duration::from_secs(10)).unwrap()
    };
    let seventeen = (1000..1017).map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let cases: [(Vec<&str>, &str); 7] = [
        (vec!["--tls-ports", "all,443"], "--tls-ports: `all` cannot be combined with ports (443): give either `all` or a list of ports"),
        (vec!["--tls-ports", "8443", "--tls-ports", "all", "--tls-ports", "443"], "`all` cannot be combined with ports (8443,443)"),
        (vec!["--tls-ports", "443,0"], "invalid value '0' for '--tls-ports <all|PORT[,PORT...]>': port 0 cannot carry traffic (expected `all` or 1 to 65535)"),
        (
            vec!["--tls-ports", "https"],
            "invalid value 'https' for '--tls-ports <all|PORT[,PORT...]>': \"https\" is not a port number (expected `all` or 1 to 65535)",
        ),
        (vec!["--tls-ports", "443,65536"], "invalid value '65536'"),
        (vec!["--tls-ports", "ALL"], "\"ALL\" is not a port number"),
        (vec!["--tls-ports", &seventeen], "--tls-ports: 17 ports given; at most 16 are supported (or `all`)"),
    ];
    for (args, why) in cases {
        refused_before_loading(&run(&args), &args, why, &dir.path().join("pins"));
    }
    // From a config file: a bad value with its line; a file's ports and a
    // command line's `all` add up, and are refused as mixed.
    let config = dir.path().join("blokir.toml");
    std::fs::write(&config, "mode = \"generic\"\ntls-ports = [443, \"tls\"]\n").unwrap();
    let out = run(&["--config", config.to_str().unwrap()]);
    assert!(out.code() == Some(2) && out.stderr.contains(&format!("{}:2: tls-ports: invalid value 'tls'", config.display())), "{out}");
    std::fs::write(&config, "tls_ports = [443, 8443]\n").unwrap();
    let out = run(&["--config", config.to_str().unwrap(), "--tls-ports", "all"]);
    assert!(out.code() == Some(2) && out.stderr.contains("`all` cannot be combined with ports (443,8443)"), "{out}");
}

/// Bad `--quic-ports` and `--quic-on-overload` values are refused with the
/// reason (exit 2) before anything is loaded, from the command line and
/// from a config file.
#[test]
fn bad_quic_settings_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut cmd = Command::new(blokir_bin().unwrap());
        cmd.args(["run", "--iface", "blokir-none0", "--pin-dir"]).arg(dir.path().join("pins")).args(args);
        netns::run(&mut cmd, Duration::from_secs(10)).unwrap()
    };
    let seventeen = (1000..1017).map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["--quic-ports", "443,all"], "--quic-ports: `all` cannot be combined with ports (443): give either `all` or a list of ports"),
        (vec!["--quic-ports", "443,0"], "invalid value '0' for '--quic-ports <all|PORT[,PORT...]>': port 0 cannot carry traffic"),
        (vec!["--quic-ports", &seventeen], "--quic-ports: 17 ports given; at most 16 are supported (or `all`)"),
        (vec!["--quic-on-overload", "block"], "invalid value 'block' for '--quic-on-overload <QUIC_ON_OVERLOAD>'"),
    ];
    for (args, why) in cases {
        refused_before_loading(&run(&args), &args, why, &dir.path().join("pins"));
    }
    let config = dir.path().join("blokir.toml");
    std::fs::write(&config, "quic-ports = [443, \"h3\"]\n").unwrap();
    let out = run(&["--config", config.to_str().unwrap()]);
    assert!(out.code() == Some(2) && out.stderr.contains(&format!("{}:1: quic-ports: invalid value 'h3'", config.display())), "{out}");
    std::fs::write(&config, "quic_ports = [443, 8443]\n").unwrap();
    let out = run(&["--config", config.to_str().unwrap(), "--quic-ports", "all"]);
    assert!(out.code() == Some(2) && out.stderr.contains("`all` cannot be combined with ports (443,8443)"), "{out}");
}

#[test]
fn the_daemon_takes_its_settings_from_a_config_file_and_refuses_a_bad_one() {
    let topo = Topology::new().unwrap();
    let rules = topo.dir().join("telegram.rules");
    std::fs::write(&rules, telegram_rules()).unwrap();
    let config = topo.dir().join("blokir.toml");
    // Generic mode: its XDP_TX answers reach a veth peer (see e2e_answers.rs).
    let text = format!("# test box\nmode = \"generic\"\nrules = [{:?}]\ndns_action = \"nxdomain\"\nanswer-ttl = 42\n", rules.display().to_string());
    std::fs::write(&config, text).unwrap();
    let daemon = topo.start_daemon_with(&[], &["--config", config.to_str().unwrap()]).unwrap();
    let a = topo.dig(&Query::udp4("t.me")).unwrap();
    assert_eq!(a.status.as_deref(), Some("NXDOMAIN"), "the file's action:\n{a}");
    let status: serde_json::Value = serde_json::from_str(&daemon.cli(&["status", "--output", "json"]).unwrap().ok().unwrap().stdout).unwrap();
    assert_eq!(status["attached"][0]["mode"], "generic", "{status}");
    assert!(status["lists"].as_array().unwrap().iter().any(|l| l["name"] == "telegram" && l["dns_action"] == "nxdomain"), "{status}");
    daemon.stop().unwrap();

    std::fs::write(&config, "mode = \"generic\"\n\ndns-action = \"nxdomian\"\n").unwrap();
    let out = netns::run(topo.daemon_command(&[]).unwrap().arg("--config").arg(&config), Duration::from_secs(15)).unwrap();
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains(&format!("{}:3: dns-action: invalid value 'nxdomian'", config.display())), "{out}");
    assert!(!topo.xdp_attached().unwrap(), "nothing attached after a refused start");
}

/// The unit in packaging/ passes `systemd-analyze verify` and keeps a low
/// exposure score (systemd's own hardening review).
#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/systemd/blokir.service")).unwrap();
    let bin = blokir_bin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blokir.service");
    // verify checks that the binary exists: point the unit at the one built.
    std::fs::write(&path, unit.replace("/usr/bin/blokir", bin.to_str().unwrap())).unwrap();
    let out = netns::run(Command::new("systemd-analyze").arg("verify").arg(&path), Duration::from_secs(30)).unwrap();
    assert!(out.success() && out.stderr.trim().is_empty(), "{out}");
    let out = netns::run(Command::new("systemd-analyze").args(["security", "--offline=yes"]).arg(&path), Duration::from_secs(30)).unwrap().ok().unwrap();
    let score: f64 = out
        .stdout
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for blokir.service:").map(|(_, r)| r.split_whitespace().next().unwrap().parse().unwrap()))
        .unwrap_or_else(|| panic!("no exposure level:\n{out}"));
    assert!(score <= 3.0, "exposure {score} (systemd rates up to 3.9 as OK, lower is better):\n{out}");
}

/// A run refused with exit code 2 and `why`, before anything was loaded or
/// pinned under `pins`.
#[track_caller]
fn refused_before_loading(out: &netns::Captured, args: &[&str], why: &str, pins: &std::path::Path) {
    assert!(out.code() == Some(2) && out.stderr.contains(why), "{args:?}: want {why:?}: {out}");
    assert!(!out.stderr.contains("loading") && !pins.exists(), "{args:?}: refused before anything is loaded: {out}");
}
