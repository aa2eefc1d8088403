//! The object loads on this kernel, and the verifier's work stays well under
//! its limit; and its control flow is one that older kernels' verifiers
//! accept too (checked on the object itself, so it holds on any host).

use blokir_tests::Loaded;
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SectionKind, SymbolKind};

/// The verifier gives up at 1M processed instructions; fail at half.
const BUDGET: u32 = 500_000;

/// On a kernel below the floor (`setarch --uname-2.6` makes this one report
/// 2.6.x to the process, as an old box would), `run` and `replay` refuse in
/// one line that names the kernel and the supported versions, with exit
/// code 4, before loading anything.
#[test]
fn a_kernel_below_the_floor_is_refused_in_one_line_with_exit_code_4() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("national.rules");
    std::fs::write(&rules, "blocked.test\n").unwrap();
    let capture = blokir_tests::pcaps_dir().join("real-clients-dev.pcap");
    let bin = blokir_tests::blokir_bin().unwrap();
    let (state, pins, sock) = (dir.path().join("state"), dir.path().join("pins"), dir.path().join("sock"));
    let runs: [Vec<&std::ffi::OsStr>; 2] = [
        vec!["replay".as_ref(), capture.as_ref(), "--rules".as_ref(), rules.as_ref()],
        vec![
            "--socket".as_ref(),
            sock.as_ref(),
            "run".as_ref(),
            "--iface".as_ref(),
            "lo".as_ref(),
            "--rules".as_ref(),
            rules.as_ref(),
            "--state-dir".as_ref(),
            state.as_ref(),
            "--pin-dir".as_ref(),
            pins.as_ref(),
            "--metrics-addr".as_ref(),
            "127.0.0.1:0".as_ref(),
        ],
    ];
    for args in runs {
        let mut cmd = std::process::Command::new("setarch");
        cmd.args(["x86_64", "--uname-2.6"]).arg(&bin).args(&args).env("RUST_LOG", "warn");
        let out = blokir_tests::netns::run(&mut cmd, std::time::Duration::from_secs(30)).unwrap();
        assert_eq!(out.code(), Some(4), "{args:?}: {out}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got {out}");
        for part in ["Linux 2.6.", "5.15 and later", "6.1, 6.12 and 6.18", "nothing was loaded"] {
            assert!(lines[0].contains(part), "{args:?}: {part:?} missing from {}", lines[0]);
        }
        assert!(!state.exists() && !pins.exists() && !sock.exists(), "{args:?}: nothing created before the refusal");
    }
}

#[test]
fn verifier_accepts_the_programs_within_half_its_budget() {
    let l = Loaded::new(&[]);
    for (name, n) in l.kernel.verified_instructions().unwrap() {
        let n = n.expect("kernel reports verified_insns (5.16+)");
        println!("verifier processed {n} instructions for {name} (budget {BUDGET})");
        assert!(n < BUDGET, "verifier processed {n} instructions for {name}, over the budget of {BUDGET}");
    }
}

/// One BPF instruction's fields that decide its control flow.
struct Insn {
    code: u8,
    off: i16,
}

/// Linux before 6.7 (`check_cfg` in kernel/bpf/verifier.c, 6.1 included)
/// walks every function depth-first and accepts a loop only when its
/// back-edge is made by a jump instruction: a back-edge reached by falling
/// through from any other instruction is refused ("back-edge from insn X to
/// Y"). LLVM produces that shape when it lays a loop's latch out just above
/// its head, whatever the source says, so this replays the same walk on each
/// function of the object. Returns the offending edge.
fn fallthrough_back_edge(insns: &[Insn]) -> Option<(usize, usize)> {
    const DISCOVERED: u8 = 0x10;
    const EXPLORED: u8 = 0x20;
    const FALLTHROUGH: u8 = 1;
    const BRANCH: u8 = 2;
    let n = insns.len();
    let mut state = vec![0u8; n];
    let mut stack = vec![0usize];
    state[0] = DISCOVERED;
    // push_insn: Ok(true) when `w` is new and must be explored first.
    let push = |state: &mut Vec<u8>, stack: &mut Vec<usize>, t: usize, w: i64, e: u8, loop_ok: bool| -> Result<bool, (usize, usize)> {
        if state[t] >= (DISCOVERED | e) {
            return Ok(false);
        }
        let w = usize::try_from(w).ok().filter(|&w| w < n).expect("jump inside the function");
        if state[w] == 0 {
            state[t] = DISCOVERED | e;
            state[w] = DISCOVERED;
            stack.push(w);
            return Ok(true);
        }
        if state[w] & 0xf0 == DISCOVERED {
            return if loop_ok { Ok(false) } else { Err((t, w)) };
        }
        state[t] = DISCOVERED | e;
        Ok(false)
    };
    while let Some(&t) = stack.last() {
        let i = &insns[t];
        let class = i.code & 7;
        let op = i.code & 0xf0;
        let (t1, target) = (t as i64 + 1, t as i64 + i.off as i64 + 1);
        let pushed = if class == 5 || class == 6 {
            match op {
                0x90 => Ok(false), // exit
                // A call falls through (`loop_ok` false); a bpf-to-bpf
                // call's target is another function, walked on its own.
                0x80 => push(&mut state, &mut stack, t, t1, FALLTHROUGH, false),
                0x00 if class == 5 => push(&mut state, &mut stack, t, target, FALLTHROUGH, true), // ja
                _ => match push(&mut state, &mut stack, t, t1, FALLTHROUGH, true) {
                    Ok(false) => push(&mut state, &mut stack, t, target, BRANCH, true),
                    other => other,
                },
            }
        } else {
            push(&mut state, &mut stack, t, t1, FALLTHROUGH, false)
        };
        match pushed {
            Err(edge) => return Some(edge),
            Ok(true) => continue,
            Ok(false) => {
                state[t] = EXPLORED;
                stack.pop();
            }
        }
    }
    None
}

fn functions(obj: &object::File) -> Vec<(String, Vec<Insn>)> {
    let mut out = Vec::new();
    for sym in obj.symbols() {
        let Some(section) = sym.section_index().and_then(|i| obj.section_by_index(i).ok()) else { continue };
        if sym.kind() != SymbolKind::Text || section.kind() != SectionKind::Text || sym.size() == 0 {
            continue;
        }
        let data = section.data().unwrap();
        let body = &data[sym.address() as usize..(sym.address() + sym.size()) as usize];
        let insns = body.chunks_exact(8).map(|b| Insn { code: b[0], off: i16::from_le_bytes([b[2], b[3]]) }).collect();
        out.push((sym.name().unwrap().to_string(), insns));
    }
    out
}

#[test]
fn no_loop_back_edge_is_reached_by_falling_through() {
    let obj = object::File::parse(blokir::ebpf::OBJECT).unwrap();
    let funcs = functions(&obj);
    for program in [
        "blokir",
        "blokir_dns",
        "blokir_tls",
        "blokir_http",
        "blokir_dns_tcp",
        "blokir_dns_tcp_read",
        "blokir_dns_tcp_question",
        "blokir_match",
        "blokir_reply",
        "blokir_quic",
        "blokir_rewrite",
    ] {
        assert!(funcs.iter().any(|(name, _)| name == program), "{program} is in the object");
    }
    let refused: Vec<String> =
        funcs.iter().filter_map(|(name, insns)| fallthrough_back_edge(insns).map(|(from, to)| format!("{name}: back-edge from insn {from} to {to}"))).collect();
    assert!(refused.is_empty(), "Linux before 6.7 would refuse: {refused:?}");
}

/// The walk itself: a loop closed by a conditional jump passes, one whose
/// latch falls into its head does not (the shape 6.1 refused in
/// `blokir_dns`).
#[test]
fn the_back_edge_check_tells_the_two_loop_shapes_apart() {
    let alu = || Insn { code: 0x07, off: 0 }; // r += imm
    let jgt = |off| Insn { code: 0x25, off }; // if r > imm goto
    let ja = |off| Insn { code: 0x05, off };
    let exit = || Insn { code: 0x95, off: 0 };
    // 0: ja +2 (into the head); 1: latch (alu), falls into 2; 2: head; 3: if .. goto -3 (to 1); 4: exit
    let rotated = [ja(1), alu(), alu(), jgt(-3), exit()];
    assert_eq!(fallthrough_back_edge(&rotated), Some((1, 2)));
    // 0: head; 1: alu; 2: if .. goto -3 (to 0); 3: exit
    let bottom_tested = [alu(), alu(), jgt(-3), exit()];
    assert_eq!(fallthrough_back_edge(&bottom_tested), None);
}
