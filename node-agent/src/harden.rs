//! Dropping everything: the agent's privileged set-up and the point of no
//! return after it.
//!
//! As root the agent resolves the job's uid, creates the job directory (owned
//! by that uid, mode 0700, see [`crate::privfs`]), then drops, in this order, on the only thread
//! there is (capset, `PR_CAPBSET_DROP` and `no_new_privs` act on the calling
//! thread only; every later thread inherits the result):
//!
//! 1. ambient, bounding and inheritable capability sets cleared (bounding
//!    needs CAP_SETPCAP, so before the uid change);
//! 2. `setgroups([gid])`, `setresgid`, `setresuid` to the job user;
//! 3. effective and permitted sets cleared (a safety net: the uid change
//!    already emptied them);
//! 4. `no_new_privs` set;
//! 5. a seccomp filter installed: an allow-list of the system calls the
//!    roles use ([`ALLOWED`]); **any other system call fails with EPERM**
//!    (nothing is killed, so a library probing an optional call degrades
//!    instead of crashing). `execve`, `ptrace`, `mount`, `setuid` and the
//!    like are not on the list.
//!
//! Then [`verify`] reads `/proc/thread-self/status` and refuses to continue unless
//! Uid and Gid are not 0, all five capability sets are 0, NoNewPrivs is 1
//! and Seccomp is 2.
//!
//! Started without root, the agent cannot change user or drop the bounding
//! set; it says so once, loudly, and still sets `no_new_privs` and the
//! seccomp filter. There is no option to train as root.

use std::collections::BTreeMap;

use caps::CapSet;
use nix::unistd::{Gid, Uid, User};
use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};

/// Why hardening failed; every variant stops the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HardenError {
    /// The job user does not exist.
    #[error("user `{0}` does not exist on this host; create it (playbooks/node-prep.yml does) or set [cluster] user")]
    NoUser(String),
    /// The job user is root.
    #[error("user `{0}` has uid 0; training never runs as root: set [cluster] user to an unprivileged account")]
    RootUser(String),
    /// A step of the drop failed.
    #[error("{step}: {detail}")]
    Step {
        /// Which step.
        step: &'static str,
        /// What the system said.
        detail: String,
    },
    /// The process is not as unprivileged as it must be.
    #[error("refusing to continue: {0}")]
    Verify(String),
}

fn step(step: &'static str) -> impl Fn(String) -> HardenError {
    move |detail| HardenError::Step { step, detail }
}

/// The job user's ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// Whether this process started as root.
pub fn started_as_root() -> bool {
    Uid::effective().is_root()
}

/// Looks up the job user; refuses root.
pub fn resolve_user(name: &str) -> Result<JobUser, HardenError> {
    let user = User::from_name(name)
        .map_err(|e| step("looking up the job user")(e.to_string()))?
        .ok_or_else(|| HardenError::NoUser(name.to_string()))?;
    if user.uid.is_root() || user.gid.as_raw() == 0 {
        return Err(HardenError::RootUser(name.to_string()));
    }
    Ok(JobUser { uid: user.uid.as_raw(), gid: user.gid.as_raw() })
}

/// Drops to `user` (when root) and installs `no_new_privs` and the seccomp
/// filter. Must run before any other thread exists.
pub fn drop_privileges(user: Option<JobUser>) -> Result<(), HardenError> {
    drop_identity(user)?;
    install_seccomp()
}

/// [`drop_privileges`] without the seccomp filter: the job user, no
/// capabilities, `no_new_privs`. A program started now (`[worker] command`)
/// runs with exactly that; the agent then installs its filter with
/// [`install_seccomp_with_child`].
pub fn drop_identity(user: Option<JobUser>) -> Result<(), HardenError> {
    let clear = |set: CapSet, what: &'static str| caps::clear(None, set).map_err(|e| step(what)(e.to_string()));
    clear(CapSet::Ambient, "clearing the ambient capabilities")?;
    if let Some(u) = user {
        for cap in caps::all() {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| step("clearing the bounding set")(e.to_string()))?;
        }
        clear(CapSet::Inheritable, "clearing the inheritable capabilities")?;
        let gid = Gid::from_raw(u.gid);
        let uid = Uid::from_raw(u.uid);
        nix::unistd::setgroups(&[gid]).map_err(|e| step("setgroups")(e.to_string()))?;
        nix::unistd::setresgid(gid, gid, gid).map_err(|e| step("setresgid")(e.to_string()))?;
        nix::unistd::setresuid(uid, uid, uid).map_err(|e| step("setresuid")(e.to_string()))?;
        clear(CapSet::Effective, "clearing the effective capabilities")?;
        clear(CapSet::Permitted, "clearing the permitted capabilities")?;
    } else {
        clear(CapSet::Inheritable, "clearing the inheritable capabilities")?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| step("setting no_new_privs")(e.to_string()))
}

/// System calls the roles use: memory, threads, time, files in the job
/// directory and the data, TCP sockets, and readiness polling.
pub const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_fcntl,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_uname,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_tgkill,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
];

fn arg_in(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, HardenError> {
    values
        .iter()
        .map(|v| {
            let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *v)
                .map_err(|e| step("building the seccomp filter")(e.to_string()))?;
            SeccompRule::new(vec![cond]).map_err(|e| step("building the seccomp filter")(e.to_string()))
        })
        .collect()
}

/// The compiled filter: [`ALLOWED`] unconditionally, `socket` only for
/// IPv4, IPv6 and Unix sockets, `ioctl` only for the non-blocking and
/// close-on-exec requests, `prctl` only to name threads; everything else EPERM.
pub fn filter() -> Result<seccompiler::BpfProgram, HardenError> {
    filter_with_child(None)
}

/// [`filter`], plus waiting for and killing (only) the process `child`.
pub fn filter_with_child(child: Option<u32>) -> Result<seccompiler::BpfProgram, HardenError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|s| (*s, Vec::new())).collect();
    if let Some(pid) = child {
        rules.insert(libc::SYS_wait4, arg_in(0, &[u64::from(pid)])?);
        rules.insert(libc::SYS_kill, arg_in(0, &[u64::from(pid)])?);
    }
    rules.insert(libc::SYS_socket, arg_in(0, &[libc::AF_INET as u64, libc::AF_INET6 as u64, libc::AF_UNIX as u64])?);
    rules.insert(libc::SYS_socketpair, arg_in(0, &[libc::AF_UNIX as u64])?);
    rules.insert(libc::SYS_ioctl, arg_in(1, &[libc::FIONBIO, libc::FIOCLEX, libc::FIONREAD, libc::TCGETS])?);
    rules.insert(libc::SYS_prctl, arg_in(0, &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64])?);
    #[cfg(target_arch = "x86_64")]
    let arch = seccompiler::TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    let arch = seccompiler::TargetArch::aarch64;
    let f = SeccompFilter::new(rules, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow, arch)
        .map_err(|e| step("building the seccomp filter")(e.to_string()))?;
    f.try_into().map_err(|e: seccompiler::BackendError| step("compiling the seccomp filter")(e.to_string()))
}

/// Installs [`filter`] on the calling thread (and so on every thread it starts).
pub fn install_seccomp() -> Result<(), HardenError> {
    install_seccomp_with_child(None)
}

/// Installs [`filter_with_child`] on the calling thread.
pub fn install_seccomp_with_child(child: Option<u32>) -> Result<(), HardenError> {
    let program = filter_with_child(child)?;
    seccompiler::apply_filter(&program).map_err(|e| step("installing the seccomp filter")(e.to_string()))
}

/// What `/proc/self/status` says about privileges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Real, effective, saved and filesystem uids.
    pub uids: Vec<u32>,
    /// Real, effective, saved and filesystem gids.
    pub gids: Vec<u32>,
    /// CapInh, CapPrm, CapEff, CapBnd, CapAmb as hex masks.
    pub caps: Vec<(String, u64)>,
    /// NoNewPrivs.
    pub no_new_privs: u32,
    /// Seccomp mode (2 = filter).
    pub seccomp: u32,
}

/// Parses the privilege lines of a `/proc/PID/status` text.
pub fn parse_status(text: &str) -> Result<Status, String> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(str::trim)
            .ok_or_else(|| format!("no {name} line in /proc status"))
    };
    let ids = |name: &str| -> Result<Vec<u32>, String> {
        field(name)?.split_whitespace().map(|v| v.parse().map_err(|_| format!("bad {name}"))).collect()
    };
    let mut caps = Vec::new();
    for name in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        caps.push((name.to_string(), u64::from_str_radix(field(name)?, 16).map_err(|_| format!("bad {name}"))?));
    }
    Ok(Status {
        uids: ids("Uid")?,
        gids: ids("Gid")?,
        caps,
        no_new_privs: field("NoNewPrivs")?.parse().map_err(|_| "bad NoNewPrivs")?,
        seccomp: field("Seccomp")?.parse().map_err(|_| "bad Seccomp")?,
    })
}

/// Checks this process: with `dropped` (started as root), Uid/Gid not 0 and
/// all five capability sets 0; always NoNewPrivs 1 and Seccomp 2. Without
/// root the bounding set cannot be cleared and is not checked.
pub fn verify(dropped: bool) -> Result<Status, HardenError> {
    // thread-self: capabilities, no_new_privs and seccomp are per thread, and
    // this is the thread that every later one inherits from.
    let text = std::fs::read_to_string("/proc/thread-self/status")
        .map_err(|e| HardenError::Verify(format!("cannot read /proc/thread-self/status: {e}")))?;
    let st = parse_status(&text).map_err(HardenError::Verify)?;
    let mut problems = Vec::new();
    if dropped {
        if st.uids.contains(&0) {
            problems.push(format!("Uid {:?} contains 0", st.uids));
        }
        if st.gids.contains(&0) {
            problems.push(format!("Gid {:?} contains 0", st.gids));
        }
    }
    for (name, mask) in &st.caps {
        if *mask != 0 && (dropped || name != "CapBnd") {
            problems.push(format!("{name} is {mask:016x}"));
        }
    }
    if st.no_new_privs != 1 {
        problems.push(format!("NoNewPrivs is {}", st.no_new_privs));
    }
    if st.seccomp != 2 {
        problems.push(format!("Seccomp is {}", st.seccomp));
    }
    if problems.is_empty() { Ok(st) } else { Err(HardenError::Verify(problems.join(", "))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing() {
        let text = "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nCapInh:\t0000000000000000\n\
                    CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n\
                    NoNewPrivs:\t1\nSeccomp:\t2\n";
        let st = parse_status(text).unwrap();
        assert_eq!(st.uids, vec![1000; 4]);
        assert_eq!(st.caps[3], ("CapBnd".to_string(), 0x1ff_ffff_ffff));
        assert_eq!((st.no_new_privs, st.seccomp), (1, 2));
        assert!(parse_status("Uid:\t0\n").is_err());
    }

    #[test]
    fn the_filter_compiles() {
        assert!(filter().unwrap().len() > ALLOWED.len());
    }
}

/// The forbidden-call test runs in a child process (the test binary run
/// again), since a seccomp filter cannot be removed once installed.
#[cfg(test)]
mod seccomp_tests {
    const CHILD: &str = "WARDEN_SECCOMP_CHILD";

    /// In the child: harden, then try what the filter forbids. Exit codes:
    /// 0 all refused with EPERM, 10+ something got through, 2 set-up failed.
    fn child() -> ! {
        use std::os::unix::process::CommandExt;
        let root = super::started_as_root();
        let user = if root { super::resolve_user("nobody").ok() } else { None };
        if super::drop_privileges(user).is_err() || super::verify(root).is_err() {
            std::process::exit(2);
        }
        // execve: the exec error comes back from spawn.
        let exec = std::process::Command::new("/bin/true").exec();
        if exec.raw_os_error() != Some(libc::EPERM) {
            std::process::exit(10);
        }
        // A raw packet socket (sniffing) and ptrace.
        // SAFETY: plain system calls with constant arguments; results are
        // only compared, and a returned descriptor would simply leak.
        let sock = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        let sock_err = std::io::Error::last_os_error().raw_os_error();
        if sock != -1 || sock_err != Some(libc::EPERM) {
            std::process::exit(11);
        }
        // SAFETY: as above.
        let pt = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
        if pt != -1 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
            std::process::exit(12);
        }
        // An allowed call still works.
        if std::fs::read_to_string("/proc/self/status").is_err() {
            std::process::exit(13);
        }
        std::process::exit(0);
    }

    #[test]
    fn forbidden_system_calls_fail_with_eperm() {
        if std::env::var_os(CHILD).is_some() {
            child();
        }
        let exe = std::env::current_exe().unwrap();
        let status = std::process::Command::new(exe)
            .args(["--exact", "harden::seccomp_tests::forbidden_system_calls_fail_with_eperm", "--test-threads=1"])
            .env(CHILD, "1")
            .status()
            .unwrap();
        // A signal here was seen once in a loaded full run and never again
        // (issue 10 note): name it, so the next one can be explained.
        let signal = std::os::unix::process::ExitStatusExt::signal(&status);
        assert_eq!(
            status.code(),
            Some(0),
            "exit 10: execve, 11: packet socket, 12: ptrace got through; 2: set-up failed; signal {signal:?}"
        );
    }
}
