//! `blokir run`: loads the program and the rules, attaches, serves the control
//! socket and /metrics, and detaches on SIGINT/SIGTERM.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use anyhow::{Context as _, bail};
use filter_common::{hash::lane_multiplier, rules::MAX_RULE_ID};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};

use crate::{
    control::{MAX_REQUEST, Request, Response},
    ebpf::{Kernel, Mode},
    metrics,
    policy::{DnsPolicy, TrafficPolicy},
    rules::{Engine, LOCAL_LIST, Rule, file::read_rules, store::Store},
};

pub struct Options {
    pub ifaces: Vec<String>,
    pub mode: Mode,
    pub rule_files: Vec<PathBuf>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub metrics_addr: SocketAddr,
    pub capacity: u32,
    pub top_rules: usize,
    pub dns: DnsPolicy,
    pub traffic: TrafficPolicy,
}

/// Everything the control socket and the metrics endpoint act on.
pub struct State {
    pub engine: Engine,
    pub kernel: Kernel,
    store: Store,
    /// Rule files and the list each one feeds.
    files: Vec<(String, PathBuf)>,
    pub top_rules: usize,
    dns: DnsPolicy,
}

pub type Shared = Arc<Mutex<State>>;

pub fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves the engine as consistent as any
    // single change leaves it; keep serving.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The list a rule file feeds: its file name without extension.
pub fn list_name(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

impl State {
    /// Loads the program, reads every rule file and the local list (any bad
    /// line refuses the start), and fills the maps. Nothing is attached yet.
    pub fn new(opts: &Options) -> anyhow::Result<Self> {
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
        let list_names: Vec<&str> = std::iter::once(LOCAL_LIST).chain(files.iter().map(|(n, _)| n.as_str())).collect();
        dns.validate(&list_names)?;
        let parsed = files.iter().map(|(_, p)| read_rules(p).map_err(|e| anyhow::anyhow!(e.report()))).collect::<anyhow::Result<Vec<_>>>()?;
        let store = Store::open(state_dir)?;
        let local = store.load_local().map_err(|e| anyhow::anyhow!(e.report()))?;

        let mut kernel = Kernel::load(capacity)?;
        let hash_r = [lane_multiplier(rand::random()), lane_multiplier(rand::random())];
        let engine = Engine::new(hash_r, capacity as usize, capacity);
        let mut cfg = engine.config();
        dns.apply_to(&mut cfg);
        opts.traffic.apply_to(&mut cfg)?;
        kernel.write_config(cfg)?;
        let mut state = State { engine, kernel, store, files, top_rules, dns: dns.clone() };
        state.replace_list(LOCAL_LIST, None, &local)?;
        for ((name, path), rules) in state.files.clone().iter().zip(parsed) {
            state.replace_list(name, Some(path.clone()), &rules)?;
        }
        Ok(state)
    }

    fn replace_list(&mut self, name: &str, source: Option<PathBuf>, rules: &[Rule]) -> anyhow::Result<String> {
        let started = Instant::now();
        let change = self.engine.plan_replace(name, source, rules)?;
        // The list's action is in place before any of its rules.
        self.kernel.write_list_action(change.list_id(), self.dns.action_for(name))?;
        let s = self.engine.apply(change, &mut self.kernel)?;
        let took = started.elapsed();
        tracing::info!(
            list = name,
            added = s.added,
            removed = s.removed,
            unchanged = s.unchanged,
            writes = s.writes,
            ms = took.as_millis() as u64,
            "rules applied"
        );
        Ok(format!(
            "list {name}: {} added, {} removed, {} unchanged ({} map writes, {:.1} ms)",
            s.added,
            s.removed,
            s.unchanged,
            s.writes,
            took.as_secs_f64() * 1000.0
        ))
    }

    pub fn handle(&mut self, request: Request) -> Response {
        match self.dispatch(request) {
            Ok(r) => r,
            Err(e) => Response::error(format!("{e:#}")),
        }
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
            Request::Reload => {
                // All files parse, or nothing changes.
                let parsed = self.files.iter().map(|(_, p)| read_rules(p).map_err(|e| anyhow::anyhow!(e.report()))).collect::<anyhow::Result<Vec<_>>>()?;
                let mut lines = Vec::new();
                for ((name, path), rules) in self.files.clone().iter().zip(parsed) {
                    lines.push(self.replace_list(name, Some(path.clone()), &rules)?);
                }
                Ok(Response::ok(lines.join("\n"), serde_json::Value::Null))
            }
            Request::Status => Ok(Response::ok(String::new(), self.status())),
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let lists: Vec<_> = self
            .engine
            .lists()
            .iter()
            .map(|l| {
                let source = l.source.as_ref().map(|p| p.display().to_string());
                json!({"name": l.name, "rules": l.len(), "source": source, "dns_action": self.dns.action_for(&l.name).name()})
            })
            .collect();
        let attached: Vec<_> = self.kernel.attachments().iter().map(|a| json!({"iface": a.iface, "mode": a.mode})).collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "attached": attached,
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
        let old: Vec<Rule> = self.engine.list_rules(LOCAL_LIST).into_iter().cloned().collect();
        let mut new = old.clone();
        for rule in &given {
            if add {
                if !new.contains(rule) {
                    new.push(rule.clone());
                }
            } else if let Some(i) = new.iter().position(|r| r == rule) {
                new.remove(i);
            } else {
                let elsewhere = self.engine.all_rules().find(|(_, _, r)| *r == rule).map(|(_, list, _)| list.to_string());
                match elsewhere.and_then(|l| self.files.iter().find(|(n, _)| *n == l).cloned()) {
                    Some((list, path)) => bail!("rule `{rule}` is in list {list} ({}): edit that file and run `blokir rules reload`", path.display()),
                    None => bail!("rule `{rule}` is not in the local list"),
                }
            }
        }
        let change = self.engine.plan_replace(LOCAL_LIST, None, &new)?;
        self.store.save_local(&new)?;
        let started = Instant::now();
        if let Err(e) = self.engine.apply(change, &mut self.kernel) {
            self.store.save_local(&old)?;
            return Err(e);
        }
        let verb = if add { "added" } else { "removed" };
        let shown: Vec<String> = given.iter().map(ToString::to_string).collect();
        Ok(Response::ok(format!("{verb}: {} (enforced in {:.1} ms)", shown.join(", "), started.elapsed().as_secs_f64() * 1000.0), json!({"rules": shown})))
    }
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    if opts.ifaces.is_empty() {
        bail!("no interface given (--iface)");
    }
    // Everything that can fail is done before attaching; the socket file is
    // removed on every way out.
    let (socket_listener, _socket_file) = SocketFile::bind(&opts.socket)?;
    let metrics_listener =
        tokio::net::TcpListener::bind(opts.metrics_addr).await.with_context(|| format!("binding the metrics endpoint {}", opts.metrics_addr))?;
    let opts = Arc::new(opts);
    let o = opts.clone();
    let mut state = tokio::task::spawn_blocking(move || State::new(&o)).await??;
    tracing::info!(rules = state.engine.rule_count(), nodes = state.engine.node_count(), "rules loaded");
    // Attach only once every rule is in place: from the first packet on,
    // filtering is complete.
    for iface in &opts.ifaces {
        let mode = state.kernel.attach(iface, opts.mode)?;
        tracing::info!(iface, ?mode, "attached");
    }
    let shared: Shared = Arc::new(Mutex::new(state));
    tracing::info!(addr = %opts.metrics_addr, "serving /metrics");
    let metrics_task = tokio::spawn(metrics::serve(metrics_listener, shared.clone()));
    let control_task = tokio::spawn(serve_control(socket_listener, shared.clone()));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
        r = metrics_task => bail!("metrics endpoint stopped: {r:?}"),
    }
    control_task.abort();
    lock(&shared).kernel.detach_all();
    Ok(())
}

/// The control socket's file, removed when this is dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl SocketFile {
    /// Binds the root-only control socket, refusing if a daemon already
    /// answers. A directory it creates is made 0700; an existing one is left
    /// as it is.
    fn bind(path: &Path) -> anyhow::Result<(UnixListener, Self)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("another blokir daemon is listening on {}", path.display());
            }
            std::fs::remove_file(path)?;
        }
        // Created 0600 from the start: no window in which others could connect.
        // SAFETY: umask only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = listener.with_context(|| format!("binding the control socket {}", path.display()))?;
        Ok((listener, SocketFile(path.to_path_buf())))
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
            Ok(req) => tokio::task::spawn_blocking(move || lock(&shared).handle(req)).await.unwrap_or_else(|e| Response::error(format!("internal error: {e}"))),
        },
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}
