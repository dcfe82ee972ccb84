//! How the launcher starts an agent on a host and fetches files back.
//!
//! Everything above this trait (enrolment, watching, teardown) is the same
//! for every transport; only process start and file fetch differ. `--local`
//! uses [`LocalTransport`]; the SSH transport (issue 6) implements the same
//! trait over one multiplexed OpenSSH connection per host.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncWrite};
use warden_agent::plan::{HostPlan, PlannedProcess};

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
    /// From a child process of the launcher started with all three streams piped.
    pub fn from_child(mut child: tokio::process::Child) -> io::Result<Spawned> {
        let piped = || io::Error::other("agent started without piped stdio");
        let stdin = child.stdin.take().ok_or_else(piped)?;
        let stdout = child.stdout.take().ok_or_else(piped)?;
        let stderr = child.stderr.take().ok_or_else(piped)?;
        Ok(Spawned {
            stdin: Box::pin(stdin),
            stdout: Box::pin(stdout),
            stderr: Box::pin(stderr),
            handle: Box::new(LocalChild(child)),
        })
    }
}

/// A running agent process.
pub trait ProcessHandle: Send {
    /// Waits for exit; the exit code, or `None` when killed by a signal.
    fn wait(&mut self) -> BoxFuture<'_, io::Result<Option<i32>>>;
    /// Ends it for good, after it did not stop on request: its process
    /// group (`group`: the agent's PID and start time, from its `process`
    /// event) gets SIGTERM, [`TERM_GRACE`], then SIGKILL; without a group,
    /// the agent alone is killed (local) or its channel closed (SSH).
    /// Returns what happened, for the log.
    fn terminate(&mut self, group: Option<(u32, u64)>) -> BoxFuture<'_, String>;
}

/// Between SIGTERM and SIGKILL when a process group is ended.
pub const TERM_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Starts agents and fetches their output.
pub trait Transport: Send + Sync {
    /// Starts `warden-agent run` for `p`.
    fn spawn_agent<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<Spawned>>;
    /// The job directory of `p` on its host.
    fn workdir(&self, p: &PlannedProcess) -> PathBuf;
    /// Copies the files of directory `remote` on `p`'s host into `local`.
    fn fetch_dir<'a>(
        &'a self,
        p: &'a PlannedProcess,
        remote: &'a Path,
        local: &'a Path,
    ) -> BoxFuture<'a, io::Result<()>>;
    /// Removes `p`'s job directory on its host.
    fn cleanup<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<()>>;
    /// Prepares `host` before any agent starts there: installs the job's
    /// firewall table. Returns a warning when the host cannot have one.
    fn setup_host<'a>(&'a self, host: &'a HostPlan, table: &'a str) -> BoxFuture<'a, Result<Option<String>, String>>;
    /// Removes what [`Transport::setup_host`] installed; called however the job ended.
    fn teardown_host<'a>(&'a self, host: &'a HostPlan, table: &'a str) -> BoxFuture<'a, Result<(), String>>;
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
}

/// A [`ProcessHandle`] for a child process of the launcher.
pub struct LocalChild(pub tokio::process::Child);

impl ProcessHandle for LocalChild {
    fn wait(&mut self) -> BoxFuture<'_, io::Result<Option<i32>>> {
        Box::pin(async move { Ok(self.0.wait().await?.code()) })
    }
    fn terminate(&mut self, group: Option<(u32, u64)>) -> BoxFuture<'_, String> {
        Box::pin(async move {
            let said = match group {
                Some((pgid, start)) => tokio::task::spawn_blocking(move || {
                    warden_agent::reap::stop_group(pgid, start, TERM_GRACE)
                        .map_or_else(|e| e, |ended| format!("process group {pgid}: {ended}"))
                })
                .await
                .unwrap_or_else(|e| e.to_string()),
                None => "no process group reported; killing the agent".to_string(),
            };
            let _ = self.0.start_kill();
            said
        })
    }
}

impl Transport for LocalTransport {
    fn spawn_agent<'a>(&'a self, _p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<Spawned>> {
        Box::pin(async move {
            let child = tokio::process::Command::new(&self.agent)
                .arg("run")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // No orphans: if the launcher's handle is dropped, the agent goes too.
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| io::Error::new(e.kind(), format!("cannot start {}: {e}", self.agent.display())))?;
            Spawned::from_child(child)
        })
    }

    fn workdir(&self, p: &PlannedProcess) -> PathBuf {
        self.nodes_dir.join(format!("{}-{}-{}", p.host, p.role, p.rank))
    }

    fn fetch_dir<'a>(
        &'a self,
        _p: &'a PlannedProcess,
        remote: &'a Path,
        local: &'a Path,
    ) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            tokio::fs::create_dir_all(local).await?;
            let mut entries = tokio::fs::read_dir(remote).await?;
            while let Some(e) = entries.next_entry().await? {
                if e.file_type().await?.is_file() {
                    tokio::fs::copy(e.path(), local.join(e.file_name())).await?;
                }
            }
            Ok(())
        })
    }

    fn cleanup<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            match tokio::fs::remove_dir_all(self.workdir(p)).await {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
    }

    fn setup_host<'a>(&'a self, host: &'a HostPlan, table: &'a str) -> BoxFuture<'a, Result<Option<String>, String>> {
        Box::pin(async move {
            if !warden_agent::harden::started_as_root() {
                return Ok(Some(format!(
                    "not running as root: no firewall table for this job on {} (run as root to get one)",
                    host.name
                )));
            }
            let (table, rules) = (table.to_string(), host.firewall.clone());
            tokio::task::spawn_blocking(move || warden_agent::firewall::install(&table, &rules))
                .await
                .map_err(|e| e.to_string())?
                .map(|()| None)
                .map_err(|e| e.to_string())
        })
    }

    fn teardown_host<'a>(&'a self, _host: &'a HostPlan, table: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if !warden_agent::harden::started_as_root() {
                return Ok(());
            }
            let table = table.to_string();
            tokio::task::spawn_blocking(move || warden_agent::firewall::remove(&table))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        })
    }

    fn finish(&self) -> BoxFuture<'_, ()> {
        // Removes the (now empty) nodes directory; fails harmlessly if not empty.
        Box::pin(async move {
            let _ = tokio::fs::remove_dir(&self.nodes_dir).await;
        })
    }
}

/// Copies the regular files of directory `from` into `to` (created if
/// needed), for transports whose hosts share this machine's filesystem.
pub async fn copy_files(from: &Path, to: &Path) -> io::Result<()> {
    tokio::fs::create_dir_all(to).await?;
    let mut entries = tokio::fs::read_dir(from).await?;
    while let Some(e) = entries.next_entry().await? {
        if e.file_type().await?.is_file() {
            tokio::fs::copy(e.path(), to.join(e.file_name())).await?;
        }
    }
    Ok(())
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
