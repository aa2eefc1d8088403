//! One rule as an operator writes it.
//!
//! ```text
//! telegram.org            block the name itself only
//! *.telegram.org          block every name strictly below it (not itself)
//! .telegram.org           block the name and everything below it
//! allow core.telegram.org allow rules win over block rules
//! ```

use std::fmt;

use compact_str::CompactString;
use filter_common::name::{MAX_DOTTED_LEN, MAX_LABEL_LEN};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `name`: the name itself.
    Exact,
    /// `*.name`: names strictly below it.
    Below,
    /// `.name`: the name and names below it.
    Subtree,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Block,
    Allow,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Rule {
    pub action: Action,
    pub scope: Scope,
    /// Lowercase ASCII (IDNs as punycode), no trailing dot. Held inline
    /// up to 24 bytes (most names): a 2M-rule list is read without a heap
    /// allocation per rule.
    pub name: CompactString,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("empty name")]
    Empty,
    #[error("unknown action {0:?} (expected `block` or `allow`)")]
    UnknownAction(String),
    #[error("more than one name on the line")]
    TrailingText,
    #[error("`*` is only allowed as the whole first label (`*.example.com`)")]
    Wildcard,
    #[error("not a valid internationalized name: {0}")]
    Idna(String),
    #[error("empty label (two dots in a row, or a dot at the start)")]
    EmptyLabel,
    #[error("label {0:?} is longer than {MAX_LABEL_LEN} bytes")]
    LabelTooLong(String),
    #[error("name is {0} bytes long; the limit is {MAX_DOTTED_LEN}")]
    TooLong(usize),
    #[error("character {0:?} is not allowed in a name (letters, digits, `-` and `_` only)")]
    BadChar(char),
}

impl Rule {
    /// Parses `[block|allow] PATTERN`.
    pub fn parse(text: &str) -> Result<Rule, PatternError> {
        let mut words = text.split_whitespace();
        let first = words.next().ok_or(PatternError::Empty)?;
        let (action, pattern) = match first {
            "block" | "allow" => {
                let action = if first == "allow" { Action::Allow } else { Action::Block };
                (action, words.next().ok_or(PatternError::Empty)?)
            }
            w if words.clone().next().is_some() && !w.contains('.') => {
                return Err(PatternError::UnknownAction(w.to_string()));
            }
            w => (Action::Block, w),
        };
        if words.next().is_some() {
            return Err(PatternError::TrailingText);
        }
        let (scope, name) = parse_pattern(pattern)?;
        Ok(Rule { action, scope, name })
    }

    pub fn pattern(&self) -> String {
        match self.scope {
            Scope::Exact => self.name.to_string(),
            Scope::Below => format!("*.{}", self.name),
            Scope::Subtree => format!(".{}", self.name),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.action {
            Action::Block => write!(f, "{}", self.pattern()),
            Action::Allow => write!(f, "allow {}", self.pattern()),
        }
    }
}

fn parse_pattern(p: &str) -> Result<(Scope, CompactString), PatternError> {
    let (scope, rest) = if let Some(rest) = p.strip_prefix("*.") {
        (Scope::Below, rest)
    } else if let Some(rest) = p.strip_prefix('.') {
        (Scope::Subtree, rest)
    } else {
        (Scope::Exact, p)
    };
    Ok((scope, normalize_name(rest)?))
}

/// Lowercases, strips one trailing dot, converts IDNs to punycode and checks
/// label and name lengths and characters.
pub fn normalize_name(name: &str) -> Result<CompactString, PatternError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(PatternError::Empty);
    }
    if name.contains('*') {
        return Err(PatternError::Wildcard);
    }
    let ascii = if name.is_ascii() {
        let mut s = CompactString::from(name);
        s.make_ascii_lowercase();
        s
    } else {
        idna::domain_to_ascii(name).map_err(|e| PatternError::Idna(e.to_string()))?.into()
    };
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(PatternError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(PatternError::LabelTooLong(label.to_string()));
        }
        if let Some(c) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
            return Err(PatternError::BadChar(c));
        }
    }
    if ascii.len() > MAX_DOTTED_LEN {
        return Err(PatternError::TooLong(ascii.len()));
    }
    Ok(ascii)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(a: Action, s: Scope, n: &str) -> Rule {
        Rule { action: a, scope: s, name: n.into() }
    }

    #[test]
    fn syntax() {
        assert_eq!(Rule::parse("Telegram.ORG."), Ok(rule(Action::Block, Scope::Exact, "telegram.org")));
        assert_eq!(Rule::parse("*.telegram.org"), Ok(rule(Action::Block, Scope::Below, "telegram.org")));
        assert_eq!(Rule::parse(".telegram.org"), Ok(rule(Action::Block, Scope::Subtree, "telegram.org")));
        assert_eq!(Rule::parse("allow  core.telegram.org"), Ok(rule(Action::Allow, Scope::Exact, "core.telegram.org")));
        assert_eq!(Rule::parse("block t.me"), Ok(rule(Action::Block, Scope::Exact, "t.me")));
        assert_eq!(Rule::parse("bücher.example"), Ok(rule(Action::Block, Scope::Exact, "xn--bcher-kva.example")));
        assert_eq!(Rule::parse("_dmarc.example"), Ok(rule(Action::Block, Scope::Exact, "_dmarc.example")));
    }

    #[test]
    fn errors() {
        assert_eq!(Rule::parse("deny x.org"), Err(PatternError::UnknownAction("deny".into())));
        assert_eq!(Rule::parse("a.org b.org"), Err(PatternError::TrailingText));
        assert_eq!(Rule::parse("a.*.org"), Err(PatternError::Wildcard));
        assert_eq!(Rule::parse("**.org"), Err(PatternError::Wildcard));
        assert_eq!(Rule::parse("a..org"), Err(PatternError::EmptyLabel));
        assert_eq!(Rule::parse("..org"), Err(PatternError::EmptyLabel));
        assert_eq!(Rule::parse("*."), Err(PatternError::Empty));
        assert_eq!(Rule::parse("allow"), Err(PatternError::Empty));
        assert_eq!(Rule::parse("a/b.org"), Err(PatternError::BadChar('/')));
        assert!(matches!(Rule::parse(&format!("{}.org", "a".repeat(64))), Err(PatternError::LabelTooLong(_))));
        let long = vec!["abcdefghi"; 26].join(".");
        assert_eq!(Rule::parse(&long), Err(PatternError::TooLong(259)));
    }

    #[test]
    fn display_round_trips() {
        for text in ["t.me", "*.telegram.org", ".telegram.org", "allow core.telegram.org", "allow *.x.y"] {
            let r = Rule::parse(text).unwrap();
            assert_eq!(r.to_string(), text);
            assert_eq!(Rule::parse(&r.to_string()).unwrap(), r);
        }
    }
}
