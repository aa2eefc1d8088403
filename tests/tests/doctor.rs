//! `blokir doctor` as an operator runs it before `blokir run`, in the edge
//! namespace of a topology (under `ip netns exec`, as an operator would):
//! a free veth with native XDP tried, another program attached by
//! iproute2, a missing interface, a non-root user, a read-only state
//! directory, an address in use, a jumbo MTU, a running daemon; and `run`
//! refusing to start with the doctor's words. Run as root, serially:
//! `BLOKIR_BIN=target/debug/blokir cargo test -p blokir-tests --test doctor -- --test-threads=1`.

use std::{path::PathBuf, process::Command, time::Duration};

use blokir_tests::netns::{self, Captured, EDGE_CLIENT_IFACE, METRICS_ADDR, Topology};

/// `blokir doctor` in the edge namespace with the topology's directories.
fn doctor(topo: &Topology, args: &[&str]) -> Captured {
    doctor_as(topo, &[], args)
}

/// The same, run through `wrapper` (e.g. `setpriv ...`).
fn doctor_as(topo: &Topology, wrapper: &[&str], args: &[&str]) -> Captured {
    let bin = topo.blokir().unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", topo.edge()]).args(wrapper).arg(bin).arg("--socket").arg(topo.socket()).arg("doctor");
    cmd.arg("--pin-dir").arg(topo.pin_dir()).arg("--state-dir").arg(topo.state_dir()).args(["--metrics-addr", METRICS_ADDR]);
    netns::run(cmd.args(args).env("NO_COLOR", "1"), Duration::from_secs(60)).unwrap()
}

/// The line of `check` (its first, with the fix below it if any).
fn line<'a>(out: &'a Captured, check: &str) -> &'a str {
    out.stdout.lines().find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(&format!("{check} ")))).unwrap_or_else(|| panic!("no {check} line:\n{out}"))
}

/// Whether an XDP program is attached to the edge's client side.
fn attached(topo: &Topology) -> Option<String> {
    let out = netns::run(Command::new("ip").args(["-n", topo.edge(), "link", "show", EDGE_CLIENT_IFACE]), Duration::from_secs(10)).unwrap();
    out.stdout.split_whitespace().find(|w| w.starts_with("xdp")).map(str::to_string)
}

/// `blokir run` in the edge namespace as `start_daemon` runs it, given a
/// short time: a refusal comes before anything is loaded.
fn run_refused(topo: &Topology, args: &[&str]) -> Captured {
    let mut cmd = topo.daemon_command(&[]).unwrap();
    netns::run(cmd.args(args), Duration::from_secs(60)).unwrap()
}

#[test]
fn a_free_veth_passes_with_native_xdp_tried_and_left_detached() {
    let topo = Topology::new().unwrap();
    let out = doctor(&topo, &["--iface", EDGE_CLIENT_IFACE]);
    assert!(out.success(), "{out}");
    for check in ["kernel", "btf", "privileges", "pin dir", "state dir", "metrics"] {
        assert!(line(&out, check).starts_with("OK "), "{check}:\n{out}");
    }
    assert!(line(&out, "kernel").contains("one of the kernels CI runs"), "{out}");
    let iface = line(&out, &format!("iface {EDGE_CLIENT_IFACE}"));
    assert!(iface.starts_with("OK ") && iface.contains("driver veth") && iface.contains("RX queue") && iface.contains("MTU 1500"), "{out}");
    let native = line(&out, &format!("native {EDGE_CLIENT_IFACE}"));
    assert!(native.starts_with("OK ") && native.contains("attached in native mode and detached"), "{out}");
    assert_eq!(attached(&topo), None, "the no-op program stayed attached");
    assert!(out.stdout.trim_end().ends_with("blokir can run here with these settings."), "{out}");

    // Generic asked in `run`'s config file: still tried, and said so; JSON
    // for scripts.
    let config = topo.dir().join("blokir.toml");
    std::fs::write(&config, format!("iface = [\"{EDGE_CLIENT_IFACE}\"]\nmode = \"generic\"\ndns-action = \"nxdomain\"\n")).unwrap();
    let out = doctor(&topo, &["--config", config.to_str().unwrap(), "--output", "json"]);
    assert!(out.success(), "{out}");
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["result"], "ok", "{out}");
    let checks = report["checks"].as_array().unwrap();
    let native = checks.iter().find(|c| c["check"] == format!("native {EDGE_CLIENT_IFACE}")).unwrap();
    assert!(native["level"] == "ok" && native["detail"].as_str().unwrap().contains("--mode generic asked"), "{native}");
    assert!(checks.iter().all(|c| c["level"] == "ok" && c["detail"].is_string()), "{out}");

    // --no-trial: nothing is attached, not even for a moment.
    let out = doctor(&topo, &["--iface", EDGE_CLIENT_IFACE, "--no-trial"]);
    assert!(out.success() && !out.stdout.contains("native "), "{out}");
}

#[test]
fn a_missing_interface_fails_doctor_and_run_with_the_same_line() {
    let topo = Topology::new().unwrap();
    let out = doctor(&topo, &["--iface", "missing0"]);
    assert_eq!(out.code(), Some(5), "{out}");
    let fail = line(&out, "iface missing0");
    assert!(fail.starts_with("FAIL") && fail.contains("no such interface in this network namespace"), "{out}");
    assert!(out.stdout.contains("-> check the name (`ip link`)"), "{out}");
    assert!(out.stdout.trim_end().ends_with("fix the FAIL lines."), "{out}");

    let run = run_refused(&topo, &["--iface", "missing0", "--cleanup"]);
    assert_eq!(run.code(), Some(5), "{run}");
    assert!(run.stderr.contains("cannot start") && run.stderr.contains(fail), "{run}\nthe doctor's line: {fail}");
    assert!(topo.pinned().is_empty(), "a refused start pinned {:?}", topo.pinned());
}

/// A two-instruction XDP program (`return XDP_PASS`) assembled with LLVM's
/// assembler, for iproute2 to attach as any other tool would.
fn foreign_program(topo: &Topology) -> PathBuf {
    let src = topo.dir().join("pass.s");
    std::fs::write(
        &src,
        "\t.section xdp,\"ax\",@progbits\n\t.globl pass\n\t.type pass,@function\npass:\n\tr0 = 2\n\texit\n.Lend:\n\t.size pass, .Lend-pass\n\
         \t.section license,\"aw\",@progbits\n\t.globl _license\n\t.type _license,@object\n_license:\n\t.asciz \"GPL\"\n\t.size _license, 4\n",
    )
    .unwrap();
    let obj = topo.dir().join("pass.o");
    let mc = ["/usr/lib/llvm-22/bin/llvm-mc", "llvm-mc-22", "llvm-mc"]
        .into_iter()
        .find(|m| Command::new(m).arg("--version").output().is_ok())
        .expect("LLVM's llvm-mc (installed with LLVM 22 by `cargo xtask setup`)");
    let out = netns::run(Command::new(mc).args(["-triple", "bpfel", "-filetype=obj", "-o"]).arg(&obj).arg(&src), Duration::from_secs(30)).unwrap();
    assert!(out.success(), "{out}");
    obj
}

#[test]
fn an_interface_held_by_another_program_fails_until_it_is_detached() {
    let topo = Topology::new().unwrap();
    let obj = foreign_program(&topo);
    let ip = |args: &[&str]| netns::run(Command::new("ip").args(["-n", topo.edge()]).args(args), Duration::from_secs(10)).unwrap();
    let out = ip(&["link", "set", "dev", EDGE_CLIENT_IFACE, "xdpgeneric", "obj", obj.to_str().unwrap(), "sec", "xdp"]);
    assert!(out.success(), "{out}");
    assert_eq!(attached(&topo).as_deref(), Some("xdpgeneric"));

    let out = doctor(&topo, &["--iface", EDGE_CLIENT_IFACE]);
    assert_eq!(out.code(), Some(5), "{out}");
    let fail = line(&out, &format!("xdp {EDGE_CLIENT_IFACE}"));
    assert!(fail.starts_with("FAIL") && fail.contains("another XDP program pass (id ") && fail.contains("attached in generic mode"), "{out}");
    assert!(out.stdout.contains(&format!("`ip link set dev {EDGE_CLIENT_IFACE} xdp off`")), "{out}");
    assert!(!out.stdout.contains("native "), "tried native XDP over an attached program:\n{out}");
    let run = run_refused(&topo, &["--cleanup"]);
    assert_eq!(run.code(), Some(5), "{run}");
    assert!(run.stderr.contains(fail), "{run}");
    assert_eq!(attached(&topo).as_deref(), Some("xdpgeneric"), "the other program must stay");

    assert!(ip(&["link", "set", "dev", EDGE_CLIENT_IFACE, "xdpgeneric", "off"]).success());
    assert!(doctor(&topo, &["--iface", EDGE_CLIENT_IFACE]).success());
}

#[test]
fn a_running_daemon_is_a_warning_and_its_pinned_program_is_taken_over() {
    let topo = Topology::new().unwrap();
    let daemon = topo.start_daemon_with(&[], &["--mode", "native"]).unwrap();
    let out = doctor(&topo, &["--iface", EDGE_CLIENT_IFACE, "--mode", "generic"]);
    assert!(out.success(), "{out}");
    let xdp = line(&out, &format!("xdp {EDGE_CLIENT_IFACE}"));
    assert!(
        xdp.starts_with("OK ")
            && xdp.contains("program blokir (id ")
            && xdp.contains("attached in native mode by the pinned link")
            && xdp.contains("without a gap"),
        "{out}"
    );
    assert!(line(&out, "pin dir").starts_with("WARN") && out.stdout.contains("a blokir daemon is running and holds it"), "{out}");
    assert!(line(&out, "metrics").starts_with("WARN") && line(&out, "metrics").contains("in use (by the running blokir daemon"), "{out}");
    assert!(out.stdout.trim_end().ends_with("read the warnings."), "{out}");
    daemon.stop().unwrap();
}

#[test]
fn a_non_root_user_a_read_only_state_dir_and_a_taken_address_fail() {
    let topo = Topology::new().unwrap();
    // As nobody, with no capabilities.
    let out = doctor_as(&topo, &["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"], &["--iface", EDGE_CLIENT_IFACE]);
    assert_eq!(out.code(), Some(5), "{out}");
    let privileges = line(&out, "privileges");
    assert!(privileges.starts_with("FAIL") && privileges.contains("missing CAP_NET_ADMIN and CAP_BPF and CAP_PERFMON"), "{out}");
    assert!(line(&out, &format!("native {EDGE_CLIENT_IFACE}")).starts_with("WARN") && out.stdout.contains("not tried"), "{out}");

    // A state directory on a read-only mount.
    let ro = topo.dir().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let mount = |args: &[&str]| netns::run(Command::new("mount").args(args), Duration::from_secs(10)).unwrap();
    assert!(mount(&["-t", "tmpfs", "-o", "ro", "tmpfs", ro.to_str().unwrap()]).success());
    let state = ro.join("state");
    let out = doctor(&topo, &["--iface", EDGE_CLIENT_IFACE, "--state-dir", state.to_str().unwrap()]);
    let _ = netns::run(Command::new("umount").args(["-l", ro.to_str().unwrap()]), Duration::from_secs(10));
    assert_eq!(out.code(), Some(5), "{out}");
    let fail = line(&out, "state dir");
    assert!(fail.starts_with("FAIL") && fail.contains(&format!("{} is on a read-only file system", ro.display())), "{out}");

    // The metrics address taken by another listener in the namespace.
    let mut listener = topo
        .exec(topo.edge(), "python3")
        .args(["-c", "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',9947))\ns.listen()\nprint('up',flush=True)\ntime.sleep(60)"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 2];
    std::io::Read::read_exact(listener.stdout.as_mut().unwrap(), &mut first).unwrap();
    let out = doctor(&topo, &["--iface", EDGE_CLIENT_IFACE]);
    let run = run_refused(&topo, &["--cleanup"]);
    let _ = listener.kill();
    let _ = listener.wait();
    assert_eq!(out.code(), Some(5), "{out}");
    let fail = line(&out, "metrics");
    assert!(fail.starts_with("FAIL") && fail.contains(&format!("{METRICS_ADDR} is in use")), "{out}");
    assert!(run.code() == Some(5) && run.stderr.contains(fail), "{run}");
}

#[test]
fn a_jumbo_mtu_is_refused_for_native_xdp_and_said_so() {
    let topo = Topology::new().unwrap();
    // veth refuses a program without multi-buffer support when either end's
    // MTU outgrows a page.
    for (ns, dev) in [(topo.edge(), EDGE_CLIENT_IFACE), (topo.client(), netns::CLIENT_IFACE)] {
        let out = netns::run(Command::new("ip").args(["-n", ns, "link", "set", "dev", dev, "mtu", "9000"]), Duration::from_secs(10)).unwrap();
        assert!(out.success(), "{out}");
    }
    let out = doctor(&topo, &["--iface", EDGE_CLIENT_IFACE]);
    assert!(out.success(), "auto mode falls back to generic: a warning, not a failure\n{out}");
    let native = line(&out, &format!("native {EDGE_CLIENT_IFACE}"));
    assert!(native.starts_with("WARN") && native.contains("native XDP refused at MTU 9000") && native.contains("falls back to generic XDP"), "{out}");
    assert!(out.stdout.contains("lower the MTU to 3498 or less"), "{out}");
    let out = doctor(&topo, &["--iface", EDGE_CLIENT_IFACE, "--mode", "native"]);
    assert_eq!(out.code(), Some(5), "{out}");
    assert!(line(&out, &format!("native {EDGE_CLIENT_IFACE}")).contains("--mode native cannot attach"), "{out}");
}
