//! `blokir run`: loads the program and the rules, switches the pinned XDP
//! links to it, serves the control socket and /metrics, and on SIGINT/SIGTERM
//! leaves the program attached, detaches it, or removes every pin, as told.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use filter_common::{hash::lane_multiplier, rules::MAX_RULE_ID};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};

use crate::socket::SocketFile;
use crate::{
    control::{MAX_REQUEST, Request, Response},
    ebpf::{Kernel, Mode},
    events::{self, EventLog, Events},
    lists::{self, Registry, ops::Update},
    metrics,
    pin::{PinDir, PinLock, mode_name},
    policy::{DnsPolicy, ListPolicy, TrafficPolicy},
    rules::{Engine, LOCAL_LIST, Rule, engine::ChangeSummary, file::read_rules, shrink::MaxShrink, store::Store},
};

pub struct Options {
    pub ifaces: Vec<String>,
    pub mode: Mode,
    pub rule_files: Vec<PathBuf>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub metrics: metrics::Endpoint,
    pub capacity: u32,
    pub top_rules: usize,
    pub dns: DnsPolicy,
    /// The opt-in event log of blocked names.
    pub events: Option<EventLog>,
    pub pin_dir: PathBuf,
    pub on_exit: OnExit,
    pub traffic: TrafficPolicy,
    /// How long list servers may take.
    pub fetch_timeouts: crate::lists::fetch::Timeouts,
    /// How much of a list one update may take away unless forced.
    pub max_shrink: MaxShrink,
}

/// What a clean stop (SIGINT/SIGTERM) does with the program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    /// Leave it attached and pinned: filtering goes on with the last rules.
    #[default]
    Keep,
    /// Detach it (remove the pinned links); keep the pinned maps.
    Detach,
    /// Detach it and remove everything pinned under the pin directory.
    Cleanup,
}

/// Everything the control socket and the metrics endpoint act on.
pub struct State {
    pub engine: Engine,
    pub kernel: Kernel,
    store: Store,
    /// Rule files and the list each one feeds.
    pub(crate) files: Vec<(String, PathBuf)>,
    pub top_rules: usize,
    pub(crate) dns: DnsPolicy,
    pins: PinDir,
    on_exit: OnExit,
    /// Named lists (`blokir lists`).
    pub(crate) registry: Registry,
    /// Freshness of each list, by name (for /metrics and alerts).
    pub list_status: BTreeMap<String, ListStatus>,
    pub(crate) fetch_timeouts: crate::lists::fetch::Timeouts,
    pub(crate) max_shrink: MaxShrink,
    /// Where /metrics finds the figures it serves during a change.
    published: metrics::Published,
}

/// Bookkeeping of one list's updates. Every source of a list's rules (a
/// rule file on reload, the CLI's edits, later a URL fetch) records each
/// attempt here: `updated` after the new rules are in force, `failed` when
/// they were refused (the rules in force stay as they were).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListStatus {
    /// 1 after the first load; incremented by each update that changed rules.
    pub version: u64,
    /// When the list was last read and applied successfully, changed or not.
    pub last_update: Option<SystemTime>,
    /// Updates refused (unreadable or bad file, capacity, a kernel write).
    pub failures: u64,
    pub last_failure: Option<SystemTime>,
    /// Of those, updates refused for taking away more than `--max-shrink`
    /// of the list.
    pub shrinks_refused: u64,
}

impl ListStatus {
    pub fn updated(&mut self, changed: bool) {
        if changed || self.version == 0 {
            self.version += 1;
        }
        self.last_update = Some(SystemTime::now());
    }

    pub fn failed(&mut self) {
        self.failures += 1;
        self.last_failure = Some(SystemTime::now());
    }
}

pub type Shared = Arc<Mutex<State>>;

/// The daemon's lock. A list swap holds it for seconds: async code takes it
/// only inside `spawn_blocking` or `block_in_place`, never on a runtime
/// worker directly (a worker blocked on it starves the tasks queued on that
/// worker, /metrics answers among them).
pub fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves the engine as consistent as any
    // single change leaves it; keep serving.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Has every allocation of 1 MiB or more mapped on its own, and unmapped
/// when freed. glibc otherwise raises that threshold to the largest block
/// freed so far (up to 32 MiB), after which a swap's big buffers come from
/// the heap and stay in the RSS (180 -> 290 MiB after a 2M-rule swap).
fn map_big_allocations() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets the allocator's parameter.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Hands the heap's free pages back to the system. Loading or swapping a
/// 2M-rule list frees hundreds of MiB of parse and plan buffers, most of
/// them in small blocks that glibc keeps for reuse (counted in the RSS)
/// unless asked to return them.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What loading a program pins: the maps (in this layout's directory) and
/// the programs' stages.
fn load_pins(pins: &PinDir) -> std::collections::BTreeSet<PathBuf> {
    [pins.maps_dir(), pins.stages_dir()].iter().flat_map(std::fs::read_dir).flatten().flatten().map(|e| e.path()).collect()
}

/// The list a rule file feeds: its file name without extension.
pub fn list_name(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

impl State {
    /// Loads the program, reads every rule file and the local list (any bad
    /// line refuses the start), and fills the maps. Nothing is attached yet:
    /// a program left by an earlier daemon keeps running meanwhile.
    pub fn new(opts: &Options, pins: &PinDir) -> anyhow::Result<Self> {
        let Options { rule_files, state_dir, capacity, top_rules, dns, .. } = opts;
        let (capacity, top_rules) = (*capacity, *top_rules);
        if !(2..=MAX_RULE_ID).contains(&capacity) {
            bail!("rule capacity must be between 2 and {MAX_RULE_ID}");
        }
        let mut files = Vec::new();
        for path in rule_files {
            let name = list_name(path);
            if name == LOCAL_LIST || files.iter().any(|(n, _)| *n == name) {
                bail!("{}: list name {name:?} is already used; rename the file", path.display());
            }
            files.push((name, path.clone()));
        }
        let store = Store::open(state_dir)?;
        let registry = Registry::open(state_dir)?;
        if let Some(e) = registry.entries().find(|e| e.def.name == LOCAL_LIST || files.iter().any(|(n, _)| *n == e.def.name)) {
            bail!("list {} is both a named list (`blokir lists`) and a rule file's; rename the file or remove the named list", e.def.name);
        }
        let list_names: Vec<&str> =
            std::iter::once(LOCAL_LIST).chain(files.iter().map(|(n, _)| n.as_str())).chain(registry.entries().map(|e| e.def.name.as_str())).collect();
        dns.validate(&list_names)?;

        // The lists are read and parsed (on every core) while the kernel
        // verifies the program (seconds, on one core). Nothing is attached
        // before both are done, and a bad line still refuses the start,
        // pinning nothing: the maps and stages the load pinned are unpinned.
        let pinned_before = load_pins(pins);
        let (parsed, local, named, mut kernel) = std::thread::scope(|s| {
            let reading = s.spawn(|| -> anyhow::Result<_> {
                let parsed = files.iter().map(|(_, p)| read_rules(p).map_err(|e| anyhow::anyhow!(e.report()))).collect::<anyhow::Result<Vec<_>>>()?;
                let local = store.load_local().map_err(|e| anyhow::anyhow!(e.report()))?;
                let named = lists::ops::load_all(&registry)?;
                Ok((parsed, local, named))
            });
            let kernel = Kernel::load_pinned(capacity, pins, &list_names);
            let read = reading.join().map_err(|_| anyhow::anyhow!("reading the lists panicked")).and_then(|r| r);
            match read {
                Ok((parsed, local, named)) => anyhow::Ok((parsed, local, named, kernel?)),
                Err(e) => {
                    drop(kernel);
                    for path in load_pins(pins).difference(&pinned_before) {
                        let _ = std::fs::remove_file(path);
                    }
                    Err(e)
                }
            }
        })?;
        if !kernel.adopted_maps().is_empty() {
            tracing::info!(maps = ?kernel.adopted_maps(), "reusing the pinned state of the previous program");
        }
        let hash_r = [lane_multiplier(rand::random()), lane_multiplier(rand::random())];
        let engine = Engine::new(hash_r, capacity as usize, capacity);
        let mut cfg = engine.config();
        dns.apply_to(&mut cfg);
        cfg.event_sample = opts.events.map_or(0, |e| e.sample);
        opts.traffic.apply_to(&mut cfg)?;
        kernel.write_config(cfg)?;
        let mut state = State {
            engine,
            kernel,
            store,
            files,
            top_rules,
            dns: dns.clone(),
            pins: pins.clone(),
            on_exit: opts.on_exit,
            registry,
            list_status: BTreeMap::new(),
            fetch_timeouts: opts.fetch_timeouts,
            max_shrink: opts.max_shrink,
            published: metrics::Published::default(),
        };
        state.replace_list_told(LOCAL_LIST, None, &local)?;
        for ((name, path), rules) in state.files.clone().iter().zip(parsed) {
            state.replace_list_told(name, Some(path.clone()), &rules)?;
        }
        for (def, rules) in named {
            state.replace_list_told(&def.name, None, &rules)?;
            let active = state.registry.get(&def.name).map_or(0, |e| e.active);
            state.note_version(&def.name, active);
        }
        Ok(state)
    }

    /// Makes `rules` list `name`'s rules, with the list's policy (DNS and
    /// TCP actions, ECH-outer flag); the list's status records the update,
    /// or its failure.
    pub(crate) fn replace_list(&mut self, name: &str, source: Option<PathBuf>, rules: &[Rule], policy: ListPolicy) -> anyhow::Result<ChangeSummary> {
        let started = Instant::now();
        let result = apply_list(&mut self.engine, &mut self.kernel, policy, name, source, rules);
        let status = self.list_status.entry(name.to_string()).or_default();
        match &result {
            Ok(s) => status.updated(s.added + s.removed > 0),
            Err(_) => status.failed(),
        }
        let s = result?;
        tracing::info!(
            list = name,
            added = s.added,
            removed = s.removed,
            unchanged = s.unchanged,
            writes = s.writes,
            ms = started.elapsed().as_millis() as u64,
            "rules applied"
        );
        Ok(s)
    }

    /// `replace_list`, for a person: what changed and how long it took.
    fn replace_list_told(&mut self, name: &str, source: Option<PathBuf>, rules: &[Rule]) -> anyhow::Result<String> {
        let started = Instant::now();
        let s = self.replace_list(name, source, rules, self.list_policy(name))?;
        Ok(format!("list {name}: {s} ({:.1} ms)", started.elapsed().as_secs_f64() * 1000.0))
    }

    pub fn handle(&mut self, request: Request) -> Response {
        let changes = request.changes();
        let response = match self.dispatch(request) {
            Ok(r) => r,
            Err(e) => Response::error(format!("{e:#}")),
        };
        if changes {
            self.publish();
        }
        response
    }

    /// Hands /metrics the figures after a change (rules, lists, their
    /// status), for scrapes made while the next change holds the lock.
    /// Also the moment a change's buffers are freed: handed back.
    pub(crate) fn publish(&self) {
        self.published.publish(self);
        release_freed_memory();
    }

    fn dispatch(&mut self, request: Request) -> anyhow::Result<Response> {
        match request {
            Request::Add { rules } => self.edit_local(&rules, true),
            Request::Del { rules } => self.edit_local(&rules, false),
            Request::List => {
                let hits = self.kernel.rule_hits();
                let rows: Vec<_> = self
                    .engine
                    .all_rules()
                    .map(|(id, list, rule)| json!({"list": list, "rule": rule.to_string(), "hits": hits.get(id as usize).copied().unwrap_or(0)}))
                    .collect();
                Ok(Response::ok(format!("{} rules", rows.len()), json!(rows)))
            }
            Request::Check { names } => {
                let mut rows = Vec::new();
                for name in &names {
                    rows.push(self.engine.check(name).with_context(|| format!("{name:?}"))?);
                }
                Ok(Response::ok(String::new(), serde_json::to_value(rows)?))
            }
            Request::Reload { force } => {
                // All files parse (and none takes away more of its list
                // than --max-shrink, unless forced), or nothing changes;
                // each refused file counts as a failed update of its list.
                let mut parsed = Vec::new();
                let mut errors = Vec::new();
                for (name, path) in &self.files {
                    let in_force = self.engine.list(name).map_or(0, |l| l.len());
                    // Why the file is refused, and whether for shrinking.
                    let refused = match read_rules(path) {
                        Ok(rules) => match self.max_shrink.check(in_force, rules.len()) {
                            Err(shrunk) if !force => Some((shrunk.refusal(name, "blokir rules reload --force").to_string(), true)),
                            _ => {
                                parsed.push(rules);
                                None
                            }
                        },
                        Err(e) => Some((e.report(), false)),
                    };
                    if let Some((why, shrunk)) = refused {
                        let status = self.list_status.entry(name.clone()).or_default();
                        status.failed();
                        status.shrinks_refused += u64::from(shrunk);
                        errors.push(why);
                    }
                }
                if !errors.is_empty() {
                    bail!("{}", errors.join("\n"));
                }
                let mut lines = Vec::new();
                for ((name, path), rules) in self.files.clone().iter().zip(parsed) {
                    lines.push(self.replace_list_told(name, Some(path.clone()), &rules)?);
                }
                Ok(Response::ok(lines.join("\n"), serde_json::Value::Null))
            }
            Request::Status => Ok(Response::ok(String::new(), self.status())),
            Request::ListsLs => Ok(self.lists_ls()),
            Request::ListsRm { name } => self.lists_rm(&name),
            Request::ListsRollback { name, to } => self.lists_rollback(&name, to),
            Request::ListsSet { name, change, clear } => self.lists_set(&name, change, &clear),
            // Fetching is done outside the lock (`handle_connection`).
            Request::ListsAdd { .. } | Request::ListsUpdate { .. } => bail!("internal: list fetches are not dispatched under the lock"),
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let lists: Vec<_> = self
            .engine
            .lists()
            .iter()
            .map(|l| {
                let source = l.source.as_ref().map(|p| p.display().to_string()).or_else(|| self.registry.get(&l.name).map(|e| e.def.source.clone()));
                let version = self.list_status.get(&l.name).map_or(0, |s| s.version);
                let policy = self.list_policy(&l.name);
                json!({
                    "name": l.name,
                    "rules": l.len(),
                    "source": source,
                    "dns_action": policy.dns.name(),
                    "tcp_action": policy.tcp.name(),
                    "ech_outer": policy.ech_outer,
                    "version": version,
                })
            })
            .collect();
        let secs = |t: Option<std::time::SystemTime>| t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs());
        let loaded_at = secs(self.kernel.loaded_at());
        let attached: Vec<_> = self
            .kernel
            .attachments()
            .iter()
            .map(|a| {
                let ids = a.link_ids();
                json!({
                    "iface": a.iface,
                    "mode": a.mode,
                    "attached": ids.is_some(),
                    "program_id": ids.map(|i| i.1),
                    "link_id": ids.map(|i| i.0),
                    "link_pinned": a.path.exists(),
                    "link_path": a.path.display().to_string(),
                    "adopted": a.adopted,
                    "previous_program_id": a.previous_program,
                    "program_loaded_at": loaded_at,
                })
            })
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "attached": attached,
            "pin_dir": self.pins.describe(),
            "pins_outlive_daemon": self.pins.outlives_daemon(),
            "pins": self.pins.persistence(),
            "adopted_maps": self.kernel.adopted_maps(),
            "program_loaded_at": loaded_at,
            "on_exit": self.on_exit,
            "lists": lists,
            "rules": self.engine.rule_count(),
            "nodes": self.engine.node_count(),
            "capacity": self.kernel.capacity(),
        })
    }

    /// Adds or removes rules of the local list: validated, planned, saved,
    /// then written to the kernel; the file is restored if the kernel refuses.
    fn edit_local(&mut self, texts: &[String], add: bool) -> anyhow::Result<Response> {
        if texts.is_empty() {
            bail!("no rule given");
        }
        let given = texts.iter().map(|t| Rule::parse(t).with_context(|| format!("{t:?}"))).collect::<anyhow::Result<Vec<_>>>()?;
        let old: Vec<Rule> = self.engine.list_rules(LOCAL_LIST);
        let mut new = old.clone();
        for rule in &given {
            if add {
                if !new.contains(rule) {
                    new.push(rule.clone());
                }
            } else if let Some(i) = new.iter().position(|r| r == rule) {
                new.remove(i);
            } else {
                let elsewhere = self.engine.all_rules().find(|(_, _, r)| r == rule).map(|(_, list, _)| list.to_string());
                match elsewhere.and_then(|l| self.files.iter().find(|(n, _)| *n == l).cloned()) {
                    Some((list, path)) => bail!("rule `{rule}` is in list {list} ({}): edit that file and run `blokir rules reload`", path.display()),
                    None => bail!("rule `{rule}` is not in the local list"),
                }
            }
        }
        let started = Instant::now();
        let result = self.apply_local(&old, &new);
        let status = self.list_status.entry(LOCAL_LIST.to_string()).or_default();
        match &result {
            Ok(changed) => status.updated(*changed),
            Err(_) => status.failed(),
        }
        result?;
        let verb = if add { "added" } else { "removed" };
        let shown: Vec<String> = given.iter().map(ToString::to_string).collect();
        Ok(Response::ok(format!("{verb}: {} (enforced in {:.1} ms)", shown.join(", "), started.elapsed().as_secs_f64() * 1000.0), json!({"rules": shown})))
    }

    /// Saves and applies the local list's new rules; restores the file if
    /// the kernel refuses. Returns whether any rule changed.
    fn apply_local(&mut self, old: &[Rule], new: &[Rule]) -> anyhow::Result<bool> {
        let change = self.engine.plan_replace(LOCAL_LIST, None, new)?;
        let changed = change.summary.added + change.summary.removed > 0;
        self.store.save_local(new)?;
        if let Err(e) = self.engine.apply(change, &mut self.kernel) {
            self.store.save_local(old)?;
            return Err(e);
        }
        Ok(changed)
    }
}

/// Makes `rules` the contents of list `name` in the engine and the kernel,
/// with the list's DNS and TCP actions (and ECH-outer flag) in place before
/// any of its rules.
pub fn apply_list(
    engine: &mut Engine,
    kernel: &mut Kernel,
    policy: ListPolicy,
    name: &str,
    source: Option<PathBuf>,
    rules: &[Rule],
) -> anyhow::Result<ChangeSummary> {
    let change = engine.plan_replace(name, source, rules)?;
    if engine.list(name).is_none() {
        // A new list may take a freed id: its counters start from zero.
        kernel.reset_list_hits(change.list_id())?;
    }
    kernel.write_list_policy(change.list_id(), policy.dns, policy.tcp, policy.ech_outer)?;
    engine.apply(change, kernel)
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    if opts.ifaces.is_empty() {
        bail!("no interface given (--iface)");
    }
    map_big_allocations();
    // Everything that can fail is done before switching the interfaces, and
    // nothing is announced before it could refuse; the socket file is
    // removed on every way out.
    let pins = PinDir::create(&opts.pin_dir)?;
    let _lock: PinLock = pins.lock()?;
    let (socket_listener, _socket_file) = SocketFile::bind(&opts.socket, "control socket")?;
    let metrics_endpoint = metrics::bind(&opts.metrics).await?;
    let endpoint = metrics_endpoint.describe.clone();
    // /healthz and /readyz answer while the rules load (readyz: 503).
    let metrics_ctx = metrics::Context::new(opts.ifaces.clone(), pins.clone());
    let mut metrics_task = tokio::spawn(metrics_endpoint.serve(metrics_ctx.clone()));
    let opts = Arc::new(opts);
    let (o, p) = (opts.clone(), pins.clone());
    let mut state = tokio::task::spawn_blocking(move || State::new(&o, &p)).await??;
    state.published = metrics_ctx.published();
    release_freed_memory();
    tracing::info!(rules = state.engine.rule_count(), nodes = state.engine.node_count(), "rules loaded");
    // Switch only once every rule is in place: from the first packet on,
    // filtering by this program is complete.
    for iface in &opts.ifaces {
        let started = Instant::now();
        let a = state.kernel.attach(iface, opts.mode, &pins)?;
        let (mode, path, us) = (mode_name(a.mode), a.path.display().to_string(), started.elapsed().as_micros() as u64);
        match a.previous_program {
            Some(old) => tracing::info!(iface, mode, path, old_program = old, us, "switched the pinned link to the new program"),
            None => tracing::info!(iface, mode, path, us, "attached and pinned"),
        }
    }
    // Interfaces an earlier daemon filtered but this one was not given.
    for iface in pins.pinned_ifaces() {
        if !opts.ifaces.contains(&iface) {
            pins.remove_link(&iface)?;
            tracing::warn!(iface, "detached: pinned by an earlier daemon but not given with --iface");
        }
    }
    remove_stale_maps(&pins, &state);
    // The programs replaced above may still be finishing a packet on another
    // CPU (a run takes microseconds); their stages stay until they surely
    // have, removed aside while the daemon starts serving.
    let stages = {
        let (pins, program) = (pins.clone(), state.kernel.program_id());
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            pins.remove_stages_except(Some(program));
        })
    };
    let shared: Shared = Arc::new(Mutex::new(state));
    let events = opts.events.map(|log| (log, Events::new(log, metrics_ctx.event_counts())));
    if let Some((log, events)) = events.clone() {
        let ring = lock(&shared).kernel.take_events()?;
        tracing::info!(sample = log.sample, rate = log.rate, "event log of blocked names on");
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = events::run(ring, shared, events).await {
                tracing::error!("event log stopped: {e:#}");
            }
        });
    }
    if opts.traffic.quic == crate::policy::QuicPolicy::Read {
        let (perf, verdicts) = lock(&shared).kernel.take_quic()?;
        let counts = metrics_ctx.quic_counts();
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::quic::handoff::run(perf, verdicts, shared, counts, events.map(|(_, e)| e)).await {
                tracing::error!("QUIC reader stopped: {e:#}");
            }
        });
    }
    metrics_ctx.set_ready(shared.clone())?;
    tracing::info!(endpoint, "serving /metrics, /healthz, /readyz");
    let control_task = tokio::spawn(serve_control(socket_listener, shared.clone()));
    let refresh_task = tokio::spawn(lists::ops::refresh_loop(shared.clone()));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
        r = &mut metrics_task => bail!("metrics endpoint stopped: {r:?}"),
    }
    control_task.abort();
    refresh_task.abort();
    // Before the pins are touched below.
    let _ = stages.await;
    let mut state = lock(&shared);
    match opts.on_exit {
        OnExit::Keep => {
            for a in state.kernel.attachments() {
                tracing::info!(
                    iface = a.iface,
                    path = %a.path.display(),
                    "left attached: filtering goes on with the rules in force; the next `blokir run` takes over, `blokir cleanup` detaches"
                );
            }
        }
        OnExit::Detach => {
            state.kernel.detach_all(&pins);
            pins.remove_stages_except(None);
            tracing::info!(dir = %pins.maps_dir().display(), "pinned maps kept for the next start");
        }
        OnExit::Cleanup => {
            state.kernel.detach_all(&pins);
            pins.remove_all()?;
            tracing::info!(dir = pins.describe(), "removed everything pinned");
        }
    }
    Ok(())
}

/// Removes per-list counters pinned for other sets of lists: they can never
/// be reused once this daemon has switched.
fn remove_stale_maps(pins: &PinDir, state: &State) {
    let lists: Vec<&str> = state.engine.lists().iter().map(|l| l.name.as_str()).collect();
    let keep = format!("{}_{}", filter_common::rules::MAP_LIST_HITS, crate::pin::lists_tag(&lists));
    for e in std::fs::read_dir(pins.maps_dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(filter_common::rules::MAP_LIST_HITS) && name != keep {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

async fn serve_control(listener: UnixListener, shared: Shared) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle_connection(stream, shared.clone()));
            }
            Err(e) => tracing::warn!("control socket: {e}"),
        }
    }
}

async fn handle_connection(stream: UnixStream, shared: Shared) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let response = match BufReader::new(read.take(MAX_REQUEST as u64)).read_line(&mut line).await {
        Err(e) => Response::error(format!("reading the request: {e}")),
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::error(format!("bad request: {e}")),
            Ok(Request::ListsAdd { def }) => match update_unless_gone(&shared, write.as_ref(), Update::Add(def)).await {
                Some(r) => r,
                None => return,
            },
            Ok(Request::ListsUpdate { name, force }) => match update_unless_gone(&shared, write.as_ref(), Update::Refresh { name, force }).await {
                Some(r) => r,
                None => return,
            },
            Ok(req) => tokio::task::spawn_blocking(move || lock(&shared).handle(req)).await.unwrap_or_else(|e| Response::error(format!("internal error: {e}"))),
        },
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

/// The list update's response, or None if the client goes away first (a
/// CLI stopped with Ctrl-C closes its socket): the update is then dropped,
/// which cancels it where it waits (the list's update lock, the download,
/// whose thread is left to end at its timeout with its result unused) and
/// frees the list for the next command; a swap already under way completes.
async fn update_unless_gone(shared: &Shared, client: &UnixStream, update: Update) -> Option<Response> {
    let list = update.list().to_string();
    tokio::select! {
        r = lists::ops::update(shared, update) => Some(r),
        _ = gone(client) => {
            tracing::info!(list, "the client went away; request cancelled, the list is free for the next command");
            None
        }
    }
}

/// Returns once the peer has closed its end. Its half-close after the
/// request (the CLI's `shutdown(Write)`) is not that: only a socket shut
/// both ways reports POLLHUP.
async fn gone(client: &UnixStream) {
    use std::os::fd::AsRawFd as _;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        tick.tick().await;
        let mut p = libc::pollfd { fd: client.as_raw_fd(), events: 0, revents: 0 };
        // SAFETY: one valid pollfd, no wait.
        if unsafe { libc::poll(&mut p, 1, 0) } == 1 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return;
        }
    }
}
