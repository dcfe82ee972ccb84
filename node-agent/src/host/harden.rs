//! Dropping everything: the agent's privileged set-up and the point of no
//! return after it.
//!
//! As root the agent resolves the job's uid, creates the job directory (owned
//! by that uid, mode 0700, see [`crate::host::privfs`]), then drops, in this order, on the only thread
//! there is (capset, `PR_CAPBSET_DROP` and `no_new_privs` act on the calling
//! thread only; every later thread inherits the result):
//!
//! 1. ambient, bounding and inheritable capability sets cleared (bounding
//!    needs CAP_SETPCAP, so before the uid change);
//! 2. `setgroups([gid])`, `setresgid`, `setresuid` to the job user;
//! 3. effective and permitted sets cleared (a safety net: the uid change
//!    already emptied them);
//! 4. not dumpable (no process of the job user's, the program of
//!    `[worker] command` included, may trace the agent or read its memory,
//!    and no core file holds its key) and `no_new_privs` set;
//! 5. a seccomp filter installed: an allow-list of the system calls the
//!    roles use ([`ALLOWED`]); **any other system call fails with EPERM**
//!    (nothing is killed, so a library probing an optional call degrades
//!    instead of crashing). `execve`, `ptrace`, `mount`, `setuid`,
//!    `unshare`, `setns` and the like are not on the list. Some calls are
//!    allowed only with certain arguments: `clone` without any `CLONE_NEW*`
//!    namespace flag (a thread or a fork, never a new namespace), `socket`
//!    only for stream and datagram sockets of IPv4, IPv6 and Unix (no raw or
//!    packet sockets), `setsockopt` only at the socket, TCP, IPv4 and IPv6
//!    levels, `process_vm_readv`/`process_vm_writev` only on the program the
//!    agent started itself (the KV endpoint's tensor copies) and
//!    `memfd_create` only in an agent that started one (the memory it
//!    shares with it), with the flags that code uses. `clone3` fails with ENOSYS: its flags live in memory a filter
//!    cannot read, and glibc answers ENOSYS by falling back to `clone`,
//!    whose flags the filter checks.
//!
//! Then [`verify`] reads `/proc/thread-self/status` and refuses to continue unless
//! Uid and Gid are not 0, all five capability sets are 0, NoNewPrivs is 1,
//! Seccomp is 2 and the process is not dumpable.
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
    // Not dumpable: no process of the job user's (the program of
    // `[worker] command` included) may trace this one or read its memory,
    // where its TLS key lives, and no core file holds that key. Switching
    // uid above does this already; an agent started as the job user needs
    // it said.
    nix::sys::prctl::set_dumpable(false).map_err(|e| step("clearing the dumpable flag")(e.to_string()))?;
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

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, HardenError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| step("building the seccomp filter")(e.to_string()))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, HardenError> {
    SeccompRule::new(conditions).map_err(|e| step("building the seccomp filter")(e.to_string()))
}

fn arg_in(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, HardenError> {
    values.iter().map(|v| rule(vec![condition(arg, SeccompCmpOp::Eq, *v)?])).collect()
}

/// Every `CLONE_NEW*` flag `clone` takes: a process with any of them would
/// get a namespace of its own (a user namespace hands it capabilities there).
/// (`CLONE_NEWTIME` exists only for `unshare` and `clone3`, both refused.)
pub const CLONE_NEW_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// `socket(2)`: one rule per allowed (family, type) pair; the type is
/// compared without its `SOCK_NONBLOCK` and `SOCK_CLOEXEC` bits.
fn socket_rules() -> Result<Vec<SeccompRule>, HardenError> {
    let type_bits = !((libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u32);
    let mut rules = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6, libc::AF_UNIX] {
        for kind in [libc::SOCK_STREAM, libc::SOCK_DGRAM] {
            rules.push(rule(vec![
                condition(0, SeccompCmpOp::Eq, family as u64)?,
                condition(1, SeccompCmpOp::MaskedEq(u64::from(type_bits)), kind as u64)?,
            ])?);
        }
    }
    Ok(rules)
}

/// The levels `setsockopt` is allowed at: std and tokio set `SO_REUSEADDR`
/// (socket level), `TCP_NODELAY` (TCP) and `IPV6_V6ONLY` (IPv6); IPv4's
/// level is the counterpart of IPv6's.
pub const SOCKOPT_LEVELS: &[i32] = &[libc::SOL_SOCKET, libc::IPPROTO_TCP, libc::IPPROTO_IP, libc::IPPROTO_IPV6];

/// The compiled filters, to be installed in order: [`ALLOWED`]
/// unconditionally; `clone` without namespace flags; `socket` only for
/// stream and datagram sockets of IPv4, IPv6 and Unix; `setsockopt` only at
/// [`SOCKOPT_LEVELS`]; `ioctl` only for the non-blocking and close-on-exec
/// requests; `prctl` only to name threads and read the dumpable flag;
/// everything else EPERM. Before it comes a filter that makes `clone3` fail
/// with ENOSYS.
pub fn filter() -> Result<Vec<seccompiler::BpfProgram>, HardenError> {
    filter_with_child(None)
}

/// [`filter`], plus waiting for, killing, and copying memory from and to
/// (only) the process `child`, and making a sealable memfd to share with it.
pub fn filter_with_child(child: Option<u32>) -> Result<Vec<seccompiler::BpfProgram>, HardenError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|s| (*s, Vec::new())).collect();
    if let Some(pid) = child {
        rules.insert(libc::SYS_wait4, arg_in(0, &[u64::from(pid)])?);
        rules.insert(libc::SYS_kill, arg_in(0, &[u64::from(pid)])?);
        // The KV endpoint copies tensors straight from and into the
        // program's memory (the kernel still checks that the agent may
        // trace it): only that process, not another of the job user's.
        rules.insert(libc::SYS_process_vm_readv, arg_in(0, &[u64::from(pid)])?);
        rules.insert(libc::SYS_process_vm_writev, arg_in(0, &[u64::from(pid)])?);
        // ...and shares memory with it on request: a sealable memfd
        // (train::shared), with exactly the flags that code passes.
        let memfd = (libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) as u64;
        rules.insert(libc::SYS_memfd_create, arg_in(1, &[memfd])?);
    }
    rules.insert(libc::SYS_clone, vec![rule(vec![condition(0, SeccompCmpOp::MaskedEq(CLONE_NEW_FLAGS), 0)?])?]);
    rules.insert(libc::SYS_socket, socket_rules()?);
    rules.insert(libc::SYS_socketpair, arg_in(0, &[libc::AF_UNIX as u64])?);
    let levels: Vec<u64> = SOCKOPT_LEVELS.iter().map(|l| *l as u64).collect();
    rules.insert(libc::SYS_setsockopt, arg_in(1, &levels)?);
    rules.insert(libc::SYS_ioctl, arg_in(1, &[libc::FIONBIO, libc::FIOCLEX, libc::FIONREAD, libc::TCGETS])?);
    rules.insert(
        libc::SYS_prctl,
        arg_in(0, &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64, libc::PR_GET_DUMPABLE as u64])?,
    );
    // `clone3` passes this filter and fails in the one installed before it:
    // every installed filter runs and the most severe action wins, so that
    // filter's ERRNO (ENOSYS) beats this ALLOW whatever the order. The
    // order is forced: once this filter is in, `prctl` cannot add another.
    rules.insert(libc::SYS_clone3, Vec::new());
    let main = compile(rules, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow)?;
    let clone3 = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let no_clone3 = compile(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32))?;
    Ok(vec![no_clone3, main])
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    otherwise: SeccompAction,
    on_match: SeccompAction,
) -> Result<seccompiler::BpfProgram, HardenError> {
    #[cfg(target_arch = "x86_64")]
    let arch = seccompiler::TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    let arch = seccompiler::TargetArch::aarch64;
    let f = SeccompFilter::new(rules, otherwise, on_match, arch)
        .map_err(|e| step("building the seccomp filter")(e.to_string()))?;
    f.try_into().map_err(|e: seccompiler::BackendError| step("compiling the seccomp filter")(e.to_string()))
}

/// Installs [`filter`] on the calling thread (and so on every thread it starts).
pub fn install_seccomp() -> Result<(), HardenError> {
    install_seccomp_with_child(None)
}

/// Installs [`filter_with_child`] on the calling thread, its filters in order.
pub fn install_seccomp_with_child(child: Option<u32>) -> Result<(), HardenError> {
    for program in filter_with_child(child)? {
        seccompiler::apply_filter(&program).map_err(|e| step("installing the seccomp filter")(e.to_string()))?;
    }
    Ok(())
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
pub fn parse_status(text: &str) -> Result<Status, StatusError> {
    let field = |name: &'static str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(str::trim)
            .ok_or(StatusError::Missing(name))
    };
    let bad = |name: &'static str| move |source| StatusError::Bad { name, source };
    let ids = |name: &'static str| -> Result<Vec<u32>, StatusError> {
        field(name)?.split_whitespace().map(|v| v.parse().map_err(bad(name))).collect()
    };
    let mut caps = Vec::new();
    for name in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        caps.push((name.to_string(), u64::from_str_radix(field(name)?, 16).map_err(bad(name))?));
    }
    Ok(Status {
        uids: ids("Uid")?,
        gids: ids("Gid")?,
        caps,
        no_new_privs: field("NoNewPrivs")?.parse().map_err(bad("NoNewPrivs"))?,
        seccomp: field("Seccomp")?.parse().map_err(bad("Seccomp"))?,
    })
}

/// A `/proc/PID/status` text without the privilege lines [`parse_status`] reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StatusError {
    /// A line is missing.
    #[error("no {0} line in /proc status")]
    Missing(&'static str),
    /// A line's value is not a number.
    #[error("bad {name}")]
    Bad {
        /// The line's name.
        name: &'static str,
        /// Cause.
        #[source]
        source: std::num::ParseIntError,
    },
}

/// Checks this process: with `dropped` (started as root), Uid/Gid not 0 and
/// all five capability sets 0; always NoNewPrivs 1 and Seccomp 2. Without
/// root the bounding set cannot be cleared and is not checked.
pub fn verify(dropped: bool) -> Result<Status, HardenError> {
    // thread-self: capabilities, no_new_privs and seccomp are per thread, and
    // this is the thread that every later one inherits from.
    let text = std::fs::read_to_string("/proc/thread-self/status")
        .map_err(|e| HardenError::Verify(format!("cannot read /proc/thread-self/status: {e}")))?;
    let st = parse_status(&text).map_err(|e| HardenError::Verify(e.to_string()))?;
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
    if nix::sys::prctl::get_dumpable() != Ok(false) {
        problems.push("the process is dumpable".to_string());
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
        let programs = filter().unwrap();
        assert_eq!(programs.len(), 2);
        assert!(programs[1].len() > ALLOWED.len());
    }
}

/// The forbidden-call test runs in a child process (the test binary run
/// again), since a seccomp filter cannot be removed once installed.
#[cfg(test)]
mod seccomp_tests {
    const CHILD: &str = "WARDEN_SECCOMP_CHILD";

    /// The errno of the last failed call.
    fn errno() -> Option<i32> {
        std::io::Error::last_os_error().raw_os_error()
    }

    /// `r` is a failed call's -1 with errno `want`.
    fn failed_with(r: libc::c_long, want: i32) -> bool {
        r == -1 && errno() == Some(want)
    }

    /// A socket, or -1.
    fn socket(family: i32, kind: i32) -> libc::c_long {
        // SAFETY: a plain system call with constant arguments; a returned
        // descriptor is only compared and then leaks with the child.
        libc::c_long::from(unsafe { libc::socket(family, kind, 0) })
    }

    /// setsockopt(fd, level, name, 1).
    fn set_int(fd: libc::c_long, level: i32, name: i32) -> libc::c_long {
        let one: libc::c_int = 1;
        // SAFETY: `one` lives across the call and its size is passed with it.
        let r = unsafe {
            libc::setsockopt(
                fd as i32,
                level,
                name,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        libc::c_long::from(r)
    }

    /// In the child: harden, then try what the filter forbids and what the
    /// roles need. Prints the name of every check that went wrong (or why
    /// the set-up failed) and exits 0 if there was none.
    fn child() -> ! {
        use std::os::unix::process::CommandExt;
        let root = super::started_as_root();
        let user = if root { super::resolve_user("nobody").ok() } else { None };
        if let Err(e) = super::drop_privileges(user).and_then(|_| super::verify(root)) {
            eprintln!("wrong: set-up: {e}");
            std::process::exit(2);
        }
        let mut wrong = Vec::new();
        let mut check = |name: &str, ok: bool| {
            if !ok {
                wrong.push(name.to_string());
            }
        };
        // execve: the exec error comes back from spawn.
        check("execve", std::process::Command::new("/bin/true").exec().raw_os_error() == Some(libc::EPERM));
        // SAFETY (every block below): plain system calls with constant
        // arguments or null pointers the kernel checks; results are only
        // compared. A clone that got through returns 0 in a child that
        // exits at once, before touching anything.
        let pt = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
        check("ptrace", failed_with(pt, libc::EPERM));
        let unshare = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
        check("unshare(CLONE_NEWUSER)", failed_with(unshare.into(), libc::EPERM));
        let setns = unsafe { libc::setns(0, libc::CLONE_NEWNET) };
        check("setns", failed_with(setns.into(), libc::EPERM));
        let flags = (libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::SIGCHLD) as libc::c_ulong;
        let clone = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
        if clone == 0 {
            unsafe { libc::_exit(0) };
        }
        check("clone(CLONE_NEWUSER | CLONE_NEWNET)", failed_with(clone, libc::EPERM));
        // Without the filter a null clone_args of size 0 is EINVAL.
        let clone3 = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
        check("clone3 fails with ENOSYS", failed_with(clone3, libc::ENOSYS));
        check("socket(AF_PACKET, SOCK_RAW)", failed_with(socket(libc::AF_PACKET, libc::SOCK_RAW), libc::EPERM));
        check("socket(AF_INET, SOCK_RAW)", failed_with(socket(libc::AF_INET, libc::SOCK_RAW), libc::EPERM));
        check("socket(AF_UNIX, SOCK_SEQPACKET)", failed_with(socket(libc::AF_UNIX, libc::SOCK_SEQPACKET), libc::EPERM));

        // What the roles need: threads (clone3 refused, glibc falls back to
        // clone) and TCP sockets with their options.
        check("a thread starts", std::thread::spawn(|| 7).join().ok() == Some(7));
        let tcp = socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
        check("a TCP socket", tcp >= 0);
        check("TCP_NODELAY", set_int(tcp, libc::IPPROTO_TCP, libc::TCP_NODELAY) == 0);
        check("SO_REUSEADDR", set_int(tcp, libc::SOL_SOCKET, libc::SO_REUSEADDR) == 0);
        // Without the filter a TCP socket answers ENOPROTOOPT here.
        check("setsockopt at SOL_PACKET", failed_with(set_int(tcp, libc::SOL_PACKET, 1), libc::EPERM));
        let tcp6 = socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC);
        check("an IPv6 TCP socket", tcp6 >= 0);
        check("IPV6_V6ONLY", set_int(tcp6, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) == 0);
        check("reading a file", std::fs::read_to_string("/proc/self/status").is_ok());
        check("not dumpable", nix::sys::prctl::get_dumpable().ok() == Some(false));
        // Copies from another process's memory: only from a program the
        // agent started (filter_with_child), so never here.
        let mut byte = 0u8;
        let local = libc::iovec { iov_base: (&raw mut byte).cast(), iov_len: 1 };
        let remote = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 1 };
        let vm = unsafe { libc::process_vm_readv(1, &local, 1, &remote, 1, 0) };
        check("process_vm_readv", failed_with(vm as libc::c_long, libc::EPERM));
        // Nor memory to share with one.
        let memfd = unsafe { libc::memfd_create(c"x".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        check("memfd_create", failed_with(memfd as libc::c_long, libc::EPERM));
        if wrong.is_empty() {
            std::process::exit(0);
        }
        eprintln!("wrong: {}", wrong.join("; "));
        std::process::exit(1);
    }

    #[test]
    fn forbidden_system_calls_fail_with_eperm() {
        if std::env::var_os(CHILD).is_some() {
            child();
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "harden::seccomp_tests::forbidden_system_calls_fail_with_eperm",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        // The message names the signal that killed the child, if one did,
        // so that such a failure can be explained from the test's output.
        let signal = std::os::unix::process::ExitStatusExt::signal(&out.status);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said = stderr.lines().find(|l| l.starts_with("wrong: ")).unwrap_or("");
        assert_eq!(out.status.code(), Some(0), "{said} (signal {signal:?})");
    }
}
