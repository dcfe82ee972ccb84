//! The `warden serve` state file: per-key usage counts kept across restarts.
//! Written readable by its owner only and replaced atomically: a fresh,
//! unpredictably named temporary file created with mode 0600 (never an
//! existing name, so never through a symlink planted there), written,
//! synced, then renamed over the state file.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

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
}
