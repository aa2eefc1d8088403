//! What happens to a blocked DNS query: dropped, or answered in XDP with
//! NXDOMAIN, REFUSED, NODATA or the block page's address; what a TCP flow
//! blocked by name gets (dropped or reset); and which lists are ECH-outer
//! lists. Per list, with a default for all lists; a named list's own
//! settings (`blokir lists add|set`) win over `run`'s flags.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::bail;
use filter_common::{
    reply::DnsAction,
    reset::TcpAction,
    rules::{Config, MAX_HTTP_PORTS, MAX_QUIC_PORTS, MAX_TLS_PORTS},
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsPolicy {
    /// For lists without their own action.
    pub default: DnsAction,
    pub per_list: Vec<(String, DnsAction)>,
    /// ECH-outer lists (`--ech-outer-list`): their rules block only
    /// ClientHellos that carry the encrypted_client_hello extension.
    pub ech_outer: Vec<String>,
    /// TTL of redirect answers, seconds.
    pub answer_ttl: u32,
    pub redirect_v4: Option<Ipv4Addr>,
    pub redirect_v6: Option<Ipv6Addr>,
    /// What TCP flows blocked by name (TLS, HTTP) get, for lists without
    /// their own.
    pub tcp_default: TcpAction,
    pub tcp_per_list: Vec<(String, TcpAction)>,
}

impl Default for DnsPolicy {
    fn default() -> Self {
        DnsPolicy {
            default: DnsAction::Drop,
            per_list: Vec::new(),
            ech_outer: Vec::new(),
            answer_ttl: 60,
            redirect_v4: None,
            redirect_v6: None,
            tcp_default: TcpAction::Drop,
            tcp_per_list: Vec::new(),
        }
    }
}

/// A list's own settings (a named list's, from `blokir lists add|set`);
/// each one given wins over `run`'s flags. Stored in `lists.json` under
/// these keys (absent: not given).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListSettings {
    /// What blocked UDP queries get.
    #[serde(default, with = "by_name")]
    pub action: Option<DnsAction>,
    /// What TCP flows blocked by name get.
    #[serde(default, with = "by_name")]
    pub tcp_action: Option<TcpAction>,
    /// Whether the list is an ECH-outer list.
    #[serde(default)]
    pub ech_outer: Option<bool>,
}

impl ListSettings {
    /// These settings with those given in `change` replaced.
    pub fn with(self, change: ListSettings) -> ListSettings {
        ListSettings {
            action: change.action.or(self.action),
            tcp_action: change.tcp_action.or(self.tcp_action),
            ech_outer: change.ech_outer.or(self.ech_outer),
        }
    }
}

/// One of a list's own settings, by name (`blokir lists set --clear`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Setting {
    Action,
    TcpAction,
    EchOuter,
}

impl Setting {
    /// As on the command line (`--clear tcp-action`, `--tcp-action`).
    pub fn name(self) -> &'static str {
        match self {
            Setting::Action => "action",
            Setting::TcpAction => "tcp-action",
            Setting::EchOuter => "ech-outer",
        }
    }
}

impl ListSettings {
    /// These settings without those named in `clear` (`run`'s flags decide
    /// them again).
    pub fn without(mut self, clear: &[Setting]) -> ListSettings {
        for c in clear {
            match c {
                Setting::Action => self.action = None,
                Setting::TcpAction => self.tcp_action = None,
                Setting::EchOuter => self.ech_outer = None,
            }
        }
        self
    }

    /// Whether this change gives setting `s`.
    pub fn gives(&self, s: Setting) -> bool {
        match s {
            Setting::Action => self.action.is_some(),
            Setting::TcpAction => self.tcp_action.is_some(),
            Setting::EchOuter => self.ech_outer.is_some(),
        }
    }
}

/// What a list's blocks get, resolved (`DnsPolicy::resolve`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListPolicy {
    pub dns: DnsAction,
    pub tcp: TcpAction,
    pub ech_outer: bool,
}

impl DnsPolicy {
    /// The one place where a list's policy is decided: the list's own
    /// setting (`own`) wins; otherwise `run`'s per-list flag for `list` by
    /// name (the last one given); otherwise `run`'s default.
    pub fn resolve(&self, list: &str, own: ListSettings) -> ListPolicy {
        ListPolicy {
            dns: own.action.unwrap_or_else(|| self.per_list.iter().rev().find(|(l, _)| l == list).map_or(self.default, |(_, a)| *a)),
            tcp: own.tcp_action.unwrap_or_else(|| self.tcp_per_list.iter().rev().find(|(l, _)| l == list).map_or(self.tcp_default, |(_, a)| *a)),
            ech_outer: own.ech_outer.unwrap_or_else(|| self.ech_outer.iter().any(|l| l == list)),
        }
    }

    /// Every per-list action and ECH-outer list names a known list, and `redirect` has an
    /// address to redirect to.
    pub fn validate(&self, lists: &[&str]) -> anyhow::Result<()> {
        for (l, _) in &self.per_list {
            if !lists.contains(&l.as_str()) {
                bail!("--list-dns-action names list {l:?}, but the lists are: {}", lists.join(", "));
            }
        }
        for l in &self.ech_outer {
            if !lists.contains(&l.as_str()) {
                bail!("--ech-outer-list names list {l:?}, but the lists are: {}", lists.join(", "));
            }
        }
        for (l, _) in &self.tcp_per_list {
            if !lists.contains(&l.as_str()) {
                bail!("--list-tcp-action names list {l:?}, but the lists are: {}", lists.join(", "));
            }
        }
        let redirects = self.default == DnsAction::Redirect || self.per_list.iter().any(|(_, a)| *a == DnsAction::Redirect);
        if redirects && self.redirect_v4.is_none() && self.redirect_v6.is_none() {
            bail!("the redirect action needs --redirect-ipv4 and/or --redirect-ipv6 (the block page's addresses)");
        }
        Ok(())
    }

    /// Writes the answer settings into the program's settings.
    pub fn apply_to(&self, cfg: &mut Config) {
        cfg.answer_ttl = self.answer_ttl;
        cfg.redirect_flags = 0;
        if let Some(a) = self.redirect_v4 {
            cfg.redirect_v4 = a.octets();
            cfg.redirect_flags |= Config::REDIRECT_V4;
        }
        if let Some(a) = self.redirect_v6 {
            cfg.redirect_v6 = a.octets();
            cfg.redirect_flags |= Config::REDIRECT_V6;
        }
    }
}

/// `drop`, `nxdomain`, `refused`, `nodata` or `redirect`.
pub fn parse_action(s: &str) -> Result<DnsAction, String> {
    DnsAction::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| {
        let names: Vec<&str> = DnsAction::ALL.iter().map(|a| a.name()).collect();
        format!("unknown DNS action {s:?} (expected one of: {})", names.join(", "))
    })
}

/// `LIST=ACTION`.
pub fn parse_list_action(s: &str) -> Result<(String, DnsAction), String> {
    let (list, action) = s.split_once('=').ok_or_else(|| format!("expected LIST=ACTION, got {s:?}"))?;
    if list.is_empty() {
        return Err(format!("expected LIST=ACTION, got {s:?}"));
    }
    Ok((list.to_string(), parse_action(action)?))
}

/// `drop` or `reset`.
pub fn parse_tcp_action(s: &str) -> Result<TcpAction, String> {
    TcpAction::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| {
        let names: Vec<&str> = TcpAction::ALL.iter().map(|a| a.name()).collect();
        format!("unknown TCP action {s:?} (expected one of: {})", names.join(", "))
    })
}

/// `LIST=ACTION`, for the TCP action.
pub fn parse_list_tcp_action(s: &str) -> Result<(String, TcpAction), String> {
    let (list, action) = s.split_once('=').ok_or_else(|| format!("expected LIST=ACTION, got {s:?}"))?;
    if list.is_empty() {
        return Err(format!("expected LIST=ACTION, got {s:?}"));
    }
    Ok((list.to_string(), parse_tcp_action(action)?))
}

/// An action written by its command-line name (in `lists.json`).
pub trait ByName: Sized + Copy {
    fn name(self) -> &'static str;
    fn parse(s: &str) -> Result<Self, String>;
}

impl ByName for DnsAction {
    fn name(self) -> &'static str {
        DnsAction::name(self)
    }
    fn parse(s: &str) -> Result<Self, String> {
        parse_action(s)
    }
}

impl ByName for TcpAction {
    fn name(self) -> &'static str {
        TcpAction::name(self)
    }
    fn parse(s: &str) -> Result<Self, String> {
        parse_tcp_action(s)
    }
}

/// `Option<T>` as its name (or null), for serde.
mod by_name {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer, T: super::ByName>(a: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.serialize_some(a.name()),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>, T: super::ByName>(d: D) -> Result<Option<T>, D::Error> {
        Option::<String>::deserialize(d)?.map(|a| T::parse(&a).map_err(serde::de::Error::custom)).transpose()
    }
}

/// What QUIC Initials get: counted and passed, dropped (browsers then fall
/// back to TCP, where the TLS server name is read), or read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuicPolicy {
    Pass,
    Drop,
    /// Passed, and read by the daemon: a flow whose server name the rules
    /// block has its later datagrams dropped (see `quic`).
    #[default]
    Read,
}

/// What an Initial the daemon cannot be handed gets under `--quic read`:
/// over the per-CPU budget or the per-flow cap, or the daemon's buffer
/// full or gone. Passed unread (the default), or dropped (the client
/// retries, or falls back to TCP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuicOverload {
    #[default]
    Pass,
    Drop,
}

/// What first IP fragments of datagrams blokir reads (UDP or TCP to port
/// 53, TCP to an HTTP or TLS port, or a first fragment too short to say)
/// get: dropped, so the datagram never reaches the application, or passed
/// unread. Counted either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FragmentPolicy {
    #[default]
    Drop,
    Pass,
}

/// What a TCP flow being read (a ClientHello or HTTP request head) gets
/// when it carries urgent bytes or a fake segment (one the receiver
/// discards: no ACK, an MD5 or TCP-AO option): blocked, or counted and read
/// as the receiver reads it. See README "Evasions".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TamperPolicy {
    #[default]
    Block,
    Pass,
}

/// Which traffic besides DNS is read: the TCP ports whose payload is read as
/// HTTP requests, the TCP ports whose payload is read for TLS ClientHellos
/// (payload to other ports passes unread), the QUIC policy, ports and
/// overload policy, and the fragment policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficPolicy {
    pub http_ports: Vec<u16>,
    pub tls_ports: PortSet,
    pub quic: QuicPolicy,
    pub quic_ports: PortSet,
    pub quic_overload: QuicOverload,
    pub fragments: FragmentPolicy,
    pub tamper: TamperPolicy,
}

impl Default for TrafficPolicy {
    fn default() -> Self {
        TrafficPolicy {
            http_ports: vec![filter_common::http::HTTP_PORT],
            tls_ports: PortSet::All,
            quic: QuicPolicy::Read,
            quic_ports: PortSet::All,
            quic_overload: QuicOverload::Pass,
            fragments: FragmentPolicy::Drop,
            tamper: TamperPolicy::Block,
        }
    }
}

impl TrafficPolicy {
    /// Writes the settings into the program's settings; refuses more than
    /// `MAX_HTTP_PORTS` distinct HTTP ports or `MAX_TLS_PORTS` TLS or QUIC
    /// ports.
    pub fn apply_to(&self, cfg: &mut Config) -> anyhow::Result<()> {
        let mut ports = self.http_ports.clone();
        ports.sort_unstable();
        ports.dedup();
        if ports.len() > MAX_HTTP_PORTS {
            bail!("--http-ports names {} ports; at most {MAX_HTTP_PORTS} are supported", ports.len());
        }
        let tls = self.tls_ports.checked().map_err(|e| anyhow::anyhow!("--tls-ports: {e}"))?;
        let quic = self.quic_ports.checked().map_err(|e| anyhow::anyhow!("--quic-ports: {e}"))?;
        cfg.http_ports = [0; MAX_HTTP_PORTS];
        cfg.http_ports[..ports.len()].copy_from_slice(&ports);
        cfg.tls_ports = [0; MAX_TLS_PORTS];
        cfg.tls_all_ports = u32::from(tls.is_none());
        if let Some(tls) = tls {
            cfg.tls_ports[..tls.len()].copy_from_slice(&tls);
        }
        cfg.quic_policy = match self.quic {
            QuicPolicy::Pass => filter_common::quic::POLICY_PASS,
            QuicPolicy::Drop => filter_common::quic::POLICY_DROP,
            QuicPolicy::Read => filter_common::quic::POLICY_READ,
        };
        cfg.quic_ports = [0; MAX_QUIC_PORTS];
        cfg.quic_all_ports = u32::from(quic.is_none());
        if let Some(quic) = quic {
            cfg.quic_ports[..quic.len()].copy_from_slice(&quic);
        }
        cfg.quic_overload = match self.quic_overload {
            QuicOverload::Pass => filter_common::quic::OVERLOAD_PASS,
            QuicOverload::Drop => filter_common::quic::OVERLOAD_DROP,
        };
        cfg.fragment_policy = match self.fragments {
            FragmentPolicy::Drop => filter_common::inspect::FRAGMENTS_DROP,
            FragmentPolicy::Pass => filter_common::inspect::FRAGMENTS_PASS,
        };
        cfg.tamper_policy = match self.tamper {
            TamperPolicy::Block => filter_common::flow::TAMPER_BLOCK,
            TamperPolicy::Pass => filter_common::flow::TAMPER_PASS,
        };
        Ok(())
    }
}

/// The TCP ports whose payload is read for TLS ClientHellos
/// (`--tls-ports`), or the UDP ports read for QUIC Initials
/// (`--quic-ports`; 53 never is).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PortSet {
    /// Every port (a ClientHello or an Initial is recognized by its
    /// content).
    #[default]
    All,
    /// These ports only (for TLS, HTTP ports are read too: a ClientHello
    /// there goes on to the TLS stage).
    Only(Vec<u16>),
}

/// One value of `--tls-ports` or `--quic-ports`: `all`, or a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortArg {
    All,
    Port(u16),
}

impl PortSet {
    /// The setting from `--tls-ports` or `--quic-ports` values
    /// (comma-separated or repeated): `all` alone, or at most
    /// `MAX_TLS_PORTS` distinct ports.
    pub fn from_args(args: &[PortArg]) -> Result<PortSet, String> {
        let ports: Vec<u16> = args.iter().filter_map(|a| if let PortArg::Port(p) = a { Some(*p) } else { None }).collect();
        match (args.contains(&PortArg::All), ports.is_empty()) {
            (true, true) => Ok(PortSet::All),
            (true, false) => Err(format!("`all` cannot be combined with ports ({}): give either `all` or a list of ports", join(&ports))),
            (false, _) => Self::only(ports).map(PortSet::Only),
        }
    }

    /// `None` for all ports, else the ports checked as `only` does.
    fn checked(&self) -> Result<Option<Vec<u16>>, String> {
        match self {
            PortSet::All => Ok(None),
            PortSet::Only(ports) => Self::only(ports.clone()).map(Some),
        }
    }

    /// `ports` sorted and deduplicated; refuses none, port 0 and more than
    /// `MAX_TLS_PORTS`.
    fn only(mut ports: Vec<u16>) -> Result<Vec<u16>, String> {
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() {
            return Err("no port given (expected `all` or a list of ports)".into());
        }
        if ports.contains(&0) {
            return Err(PORT_0.into());
        }
        if ports.len() > MAX_TLS_PORTS {
            return Err(format!("{} ports given; at most {MAX_TLS_PORTS} are supported (or `all`)", ports.len()));
        }
        Ok(ports)
    }
}

fn join(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// One value of `--tls-ports` or `--quic-ports`: `all` or a port, 1 to
/// 65535.
pub fn parse_port_arg(s: &str) -> Result<PortArg, String> {
    if s.trim() == "all" {
        return Ok(PortArg::All);
    }
    parse_port(s).map(PortArg::Port).map_err(|e| e.replace("(expected 1 to 65535)", "(expected `all` or 1 to 65535)"))
}

const PORT_0: &str = "port 0 cannot carry traffic (expected 1 to 65535)";

/// A TCP port, 1 to 65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) => Err(PORT_0.into()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{s:?} is not a port number (expected 1 to 65535)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_and_validation() {
        assert_eq!(parse_action("nxdomain"), Ok(DnsAction::Nxdomain));
        assert!(parse_action("NXDOMAIN").unwrap_err().contains("expected one of: drop, nxdomain, refused, nodata, redirect"));
        assert_eq!(parse_list_action("telegram=redirect"), Ok(("telegram".into(), DnsAction::Redirect)));
        assert!(parse_list_action("=drop").is_err() && parse_list_action("telegram").is_err());

        let mut p = DnsPolicy { per_list: vec![("telegram".into(), DnsAction::Redirect)], ..DnsPolicy::default() };
        assert!(p.validate(&["local", "telegram"]).unwrap_err().to_string().contains("--redirect-ipv4"));
        p.redirect_v6 = Some("2001:db8::80".parse().unwrap());
        p.validate(&["local", "telegram"]).unwrap();
        assert!(p.validate(&["local"]).unwrap_err().to_string().contains("names list \"telegram\""));
        let ech = DnsPolicy { ech_outer: vec!["ech".into()], ..DnsPolicy::default() };
        ech.validate(&["local", "ech"]).unwrap();
        assert!(ech.validate(&["local"]).unwrap_err().to_string().contains("--ech-outer-list names list \"ech\""));
        let none = ListSettings::default();
        assert!(ech.resolve("ech", none).ech_outer && !ech.resolve("local", none).ech_outer);
        assert_eq!((p.resolve("telegram", none).dns, p.resolve("local", none).dns), (DnsAction::Redirect, DnsAction::Drop));
        let mut cfg = Config::default();
        p.apply_to(&mut cfg);
        assert_eq!((cfg.redirect_flags, cfg.answer_ttl), (Config::REDIRECT_V6, 60));
    }

    #[test]
    fn tcp_actions() {
        assert_eq!(parse_tcp_action("reset"), Ok(TcpAction::Reset));
        assert!(parse_tcp_action("rst").unwrap_err().contains("unknown TCP action \"rst\" (expected one of: drop, reset)"));
        assert_eq!(parse_list_tcp_action("telegram=reset"), Ok(("telegram".into(), TcpAction::Reset)));
        assert!(parse_list_tcp_action("=reset").is_err() && parse_list_tcp_action("telegram").is_err());
        assert!(parse_list_tcp_action("telegram=nxdomain").unwrap_err().contains("unknown TCP action"));
        let p = DnsPolicy { tcp_default: TcpAction::Reset, tcp_per_list: vec![("local".into(), TcpAction::Drop)], ..DnsPolicy::default() };
        let none = ListSettings::default();
        assert_eq!((p.resolve("local", none).tcp, p.resolve("telegram", none).tcp), (TcpAction::Drop, TcpAction::Reset));
        p.validate(&["local", "telegram"]).unwrap();
        assert!(p.validate(&["telegram"]).unwrap_err().to_string().contains("--list-tcp-action names list \"local\""));
    }

    #[test]
    fn a_lists_own_setting_wins_then_runs_flag_for_the_list_then_runs_default() {
        let run = DnsPolicy {
            default: DnsAction::Nxdomain,
            per_list: vec![("named".into(), DnsAction::Refused), ("named".into(), DnsAction::Nodata)],
            tcp_default: TcpAction::Drop,
            tcp_per_list: vec![("named".into(), TcpAction::Reset)],
            ech_outer: vec!["named".into()],
            ..DnsPolicy::default()
        };
        let none = ListSettings::default();
        // run's default, for a list no flag names.
        assert_eq!(run.resolve("other", none), ListPolicy { dns: DnsAction::Nxdomain, tcp: TcpAction::Drop, ech_outer: false });
        // run's flags by name (the last one given).
        assert_eq!(run.resolve("named", none), ListPolicy { dns: DnsAction::Nodata, tcp: TcpAction::Reset, ech_outer: true });
        // The list's own settings, each on its own.
        let own = ListSettings { tcp_action: Some(TcpAction::Drop), ..none };
        assert_eq!(run.resolve("named", own), ListPolicy { dns: DnsAction::Nodata, tcp: TcpAction::Drop, ech_outer: true });
        let own = ListSettings { action: Some(DnsAction::Drop), tcp_action: Some(TcpAction::Reset), ech_outer: Some(false) };
        assert_eq!(run.resolve("named", own), ListPolicy { dns: DnsAction::Drop, tcp: TcpAction::Reset, ech_outer: false });
        assert_eq!(run.resolve("other", own), ListPolicy { dns: DnsAction::Drop, tcp: TcpAction::Reset, ech_outer: false });
        let own = ListSettings { ech_outer: Some(true), ..none };
        assert!(run.resolve("other", own).ech_outer);

        // A change replaces only what it gives.
        let set = ListSettings { action: Some(DnsAction::Refused), ech_outer: Some(true), ..none };
        let changed = set.with(ListSettings { tcp_action: Some(TcpAction::Reset), ech_outer: Some(false), ..none });
        assert_eq!(changed, ListSettings { action: Some(DnsAction::Refused), tcp_action: Some(TcpAction::Reset), ech_outer: Some(false) });
        // Cleared settings are decided by run's flags again.
        let cleared = changed.without(&[Setting::TcpAction, Setting::EchOuter]);
        assert_eq!(cleared, ListSettings { action: Some(DnsAction::Refused), ..none });
        assert_eq!(run.resolve("named", cleared), ListPolicy { dns: DnsAction::Refused, tcp: TcpAction::Reset, ech_outer: true });
        assert!(changed.gives(Setting::EchOuter) && !cleared.gives(Setting::TcpAction));
        for s in [Setting::Action, Setting::TcpAction, Setting::EchOuter] {
            assert_eq!(<Setting as clap::ValueEnum>::to_possible_value(&s).unwrap().get_name(), s.name());
        }
    }

    #[test]
    fn list_settings_in_json() {
        let s = ListSettings { action: Some(DnsAction::Nxdomain), tcp_action: Some(TcpAction::Reset), ech_outer: Some(true) };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"action":"nxdomain","tcp_action":"reset","ech_outer":true}"#);
        assert_eq!(serde_json::from_str::<ListSettings>(&json).unwrap(), s);
        assert_eq!(serde_json::from_str::<ListSettings>("{}").unwrap(), ListSettings::default());
        let e = serde_json::from_str::<ListSettings>(r#"{"tcp_action":"rst"}"#).unwrap_err().to_string();
        assert!(e.contains("unknown TCP action \"rst\""), "{e}");
    }

    #[test]
    fn http_ports() {
        assert_eq!(parse_port("8080"), Ok(8080));
        assert!(parse_port("0").unwrap_err().contains("port 0"));
        assert!(parse_port("http").unwrap_err().contains("\"http\" is not a port number"));
        assert!(parse_port("65536").is_err());
        let mut cfg = Config::default();
        assert_eq!(cfg.http_ports[..2], [80, 0]);
        assert_eq!(cfg.fragment_policy, filter_common::inspect::FRAGMENTS_DROP);
        TrafficPolicy { http_ports: vec![8080, 80, 8080], quic: QuicPolicy::Drop, fragments: FragmentPolicy::Pass, ..TrafficPolicy::default() }
            .apply_to(&mut cfg)
            .unwrap();
        assert_eq!((cfg.http_ports[..3].to_vec(), cfg.quic_policy), (vec![80, 8080, 0], filter_common::quic::POLICY_DROP));
        assert_eq!(cfg.fragment_policy, filter_common::inspect::FRAGMENTS_PASS);
        let many = TrafficPolicy { http_ports: (1..=17).collect(), ..TrafficPolicy::default() };
        assert!(many.apply_to(&mut cfg).unwrap_err().to_string().contains("at most 16"));
    }

    #[test]
    fn tls_ports() {
        use PortArg::{All, Port};
        assert_eq!(parse_port_arg("all"), Ok(All));
        assert_eq!(parse_port_arg(" 8443"), Ok(Port(8443)));
        assert_eq!(parse_port_arg("0").unwrap_err(), "port 0 cannot carry traffic (expected `all` or 1 to 65535)");
        assert_eq!(parse_port_arg("https").unwrap_err(), "\"https\" is not a port number (expected `all` or 1 to 65535)");
        assert!(parse_port_arg("ALL").unwrap_err().contains("\"ALL\" is not a port number"));
        assert!(parse_port_arg("70000").is_err() && parse_port_arg("").is_err() && parse_port_arg("-1").is_err());

        assert_eq!(PortSet::from_args(&[All]), Ok(PortSet::All));
        assert_eq!(PortSet::from_args(&[All, All]), Ok(PortSet::All));
        assert_eq!(PortSet::from_args(&[Port(8443), Port(443), Port(8443)]), Ok(PortSet::Only(vec![443, 8443])));
        let e = PortSet::from_args(&[Port(443), All, Port(8443)]).unwrap_err();
        assert_eq!(e, "`all` cannot be combined with ports (443,8443): give either `all` or a list of ports");
        assert!(PortSet::from_args(&[]).unwrap_err().contains("no port given"));
        let many: Vec<PortArg> = (1..=17).map(Port).collect();
        assert_eq!(PortSet::from_args(&many).unwrap_err(), "17 ports given; at most 16 are supported (or `all`)");
        assert!(PortSet::from_args(&many[..16]).is_ok());

        // Into the program's settings: all by default, else the listed ports.
        let mut cfg = Config::default();
        assert!(cfg.is_tls_port(5000) && cfg.is_tls_port(443));
        let only = TrafficPolicy { tls_ports: PortSet::Only(vec![8443, 443]), ..TrafficPolicy::default() };
        only.apply_to(&mut cfg).unwrap();
        assert_eq!((cfg.tls_all_ports, cfg.tls_ports[..3].to_vec()), (0, vec![443, 8443, 0]));
        assert!(cfg.is_tls_port(443) && cfg.is_tls_port(8443) && !cfg.is_tls_port(5000) && !cfg.is_tls_port(0));
        TrafficPolicy::default().apply_to(&mut cfg).unwrap();
        assert_eq!((cfg.tls_all_ports, cfg.tls_ports), (1, [0; MAX_TLS_PORTS]));
        // The program's own default reads no QUIC until the daemon says so.
        assert_eq!(cfg, Config { quic_policy: filter_common::quic::POLICY_READ, ..Config::default() });
        let bad = TrafficPolicy { tls_ports: PortSet::Only((1..=17).collect()), ..TrafficPolicy::default() };
        assert!(bad.apply_to(&mut cfg).unwrap_err().to_string().contains("--tls-ports: 17 ports given; at most 16"));
        let zero = TrafficPolicy { tls_ports: PortSet::Only(vec![0]), ..TrafficPolicy::default() };
        assert!(zero.apply_to(&mut cfg).unwrap_err().to_string().contains("port 0"));
    }

    #[test]
    fn quic_ports_and_overload() {
        let mut cfg = Config::default();
        TrafficPolicy::default().apply_to(&mut cfg).unwrap();
        // Every UDP port but DNS's by default; read, overload passes.
        assert!(cfg.is_quic_port(443) && cfg.is_quic_port(8443) && cfg.is_quic_port(4433) && !cfg.is_quic_port(53));
        assert_eq!((cfg.quic_policy, cfg.quic_overload), (filter_common::quic::POLICY_READ, filter_common::quic::OVERLOAD_PASS));
        let only = TrafficPolicy { quic_ports: PortSet::Only(vec![8443, 443, 53]), quic_overload: QuicOverload::Drop, ..TrafficPolicy::default() };
        only.apply_to(&mut cfg).unwrap();
        assert_eq!((cfg.quic_all_ports, cfg.quic_ports[..4].to_vec()), (0, vec![53, 443, 8443, 0]));
        assert!(cfg.is_quic_port(443) && cfg.is_quic_port(8443) && !cfg.is_quic_port(4433) && !cfg.is_quic_port(53) && !cfg.is_quic_port(0));
        assert_eq!(cfg.quic_overload, filter_common::quic::OVERLOAD_DROP);
        let bad = TrafficPolicy { quic_ports: PortSet::Only((1..=17).collect()), ..TrafficPolicy::default() };
        assert!(bad.apply_to(&mut cfg).unwrap_err().to_string().contains("--quic-ports: 17 ports given; at most 16"));
    }
}
