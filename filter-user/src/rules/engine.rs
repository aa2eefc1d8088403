//! The rule engine: holds every list's rules, computes what the kernel's node
//! map must hold, and moves it from one rule set to the next so that no
//! packet sees a state that neither the old nor the new rules would produce.
//!
//! A change is planned first (pure, so it can be refused without touching
//! anything), then applied to a `Target` (the BPF maps, or a host map in
//! tests) in four phases, field by field:
//!
//! 1. fields that become allow rules;
//! 2. fields that become block rules where none or a block rule was;
//! 3. fields whose block rule goes away;
//! 4. fields whose allow rule goes away or turns into a block rule.
//!
//! Allow rules are added before and removed after everything else, and block
//! rules are added before they are removed, so a name blocked by both the old
//! and the new rules stays blocked throughout, and a name blocked by neither
//! is never blocked.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasherDefault, Hasher},
    path::PathBuf,
};

use filter_common::{
    name::{CanonBuf, Decision, canon_start, dotted_to_canon, full_name_probe, match_canon},
    rules::{Config, MAX_DEPTH, MAX_LISTS, NameKey, NodeRules, RuleLookup, RuleRef},
};
use rayon::prelude::*;
use smallvec::SmallVec;

use super::{
    first_look,
    node_store::{NodeStore, NodeVal},
    pattern::{Action, PatternError, Rule, Scope, normalize_name},
    table::{RuleTable, RuleView},
};

/// Where the engine's decisions are written: the kernel maps, or a test map.
pub trait Target {
    /// Sets (or with `None` removes) one node.
    fn write_node(&mut self, key: &NameKey, value: Option<&NodeRules>) -> anyhow::Result<()>;
    /// Writes `nodes` in any order (a phase's writes need none); on an
    /// error, a count `n` such that none past the first `n` was written
    /// (some of the first `n` may not have been either: undoing a write
    /// that was not done rewrites the value the node has).
    fn write_nodes(&mut self, nodes: &[(NameKey, Option<NodeRules>)]) -> Result<(), (usize, anyhow::Error)> {
        for (i, (key, value)) in nodes.iter().enumerate() {
            self.write_node(key, value.as_ref()).map_err(|e| (i, e))?;
        }
        Ok(())
    }
    fn write_depth_mask(&mut self, mask: [u64; 2]) -> anyhow::Result<()>;
    /// Sets the first-look bits of nodes about to be written (before
    /// they are). A target without a first look has nothing to do.
    fn look_add(&mut self, _probes: &[first_look::Probe]) -> anyhow::Result<()> {
        Ok(())
    }
    /// Rewrites the first look to hold exactly `probes`, every node the rule
    /// map holds now: bits of nodes gone are cleared.
    fn look_rebuild(&mut self, _probes: &mut dyn Iterator<Item = first_look::Probe>) -> anyhow::Result<()> {
        Ok(())
    }
    /// Zeroes a rule id's hit counter before the id is (re)used.
    fn reset_hits(&mut self, id: u32) -> anyhow::Result<()>;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("the change needs {needed} rule ids but only {available} are free (rule capacity {capacity})")]
    RuleCapacity { needed: usize, available: usize, capacity: u32 },
    #[error("the change needs {needed} name nodes; the rule map holds {capacity}")]
    NodeCapacity { needed: usize, capacity: usize },
    #[error("list {0} still has rules")]
    ListNotEmpty(String),
    #[error("too many lists (at most {MAX_LISTS})")]
    TooManyLists,
}

/// A `NameKey` is already a keyed 128-bit hash of the name: the engine's
/// maps fold it instead of hashing it again with SipHash (which was a
/// quarter of a 2M-name load).
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        // A folded multiply mixes into both ends (hashbrown reads the low
        // bits for the bucket and the top 7 for the tag).
        let m = u128::from(self.0) * 0x9e37_79b9_7f4a_7c15;
        (m as u64) ^ ((m >> 64) as u64)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
        }
    }
    fn write_usize(&mut self, _: usize) {
        // The length prefix of the key's array: always 2.
    }
}

type KeyMap<V> = HashMap<NameKey, V, BuildHasherDefault<KeyHasher>>;

/// A place in a list's ids for a rule id not chosen yet (never a rule id:
/// those are below `MAX_RULE_ID`).
const FRESH: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    id: u32,
    list: u8,
    scope: Scope,
    action: Action,
}

/// A node's rules. Only nodes with two or more keep them aside
/// (`Engine::multi`): a node with one (nearly all) has it in its value
/// (see `single_slot`).
type Slots = SmallVec<[Slot; 2]>;

/// The rule of a node that has one, read back from its value.
fn single_slot(v: NodeRules) -> Option<Slot> {
    let (r, scope) = match (v.exact.is_none(), v.below.is_none()) {
        (false, true) => (v.exact, Scope::Exact),
        (true, false) => (v.below, Scope::Below),
        (false, false) if v.exact == v.below => (v.exact, Scope::Subtree),
        _ => return None,
    };
    Some(Slot { id: r.id(), list: r.list() as u8, scope, action: if r.is_allow() { Action::Allow } else { Action::Block } })
}

/// One added or removed rule's node, before they are grouped by node.
struct Affected {
    key: NameKey,
    block: u32,
    depth: u8,
    /// The rule added there (`None`: a rule removed from there).
    slot: Option<Slot>,
}

#[derive(Clone, Debug)]
pub struct RuleInfo {
    pub list: u8,
    pub rule: Rule,
}

#[derive(Clone, Debug)]
pub struct ListInfo {
    pub id: u8,
    pub name: String,
    pub source: Option<PathBuf>,
    ids: Vec<u32>,
    /// Whether `ids` are in the order of their rules (`Rule`'s `Ord`), with
    /// no two equal: a new version (sorted too) is then compared with a
    /// merge, without looking up a single unchanged rule.
    sorted: bool,
}

impl ListInfo {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl Change<'_> {
    /// The id of the list the change is to.
    pub fn list_id(&self) -> u8 {
        self.list.id
    }
}

/// A planned change to one list (borrowing the rules it adds).
pub struct Change<'r> {
    list: ListInfo,
    added: Vec<(u32, &'r Rule)>,
    removed: Vec<u32>,
    /// The nodes changed, sorted by key (`None`: removed).
    nodes: Vec<(NameKey, Option<NodeVal>)>,
    /// Nodes whose rules kept aside change (`Some`: two or more).
    multi: Vec<(NameKey, Option<Slots>)>,
    phases: [Vec<(NameKey, Option<NodeRules>)>; 4],
    /// The first-look bits of the nodes the change creates.
    look_adds: Vec<first_look::Probe>,
    depth_counts: Vec<u32>,
    depth_union: [u64; 2],
    depth_final: [u64; 2],
    ids_used: usize,
    pub summary: ChangeSummary,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChangeSummary {
    pub added: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Kernel map entries written.
    pub writes: usize,
}

impl std::fmt::Display for ChangeSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} added, {} removed, {} unchanged, {} map writes", self.added, self.removed, self.unchanged, self.writes)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CheckResult {
    pub name: String,
    /// `blocked`, `allowed` (an allow rule matched) or `passed` (no rule).
    pub verdict: &'static str,
    pub list: Option<String>,
    pub rule: Option<String>,
}

pub struct Engine {
    hash_r: [u64; 2],
    node_capacity: usize,
    rule_capacity: u32,
    nodes: NodeStore,
    /// The rules of the nodes that have more than one.
    multi: KeyMap<Slots>,
    rules: RuleTable,
    free_ids: Vec<u32>,
    lists: Vec<ListInfo>,
    depth_counts: Vec<u32>,
}

/// The engine's node map as the matcher sees it (what the kernel map holds).
pub struct Nodes<'a>(&'a NodeStore);

impl RuleLookup for Nodes<'_> {
    fn lookup(&self, key: &NameKey) -> Option<NodeRules> {
        self.0.get(key).map(|n| n.value)
    }
}

impl Engine {
    /// `rule_capacity` bounds rule ids (`1..rule_capacity`, the hit-counter
    /// array's size); `node_capacity` is the rule map's size.
    pub fn new(hash_r: [u64; 2], node_capacity: usize, rule_capacity: u32) -> Self {
        Engine {
            hash_r,
            node_capacity,
            rule_capacity,
            nodes: NodeStore::default(),
            multi: KeyMap::default(),
            rules: RuleTable::default(),
            free_ids: Vec::new(),
            lists: Vec::new(),
            depth_counts: vec![0; MAX_DEPTH as usize + 1],
        }
    }

    pub fn hash_r(&self) -> [u64; 2] {
        self.hash_r
    }

    pub fn config(&self) -> Config {
        Config { hash_r: self.hash_r, depth_mask: mask_of(&self.depth_counts), ..Config::default() }
    }

    pub fn lists(&self) -> &[ListInfo] {
        &self.lists
    }

    pub fn list(&self, name: &str) -> Option<&ListInfo> {
        self.lists.iter().find(|l| l.name == name)
    }

    /// The node map, for running the shared matcher (or the whole shared
    /// `inspect`) on the host against exactly what the kernel holds.
    pub fn nodes(&self) -> Nodes<'_> {
        Nodes(&self.nodes)
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn rule_count(&self) -> usize {
        self.lists.iter().map(|l| l.ids.len()).sum()
    }

    /// Rule `id` and its list (its text copied: see `rule_view`).
    pub fn rule(&self, id: u32) -> Option<RuleInfo> {
        self.rules.get(id).map(|(list, r)| RuleInfo { list, rule: r.to_rule() })
    }

    /// Rule `id` and its list id, borrowed.
    pub fn rule_view(&self, id: u32) -> Option<(u8, RuleView<'_>)> {
        self.rules.get(id)
    }

    pub fn list_name(&self, id: u8) -> Option<&str> {
        self.lists.iter().find(|l| l.id == id).map(|l| l.name.as_str())
    }

    /// The rules of one list, in the order of their ids.
    pub fn list_rules(&self, name: &str) -> Vec<Rule> {
        self.list(name).map(|l| l.ids.iter().filter_map(|id| self.rules.get(*id).map(|(_, r)| r.to_rule())).collect()).unwrap_or_default()
    }

    /// Every rule with its id and list name.
    pub fn all_rules(&self) -> impl Iterator<Item = (u32, &str, RuleView<'_>)> {
        self.lists.iter().flat_map(move |l| l.ids.iter().filter_map(move |id| self.rules.get(*id).map(|(_, r)| (*id, l.name.as_str(), r))))
    }

    /// The node key of `name`, its depth and its first-look block.
    fn key_of(&self, name: &str) -> (NameKey, u8, u32) {
        let mut buf = CanonBuf::default();
        // Names were validated by `normalize_name`, so this cannot fail.
        let len = dotted_to_canon(name.as_bytes(), 0, name.len(), &mut buf).unwrap_or(0);
        let (key, block) = full_name_probe(&mut buf, len, &self.hash_r).unwrap_or_default();
        // Only the bits under the first look's mask count (`NodeVal`).
        (key, name.bytes().filter(|b| *b == b'.').count() as u8 + 1, block as u32)
    }

    /// The rules on node `key`.
    fn slots_of(&self, key: &NameKey) -> Slots {
        match self.multi.get(key) {
            Some(slots) => slots.clone(),
            None => self.nodes.get(key).and_then(|n| single_slot(n.value)).into_iter().collect(),
        }
    }

    /// Says what the kernel decides for `name`, with the same matcher.
    pub fn check(&self, name: &str) -> Result<CheckResult, PatternError> {
        let name = normalize_name(name)?;
        let mut buf = CanonBuf::default();
        let len = dotted_to_canon(name.as_bytes(), 0, name.len(), &mut buf).map_err(|_| PatternError::Empty)?;
        let decision = match_canon(&mut buf, canon_start(len), &self.config(), &self.nodes());
        let (verdict, r) = match decision {
            Decision::NoMatch => ("passed", None),
            Decision::Allow(r) => ("allowed", Some(r)),
            Decision::Block(r) => ("blocked", Some(r)),
        };
        let info = r.and_then(|r| self.rule_view(r.id()));
        Ok(CheckResult {
            name: name.into(),
            verdict,
            list: info.and_then(|(list, _)| self.list_name(list)).map(str::to_string),
            rule: info.map(|(_, r)| r.to_string()),
        })
    }

    /// Forgets an empty list (emptied by an applied `plan_replace` with no
    /// rules), freeing its id. Returns the id it had.
    pub fn forget_list(&mut self, name: &str) -> Result<Option<u8>, EngineError> {
        match self.lists.iter().position(|l| l.name == name) {
            None => Ok(None),
            Some(i) if !self.lists[i].ids.is_empty() => Err(EngineError::ListNotEmpty(name.to_string())),
            Some(i) => Ok(Some(self.lists.remove(i).id)),
        }
    }

    /// Plans replacing the rules of list `name` (created if new) by `rules`.
    pub fn plan_replace<'r>(&self, name: &str, source: Option<PathBuf>, rules: &'r [Rule]) -> Result<Change<'r>, EngineError> {
        let old = self.list(name);
        let list = match old {
            Some(l) => ListInfo { id: l.id, name: l.name.clone(), source: source.or_else(|| l.source.clone()), ids: Vec::new(), sorted: false },
            None => {
                let used: HashSet<u8> = self.lists.iter().map(|l| l.id).collect();
                let id = (0..MAX_LISTS as u8).find(|i| !used.contains(i)).ok_or(EngineError::TooManyLists)?;
                ListInfo { id, name: name.to_string(), source, ids: Vec::new(), sorted: true }
            }
        };
        let old_ids: &[u32] = old.map_or(&[], |l| &l.ids);
        // Lists come sorted and deduplicated from the parser; anything else
        // is deduplicated here.
        let sorted = rules.windows(2).all(|w| w[0] < w[1]);
        // `new_ids` in the order of `rules`: a kept rule's id, or a place
        // for a fresh one (filled below, in `added_rules` order).
        let mut new_ids = Vec::with_capacity(rules.len());
        let mut added_rules: Vec<&'r Rule> = Vec::new();
        let mut kept = vec![false; self.rules.id_end()];
        let mut kept_count = 0;
        if sorted && old.is_none_or(|l| l.sorted) {
            // Both sorted: one merge says what stays, what comes, what goes.
            let rule_of = |id: u32| self.rules.get(id).map(|(_, r)| r);
            let mut olds = old_ids.iter().copied().peekable();
            for rule in rules {
                while olds.peek().is_some_and(|id| rule_of(*id).is_none_or(|r| r.cmp_rule(rule).is_lt())) {
                    olds.next();
                }
                match olds.peek() {
                    Some(&id) if rule_of(id).is_some_and(|r| r == *rule) => {
                        olds.next();
                        kept[id as usize] = true;
                        kept_count += 1;
                        new_ids.push(id);
                    }
                    _ => {
                        added_rules.push(rule);
                        new_ids.push(FRESH);
                    }
                }
            }
        } else {
            // Per rule: whether the node holds the same rule of this list
            // already; on every core (read-only).
            let existing: Vec<Option<u32>> = rules
                .par_iter()
                .map(|rule| {
                    let (key, _, _) = self.key_of(&rule.name);
                    let slots = self.slots_of(&key);
                    slots.iter().find(|s| s.list == list.id && s.scope == rule.scope && s.action == rule.action).map(|s| s.id)
                })
                .collect();
            let mut seen = HashSet::new();
            for (rule, existing) in rules.iter().zip(existing) {
                if !sorted && !seen.insert(rule) {
                    continue;
                }
                match existing {
                    Some(id) => {
                        kept[id as usize] = true;
                        kept_count += 1;
                        new_ids.push(id);
                    }
                    None => {
                        added_rules.push(rule);
                        new_ids.push(FRESH);
                    }
                }
            }
        }
        let removed: Vec<u32> = old_ids.iter().copied().filter(|id| !kept[*id as usize]).collect();
        drop(kept);

        // Fresh ids: from the free list first, then never-used ones. Ids
        // removed by this change are not reused by it, so no counter is
        // shared between an outgoing and an incoming rule.
        let never_used = (self.rule_capacity as usize).saturating_sub(self.rules.id_end());
        let available = self.free_ids.len() + never_used;
        if added_rules.len() > available {
            return Err(EngineError::RuleCapacity { needed: added_rules.len(), available, capacity: self.rule_capacity });
        }
        let fresh_ids: Vec<u32> = self.free_ids.iter().rev().copied().chain(self.rules.id_end() as u32..).take(added_rules.len()).collect();
        // Every added and removed rule's node, keyed on every core, then
        // sorted so that the rules of one node lie together.
        let mut affected: Vec<Affected> = added_rules
            .par_iter()
            .zip(&fresh_ids)
            .map(|(rule, &id)| {
                let (key, depth, block) = self.key_of(&rule.name);
                Affected { key, block, depth, slot: Some(Slot { id, list: list.id, scope: rule.scope, action: rule.action }) }
            })
            .collect();
        affected.par_extend(removed.par_iter().filter_map(|id| {
            let (_, rule) = self.rules.get(*id)?;
            let (key, depth, block) = self.key_of(rule.name);
            Some(Affected { key, block, depth, slot: None })
        }));
        affected.par_sort_unstable_by(|a, b| a.key.cmp(&b.key));
        // The fresh ids, in place (`added` is in `rules` order too).
        let added: Vec<(u32, &'r Rule)> = fresh_ids.iter().copied().zip(added_rules).collect();
        let mut fresh = fresh_ids.into_iter();
        for id in new_ids.iter_mut().filter(|id| **id == FRESH) {
            *id = fresh.next().unwrap_or_default();
        }
        let ids_used = added.len();
        let mut removed_set = vec![false; self.rules.id_end()];
        for id in &removed {
            removed_set[*id as usize] = true;
        }

        let mut depth_counts = self.depth_counts.clone();
        let mut nodes_after = self.nodes.len() as isize;
        let mut node_updates = Vec::new();
        let mut multi = Vec::new();
        let mut phases: [Vec<(NameKey, Option<NodeRules>)>; 4] = Default::default();
        let mut look_adds = Vec::new();
        let mut olds = self.nodes.cursor();
        for group in affected.chunk_by(|a, b| a.key == b.key) {
            let Affected { key, block, depth, .. } = group[0];
            let old = olds.get(&key);
            let mut slots: Slots = match self.multi.get(&key) {
                Some(slots) => slots.clone(),
                None => old.and_then(|n| single_slot(n.value)).into_iter().collect(),
            };
            slots.retain(|s| !removed_set.get(s.id as usize).copied().unwrap_or(false));
            slots.extend(group.iter().filter_map(|a| a.slot));
            let old_value = old.map(|n| n.value).unwrap_or_default();
            let new_value = value_of(&slots);
            let node = (!slots.is_empty()).then_some(NodeVal { value: new_value, block });
            match (old.is_some(), node.is_some()) {
                (false, true) => {
                    look_adds.push((u64::from(block), key));
                    nodes_after += 1;
                    depth_counts[depth as usize] += 1;
                }
                (true, false) => {
                    nodes_after -= 1;
                    depth_counts[depth as usize] -= 1;
                }
                _ => {}
            }
            if slots.len() > 1 {
                multi.push((key, Some(slots)));
            } else if self.multi.contains_key(&key) {
                multi.push((key, None));
            }
            plan_fields(key, old_value, new_value, &mut phases);
            node_updates.push((key, node));
        }
        drop(affected);
        if nodes_after as usize > self.node_capacity {
            return Err(EngineError::NodeCapacity { needed: nodes_after as usize, capacity: self.node_capacity });
        }
        let old_mask = mask_of(&self.depth_counts);
        let depth_final = mask_of(&depth_counts);
        let writes = phases.iter().map(Vec::len).sum();
        let summary = ChangeSummary { added: added.len(), removed: removed.len(), unchanged: kept_count, writes };
        Ok(Change {
            list: ListInfo { ids: new_ids, sorted, ..list },
            added,
            removed,
            nodes: node_updates,
            multi,
            phases,
            look_adds,
            depth_counts,
            depth_union: [old_mask[0] | depth_final[0], old_mask[1] | depth_final[1]],
            depth_final,
            ids_used,
            summary,
        })
    }

    /// Writes a planned change to `target` and, once all of it is written,
    /// commits it. On a write error the entries written so far are restored
    /// (in reverse order, which keeps the same guarantee) and the engine is
    /// unchanged.
    pub fn apply(&mut self, change: Change<'_>, target: &mut dyn Target) -> anyhow::Result<ChangeSummary> {
        let old_mask = mask_of(&self.depth_counts);
        // How many of each phase's writes may have been done.
        let mut done = [0; 4];
        let result = (|| -> anyhow::Result<()> {
            // Ids never used before have a zero counter already (the rule
            // map and its counters are created with the engine).
            for (id, _) in change.added.iter().filter(|(id, _)| (*id as usize) < self.rules.id_end()) {
                target.reset_hits(*id)?;
            }
            target.write_depth_mask(change.depth_union)?;
            // Before any node is written: a node in the map whose bits are
            // not set would be missed.
            target.look_add(&change.look_adds)?;
            for (phase, done) in change.phases.iter().zip(&mut done) {
                let result = target.write_nodes(phase);
                *done = result.as_ref().err().map_or(phase.len(), |(n, _)| *n);
                result.map_err(|(_, e)| e)?;
            }
            target.write_depth_mask(change.depth_final)
        })();
        if let Err(e) = result {
            // Each write undone in reverse order, back to the value the node
            // had before it: every state passed is one the change passed.
            let mut now: KeyMap<Option<NodeRules>> = KeyMap::default();
            let mut undo = Vec::new();
            for (phase, n) in change.phases.iter().zip(done) {
                for (key, value) in &phase[..n] {
                    let before = now.get(key).copied().unwrap_or_else(|| self.nodes.get(key).map(|n| n.value));
                    undo.push((*key, before));
                    now.insert(*key, *value);
                }
            }
            for (key, before) in undo.iter().rev() {
                if let Err(undo) = target.write_node(key, before.as_ref()) {
                    tracing::error!("restoring the rule map after a failed change: {undo:#}");
                }
            }
            let _ = target.write_depth_mask(old_mask);
            return Err(e);
        }
        let removes_nodes = change.nodes.iter().any(|(_, n)| n.is_none());
        let summary = self.commit(change);
        if removes_nodes {
            // The map holds exactly the committed nodes now. A failure leaves
            // extra bits, which cost lookups but never a verdict.
            let mut probes = self.nodes.iter().map(|(key, n)| (u64::from(n.block), *key));
            if let Err(e) = target.look_rebuild(&mut probes) {
                tracing::warn!("clearing the first look of removed rules: {e:#}");
            }
        }
        Ok(summary)
    }

    fn commit(&mut self, change: Change<'_>) -> ChangeSummary {
        let Change { list, added, removed, nodes, multi, depth_counts, ids_used, summary, phases, look_adds, .. } = change;
        // Freed before the node store is merged (the merge copies it).
        drop((phases, look_adds));
        let fresh_from_free = ids_used.min(self.free_ids.len());
        self.free_ids.truncate(self.free_ids.len() - fresh_from_free);
        for (id, rule) in added {
            self.rules.set(id, list.id, rule);
        }
        for id in removed {
            self.rules.free(id);
            self.free_ids.push(id);
        }
        self.rules.compact_if_wasteful();
        self.nodes.merge(&nodes);
        drop(nodes);
        for (key, slots) in multi {
            match slots {
                Some(s) => self.multi.insert(key, s),
                None => self.multi.remove(&key),
            };
        }
        self.depth_counts = depth_counts;
        if let Some(l) = self.lists.iter_mut().find(|l| l.id == list.id) {
            *l = list;
        } else {
            self.lists.push(list);
            self.lists.sort_by_key(|l| l.id);
        }
        summary
    }
}

/// Whether `new` should take a field held by `cur`: allow beats block, then
/// the lower list id, then the lower rule id.
fn better(new: RuleRef, cur: RuleRef) -> bool {
    if cur.is_none() {
        return true;
    }
    if new.is_allow() != cur.is_allow() {
        return new.is_allow();
    }
    (new.list(), new.id()) < (cur.list(), cur.id())
}

fn value_of(slots: &[Slot]) -> NodeRules {
    let mut v = NodeRules::default();
    for s in slots {
        let r = RuleRef::new(s.id, s.list as u32, s.action == Action::Allow);
        if matches!(s.scope, Scope::Exact | Scope::Subtree) && better(r, v.exact) {
            v.exact = r;
        }
        if matches!(s.scope, Scope::Below | Scope::Subtree) && better(r, v.below) {
            v.below = r;
        }
    }
    v
}

/// The phase (0..4) in which a field moves from `old` to `new`.
fn field_phase(old: RuleRef, new: RuleRef) -> Option<usize> {
    if old == new {
        None
    } else if new.is_allow() {
        Some(0)
    } else if !new.is_none() && !old.is_allow() {
        Some(1)
    } else if new.is_none() && !old.is_allow() {
        Some(2)
    } else {
        Some(3)
    }
}

/// Adds the node's writes to the phases: after each phase the node holds the
/// new value for the fields moved so far and the old value for the others.
fn plan_fields(key: NameKey, old: NodeRules, new: NodeRules, phases: &mut [Vec<(NameKey, Option<NodeRules>)>; 4]) {
    let pe = field_phase(old.exact, new.exact);
    let pb = field_phase(old.below, new.below);
    let mut current = old;
    for (p, phase) in phases.iter_mut().enumerate() {
        let mut next = current;
        if pe == Some(p) {
            next.exact = new.exact;
        }
        if pb == Some(p) {
            next.below = new.below;
        }
        if next != current {
            phase.push((key, if next.is_empty() { None } else { Some(next) }));
            current = next;
        }
    }
}

fn mask_of(counts: &[u32]) -> [u64; 2] {
    let mut c = Config::default();
    for (d, n) in counts.iter().enumerate() {
        if *n > 0 {
            c.add_depth(d as u32);
        }
    }
    c.depth_mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use filter_common::hash::lane_multiplier;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// The kernel's maps, on the host; checks the reload guarantee after
    /// every single write.
    struct Checked<'a> {
        nodes: HashMap<NameKey, NodeRules>,
        cfg: Config,
        probes: &'a [(String, bool, bool)],
        writes: usize,
        /// The first look, as the kernel reads it: two blocks, so that
        /// names share words and bits go stale.
        look: Vec<std::sync::atomic::AtomicU64>,
    }

    /// The rule map behind the first look, as the kernel reads them.
    struct Looked<'a>(&'a HashMap<NameKey, NodeRules>, &'a [std::sync::atomic::AtomicU64]);

    impl RuleLookup for Looked<'_> {
        fn lookup(&self, key: &NameKey) -> Option<NodeRules> {
            self.0.get(key).copied()
        }
        fn may_hold(&self, _: &Config, block: u64, key: &NameKey) -> bool {
            first_look::may_hold(self.1, block, key)
        }
    }

    impl Checked<'_> {
        fn new(cfg: Config) -> Self {
            let look = first_look::host(16);
            Checked { nodes: HashMap::new(), cfg: Config { look_mask: look.len() as u64 - 1, ..cfg }, probes: &[], writes: 0, look }
        }
        fn blocked(&self, name: &str) -> bool {
            let mut buf = CanonBuf::default();
            let len = dotted_to_canon(name.as_bytes(), 0, name.len(), &mut buf).unwrap();
            matches!(match_canon(&mut buf, canon_start(len), &self.cfg, &Looked(&self.nodes, &self.look)), Decision::Block(_))
        }
        fn check(&self) {
            for (name, old, new) in self.probes {
                let now = self.blocked(name);
                assert!(!(*old && *new) || now, "{name} blocked before and after, but let through mid-change");
                assert!(*old || *new || !now, "{name} blocked neither before nor after, but blocked mid-change");
            }
        }
    }

    impl Target for Checked<'_> {
        fn write_node(&mut self, key: &NameKey, value: Option<&NodeRules>) -> anyhow::Result<()> {
            match value {
                Some(v) => self.nodes.insert(*key, *v),
                None => self.nodes.remove(key),
            };
            self.writes += 1;
            self.check();
            Ok(())
        }
        fn write_depth_mask(&mut self, mask: [u64; 2]) -> anyhow::Result<()> {
            self.cfg.depth_mask = mask;
            self.check();
            Ok(())
        }
        fn reset_hits(&mut self, _: u32) -> anyhow::Result<()> {
            Ok(())
        }
        fn look_add(&mut self, probes: &[first_look::Probe]) -> anyhow::Result<()> {
            // One node at a time, checked after each.
            for p in probes {
                first_look::add(&self.look, std::iter::once(*p));
                self.check();
            }
            Ok(())
        }
        fn look_rebuild(&mut self, probes: &mut dyn Iterator<Item = first_look::Probe>) -> anyhow::Result<()> {
            let new = first_look::build(self.look.len(), probes);
            // Checked after every word stored, as a probe may read then.
            first_look::rebuild(&self.look, &new, || self.check());
            Ok(())
        }
    }

    /// The rule semantics, stated directly: allow wins, exact/below/subtree.
    fn reference_blocked(rules: &[Rule], name: &str) -> bool {
        let applies = |r: &Rule| match r.scope {
            Scope::Exact => name == r.name,
            Scope::Below => name.ends_with(&format!(".{}", r.name)),
            Scope::Subtree => name == r.name || name.ends_with(&format!(".{}", r.name)),
        };
        let mut blocked = false;
        for r in rules.iter().filter(|r| applies(r)) {
            if r.action == Action::Allow {
                return false;
            }
            blocked = true;
        }
        blocked
    }

    fn universe() -> Vec<String> {
        let labels = ["a", "b", "c"];
        let mut names: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        for _ in 0..2 {
            let longer: Vec<String> = names.iter().flat_map(|n| labels.iter().map(move |l| format!("{l}.{n}"))).collect();
            names.extend(longer);
        }
        names.sort();
        names.dedup();
        names
    }

    fn random_rules(rng: &mut StdRng, names: &[String], n: usize) -> Vec<Rule> {
        (0..n)
            .map(|_| Rule {
                action: if rng.random_ratio(1, 4) { Action::Allow } else { Action::Block },
                scope: [Scope::Exact, Scope::Below, Scope::Subtree][rng.random_range(0..3)],
                name: names[rng.random_range(0..names.len())].as_str().into(),
            })
            .collect()
    }

    #[test]
    fn every_intermediate_state_keeps_the_reload_guarantee_and_matches_the_reference() {
        let names = universe();
        let mut rng = StdRng::seed_from_u64(7);
        for round in 0..300 {
            let r = [lane_multiplier(rng.random()), lane_multiplier(rng.random())];
            let mut engine = Engine::new(r, 1 << 16, 1 << 16);
            let (n_other, n_old, n_new) = (rng.random_range(0..6), rng.random_range(0..12), rng.random_range(0..12));
            let other = random_rules(&mut rng, &names, n_other);
            let mut old = random_rules(&mut rng, &names, n_old);
            let mut new = random_rules(&mut rng, &names, n_new);
            if round % 2 == 0 {
                // As the parser gives them: the engine then merges the two
                // versions instead of looking every rule up.
                for rules in [&mut old, &mut new] {
                    rules.sort();
                    rules.dedup();
                }
            }
            let all_old: Vec<Rule> = other.iter().chain(&old).cloned().collect();
            let all_new: Vec<Rule> = other.iter().chain(&new).cloned().collect();
            let probes: Vec<(String, bool, bool)> = names.iter().map(|n| (n.clone(), reference_blocked(&all_old, n), reference_blocked(&all_new, n))).collect();
            let mut target = Checked::new(Config { hash_r: r, ..Config::default() });
            let c = engine.plan_replace("other", None, &other).unwrap();
            engine.apply(c, &mut target).unwrap();
            let c = engine.plan_replace("list", None, &old).unwrap();
            engine.apply(c, &mut target).unwrap();
            for (name, before, _) in &probes {
                assert_eq!(target.blocked(name), *before, "round {round}: {name} with {all_old:?}");
                assert_eq!(engine.check(name).unwrap().verdict == "blocked", *before);
            }
            target.probes = &probes;
            let c = engine.plan_replace("list", None, &new).unwrap();
            engine.apply(c, &mut target).unwrap();
            for (name, _, after) in &probes {
                assert_eq!(target.blocked(name), *after, "round {round}: {name} with {all_new:?}");
            }
            assert_eq!(target.nodes.len(), engine.node_count());
            // Nothing but the nodes in the map is left in the first look.
            let words: Vec<u64> = target.look.iter().map(|w| w.load(std::sync::atomic::Ordering::Relaxed)).collect();
            assert_eq!(words, first_look::build(words.len(), engine.nodes.iter().map(|(k, n)| (u64::from(n.block), *k))), "round {round}");
        }
    }

    #[test]
    fn unchanged_rules_keep_their_ids_and_cost_no_writes() {
        let mut engine = Engine::new([lane_multiplier(1), lane_multiplier(2)], 1000, 1000);
        let mut t = Checked::new(Config::default());
        let rules: Vec<Rule> = ["t.me", "*.telegram.org", "allow core.telegram.org"].iter().map(|s| Rule::parse(s).unwrap()).collect();
        let c = engine.plan_replace("l", None, &rules).unwrap();
        assert_eq!(c.summary.added, 3);
        engine.apply(c, &mut t).unwrap();
        let ids: Vec<u32> = engine.all_rules().map(|(id, _, _)| id).collect();
        let c = engine.plan_replace("l", None, &rules).unwrap();
        assert_eq!((c.summary.added, c.summary.removed, c.summary.unchanged, c.summary.writes), (0, 0, 3, 0));
        engine.apply(c, &mut t).unwrap();
        assert_eq!(engine.all_rules().map(|(id, _, _)| id).collect::<Vec<_>>(), ids);
        let check = engine.check("WEB.telegram.org.").unwrap();
        assert_eq!((check.verdict, check.rule.as_deref(), check.list.as_deref()), ("blocked", Some("*.telegram.org"), Some("l")));
        assert_eq!(engine.check("core.telegram.org").unwrap().verdict, "allowed");
        assert_eq!(engine.check("telegram.org").unwrap().verdict, "passed");
        assert_eq!(engine.check("nottelegram.org").unwrap().verdict, "passed");
    }

    #[test]
    fn capacity_is_checked_before_anything_changes() {
        let mut engine = Engine::new([lane_multiplier(1), lane_multiplier(2)], 2, 100);
        let mut t = Checked::new(Config::default());
        let rules: Vec<Rule> = ["a.x", "b.x", "c.x"].iter().map(|s| Rule::parse(s).unwrap()).collect();
        assert!(matches!(engine.plan_replace("l", None, &rules), Err(EngineError::NodeCapacity { needed: 3, capacity: 2 })));
        assert_eq!(t.writes, 0);
        let c = engine.plan_replace("l", None, &rules[..2]).unwrap();
        engine.apply(c, &mut t).unwrap();
        let mut engine = Engine::new([lane_multiplier(1), lane_multiplier(2)], 100, 3);
        assert!(matches!(engine.plan_replace("l", None, &rules), Err(EngineError::RuleCapacity { needed: 3, available: 2, .. })));
        let c = engine.plan_replace("l", None, &rules[..2]).unwrap();
        engine.apply(c, &mut t).unwrap();
        // Replacing both rules needs two fresh ids while the old ones are live.
        let other: Vec<Rule> = ["d.x", "e.x"].iter().map(|s| Rule::parse(s).unwrap()).collect();
        assert!(matches!(engine.plan_replace("l", None, &other), Err(EngineError::RuleCapacity { .. })));
        assert!(matches!(engine.plan_replace("l", None, &other[..1]), Err(EngineError::RuleCapacity { .. })));
    }

    #[test]
    fn failed_writes_are_rolled_back() {
        struct Failing {
            inner: HashMap<NameKey, NodeRules>,
            /// Writes that succeed before the one that fails (once).
            fail_after: Option<usize>,
        }
        impl Target for Failing {
            fn write_node(&mut self, key: &NameKey, value: Option<&NodeRules>) -> anyhow::Result<()> {
                match self.fail_after {
                    Some(0) => {
                        self.fail_after = None;
                        anyhow::bail!("map full");
                    }
                    Some(n) => self.fail_after = Some(n - 1),
                    None => {}
                }
                match value {
                    Some(v) => self.inner.insert(*key, *v),
                    None => self.inner.remove(key),
                };
                Ok(())
            }
            fn write_depth_mask(&mut self, _: [u64; 2]) -> anyhow::Result<()> {
                Ok(())
            }
            fn reset_hits(&mut self, _: u32) -> anyhow::Result<()> {
                Ok(())
            }
        }
        let mut engine = Engine::new([lane_multiplier(3), lane_multiplier(4)], 100, 100);
        let mut t = Failing { inner: HashMap::new(), fail_after: None };
        let first: Vec<Rule> = ["a.x", "b.x"].iter().map(|s| Rule::parse(s).unwrap()).collect();
        let c = engine.plan_replace("l", None, &first).unwrap();
        engine.apply(c, &mut t).unwrap();
        let before = t.inner.clone();
        let second: Vec<Rule> = ["c.x", "d.x", "e.x", "f.x"].iter().map(|s| Rule::parse(s).unwrap()).collect();
        let c = engine.plan_replace("l", None, &second).unwrap();
        t.fail_after = Some(3);
        assert!(engine.apply(c, &mut t).is_err());
        assert_eq!(t.inner, before);
        assert_eq!(engine.list_rules("l").len(), 2);
        assert_eq!(engine.check("a.x").unwrap().verdict, "blocked");
    }
}
