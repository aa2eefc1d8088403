//! Rule files. blokir's own format is one rule per line, `#` comments, blank
//! lines; hosts files, RPZ zones and adblock lists are read too, the format
//! detected from the content (see `formats`). A file with any bad line is
//! refused whole, with every bad line reported as `FILE:LINE: why`.

use std::{fmt, path::Path};

use super::{
    formats::{BadLines, Format, LineProblem, parse_list},
    pattern::Rule,
};

/// How many bad lines an error lists before summarizing.
pub(super) const MAX_REPORTED: usize = 20;

#[derive(Debug, PartialEq, Eq)]
pub struct LineError {
    pub source: String,
    pub line: usize,
    pub error: LineProblem,
}

/// How long one bad line's reason may be: it quotes the line, which can be
/// of any size.
const MAX_REASON: usize = 512;

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.source, self.line, crate::excerpt::shorten(&self.error.to_string(), MAX_REASON))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{file}:{line}: not UTF-8 text")]
    NotUtf8 { file: String, line: usize },
    #[error("{}", format_lines(.0))]
    Lines(Vec<LineError>, usize),
}

fn format_lines(errors: &[LineError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

impl FileError {
    /// Every bad line, as `FILE:LINE: why` (at most `MAX_REPORTED`, then a count).
    pub fn report(&self) -> String {
        match self {
            FileError::Lines(errors, total) if *total > errors.len() => {
                format!("{}\n... and {} more bad lines; the file was refused", format_lines(errors), total - errors.len())
            }
            FileError::Lines(errors, _) => {
                format!("{}\nthe file was refused", format_lines(errors))
            }
            other => other.to_string(),
        }
    }
}

/// Parses rule text in any format (`Format::Auto`), refusing it if any line
/// is bad; `source` names it in errors. See `formats::parse_list` for an
/// explicit format or for skipping bad lines.
pub fn parse_rules(source: &str, bytes: &[u8]) -> Result<Vec<Rule>, FileError> {
    parse_list(source, bytes, Format::Auto, BadLines::Refuse).map(|parsed| parsed.rules)
}

/// Reads a rule file in any format (`Format::Auto`), refusing it if any line
/// is bad. See `formats::read_list` for an explicit format or for skipping
/// bad lines.
pub fn read_rules(path: &Path) -> Result<Vec<Rule>, FileError> {
    let source = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| FileError::Io(source.clone(), e))?;
    parse_rules(&source, &bytes)
}

/// Renders rules in the file format (the local list's on-disk form).
pub fn render_rules(header: &str, rules: &[Rule]) -> String {
    let mut out = String::new();
    for line in header.lines() {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    for r in rules {
        out.push_str(&r.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::pattern::{Action, Scope};

    #[test]
    fn comments_blanks_and_duplicates() {
        let text = b"# header\n\nt.me\n  telegram.org   # inline\n*.telegram.org\nt.me\nallow core.telegram.org\n";
        let rules = parse_rules("x.rules", text).unwrap();
        assert_eq!(rules.len(), 4);
        assert!(rules.contains(&Rule { action: Action::Allow, scope: Scope::Exact, name: "core.telegram.org".into() }));
    }

    #[test]
    fn every_bad_line_is_reported_with_file_and_line() {
        let text = b"ok.example\nbad..example\nfine.example\na b c\n";
        let err = parse_rules("lists/x.rules", text).unwrap_err();
        let report = err.report();
        assert!(report.contains("lists/x.rules:2: empty label"), "{report}");
        assert!(report.contains("lists/x.rules:4: unknown action \"a\""), "{report}");
        assert!(!report.contains(":1:") && !report.contains(":3:"));
    }

    #[test]
    fn many_bad_lines_are_summarized() {
        let text = "x..y\n".repeat(30);
        let report = parse_rules("f", text.as_bytes()).unwrap_err().report();
        assert_eq!(report.lines().filter(|l| l.starts_with("f:")).count(), MAX_REPORTED);
        assert!(report.contains("and 10 more bad lines"));
    }

    #[test]
    fn non_utf8_is_refused() {
        assert!(matches!(parse_rules("f", b"ok.example\n\xff\xfe\n"), Err(FileError::NotUtf8 { line: 2, .. })));
    }

    #[test]
    fn read_rules_detects_every_format() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        for (file, count) in [("stevenblack.hosts", 7), ("policy.rpz", 11), ("easylist-domains.txt", 6)] {
            let rules = read_rules(&data.join(file)).unwrap_or_else(|e| panic!("{}", e.report()));
            assert_eq!(rules.len(), count, "{file}");
            assert!(rules.iter().any(|r| r.name == "xn--bcher-kva.example"), "{file}");
        }
        let err = read_rules(&data.join("missing.hosts")).unwrap_err();
        assert!(matches!(err, FileError::Io(..)));
    }

    #[test]
    fn crlf_line_endings() {
        for text in ["a.example\r\nallow b.example\r\n", "0.0.0.0 a.example\r\n:: b.example # c\r\n", "||a.example^\r\n@@||b.example^\r\n"] {
            assert_eq!(parse_rules("f", text.as_bytes()).unwrap().len(), 2, "{text:?}");
        }
        let zone = "$ORIGIN rpz.example.\r\n@ SOA ns. a. (\r\n 1 2 3 4 5 )\r\na.example CNAME .\r\nb.example CNAME rpz-passthru.\r\n";
        assert_eq!(parse_rules("f", zone.as_bytes()).unwrap().len(), 2);
    }

    #[test]
    fn render_parses_back() {
        let rules = parse_rules("f", b"a.b\n*.c.d\n.e.f\nallow g.h\n").unwrap();
        assert_eq!(parse_rules("f", render_rules("generated\nby test", &rules).as_bytes()).unwrap(), rules);
    }
}
