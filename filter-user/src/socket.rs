//! Root-only Unix sockets (the control socket, /metrics on `unix:`): created
//! 0600 from the start, a directory created for them 0700, and the file
//! removed when the listener's guard is dropped.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use tokio::net::UnixListener;

/// The socket's file, removed when this is dropped.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl SocketFile {
    /// Binds `path` (`what` names it in errors), refusing if something
    /// already answers there; a stale file is replaced. A directory it
    /// creates is made 0700; an existing one is left as it is.
    pub fn bind(path: &Path, what: &str) -> anyhow::Result<(UnixListener, Self)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("{what} {}: something is listening there already (another blokir daemon?)", path.display());
            }
            std::fs::remove_file(path)?;
        }
        // Created 0600 from the start: no window in which others could connect.
        // SAFETY: umask only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = listener.with_context(|| format!("binding the {what} {}", path.display()))?;
        Ok((listener, SocketFile(path.to_path_buf())))
    }
}
