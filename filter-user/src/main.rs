//! The `blokir` command: `run` is the daemon, `rules` and `status` talk to it.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context as _;
use blokir::{
    config,
    control::{self, DEFAULT_SOCKET, Request, Response},
    daemon::{self, OnExit, Options},
    doctor,
    ebpf::Mode,
    events::{self, EventLog},
    lists::{self, ListDef, fetch::Timeouts, parse_interval},
    metrics::{Endpoint, Listen},
    pin::{DEFAULT_PIN_DIR, PinDir},
    policy::{
        DnsPolicy, FragmentPolicy, ListSettings, PortArg, PortSet, QuicOverload, QuicPolicy, Setting, TamperPolicy, TrafficPolicy, parse_action,
        parse_list_action, parse_list_tcp_action, parse_port, parse_port_arg, parse_tcp_action,
    },
    replay,
    rules::{formats::Format, shrink::MaxShrink},
};
use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use filter_common::{reply::DnsAction, reset::TcpAction, rules::DEFAULT_RULE_CAPACITY};
use std::io::Write as _;

/// Exit codes: 0 done, 1 error (e.g. no daemon), 2 bad command line (clap),
/// 3 the daemon refused the request, 4 this kernel cannot run blokir
/// ([`blokir::support::EXIT_UNSUPPORTED`]).
const EXIT_REFUSED: u8 = 3;
/// As clap's own exit code for a bad command line.
const EXIT_USAGE: u8 = 2;

/// `blokir --version`: the release and the commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("BLOKIR_COMMIT"), ")");

#[derive(Parser)]
#[command(name = "blokir", version = VERSION, about = "Block listed domains in XDP: DNS queries, TLS server names and HTTP Host names, at line rate")]
// The last of a repeated option wins (wrappers may append overrides).
#[command(args_override_self = true)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET, env = "BLOKIR_SOCKET")]
    socket: PathBuf,
    /// Log lines as plain text (coloured only on a terminal) or as JSON
    /// objects, one per line, for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "BLOKIR_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// A timeout in whole seconds, 1 to 300 (a download's own limit).
fn seconds(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<u64>() {
        Ok(n) if (1..=300).contains(&n) => Ok(std::time::Duration::from_secs(n)),
        _ => Err(format!("{s:?} is not a timeout: whole seconds from 1 to 300")),
    }
}

/// `--rule-capacity`: refused at parse time, with the range, like any bad flag.
fn rule_capacity(s: &str) -> Result<u32, String> {
    let max = filter_common::rules::MAX_RULE_ID;
    match s.parse::<u32>() {
        Ok(n) if (2..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a rule capacity: a number from 2 to {max}")),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr (the journal, under systemd), `RUST_LOG` filtering.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr);
    match format {
        // No colour codes in files or the journal.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
}

// Parsed once per process: the size of `Run` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Load the XDP program and the rules, attach, and serve until stopped.
    Run(RunArgs),
    /// Check whether this box can run blokir with these settings (the same
    /// flags and --config as `run`): kernel, privileges, each interface
    /// (native XDP tried with a no-op program), pin and state directories,
    /// the metrics address. OK / WARN / FAIL per line; exit code 5 on a
    /// FAIL. `run` makes the same checks first (all but the native trial).
    Doctor {
        #[command(flatten)]
        run: RunArgs,
        /// Do not attach a no-op program to try native XDP (on some drivers
        /// an attachment restarts the rings: a moment without traffic).
        #[arg(long)]
        no_trial: bool,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Detach the program and remove everything blokir pinned (for when no
    /// daemon runs, e.g. after it was killed or stopped without --cleanup).
    Cleanup {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Change or inspect the rules of the running daemon.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
        #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Named lists, each with its own source (file or URL), format, DNS and
    /// TCP actions and refresh interval; versions kept for rollback.
    Lists {
        #[command(subcommand)]
        command: ListsCommand,
        #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// What is attached where, and which lists are loaded.
    Status {
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Where to look for pinned links when no daemon answers.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Print the shell completion script for SHELL, e.g.
    /// `blokir completions bash > /etc/bash_completion.d/blokir`.
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages (blokir.1 and one per subcommand) into DIR,
    /// for packagers.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
    /// Run every packet of a capture (pcap or pcapng) through the real XDP
    /// program, in order, with the given rules; print each packet's verdict,
    /// the name read and the rule that matched. Needs root (it loads the
    /// program), not a running daemon.
    Replay {
        /// The capture: Ethernet, Linux cooked (`tcpdump -i any`) or raw IP.
        capture: PathBuf,
        /// Rule files, as for `run` (repeatable).
        #[arg(long = "rules")]
        rules: Vec<PathBuf>,
        /// Name nodes and rule ids the kernel maps hold (2 to 16777215).
        #[arg(long, default_value_t = DEFAULT_RULE_CAPACITY, value_parser = rule_capacity)]
        rule_capacity: u32,
        #[command(flatten)]
        dns: DnsArgs,
        /// What QUIC Initials (UDP/443) get, as for `run`: with read (the
        /// default here), their server names are read as the daemon reads
        /// them, and a blocked flow's later datagrams are dropped.
        #[arg(long, value_enum, default_value_t = QuicPolicy::Read)]
        quic: QuicPolicy,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// `blokir run`'s settings (also `blokir doctor`'s).
#[derive(Args)]
struct RunArgs {
    /// Read settings from this TOML file: keys are these flags' names
    /// (`dns-action = "nxdomain"`, `iface = ["eth1"]`); flags given here win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Interface to filter (repeat for several).
    #[arg(long = "iface", required = true)]
    ifaces: Vec<String>,
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    mode: Mode,
    /// Rule files; each feeds the list named after the file (repeatable).
    #[arg(long = "rules")]
    rules: Vec<PathBuf>,
    /// Where the local list (`blokir rules add`) is kept.
    #[arg(long, default_value = "/var/lib/blokir")]
    state_dir: PathBuf,
    /// Where /metrics, /healthz and /readyz are served: HOST:PORT, or
    /// unix:/path (a socket created mode 0600).
    #[arg(long, default_value = "127.0.0.1:9947")]
    metrics_addr: Listen,
    /// Serve the endpoint over TLS with this PEM certificate chain
    /// (needs --metrics-tls-key).
    #[arg(long, requires = "metrics_tls_key")]
    metrics_tls_cert: Option<PathBuf>,
    /// The PEM private key for --metrics-tls-cert.
    #[arg(long, requires = "metrics_tls_cert")]
    metrics_tls_key: Option<PathBuf>,
    /// Require HTTP basic auth: a file of `user:bcrypt-hash` lines (as in
    /// Prometheus's web config).
    #[arg(long)]
    metrics_basic_auth_file: Option<PathBuf>,
    /// Log blocked names (target blokir::events): protocol, family, list,
    /// rule and name, never an address. Off by default.
    #[arg(long)]
    event_log: bool,
    /// With --event-log: events logged per second at most (N or N/s).
    #[arg(long, value_parser = events::parse_rate, default_value = "100/s", requires = "event_log")]
    event_log_rate: u32,
    /// With --event-log: one event per N blocks of each rule (1/N).
    #[arg(long, value_parser = events::parse_sample, default_value = "1/1", requires = "event_log")]
    event_log_sample: u32,
    /// Name nodes and rule ids the kernel maps hold (2 to 16777215).
    #[arg(long, default_value_t = DEFAULT_RULE_CAPACITY, value_parser = rule_capacity)]
    rule_capacity: u32,
    /// Rules exported with their own hit counter on /metrics.
    #[arg(long, default_value_t = 100)]
    top_rules: usize,
    #[command(flatten)]
    dns: DnsArgs,
    /// Where the XDP links and the state shared across restarts are
    /// pinned (on bpffs; mounted at /sys/fs/bpf if missing).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// On SIGINT/SIGTERM, detach the program (keep the pinned maps). By
    /// default it stays attached and keeps filtering with the last rules.
    #[arg(long, conflicts_with = "cleanup")]
    detach_on_exit: bool,
    /// TCP ports whose payload is read as HTTP requests (their Host
    /// blocked like a server name): comma-separated or repeated, at most
    /// 16. A TLS ClientHello sent to them is read too.
    #[arg(long = "http-ports", value_name = "PORT[,PORT...]", value_parser = parse_port, value_delimiter = ',', default_value = "80")]
    http_ports: Vec<u16>,
    /// TCP ports whose payload is read for TLS ClientHellos: `all` (a
    /// hello is recognized by its content on any port), or ports,
    /// comma-separated or repeated, at most 16. Payload to other ports
    /// (and not to an HTTP port) passes unread.
    #[arg(long = "tls-ports", value_name = "all|PORT[,PORT...]", value_parser = parse_port_arg, value_delimiter = ',', default_value = "all")]
    tls_ports: Vec<PortArg>,
    /// What QUIC Initials (on the --quic-ports) get: read (passed, and the
    /// daemon reads their server name: blocked flows' later datagrams are
    /// dropped), pass (counted), or drop (browsers fall back to TCP, where
    /// the TLS server name is read).
    #[arg(long, value_enum, default_value_t = QuicPolicy::Read)]
    quic: QuicPolicy,
    /// UDP ports read for QUIC Initials: `all` (an Initial is recognized
    /// by its content on any port but 53), or ports, comma-separated or
    /// repeated, at most 16.
    #[arg(long = "quic-ports", value_name = "all|PORT[,PORT...]", value_parser = parse_port_arg, value_delimiter = ',', default_value = "all")]
    quic_ports: Vec<PortArg>,
    /// With --quic read, what an Initial that cannot go up to the daemon
    /// gets (over the per-CPU budget or the per-flow cap, the daemon's
    /// buffer full, or no daemon running): pass (unread), or drop (the
    /// client retries, or falls back to TCP). Counted either way
    /// (blokir_quic_initials_total{fate}).
    #[arg(long = "quic-on-overload", value_enum, default_value_t = QuicOverload::Pass)]
    quic_on_overload: QuicOverload,
    /// What first IP fragments of DNS queries (UDP/TCP 53) and of TCP to
    /// the HTTP and TLS ports get: drop (the datagram never reaches its
    /// application; the name in it cannot be read), or pass unread.
    /// Counted either way (blokir_evasions_total{kind="fragment"}).
    #[arg(long, value_enum, default_value_t = FragmentPolicy::Drop)]
    fragments: FragmentPolicy,
    /// What a TLS or HTTP flow whose name is being read gets when it
    /// carries urgent bytes (URG) or a fake segment the server discards
    /// (no ACK, a TCP MD5 or TCP-AO option): block, or pass (counted,
    /// read as the server reads it). Counted either way
    /// (blokir_evasions_total{kind="urgent"|"fake"}).
    #[arg(long, value_enum, default_value_t = TamperPolicy::Block)]
    on_tamper: TamperPolicy,
    /// On SIGINT/SIGTERM, detach the program and remove everything pinned
    /// under --pin-dir.
    #[arg(long)]
    cleanup: bool,
    /// Seconds a list server (`lists add --source URL`) may take to
    /// accept the connection.
    #[arg(long, value_name = "SECS", value_parser = seconds, default_value = "10")]
    fetch_connect_timeout: std::time::Duration,
    /// Seconds a list server may stay silent (no byte of its answer or
    /// body) before the download is given up.
    #[arg(long, value_name = "SECS", value_parser = seconds, default_value = "30")]
    fetch_idle_timeout: std::time::Duration,
    /// The largest share of a list one update may take away (0% to
    /// 100%): a rule file reloaded or a list refreshed with fewer rules
    /// than that leaves is refused (an emptied file, a cut-off download),
    /// the last good version stays; `rules reload --force` and `lists
    /// update --force` apply it anyway. 100% lets everything through.
    #[arg(long, value_name = "PERCENT", default_value_t = MaxShrink::DEFAULT)]
    max_shrink: MaxShrink,
}

/// What blocked DNS queries get, for `run` and `replay`.
#[derive(Args)]
struct DnsArgs {
    /// What blocked UDP queries get: drop, nxdomain, refused, nodata, or
    /// redirect (to --redirect-ipv4/--redirect-ipv6). TCP/53 queries are
    /// always dropped.
    #[arg(long, value_parser = parse_action, default_value = "drop")]
    dns_action: DnsAction,
    /// The action for one list, overriding --dns-action (repeatable).
    #[arg(long = "list-dns-action", value_name = "LIST=ACTION", value_parser = parse_list_action)]
    list_dns_actions: Vec<(String, DnsAction)>,
    /// A list of ECH outer names (repeatable): its rules block only TLS
    /// ClientHellos that carry an encrypted_client_hello extension (ECH or
    /// its GREASE), never DNS queries, HTTP requests or hellos without ECH.
    #[arg(long = "ech-outer-list", value_name = "LIST")]
    ech_outer_lists: Vec<String>,
    /// The block page's IPv4 address, answered to A queries by `redirect`.
    #[arg(long)]
    redirect_ipv4: Option<Ipv4Addr>,
    /// The block page's IPv6 address, answered to AAAA queries by `redirect`.
    #[arg(long)]
    redirect_ipv6: Option<Ipv6Addr>,
    /// TTL of redirect answers, in seconds.
    #[arg(long, default_value_t = 60)]
    answer_ttl: u32,
    /// What TCP flows blocked by name (TLS server name, HTTP Host) get:
    /// drop (the client times out) or reset (a TCP RST back to the client).
    #[arg(long, value_parser = parse_tcp_action, default_value = "drop")]
    tcp_action: TcpAction,
    /// The TCP action for one list, overriding --tcp-action (repeatable).
    #[arg(long = "list-tcp-action", value_name = "LIST=ACTION", value_parser = parse_list_tcp_action)]
    list_tcp_actions: Vec<(String, TcpAction)>,
}

impl DnsArgs {
    fn policy(self) -> DnsPolicy {
        let DnsArgs { dns_action, list_dns_actions, ech_outer_lists, redirect_ipv4, redirect_ipv6, answer_ttl, tcp_action, list_tcp_actions } = self;
        DnsPolicy {
            default: dns_action,
            per_list: list_dns_actions,
            ech_outer: ech_outer_lists,
            answer_ttl,
            redirect_v4: redirect_ipv4,
            redirect_v6: redirect_ipv6,
            tcp_default: tcp_action,
            tcp_per_list: list_tcp_actions,
        }
    }
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Add rules to the local list: `name`, `*.name` (below), `.name` (name and below).
    Add {
        /// Add as allow rules (exceptions that win over block rules).
        #[arg(long)]
        allow: bool,
        #[arg(required = true)]
        patterns: Vec<String>,
    },
    /// Remove rules from the local list.
    Del {
        #[arg(long)]
        allow: bool,
        #[arg(required = true)]
        patterns: Vec<String>,
    },
    /// List every rule with its list and hit count.
    List,
    /// Say whether names would be blocked, and by which rule.
    Check {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Re-read every rule file (all parse, or nothing changes).
    Reload {
        /// Apply files that take away more of their list than `run`'s
        /// --max-shrink allows (an emptied file lifts its list).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ListsCommand {
    /// Add a list: read or downloaded, parsed, and in force, or refused
    /// with every bad line as SOURCE:LINE.
    Add {
        name: String,
        /// A file, or an http:// or https:// URL.
        #[arg(long)]
        source: String,
        /// auto, plain, hosts, rpz or adblock.
        #[arg(long, default_value = "auto", value_parser = parse_format)]
        format: Format,
        /// What blocked UDP queries of this list get (default: `run`'s
        /// --list-dns-action for it, else --dns-action).
        #[arg(long, value_parser = parse_action)]
        action: Option<DnsAction>,
        /// What TCP flows blocked by this list's names get: drop or reset
        /// (default: `run`'s --list-tcp-action for it, else --tcp-action).
        #[arg(long, value_parser = parse_tcp_action)]
        tcp_action: Option<TcpAction>,
        /// Make it an ECH-outer list: its rules block only TLS ClientHellos
        /// that carry an encrypted_client_hello extension (default: whether
        /// `run` names it with --ech-outer-list).
        #[arg(long)]
        ech_outer: bool,
        /// Check the source this often: 90s, 30m, 1h, 1d (at least 10s).
        #[arg(long, value_parser = parse_interval)]
        refresh: Option<u64>,
        /// The SHA-256 (hex) the source must have, for a pinned source.
        #[arg(long)]
        sha256: Option<String>,
        /// Skip bad lines (counted and reported) instead of refusing the list.
        #[arg(long)]
        skip_bad_lines: bool,
        /// The largest share of the list one update may take away (default:
        /// `run`'s --max-shrink).
        #[arg(long, value_name = "PERCENT")]
        max_shrink: Option<MaxShrink>,
    },
    /// Every named list: version in force, rules, actions, last check.
    Ls,
    /// Change a list's DNS action, TCP action or ECH-outer flag, in force at
    /// once and kept; the source is not fetched again.
    #[command(group = clap::ArgGroup::new("settings").required(true).multiple(true))]
    Set {
        name: String,
        /// What blocked UDP queries of this list get.
        #[arg(long, value_parser = parse_action, group = "settings")]
        action: Option<DnsAction>,
        /// What TCP flows blocked by this list's names get: drop or reset.
        #[arg(long, value_parser = parse_tcp_action, group = "settings")]
        tcp_action: Option<TcpAction>,
        /// Whether it is an ECH-outer list.
        #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set, group = "settings")]
        ech_outer: Option<bool>,
        /// Drop the list's own setting: `run`'s flags decide it again
        /// (repeatable).
        #[arg(long, value_enum, value_name = "SETTING", group = "settings")]
        clear: Vec<Setting>,
    },
    /// Remove a list and its rules.
    Rm { name: String },
    /// Check a list's source now (a conditional GET for URLs); a new
    /// version is put in force.
    Update {
        name: String,
        /// Put it in force even if it takes away more of the list than its
        /// --max-shrink allows.
        #[arg(long)]
        force: bool,
    },
    /// Put the version before the one in force back (or --to VERSION).
    Rollback {
        name: String,
        #[arg(long)]
        to: Option<u64>,
    },
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse().map_err(|e: blokir::rules::formats::UnknownFormat| e.to_string())
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    let args = match config::expand(std::env::args_os().collect(), &Cli::command()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("blokir: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let cli = Cli::parse_from(args);
    init_logging(cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => match blokir::support::find(&e) {
            // One line, not the error chain: the verifier's log is in a file.
            Some(unsupported) => {
                eprintln!("blokir: {unsupported}");
                ExitCode::from(blokir::support::EXIT_UNSUPPORTED)
            }
            None => {
                eprintln!("blokir: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if matches!(cli.command, Command::Run(_) | Command::Replay { .. }) {
        // Before reading lists, mounting bpffs or binding anything.
        blokir::support::check_floor()?;
    }
    match cli.command {
        Command::Run(RunArgs {
            ifaces,
            mode,
            rules,
            state_dir,
            metrics_addr,
            metrics_tls_cert,
            metrics_tls_key,
            metrics_basic_auth_file,
            event_log,
            event_log_rate,
            event_log_sample,
            rule_capacity,
            top_rules,
            dns,
            pin_dir,
            detach_on_exit,
            cleanup,
            config: _,
            http_ports,
            tls_ports,
            quic,
            quic_ports,
            quic_on_overload,
            fragments,
            on_tamper,
            fetch_connect_timeout,
            fetch_idle_timeout,
            max_shrink,
        }) => {
            let ports = |args: &[PortArg], flag: &str| PortSet::from_args(args).map_err(|e| format!("{flag}: {e}"));
            let (tls_ports, quic_ports) = match ports(&tls_ports, "--tls-ports").and_then(|t| Ok((t, ports(&quic_ports, "--quic-ports")?))) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("blokir: {e}");
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            };
            // The doctor's checks, but for the native trial: a start that
            // would fail half-way fails here, with the doctor's words.
            let findings = doctor::examine(&doctor::Target {
                ifaces: &ifaces,
                mode,
                state_dir: &state_dir,
                pin_dir: &pin_dir,
                metrics: &metrics_addr,
                native_trial: false,
                daemon_running: false,
            });
            for f in findings.iter().filter(|f| f.level == doctor::Level::Warn) {
                tracing::warn!("{}", f.to_string().replace("\n      -> ", "; "));
            }
            if let Some(why) = doctor::refusal(&findings) {
                eprintln!("blokir: cannot start (`blokir doctor` checks the same):\n{why}");
                return Ok(ExitCode::from(doctor::EXIT_PREFLIGHT));
            }
            let on_exit = match (detach_on_exit, cleanup) {
                (_, true) => OnExit::Cleanup,
                (true, _) => OnExit::Detach,
                _ => OnExit::Keep,
            };
            let metrics = Endpoint { listen: metrics_addr, tls: metrics_tls_cert.zip(metrics_tls_key), basic_auth_file: metrics_basic_auth_file };
            let events = event_log.then_some(EventLog { sample: event_log_sample, rate: event_log_rate });
            let opts = Options {
                ifaces,
                mode,
                rule_files: rules,
                state_dir,
                socket: cli.socket,
                metrics,
                capacity: rule_capacity,
                top_rules,
                dns: dns.policy(),
                events,
                pin_dir,
                on_exit,
                traffic: TrafficPolicy { http_ports, tls_ports, quic, quic_ports, quic_overload: quic_on_overload, fragments, tamper: on_tamper },
                fetch_timeouts: Timeouts { connect: fetch_connect_timeout, idle: fetch_idle_timeout },
                max_shrink,
            };
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let result = runtime.block_on(daemon::run(opts));
            // A list download still in flight (a blocking task) must not
            // hold up the exit: it is abandoned, the rules in force stay.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor { run, no_trial, output } => {
            let findings = doctor::examine(&doctor::Target {
                ifaces: &run.ifaces,
                mode: run.mode,
                state_dir: &run.state_dir,
                pin_dir: &run.pin_dir,
                metrics: &run.metrics_addr,
                native_trial: !no_trial,
                daemon_running: true,
            });
            let worst = doctor::worst(&findings);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "result": worst, "checks": findings }))?),
                Output::Table => {
                    for f in &findings {
                        println!("{f}");
                    }
                    println!(
                        "{}",
                        match worst {
                            doctor::Level::Ok => "blokir can run here with these settings.",
                            doctor::Level::Warn => "blokir can run here with these settings; read the warnings.",
                            doctor::Level::Fail => "blokir cannot run here with these settings: fix the FAIL lines.",
                        }
                    );
                }
            }
            Ok(match worst {
                doctor::Level::Fail => ExitCode::from(doctor::EXIT_PREFLIGHT),
                _ => ExitCode::SUCCESS,
            })
        }
        Command::Rules { command, output } => {
            let with_action = |allow: bool, p: Vec<String>| p.into_iter().map(|p| if allow { format!("allow {p}") } else { p }).collect();
            let request = match command {
                RulesCommand::Add { allow, patterns } => Request::Add { rules: with_action(allow, patterns) },
                RulesCommand::Del { allow, patterns } => Request::Del { rules: with_action(allow, patterns) },
                RulesCommand::List => Request::List,
                RulesCommand::Check { names } => Request::Check { names },
                RulesCommand::Reload { force } => Request::Reload { force },
            };
            let response = control::call(&cli.socket, &request)?;
            Ok(print(&request, &response, output))
        }
        Command::Cleanup { pin_dir } => {
            let pins = PinDir::at(&pin_dir);
            if !pins.root().exists() {
                println!("nothing pinned in {}", pins.describe());
                return Ok(ExitCode::SUCCESS);
            }
            let _lock = pins.lock()?;
            let ifaces = pins.remove_all()?;
            if ifaces.is_empty() {
                println!("removed {} (no interface was attached)", pins.describe());
            } else {
                println!("detached from {}; removed {}", ifaces.join(", "), pins.describe());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Lists { command, output } => {
            let request = match command {
                ListsCommand::Add { name, source, format, action, tcp_action, ech_outer, refresh, sha256, skip_bad_lines, max_shrink } => {
                    // The daemon reads files from its own directory: send an absolute path.
                    let source = if lists::fetch::is_url(&source) || source.contains("://") {
                        source
                    } else {
                        std::path::absolute(&source).with_context(|| format!("--source {source:?}"))?.display().to_string()
                    };
                    let settings = ListSettings { action, tcp_action, ech_outer: ech_outer.then_some(true) };
                    let def = ListDef { name, source, format, settings, refresh_secs: refresh, sha256, skip_bad_lines, max_shrink };
                    if let Err(e) = def.validate() {
                        eprintln!("blokir: {e}");
                        return Ok(ExitCode::from(EXIT_USAGE));
                    }
                    Request::ListsAdd { def }
                }
                ListsCommand::Ls => Request::ListsLs,
                ListsCommand::Set { name, action, tcp_action, ech_outer, clear } => {
                    let change = ListSettings { action, tcp_action, ech_outer };
                    if let Some(s) = clear.iter().find(|s| change.gives(**s)) {
                        eprintln!("blokir: --{0} and --clear {0} contradict each other", s.name());
                        return Ok(ExitCode::from(EXIT_USAGE));
                    }
                    Request::ListsSet { name, change, clear }
                }
                ListsCommand::Rm { name } => Request::ListsRm { name },
                ListsCommand::Update { name, force } => Request::ListsUpdate { name, force },
                ListsCommand::Rollback { name, to } => Request::ListsRollback { name, to },
            };
            let response = control::call(&cli.socket, &request)?;
            Ok(print(&request, &response, output))
        }
        Command::Status { output, pin_dir } => match control::call(&cli.socket, &Request::Status) {
            Ok(response) => Ok(print(&Request::Status, &response, output)),
            Err(e) => {
                // No daemon: say what the pinned links still run.
                let pins = PinDir::at(&pin_dir);
                let links = if pins.root().exists() { pins.describe_links() } else { Vec::new() };
                eprintln!("blokir: {e:#}");
                if output == Output::Json {
                    let v = serde_json::json!({"daemon": false, "pin_dir": pins.describe(), "attached": links});
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                } else if links.is_empty() {
                    println!("no daemon, and nothing pinned in {}: nothing is filtered", pins.describe());
                } else {
                    println!("no daemon; the pinned program keeps filtering with the rules it had (`blokir run` takes over, `blokir cleanup` detaches):");
                    for l in &links {
                        println!(
                            "  {} ({}): {}",
                            l["iface"].as_str().unwrap_or_default(),
                            l["mode"].as_str().unwrap_or_default(),
                            if l["attached"] == true {
                                format!("program {}, link {}", l["program_id"], l["link_id"])
                            } else {
                                "link no longer attached".to_string()
                            }
                        );
                    }
                }
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Manpages { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let cmd = Cli::command();
            clap_mangen::generate_to(cmd, &dir).with_context(|| format!("writing the manual pages into {}", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            // Into memory first: clap_complete panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "blokir", &mut script);
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing the script"),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Replay { capture, rules, rule_capacity, dns, quic, output } => {
            let opts = replay::Options { capture, rule_files: rules, capacity: rule_capacity, dns: dns.policy(), quic };
            replay_capture(&opts, output)
        }
    }
}

fn replay_capture(opts: &replay::Options, output: Output) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let mut failed = None;
    let mut write = |line: String| {
        if failed.is_none()
            && let Err(e) = writeln!(out, "{line}")
        {
            failed = Some(e);
        }
    };
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    // The header comes with the first packet: a refused replay prints nothing.
    let mut header = output == Output::Table;
    let summary = replay::run(opts, |r| {
        if std::mem::take(&mut header) {
            write(format!("{:>7}  {:7}  {:7}  {:40}  RULE (LIST)", "PACKET", "VERDICT", "PROTO", "NAME"));
        }
        write(match output {
            Output::Json => serde_json::to_string(r).unwrap_or_default(),
            Output::Table => {
                let rule = r.rule.as_ref().map(|rule| format!("{rule} ({})", or_dash(&r.list))).unwrap_or_else(|| "-".into());
                let note = r.note.as_ref().map(|n| format!("  [{n}]")).unwrap_or_default();
                format!("{:>7}  {:7}  {:7}  {:40}  {rule}{note}", r.index, r.verdict, r.proto.unwrap_or("-"), or_dash(&r.name))
            }
        })
    })?;
    match output {
        Output::Json => write(serde_json::to_string(&serde_json::json!({ "summary": summary })).unwrap_or_default()),
        Output::Table => write(format!(
            "{} packets: {} passed, {} dropped, {} answered (tx), {} passed on as a RST to the server (rst), {} aborted, {} skipped; {} truncated by the capture",
            summary.packets, summary.pass, summary.drop, summary.tx, summary.rst, summary.aborted, summary.skipped, summary.truncated
        )),
    }
    if let Some(e) = failed.filter(|e| e.kind() != std::io::ErrorKind::BrokenPipe) {
        return Err(e).context("writing the output");
    }
    if summary.disagreements > 0 {
        eprintln!("blokir: the kernel and the host model disagreed on {} packets (marked): please report this capture", summary.disagreements);
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// "5m ago" for a Unix time.
fn ago(t: u64) -> String {
    match now_secs().saturating_sub(t) {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}

fn print(request: &Request, r: &Response, output: Output) -> ExitCode {
    if !r.ok {
        eprintln!("blokir: {}", r.message);
        return ExitCode::from(EXIT_REFUSED);
    }
    if output == Output::Json {
        let v = if r.data.is_null() { serde_json::json!({ "message": r.message }) } else { r.data.clone() };
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let s = |v: &serde_json::Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    match request {
        Request::List => {
            let rows = r.data.as_array().cloned().unwrap_or_default();
            let w = rows.iter().map(|x| s(&x["list"]).len()).max().unwrap_or(4).max(4);
            let rw = rows.iter().map(|x| s(&x["rule"]).len()).max().unwrap_or(4).max(4);
            println!("{:w$}  {:rw$}  HITS", "LIST", "RULE");
            for x in rows {
                println!("{:w$}  {:rw$}  {}", s(&x["list"]), s(&x["rule"]), x["hits"]);
            }
        }
        Request::Check { .. } => {
            for x in r.data.as_array().cloned().unwrap_or_default() {
                match x["rule"].as_str() {
                    Some(rule) => println!("{}: {} by `{rule}` (list {})", s(&x["name"]), s(&x["verdict"]), s(&x["list"])),
                    None => println!("{}: {} (no rule)", s(&x["name"]), s(&x["verdict"])),
                }
            }
        }
        Request::ListsLs => {
            let when = |v: &serde_json::Value| v.as_u64().map_or("never".to_string(), ago);
            let header = ["LIST", "VERSION", "RULES", "FORMAT", "DNS", "TCP", "ECH", "REFRESH", "CHECKED", "SOURCE"].map(String::from);
            let mut rows = vec![(header, None)];
            for x in r.data.as_array().cloned().unwrap_or_default() {
                let format = match (s(&x["format"]), x["read_as"].as_str()) {
                    (f, Some(r)) if f == "auto" => r.to_string(),
                    (f, _) => f,
                };
                let row = [
                    s(&x["name"]),
                    x["version"].to_string(),
                    x["rules"].to_string(),
                    format,
                    s(&x["dns_action"]),
                    s(&x["tcp_action"]),
                    if x["ech_outer"] == true { "yes" } else { "no" }.to_string(),
                    x["refresh_secs"].as_u64().map_or("-".into(), |s| format!("{s}s")),
                    when(&x["last_check"]),
                    s(&x["source"]),
                ];
                rows.push((row, x["last_error"].as_str().map(str::to_string)));
            }
            // Each column as wide as its widest cell; numbers to the right.
            let mut widths = [0usize; 10];
            for (row, _) in &rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            for (row, error) in rows {
                let cells: Vec<String> = row
                    .iter()
                    .zip(widths)
                    .enumerate()
                    .map(|(i, (cell, w))| match i {
                        9 => cell.clone(),
                        1 | 2 | 7 => format!("{cell:>w$}"),
                        _ => format!("{cell:<w$}"),
                    })
                    .collect();
                println!("{}", cells.join("  "));
                if let Some(e) = error {
                    println!("{:w$}  last check failed: {e}", "", w = widths[0]);
                }
            }
        }
        Request::Status => {
            let d = &r.data;
            println!("blokir {}", s(&d["version"]));
            for a in d["attached"].as_array().cloned().unwrap_or_default() {
                println!("attached: {} ({})", s(&a["iface"]), s(&a["mode"]));
            }
            println!(
                "program id {} loaded {} s ago; pins in {}; on exit: {}",
                d["attached"][0]["program_id"],
                d["program_loaded_at"].as_u64().map(|t| now_secs().saturating_sub(t)).map_or("?".into(), |s| s.to_string()),
                s(&d["pin_dir"]),
                s(&d["on_exit"])
            );
            println!("{}", s(&d["pins"]));
            let adopted: Vec<String> = d["adopted_maps"].as_array().cloned().unwrap_or_default().iter().map(s).collect();
            println!("state adopted from the previous program: {}", if adopted.is_empty() { "none (fresh)".to_string() } else { adopted.join(", ") });
            println!("{:16}  {:8}  {:8}  {:7}  {:6}  {:7}  TOOK OVER FROM", "IFACE", "ATTACHED", "MODE", "PROGRAM", "LINK", "PINNED");
            for a in d["attached"].as_array().cloned().unwrap_or_default() {
                let yes = |v: &serde_json::Value| if v.as_bool() == Some(true) { "yes" } else { "no" };
                let from = if a["adopted"].as_bool() == Some(true) { format!("program {}", a["previous_program_id"]) } else { "- (new link)".to_string() };
                println!(
                    "{:16}  {:8}  {:8}  {:7}  {:6}  {:7}  {from}",
                    s(&a["iface"]),
                    yes(&a["attached"]),
                    s(&a["mode"]),
                    s(&a["program_id"]),
                    s(&a["link_id"]),
                    yes(&a["link_pinned"])
                );
            }
            println!("rules: {} in {} name nodes (capacity {})", d["rules"], d["nodes"], d["capacity"]);
            for l in d["lists"].as_array().cloned().unwrap_or_default() {
                let source = l["source"].as_str().map(|p| format!(" from {p}")).unwrap_or_default();
                println!("list {}: {} rules{source}, blocked DNS queries: {}", s(&l["name"]), l["rules"], s(&l["dns_action"]));
            }
        }
        _ => println!("{}", r.message),
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example settings and unit shipped in packaging/ are valid.
    #[test]
    fn the_shipped_config_file_is_valid_and_means_what_it_says() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/blokir.toml");
        let args = ["blokir", "run", "--config", path, "--answer-ttl", "30"].map(std::ffi::OsString::from).to_vec();
        let cli = Cli::try_parse_from(config::expand(args, &Cli::command()).unwrap()).unwrap();
        let Command::Run(RunArgs { ifaces, rules, dns, metrics_addr, pin_dir, detach_on_exit, cleanup, max_shrink, .. }) = cli.command else {
            panic!("not run")
        };
        assert_eq!(ifaces, ["eth1"]);
        assert_eq!(rules, [PathBuf::from("/etc/blokir/national.rules")]);
        let policy = dns.policy();
        assert_eq!((policy.default, policy.answer_ttl), (DnsAction::Nxdomain, 30));
        assert_eq!(metrics_addr.to_string(), "127.0.0.1:9947");
        assert_eq!(pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert!(!detach_on_exit && !cleanup);
        assert_eq!(max_shrink, MaxShrink::DEFAULT);
    }

    #[test]
    fn list_settings_flags() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["blokir", "lists"], args].concat()).map(|c| c.command);
        let Ok(Command::Lists { command: ListsCommand::Add { tcp_action, ech_outer, action, .. }, .. }) =
            parse(&["add", "a", "--source", "/x", "--tcp-action", "reset", "--ech-outer"])
        else {
            panic!("not lists add")
        };
        assert_eq!((tcp_action, ech_outer, action), (Some(TcpAction::Reset), true, None));
        let Ok(Command::Lists { command: ListsCommand::Add { tcp_action, ech_outer, .. }, .. }) = parse(&["add", "a", "--source", "/x"]) else {
            panic!("not lists add")
        };
        assert_eq!((tcp_action, ech_outer), (None, false));
        let Ok(Command::Lists { command: ListsCommand::Set { name, action, tcp_action, ech_outer, clear }, .. }) =
            parse(&["set", "a", "--ech-outer", "false", "--action", "nxdomain", "--clear", "tcp-action"])
        else {
            panic!("not lists set")
        };
        assert_eq!((name.as_str(), action, tcp_action, ech_outer), ("a", Some(DnsAction::Nxdomain), None, Some(false)));
        assert_eq!(clear, [Setting::TcpAction]);
        let Ok(Command::Lists { command: ListsCommand::Set { clear, .. }, .. }) = parse(&["set", "a", "--clear", "action", "--clear", "ech-outer"]) else {
            panic!("not lists set")
        };
        assert_eq!(clear, [Setting::Action, Setting::EchOuter]);
        assert!(parse(&["set", "a"]).is_err(), "nothing to set");
        assert!(parse(&["set", "a", "--ech-outer"]).is_err(), "--ech-outer takes true or false");
    }

    #[test]
    fn tcp_action_flags() {
        let parse = |extra: &[&str]| Cli::try_parse_from([&["blokir", "run", "--iface", "eth1"], extra].concat());
        let Command::Run(RunArgs { dns, .. }) = parse(&["--tcp-action", "reset", "--list-tcp-action", "local=drop"]).unwrap().command else {
            panic!("not run")
        };
        let p = dns.policy();
        assert_eq!((p.tcp_default, p.tcp_per_list), (TcpAction::Reset, vec![("local".to_string(), TcpAction::Drop)]));
        let Command::Run(RunArgs { dns, .. }) = parse(&[]).unwrap().command else { panic!("not run") };
        assert_eq!(dns.policy().tcp_default, TcpAction::Drop);
        let Err(e) = parse(&["--tcp-action", "rst"]) else { panic!("accepted --tcp-action rst") };
        assert!(e.to_string().contains("unknown TCP action \"rst\""), "{e}");
    }
}
