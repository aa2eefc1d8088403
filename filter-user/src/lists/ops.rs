//! The daemon's side of named lists: add, update (now or on schedule),
//! roll back, remove, list. A source is fetched without holding the daemon's
//! lock (a slow server never stalls the control socket or /metrics); the new
//! version is then parsed and swapped in under it. Every swap goes through
//! the engine's ordered writes, so at no moment is a name in both versions
//! let through or a name in neither blocked; a version is recorded on disk
//! only once it is in force.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use anyhow::{Context as _, anyhow, bail};
use serde_json::json;

use super::{
    ListDef, Registry, Version,
    fetch::{FetchError, Fetched, check_hash, fetch},
    registry::now,
};
use crate::{
    control::Response,
    daemon::{Shared, State, lock},
    policy::{ListPolicy, ListSettings, Setting},
    rules::{
        LOCAL_LIST, Rule,
        formats::{Parsed, parse_list},
        shrink::ShrinkRefused,
    },
};

/// One update of a list at a time (two must not interleave), each list on
/// its own: a download that hangs holds up its own list only, never another
/// list's update, `rules` or a reload.
static UPDATES: std::sync::Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>> = std::sync::Mutex::new(BTreeMap::new());

fn update_lock(name: &str) -> Arc<tokio::sync::Mutex<()>> {
    UPDATES.lock().unwrap_or_else(|e| e.into_inner()).entry(name.to_string()).or_default().clone()
}

/// What to fetch: a new list, or a new version of one (`force`: even if
/// it takes away more of the list than its `--max-shrink` allows; a
/// scheduled refresh never forces).
pub enum Update {
    Add(ListDef),
    Refresh { name: String, force: bool },
}

impl Update {
    /// The list it is to.
    pub fn list(&self) -> &str {
        match self {
            Update::Add(def) => &def.name,
            Update::Refresh { name, .. } => name,
        }
    }
}

/// What a fetch brought, and how to take it.
struct Download {
    /// The version in force when the fetch began.
    current: Option<Version>,
    fetched: Result<Fetched, FetchError>,
    started: Instant,
    /// Even if it takes away more of the list than `--max-shrink` allows.
    force: bool,
}

/// A list's copy on disk, parsed with the list's format.
fn parse_copy(registry: &Registry, def: &ListDef, v: &Version) -> anyhow::Result<Parsed> {
    let bytes = registry.read_copy(&def.name, v)?;
    parse_list(&def.source, &bytes, def.format, def.bad_lines()).map_err(|e| anyhow!("list {}: {}", def.name, e.report()))
}

/// Every named list's version in force, parsed (for the start: any error
/// refuses it, as a bad rule file does).
pub fn load_all(registry: &Registry) -> anyhow::Result<Vec<(ListDef, Vec<Rule>)>> {
    registry
        .entries()
        .map(|e| {
            let v = e.active_version().ok_or_else(|| anyhow!("list {}: the registry names no version in force", e.def.name))?;
            Ok((e.def.clone(), parse_copy(registry, &e.def, v)?.rules))
        })
        .collect()
}

impl State {
    /// The policy of list `name`: a named list's own settings first, then
    /// `run`'s flags (`DnsPolicy::resolve` decides).
    pub(crate) fn list_policy(&self, name: &str) -> ListPolicy {
        self.dns.resolve(name, self.registry.get(name).map(|e| e.def.settings).unwrap_or_default())
    }

    fn named_policy(&self, def: &ListDef) -> ListPolicy {
        self.dns.resolve(&def.name, def.settings)
    }

    /// Whether `name` is taken by the local list or a rule file.
    fn is_static_list(&self, name: &str) -> bool {
        name == LOCAL_LIST || self.files.iter().any(|(n, _)| n == name)
    }

    /// Checks a request before anything is fetched; returns the definition
    /// and the version in force (for a conditional GET).
    fn begin(&self, update: &Update) -> anyhow::Result<(ListDef, Option<Version>)> {
        match update {
            Update::Add(def) => {
                def.validate().map_err(|e| anyhow!(e))?;
                if self.is_static_list(&def.name) {
                    bail!(
                        "list {} is {}; choose another name",
                        def.name,
                        if def.name == LOCAL_LIST { "the CLI's own list" } else { "fed by a rule file (--rules)" }
                    );
                }
                if self.registry.get(&def.name).is_some() {
                    bail!("list {} exists; `blokir lists update {}` fetches it again, `lists rm` removes it", def.name, def.name);
                }
                Ok((def.clone(), None))
            }
            Update::Refresh { name, .. } => {
                let Some(entry) = self.registry.get(name) else { bail!("no list {name} (see `blokir lists ls`)") };
                Ok((entry.def.clone(), entry.active_version().cloned()))
            }
        }
    }

    /// Puts a fetched version in force, or says why not (the rules in force
    /// stay as they are).
    fn finish(&mut self, def: ListDef, download: Download) -> anyhow::Result<Response> {
        let name = def.name.clone();
        // `lists set` may have changed the list's settings during the fetch.
        let def = self.registry.get(&name).map_or(def, |e| e.def.clone());
        let failures = self.list_status.get(&name).map_or(0, |s| s.failures);
        let result = self.put_in_force(def, download);
        if let Err(e) = &result {
            if self.registry.get(&name).is_some() {
                self.registry.checked(&name, Some(format!("{e:#}")))?;
                // Unless the swap itself failed (and counted it), count it.
                let status = self.list_status.entry(name).or_default();
                if status.failures == failures {
                    status.failed();
                }
                if e.downcast_ref::<ShrinkRefused>().is_some() {
                    status.shrinks_refused += 1;
                }
            } else {
                // A list that was never added has no status to keep.
                self.list_status.remove(&name);
            }
        }
        result
    }

    /// The list's status on /metrics: checked now, with version `number`
    /// in force (the registry's numbering, not a count of changes).
    pub(crate) fn note_version(&mut self, name: &str, number: u64) {
        let status = self.list_status.entry(name.to_string()).or_default();
        status.updated(false);
        status.version = number;
    }

    fn put_in_force(&mut self, def: ListDef, download: Download) -> anyhow::Result<Response> {
        let Download { current, fetched, started, force } = download;
        let name = def.name.clone();
        let (bytes, etag, last_modified) = match fetched? {
            Fetched::NotModified => {
                self.registry.checked(&name, None)?;
                let v = current.map_or(0, |v| v.number);
                self.note_version(&name, v);
                return Ok(Response::ok(
                    format!("list {name}: not modified (HTTP 304), version {v} stays in force"),
                    json!({"list": name, "version": v, "changed": false}),
                ));
            }
            Fetched::Body { bytes, etag, last_modified } => (bytes, etag, last_modified),
        };
        let fetch_ms = started.elapsed().as_secs_f64() * 1000.0;
        let sha256 = check_hash(&def.source, &bytes, def.sha256.as_deref())?;
        if let Some(v) = current.as_ref().filter(|v| v.sha256 == sha256) {
            self.registry.checked(&name, None)?;
            self.note_version(&name, v.number);
            return Ok(Response::ok(
                format!("list {name}: unchanged, version {} stays in force", v.number),
                json!({"list": name, "version": v.number, "changed": false}),
            ));
        }
        let parse_started = Instant::now();
        let parsed = parse_list(&def.source, &bytes, def.format, def.bad_lines()).map_err(|e| anyhow!("list {name}: {}", e.report()))?;
        let parse_ms = parse_started.elapsed().as_secs_f64() * 1000.0;
        if let Some(report) = parsed.skip_report() {
            tracing::warn!(list = name, "{report}");
        }
        let in_force = self.engine.list(&name).map_or(0, |l| l.len());
        if !force && let Err(shrunk) = def.max_shrink.unwrap_or(self.max_shrink).check(in_force, parsed.rules.len()) {
            return Err(shrunk.refusal(&name, &format!("blokir lists update {name} --force")).into());
        }
        let version = Version {
            number: 0,
            sha256,
            rules: parsed.rules.len(),
            skipped: parsed.skipped,
            format: parsed.format.as_str().into(),
            fetched_at: now(),
            etag,
            last_modified,
        };
        let old_rules: Vec<Rule> = self.engine.list_rules(&name);
        let existed = self.registry.get(&name).is_some();
        let summary = self.replace_list(&name, None, &parsed.rules, self.named_policy(&def))?;
        let number = match self.registry.put_version(&def, &bytes, version) {
            Ok(n) => n,
            Err(e) => {
                // Not on disk, so not in force either: a restart would not have it.
                let restore = match existed {
                    true => self.replace_list(&name, None, &old_rules, self.named_policy(&def)).map(drop),
                    false => self.drop_list(&name),
                };
                if let Err(r) = restore {
                    tracing::error!(list = name, "restoring the rules in force after a failed save: {r:#}");
                }
                return Err(e.context(format!("list {name}: saving the new version")));
            }
        };
        self.note_version(&name, number);
        let skipped = if parsed.skipped > 0 { format!(", {} bad lines skipped", parsed.skipped) } else { String::new() };
        Ok(Response::ok(
            format!(
                "list {name}: version {number} in force, {} rules ({summary}){skipped}; fetched in {fetch_ms:.0} ms, parsed in {parse_ms:.0} ms",
                parsed.rules.len()
            ),
            json!({"list": name, "version": number, "changed": true, "rules": parsed.rules.len(), "skipped": parsed.skipped, "fetch_ms": fetch_ms, "parse_ms": parse_ms}),
        ))
    }

    /// Removes a list's rules from the kernel and forgets the list.
    fn drop_list(&mut self, name: &str) -> anyhow::Result<()> {
        if self.engine.list(name).is_some() {
            self.replace_list(name, None, &[], self.list_policy(name))?;
            self.engine.forget_list(name)?;
        }
        Ok(())
    }

    /// Refuses a name that is not a named list, saying what it is.
    fn named(&self, name: &str) -> anyhow::Result<&super::registry::Entry> {
        match self.registry.get(name) {
            Some(e) => Ok(e),
            None if self.is_static_list(name) => bail!("list {name} is not a named list (it is the CLI's list or fed by --rules)"),
            None => bail!("no list {name} (see `blokir lists ls`)"),
        }
    }

    pub(crate) fn lists_rm(&mut self, name: &str) -> anyhow::Result<Response> {
        self.named(name)?;
        let rules = self.engine.list(name).map_or(0, |l| l.len());
        // Disk first: a list the state dir still holds stays enforced, so
        // the kernel and the next start always agree.
        let entry = self.registry.remove(name).with_context(|| format!("list {name} stays in force"))?;
        if let Err(e) = self.drop_list(name) {
            if let Some(entry) = entry {
                self.registry.restore(entry).with_context(|| format!("list {name}: lifting it failed ({e:#}), and so did keeping it on disk"))?;
            }
            return Err(e.context(format!("list {name} stays in force")));
        }
        self.registry.remove_copies(name);
        self.list_status.remove(name);
        Ok(Response::ok(format!("list {name} removed ({rules} rules)"), json!({"list": name, "removed": rules})))
    }

    /// Puts the version before the one in force (or version `to`) back in
    /// force, from its copy on disk.
    pub(crate) fn lists_rollback(&mut self, name: &str, to: Option<u64>) -> anyhow::Result<Response> {
        let Some(entry) = self.registry.get(name).cloned() else { bail!("no list {name} (see `blokir lists ls`)") };
        let target = match to {
            Some(n) => entry.versions.iter().find(|v| v.number == n).ok_or_else(|| {
                let kept: Vec<String> = entry.versions.iter().map(|v| v.number.to_string()).collect();
                anyhow!("list {name} has no version {n} on disk (kept: {})", kept.join(", "))
            })?,
            None => entry.previous_version().ok_or_else(|| anyhow!("list {name}: no version before {} is kept", entry.active))?,
        }
        .clone();
        if target.number == entry.active {
            bail!("list {name}: version {} is already in force", target.number);
        }
        let started = Instant::now();
        let parsed = parse_copy(&self.registry, &entry.def, &target)?;
        let summary = self.replace_list(name, None, &parsed.rules, self.named_policy(&entry.def))?;
        self.registry.set_active(name, target.number)?;
        self.note_version(name, target.number);
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(Response::ok(
            format!("list {name}: version {} back in force (was {}), {} rules ({summary}) in {ms:.0} ms", target.number, entry.active, parsed.rules.len()),
            json!({"list": name, "version": target.number, "was": entry.active, "rules": parsed.rules.len(), "ms": ms}),
        ))
    }

    /// Changes a named list's own settings (`clear`ed ones go back to
    /// `run`'s flags): the kernel's word for the list first (in force for the
    /// next packet), then `lists.json`; the word is put back if the registry
    /// cannot be saved. Nothing is fetched.
    pub(crate) fn lists_set(&mut self, name: &str, change: ListSettings, clear: &[Setting]) -> anyhow::Result<Response> {
        if change == ListSettings::default() && clear.is_empty() {
            bail!("list {name}: nothing to change (give --action, --tcp-action, --ech-outer or --clear)");
        }
        if let Some(s) = clear.iter().find(|s| change.gives(**s)) {
            bail!("list {name}: --{0} and --clear {0} contradict each other", s.name());
        }
        let def = self.named(name)?.def.clone();
        let settings = def.settings.without(clear).with(change);
        let (old, new) = (self.named_policy(&def), self.dns.resolve(name, settings));
        let id = self.engine.list(name).map(|l| l.id);
        if let Some(id) = id {
            self.kernel.write_list_policy(id, new.dns, new.tcp, new.ech_outer)?;
        }
        if let Err(e) = self.registry.set_settings(name, settings) {
            if let Some(id) = id
                && let Err(r) = self.kernel.write_list_policy(id, old.dns, old.tcp, old.ech_outer)
            {
                tracing::error!(list = name, "restoring the list's policy after a failed save: {r:#}");
            }
            return Err(e.context(format!("list {name}: saving its settings")));
        }
        tracing::info!(list = name, dns_action = new.dns.name(), tcp_action = new.tcp.name(), ech_outer = new.ech_outer, "list settings changed");
        Ok(Response::ok(
            format!(
                "list {name}: DNS action {}, TCP action {}, ECH-outer {} (in force now)",
                new.dns.name(),
                new.tcp.name(),
                if new.ech_outer { "yes" } else { "no" }
            ),
            json!({"list": name, "dns_action": new.dns.name(), "tcp_action": new.tcp.name(), "ech_outer": new.ech_outer}),
        ))
    }

    pub(crate) fn lists_ls(&self) -> Response {
        let rows: Vec<_> = self
            .registry
            .entries()
            .map(|e| {
                let v = e.active_version();
                let policy = self.named_policy(&e.def);
                json!({
                    "name": e.def.name,
                    "source": e.def.source,
                    "format": e.def.format.as_str(),
                    "read_as": v.map(|v| v.format.as_str()),
                    "dns_action": policy.dns.name(),
                    "tcp_action": policy.tcp.name(),
                    "ech_outer": policy.ech_outer,
                    // What the list sets itself (null: `run`'s flags decide).
                    "own": e.def.settings,
                    "refresh_secs": e.def.refresh_secs,
                    "sha256": e.def.sha256,
                    // The list's own --max-shrink, in percent (null: run's).
                    "max_shrink": e.def.max_shrink,
                    "version": e.active,
                    "versions": e.versions.iter().map(|v| v.number).collect::<Vec<_>>(),
                    "rules": self.engine.list(&e.def.name).map_or(0, |l| l.len()),
                    "skipped": v.map_or(0, |v| v.skipped),
                    "fetched_at": v.map(|v| v.fetched_at),
                    "last_check": e.last_check,
                    "last_error": e.last_error,
                })
            })
            .collect();
        Response::ok(format!("{} named lists", rows.len()), json!(rows))
    }

    /// Lists whose refresh interval has passed since their last check.
    fn due(&self) -> Vec<String> {
        let t = now();
        self.registry
            .entries()
            .filter(|e| e.def.refresh_secs.is_some_and(|r| e.last_check.is_none_or(|c| t >= c.saturating_add(r))))
            .map(|e| e.def.name.clone())
            .collect()
    }
}

/// Fetches (unlocked) and puts in force (locked) a new list or version.
pub async fn update(shared: &Shared, update: Update) -> Response {
    let list = update_lock(update.list());
    let force = matches!(update, Update::Refresh { force: true, .. });
    let _one_at_a_time = list.lock().await;
    let started = Instant::now();
    // The daemon's lock may be held by a swap for seconds: taken off the
    // runtime's workers (as everywhere in async code), which serve /metrics.
    let (begun, timeouts) = tokio::task::block_in_place(|| {
        let state = lock(shared);
        (state.begin(&update), state.fetch_timeouts)
    });
    let (def, current) = match begun {
        Ok(x) => x,
        Err(e) => return Response::error(format!("{e:#}")),
    };
    let (source, validators) = (def.source.clone(), current.clone());
    let fetched = match tokio::task::spawn_blocking(move || fetch(&source, validators.as_ref(), timeouts)).await {
        Ok(f) => f,
        Err(e) => return Response::error(format!("fetching: {e}")),
    };
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let mut state = lock(&shared);
        let response = state.finish(def, Download { current, fetched, started, force });
        state.publish();
        response
    })
    .await
    .context("applying")
    .and_then(|r| r)
    .unwrap_or_else(|e| Response::error(format!("{e:#}")))
}

/// Checks each list with a refresh interval when it is due; failures are
/// logged and recorded (`lists ls`), and the version in force stays.
pub async fn refresh_loop(shared: Shared) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let due = tokio::task::block_in_place(|| lock(&shared).due());
        for name in due {
            // Each list on its own task: a hanging server delays only its
            // list, which is not queued again while its check runs.
            if update_lock(&name).try_lock().is_err() {
                continue;
            }
            let shared = shared.clone();
            tokio::spawn(async move {
                let r = update(&shared, Update::Refresh { name: name.clone(), force: false }).await;
                if r.ok {
                    tracing::info!(list = name, "{}", r.message);
                } else {
                    tracing::warn!(list = name, "refresh failed, the version in force stays: {}", r.message);
                }
            });
        }
    }
}
