//! The daemon's state directory: the local list (CLI-added rules), written
//! atomically so that a crash leaves either the old or the new file.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use super::{
    Rule,
    file::{FileError, parse_rules, render_rules},
};

pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating state directory {}", dir.display()))?;
        Ok(Store { dir: dir.to_path_buf() })
    }

    pub fn local_path(&self) -> PathBuf {
        self.dir.join("local.rules")
    }

    /// The local list; empty when never saved.
    pub fn load_local(&self) -> Result<Vec<Rule>, FileError> {
        let path = self.local_path();
        match fs::read(&path) {
            Ok(bytes) => parse_rules(&path.display().to_string(), &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(FileError::Io(path.display().to_string(), e)),
        }
    }

    pub fn save_local(&self, rules: &[Rule]) -> anyhow::Result<()> {
        let text = render_rules(
            "Rules added with `blokir rules add`. Managed by blokir: edits here are\nread at the next start, but use the CLI on a running daemon.",
            rules,
        );
        write_atomic(&self.local_path(), text.as_bytes())
    }
}

/// Writes `path` via a temporary file, fsync and rename, then fsyncs the
/// directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_rules_survive_a_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.load_local().unwrap().is_empty());
        let rules = vec![Rule::parse("t.me").unwrap(), Rule::parse("allow core.telegram.org").unwrap()];
        store.save_local(&rules).unwrap();
        let mut back = store.load_local().unwrap();
        back.sort();
        let mut want = rules.clone();
        want.sort();
        assert_eq!(back, want);
    }
}
