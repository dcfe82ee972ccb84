//! Slurm: agents started as job steps of the allocation the launcher runs
//! in, and `sbatch` submission from outside one.
//!
//! Each process is a step `srun --jobid J --overlap -N1 -n1 -w NODE -u -Q
//! warden-agent run` whose stdin and stdout are the same control channel as
//! over SSH, so everything above [`Transport`] (enrolment, TLS, roles,
//! checkpoints, model fetch) is shared. Ending `srun` ends its step: Slurm
//! kills every process of it on the node (the agent and a program of the
//! user's alike). Host commands (`warden-agent host ...`) are steps too;
//! steps run as the user who holds the allocation, so without root the
//! agent keeps what it can (no capabilities, `no_new_privs`, seccomp) and
//! `host setup` reports that the host has no firewall table and no uid of
//! the job's own.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use warden_agent::host::Setup;
use warden_agent::job::plan::{HostPlan, PlannedProcess};

use crate::transport::{
    AgentCmd, AgentError, BoxFuture, FetchLimits, HostJob, ProcessHandle, Spawned, TERM_GRACE, Transport, fetch_with,
    parse_setup, run_agent,
};

/// Agents as steps of allocation `job_id`.
#[derive(Debug)]
pub struct SlurmTransport {
    agent: PathBuf,
    nodes_dir: PathBuf,
    job_id: String,
}

impl SlurmTransport {
    /// Agents from `agent` (a path every node sees: a shared filesystem)
    /// for warden job `job`, as steps of Slurm job `job_id`. Job
    /// directories are as [`crate::transport::job_dirs`] says: with root,
    /// `[cluster] remote_dir/jobs/JOB` on each node; without, `nodes/` of
    /// the run directory, which is on the shared filesystem the nodes see
    /// too.
    pub fn for_job(
        agent: PathBuf,
        spec: &warden_agent::job::spec::JobSpec,
        job: &warden_agent::net::identity::JobId,
        run_nodes: PathBuf,
        job_id: String,
    ) -> Self {
        SlurmTransport { agent, nodes_dir: crate::transport::job_dirs(spec, job, run_nodes), job_id }
    }

    /// `srun` and its arguments for one task on `node`.
    fn srun(&self, node: &str) -> Vec<String> {
        let node = node.to_string();
        let args = ["--jobid", &self.job_id, "--overlap", "--nodes=1", "--ntasks=1", "--nodelist", &node];
        // -u: the control channel's lines go through at once; -Q: srun's
        // own notes stay out of the agent's stderr.
        ["srun"].iter().chain(args.iter()).chain(["--unbuffered", "--quiet"].iter()).map(|s| s.to_string()).collect()
    }

    /// Runs `warden-agent ARGS` as a step on `node`.
    async fn on_node(&self, node: &str, args: &[String], stdin: Option<&[u8]>) -> Result<Vec<u8>, AgentError> {
        let srun = self.srun(node);
        let prefix: Vec<&str> = srun.iter().map(String::as_str).collect();
        run_agent(&self.agent, &prefix, args, stdin).await
    }
}

/// A step's `srun`: ending it ends the step on the node.
struct SrunChild {
    child: tokio::process::Child,
}

impl ProcessHandle for SrunChild {
    fn wait(&mut self) -> BoxFuture<'_, io::Result<Option<i32>>> {
        Box::pin(async move { Ok(self.child.wait().await?.code()) })
    }

    fn terminate(&mut self, _group: Option<(u32, u64)>, _uid: Option<u32>) -> BoxFuture<'_, String> {
        Box::pin(async move {
            // SIGTERM to srun: Slurm kills the step's processes on the node
            // (all of them, whatever group they made) and srun exits.
            if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            }
            match tokio::time::timeout(TERM_GRACE, self.child.wait()).await {
                Ok(_) => "ended its Slurm step".to_string(),
                Err(_) => {
                    let _ = self.child.start_kill();
                    "killed srun after its step did not end on SIGTERM".to_string()
                }
            }
        })
    }
}

impl Transport for SlurmTransport {
    fn spawn_agent<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<Spawned>> {
        Box::pin(async move {
            let srun = self.srun(&p.host);
            let child = tokio::process::Command::new(&srun[0])
                .args(&srun[1..])
                .arg(&self.agent)
                .arg("run")
                .env_clear()
                .envs(crate::transport::clean_env())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // No orphans: if the launcher's handle is dropped, srun and so the step go too.
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot run srun ({e}): is Slurm's client installed (Debian: slurm-client)?"),
                    )
                })?;
            Spawned::piped(child, |child| Box::new(SrunChild { child }))
        })
    }

    fn workdir(&self, p: &PlannedProcess) -> PathBuf {
        crate::transport::workdir_in(&self.nodes_dir, p)
    }

    fn fetch_dir<'a>(
        &'a self,
        p: &'a PlannedProcess,
        remote: &'a Path,
        local: &'a Path,
        limits: FetchLimits,
    ) -> BoxFuture<'a, io::Result<()>> {
        let args = AgentCmd::Fetch { dir: remote, limits }.args();
        Box::pin(async move { fetch_with(self.on_node(&p.host, &args, None), local, limits.max_bytes).await })
    }

    fn cleanup<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let dir = self.workdir(p);
            let srun = self.srun(&p.host);
            let out = tokio::process::Command::new(&srun[0])
                .args(&srun[1..])
                .args(["rm", "-rf", "--"])
                .arg(&dir)
                .arg(dir.with_file_name(p.socket_name()))
                .env_clear()
                .envs(crate::transport::clean_env())
                .stdin(Stdio::null())
                .output()
                .await?;
            if out.status.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "cannot remove {} on {}: {}",
                    dir.display(),
                    p.host,
                    String::from_utf8_lossy(&out.stderr).trim()
                )))
            }
        })
    }

    fn setup_host<'a>(&'a self, host: &'a HostPlan, job: &'a HostJob) -> BoxFuture<'a, Result<Setup, AgentError>> {
        Box::pin(async move {
            let args = AgentCmd::Setup { job, host: &host.name }.args();
            parse_setup(&self.on_node(&host.name, &args, Some(host.firewall.as_bytes())).await?)
        })
    }

    fn teardown_host<'a>(
        &'a self,
        host: &'a HostPlan,
        job: &'a HostJob,
        uid: Option<u32>,
    ) -> BoxFuture<'a, Result<String, AgentError>> {
        Box::pin(async move {
            let out = self.on_node(&host.name, &AgentCmd::Teardown { job: &job.job, uid }.args(), None).await?;
            Ok(String::from_utf8_lossy(&out).trim().to_string())
        })
    }

    fn finish(&self) -> BoxFuture<'_, ()> {
        // Removes the (now empty) nodes directory; fails harmlessly if not
        // empty or if it is on the nodes.
        Box::pin(async move {
            let _ = tokio::fs::remove_dir(&self.nodes_dir).await;
        })
    }
}

/// Seconds before the allocation's time limit at which Slurm sends the
/// launcher SIGUSR1 (`sbatch --signal=B:USR1@90`): it then stops the job in
/// order, worker 0 saving the model, while the steps still run. (Slurm may
/// send it up to a minute earlier; at the limit itself it kills every step
/// after `KillWait`, too late to save anything.)
pub const STOP_AHEAD_S: u32 = 90;

/// The batch script `warden launch` submits, in the run directory.
pub const BATCH_SCRIPT: &str = "sbatch.sh";

/// What a submission left in the run directory (`slurm.json`), for
/// `warden status` and `warden stop` before and while the job runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Submitted {
    /// The Slurm job id.
    pub job_id: String,
}

/// The file [`Submitted`] is kept in.
pub const SUBMITTED: &str = "slurm.json";

impl Submitted {
    /// Writes it into `dir`.
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let text = serde_json::to_string(self).map_err(io::Error::other)?;
        std::fs::write(dir.join(SUBMITTED), text + "\n")
    }

    /// The submission recorded in `dir`, if the run was submitted.
    pub fn load(dir: &Path) -> Option<Submitted> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(SUBMITTED)).ok()?).ok()
    }
}

/// A POSIX shell script that `exec`s `argv`, each word single-quoted.
pub fn batch_script(argv: &[std::ffi::OsString]) -> String {
    let words: Vec<String> = argv.iter().map(|w| format!("'{}'", w.to_string_lossy().replace('\'', r"'\''"))).collect();
    format!("#!/bin/sh\n# Written by `warden launch`: the launcher, inside the allocation.\nexec {}\n", words.join(" "))
}

/// Why `sbatch` or `scancel` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The command could not be run.
    #[error("cannot run `{cmd}` ({source}): is Slurm's client installed (Debian: slurm-client) and on PATH?")]
    Missing {
        /// Which.
        cmd: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// It ran and refused.
    #[error("`{cmd}` failed: {stderr}")]
    Refused {
        /// Which.
        cmd: &'static str,
        /// What it said.
        stderr: String,
    },
    /// `sbatch --parsable` printed something other than a job id.
    #[error("sbatch answered `{0}`, not a job id")]
    NoJobId(String),
}

/// The `sbatch` arguments for a job of `spec` named `name` on `ports`, its
/// output appended to `log`. The comment names the ports for warden's Slurm
/// prolog, which installs the job's firewall table on every node.
pub fn sbatch_args(
    spec: &warden_agent::job::slurm::SlurmSpec,
    ports: (u16, u16),
    name: &str,
    log: &Path,
) -> Vec<String> {
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name=warden-{name}"),
        format!("--nodes={}", spec.nodes),
        format!("--output={}", log.display()),
        "--open-mode=append".to_string(),
        format!("--comment={}", warden_agent::host::slurm::comment(ports)),
        format!("--signal=B:USR1@{STOP_AHEAD_S}"),
    ];
    let named = [("--partition", &spec.partition), ("--time", &spec.time), ("--account", &spec.account)];
    args.extend(named.iter().filter_map(|(flag, v)| v.as_ref().map(|v| format!("{flag}={v}"))));
    args.extend(spec.sbatch_options.iter().cloned());
    args
}

/// Submits `script`; the Slurm job id.
pub fn sbatch(
    spec: &warden_agent::job::slurm::SlurmSpec,
    ports: (u16, u16),
    name: &str,
    log: &Path,
    script: &Path,
) -> Result<String, SubmitError> {
    let out = std::process::Command::new("sbatch")
        .args(sbatch_args(spec, ports, name, log))
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SubmitError::Missing { cmd: "sbatch", source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(SubmitError::Refused { cmd: "sbatch", stderr });
    }
    // `--parsable` prints `ID` or `ID;CLUSTER`.
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let id = said.split(';').next().unwrap_or_default();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SubmitError::NoJobId(said));
    }
    Ok(id.to_string())
}

/// The state Slurm gives job `id` (`PENDING`, `RUNNING`, `TIMEOUT`, ...), or
/// `None` once Slurm has forgotten it.
pub fn job_state(id: &str) -> Result<Option<String>, SubmitError> {
    let out = std::process::Command::new("scontrol")
        .args(["-o", "show", "job", id])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SubmitError::Missing { cmd: "scontrol", source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // Finished long enough ago to be forgotten; anything else (a
        // controller that does not answer) is not an answer.
        if stderr.contains("Invalid job id") {
            return Ok(None);
        }
        return Err(SubmitError::Refused { cmd: "scontrol", stderr });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().find_map(|t| t.strip_prefix("JobState=")).map(str::to_string))
}

/// Whether a job in Slurm state `state` is over (nothing of it runs or will).
pub fn finished(state: &str) -> bool {
    matches!(
        state,
        "COMPLETED"
            | "CANCELLED"
            | "FAILED"
            | "TIMEOUT"
            | "NODE_FAIL"
            | "PREEMPTED"
            | "OUT_OF_MEMORY"
            | "BOOT_FAIL"
            | "DEADLINE"
    )
}

/// Asks Slurm to end job `id`: a running job's batch step (the launcher)
/// gets SIGTERM and stops the job in order, keeping the model; a job still
/// waiting is cancelled.
pub fn scancel(id: &str, running: bool) -> Result<(), SubmitError> {
    let mut cmd = std::process::Command::new("scancel");
    if running {
        cmd.args(["--batch", "--signal=TERM"]);
    }
    let out =
        cmd.arg(id).stdin(Stdio::null()).output().map_err(|source| SubmitError::Missing { cmd: "scancel", source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SubmitError::Refused { cmd: "scancel", stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_script_quotes_every_word() {
        let argv: Vec<std::ffi::OsString> = ["/opt/warden", "launch", "/jobs/it's here.toml"].map(Into::into).to_vec();
        let script = batch_script(&argv);
        assert!(script.ends_with("exec '/opt/warden' 'launch' '/jobs/it'\\''s here.toml'\n"), "{script}");
        let out = std::process::Command::new("sh").arg("-c").arg(script.replace("exec ", "printf '%s\\n' ")).output();
        let out = String::from_utf8(out.unwrap().stdout).unwrap();
        assert_eq!(out, "/opt/warden\nlaunch\n/jobs/it's here.toml\n");
    }

    #[test]
    fn sbatch_gets_the_job_files_settings() {
        let spec = warden_agent::job::slurm::SlurmSpec {
            nodes: 2,
            workers_per_node: 1,
            servers_per_node: 1,
            partition: Some("gpu".into()),
            time: Some("01:00:00".into()),
            account: None,
            sbatch_options: vec!["--exclusive".into()],
        };
        let args = sbatch_args(&spec, (29500, 29599), "mlp", Path::new("/runs/a/launcher.log"));
        assert_eq!(
            args,
            [
                "--parsable",
                "--job-name=warden-mlp",
                "--nodes=2",
                "--output=/runs/a/launcher.log",
                "--open-mode=append",
                "--comment=warden:ports=29500-29599",
                "--signal=B:USR1@90",
                "--partition=gpu",
                "--time=01:00:00",
                "--exclusive"
            ]
        );
    }
}
