//! A launcher transport that runs each host's agents inside that host's
//! network namespace (`ip netns exec`), and its host commands (uid lease,
//! firewall, teardown, model fetch) there too. Below
//! the transport everything is the production path: the same launcher,
//! plan, certificates, agents, privilege drop and firewall rules.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use warden::transport::{
    AgentCmd, AgentError, BoxFuture, FetchLimits, HostJob, Spawned, Transport, clean_env, fetch_with, parse_setup,
    run_agent,
};
use warden_agent::host::Setup;
use warden_agent::job::plan::{HostPlan, PlannedProcess};

/// Hosts (by name in the job file) -> namespace.
#[derive(Debug)]
pub struct NetnsTransport {
    /// The agent binary.
    pub agent: PathBuf,
    /// Job directories go under here.
    pub nodes_dir: PathBuf,
    /// Host name -> namespace name.
    pub namespaces: BTreeMap<String, String>,
    /// Set as `WARDEN_TEST_TAG` in every agent's environment, to find them by PID.
    pub tag: String,
}

impl NetnsTransport {
    fn ns(&self, host: &str) -> io::Result<&str> {
        self.namespaces
            .get(host)
            .map(String::as_str)
            .ok_or_else(|| io::Error::other(format!("no namespace for {host}")))
    }
}

impl Transport for NetnsTransport {
    fn spawn_agent<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<Spawned>> {
        Box::pin(async move {
            let child = tokio::process::Command::new("ip")
                .args(["netns", "exec", self.ns(&p.host)?])
                .arg(&self.agent)
                .arg("run")
                .env_clear()
                .envs(clean_env())
                .env("WARDEN_TEST_TAG", &self.tag)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            Spawned::from_child(child, &self.agent)
        })
    }

    fn workdir(&self, p: &PlannedProcess) -> PathBuf {
        warden::transport::workdir_in(&self.nodes_dir, p)
    }

    fn fetch_dir<'a>(
        &'a self,
        p: &'a PlannedProcess,
        remote: &'a Path,
        local: &'a Path,
        limits: FetchLimits,
    ) -> BoxFuture<'a, io::Result<()>> {
        let args = AgentCmd::Fetch { dir: remote, limits }.args();
        Box::pin(async move {
            let ns = self.ns(&p.host)?;
            fetch_with(run_agent(&self.agent, &["ip", "netns", "exec", ns], &args, None), local, limits.max_bytes).await
        })
    }

    fn cleanup<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let _ = std::fs::remove_dir_all(self.workdir(p));
            let _ = std::fs::remove_file(self.workdir(p).with_file_name(p.socket_name()));
            Ok(())
        })
    }

    fn setup_host<'a>(&'a self, host: &'a HostPlan, job: &'a HostJob) -> BoxFuture<'a, Result<Setup, AgentError>> {
        Box::pin(async move {
            let ns = self.ns(&host.name)?;
            let args = AgentCmd::Setup { job, host: &host.name }.args();
            let out =
                run_agent(&self.agent, &["ip", "netns", "exec", ns], &args, Some(host.firewall.as_bytes())).await?;
            parse_setup(&out)
        })
    }

    fn teardown_host<'a>(
        &'a self,
        host: &'a HostPlan,
        job: &'a HostJob,
        uid: Option<u32>,
    ) -> BoxFuture<'a, Result<String, AgentError>> {
        Box::pin(async move {
            let ns = self.ns(&host.name)?;
            let out = run_agent(
                &self.agent,
                &["ip", "netns", "exec", ns],
                &AgentCmd::Teardown { job: &job.job, uid }.args(),
                None,
            )
            .await?;
            Ok(String::from_utf8_lossy(&out).trim().to_string())
        })
    }
}
