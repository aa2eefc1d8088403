//! What blokir keeps in a BPF file system so that filtering outlives the
//! daemon: the XDP links (one per interface) and the maps whose contents must
//! carry over from one program to the next (TLS flow state, blocked QUIC
//! flows, counters).
//!
//! Layout under the pin directory (default `/sys/fs/bpf/blokir`):
//!
//! ```text
//! links/<iface>/<mode>        the XDP bpf_link of <iface>, attached in <mode> (native|generic)
//! maps/v<LAYOUT>/FLOWS        TLS and HTTP per-flow state
//! maps/v<LAYOUT>/SYNS         where new connections' data starts
//! maps/v<LAYOUT>/COUNTERS     the global counters
//! maps/v<LAYOUT>/LIST_HITS_<lists>  per-list counters (the kernel's and the daemon's QUIC
//!                             verdicts'), for one ordered set of list names
//! maps/v<LAYOUT>/QUIC_BLOCKED QUIC flows the daemon blocked
//! maps/v<LAYOUT>/QUIC_BLOCKED_PORTS  their server ports
//! stages/<program id>         the tail-call array of each loaded program (the
//!                             kernel empties an unreferenced one)
//! ```
//!
//! bpffs holds only BPF objects and directories, so the attach mode is in the
//! link's path. The directory itself is flock()ed by the daemon that uses it.

use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};

use crate::ebpf::Mode;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/blokir";
/// Where bpffs is mounted by convention; blokir mounts it there if needed.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The layout of the shared maps. Bump it whenever the meaning of a shared
/// map's key or value changes (even at the same size): a new daemon then
/// starts from fresh maps instead of misreading old ones.
pub const LAYOUT: u32 = 3;

/// A pin directory on bpffs.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
    /// The outer namespace's bpffs that `root` is under, when it is (held
    /// open: `root` is a `/proc/self/fd/N` path through it).
    outer: Option<Arc<File>>,
    /// `root` as the operator gave it.
    given: PathBuf,
}

/// The pin directory's lock, held for as long as this lives.
pub struct PinLock {
    _dir: File,
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a valid out pointer.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// The parent of `pid`, from `/proc/PID/stat` (the field after the
/// parenthesized command name, which may itself hold spaces).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The bpffs at /sys/fs/bpf as a process outside this mount namespace sees
/// it: the parent chain first (`ip netns exec` runs blokir straight from
/// the namespace it was called in), then PID 1. Held open, so that its
/// `/proc/self/fd/N` path stays valid whatever happens to that process.
fn outer_bpffs() -> Option<File> {
    let own = std::fs::read_link("/proc/self/ns/mnt").ok()?;
    let mut pid = std::os::unix::process::parent_id();
    for _ in 0..64 {
        if std::fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|ns| ns != own) {
            let dir = PathBuf::from(format!("/proc/{pid}/root{BPFFS_MOUNT}"));
            if is_bpffs(&dir)
                && let Ok(f) = File::open(&dir)
            {
                return Some(f);
            }
        }
        pid = match pid {
            0 | 1 => return None,
            p => parent_of(p).unwrap_or(1),
        };
    }
    None
}

/// Where pins under `root` outlive this process. Below /sys/fs/bpf, with
/// no bpffs there (`ip netns exec` gives its command a mount namespace with
/// a fresh /sys), a bpffs mounted here would die with the namespace, and
/// the pins and the XDP links with it: the outer namespace's bpffs is used
/// instead. None: nothing to change.
fn outer_root(root: &Path) -> Option<(PathBuf, Arc<File>)> {
    let mount = Path::new(BPFFS_MOUNT);
    let rest = root.strip_prefix(mount).ok()?;
    if is_bpffs(mount) {
        return None;
    }
    let dir = outer_bpffs()?;
    Some((PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(rest), Arc::new(dir)))
}

/// Whether this process has a mount namespace of its own (`ip netns exec`,
/// a container, a unit with its own mounts), where a bpffs it mounts dies
/// with it. Where PID 1 cannot be read (a sandbox), the parent's is
/// compared.
fn private_mount_namespace() -> bool {
    match (std::fs::read_link("/proc/self/ns/mnt"), std::fs::read_link("/proc/1/ns/mnt")) {
        (Ok(a), Ok(b)) => a != b,
        _ => std::fs::read_link("/proc/self/ns/mnt")
            .is_ok_and(|own| parent_of(std::process::id()).and_then(|p| std::fs::read_link(format!("/proc/{p}/ns/mnt")).ok()).is_some_and(|ns| ns != own)),
    }
}

/// Whether the bpffs mount holding `path` (per a mountinfo's lines) is in a
/// propagation group (`shared:N` or `master:N`), i.e. not this namespace's
/// alone; None when no bpffs mount holds it.
fn propagated_bpffs(mountinfo: &str, path: &Path) -> Option<bool> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS...] - FSTYPE SOURCE SUPER
            let (head, tail) = line.split_once(" - ")?;
            let fields: Vec<&str> = head.split(' ').collect();
            let point = Path::new(fields.get(4)?);
            (tail.split(' ').next() == Some("bpf") && path.starts_with(point))
                .then(|| (point.as_os_str().len(), fields[6..].iter().any(|t| t.starts_with("shared:") || t.starts_with("master:"))))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, propagated)| propagated)
}

fn private_namespace_without_bpffs() -> String {
    format!(
        "this process has a mount namespace of its own (ip netns exec, a container) with no bpffs at {BPFFS_MOUNT}, and none is reachable outside it: \
         pins on a bpffs mounted here would die with the daemon and detach the program; mount bpffs on the host (`mount -t bpf bpf {BPFFS_MOUNT}`) \
         or give --pin-dir on a bpffs that outlives this namespace"
    )
}

fn not_on_bpffs(root: &Path) -> String {
    format!("the pin directory {} is not on a BPF file system: mount one there (`mount -t bpf bpf DIR`) or choose another --pin-dir", root.display())
}

/// What [`PinDir::create`] would meet at `given`, touching nothing: where
/// the pins would go and whether they outlive the daemon, or why `create`
/// would refuse (`blokir doctor`, and `run` before it starts).
pub fn preflight(given: &Path) -> Result<String, String> {
    let dir = PinDir::at(given);
    let mount = Path::new(BPFFS_MOUNT);
    if dir.root.starts_with(mount) && !is_bpffs(mount) {
        return match private_mount_namespace() {
            true => Err(private_namespace_without_bpffs()),
            false => Ok(format!("no bpffs at {BPFFS_MOUNT} yet: `blokir run` mounts it and pins in {}", given.display())),
        };
    }
    let existing = dir.root.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    match is_bpffs(existing) {
        true => Ok(dir.persistence()),
        false => Err(not_on_bpffs(&dir.root)),
    }
}

impl PinDir {
    /// The pin directory at `root` (on the outer bpffs where `create` would
    /// put it), without touching the file system.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        let given = root.into();
        match outer_root(&given) {
            Some((root, dir)) => PinDir { root, outer: Some(dir), given },
            None => PinDir { root: given.clone(), outer: None, given },
        }
    }

    /// Makes sure `root` exists on a bpffs where the pins outlive the daemon:
    /// mounts bpffs at /sys/fs/bpf when the directory is below it and nothing
    /// is mounted there yet, or uses the host's (see `persistent_root`).
    pub fn create(root: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let given = root.into();
        let mount = Path::new(BPFFS_MOUNT);
        let (root, outer) = match outer_root(&given) {
            Some((root, dir)) => {
                tracing::info!(
                    pins = %given.display(),
                    "no bpffs at {BPFFS_MOUNT} in this mount namespace: pinning on the outer namespace's, where the pins outlive the daemon"
                );
                (root, Some(dir))
            }
            None => (given.clone(), None),
        };
        if root.starts_with(mount) && !is_bpffs(mount) && private_mount_namespace() {
            bail!("{}", private_namespace_without_bpffs());
        }
        if root.starts_with(mount) && !is_bpffs(mount) {
            let src = CString::new("bpf")?;
            let target = CString::new(BPFFS_MOUNT)?;
            // SAFETY: valid C strings; no mount data.
            let r = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
            if r != 0 {
                bail!("mounting bpffs at {BPFFS_MOUNT}: {}", std::io::Error::last_os_error());
            }
            tracing::info!("mounted bpffs at {BPFFS_MOUNT}");
        }
        std::fs::create_dir_all(&root).with_context(|| format!("creating the pin directory {}", root.display()))?;
        if !is_bpffs(&root) {
            bail!("{}", not_on_bpffs(&root));
        }
        let dir = PinDir { root, outer, given };
        for d in [dir.maps_dir(), dir.links_dir(), dir.stages_dir()] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(dir)
    }

    /// Whether the pins outlive this process (and so the program stays
    /// attached when it dies): on the outer namespace's bpffs, in the host's
    /// mount namespace, or on a bpffs the host sees at the same path. A
    /// bpffs mounted only in this process's own mount namespace dies with it.
    pub fn outlives_daemon(&self) -> bool {
        if self.outer.is_some() || !private_mount_namespace() {
            return true;
        }
        let dev = |p: &Path| std::fs::metadata(p).ok().map(|m| std::os::unix::fs::MetadataExt::dev(&m));
        let Some(own) = dev(&self.root) else { return false };
        let inside = self.root.strip_prefix("/").unwrap_or(&self.root);
        let outside = |pid: u32| dev(&Path::new(&format!("/proc/{pid}/root")).join(inside));
        let seen = [Some(1), parent_of(std::process::id())].into_iter().flatten().map(outside).collect::<Vec<_>>();
        if seen.contains(&Some(own)) {
            return true;
        }
        // Outside views unreadable (a unit's bounding set without
        // CAP_SYS_PTRACE, as systemd sandboxes services): a mount that
        // propagates to or from another namespace is one the host has.
        seen.iter().all(Option::is_none) && std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| propagated_bpffs(&m, &self.root).unwrap_or(false))
    }

    /// Where the pins are and whether they outlive the daemon, in a line
    /// (`blokir status`, /readyz).
    pub fn persistence(&self) -> String {
        match self.outlives_daemon() {
            true => format!("pins in {}: they outlive the daemon (the program keeps filtering if it dies; the next start takes over)", self.describe()),
            false => format!(
                "pins in {}: on a bpffs of this mount namespace only, they die with the daemon and the program detaches (mount bpffs on the host and use --pin-dir there)",
                self.describe()
            ),
        }
    }

    /// The directory as the operator knows it, and where it really is when
    /// that is the outer namespace's bpffs.
    pub fn describe(&self) -> String {
        match self.outer {
            Some(_) => format!("{} (on the bpffs outside this mount namespace)", self.given.display()),
            None => self.given.display().to_string(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the directory's lock, or says who holds it.
    pub fn lock(&self) -> anyhow::Result<PinLock> {
        let dir = File::open(&self.root).with_context(|| format!("opening {}", self.root.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!("another blokir daemon is using the pin directory {} (it holds its lock); stop it first", self.root.display());
            }
            bail!("locking {}: {e}", self.root.display());
        }
        Ok(PinLock { _dir: dir })
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps").join(format!("v{LAYOUT}"))
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn stages_dir(&self) -> PathBuf {
        self.root.join("stages")
    }

    pub fn stages_path(&self, program_id: u32) -> PathBuf {
        self.stages_dir().join(program_id.to_string())
    }

    /// Unpins the tail-call arrays of programs other than `keep` (all of
    /// them for `None`): only call once no link runs those programs.
    pub fn remove_stages_except(&self, keep: Option<u32>) {
        let keep = keep.map(|k| k.to_string());
        for e in std::fs::read_dir(self.stages_dir()).into_iter().flatten().flatten() {
            if Some(e.file_name().to_string_lossy().as_ref()) != keep.as_deref() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link_path(&self, iface: &str, mode: Mode) -> PathBuf {
        self.links_dir().join(iface).join(mode_name(mode))
    }

    /// The pinned link of `iface`, if any, with its attach mode.
    pub fn pinned_link(&self, iface: &str) -> Option<(PathBuf, Mode)> {
        [Mode::Native, Mode::Generic].into_iter().map(|m| (self.link_path(iface, m), m)).find(|(p, _)| p.exists())
    }

    /// Interfaces with a pinned link.
    pub fn pinned_ifaces(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.links_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|i| self.pinned_link(i).is_some())
            .collect();
        v.sort();
        v
    }

    /// What the pinned links run, read from the kernel: for `blokir status`
    /// when no daemon answers.
    pub fn describe_links(&self) -> Vec<serde_json::Value> {
        self.pinned_ifaces()
            .into_iter()
            .filter_map(|iface| {
                let (path, mode) = self.pinned_link(&iface)?;
                let info = aya::programs::links::PinnedLink::from_pin(&path).ok().map(aya::programs::links::FdLink::from).and_then(|l| l.info().ok());
                let ids = info.filter(|i| i.program_id() != 0).map(|i| (i.id(), i.program_id()));
                Some(serde_json::json!({
                    "iface": iface,
                    "mode": mode,
                    "attached": ids.is_some(),
                    "link_id": ids.map(|i| i.0),
                    "program_id": ids.map(|i| i.1),
                    "link_pinned": true,
                    "link_path": path.display().to_string(),
                }))
            })
            .collect()
    }

    /// Unpins the link of `iface`: once no process holds it either, the
    /// kernel detaches the program. Returns whether there was one.
    pub fn remove_link(&self, iface: &str) -> anyhow::Result<bool> {
        let mut found = false;
        while let Some((path, _)) = self.pinned_link(iface) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            found = true;
        }
        let _ = std::fs::remove_dir(self.links_dir().join(iface));
        Ok(found)
    }

    /// Unpins every link; returns the interfaces.
    pub fn remove_links(&self) -> anyhow::Result<Vec<String>> {
        let ifaces = self.pinned_ifaces();
        for i in &ifaces {
            self.remove_link(i)?;
        }
        Ok(ifaces)
    }

    /// Removes everything under the pin directory (links, maps of every
    /// layout) and the directory itself.
    pub fn remove_all(&self) -> anyhow::Result<Vec<String>> {
        let ifaces = self.remove_links()?;
        if self.root.exists() {
            std::fs::remove_dir_all(&self.root).with_context(|| format!("removing {}", self.root.display()))?;
        }
        Ok(ifaces)
    }
}

pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Native => "native",
        Mode::Generic => "generic",
        Mode::Auto => "auto",
    }
}

/// A stable name for an ordered set of list names (FNV-1a, 64 bits): the
/// per-list counters are indexed by list id, and ids follow that order.
pub fn lists_tag(names: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for n in names {
        for b in n.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_tag_follows_names_and_order() {
        let a = lists_tag(&["local", "national"]);
        assert_eq!(a, lists_tag(&["local", "national"]));
        assert_ne!(a, lists_tag(&["national", "local"]));
        assert_ne!(a, lists_tag(&["local", "nationa", "l"]));
        assert_ne!(a, lists_tag(&["local"]));
        // bpffs refuses names with dots: the tag is plain hex.
        assert!(a.len() == 16 && a.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    /// Mountinfo as a systemd service sees it (the host's bpffs, a slave of
    /// its mount) and as a wrapper that mounted its own bpffs does.
    #[test]
    fn a_bpffs_is_the_hosts_when_its_mount_propagates() {
        let service = "25 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                       31 25 0:28 / /sys/fs/bpf rw,nosuid,nodev master:9 - bpf bpf rw,mode=700\n";
        assert_eq!(propagated_bpffs(service, Path::new("/sys/fs/bpf/blokir")), Some(true));
        let own = "40 30 0:50 / /tmp/x/bpf rw,relatime - bpf bpf rw\n\
                   41 40 0:51 / /tmp/x/bpf/inner rw,relatime shared:3 - tmpfs tmpfs rw\n";
        assert_eq!(propagated_bpffs(own, Path::new("/tmp/x/bpf/blokir")), Some(false));
        assert_eq!(propagated_bpffs(own, Path::new("/var/lib/blokir")), None);
        assert_eq!(propagated_bpffs(&format!("{service}{own}"), Path::new("/tmp/x/bpf/blokir")), Some(false), "the innermost bpffs counts");
    }

    #[test]
    fn a_pin_dir_off_bpffs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = PinDir::create(dir.path().join("pins")).expect_err("a tmpfs or disk directory is not bpffs");
        assert!(format!("{e:#}").contains("is not on a BPF file system"), "{e:#}");
    }
}
