//! What can be checked about a job on this machine without starting it:
//! the data files load as the workers would load them, the job user exists,
//! and key files are private.
//!
//! `warden validate` runs these after the job file parsed, and reports every
//! problem found rather than the first. A worker's agent reads the data
//! before it drops to the job's uid (see [`crate::agent`]), so the data
//! need be readable only by the user the agent starts as, not by the job.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::spec::JobSpec;

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
        if let Err(e) = crate::data::load_files(data, split, &spec.model) {
            let (crate::data::DataError::Io { path, .. } | crate::data::DataError::Format { path, .. }) = &e;
            let key = files
                .iter()
                .find(|(_, p)| p == path)
                .map_or_else(|| "[data]".to_string(), |(k, _)| format!("[data] {k}"));
            out.problems.push(Problem { key, message: e.to_string() });
        }
    }
}

/// Key files the launcher reads must be its user's alone.
fn check_keys(spec: &JobSpec, out: &mut Findings) {
    if let Some(key_file) = spec.checkpoint.as_ref().and_then(|c| c.key_file.as_ref())
        && let Err(e) = crate::checkpoint::CheckpointSecret::load(key_file)
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
