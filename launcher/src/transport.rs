//! How the launcher starts an agent on a host and fetches files back.
//!
//! Everything above this trait (enrolment, watching, teardown) is the same
//! for every transport; only process start and file fetch differ. `--local`
//! uses [`LocalTransport`]; the SSH transport implements the same trait over
//! one multiplexed OpenSSH connection per host. What runs as root on a host
//! (uid lease, firewall, ending processes, reading the model) is a
//! `warden-agent` command ([`AgentCmd`]) with the same arguments for every
//! transport.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncWrite};
use warden_agent::host::Setup;
use warden_agent::job::plan::{HostPlan, PlannedProcess};
use warden_agent::net::identity::JobId;

/// A boxed future, for object-safe async methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A started agent: its control channel and a handle to stop it.
pub struct Spawned {
    /// The agent's stdin (control messages).
    pub stdin: Pin<Box<dyn AsyncWrite + Send>>,
    /// The agent's stdout (events).
    pub stdout: Pin<Box<dyn AsyncRead + Send>>,
    /// The agent's stderr (logs).
    pub stderr: Pin<Box<dyn AsyncRead + Send>>,
    /// Wait for it or kill it.
    pub handle: Box<dyn ProcessHandle>,
}

impl Spawned {
    /// From a child process of the launcher started with all three streams
    /// piped; `agent` is the `warden-agent` binary that ends its group.
    pub fn from_child(child: tokio::process::Child, agent: &Path) -> io::Result<Spawned> {
        let agent = agent.to_path_buf();
        Spawned::piped(child, |child| Box::new(LocalChild { child, agent }))
    }

    /// From a child process started with all three streams piped, ended
    /// through the handle `handle` makes of it.
    pub fn piped(
        mut child: tokio::process::Child,
        handle: impl FnOnce(tokio::process::Child) -> Box<dyn ProcessHandle>,
    ) -> io::Result<Spawned> {
        let piped = || io::Error::other("agent started without piped stdio");
        let stdin = child.stdin.take().ok_or_else(piped)?;
        let stdout = child.stdout.take().ok_or_else(piped)?;
        let stderr = child.stderr.take().ok_or_else(piped)?;
        Ok(Spawned {
            stdin: Box::pin(stdin),
            stdout: Box::pin(stdout),
            stderr: Box::pin(stderr),
            handle: handle(child),
        })
    }
}

/// A running agent process.
pub trait ProcessHandle: Send {
    /// Waits for exit; the exit code, or `None` when killed by a signal.
    fn wait(&mut self) -> BoxFuture<'_, io::Result<Option<i32>>>;
    /// Ends it for good, after it did not stop on request: its process
    /// group (`group`: the agent's PID and start time, from its `process`
    /// event) gets SIGTERM, [`TERM_GRACE`], then SIGKILL, through
    /// `warden-agent stop-group` (which, given the job's `uid`, signals only
    /// that uid's processes); without a group, the agent alone is killed
    /// (local) or its channel closed (SSH). Returns what happened, for the log.
    fn terminate(&mut self, group: Option<(u32, u64)>, uid: Option<u32>) -> BoxFuture<'_, String>;
}

/// Between SIGTERM and SIGKILL when a process group is ended.
pub const TERM_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Starts agents and fetches their output.
pub trait Transport: Send + Sync {
    /// Starts `warden-agent run` for `p`.
    fn spawn_agent<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<Spawned>>;
    /// The job directory of `p` on its host.
    fn workdir(&self, p: &PlannedProcess) -> PathBuf;
    /// Copies the regular files of directory `remote` on `p`'s host into
    /// `local`, read there as the job's `uid` without following links, at
    /// most `max_bytes` (`warden-agent host fetch`).
    fn fetch_dir<'a>(
        &'a self,
        p: &'a PlannedProcess,
        remote: &'a Path,
        local: &'a Path,
        limits: FetchLimits,
    ) -> BoxFuture<'a, io::Result<()>>;
    /// Removes `p`'s job directory on its host.
    fn cleanup<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<()>>;
    /// Prepares `host` before any agent starts there (`warden-agent host
    /// setup`): leases the job a uid and installs the job's firewall table.
    fn setup_host<'a>(&'a self, host: &'a HostPlan, job: &'a HostJob) -> BoxFuture<'a, Result<Setup, AgentError>>;
    /// Undoes [`Transport::setup_host`] (`warden-agent host teardown`): ends
    /// every process of the job's `uid` there, removes the table, releases
    /// the uid. Called however the job ended; returns what it did.
    fn teardown_host<'a>(
        &'a self,
        host: &'a HostPlan,
        job: &'a HostJob,
        uid: Option<u32>,
    ) -> BoxFuture<'a, Result<String, AgentError>>;
    /// Called once after every process is gone and cleaned up.
    fn finish(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Every process on this machine, as child processes of the launcher.
#[derive(Debug)]
pub struct LocalTransport {
    agent: PathBuf,
    nodes_dir: PathBuf,
}

impl LocalTransport {
    /// Agents from `agent`; their job directories under `nodes_dir`.
    pub fn new(agent: PathBuf, nodes_dir: PathBuf) -> Self {
        LocalTransport { agent, nodes_dir }
    }

    /// Agents from `agent` for job `job`. As root, their job directories
    /// are where an SSH host keeps them (`[cluster] remote_dir/jobs/JOB`,
    /// root's, which the job's uid can pass through), so the run directory
    /// can stay private to the user who launched (0700); without root, the
    /// job runs as that user, in `nodes/` of the run directory.
    pub fn for_job(agent: PathBuf, spec: &warden_agent::job::spec::JobSpec, job: &JobId, run_nodes: PathBuf) -> Self {
        LocalTransport { agent, nodes_dir: job_dirs(spec, job, run_nodes) }
    }
}

/// Where a job's directories are when its agents start on hosts that see
/// this machine's files (`--local`, Slurm nodes on a shared filesystem): as
/// root, where an SSH host keeps them (`[cluster] remote_dir/jobs/JOB`);
/// without root, `run_nodes` (`nodes/` of the run directory).
pub fn job_dirs(spec: &warden_agent::job::spec::JobSpec, job: &JobId, run_nodes: PathBuf) -> PathBuf {
    match warden_agent::host::harden::started_as_root() {
        true => spec.cluster.remote_dir.join("jobs").join(job.as_str()),
        false => run_nodes,
    }
}

/// Process `p`'s job directory in the job's directory `dir`. Every
/// transport puts the job directories of one host side by side in one
/// directory: a worker finds a server's Unix-domain socket beside them
/// (`roles::server::local_socket`), and cleaning up a server removes it.
pub fn workdir_in(dir: &Path, p: &PlannedProcess) -> PathBuf {
    dir.join(p.dir_name())
}

/// A [`ProcessHandle`] for a child process of the launcher.
pub struct LocalChild {
    /// The process.
    pub child: tokio::process::Child,
    /// The `warden-agent` binary, for `stop-group`.
    pub agent: PathBuf,
}

impl ProcessHandle for LocalChild {
    fn wait(&mut self) -> BoxFuture<'_, io::Result<Option<i32>>> {
        Box::pin(async move { Ok(self.child.wait().await?.code()) })
    }
    fn terminate(&mut self, group: Option<(u32, u64)>, uid: Option<u32>) -> BoxFuture<'_, String> {
        Box::pin(async move {
            let said = match group {
                Some((pgid, start)) => {
                    let args = AgentCmd::StopGroup { pgid, start, grace: TERM_GRACE, uid }.args();
                    match run_agent(&self.agent, &[], &args, None).await {
                        Ok(out) => String::from_utf8_lossy(&out).trim().to_string(),
                        Err(e) => format!("stop-group failed: {}", crate::error::Chain(&e)),
                    }
                }
                None => "no process group reported; killing the agent".to_string(),
            };
            let _ = self.child.start_kill();
            said
        })
    }
}

/// A job as the host commands need it.
#[derive(Debug, Clone)]
pub struct HostJob {
    /// The job's id.
    pub job: JobId,
    /// `[cluster] uids`.
    pub uids: (u32, u32),
}

/// What a model fetch may read.
#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    /// The job's uid on the host, to read as.
    pub uid: Option<u32>,
    /// At most this many bytes in all.
    pub max_bytes: u64,
}

/// A `warden-agent` command that the launcher runs on a host, as root: its
/// arguments are the same for every transport.
#[derive(Debug, Clone)]
pub enum AgentCmd<'a> {
    /// `host setup` for `host` (ruleset on stdin).
    Setup {
        /// The job.
        job: &'a HostJob,
        /// The host's name in the plan.
        host: &'a str,
    },
    /// `host teardown`.
    Teardown {
        /// The job.
        job: &'a JobId,
        /// The uid that setup leased.
        uid: Option<u32>,
    },
    /// `host fetch DIR`.
    Fetch {
        /// The job's model directory on the host.
        dir: &'a Path,
        /// Uid and size limit.
        limits: FetchLimits,
    },
    /// `stop-group`.
    StopGroup {
        /// The agent's PID, its group's id.
        pgid: u32,
        /// Its start time in clock ticks.
        start: u64,
        /// Between SIGTERM and SIGKILL.
        grace: std::time::Duration,
        /// The job's uid on the host.
        uid: Option<u32>,
    },
}

impl AgentCmd<'_> {
    /// The arguments after the binary's name.
    pub fn args(&self) -> Vec<String> {
        let uid = |uid: Option<u32>| uid.map(|u| vec!["--uid".to_string(), u.to_string()]).unwrap_or_default();
        match self {
            AgentCmd::Setup { job, host } => vec![
                "host".into(),
                "setup".into(),
                "--job".into(),
                job.job.to_string(),
                "--host".into(),
                host.to_string(),
                "--first-uid".into(),
                job.uids.0.to_string(),
                "--last-uid".into(),
                job.uids.1.to_string(),
            ],
            AgentCmd::Teardown { job, uid: u } => {
                [vec!["host".into(), "teardown".into(), "--job".into(), job.to_string()], uid(*u)].concat()
            }
            AgentCmd::Fetch { dir, limits } => [
                vec![
                    "host".into(),
                    "fetch".into(),
                    dir.display().to_string(),
                    "--max-bytes".into(),
                    limits.max_bytes.to_string(),
                ],
                uid(limits.uid),
            ]
            .concat(),
            AgentCmd::StopGroup { pgid, start, grace, uid: u } => [
                vec![
                    "stop-group".into(),
                    pgid.to_string(),
                    start.to_string(),
                    "--grace-ms".into(),
                    grace.as_millis().to_string(),
                ],
                uid(*u),
            ]
            .concat(),
        }
    }
}

/// Why a command on a host (`warden-agent host ...`, or a shell command
/// over SSH) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The program could not be started on this machine.
    #[error("cannot start {}", agent.display())]
    Start {
        /// The program.
        agent: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Talking to it (its stdin, its exit) failed, or the SSH session did.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A command over SSH could not be run.
    #[error(transparent)]
    Ssh(#[from] openssh::Error),
    /// It ran and failed: what it wrote to stderr (without its `error: `).
    #[error("{0}")]
    Failed(String),
    /// `host setup` answered something that is not its JSON line.
    #[error("unreadable answer from `warden-agent host setup`")]
    UnreadableSetup(#[source] serde_json::Error),
}

impl AgentError {
    /// The failure of a command that exited unsuccessfully with `stderr`.
    pub fn failed(stderr: &[u8]) -> Self {
        let err = String::from_utf8_lossy(stderr);
        AgentError::Failed(err.trim().strip_prefix("error: ").unwrap_or(err.trim()).to_string())
    }
}

/// Reads the JSON line that `warden-agent host setup` prints.
pub fn parse_setup(out: &[u8]) -> Result<Setup, AgentError> {
    serde_json::from_slice(out).map_err(AgentError::UnreadableSetup)
}

/// Runs `PREFIX.. AGENT ARGS` on this machine with `stdin`; its stdout, or
/// its stderr as the error.
pub async fn run_agent(
    agent: &Path,
    prefix: &[&str],
    args: &[String],
    stdin: Option<&[u8]>,
) -> Result<Vec<u8>, AgentError> {
    use tokio::io::AsyncWriteExt;
    let mut c = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = tokio::process::Command::new(first);
            c.args(rest).arg(agent);
            c
        }
        None => tokio::process::Command::new(agent),
    };
    c.args(args)
        .env_clear()
        .envs(clean_env())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = c.spawn().map_err(|source| AgentError::Start { agent: agent.to_path_buf(), source })?;
    if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(data).await?;
        w.shutdown().await?;
    }
    let out = child.wait_with_output().await?;
    if out.status.success() { Ok(out.stdout) } else { Err(AgentError::failed(&out.stderr)) }
}

/// The environment every agent and host command starts with on this
/// machine: nothing of the launcher's but a short allow-list (no
/// passphrase variable, no token of the user's shell). `WARDEN_LOG` sets the
/// agents' log level; `WARDEN_TEST_TAG` has no effect but lets tests find a
/// job's processes; `SLURM_CONF` tells `srun` where Slurm's configuration is.
pub fn clean_env() -> impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)> {
    const KEEP: &[&str] = &["PATH", "LANG", "TZ", "WARDEN_LOG", "WARDEN_TEST_TAG", "SLURM_CONF"];
    KEEP.iter().filter_map(|k| std::env::var_os(k).map(|v| (k.into(), v)))
}

/// Fetches with `host fetch` run through `run`, and unpacks into `local`.
pub async fn fetch_with<F>(run: F, local: &Path, max_bytes: u64) -> io::Result<()>
where
    F: Future<Output = Result<Vec<u8>, AgentError>>,
{
    let stream = run.await.map_err(io::Error::other)?;
    let local = local.to_path_buf();
    tokio::task::spawn_blocking(move || {
        warden_agent::host::receive_files(&mut stream.as_slice(), &local, max_bytes)
            .map(|_| ())
            .map_err(io::Error::other)
    })
    .await
    .map_err(io::Error::other)?
}

impl Transport for LocalTransport {
    fn spawn_agent<'a>(&'a self, _p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<Spawned>> {
        Box::pin(async move {
            let child = tokio::process::Command::new(&self.agent)
                .arg("run")
                .env_clear()
                .envs(clean_env())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // No orphans: if the launcher's handle is dropped, the agent goes too.
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| io::Error::new(e.kind(), format!("cannot start {}: {e}", self.agent.display())))?;
            Spawned::from_child(child, &self.agent)
        })
    }

    fn workdir(&self, p: &PlannedProcess) -> PathBuf {
        workdir_in(&self.nodes_dir, p)
    }

    fn fetch_dir<'a>(
        &'a self,
        _p: &'a PlannedProcess,
        remote: &'a Path,
        local: &'a Path,
        limits: FetchLimits,
    ) -> BoxFuture<'a, io::Result<()>> {
        let args = AgentCmd::Fetch { dir: remote, limits }.args();
        Box::pin(async move { fetch_with(run_agent(&self.agent, &[], &args, None), local, limits.max_bytes).await })
    }

    fn cleanup<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let dir = self.workdir(p);
            match tokio::fs::remove_dir_all(&dir).await {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            match tokio::fs::remove_file(dir.with_file_name(p.socket_name())).await {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
    }

    fn setup_host<'a>(&'a self, host: &'a HostPlan, job: &'a HostJob) -> BoxFuture<'a, Result<Setup, AgentError>> {
        Box::pin(async move {
            let args = AgentCmd::Setup { job, host: &host.name }.args();
            parse_setup(&run_agent(&self.agent, &[], &args, Some(host.firewall.as_bytes())).await?)
        })
    }

    fn teardown_host<'a>(
        &'a self,
        _host: &'a HostPlan,
        job: &'a HostJob,
        uid: Option<u32>,
    ) -> BoxFuture<'a, Result<String, AgentError>> {
        Box::pin(async move {
            let out = run_agent(&self.agent, &[], &AgentCmd::Teardown { job: &job.job, uid }.args(), None).await?;
            Ok(String::from_utf8_lossy(&out).trim().to_string())
        })
    }

    fn finish(&self) -> BoxFuture<'_, ()> {
        // Removes the (now empty) nodes directory; fails harmlessly if not empty.
        Box::pin(async move {
            let _ = tokio::fs::remove_dir(&self.nodes_dir).await;
        })
    }
}

/// Finds `warden-agent`: `$WARDEN_AGENT` if set, else beside this executable.
pub fn find_agent() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("WARDEN_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let candidate = exe.with_file_name("warden-agent");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "warden-agent not found beside {}; build it (cargo build --bins) or set WARDEN_AGENT to its path",
                exe.display()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_agent::net::identity::Role;
    use warden_agent::train::roles::server::local_socket;

    fn process(role: Role, rank: u32) -> PlannedProcess {
        let address = "10.0.0.1".parse().unwrap();
        PlannedProcess {
            host: "node1.lab".into(),
            host_index: 0,
            role,
            rank,
            address,
            port: None,
            identity: String::new(),
        }
    }

    /// A worker looks for the socket of a server on its host where that
    /// server's agent binds it and where cleanup removes it: beside the job
    /// directories, which every transport lays out side by side.
    #[test]
    fn a_servers_socket_is_looked_for_bound_and_removed_at_one_path() {
        let dir = Path::new("/var/lib/warden/jobs/0123");
        let (server, worker) = (process(Role::Server, 3), process(Role::Worker, 7));
        let server_dir = workdir_in(dir, &server);
        let looked_for = local_socket(&workdir_in(dir, &worker), &server).unwrap();
        assert_eq!(looked_for, local_socket(&server_dir, &server).unwrap());
        assert_eq!(looked_for, server_dir.with_file_name(server.socket_name()));
        assert_eq!(looked_for, dir.join("node1.lab-server-3.sock"));
    }
}
