//! The named lists and their versions, kept in the state directory:
//! `lists.json` (definitions, versions, validators; replaced atomically) and
//! `lists/NAME/VERSION.list` (the bytes of each version, as fetched).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{KEEP_VERSIONS, ListDef, fetch::sha256_hex};
use crate::{policy::ListSettings, rules::store::write_atomic};

/// The longest last error kept for a list (a refused download's reasons
/// quote its lines).
const MAX_STORED_ERROR: usize = 4096;

/// One version of a list that was put in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub number: u64,
    pub sha256: String,
    pub rules: usize,
    /// Bad lines skipped (with `--skip-bad-lines`).
    #[serde(default)]
    pub skipped: usize,
    /// The format it was read in (the detected one for `auto`).
    pub format: String,
    /// When it was fetched (Unix seconds).
    pub fetched_at: u64,
    #[serde(default)]
    pub etag: Option<String>,
    #[serde(default)]
    pub last_modified: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub def: ListDef,
    /// Oldest first; at most `KEEP_VERSIONS`.
    pub versions: Vec<Version>,
    /// The version in force.
    pub active: u64,
    /// Last time the source was checked, successfully or not (Unix seconds).
    #[serde(default)]
    pub last_check: Option<u64>,
    /// Why the last check failed, if it did (cleared by a good one).
    #[serde(default)]
    pub last_error: Option<String>,
}

impl Entry {
    pub fn active_version(&self) -> Option<&Version> {
        self.versions.iter().find(|v| v.number == self.active)
    }

    /// The version before the one in force, for a rollback.
    pub fn previous_version(&self) -> Option<&Version> {
        self.versions.iter().filter(|v| v.number < self.active).max_by_key(|v| v.number)
    }
}

#[derive(Default, Serialize, Deserialize)]
struct OnDisk {
    lists: BTreeMap<String, Entry>,
}

pub struct Registry {
    dir: PathBuf,
    entries: BTreeMap<String, Entry>,
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Registry {
    /// Reads `STATE_DIR/lists.json` (none: no lists yet).
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join("lists.json");
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<OnDisk>(&bytes).with_context(|| format!("{}: not a valid list registry", path.display()))?.lists,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Registry { dir: state_dir.to_path_buf(), entries })
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    fn save(&self) -> anyhow::Result<()> {
        let on_disk = OnDisk { lists: self.entries.clone() };
        write_atomic(&self.dir.join("lists.json"), &serde_json::to_vec_pretty(&on_disk)?)
    }

    fn copy_path(&self, name: &str, number: u64) -> PathBuf {
        self.dir.join("lists").join(name).join(format!("{number}.list"))
    }

    /// The bytes of a version kept on disk, checked against its hash.
    pub fn read_copy(&self, name: &str, v: &Version) -> anyhow::Result<Vec<u8>> {
        let path = self.copy_path(name, v.number);
        let bytes = std::fs::read(&path).with_context(|| format!("list {name}: reading its copy of version {}", v.number))?;
        if sha256_hex(&bytes) != v.sha256 {
            bail!("list {name}: {} does not have the SHA-256 recorded for version {}; the copy is damaged", path.display(), v.number);
        }
        Ok(bytes)
    }

    /// Records `bytes` as a new version now in force (the definition too,
    /// for a new list); versions beyond `KEEP_VERSIONS` are dropped.
    pub fn put_version(&mut self, def: &ListDef, bytes: &[u8], mut v: Version) -> anyhow::Result<u64> {
        let entry = self.entries.get(&def.name);
        v.number = entry.and_then(|e| e.versions.iter().map(|v| v.number).max()).unwrap_or(0) + 1;
        let path = self.copy_path(&def.name, v.number);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_atomic(&path, bytes)?;
        let entry = self.entries.entry(def.name.clone()).or_insert_with(|| Entry {
            def: def.clone(),
            versions: Vec::new(),
            active: 0,
            last_check: None,
            last_error: None,
        });
        entry.def = def.clone();
        entry.active = v.number;
        entry.last_check = Some(v.fetched_at);
        entry.last_error = None;
        entry.versions.push(v);
        let dropped: Vec<u64> = {
            let n = entry.versions.len().saturating_sub(KEEP_VERSIONS);
            entry.versions.drain(..n).map(|v| v.number).collect()
        };
        let number = entry.active;
        self.save()?;
        for old in dropped {
            let _ = std::fs::remove_file(self.copy_path(&def.name, old));
        }
        Ok(number)
    }

    /// Makes an existing version the one in force (a rollback).
    pub fn set_active(&mut self, name: &str, number: u64) -> anyhow::Result<()> {
        let Some(entry) = self.entries.get_mut(name) else { bail!("no list {name}") };
        entry.active = number;
        self.save()
    }

    /// Replaces a list's own settings (`blokir lists set`).
    pub fn set_settings(&mut self, name: &str, settings: ListSettings) -> anyhow::Result<()> {
        let Some(entry) = self.entries.get_mut(name) else { bail!("no list {name}") };
        let old = std::mem::replace(&mut entry.def.settings, settings);
        if let Err(e) = self.save() {
            // Not on disk: not in the registry either.
            if let Some(entry) = self.entries.get_mut(name) {
                entry.def.settings = old;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Notes a check of the source: `error` if it failed, else nothing new.
    pub fn checked(&mut self, name: &str, error: Option<String>) -> anyhow::Result<()> {
        let Some(entry) = self.entries.get_mut(name) else { return Ok(()) };
        entry.last_check = Some(now());
        // Rewritten on every save and printed by `lists ls`: bounded.
        entry.last_error = error.map(|e| crate::excerpt::shorten(&e, MAX_STORED_ERROR));
        self.save()
    }

    /// Forgets a list on disk (its copies stay until `remove_copies`), and
    /// returns it; when the save fails, nothing changes.
    pub fn remove(&mut self, name: &str) -> anyhow::Result<Option<Entry>> {
        let Some(entry) = self.entries.remove(name) else { return Ok(None) };
        if let Err(e) = self.save() {
            self.entries.insert(name.to_string(), entry);
            return Err(e);
        }
        Ok(Some(entry))
    }

    /// Puts back a list `remove` returned.
    pub fn restore(&mut self, entry: Entry) -> anyhow::Result<()> {
        self.entries.insert(entry.def.name.clone(), entry);
        self.save()
    }

    /// Deletes the copies of a removed list's versions.
    pub fn remove_copies(&self, name: &str) {
        let _ = std::fs::remove_dir_all(self.dir.join("lists").join(name));
    }
}

#[cfg(test)]
mod tests {
    use filter_common::{reply::DnsAction, reset::TcpAction};

    use super::*;
    use crate::rules::formats::Format;

    fn def() -> ListDef {
        ListDef {
            name: "kominfo".into(),
            source: "/x".into(),
            format: Format::Auto,
            settings: ListSettings::default(),
            refresh_secs: None,
            sha256: None,
            skip_bad_lines: false,
            max_shrink: None,
        }
    }

    fn version(bytes: &[u8]) -> Version {
        Version { number: 0, sha256: sha256_hex(bytes), rules: 1, skipped: 0, format: "plain".into(), fetched_at: now(), etag: None, last_modified: None }
    }

    #[test]
    fn versions_are_numbered_kept_pruned_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path()).unwrap();
        for i in 1..=KEEP_VERSIONS as u64 + 2 {
            let bytes = format!("v{i}.example\n");
            assert_eq!(r.put_version(&def(), bytes.as_bytes(), version(bytes.as_bytes())).unwrap(), i);
        }
        let e = r.get("kominfo").unwrap();
        assert_eq!(e.versions.len(), KEEP_VERSIONS);
        assert_eq!(e.versions[0].number, 3);
        assert_eq!(e.active, KEEP_VERSIONS as u64 + 2);
        assert!(!dir.path().join("lists/kominfo/1.list").exists(), "pruned copies are deleted");
        assert_eq!(e.previous_version().unwrap().number, KEEP_VERSIONS as u64 + 1);

        r.set_active("kominfo", 4).unwrap();
        let r = Registry::open(dir.path()).unwrap();
        let e = r.get("kominfo").unwrap();
        assert_eq!(e.active, 4);
        assert_eq!(r.read_copy("kominfo", e.active_version().unwrap()).unwrap(), b"v4.example\n");
        assert_eq!(e.previous_version().unwrap().number, 3);
    }

    #[test]
    fn a_damaged_copy_or_registry_is_reported_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path()).unwrap();
        r.put_version(&def(), b"a.example\n", version(b"a.example\n")).unwrap();
        std::fs::write(dir.path().join("lists/kominfo/1.list"), "b.example\n").unwrap();
        let v = r.get("kominfo").unwrap().active_version().unwrap().clone();
        assert!(r.read_copy("kominfo", &v).unwrap_err().to_string().contains("damaged"));

        std::fs::write(dir.path().join("lists.json"), "{not json").unwrap();
        let e = Registry::open(dir.path()).err().unwrap();
        assert!(format!("{e:#}").contains("lists.json: not a valid list registry"), "{e:#}");
    }

    #[test]
    fn settings_are_kept_across_versions_rollbacks_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path()).unwrap();
        let settings = ListSettings { action: None, tcp_action: Some(TcpAction::Reset), ech_outer: Some(true) };
        let with = ListDef { settings, ..def() };
        r.put_version(&with, b"a.example\n", version(b"a.example\n")).unwrap();
        r.put_version(&with, b"b.example\n", version(b"b.example\n")).unwrap();
        r.set_active("kominfo", 1).unwrap();
        let mut r = Registry::open(dir.path()).unwrap();
        assert_eq!(r.get("kominfo").unwrap().def.settings, settings);

        let changed = ListSettings { action: Some(DnsAction::Refused), tcp_action: Some(TcpAction::Drop), ech_outer: Some(false) };
        r.set_settings("kominfo", changed).unwrap();
        let r = Registry::open(dir.path()).unwrap();
        let e = r.get("kominfo").unwrap();
        assert_eq!((e.def.settings, e.active, e.versions.len()), (changed, 1, 2), "only the settings changed");
        let mut r = r;
        assert!(r.set_settings("nope", changed).unwrap_err().to_string().contains("no list nope"));
    }

    /// A `lists.json` written before lists had a TCP action or an ECH-outer
    /// flag, as such a daemon wrote it, still opens; the lists in it have
    /// neither setting (so `run`'s flags apply to them as before).
    #[test]
    fn a_registry_from_before_tcp_actions_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let old = r#"{
  "lists": {
    "kominfo": {
      "def": {
        "name": "kominfo",
        "source": "/etc/blokir/telegram.hosts",
        "format": "auto",
        "action": "nxdomain",
        "refresh_secs": 3600,
        "sha256": null,
        "skip_bad_lines": false
      },
      "versions": [
        {
          "number": 1,
          "sha256": "0000000000000000000000000000000000000000000000000000000000000000",
          "rules": 6,
          "skipped": 0,
          "format": "hosts",
          "fetched_at": 1700000000,
          "etag": null,
          "last_modified": null
        }
      ],
      "active": 1,
      "last_check": 1700000000,
      "last_error": null
    }
  }
}"#;
        std::fs::write(dir.path().join("lists.json"), old).unwrap();
        let mut r = Registry::open(dir.path()).unwrap();
        let e = r.get("kominfo").unwrap();
        assert_eq!(e.def.settings, ListSettings { action: Some(DnsAction::Nxdomain), tcp_action: None, ech_outer: None });
        assert_eq!((e.def.refresh_secs, e.active, e.versions[0].rules), (Some(3600), 1, 6));
        // Saved again, it gains the new keys and reads back the same.
        r.checked("kominfo", None).unwrap();
        let saved = std::fs::read_to_string(dir.path().join("lists.json")).unwrap();
        assert!(saved.contains(r#""tcp_action": null"#) && saved.contains(r#""ech_outer": null"#), "{saved}");
        assert_eq!(Registry::open(dir.path()).unwrap().get("kominfo").unwrap().def.settings.action, Some(DnsAction::Nxdomain));
    }

    #[test]
    fn removing_a_list_deletes_its_copies() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path()).unwrap();
        r.put_version(&def(), b"a.example\n", version(b"a.example\n")).unwrap();
        assert!(r.remove("kominfo").unwrap().is_some());
        assert!(r.get("kominfo").is_none());
        // The copies stay until the list is lifted from the kernel.
        assert!(dir.path().join("lists/kominfo").exists());
        r.remove_copies("kominfo");
        assert!(!dir.path().join("lists/kominfo").exists());
        assert!(Registry::open(dir.path()).unwrap().get("kominfo").is_none());
    }
}
