//! The command line as a shell user meets it: completion scripts that a
//! real bash loads and completes from.

use std::{process::Command, time::Duration};

use blokir_tests::{blokir_bin, netns};

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
