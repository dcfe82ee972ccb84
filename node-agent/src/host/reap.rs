//! Ending an agent's whole process group: SIGTERM, a grace period, SIGKILL.
//!
//! Every agent starts its own session (so its process group holds it and
//! whatever it starts, such as a `[worker] command` and that program's own
//! children) and reports its PID with the process's start time. The launcher
//! later ends the group through `warden-agent stop-group` on the agent's host
//! (or directly, for `--local`), after the agent failed to stop on request.
//! The start time guards against a reused PID: a group is signalled only
//! while its leader is the process that was reported, or, once the leader is
//! gone, while members remain (Linux does not hand out a PID that is still
//! some group's id, so those members are ours).

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Why a process group could not be led or ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReapError {
    /// `setsid` failed.
    #[error("setsid: {0}")]
    Setsid(#[source] Errno),
    /// This process's own start time is unreadable.
    #[error("cannot read /proc/self/stat")]
    OwnStat,
    /// Not an id a group of ours can have (0, 1 or beyond `i32`).
    #[error("{0} is not a process group")]
    NotAGroup(u32),
    /// Signalling the group failed.
    #[error("cannot signal process group {pgid}: {source}")]
    Signal {
        /// The group.
        pgid: u32,
        /// Cause.
        #[source]
        source: Errno,
    },
    /// Signalling the group as the job's uid failed.
    #[error(transparent)]
    AsJobUid(#[from] crate::host::jobuid::JobUidError),
}

/// How a group ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Nothing of it was running.
    AlreadyGone,
    /// The PID now belongs to another process: nothing was signalled.
    NotOurs,
    /// It ended within the grace period after SIGTERM.
    Terminated,
    /// It was still running after the grace period and got SIGKILL.
    Killed,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ended::AlreadyGone => "already gone",
            Ended::NotOurs => "its process id belongs to another process now; nothing signalled",
            Ended::Terminated => "ended after SIGTERM",
            Ended::Killed => "killed with SIGKILL after the grace period",
        })
    }
}

/// The start time of `pid` in clock ticks since boot (field 22 of
/// `/proc/PID/stat`), or `None` when there is no such process.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // after it are counted from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Makes this process the leader of a new session and process group, so
/// that [`stop_group`] reaches it and everything it starts. Returns its PID
/// and start time for the report to the launcher.
pub fn lead_own_group() -> Result<(u32, u64), ReapError> {
    // EPERM means it already leads a group (a shell started it so): fine.
    match nix::unistd::setsid() {
        Ok(_) | Err(Errno::EPERM) => {}
        Err(e) => return Err(ReapError::Setsid(e)),
    }
    let pid = std::process::id();
    let start = start_ticks(pid).ok_or(ReapError::OwnStat)?;
    Ok((pid, start))
}

/// Processes of group `pgid` that still run. Zombies do not count: they
/// have ended, and reaping them is their parent's business (signal 0 to the
/// group would still find them).
pub fn live_members(pgid: u32) -> usize {
    members_of(pgid, None)
}

/// [`live_members`], counting only processes that have `uid` (when given)
/// as one of their uids.
fn members_of(pgid: u32, uid: Option<u32>) -> usize {
    let Some(uid) = uid else { return members_any(pgid) };
    crate::host::jobuid::processes_of(uid).into_iter().filter(|pid| pgrp(*pid) == Some(pgid)).count()
}

fn pgrp(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(2)?.parse().ok()
}

fn members_any(pgid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let Some(close) = stat.rfind(')') else { return false };
            let mut f = stat[close + 1..].split_whitespace();
            // state, ppid, pgrp
            let state = f.next();
            state != Some("Z") && state != Some("X") && f.nth(1).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
        })
        .count()
}

/// Ends process group `pgid` whose leader started at `start`: SIGTERM,
/// up to `grace` for it to go, then SIGKILL. Returns once the group is gone
/// (or after SIGKILL's delivery has been waited for up to a second).
///
/// With `uid` (the job's uid on this host), the signals come from a child
/// process running as that uid ([`crate::host::jobuid::signal_group_as`]), so
/// they reach only the job's own processes in the group, whatever the
/// reported PID has become; this process must then be single-threaded
/// (`warden-agent stop-group` is).
pub fn stop_group(pgid: u32, start: u64, grace: Duration, uid: Option<u32>) -> Result<Ended, ReapError> {
    let id = i32::try_from(pgid).ok().filter(|p| *p > 1).ok_or(ReapError::NotAGroup(pgid))?;
    let group = Pid::from_raw(id);
    match start_ticks(pgid) {
        Some(t) if t != start => return Ok(Ended::NotOurs),
        _ => {}
    }
    if members_of(pgid, uid) == 0 {
        return Ok(Ended::AlreadyGone);
    }
    let signal = |sig: Signal| -> Result<bool, ReapError> {
        match uid {
            Some(uid) => Ok(crate::host::jobuid::signal_group_as(uid, pgid, sig)?),
            None => match killpg(group, sig) {
                Err(Errno::ESRCH) => Ok(false),
                Err(source) => Err(ReapError::Signal { pgid, source }),
                Ok(()) => Ok(true),
            },
        }
    };
    if !signal(Signal::SIGTERM)? {
        return Ok(Ended::AlreadyGone);
    }
    let until = Instant::now() + grace;
    loop {
        if members_of(pgid, uid) == 0 {
            return Ok(Ended::Terminated);
        }
        if Instant::now() >= until {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !signal(Signal::SIGKILL)? {
        return Ok(Ended::Terminated);
    }
    let until = Instant::now() + Duration::from_secs(1);
    while members_of(pgid, uid) > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Ended::Killed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// A group with a leader shell and two children, ignoring SIGTERM when
    /// `stubborn`. Its PID, and a thread that reaps the leader (as the
    /// agent's parent, sshd or sudo or the launcher, does).
    fn group(stubborn: bool) -> (u32, std::thread::JoinHandle<()>) {
        let trap = if stubborn { "trap '' TERM; " } else { "" };
        let child = std::process::Command::new("sh")
            .args(["-c", &format!("{trap}sleep 60 & sleep 60 & wait")])
            .process_group(0)
            .spawn()
            .unwrap();
        // Let the children start.
        let until = Instant::now() + Duration::from_secs(5);
        while members(child.id()) < 3 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(members(child.id()), 3);
        let pid = child.id();
        let mut child = child;
        (pid, std::thread::spawn(move || drop(child.wait())))
    }

    use super::live_members as members;

    #[test]
    fn sigterm_ends_a_willing_group_and_sigkill_a_stubborn_one() {
        for (stubborn, want) in [(false, Ended::Terminated), (true, Ended::Killed)] {
            let (leader, reaper) = group(stubborn);
            let start = start_ticks(leader).unwrap();
            let got = stop_group(leader, start, Duration::from_millis(500), None).unwrap();
            reaper.join().unwrap();
            assert_eq!(got, want, "stubborn: {stubborn}");
            assert_eq!(members(leader), 0, "stubborn: {stubborn}: members left");
            assert_eq!(stop_group(leader, start, Duration::ZERO, None).unwrap(), Ended::AlreadyGone);
        }
    }

    #[test]
    fn a_reused_pid_is_left_alone() {
        let (leader, reaper) = group(false);
        let start = start_ticks(leader).unwrap();
        assert_eq!(stop_group(leader, start + 1, Duration::ZERO, None).unwrap(), Ended::NotOurs);
        assert_eq!(members(leader), 3, "nothing was signalled");
        stop_group(leader, start, Duration::from_secs(1), None).unwrap();
        reaper.join().unwrap();
        assert!(stop_group(1, 0, Duration::ZERO, None).is_err(), "never init's group");
    }

    #[test]
    fn start_ticks_reads_past_odd_command_names() {
        assert!(start_ticks(std::process::id()).is_some_and(|t| t > 0));
        assert_eq!(start_ticks(u32::MAX), None);
    }
}
