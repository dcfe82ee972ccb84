//! Finding processes: one finder, [`Procs`], with filters (a test's tag,
//! the executable's name or directory, the name a process gives itself, its
//! parent, its uid, its command line), tags to find a test's processes by
//! ([`fresh_tag`]), and [`wait_gone`] for checking that a job left nothing
//! running.
//!
//! ```no_run
//! # let tag = "t";
//! use warden_tests::Procs;
//! // The agents of the job launched with WARDEN_TEST_TAG=tag ...
//! let agents = Procs::agents(tag).pids();
//! // ... the programs they started (without the tag: a clean environment) ...
//! let programs = Procs::all().children_of(&agents).exe_contains("python").pids();
//! // ... and the server agent that calls itself `wd-server-0`.
//! let server = Procs::agents(tag).comm("wd-server-0").first();
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A query over the live processes of this machine, other than the test
/// process itself. Each filter narrows it; [`Procs::pids`] runs it.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Procs {
    tag: Option<String>,
    exe_name: Option<String>,
    exe_contains: Option<String>,
    exe_under: Option<PathBuf>,
    comm: Option<String>,
    parents: Option<Vec<u32>>,
    uid: Option<u32>,
    cmdline_contains: Option<String>,
}

impl Procs {
    /// Every live process.
    pub fn all() -> Procs {
        Procs::default()
    }

    /// Processes whose environment holds `WARDEN_TEST_TAG=tag` (what
    /// [`crate::spawn_launch`] sets, and the launcher passes on to local
    /// agents). Zombies have an empty environment, so they never match:
    /// they are gone in every sense that matters here.
    pub fn tagged(tag: &str) -> Procs {
        Procs { tag: Some(tag.to_string()), ..Procs::default() }
    }

    /// The `warden-agent` processes of the job launched with `tag`.
    pub fn agents(tag: &str) -> Procs {
        Procs::tagged(tag).exe_name("warden-agent")
    }

    /// Whose executable's file name is `name`.
    pub fn exe_name(mut self, name: &str) -> Procs {
        self.exe_name = Some(name.to_string());
        self
    }

    /// Whose executable's path contains `part`.
    pub fn exe_contains(mut self, part: &str) -> Procs {
        self.exe_contains = Some(part.to_string());
        self
    }

    /// Whose executable lies under `dir`.
    pub fn exe_under(mut self, dir: &Path) -> Procs {
        self.exe_under = Some(dir.to_path_buf());
        self
    }

    /// That call themselves `comm` (`/proc/PID/comm`; each agent names
    /// itself `wd-scheduler`, `wd-server-0`, `wd-worker-1`, ...).
    pub fn comm(mut self, comm: &str) -> Procs {
        self.comm = Some(comm.to_string());
        self
    }

    /// Whose parent is one of `parents`.
    pub fn children_of(mut self, parents: &[u32]) -> Procs {
        self.parents = Some(parents.to_vec());
        self
    }

    /// Whose real uid is `uid`.
    pub fn uid(mut self, uid: u32) -> Procs {
        self.uid = Some(uid);
        self
    }

    /// Whose command line (arguments joined by NUL) contains `part`.
    pub fn cmdline_contains(mut self, part: &str) -> Procs {
        self.cmdline_contains = Some(part.to_string());
        self
    }

    /// The PIDs that pass every filter, in `/proc` order.
    pub fn pids(&self) -> Vec<u32> {
        let me = std::process::id();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != me && self.matches(*pid))
            .collect()
    }

    /// The first PID that passes every filter.
    pub fn first(&self) -> Option<u32> {
        self.pids().into_iter().next()
    }

    /// Whether `pid` passes every filter (the cheap ones first: a process
    /// may end between two reads, and then fails the next one).
    fn matches(&self, pid: u32) -> bool {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        if let Some(comm) = &self.comm
            && !std::fs::read_to_string(proc.join("comm")).is_ok_and(|c| c.trim_end() == comm)
        {
            return false;
        }
        if let Some(parents) = &self.parents
            && !parent(pid).is_some_and(|p| parents.contains(&p))
        {
            return false;
        }
        if let Some(uid) = self.uid
            && status_field(pid, "Uid:").and_then(|u| u.split_whitespace().next()?.parse::<u32>().ok()) != Some(uid)
        {
            return false;
        }
        if self.exe_name.is_some() || self.exe_contains.is_some() || self.exe_under.is_some() {
            let Ok(exe) = std::fs::read_link(proc.join("exe")) else { return false };
            if self.exe_name.as_ref().is_some_and(|n| exe.file_name().is_none_or(|f| f != n.as_str()))
                || self.exe_contains.as_ref().is_some_and(|p| !exe.to_string_lossy().contains(p.as_str()))
                || self.exe_under.as_ref().is_some_and(|d| !exe.starts_with(d))
            {
                return false;
            }
        }
        if let Some(part) = &self.cmdline_contains
            && !std::fs::read(proc.join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(part.as_str()))
        {
            return false;
        }
        if let Some(tag) = &self.tag {
            let needle = format!("WARDEN_TEST_TAG={tag}");
            let Ok(env) = std::fs::read(proc.join("environ")) else { return false };
            if !env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
                return false;
            }
        }
        true
    }
}

/// The parent PID of `pid`, from `/proc/PID/stat` (after the command name,
/// which may itself hold spaces and parentheses).
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The value of the line `key` (e.g. `"Uid:"`, `"VmRSS:"`) of
/// `/proc/PID/status`, trimmed; `None` once the process is gone.
pub fn status_field(pid: u32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string())
}

/// Whether `pid` is a live process (a zombie has ended).
pub fn alive(pid: u32) -> bool {
    status_field(pid, "State:").is_some_and(|st| !st.starts_with('Z'))
}

/// A fresh random tag for [`Procs::tagged`] (and [`crate::spawn_launch`]).
pub fn fresh_tag() -> String {
    warden_agent::net::identity::JobId::generate().to_string()
}

/// Waits up to 15 s until no process carries `tag`, and fails the test
/// naming those left behind.
pub fn wait_gone(tag: &str) {
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        if Procs::tagged(tag).pids().is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("processes left behind: {:?}", Procs::tagged(tag).pids());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every filter finds a child of this test, and a filter it fails
    /// leaves it out.
    #[test]
    fn each_filter_finds_a_tagged_child_and_excludes_what_does_not_match() {
        let tag = fresh_tag();
        let mut child =
            std::process::Command::new("sleep").arg("61.5").env("WARDEN_TEST_TAG", &tag).spawn().expect("sleep runs");
        let pid = child.id();
        // Until the child's exec is complete, /proc shows this test's
        // environment and executable, or an empty environment and command
        // line (the kernel sets up both last, together).
        let until = Instant::now() + Duration::from_secs(10);
        while !std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.ends_with(b"61.5\0")) {
            assert!(Instant::now() < until, "sleep never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        let uid = nix::unistd::Uid::current().as_raw();
        let found = [
            Procs::tagged(&tag),
            Procs::tagged(&tag).exe_name("sleep").comm("sleep"),
            Procs::all().children_of(&[std::process::id()]).cmdline_contains("61.5"),
            Procs::tagged(&tag).uid(uid).exe_contains("sleep"),
            Procs::tagged(&tag).exe_under(Path::new("/")),
        ];
        for query in &found {
            assert_eq!(query.pids(), [pid], "{query:?}");
        }
        let missed = [
            Procs::tagged(&fresh_tag()),
            Procs::tagged(&tag).exe_name("warden-agent"),
            Procs::tagged(&tag).comm("wd-server-0"),
            Procs::tagged(&tag).children_of(&[1]),
            Procs::tagged(&tag).uid(uid + 1),
            Procs::tagged(&tag).exe_under(Path::new("/nonexistent")),
        ];
        for query in &missed {
            assert!(query.pids().is_empty(), "{query:?}");
        }
        assert_eq!(parent(pid), Some(std::process::id()));
        assert!(alive(pid));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!alive(pid));
        wait_gone(&tag);
    }
}
