//! `blokir run --config FILE`: a TOML file for everything `run`'s flags set.
//! Each key is a flag's long name (`dns-action` or `dns_action`) and its
//! value what the flag takes: a string or number, `true` for a switch, an
//! array for a repeatable flag. The file's settings become flags inserted
//! right after `run`, so they go through the very parsers and checks the
//! command line does, and a flag given on the command line wins over the
//! file (a repeatable one adds to it). Every key is checked on its own first,
//! so a bad one is reported as `FILE:LINE: key: why`.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::ArgAction;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{file}:{line}: {why}")]
    At { file: String, line: usize, why: String },
}

/// The subcommand that takes `--config`.
const SUBCOMMAND: &str = "run";
/// Flags a file cannot set.
const NOT_SETTABLE: [&str; 3] = ["config", "help", "version"];

/// `args` (a whole command line) with the settings of the file named by
/// `run --config FILE` inserted after `run` (or `doctor`, which takes
/// `run`'s flags); unchanged without `--config`.
pub fn expand(args: Vec<OsString>, cmd: &clap::Command) -> Result<Vec<OsString>, ConfigError> {
    let Some(run_at) = args.iter().skip(1).position(|a| a == SUBCOMMAND || a == "doctor").map(|i| i + 1) else { return Ok(args) };
    let Some(path) = config_path(&args[run_at + 1..]) else { return Ok(args) };
    let settings = read(&path, cmd)?;
    let mut out = args[..=run_at].to_vec();
    out.extend(settings);
    out.extend_from_slice(&args[run_at + 1..]);
    Ok(out)
}

/// The value of `--config FILE` or `--config=FILE` (before a `--`).
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().take_while(|a| *a != "--");
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// The file's settings, as `run` flags.
fn read(path: &Path, cmd: &clap::Command) -> Result<Vec<OsString>, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io(file.clone(), e))?;
    let at = |line: usize, why: String| ConfigError::At { file: file.clone(), line, why };
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e.span().map_or(1, |s| line_of_offset(&text, s.start));
        at(line, e.message().trim().to_string())
    })?;
    let mut cmd = cmd.clone();
    cmd.build();
    let run = cmd.find_subcommand(SUBCOMMAND).expect("the run subcommand");
    // Each key alone, with nothing required, so its own value is what is judged.
    let mut alone = run.clone().mut_args(|a| a.required(false)).no_binary_name(true);
    let mut flags = Vec::new();
    for (key, value) in &table {
        let line = line_of_key(&text, key);
        let long = key.replace('_', "-");
        let arg = run
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && !NOT_SETTABLE.contains(&long.as_str()))
            .ok_or_else(|| at(line, format!("unknown setting `{key}` (the settings are `blokir run`'s flags: {})", settable(run))))?;
        let own = as_flags(&long, arg.get_action(), value).map_err(|why| at(line, format!("{key}: {why}")))?;
        if let Err(e) = alone.try_get_matches_from_mut(&own) {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
            return Err(at(line, format!("{key}: {first}")));
        }
        flags.extend(own);
    }
    Ok(flags)
}

/// One setting as command-line arguments.
fn as_flags(long: &str, action: &ArgAction, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let flag = OsString::from(format!("--{long}"));
    let scalar = |v: &toml::Value| match v {
        toml::Value::String(s) => Ok(OsString::from(s)),
        toml::Value::Integer(i) => Ok(OsString::from(i.to_string())),
        toml::Value::Float(f) => Ok(OsString::from(f.to_string())),
        other => Err(format!("expected a string or a number, not {}", other.type_str())),
    };
    match (action, value) {
        (ArgAction::SetTrue, toml::Value::Boolean(true)) => Ok(vec![flag]),
        (ArgAction::SetTrue, toml::Value::Boolean(false)) => Ok(vec![]),
        (ArgAction::SetTrue, other) => Err(format!("expected true or false, not {}", other.type_str())),
        (ArgAction::Append, toml::Value::Array(items)) => {
            items.iter().map(|v| Ok([flag.clone(), scalar(v)?])).collect::<Result<Vec<_>, String>>().map(|v| v.concat())
        }
        (_, toml::Value::Array(_)) => Err("takes one value, not an array".into()),
        (_, v) => Ok(vec![flag, scalar(v)?]),
    }
}

fn settable(run: &clap::Command) -> String {
    let names: Vec<&str> = run.get_arguments().filter_map(|a| a.get_long()).filter(|l| !NOT_SETTABLE.contains(l)).collect();
    names.join(", ")
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

/// The line that sets `key` (the first, for a reported error).
fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix(key).or_else(|| l.strip_prefix(&format!("\"{key}\"")));
            rest.is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn cli() -> Command {
        Command::new("blokir").arg(Arg::new("socket").long("socket").global(true).default_value("/run/s")).subcommand(
            Command::new("run")
                .args_override_self(true)
                .arg(Arg::new("iface").long("iface").action(ArgAction::Append).required(true))
                .arg(Arg::new("dns-action").long("dns-action").value_parser(["drop", "nxdomain"]).default_value("drop"))
                .arg(Arg::new("answer-ttl").long("answer-ttl").value_parser(clap::value_parser!(u32)).default_value("60"))
                .arg(Arg::new("event-log").long("event-log").action(ArgAction::SetTrue))
                .arg(Arg::new("config").long("config")),
        )
    }

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blokir.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn settings_become_flags_that_the_command_line_overrides() {
        let (_d, path) =
            file("# edge box 7\niface = [\"eth1\", \"eth2\"]\ndns_action = \"nxdomain\"\nanswer-ttl = 30\nevent-log = true\nsocket = \"/run/b.sock\"\n");
        let argv = args(&format!("blokir run --config {} --answer-ttl 5", path.display()));
        let out = expand(argv, &cli()).unwrap();
        let m = cli().try_get_matches_from(&out).unwrap();
        let (_, run) = m.subcommand().unwrap();
        assert_eq!(run.get_many::<String>("iface").unwrap().collect::<Vec<_>>(), ["eth1", "eth2"]);
        assert_eq!(run.get_one::<String>("dns-action").unwrap(), "nxdomain");
        assert_eq!(*run.get_one::<u32>("answer-ttl").unwrap(), 5, "the command line wins");
        assert!(run.get_flag("event-log"));
        assert_eq!(run.get_one::<String>("socket").unwrap(), "/run/b.sock");
        // Without --config, or for another subcommand, nothing changes.
        assert_eq!(expand(args("blokir run --iface x"), &cli()).unwrap(), args("blokir run --iface x"));
        assert_eq!(expand(args("blokir status"), &cli()).unwrap(), args("blokir status"));
    }

    #[test]
    fn each_bad_setting_is_reported_with_its_line() {
        let bad = |text: &str| {
            let (_d, path) = file(text);
            let e = expand(args(&format!("blokir run --config={}", path.display())), &cli()).unwrap_err().to_string();
            e.strip_prefix(&format!("{}:", path.display())).unwrap_or_else(|| panic!("{e}")).to_string()
        };
        assert_eq!(bad("iface = [\"eth1\"]\n\ndns-actoin = \"drop\"\n").split(':').next(), Some("3"));
        assert!(bad("dns-actoin = 1").contains("unknown setting `dns-actoin`"));
        let e = bad("iface = [\"eth1\"]\ndns_action = \"refuse\"\n");
        assert!(e.starts_with("2: dns_action: invalid value 'refuse'"), "{e}");
        assert!(bad("answer-ttl = \"soon\"").starts_with("1: answer-ttl: invalid value"));
        assert!(bad("event-log = \"yes\"").contains("expected true or false"));
        assert!(bad("dns-action = [\"drop\"]").contains("takes one value"));
        assert!(bad("iface = [{ name = \"x\" }]").contains("expected a string or a number"));
        assert!(bad("config = \"/etc/other.toml\"").contains("unknown setting"));
        assert!(bad("iface = [\"eth1\"\n").starts_with("1:"), "a syntax error has its line");
        let (_d, path) = file("");
        let missing = path.with_file_name("none.toml");
        let e = expand(args(&format!("blokir run --config {}", missing.display())), &cli()).unwrap_err();
        assert!(matches!(e, ConfigError::Io(..)) && e.to_string().contains("none.toml"));
    }
}
