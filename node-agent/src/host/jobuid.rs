//! Per-job uids: on every host, each job runs under a uid no other live job
//! has, so that one job cannot connect to another's local socket, signal or
//! trace its processes, or touch its files.
//!
//! Like systemd's `DynamicUser`, the uid needs no `/etc/passwd` entry: it is
//! leased per job and host from the range `[cluster] uids`, and the job's
//! processes use the primary group of `[cluster] user` (so data shared with
//! that group stays readable). A lease is a file in [`LEASE_DIR`] (root's,
//! 0700) named after the uid and holding the job id and host, made with
//! `O_EXCL` while an exclusive `flock` on the directory's `.lock` is held:
//! two launches never get one uid. A uid is free when it has no lease, no
//! passwd entry and no process. Candidates are drawn at random from the
//! range, so a uid rarely comes back soon after its job ended.
//!
//! At the end of a job, [`end_processes`] ends every process of the uid,
//! including any that left the agent's process group with `setsid` or a
//! double fork: a child of this process switches to that uid and sends
//! SIGKILL to every process it may signal (`kill(-1)`, which the kernel
//! applies against all of them at once, so a fork cannot slip through), and
//! repeats until `/proc` shows none. Then [`release`] removes the lease.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag, openat};
use nix::sys::stat::Mode;

use crate::host::privfs::{Owner, PrivFsError, ensure_dir};
use crate::net::identity::JobId;

/// Where leases live.
pub const LEASE_DIR: &str = "/run/warden/uids";

/// The default `[cluster] uids`: above the ranges that systemd and container
/// managers hand out (dynamic users end at 65519, nspawn's container range at
/// 1879048191) and below 2^31, which some tools treat as negative.
pub const DEFAULT_RANGE: (u32, u32) = (2_000_000_000, 2_000_065_535);

/// Why a job uid could not be leased, checked or ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobUidError {
    /// Every uid of the range is taken.
    #[error(
        "no free uid in [cluster] uids = [{0}, {1}]: every one has a live job, a process or a passwd entry; widen the range, or run `warden firewall clean` to release the leases of crashed jobs"
    )]
    Exhausted(u32, u32),
    /// The lease directory or a lease file.
    #[error("job uid lease: {0}")]
    Fs(#[from] PrivFsError),
    /// A system call failed.
    #[error("{what}: {errno}")]
    Sys {
        /// What was attempted.
        what: String,
        /// What the system said.
        #[source]
        errno: Errno,
    },
    /// The launcher named a uid that is not leased to this job.
    #[error("uid {uid} is not leased to job {job} on this host ({found}); refusing to run as it")]
    NotLeased {
        /// The uid.
        uid: u32,
        /// The job.
        job: String,
        /// What the lease says instead.
        found: String,
    },
    /// Processes of the uid survived.
    #[error("{count} process(es) of uid {uid} still run after SIGKILL: {pids:?}")]
    Survivors {
        /// The uid.
        uid: u32,
        /// How many.
        count: usize,
        /// Some of their pids.
        pids: Vec<u32>,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(Errno) -> JobUidError {
    let what = what.into();
    move |errno| JobUidError::Sys { what, errno }
}

fn lease_dir() -> Result<OwnedFd, JobUidError> {
    ensure_dir(Path::new("/run/warden"), 0o755, Some(Owner::ROOT))?;
    Ok(ensure_dir(Path::new(LEASE_DIR), 0o700, Some(Owner::ROOT))?)
}

fn lock(dir: &OwnedFd) -> Result<Flock<OwnedFd>, JobUidError> {
    let flags = OFlag::O_CREAT | OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(dir, ".lock", flags, Mode::from_bits_truncate(0o600)).map_err(sys("opening the lease lock"))?;
    Flock::lock(fd, FlockArg::LockExclusive).map_err(|(_, e)| sys("locking the leases")(e))
}

fn lease_text(job: &JobId, host: &str) -> String {
    format!("job={job}\nhost={host}\n")
}

/// Leases a uid of `range` to `job` on `host` (the name in the plan).
pub fn lease(job: &JobId, host: &str, range: (u32, u32)) -> Result<u32, JobUidError> {
    let (first, last) = range;
    let dir = lease_dir()?;
    let _held = lock(&dir)?;
    let busy = uids_with_processes();
    let n = u64::from(last - first) + 1;
    let start = crate::secure_random::u64() % n;
    for i in 0..n {
        let uid = first + ((start + i) % n) as u32;
        if busy.contains(&uid) || nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten().is_some()
        {
            continue;
        }
        let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match openat(&dir, uid.to_string().as_str(), flags, Mode::from_bits_truncate(0o600)) {
            Ok(fd) => {
                std::fs::File::from(fd)
                    .write_all(lease_text(job, host).as_bytes())
                    .map_err(|e| sys("writing the lease")(io_errno(&e)))?;
                return Ok(uid);
            }
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(sys("making the lease")(e)),
        }
    }
    Err(JobUidError::Exhausted(first, last))
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

fn read_lease(dir: &OwnedFd, uid: u32) -> Result<Option<String>, JobUidError> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match openat(dir, uid.to_string().as_str(), flags, Mode::empty()) {
        Ok(fd) => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::Read::take(std::fs::File::from(fd), 4096), &mut text)
                .map_err(|e| sys("reading the lease")(io_errno(&e)))?;
            Ok(Some(text))
        }
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(sys(format!("reading the lease of uid {uid}"))(e)),
    }
}

/// Checks that `uid` is leased to `job` on this host (the agent's check of
/// what the launcher sent).
pub fn check_lease(uid: u32, job: &JobId) -> Result<(), JobUidError> {
    let dir = lease_dir()?;
    let found = read_lease(&dir, uid)?;
    match found {
        Some(text) if text.lines().next() == Some(format!("job={job}").as_str()) => Ok(()),
        other => Err(JobUidError::NotLeased {
            uid,
            job: job.to_string(),
            found: other.map_or("no lease".into(), |t| t.lines().next().unwrap_or("").to_string()),
        }),
    }
}

/// Removes `job`'s lease of `uid` (another job's lease is left alone).
pub fn release(uid: u32, job: &JobId) -> Result<(), JobUidError> {
    let dir = lease_dir()?;
    let _held = lock(&dir)?;
    if read_lease(&dir, uid)?.is_some_and(|t| t.lines().next() == Some(format!("job={job}").as_str())) {
        nix::unistd::unlinkat(&dir, uid.to_string().as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir)
            .map_err(sys("removing the lease"))?;
    }
    Ok(())
}

/// The uids leased to `job` on this host.
pub fn leases_of(job: &JobId) -> Result<Vec<u32>, JobUidError> {
    let dir = lease_dir()?;
    let _held = lock(&dir)?;
    let mut uids = Vec::new();
    for uid in lease_names()? {
        if read_lease(&dir, uid)?.is_some_and(|t| t.lines().next() == Some(format!("job={job}").as_str())) {
            uids.push(uid);
        }
    }
    Ok(uids)
}

fn lease_names() -> Result<Vec<u32>, JobUidError> {
    Ok(std::fs::read_dir(LEASE_DIR)
        .map_err(|e| sys("listing the leases")(io_errno(&e)))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .collect())
}

/// Leases whose job left nothing behind: no process of the uid and no
/// firewall table of the job (`live_tables`: the warden tables on this
/// host). Removes them and returns their uids.
pub fn release_stale(live_tables: &[String]) -> Result<Vec<u32>, JobUidError> {
    let dir = lease_dir()?;
    let _held = lock(&dir)?;
    let busy = uids_with_processes();
    let mut released = Vec::new();
    for uid in lease_names()? {
        let Some(text) = read_lease(&dir, uid)? else { continue };
        let job = text.lines().next().and_then(|l| l.strip_prefix("job=")).unwrap_or("");
        let table = JobId::try_from(job.to_string()).map(|j| crate::job::plan::firewall_table(&j)).unwrap_or_default();
        if busy.contains(&uid) || live_tables.contains(&table) {
            continue;
        }
        nix::unistd::unlinkat(&dir, uid.to_string().as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir)
            .map_err(sys("removing a stale lease"))?;
        released.push(uid);
    }
    Ok(released)
}

/// What `/proc/PID/status` says of a process: real, effective, saved and
/// filesystem uids, and whether it has ended (a zombie).
fn uids_and_state(status: &str) -> Option<(Vec<u32>, bool)> {
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let uids: Vec<u32> = uids.split_whitespace().filter_map(|u| u.parse().ok()).collect();
    let state = status.lines().find_map(|l| l.strip_prefix("State:"))?.trim_start();
    Some((uids, state.starts_with('Z') || state.starts_with('X')))
}

fn live_processes() -> impl Iterator<Item = (u32, Vec<u32>)> {
    std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        let (uids, ended) = uids_and_state(&status)?;
        (!ended).then_some((pid, uids))
    })
}

/// Uids that some live process has (as any of its four uids).
fn uids_with_processes() -> std::collections::BTreeSet<u32> {
    live_processes().flat_map(|(_, uids)| uids).collect()
}

/// Live processes (not zombies) that have `uid` as any of their uids.
pub fn processes_of(uid: u32) -> Vec<u32> {
    live_processes().filter(|(_, uids)| uids.contains(&uid)).map(|(pid, _)| pid).collect()
}

/// Ends every process of `uid` on this host (see the module doc) and
/// returns how many there were. `uid` must not be 0 or this process's own.
///
/// Forks, so it must run while this process has a single thread (the
/// `warden-agent host` commands do); it refuses otherwise.
pub fn end_processes(uid: u32) -> Result<usize, JobUidError> {
    if uid == 0 || uid == nix::unistd::getuid().as_raw() {
        return Err(sys(format!("ending the processes of uid {uid}"))(Errno::EINVAL));
    }
    let first = processes_of(uid).len();
    for _round in 0..20 {
        let left = processes_of(uid);
        if left.is_empty() {
            return Ok(first);
        }
        kill_all_as(uid)?;
        // SIGKILL is delivered asynchronously: wait (bounded) for /proc.
        let until = Instant::now() + Duration::from_secs(1);
        while !processes_of(uid).is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let left = processes_of(uid);
    if left.is_empty() {
        Ok(first)
    } else {
        Err(JobUidError::Survivors { uid, count: left.len(), pids: left.into_iter().take(8).collect() })
    }
}

/// One round of `kill(-1, SIGKILL)` from a child running as `uid`.
fn kill_all_as(uid: u32) -> Result<(), JobUidError> {
    let code = as_uid(uid, || {
        for _ in 0..10_000 {
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::Signal::SIGKILL) {
                // Nothing left that this uid may signal.
                Err(Errno::ESRCH) => return 0,
                Ok(()) => std::thread::yield_now(),
                Err(_) => return 3,
            }
        }
        // Only zombies left (they stay signalable until reaped).
        0
    })?;
    match code {
        0 => Ok(()),
        _ => Err(sys(format!("signalling the processes of uid {uid}"))(Errno::EPERM)),
    }
}

/// Sends `signal` to process group `pgid` from a child running as `uid`:
/// the kernel delivers it only to the members that uid may signal, that is
/// the job's own processes. `Ok(false)` when none was left to signal.
pub fn signal_group_as(uid: u32, pgid: u32, signal: nix::sys::signal::Signal) -> Result<bool, JobUidError> {
    let group = nix::unistd::Pid::from_raw(i32::try_from(pgid).map_err(|_| sys("signalling a group")(Errno::EINVAL))?);
    let code = as_uid(uid, || match nix::sys::signal::killpg(group, signal) {
        Ok(()) => 0,
        Err(Errno::ESRCH) => 1,
        Err(_) => 3,
    })?;
    match code {
        0 => Ok(true),
        1 => Ok(false),
        _ => Err(sys(format!("signalling process group {pgid} as uid {uid}"))(Errno::EPERM)),
    }
}

fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|t| t.trim().parse().ok()))
        .unwrap_or(usize::MAX)
}

/// Runs `work` in a child process that is `uid` (group `uid`, no other
/// groups, not dumpable) and returns its exit code; 2 means the switch
/// failed. A job process may kill that child (it has the job's uid), which
/// reads as a failure: callers check `/proc` and go again.
#[allow(unsafe_code)] // fork: see SAFETY below; the crate's other unsafe code is train::shared (mmap)
fn as_uid(uid: u32, work: impl FnOnce() -> i32) -> Result<i32, JobUidError> {
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, Gid, Uid};
    if uid == 0 {
        return Err(sys("acting as uid 0")(Errno::EINVAL));
    }
    if threads() != 1 {
        return Err(sys("switching uid in a process with threads")(Errno::EDEADLK));
    }
    // SAFETY: this process has one thread (checked just above), so the child
    // is an exact copy with no lock held by a thread that no longer exists;
    // it switches uid, does `work` and leaves with `_exit`, never returning
    // into the caller's frames.
    match unsafe { nix::unistd::fork() }.map_err(sys("fork"))? {
        ForkResult::Child => {
            let (u, g) = (Uid::from_raw(uid), Gid::from_raw(uid));
            let ok = nix::unistd::setgroups(&[g]).is_ok()
                && nix::unistd::setresgid(g, g, g).is_ok()
                && nix::unistd::setresuid(u, u, u).is_ok();
            if !ok {
                std::process::exit(2);
            }
            let _ = nix::sys::prctl::set_dumpable(false);
            // No destructors run and no Rust buffers are flushed twice.
            std::process::exit(work())
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, 2)) => {
                    return Err(sys(format!("switching to uid {uid}"))(Errno::EPERM));
                }
                Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                Ok(WaitStatus::Signaled(..)) => return Ok(4),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(sys("waiting for a child")(e)),
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_give_uids_and_whether_the_process_ended() {
        let s = "Name:\tx\nState:\tS (sleeping)\nUid:\t1\t2\t3\t4\n";
        assert_eq!(uids_and_state(s), Some((vec![1, 2, 3, 4], false)));
        let z = "State:\tZ (zombie)\nUid:\t5\t5\t5\t5\n";
        assert_eq!(uids_and_state(z), Some((vec![5; 4], true)));
        assert_eq!(uids_and_state("State:\tR\n"), None);
    }

    #[test]
    fn this_process_is_found_among_the_processes_of_its_uid() {
        let me = nix::unistd::getuid().as_raw();
        assert!(processes_of(me).contains(&std::process::id()));
        assert!(end_processes(me).is_err(), "never its own uid");
        assert!(end_processes(0).is_err(), "never root");
    }
}
