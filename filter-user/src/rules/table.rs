//! The engine's copy of every rule, compact: the names in one byte arena
//! and 8 bytes per rule id, instead of a `String` per rule (which cost
//! about 64 bytes a rule and a heap allocation each).

use std::{cmp::Ordering, fmt};

use super::pattern::{Action, Rule, Scope};

/// One rule id's place: where its name lies in the arena, its list and its
/// kind (0: a free id).
#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    off: u32,
    /// Bits 32..40 of the offset: names of 16M rules can pass 4 GiB.
    off_hi: u8,
    len: u8,
    list: u8,
    kind: u8,
}

impl Entry {
    fn offset(&self) -> usize {
        self.off as usize | (usize::from(self.off_hi) << 32)
    }
}

fn kind_of(action: Action, scope: Scope) -> u8 {
    1 + (action as u8) * 3 + scope as u8
}

fn action_scope(kind: u8) -> (Action, Scope) {
    let k = kind - 1;
    let action = if k / 3 == 0 { Action::Block } else { Action::Allow };
    let scope = [Scope::Exact, Scope::Below, Scope::Subtree][usize::from(k % 3)];
    (action, scope)
}

/// A rule as the table holds it: borrowed, no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleView<'a> {
    pub action: Action,
    pub scope: Scope,
    pub name: &'a str,
}

impl RuleView<'_> {
    pub fn to_rule(&self) -> Rule {
        Rule { action: self.action, scope: self.scope, name: self.name.into() }
    }

    /// The order of `Rule`'s `Ord` (action, scope, name).
    pub fn cmp_rule(&self, rule: &Rule) -> Ordering {
        (self.action, self.scope, self.name).cmp(&(rule.action, rule.scope, rule.name.as_str()))
    }
}

impl PartialEq<Rule> for RuleView<'_> {
    fn eq(&self, rule: &Rule) -> bool {
        self.cmp_rule(rule) == Ordering::Equal
    }
}

impl fmt::Display for RuleView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let allow = if self.action == Action::Allow { "allow " } else { "" };
        match self.scope {
            Scope::Exact => write!(f, "{allow}{}", self.name),
            Scope::Below => write!(f, "{allow}*.{}", self.name),
            Scope::Subtree => write!(f, "{allow}.{}", self.name),
        }
    }
}

/// Rules by id. Id 0 is never a rule.
#[derive(Debug)]
pub struct RuleTable {
    entries: Vec<Entry>,
    text: Vec<u8>,
    /// Arena bytes of freed rules, reclaimed by `compact`.
    garbage: usize,
}

impl Default for RuleTable {
    fn default() -> Self {
        RuleTable { entries: vec![Entry::default()], text: Vec::new(), garbage: 0 }
    }
}

impl RuleTable {
    /// One past the highest id handed out so far (free ones included):
    /// the next never-used id.
    pub fn id_end(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, id: u32) -> Option<(u8, RuleView<'_>)> {
        let e = self.entries.get(id as usize).filter(|e| e.kind != 0)?;
        let (action, scope) = action_scope(e.kind);
        let bytes = &self.text[e.offset()..e.offset() + usize::from(e.len)];
        // Names are stored from `&str`s whole, so always UTF-8 (ASCII).
        let name = std::str::from_utf8(bytes).unwrap_or_default();
        Some((e.list, RuleView { action, scope, name }))
    }

    /// Sets `id`, a free one or a new one.
    pub fn set(&mut self, id: u32, list: u8, rule: &Rule) {
        if id as usize >= self.entries.len() {
            self.entries.resize(id as usize + 1, Entry::default());
        }
        let off = self.text.len();
        self.text.extend_from_slice(rule.name.as_bytes());
        // Names are at most 253 bytes (`normalize_name`).
        let entry = Entry { off: off as u32, off_hi: (off >> 32) as u8, len: rule.name.len() as u8, list, kind: kind_of(rule.action, rule.scope) };
        let e = &mut self.entries[id as usize];
        self.garbage += if e.kind != 0 { usize::from(e.len) } else { 0 };
        *e = entry;
    }

    pub fn free(&mut self, id: u32) {
        if let Some(e) = self.entries.get_mut(id as usize).filter(|e| e.kind != 0) {
            self.garbage += usize::from(e.len);
            *e = Entry::default();
        }
    }

    /// Rewrites the arena without the names of freed rules once they are
    /// most of it (so swaps that churn a list do not grow it for ever).
    pub fn compact_if_wasteful(&mut self) {
        if self.garbage < (1 << 20) || self.garbage < self.text.len() / 2 {
            return;
        }
        let mut text = Vec::with_capacity(self.text.len() - self.garbage);
        for e in self.entries.iter_mut().filter(|e| e.kind != 0) {
            let off = text.len();
            text.extend_from_slice(&self.text[e.offset()..e.offset() + usize::from(e.len)]);
            (e.off, e.off_hi) = (off as u32, (off >> 32) as u8);
        }
        self.text = text;
        self.garbage = 0;
    }

    /// Bytes held, for tests of the compaction.
    #[cfg(test)]
    fn arena_len(&self) -> usize {
        self.text.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_round_trip_and_freed_text_is_reclaimed() {
        let mut t = RuleTable::default();
        let rules: Vec<Rule> =
            ["t.me", "*.telegram.org", ".x.org", "allow core.telegram.org", "allow *.a.b", "allow .c.d"].iter().map(|s| Rule::parse(s).unwrap()).collect();
        for (i, r) in rules.iter().enumerate() {
            t.set(i as u32 + 1, i as u8, r);
        }
        for (i, r) in rules.iter().enumerate() {
            let (list, view) = t.get(i as u32 + 1).unwrap();
            assert_eq!((list, view.to_rule()), (i as u8, r.clone()));
            assert_eq!(view.to_string(), r.to_string());
            assert!(view == *r);
        }
        assert!(t.get(0).is_none() && t.get(99).is_none());
        t.free(2);
        assert!(t.get(2).is_none());
        // Churn: the arena stays bounded.
        let long = Rule::parse(&format!("{}.example", "a".repeat(60))).unwrap();
        for _ in 0..40_000 {
            t.set(3, 0, &long);
        }
        assert!(t.arena_len() > 1 << 20);
        t.compact_if_wasteful();
        assert!(t.arena_len() < 200, "{}", t.arena_len());
        assert_eq!(t.get(3).unwrap().1.to_rule(), long);
        assert_eq!(t.get(6).unwrap().1.to_rule(), rules[5]);
    }
}
