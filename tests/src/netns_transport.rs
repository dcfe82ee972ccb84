//! A launcher transport that runs each host's agents inside that host's
//! network namespace (`ip netns exec`), and its firewall there too. Below
//! the transport everything is the production path: the same launcher,
//! plan, certificates, agents, privilege drop and firewall rules.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use warden::transport::{BoxFuture, Spawned, Transport};
use warden_agent::plan::{HostPlan, PlannedProcess};

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

    fn nft(&self, host: &str, args: &[&str], stdin: Option<String>) -> Result<(), String> {
        use std::io::Write;
        let ns = self.ns(host).map_err(|e| e.to_string())?;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "nft"])
            .args(args)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let Some(text) = stdin {
            child.stdin.take().unwrap().write_all(text.as_bytes()).map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
    }
}

impl Transport for NetnsTransport {
    fn spawn_agent<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<Spawned>> {
        Box::pin(async move {
            let child = tokio::process::Command::new("ip")
                .args(["netns", "exec", self.ns(&p.host)?])
                .arg(&self.agent)
                .arg("run")
                .env("WARDEN_TEST_TAG", &self.tag)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
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
        // The namespaces share this machine's filesystem.
        Box::pin(warden::transport::copy_files(remote, local))
    }

    fn cleanup<'a>(&'a self, p: &'a PlannedProcess) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let _ = std::fs::remove_dir_all(self.workdir(p));
            Ok(())
        })
    }

    fn setup_host<'a>(&'a self, host: &'a HostPlan, table: &'a str) -> BoxFuture<'a, Result<Option<String>, String>> {
        Box::pin(async move {
            let _ = self.nft(&host.name, &["delete", "table", "inet", table], None);
            self.nft(&host.name, &["-f", "-"], Some(host.firewall.clone())).map(|()| None)
        })
    }

    fn teardown_host<'a>(&'a self, host: &'a HostPlan, table: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.nft(&host.name, &["delete", "table", "inet", table], None) })
    }
}
