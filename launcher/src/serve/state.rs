//! The `warden serve` state file: per-key usage counts and detector flags
//! kept across restarts, in a [`Ledger`] shared by the requests.
//! Written readable by its owner only and replaced atomically: a fresh,
//! unpredictably named temporary file created with mode 0600 (never an
//! existing name, so never through a symlink planted there), written,
//! synced, then renamed over the state file.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use super::budget::Usage;
use super::detector::Trail;

/// Why the state file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// It cannot be read.
    #[error("{}", .path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not one `warden serve` wrote.
    #[error("{}: not a warden serve state file", .path.display())]
    Parse {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: serde_json::Error,
    },
}

/// Everything kept per key; saved as one JSON object of both parts' fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct KeyState {
    #[serde(flatten)]
    pub(super) usage: Usage,
    #[serde(flatten)]
    pub(super) trail: Trail,
}

/// Every key's state, and whether it changed since it was last saved.
pub(super) struct Ledger {
    // A std mutex, not a tokio one: it is never held across an await.
    keys: Mutex<HashMap<String, KeyState>>,
    dirty: AtomicBool,
    path: Option<PathBuf>,
}

impl Ledger {
    /// The state saved at `path` if there is one, else empty; saved there.
    pub(super) fn open(path: Option<PathBuf>) -> Result<Ledger, StateError> {
        let keys = match &path {
            Some(p) if p.exists() => {
                let text = std::fs::read(p).map_err(|source| StateError::Read { path: p.clone(), source })?;
                serde_json::from_slice(&text).map_err(|source| StateError::Parse { path: p.clone(), source })?
            }
            _ => HashMap::new(),
        };
        Ok(Ledger { keys: Mutex::new(keys), dirty: AtomicBool::new(false), path })
    }

    /// Runs `f` on the state of key `id` (fresh if it has none yet). Call
    /// [`Ledger::changed`] for a change that must be saved.
    pub(super) fn with_key<R>(&self, id: &str, f: impl FnOnce(&mut KeyState) -> R) -> R {
        let mut all = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        f(all.entry(id.to_string()).or_default())
    }

    /// Marks the state as changed since it was saved.
    pub(super) fn changed(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Writes the state file, if there is one and the state changed.
    pub(super) fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let text = {
            let all = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            serde_json::to_vec_pretty(&*all).map_err(std::io::Error::other)?
        };
        write_private(path, &text)
    }
}

/// Replaces the file at `path` with `bytes`, mode 0600, atomically.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // tempfile creates with O_CREAT | O_EXCL: an existing name, a symlink
    // included, is never opened, and another random name is tried.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_is_private_and_a_symlink_planted_at_a_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (path, victim) = (dir.path().join("state.json"), dir.path().join("victim"));
        std::fs::write(&victim, "untouched").expect("written");
        // The names a predictable writer would use.
        for planted in ["state.tmp", "state.json.tmp", ".state.json.tmp"] {
            std::os::unix::fs::symlink(&victim, dir.path().join(planted)).expect("a symlink");
        }
        write_private(&path, b"{}").expect("saved");
        write_private(&path, b"{\"a\": 1}").expect("saved again");
        let meta = std::fs::symlink_metadata(&path).expect("the state file");
        assert!(meta.is_file(), "the state file must be a regular file, not a link");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).expect("read"), b"{\"a\": 1}");
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "untouched");
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("listed")
            .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp") && !n.starts_with("state") && n != ".state.json.tmp")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn each_key_is_saved_as_one_object_and_read_back() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("state.json");
        // A file without the detector's flag, and one with it.
        std::fs::write(&path, r#"{"a": {"total": 5, "day": 20000, "today": 2}, "b": {"total": 1, "day": 1, "today": 1, "flagged": true}}"#)
            .expect("written");
        let ledger = Ledger::open(Some(path.clone())).expect("read");
        ledger.save().expect("nothing to save");
        assert!(std::fs::read_to_string(&path).expect("read").starts_with(r#"{"a": "#), "unchanged, not saved");
        let (a, b) = (ledger.with_key("a", |k| k.clone()), ledger.with_key("b", |k| k.clone()));
        assert_eq!((a.usage.total, a.usage.day, a.usage.today, a.trail.flagged), (5, 20000, 2, false));
        assert_eq!((b.usage.total, b.trail.flagged), (1, true));
        ledger.changed();
        ledger.save().expect("saved");
        let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
        assert_eq!(saved["a"], serde_json::json!({"total": 5, "day": 20000, "today": 2, "flagged": false}));
        assert_eq!(saved["b"], serde_json::json!({"total": 1, "day": 1, "today": 1, "flagged": true}));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "[]").expect("written");
        let err = Ledger::open(Some(bad)).err().map(|e| crate::error::Chain(&e).to_string()).expect("refused");
        assert!(err.contains("not a warden serve state file"), "{err}");
    }
}
