//! Slurm: `[cluster.slurm]`, and the hosts of a job from the allocation it
//! runs in.
//!
//! Inside an allocation (`SLURM_JOB_ID` set: `salloc`, or an `sbatch`
//! script that calls `warden launch`) the job's hosts are the allocation's
//! nodes: their names from `scontrol show hostnames $SLURM_JOB_NODELIST`,
//! each one's address from `scontrol show node` (`NodeAddr`, resolved if it
//! is a name). The first node runs the scheduler; every node runs
//! `servers_per_node` servers and `workers_per_node` workers. Only the
//! launcher asks Slurm; agents get the hosts with their bundle, like the
//! hosts of a hostfile.

use std::net::IpAddr;
use std::process::Command;

use serde::Serialize;

use crate::job::spec::HostSpec;

/// `[cluster.slurm]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlurmSpec {
    /// Nodes to allocate (`sbatch --nodes`); inside an allocation, the first
    /// this many of its nodes.
    pub nodes: u32,
    /// Workers on each node.
    pub workers_per_node: u32,
    /// Parameter servers on each node.
    pub servers_per_node: u32,
    /// `sbatch --partition`.
    pub partition: Option<String>,
    /// `sbatch --time` (Slurm's formats: `MM`, `HH:MM:SS`, `D-HH`, ...).
    pub time: Option<String>,
    /// `sbatch --account`.
    pub account: Option<String>,
    /// More `sbatch` options, each one argument (`--exclusive`, `--qos=high`).
    pub sbatch_options: Vec<String>,
}

/// The allocation this process runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// `SLURM_JOB_ID`.
    pub job_id: String,
    /// Its nodes, in Slurm's order, with their addresses.
    pub nodes: Vec<(String, IpAddr)>,
}

/// Why the allocation's nodes could not be listed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SlurmError {
    /// `scontrol` could not be run.
    #[error("cannot run `scontrol` ({0}): is Slurm's client installed (Debian: slurm-client) and on PATH?")]
    NoScontrol(#[source] std::io::Error),
    /// `scontrol` failed.
    #[error("`scontrol {args}` failed: {stderr}")]
    Failed {
        /// Its arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
    /// `SLURM_JOB_ID` is set but not a job id.
    #[error("SLURM_JOB_ID is `{0}`, not a Slurm job id")]
    BadJobId(String),
    /// The allocation's node list is not in the environment.
    #[error("SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not: run warden inside the allocation's shell or script")]
    NoNodeList,
    /// A node without a usable address.
    #[error("node `{node}` has no address warden can use ({why}); set its NodeAddr in slurm.conf")]
    NoAddress {
        /// The node.
        node: String,
        /// Why.
        why: String,
    },
    /// The allocation is smaller than the job asks for.
    #[error("the allocation has {have} node(s); [cluster.slurm] nodes asks for {want}")]
    TooFewNodes {
        /// Allocated.
        have: usize,
        /// Asked for.
        want: u32,
    },
}

/// `SLURM_JOB_ID`, if this process runs inside an allocation.
pub fn job_id() -> Result<Option<String>, SlurmError> {
    match std::env::var("SLURM_JOB_ID") {
        Ok(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(id)),
        Ok(id) if id.is_empty() => Ok(None),
        Ok(id) => Err(SlurmError::BadJobId(id)),
        Err(_) => Ok(None),
    }
}

/// The allocation this process runs in, if any.
pub fn allocation() -> Result<Option<Allocation>, SlurmError> {
    let Some(job_id) = job_id()? else { return Ok(None) };
    let list = std::env::var("SLURM_JOB_NODELIST")
        .or_else(|_| std::env::var("SLURM_NODELIST"))
        .map_err(|_| SlurmError::NoNodeList)?;
    Ok(Some(Allocation { job_id, nodes: nodes(&list)? }))
}

/// The nodes of a Slurm node list (`wb[0-3]`), with their addresses: two
/// calls of `scontrol` whatever the number of nodes (a prolog runs this on
/// every node of an allocation at once; one query per node would flood
/// slurmctld).
pub fn nodes(list: &str) -> Result<Vec<(String, IpAddr)>, SlurmError> {
    let names = scontrol(&["show", "hostnames", list])?;
    let shown = scontrol(&["-o", "show", "node"])?;
    let addrs: std::collections::HashMap<&str, &str> = shown
        .lines()
        .filter_map(|l| {
            let name = l.split_whitespace().find_map(|t| t.strip_prefix("NodeName="))?;
            Some((name, node_addr(l)?))
        })
        .collect();
    let mut nodes = Vec::new();
    for name in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
        let addr = addrs.get(name).ok_or_else(|| SlurmError::NoAddress {
            node: name.to_string(),
            why: "scontrol shows no NodeAddr".into(),
        })?;
        let ip = match addr.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => resolve(addr).map_err(|why| SlurmError::NoAddress { node: name.to_string(), why })?,
        };
        nodes.push((name.to_string(), ip));
    }
    Ok(nodes)
}

/// The `NodeAddr=` of a `scontrol -o show node` line.
pub fn node_addr(shown: &str) -> Option<&str> {
    shown.split_whitespace().find_map(|t| t.strip_prefix("NodeAddr=")).filter(|a| !a.is_empty())
}

fn resolve(name: &str) -> Result<IpAddr, String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<IpAddr> = (name, 0).to_socket_addrs().map_err(|e| e.to_string())?.map(|a| a.ip()).collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or_else(|| "no address".to_string())
}

fn scontrol(args: &[&str]) -> Result<String, SlurmError> {
    let out = Command::new("scontrol").args(args).output().map_err(SlurmError::NoScontrol)?;
    if !out.status.success() {
        return Err(SlurmError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The job's hosts on `nodes` (the allocation's, or stand-ins before there
/// is one): the first `spec.nodes` of them, the scheduler on the first.
pub fn hosts(spec: &SlurmSpec, nodes: &[(String, IpAddr)]) -> Result<Vec<HostSpec>, SlurmError> {
    if nodes.len() < spec.nodes as usize {
        return Err(SlurmError::TooFewNodes { have: nodes.len(), want: spec.nodes });
    }
    Ok(nodes
        .iter()
        .take(spec.nodes as usize)
        .enumerate()
        .map(|(i, (name, address))| HostSpec {
            name: name.clone(),
            address: *address,
            ssh: name.clone(),
            scheduler: u32::from(i == 0),
            servers: spec.servers_per_node,
            workers: spec.workers_per_node,
            identity_file: None,
        })
        .collect())
}

/// Stand-ins for the nodes of an allocation that does not exist yet (a
/// plan made before `sbatch`): `node-1` ... at addresses of the
/// documentation range 192.0.2.0/24, which no real host has.
pub fn stand_ins(spec: &SlurmSpec) -> Vec<(String, IpAddr)> {
    (0..spec.nodes).map(|i| (format!("node-{}", i + 1), IpAddr::from([192, 0, 2, (i % 254 + 1) as u8]))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_come_from_the_one_line_form() {
        let line = "NodeName=wb1 Arch=x86_64 CoresPerSocket=1 NodeAddr=10.252.0.11 NodeHostName=wb1 Version=22.05.8";
        assert_eq!(node_addr(line), Some("10.252.0.11"));
        assert_eq!(node_addr("NodeName=x NodeAddr= State=IDLE"), None);
        assert_eq!(node_addr("NodeName=x"), None);
    }

    #[test]
    fn the_first_node_runs_the_scheduler_and_every_node_its_share() {
        let spec = SlurmSpec {
            nodes: 2,
            workers_per_node: 2,
            servers_per_node: 1,
            partition: None,
            time: None,
            account: None,
            sbatch_options: Vec::new(),
        };
        let nodes = stand_ins(&SlurmSpec { nodes: 3, ..spec.clone() });
        let placed = hosts(&spec, &nodes).unwrap();
        assert_eq!(placed.len(), 2);
        assert_eq!((placed[0].scheduler, placed[1].scheduler), (1, 0));
        assert!(placed.iter().all(|h| h.workers == 2 && h.servers == 1));
        assert!(matches!(
            hosts(&SlurmSpec { nodes: 4, ..spec }, &nodes),
            Err(SlurmError::TooFewNodes { have: 3, want: 4 })
        ));
    }
}
