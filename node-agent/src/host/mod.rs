//! What a job needs from each host as root, around its agents: before they
//! start, a uid of its own and its firewall table ([`setup`]); after they
//! end, every process of that uid ended, the table removed and the uid
//! released ([`teardown`]); and the final model read back as the job's uid
//! ([`send_files`], [`receive_files`]).
//!
//! `warden-agent host ...` runs these on a host. The launcher runs that
//! command over SSH, or as its own child process for `--local`, so every
//! transport goes through this code.
//!
//! Beside it, what root does on a host for a job: the privilege drop
//! ([`harden`]), the per-job nftables table ([`firewall`]), the uid each
//! job has on each host, leased and ended ([`jobuid`]), what root does to
//! paths that job users can write, by file descriptor ([`privfs`]), and
//! ending process groups ([`reap`]).

pub mod firewall;
pub mod harden;
pub mod jobuid;
pub mod privfs;
pub mod reap;
pub mod slurm;

use std::io::{BufRead, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstat};
use serde::{Deserialize, Serialize};

use crate::net::identity::JobId;

/// A host operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The uid lease, its check, or ending its processes.
    #[error(transparent)]
    Uid(#[from] crate::host::jobuid::JobUidError),
    /// The firewall table.
    #[error(transparent)]
    Firewall(#[from] crate::host::firewall::FirewallError),
    /// Becoming the job's uid to read its files.
    #[error("switching to the job's uid {uid}: {errno}")]
    Drop {
        /// The uid.
        uid: u32,
        /// What the system said.
        #[source]
        errno: Errno,
    },
    /// A file of the model directory.
    #[error("{path}: {why}")]
    File {
        /// Which.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The stream of files is malformed or too large.
    #[error("the model files from the host: {0}")]
    Stream(String),
    /// Reading or writing.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What [`setup`] did, as `warden-agent host setup` prints it (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Setup {
    /// The uid leased to the job on this host; `None` without root.
    pub uid: Option<u32>,
    /// Why this host has no firewall table and no uid of the job's own.
    pub warning: Option<String>,
}

/// Leases the job a uid from `uids` and installs its firewall table
/// (`ruleset`, from the plan, with `$job_uid` defined as that uid). Without
/// root, does neither and says so.
pub fn setup(job: &JobId, host: &str, uids: (u32, u32), ruleset: &str) -> Result<Setup, HostError> {
    if !crate::host::harden::started_as_root() {
        // A Slurm step: the prolog (root) may have installed the job's table.
        let prolog = std::env::var("SLURM_JOB_ID").ok().and_then(|id| crate::host::slurm::noted(&id));
        let ports = crate::job::plan::ruleset_ports(ruleset);
        let warning = unprivileged_warning(host, prolog.as_deref(), ports.as_deref());
        return Ok(Setup { uid: None, warning: Some(warning) });
    }
    let uid = crate::host::jobuid::lease(job, host, uids)?;
    let table = crate::job::plan::firewall_table(job);
    let rules = format!("define {} = {uid}\n{ruleset}", crate::job::plan::JOB_UID_VAR);
    if let Err(e) = crate::host::firewall::install(&table, &rules) {
        let _ = crate::host::jobuid::release(uid, job);
        return Err(e.into());
    }
    Ok(Setup { uid: Some(uid), warning: None })
}

/// What a host without root says about its job's protection: `note` is
/// the Slurm prolog's note for the job, if there is one; `ports` the ones
/// this host's processes listen on (`None`: unknown). A prolog table that
/// leaves some of them out, or may, is named as such, not as the job's
/// firewall.
fn unprivileged_warning(host: &str, note: Option<&str>, ports: Option<&[u16]>) -> String {
    let step = format!("{host} runs the job as the submitting user (a Slurm step)");
    let Some(note) = note else {
        return format!(
            "not running as root on {host}: no firewall table and no uid of its own for this job there (run as root to get them)"
        );
    };
    if note.starts_with("refused") {
        return format!("{step}: no uid of its own and no firewall table for this job there; the Slurm prolog {note}");
    }
    let covered = crate::host::slurm::noted_ports(note);
    let Some(ports) = ports else {
        return format!(
            "{step}: no uid of its own for this job there, and it cannot tell which ports the job listens on \
             there, so not whether the Slurm prolog's table ({note}) covers them"
        );
    };
    let outside: Vec<String> =
        ports.iter().filter(|p| covered.is_none_or(|(a, b)| **p < a || **p > b)).map(u16::to_string).collect();
    if outside.is_empty() {
        return format!("{step}: no uid of its own for this job there; firewall from the Slurm prolog: {note}");
    }
    format!(
        "{step}: no uid of its own for this job there, and the Slurm prolog's table ({note}) does not cover \
         port(s) {} that the job listens on there: nothing limits who connects to them (the job's Slurm comment \
         must name its [cluster] ports, as `warden launch` sets it)",
        outside.join(", ")
    )
}

/// Ends every process of the job's `uid` on this host, removes the job's
/// firewall table and releases the uid. Without `uid` (a launcher that
/// died left no record of it), every uid leased to the job here. Returns
/// what it did, for the log.
pub fn teardown(job: &JobId, uid: Option<u32>) -> Result<String, HostError> {
    if !crate::host::harden::started_as_root() {
        return Ok(String::new());
    }
    let mut uids = crate::host::jobuid::leases_of(job)?;
    uids.extend(uid.filter(|u| !uids.contains(u)));
    let mut said = Vec::new();
    for &uid in &uids {
        let ended = crate::host::jobuid::end_processes(uid)?;
        if ended > 0 {
            said.push(format!("ended {ended} process(es) of uid {uid}"));
        }
    }
    crate::host::firewall::remove(&crate::job::plan::firewall_table(job))?;
    for &uid in &uids {
        crate::host::jobuid::release(uid, job)?;
        said.push(format!("released uid {uid}"));
    }
    Ok(said.join("; "))
}

/// Becomes `uid` (group `uid` too, no supplementary groups) for good, so that
/// what follows can read only what the job could. This process must have a
/// single thread (glibc applies the change to every thread anyway).
pub fn become_uid(uid: u32) -> Result<(), HostError> {
    use nix::unistd::{Gid, Uid};
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(uid));
    let err = |errno| HostError::Drop { uid, errno };
    nix::unistd::setgroups(&[g]).map_err(err)?;
    nix::unistd::setresgid(g, g, g).map_err(err)?;
    nix::unistd::setresuid(u, u, u).map_err(err)?;
    Ok(())
}

const END: &str = "end";

fn file_err(path: &Path, why: impl Into<String>) -> HostError {
    HostError::File { path: path.to_path_buf(), why: why.into() }
}

/// A name a file of the model directory may have: one plain component.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\n')
        && name != END
}

/// Writes the regular files of directory `dir` to `out`, at most
/// `max_bytes` in all: a line `LEN NAME` then LEN bytes, per file, and a
/// last line `end`. `dir` is opened without following a link, every file
/// too; a link, a directory, a hidden name or anything but a regular file
/// in `dir` is an error (warden writes none there).
pub fn send_files(dir: &Path, out: &mut impl Write, max_bytes: u64) -> Result<(), HostError> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::open(dir, flags, Mode::empty()).map_err(|e| match e {
        // With O_DIRECTORY, Linux reports a link as "not a directory".
        Errno::ELOOP | Errno::ENOTDIR if dir.symlink_metadata().is_ok_and(|m| m.is_symlink()) => {
            file_err(dir, "is a symbolic link, not the job's model directory")
        }
        e => file_err(dir, e.to_string()),
    })?;
    let mut entries = nix::dir::Dir::from_fd(fd).map_err(|e| file_err(dir, e.to_string()))?;
    let mut names: Vec<String> = Vec::new();
    for e in entries.iter() {
        let e = e.map_err(|e| file_err(dir, e.to_string()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "." && name != ".." {
            names.push(name);
        }
    }
    names.sort();
    let mut total = 0u64;
    for name in names {
        let path = dir.join(&name);
        if !plain_name(&name) {
            return Err(file_err(&path, "is not a name warden gives a model file"));
        }
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
        let fd = openat(entries.as_fd(), name.as_str(), flags, Mode::empty()).map_err(|e| match e {
            Errno::ELOOP => file_err(&path, "is a symbolic link; only regular files are fetched"),
            e => file_err(&path, e.to_string()),
        })?;
        let st = fstat(&fd).map_err(|e| file_err(&path, e.to_string()))?;
        if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() {
            return Err(file_err(&path, "is not a regular file; only regular files are fetched"));
        }
        let len = u64::try_from(st.st_size).unwrap_or(u64::MAX);
        total = total.saturating_add(len);
        if total > max_bytes {
            return Err(file_err(
                &path,
                format!("the model files exceed {max_bytes} bytes, more than the model can be"),
            ));
        }
        writeln!(out, "{len} {name}")?;
        let copied = std::io::copy(&mut std::fs::File::from(fd).take(len), out)?;
        if copied != len {
            return Err(file_err(&path, "changed size while it was read"));
        }
    }
    writeln!(out, "{END}")?;
    out.flush()?;
    Ok(())
}

/// Reads what [`send_files`] wrote into directory `dest` (made if
/// missing), checking every name and length again, at most `max_bytes` in
/// all. Returns the names written.
pub fn receive_files(input: &mut impl BufRead, dest: &Path, max_bytes: u64) -> Result<Vec<String>, HostError> {
    std::fs::create_dir_all(dest)?;
    let bad = |why: String| HostError::Stream(why);
    let mut names = Vec::new();
    let mut total = 0u64;
    loop {
        let mut line = String::new();
        if (&mut *input).take(512).read_line(&mut line)? == 0 {
            return Err(bad("ended before its last line".into()));
        }
        let line = line.strip_suffix('\n').ok_or_else(|| bad("a header line is too long".into()))?;
        if line == END {
            return Ok(names);
        }
        let (len, name) = line.split_once(' ').ok_or_else(|| bad(format!("bad header line `{line}`")))?;
        let len: u64 = len.parse().map_err(|_| bad(format!("bad length in `{line}`")))?;
        if !plain_name(name) || names.iter().any(|n| n == name) {
            return Err(bad(format!("bad file name `{name}`")));
        }
        total = total.saturating_add(len);
        if total > max_bytes {
            return Err(bad(format!("more than {max_bytes} bytes")));
        }
        let path = dest.join(name);
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                bad(format!("{} exists already", path.display()))
            } else {
                e.into()
            }
        })?;
        let copied = std::io::copy(&mut (&mut *input).take(len), &mut file)?;
        if copied != len {
            return Err(bad(format!("{name} ended after {copied} of {len} bytes")));
        }
        file.sync_all()?;
        names.push(name.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prolog_table_that_misses_the_jobs_ports_is_not_called_its_firewall() {
        let note = "warden_slurm_7 ports 29500-29509 peers 2";
        let fine = unprivileged_warning("n1", Some(note), Some(&[29500, 29509]));
        assert!(fine.contains("firewall from the Slurm prolog: warden_slurm_7"), "{fine}");
        let missed = unprivileged_warning("n1", Some(note), Some(&[29500, 29510, 31000]));
        assert!(missed.contains("does not cover port(s) 29510, 31000"), "{missed}");
        assert!(!missed.contains("firewall from the Slurm prolog"), "{missed}");
        let unknown = unprivileged_warning("n1", Some(note), None);
        assert!(unknown.contains("cannot tell which ports"), "{unknown}");
        assert!(!unknown.contains("firewall from the Slurm prolog"), "{unknown}");
        let refused = unprivileged_warning("n1", Some("refused: ports 1-2 overlap those of job 3"), Some(&[1]));
        assert!(refused.contains("no firewall table for this job there; the Slurm prolog refused"), "{refused}");
        assert!(unprivileged_warning("n1", None, Some(&[1])).contains("not running as root on n1"));
        // The whole way: the ruleset a plan makes, read back.
        let peers = ["10.0.0.1".parse().unwrap()];
        let all = std::collections::BTreeSet::from([29500, 29512]);
        let ruleset = crate::job::plan::firewall_ruleset("t", &[29500, 29512], &peers, &all);
        let ports = crate::job::plan::ruleset_ports(&ruleset);
        let said = unprivileged_warning("n1", Some(note), ports.as_deref());
        assert!(said.contains("does not cover port(s) 29512"), "{said}");
    }

    #[test]
    fn files_go_through_and_links_and_oversize_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("model.safetensors"), b"weights").unwrap();
        std::fs::write(model.join("b.json"), b"{}").unwrap();
        let mut stream = Vec::new();
        send_files(&model, &mut stream, 100).unwrap();
        let out = tmp.path().join("out");
        let names = receive_files(&mut stream.as_slice(), &out, 100).unwrap();
        assert_eq!(names, ["b.json", "model.safetensors"]);
        assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), b"weights");

        // Too large on either side.
        assert!(send_files(&model, &mut Vec::new(), 5).is_err());
        assert!(receive_files(&mut stream.as_slice(), &tmp.path().join("small"), 5).is_err());

        // A planted link, to a file or as the directory itself.
        let secret = tmp.path().join("secret");
        std::fs::write(&secret, b"root only").unwrap();
        std::os::unix::fs::symlink(&secret, model.join("x")).unwrap();
        let err = send_files(&model, &mut Vec::new(), 100).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        let link = tmp.path().join("linked");
        std::os::unix::fs::symlink(&model, &link).unwrap();
        assert!(send_files(&link, &mut Vec::new(), 100).unwrap_err().to_string().contains("symbolic link"));
    }

    #[test]
    fn a_forged_stream_cannot_name_a_path() {
        let tmp = tempfile::tempdir().unwrap();
        for stream in [&b"3 ../x\nabc\nend\n"[..], b"3 .hidden\nabc\nend\n", b"3 a\nab", b"3 a\nabc\n", b"x a\n"] {
            assert!(receive_files(&mut &stream[..], tmp.path(), 100).is_err(), "{}", String::from_utf8_lossy(stream));
        }
        assert!(!tmp.path().parent().unwrap().join("x").exists());
    }
}
