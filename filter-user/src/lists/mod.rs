//! Named lists: a list the operator adds with a source (a file or a URL), a
//! format, optional DNS and TCP actions and ECH-outer flag, and a refresh
//! interval. Every version that
//! was put in force is kept on disk (the last `KEEP_VERSIONS`), so a list can
//! be rolled back, and so a restart uses the last good copy when the source
//! is down.

pub mod fetch;
pub mod ops;
pub mod registry;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    policy::ListSettings,
    rules::{
        formats::{BadLines, Format},
        shrink::MaxShrink,
    },
};

pub use registry::{Registry, Version};

/// Versions kept on disk per list (the one in force and those before it).
pub const KEEP_VERSIONS: usize = 5;
/// Shortest refresh interval (conditional GETs make a check cheap, but list
/// servers are shared by fleets of boxes).
pub const MIN_REFRESH: Duration = Duration::from_secs(10);

/// What the operator said about a list (`blokir lists add`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListDef {
    pub name: String,
    /// A file path or an `http://` / `https://` URL.
    pub source: String,
    #[serde(with = "format_str")]
    pub format: Format,
    /// Its DNS action, TCP action and ECH-outer flag, where given (each
    /// wins over `run`'s flags; `blokir lists set` changes them).
    #[serde(flatten)]
    pub settings: ListSettings,
    /// How often the source is checked (URL and file sources alike).
    #[serde(default)]
    pub refresh_secs: Option<u64>,
    /// The SHA-256 the source must have (hex), for sources that are pinned.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Skip bad lines (counted and reported) instead of refusing the list.
    #[serde(default)]
    pub skip_bad_lines: bool,
    /// The list's own `--max-shrink` (default: `run`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shrink: Option<MaxShrink>,
}

impl ListDef {
    pub fn bad_lines(&self) -> BadLines {
        if self.skip_bad_lines { BadLines::Skip } else { BadLines::Refuse }
    }

    pub fn is_url(&self) -> bool {
        fetch::is_url(&self.source)
    }

    /// Checks what a person typed: the name, the source's form, the hash's
    /// form and the refresh interval.
    pub fn validate(&self) -> Result<(), String> {
        valid_name(&self.name)?;
        if self.source.is_empty() {
            return Err("the source is empty".into());
        }
        if self.source.contains("://") && !self.is_url() {
            return Err(format!("source {:?}: only http:// and https:// URLs are supported", self.source));
        }
        if let Some(h) = &self.sha256
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!("--sha256 {h:?}: expected 64 hex digits"));
        }
        if let Some(s) = self.refresh_secs
            && s < MIN_REFRESH.as_secs()
        {
            return Err(format!("--refresh {s}s: the shortest refresh interval is {}s", MIN_REFRESH.as_secs()));
        }
        Ok(())
    }
}

/// List names: what metrics labels and file names can carry.
pub fn valid_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok { Ok(()) } else { Err(format!("list name {name:?}: use 1 to 64 of a-z, 0-9, '-' and '_', starting with a letter or digit")) }
}

/// `1h`, `30m`, `90s`, `1d` or plain seconds.
pub fn parse_interval(s: &str) -> Result<u64, String> {
    let (digits, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = digits.parse().map_err(|_| format!("{s:?}: expected a duration like 90s, 30m, 1h or 1d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m, h or d)")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{s:?}: too long"))
}

mod format_str {
    use serde::{Deserialize as _, Deserializer, Serializer};

    use crate::rules::formats::Format;

    pub fn serialize<S: Serializer>(f: &Format, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(f.as_str())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Format, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use filter_common::{reply::DnsAction, reset::TcpAction};

    use super::*;

    fn def(name: &str, source: &str) -> ListDef {
        ListDef {
            name: name.into(),
            source: source.into(),
            format: Format::Auto,
            settings: ListSettings::default(),
            refresh_secs: None,
            sha256: None,
            skip_bad_lines: false,
            max_shrink: None,
        }
    }

    #[test]
    fn names_sources_hashes_and_intervals_are_checked() {
        assert!(def("trustpositif", "/etc/x").validate().is_ok());
        assert!(def("kominfo-2017_telegram", "https://lists.example/t.txt").validate().is_ok());
        for bad in ["", "Upper", "-dash", "a b", "a/b", &"x".repeat(65)] {
            assert!(def(bad, "/x").validate().unwrap_err().contains("list name"), "{bad:?}");
        }
        assert!(def("a", "ftp://x/y").validate().unwrap_err().contains("only http:// and https://"));
        assert!(def("a", "").validate().is_err());
        let hashed = ListDef { sha256: Some("abc".into()), ..def("a", "/x") };
        assert!(hashed.validate().unwrap_err().contains("64 hex digits"));
        let quick = ListDef { refresh_secs: Some(5), ..def("a", "/x") };
        assert!(quick.validate().unwrap_err().contains("shortest refresh interval"));
        assert_eq!(parse_interval("1h"), Ok(3600));
        assert_eq!(parse_interval("90"), Ok(90));
        assert_eq!(parse_interval("2d"), Ok(172800));
        assert!(parse_interval("1w").unwrap_err().contains("unknown unit"));
        assert!(parse_interval("h").is_err());
    }

    #[test]
    fn definitions_round_trip_through_json() {
        let settings = ListSettings { action: Some(DnsAction::Nxdomain), tcp_action: Some(TcpAction::Reset), ech_outer: Some(false) };
        let d = ListDef { settings, format: Format::Hosts, refresh_secs: Some(3600), ..def("a", "https://x/y") };
        let json = serde_json::to_string(&d).unwrap();
        for field in [r#""format":"hosts""#, r#""action":"nxdomain""#, r#""tcp_action":"reset""#, r#""ech_outer":false"#] {
            assert!(json.contains(field), "{field} in {json}");
        }
        assert_eq!(serde_json::from_str::<ListDef>(&json).unwrap(), d);
        let bad = json.replace("hosts", "csv");
        assert!(serde_json::from_str::<ListDef>(&bad).unwrap_err().to_string().contains("unknown list format"));
        let bad = json.replace(r#""tcp_action":"reset""#, r#""tcp_action":"rst""#);
        assert!(serde_json::from_str::<ListDef>(&bad).unwrap_err().to_string().contains("unknown TCP action"));
    }

    /// A definition written before lists had a TCP action or an ECH-outer
    /// flag (exactly as such a daemon wrote it) still reads, with neither set.
    #[test]
    fn definitions_without_the_newer_settings_still_read() {
        let old = r#"{"name":"kominfo","source":"/etc/blokir/telegram.hosts","format":"auto","action":"nxdomain","refresh_secs":null,"sha256":null,"skip_bad_lines":false}"#;
        let d: ListDef = serde_json::from_str(old).unwrap();
        assert_eq!(d.settings, ListSettings { action: Some(DnsAction::Nxdomain), tcp_action: None, ech_outer: None });
        let older = r#"{"name":"kominfo","source":"/x","format":"hosts"}"#;
        assert_eq!(serde_json::from_str::<ListDef>(older).unwrap().settings, ListSettings::default());
    }
}
