//! Scratch directories: [`scratch`] makes one per test, removed when its
//! guard drops.

use std::path::{Path, PathBuf};

/// A fresh scratch directory for one test under the system's temporary
/// directory, removed with all it holds when the returned guard drops.
pub fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("warden-{name}-{}-{}", std::process::id(), crate::fresh_tag()));
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// A test's scratch directory; derefs to its path. Dropping it removes the
/// directory, also when the test panicked: run directories and checkpoints
/// reach hundreds of megabytes, and a suite that keeps them fills the disk
/// after a few runs (which is how a CI run once failed with ENOSPC). Set
/// `WARDEN_KEEP_SCRATCH=1` to keep them for a post-mortem.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("WARDEN_KEEP_SCRATCH").is_some_and(|v| !v.is_empty() && v != "0") {
            eprintln!("kept scratch directory {} (WARDEN_KEEP_SCRATCH)", self.0.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("could not remove scratch directory {}: {e}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    /// The guard removes its directory with everything in it, also when
    /// the test holding it panics (and keeps it under WARDEN_KEEP_SCRATCH).
    #[test]
    fn scratch_directories_are_removed_on_drop_and_on_panic() {
        let keep = std::env::var_os("WARDEN_KEEP_SCRATCH").is_some_and(|v| !v.is_empty() && v != "0");
        let dir = super::scratch("guard");
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/b/file"), b"x").unwrap();
        let path = dir.to_path_buf();
        drop(dir);
        assert_eq!(path.exists(), keep);

        let held = std::sync::Mutex::new(None);
        let r = std::panic::catch_unwind(|| {
            let dir = super::scratch("guard-panic");
            *held.lock().unwrap() = Some(dir.to_path_buf());
            panic!("a failing test");
        });
        assert!(r.is_err());
        let held = held.lock().unwrap().clone().unwrap();
        assert_eq!(held.exists(), keep);
        if keep {
            let _ = (std::fs::remove_dir_all(&path), std::fs::remove_dir_all(&held));
        }
    }
}
