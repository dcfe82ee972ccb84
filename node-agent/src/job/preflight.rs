//! What can be checked about a job on this machine without starting it:
//! the data files load as the workers would load them, the job user exists,
//! the job's uid can reach the `[worker]` program, and key files are
//! private.
//!
//! `warden validate` runs these after the job file parsed, and reports every
//! problem found rather than the first. A worker's agent reads the data
//! before it drops to the job's uid (see [`crate::agent`]), so the data
//! need be readable only by the user the agent starts as, not by the job.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::job::spec::JobSpec;

/// One thing wrong, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The job-file key it concerns (`[data] train_images`, ...).
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// The findings of [`check`].
#[derive(Debug, Default)]
pub struct Findings {
    /// What will make the launch fail.
    pub problems: Vec<Problem>,
    /// What could not be checked from here, and why.
    pub notes: Vec<String>,
}

/// Checks `spec` against this machine. `local`: the job's processes run
/// here (`launch --local`, or every host is a loopback address), so a file
/// missing here is a problem rather than a note.
pub fn check(spec: &JobSpec, local: bool) -> Findings {
    let mut out = Findings::default();
    check_user(spec, local, &mut out);
    check_data(spec, local, &mut out);
    if local {
        out.problems.extend(check_program(spec));
    }
    check_keys(spec, &mut out);
    out
}

/// Whether every host of the job is this machine.
pub fn all_hosts_local(spec: &JobSpec) -> bool {
    spec.cluster.hosts.iter().all(|h| h.address.is_loopback())
}

/// The job user (whose primary group the job runs with) must exist where
/// the processes run. A local job launched without root runs as its
/// launcher's user and needs none.
fn check_user(spec: &JobSpec, local: bool, out: &mut Findings) {
    if local && !nix::unistd::geteuid().is_root() {
        return;
    }
    let name = &spec.cluster.user;
    match nix::unistd::User::from_name(name) {
        Ok(Some(_)) => {}
        Ok(None) if local => out.problems.push(Problem {
                key: "[cluster] user".into(),
                message: format!(
                    "no user `{name}` on this machine; create it (useradd --system --no-create-home --shell /usr/sbin/nologin {name}) or name an existing unprivileged one"
                ),
            }),
        Ok(None) => {
            out.notes.push(format!("no user `{name}` on this machine; `warden doctor` checks that the hosts have it"))
        }
        Err(e) => out.notes.push(format!("cannot look up user `{name}`: {e}")),
    }
}

/// Loads the data as the workers will.
fn check_data(spec: &JobSpec, local: bool, out: &mut Findings) {
    let Some(data) = &spec.data else { return };
    let mut files: Vec<(String, PathBuf)> = data.train.files("train");
    if let Some(test) = &data.test {
        files.extend(test.files("test"));
    }
    let mut absent = Vec::new();
    for (key, path) in &files {
        let key = format!("[data] {key}");
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => out.problems.push(Problem { key, message: format!("{} is not a regular file", path.display()) }),
            Err(e) if local || e.kind() != std::io::ErrorKind::NotFound => {
                absent.push(path.clone());
                out.problems.push(Problem { key, message: format!("{}: {e}", path.display()) });
            }
            Err(_) => {
                absent.push(path.clone());
                out.notes.push(format!(
                    "{key} {} is not on this machine; the hosts must have it at that path",
                    path.display()
                ));
            }
        }
    }
    // The same loader the workers run, split by split so that a problem in
    // each is reported: headers against [model] inputs and classes, images
    // against labels, truncation, labels out of range.
    let mut splits = vec![&data.train];
    splits.extend(data.test.as_ref());
    for split in splits.into_iter().filter(|s| s.files("").iter().all(|(_, p)| !absent.contains(p))) {
        if let Err(e) = crate::train::data::load_files(data, split, &spec.model) {
            let (crate::train::data::DataError::Io { path, .. } | crate::train::data::DataError::Format { path, .. }) =
                &e;
            let key = files
                .iter()
                .find(|(_, p)| p == path)
                .map_or_else(|| "[data]".to_string(), |(k, _)| format!("[data] {k}"));
            out.problems.push(Problem { key, message: e.to_string() });
        }
    }
}

/// What the job's uid must be allowed to do with a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Enter a directory (`x`).
    Enter,
    /// Run a program (`x`).
    Run,
    /// Read a file, or list and enter a directory (`r`, and `x` for a directory).
    Read,
}

/// Whether the job's processes on this machine can reach the `[worker]`
/// program: its working directory, the program when named by path, and
/// every argument and `[worker] env` value that names an existing file.
///
/// A root-launched job runs under a uid leased for it alone, in the primary
/// group of `[cluster] user`; that uid owns nothing, so a path is reachable
/// through its group bits (when the file's group is that group) or its
/// other bits. Unlike the data, which the agent opens before it drops, the
/// program and everything it imports are opened by the program itself.
/// Checked by mode bits (ACLs are not consulted). Nothing to check when
/// the job runs as the launching user (no root) or has no `[worker]`.
pub fn check_program(spec: &JobSpec) -> Vec<Problem> {
    let Some(w) = &spec.worker else { return Vec::new() };
    if !nix::unistd::geteuid().is_root() {
        return Vec::new();
    }
    let Ok(Some(user)) = nix::unistd::User::from_name(&spec.cluster.user) else { return Vec::new() };
    let gid = user.gid.as_raw();
    let mut paths: Vec<(String, PathBuf, Need)> = vec![("[worker] workdir".into(), w.workdir.clone(), Need::Enter)];
    if w.command[0].contains('/') {
        paths.push(("[worker] command".into(), w.workdir.join(&w.command[0]), Need::Run));
    }
    for arg in &w.command[1..] {
        paths.push(("[worker] command".into(), w.workdir.join(arg), Need::Read));
    }
    for (k, v) in &w.env {
        paths.extend(v.split(':').map(|p| (format!("[worker] env {k}"), w.workdir.join(p), Need::Read)));
    }
    let mut problems = Vec::new();
    for (key, path, need) in paths {
        // An argument that names no file is just an argument.
        if need == Need::Read && !path.exists() {
            continue;
        }
        if let Err(blocked) = reachable(&path, need, gid) {
            let message = format!(
                "the job's uid cannot reach {}: {blocked}; move it where others can read it (e.g. under /opt or /srv) or open up that directory",
                path.display()
            );
            if !problems.iter().any(|p: &Problem| p.message == message) {
                problems.push(Problem { key, message });
            }
        }
    }
    problems
}

/// What keeps a job's uid from a path.
#[derive(Debug, thiserror::Error)]
enum Blocked {
    /// The path cannot be looked at (it vanished, say).
    #[error("{}: {source}", path.display())]
    Unreadable { path: PathBuf, source: std::io::Error },
    /// Its mode bits keep others (or the job's group) out.
    #[error("{} is mode {mode:04o}, owned by {owner}", path.display())]
    Mode { path: PathBuf, mode: u32, owner: String },
}

/// Walks `path` as a uid that owns nothing, in group `gid`, would: every
/// directory on the way (of the path as written and of its resolved form)
/// must let it enter, and the path itself must allow `need`.
fn reachable(path: &std::path::Path, need: Need, gid: u32) -> Result<(), Blocked> {
    let unreadable = |source| Blocked::Unreadable { path: path.to_path_buf(), source };
    let lexical = std::path::absolute(path).map_err(unreadable)?;
    let resolved = std::fs::canonicalize(&lexical).map_err(unreadable)?;
    for p in [&lexical, &resolved] {
        for dir in p.ancestors().skip(1) {
            allows(dir, Need::Enter, gid)?;
        }
    }
    allows(&resolved, need, gid)
}

/// Whether `path`'s mode bits give a uid that owns nothing, in group
/// `gid`, what it needs; the error names the path, its mode and owner.
fn allows(path: &std::path::Path, need: Need, gid: u32) -> Result<(), Blocked> {
    let m = std::fs::metadata(path).map_err(|source| Blocked::Unreadable { path: path.to_path_buf(), source })?;
    let bits = if m.gid() == gid { (m.mode() >> 3) & 0o7 } else { m.mode() & 0o7 };
    let wanted = match need {
        Need::Enter | Need::Run => 0o1,
        Need::Read if m.is_dir() => 0o5,
        Need::Read => 0o4,
    };
    if bits & wanted == wanted {
        return Ok(());
    }
    let owner =
        nix::unistd::User::from_uid(m.uid().into()).ok().flatten().map_or_else(|| m.uid().to_string(), |u| u.name);
    Err(Blocked::Mode { path: path.to_path_buf(), mode: m.mode() & 0o7777, owner })
}

/// Key files the launcher reads must be its user's alone.
fn check_keys(spec: &JobSpec, out: &mut Findings) {
    if let Some(key_file) = spec.checkpoint.as_ref().and_then(|c| c.key_file.as_ref())
        && let Err(e) = crate::store::checkpoint::CheckpointSecret::load(key_file)
    {
        out.problems.push(Problem { key: "[checkpoint] key_file".into(), message: e.to_string() });
    }
    if let Some(signing) = &spec.signing {
        let key = &signing.key;
        match std::fs::symlink_metadata(key) {
            Ok(m) if !m.is_file() => out.problems.push(Problem {
                key: "[signing] key".into(),
                message: format!("{} is not a regular file", key.display()),
            }),
            Ok(m) if m.mode() & 0o077 != 0 => out.problems.push(Problem {
                key: "[signing] key".into(),
                message: format!(
                    "{} has mode {:04o}; a private key must be readable by its owner only: chmod 600 {0}",
                    key.display(),
                    m.mode() & 0o777
                ),
            }),
            Ok(_) => {}
            Err(e) => {
                out.problems.push(Problem { key: "[signing] key".into(), message: format!("{}: {e}", key.display()) })
            }
        }
    }
}
