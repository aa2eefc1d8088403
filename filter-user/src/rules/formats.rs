//! The list formats regulators and blocklist vendors ship, and how a list's
//! format is told from its content.
//!
//! | format    | a line looks like                      | becomes                                   |
//! |-----------|----------------------------------------|-------------------------------------------|
//! | `plain`   | `t.me`, `*.x.org`, `.x.org`, `allow y` | blokir's own syntax (see `pattern`)       |
//! | `hosts`   | `0.0.0.0 ads.example tracker.example`  | one exact block rule per name             |
//! | `rpz`     | `bad.example CNAME .`                  | RPZ policies (below)                      |
//! | `adblock` | `\|\|ads.example^`, `@@\|\|ok.example^`    | block / allow the name and all below it   |
//!
//! **plain**: `#` starts a comment; one rule per line.
//!
//! **hosts**: `ADDRESS NAME [NAME...]`, any IPv4 or IPv6 address (a zone
//! suffix like `fe80::1%lo0` is allowed); the address itself is ignored: every
//! name is blocked. `#` starts a comment. The standard entries every hosts
//! file carries (`localhost`, `broadcasthost`, `ip6-loopback`, ... and names
//! that are themselves IP addresses, like StevenBlack's `0.0.0.0 0.0.0.0`) are
//! skipped silently. A line with one bad name is bad as a whole.
//!
//! **rpz**: a DNS Response Policy Zone in zone-file syntax. Supported policies
//! (all QNAME triggers): `CNAME .` (NXDOMAIN), `CNAME *.` (NODATA) and
//! `CNAME rpz-drop.` block, `CNAME rpz-passthru.` (and the old form, a CNAME
//! to the trigger name itself) allows. An owner `*.name` is a `Below` rule,
//! any other owner an `Exact` rule. Owner names are relative to the zone: the
//! zone's name (the SOA owner, or before any SOA the first `$ORIGIN`) is
//! stripped, so in zone `rpz.example.` both `bad.com` and `bad.com.rpz.example.`
//! mean `bad.com`; without any `$ORIGIN` relative owners are taken as they
//! are and `@` is the apex. `$ORIGIN`, `$TTL`, TTL and class fields, `;`
//! comments, blank owners (the previous owner), parentheses and quoted
//! strings are understood; SOA, NS and DNSSEC records, and any record at the
//! apex other than a CNAME, are ignored. Everything blokir can't enforce is a
//! bad line saying why: redirects (`CNAME walled.garden.`), Local Data
//! (`A 192.0.2.1`), `rpz-tcp-only.`, IP / NSDNAME / client-IP triggers,
//! `$INCLUDE` and `$GENERATE`.
//!
//! **adblock**: only whole-domain network rules: `||name^` blocks the name
//! and everything below it, `@@||name^` allows them; `^|` is accepted for
//! `^`, and the options `$important`, `$all` and `$document` (which don't
//! narrow the rule). `!` lines and `[Adblock Plus 2.0]`-style headers are
//! comments, and so are `#` lines that aren't cosmetic rules. Anything else
//! is a bad line with the reason: cosmetic rules (`##`), regular
//! expressions, paths, ports, wildcards, `||name` without `^`, narrowing
//! options (`$third-party`, `$domain=`, `$dnstype=`, ...), URL filters and
//! `!#if`/`!#include` directives.
//!
//! Internationalized names are converted to punycode in every format.
//!
//! ## Detection (`Format::Auto`)
//!
//! The format is decided by the first *significant* line: the first line
//! that is valid UTF-8 and, trimmed, is neither blank nor starts with `#`,
//! `;` or `!`. Looking at that line, in this order:
//!
//! 1. it starts with `||` or `@@`, or is a `[...]` header: **adblock**;
//! 2. its first word is `$ORIGIN`, `$TTL`, `$INCLUDE` or `$GENERATE`: **rpz**;
//!    (for the next two rules, text after a `#` or `;` is removed first)
//! 3. its first word is an IP address and a second word follows: **hosts**;
//! 4. it has three or more words and one after the first is a DNS class
//!    (`IN`, ...) or record type (`SOA`, `CNAME`, `NS`, `A`, ...): **rpz**;
//! 5. otherwise, or if there is no significant line: **plain**.
//!
//! The whole list is then read in that one format. A line of another format
//! (a file mixing formats) is a bad line saying so, never a silently
//! different rule: every format's parser rejects the others' lines.

use std::{fmt, net::IpAddr, path::Path, str::FromStr};

use rayon::prelude::*;

use super::{
    file::{FileError, LineError, MAX_REPORTED},
    pattern::{Action, PatternError, Rule, Scope, normalize_name},
};

/// A list's format; `Auto` detects it from the content.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Format {
    #[default]
    Auto,
    Plain,
    Hosts,
    Rpz,
    Adblock,
}

impl Format {
    pub const ALL: [Format; 5] = [Format::Auto, Format::Plain, Format::Hosts, Format::Rpz, Format::Adblock];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Plain => "plain",
            Format::Hosts => "hosts",
            Format::Rpz => "rpz",
            Format::Adblock => "adblock",
        }
    }

    /// "a hosts-file line", for error messages.
    fn describe_line(self) -> &'static str {
        match self {
            Format::Auto | Format::Plain => "a plain rule",
            Format::Hosts => "a hosts-file line",
            Format::Rpz => "an RPZ zone-file record",
            Format::Adblock => "an adblock rule",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown list format {0:?} (expected auto, plain, hosts, rpz or adblock)")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<Format, UnknownFormat> {
        Format::ALL.into_iter().find(|f| f.as_str() == s).ok_or_else(|| UnknownFormat(s.to_string()))
    }
}

/// What to do with bad lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BadLines {
    /// Any bad line refuses the whole list; every bad line is reported.
    #[default]
    Refuse,
    /// Bad lines are skipped and counted; the rest of the list is used.
    Skip,
}

/// A parsed list.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Sorted, without duplicates.
    pub rules: Vec<Rule>,
    /// The format the list was read in (the detected one for `Format::Auto`).
    pub format: Format,
    /// How many bad lines were skipped (always 0 with `BadLines::Refuse`).
    pub skipped: usize,
    /// The first (at most 20) skipped lines and why.
    pub skipped_examples: Vec<LineError>,
}

impl Parsed {
    /// For a log line when bad lines were skipped: the count, then the first
    /// bad lines as `SOURCE:LINE: why`, one a line.
    pub fn skip_report(&self) -> Option<String> {
        if self.skipped == 0 {
            return None;
        }
        let mut out = format!("skipped {} bad line{}:", self.skipped, if self.skipped == 1 { "" } else { "s" });
        for e in &self.skipped_examples {
            out.push('\n');
            out.push_str(&e.to_string());
        }
        if self.skipped > self.skipped_examples.len() {
            out.push_str(&format!("\n... and {} more bad lines", self.skipped - self.skipped_examples.len()));
        }
        Some(out)
    }
}

/// Why one line (or one zone-file record, reported at its first line) is bad.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LineProblem {
    /// A plain rule (the messages blokir's own syntax always gave).
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// A bad name in a hosts, RPZ or adblock line.
    #[error("{name:?}: {error}")]
    Name { name: String, error: PatternError },
    #[error("not UTF-8 text")]
    NotUtf8,
    #[error("this looks like {} but the list is read as {reading_as}{}", .found.describe_line(), detected_note(.detected_from))]
    OtherFormat { found: Format, reading_as: Format, detected_from: Option<usize> },
    #[error("`*` wildcards are not supported in {0} lists")]
    NoWildcards(Format),

    // hosts
    #[error("{0:?} is not an IP address (hosts-file lines are `ADDRESS NAME...`)")]
    NotAnAddress(String),
    #[error("address {0} has no host name after it")]
    NoHostName(String),

    // rpz
    #[error("unterminated quoted string")]
    UnclosedQuote,
    #[error("`)` without a matching `(`")]
    UnbalancedParen,
    #[error("`(` is not closed before the end of the file")]
    UnclosedParen,
    #[error("directive `{0}` is not supported (only `$ORIGIN` and `$TTL` are)")]
    UnsupportedDirective(String),
    #[error("`{0}` needs exactly one argument")]
    DirectiveArgs(String),
    #[error("`$TTL {0}`: not a time value")]
    BadTtl(String),
    #[error("relative `$ORIGIN {0}` without an earlier absolute `$ORIGIN`")]
    RelativeOrigin(String),
    #[error("record without an owner name (the line starts with a blank and no record precedes it)")]
    NoOwner,
    #[error("no record type (expected `NAME [TTL] [CLASS] TYPE DATA`)")]
    NoType,
    #[error("`#` does not start a comment in a zone file; use `;`")]
    HashComment,
    #[error("unknown record type {0:?} (expected `NAME [TTL] [CLASS] TYPE DATA`)")]
    UnknownType(String),
    #[error("class {0}: policy records are class IN")]
    Class(String),
    #[error("a second SOA record (one zone per file)")]
    SecondSoa,
    #[error("owner `{0}` is absolute but the zone's name is unknown (no SOA or `$ORIGIN` before it)")]
    UnknownZone(String),
    #[error("owner `{owner}` is outside the zone `{zone}`")]
    OutsideZone { owner: String, zone: String },
    #[error("a policy record at the zone apex")]
    ApexPolicy,
    #[error("`*` at the zone apex would match every name")]
    WildcardApex,
    #[error("`{0}` triggers are not supported, only QNAME triggers (names)")]
    UnsupportedTrigger(String),
    #[error("`{0}` is a Local Data policy (a rewritten answer), which blokir can't give; {SUPPORTED_RPZ}")]
    LocalData(String),
    #[error("`CNAME {0}` redirects to another name (a Local Data policy), which blokir can't do; {SUPPORTED_RPZ}")]
    Redirect(String),
    #[error("`CNAME {0}` is relative to the origin (not the policy); write `{0}.`")]
    RelativeTarget(String),
    #[error("`CNAME rpz-tcp-only.` (the TCP-only policy) is not supported; {SUPPORTED_RPZ}")]
    TcpOnly,
    #[error("a CNAME record needs exactly one target")]
    CnameArity,

    // adblock
    #[error("cosmetic (element hiding) rule: it acts on web pages, not on DNS")]
    Cosmetic,
    #[error("regular-expression rule: only `||name^` domain rules are supported")]
    Regex,
    #[error("address-anchored rule (`|...`): only `||name^` domain rules are supported")]
    Anchored,
    #[error("URL filter (matches text anywhere in an address), not a `||name^` domain rule")]
    UrlFilter,
    #[error("`{0}` after the name makes this a URL pattern, not a whole-domain rule; only `||name^` can be enforced on DNS")]
    UrlPattern(String),
    #[error("`||{0}` without `^` also matches longer names (`{0}.evil`, `{0}x`); write `||{0}^`")]
    NoSeparator(String),
    #[error("option `{0}` narrows where the rule applies, which DNS can't see; only `$important`, `$all` and `$document` are accepted")]
    NarrowingOption(String),
    #[error("`$` without options")]
    EmptyOptions,
    #[error("preprocessor directive `!#{0}` is not supported (its rules would apply unconditionally)")]
    Preprocessor(String),
}

const SUPPORTED_RPZ: &str = "supported: `CNAME .` (NXDOMAIN), `CNAME *.` (NODATA), `CNAME rpz-drop.` (block), `CNAME rpz-passthru.` (allow)";

fn detected_note(line: &Option<usize>) -> String {
    match *line {
        Some(line) => format!(" (detected from line {line})"),
        None => " (as configured)".to_string(),
    }
}

/// Reads a list file in `format`.
pub fn read_list(path: &Path, format: Format, bad: BadLines) -> Result<Parsed, FileError> {
    let source = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| FileError::Io(source.clone(), e))?;
    parse_list(&source, &bytes, format, bad)
}

/// Parses list text in `format` (`Format::Auto`: detected, see the module
/// docs); `source` names it in errors. With `BadLines::Refuse` any bad line
/// refuses the list (`FileError::Lines`; a non-UTF-8 line is
/// `FileError::NotUtf8`); with `BadLines::Skip` bad lines are counted in
/// `Parsed::skipped`.
pub fn parse_list(source: &str, bytes: &[u8], format: Format, bad: BadLines) -> Result<Parsed, FileError> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    if bad == BadLines::Refuse
        && let Err(e) = std::str::from_utf8(bytes)
    {
        let line = bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count() + 1;
        return Err(FileError::NotUtf8 { file: source.to_string(), line });
    }
    let (format, detected_from) = match format {
        Format::Auto => detect(bytes),
        f => (f, None),
    };
    // A zone file has state across lines ($ORIGIN, multi-line records);
    // every other format is read line by line, so its chunks are parsed on
    // every core and put back together in file order.
    let chunks = if format == Format::Rpz { vec![(0, bytes)] } else { split_lines(bytes, rayon::current_num_threads() * 4) };
    let parts: Vec<(Out<'_>, Vec<usize>)> = chunks
        .into_par_iter()
        .map(|(first_line, chunk)| {
            let mut out = Out { source, format, detected_from, rules: Vec::new(), errors: Vec::new(), bad: 0 };
            let mut not_utf8 = Vec::new();
            let lines = Lines { rest: Some(chunk), number: first_line, not_utf8: &mut not_utf8 };
            match format {
                Format::Auto | Format::Plain => parse_plain(lines, &mut out),
                Format::Hosts => parse_hosts(lines, &mut out),
                Format::Rpz => parse_rpz(lines, &mut out),
                Format::Adblock => parse_adblock(lines, &mut out),
            }
            (out, not_utf8)
        })
        .collect();
    let mut rules = Vec::with_capacity(parts.iter().map(|(o, _)| o.rules.len()).sum());
    let (mut errors, mut count) = (Vec::new(), 0);
    for (out, not_utf8) in parts {
        rules.extend(out.rules);
        errors.extend(out.errors);
        count += out.bad + not_utf8.len();
        errors.extend(not_utf8.into_iter().map(|line| LineError { source: source.to_string(), line, error: LineProblem::NotUtf8 }));
    }
    // Each chunk kept its first bad lines: together they hold the file's first.
    errors.sort_by_key(|e| e.line);
    errors.truncate(MAX_REPORTED);
    if count > 0 && bad == BadLines::Refuse {
        return Err(FileError::Lines(errors, count));
    }
    let mut rules = sorted_rules(rules);
    rules.dedup();
    Ok(Parsed { rules, format, skipped: count, skipped_examples: errors })
}

/// `rules` in `Rule`'s order. Comparing two rules reads two names from
/// the heap (a cache miss each): sorting 2M of them took longer than parsing
/// them. So the sort is of 24-byte entries holding the first bytes of each
/// rule in order (action, scope, the name's first 14 bytes), and reads the
/// names only to break ties. Equal rules are identical, so the sort need not
/// be stable.
fn sorted_rules(rules: Vec<Rule>) -> Vec<Rule> {
    let prefix = |r: &Rule| {
        let mut b = [0u8; 16];
        b[0] = r.action as u8;
        b[1] = r.scope as u8;
        let name = r.name.as_bytes();
        let n = name.len().min(14);
        // A shorter name that is a prefix of a longer one sorts first, as
        // with `str`: names hold no zero byte.
        b[2..2 + n].copy_from_slice(&name[..n]);
        u128::from_be_bytes(b)
    };
    let mut order: Vec<(u128, u32)> = rules.par_iter().enumerate().map(|(i, r)| (prefix(r), i as u32)).collect();
    order.par_sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| rules[a.1 as usize].cmp(&rules[b.1 as usize])));
    // Rule `from[k]` goes to place `k`: moved there in place, cycle by
    // cycle, so no second copy of the list is ever held.
    let mut from: Vec<u32> = order.into_iter().map(|(_, i)| i).collect();
    let mut rules = rules;
    for start in 0..from.len() {
        let mut at = start;
        while from[at] != DONE {
            let src = from[at] as usize;
            from[at] = DONE;
            if src == start {
                break;
            }
            rules.swap(at, src);
            at = src;
        }
    }
    rules
}

/// A place of `sorted_rules` already filled.
const DONE: u32 = u32::MAX;

/// About `n` pieces of `bytes`, each ending after a newline (the last at the
/// end), with the number of lines before each.
fn split_lines(bytes: &[u8], n: usize) -> Vec<(usize, &[u8])> {
    let target = (bytes.len() / n.max(1)).max(64 * 1024);
    let (mut pieces, mut rest, mut line) = (Vec::new(), bytes, 0);
    while rest.len() > target {
        let Some(nl) = rest[target..].iter().position(|b| *b == b'\n') else { break };
        let (piece, tail) = rest.split_at(target + nl + 1);
        pieces.push((line, piece));
        line += piece.iter().filter(|b| **b == b'\n').count();
        rest = tail;
    }
    pieces.push((line, rest));
    pieces
}

/// The text lines with their numbers; lines that aren't UTF-8 are noted aside.
struct Lines<'a, 'b> {
    rest: Option<&'a [u8]>,
    number: usize,
    not_utf8: &'b mut Vec<usize>,
}

impl<'a> Iterator for Lines<'a, '_> {
    type Item = (usize, &'a str);

    fn next(&mut self) -> Option<(usize, &'a str)> {
        loop {
            let rest = self.rest?;
            let (raw, tail) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            self.rest = tail;
            self.number += 1;
            match std::str::from_utf8(raw) {
                Ok(text) => return Some((self.number, text)),
                Err(_) => self.not_utf8.push(self.number),
            }
        }
    }
}

/// Where a parser puts rules and bad lines.
struct Out<'s> {
    source: &'s str,
    format: Format,
    detected_from: Option<usize>,
    rules: Vec<Rule>,
    errors: Vec<LineError>,
    bad: usize,
}

impl Out<'_> {
    /// Records a bad line; when `text` looks like another format's line,
    /// says that instead of `problem`.
    fn fail(&mut self, line: usize, text: &str, problem: LineProblem) {
        self.bad += 1;
        if self.errors.len() >= MAX_REPORTED {
            return;
        }
        let error = match sniff(text) {
            Some(found) if found != self.format => LineProblem::OtherFormat { found, reading_as: self.format, detected_from: self.detected_from },
            _ => problem,
        };
        self.errors.push(LineError { source: self.source.to_string(), line, error });
    }
}

/// The format and the line it was decided on (see the module docs).
fn detect(bytes: &[u8]) -> (Format, Option<usize>) {
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let Ok(line) = std::str::from_utf8(raw) else { continue };
        let text = line.trim();
        if text.is_empty() || text.starts_with(['#', ';', '!']) {
            continue;
        }
        return (sniff(text).unwrap_or(Format::Plain), Some(i + 1));
    }
    (Format::Plain, None)
}

/// Rules 1-4 of detection, for one line; `None` is plain (or nothing clear).
fn sniff(line: &str) -> Option<Format> {
    let text = line.trim();
    if text.starts_with("||") || text.starts_with("@@") || (text.starts_with('[') && text.ends_with(']')) {
        return Some(Format::Adblock);
    }
    let first = text.split_whitespace().next()?;
    if first.starts_with('$') && ["$ORIGIN", "$TTL", "$INCLUDE", "$GENERATE"].iter().any(|d| first.eq_ignore_ascii_case(d)) {
        return Some(Format::Rpz);
    }
    let text = text.split(['#', ';']).next().unwrap_or("");
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() >= 2 && parse_address(words[0]).is_some() {
        return Some(Format::Hosts);
    }
    if words.len() >= 3 && words[1..].iter().any(|w| is_class(w) || is_rr_type(w)) {
        return Some(Format::Rpz);
    }
    None
}

/// Removes a `#` comment and surrounding blanks.
fn uncomment(line: &str) -> &str {
    line.split('#').next().unwrap_or("").trim()
}

// ---------------------------------------------------------------- plain

fn parse_plain<'a>(lines: impl Iterator<Item = (usize, &'a str)>, out: &mut Out<'_>) {
    for (no, line) in lines {
        let text = uncomment(line);
        if text.is_empty() {
            continue;
        }
        match Rule::parse(text) {
            Ok(rule) => out.rules.push(rule),
            Err(e) => out.fail(no, line, e.into()),
        }
    }
}

// ---------------------------------------------------------------- hosts

/// Entries found in stock hosts files (Linux distributions, macOS, Windows,
/// StevenBlack's header), which are not rules.
const STANDARD_HOSTS: &[&str] = &[
    "localhost",
    "localhost.localdomain",
    "localhost4",
    "localhost4.localdomain4",
    "localhost6",
    "localhost6.localdomain6",
    "local",
    "broadcasthost",
    "ip6-localhost",
    "ip6-loopback",
    "ip6-localnet",
    "ip6-mcastprefix",
    "ip6-allnodes",
    "ip6-allrouters",
    "ip6-allhosts",
];

/// An IPv4 or IPv6 address, IPv6 possibly with a zone (`fe80::1%lo0`).
fn parse_address(word: &str) -> Option<IpAddr> {
    let word = match word.split_once('%') {
        Some((addr, zone)) if addr.contains(':') && !zone.is_empty() => addr,
        _ => word,
    };
    word.parse().ok()
}

fn parse_hosts<'a>(lines: impl Iterator<Item = (usize, &'a str)>, out: &mut Out<'_>) {
    for (no, line) in lines {
        let text = uncomment(line);
        if text.is_empty() {
            continue;
        }
        match hosts_line(text) {
            Ok(rules) => out.rules.extend(rules),
            Err(problem) => out.fail(no, line, problem),
        }
    }
}

fn hosts_line(text: &str) -> Result<Vec<Rule>, LineProblem> {
    let mut words = text.split_whitespace();
    let address = words.next().unwrap_or_default();
    if parse_address(address).is_none() {
        return Err(LineProblem::NotAnAddress(address.to_string()));
    }
    let mut rules = Vec::new();
    let mut any = false;
    for word in words {
        any = true;
        let bare = word.strip_suffix('.').unwrap_or(word);
        if STANDARD_HOSTS.iter().any(|s| bare.eq_ignore_ascii_case(s)) || parse_address(word).is_some() {
            continue;
        }
        if word.contains('*') {
            return Err(LineProblem::NoWildcards(Format::Hosts));
        }
        let name = normalize_name(word).map_err(|error| LineProblem::Name { name: word.to_string(), error })?;
        rules.push(Rule { action: Action::Block, scope: Scope::Exact, name });
    }
    if !any {
        return Err(LineProblem::NoHostName(address.to_string()));
    }
    Ok(rules)
}

// ---------------------------------------------------------------- rpz
//
// A small zone-file reader rather than a crate's. `hickory-proto` (already a
// workspace dependency, zone parsing behind its `text-parsing` feature):
// `Parser::parse` stops at the first error (`?` on every token), returns the
// records as a map by name and type, so line numbers are lost, and parses the
// RDATA of every type; it can give neither `FILE:LINE: why` for every bad
// record nor the skip policy, and it refuses, with its own generic errors,
// records we want to explain (an unknown type, a Local Data record). The
// `domain` crate would be a new dependency with the same mismatch. RPZ needs
// little of the zone-file syntax: owner, optional TTL and class, type, and
// for CNAMEs a single target name; parentheses matter only for the SOA.

/// Record type names, space-separated.
const RR_TYPES: &str = "A NS MD MF CNAME SOA MB MG MR NULL WKS PTR HINFO MINFO MX TXT RP AFSDB X25 ISDN RT NSAP SIG KEY PX GPOS AAAA LOC NXT EID NIMLOC SRV ATMA NAPTR KX CERT A6 DNAME SINK APL DS SSHFP IPSECKEY RRSIG NSEC DNSKEY DHCID NSEC3 NSEC3PARAM TLSA SMIMEA HIP CDS CDNSKEY OPENPGPKEY CSYNC ZONEMD SVCB HTTPS SPF NID L32 L64 LP EUI48 EUI64 URI CAA DLV";

/// Records that say nothing about policy: the zone's own data and DNSSEC.
const IGNORED_TYPES: &[&str] = &["SOA", "NS", "RRSIG", "NSEC", "NSEC3", "NSEC3PARAM", "DNSKEY", "DS", "CDS", "CDNSKEY", "ZONEMD"];

/// Labels that end non-QNAME triggers.
const OTHER_TRIGGERS: &[&str] = &["rpz-ip", "rpz-nsip", "rpz-nsdname", "rpz-client-ip"];

fn is_rr_type(word: &str) -> bool {
    RR_TYPES.split(' ').any(|t| word.eq_ignore_ascii_case(t)) || numbered(word, "TYPE")
}

fn is_class(word: &str) -> bool {
    ["IN", "CH", "CS", "HS"].iter().any(|c| word.eq_ignore_ascii_case(c)) || numbered(word, "CLASS")
}

/// `TYPE65`, `CLASS1` (RFC 3597).
fn numbered(word: &str, prefix: &str) -> bool {
    word.len() > prefix.len()
        && word.is_char_boundary(prefix.len())
        && word[..prefix.len()].eq_ignore_ascii_case(prefix)
        && word[prefix.len()..].bytes().all(|b| b.is_ascii_digit())
}

/// `3600`, or BIND's `1h30m`, `2W`.
fn is_ttl(word: &str) -> bool {
    let mut digits = false;
    for b in word.bytes() {
        match b {
            b'0'..=b'9' => digits = true,
            b's' | b'm' | b'h' | b'd' | b'w' | b'S' | b'M' | b'H' | b'D' | b'W' if digits => digits = false,
            _ => return false,
        }
    }
    // Every unit followed digits, so the word starts with a digit.
    !word.is_empty()
}

/// A record being read: its tokens, from its first line to the line that
/// closes its parentheses.
struct Pending<'a> {
    start: usize,
    first_line: &'a str,
    owner_blank: bool,
    tokens: Vec<&'a str>,
    depth: u32,
}

/// Splits a line into tokens: words, `"quoted strings"` whole; `(`/`)`
/// change `depth` and `;` ends the line.
fn tokenize<'a>(line: &'a str, tokens: &mut Vec<&'a str>, depth: &mut u32) -> Result<(), LineProblem> {
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b' ' | b'\t' | b'\r' => i += 1,
            b';' => break,
            b'(' => {
                *depth += 1;
                i += 1;
            }
            b')' => {
                *depth = depth.checked_sub(1).ok_or(LineProblem::UnbalancedParen)?;
                i += 1;
            }
            b'"' => {
                let start = i;
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err(LineProblem::UnclosedQuote),
                        Some(b'\\') => i += 2,
                        Some(b'"') => break,
                        Some(_) => i += 1,
                    }
                }
                i += 1;
                tokens.push(&line[start..i]);
            }
            _ => {
                let start = i;
                while i < b.len() && !matches!(b[i], b' ' | b'\t' | b'\r' | b';' | b'(' | b')' | b'"') {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i = i.min(b.len());
                tokens.push(&line[start..i]);
            }
        }
    }
    Ok(())
}

/// An owner name, lowercase, without the trailing dot.
#[derive(Clone, Debug)]
enum Owner {
    /// `@` before any `$ORIGIN`: the zone's own name, whatever it is.
    Apex,
    /// A relative name before any `$ORIGIN`: relative to the zone.
    Relative(String),
    /// A fully qualified name.
    Absolute(String),
}

#[derive(Default)]
struct Zone {
    /// The current `$ORIGIN`; `Some("")` is the root.
    origin: Option<String>,
    /// The first `$ORIGIN` other than the root: the zone's name until an SOA says.
    first_origin: Option<String>,
    /// The SOA owner.
    apex: Option<String>,
    soa_seen: bool,
    last_owner: Option<Owner>,
}

fn parse_rpz<'a>(lines: impl Iterator<Item = (usize, &'a str)>, out: &mut Out<'_>) {
    let mut zone = Zone::default();
    let mut pending: Option<Pending<'a>> = None;
    for (no, line) in lines {
        let mut p =
            pending.take().unwrap_or_else(|| Pending { start: no, first_line: line, owner_blank: line.starts_with([' ', '\t']), tokens: Vec::new(), depth: 0 });
        if let Err(problem) = tokenize(line, &mut p.tokens, &mut p.depth) {
            out.fail(no, line, problem);
            continue;
        }
        if p.depth > 0 {
            pending = Some(p);
            continue;
        }
        if p.tokens.is_empty() {
            continue;
        }
        match zone.record(&p) {
            Ok(Some(rule)) => out.rules.push(rule),
            Ok(None) => {}
            Err(problem) => out.fail(p.start, p.first_line, problem),
        }
    }
    if let Some(p) = pending {
        out.fail(p.start, p.first_line, LineProblem::UnclosedParen);
    }
}

impl Zone {
    /// One record or directive; `Ok(None)` for those that aren't rules.
    fn record(&mut self, p: &Pending<'_>) -> Result<Option<Rule>, LineProblem> {
        let tokens = &p.tokens[..];
        if !p.owner_blank && tokens[0].starts_with('$') {
            self.directive(tokens)?;
            return Ok(None);
        }
        if tokens[0].starts_with('#') {
            return Err(LineProblem::HashComment);
        }
        let (owner, rest) =
            if p.owner_blank { (self.last_owner.clone().ok_or(LineProblem::NoOwner)?, tokens) } else { (self.resolve(tokens[0]), &tokens[1..]) };
        self.last_owner = Some(owner.clone());

        let (mut ttl, mut class, mut i) = (false, None, 0);
        while let Some(t) = rest.get(i) {
            if !ttl && is_ttl(t) {
                ttl = true;
            } else if class.is_none() && is_class(t) {
                class = Some(*t);
            } else {
                break;
            }
            i += 1;
        }
        let rtype = rest.get(i).ok_or(LineProblem::NoType)?;
        let data = &rest[i + 1..];
        if !is_rr_type(rtype) {
            return Err(LineProblem::UnknownType(rtype.to_string()));
        }
        if let Some(c) = class.filter(|c| !c.eq_ignore_ascii_case("IN")) {
            return Err(LineProblem::Class(c.to_string()));
        }
        let rtype = rtype.to_ascii_uppercase();
        if rtype == "SOA" {
            if self.soa_seen {
                return Err(LineProblem::SecondSoa);
            }
            self.soa_seen = true;
            if let Owner::Absolute(name) = owner {
                self.apex = Some(name);
            }
            return Ok(None);
        }
        if IGNORED_TYPES.contains(&rtype.as_str()) {
            return Ok(None);
        }
        let Some(trigger) = self.trigger(&owner)? else {
            return if rtype == "CNAME" { Err(LineProblem::ApexPolicy) } else { Ok(None) };
        };
        if rtype != "CNAME" {
            return Err(LineProblem::LocalData(std::iter::once(rtype.as_str()).chain(data.iter().copied()).collect::<Vec<_>>().join(" ")));
        }
        let [target] = data else { return Err(LineProblem::CnameArity) };
        let action = match target.to_ascii_lowercase().as_str() {
            "." | "*." | "rpz-drop." => Action::Block,
            "rpz-passthru." => Action::Allow,
            "rpz-tcp-only." => return Err(LineProblem::TcpOnly),
            "rpz-passthru" | "rpz-drop" | "rpz-tcp-only" | "*" => return Err(LineProblem::RelativeTarget(target.to_string())),
            // The original PASSTHRU encoding: a CNAME to the trigger name itself.
            t if t.strip_suffix('.') == Some(trigger.as_str()) => Action::Allow,
            _ => return Err(LineProblem::Redirect(target.to_string())),
        };
        let (scope, name) = match trigger.strip_prefix("*.") {
            _ if trigger == "*" => return Err(LineProblem::WildcardApex),
            Some(rest) => (Scope::Below, rest),
            None => (Scope::Exact, trigger.as_str()),
        };
        let last = name.rsplit('.').next().unwrap_or_default();
        if let Some(kind) = OTHER_TRIGGERS.iter().find(|k| last.eq_ignore_ascii_case(k)) {
            return Err(LineProblem::UnsupportedTrigger(format!(".{kind}")));
        }
        let name = normalize_name(name).map_err(|error| LineProblem::Name { name: trigger.clone(), error })?;
        Ok(Some(Rule { action, scope, name }))
    }

    fn directive(&mut self, tokens: &[&str]) -> Result<(), LineProblem> {
        let name = tokens[0].to_ascii_uppercase();
        let arg = match (name.as_str(), &tokens[1..]) {
            ("$ORIGIN" | "$TTL", [arg]) => *arg,
            ("$ORIGIN" | "$TTL", _) => return Err(LineProblem::DirectiveArgs(name)),
            _ => return Err(LineProblem::UnsupportedDirective(tokens[0].to_string())),
        };
        if name == "$TTL" {
            return if is_ttl(arg) { Ok(()) } else { Err(LineProblem::BadTtl(arg.to_string())) };
        }
        let origin = match self.resolve(arg) {
            Owner::Absolute(o) => o,
            Owner::Apex | Owner::Relative(_) => return Err(LineProblem::RelativeOrigin(arg.to_string())),
        };
        if !origin.is_empty() {
            normalize_name(&origin).map_err(|error| LineProblem::Name { name: arg.to_string(), error })?;
            self.first_origin.get_or_insert_with(|| origin.clone());
        }
        self.origin = Some(origin);
        Ok(())
    }

    fn resolve(&self, token: &str) -> Owner {
        if token == "@" {
            return self.origin.clone().map_or(Owner::Apex, Owner::Absolute);
        }
        let lower = token.to_lowercase();
        if let Some(absolute) = lower.strip_suffix('.') {
            return Owner::Absolute(absolute.to_string());
        }
        match self.origin.as_deref() {
            None => Owner::Relative(lower),
            Some("") => Owner::Absolute(lower),
            Some(origin) => Owner::Absolute(format!("{lower}.{origin}")),
        }
    }

    /// The owner relative to the zone; `None` at the apex.
    fn trigger(&self, owner: &Owner) -> Result<Option<String>, LineProblem> {
        let full = match owner {
            Owner::Apex => return Ok(None),
            Owner::Relative(name) => return Ok(Some(name.clone())),
            Owner::Absolute(full) => full,
        };
        let Some(zone) = self.apex.as_deref().or(self.first_origin.as_deref()) else {
            return Err(LineProblem::UnknownZone(format!("{full}.")));
        };
        if full == zone {
            return Ok(None);
        }
        match full.strip_suffix(zone).and_then(|t| t.strip_suffix('.')) {
            Some(trigger) if !trigger.is_empty() => Ok(Some(trigger.to_string())),
            _ => Err(LineProblem::OutsideZone { owner: format!("{full}."), zone: format!("{zone}.") }),
        }
    }
}

// ---------------------------------------------------------------- adblock

const COSMETIC_MARKERS: &[&str] = &["##", "#@#", "#?#", "#@?#", "#$#", "#@$#", "#%#", "#@%#", "$$", "$@$"];

fn parse_adblock<'a>(lines: impl Iterator<Item = (usize, &'a str)>, out: &mut Out<'_>) {
    for (no, line) in lines {
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        match adblock_line(text) {
            Ok(Some(rule)) => out.rules.push(rule),
            Ok(None) => {}
            Err(problem) => out.fail(no, line, problem),
        }
    }
}

fn adblock_line(text: &str) -> Result<Option<Rule>, LineProblem> {
    if let Some(comment) = text.strip_prefix('!') {
        if let Some(directive) = comment.strip_prefix('#') {
            let word = directive.split_whitespace().next().unwrap_or_default();
            if ["if", "else", "endif", "include"].contains(&word) {
                return Err(LineProblem::Preprocessor(word.to_string()));
            }
        }
        return Ok(None);
    }
    if text.starts_with('[') && text.ends_with(']') {
        return Ok(None);
    }
    if text == "#" || text.starts_with("# ") || text.starts_with("#\t") {
        return Ok(None);
    }
    if COSMETIC_MARKERS.iter().any(|m| text.contains(m)) {
        return Err(LineProblem::Cosmetic);
    }
    if text.starts_with('#') {
        return Ok(None);
    }
    let (action, body) = match text.strip_prefix("@@") {
        Some(body) => (Action::Allow, body),
        None => (Action::Block, text),
    };
    if body.len() > 1 && body.starts_with('/') && (body.ends_with('/') || body.contains("/$")) {
        return Err(LineProblem::Regex);
    }
    let Some(rest) = body.strip_prefix("||") else {
        return Err(if body.starts_with('|') { LineProblem::Anchored } else { LineProblem::UrlFilter });
    };
    let (pattern, options) = match rest.rfind('$') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let end = pattern.find(|c: char| !(c.is_alphanumeric() || matches!(c, '.' | '-' | '_'))).unwrap_or(pattern.len());
    let (name, tail) = pattern.split_at(end);
    if name.is_empty() && !tail.starts_with('*') {
        return Err(PatternError::Empty.into());
    }
    match tail {
        "^" | "^|" => {}
        t if t.starts_with('*') => return Err(LineProblem::NoWildcards(Format::Adblock)),
        "" => return Err(LineProblem::NoSeparator(name.to_string())),
        t => return Err(LineProblem::UrlPattern(t.to_string())),
    }
    let name = normalize_name(name).map_err(|error| LineProblem::Name { name: name.to_string(), error })?;
    if let Some(options) = options {
        if options.trim().is_empty() {
            return Err(LineProblem::EmptyOptions);
        }
        for option in options.split(',').map(str::trim) {
            if !["important", "all", "document"].iter().any(|o| option.eq_ignore_ascii_case(o)) {
                return Err(LineProblem::NarrowingOption(format!("${option}")));
            }
        }
    }
    Ok(Some(Rule { action, scope: Scope::Subtree, name }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: Action, scope: Scope, name: &str) -> Rule {
        Rule { action, scope, name: name.into() }
    }

    fn block(name: &str) -> Rule {
        rule(Action::Block, Scope::Exact, name)
    }

    fn parse(text: &str, format: Format) -> Parsed {
        parse_list("t", text.as_bytes(), format, BadLines::Refuse).unwrap_or_else(|e| panic!("{}", e.report()))
    }

    /// The report of a refused list.
    fn refused(text: &str, format: Format) -> String {
        match parse_list("list", text.as_bytes(), format, BadLines::Refuse) {
            Ok(p) => panic!("accepted: {p:?}"),
            Err(e) => e.report(),
        }
    }

    /// The only bad line's `SOURCE:LINE: why`.
    fn one_error(text: &str, format: Format) -> String {
        match parse_list("list", text.as_bytes(), format, BadLines::Refuse) {
            Err(FileError::Lines(errors, 1)) => errors[0].to_string(),
            other => panic!("expected one bad line: {other:?}"),
        }
    }

    const STEVENBLACK: &str = include_str!("../../tests/data/stevenblack.hosts");
    const RPZ_ZONE: &str = include_str!("../../tests/data/policy.rpz");
    const EASYLIST: &str = include_str!("../../tests/data/easylist-domains.txt");

    #[test]
    fn a_list_read_in_pieces_reports_lines_and_rules_as_one() {
        // Big enough to be cut into several pieces (see `split_lines`),
        // every name twice, one of each pair in another piece.
        let mut text = String::new();
        for i in 0..40_000 {
            match i {
                2 | 17_000 | 39_998 => text.push_str("bad..example\n"),
                _ => text.push_str(&format!("n{}.example\n", i % 20_000)),
            }
        }
        assert!(split_lines(text.as_bytes(), 8).len() > 2);
        let p = parse_list("big", text.as_bytes(), Format::Plain, BadLines::Skip).unwrap();
        assert_eq!(p.skipped, 3);
        assert_eq!(p.skipped_examples.iter().map(|e| e.line).collect::<Vec<_>>(), [3, 17_001, 39_999]);
        assert_eq!(p.rules.len(), 20_000);
        assert!(p.rules.windows(2).all(|w| w[0] < w[1]), "sorted, without duplicates");
        let mut want: Vec<Rule> = (0..20_000).map(|i| block(&format!("n{i}.example"))).collect();
        want.sort();
        assert_eq!(p.rules, want);
    }

    #[test]
    fn format_names() {
        for f in Format::ALL {
            assert_eq!(f.to_string().parse::<Format>(), Ok(f));
        }
        assert_eq!("rpz".parse::<Format>(), Ok(Format::Rpz));
        assert_eq!("zone".parse::<Format>().unwrap_err().to_string(), "unknown list format \"zone\" (expected auto, plain, hosts, rpz or adblock)");
        assert_eq!(Format::default(), Format::Auto);
        assert_eq!(BadLines::default(), BadLines::Refuse);
    }

    #[test]
    fn hosts_stevenblack_style() {
        let p = parse(STEVENBLACK, Format::Auto);
        assert_eq!(p.format, Format::Hosts);
        assert_eq!(
            p.rules,
            vec![
                block("1493361689.rsc.cdn77.org"),
                block("30-day-change.com"),
                block("ad.doubleclick.net"),
                block("ads.example"),
                block("adservice.google.com"),
                block("tracker.example"),
                block("xn--bcher-kva.example"),
            ]
        );
        assert_eq!(parse(STEVENBLACK, Format::Hosts), p);
    }

    #[test]
    fn hosts_errors() {
        assert_eq!(one_error("0.0.0.0 ok.example\n0.0.0.0\n", Format::Hosts), "list:2: address 0.0.0.0 has no host name after it");
        assert_eq!(
            one_error("0.0.0.0 ok.example\n0.0.0.0.0 x.example\n", Format::Hosts),
            "list:2: \"0.0.0.0.0\" is not an IP address (hosts-file lines are `ADDRESS NAME...`)"
        );
        assert_eq!(
            one_error("# list\n0.0.0.0 ok.example a..b.example\n", Format::Hosts),
            "list:2: \"a..b.example\": empty label (two dots in a row, or a dot at the start)"
        );
        assert_eq!(one_error("0.0.0.0 ok.example\n:: *.ads.example\n", Format::Hosts), "list:2: `*` wildcards are not supported in hosts lists");
        assert_eq!(
            one_error("0.0.0.0 ok.example\n0.0.0.0 ads/x.example\n", Format::Hosts),
            "list:2: \"ads/x.example\": character '/' is not allowed in a name (letters, digits, `-` and `_` only)"
        );
    }

    #[test]
    fn hosts_line_with_a_bad_name_is_bad_whole() {
        let p = parse_list("h", b"0.0.0.0 a.example b..example c.example\n0.0.0.0 d.example\n", Format::Hosts, BadLines::Skip).unwrap();
        assert_eq!(p.rules, vec![block("d.example")]);
        assert_eq!(p.skipped, 1);
    }

    #[test]
    fn rpz_zone() {
        let p = parse(RPZ_ZONE, Format::Auto);
        assert_eq!(p.format, Format::Rpz);
        assert_eq!(
            p.rules,
            vec![
                block("bad.example"),
                block("casino.example"),
                block("dropped.example"),
                block("nodata.example"),
                block("phish.example.net"),
                block("www.casino.example"),
                block("xn--bcher-kva.example"),
                rule(Action::Block, Scope::Below, "ads.example"),
                rule(Action::Block, Scope::Below, "tracker.example"),
                rule(Action::Allow, Scope::Exact, "good.ads.example"),
                rule(Action::Allow, Scope::Exact, "legacy-ok.ads.example"),
            ]
        );
    }

    #[test]
    fn rpz_relative_and_absolute_owners() {
        let zone = "$ORIGIN rpz.example.\n@ SOA ns. admin. 1 2 3 4 5\nbad.com CNAME .\nbad2.com.rpz.example. CNAME .\n";
        assert_eq!(parse(zone, Format::Rpz).rules, vec![block("bad.com"), block("bad2.com")]);
        // A zone without $ORIGIN (the name comes from the server's config).
        let zone =
            "$TTL 300\n@ IN SOA localhost. root.localhost. (\n 1 ; serial\n 3h 1h 1w 1h )\n  IN NS localhost.\nbad.com CNAME .\n*.bad.org 60 IN CNAME .\n";
        let p = parse(zone, Format::Auto);
        assert_eq!(p.format, Format::Rpz);
        assert_eq!(p.rules, vec![block("bad.com"), rule(Action::Block, Scope::Below, "bad.org")]);
        // A named-compilezone dump: `$ORIGIN .`, the SOA names the zone.
        let zone = "$ORIGIN .\n$TTL 60\nrpz.local IN SOA ns.rpz.local. h.rpz.local. 1 2 3 4 5\n NS ns.rpz.local.\n$ORIGIN rpz.local.\nbad.com CNAME .\n$ORIGIN com.rpz.local.\nworse CNAME .\n";
        assert_eq!(parse(zone, Format::Auto).rules, vec![block("bad.com"), block("worse.com")]);
        // `$ORIGIN` without an SOA: the first one names the zone.
        let zone = "$ORIGIN rpz.example.\nbad.com CNAME .\n$ORIGIN net.rpz.example.\nworse CNAME .\n";
        assert_eq!(parse(zone, Format::Auto).rules, vec![block("bad.com"), block("worse.net")]);
    }

    #[test]
    fn rpz_errors() {
        let head = "$ORIGIN rpz.example.\n@ SOA ns. admin. 1 2 3 4 5\n";
        let cases: &[(&str, &str)] = &[
            (
                "x.example CNAME walled.garden.example.",
                "`CNAME walled.garden.example.` redirects to another name (a Local Data policy), which blokir can't do; supported: `CNAME .` (NXDOMAIN), `CNAME *.` (NODATA), `CNAME rpz-drop.` (block), `CNAME rpz-passthru.` (allow)",
            ),
            (
                "x.example 300 IN A 192.0.2.1",
                "`A 192.0.2.1` is a Local Data policy (a rewritten answer), which blokir can't give; supported: `CNAME .` (NXDOMAIN), `CNAME *.` (NODATA), `CNAME rpz-drop.` (block), `CNAME rpz-passthru.` (allow)",
            ),
            (
                "x.example CNAME rpz-tcp-only.",
                "`CNAME rpz-tcp-only.` (the TCP-only policy) is not supported; supported: `CNAME .` (NXDOMAIN), `CNAME *.` (NODATA), `CNAME rpz-drop.` (block), `CNAME rpz-passthru.` (allow)",
            ),
            ("x.example CNAME rpz-passthru", "`CNAME rpz-passthru` is relative to the origin (not the policy); write `rpz-passthru.`"),
            ("x.example CNAME", "a CNAME record needs exactly one target"),
            ("x.example CNAME . .", "a CNAME record needs exactly one target"),
            ("x.example CH CNAME .", "class CH: policy records are class IN"),
            ("x.example 300 IN", "no record type (expected `NAME [TTL] [CLASS] TYPE DATA`)"),
            ("x.example", "no record type (expected `NAME [TTL] [CLASS] TYPE DATA`)"),
            ("# generated by feedtool", "`#` does not start a comment in a zone file; use `;`"),
            ("x.example BLOCK .", "unknown record type \"BLOCK\" (expected `NAME [TTL] [CLASS] TYPE DATA`)"),
            ("bad.com. CNAME .", "owner `bad.com.` is outside the zone `rpz.example.`"),
            ("@ CNAME .", "a policy record at the zone apex"),
            ("* CNAME .", "`*` at the zone apex would match every name"),
            ("a.*.example CNAME .", "\"a.*.example\": `*` is only allowed as the whole first label (`*.example.com`)"),
            ("bad..com CNAME .", "\"bad..com\": empty label (two dots in a row, or a dot at the start)"),
            ("32.1.2.0.192.rpz-ip CNAME .", "`.rpz-ip` triggers are not supported, only QNAME triggers (names)"),
            ("ns.bad.com.rpz-nsdname CNAME .", "`.rpz-nsdname` triggers are not supported, only QNAME triggers (names)"),
            ("$INCLUDE other.zone", "directive `$INCLUDE` is not supported (only `$ORIGIN` and `$TTL` are)"),
            ("$GENERATE 1-10 h$ CNAME .", "directive `$GENERATE` is not supported (only `$ORIGIN` and `$TTL` are)"),
            ("$TTL", "`$TTL` needs exactly one argument"),
            ("$TTL soon", "`$TTL soon`: not a time value"),
            ("$ORIGIN a. b.", "`$ORIGIN` needs exactly one argument"),
            ("@ SOA ns. admin. 1 2 3 4 5", "a second SOA record (one zone per file)"),
            ("x.example TXT \"unterminated", "unterminated quoted string"),
            ("x.example CNAME . )", "`)` without a matching `(`"),
            ("x.example SOA ns. admin. ( 1 2", "`(` is not closed before the end of the file"),
            ("0.0.0.0 bad.example", "this looks like a hosts-file line but the list is read as rpz (as configured)"),
            ("||bad.example^", "this looks like an adblock rule but the list is read as rpz (as configured)"),
        ];
        for (line, why) in cases {
            assert_eq!(one_error(&format!("{head}ok.example CNAME .\n{line}\n"), Format::Rpz), format!("list:4: {why}"), "{line}");
        }
        // Before any $ORIGIN or SOA, an absolute owner can't be placed.
        assert_eq!(
            one_error("ok.example CNAME .\nbad.example.rpz.example. CNAME .\n", Format::Rpz),
            "list:2: owner `bad.example.rpz.example.` is absolute but the zone's name is unknown (no SOA or `$ORIGIN` before it)"
        );
        assert_eq!(one_error("ok.example CNAME .\n$ORIGIN rpz\n", Format::Rpz), "list:2: relative `$ORIGIN rpz` without an earlier absolute `$ORIGIN`");
        assert_eq!(
            one_error("  CNAME .\nok.example CNAME .\n", Format::Rpz),
            "list:1: record without an owner name (the line starts with a blank and no record precedes it)"
        );
    }

    #[test]
    fn rpz_multi_line_errors_are_reported_at_their_first_line() {
        let zone = "$ORIGIN rpz.example.\n@ IN SOA ns. admin. (\n 1\n 2 3 4 5 )\nx.example IN (\n  A 192.0.2.1 )\n";
        assert!(one_error(zone, Format::Rpz).starts_with("list:5: `A 192.0.2.1` is a Local Data policy"));
    }

    #[test]
    fn adblock_easylist_style() {
        let p = parse(EASYLIST, Format::Auto);
        assert_eq!(p.format, Format::Adblock);
        assert_eq!(
            p.rules,
            vec![
                rule(Action::Block, Scope::Subtree, "ads.example.com"),
                rule(Action::Block, Scope::Subtree, "doubleclick.net"),
                rule(Action::Block, Scope::Subtree, "tracker.example"),
                rule(Action::Block, Scope::Subtree, "xn--bcher-kva.example"),
                rule(Action::Allow, Scope::Subtree, "cdn.doubleclick.net"),
                rule(Action::Allow, Scope::Subtree, "ok.ads.example.com"),
            ]
        );
    }

    #[test]
    fn adblock_errors() {
        let cases: &[(&str, &str)] = &[
            ("||ads.example/banner.js", "`/banner.js` after the name makes this a URL pattern, not a whole-domain rule; only `||name^` can be enforced on DNS"),
            ("||ads.example:8080^", "`:8080^` after the name makes this a URL pattern, not a whole-domain rule; only `||name^` can be enforced on DNS"),
            ("||ads.example^*/track", "`^*/track` after the name makes this a URL pattern, not a whole-domain rule; only `||name^` can be enforced on DNS"),
            ("||ads.example", "`||ads.example` without `^` also matches longer names (`ads.example.evil`, `ads.examplex`); write `||ads.example^`"),
            ("||ads*.example^", "`*` wildcards are not supported in adblock lists"),
            ("||^", "empty name"),
            ("||a..example^", "\"a..example\": empty label (two dots in a row, or a dot at the start)"),
            (
                "||ads.example^$third-party",
                "option `$third-party` narrows where the rule applies, which DNS can't see; only `$important`, `$all` and `$document` are accepted",
            ),
            (
                "||ads.example^$important,domain=news.example",
                "option `$domain=news.example` narrows where the rule applies, which DNS can't see; only `$important`, `$all` and `$document` are accepted",
            ),
            (
                "||ads.example^$dnstype=AAAA",
                "option `$dnstype=AAAA` narrows where the rule applies, which DNS can't see; only `$important`, `$all` and `$document` are accepted",
            ),
            ("||ads.example^$", "`$` without options"),
            ("example.com##.ad-banner", "cosmetic (element hiding) rule: it acts on web pages, not on DNS"),
            ("##.sponsored", "cosmetic (element hiding) rule: it acts on web pages, not on DNS"),
            ("example.com#@#.ad", "cosmetic (element hiding) rule: it acts on web pages, not on DNS"),
            ("/banner[0-9]+\\.gif/", "regular-expression rule: only `||name^` domain rules are supported"),
            ("@@/^https?:\\/\\/ok\\./$document", "regular-expression rule: only `||name^` domain rules are supported"),
            ("|https://ads.example/", "address-anchored rule (`|...`): only `||name^` domain rules are supported"),
            ("&ad_type=", "URL filter (matches text anywhere in an address), not a `||name^` domain rule"),
            ("ads.example", "URL filter (matches text anywhere in an address), not a `||name^` domain rule"),
            ("@@ok.example", "URL filter (matches text anywhere in an address), not a `||name^` domain rule"),
            ("!#if (adguard)", "preprocessor directive `!#if` is not supported (its rules would apply unconditionally)"),
            ("!#include extra.txt", "preprocessor directive `!#include` is not supported (its rules would apply unconditionally)"),
            ("0.0.0.0 ads.example", "this looks like a hosts-file line but the list is read as adblock (detected from line 1)"),
            ("ads.example CNAME .", "this looks like an RPZ zone-file record but the list is read as adblock (detected from line 1)"),
        ];
        for (line, why) in cases {
            assert_eq!(one_error(&format!("||ok.example^\n{line}\n"), Format::Auto), format!("list:2: {why}"), "{line}");
        }
    }

    #[test]
    fn adblock_accepted_options_and_comments() {
        let text = "[Adblock Plus 2.0]\n! Title: x\n!#safari_cb_affinity\n# a comment\n||a.example^$important\n||b.example^$all\n@@||c.example^$document,important\n||d.example^|\n";
        let p = parse(text, Format::Auto);
        assert_eq!(p.format, Format::Adblock);
        assert_eq!(p.rules.len(), 4);
        assert!(p.rules.contains(&rule(Action::Allow, Scope::Subtree, "c.example")));
    }

    #[test]
    fn plain_lists() {
        let p = parse("# blocklist\nt.me\n*.telegram.org\n.x.org\nallow core.telegram.org\nbücher.example\n", Format::Auto);
        assert_eq!(p.format, Format::Plain);
        assert_eq!(p.rules.len(), 5);
        assert!(p.rules.contains(&block("xn--bcher-kva.example")));
        // A bare IP address is a (useless but valid) plain name, not a hosts line.
        assert_eq!(parse("1.2.3.4\nx.example\n", Format::Auto).format, Format::Plain);
    }

    #[test]
    fn detection() {
        let cases: &[(&str, Format, Option<usize>)] = &[
            ("", Format::Plain, None),
            ("# only\n; comments\n! here\n\n", Format::Plain, None),
            ("# c\n\nt.me\n0.0.0.0 x.example\n", Format::Plain, Some(3)),
            ("# hosts\n127.0.0.1 localhost\n", Format::Hosts, Some(2)),
            ("::1 ip6-localhost\n", Format::Hosts, Some(1)),
            ("fe80::1%lo0 localhost\n", Format::Hosts, Some(1)),
            ("0.0.0.0 ads.example # tracker\n", Format::Hosts, Some(1)),
            ("; zone\n$TTL 3600\n", Format::Rpz, Some(2)),
            ("$origin rpz.example.\n", Format::Rpz, Some(1)),
            ("@ IN SOA ns. admin. 1 2 3 4 5\n", Format::Rpz, Some(1)),
            ("bad.example CNAME .\n", Format::Rpz, Some(1)),
            ("*.bad.example 300 CNAME .\n", Format::Rpz, Some(1)),
            ("[Adblock Plus 2.0]\n", Format::Adblock, Some(1)),
            ("! Title: x\n||ads.example^\n", Format::Adblock, Some(2)),
            ("@@||ok.example^\n", Format::Adblock, Some(1)),
            ("\u{feff}||ads.example^\n", Format::Adblock, Some(1)),
        ];
        for (text, format, line) in cases {
            let bytes = text.as_bytes();
            let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
            assert_eq!(detect(bytes), (*format, *line), "{text:?}");
        }
    }

    #[test]
    fn mixed_formats_give_per_line_errors() {
        let text = "0.0.0.0 a.example\nb.example\n||c.example^\nd.example CNAME .\n0.0.0.0 e.example\n";
        let report = refused(text, Format::Auto);
        assert_eq!(
            report,
            "list:2: \"b.example\" is not an IP address (hosts-file lines are `ADDRESS NAME...`)\n\
             list:3: this looks like an adblock rule but the list is read as hosts (detected from line 1)\n\
             list:4: this looks like an RPZ zone-file record but the list is read as hosts (detected from line 1)\n\
             the file was refused"
        );
        let report = refused("t.me\n0.0.0.0 x.example\n||y.example^\n", Format::Auto);
        assert!(report.contains("list:2: this looks like a hosts-file line but the list is read as plain (detected from line 1)"), "{report}");
        assert!(report.contains("list:3: this looks like an adblock rule but the list is read as plain (detected from line 1)"), "{report}");
    }

    #[test]
    fn skip_policy_counts_and_keeps_examples() {
        let mut text = String::from("0.0.0.0 ok.example\n");
        for i in 0..25 {
            text.push_str(&format!("0.0.0.0 bad{i}..example\n"));
        }
        text.push_str("0.0.0.0 ok2.example\n");
        let p = parse_list("s", text.as_bytes(), Format::Auto, BadLines::Skip).unwrap();
        assert_eq!(p.format, Format::Hosts);
        assert_eq!(p.rules, vec![block("ok.example"), block("ok2.example")]);
        assert_eq!(p.skipped, 25);
        assert_eq!(p.skipped_examples.len(), MAX_REPORTED);
        assert_eq!(p.skipped_examples[0].to_string(), "s:2: \"bad0..example\": empty label (two dots in a row, or a dot at the start)");
        let report = p.skip_report().unwrap();
        assert!(report.starts_with("skipped 25 bad lines:\ns:2: "), "{report}");
        assert!(report.ends_with("\n... and 5 more bad lines"), "{report}");
        // The same list refused: 20 listed, then the count.
        let report = refused(&text, Format::Auto);
        assert_eq!(report.lines().filter(|l| l.starts_with("list:")).count(), MAX_REPORTED);
        assert!(report.ends_with("... and 5 more bad lines; the file was refused"), "{report}");
        assert_eq!(parse("0.0.0.0 ok.example\n", Format::Auto).skip_report(), None);
    }

    #[test]
    fn skip_policy_skips_non_utf8_lines_in_order() {
        let p = parse_list("u", b"||a.example^\n||\xff.example^\n||b/c^\n||d.example^\n", Format::Auto, BadLines::Skip).unwrap();
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.skipped, 2);
        assert_eq!(p.skipped_examples[0].to_string(), "u:2: not UTF-8 text");
        assert!(p.skipped_examples[1].to_string().starts_with("u:3: `/c^` after the name"));
        assert!(matches!(parse_list("u", b"||a.example^\n\xff\n", Format::Auto, BadLines::Refuse), Err(FileError::NotUtf8 { line: 2, .. })));
    }

    #[test]
    fn idn_in_every_format() {
        let want = "xn--bcher-kva.example";
        for (text, format) in [
            ("bücher.example\n", Format::Plain),
            ("0.0.0.0 BÜCHER.example\n", Format::Hosts),
            ("$ORIGIN rpz.example.\nbücher.example CNAME .\n", Format::Rpz),
            ("||bücher.example^\n", Format::Adblock),
        ] {
            let p = parse(text, Format::Auto);
            assert_eq!(p.format, format);
            assert_eq!(p.rules.len(), 1);
            assert_eq!(p.rules[0].name, want, "{format}");
        }
    }

    #[test]
    fn explicit_format_overrides_detection() {
        // Read as plain, a hosts line is a bad line that says why.
        assert_eq!(one_error("0.0.0.0 x.example\n", Format::Plain), "list:1: this looks like a hosts-file line but the list is read as plain (as configured)");
        assert_eq!(parse("x.example\n", Format::Plain).format, Format::Plain);
    }
}
