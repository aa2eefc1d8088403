//! The `blokir` command: `run` is the daemon, `rules` and `status` talk to it.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context as _;
use blokir::{
    control::{self, DEFAULT_SOCKET, Request, Response},
    daemon::{self, Options},
    ebpf::Mode,
    policy::{DnsPolicy, QuicPolicy, TrafficPolicy, parse_action, parse_list_action, parse_port},
};
use clap::{Parser, Subcommand, ValueEnum};
use filter_common::{reply::DnsAction, rules::DEFAULT_RULE_CAPACITY};

/// Exit codes: 0 done, 1 error (e.g. no daemon), 2 bad command line (clap),
/// 3 the daemon refused the request.
const EXIT_REFUSED: u8 = 3;

#[derive(Parser)]
#[command(name = "blokir", version, about = "Block listed domains in XDP: DNS queries, at line rate")]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET, env = "BLOKIR_SOCKET")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program and the rules, attach, and serve until stopped.
    Run {
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
        /// Address of the Prometheus endpoint.
        #[arg(long, default_value = "127.0.0.1:9947")]
        metrics_addr: SocketAddr,
        /// Name nodes and rule ids the kernel maps hold.
        #[arg(long, default_value_t = DEFAULT_RULE_CAPACITY)]
        rule_capacity: u32,
        /// Rules exported with their own hit counter on /metrics.
        #[arg(long, default_value_t = 100)]
        top_rules: usize,
        /// What blocked UDP queries get: drop, nxdomain, refused, nodata, or
        /// redirect (to --redirect-ipv4/--redirect-ipv6). TCP/53 queries are
        /// always dropped.
        #[arg(long, value_parser = parse_action, default_value = "drop")]
        dns_action: DnsAction,
        /// The action for one list, overriding --dns-action (repeatable).
        #[arg(long = "list-dns-action", value_name = "LIST=ACTION", value_parser = parse_list_action)]
        list_dns_actions: Vec<(String, DnsAction)>,
        /// The block page's IPv4 address, answered to A queries by `redirect`.
        #[arg(long)]
        redirect_ipv4: Option<Ipv4Addr>,
        /// The block page's IPv6 address, answered to AAAA queries by `redirect`.
        #[arg(long)]
        redirect_ipv6: Option<Ipv6Addr>,
        /// TTL of redirect answers, in seconds.
        #[arg(long, default_value_t = 60)]
        answer_ttl: u32,
        /// TCP ports whose payload is read as HTTP requests (their Host
        /// blocked like a server name): comma-separated or repeated, at most
        /// 16. Other ports' payload is read as TLS.
        #[arg(long = "http-ports", value_name = "PORT[,PORT...]", value_parser = parse_port, value_delimiter = ',', default_value = "80")]
        http_ports: Vec<u16>,
        /// What QUIC Initials (UDP/443) get: pass (counted), or drop (browsers
        /// fall back to TCP, where the TLS server name is read).
        #[arg(long, value_enum, default_value_t = QuicPolicy::Pass)]
        quic: QuicPolicy,
    },
    /// Change or inspect the rules of the running daemon.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
        #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// What is attached where, and which lists are loaded.
    Status {
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
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
    Reload,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("blokir: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            ifaces,
            mode,
            rules,
            state_dir,
            metrics_addr,
            rule_capacity,
            top_rules,
            dns_action,
            list_dns_actions,
            redirect_ipv4,
            redirect_ipv6,
            answer_ttl,
            http_ports,
            quic,
        } => {
            let dns = DnsPolicy { default: dns_action, per_list: list_dns_actions, answer_ttl, redirect_v4: redirect_ipv4, redirect_v6: redirect_ipv6 };
            let opts = Options {
                ifaces,
                mode,
                rule_files: rules,
                state_dir,
                socket: cli.socket,
                metrics_addr,
                capacity: rule_capacity,
                top_rules,
                dns,
                traffic: TrafficPolicy { http_ports, quic },
            };
            tokio::runtime::Runtime::new().context("starting the runtime")?.block_on(daemon::run(opts))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rules { command, output } => {
            let with_action = |allow: bool, p: Vec<String>| p.into_iter().map(|p| if allow { format!("allow {p}") } else { p }).collect();
            let request = match command {
                RulesCommand::Add { allow, patterns } => Request::Add { rules: with_action(allow, patterns) },
                RulesCommand::Del { allow, patterns } => Request::Del { rules: with_action(allow, patterns) },
                RulesCommand::List => Request::List,
                RulesCommand::Check { names } => Request::Check { names },
                RulesCommand::Reload => Request::Reload,
            };
            let response = control::call(&cli.socket, &request)?;
            Ok(print(&request, &response, output))
        }
        Command::Status { output } => {
            let response = control::call(&cli.socket, &Request::Status)?;
            Ok(print(&Request::Status, &response, output))
        }
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
        Request::Status => {
            let d = &r.data;
            println!("blokir {}", s(&d["version"]));
            for a in d["attached"].as_array().cloned().unwrap_or_default() {
                println!("attached: {} ({})", s(&a["iface"]), s(&a["mode"]));
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
