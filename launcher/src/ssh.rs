//! The SSH transport: the system OpenSSH client through the `openssh` crate,
//! one multiplexed master per host (native-mux), so `~/.ssh/config`, agents,
//! `ProxyJump`, ports and identities work as users set them.
//!
//! BatchMode is always on (never a prompt) and host keys are checked
//! strictly unless `--accept-new-host-keys` says trust-on-first-use. Every
//! host is connected concurrently with a timeout; a host that fails is named
//! with the reason. Remote commands become root with `sudo -n` when
//! `[cluster] become` says so (by default: when the SSH user is not root).
//!
//! After connecting, one remote script per host checks what a job needs
//! (Linux, nft, the job user, free ports, disk, clock within the
//! certificates' tolerance); `warden doctor` prints the same report.
//!
//! The agent binary is uploaded to `REMOTE_DIR/bin/warden-agent-SHA` only
//! when that exact version is not there yet; job directories live under
//! `REMOTE_DIR/jobs/JOB_ID/`. It runs as root, so a binary already there
//! counts only when its whole SHA-256 is the local binary's and it is owned
//! by the user it runs as and writable by no one else; otherwise it is
//! installed again. Its directory must be owned and writable the same way,
//! or the host is refused with the commands that fix it (whoever can write
//! there could swap the binary). After an installation the checks run again.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use warden_agent::job::plan::{HostPlan, PlannedProcess};
use warden_agent::job::spec::{Become, JobSpec};
use warden_agent::net::identity::JobId;

use crate::transport::{
    AgentCmd, AgentError, BoxFuture, FetchLimits, HostJob, ProcessHandle, Spawned, Transport, fetch_with, parse_setup,
};
use warden_agent::host::Setup;

/// Why connecting to a job's hosts failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// The control directory cannot be made.
    #[error("cannot create the SSH control directory in {}", .tmp.display())]
    ControlDir {
        /// Where it was to be made.
        tmp: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The control directory cannot be looked at.
    #[error("SSH control directory {}", .dir.display())]
    ControlDirGone {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The control directory is not this user's alone.
    #[error(
        "SSH control directory {} must be a directory owned by uid {uid} with mode 0700 \
         (it is {}, uid {owner}, mode {mode:o})",
        .dir.display(),
        if *.is_dir { "a directory" } else { "not a directory" }
    )]
    ControlDirNotPrivate {
        /// The directory.
        dir: PathBuf,
        /// This user.
        uid: u32,
        /// Whether it is a directory at all.
        is_dir: bool,
        /// Its owner.
        owner: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// The local agent binary cannot be read for uploading.
    #[error("cannot read {}", .path.display())]
    ReadAgent {
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Hosts that failed, each with its reason, sorted by name.
    #[error("{}", hosts_failed(.0))]
    Hosts(Vec<(String, HostError)>),
}

/// `NAME: REASON; NAME: REASON`, each reason with its causes (ssh's own
/// words included) and, when ssh's reason is a familiar one, what to try.
fn hosts_failed(hosts: &[(String, HostError)]) -> String {
    let each: Vec<String> = hosts
        .iter()
        .map(|(name, e)| {
            let reason = crate::error::Chain(e).to_string();
            // ssh's words only: sudo or a slow check say other things.
            let said = if matches!(e, HostError::Connect { .. }) { advice(&reason) } else { None };
            match said {
                Some(try_this) => format!("{name}: {reason} (try: {try_this})"),
                None => format!("{name}: {reason}"),
            }
        })
        .collect();
    each.join("; ")
}

/// What to try for an SSH failure, from ssh's own words.
fn advice(reason: &str) -> Option<&'static str> {
    const ADVICE: &[(&str, &str)] = &[
        ("Connection refused", "no sshd answers on that port: start sshd there, or fix the port in the host's `ssh`"),
        (
            "Permission denied",
            "the host does not accept your key: `ssh-copy-id USER@HOST`, or name the key as the host's identity_file (or in ~/.ssh/config)",
        ),
        (
            "Host key verification failed",
            "an unknown or changed host key: check it, then `--accept-new-host-keys` (or ssh-keyscan it into ~/.ssh/known_hosts)",
        ),
        ("Could not resolve hostname", "the name does not resolve: use an IP address, or fix DNS or /etc/hosts"),
        ("No route to host", "the host is unreachable: check the address and the network"),
        ("timed out", "the host does not answer: check the address, the network and its firewall"),
    ];
    ADVICE.iter().find(|(said, _)| reason.contains(said)).map(|(_, try_this)| *try_this)
}

/// Why one host could not be made ready.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// No SSH session to it.
    #[error("cannot connect over SSH to `{dest}`")]
    Connect {
        /// The destination as the job file names it.
        dest: String,
        /// Why.
        #[source]
        source: openssh::Error,
    },
    /// The check script did not run.
    #[error("host checks failed")]
    Checks(#[source] AgentError),
    /// Uploading the agent failed.
    #[error("cannot install warden-agent")]
    Install(#[source] AgentError),
    /// What was just installed does not check out.
    #[error("{0} is not the binary just installed, or others can write it, after installing it")]
    NotInstalled(String),
    /// The checks ran and some failed (`check: detail; ...`).
    #[error("{0}")]
    NotReady(String),
    /// Connecting and checking took too long.
    #[error("timed out after {0}s")]
    Timeout(u64),
    /// Its task ended without an answer (it panicked).
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// Name prefix of the launchers' SSH control directories in the system's
/// temporary directory: `warden-ssh-PID-RANDOM`.
const CONTROL_PREFIX: &str = "warden-ssh-";

/// A new directory for this launcher's SSH control sockets: under the
/// system's temporary directory (sockets need paths under 108 bytes), with a
/// random name and mode 0700, created fresh. A shared lab machine's /tmp is
/// writable by everyone: a predictable name that another user created first
/// would put the sockets, and with them the SSH sessions to every host, in
/// that user's hands. Directories that launchers of this user left behind
/// when they were killed are removed first.
pub fn make_control_dir() -> Result<PathBuf, SshError> {
    let tmp = std::env::temp_dir();
    sweep_stale_control_dirs(&tmp);
    // tempfile creates it exclusively with a random suffix (its default mode
    // follows the umask, hence 0700 given); it is kept here because the
    // transport removes it itself, after its sessions close.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(&format!("{CONTROL_PREFIX}{}-", std::process::id()))
        .rand_bytes(16)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(&tmp)
        .map_err(|source| SshError::ControlDir { tmp: tmp.clone(), source })?
        .keep();
    check_private_dir(&dir)?;
    Ok(dir)
}

/// Refuses a control directory that is not a directory of this user that
/// only this user can enter (what [`make_control_dir`] makes).
fn check_private_dir(dir: &Path) -> Result<(), SshError> {
    use std::os::unix::fs::MetadataExt;
    let m =
        std::fs::symlink_metadata(dir).map_err(|source| SshError::ControlDirGone { dir: dir.to_path_buf(), source })?;
    let uid = nix::unistd::geteuid().as_raw();
    if !m.is_dir() || m.uid() != uid || m.mode() & 0o077 != 0 {
        return Err(SshError::ControlDirNotPrivate {
            dir: dir.to_path_buf(),
            uid,
            is_dir: m.is_dir(),
            owner: m.uid(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Removes control directories in `tmp` that belong to this user and whose
/// launcher (the PID in the name) no longer runs: a launcher killed with
/// SIGKILL cannot clean up after itself. Its SSH masters have exited by
/// then or exit on their own (ControlPersist), whatever is in the directory.
fn sweep_stale_control_dirs(tmp: &Path) {
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::geteuid().as_raw();
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(CONTROL_PREFIX)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let Ok(m) = entry.path().symlink_metadata() else { continue };
        if !m.is_dir() || m.uid() != uid || pid <= 0 {
            continue;
        }
        // kill(pid, 0): ESRCH means no such process.
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// One host's readiness, from [`SshTransport::connect`]'s checks.
#[derive(Debug, Clone)]
pub struct HostReport {
    /// Host name.
    pub host: String,
    /// (check, passed, detail), in a fixed order.
    pub checks: Vec<(&'static str, bool, String)>,
}

impl HostReport {
    /// The failed checks, as one line.
    pub fn failures(&self) -> Option<String> {
        let failed: Vec<String> = self.checks.iter().filter(|c| !c.1).map(|c| format!("{}: {}", c.0, c.2)).collect();
        (!failed.is_empty()).then(|| failed.join("; "))
    }
}

/// The checks, as one remote script printing `key=value` lines, so a host
/// costs one round trip: each remote command costs a login shell on the
/// host, which on lab machines often starts conda or pyenv from `.bashrc`
/// (160 ms a command on the build machine). It also says who the SSH user is
/// (`me`, for `become = "auto"`) and what is at `agent` and its directory:
/// the file's SHA-256 and the owner and mode of both (looked up as root
/// when commands will become root, since `remote_dir` may be closed to the
/// SSH user; `stat` does not follow a symbolic link, whose mode 777 fails
/// the check). It runs under `sh` (dash on Debian), so it uses nothing
/// bash-only: listening ports come from `ss`.
fn check_script(user: &str, ports: &[u16], dir: &str, agent: &str, become_: Become) -> String {
    let ports = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(" ");
    let sudo = match become_ {
        Become::Sudo => "s='sudo -n';",
        Become::Auto => "s=; [ \"$(id -u)\" = 0 ] || s='sudo -n';",
        Become::None => "s=;",
    };
    format!(
        "echo me=$(id -u); {sudo} a={agent}; \
         echo agent_sha=$($s sha256sum \"$a\" 2>/dev/null | cut -c1-64); \
         echo agent_stat=$($s stat -c %u:%a \"$a\" 2>/dev/null); \
         echo bin_stat=$($s stat -c %u:%a \"$(dirname \"$a\")\" 2>/dev/null); \
         echo os=$(uname -s) arch=$(uname -m); \
         echo nft=$(command -v nft >/dev/null 2>&1 && echo yes || echo no); \
         echo user=$(id -u {user} 2>/dev/null || echo missing); \
         echo now=$(date +%s); \
         d={dir}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; echo disk_kb=$(df -Pk \"$d\" | awk 'NR==2 {{print $4}}'); \
         busy=; for p in {ports}; do if ss -Hltn \"sport = :$p\" 2>/dev/null | grep -q .; then busy=\"$busy $p\"; fi; done; echo busy=$busy",
        user = sh_quote(user),
        dir = sh_quote(dir),
        agent = sh_quote(agent),
    )
}

/// The agent binary a host must run: where, which, and as whom.
#[derive(Debug, Clone, Copy)]
struct AgentSpot<'a> {
    /// Its path on the host.
    path: &'a str,
    /// The local binary's SHA-256, 64 hex digits.
    sha256: &'a str,
    /// The uid it runs as (0 when commands become root); `None` if unknown.
    runs_as: Option<u32>,
}

/// The value of `key=` in the check script's output ("" when missing).
fn said(out: &str, key: &str) -> String {
    out.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')).unwrap_or("").to_string()
}

/// An owner and permission bits from `stat -c %u:%a`.
fn parse_stat(v: &str) -> Option<(u32, u32)> {
    let (uid, mode) = v.split_once(':')?;
    Some((uid.parse().ok()?, u32::from_str_radix(mode, 8).ok()?))
}

/// Owned by `owner` and writable by neither group nor others.
fn private_to(stat: Option<(u32, u32)>, owner: Option<u32>) -> bool {
    matches!((stat, owner), (Some((uid, mode)), Some(o)) if uid == o && mode & 0o022 == 0)
}

/// Whether the binary at `spot` is exactly the local one (every digit of
/// its SHA-256), owned by the user it runs as and writable by no one else.
fn agent_in_place(out: &str, spot: AgentSpot<'_>) -> bool {
    said(out, "agent_sha") == spot.sha256 && private_to(parse_stat(&said(out, "agent_stat")), spot.runs_as)
}

/// The check of the agent's directory: absent (made at installation) or
/// owned by the user the agent runs as and writable by no one else.
fn agent_dir_check(out: &str, spot: AgentSpot<'_>) -> (&'static str, bool, String) {
    let dir = Path::new(spot.path).parent().map(|p| p.display().to_string()).unwrap_or_default();
    let runs_as = spot.runs_as.map_or("?".to_string(), |u| u.to_string());
    let stat = said(out, "bin_stat");
    let (ok, detail) = match parse_stat(&stat) {
        None if stat.is_empty() => (true, format!("{dir} is made at installation")),
        None => (false, format!("{dir}: unexpected `stat` output `{stat}`")),
        Some((uid, mode)) if private_to(Some((uid, mode)), spot.runs_as) => {
            (true, format!("{dir} owned by uid {uid}, mode {mode:o}"))
        }
        Some((uid, mode)) => (
            false,
            format!(
                "{dir} is owned by uid {uid} with mode {mode:o}, but the agent runs from it as uid {runs_as}: \
                 whoever else can write there could replace the agent. Make it uid {runs_as}'s alone \
                 (`chown {runs_as} {dir} && chmod go-w {dir}`, as playbooks/node-prep.yml sets it up) \
                 or remove it, and warden installs the agent afresh"
            ),
        ),
    };
    ("agent dir", ok, detail)
}

fn evaluate(host: &str, out: &str, local_now: u64, spot: AgentSpot<'_>) -> HostReport {
    let get = |k: &str| said(out, k);
    let busy = out.lines().find_map(|l| l.strip_prefix("busy=")).unwrap_or("").trim().to_string();
    let now: u64 = get("now").parse().unwrap_or(0);
    let skew = now.abs_diff(local_now);
    let disk: u64 = get("disk_kb").parse().unwrap_or(0);
    let tolerance = warden_agent::net::pki::CLOCK_TOLERANCE.as_secs();
    HostReport {
        host: host.to_string(),
        checks: vec![
            ("os", get("os") == "Linux", format!("{} {}", get("os"), get("arch"))),
            (
                "nft",
                get("nft") == "yes",
                if get("nft") == "yes" { "present".into() } else { "missing: install nftables".into() },
            ),
            (
                "job user",
                get("user") != "missing" && get("user") != "0" && !get("user").is_empty(),
                match get("user").as_str() {
                    "missing" | "" => "does not exist: create it (playbooks/node-prep.yml does)".into(),
                    "0" => "is root: training never runs as root".into(),
                    uid => format!("uid {uid}"),
                },
            ),
            ("ports", busy.is_empty(), if busy.is_empty() { "free".into() } else { format!("in use: {busy}") }),
            ("disk", disk >= 100 * 1024, format!("{} MiB free", disk / 1024)),
            ("clock", skew <= tolerance, format!("{skew}s from this machine (tolerance {tolerance}s)")),
            agent_dir_check(out, spot),
        ],
    }
}

/// `warden doctor JOB --local`: the checks every SSH host gets, run on
/// this machine with `sh`, for the ports of the local plan; the agent is
/// this build's, so of it only its directory is checked. The job user is
/// checked only when running as root (otherwise every process runs as the
/// caller and no job user is needed).
pub fn check_this_machine(spec: &JobSpec, agent: &Path) -> std::io::Result<HostReport> {
    let plan = warden_agent::job::plan::Plan::new(spec, &JobId::generate(), true);
    let ports: Vec<u16> = plan.hosts.iter().flat_map(|h| h.ports.iter().copied()).collect();
    let root = warden_agent::host::harden::started_as_root();
    let dir = if root { "/var/lib/warden" } else { "." };
    let path = agent.display().to_string();
    let script = check_script(&spec.cluster.user, &ports, dir, &path, Become::None);
    let out = std::process::Command::new("sh").arg("-c").arg(&script).output()?;
    let out = String::from_utf8_lossy(&out.stdout);
    let sha = Sha256::digest(std::fs::read(agent)?).iter().map(|b| format!("{b:02x}")).collect::<String>();
    let runs_as = said(&out, "me").parse().ok();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut report = evaluate("localhost", &out, now, AgentSpot { path: &path, sha256: &sha, runs_as });
    // One machine: no clock to compare; without root, no job user is used.
    report.checks.retain(|c| c.0 != "clock" && (root || c.0 != "job user"));
    Ok(report)
}

/// Seconds an SSH master with nothing to carry stays up (while the launcher
/// lives, it checks on every master every 5 s).
const MASTER_IDLE_EXIT: std::num::NonZeroUsize = std::num::NonZeroUsize::new(15).expect("non-zero");

/// How long one host may take to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// One connected host.
#[derive(Clone)]
struct Host {
    name: String,
    session: Arc<Session>,
    /// Prefix for commands that need root ("sudo -n"), if any.
    sudo: bool,
    agent: String,
}

/// Agents on remote hosts over SSH.
pub struct SshTransport {
    hosts: BTreeMap<String, Host>,
    /// What the checks found on each host.
    pub reports: Vec<HostReport>,
    remote_dir: PathBuf,
    job: JobId,
    control_dir: PathBuf,
    /// Uses every master now and then (see [`SshTransport::connect`]).
    keepalive: tokio::task::JoinHandle<()>,
}

impl Drop for SshTransport {
    fn drop(&mut self) {
        // Sessions first (their masters exit through the control sockets),
        // then the directory that held the sockets.
        self.keepalive.abort();
        self.hosts.clear();
        let _ = std::fs::remove_dir_all(&self.control_dir);
    }
}

impl std::fmt::Debug for SshTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshTransport").field("hosts", &self.hosts.keys()).finish_non_exhaustive()
    }
}

/// The PATH an agent on a host starts with.
const REMOTE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Quotes one word for the remote POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

async fn run(host: &Host, cmd: &str, stdin: Option<&[u8]>) -> Result<String, AgentError> {
    run_bytes(host, cmd, stdin).await.map(|out| String::from_utf8_lossy(&out).into_owned())
}

/// `warden-agent ARGS` on `host` (as root where the host needs sudo).
async fn run_agent(host: &Host, cmd: &AgentCmd<'_>, stdin: Option<&[u8]>) -> Result<Vec<u8>, AgentError> {
    let words: Vec<String> = std::iter::once(host.agent.clone()).chain(cmd.args()).map(|w| sh_quote(&w)).collect();
    run_bytes(host, &words.join(" "), stdin).await
}

async fn run_bytes(host: &Host, cmd: &str, stdin: Option<&[u8]>) -> Result<Vec<u8>, AgentError> {
    let full = if host.sudo { format!("sudo -n sh -c {}", sh_quote(cmd)) } else { cmd.to_string() };
    let mut c = host.session.clone().arc_command("sh");
    c.arg("-c").arg(&full).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = c.spawn().await?;
    if let (Some(data), Some(mut w)) = (stdin, child.stdin().take()) {
        w.write_all(data).await?;
        w.shutdown().await?;
    }
    let out = child.wait_with_output().await?;
    if out.status.success() { Ok(out.stdout) } else { Err(AgentError::failed(&out.stderr)) }
}

impl SshTransport {
    /// Connects to every host of the plan concurrently, decides `sudo`, and
    /// installs the agent binary where its version is missing.
    /// With `keep_going`, failed checks are only reported (for `warden
    /// doctor`); otherwise they fail the connection with the host's name.
    pub async fn connect(
        spec: &JobSpec,
        job: &JobId,
        agent: &Path,
        accept_new_host_keys: bool,
        control_dir: &Path,
        keep_going: bool,
    ) -> Result<SshTransport, SshError> {
        let plan = warden_agent::job::plan::Plan::new(spec, job, false);
        let binary =
            std::fs::read(agent).map_err(|source| SshError::ReadAgent { path: agent.to_path_buf(), source })?;
        let sha = Sha256::digest(&binary).iter().map(|b| format!("{b:02x}")).collect::<String>();
        let remote_dir = spec.cluster.remote_dir.clone();
        let agent_path = remote_dir.join("bin").join(format!("warden-agent-{}", &sha[..16]));
        let upload = Arc::new(Upload { binary, sha, keep_going });
        check_private_dir(control_dir)?;
        let mut tasks = tokio::task::JoinSet::new();
        let mut names = std::collections::HashMap::new();
        for h in &spec.cluster.hosts {
            let ports = plan.hosts.iter().find(|p| p.name == h.name).map(|p| p.ports.clone()).unwrap_or_default();
            let target = HostTarget {
                name: h.name.clone(),
                dest: h.ssh.clone(),
                builder: session_builder(spec, h, accept_new_host_keys, control_dir),
                become_: spec.cluster.become_,
                script: check_script(
                    &spec.cluster.user,
                    &ports,
                    &remote_dir.display().to_string(),
                    &agent_path.display().to_string(),
                    spec.cluster.become_,
                ),
                agent: agent_path.display().to_string(),
            };
            let upload = upload.clone();
            names.insert(tasks.spawn(async move { target.ready(&upload).await }).id(), h.name.clone());
        }
        let (hosts, mut reports) = gather(tasks, &names, keep_going).await?;
        reports.sort_by(|a, b| a.host.cmp(&b.host));
        let keepalive = keep_masters_alive(&hosts);
        Ok(SshTransport {
            hosts,
            reports,
            remote_dir,
            job: job.clone(),
            control_dir: control_dir.to_path_buf(),
            keepalive,
        })
    }

    fn host(&self, name: &str) -> io::Result<&Host> {
        self.hosts.get(name).ok_or_else(|| io::Error::other(format!("no SSH session for host {name}")))
    }
}

/// An SSH master for host `h` of the job: batch mode, host keys checked
/// (or recorded, with `accept_new_host_keys`), its socket in `control_dir`.
fn session_builder(
    spec: &JobSpec,
    h: &warden_agent::job::spec::HostSpec,
    accept_new_host_keys: bool,
    control_dir: &Path,
) -> SessionBuilder {
    let mut b = SessionBuilder::default();
    b.known_hosts_check(if accept_new_host_keys { KnownHosts::Add } else { KnownHosts::Strict })
        .connect_timeout(CONNECT_TIMEOUT)
        .server_alive_interval(Duration::from_secs(5))
        // A master outlives a killed launcher only briefly: it exits
        // once no command or agent has used it for this long.
        .control_persist(ControlPersist::IdleFor(MASTER_IDLE_EXIT))
        .control_directory(control_dir);
    if let Some(cfg) = &spec.cluster.ssh_config {
        b.config_file(cfg);
    }
    if let Some(key) = &h.identity_file {
        b.keyfile(key);
    }
    b
}

/// The agent binary every host gets where its version is missing.
struct Upload {
    binary: Vec<u8>,
    /// Its SHA-256, 64 hex digits.
    sha: String,
    /// Install even on a host whose checks failed (`warden doctor`).
    keep_going: bool,
}

/// One host to connect to, and what its checks need.
struct HostTarget {
    name: String,
    /// The SSH destination.
    dest: String,
    builder: SessionBuilder,
    become_: Become,
    /// The check script ([`check_script`]).
    script: String,
    /// The agent's path on the host.
    agent: String,
}

impl HostTarget {
    /// [`HostTarget::connect_and_check`] within its deadline.
    async fn ready(self, upload: &Upload) -> Result<(Host, HostReport), HostError> {
        let deadline = CONNECT_TIMEOUT * 2;
        tokio::time::timeout(deadline, self.connect_and_check(upload))
            .await
            .unwrap_or(Err(HostError::Timeout(deadline.as_secs())))
    }

    /// Connects, decides `sudo`, runs the checks, and installs the agent
    /// where it is missing (then checks again).
    async fn connect_and_check(&self, upload: &Upload) -> Result<(Host, HostReport), HostError> {
        let session = self
            .builder
            .connect_mux(&self.dest)
            .await
            .map_err(|source| HostError::Connect { dest: self.dest.clone(), source })?;
        let mut host =
            Host { name: self.name.clone(), session: Arc::new(session), sudo: false, agent: self.agent.clone() };
        let out = run(&host, &self.script, None).await.map_err(HostError::Checks)?;
        let me = said(&out, "me");
        host.sudo = match self.become_ {
            Become::Sudo => true,
            Become::None => false,
            Become::Auto => me != "0",
        };
        let runs_as = if host.sudo { Some(0) } else { me.parse().ok() };
        let spot = AgentSpot { path: &host.agent, sha256: &upload.sha, runs_as };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut report = evaluate(&self.name, &out, now, spot);
        // Never write into a directory others control, not even for `doctor`.
        let dir_ok = agent_dir_check(&out, spot).1;
        if !agent_in_place(&out, spot) && dir_ok && (report.failures().is_none() || upload.keep_going) {
            install_agent(&host, &upload.binary).await?;
            let out = run(&host, &self.script, None).await.map_err(HostError::Checks)?;
            report = evaluate(&self.name, &out, now, spot);
            if report.failures().is_none() && !agent_in_place(&out, spot) {
                return Err(HostError::NotInstalled(host.agent.clone()));
            }
        }
        Ok((host, report))
    }
}

/// The connected hosts and their reports, as each task ends (a line per
/// host that is ready, for a launch); or every host that failed, by name.
/// Without `keep_going`, failed checks fail their host.
async fn gather(
    mut tasks: tokio::task::JoinSet<Result<(Host, HostReport), HostError>>,
    names: &std::collections::HashMap<tokio::task::Id, String>,
    keep_going: bool,
) -> Result<(BTreeMap<String, Host>, Vec<HostReport>), SshError> {
    let (mut hosts, mut reports, mut failed) = (BTreeMap::new(), Vec::new(), Vec::new());
    let (total, t0, mut done) = (names.len(), std::time::Instant::now(), 0);
    while let Some(joined) = tasks.join_next_with_id().await {
        done += 1;
        let (name, result) = match joined {
            Ok((id, result)) => (names[&id].clone(), result),
            Err(e) => (names[&e.id()].clone(), Err(HostError::Task(e))),
        };
        let (host, report) = match result {
            Ok(ready) => ready,
            Err(e) => {
                failed.push((name, e));
                continue;
            }
        };
        match report.failures() {
            // The launch's first phase, a line per host as it is ready.
            None if !keep_going => eprintln!(
                "  {name}: connected, checked, agent in place ({done}/{total}, {:.2}s)",
                t0.elapsed().as_secs_f64()
            ),
            Some(f) if !keep_going => failed.push((name.clone(), HostError::NotReady(f))),
            _ => {}
        }
        reports.push(report);
        hosts.insert(name, host);
    }
    if !failed.is_empty() {
        failed.sort_by(|a, b| a.0.cmp(&b.0));
        return Err(SshError::Hosts(failed));
    }
    Ok((hosts, reports))
}

/// While the launcher lives, each master is used at least every few
/// seconds, so its idle exit (MASTER_IDLE_EXIT) only ever ends the masters
/// of a launcher that died. Weak: the task keeps no session up.
fn keep_masters_alive(hosts: &BTreeMap<String, Host>) -> tokio::task::JoinHandle<()> {
    let sessions: Vec<std::sync::Weak<Session>> = hosts.values().map(|h| Arc::downgrade(&h.session)).collect();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let live: Vec<Arc<Session>> = sessions.iter().filter_map(std::sync::Weak::upgrade).collect();
            if live.is_empty() {
                return;
            }
            for s in live {
                let _ = tokio::time::timeout(Duration::from_secs(2), s.check()).await;
            }
        }
    })
}

/// Uploads the agent (the checks found this exact version missing).
async fn install_agent(host: &Host, binary: &[u8]) -> Result<(), HostError> {
    let path = sh_quote(&host.agent);
    // Per host and launcher: hosts may share a filesystem; `mv` is atomic.
    let tmp = sh_quote(&format!("{}.{}.{}.tmp", host.agent, host.name, std::process::id()));
    let dir = sh_quote(&Path::new(&host.agent).parent().map(|p| p.display().to_string()).unwrap_or_default());
    // umask 022: a directory made here is writable by its owner alone.
    run(
        host,
        &format!("umask 022 && mkdir -p {dir} && cat > {tmp} && chmod 755 {tmp} && mv -f {tmp} {path}"),
        Some(binary),
    )
    .await
    .map(|_| ())
    .map_err(HostError::Install)
}

struct RemoteChild {
    child: Option<openssh::Child<Arc<Session>>>,
    /// Where it runs, for `stop-group`.
    host: Host,
}

impl ProcessHandle for RemoteChild {
    fn wait(&mut self) -> BoxFuture<'_, io::Result<Option<i32>>> {
        Box::pin(async move {
            match self.child.take() {
                Some(child) => Ok(child.wait().await.map_err(io::Error::other)?.code()),
                None => Ok(None),
            }
        })
    }
    fn terminate(&mut self, group: Option<(u32, u64)>, uid: Option<u32>) -> BoxFuture<'_, String> {
        Box::pin(async move {
            let said = match group {
                Some((pgid, start)) => {
                    let grace = crate::transport::TERM_GRACE;
                    let cmd = AgentCmd::StopGroup { pgid, start, grace, uid };
                    // An unreachable host must not hold the teardown.
                    match tokio::time::timeout(grace + Duration::from_secs(10), run_agent(&self.host, &cmd, None)).await
                    {
                        Ok(Ok(out)) => String::from_utf8_lossy(&out).trim().to_string(),
                        Ok(Err(e)) => format!("stop-group failed: {}", crate::error::Chain(&e)),
                        Err(_) => "the host did not answer stop-group in time".to_string(),
                    }
                }
                None => "no process group reported; closing its channel".to_string(),
            };
            // Closing the channel closes the agent's stdin, in any case.
            self.child.take();
            said
        })
    }
}

impl Transport for SshTransport {
    fn spawn_agent<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<Spawned>> {
        Box::pin(async move {
            let host = self.host(&p.host)?;
            // A clean environment, as for local agents: nothing of the SSH
            // session's (or of what ssh_config's SendEnv forwards) but a
            // fixed PATH and the launcher's WARDEN_LOG.
            let mut c = if host.sudo {
                let mut c = host.session.clone().arc_command("sudo");
                c.arg("-n").arg("env");
                c
            } else {
                host.session.clone().arc_command("env")
            };
            c.arg("-i").arg(format!("PATH={REMOTE_PATH}"));
            if let Some(level) = std::env::var("WARDEN_LOG").ok().filter(|l| l.bytes().all(|b| b.is_ascii_graphic())) {
                c.arg(format!("WARDEN_LOG={level}"));
            }
            c.arg(&host.agent).arg("run").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
            let mut child = c.spawn().await.map_err(io::Error::other)?;
            let stdin = child.stdin().take().ok_or_else(|| io::Error::other("no stdin"))?;
            let stdout = child.stdout().take().ok_or_else(|| io::Error::other("no stdout"))?;
            let stderr = child.stderr().take().ok_or_else(|| io::Error::other("no stderr"))?;
            Ok(Spawned {
                stdin: Box::pin(stdin),
                stdout: Box::pin(stdout),
                stderr: Box::pin(stderr),
                handle: Box::new(RemoteChild { child: Some(child), host: host.clone() }),
            })
        })
    }

    fn workdir(&self, p: &PlannedProcess) -> PathBuf {
        crate::transport::workdir_in(&self.remote_dir.join("jobs").join(self.job.as_str()), p)
    }

    fn fetch_dir<'a>(
        &'a self,
        p: &'a PlannedProcess,
        remote: &'a Path,
        local: &'a Path,
        limits: FetchLimits,
    ) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let host = self.host(&p.host)?;
            fetch_with(run_agent(host, &AgentCmd::Fetch { dir: remote, limits }, None), local, limits.max_bytes).await
        })
    }

    fn cleanup<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let host = self.host(&p.host)?;
            let dir = self.workdir(p);
            let sock = dir.with_file_name(p.socket_name());
            let cmd =
                format!("rm -rf {} {}", sh_quote(&dir.display().to_string()), sh_quote(&sock.display().to_string()));
            run(host, &cmd, None).await.map(|_| ()).map_err(io::Error::other)
        })
    }

    fn setup_host<'a>(&'a self, host: &'a HostPlan, job: &'a HostJob) -> BoxFuture<'a, Result<Setup, AgentError>> {
        Box::pin(async move {
            let h = self.host(&host.name)?;
            let cmd = AgentCmd::Setup { job, host: &host.name };
            parse_setup(&run_agent(h, &cmd, Some(host.firewall.as_bytes())).await?)
        })
    }

    fn teardown_host<'a>(
        &'a self,
        host: &'a HostPlan,
        job: &'a HostJob,
        uid: Option<u32>,
    ) -> BoxFuture<'a, Result<String, AgentError>> {
        Box::pin(async move {
            let h = self.host(&host.name)?;
            let out = run_agent(h, &AgentCmd::Teardown { job: &job.job, uid }, None).await?;
            Ok(String::from_utf8_lossy(&out).trim().to_string())
        })
    }

    fn finish(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for host in self.hosts.values() {
                let dir = self.remote_dir.join("jobs").join(self.job.as_str()).display().to_string();
                let _ = run(host, &format!("rmdir {} 2>/dev/null || true", sh_quote(&dir)), None).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[test]
    fn familiar_ssh_failures_come_with_what_to_try() {
        let said = "failed to connect to the remote host: connect to host 10.0.0.1 port 22: Connection refused";
        assert!(advice(said).unwrap().contains("start sshd"));
        assert!(advice("user@h: Permission denied (publickey).").unwrap().contains("ssh-copy-id"));
        assert!(advice("Host key verification failed.").unwrap().contains("--accept-new-host-keys"));
        assert_eq!(advice("something else entirely"), None);
    }

    /// Runs the check script here, as a host would, for `agent`.
    fn check_here(agent: &Path) -> String {
        let script = check_script("nobody", &[], "/", &agent.display().to_string(), Become::None);
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    fn hex_sha256(bytes: &[u8]) -> String {
        Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A binary at the agent's path counts only when every digit of its
    /// SHA-256 is the local binary's and nobody but the user it runs as can
    /// write it or its directory; an unsafe directory fails the host with
    /// the fix. (The path names only the first 16 hex digits: a file with
    /// the same name and other contents, or one others can write, was once
    /// run as root after a mere `test -x`.)
    #[test]
    fn an_agent_binary_counts_only_when_whole_and_private() {
        let me = nix::unistd::geteuid().as_raw();
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        let agent = bin.join("warden-agent-0123456789abcdef");
        let path = agent.display().to_string();
        let sha = hex_sha256(b"the real agent");
        let spot = AgentSpot { path: &path, sha256: &sha, runs_as: Some(me) };
        let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        let dir_ok = |out: &str| agent_dir_check(out, spot).1;

        // Nothing there yet: install (the directory is made then).
        let out = check_here(&agent);
        assert!(!agent_in_place(&out, spot) && dir_ok(&out), "{out}");

        std::fs::create_dir(&bin).unwrap();
        mode(&bin, 0o755);
        std::fs::write(&agent, b"the real agent").unwrap();
        mode(&agent, 0o755);
        let out = check_here(&agent);
        assert!(agent_in_place(&out, spot) && dir_ok(&out), "{out}");
        assert_eq!(said(&out, "agent_sha"), sha);

        // Same name, other contents: installed again.
        std::fs::write(&agent, b"something else").unwrap();
        assert!(!agent_in_place(&check_here(&agent), spot));
        std::fs::write(&agent, b"the real agent").unwrap();
        // Writable by the group, or a symbolic link (mode 777): installed again.
        mode(&agent, 0o775);
        assert!(!agent_in_place(&check_here(&agent), spot));
        mode(&agent, 0o755);
        let link = bin.join("link");
        std::os::unix::fs::symlink(&agent, &link).unwrap();
        let link_path = link.display().to_string();
        assert!(!agent_in_place(&check_here(&link), AgentSpot { path: &link_path, ..spot }));

        // A directory others can write fails the host, naming the fix.
        mode(&bin, 0o777);
        let out = check_here(&agent);
        let (_, ok, detail) = agent_dir_check(&out, spot);
        assert!(!ok && detail.contains("chmod go-w") && detail.contains(&bin.display().to_string()), "{detail}");
        let report = evaluate("h", &out, 0, spot);
        assert!(report.failures().is_some_and(|f| f.contains("agent dir")), "{:?}", report.failures());
        mode(&bin, 0o755);
        // Owned by another user than the one the agent runs as.
        let other = AgentSpot { runs_as: Some(me + 1), ..spot };
        let (_, ok, detail) = agent_dir_check(&check_here(&agent), other);
        assert!(!ok && detail.contains(&format!("chown {}", me + 1)), "{detail}");
        assert!(!agent_in_place(&check_here(&agent), other));
        // An unknown user to run as passes nothing.
        assert!(!agent_in_place(&check_here(&agent), AgentSpot { runs_as: None, ..spot }));
    }

    #[test]
    fn stat_output_parses_as_owner_and_octal_mode() {
        assert_eq!(parse_stat("0:755"), Some((0, 0o755)));
        assert_eq!(parse_stat("1000:2775"), Some((1000, 0o2775)));
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("0:9"), None);
        assert!(private_to(Some((0, 0o755)), Some(0)));
        assert!(!private_to(Some((0, 0o757)), Some(0)));
        assert!(!private_to(Some((0, 0o775)), Some(0)));
        assert!(!private_to(Some((1000, 0o755)), Some(0)));
        assert_eq!(said("me=0 agent_sha=ab\nbusy=", "agent_sha"), "ab");
        assert_eq!(said("agent_stat=\n", "agent_sha"), "");
    }

    #[test]
    fn control_dirs_are_private_fresh_and_unpredictable() {
        let a = make_control_dir().unwrap();
        let b = make_control_dir().unwrap();
        assert_ne!(a, b);
        for d in [&a, &b] {
            let m = std::fs::metadata(d).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o700, "{d:?}");
            assert_eq!(m.uid(), nix::unistd::geteuid().as_raw());
            let name = d.file_name().unwrap().to_str().unwrap();
            let rest = name.strip_prefix(&format!("{CONTROL_PREFIX}{}-", std::process::id())).unwrap();
            assert_eq!(rest.len(), 16, "{name}");
        }
        // A directory others can enter, or a symlink, is refused.
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o755)).unwrap();
        let refused = |d: &Path| check_private_dir(d).unwrap_err().to_string();
        assert!(refused(&a).contains("mode 755"), "{}", refused(&a));
        let link = a.with_extension("link");
        std::os::unix::fs::symlink(&b, &link).unwrap();
        assert!(refused(&link).contains("not a directory"), "{}", refused(&link));
        check_private_dir(&b).unwrap();
        for p in [&a, &b] {
            std::fs::remove_dir_all(p).unwrap();
        }
        std::fs::remove_file(&link).unwrap();
    }

    #[test]
    fn only_a_dead_launchers_control_dirs_are_swept() {
        let tmp = std::env::temp_dir().join(format!("warden-sweep-test-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        // A PID that was just used and is gone now.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = tmp.join(format!("{CONTROL_PREFIX}{dead}-00112233aabbccdd"));
        let live = tmp.join(format!("{CONTROL_PREFIX}{}-00112233aabbccdd", std::process::id()));
        let other = tmp.join(format!("not-{CONTROL_PREFIX}{dead}-0"));
        for d in [&stale, &live, &other] {
            std::fs::create_dir_all(d.join("sub")).unwrap();
        }
        sweep_stale_control_dirs(&tmp);
        assert!(!stale.exists());
        assert!(live.is_dir());
        assert!(other.is_dir());
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
